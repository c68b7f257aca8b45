//! Lifecycle events and webhooks through the real gateway: the read API after create, pause,
//! connect, set_timeout and kill; signed deliveries to a real receiver on loopback (E2B,
//! Standard Webhooks and Sandforge signatures checked with `coppice_events::sign`); a retry
//! after a 5xx; disable, enable and replay; bad input; and delivery across a `kill -9` of the
//! gateway. Real binary, real sandboxes; see `support/mod.rs`.
#![cfg(target_os = "linux")]
// An integration test crate: no `mod tests` wrapper, helpers may unwrap, skip lines must reach
// the test output, and the tests run on plain threads, where `std::thread::sleep` blocks
// nothing else.
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::tests_outside_test_module,
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::disallowed_methods
)]

mod support;

use std::collections::{BTreeSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use coppice_events::sign;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use support::{events_of, id_of, wait_for, Lab};

/// How long a delivery may take to arrive (E2B's retry schedule waits about 10 s).
const DELIVERY_WAIT: Duration = Duration::from_secs(90);
const SECRET: &str = "test-secret-e2b";
const SANDFORGE_SECRET: &str = "test-secret-sandforge";

const LIFECYCLE: [&str; 5] = [
    "sandbox.lifecycle.created",
    "sandbox.lifecycle.paused",
    "sandbox.lifecycle.resumed",
    "sandbox.lifecycle.updated",
    "sandbox.lifecycle.killed",
];

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Arrival {
    path: String,
    headers: HeaderMap,
    body: Bytes,
    /// The receiver's epoch when it arrived.
    epoch: u32,
    /// The epoch in which it was answered with a 2xx, if it was.
    answered: Option<u32>,
}

impl Arrival {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

#[derive(Debug, Default)]
struct Shared {
    arrivals: Vec<Arrival>,
    /// Statuses to answer requests to a path with, in order; 200 once none is left.
    statuses: VecDeque<(String, u16)>,
    /// How long to wait before answering.
    delay: Duration,
    epoch: u32,
}

/// A webhook receiver on 127.0.0.1 with its own thread and runtime; dropping it stops both.
struct Receiver {
    addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let state = Arc::clone(&shared);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let stream = tokio::select! {
                        _ = &mut stopped => return,
                        accepted = listener.accept() => match accepted {
                            Ok((s, _)) => s,
                            Err(_) => continue,
                        },
                    };
                    let state = Arc::clone(&state);
                    tokio::spawn(async move {
                        let service =
                            hyper::service::service_fn(move |req| receive(Arc::clone(&state), req));
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        });
        Receiver {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Shared) -> T) -> T {
        f(&mut self.shared.lock().unwrap())
    }

    fn arrivals(&self) -> Vec<Arrival> {
        self.with(|s| s.arrivals.clone())
    }

    /// Arrivals at `path` answered 2xx, by event id (`webhook-id`).
    fn delivered_ids(&self, path: &str) -> BTreeSet<String> {
        self.arrivals()
            .iter()
            .filter(|a| a.path == path && a.answered.is_some())
            .map(|a| a.header("webhook-id").to_owned())
            .collect()
    }

    /// Waits until the event `id` has been delivered to `path` at least `times` times.
    fn wait_delivered(&self, path: &str, id: &str, times: usize) -> Vec<Arrival> {
        wait_for(
            &format!("{times} deliveries of event {id} to {path}"),
            DELIVERY_WAIT,
            || {
                let got: Vec<Arrival> = self
                    .arrivals()
                    .into_iter()
                    .filter(|a| {
                        a.path == path && a.answered.is_some() && a.header("webhook-id") == id
                    })
                    .collect();
                (got.len() >= times).then_some(got)
            },
        )
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn receive(
    state: Arc<Mutex<Shared>>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let headers = req.headers().clone();
    let body = req
        .into_body()
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .unwrap_or_default();
    let (index, status, delay) = {
        let mut s = state.lock().unwrap();
        let status = match s.statuses.iter().position(|(p, _)| *p == path) {
            Some(i) => s.statuses.remove(i).map_or(200, |(_, status)| status),
            None => 200,
        };
        let epoch = s.epoch;
        s.arrivals.push(Arrival {
            path,
            headers,
            body,
            epoch,
            answered: None,
        });
        (s.arrivals.len() - 1, status, s.delay)
    };
    tokio::time::sleep(delay).await;
    {
        let mut s = state.lock().unwrap();
        if (200..300).contains(&status) {
            s.arrivals[index].answered = Some(s.epoch);
        }
    }
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap();
    Ok(resp)
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

/// Asserts every E2B-format header and both signatures of `a`.
fn check_e2b_signed(a: &Arrival, webhook_id: &str) {
    let event = a.json();
    assert_eq!(a.header("e2b-webhook-id"), webhook_id);
    assert_eq!(a.header("e2b-signature-version"), "v1");
    assert!(!a.header("e2b-delivery-id").is_empty());
    assert_eq!(a.header("webhook-id"), event["id"].as_str().unwrap());
    sign::verify_e2b(SECRET, &a.body, a.header("e2b-signature")).unwrap();
    sign::verify_standard(
        SECRET,
        a.header("webhook-id"),
        a.header("webhook-timestamp"),
        a.header("webhook-signature"),
        &a.body,
        unix_now(),
        300,
    )
    .unwrap();
}

fn lab_with_loopback_webhooks(name: &str, extra: &[String]) -> Option<Lab> {
    let mut lab = Lab::new(name)?;
    lab.options.args = vec!["--webhook-allow".into(), "127.0.0.0/8".into()];
    lab.options.args.extend(extra.iter().cloned());
    Some(lab)
}

fn types_of(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect()
}

/// Create, pause, connect (resume), set_timeout and kill one sandbox: the five events, in the
/// order they happened.
fn lifecycle_round(lab: &Lab, metadata: Value) -> String {
    let sbx = lab.create(json!({"timeout": 600, "metadata": metadata}));
    let id = id_of(&sbx);
    let r = lab.api("POST", &format!("/sandboxes/{id}/pause"), None);
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    let r = lab.api(
        "POST",
        &format!("/v2/sandboxes/{id}/connect"),
        Some(json!({"timeout": 600})),
    );
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let r = lab.api(
        "POST",
        &format!("/sandboxes/{id}/timeout"),
        Some(json!({"timeout": 900})),
    );
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    let r = lab.api("DELETE", &format!("/sandboxes/{id}"), None);
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    id
}

/// The read API: E2B's fields for every lifecycle event, local ids as documented, filters,
/// order and paging, and a 400 for an unknown type.
#[test]
fn events_are_recorded_with_e2b_fields() {
    let Some(mut lab) = Lab::new("events_are_recorded_with_e2b_fields") else {
        return;
    };
    lab.start();
    let id = lifecycle_round(&lab, json!({"team": "blue"}));
    let other = lab.create(json!({"timeout": 600}));
    let other_id = id_of(&other);

    let events = events_of(&lab, &format!("/events/sandboxes/{id}?orderAsc=true"));
    assert_eq!(types_of(&events), LIFECYCLE, "{events:#?}");
    for e in &events {
        assert_eq!(e["version"], "v1");
        uuid::Uuid::parse_str(e["id"].as_str().unwrap()).unwrap();
        assert_eq!(e["sandboxId"], id.as_str());
        assert_eq!(e["sandboxTemplateId"], "base");
        assert_eq!(e["sandboxTeamId"], "00000000-0000-0000-0000-000000000000");
        assert!(!e["sandboxBuildId"].as_str().unwrap().is_empty(), "{e}");
        uuid::Uuid::parse_str(e["sandboxExecutionId"].as_str().unwrap()).unwrap();
        support::millis(&e["timestamp"]);
        assert_eq!(e["eventData"]["sandbox_metadata"], json!({"team": "blue"}));
    }
    assert_eq!(events[1]["eventData"]["cause"], "manual");
    assert_eq!(events[1]["eventData"]["execution"]["vcpu_count"], 2);
    assert_eq!(events[2]["eventData"]["cause"], "connect");
    assert_eq!(events[3]["eventData"]["update"], "timeout");
    support::millis(&events[3]["eventData"]["set_timeout"]);
    assert_eq!(events[4]["eventData"]["cause"], "manual");
    // One execution until the pause, a new one from the resume on.
    assert_eq!(
        events[0]["sandboxExecutionId"],
        events[1]["sandboxExecutionId"]
    );
    assert_ne!(
        events[1]["sandboxExecutionId"],
        events[2]["sandboxExecutionId"]
    );
    assert_eq!(
        events[2]["sandboxExecutionId"],
        events[4]["sandboxExecutionId"]
    );

    // Newest first by default; paging; type filters repeated or comma-separated.
    let newest = events_of(&lab, &format!("/events/sandboxes/{id}"));
    assert_eq!(newest[0]["id"], events[4]["id"]);
    let page = events_of(&lab, &format!("/events/sandboxes/{id}?limit=2&offset=1"));
    assert_eq!(page.len(), 2);
    assert_eq!(page[0]["id"], events[3]["id"]);
    assert_eq!(page[1]["id"], events[2]["id"]);
    let filtered = events_of(
        &lab,
        &format!(
            "/events/sandboxes/{id}?orderAsc=true&types=sandbox.lifecycle.paused,sandbox.lifecycle.killed"
        ),
    );
    assert_eq!(
        types_of(&filtered),
        ["sandbox.lifecycle.paused", "sandbox.lifecycle.killed"]
    );
    let filtered = events_of(
        &lab,
        &format!(
            "/events/sandboxes/{id}?types=sandbox.lifecycle.created&types=sandbox.lifecycle.resumed"
        ),
    );
    assert_eq!(
        types_of(&filtered),
        ["sandbox.lifecycle.resumed", "sandbox.lifecycle.created"]
    );
    // Every sandbox's events; the default page is 10.
    let all = events_of(&lab, "/events/sandboxes?orderAsc=true&limit=100");
    assert_eq!(all.len(), 6);
    assert_eq!(all[5]["sandboxId"], other_id.as_str());
    assert_eq!(all[5]["type"], "sandbox.lifecycle.created");
    lab.api("GET", "/events/sandboxes?types=sandbox.exploded", None)
        .assert_error(400, "unknown type");
    lab.api("GET", "/events/sandboxes?limit=x", None)
        .assert_error(400, "bad limit");
    assert!(events_of(&lab, "/events/sandboxes/nosuchsandbox").is_empty());
    lab.finish();
}

/// Webhook management rejects bad input with 400 and a message, and unknown ids with 404.
#[test]
fn webhook_management_validates_input() {
    let Some(mut lab) = Lab::new("webhook_management_validates_input") else {
        return;
    };
    lab.start();
    let good = json!({
        "name": "ops",
        "url": "http://127.0.0.1:9/hook",
        "events": ["sandbox.lifecycle.created"],
        "signatureSecret": "s",
    });
    let with = |k: &str, v: Value| {
        let mut b = good.clone();
        b[k] = v;
        b
    };
    let without = |k: &str| {
        let mut b = good.clone();
        b.as_object_mut().unwrap().remove(k);
        b
    };
    let cases = [
        ("ftp url", with("url", json!("ftp://example.com/x"))),
        ("not a url", with("url", json!("nope"))),
        (
            "metadata address",
            with("url", json!("http://169.254.169.254/latest")),
        ),
        // Loopback is refused unless --webhook-allow covers it; this gateway has none.
        ("loopback", good.clone()),
        ("unknown type", with("events", json!(["sandbox.exploded"]))),
        ("no types", with("events", json!([]))),
        ("missing secret", without("signatureSecret")),
        ("empty secret", with("signatureSecret", json!(""))),
        ("missing url", without("url")),
        ("long name", with("name", json!("n".repeat(257)))),
        ("bad format", with("format", json!("xml"))),
    ];
    for (what, body) in cases {
        lab.api("POST", "/events/webhooks", Some(body))
            .assert_error(400, what);
    }
    let public = with("url", json!("http://93.184.215.14/hook"));
    let r = lab.api("POST", "/events/webhooks", Some(public));
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let hook = r.json();
    assert!(hook.get("signatureSecret").is_none(), "{hook}");
    let hid = hook["id"].as_str().unwrap();
    lab.api(
        "PATCH",
        &format!("/events/webhooks/{hid}"),
        Some(json!({"events": ["nope"]})),
    )
    .assert_error(400, "patch unknown type");
    lab.api(
        "PATCH",
        &format!("/events/webhooks/{hid}"),
        Some(json!({"url": "http://[::1]/x"})),
    )
    .assert_error(400, "patch loopback");
    let unknown = uuid::Uuid::new_v4();
    for (m, p) in [
        ("GET", format!("/events/webhooks/{unknown}")),
        ("DELETE", format!("/events/webhooks/{unknown}")),
        ("GET", format!("/events/webhooks/{unknown}/deliveries")),
        ("GET", "/events/webhooks/not-a-uuid".to_owned()),
        (
            "POST",
            "/events/webhooks/deliveries/99999/replay".to_owned(),
        ),
    ] {
        lab.api(m, &p, None).assert_error(404, &format!("{m} {p}"));
    }
    lab.api(
        "PATCH",
        &format!("/events/webhooks/{unknown}"),
        Some(json!({"enabled": false})),
    )
    .assert_error(404, "patch unknown");
    lab.api(
        "POST",
        "/events/webhooks/replay",
        Some(json!({"since": "yesterday"})),
    )
    .assert_error(400, "replay since garbage");
    let r = lab.api("DELETE", &format!("/events/webhooks/{hid}"), None);
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    lab.api("GET", &format!("/events/webhooks/{hid}"), None)
        .assert_error(404, "deleted");
    lab.finish();
}

/// Signed deliveries in both formats, a retry after a 503, the attempt log, disable and
/// enable, replay of one delivery and of everything since a time.
#[test]
fn webhooks_receive_signed_deliveries() {
    let receiver = Receiver::start();
    let Some(mut lab) = lab_with_loopback_webhooks(
        "webhooks_receive_signed_deliveries",
        &[
            "--webhook-url".into(),
            receiver.url("/sandforge"),
            "--webhook-secret".into(),
            SANDFORGE_SECRET.into(),
        ],
    ) else {
        return;
    };
    lab.start();
    let r = lab.api(
        "POST",
        "/events/webhooks",
        Some(json!({
            "name": "e2b",
            "url": receiver.url("/e2b"),
            "events": LIFECYCLE,
            "signatureSecret": SECRET,
        })),
    );
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let hook = r.json();
    let hid = hook["id"].as_str().unwrap().to_owned();
    assert_eq!(hook["enabled"], true);
    assert_eq!(hook["format"], "e2b");
    let hooks = lab.api("GET", "/events/webhooks", None).json();
    assert_eq!(hooks.as_array().unwrap().len(), 2, "{hooks}");
    assert!(hooks
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h["format"] == "sandforge" && h["url"] == receiver.url("/sandforge").as_str()));

    // The first E2B delivery is answered 503, so its event is retried.
    receiver.with(|s| s.statuses.push_back(("/e2b".into(), 503)));
    let id = lifecycle_round(&lab, json!({"k": "v"}));
    let events = events_of(&lab, &format!("/events/sandboxes/{id}?orderAsc=true"));
    assert_eq!(types_of(&events), LIFECYCLE);
    for e in &events {
        let eid = e["id"].as_str().unwrap();
        let got = receiver.wait_delivered("/e2b", eid, 1);
        for a in &got {
            check_e2b_signed(a, &hid);
            // Byte for byte the event the read API returns.
            assert_eq!(&a.json(), e);
        }
        let sf = receiver.wait_delivered("/sandforge", eid, 1);
        for a in &sf {
            sign::verify_sandforge(
                SANDFORGE_SECRET,
                a.header("x-sandforge-signature"),
                &a.body,
                unix_now(),
                300,
            )
            .unwrap();
            let body = a.json();
            assert_eq!(body["id"], e["id"]);
            assert_eq!(body["data"]["sandbox_id"], id.as_str());
        }
    }
    let sf_names: BTreeSet<String> = receiver
        .arrivals()
        .iter()
        .filter(|a| a.path == "/sandforge")
        .map(|a| a.json()["event"].as_str().unwrap().to_owned())
        .collect();
    assert!(sf_names.contains("sandbox.created") && sf_names.contains("sandbox.destroyed"));

    // The 503 and the retry that followed are in the attempt log, with the same event id
    // and a different delivery id.
    let retried: Vec<Arrival> = receiver
        .arrivals()
        .into_iter()
        .filter(|a| a.path == "/e2b")
        .collect();
    let first = &retried[0];
    let again: Vec<&Arrival> = retried
        .iter()
        .filter(|a| a.header("webhook-id") == first.header("webhook-id"))
        .collect();
    assert!(again.len() >= 2, "the 503 was not retried: {retried:?}");
    assert_ne!(
        again[0].header("e2b-delivery-id"),
        again[1].header("e2b-delivery-id")
    );
    let log = lab
        .api(
            "GET",
            &format!("/events/webhooks/{hid}/deliveries?limit=100"),
            None,
        )
        .json();
    let log = log.as_array().unwrap();
    assert!(
        log.iter()
            .any(|a| a["statusCode"] == 503 && a["outcome"] == "retrying"),
        "{log:#?}"
    );
    let delivered = log
        .iter()
        .find(|a| a["statusCode"] == 200 && a["outcome"] == "delivered")
        .unwrap();
    for k in [
        "id",
        "deliveryId",
        "webhookId",
        "eventId",
        "eventType",
        "timestamp",
        "latencyMs",
    ] {
        assert!(!delivered[k].is_null(), "{k} in {delivered}");
    }
    let all_log = lab
        .api("GET", "/events/webhooks/deliveries?limit=100", None)
        .json();
    assert!(all_log.as_array().unwrap().len() > log.len());

    // Replay one delivery: its event arrives again, with its original id.
    let eid = delivered["eventId"].as_str().unwrap().to_owned();
    let before = receiver.wait_delivered("/e2b", &eid, 1).len();
    let r = lab.api(
        "POST",
        &format!(
            "/events/webhooks/deliveries/{}/replay",
            delivered["deliveryId"]
        ),
        None,
    );
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    receiver.wait_delivered("/e2b", &eid, before + 1);

    // Disabled: new events are not enqueued for it. Enabled again: they are.
    let r = lab.api(
        "PATCH",
        &format!("/events/webhooks/{hid}"),
        Some(json!({"enabled": false})),
    );
    assert_eq!(r.json()["enabled"], false);
    let since = lab.detail(&id_of(&lab.create(json!({"timeout": 600}))))["startedAt"].clone();
    let missed = events_of(&lab, "/events/sandboxes?limit=1")[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = lab.api(
        "PATCH",
        &format!("/events/webhooks/{hid}"),
        Some(json!({"enabled": true})),
    );
    assert_eq!(r.json()["enabled"], true);
    let sbx = lab.create(json!({"timeout": 600}));
    let later = events_of(&lab, "/events/sandboxes?limit=1")[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    receiver.wait_delivered("/e2b", &later, 1);
    // The Sandforge subscription was never disabled and got the missed one.
    receiver.wait_delivered("/sandforge", &missed, 1);
    assert!(
        !receiver.delivered_ids("/e2b").contains(&missed),
        "an event recorded while the webhook was disabled was delivered to it"
    );
    // Replay everything since the missed event: it arrives now, with its original id.
    let r = lab.api(
        "POST",
        &format!("/events/webhooks/{hid}/replay"),
        Some(json!({ "since": since })),
    );
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    assert!(r.json()["queued"].as_u64().unwrap() >= 2, "{}", r.text());
    for a in receiver.wait_delivered("/e2b", &missed, 1) {
        check_e2b_signed(&a, &hid);
    }
    let _ = sbx;
    lab.finish();
}

/// `kill -9` while deliveries hang at the receiver: after the restart every event is
/// delivered, the interrupted ones again, always with the event's original id.
#[test]
fn deliveries_survive_a_gateway_crash() {
    let receiver = Receiver::start();
    let Some(mut lab) = lab_with_loopback_webhooks("deliveries_survive_a_gateway_crash", &[])
    else {
        return;
    };
    lab.start();
    // Before any delivery starts, so the crash below is the only thing that cuts them off.
    lab.wait_templates_imported();
    let r = lab.api(
        "POST",
        "/events/webhooks",
        Some(json!({
            "name": "slow",
            "url": receiver.url("/slow"),
            "events": LIFECYCLE,
            "signatureSecret": SECRET,
        })),
    );
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let hid = r.json()["id"].as_str().unwrap().to_owned();
    // Answers come only after the crash, so no attempt of the first gateway completes.
    receiver.with(|s| s.delay = Duration::from_secs(30));
    let sbx = lab.create(json!({"timeout": 600}));
    let id = id_of(&sbx);
    let r = lab.api("POST", &format!("/sandboxes/{id}/pause"), None);
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    let r = lab.api(
        "POST",
        &format!("/sandboxes/{id}/connect"),
        Some(json!({"timeout": 600})),
    );
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let events = events_of(&lab, &format!("/events/sandboxes/{id}?orderAsc=true"));
    assert_eq!(events.len(), 3);
    wait_for("deliveries in flight", DELIVERY_WAIT, || {
        (receiver.arrivals().len() >= 3).then_some(())
    });
    receiver.with(|s| {
        s.epoch = 1;
        s.delay = Duration::ZERO;
    });
    lab.crash();
    lab.start();
    for e in &events {
        let eid = e["id"].as_str().unwrap();
        let got = wait_for(
            &format!("event {eid} delivered after the restart"),
            DELIVERY_WAIT,
            || {
                let got: Vec<Arrival> = receiver
                    .arrivals()
                    .into_iter()
                    .filter(|a| {
                        a.epoch == 1 && a.answered.is_some() && a.header("webhook-id") == eid
                    })
                    .collect();
                (!got.is_empty()).then_some(got)
            },
        );
        for a in got {
            check_e2b_signed(&a, &hid);
            assert_eq!(&a.json(), e);
        }
    }
    // The interrupted attempts were for these events: no event got a second id.
    let known: BTreeSet<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    for a in receiver.arrivals() {
        assert!(
            known.contains(a.header("webhook-id")),
            "unknown event id {}",
            a.header("webhook-id")
        );
        assert_eq!(a.json()["id"].as_str().unwrap(), a.header("webhook-id"));
    }
    assert!(receiver.arrivals().iter().any(|a| a.epoch == 0));
    lab.finish();
}

/// The events nobody asked for by API call: a pause and a kill when windows end (cause
/// `timeout`), and the resume that traffic to a paused auto-resume sandbox causes (cause
/// `auto_resume`).
#[test]
fn timeouts_and_auto_resume_are_recorded() {
    let Some(mut lab) = Lab::new("timeouts_and_auto_resume_are_recorded") else {
        return;
    };
    lab.start();
    let sleeper = lab.create(json!({
        "timeout": 2,
        "autoPause": true,
        "autoResume": {"enabled": true},
    }));
    let sleeper_id = id_of(&sleeper);
    let doomed = lab.create(json!({"timeout": 2}));
    let doomed_id = id_of(&doomed);
    let last_of = |id: &str, ty: &str| -> Option<Value> {
        events_of(&lab, &format!("/events/sandboxes/{id}?types={ty}"))
            .first()
            .cloned()
    };
    let paused = wait_for("the timeout pause event", DELIVERY_WAIT, || {
        last_of(&sleeper_id, "sandbox.lifecycle.paused")
    });
    assert_eq!(paused["eventData"]["cause"], "timeout");
    let killed = wait_for("the timeout kill event", DELIVERY_WAIT, || {
        last_of(&doomed_id, "sandbox.lifecycle.killed")
    });
    assert_eq!(killed["eventData"]["cause"], "timeout");
    assert!(killed["eventData"]["execution"]["execution_time"]
        .as_u64()
        .is_some());
    // Traffic wakes the paused one.
    let token = sleeper["envdAccessToken"].as_str().unwrap();
    assert_eq!(
        lab.exec(&sleeper_id, Some(token), "echo awake").ok(),
        "awake\n"
    );
    let resumed = last_of(&sleeper_id, "sandbox.lifecycle.resumed").unwrap();
    assert_eq!(resumed["eventData"]["cause"], "auto_resume");
    assert_ne!(resumed["sandboxExecutionId"], paused["sandboxExecutionId"]);
    lab.finish();
}

/// A sandbox that died while the gateway was down is cleaned up at the next start, and that
/// is its `killed` (cause `failure`); one that survived records nothing new.
#[test]
fn a_sandbox_found_dead_at_restart_is_killed_with_cause_failure() {
    let Some(mut lab) = Lab::new("a_sandbox_found_dead_at_restart_is_killed_with_cause_failure")
    else {
        return;
    };
    lab.start();
    let dead = id_of(&lab.create(json!({"timeout": 600})));
    let alive = id_of(&lab.create(json!({"timeout": 600})));
    lab.wait_templates_imported();
    lab.crash();
    lab.kill_in_jail(&dead);
    lab.start();
    let events = events_of(&lab, &format!("/events/sandboxes/{dead}?orderAsc=true"));
    assert_eq!(
        types_of(&events),
        ["sandbox.lifecycle.created", "sandbox.lifecycle.killed"]
    );
    assert_eq!(events[1]["eventData"]["cause"], "failure");
    assert_eq!(
        events[1]["sandboxExecutionId"],
        events[0]["sandboxExecutionId"]
    );
    let events = events_of(&lab, &format!("/events/sandboxes/{alive}"));
    assert_eq!(types_of(&events), ["sandbox.lifecycle.created"]);
    lab.finish();
}

/// `--event-retention-count` keeps only the newest events; the policy is applied at start
/// (and every minute after).
#[test]
fn retention_keeps_the_newest_events() {
    let Some(mut lab) = Lab::new("retention_keeps_the_newest_events") else {
        return;
    };
    lab.start();
    lab.wait_templates_imported();
    let ids: Vec<String> = (0..3)
        .map(|_| id_of(&lab.create(json!({"timeout": 600}))))
        .collect();
    assert_eq!(events_of(&lab, "/events/sandboxes").len(), 3);
    lab.stop();
    lab.options.args = vec!["--event-retention-count".into(), "1".into()];
    lab.start();
    let left = wait_for("retention applied", DELIVERY_WAIT, || {
        let all = events_of(&lab, "/events/sandboxes");
        (all.len() == 1).then_some(all)
    });
    assert_eq!(left[0]["sandboxId"], ids[2].as_str());
    lab.finish();
}

/// Sandforge's kinds from the enforcement points inside a real sandbox: the agent kills a
/// command whose `Connect-Timeout-Ms` ran out (`task.timeout`, through the agent's report
/// file), and the memory limit's OOM killer stops a hog (`security.violation`, from the
/// jail's cgroup counters). Both reach the read API and a webhook.
#[test]
fn enforcement_inside_a_sandbox_is_recorded_and_delivered() {
    let receiver = Receiver::start();
    let Some(mut lab) = lab_with_loopback_webhooks(
        "enforcement_inside_a_sandbox_is_recorded_and_delivered",
        &[],
    ) else {
        return;
    };
    lab.start();
    lab.wait_templates_imported();
    let r = lab.api(
        "POST",
        "/events/webhooks",
        Some(json!({
            "name": "enforcement",
            "url": receiver.url("/enforcement"),
            "events": ["task.timeout", "security.violation"],
            "signatureSecret": SECRET,
        })),
    );
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let sbx = lab.create(json!({"timeout": 600}));
    let id = id_of(&sbx);
    let token = sbx["envdAccessToken"].as_str().unwrap().to_owned();

    // A command that outlives its 500 ms lifetime.
    let start = lab
        .request("POST", "/process.Process/Start")
        .header("e2b-sandbox-id", &id)
        .header("e2b-sandbox-port", "49983")
        .header("connect-timeout-ms", "500");
    let out = lab.exec_with(start, Some(&token), "sleep 30");
    assert_eq!(out.status, StatusCode::OK);
    assert_eq!(
        out.error.as_ref().unwrap()["code"],
        "deadline_exceeded",
        "{out:?}"
    );
    let path = format!("/events/sandboxes/{id}?types=task.timeout");
    let timeout = wait_for("the task.timeout event", DELIVERY_WAIT, || {
        events_of(&lab, &path).into_iter().next()
    });
    let data = &timeout["eventData"];
    assert_eq!(data["command"], "/bin/sh -c sleep 30", "{timeout}");
    assert_eq!(data["limit_seconds"], 0.5, "{timeout}");
    assert!(data["cpu_consumed"].as_f64().unwrap() < 0.5, "{timeout}");
    assert_eq!(timeout["sandboxId"], id.as_str());
    // How it ended, as task.completed says it too.
    assert!(data["pid"].as_u64().unwrap() > 1, "{timeout}");
    assert_eq!(data["exit_code"], -1, "{timeout}");
    assert_eq!(data["killed"], true, "{timeout}");
    assert_eq!(data["signal"], 9, "{timeout}");
    assert!(
        data["duration_seconds"].as_f64().unwrap() >= 0.5,
        "{timeout}"
    );
    let path = format!("/events/sandboxes/{id}?types=task.completed");
    let completed = wait_for(
        "the task.completed of the timed-out command",
        DELIVERY_WAIT,
        || {
            events_of(&lab, &path)
                .into_iter()
                .find(|e| e["eventData"]["command"] == "/bin/sh -c sleep 30")
        },
    );
    assert_eq!(completed["eventData"]["timed_out"], true, "{completed}");
    for field in ["pid", "exit_code", "killed", "signal", "duration_seconds"] {
        assert_eq!(completed["eventData"][field], data[field], "{field}");
    }
    let delivered = receiver.wait_delivered("/enforcement", timeout["id"].as_str().unwrap(), 1);
    let body: Value = serde_json::from_slice(&delivered[0].body).unwrap();
    assert_eq!(body, timeout);

    // A memory hog: `tail` buffers a line of /dev/zero that never ends, until the sandbox's
    // memory limit has the kernel kill it.
    let out = lab.exec(&id, Some(&token), "tail /dev/zero");
    assert_ne!(out.exit_code, Some(0), "{out:?}");
    let path = format!("/events/sandboxes/{id}?types=security.violation");
    let violation = wait_for("the security.violation event", DELIVERY_WAIT, || {
        events_of(&lab, &path)
            .into_iter()
            .find(|e| e["eventData"]["violation_type"] == "memory_limit")
    });
    let data = &violation["eventData"];
    assert_eq!(data["action"], "killed", "{violation}");
    assert!(data["occurrences"].as_u64().unwrap() >= 1, "{violation}");
    assert!(
        data["blocked_limit"]
            .as_str()
            .unwrap()
            .starts_with("memory "),
        "{violation}"
    );
    receiver.wait_delivered("/enforcement", violation["id"].as_str().unwrap(), 1);

    // Each report and counter step is recorded once: nothing new appears on later passes.
    std::thread::sleep(Duration::from_secs(2));
    let all = events_of(
        &lab,
        &format!("/events/sandboxes/{id}?types=task.timeout,security.violation&limit=100"),
    );
    assert_eq!(all.len(), 2, "{all:?}");
    let r = lab.api("DELETE", &format!("/sandboxes/{id}"), None);
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    lab.finish();
}

/// `task.completed`: a command started through envd is reported when it ends, with its
/// sandbox, pid, command, exit code, duration and whether it was killed, to the read API and
/// to a webhook subscribed to the type (and to no other webhook), so a caller that starts a
/// long command in the background can wait for the webhook instead of polling.
#[test]
fn commands_that_end_are_delivered_as_task_completed() {
    let receiver = Receiver::start();
    let Some(mut lab) =
        lab_with_loopback_webhooks("commands_that_end_are_delivered_as_task_completed", &[])
    else {
        return;
    };
    lab.start();
    lab.wait_templates_imported();
    let mut hook_ids = Vec::new();
    for (name, events) in [
        ("tasks", json!(["task.completed"])),
        ("lifecycle", json!(["sandbox.lifecycle.created"])),
    ] {
        let r = lab.api(
            "POST",
            "/events/webhooks",
            Some(json!({
                "name": name,
                "url": receiver.url(&format!("/{name}")),
                "events": events,
                "signatureSecret": SECRET,
            })),
        );
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
        hook_ids.push(r.json()["id"].as_str().unwrap().to_owned());
    }
    let sbx = lab.create(json!({"timeout": 600, "metadata": {"job": "build"}}));
    let id = id_of(&sbx);
    let token = sbx["envdAccessToken"].as_str().unwrap().to_owned();
    let out = lab.exec(&id, Some(&token), "sleep 1; exit 3");
    assert_eq!(out.exit_code, Some(3), "{out:?}");

    let path = format!("/events/sandboxes/{id}?types=task.completed");
    let done = wait_for("the task.completed event", DELIVERY_WAIT, || {
        events_of(&lab, &path).into_iter().next()
    });
    assert_eq!(done["sandboxId"], id.as_str());
    let data = &done["eventData"];
    assert_eq!(data["command"], "/bin/sh -c sleep 1; exit 3", "{done}");
    assert_eq!(data["exit_code"], 3, "{done}");
    assert_eq!(data["killed"], false, "{done}");
    assert_eq!(data["signal"], Value::Null, "{done}");
    assert_eq!(data["timed_out"], false, "{done}");
    assert!(data["pid"].as_u64().unwrap() > 1, "{done}");
    assert!(data["duration_seconds"].as_f64().unwrap() >= 1.0, "{done}");
    assert_eq!(data["sandbox_metadata"]["job"], "build", "{done}");
    let delivered = receiver.wait_delivered("/tasks", done["id"].as_str().unwrap(), 1);
    check_e2b_signed(&delivered[0], &hook_ids[0]);
    assert_eq!(delivered[0].json(), done);

    // The lifecycle subscriber got its `created` and no task event.
    wait_for("the created delivery", DELIVERY_WAIT, || {
        receiver
            .arrivals()
            .iter()
            .any(|a| a.path == "/lifecycle" && a.answered.is_some())
            .then_some(())
    });
    assert!(
        receiver
            .arrivals()
            .iter()
            .filter(|a| a.path == "/lifecycle")
            .all(|a| a.json()["type"] == "sandbox.lifecycle.created"),
        "{:?}",
        receiver.arrivals()
    );
    let r = lab.api("DELETE", &format!("/sandboxes/{id}"), None);
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    lab.finish();
}

/// The agent's report file is emptied once the gateway has recorded all of it (past 64 KiB),
/// and what the agent appends afterwards is read from its start: a sandbox that runs
/// commands for days keeps reporting. The lines here are written by root in the sandbox
/// (which can write the file, as documented), standing for a few hundred commands.
#[test]
fn the_report_file_is_emptied_once_read_and_reporting_goes_on() {
    let Some(mut lab) = Lab::new("the_report_file_is_emptied_once_read_and_reporting_goes_on")
    else {
        return;
    };
    lab.start();
    lab.wait_templates_imported();
    let sbx = lab.create(json!({"timeout": 600}));
    let id = id_of(&sbx);
    let token = sbx["envdAccessToken"].as_str().unwrap().to_owned();
    let as_root = |cmd: &str| {
        let b = lab
            .request("POST", "/process.Process/Start")
            .header("e2b-sandbox-id", &id)
            .header("e2b-sandbox-port", "49983")
            // `root:` in Basic authentication: envd's way of naming the user.
            .header("authorization", "Basic cm9vdDo=");
        lab.exec_with(b, Some(&token), cmd)
    };
    let line = r#"{"type":"task.completed","at_ms":1,"command":"bulk","timed_out":false,"pid":2,"exit_code":0,"signal":null,"duration_ms":1}"#;
    let out = as_root(&format!(
        "for i in $(seq 1 700); do echo '{line}'; done >> /run/coppice/events.ndjson; \
         stat -c %s /run/coppice/events.ndjson"
    ));
    let written: u64 = out
        .stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{out:?}"));
    assert!(written >= 64 * 1024, "{written}");
    let file = lab.state_dir.join("run").join(&id).join("events.ndjson");
    wait_for("the report file to be emptied", DELIVERY_WAIT, || {
        (std::fs::metadata(&file).unwrap().len() < written).then_some(())
    });
    let bulk = events_of(
        &lab,
        &format!("/events/sandboxes/{id}?types=task.completed&limit=1&orderAsc=true"),
    );
    assert_eq!(bulk[0]["eventData"]["command"], "bulk", "{bulk:?}");
    // A command after the emptying is reported from the file's new start.
    let out = lab.exec(&id, Some(&token), "exit 7");
    assert_eq!(out.exit_code, Some(7), "{out:?}");
    let path = format!("/events/sandboxes/{id}?types=task.completed&limit=1");
    let last = wait_for(
        "the task.completed after the emptying",
        DELIVERY_WAIT,
        || {
            events_of(&lab, &path)
                .into_iter()
                .find(|e| e["eventData"]["command"] == "/bin/sh -c exit 7")
        },
    );
    assert_eq!(last["eventData"]["exit_code"], 7);
    let r = lab.api("DELETE", &format!("/sandboxes/{id}"), None);
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    lab.finish();
}

/// The host pid of sandbox `id`'s agent, from its jail record.
fn agent_pid(lab: &Lab, id: &str) -> i32 {
    let record = lab
        .state_dir
        .join("jail/sandboxes")
        .join(format!("{id}.json"));
    let record: Value = serde_json::from_str(&std::fs::read_to_string(record).unwrap()).unwrap();
    i32::try_from(record["pid"].as_u64().unwrap()).unwrap()
}

/// An agent that dies (here killed from the host; the OOM killer or a crash in real life)
/// takes its sandbox with it: the gateway notices, through the data plane at once or its
/// watcher within seconds, records the sandbox as killed with cause `failure`, and from then
/// on answers 404 on the control plane and E2B's 502 on the data plane.
#[test]
fn a_dead_agent_ends_its_sandbox() {
    let Some(mut lab) = Lab::new("a_dead_agent_ends_its_sandbox") else {
        return;
    };
    lab.start();
    lab.wait_templates_imported();
    let through_traffic = id_of(&lab.create(json!({"timeout": 600})));
    let by_watcher = id_of(&lab.create(json!({"timeout": 600})));
    for id in [&through_traffic, &by_watcher] {
        let pid = agent_pid(&lab, id);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        // Dead once it is a zombie (the gateway, its parent, has not reaped it) or gone.
        wait_for("the agent to die", Duration::from_secs(30), || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_or(true, |s| {
                    s.rfind(')').is_some_and(|i| s[i + 2..].starts_with('Z'))
                })
                .then_some(())
        });
    }

    // Traffic finds the agent gone: E2B's 502, and the sandbox is ended there and then.
    let out = lab.exec(&through_traffic, None, "true");
    assert_eq!(out.status, StatusCode::BAD_GATEWAY, "{out:?}");
    let body: Value = serde_json::from_slice(&out.body).unwrap();
    assert_eq!(body["message"], "The sandbox was not found", "{body}");
    assert_eq!(body["sandboxId"], through_traffic.as_str());
    assert_eq!(lab.detail_status(&through_traffic), 404);

    // Without traffic, the watcher's next pass finds it.
    wait_for(
        "the watcher to end the sandbox",
        Duration::from_secs(30),
        || (lab.detail_status(&by_watcher) == 404).then_some(()),
    );
    for id in [&through_traffic, &by_watcher] {
        let events = events_of(&lab, &format!("/events/sandboxes/{id}?orderAsc=true"));
        assert_eq!(
            types_of(&events),
            ["sandbox.lifecycle.created", "sandbox.lifecycle.killed"],
            "{id}"
        );
        assert_eq!(events[1]["eventData"]["cause"], "failure");
        lab.assert_gone(id);
    }
    let log = lab.log();
    assert!(log.contains("the sandbox's agent died"), "{log}");
    // How it died is in the line: the SIGKILL above.
    assert!(log.contains("killed by signal 9"), "{log}");
    lab.finish();
}

/// `--webhook-ca-file`: an https receiver whose certificate a CA made here signed gets signed
/// deliveries; the CA is trusted only because the operator named it.
#[test]
fn https_webhooks_trust_the_operator_ca_file() {
    // A CA, and a certificate for localhost that it signed.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
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
    let pem_dir = tempfile::tempdir().unwrap();
    let ca_file = pem_dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();

    // The receiver: TLS on 127.0.0.1, answering 200 and keeping each request.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen: Arc<Mutex<Vec<(HeaderMap, Bytes)>>> = Arc::default();
    let kept = Arc::clone(&seen);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, kept) = (acceptor.clone(), Arc::clone(&kept));
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let kept = Arc::clone(&kept);
                        async move {
                            let headers = req.headers().clone();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            kept.lock().unwrap().push((headers, body));
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });

    let Some(mut lab) = lab_with_loopback_webhooks(
        "https_webhooks_trust_the_operator_ca_file",
        &["--webhook-ca-file".into(), ca_file.display().to_string()],
    ) else {
        return;
    };
    lab.start();
    lab.wait_templates_imported();
    let r = lab.api(
        "POST",
        "/events/webhooks",
        Some(json!({
            "name": "tls",
            "url": format!("https://localhost:{port}/tls"),
            "events": ["sandbox.lifecycle.created"],
            "signatureSecret": SECRET,
        })),
    );
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let id = id_of(&lab.create(json!({"timeout": 600})));
    let created = events_of(&lab, &format!("/events/sandboxes/{id}"))
        .into_iter()
        .find(|e| e["type"] == "sandbox.lifecycle.created")
        .unwrap();
    let (headers, body) = wait_for("the https delivery", DELIVERY_WAIT, || {
        seen.lock().unwrap().first().cloned()
    });
    assert_eq!(headers["webhook-id"], created["id"].as_str().unwrap());
    sign::verify_e2b(SECRET, &body, headers["e2b-signature"].to_str().unwrap()).unwrap();
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap(), created);
    let r = lab.api("DELETE", &format!("/sandboxes/{id}"), None);
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    lab.finish();
    drop(rt);
}

/// A connection the sandbox's policy blocks is reported by the kernel and delivered as a
/// signed `security.violation` (issue 14, item 5).
#[test]
fn blocked_egress_is_delivered_as_a_security_violation() {
    let receiver = Receiver::start();
    let Some(mut lab) =
        lab_with_loopback_webhooks("blocked_egress_is_delivered_as_a_security_violation", &[])
    else {
        return;
    };
    lab.options.network = true;
    lab.start();
    let _fake = support::net::FakeInternet::new(&lab.state_dir);
    let r = lab.api(
        "POST",
        "/events/webhooks",
        Some(json!({
            "name": "egress",
            "url": receiver.url("/egress"),
            "events": ["security.violation"],
            "signatureSecret": SECRET,
        })),
    );
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let webhook_id = r.json()["id"].as_str().unwrap().to_owned();
    let sbx = lab.create(json!({"network": {"denyOut": [support::net::SERVER2]}}));
    let id = id_of(&sbx);
    let token = sbx["envdAccessToken"].as_str().unwrap().to_owned();
    let out = lab.exec(
        &id,
        Some(&token),
        &format!(
            "python3 -c 'import socket; socket.create_connection((\"{}\", 8080), timeout=2)'",
            support::net::SERVER2
        ),
    );
    assert_ne!(out.exit_code, Some(0), "{out:?}");
    let path = format!("/events/sandboxes/{id}?types=security.violation");
    let violation = wait_for("the security.violation event", DELIVERY_WAIT, || {
        events_of(&lab, &path).into_iter().next()
    });
    let data = &violation["eventData"];
    assert_eq!(data["violation_type"], "network_egress", "{violation}");
    assert_eq!(
        data["blocked_destination"],
        format!("{}:8080", support::net::SERVER2),
        "{violation}"
    );
    assert_eq!(data["action"], "blocked", "{violation}");
    let delivered = receiver.wait_delivered("/egress", violation["id"].as_str().unwrap(), 1);
    check_e2b_signed(&delivered[0], &webhook_id);
    let body: Value = serde_json::from_slice(&delivered[0].body).unwrap();
    assert_eq!(body, violation);
    let r = lab.api("DELETE", &format!("/sandboxes/{id}"), None);
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    lab.finish();
}
