//! Part `net` (issue 14): what sandbox networking costs, against floors measured in the same
//! run, on 198.51.100.0/24 only ([`namespaces`](crate::namespaces)).
//!
//! 1. **Create → first output, networking on against off**: two gateways of this part's own,
//!    the same binary and template cache, `--warm-pool 0` (every create starts its sandbox, and
//!    attaches its network, on the request path), one with `--sandbox-network off` and one with
//!    networking on the test pool; sampled alternately at cc=1, 10 and 50 as `create` does.
//!    Then the same pair with the default warm pool at cc=1 and 10 (cc=50 would need more
//!    addresses than the test pool has: 20 warm sandboxes, 8 ready namespaces and 50 creates).
//! 2. **Throughput**: one TCP stream for `--net-secs` from a sandbox of the networked gateway
//!    to the fake internet (sandbox veth, bridge, the host's forwarding, nftables and NAT,
//!    the fake internet's veth), against the same sender over a bare veth pair between two
//!    namespaces; `--net-runs` runs each, alternating.
//! 3. **New connections through NAT**: `--net-threads` threads each opening, reading and closing
//!    connections for `--net-secs`, from the sandbox and over the bare pair, alternating.
//! 4. **Ingress**: `--net-gets` sequential GETs to an HTTP server in the sandbox through the
//!    gateway (E2B's `E2b-Sandbox-Id`/`E2b-Sandbox-Port` headers, as the SDK sends them) and
//!    straight to the sandbox's address on the bridge, alternating, each on a keep-alive
//!    connection.
//!
//! The traffic at both ends of 2–4 is this program's `peer` mode ([`peer`](crate::peer)),
//! copied into the sandbox through the files API and started through the process API; the
//! same binary runs on the host side and in the floor's namespaces.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use http_body_util::Full;

use crate::client::{
    self, connect, data, run_to_end, send, timeout, BoxError, Res, Sandbox, Sender, Via,
};
use crate::create::{measure_levels, LevelResult};
use crate::gateway::GatewayProc;
use crate::namespaces::{Namespaces, FAKE_SERVER, FLOOR_SERVER};
use crate::peer::HTTP_PORT;
use crate::stats::{self, Figure, Stats};
use crate::{with_sandbox_on, Ctx, Report, WARMUP};

/// The networked gateway's pool (the pools of test slots 0 to 7: 125 addresses, so a burst
/// of 50 creates finds its ready namespaces, as it would in the default /16) and what it
/// calls its bridge, tables and links.
const POOL: &str = "198.51.100.128/25";
const NAME: &str = "cpbn";
/// Everything the networked gateway is started with besides `--sandbox-network on`: nothing
/// leaves 198.51.100.0/24, forwarding is turned on for its bridge only, and its DNS forwarder
/// would ask the fake internet (nothing here resolves a name).
const NETWORK_ARGS: &[&str] = &[
    "--sandbox-cidr",
    POOL,
    "--sandbox-network-name",
    NAME,
    "--egress-only-to",
    "198.51.100.0/24",
    "--ip-forward",
    "false",
    "--dns-upstream",
    "198.51.100.2",
];
/// A sandbox that outlives the data-path measurements.
const LONG: &str = r#"{"templateID":"base","timeout":3600,"metadata":{},"envVars":{}}"#;
/// Where the peer program goes in the sandbox.
const PEER_IN_SANDBOX: &str = "/home/user/net-peer";
/// The targets of issue 14.
const CC1_MAX_RATIO: f64 = 1.2;
const BURST_MAX_RATIO: f64 = 1.1;
const THROUGHPUT_MIN_SHARE: f64 = 0.70;
const CONN_RATE_MIN: f64 = 5000.0;
const INGRESS_MAX_US: f64 = 150.0;

/// The part's counts.
#[derive(Debug)]
pub(crate) struct NetOpts {
    runs: usize,
    /// Rounds at cc=50 of the create comparison.
    rounds50: usize,
    secs: f64,
    gets: usize,
    threads: usize,
}

impl NetOpts {
    /// Reads `--net-runs N` (throughput and connection-rate runs of each side, default 5),
    /// `--net-rounds50 N` (rounds at cc=50 of the create comparison, 10: the 50 samples of
    /// one round share its machine, so a round is nearly one sample of the ratio),
    /// `--net-secs S` (length of each, 2), `--net-gets N` (ingress GETs each way, 2000) and
    /// `--net-threads N` (connection loops at once, 4).
    pub(crate) fn from_args() -> Res<Self> {
        let opts = Self {
            runs: stats::num_arg("--net-runs", 5)?,
            rounds50: stats::num_arg("--net-rounds50", 10)?,
            secs: stats::num_arg("--net-secs", 2.0)?,
            gets: stats::num_arg("--net-gets", 2000)?,
            threads: stats::num_arg("--net-threads", 4)?,
        };
        if opts.runs == 0 || opts.rounds50 == 0 || opts.gets == 0 || opts.threads == 0 {
            return Err(
                "--net-runs, --net-rounds50, --net-gets and --net-threads must be at least 1"
                    .into(),
            );
        }
        // A run inside the sandbox is one request, bounded by the client's timeout.
        if !(0.1..=20.0).contains(&opts.secs) {
            return Err("--net-secs must be between 0.1 and 20".into());
        }
        Ok(opts)
    }
}

pub(crate) fn run(ctx: &Ctx<'_>) -> Res<Report> {
    let opts = ctx.opts;
    let _slots = crate::namespaces::hold_slots()?;
    let peer = std::env::current_exe()?;
    let spaces = Namespaces::new(&peer)?;
    eprintln!(
        "api bench: net: namespaces up ({}); cold creates, networking off and on",
        spaces.dir().display()
    );
    let cold_plan = [(1, opts.runs), (10, opts.rounds10), (50, opts.net.rounds50)];
    let (cold, path) = on_and_off(ctx, &["--warm-pool", "0"], &cold_plan, |gw| {
        data_path(ctx, gw, &spaces, &peer)
    })?;
    let path = path.ok_or("the data path was not measured")?;
    eprintln!("api bench: net: creates with the default warm pool, networking off and on");
    let warm_plan = [(1, opts.runs), (10, opts.rounds10)];
    let (warm, _) = on_and_off(ctx, &[], &warm_plan, |_| Ok(DataPath::default()))?;
    drop(spaces);
    report(ctx, &cold, &warm, &path)
}

/// Create → first output of the gateway with networking off (`[0]`) and on (`[1]`), per
/// level of the plan.
type OnOff = [Vec<LevelResult>; 2];

/// Starts a gateway with networking off and one with it on (both with `extra_args`),
/// measures `plan` on them alternately, then runs `more` on the networked one; stops both
/// (purging the network) whatever happened.
fn on_and_off<T>(
    ctx: &Ctx<'_>,
    extra_args: &[&str],
    plan: &[(usize, usize)],
    more: impl FnOnce(&GatewayProc) -> Res<T>,
) -> Res<(OnOff, Option<T>)> {
    let opts = ctx.opts;
    let agent = opts.agent.clone().unwrap_or_else(|| opts.gateway.clone());
    let off = GatewayProc::spawn(&opts.gateway, &agent, extra_args)?;
    let on = GatewayProc::spawn_networked(&opts.gateway, &agent, extra_args, NETWORK_ARGS);
    let measured = on.and_then(|on| {
        let r = off
            .wait_ready()
            .and_then(|()| on.wait_ready())
            .and_then(|()| measure_levels(ctx.rt, &[&off, &on], plan, None))
            .and_then(|levels| {
                let [off_levels, on_levels] = <[Vec<LevelResult>; 2]>::try_from(levels)
                    .map_err(|_| "two gateways were measured")?;
                let extra = more(&on)?;
                Ok(([off_levels, on_levels], Some(extra)))
            });
        let stopped = on.shutdown(ctx.rt);
        let r = r?;
        stopped?;
        Ok(r)
    });
    let stopped = off.shutdown(ctx.rt);
    let r = measured?;
    stopped?;
    Ok(r)
}

/// What the data path measured: throughput, connection rates and ingress latencies.
#[derive(Default)]
struct DataPath {
    /// Mbit/s of each run: through the sandbox's network, over the bare pair.
    throughput: [Vec<f64>; 2],
    /// Connections per second of each run, the same way round, and errors counted.
    conn_rate: [Vec<f64>; 2],
    conn_errors: [u64; 2],
    conn_first_error: Option<String>,
    /// Each GET: through the gateway, straight to the sandbox's address.
    ingress: [Vec<Duration>; 2],
    /// The sandbox's address on the bridge.
    address: Option<Ipv4Addr>,
    /// Raw results of each run, for the report.
    runs: Vec<serde_json::Value>,
    conntrack: serde_json::Value,
}

/// Steps 2 to 4 on `gw` (networking on), in one sandbox.
fn data_path(ctx: &Ctx<'_>, gw: &GatewayProc, spaces: &Namespaces, peer: &Path) -> Res<DataPath> {
    let opts = &ctx.opts.net;
    let program = std::fs::read(peer)?;
    let secs = opts.secs.to_string();
    let threads = opts.threads.to_string();
    let limit = Duration::from_secs_f64(opts.secs) + Duration::from_secs(20);
    let gw_addr = gw.addr()?;
    with_sandbox_on(ctx, gw, LONG, async |api, sbx| {
        let mut d = DataPath {
            conntrack: conntrack(),
            ..DataPath::default()
        };
        eprintln!(
            "api bench: net: copying the peer ({} MiB) into sandbox {}",
            program.len() >> 20,
            sbx.id
        );
        client::timeout(client::write_file(
            api,
            sbx,
            Via::Gateway,
            PEER_IN_SANDBOX,
            &Bytes::from(program),
        ))
        .await?;
        sandbox_ok(api, sbx, "/bin/chmod", &["755", PEER_IN_SANDBOX]).await?;
        let address = sandbox_address(api, sbx).await?;
        d.address = Some(address);
        // The sandbox's server, for ingress; `setsid -f` so it outlives the command.
        sandbox_ok(
            api,
            sbx,
            "/bin/sh",
            &[
                "-c",
                &format!(
                    "setsid -f {PEER_IN_SANDBOX} peer serve --secs 3600 </dev/null >/dev/null 2>&1"
                ),
            ],
        )
        .await?;
        let server = SocketAddr::new(IpAddr::V4(address), HTTP_PORT);
        wait_listening(server).await?;

        let fake = FAKE_SERVER.to_string();
        let floor = FLOOR_SERVER.to_string();
        eprintln!(
            "api bench: net: throughput, {} runs of {secs} s each way",
            opts.runs
        );
        for _ in 0..opts.runs {
            let f = spaces.run_in_floor(
                peer,
                &["peer", "send", "--to", &floor, "--secs", &secs],
                limit,
            )?;
            let s = sandbox_ok(
                api,
                sbx,
                PEER_IN_SANDBOX,
                &["peer", "send", "--to", &fake, "--secs", &secs],
            )
            .await?;
            for (i, (side, out)) in [("sandbox", &s), ("bare_veth", &f)].into_iter().enumerate() {
                let v: serde_json::Value = serde_json::from_str(out.trim())?;
                d.throughput[i].push(v["mbit_per_s"].as_f64().ok_or("no mbit_per_s")?);
                d.runs
                    .push(serde_json::json!({ "throughput": side, "result": v }));
            }
        }
        eprintln!(
            "api bench: net: connection rate, {} runs of {secs} s, {threads} threads each way",
            opts.runs
        );
        for _ in 0..opts.runs {
            let f = spaces.run_in_floor(
                peer,
                &[
                    "peer",
                    "conns",
                    "--to",
                    &floor,
                    "--secs",
                    &secs,
                    "--threads",
                    &threads,
                ],
                limit,
            )?;
            let s = sandbox_ok(
                api,
                sbx,
                PEER_IN_SANDBOX,
                &[
                    "peer",
                    "conns",
                    "--to",
                    &fake,
                    "--secs",
                    &secs,
                    "--threads",
                    &threads,
                ],
            )
            .await?;
            for (i, (side, out)) in [("sandbox", &s), ("bare_veth", &f)].into_iter().enumerate() {
                let v: serde_json::Value = serde_json::from_str(out.trim())?;
                d.conn_rate[i].push(v["per_s"].as_f64().ok_or("no per_s")?);
                d.conn_errors[i] += v["errors"].as_u64().unwrap_or(0);
                if let Some(e) = v["first_error"].as_str() {
                    d.conn_first_error.get_or_insert_with(|| e.to_owned());
                }
                d.runs
                    .push(serde_json::json!({ "connections": side, "result": v }));
            }
        }
        eprintln!(
            "api bench: net: ingress, {} GETs each way to {server}",
            opts.gets
        );
        let mut via_gw = connect(gw_addr).await?;
        let mut direct = connect(server).await?;
        for i in 0..opts.gets + WARMUP {
            let g = timed(get(&mut via_gw, sbx, None)).await?;
            let s = timed(get(&mut direct, sbx, Some(server))).await?;
            if i >= WARMUP {
                d.ingress[0].push(g);
                d.ingress[1].push(s);
            }
        }
        Ok::<_, BoxError>(d)
    })
}

/// Runs `program args` in the sandbox; fails unless it exits 0; returns its stdout.
async fn sandbox_ok(api: &mut Sender, sbx: &Sandbox, program: &str, args: &[&str]) -> Res<String> {
    let ran = timeout(run_to_end(api, sbx, Via::Gateway, program, args)).await?;
    if ran.exit_code != Some(0) {
        return Err(format!(
            "{program} {args:?} in the sandbox ended with {:?}: {}",
            ran.exit_code,
            ran.stderr.trim()
        )
        .into());
    }
    Ok(ran.stdout)
}

/// The sandbox's address, from the `/etc/hosts` the gateway gave it (its id on its address),
/// checked to be in the test pool.
async fn sandbox_address(api: &mut Sender, sbx: &Sandbox) -> Res<Ipv4Addr> {
    let hosts = sandbox_ok(api, sbx, "/bin/cat", &["/etc/hosts"]).await?;
    let address: Ipv4Addr = hosts
        .lines()
        .find(|l| l.split_whitespace().skip(1).any(|name| name == sbx.id))
        .and_then(|l| l.split_whitespace().next())
        .ok_or_else(|| format!("no line for {} in its /etc/hosts: {hosts}", sbx.id))?
        .parse()?;
    let [a, b, c, d] = address.octets();
    if (a, b, c) != (198, 51, 100) || d < 128 {
        return Err(format!("the sandbox's address {address} is not in {POOL}").into());
    }
    Ok(address)
}

/// Waits (bounded) until `addr` accepts a connection.
async fn wait_listening(addr: SocketAddr) -> Res<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        client::check_interrupted()?;
        match tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr))
            .await
        {
            Ok(Ok(_)) => return Ok(()),
            _ if Instant::now() > deadline => {
                return Err(format!("the sandbox's server at {addr} never listened").into())
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// One GET of the sandbox's server: through the gateway (`direct` is `None`), or straight to
/// `direct`. Checks the answer.
async fn get(sender: &mut Sender, sbx: &Sandbox, direct: Option<SocketAddr>) -> Res<()> {
    let req = match direct {
        None => data(Method::GET, "/", sbx, Via::Gateway, HTTP_PORT),
        Some(addr) => http::Request::get("/").header("host", addr.to_string()),
    }
    .body(Full::new(Bytes::new()))?;
    let (status, body) = send(sender, req).await?;
    if status != 200 || &body[..] != b"ok" {
        return Err(format!("GET answered {status}: {}", String::from_utf8_lossy(&body)).into());
    }
    Ok(())
}

async fn timed(f: impl std::future::Future<Output = Res<()>>) -> Res<Duration> {
    let t = Instant::now();
    timeout(f).await?;
    Ok(t.elapsed())
}

/// The host's conntrack table size and fill, which the connection-rate runs add to.
fn conntrack() -> serde_json::Value {
    let read = |name: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/netfilter/{name}"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    serde_json::json!({ "max": read("nf_conntrack_max"), "count_before": read("nf_conntrack_count") })
}

/// The median of `v` (which must not be empty).
fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[(s.len() - 1) / 2]
}

fn report(ctx: &Ctx<'_>, cold: &OnOff, warm: &OnOff, d: &DataPath) -> Res<Report> {
    let net = &ctx.opts.net;
    let mut figures = Vec::new();
    let mut ratios = serde_json::Map::new();
    let mut met_all = Vec::new();
    for (i, (cc, max)) in [
        (1, CC1_MAX_RATIO),
        (10, BURST_MAX_RATIO),
        (50, BURST_MAX_RATIO),
    ]
    .into_iter()
    .enumerate()
    {
        let (off, on) = (&cold[0][i], &cold[1][i]);
        let ratio = on.stats.p50 / off.stats.p50;
        ratios.insert(format!("cc{cc}_p50_on_over_off"), ratio.into());
        ratios.insert(
            format!("cc{cc}_p95_on_over_off"),
            (on.stats.p95 / off.stats.p95).into(),
        );
        let met = ratio <= max && on.failed == 0 && off.failed == 0;
        met_all.push((format!("cc={cc} {ratio:.2}× (≤ {max}×)"), met));
        figures.push(
            Figure::latency(
                &format!("net.cc{cc}"),
                &format!("create → first command output, cc={cc}, networking on, no warm pool"),
                &on.stats,
            )
            .floor("networking off", off.stats.p50)
            .target(&format!("p50 ≤ {max}× off"), met),
        );
    }
    for (i, cc) in [1, 10, 50].into_iter().enumerate() {
        figures.push(
            Figure::latency(
                &format!("net.cc{cc}_off"),
                &format!("create → first command output, cc={cc}, networking off, no warm pool"),
                &cold[0][i].stats,
            )
            .baseline(),
        );
    }
    for (i, cc) in [1, 10].into_iter().enumerate() {
        let (off, on) = (&warm[0][i], &warm[1][i]);
        ratios.insert(
            format!("warm_cc{cc}_p50_on_over_off"),
            (on.stats.p50 / off.stats.p50).into(),
        );
        figures.push(
            Figure::latency(
                &format!("net.cc{cc}_warm"),
                &format!(
                    "create → first command output, cc={cc}, networking on, default warm pool"
                ),
                &on.stats,
            )
            .floor("networking off", off.stats.p50),
        );
        figures.push(
            Figure::latency(
                &format!("net.cc{cc}_warm_off"),
                &format!(
                    "create → first command output, cc={cc}, networking off, default warm pool"
                ),
                &off.stats,
            )
            .baseline(),
        );
    }

    let (tp, tp_floor) = (median(&d.throughput[0]), median(&d.throughput[1]));
    let tp_share = tp / tp_floor;
    let tp_met = tp_share >= THROUGHPUT_MIN_SHARE;
    met_all.push((
        format!("throughput {:.0}% (≥ 70%)", tp_share * 100.0),
        tp_met,
    ));
    figures.push(
        Figure::value(
            "net.throughput",
            "TCP throughput, sandbox → fake internet (bridge, forwarding, NAT), one stream",
            "Mbit/s",
            tp,
            true,
        )
        .floor("bare veth pair", tp_floor)
        .target("≥ 70% of the bare veth pair", tp_met),
    );
    figures.push(
        Figure::value(
            "net.throughput_veth",
            "TCP throughput over a bare veth pair between two namespaces, one stream",
            "Mbit/s",
            tp_floor,
            true,
        )
        .baseline(),
    );
    let (cr, cr_floor) = (median(&d.conn_rate[0]), median(&d.conn_rate[1]));
    let cr_met = cr >= CONN_RATE_MIN && d.conn_errors[0] == 0;
    met_all.push((format!("NAT connections {cr:.0}/s (≥ 5,000/s)"), cr_met));
    let threads_note = format!("{} connection loops at once", net.threads);
    let mut conn_figure = Figure::value(
        "net.nat_connections",
        "new TCP connections, sandbox → fake internet through NAT",
        "connections/s",
        cr,
        true,
    )
    .floor("bare veth pair", cr_floor)
    .target("≥ 5,000/s", cr_met);
    conn_figure = if d.conn_errors[0] > 0 {
        conn_figure.note(&format!("{threads_note}; {} failed", d.conn_errors[0]))
    } else {
        conn_figure.note(&threads_note)
    };
    figures.push(conn_figure);
    figures.push(
        Figure::value(
            "net.veth_connections",
            "new TCP connections over a bare veth pair between two namespaces",
            "connections/s",
            cr_floor,
            true,
        )
        .baseline()
        .note(&threads_note),
    );
    let mut ingress_gw = d.ingress[0].clone();
    let mut ingress_direct = d.ingress[1].clone();
    let ig = Stats::of(&mut ingress_gw);
    let id = Stats::of(&mut ingress_direct);
    let overhead_us = (ig.p50 - id.p50) * 1000.0;
    let ingress_met = overhead_us <= INGRESS_MAX_US;
    met_all.push((
        format!("ingress +{overhead_us:.0} µs (≤ 150 µs)"),
        ingress_met,
    ));
    figures.push(
        Figure::value(
            "net.ingress_overhead",
            "ingress proxy overhead to an HTTP server in the sandbox (GET through the gateway − straight to its address, p50)",
            "µs",
            overhead_us,
            false,
        )
        .target("≤ 150 µs", ingress_met),
    );
    figures.push(
        Figure::latency(
            "net.ingress_gateway",
            "GET of an HTTP server in the sandbox through the gateway (E2b-Sandbox-Id/Port headers)",
            &ig,
        )
        .floor("straight to its address", id.p50),
    );
    figures.push(
        Figure::latency(
            "net.ingress_direct",
            "GET of the same server straight to the sandbox's address on the bridge",
            &id,
        )
        .baseline(),
    );

    let verdicts: Vec<String> = met_all
        .iter()
        .map(|(what, met)| format!("{what} {}", if *met { "met" } else { "MISSED" }))
        .collect();
    let summary = format!(
        "create p50 on/off {:.2} / {:.2} / {:.2} ms vs {:.2} / {:.2} / {:.2} ms at cc=1/10/50; throughput {tp:.0} vs {tp_floor:.0} Mbit/s; NAT {cr:.0} conn/s (bare veth {cr_floor:.0}); ingress +{overhead_us:.0} µs; {}",
        cold[1][0].stats.p50,
        cold[1][1].stats.p50,
        cold[1][2].stats.p50,
        cold[0][0].stats.p50,
        cold[0][1].stats.p50,
        cold[0][2].stats.p50,
        verdicts.join(", "),
    );
    let levels = |side: &[LevelResult], ccs: &[usize]| -> serde_json::Value {
        ccs.iter()
            .zip(side)
            .map(|(cc, l)| (format!("cc{cc}"), l.json.clone()))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let spread = |v: &[f64]| {
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(*x), b.max(*x)));
        serde_json::json!({ "median": median(v), "min": lo, "max": hi, "runs": v })
    };
    Ok(Report {
        figures,
        summary,
        details: serde_json::json!({
            "addresses": {
                "pool": POOL,
                "fake_internet": "198.51.100.0/27 (host 198.51.100.1, server 198.51.100.2)",
                "bare_veth_pair": "198.51.100.32/27 (198.51.100.33 → 198.51.100.34)",
                "sandbox": d.address.map(|a| a.to_string()),
            },
            "gateway_network_args": NETWORK_ARGS,
            "runs": {
                "cc1": ctx.opts.runs, "cc10_rounds": ctx.opts.rounds10, "cc50_rounds": ctx.opts.net.rounds50,
                "data_path_runs": net.runs, "data_path_secs": net.secs,
                "connection_threads": net.threads, "ingress_gets": net.gets, "warmup": WARMUP,
            },
            "clock": "create: as in the create part (POST /v2/sandboxes until the first stdout frame of process.Start through the gateway), the two gateways alternating sample by sample at cc=1 and round by round above; throughput: the sender's clock from its first write until the receiver has answered how many bytes it got; connections: connect, the server's one byte and its close, our close, counted over the run; ingress: from sending a GET until its whole answer is read, gateway and direct alternating",
            "cold": { "off": levels(&cold[0], &[1, 10, 50]), "on": levels(&cold[1], &[1, 10, 50]) },
            "warm_pool": { "off": levels(&warm[0], &[1, 10]), "on": levels(&warm[1], &[1, 10]) },
            "throughput_mbit_per_s": { "sandbox": spread(&d.throughput[0]), "bare_veth": spread(&d.throughput[1]) },
            "connections_per_s": {
                "sandbox": spread(&d.conn_rate[0]), "bare_veth": spread(&d.conn_rate[1]),
                "errors": { "sandbox": d.conn_errors[0], "bare_veth": d.conn_errors[1] },
                "first_error": d.conn_first_error,
            },
            "ingress": { "gateway": ig.json(), "direct": id.json(), "overhead_us": overhead_us },
            "ratios": ratios,
            "throughput_share_of_bare_veth": tp_share,
            "targets_met": met_all.iter().map(|(w, m)| serde_json::json!({ "what": w, "met": m })).collect::<Vec<_>>(),
            "conntrack": d.conntrack,
            "loadavg_at_end": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
            "peer_runs": d.runs,
        }),
    })
}
