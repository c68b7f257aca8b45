//! `cargo xtask bench jail`: start (until PID 1 has exec'd), pause, resume and kill of a
//! sandbox on the default template, against `unshare --fork --pid --mount --net --uts --ipc
//! --mount-proc true` and the same through bubblewrap, measured in the same run, interleaved so
//! all see the same machine.
//!
//! Prints one JSON report on stdout; progress goes to stderr. `--runs N` (default 200);
//! `--other-template DIR` also starts a sandbox on that root filesystem in every round and
//! reports its start against the default template's, same machine state.
// A benchmark program: it reports on stdout/stderr and waits on a plain thread.
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::disallowed_methods,
    missing_docs
)]

#[path = "../../../benchmarks/support/stats.rs"]
mod stats;

use stats::{figures_json, machine, Figure, Stats};
use std::path::Path;
use std::time::Instant;

use coppice_jail::{JailConfig, LinuxJail};
use coppice_lifecycle::backend::{InitSpec, Isolation, JailSpec, Limits, RootfsSpec, SandboxId};

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let runs: usize = stats::num_arg("--runs", 200)?;
    // Another root filesystem (an older or larger template) whose start is sampled in the
    // same loop, so that the two compare on the same machine state.
    let other: Option<std::path::PathBuf> = stats::arg("--other-template").map(Into::into);

    if let Some(missing) = <LinuxJail as Isolation>::probe()?
        .missing()
        .map(|c| c.name.clone())
        .reduce(|a, b| format!("{a}, {b}"))
    {
        return Err(format!("this host cannot run sandboxes: missing {missing}").into());
    }
    let template = coppice_zfs::template::TemplateBuilder::new(
        coppice_zfs::template::default_cache_dir(),
        JailConfig::DEFAULT_UID_BASE,
    )
    .ensure(false, &mut |line: &str| eprintln!("template: {line}"))?;

    let dir = tempfile::Builder::new()
        .prefix("coppice-jail-bench-")
        .tempdir_in("/var/tmp")?;
    let mut config = JailConfig::new(dir.path().join("jail"));
    config.cgroup_group = format!("coppice-bench-{}", std::process::id());
    let jail = LinuxJail::open(config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    let mut start = Vec::with_capacity(runs);
    let mut pause = Vec::with_capacity(runs);
    let mut resume = Vec::with_capacity(runs);
    let mut kill = Vec::with_capacity(runs);
    let mut unshare = Vec::with_capacity(runs);
    let mut bwrap = Vec::with_capacity(runs);
    let mut start_other = Vec::with_capacity(runs);
    let warmup = 5;
    eprintln!("jail bench: {runs} runs (+{warmup} warm-up)");
    let start_on_other = |i: usize| -> Result<
        Option<std::time::Duration>,
        Box<dyn std::error::Error + Send + Sync>,
    > {
        let Some(root) = &other else {
            return Ok(None);
        };
        let id = SandboxId::new(format!("bench{i}o"))?;
        let other_spec = crate::spec(&id, root, dir.path())?;
        let t = Instant::now();
        rt.block_on(jail.start(other_spec))?;
        let took = t.elapsed();
        rt.block_on(jail.kill(&id))?;
        std::fs::remove_dir_all(dir.path().join("layers").join(id.as_str()))?;
        Ok(Some(took))
    };
    for i in 0..runs + warmup {
        let mut t_other = None;
        if i % 2 == 1 {
            t_other = start_on_other(i)?;
        }
        let id = SandboxId::new(format!("bench{i}"))?;
        let spec = spec(&id, &template, dir.path())?;
        let t = Instant::now();
        rt.block_on(jail.start(spec))?;
        let t_start = t.elapsed();
        let t = Instant::now();
        rt.block_on(jail.pause(&id))?;
        let t_pause = t.elapsed();
        let t = Instant::now();
        rt.block_on(jail.resume(&id))?;
        let t_resume = t.elapsed();
        let t = Instant::now();
        rt.block_on(jail.kill(&id))?;
        let t_kill = t.elapsed();
        std::fs::remove_dir_all(dir.path().join("layers").join(id.as_str()))?;

        // Before the default template's start in odd rounds, after it in even ones: the
        // first start after the floors' runs is the slower one.
        if i % 2 == 0 {
            t_other = start_on_other(i)?;
        }

        let t_unshare = stats::unshare_true()?;
        let t_bwrap = stats::bwrap_true()?;
        if i >= warmup {
            start_other.extend(t_other);
            start.push(t_start);
            pause.push(t_pause);
            resume.push(t_resume);
            kill.push(t_kill);
            unshare.push(t_unshare);
            bwrap.push(t_bwrap);
        }
    }

    let s = Stats::of(&mut start);
    let p = Stats::of(&mut pause);
    let r = Stats::of(&mut resume);
    let k = Stats::of(&mut kill);
    let u = Stats::of(&mut unshare);
    let b = Stats::of(&mut bwrap);
    let ratio = s.p50 / u.p50;
    let summary = format!(
        "start p50 {:.2} ms / p95 {:.2} ms ({ratio:.2}x `unshare` at {:.2} ms, {:.2}x `bwrap` at {:.2} ms); pause p50 {:.3} ms; resume p50 {:.3} ms; kill p50 {:.2} ms; n={runs}",
        s.p50, s.p95, u.p50, s.p50 / b.p50, b.p50, p.p50, r.p50, k.p50
    );
    let figures = [
        Figure::latency("jail.start", "jail start (until PID 1 has exec'd)", &s)
            .floor("unshare … true", u.p50)
            .floor("bwrap … true", b.p50)
            .target("p50 ≤ 5 ms and ≤ 2× unshare", s.p50 <= 5.0 && ratio <= 2.0),
        Figure::latency("jail.pause", "jail pause (cgroup freeze)", &p)
            .target("p50 ≤ 1 ms", p.p50 <= 1.0),
        Figure::latency("jail.resume", "jail resume (cgroup thaw)", &r)
            .target("p50 ≤ 1 ms", r.p50 <= 1.0),
        Figure::latency("jail.kill", "jail kill", &k),
        Figure::latency(
            "jail.unshare",
            "unshare --fork --pid --mount --net --uts --ipc --mount-proc true",
            &u,
        )
        .baseline(),
        Figure::latency(
            "jail.bwrap",
            "bwrap --unshare-{pid,net,uts,ipc} --ro-bind / / --proc --dev true",
            &b,
        )
        .baseline(),
    ];
    let mut figures = figures.to_vec();
    let mut other_json = serde_json::Value::Null;
    if let Some(root) = &other {
        let o = Stats::of(&mut start_other);
        figures.push(
            Figure::latency(
                "jail.start_other_template",
                &format!("jail start on {}", root.display()),
                &o,
            )
            .floor("the same start on the default template", s.p50),
        );
        other_json =
            serde_json::json!({ "template": root.display().to_string(), "start": o.json() });
    }
    let (figures, targets) = figures_json(&figures);
    let report = serde_json::json!({
        "benchmark": "jail",
        "machine": machine(),
        "runs": runs,
        "unit": "ms",
        "results": {
            "start": s.json(),
            "pause": p.json(),
            "resume": r.json(),
            "kill": k.json(),
            "baseline_unshare": u.json(),
            "baseline_bwrap": b.json(),
            "other_template": other_json,
        },
        "ratios": {
            "start_p50_over_unshare_p50": ratio,
            "start_p50_over_bwrap_p50": s.p50 / b.p50,
        },
        "figures": figures,
        "targets": targets,
        "summary": summary,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// A sandbox whose init is `sleep infinity`, on a fresh writable layer over the template.
fn spec(id: &SandboxId, template: &Path, dir: &Path) -> std::io::Result<JailSpec> {
    let layer = dir.join("layers").join(id.as_str());
    let upper = layer.join("upper");
    let work = layer.join("work");
    std::fs::create_dir_all(&upper)?;
    std::fs::create_dir_all(&work)?;
    // The writable layer's root must look like the template's root (shifted owner).
    let meta = std::fs::metadata(template)?;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    std::os::unix::fs::chown(&upper, Some(meta.uid()), Some(meta.gid()))?;
    std::fs::set_permissions(&upper, std::fs::Permissions::from_mode(meta.mode()))?;
    Ok(JailSpec {
        id: id.clone(),
        rootfs: RootfsSpec::Overlay {
            lower: vec![template.to_path_buf()],
            upper,
            work,
        },
        init: InitSpec {
            program: "/bin/sleep".into(),
            args: vec!["infinity".into()],
            env: vec![],
            cwd: "/".into(),
        },
        mounts: vec![],
        limits: Limits {
            memory_bytes: Some(512 << 20),
            pids: Some(256),
            cpu_millis: Some(1000),
        },
        network: None,
    })
}
