//! `cargo xtask bench`: the benchmark suite.
//!
//! - `bench <part>... [args]` and `bench all [args]` run parts (each a crate's benchmark
//!   program, built and run in release mode; the gateway's parts share one program and one
//!   gateway), write each part's report to `benchmarks/results/<date>/<part>.json` with the
//!   machine in `machine.json`, and regenerate the tables and chart in `benchmarks/README.md`.
//!   `args` go to every program (`--runs N`, ...); `--quick` is a small smoke run written to
//!   `<target>/bench-quick/` instead, leaving the committed results alone.
//! - `bench compare [part...] [--fresh DIR] [--against DIR] [args]`: the regression guard
//!   ([`compare`]).
//! - `bench readme`: regenerates the README's tables and chart from the results on disk.
//!
//! Each program measures Coppice and its floors in the same run and prints JSON; xtask only
//! runs, files, tabulates and compares it. A report's `figures` are what it is judged by
//! (`benchmarks/support/stats.rs`, `Figure`).

mod compare;
mod report;

#[path = "../../../benchmarks/support/stats.rs"]
mod stats;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::project_root;

/// A benchmark program: an example of a crate, run in release mode, with the binaries it
/// drives built first and passed to it.
#[derive(Debug)]
struct Program {
    package: &'static str,
    example: &'static str,
    drives: &'static [Build],
    /// Takes `--part NAME` and prints `{"parts": {NAME: report}}`; otherwise it is one part
    /// and prints its report.
    multi_part: bool,
}

/// A binary a benchmark drives: built first, the way it ships, and passed to the benchmark
/// program as `<flag> <path>`.
#[derive(Debug)]
struct Build {
    package: &'static str,
    bin: &'static str,
    /// Cargo profile; its output directory has the same name.
    profile: &'static str,
    /// Statically linked for [`STATIC_TARGET`], as binaries bind-mounted into sandboxes are.
    static_link: bool,
    flag: &'static str,
}

/// The in-sandbox agent as it ships into sandboxes.
const AGENT: Build = Build {
    package: "coppice-envd-bin",
    bin: "coppice-envd",
    profile: "agent",
    static_link: true,
    flag: "--agent",
};

/// The gateway as it ships.
const GATEWAY: Build = Build {
    package: "coppice-gateway",
    bin: "coppice-gateway",
    profile: "release",
    static_link: false,
    flag: "--gateway",
};

const JAIL: Program = Program {
    package: "coppice-jail",
    example: "jail-bench",
    drives: &[],
    multi_part: false,
};

const ENVD: Program = Program {
    package: "coppice-envd",
    example: "envd-bench",
    drives: &[AGENT],
    multi_part: false,
};

/// Event recording and webhook delivery at the library level (`coppice-events`).
const WEBHOOKS: Program = Program {
    package: "coppice-events",
    example: "webhooks-bench",
    drives: &[],
    multi_part: false,
};

/// The gateway over its public API (`bins/coppice-gateway/examples/api-bench`).
const API: Program = Program {
    package: "coppice-gateway",
    example: "api-bench",
    drives: &[GATEWAY, AGENT],
    multi_part: true,
};

/// Every part, in the order `all` runs them: the backends and libraries alone, then the gateway (density
/// and scale last, since they fill the machine). A new part is a line here (and, for a new program, a
/// `Program` above).
const PARTS: &[(&str, &Program)] = &[
    ("jail", &JAIL),
    ("envd", &ENVD),
    ("webhooks", &WEBHOOKS),
    ("create", &API),
    ("pause", &API),
    ("wake", &API),
    ("code", &API),
    ("interpreter", &API),
    ("files", &API),
    ("proxy", &API),
    ("control", &API),
    ("net", &API),
    ("density", &API),
    ("scale", &API),
];

/// `api`, the name the gateway issue gave its benchmark: create → first output at cc 1, 10
/// and 50, and the control-plane rate.
const API_ALIAS: (&str, &[&str]) = ("api", &["create", "control"]);

/// Parts whose floors run `bwrap`.
const NEEDS_BWRAP: &[&str] = &["jail", "create"];

/// What `--quick` stands for: enough samples to see that every part works, not to judge it.
const QUICK: &[&str] = &[
    "--runs",
    "10",
    "--rounds10",
    "2",
    "--rounds50",
    "1",
    "--stage-runs",
    "5",
    "--rate-secs",
    "1",
    "--density",
    "50",
    "--sandboxes",
    "20,60",
    "--live",
    "40",
    "--bursts",
    "1",
    "--burst-cc",
    "10",
    "--cycles",
    "50",
    "--warmup-cycles",
    "5",
    "--check",
    "10",
    "--jail-baseline",
    "20",
    "--net-runs",
    "2",
    "--net-rounds50",
    "1",
    "--net-secs",
    "0.5",
    "--net-gets",
    "200",
];

/// The target triple static binaries are built for.
const STATIC_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Usage text for the parts.
pub(crate) fn usage() -> String {
    let names: Vec<&str> = PARTS.iter().map(|(n, _)| *n).collect();
    format!(
        "bench <part>...|all [--quick] [args]   run benchmarks: {} (api = create control)\n  \
         bench compare [part...] [--fresh DIR] [--against DIR] [args]\n                      \
         \x20               a fresh run against the last committed results\n  \
         bench readme                       regenerate benchmarks/README.md from results",
        names.join(", ")
    )
}

pub(crate) fn run(args: &[&str]) -> Result<(), String> {
    match args {
        ["compare", rest @ ..] => compare::run(rest),
        ["readme"] => report::refresh(&results_root()),
        _ => {
            let (parts, mut rest) = parts_and_args(args)?;
            let quick = rest.contains(&"--quick");
            rest.retain(|a| *a != "--quick");
            if quick {
                let mut args = QUICK.to_vec();
                args.extend(rest);
                let dir = target_dir().join("bench-quick").join(today()?);
                run_parts(&parts, &args, &dir)?;
                eprintln!(
                    "quick run: results in {} (not filed, README untouched)",
                    dir.display()
                );
                return Ok(());
            }
            let dir = results_root().join(today()?);
            let outcome = run_parts(&parts, &rest, &dir);
            // The README shows whatever did get measured, even if a part failed.
            report::refresh(&results_root())?;
            outcome
        }
    }
}

/// Splits leading part names (`all` is every part) from the arguments for the programs.
fn parts_and_args<'a>(args: &[&'a str]) -> Result<(Vec<&'static str>, Vec<&'a str>), String> {
    let mut parts = Vec::new();
    let mut i = 0;
    while let Some(word) = args.get(i).filter(|a| !a.starts_with("--")) {
        if *word == "all" {
            parts.extend(PARTS.iter().map(|(n, _)| *n));
        } else if *word == API_ALIAS.0 {
            parts.extend(API_ALIAS.1);
        } else {
            let (name, _) = PARTS.iter().find(|(n, _)| n == word).ok_or_else(|| {
                format!(
                    "unknown benchmark part {word:?}\n\nusage: cargo xtask {}",
                    usage()
                )
            })?;
            parts.push(*name);
        }
        i += 1;
    }
    if parts.is_empty() {
        return Err(format!("which part?\n\nusage: cargo xtask {}", usage()));
    }
    parts.dedup();
    Ok((parts, args[i..].to_vec()))
}

/// `benchmarks/results`, where runs are filed one directory per date.
fn results_root() -> PathBuf {
    project_root().join("benchmarks/results")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| project_root().join("target"))
}

/// Runs `parts` (consecutive parts of one program in one run of it) with `args`, writing
/// `<part>.json` for each part that produced a report and `machine.json` into `dir`. Fails
/// after writing what it can if any part failed.
fn run_parts(parts: &[&str], args: &[&str], dir: &Path) -> Result<(), String> {
    if parts.iter().any(|p| NEEDS_BWRAP.contains(p)) {
        ensure_bwrap()?;
    }
    fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let started = now()?;
    let machine = stats::machine();
    let mut failures = Vec::new();
    let mut done = Vec::new();
    let mut i = 0;
    while i < parts.len() {
        let program = program_of(parts[i]);
        let mut group = vec![parts[i]];
        while program.multi_part
            && parts
                .get(i + group.len())
                .is_some_and(|p| std::ptr::eq(program_of(p), program))
        {
            group.push(parts[i + group.len()]);
        }
        i += group.len();
        match run_program(program, &group, args) {
            Ok(reports) => {
                for (part, report) in reports {
                    if let Some(error) = report.get("error") {
                        failures.push(format!("{part}: {error}"));
                        continue;
                    }
                    let file = dir.join(format!("{part}.json"));
                    write_json(&file, &report)?;
                    println!(
                        "{part}: {}",
                        report["summary"].as_str().unwrap_or("(no summary)")
                    );
                    eprintln!("wrote {}", file.display());
                    done.push(part);
                }
            }
            Err(e) => failures.push(format!("{}: {e}", group.join(", "))),
        }
    }
    let loadavg_end = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let machine_file = serde_json::json!({
        "machine": machine,
        "started": started,
        "finished": now()?,
        "loadavg_at_end": loadavg_end.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        "parts": done,
        "args": args,
    });
    write_json(&dir.join("machine.json"), &machine_file)?;
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "benchmark parts failed:\n  {}",
            failures.join("\n  ")
        ))
    }
}

fn program_of(part: &str) -> &'static Program {
    PARTS
        .iter()
        .find(|(n, _)| *n == part)
        .map_or(&JAIL, |(_, p)| *p)
}

/// Runs `program` for `parts`; returns each part's report. A program that failed but
/// printed reports still returns them (its failed parts carry `error`).
fn run_program(
    program: &Program,
    parts: &[&str],
    args: &[&str],
) -> Result<Vec<(String, serde_json::Value)>, String> {
    let mut paths = Vec::new();
    for build in program.drives {
        paths.push((build.flag, self::build(build)?));
    }
    let mut cmd_args = vec![
        "run",
        "--release",
        "--quiet",
        "-p",
        program.package,
        "--example",
        program.example,
        "--",
    ];
    for (flag, path) in &paths {
        cmd_args.extend([*flag, path.as_str()]);
    }
    if program.multi_part {
        for part in parts {
            cmd_args.extend(["--part", part]);
        }
    }
    cmd_args.extend_from_slice(args);
    eprintln!("$ cargo {}", cmd_args.join(" "));
    let out = Command::new(env!("CARGO"))
        .args(&cmd_args)
        .current_dir(project_root())
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", program.example))?;
    let printed: Option<serde_json::Value> = serde_json::from_slice(&out.stdout).ok();
    let reports: Vec<(String, serde_json::Value)> = match (program.multi_part, printed) {
        (true, Some(v)) => parts
            .iter()
            .filter_map(|p| Some(((*p).to_owned(), v["parts"].get(p)?.clone())))
            .collect(),
        (false, Some(v)) if out.status.success() => vec![(parts[0].to_owned(), v)],
        _ => Vec::new(),
    };
    if reports.is_empty() && !out.status.success() {
        return Err(format!("{} failed: {}", program.example, out.status));
    }
    Ok(reports)
}

/// Builds `b` and returns the path of its binary.
fn build(b: &Build) -> Result<String, String> {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args([
        "build",
        "--profile",
        b.profile,
        "--quiet",
        "-p",
        b.package,
        "--bin",
        b.bin,
    ])
    .current_dir(project_root());
    let mut dir = target_dir();
    if b.static_link {
        // With an explicit --target the static build gets its own directory, so its
        // RUSTFLAGS never invalidate the host build's artifacts.
        cmd.args(["--target", STATIC_TARGET])
            .env("RUSTFLAGS", "-C target-feature=+crt-static");
        dir.push(STATIC_TARGET);
    }
    eprintln!(
        "$ cargo build --profile {} -p {} --bin {}{}",
        b.profile,
        b.package,
        b.bin,
        if b.static_link {
            format!(" --target {STATIC_TARGET} (+crt-static)")
        } else {
            String::new()
        }
    );
    let status = cmd
        .status()
        .map_err(|e| format!("cannot build {}: {e}", b.package))?;
    if !status.success() {
        return Err(format!("building {} failed: {status}", b.package));
    }
    Ok(dir.join(b.profile).join(b.bin).display().to_string())
}

/// Installs Debian's bubblewrap when it is missing (the start-time floor runs it).
fn ensure_bwrap() -> Result<(), String> {
    let present = Command::new("bwrap")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    crate::ci::install_debian_packages(&["bubblewrap"])?;
    let present = Command::new("bwrap")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        Ok(())
    } else {
        Err("bwrap is missing and could not be installed (apt-get install bubblewrap)".into())
    }
}

fn write_json(file: &Path, value: &serde_json::Value) -> Result<(), String> {
    let pretty = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    fs::write(file, pretty + "\n").map_err(|e| format!("write {}: {e}", file.display()))
}

fn date(format: &str) -> Result<String, String> {
    let out = Command::new("date")
        .args(["-u", format])
        .output()
        .map_err(|e| format!("date: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

pub(crate) fn today() -> Result<String, String> {
    date("+%Y-%m-%d")
}

fn now() -> Result<String, String> {
    date("+%Y-%m-%dT%H:%M:%SZ")
}

/// The reports of a results directory: `<part>.json` for every known part present.
fn load_dir(dir: &Path) -> Result<Vec<(String, serde_json::Value)>, String> {
    let mut out = Vec::new();
    for (part, _) in PARTS {
        let file = dir.join(format!("{part}.json"));
        if !file.exists() {
            continue;
        }
        let text =
            fs::read_to_string(&file).map_err(|e| format!("read {}: {e}", file.display()))?;
        let v = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
        out.push(((*part).to_owned(), v));
    }
    Ok(out)
}

/// Whether `name` looks like a run directory (`YYYY-MM-DD`).
fn is_date(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 10
        && b.iter().enumerate().all(|(i, c)| {
            if i == 4 || i == 7 {
                *c == b'-'
            } else {
                c.is_ascii_digit()
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_names_and_program_args_split() {
        let (parts, rest) = parts_and_args(&["create", "pause", "--runs", "5"]).unwrap();
        assert_eq!(parts, ["create", "pause"]);
        assert_eq!(rest, ["--runs", "5"]);
        let (parts, rest) = parts_and_args(&["all"]).unwrap();
        assert_eq!(parts.len(), PARTS.len());
        assert!(rest.is_empty());
        let (parts, _) = parts_and_args(&["api"]).unwrap();
        assert_eq!(parts, ["create", "control"]);
        let unknown = parts_and_args(&["nope"]).unwrap_err();
        assert!(unknown.contains("unknown benchmark part"), "{unknown}");
        let none = parts_and_args(&["--runs", "5"]).unwrap_err();
        assert!(none.contains("which part"), "{none}");
    }

    #[test]
    fn run_directories_are_dates() {
        assert!(is_date("2026-11-23"));
        assert!(!is_date("api"));
        assert!(!is_date("2026-11-2x"));
    }
}
