//! Contexts: one persistent interpreter process each, and the execution of a cell in one.
//!
//! A context's process runs the embedded driver (`driver.py` or `driver.sh`) in its own
//! session, so an interrupt or a kill reaches everything it started. The agent keeps one
//! end of a unix socket pair (requests out, events in) and the read ends of the process's
//! stdout and stderr pipes. Executions in one context are serialized by `runtime`; only the
//! execution holding it reads the process, so output between executions waits in the pipes.
//!
//! Ordering: the driver flushes and writes everything a cell printed before it sends
//! `done`, so once `done` is read, a non-blocking drain of both pipes sees all of it.

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use nix::sys::signal::{kill, killpg, SigHandler, Signal};
use nix::unistd::{Gid, Pid, Uid};
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{pipe, OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::interpreter::ndjson::{self, StreamKind, Utf8Stream};
use crate::interpreter::InterpreterConfig;
use crate::reaper::{self, Exit};
use crate::state::AgentState;

/// The languages a context can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Language {
    /// CPython through `driver.py`.
    Python,
    /// bash through `driver.sh`.
    Bash,
}

impl Language {
    /// E2B's normalization: absent or empty is python, case and spaces do not matter, `js`
    /// means `javascript`. Unsupported languages come back as their normalized name.
    pub(super) fn parse(name: Option<&str>) -> Result<Self, String> {
        let name = name.map(|n| n.trim().to_lowercase()).unwrap_or_default();
        match name.as_str() {
            "" | "python" | "python3" => Ok(Self::Python),
            "bash" | "sh" | "shell" => Ok(Self::Bash),
            "js" => Err("javascript".to_owned()),
            _ => Err(name),
        }
    }

    /// The name `/contexts` reports.
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Python => "python",
            Self::Bash => "bash",
        }
    }
}

/// Why a context could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(super) enum ContextError {
    /// The context's user is not in the sandbox's `passwd`.
    #[error("invalid username: '{user}'")]
    UnknownUser {
        /// The user asked for.
        user: String,
    },
    /// The agent is not root and the context's user is someone else.
    #[error("cannot run a context as '{user}': the agent is not root")]
    CannotSwitchUser {
        /// The user asked for.
        user: String,
    },
    /// The working directory does not exist or is not a directory.
    #[error("failed to set working directory to '{cwd}'")]
    BadCwd {
        /// The directory asked for.
        cwd: String,
    },
    /// Writing the driver files failed.
    #[error("write interpreter driver {path}")]
    Driver {
        /// The file being written.
        path: PathBuf,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// Creating the socket pair or starting the process failed.
    #[error("start {program}")]
    Spawn {
        /// The interpreter executable.
        program: PathBuf,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// The process ended or went silent before saying it was ready.
    #[error("interpreter did not start: {stderr}")]
    NotReady {
        /// What it wrote to stderr, which usually says why.
        stderr: String,
    },
}

/// One context: its identity and, while alive, its process.
#[derive(Debug)]
pub(super) struct Context {
    /// The id clients address it by.
    pub(super) id: String,
    /// What it runs.
    pub(super) language: Language,
    /// The directory it was started in.
    pub(super) cwd: String,
    /// The user it runs as.
    user: String,
    /// Creation order, so listings are stable.
    pub(super) seq: u64,
    runtime: tokio::sync::Mutex<Runtime>,
    /// The process group of the live process, reachable without waiting for `runtime`.
    leader: StdMutex<Option<i32>>,
    deleted: AtomicBool,
}

#[derive(Debug, Default)]
struct Runtime {
    process: Option<Process>,
    count: u64,
}

/// A running interpreter process.
#[derive(Debug)]
struct Process {
    pgid: i32,
    events: BufReader<OwnedReadHalf>,
    requests: OwnedWriteHalf,
    stdout: pipe::Receiver,
    stderr: pipe::Receiver,
    exited: oneshot::Receiver<Exit>,
    has_exited: bool,
}

impl Drop for Process {
    fn drop(&mut self) {
        if !self.has_exited {
            // The whole session goes: the interpreter and whatever the user started. The
            // reaper collects the zombies.
            let _ = killpg(Pid::from_raw(self.pgid), Signal::SIGKILL);
        }
    }
}

/// What one `/execute` asks of a context.
#[derive(Debug)]
pub(super) struct Job {
    /// The cell.
    pub(super) code: String,
    /// Env vars set for this execution only.
    pub(super) env: HashMap<String, String>,
    /// Coppice extension: interrupt the cell after this long.
    pub(super) timeout: Option<Duration>,
}

/// Everything a spawn needs, gathered before the context lock is taken.
#[derive(Debug, Clone)]
pub(super) struct Launch {
    pub(super) config: Arc<InterpreterConfig>,
    pub(super) driver_py: PathBuf,
    pub(super) driver_sh: PathBuf,
}

/// An event the driver writes on its socket.
#[derive(Debug, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Event {
    Ready,
    Result {
        data: Map<String, Value>,
        #[serde(default)]
        main: bool,
    },
    Error {
        name: String,
        value: String,
        traceback: String,
    },
    Done {
        #[serde(default)]
        rc: Option<i32>,
    },
}

impl Context {
    /// A context with no process yet.
    pub(super) fn new(id: String, language: Language, cwd: String, user: String, seq: u64) -> Self {
        Self {
            id,
            language,
            cwd,
            user,
            seq,
            runtime: tokio::sync::Mutex::new(Runtime::default()),
            leader: StdMutex::new(None),
            deleted: AtomicBool::new(false),
        }
    }

    /// Starts the process now (used at creation, so start-up errors reach the caller).
    pub(super) async fn start(
        &self,
        state: &AgentState,
        launch: &Launch,
    ) -> Result<(), ContextError> {
        let mut rt = self.runtime.lock().await;
        self.respawn(&mut rt, state, launch).await
    }

    /// Kills the process and starts a fresh one: all state and the count are gone.
    ///
    /// A running execution ends with a `ContextRestarting` error as soon as its process dies.
    pub(super) async fn restart(
        &self,
        state: &AgentState,
        launch: &Launch,
    ) -> Result<(), ContextError> {
        self.kill_now();
        let mut rt = self.runtime.lock().await;
        self.respawn(&mut rt, state, launch).await
    }

    /// Kills the process for good; executions still queued end with an error.
    pub(super) async fn delete(&self) {
        self.deleted.store(true, Ordering::SeqCst);
        self.kill_now();
        let mut rt = self.runtime.lock().await;
        self.retire(&mut rt).await;
    }

    fn kill_now(&self) {
        let leader = self.leader.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(pgid) = *leader {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
    }

    async fn retire(&self, rt: &mut Runtime) {
        *self.leader.lock().unwrap_or_else(PoisonError::into_inner) = None;
        if let Some(mut p) = rt.process.take() {
            let _ = killpg(Pid::from_raw(p.pgid), Signal::SIGKILL);
            if !p.has_exited {
                // Bounded: SIGKILL is not ignorable, but never hang a request on it.
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(5), &mut p.exited).await
                {
                    p.has_exited = true;
                }
            }
        }
    }

    async fn respawn(
        &self,
        rt: &mut Runtime,
        state: &AgentState,
        launch: &Launch,
    ) -> Result<(), ContextError> {
        self.retire(rt).await;
        rt.count = 0;
        let process = spawn(self.language, &self.cwd, &self.user, state, launch).await?;
        *self.leader.lock().unwrap_or_else(PoisonError::into_inner) = Some(process.pgid);
        rt.process = Some(process);
        Ok(())
    }

    /// Runs `job` and streams its NDJSON lines into `tx`, ending with `end_of_execution`.
    pub(super) async fn execute(
        self: Arc<Self>,
        state: Arc<AgentState>,
        launch: Launch,
        job: Job,
        tx: mpsc::Sender<Bytes>,
    ) {
        let keepalive = launch.config.keepalive;
        let mut out = Out {
            tx,
            gone: false,
            last: Instant::now(),
        };
        // Queue behind other executions of this context, keeping the client's connection
        // alive meanwhile.
        let lock = self.runtime.lock();
        tokio::pin!(lock);
        let mut rt = loop {
            tokio::select! {
                rt = &mut lock => break rt,
                () = tokio::time::sleep_until(out.last + keepalive) => out.send(ndjson::keepalive()).await,
            }
        };
        if self.deleted.load(Ordering::SeqCst) {
            out.send(ndjson::error("ContextDeleted", "Context was deleted", ""))
                .await;
            out.send(ndjson::end_of_execution()).await;
            return;
        }
        let alive = rt.process.as_mut().is_some_and(|p| {
            // A process killed between executions (from inside the sandbox, or by the OOM
            // killer) is found here; its exit is taken, so it must not be awaited again.
            if !p.has_exited
                && !matches!(
                    p.exited.try_recv(),
                    Err(oneshot::error::TryRecvError::Empty)
                )
            {
                p.has_exited = true;
            }
            !p.has_exited
        });
        if !alive {
            if let Err(e) = self.respawn(&mut rt, &state, &launch).await {
                out.send(ndjson::error("ContextStartError", &e.to_string(), ""))
                    .await;
                out.send(ndjson::end_of_execution()).await;
                return;
            }
        }
        rt.count += 1;
        let count = rt.count;
        out.send(ndjson::number_of_executions(count)).await;
        let oom_kills = crate::oom::kills_so_far();
        let outcome = match rt.process.as_mut() {
            Some(p) => run_cell(p, self.language, &job, count, &launch.config, &mut out).await,
            None => Outcome::Died,
        };
        if matches!(outcome, Outcome::Died) {
            // The process is gone (crashed, exited, killed by restart or timeout): like a
            // Jupyter kernel it is restarted, lazily, by the next execution.
            self.retire(&mut rt).await;
            let (name, value) = if self.deleted.load(Ordering::SeqCst) {
                ("ContextDeleted", "Context was deleted")
            } else {
                ("ContextRestarting", crate::oom::restart_reason(oom_kills))
            };
            out.send(ndjson::error(name, value, "")).await;
        }
        drop(rt);
        out.send(ndjson::end_of_execution()).await;
    }
}

/// The client side of one execution's stream.
struct Out {
    tx: mpsc::Sender<Bytes>,
    /// The client went away; lines are dropped from here on.
    gone: bool,
    last: Instant,
}

impl Out {
    async fn send(&mut self, line: Bytes) {
        self.last = Instant::now();
        if !self.gone && self.tx.send(line).await.is_err() {
            self.gone = true;
        }
    }
}

enum Outcome {
    Done,
    Died,
}

async fn run_cell(
    p: &mut Process,
    language: Language,
    job: &Job,
    count: u64,
    config: &InterpreterConfig,
    out: &mut Out,
) -> Outcome {
    if p.requests
        .write_all(&encode_job(language, job, count))
        .await
        .is_err()
    {
        return Outcome::Died;
    }
    let mut line = Vec::new();
    let mut obuf = vec![0u8; 16 * 1024];
    let mut ebuf = vec![0u8; 16 * 1024];
    let mut odec = Utf8Stream::default();
    let mut edec = Utf8Stream::default();
    let mut errored = false;
    let mut open = (true, true);
    let mut deadline = job.timeout.map(|t| Instant::now() + t);
    let mut kill_at: Option<Instant> = None;
    loop {
        tokio::select! {
            r = p.events.read_until(b'\n', &mut line) => {
                match r {
                    Ok(0) | Err(_) => {
                        drain(p, out, &mut odec, &mut edec).await;
                        return Outcome::Died;
                    }
                    Ok(_) => {}
                }
                let event = serde_json::from_slice::<Event>(&line);
                line.clear();
                match event {
                    Ok(Event::Result { data, main }) => out.send(ndjson::result(data, main)).await,
                    Ok(Event::Error { name, value, traceback }) => {
                        // E2B reports only the first error of an execution.
                        if !errored {
                            errored = true;
                            out.send(ndjson::error(&name, &value, &traceback)).await;
                        }
                    }
                    Ok(Event::Done { rc }) => {
                        drain(p, out, &mut odec, &mut edec).await;
                        if let Some(rc) = rc.filter(|&rc| rc != 0) {
                            // bash_kernel's convention, which E2B passes through.
                            if !errored {
                                out.send(ndjson::error("", &rc.to_string(), "")).await;
                            }
                        }
                        return Outcome::Done;
                    }
                    Ok(Event::Ready) => {}
                    Err(e) => tracing::warn!(error = %e, "unreadable interpreter event"),
                }
            }
            r = p.stdout.read(&mut obuf), if open.0 => match r {
                Ok(n) if n > 0 => emit(out, StreamKind::Stdout, odec.push(&obuf[..n])).await,
                _ => open.0 = false,
            },
            r = p.stderr.read(&mut ebuf), if open.1 => match r {
                Ok(n) if n > 0 => emit(out, StreamKind::Stderr, edec.push(&ebuf[..n])).await,
                _ => open.1 = false,
            },
            _ = &mut p.exited, if !p.has_exited => {
                p.has_exited = true;
                drain(p, out, &mut odec, &mut edec).await;
                return Outcome::Died;
            }
            () = sleep_until_opt(deadline) => {
                deadline = None;
                interrupt(p.pgid, language);
                kill_at = Some(Instant::now() + config.interrupt_grace);
            }
            () = sleep_until_opt(kill_at) => {
                // The cell ignored the interrupt (caught it, or is stuck in C code).
                kill_at = None;
                let _ = killpg(Pid::from_raw(p.pgid), Signal::SIGKILL);
            }
            () = tokio::time::sleep_until(out.last + config.keepalive) => {
                out.send(ndjson::keepalive()).await;
            }
            () = out.tx.closed(), if !out.gone => {
                // The client hung up (E2B's SDK does so on its own timeout): stop the cell,
                // as E2B's server does, and keep the context.
                out.gone = true;
                if deadline.is_some() || kill_at.is_none() {
                    deadline = Some(Instant::now());
                }
            }
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn emit(out: &mut Out, kind: StreamKind, text: String) {
    if !text.is_empty() {
        out.send(ndjson::stream(kind, &text)).await;
    }
}

/// Reads whatever the pipes hold right now, without waiting for more.
async fn drain(p: &mut Process, out: &mut Out, odec: &mut Utf8Stream, edec: &mut Utf8Stream) {
    let mut buf = vec![0u8; 16 * 1024];
    for (fd, kind) in [
        (p.stdout.as_raw_fd(), StreamKind::Stdout),
        (p.stderr.as_raw_fd(), StreamKind::Stderr),
    ] {
        let dec = match kind {
            StreamKind::Stdout => &mut *odec,
            StreamKind::Stderr => &mut *edec,
        };
        // A raw read: tokio's try_read would trust a readiness flag the reactor may not
        // have set yet. The fd is non-blocking, so this stops at "nothing more".
        while let Ok(n) = nix::unistd::read(fd, &mut buf) {
            if n == 0 {
                break;
            }
            let text = dec.push(&buf[..n]);
            emit(out, kind, text).await;
        }
        let rest = dec.finish();
        emit(out, kind, rest).await;
    }
}

fn interrupt(pgid: i32, language: Language) {
    let pid = Pid::from_raw(pgid);
    let _ = match language {
        // Like Jupyter: only the interpreter, which turns it into KeyboardInterrupt (a
        // subprocess it waits on is cleaned up by the exception).
        Language::Python => kill(pid, Signal::SIGINT),
        // bash waits for its foreground command, so that command must get it too.
        Language::Bash => killpg(pid, Signal::SIGINT),
    };
}

fn encode_job(language: Language, job: &Job, count: u64) -> Vec<u8> {
    match language {
        Language::Python => {
            let mut v = serde_json::json!({ "code": job.code, "env": job.env, "n": count })
                .to_string()
                .into_bytes();
            v.push(b'\n');
            v
        }
        Language::Bash => {
            let (setup, teardown) = bash_env(&job.env);
            let mut v = Vec::with_capacity(setup.len() + job.code.len() + teardown.len() + 3);
            for part in [&setup, &job.code, &teardown] {
                v.extend_from_slice(part.as_bytes());
                v.push(0);
            }
            v
        }
    }
}

/// Shell code that sets per-call env vars and code that puts the old values back.
fn bash_env(env: &HashMap<String, String>) -> (String, String) {
    let mut setup = String::new();
    let mut teardown = String::new();
    for (i, (k, v)) in env.iter().enumerate() {
        setup.push_str(&format!(
            "if [ -n \"${{{k}+x}}\" ]; then __coppice_old_{i}=\"${k}\"; __coppice_had_{i}=1; \
             else __coppice_had_{i}=; fi; export {k}={}\n",
            shell_quote(v)
        ));
        teardown.push_str(&format!(
            "if [ -n \"$__coppice_had_{i}\" ]; then export {k}=\"$__coppice_old_{i}\"; \
             else unset {k}; fi; unset __coppice_old_{i} __coppice_had_{i}\n"
        ));
    }
    (setup, teardown)
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Whether `name` can be an env var name in `language`.
pub(super) fn valid_env_name(language: Language, name: &str) -> bool {
    match language {
        Language::Python => !name.is_empty() && !name.contains(['=', '\0']),
        Language::Bash => {
            let mut chars = name.chars();
            chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        }
    }
}

/// The identity a context process takes on, prepared before `fork`.
struct Switch {
    uid: Uid,
    gid: Gid,
    groups: Vec<Gid>,
}

async fn spawn(
    language: Language,
    cwd: &str,
    user_name: &str,
    state: &AgentState,
    launch: &Launch,
) -> Result<Process, ContextError> {
    let user =
        crate::users::by_name(state, user_name).ok_or_else(|| ContextError::UnknownUser {
            user: user_name.to_owned(),
        })?;
    let switch = if Uid::effective().as_raw() == user.uid {
        None
    } else if Uid::effective().is_root() {
        let groups = crate::users::groups(state, &user);
        Some(Switch {
            uid: Uid::from_raw(user.uid),
            gid: Gid::from_raw(user.gid),
            groups: groups.into_iter().map(Gid::from_raw).collect(),
        })
    } else {
        return Err(ContextError::CannotSwitchUser {
            user: user_name.to_owned(),
        });
    };
    if !Path::new(cwd).is_dir() {
        return Err(ContextError::BadCwd {
            cwd: cwd.to_owned(),
        });
    }
    let cwd_c = CString::new(cwd).map_err(|_| ContextError::BadCwd {
        cwd: cwd.to_owned(),
    })?;
    let program = match language {
        Language::Python => launch.config.python.clone(),
        Language::Bash => launch.config.bash.clone(),
    };
    let spawn_err = |source| ContextError::Spawn {
        program: program.clone(),
        source,
    };
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(spawn_err)?;
    let child_fd: RawFd = theirs.as_raw_fd();

    let mut cmd = Command::new(&program);
    match language {
        Language::Python => cmd.arg(&launch.driver_py),
        Language::Bash => cmd.args(["--noprofile", "--norc"]).arg(&launch.driver_sh),
    };
    cmd.env_clear()
        .envs(base_env(&user.name, &user.home))
        .envs(state.envs_snapshot())
        .env("COPPICE_DRIVER_FD", child_fd.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (setsid, signal, open/write, sigprocmask, fcntl,
    // setgroups, setgid, setuid, chdir) on data prepared before the fork; it allocates
    // nothing.
    unsafe {
        cmd.pre_exec(move || child_setup(child_fd, switch.as_ref(), &cwd_c));
    }
    let (mut child, exited) = reaper::spawn(&mut cmd).map_err(spawn_err)?;
    drop(theirs);
    let pgid = i32::try_from(child.id()).unwrap_or(i32::MAX);
    let pipes = (child.stdout.take(), child.stderr.take());
    let (Some(stdout), Some(stderr)) = pipes else {
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        return Err(spawn_err(io::Error::other("child pipes missing")));
    };
    let stdout = pipe::Receiver::from_owned_fd(stdout.into()).map_err(spawn_err)?;
    let stderr = pipe::Receiver::from_owned_fd(stderr.into()).map_err(spawn_err)?;
    ours.set_nonblocking(true).map_err(spawn_err)?;
    let (events, requests) = tokio::net::UnixStream::from_std(ours)
        .map_err(spawn_err)?
        .into_split();
    let mut p = Process {
        pgid,
        events: BufReader::new(events),
        requests,
        stdout,
        stderr,
        exited,
        has_exited: false,
    };
    match tokio::time::timeout(launch.config.start_timeout, wait_ready(&mut p)).await {
        Ok(true) => Ok(p),
        Ok(false) | Err(_) => {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            let mut buf = vec![0u8; 16 * 1024];
            let mut stderr = Vec::new();
            while let Ok(n) = nix::unistd::read(p.stderr.as_raw_fd(), &mut buf) {
                if n == 0 || stderr.len() > 64 * 1024 {
                    break;
                }
                stderr.extend_from_slice(&buf[..n]);
            }
            Err(ContextError::NotReady {
                stderr: String::from_utf8_lossy(&stderr).trim().to_owned(),
            })
        }
    }
}

async fn wait_ready(p: &mut Process) -> bool {
    let mut line = Vec::new();
    match p.events.read_until(b'\n', &mut line).await {
        Ok(n) if n > 0 => matches!(serde_json::from_slice(&line), Ok(Event::Ready)),
        _ => false,
    }
}

fn child_setup(chan: RawFd, switch: Option<&Switch>, cwd: &CString) -> io::Result<()> {
    // Its own session and process group: interrupts and kills reach what the cell started.
    nix::unistd::setsid()?;
    // User code goes before the agent in the OOM killer's line, and receives the signals
    // the agent's own threads block (an interrupt is SIGINT).
    crate::oom::yield_in_child()?;
    crate::agent::unblock_in_child()?;
    for sig in [Signal::SIGINT, Signal::SIGQUIT] {
        // SAFETY: setting the default disposition installs no handler code. An ignored
        // SIGINT would be inherited through exec and make interrupts do nothing.
        unsafe { nix::sys::signal::signal(sig, SigHandler::SigDfl) }?;
    }
    // The driver's end of the socket must survive exec.
    nix::fcntl::fcntl(
        chan,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )?;
    if let Some(s) = switch {
        nix::unistd::setgroups(&s.groups)?;
        nix::unistd::setgid(s.gid)?;
        nix::unistd::setuid(s.uid)?;
    }
    nix::unistd::chdir(cwd.as_c_str())?;
    Ok(())
}

/// The environment every context starts from, before the sandbox's own env vars.
fn base_env(user: &str, home: &Path) -> Vec<(String, String)> {
    let path = std::env::var("PATH")
        .unwrap_or_else(|_| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    vec![
        ("PATH".into(), path),
        ("HOME".into(), home.display().to_string()),
        ("USER".into(), user.to_owned()),
        ("LOGNAME".into(), user.to_owned()),
        ("SHELL".into(), "/bin/bash".into()),
        ("LANG".into(), "C.UTF-8".into()),
    ]
}
