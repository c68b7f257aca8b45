//! `process.Process` over the agent's socket with real processes.

// Integration tests are a test crate of their own: no `mod tests` wrapper, and SKIP
// lines go to stdout as DEVELOPERS.md asks.
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::tests_outside_test_module,
    clippy::print_stdout
)]

mod support;

use bytes::Bytes;
use serde_json::json;
use support::{b64, basic, envelope, is_root, Agent, Item};

const START: &str = "/process.Process/Start";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_start_echo_hi_streams_start_data_end() {
    let agent = Agent::start().await;
    // Request #2 of the capture, byte for byte (sent chunked, as the SDK does).
    let body = b"\x00\x00\x00\x00J{\"process\":{\"cmd\":\"/bin/bash\",\"args\":[\"-l\",\"-c\",\"echo hi\"]},\"stdin\":false}".to_vec();
    let s = agent
        .stream_raw(
            START,
            body,
            &[
                ("keepalive-ping-interval", "50"),
                ("connect-timeout-ms", "60000"),
            ],
        )
        .await;
    assert_eq!(s.status, 200);
    assert_eq!(s.headers["content-type"], "application/connect+json");
    let out = s.outcome().await;
    assert!(out.pid.is_some());
    assert_eq!(out.stdout, b"hi\n");
    assert_eq!(
        out.end,
        Some(json!({"exited": true, "status": "exit status 0"}))
    );
    assert_eq!(out.eos, json!({}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_exit_3_reports_code_error_and_stderr() {
    let agent = Agent::start().await;
    let body = b"\x00\x00\x00\x00X{\"process\":{\"cmd\":\"/bin/bash\",\"args\":[\"-l\",\"-c\",\"echo boom >&2; exit 3\"]},\"stdin\":false}".to_vec();
    let out = agent.stream_raw(START, body, &[]).await.outcome().await;
    assert_eq!(out.stderr, b"boom\n");
    assert_eq!(out.exit_code(), 3);
    let end = out.end.unwrap();
    assert_eq!(end["status"], "exit status 3");
    assert_eq!(end["error"], "exit status 3");
    assert_eq!(end["exited"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_layers_sandbox_then_request_and_user_basics() {
    let agent = Agent::start().await;
    let (st, _) = agent
        .unary(
            "/init",
            json!({"envVars": {"FOO": "global", "BAR": "global"}}),
            &[],
        )
        .await;
    assert_eq!(st, 204);
    let msg = json!({
        "process": {"cmd": "/bin/bash", "args": ["-l", "-c", "echo $FOO $BAR $HOME $USER"], "envs": {"BAR": "call"}},
        "stdin": false
    });
    let out = agent.stream(START, msg, &[]).await.outcome().await;
    assert_eq!(
        out.stdout_str(),
        format!("global call {} user\n", agent.home().display())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cwd_relative_to_home_and_missing_cwd_is_invalid_argument() {
    let agent = Agent::start().await;
    std::fs::create_dir(agent.home().join("sub")).unwrap();
    let msg = json!({"process": {"cmd": "/bin/pwd", "cwd": "sub"}, "stdin": false});
    let out = agent.stream(START, msg, &[]).await.outcome().await;
    assert_eq!(
        out.stdout_str(),
        format!("{}\n", agent.home().join("sub").display())
    );

    let msg = json!({"process": {"cmd": "/bin/pwd"}, "stdin": false});
    let out = agent.stream(START, msg, &[]).await.outcome().await;
    assert_eq!(out.stdout_str(), format!("{}\n", agent.home().display()));

    let msg =
        json!({"process": {"cmd": "/bin/pwd", "cwd": "/definitely/not/here"}, "stdin": false});
    let out = agent.stream(START, msg, &[]).await.outcome().await;
    assert_eq!(out.status, 200);
    assert_eq!(out.pid, None);
    assert_eq!(out.error_code().as_deref(), Some("invalid_argument"));
    assert!(out.eos["error"]["message"]
        .as_str()
        .unwrap()
        .contains("does not exist"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_run_as_default_user_or_root_and_unknown_user_is_refused() {
    if !is_root() {
        println!(
            "SKIP commands_run_as_default_user_or_root_and_unknown_user_is_refused: needs root"
        );
        return;
    }
    let agent = Agent::start().await;
    let out = agent.run("id -u; id -g", &[]).await;
    assert_eq!(out.stdout_str(), format!("{0}\n{0}\n", support::USER_UID));
    let root = basic("root");
    let out = agent.run("id -u; pwd", &[("authorization", &root)]).await;
    assert_eq!(
        out.stdout_str(),
        format!("0\n{}\n", agent.root_home().display())
    );
    let bad = basic("mallory");
    let out = agent.run("id -u", &[("authorization", &bad)]).await;
    assert_eq!(out.error_code().as_deref(), Some("unauthenticated"));
    assert_eq!(out.eos["error"]["message"], "invalid username: 'mallory'");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_mib_of_output_arrives_whole_in_bounded_chunks() {
    let agent = Agent::start().await;
    let out = agent
        .run("yes 0123456789abcdef | head -c 10485760", &[])
        .await;
    assert_eq!(out.exit_code(), 0);
    assert_eq!(out.stdout.len(), 10 * 1024 * 1024);
    let expected: Vec<u8> = b"0123456789abcdef\n"
        .iter()
        .copied()
        .cycle()
        .take(10 * 1024 * 1024)
        .collect();
    assert!(out.stdout == expected, "10 MiB output differs");
    assert!(
        out.chunks >= 320,
        "output is streamed in chunks, got {}",
        out.chunks
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_invalid_utf8_and_unicode_output_round_trip() {
    let agent = Agent::start().await;
    let out = agent
        .run(
            r"printf '\xff\xfe\x00\x80A'; printf 'héllo wörld ✓ 🦀' >&2",
            &[],
        )
        .await;
    assert_eq!(out.stdout, b"\xff\xfe\x00\x80A");
    assert_eq!(String::from_utf8(out.stderr).unwrap(), "héllo wörld ✓ 🦀");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_processes_each_get_their_own_output() {
    let agent = std::sync::Arc::new(Agent::start().await);
    let mut tasks = Vec::new();
    for i in 0..50 {
        let a = std::sync::Arc::clone(&agent);
        tasks.push(tokio::spawn(async move {
            let out = a
                .run(&format!("echo start-{i}; sleep 0.1; echo end-{i}"), &[])
                .await;
            (i, out)
        }));
    }
    for t in tasks {
        let (i, out) = t.await.unwrap();
        assert_eq!(out.stdout_str(), format!("start-{i}\nend-{i}\n"));
        assert_eq!(out.exit_code(), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_send_input_and_close_stdin() {
    let agent = Agent::start().await;
    let msg = json!({"process": {"cmd": "/bin/cat"}, "stdin": true});
    let mut s = agent.stream(START, msg, &[]).await;
    let pid = s.message().await["event"]["start"]["pid"].as_u64().unwrap();
    let (st, body) = agent
        .unary(
            "/process.Process/SendInput",
            json!({"process": {"pid": pid}, "input": {"stdin": b64(b"data\n")}}),
            &[],
        )
        .await;
    assert_eq!((st.as_u16(), body), (200, json!({})));
    let ev = s.message().await;
    assert_eq!(ev["event"]["data"]["stdout"], b64(b"data\n"));
    let (st, _) = agent
        .unary(
            "/process.Process/CloseStdin",
            json!({"process": {"pid": pid}}),
            &[],
        )
        .await;
    assert_eq!(st, 200);
    let out = s.outcome().await;
    assert_eq!(out.end.unwrap()["status"], "exit status 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_false_gives_dev_null_and_send_input_fails() {
    let agent = Agent::start().await;
    let msg = json!({"process": {"cmd": "/bin/bash", "args": ["-c", "cat; echo done; sleep 100"]}, "stdin": false});
    let mut s = agent.stream(START, msg, &[]).await;
    let pid = s.message().await["event"]["start"]["pid"].as_u64().unwrap();
    assert_eq!(s.message().await["event"]["data"]["stdout"], b64(b"done\n"));
    let (st, body) = agent
        .unary(
            "/process.Process/SendInput",
            json!({"process": {"pid": pid}, "input": {"stdin": "eA=="}}),
            &[],
        )
        .await;
    assert_eq!(st, 400);
    assert_eq!(body["code"], "failed_precondition");
    agent
        .unary(
            "/process.Process/SendSignal",
            json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
            &[],
        )
        .await;
    assert_eq!(s.outcome().await.end.unwrap()["status"], "signal: killed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_input_captured_shape_feeds_stdin() {
    let agent = Agent::start().await;
    let msg = json!({"process": {"cmd": "/bin/cat"}, "stdin": true, "tag": "cat-1"});
    let mut s = agent.stream(START, msg, &[]).await;
    let pid = s.message().await["event"]["start"]["pid"].as_u64().unwrap();
    // Request #13 of the capture with the pid substituted; sent as three chunks.
    let chunks = vec![
        Bytes::from(envelope(
            0,
            format!("{{\"start\":{{\"process\":{{\"pid\":{pid}}}}}}}").as_bytes(),
        )),
        Bytes::from(envelope(0, br#"{"data":{"input":{"stdin":"YQ=="}}}"#)),
        Bytes::from(envelope(0, br#"{"data":{"input":{"stdin":"Yg=="}}}"#)),
        Bytes::from(envelope(0, br#"{"keepalive":{}}"#)),
    ];
    let req = agent
        .request("POST", "/process.Process/StreamInput")
        .header("content-type", "application/connect+json")
        .body(support::Chunked::new(chunks))
        .unwrap();
    let resp = agent.send(req).await;
    assert_eq!(resp.status(), 200);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(&body[..], b"\x00\x00\x00\x00\x02{}\x02\x00\x00\x00\x02{}");
    let mut got = Vec::new();
    while got.len() < 2 {
        let ev = s.message().await;
        got.extend(support::unb64(
            ev["event"]["data"]["stdout"].as_str().unwrap(),
        ));
    }
    assert_eq!(got, b"ab");
    // Select by tag this time.
    agent
        .unary(
            "/process.Process/CloseStdin",
            json!({"process": {"tag": "cat-1"}}),
            &[],
        )
        .await;
    assert_eq!(s.outcome().await.exit_code(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_signal_and_unknown_pids() {
    let agent = Agent::start().await;
    // Request #8 of the capture: a background sleep.
    let body = b"\x00\x00\x00\x00L{\"process\":{\"cmd\":\"/bin/bash\",\"args\":[\"-l\",\"-c\",\"sleep 100\"]},\"stdin\":false}".to_vec();
    let mut s = agent.stream_raw(START, body, &[]).await;
    let pid = s.message().await["event"]["start"]["pid"].as_u64().unwrap();
    let (st, list) = agent.unary("/process.Process/List", json!({}), &[]).await;
    assert_eq!(st, 200);
    let entry = list["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == pid)
        .expect("started process is listed")
        .clone();
    assert_eq!(
        entry["config"],
        json!({"cmd": "/bin/bash", "args": ["-l", "-c", "sleep 100"]})
    );

    let (st, body) = agent
        .unary(
            "/process.Process/SendSignal",
            json!({"process": {"pid": pid}, "signal": "SIGNAL_UNSPECIFIED"}),
            &[],
        )
        .await;
    assert_eq!(
        (st.as_u16(), body["code"].as_str()),
        (501, Some("unimplemented"))
    );
    let (st, _) = agent
        .unary(
            "/process.Process/SendSignal",
            json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
            &[],
        )
        .await;
    assert_eq!(st, 200);
    let out = s.outcome().await;
    assert_eq!(
        out.end.unwrap(),
        json!({"exitCode": -1, "exited": false, "status": "signal: killed", "error": "signal: killed"})
    );
    assert!(!support::pid_alive(u32::try_from(pid).unwrap()));
    let (st, list) = agent.unary("/process.Process/List", json!({}), &[]).await;
    assert_eq!(st, 200);
    assert!(!list["processes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["pid"] == pid));

    for rpc in ["SendSignal", "SendInput", "CloseStdin", "Update"] {
        let (st, body) = agent
            .unary(
                &format!("/process.Process/{rpc}"),
                json!({"process": {"pid": 999_999_999u32}, "signal": "SIGNAL_SIGKILL", "input": {"stdin": "eA=="}}),
                &[],
            )
            .await;
        assert_eq!(
            (st.as_u16(), body["code"].as_str()),
            (404, Some("not_found")),
            "{rpc}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_is_delivered_to_the_process_group() {
    let agent = Agent::start().await;
    let msg = json!({"process": {"cmd": "/bin/bash", "args": ["-c", "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.05; done"]}, "stdin": false});
    let mut s = agent.stream(START, msg, &[]).await;
    let pid = s.message().await["event"]["start"]["pid"].as_u64().unwrap();
    assert_eq!(
        s.message().await["event"]["data"]["stdout"],
        b64(b"ready\n")
    );
    agent
        .unary(
            "/process.Process/SendSignal",
            json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGTERM"}),
            &[],
        )
        .await;
    let out = s.outcome().await;
    assert_eq!(out.stdout_str(), "got-term\n");
    assert_eq!(out.exit_code(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeout_kills_the_process_group() {
    let agent = Agent::start().await;
    let msg = json!({"process": {"cmd": "/bin/bash", "args": ["-c", "sleep 100 & echo $!; wait"]}, "stdin": false});
    let mut s = agent
        .stream(START, msg, &[("connect-timeout-ms", "300")])
        .await;
    let pid = s.message().await["event"]["start"]["pid"].as_u64().unwrap();
    let child: u32 = String::from_utf8(support::unb64(
        s.message().await["event"]["data"]["stdout"]
            .as_str()
            .unwrap(),
    ))
    .unwrap()
    .trim()
    .parse()
    .unwrap();
    let out = s.outcome().await;
    assert_eq!(out.error_code().as_deref(), Some("deadline_exceeded"));
    let pid = u32::try_from(pid).unwrap();
    assert!(support::eventually(|| !support::pid_alive(pid) && !support::pid_alive(child)).await);
    // The kill is reported to the gateway: a task.timeout line in the run directory, then
    // the task.completed every ending gets, written once the agent has the exit, which can
    // be a moment after the pid is gone.
    let file = agent.state.config.report_file.clone().unwrap();
    assert!(
        support::eventually(
            || coppice_envd::report::read_from(&file, 0).is_ok_and(|c| c.lines.len() >= 2)
        )
        .await
    );
    let chunk = coppice_envd::report::read_from(&file, 0).unwrap();
    assert_eq!(chunk.lines.len(), 2);
    let report: serde_json::Value = serde_json::from_slice(&chunk.lines[0]).unwrap();
    assert_eq!(report["type"], "task.timeout");
    assert_eq!(report["command"], "/bin/bash -c sleep 100 & echo $!; wait");
    assert_eq!(report["limit_ms"], 300);
    assert!(report["cpu_ms"].as_u64().unwrap() < 300, "{report}");
    assert_eq!(report["pid"], pid);
    assert_eq!(report["exit_code"], -1);
    assert_eq!(report["signal"], 9);
    assert!(report["duration_ms"].as_u64().unwrap() >= 300, "{report}");
    let done: serde_json::Value = serde_json::from_slice(&chunk.lines[1]).unwrap();
    assert_eq!(done["type"], "task.completed");
    assert_eq!(done["timed_out"], true);
    for field in ["command", "pid", "exit_code", "signal", "duration_ms"] {
        assert_eq!(done[field], report[field], "{field}");
    }
}

/// Every command that ends is reported to the gateway as `task.completed`: its pid, command,
/// tag, exit code or signal and how long it ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ending_is_reported_as_task_completed() {
    let agent = Agent::start().await;
    let msg = json!({"process": {"cmd": "/bin/sh", "args": ["-c", "sleep 0.2; exit 3"]}, "stdin": false, "tag": "build"});
    let mut s = agent.stream(START, msg, &[]).await;
    let first = s.message().await["event"]["start"]["pid"].as_u64().unwrap();
    assert_eq!(s.outcome().await.exit_code(), 3);
    let msg = json!({"process": {"cmd": "/bin/sh", "args": ["-c", "kill -9 $$"]}, "stdin": false});
    let mut s = agent.stream(START, msg, &[]).await;
    let second = s.message().await["event"]["start"]["pid"].as_u64().unwrap();
    s.outcome().await;
    let file = agent.state.config.report_file.clone().unwrap();
    assert!(
        support::eventually(
            || coppice_envd::report::read_from(&file, 0).is_ok_and(|c| c.lines.len() >= 2)
        )
        .await
    );
    let chunk = coppice_envd::report::read_from(&file, 0).unwrap();
    let lines: Vec<serde_json::Value> = chunk
        .lines
        .iter()
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    let exited = lines.iter().find(|l| l["pid"] == first).unwrap();
    assert_eq!(exited["type"], "task.completed");
    assert_eq!(exited["command"], "/bin/sh -c sleep 0.2; exit 3");
    assert_eq!(exited["tag"], "build");
    assert_eq!(exited["exit_code"], 3);
    assert_eq!(exited["signal"], serde_json::Value::Null);
    assert_eq!(exited["timed_out"], false);
    assert!(exited["duration_ms"].as_u64().unwrap() >= 200, "{exited}");
    let killed = lines.iter().find(|l| l["pid"] == second).unwrap();
    assert_eq!(killed["exit_code"], -1);
    assert_eq!(killed["signal"], 9);
    assert!(killed.get("tag").is_none(), "{killed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_keeps_the_process_and_connect_resumes_it() {
    let agent = Agent::start().await;
    let msg = json!({"process": {"cmd": "/bin/cat"}, "stdin": true});
    let mut s = agent.stream(START, msg, &[]).await;
    let pid = s.message().await["event"]["start"]["pid"].as_u64().unwrap();
    drop(s);
    // Request #11 of the capture, pid substituted.
    let body = envelope(0, format!("{{\"process\":{{\"pid\":{pid}}}}}").as_bytes());
    let mut c = agent
        .stream_raw("/process.Process/Connect", body, &[])
        .await;
    assert_eq!(c.message().await, json!({"event": {"start": {"pid": pid}}}));
    agent
        .unary(
            "/process.Process/SendInput",
            json!({"process": {"pid": pid}, "input": {"stdin": b64(b"later\n")}}),
            &[],
        )
        .await;
    assert_eq!(
        c.message().await["event"]["data"]["stdout"],
        b64(b"later\n")
    );
    agent
        .unary(
            "/process.Process/CloseStdin",
            json!({"process": {"pid": pid}}),
            &[],
        )
        .await;
    assert_eq!(c.outcome().await.exit_code(), 0);

    // A late Connect still gets start and the retained end event.
    let body = envelope(0, format!("{{\"process\":{{\"pid\":{pid}}}}}").as_bytes());
    let late = agent
        .stream_raw("/process.Process/Connect", body, &[])
        .await
        .outcome()
        .await;
    assert_eq!(late.pid, Some(u32::try_from(pid).unwrap()));
    assert_eq!(late.end.unwrap()["status"], "exit status 0");

    let body = envelope(0, br#"{"process":{"pid":999999999}}"#);
    let missing = agent
        .stream_raw("/process.Process/Connect", body, &[])
        .await
        .outcome()
        .await;
    assert_eq!(missing.error_code().as_deref(), Some("not_found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalives_flow_while_the_process_is_quiet() {
    let agent = Agent::start().await;
    let msg = json!({"process": {"cmd": "/bin/cat"}, "stdin": true});
    let mut s = agent
        .stream(START, msg, &[("keepalive-ping-interval", "1")])
        .await;
    let pid = s.message().await["event"]["start"]["pid"].as_u64().unwrap();
    assert_eq!(s.message().await, json!({"event": {"keepalive": {}}}));
    agent
        .unary(
            "/process.Process/CloseStdin",
            json!({"process": {"pid": pid}}),
            &[],
        )
        .await;
    assert_eq!(s.outcome().await.exit_code(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pty_start_input_resize_and_kill() {
    let agent = Agent::start().await;
    // Request #8 of log B: the SDK's pty.create.
    let body = b"\x00\x00\x00\x00\x9c{\"process\":{\"cmd\":\"/bin/bash\",\"args\":[\"-i\",\"-l\"],\"envs\":{\"TERM\":\"xterm-256color\",\"LANG\":\"C.UTF-8\",\"LC_ALL\":\"C.UTF-8\"}},\"pty\":{\"size\":{\"cols\":80,\"rows\":24}}}".to_vec();
    let mut s = agent.stream_raw(START, body, &[]).await;
    let pid = s.message().await["event"]["start"]["pid"].as_u64().unwrap();
    let (st, _) = agent
        .unary(
            "/process.Process/Update",
            json!({"process": {"pid": pid}, "pty": {"size": {"cols": 100, "rows": 30}}}),
            &[],
        )
        .await;
    assert_eq!(st, 200);
    let (st, _) = agent
        .unary(
            "/process.Process/SendInput",
            json!({"process": {"pid": pid}, "input": {"pty": b64(b"stty size; tty; echo mark-$((6*7))\n")}}),
            &[],
        )
        .await;
    assert_eq!(st, 200);
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("mark-42") {
        match s.next().await {
            Some(Item::Message(ev)) => {
                if let Some(p) = ev["event"]["data"]["pty"].as_str() {
                    seen.extend(support::unb64(p));
                }
            }
            other => panic!("pty stream ended early: {other:?}"),
        }
    }
    let text = String::from_utf8_lossy(&seen);
    assert!(
        text.contains("30 100"),
        "stty sees the resized terminal: {text}"
    );
    assert!(
        text.contains("/dev/pts/"),
        "the pty is the controlling terminal: {text}"
    );
    let (st, body) = agent
        .unary(
            "/process.Process/CloseStdin",
            json!({"process": {"pid": pid}}),
            &[],
        )
        .await;
    assert_eq!(
        (st.as_u16(), body["code"].as_str()),
        (400, Some("failed_precondition"))
    );
    agent
        .unary(
            "/process.Process/SendSignal",
            json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
            &[],
        )
        .await;
    let out = s.outcome().await;
    assert_eq!(out.end.unwrap()["exitCode"], -1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_without_pty_is_refused() {
    let agent = Agent::start().await;
    let msg = json!({"process": {"cmd": "/bin/cat"}, "stdin": true});
    let mut s = agent.stream(START, msg, &[]).await;
    let pid = s.message().await["event"]["start"]["pid"].as_u64().unwrap();
    let (st, body) = agent
        .unary(
            "/process.Process/Update",
            json!({"process": {"pid": pid}, "pty": {"size": {"cols": 1, "rows": 1}}}),
            &[],
        )
        .await;
    assert_eq!(
        (st.as_u16(), body["code"].as_str()),
        (400, Some("failed_precondition"))
    );
    agent
        .unary(
            "/process.Process/CloseStdin",
            json!({"process": {"pid": pid}}),
            &[],
        )
        .await;
    assert_eq!(s.outcome().await.exit_code(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_command_is_an_error_not_a_crash() {
    let agent = Agent::start().await;
    let msg = json!({"process": {"cmd": "/no/such/binary"}, "stdin": false});
    let out = agent.stream(START, msg, &[]).await.outcome().await;
    assert_eq!(out.error_code().as_deref(), Some("invalid_argument"));
    let out = agent.run("echo still-fine", &[]).await;
    assert_eq!(out.stdout_str(), "still-fine\n");
}
