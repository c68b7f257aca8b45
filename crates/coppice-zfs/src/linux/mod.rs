//! Linux-only parts: the overlay driver and the tree operations it shares with the template
//! builder.

mod overlay;
pub(crate) mod tree;

pub use overlay::OverlayStorage;
