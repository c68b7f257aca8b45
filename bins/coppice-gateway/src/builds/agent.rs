//! Runs one command in a build sandbox through its agent (`process.Process/Start` over the
//! agent's unix socket, Connect's JSON streaming), handing each line of its output on as it
//! comes.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ending {
    /// It exited with this code (0 is success).
    Exited(i64),
    /// It was killed (a signal, or the step's time ran out); the agent's words.
    Killed(String),
}

/// What to run.
#[derive(Debug)]
pub(crate) struct Command<'a> {
    /// The user it runs as.
    pub(crate) user: &'a str,
    /// A shell command line for `/bin/bash -c`.
    pub(crate) script: &'a str,
    /// Its environment, besides the agent's defaults.
    pub(crate) envs: &'a BTreeMap<String, String>,
    /// Its working directory; the user's home when `None`.
    pub(crate) cwd: Option<&'a str>,
    /// How long it may run: the agent kills it then.
    pub(crate) timeout: Duration,
    /// The sandbox's access token, when its agent has one.
    pub(crate) token: Option<&'a str>,
}

/// How much longer than the command's own timeout the gateway waits for the agent's answer.
const GRACE: Duration = Duration::from_secs(10);

/// Runs `cmd` through the agent at `socket`, calling `line` with each line of its output
/// (stdout and stderr). An error is a failure to talk to the agent, or the agent's refusal.
pub(crate) async fn run(
    socket: &Path,
    cmd: &Command<'_>,
    line: &mut (dyn FnMut(&str) + Send),
) -> Result<Ending, String> {
    let limit = cmd.timeout + GRACE;
    match tokio::time::timeout(limit, run_inner(socket, cmd, line)).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "the sandbox's agent did not answer within {}s",
            limit.as_secs()
        )),
    }
}

/// Sends `process.Process/Start` for `cmd` (without a deadline when `background`).
async fn start(
    socket: &Path,
    cmd: &Command<'_>,
    background: bool,
) -> Result<http::Response<hyper::body::Incoming>, String> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| format!("connect {}: {e}", socket.display()))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake with the agent: {e}"))?;
    tokio::spawn(conn);
    let mut process = serde_json::json!({
        "cmd": "/bin/bash",
        "args": ["-c", cmd.script],
        "envs": cmd.envs,
    });
    if let Some(cwd) = cmd.cwd {
        process["cwd"] = serde_json::Value::from(cwd);
    }
    let msg = serde_json::json!({ "process": process, "stdin": false }).to_string();
    let mut body = Vec::with_capacity(msg.len() + 5);
    body.push(0u8);
    body.extend_from_slice(
        &u32::try_from(msg.len())
            .map_err(|_| "command too long".to_owned())?
            .to_be_bytes(),
    );
    body.extend_from_slice(msg.as_bytes());
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{}:", cmd.user));
    let mut req = http::Request::post("/process.Process/Start")
        .header(http::header::HOST, "localhost")
        .header(http::header::CONTENT_TYPE, "application/connect+json")
        .header("connect-protocol-version", "1")
        .header(http::header::AUTHORIZATION, format!("Basic {auth}"));
    if !background {
        req = req.header(
            "connect-timeout-ms",
            cmd.timeout.as_millis().min(9_999_999_999).to_string(),
        );
    }
    if let Some(token) = cmd.token {
        req = req.header("x-access-token", token);
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    sender
        .send_request(req)
        .await
        .map_err(|e| format!("start the command: {e}"))
}

/// Starts `cmd` and leaves it running (the agent keeps a process whose stream the client
/// closed); returns once the agent says it started. `cmd.timeout` bounds the wait.
pub(crate) async fn spawn(socket: &Path, cmd: &Command<'_>) -> Result<(), String> {
    let started = async {
        let mut body = accepted(start(socket, cmd, true).await?).await?;
        let mut buf = BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("read the command's start: {e}"))?;
            if let Ok(data) = frame.into_data() {
                buf.extend_from_slice(&data);
            }
            if buf.len() >= 5 {
                let len = usize::try_from(u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]))
                    .map_err(|_| "envelope too long".to_owned())?;
                if buf.len() >= 5 + len {
                    let v: serde_json::Value = serde_json::from_slice(&buf[5..5 + len])
                        .map_err(|e| format!("the agent sent a bad message: {e}"))?;
                    if v["event"].get("start").is_some() {
                        return Ok(());
                    }
                    return Err(format!("the command did not start: {v}"));
                }
            }
        }
        Err("the agent ended the stream before the command started".to_owned())
    };
    match tokio::time::timeout(cmd.timeout, started).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "the command did not start within {}s",
            cmd.timeout.as_secs()
        )),
    }
}

/// The body of the agent's answer to a start, or why the agent refused the command.
async fn accepted(
    resp: http::Response<hyper::body::Incoming>,
) -> Result<hyper::body::Incoming, String> {
    let status = resp.status();
    let body = resp.into_body();
    if status.is_success() {
        return Ok(body);
    }
    let text = body
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    Err(format!("the agent refused the command ({status}): {text}"))
}

async fn run_inner(
    socket: &Path,
    cmd: &Command<'_>,
    line: &mut (dyn FnMut(&str) + Send),
) -> Result<Ending, String> {
    let mut body = accepted(start(socket, cmd, false).await?).await?;
    let mut buf = BytesMut::new();
    let mut out = Lines::default();
    let mut err = Lines::default();
    let mut ending = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("read the command's output: {e}"))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while buf.len() >= 5 {
            let len = usize::try_from(u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]))
                .map_err(|_| "envelope too long".to_owned())?;
            if buf.len() < 5 + len {
                break;
            }
            let flags = buf[0];
            buf.advance(5);
            let payload = buf.split_to(len);
            let v: serde_json::Value = serde_json::from_slice(&payload)
                .map_err(|e| format!("the agent sent a bad message: {e}"))?;
            if flags & 0x02 != 0 {
                if let Some(e) = v.get("error") {
                    return Err(format!(
                        "the agent failed the command: {}",
                        e.get("message").and_then(|m| m.as_str()).unwrap_or("")
                    ));
                }
                continue;
            }
            let event = &v["event"];
            if let Some(d) = event.get("data") {
                for (key, lines) in [("stdout", &mut out), ("stderr", &mut err)] {
                    if let Some(s) = d.get(key).and_then(|s| s.as_str()) {
                        let bytes = base64::engine::general_purpose::STANDARD
                            .decode(s)
                            .map_err(|e| format!("the agent sent bad output: {e}"))?;
                        lines.push(&bytes, line);
                    }
                }
            } else if let Some(end) = event.get("end") {
                let exited = end.get("exited").and_then(serde_json::Value::as_bool);
                let code = end
                    .get("exitCode")
                    .and_then(serde_json::Value::as_i64)
                    .unwrap_or(0);
                ending = Some(if exited == Some(false) {
                    Ending::Killed(
                        end.get("status")
                            .and_then(|s| s.as_str())
                            .unwrap_or("killed")
                            .to_owned(),
                    )
                } else {
                    Ending::Exited(code)
                });
            }
        }
    }
    out.flush(line);
    err.flush(line);
    ending.ok_or_else(|| "the command's stream ended without its end event".to_owned())
}

/// Splits a byte stream into lines.
#[derive(Debug, Default)]
struct Lines(Vec<u8>);

/// The longest line handed on whole; longer ones are cut.
const MAX_LINE: usize = 16 * 1024;

impl Lines {
    fn push(&mut self, bytes: &[u8], line: &mut (dyn FnMut(&str) + Send)) {
        for b in bytes {
            if *b == b'\n' || self.0.len() >= MAX_LINE {
                let text = String::from_utf8_lossy(&self.0).into_owned();
                line(text.trim_end_matches('\r'));
                self.0.clear();
                if *b == b'\n' {
                    continue;
                }
            }
            self.0.push(*b);
        }
    }

    fn flush(&mut self, line: &mut (dyn FnMut(&str) + Send)) {
        if !self.0.is_empty() {
            let text = String::from_utf8_lossy(&self.0).into_owned();
            line(&text);
            self.0.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_split_into_lines_across_chunks() {
        let mut got = Vec::new();
        let mut l = Lines::default();
        let mut sink = |s: &str| got.push(s.to_owned());
        l.push(b"a\nb", &mut sink);
        l.push(b"c\r\n\nd", &mut sink);
        l.flush(&mut sink);
        assert_eq!(got, ["a", "bc", "", "d"]);
    }
}
