//! `/sandboxes` and `/v2/sandboxes`: create, list, get, kill, pause, resume, connect,
//! timeout, refreshes (metrics and logs are in `api/metrics.rs` and `api/logs.rs`).

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use coppice_lifecycle::backend::{Limits, SandboxId};
use coppice_lifecycle::state::{
    Cause, Command, Lifecycle, Millis, OnTimeout, Policy, SandboxState,
};
use coppice_wire::query::{ListQuery, StateFilter};
use coppice_wire::sandbox::{
    ConnectRequest, LifecycleBlock, NewSandbox, OnTimeoutWire, PauseRequest, RefreshRequest,
    ResumeRequest, Sandbox, SandboxDetail, TimeoutRequest,
};
use coppice_wire::timestamp::format_millis;
use http::{HeaderValue, Response, StatusCode};
use serde::de::DeserializeOwned;

use crate::api::error::ApiError;
use crate::api::{empty, json, network, ports, Body};
use crate::registry::Record;
use crate::runtime::{Runtime, Setup};
use crate::{now, Entry, Gateway};

/// The envd version Coppice's agent implements (E2B's, whose features the SDK gates on).
pub(crate) const ENVD_VERSION: &str = "0.6.13";
/// Longest window a sandbox may ask for.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Longest refresh E2B allows.
const MAX_REFRESH: Duration = Duration::from_secs(3600);
/// Nominal disk size reported to clients; storage sets no quota yet.
pub(crate) const DISK_SIZE_MB: u64 = 10 * 1024;
/// Largest metadata or env map a create may carry, in total bytes.
const MAX_MAP_BYTES: usize = 64 * 1024;

type Result<T> = std::result::Result<T, ApiError>;

/// Parses a JSON body; an empty body is the type's default.
pub(crate) fn parse_or_default<T: DeserializeOwned + Default>(body: &Bytes) -> Result<T> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    parse(body)
}

/// Parses a JSON body, mapping serde's complaint to a 400. The body must be an object:
/// serde would otherwise read a struct from an array by position, so `[]` would be a valid
/// (empty) create.
pub(crate) fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T> {
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::bad_request(
            "invalid request body: expected a JSON object",
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

pub(crate) fn seconds(field: &str, value: i64, max: Duration) -> Result<Duration> {
    let secs = u64::try_from(value)
        .map_err(|_| ApiError::bad_request(format!("{field} must not be negative, got {value}")))?;
    let d = Duration::from_secs(secs);
    if d > max {
        return Err(ApiError::bad_request(format!(
            "{field} must be at most {} seconds, got {value}",
            max.as_secs()
        )));
    }
    Ok(d)
}

fn check_map(field: &str, map: &BTreeMap<String, String>, env: bool) -> Result<()> {
    let size: usize = map.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > MAX_MAP_BYTES {
        return Err(ApiError::bad_request(format!(
            "{field} is {size} bytes; at most {MAX_MAP_BYTES} are allowed"
        )));
    }
    for key in map.keys() {
        let bad = key.is_empty() || (env && (key.contains('=') || key.contains('\0')));
        if bad {
            return Err(ApiError::bad_request(format!(
                "{field} has an invalid key {key:?}"
            )));
        }
    }
    Ok(())
}

/// Random `[a-z0-9]` of `len` characters, from the system's CSPRNG.
fn random_token(len: usize) -> Result<String> {
    crate::runtime::random_token(len)
        .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "no randomness available"))
}

/// The `Sandbox` body of `record`.
pub(crate) fn sandbox_body(gw: &Gateway, record: &Record) -> Sandbox {
    Sandbox {
        template_id: record.template.clone(),
        sandbox_id: record.id.to_string(),
        client_id: "coppice".into(),
        envd_version: ENVD_VERSION.into(),
        envd_access_token: Some(record.access_token.clone()),
        traffic_access_token: record.traffic_token.clone(),
        domain: Some(ports::advertised_domain(gw)),
        alias: Some(record.template.clone()),
    }
}

/// The CPUs `limits` give, as E2B counts them (whole vCPUs, at least one).
pub(crate) fn cpu_count(limits: &Limits) -> u32 {
    limits.cpu_millis.map_or(1, |m| m.div_ceil(1000))
}

/// The memory `limits` give, in MiB (0 for no limit).
pub(crate) fn memory_mb(limits: &Limits) -> u64 {
    limits.memory_bytes.map_or(0, |b| b >> 20)
}

fn detail(gw: &Gateway, record: &Record) -> SandboxDetail {
    let l = &record.lifecycle;
    let limits = record.limits;
    SandboxDetail {
        template_id: record.template.clone(),
        sandbox_id: record.id.to_string(),
        client_id: "coppice".into(),
        alias: Some(record.template.clone()),
        started_at: format_millis(l.started_at.0),
        end_at: format_millis(match (l.state, l.remaining) {
            // A paused sandbox's window is stopped: report where it would end if resumed now.
            (SandboxState::Paused, Some(left)) => now().plus(left).0,
            _ => l.end_at.0,
        }),
        envd_version: ENVD_VERSION.into(),
        envd_access_token: Some(record.access_token.clone()),
        cpu_count: cpu_count(&limits),
        memory_mb: memory_mb(&limits),
        disk_size_mb: DISK_SIZE_MB,
        state: match l.state {
            SandboxState::Paused => "paused",
            _ => "running",
        }
        .into(),
        metadata: record.metadata.clone(),
        allow_internet_access: record.allow_internet,
        domain: Some(ports::advertised_domain(gw)),
        network: record.network.clone(),
        lifecycle: LifecycleBlock {
            auto_resume: l.policy.auto_resume,
            on_timeout: match l.policy.on_timeout {
                OnTimeout::Kill => OnTimeoutWire::Kill,
                OnTimeout::Pause => OnTimeoutWire::Pause,
            },
            timeout_ms: u64::try_from(l.timeout.as_millis()).unwrap_or(u64::MAX),
        },
        pause_mode: (l.state == SandboxState::Paused).then(|| {
            if record.paused_cold {
                "filesystem"
            } else {
                "full"
            }
            .to_owned()
        }),
    }
}

/// A sandbox to start: what a create asks for, or what a fork copies from its source.
#[derive(Debug)]
pub(crate) struct Plan {
    /// The template as it was asked for, for messages.
    pub(crate) asked: String,
    /// The template id its record carries.
    pub(crate) template: String,
    /// The built template (or snapshot) build it starts from; `None` for a built-in one.
    pub(crate) built: Option<crate::builds::Resolved>,
    /// A layer it starts from instead of its template's (a fork's capture of its source).
    pub(crate) layer: Option<coppice_lifecycle::backend::LayerId>,
    /// Its window.
    pub(crate) timeout: Duration,
    /// What happens at the end of the window.
    pub(crate) policy: Policy,
    /// User metadata.
    pub(crate) metadata: BTreeMap<String, String>,
    /// Sandbox-wide environment variables.
    pub(crate) env_vars: BTreeMap<String, String>,
    /// Its network, checked.
    pub(crate) net: network::Requested,
    /// `allow_internet_access` as asked.
    pub(crate) allow_internet: Option<bool>,
    /// Its resource limits.
    pub(crate) limits: Limits,
    /// The user its processes run as unless they say otherwise.
    pub(crate) default_user: String,
    /// Their working directory unless they say otherwise.
    pub(crate) default_workdir: String,
    /// The `sandboxBuildId` of its events, when not its template's.
    pub(crate) build_id: Option<String>,
    /// The sandbox it was forked from (`eventData.forkedFrom` of its `created`).
    pub(crate) forked_from: Option<SandboxId>,
    /// Its window's end pauses it filesystem-only (`autoPauseMemory: false`).
    pub(crate) auto_pause_cold: bool,
}

/// `POST /sandboxes` (`legacy`) and `POST /v2/sandboxes`.
pub(crate) async fn create(gw: &Gateway, body: &Bytes, legacy: bool) -> Result<Response<Body>> {
    let plan = plan_create(gw, body, legacy)?;
    let record = start(gw, plan).await?;
    Ok(json(StatusCode::CREATED, &sandbox_body(gw, &record)))
}

/// Reads and checks a create's body.
fn plan_create(gw: &Gateway, body: &Bytes, legacy: bool) -> Result<Plan> {
    let req: NewSandbox = parse_or_default(body)?;
    let asked = req.template_id.clone().unwrap_or_else(|| "base".into());
    // A built-in template by name, else a built one (or a snapshot) by name, `name:tag` or
    // id, with or without this gateway's namespace; a built template's sandboxes are
    // recorded under its id.
    let built = if Runtime::knows_template(&asked) {
        None
    } else {
        Some(
            gw.builds
                .resolve(crate::snapshots::local_name(&asked))?
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::NOT_FOUND,
                        format!("template {asked:?} not found"),
                    )
                })?,
        )
    };
    let template = built
        .as_ref()
        .map_or_else(|| asked.clone(), |b| b.template_id.clone());
    let timeout = match (req.timeout_ms, req.timeout) {
        (Some(ms), _) => {
            let ms = u64::try_from(ms).map_err(|_| {
                ApiError::bad_request(format!("timeoutMs must not be negative, got {ms}"))
            })?;
            let d = Duration::from_millis(ms);
            if d > MAX_TIMEOUT {
                return Err(ApiError::bad_request(format!(
                    "timeoutMs must be at most {}",
                    MAX_TIMEOUT.as_millis()
                )));
            }
            d
        }
        (None, Some(s)) => seconds("timeout", s, MAX_TIMEOUT)?,
        // E2B's defaults: 300 s for v2 creates, 15 s for the legacy route.
        (None, None) => Duration::from_secs(if legacy { 15 } else { 300 }),
    };
    let lifecycle_req = req
        .lifecycle
        .unwrap_or(coppice_wire::sandbox::LifecycleRequest {
            on_timeout: None,
            auto_resume: None,
        });
    let on_timeout = match (lifecycle_req.on_timeout, req.auto_pause) {
        (Some(OnTimeoutWire::Pause), _) | (None, Some(true)) => OnTimeout::Pause,
        _ => OnTimeout::Kill,
    };
    let auto_resume = lifecycle_req
        .auto_resume
        .or(req.auto_resume.map(|a| a.enabled()))
        .unwrap_or(false);
    // `autoPauseMemory: false`: the window's end pauses filesystem-only, which E2B's
    // auto-resume refuses, so the two do not go together.
    let auto_pause_cold = req.auto_pause_memory == Some(false);
    if auto_pause_cold && on_timeout != OnTimeout::Pause {
        return Err(ApiError::bad_request(
            "autoPauseMemory needs autoPause: true (or lifecycle.onTimeout \"pause\")",
        ));
    }
    if auto_pause_cold && auto_resume {
        return Err(ApiError::bad_request(
            "autoPauseMemory: false cannot be combined with autoResume: a filesystem-only \
             pause is resumed by connect or resume only",
        ));
    }
    let policy = Policy::new(on_timeout, auto_resume).map_err(|e| {
        ApiError::bad_request(format!(
            "{e} (autoResume needs lifecycle.onTimeout \"pause\" or autoPause: true)"
        ))
    })?;
    let metadata = req.metadata.unwrap_or_default();
    let asked_env = req.env_vars.unwrap_or_default();
    check_map("metadata", &metadata, false)?;
    check_map("envVars", &asked_env, true)?;
    // A built template's `ENV`, under what the create asks for.
    let mut env_vars = built
        .as_ref()
        .map(|b| b.defaults.env.clone())
        .unwrap_or_default();
    env_vars.extend(asked_env);
    // Fields of E2B's create that this gateway does not implement: refused by name, never
    // accepted and ignored (an empty value asks for nothing). `mcp` is not among them: the
    // SDK itself starts `mcp-gateway --config <mcp>` in the new sandbox through envd (and
    // kills the sandbox when that fails), so the server has nothing to do with it.
    for (name, value) in [("iam", &req.iam), ("volumeMounts", &req.volume_mounts)] {
        let asked = match value {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::Object(o)) => !o.is_empty(),
            Some(serde_json::Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
        };
        if asked {
            return Err(ApiError::bad_request(format!(
                "{name} is not supported by this gateway"
            )));
        }
    }
    let net = network::on_create(
        req.network.as_ref(),
        req.allow_internet_access,
        gw.runtime.has_network(),
    )?;
    let default_user = built
        .as_ref()
        .and_then(|b| b.defaults.user.clone())
        .unwrap_or_else(|| crate::runtime::DEFAULT_USER.to_owned());
    let default_workdir = built
        .as_ref()
        .and_then(|b| b.defaults.workdir.clone())
        .unwrap_or_else(|| crate::runtime::DEFAULT_WORKDIR.to_owned());
    let limits = built
        .as_ref()
        .map_or(crate::runtime::DEFAULT_LIMITS, |b| b.limits);
    Ok(Plan {
        asked,
        template,
        built,
        layer: None,
        timeout,
        policy,
        metadata,
        env_vars,
        net,
        allow_internet: req.allow_internet_access,
        limits,
        default_user,
        default_workdir,
        build_id: None,
        forked_from: None,
        auto_pause_cold,
    })
}

/// Starts the sandbox `plan` describes and records it (`created`); on failure nothing of it
/// is left.
pub(crate) async fn start(gw: &Gateway, plan: Plan) -> Result<Record> {
    let Plan {
        asked,
        template,
        built,
        layer,
        timeout,
        policy,
        metadata,
        env_vars,
        net,
        allow_internet,
        limits,
        default_user,
        default_workdir,
        build_id,
        forked_from,
        auto_pause_cold,
    } = plan;
    let traffic_token = if net.traffic_token {
        Some(random_token(32)?)
    } else {
        None
    };
    if !gw.is_ready() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the default template is still being built; try again shortly",
        ));
    }

    // A place under --max-sandboxes and --min-free-memory (429 otherwise), with a warm
    // sandbox of the template if the pool has one: that is this sandbox from here on. A
    // sandbox on a layer of its own (a fork) is never a warm one.
    let pool_key = layer.as_ref().map_or(template.as_str(), |l| l.as_str());
    let (mut ticket, warm) = gw.admission.admit(gw, pool_key).await?;
    gw.pools.count_create(pool_key, warm.is_some());
    gw.pool_changed();
    let id = match &warm {
        Some(w) => w.id.clone(),
        None => crate::runtime::mint_id()?,
    };
    let created = now();
    let record = Record {
        id: id.clone(),
        template: template.clone(),
        created_at: created.0,
        metadata,
        env_vars,
        access_token: random_token(32)?,
        lifecycle: Lifecycle::creating(created, timeout, policy),
        limits,
        allow_internet,
        pid: None,
        build_id: String::new(),
        execution_id: String::new(),
        execution_started_at: 0,
        traffic_token,
        network: net.echo.clone(),
        from_pool: warm.is_some(),
        paused_cold: false,
        auto_pause_cold,
    };
    let entry = match gw.insert(record.clone()) {
        Ok(entry) => {
            // The registry counts it now; the ticket keeps its start's memory reservation.
            ticket.counted();
            entry
        }
        Err(e) => {
            if warm.is_some() {
                gw.runtime.destroy(&id).await;
            }
            return Err(e.into());
        }
    };
    let _op = entry.op.write().await;
    let _creating = gw.creating();
    let started = gw
        .runtime
        .create(Setup {
            id: &id,
            template: &template,
            limits: record.limits,
            env_vars: &record.env_vars,
            access_token: &record.access_token,
            policy: &net.policy,
            dns_servers: &net.dns_servers,
            warm: warm.map(|w| w.pid),
            layer: layer.or_else(|| built.as_ref().map(|b| b.layer.clone())),
            default_user: &default_user,
            default_workdir: &default_workdir,
        })
        .await;
    let pid = match started {
        Ok(pid) => pid,
        Err(e) => {
            // The runtime cleaned up after itself; forget the record too.
            if let Err(reg) = gw.remove(&id) {
                tracing::error!(sandbox = %id, error = %reg, "forgetting a failed create");
            }
            return Err(e.into());
        }
    };
    // A built template's start command runs, and its ready command succeeds, before the
    // create answers (`builds/start.rs` says what that costs).
    if let Some(b) = built
        .as_ref()
        .filter(|b| crate::builds::start::has_commands(&b.defaults))
    {
        let socket = gw.runtime.socket(&id);
        if let Err(why) = crate::builds::start::start_and_wait(
            &socket,
            Some(&record.access_token),
            &b.defaults,
            &mut |_| {},
        )
        .await
        {
            gw.runtime.destroy(&id).await;
            if let Err(reg) = gw.remove(&id) {
                tracing::error!(sandbox = %id, error = %reg, "forgetting a failed create");
            }
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("template {asked:?}: {why}"),
            ));
        }
    }
    let (lifecycle, event) = record
        .lifecycle
        .transition(Command::Started { now: now() })?;
    // The layer is cached by the create above; it is the event's `sandboxBuildId` (a built
    // template's build id).
    let build_id = match (build_id, &built) {
        (Some(id), _) => id,
        (None, Some(b)) => b.build_id.clone(),
        (None, None) => match gw.runtime.template(&template).await {
            Ok(layer) => layer.to_string(),
            Err(_) => String::new(),
        },
    };
    let note: Vec<(&str, serde_json::Value)> = forked_from
        .iter()
        .map(|source| ("forkedFrom", serde_json::Value::from(source.as_str())))
        .collect();
    let record = gw.commit_noting(
        &entry,
        Record {
            lifecycle,
            pid: Some(pid),
            build_id,
            ..record
        },
        &event,
        &note,
    )?;
    tracing::info!(sandbox = %id, template = %template, forked_from = ?forked_from, "created");
    Ok(record)
}

fn entry(gw: &Gateway, id: &str) -> Result<std::sync::Arc<Entry>> {
    SandboxId::new(id)
        .ok()
        .and_then(|id| gw.entry(&id))
        .ok_or_else(|| ApiError::sandbox_not_found(id))
}

/// `GET /sandboxes/{id}`.
pub(crate) fn get(gw: &Gateway, id: &str) -> Result<Response<Body>> {
    let record = entry(gw, id)?.record();
    if record.lifecycle.state == SandboxState::Creating {
        return Err(ApiError::sandbox_not_found(id));
    }
    Ok(json(StatusCode::OK, &detail(gw, &record)))
}

/// `GET /v2/sandboxes` (paged, running and paused) and legacy `GET /sandboxes` (running only,
/// one page).
pub(crate) fn list(gw: &Gateway, raw_query: &str, legacy: bool) -> Result<Response<Body>> {
    let mut q = ListQuery::parse(raw_query).map_err(|e| ApiError::bad_request(e.to_string()))?;
    if legacy {
        q.states = vec![StateFilter::Running];
        q.limit = u32::MAX;
    }
    let mut records: Vec<Record> = gw
        .entries()
        .iter()
        .map(|e| e.record())
        .filter(|r| match r.lifecycle.state {
            SandboxState::Running => q.wants(StateFilter::Running),
            SandboxState::Paused => q.wants(StateFilter::Paused),
            _ => false,
        })
        .filter(|r| q.metadata.iter().all(|(k, v)| r.metadata.get(k) == Some(v)))
        .filter(|r| q.template.as_ref().is_none_or(|t| &r.template == t))
        .filter(|r| {
            q.started_after
                .is_none_or(|t| r.lifecycle.started_at.0 >= t)
        })
        .collect();
    records.sort_by(|a, b| (a.created_at, a.id.as_str()).cmp(&(b.created_at, b.id.as_str())));
    if !q.ascending {
        records.reverse();
    }
    let key = |r: &Record| format!("{}.{}", r.created_at, r.id);
    if let Some(token) = &q.next_token {
        // The token is a position, not a sandbox: the page goes on after it even when the
        // sandbox it was taken from has been killed or changed state since.
        let (created_at, id) = token
            .split_once('.')
            .and_then(|(t, id)| Some((t.parse::<u64>().ok()?, id)))
            .ok_or_else(|| ApiError::bad_request("nextToken is not a token this gateway gave"))?;
        records.retain(|r| {
            let at = (r.created_at, r.id.as_str());
            if q.ascending {
                at > (created_at, id)
            } else {
                at < (created_at, id)
            }
        });
    }
    let limit = usize::try_from(q.limit).unwrap_or(usize::MAX);
    let more = records.len() > limit;
    records.truncate(limit);
    let body: Vec<SandboxDetail> = records.iter().map(|r| detail(gw, r)).collect();
    let mut resp = json(StatusCode::OK, &body);
    if more {
        if let Some(last) = records.last() {
            if let Ok(v) = HeaderValue::from_str(&key(last)) {
                resp.headers_mut().insert("x-next-token", v);
            }
        }
    }
    Ok(resp)
}

/// `DELETE /sandboxes/{id}`.
pub(crate) async fn kill(gw: &Gateway, id: &str) -> Result<Response<Body>> {
    let entry = entry(gw, id)?;
    let _op = entry.op.write().await;
    // A concurrent kill may have won the lock first.
    if gw.entry(&entry.record().id).is_none() {
        return Err(ApiError::sandbox_not_found(id));
    }
    gw.kill(&entry, Cause::Manual).await?;
    tracing::info!(sandbox = %id, "killed");
    Ok(empty(StatusCode::NO_CONTENT))
}

/// The shape every lifecycle change on a live sandbox shares: take its operation lock, run
/// `command` through the state machine, make the backend follow the state change (running →
/// paused freezes it, or with `cold` stops it keeping its files; paused → running thaws it,
/// or boots it again on its files if it was paused cold or `cold` asks for it), then commit
/// the record with its event.
/// Returns the committed record and the state it was in before.
async fn change(
    gw: &Gateway,
    id: &str,
    cold: bool,
    command: impl FnOnce(Millis) -> Command,
) -> Result<(Record, SandboxState)> {
    let entry = entry(gw, id)?;
    let _op = entry.op.write().await;
    let record = entry.record();
    let before = record.lifecycle.state;
    let (lifecycle, event) = record.lifecycle.transition(command(now()))?;
    let mut pid = record.pid;
    match (before, lifecycle.state) {
        (SandboxState::Running, SandboxState::Paused) if cold => {
            gw.runtime.stop(&record.id).await?;
            pid = None;
        }
        (SandboxState::Running, SandboxState::Paused) => crate::freeze(&gw.runtime, &entry).await?,
        (SandboxState::Paused, SandboxState::Running) if record.paused_cold || cold => {
            // A resume without memory (`on_resume="reboot"`) of a full pause drops what it
            // kept in memory first.
            if !record.paused_cold {
                gw.runtime.stop(&record.id).await?;
            }
            pid = Some(cold_boot(gw, &record).await?);
        }
        (SandboxState::Paused, SandboxState::Running) => gw.runtime.resume(&record.id).await?,
        _ => {}
    }
    let paused_cold = match lifecycle.state {
        SandboxState::Paused => record.paused_cold || cold,
        _ => false,
    };
    let record = gw.commit(
        &entry,
        Record {
            lifecycle,
            pid,
            paused_cold,
            ..record
        },
        &event,
    )?;
    Ok((record, before))
}

/// Boots a sandbox paused filesystem-only again on the files it kept, as its create did:
/// its environment, access token, network policy, user and working directory, and its
/// template's start and ready commands. On failure it stays stopped with its files.
pub(crate) async fn cold_boot(gw: &Gateway, record: &Record) -> Result<u32> {
    let net = network::on_create(
        record
            .network
            .as_ref()
            .and_then(|n| serde_json::to_value(n).ok())
            .as_ref(),
        record.allow_internet,
        gw.runtime.has_network(),
    )?;
    let built = crate::snapshots::built_of(gw, record)?;
    let default_user = built
        .as_ref()
        .and_then(|b| b.defaults.user.clone())
        .unwrap_or_else(|| crate::runtime::DEFAULT_USER.to_owned());
    let default_workdir = built
        .as_ref()
        .and_then(|b| b.defaults.workdir.clone())
        .unwrap_or_else(|| crate::runtime::DEFAULT_WORKDIR.to_owned());
    let pid = gw
        .runtime
        .reboot(Setup {
            id: &record.id,
            template: &record.template,
            limits: record.limits,
            env_vars: &record.env_vars,
            access_token: &record.access_token,
            policy: &net.policy,
            dns_servers: &net.dns_servers,
            warm: None,
            layer: None,
            default_user: &default_user,
            default_workdir: &default_workdir,
        })
        .await?;
    if let Some(b) = built
        .as_ref()
        .filter(|b| crate::builds::start::has_commands(&b.defaults))
    {
        let socket = gw.runtime.socket(&record.id);
        if let Err(why) = crate::builds::start::start_and_wait(
            &socket,
            Some(&record.access_token),
            &b.defaults,
            &mut |_| {},
        )
        .await
        {
            if let Err(e) = gw.runtime.stop(&record.id).await {
                tracing::warn!(sandbox = %record.id, error = %e, "stopping a sandbox whose start command failed");
            }
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("template {:?}: {why}", record.template),
            ));
        }
    }
    tracing::info!(sandbox = %record.id, pid, "booted again on its files");
    Ok(pid)
}

/// `POST /sandboxes/{id}/pause`: 409 when already paused.
pub(crate) async fn pause(gw: &Gateway, id: &str, body: &Bytes) -> Result<Response<Body>> {
    let req: PauseRequest = parse_or_default(body)?;
    // `memory: false`: a filesystem-only pause (processes stop, files stay).
    let cold = req.memory == Some(false);
    change(gw, id, cold, |now| Command::Pause {
        now,
        cause: Cause::Manual,
    })
    .await?;
    Ok(empty(StatusCode::NO_CONTENT))
}

/// Legacy `POST /sandboxes/{id}/resume`: 409 when running.
pub(crate) async fn resume(gw: &Gateway, id: &str, body: &Bytes) -> Result<Response<Body>> {
    let req: ResumeRequest = parse_or_default(body)?;
    let timeout = seconds("timeout", req.timeout.unwrap_or(300), MAX_TIMEOUT)?;
    let (record, _) = change(gw, id, false, |now| Command::Resume { now, timeout }).await?;
    Ok(json(StatusCode::CREATED, &sandbox_body(gw, &record)))
}

/// `POST /v2/sandboxes/{id}/connect` and legacy `POST /sandboxes/{id}/connect`: resumes a
/// paused sandbox (201) or extends a running one's window (200).
pub(crate) async fn connect(
    gw: &Gateway,
    id: &str,
    body: &Bytes,
    legacy: bool,
) -> Result<Response<Body>> {
    let req: ConnectRequest = if legacy {
        parse(body)?
    } else {
        parse_or_default(body)?
    };
    if legacy && req.timeout.is_none() {
        return Err(ApiError::bad_request("timeout is required"));
    }
    let timeout = seconds("timeout", req.timeout.unwrap_or(300), MAX_TIMEOUT)?;
    // `memory: false` (the SDK's `on_resume="reboot"`): a paused sandbox boots again on its
    // files, whatever its pause kept; a running one is left as it is.
    let reboot = req.memory == Some(false);
    let (record, before) = change(gw, id, reboot, |now| Command::Connect { now, timeout }).await?;
    let status = if before == SandboxState::Paused {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json(status, &sandbox_body(gw, &record)))
}

/// `POST /sandboxes/{id}/timeout`: the window ends `timeout` seconds from now.
pub(crate) async fn set_timeout(gw: &Gateway, id: &str, body: &Bytes) -> Result<Response<Body>> {
    let req: TimeoutRequest = parse(body)?;
    let timeout = seconds("timeout", req.timeout, MAX_TIMEOUT)?;
    change(gw, id, false, |now| Command::SetTimeout { now, timeout }).await?;
    Ok(empty(StatusCode::NO_CONTENT))
}

/// `POST /sandboxes/{id}/refreshes`: extends the window to at least `duration` from now.
pub(crate) async fn refresh(gw: &Gateway, id: &str, body: &Bytes) -> Result<Response<Body>> {
    let req: RefreshRequest = parse_or_default(body)?;
    let duration = seconds("duration", req.duration.unwrap_or(60), MAX_REFRESH)?;
    change(gw, id, false, |now| Command::Refresh { now, duration }).await?;
    Ok(empty(StatusCode::NO_CONTENT))
}
