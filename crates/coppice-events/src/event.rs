//! The event record: E2B's JSON shape, the types Coppice emits, and the Sandforge rendering.
//!
//! An [`Event`] serializes to exactly the object E2B's events API returns and its webhooks
//! POST (`version`, `id`, `type`, `eventData`, `sandboxBuildId`, `sandboxExecutionId`,
//! `sandboxId`, `sandboxTeamId`, `sandboxTemplateId`, `timestamp`). Build one with
//! [`Event::lifecycle`] from the [`LifecycleEvent`] a transition returned, or with
//! [`Event::snapshotted`], [`Event::task_completed`], [`Event::task_timeout`] and
//! [`Event::security_violation`] for the
//! kinds the state machine does not produce. Each constructor mints a fresh v4 id; that id is
//! the event's identity for ever after (retries and replays reuse it).
//!
//! Coppice has no build service, no executions table and one team per gateway, so the three
//! ids E2B takes from its control plane have local meanings, documented on
//! [`SandboxContext`].

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use coppice_lifecycle::state::{Cause, LifecycleEvent, Millis, Update};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{json, Map, Value};
use uuid::Uuid;

/// The `version` every event carries. E2B's events API reports `v1`; we keep one version for
/// the read API and webhooks so a stored body is delivered byte for byte.
pub const EVENT_VERSION: &str = "v1";

/// `sandboxTeamId` for a gateway that has a single team (Coppice today): the nil UUID.
pub const LOCAL_TEAM_ID: &str = "00000000-0000-0000-0000-000000000000";

/// What happened. The string forms are the `type` field and the webhook subscription names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum EventType {
    /// `sandbox.lifecycle.created`: a sandbox (or a fork of a snapshot) started running.
    Created,
    /// `sandbox.lifecycle.paused`: paused by hand or by its timeout.
    Paused,
    /// `sandbox.lifecycle.resumed`: resumed by hand, by `connect` or by traffic.
    Resumed,
    /// `sandbox.lifecycle.updated`: its timeout, limits or network policy changed.
    Updated,
    /// `sandbox.lifecycle.snapshotted`: a snapshot of it was taken.
    Snapshotted,
    /// `sandbox.lifecycle.killed`: gone for good (kill, reaper, any teardown).
    Killed,
    /// `task.timeout` (Sandforge): a command was killed for exceeding its time limit.
    TaskTimeout,
    /// `security.violation` (Sandforge): the sandbox tried something its policy blocks.
    SecurityViolation,
    /// `task.completed`: a command started through envd ended, however it ended.
    TaskCompleted,
}

impl EventType {
    /// Every type, in declaration order.
    pub const ALL: [EventType; 9] = [
        EventType::Created,
        EventType::Paused,
        EventType::Resumed,
        EventType::Updated,
        EventType::Snapshotted,
        EventType::Killed,
        EventType::TaskTimeout,
        EventType::SecurityViolation,
        EventType::TaskCompleted,
    ];

    /// The dotted name, as in the `type` field.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Created => "sandbox.lifecycle.created",
            EventType::Paused => "sandbox.lifecycle.paused",
            EventType::Resumed => "sandbox.lifecycle.resumed",
            EventType::Updated => "sandbox.lifecycle.updated",
            EventType::Snapshotted => "sandbox.lifecycle.snapshotted",
            EventType::Killed => "sandbox.lifecycle.killed",
            EventType::TaskTimeout => "task.timeout",
            EventType::SecurityViolation => "security.violation",
            EventType::TaskCompleted => "task.completed",
        }
    }

    /// The name in a Sandforge payload's `event` field: Sandforge's own name where it has
    /// one (`sandbox.created`, `sandbox.destroyed`), else ours.
    pub fn sandforge_name(self) -> &'static str {
        match self {
            EventType::Created => "sandbox.created",
            EventType::Killed => "sandbox.destroyed",
            other => other.as_str(),
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no [`EventType`]; the gateway answers 400 with this message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown event type {0:?}")]
pub struct UnknownEventType(pub String);

impl FromStr for EventType {
    type Err = UnknownEventType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| UnknownEventType(s.to_owned()))
    }
}

impl Serialize for EventType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for EventType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What the gateway knows about the sandbox an event is about.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SandboxContext {
    /// `sandboxId`: the E2B sandbox id.
    pub sandbox_id: String,
    /// `sandboxTemplateId`: the template as the client named it (`base`).
    pub template_id: String,
    /// `sandboxBuildId`: E2B's template build UUID. Locally, the read-only layer the sandbox's
    /// writable layer was cloned from (the template layer, or the snapshot for a fork).
    pub build_id: String,
    /// `sandboxExecutionId`: E2B's id for one continuous run. Locally, a UUID the gateway
    /// mints when the sandbox starts running and again on every resume.
    pub execution_id: String,
    /// `sandboxTeamId`: the owning team; [`LOCAL_TEAM_ID`] on a single-team gateway.
    pub team_id: String,
    /// User metadata, sent as `eventData.sandbox_metadata`.
    pub metadata: BTreeMap<String, String>,
    /// The current run, sent as `eventData.execution` on `paused` and `killed`.
    pub execution: Option<Execution>,
}

/// One run of a sandbox, as E2B reports it when the run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Execution {
    /// When this run started.
    pub started_at: Millis,
    /// vCPUs it had.
    pub vcpu_count: u32,
    /// Memory it had, in MiB.
    pub memory_mb: u64,
}

/// How a command ended, as `task.completed` and `task.timeout` both report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskEnd {
    /// The command line as it was started.
    pub command: String,
    /// Its process id in the sandbox.
    pub pid: u32,
    /// Its exit status, or -1 when a signal ended it (envd's `exitCode`).
    pub exit_code: i32,
    /// The signal that ended it, if one did: it was killed.
    pub signal: Option<i32>,
    /// From its start to its exit.
    pub duration: Duration,
}

/// A command that ended (`task.completed`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskCompleted {
    /// How it ended.
    pub end: TaskEnd,
    /// The tag it was started with, if any.
    pub tag: Option<String>,
    /// Whether it was killed because its time limit ran out.
    pub timed_out: bool,
}

/// A command killed for running past its limit (`task.timeout`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskTimeout {
    /// How it ended.
    pub end: TaskEnd,
    /// The limit it exceeded.
    pub limit: Duration,
    /// CPU time (user + system) it had consumed when killed.
    pub cpu_consumed: Duration,
}

/// What a blocked action tried to reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blocked {
    /// A filesystem path (`blocked_path`).
    Path(String),
    /// A system call by name (`blocked_syscall`).
    Syscall(String),
    /// A network destination, `host:port` (`blocked_destination`).
    Destination(String),
    /// A resource limit, e.g. `memory 1073741824 bytes` (`blocked_limit`).
    Limit(String),
}

/// A policy violation the sandbox attempted (`security.violation`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecurityViolation {
    /// The class, e.g. `filesystem_escape`, `forbidden_syscall`, `network_denied`.
    pub violation_type: String,
    /// The command that attempted it, if known.
    pub attempted_command: String,
    /// What it tried to reach.
    pub blocked: Blocked,
    /// What enforcement did, e.g. `blocked`, `killed`, `terminated_command`.
    pub action: String,
    /// How many times it happened since the last report, when enforcement counts rather
    /// than reports each one (`occurrences`; cgroup limits).
    pub occurrences: Option<u64>,
}

/// One event, in E2B's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// Always [`EVENT_VERSION`] for events made here.
    pub version: String,
    /// Unique and stable across retries and replays.
    pub id: Uuid,
    /// What happened.
    #[serde(rename = "type")]
    pub event_type: EventType,
    /// Type-specific details (an object), or null.
    pub event_data: Option<Value>,
    /// See [`SandboxContext::build_id`].
    pub sandbox_build_id: String,
    /// See [`SandboxContext::execution_id`].
    pub sandbox_execution_id: String,
    /// See [`SandboxContext::sandbox_id`].
    pub sandbox_id: String,
    /// See [`SandboxContext::team_id`].
    pub sandbox_team_id: String,
    /// See [`SandboxContext::template_id`].
    pub sandbox_template_id: String,
    /// When it happened; RFC 3339 on the wire.
    #[serde(with = "rfc3339")]
    pub timestamp: Millis,
}

impl Event {
    fn new(
        ctx: &SandboxContext,
        event_type: EventType,
        data: Map<String, Value>,
        at: Millis,
    ) -> Self {
        Event {
            version: EVENT_VERSION.to_owned(),
            id: Uuid::new_v4(),
            event_type,
            event_data: Some(Value::Object(data)),
            sandbox_build_id: ctx.build_id.clone(),
            sandbox_execution_id: ctx.execution_id.clone(),
            sandbox_id: ctx.sandbox_id.clone(),
            sandbox_team_id: ctx.team_id.clone(),
            sandbox_template_id: ctx.template_id.clone(),
            timestamp: at,
        }
    }

    /// The event for a transition of the lifecycle state machine, happening at `at`.
    ///
    /// `eventData` holds `sandbox_metadata`; `cause` (`manual`, `timeout`, `connect`,
    /// `auto_resume`, `failure`) on paused, resumed and killed; `execution` on paused and
    /// killed when the context has one; `set_timeout` (the new end, RFC 3339) and `update`
    /// (`timeout` or `refresh`) on updated.
    pub fn lifecycle(ctx: &SandboxContext, event: &LifecycleEvent, at: Millis) -> Self {
        let mut data = base_data(ctx);
        let event_type = match *event {
            LifecycleEvent::Created => EventType::Created,
            LifecycleEvent::Paused { cause } => {
                data.insert("cause".into(), cause_name(cause).into());
                insert_execution(&mut data, ctx, at);
                EventType::Paused
            }
            LifecycleEvent::Resumed { cause } => {
                data.insert("cause".into(), cause_name(cause).into());
                EventType::Resumed
            }
            LifecycleEvent::Updated { update, end_at } => {
                let update = match update {
                    Update::Timeout => "timeout",
                    Update::Refresh => "refresh",
                    Update::Activity => "activity",
                };
                data.insert("update".into(), update.into());
                data.insert(
                    "set_timeout".into(),
                    coppice_wire::timestamp::format_millis(end_at.0).into(),
                );
                EventType::Updated
            }
            LifecycleEvent::Killed { cause } => {
                data.insert("cause".into(), cause_name(cause).into());
                insert_execution(&mut data, ctx, at);
                EventType::Killed
            }
        };
        Event::new(ctx, event_type, data, at)
    }

    /// `sandbox.lifecycle.updated` for a change the state machine does not model (limits,
    /// network policy); `what` names it in `eventData.update`.
    pub fn updated(ctx: &SandboxContext, what: &str, at: Millis) -> Self {
        let mut data = base_data(ctx);
        data.insert("update".into(), what.into());
        Event::new(ctx, EventType::Updated, data, at)
    }

    /// `sandbox.lifecycle.snapshotted`: snapshot `snapshot_id` of the sandbox was taken.
    pub fn snapshotted(ctx: &SandboxContext, snapshot_id: &str, at: Millis) -> Self {
        let mut data = base_data(ctx);
        data.insert("snapshot_id".into(), snapshot_id.into());
        Event::new(ctx, EventType::Snapshotted, data, at)
    }

    /// `task.completed`: [`TaskEnd`]'s fields, plus `tag` (when the command had one) and
    /// `timed_out`.
    pub fn task_completed(ctx: &SandboxContext, t: &TaskCompleted, at: Millis) -> Self {
        let mut data = base_data(ctx);
        insert_end(&mut data, &t.end);
        if let Some(tag) = &t.tag {
            data.insert("tag".into(), tag.clone().into());
        }
        data.insert("timed_out".into(), t.timed_out.into());
        Event::new(ctx, EventType::TaskCompleted, data, at)
    }

    /// `task.timeout`, with Sandforge's fields `command`, `limit_seconds`, `cpu_consumed`
    /// (seconds), and [`TaskEnd`]'s fields as `task.completed` has them.
    pub fn task_timeout(ctx: &SandboxContext, t: &TaskTimeout, at: Millis) -> Self {
        let mut data = base_data(ctx);
        insert_end(&mut data, &t.end);
        data.insert("limit_seconds".into(), seconds(t.limit));
        data.insert("cpu_consumed".into(), seconds(t.cpu_consumed));
        Event::new(ctx, EventType::TaskTimeout, data, at)
    }

    /// `security.violation`, with Sandforge's fields `violation_type`, `attempted_command`,
    /// `blocked_path` (or `blocked_syscall`, `blocked_destination`) and `action`.
    pub fn security_violation(ctx: &SandboxContext, v: &SecurityViolation, at: Millis) -> Self {
        let mut data = base_data(ctx);
        data.insert("violation_type".into(), v.violation_type.clone().into());
        data.insert(
            "attempted_command".into(),
            v.attempted_command.clone().into(),
        );
        let (key, what) = match &v.blocked {
            Blocked::Path(p) => ("blocked_path", p),
            Blocked::Syscall(s) => ("blocked_syscall", s),
            Blocked::Destination(d) => ("blocked_destination", d),
            Blocked::Limit(l) => ("blocked_limit", l),
        };
        data.insert(key.into(), what.clone().into());
        data.insert("action".into(), v.action.clone().into());
        if let Some(n) = v.occurrences {
            data.insert("occurrences".into(), n.into());
        }
        Event::new(ctx, EventType::SecurityViolation, data, at)
    }

    /// The E2B body: this event as JSON, the bytes that are stored, signed and POSTed.
    pub fn to_json(&self) -> String {
        // Serializing plain strings, numbers and a `Value` cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The Sandforge body: `{"event", "id", "timestamp", "data"}`, where `data` is
    /// `eventData` plus `sandbox_id`.
    pub fn to_sandforge_json(&self) -> String {
        let mut data = match &self.event_data {
            Some(Value::Object(m)) => m.clone(),
            _ => Map::new(),
        };
        data.insert("sandbox_id".into(), self.sandbox_id.clone().into());
        json!({
            "event": self.event_type.sandforge_name(),
            "id": self.id,
            "timestamp": coppice_wire::timestamp::format_millis(self.timestamp.0),
            "data": data,
        })
        .to_string()
    }
}

fn base_data(ctx: &SandboxContext) -> Map<String, Value> {
    let meta: Map<String, Value> = ctx
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let mut data = Map::new();
    data.insert("sandbox_metadata".into(), Value::Object(meta));
    data
}

/// `command`, `pid`, `exit_code`, `killed` (a signal ended it), `signal` (its number, or null)
/// and `duration_seconds`.
fn insert_end(data: &mut Map<String, Value>, end: &TaskEnd) {
    data.insert("command".into(), end.command.clone().into());
    data.insert("pid".into(), end.pid.into());
    data.insert("exit_code".into(), end.exit_code.into());
    data.insert("killed".into(), end.signal.is_some().into());
    data.insert("signal".into(), end.signal.map_or(Value::Null, Value::from));
    data.insert("duration_seconds".into(), seconds(end.duration));
}

fn insert_execution(data: &mut Map<String, Value>, ctx: &SandboxContext, at: Millis) {
    if let Some(e) = ctx.execution {
        let run = at.since(e.started_at);
        data.insert(
            "execution".into(),
            json!({
                "started_at": coppice_wire::timestamp::format_millis(e.started_at.0),
                "vcpu_count": e.vcpu_count,
                "memory_mb": e.memory_mb,
                // Milliseconds, as the merged revision of E2B's docs says.
                "execution_time": u64::try_from(run.as_millis()).unwrap_or(u64::MAX),
            }),
        );
    }
}

fn cause_name(cause: Cause) -> &'static str {
    match cause {
        Cause::Manual => "manual",
        Cause::Timeout => "timeout",
        Cause::Connect => "connect",
        Cause::AutoResume => "auto_resume",
        Cause::Failure => "failure",
    }
}

/// Whole seconds as an integer (Sandforge's `"limit_seconds": 60`), otherwise a float.
fn seconds(d: Duration) -> Value {
    if d.subsec_nanos() == 0 {
        d.as_secs().into()
    } else {
        d.as_secs_f64().into()
    }
}

mod rfc3339 {
    use coppice_lifecycle::state::Millis;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(t: &Millis, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&coppice_wire::timestamp::format_millis(t.0))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Millis, D::Error> {
        let s = String::deserialize(d)?;
        coppice_wire::timestamp::parse_millis(&s)
            .map(Millis)
            .ok_or_else(|| serde::de::Error::custom(format!("not an RFC 3339 time: {s:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> SandboxContext {
        SandboxContext {
            sandbox_id: "sbx1".into(),
            template_id: "base".into(),
            build_id: "base".into(),
            execution_id: "0f8e1c2a-0000-4000-8000-000000000001".into(),
            team_id: LOCAL_TEAM_ID.into(),
            metadata: [("owner".to_owned(), "ci".to_owned())].into(),
            execution: Some(Execution {
                started_at: Millis(1_767_225_600_000),
                vcpu_count: 2,
                memory_mb: 512,
            }),
        }
    }

    #[test]
    fn lifecycle_event_has_exactly_e2b_fields() {
        let e = Event::lifecycle(
            &ctx(),
            &LifecycleEvent::Killed {
                cause: Cause::Timeout,
            },
            Millis(1_767_225_601_500),
        );
        let v: Value = serde_json::from_str(&e.to_json()).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "eventData",
                "id",
                "sandboxBuildId",
                "sandboxExecutionId",
                "sandboxId",
                "sandboxTeamId",
                "sandboxTemplateId",
                "timestamp",
                "type",
                "version"
            ]
        );
        assert_eq!(v["type"], "sandbox.lifecycle.killed");
        assert_eq!(v["version"], "v1");
        assert_eq!(v["timestamp"], "2026-01-01T00:00:01.5Z");
        assert_eq!(v["sandboxTeamId"], LOCAL_TEAM_ID);
        assert_eq!(v["eventData"]["cause"], "timeout");
        assert_eq!(v["eventData"]["sandbox_metadata"]["owner"], "ci");
        assert_eq!(v["eventData"]["execution"]["execution_time"], 1500);
        assert_eq!(v["eventData"]["execution"]["vcpu_count"], 2);
        assert_eq!(Uuid::parse_str(v["id"].as_str().unwrap()).unwrap(), e.id);
        // The record reads back to the same value.
        let back: Event = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn every_transition_maps_to_its_type() {
        let at = Millis(1_000);
        let cases = [
            (LifecycleEvent::Created, EventType::Created),
            (
                LifecycleEvent::Paused {
                    cause: Cause::Manual,
                },
                EventType::Paused,
            ),
            (
                LifecycleEvent::Resumed {
                    cause: Cause::AutoResume,
                },
                EventType::Resumed,
            ),
            (
                LifecycleEvent::Updated {
                    update: Update::Timeout,
                    end_at: Millis(61_000),
                },
                EventType::Updated,
            ),
            (
                LifecycleEvent::Killed {
                    cause: Cause::Failure,
                },
                EventType::Killed,
            ),
        ];
        for (le, ty) in cases {
            let e = Event::lifecycle(&ctx(), &le, at);
            assert_eq!(e.event_type, ty);
            // The state machine and this crate agree on the dotted names.
            assert_eq!(e.event_type.as_str(), le.event_type());
        }
        let upd = Event::lifecycle(&ctx(), &cases[3].0, at);
        let data = upd.event_data.unwrap();
        assert_eq!(data["set_timeout"], "1970-01-01T00:01:01Z");
        assert_eq!(data["update"], "timeout");
        let resumed = Event::lifecycle(&ctx(), &cases[2].0, at)
            .event_data
            .unwrap();
        assert_eq!(resumed["cause"], "auto_resume");
        assert!(resumed.get("execution").is_none());
        let created = Event::lifecycle(&ctx(), &cases[0].0, at);
        assert_ne!(created.id, Event::lifecycle(&ctx(), &cases[0].0, at).id);
    }

    #[test]
    fn event_types_round_trip_and_reject_unknown_names() {
        for t in EventType::ALL {
            assert_eq!(t.as_str().parse::<EventType>(), Ok(t));
            let json = serde_json::to_string(&t).unwrap();
            assert_eq!(serde_json::from_str::<EventType>(&json).unwrap(), t);
        }
        assert_eq!(
            "sandbox.lifecycle.exploded".parse::<EventType>(),
            Err(UnknownEventType("sandbox.lifecycle.exploded".into()))
        );
        let err = serde_json::from_str::<EventType>("\"nope\"").unwrap_err();
        assert!(err.to_string().contains("unknown event type"), "{err}");
    }

    #[test]
    fn sandforge_kinds_carry_sandforge_fields() {
        let end = TaskEnd {
            command: "npm install".into(),
            pid: 41,
            exit_code: -1,
            signal: Some(9),
            duration: Duration::from_millis(60_004),
        };
        let t = Event::task_timeout(
            &ctx(),
            &TaskTimeout {
                end: end.clone(),
                limit: Duration::from_secs(60),
                cpu_consumed: Duration::from_millis(12_400),
            },
            Millis(0),
        );
        let body: Value = serde_json::from_str(&t.to_sandforge_json()).unwrap();
        assert_eq!(body["event"], "task.timeout");
        assert_eq!(body["id"], t.id.to_string());
        assert_eq!(body["timestamp"], "1970-01-01T00:00:00Z");
        assert_eq!(body["data"]["sandbox_id"], "sbx1");
        assert_eq!(body["data"]["command"], "npm install");
        assert_eq!(body["data"]["limit_seconds"], 60);
        assert_eq!(body["data"]["cpu_consumed"], 12.4);
        // The same account of the ending as `task.completed` gives.
        assert_eq!(body["data"]["pid"], 41);
        assert_eq!(body["data"]["exit_code"], -1);
        assert_eq!(body["data"]["killed"], true);
        assert_eq!(body["data"]["signal"], 9);
        assert_eq!(body["data"]["duration_seconds"], 60.004);

        let done = Event::task_completed(
            &ctx(),
            &TaskCompleted {
                end: TaskEnd {
                    command: "/bin/bash -l -c npm install".into(),
                    pid: 7,
                    exit_code: 0,
                    signal: None,
                    duration: Duration::from_secs(42),
                },
                tag: Some("install".into()),
                timed_out: false,
            },
            Millis(0),
        );
        assert_eq!(done.event_type.as_str(), "task.completed");
        let body: Value = serde_json::from_str(&done.to_json()).unwrap();
        let data = &body["eventData"];
        assert_eq!(data["command"], "/bin/bash -l -c npm install");
        assert_eq!(data["pid"], 7);
        assert_eq!(data["exit_code"], 0);
        assert_eq!(data["killed"], false);
        assert_eq!(data["signal"], Value::Null);
        assert_eq!(data["duration_seconds"], 42);
        assert_eq!(data["tag"], "install");
        assert_eq!(data["timed_out"], false);
        assert_eq!(data["sandbox_metadata"]["owner"], "ci");
        let timed_out = Event::task_completed(
            &ctx(),
            &TaskCompleted {
                end,
                tag: None,
                timed_out: true,
            },
            Millis(0),
        );
        let data = timed_out.event_data.unwrap();
        assert!(data.get("tag").is_none());
        assert_eq!(
            (&data["timed_out"], &data["killed"]),
            (&Value::Bool(true), &Value::Bool(true))
        );

        let v = Event::security_violation(
            &ctx(),
            &SecurityViolation {
                violation_type: "forbidden_syscall".into(),
                attempted_command: "mount /dev/sda1 /mnt".into(),
                blocked: Blocked::Syscall("mount".into()),
                action: "blocked".into(),
                occurrences: None,
            },
            Millis(0),
        );
        assert_eq!(v.event_type.as_str(), "security.violation");
        let data = v.event_data.clone().unwrap();
        assert_eq!(data["blocked_syscall"], "mount");
        assert!(data.get("blocked_path").is_none());
        assert_eq!(data["attempted_command"], "mount /dev/sda1 /mnt");
        assert_eq!(data["violation_type"], "forbidden_syscall");
        assert_eq!(data["action"], "blocked");
        assert!(data.get("occurrences").is_none());
        let oom = Event::security_violation(
            &ctx(),
            &SecurityViolation {
                violation_type: "memory_limit".into(),
                attempted_command: String::new(),
                blocked: Blocked::Limit("memory 1073741824 bytes".into()),
                action: "killed".into(),
                occurrences: Some(2),
            },
            Millis(0),
        );
        let data = oom.event_data.unwrap();
        assert_eq!(data["blocked_limit"], "memory 1073741824 bytes");
        assert_eq!(data["occurrences"], 2);

        let killed = Event::lifecycle(
            &ctx(),
            &LifecycleEvent::Killed {
                cause: Cause::Manual,
            },
            Millis(0),
        );
        let body: Value = serde_json::from_str(&killed.to_sandforge_json()).unwrap();
        assert_eq!(body["event"], "sandbox.destroyed");
        let snap = Event::snapshotted(&ctx(), "snap1", Millis(0));
        assert_eq!(snap.event_data.unwrap()["snapshot_id"], "snap1");
        assert_eq!(
            snap.event_type.sandforge_name(),
            "sandbox.lifecycle.snapshotted"
        );
    }
}
