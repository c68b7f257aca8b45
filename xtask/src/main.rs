//! Project automation, run as `cargo xtask <command>` (the cargo-xtask pattern).
//!
//! - `ci`: installs what the tests need on a fresh Debian machine, then fmt, clippy, test, the
//!   E2B SDK suite (`e2e`) and cargo-deny — the one command `.ci/run` and the README name.
//! - `tidy`: repository rules as code (crate docs, lint inheritance, dependency direction);
//!   also runs as a `#[test]`.
//! - `bench <part>...|all|compare|readme`: the benchmark suite; results under
//!   `benchmarks/results/<date>/`, tables and chart in `benchmarks/README.md`.
//! - `e2e [pytest args | js [node args]]`: the E2B SDK suites, Python in `tests/e2e/` and
//!   JavaScript in `tests/e2e-js/`, against a real gateway.
//! - `smoke <name>`: a receipt of a feature through the real SDK, with its timings, under
//!   `benchmarks/results/`.
#![allow(clippy::print_stdout, clippy::print_stderr, clippy::disallowed_methods)]

mod bench;
mod ci;
mod e2e;
mod smoke;
mod tidy;

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["ci", rest @ ..] => ci::run(rest),
        ["tidy"] => tidy::run(&project_root()),
        ["bench", rest @ ..] => bench::run(rest),
        ["e2e", rest @ ..] => e2e::run(rest),
        ["smoke", name] => smoke::run(name),
        _ => {
            eprintln!(
                "usage: cargo xtask <command>\n\n\
                 commands:\n  \
                 ci [--no-install]   install test dependencies, then fmt, clippy, test, e2e, deny\n  \
                 tidy                check repository rules\n  \
                 e2e [pytest args]   the E2B SDK suites (tests/e2e, tests/e2e-js) against a real gateway\n  \
                 e2e js [node args]  the JS SDK suite (tests/e2e-js) alone\n  \
                 smoke <name>        a receipt through the real SDK: {}\n  \
                 {}",
                smoke::NAMES.join(", "),
                bench::usage()
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (xtask lives one level below it).
fn project_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// Runs a command in the project root, echoing it; fails on a non-zero exit.
fn run_cmd(program: &str, args: &[&str]) -> Result<(), String> {
    eprintln!("$ {program} {}", args.join(" "));
    let status = std::process::Command::new(program)
        .args(args)
        .current_dir(project_root())
        .status()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{program} {} failed: {status}", args.join(" ")))
    }
}
