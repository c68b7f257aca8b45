//! Sandbox lifecycle rules and the contracts between Coppice's layers.
//!
//! Today this crate holds [`backend`]: one trait per platform role — [`backend::Isolation`]
//! (the jail role: namespaces and cgroups on Linux, jail(8) on FreeBSD), [`backend::Machine`]
//! (the bhyve role: microVMs), [`backend::Storage`] (the ZFS role: templates, writable
//! layers, snapshots) and [`backend::Network`] (each sandbox's network stack and egress
//! policy) — plus the plain-data specs and ids they exchange and the
//! [`backend::BackendError`] they all return. Backend crates implement these traits; the
//! gateway composes them. [`state`] is the pure lifecycle state machine: one
//! [`state::Lifecycle::transition`] that returns the next state and the event it causes.
//!
//! **Invariant:** nothing here performs I/O or names an operating system; backends describe
//! the host they run on through [`backend::Capabilities`].

pub mod backend;
pub mod state;
