//! Part `create`: from `POST /v2/sandboxes` to the first stdout frame of `process.Start` of
//! `/bin/echo hi` through the gateway's data plane (the clock stops when the sandbox is
//! *usable*, not when the create call returns), at concurrency 1, 10 and 50; and, in the same
//! run, interleaved with the cc=1 samples, the kernel floors: `unshare --fork --pid --mount
//! --net --uts --ipc --mount-proc true`, the same through bubblewrap, and a plain fork+exec of
//! `/bin/echo hi` to its first byte.
//!
//! The gateway as it ships (its default warm pool; the static agent when `--agent` is given)
//! sets the figures. Beside it, sampled alternately so machine drift hits all alike: a gateway
//! whose sandboxes run the agent built into the gateway binary, and one with `--warm-pool 0`,
//! where every create starts its sandbox on the request path. Each level also reports the
//! gateway runtime's own account from its debug log: how many creates the warm pool served,
//! and the stages of every sandbox start. Each cc=10 and cc=50 burst starts once the machine
//! has settled (under 10% CPU busy for 100 ms, at most 10 s of waiting): the alternately sampled
//! gateways refill their pools after their own bursts, and one gateway's refill must not land
//! on another's burst.
//!
//! A second part rebuilds the runtime's cold create from the same backends in this process,
//! with a clock around each stage (root filesystem, run directory, jail start, agent socket,
//! `/init`, first command), so the report says where the time goes.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use coppice_jail::{JailConfig, LinuxJail};
use coppice_lifecycle::backend::{
    BindMount, InitSpec, Isolation, JailSpec, LayerId, Limits, SandboxId, Storage,
};
use coppice_zfs::OverlayStorage;
use http_body_util::Full;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use crate::client::{
    self, connect, connect_unix, delete, live_set, send, start_to_first_output, timeout, BoxError,
    Live, Res, Sandbox, Sender, Via, ARGS, PROGRAM, REQUEST_TIMEOUT,
};
use crate::gateway::{GatewayProc, RuntimeLine, TEMPLATE_CACHE};
use crate::stats::{self, Figure, Stats};
use crate::{Ctx, Opts, Report, BASE};

/// Samples taken and thrown away before each measurement (page cache, allocator, JIT-free
/// but not cold-free: the first sandboxes touch the template's inodes).
const WARMUP: usize = 3;
/// What the runtime gives every sandbox (`DEFAULT_LIMITS` in `api/sandboxes.rs`).
const LIMITS: Limits = Limits {
    memory_bytes: Some(1 << 30),
    pids: Some(4096),
    cpu_millis: Some(2000),
};

pub(crate) fn run(ctx: &Ctx<'_>) -> Res<Report> {
    let (rt, opts) = (ctx.rt, ctx.opts);
    let shared = ctx.gw()?;
    // The gateway as it ships — default warm pool, the static agent if given — goes first and
    // sets the targets. Beside it, alternately: the agent built into the gateway binary, and
    // no warm pool (every create starts its sandbox on the request path).
    let agent = opts.agent.clone().unwrap_or_else(|| opts.gateway.clone());
    let mut labels = vec![if opts.agent.is_some() {
        "static_agent"
    } else {
        "builtin_agent"
    }];
    let mut others = Vec::new();
    let mut wanted: Vec<(&str, &Path, &[&str])> = Vec::new();
    if opts.agent.is_some() {
        wanted.push(("builtin_agent", &opts.gateway, &[]));
    }
    wanted.push(("no_warm_pool", &agent, &["--warm-pool", "0"]));
    let mut spawned = Ok(());
    for (label, agent, args) in wanted {
        eprintln!("api bench: create: another gateway: {label}");
        match GatewayProc::spawn(&opts.gateway, agent, args).and_then(|gw| {
            let ready = gw.wait_ready();
            others.push(gw);
            ready
        }) {
            Ok(()) => labels.push(label),
            Err(e) => {
                spawned = Err(e);
                break;
            }
        }
    }
    let mut gws = vec![shared];
    gws.extend(others.iter());
    let mut floor = Floor::default();
    let outcome = spawned.and_then(|()| measure_gateways(rt, &gws, opts, &mut floor));
    let mut cleanup = Ok(());
    for gw in others {
        if let Err(e) = gw.shutdown(rt) {
            cleanup = Err(e);
        }
    }
    let measured = outcome?;
    cleanup?;
    let mut results = serde_json::Map::new();
    for (label, r) in labels.iter().zip(&measured) {
        results.insert((*label).into(), r.json.clone());
    }
    let primary = measured.first().ok_or("no gateway variant ran")?;

    let stage_agent = opts.agent.clone().unwrap_or_else(|| opts.gateway.clone());
    eprintln!(
        "api bench: create: stage breakdown in-process ({})",
        stage_agent.display()
    );
    let stages = stage_breakdown(rt, &stage_agent, opts)?;

    let unshare = Stats::of(&mut floor.unshare);
    let bwrap = Stats::of(&mut floor.bwrap);
    let fork_exec = Stats::of(&mut floor.fork_exec);
    let (c1, c10, c50) = (&primary.cc1, &primary.cc10, &primary.cc50);
    let floor_sum = unshare.p50 + fork_exec.p50;
    let failed = match primary.failed {
        [0, 0, 0] => String::new(),
        [a, b, c] => format!("; FAILED creates {a}/{b}/{c} at cc=1/10/50"),
    };
    let summary = format!(
        "create→first output p50 {:.1} ms at cc=1 ({:.1}x `unshare` {:.2} ms + fork+exec {:.2} ms; `bwrap` {:.2} ms), p95 {:.1} ms at cc=10, p95 {:.1} ms at cc=50; {}, n={}/{}/{}{failed}",
        c1.p50,
        c1.p50 / floor_sum,
        unshare.p50,
        fork_exec.p50,
        bwrap.p50,
        c10.p95,
        c50.p95,
        labels[0].replace('_', " ") + ", warm pool as shipped",
        c1.n,
        c10.n,
        c50.n,
    );
    let ok = |level: usize| primary.failed[level] == 0;
    // Which creates the warm pool served, as the gateway's log tells it.
    let pooled = |level: &str| {
        let g = &primary.json[level]["gateway_stages"];
        match (
            g["creates_from_warm_pool"].as_u64(),
            g["creates_started_on_request"].as_u64(),
        ) {
            (Some(w), Some(c)) => format!("warm pool served {w} of {}", w + c),
            _ => "warm pool use not logged".to_owned(),
        }
    };
    let mut figures = vec![
        Figure::latency("create.cc1", "create → first command output, cc=1", c1)
            .floor("unshare … true", unshare.p50)
            .floor("bwrap … true", bwrap.p50)
            .floor("unshare + fork+exec", floor_sum)
            .target("p50 ≤ 15 ms", c1.p50 <= 15.0 && ok(0))
            .note(&pooled("cc1")),
        Figure::latency("create.cc10", "create → first command output, cc=10", c10)
            .floor("unshare … true", unshare.p50)
            .target("p95 ≤ 60 ms", c10.p95 <= 60.0 && ok(1))
            .note(&pooled("cc10")),
        Figure::latency("create.cc50", "create → first command output, cc=50", c50)
            .floor("unshare … true", unshare.p50)
            .target("p95 ≤ 250 ms", c50.p95 <= 250.0 && ok(2))
            .note(&pooled("cc50")),
    ];
    for (label, r) in labels.iter().zip(&measured).skip(1) {
        let what = match *label {
            "builtin_agent" => "create → first command output, cc=1, agent built into the gateway",
            _ => {
                "create → first command output, cc=1, no warm pool (jail start on the request path)"
            }
        };
        figures.push(
            Figure::latency(&format!("create.cc1_{label}"), what, &r.cc1)
                .floor("unshare … true", unshare.p50),
        );
    }
    figures.extend([
        Figure::latency(
            "create.unshare",
            "unshare --fork --pid --mount --net --uts --ipc --mount-proc true",
            &unshare,
        )
        .baseline(),
        Figure::latency(
            "create.bwrap",
            "bwrap --unshare-{pid,net,uts,ipc} --ro-bind / / --proc --dev true",
            &bwrap,
        )
        .baseline(),
        Figure::latency(
            "create.fork_exec",
            "fork+exec of /bin/echo hi to its first byte",
            &fork_exec,
        )
        .baseline(),
    ]);
    results.insert("baseline_unshare".into(), unshare.json());
    results.insert("baseline_bwrap".into(), bwrap.json());
    results.insert("baseline_fork_exec_to_first_byte".into(), fork_exec.json());
    Ok(Report {
        figures,
        summary,
        details: serde_json::json!({
            "runs": { "cc1": opts.runs, "cc10": opts.rounds10 * 10, "cc50": opts.rounds50 * 50, "warmup": WARMUP },
            "clock": "create_to_first_output starts before POST /v2/sandboxes is sent and stops at the first stdout frame of process.Start through the gateway; create_call stops when the create response has arrived; first_command is the rest",
            "results": results,
            "stage_breakdown": stages,
            "ratios": {
                "cc1_p50_over_unshare_p50": c1.p50 / unshare.p50,
                "cc1_p50_over_bwrap_p50": c1.p50 / bwrap.p50,
                "cc1_p50_over_unshare_plus_fork_exec_p50": c1.p50 / floor_sum,
                "cc10_p50_over_cc1_p50": c10.p50 / c1.p50,
                "cc50_p50_over_cc1_p50": c50.p50 / c1.p50,
            },
        }),
    })
}

/// The kernel floors, sampled between the cc=1 samples of every gateway run: a sandbox
/// start by `unshare` and by bubblewrap, and a command by fork+exec.
#[derive(Default)]
pub(crate) struct Floor {
    unshare: Vec<Duration>,
    bwrap: Vec<Duration>,
    fork_exec: Vec<Duration>,
}

impl Floor {
    fn sample(&mut self) -> Res<()> {
        self.unshare.push(stats::unshare_true()?);
        self.bwrap.push(stats::bwrap_true()?);
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
/// load hits all of them alike.
fn measure_gateways(
    rt: &tokio::runtime::Runtime,
    gws: &[&GatewayProc],
    opts: &Opts,
    floor: &mut Floor,
) -> Res<Vec<VariantResult>> {
    let plan = [(1, opts.runs), (10, opts.rounds10), (50, opts.rounds50)];
    let measured = measure_levels(rt, gws, &plan, Some(floor))?;
    let mut out = Vec::new();
    for levels in measured {
        let [cc1, cc10, cc50] = <[LevelResult; 3]>::try_from(levels)
            .map_err(|_| "three concurrency levels were measured")?;
        let json = serde_json::json!({ "cc1": cc1.json, "cc10": cc10.json, "cc50": cc50.json });
        out.push(VariantResult {
            json,
            cc1: cc1.stats,
            cc10: cc10.stats,
            cc50: cc50.stats,
            failed: [cc1.failed, cc10.failed, cc50.failed],
        });
    }
    Ok(out)
}

/// What one gateway measured at one concurrency level.
pub(crate) struct LevelResult {
    pub(crate) json: serde_json::Value,
    /// Create → first output.
    pub(crate) stats: Stats,
    /// Samples that failed.
    pub(crate) failed: usize,
}

/// Measures every gateway at each `(concurrency, rounds)` of `plan`, alternating between them
/// sample by sample (cc=1) and round by round (above), after [`WARMUP`] samples each; with a
/// `floor`, the kernel floor is sampled after each cc=1 pair. Returns, per gateway, one
/// result per level of `plan`.
pub(crate) fn measure_levels(
    rt: &tokio::runtime::Runtime,
    gws: &[&GatewayProc],
    plan: &[(usize, usize)],
    mut floor: Option<&mut Floor>,
) -> Res<Vec<Vec<LevelResult>>> {
    let mut addrs = Vec::new();
    for gw in gws {
        addrs.push(gw.addr()?);
    }
    let mut levels: Vec<Vec<Level>> = gws
        .iter()
        .map(|_| plan.iter().map(|_| Level::default()).collect())
        .collect();
    let mut warmup = Level::default();
    for (gw, addr) in gws.iter().zip(&addrs) {
        for _ in 0..WARMUP {
            rt.block_on(round(*addr, &gw.live, 1, &mut warmup))?;
        }
        gw.take_stages();
    }
    for (l, &(cc, n)) in plan.iter().enumerate() {
        eprintln!("api bench: cc={cc}, {n} rounds per gateway");
        for r in 0..n {
            // In ABBA order (the first gateway of a round is the second of the next), so
            // that neither always follows the other's teardown or meets a machine that has
            // just been quiet.
            let mut order: Vec<usize> = (0..gws.len()).collect();
            if r % 2 == 1 {
                order.reverse();
            }
            for i in order {
                let (gw, addr, level) = (gws[i], addrs[i], &mut levels[i]);
                if cc > 1 {
                    // A burst arrives at a settled machine: the gateways sampled alternately
                    // refill their warm pools after their own bursts, which would otherwise
                    // land on this gateway's (a deployment runs one gateway).
                    settle()?;
                }
                rt.block_on(round(addr, &gw.live, cc, &mut level[l]))?;
                level[l].stages.extend(gw.take_stages());
            }
            if cc == 1 {
                if let Some(floor) = floor.as_deref_mut() {
                    floor.sample()?;
                }
            }
        }
    }
    let mut out = Vec::new();
    for (i, gateway_levels) in levels.iter_mut().enumerate() {
        let mut results = Vec::new();
        for (&(cc, _), l) in plan.iter().zip(gateway_levels.iter_mut()) {
            if !l.failures.is_empty() {
                eprintln!(
                    "api bench: gateway {i}: cc={cc}: {} of {} failed, e.g. {}",
                    l.failures.len(),
                    l.failures.len() + l.samples.len(),
                    l.failures[0]
                );
            }
            let (json, stats, failed) = level_json(l)?;
            results.push(LevelResult {
                json,
                stats,
                failed,
            });
        }
        out.push(results);
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
        "gateway_stages": gateway_stages(&level.stages),
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
    /// The gateway runtime's own account of the sandboxes it brought up meanwhile.
    stages: Vec<RuntimeLine>,
}

/// The gateway runtime's own account of a level: how many creates took a sandbox from its
/// warm pool, `/init`, and the stages of the sandboxes it started meanwhile (on a create's
/// path or refilling the pool). Null when its log had none.
fn gateway_stages(lines: &[RuntimeLine]) -> serde_json::Value {
    if lines.is_empty() {
        return serde_json::Value::Null;
    }
    let stat = |v: Vec<f64>| {
        if v.is_empty() {
            return serde_json::Value::Null;
        }
        let mut d: Vec<Duration> = v
            .iter()
            .map(|ms| Duration::from_secs_f64(ms.max(0.0) / 1000.0))
            .collect();
        Stats::of(&mut d).json()
    };
    let (mut init, mut warm, mut cold) = (Vec::new(), 0, 0);
    let (mut rootfs, mut jail, mut agent) = (Vec::new(), Vec::new(), Vec::new());
    let mut net = Vec::new();
    for line in lines {
        match *line {
            RuntimeLine::Configured { init: ms, warm: w } => {
                init.push(ms);
                if w {
                    warm += 1;
                } else {
                    cold += 1;
                }
            }
            RuntimeLine::Started {
                net: n,
                rootfs: r,
                jail: j,
                agent: a,
            } => {
                net.push(n);
                rootfs.push(r);
                jail.push(j);
                agent.push(a);
            }
        }
    }
    serde_json::json!({
        "what": "the gateway runtime's debug log: creates served from its warm pool or started on the request path, /init, and every sandbox start during the level (on a create's path or refilling the pool); as the runtime logs them, start_network (net_ms) and start_rootfs (rootfs_ms) are both counted from the start of the sandbox start: start_network covers the root filesystem, the run directory and the network attach, start_rootfs that and the /etc files, so the attach alone is start_network with networking on minus the same with it off",
        "creates_from_warm_pool": warm,
        "creates_started_on_request": cold,
        "init": stat(init),
        "starts": rootfs.len(),
        "start_network": stat(net),
        "start_rootfs": stat(rootfs),
        "start_jail": stat(jail),
        "start_agent_socket": stat(agent),
    })
}

/// Waits (at most [`SETTLE_LIMIT`]) until the machine's CPU is under 10% busy over
/// [`SETTLE_WINDOW`].
pub(crate) fn settle() -> Res<()> {
    let deadline = Instant::now() + SETTLE_LIMIT;
    let capacity_ms = u64::try_from(cpus()).unwrap_or(1)
        * u64::try_from(SETTLE_WINDOW.as_millis()).unwrap_or(100);
    loop {
        let before = cpu_busy_ms()?;
        std::thread::sleep(SETTLE_WINDOW);
        let busy = cpu_busy_ms()?.saturating_sub(before);
        if busy * 10 < capacity_ms || Instant::now() > deadline {
            return Ok(());
        }
    }
}

/// How long [`settle`] measures the machine's CPU for, each time.
const SETTLE_WINDOW: Duration = Duration::from_millis(100);
/// The longest [`settle`] waits.
const SETTLE_LIMIT: Duration = Duration::from_secs(10);

/// Busy CPU time of the whole machine so far, in ms (`/proc/stat`, 10 ms ticks).
pub(crate) fn cpu_busy_ms() -> Res<u64> {
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

/// `POST /v2/sandboxes`, then `process.Start` through the data plane until the first stdout
/// frame. Returns (create→first output, create→create response, sandbox id).
pub(crate) async fn create_and_run(
    sender: &mut Sender,
    live: &Live,
) -> Res<(Duration, Duration, String)> {
    let t0 = Instant::now();
    let sbx = client::create(sender, live, BASE).await?;
    let created = t0.elapsed();
    let first = start_to_first_output(sender, &sbx, Via::Gateway, t0).await?;
    Ok((first, created, sbx.id))
}

/// The gateway runtime's create, rebuilt here from the same backends with a clock around
/// each stage (`Runtime::create_inner` in `src/runtime.rs`).
pub(crate) struct Replica {
    dir: PathBuf,
    storage: OverlayStorage,
    jail: LinuxJail,
    layer: LayerId,
    agent: PathBuf,
    live: Mutex<HashSet<SandboxId>>,
}

/// Stage durations of one replica create.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stages {
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
    pub(crate) fn open(agent: &Path) -> Res<(Self, tempfile::TempDir)> {
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

    pub(crate) async fn create(&self, n: usize) -> Res<(SandboxId, Stages)> {
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
            network: None,
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
        let sbx = Sandbox {
            id: id.to_string(),
            token: token.to_owned(),
        };
        let total = start_to_first_output(&mut sender, &sbx, Via::Agent, t0).await?;
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

    pub(crate) async fn destroy(&self, id: &SandboxId) -> Res<()> {
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

    /// Kills whatever is still alive (after an error) and removes the jail's spare memory
    /// cgroups.
    pub(crate) async fn destroy_all(&self) {
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
        // The jail keeps emptied memory cgroups for reuse; nothing reuses these.
        if let Err(e) = self.jail.remove_spare_cgroups() {
            eprintln!("api bench: removing the replica's spare memory cgroups: {e}");
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
