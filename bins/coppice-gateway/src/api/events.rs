//! `/events/...`: the event log (`GET /events/sandboxes[/{id}]`), webhook management, the
//! delivery log and replay. The store behind them is `coppice_events::store`, on the
//! registry's connection; delivery itself is the dispatcher's business.
//!
//! The JSON shapes are E2B's (`name`, `url`, `enabled`, `events`, `signatureSecret`, the
//! secret never returned), plus Coppice's `format` (`e2b` or `sandforge`) and
//! `disabledReason`. They are defined here rather than in `coppice-wire` because they are
//! thin views of the store's types and no SDK sends them yet.

use bytes::Bytes;
use coppice_events::event::EventType;
use coppice_events::guard::WebhookUrl;
use coppice_events::sign::Format;
use coppice_events::store::{
    self, DeliveryAttempt, DeliveryQuery, EventQuery, NewWebhook, Webhook, WebhookPatch,
};
use coppice_lifecycle::state::Millis;
use coppice_wire::query::pairs;
use coppice_wire::timestamp::{format_millis, parse_millis};
use http::{Response, StatusCode};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::api::error::ApiError;
use crate::api::sandboxes::parse;
use crate::api::{json, Body};
use crate::{now, Gateway};

type Result<T> = std::result::Result<T, ApiError>;

fn bad_param(name: &str, value: &str) -> ApiError {
    ApiError::bad_request(format!("invalid query parameter {name}={value:?}"))
}

fn parse_types(names: &[String]) -> Result<Vec<EventType>> {
    names
        .iter()
        .flat_map(|n| n.split(','))
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|n| {
            n.parse::<EventType>()
                .map_err(|e| ApiError::bad_request(e.to_string()))
        })
        .collect()
}

/// `limit`, `offset` and (for events) `orderAsc` and `types` from a raw query string.
fn event_query(raw: &str, sandbox_id: Option<&str>) -> Result<EventQuery> {
    let mut q = EventQuery {
        sandbox_id: sandbox_id.map(str::to_owned),
        ..EventQuery::default()
    };
    let mut types = Vec::new();
    for (k, v) in pairs(raw).map_err(|e| ApiError::bad_request(e.to_string()))? {
        match k.as_str() {
            "limit" => q.limit = Some(v.parse().map_err(|_| bad_param(&k, &v))?),
            "offset" => q.offset = v.parse().map_err(|_| bad_param(&k, &v))?,
            "orderAsc" => q.order_asc = v.parse().map_err(|_| bad_param(&k, &v))?,
            "types" | "types[]" => types.push(v),
            _ => {}
        }
    }
    q.types = parse_types(&types)?;
    Ok(q)
}

/// `GET /events/sandboxes` (`sandbox_id` `None`) and `GET /events/sandboxes/{id}`.
pub(crate) fn list(gw: &Gateway, sandbox_id: Option<&str>, raw: &str) -> Result<Response<Body>> {
    let q = event_query(raw, sandbox_id)?;
    let events = gw.registry().with_conn(|c| store::list_events(c, &q))?;
    Ok(json(StatusCode::OK, &events))
}

/// A webhook as the API returns it: everything but the secret.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct WebhookBody {
    id: Uuid,
    name: String,
    url: String,
    enabled: bool,
    events: Vec<EventType>,
    format: &'static str,
    created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    disabled_reason: Option<String>,
}

impl From<Webhook> for WebhookBody {
    fn from(w: Webhook) -> Self {
        WebhookBody {
            id: w.id,
            name: w.name,
            url: w.url,
            enabled: w.enabled,
            events: w.events,
            format: w.format.as_str(),
            created_at: format_millis(w.created_at.0),
            disabled_reason: w.disabled_reason,
        }
    }
}

/// `POST /events/webhooks`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewWebhookBody {
    name: Option<String>,
    url: Option<String>,
    enabled: Option<bool>,
    events: Option<Vec<String>>,
    signature_secret: Option<String>,
    format: Option<String>,
}

/// `PATCH /events/webhooks/{id}`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PatchBody {
    name: Option<String>,
    url: Option<String>,
    enabled: Option<bool>,
    events: Option<Vec<String>>,
    signature_secret: Option<String>,
}

/// The URL checks that need no DNS: shape, scheme, and the SSRF guard's verdict on a
/// metadata host name or a refused address literal. Delivery checks the resolved address
/// again on every attempt.
fn check_url(gw: &Gateway, url: &str) -> Result<()> {
    let parsed =
        WebhookUrl::parse(url).map_err(|e| ApiError::bad_request(format!("invalid url: {e}")))?;
    gw.guard
        .check_url(&parsed)
        .map_err(|e| ApiError::bad_request(format!("invalid url: {e}")))
}

fn required<T>(field: &str, v: Option<T>) -> Result<T> {
    v.ok_or_else(|| ApiError::bad_request(format!("{field} is required")))
}

/// `POST /events/webhooks`: 201 with the webhook.
pub(crate) fn create_webhook(gw: &Gateway, body: &Bytes) -> Result<Response<Body>> {
    let req: NewWebhookBody = parse(body)?;
    let url = required("url", req.url)?;
    check_url(gw, &url)?;
    let format = match req.format.as_deref() {
        None => Format::E2b,
        Some(f) => Format::parse(f).ok_or_else(|| {
            ApiError::bad_request(format!("invalid format {f:?}: e2b or sandforge"))
        })?,
    };
    let new = NewWebhook {
        name: required("name", req.name)?,
        url,
        enabled: req.enabled.unwrap_or(true),
        events: parse_types(&required("events", req.events)?)?,
        secret: required("signatureSecret", req.signature_secret)?,
        format,
    };
    let hook = gw
        .registry()
        .with_conn(|c| store::create_webhook(c, &new, now()))?;
    Ok(json(StatusCode::CREATED, &WebhookBody::from(hook)))
}

/// `GET /events/webhooks`.
pub(crate) fn list_webhooks(gw: &Gateway) -> Result<Response<Body>> {
    let hooks = gw.registry().with_conn(store::list_webhooks)?;
    let body: Vec<WebhookBody> = hooks.into_iter().map(WebhookBody::from).collect();
    Ok(json(StatusCode::OK, &body))
}

fn webhook_id(id: &str) -> Result<Uuid> {
    Uuid::parse_str(id)
        .map_err(|_| ApiError::new(StatusCode::NOT_FOUND, format!("webhook {id:?} not found")))
}

/// `GET /events/webhooks/{id}`.
pub(crate) fn get_webhook(gw: &Gateway, id: &str) -> Result<Response<Body>> {
    let id = webhook_id(id)?;
    let hook = gw.registry().with_conn(|c| store::get_webhook(c, id))?;
    Ok(json(StatusCode::OK, &WebhookBody::from(hook)))
}

/// `PATCH /events/webhooks/{id}`: 200 with the webhook as changed.
pub(crate) fn update_webhook(gw: &Gateway, id: &str, body: &Bytes) -> Result<Response<Body>> {
    let id = webhook_id(id)?;
    let req: PatchBody = parse(body)?;
    if let Some(url) = &req.url {
        check_url(gw, url)?;
    }
    let patch = WebhookPatch {
        name: req.name,
        url: req.url,
        enabled: req.enabled,
        events: req.events.as_deref().map(parse_types).transpose()?,
        secret: req.signature_secret,
    };
    let hook = gw
        .registry()
        .with_conn(|c| store::update_webhook(c, id, &patch))?;
    Ok(json(StatusCode::OK, &WebhookBody::from(hook)))
}

/// `DELETE /events/webhooks/{id}`: 204.
pub(crate) fn delete_webhook(gw: &Gateway, id: &str) -> Result<Response<Body>> {
    let id = webhook_id(id)?;
    gw.registry().with_conn(|c| store::delete_webhook(c, id))?;
    Ok(crate::api::empty(StatusCode::NO_CONTENT))
}

/// One logged attempt.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct AttemptBody {
    /// The attempt, as sent in `e2b-delivery-id`.
    id: Uuid,
    /// The outbox row: what `POST /events/webhooks/deliveries/{deliveryId}/replay` takes.
    delivery_id: i64,
    webhook_id: Uuid,
    event_id: Uuid,
    event_type: EventType,
    timestamp: String,
    status_code: Option<u16>,
    latency_ms: u64,
    error: Option<String>,
    outcome: String,
}

impl From<DeliveryAttempt> for AttemptBody {
    fn from(a: DeliveryAttempt) -> Self {
        AttemptBody {
            id: a.id,
            delivery_id: a.delivery_id,
            webhook_id: a.webhook_id,
            event_id: a.event_id,
            event_type: a.event_type,
            timestamp: format_millis(a.at.0),
            status_code: a.status,
            latency_ms: u64::try_from(a.latency.as_millis()).unwrap_or(u64::MAX),
            error: a.error,
            outcome: a.outcome,
        }
    }
}

/// `GET /events/webhooks/deliveries` (every webhook) and `GET /events/webhooks/{id}/deliveries`:
/// logged attempts, newest first, with `limit` (default 10, 1..100) and `offset`.
pub(crate) fn deliveries(gw: &Gateway, id: Option<&str>, raw: &str) -> Result<Response<Body>> {
    let mut q = DeliveryQuery::default();
    if let Some(id) = id {
        let id = webhook_id(id)?;
        gw.registry().with_conn(|c| store::get_webhook(c, id))?;
        q.webhook_id = Some(id);
    }
    for (k, v) in pairs(raw).map_err(|e| ApiError::bad_request(e.to_string()))? {
        match k.as_str() {
            "limit" => q.limit = Some(v.parse().map_err(|_| bad_param(&k, &v))?),
            "offset" => q.offset = v.parse().map_err(|_| bad_param(&k, &v))?,
            _ => {}
        }
    }
    let attempts = gw.registry().with_conn(|c| store::list_deliveries(c, &q))?;
    let body: Vec<AttemptBody> = attempts.into_iter().map(AttemptBody::from).collect();
    Ok(json(StatusCode::OK, &body))
}

/// `POST /events/webhooks/deliveries/{deliveryId}/replay`: sends that delivery again now,
/// with a fresh retry budget and the same event id; 202.
pub(crate) fn replay_delivery(gw: &Gateway, delivery_id: &str) -> Result<Response<Body>> {
    let id: i64 = delivery_id.parse().map_err(|_| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("delivery {delivery_id:?} not found"),
        )
    })?;
    gw.registry()
        .with_conn(|c| store::replay_delivery(c, id, now()))?;
    gw.wake_dispatcher();
    Ok(json(
        StatusCode::ACCEPTED,
        &serde_json::json!({ "deliveryId": id }),
    ))
}

/// `{"since": RFC 3339}` for the replay of everything since a time.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReplayBody {
    since: Option<String>,
    webhook_id: Option<String>,
}

/// `POST /events/webhooks/replay` (every enabled webhook, or `webhookId`) and
/// `POST /events/webhooks/{id}/replay`: re-enqueues every event recorded at or after `since`
/// for the webhooks subscribed to its type; 202 with `{"queued": n}`.
pub(crate) fn replay_since(gw: &Gateway, id: Option<&str>, body: &Bytes) -> Result<Response<Body>> {
    let req: ReplayBody = parse(body)?;
    let since = required("since", req.since)?;
    let since = parse_millis(&since)
        .ok_or_else(|| ApiError::bad_request(format!("since {since:?} is not an RFC 3339 time")))?;
    let hook = match id.or(req.webhook_id.as_deref()) {
        Some(id) => {
            let id = webhook_id(id)?;
            gw.registry().with_conn(|c| store::get_webhook(c, id))?;
            Some(id)
        }
        None => None,
    };
    let queued = gw
        .registry()
        .with_conn(|c| store::replay_since(c, Millis(since), hook, now()))?;
    gw.wake_dispatcher();
    Ok(json(
        StatusCode::ACCEPTED,
        &serde_json::json!({ "queued": queued }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_may_repeat_or_be_comma_separated() {
        let q = event_query(
            "types=sandbox.lifecycle.created,sandbox.lifecycle.killed&types=sandbox.lifecycle.paused&limit=5&orderAsc=true",
            Some("abc"),
        )
        .unwrap();
        assert_eq!(
            q.types,
            [EventType::Created, EventType::Killed, EventType::Paused]
        );
        assert_eq!(q.limit, Some(5));
        assert!(q.order_asc);
        assert_eq!(q.sandbox_id.as_deref(), Some("abc"));
        let e = event_query("types=sandbox.exploded", None).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("sandbox.exploded"), "{}", e.message);
        assert_eq!(
            event_query("limit=ten", None).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }
}
