//! Test harness: an in-process agent on a unix socket in a temp dir, and a raw HTTP/1.1
//! client that speaks to it the way the E2B SDK does.
//!
//! The agent runs inside the test process, so tests must not spawn or wait for child
//! processes themselves: the agent's reaper owns every `wait` in the process.

#![allow(dead_code, unreachable_pub, missing_docs, clippy::unwrap_used)]

use std::collections::VecDeque;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf as _, Bytes, BytesMut};
use coppice_envd::state::{AgentConfig, AgentState};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::sync::mpsc;

/// The uid the test passwd gives `user` when the tests run as root (`nobody`).
pub const USER_UID: u32 = 65534;

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A running agent and its scratch directory.
pub struct Agent {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub state: Arc<AgentState>,
    pub user_uid: u32,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Kill whatever a failed test left running, then stop serving.
        self.state.signal_all(nix::sys::signal::Signal::SIGKILL);
        self.server.abort();
    }
}

impl Agent {
    /// Starts an agent whose `user` lives in `<tmp>/home/user` and `root` in `<tmp>/root`.
    ///
    /// As root, `user` is uid 65534 so user switching is real; otherwise both names map to
    /// the current uid and tests of switching print SKIP.
    pub async fn start() -> Agent {
        let dir = tempfile::tempdir().unwrap();
        // `nobody` must be able to reach its home below the temp dir.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let home = dir.path().join("home/user");
        let root_home = dir.path().join("root");
        std::fs::create_dir_all(&home).unwrap();
        std::fs::create_dir_all(&root_home).unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let (user_uid, root_uid) = if is_root() { (USER_UID, 0) } else { (me, me) };
        std::os::unix::fs::chown(&home, Some(user_uid), Some(user_uid)).unwrap();
        let passwd = dir.path().join("passwd");
        std::fs::write(
            &passwd,
            format!(
                "root:x:{root_uid}:{root_uid}:root:{}:/bin/bash\nuser:x:{user_uid}:{user_uid}:user:{}:/bin/bash\n",
                root_home.display(),
                home.display()
            ),
        )
        .unwrap();
        let group = dir.path().join("group");
        std::fs::write(&group, format!("root:x:{root_uid}:\nuser:x:{user_uid}:\n")).unwrap();
        let state = Arc::new(AgentState::with_config(AgentConfig {
            passwd,
            group,
            disk_root: dir.path().to_path_buf(),
            report_file: Some(dir.path().join(coppice_envd::report::FILE)),
        }));
        let socket = dir.path().join("agent.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let server = tokio::spawn(coppice_envd::hop::serve(listener, Arc::clone(&state)));
        Agent {
            dir,
            socket,
            state,
            user_uid,
            server,
        }
    }

    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home/user")
    }

    /// Hands `path` and everything below it to `user`, as files the user made would be
    /// (fixtures are written by the test, as root).
    pub fn give_to_user(&self, path: &std::path::Path) {
        std::os::unix::fs::lchown(path, Some(self.user_uid), Some(self.user_uid)).unwrap();
        if std::fs::symlink_metadata(path).unwrap().is_dir() {
            for e in std::fs::read_dir(path).unwrap() {
                self.give_to_user(&e.unwrap().path());
            }
        }
    }

    pub fn root_home(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Sends one request on a fresh connection; the response body is left unread.
    pub async fn send<B>(&self, req: Request<B>) -> Response<Incoming>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stream = tokio::net::UnixStream::connect(&self.socket).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        sender.send_request(req).await.unwrap()
    }

    /// Sends raw bytes on a fresh connection and returns everything the agent answers
    /// before closing (or until `limit` bytes).
    pub async fn raw(&self, bytes: &[u8]) -> Vec<u8> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut s = tokio::net::UnixStream::connect(&self.socket).await.unwrap();
        s.write_all(bytes).await.unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        out
    }

    /// A request with the headers the SDK sends to envd.
    pub fn request(&self, method: &str, uri: &str) -> http::request::Builder {
        Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "127.0.0.1:49101")
            .header("e2b-sandbox-id", "itest0000000000000000")
            .header("e2b-sandbox-port", "49983")
    }

    /// A unary Connect call; returns status and parsed JSON body.
    pub async fn unary(
        &self,
        path: &str,
        body: Value,
        extra: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let mut b = self
            .request("POST", path)
            .header("content-type", "application/json")
            .header("connect-protocol-version", "1")
            .header("connect-timeout-ms", "60000");
        for (k, v) in extra {
            b = b.header(*k, *v);
        }
        let resp = self.send(b.body(full(body.to_string())).unwrap()).await;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (status, v)
    }

    /// Opens a server stream with one request message, sent chunked like the SDK does.
    pub async fn stream(&self, path: &str, message: Value, extra: &[(&str, &str)]) -> RpcStream {
        let payload = message.to_string();
        self.stream_raw(path, envelope(0, payload.as_bytes()), extra)
            .await
    }

    /// Opens a server stream with a raw request body (sent chunked).
    pub async fn stream_raw(&self, path: &str, body: Vec<u8>, extra: &[(&str, &str)]) -> RpcStream {
        let mut b = self
            .request("POST", path)
            .header("content-type", "application/connect+json")
            .header("connect-protocol-version", "1")
            .header("connect-accept-encoding", "identity")
            .header("connect-content-encoding", "identity");
        for (k, v) in extra {
            b = b.header(*k, *v);
        }
        let resp = self
            .send(b.body(Chunked::new(vec![Bytes::from(body)])).unwrap())
            .await;
        RpcStream::new(resp)
    }

    /// Runs `cmd` with `bash -l -c` and collects the whole stream.
    pub async fn run(&self, cmd: &str, extra: &[(&str, &str)]) -> Outcome {
        let msg = serde_json::json!({
            "process": { "cmd": "/bin/bash", "args": ["-l", "-c", cmd] },
            "stdin": false
        });
        self.stream("/process.Process/Start", msg, extra)
            .await
            .outcome()
            .await
    }
}

pub fn full(b: impl Into<Bytes>) -> http_body_util::Full<Bytes> {
    http_body_util::Full::new(b.into())
}

pub fn envelope(flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![flags];
    v.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    v.extend_from_slice(payload);
    v
}

pub fn b64(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

pub fn unb64(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

pub fn basic(user: &str) -> String {
    format!("Basic {}", b64(format!("{user}:").as_bytes()))
}

/// A body of known chunks with no declared length, so hyper sends it chunked.
pub struct Chunked {
    chunks: VecDeque<Bytes>,
}

impl Chunked {
    pub fn new(chunks: Vec<Bytes>) -> Self {
        Self {
            chunks: chunks.into(),
        }
    }
}

impl http_body::Body for Chunked {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.chunks.pop_front().map(|c| Ok(Frame::data(c))))
    }
}

/// A chunked body fed while the request is in flight.
pub struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

pub fn channel_body() -> (mpsc::Sender<Bytes>, ChannelBody) {
    let (tx, rx) = mpsc::channel(16);
    (tx, ChannelBody { rx })
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// The response side of a Connect stream, decoded envelope by envelope.
pub struct RpcStream {
    pub status: StatusCode,
    pub headers: HeaderMap,
    body: Incoming,
    buf: BytesMut,
    /// The end-of-stream payload, once seen.
    pub end: Option<Value>,
}

/// One decoded item of a stream.
#[derive(Debug)]
pub enum Item {
    Message(Value),
    End(Value),
}

impl RpcStream {
    fn new(resp: Response<Incoming>) -> Self {
        let status = resp.status();
        let headers = resp.headers().clone();
        Self {
            status,
            headers,
            body: resp.into_body(),
            buf: BytesMut::new(),
            end: None,
        }
    }

    /// The next message or the end-of-stream payload; `None` if the body ended.
    pub async fn next(&mut self) -> Option<Item> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if self.buf.len() >= 5 + len {
                    let flags = self.buf[0];
                    self.buf.advance(5);
                    let payload = self.buf.split_to(len);
                    let v: Value = serde_json::from_slice(&payload).unwrap();
                    if flags & 0x02 != 0 {
                        self.end = Some(v.clone());
                        return Some(Item::End(v));
                    }
                    assert_eq!(flags, 0, "message envelopes carry flags 0");
                    return Some(Item::Message(v));
                }
            }
            match self.body.frame().await {
                None => {
                    assert!(self.buf.is_empty(), "stream ended inside an envelope");
                    return None;
                }
                Some(f) => {
                    if let Ok(d) = f.unwrap().into_data() {
                        self.buf.extend_from_slice(&d);
                    }
                }
            }
        }
    }

    /// The next message; panics on end of stream.
    pub async fn message(&mut self) -> Value {
        match self.next().await {
            Some(Item::Message(v)) => v,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    /// Reads everything, checking the process-stream grammar: start, data..., end, EOS.
    pub async fn outcome(mut self) -> Outcome {
        let mut out = Outcome::default();
        let mut events = Vec::new();
        while let Some(item) = self.next().await {
            match item {
                Item::Message(v) => events.push(v),
                Item::End(v) => {
                    out.eos = v;
                    assert!(
                        self.next().await.is_none(),
                        "nothing may follow end of stream"
                    );
                    break;
                }
            }
        }
        out.status = self.status;
        for (i, ev) in events.iter().enumerate() {
            let ev = &ev["event"];
            if let Some(s) = ev.get("start") {
                assert_eq!(i, 0, "start must come first");
                out.pid = s["pid"].as_u64().map(|p| u32::try_from(p).unwrap());
            } else if let Some(d) = ev.get("data") {
                assert!(out.end.is_none(), "data after end");
                for (k, dst) in [
                    ("stdout", &mut out.stdout),
                    ("stderr", &mut out.stderr),
                    ("pty", &mut out.pty),
                ] {
                    if let Some(s) = d.get(k) {
                        let bytes = unb64(s.as_str().unwrap());
                        assert!(bytes.len() <= 32 * 1024, "data chunks are at most 32 KiB");
                        dst.extend_from_slice(&bytes);
                        out.chunks += 1;
                    }
                }
            } else if let Some(e) = ev.get("end") {
                assert!(out.end.is_none(), "one end event");
                out.end = Some(e.clone());
            } else if ev.get("keepalive").is_some() {
                out.keepalives += 1;
            } else {
                panic!("unexpected event {ev}");
            }
        }
        out
    }
}

/// A whole process stream.
#[derive(Debug, Default)]
pub struct Outcome {
    pub status: StatusCode,
    pub pid: Option<u32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub pty: Vec<u8>,
    pub chunks: usize,
    pub keepalives: usize,
    pub end: Option<Value>,
    pub eos: Value,
}

impl Outcome {
    pub fn exit_code(&self) -> i64 {
        self.end.as_ref().expect("end event")["exitCode"]
            .as_i64()
            .unwrap_or(0)
    }

    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn error_code(&self) -> Option<String> {
        self.eos
            .get("error")
            .map(|e| e["code"].as_str().unwrap().to_owned())
    }
}

/// Polls `f` (bounded) until it is true; no timing is asserted, it only waits.
pub async fn eventually(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..500 {
        if f() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    false
}

pub fn pid_alive(pid: u32) -> bool {
    // A zombie still has a /proc entry; its state letter is Z.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

pub fn owner(path: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::symlink_metadata(path).unwrap().uid()
}
