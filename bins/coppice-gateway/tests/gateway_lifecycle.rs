//! Auto-pause and auto-resume through the real gateway: traffic keeps an auto-resume
//! sandbox's idle window open (and a kill-on-timeout sandbox's absolute window does not move),
//! concurrent requests wake a paused sandbox exactly once, requests racing the reaper's pause
//! and a manual pause all succeed, and a paused sandbox without auto-resume stays paused
//! however much traffic it gets. Real binary, real sandboxes; see `support/mod.rs`.
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

use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::{json, Value};
use support::{events_of, id_of, millis, token_of, wait_for, Lab};

const WAIT: Duration = Duration::from_secs(30);

fn events(lab: &Lab, id: &str, ty: &str) -> Vec<Value> {
    events_of(lab, &format!("/events/sandboxes/{id}?types={ty}&limit=100"))
}

fn state(lab: &Lab, id: &str) -> String {
    lab.detail(id)["state"].as_str().unwrap().to_owned()
}

/// Traffic moves an auto-resume sandbox's idle window and is stored with an `updated` event
/// (cause `activity`); once the traffic stops the window ends and the sandbox pauses. A
/// kill-on-timeout sandbox keeps E2B's absolute window whatever its traffic.
#[test]
fn traffic_keeps_an_auto_resume_sandbox_awake() {
    let Some(mut lab) = Lab::new("traffic_keeps_an_auto_resume_sandbox_awake") else {
        return;
    };
    lab.start();
    let idle = lab.create(json!({
        "timeout": 2,
        "autoPause": true,
        "autoResume": {"enabled": true},
    }));
    let (idle_id, idle_token) = (id_of(&idle), token_of(&idle));
    let fixed = lab.create(json!({"timeout": 4}));
    let (fixed_id, fixed_token) = (id_of(&fixed), token_of(&fixed));
    let fixed_end = millis(&lab.detail(&fixed_id)["endAt"]);
    let first_end = millis(&lab.detail(&idle_id)["endAt"]);

    // Three times the idle window of steady traffic: never paused.
    let busy_until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < busy_until {
        assert_eq!(
            lab.exec(&idle_id, Some(&idle_token), "echo up").ok(),
            "up\n"
        );
        if Instant::now() + Duration::from_secs(2) < busy_until {
            // The fixed sandbox gets traffic too, until shortly before its window ends.
            lab.exec(&fixed_id, Some(&fixed_token), "true").ok();
        }
        assert_eq!(state(&lab, &idle_id), "running");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(events(&lab, &idle_id, "sandbox.lifecycle.paused").is_empty());
    assert!(millis(&lab.detail(&idle_id)["endAt"]) > first_end + 3_000);
    let updates = events(&lab, &idle_id, "sandbox.lifecycle.updated");
    assert!(
        updates
            .iter()
            .any(|e| e["eventData"]["update"] == "activity"),
        "no activity update in {updates:?}"
    );

    // The fixed one was killed on time, traffic or not.
    let killed = wait_for("the fixed sandbox's timeout kill", WAIT, || {
        events(&lab, &fixed_id, "sandbox.lifecycle.killed")
            .first()
            .cloned()
    });
    assert_eq!(killed["eventData"]["cause"], "timeout");
    let killed_at = millis(&killed["timestamp"]);
    assert!(
        killed_at >= fixed_end && killed_at < fixed_end + 2_000,
        "killed at {killed_at}, window ended at {fixed_end}"
    );

    // Idle now: the window ends and it pauses.
    let paused = wait_for("the idle pause", WAIT, || {
        events(&lab, &idle_id, "sandbox.lifecycle.paused")
            .first()
            .cloned()
    });
    assert_eq!(paused["eventData"]["cause"], "timeout");
    assert_eq!(state(&lab, &idle_id), "paused");
    lab.finish();
}

/// Eight requests at once to a paused auto-resume sandbox: every one answers, and the
/// sandbox was resumed once.
#[test]
fn concurrent_requests_wake_a_sandbox_once() {
    let Some(mut lab) = Lab::new("concurrent_requests_wake_a_sandbox_once") else {
        return;
    };
    lab.start();
    let sbx = lab.create(json!({
        "timeout": 600,
        "autoPause": true,
        "autoResume": {"enabled": true},
    }));
    let (id, token) = (id_of(&sbx), token_of(&sbx));
    for round in 0..3 {
        let r = lab.api("POST", &format!("/sandboxes/{id}/pause"), None);
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
        assert_eq!(state(&lab, &id), "paused");
        let lab = &lab;
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let (id, token) = (&id, &token);
                    s.spawn(move || lab.exec(id, Some(token), &format!("echo {round}-{i}")))
                })
                .collect();
            for (i, h) in handles.into_iter().enumerate() {
                assert_eq!(h.join().unwrap().ok(), format!("{round}-{i}\n"));
            }
        });
        assert_eq!(state(lab, &id), "running");
        let resumed = events(lab, &id, "sandbox.lifecycle.resumed");
        assert_eq!(resumed.len(), round + 1, "{resumed:?}");
        assert!(resumed
            .iter()
            .all(|e| e["eventData"]["cause"] == "auto_resume"));
    }
    lab.finish();
}

/// A pause lets a command whose stream is already open end first: its client gets the
/// output and the end event while the sandbox stays paused, instead of a stream frozen
/// until someone resumes the sandbox.
#[test]
fn a_pause_lets_a_command_already_under_way_end_first() {
    let Some(mut lab) = Lab::new("a_pause_lets_a_command_already_under_way_end_first") else {
        return;
    };
    lab.start();
    let sbx = lab.create(json!({"timeout": 120}));
    let (id, token) = (id_of(&sbx), token_of(&sbx));
    let log = lab.state_dir.join(format!("jail/logs/{id}.log"));
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        let (lab, id, token) = (&lab, &id, &token);
        s.spawn(move || {
            let e = lab.exec(id, Some(token), "sleep 0.3; echo done");
            let _ = tx.send(e);
        });
        // The command is running in the sandbox: its stream is open through the gateway.
        wait_for("the command to start", WAIT, || {
            std::fs::read_to_string(&log)
                .ok()
                .filter(|l| l.contains("sleep 0.3; echo done"))
        });
        let r = lab.api("POST", &format!("/sandboxes/{id}/pause"), None);
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
        // Nobody resumes the sandbox: without the drain the stream would wait for that.
        let ended = rx.recv_timeout(WAIT);
        let state_then = state(lab, id);
        if ended.is_err() {
            // Let the stream end, so the thread can be joined, then fail.
            lab.api(
                "POST",
                &format!("/sandboxes/{id}/connect"),
                Some(json!({"timeout": 60})),
            );
            panic!("the command's stream stayed open while the sandbox was paused");
        }
        assert_eq!(ended.unwrap().ok(), "done\n");
        assert_eq!(state_then, "paused");
    });
    lab.finish();
}

/// Requests that arrive while the window ends, and while manual pauses land, all succeed:
/// either they reach the sandbox before the pause (and count as activity), or they find it
/// paused and wake it. A paused sandbox without auto-resume gets E2B's 502 and stays paused.
#[test]
fn requests_racing_a_pause_all_succeed() {
    let Some(mut lab) = Lab::new("requests_racing_a_pause_all_succeed") else {
        return;
    };
    lab.start();
    let sbx = lab.create(json!({
        "timeout": 1,
        "autoPause": true,
        "autoResume": {"enabled": true},
    }));
    let (id, token) = (id_of(&sbx), token_of(&sbx));
    let stop = std::sync::atomic::AtomicBool::new(false);
    let served = std::sync::atomic::AtomicU32::new(0);
    std::thread::scope(|s| {
        let lab = &lab;
        let workers: Vec<_> = (0..3)
            .map(|w| {
                let (id, token, stop, served) = (&id, &token, &stop, &served);
                s.spawn(move || {
                    let mut n = 0u32;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let e = lab.exec(id, Some(token), &format!("echo {w}-{n}"));
                        assert_eq!(e.ok(), format!("{w}-{n}\n"));
                        served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        n += 1;
                        // Gaps near the window, so some requests meet the reaper's pause.
                        std::thread::sleep(Duration::from_millis(u64::from(n % 5) * 300));
                    }
                })
            })
            .collect();
        // Manual pauses in the middle of the traffic; 409 when the reaper or a previous
        // pause got there first and no request has woken it yet.
        for _ in 0..10 {
            std::thread::sleep(Duration::from_millis(400));
            let r = lab.api("POST", &format!("/sandboxes/{id}/pause"), None);
            assert!(
                r.status == StatusCode::NO_CONTENT || r.status == StatusCode::CONFLICT,
                "{}: {}",
                r.status,
                r.text()
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
    });
    assert!(served.load(std::sync::atomic::Ordering::Relaxed) > 10);
    let paused = events(&lab, &id, "sandbox.lifecycle.paused").len();
    let resumed = events(&lab, &id, "sandbox.lifecycle.resumed").len();
    assert!(paused >= 1, "no pause happened");
    // Every resume follows a pause; the last pause may still stand.
    assert!(
        resumed == paused || resumed + 1 == paused,
        "{paused} paused, {resumed} resumed"
    );

    // Without auto-resume, traffic to a paused sandbox is refused and wakes nothing.
    let plain = lab.create(json!({"timeout": 600, "autoPause": true}));
    let plain_id = id_of(&plain);
    let r = lab.api("POST", &format!("/sandboxes/{plain_id}/pause"), None);
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    for _ in 0..3 {
        let e = lab.exec(&plain_id, Some(&token_of(&plain)), "true");
        assert_eq!(e.status, StatusCode::BAD_GATEWAY, "{e:?}");
    }
    assert_eq!(state(&lab, &plain_id), "paused");
    assert!(events(&lab, &plain_id, "sandbox.lifecycle.resumed").is_empty());
    lab.finish();
}

/// The ids of every sandbox the gateway's jail has (warm ones included), from its cgroups.
fn jailed_ids(lab: &Lab) -> std::collections::BTreeSet<String> {
    lab.group_leftovers()
        .iter()
        .filter_map(|l| l.strip_prefix("cgroup "))
        .filter_map(|p| p.rsplit('/').next().map(str::to_owned))
        .collect()
}

/// `--warm-pool N` keeps N started sandboxes per template: creates take them (the id the
/// client gets is a warm sandbox's), they are refilled, they are never listed, and a graceful
/// stop kills them (`finish` asserts that nothing is left).
#[test]
fn the_warm_pool_serves_creates_and_is_drained_at_stop() {
    let Some(mut lab) = Lab::new("the_warm_pool_serves_creates_and_is_drained_at_stop") else {
        return;
    };
    lab.options.args = vec!["--warm-pool".into(), "3".into()];
    lab.start();
    lab.wait_templates_imported();
    let warm = wait_for("six warm sandboxes", WAIT, || {
        let ids = jailed_ids(&lab);
        (ids.len() == 6).then_some(ids)
    });
    assert!(lab.listed_ids().is_empty(), "warm sandboxes are not listed");
    let created: Vec<Value> = (0..3)
        .map(|_| lab.create(json!({"templateID": "base", "timeout": 600})))
        .collect();
    for sbx in &created {
        let id = id_of(sbx);
        assert!(
            warm.contains(&id),
            "{id} did not come from the pool {warm:?}"
        );
        assert_eq!(
            lab.exec(&id, Some(&token_of(sbx)), "echo $HOME").ok(),
            "/home/user\n"
        );
    }
    // A fourth create finds the pool empty or refilling; either way it works.
    let fourth = lab.create(json!({"templateID": "base", "envVars": {"X": "4"}}));
    assert_eq!(
        lab.exec(&id_of(&fourth), Some(&token_of(&fourth)), "echo $X")
            .ok(),
        "4\n"
    );
    wait_for("the pool refilled", WAIT, || {
        (jailed_ids(&lab).len() == 6 + 4).then_some(())
    });
    assert_eq!(lab.listed_ids().len(), 4);
    lab.finish();
}
