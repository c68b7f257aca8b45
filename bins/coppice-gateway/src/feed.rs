//! Events from inside sandboxes, which the gateway does not see happen: the agent's reports
//! (`task.completed` and `task.timeout`, from `<state>/run/<id>/events.ndjson`) and the jail's
//! cgroup counters (`security.violation` when a fork is refused at the task limit or the
//! memory limit's OOM killer strikes).
//!
//! Each source is an event feed of the store (`coppice_events::store::record_feed`): a
//! report file is read from its persisted byte offset and a counter from its persisted value,
//! and the events move that position in the same transaction, so each line or counter step
//! becomes exactly one event across gateway restarts. The report file is written from inside
//! the sandbox, so it is read defensively: never through a symlink, only as a regular file,
//! in bounded chunks, malformed lines skipped with a warning. Its events are only as
//! trustworthy as the sandbox. Once every line of it is recorded and it has grown past
//! [`COMPACT_AT`], it is emptied ([`report::compact`]) and read from its start again, so a
//! sandbox that runs commands for days never reaches the file's bound.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use coppice_envd::report::{self, Ending, Report};
use coppice_events::event::{
    Blocked, Event, SecurityViolation, TaskCompleted, TaskEnd, TaskTimeout,
};
use coppice_events::store;
use coppice_lifecycle::backend::{ResourceUsage, SandboxId};
use coppice_lifecycle::state::{Millis, SandboxState};

use crate::{context, lock, now, Entry, Gateway};

/// A report file read to its end is emptied once it is at least this long.
const COMPACT_AT: u64 = 64 * 1024;

/// Positions of the feeds read so far, so an unchanged file costs one `stat`.
#[derive(Debug, Default)]
pub(crate) struct Feeds {
    positions: Mutex<HashMap<String, u64>>,
}

/// The cgroup limit a counter belongs to.
#[derive(Debug, Clone, Copy)]
enum Limit {
    /// Forks refused at the task limit.
    Tasks,
    /// Kills by the memory limit.
    Memory,
}

/// The account of a command's ending that both task events carry.
fn task_end(command: String, ending: Ending) -> TaskEnd {
    TaskEnd {
        command,
        pid: ending.pid,
        exit_code: ending.exit_code,
        signal: ending.signal,
        duration: Duration::from_millis(ending.duration_ms),
    }
}

fn agent_key(id: &SandboxId) -> String {
    format!("agent:{id}")
}
fn pids_key(id: &SandboxId) -> String {
    format!("pids:{id}")
}
fn oom_key(id: &SandboxId) -> String {
    format!("oom:{id}")
}

impl Gateway {
    /// Reads what is new in every running sandbox's agent reports (one `stat` each when
    /// nothing is). The cgroup counters come with each resource sample instead
    /// ([`Gateway::sample`]), which reads them anyway.
    pub(crate) async fn ingest_reports_of_all(&self) {
        for (n, entry) in self.entries().iter().enumerate() {
            crate::yield_every(n).await;
            if entry.lifecycle().state != SandboxState::Running {
                continue;
            }
            self.ingest_reports(entry);
        }
    }

    /// Reads what is left in a sandbox's feeds before it goes away (its run directory and
    /// cgroups are removed with it).
    pub(crate) async fn drain_feeds(&self, entry: &Entry) {
        self.ingest_reports(entry);
        self.ingest_counters(entry).await;
    }

    /// The position of feed `key`: cached, else from the store.
    fn position(&self, key: &str) -> Option<u64> {
        if let Some(p) = lock(&self.feeds.positions).get(key) {
            return Some(*p);
        }
        match self.registry().with_conn(|c| store::feed_position(c, key)) {
            Ok(p) => {
                lock(&self.feeds.positions).insert(key.to_owned(), p);
                Some(p)
            }
            Err(e) => {
                tracing::warn!(feed = key, error = %e, "reading a feed position failed");
                None
            }
        }
    }

    /// Records `events` and moves feed `key` to `position`, in one transaction; whether it
    /// did.
    fn advance(&self, key: &str, position: u64, events: &[Event]) -> bool {
        match self
            .registry()
            .with_conn(|c| store::record_feed(c, key, position, events))
        {
            Ok(()) => {
                lock(&self.feeds.positions).insert(key.to_owned(), position);
                if !events.is_empty() {
                    self.wake_dispatcher();
                }
                true
            }
            // Nothing moved: the same lines are read again on the next pass.
            Err(e) => {
                tracing::warn!(feed = key, error = %e, "recording feed events failed");
                false
            }
        }
    }

    fn ingest_reports(&self, entry: &Entry) {
        let path = self.runtime.report_file(&entry.id);
        // A cheap check first: most passes find nothing new.
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            return;
        };
        let key = agent_key(&entry.id);
        let Some(from) = self.position(&key) else {
            return;
        };
        if !meta.file_type().is_file() || meta.len() == from {
            return;
        }
        // Shorter than what was read: emptied by a compaction whose new position was not
        // stored (the gateway stopped in between). Everything in it now is new.
        let from = if meta.len() < from { 0 } else { from };
        let record = entry.record();
        let chunk = match report::read_from(&path, from) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(sandbox = %record.id, error = %e, "reading the agent's reports failed");
                return;
            }
        };
        let ctx = context(&record);
        // The agent's clock is the host's (a sandbox shares the kernel), but a report
        // claiming the future is clamped to now.
        let at = |at_ms: u64| Millis(at_ms.min(now().0));
        let mut events = Vec::new();
        for line in chunk.lines {
            match serde_json::from_slice::<Report>(&line) {
                Ok(Report::TaskTimeout {
                    at_ms,
                    command,
                    limit_ms,
                    cpu_ms,
                    ending,
                }) => events.push(Event::task_timeout(
                    &ctx,
                    &TaskTimeout {
                        end: task_end(command, ending),
                        limit: Duration::from_millis(limit_ms),
                        cpu_consumed: Duration::from_millis(cpu_ms),
                    },
                    at(at_ms),
                )),
                Ok(Report::TaskCompleted {
                    at_ms,
                    command,
                    tag,
                    timed_out,
                    ending,
                }) => events.push(Event::task_completed(
                    &ctx,
                    &TaskCompleted {
                        end: task_end(command, ending),
                        tag,
                        timed_out,
                    },
                    at(at_ms),
                )),
                Ok(other) => {
                    tracing::warn!(sandbox = %record.id, report = ?other, "unknown agent report skipped");
                }
                Err(e) => {
                    tracing::warn!(sandbox = %record.id, error = %e, "malformed agent report skipped");
                }
            }
        }
        // Emptied only once its lines are recorded, and only if nothing was appended since
        // the read; then read from the start.
        if self.advance(&key, chunk.end, &events) && chunk.end >= COMPACT_AT {
            match report::compact(&path, chunk.end) {
                Ok(true) => {
                    self.advance(&key, 0, &[]);
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(sandbox = %record.id, error = %e, "emptying the agent's reports failed");
                }
            }
        }
    }

    async fn ingest_counters(&self, entry: &Entry) {
        // A sandbox being killed or paused meanwhile has no reading: the next pass sees it.
        if let Ok(usage) = self.runtime.enforcement(&entry.id).await {
            self.ingest_counters_from(entry, &usage);
        }
    }

    /// Turns the enforcement counters of `usage`, a reading of `entry`'s cgroups, into
    /// events where they moved.
    pub(crate) fn ingest_counters_from(&self, entry: &Entry, usage: &ResourceUsage) {
        // Most passes find both counters where they were: no event to build.
        let moved: Vec<(Limit, String, u64, u64)> = [
            (Limit::Tasks, pids_key(&entry.id), usage.tasks_refused),
            (Limit::Memory, oom_key(&entry.id), usage.oom_kills),
        ]
        .into_iter()
        .filter_map(|(limit, key, value)| {
            let seen = self.position(&key)?;
            (value != seen).then_some((limit, key, value, seen))
        })
        .collect();
        if moved.is_empty() {
            return;
        }
        let record = entry.record();
        let ctx = context(&record);
        let at = now();
        for (limit, key, value, seen) in moved {
            // A counter only grows while its cgroup lives; a lower value is a new cgroup.
            let events = if value > seen {
                let violation = match limit {
                    Limit::Tasks => SecurityViolation {
                        violation_type: "process_limit".into(),
                        attempted_command: String::new(),
                        blocked: Blocked::Syscall("fork".into()),
                        action: "blocked".into(),
                        occurrences: Some(value - seen),
                    },
                    Limit::Memory => SecurityViolation {
                        violation_type: "memory_limit".into(),
                        attempted_command: String::new(),
                        blocked: Blocked::Limit(
                            record
                                .limits
                                .memory_bytes
                                .map_or_else(|| "memory".into(), |b| format!("memory {b} bytes")),
                        ),
                        action: "killed".into(),
                        occurrences: Some(value - seen),
                    },
                };
                vec![Event::security_violation(&ctx, &violation, at)]
            } else {
                Vec::new()
            };
            self.advance(&key, value, &events);
        }
    }

    /// Forgets the feeds of a removed sandbox.
    pub(crate) fn forget_feeds(&self, id: &SandboxId) {
        let keys = [agent_key(id), pids_key(id), oom_key(id)];
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        if let Err(e) = self.registry().with_conn(|c| store::forget_feeds(c, &refs)) {
            tracing::warn!(sandbox = %id, error = %e, "forgetting feeds failed");
        }
        let mut positions = lock(&self.feeds.positions);
        for k in &keys {
            positions.remove(k);
        }
    }
}
