//! The gateway under test: a release build started on 127.0.0.1:0 with its own state
//! directory, and everything needed to leave nothing behind — its sandboxes, its process, its
//! sandbox network, its directory — on success, on error, on a panic and on Ctrl-C.
//!
//! A gateway runs with `--sandbox-network off` unless started with [`GatewayProc::spawn_networked`]:
//! networking on by default would make a bridge on the gateway's default pool and turn on
//! forwarding host-wide, and only the `net` part, on its own test addresses, measures it.

use std::collections::{HashSet, VecDeque};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use coppice_jail::{JailConfig, LinuxJail};
use coppice_lifecycle::backend::Isolation;
use http_body_util::Full;

use crate::client::{self, connect, delete, live_set, send, timeout, Live, Res};

/// Held while our gateway runs, so the gateway integration tests never run next to it.
const LOCK_FILE: &str = "/tmp/coppice-gateway-tests.lock";
/// How long to wait for that lock before giving up.
const LOCK_WAIT: Duration = Duration::from_secs(15 * 60);
/// Where the template trees are built once for every gateway on this machine.
pub(crate) const TEMPLATE_CACHE: &str = "/var/cache/coppice/templates";
/// The soft open-files limit a login shell or a systemd service starts a program with: the
/// gateway starts with it (through util-linux `prlimit`), as a user's would, whatever this
/// process has.
pub(crate) const DEFAULT_NOFILE: u64 = 1024;

/// Takes an exclusive `flock` on the gateway tests' lock, waiting (bounded) while someone
/// else holds it.
pub(crate) fn lock_exclusive() -> Res<nix::fcntl::Flock<std::fs::File>> {
    lock_file(Path::new(LOCK_FILE), LOCK_WAIT, "gateway tests running")
}

/// Takes an exclusive `flock` on `path`, waiting at most `wait` while someone else holds it
/// (`why` says who that would be).
pub(crate) fn lock_file(
    path: &Path,
    wait: Duration,
    why: &str,
) -> Res<nix::fcntl::Flock<std::fs::File>> {
    use nix::fcntl::{Flock, FlockArg};
    let deadline = Instant::now() + wait;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    let mut told = false;
    loop {
        client::check_interrupted()?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((f, nix::errno::Errno::EWOULDBLOCK)) => {
                if Instant::now() > deadline {
                    return Err(format!("{} stayed locked for {wait:?}", path.display()).into());
                }
                if !told {
                    eprintln!("api bench: waiting for {} ({why})", path.display());
                    told = true;
                }
                std::thread::sleep(Duration::from_secs(1));
                file = f;
            }
            Err((_, e)) => return Err(format!("flock {}: {e}", path.display()).into()),
        }
    }
}

/// Raises this process's soft open-files limit to its hard one (a thousand client
/// connections at once must not fail here); returns the hard limit.
pub(crate) fn raise_nofile() -> Res<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(hard)
}

/// Lines the gateway's reader thread reports.
enum Event {
    Listening(SocketAddr),
    Template(String),
    /// The `sandboxes of the previous run re-adopted` line.
    Adopted(String),
}

/// How [`GatewayProc::restart`] stops the running gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// `kill -9`: a crash. Its sandboxes live on.
    Kill,
    /// SIGTERM: a graceful stop (warm sandboxes go, the others live on).
    Term,
}

/// What a restart took, each from the moment the new process was spawned.
#[derive(Debug, Clone)]
pub(crate) struct Restarted {
    /// From the signal to the old process's exit.
    pub(crate) stopped: Duration,
    /// Until the port accepted a TCP connection.
    pub(crate) listening: Duration,
    /// Until `/health` first answered something other than `adopting`.
    pub(crate) adopted: Duration,
    /// Until `/health` answered 200.
    pub(crate) healthy: Duration,
    /// `/health` answers that said `adopting`, and the last of them.
    pub(crate) adopting_answers: usize,
    pub(crate) last_adopting: Option<String>,
    /// The gateway's own line about the re-adoption (`adopted=… gone=… unregistered=…`).
    pub(crate) log_line: Option<String>,
}

impl Restarted {
    pub(crate) fn json(&self) -> serde_json::Value {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        serde_json::json!({
            "old_process_exit_ms": ms(self.stopped),
            "spawn_to_listening_ms": ms(self.listening),
            "spawn_to_adoption_over_ms": ms(self.adopted),
            "spawn_to_health_200_ms": ms(self.healthy),
            "health_answers_adopting": self.adopting_answers,
            "last_adopting_answer": self.last_adopting,
            "gateway_log": self.log_line,
        })
    }
}

/// The gateway under test, with everything needed to clean up after it.
pub(crate) struct GatewayProc {
    child: Mutex<Child>,
    /// `None` once cleaned up.
    state: Option<tempfile::TempDir>,
    /// The binary, the agent and the extra arguments it was started with (network flags
    /// included), for a restart.
    command: (PathBuf, PathBuf, Vec<String>),
    /// Its sandbox-network flags, for `--purge-network` at cleanup; empty when it runs with
    /// `--sandbox-network off`.
    network: Vec<String>,
    events: mpsc::Receiver<Event>,
    addr: Mutex<Option<SocketAddr>>,
    log: Arc<Mutex<VecDeque<String>>>,
    /// What the runtime logged about the sandboxes it brought up, not yet taken.
    stages: Arc<Mutex<Vec<RuntimeLine>>>,
    /// Sandboxes created through this gateway and not yet killed.
    pub(crate) live: Live,
}

/// What the gateway's runtime logs at debug level about each sandbox it brings up
/// (`src/runtime.rs`): a start (root filesystem, jail, agent socket; on a create's path, or
/// filling the warm pool), and the `/init` that makes it some create's sandbox.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum RuntimeLine {
    /// `sandbox started net_ms=… rootfs_ms=… jail_ms=… agent_ms=…` (`net_ms` is the network
    /// attach, zero with networking off).
    Started {
        net: f64,
        rootfs: f64,
        jail: f64,
        agent: f64,
    },
    /// `sandbox configured init_ms=… warm=…`
    Configured { init: f64, warm: bool },
}

impl RuntimeLine {
    /// The runtime line `line` is, if it is one.
    fn parse(line: &str) -> Option<Self> {
        let field = |name: &str| -> Option<&str> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
        };
        let ms = |name: &str| -> Option<f64> { field(name)?.parse().ok() };
        if line.contains("sandbox started") {
            Some(Self::Started {
                net: ms("net_ms").unwrap_or(0.0),
                rootfs: ms("rootfs_ms")?,
                jail: ms("jail_ms")?,
                agent: ms("agent_ms")?,
            })
        } else if line.contains("sandbox configured") {
            Some(Self::Configured {
                init: ms("init_ms")?,
                warm: field("warm")? == "true",
            })
        } else {
            None
        }
    }
}

impl GatewayProc {
    /// Starts `gateway` (with the soft open-files limit [`DEFAULT_NOFILE`]) with `agent` as the
    /// sandboxes' agent, `extra_args`, and a fresh state directory in /var/tmp (disk-backed,
    /// so sandbox files never count as host memory; short enough for the agents' socket
    /// paths). The gateway gets its own process group, so a Ctrl-C at the terminal reaches
    /// this program, which then cleans up, and not the gateway.
    pub(crate) fn spawn(gateway: &Path, agent: &Path, extra_args: &[&str]) -> Res<Self> {
        Self::spawn_networked(gateway, agent, extra_args, &[])
    }

    /// [`Self::spawn`] with sandbox networking on and `network` (`--sandbox-cidr` and the
    /// rest); with `network` empty, networking is off. Cleanup purges what networking made
    /// with the same flags.
    pub(crate) fn spawn_networked(
        gateway: &Path,
        agent: &Path,
        extra_args: &[&str],
        network: &[&str],
    ) -> Res<Self> {
        let state = tempfile::Builder::new()
            .prefix("coppice-api-bench-")
            .tempdir_in("/var/tmp")?;
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let stages = Arc::new(Mutex::new(Vec::new()));
        let network: Vec<String> = if network.is_empty() {
            Vec::new()
        } else {
            ["--sandbox-network", "on"]
                .iter()
                .chain(network)
                .map(|a| (*a).to_owned())
                .collect()
        };
        let mut args: Vec<String> = extra_args.iter().map(|a| (*a).to_owned()).collect();
        if network.is_empty() {
            args.extend(["--sandbox-network".to_owned(), "off".to_owned()]);
        } else {
            args.extend(network.iter().cloned());
        }
        let command = (gateway.to_path_buf(), agent.to_path_buf(), args);
        // From here on, a failure drops `Self`, whose cleanup purges whatever the start made.
        let (child, events) = launch(&command, "127.0.0.1:0", state.path(), &log, &stages)?;
        Ok(Self {
            child: Mutex::new(child),
            state: Some(state),
            network,
            command,
            events,
            addr: Mutex::new(None),
            log,
            stages,
            live: Arc::new(Mutex::new(HashSet::new())),
        })
    }

    /// Stops the gateway `how`, then starts the same binary with the same arguments on the
    /// same address and state directory, and waits (bounded) until `/health` says 200. The
    /// clocks start when the new process is spawned; the port is polled by TCP connects
    /// every millisecond, `/health` every 5 ms.
    pub(crate) fn restart(&mut self, how: Stop) -> Res<Restarted> {
        let addr = self.addr()?;
        let state = self.state_dir()?.to_path_buf();
        let stopped = {
            let mut child = self
                .child
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
            let (signal, patience) = match how {
                Stop::Kill => (nix::sys::signal::Signal::SIGKILL, Duration::from_secs(30)),
                Stop::Term => (nix::sys::signal::Signal::SIGTERM, Duration::from_secs(120)),
            };
            let t = Instant::now();
            nix::sys::signal::kill(pid, signal)?;
            loop {
                if child.try_wait()?.is_some() {
                    break t.elapsed();
                }
                if t.elapsed() > patience {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "the gateway did not exit within {patience:?} of {signal}:\n{}",
                        self.log_tail()
                    )
                    .into());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        client::check_interrupted()?;
        let t0 = Instant::now();
        let (child, events) = launch(
            &self.command,
            &addr.to_string(),
            &state,
            &self.log,
            &self.stages,
        )?;
        *self
            .child
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = child;
        self.events = events;
        let deadline = t0 + Duration::from_secs(300);
        let exited = |gw: &Self| -> Res<()> {
            let mut child = gw
                .child
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match child.try_wait()? {
                Some(status) => Err(format!(
                    "the restarted gateway exited ({status}):\n{}",
                    gw.log_tail()
                )
                .into()),
                None => Ok(()),
            }
        };
        let listening = loop {
            client::check_interrupted()?;
            if std::net::TcpStream::connect(addr).is_ok() {
                break t0.elapsed();
            }
            exited(self)?;
            if Instant::now() > deadline {
                return Err(format!("{addr} did not accept connections in time").into());
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (mut adopted, mut adopting_answers, mut last_adopting) = (None, 0, None);
        let healthy = loop {
            client::check_interrupted()?;
            let answer = rt.block_on(async {
                let mut s = connect(addr).await?;
                let req = http::Request::get("/health")
                    .header("host", "127.0.0.1")
                    .body(Full::new(Bytes::new()))?;
                timeout(send(&mut s, req)).await
            });
            if let Ok((status, body)) = &answer {
                let text = String::from_utf8_lossy(body);
                if text.contains("\"adopting\"") {
                    adopting_answers += 1;
                    last_adopting = Some(text.into_owned());
                } else if adopted.is_none() {
                    adopted = Some(t0.elapsed());
                }
                if *status == 200 {
                    break t0.elapsed();
                }
            }
            exited(self)?;
            if Instant::now() > deadline {
                return Err(
                    format!("/health never said 200 after the restart ({answer:?})").into(),
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        // The gateway logs its account right before re-adoption ends.
        let mut log_line = None;
        while let Ok(event) = self.events.recv_timeout(Duration::from_millis(200)) {
            if let Event::Adopted(line) = event {
                log_line = Some(line);
                break;
            }
        }
        Ok(Restarted {
            stopped,
            listening,
            adopted: adopted.unwrap_or(healthy),
            healthy,
            adopting_answers,
            last_adopting,
            log_line,
        })
    }

    pub(crate) fn addr(&self) -> Res<SocketAddr> {
        self.addr
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .ok_or_else(|| "the gateway is not listening".into())
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .id()
    }

    /// The state directory (`--state-dir`).
    pub(crate) fn state_dir(&self) -> Res<&Path> {
        Ok(self.state.as_ref().ok_or("the gateway is gone")?.path())
    }

    /// Where the gateway's runtime puts sandbox `id`'s agent socket
    /// (`<state>/run/<id>/agent.sock`, `src/runtime.rs`).
    pub(crate) fn agent_socket(&self, id: &str) -> Res<PathBuf> {
        Ok(self.state_dir()?.join("run").join(id).join("agent.sock"))
    }

    /// The runtime lines logged since the last call.
    pub(crate) fn take_stages(&self) -> Vec<RuntimeLine> {
        std::mem::take(
            &mut *self
                .stages
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    pub(crate) fn log_tail(&self) -> String {
        let ring = self
            .log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let skip = ring.len().saturating_sub(20);
        ring.iter()
            .skip(skip)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits for the listener, `/health` 200 and every template import to finish (so no
    /// background import runs while we measure). Call once.
    pub(crate) fn wait_ready(&self) -> Res<()> {
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut templates = 0;
        while templates < 2 || self.addr().is_err() {
            client::check_interrupted()?;
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .events
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok(Event::Listening(a)) => {
                    *self
                        .addr
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(a);
                }
                Ok(Event::Adopted(_)) => {}
                Ok(Event::Template(line)) => {
                    eprintln!("api bench: gateway: {line}");
                    if line.contains("template unavailable") {
                        return Err(format!("a template did not build: {line}").into());
                    }
                    templates += 1;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(format!("the gateway exited:\n{}", self.log_tail()).into());
                }
            }
            if Instant::now() > deadline {
                return Err(
                    format!("the gateway was not ready in time:\n{}", self.log_tail()).into(),
                );
            }
        }
        let addr = self.addr()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        loop {
            let status = rt.block_on(async {
                let mut s = connect(addr).await?;
                let req = http::Request::get("/health")
                    .header("host", "127.0.0.1")
                    .body(Full::new(Bytes::new()))?;
                timeout(send(&mut s, req)).await.map(|(status, _)| status)
            });
            if matches!(status, Ok(200)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("/health never said 200 ({status:?})").into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills every sandbox we created through the API, then cleans up the rest (see
    /// [`Self::cleanup`]); errors if anything had to be cleaned up behind the gateway's back.
    pub(crate) fn shutdown(mut self, rt: &tokio::runtime::Runtime) -> Res<()> {
        let mut problems = Vec::new();
        let left: Vec<String> = live_set(&self.live).iter().cloned().collect();
        if let Ok(addr) = self.addr() {
            for id in &left {
                // Not `timeout`: after an interrupt these must still go out.
                let r = rt.block_on(async {
                    let mut s = connect(addr).await?;
                    tokio::time::timeout(client::REQUEST_TIMEOUT, delete(&mut s, &self.live, id))
                        .await
                        .map_err(|_| "no answer".into())
                        .and_then(|r| r)
                });
                if let Err(e) = r {
                    problems.push(format!("kill {id}: {e}"));
                }
            }
        }
        problems.extend(self.cleanup());
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; ").into())
        }
    }

    /// Stops the gateway, kills any sandbox that survived it through the jail driver
    /// (sandboxes outlive their gateway by design), and removes the state directory. Runs its
    /// own runtime on a thread of its own, so it works from `Drop` whatever the caller was
    /// doing. Returns what went wrong.
    fn cleanup(&mut self) -> Vec<String> {
        let Some(state) = self.state.take() else {
            return Vec::new();
        };
        let mut problems = Vec::new();
        {
            let mut child = self
                .child
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Ok(pid) = i32::try_from(child.id()) {
                let pid = nix::unistd::Pid::from_raw(pid);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        let jail_dir = state.path().join("jail");
        let swept = std::thread::spawn(move || -> Res<Vec<String>> {
            let mut survivors = Vec::new();
            if jail_dir.exists() {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let jail = LinuxJail::open(JailConfig::new(&jail_dir))?;
                for info in rt.block_on(jail.list())? {
                    survivors.push(format!("sandbox {} survived its gateway", info.id));
                    rt.block_on(jail.kill(&info.id))?;
                }
                // The gateway keeps emptied memory cgroups as slots for its next start; this
                // state directory has none, so they go (else each run leaves up to 1,024).
                jail.remove_spare_cgroups()?;
            }
            Ok(survivors)
        })
        .join();
        match swept {
            Ok(Ok(survivors)) => problems.extend(survivors),
            Ok(Err(e)) => problems.push(format!("sweeping sandboxes: {e}")),
            Err(_) => problems.push("sweeping sandboxes panicked".into()),
        }
        if !self.network.is_empty() {
            if let Err(e) = purge_network(&self.command.0, state.path(), &self.network) {
                problems.push(format!("purging the sandbox network: {e}"));
            }
        }
        if let Err(e) = state.close() {
            problems.push(format!("removing the state directory: {e}"));
        }
        problems
    }
}

impl Drop for GatewayProc {
    fn drop(&mut self) {
        for problem in self.cleanup() {
            eprintln!("api bench: cleanup: {problem}");
        }
    }
}

/// Runs `gateway --state-dir <state> <network> --purge-network true`, which removes the
/// bridge, the nftables tables, the namespaces and the records a gateway with those flags
/// made; bounded in time.
fn purge_network(gateway: &Path, state: &Path, network: &[String]) -> Res<()> {
    let mut child = Command::new(gateway)
        .arg("--state-dir")
        .arg(state)
        .args(network)
        .args(["--purge-network", "true"])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    crate::orphans::own(child.id());
    let deadline = Instant::now() + PURGE_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            let out = child.wait_with_output()?;
            if status.success() {
                return Ok(());
            }
            return Err(
                format!("{status}: {}", String::from_utf8_lossy(&out.stderr).trim()).into(),
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("it did not finish within {PURGE_TIMEOUT:?}").into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The longest `--purge-network` may take.
const PURGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts `command` (binary, agent, extra arguments) on `listen` with `state` as its state
/// directory, and a thread reading its log into `log`, `stages` and the returned channel.
fn launch(
    command: &(PathBuf, PathBuf, Vec<String>),
    listen: &str,
    state: &Path,
    log: &Arc<Mutex<VecDeque<String>>>,
    stages: &Arc<Mutex<Vec<RuntimeLine>>>,
) -> Res<(Child, mpsc::Receiver<Event>)> {
    use std::os::unix::process::CommandExt;
    let (gateway, agent, extra_args) = command;
    let mut child = Command::new("prlimit")
        .arg(format!("--nofile={DEFAULT_NOFILE}:"))
        .arg("--")
        .arg(gateway)
        .arg("--listen")
        .arg(listen)
        .arg("--state-dir")
        .arg(state)
        .arg("--template-cache")
        .arg(TEMPLATE_CACHE)
        .arg("--agent")
        .arg(agent)
        .args(extra_args)
        // Debug for the runtime only: its stage timings per sandbox.
        .env("COPPICE_LOG", "info,coppice_gateway::runtime=debug")
        .env("NO_COLOR", "1")
        .env_remove("COPPICE_API_KEYS")
        .env_remove("COPPICE_API_KEYS_FILE")
        .env_remove("COPPICE_DOMAIN")
        .env_remove("COPPICE_ENVD_LISTEN")
        .env_remove("COPPICE_CODE_LISTEN")
        .env_remove("COPPICE_WEBHOOK_URL")
        .env_remove("COPPICE_WARM_POOL")
        // Networking is what `--sandbox-network` and the flags after it say, nothing else.
        .env_remove("COPPICE_SANDBOX_NETWORK")
        .env_remove("COPPICE_SANDBOX_CIDR")
        .env_remove("COPPICE_SANDBOX_NETWORK_NAME")
        .env_remove("COPPICE_ALLOW_METADATA")
        .env_remove("COPPICE_EGRESS_ONLY_TO")
        .env_remove("COPPICE_IP_FORWARD")
        .env_remove("COPPICE_DNS_UPSTREAM")
        .env_remove("COPPICE_PURGE_NETWORK")
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    crate::orphans::own(child.id());
    let stderr = child.stderr.take().ok_or("no stderr pipe")?;
    let (tx, events) = mpsc::channel();
    let ring = Arc::clone(log);
    let logged = Arc::clone(stages);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains(" listening") {
                if let Some(addr) = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("address="))
                    .and_then(|a| a.parse().ok())
                {
                    let _ = tx.send(Event::Listening(addr));
                }
            }
            if line.contains("template ready") || line.contains("template unavailable") {
                let _ = tx.send(Event::Template(line.clone()));
            }
            if line.contains("sandboxes of the previous run re-adopted") {
                let _ = tx.send(Event::Adopted(line.clone()));
            }
            if let Some(s) = RuntimeLine::parse(&line) {
                logged
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(s);
            }
            let mut ring = ring
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if ring.len() == 200 {
                ring.pop_front();
            }
            ring.push_back(line);
        }
    });
    Ok((child, events))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_runtimes_stage_lines() {
        let started = "2026-11-23T16:27:31Z DEBUG coppice_gateway::runtime: sandbox started sandbox=vt64 rootfs_ms=0.78 jail_ms=17.39 agent_ms=0.18";
        assert_eq!(
            RuntimeLine::parse(started),
            Some(RuntimeLine::Started {
                net: 0.0,
                rootfs: 0.78,
                jail: 17.39,
                agent: 0.18
            })
        );
        let networked = "DEBUG coppice_gateway::runtime: sandbox started sandbox=vt65 net_ms=3.10 rootfs_ms=0.5 jail_ms=4.25 agent_ms=1.5";
        assert_eq!(
            RuntimeLine::parse(networked),
            Some(RuntimeLine::Started {
                net: 3.1,
                rootfs: 0.5,
                jail: 4.25,
                agent: 1.5
            })
        );
        let configured = "DEBUG coppice_gateway::runtime: sandbox configured sandbox=vt64 init_ms=0.25 warm=true";
        assert_eq!(
            RuntimeLine::parse(configured),
            Some(RuntimeLine::Configured {
                init: 0.25,
                warm: true
            })
        );
        assert_eq!(
            RuntimeLine::parse("INFO coppice_gateway: created sandbox=x"),
            None
        );
    }
}
