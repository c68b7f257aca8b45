//! The gateway end to end over HTTP: the control plane (create, get, list, pause, connect,
//! resume, timeout, refreshes, metrics, kill), API keys, the data-plane proxy and what bad
//! input does (nothing). Each test runs the real binary with real sandboxes; see
//! `support/mod.rs` for the harness and why the tests run one at a time.
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

use std::collections::BTreeSet;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use serde_json::json;
use support::{
    empty, id_of, ids_of, metadata_query, millis, next_token, now_millis, token_of, Exec, Lab,
};

/// Slack for comparing a window end with the test's own clock: the gateway stamps times
/// between the test's before and after readings, rounded to milliseconds.
const CLOCK_SLACK_MS: u64 = 1_000;

fn is_sandbox_id(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// The proxy's answer for a sandbox that is not reachable, byte for byte.
fn assert_not_found(e: &Exec, id: &str) {
    assert_eq!(e.status, StatusCode::BAD_GATEWAY, "{e:?}");
    assert_eq!(
        e.body,
        Bytes::from(format!(
            r#"{{"sandboxId":"{id}","message":"The sandbox was not found","code":502}}"#
        )),
        "{e:?}"
    );
}

fn end_at(lab: &Lab, id: &str) -> u64 {
    millis(&lab.detail(id)["endAt"])
}

/// Runs `call` and asserts the sandbox's window then ends `secs` from the time of the call.
fn assert_window_set(lab: &Lab, id: &str, secs: u64, call: impl FnOnce()) {
    let before = now_millis();
    call();
    let after = now_millis();
    let end = end_at(lab, id);
    assert!(
        end + CLOCK_SLACK_MS >= before + secs * 1000 && end <= after + secs * 1000 + CLOCK_SLACK_MS,
        "endAt {end} is not {secs} s after [{before}, {after}]"
    );
}

#[test]
fn control_plane_lifecycle() {
    let Some(mut lab) = Lab::new("control_plane_lifecycle") else {
        return;
    };
    lab.start();
    // Its stderr is a file here, as under a service manager: plain text, no colour codes.
    assert!(
        !lab.log().contains('\u{1b}'),
        "terminal escapes in a log written to a file"
    );

    // Create: 201 and the fields the SDK needs.
    let created = lab.create(json!({
        "templateID": "base",
        "timeout": 120,
        "metadata": {"owner": "lifecycle"},
        "envVars": {"GREETING": "hi"},
    }));
    let id = id_of(&created);
    assert!(is_sandbox_id(&id), "{id:?} is not [a-z0-9]+");
    assert!(created["clientID"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(created["envdVersion"]
        .as_str()
        .is_some_and(|v| v >= "0.1.0"));
    assert_eq!(created["templateID"], "base");
    let token = token_of(&created);
    assert!(!token.is_empty());
    assert_eq!(
        lab.exec(&id, Some(&token), "echo $GREETING").ok(),
        "hi\n",
        "envVars reach processes"
    );

    // Detail.
    let d = lab.detail(&id);
    assert_eq!(d["sandboxID"], json!(id));
    assert_eq!(d["templateID"], "base");
    assert_eq!(d["state"], "running");
    assert_eq!(d["metadata"], json!({"owner": "lifecycle"}));
    assert_eq!(d["envdAccessToken"], json!(token));
    assert_eq!(d["lifecycle"]["autoResume"], json!(false));
    assert_eq!(d["lifecycle"]["onTimeout"], "kill");
    for field in ["cpuCount", "memoryMB", "diskSizeMB"] {
        assert!(d[field].is_u64(), "{field} in {d}");
    }
    assert!(d["envdVersion"].is_string() && d["clientID"].is_string());
    let started = millis(&d["startedAt"]);
    let end = millis(&d["endAt"]);
    assert!(
        end >= started + 120_000 && end <= started + 120_000 + 30_000,
        "a 120 s window: startedAt {started}, endAt {end}"
    );

    // Pause: 204, then 409.
    let r = lab.api("POST", &format!("/sandboxes/{id}/pause"), Some(json!({})));
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    lab.api("POST", &format!("/sandboxes/{id}/pause"), None)
        .assert_error(409, "pause of a paused sandbox");
    assert_eq!(lab.detail(&id)["state"], "paused");

    // Connect resumes a paused sandbox (201) ...
    let r = lab.api(
        "POST",
        &format!("/v2/sandboxes/{id}/connect"),
        Some(json!({"timeout": 60})),
    );
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(id_of(&r.json()), id);
    assert_eq!(token_of(&r.json()), token);
    assert_eq!(lab.detail(&id)["state"], "running");
    assert_eq!(lab.exec(&id, Some(&token), "echo back").ok(), "back\n");

    // ... and on a running one answers 200 and only ever extends the window.
    let end1 = end_at(&lab, &id);
    let r = lab.api(
        "POST",
        &format!("/v2/sandboxes/{id}/connect"),
        Some(json!({"timeout": 5})),
    );
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        end_at(&lab, &id),
        end1,
        "connect must not shorten the window"
    );
    assert_window_set(&lab, &id, 600, || {
        let r = lab.api(
            "POST",
            &format!("/v2/sandboxes/{id}/connect"),
            Some(json!({"timeout": 600})),
        );
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    });
    // The legacy connect needs a timeout and behaves the same.
    let r = lab.api(
        "POST",
        &format!("/sandboxes/{id}/connect"),
        Some(json!({"timeout": 10})),
    );
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());

    // Timeout overwrites, shortening too.
    assert_window_set(&lab, &id, 100, || {
        let r = lab.api(
            "POST",
            &format!("/sandboxes/{id}/timeout"),
            Some(json!({"timeout": 100})),
        );
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    });

    // Refreshes only extend.
    let end2 = end_at(&lab, &id);
    let r = lab.api(
        "POST",
        &format!("/sandboxes/{id}/refreshes"),
        Some(json!({"duration": 10})),
    );
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    assert_eq!(end_at(&lab, &id), end2, "a shorter refresh changes nothing");
    assert_window_set(&lab, &id, 3000, || {
        let r = lab.api(
            "POST",
            &format!("/sandboxes/{id}/refreshes"),
            Some(json!({"duration": 3000})),
        );
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    });

    // Legacy resume: 409 while running, 201 when paused.
    lab.api("POST", &format!("/sandboxes/{id}/resume"), Some(json!({})))
        .assert_error(409, "resume of a running sandbox");
    let r = lab.api("POST", &format!("/sandboxes/{id}/pause"), None);
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    let r = lab.api(
        "POST",
        &format!("/sandboxes/{id}/resume"),
        Some(json!({"timeout": 60, "autoPause": false})),
    );
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(id_of(&r.json()), id);
    assert_eq!(lab.detail(&id)["state"], "running");

    // Metrics: a JSON array of samples.
    let r = lab.api("GET", &format!("/sandboxes/{id}/metrics"), None);
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let samples = r.json();
    for s in samples.as_array().expect("metrics are an array") {
        for field in [
            "timestampUnix",
            "cpuCount",
            "memUsed",
            "memTotal",
            "diskTotal",
        ] {
            assert!(s[field].is_u64() || s[field].is_i64(), "{field} in {s}");
        }
        assert!(s["cpuUsedPct"].is_number(), "{s}");
        millis(&s["timestamp"]);
    }

    // The legacy create's default window is 15 s.
    let r = lab.api("POST", "/sandboxes", Some(json!({"templateID": "base"})));
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let legacy = id_of(&r.json());
    let d = lab.detail(&legacy);
    assert_eq!(d["lifecycle"]["timeoutMs"], json!(15_000), "{d}");
    let (started, end) = (millis(&d["startedAt"]), millis(&d["endAt"]));
    assert!(
        end >= started + 15_000 && end <= started + 15_000 + 30_000,
        "a 15 s window: {d}"
    );
    let r = lab.api("DELETE", &format!("/sandboxes/{legacy}"), None);
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());

    // Kill: 204, then 404 everywhere.
    let r = lab.api("DELETE", &format!("/sandboxes/{id}"), None);
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    lab.api("GET", &format!("/sandboxes/{id}"), None)
        .assert_error(404, "get after kill");
    lab.api("DELETE", &format!("/sandboxes/{id}"), None)
        .assert_error(404, "kill after kill");
    for (method, path, body) in [
        ("POST", "pause", None),
        ("POST", "timeout", Some(json!({"timeout": 10}))),
        ("POST", "refreshes", Some(json!({"duration": 10}))),
        ("GET", "metrics", None),
    ] {
        lab.api(method, &format!("/sandboxes/{id}/{path}"), body)
            .assert_error(404, path);
    }
    lab.api(
        "POST",
        &format!("/v2/sandboxes/{id}/connect"),
        Some(json!({})),
    )
    .assert_error(404, "connect after kill");
    lab.assert_gone(&id);
    lab.assert_gone(&legacy);
    lab.finish();
}

#[test]
fn list_filters_pages_and_orders() {
    let Some(mut lab) = Lab::new("list_filters_pages_and_orders") else {
        return;
    };
    // The encoder reproduces the SDK's captured triple encoding (spec §2.6).
    assert_eq!(
        metadata_query(&[("user", "alice"), ("k y", "v&1")]),
        "user%3Dalice%26k%252520y%3Dv%2525261"
    );
    lab.start();
    let a = id_of(&lab.create(json!({"metadata": {"suite": "list", "n": "1"}})));
    let b = id_of(&lab.create(json!({"metadata": {"suite": "list", "n": "2"}})));
    let c = id_of(&lab.create(json!({"metadata": {"suite": "list", "n": "3", "k y": "v&1"}})));
    let r = lab.api("POST", &format!("/sandboxes/{b}/pause"), None);
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());

    let list = |query: &str| -> (Vec<String>, Option<String>) {
        let r = lab.api("GET", &format!("/v2/sandboxes{query}"), None);
        assert_eq!(r.status, StatusCode::OK, "{query}: {}", r.text());
        (ids_of(&r.json()), next_token(&r))
    };
    let set = |ids: Vec<String>| ids.into_iter().collect::<BTreeSet<_>>();
    let of = |ids: &[&String]| ids.iter().map(|s| (*s).clone()).collect::<BTreeSet<_>>();

    // No state: running and paused; newest first; items carry their state.
    let r = lab.api("GET", "/v2/sandboxes", None);
    let items = r.json();
    assert_eq!(ids_of(&items), [c.clone(), b.clone(), a.clone()]);
    assert_eq!(next_token(&r), None);
    let states: Vec<&str> = items
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["running", "paused", "running"]);
    let (ids, _) = list("?order=asc");
    assert_eq!(ids, [a.clone(), b.clone(), c.clone()]);

    // State filters.
    assert_eq!(set(list("?state=running").0), of(&[&a, &c]));
    assert_eq!(set(list("?state=paused").0), of(&[&b]));
    assert_eq!(set(list("?state=running,paused").0), of(&[&a, &b, &c]));

    // Metadata filters, triple-encoded; every pair must match.
    let meta = |pairs: &[(&str, &str)]| list(&format!("?metadata={}", metadata_query(pairs))).0;
    assert_eq!(meta(&[("suite", "list"), ("k y", "v&1")]), [c.as_str()]);
    assert_eq!(meta(&[("n", "2")]), [b.as_str()]);
    assert_eq!(meta(&[("n", "2"), ("suite", "list")]), [b.as_str()]);
    assert_eq!(
        meta(&[("n", "2"), ("suite", "other")]),
        Vec::<String>::new()
    );
    assert_eq!(set(meta(&[("suite", "list")])), of(&[&a, &b, &c]));
    assert_eq!(
        list(&format!(
            "?state=running&metadata={}",
            metadata_query(&[("suite", "list")])
        ))
        .0
        .len(),
        2
    );

    // Paging: X-Next-Token iff there is more, sent back as nextToken.
    let mut seen = Vec::new();
    let mut query = "?limit=1".to_owned();
    loop {
        let (ids, token) = list(&query);
        assert_eq!(ids.len(), 1, "{query}");
        seen.extend(ids);
        match token {
            Some(t) => query = format!("?limit=1&nextToken={}", support::encode(&t, "")),
            None => break,
        }
    }
    assert_eq!(seen, [c.clone(), b.clone(), a.clone()]);
    let (ids, token) = list("?limit=2&order=asc");
    assert_eq!(ids, [a.clone(), b.clone()]);
    let token = token.expect("a second page");
    let (ids, token) = list(&format!(
        "?limit=2&order=asc&nextToken={}",
        support::encode(&token, "")
    ));
    assert_eq!((ids, token), (vec![c.clone()], None));

    // A page token stays valid when the sandbox it names is killed before the next page.
    let (ids, token) = list("?limit=1");
    assert_eq!(ids, [c.as_str()]);
    let r = lab.api("DELETE", &format!("/sandboxes/{c}"), None);
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    let (ids, _) = list(&format!(
        "?limit=1&nextToken={}",
        support::encode(&token.unwrap(), "")
    ));
    assert_eq!(ids, [b.as_str()], "the page after a killed sandbox's token");

    // Legacy list: running only, one page, metadata filter too.
    let r = lab.api("GET", "/sandboxes", None);
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(ids_of(&r.json()), [a.as_str()]);
    let r = lab.api(
        "GET",
        &format!("/sandboxes?metadata={}", metadata_query(&[("n", "2")])),
        None,
    );
    assert_eq!(ids_of(&r.json()), Vec::<String>::new(), "b is paused");
    lab.finish();
}

#[test]
fn api_keys_guard_the_control_plane_only() {
    let Some(mut lab) = Lab::new("api_keys_guard_the_control_plane_only") else {
        return;
    };
    lab.options.api_keys = Some("k1,k2".into());
    lab.start();

    // /health needs no key.
    let r = lab.send(lab.request("GET", "/health").body(empty()).unwrap());
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());

    // Missing or wrong keys: 401 with E2B's body, and nothing is created.
    let create = |h: Option<(&str, &str)>| {
        let mut b = lab
            .request("POST", "/v2/sandboxes")
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some((k, v)) = h {
            b = b.header(k, v);
        }
        lab.send(b.body(Full::new(Bytes::from_static(b"{}"))).unwrap())
    };
    create(None).assert_error(401, "no key");
    create(Some(("x-api-key", "k3"))).assert_error(401, "unknown key");
    create(Some(("x-api-key", "k1k2"))).assert_error(401, "two keys run together");
    create(Some(("x-api-key", "k"))).assert_error(401, "a prefix of a key");
    create(Some(("authorization", "Bearer nope"))).assert_error(401, "unknown bearer");
    create(Some(("authorization", "Basic azE6"))).assert_error(401, "basic auth");
    create(Some(("authorization", "k1"))).assert_error(401, "no Bearer scheme");
    lab.send(lab.request("GET", "/v2/sandboxes").body(empty()).unwrap())
        .assert_error(401, "list without a key");
    lab.send(lab.request("GET", "/nope").body(empty()).unwrap())
        .assert_error(401, "unknown routes are behind the key too");

    // Either header with a configured key works.
    let r = create(Some(("x-api-key", "k2")));
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let first = r.json();
    let r = create(Some(("authorization", "Bearer k1")));
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let second = r.json();
    lab.key = Some("k1".into());
    assert_eq!(
        lab.listed_ids().into_iter().collect::<BTreeSet<_>>(),
        [id_of(&first), id_of(&second)].into_iter().collect()
    );

    // The data plane needs no API key: the access token is its credential.
    let out = lab.exec(&id_of(&first), Some(&token_of(&first)), "echo ok");
    assert_eq!(out.ok(), "ok\n");
    lab.finish();
}

/// A command whose sandbox is killed while its output streams gets a proper end: Connect's
/// end-of-stream with code `unavailable` and the message E2B's SDKs turn into "the sandbox was
/// killed or reached its end of life", not a body cut off in the middle.
#[test]
fn a_stream_cut_off_by_a_kill_ends_as_unavailable() {
    let Some(mut lab) = Lab::new("a_stream_cut_off_by_a_kill_ends_as_unavailable") else {
        return;
    };
    lab.start();
    let s = lab.create(json!({}));
    let (id, token) = (id_of(&s), token_of(&s));
    let log = lab.state_dir.join(format!("jail/logs/{id}.log"));
    let out = std::thread::scope(|scope| {
        let (lab, id, token) = (&lab, &id, &token);
        let run = scope.spawn(move || lab.exec(id, Some(token), "echo started; sleep 60"));
        support::wait_for(
            "the command to start",
            std::time::Duration::from_secs(30),
            || {
                std::fs::read_to_string(&log)
                    .ok()
                    .filter(|l| l.contains("sleep 60"))
            },
        );
        let r = lab.api("DELETE", &format!("/sandboxes/{id}"), None);
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
        run.join().unwrap()
    });
    assert_eq!(out.status, StatusCode::OK);
    assert_eq!(out.stdout, "started\n");
    let error = out.error.expect("an end-of-stream error");
    assert_eq!(error["code"], "unavailable", "{error}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("killed or reached its end of life"),
        "{error}"
    );
    lab.finish();
}

#[test]
fn data_plane_proxy() {
    let Some(mut lab) = Lab::new("data_plane_proxy") else {
        return;
    };
    lab.options.domain = Some("sbx.test".into());
    lab.start();
    let s = lab.create(json!({}));
    let (id, token) = (id_of(&s), token_of(&s));

    // Header routing with the access token.
    let out = lab.exec(&id, Some(&token), "echo hello; id -un");
    assert_eq!(out.ok(), "hello\nuser\n");

    // Without or with a wrong token the agent refuses: in-band for a stream, 401 otherwise.
    for t in [None, Some("wrong")] {
        let out = lab.exec(&id, t, "echo no");
        assert_eq!(out.status, StatusCode::OK, "{out:?}");
        assert_eq!(
            out.error.as_ref().map(|e| e["code"].clone()),
            Some(json!("unauthenticated")),
            "{out:?}"
        );
        assert!(out.stdout.is_empty(), "{out:?}");
    }
    let agent = |method: &str, path: &str, token: &str, body: &'static [u8]| {
        let req = lab
            .request(method, path)
            .header("e2b-sandbox-id", id.as_str())
            .header("e2b-sandbox-port", "49983")
            .header("x-access-token", token)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from_static(body)))
            .unwrap();
        lab.send(req)
    };
    let r = agent("GET", "/files?path=/etc/hostname", "wrong", b"");
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    let r = agent("POST", "/process.Process/List", "wrong", b"{}");
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    let r = agent("POST", "/process.Process/List", &token, b"{}");
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());

    // /init is the gateway's alone: refused through the proxy, and the token stays.
    let r = agent(
        "POST",
        "/init",
        &token,
        br#"{"accessToken":"hijacked","envVars":{"EVIL":"1"}}"#,
    );
    assert!(
        r.status.is_client_error(),
        "/init through the proxy: {}",
        r.status
    );
    assert_eq!(lab.exec(&id, Some(&token), "echo still").ok(), "still\n");
    let out = lab.exec(&id, Some("hijacked"), "echo no");
    assert!(
        out.error.is_some(),
        "the refused /init changed the token: {out:?}"
    );

    // Host routing: <port>-<id>.<domain>.
    let by_host = |host: String| {
        http::Request::builder()
            .method("POST")
            .uri("/process.Process/Start")
            .header(http::header::HOST, host)
    };
    let port = lab.addr().port();
    let out = lab.exec_with(
        by_host(format!("49983-{id}.sbx.test:{port}")),
        Some(&token),
        "echo via-host",
    );
    assert_eq!(out.ok(), "via-host\n");
    let out = lab.exec_with(
        by_host(format!("49983-nosuchsandbox.sbx.test:{port}")),
        Some(&token),
        "true",
    );
    assert_not_found(&out, "nosuchsandbox");

    // Unknown ids, whatever their shape: the exact 502.
    for unknown in ["nosuchsandbox0000000", "ABC", "a-b", &id.to_uppercase()] {
        assert_not_found(&lab.exec(unknown, Some(&token), "true"), unknown);
    }
    let r = lab.send(
        lab.request("GET", "/health")
            .header("e2b-sandbox-id", id.as_str())
            .header("e2b-sandbox-port", "envd")
            .body(empty())
            .unwrap(),
    );
    r.assert_error(400, "a port that is not a number");

    // Paused without autoResume: not found until connect resumes it.
    let r = lab.api("POST", &format!("/sandboxes/{id}/pause"), None);
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    assert_not_found(&lab.exec(&id, Some(&token), "true"), &id);
    let r = lab.api(
        "POST",
        &format!("/v2/sandboxes/{id}/connect"),
        Some(json!({})),
    );
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(lab.exec(&id, Some(&token), "echo awake").ok(), "awake\n");

    // Paused with autoResume: traffic wakes it.
    let s2 = lab.create(json!({"autoPause": true, "autoResume": {"enabled": true}}));
    let (id2, token2) = (id_of(&s2), token_of(&s2));
    assert_eq!(lab.detail(&id2)["lifecycle"]["autoResume"], json!(true));
    let r = lab.api("POST", &format!("/sandboxes/{id2}/pause"), None);
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    assert_eq!(lab.detail(&id2)["state"], "paused");
    assert_eq!(lab.exec(&id2, Some(&token2), "echo woke").ok(), "woke\n");
    assert_eq!(lab.detail(&id2)["state"], "running");

    // Killed: not found, and the other sandbox is unaffected.
    let r = lab.api("DELETE", &format!("/sandboxes/{id}"), None);
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    assert_not_found(&lab.exec(&id, Some(&token), "true"), &id);
    lab.assert_gone(&id);
    assert_eq!(lab.exec(&id2, Some(&token2), "echo alive").ok(), "alive\n");
    lab.finish();
}

#[test]
fn bad_input_changes_nothing() {
    let Some(mut lab) = Lab::new("bad_input_changes_nothing") else {
        return;
    };
    lab.start();
    let s = lab.create(json!({"timeout": 300, "metadata": {"keep": "me"}}));
    let id = id_of(&s);
    let upper = id.to_uppercase();
    let ids_before = lab.listed_ids();
    let before = lab.detail(&id);

    let big = vec![b' '; 2 << 20];
    let v2 = "/v2/sandboxes";
    let cases: Vec<(&str, String, Vec<u8>, u16)> = vec![
        // Bodies that are not a NewSandbox.
        ("POST", v2.into(), b"{bad".to_vec(), 400),
        ("POST", v2.into(), b"{\"timeout\": 1".to_vec(), 400),
        ("POST", v2.into(), b"null".to_vec(), 400),
        ("POST", v2.into(), b"[]".to_vec(), 400),
        ("POST", v2.into(), b"[\"base\", 60]".to_vec(), 400),
        ("POST", v2.into(), b"\"base\"".to_vec(), 400),
        ("POST", v2.into(), br#"{"timeout":"300"}"#.to_vec(), 400),
        ("POST", v2.into(), br#"{"timeout":1.5}"#.to_vec(), 400),
        ("POST", v2.into(), br#"{"templateID":5}"#.to_vec(), 400),
        ("POST", v2.into(), br#"{"metadata":{"a":1}}"#.to_vec(), 400),
        ("POST", v2.into(), br#"{"metadata":["a"]}"#.to_vec(), 400),
        ("POST", v2.into(), br#"{"metadata":{"":"x"}}"#.to_vec(), 400),
        (
            "POST",
            v2.into(),
            br#"{"envVars":{"A=B":"x"}}"#.to_vec(),
            400,
        ),
        ("POST", v2.into(), br#"{"unknownField":true}"#.to_vec(), 400),
        // Fields E2B has and this gateway does not implement, refused by name.
        (
            "POST",
            v2.into(),
            br#"{"volumeMounts":[{"name":"v","path":"/data"}]}"#.to_vec(),
            400,
        ),
        (
            "POST",
            v2.into(),
            br#"{"iam":{"tokens":{"aws":{"audience":"a"}}}}"#.to_vec(),
            400,
        ),
        ("POST", v2.into(), br#"{"timeout":-1}"#.to_vec(), 400),
        ("POST", v2.into(), br#"{"timeout":86401}"#.to_vec(), 400),
        ("POST", v2.into(), br#"{"timeout":1e30}"#.to_vec(), 400),
        ("POST", v2.into(), br#"{"timeoutMs":-5}"#.to_vec(), 400),
        (
            "POST",
            v2.into(),
            br#"{"autoResume":{"enabled":true}}"#.to_vec(),
            400,
        ),
        (
            "POST",
            v2.into(),
            br#"{"autoPause":false,"autoResume":{"enabled":true}}"#.to_vec(),
            400,
        ),
        (
            "POST",
            v2.into(),
            br#"{"templateID":"no-such-template"}"#.to_vec(),
            404,
        ),
        (
            "POST",
            "/sandboxes".into(),
            br#"{"templateID":"nope"}"#.to_vec(),
            404,
        ),
        (
            "POST",
            "/sandboxes".into(),
            br#"{"timeout":-1}"#.to_vec(),
            400,
        ),
        ("POST", v2.into(), big.clone(), 413),
        // Ids that cannot be a sandbox's.
        ("GET", format!("/sandboxes/{upper}"), vec![], 404),
        ("DELETE", format!("/sandboxes/{upper}"), vec![], 404),
        ("DELETE", format!("/sandboxes/{id}-x"), vec![], 404),
        ("DELETE", "/sandboxes/a-b".into(), vec![], 404),
        ("POST", format!("/sandboxes/{upper}/pause"), vec![], 404),
        (
            "POST",
            format!("/v2/sandboxes/{upper}/connect"),
            b"{}".to_vec(),
            404,
        ),
        // List parameters.
        ("GET", format!("{v2}?limit=0"), vec![], 400),
        ("GET", format!("{v2}?limit=101"), vec![], 400),
        ("GET", format!("{v2}?limit=x"), vec![], 400),
        ("GET", format!("{v2}?state=dead"), vec![], 400),
        ("GET", format!("{v2}?order=sideways"), vec![], 400),
        ("GET", format!("{v2}?startedAfter=yesterday"), vec![], 400),
        ("GET", format!("{v2}?nextToken=garbage"), vec![], 400),
        ("GET", format!("{v2}?metadata=%25ZZ"), vec![], 400),
        ("GET", format!("{v2}?metadata=novalue"), vec![], 400),
        ("GET", format!("{v2}?bogus=1"), vec![], 400),
        // Routes and methods.
        ("GET", "/nope".into(), vec![], 404),
        ("GET", "/v3/sandboxes".into(), vec![], 404),
        ("PUT", v2.into(), vec![], 405),
        ("DELETE", v2.into(), vec![], 405),
        ("PATCH", format!("/sandboxes/{id}"), b"{}".to_vec(), 405),
        ("POST", "/health".into(), vec![], 405),
        // Bad bodies for an existing sandbox.
        (
            "POST",
            format!("/sandboxes/{id}/timeout"),
            br#"{}"#.to_vec(),
            400,
        ),
        ("POST", format!("/sandboxes/{id}/timeout"), vec![], 400),
        (
            "POST",
            format!("/sandboxes/{id}/timeout"),
            br#"{"timeout":-1}"#.to_vec(),
            400,
        ),
        (
            "POST",
            format!("/sandboxes/{id}/timeout"),
            br#"{"timeout":86401}"#.to_vec(),
            400,
        ),
        (
            "POST",
            format!("/sandboxes/{id}/timeout"),
            br#"{"timeout":"5"}"#.to_vec(),
            400,
        ),
        (
            "POST",
            format!("/sandboxes/{id}/timeout"),
            br#"{"timeout":5,"extra":1}"#.to_vec(),
            400,
        ),
        (
            "POST",
            format!("/sandboxes/{id}/refreshes"),
            br#"{"duration":3601}"#.to_vec(),
            400,
        ),
        (
            "POST",
            format!("/sandboxes/{id}/refreshes"),
            br#"{"duration":-1}"#.to_vec(),
            400,
        ),
        (
            "POST",
            format!("/v2/sandboxes/{id}/connect"),
            br#"{"timeout":-1}"#.to_vec(),
            400,
        ),
        (
            "POST",
            format!("/v2/sandboxes/{id}/connect"),
            b"[]".to_vec(),
            400,
        ),
        (
            "POST",
            format!("/sandboxes/{id}/connect"),
            br#"{}"#.to_vec(),
            400,
        ),
        (
            "POST",
            format!("/sandboxes/{id}/pause"),
            br#"{"bogus":1}"#.to_vec(),
            400,
        ),
        ("POST", format!("/sandboxes/{id}/pause"), big, 413),
        (
            "POST",
            format!("/sandboxes/{id}/resume"),
            br#"{"timeout":"x"}"#.to_vec(),
            400,
        ),
    ];
    for (method, path, body, status) in cases {
        let shown = String::from_utf8_lossy(&body[..body.len().min(60)]).into_owned();
        let r = lab.api_raw(method, &path, body);
        r.assert_error(status, &format!("{method} {path} {shown}"));
    }

    // Nothing changed: the same sandboxes, and ours as it was.
    assert_eq!(lab.listed_ids(), ids_before);
    let after = lab.detail(&id);
    for field in ["state", "endAt", "startedAt", "metadata", "lifecycle"] {
        assert_eq!(after[field], before[field], "{field}");
    }
    lab.finish();
}
