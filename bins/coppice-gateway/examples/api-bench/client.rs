//! The SDK's side of the wire: keep-alive HTTP/1.1 connections to the gateway (or straight to
//! a sandbox agent's socket) and the requests the E2B SDK sends, header for header where it
//! matters (`../shared/e2b-protocol.md` §2–4). Every request is bounded by [`REQUEST_TIMEOUT`]
//! and refused once the run has been interrupted, so nothing here can hang or outlive a Ctrl-C.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub(crate) type Res<T> = Result<T, BoxError>;
pub(crate) type Sender = http1::SendRequest<Full<Bytes>>;

/// Upper bound on any one request or sample, so nothing here can hang.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The command every command-latency sample runs, as in the envd benchmark.
pub(crate) const PROGRAM: &str = "/bin/echo";
pub(crate) const ARGS: [&str; 1] = ["hi"];
/// envd's and the code interpreter's ports (`E2b-Sandbox-Port`).
pub(crate) const ENVD_PORT: u16 = 49983;
pub(crate) const CODE_PORT: u16 = 49999;

/// Set by SIGINT or SIGTERM: every request from then on fails, so the run unwinds through
/// its normal cleanup.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Turns SIGINT and SIGTERM into [`INTERRUPTED`] (on `rt`'s workers).
pub(crate) fn catch_interrupts(rt: &tokio::runtime::Runtime) -> Res<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let _guard = rt.enter();
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    rt.spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        eprintln!("api bench: interrupted; cleaning up");
        INTERRUPTED.store(true, Ordering::SeqCst);
    });
    Ok(())
}

/// Fails once the run has been interrupted.
pub(crate) fn check_interrupted() -> Res<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err("interrupted".into())
    } else {
        Ok(())
    }
}

/// `f`, failed after [`REQUEST_TIMEOUT`] or at once when the run was interrupted.
pub(crate) async fn timeout<T>(f: impl std::future::Future<Output = Res<T>>) -> Res<T> {
    check_interrupted()?;
    tokio::time::timeout(REQUEST_TIMEOUT, f)
        .await
        .map_err(|_| format!("no answer within {REQUEST_TIMEOUT:?}"))?
}

/// Sandboxes created and not yet killed, so they are killed whatever happens.
pub(crate) type Live = Arc<Mutex<HashSet<String>>>;

pub(crate) fn live_set(live: &Live) -> std::sync::MutexGuard<'_, HashSet<String>> {
    live.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) async fn connect(addr: SocketAddr) -> Res<Sender> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// A connection straight to an agent's unix socket, as the gateway's proxy opens one.
pub(crate) async fn connect_unix(socket: &Path) -> Res<Sender> {
    let stream = tokio::net::UnixStream::connect(socket).await?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Sends `req` and reads the whole answer.
pub(crate) async fn send(
    sender: &mut Sender,
    req: http::Request<Full<Bytes>>,
) -> Res<(u16, Bytes)> {
    sender.ready().await?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

fn expect(what: &str, want: &[u16], (status, body): (u16, Bytes)) -> Res<Bytes> {
    if want.contains(&status) {
        Ok(body)
    } else {
        Err(format!(
            "{what} answered {status}: {}",
            String::from_utf8_lossy(&body)
        )
        .into())
    }
}

/// A control-plane request, with an API key as the SDK sends one (any key is accepted by a
/// gateway without `COPPICE_API_KEYS`).
pub(crate) fn control(method: Method, path: &str) -> http::request::Builder {
    http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "127.0.0.1")
        .header("x-api-key", "bench")
}

/// What a create returned that later calls need.
#[derive(Debug, Clone)]
pub(crate) struct Sandbox {
    pub(crate) id: String,
    pub(crate) token: String,
}

/// Which way a data-plane request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Via {
    /// Through the gateway, routed by E2B's `E2b-Sandbox-Id` header, as the SDK sends it.
    Gateway,
    /// Straight to the agent's unix socket: the same request without the gateway.
    Agent,
}

/// A data-plane request for `port` of `sbx`, with the headers the SDK sends.
pub(crate) fn data(
    method: Method,
    path: &str,
    sbx: &Sandbox,
    via: Via,
    port: u16,
) -> http::request::Builder {
    let b = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "127.0.0.1")
        .header("e2b-sandbox-port", port)
        .header("x-access-token", sbx.token.as_str());
    match via {
        Via::Gateway => b.header("e2b-sandbox-id", sbx.id.as_str()),
        Via::Agent => b,
    }
}

/// `POST /v2/sandboxes` with `body`; remembers the sandbox in `live`.
pub(crate) async fn create(sender: &mut Sender, live: &Live, body: &str) -> Res<Sandbox> {
    let req = control(Method::POST, "/v2/sandboxes")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))?;
    let body = expect("create", &[201], send(sender, req).await?)?;
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    let id = v["sandboxID"].as_str().ok_or("no sandboxID")?.to_owned();
    live_set(live).insert(id.clone());
    let token = v["envdAccessToken"]
        .as_str()
        .ok_or("no envdAccessToken")?
        .to_owned();
    Ok(Sandbox { id, token })
}

/// `DELETE /sandboxes/{id}`; returns how long it took.
pub(crate) async fn delete(sender: &mut Sender, live: &Live, id: &str) -> Res<Duration> {
    let req = control(Method::DELETE, &format!("/sandboxes/{id}")).body(Full::new(Bytes::new()))?;
    let t = Instant::now();
    let answer = send(sender, req).await?;
    let elapsed = t.elapsed();
    expect(&format!("kill of {id}"), &[204, 404], answer)?;
    live_set(live).remove(id);
    Ok(elapsed)
}

/// `POST /sandboxes/{id}/pause` as `sandbox.pause()` sends it.
pub(crate) async fn pause(sender: &mut Sender, id: &str) -> Res<()> {
    let req = control(Method::POST, &format!("/sandboxes/{id}/pause"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{}")))?;
    expect("pause", &[204], send(sender, req).await?).map(drop)
}

/// `POST /v2/sandboxes/{id}/connect`, which is how SDK 2.63 resumes a paused sandbox (201).
pub(crate) async fn resume(sender: &mut Sender, id: &str) -> Res<()> {
    let req = control(Method::POST, &format!("/v2/sandboxes/{id}/connect"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"timeout":300}"#)))?;
    expect("connect (resume)", &[201], send(sender, req).await?).map(drop)
}

/// `GET /sandboxes/{id}`.
pub(crate) async fn info(sender: &mut Sender, id: &str) -> Res<serde_json::Value> {
    let req = control(Method::GET, &format!("/sandboxes/{id}")).body(Full::new(Bytes::new()))?;
    let body = expect("get", &[200], send(sender, req).await?)?;
    Ok(serde_json::from_slice(&body)?)
}

/// `process.Start` of the benchmark command as a Connect stream (what `commands.run` sends);
/// returns the time from `t0` to the first stdout frame, then drains the stream so the
/// connection can be reused.
pub(crate) async fn start_to_first_output(
    sender: &mut Sender,
    sbx: &Sandbox,
    via: Via,
    t0: Instant,
) -> Res<Duration> {
    run_to_first_output(sender, sbx, via, t0, PROGRAM, &ARGS).await
}

/// `process.Start` of `program args` as the SDK's `commands.run` sends it.
fn start_request(
    sbx: &Sandbox,
    via: Via,
    program: &str,
    args: &[&str],
) -> Res<http::Request<Full<Bytes>>> {
    let msg = serde_json::json!({
        "process": {"cmd": program, "args": args},
        "stdin": false,
    })
    .to_string();
    Ok(
        data(Method::POST, "/process.Process/Start", sbx, via, ENVD_PORT)
            .header("content-type", "application/connect+json")
            .header("connect-protocol-version", "1")
            .body(Full::new(Bytes::from(envelope(&msg)?)))?,
    )
}

/// [`start_to_first_output`] of `program args`; returns only when the command has ended.
pub(crate) async fn run_to_first_output(
    sender: &mut Sender,
    sbx: &Sandbox,
    via: Via,
    t0: Instant,
    program: &str,
    args: &[&str],
) -> Res<Duration> {
    let req = start_request(sbx, via, program, args)?;
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

/// What a command printed, and how it ended.
#[derive(Debug, Clone)]
pub(crate) struct Ran {
    pub(crate) stdout: String,
    pub(crate) stderr: String,
    /// `None` when the stream ended without an end event.
    pub(crate) exit_code: Option<i64>,
}

/// `process.Start` of `program args` (as `commands.run` sends it); reads the stream to its end
/// and returns what the command printed and its exit code.
pub(crate) async fn run_to_end(
    sender: &mut Sender,
    sbx: &Sandbox,
    via: Via,
    program: &str,
    args: &[&str],
) -> Res<Ran> {
    use base64::Engine as _;
    let req = start_request(sbx, via, program, args)?;
    let (status, body) = send(sender, req).await?;
    if status != 200 {
        return Err(format!(
            "process.Start answered {status}: {}",
            String::from_utf8_lossy(&body)
        )
        .into());
    }
    let mut ran = Ran {
        stdout: String::new(),
        stderr: String::new(),
        exit_code: None,
    };
    // Envelopes: one flag byte, a big-endian length, a JSON message.
    let mut rest = &body[..];
    while rest.len() >= 5 {
        let flags = rest[0];
        let len = usize::try_from(u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]))?;
        let msg = rest.get(5..5 + len).ok_or("a truncated Connect envelope")?;
        rest = &rest[5 + len..];
        let v: serde_json::Value = serde_json::from_slice(msg)?;
        if flags & 0x02 != 0 {
            if let Some(e) = v.get("error") {
                return Err(format!("process.Start ended with {e}").into());
            }
            continue;
        }
        let event = &v["event"];
        if let Some(d) = event.get("data") {
            for (key, out) in [("stdout", &mut ran.stdout), ("stderr", &mut ran.stderr)] {
                if let Some(text) = d.get(key).and_then(serde_json::Value::as_str) {
                    let bytes = base64::engine::general_purpose::STANDARD.decode(text)?;
                    out.push_str(&String::from_utf8_lossy(&bytes));
                }
            }
        } else if let Some(end) = event.get("end") {
            ran.exit_code = Some(
                end.get("exitCode")
                    .and_then(serde_json::Value::as_i64)
                    .unwrap_or(0),
            );
        }
    }
    Ok(ran)
}

/// [`start_to_first_output`] from now, bounded by [`timeout`].
pub(crate) async fn command(s: &mut Sender, sbx: &Sandbox, via: Via) -> Res<Duration> {
    timeout(start_to_first_output(s, sbx, via, Instant::now())).await
}

/// One Connect streaming envelope: flags, big-endian length, message.
fn envelope(msg: &str) -> Res<Vec<u8>> {
    let mut body = Vec::with_capacity(5 + msg.len());
    body.push(0);
    body.extend_from_slice(&u32::try_from(msg.len())?.to_be_bytes());
    body.extend_from_slice(msg.as_bytes());
    Ok(body)
}

pub(crate) fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// `filesystem.Filesystem/Stat` of `path`, a unary Connect call (`files.get_info`).
pub(crate) async fn stat(sender: &mut Sender, sbx: &Sandbox, via: Via, path: &str) -> Res<()> {
    let req = data(
        Method::POST,
        "/filesystem.Filesystem/Stat",
        sbx,
        via,
        ENVD_PORT,
    )
    .header("content-type", "application/json")
    .header("connect-protocol-version", "1")
    .body(Full::new(Bytes::from(
        serde_json::json!({ "path": path }).to_string(),
    )))?;
    let body = expect("Stat", &[200], send(sender, req).await?)?;
    if !contains(&body, b"\"entry\"") {
        return Err(format!("Stat gave {}", String::from_utf8_lossy(&body)).into());
    }
    Ok(())
}

/// `POST /execute` of `code` in the default context (`run_code`); returns the whole NDJSON
/// answer once the stream has ended, as the SDK does.
pub(crate) async fn execute(
    sender: &mut Sender,
    sbx: &Sandbox,
    via: Via,
    code: &str,
) -> Res<String> {
    execute_in(sender, sbx, via, code, None).await
}

/// [`execute`] in the default context of `language` (`None`: python).
pub(crate) async fn execute_in(
    sender: &mut Sender,
    sbx: &Sandbox,
    via: Via,
    code: &str,
    language: Option<&str>,
) -> Res<String> {
    let body = serde_json::json!({
        "code": code, "context_id": null, "language": language, "env_vars": null,
    })
    .to_string();
    let req = data(Method::POST, "/execute", sbx, via, CODE_PORT)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let body = expect("/execute", &[200], send(sender, req).await?)?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// `POST /files?path=` with `content` as one multipart part named `file` whose filename is
/// the destination path, as `files.write` sends it.
pub(crate) async fn write_file(
    sender: &mut Sender,
    sbx: &Sandbox,
    via: Via,
    path: &str,
    content: &Bytes,
) -> Res<()> {
    const BOUNDARY: &str = "coppicebenchboundary7d2f9a";
    let head = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{path}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
    );
    let tail = format!("\r\n--{BOUNDARY}--\r\n");
    let mut body = Vec::with_capacity(head.len() + content.len() + tail.len());
    body.extend_from_slice(head.as_bytes());
    body.extend_from_slice(content);
    body.extend_from_slice(tail.as_bytes());
    let req = data(
        Method::POST,
        &format!("/files?path={}", encode(path)),
        sbx,
        via,
        ENVD_PORT,
    )
    .header(
        "content-type",
        format!("multipart/form-data; boundary={BOUNDARY}"),
    )
    .body(Full::new(Bytes::from(body)))?;
    expect("file write", &[200], send(sender, req).await?).map(drop)
}

/// `GET /files?path=`; with `gzip` the request accepts gzip as httpx (the Python SDK) does and
/// the answer is decoded. Returns the file's bytes.
pub(crate) async fn read_file(
    sender: &mut Sender,
    sbx: &Sandbox,
    via: Via,
    path: &str,
    gzip: bool,
) -> Res<Vec<u8>> {
    let mut req = data(
        Method::GET,
        &format!("/files?path={}", encode(path)),
        sbx,
        via,
        ENVD_PORT,
    );
    if gzip {
        req = req.header("accept-encoding", "gzip, deflate");
    }
    let req = req.body(Full::new(Bytes::new()))?;
    sender.ready().await?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let encoded = resp
        .headers()
        .get(http::header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
    let body = expect(
        "file read",
        &[200],
        (status, resp.into_body().collect().await?.to_bytes()),
    )?;
    if !encoded {
        return Ok(body.to_vec());
    }
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&body[..]), &mut out)?;
    Ok(out)
}

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
