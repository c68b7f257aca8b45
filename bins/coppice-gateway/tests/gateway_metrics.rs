//! What an operator watches, through the real gateway: the Prometheus series at `GET /metrics`
//! moving as real sandboxes are created, paused (by call and by timeout), resumed (by call,
//! connect and traffic) and killed (by call and by timeout), with request latencies, proxy
//! bytes and webhook deliveries to a receiver on loopback; each sandbox's resource history at `GET /sandboxes/{id}/metrics` with its `start`
//! and `end` filters and `GET /sandboxes/metrics`; and the sandbox logs routes, legacy and v2,
//! with their filters, readable while paused and after the kill, and bounded on disk. Real
//! binary, real sandboxes; see `support/mod.rs`.
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

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::Duration;

use http::StatusCode;
use serde_json::{json, Value};
use support::{empty, id_of, millis, now_millis, token_of, wait_for, Lab, Resp};

/// How long the reaper may take to act on an ended window (it looks every 250 ms).
const REAPER_WAIT: Duration = Duration::from_secs(30);
/// How long the gateway's 5 s sampler may take to come round.
const SAMPLER_WAIT: Duration = Duration::from_secs(30);
/// How long a webhook delivery may take to arrive.
const DELIVERY_WAIT: Duration = Duration::from_secs(60);

/// `GET /metrics` as the lab's client; asserts 200 and the exposition content type.
fn scrape(lab: &Lab) -> BTreeMap<String, f64> {
    let r = lab.api("GET", "/metrics", None);
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let ct = r
        .headers
        .get(http::header::CONTENT_TYPE)
        .unwrap()
        .to_str()
        .unwrap();
    assert_eq!(ct, "text/plain; version=0.0.4; charset=utf-8");
    parse_exposition(&r.text())
}

/// Series (name with labels, as written) → value; every line must be a comment or a sample.
fn parse_exposition(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample: {line:?}"));
        let value = match value {
            "+Inf" => f64::INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        assert!(
            out.insert(series.to_owned(), value).is_none(),
            "{series} twice"
        );
    }
    out
}

fn get(m: &BTreeMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("no {series} in {:?}", m.keys().collect::<Vec<_>>()))
}

/// How much each of `series` moved from `before` to `after`.
fn moved(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, series: &str) -> f64 {
    get(after, series) - before.get(series).copied().unwrap_or(0.0)
}

fn state(lab: &Lab, id: &str) -> String {
    lab.detail(id)["state"].as_str().unwrap().to_owned()
}

#[test]
fn prometheus_series_follow_the_lifecycle() {
    let Some(mut lab) = Lab::new("prometheus_series_follow_the_lifecycle") else {
        return;
    };
    let receiver = Receiver::start();
    lab.options.api_keys = Some("k1".into());
    lab.options.args = vec![
        "--webhook-allow".into(),
        "127.0.0.0/8".into(),
        "--warm-pool".into(),
        "2".into(),
    ];
    lab.start();

    // Behind the API key, like every control-plane route but /health.
    lab.send(lab.request("GET", "/metrics").body(empty()).unwrap())
        .assert_error(401, "metrics without a key");
    lab.key = Some("k1".into());
    // Prometheus sends its credentials as a bearer token.
    let r = lab.send(
        lab.request("GET", "/metrics")
            .header("authorization", "Bearer k1")
            .body(empty())
            .unwrap(),
    );
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = lab.api(
        "POST",
        "/events/webhooks",
        Some(json!({
            "name": "metrics",
            "url": format!("http://{}/hook", receiver.addr),
            "events": ["sandbox.lifecycle.created"],
            "signatureSecret": "s3cr3t",
        })),
    );
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let t0 = scrape(&lab);
    assert_eq!(get(&t0, "coppice_sandboxes_created_total"), 0.0);
    assert_eq!(
        get(&t0, "coppice_webhook_attempts_total{outcome=\"delivered\"}"),
        0.0
    );
    assert_eq!(get(&t0, "coppice_sandboxes_running"), 0.0);

    // Created, then traffic through the proxy (which counts bytes both ways).
    let s = lab.create(json!({"autoPause": true, "autoResume": {"enabled": true}}));
    let (id, token) = (id_of(&s), token_of(&s));
    assert_eq!(lab.exec(&id, Some(&token), "echo hello").ok(), "hello\n");
    let t1 = scrape(&lab);
    assert_eq!(moved(&t0, &t1, "coppice_sandboxes_created_total"), 1.0);
    assert_eq!(get(&t1, "coppice_sandboxes_running"), 1.0);
    assert_eq!(get(&t1, "coppice_sandboxes_paused"), 0.0);
    assert!(
        moved(&t0, &t1, "coppice_proxy_bytes_total{direction=\"in\"}") > 0.0,
        "the Start request's body went in"
    );
    assert!(
        moved(&t0, &t1, "coppice_proxy_bytes_total{direction=\"out\"}") > 0.0,
        "the stream came out"
    );
    assert_eq!(
        moved(
            &t0,
            &t1,
            "coppice_http_request_duration_seconds_count{family=\"proxy_envd\"}"
        ),
        1.0
    );
    assert_eq!(
        moved(
            &t0,
            &t1,
            "coppice_http_responses_total{family=\"proxy_envd\",code=\"2xx\"}"
        ),
        1.0
    );
    assert!(
        moved(
            &t0,
            &t1,
            "coppice_http_request_duration_seconds_count{family=\"sandboxes\"}"
        ) >= 1.0
    );
    // The scrape before this one counted itself.
    assert!(
        get(
            &t1,
            "coppice_http_request_duration_seconds_count{family=\"metrics\"}"
        ) >= 2.0
    );

    // Paused by a call, resumed by connect.
    let r = lab.api("POST", &format!("/sandboxes/{id}/pause"), None);
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    let t2 = scrape(&lab);
    assert_eq!(
        moved(&t1, &t2, "coppice_sandboxes_paused_total{cause=\"manual\"}"),
        1.0
    );
    assert_eq!(get(&t2, "coppice_sandboxes_paused"), 1.0);
    assert_eq!(get(&t2, "coppice_sandboxes_running"), 0.0);
    let r = lab.api(
        "POST",
        &format!("/v2/sandboxes/{id}/connect"),
        Some(json!({})),
    );
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let t3 = scrape(&lab);
    assert_eq!(
        moved(&t2, &t3, "coppice_sandboxes_resumed_total{via=\"connect\"}"),
        1.0
    );

    // Paused again, woken by traffic.
    let r = lab.api("POST", &format!("/sandboxes/{id}/pause"), None);
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    assert_eq!(lab.exec(&id, Some(&token), "echo awake").ok(), "awake\n");
    let t4 = scrape(&lab);
    assert_eq!(
        moved(&t3, &t4, "coppice_sandboxes_resumed_total{via=\"auto\"}"),
        1.0
    );
    assert_eq!(
        moved(&t3, &t4, "coppice_sandboxes_paused_total{cause=\"manual\"}"),
        1.0
    );

    // Paused again, resumed by the legacy resume call.
    let r = lab.api("POST", &format!("/sandboxes/{id}/pause"), None);
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    let r = lab.api(
        "POST",
        &format!("/sandboxes/{id}/resume"),
        Some(json!({"timeout": 60})),
    );
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let t5 = scrape(&lab);
    assert_eq!(
        moved(&t4, &t5, "coppice_sandboxes_resumed_total{via=\"manual\"}"),
        1.0
    );
    // A refused pause (already paused) counts nothing.
    let r = lab.api("POST", &format!("/sandboxes/{id}/pause"), None);
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    lab.api("POST", &format!("/sandboxes/{id}/pause"), None)
        .assert_error(409, "pause twice");
    let t6 = scrape(&lab);
    assert_eq!(
        moved(&t5, &t6, "coppice_sandboxes_paused_total{cause=\"manual\"}"),
        1.0
    );
    assert!(
        moved(
            &t5,
            &t6,
            "coppice_http_responses_total{family=\"sandboxes\",code=\"4xx\"}"
        ) >= 1.0
    );

    // Killed by a call.
    let r = lab.api("DELETE", &format!("/sandboxes/{id}"), None);
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    let t7 = scrape(&lab);
    assert_eq!(
        moved(&t6, &t7, "coppice_sandboxes_killed_total{cause=\"manual\"}"),
        1.0
    );
    assert_eq!(get(&t7, "coppice_sandboxes_paused"), 0.0);

    // The window's end: one pauses, one is killed.
    let sleeper = id_of(&lab.create(json!({"timeout": 1, "autoPause": true})));
    let doomed = id_of(&lab.create(json!({"timeout": 1})));
    wait_for("the reaper to pause and kill", REAPER_WAIT, || {
        (state(&lab, &sleeper) == "paused" && lab.detail_status(&doomed) == 404).then_some(())
    });
    let t8 = scrape(&lab);
    assert_eq!(moved(&t7, &t8, "coppice_sandboxes_created_total"), 2.0);
    assert_eq!(
        moved(
            &t7,
            &t8,
            "coppice_sandboxes_paused_total{cause=\"timeout\"}"
        ),
        1.0
    );
    assert_eq!(
        moved(
            &t7,
            &t8,
            "coppice_sandboxes_killed_total{cause=\"timeout\"}"
        ),
        1.0
    );
    assert_eq!(get(&t8, "coppice_sandboxes_paused"), 1.0);
    assert_eq!(get(&t8, "coppice_sandboxes_running"), 0.0);
    // The warm pool refills to its size once creates stop (2 per template here).
    wait_for("the warm pool to refill", REAPER_WAIT, || {
        let m = scrape(&lab);
        (get(&m, "coppice_warm_sandboxes{template=\"base\"}") == 2.0).then_some(())
    });
    // The three `created` events reached the receiver: the dispatcher's counters and the
    // outbox say so.
    let t9 = wait_for("three deliveries counted", DELIVERY_WAIT, || {
        let m = scrape(&lab);
        (get(&m, "coppice_webhook_attempts_total{outcome=\"delivered\"}") >= 3.0).then_some(m)
    });
    assert_eq!(receiver.count(), 3);
    assert_eq!(
        get(&t9, "coppice_webhook_attempts_total{outcome=\"delivered\"}"),
        3.0
    );
    assert_eq!(
        get(&t9, "coppice_webhook_attempts_total{outcome=\"failed\"}"),
        0.0
    );
    assert!(get(&t9, "coppice_webhook_connections_total") >= 1.0);
    assert_eq!(get(&t9, "coppice_webhook_outbox{state=\"delivered\"}"), 3.0);
    assert_eq!(get(&t9, "coppice_webhook_outbox{state=\"pending\"}"), 0.0);
    lab.finish();
}

/// A webhook receiver on loopback that accepts everything and counts what it got.
struct Receiver {
    addr: std::net::SocketAddr,
    count: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    fn start() -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&count);
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
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
                    let seen = Arc::clone(&seen);
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(
                            move |req: http::Request<hyper::body::Incoming>| {
                                let seen = Arc::clone(&seen);
                                async move {
                                    use http_body_util::BodyExt as _;
                                    let _ = req.into_body().collect().await;
                                    seen.fetch_add(1, Ordering::SeqCst);
                                    Ok::<_, std::convert::Infallible>(http::Response::new(
                                        http_body_util::Full::new(bytes::Bytes::new()),
                                    ))
                                }
                            },
                        );
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        });
        Self {
            addr,
            count,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn count(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::SeqCst)
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

/// `GET /sandboxes/{id}/metrics` with a raw query.
fn sandbox_metrics(lab: &Lab, id: &str, query: &str) -> Resp {
    lab.api("GET", &format!("/sandboxes/{id}/metrics{query}"), None)
}

fn samples(r: &Resp) -> Vec<Value> {
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json().as_array().expect("an array of samples").clone()
}

#[test]
fn sandbox_metrics_keep_a_history_with_filters() {
    let Some(mut lab) = Lab::new("sandbox_metrics_keep_a_history_with_filters") else {
        return;
    };
    lab.start();
    let s = lab.create(json!({}));
    let (id, token) = (id_of(&s), token_of(&s));
    let created = now_millis();

    // A new sandbox has a sample at once, in E2B's shape.
    let first = samples(&sandbox_metrics(&lab, &id, ""));
    assert!(!first.is_empty(), "a running sandbox has a sample");
    let s0 = &first[0];
    assert_eq!(s0["cpuCount"], json!(2), "{s0}");
    assert_eq!(s0["memTotal"], json!(1u64 << 30), "{s0}");
    assert!(s0["memUsed"].as_u64().unwrap() > 0, "{s0}");
    assert!(s0["diskTotal"].as_u64().unwrap() > 0, "{s0}");
    assert!(s0["diskUsed"].is_u64() && s0["memCache"].is_u64(), "{s0}");
    let pct = s0["cpuUsedPct"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&pct), "{s0}");
    let at = millis(&s0["timestamp"]);
    assert_eq!(s0["timestampUnix"].as_u64().unwrap(), at / 1000, "{s0}");

    // Work shows up in the next samples: CPU, and disk written.
    let out = lab.exec(
        &id,
        Some(&token),
        "dd if=/dev/zero of=/home/user/blob bs=1M count=8 2>/dev/null; \
         end=$(($(date +%s) + 2)); while [ $(date +%s) -lt $end ]; do :; done; echo done",
    );
    assert_eq!(out.ok(), "done\n");
    let history = wait_for("the sampler's next two samples", SAMPLER_WAIT, || {
        let h = samples(&sandbox_metrics(&lab, &id, ""));
        (h.len() >= 3).then_some(h)
    });
    let times: Vec<u64> = history.iter().map(|s| millis(&s["timestamp"])).collect();
    assert!(
        times.windows(2).all(|w| w[0] < w[1]),
        "oldest first: {times:?}"
    );
    assert!(
        history
            .iter()
            .any(|s| s["diskUsed"].as_u64().unwrap() >= 8 << 20),
        "the 8 MiB file is on disk: {history:?}"
    );
    assert!(
        history
            .iter()
            .any(|s| s["cpuUsedPct"].as_f64().unwrap() > 1.0),
        "the busy loop used CPU: {history:?}"
    );
    // Writing the file filled the page cache, which is reported apart from used memory.
    assert!(
        history
            .iter()
            .any(|s| s["memCache"].as_u64().unwrap() >= 4 << 20),
        "the file's pages are cached: {history:?}"
    );
    for s in &history {
        let (used, cache) = (
            s["memUsed"].as_u64().unwrap(),
            s["memCache"].as_u64().unwrap(),
        );
        assert!(used + cache <= 1 << 30, "{s}");
    }

    // start and end are Unix seconds, both included.
    let t1 = times[1] / 1000;
    let from = samples(&sandbox_metrics(&lab, &id, &format!("?start={t1}")));
    assert!(from.iter().all(|s| millis(&s["timestamp"]) >= t1 * 1000));
    assert!(from.iter().any(|s| millis(&s["timestamp"]) == times[1]));
    let until = samples(&sandbox_metrics(&lab, &id, &format!("?start=0&end={t1}")));
    assert!(until
        .iter()
        .all(|s| millis(&s["timestamp"]) < (t1 + 1) * 1000));
    assert!(until.iter().any(|s| millis(&s["timestamp"]) == times[1]));
    let before_birth = (created / 1000).saturating_sub(3600);
    assert_eq!(
        samples(&sandbox_metrics(
            &lab,
            &id,
            &format!("?start={}&end={before_birth}", before_birth - 10)
        )),
        Vec::<Value>::new()
    );
    let future = now_millis() / 1000 + 3600;
    assert_eq!(
        samples(&sandbox_metrics(
            &lab,
            &id,
            &format!("?start={future}&end={}", future + 60)
        )),
        Vec::<Value>::new()
    );
    // As on E2B, `end` defaults to now, so a `start` in the future alone is after it.
    sandbox_metrics(&lab, &id, &format!("?start={future}"))
        .assert_error(400, "start after the default end");
    sandbox_metrics(&lab, &id, &format!("?start={future}&end={t1}"))
        .assert_error(400, "start after end");
    sandbox_metrics(&lab, &id, "?start=yesterday").assert_error(400, "start not a number");
    sandbox_metrics(&lab, &id, "?end=-1").assert_error(400, "negative end");

    // The latest sample of several sandboxes; unknown ones are left out.
    let r = lab.api(
        "GET",
        &format!("/sandboxes/metrics?sandbox_ids={id},nosuchsandbox"),
        None,
    );
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let all = r.json();
    let map = all["sandboxes"].as_object().unwrap();
    assert_eq!(map.len(), 1, "{all}");
    assert!(
        millis(&map[&id]["timestamp"]) >= *times.last().unwrap(),
        "{all}"
    );
    lab.api("GET", "/sandboxes/metrics", None)
        .assert_error(400, "sandbox_ids is required");
    let many: Vec<String> = (0..101).map(|i| format!("s{i}")).collect();
    lab.api(
        "GET",
        &format!("/sandboxes/metrics?sandbox_ids={}", many.join(",")),
        None,
    )
    .assert_error(400, "more than 100 ids");

    // A paused sandbox is not sampled; its history stays readable.
    let r = lab.api("POST", &format!("/sandboxes/{id}/pause"), None);
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    let paused = samples(&sandbox_metrics(&lab, &id, ""));
    assert!(!paused.is_empty());

    // Gone with the sandbox.
    let r = lab.api("DELETE", &format!("/sandboxes/{id}"), None);
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    sandbox_metrics(&lab, &id, "").assert_error(404, "metrics after kill");
    sandbox_metrics(&lab, "nosuchsandbox", "").assert_error(404, "unknown sandbox");
    lab.finish();
}

/// `GET {path}` for a sandbox's logs; asserts 200 and returns the body.
fn logs(lab: &Lab, path: &str) -> Value {
    let r = lab.api("GET", path, None);
    assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text());
    r.json()
}

fn messages(entries: &Value) -> Vec<String> {
    entries
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap().to_owned())
        .collect()
}

/// The pid of the process whose start line shows `command`.
fn started_pid(entries: &Value, command: &str) -> String {
    entries
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            e["fields"]["event_type"] == "process_start"
                && e["fields"]["command"]
                    .as_str()
                    .is_some_and(|c| c.contains(command))
        })
        .unwrap_or_else(|| panic!("no start of {command:?} in {entries}"))["fields"]["pid"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn sandbox_logs_show_processes_with_filters_and_outlive_the_sandbox() {
    let Some(mut lab) =
        Lab::new("sandbox_logs_show_processes_with_filters_and_outlive_the_sandbox")
    else {
        return;
    };
    lab.start();
    let s = lab.create(json!({}));
    let (id, token) = (id_of(&s), token_of(&s));
    let before = now_millis();
    assert_eq!(
        lab.exec(&id, Some(&token), "echo marker-one").ok(),
        "marker-one\n"
    );
    let failed = lab.exec(&id, Some(&token), "echo marker-two; exit 3");
    assert_eq!(failed.exit_code, Some(3), "{failed:?}");

    // v2: newest first by default, structured, with E2B's fields.
    let v2 = logs(&lab, &format!("/v2/sandboxes/{id}/logs"));
    let entries = &v2["logs"];
    let all = messages(entries);
    let one = started_pid(entries, "marker-one");
    let two = started_pid(entries, "marker-two");
    let pos = |m: &str| {
        all.iter()
            .position(|x| x == m)
            .unwrap_or_else(|| panic!("no {m:?} in {all:?}"))
    };
    let (start_one, end_two) = (
        pos(&format!("Process with pid {one} started")),
        pos(&format!("Process with pid {two} ended")),
    );
    assert!(end_two < start_one, "newest first: {all:?}");
    let end = &entries[end_two];
    assert_eq!(end["level"], "info");
    assert_eq!(end["fields"]["exit_code"], "3", "{end}");
    assert_eq!(end["fields"]["event_type"], "process_end", "{end}");
    let times: Vec<u64> = entries
        .as_array()
        .unwrap()
        .iter()
        .map(|e| millis(&e["timestamp"]))
        .collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "{times:?}");
    assert!(times[end_two] >= before.saturating_sub(1000));
    // The agent's own start is there too.
    assert!(all.iter().any(|m| m == "coppice-envd listening"), "{all:?}");

    // Forward from a cursor: oldest first, from that millisecond on.
    let cursor = millis(&entries[start_one]["timestamp"]);
    let fwd = logs(
        &lab,
        &format!("/v2/sandboxes/{id}/logs?direction=forward&cursor={cursor}&limit=2"),
    );
    let fwd = messages(&fwd["logs"]);
    assert_eq!(fwd.len(), 2, "{fwd:?}");
    assert!(
        fwd.contains(&format!("Process with pid {one} started")),
        "{fwd:?}"
    );
    // Backward from a cursor: strictly before it.
    let back = logs(&lab, &format!("/v2/sandboxes/{id}/logs?cursor={cursor}"));
    assert!(back["logs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| millis(&e["timestamp"]) < cursor));
    // Level is a minimum; search a case-sensitive substring of the message.
    let warn = logs(&lab, &format!("/v2/sandboxes/{id}/logs?level=warn"));
    assert!(
        warn["logs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["level"] == "warn" || e["level"] == "error"),
        "{warn}"
    );
    let found = logs(
        &lab,
        &format!("/v2/sandboxes/{id}/logs?search=pid%20{two}%20ended"),
    );
    assert_eq!(
        messages(&found["logs"]),
        [format!("Process with pid {two} ended")]
    );
    let none = logs(&lab, &format!("/v2/sandboxes/{id}/logs?search=PROCESS"));
    assert_eq!(none["logs"], json!([]));
    let limited = logs(&lab, &format!("/v2/sandboxes/{id}/logs?limit=1"));
    assert_eq!(messages(&limited["logs"]), [all[0].clone()]);

    // Legacy: oldest first, raw lines beside the structured entries.
    let legacy = logs(&lab, &format!("/sandboxes/{id}/logs"));
    let raw = legacy["logs"].as_array().unwrap();
    let structured = legacy["logEntries"].as_array().unwrap();
    assert_eq!(raw.len(), structured.len());
    assert_eq!(raw.len(), all.len());
    for (r, e) in raw.iter().zip(structured) {
        assert_eq!(r["timestamp"], e["timestamp"]);
        let line: Value = serde_json::from_str(r["line"].as_str().unwrap()).unwrap();
        assert_eq!(line["message"], e["message"]);
    }
    assert_eq!(
        messages(&legacy["logEntries"])
            .into_iter()
            .rev()
            .collect::<Vec<_>>(),
        all
    );
    let later = logs(
        &lab,
        &format!("/sandboxes/{id}/logs?start={cursor}&limit=1"),
    );
    assert_eq!(
        messages(&later["logEntries"]),
        [format!("Process with pid {one} started")]
    );

    // Bad parameters: 400 with E2B's body.
    for q in [
        "level=loud",
        "limit=1001",
        "limit=-1",
        "direction=up",
        "cursor=soon",
    ] {
        lab.api("GET", &format!("/v2/sandboxes/{id}/logs?{q}"), None)
            .assert_error(400, q);
    }
    let long = "x".repeat(257);
    lab.api(
        "GET",
        &format!("/v2/sandboxes/{id}/logs?search={long}"),
        None,
    )
    .assert_error(400, "search too long");
    lab.api("GET", &format!("/sandboxes/{id}/logs?start=-5"), None)
        .assert_error(400, "negative start");

    // Readable while paused, and after the kill.
    let r = lab.api("POST", &format!("/sandboxes/{id}/pause"), None);
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    assert_eq!(
        messages(&logs(&lab, &format!("/v2/sandboxes/{id}/logs"))["logs"]),
        all
    );
    let r = lab.api("DELETE", &format!("/sandboxes/{id}"), None);
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    let after = messages(&logs(&lab, &format!("/v2/sandboxes/{id}/logs"))["logs"]);
    assert!(after.len() >= all.len(), "{after:?}");
    assert!(after.ends_with(&all), "{after:?}");
    lab.api("GET", "/v2/sandboxes/nosuchsandbox/logs", None)
        .assert_error(404, "unknown sandbox");
    lab.api("GET", "/sandboxes/nosuchsandbox/logs", None)
        .assert_error(404, "unknown sandbox (legacy)");
    lab.finish();
}

#[test]
fn a_sandbox_log_stays_bounded() {
    let Some(mut lab) = Lab::new("a_sandbox_log_stays_bounded") else {
        return;
    };
    lab.start();
    let s = lab.create(json!({}));
    let (id, token) = (id_of(&s), token_of(&s));
    let path = lab.state_dir.join(format!("jail/logs/{id}.log"));
    let old = lab.state_dir.join(format!("jail/logs/{id}.log.1"));
    // A chatty sandbox: 6 MiB of log lines appended the way the agent appends them.
    let filler = format!(
        "{{\"timestamp\":\"2026-01-01T00:00:00.000Z\",\"level\":\"debug\",\"message\":\"{}\"}}\n",
        "x".repeat(1000)
    );
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    for _ in 0..(6 << 20) / filler.len() {
        f.write_all(filler.as_bytes()).unwrap();
    }
    drop(f);
    let limit = 4u64 << 20;
    wait_for("the log to be rotated", SAMPLER_WAIT, || {
        (std::fs::metadata(&path).unwrap().len() < limit && old.exists()).then_some(())
    });
    assert!(std::fs::metadata(&old).unwrap().len() > limit);
    // The agent goes on logging into the emptied file, and the route reads both.
    assert_eq!(lab.exec(&id, Some(&token), "echo after").ok(), "after\n");
    let v2 = logs(&lab, &format!("/v2/sandboxes/{id}/logs?limit=5"));
    assert!(
        messages(&v2["logs"])
            .iter()
            .any(|m| m.ends_with("started") || m.ends_with("ended")),
        "{v2}"
    );
    let total = std::fs::metadata(&path).unwrap().len() + std::fs::metadata(&old).unwrap().len();
    assert!(total < 2 * limit + (1 << 20), "{total} bytes kept");
    lab.finish();
}
