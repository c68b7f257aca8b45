//! Supervision of what runs in a sandbox, with the agent as it really runs: PID 1 of a jail
//! on the default template with a small memory limit, reached through its unix socket.
//!
//! - A memory hog, as a command or in a code-interpreter cell, is what the OOM killer takes:
//!   the agent (last in line), the other contexts and the sandbox survive, and the cell says
//!   why it stopped.
//! - Root in the sandbox cannot stop the agent with signals.
//! - The agent answers on E2B's ports on the sandbox's loopback, as E2B's processes do, and a
//!   kernel killed from inside comes back at the next execution (E2B's `test_systemd`).
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

use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use coppice_jail::{JailConfig, LinuxJail};
use coppice_lifecycle::backend::{
    BindMount, InitSpec, Isolation, JailSpec, LayerId, Limits, SandboxId, Storage,
};
use coppice_zfs::OverlayStorage;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

const AGENT: &str = env!("CARGO_BIN_EXE_coppice-envd");
/// Small, so a hog reaches it in a moment.
const MEMORY: u64 = 256 << 20;
/// A cell or command that appends 64 MiB blocks until something stops it.
const HOG: &str = "x = []\nwhile True:\n    x.append(bytearray(64 * 1024 * 1024))\n";

struct Sandbox {
    rt: tokio::runtime::Runtime,
    jail: LinuxJail,
    storage: OverlayStorage,
    id: SandboxId,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

/// How a command ended, and what it wrote.
#[derive(Debug)]
struct Ran {
    stdout: String,
    stderr: String,
    /// `exitCode` of the end event (absent means 0).
    exit_code: i64,
    /// `status` of the end event, e.g. `signal: killed`.
    status: String,
}

impl Sandbox {
    fn start(name: &str, id: &str) -> Option<Self> {
        let caps = <LinuxJail as Isolation>::probe().unwrap();
        let missing: Vec<_> = caps.missing().map(|c| c.name.clone()).collect();
        if !missing.is_empty() {
            println!("SKIP {name}: missing {}", missing.join(", "));
            return None;
        }
        let template = coppice_zfs::template::TemplateBuilder::new(
            coppice_zfs::template::default_cache_dir(),
            JailConfig::DEFAULT_UID_BASE,
        )
        .ensure(false, &mut |line: &str| eprintln!("template: {line}"))
        .unwrap();
        let dir = tempfile::Builder::new()
            .prefix("coppice-envd-supervision-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut config = JailConfig::new(dir.path().join("jail"));
        config.cgroup_group = format!(
            "coppice-test-{}",
            dir.path().file_name().unwrap().to_string_lossy()
        );
        let jail = LinuxJail::open(config).unwrap();
        let storage = OverlayStorage::open(dir.path().join("storage")).unwrap();
        let base = LayerId::new("base").unwrap();
        rt.block_on(storage.import_template(&base, &template))
            .unwrap();
        let id = SandboxId::new(id).unwrap();
        let rootfs = rt.block_on(storage.create_rootfs(&id, &base)).unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir_all(&run).unwrap();
        let root_uid = jail.host_id(0);
        std::os::unix::fs::chown(&run, Some(root_uid), Some(root_uid)).unwrap();
        let spec = JailSpec {
            id: id.clone(),
            rootfs,
            init: InitSpec {
                program: "/usr/local/bin/coppice-envd".into(),
                args: vec!["--socket".into(), "/run/coppice/agent.sock".into()],
                env: vec![(
                    "PATH".into(),
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                )],
                cwd: "/".into(),
            },
            mounts: vec![
                BindMount {
                    source: AGENT.into(),
                    target: "/usr/local/bin/coppice-envd".into(),
                    read_only: true,
                },
                BindMount {
                    source: run.clone(),
                    target: "/run/coppice".into(),
                    read_only: false,
                },
            ],
            limits: Limits {
                memory_bytes: Some(MEMORY),
                pids: Some(256),
                cpu_millis: Some(1000),
            },
            network: None,
        };
        rt.block_on(jail.start(spec)).unwrap();
        let socket = run.join("agent.sock");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "the agent never opened its socket; log: {}",
                std::fs::read_to_string(jail.log_path(&id)).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(Self {
            rt,
            jail,
            storage,
            id,
            socket,
            _dir: dir,
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.jail.log_path(&self.id)).unwrap_or_default()
    }

    /// One HTTP/1.1 request over the agent's socket; returns status and whole body.
    fn request(&self, req: http::Request<Full<Bytes>>) -> (u16, Vec<u8>) {
        self.rt.block_on(async {
            let stream = tokio::net::UnixStream::connect(&self.socket)
                .await
                .unwrap_or_else(|e| panic!("the agent is gone: {e}; log: {}", self.log()));
            let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
            tokio::spawn(conn);
            let resp = tokio::time::timeout(Duration::from_secs(120), sender.send_request(req))
                .await
                .expect("the agent answers within 2 minutes")
                .unwrap();
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, body.to_vec())
        })
    }

    /// Runs `cmd` with bash through `process.Start` as `user`.
    fn run_as(&self, user: &str, cmd: &str) -> Ran {
        let msg = json!({
            "process": {"cmd": "/bin/bash", "args": ["-c", cmd]},
            "stdin": false,
        })
        .to_string();
        let mut body = vec![0u8];
        body.extend_from_slice(&u32::try_from(msg.len()).unwrap().to_be_bytes());
        body.extend_from_slice(msg.as_bytes());
        let req = http::Request::post("/process.Process/Start")
            .header("host", "localhost")
            .header("content-type", "application/connect+json")
            .header("connect-protocol-version", "1")
            .header(
                "authorization",
                format!("Basic {}", STANDARD.encode(format!("{user}:"))),
            )
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let (status, bytes) = self.request(req);
        assert_eq!(status, 200);
        let mut ran = Ran {
            stdout: String::new(),
            stderr: String::new(),
            exit_code: 0,
            status: String::new(),
        };
        let mut rest = bytes.as_slice();
        while rest.len() >= 5 {
            let len =
                usize::try_from(u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]])).unwrap();
            let frame: Value = serde_json::from_slice(&rest[5..5 + len]).unwrap();
            let event = &frame["event"];
            for (key, out) in [("stdout", &mut ran.stdout), ("stderr", &mut ran.stderr)] {
                if let Some(data) = event["data"][key].as_str() {
                    out.push_str(&String::from_utf8_lossy(&STANDARD.decode(data).unwrap()));
                }
            }
            if let Some(end) = event.get("end") {
                ran.exit_code = end["exitCode"].as_i64().unwrap_or(0);
                ran.status = end["status"].as_str().unwrap_or_default().to_owned();
            }
            rest = &rest[5 + len..];
        }
        ran
    }

    fn run(&self, cmd: &str) -> Ran {
        self.run_as("user", cmd)
    }

    /// `POST /execute` on the code interpreter: the NDJSON lines.
    fn execute(&self, body: Value) -> Vec<Value> {
        let req = http::Request::post("/execute")
            .header("host", "localhost")
            .header("e2b-sandbox-port", "49999")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let (status, body) = self.request(req);
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        body.split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect()
    }

    /// A new context of `language`: its id.
    fn context(&self, language: &str) -> String {
        let req = http::Request::post("/contexts")
            .header("host", "localhost")
            .header("e2b-sandbox-port", "49999")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                json!({ "language": language }).to_string(),
            )))
            .unwrap();
        let (status, body) = self.request(req);
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        serde_json::from_slice::<Value>(&body).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.rt.block_on(self.jail.kill(&self.id));
        let _ = self.rt.block_on(self.storage.remove_rootfs(&self.id));
        let _ = self.jail.remove_spare_cgroups();
    }
}

/// The main result's text of an execution, if any.
fn text_of(lines: &[Value]) -> Option<String> {
    lines
        .iter()
        .find(|l| l["type"] == "result" && l["is_main_result"] == true)
        .and_then(|l| l["text"].as_str().map(str::to_owned))
}

fn error_of(lines: &[Value]) -> Option<&Value> {
    lines.iter().find(|l| l["type"] == "error")
}

#[test]
fn a_memory_hog_is_killed_and_the_sandbox_lives_on() {
    let name = "a_memory_hog_is_killed_and_the_sandbox_lives_on";
    let Some(sbx) = Sandbox::start(name, "hogjail1") else {
        return;
    };
    // The agent is last in line for the OOM killer: what it starts takes the maximum score
    // and cannot put itself below the agent (whose score is -941 where the host lets the
    // jail lower it, and 0 where it does not).
    let agent: i32 = sbx
        .run("cat /proc/1/oom_score_adj")
        .stdout
        .trim()
        .parse()
        .unwrap();
    assert!(agent == -941 || agent == 0, "{agent}");
    for user in ["user", "root"] {
        let below = agent - 1;
        let scores = sbx.run_as(
            user,
            &format!(
                "cat /proc/self/oom_score_adj; \
                 echo {below} > /proc/self/oom_score_adj 2>/dev/null || echo refused"
            ),
        );
        assert_eq!(
            scores.stdout,
            "1000\nrefused\n",
            "{user}: {scores:?}; log: {}",
            sbx.log()
        );
    }

    // A context with state, which the hog in another context must not disturb.
    let bystander = sbx.context("python");
    let set = sbx.execute(json!({"code": "kept = 41", "context_id": bystander}));
    assert!(error_of(&set).is_none(), "{set:?}");

    // The hog as a command: killed by the kernel, reported as a signal.
    let hog = sbx.run(&format!("python3 -c '{HOG}'"));
    // SIGKILL, seen directly (bash ran python in its place) or through bash.
    assert!(
        hog.status == "signal: killed" || hog.exit_code == 137,
        "{hog:?}; log: {}",
        sbx.log()
    );

    // The hog in a cell of the default python context: the cell ends with an error that
    // says why, and the context starts afresh at the next execution.
    let lines = sbx.execute(json!({ "code": HOG }));
    let error = error_of(&lines).unwrap_or_else(|| panic!("{lines:?}"));
    assert_eq!(error["name"], "ContextRestarting", "{error}");
    assert!(
        error["value"].as_str().unwrap().contains("out-of-memory"),
        "{error}"
    );
    assert_eq!(lines.last().unwrap()["type"], "end_of_execution");
    let again = sbx.execute(json!({"code": "x = 1; x"}));
    assert_eq!(text_of(&again).as_deref(), Some("1"), "{again:?}");

    // The agent, the other context and the sandbox are all still there.
    let kept = sbx.execute(json!({"code": "kept + 1", "context_id": bystander}));
    assert_eq!(text_of(&kept).as_deref(), Some("42"), "{kept:?}");
    assert_eq!(sbx.run("echo alive").stdout, "alive\n");
}

#[test]
fn root_in_the_sandbox_cannot_stop_the_agent_and_killed_kernels_come_back() {
    let name = "root_in_the_sandbox_cannot_stop_the_agent_and_killed_kernels_come_back";
    let Some(sbx) = Sandbox::start(name, "sigjail1") else {
        return;
    };
    // E2B's ports answer on the sandbox's loopback, where E2B's own test_systemd looks for
    // the code interpreter's health (with curl; bash's /dev/tcp here, which every template
    // has).
    let probe = |port: u16, path: &str| {
        sbx.run(&format!(
            "exec 3<>/dev/tcp/0.0.0.0/{port} && \
             printf 'GET {path} HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && \
             head -n 1 <&3"
        ))
        .stdout
    };
    assert!(
        probe(49999, "/health").starts_with("HTTP/1.1 200"),
        "log: {}",
        sbx.log()
    );
    assert!(probe(49983, "/health").starts_with("HTTP/1.1 204"));

    // The agent's threads block its stop signals; what it starts blocks none, so commands
    // can be stopped and cells interrupted (SIGINT) with their context kept.
    let blocked = sbx.run("grep SigBlk /proc/self/status");
    assert_eq!(blocked.stdout, "SigBlk:\t0000000000000000\n", "{blocked:?}");
    let set = sbx.execute(json!({"code": "state = 1"}));
    assert!(error_of(&set).is_none(), "{set:?}");
    let slow = sbx.execute(json!({"code": "import time; time.sleep(30)", "timeout": 1}));
    assert_eq!(
        error_of(&slow).unwrap()["name"],
        "KeyboardInterrupt",
        "{slow:?}"
    );
    let kept = sbx.execute(json!({"code": "state"}));
    assert_eq!(text_of(&kept).as_deref(), Some("1"), "{kept:?}");

    // A kernel with state; its process is then killed from inside, as root.
    let killed = sbx.run_as("root", "pkill -9 -f '[d]river.py' && echo killed");
    assert_eq!(killed.stdout, "killed\n", "{killed:?}");
    // As E2B's test does: health first, then code.
    assert!(probe(49999, "/health").starts_with("HTTP/1.1 200"));
    // The next execution starts a fresh kernel: the state is gone, the context works.
    let after = sbx.execute(json!({"code": "x = 1; x"}));
    assert_eq!(
        text_of(&after).as_deref(),
        Some("1"),
        "{after:?}; log: {}",
        sbx.log()
    );
    let gone = sbx.execute(json!({"code": "state"}));
    assert_eq!(error_of(&gone).unwrap()["name"], "NameError", "{gone:?}");

    // Stop signals sent by root in the sandbox to the agent are ignored (SIGKILL by the
    // kernel, SIGTERM and SIGINT by the agent, which only obeys senders outside).
    let sent = sbx.run_as("root", "kill -TERM 1; kill -INT 1; kill -KILL 1; echo sent");
    assert_eq!(sent.stdout, "sent\n", "{sent:?}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(sbx.run("echo alive").stdout, "alive\n");
    assert!(
        sbx.log()
            .contains("ignoring a stop signal sent from inside the sandbox"),
        "{}",
        sbx.log()
    );
}
