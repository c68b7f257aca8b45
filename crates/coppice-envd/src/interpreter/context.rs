//! Contexts: one persistent interpreter process each, and the execution of a cell in one.
//!
//! A context's process runs its language's embedded driver ([`RUNNERS`] says which, with
//! which program and how to speak to it) in its own session, so an interrupt or a kill
//! reaches everything it started. The agent keeps one
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
    /// Node.js through `driver.js`.
    JavaScript,
    /// Node.js through `driver.js`, each cell transpiled by the `typescript` module.
    TypeScript,
    /// R through `driver.R` (Rscript).
    R,
    /// Java through `driver.java` (JShell in the JDK's source launcher).
    Java,
}

impl Language {
    /// E2B's normalization: absent or empty is python, case and surrounding spaces do not
    /// matter, `js` means `javascript` and `ts` `typescript`. Unsupported languages come
    /// back as their normalized name.
    pub(super) fn parse(name: Option<&str>) -> Result<Self, String> {
        let name = name.map(|n| n.trim().to_lowercase()).unwrap_or_default();
        match name.as_str() {
            "" | "python3" => Ok(Self::Python),
            "sh" | "shell" => Ok(Self::Bash),
            "js" => Ok(Self::JavaScript),
            "ts" => Ok(Self::TypeScript),
            other => RUNNERS
                .iter()
                .find(|r| r.name == other)
                .map(|r| r.language)
                .ok_or(name),
        }
    }

    /// How this language's processes are started and spoken to.
    pub(super) fn runner(self) -> &'static Runner {
        // The table lists every variant once, in declaration order (checked by a test).
        &RUNNERS[self as usize]
    }

    /// The name `/contexts` reports.
    pub(super) fn name(self) -> &'static str {
        self.runner().name
    }
}

/// Which configured program runs a driver.
#[derive(Debug, Clone, Copy)]
pub(super) enum Program {
    /// [`InterpreterConfig::python`].
    Python,
    /// [`InterpreterConfig::bash`].
    Bash,
    /// [`InterpreterConfig::node`].
    Node,
    /// [`InterpreterConfig::rscript`].
    Rscript,
    /// [`InterpreterConfig::java`].
    Java,
}

/// How the driver reaches its end of the socket pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Channel {
    /// Inherited under its own number, named by `COPPICE_DRIVER_FD`.
    Fd,
    /// As fd 0, for runtimes that cannot open a descriptor by number (Java).
    Stdin,
}

/// How a cell is written to the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Encoding {
    /// One JSON object per line: `{"code", "env", "n"}`.
    JsonLine,
    /// Three NUL-terminated fields of shell code: setup, cell, teardown.
    ShellFields,
    /// A line of space-separated byte lengths, then the fields: cell number, code, then
    /// env var names and values in pairs.
    Framed,
}

/// Who gets SIGINT when a cell is interrupted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum InterruptTarget {
    /// The interpreter only, which turns it into an error in the cell (a subprocess the
    /// cell waits on is cleaned up by that error, as under Jupyter).
    Process,
    /// The whole process group: bash waits for its foreground command, which must get it.
    Group,
}

/// One row of the launch table: everything that differs between languages.
#[derive(Debug)]
pub(super) struct Runner {
    /// The language this row is for.
    pub(super) language: Language,
    /// E2B's name for it, which `/contexts` reports.
    pub(super) name: &'static str,
    /// The driver's file name in the driver directory.
    pub(super) driver: &'static str,
    /// The driver's text, shipped inside the agent.
    pub(super) source: &'static str,
    /// The program that runs the driver.
    pub(super) program: Program,
    /// Its arguments; [`DRIVER`] stands for the driver's path.
    pub(super) args: &'static [&'static str],
    /// How the driver gets its socket.
    pub(super) channel: Channel,
    /// How a cell is written to it.
    pub(super) encoding: Encoding,
    /// Who gets SIGINT on an interrupt.
    pub(super) interrupt: InterruptTarget,
    /// Env var names must be shell identifiers (else anything without `=` or NUL).
    pub(super) identifier_env_names: bool,
    /// The code may contain NUL bytes.
    pub(super) nul_in_code: bool,
}

/// The fd number a driver finds its socket under with [`Channel::Fd`].
const DRIVER_FD: RawFd = 3;

/// The placeholder for the driver's path in [`Runner::args`].
pub(super) const DRIVER: &str = "{driver}";

/// The launch table, one row per [`Language`] variant in declaration order.
pub(super) const RUNNERS: [Runner; 6] = [
    Runner {
        language: Language::Python,
        name: "python",
        driver: "driver.py",
        source: include_str!("driver.py"),
        program: Program::Python,
        args: &[DRIVER],
        channel: Channel::Fd,
        encoding: Encoding::JsonLine,
        interrupt: InterruptTarget::Process,
        identifier_env_names: false,
        nul_in_code: true,
    },
    Runner {
        language: Language::Bash,
        name: "bash",
        driver: "driver.sh",
        source: include_str!("driver.sh"),
        program: Program::Bash,
        args: &["--noprofile", "--norc", DRIVER],
        channel: Channel::Fd,
        encoding: Encoding::ShellFields,
        interrupt: InterruptTarget::Group,
        identifier_env_names: true,
        nul_in_code: false,
    },
    Runner {
        language: Language::JavaScript,
        name: "javascript",
        driver: "driver.js",
        source: include_str!("driver.js"),
        program: Program::Node,
        args: &[DRIVER],
        channel: Channel::Fd,
        encoding: Encoding::JsonLine,
        interrupt: InterruptTarget::Process,
        identifier_env_names: false,
        nul_in_code: true,
    },
    Runner {
        language: Language::TypeScript,
        name: "typescript",
        driver: "driver.js",
        source: include_str!("driver.js"),
        program: Program::Node,
        args: &[DRIVER, "typescript"],
        channel: Channel::Fd,
        encoding: Encoding::JsonLine,
        interrupt: InterruptTarget::Process,
        identifier_env_names: false,
        nul_in_code: true,
    },
    Runner {
        language: Language::R,
        name: "r",
        driver: "driver.R",
        source: include_str!("driver.R"),
        program: Program::Rscript,
        args: &["--no-save", "--no-restore", DRIVER],
        channel: Channel::Fd,
        encoding: Encoding::Framed,
        interrupt: InterruptTarget::Process,
        identifier_env_names: false,
        // R strings cannot hold NUL.
        nul_in_code: false,
    },
    Runner {
        language: Language::Java,
        name: "java",
        driver: "driver.java",
        source: include_str!("driver.java"),
        program: Program::Java,
        // A small heap and the serial collector start fastest; class data sharing is on
        // by default. No perf-data file in /tmp (`hsperfdata_<user>`, for jps and jstat).
        args: &[
            "-XX:+UseSerialGC",
            "-XX:-UsePerfData",
            "-XX:TieredStopAtLevel=1",
            "-Dfile.encoding=UTF-8",
            DRIVER,
        ],
        channel: Channel::Stdin,
        encoding: Encoding::Framed,
        interrupt: InterruptTarget::Process,
        identifier_env_names: false,
        nul_in_code: true,
    },
];

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
    /// Only drivers that understand `setup` can run as a spare (see [`Spare`]).
    #[error("{language} cannot be prestarted")]
    NotPrestartable {
        /// The language's name.
        language: &'static str,
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
    /// Where the drivers were written.
    pub(super) driver_dir: PathBuf,
    /// The interpreter's spare process, if one was started ahead of need.
    pub(super) spare: Arc<Spare>,
}

/// A process started before any context asked for one (`--prestart python`), so that the
/// first execution in a fresh sandbox does not wait for the interpreter to start. It is
/// started in `/` with the environment of the moment (before `/init`, usually none of the
/// sandbox's variables); the context that takes it sends the driver its working directory
/// and the sandbox's environment as they are then (`setup`), so the cells it runs cannot
/// tell it from a process started for them. Only drivers that read JSON lines (Python)
/// understand `setup`.
#[derive(Debug, Default)]
pub(super) struct Spare {
    slot: StdMutex<Option<SpareProcess>>,
}

#[derive(Debug)]
struct SpareProcess {
    language: Language,
    user: String,
    process: Process,
}

impl Spare {
    /// Starts the spare process; one at a time, and none when one is waiting already.
    pub(super) async fn fill(
        &self,
        language: Language,
        user: &str,
        state: &AgentState,
        launch: &Launch,
    ) -> Result<(), ContextError> {
        if language.runner().encoding != Encoding::JsonLine {
            return Err(ContextError::NotPrestartable {
                language: language.name(),
            });
        }
        if self.lock().is_some() {
            return Ok(());
        }
        let process = spawn(language, "/", user, state, launch).await?;
        let mut slot = self.lock();
        if slot.is_none() {
            *slot = Some(SpareProcess {
                language,
                user: user.to_owned(),
                process,
            });
        }
        Ok(())
    }

    /// Takes the spare process if it runs `language` as `user` and is still alive, and
    /// moves it to `cwd` and the sandbox's current environment. `None` means spawn anew.
    async fn take(
        &self,
        language: Language,
        user: &str,
        cwd: &str,
        state: &AgentState,
        launch: &Launch,
    ) -> Option<Process> {
        let mut spare = {
            let mut slot = self.lock();
            match slot.as_ref() {
                Some(s) if s.language == language && s.user == user => slot.take()?,
                _ => return None,
            }
        };
        let p = &mut spare.process;
        if !matches!(
            p.exited.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ) {
            // Killed while it waited (from inside the sandbox, or by the OOM killer).
            p.has_exited = true;
            return None;
        }
        let mut line = serde_json::json!({
            "setup": { "cwd": cwd, "env": state.envs_snapshot() }
        })
        .to_string()
        .into_bytes();
        line.push(b'\n');
        if p.requests.write_all(&line).await.is_err() {
            return None;
        }
        // A driver that cannot change to `cwd` exits instead of answering; dropping the
        // process kills it, and the caller's own spawn reports the error.
        match tokio::time::timeout(launch.config.start_timeout, wait_ready(p)).await {
            Ok(true) => Some(spare.process),
            _ => None,
        }
    }

    /// The process group of the waiting spare process, if there is one.
    #[cfg(test)]
    pub(super) fn waiting(&self) -> Option<i32> {
        self.lock().as_ref().map(|s| s.process.pgid)
    }

    /// Kills the waiting spare process, if any.
    #[cfg(test)]
    pub(super) fn discard(&self) {
        drop(self.lock().take());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<SpareProcess>> {
        // Every critical section is one read or replace of the slot.
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }
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
        /// The driver waits for a newline back before it runs on (see `run_cell`).
        #[serde(default)]
        ack: bool,
    },
    Error {
        name: String,
        value: String,
        traceback: String,
        #[serde(default)]
        ack: bool,
    },
    Done {
        #[serde(default)]
        rc: Option<i32>,
    },
    /// Output a driver frames itself (Java's System.out and System.err).
    Stream {
        name: String,
        text: String,
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
        let spare = if Path::new(&self.cwd).is_dir() {
            launch
                .spare
                .take(self.language, &self.user, &self.cwd, state, launch)
                .await
        } else {
            None
        };
        let process = match spare {
            Some(p) => p,
            None => spawn(self.language, &self.cwd, &self.user, state, launch).await?,
        };
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
                // An event that asks for an acknowledgement comes after everything the
                // cell printed before it (the driver flushed that into the pipes first), and
                // before anything it prints after (it waits for the newline): drain, send,
                // then acknowledge, and the client sees the cell's order.
                let ack = matches!(event, Ok(Event::Result { ack: true, .. } | Event::Error { ack: true, .. }));
                if ack {
                    drain_now(p, out, &mut odec, &mut edec).await;
                }
                match event {
                    Ok(Event::Result { data, main, .. }) => out.send(ndjson::result(data, main)).await,
                    Ok(Event::Error { name, value, traceback, .. }) => {
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
                    Ok(Event::Stream { name, text }) => {
                        let kind = if name == "stderr" { StreamKind::Stderr } else { StreamKind::Stdout };
                        emit(out, kind, text).await;
                    }
                    Ok(Event::Ready) => {}
                    Err(e) => tracing::warn!(error = %e, "unreadable interpreter event"),
                }
                if ack && p.requests.write_all(b"\n").await.is_err() {
                    drain(p, out, &mut odec, &mut edec).await;
                    return Outcome::Died;
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

/// Reads whatever the pipes hold right now, without waiting for more, and ends both
/// decoders: nothing more is coming for this execution.
async fn drain(p: &mut Process, out: &mut Out, odec: &mut Utf8Stream, edec: &mut Utf8Stream) {
    drain_now(p, out, odec, edec).await;
    emit(out, StreamKind::Stdout, odec.finish()).await;
    emit(out, StreamKind::Stderr, edec.finish()).await;
}

/// Reads whatever the pipes hold right now, without waiting for more; a UTF-8 sequence
/// split at the end stays in its decoder for the next read.
async fn drain_now(p: &mut Process, out: &mut Out, odec: &mut Utf8Stream, edec: &mut Utf8Stream) {
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
    }
}

fn interrupt(pgid: i32, language: Language) {
    let pid = Pid::from_raw(pgid);
    let _ = match language.runner().interrupt {
        InterruptTarget::Process => kill(pid, Signal::SIGINT),
        InterruptTarget::Group => killpg(pid, Signal::SIGINT),
    };
}

fn encode_job(language: Language, job: &Job, count: u64) -> Vec<u8> {
    match language.runner().encoding {
        Encoding::JsonLine => {
            let mut v = serde_json::json!({ "code": job.code, "env": job.env, "n": count })
                .to_string()
                .into_bytes();
            v.push(b'\n');
            v
        }
        Encoding::Framed => {
            let n = count.to_string();
            let mut fields: Vec<&[u8]> = vec![n.as_bytes(), job.code.as_bytes()];
            for (k, v) in &job.env {
                fields.push(k.as_bytes());
                fields.push(v.as_bytes());
            }
            let header: Vec<String> = fields.iter().map(|f| f.len().to_string()).collect();
            let mut v = header.join(" ").into_bytes();
            v.push(b'\n');
            for f in fields {
                v.extend_from_slice(f);
            }
            v
        }
        Encoding::ShellFields => {
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
    if language.runner().identifier_env_names {
        let mut chars = name.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    } else {
        !name.is_empty() && !name.contains(['=', '\0'])
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
    let runner = language.runner();
    let program = launch.config.program(runner.program).to_owned();
    let spawn_err = |source| ContextError::Spawn {
        program: program.clone(),
        source,
    };
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(spawn_err)?;
    let driver = launch.driver_dir.join(runner.driver);

    let mut cmd = Command::new(&program);
    for arg in runner.args {
        if *arg == DRIVER {
            cmd.arg(&driver);
        } else {
            cmd.arg(arg);
        }
    }
    cmd.env_clear()
        .envs(base_env(&user.name, &user.home))
        .envs(state.envs_snapshot())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // The fd the child must keep across exec; none when the socket becomes its stdin.
    let (keep_fd, theirs): (Option<RawFd>, Option<std::os::unix::net::UnixStream>) =
        match runner.channel {
            Channel::Fd => {
                cmd.env("COPPICE_DRIVER_FD", DRIVER_FD.to_string())
                    .stdin(Stdio::null());
                (Some(theirs.as_raw_fd()), Some(theirs))
            }
            Channel::Stdin => {
                cmd.env("COPPICE_DRIVER_FD", "0")
                    .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)));
                (None, None)
            }
        };
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (setsid, signal, open/write, sigprocmask, fcntl,
    // setgroups, setgid, setuid, chdir) on data prepared before the fork; it allocates
    // nothing.
    unsafe {
        cmd.pre_exec(move || child_setup(keep_fd, switch.as_ref(), &cwd_c));
    }
    let spawned = reaper::spawn(&mut cmd);
    // The parent's copies of the child's end close here, also when the spawn failed (for
    // stdin, `cmd` holds it until dropped).
    drop(theirs);
    drop(cmd);
    let (mut child, exited) = spawned.map_err(spawn_err)?;
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

fn child_setup(chan: Option<RawFd>, switch: Option<&Switch>, cwd: &CString) -> io::Result<()> {
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
    // The driver's end of the socket must survive exec, as fd 3: a one-digit number every
    // shell can redirect (dash refuses `<&10`). Every other fd of the agent is close-on-exec,
    // so whatever fd 3 was in this child it would not have survived exec anyway.
    if let Some(chan) = chan {
        if chan == DRIVER_FD {
            nix::fcntl::fcntl(
                chan,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
            )?;
        } else {
            // SAFETY: dup2 is async-signal-safe; fd 3's previous file, if any, was
            // close-on-exec (see above), and the new fd 3 is not.
            if unsafe { libc::dup2(chan, DRIVER_FD) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
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
