//! One real sandbox for the agent's in-jail tests: the agent as it really runs, PID 1 of a
//! jail on the default template, reached through the unix socket in a bind-mounted host
//! directory — the path the gateway uses. `Drop` kills it and removes its root, also when the
//! test fails.

#![allow(dead_code, unreachable_pub)]

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

pub struct Sandbox {
    pub rt: tokio::runtime::Runtime,
    pub jail: LinuxJail,
    pub storage: OverlayStorage,
    pub id: SandboxId,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

/// How a command ended, and what it wrote.
#[derive(Debug)]
pub struct Ran {
    pub stdout: String,
    pub stderr: String,
    /// `exitCode` of the end event (absent means 0).
    pub exit_code: i64,
    /// `status` of the end event, e.g. `signal: killed`.
    pub status: String,
}

impl Sandbox {
    /// Starts the sandbox `id` with `memory` bytes of memory, or prints `SKIP <name>: …` and
    /// returns `None` where the host cannot run sandboxes.
    pub fn start(name: &str, id: &str, memory: u64) -> Option<Self> {
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
                // The execute-only copy, as the gateway binds it.
                BindMount {
                    source: jail.sealed_program(std::path::Path::new(AGENT)).unwrap(),
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
                memory_bytes: Some(memory),
                pids: Some(256),
                cpu_millis: Some(1000),
            },
            network: None,
        };
        rt.block_on(jail.start(spec)).unwrap();
        let socket = run.join("agent.sock");
        // The socket file appears at bind, a moment before the agent listens on it: until
        // a connection is accepted, a missing file and a refused connection both mean "not
        // yet" (as the gateway's own wait has it).
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "the agent never accepted a connection; log: {}",
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

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.jail.log_path(&self.id)).unwrap_or_default()
    }

    /// One HTTP/1.1 request over the agent's socket; returns status and whole body.
    pub fn request(&self, req: http::Request<Full<Bytes>>) -> (u16, Vec<u8>) {
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

    /// Runs `cmd` with a login bash through `process.Start` as `user`, as the SDK does.
    pub fn run_as(&self, user: &str, cmd: &str) -> Ran {
        let msg = json!({
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

    pub fn run(&self, cmd: &str) -> Ran {
        self.run_as("user", cmd)
    }

    /// `POST /execute` on the code interpreter: the NDJSON lines.
    pub fn execute(&self, body: Value) -> Vec<Value> {
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
    pub fn context(&self, language: &str) -> String {
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
