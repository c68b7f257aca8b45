//! The one route table: data-plane requests go to the proxy, everything else is matched on
//! `(method, path segments)` after the API-key check. Until the sandboxes of a previous run
//! are re-adopted ([`crate::adoption`]), the data plane and every `/sandboxes` route answer
//! 503 and `/health` says `adopting`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use crate::api::error::ApiError;
use crate::api::{
    builds, closing, dashboard, events, has_body, jobs, json, logs, metrics, network, pool, ports,
    proxy, sandboxes, signed, snapshots, templates, Body,
};
use crate::metrics::Family;
use crate::Gateway;

/// Largest control-plane request body.
const MAX_BODY: usize = 1 << 20;

/// The gateway as a hyper service.
#[derive(Debug, Clone)]
pub(crate) struct Router {
    pub(crate) gw: Arc<Gateway>,
}

impl hyper::service::Service<Request<Incoming>> for Router {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let gw = Arc::clone(&self.gw);
        Box::pin(async move { Ok(route(&gw, req).await) })
    }
}

/// Whether the request carries an accepted API key (`X-API-Key` or `Authorization: Bearer`).
fn authorized(gw: &Gateway, req: &Request<Incoming>) -> bool {
    if gw.config.api_keys.is_empty() {
        return true;
    }
    let headers = req.headers();
    let given = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            headers
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
        });
    given.is_some_and(|key| {
        gw.config
            .api_keys
            .iter()
            .any(|k| constant_time_eq(k.as_bytes(), key.as_bytes()))
    })
}

/// Compares without an early exit, so timing does not reveal how much of a secret (an API
/// key, a traffic token) matched.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn route(gw: &Gateway, req: Request<Incoming>) -> Response<Body> {
    let arrived = Instant::now();
    let target = proxy::target(&req, Some(ports::routing_domain(&gw.config)))
        .or_else(|| signed::target(gw, &req));
    let (family, resp) = match target {
        Some(Ok(target)) => (
            Family::proxy(target.port),
            match gw.adoption.check() {
                Ok(()) => proxy::forward(gw, req, target).await,
                Err(e) => {
                    let unread = has_body(&req);
                    let resp = ApiError::from(e).into_response();
                    if unread {
                        closing(resp)
                    } else {
                        resp
                    }
                }
            },
        ),
        Some(Err(e)) => (Family::ProxyOther, e.into_response()),
        None => {
            let family = Family::control(req.uri().path());
            let resp = match control(gw, req).await {
                Ok(resp) => resp,
                Err(e) => e.into_response(),
            };
            (family, resp)
        }
    };
    // Until the response head: a streamed body goes on afterwards.
    gw.metrics.request(family, resp.status(), arrived.elapsed());
    resp
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than {MAX_BODY} bytes"),
        )),
        Err(e) => Err(ApiError::bad_request(format!(
            "cannot read the request body: {e}"
        ))),
    }
}

async fn control(gw: &Gateway, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    if method == Method::GET && path == "/health" {
        // 200 once sandboxes of the default template can be created; the body says how far
        // every template is (the others keep building in the background).
        let templates = gw.template_states();
        if let Err(a) = gw.adoption.check() {
            return Ok(json(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({
                    "status": "adopting",
                    "adopted": a.adopted,
                    "total": a.total,
                    "templates": templates,
                }),
            ));
        }
        let capacity = gw.admission.capacity(gw);
        return Ok(if gw.is_ready() {
            json(
                StatusCode::OK,
                &serde_json::json!({"status": "ok", "templates": templates, "capacity": capacity}),
            )
        } else {
            json(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({"status": "building the default template", "templates": templates, "capacity": capacity}),
            )
        });
    }
    if method == Method::PUT {
        if let Some(token) = path.strip_prefix(builds::UPLOAD_PREFIX) {
            // An upload link is its own credential (as a presigned URL is): no API key.
            let token = token.to_owned();
            let unread = has_body(&req);
            return Ok(match builds::upload(gw, &token, req).await {
                Ok(resp) => resp,
                Err(e) if unread => closing(e.into_response()),
                Err(e) => e.into_response(),
            });
        }
    }
    // The dashboard's files hold no data (the page reads the API with the key it asks for).
    if let Some(resp) = dashboard::serve(&method, &path) {
        return Ok(if has_body(&req) { closing(resp) } else { resp });
    }
    // Where this request came in, for the upload links `GET .../files/{hash}` hands out.
    let base = format!(
        "{}://{}",
        req.uri().scheme_str().unwrap_or("http"),
        req.uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                req.headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| gw.config.listen.to_string())
    );
    let unread = has_body(&req);
    // For `GET /templates/builds/{job}/events`, which resumes after this line.
    let last_event_id = req.headers().get("last-event-id").cloned();
    if !authorized(gw, &req) {
        let resp = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid or missing API key (send X-API-Key)",
        )
        .into_response();
        return Ok(if unread { closing(resp) } else { resp });
    }
    // `DELETE /templates/tags` is E2B's one DELETE with a body (the tags to remove).
    let reads_body = matches!(method, Method::POST | Method::PUT | Method::PATCH)
        || (method == Method::DELETE && path.trim_end_matches('/') == "/templates/tags");
    let body = if reads_body {
        match read_body(req).await {
            Ok(b) => b,
            Err(e) => return Ok(closing(e.into_response())),
        }
    } else if unread {
        // A body on GET or DELETE is never read: answer, then close.
        return Ok(closing(
            dispatch(gw, &method, &path, &query, &base, Bytes::new(), None).await?,
        ));
    } else {
        Bytes::new()
    };
    dispatch(gw, &method, &path, &query, &base, body, last_event_id).await
}

async fn dispatch(
    gw: &Gateway,
    method: &Method,
    path: &str,
    query: &str,
    base: &str,
    body: Bytes,
    last_event_id: Option<http::HeaderValue>,
) -> Result<Response<Body>, ApiError> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    if let ["sandboxes", ..] | ["v2", "sandboxes", ..] | ["pool", ..] = segments.as_slice() {
        // Until the gateway knows its sandboxes again it can neither answer for them nor
        // start new ones (nor count a pool's sandboxes in use).
        gw.adoption.check()?;
    }
    match (method, segments.as_slice()) {
        (&Method::POST, ["sandboxes"]) => sandboxes::create(gw, &body, true).await,
        (&Method::POST, ["v2", "sandboxes"]) => sandboxes::create(gw, &body, false).await,
        (&Method::GET, ["sandboxes"]) => sandboxes::list(gw, query, true),
        (&Method::GET, ["v2", "sandboxes"]) => sandboxes::list(gw, query, false),
        (&Method::GET, ["sandboxes", "metrics"]) => metrics::latest(gw, query),
        (&Method::GET, ["sandboxes", "snapshots"] | ["snapshots"]) => snapshots::list(gw, query),
        (&Method::GET, ["sandboxes", id]) => sandboxes::get(gw, id),
        (&Method::DELETE, ["sandboxes", id]) => sandboxes::kill(gw, id).await,
        (&Method::POST, ["sandboxes", id, "pause"]) => sandboxes::pause(gw, id, &body).await,
        (&Method::POST, ["sandboxes", id, "resume"]) => sandboxes::resume(gw, id, &body).await,
        (&Method::POST, ["sandboxes", id, "snapshots"]) => snapshots::create(gw, id, &body).await,
        (&Method::POST, ["sandboxes", id, "fork"]) => snapshots::fork(gw, id, &body).await,
        (&Method::POST, ["sandboxes", id, "connect"]) => {
            sandboxes::connect(gw, id, &body, true).await
        }
        (&Method::POST, ["v2", "sandboxes", id, "connect"]) => {
            sandboxes::connect(gw, id, &body, false).await
        }
        (&Method::POST, ["sandboxes", id, "timeout"]) => {
            sandboxes::set_timeout(gw, id, &body).await
        }
        (&Method::POST, ["sandboxes", id, "refreshes"]) => sandboxes::refresh(gw, id, &body).await,
        (&Method::PUT, ["sandboxes", id, "network"]) => network::update(gw, id, &body).await,
        (&Method::GET, ["metrics"]) => Ok(metrics::prometheus(gw)),
        (&Method::GET, ["sandboxes", id, "metrics"]) => metrics::sandbox(gw, id, query).await,
        (&Method::GET, ["sandboxes", id, "logs"]) => logs::legacy(gw, id, query).await,
        (&Method::GET, ["v2", "sandboxes", id, "logs"]) => logs::v2(gw, id, query).await,
        (&Method::GET, ["events", "sandboxes"]) => events::list(gw, None, query),
        (&Method::GET, ["events", "sandboxes", id]) => events::list(gw, Some(id), query),
        (&Method::POST, ["events", "webhooks"]) => events::create_webhook(gw, &body),
        (&Method::GET, ["events", "webhooks"]) => events::list_webhooks(gw),
        (&Method::GET, ["events", "webhooks", "deliveries"]) => events::deliveries(gw, None, query),
        (&Method::POST, ["events", "webhooks", "deliveries", id, "replay"]) => {
            events::replay_delivery(gw, id)
        }
        (&Method::POST, ["events", "webhooks", "replay"]) => events::replay_since(gw, None, &body),
        (&Method::GET, ["events", "webhooks", id]) => events::get_webhook(gw, id),
        (&Method::PATCH, ["events", "webhooks", id]) => events::update_webhook(gw, id, &body),
        (&Method::DELETE, ["events", "webhooks", id]) => events::delete_webhook(gw, id),
        (&Method::GET, ["events", "webhooks", id, "deliveries"]) => {
            events::deliveries(gw, Some(id), query)
        }
        (&Method::POST, ["events", "webhooks", id, "replay"]) => {
            events::replay_since(gw, Some(id), &body)
        }
        (&Method::GET, ["pool"]) => Ok(pool::list(gw)),
        (&Method::POST, ["pool", template, "warm"]) => pool::warm(gw, template, &body).await,
        (&Method::POST, ["pool", template, "drain"]) => pool::drain(gw, template, &body).await,
        (&Method::GET, ["templates"]) => templates::list(gw, query, false),
        (&Method::GET, ["v2", "templates"]) => templates::list(gw, query, true),
        (&Method::POST, ["v3", "templates"]) => builds::request(gw, &body),
        (&Method::POST, ["templates", "build"]) => jobs::create(gw, &body),
        (&Method::GET, ["templates", "builds", job, "logs"]) => jobs::logs(gw, job, query),
        (&Method::GET, ["templates", "builds", job, "events"]) => {
            jobs::events(gw, job, last_event_id.as_ref())
        }
        (&Method::POST, ["templates", "tags"]) => builds::assign_tags(gw, &body),
        (&Method::DELETE, ["templates", "tags"]) => builds::remove_tags(gw, &body),
        (&Method::GET, ["templates", "aliases", alias]) => templates::alias(gw, alias),
        (&Method::GET, ["templates", id]) => templates::get(gw, id, query),
        // A snapshot's id first, then a built template's (which collects its layers).
        (&Method::DELETE, ["templates", id]) => snapshots::delete(gw, id).await,
        (&Method::PATCH, ["templates", id] | ["v2", "templates", id]) => {
            templates::update(gw, id, &body, path.starts_with("/v2/"))
        }
        (&Method::GET, ["templates", id, "tags"]) => builds::tags(gw, id),
        (&Method::GET, ["templates", id, "files", hash]) => builds::file_link(gw, id, hash, base),
        (&Method::POST, ["v2", "templates", id, "builds", build]) => {
            builds::trigger(gw, id, build, &body)
        }
        (&Method::GET, ["templates", id, "builds", build, "status"]) => {
            builds::status(gw, id, build, query)
        }
        (&Method::GET, ["templates", id, "builds", build, "logs"]) => {
            builds::logs(gw, id, build, query)
        }
        // The older build protocol (`POST /templates`, `POST /templates/{id}`, `POST
        // /v2/templates`, `POST /templates/{id}/builds/{buildID}`) is not served: the SDKs
        // of this era use the routes above.
        (_, ["templates", ..] | ["v2" | "v3", "templates", ..]) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no route for {method} {path}: this gateway serves E2B's v3 template build \
                 protocol (POST /v3/templates and the routes it leads to)"
            ),
        )),
        (_, ["sandboxes" | "v2" | "events", ..])
        | (_, ["health" | "metrics" | "pool" | "snapshots"])
        | (_, ["pool", _, "warm" | "drain"]) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on {path}"),
        )),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no route for {method} {path}"),
        )),
    }
}
