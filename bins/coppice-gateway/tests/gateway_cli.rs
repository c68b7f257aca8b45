//! The `coppice` command against the real gateway: sandboxes listed, inspected, run in and
//! killed, the pool and events read, the API key passed from the environment, and routes the
//! gateway does not serve named as such. The command runs in-process (`coppice_cli::run`),
//! with its output captured. Real binary, real sandboxes; see `support/mod.rs`.
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

use serde_json::{json, Value};
use support::{id_of, wait_for, Lab};

/// What one run of the command gave.
struct Run {
    code: u8,
    out: String,
    err: String,
}

/// Runs `coppice ARGS` against `url` with `key` in `E2B_API_KEY`, as a user's shell would.
fn coppice(url: &str, key: Option<&str>, args: &[&str]) -> Run {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let env = |k: &str| match k {
        "E2B_API_URL" => Some(url.to_owned()),
        "E2B_API_KEY" => key.map(str::to_owned),
        _ => None,
    };
    let code = coppice_cli::run(
        args.iter().map(|s| (*s).to_owned()).collect(),
        &env,
        &mut out,
        &mut err,
    );
    let run = Run {
        code,
        out: String::from_utf8(out).unwrap(),
        err: String::from_utf8(err).unwrap(),
    };
    println!(
        "coppice {}: {} | {} | {}",
        args.join(" "),
        run.code,
        run.out.trim_end(),
        run.err.trim_end()
    );
    run
}

#[test]
fn the_cli_drives_sandboxes_through_the_api() {
    let Some(mut lab) = Lab::new("the_cli_drives_sandboxes_through_the_api") else {
        return;
    };
    lab.options.api_keys = Some("cli-key".into());
    lab.key = Some("cli-key".into());
    lab.start();
    let url = format!("http://{}", lab.addr());
    let run = |args: &[&str]| coppice(&url, Some("cli-key"), args);

    // Without the key the gateway refuses, and the command says so.
    let r = coppice(&url, None, &["sandbox", "list"]);
    assert_eq!(r.code, 1);
    assert!(r.err.contains("401"), "{}", r.err);

    let r = run(&["sandbox", "list"]);
    assert_eq!((r.code, r.out.as_str()), (0, "no sandboxes\n"));

    let id = id_of(&lab.create(json!({"templateID": "base", "metadata": {"who": "cli"}})));
    let r = run(&["sandbox", "list"]);
    assert_eq!(r.code, 0);
    let row = r.out.lines().find(|l| l.starts_with(&id)).unwrap();
    assert!(row.contains("base") && row.contains("running"), "{row}");
    let r = run(&["--json", "sandbox", "list", "--metadata", "who=cli"]);
    let listed: Value = serde_json::from_str(&r.out).unwrap();
    assert_eq!(listed[0]["sandboxID"], json!(id));
    let r = run(&["sandbox", "list", "--metadata", "who=nobody"]);
    assert_eq!(r.out, "no sandboxes\n");

    let r = run(&["sandbox", "info", &id, "--json"]);
    assert_eq!(
        serde_json::from_str::<Value>(&r.out).unwrap()["sandboxID"],
        json!(id)
    );

    // exec: output as it comes, stderr apart, the command's exit code, its user and cwd.
    let r = run(&[
        "sandbox",
        "exec",
        &id,
        "--",
        "echo out; echo err >&2; exit 3",
    ]);
    assert_eq!(
        (r.code, r.out.as_str(), r.err.as_str()),
        (3, "out\n", "err\n")
    );
    let r = run(&["sandbox", "exec", &id, "--", "printf", "%s|", "a b", "it's"]);
    assert_eq!((r.code, r.out.as_str()), (0, "a b|it's|"));
    assert_eq!(
        run(&["sandbox", "exec", &id, "--", "id", "-un"]).out,
        "user\n"
    );
    let r = run(&[
        "sandbox",
        "exec",
        &id,
        "--user",
        "root",
        "--cwd",
        "/tmp",
        "--",
        "id -un; pwd",
    ]);
    assert_eq!(r.out, "root\n/tmp\n");

    // The agent's log names the processes just run; events have the sandbox's creation.
    let r = run(&["sandbox", "logs", &id]);
    assert!(r.out.contains("started"), "{}", r.out);
    let r = run(&[
        "events",
        "tail",
        "--sandbox",
        &id,
        "--type",
        "sandbox.lifecycle.created",
    ]);
    assert!(r.out.contains("sandbox.lifecycle.created"), "{}", r.out);
    assert!(r.out.contains(&id));

    let r = run(&["pool"]);
    assert_eq!(r.code, 0);
    assert!(r.out.lines().any(|l| l.starts_with("base ")), "{}", r.out);
    let r = run(&["templates", "list"]);
    assert!(r.out.contains("code-interpreter-v1"), "{}", r.out);

    // Snapshots: listed with their names, and deleted.
    let snap = lab.api(
        "POST",
        &format!("/sandboxes/{id}/snapshots"),
        Some(json!({"name": "cli-snap"})),
    );
    assert_eq!(snap.status, http::StatusCode::CREATED, "{}", snap.text());
    let snapshot = snap.json()["snapshotID"].as_str().unwrap().to_owned();
    let r = run(&["snapshots", "list", "--sandbox", &id]);
    let row = r.out.lines().find(|l| l.starts_with(&snapshot)).unwrap();
    assert!(row.contains("cli-snap"), "{row}");
    let r = run(&["snapshots", "delete", &snapshot]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(
        run(&["snapshots", "list", "--sandbox", &id]).out,
        "no snapshots\n"
    );

    // A command whose server side is missing names the route.
    let r = run(&["keys", "list"]);
    assert_eq!(r.code, 1);
    assert!(r.err.contains("does not serve GET /api-keys"), "{}", r.err);

    // pause, then kill: gone for the API, and a second kill fails with the gateway's 404.
    assert_eq!(run(&["sandbox", "pause", &id]).code, 0);
    assert_eq!(lab.detail(&id)["state"], "paused");
    let r = run(&["sandbox", "kill", &id]);
    assert_eq!((r.code, r.out.trim()), (0, format!("killed {id}").as_str()));
    wait_for("the kill", Duration::from_secs(10), || {
        (lab.detail_status(&id) == 404).then_some(())
    });
    let r = run(&["sandbox", "kill", &id]);
    assert_eq!(r.code, 1);
    assert!(r.err.contains("404"), "{}", r.err);

    // Usage errors and an unreachable gateway.
    assert_eq!(run(&["sandbox", "frob"]).code, 1);
    assert_eq!(run(&["--url", "https://x", "pool"]).code, 2);
    let r = coppice("http://127.0.0.1:1", None, &["pool"]);
    assert_eq!(r.code, 1);
    assert!(r.err.contains("cannot reach the gateway"), "{}", r.err);

    lab.finish();
}
