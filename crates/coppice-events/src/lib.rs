//! Sandbox events: what happened to a sandbox, kept durably and pushed to webhooks.
//!
//! [`event::Event`] is E2B's event record (`sandbox.lifecycle.*`, Sandforge's `task.timeout`
//! and `security.violation`, and `task.completed`). [`store`] keeps events, webhooks and an outbox of
//! deliveries in the gateway's own SQLite database: [`store::record`] takes the caller's
//! connection, so an event commits in the same transaction as the state change it describes.
//! [`dispatch::Dispatcher`] drains the outbox, signing each POST with [`sign`] (E2B's
//! `e2b-signature`, Standard Webhooks, Sandforge), retrying on the [`retry`] schedule, and
//! connecting only to addresses the [`guard`] allows, on pooled keep-alive connections (TLS
//! for `https`: [`tls`], rustls on ring).
//! Delivery is at least once: an attempt cut off by a crash is retried after a restart, always
//! with the event's original id.
//!
//! **Invariant:** nothing here decides *when* a sandbox changes state or owns a database file;
//! the caller hands in its events and its connection, and this crate only records and delivers.

mod client;
pub mod dispatch;
pub mod event;
pub mod guard;
pub mod retry;
pub mod sign;
pub mod store;
pub mod tls;
