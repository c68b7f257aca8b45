//! `coppice`, the operator's command: what a Coppice gateway holds (sandboxes, events,
//! webhooks, templates, snapshots, warm pools, keys), read and changed through the gateway's
//! HTTP API only, and `doctor`, a check of the host the gateway runs on.
//!
//! Output is a table for people by default and the API's own JSON with `--json`. Errors are
//! one line on stderr; a route the gateway does not serve yet is named as such, so a command
//! whose server side is missing says what is missing instead of failing obscurely.
//!
//! The binary is a thin `main` over [`run`], which takes its arguments, environment and
//! output streams as values so that tests drive it in-process against a real gateway.
//!
//! **Invariant:** everything but `doctor` goes through the gateway's public HTTP API, with
//! the caller's key: the command can do nothing an SDK with the same key could not.

mod args;
mod client;
mod commands;
mod doctor;
mod output;

use std::io::Write;

pub use args::USAGE;

/// Exit status of a command that ran and did what it was asked.
pub const EXIT_OK: u8 = 0;
/// Exit status when the gateway refused or the work failed.
pub const EXIT_FAILED: u8 = 1;
/// Exit status for a command line that does not parse.
pub const EXIT_USAGE: u8 = 2;

/// Runs the command line `args` (without the program name) with the environment `env`
/// (`COPPICE_URL`, `E2B_API_URL`, `COPPICE_API_KEY`, `E2B_API_KEY`), writing results to
/// `out` and messages to `err`; returns the exit status.
pub fn run(
    args: Vec<String>,
    env: &dyn Fn(&str) -> Option<String>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> u8 {
    let parsed = match args::Invocation::parse(args, env) {
        Ok(p) => p,
        Err(args::ParseError::Help) => {
            let _ = out.write_all(USAGE.as_bytes());
            return EXIT_OK;
        }
        Err(args::ParseError::Usage(msg)) => {
            let _ = writeln!(err, "coppice: {msg}\n\n{USAGE}");
            return EXIT_USAGE;
        }
    };
    let result = commands::dispatch(&parsed, out, err);
    let _ = out.flush();
    match result {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(err, "coppice: {e}");
            EXIT_FAILED
        }
    }
}
