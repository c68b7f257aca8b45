//! Warm pools as an API through the real gateway: `GET /pool`, `POST /pool/{template}/warm`
//! and `/drain`, with hits, misses and sandboxes in use counted, bad input refused, and the
//! targets kept across a restart. Real binary, real sandboxes; see `support/mod.rs`.
#![cfg(target_os = "linux")]
// An integration test crate: no `mod tests` wrapper, helpers may unwrap, skip lines must reach
// the test output, and the harness polls on plain threads, where `std::thread::sleep` blocks
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

use std::time::Duration;

use http::StatusCode;
use serde_json::{json, Value};
use support::{id_of, token_of, wait_for, Lab};

/// Long enough for a few warm starts on a loaded CI machine.
const WAIT: Duration = Duration::from_secs(120);

/// `templateID`'s entry of `GET /pool`.
fn pool(lab: &Lab, template: &str) -> Value {
    let r = lab.api("GET", "/pool", None);
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let list = r.json();
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["templateID"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["base", "code-interpreter-v1"], "{list}");
    list.as_array()
        .unwrap()
        .iter()
        .find(|p| p["templateID"] == template)
        .cloned()
        .unwrap()
}

fn wait_ready(lab: &Lab, template: &str, n: u64) {
    wait_for(&format!("{n} warm {template} sandboxes"), WAIT, || {
        (pool(lab, template)["ready"] == n).then_some(())
    });
}

/// The message of an E2B error answer with `status`.
fn refused(r: &support::Resp, status: u16, what: &str) -> String {
    r.assert_error(status, what);
    r.json()["message"].as_str().unwrap().to_owned()
}

#[test]
fn pools_are_warmed_hit_drained_and_kept_across_a_restart() {
    let Some(mut lab) = Lab::new("pools_are_warmed_hit_drained_and_kept_across_a_restart") else {
        return;
    };
    lab.options.args = vec!["--warm-pool".into(), "0".into()];
    lab.start();
    lab.wait_templates_imported();

    // `--warm-pool 0` is every pool's start-up target.
    for t in ["base", "code-interpreter-v1"] {
        let p = pool(&lab, t);
        assert_eq!(
            p,
            json!({"templateID": t, "target": 0, "ready": 0, "inUse": 0, "hits": 0,
                   "misses": 0, "lastError": null}),
        );
    }

    // A create that finds the pool empty is a miss, and not in use from the pool.
    let cold = lab.create(json!({"templateID": "base"}));
    let p = pool(&lab, "base");
    assert_eq!(
        (p["hits"].clone(), p["misses"].clone()),
        (json!(0), json!(1))
    );
    assert_eq!(p["inUse"], 0);

    // Warming answers 202 while the pool fills, then the filler reaches the target.
    let r = lab.api("POST", "/pool/base/warm", Some(json!({"count": 2})));
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    assert_eq!(r.json()["templateID"], "base");
    assert_eq!(r.json()["target"], 2);
    wait_ready(&lab, "base", 2);
    assert_eq!(pool(&lab, "code-interpreter-v1")["ready"], 0);
    // Warm sandboxes are nobody's: never listed.
    assert_eq!(lab.listed_ids(), [id_of(&cold)]);
    // Warming a full pool to the same target is 200 at once.
    let r = lab.api("POST", "/pool/base/warm", Some(json!({"count": 2})));
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["ready"], 2);

    // A create takes one (a hit, in use), and the filler tops the pool up again.
    let pooled = lab.create(json!({"templateID": "base"}));
    let (pooled_id, pooled_token) = (id_of(&pooled), token_of(&pooled));
    let p = pool(&lab, "base");
    assert_eq!(
        (p["hits"].clone(), p["misses"].clone()),
        (json!(1), json!(1))
    );
    assert_eq!(p["inUse"], 1, "{p}");
    wait_ready(&lab, "base", 2);

    // A lower target gives back the idle sandboxes above it before the answer.
    let r = lab.api("POST", "/pool/base/warm", Some(json!({"count": 1})));
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        (r.json()["target"].clone(), r.json()["ready"].clone()),
        (json!(1), json!(1))
    );

    // Drain: target 0 and no idle sandbox, at once; the one handed out is untouched.
    let r = lab.api("POST", "/pool/base/drain", None);
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let drained = r.json();
    assert_eq!(drained["target"], 0, "{drained}");
    assert_eq!(drained["ready"], 0, "{drained}");
    assert_eq!(drained["inUse"], 1, "{drained}");
    assert_eq!(
        lab.exec(&pooled_id, Some(&pooled_token), "echo still").ok(),
        "still\n"
    );
    // Nothing refills a drained pool: a create is a miss again.
    let cold2 = lab.create(json!({"templateID": "base"}));
    assert_eq!(pool(&lab, "base")["misses"], 2);
    assert_eq!(
        lab.api("DELETE", &format!("/sandboxes/{}", id_of(&cold2)), None)
            .status,
        StatusCode::NO_CONTENT
    );

    // Bad bodies: 400 naming the field; the target stays.
    for body in [
        json!({}),
        json!({"count": -1}),
        json!({"count": "2"}),
        json!({"count": 1.5}),
        json!({"count": null}),
        json!({"count": 100_000}),
    ] {
        let m = refused(
            &lab.api("POST", "/pool/base/warm", Some(body.clone())),
            400,
            &body.to_string(),
        );
        assert!(m.contains("count"), "{body}: {m}");
    }
    let m = refused(
        &lab.api(
            "POST",
            "/pool/base/warm",
            Some(json!({"count": 1, "size": 2})),
        ),
        400,
        "unknown field",
    );
    assert!(m.contains("size"), "{m}");
    refused(&lab.api_raw("POST", "/pool/base/warm", "[2]"), 400, "array");
    refused(&lab.api_raw("POST", "/pool/base/warm", ""), 400, "no body");
    let m = refused(
        &lab.api("POST", "/pool/base/drain", Some(json!({"count": 0}))),
        400,
        "drain with a field",
    );
    assert!(m.contains("count"), "{m}");
    assert_eq!(pool(&lab, "base")["target"], 0);

    // Unknown templates and routes.
    let m = refused(
        &lab.api("POST", "/pool/nope/warm", Some(json!({"count": 1}))),
        404,
        "warm an unknown template",
    );
    assert!(m.contains("nope"), "{m}");
    refused(
        &lab.api("POST", "/pool/nope/drain", None),
        404,
        "drain unknown",
    );
    refused(
        &lab.api("POST", "/pool/ba%zz/drain", None),
        400,
        "bad encoding",
    );
    refused(&lab.api("DELETE", "/pool", None), 405, "DELETE /pool");
    refused(&lab.api("GET", "/pool/base/warm", None), 405, "GET warm");
    refused(
        &lab.api("POST", "/pool/base/fill", None),
        404,
        "no such action",
    );

    // The targets are in /metrics too.
    lab.api("POST", "/pool/base/warm", Some(json!({"count": 1})));
    wait_ready(&lab, "base", 1);
    let metrics = lab.api("GET", "/metrics", None).text();
    for line in [
        "coppice_warm_pool_target{template=\"base\"} 1",
        "coppice_warm_pool_hits_total{template=\"base\"} 1",
        "coppice_warm_pool_misses_total{template=\"base\"} 2",
        "coppice_warm_sandboxes{template=\"base\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} not in:\n{metrics}"
        );
    }

    // A restart keeps the stored target over `--warm-pool 0`; the pool is rebuilt with new
    // sandboxes, and the one handed out before is re-adopted as the user's, still in use.
    lab.stop();
    lab.start();
    let p = pool(&lab, "base");
    assert_eq!(p["target"], 1, "{p}");
    assert_eq!(p["inUse"], 1, "{p}");
    assert_eq!(
        (p["hits"].clone(), p["misses"].clone()),
        (json!(0), json!(0))
    );
    assert_eq!(pool(&lab, "code-interpreter-v1")["target"], 0);
    wait_ready(&lab, "base", 1);
    let next = lab.create(json!({"templateID": "base"}));
    assert_ne!(id_of(&next), pooled_id);
    assert_eq!(pool(&lab, "base")["hits"], 1);
    assert_eq!(pool(&lab, "base")["inUse"], 2);
    assert_eq!(
        lab.exec(&pooled_id, Some(&pooled_token), "echo after").ok(),
        "after\n"
    );
    // The sandbox handed out before the restart is not in the pool: draining leaves it be.
    let r = lab.api("POST", "/pool/base/drain", None);
    assert_eq!(r.json()["ready"], 0, "{}", r.text());
    assert_eq!(
        lab.exec(&pooled_id, Some(&pooled_token), "echo drained")
            .ok(),
        "drained\n"
    );
    lab.finish();
}
