//! The agent as it really runs: PID 1 of a jail on the default template, reached through the
//! unix socket in a bind-mounted host directory — the path the gateway will use.
//!
//! Prints `SKIP <name>: <reason>` and returns where the host cannot run sandboxes.
#![cfg(target_os = "linux")]
// An integration test crate: no `mod tests` wrapper, helpers may unwrap, skip lines reach the
// output, and waiting happens on plain threads.
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

use bytes::Bytes;
use coppice_jail::JailConfig;
use coppice_lifecycle::backend::{RootfsSpec, Storage};
use http_body_util::Full;
use support::Sandbox;

#[test]
fn the_agent_serves_envd_and_the_interpreter_as_pid_1_of_a_jail() {
    let Some(sbx) = Sandbox::start(
        "the_agent_serves_envd_and_the_interpreter_as_pid_1_of_a_jail",
        "agentjail1",
        512 << 20,
    ) else {
        return;
    };
    // Commands run as `user` (uid 1000) inside the sandbox, whose PID 1 is the agent.
    let who = sbx
        .run("whoami; id -u; hostname; cat /proc/1/comm; echo $HOME")
        .stdout;
    assert_eq!(
        who,
        "user\n1000\nagentjail1\ncoppice-envd\n/home/user\n",
        "log: {}",
        std::fs::read_to_string(sbx.jail.log_path(&sbx.id)).unwrap_or_default()
    );
    // Orphans of finished commands are reaped by the agent: no zombies linger.
    sbx.run("(sleep 0.2 &) ; true");
    std::thread::sleep(Duration::from_millis(500));
    let zombies = sbx.run("ps -eo stat= | grep -c '^Z' || true").stdout;
    assert_eq!(zombies.trim(), "0");

    // A file written through /files lands in the sandbox's own layer, owned by `user`,
    // which is host uid 101000 in the user namespace.
    let req = http::Request::post("/files?path=hello.txt")
        .header("host", "localhost")
        .header("content-type", "application/octet-stream")
        .body(Full::new(Bytes::from_static(b"hello from the host")))
        .unwrap();
    let (status, body) = sbx.request(req);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        sbx.run("cat /home/user/hello.txt").stdout,
        "hello from the host"
    );
    let RootfsSpec::Overlay { upper, .. } = sbx.rt.block_on(sbx.storage.rootfs(&sbx.id)).unwrap()
    else {
        panic!("overlay storage gives overlay roots");
    };
    let meta = std::fs::metadata(upper.join("home/user/hello.txt")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(meta.uid(), JailConfig::DEFAULT_UID_BASE + 1000);

    // The code interpreter keeps state in the sandbox's own python, and runs as root, as
    // E2B's Jupyter server does.
    let exec = |code: &str| {
        let req = http::Request::post("/execute")
            .header("host", "localhost")
            .header("e2b-sandbox-port", "49999")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                serde_json::json!({ "code": code }).to_string(),
            )))
            .unwrap();
        let (status, body) = sbx.request(req);
        assert_eq!(status, 200);
        String::from_utf8(body).unwrap()
    };
    exec("x = 41");
    let out = exec("import os, socket; print(socket.gethostname(), os.getuid()); x + 1");
    assert!(out.contains(r#""text":"agentjail1 0\n""#), "{out}");
    assert!(out.contains(r#""text":"42""#), "{out}");
}
