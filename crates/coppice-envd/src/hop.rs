//! Owned by a parallel workstream; filled in by its owner.
