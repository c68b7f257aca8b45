//! Per-sandbox agent state: what `/init` sets and every surface reads.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Instant;

/// State shared by every request the agent serves.
#[derive(Debug)]
pub struct AgentState {
    /// Sandbox environment variables from `/init`, layered under per-call envs.
    pub envs: RwLock<HashMap<String, String>>,
    /// The user commands run as when a request names none (`user` unless `/init` says).
    pub default_user: RwLock<String>,
    /// The envd access token; when set, requests must carry it as E2B's envd checks it.
    pub access_token: RwLock<Option<String>>,
    /// When the agent started, for `/metrics` and uptime.
    pub started: Instant,
}

impl AgentState {
    /// Fresh state: no envs, user `user`, no token.
    pub fn new() -> Self {
        Self {
            envs: RwLock::new(HashMap::new()),
            default_user: RwLock::new("user".to_owned()),
            access_token: RwLock::new(None),
            started: Instant::now(),
        }
    }
}

impl Default for AgentState {
    fn default() -> Self {
        Self::new()
    }
}
