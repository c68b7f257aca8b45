//! The gateway as a service manager runs it: systemd's notify protocol (`READY=1` once
//! `/health` is 200, `STOPPING=1` at a stop) on a socket the test binds as systemd would,
//! and `--log-format json`, one JSON object per line. Real binary; see `support/mod.rs`.
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

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::Value;
use support::Lab;

/// Every datagram `socket` receives within `limit`, as text.
fn received(socket: &UnixDatagram, limit: Duration) -> Vec<String> {
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut out = Vec::new();
    let end = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    while Instant::now() < end {
        if let Ok(n) = socket.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    out
}

#[test]
fn a_service_manager_hears_ready_and_stopping_and_gets_json_logs() {
    let Some(mut lab) = Lab::new("a_service_manager_hears_ready_and_stopping_and_gets_json_logs")
    else {
        return;
    };
    let path = lab.state_dir.join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    lab.options
        .env
        .push(("NOTIFY_SOCKET".into(), path.to_string_lossy().into_owned()));
    lab.options.args = vec!["--log-format".into(), "json".into()];
    lab.start();
    assert_eq!(lab.health().status, StatusCode::OK);
    // READY=1 came no earlier than /health's 200: by the time start() saw 200, it was sent.
    let states = received(&socket, Duration::from_secs(2));
    let ready = states
        .iter()
        .find(|s| s.contains("READY=1"))
        .unwrap_or_else(|| {
            panic!("no READY=1 among {states:?}");
        });
    assert!(ready.contains(&format!("MAINPID={}", lab.pid())), "{ready}");
    assert!(
        states[0].starts_with("STATUS="),
        "a status first: {states:?}"
    );

    let log = lab.log();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: not JSON: {l}")))
        .collect();
    assert!(lines
        .iter()
        .any(|v| v["fields"]["message"] == "listening" && v["level"] == "INFO"));

    lab.stop();
    let states = received(&socket, Duration::from_millis(500));
    assert!(states.iter().any(|s| s == "STOPPING=1"), "{states:?}");
    lab.finish();
}
