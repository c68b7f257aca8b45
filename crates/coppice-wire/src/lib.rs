//! E2B's wire format: the JSON bodies and query strings the real SDKs (`e2b` 2.63,
//! `e2b-code-interpreter` 2.11) send and read, as `../shared/e2b-protocol.md` §2 records them.
//!
//! [`error::ErrorBody`] is the `{"code", "message"}` body of every error; [`sandbox`] holds the
//! control-plane requests and responses; [`logs`] the sandbox log bodies; [`query`] decodes
//! list queries (including E2B's thrice-encoded `metadata`); [`template`] the template
//! catalogue's bodies; [`build`] the template build protocol's; [`snapshot`] snapshots and forks; [`timestamp`] formats RFC 3339 times the way E2B does.
//! Requests reject fields the SDKs never send, so a typo is a 400 rather than a silent default.
//!
//! **Invariant:** no I/O, no HTTP status logic beyond the error body's `code`; wire structs are
//! never the domain structs — the gateway converts.

pub mod build;
pub mod error;
pub mod logs;
pub mod query;
pub mod sandbox;
pub mod snapshot;
pub mod template;
pub mod timestamp;
