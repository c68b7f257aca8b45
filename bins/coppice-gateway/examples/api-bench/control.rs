//! Part `control`: the control plane's read rate — `GET /sandboxes/{id}` of one live sandbox
//! from 64 keep-alive connections for `--rate-secs` — and the latency of each request under
//! that load. The client runs on the same two cores as the gateway, so the report also says
//! how much CPU the gateway itself spent per request.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use http_body_util::Full;

use crate::client::{self, connect, send, timeout, BoxError, Res, Sandbox};
use crate::stats::{Figure, Stats};
use crate::{process_cpu_ms, with_sandbox, Ctx, Report, BASE};

/// Connections hammering `GET /sandboxes/{id}`.
const CONNECTIONS: usize = 64;

pub(crate) fn run(ctx: &Ctx<'_>) -> Res<Report> {
    let gw = ctx.gw()?;
    let addr = gw.addr()?;
    let length = Duration::from_secs(ctx.opts.rate_secs);
    eprintln!(
        "api bench: control: GET /sandboxes/{{id}} for {} s on {CONNECTIONS} connections",
        ctx.opts.rate_secs
    );
    let pid = gw.pid();
    let cpu0 = process_cpu_ms(pid)?;
    let (requests, seconds, mut latencies) =
        with_sandbox(ctx, BASE, async |_, sbx| hammer(addr, sbx, length).await)?;
    let gateway_cpu_ms = process_cpu_ms(pid)?.saturating_sub(cpu0);
    #[allow(
        clippy::cast_precision_loss,
        reason = "request counts are far below 2^52"
    )]
    let rps = requests as f64 / seconds;
    let s = Stats::of(&mut latencies);
    #[allow(clippy::cast_precision_loss, reason = "milliseconds of one run")]
    let cpu_us_per_request = gateway_cpu_ms as f64 * 1000.0 / requests as f64;
    let summary = format!(
        "GET /sandboxes/{{id}} {rps:.0} req/s on {CONNECTIONS} connections (p50 {:.2} ms, p99 {:.2} ms); gateway CPU {cpu_us_per_request:.1} µs per request; {seconds:.1} s",
        s.p50, s.p99
    );
    let figures = vec![
        Figure::value(
            "control.get_rps",
            "GET /sandboxes/{id}, 64 keep-alive connections",
            "req/s",
            rps,
            true,
        )
        .target("≥ 30k req/s", rps >= 30_000.0)
        .note("client and gateway share the machine's cores"),
        Figure::latency(
            "control.get_latency",
            "GET /sandboxes/{id} latency under that load",
            &s,
        ),
    ];
    Ok(Report {
        figures,
        summary,
        details: serde_json::json!({
            "connections": CONNECTIONS,
            "requests": requests,
            "seconds": seconds,
            "requests_per_second": rps,
            "latency_ms": s.json(),
            "gateway_cpu_ms": gateway_cpu_ms,
            "gateway_cpu_us_per_request": cpu_us_per_request,
            "note": "the client runs on the same cores as the gateway; gateway_cpu_us_per_request (utime+stime of the gateway process over the run) is what one request costs the gateway itself",
        }),
    })
}

/// Reads `sbx` from [`CONNECTIONS`] connections until `length` has passed; returns the
/// number of requests, the seconds they took and their latencies.
async fn hammer(
    addr: SocketAddr,
    sbx: &Sandbox,
    length: Duration,
) -> Res<(usize, f64, Vec<Duration>)> {
    let mut senders = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        senders.push(connect(addr).await?);
    }
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + length;
    let mut tasks = Vec::with_capacity(CONNECTIONS);
    for mut s in senders {
        let path = format!("/sandboxes/{}", sbx.id);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while tokio::time::Instant::now() < deadline {
                let req = client::control(Method::GET, &path).body(Full::new(Bytes::new()))?;
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
    if all.is_empty() {
        return Err("no request completed".into());
    }
    Ok((all.len(), start.elapsed().as_secs_f64(), all))
}
