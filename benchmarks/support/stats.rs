//! What every benchmark program reports: percentiles of its samples, its headline figures,
//! the machine it ran on, and the kernel floors measured the same way by all of them.
//!
//! Included by path (`#[path = ".../benchmarks/support/stats.rs"] mod stats;`) into the
//! benchmark examples of several crates, which cannot share a module otherwise, and into xtask
//! (for [`machine`]).

// Each benchmark uses part of this file.
#![allow(dead_code)]

use std::time::Duration;

/// The value after `name` (e.g. `--runs`) on this program's command line, if given.
pub(crate) fn arg(name: &str) -> Option<String> {
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == name {
            return args.next();
        }
    }
    None
}

/// The number after `name`, or `default` when it is not given.
pub(crate) fn num_arg<T>(
    name: &str,
    default: T,
) -> Result<T, Box<dyn std::error::Error + Send + Sync>>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    match arg(name) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|e| format!("{name} {v:?}: {e}").into()),
    }
}

/// Percentiles and extremes of a set of timings, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stats {
    pub(crate) p50: f64,
    pub(crate) p95: f64,
    pub(crate) p99: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
    pub(crate) mean: f64,
    pub(crate) n: usize,
}

impl Stats {
    /// Sorts `samples` and summarises them (nearest-rank percentiles). `samples` must not be
    /// empty.
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
            n: samples.len(),
        }
    }

    /// The summary as JSON.
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "p50": self.p50, "p95": self.p95, "p99": self.p99,
            "min": self.min, "max": self.max, "mean": self.mean, "n": self.n,
        })
    }
}

/// One headline figure of a report: what `cargo xtask bench` tabulates in the README, draws,
/// and compares between runs (its median: `p50`, or `value` for a single number).
///
/// In the report it is one element of the `figures` array: `id` (`<part>.<name>`, stable
/// across runs), `what`, `unit`, `better` (`lower` or `higher`), then either `p50`/`p95`/`p99`/
/// `n` or `value`, and optionally `kind: "baseline"`, `floors` (the kernel floor it is compared
/// with and the ratio), `target` and `note`.
#[derive(Debug, Clone)]
pub(crate) struct Figure(serde_json::Map<String, serde_json::Value>);

impl Figure {
    /// A latency in milliseconds, lower is better.
    pub(crate) fn latency(id: &str, what: &str, s: &Stats) -> Self {
        let mut m = serde_json::Map::new();
        m.insert("id".into(), id.into());
        m.insert("what".into(), what.into());
        m.insert("unit".into(), "ms".into());
        m.insert("better".into(), "lower".into());
        m.insert("p50".into(), s.p50.into());
        m.insert("p95".into(), s.p95.into());
        m.insert("p99".into(), s.p99.into());
        m.insert("n".into(), s.n.into());
        Self(m)
    }

    /// A single number in `unit`.
    pub(crate) fn value(
        id: &str,
        what: &str,
        unit: &str,
        value: f64,
        higher_is_better: bool,
    ) -> Self {
        let mut m = serde_json::Map::new();
        m.insert("id".into(), id.into());
        m.insert("what".into(), what.into());
        m.insert("unit".into(), unit.into());
        m.insert(
            "better".into(),
            if higher_is_better { "higher" } else { "lower" }.into(),
        );
        m.insert("value".into(), value.into());
        Self(m)
    }

    /// Marks a floor measured in the same run (it is context, not a result of ours).
    pub(crate) fn baseline(mut self) -> Self {
        self.0.insert("kind".into(), "baseline".into());
        self
    }

    /// Adds a floor measured in the same run and the ratio of our median to it.
    pub(crate) fn floor(mut self, what: &str, floor_p50: f64) -> Self {
        let ours = self.0.get("p50").or_else(|| self.0.get("value"));
        let ratio = ours
            .and_then(serde_json::Value::as_f64)
            .map(|v| v / floor_p50);
        let entry = serde_json::json!({ "what": what, "p50": floor_p50, "ratio": ratio });
        match self
            .0
            .get_mut("floors")
            .and_then(serde_json::Value::as_array_mut)
        {
            Some(list) => list.push(entry),
            None => {
                self.0.insert("floors".into(), vec![entry].into());
            }
        }
        self
    }

    /// The target this figure is held to (e.g. `p50 ≤ 15 ms`) and whether this run met it.
    pub(crate) fn target(mut self, text: &str, met: bool) -> Self {
        self.0.insert(
            "target".into(),
            serde_json::json!({ "text": text, "met": met }),
        );
        self
    }

    /// A short qualification shown next to the figure.
    pub(crate) fn note(mut self, text: &str) -> Self {
        self.0.insert("note".into(), text.into());
        self
    }

    /// Whether the target, if any, was met.
    pub(crate) fn met(&self) -> Option<bool> {
        self.0.get("target")?.get("met")?.as_bool()
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::Value::Object(self.0.clone())
    }
}

/// The `figures` array and the `targets` map (`id` → met) of a report.
pub(crate) fn figures_json(figures: &[Figure]) -> (serde_json::Value, serde_json::Value) {
    let targets: serde_json::Map<String, serde_json::Value> = figures
        .iter()
        .filter_map(|f| {
            let id = f.0.get("id")?.as_str()?.to_owned();
            Some((id, f.met()?.into()))
        })
        .collect();
    (
        figures.iter().map(Figure::json).collect::<Vec<_>>().into(),
        targets.into(),
    )
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
    spawn_to_exit(
        "unshare",
        &[
            "--fork",
            "--pid",
            "--mount",
            "--net",
            "--uts",
            "--ipc",
            "--mount-proc",
            "true",
        ],
    )
}

/// The same floor through Debian's bubblewrap, as a container tool would start a sandbox:
/// new pid, net, uts, ipc and mount namespaces, the host root read-only, a fresh `/proc` and
/// `/dev`, then `true`.
pub(crate) fn bwrap_true() -> Result<Duration, Box<dyn std::error::Error + Send + Sync>> {
    spawn_to_exit(
        "bwrap",
        &[
            "--unshare-pid",
            "--unshare-net",
            "--unshare-uts",
            "--unshare-ipc",
            "--ro-bind",
            "/",
            "/",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "true",
        ],
    )
}

/// How long `program args` takes from spawn to a successful exit.
fn spawn_to_exit(
    program: &str,
    args: &[&str],
) -> Result<Duration, Box<dyn std::error::Error + Send + Sync>> {
    let t = std::time::Instant::now();
    let status = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let elapsed = t.elapsed();
    if !status.success() {
        return Err(format!("{program} baseline failed: {status}").into());
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
