//! `coppice-gateway`: E2B's API on your own machine. See the README and `docs/api.md`.
//!
//! Invoked as `coppice-envd` (which is how sandboxes start their agent when no separate agent
//! binary is configured) it runs the in-sandbox agent instead.

#![allow(clippy::print_stderr, clippy::print_stdout)]

use std::process::ExitCode;

use coppice_gateway::config::{Config, LogFormat};

fn main() -> ExitCode {
    let mut args = std::env::args();
    let argv0 = args.next().unwrap_or_default();
    if argv0.rsplit('/').next() == Some(coppice_gateway::AGENT_NAME) {
        return coppice_envd::agent::main(args);
    }
    // A bare flag, unlike the others (which take a value).
    let mut args: Vec<String> = args.collect();
    let before = args.len();
    args.retain(|a| a != "--check-config");
    let check_only = args.len() != before;
    let config = match Config::from_args_and_env(args.into_iter(), |k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(64);
        }
    };
    if check_only {
        return match coppice_gateway::check_config(&config) {
            Ok(summary) => {
                print!("{summary}");
                ExitCode::SUCCESS
            }
            Err(problems) => {
                eprintln!("coppice-gateway: the configuration will not work:\n{problems}");
                // EX_CONFIG
                ExitCode::from(78)
            }
        };
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("COPPICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => logs.json().init(),
        // Colour only on a terminal: a log file or the journal gets plain text.
        LogFormat::Text => logs
            .with_ansi(colour_logs(|k| std::env::var_os(k).is_some()))
            .init(),
    }
    raise_open_files_limit();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match rt.block_on(coppice_gateway::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("coppice-gateway: {e}");
            ExitCode::FAILURE
        }
    };
    // A template build still running (`code-interpreter-v1` builds in the background for
    // minutes) must not hold up a stop: dropping the runtime would wait for it. Its helper
    // processes die with this process (they are PID 1 of their own PID namespace, with a
    // parent-death signal), and the next start builds it again.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}

/// Whether log lines carry ANSI colours: only when stderr is a terminal and `NO_COLOR`
/// (<https://no-color.org>) is unset.
fn colour_logs(set: impl Fn(&str) -> bool) -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr()) && !set("NO_COLOR")
}

/// Raises the soft open-files limit to the hard one. Every data-plane request in flight holds
/// two descriptors (the client's connection and the agent's), and the soft limit a shell or a
/// systemd service starts with (1024) would cap a host of a thousand sandboxes at about 500
/// open streams; the hard limit is what the administrator allows. Sandboxes inherit the
/// raised limit.
fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(soft, hard, error = %e, "cannot raise the open-files limit");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-files limit"),
    }
}
