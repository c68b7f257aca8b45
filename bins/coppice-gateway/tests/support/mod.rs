//! Harness for the gateway's end-to-end tests: the real `coppice-gateway` binary on
//! `127.0.0.1:0` with a fresh state directory under `/var/tmp` and the machine's template
//! cache, driven over HTTP/1.1 by a small hyper client, with real sandboxes behind it.
//!
//! A [`Lab`] is one test's world. It serialises gateway tests (a mutex inside this binary and
//! an exclusive `flock` on [`LOCK_FILE`] across processes, since gateways that share a cgroup
//! group would reap each other's sandboxes as orphans), and its `Drop` kills every sandbox
//! and the gateway even when the test fails, printing the gateway's log when it does.
//!
//! The tests are synchronous: each call blocks on the lab's own current-thread runtime, so no
//! lock is ever held across an `.await`.

#![allow(dead_code, unreachable_pub)]

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use coppice_jail::{JailConfig, LinuxJail};
use coppice_lifecycle::backend::Isolation;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use nix::fcntl::{Flock, FlockArg};
use serde_json::{json, Value};

/// Held exclusively for the life of every gateway a test starts; other suites that run a
/// gateway on this machine take it too.
pub const LOCK_FILE: &str = "/tmp/coppice-gateway-tests.lock";
/// Longest a single HTTP exchange may take before the test fails.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a gateway may take to listen and report its default template ready.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest a gateway may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

static SERIAL: Mutex<()> = Mutex::new(());

pub mod net;
pub mod ports;
pub mod registry;

/// Why this host cannot run the gateway tests, if it cannot.
pub fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root".into());
    }
    match <LinuxJail as Isolation>::probe() {
        Ok(caps) => {
            let missing: Vec<String> = caps
                .missing()
                .map(|c| format!("{} ({})", c.name, c.detail))
                .collect();
            if !missing.is_empty() {
                return Some(missing.join(", "));
            }
        }
        Err(e) => return Some(format!("cannot probe the jail: {e}")),
    }
    let base =
        coppice_zfs::template::TemplateBuilder::new(template_cache(), JailConfig::DEFAULT_UID_BASE);
    if !base.is_cached() {
        return Some(format!(
            "the base template is not built in {} (run the coppice-jail tests or the gateway once)",
            template_cache().display()
        ));
    }
    None
}

/// The machine-wide template cache the gateways use.
pub fn template_cache() -> PathBuf {
    coppice_zfs::template::default_cache_dir()
}

/// How a gateway is started.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `COPPICE_API_KEYS`.
    pub api_keys: Option<String>,
    /// `--domain`.
    pub domain: Option<String>,
    /// Further command-line arguments (`--webhook-allow 127.0.0.0/8`, ...).
    pub args: Vec<String>,
    /// `COPPICE_*` variables to set (after the test's own environment is cleared of them).
    pub env: Vec<(String, String)>,
    /// Sandbox networking on, with [`net::POOL`] and egress only into 198.51.100.0/24; off
    /// (`--sandbox-network off`) otherwise.
    pub network: bool,
}

/// A running gateway process.
#[derive(Debug)]
struct Proc {
    child: Child,
    addr: SocketAddr,
}

/// A response, read whole.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    /// The body as JSON; panics with the body when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} body is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts an E2B error: `status`, a JSON content type and `{code: status, message}`.
    pub fn assert_error(&self, status: u16, what: &str) {
        assert_eq!(self.status.as_u16(), status, "{what}: {}", self.text());
        let ct = self
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        assert!(
            ct.starts_with("application/json"),
            "{what}: content type {ct:?}"
        );
        let v = self.json();
        assert_eq!(v["code"], json!(status), "{what}: {v}");
        assert!(
            v["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: no message in {v}"
        );
    }
}

/// What a process run through the data plane produced.
#[derive(Debug)]
pub struct Exec {
    pub status: StatusCode,
    pub stdout: String,
    pub stderr: String,
    /// The exit code from the `end` event, if the process ran to its end.
    pub exit_code: Option<i64>,
    /// The Connect end-of-stream error, if any.
    pub error: Option<Value>,
    /// The raw response body (for non-stream answers such as the proxy's 502).
    pub body: Bytes,
}

impl Exec {
    /// Asserts the command ran and exited 0; returns its stdout.
    pub fn ok(&self) -> &str {
        assert_eq!(self.status, StatusCode::OK, "{self:?}");
        assert!(self.error.is_none(), "{self:?}");
        assert_eq!(self.exit_code, Some(0), "{self:?}");
        &self.stdout
    }
}

/// One test's gateway, state directory and sandboxes.
#[derive(Debug)]
pub struct Lab {
    pub name: String,
    pub state_dir: PathBuf,
    pub options: Options,
    /// The API key sent on control-plane calls, if any.
    pub key: Option<String>,
    rt: tokio::runtime::Runtime,
    gateway: Option<Proc>,
    starts: u32,
    /// When the current gateway was spawned.
    launched: Instant,
    /// The network test slots this lab holds while its gateway has sandbox networking.
    net_slots: Vec<Flock<File>>,
    _flock: Flock<File>,
    _serial: MutexGuard<'static, ()>,
}

impl Lab {
    /// Takes the locks and makes a fresh state directory; prints the skip line and returns
    /// `None` when the host cannot run sandboxes.
    pub fn new(name: &str) -> Option<Self> {
        if let Some(reason) = skip_reason() {
            println!("SKIP {name}: {reason}");
            return None;
        }
        // A test that failed while holding the mutex poisons it; the next test still runs.
        let serial = SERIAL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_FILE)
            .unwrap();
        let waited = Instant::now();
        let flock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .unwrap();
        println!("{name}: waited {:?} for {LOCK_FILE}", waited.elapsed());
        // Under /var/tmp so template layers can hard-link the template cache, and short: the
        // agent's socket path below it must fit in a sockaddr_un.
        static LABS: AtomicU32 = AtomicU32::new(0);
        let state_dir = PathBuf::from(format!(
            "/var/tmp/cgwt-{}-{}",
            std::process::id(),
            LABS.fetch_add(1, Ordering::Relaxed)
        ));
        println!("{name}: state directory {}", state_dir.display());
        if state_dir.exists() {
            std::fs::remove_dir_all(&state_dir).unwrap();
        }
        std::fs::create_dir_all(&state_dir).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Some(Self {
            name: name.to_owned(),
            state_dir,
            options: Options::default(),
            key: None,
            rt,
            gateway: None,
            starts: 0,
            launched: Instant::now(),
            net_slots: Vec::new(),
            _flock: flock,
            _serial: serial,
        })
    }

    /// The gateway's address.
    pub fn addr(&self) -> SocketAddr {
        self.gateway.as_ref().expect("no gateway running").addr
    }

    fn log_path(&self, n: u32) -> PathBuf {
        self.state_dir.join(format!("test-gateway-{n}.log"))
    }

    /// Starts a gateway on this lab's state directory and waits until `/health` is 200.
    pub fn start(&mut self) {
        self.launch("127.0.0.1:0".parse().unwrap());
        self.wait_healthy();
    }

    /// The gateway command on this lab's state directory, listening on `listen`, with the
    /// lab's options and nothing from the environment the tests run in.
    fn command(&self, listen: SocketAddr) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_coppice-gateway"));
        cmd.arg("--listen")
            .arg(listen.to_string())
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--template-cache")
            .arg(template_cache());
        if let Some(d) = &self.options.domain {
            cmd.arg("--domain").arg(d);
        }
        if self.options.network {
            cmd.args(net::gateway_args());
        } else {
            cmd.args(["--sandbox-network", "off"]);
        }
        cmd.args(&self.options.args);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("COPPICE_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("COPPICE_LOG", "info").env("NO_COLOR", "1");
        if let Some(keys) = &self.options.api_keys {
            cmd.env("COPPICE_API_KEYS", keys);
        }
        cmd.envs(self.options.env.iter().map(|(k, v)| (k, v)));
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        cmd
    }

    /// Spawns a gateway on this lab's state directory listening on `listen` and returns at
    /// once; with port 0 it first waits for the log to say which port it got. Follow with
    /// [`Lab::wait_healthy`].
    pub fn launch(&mut self, listen: SocketAddr) {
        assert!(self.gateway.is_none(), "a gateway is already running");
        if self.options.network && self.net_slots.is_empty() {
            self.net_slots = net::hold_slots();
        }
        self.starts += 1;
        let log_path = self.log_path(self.starts);
        let log = File::create(&log_path).unwrap();
        self.launched = Instant::now();
        let child = self.command(listen).stderr(log).spawn().unwrap();
        self.gateway = Some(Proc {
            child,
            addr: listen,
        });
        if listen.port() != 0 {
            return;
        }
        let deadline = Instant::now() + START_TIMEOUT;
        let addr = loop {
            if let Some(addr) = listening_address(&log_path) {
                break addr;
            }
            self.assert_alive("before listening");
            assert!(
                Instant::now() < deadline,
                "the gateway did not listen within {START_TIMEOUT:?}:\n{}",
                tail(&log_path)
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(proc) = &mut self.gateway {
            proc.addr = addr;
        }
    }

    /// Panics with the log if the gateway has exited.
    fn assert_alive(&mut self, when: &str) {
        let log = tail(&self.log_path(self.starts));
        if let Some(proc) = &mut self.gateway {
            if let Some(status) = proc.child.try_wait().unwrap() {
                self.gateway = None;
                panic!("the gateway exited with {status} {when}:\n{log}");
            }
        }
    }

    /// Waits until the gateway's `/health` is 200 (templates ready, sandboxes re-adopted).
    pub fn wait_healthy(&mut self) {
        let deadline = self.launched + START_TIMEOUT;
        loop {
            let r = self.try_send(self.get("/health").body(empty()).unwrap());
            if matches!(&r, Ok(r) if r.status == StatusCode::OK) {
                break;
            }
            self.assert_alive("before it was healthy");
            assert!(
                Instant::now() < deadline,
                "the gateway was not healthy within {START_TIMEOUT:?} ({r:?}):\n{}",
                tail(&self.log_path(self.starts))
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        println!(
            "{}: gateway {} healthy after {:?}",
            self.name,
            self.starts,
            self.launched.elapsed()
        );
    }

    /// The running gateway's pid.
    pub fn pid(&self) -> u32 {
        self.gateway
            .as_ref()
            .expect("no gateway running")
            .child
            .id()
    }

    /// The current gateway's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path(self.starts)).unwrap_or_default()
    }

    /// `GET /health`, whatever its status.
    pub fn health(&self) -> Resp {
        self.send(self.get("/health").body(empty()).unwrap())
    }

    /// Runs another gateway on this lab's state directory, listening on `listen`, beside the
    /// running one, and waits up to `limit` for it to exit; returns its exit status and log,
    /// or `None` (after killing it) if it was still running then.
    pub fn run_another(
        &self,
        listen: SocketAddr,
        limit: Duration,
    ) -> Option<(std::process::ExitStatus, String)> {
        let log_path = self.state_dir.join("test-gateway-another.log");
        let log = File::create(&log_path).unwrap();
        let mut child = self.command(listen).stderr(log).spawn().unwrap();
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Some((status, std::fs::read_to_string(&log_path).unwrap()));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                eprintln!(
                    "{}: the other gateway was still running after {limit:?}:\n{}",
                    self.name,
                    tail(&log_path)
                );
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, and waits for the gateway to exit (killing it if it does not).
    pub fn stop(&mut self) {
        let Some(mut proc) = self.gateway.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(i32::try_from(proc.child.id()).unwrap());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        let stopping = Instant::now();
        loop {
            if proc.child.try_wait().unwrap().is_some() {
                println!(
                    "{}: gateway stopped after {:?}",
                    self.name,
                    stopping.elapsed()
                );
                return;
            }
            if Instant::now() > deadline {
                let _ = proc.child.kill();
                let _ = proc.child.wait();
                panic!("the gateway did not exit within {STOP_TIMEOUT:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9` the gateway, as a crash would.
    pub fn crash(&mut self) {
        if let Some(mut proc) = self.gateway.take() {
            proc.child.kill().unwrap();
            proc.child.wait().unwrap();
        }
    }

    /// Whether a gateway is running.
    pub fn running(&self) -> bool {
        self.gateway.is_some()
    }

    // ---- HTTP ----

    /// A request to the gateway with its Host header and, for the control plane, no key.
    pub fn request(&self, method: &str, path: &str) -> http::request::Builder {
        Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, self.addr().to_string())
    }

    fn get(&self, path: &str) -> http::request::Builder {
        self.request("GET", path)
    }

    /// Sends `req` on a fresh connection and reads the whole response.
    pub fn send(&self, req: Request<Full<Bytes>>) -> Resp {
        let what = format!("{} {}", req.method(), req.uri());
        let t = Instant::now();
        let r = self.try_send(req).unwrap_or_else(|e| panic!("{what}: {e}"));
        if t.elapsed() > Duration::from_millis(500) {
            println!("{}: {what} took {:?}", self.name, t.elapsed());
        }
        r
    }

    fn try_send(&self, req: Request<Full<Bytes>>) -> Result<Resp, String> {
        let addr = self.gateway.as_ref().ok_or("no gateway running")?.addr;
        self.rt.block_on(async move {
            let exchange = async {
                let stream = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| format!("connect {addr}: {e}"))?;
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .map_err(|e| format!("handshake: {e}"))?;
                let conn = tokio::spawn(conn);
                let resp = sender
                    .send_request(req)
                    .await
                    .map_err(|e| format!("send: {e}"))?;
                let status = resp.status();
                let headers = resp.headers().clone();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| format!("read body: {e}"))?
                    .to_bytes();
                conn.abort();
                Ok(Resp {
                    status,
                    headers,
                    body,
                })
            };
            tokio::time::timeout(REQUEST_TIMEOUT, exchange)
                .await
                .map_err(|_| format!("no answer within {REQUEST_TIMEOUT:?}"))?
        })
    }

    /// A control-plane request carrying the lab's API key.
    pub fn api_request(&self, method: &str, path: &str) -> http::request::Builder {
        let b = self.request(method, path);
        match &self.key {
            Some(k) => b.header("x-api-key", k.as_str()),
            None => b,
        }
    }

    /// A control-plane call with an optional JSON body.
    pub fn api(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        let b = self.api_request(method, path);
        let req = match body {
            Some(v) => b
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(v.to_string()))),
            None => b.body(empty()),
        };
        self.send(req.unwrap())
    }

    /// A control-plane call with raw body bytes sent as JSON.
    pub fn api_raw(&self, method: &str, path: &str, body: impl Into<Bytes>) -> Resp {
        let req = self
            .api_request(method, path)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body.into()))
            .unwrap();
        self.send(req)
    }

    /// `POST /v2/sandboxes`; asserts 201 and returns the body.
    pub fn create(&self, body: Value) -> Value {
        let r = self.api("POST", "/v2/sandboxes", Some(body));
        assert_eq!(r.status, StatusCode::CREATED, "create: {}", r.text());
        r.json()
    }

    /// `GET /sandboxes/{id}`; asserts 200.
    pub fn detail(&self, id: &str) -> Value {
        let r = self.api("GET", &format!("/sandboxes/{id}"), None);
        assert_eq!(r.status, StatusCode::OK, "get {id}: {}", r.text());
        r.json()
    }

    /// The status of `GET /sandboxes/{id}`.
    pub fn detail_status(&self, id: &str) -> u16 {
        self.api("GET", &format!("/sandboxes/{id}"), None)
            .status
            .as_u16()
    }

    /// Every sandbox id `GET /v2/sandboxes` lists, following `X-Next-Token`.
    pub fn listed_ids(&self) -> Vec<String> {
        let mut ids = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let path = match &token {
                Some(t) => format!("/v2/sandboxes?nextToken={}", encode(t, "")),
                None => "/v2/sandboxes".to_owned(),
            };
            let r = self.api("GET", &path, None);
            assert_eq!(r.status, StatusCode::OK, "list: {}", r.text());
            ids.extend(ids_of(&r.json()));
            token = next_token(&r);
            if token.is_none() {
                return ids;
            }
        }
    }

    // ---- data plane ----

    /// Runs `cmd` with `/bin/sh -c` through the proxy (`process.Process/Start`), routed by
    /// the E2B headers, with `token` as `X-Access-Token`.
    pub fn exec(&self, id: &str, token: Option<&str>, cmd: &str) -> Exec {
        let b = self
            .request("POST", "/process.Process/Start")
            .header("e2b-sandbox-id", id)
            .header("e2b-sandbox-port", "49983");
        self.exec_with(b, token, cmd)
    }

    /// Like [`Lab::exec`] but with the caller's routing (e.g. a Host header).
    pub fn exec_with(&self, b: http::request::Builder, token: Option<&str>, cmd: &str) -> Exec {
        let b = match token {
            Some(t) => b.header("x-access-token", t),
            None => b,
        };
        let msg = json!({
            "process": { "cmd": "/bin/sh", "args": ["-c", cmd] },
            "stdin": false
        });
        let req = b
            .header(http::header::CONTENT_TYPE, "application/connect+json")
            .header("connect-protocol-version", "1")
            .body(Full::new(Bytes::from(envelope(
                0,
                msg.to_string().as_bytes(),
            ))))
            .unwrap();
        let r = self.send(req);
        let mut out = Exec {
            status: r.status,
            stdout: String::new(),
            stderr: String::new(),
            exit_code: None,
            error: None,
            body: r.body.clone(),
        };
        let is_stream = r
            .headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/connect+json"));
        if !is_stream {
            return out;
        }
        for (flags, v) in envelopes(&r.body) {
            if flags & 0x02 != 0 {
                out.error = v.get("error").cloned();
                continue;
            }
            let ev = &v["event"];
            if let Some(d) = ev.get("data") {
                for (k, dst) in [("stdout", &mut out.stdout), ("stderr", &mut out.stderr)] {
                    if let Some(s) = d.get(k).and_then(Value::as_str) {
                        let bytes = base64::engine::general_purpose::STANDARD.decode(s).unwrap();
                        dst.push_str(&String::from_utf8_lossy(&bytes));
                    }
                }
            } else if let Some(e) = ev.get("end") {
                out.exit_code = Some(e.get("exitCode").and_then(Value::as_i64).unwrap_or(0));
            }
        }
        out
    }

    // ---- what is left on the host ----

    /// The jail's cgroup group for this lab's state directory.
    pub fn cgroup_group(&self) -> String {
        JailConfig::group_for(&self.state_dir.join("jail"))
    }

    /// What is left of sandbox `id` on the host: cgroups, processes, run and storage
    /// directories. Empty when it is fully gone.
    pub fn leftovers_of(&self, id: &str) -> Vec<String> {
        let group = self.cgroup_group();
        let mut left: Vec<String> = cgroup_dirs_named(&group)
            .into_iter()
            .map(|g| g.join(id))
            .filter(|d| d.exists())
            .map(|d| format!("cgroup {}", d.display()))
            .collect();
        left.extend(
            processes_in(&format!("/{group}/{id}"))
                .into_iter()
                .map(|p| format!("process {p}")),
        );
        for dir in [
            self.state_dir.join("run").join(id),
            self.state_dir.join("storage/sandboxes").join(id),
        ] {
            if dir.exists() {
                left.push(format!("directory {}", dir.display()));
            }
        }
        left
    }

    /// Whether sandbox `id`'s processes are on the host.
    pub fn has_processes(&self, id: &str) -> bool {
        !processes_in(&format!("/{}/{id}", self.cgroup_group())).is_empty()
    }

    /// Polls until `id` has nothing left on the host; panics with what is left at the deadline.
    pub fn assert_gone(&self, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = self.leftovers_of(id);
            if left.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "sandbox {id} left behind: {left:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything in this lab's cgroup group: sandbox cgroups and processes. The jail's
    /// memory cgroups are numbered slots (`slot-<n>`), kept for reuse after a kill, so they
    /// are not listed (a task in one is, as a process); the lab's teardown removes them.
    pub fn group_leftovers(&self) -> Vec<String> {
        let group = self.cgroup_group();
        let mut left = Vec::new();
        for dir in cgroup_dirs_named(&group) {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for e in entries.flatten() {
                    let slot = e.file_name().to_string_lossy().starts_with("slot-");
                    if e.file_type().is_ok_and(|t| t.is_dir()) && !slot {
                        left.push(format!("cgroup {}", e.path().display()));
                    }
                }
            }
        }
        left.extend(
            processes_in(&format!("/{group}"))
                .into_iter()
                .map(|p| format!("process {p}")),
        );
        left
    }

    /// Kills every sandbox through the API and stops the gateway, then asserts that nothing
    /// of any sandbox is left on the host. Every test ends with this.
    pub fn finish(mut self) {
        let t = Instant::now();
        if self.running() {
            for id in self.listed_ids() {
                let r = self.api("DELETE", &format!("/sandboxes/{id}"), None);
                assert_eq!(r.status, StatusCode::NO_CONTENT, "kill {id}: {}", r.text());
            }
            assert_eq!(self.listed_ids(), Vec::<String>::new());
            self.stop();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = self.group_leftovers();
            if left.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "left behind: {left:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
        println!("{}: finished in {:?}", self.name, t.elapsed());
    }

    /// Waits until the current gateway has imported every built-in template. A `kill -9`
    /// during an import leaves its `cp` running, racing the next start's storage recovery;
    /// tests that crash the gateway on purpose wait for this first.
    pub fn wait_templates_imported(&self) {
        let log = self.log_path(self.starts);
        wait_for("every template imported", START_TIMEOUT, || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let settled = text
                .lines()
                .filter(|l| l.contains("template ready") || l.contains("template unavailable"))
                .count();
            (settled >= 2).then_some(())
        });
    }

    /// Kills every task of sandbox `id` behind the gateway's back, as if it died on its
    /// own, through the cgroups its jail record names, and waits until none is left. (Not
    /// through a second `LinuxJail` on the gateway's state directory: opening one re-adopts,
    /// and takes a warm start in progress, whose cgroups it has no record of yet, for an
    /// orphan.)
    pub fn kill_in_jail(&self, id: &str) {
        let record = self
            .state_dir
            .join("jail/sandboxes")
            .join(format!("{id}.json"));
        let text = std::fs::read_to_string(&record)
            .unwrap_or_else(|e| panic!("{}: {e}", record.display()));
        let record: Value = serde_json::from_str(&text).unwrap();
        let cgroups = &record["cgroups"];
        let mut dirs: Vec<PathBuf> = cgroups["v1"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|pair| pair[1].as_str().map(PathBuf::from))
            .collect();
        dirs.extend(cgroups["v2"].as_str().map(PathBuf::from));
        assert!(!dirs.is_empty(), "no cgroups on record: {text}");
        wait_for(
            "every task of the sandbox to die",
            Duration::from_secs(30),
            || {
                let mut left = false;
                for dir in &dirs {
                    let procs =
                        std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                        left = true;
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
                (!left).then_some(())
            },
        );
    }

    /// Best-effort teardown that never panics: sandboxes through the API, the gateway, then
    /// whatever the jail still has on record or in its cgroup group.
    fn teardown(&mut self) {
        if self.running() {
            let mut ids = Vec::new();
            for state in ["running", "paused"] {
                let req = self
                    .api_request("GET", &format!("/v2/sandboxes?state={state}"))
                    .body(empty())
                    .unwrap();
                if let Ok(r) = self.try_send(req) {
                    if let Ok(v) = serde_json::from_slice::<Value>(&r.body) {
                        ids.extend(ids_of(&v));
                    }
                }
            }
            for id in ids {
                let req = self
                    .api_request("DELETE", &format!("/sandboxes/{id}"))
                    .body(empty())
                    .unwrap();
                let _ = self.try_send(req);
            }
        }
        if let Some(mut proc) = self.gateway.take() {
            let _ = proc.child.kill();
            let _ = proc.child.wait();
        }
        // The gateway is this process's child, so it shared this process's cgroup: the jail
        // driver opened here finds the same group, kills what its records name, and kills
        // unrecorded cgroups in the group as orphans.
        let jail_dir = self.state_dir.join("jail");
        if jail_dir.exists() {
            match LinuxJail::open(JailConfig::new(&jail_dir)) {
                Ok(jail) => {
                    self.rt.block_on(async {
                        if let Ok(list) = jail.list().await {
                            for info in list {
                                let _ = jail.kill(&info.id).await;
                            }
                        }
                    });
                    if let Err(e) = jail.remove_spare_cgroups() {
                        eprintln!("{}: removing the spare cgroups: {e}", self.name);
                    }
                }
                Err(e) => eprintln!("{}: teardown could not open the jail: {e}", self.name),
            }
        }
        if !self.net_slots.is_empty() {
            if let Err(e) = net::purge(&self.state_dir) {
                eprintln!("{}: removing the sandbox network: {e}", self.name);
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        let t = Instant::now();
        self.teardown();
        println!("{}: teardown took {:?}", self.name, t.elapsed());
        if failed {
            for n in 1..=self.starts {
                eprintln!(
                    "---- {} gateway log {n} ----\n{}",
                    self.name,
                    tail(&self.log_path(n))
                );
            }
        }
        // Never remove a tree something is still mounted in.
        let mounted = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .any(|m| Path::new(m).starts_with(&self.state_dir));
        if mounted {
            eprintln!(
                "{}: leaving {} (something is mounted in it)",
                self.name,
                self.state_dir.display()
            );
        } else if !failed {
            let _ = std::fs::remove_dir_all(&self.state_dir);
        } else {
            eprintln!("{}: state kept in {}", self.name, self.state_dir.display());
        }
    }
}

/// An empty body.
pub fn empty() -> Full<Bytes> {
    Full::new(Bytes::new())
}

/// A Connect envelope: flags, big-endian length, payload.
pub fn envelope(flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![flags];
    v.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// The envelopes of a whole Connect stream body.
pub fn envelopes(mut body: &[u8]) -> Vec<(u8, Value)> {
    let mut out = Vec::new();
    while !body.is_empty() {
        assert!(body.len() >= 5, "truncated envelope header");
        let len =
            usize::try_from(u32::from_be_bytes([body[1], body[2], body[3], body[4]])).unwrap();
        assert!(body.len() >= 5 + len, "truncated envelope");
        out.push((body[0], serde_json::from_slice(&body[5..5 + len]).unwrap()));
        body = &body[5 + len..];
    }
    out
}

/// The `sandboxID`s of a list response.
pub fn ids_of(list: &Value) -> Vec<String> {
    list.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["sandboxID"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The `X-Next-Token` header, if present.
pub fn next_token(r: &Resp) -> Option<String> {
    r.headers
        .get("x-next-token")
        .map(|v| v.to_str().unwrap().to_owned())
}

/// Percent-encodes every byte except unreserved characters and those in `keep`.
pub fn encode(s: &str, keep: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || keep.as_bytes().contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The `metadata` query value as the SDK sends it: each key and value encoded, the joined
/// string encoded again (keeping `=` and `&`), and the result encoded as a query value.
pub fn metadata_query(pairs: &[(&str, &str)]) -> String {
    let joined: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k, ""), encode(v, "")))
        .collect();
    encode(&encode(&joined.join("&"), "=&"), "")
}

/// Milliseconds since the epoch of an RFC 3339 time from the API.
pub fn millis(v: &Value) -> u64 {
    let s = v.as_str().unwrap_or_else(|| panic!("not a time: {v}"));
    coppice_wire::timestamp::parse_millis(s).unwrap_or_else(|| panic!("not RFC 3339: {s}"))
}

/// Now, in milliseconds since the epoch.
pub fn now_millis() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// Polls `f` every 50 ms until it returns `Some`, or panics with `what` after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The gateway's `listening address=…` line in its log, if written yet.
fn listening_address(log: &Path) -> Option<SocketAddr> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text.lines().find(|l| l.contains("listening"))?;
    // `--log-format json` writes `{"fields":{"message":"listening","address":...}}`.
    if line.starts_with('{') {
        let v: Value = serde_json::from_str(line).ok()?;
        return v["fields"]["address"].as_str()?.parse().ok();
    }
    let rest = &line[line.find("address=")? + "address=".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// The last lines of a log file.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// Every directory called `name` under `/sys/fs/cgroup`.
fn cgroup_dirs_named(name: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, name: &str, depth: u32, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let p = e.path();
            if e.file_name() == name {
                out.push(p);
            } else if depth < 8 {
                walk(&p, name, depth + 1, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(Path::new("/sys/fs/cgroup"), name, 0, &mut out);
    out
}

/// Pids whose `/proc/<pid>/cgroup` mentions `fragment` in any hierarchy.
fn processes_in(fragment: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|c| {
                c.lines()
                    .any(|l| l.ends_with(fragment) || l.contains(&format!("{fragment}/")))
            })
        })
        .collect()
}

/// The `sandboxID` of a create response.
pub fn id_of(v: &Value) -> String {
    v["sandboxID"].as_str().unwrap().to_owned()
}

/// The `envdAccessToken` of a create response.
pub fn token_of(v: &Value) -> String {
    v["envdAccessToken"].as_str().unwrap().to_owned()
}

/// `GET path` of the events API (asserting 200): the event records.
pub fn events_of(lab: &Lab, path: &str) -> Vec<Value> {
    let r = lab.api("GET", path, None);
    assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text());
    r.json().as_array().unwrap().clone()
}
