//! The agent program: what runs as PID 1 of every sandbox.
//!
//! It serves envd and the code interpreter on one unix socket (`--socket PATH`, default
//! [`DEFAULT_SOCKET`]; `--prestart python` also starts a spare Python interpreter at once,
//! which the first Python context adopts), and, as PID 1 of a sandbox, also on E2B's own ports on the sandbox's
//! loopback (`127.0.0.1:49983` envd, `127.0.0.1:49999` the code interpreter), where code in
//! the sandbox finds them as it does on E2B. It reaps every zombie, and on SIGTERM or SIGINT
//! from outside the sandbox forwards the signal to the process groups it started and exits.
//! The same signals sent from inside the sandbox are ignored (the kernel already ignores
//! SIGKILL there): root in the sandbox cannot take the agent down and, with it, the sandbox.
//! Both the `coppice-envd` binary and the gateway (which can run as the agent when invoked
//! under that name) call [`main`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::hop::{ENVD_PORT, INTERPRETER_PORT};
use crate::state::{AgentConfig, AgentState};

/// Where the agent listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/coppice/agent.sock";
const USAGE: &str = "usage: coppice-envd [--socket PATH] [--prestart python]";

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
struct Args {
    socket: PathBuf,
    /// Start a spare Python interpreter as soon as the agent listens, so the first Python
    /// context a client needs is ready almost at once (a code-interpreter template's).
    prestart_python: bool,
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut parsed = Args {
        socket: PathBuf::from(DEFAULT_SOCKET),
        prestart_python: false,
    };
    let mut args = args;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--socket" => parsed.socket = args.next().ok_or("--socket needs a path")?.into(),
            "--prestart" => match args.next().as_deref() {
                Some("python") => parsed.prestart_python = true,
                Some(other) => {
                    return Err(format!(
                        "--prestart {other:?}: only python can be prestarted\n{USAGE}"
                    ))
                }
                None => return Err(format!("--prestart needs a language\n{USAGE}")),
            },
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(parsed)
}

/// Runs the agent with `args` (without the program name); returns the process exit code.
/// Errors are reported on stderr, which the jail sends to the sandbox's log; everything else
/// the agent logs goes there too, as [`crate::journal`] lines.
#[allow(
    clippy::print_stderr,
    reason = "the agent's own errors go to its log on stderr"
)]
pub fn main(args: impl Iterator<Item = String>) -> ExitCode {
    let args = match parse_args(args) {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(64);
        }
    };
    // As PID 1, nothing in the sandbox may trace the agent or touch its memory or its /proc
    // files. Non-dumpable makes that need a capability in the user namespace its memory
    // belongs to; run from the jail's execute-only copy, that is the host's, which sandbox
    // root has no say in (`docs/backends.md`). The jail's copy already makes the exec
    // non-dumpable; this holds also when the binary was readable.
    if std::process::id() == 1 {
        // SAFETY: prctl with integer arguments only; it changes a flag of this process.
        if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
            eprintln!(
                "cannot make the agent non-dumpable: {}",
                std::io::Error::last_os_error()
            );
            return ExitCode::FAILURE;
        }
    }
    // Before any thread exists, so that every thread (tokio's blocking pool's too) inherits
    // the mask and the signals reach only the signalfd.
    let signals = match agent_signals() {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("cannot set up signal handling: {e}");
            return ExitCode::FAILURE;
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
    // One thread, which also reaps and takes signals: the agent is idle most of the time,
    // its idle RSS matters, and a process whose only thread dies is the cheapest kill for
    // the host (see `crate::reaper`). Blocking file work goes to tokio's blocking pool,
    // whose threads end after ten idle seconds.
    crate::reaper::drive_from_sigchld();
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
    let (tx, stop) = tokio::sync::oneshot::channel();
    let pid1 = std::process::id() == 1;
    let outcome = rt.block_on(async {
        // SAFETY: `SignalFd` owns its descriptor, keeps it open until it is dropped (with
        // the `AsyncFd` that owns it), and `as_raw_fd` always returns that descriptor.
        let signals = match unsafe { tokio::io::unix::AsyncFd::register(signals) } {
            Ok(fd) => fd,
            Err(e) => return Err(format!("cannot watch the signalfd: {}", e.into_parts().1).into()),
        };
        tokio::spawn(take_signals(signals, pid1, tx));
        run(args, stop).await
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("coppice-envd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The signals the agent takes through a signalfd: the stop signals and SIGCHLD, blocked
/// in the calling thread (and so in every thread started after).
fn agent_signals() -> nix::Result<SignalFd> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGCHLD);
    set.thread_block()?;
    SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
}

/// Takes the agent's signals as they come: SIGCHLD reaps (once at the start too, for a
/// child that exited before), and the first stop signal that [`counts`] goes to `stop`.
async fn take_signals(
    signals: tokio::io::unix::AsyncFd<SignalFd>,
    pid1: bool,
    stop: tokio::sync::oneshot::Sender<Signal>,
) {
    let mut stop = Some(stop);
    crate::reaper::reap_exited();
    loop {
        let mut ready = match signals.readable().await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "the signalfd failed; signals are no longer taken");
                return;
            }
        };
        loop {
            match ready.get_inner().read_signal() {
                Ok(Some(info)) => handle_signal(&info, pid1, &mut stop),
                Ok(None) => {
                    ready.clear_ready();
                    break;
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the signalfd");
                    ready.clear_ready();
                    break;
                }
            }
        }
    }
}

fn handle_signal(
    info: &nix::sys::signalfd::siginfo,
    pid1: bool,
    stop: &mut Option<tokio::sync::oneshot::Sender<Signal>>,
) {
    let Ok(signal) = Signal::try_from(i32::try_from(info.ssi_signo).unwrap_or(0)) else {
        return;
    };
    if signal == Signal::SIGCHLD {
        // One SIGCHLD may stand for several exits: reap all of them.
        crate::reaper::reap_exited();
        return;
    }
    let sender = libc::pid_t::try_from(info.ssi_pid).unwrap_or(libc::pid_t::MAX);
    if !counts(pid1, sender) {
        tracing::warn!(
            signal = signal as i32,
            sender,
            "ignoring a stop signal sent from inside the sandbox"
        );
        return;
    }
    if let Some(tx) = stop.take() {
        let _ = tx.send(signal);
    }
}

/// Unblocks every signal in a child before `exec`: the agent's threads block the stop
/// signals and SIGCHLD ([`agent_signals`]), a child inherits that mask through `fork` and `exec`, and a
/// command or context that cannot receive SIGINT or SIGTERM cannot be interrupted or stopped.
///
/// For `pre_exec`: `sigemptyset` and `sigprocmask` are async-signal-safe.
pub(crate) fn unblock_in_child() -> std::io::Result<()> {
    // SAFETY: an all-zero sigset_t is valid storage for sigemptyset to initialise.
    let mut empty: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigemptyset and sigprocmask on a set we own; the child has one thread.
    let failed = unsafe {
        libc::sigemptyset(&mut empty) != 0
            || libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0
    };
    if failed {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether a stop signal from pid `sender` (as this agent's pid namespace numbers it) stops
/// the agent. As PID 1 of a sandbox, only a sender outside it does, which the kernel reports
/// as pid 0: a process of the sandbox (even its root) cannot end the agent.
fn counts(pid1: bool, sender: libc::pid_t) -> bool {
    !pid1 || sender == 0
}

async fn run(
    args: Args,
    stop: tokio::sync::oneshot::Receiver<Signal>,
) -> Result<(), Box<dyn std::error::Error>> {
    let socket = args.socket;
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
    if std::process::id() == 1 {
        // E2B's ports on the sandbox's loopback; a failure costs only these listeners.
        for port in [ENVD_PORT, INTERPRETER_PORT] {
            match tokio::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, port)).await {
                Ok(l) => {
                    tokio::spawn(crate::hop::serve_tcp(l, Arc::clone(&state), port));
                }
                Err(e) => {
                    tracing::warn!(port, error = %e, "cannot listen on the sandbox's loopback");
                }
            }
        }
    }
    if args.prestart_python {
        tokio::spawn(crate::interpreter::prestart_python(Arc::clone(&state)));
    }
    let forwarded = tokio::select! {
        () = crate::hop::serve(listener, Arc::clone(&state)) => None,
        sig = stop => sig.ok(),
    };
    if let Some(sig) = forwarded {
        tracing::info!(signal = ?sig, "forwarding to children and exiting");
        state.signal_all(sig);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_names_a_socket_and_what_to_prestart() {
        let parse = |a: &[&str]| parse_args(a.iter().map(|s| (*s).to_owned()));
        assert_eq!(
            parse(&[]),
            Ok(Args {
                socket: DEFAULT_SOCKET.into(),
                prestart_python: false
            })
        );
        assert_eq!(
            parse(&["--socket", "/s", "--prestart", "python"]),
            Ok(Args {
                socket: "/s".into(),
                prestart_python: true
            })
        );
        assert!(parse(&["--prestart", "r"])
            .unwrap_err()
            .contains("only python"));
        assert!(parse(&["--prestart"])
            .unwrap_err()
            .contains("needs a language"));
        assert!(parse(&["--bogus"])
            .unwrap_err()
            .contains("unknown argument"));
    }

    #[test]
    fn only_senders_outside_the_sandbox_stop_pid_1() {
        assert!(counts(true, 0));
        assert!(!counts(true, 57));
        assert!(!counts(true, 1));
        // Outside a sandbox (tests, a host), anyone who may signal the agent stops it.
        assert!(counts(false, 57));
    }
}
