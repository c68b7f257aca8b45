//! Part `scale` (issue 13, "A host that stays healthy"): one gateway of its own (`--warm-pool
//! 0`, `--max-sandboxes` above the largest count, `--min-free-memory 256M`) driven to thousands
//! of live sandboxes, in this order:
//!
//! 1. **Churn** (`--cycles`, default 5,000, after `--warmup-cycles` 50): create, run a command,
//!    kill, one after another; the kernel's memory-cgroup count (`/proc/cgroups`, dying ones
//!    included) and `SUnreclaim` before and after, and the cycle rate.
//! 2. **Bursts on the empty gateway**: `--bursts` (5) bursts of `--burst-cc` (50) concurrent
//!    create → first output, the baseline for step 4.
//! 3. **The jail's own teardown** (`--jail-baseline`, 1,000; 0 skips it): as many sandboxes
//!    started in this process from the same backends (create.rs `Replica`) and killed
//!    `--kill-cc` (32) at a time, without the gateway: the rate the API's teardown is put
//!    beside.
//! 4. **For each of `--sandboxes`** (1000,10000): fill to the count `--fill-cc` (16) at a time;
//!    on the way, at `--live` (5,000) live, the same bursts again; host memory per sandbox
//!    (`MemAvailable`, `SUnreclaim`, `Slab`, memory cgroups, the sandboxes' cgroup charge);
//!    `kill -9` of the gateway and a restart on the same port and state directory (spawn →
//!    port accepting, spawn → `/health` 200), `--check` (200) sandboxes spread over the lot
//!    run a command; a graceful restart (SIGTERM) timed the same way; then every sandbox killed
//!    through `DELETE /sandboxes/{id}`, `--kill-cc` at a time, and the jail's records directory
//!    checked empty.
//!
//! Before anything it reads the host limits the largest count needs (`kernel.pid_max`,
//! `threads-max`, memory, the gateway's open files) and fails naming the one that would stop
//! it, rather than measuring fewer. Every wait is bounded; the gateway and every sandbox go
//! whatever happens (`GatewayProc`).

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::client::{self, check_interrupted, connect, delete, live_set, timeout, Res};
use crate::client::{Sandbox, Sender, Via};
use crate::create::{cpu_busy_ms, create_and_run, settle, Replica};
use crate::density::{join_all, kib_field, sum_memory};
use crate::gateway::{GatewayProc, Restarted, Stop};
use crate::stats::{self, Figure, Stats};
use crate::{Ctx, Report};

/// An idle sandbox that outlives the whole part (the longest timeout the gateway accepts).
const IDLE: &str = r#"{"templateID":"base","timeout":86400,"metadata":{},"envVars":{}}"#;
/// How long the machine is left alone before memory is read.
const SETTLE: Duration = Duration::from_secs(3);
/// A fill or teardown gives up after this many failed requests (a limit, not a hiccup).
const GIVE_UP_AFTER: usize = 20;
/// Host memory a sandbox is assumed to need when checking the limits (density measured
/// 0.7–1.3 MiB).
const MIB_PER_SANDBOX_ASSUMED: u64 = 2;
/// Tasks (pids) one idle sandbox holds: its agent and one thread of it (`density`).
const TASKS_PER_SANDBOX: u64 = 2;

/// The part's counts, all settable so a developer can run it small.
#[derive(Debug)]
pub(crate) struct ScaleOpts {
    sandboxes: Vec<usize>,
    live: usize,
    bursts: usize,
    burst_cc: usize,
    cycles: usize,
    warmup_cycles: usize,
    fill_cc: usize,
    kill_cc: usize,
    check: usize,
    jail_baseline: usize,
}

impl ScaleOpts {
    /// Reads `--sandboxes 1000,10000 --live N --bursts N --burst-cc N --cycles N
    /// --warmup-cycles N --fill-cc N --kill-cc N --check N --jail-baseline N`.
    pub(crate) fn from_args() -> Res<Self> {
        let mut sandboxes: Vec<usize> = match stats::arg("--sandboxes") {
            Some(list) => list
                .split(',')
                .map(|n| n.trim().parse::<usize>())
                .collect::<Result<_, _>>()
                .map_err(|e| format!("--sandboxes {list:?}: {e}"))?,
            None => vec![1000, 10_000],
        };
        sandboxes.sort_unstable();
        sandboxes.dedup();
        if sandboxes.first().is_none_or(|n| *n == 0) {
            return Err("--sandboxes needs counts of at least 1".into());
        }
        let num = |name: &str, default: usize, min: usize| -> Res<usize> {
            let n = stats::num_arg(name, default)?;
            if n < min {
                return Err(format!("{name} must be at least {min}").into());
            }
            Ok(n)
        };
        let o = Self {
            live: num("--live", 5000, 1)?,
            bursts: num("--bursts", 5, 1)?,
            burst_cc: num("--burst-cc", 50, 1)?,
            cycles: num("--cycles", 5000, 1)?,
            warmup_cycles: num("--warmup-cycles", 50, 0)?,
            fill_cc: num("--fill-cc", 16, 1)?,
            kill_cc: num("--kill-cc", 32, 1)?,
            check: num("--check", 200, 1)?,
            jail_baseline: num("--jail-baseline", 1000, 0)?,
            sandboxes,
        };
        if o.sandboxes.iter().all(|n| *n < o.live) {
            return Err(format!(
                "--live {} is more than the largest of --sandboxes {:?}",
                o.live, o.sandboxes
            )
            .into());
        }
        Ok(o)
    }

    fn largest(&self) -> usize {
        self.sandboxes.last().copied().unwrap_or(0)
    }
}

/// The host figures this part reads before and after.
#[derive(Debug, Clone, Copy)]
struct Kernel {
    mem_available_kib: u64,
    sunreclaim_kib: u64,
    slab_kib: u64,
    /// `memory`'s `num_cgroups` in `/proc/cgroups`, dying cgroups included.
    memory_cgroups: u64,
    /// Threads of the whole machine (each takes a pid).
    tasks: u64,
    gateway_rss_kib: u64,
    gateway_fds: usize,
}

impl Kernel {
    fn take(gateway: u32) -> Res<Self> {
        let meminfo = std::fs::read_to_string("/proc/meminfo")?;
        let status = std::fs::read_to_string(format!("/proc/{gateway}/status"))?;
        Ok(Self {
            mem_available_kib: kib_field(&meminfo, "MemAvailable:")?,
            sunreclaim_kib: kib_field(&meminfo, "SUnreclaim:")?,
            slab_kib: kib_field(&meminfo, "Slab:")?,
            memory_cgroups: memory_cgroups()?,
            tasks: tasks()?,
            gateway_rss_kib: kib_field(&status, "VmRSS:")?,
            gateway_fds: std::fs::read_dir(format!("/proc/{gateway}/fd"))?.count(),
        })
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "mem_available_kib": self.mem_available_kib,
            "sunreclaim_kib": self.sunreclaim_kib,
            "slab_kib": self.slab_kib,
            "memory_cgroups": self.memory_cgroups,
            "tasks": self.tasks,
            "gateway_rss_kib": self.gateway_rss_kib,
            "gateway_fds": self.gateway_fds,
        })
    }
}

fn memory_cgroups() -> Res<u64> {
    std::fs::read_to_string("/proc/cgroups")?
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next()? == "memory").then(|| f.nth(1)?.parse().ok())?
        })
        .ok_or_else(|| "no memory line in /proc/cgroups".into())
}

fn tasks() -> Res<u64> {
    std::fs::read_to_string("/proc/loadavg")?
        .split_whitespace()
        .nth(3)
        .and_then(|f| f.split_once('/'))
        .and_then(|(_, total)| total.parse().ok())
        .ok_or_else(|| "no task count in /proc/loadavg".into())
}

/// `after` over `before`, in percent.
#[allow(clippy::cast_precision_loss, reason = "kernel counters far below 2^52")]
fn growth(before: u64, after: u64) -> f64 {
    (after as f64 - before as f64) * 100.0 / before.max(1) as f64
}

/// `a - b` over `n`, for counters that may move either way.
#[allow(clippy::cast_precision_loss, reason = "kernel counters far below 2^52")]
fn per(a: u64, b: u64, n: usize) -> f64 {
    (a as f64 - b as f64) / n.max(1) as f64
}

/// What running `f` over many items gave.
struct Spread {
    ok: Vec<Duration>,
    failed: Vec<String>,
    wall: Duration,
    /// Machine-wide busy CPU meanwhile, in ms.
    cpu_ms: u64,
}

impl Spread {
    #[allow(clippy::cast_precision_loss, reason = "counts")]
    fn rate(&self) -> f64 {
        self.ok.len() as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    fn json(&self) -> serde_json::Value {
        let mut ok = self.ok.clone();
        #[allow(clippy::cast_precision_loss, reason = "counts")]
        let cpu_per_item = self.cpu_ms as f64 / (self.ok.len() + self.failed.len()).max(1) as f64;
        serde_json::json!({
            "done": self.ok.len(),
            "failed": self.failed.len(),
            "failures": self.failed.iter().take(5).collect::<Vec<_>>(),
            "seconds": self.wall.as_secs_f64(),
            "per_second": self.rate(),
            "latency": (!ok.is_empty()).then(|| Stats::of(&mut ok).json()),
            "machine_busy_cpu_ms_per_item": cpu_per_item,
        })
    }
}

/// Runs `f(state, i)` for every `i` in `0..n` from `workers` workers, each with a state from
/// `init` (a connection), renewed after a failure. A failure is a result, not a reason to stop,
/// until [`GIVE_UP_AFTER`] of them.
async fn spread<S, I, F>(workers: usize, n: usize, init: I, f: F) -> Res<Spread>
where
    I: AsyncFn() -> Res<S>,
    F: AsyncFn(&mut S, usize) -> Res<()>,
{
    let next = AtomicUsize::new(0);
    let failures = AtomicUsize::new(0);
    let mut states = Vec::with_capacity(workers);
    for _ in 0..workers.min(n) {
        states.push(init().await?);
    }
    let (cpu0, t0) = (cpu_busy_ms()?, Instant::now());
    let (next, failures, init, f) = (&next, &failures, &init, &f);
    let work = states.into_iter().map(|mut state| async move {
        let (mut ok, mut failed) = (Vec::new(), Vec::new());
        while failures.load(Ordering::Relaxed) < GIVE_UP_AFTER && check_interrupted().is_ok() {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                break;
            }
            let t = Instant::now();
            match f(&mut state, i).await {
                Ok(()) => ok.push(t.elapsed()),
                Err(e) => {
                    failed.push(format!("#{i}: {e}"));
                    failures.fetch_add(1, Ordering::Relaxed);
                    match init().await {
                        Ok(fresh) => state = fresh,
                        Err(e) => {
                            failed.push(format!("renewing the connection: {e}"));
                            break;
                        }
                    }
                }
            }
        }
        (ok, failed)
    });
    let mut out = Spread {
        ok: Vec::with_capacity(n),
        failed: Vec::new(),
        wall: Duration::ZERO,
        cpu_ms: 0,
    };
    for (ok, failed) in join_all(work).await {
        out.ok.extend(ok);
        out.failed.extend(failed);
    }
    out.wall = t0.elapsed();
    out.cpu_ms = cpu_busy_ms()?.saturating_sub(cpu0);
    check_interrupted()?;
    Ok(out)
}

/// The gateway's sandboxes, added to by [`fill`] and taken by [`teardown`].
type Pool = Mutex<Vec<Sandbox>>;

/// Creates idle sandboxes until `pool` holds `target`; fails (naming the error and what the
/// gateway logged) if it cannot, rather than measuring fewer.
fn fill(ctx: &Ctx<'_>, gw: &GatewayProc, pool: &Pool, target: usize, cc: usize) -> Res<Spread> {
    let have = lock(pool).len();
    let want = target.saturating_sub(have);
    let (addr, live) = (gw.addr()?, &gw.live);
    eprintln!("api bench: scale: {have} → {target} live sandboxes, {cc} creates at a time");
    let done = ctx.rt.block_on(spread(
        cc,
        want,
        async || connect(addr).await,
        async |s: &mut Sender, _| {
            let sbx = timeout(client::create(s, live, IDLE)).await?;
            let mut p = lock(pool);
            p.push(sbx);
            if p.len().is_multiple_of(1000) {
                eprintln!("api bench: scale: {} live", p.len());
            }
            Ok(())
        },
    ))?;
    let now = lock(pool).len();
    if now < target {
        return Err(format!(
            "only {now} of {target} sandboxes could be created ({} creates failed, e.g. {:?}); gateway log:\n{}",
            done.failed.len(),
            done.failed.iter().take(3).collect::<Vec<_>>(),
            gw.log_tail()
        )
        .into());
    }
    Ok(done)
}

/// Kills every sandbox of `pool` through the API, `cc` at a time.
fn teardown(ctx: &Ctx<'_>, gw: &GatewayProc, pool: &Pool, cc: usize) -> Res<Spread> {
    let ids: Vec<String> = lock(pool).iter().map(|s| s.id.clone()).collect();
    let (addr, live) = (gw.addr()?, &gw.live);
    eprintln!(
        "api bench: scale: killing {} sandboxes, {cc} at a time",
        ids.len()
    );
    let ids = &ids;
    let done = ctx.rt.block_on(spread(
        cc,
        ids.len(),
        async || connect(addr).await,
        async |s: &mut Sender, i| timeout(delete(s, live, &ids[i])).await.map(drop),
    ))?;
    let gone: HashSet<&String> = ids
        .iter()
        .filter(|id| !live_set(live).contains(*id))
        .collect();
    lock(pool).retain(|s| !gone.contains(&s.id));
    Ok(done)
}

/// `check` sandboxes spread evenly over `pool` each run a command through the gateway.
fn answer(ctx: &Ctx<'_>, gw: &GatewayProc, pool: &Pool, check: usize) -> Res<Spread> {
    let all = lock(pool).clone();
    let step = (all.len() / check.max(1)).max(1);
    let sample: Vec<Sandbox> = all.iter().step_by(step).take(check).cloned().collect();
    let addr = gw.addr()?;
    let sample = &sample;
    ctx.rt.block_on(spread(
        8,
        sample.len(),
        async || connect(addr).await,
        async |s: &mut Sender, i| client::command(s, &sample[i], Via::Gateway).await.map(drop),
    ))
}

/// Files in the gateway's jail directories: records (one per sandbox the jail knows), roots
/// and logs; all empty once every sandbox is gone.
fn jail_leftovers(gw: &GatewayProc) -> Res<serde_json::Value> {
    let jail = gw.state_dir()?.join("jail");
    let count = |d: &str| -> usize {
        std::fs::read_dir(jail.join(d)).map_or(0, |entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .count()
        })
    };
    Ok(serde_json::json!({
        "records": count("sandboxes"),
        "roots": count("roots"),
        "logs": count("logs"),
        "run_dirs": std::fs::read_dir(gw.state_dir()?.join("run")).map_or(0, Iterator::count),
    }))
}

/// `bursts` bursts of `cc` concurrent create → first output on the gateway as it stands;
/// each burst's sandboxes are killed after it, and the next waits for a settled machine.
fn bursts(ctx: &Ctx<'_>, gw: &GatewayProc, rounds: usize, cc: usize) -> Res<serde_json::Value> {
    let (addr, live) = (gw.addr()?, &gw.live);
    let mut total = Vec::with_capacity(rounds * cc);
    let mut call = Vec::with_capacity(rounds * cc);
    let mut failures = Vec::new();
    let mut kills = Vec::new();
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    for _ in 0..rounds {
        settle()?;
        let before: HashSet<String> = live_set(live).clone();
        ctx.rt.block_on(async {
            let start = Arc::new(tokio::sync::Barrier::new(cc));
            let tasks: Vec<_> = (0..cc)
                .map(|_| {
                    let (start, live) = (Arc::clone(&start), Arc::clone(live));
                    tokio::spawn(async move {
                        let conn = connect(addr).await;
                        start.wait().await;
                        let mut s = conn?;
                        let r = timeout(create_and_run(&mut s, &live)).await?;
                        Ok::<_, client::BoxError>(r)
                    })
                })
                .collect();
            for t in tasks {
                match t.await {
                    Ok(Ok((t, c, _))) => {
                        total.push(t);
                        call.push(c);
                    }
                    Ok(Err(e)) => failures.push(e.to_string()),
                    Err(e) => failures.push(e.to_string()),
                }
            }
            // This burst's sandboxes, whether their command answered or not.
            let mine: Vec<String> = live_set(live)
                .iter()
                .filter(|id| !before.contains(*id))
                .cloned()
                .collect();
            let mut s = connect(addr).await?;
            for id in mine {
                kills.push(timeout(delete(&mut s, live, &id)).await?);
            }
            Ok::<_, client::BoxError>(())
        })?;
    }
    if total.is_empty() {
        return Err(format!(
            "every create of the bursts failed, e.g. {:?}",
            failures.first()
        )
        .into());
    }
    Ok(serde_json::json!({
        "create_to_first_output": Stats::of(&mut total).json(),
        "create_call": Stats::of(&mut call).json(),
        "kill": (!kills.is_empty()).then(|| Stats::of(&mut kills).json()),
        "failed": failures.len(),
        "failures": failures.iter().take(3).collect::<Vec<_>>(),
        "loadavg_at_start": loadavg.trim(),
        "samples_ms": total.iter().map(|d| d.as_secs_f64() * 1000.0).collect::<Vec<_>>(),
    }))
}

/// The stats of a [`bursts`] result (its samples).
fn burst_stats(v: &serde_json::Value) -> Stats {
    let mut d: Vec<Duration> = v["samples_ms"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(serde_json::Value::as_f64)
                .map(|ms| Duration::from_secs_f64(ms / 1000.0))
                .collect()
        })
        .unwrap_or_default();
    if d.is_empty() {
        d.push(Duration::ZERO);
    }
    Stats::of(&mut d)
}

/// Create, a command, kill, `n` times in a row.
fn cycles(ctx: &Ctx<'_>, gw: &GatewayProc, n: usize) -> Res<Spread> {
    let (addr, live) = (gw.addr()?, &gw.live);
    ctx.rt.block_on(spread(
        1,
        n,
        async || connect(addr).await,
        async |s: &mut Sender, _| {
            let sbx = timeout(client::create(s, live, IDLE)).await?;
            let ran = client::command(s, &sbx, Via::Gateway).await;
            timeout(delete(s, live, &sbx.id)).await?;
            ran.map(drop)
        },
    ))
}

/// The jail's own teardown: `n` sandboxes started in this process from the same backends as
/// the gateway's runtime (storage, jail, agent, `/init`), then killed `cc` at a time as the
/// runtime kills one (jail kill, root removal, run directory).
fn jail_teardown(ctx: &Ctx<'_>, n: usize, cc: usize, fill_cc: usize) -> Res<Spread> {
    let agent = ctx
        .opts
        .agent
        .clone()
        .unwrap_or_else(|| ctx.opts.gateway.clone());
    eprintln!("api bench: scale: jail baseline: {n} sandboxes without the gateway");
    let (replica, dir) = Replica::open(&agent)?;
    let measured = ctx.rt.block_on(async {
        let ids = Mutex::new(Vec::with_capacity(n));
        let replica = &replica;
        let ids_ref = &ids;
        let started = spread(
            fill_cc,
            n,
            async || Ok(()),
            async |(): &mut (), i| {
                let (id, _) = timeout(replica.create(i)).await?;
                lock(ids_ref).push(id);
                Ok(())
            },
        )
        .await?;
        let ids = std::mem::take(&mut *lock(&ids));
        if ids.len() < n {
            return Err(format!(
                "only {} of {n} sandboxes started without the gateway, e.g. {:?}",
                ids.len(),
                started.failed.first()
            )
            .into());
        }
        let ids = &ids;
        spread(
            cc,
            ids.len(),
            async || Ok(()),
            async |(): &mut (), i| timeout(replica.destroy(&ids[i])).await,
        )
        .await
    });
    ctx.rt.block_on(replica.destroy_all());
    drop(replica);
    let closed = dir.close();
    let m = measured?;
    closed?;
    Ok(m)
}

/// The host limits `n` sandboxes need, read; fails naming the first that would stop them.
fn preflight(n: usize, burst: usize) -> Res<serde_json::Value> {
    let read = |p: &str| -> Option<u64> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    let available = kib_field(&meminfo, "MemAvailable:")?;
    let pid_max = read("/proc/sys/kernel/pid_max").ok_or("no kernel.pid_max")?;
    let threads_max = read("/proc/sys/kernel/threads-max").ok_or("no kernel.threads-max")?;
    let now = tasks()?;
    let cgroups = memory_cgroups()?;
    let (_, nofile_hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    let count = u64::try_from(n + burst)?;
    let tasks_needed = now + count * TASKS_PER_SANDBOX;
    let mem_needed_kib = count * MIB_PER_SANDBOX_ASSUMED * 1024 + 256 * 1024;
    let limits = serde_json::json!({
        "sandboxes": n + burst,
        "kernel.pid_max": pid_max,
        "kernel.threads-max": threads_max,
        "tasks_now": now,
        "tasks_needed": tasks_needed,
        "mem_available_kib": available,
        "mem_needed_kib_assumed": mem_needed_kib,
        "memory_cgroups_now": cgroups,
        "memory_cgroups_max_v1": 65_535,
        "open_files_hard_limit_the_gateway_raises_to": nofile_hard,
        "fs.file-max": read("/proc/sys/fs/file-max"),
        "fs.mount-max": read("/proc/sys/fs/mount-max"),
        "user.max_user_namespaces": read("/proc/sys/user/max_user_namespaces"),
        "user.max_mnt_namespaces": read("/proc/sys/user/max_mnt_namespaces"),
    });
    let hit = if tasks_needed > pid_max.min(threads_max) {
        Some(format!(
            "{} sandboxes need about {tasks_needed} tasks ({now} now + {TASKS_PER_SANDBOX} each) but kernel.pid_max is {pid_max} and threads-max {threads_max} (raise with sysctl kernel.pid_max)",
            n + burst
        ))
    } else if mem_needed_kib > available {
        Some(format!(
            "{} sandboxes need about {} MiB but MemAvailable is {} MiB",
            n + burst,
            mem_needed_kib / 1024,
            available / 1024
        ))
    } else if cgroups + count > 65_535 {
        Some(format!(
            "{} more memory cgroups would pass cgroup v1's 65,535 ({cgroups} now)",
            n + burst
        ))
    } else {
        None
    };
    match hit {
        Some(limit) => Err(format!("host limit: {limit}; limits read: {limits}").into()),
        None => Ok(limits),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) fn run(ctx: &Ctx<'_>) -> Res<Report> {
    let o = &ctx.opts.scale;
    let limits = preflight(o.largest(), o.burst_cc)?;
    // The sandboxes a killed gateway leaves are reaped here, as a service manager would.
    crate::orphans::adopt()?;
    let max = (o.largest() + o.burst_cc + 64).to_string();
    let agent = ctx
        .opts
        .agent
        .clone()
        .unwrap_or_else(|| ctx.opts.gateway.clone());
    let args = [
        "--warm-pool",
        "0",
        "--max-sandboxes",
        &max,
        "--min-free-memory",
        "256M",
    ];
    eprintln!(
        "api bench: scale: a gateway of its own ({})",
        args.join(" ")
    );
    let mut gw = GatewayProc::spawn(&ctx.opts.gateway, &agent, &args)?;
    let measured = gw.wait_ready().and_then(|()| measure(ctx, &mut gw, limits));
    let cleanup = gw.shutdown(ctx.rt);
    let report = measured?;
    cleanup?;
    Ok(report)
}

/// One count's results.
struct Round {
    n: usize,
    json: serde_json::Value,
    host_mib: f64,
    teardown: Spread,
    crash: Restarted,
    graceful: Restarted,
    answered: (usize, usize),
    records_left: u64,
}

fn measure(ctx: &Ctx<'_>, gw: &mut GatewayProc, limits: serde_json::Value) -> Res<Report> {
    let o = &ctx.opts.scale;
    let pool: Pool = Mutex::new(Vec::new());

    // 1. Churn.
    eprintln!(
        "api bench: scale: {} warm-up cycles, then {} create+command+kill cycles",
        o.warmup_cycles, o.cycles
    );
    if o.warmup_cycles > 0 {
        let warm = cycles(ctx, gw, o.warmup_cycles)?;
        if !warm.failed.is_empty() {
            return Err(format!("warm-up cycles failed: {:?}", warm.failed.first()).into());
        }
    }
    std::thread::sleep(SETTLE);
    let k0 = Kernel::take(gw.pid())?;
    let churn = cycles(ctx, gw, o.cycles)?;
    std::thread::sleep(SETTLE);
    let k1 = Kernel::take(gw.pid())?;
    let cg_growth = growth(k0.memory_cgroups, k1.memory_cgroups);
    let su_growth = growth(k0.sunreclaim_kib, k1.sunreclaim_kib);
    eprintln!(
        "api bench: scale: churn: {} cycles at {:.0}/s; memory cgroups {} → {} ({cg_growth:+.1}%), SUnreclaim {} → {} kB ({su_growth:+.1}%)",
        churn.ok.len(),
        churn.rate(),
        k0.memory_cgroups,
        k1.memory_cgroups,
        k0.sunreclaim_kib,
        k1.sunreclaim_kib
    );

    // 2. Bursts on the empty gateway.
    eprintln!(
        "api bench: scale: {} bursts of {} on the empty gateway",
        o.bursts, o.burst_cc
    );
    let empty = bursts(ctx, gw, o.bursts, o.burst_cc)?;

    // 3. The jail's own teardown.
    let jail = if o.jail_baseline > 0 {
        Some(jail_teardown(ctx, o.jail_baseline, o.kill_cc, o.fill_cc)?)
    } else {
        None
    };

    // 4. Each count.
    let mut rounds: Vec<Round> = Vec::new();
    let mut loaded = None;
    for &n in &o.sandboxes {
        settle()?;
        std::thread::sleep(SETTLE);
        let m0 = Kernel::take(gw.pid())?;
        let t_fill = Instant::now();
        let mut fills = Vec::new();
        if loaded.is_none() && o.live <= n {
            fills.push(fill(ctx, gw, &pool, o.live, o.fill_cc)?);
            eprintln!(
                "api bench: scale: {} bursts of {} with {} live",
                o.bursts, o.burst_cc, o.live
            );
            loaded = Some(bursts(ctx, gw, o.bursts, o.burst_cc)?);
        }
        fills.push(fill(ctx, gw, &pool, n, o.fill_cc)?);
        let fill_secs = t_fill.elapsed().as_secs_f64();
        std::thread::sleep(SETTLE);
        let m1 = Kernel::take(gw.pid())?;
        let sandboxes = lock(&pool).clone();
        let (used, cache) = ctx.rt.block_on(sum_memory(gw.addr()?, &sandboxes))?;
        #[allow(clippy::cast_precision_loss, reason = "bytes far below 2^52")]
        let cgroup_mib = (used + cache) as f64 / (1024.0 * 1024.0) / n as f64;
        let host_mib = per(m0.mem_available_kib, m1.mem_available_kib, n) / 1024.0;

        eprintln!("api bench: scale: kill -9 of the gateway with {n} live, and a restart");
        let crash = gw.restart(Stop::Kill)?;
        eprintln!(
            "api bench: scale: listening after {:.0} ms, /health 200 after {:.0} ms",
            crash.listening.as_secs_f64() * 1000.0,
            crash.healthy.as_secs_f64() * 1000.0
        );
        let after_crash = answer(ctx, gw, &pool, o.check)?;
        eprintln!("api bench: scale: SIGTERM of the gateway with {n} live, and a restart");
        let graceful = gw.restart(Stop::Term)?;
        eprintln!(
            "api bench: scale: old one gone after {:.0} ms; listening after {:.0} ms, /health 200 after {:.0} ms",
            graceful.stopped.as_secs_f64() * 1000.0,
            graceful.listening.as_secs_f64() * 1000.0,
            graceful.healthy.as_secs_f64() * 1000.0
        );
        let after_graceful = answer(ctx, gw, &pool, o.check)?;
        let m2 = Kernel::take(gw.pid())?;

        let teardown = teardown(ctx, gw, &pool, o.kill_cc)?;
        eprintln!(
            "api bench: scale: {} killed in {:.1} s ({:.0}/s), {} failed",
            teardown.ok.len(),
            teardown.wall.as_secs_f64(),
            teardown.rate(),
            teardown.failed.len()
        );
        let left = jail_leftovers(gw)?;
        std::thread::sleep(SETTLE);
        let m3 = Kernel::take(gw.pid())?;
        let answered = (
            after_crash.ok.len() + after_graceful.ok.len(),
            after_crash.ok.len()
                + after_crash.failed.len()
                + after_graceful.ok.len()
                + after_graceful.failed.len(),
        );
        let records_left = left["records"].as_u64().unwrap_or(u64::MAX);
        let json = serde_json::json!({
            "sandboxes": n,
            "fill": fills.iter().map(Spread::json).collect::<Vec<_>>(),
            "fill_seconds_with_bursts": fill_secs,
            "memory": {
                "host_mib_per_sandbox": host_mib,
                "cgroup_charge_mib_per_sandbox": cgroup_mib,
                "metrics_mem_used_bytes": used,
                "metrics_mem_cache_bytes": cache,
                "sunreclaim_kib_per_sandbox": per(m1.sunreclaim_kib, m0.sunreclaim_kib, n),
                "slab_kib_per_sandbox": per(m1.slab_kib, m0.slab_kib, n),
                "memory_cgroups_per_sandbox": per(m1.memory_cgroups, m0.memory_cgroups, n),
                "gateway_rss_kib_per_sandbox": per(m1.gateway_rss_kib, m0.gateway_rss_kib, n),
                "tasks_per_sandbox": per(m1.tasks, m0.tasks, n),
            },
            "restart_after_kill_9": crash.json(),
            "commands_after_kill_9": after_crash.json(),
            "restart_after_sigterm": graceful.json(),
            "commands_after_sigterm": after_graceful.json(),
            "teardown": teardown.json(),
            "left_in_the_jail_after_teardown": left,
            "mem_available_recovered_after_teardown_mib": per(m3.mem_available_kib, m2.mem_available_kib, 1) / 1024.0,
            "before": m0.json(),
            "full": m1.json(),
            "full_after_restarts": m2.json(),
            "after_teardown": m3.json(),
        });
        if !teardown.failed.is_empty() {
            return Err(format!(
                "{} of {n} kills failed, e.g. {:?}",
                teardown.failed.len(),
                teardown.failed.first()
            )
            .into());
        }
        rounds.push(Round {
            n,
            json,
            host_mib,
            teardown,
            crash,
            graceful,
            answered,
            records_left,
        });
    }
    let loaded = loaded.ok_or("no count reached --live")?;
    Ok(report(
        o,
        &churn,
        &k0,
        &k1,
        &empty,
        &loaded,
        jail.as_ref(),
        &rounds,
        limits,
    ))
}

#[allow(
    clippy::too_many_arguments,
    reason = "the part's results, put together once"
)]
#[allow(clippy::cast_precision_loss, reason = "counts")]
fn report(
    o: &ScaleOpts,
    churn: &Spread,
    k0: &Kernel,
    k1: &Kernel,
    empty: &serde_json::Value,
    loaded: &serde_json::Value,
    jail: Option<&Spread>,
    rounds: &[Round],
    limits: serde_json::Value,
) -> Report {
    let secs = |d: Duration| d.as_secs_f64();
    let mut figures = Vec::new();
    let first = rounds.first();
    for r in rounds {
        let n = r.n;
        let big = n >= 10_000;
        let mut f = Figure::value(
            &format!("scale.readopt_health_{n}"),
            &format!("kill -9 with {n} live, restart: spawn → /health 200"),
            "s",
            secs(r.crash.healthy),
            false,
        )
        .note(&format!(
            "port accepting after {:.3} s",
            secs(r.crash.listening)
        ));
        if big {
            f = f.target("≤ 10 s", secs(r.crash.healthy) <= 10.0);
        }
        figures.push(f);
        figures.push(Figure::value(
            &format!("scale.readopt_listening_{n}"),
            &format!("kill -9 with {n} live, restart: spawn → port accepting"),
            "s",
            secs(r.crash.listening),
            false,
        ));
        figures.push(
            Figure::value(
                &format!("scale.graceful_health_{n}"),
                &format!("SIGTERM with {n} live, restart: spawn → /health 200"),
                "s",
                secs(r.graceful.healthy),
                false,
            )
            .note(&format!(
                "the old process took {:.2} s to exit",
                secs(r.graceful.stopped)
            )),
        );
        let (ok, asked) = r.answered;
        figures.push(
            Figure::value(
                &format!("scale.answered_after_restarts_{n}"),
                &format!("share of a sample answering a command after each restart, {n} live"),
                "%",
                ok as f64 * 100.0 / asked.max(1) as f64,
                true,
            )
            .target("100%", ok == asked && asked > 0)
            .note(&format!("{asked} commands")),
        );
        let mut t = Figure::value(
            &format!("scale.teardown_rate_{n}"),
            &format!(
                "teardown of {n} through DELETE /sandboxes/{{id}}, {} at a time",
                o.kill_cc
            ),
            "sandboxes/s",
            r.teardown.rate(),
            true,
        )
        .target("≥ 200/s", r.teardown.rate() >= 200.0);
        if let Some(j) = jail {
            t = t.floor(
                &format!("the jail's own teardown of {}", j.ok.len()),
                j.rate(),
            );
        }
        if let Some(f) = first.filter(|f| f.n < n) {
            t = t.floor(&format!("the same at {}", f.n), f.teardown.rate());
        }
        figures.push(t);
        figures.push(
            Figure::value(
                &format!("scale.left_after_teardown_{n}"),
                &format!("jail records left after killing {n}"),
                "records",
                r.records_left as f64,
                false,
            )
            .target("0", r.records_left == 0),
        );
        let mut m = Figure::value(
            &format!("scale.host_mib_per_sandbox_{n}"),
            &format!("host memory per idle sandbox at {n} (drop in MemAvailable / count)"),
            "MiB",
            r.host_mib,
            false,
        )
        .note("other work on the machine moves MemAvailable too");
        if let Some(f) = first.filter(|f| f.n < n) {
            m = m.floor(&format!("the same at {}", f.n), f.host_mib);
        }
        figures.push(m);
        let mem = &r.json["memory"];
        for (key, what, unit) in [
            (
                "cgroup_charge_mib_per_sandbox",
                "sandbox cgroup charge per idle sandbox (metrics memUsed + memCache)",
                "MiB",
            ),
            (
                "sunreclaim_kib_per_sandbox",
                "SUnreclaim growth per idle sandbox",
                "KiB",
            ),
            (
                "slab_kib_per_sandbox",
                "Slab growth per idle sandbox",
                "KiB",
            ),
            (
                "memory_cgroups_per_sandbox",
                "memory cgroups (/proc/cgroups) added per idle sandbox",
                "cgroups",
            ),
        ] {
            figures.push(Figure::value(
                &format!("scale.{}_{n}", key.trim_end_matches("_per_sandbox")),
                &format!("{what}, at {n}"),
                unit,
                mem[key].as_f64().unwrap_or(f64::NAN),
                false,
            ));
        }
    }
    let e = burst_stats(empty);
    let l = burst_stats(loaded);
    figures.push(
        Figure::latency(
            "scale.burst_loaded",
            &format!(
                "create → first output, cc={}, {} live sandboxes",
                o.burst_cc, o.live
            ),
            &l,
        )
        .floor("the same burst on the empty gateway", e.p50),
    );
    figures.push(
        Figure::latency(
            "scale.burst_empty",
            &format!("create → first output, cc={}, empty gateway", o.burst_cc),
            &e,
        )
        .baseline(),
    );
    figures.push(
        Figure::value(
            "scale.cycles_memory_cgroups_growth",
            &format!(
                "memory cgroups (/proc/cgroups) across {} create+command+kill cycles",
                churn.ok.len()
            ),
            "%",
            growth(k0.memory_cgroups, k1.memory_cgroups),
            false,
        )
        .target(
            "within 5%",
            growth(k0.memory_cgroups, k1.memory_cgroups).abs() <= 5.0 && churn.failed.is_empty(),
        )
        .note(&format!("{} → {}", k0.memory_cgroups, k1.memory_cgroups)),
    );
    figures.push(
        Figure::value(
            "scale.cycles_sunreclaim_growth",
            &format!("SUnreclaim across {} cycles", churn.ok.len()),
            "%",
            growth(k0.sunreclaim_kib, k1.sunreclaim_kib),
            false,
        )
        .target(
            "within 5%",
            growth(k0.sunreclaim_kib, k1.sunreclaim_kib).abs() <= 5.0,
        )
        .note(&format!(
            "{} → {} kB; host-wide, other work moves it too",
            k0.sunreclaim_kib, k1.sunreclaim_kib
        )),
    );
    figures.push(Figure::value(
        "scale.cycle_rate",
        "create+command+kill cycles through the API, one at a time",
        "cycles/s",
        churn.rate(),
        true,
    ));
    if let Some(j) = jail {
        figures.push(
            Figure::value(
                "scale.jail_teardown_rate",
                &format!(
                    "the jail's own teardown of {} (no gateway), {} at a time",
                    j.ok.len(),
                    o.kill_cc
                ),
                "sandboxes/s",
                j.rate(),
                true,
            )
            .baseline(),
        );
    }
    let last = rounds.last();
    let summary = format!(
        "{}: kill -9 → /health 200 in {:.2} s (port {:.3} s), SIGTERM restart {:.2} s; teardown {:.0}/s (jail alone {}); host memory {:.2} MiB each; cc={} create p50/p95/p99 {:.0}/{:.0}/{:.0} ms with {} live vs {:.0}/{:.0}/{:.0} ms empty ({:.2}x p50); {} cycles at {:.0}/s, memory cgroups {:+.1}%, SUnreclaim {:+.1}%",
        last.map_or("?".into(), |r| format!("{} live", r.n)),
        last.map_or(f64::NAN, |r| secs(r.crash.healthy)),
        last.map_or(f64::NAN, |r| secs(r.crash.listening)),
        last.map_or(f64::NAN, |r| secs(r.graceful.healthy)),
        last.map_or(f64::NAN, |r| r.teardown.rate()),
        jail.map_or("not measured".into(), |j| format!("{:.0}/s", j.rate())),
        last.map_or(f64::NAN, |r| r.host_mib),
        o.burst_cc,
        l.p50,
        l.p95,
        l.p99,
        o.live,
        e.p50,
        e.p95,
        e.p99,
        l.p50 / e.p50,
        churn.ok.len(),
        churn.rate(),
        growth(k0.memory_cgroups, k1.memory_cgroups),
        growth(k0.sunreclaim_kib, k1.sunreclaim_kib),
    );
    let mut empty = empty.clone();
    let mut loaded = loaded.clone();
    for v in [&mut empty, &mut loaded] {
        if let Some(m) = v.as_object_mut() {
            m.remove("samples_ms");
        }
    }
    Report {
        figures,
        summary,
        details: serde_json::json!({
            "counts": {
                "sandboxes": o.sandboxes, "live": o.live, "bursts": o.bursts, "burst_cc": o.burst_cc,
                "cycles": o.cycles, "warmup_cycles": o.warmup_cycles, "fill_cc": o.fill_cc,
                "kill_cc": o.kill_cc, "check": o.check, "jail_baseline": o.jail_baseline,
            },
            "gateway_args": "--warm-pool 0 --max-sandboxes <largest + burst + 64> --min-free-memory 256M, open files soft 1024 (it raises its own to the hard limit)",
            "clocks": "restart clocks start when the new process is spawned, after the old one has exited; the port is polled by TCP connect every 1 ms and /health every 5 ms; burst latency is create → first stdout frame of /bin/echo hi through the gateway; teardown rate is kills answered 204 over the wall time from the first DELETE to the last answer",
            "host_limits": limits,
            "orphans": "reaped by the bench as a child subreaper (PR_SET_CHILD_SUBREAPER), standing in for the service manager: the sandboxes a killed or restarted gateway leaves are the bench's children, not this VM's PID 1's (orphans.rs)",
            "churn": {
                "cycles": churn.json(),
                "before": k0.json(),
                "after": k1.json(),
                "memory_cgroups_growth_pct": growth(k0.memory_cgroups, k1.memory_cgroups),
                "sunreclaim_growth_pct": growth(k0.sunreclaim_kib, k1.sunreclaim_kib),
            },
            "bursts_empty": empty,
            "bursts_loaded": loaded,
            "burst_p50_ratio_loaded_over_empty": l.p50 / e.p50,
            "jail_teardown": jail.map(Spread::json),
            "rounds": rounds.iter().map(|r| r.json.clone()).collect::<Vec<_>>(),
        }),
    }
}
