//! `coppice-gateway`: E2B's API on your own machine. See the README and `docs/api.md`.
//!
//! Invoked as `coppice-envd` (which is how sandboxes start their agent when no separate agent
//! binary is configured) it runs the in-sandbox agent instead.

#![allow(clippy::print_stderr)]

use std::process::ExitCode;

use coppice_gateway::config::Config;

fn main() -> ExitCode {
    let mut args = std::env::args();
    let argv0 = args.next().unwrap_or_default();
    if argv0.rsplit('/').next() == Some(coppice_gateway::AGENT_NAME) {
        return coppice_envd::agent::main(args);
    }
    let config = match Config::from_args_and_env(args, |k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(64);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("COPPICE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
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
    match rt.block_on(coppice_gateway::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("coppice-gateway: {e}");
            ExitCode::FAILURE
        }
    }
}
