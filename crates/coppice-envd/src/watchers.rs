//! The polling watchers made by `filesystem.Filesystem/CreateWatcher`, by id.
//!
//! They live apart from the service (`crate::filesystem`) so that the agent's state can hold
//! them without the state and the service importing each other.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

/// The polling watchers made by `CreateWatcher`.
#[derive(Debug, Default)]
pub(crate) struct Watchers {
    /// The last watcher number handed out.
    pub(crate) next: AtomicU64,
    /// The watchers by id.
    pub(crate) map: Mutex<HashMap<String, PollingWatcher>>,
}

/// One polling watcher: the events its task collects until the next `GetWatcherEvents`.
#[derive(Debug)]
pub(crate) struct PollingWatcher {
    pub(crate) events: Arc<Mutex<Vec<serde_json::Value>>>,
    /// The task that fills `events`; aborted when the watcher goes.
    pub(crate) task: tokio::task::AbortHandle,
}

impl Drop for PollingWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}
