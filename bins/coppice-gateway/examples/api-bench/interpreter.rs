//! `interpreter`: the code interpreter as `e2b_code_interpreter` drives it, through the
//! gateway (`POST /execute` on port 49999, to the end of its NDJSON stream).
//!
//! - **Warm**: `run_code("x+1")` in a warm default python context, on IPython (a
//!   `code-interpreter-v1` sandbox) and on the plain driver (a `base` sandbox, whose python
//!   has no IPython; checked, not assumed), interleaved on one keep-alive connection, once
//!   both warm pools are full (so that no sandbox start competes for the CPU).
//! - **Cold**: the first `run_code("1+1")` in a sandbox just created, python and
//!   javascript, one fresh `code-interpreter-v1` sandbox per sample. Samples are
//!   taken when the shared gateway's warm pool is full again, which is what a client
//!   creating sandboxes no faster than the pool refills gets; the same is measured on a
//!   gateway with `--warm-pool 0`, where the sandbox starts on the create's path and its
//!   interpreter after it. The clock starts when the create has answered.
//! - **Memory**: host memory per idle `code-interpreter-v1` sandbox (the drop in
//!   `MemAvailable` over `--interp-sandboxes N`, default 20, taken with the warm pool full
//!   before and after), as a create leaves it (its agent has started python ahead of the
//!   first `run_code`), and again once each sandbox's default python context is deleted.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use http_body_util::Full;

use crate::client::{
    self, check_interrupted, connect, data, execute_in, send, timeout, BoxError, Res, Sandbox,
    Sender, Via, CODE_PORT,
};
use crate::density::{kib_field, sum_memory};
use crate::gateway::GatewayProc;
use crate::stats::{Figure, Stats};
use crate::{Ctx, Report, WARMUP};

const TEMPLATE: &str = "code-interpreter-v1";
/// A code-interpreter sandbox that outlives the part, as
/// `e2b_code_interpreter.Sandbox.create(timeout=3600)` asks for one.
const CODE_INTERPRETER: &str =
    r#"{"templateID":"code-interpreter-v1","timeout":3600,"metadata":{},"envVars":{}}"#;
const BASE: &str = r#"{"templateID":"base","timeout":3600,"metadata":{},"envVars":{}}"#;
/// The shared gateway's warm pool per template (the gateway's default).
const POOL: u64 = 10;
/// How long the machine is left alone before memory is read.
const SETTLE: Duration = Duration::from_secs(3);
/// Whether the context's python can import IPython.
const HAS_IPYTHON: &str = "import importlib.util\nimportlib.util.find_spec('IPython') is not None";

pub(crate) fn run(ctx: &Ctx<'_>) -> Res<Report> {
    let (runs, cold_runs, mem_n) = (ctx.opts.runs, ctx.opts.cold_runs, ctx.opts.interp_sandboxes);
    let gw = ctx.gw()?;
    let (addr, live) = (gw.addr()?, &gw.live);

    eprintln!("api bench: interpreter: {runs} warm run_code(\"x+1\") on IPython and on the plain driver (+{WARMUP} warm-up)");
    let (mut ipy, mut plain) = ctx.rt.block_on(async {
        let mut api = connect(addr).await?;
        // Filling the pools (python starts in every code-interpreter one) would take the
        // CPU from under the samples.
        for template in [TEMPLATE, "base"] {
            pool_full(&mut api, template).await?;
        }
        let ci = timeout(client::create(&mut api, live, CODE_INTERPRETER)).await?;
        let base = timeout(client::create(&mut api, live, BASE)).await;
        let measured = match base {
            Ok(base) => {
                let m = warm(addr, &ci, &base, runs).await;
                let killed = timeout(client::delete(&mut api, live, &base.id)).await;
                m.and_then(|m| killed.map(|_| m))
            }
            Err(e) => Err(e),
        };
        timeout(client::delete(&mut api, live, &ci.id)).await?;
        measured
    })?;
    let (ipy, plain) = (Stats::of(&mut ipy), Stats::of(&mut plain));

    eprintln!("api bench: interpreter: {cold_runs} first run_code per language, warm pool full");
    let mut cold_py = cold(ctx, gw, cold_runs, None, "1+1", "2", true)?;
    let mut cold_js = cold(ctx, gw, cold_runs, Some("javascript"), "1+1", "2", true)?;
    eprintln!("api bench: interpreter: {cold_runs} first run_code in python, no warm pool");
    let agent = ctx.opts.agent.as_ref().unwrap_or(&ctx.opts.gateway);
    let bare = GatewayProc::spawn(&ctx.opts.gateway, agent, &["--warm-pool", "0"])?;
    bare.wait_ready()?;
    let no_pool = cold(ctx, &bare, cold_runs, None, "1+1", "2", false);
    bare.shutdown(ctx.rt)?;
    let mut cold_none = no_pool?;
    let creates = |v: &mut Vec<(Duration, Duration)>| -> (Stats, Stats) {
        let (mut c, mut r): (Vec<Duration>, Vec<Duration>) = v.drain(..).unzip();
        (Stats::of(&mut c), Stats::of(&mut r))
    };
    let (py_create, py_first) = creates(&mut cold_py);
    let (js_create, js_first) = creates(&mut cold_js);
    let (none_create, none_first) = creates(&mut cold_none);

    eprintln!("api bench: interpreter: memory of {mem_n} idle code-interpreter sandboxes");
    let mem = memory(ctx, gw, mem_n)?;

    let summary = format!(
        "run_code(\"x+1\") warm p50 {:.2} ms on IPython, {:.2} ms on the plain driver; first run_code p50 {:.0} ms python, {:.0} ms javascript ({:.0} ms python with no warm pool); {:.1} MiB per idle code-interpreter sandbox with python started, {:.1} MiB without; n={runs}/{cold_runs}/{mem_n}",
        ipy.p50,
        plain.p50,
        py_first.p50,
        js_first.p50,
        none_first.p50,
        mem.with_mib,
        mem.without_mib,
    );
    Ok(Report {
        figures: vec![
            Figure::latency(
                "interpreter.run_code_warm_ipython",
                "run_code(\"x+1\"), warm python context on IPython (code-interpreter-v1), through the gateway",
                &ipy,
            )
            .floor("plain driver", plain.p50)
            .target("p50 ≤ 2 ms", ipy.p50 <= 2.0),
            Figure::latency(
                "interpreter.run_code_warm_plain",
                "run_code(\"x+1\"), warm python context on the plain driver (base, no IPython), through the gateway",
                &plain,
            )
            .baseline(),
            Figure::latency(
                "interpreter.first_run_code_python",
                "first run_code(\"1+1\") in a fresh code-interpreter sandbox, from the warm pool",
                &py_first,
            )
            .target("p50 ≤ 300 ms", py_first.p50 <= 300.0),
            Figure::latency(
                "interpreter.first_run_code_javascript",
                "first run_code(\"1+1\", language=\"javascript\") in a fresh code-interpreter sandbox, from the warm pool",
                &js_first,
            )
            .target("p50 ≤ 500 ms", js_first.p50 <= 500.0),
            Figure::latency(
                "interpreter.first_run_code_python_no_pool",
                "first run_code(\"1+1\") in a fresh code-interpreter sandbox, gateway with --warm-pool 0",
                &none_first,
            ),
            Figure::value(
                "interpreter.memory_with_python",
                "host memory per idle code-interpreter sandbox, python context started (as a create leaves it)",
                "MiB",
                mem.with_mib,
                false,
            )
            .note("other work on the machine moves MemAvailable too"),
            Figure::value(
                "interpreter.memory_without_python",
                "host memory per idle code-interpreter sandbox, python context deleted",
                "MiB",
                mem.without_mib,
                false,
            )
            .note("other work on the machine moves MemAvailable too"),
        ],
        summary,
        details: serde_json::json!({
            "runs": { "warm": runs, "warmup": WARMUP, "cold": cold_runs, "memory_sandboxes": mem_n },
            "template": TEMPLATE,
            "clock": "from sending POST /execute to the end of its NDJSON stream, which must hold the expected result; for first run_code, the create has answered before the clock starts",
            "run_code_warm_ipython": ipy.json(),
            "run_code_warm_plain": plain.json(),
            "warm_ratio_ipython_over_plain": ipy.p50 / plain.p50,
            "first_run_code_python": py_first.json(),
            "first_run_code_javascript": js_first.json(),
            "first_run_code_python_no_pool": none_first.json(),
            "create_before_first_python": py_create.json(),
            "create_before_first_javascript": js_create.json(),
            "create_no_pool": none_create.json(),
            "memory": mem.json,
        }),
    })
}

/// Interleaved warm samples: IPython in `ci`, the plain driver in `base`.
async fn warm(
    addr: std::net::SocketAddr,
    ci: &Sandbox,
    base: &Sandbox,
    runs: usize,
) -> Res<(Vec<Duration>, Vec<Duration>)> {
    let mut s = connect(addr).await?;
    for (sbx, want) in [(ci, "True"), (base, "False")] {
        let out = timeout(execute_in(&mut s, sbx, Via::Gateway, HAS_IPYTHON, None)).await?;
        if !out.contains(&format!("\"text\":\"{want}\"")) {
            return Err(format!(
                "IPython importable in {}: expected {want}, got {out}",
                sbx.id
            )
            .into());
        }
        timeout(execute_in(&mut s, sbx, Via::Gateway, "x = 1", None)).await?;
    }
    let (mut ipy, mut plain) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for i in 0..runs + WARMUP {
        for (sbx, into) in [(ci, &mut ipy), (base, &mut plain)] {
            let t = Instant::now();
            let out = timeout(execute_in(&mut s, sbx, Via::Gateway, "x+1", None)).await?;
            let took = t.elapsed();
            if !out.contains("\"text\":\"2\"") {
                return Err(format!("x+1 gave {out}").into());
            }
            if i >= WARMUP {
                into.push(took);
            }
        }
    }
    Ok((ipy, plain))
}

/// `runs` fresh sandboxes on `gw`, each created (after its warm pool is full again, if
/// `pooled`), given `code` once in `language`'s default context and killed. Returns each
/// sample's create time and first-`run_code` time.
fn cold(
    ctx: &Ctx<'_>,
    gw: &GatewayProc,
    runs: usize,
    language: Option<&str>,
    code: &str,
    want: &str,
    pooled: bool,
) -> Res<Vec<(Duration, Duration)>> {
    let (addr, live) = (gw.addr()?, &gw.live);
    ctx.rt.block_on(async {
        let mut api = connect(addr).await?;
        let mut samples = Vec::with_capacity(runs);
        for _ in 0..runs {
            check_interrupted()?;
            if pooled {
                pool_full(&mut api, TEMPLATE).await?;
            }
            let t = Instant::now();
            let sbx = timeout(client::create(&mut api, live, CODE_INTERPRETER)).await?;
            let created = t.elapsed();
            let mut s = connect(addr).await?;
            let t = Instant::now();
            let out = timeout(execute_in(&mut s, &sbx, Via::Gateway, code, language)).await;
            let first = t.elapsed();
            timeout(client::delete(&mut api, live, &sbx.id)).await?;
            let out = out?;
            if !out.contains(&format!("\"text\":\"{want}\"")) {
                return Err(format!("{code} gave {out}").into());
            }
            samples.push((created, first));
        }
        Ok::<_, BoxError>(samples)
    })
}

/// Waits until the gateway's warm pool of `template` holds [`POOL`] sandboxes
/// (`coppice_warm_sandboxes`).
async fn pool_full(api: &mut Sender, template: &str) -> Res<()> {
    let series = format!("coppice_warm_sandboxes{{template=\"{template}\"}}");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let req = client::control(Method::GET, "/metrics").body(Full::new(Bytes::new()))?;
        let (status, body) = timeout(send(api, req)).await?;
        if status != 200 {
            return Err(format!("/metrics answered {status}").into());
        }
        let text = String::from_utf8_lossy(&body);
        let warm = text
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if warm >= POOL as f64 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("the warm pool of {template} stayed at {warm} of {POOL}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Memory {
    with_mib: f64,
    without_mib: f64,
    json: serde_json::Value,
}

/// Host memory per idle code-interpreter sandbox, with its python context and without.
fn memory(ctx: &Ctx<'_>, gw: &GatewayProc, n: usize) -> Res<Memory> {
    let (addr, live) = (gw.addr()?, &gw.live);
    let available =
        || -> Res<u64> { kib_field(&std::fs::read_to_string("/proc/meminfo")?, "MemAvailable:") };
    ctx.rt.block_on(async {
        let mut api = connect(addr).await?;
        pool_full(&mut api, TEMPLATE).await?;
        tokio::time::sleep(SETTLE).await;
        let before = available()?;
        let mut sandboxes = Vec::with_capacity(n);
        let result = async {
            for _ in 0..n {
                check_interrupted()?;
                sandboxes.push(timeout(client::create(&mut api, live, CODE_INTERPRETER)).await?);
            }
            // Each one's python, prestarted by its agent, is up once it answers.
            let mut s = connect(addr).await?;
            for sbx in &sandboxes {
                timeout(execute_in(&mut s, sbx, Via::Gateway, "x = 1", None)).await?;
            }
            pool_full(&mut api, TEMPLATE).await?;
            tokio::time::sleep(SETTLE).await;
            let with = available()?;
            let (used_with, cache_with) = sum_memory(addr, &sandboxes).await?;
            for sbx in &sandboxes {
                delete_python_context(&mut s, sbx).await?;
            }
            tokio::time::sleep(SETTLE).await;
            let without = available()?;
            let (used_without, cache_without) = sum_memory(addr, &sandboxes).await?;
            Ok::<_, BoxError>((with, without, used_with, cache_with, used_without, cache_without))
        }
        .await;
        for sbx in &sandboxes {
            timeout(client::delete(&mut api, live, &sbx.id)).await?;
        }
        let (with, without, used_with, cache_with, used_without, cache_without) = result?;
        #[expect(
            clippy::cast_precision_loss,
            reason = "kibibytes and counts are far below 2^52"
        )]
        let per = |kib: u64| kib as f64 / 1024.0 / n as f64;
        #[expect(
            clippy::cast_precision_loss,
            reason = "bytes and counts are far below 2^52"
        )]
        let per_bytes = |b: u64| b as f64 / (1024.0 * 1024.0) / n as f64;
        let with_mib = per(before.saturating_sub(with));
        let without_mib = per(before.saturating_sub(without));
        Ok(Memory {
            with_mib,
            without_mib,
            json: serde_json::json!({
                "sandboxes": n,
                "mem_available_kib": { "before": before, "with_python": with, "without_python": without },
                "host_mib_per_sandbox": { "with_python": with_mib, "without_python": without_mib },
                "cgroup_mib_per_sandbox": {
                    "with_python": { "used": per_bytes(used_with), "cache": per_bytes(cache_with) },
                    "without_python": { "used": per_bytes(used_without), "cache": per_bytes(cache_without) },
                },
                "method": "MemAvailable before the creates and after them (warm pool full both times, 3 s settled), divided by the count; then again after DELETE /contexts/{id} of each sandbox's default python context; cgroup figures are the sandboxes' newest metrics samples (sampled every 5 s, so they may lag)",
            }),
        })
    })
}

/// `DELETE /contexts/{id}` of `sbx`'s default python context, found in `GET /contexts`.
async fn delete_python_context(s: &mut Sender, sbx: &Sandbox) -> Res<()> {
    let req = data(Method::GET, "/contexts", sbx, Via::Gateway, CODE_PORT)
        .body(Full::new(Bytes::new()))?;
    let (status, body) = timeout(send(s, req)).await?;
    if status != 200 {
        return Err(format!("GET /contexts answered {status}").into());
    }
    let list: serde_json::Value = serde_json::from_slice(&body)?;
    let id = list
        .as_array()
        .and_then(|a| a.iter().find(|c| c["language"] == "python"))
        .and_then(|c| c["id"].as_str())
        .ok_or("no python context listed")?
        .to_owned();
    let req = data(
        Method::DELETE,
        &format!("/contexts/{id}"),
        sbx,
        Via::Gateway,
        CODE_PORT,
    )
    .body(Full::new(Bytes::new()))?;
    let (status, body) = timeout(send(s, req)).await?;
    if status != 200 {
        return Err(format!(
            "DELETE /contexts/{id} answered {status}: {}",
            String::from_utf8_lossy(&body)
        )
        .into());
    }
    Ok(())
}
