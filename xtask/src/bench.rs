//! `cargo xtask bench <name>`: runs a crate's benchmark program in release mode, stores its
//! JSON under `benchmarks/results/<name>/<date>.json` and refreshes that benchmark's line in
//! `benchmarks/README.md`.
//!
//! Each benchmark program measures Coppice and its baseline in the same run and prints one
//! JSON object on stdout; xtask only runs, files and summarises it.

use std::fs;
use std::process::Command;

use crate::project_root;

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

/// Benchmarks this command knows: `(name, package, example program, binaries it drives)`.
const BENCHES: &[(&str, &str, &str, &[Build])] = &[
    ("jail", "coppice-jail", "jail-bench", &[]),
    ("envd", "coppice-envd", "envd-bench", &[AGENT]),
    ("api", "coppice-gateway", "api-bench", &[GATEWAY, AGENT]),
    ("webhooks", "coppice-events", "webhooks-bench", &[]),
];

/// The target triple static binaries are built for.
const STATIC_TARGET: &str = "x86_64-unknown-linux-gnu";

/// The names, for usage text.
pub(crate) const NAMES: &[&str] = &["jail", "envd", "api", "webhooks"];

pub(crate) fn run(name: &str, args: &[&str]) -> Result<(), String> {
    let Some((_, package, example, drives)) = BENCHES.iter().find(|(n, ..)| *n == name) else {
        return Err(format!(
            "unknown benchmark {name:?}; known: {}",
            NAMES.join(", ")
        ));
    };
    let mut cmd_args = vec![
        "run",
        "--release",
        "--quiet",
        "-p",
        package,
        "--example",
        example,
        "--",
    ];
    let mut paths = Vec::new();
    for build in *drives {
        paths.push((build.flag, self::build(build)?));
    }
    for (flag, path) in &paths {
        cmd_args.extend([*flag, path.as_str()]);
    }
    cmd_args.extend_from_slice(args);
    eprintln!("$ cargo {}", cmd_args.join(" "));
    let out = Command::new(env!("CARGO"))
        .args(&cmd_args)
        .current_dir(project_root())
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run the {name} benchmark: {e}"))?;
    if !out.status.success() {
        return Err(format!("the {name} benchmark failed: {}", out.status));
    }
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("the {name} benchmark printed no JSON report: {e}"))?;
    let date = today()?;
    let dir = project_root().join("benchmarks/results").join(name);
    fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let file = dir.join(format!("{date}.json"));
    let pretty = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    fs::write(&file, pretty + "\n").map_err(|e| format!("write {}: {e}", file.display()))?;
    let summary = report["summary"]
        .as_str()
        .unwrap_or("(no summary)")
        .to_owned();
    update_readme(name, &date, &summary)?;
    println!("{summary}");
    eprintln!("wrote {}", file.display());
    Ok(())
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
    let mut dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| project_root().join("target"));
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

pub(crate) fn today() -> Result<String, String> {
    let out = Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map_err(|e| format!("date: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Replaces (or adds) the `| name | ... |` row of the results table.
fn update_readme(name: &str, date: &str, summary: &str) -> Result<(), String> {
    let path = project_root().join("benchmarks/README.md");
    let text = fs::read_to_string(&path).unwrap_or_default();
    let row = format!("| `{name}` | {date} | {summary} |");
    let prefix = format!("| `{name}` |");
    let mut replaced = false;
    let mut lines: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with(&prefix) {
                replaced = true;
                row.clone()
            } else {
                l.to_owned()
            }
        })
        .collect();
    if !replaced {
        lines.push(row);
    }
    fs::write(&path, lines.join("\n") + "\n").map_err(|e| format!("write {}: {e}", path.display()))
}
