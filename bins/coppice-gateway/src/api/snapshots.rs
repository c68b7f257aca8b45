//! Snapshots and forks over HTTP: `POST /sandboxes/{id}/snapshots`, `GET /snapshots` (and
//! seed 002's `GET /sandboxes/snapshots`), `DELETE /templates/{snapshotID}` and
//! `POST /sandboxes/{id}/fork`. The work is in [`crate::snapshots`].

use bytes::Bytes;
use coppice_wire::error::ErrorBody;
use coppice_wire::snapshot::{ForkRequest, ForkResult, SnapshotInfo, SnapshotRequest};
use http::{HeaderValue, Response, StatusCode};

use crate::api::error::ApiError;
use crate::api::sandboxes::{parse_or_default, sandbox_body, seconds, start, Plan};
use crate::api::templates::path_param;
use crate::api::{empty, json, network, Body};
use crate::snapshots::{self, Filter, SnapError};
use crate::Gateway;

type Result<T> = std::result::Result<T, ApiError>;

/// The most items a page of `GET /snapshots` holds, and its default (E2B's).
const MAX_LIMIT: usize = 100;
/// The most forks one request may ask for (E2B's).
const MAX_FORKS: i64 = 100;
/// A fork's window when the request gives none (E2B's `SandboxForkRequest.timeout`).
const FORK_TIMEOUT_SECS: i64 = 15;
/// Longest window a fork may ask for (as a create).
const MAX_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// E2B's `error_code` pattern for a snapshot kind this host cannot take (its
/// `snapshot_filesystem_only_unsupported_node` is the reverse case: a node that cannot skip
/// memory).
pub(crate) const MEMORY_UNSUPPORTED: &str = "snapshot_memory_unsupported_node";

impl From<SnapError> for ApiError {
    fn from(e: SnapError) -> Self {
        match e {
            SnapError::Runtime(r) => ApiError::from(r),
            SnapError::MemoryUnsupported(m) => {
                ApiError::new(StatusCode::CONFLICT, m).with_code(MEMORY_UNSUPPORTED)
            }
            other => {
                let status = match &other {
                    SnapError::Invalid(_) => StatusCode::BAD_REQUEST,
                    SnapError::NotFound(_) => StatusCode::NOT_FOUND,
                    SnapError::Conflict(_) => StatusCode::CONFLICT,
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                };
                ApiError::new(status, crate::api::error::error_chain(&other))
            }
        }
    }
}

/// `POST /sandboxes/{id}/snapshots`: 201 `SnapshotInfo`.
pub(crate) async fn create(gw: &Gateway, id: &str, body: &Bytes) -> Result<Response<Body>> {
    let req: SnapshotRequest = parse_or_default(body)?;
    let snap = snapshots::take(gw, id, req.name.as_deref(), req.memory).await?;
    Ok(json(
        StatusCode::CREATED,
        &SnapshotInfo {
            snapshot_id: snap.id,
            names: snap.names,
        },
    ))
}

/// `GET /snapshots` and `GET /sandboxes/snapshots`: `sandboxID`, `name`, `limit` (1..=100,
/// default 100) and `nextToken`; `X-Next-Token` when more follow. Other parameters are
/// ignored, as E2B's API ignores them.
pub(crate) fn list(gw: &Gateway, query: &str) -> Result<Response<Body>> {
    let pairs =
        coppice_wire::query::pairs(query).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let mut filter = Filter::default();
    let mut limit = MAX_LIMIT;
    let mut next_token = None;
    for (name, value) in pairs {
        match name.as_str() {
            "sandboxID" => filter.sandbox_id = Some(value),
            "name" => filter.name = Some(value),
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "limit must be a whole number from 1 to {MAX_LIMIT}, got {value:?}"
                        ))
                    })?;
            }
            "nextToken" => next_token = Some(value),
            _ => {}
        }
    }
    let mut all = snapshots::list(gw, &filter)?;
    if let Some(token) = next_token {
        // The token is a position (newest first, then by ID), not a snapshot: the page goes
        // on after it even when that snapshot was deleted since.
        let (at, id) = token
            .split_once('.')
            .and_then(|(t, id)| Some((t.parse::<u64>().ok()?, id.to_owned())))
            .ok_or_else(|| ApiError::bad_request("nextToken is not a token this gateway gave"))?;
        all.retain(|s| s.created_at < at || (s.created_at == at && s.id.as_str() > id.as_str()));
    }
    let more = all.len() > limit;
    all.truncate(limit);
    let body: Vec<SnapshotInfo> = all
        .iter()
        .map(|s| SnapshotInfo {
            snapshot_id: s.id.clone(),
            names: s.names.clone(),
        })
        .collect();
    let mut resp = json(StatusCode::OK, &body);
    if more {
        if let Some(last) = all.last() {
            if let Ok(v) = HeaderValue::from_str(&format!("{}.{}", last.created_at, last.id)) {
                resp.headers_mut().insert("x-next-token", v);
            }
        }
    }
    Ok(resp)
}

/// `DELETE /templates/{id}` of a snapshot (by snapshot ID, percent-encoded, name or template
/// id): 204, its layers collected once no sandbox uses them. Anything else is the template
/// catalogue's.
pub(crate) async fn delete(gw: &Gateway, raw_id: &str) -> Result<Response<Body>> {
    let id = path_param(raw_id, "template id")?;
    match snapshots::find(gw, &id)? {
        Some(template_id) => {
            snapshots::delete(gw, &template_id).await?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        None => crate::api::templates::delete(gw, raw_id).await,
    }
}

/// `POST /sandboxes/{id}/fork`: the source's files captured once, then `count` sandboxes
/// started on them, each answered in its own entry (201 whatever they did). 404 for an
/// unknown source, 409 for a paused one, 400 for a count outside 1..=100.
pub(crate) async fn fork(gw: &Gateway, id: &str, body: &Bytes) -> Result<Response<Body>> {
    let req: ForkRequest = parse_or_default(body)?;
    let count = req.count.unwrap_or(1);
    if !(1..=MAX_FORKS).contains(&count) {
        return Err(ApiError::bad_request(format!(
            "count must be from 1 to {MAX_FORKS}, got {count}"
        )));
    }
    let timeout = seconds(
        "timeout",
        req.timeout.unwrap_or(FORK_TIMEOUT_SECS),
        MAX_TIMEOUT,
    )?;
    let (source, layer, _layers) = snapshots::capture_for_fork(gw, id).await?;
    let built = snapshots::built_of(gw, &source)?;
    let mut results = Vec::new();
    for _ in 0..count {
        let net = network::on_create(
            source
                .network
                .as_ref()
                .and_then(|n| serde_json::to_value(n).ok())
                .as_ref(),
            source.allow_internet,
            gw.runtime.has_network(),
        )?;
        let plan = Plan {
            asked: source.template.clone(),
            template: source.template.clone(),
            built: built.clone(),
            layer: Some(layer.clone()),
            timeout,
            policy: source.lifecycle.policy,
            metadata: source.metadata.clone(),
            env_vars: source.env_vars.clone(),
            net,
            allow_internet: source.allow_internet,
            limits: source.limits,
            default_user: built
                .as_ref()
                .and_then(|b| b.defaults.user.clone())
                .unwrap_or_else(|| crate::runtime::DEFAULT_USER.to_owned()),
            default_workdir: built
                .as_ref()
                .and_then(|b| b.defaults.workdir.clone())
                .unwrap_or_else(|| crate::runtime::DEFAULT_WORKDIR.to_owned()),
            build_id: (!source.build_id.is_empty()).then(|| source.build_id.clone()),
            forked_from: Some(source.id.clone()),
            auto_pause_cold: source.auto_pause_cold,
        };
        results.push(match start(gw, plan).await {
            Ok(record) => ForkResult {
                sandbox: Some(sandbox_body(gw, &record)),
                error: None,
            },
            Err(e) => {
                tracing::warn!(source = %source.id, status = %e.status, error = %e.message, "a fork failed");
                let mut body = ErrorBody::new(e.status.as_u16(), e.message);
                body.error_code = e.error_code.map(str::to_owned);
                ForkResult {
                    sandbox: None,
                    error: Some(body),
                }
            }
        });
    }
    Ok(json(StatusCode::CREATED, &results))
}
