//! Sandboxes outlive the gateway process: a graceful restart and a `kill -9` both leave them
//! running and re-adopted with their windows; a window that ended while the gateway was down
//! ends at the next start; and the reaper kills or pauses on expiry. Real binary, real
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
use std::time::Duration;

use http::StatusCode;
use serde_json::json;
use support::{id_of, now_millis, token_of, wait_for, Lab};

/// How long the reaper may take to act on an ended window (it looks every 250 ms).
const REAPER_WAIT: Duration = Duration::from_secs(30);

/// How the first gateway goes away.
#[derive(Debug, Clone, Copy)]
enum Stop {
    Sigterm,
    Sigkill,
}

/// A running sandbox with a file written in it and a paused one survive the gateway going
/// away: the next gateway lists both, keeps their windows, still runs commands in the running
/// one (which kept its file and token) and resumes the paused one.
fn sandboxes_survive(name: &str, stop: Stop) {
    let Some(mut lab) = Lab::new(name) else {
        return;
    };
    lab.start();
    let run = lab.create(json!({"timeout": 600, "metadata": {"role": "running"}}));
    let (run_id, run_token) = (id_of(&run), token_of(&run));
    let paused = lab.create(json!({"timeout": 600, "metadata": {"role": "paused"}}));
    let (paused_id, paused_token) = (id_of(&paused), token_of(&paused));
    lab.exec(&run_id, Some(&run_token), "echo kept > /tmp/marker")
        .ok();
    let r = lab.api("POST", &format!("/sandboxes/{paused_id}/pause"), None);
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    let run_before = lab.detail(&run_id);

    match stop {
        Stop::Sigterm => lab.stop(),
        Stop::Sigkill => lab.crash(),
    }
    assert!(
        lab.has_processes(&run_id) && lab.has_processes(&paused_id),
        "sandboxes must keep running without the gateway"
    );

    lab.start();
    assert_eq!(
        lab.listed_ids().into_iter().collect::<BTreeSet<_>>(),
        [run_id.clone(), paused_id.clone()].into_iter().collect(),
    );
    let run_after = lab.detail(&run_id);
    for field in ["state", "endAt", "startedAt", "metadata", "envdAccessToken"] {
        assert_eq!(
            run_after[field], run_before[field],
            "{field} across the restart"
        );
    }
    assert_eq!(
        lab.exec(&run_id, Some(&run_token), "cat /tmp/marker").ok(),
        "kept\n"
    );
    assert_eq!(lab.detail(&paused_id)["state"], "paused");
    let r = lab.api(
        "POST",
        &format!("/v2/sandboxes/{paused_id}/connect"),
        Some(json!({})),
    );
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(
        lab.exec(&paused_id, Some(&paused_token), "echo resumed")
            .ok(),
        "resumed\n"
    );
    // New sandboxes still work beside the adopted ones.
    let fresh = lab.create(json!({}));
    assert_eq!(
        lab.exec(&id_of(&fresh), Some(&token_of(&fresh)), "echo new")
            .ok(),
        "new\n"
    );
    lab.finish();
}

#[test]
fn graceful_restart_keeps_sandboxes() {
    sandboxes_survive("graceful_restart_keeps_sandboxes", Stop::Sigterm);
}

#[test]
fn crash_restart_keeps_sandboxes() {
    sandboxes_survive("crash_restart_keeps_sandboxes", Stop::Sigkill);
}

#[test]
fn window_that_ended_while_down_ends_at_start() {
    let Some(mut lab) = Lab::new("window_that_ended_while_down_ends_at_start") else {
        return;
    };
    lab.start();
    let long = lab.create(json!({"timeout": 600}));
    let long_id = id_of(&long);
    // Coppice's `timeoutMs` keeps the wait short. The window ends between `WINDOW_MS` after
    // the create was sent and `WINDOW_MS` after it returned; the gateway goes away at once,
    // so the sandbox is (almost always) still running when it does.
    const WINDOW_MS: u64 = 4000;
    let sent = now_millis();
    let short_id = id_of(&lab.create(json!({"timeoutMs": WINDOW_MS})));
    let returned = now_millis();
    lab.stop();
    if now_millis() < sent + WINDOW_MS {
        assert!(
            lab.has_processes(&short_id),
            "nothing may end the sandbox while the gateway is down"
        );
    }
    wait_for("the window to pass", Duration::from_secs(60), || {
        (now_millis() > returned + WINDOW_MS + 100).then_some(())
    });

    lab.start();
    lab.api("GET", &format!("/sandboxes/{short_id}"), None)
        .assert_error(
            404,
            "a sandbox whose window ended while the gateway was down",
        );
    lab.assert_gone(&short_id);
    assert_eq!(lab.listed_ids(), [long_id.as_str()]);
    assert_eq!(
        lab.exec(&long_id, Some(&token_of(&long)), "echo fine").ok(),
        "fine\n"
    );
    lab.finish();
}

#[test]
fn reaper_kills_or_pauses_when_the_window_ends() {
    let Some(mut lab) = Lab::new("reaper_kills_or_pauses_when_the_window_ends") else {
        return;
    };
    lab.start();
    let doomed = id_of(&lab.create(json!({"timeout": 1})));
    let sleeper = lab.create(json!({"timeout": 1, "autoPause": true}));
    let (sleeper_id, sleeper_token) = (id_of(&sleeper), token_of(&sleeper));
    let keeper = id_of(&lab.create(json!({"timeout": 600})));

    wait_for("the reaper to kill the sandbox", REAPER_WAIT, || {
        (lab.detail_status(&doomed) == 404).then_some(())
    });
    lab.assert_gone(&doomed);

    wait_for("the reaper to pause the sandbox", REAPER_WAIT, || {
        (lab.detail(&sleeper_id)["state"] == "paused").then_some(())
    });
    assert_eq!(lab.detail(&sleeper_id)["lifecycle"]["onTimeout"], "pause");
    assert!(
        lab.has_processes(&sleeper_id),
        "a paused sandbox keeps its processes"
    );
    // Paused without autoResume: unreachable until connect resumes it.
    let out = lab.exec(&sleeper_id, Some(&sleeper_token), "true");
    assert_eq!(out.status, StatusCode::BAD_GATEWAY, "{out:?}");
    let r = lab.api(
        "POST",
        &format!("/v2/sandboxes/{sleeper_id}/connect"),
        Some(json!({"timeout": 600})),
    );
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(lab.detail(&sleeper_id)["state"], "running");
    assert_eq!(
        lab.exec(&sleeper_id, Some(&sleeper_token), "echo again")
            .ok(),
        "again\n"
    );

    assert_eq!(lab.detail(&keeper)["state"], "running");
    lab.finish();
}
