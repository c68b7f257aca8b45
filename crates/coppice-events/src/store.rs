//! The durable side: events, webhooks, the delivery outbox and the attempt log, in SQLite.
//!
//! Every function takes the caller's `&Connection`; a `&rusqlite::Transaction` derefs to one.
//! **The transaction rule:** the gateway calls [`record`] inside the same transaction as the
//! registry change the event describes, so the log is exactly what the gateway did — a
//! rolled-back change leaves no event, a committed one always has its event and its outbox
//! rows. Functions that write several rows wrap them in a savepoint, so they are atomic on
//! their own too.
//!
//! The outbox is `webhook_deliveries`: one row per (webhook, event), `pending` until it is
//! `delivered` or `failed`. [`claim_due`] leases due rows to a dispatcher; [`finish_attempt`]
//! logs the attempt in `webhook_attempts` and settles or reschedules the row. A lease that a
//! crash left behind is cleared by [`recover`] at start-up (one dispatcher per database), so
//! the attempt is made again — at least once, always with the original event id.

use std::time::Duration;

use coppice_lifecycle::state::Millis;
use rusqlite::{params, Connection, Row};
use uuid::Uuid;

use crate::event::{Event, EventType};
use crate::guard::WebhookUrl;
use crate::retry::{self, RetryPolicy, Verdict};
use crate::sign::Format;

/// Store failures. `Invalid` is the caller's fault (HTTP 400), `NotFound` is 404.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A field of a webhook or query is not acceptable.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field, as E2B names it (`url`, `events`, ...).
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// No such webhook or delivery.
    #[error("{what} {id} not found")]
    NotFound {
        /// `webhook` or `delivery`.
        what: &'static str,
        /// The id asked for.
        id: String,
    },
    /// The event id is already recorded.
    #[error("event {id} is already recorded")]
    Duplicate {
        /// The event id.
        id: Uuid,
    },
    /// SQLite failed.
    #[error("events store: {op}")]
    Sql {
        /// What we were doing.
        op: &'static str,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// A stored row does not decode (written by a newer version, or damaged).
    #[error("events store: decode {what}")]
    Corrupt {
        /// The column.
        what: &'static str,
    },
}

fn sql(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sql { op, source }
}

/// Creates the tables if needed. Idempotent; call at start-up on the gateway's database.
pub fn migrate(conn: &Connection) -> Result<(), StoreError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            type TEXT NOT NULL,
            sandbox_id TEXT NOT NULL,
            ts INTEGER NOT NULL,
            body TEXT NOT NULL
        );
        CREATE INDEX IF NOT EXISTS events_by_sandbox ON events (sandbox_id, seq);
        CREATE INDEX IF NOT EXISTS events_by_ts ON events (ts);
        CREATE TABLE IF NOT EXISTS webhooks (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            url TEXT NOT NULL,
            enabled INTEGER NOT NULL,
            events TEXT NOT NULL,
            secret TEXT NOT NULL,
            format TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            disabled_reason TEXT
        );
        CREATE TABLE IF NOT EXISTS webhook_deliveries (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            webhook_id TEXT NOT NULL,
            event_id TEXT NOT NULL,
            state TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_at INTEGER NOT NULL,
            lease_until INTEGER,
            UNIQUE (webhook_id, event_id)
        );
        CREATE INDEX IF NOT EXISTS webhook_deliveries_due
            ON webhook_deliveries (state, next_at);
        CREATE INDEX IF NOT EXISTS webhook_deliveries_by_event
            ON webhook_deliveries (event_id);
        CREATE INDEX IF NOT EXISTS webhook_deliveries_lane
            ON webhook_deliveries (webhook_id, state, next_at);
        CREATE TABLE IF NOT EXISTS webhook_attempts (
            id TEXT PRIMARY KEY,
            delivery_id INTEGER NOT NULL,
            webhook_id TEXT NOT NULL,
            event_id TEXT NOT NULL,
            event_type TEXT NOT NULL,
            at INTEGER NOT NULL,
            status INTEGER,
            latency_ms INTEGER NOT NULL,
            error TEXT,
            outcome TEXT NOT NULL
        );
        CREATE INDEX IF NOT EXISTS webhook_attempts_by_webhook
            ON webhook_attempts (webhook_id, at);
        CREATE TABLE IF NOT EXISTS event_feeds (
            key TEXT PRIMARY KEY,
            position INTEGER NOT NULL
        );",
    )
    .map_err(sql("create schema"))
}

/// Runs `f` inside a savepoint: atomic alone, and nests inside the caller's transaction.
fn atomically<T>(
    conn: &Connection,
    f: impl FnOnce() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    conn.execute_batch("SAVEPOINT coppice_events")
        .map_err(sql("begin savepoint"))?;
    match f() {
        Ok(v) => {
            conn.execute_batch("RELEASE coppice_events")
                .map_err(sql("release savepoint"))?;
            Ok(v)
        }
        Err(e) => {
            // If the rollback itself fails the connection is unusable anyway; report the
            // original error, which says what went wrong first.
            let _ = conn.execute_batch("ROLLBACK TO coppice_events; RELEASE coppice_events");
            Err(e)
        }
    }
}

fn ms(t: Millis) -> i64 {
    i64::try_from(t.0).unwrap_or(i64::MAX)
}

fn millis(v: i64) -> Millis {
    Millis(u64::try_from(v).unwrap_or(0))
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn uuid_col(row: &Row<'_>, idx: usize, what: &'static str) -> Result<Uuid, StoreError> {
    let s: String = row.get(idx).map_err(sql("read row"))?;
    Uuid::parse_str(&s).map_err(|_| StoreError::Corrupt { what })
}

/// Records `event` and enqueues one delivery per enabled webhook subscribed to its type.
///
/// Call it with the transaction that makes the change the event describes (see the module
/// docs). Returns the event's id. Recording the same id twice is [`StoreError::Duplicate`].
pub fn record(conn: &Connection, event: &Event) -> Result<Uuid, StoreError> {
    let body = event.to_json();
    let id = event.id.to_string();
    atomically(conn, || {
        // Both statements run on every lifecycle change: prepared once per connection.
        let inserted = conn
            .prepare_cached(
                "INSERT INTO events (id, type, sandbox_id, ts, body) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (id) DO NOTHING",
            )
            .and_then(|mut stmt| {
                stmt.execute(params![
                    id,
                    event.event_type.as_str(),
                    event.sandbox_id,
                    ms(event.timestamp),
                    body
                ])
            })
            .map_err(sql("insert event"))?;
        if inserted == 0 {
            return Err(StoreError::Duplicate { id: event.id });
        }
        conn.prepare_cached(
            "INSERT INTO webhook_deliveries (webhook_id, event_id, state, attempts, next_at)
             SELECT w.id, ?1, 'pending', 0, ?3 FROM webhooks w
             WHERE w.enabled = 1
               AND EXISTS (SELECT 1 FROM json_each(w.events) WHERE value = ?2)",
        )
        .and_then(|mut stmt| {
            stmt.execute(params![id, event.event_type.as_str(), ms(event.timestamp)])
        })
        .map_err(sql("enqueue deliveries"))?;
        Ok(event.id)
    })
}

/// How far a feed has been read: 0 for a feed never read.
///
/// A feed is any append-only source of events outside the database (a file a sandbox's
/// agent appends to, a kernel counter), named by the caller's `key`; its position is a byte
/// offset or a counter value, whatever the caller reads it by.
pub fn feed_position(conn: &Connection, key: &str) -> Result<u64, StoreError> {
    let pos: Option<i64> = conn
        .query_row(
            "SELECT position FROM event_feeds WHERE key = ?1",
            params![key],
            |r| r.get(0),
        )
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })
        .map_err(sql("read feed position"))?;
    Ok(pos.map_or(0, |p| u64::try_from(p).unwrap_or(0)))
}

/// Records `events` read from feed `key` and moves the feed to `position`, atomically: each
/// line or counter step of a feed becomes an event exactly once, crash or not.
pub fn record_feed(
    conn: &Connection,
    key: &str,
    position: u64,
    events: &[Event],
) -> Result<(), StoreError> {
    atomically(conn, || {
        for e in events {
            record(conn, e)?;
        }
        conn.execute(
            "INSERT INTO event_feeds (key, position) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET position = excluded.position",
            params![key, i64::try_from(position).unwrap_or(i64::MAX)],
        )
        .map_err(sql("move feed position"))?;
        Ok(())
    })
}

/// Forgets feeds whose source is gone (a removed sandbox's).
pub fn forget_feeds(conn: &Connection, keys: &[&str]) -> Result<(), StoreError> {
    atomically(conn, || {
        for key in keys {
            conn.execute("DELETE FROM event_feeds WHERE key = ?1", params![key])
                .map_err(sql("forget feed"))?;
        }
        Ok(())
    })
}

/// What the events read API asks for (`GET /events/sandboxes[/{id}]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventQuery {
    /// Only this sandbox's events.
    pub sandbox_id: Option<String>,
    /// Page size; default 10, clamped to 1..=100.
    pub limit: Option<u32>,
    /// Events to skip.
    pub offset: u64,
    /// Oldest first (default newest first).
    pub order_asc: bool,
    /// Only these types (empty = all).
    pub types: Vec<EventType>,
}

impl EventQuery {
    /// The page size actually used.
    pub fn effective_limit(&self) -> u32 {
        self.limit.unwrap_or(10).clamp(1, 100)
    }
}

/// Events matching `q`, in recording order (or its reverse).
pub fn list_events(conn: &Connection, q: &EventQuery) -> Result<Vec<Event>, StoreError> {
    let types: Vec<&str> = q.types.iter().map(|t| t.as_str()).collect();
    let types = serde_json::to_string(&types).unwrap_or_else(|_| "[]".into());
    let order = if q.order_asc { "ASC" } else { "DESC" };
    let query = format!(
        "SELECT body FROM events
         WHERE (?1 IS NULL OR sandbox_id = ?1)
           AND (?2 = '[]' OR type IN (SELECT value FROM json_each(?2)))
         ORDER BY seq {order} LIMIT ?3 OFFSET ?4"
    );
    let mut stmt = conn.prepare_cached(&query).map_err(sql("list events"))?;
    let rows = stmt
        .query_map(
            params![
                q.sandbox_id,
                types,
                q.effective_limit(),
                i64::try_from(q.offset).unwrap_or(i64::MAX)
            ],
            |row| row.get::<_, String>(0),
        )
        .map_err(sql("list events"))?;
    let mut out = Vec::new();
    for body in rows {
        let body = body.map_err(sql("list events"))?;
        out.push(serde_json::from_str(&body).map_err(|_| StoreError::Corrupt { what: "event" })?);
    }
    Ok(out)
}

/// A webhook to create (`POST /events/webhooks`).
#[derive(Clone, PartialEq, Eq)]
pub struct NewWebhook {
    /// Display name, 1 to [`MAX_NAME`] characters.
    pub name: String,
    /// Where to POST; http or https.
    pub url: String,
    /// Whether it receives deliveries.
    pub enabled: bool,
    /// Types it subscribes to; at least one.
    pub events: Vec<EventType>,
    /// The signing secret (`signatureSecret`); never returned.
    pub secret: String,
    /// Payload and signature scheme.
    pub format: Format,
}

impl std::fmt::Debug for NewWebhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewWebhook")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("enabled", &self.enabled)
            .field("events", &self.events)
            .field("secret", &"<redacted>")
            .field("format", &self.format)
            .finish()
    }
}

/// Changes to a webhook (`PATCH /events/webhooks/{id}`); `None` leaves a field as it is.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct WebhookPatch {
    /// New name.
    pub name: Option<String>,
    /// New URL.
    pub url: Option<String>,
    /// Enable or disable. Enabling clears [`Webhook::disabled_reason`].
    pub enabled: Option<bool>,
    /// New subscription.
    pub events: Option<Vec<EventType>>,
    /// New secret.
    pub secret: Option<String>,
}

impl std::fmt::Debug for WebhookPatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookPatch")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("enabled", &self.enabled)
            .field("events", &self.events)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// A webhook as the API shows it: everything but the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    /// Its id.
    pub id: Uuid,
    /// Display name.
    pub name: String,
    /// Where deliveries go.
    pub url: String,
    /// Whether it receives deliveries.
    pub enabled: bool,
    /// Subscribed types.
    pub events: Vec<EventType>,
    /// Payload and signature scheme.
    pub format: Format,
    /// When it was created.
    pub created_at: Millis,
    /// Why delivery disabled it (a 410 answer), if it did.
    pub disabled_reason: Option<String>,
}

/// Longest webhook name accepted.
pub const MAX_NAME: usize = 256;
/// Longest secret accepted, in bytes.
pub const MAX_SECRET: usize = 1024;

fn validate_name(name: &str) -> Result<(), StoreError> {
    let n = name.trim().chars().count();
    if n == 0 || name.chars().count() > MAX_NAME {
        return Err(StoreError::Invalid {
            field: "name",
            reason: format!("must be 1 to {MAX_NAME} characters"),
        });
    }
    Ok(())
}

fn validate_url(url: &str) -> Result<(), StoreError> {
    WebhookUrl::parse(url)
        .map(|_| ())
        .map_err(|e| StoreError::Invalid {
            field: "url",
            reason: e.to_string(),
        })
}

fn validate_events(events: &[EventType]) -> Result<String, StoreError> {
    if events.is_empty() {
        return Err(StoreError::Invalid {
            field: "events",
            reason: "subscribe to at least one event type".into(),
        });
    }
    let mut names: Vec<&str> = events.iter().map(|t| t.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    Ok(serde_json::to_string(&names).unwrap_or_else(|_| "[]".into()))
}

fn validate_secret(secret: &str) -> Result<(), StoreError> {
    if secret.is_empty() || secret.len() > MAX_SECRET {
        return Err(StoreError::Invalid {
            field: "signatureSecret",
            reason: format!("must be 1 to {MAX_SECRET} bytes"),
        });
    }
    Ok(())
}

/// Creates a webhook after validating every field.
pub fn create_webhook(
    conn: &Connection,
    new: &NewWebhook,
    now: Millis,
) -> Result<Webhook, StoreError> {
    validate_name(&new.name)?;
    validate_url(&new.url)?;
    let events = validate_events(&new.events)?;
    validate_secret(&new.secret)?;
    let id = Uuid::new_v4();
    conn.execute(
        "INSERT INTO webhooks (id, name, url, enabled, events, secret, format, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            id.to_string(),
            new.name,
            new.url,
            new.enabled,
            events,
            new.secret,
            new.format.as_str(),
            ms(now)
        ],
    )
    .map_err(sql("insert webhook"))?;
    get_webhook(conn, id)
}

const WEBHOOK_COLUMNS: &str = "id, name, url, enabled, events, format, created_at, disabled_reason";

fn webhook_from_row(row: &Row<'_>) -> Result<Webhook, StoreError> {
    let events: String = row.get(4).map_err(sql("read webhook"))?;
    let events: Vec<EventType> =
        serde_json::from_str(&events).map_err(|_| StoreError::Corrupt { what: "events" })?;
    let format: String = row.get(5).map_err(sql("read webhook"))?;
    Ok(Webhook {
        id: uuid_col(row, 0, "webhook id")?,
        name: row.get(1).map_err(sql("read webhook"))?,
        url: row.get(2).map_err(sql("read webhook"))?,
        enabled: row.get(3).map_err(sql("read webhook"))?,
        events,
        format: Format::parse(&format).ok_or(StoreError::Corrupt { what: "format" })?,
        created_at: millis(row.get(6).map_err(sql("read webhook"))?),
        disabled_reason: row.get(7).map_err(sql("read webhook"))?,
    })
}

/// One webhook.
pub fn get_webhook(conn: &Connection, id: Uuid) -> Result<Webhook, StoreError> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE id = ?1"
        ))
        .map_err(sql("read webhook"))?;
    let mut rows = stmt
        .query(params![id.to_string()])
        .map_err(sql("read webhook"))?;
    match rows.next().map_err(sql("read webhook"))? {
        Some(row) => webhook_from_row(row),
        None => Err(StoreError::NotFound {
            what: "webhook",
            id: id.to_string(),
        }),
    }
}

/// Every webhook, oldest first.
pub fn list_webhooks(conn: &Connection) -> Result<Vec<Webhook>, StoreError> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {WEBHOOK_COLUMNS} FROM webhooks ORDER BY created_at, id"
        ))
        .map_err(sql("list webhooks"))?;
    let mut rows = stmt.query([]).map_err(sql("list webhooks"))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(sql("list webhooks"))? {
        out.push(webhook_from_row(row)?);
    }
    Ok(out)
}

/// Applies `patch` and returns the result.
pub fn update_webhook(
    conn: &Connection,
    id: Uuid,
    patch: &WebhookPatch,
) -> Result<Webhook, StoreError> {
    if let Some(name) = &patch.name {
        validate_name(name)?;
    }
    if let Some(url) = &patch.url {
        validate_url(url)?;
    }
    let events = patch.events.as_deref().map(validate_events).transpose()?;
    if let Some(secret) = &patch.secret {
        validate_secret(secret)?;
    }
    let changed = conn
        .execute(
            "UPDATE webhooks SET
                name = COALESCE(?2, name),
                url = COALESCE(?3, url),
                enabled = COALESCE(?4, enabled),
                events = COALESCE(?5, events),
                secret = COALESCE(?6, secret),
                disabled_reason = CASE WHEN ?4 = 1 THEN NULL ELSE disabled_reason END
             WHERE id = ?1",
            params![
                id.to_string(),
                patch.name,
                patch.url,
                patch.enabled,
                events,
                patch.secret
            ],
        )
        .map_err(sql("update webhook"))?;
    if changed == 0 {
        return Err(StoreError::NotFound {
            what: "webhook",
            id: id.to_string(),
        });
    }
    get_webhook(conn, id)
}

/// Deletes a webhook with its outbox rows and attempt log.
pub fn delete_webhook(conn: &Connection, id: Uuid) -> Result<(), StoreError> {
    let id_s = id.to_string();
    atomically(conn, || {
        let n = conn
            .execute("DELETE FROM webhooks WHERE id = ?1", params![id_s])
            .map_err(sql("delete webhook"))?;
        if n == 0 {
            return Err(StoreError::NotFound {
                what: "webhook",
                id: id_s.clone(),
            });
        }
        conn.execute(
            "DELETE FROM webhook_deliveries WHERE webhook_id = ?1",
            params![id_s],
        )
        .map_err(sql("delete deliveries"))?;
        conn.execute(
            "DELETE FROM webhook_attempts WHERE webhook_id = ?1",
            params![id_s],
        )
        .map_err(sql("delete attempts"))?;
        Ok(())
    })
}

/// Where and how one claimed delivery goes.
#[derive(Clone, PartialEq, Eq)]
pub struct Target {
    /// The webhook's id.
    pub webhook_id: Uuid,
    /// Its URL.
    pub url: String,
    /// Its secret.
    pub secret: String,
    /// Its format.
    pub format: Format,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("webhook_id", &self.webhook_id)
            .field("url", &self.url)
            .field("secret", &"<redacted>")
            .field("format", &self.format)
            .finish()
    }
}

/// A delivery leased to a dispatcher for one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The outbox row.
    pub delivery_id: i64,
    /// This attempt's id, new per attempt (`e2b-delivery-id`).
    pub attempt_id: Uuid,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// The destination.
    pub target: Target,
    /// The event's id (`webhook-id`).
    pub event_id: Uuid,
    /// The event's type.
    pub event_type: EventType,
    /// The exact body to POST, in the target's format.
    pub body: String,
}

/// What [`claim_due`] should take.
#[derive(Debug, Clone)]
pub struct ClaimRequest<'a> {
    /// Now.
    pub now: Millis,
    /// At most this many claims.
    pub limit: usize,
    /// At most this many held per webhook, so one webhook's backlog cannot fill a batch.
    pub per_webhook: usize,
    /// How long the claims are held before another claim may take them again.
    pub lease: Duration,
    /// Claims the caller already holds, per webhook: a webhook gets at most `per_webhook`
    /// minus what it holds (nothing once it holds `per_webhook`, e.g. a busy receiver).
    pub held: &'a [(Uuid, usize)],
}

/// Leases due deliveries of enabled webhooks, earliest first.
///
/// Each webhook's due rows are read through the `(webhook_id, state, next_at)` index with a
/// limit, so a claim costs the same whatever the size of the backlog.
pub fn claim_due(conn: &Connection, req: &ClaimRequest<'_>) -> Result<Vec<Claim>, StoreError> {
    if req.limit == 0 {
        return Ok(Vec::new());
    }
    let now = ms(req.now);
    atomically(conn, || {
        let hooks: Vec<(String, String, String, String)> = {
            let mut stmt = conn
                .prepare_cached("SELECT id, url, secret, format FROM webhooks WHERE enabled = 1")
                .map_err(sql("claim deliveries"))?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .map_err(sql("claim deliveries"))?;
            rows.collect::<Result<_, _>>()
                .map_err(sql("claim deliveries"))?
        };
        // (next_at, delivery id, webhook index, event id, attempts, body)
        let mut due: Vec<(i64, i64, usize, String, u32, Option<String>)> = Vec::new();
        let mut stmt = conn
            .prepare_cached(
                "SELECT d.next_at, d.id, d.event_id, d.attempts, e.body
                 FROM webhook_deliveries d LEFT JOIN events e ON e.id = d.event_id
                 WHERE d.webhook_id = ?1 AND d.state = 'pending' AND d.next_at <= ?2
                   AND (d.lease_until IS NULL OR d.lease_until <= ?2)
                 ORDER BY d.next_at, d.id LIMIT ?3",
            )
            .map_err(sql("claim deliveries"))?;
        for (i, (id, ..)) in hooks.iter().enumerate() {
            let held = req
                .held
                .iter()
                .filter(|(w, _)| w.to_string() == *id)
                .map(|(_, n)| *n)
                .sum::<usize>();
            let room = req.per_webhook.saturating_sub(held).min(req.limit);
            if room == 0 {
                continue;
            }
            let rows = stmt
                .query_map(
                    params![id, now, i64::try_from(room).unwrap_or(i64::MAX)],
                    |r| Ok((r.get(0)?, r.get(1)?, i, r.get(2)?, r.get(3)?, r.get(4)?)),
                )
                .map_err(sql("claim deliveries"))?;
            for row in rows {
                due.push(row.map_err(sql("claim deliveries"))?);
            }
        }
        due.sort_unstable_by_key(|d| (d.0, d.1));
        due.truncate(req.limit);
        let until = ms(req.now.plus(req.lease));
        let mut lease = conn
            .prepare_cached("UPDATE webhook_deliveries SET lease_until = ?2 WHERE id = ?1")
            .map_err(sql("lease delivery"))?;
        let mut orphan = conn
            .prepare_cached(
                "UPDATE webhook_deliveries SET state = 'failed', lease_until = NULL WHERE id = ?1",
            )
            .map_err(sql("drop orphan delivery"))?;
        let mut claims = Vec::with_capacity(due.len());
        for (_, delivery_id, hook, _, attempts, body) in due {
            let Some(body) = body else {
                // Retention removed the event; there is nothing left to send.
                orphan
                    .execute(params![delivery_id])
                    .map_err(sql("drop orphan delivery"))?;
                continue;
            };
            lease
                .execute(params![delivery_id, until])
                .map_err(sql("lease delivery"))?;
            let (webhook_id, url, secret, format) = &hooks[hook];
            let event: Event =
                serde_json::from_str(&body).map_err(|_| StoreError::Corrupt { what: "event" })?;
            let format = Format::parse(format).ok_or(StoreError::Corrupt { what: "format" })?;
            claims.push(Claim {
                delivery_id,
                attempt_id: Uuid::new_v4(),
                attempt: attempts.saturating_add(1),
                target: Target {
                    webhook_id: Uuid::parse_str(webhook_id)
                        .map_err(|_| StoreError::Corrupt { what: "webhook id" })?,
                    url: url.clone(),
                    secret: secret.clone(),
                    format,
                },
                event_id: event.id,
                event_type: event.event_type,
                body: match format {
                    // The stored bytes, so every attempt signs and sends the same body.
                    Format::E2b => body,
                    Format::Sandforge => event.to_sandforge_json(),
                },
            });
        }
        Ok(claims)
    })
}

/// Gives claims back unattempted (their webhook went away meanwhile): each is due again at
/// `now`, with no attempt counted.
pub fn release(conn: &Connection, delivery_ids: &[i64], now: Millis) -> Result<(), StoreError> {
    atomically(conn, || {
        let mut stmt = conn
            .prepare_cached(
                "UPDATE webhook_deliveries SET lease_until = NULL, next_at = ?2
                 WHERE id = ?1 AND state = 'pending'",
            )
            .map_err(sql("release delivery"))?;
        for id in delivery_ids {
            stmt.execute(params![id, ms(now)])
                .map_err(sql("release delivery"))?;
        }
        Ok(())
    })
}

/// Clears every lease: run once at start-up, before the dispatcher, so attempts a crash cut
/// off are made again. Returns how many were cleared.
pub fn recover(conn: &Connection) -> Result<usize, StoreError> {
    conn.execute(
        "UPDATE webhook_deliveries SET lease_until = NULL
         WHERE state = 'pending' AND lease_until IS NOT NULL",
        [],
    )
    .map_err(sql("clear leases"))
}

/// How one attempt went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptResult {
    /// When it started.
    pub at: Millis,
    /// The response status, if a response came.
    pub status: Option<u16>,
    /// From start to response head (or failure).
    pub latency: Duration,
    /// Why there was no response (connect, timeout, guard, ...).
    pub error: Option<String>,
    /// The response's `Retry-After`, parsed.
    pub retry_after: Option<Duration>,
}

/// What became of a delivery after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted with a 2xx.
    Delivered,
    /// Will be tried again at this time.
    Retrying {
        /// When.
        next_at: Millis,
    },
    /// Retries used up.
    Failed,
    /// The receiver answered 410; the webhook is now disabled.
    Disabled,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Retrying { .. } => "retrying",
            Outcome::Failed => "failed",
            Outcome::Disabled => "disabled",
        }
    }
}

/// Logs the attempt and settles or reschedules the delivery by `policy`.
pub fn finish_attempt(
    conn: &Connection,
    claim: &Claim,
    result: &AttemptResult,
    policy: &RetryPolicy,
) -> Result<Outcome, StoreError> {
    let verdict = result.status.map_or(Verdict::Retry, retry::classify);
    let end = result.at.plus(result.latency);
    let outcome = match verdict {
        Verdict::Delivered => Outcome::Delivered,
        Verdict::Gone => Outcome::Disabled,
        Verdict::Retry => {
            match policy.next_delay(claim.attempt, result.retry_after, retry::jitter_sample()) {
                Some(d) => Outcome::Retrying {
                    next_at: end.plus(d),
                },
                None => Outcome::Failed,
            }
        }
    };
    atomically(conn, || {
        conn.execute(
            "INSERT INTO webhook_attempts
                (id, delivery_id, webhook_id, event_id, event_type, at, status, latency_ms,
                 error, outcome)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                claim.attempt_id.to_string(),
                claim.delivery_id,
                claim.target.webhook_id.to_string(),
                claim.event_id.to_string(),
                claim.event_type.as_str(),
                ms(result.at),
                result.status,
                duration_ms(result.latency),
                result.error,
                outcome.as_str()
            ],
        )
        .map_err(sql("log attempt"))?;
        let (state, next_at) = match outcome {
            Outcome::Retrying { next_at } => ("pending", next_at),
            Outcome::Delivered => ("delivered", end),
            Outcome::Failed | Outcome::Disabled => ("failed", end),
        };
        conn.execute(
            "UPDATE webhook_deliveries
             SET state = ?2, attempts = ?3, next_at = ?4, lease_until = NULL WHERE id = ?1",
            params![claim.delivery_id, state, claim.attempt, ms(next_at)],
        )
        .map_err(sql("settle delivery"))?;
        if outcome == Outcome::Disabled {
            conn.execute(
                "UPDATE webhooks SET enabled = 0, disabled_reason = ?2 WHERE id = ?1",
                params![
                    claim.target.webhook_id.to_string(),
                    "the receiver answered 410 Gone"
                ],
            )
            .map_err(sql("disable webhook"))?;
        }
        Ok(outcome)
    })
}

/// What the deliveries log asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryQuery {
    /// Only this webhook's attempts.
    pub webhook_id: Option<Uuid>,
    /// Page size; default 10, clamped to 1..=100.
    pub limit: Option<u32>,
    /// Attempts to skip.
    pub offset: u64,
}

/// One logged attempt (`GET /events/webhooks/deliveries`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryAttempt {
    /// The attempt's id, as sent in `e2b-delivery-id`.
    pub id: Uuid,
    /// The outbox row; pass it to [`replay_delivery`].
    pub delivery_id: i64,
    /// The webhook.
    pub webhook_id: Uuid,
    /// The event.
    pub event_id: Uuid,
    /// The event's type.
    pub event_type: EventType,
    /// When the attempt started.
    pub at: Millis,
    /// The response status, if any.
    pub status: Option<u16>,
    /// How long it took.
    pub latency: Duration,
    /// Why it failed without a response.
    pub error: Option<String>,
    /// `delivered`, `retrying`, `failed` or `disabled`.
    pub outcome: String,
}

/// Logged attempts, newest first.
pub fn list_deliveries(
    conn: &Connection,
    q: &DeliveryQuery,
) -> Result<Vec<DeliveryAttempt>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT id, delivery_id, webhook_id, event_id, event_type, at, status, latency_ms,
                    error, outcome
             FROM webhook_attempts WHERE (?1 IS NULL OR webhook_id = ?1)
             ORDER BY at DESC, rowid DESC LIMIT ?2 OFFSET ?3",
        )
        .map_err(sql("list deliveries"))?;
    let mut rows = stmt
        .query(params![
            q.webhook_id.map(|u| u.to_string()),
            q.limit.unwrap_or(10).clamp(1, 100),
            i64::try_from(q.offset).unwrap_or(i64::MAX)
        ])
        .map_err(sql("list deliveries"))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(sql("list deliveries"))? {
        let event_type: String = row.get(4).map_err(sql("list deliveries"))?;
        let latency: i64 = row.get(7).map_err(sql("list deliveries"))?;
        out.push(DeliveryAttempt {
            id: uuid_col(row, 0, "attempt id")?,
            delivery_id: row.get(1).map_err(sql("list deliveries"))?,
            webhook_id: uuid_col(row, 2, "webhook id")?,
            event_id: uuid_col(row, 3, "event id")?,
            event_type: event_type
                .parse()
                .map_err(|_| StoreError::Corrupt { what: "event type" })?,
            at: millis(row.get(5).map_err(sql("list deliveries"))?),
            status: row.get(6).map_err(sql("list deliveries"))?,
            latency: Duration::from_millis(u64::try_from(latency).unwrap_or(0)),
            error: row.get(8).map_err(sql("list deliveries"))?,
            outcome: row.get(9).map_err(sql("list deliveries"))?,
        });
    }
    Ok(out)
}

/// Where an outbox row stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryState {
    /// Waiting for (another) attempt.
    Pending,
    /// Accepted.
    Delivered,
    /// Given up, or its webhook answered 410.
    Failed,
}

/// One outbox row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Its id.
    pub id: i64,
    /// The webhook.
    pub webhook_id: Uuid,
    /// The event.
    pub event_id: Uuid,
    /// Where it stands.
    pub state: DeliveryState,
    /// Attempts finished so far.
    pub attempts: u32,
    /// When the next attempt is due (pending), or when it settled.
    pub next_at: Millis,
}

/// Outbox rows of `event_id`, one per webhook it was enqueued for.
pub fn deliveries_of(conn: &Connection, event_id: Uuid) -> Result<Vec<Delivery>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT id, webhook_id, event_id, state, attempts, next_at
             FROM webhook_deliveries WHERE event_id = ?1 ORDER BY id",
        )
        .map_err(sql("read deliveries"))?;
    let mut rows = stmt
        .query(params![event_id.to_string()])
        .map_err(sql("read deliveries"))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(sql("read deliveries"))? {
        let state: String = row.get(3).map_err(sql("read deliveries"))?;
        out.push(Delivery {
            id: row.get(0).map_err(sql("read deliveries"))?,
            webhook_id: uuid_col(row, 1, "webhook id")?,
            event_id: uuid_col(row, 2, "event id")?,
            state: match state.as_str() {
                "pending" => DeliveryState::Pending,
                "delivered" => DeliveryState::Delivered,
                "failed" => DeliveryState::Failed,
                _ => return Err(StoreError::Corrupt { what: "state" }),
            },
            attempts: row.get(4).map_err(sql("read deliveries"))?,
            next_at: millis(row.get(5).map_err(sql("read deliveries"))?),
        });
    }
    Ok(out)
}

/// Sends a delivery again from scratch (a fresh retry budget, same event id), now.
pub fn replay_delivery(conn: &Connection, delivery_id: i64, now: Millis) -> Result<(), StoreError> {
    let n = conn
        .execute(
            "UPDATE webhook_deliveries SET state = 'pending', attempts = 0, next_at = ?2
             WHERE id = ?1",
            params![delivery_id, ms(now)],
        )
        .map_err(sql("replay delivery"))?;
    if n == 0 {
        return Err(StoreError::NotFound {
            what: "delivery",
            id: delivery_id.to_string(),
        });
    }
    Ok(())
}

/// Re-enqueues every event recorded at or after `since` for every enabled, subscribed
/// webhook (or only `webhook_id`), including webhooks created after the event. Returns how
/// many deliveries were (re)queued.
pub fn replay_since(
    conn: &Connection,
    since: Millis,
    webhook_id: Option<Uuid>,
    now: Millis,
) -> Result<usize, StoreError> {
    conn.execute(
        "INSERT INTO webhook_deliveries (webhook_id, event_id, state, attempts, next_at)
         SELECT w.id, e.id, 'pending', 0, ?3 FROM events e JOIN webhooks w
         WHERE e.ts >= ?1 AND w.enabled = 1 AND (?2 IS NULL OR w.id = ?2)
           AND EXISTS (SELECT 1 FROM json_each(w.events) WHERE value = e.type)
         ON CONFLICT (webhook_id, event_id) DO UPDATE
         SET state = 'pending', attempts = 0, next_at = excluded.next_at",
        params![ms(since), webhook_id.map(|u| u.to_string()), ms(now)],
    )
    .map_err(sql("replay events"))
}

/// How long events and delivery logs are kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Drop events and attempts older than this.
    pub max_age: Option<Duration>,
    /// Keep at most this many events (the newest).
    pub max_events: Option<u64>,
}

impl Retention {
    /// E2B keeps delivery logs for seven days.
    pub fn e2b() -> Self {
        Retention {
            max_age: Some(Duration::from_secs(7 * 24 * 3600)),
            max_events: None,
        }
    }
}

/// What [`prune`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Events.
    pub events: usize,
    /// Outbox rows.
    pub deliveries: usize,
    /// Logged attempts.
    pub attempts: usize,
}

/// Applies `policy` at `now`. An event still waiting for delivery to an enabled webhook is
/// kept whatever its age, so retention never loses an undelivered event.
pub fn prune(conn: &Connection, policy: &Retention, now: Millis) -> Result<Pruned, StoreError> {
    let cutoff = policy.max_age.map(|age| {
        ms(Millis(now.0.saturating_sub(
            u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
        )))
    });
    let keep = policy
        .max_events
        .map(|n| i64::try_from(n).unwrap_or(i64::MAX));
    atomically(conn, || {
        let events = conn
            .execute(
                "DELETE FROM events
                 WHERE ((?1 IS NOT NULL AND ts < ?1)
                     OR (?2 IS NOT NULL AND seq <= (SELECT seq FROM events
                                                    ORDER BY seq DESC LIMIT 1 OFFSET ?2)))
                   AND NOT EXISTS (
                     SELECT 1 FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id
                     WHERE d.event_id = events.id AND d.state = 'pending' AND w.enabled = 1)",
                params![cutoff, keep],
            )
            .map_err(sql("prune events"))?;
        let deliveries = conn
            .execute(
                "DELETE FROM webhook_deliveries
                 WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.id = event_id)",
                [],
            )
            .map_err(sql("prune deliveries"))?;
        let attempts = conn
            .execute(
                "DELETE FROM webhook_attempts
                 WHERE (?1 IS NOT NULL AND at < ?1)
                    OR NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.id = delivery_id)",
                params![cutoff],
            )
            .map_err(sql("prune attempts"))?;
        Ok(Pruned {
            events,
            deliveries,
            attempts,
        })
    })
}

/// How many outbox rows are in each state, among what retention has kept. These are levels,
/// not running totals (pruning lowers them); the dispatcher counts attempts itself
/// (`dispatch::Stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeliveryStats {
    /// Deliveries waiting for a (further) attempt: the backlog.
    pub pending: u64,
    /// Deliveries a receiver accepted.
    pub delivered: u64,
    /// Deliveries given up on (retries used up, or a 410).
    pub failed: u64,
}

/// Counts the outbox by state.
pub fn delivery_stats(conn: &Connection) -> Result<DeliveryStats, StoreError> {
    let mut stats = DeliveryStats::default();
    let mut stmt = conn
        .prepare_cached("SELECT state, COUNT(*) FROM webhook_deliveries GROUP BY state")
        .map_err(sql("count deliveries"))?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        .map_err(sql("count deliveries"))?;
    for row in rows {
        let (state, n) = row.map_err(sql("count deliveries"))?;
        let n = u64::try_from(n).unwrap_or(0);
        match state.as_str() {
            "pending" => stats.pending = n,
            "delivered" => stats.delivered = n,
            "failed" => stats.failed = n,
            _ => {}
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests;
