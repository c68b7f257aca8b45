//! The agent program: what runs as PID 1 of every sandbox.
//!
//! It serves envd and the code interpreter on one unix socket (`--socket PATH`, default
//! [`DEFAULT_SOCKET`]), reaps every zombie, and on SIGTERM or SIGINT forwards the signal to
//! the process groups it started and exits. Both the `coppice-envd` binary and the gateway
//! (which can run as the agent when invoked under that name) call [`main`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use nix::sys::signal::Signal;
use tokio::signal::unix::{signal, SignalKind};

use crate::state::{AgentConfig, AgentState};

/// Where the agent listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/coppice/agent.sock";
const USAGE: &str = "usage: coppice-envd [--socket PATH]";

fn parse_args(args: impl Iterator<Item = String>) -> Result<PathBuf, String> {
    let mut socket = PathBuf::from(DEFAULT_SOCKET);
    let mut args = args;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--socket" => socket = args.next().ok_or("--socket needs a path")?.into(),
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(socket)
}

/// Runs the agent with `args` (without the program name); returns the process exit code.
/// Errors are reported on stderr, which the jail sends to the sandbox's log; everything else
/// the agent logs goes there too, as [`crate::journal`] lines.
#[allow(
    clippy::print_stderr,
    reason = "the agent's own errors go to its log on stderr"
)]
pub fn main(args: impl Iterator<Item = String>) -> ExitCode {
    let socket = match parse_args(args) {
        Ok(s) => s,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(64);
        }
    };
    tracing_subscriber::fmt()
        .event_format(crate::journal::JsonLines)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("COPPICE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    // Reap orphans from the start, not only once the first command runs.
    crate::reaper::start();
    // One thread: the agent is idle most of the time and its idle RSS matters; blocking
    // file work goes to tokio's blocking pool.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(socket)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("coppice-envd: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(socket: PathBuf) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A socket left by a previous run would make bind fail.
    match std::fs::remove_file(&socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(&socket)?;
    tracing::info!(socket = %socket.display(), "coppice-envd listening");
    // Reports go beside the socket, in the run directory the gateway reads.
    let state = Arc::new(AgentState::with_config(AgentConfig {
        report_file: socket.parent().map(|d| d.join(crate::report::FILE)),
        ..AgentConfig::default()
    }));
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let forwarded = tokio::select! {
        () = crate::hop::serve(listener, Arc::clone(&state)) => None,
        _ = term.recv() => Some(Signal::SIGTERM),
        _ = int.recv() => Some(Signal::SIGINT),
    };
    if let Some(sig) = forwarded {
        tracing::info!(signal = ?sig, "forwarding to children and exiting");
        state.signal_all(sig);
    }
    Ok(())
}
