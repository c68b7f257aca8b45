//! `cargo xtask bench api`: from `POST /v2/sandboxes` to the first stdout frame of
//! `process.Start` of `/bin/echo hi` through the gateway's data plane (the clock stops when the
//! sandbox is *usable*, not when the create call returns), at concurrency 1, 10 and 50; the
//! rate of `GET /sandboxes/{id}` over 64 keep-alive connections; and, in the same run,
//! interleaved with the cc=1 samples, the kernel floor: `unshare --fork --pid --mount --net
//! --uts --ipc --mount-proc true` and a plain fork+exec of `/bin/echo hi` to its first byte.
//!
//! A second part rebuilds what the gateway's runtime does for a create from the same backends
//! in this process, with a clock around each stage (root filesystem, run directory, jail
//! start, agent socket, `/init`, first command), so the report says where the time goes.
//!
//! `--gateway PATH` (release build, required) is started on 127.0.0.1:0 with a temporary state
//! directory under /var/tmp; `--agent PATH` is the static agent sandboxes should run. With
//! both, two gateways run side by side, one giving sandboxes the static agent and one the
//! agent built into the gateway binary, and are sampled alternately. `--runs N` cc=1 samples (default 100), `--rounds10 N`
//! (default 10), `--rounds50 N` (default 3), `--rate-secs S` (default 3), `--stage-runs N`
//! (default 50). Prints one JSON report on stdout; progress goes to stderr. Every sandbox it
//! created and the gateway are killed and the state directory removed, also on error.
// A benchmark program: it reports on stdout/stderr and waits on plain threads.
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::disallowed_methods,
    missing_docs
)]

#[path = "../../../benchmarks/support/stats.rs"]
mod stats;

use stats::{machine, Stats};
use std::collections::{HashSet, VecDeque};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use coppice_jail::{JailConfig, LinuxJail};
use coppice_lifecycle::backend::{
    BindMount, InitSpec, Isolation, JailSpec, LayerId, Limits, SandboxId, Storage,
};
use coppice_zfs::OverlayStorage;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

/// Held while our gateway runs, so the gateway integration tests never run next to it.
const LOCK_FILE: &str = "/tmp/coppice-gateway-tests.lock";
/// How long to wait for that lock before giving up.
const LOCK_WAIT: Duration = Duration::from_secs(15 * 60);
const TEMPLATE_CACHE: &str = "/var/cache/coppice/templates";
/// The command every sample runs, as in the envd benchmark.
const PROGRAM: &str = "/bin/echo";
const ARGS: [&str; 1] = ["hi"];
/// Upper bound on any one request or sample, so nothing here can hang.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections hammering `GET /sandboxes/{id}`.
const RATE_CONNECTIONS: usize = 64;
/// Samples taken and thrown away before each measurement (page cache, allocator, JIT-free
/// but not cold-free: the first sandboxes touch the template's inodes).
const WARMUP: usize = 3;
/// What the runtime gives every sandbox (`DEFAULT_LIMITS` in `api/sandboxes.rs`).
const LIMITS: Limits = Limits {
    memory_bytes: Some(1 << 30),
    pids: Some(4096),
    cpu_millis: Some(2000),
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, BoxError>;
type Sender = http1::SendRequest<Full<Bytes>>;

#[derive(Debug)]
struct Opts {
    gateway: PathBuf,
    agent: Option<PathBuf>,
    runs: usize,
    rounds10: usize,
    rounds50: usize,
    rate_secs: u64,
    stage_runs: usize,
}

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let num = |name: &str, default: usize| -> Res<usize> {
        let n = arg(name).map(|s| s.parse()).transpose()?.unwrap_or(default);
        if n == 0 {
            return Err(format!("{name} must be at least 1").into());
        }
        Ok(n)
    };
    let opts = Opts {
        gateway: PathBuf::from(arg("--gateway").ok_or("--gateway PATH is required")?),
        agent: arg("--agent").map(PathBuf::from),
        runs: num("--runs", 100)?,
        rounds10: num("--rounds10", 10)?,
        rounds50: num("--rounds50", 3)?,
        rate_secs: u64::try_from(num("--rate-secs", 3)?)?,
        stage_runs: num("--stage-runs", 50)?,
    };
    let _lock = lock_exclusive(Path::new(LOCK_FILE))?;
    // Other work on the machine skews every figure; say how busy it was.
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    // The static agent is what production sandboxes run, so it goes first and sets the
    // targets; the gateway binary doubles as the agent when given as `--agent`.
    let mut variants = Vec::new();
    if let Some(agent) = &opts.agent {
        variants.push(("static_agent", agent.clone()));
    }
    variants.push(("builtin_agent", opts.gateway.clone()));
    let mut floor = Floor::default();
    let mut results = serde_json::Map::new();
    let mut gws = Vec::new();
    let mut spawned = Ok(());
    for (label, agent) in &variants {
        eprintln!("api bench: gateway with the {label} ({})", agent.display());
        match GatewayProc::spawn(&opts.gateway, agent) {
            Ok(gw) => gws.push(gw),
            Err(e) => {
                spawned = Err(e);
                break;
            }
        }
    }
    let outcome = spawned.and_then(|()| {
        let refs: Vec<&GatewayProc> = gws.iter().collect();
        measure_gateways(&rt, &refs, &opts, &mut floor)
    });
    let mut cleanup = Ok(());
    for gw in gws {
        if let Err(e) = gw.shutdown(&rt) {
            eprintln!("api bench: cleanup: {e}");
            cleanup = Err(e);
        }
    }
    let measured = outcome?;
    cleanup?;
    for ((label, _), r) in variants.iter().zip(&measured) {
        results.insert((*label).into(), r.json.clone());
    }
    let primary = measured.first().ok_or("no gateway variant ran")?;

    let stage_agent = opts.agent.clone().unwrap_or_else(|| opts.gateway.clone());
    eprintln!(
        "api bench: stage breakdown in-process ({})",
        stage_agent.display()
    );
    let stages = stage_breakdown(&rt, &stage_agent, &opts)?;

    let unshare = Stats::of(&mut floor.unshare);
    let fork_exec = Stats::of(&mut floor.fork_exec);
    results.insert("baseline_unshare".into(), unshare.json());
    results.insert("baseline_fork_exec_to_first_byte".into(), fork_exec.json());
    let (c1, c10, c50) = (&primary.cc1, &primary.cc10, &primary.cc50);
    let floor_sum = unshare.p50 + fork_exec.p50;
    let rate = primary.rate.as_ref().ok_or("no control-plane rate")?;
    let agents: serde_json::Map<String, serde_json::Value> = variants
        .iter()
        .map(|(l, a)| ((*l).to_owned(), a.display().to_string().into()))
        .collect();
    let failed = match primary.failed {
        [0, 0, 0] => String::new(),
        [a, b, c] => format!("; FAILED creates {a}/{b}/{c} at cc=1/10/50"),
    };
    let summary = format!(
        "create→first output p50 {:.1} ms at cc=1 ({:.1}x `unshare` {:.2} ms + fork+exec {:.2} ms), p95 {:.1} ms at cc=10, p95 {:.1} ms at cc=50; GET /sandboxes/{{id}} {:.0} req/s (p99 {:.2} ms, 64 conns); static agent, n={}/{}/{}{failed}",
        c1.p50,
        c1.p50 / floor_sum,
        unshare.p50,
        fork_exec.p50,
        c10.p95,
        c50.p95,
        rate.rps,
        rate.p99,
        opts.runs,
        opts.rounds10 * 10,
        opts.rounds50 * 50,
    );
    let report = serde_json::json!({
        "benchmark": "api",
        "machine": machine(),
        "loadavg_at_start": loadavg.trim(),
        "gateway": opts.gateway.display().to_string(),
        "agents": agents,
        "runs": { "cc1": opts.runs, "cc10": opts.rounds10 * 10, "cc50": opts.rounds50 * 50, "warmup": WARMUP },
        "unit": "ms",
        "clock": "create_to_first_output starts before POST /v2/sandboxes is sent and stops at the first stdout frame of process.Start through the gateway; create_call stops when the create response has arrived; first_command is the rest",
        "results": results,
        "stage_breakdown": stages,
        "ratios": {
            "cc1_p50_over_unshare_p50": c1.p50 / unshare.p50,
            "cc1_p50_over_unshare_plus_fork_exec_p50": c1.p50 / floor_sum,
            "cc10_p50_over_cc1_p50": c10.p50 / c1.p50,
            "cc50_p50_over_cc1_p50": c50.p50 / c1.p50,
        },
        "targets": {
            "cc1_p50_le_15ms": c1.p50 <= 15.0 && primary.failed[0] == 0,
            "cc10_p95_le_60ms": c10.p95 <= 60.0 && primary.failed[1] == 0,
            "no_failed_creates": primary.failed.iter().all(|f| *f == 0),
        },
        "summary": summary,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// Takes an exclusive `flock` on `path`, waiting (bounded) while someone else holds it.
fn lock_exclusive(path: &Path) -> Res<nix::fcntl::Flock<std::fs::File>> {
    use nix::fcntl::{Flock, FlockArg};
    let deadline = Instant::now() + LOCK_WAIT;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    let mut told = false;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((f, nix::errno::Errno::EWOULDBLOCK)) => {
                if Instant::now() > deadline {
                    return Err(
                        format!("{} stayed locked for {LOCK_WAIT:?}", path.display()).into(),
                    );
                }
                if !told {
                    eprintln!(
                        "api bench: waiting for {} (gateway tests running)",
                        path.display()
                    );
                    told = true;
                }
                std::thread::sleep(Duration::from_secs(1));
                file = f;
            }
            Err((_, e)) => return Err(format!("flock {}: {e}", path.display()).into()),
        }
    }
}

/// The kernel floor, sampled between the cc=1 samples of every gateway run.
#[derive(Default)]
struct Floor {
    unshare: Vec<Duration>,
    fork_exec: Vec<Duration>,
}

impl Floor {
    fn sample(&mut self) -> Res<()> {
        self.unshare.push(stats::unshare_true()?);
        self.fork_exec
            .push(stats::fork_exec_to_first_byte(PROGRAM, &ARGS)?);
        Ok(())
    }
}

/// What one gateway run measured.
struct VariantResult {
    json: serde_json::Value,
    cc1: Stats,
    cc10: Stats,
    cc50: Stats,
    /// Failed samples at cc=1, 10 and 50.
    failed: [usize; 3],
    rate: Option<Rate>,
}

/// One create-to-usable sample, split where the create call returned.
#[derive(Debug, Clone, Copy)]
struct Sample {
    total: Duration,
    create: Duration,
    kill: Duration,
}

/// Measures every gateway, alternating between them sample by sample (cc=1) and round by
/// round (cc=10, 50), with the kernel floor after each cc=1 pair, so drift in the machine's
/// load hits all of them alike. The control-plane rate is taken on the first.
fn measure_gateways(
    rt: &tokio::runtime::Runtime,
    gws: &[&GatewayProc],
    opts: &Opts,
    floor: &mut Floor,
) -> Res<Vec<VariantResult>> {
    let mut addrs = Vec::new();
    for gw in gws {
        gw.wait_ready()?;
        addrs.push(gw.addr()?);
    }
    let mut levels: Vec<[Level; 3]> = gws.iter().map(|_| Default::default()).collect();
    let mut warmup = Level::default();
    for (gw, addr) in gws.iter().zip(&addrs) {
        for _ in 0..WARMUP {
            rt.block_on(round(*addr, &gw.live, 1, &mut warmup))?;
        }
    }
    for (l, cc, n) in [
        (0, 1, opts.runs),
        (1, 10, opts.rounds10),
        (2, 50, opts.rounds50),
    ] {
        eprintln!("api bench: cc={cc}, {n} rounds per gateway");
        for _ in 0..n {
            for ((gw, addr), level) in gws.iter().zip(&addrs).zip(levels.iter_mut()) {
                rt.block_on(round(*addr, &gw.live, cc, &mut level[l]))?;
            }
            if cc == 1 {
                floor.sample()?;
            }
        }
    }
    let mut out = Vec::new();
    for (i, ((gw, addr), [cc1, cc10, cc50])) in
        gws.iter().zip(&addrs).zip(levels.iter_mut()).enumerate()
    {
        for (name, l) in [("cc=1", &*cc1), ("cc=10", &*cc10), ("cc=50", &*cc50)] {
            if !l.failures.is_empty() {
                eprintln!(
                    "api bench: gateway {i}: {name}: {} of {} failed, e.g. {}",
                    l.failures.len(),
                    l.failures.len() + l.samples.len(),
                    l.failures[0]
                );
            }
        }
        let rate = if i == 0 {
            eprintln!(
                "api bench: GET /sandboxes/{{id}} for {} s on {RATE_CONNECTIONS} connections",
                opts.rate_secs
            );
            Some(rt.block_on(rate(*addr, &gw.live, Duration::from_secs(opts.rate_secs)))?)
        } else {
            None
        };
        let (j1, s1, f1) = level_json(cc1)?;
        let (j10, s10, f10) = level_json(cc10)?;
        let (j50, s50, f50) = level_json(cc50)?;
        let mut json = serde_json::json!({ "cc1": j1, "cc10": j10, "cc50": j50 });
        if let Some(r) = &rate {
            json["get_sandbox_rate"] = r.json();
        }
        out.push(VariantResult {
            json,
            cc1: s1,
            cc10: s10,
            cc50: s50,
            failed: [f1, f10, f50],
            rate,
        });
    }
    Ok(out)
}

/// Stats of one concurrency level; returns its JSON, the create-to-usable stats and how many
/// samples failed.
fn level_json(level: &mut Level) -> Res<(serde_json::Value, Stats, usize)> {
    let samples = &level.samples;
    if samples.is_empty() {
        return Err(format!(
            "every sample failed, e.g. {}",
            level.failures.first().map_or("?", String::as_str)
        )
        .into());
    }
    let mut total: Vec<Duration> = samples.iter().map(|s| s.total).collect();
    let mut create: Vec<Duration> = samples.iter().map(|s| s.create).collect();
    let mut command: Vec<Duration> = samples.iter().map(|s| s.total - s.create).collect();
    let mut kill: Vec<Duration> = samples.iter().map(|s| s.kill).collect();
    let t = Stats::of(&mut total);
    let mut distinct: Vec<&String> = Vec::new();
    for f in &level.failures {
        if distinct.len() < 3 && !distinct.contains(&f) {
            distinct.push(f);
        }
    }
    let json = serde_json::json!({
        "n": samples.len(),
        "failed": level.failures.len(),
        "failures": distinct,
        "create_to_first_output": t.json(),
        "create_call": Stats::of(&mut create).json(),
        "first_command": Stats::of(&mut command).json(),
        "kill": Stats::of(&mut kill).json(),
        "cpu": {
            "busy_ms_per_sandbox": level.cpu_ms as f64 / (samples.len() + level.failures.len()) as f64,
            "utilisation_of_all_cores": level.cpu_ms as f64 / (level.wall.as_secs_f64() * 1000.0 * cpus() as f64),
            "note": "machine-wide busy CPU (/proc/stat, 10 ms ticks) from a round's start until its last sample; kills excluded",
        },
    });
    Ok((json, t, level.failures.len()))
}

/// `cc` tasks create a sandbox and run the command at once; when all are done (so no kill
/// overlaps a create), each kills its sandbox. A failed create or command is a result, not a
/// reason to stop: it is returned in `failures` and its sandbox, if any, is killed.
async fn round(addr: SocketAddr, live: &Live, cc: usize, level: &mut Level) -> Res<()> {
    let start = Arc::new(tokio::sync::Barrier::new(cc));
    let done = Arc::new(tokio::sync::Barrier::new(cc));
    // Machine-wide CPU time from the start to the moment the last task has its sample:
    // what the creates cost, every process and the kernel included, kills excluded.
    let cpu_start = cpu_busy_ms()?;
    let wall_start = Instant::now();
    let cpu_done = Arc::new(Mutex::new(None));
    let mut tasks = Vec::with_capacity(cc);
    for _ in 0..cc {
        let (start, done, live) = (Arc::clone(&start), Arc::clone(&done), Arc::clone(live));
        let cpu_done = Arc::clone(&cpu_done);
        tasks.push(tokio::spawn(async move {
            // Errors are carried past both barriers so no task waits for one that gave up.
            let conn = connect(addr).await;
            start.wait().await;
            let sampled = match conn {
                Ok(mut sender) => {
                    let r = timeout(create_and_run(&mut sender, &live)).await;
                    r.map(|(total, create, id)| (sender, total, create, id))
                }
                Err(e) => Err(e),
            };
            if done.wait().await.is_leader() {
                let now = cpu_busy_ms().map(|ms| (ms, wall_start.elapsed()));
                *cpu_done
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(now);
            }
            let (mut sender, total, create, id) = sampled?;
            let kill = timeout(delete(&mut sender, &live, &id)).await?;
            Ok::<_, BoxError>(Sample {
                total,
                create,
                kill,
            })
        }));
    }
    for task in tasks {
        match task.await? {
            Ok(s) => level.samples.push(s),
            Err(e) => level.failures.push(e.to_string()),
        }
    }
    let done = cpu_done
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    if let Some(Ok((ms, wall))) = done {
        level.cpu_ms += ms.saturating_sub(cpu_start);
        level.wall += wall;
    }
    // Sandboxes of failed samples (created, then the command failed) go now.
    let left: Vec<String> = live_set(live).iter().cloned().collect();
    if !left.is_empty() {
        let mut sender = connect(addr).await?;
        for id in left {
            timeout(delete(&mut sender, live, &id)).await?;
        }
    }
    Ok(())
}

/// The samples and failures of one concurrency level.
#[derive(Default)]
struct Level {
    samples: Vec<Sample>,
    failures: Vec<String>,
    /// Machine-wide busy CPU milliseconds while creates ran (see [`round`]).
    cpu_ms: u64,
    /// Wall time of the same intervals.
    wall: Duration,
}

/// Busy CPU time of the whole machine so far, in ms (`/proc/stat`, 10 ms ticks).
fn cpu_busy_ms() -> Res<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().ok_or("empty /proc/stat")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    // user nice system idle iowait irq softirq steal: everything but idle and iowait.
    let busy: u64 = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, t)| t)
        .sum();
    Ok(busy * 10)
}

async fn timeout<T>(f: impl std::future::Future<Output = Res<T>>) -> Res<T> {
    tokio::time::timeout(REQUEST_TIMEOUT, f)
        .await
        .map_err(|_| format!("no answer within {REQUEST_TIMEOUT:?}"))?
}

/// Sandboxes created and not yet killed, so they are killed whatever happens.
type Live = Arc<Mutex<HashSet<String>>>;

fn live_set(live: &Live) -> std::sync::MutexGuard<'_, HashSet<String>> {
    live.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn connect(addr: SocketAddr) -> Res<Sender> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn send(sender: &mut Sender, req: http::Request<Full<Bytes>>) -> Res<(u16, Bytes)> {
    sender.ready().await?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// `POST /v2/sandboxes`, then `process.Start` through the data plane until the first stdout
/// frame. Returns (create→first output, create→create response, sandbox id).
async fn create_and_run(sender: &mut Sender, live: &Live) -> Res<(Duration, Duration, String)> {
    let req = http::Request::post("/v2/sandboxes")
        .header("host", "127.0.0.1")
        .header("content-type", "application/json")
        .header("x-api-key", "bench")
        .body(Full::new(Bytes::from_static(br#"{"templateID":"base"}"#)))?;
    let t0 = Instant::now();
    let (status, body) = send(sender, req).await?;
    if status != 201 {
        return Err(format!(
            "create answered {status}: {}",
            String::from_utf8_lossy(&body)
        )
        .into());
    }
    let created = t0.elapsed();
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    let id = v["sandboxID"].as_str().ok_or("no sandboxID")?.to_owned();
    live_set(live).insert(id.clone());
    let token = v["envdAccessToken"]
        .as_str()
        .ok_or("no envdAccessToken")?
        .to_owned();
    let first = start_to_first_output(sender, Some(&id), &token, t0).await?;
    Ok((first, created, id))
}

/// `process.Start` of the command as a Connect stream; returns the time from `t0` to the
/// first stdout frame, then drains the stream so the connection can be reused. With `id` the
/// request is routed by the gateway's E2B headers.
async fn start_to_first_output(
    sender: &mut Sender,
    id: Option<&str>,
    token: &str,
    t0: Instant,
) -> Res<Duration> {
    let msg = serde_json::json!({
        "process": {"cmd": PROGRAM, "args": ARGS},
        "stdin": false,
    })
    .to_string();
    let mut body = Vec::with_capacity(5 + msg.len());
    body.push(0);
    body.extend_from_slice(&u32::try_from(msg.len())?.to_be_bytes());
    body.extend_from_slice(msg.as_bytes());
    let mut req = http::Request::post("/process.Process/Start")
        .header("host", "127.0.0.1")
        .header("content-type", "application/connect+json")
        .header("connect-protocol-version", "1")
        .header("x-access-token", token);
    if let Some(id) = id {
        req = req
            .header("e2b-sandbox-id", id)
            .header("e2b-sandbox-port", "49983");
    }
    let req = req.body(Full::new(Bytes::from(body)))?;
    sender.ready().await?;
    let mut resp = sender.send_request(req).await?;
    if resp.status() != 200 {
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        return Err(format!(
            "process.Start answered {status}: {}",
            String::from_utf8_lossy(&body)
        )
        .into());
    }
    let mut buf = Vec::new();
    let mut first = None;
    while let Some(frame) = resp.body_mut().frame().await {
        if let Ok(data) = frame?.into_data() {
            buf.extend_from_slice(&data);
        }
        if first.is_none() && contains(&buf, b"\"stdout\"") {
            first = Some(t0.elapsed());
        }
    }
    first.ok_or_else(|| {
        format!(
            "no stdout frame in the Start stream: {}",
            String::from_utf8_lossy(&buf)
        )
        .into()
    })
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// `DELETE /sandboxes/{id}`; returns how long it took.
async fn delete(sender: &mut Sender, live: &Live, id: &str) -> Res<Duration> {
    let req = http::Request::delete(format!("/sandboxes/{id}"))
        .header("host", "127.0.0.1")
        .header("x-api-key", "bench")
        .body(Full::new(Bytes::new()))?;
    let t = Instant::now();
    let (status, body) = send(sender, req).await?;
    let elapsed = t.elapsed();
    if status != 204 && status != 404 {
        return Err(format!(
            "kill of {id} answered {status}: {}",
            String::from_utf8_lossy(&body)
        )
        .into());
    }
    live_set(live).remove(id);
    Ok(elapsed)
}

/// The control-plane read rate.
struct Rate {
    requests: usize,
    seconds: f64,
    rps: f64,
    p50: f64,
    p99: f64,
    max: f64,
}

impl Rate {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "connections": RATE_CONNECTIONS,
            "requests": self.requests,
            "seconds": self.seconds,
            "requests_per_second": self.rps,
            "latency_ms": {"p50": self.p50, "p99": self.p99, "max": self.max},
            "note": "client and gateway share this machine's cores",
        })
    }
}

/// `GET /sandboxes/{id}` of one live sandbox from `RATE_CONNECTIONS` keep-alive connections
/// for `length`.
async fn rate(addr: SocketAddr, live: &Live, length: Duration) -> Res<Rate> {
    let mut sender = connect(addr).await?;
    let (_, _, id) = timeout(create_and_run(&mut sender, live)).await?;
    let measured = async {
        let mut senders = Vec::with_capacity(RATE_CONNECTIONS);
        for _ in 0..RATE_CONNECTIONS {
            senders.push(connect(addr).await?);
        }
        let start = Instant::now();
        let deadline = tokio::time::Instant::now() + length;
        let mut tasks = Vec::with_capacity(RATE_CONNECTIONS);
        for mut s in senders {
            let path = format!("/sandboxes/{id}");
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                while tokio::time::Instant::now() < deadline {
                    let req = http::Request::get(path.as_str())
                        .header("host", "127.0.0.1")
                        .header("x-api-key", "bench")
                        .body(Full::new(Bytes::new()))?;
                    let t = Instant::now();
                    let (status, _) = timeout(send(&mut s, req)).await?;
                    lat.push(t.elapsed());
                    if status != 200 {
                        return Err::<_, BoxError>(format!("GET answered {status}").into());
                    }
                }
                Ok(lat)
            }));
        }
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await??);
        }
        let seconds = start.elapsed().as_secs_f64();
        let requests = all.len();
        let s = Stats::of(&mut all);
        Ok::<_, BoxError>(Rate {
            requests,
            seconds,
            rps: requests as f64 / seconds,
            p50: s.p50,
            p99: s.p99,
            max: s.max,
        })
    }
    .await;
    let killed = timeout(delete(&mut sender, live, &id)).await;
    let r = measured?;
    killed?;
    Ok(r)
}

/// Lines the gateway's reader thread reports.
enum Event {
    Listening(SocketAddr),
    Template(String),
}

/// The gateway under test, with everything needed to clean up after it.
struct GatewayProc {
    child: Mutex<Child>,
    state: tempfile::TempDir,
    events: mpsc::Receiver<Event>,
    addr: Mutex<Option<SocketAddr>>,
    log: Arc<Mutex<VecDeque<String>>>,
    live: Live,
}

impl GatewayProc {
    fn spawn(gateway: &Path, agent: &Path) -> Res<Self> {
        let state = tempfile::Builder::new()
            .prefix("coppice-api-bench-")
            .tempdir_in("/var/tmp")?;
        let mut child = Command::new(gateway)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--state-dir")
            .arg(state.path())
            .arg("--template-cache")
            .arg(TEMPLATE_CACHE)
            .arg("--agent")
            .arg(agent)
            .env("COPPICE_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("COPPICE_API_KEYS")
            .env_remove("COPPICE_API_KEYS_FILE")
            .env_remove("COPPICE_DOMAIN")
            .env_remove("COPPICE_ENVD_LISTEN")
            .env_remove("COPPICE_CODE_LISTEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().ok_or("no stderr pipe")?;
        let (tx, events) = mpsc::channel();
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let ring = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let line = strip_ansi(&line);
                if line.contains(" listening") {
                    if let Some(addr) = line
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("address="))
                        .and_then(|a| a.parse().ok())
                    {
                        let _ = tx.send(Event::Listening(addr));
                    }
                }
                if line.contains("template ready") || line.contains("template unavailable") {
                    let _ = tx.send(Event::Template(line.clone()));
                }
                let mut ring = ring
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if ring.len() == 200 {
                    ring.pop_front();
                }
                ring.push_back(line);
            }
        });
        Ok(Self {
            child: Mutex::new(child),
            state,
            events,
            addr: Mutex::new(None),
            log,
            live: Arc::new(Mutex::new(HashSet::new())),
        })
    }

    fn addr(&self) -> Res<SocketAddr> {
        self.addr
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .ok_or_else(|| "the gateway is not listening".into())
    }

    fn log_tail(&self) -> String {
        let ring = self
            .log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let skip = ring.len().saturating_sub(20);
        ring.iter()
            .skip(skip)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits for the listener, `/health` 200 and every template import to finish (so no
    /// background import runs while we measure).
    fn wait_ready(&self) -> Res<()> {
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut templates = 0;
        while templates < 2 || self.addr().is_err() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .events
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok(Event::Listening(a)) => {
                    *self
                        .addr
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(a);
                }
                Ok(Event::Template(line)) => {
                    eprintln!("api bench: gateway: {line}");
                    templates += 1;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(format!("the gateway exited:\n{}", self.log_tail()).into());
                }
            }
            if Instant::now() > deadline {
                return Err(
                    format!("the gateway was not ready in time:\n{}", self.log_tail()).into(),
                );
            }
        }
        let addr = self.addr()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        loop {
            let status = rt.block_on(async {
                let mut s = connect(addr).await?;
                let req = http::Request::get("/health")
                    .header("host", "127.0.0.1")
                    .body(Full::new(Bytes::new()))?;
                timeout(send(&mut s, req)).await.map(|(status, _)| status)
            });
            if matches!(status, Ok(200)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("/health never said 200 ({status:?})").into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills every sandbox we created (through the API, then directly through the jail
    /// driver for any that survived), stops the gateway and removes its state directory.
    fn shutdown(self, rt: &tokio::runtime::Runtime) -> Res<()> {
        let mut problems = Vec::new();
        let left: Vec<String> = live_set(&self.live).iter().cloned().collect();
        if let Ok(addr) = self.addr() {
            for id in &left {
                let r = rt.block_on(async {
                    let mut s = connect(addr).await?;
                    timeout(delete(&mut s, &self.live, id)).await
                });
                if let Err(e) = r {
                    problems.push(format!("kill {id}: {e}"));
                }
            }
        }
        let mut child = self
            .child
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Ok(pid) = i32::try_from(child.id()) {
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
        // Sandboxes outlive their gateway by design; any the API could not kill go now.
        let jail_dir = self.state.path().join("jail");
        if jail_dir.exists() {
            let jail = LinuxJail::open(JailConfig::new(&jail_dir))?;
            for info in rt.block_on(jail.list())? {
                problems.push(format!("sandbox {} survived its gateway", info.id));
                rt.block_on(jail.kill(&info.id))?;
            }
        }
        self.state.close()?;
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; ").into())
        }
    }
}

/// Drops terminal colour sequences (`ESC [ ... m`), in case the log is coloured anyway.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The gateway runtime's create, rebuilt here from the same backends with a clock around
/// each stage (`Runtime::create_inner` in `src/runtime.rs`).
struct Replica {
    dir: PathBuf,
    storage: OverlayStorage,
    jail: LinuxJail,
    layer: LayerId,
    agent: PathBuf,
    live: Mutex<HashSet<SandboxId>>,
}

/// Stage durations of one replica create.
#[derive(Debug, Clone, Copy)]
struct Stages {
    rootfs: Duration,
    run_dir: Duration,
    jail_start: Duration,
    agent_socket: Duration,
    init: Duration,
    first_command: Duration,
    total: Duration,
    /// `syncfs` alone on the storage's filesystem, right after this sample.
    syncfs: Duration,
    /// Connects refused after the socket file appeared (the runtime would fail the create).
    refused: u32,
}

const STAGES: [&str; 8] = [
    "create_rootfs",
    "run_dir",
    "jail_start",
    "agent_socket_connectable",
    "init",
    "first_command",
    "total",
    "syncfs_alone",
];

impl Stages {
    fn get(&self, i: usize) -> Duration {
        [
            self.rootfs,
            self.run_dir,
            self.jail_start,
            self.agent_socket,
            self.init,
            self.first_command,
            self.total,
            self.syncfs,
        ][i]
    }
}

impl Replica {
    fn open(agent: &Path) -> Res<(Self, tempfile::TempDir)> {
        let dir = tempfile::Builder::new()
            .prefix("coppice-api-bench-stages-")
            .tempdir_in("/var/tmp")?;
        let tree = coppice_zfs::template::TemplateBuilder::new(
            TEMPLATE_CACHE,
            JailConfig::DEFAULT_UID_BASE,
        )
        .ensure(false, &mut |line: &str| eprintln!("template: {line}"))?;
        let storage = OverlayStorage::open(dir.path().join("storage"))?;
        let jail = LinuxJail::open(JailConfig::new(dir.path().join("jail")))?;
        let replica = Self {
            dir: dir.path().to_path_buf(),
            storage,
            jail,
            layer: LayerId::new("base")?,
            agent: agent.to_path_buf(),
            live: Mutex::new(HashSet::new()),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(replica.storage.import_template(&replica.layer, &tree))?;
        Ok((replica, dir))
    }

    async fn create(&self, n: usize) -> Res<(SandboxId, Stages)> {
        let id = SandboxId::new(format!("stage{}x{n}", std::process::id()))?;
        let t0 = Instant::now();
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id.clone());
        let rootfs = self.storage.create_rootfs(&id, &self.layer).await?;
        let t_rootfs = t0.elapsed();
        let run = self.dir.join("run").join(id.as_str());
        let root = self.jail.host_id(0);
        std::fs::create_dir_all(&run)?;
        std::os::unix::fs::chown(&run, Some(root), Some(root))?;
        let t_run = t0.elapsed();
        let spec = JailSpec {
            id: id.clone(),
            rootfs,
            init: InitSpec {
                program: "/usr/local/bin/coppice-envd".into(),
                args: vec!["--socket".into(), "/run/coppice/agent.sock".into()],
                env: vec![
                    (
                        "PATH".into(),
                        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                    ),
                    ("COPPICE_LOG".into(), "warn".into()),
                ],
                cwd: "/".into(),
            },
            mounts: vec![
                BindMount {
                    source: self.agent.clone(),
                    target: "/usr/local/bin/coppice-envd".into(),
                    read_only: true,
                },
                BindMount {
                    source: run.clone(),
                    target: "/run/coppice".into(),
                    read_only: false,
                },
            ],
            limits: LIMITS,
        };
        self.jail.start(spec).await?;
        let t_jail = t0.elapsed();
        // Polled as the runtime polls it (a 250 µs tokio sleep, which the timer rounds up to
        // its 1 ms tick).
        let socket = run.join("agent.sock");
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        while !socket.exists() {
            if Instant::now() > deadline {
                return Err("the agent never created its socket".into());
            }
            tokio::time::sleep(Duration::from_micros(250)).await;
        }
        // The socket file appears at bind(2), before listen(2): a connect in between is
        // refused. The runtime fails the create then; here we retry and count it.
        let mut refused = 0;
        let stream = loop {
            match tokio::net::UnixStream::connect(&socket).await {
                Ok(s) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    if Instant::now() > deadline {
                        return Err(e.into());
                    }
                    refused += 1;
                    tokio::time::sleep(Duration::from_micros(250)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        let t_socket = t0.elapsed();
        let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let token = "benchtoken";
        let init = serde_json::json!({
            "envVars": {},
            "accessToken": token,
            "defaultUser": "user",
            "defaultWorkdir": "/home/user",
        });
        let req = http::Request::post("/init")
            .header("host", "localhost")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(init.to_string())))?;
        let (status, _) = send(&mut sender, req).await?;
        if !(200..300).contains(&status) {
            return Err(format!("/init answered {status}").into());
        }
        let t_init = t0.elapsed();
        // A fresh connection, as the gateway's proxy opens one per request.
        let mut sender = connect_unix(&socket).await?;
        let total = start_to_first_output(&mut sender, None, token, t0).await?;
        Ok((
            id,
            Stages {
                rootfs: t_rootfs,
                run_dir: t_run - t_rootfs,
                jail_start: t_jail - t_run,
                agent_socket: t_socket - t_jail,
                init: t_init - t_socket,
                first_command: total - t_init,
                total,
                syncfs: Duration::ZERO,
                refused,
            },
        ))
    }

    async fn destroy(&self, id: &SandboxId) -> Res<()> {
        self.jail.kill(id).await?;
        self.storage.remove_rootfs(id).await?;
        let run = self.dir.join("run").join(id.as_str());
        std::fs::remove_dir_all(&run)?;
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(id);
        Ok(())
    }

    /// Kills whatever is still alive (after an error).
    async fn destroy_all(&self) {
        let left: Vec<SandboxId> = self
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .cloned()
            .collect();
        for id in left {
            let _ = self.jail.kill(&id).await;
            let _ = self.storage.remove_rootfs(&id).await;
        }
    }
}

/// `syncfs` of the filesystem holding `path`, as `create_rootfs` does before publishing.
fn syncfs(path: &Path) -> Res<Duration> {
    use std::os::fd::AsRawFd;
    let dir = std::fs::File::open(path)?;
    let t = Instant::now();
    nix::unistd::syncfs(dir.as_raw_fd())?;
    Ok(t.elapsed())
}

async fn connect_unix(socket: &Path) -> Res<Sender> {
    let stream = tokio::net::UnixStream::connect(socket).await?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Stage-by-stage timings of the runtime's create at cc=1 and cc=10, with `syncfs` alone.
fn stage_breakdown(
    rt: &tokio::runtime::Runtime,
    agent: &Path,
    opts: &Opts,
) -> Res<serde_json::Value> {
    let (replica, dir) = Replica::open(agent)?;
    let replica = Arc::new(replica);
    let measured = (|| -> Res<serde_json::Value> {
        let mut n = 0;
        let (mut cpu1, mut wall1, mut cpu10, mut wall10) = (0, Duration::ZERO, 0, Duration::ZERO);
        let mut cc1 = Vec::with_capacity(opts.stage_runs);
        for i in 0..opts.stage_runs + WARMUP {
            n += 1;
            let (cpu0, wall0) = (cpu_busy_ms()?, Instant::now());
            let (id, mut s) = rt.block_on(timeout(replica.create(n)))?;
            if i >= WARMUP {
                cpu1 += cpu_busy_ms()?.saturating_sub(cpu0);
                wall1 += wall0.elapsed();
            }
            rt.block_on(timeout(replica.destroy(&id)))?;
            s.syncfs = syncfs(&replica.dir)?;
            if i >= WARMUP {
                cc1.push(s);
            }
        }
        // cc=10: where queueing appears when creates overlap.
        let rounds = opts.rounds10.min(5);
        let mut cc10 = Vec::with_capacity(rounds * 10);
        for _ in 0..rounds {
            let (cpu0, wall0) = (cpu_busy_ms()?, Instant::now());
            let tasks: Vec<_> = (0..10)
                .map(|_| {
                    n += 1;
                    let (r, n) = (Arc::clone(&replica), n);
                    rt.spawn(async move { timeout(r.create(n)).await })
                })
                .collect();
            let mut ids = Vec::new();
            let mut first_error: Option<BoxError> = None;
            for t in tasks {
                match rt.block_on(t) {
                    Ok(Ok((id, s))) => {
                        ids.push(id);
                        cc10.push(s);
                    }
                    Ok(Err(e)) => {
                        first_error.get_or_insert(e);
                    }
                    Err(e) => {
                        first_error.get_or_insert(e.into());
                    }
                }
            }
            cpu10 += cpu_busy_ms()?.saturating_sub(cpu0);
            wall10 += wall0.elapsed();
            for id in &ids {
                rt.block_on(timeout(replica.destroy(id)))?;
            }
            if let Some(e) = first_error {
                return Err(e);
            }
        }
        Ok(serde_json::json!({
            "what": "the gateway runtime's create rebuilt in-process from the same backends (storage, jail, agent), clock around each stage; agent_socket_connectable lasts until the socket file exists and a connect succeeds (the runtime connects once and fails the create on ECONNREFUSED; this retries and counts those creates); first_command is process.Start on a fresh agent connection to the first stdout frame; syncfs_alone is one syncfs(2) of the state filesystem after each sample",
            "agent": agent.display().to_string(),
            "cc1": stages_json(&mut cc1),
            "cc10": stages_json(&mut cc10),
            "cpu": {
                "cc1_busy_ms_per_sandbox": cpu1 as f64 / opts.stage_runs as f64,
                "cc1_utilisation_of_all_cores": cpu1 as f64 / (wall1.as_secs_f64() * 1000.0 * cpus() as f64),
                "cc10_busy_ms_per_sandbox": cpu10 as f64 / (rounds * 10) as f64,
                "cc10_utilisation_of_all_cores": cpu10 as f64 / (wall10.as_secs_f64() * 1000.0 * cpus() as f64),
            },
        }))
    })();
    rt.block_on(replica.destroy_all());
    drop(replica);
    let closed = dir.close();
    let r = measured?;
    closed?;
    Ok(r)
}

fn stages_json(samples: &mut [Stages]) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    out.insert("n".into(), samples.len().into());
    out.insert(
        "creates_that_saw_connect_refused".into(),
        samples.iter().filter(|s| s.refused > 0).count().into(),
    );
    for (i, name) in STAGES.iter().enumerate() {
        let mut d: Vec<Duration> = samples.iter().map(|s| s.get(i)).collect();
        out.insert((*name).into(), Stats::of(&mut d).json());
    }
    out.into()
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}
