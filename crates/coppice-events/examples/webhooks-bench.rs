//! `cargo xtask bench webhooks`: how fast events are recorded and delivered.
//!
//! Driven at the library level, with nothing faked: the real `store` on a SQLite file in WAL
//! mode with `synchronous=NORMAL` (as the gateway opens `registry.db`), the real `Dispatcher`
//! on its own connection, and a real hyper HTTP/1.1 receiver on 127.0.0.1 that verifies the
//! E2B and Standard Webhooks signatures of every POST before it answers 200. The gateway's
//! HTTP layer is not in the loop: an event is recorded the way `Gateway::commit` records it
//! (its own transaction, then a wake-up).
//!
//! Three phases, each next to a baseline measured in the same run:
//! 1. record: `--events N` events, one transaction each, with one subscribed webhook (so each
//!    also enqueues one outbox row); baseline: the same bodies inserted into a plain table.
//! 2. drain: the dispatcher delivers that backlog; baseline: a plain keep-alive hyper client
//!    POSTing the same signed requests over as many connections as the dispatcher may use.
//! 3. latency: events recorded at `--rate R` per second for `--seconds S` while the dispatcher
//!    runs; event→delivery is from just before the recording transaction to the receiver's
//!    verified arrival.
//!
//! Prints one JSON report on stdout; progress goes to stderr.
// A benchmark program: it reports on stdout/stderr and paces on a plain thread.
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::disallowed_methods,
    clippy::cast_precision_loss,
    missing_docs
)]

#[path = "../../../benchmarks/support/stats.rs"]
mod stats;

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use coppice_events::dispatch::{Config, Dispatcher};
use coppice_events::event::{Event, EventType, SandboxContext, LOCAL_TEAM_ID};
use coppice_events::guard::Guard;
use coppice_events::sign::{self, Format};
use coppice_events::store::{self, NewWebhook};
use coppice_lifecycle::state::{LifecycleEvent, Millis};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rusqlite::Connection;
use stats::{figures_json, machine, Figure, Stats};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use uuid::Uuid;

type Error = Box<dyn std::error::Error + Send + Sync>;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// Targets from issue 5.
const TARGET_DELIVERIES_PER_SEC: f64 = 2000.0;
const TARGET_P99_MS: f64 = 50.0;

fn main() -> Result<(), Error> {
    let events: usize = stats::num_arg("--events", 5000)?;
    let rate: u64 = stats::num_arg("--rate", 2000)?;
    let seconds: u64 = stats::num_arg("--seconds", 3)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = rt.block_on(measure(events, rate, seconds))?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// What the receiver saw.
#[derive(Default)]
struct Seen {
    /// Verified deliveries.
    count: AtomicU64,
    /// Requests whose signatures did not verify.
    bad: AtomicU64,
    /// Event id → when its recording started (phase 3 only).
    sent: Mutex<HashMap<Uuid, Instant>>,
    /// event→delivery latencies (phase 3 only).
    latencies: Mutex<Vec<Duration>>,
    changed: Notify,
}

impl Seen {
    async fn wait_for(&self, n: u64, limit: Duration) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.changed.notified();
            if self.count.load(Ordering::Acquire) >= n {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(format!(
                    "only {} of {n} deliveries arrived within {limit:?}",
                    self.count.load(Ordering::Acquire)
                )
                .into());
            }
        }
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
}

async fn handle(
    seen: Arc<Seen>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let (sig, id, ts, std_sig) = (
        header("e2b-signature"),
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    );
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(status(400)),
    };
    let verified = sign::verify_e2b(SECRET, &body, &sig).is_ok()
        && sign::verify_standard(SECRET, &id, &ts, &std_sig, &body, unix_now(), 300).is_ok();
    if !verified {
        seen.bad.fetch_add(1, Ordering::Relaxed);
        return Ok(status(400));
    }
    let arrived = Instant::now();
    if let Ok(event_id) = Uuid::parse_str(&id) {
        let started = seen
            .sent
            .lock()
            .map(|mut m| m.remove(&event_id))
            .ok()
            .flatten();
        if let Some(t) = started {
            if let Ok(mut l) = seen.latencies.lock() {
                l.push(arrived - t);
            }
        }
    }
    seen.count.fetch_add(1, Ordering::AcqRel);
    seen.changed.notify_waiters();
    Ok(status(200))
}

fn status(code: u16) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = hyper::StatusCode::from_u16(code).unwrap_or(hyper::StatusCode::OK);
    r
}

/// A keep-alive HTTP/1.1 receiver on 127.0.0.1; returns its address.
async fn receiver(seen: Arc<Seen>) -> Result<std::net::SocketAddr, Error> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| handle(seen.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn open(path: &Path) -> Result<Connection, Error> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.busy_timeout(Duration::from_secs(10))?;
    Ok(conn)
}

fn event(n: usize) -> Event {
    let ctx = SandboxContext {
        sandbox_id: format!("bench{n:015}"),
        template_id: "base".into(),
        build_id: "base".into(),
        execution_id: Uuid::new_v4().to_string(),
        team_id: LOCAL_TEAM_ID.into(),
        metadata: [("bench".to_owned(), "webhooks".to_owned())].into(),
        execution: None,
    };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0));
    Event::lifecycle(&ctx, &LifecycleEvent::Created, Millis(now))
}

/// Records `e` the way the gateway does: one transaction per change.
fn record(conn: &mut Connection, e: &Event) -> Result<(), Error> {
    let tx = conn.transaction()?;
    store::record(&tx, e)?;
    tx.commit()?;
    Ok(())
}

async fn measure(events: usize, rate: u64, seconds: u64) -> Result<serde_json::Value, Error> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("bench.db");
    let mut conn = open(&db)?;
    store::migrate(&conn)?;
    let seen = Arc::new(Seen::default());
    let addr = receiver(seen.clone()).await?;
    let hook = store::create_webhook(
        &conn,
        &NewWebhook {
            name: "bench".into(),
            url: format!("http://{addr}/hook"),
            enabled: true,
            events: vec![EventType::Created],
            secret: SECRET.into(),
            format: Format::E2b,
        },
        Millis(0),
    )?;
    let config = Config {
        guard: Guard::new(vec!["127.0.0.0/8".parse()?], vec![]),
        ..Config::default()
    };
    let connections = config.per_webhook;

    // 1. Record.
    eprintln!("record: {events} events, one transaction each");
    let bodies: Vec<Event> = (0..events).map(event).collect();
    let t = Instant::now();
    for e in &bodies {
        record(&mut conn, e)?;
    }
    let record_time = t.elapsed();
    let baseline_time = {
        let plain = open(&dir.path().join("plain.db"))?;
        plain.execute_batch("CREATE TABLE plain (id TEXT PRIMARY KEY, body TEXT NOT NULL)")?;
        let t = Instant::now();
        for e in &bodies {
            plain.execute_batch("BEGIN")?;
            plain.execute(
                "INSERT INTO plain (id, body) VALUES (?1, ?2)",
                (e.id.to_string(), e.to_json()),
            )?;
            plain.execute_batch("COMMIT")?;
        }
        t.elapsed()
    };
    let per_sec = |n: usize, d: Duration| n as f64 / d.as_secs_f64();
    let recorded_per_sec = per_sec(events, record_time);
    let plain_per_sec = per_sec(events, baseline_time);

    // 2. Drain the backlog.
    eprintln!("drain: {events} deliveries to {addr}");
    let dispatcher = Dispatcher::new(open(&db)?, config);
    let waker = dispatcher.waker();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let t = Instant::now();
    let running = tokio::spawn(dispatcher.run(async move {
        let _ = stopped.await;
    }));
    seen.wait_for(events as u64, Duration::from_secs(300))
        .await?;
    let drain_time = t.elapsed();
    let delivered_per_sec = per_sec(events, drain_time);

    let baseline_posts = raw_posts(addr, &bodies, hook.id, connections, &seen).await?;
    let raw_per_sec = per_sec(events, baseline_posts);

    // 3. Latency at a steady rate.
    let total = usize::try_from(rate * seconds).unwrap_or(usize::MAX);
    eprintln!("latency: {total} events at {rate}/s");
    let before = seen.count.load(Ordering::Acquire);
    let producer = {
        let seen = seen.clone();
        let waker = waker.clone();
        let db = db.clone();
        std::thread::spawn(move || -> Result<Duration, Error> {
            let mut conn = open(&db)?;
            let interval = Duration::from_secs_f64(1.0 / rate as f64);
            let start = Instant::now();
            for i in 0..total {
                let due = start + interval * u32::try_from(i).unwrap_or(u32::MAX);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let e = event(events + i);
                seen.sent
                    .lock()
                    .map_err(|_| "poisoned")?
                    .insert(e.id, Instant::now());
                record(&mut conn, &e)?;
                waker.wake();
            }
            Ok(start.elapsed())
        })
    };
    seen.wait_for(before + total as u64, Duration::from_secs(300))
        .await?;
    let produce_time = producer.join().map_err(|_| "the producer panicked")??;
    let achieved_rate = per_sec(total, produce_time);
    // The receiver counts an arrival before the dispatcher records it: let the outbox settle.
    let mut undelivered: i64 = 0;
    for _ in 0..500 {
        undelivered = conn.query_row(
            "SELECT COUNT(*) FROM webhook_deliveries WHERE state != 'delivered'",
            [],
            |r| r.get(0),
        )?;
        if undelivered == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(());
    running.await??;
    let bad = seen.bad.load(Ordering::Acquire);
    if undelivered != 0 || bad != 0 {
        return Err(format!("{undelivered} deliveries not delivered, {bad} bad signatures").into());
    }
    let mut latencies = std::mem::take(&mut *seen.latencies.lock().map_err(|_| "poisoned")?);
    if latencies.len() != total {
        return Err(format!("{} latencies for {total} events", latencies.len()).into());
    }
    let lat = Stats::of(&mut latencies);

    let summary = format!(
        "record {recorded_per_sec:.0} events/s ({:.2}x a plain insert, {plain_per_sec:.0}/s); \
         drain {delivered_per_sec:.0} deliveries/s ({:.2}x a raw keep-alive client, {raw_per_sec:.0}/s); \
         event→delivery p50 {:.2} ms / p99 {:.2} ms at {achieved_rate:.0} events/s; \
         real store + Dispatcher + verifying hyper receiver, {connections} conns, n={events}/{total}",
        recorded_per_sec / plain_per_sec,
        delivered_per_sec / raw_per_sec,
        lat.p50,
        lat.p99,
    );
    let figures = [
        Figure::value(
            "webhooks.record",
            "events recorded (one transaction each, one webhook subscribed)",
            "events/s",
            recorded_per_sec,
            true,
        )
        .floor("plain insert", plain_per_sec),
        Figure::value(
            "webhooks.drain",
            "deliveries of a backlog to a verifying loopback receiver",
            "deliveries/s",
            delivered_per_sec,
            true,
        )
        .floor("raw keep-alive client", raw_per_sec)
        .target(
            "≥ 2000 deliveries/s",
            delivered_per_sec >= TARGET_DELIVERIES_PER_SEC,
        ),
        Figure::latency(
            "webhooks.event_to_delivery",
            "event recorded → delivery verified, at 2000 events/s",
            &lat,
        )
        .target("p99 ≤ 50 ms", lat.p99 <= TARGET_P99_MS),
    ];
    let (figures, targets) = figures_json(&figures);
    Ok(serde_json::json!({
        "benchmark": "webhooks",
        "machine": machine(),
        "figures": figures,
        "targets": targets,
        "level": "library: coppice_events::store on a WAL SQLite file (synchronous=NORMAL) + \
                  dispatch::Dispatcher on its own connection + a hyper HTTP/1.1 receiver on \
                  127.0.0.1 verifying e2b-signature and webhook-signature; no gateway HTTP layer",
        "events": events,
        "connections_per_webhook": connections,
        "record": {
            "events_per_sec": recorded_per_sec,
            "baseline_plain_insert_per_sec": plain_per_sec,
            "ratio": recorded_per_sec / plain_per_sec,
        },
        "drain": {
            "deliveries_per_sec": delivered_per_sec,
            "baseline_raw_client_per_sec": raw_per_sec,
            "ratio": delivered_per_sec / raw_per_sec,
            "target_per_sec": TARGET_DELIVERIES_PER_SEC,
            "met": delivered_per_sec >= TARGET_DELIVERIES_PER_SEC,
        },
        "latency": {
            "unit": "ms",
            "rate_asked": rate,
            "rate_achieved": achieved_rate,
            "events": total,
            "event_to_delivery": lat.json(),
            "target_p99_ms": TARGET_P99_MS,
            "met": lat.p99 <= TARGET_P99_MS,
        },
        "summary": summary,
    }))
}

/// The floor: the same signed POSTs from a plain hyper client over `connections` keep-alive
/// connections, with no database in the way.
async fn raw_posts(
    addr: std::net::SocketAddr,
    bodies: &[Event],
    webhook: Uuid,
    connections: usize,
    seen: &Arc<Seen>,
) -> Result<Duration, Error> {
    eprintln!("baseline: {} raw POSTs", bodies.len());
    let before = seen.count.load(Ordering::Acquire);
    let requests: Vec<Request<Full<Bytes>>> = bodies
        .iter()
        .map(|e| {
            let body = e.to_json();
            let (delivery, webhook, id) = (
                Uuid::new_v4().to_string(),
                webhook.to_string(),
                e.id.to_string(),
            );
            let mut req = Request::post("/hook")
                .header("host", addr.to_string())
                .header("content-type", "application/json");
            for (k, v) in sign::headers(
                Format::E2b,
                &sign::Attempt {
                    webhook_id: &webhook,
                    delivery_id: &delivery,
                    event_id: &id,
                    timestamp: unix_now(),
                    body: body.as_bytes(),
                    secret: SECRET,
                },
            ) {
                req = req.header(k, v);
            }
            req.body(Full::new(Bytes::from(body)))
        })
        .collect::<Result<_, _>>()?;
    let queue = Arc::new(Mutex::new(requests));
    let t = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..connections {
        let queue = queue.clone();
        workers.push(tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            loop {
                let next = queue.lock().map_err(|_| "poisoned")?.pop();
                let Some(req) = next else { break };
                sender.ready().await?;
                let resp = sender.send_request(req).await?;
                if !resp.status().is_success() {
                    return Err(format!("receiver answered {}", resp.status()).into());
                }
                resp.into_body().collect().await?;
            }
            Ok::<(), Error>(())
        }));
    }
    for w in workers {
        w.await??;
    }
    let elapsed = t.elapsed();
    let got = seen.count.load(Ordering::Acquire) - before;
    if got != bodies.len() as u64 {
        return Err(format!("the receiver verified {got} of {} raw POSTs", bodies.len()).into());
    }
    Ok(elapsed)
}
