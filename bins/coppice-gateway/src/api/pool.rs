//! `/pool` (Coppice's own routes): each built-in template's warm pool. `GET /pool` lists
//! every pool; `POST /pool/{template}/warm` `{"count": N}` sets a target and
//! `POST /pool/{template}/drain` sets it to 0 and destroys the idle sandboxes at once. The
//! state is [`crate::pool`]'s; the filler in `lib.rs` keeps each pool at its target.

use bytes::Bytes;
use coppice_lifecycle::state::SandboxState;
use coppice_wire::timestamp::format_millis;
use http::{Response, StatusCode};
use serde::{Deserialize, Serialize};

use crate::api::error::ApiError;
use crate::api::sandboxes::parse;
use crate::api::templates::path_param;
use crate::api::{json, Body};
use crate::catalogue::BuildState;
use crate::config::Config;
use crate::pool::Pool;
use crate::Gateway;

type Result<T> = std::result::Result<T, ApiError>;

/// The body of `POST /pool/{template}/warm`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WarmRequest {
    /// The new target; any JSON value, checked here so that every refusal names `count`
    /// (serde's type errors do not name the field).
    count: Option<serde_json::Value>,
}

/// The body of `POST /pool/{template}/drain`, if any: nothing to ask, so an empty object.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DrainRequest {}

/// One pool in `GET /pool` and the answers of `warm` and `drain`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct PoolStatus {
    #[serde(rename = "templateID")]
    template_id: &'static str,
    /// Warm sandboxes the filler keeps.
    target: usize,
    /// Warm sandboxes started and waiting for a create.
    ready: usize,
    /// Sandboxes a create took from this pool that the gateway still has, running or paused.
    in_use: usize,
    /// Creates that took a warm sandbox, since the gateway started.
    hits: u64,
    /// Creates that found the pool empty, since the gateway started.
    misses: u64,
    /// The last warm start that failed, or `null`.
    last_error: Option<LastErrorBody>,
}

#[derive(Debug, Serialize)]
struct LastErrorBody {
    message: String,
    /// RFC 3339, as every time in the API.
    at: String,
}

fn status(gw: &Gateway, name: &'static str, pool: Pool) -> PoolStatus {
    let in_use = gw
        .entries()
        .iter()
        .map(|e| e.record())
        .filter(|r| {
            r.from_pool
                && r.template == name
                && matches!(
                    r.lifecycle.state,
                    SandboxState::Running | SandboxState::Paused
                )
        })
        .count();
    PoolStatus {
        template_id: name,
        target: pool.target,
        ready: gw.runtime.warm_count(name),
        in_use,
        hits: pool.hits,
        misses: pool.misses,
        last_error: pool.last_error.map(|e| LastErrorBody {
            message: e.message,
            at: format_millis(e.at.0),
        }),
    }
}

/// `GET /pool`: every built-in template's pool, by template id.
pub(crate) fn list(gw: &Gateway) -> Response<Body> {
    let pools: Vec<PoolStatus> = gw
        .pools
        .all()
        .into_iter()
        .map(|(name, pool)| status(gw, name, pool))
        .collect();
    json(StatusCode::OK, &pools)
}

/// The template a path names: 400 for a bad encoding, 404 (E2B's shape) for none.
fn template(gw: &Gateway, raw: &str) -> Result<&'static str> {
    let id = path_param(raw, "template id")?;
    gw.templates
        .get(&id)
        .map(|e| e.name)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("template {id:?} not found")))
}

/// The largest target: `--warm-pool`'s bound, and no more than `--max-sandboxes` can hold.
fn max_target(gw: &Gateway) -> usize {
    Config::MAX_WARM_POOL.min(gw.admission.capacity(gw).max_sandboxes)
}

/// Stores and applies `target` for `name`, then gives back the sandboxes above it.
async fn set(gw: &Gateway, name: &'static str, target: usize) -> Result<PoolStatus> {
    gw.pools
        .set_target(name, target, || gw.registry().set_pool_target(name, target))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("template {name:?} not found"),
            )
        })??;
    let destroyed = gw.pools.shrink(&gw.runtime, name).await;
    tracing::info!(template = name, target, destroyed, "warm pool target set");
    gw.pool_changed();
    let pool = gw.pools.get(name).unwrap_or_default();
    Ok(status(gw, name, pool))
}

/// `POST /pool/{template}/warm` `{"count": N}`: sets the target to N (a whole number from 0
/// to [`max_target`]; 400 naming `count` otherwise) of a ready template (404 for an unknown
/// one, 409 while it builds or after its build failed). A lowered target destroys the idle
/// sandboxes above it before the answer. 200 with the pool when it holds its target, 202
/// while the filler is still starting sandboxes.
pub(crate) async fn warm(gw: &Gateway, raw: &str, body: &Bytes) -> Result<Response<Body>> {
    let name = template(gw, raw)?;
    let req: WarmRequest = parse(body)?;
    let max = max_target(gw);
    let given = req
        .count
        .ok_or_else(|| ApiError::bad_request("count is required: {\"count\": N}"))?;
    let count = given
        .as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .filter(|n| *n <= max)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "count must be a whole number from 0 to {max} (--max-sandboxes and the \
                 warm pool's bound), got {given}"
            ))
        })?;
    match gw.templates.get(name).map(|e| e.state) {
        Some(BuildState::Ready { .. }) => {}
        Some(BuildState::Building) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("template {name:?} is still building; warm its pool once it is ready"),
            ))
        }
        Some(BuildState::Failed { reason, .. }) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("template {name:?} failed to build, so it has no pool: {reason}"),
            ))
        }
        None => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("template {name:?} not found"),
            ))
        }
    }
    let pool = set(gw, name, count).await?;
    let code = if pool.ready < pool.target {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok(json(code, &pool))
}

/// `POST /pool/{template}/drain`: the target becomes 0 and every idle sandbox of the pool is
/// destroyed before the answer (200 with the pool); sandboxes a create took are the user's
/// and untouched. Any template may be drained, building or not. The body is empty or `{}`;
/// a field in it is a 400 that names it.
pub(crate) async fn drain(gw: &Gateway, raw: &str, body: &Bytes) -> Result<Response<Body>> {
    let name = template(gw, raw)?;
    if !body.iter().all(u8::is_ascii_whitespace) {
        let DrainRequest {} = parse(body)?;
    }
    let pool = set(gw, name, 0).await?;
    Ok(json(StatusCode::OK, &pool))
}
