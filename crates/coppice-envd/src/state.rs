//! Per-sandbox agent state: what `/init` sets and every surface reads.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, RwLock};
use std::time::Instant;

use crate::proctable::Manager;
use crate::watchers::Watchers;

/// Where the agent finds the sandbox's users and what it reports on.
///
/// The defaults are the sandbox's own files; tests point them at fixtures so that user
/// switching can be exercised on a host without touching its `/etc`.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The `passwd(5)` file users are resolved from (no NSS, so the binary links statically).
    pub passwd: PathBuf,
    /// The `group(5)` file for group names and supplementary groups.
    pub group: PathBuf,
    /// The file system `/metrics` reports disk usage for.
    pub disk_root: PathBuf,
    /// Where reports to the gateway are appended (`crate::report`); `None` reports nothing.
    pub report_file: Option<PathBuf>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            passwd: PathBuf::from("/etc/passwd"),
            group: PathBuf::from("/etc/group"),
            disk_root: PathBuf::from("/"),
            report_file: None,
        }
    }
}

/// State shared by every request the agent serves.
#[derive(Debug)]
pub struct AgentState {
    /// Sandbox environment variables from `/init`, layered under per-call envs.
    pub envs: RwLock<HashMap<String, String>>,
    /// The user commands run as when a request names none (`user` unless `/init` says).
    pub default_user: RwLock<String>,
    /// The working directory commands start in when a request names none (`/init`'s
    /// `defaultWorkdir`); `None` means the user's home.
    pub default_workdir: RwLock<Option<String>>,
    /// The envd access token; when set, requests must carry it as E2B's envd checks it.
    pub access_token: RwLock<Option<String>>,
    /// When the agent started, for `/metrics` and uptime.
    pub started: Instant,
    /// Where users and disk figures come from.
    pub config: AgentConfig,
    /// Processes started through `process.Process`.
    pub(crate) processes: Manager,
    /// Polling watchers made by `CreateWatcher`.
    pub(crate) watchers: Watchers,
    /// The previous `/proc/stat` CPU sample, so `/metrics` reports usage since the last call.
    pub(crate) cpu_sample: Mutex<Option<(u64, u64)>>,
}

impl AgentState {
    /// Fresh state with the default configuration: no envs, user `user`, no token.
    pub fn new() -> Self {
        Self::with_config(AgentConfig::default())
    }

    /// Fresh state reading users and disk figures from `config`.
    pub fn with_config(config: AgentConfig) -> Self {
        Self {
            envs: RwLock::new(HashMap::new()),
            default_user: RwLock::new("user".to_owned()),
            default_workdir: RwLock::new(None),
            access_token: RwLock::new(None),
            started: Instant::now(),
            config,
            processes: Manager::default(),
            watchers: Watchers::default(),
            cpu_sample: Mutex::new(None),
        }
    }

    /// The sandbox env vars, cloned (a poisoned lock still holds valid data).
    pub fn envs_snapshot(&self) -> HashMap<String, String> {
        match self.envs.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The default user's name.
    pub fn default_user_name(&self) -> String {
        match self.default_user.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The access token, if one was set.
    pub fn token(&self) -> Option<String> {
        match self.access_token.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The default working directory, if `/init` set one.
    pub fn default_workdir(&self) -> Option<String> {
        match self.default_workdir.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Sends `signal` to the process group of every running process (shutdown as PID 1).
    pub fn signal_all(&self, signal: nix::sys::signal::Signal) {
        self.processes.signal_all(signal);
    }
}

impl Default for AgentState {
    fn default() -> Self {
        Self::new()
    }
}
