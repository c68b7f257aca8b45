//! The dispatcher against a real receiver on 127.0.0.1: every header and signature of both
//! formats, a retry after a 5xx, 410 disabling a webhook, `Retry-After`, and a slow receiver
//! that must not hold up another. Waits poll the database with a generous hang guard; nothing
//! asserts on elapsed time.

// Integration tests are a test crate of their own: no `mod tests` wrapper.
#![allow(missing_docs, clippy::unwrap_used, clippy::tests_outside_test_module)]

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use coppice_events::dispatch::{self, Config, Dispatcher};
use coppice_events::event::{Event, EventType, SandboxContext, LOCAL_TEAM_ID};
use coppice_events::guard::Guard;
use coppice_events::retry::RetryPolicy;
use coppice_events::sign::{self, Format};
use coppice_events::store::{self, DeliveryState, NewWebhook};
use coppice_events::tls::Tls;
use coppice_lifecycle::state::{LifecycleEvent, Millis};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rusqlite::Connection;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, Notify};
use uuid::Uuid;

/// A request as the receiver saw it.
#[derive(Debug)]
struct Seen {
    path: String,
    headers: HashMap<String, String>,
    body: Bytes,
}

/// A scripted answer.
#[derive(Clone)]
struct Answer {
    status: u16,
    retry_after: Option<&'static str>,
}

#[derive(Default)]
struct Script {
    answers: Mutex<HashMap<String, VecDeque<Answer>>>,
    /// Paths whose handler waits for `gate` before answering.
    slow: Mutex<Vec<String>>,
    gate: Notify,
}

async fn receiver(script: Arc<Script>) -> (String, mpsc::UnboundedReceiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (tx, script) = (tx.clone(), script.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (tx, script) = (tx.clone(), script.clone());
                    async move {
                        let path = req.uri().path().to_owned();
                        let headers = req
                            .headers()
                            .iter()
                            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap().to_owned()))
                            .collect();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let _ = tx.send(Seen {
                            path: path.clone(),
                            headers,
                            body,
                        });
                        let slow = script.slow.lock().unwrap().contains(&path);
                        if slow {
                            script.gate.notified().await;
                        }
                        let answer = script
                            .answers
                            .lock()
                            .unwrap()
                            .get_mut(&path)
                            .and_then(VecDeque::pop_front)
                            .unwrap_or(Answer {
                                status: 200,
                                retry_after: None,
                            });
                        let mut resp = Response::builder().status(answer.status);
                        if let Some(ra) = answer.retry_after {
                            resp = resp.header("retry-after", ra);
                        }
                        Ok::<_, Infallible>(resp.body(Full::new(Bytes::from("ok"))).unwrap())
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (base, rx)
}

fn open(path: &Path) -> Connection {
    let conn = Connection::open(path).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn
}

fn loopback_config(delays_ms: &[u64]) -> Config {
    Config {
        policy: RetryPolicy {
            delays: delays_ms
                .iter()
                .map(|&d| Duration::from_millis(d))
                .collect(),
            jitter: 0.0,
            attempt_timeout: Duration::from_secs(10),
        },
        guard: Guard::new(vec!["127.0.0.0/8".parse().unwrap()], vec![]),
        poll: Duration::from_millis(20),
        ..Config::default()
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    conn: Connection,
    stop: Option<oneshot::Sender<()>>,
    waker: dispatch::Waker,
    stats: dispatch::Stats,
}

impl Harness {
    fn start(config: Config) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.db");
        let conn = open(&path);
        store::migrate(&conn).unwrap();
        let dispatcher = Dispatcher::new(open(&path), config);
        let waker = dispatcher.waker();
        let stats = dispatcher.stats();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(dispatcher.run(async {
            let _ = stopped.await;
        }));
        Harness {
            _dir: dir,
            conn,
            stop: Some(stop),
            waker,
            stats,
        }
    }

    fn hook(&self, url: String, format: Format, events: &[EventType]) -> Uuid {
        store::create_webhook(
            &self.conn,
            &NewWebhook {
                name: "test".into(),
                url,
                enabled: true,
                events: events.to_vec(),
                secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
                format,
            },
            Millis(0),
        )
        .unwrap()
        .id
    }

    fn record(&self, event: &Event) {
        store::record(&self.conn, event).unwrap();
        self.waker.wake();
    }

    /// Polls until `cond` holds; panics after a minute so a broken dispatcher fails rather
    /// than hangs.
    async fn until(&self, what: &str, mut cond: impl FnMut(&Connection) -> bool) {
        for _ in 0..3000 {
            if cond(&self.conn) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("gave up waiting for {what}");
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn state(conn: &Connection, event: Uuid, webhook: Uuid) -> Option<(DeliveryState, u32)> {
    store::deliveries_of(conn, event)
        .unwrap()
        .into_iter()
        .find(|d| d.webhook_id == webhook)
        .map(|d| (d.state, d.attempts))
}

fn event(ty: LifecycleEvent) -> Event {
    let ctx = SandboxContext {
        sandbox_id: "sbx1".into(),
        template_id: "base".into(),
        build_id: "base".into(),
        execution_id: Uuid::new_v4().to_string(),
        team_id: LOCAL_TEAM_ID.into(),
        metadata: [("k".to_owned(), "v".to_owned())].into(),
        execution: None,
    };
    Event::lifecycle(&ctx, &ty, Millis(1_767_225_600_000))
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    tokio::time::timeout(Duration::from_secs(60), rx.recv())
        .await
        .expect("the receiver got nothing")
        .unwrap()
}

fn unix_now() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[tokio::test]
async fn every_header_and_signature_verifies() {
    let script = Arc::new(Script::default());
    let (base, mut rx) = receiver(script).await;
    let h = Harness::start(loopback_config(&[]));
    let e2b = h.hook(
        format!("{base}/e2b?x=1"),
        Format::E2b,
        &[EventType::Created],
    );
    let sf = h.hook(
        format!("{base}/sf"),
        Format::Sandforge,
        &[EventType::Created],
    );
    let ev = event(LifecycleEvent::Created);
    h.record(&ev);

    let mut seen = [next(&mut rx).await, next(&mut rx).await];
    seen.sort_by(|a, b| a.path.cmp(&b.path));
    let (e2b_req, sf_req) = (&seen[0], &seen[1]);
    assert_eq!(
        (e2b_req.path.as_str(), sf_req.path.as_str()),
        ("/e2b", "/sf")
    );
    let now = unix_now();
    for (req, webhook) in [(e2b_req, e2b), (sf_req, sf)] {
        let hd = &req.headers;
        assert_eq!(hd["content-type"], "application/json");
        assert_eq!(hd["webhook-id"], ev.id.to_string());
        sign::verify_standard(
            SECRET,
            &hd["webhook-id"],
            &hd["webhook-timestamp"],
            &hd["webhook-signature"],
            &req.body,
            now,
            300,
        )
        .unwrap();
        h.until("delivered", |c| {
            state(c, ev.id, webhook) == Some((DeliveryState::Delivered, 1))
        })
        .await;
    }

    // E2B: the stored event body, byte for byte, and E2B's headers.
    let hd = &e2b_req.headers;
    assert_eq!(e2b_req.body, ev.to_json().as_bytes());
    assert_eq!(hd["e2b-webhook-id"], e2b.to_string());
    assert_eq!(hd["e2b-signature-version"], "v1");
    sign::verify_e2b(SECRET, &e2b_req.body, &hd["e2b-signature"]).unwrap();
    assert!(!hd.contains_key("x-sandforge-signature"));
    // The delivery id is the logged attempt's id.
    let log = store::list_deliveries(
        &h.conn,
        &store::DeliveryQuery {
            webhook_id: Some(e2b),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(hd["e2b-delivery-id"], log[0].id.to_string());
    assert_eq!(
        (log[0].status, log[0].outcome.as_str()),
        (Some(200), "delivered")
    );

    // Sandforge: its body and its Stripe-style signature.
    assert_eq!(sf_req.body, ev.to_sandforge_json().as_bytes());
    let body: serde_json::Value = serde_json::from_slice(&sf_req.body).unwrap();
    assert_eq!(body["event"], "sandbox.created");
    assert_eq!(body["id"], ev.id.to_string());
    sign::verify_sandforge(
        SECRET,
        &sf_req.headers["x-sandforge-signature"],
        &sf_req.body,
        now,
        300,
    )
    .unwrap();
    assert!(!sf_req.headers.contains_key("e2b-signature"));
}

#[tokio::test]
async fn a_5xx_is_retried_with_the_same_event_id_and_a_new_delivery_id() {
    let script = Arc::new(Script::default());
    script.answers.lock().unwrap().insert(
        "/flaky".into(),
        [Answer {
            status: 503,
            retry_after: None,
        }]
        .into(),
    );
    let (base, mut rx) = receiver(script).await;
    let h = Harness::start(loopback_config(&[10, 10]));
    let wh = h.hook(format!("{base}/flaky"), Format::E2b, &[EventType::Created]);
    let ev = event(LifecycleEvent::Created);
    h.record(&ev);

    let first = next(&mut rx).await;
    let second = next(&mut rx).await;
    assert_eq!(first.headers["webhook-id"], ev.id.to_string());
    assert_eq!(second.headers["webhook-id"], ev.id.to_string());
    assert_ne!(
        first.headers["e2b-delivery-id"],
        second.headers["e2b-delivery-id"]
    );
    assert_eq!(first.body, second.body);
    h.until("delivered on the second attempt", |c| {
        state(c, ev.id, wh) == Some((DeliveryState::Delivered, 2))
    })
    .await;
    let log = store::list_deliveries(&h.conn, &store::DeliveryQuery::default()).unwrap();
    let statuses: Vec<Option<u16>> = log.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [Some(200), Some(503)]);
}

#[tokio::test]
async fn gone_disables_the_webhook() {
    let script = Arc::new(Script::default());
    script.answers.lock().unwrap().insert(
        "/gone".into(),
        [Answer {
            status: 410,
            retry_after: None,
        }]
        .into(),
    );
    let (base, mut rx) = receiver(script).await;
    let h = Harness::start(loopback_config(&[10, 10]));
    let wh = h.hook(format!("{base}/gone"), Format::E2b, &EventType::ALL);
    let ev = event(LifecycleEvent::Created);
    h.record(&ev);
    next(&mut rx).await;
    h.until("disabled", |c| !store::get_webhook(c, wh).unwrap().enabled)
        .await;
    assert_eq!(state(&h.conn, ev.id, wh), Some((DeliveryState::Failed, 1)));
    // Nothing further is enqueued or sent to it.
    let later = event(LifecycleEvent::Created);
    h.record(&later);
    assert_eq!(store::deliveries_of(&h.conn, later.id).unwrap(), []);
}

#[tokio::test]
async fn retry_after_sets_the_next_attempt() {
    let script = Arc::new(Script::default());
    script.answers.lock().unwrap().insert(
        "/busy".into(),
        [Answer {
            status: 429,
            retry_after: Some("3600"),
        }]
        .into(),
    );
    let (base, mut rx) = receiver(script).await;
    let h = Harness::start(loopback_config(&[10, 10]));
    let wh = h.hook(format!("{base}/busy"), Format::E2b, &[EventType::Created]);
    let ev = event(LifecycleEvent::Created);
    h.record(&ev);
    next(&mut rx).await;
    h.until("the attempt is logged", |c| {
        state(c, ev.id, wh).is_some_and(|(_, n)| n == 1)
    })
    .await;
    let attempt = &store::list_deliveries(&h.conn, &store::DeliveryQuery::default()).unwrap()[0];
    assert_eq!(attempt.status, Some(429));
    let d = &store::deliveries_of(&h.conn, ev.id).unwrap()[0];
    assert_eq!(d.state, DeliveryState::Pending);
    // Not before the hour the receiver asked for, though the schedule said 10 ms.
    assert!(d.next_at.0 >= attempt.at.0 + 3_600_000, "{d:?} {attempt:?}");
}

#[tokio::test]
async fn a_slow_receiver_does_not_delay_another() {
    let script = Arc::new(Script::default());
    script.slow.lock().unwrap().push("/slow".into());
    let (base, mut rx) = receiver(script.clone()).await;
    let h = Harness::start(loopback_config(&[]));
    let slow = h.hook(format!("{base}/slow"), Format::E2b, &[EventType::Created]);
    let fast = h.hook(format!("{base}/fast"), Format::E2b, &[EventType::Created]);
    let ev = event(LifecycleEvent::Created);
    h.record(&ev);
    // The slow receiver holds its request until the fast one has been delivered: if the
    // dispatcher serialized them, this would never complete.
    h.until("the fast webhook's delivery", |c| {
        state(c, ev.id, fast) == Some((DeliveryState::Delivered, 1))
    })
    .await;
    assert_eq!(
        state(&h.conn, ev.id, slow),
        Some((DeliveryState::Pending, 0))
    );
    let mut paths = vec![next(&mut rx).await.path, next(&mut rx).await.path];
    paths.sort();
    assert_eq!(paths, ["/fast", "/slow"]);
    script.gate.notify_one();
    h.until("the slow webhook's delivery", |c| {
        state(c, ev.id, slow) == Some((DeliveryState::Delivered, 1))
    })
    .await;
}

#[tokio::test]
async fn the_guard_refuses_http_and_https_before_connecting() {
    let script = Arc::new(Script::default());
    let (base, mut rx) = receiver(script).await;
    let conn = Connection::open_in_memory().unwrap();
    store::migrate(&conn).unwrap();
    let mk = |url: String| {
        store::create_webhook(
            &conn,
            &NewWebhook {
                name: "t".into(),
                url,
                enabled: true,
                events: vec![EventType::Created],
                secret: SECRET.into(),
                format: Format::E2b,
            },
            Millis(0),
        )
        .unwrap()
    };
    mk(format!("{base}/private"));
    mk("https://127.0.0.1:1/tls".into());
    store::record(&conn, &event(LifecycleEvent::Created)).unwrap();
    let claims = store::claim_due(
        &conn,
        &store::ClaimRequest {
            now: Millis(u64::MAX / 2),
            limit: 10,
            per_webhook: 10,
            lease: Duration::from_secs(60),
            held: &[],
        },
    )
    .unwrap();
    assert_eq!(claims.len(), 2);
    for claim in &claims {
        // The default guard refuses loopback.
        let r = dispatch::attempt(claim, &Guard::default(), Duration::from_secs(10)).await;
        assert_eq!(r.status, None);
        let err = r.error.unwrap();
        assert!(err.contains("loopback"), "{err}");
    }
    assert_eq!(rx.try_recv().unwrap_err(), mpsc::error::TryRecvError::Empty);
}

/// A CA made for the test, and a `localhost`/127.0.0.1 server certificate it signed.
struct TestPki {
    ca_pem: String,
    server: rustls::ServerConfig,
}

fn test_pki() -> TestPki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "coppice test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
    )
    .unwrap();
    TestPki {
        ca_pem: ca.pem(),
        server,
    }
}

/// A TLS receiver on 127.0.0.1 that answers 200 and reports each request's headers and body.
async fn tls_receiver(server: rustls::ServerConfig) -> (u16, mpsc::UnboundedReceiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (tx, acceptor) = (tx.clone(), acceptor.clone());
            tokio::spawn(async move {
                // A client that does not trust us fails here; that is the point of one test.
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let path = req.uri().path().to_owned();
                        let headers = req
                            .headers()
                            .iter()
                            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap().to_owned()))
                            .collect();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let _ = tx.send(Seen {
                            path,
                            headers,
                            body,
                        });
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("ok"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (port, rx)
}

#[tokio::test]
async fn https_delivery_verifies_the_receiver_against_the_operator_ca() {
    let pki = test_pki();
    let (port, mut rx) = tls_receiver(pki.server).await;
    let tls = Tls::new(Some(("test CA", pki.ca_pem.as_bytes()))).unwrap();
    let h = Harness::start(Config {
        tls,
        ..loopback_config(&[])
    });
    // By name and by address: both are in the certificate.
    let by_name = h.hook(
        format!("https://localhost:{port}/named"),
        Format::E2b,
        &[EventType::Created],
    );
    let by_ip = h.hook(
        format!("https://127.0.0.1:{port}/literal"),
        Format::Sandforge,
        &[EventType::Created],
    );
    let ev = event(LifecycleEvent::Created);
    h.record(&ev);
    let mut seen = [next(&mut rx).await, next(&mut rx).await];
    seen.sort_by(|a, b| a.path.cmp(&b.path));
    assert_eq!(seen[0].path, "/literal");
    assert_eq!(seen[1].path, "/named");
    let named = &seen[1];
    sign::verify_e2b(SECRET, &named.body, &named.headers["e2b-signature"]).unwrap();
    assert_eq!(named.headers["webhook-id"], ev.id.to_string());
    let literal = &seen[0];
    sign::verify_sandforge(
        SECRET,
        &literal.headers["x-sandforge-signature"],
        &literal.body,
        unix_now(),
        300,
    )
    .unwrap();
    for hook in [by_name, by_ip] {
        h.until("both https deliveries recorded", |c| {
            state(c, ev.id, hook) == Some((DeliveryState::Delivered, 1))
        })
        .await;
    }
}

#[tokio::test]
async fn https_delivery_refuses_a_receiver_no_trusted_ca_signed() {
    let pki = test_pki();
    let (port, mut rx) = tls_receiver(pki.server).await;
    let conn = Connection::open_in_memory().unwrap();
    store::migrate(&conn).unwrap();
    store::create_webhook(
        &conn,
        &NewWebhook {
            name: "t".into(),
            url: format!("https://localhost:{port}/untrusted"),
            enabled: true,
            events: vec![EventType::Created],
            secret: SECRET.into(),
            format: Format::E2b,
        },
        Millis(0),
    )
    .unwrap();
    store::record(&conn, &event(LifecycleEvent::Created)).unwrap();
    let claim = store::claim_due(
        &conn,
        &store::ClaimRequest {
            now: Millis(u64::MAX / 2),
            limit: 10,
            per_webhook: 10,
            lease: Duration::from_secs(60),
            held: &[],
        },
    )
    .unwrap()
    .remove(0);
    // Only the system's CAs: the test CA is not among them.
    let guard = Guard::new(vec!["127.0.0.0/8".parse().unwrap()], vec![]);
    let r = dispatch::attempt(&claim, &guard, Duration::from_secs(10)).await;
    assert_eq!(r.status, None);
    let err = r.error.unwrap();
    assert!(err.contains("tls handshake"), "{err}");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    assert_eq!(rx.try_recv().unwrap_err(), mpsc::error::TryRecvError::Empty);
}

#[test]
fn an_operator_ca_file_must_hold_a_certificate() {
    let err = Tls::new(Some(("empty.pem", b"not a pem file\n"))).unwrap_err();
    assert!(err.to_string().contains("empty.pem"), "{err}");
    let pki = test_pki();
    let tls = Tls::new(Some(("ca.pem", pki.ca_pem.as_bytes()))).unwrap();
    assert!(tls.roots() >= 1);
}

#[tokio::test]
async fn connections_are_kept_alive_and_reused() {
    let script = Arc::new(Script::default());
    let (base, mut rx) = receiver(script).await;
    let h = Harness::start(loopback_config(&[]));
    let hook = h.hook(format!("{base}/many"), Format::E2b, &[EventType::Created]);
    let events: Vec<Event> = (0..40).map(|_| event(LifecycleEvent::Created)).collect();
    for e in &events {
        h.record(e);
    }
    for _ in &events {
        next(&mut rx).await;
    }
    for e in &events {
        h.until("every delivery recorded", |c| {
            state(c, e.id, hook) == Some((DeliveryState::Delivered, 1))
        })
        .await;
    }
    // The counters follow the commit that recorded the attempts.
    h.until("the counters", |_| h.stats.snapshot().delivered == 40)
        .await;
    let stats = h.stats.snapshot();
    assert_eq!(stats.attempts, 40, "{stats:?}");
    // At most one connection per slot of the webhook's lane, not one per attempt.
    assert!(stats.connections <= 4, "{stats:?}");
}
