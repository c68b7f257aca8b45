//! A host that stays healthy across gateway starts: a second gateway on a state directory in
//! use refuses to start and touches none of the first one's sandboxes, warm pool included;
//! and after a `kill -9` the restarted gateway gets its port back at once, says it is
//! re-adopting until it is done, and then has the sandbox it had. Real binary, real
//! sandboxes; see `support/mod.rs`.
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
use std::net::TcpStream;
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::json;
use support::{id_of, token_of, wait_for, Lab};

/// How long filling the warm pool or re-adopting may take.
const WAIT: Duration = Duration::from_secs(120);
/// The warm pool per template in these tests: small, so it fills quickly, and not zero.
const WARM: u64 = 2;

/// The `coppice_warm_sandboxes` gauge per template, from `/metrics`.
fn warm_counts(lab: &Lab) -> BTreeSet<(String, u64)> {
    let r = lab.api("GET", "/metrics", None);
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.text()
        .lines()
        .filter_map(|l| l.strip_prefix("coppice_warm_sandboxes{template=\""))
        .filter_map(|rest| {
            let (template, value) = rest.split_once("\"} ")?;
            Some((template.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// The gauge of a full warm pool.
fn full_pool() -> BTreeSet<(String, u64)> {
    [
        ("base".to_owned(), WARM),
        ("code-interpreter-v1".to_owned(), WARM),
    ]
    .into()
}

/// The ids of the sandboxes with a cgroup in the lab's group (in any hierarchy): the listed
/// sandboxes and the warm ones.
fn jailed(lab: &Lab) -> BTreeSet<String> {
    lab.group_leftovers()
        .iter()
        .filter_map(|l| l.strip_prefix("cgroup "))
        .filter_map(|p| p.rsplit('/').next().map(str::to_owned))
        .collect()
}

#[test]
fn a_second_gateway_on_the_same_state_dir_refuses_and_touches_nothing() {
    let Some(mut lab) =
        Lab::new("a_second_gateway_on_the_same_state_dir_refuses_and_touches_nothing")
    else {
        return;
    };
    lab.options.args = vec!["--warm-pool".into(), WARM.to_string()];
    lab.start();
    lab.wait_templates_imported();
    let sbx = lab.create(json!({"timeout": 600}));
    let (id, token) = (id_of(&sbx), token_of(&sbx));
    assert_eq!(lab.exec(&id, Some(&token), "echo before").ok(), "before\n");
    let full = full_pool();
    wait_for("the warm pool full", WAIT, || {
        (warm_counts(&lab) == full).then_some(())
    });
    let cgroups = jailed(&lab);
    // The sandbox and two warm ones per template.
    assert_eq!(cgroups.len(), 1 + 2 * 2, "{cgroups:?}");

    let first = lab.pid();
    let t = Instant::now();
    let (status, log) = lab
        .run_another("127.0.0.1:0".parse().unwrap(), Duration::from_secs(10))
        .expect("the second gateway must exit, not run");
    println!(
        "second gateway exited with {status} after {:?}",
        t.elapsed()
    );
    assert!(!status.success(), "{status}: {log}");
    let expected = format!(
        "state dir {} is in use by another coppice-gateway (pid {first}); stop it or pick another --state-dir",
        lab.state_dir.display()
    );
    assert!(log.contains(&expected), "expected {expected:?} in:\n{log}");
    assert!(
        !log.contains("listening"),
        "the second gateway must not have bound a port:\n{log}"
    );

    // The first one's sandboxes, warm ones included, are all still there and still work.
    assert_eq!(jailed(&lab), cgroups);
    assert_eq!(lab.listed_ids(), std::slice::from_ref(&id));
    assert_eq!(lab.exec(&id, Some(&token), "echo after").ok(), "after\n");
    assert_eq!(warm_counts(&lab), full);
    assert_eq!(lab.health().status, StatusCode::OK);
    lab.finish();
}

#[test]
fn a_restart_after_kill_9_gets_its_port_back_at_once() {
    let Some(mut lab) = Lab::new("a_restart_after_kill_9_gets_its_port_back_at_once") else {
        return;
    };
    lab.options.args = vec!["--warm-pool".into(), WARM.to_string()];
    lab.start();
    // A kill -9 during a template import leaves its copy running into the next start.
    lab.wait_templates_imported();
    let sbx = lab.create(json!({"timeout": 600}));
    let (id, token) = (id_of(&sbx), token_of(&sbx));
    assert_eq!(lab.exec(&id, Some(&token), "echo before").ok(), "before\n");
    // The warm pool is full, so no sandbox start is under way at the kill: a child the jail
    // has cloned but not yet exec'd keeps a copy of every descriptor of the gateway, this
    // port's listener and the state lock included, and outlives a kill -9. The restart then
    // has the previous run's warm sandboxes to kill as unregistered while it re-adopts.
    wait_for("the warm pool full", WAIT, || {
        (warm_counts(&lab) == full_pool()).then_some(())
    });
    let addr = lab.addr();

    lab.crash();
    let t = Instant::now();
    lab.launch(addr);
    // The bound is 1 s; a loaded test machine gets a generous margin.
    let bound = wait_for(
        "the restarted gateway accepting connections",
        Duration::from_secs(5),
        || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(100))
                .ok()
                .map(|_| t.elapsed())
        },
    );
    println!("the restarted gateway accepted a connection {bound:?} after it was spawned");
    let health = lab.health();
    let status = health.json()["status"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    println!(
        "first /health after the restart: {} {}",
        health.status,
        health.text()
    );
    match status.as_str() {
        "adopting" | "building the default template" => {
            assert_eq!(
                health.status,
                StatusCode::SERVICE_UNAVAILABLE,
                "{}",
                health.text()
            );
        }
        "ok" => assert_eq!(health.status, StatusCode::OK),
        other => panic!("unexpected /health status {other:?}: {}", health.text()),
    }

    lab.wait_healthy();
    assert_eq!(lab.listed_ids(), std::slice::from_ref(&id));
    assert_eq!(lab.exec(&id, Some(&token), "echo after").ok(), "after\n");
    lab.finish();
}
