//! `cargo xtask bench <part>`: the gateway driven over its public HTTP API the way the E2B SDK
//! drives it, on loopback, one part or several per run:
//!
//! | part | what |
//! |---|---|
//! | `create` | create → first command output at concurrency 1, 10, 50, against `unshare`, `bwrap` and fork+exec ([`create`]) |
//! | `pause` | pause, and resume to usable ([`lifecycle`]) |
//! | `wake` | auto-resume: a paused sandbox's first output on traffic ([`lifecycle`]) |
//! | `code` | `run_code("x+1")` in a warm context ([`data`]) |
//! | `interpreter` | `run_code("x+1")` warm on IPython and on the plain driver, the first `run_code` in a fresh sandbox (python, javascript; warm pool and none), memory per idle code-interpreter sandbox with and without its python ([`interpreter`]) |
//! | `files` | a 1 MiB file written and read back ([`data`]) |
//! | `proxy` | the same envd call through the gateway and straight to the agent ([`data`]) |
//! | `control` | `GET /sandboxes/{id}` rate and latency on 64 connections ([`control`]) |
//! | `density` | idle sandboxes until 1000 or a limit; memory each; all still answer ([`density`]) |
//! | `scale` | 1,000 and 10,000 live: re-adoption after `kill -9`, teardown rate, memory each, create bursts with 5,000 live, kernel memory over 5,000 cycles ([`scale`]) |
//! | `net` | sandbox networking: create → first output on and off, throughput and NAT connection rate to a fake internet against a bare veth pair, ingress proxy overhead ([`net`]) |
//!
//! `--gateway PATH` (a release build, required) is started on 127.0.0.1:0 with its own state
//! directory and `--sandbox-network off` by the first part that needs it, and serves every
//! part of the run after it (`scale` and `net` start their own, `interpreter` one more with `--warm-pool 0`); `--agent PATH` is the agent its sandboxes
//! run (default: the gateway binary's built-in one). `--part NAME` (repeatable, or a comma
//! list; default all), `--runs N` samples per figure (default 100), `--rounds10 N` /
//! `--rounds50 N` rounds at cc=10/50 (10, 3), `--stage-runs N` (50), `--rate-secs S` (3),
//! `--density N` (1000), `--cold-runs N` (20) and `--interp-sandboxes N` (20) for `interpreter`; `scale` has its own counts (`--sandboxes 1000,10000`, `--live 5000`,
//! `--cycles 5000`, ..., see [`scale`]), and so has `net` (`--net-runs`, `--net-secs`,
//! `--net-gets`, `--net-threads`, see [`net`]).
//!
//! `api-bench peer <mode> ...` is not a benchmark: it is the traffic program `net` runs in
//! namespaces and sandboxes ([`peer`]).
//!
//! Prints `{"parts": {"<part>": <report>, ...}}` on stdout (a part that failed reports
//! `{"error": ...}` and the exit status is non-zero); progress goes to stderr. Every sandbox
//! it created and the gateway are killed and the state directory removed — on success, on
//! error, and on Ctrl-C (the gateway has its own process group; this program catches the
//! signal and unwinds through the same cleanup).
// A benchmark program: it reports on stdout/stderr and waits on plain threads.
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::disallowed_methods,
    missing_docs
)]

#[path = "../../../../benchmarks/support/stats.rs"]
mod stats;

mod client;
mod control;
mod create;
mod data;
mod density;
mod gateway;
mod interpreter;
mod lifecycle;
mod namespaces;
mod net;
mod orphans;
mod peer;
mod scale;

use std::path::PathBuf;
use std::sync::OnceLock;

use client::{BoxError, Res};
use gateway::GatewayProc;
use stats::{figures_json, machine, Figure};

/// A plain sandbox, as `Sandbox.create()` of SDK 2.63 asks for one.
pub(crate) const BASE: &str = r#"{"templateID":"base","metadata":{},"envVars":{}}"#;
/// Samples taken and thrown away before each measurement.
pub(crate) const WARMUP: usize = 5;

/// Measures one part.
type Part = fn(&Ctx<'_>) -> Res<Report>;

/// The parts, in the order a full run takes them (density and scale last: they fill the machine).
const PARTS: &[(&str, Part)] = &[
    ("create", create::run),
    ("pause", lifecycle::run_pause),
    ("wake", lifecycle::run_wake),
    ("code", data::run_code),
    ("interpreter", interpreter::run),
    ("files", data::run_files),
    ("proxy", data::run_proxy),
    ("control", control::run),
    ("density", density::run),
    ("net", net::run),
    ("scale", scale::run),
];

#[derive(Debug)]
pub(crate) struct Opts {
    pub(crate) gateway: PathBuf,
    pub(crate) agent: Option<PathBuf>,
    pub(crate) runs: usize,
    pub(crate) rounds10: usize,
    pub(crate) rounds50: usize,
    pub(crate) rate_secs: u64,
    pub(crate) stage_runs: usize,
    pub(crate) density: usize,
    pub(crate) cold_runs: usize,
    pub(crate) interp_sandboxes: usize,
    pub(crate) scale: scale::ScaleOpts,
    pub(crate) net: net::NetOpts,
}

/// What a part runs against.
pub(crate) struct Ctx<'a> {
    pub(crate) rt: &'a tokio::runtime::Runtime,
    pub(crate) opts: &'a Opts,
    /// The gateway the parts share, once a part has asked for it.
    shared: &'a OnceLock<GatewayProc>,
}

impl Ctx<'_> {
    /// The gateway the parts share: started (and waited for) by the first part that asks.
    pub(crate) fn gw(&self) -> Res<&GatewayProc> {
        if let Some(gw) = self.shared.get() {
            return Ok(gw);
        }
        let agent = self.opts.agent.as_ref().unwrap_or(&self.opts.gateway);
        eprintln!(
            "api bench: gateway {} with agent {}",
            self.opts.gateway.display(),
            agent.display()
        );
        let gw = GatewayProc::spawn(&self.opts.gateway, agent, &[])?;
        // On failure `gw` is dropped here, which cleans up after it.
        gw.wait_ready()?;
        Ok(self.shared.get_or_init(|| gw))
    }
}

/// What a part measured: its headline figures, one line, and everything else.
pub(crate) struct Report {
    pub(crate) figures: Vec<Figure>,
    pub(crate) summary: String,
    pub(crate) details: serde_json::Value,
}

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).is_some_and(|a| a == "peer") {
        return peer::main(&args[2..]);
    }
    let num = |name: &str, default: usize| -> Res<usize> {
        let n = stats::num_arg(name, default)?;
        if n == 0 {
            return Err(format!("{name} must be at least 1").into());
        }
        Ok(n)
    };
    let opts = Opts {
        gateway: PathBuf::from(stats::arg("--gateway").ok_or("--gateway PATH is required")?),
        agent: stats::arg("--agent").map(PathBuf::from),
        runs: num("--runs", 100)?,
        rounds10: num("--rounds10", 10)?,
        rounds50: num("--rounds50", 3)?,
        rate_secs: u64::try_from(num("--rate-secs", 3)?)?,
        stage_runs: num("--stage-runs", 50)?,
        density: num("--density", 1000)?,
        cold_runs: num("--cold-runs", 20)?,
        interp_sandboxes: num("--interp-sandboxes", 20)?,
        scale: scale::ScaleOpts::from_args()?,
        net: net::NetOpts::from_args()?,
    };
    let mut wanted: Vec<&str> = args
        .iter()
        .enumerate()
        .filter(|(i, _)| *i > 0 && args[i - 1] == "--part")
        .flat_map(|(_, v)| v.split(','))
        .collect();
    if wanted.is_empty() {
        wanted = PARTS.iter().map(|(n, _)| *n).collect();
    }
    let mut parts = Vec::new();
    for name in &wanted {
        let part = PARTS.iter().find(|(n, _)| n == name).ok_or_else(|| {
            let known: Vec<&str> = PARTS.iter().map(|(n, _)| *n).collect();
            format!("unknown part {name:?}; known: {}", known.join(", "))
        })?;
        parts.push(*part);
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    client::catch_interrupts(&rt)?;
    let _lock = gateway::lock_exclusive()?;
    let hard = gateway::raise_nofile()?;
    let nofile = (gateway::DEFAULT_NOFILE, hard);
    let agent = opts.agent.clone().unwrap_or_else(|| opts.gateway.clone());
    eprintln!(
        "api bench: gateways get open files {} / {}",
        nofile.0, nofile.1
    );
    let shared = OnceLock::new();
    let mut out = serde_json::Map::new();
    let mut failed = Vec::new();
    let ctx = Ctx {
        rt: &rt,
        opts: &opts,
        shared: &shared,
    };
    for (name, run) in parts {
        let machine = machine();
        let report = match run(&ctx) {
            Ok(r) => {
                eprintln!("api bench: {name}: {}", r.summary);
                let (figures, targets) = figures_json(&r.figures);
                serde_json::json!({
                    "benchmark": name,
                    "machine": machine,
                    "gateway": opts.gateway.display().to_string(),
                    "agent": agent.display().to_string(),
                    "gateway_open_files": [nofile.0, nofile.1],
                    "figures": figures,
                    "targets": targets,
                    "summary": r.summary,
                    "details": r.details,
                })
            }
            Err(e) => {
                eprintln!("api bench: {name} failed: {e}");
                failed.push(name);
                serde_json::json!({ "benchmark": name, "machine": machine, "error": e.to_string() })
            }
        };
        out.insert(name.to_owned(), report);
        if client::check_interrupted().is_err() {
            break;
        }
    }
    let cleanup = match shared.into_inner() {
        Some(gw) => gw.shutdown(&rt),
        None => Ok(()),
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({ "parts": out }))?
    );
    cleanup?;
    client::check_interrupted()?;
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("failed: {}", failed.join(", ")).into())
    }
}

/// Creates a sandbox from `body` on the shared gateway, runs `f` on it with the
/// control-plane connection, and kills it whatever `f` returned.
pub(crate) fn with_sandbox<T>(
    ctx: &Ctx<'_>,
    body: &str,
    f: impl AsyncFnOnce(&mut client::Sender, &client::Sandbox) -> Res<T>,
) -> Res<T> {
    with_sandbox_on(ctx, ctx.gw()?, body, f)
}

/// [`with_sandbox`] on gateway `gw`.
pub(crate) fn with_sandbox_on<T>(
    ctx: &Ctx<'_>,
    gw: &GatewayProc,
    body: &str,
    f: impl AsyncFnOnce(&mut client::Sender, &client::Sandbox) -> Res<T>,
) -> Res<T> {
    let (addr, live) = (gw.addr()?, &gw.live);
    ctx.rt.block_on(async {
        let mut api = client::connect(addr).await?;
        let sbx = client::timeout(client::create(&mut api, live, body)).await?;
        let measured = f(&mut api, &sbx).await;
        let killed = client::timeout(client::delete(&mut api, live, &sbx.id)).await;
        let m = measured?;
        killed?;
        Ok(m)
    })
}

/// CPU time (user + system) `pid` has used so far, in ms.
pub(crate) fn process_cpu_ms(pid: u32) -> Res<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces; the fields after it do not.
    let rest = stat.rsplit_once(')').ok_or("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Res<u64> { Ok(fields.get(i).ok_or("short stat")?.parse()?) };
    // utime and stime are fields 14 and 15; `rest` starts at field 3. Ticks are 10 ms.
    Ok((ticks(11)? + ticks(12)?) * 10)
}
