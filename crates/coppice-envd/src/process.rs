//! `process.Process`: starting commands, streaming their output, stdin, signals, PTYs.
//!
//! Every process runs in its own session (so its process group can be signalled and
//! killed as a whole) and, when it asks for a PTY, with that PTY as controlling
//! terminal. Its output is read in chunks of at most 32 KiB and fanned out to every
//! stream attached to it (the `Start` stream and any `Connect` streams); a slow stream
//! slows the process down through its pipe instead of growing buffers in the agent.
//! The end event is sent only after the output the process wrote before exiting.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt as _;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{Request, Response};
use http_body::Body as HttpBody;
use nix::sys::signal::{killpg, Signal};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::connect::{self, Code, EnvelopeReader, Kind, RpcError, StreamSender};
use crate::fdio::{set_cloexec, FdIo};
use crate::proctable::{lock, EndInfo, Event, Fanout, Manager, Proc};
use crate::reaper::{self, Exit};
use crate::reply::Body;
use crate::report;
use crate::state::AgentState;
use crate::users::{self, User};

/// Largest output chunk sent in one data event (envd's size).
const CHUNK: usize = 32 * 1024;
/// `PATH` for commands when the agent itself has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

// ---- Wire messages (ProtoJSON; numbers may arrive as strings). ----

fn de_opt_u32<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let v = Option::<serde_json::Value>::deserialize(d)?;
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom("expected a uint32")),
        Some(serde_json::Value::String(s)) => s
            .parse()
            .map(Some)
            .map_err(|_| serde::de::Error::custom("expected a uint32")),
        Some(_) => Err(serde::de::Error::custom("expected a uint32")),
    }
}

fn de_u32<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    de_opt_u32(d).map(Option::unwrap_or_default)
}

/// ProtoJSON `bytes`: standard or URL-safe base64, padded or not.
pub(crate) fn decode_bytes(s: &str) -> Result<Vec<u8>, RpcError> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    STANDARD
        .decode(s)
        .or_else(|_| STANDARD_NO_PAD.decode(s))
        .or_else(|_| URL_SAFE.decode(s))
        .or_else(|_| URL_SAFE_NO_PAD.decode(s))
        .map_err(|_| RpcError::invalid("invalid base64 in bytes field"))
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProcessConfig {
    #[serde(default)]
    cmd: String,
    #[serde(default)]
    args: Option<Vec<String>>,
    #[serde(default)]
    envs: Option<HashMap<String, String>>,
    #[serde(default)]
    cwd: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct PtySize {
    #[serde(default, deserialize_with = "de_u32")]
    cols: u32,
    #[serde(default, deserialize_with = "de_u32")]
    rows: u32,
}

#[derive(Debug, Default, Deserialize)]
struct Pty {
    #[serde(default)]
    size: Option<PtySize>,
}

#[derive(Debug, Default, Deserialize)]
struct StartRequest {
    #[serde(default)]
    process: Option<ProcessConfig>,
    #[serde(default)]
    pty: Option<Pty>,
    #[serde(default)]
    tag: Option<String>,
    #[serde(default)]
    stdin: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
struct Selector {
    #[serde(default, deserialize_with = "de_opt_u32")]
    pid: Option<u32>,
    #[serde(default)]
    tag: Option<String>,
}

/// The running process `sel` names, else envd's errors.
fn find(mgr: &Manager, sel: &Selector) -> Result<Arc<Proc>, RpcError> {
    if sel.pid.is_none() && sel.tag.is_none() {
        return Err(RpcError::invalid("process selector is empty"));
    }
    mgr.find(sel.pid, sel.tag.as_deref())
        .ok_or_else(|| RpcError::not_found(format!("process {} not found", sel.describe())))
}

impl Selector {
    fn describe(&self) -> String {
        match (&self.pid, &self.tag) {
            (Some(p), _) => format!("with pid {p}"),
            (None, Some(t)) => format!("with tag {t}"),
            (None, None) => "(no selector)".into(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
struct SelectorOnly {
    #[serde(default)]
    process: Option<Selector>,
}

#[derive(Debug, Default, Deserialize)]
struct Input {
    #[serde(default)]
    stdin: Option<String>,
    #[serde(default)]
    pty: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct SendInputRequest {
    #[serde(default)]
    process: Option<Selector>,
    #[serde(default)]
    input: Option<Input>,
}

#[derive(Debug, Default, Deserialize)]
struct SendSignalRequest {
    #[serde(default)]
    process: Option<Selector>,
    #[serde(default)]
    signal: Option<serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
struct UpdateRequest {
    #[serde(default)]
    process: Option<Selector>,
    #[serde(default)]
    pty: Option<Pty>,
}

#[derive(Debug, Default, Deserialize)]
struct StreamStart {
    #[serde(default)]
    process: Option<Selector>,
}

#[derive(Debug, Default, Deserialize)]
struct StreamData {
    #[serde(default)]
    input: Option<Input>,
}

#[derive(Debug, Default, Deserialize)]
struct StreamInputRequest {
    #[serde(default)]
    start: Option<StreamStart>,
    #[serde(default)]
    data: Option<StreamData>,
}

fn selector(sel: Option<Selector>) -> Result<Selector, RpcError> {
    sel.ok_or_else(|| RpcError::invalid("process selector is required"))
}

// ---- Dispatch. ----

/// Serves `POST /process.Process/<method>`.
pub(crate) async fn handle<B>(
    state: Arc<AgentState>,
    method: &str,
    req: Request<B>,
) -> Response<Body>
where
    B: HttpBody<Data = Bytes> + Unpin + Send + 'static,
    B::Error: std::fmt::Display,
{
    match method {
        "Start" | "Connect" => {
            if let Some(resp) = connect::check_content_type(req.headers(), Kind::Streaming) {
                return resp;
            }
            let result = if method == "Start" {
                start(state, req).await
            } else {
                connect_stream(state, req).await
            };
            result.unwrap_or_else(|e| connect::stream_error(&e))
        }
        "StreamInput" => {
            if let Some(resp) = connect::check_content_type(req.headers(), Kind::Streaming) {
                return resp;
            }
            stream_input(state, req).await
        }
        "List" | "SendInput" | "SendSignal" | "CloseStdin" | "Update" => {
            let headers = req.headers().clone();
            connect::serve_unary(&headers, unary(state, method, req)).await
        }
        other => connect::unary_error(&RpcError::new(
            Code::Unimplemented,
            format!("process.Process/{other} is not implemented"),
        )),
    }
}

async fn unary<B>(
    state: Arc<AgentState>,
    method: &str,
    req: Request<B>,
) -> Result<serde_json::Value, RpcError>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let body = connect::read_unary(req.into_body()).await?;
    let mgr = &state.processes;
    match method {
        "List" => {
            let procs: Vec<serde_json::Value> = lock(&mgr.procs)
                .values()
                .map(|p| {
                    let mut info = json!({ "config": p.config, "pid": p.pid });
                    if let Some(tag) = &p.tag {
                        info["tag"] = json!(tag);
                    }
                    info
                })
                .collect();
            Ok(json!({ "processes": procs }))
        }
        "SendInput" => {
            let r: SendInputRequest = connect::decode(&body)?;
            let proc = find(mgr, &selector(r.process)?)?;
            write_input(&proc, r.input.unwrap_or_default()).await?;
            Ok(json!({}))
        }
        "SendSignal" => {
            let r: SendSignalRequest = connect::decode(&body)?;
            let proc = find(mgr, &selector(r.process)?)?;
            let sig = parse_signal(r.signal.as_ref())?;
            killpg(proc.pgid(), sig)
                .map_err(|e| RpcError::internal(format!("error sending signal: {e}")))?;
            Ok(json!({}))
        }
        "CloseStdin" => {
            let r: SelectorOnly = connect::decode(&body)?;
            let proc = find(mgr, &selector(r.process)?)?;
            if proc.pty.is_some() {
                return Err(RpcError::new(
                    Code::FailedPrecondition,
                    "cannot close stdin of a PTY process; send EOT (Ctrl-D) instead",
                ));
            }
            // Dropping the write end delivers end of file to the process.
            proc.stdin.lock().await.take();
            Ok(json!({}))
        }
        "Update" => {
            let r: UpdateRequest = connect::decode(&body)?;
            let proc = find(mgr, &selector(r.process)?)?;
            let Some(size) = r.pty.and_then(|p| p.size) else {
                return Ok(json!({}));
            };
            let Some(pty) = &proc.pty else {
                return Err(RpcError::new(
                    Code::FailedPrecondition,
                    "process has no pty to resize",
                ));
            };
            resize(pty, &size)?;
            Ok(json!({}))
        }
        _ => Err(RpcError::new(Code::Unimplemented, "unknown method")),
    }
}

fn parse_signal(v: Option<&serde_json::Value>) -> Result<Signal, RpcError> {
    let sig = match v {
        Some(serde_json::Value::String(s)) if s == "SIGNAL_SIGKILL" || s == "9" => Signal::SIGKILL,
        Some(serde_json::Value::String(s)) if s == "SIGNAL_SIGTERM" || s == "15" => Signal::SIGTERM,
        Some(serde_json::Value::Number(n)) if n.as_u64() == Some(9) => Signal::SIGKILL,
        Some(serde_json::Value::Number(n)) if n.as_u64() == Some(15) => Signal::SIGTERM,
        other => {
            return Err(RpcError::new(
                Code::Unimplemented,
                format!(
                    "invalid signal: {}",
                    other.map_or("none".into(), |v| v.to_string())
                ),
            ))
        }
    };
    Ok(sig)
}

async fn write_input(proc: &Proc, input: Input) -> Result<(), RpcError> {
    if let Some(data) = input.pty {
        let data = decode_bytes(&data)?;
        let Some(pty) = &proc.pty else {
            return Err(RpcError::new(
                Code::FailedPrecondition,
                "process has no pty; send stdin instead",
            ));
        };
        return pty
            .write_all(&data)
            .await
            .map_err(|e| RpcError::internal(format!("error writing to pty: {e}")));
    }
    if let Some(data) = input.stdin {
        let data = decode_bytes(&data)?;
        if let Some(pty) = &proc.pty {
            // envd accepts stdin for a PTY process by writing it to the terminal.
            return pty
                .write_all(&data)
                .await
                .map_err(|e| RpcError::internal(format!("error writing to pty: {e}")));
        }
        let guard = proc.stdin.lock().await;
        let Some(stdin) = guard.as_ref() else {
            return Err(RpcError::new(
                Code::FailedPrecondition,
                "stdin is not enabled or was closed for this process",
            ));
        };
        return stdin
            .write_all(&data)
            .await
            .map_err(|e| RpcError::internal(format!("error writing to stdin: {e}")));
    }
    Ok(())
}

fn winsize(size: &PtySize) -> nix::pty::Winsize {
    let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
    nix::pty::Winsize {
        ws_row: clamp(size.rows),
        ws_col: clamp(size.cols),
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

fn resize(pty: &FdIo, size: &PtySize) -> Result<(), RpcError> {
    let ws = winsize(size);
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which points at a live
    // local; the fd is a PTY master owned by `pty` for the duration of the call.
    let rc = unsafe { libc::ioctl(pty.raw(), libc::TIOCSWINSZ, &ws) };
    if rc < 0 {
        return Err(RpcError::internal(format!(
            "error resizing pty: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

// ---- Start / Connect streams. ----

async fn start<B>(state: Arc<AgentState>, req: Request<B>) -> Result<Response<Body>, RpcError>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let lifetime = connect::timeout(req.headers())?;
    let keepalive = connect::keepalive_interval(req.headers());
    let user = users::from_headers(&state, req.headers())?;
    let msg = EnvelopeReader::new(req.into_body()).single().await?;
    let r: StartRequest = connect::decode(&msg)?;
    let (proc, events) = spawn(&state, &user, r, lifetime)?;
    let (tx, resp) = connect::stream_response();
    let pid = proc.pid;
    tokio::spawn(async move {
        if tx
            .send(&json!({ "event": { "start": { "pid": pid } } }))
            .await
        {
            forward(events, tx, keepalive, lifetime.map(|d| Instant::now() + d)).await;
        }
    });
    Ok(resp)
}

async fn connect_stream<B>(
    state: Arc<AgentState>,
    req: Request<B>,
) -> Result<Response<Body>, RpcError>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let deadline = connect::timeout(req.headers())?.map(|d| Instant::now() + d);
    let keepalive = connect::keepalive_interval(req.headers());
    let msg = EnvelopeReader::new(req.into_body()).single().await?;
    let r: SelectorOnly = connect::decode(&msg)?;
    let sel = selector(r.process)?;
    let (pid, events) = match find(&state.processes, &sel) {
        Ok(p) => (p.pid, p.subscribe()),
        Err(e) => {
            // A process that ended recently still answers with its end event.
            let Some((pid, end)) = state.processes.find_ended(sel.pid, sel.tag.as_deref()) else {
                return Err(e);
            };
            let (etx, erx) = mpsc::channel(1);
            let _ = etx.try_send(Event::End(end));
            (pid, erx)
        }
    };
    let (tx, resp) = connect::stream_response();
    tokio::spawn(async move {
        if tx
            .send(&json!({ "event": { "start": { "pid": pid } } }))
            .await
        {
            forward(events, tx, keepalive, deadline).await;
        }
    });
    Ok(resp)
}

/// Copies process events to a stream until the end event, the client leaving, or the
/// deadline, sending keepalives when the process is quiet.
async fn forward(
    mut events: mpsc::Receiver<Event>,
    tx: StreamSender,
    keepalive: Duration,
    deadline: Option<Instant>,
) {
    let mut next_ping = Instant::now() + keepalive;
    loop {
        let deadline_sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = events.recv() => {
                let msg = match ev {
                    Some(Event::Stdout(b)) => json!({ "event": { "data": { "stdout": b64(&b) } } }),
                    Some(Event::Stderr(b)) => json!({ "event": { "data": { "stderr": b64(&b) } } }),
                    Some(Event::Pty(b)) => json!({ "event": { "data": { "pty": b64(&b) } } }),
                    Some(Event::End(end)) if end.timed_out => {
                        tx.finish(Some(&RpcError::new(Code::DeadlineExceeded, "deadline exceeded"))).await;
                        return;
                    }
                    Some(Event::End(end)) => {
                        if tx.send(&end.to_json()).await {
                            tx.finish(None).await;
                        }
                        return;
                    }
                    None => {
                        tx.finish(Some(&RpcError::internal("process events ended without an end event"))).await;
                        return;
                    }
                };
                if !tx.send(&msg).await {
                    return;
                }
                next_ping = Instant::now() + keepalive;
            }
            () = tokio::time::sleep_until(next_ping) => {
                if !tx.send(&json!({ "event": { "keepalive": {} } })).await {
                    return;
                }
                next_ping = Instant::now() + keepalive;
            }
            () = deadline_sleep => {
                tx.finish(Some(&RpcError::new(Code::DeadlineExceeded, "deadline exceeded"))).await;
                return;
            }
            () = tx.closed() => return,
        }
    }
}

/// The environment of a command: `PATH`, the user's `HOME`/`USER`/`LOGNAME`, then the
/// sandbox envs from `/init`, then the request's envs (last wins).
fn environment(
    state: &AgentState,
    user: &User,
    request: &HashMap<String, String>,
) -> Vec<(String, String)> {
    let mut env: HashMap<String, String> = HashMap::new();
    env.insert(
        "PATH".into(),
        std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.into()),
    );
    env.insert("HOME".into(), user.home.to_string_lossy().into_owned());
    env.insert("USER".into(), user.name.clone());
    env.insert("LOGNAME".into(), user.name.clone());
    env.extend(state.envs_snapshot());
    env.extend(request.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.into_iter().collect()
}

fn spawn(
    state: &Arc<AgentState>,
    user: &User,
    r: StartRequest,
    lifetime: Option<Duration>,
) -> Result<(Arc<Proc>, mpsc::Receiver<Event>), RpcError> {
    let config = r
        .process
        .ok_or_else(|| RpcError::invalid("process config is required"))?;
    if config.cmd.is_empty() {
        return Err(RpcError::invalid("process cmd is required"));
    }
    let args = config.args.clone().unwrap_or_default();
    let envs = config.envs.clone().unwrap_or_default();
    let cwd = match config.cwd.as_deref().filter(|c| !c.is_empty()) {
        Some(c) => users::resolve_path(c, user),
        None => match state.default_workdir() {
            Some(w) => users::resolve_path(&w, user),
            None if user.home.is_dir() => user.home.clone(),
            None => "/".into(),
        },
    };
    if !cwd.is_dir() {
        return Err(RpcError::invalid(format!(
            "cwd '{}' does not exist",
            cwd.display()
        )));
    }

    let mut cmd = std::process::Command::new(&config.cmd);
    cmd.args(&args)
        .env_clear()
        .envs(environment(state, user, &envs))
        .current_dir(&cwd);

    let use_pty = r.pty.is_some();
    let mut pty_master = None;
    let mut stdin_enabled = r.stdin.unwrap_or(true);
    if let Some(pty) = &r.pty {
        let size = pty.size.as_ref().map(winsize);
        let opened = nix::pty::openpty(size.as_ref(), None)
            .map_err(|e| RpcError::internal(format!("error opening pty: {e}")))?;
        set_cloexec(&opened.master).map_err(io_err)?;
        set_cloexec(&opened.slave).map_err(io_err)?;
        let slave = opened.slave;
        cmd.stdin(Stdio::from(slave.try_clone().map_err(io_err)?))
            .stdout(Stdio::from(slave.try_clone().map_err(io_err)?))
            .stderr(Stdio::from(slave));
        pty_master = Some(opened.master);
        stdin_enabled = false;
    } else {
        cmd.stdin(if stdin_enabled {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    }

    let switch_user = nix::unistd::geteuid().as_raw() != user.uid;
    let groups: Vec<libc::gid_t> = users::groups(state, user);
    let (uid, gid) = (user.uid, user.gid);
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe functions (setsid, open/write/close, sigprocmask, ioctl, setgroups,
    // setgid, setuid) on data computed before the fork; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // User code goes before the agent in the OOM killer's line, and receives the
            // signals the agent's own threads block.
            crate::oom::yield_in_child()?;
            crate::agent::unblock_in_child()?;
            if use_pty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if switch_user
                && (libc::setgroups(groups.len(), groups.as_ptr()) < 0
                    || libc::setgid(gid) < 0
                    || libc::setuid(uid) < 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }

    let (mut child, exit_rx) = reaper::spawn(&mut cmd)
        .map_err(|e| RpcError::invalid(format!("error starting process '{}': {e}", config.cmd)))?;
    let started = Instant::now();
    // Closes the parent's copies of the PTY slave, so the master sees end of file
    // once the process and its children are gone.
    drop(cmd);

    let stdin = match child.stdin.take() {
        Some(s) if stdin_enabled => Some(Arc::new(FdIo::new(OwnedFd::from(s)).map_err(io_err)?)),
        _ => None,
    };
    let pty = match pty_master {
        Some(m) => Some(Arc::new(FdIo::new(m).map_err(io_err)?)),
        None => None,
    };
    let stdout = child
        .stdout
        .take()
        .map(|s| FdIo::new(OwnedFd::from(s)))
        .transpose()
        .map_err(io_err)?;
    let stderr = child
        .stderr
        .take()
        .map(|s| FdIo::new(OwnedFd::from(s)))
        .transpose()
        .map_err(io_err)?;

    let mut listed = json!({ "cmd": config.cmd, "args": args });
    if !envs.is_empty() {
        listed["envs"] = json!(envs);
    }
    if let Some(c) = &config.cwd {
        listed["cwd"] = json!(c);
    }
    let proc = Arc::new(Proc {
        pid: child.id(),
        tag: r.tag,
        config: listed,
        stdin: tokio::sync::Mutex::new(stdin),
        pty: pty.clone(),
        fanout: Mutex::new(Fanout::default()),
    });
    // What E2B's envd logs for every process, so the sandbox's log says what ran.
    let command = std::iter::once(config.cmd.as_str())
        .chain(args.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(" ");
    tracing::info!(
        event_type = "process_start",
        pid = proc.pid,
        command = %command,
        user = %user.name,
        cwd = %cwd.display(),
        tag = proc.tag.as_deref(),
        "Process with pid {} started",
        proc.pid
    );
    // Subscribe before any output can be read, so the Start stream misses nothing.
    let events = proc.subscribe();
    lock(&state.processes.procs).insert(proc.pid, Arc::clone(&proc));

    let (exited_tx, exited_rx) = watch::channel(false);
    let mut pumps = Vec::new();
    if let Some(out) = stdout {
        pumps.push(tokio::spawn(pump(
            Arc::clone(&proc),
            Arc::new(out),
            Event::Stdout,
            exited_rx.clone(),
        )));
    }
    if let Some(err) = stderr {
        pumps.push(tokio::spawn(pump(
            Arc::clone(&proc),
            Arc::new(err),
            Event::Stderr,
            exited_rx.clone(),
        )));
    }
    if let Some(master) = pty {
        pumps.push(tokio::spawn(pump(
            Arc::clone(&proc),
            master,
            Event::Pty,
            exited_rx,
        )));
    }
    let st = Arc::clone(state);
    let p = Arc::clone(&proc);
    tokio::spawn(async move {
        let (exit, timeout) = supervise(&p, exit_rx, lifetime).await;
        let ran = started.elapsed();
        let timed_out = timeout.is_some();
        // Everything the process wrote before it exited is in its pipes now; the pumps
        // drain that and stop.
        let _ = exited_tx.send(true);
        for h in pumps {
            let _ = h.await;
        }
        // No more writes can reach a dead process.
        p.stdin.lock().await.take();
        let end = EndInfo { exit, timed_out };
        let (exit_code, status) = end.code_and_status();
        tracing::info!(
            event_type = "process_end",
            pid = p.pid,
            exit_code,
            status = %status,
            timed_out,
            "Process with pid {} ended",
            p.pid
        );
        st.processes.finished(&p, end.clone());
        p.publish_end(end).await;
        report_end(&st, &p, &command, exit, ran, timeout).await;
    });
    Ok((proc, events))
}

/// Tells the gateway that `proc` ended (`task.completed`), and first, if its lifetime ran out,
/// that the agent killed it (`task.timeout`, with the lifetime and the CPU time it had used).
/// No thread is started for it: a sandbox at its memory limit may have none to give.
async fn report_end(
    state: &AgentState,
    proc: &Proc,
    command: &str,
    exit: Exit,
    ran: Duration,
    timeout: Option<(Duration, Duration)>,
) {
    let Some(file) = state.config.report_file.clone() else {
        return;
    };
    let ending = match exit {
        Exit::Code(c) => report::Ending::new(proc.pid, Some(c), None, ran),
        Exit::Signal(s) => report::Ending::new(proc.pid, None, Some(s), ran),
    };
    let mut reports = Vec::with_capacity(2);
    if let Some((limit, cpu)) = timeout {
        reports.push(report::Report::task_timeout(command, limit, cpu, ending));
    }
    reports.push(report::Report::task_completed(
        command,
        proc.tag.as_deref(),
        timeout.is_some(),
        ending,
    ));
    for r in &reports {
        report::append(&file, r).await;
    }
}

fn io_err(e: impl std::fmt::Display) -> RpcError {
    RpcError::internal(format!("error setting up process: {e}"))
}

/// Waits for the exit, killing the process group when its lifetime runs out; if it did, also
/// returns that lifetime and the CPU time the group had used when it was killed.
async fn supervise(
    proc: &Proc,
    mut exit_rx: tokio::sync::oneshot::Receiver<Exit>,
    lifetime: Option<Duration>,
) -> (Exit, Option<(Duration, Duration)>) {
    if let Some(life) = lifetime {
        tokio::select! {
            r = &mut exit_rx => return (r.unwrap_or(Exit::Signal(9)), None),
            () = tokio::time::sleep(life) => {
                // Read before the kill: a dead group's CPU time is gone from /proc.
                let cpu = report::group_cpu(proc.pgid().as_raw());
                // The group may be gone already; the exit below tells.
                let _ = killpg(proc.pgid(), Signal::SIGKILL);
                return (exit_rx.await.unwrap_or(Exit::Signal(9)), Some((life, cpu)));
            }
        }
    }
    (exit_rx.await.unwrap_or(Exit::Signal(9)), None)
}

/// Reads one output fd and publishes its chunks until end of file, or, once the process
/// has exited, until the fd has nothing more buffered (a background child that keeps the
/// pipe open must not hold the end event back).
async fn pump(
    proc: Arc<Proc>,
    io: Arc<FdIo>,
    wrap: fn(Bytes) -> Event,
    mut exited: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        tokio::select! {
            biased;
            r = io.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => proc.publish(wrap(Bytes::copy_from_slice(&buf[..n]))).await,
            },
            // The only change is to `true` (or the sender dropping): the process is gone.
            _ = exited.changed() => {
                while let Ok(n) = io.try_read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    proc.publish(wrap(Bytes::copy_from_slice(&buf[..n]))).await;
                }
                return;
            }
        }
    }
}

// ---- StreamInput. ----

async fn stream_input<B>(state: Arc<AgentState>, req: Request<B>) -> Response<Body>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut reader = EnvelopeReader::new(req.into_body());
    let result: Result<(), RpcError> = async {
        let mut proc: Option<Arc<Proc>> = None;
        while let Some(msg) = reader.next().await? {
            let r: StreamInputRequest = connect::decode(&msg)?;
            if let Some(start) = r.start {
                proc = Some(find(&state.processes, &selector(start.process)?)?);
            } else if let Some(data) = r.data {
                let Some(p) = &proc else {
                    return Err(RpcError::invalid(
                        "the first StreamInput message must be start",
                    ));
                };
                write_input(p, data.input.unwrap_or_default()).await?;
            }
            // keepalive messages need nothing.
        }
        Ok(())
    }
    .await;
    let (tx, resp) = connect::stream_response();
    tokio::spawn(async move {
        match result {
            Ok(()) => {
                if tx.send(&json!({})).await {
                    tx.finish(None).await;
                }
            }
            Err(e) => tx.finish(Some(&e)).await,
        }
    });
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_event_shapes_follow_envd() {
        let ok = EndInfo {
            exit: Exit::Code(0),
            timed_out: false,
        }
        .to_json();
        assert_eq!(
            ok,
            json!({"event":{"end":{"exited":true,"status":"exit status 0"}}})
        );
        let three = EndInfo {
            exit: Exit::Code(3),
            timed_out: false,
        }
        .to_json();
        assert_eq!(three["event"]["end"]["exitCode"], 3);
        assert_eq!(three["event"]["end"]["error"], "exit status 3");
        let killed = EndInfo {
            exit: Exit::Signal(9),
            timed_out: false,
        }
        .to_json();
        assert_eq!(
            killed,
            json!({"event":{"end":{"exitCode":-1,"exited":false,"status":"signal: killed","error":"signal: killed"}}})
        );
    }

    #[test]
    fn selectors_accept_numbers_and_strings() {
        let s: Selector = serde_json::from_str(r#"{"pid":"42"}"#).unwrap();
        assert_eq!(s.pid, Some(42));
        let s: Selector = serde_json::from_str(r#"{"pid":42}"#).unwrap();
        assert_eq!(s.pid, Some(42));
        let err = serde_json::from_str::<Selector>(r#"{"pid":-1}"#).unwrap_err();
        assert!(err.to_string().contains("uint32"));
    }

    #[test]
    fn signals_parse() {
        assert_eq!(
            parse_signal(Some(&json!("SIGNAL_SIGKILL"))).unwrap(),
            Signal::SIGKILL
        );
        assert_eq!(parse_signal(Some(&json!(15))).unwrap(), Signal::SIGTERM);
        assert_eq!(
            parse_signal(Some(&json!("SIGNAL_UNSPECIFIED")))
                .unwrap_err()
                .code,
            Code::Unimplemented
        );
    }
}
