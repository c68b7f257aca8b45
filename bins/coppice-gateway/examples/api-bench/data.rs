//! Parts on the data plane of one running sandbox: `code`, `files` and `proxy`.
//!
//! - `code`: `run_code("x+1")` — `POST /execute` on port 49999 through the gateway — in a warm
//!   default context of a `code-interpreter-v1` sandbox, until the NDJSON stream has ended.
//! - `files`: a 1 MiB file written (`files.write`: multipart `POST /files`) and read back
//!   (`files.read`: `GET /files`, accepting gzip as the Python SDK's httpx does, and without),
//!   each read checked byte for byte.
//! - `proxy`: the same envd call through the gateway and straight to the agent's unix socket
//!   (`<state>/run/<id>/agent.sock`, where the gateway's proxy sends it), interleaved; the
//!   difference of the medians is the gateway's overhead. Both a unary call
//!   (`filesystem.Filesystem/Stat`, which `files.get_info` sends) and a command
//!   (`process.Start` of `/bin/echo hi` to its first output), the command also against a plain
//!   fork+exec of the same program on the host.

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::client::{
    command, connect, connect_unix, execute, read_file, stat, timeout, write_file, BoxError, Res,
    Via, ARGS, PROGRAM,
};
use crate::stats::{self, Figure, Stats};
use crate::{with_sandbox, Ctx, Report, BASE, WARMUP};

/// A code-interpreter sandbox, as `e2b_code_interpreter.Sandbox.create()` asks for one.
const CODE_INTERPRETER: &str = r#"{"templateID":"code-interpreter-v1","metadata":{},"envVars":{}}"#;
/// Where the files part writes, inside the sandbox.
const FILE_PATH: &str = "/tmp/coppice-bench-1mib.bin";
const FILE_SIZE: usize = 1 << 20;
/// Unary calls per command sample in the proxy part: they are cheap, and the overhead is a
/// small difference of two medians, so it gets more samples.
const UNARY_PER_COMMAND: usize = 5;

pub(crate) fn run_code(ctx: &Ctx<'_>) -> Res<Report> {
    let runs = ctx.opts.runs;
    let addr = ctx.gw()?.addr()?;
    eprintln!("api bench: code: {runs} run_code(\"x+1\") (+{WARMUP} warm-up)");
    let mut samples = with_sandbox(ctx, CODE_INTERPRETER, async |_, sbx| {
        let mut s = connect(addr).await?;
        // The first execution starts the kernel; it is the warm context's cost, not a sample.
        let t = Instant::now();
        let out = timeout(execute(&mut s, sbx, Via::Gateway, "x = 1")).await?;
        let kernel_start = t.elapsed();
        if out.contains("\"error\"") {
            return Err(format!("x = 1 gave {out}").into());
        }
        let mut samples = Vec::with_capacity(runs);
        for i in 0..runs + WARMUP {
            let t = Instant::now();
            let out = timeout(execute(&mut s, sbx, Via::Gateway, "x+1")).await?;
            let elapsed = t.elapsed();
            if !out.contains("\"text\":\"2\"") {
                return Err(format!("x+1 gave {out}").into());
            }
            if i >= WARMUP {
                samples.push(elapsed);
            }
        }
        samples.push(kernel_start);
        Ok::<_, BoxError>(samples)
    })?;
    let kernel_start = samples.pop().ok_or("no samples")?;
    let e = Stats::of(&mut samples);
    let summary = format!(
        "run_code(\"x+1\") warm, through the gateway: p50 {:.2} ms / p95 {:.2} ms / p99 {:.2} ms; first execution (kernel start) {:.0} ms; n={runs}",
        e.p50,
        e.p95,
        e.p99,
        kernel_start.as_secs_f64() * 1000.0
    );
    Ok(Report {
        figures: vec![Figure::latency(
            "code.run_code_warm",
            "run_code(\"x+1\"), warm context, through the gateway",
            &e,
        )
        .target("p50 ≤ 3 ms", e.p50 <= 3.0)],
        summary,
        details: serde_json::json!({
            "runs": runs,
            "warmup": WARMUP,
            "template": "code-interpreter-v1",
            "clock": "from sending POST /execute to the end of its NDJSON stream, which must hold a result with text \"2\"",
            "run_code_warm": e.json(),
            "first_execution_ms": kernel_start.as_secs_f64() * 1000.0,
        }),
    })
}

pub(crate) fn run_files(ctx: &Ctx<'_>) -> Res<Report> {
    let runs = ctx.opts.runs;
    let addr = ctx.gw()?.addr()?;
    eprintln!("api bench: files: {runs} 1 MiB writes and reads (+{WARMUP} warm-up)");
    let content = Bytes::from(pseudo_random(FILE_SIZE));
    let (mut w, mut rg, mut ri) = with_sandbox(ctx, BASE, async |_, sbx| {
        let mut s = connect(addr).await?;
        let (mut w, mut rg, mut ri) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..runs + WARMUP {
            let t = Instant::now();
            timeout(write_file(&mut s, sbx, Via::Gateway, FILE_PATH, &content)).await?;
            let wrote = t.elapsed();
            let mut reads = [Duration::ZERO; 2];
            for (gzip, took) in [true, false].into_iter().zip(&mut reads) {
                let t = Instant::now();
                let back = timeout(read_file(&mut s, sbx, Via::Gateway, FILE_PATH, gzip)).await?;
                *took = t.elapsed();
                if back != content {
                    return Err(format!(
                        "read back {} bytes that differ from the {} written (gzip: {gzip})",
                        back.len(),
                        content.len()
                    )
                    .into());
                }
            }
            if i >= WARMUP {
                w.push(wrote);
                rg.push(reads[0]);
                ri.push(reads[1]);
            }
        }
        Ok::<_, BoxError>((w, rg, ri))
    })?;
    let (w, rg, ri) = (Stats::of(&mut w), Stats::of(&mut rg), Stats::of(&mut ri));
    let summary = format!(
        "1 MiB write p50 {:.2} ms / p99 {:.2} ms; read p50 {:.2} ms / p99 {:.2} ms (gzip accepted, as the Python SDK), {:.2} ms / {:.2} ms (identity); n={runs}",
        w.p50, w.p99, rg.p50, rg.p99, ri.p50, ri.p99
    );
    Ok(Report {
        figures: vec![
            Figure::latency(
                "files.write_1mib",
                "1 MiB file write (multipart POST /files)",
                &w,
            ),
            Figure::latency(
                "files.read_1mib",
                "1 MiB file read, gzip accepted as the Python SDK does",
                &rg,
            ),
            Figure::latency(
                "files.read_1mib_identity",
                "1 MiB file read, no compression",
                &ri,
            ),
        ],
        summary,
        details: serde_json::json!({
            "runs": runs,
            "warmup": WARMUP,
            "bytes": FILE_SIZE,
            "content": "pseudo-random bytes (incompressible: gzip costs the agent CPU and saves nothing)",
            "path": FILE_PATH,
            "clock": "from sending the request until its whole answer has been read (and, for gzip, decoded)",
            "write": w.json(),
            "read_gzip": rg.json(),
            "read_identity": ri.json(),
        }),
    })
}

pub(crate) fn run_proxy(ctx: &Ctx<'_>) -> Res<Report> {
    let runs = ctx.opts.runs;
    let gw = ctx.gw()?;
    let addr = gw.addr()?;
    eprintln!(
        "api bench: proxy: {} unary and {runs} command pairs, through the gateway and straight to the agent",
        runs * UNARY_PER_COMMAND
    );
    let samples = with_sandbox(ctx, BASE, async |_, sbx| {
        let mut via_gw = connect(addr).await?;
        let mut direct = connect_unix(&gw.agent_socket(&sbx.id)?).await?;
        let mut p = ProxySamples::default();
        for i in 0..runs + WARMUP {
            let keep = i >= WARMUP;
            for _ in 0..UNARY_PER_COMMAND {
                let g = timed(stat(&mut via_gw, sbx, Via::Gateway, "/")).await?;
                let d = timed(stat(&mut direct, sbx, Via::Agent, "/")).await?;
                if keep {
                    p.stat_gw.push(g);
                    p.stat_direct.push(d);
                }
            }
            let g = command(&mut via_gw, sbx, Via::Gateway).await?;
            let d = command(&mut direct, sbx, Via::Agent).await?;
            let f = stats::fork_exec_to_first_byte(PROGRAM, &ARGS)?;
            if keep {
                p.cmd_gw.push(g);
                p.cmd_direct.push(d);
                p.fork_exec.push(f);
            }
        }
        Ok::<_, BoxError>(p)
    })?;
    let mut p = samples;
    let sg = Stats::of(&mut p.stat_gw);
    let sd = Stats::of(&mut p.stat_direct);
    let cg = Stats::of(&mut p.cmd_gw);
    let cd = Stats::of(&mut p.cmd_direct);
    let fe = Stats::of(&mut p.fork_exec);
    let overhead_us = (sg.p50 - sd.p50) * 1000.0;
    let cmd_overhead_us = (cg.p50 - cd.p50) * 1000.0;
    let summary = format!(
        "proxy overhead {overhead_us:.0} µs (Stat p50 {:.3} ms through the gateway vs {:.3} ms straight to the agent); command → first output p50 {:.2} ms through the gateway, {:.2} ms straight, fork+exec {:.2} ms ({:.2}x); n={}/{runs}",
        sg.p50,
        sd.p50,
        cg.p50,
        cd.p50,
        fe.p50,
        cg.p50 / fe.p50,
        sg.n,
    );
    Ok(Report {
        figures: vec![
            Figure::value(
                "proxy.overhead",
                "gateway proxy overhead (Stat through the gateway − straight to the agent, p50)",
                "µs",
                overhead_us,
                false,
            )
            .target("≤ 150 µs", overhead_us <= 150.0),
            Figure::latency(
                "proxy.stat_gateway",
                "filesystem.Stat through the gateway",
                &sg,
            ),
            Figure::latency(
                "proxy.stat_agent",
                "filesystem.Stat straight to the agent's socket",
                &sd,
            )
            .baseline(),
            Figure::latency(
                "proxy.command_gateway",
                "command → first output through the gateway (running sandbox)",
                &cg,
            )
            .floor("fork+exec", fe.p50)
            .floor("straight to the agent", cd.p50),
            Figure::latency(
                "proxy.command_agent",
                "command → first output straight to the agent's socket",
                &cd,
            )
            .floor("fork+exec", fe.p50),
            Figure::latency(
                "proxy.fork_exec",
                "fork+exec of /bin/echo hi to its first byte, on the host",
                &fe,
            )
            .baseline(),
        ],
        summary,
        details: serde_json::json!({
            "runs": { "unary": sg.n, "command": cg.n, "warmup": WARMUP },
            "clock": "each from sending the request: Stat until its whole answer is read, commands until their first stdout frame; gateway and agent samples alternate on two keep-alive connections (TCP to the gateway, the agent's unix socket); the gateway opens a fresh connection to the agent per request, which is part of its overhead",
            "stat_gateway": sg.json(),
            "stat_agent": sd.json(),
            "overhead_us": overhead_us,
            "command_gateway": cg.json(),
            "command_agent": cd.json(),
            "command_overhead_us": cmd_overhead_us,
            "fork_exec": fe.json(),
            "ratios": {
                "command_gateway_over_fork_exec": cg.p50 / fe.p50,
                "command_agent_over_fork_exec": cd.p50 / fe.p50,
                "stat_gateway_over_agent": sg.p50 / sd.p50,
            },
        }),
    })
}

#[derive(Default)]
struct ProxySamples {
    stat_gw: Vec<Duration>,
    stat_direct: Vec<Duration>,
    cmd_gw: Vec<Duration>,
    cmd_direct: Vec<Duration>,
    fork_exec: Vec<Duration>,
}

async fn timed(f: impl std::future::Future<Output = Res<()>>) -> Res<Duration> {
    let t = Instant::now();
    timeout(f).await?;
    Ok(t.elapsed())
}

/// `len` bytes of xorshift64: the same every run, and incompressible.
fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
