//! The service files in `contrib/`: the systemd unit passes `systemd-analyze verify` with the
//! built gateway as its `ExecStart` and its `ExecStartPre=--check-config`, and the FreeBSD
//! rc.d script parses as sh(1) and has what rc.subr needs.
#![cfg(target_os = "linux")]
// An integration test crate: no `mod tests` wrapper, helpers may unwrap, skip lines must reach
// the test output, and the helpers are polled on plain threads.
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::tests_outside_test_module,
    clippy::print_stdout,
    clippy::disallowed_methods
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn contrib(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../contrib")
        .join(rel)
}

/// Runs `cmd` for at most 30 s; its status and combined output.
fn run(mut cmd: Command) -> (bool, String) {
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.reopen().unwrap())
        .stderr(out.reopen().unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} took over 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        status.success(),
        std::fs::read_to_string(out.path()).unwrap(),
    )
}

#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(contrib("systemd/coppice-gateway.service")).unwrap();
    for line in [
        "Type=notify",
        "ExecStart=/usr/local/bin/coppice-gateway",
        "ExecStartPre=/usr/local/bin/coppice-gateway --check-config",
        "KillMode=mixed",
    ] {
        assert!(unit.lines().any(|l| l == line), "no {line:?} in the unit");
    }
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("SKIP the_systemd_unit_verifies (verify step): no systemd-analyze on this host");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("coppice-gateway.service");
    std::fs::write(
        &copy,
        unit.replace(
            "/usr/local/bin/coppice-gateway",
            env!("CARGO_BIN_EXE_coppice-gateway"),
        ),
    )
    .unwrap();
    let mut cmd = Command::new("systemd-analyze");
    cmd.arg("verify").arg(&copy);
    let (ok, out) = run(cmd);
    assert!(ok && out.trim().is_empty(), "systemd-analyze verify: {out}");
}

#[test]
fn the_rc_d_script_parses_and_names_what_rc_subr_needs() {
    let path = contrib("rc.d/coppice_gateway");
    let script = std::fs::read_to_string(&path).unwrap();
    for needle in [
        "rcvar=\"coppice_gateway_enable\"",
        "pidfile=",
        "/usr/sbin/daemon",
        "--check-config",
        "run_rc_command \"$1\"",
    ] {
        assert!(script.contains(needle), "no {needle:?} in the rc.d script");
    }
    let mut cmd = Command::new("sh");
    cmd.arg("-n").arg(&path);
    let (ok, out) = run(cmd);
    assert!(ok, "sh -n: {out}");
}
