//! The dispatcher: a tokio task that drains the outbox into signed HTTP POSTs.
//!
//! [`Dispatcher::run`] clears leases a crash left ([`store::recover`]), then loops: claim due
//! deliveries, start one task per claim, and wait for a [`Waker`] poke, finished attempts or
//! the poll interval. Each webhook is a lane: it holds at most `per_webhook` ×
//! [`QUEUE_PER_SLOT`] claims and sends at most `per_webhook` at once (a semaphore), so a slow
//! receiver only ever holds its own lane and never delays another webhook. Finished attempts
//! go to one settler task that records them in batches, one SQLite transaction per batch, so
//! the database is not the limit at thousands of deliveries per second.
//!
//! Each attempt ([`attempt`]) parses the URL, resolves it through the [`Guard`] and sends to
//! exactly the address the guard approved, on a keep-alive connection pooled per destination
//! (`client`), over TLS for `https` ([`Tls`]); it reports the status, `Retry-After`, latency
//! or error, all within the policy's per-attempt timeout. A 410 from a lane's receiver stops
//! that lane: its queued claims are given back unattempted ([`store::release`]) while the
//! store disables the webhook.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use coppice_lifecycle::state::Millis;
use http_body_util::Full;
use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::client::{Client, Destination, SendError};
use crate::guard::{Guard, GuardError, Host, Scheme, WebhookUrl};
use crate::retry::{self, RetryPolicy};
use crate::sign;
use crate::store::{self, AttemptResult, Claim, ClaimRequest, Outcome, StoreError};
use crate::tls::Tls;

/// Claims a lane may hold per connection slot: enough queued work that a fast receiver never
/// waits for the next claim round, few enough that leases stay short.
pub const QUEUE_PER_SLOT: usize = 16;
/// Finished attempts recorded in one transaction at most.
const SETTLE_BATCH: usize = 512;

/// How the dispatcher behaves.
#[derive(Debug, Clone)]
pub struct Config {
    /// Retry schedule and per-attempt timeout.
    pub policy: RetryPolicy,
    /// Which destinations are allowed.
    pub guard: Guard,
    /// How https receivers are verified.
    pub tls: Tls,
    /// Attempts in flight (connections) per webhook at most.
    pub per_webhook: usize,
    /// Claims held overall at most.
    pub max_in_flight: usize,
    /// How often to look for due retries when nothing wakes the dispatcher.
    pub poll: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            policy: RetryPolicy::e2b(),
            guard: Guard::default(),
            tls: Tls::default(),
            per_webhook: 4,
            max_in_flight: 1024,
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

/// What the dispatcher has done since it was made (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DispatchStats {
    /// Attempts recorded.
    pub attempts: u64,
    /// Deliveries accepted with a 2xx.
    pub delivered: u64,
    /// Attempts that will be retried.
    pub retrying: u64,
    /// Deliveries given up after their last retry.
    pub failed: u64,
    /// Deliveries whose receiver answered 410 (the webhook was disabled).
    pub disabled: u64,
    /// Connections opened (a low number next to `attempts` means keep-alive works).
    pub connections: u64,
}

/// A live view of a dispatcher's counters; cheap to clone.
#[derive(Debug, Clone)]
pub struct Stats {
    counters: Arc<Counters>,
    client: Arc<Client>,
}

impl Stats {
    /// The counters now.
    pub fn snapshot(&self) -> DispatchStats {
        let c = &self.counters;
        DispatchStats {
            attempts: c.attempts.load(Ordering::Relaxed),
            delivered: c.delivered.load(Ordering::Relaxed),
            retrying: c.retrying.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            disabled: c.disabled.load(Ordering::Relaxed),
            connections: self.client.connects(),
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    attempts: AtomicU64,
    delivered: AtomicU64,
    retrying: AtomicU64,
    failed: AtomicU64,
    disabled: AtomicU64,
}

impl Counters {
    fn count(&self, outcome: Outcome) {
        self.attempts.fetch_add(1, Ordering::Relaxed);
        let c = match outcome {
            Outcome::Delivered => &self.delivered,
            Outcome::Retrying { .. } => &self.retrying,
            Outcome::Failed => &self.failed,
            Outcome::Disabled => &self.disabled,
        };
        c.fetch_add(1, Ordering::Relaxed);
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
    client: Arc<Client>,
    counters: Arc<Counters>,
}

/// One webhook's share of the dispatcher.
#[derive(Debug)]
struct Lane {
    /// Claims held (queued or sending).
    held: usize,
    /// Whether the last claim round filled the lane, so more may be due.
    full: bool,
    slots: Arc<Semaphore>,
    /// The receiver answered 410: send nothing more.
    gone: Arc<AtomicBool>,
}

/// What an attempt task hands the settler.
#[derive(Debug)]
enum Settle {
    Finished(Box<Claim>, AttemptResult),
    /// Not attempted (the lane's receiver is gone): give the lease back.
    Release(i64),
}

impl Dispatcher {
    /// A dispatcher working on `conn`, its own connection to the gateway's database (WAL lets
    /// it run beside the gateway's connection; `synchronous=NORMAL` keeps each batch's commit
    /// from waiting for a disk flush).
    pub fn new(conn: Connection, config: Config) -> Self {
        let client = Arc::new(Client::new(config.tls.clone()));
        Dispatcher {
            conn: Arc::new(Mutex::new(conn)),
            config: Arc::new(config),
            wake: Arc::new(Notify::new()),
            client,
            counters: Arc::new(Counters::default()),
        }
    }

    /// A handle that wakes this dispatcher.
    pub fn waker(&self) -> Waker {
        Waker(self.wake.clone())
    }

    /// A live view of this dispatcher's counters.
    pub fn stats(&self) -> Stats {
        Stats {
            counters: self.counters.clone(),
            client: self.client.clone(),
        }
    }

    /// Runs until `shutdown` completes. Finished attempts are recorded before it returns;
    /// attempts still in flight are abandoned with their leases, and made again after the
    /// next start.
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
        let depth = per_webhook * QUEUE_PER_SLOT;
        // A claim may wait behind the rest of its lane before its own attempt; the lease
        // covers that so no other claim takes it meanwhile.
        let lease = cfg.policy.attempt_timeout * u32::try_from(QUEUE_PER_SLOT + 1).unwrap_or(17)
            + Duration::from_secs(30);
        let (settle_tx, settle_rx) = mpsc::unbounded_channel::<Settle>();
        let settler = tokio::spawn(settle_loop(
            self.conn.clone(),
            settle_rx,
            cfg.policy.clone(),
            self.counters.clone(),
        ));
        let mut lanes: HashMap<Uuid, Lane> = HashMap::new();
        let mut tasks: JoinSet<Uuid> = JoinSet::new();
        let mut claim = true;
        loop {
            let room = cfg.max_in_flight.saturating_sub(tasks.len());
            let mut filled = false;
            if claim && room > 0 {
                let held: Vec<(Uuid, usize)> = lanes.iter().map(|(id, l)| (*id, l.held)).collect();
                let now = now_millis();
                let claims = self
                    .db(move |c| {
                        store::claim_due(
                            c,
                            &ClaimRequest {
                                now,
                                limit: room,
                                per_webhook: depth,
                                lease,
                                held: &held,
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
                filled = claims.len() == room;
                for claim in claims {
                    let id = claim.target.webhook_id;
                    let lane = lanes.entry(id).or_insert_with(|| Lane {
                        held: 0,
                        full: false,
                        slots: Arc::new(Semaphore::new(per_webhook)),
                        gone: Arc::new(AtomicBool::new(false)),
                    });
                    lane.held += 1;
                    let (slots, gone) = (lane.slots.clone(), lane.gone.clone());
                    let (client, cfg, settle) =
                        (self.client.clone(), cfg.clone(), settle_tx.clone());
                    tasks.spawn(async move {
                        // The semaphore is never closed, so acquiring only waits.
                        let _permit = slots.acquire_owned().await;
                        if gone.load(Ordering::Acquire) {
                            let _ = settle.send(Settle::Release(claim.delivery_id));
                            return id;
                        }
                        let result =
                            attempt_with(&client, &claim, &cfg.guard, cfg.policy.attempt_timeout)
                                .await;
                        if result.status == Some(410) {
                            gone.store(true, Ordering::Release);
                        }
                        let _ = settle.send(Settle::Finished(Box::new(claim), result));
                        id
                    });
                }
                // A lane at its cap may have more due; it is topped up once it drains to half.
                for lane in lanes.values_mut() {
                    lane.full = lane.held >= depth;
                }
            }
            if filled {
                // A full batch: there may be more due right now.
                claim = true;
                continue;
            }
            claim = false;
            tokio::select! {
                () = &mut shutdown => break,
                () = self.wake.notified() => claim = true,
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    let mut finished = vec![done];
                    while let Some(done) = tasks.try_join_next() {
                        finished.push(done);
                    }
                    for id in finished.into_iter().flatten() {
                        // Claim again once a lane that was full has drained to half.
                        claim |= release(&mut lanes, id, depth / 2);
                    }
                }
                () = tokio::time::sleep(cfg.poll) => {
                    self.client.sweep();
                    claim = true;
                }
            }
        }
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        drop(settle_tx);
        // Everything already answered is recorded; the settler ends when its queue is empty.
        let _ = settler.await;
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

/// Counts a finished claim off its lane; true if the lane was full and has drained to
/// `low`, so the next claim round should top it up.
fn release(lanes: &mut HashMap<Uuid, Lane>, id: Uuid, low: usize) -> bool {
    let Some(lane) = lanes.get_mut(&id) else {
        return false;
    };
    lane.held = lane.held.saturating_sub(1);
    if lane.held == 0 {
        let was_full = lane.full;
        lanes.remove(&id);
        return was_full;
    }
    if lane.full && lane.held <= low {
        lane.full = false;
        return true;
    }
    false
}

fn lock(conn: &Mutex<Connection>) -> std::sync::MutexGuard<'_, Connection> {
    // SQLite rolls back whatever a panicking holder left open, so a poisoned lock is usable.
    conn.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Records finished attempts in batches, one transaction each, until every sender is gone.
async fn settle_loop(
    conn: Arc<Mutex<Connection>>,
    mut rx: mpsc::UnboundedReceiver<Settle>,
    policy: RetryPolicy,
    counters: Arc<Counters>,
) {
    let mut buf = Vec::with_capacity(SETTLE_BATCH);
    while rx.recv_many(&mut buf, SETTLE_BATCH).await > 0 {
        let batch = std::mem::take(&mut buf);
        let (conn, policy, counters) = (conn.clone(), policy.clone(), counters.clone());
        let done =
            tokio::task::spawn_blocking(move || settle_batch(&conn, batch, &policy, &counters))
                .await;
        if let Err(e) = done {
            tracing::warn!(error = %e, "recording webhook attempts panicked");
        }
    }
}

fn settle_batch(
    conn: &Mutex<Connection>,
    batch: Vec<Settle>,
    policy: &RetryPolicy,
    counters: &Counters,
) {
    let mut guard = lock(conn);
    let tx = match guard.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            // The leases run out and the attempts are made again: at least once.
            tracing::warn!(error = %e, n = batch.len(), "recording webhook attempts failed");
            return;
        }
    };
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut released = Vec::new();
    for item in batch {
        match item {
            Settle::Release(id) => released.push(id),
            Settle::Finished(claim, result) => {
                match store::finish_attempt(&tx, &claim, &result, policy) {
                    Ok(outcome) => {
                        tracing::debug!(
                            webhook = %claim.target.webhook_id,
                            event = %claim.event_id,
                            attempt = claim.attempt,
                            status = ?result.status,
                            error = ?result.error,
                            ?outcome,
                            "webhook attempt"
                        );
                        outcomes.push(outcome);
                    }
                    // Its savepoint rolled back alone; the lease runs out and the attempt is
                    // made again.
                    Err(e) => tracing::warn!(
                        webhook = %claim.target.webhook_id,
                        event = %claim.event_id,
                        error = %e,
                        "recording a webhook attempt failed"
                    ),
                }
            }
        }
    }
    if !released.is_empty() {
        if let Err(e) = store::release(&tx, &released, now_millis()) {
            tracing::warn!(error = %e, "giving back webhook claims failed");
        }
    }
    match tx.commit() {
        Ok(()) => {
            for o in outcomes {
                counters.count(o);
            }
        }
        Err(e) => tracing::warn!(error = %e, "recording webhook attempts failed"),
    }
}

/// Why an attempt got no response.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("refused by the webhook guard")]
    Guard(#[source] GuardError),
    #[error(transparent)]
    Send(SendError),
    #[error("build request")]
    Request(#[source] http::Error),
}

/// Makes one attempt for `claim` on a connection of its own: resolve through `guard`,
/// connect to the approved address (TLS for https, verified against the system's CAs), POST,
/// and report, all within `timeout`. The dispatcher does the same on pooled connections.
pub async fn attempt(claim: &Claim, guard: &Guard, timeout: Duration) -> AttemptResult {
    attempt_with(&Client::new(Tls::default()), claim, guard, timeout).await
}

async fn attempt_with(
    client: &Client,
    claim: &Claim,
    guard: &Guard,
    timeout: Duration,
) -> AttemptResult {
    let at = now_millis();
    let started = Instant::now();
    let result = tokio::time::timeout(timeout, send(client, claim, guard)).await;
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

async fn send(
    client: &Client,
    claim: &Claim,
    guard: &Guard,
) -> Result<(u16, Option<Duration>), AttemptError> {
    let url = WebhookUrl::parse(&claim.target.url).map_err(AttemptError::Guard)?;
    let addr = guard.resolve(&url).await.map_err(AttemptError::Guard)?;
    let tls_name = match url.scheme {
        Scheme::Http => None,
        Scheme::Https => Some(match &url.host {
            Host::Name(name) => name.clone(),
            Host::Ip(ip) => ip.to_string(),
        }),
    };
    let dest = Destination {
        tls_name,
        authority: url.authority.clone(),
        addr,
    };

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
    let answer = client.send(&dest, req).await.map_err(AttemptError::Send)?;
    let retry_after = answer
        .retry_after
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| retry::parse_retry_after(v, SystemTime::now()));
    Ok((answer.status, retry_after))
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
