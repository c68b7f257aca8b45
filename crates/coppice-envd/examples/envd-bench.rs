//! `cargo xtask bench envd`: the agent's idle RSS, `process.Start` → first output byte against a
//! plain fork+exec of the same command (interleaved in the same run), and `/execute` of `x+1`
//! in a warm code-interpreter context.
//!
//! `--agent PATH` is the `coppice-envd` binary as it ships (xtask builds it); `--runs N` (default
//! 200). Prints one JSON report on stdout; progress goes to stderr.
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
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

/// The command both sides run. Not `bash -l`: a login shell's profile (on a host, root's)
/// would dominate both timings and hide the agent's own cost.
const PROGRAM: &str = "/bin/echo";
const ARGS: [&str; 1] = ["hi"];

type Sender = http1::SendRequest<Full<Bytes>>;

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let runs: usize = stats::num_arg("--runs", 200)?;
    let agent_bin = PathBuf::from(stats::arg("--agent").ok_or("--agent PATH is required")?);
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("agent.sock");
    let mut agent = Command::new(&agent_bin)
        .arg("--socket")
        .arg(&socket)
        .env("COPPICE_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()?;
    let result = measure(&agent_bin, &socket, agent.id(), runs);
    let _ = agent.kill();
    let _ = agent.wait();
    let report = result?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn measure(
    agent_bin: &Path,
    socket: &Path,
    agent_pid: u32,
    runs: usize,
) -> Result<serde_json::Value, Box<dyn std::error::Error + Send + Sync>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    // The socket file appears at bind(2), a moment before listen(2): wait for a connection
    // the agent accepts, not for the file.
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        if Instant::now() > deadline {
            return Err("the agent never accepted a connection".into());
        }
        std::thread::yield_now();
    }
    let mut sender = rt.block_on(connect(socket))?;
    let health = rt.block_on(get(&mut sender, "/health"))?;
    if health != 204 && health != 200 {
        return Err(format!("/health answered {health}").into());
    }
    // Idle: the agent has served one request and nothing runs.
    std::thread::sleep(Duration::from_millis(200));
    let rss_kib = rss_kib(agent_pid)?;

    eprintln!("envd bench: {runs} runs (+5 warm-up)");
    let mut ours = Vec::with_capacity(runs);
    let mut plain = Vec::with_capacity(runs);
    for i in 0..runs + 5 {
        let t = rt.block_on(start_to_first_byte(&mut sender))?;
        let b = stats::fork_exec_to_first_byte(PROGRAM, &ARGS)?;
        if i >= 5 {
            ours.push(t);
            plain.push(b);
        }
    }
    // A warm code-interpreter context: define x once, then time `x+1` round trips. The
    // host has no `user` account, so the sandbox default user becomes root, as `/init` allows.
    let init = rt.block_on(post_json(&mut sender, "/init", r#"{"defaultUser":"root"}"#))?;
    if !(200..300).contains(&init) {
        return Err(format!("/init answered {init}").into());
    }
    rt.block_on(execute(&mut sender, "x = 1"))?;
    let mut exec = Vec::with_capacity(runs);
    for i in 0..runs + 5 {
        let t = Instant::now();
        let out = rt.block_on(execute(&mut sender, "x+1"))?;
        let elapsed = t.elapsed();
        if !out.contains("\"text\":\"2\"") {
            return Err(format!("x+1 gave {out}").into());
        }
        if i >= 5 {
            exec.push(elapsed);
        }
    }
    let e = Stats::of(&mut exec);
    let o = Stats::of(&mut ours);
    let p = Stats::of(&mut plain);
    let overhead = o.p50 - p.p50;
    let summary = format!(
        "idle RSS {:.2} MiB; Start→first byte p50 {:.2} ms vs fork+exec {:.2} ms (+{overhead:.2} ms, {:.2}x); /execute x+1 warm p50 {:.2} ms / p99 {:.2} ms; n={runs}",
        rss_kib as f64 / 1024.0,
        o.p50,
        p.p50,
        o.p50 / p.p50,
        e.p50,
        e.p99
    );
    #[allow(clippy::cast_precision_loss, reason = "kibibytes of one process")]
    let rss_mib = rss_kib as f64 / 1024.0;
    let figures = [
        Figure::value("envd.idle_rss", "agent idle RSS", "MiB", rss_mib, false)
            .target("≤ 3 MiB", rss_kib <= 3 * 1024),
        Figure::latency(
            "envd.start_first_byte",
            "process.Start → first stdout byte, straight to the agent",
            &o,
        )
        .floor("fork+exec to first byte", p.p50)
        .target("≤ fork+exec + 1 ms", overhead <= 1.0),
        Figure::latency(
            "envd.execute_warm",
            "/execute x+1 in a warm context, straight to the agent",
            &e,
        )
        .target("p50 ≤ 2 ms", e.p50 <= 2.0),
        Figure::latency(
            "envd.fork_exec",
            "fork+exec of /bin/echo hi to its first byte",
            &p,
        )
        .baseline(),
    ];
    let (figures, targets) = figures_json(&figures);
    Ok(serde_json::json!({
        "benchmark": "envd",
        "machine": machine(),
        "agent": agent_bin.display().to_string(),
        "runs": runs,
        "unit": "ms",
        "results": {
            "idle_rss_kib": rss_kib,
            "start_to_first_byte": o.json(),
            "baseline_fork_exec_to_first_byte": p.json(),
            "execute_x_plus_1_warm": e.json(),
        },
        "ratios": { "start_p50_over_fork_exec_p50": o.p50 / p.p50 },
        "overhead_p50_ms": overhead,
        "figures": figures,
        "targets": targets,
        "summary": summary,
    }))
}

async fn connect(socket: &Path) -> Result<Sender, Box<dyn std::error::Error + Send + Sync>> {
    let stream = UnixStream::connect(socket).await?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn get(
    sender: &mut Sender,
    path: &str,
) -> Result<u16, Box<dyn std::error::Error + Send + Sync>> {
    let req = http::Request::get(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    resp.into_body().collect().await?;
    Ok(status)
}

/// `process.Start` of `echo hi` as root, until the first stdout frame arrives;
/// then drains the stream so the connection can be reused.
async fn start_to_first_byte(
    sender: &mut Sender,
) -> Result<Duration, Box<dyn std::error::Error + Send + Sync>> {
    let msg = serde_json::json!({
        "process": {"cmd": PROGRAM, "args": ARGS},
        "stdin": false,
    })
    .to_string();
    let mut body = Vec::with_capacity(5 + msg.len());
    body.push(0);
    body.extend_from_slice(&u32::try_from(msg.len())?.to_be_bytes());
    body.extend_from_slice(msg.as_bytes());
    let req = http::Request::post("/process.Process/Start")
        .header("host", "localhost")
        .header("content-type", "application/connect+json")
        .header("connect-protocol-version", "1")
        // "root:" in basic auth picks the user, as the SDK does.
        .header("authorization", "Basic cm9vdDo=")
        .body(Full::new(Bytes::from(body)))?;
    let t = Instant::now();
    let mut resp = sender.send_request(req).await?;
    let mut buf = Vec::new();
    let mut first = None;
    while let Some(frame) = resp.body_mut().frame().await {
        if let Ok(data) = frame?.into_data() {
            buf.extend_from_slice(&data);
        }
        if first.is_none() && contains(&buf, b"\"stdout\"") {
            first = Some(t.elapsed());
        }
    }
    first.ok_or_else(|| "no stdout frame in the Start stream".into())
}

async fn post_json(
    sender: &mut Sender,
    path: &str,
    body: &'static str,
) -> Result<u16, Box<dyn std::error::Error + Send + Sync>> {
    let req = http::Request::post(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    resp.into_body().collect().await?;
    Ok(status)
}

/// `POST /execute` on the code-interpreter surface; returns the whole NDJSON reply.
async fn execute(
    sender: &mut Sender,
    code: &str,
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let body = serde_json::json!({ "code": code }).to_string();
    let req = http::Request::post("/execute")
        .header("host", "localhost")
        .header("e2b-sandbox-port", "49999")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let resp = sender.send_request(req).await?;
    if resp.status() != 200 {
        return Err(format!("/execute answered {}", resp.status()).into());
    }
    let bytes = resp.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn rss_kib(pid: u32) -> Result<u64, Box<dyn std::error::Error + Send + Sync>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .ok_or_else(|| "no VmRSS".into())
}
