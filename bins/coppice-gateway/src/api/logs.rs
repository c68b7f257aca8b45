//! `GET /sandboxes/{id}/logs` (legacy) and `GET /v2/sandboxes/{id}/logs`: the sandbox's agent
//! log (`crate::sandbox_log`) in E2B's shapes, with E2B's query parameters and defaults.
//!
//! A sandbox's log is served while the gateway has the sandbox (running, paused or being
//! killed) and, after it is gone, for as long as its log file is kept.

use coppice_envd::journal::Level;
use coppice_lifecycle::backend::SandboxId;
use coppice_wire::logs::{
    LogLevel, LogsDirection, SandboxLog, SandboxLogEntry, SandboxLogs, SandboxLogsV2,
};
use coppice_wire::query::pairs;
use coppice_wire::timestamp::format_millis;
use http::{Response, StatusCode};

use crate::api::error::ApiError;
use crate::api::{json, Body};
use crate::sandbox_log::{self, Line, Query};
use crate::{now, Gateway};

type Result<T> = std::result::Result<T, ApiError>;

/// Lines a query returns unless it says otherwise (E2B's default).
const DEFAULT_LIMIT: usize = 1000;
/// Most lines a v2 query may ask for.
const MAX_V2_LIMIT: usize = 1000;
/// Longest `search` string.
const MAX_SEARCH: usize = 256;

fn bad(name: &str, value: &str, why: &str) -> ApiError {
    ApiError::bad_request(format!("invalid query parameter {name}={value:?}: {why}"))
}

fn wire_level(level: Level) -> LogLevel {
    match level {
        Level::Debug => LogLevel::Debug,
        Level::Info => LogLevel::Info,
        Level::Warn => LogLevel::Warn,
        Level::Error => LogLevel::Error,
    }
}

/// A line as E2B's structured entry: every key but `level` and `message` is a field.
fn entry(line: &Line) -> SandboxLogEntry {
    SandboxLogEntry {
        timestamp: format_millis(line.at),
        level: wire_level(line.entry.level),
        message: line.entry.message.clone(),
        fields: line.entry.fields.clone(),
    }
}

/// The sandbox's log lines, oldest first; 404 when the gateway has neither the sandbox nor
/// its log.
async fn lines(gw: &Gateway, id: &str) -> Result<Vec<Line>> {
    let sid = SandboxId::new(id).map_err(|_| ApiError::sandbox_not_found(id))?;
    let known = gw.entry(&sid).is_some();
    let path = gw.runtime.log_path(&sid);
    let read = tokio::task::spawn_blocking(move || sandbox_log::read(&path))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading the log: {e}"),
            )
        })?
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading the log of sandbox {id:?}: {e}"),
            )
        })?;
    match read {
        Some(lines) => Ok(lines),
        None if known => Ok(Vec::new()),
        None => Err(ApiError::sandbox_not_found(id)),
    }
}

/// A non-negative integer query value.
fn number(name: &str, value: &str) -> Result<u64> {
    value
        .parse::<u64>()
        .map_err(|_| bad(name, value, "expected a non-negative integer"))
}

fn limit(name: &str, value: &str, max: Option<usize>) -> Result<usize> {
    let n = usize::try_from(number(name, value)?).unwrap_or(usize::MAX);
    match max {
        Some(max) if n > max => Err(bad(name, value, &format!("at most {max}"))),
        _ => Ok(n),
    }
}

/// `GET /sandboxes/{id}/logs?start=&limit=`: lines from `start` (ms; default 7 days ago) to
/// now, oldest first, at most `limit` (default 1000), raw and structured.
pub(crate) async fn legacy(gw: &Gateway, id: &str, raw_query: &str) -> Result<Response<Body>> {
    let now = now().0;
    let mut q = Query {
        start: now.saturating_sub(retention_ms()),
        // Lines logged up to this very millisecond are included.
        end: now + 1,
        limit: DEFAULT_LIMIT,
        newest_first: false,
        min_level: None,
        search: None,
    };
    for (k, v) in pairs(raw_query).map_err(|e| ApiError::bad_request(e.to_string()))? {
        match k.as_str() {
            "start" => q.start = number(&k, &v)?,
            "limit" => q.limit = limit(&k, &v, None)?,
            _ => {}
        }
    }
    let lines = lines(gw, id).await?;
    let picked = sandbox_log::select(&lines, &q);
    let body = SandboxLogs {
        logs: picked
            .iter()
            .map(|l| SandboxLog {
                timestamp: format_millis(l.at),
                line: l.raw.clone(),
            })
            .collect(),
        log_entries: picked.iter().map(|l| entry(l)).collect(),
    };
    Ok(json(StatusCode::OK, &body))
}

fn retention_ms() -> u64 {
    u64::try_from(sandbox_log::RETENTION.as_millis()).unwrap_or(u64::MAX)
}

/// `GET /v2/sandboxes/{id}/logs?cursor=&limit=&direction=&level=&search=`, as E2B answers it:
/// `direction` `backward` (default) gives the newest lines before `cursor` (ms; default now),
/// newest first; `forward` the oldest from `cursor` on, oldest first. Either way the window
/// is at most 7 days long and no older than 7 days. `level` is the least severe level
/// returned; `search` a case-sensitive substring of the message; `limit` 0 to 1000 (default
/// 1000).
pub(crate) async fn v2(gw: &Gateway, id: &str, raw_query: &str) -> Result<Response<Body>> {
    let now = now().0;
    let mut cursor = None;
    let mut direction = LogsDirection::Backward;
    let mut q = Query {
        start: 0,
        end: 0,
        limit: DEFAULT_LIMIT,
        newest_first: true,
        min_level: None,
        search: None,
    };
    for (k, v) in pairs(raw_query).map_err(|e| ApiError::bad_request(e.to_string()))? {
        match k.as_str() {
            "cursor" => cursor = Some(number(&k, &v)?),
            "limit" => q.limit = limit(&k, &v, Some(MAX_V2_LIMIT))?,
            "direction" => {
                direction = LogsDirection::from_name(&v)
                    .ok_or_else(|| bad(&k, &v, "expected forward or backward"))?;
            }
            "level" => {
                let level = LogLevel::from_name(&v)
                    .ok_or_else(|| bad(&k, &v, "expected debug, info, warn or error"))?;
                q.min_level = Some(match level {
                    LogLevel::Debug => Level::Debug,
                    LogLevel::Info => Level::Info,
                    LogLevel::Warn => Level::Warn,
                    LogLevel::Error => Level::Error,
                });
            }
            "search" => {
                if v.chars().count() > MAX_SEARCH {
                    return Err(bad(&k, &v, &format!("at most {MAX_SEARCH} characters")));
                }
                q.search = Some(v).filter(|s| !s.is_empty());
            }
            _ => {}
        }
    }
    let week = retention_ms();
    let oldest = now.saturating_sub(week);
    let (start, end) = match (cursor, direction) {
        (None, _) => (oldest, now + 1),
        (Some(c), LogsDirection::Forward) => (c, c.saturating_add(week)),
        (Some(c), LogsDirection::Backward) => (c.saturating_sub(week), c),
    };
    q.start = start.max(oldest);
    q.end = end.max(q.start);
    q.newest_first = direction == LogsDirection::Backward;
    let lines = lines(gw, id).await?;
    let body = SandboxLogsV2 {
        logs: sandbox_log::select(&lines, &q)
            .into_iter()
            .map(entry)
            .collect(),
    };
    Ok(json(StatusCode::OK, &body))
}
