//! The gateway's HTTP API, called one request at a time from a blocking command.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// A request and its whole answer may take this long (a kill of a busy sandbox included).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Connecting to the gateway may take this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

type Http = hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>;

/// A client of one gateway, with its key.
pub(crate) struct Client {
    rt: tokio::runtime::Runtime,
    http: Http,
    base: String,
    key: Option<String>,
}

/// An answer, whole.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("base", &self.base).finish()
    }
}

impl Client {
    pub(crate) fn new(base: &str, key: Option<String>) -> Result<Self, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the runtime: {e}"))?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let http =
            hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self {
            rt,
            http,
            base: base.to_owned(),
            key,
        })
    }

    /// A request to `path` with the API key, as the SDK sends it.
    pub(crate) fn request(&self, method: Method, path: &str) -> http::request::Builder {
        let b = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(
                "user-agent",
                concat!("coppice-cli/", env!("CARGO_PKG_VERSION")),
            );
        match &self.key {
            Some(k) => b.header("x-api-key", k),
            None => b,
        }
    }

    /// Sends `method path` with a JSON `body` and returns the answer, whatever its status.
    pub(crate) fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply, String> {
        let b = self.request(method, path);
        let req = match body {
            Some(v) => b
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(v.to_string()))),
            None => b.body(Full::new(Bytes::new())),
        }
        .map_err(|e| format!("bad request for {path}: {e}"))?;
        self.send(req, CALL_TIMEOUT)
    }

    /// Sends `req` and reads the whole answer within `limit`.
    pub(crate) fn send(&self, req: Request<Full<Bytes>>, limit: Duration) -> Result<Reply, String> {
        let what = format!("{} {}", req.method(), req.uri().path());
        self.rt.block_on(async {
            let work = async {
                let resp = self
                    .http
                    .request(req)
                    .await
                    .map_err(|e| self.unreachable(&e))?;
                let (parts, body) = resp.into_parts();
                let body = body
                    .collect()
                    .await
                    .map_err(|e| format!("{what}: the answer was cut off: {e}"))?
                    .to_bytes();
                Ok(Reply {
                    status: parts.status,
                    headers: parts.headers,
                    body,
                })
            };
            tokio::time::timeout(limit, work)
                .await
                .unwrap_or_else(|_| Err(format!("{what}: no answer within {}s", limit.as_secs())))
        })
    }

    /// Sends `req` and hands each piece of the answer's body to `chunk` as it arrives (no
    /// overall limit: a command may run for as long as it runs). A status other than 200
    /// is an error with the gateway's message.
    pub(crate) fn stream(
        &self,
        req: Request<Full<Bytes>>,
        mut chunk: impl FnMut(&[u8]) -> Result<(), String>,
    ) -> Result<(), String> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        self.rt.block_on(async {
            let resp = tokio::time::timeout(CALL_TIMEOUT, self.http.request(req))
                .await
                .map_err(|_| {
                    format!(
                        "{method} {path}: no answer within {}s",
                        CALL_TIMEOUT.as_secs()
                    )
                })?
                .map_err(|e| self.unreachable(&e))?;
            let status = resp.status();
            let mut body = resp.into_body();
            if status != StatusCode::OK {
                let bytes = body
                    .collect()
                    .await
                    .map(http_body_util::Collected::to_bytes)
                    .unwrap_or_default();
                return Err(api_error(&method, &path, status, &bytes));
            }
            while let Some(frame) = body.frame().await {
                let frame =
                    frame.map_err(|e| format!("{method} {path}: the stream was cut off: {e}"))?;
                if let Some(data) = frame.data_ref() {
                    chunk(data)?;
                }
            }
            Ok(())
        })
    }

    /// `method path` answered 2xx as JSON (`Value::Null` for an empty body), or an error
    /// carrying the gateway's message.
    pub(crate) fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, String> {
        let reply = self.call(method.clone(), path, body)?;
        expect_json(&method, path, &reply)
    }

    /// Waits `d` on the client's runtime (between polls of a follow).
    pub(crate) fn sleep(&self, d: Duration) {
        self.rt.block_on(tokio::time::sleep(d));
    }

    fn unreachable(&self, e: &hyper_util::client::legacy::Error) -> String {
        let mut msg = format!("cannot reach the gateway at {}: {e}", self.base);
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            msg.push_str(&format!(": {s}"));
            source = s.source();
        }
        msg
    }
}

/// The JSON of a 2xx answer, or the gateway's error as a sentence.
pub(crate) fn expect_json(method: &Method, path: &str, reply: &Reply) -> Result<Value, String> {
    if !reply.status.is_success() {
        return Err(api_error(method, path, reply.status, &reply.body));
    }
    if reply.body.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&reply.body)
        .map_err(|e| format!("{method} {path}: the gateway's answer is not JSON: {e}"))
}

/// An error answer as one sentence: the gateway's `message` (E2B's `{code, message}`), and
/// for a route the gateway has no handler for, that it does not serve it yet.
pub(crate) fn api_error(method: &Method, path: &str, status: StatusCode, body: &[u8]) -> String {
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned());
    let route = path.split('?').next().unwrap_or(path);
    let unrouted = (status == StatusCode::NOT_FOUND && message.starts_with("no route for"))
        || status == StatusCode::METHOD_NOT_ALLOWED;
    if unrouted {
        format!("this gateway does not serve {method} {route} yet ({status}: {message})")
    } else {
        format!("{method} {route}: {status}: {message}")
    }
}

/// `s` percent-encoded for a path segment or a query value.
pub(crate) fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_gateways_message_and_missing_routes() {
        let e = api_error(
            &Method::GET,
            "/api-keys?x=1",
            StatusCode::NOT_FOUND,
            br#"{"code":404,"message":"no route for GET /api-keys"}"#,
        );
        assert_eq!(
            e,
            "this gateway does not serve GET /api-keys yet (404 Not Found: no route for GET /api-keys)"
        );
        let e = api_error(
            &Method::DELETE,
            "/sandboxes/x",
            StatusCode::NOT_FOUND,
            br#"{"code":404,"message":"sandbox \"x\" not found"}"#,
        );
        assert_eq!(
            e,
            "DELETE /sandboxes/x: 404 Not Found: sandbox \"x\" not found"
        );
        let e = api_error(
            &Method::POST,
            "/p",
            StatusCode::BAD_GATEWAY,
            b"upstream gone\n",
        );
        assert_eq!(e, "POST /p: 502 Bad Gateway: upstream gone");
    }

    #[test]
    fn encoding_keeps_unreserved_characters_only() {
        assert_eq!(encode("team/name:tag v"), "team%2Fname%3Atag%20v");
        assert_eq!(encode("a-b_c.d~e"), "a-b_c.d~e");
    }
}
