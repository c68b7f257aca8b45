//! `GET /metrics` (the gateway's Prometheus series), `GET /sandboxes/{id}/metrics` (one
//! sandbox's resource history in E2B's shape) and `GET /sandboxes/metrics` (the latest sample
//! of several sandboxes).

use coppice_lifecycle::backend::SandboxId;
use coppice_lifecycle::state::SandboxState;
use coppice_wire::query::pairs;
use coppice_wire::sandbox::{SandboxMetric, SandboxesWithMetrics};
use coppice_wire::timestamp::format_millis;
use http::{header, HeaderValue, Response, StatusCode};

use crate::api::error::ApiError;
use crate::api::{full, json, Body};
use crate::metrics::{Levels, CONTENT_TYPE};
use crate::registry::Record;
use crate::usage::{cpu_count, Sample};
use crate::{now, Gateway};

type Result<T> = std::result::Result<T, ApiError>;

/// Nominal disk size reported to clients; storage sets no quota yet (as `GET /sandboxes/{id}`).
const DISK_TOTAL: u64 = 10 << 30;
/// Most sandboxes one `GET /sandboxes/metrics` may ask for (E2B's limit).
const MAX_IDS: usize = 100;

/// `GET /metrics`: every series in the Prometheus text format.
pub(crate) fn prometheus(gw: &Gateway) -> Response<Body> {
    let mut levels = Levels::default();
    for entry in gw.entries() {
        match entry.record().lifecycle.state {
            SandboxState::Running => levels.running += 1,
            SandboxState::Paused => levels.paused += 1,
            _ => {}
        }
    }
    levels.warm = crate::runtime::TEMPLATES
        .iter()
        .map(|(name, _)| (*name, gw.runtime.warm_count(name) as u64))
        .collect();
    levels.pools = gw
        .pools
        .all()
        .into_iter()
        .map(|(name, p)| {
            let level = crate::metrics::PoolLevel {
                target: u64::try_from(p.target).unwrap_or(u64::MAX),
                hits: p.hits,
                misses: p.misses,
            };
            (name, level)
        })
        .collect();
    levels.dispatch = gw.dispatch_stats.snapshot();
    levels.capacity = gw.admission.capacity(gw);
    levels.refused = gw.admission.refused();
    levels.outbox = match gw
        .registry()
        .with_conn(coppice_events::store::delivery_stats)
    {
        Ok(stats) => Some(stats),
        Err(e) => {
            tracing::warn!(error = %e, "the webhook outbox could not be counted");
            None
        }
    };
    let mut resp = Response::new(full(gw.metrics.render(&levels)));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    resp
}

/// A sample in E2B's shape.
fn wire(record: &Record, s: &Sample) -> SandboxMetric {
    SandboxMetric {
        timestamp: format_millis(s.at),
        timestamp_unix: i64::try_from(s.at / 1000).unwrap_or(i64::MAX),
        cpu_count: cpu_count(&record.limits),
        cpu_used_pct: s.cpu_pct,
        // As envd reports a VM's memory: used excludes the page cache, which is reported
        // beside it.
        mem_used: s.memory_bytes - s.memory_cache_bytes,
        mem_total: record.limits.memory_bytes.unwrap_or(0),
        mem_cache: s.memory_cache_bytes,
        disk_used: s.disk_bytes,
        disk_total: DISK_TOTAL,
    }
}

/// A Unix-seconds query value.
fn seconds(name: &str, value: &str) -> Result<u64> {
    value.parse::<u64>().map_err(|_| {
        ApiError::bad_request(format!(
            "{name} must be a Unix time in seconds, got {value:?}"
        ))
    })
}

/// `GET /sandboxes/{id}/metrics?start=&end=`: the samples from `start` (default: when the
/// sandbox started) to `end` (default: now), Unix seconds, both included, oldest first. A
/// running sandbox that has no sample yet is sampled now, so the answer is never empty for it.
pub(crate) async fn sandbox(gw: &Gateway, id: &str, raw_query: &str) -> Result<Response<Body>> {
    let entry = SandboxId::new(id)
        .ok()
        .and_then(|sid| gw.entry(&sid))
        .ok_or_else(|| ApiError::sandbox_not_found(id))?;
    let (mut start, mut end) = (None, None);
    for (k, v) in pairs(raw_query).map_err(|e| ApiError::bad_request(e.to_string()))? {
        match k.as_str() {
            "start" => start = Some(seconds(&k, &v)?),
            "end" => end = Some(seconds(&k, &v)?),
            _ => {}
        }
    }
    if entry.usage.latest().is_none() {
        gw.sample(&entry).await;
    }
    let record = entry.record();
    // Read after the sample above, so a default `end` includes it.
    let start_ms = start.map_or(record.lifecycle.started_at.0, |s| s.saturating_mul(1000));
    // The whole `end` second is included.
    let end_ms = end.map_or(now().0, |e| e.saturating_mul(1000).saturating_add(999));
    if start_ms > end_ms {
        return Err(ApiError::bad_request("start time cannot be after end time"));
    }
    let body: Vec<SandboxMetric> = entry
        .usage
        .between(start_ms, end_ms)
        .iter()
        .map(|s| wire(&record, s))
        .collect();
    Ok(json(StatusCode::OK, &body))
}

/// `GET /sandboxes/metrics?sandbox_ids=a,b`: the latest sample of each; ids the gateway does
/// not have, or without a sample yet, are left out (as E2B does).
pub(crate) fn latest(gw: &Gateway, raw_query: &str) -> Result<Response<Body>> {
    let mut ids: Vec<String> = Vec::new();
    for (k, v) in pairs(raw_query).map_err(|e| ApiError::bad_request(e.to_string()))? {
        if k == "sandbox_ids" {
            ids.extend(v.split(',').filter(|s| !s.is_empty()).map(str::to_owned));
        }
    }
    if ids.is_empty() {
        return Err(ApiError::bad_request(
            "query parameter sandbox_ids is required",
        ));
    }
    ids.sort();
    ids.dedup();
    if ids.len() > MAX_IDS {
        return Err(ApiError::bad_request(format!(
            "Too many sandboxes requested, maximum is {MAX_IDS}"
        )));
    }
    let mut out = SandboxesWithMetrics {
        sandboxes: Default::default(),
    };
    for id in ids {
        let Some(entry) = SandboxId::new(&*id).ok().and_then(|sid| gw.entry(&sid)) else {
            continue;
        };
        if let Some(s) = entry.usage.latest() {
            out.sandboxes.insert(id, wire(&entry.record(), &s));
        }
    }
    Ok(json(StatusCode::OK, &out))
}
