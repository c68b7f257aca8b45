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

use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use coppice_jail::{JailConfig, LinuxJail};
use coppice_lifecycle::backend::{
    BindMount, InitSpec, Isolation, JailSpec, LayerId, Limits, RootfsSpec, SandboxId, Storage,
};
use coppice_zfs::OverlayStorage;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

const AGENT: &str = env!("CARGO_BIN_EXE_coppice-envd");

struct Sandbox {
    rt: tokio::runtime::Runtime,
    jail: LinuxJail,
    storage: OverlayStorage,
    id: SandboxId,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Sandbox {
    fn start(name: &str) -> Option<Self> {
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
            .prefix("coppice-envd-jail-")
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
        let id = SandboxId::new("agentjail1").unwrap();
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
                memory_bytes: Some(512 << 20),
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

    /// One HTTP/1.1 request over the agent's socket; returns status and whole body.
    fn request(&self, req: http::Request<Full<Bytes>>) -> (u16, Vec<u8>) {
        self.rt.block_on(async {
            let stream = tokio::net::UnixStream::connect(&self.socket).await.unwrap();
            let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
            tokio::spawn(conn);
            let resp = sender.send_request(req).await.unwrap();
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, body.to_vec())
        })
    }

    /// Runs `cmd` through `process.Start` as the default user; returns stdout.
    fn run(&self, cmd: &str) -> String {
        let msg = serde_json::json!({
            "process": {"cmd": "/bin/bash", "args": ["-l", "-c", cmd]},
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
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let (status, bytes) = self.request(req);
        assert_eq!(status, 200);
        // Walk the envelopes and collect stdout (base64 in the JSON codec).
        let mut out = Vec::new();
        let mut rest = bytes.as_slice();
        while rest.len() >= 5 {
            let len =
                usize::try_from(u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]])).unwrap();
            let frame: serde_json::Value = serde_json::from_slice(&rest[5..5 + len]).unwrap();
            if let Some(data) = frame["event"]["data"]["stdout"].as_str() {
                out.extend(STANDARD.decode(data).unwrap());
            }
            rest = &rest[5 + len..];
        }
        String::from_utf8(out).unwrap()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.rt.block_on(self.jail.kill(&self.id));
        let _ = self.rt.block_on(self.storage.remove_rootfs(&self.id));
    }
}

#[test]
fn the_agent_serves_envd_and_the_interpreter_as_pid_1_of_a_jail() {
    let Some(sbx) = Sandbox::start("the_agent_serves_envd_and_the_interpreter_as_pid_1_of_a_jail")
    else {
        return;
    };
    // Commands run as `user` (uid 1000) inside the sandbox, whose PID 1 is the agent.
    let who = sbx.run("whoami; id -u; hostname; cat /proc/1/comm; echo $HOME");
    assert_eq!(
        who,
        "user\n1000\nagentjail1\ncoppice-envd\n/home/user\n",
        "log: {}",
        std::fs::read_to_string(sbx.jail.log_path(&sbx.id)).unwrap_or_default()
    );
    // Orphans of finished commands are reaped by the agent: no zombies linger.
    sbx.run("(sleep 0.2 &) ; true");
    std::thread::sleep(Duration::from_millis(500));
    let zombies = sbx.run("ps -eo stat= | grep -c '^Z' || true");
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
    assert_eq!(sbx.run("cat /home/user/hello.txt"), "hello from the host");
    let RootfsSpec::Overlay { upper, .. } = sbx.rt.block_on(sbx.storage.rootfs(&sbx.id)).unwrap()
    else {
        panic!("overlay storage gives overlay roots");
    };
    let meta = std::fs::metadata(upper.join("home/user/hello.txt")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(meta.uid(), JailConfig::DEFAULT_UID_BASE + 1000);

    // The code interpreter keeps state in the sandbox's own python.
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
    assert!(out.contains(r#""text":"agentjail1 1000\n""#), "{out}");
    assert!(out.contains(r#""text":"42""#), "{out}");
}
