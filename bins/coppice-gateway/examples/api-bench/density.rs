//! Part `density`: idle sandboxes started one after another through the API until
//! `--density N` (default 1000) run or a create fails twice in a row — which is then the limit
//! this machine hit, and the report says which; then what they cost the host, whether every
//! one still answers a command, and how long killing them all takes.
//!
//! Host memory per sandbox is the drop in `MemAvailable` from before the first create to after
//! the last, divided by the count: everything the host gave them (processes, page tables,
//! kernel objects for namespaces, mounts and cgroups, the gateway's own bookkeeping), and
//! nothing the kernel can reclaim. Other work on the machine moves `MemAvailable` too, so the
//! report also gives the sandboxes' own cgroup charge (the sum of `GET /sandboxes/{id}/metrics`
//! `memUsed` and `memCache`, which nothing else touches), the gateway's RSS growth, and how much
//! came back when they were killed.

use std::time::{Duration, Instant};

use http::Method;
use http_body_util::Full;

use crate::client::{
    self, check_interrupted, command, connect, delete, timeout, BoxError, Res, Sandbox, Sender, Via,
};
use crate::stats::{Figure, Stats};
use crate::{Ctx, Report};

/// An idle sandbox that outlives the whole part (E2B's default timeout, 300 s, might not).
const IDLE: &str = r#"{"templateID":"base","timeout":3600,"metadata":{},"envVars":{}}"#;
/// Connections checking and killing sandboxes at once.
const PARALLEL: usize = 8;
/// How long the machine is left alone before memory is read.
const SETTLE: Duration = Duration::from_secs(3);

pub(crate) fn run(ctx: &Ctx<'_>) -> Res<Report> {
    let want = ctx.opts.density;
    let gw = ctx.gw()?;
    let (addr, live, pid) = (gw.addr()?, &gw.live, gw.pid());
    eprintln!("api bench: density: up to {want} idle sandboxes");
    std::thread::sleep(SETTLE);
    let before = Snapshot::take(pid)?;

    // Ramp: one create at a time, as a user filling a machine would.
    let t_ramp = Instant::now();
    let (sandboxes, mut create_lat, stopped) = ctx.rt.block_on(async {
        let mut api = connect(addr).await?;
        let mut sandboxes: Vec<Sandbox> = Vec::with_capacity(want);
        let mut lat = Vec::with_capacity(want);
        let mut stopped = None;
        while sandboxes.len() < want {
            check_interrupted()?;
            let t = Instant::now();
            let first = timeout(client::create(&mut api, live, IDLE)).await;
            let created = match first {
                Ok(s) => Ok(s),
                // Once more on a fresh connection: a limit fails twice, a hiccup does not.
                Err(e1) => {
                    eprintln!(
                        "api bench: density: create #{} failed: {e1}; retrying",
                        sandboxes.len() + 1
                    );
                    match connect(addr).await {
                        Ok(fresh) => api = fresh,
                        Err(e) => {
                            return Err::<_, BoxError>(format!("after {e1}: reconnect: {e}").into())
                        }
                    }
                    timeout(client::create(&mut api, live, IDLE))
                        .await
                        .map_err(|e2| format!("{e1}; again: {e2}"))
                }
            };
            match created {
                Ok(s) => {
                    lat.push(t.elapsed());
                    sandboxes.push(s);
                }
                Err(e) => {
                    stopped = Some(format!("create #{} failed: {e}", sandboxes.len() + 1));
                    break;
                }
            }
            if sandboxes.len().is_multiple_of(100) {
                eprintln!("api bench: density: {} running", sandboxes.len());
            }
        }
        Ok((sandboxes, lat, stopped))
    })?;
    let ramp_secs = t_ramp.elapsed().as_secs_f64();
    let started = sandboxes.len();
    if started == 0 {
        return Err(format!("no sandbox started: {}", stopped.as_deref().unwrap_or("?")).into());
    }
    std::thread::sleep(SETTLE);
    let full = Snapshot::take(pid)?;
    // The sandboxes' own memory, as the API reports it (their cgroups).
    let (used_bytes, cache_bytes) = ctx.rt.block_on(sum_memory(addr, &sandboxes))?;
    let cgroup_bytes = used_bytes + cache_bytes;

    // Does every one still answer?
    let t_check = Instant::now();
    let (mut answer_lat, unanswered) =
        ctx.rt.block_on(each(addr, &sandboxes, async |s, sbx| {
            command(s, sbx, Via::Gateway).await
        }))?;
    let check_secs = t_check.elapsed().as_secs_f64();

    // All at once: every sandbox runs a command at the same moment, each on its own
    // connection, as a thousand SDK clients would; the gateway proxies them all together.
    let t_burst = Instant::now();
    let peak = FdPeak::watch(pid);
    let burst = ctx.rt.block_on(all_at_once(addr, &sandboxes));
    let gateway_fds_in_burst = peak.stop();
    let (mut burst_lat, burst_failed) = burst?;
    let burst_secs = t_burst.elapsed().as_secs_f64();

    // Kill them all.
    let t_kill = Instant::now();
    let (mut kill_lat, unkilled) = ctx.rt.block_on(each(addr, &sandboxes, async |s, sbx| {
        timeout(delete(s, live, &sbx.id)).await
    }))?;
    let kill_secs = t_kill.elapsed().as_secs_f64();
    std::thread::sleep(SETTLE);
    let after = Snapshot::take(pid)?;

    #[allow(
        clippy::cast_precision_loss,
        reason = "kibibytes and counts are far below 2^52"
    )]
    let (n, kib) = (started as f64, |a: u64, b: u64| a as f64 - b as f64);
    let host_mib = kib(before.mem_available_kib, full.mem_available_kib) / 1024.0 / n;
    #[allow(
        clippy::cast_precision_loss,
        reason = "bytes of memory are far below 2^52"
    )]
    let cgroup_mib = cgroup_bytes as f64 / (1024.0 * 1024.0) / n;
    let gateway_kib = kib(full.gateway_rss_kib, before.gateway_rss_kib) / n;
    let recovered_mib = kib(after.mem_available_kib, full.mem_available_kib) / 1024.0;
    let answered = started - unanswered.len();
    let c = Stats::of(&mut create_lat);
    let a = (!answer_lat.is_empty()).then(|| Stats::of(&mut answer_lat));
    let k = (!kill_lat.is_empty()).then(|| Stats::of(&mut kill_lat));
    let stop_text = stopped
        .clone()
        .unwrap_or_else(|| format!("stopped at the {want} asked for"));
    let summary = format!(
        "{started} idle sandboxes ({stop_text}); host memory {host_mib:.2} MiB each (MemAvailable), cgroup memory {cgroup_mib:.2} MiB each, gateway RSS +{gateway_kib:.1} KiB each; {answered}/{started} answered a command, {} when all at once (gateway peak {gateway_fds_in_burst} fds); create p50 {:.1} ms / p99 {:.1} ms over the ramp; all killed in {kill_secs:.1} s",
        started - burst_failed.len(),
        c.p50,
        c.p99
    );
    let mut figures = vec![
        Figure::value(
            "density.sandboxes",
            "idle sandboxes started (until the count asked for or a limit)",
            "sandboxes",
            n,
            true,
        )
        .target("≥ 1000", started >= 1000),
        Figure::value(
            "density.host_mib_per_sandbox",
            "host memory per idle sandbox (drop in MemAvailable / count)",
            "MiB",
            host_mib,
            false,
        )
        .target("≤ 4 MiB", host_mib <= 4.0)
        .note("other work on the machine moves MemAvailable too"),
        Figure::value(
            "density.cgroup_mib_per_sandbox",
            "sandbox cgroup charge per idle sandbox (GET /sandboxes/{id}/metrics memUsed + memCache)",
            "MiB",
            cgroup_mib,
            false,
        ),
        Figure::value(
            "density.answered",
            "share of them answering a command afterwards",
            "%",
            #[allow(clippy::cast_precision_loss, reason = "counts")]
            {
                answered as f64 * 100.0 / n
            },
            true,
        )
        .target("100%", answered == started),
        Figure::latency(
            "density.create_during_ramp",
            "create call while the machine fills up",
            &c,
        ),
    ];
    let burst_answered = started - burst_failed.len();
    #[allow(clippy::cast_precision_loss, reason = "counts")]
    figures.push(
        Figure::value(
            "density.answered_all_at_once",
            "share answering when every one runs a command at the same moment",
            "%",
            burst_answered as f64 * 100.0 / n,
            true,
        )
        .target("100%", burst_failed.is_empty())
        .note(&format!(
            "{started} open streams; the gateway held up to {gateway_fds_in_burst} descriptors"
        )),
    );
    if !burst_lat.is_empty() {
        figures.push(Figure::latency(
            "density.first_output_all_at_once",
            "command → first output, every sandbox at the same moment",
            &Stats::of(&mut burst_lat),
        ));
    }
    if let Some(a) = &a {
        figures.push(Figure::latency(
            "density.command_when_full",
            "command → first output of each, all running, 8 at a time",
            a,
        ));
    }
    Ok(Report {
        figures,
        summary,
        details: serde_json::json!({
            "asked_for": want,
            "started": started,
            "stopped_by": stopped,
            "gateway_log_tail": stopped.as_ref().map(|_| gw.log_tail()),
            "ramp_seconds": ramp_secs,
            "create_call": c.json(),
            "host_memory_mib_per_sandbox": host_mib,
            "cgroup_memory_mib_per_sandbox": cgroup_mib,
            "metrics_mem_used_bytes": used_bytes,
            "metrics_mem_cache_bytes": cache_bytes,
            "gateway_rss_kib_per_sandbox": gateway_kib,
            "mem_available_recovered_after_kill_mib": recovered_mib,
            "answered": answered,
            "unanswered": unanswered.iter().take(5).collect::<Vec<_>>(),
            "check_seconds": check_secs,
            "command_when_full": a.as_ref().map(Stats::json),
            "all_at_once": {
                "command": format!("/bin/sh {}", HELD.join(" ")),
                "answered": burst_answered,
                "failed": burst_failed.len(),
                "failures": burst_failed.iter().take(5).collect::<Vec<_>>(),
                "seconds": burst_secs,
                "gateway_peak_fds": gateway_fds_in_burst,
            },
            "kill_seconds": kill_secs,
            "kill": k.as_ref().map(Stats::json),
            "not_killed": unkilled.iter().take(5).collect::<Vec<_>>(),
            "before": before.json(),
            "full": full.json(),
            "after_kill": after.json(),
            "limits": limits(pid),
            "settle_seconds": SETTLE.as_secs(),
        }),
    })
}

/// The command each sandbox runs in the all-at-once check: it answers at once and holds its
/// stream open a while, so every stream is open at the same time.
const HELD: [&str; 2] = ["-c", "echo hi; sleep 2"];

/// The most descriptors a process held while watched (sampled every 10 ms).
struct FdPeak {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<usize>,
}

impl FdPeak {
    fn watch(pid: u32) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(Ordering::SeqCst) {
                if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
                    peak = peak.max(fds.count());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            peak
        });
        Self { stop, thread }
    }

    fn stop(self) -> usize {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().unwrap_or(0)
    }
}

/// Every sandbox runs [`HELD`] at once, each from a connection of its own; returns the times
/// to first output of those that answered and the errors of the rest.
async fn all_at_once(
    addr: std::net::SocketAddr,
    sandboxes: &[Sandbox],
) -> Res<(Vec<Duration>, Vec<String>)> {
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(sandboxes.len()));
    let tasks: Vec<_> = sandboxes
        .iter()
        .map(|sbx| {
            let (sbx, start) = (sbx.clone(), std::sync::Arc::clone(&start));
            tokio::spawn(async move {
                let conn = connect(addr).await;
                start.wait().await;
                let mut s = conn.map_err(|e| format!("{}: connect: {e}", sbx.id))?;
                timeout(client::run_to_first_output(
                    &mut s,
                    &sbx,
                    Via::Gateway,
                    Instant::now(),
                    "/bin/sh",
                    &HELD,
                ))
                .await
                .map_err(|e| format!("{}: {e}", sbx.id))
            })
        })
        .collect();
    let (mut ok, mut failed) = (Vec::new(), Vec::new());
    for t in tasks {
        match t.await? {
            Ok(d) => ok.push(d),
            Err(e) => failed.push(e),
        }
    }
    check_interrupted()?;
    Ok((ok, failed))
}

/// Sums of `memUsed` and `memCache` over the sandboxes' newest metrics samples.
pub(crate) async fn sum_memory(
    addr: std::net::SocketAddr,
    sandboxes: &[Sandbox],
) -> Res<(u64, u64)> {
    let mut s = connect(addr).await?;
    let (mut used, mut cache) = (0, 0);
    for sbx in sandboxes {
        let req = client::control(Method::GET, &format!("/sandboxes/{}/metrics", sbx.id))
            .body(Full::new(bytes::Bytes::new()))?;
        let (status, body) = timeout(client::send(&mut s, req)).await?;
        if status != 200 {
            return Err(format!("metrics of {} answered {status}", sbx.id).into());
        }
        let v: serde_json::Value = serde_json::from_slice(&body)?;
        let newest = v
            .as_array()
            .and_then(|a| a.last())
            .ok_or("metrics without a sample")?;
        used += newest["memUsed"]
            .as_u64()
            .ok_or("metrics without memUsed")?;
        // Older gateways report no cache apart.
        cache += newest["memCache"].as_u64().unwrap_or(0);
    }
    Ok((used, cache))
}

/// Runs `f` on every sandbox from [`PARALLEL`] connections; returns the durations of those
/// that succeeded and the errors of the rest (a failure is a result here, not a reason to
/// stop).
async fn each<T, F>(
    addr: std::net::SocketAddr,
    sandboxes: &[Sandbox],
    f: F,
) -> Res<(Vec<Duration>, Vec<String>)>
where
    F: AsyncFn(&mut Sender, &Sandbox) -> Res<T>,
{
    let mut conns = Vec::with_capacity(PARALLEL);
    for _ in 0..PARALLEL {
        conns.push(connect(addr).await?);
    }
    let chunks = sandboxes.chunks(sandboxes.len().div_ceil(PARALLEL).max(1));
    let f = &f;
    let work = conns.iter_mut().zip(chunks).map(|(s, chunk)| async move {
        let (mut ok, mut failed) = (Vec::new(), Vec::new());
        for sbx in chunk {
            let t = Instant::now();
            match f(s, sbx).await {
                Ok(_) => ok.push(t.elapsed()),
                Err(e) => {
                    failed.push(format!("{}: {e}", sbx.id));
                    // The connection may be what broke.
                    if let Ok(fresh) = connect(addr).await {
                        *s = fresh;
                    }
                }
            }
        }
        (ok, failed)
    });
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    for (o, f) in join_all(work).await {
        ok.extend(o);
        failed.extend(f);
    }
    check_interrupted()?;
    Ok((ok, failed))
}

/// Polls futures side by side on this task (no spawn: they borrow).
pub(crate) async fn join_all<F: std::future::Future>(
    futures: impl IntoIterator<Item = F>,
) -> Vec<F::Output> {
    let mut pending: Vec<_> = futures.into_iter().map(Box::pin).map(Some).collect();
    let mut out: Vec<Option<F::Output>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut left = false;
        for (slot, result) in pending.iter_mut().zip(out.iter_mut()) {
            if let Some(fut) = slot {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        *result = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => left = true,
                }
            }
        }
        if left {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

/// What the host looks like at one moment.
struct Snapshot {
    mem_available_kib: u64,
    gateway_rss_kib: u64,
    gateway_fds: usize,
    processes: usize,
    /// Threads of the whole machine (each takes a pid from `kernel.pid_max`).
    tasks: u64,
    cgroups: serde_json::Value,
}

impl Snapshot {
    fn take(gateway: u32) -> Res<Self> {
        let meminfo = std::fs::read_to_string("/proc/meminfo")?;
        let status = std::fs::read_to_string(format!("/proc/{gateway}/status"))?;
        let cgroups: serde_json::Map<String, serde_json::Value> =
            std::fs::read_to_string("/proc/cgroups")?
                .lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    Some((
                        f.first()?.to_string(),
                        f.get(2)?.parse::<u64>().ok()?.into(),
                    ))
                })
                .collect();
        Ok(Self {
            mem_available_kib: kib_field(&meminfo, "MemAvailable:")?,
            gateway_rss_kib: kib_field(&status, "VmRSS:")?,
            gateway_fds: std::fs::read_dir(format!("/proc/{gateway}/fd"))?.count(),
            processes: std::fs::read_dir("/proc")?
                .filter_map(Result::ok)
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                })
                .count(),
            tasks: std::fs::read_to_string("/proc/loadavg")?
                .split_whitespace()
                .nth(3)
                .and_then(|f| f.split_once('/'))
                .and_then(|(_, total)| total.parse().ok())
                .ok_or("no task count in /proc/loadavg")?,
            cgroups: cgroups.into(),
        })
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "mem_available_kib": self.mem_available_kib,
            "gateway_rss_kib": self.gateway_rss_kib,
            "gateway_fds": self.gateway_fds,
            "processes": self.processes,
            "tasks": self.tasks,
            "cgroups_per_controller": self.cgroups,
        })
    }
}

pub(crate) fn kib_field(text: &str, key: &str) -> Res<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no {key}").into())
}

/// The limits a thousand sandboxes could run into, as this machine sets them.
fn limits(gateway: u32) -> serde_json::Value {
    let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_owned()).ok();
    let nofile = read(&format!("/proc/{gateway}/limits")).and_then(|l| {
        l.lines()
            .find(|l| l.starts_with("Max open files"))
            .map(|l| {
                l.split_whitespace()
                    .skip(3)
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" / ")
            })
    });
    serde_json::json!({
        "gateway_open_files_soft_hard": nofile,
        "kernel.pid_max": read("/proc/sys/kernel/pid_max"),
        "kernel.threads-max": read("/proc/sys/kernel/threads-max"),
        "fs.file-max": read("/proc/sys/fs/file-max"),
        "fs.mount-max": read("/proc/sys/fs/mount-max"),
        "fs.inotify.max_user_instances": read("/proc/sys/fs/inotify/max_user_instances"),
        "user.max_user_namespaces": read("/proc/sys/user/max_user_namespaces"),
        "user.max_mnt_namespaces": read("/proc/sys/user/max_mnt_namespaces"),
        "user.max_net_namespaces": read("/proc/sys/user/max_net_namespaces"),
        "user.max_pid_namespaces": read("/proc/sys/user/max_pid_namespaces"),
        "mem_total": read("/proc/meminfo").and_then(|m| m.lines().next().map(str::to_owned)),
    })
}
