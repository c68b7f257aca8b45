//! The Coppice gateway: E2B's control plane and sandbox proxy on raw hyper.
//!
//! [`run`] locks the state directory ([`state_lock`]: one gateway per state directory), binds
//! its listeners, opens the durable [`registry`] (whose database also holds the event log and
//! the webhook outbox), starts the webhook dispatcher on its own connection, re-adopts the
//! sandboxes a previous run left in the background (killing those whose window passed; until
//! then sandbox routes answer 503, see [`adoption`]), builds the templates, and serves every
//! listener until SIGTERM or SIGINT; sandboxes keep running across restarts.
//! [`service`] is the one route table, `api/*` the handlers (they parse, call the lifecycle
//! state machine and [`runtime`], and serialize), `api/error.rs` the one mapping from errors
//! to E2B's `{code, message}`; [`runtime`] composes the jail, storage and agent; [`builds`]
//! builds templates with E2B's `Template` protocol in build sandboxes; the reaper
//! enforces every sandbox's window, applies event retention and reads the events of
//! enforcement inside sandboxes ([`feed`]: agent reports, cgroup counters). `Gateway::commit` writes a
//! transition's record and its event in one transaction.
//!
//! **Invariant:** handlers never touch a backend directly and every lifecycle change goes
//! through `coppice_lifecycle::state::Lifecycle::transition`, written to the registry (with
//! its event) before it is acknowledged.

pub mod config;
pub use check::check_config;

mod admission;
mod adoption;
mod agent_death;
mod api;
mod builds;
mod catalogue;
mod check;
mod egress;
mod feed;
mod metrics;
mod names;
mod notify;
mod pool;
mod registry;
mod runtime;
mod sandbox_log;
mod server;
mod service;
mod snapshots;
mod state_lock;
mod tls;
mod usage;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use coppice_events::dispatch::{Dispatcher, Waker};
use coppice_events::event::{Event, Execution, SandboxContext, LOCAL_TEAM_ID};
use coppice_events::guard::Guard;
use coppice_events::sign::Format;
use coppice_events::store::{self, Retention};
use coppice_events::tls::Tls;
use coppice_lifecycle::backend::{RunState, SandboxId};
use coppice_lifecycle::state::{Cause, Command, Lifecycle, LifecycleEvent, Millis, SandboxState};

use crate::config::Config;
use crate::registry::{Record, Registry};
use crate::runtime::Runtime;

/// The name under which the gateway binary runs as the in-sandbox agent.
pub const AGENT_NAME: &str = "coppice-envd";

/// How often the reaper looks for windows that ended.
const REAPER_INTERVAL: Duration = Duration::from_millis(250);
/// How often the event retention policy is applied.
const RETENTION_INTERVAL: Duration = Duration::from_secs(60);
/// How long the webhook dispatcher gets to stop at shutdown.
const DISPATCHER_STOP: Duration = Duration::from_secs(5);
/// How long a pause waits for data-plane requests already under way to end before it
/// freezes the sandbox anyway (a command's stream that outlasts it resumes with the sandbox).
const PAUSE_DRAIN: Duration = Duration::from_secs(1);
/// The name of the subscription `--webhook-url` creates and refreshes.
const CLI_WEBHOOK_NAME: &str = "coppice --webhook-url";

/// Errors that stop the gateway from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The state directory, registry or backends could not be opened.
    #[error("{0}")]
    Setup(String),
    /// A listener could not be bound.
    #[error("listen on {addr}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// One sandbox as the gateway holds it: its record, a lock that serialises lifecycle
/// operations on it (pause vs kill vs the reaper), and when traffic last reached it.
///
/// Lifecycle operations take `op` for writing; the data plane takes it for reading while it
/// checks the state and records its traffic, so the reaper never pauses a sandbox between a
/// request's check and its touch.
#[derive(Debug)]
pub(crate) struct Entry {
    /// Its id (never changes; also in `record`).
    pub(crate) id: SandboxId,
    record: Mutex<Record>,
    pub(crate) op: tokio::sync::RwLock<()>,
    /// Milliseconds since the epoch of the last data-plane request, 0 for none since the last
    /// commit that stored it.
    activity: AtomicU64,
    /// Data-plane requests under way (until their response body ends or is dropped): an
    /// open stream counts as activity.
    in_flight: AtomicU32,
    /// Woken when `in_flight` drops to zero; see [`Entry::drain`].
    idle: tokio::sync::Notify,
    /// Its resource samples, for `GET /sandboxes/{id}/metrics`.
    pub(crate) usage: usage::History,
    /// Its tasks (processes and threads) at the last sample, `u32::MAX` before one. A live
    /// agent alone has more than one (its runtime, reaper and signal threads), so one or none
    /// means the agent is gone or going: [`agent_death::check`] then looks.
    tasks: AtomicU32,
}

impl Entry {
    fn new(record: Record) -> Arc<Self> {
        Arc::new(Self {
            id: record.id.clone(),
            record: Mutex::new(record),
            op: tokio::sync::RwLock::new(()),
            activity: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            idle: tokio::sync::Notify::new(),
            usage: usage::History::default(),
            tasks: AtomicU32::new(u32::MAX),
        })
    }

    /// The current record, with traffic not yet stored applied to its window (an auto-resume
    /// sandbox's window is an idle timer).
    pub(crate) fn record(&self) -> Record {
        let mut record = self.stored();
        record.lifecycle = self.with_activity(record.lifecycle);
        record
    }

    /// [`Entry::record`]'s lifecycle alone, without copying the rest of the record: what
    /// the passes over every sandbox need.
    pub(crate) fn lifecycle(&self) -> Lifecycle {
        self.with_activity(self.stored_lifecycle())
    }

    fn with_activity(&self, lifecycle: Lifecycle) -> Lifecycle {
        let at = self.activity.load(Ordering::Acquire);
        lifecycle
            .transition(Command::Activity { at: Millis(at) })
            .map_or(lifecycle, |(moved, _)| moved)
    }

    /// The record as the registry has it.
    fn stored(&self) -> Record {
        lock(&self.record).clone()
    }

    /// The lifecycle as the registry has it.
    fn stored_lifecycle(&self) -> Lifecycle {
        lock(&self.record).lifecycle
    }

    /// Notes data-plane traffic at `now`; the caller holds `op` for reading.
    pub(crate) fn touch(&self, now: Millis) {
        self.activity.fetch_max(now.0, Ordering::AcqRel);
    }

    /// Counts a data-plane request as under way until the returned guard is dropped.
    pub(crate) fn begin_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(self))
    }

    /// Waits, for at most `within`, until no data-plane request is under way; the caller
    /// holds `op` for writing, so none starts meanwhile. A pause calls it before it freezes
    /// the sandbox: a command's stream that reached the agent before the pause (an `echo`
    /// whose end event is on its way) ends first, instead of hanging until a resume.
    /// Returns whether the sandbox drained.
    pub(crate) async fn drain(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            // Registered before the count is read, so a drop to zero in between still wakes.
            idle.as_mut().enable();
            if self.in_flight.load(Ordering::Acquire) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.in_flight.load(Ordering::Acquire) == 0;
            }
        }
    }
}

/// A data-plane request under way; see [`Entry::begin_request`].
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Entry>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Pauses `entry`'s sandbox once the requests already under way have ended, or
/// [`PAUSE_DRAIN`] has passed; the caller holds `op` for writing.
pub(crate) async fn freeze(runtime: &Runtime, entry: &Entry) -> Result<(), runtime::RuntimeError> {
    if !entry.drain(PAUSE_DRAIN).await {
        tracing::debug!(sandbox = %entry.id, "pausing with requests still under way");
    }
    runtime.pause(&entry.id).await
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a single read or replace, so a poisoned lock holds consistent
    // data.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Shared state of a running gateway.
#[derive(Debug)]
pub(crate) struct Gateway {
    pub(crate) config: Config,
    registry: Registry,
    pub(crate) runtime: Runtime,
    sandboxes: Mutex<HashMap<SandboxId, Arc<Entry>>>,
    ready: AtomicBool,
    /// Each built-in template's build: for `/health`, the warm pool and `/templates`.
    pub(crate) templates: catalogue::Catalogue,
    /// Pokes the webhook dispatcher after a commit that recorded events.
    waker: Waker,
    /// The operator's policy for webhook destinations.
    pub(crate) guard: Guard,
    /// Where the feeds of events from inside sandboxes stand.
    feeds: feed::Feeds,
    /// Creates under way; the warm pool refills only while there are none.
    creates: AtomicUsize,
    /// Wakes the warm-pool filler: a sandbox was claimed, a create ended, or shutdown began.
    pool_wake: tokio::sync::Notify,
    /// Set at shutdown: the filler stops starting sandboxes.
    stopping: AtomicBool,
    /// Whether the sandboxes of a previous run are re-adopted yet; sandbox routes and the
    /// warm-pool filler wait for it.
    adoption: adoption::Adoption,
    /// Counters for `GET /metrics`.
    pub(crate) metrics: metrics::Metrics,
    /// The webhook dispatcher's counters, for `GET /metrics`.
    pub(crate) dispatch_stats: coppice_events::dispatch::Stats,
    /// `--max-sandboxes` and `--min-free-memory`: who gets a sandbox.
    pub(crate) admission: admission::Admission,
    /// Templates built with E2B's `Template` builder ([`builds`]).
    pub(crate) builds: Arc<builds::Builds>,
    /// Each template's warm pool: its target and what it did (`/pool`).
    pub(crate) pools: pool::Pools,
    /// Snapshots and forks ([`snapshots`]).
    pub(crate) snapshots: snapshots::Snapshots,
}

/// A create under way; see [`Gateway::creating`].
#[derive(Debug)]
pub(crate) struct Creating<'a>(&'a Gateway);

impl Drop for Creating<'_> {
    fn drop(&mut self) {
        self.0.creates.fetch_sub(1, Ordering::AcqRel);
        self.0.pool_wake.notify_one();
    }
}

/// What events say about the sandbox of `record`.
pub(crate) fn context(record: &Record) -> SandboxContext {
    let limits = record.limits;
    SandboxContext {
        sandbox_id: record.id.to_string(),
        template_id: record.template.clone(),
        build_id: record.build_id.clone(),
        execution_id: record.execution_id.clone(),
        team_id: LOCAL_TEAM_ID.to_owned(),
        metadata: record.metadata.clone(),
        // Records written before events existed have no execution to report.
        execution: (!record.execution_id.is_empty()).then(|| Execution {
            started_at: Millis(record.execution_started_at),
            vcpu_count: limits.cpu_millis.map_or(1, |m| m.div_ceil(1000)),
            memory_mb: limits.memory_bytes.map_or(0, |b| b >> 20),
        }),
    }
}

/// The event for `event`, a transition `record` is the result of. A new execution starts on
/// `created` and `resumed`: its id is minted into `record` first, so the event carries it.
fn lifecycle_event(record: &mut Record, event: &LifecycleEvent, at: Millis) -> Event {
    if matches!(
        event,
        LifecycleEvent::Created | LifecycleEvent::Resumed { .. }
    ) {
        record.execution_id = uuid::Uuid::new_v4().to_string();
        record.execution_started_at = at.0;
    }
    Event::lifecycle(&context(record), event, at)
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now() -> Millis {
    Millis(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    )
}

impl Gateway {
    /// Whether the default template is ready, so sandboxes can be created.
    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Whether the sandboxes of a previous run are re-adopted (build sandboxes wait for it).
    pub(crate) fn adoption_done(&self) -> bool {
        self.adoption.is_done()
    }

    /// Each template's state, for `/health`.
    pub(crate) fn template_states(&self) -> std::collections::BTreeMap<&'static str, String> {
        self.templates.health()
    }

    /// The sandbox `id`, if the gateway has it and it is not being killed.
    pub(crate) fn entry(&self, id: &SandboxId) -> Option<Arc<Entry>> {
        lock(&self.sandboxes)
            .get(id)
            .filter(|e| e.record().lifecycle.state != SandboxState::Killed)
            .cloned()
    }

    /// Every sandbox the gateway has.
    pub(crate) fn entries(&self) -> Vec<Arc<Entry>> {
        lock(&self.sandboxes).values().cloned().collect()
    }

    /// Adds a new sandbox, durably.
    pub(crate) fn insert(&self, record: Record) -> Result<Arc<Entry>, registry::RegistryError> {
        self.registry.put(&record)?;
        let id = record.id.clone();
        let entry = Entry::new(record);
        lock(&self.sandboxes).insert(id, Arc::clone(&entry));
        Ok(entry)
    }

    /// Stores `record`, the result of a transition, together with the transition's `event`, in
    /// one transaction (the caller holds the entry's operation lock); returns the record as
    /// stored (a `created` or `resumed` gets a new execution id).
    pub(crate) fn commit(
        &self,
        entry: &Entry,
        record: Record,
        event: &LifecycleEvent,
    ) -> Result<Record, registry::RegistryError> {
        self.commit_noting(entry, record, event, &[])
    }

    /// [`Gateway::commit`], with `note`'s fields added to the event's `eventData` (a fork's
    /// `forkedFrom`).
    pub(crate) fn commit_noting(
        &self,
        entry: &Entry,
        mut record: Record,
        event: &LifecycleEvent,
        note: &[(&str, serde_json::Value)],
    ) -> Result<Record, registry::RegistryError> {
        let mut recorded = lifecycle_event(&mut record, event, now());
        if let Some(serde_json::Value::Object(data)) = recorded.event_data.as_mut() {
            for (key, value) in note {
                data.insert((*key).to_owned(), value.clone());
            }
        }
        self.metrics.lifecycle(event);
        self.commit_event(entry, record, recorded)
    }

    /// Stores `record` with `event`, a change outside the state machine (a network policy),
    /// in one transaction; the caller holds the entry's operation lock.
    pub(crate) fn commit_event(
        &self,
        entry: &Entry,
        record: Record,
        event: Event,
    ) -> Result<Record, registry::RegistryError> {
        self.registry.put_with_events(&record, &[event])?;
        *lock(&entry.record) = record.clone();
        // `record` came from `Entry::record`, so it holds every touch so far (touches wait
        // for the operation lock the caller holds); a later window starts from this commit.
        entry.activity.store(0, Ordering::Release);
        self.waker.wake();
        Ok(record)
    }

    /// Counts a create as under way until the guard is dropped.
    pub(crate) fn creating(&self) -> Creating<'_> {
        self.creates.fetch_add(1, Ordering::AcqRel);
        Creating(self)
    }

    /// Tells the warm-pool filler that the pool may need a sandbox.
    pub(crate) fn pool_changed(&self) {
        self.pool_wake.notify_one();
    }

    /// Keeps each ready template's pool at its target ([`pool::Pools`]: `--warm-pool`, or
    /// what `/pool` stored). It starts one sandbox at a time and only while no create is
    /// under way, so refilling never competes with the creates it is meant to speed up; a
    /// pool above its target gives back its oldest idle sandbox first.
    async fn keep_warm(self: Arc<Self>) {
        const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);
        while !self.stopping.load(Ordering::Acquire) {
            let wanted = runtime::TEMPLATES
                .iter()
                .map(|(name, _)| *name)
                .find(|name| {
                    self.templates.is_ready(name)
                        && self.runtime.warm_count(name) < self.pools.target(name)
                });
            // Before re-adoption is over, a started sandbox would be killed as unregistered,
            // and the sandboxes not yet adopted are not counted against the limits.
            let adopted = self.adoption.is_done();
            let idle = adopted && self.creates.load(Ordering::Acquire) == 0;
            // Below the memory floor (or over the limit) the pool shrinks first.
            if let Some(w) = adopted
                .then(|| self.admission.surplus_warm(&self))
                .flatten()
            {
                self.runtime.destroy(&w.id).await;
                continue;
            }
            // A target lowered while a start was under way; `/pool` shrinks at once otherwise.
            if let Some(name) = self.pools.over_target(&self.runtime) {
                self.pools.shrink(&self.runtime, name).await;
                continue;
            }
            let ticket = wanted
                .filter(|_| idle)
                .and_then(|name| Some((name, self.admission.admit_warm(&self)?)));
            let Some((name, _ticket)) = ticket else {
                // Woken by a claim, the end of a create or of re-adoption, or shutdown; the
                // timeout covers a template becoming ready and memory or places coming free.
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), self.pool_wake.notified()).await;
                continue;
            };
            let filling = self.pools.filling().await;
            if self.runtime.warm_count(name) >= self.pools.target(name) {
                // Lowered (or drained) while this waited for a shrink.
                continue;
            }
            let started = self.runtime.prestart(name).await;
            drop(filling);
            if let Err(e) = started {
                tracing::warn!(template = name, error = %e, "starting a warm sandbox failed");
                self.pools.failed(name, now(), api::error::error_chain(&e));
                let _ = tokio::time::timeout(RETRY_AFTER_FAILURE, self.pool_wake.notified()).await;
            }
        }
    }

    /// The registry, for the events and webhooks API.
    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Wakes the webhook dispatcher (after a commit that may have enqueued deliveries).
    pub(crate) fn wake_dispatcher(&self) {
        self.waker.wake();
    }

    /// Forgets a killed sandbox.
    pub(crate) fn remove(&self, id: &SandboxId) -> Result<(), registry::RegistryError> {
        self.registry.delete(id)?;
        lock(&self.sandboxes).remove(id);
        self.forget_feeds(id);
        Ok(())
    }

    /// Applies an expiry to `entry` if its window ended: kill or pause as its policy says.
    async fn expire(&self, entry: &Entry) {
        let _op = entry.op.write().await;
        let record = entry.record();
        let now = now();
        let Ok((lifecycle, event)) = record.lifecycle.transition(Command::Expire { now }) else {
            return;
        };
        if lifecycle.state == SandboxState::Killed {
            // What the sandbox reported last is recorded before its `killed`.
            self.drain_feeds(entry).await;
            // Gone for every caller from here on, before the teardown takes its time; the
            // `killed` event commits with that change.
            if let Err(e) = self.commit(
                entry,
                Record {
                    lifecycle,
                    ..record.clone()
                },
                &event,
            ) {
                tracing::error!(sandbox = %record.id, error = %e, "recording the expiry failed");
                return;
            }
        }
        // `autoPauseMemory: false`: the window's end stops it, keeping its files.
        let cold = lifecycle.state == SandboxState::Paused && record.auto_pause_cold;
        let result = match lifecycle.state {
            SandboxState::Paused if cold => self.runtime.stop(&record.id).await,
            SandboxState::Paused => freeze(&self.runtime, entry).await,
            _ => self.runtime.kill(&record.id).await,
        };
        if let Err(e) = result {
            tracing::warn!(sandbox = %record.id, error = %e, "expiring the sandbox failed");
            return;
        }
        let outcome = if lifecycle.state == SandboxState::Killed {
            self.remove(&record.id)
        } else {
            self.commit(
                entry,
                Record {
                    lifecycle,
                    paused_cold: cold,
                    pid: if cold { None } else { record.pid },
                    ..record.clone()
                },
                &event,
            )
            .map(drop)
        };
        match outcome {
            Ok(()) => {
                tracing::info!(sandbox = %record.id, state = ?lifecycle.state, "window ended");
            }
            Err(e) => {
                tracing::error!(sandbox = %record.id, error = %e, "recording the expiry failed");
            }
        }
    }

    /// Stores the window that traffic moved, with its `updated` event.
    async fn store_activity(&self, entry: &Entry) {
        let _op = entry.op.write().await;
        let stored = entry.stored();
        let at = Millis(entry.activity.load(Ordering::Acquire));
        let Ok((lifecycle, event)) = stored.lifecycle.transition(Command::Activity { at }) else {
            return;
        };
        if let Err(e) = self.commit(
            entry,
            Record {
                lifecycle,
                ..stored.clone()
            },
            &event,
        ) {
            tracing::error!(sandbox = %stored.id, error = %e, "recording activity failed");
        }
    }

    /// The reaper: enforces every running sandbox's window.
    async fn reap_forever(self: Arc<Self>) {
        let mut tick = tokio::time::interval(REAPER_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pruned_at = std::time::Instant::now();
        self.prune_events();
        self.prune_logs().await;
        // Layers of snapshots and forks whose last user went while the gateway was down.
        snapshots::collect(&self).await;
        let mut ticks: u32 = 0;
        loop {
            tick.tick().await;
            // Reports from agents every fourth tick: one stat each when nothing is new.
            ticks = ticks.wrapping_add(1);
            if ticks.is_multiple_of(4) {
                self.ingest_reports_of_all().await;
            }
            if pruned_at.elapsed() >= RETENTION_INTERVAL {
                pruned_at = std::time::Instant::now();
                self.prune_events();
                self.prune_logs().await;
                snapshots::collect(&self).await;
            }
            let now = now();
            for (n, entry) in self.entries().iter().enumerate() {
                yield_every(n).await;
                if entry.in_flight.load(Ordering::Acquire) > 0 {
                    // A request still streaming is traffic now; the expiry below takes the
                    // operation lock, so a touch that races a commit only delays it a tick.
                    entry.touch(now);
                }
                let lifecycle = entry.lifecycle();
                if lifecycle.state == SandboxState::Killed {
                    self.finish_kill(entry).await;
                } else if lifecycle.is_expired(now) {
                    self.expire(entry).await;
                } else if activity_due(&entry.stored_lifecycle(), &lifecycle, now) {
                    self.store_activity(entry).await;
                }
            }
        }
    }

    /// Takes a resource sample of `entry`'s sandbox into its history, if it is running, and
    /// turns its enforcement counters into events where they moved. The disk is read only
    /// when the sandbox used CPU since the last sample (or a minute has passed;
    /// [`usage::History::record_idle`]).
    pub(crate) async fn sample(&self, entry: &Entry) -> Option<usage::Sample> {
        let record = entry.record();
        if record.lifecycle.state != SandboxState::Running {
            return None;
        }
        let at = now().0;
        let started_at = record.lifecycle.started_at.0;
        let cpus = usage::cpu_count(&record.limits);
        let read = async {
            let cpu = self.runtime.enforcement(&record.id).await?;
            entry.tasks.store(cpu.tasks, Ordering::Release);
            self.ingest_counters_from(entry, &cpu);
            if let Some(sample) = entry.usage.record_idle(at, started_at, cpus, &cpu) {
                return Ok(sample);
            }
            let disk = self.runtime.disk_usage(&record.id).await?;
            Ok::<_, runtime::RuntimeError>(entry.usage.record(at, started_at, cpus, &cpu, &disk))
        };
        match read.await {
            Ok(sample) => Some(sample),
            Err(e) => {
                // A sandbox killed or paused since it was listed.
                tracing::debug!(sandbox = %record.id, error = %e, "no usage sample");
                None
            }
        }
    }

    /// Every [`usage::SAMPLE_INTERVAL`]: samples every running sandbox and rotates every
    /// sandbox's log that grew past its bound (one blocking task for all of them).
    async fn watch_forever(self: Arc<Self>) {
        let mut tick = tokio::time::interval(usage::SAMPLE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let entries = self.entries();
            for (n, entry) in entries.iter().enumerate() {
                self.sample(entry).await;
                if entry.tasks.load(Ordering::Acquire) <= 1 {
                    agent_death::check(&self, entry).await;
                }
                yield_every(n).await;
            }
            let logs: Vec<PathBuf> = entries
                .iter()
                .map(|e| self.runtime.log_path(&e.id))
                .collect();
            drop(entries);
            let rotated = tokio::task::spawn_blocking(move || {
                for path in logs {
                    match sandbox_log::rotate_if_large(&path, sandbox_log::MAX_FILE_BYTES) {
                        Ok(true) => tracing::debug!(log = %path.display(), "log rotated"),
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(log = %path.display(), error = %e, "rotating a sandbox log failed");
                        }
                    }
                }
            })
            .await;
            if let Err(e) = rotated {
                tracing::warn!(error = %e, "rotating sandbox logs panicked");
            }
        }
    }

    /// Removes the logs of sandboxes the gateway no longer has once they are
    /// [`sandbox_log::RETENTION`] old.
    async fn prune_logs(&self) {
        let live: std::collections::HashSet<String> = self
            .entries()
            .iter()
            .map(|e| e.record().id.to_string())
            .collect();
        let dir = self.runtime.logs_dir();
        let pruned = tokio::task::spawn_blocking(move || {
            sandbox_log::prune(
                &dir,
                |id| live.contains(id),
                SystemTime::now(),
                sandbox_log::RETENTION,
            )
        })
        .await;
        match pruned {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(files = n, "pruned sandbox logs"),
            Ok(Err(e)) => tracing::warn!(error = %e, "pruning sandbox logs failed"),
            Err(e) => tracing::warn!(error = %e, "pruning sandbox logs panicked"),
        }
    }

    /// Applies the event retention policy.
    fn prune_events(&self) {
        let days = self.config.event_retention_days;
        let policy = Retention {
            max_age: (days > 0).then(|| Duration::from_secs(days.saturating_mul(24 * 3600))),
            max_events: self.config.event_retention_count,
        };
        match self.registry.with_conn(|c| store::prune(c, &policy, now())) {
            Ok(p) if p.events + p.deliveries + p.attempts > 0 => {
                tracing::info!(
                    events = p.events,
                    deliveries = p.deliveries,
                    attempts = p.attempts,
                    "pruned events"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "pruning events failed"),
        }
    }

    /// Creates or refreshes the Sandforge-format subscription of `--webhook-url`, or disables
    /// the one a previous start made when the flag is gone (its undelivered events are kept).
    fn cli_webhook(&self) -> Result<(), StartError> {
        let setup = |e: store::StoreError| StartError::Setup(format!("--webhook-url: {e}"));
        let existing = self
            .registry
            .with_conn(store::list_webhooks)
            .map_err(setup)?
            .into_iter()
            .find(|w| w.name == CLI_WEBHOOK_NAME);
        let Some(cli) = &self.config.webhook else {
            if let Some(w) = existing.filter(|w| w.enabled) {
                let patch = store::WebhookPatch {
                    enabled: Some(false),
                    ..store::WebhookPatch::default()
                };
                self.registry
                    .with_conn(|c| store::update_webhook(c, w.id, &patch))
                    .map_err(setup)?;
                tracing::info!("--webhook-url is gone: its subscription is disabled");
            }
            return Ok(());
        };
        let url = coppice_events::guard::WebhookUrl::parse(&cli.url)
            .map_err(|e| StartError::Setup(format!("--webhook-url: {e}")))?;
        self.guard
            .check_url(&url)
            .map_err(|e| StartError::Setup(format!("--webhook-url: {e}")))?;
        let events = coppice_events::event::EventType::ALL.to_vec();
        self.registry
            .with_conn(|c| match &existing {
                Some(w) => store::update_webhook(
                    c,
                    w.id,
                    &store::WebhookPatch {
                        name: None,
                        url: Some(cli.url.clone()),
                        enabled: Some(true),
                        events: Some(events),
                        secret: Some(cli.secret.clone()),
                    },
                ),
                None => store::create_webhook(
                    c,
                    &store::NewWebhook {
                        name: CLI_WEBHOOK_NAME.to_owned(),
                        url: cli.url.clone(),
                        enabled: true,
                        events,
                        secret: cli.secret.clone(),
                        format: Format::Sandforge,
                    },
                    now(),
                ),
            })
            .map_err(setup)?;
        tracing::info!(url = %cli.url, "webhook subscription from the command line");
        Ok(())
    }

    /// Retries the teardown of a sandbox recorded as killed whose teardown failed.
    async fn finish_kill(&self, entry: &Entry) {
        let Ok(_op) = entry.op.try_write() else {
            // Its kill is still under way.
            return;
        };
        let id = entry.record().id;
        match self.runtime.kill(&id).await {
            Ok(()) => {
                if let Err(e) = self.remove(&id) {
                    tracing::error!(sandbox = %id, error = %e, "forgetting a killed sandbox");
                }
            }
            Err(e) => tracing::warn!(sandbox = %id, error = %e, "teardown failed; will retry"),
        }
    }

    /// Brings the registry and the backends into agreement after a (re)start, behind the
    /// listener: the jail re-adopts what survived, the registry forgets what did not, what
    /// nobody registered is killed and windows that passed while the gateway was down end.
    /// Sandbox routes answer 503 until it returns. Nothing in it is quadratic, and the
    /// teardowns and expiries run [`RECONCILE_CONCURRENCY`] at a time, so thousands of
    /// sandboxes take seconds.
    async fn reconcile(self: &Arc<Self>) -> Result<(), StartError> {
        let setup = |e: &dyn std::error::Error| StartError::Setup(api::error::error_chain(e));
        let records = self.registry.load_all().map_err(|e| setup(&e))?;
        self.adoption.begin(records.len());
        // The jail knows no sandbox before this: `Runtime::open` only attaches.
        self.runtime.recover().await.map_err(|e| setup(&e))?;
        let live = self.runtime.live().await.map_err(|e| setup(&e))?;
        let registered: HashSet<SandboxId> = records.iter().map(|r| r.id.clone()).collect();
        let mut gone = Vec::new();
        for record in records {
            let id = record.id.clone();
            let state = record.lifecycle.state;
            let alive = live.get(&id).copied();
            let keep = matches!(
                (state, alive),
                (
                    SandboxState::Running | SandboxState::Paused,
                    Some(RunState::Running | RunState::Paused)
                )
            ) || (state == SandboxState::Paused
                && record.paused_cold
                && self.runtime.has_root(&id).await);
            if !keep {
                tracing::warn!(sandbox = %id, ?state, ?alive, "sandbox did not survive; cleaning up");
                gone.push(record);
                continue;
            }
            // The registry is the truth for paused vs running.
            let fix = match (state, alive) {
                // Paused cold: nothing may run (a crash between its stop and its record).
                (SandboxState::Paused, Some(_)) if record.paused_cold => {
                    self.runtime.stop(&id).await
                }
                (SandboxState::Paused, Some(RunState::Running)) => self.runtime.pause(&id).await,
                (SandboxState::Running, Some(RunState::Paused)) => self.runtime.resume(&id).await,
                _ => Ok(()),
            };
            if let Err(e) = fix {
                tracing::warn!(sandbox = %id, error = %e, "could not restore the sandbox's state");
            }
            tracing::debug!(sandbox = %id, ?state, "re-adopted");
            lock(&self.sandboxes).insert(id, Entry::new(record));
            self.adoption.adopted_one();
        }
        // Sandboxes the jail has but the registry does not: warm ones of the previous run, or
        // a create cut short by a crash.
        let on_disk = self.runtime.on_disk().await.map_err(|e| setup(&e))?;
        // A warm start cut short between its root filesystem and its jail record left a
        // root and a run directory that neither the registry nor the jail names.
        let half_started: Vec<SandboxId> = on_disk
            .into_iter()
            .filter(|id| !registered.contains(id) && !live.contains_key(id))
            .collect();
        let unregistered: Vec<SandboxId> = live
            .into_keys()
            .filter(|id| !registered.contains(id))
            .collect();
        for id in &unregistered {
            tracing::warn!(sandbox = %id, "unregistered sandbox (warm, or from an interrupted create); killing it");
        }
        for id in &half_started {
            tracing::warn!(sandbox = %id, "root filesystem of an interrupted start; removing it");
        }
        // Collected first: a future that the spawn in `run` must prove `Send` cannot hold
        // borrowing iterators across an await.
        let doomed: Vec<SandboxId> = gone
            .iter()
            .map(|r| r.id.clone())
            .chain(unregistered.iter().cloned())
            .chain(half_started.iter().cloned())
            .collect();
        each_bounded(doomed, |id| {
            let gw = Arc::clone(self);
            async move {
                if let Err(e) = gw.runtime.kill(&id).await {
                    tracing::warn!(sandbox = %id, error = %e, "cleanup failed");
                }
            }
        })
        .await;
        // A sandbox that was running or paused died with the previous gateway: that is its
        // `killed`. A killed record already has its event; a creating one never had a
        // `created`. Every record goes in one transaction with those events.
        let at = now();
        let events: Vec<Event> = gone
            .iter()
            .filter(|r| {
                matches!(
                    r.lifecycle.state,
                    SandboxState::Running | SandboxState::Paused
                )
            })
            .filter_map(|r| {
                let (_, event) = r
                    .lifecycle
                    .transition(Command::Kill {
                        now: at,
                        cause: Cause::Failure,
                    })
                    .ok()?;
                Some(lifecycle_event(&mut r.clone(), &event, at))
            })
            .collect();
        let ids: Vec<SandboxId> = gone.into_iter().map(|r| r.id).collect();
        self.registry
            .delete_many_with_events(&ids, &events)
            .map_err(|e| setup(&e))?;
        for _ in &events {
            self.metrics.lifecycle(&LifecycleEvent::Killed {
                cause: Cause::Failure,
            });
        }
        // Windows that passed while the gateway was down end now.
        let now = now();
        let expired: Vec<Arc<Entry>> = self
            .entries()
            .into_iter()
            .filter(|e| e.record().lifecycle.is_expired(now))
            .collect();
        each_bounded(expired, |entry| {
            let gw = Arc::clone(self);
            async move { gw.expire(&entry).await }
        })
        .await;
        tracing::info!(
            adopted = self.entries().len(),
            gone = ids.len(),
            unregistered = unregistered.len(),
            half_started = half_started.len(),
            "sandboxes of the previous run re-adopted"
        );
        Ok(())
    }

    /// Kills a sandbox for good (used by DELETE and by failed creates).
    pub(crate) async fn kill(
        &self,
        entry: &Entry,
        cause: Cause,
    ) -> Result<(), api::error::ApiError> {
        let record = entry.record();
        let (lifecycle, event) = record
            .lifecycle
            .transition(Command::Kill { now: now(), cause })
            .map_err(api::error::ApiError::from)?;
        // What the sandbox reported last is recorded before its `killed`.
        self.drain_feeds(entry).await;
        // Recorded first, with its `killed` event: the control plane says 404 and the data
        // plane 502 from here on, while the teardown below takes its time; a crash in between
        // leaves a killed record that the next start finishes off.
        self.commit(
            entry,
            Record {
                lifecycle,
                ..record.clone()
            },
            &event,
        )?;
        self.runtime.kill(&record.id).await?;
        self.remove(&record.id)?;
        Ok(())
    }
}

/// Lets the executor run other tasks every 256 items of a pass over every sandbox, so a pass
/// over thousands never holds a worker thread for long.
async fn yield_every(n: usize) {
    if n % 256 == 255 {
        tokio::task::yield_now().await;
    }
}

/// How many teardowns or expiries [`Gateway::reconcile`] runs at once: enough to overlap
/// their cgroup, filesystem and registry waits, few enough to leave the blocking pool and
/// the disk to the requests served meanwhile.
const RECONCILE_CONCURRENCY: usize = 32;

/// Runs `op` on every item, at most [`RECONCILE_CONCURRENCY`] at a time, and waits for all.
async fn each_bounded<T, F, Fut>(items: impl IntoIterator<Item = T>, op: F)
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut running = tokio::task::JoinSet::new();
    let joined = |r: Option<Result<(), tokio::task::JoinError>>| {
        if let Some(Err(e)) = r {
            tracing::error!(error = %e, "a reconcile task panicked");
        }
    };
    for item in items {
        if running.len() >= RECONCILE_CONCURRENCY {
            joined(running.join_next().await);
        }
        running.spawn(op(item));
    }
    while let Some(r) = running.join_next().await {
        joined(Some(r));
    }
}

/// How far traffic may move a window before the reaper stores it: a restart forgets at most
/// this much activity, and a busy sandbox records at most one `updated` event per period.
const ACTIVITY_STORE_AFTER: Duration = Duration::from_secs(60);

/// Whether the window traffic moved (`current`, from [`Entry::record`]) must be stored now:
/// the stored one has ended, or the two are far apart.
fn activity_due(
    stored: &coppice_lifecycle::state::Lifecycle,
    current: &coppice_lifecycle::state::Lifecycle,
    now: Millis,
) -> bool {
    current.end_at > stored.end_at
        && (stored.is_expired(now) || current.end_at.since(stored.end_at) >= ACTIVITY_STORE_AFTER)
}

/// Picks the agent binary: the configured one, else the gateway itself (which runs as the agent
/// under that name). Nothing is guessed from the neighbourhood of the executable: a
/// `coppice-envd` left there by an older build would silently run stale code in sandboxes.
fn agent_binary(config: &Config) -> Result<PathBuf, StartError> {
    if let Some(a) = &config.agent {
        // Absolute, because it is bind-mounted into every sandbox: a relative path would
        // make every create fail.
        return match std::fs::canonicalize(a) {
            Ok(path) if path.is_file() => Ok(path),
            Ok(_) => Err(StartError::Setup(format!(
                "--agent {}: not a file",
                a.display()
            ))),
            Err(e) => Err(StartError::Setup(format!("--agent {}: {e}", a.display()))),
        };
    }
    std::env::current_exe()
        .map_err(|e| StartError::Setup(format!("cannot find the gateway's executable: {e}")))
}

/// How https webhook receivers are verified: the system bundle, plus `--webhook-ca-file`.
fn webhook_tls(config: &Config) -> Result<Tls, StartError> {
    let Some(file) = &config.webhook_ca_file else {
        return Ok(Tls::default());
    };
    let what = file.display().to_string();
    let pem = std::fs::read(file)
        .map_err(|e| StartError::Setup(format!("--webhook-ca-file {what}: {e}")))?;
    let tls = Tls::new(Some((&what, &pem))).map_err(|e| {
        StartError::Setup(format!(
            "--webhook-ca-file: {}",
            api::error::error_chain(&e)
        ))
    })?;
    tracing::info!(roots = tls.roots(), file = %what, "https webhooks trust the system CAs and this file");
    Ok(tls)
}

/// Runs the gateway until SIGTERM or SIGINT.
///
/// The start-up order matters: the state directory's lock comes first (a second gateway on
/// it must touch nothing), then the listeners (a restart gets its port back at once), then
/// the registry and the backends, whose jail only attaches; re-adopting the previous run's
/// sandboxes happens behind the listener, and only then do the reaper, the watcher and the
/// warm-pool filler start.
pub async fn run(mut config: Config) -> Result<(), StartError> {
    if config.prepare_templates {
        let cache = config.template_cache.clone();
        return tokio::task::spawn_blocking(move || runtime::prepare_templates(&cache))
            .await
            .map_err(|e| StartError::Setup(format!("prepare templates: {e}")))?
            .map_err(|e| StartError::Setup(api::error::error_chain(&e)));
    }
    std::fs::create_dir_all(&config.state_dir)
        .map_err(|e| StartError::Setup(format!("create {}: {e}", config.state_dir.display())))?;
    // First of all: a second gateway on this state directory must touch nothing. Held until
    // `run` returns, which is the life of the process.
    let _state_lock = state_lock::StateLock::acquire(&config.state_dir)
        .map_err(|e| StartError::Setup(api::error::error_chain(&e)))?;
    if let Some(net) = config.network.as_ref().filter(|n| n.purge) {
        runtime::purge_network(&config.state_dir, net)
            .map_err(|e| StartError::Setup(api::error::error_chain(&e)))?;
        tracing::info!(name = %net.name, "sandbox networking removed");
        return Ok(());
    }
    let listeners = server::bind(&config).await?;
    // `--listen` may name port 0; from here on it is the port the main listener got, which
    // the default `domain` of create answers carries.
    if let Some(bound) = listeners.first().and_then(|l| l.local_addr().ok()) {
        config.listen = bound;
    }
    let listener_tls = tls::acceptor(&config)?;
    let db = config.state_dir.join("registry.db");
    let registry =
        Registry::open(&db).map_err(|e| StartError::Setup(api::error::error_chain(&e)))?;
    // The dispatcher drains the outbox on its own connection to the same file (WAL lets it
    // run beside the registry's).
    // synchronous=NORMAL as on the registry's connection: in WAL mode a commit survives a
    // process crash without waiting for a disk flush.
    let dispatch_conn = rusqlite::Connection::open(&db)
        .and_then(|c| c.busy_timeout(Duration::from_secs(5)).map(|()| c))
        .and_then(|c| c.pragma_update(None, "synchronous", "NORMAL").map(|()| c))
        .map_err(|e| StartError::Setup(format!("open {} for webhooks: {e}", db.display())))?;
    let guard = Guard::new(config.webhook_allow.clone(), config.webhook_deny.clone());
    let tls = webhook_tls(&config)?;
    let dispatcher = Dispatcher::new(
        dispatch_conn,
        coppice_events::dispatch::Config {
            guard: guard.clone(),
            tls,
            ..coppice_events::dispatch::Config::default()
        },
    );
    let agent = agent_binary(&config)?;
    let runtime = Runtime::open(
        &config.state_dir,
        &config.template_cache,
        agent.clone(),
        config.network.as_ref(),
    )
    .map_err(|e| StartError::Setup(api::error::error_chain(&e)))?;
    // Kept for the life of the process; dropping it stops it.
    let _dns = runtime
        .start_dns(
            config
                .network
                .as_ref()
                .map_or(&[][..], |n| n.dns_upstream.as_slice()),
        )
        .await
        .map_err(|e| StartError::Setup(api::error::error_chain(&e)))?;
    if config.api_keys.is_empty() {
        tracing::warn!("COPPICE_API_KEYS is not set: any API key is accepted");
    }
    tracing::info!(agent = %agent.display(), state_dir = %config.state_dir.display(), "starting");
    let admission = admission::Admission::new(&config).map_err(StartError::Setup)?;
    // A target `/pool` stored wins over `--warm-pool`, which is the default of the others.
    let stored = registry
        .pool_targets()
        .map_err(|e| StartError::Setup(api::error::error_chain(&e)))?;
    let pools = pool::Pools::new(
        runtime::TEMPLATES.iter().map(|(name, _)| *name),
        config.warm_pool,
        &stored,
    );
    let templates = catalogue::Catalogue::new(
        runtime::TEMPLATES
            .iter()
            .map(|(name, _)| (*name, runtime.recipe_key(name))),
        now(),
    );
    let builds = builds::Builds::open(
        &db,
        &config.state_dir.join("builds"),
        now().0,
        builds::image::Registries::new(
            config.registry_mirror.as_deref(),
            config.insecure_registries.clone(),
        )
        .map_err(StartError::Setup)?,
        coppice_jail::JailConfig::DEFAULT_UID_BASE,
    )
    .map_err(|e| StartError::Setup(api::error::error_chain(&e)))?;
    let snapshots = snapshots::Snapshots::open(&registry)
        .map_err(|e| StartError::Setup(api::error::error_chain(&e)))?;
    let gateway = Arc::new(Gateway {
        config,
        registry,
        runtime,
        sandboxes: Mutex::new(HashMap::new()),
        ready: AtomicBool::new(false),
        templates,
        waker: dispatcher.waker(),
        guard,
        feeds: feed::Feeds::default(),
        creates: AtomicUsize::new(0),
        pool_wake: tokio::sync::Notify::new(),
        stopping: AtomicBool::new(false),
        adoption: adoption::Adoption::default(),
        metrics: metrics::Metrics::default(),
        dispatch_stats: dispatcher.stats(),
        admission,
        builds: Arc::new(builds),
        pools,
        snapshots,
    });
    gateway.cli_webhook()?;
    // Started before reconcile, whose cleanups record events; it first retries the attempts
    // a crash cut off.
    let (stop_dispatcher, stopped) = tokio::sync::oneshot::channel::<()>();
    let dispatching = tokio::spawn(dispatcher.run(async move {
        let _ = stopped.await;
    }));
    let adopter = Arc::clone(&gateway);
    let adopting = tokio::spawn(async move {
        adopter.reconcile().await?;
        adopter.adoption.finish();
        tokio::spawn(Arc::clone(&adopter).reap_forever());
        tokio::spawn(Arc::clone(&adopter).watch_forever());
        tokio::spawn(egress::watch_blocked(Arc::clone(&adopter)));
        adopter.pool_changed();
        Ok::<(), StartError>(())
    });
    // A failed re-adoption stops the gateway, as it did when it ran before the listener.
    let adoption_failed = async move {
        match adopting.await {
            Ok(Ok(())) => std::future::pending().await,
            Ok(Err(e)) => e,
            Err(e) => StartError::Setup(format!("re-adopting sandboxes panicked: {e}")),
        }
    };
    // Templates build in the background; /health says 200 once the default one is ready.
    let builder = Arc::clone(&gateway);
    tokio::spawn(async move {
        for (name, _) in runtime::TEMPLATES {
            match builder.runtime.template(name).await {
                Ok(_) => {
                    tracing::info!(template = name, "template ready");
                    let built_at = builder.runtime.built_at(name);
                    builder.templates.ready(name, built_at, now());
                    if *name == "base" {
                        builder.ready.store(true, Ordering::Release);
                    }
                }
                Err(e) => {
                    tracing::error!(template = name, error = %e, "template unavailable");
                    builder.templates.failed(name, e.to_string(), now());
                }
            }
        }
    });
    let filler = tokio::spawn(Arc::clone(&gateway).keep_warm());
    // Stopped at shutdown, when the build it was running ends as `error` and its sandbox is
    // killed (a crash leaves both to the next start: the build ends as `error` and its
    // sandbox goes as unregistered).
    let build_worker = tokio::spawn(builds::engine::work(Arc::clone(&gateway)));
    let notifier = tokio::spawn(notify::when_ready(Arc::clone(&gateway)));
    let served = tokio::select! {
        served = server::serve(Arc::clone(&gateway), listeners, listener_tls) => served,
        e = adoption_failed => Err(e),
    };
    notifier.abort();
    notify::send("STOPPING=1");
    // Warm sandboxes belong to no one: stop refilling, then kill them.
    gateway.stopping.store(true, Ordering::Release);
    gateway.pool_changed();
    let _ = filler.await;
    build_worker.abort();
    let _ = build_worker.await;
    builds::engine::stop(&gateway).await;
    gateway.runtime.drain().await;
    // Attempts still in flight keep their leases and are made again after the next start.
    let _ = stop_dispatcher.send(());
    match tokio::time::timeout(DISPATCHER_STOP, dispatching).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::error!(error = %e, "the webhook dispatcher failed"),
        Ok(Err(e)) => tracing::error!(error = %e, "the webhook dispatcher panicked"),
        Err(_) => tracing::warn!("the webhook dispatcher did not stop in time"),
    }
    served
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Config {
        Config::from_args_and_env(args.iter().map(|a| (*a).to_owned()), |_| None).unwrap()
    }

    /// The agent is bind-mounted into every sandbox, which needs an absolute source.
    #[test]
    fn a_relative_agent_path_becomes_absolute() {
        // Tests run in the package's directory.
        let agent = agent_binary(&config(&["--agent", "./Cargo.toml"])).unwrap();
        assert!(agent.is_absolute(), "{}", agent.display());
        assert!(agent.ends_with("Cargo.toml"));
        assert!(matches!(
            agent_binary(&config(&["--agent", "./no-such-agent"])),
            Err(StartError::Setup(m)) if m.contains("no-such-agent")
        ));
        assert!(matches!(
            agent_binary(&config(&["--agent", "src"])),
            Err(StartError::Setup(m)) if m.contains("not a file")
        ));
    }
}
