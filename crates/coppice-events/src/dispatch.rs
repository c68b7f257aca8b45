//! The dispatcher: a tokio task that drains the outbox into signed HTTP POSTs.
//!
//! [`Dispatcher::run`] clears leases a crash left ([`store::recover`]), then loops: claim due
//! deliveries, start one task per claim, and wait for a [`Waker`] poke, a finished attempt or
//! the poll interval. Each webhook has its own concurrency cap (a semaphore, and webhooks at
//! the cap are skipped when claiming), so a slow receiver only ever holds its own slots and
//! never delays another webhook. [`attempt`] makes one attempt: parse the URL, resolve it
//! through the [`Guard`] and connect to exactly the address the guard approved, POST with
//! the format's headers, and report the status, `Retry-After`, latency or error, all within
//! the policy's per-attempt timeout.
//!
//! Plain `http` only for now: `https` URLs fail each attempt with an "unsupported" error,
//! because the workspace has no TLS stack yet (rustls on ring is the intended one; openssl is
//! banned by deny.toml).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use coppice_lifecycle::state::Millis;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use rusqlite::Connection;
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::guard::{Guard, GuardError, Scheme, WebhookUrl};
use crate::retry::{self, RetryPolicy};
use crate::sign;
use crate::store::{self, AttemptResult, Claim, ClaimRequest, StoreError};

/// How the dispatcher behaves.
#[derive(Debug, Clone)]
pub struct Config {
    /// Retry schedule and per-attempt timeout.
    pub policy: RetryPolicy,
    /// Which destinations are allowed.
    pub guard: Guard,
    /// Attempts in flight per webhook at most.
    pub per_webhook: usize,
    /// Attempts in flight overall at most.
    pub max_in_flight: usize,
    /// How often to look for due retries when nothing wakes the dispatcher.
    pub poll: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            policy: RetryPolicy::e2b(),
            guard: Guard::default(),
            per_webhook: 4,
            max_in_flight: 256,
            poll: Duration::from_millis(500),
        }
    }
}

/// Pokes the dispatcher to look at the outbox now (call after committing an event).
#[derive(Debug, Clone)]
pub struct Waker(Arc<Notify>);

impl Waker {
    /// Wakes the dispatcher; cheap, and coalesces with pokes it has not seen yet.
    pub fn wake(&self) {
        self.0.notify_one();
    }
}

/// Why the dispatcher stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DispatchError {
    /// The outbox could not be read or recovered.
    #[error("dispatcher: {op}")]
    Store {
        /// What it was doing.
        op: &'static str,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// A blocking database task panicked or was cancelled.
    #[error("dispatcher: database task failed")]
    Join(#[source] tokio::task::JoinError),
}

/// Drains the outbox of one database. Run exactly one per database.
#[derive(Debug)]
pub struct Dispatcher {
    conn: Arc<Mutex<Connection>>,
    config: Arc<Config>,
    wake: Arc<Notify>,
}

impl Dispatcher {
    /// A dispatcher working on `conn`, its own connection to the gateway's database (WAL lets
    /// it run beside the gateway's connection).
    pub fn new(conn: Connection, config: Config) -> Self {
        Dispatcher {
            conn: Arc::new(Mutex::new(conn)),
            config: Arc::new(config),
            wake: Arc::new(Notify::new()),
        }
    }

    /// A handle that wakes this dispatcher.
    pub fn waker(&self) -> Waker {
        Waker(self.wake.clone())
    }

    /// Runs until `shutdown` completes. Attempts still in flight then are abandoned with
    /// their leases, and made again after the next start.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), DispatchError> {
        tokio::pin!(shutdown);
        let recovered = self
            .db(store::recover)
            .await?
            .map_err(|source| DispatchError::Store {
                op: "recover leases",
                source,
            })?;
        if recovered > 0 {
            tracing::info!(recovered, "retrying webhook attempts cut off by a restart");
        }
        let cfg = self.config.clone();
        let per_webhook = cfg.per_webhook.max(1);
        // A claim may wait for its webhook's slot behind `per_webhook` others before its own
        // attempt; the lease covers that so no other claim takes it meanwhile.
        let lease = cfg.policy.attempt_timeout * 3 + Duration::from_secs(30);
        let mut in_flight: HashMap<Uuid, usize> = HashMap::new();
        let mut slots: HashMap<Uuid, Arc<Semaphore>> = HashMap::new();
        let mut tasks: JoinSet<Uuid> = JoinSet::new();
        loop {
            let room = cfg.max_in_flight.saturating_sub(tasks.len());
            let mut claimed = 0;
            if room > 0 {
                let skip: Vec<Uuid> = in_flight
                    .iter()
                    .filter(|(_, n)| **n >= per_webhook)
                    .map(|(id, _)| *id)
                    .collect();
                let now = now_millis();
                let claims = self
                    .db(move |c| {
                        store::claim_due(
                            c,
                            &ClaimRequest {
                                now,
                                limit: room,
                                per_webhook,
                                lease,
                                skip: &skip,
                            },
                        )
                    })
                    .await?;
                let claims = match claims {
                    Ok(c) => c,
                    Err(e) => {
                        // A busy or failing database: try again on the next round.
                        tracing::warn!(error = %e, "claiming webhook deliveries failed");
                        Vec::new()
                    }
                };
                claimed = claims.len();
                for claim in claims {
                    let id = claim.target.webhook_id;
                    *in_flight.entry(id).or_default() += 1;
                    let slot = slots
                        .entry(id)
                        .or_insert_with(|| Arc::new(Semaphore::new(per_webhook)))
                        .clone();
                    let conn = self.conn.clone();
                    let cfg = cfg.clone();
                    tasks.spawn(async move {
                        // The semaphore is never closed, so acquiring only waits.
                        let _permit = slot.acquire_owned().await;
                        let result = attempt(&claim, &cfg.guard, cfg.policy.attempt_timeout).await;
                        settle(conn, claim, result, cfg.policy.clone()).await;
                        id
                    });
                }
            }
            if claimed > 0 && claimed == room {
                // A full batch: there may be more due right now.
                continue;
            }
            tokio::select! {
                () = &mut shutdown => break,
                () = self.wake.notified() => {}
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Ok(id) = done {
                        release(&mut in_flight, &mut slots, id);
                    }
                    while let Some(done) = tasks.try_join_next() {
                        if let Ok(id) = done {
                            release(&mut in_flight, &mut slots, id);
                        }
                    }
                }
                () = tokio::time::sleep(cfg.poll) => {}
            }
        }
        tasks.abort_all();
        Ok(())
    }

    async fn db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> T + Send + 'static,
    ) -> Result<T, DispatchError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || f(&lock(&conn)))
            .await
            .map_err(DispatchError::Join)
    }
}

fn release(
    in_flight: &mut HashMap<Uuid, usize>,
    slots: &mut HashMap<Uuid, Arc<Semaphore>>,
    id: Uuid,
) {
    if let Some(n) = in_flight.get_mut(&id) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            in_flight.remove(&id);
            slots.remove(&id);
        }
    }
}

fn lock(conn: &Mutex<Connection>) -> std::sync::MutexGuard<'_, Connection> {
    // SQLite rolls back whatever a panicking holder left open, so a poisoned lock is usable.
    conn.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn settle(
    conn: Arc<Mutex<Connection>>,
    claim: Claim,
    result: AttemptResult,
    policy: RetryPolicy,
) {
    let outcome = tokio::task::spawn_blocking(move || {
        let r = store::finish_attempt(&lock(&conn), &claim, &result, &policy);
        (claim, result, r)
    })
    .await;
    match outcome {
        Ok((claim, result, Ok(outcome))) => tracing::debug!(
            webhook = %claim.target.webhook_id,
            event = %claim.event_id,
            attempt = claim.attempt,
            status = ?result.status,
            error = ?result.error,
            ?outcome,
            "webhook attempt"
        ),
        // The lease runs out and the attempt is made again: at least once.
        Ok((claim, _, Err(e))) => tracing::warn!(
            webhook = %claim.target.webhook_id,
            event = %claim.event_id,
            error = %e,
            "recording a webhook attempt failed"
        ),
        Err(e) => tracing::warn!(error = %e, "recording a webhook attempt panicked"),
    }
}

/// Why an attempt got no response.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("refused by the webhook guard")]
    Guard(#[source] GuardError),
    #[error("https delivery is not supported yet (no TLS stack is built in)")]
    HttpsUnsupported,
    #[error("connect to {addr}")]
    Connect {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("http request")]
    Http(#[source] hyper::Error),
    #[error("connection closed before a response")]
    ClosedEarly,
    #[error("build request")]
    Request(#[source] http::Error),
}

/// Makes one attempt for `claim`: resolve through `guard`, connect to the approved address,
/// POST, and report, all within `timeout`.
pub async fn attempt(claim: &Claim, guard: &Guard, timeout: Duration) -> AttemptResult {
    let at = now_millis();
    let started = Instant::now();
    let result = tokio::time::timeout(timeout, send(claim, guard)).await;
    let latency = started.elapsed();
    let (status, retry_after, error) = match result {
        Ok(Ok((status, retry_after))) => (Some(status), retry_after, None),
        Ok(Err(e)) => (None, None, Some(chain(&e))),
        Err(_) => (
            None,
            None,
            Some(format!("timed out after {} ms", timeout.as_millis())),
        ),
    };
    AttemptResult {
        at,
        status,
        latency,
        error,
        retry_after,
    }
}

async fn send(claim: &Claim, guard: &Guard) -> Result<(u16, Option<Duration>), AttemptError> {
    let url = WebhookUrl::parse(&claim.target.url).map_err(AttemptError::Guard)?;
    if url.scheme == Scheme::Https {
        return Err(AttemptError::HttpsUnsupported);
    }
    let addr = guard.resolve(&url).await.map_err(AttemptError::Guard)?;
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|source| AttemptError::Connect { addr, source })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(AttemptError::Http)?;

    let timestamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let delivery_id = claim.attempt_id.to_string();
    let webhook_id = claim.target.webhook_id.to_string();
    let event_id = claim.event_id.to_string();
    let mut req = http::Request::post(url.path_and_query.as_str())
        .header(http::header::HOST, url.authority.as_str())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(
            http::header::USER_AGENT,
            concat!("coppice-webhooks/", env!("CARGO_PKG_VERSION")),
        );
    let signed = sign::Attempt {
        webhook_id: &webhook_id,
        delivery_id: &delivery_id,
        event_id: &event_id,
        timestamp,
        body: claim.body.as_bytes(),
        secret: &claim.target.secret,
    };
    for (name, value) in sign::headers(claim.target.format, &signed) {
        req = req.header(name, value);
    }
    let req = req
        .body(Full::new(Bytes::from(claim.body.clone())))
        .map_err(AttemptError::Request)?;

    // Drive the connection alongside the request; once the response head is in, the body
    // is not needed and dropping both closes the connection.
    tokio::pin!(conn);
    let response = tokio::select! {
        r = sender.send_request(req) => r.map_err(AttemptError::Http)?,
        r = &mut conn => {
            r.map_err(AttemptError::Http)?;
            return Err(AttemptError::ClosedEarly);
        }
    };
    let retry_after = response
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| retry::parse_retry_after(v, SystemTime::now()));
    Ok((response.status().as_u16(), retry_after))
}

/// An error and its sources as one line, for the attempt log.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

fn now_millis() -> Millis {
    Millis(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    )
}
