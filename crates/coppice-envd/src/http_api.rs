//! envd's plain HTTP endpoints besides `/files`: `/init`, `/envs`, `/metrics`.
//! (`/health` is a bare 204 in the route table.)

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use http::{Request, Response, StatusCode};
use http_body::Body as HttpBody;
use serde::Deserialize;
use serde_json::json;

use crate::connect;
use crate::reply::{self, Body};
use crate::state::AgentState;

/// The `POST /init` body (E2B's orchestrator sends more; the rest is ignored).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct InitRequest {
    #[serde(default)]
    env_vars: Option<HashMap<String, String>>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    default_user: Option<String>,
    #[serde(default)]
    default_workdir: Option<String>,
}

fn write<T>(lock: &std::sync::RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `POST /init`: sets sandbox env vars, access token, default user and workdir; 204.
///
/// Once a token is set, a new `/init` must present it in `X-Access-Token` (so a sandbox
/// process that can reach the socket cannot take the sandbox over); before that, `/init`
/// is open, as on E2B where only the orchestrator can reach it.
pub(crate) async fn init<B>(state: Arc<AgentState>, req: Request<B>) -> Response<Body>
where
    B: HttpBody<Data = bytes::Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    if let Some(current) = state.token() {
        let presented = req
            .headers()
            .get("x-access-token")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !crate::secret::constant_time_eq(presented.as_bytes(), current.as_bytes()) {
            return reply::error(
                StatusCode::UNAUTHORIZED,
                "unauthorized access, please provide a valid access token or method signing if supported",
            );
        }
    }
    let body = match connect::read_unary(req.into_body()).await {
        Ok(b) => b,
        Err(e) => return reply::error(StatusCode::BAD_REQUEST, e.message),
    };
    let init: InitRequest = if body.iter().all(u8::is_ascii_whitespace) {
        InitRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(i) => i,
            Err(e) => return reply::error(StatusCode::BAD_REQUEST, format!("invalid body: {e}")),
        }
    };
    tracing::info!(
        event_type = "init",
        env_vars = init.env_vars.as_ref().map_or(0, HashMap::len),
        default_user = init.default_user.as_deref(),
        default_workdir = init.default_workdir.as_deref(),
        "Sandbox initialized"
    );
    if let Some(envs) = init.env_vars {
        write(&state.envs).extend(envs);
    }
    if let Some(token) = init.access_token {
        *write(&state.access_token) = (!token.is_empty()).then_some(token);
    }
    if let Some(user) = init.default_user.filter(|u| !u.is_empty()) {
        *write(&state.default_user) = user;
    }
    if let Some(dir) = init.default_workdir.filter(|d| !d.is_empty()) {
        *write(&state.default_workdir) = Some(dir);
    }
    let mut r = Response::new(reply::empty());
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

/// `GET /envs`: the sandbox env vars as a JSON object.
pub(crate) fn envs(state: &AgentState) -> Response<Body> {
    reply::json(StatusCode::OK, &json!(state.envs_snapshot()))
}

/// `GET /metrics`: CPU, memory and disk of the sandbox, in envd's shape.
pub(crate) fn metrics(state: &AgentState) -> Response<Body> {
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let cpu_count = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let cpu_used_pct = cpu_used_pct(state);
    let mem = meminfo();
    let kib = |k: &str| mem.get(k).copied().unwrap_or(0) * 1024;
    let mem_total = kib("MemTotal");
    let mem_used = mem_total.saturating_sub(kib("MemAvailable"));
    let mem_cache = kib("Cached") + kib("Buffers");
    let (disk_total, disk_used) = match nix::sys::statvfs::statvfs(&state.config.disk_root) {
        Ok(s) => {
            let frag = s.fragment_size();
            let total = s.blocks() * frag;
            (total, total.saturating_sub(s.blocks_free() * frag))
        }
        Err(_) => (0, 0),
    };
    reply::json(
        StatusCode::OK,
        &json!({
            "ts": ts,
            "cpu_count": cpu_count,
            "cpu_used_pct": cpu_used_pct,
            "mem_total": mem_total,
            "mem_used": mem_used,
            "mem_cache": mem_cache,
            "mem_total_mib": mem_total / (1024 * 1024),
            "mem_used_mib": mem_used / (1024 * 1024),
            "disk_used": disk_used,
            "disk_total": disk_total,
        }),
    )
}

fn meminfo() -> HashMap<String, u64> {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (k, rest) = l.split_once(':')?;
            let v = rest.split_whitespace().next()?.parse().ok()?;
            Some((k.to_owned(), v))
        })
        .collect()
}

/// CPU use since the previous call (since boot on the first), rounded to 0.01 %.
fn cpu_used_pct(state: &AgentState) -> f64 {
    let Some((total, idle)) = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| parse_cpu_line(s.lines().next()?))
    else {
        return 0.0;
    };
    let mut prev = state
        .cpu_sample
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (t0, i0) = prev.unwrap_or((0, 0));
    *prev = Some((total, idle));
    let dt = total.saturating_sub(t0);
    if dt == 0 {
        return 0.0;
    }
    let busy = dt.saturating_sub(idle.saturating_sub(i0));
    // Tick counts are far below 2^52, so the conversions are exact.
    #[allow(clippy::cast_precision_loss)]
    let pct = busy as f64 * 100.0 / dt as f64;
    (pct * 100.0).round() / 100.0
}

/// `(total, idle+iowait)` ticks from the aggregate `cpu` line of `/proc/stat`.
fn parse_cpu_line(line: &str) -> Option<(u64, u64)> {
    let mut it = line.split_whitespace();
    if it.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = it.filter_map(|x| x.parse().ok()).collect();
    if v.len() < 4 {
        return None;
    }
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Some((v.iter().sum(), idle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_line() {
        assert_eq!(
            parse_cpu_line("cpu  10 0 5 80 5 0 0 0 0 0"),
            Some((100, 85))
        );
        assert_eq!(parse_cpu_line("cpu0 1 2 3 4"), None);
    }
}
