//! The internal hop: the agent's one unix socket and how a request finds its surface.
//!
//! # Contract (also in `docs/envd.md`)
//!
//! * The agent listens on one unix stream socket (`/run/coppice/agent.sock` by default) and
//!   speaks plain HTTP/1.1 on it, keep-alive, one request at a time per connection.
//! * The gateway forwards the SDK's HTTP/1.1 request unchanged: method, path and query,
//!   headers and body (chunked bodies stay chunked). Responses stream back as produced.
//! * The surface is chosen by E2B's own `E2b-Sandbox-Port` header, which the SDK already
//!   sends on every data-plane request: `49983` or absent → envd; `49999` → the code
//!   interpreter; anything else → 502 `{"code":502,"message":"The sandbox is running but
//!   port is not open","port":N}` (what E2B's proxy says for a port nobody serves).
//! * The gateway talks to the agent itself (for `POST /init`) with no `E2b-Sandbox-Port`
//!   header, i.e. to envd.
//! * Authentication is the agent's: envd checks `X-Access-Token` exactly as E2B's envd does.
//!   The gateway must strip `/init` (and any other control-only path) from SDK traffic.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, UnixListener};

use crate::connect::{self, Code, RpcError};
use crate::reply::{self, Body};
use crate::secret::constant_time_eq;
use crate::state::AgentState;
use crate::{filesystem, http_api, process};

/// E2B's port for envd.
pub const ENVD_PORT: u16 = 49983;
/// E2B's port for the code interpreter.
pub const INTERPRETER_PORT: u16 = 49999;

/// Which surface a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// envd: `/health`, `/files`, Connect RPCs, ...
    Envd,
    /// The code interpreter (`/execute`, `/contexts`).
    Interpreter,
    /// A port nothing in the agent serves.
    Other(u16),
    /// A header that is not a port number.
    Invalid,
}

/// Picks the surface from `E2b-Sandbox-Port`.
pub fn surface(headers: &http::HeaderMap) -> Surface {
    let Some(v) = headers.get("e2b-sandbox-port") else {
        return Surface::Envd;
    };
    match v.to_str().ok().and_then(|s| s.trim().parse::<u16>().ok()) {
        Some(ENVD_PORT) => Surface::Envd,
        Some(INTERPRETER_PORT) => Surface::Interpreter,
        Some(p) => Surface::Other(p),
        None => Surface::Invalid,
    }
}

/// Serves HTTP/1.1 connections from `listener` until the task is dropped.
///
/// Accept errors (for instance running out of fds) are logged and retried after a short
/// pause instead of ending the agent.
pub async fn serve(listener: UnixListener, state: Arc<AgentState>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => serve_connection(stream, Arc::clone(&state), None),
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Serves HTTP/1.1 connections from a TCP `listener` for the surface of `port` alone: E2B's
/// ports on the sandbox's loopback, where a request reaches envd (49983) or the code
/// interpreter (49999) by the port it was sent to, whatever `E2b-Sandbox-Port` it carries.
pub async fn serve_tcp(listener: TcpListener, state: Arc<AgentState>, port: u16) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                // Responses are several small writes (NDJSON lines).
                let _ = stream.set_nodelay(true);
                serve_connection(stream, Arc::clone(&state), Some(port));
            }
            Err(e) => {
                tracing::warn!(port, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Serves one connection on its own task; `port`, when given, is the surface of every
/// request on it.
fn serve_connection<S>(stream: S, state: Arc<AgentState>, port: Option<u16>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let svc = service_fn(move |mut req: Request<Incoming>| {
            let state = Arc::clone(&state);
            if let Some(port) = port {
                req.headers_mut()
                    .insert("e2b-sandbox-port", http::HeaderValue::from(port));
            }
            async move { Ok::<_, Infallible>(route(state, req).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), svc);
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    });
}

/// Routes one request to its surface.
pub(crate) async fn route(state: Arc<AgentState>, req: Request<Incoming>) -> Response<Body> {
    match surface(req.headers()) {
        Surface::Envd => envd(state, req).await,
        Surface::Interpreter => interpreter(state, req).await,
        Surface::Other(port) => reply::json(
            StatusCode::BAD_GATEWAY,
            &serde_json::json!({
                "code": 502,
                "message": "The sandbox is running but port is not open",
                "port": port,
            }),
        ),
        Surface::Invalid => {
            reply::error(StatusCode::BAD_REQUEST, "invalid E2b-Sandbox-Port header")
        }
    }
}

/// The code-interpreter surface (port 49999): `/execute` and `/contexts*`.
async fn interpreter(state: Arc<AgentState>, req: Request<Incoming>) -> Response<Body> {
    crate::interpreter::handle(state, req).await
}

/// Paths E2B's envd serves without `X-Access-Token` (they authenticate otherwise).
fn token_exempt(method: &Method, path: &str) -> bool {
    matches!(
        (method, path),
        (&Method::GET, "/health")
            | (&Method::GET | &Method::POST, "/files")
            | (&Method::POST, "/init")
    )
}

fn token_ok(state: &AgentState, headers: &http::HeaderMap) -> bool {
    match state.token() {
        None => true,
        Some(want) => headers
            .get("x-access-token")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|got| constant_time_eq(got.as_bytes(), want.as_bytes())),
    }
}

const UNAUTHORIZED: &str =
    "unauthorized access, please provide a valid access token or method signing if supported";

/// The envd surface: one route table.
async fn envd(state: Arc<AgentState>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    if !token_exempt(&method, &path) && !token_ok(&state, req.headers()) {
        if path.starts_with("/process.Process/") || path.starts_with("/filesystem.Filesystem/") {
            return connect_unauthorized(req.headers());
        }
        return reply::error(StatusCode::UNAUTHORIZED, UNAUTHORIZED);
    }
    if let Some(rpc) = path.strip_prefix("/process.Process/") {
        if method != Method::POST {
            return method_not_allowed();
        }
        let rpc = rpc.to_owned();
        return process::handle(state, &rpc, req).await;
    }
    if let Some(rpc) = path.strip_prefix("/filesystem.Filesystem/") {
        if method != Method::POST {
            return method_not_allowed();
        }
        let rpc = rpc.to_owned();
        return filesystem::handle(state, &rpc, req).await;
    }
    match (&method, path.as_str()) {
        (&Method::GET, "/health") => {
            let mut r = Response::new(reply::empty());
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }
        (&Method::POST, "/init") => http_api::init(state, req).await,
        (&Method::GET, "/envs") => http_api::envs(&state),
        (&Method::GET, "/metrics") => http_api::metrics(&state),
        (&Method::GET, "/files") => crate::files::get(state, req).await,
        (&Method::POST, "/files") => crate::files::post(state, req).await,
        (_, "/health" | "/init" | "/envs" | "/metrics" | "/files") => method_not_allowed(),
        _ => {
            // Unknown paths answer 404 with a Connect-shaped body: the SDK maps it to
            // "unimplemented" for RPCs and shows the message otherwise.
            let mut r = connect::unary_error(&RpcError::new(
                Code::Unimplemented,
                format!("{path} is not served by envd"),
            ));
            *r.status_mut() = StatusCode::NOT_FOUND;
            r
        }
    }
}

fn method_not_allowed() -> Response<Body> {
    reply::error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
}

/// An unauthenticated Connect call: streams get it in the end-of-stream envelope.
fn connect_unauthorized(headers: &http::HeaderMap) -> Response<Body> {
    let err = RpcError::new(Code::Unauthenticated, UNAUTHORIZED);
    let streaming = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with(connect::STREAM_JSON));
    if streaming {
        connect::stream_error(&err)
    } else {
        connect::unary_error(&err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn surface_from_header() {
        let mut h = http::HeaderMap::new();
        assert_eq!(surface(&h), Surface::Envd);
        h.insert("e2b-sandbox-port", "49999".parse().unwrap());
        assert_eq!(surface(&h), Surface::Interpreter);
        h.insert("e2b-sandbox-port", "49983".parse().unwrap());
        assert_eq!(surface(&h), Surface::Envd);
        h.insert("e2b-sandbox-port", "3000".parse().unwrap());
        assert_eq!(surface(&h), Surface::Other(3000));
        h.insert("e2b-sandbox-port", "x".parse().unwrap());
        assert_eq!(surface(&h), Surface::Invalid);
    }
}
