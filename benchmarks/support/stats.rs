//! What every benchmark program reports: percentiles of its samples and the machine it ran on.
//!
//! Included by path (`#[path = ".../benchmarks/support/stats.rs"] mod stats;`) into the
//! benchmark examples of several crates, which cannot share a module otherwise.

// Each benchmark uses part of this file.
#![allow(dead_code)]

use std::time::Duration;

/// Percentiles and extremes of a set of timings, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stats {
    pub(crate) p50: f64,
    pub(crate) p95: f64,
    pub(crate) p99: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
    pub(crate) mean: f64,
}

impl Stats {
    /// Sorts `samples` and summarises them (nearest-rank percentiles).
    pub(crate) fn of(samples: &mut [Duration]) -> Self {
        samples.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let pick = |pct: usize| ms(samples[(samples.len() - 1) * pct / 100]);
        #[allow(clippy::cast_precision_loss, reason = "sample counts are small")]
        let n = samples.len() as f64;
        Self {
            p50: pick(50),
            p95: pick(95),
            p99: pick(99),
            min: ms(samples[0]),
            max: ms(samples[samples.len() - 1]),
            mean: samples.iter().map(|d| ms(*d)).sum::<f64>() / n,
        }
    }

    /// The summary as JSON.
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "p50": self.p50, "p95": self.p95, "p99": self.p99,
            "min": self.min, "max": self.max, "mean": self.mean,
        })
    }
}

/// What this run ran on, and how busy it was when it started.
pub(crate) fn machine() -> serde_json::Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|s| s.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|s| s.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0);
    let loadavg = read("/proc/loadavg");
    serde_json::json!({
        "cpu": model,
        "cpus": cpus,
        "memory_gib": mem_kib / (1024 * 1024),
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "loadavg_at_start": loadavg.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    })
}

/// The namespace floor, measured the same way by every benchmark: `unshare --fork --pid
/// --mount --net --uts --ipc --mount-proc true`, from spawn to exit.
pub(crate) fn unshare_true() -> Result<Duration, Box<dyn std::error::Error + Send + Sync>> {
    let t = std::time::Instant::now();
    let status = std::process::Command::new("unshare")
        .args([
            "--fork",
            "--pid",
            "--mount",
            "--net",
            "--uts",
            "--ipc",
            "--mount-proc",
            "true",
        ])
        .stdin(std::process::Stdio::null())
        .status()?;
    let elapsed = t.elapsed();
    if !status.success() {
        return Err(format!("unshare baseline failed: {status}").into());
    }
    Ok(elapsed)
}

/// The process floor: a plain fork+exec of `program args`, until its first output byte.
pub(crate) fn fork_exec_to_first_byte(
    program: &str,
    args: &[&str],
) -> Result<Duration, Box<dyn std::error::Error + Send + Sync>> {
    use std::io::Read;
    let t = std::time::Instant::now();
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut byte = [0u8; 1];
    let mut out = child.stdout.take().ok_or("no stdout")?;
    out.read_exact(&mut byte)?;
    let elapsed = t.elapsed();
    child.wait()?;
    Ok(elapsed)
}
