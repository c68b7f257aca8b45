//! The data plane: requests for a sandbox go, unchanged and streaming both ways, to its agent's
//! unix socket (envd's port 49983 and the code interpreter's 49999) or to any other port
//! inside it ([`crate::api::ports`]).
//!
//! A request is for a sandbox when it carries E2B's `E2b-Sandbox-Id` header (with
//! `E2b-Sandbox-Port`, 49983 for envd or 49999 for the code interpreter), or when the gateway
//! has a `--domain` and the Host is `<port>-<id>.<domain>`. The port travels to the agent in
//! `E2b-Sandbox-Port`, which is how the agent picks the surface (`docs/envd.md`). Bodies are
//! passed through frame by frame; when the client goes away the agent connection is dropped,
//! so the agent sees the disconnect. The agent checks `X-Access-Token` itself; the traffic
//! access token of a sandbox that has one is checked here, before anything wakes it.

use coppice_lifecycle::backend::SandboxId;
use coppice_lifecycle::state::{Command, SandboxState};
use coppice_wire::error::SandboxNotFound;
use http::{HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::api::error::ApiError;
use crate::api::{closing, has_body, json, ports, stream_end, Body};
use crate::registry::Record;
use crate::{now, Gateway};

const SANDBOX_ID: &str = "e2b-sandbox-id";
const SANDBOX_PORT: &str = "e2b-sandbox-port";
/// How often a request wakes a sandbox that pauses again before the request gets through.
const WAKE_ATTEMPTS: usize = 4;
/// envd's port: the default when a request names none.
const ENVD_PORT: u16 = 49983;

/// Which sandbox and port a data-plane request is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) id: String,
    pub(crate) port: u16,
}

/// The request's sandbox, if it is a data-plane request; `Err` for a malformed port.
pub(crate) fn target<B>(
    req: &Request<B>,
    domain: Option<&str>,
) -> Option<Result<Target, ApiError>> {
    let headers = req.headers();
    if let Some(id) = headers.get(SANDBOX_ID) {
        let id = id.to_str().unwrap_or_default().to_owned();
        let port = match headers.get(SANDBOX_PORT) {
            None => Ok(ENVD_PORT),
            Some(p) => p
                .to_str()
                .ok()
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| ApiError::bad_request("invalid E2b-Sandbox-Port header")),
        };
        return Some(port.map(|port| Target { id, port }));
    }
    let domain = domain?;
    let host = headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host())?;
    let host = host.rsplit_once(':').map_or(host, |(h, p)| {
        if p.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    let label = host.strip_suffix(domain)?.strip_suffix('.')?;
    let (port, id) = label.split_once('-')?;
    let port = port.parse().ok()?;
    Some(Ok(Target {
        id: id.to_owned(),
        port,
    }))
}

/// E2B's 502 for a sandbox that does not exist (any more).
pub(crate) fn not_found(id: &str) -> Response<Body> {
    let mut resp = json(StatusCode::BAD_GATEWAY, &SandboxNotFound::new(id));
    // Byte for byte what E2B's proxy sends (spec §1.3).
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

/// Routes only the orchestrator may call: E2B's proxy refuses them too.
fn internal(port: u16, path: &str) -> bool {
    port == ENVD_PORT
        && matches!(
            path,
            "/init" | "/freeze" | "/unfreeze" | "/collapse" | "/fsfreeze" | "/fsthaw" | "/upgrade"
        )
}

/// Forwards `req` to the sandbox's agent. An answer given here instead (the sandbox is gone,
/// paused, or its agent unreachable) leaves the request's body unread, so it closes the
/// connection.
pub(crate) async fn forward(
    gw: &Gateway,
    req: Request<Incoming>,
    target: Target,
) -> Response<Body> {
    let unread = has_body(&req);
    match send(gw, req, target).await {
        Ok(resp) => resp,
        Err(resp) if unread => closing(resp),
        Err(resp) => resp,
    }
}

/// Sends `req` to the agent; `Err` is an answer given without sending it.
async fn send(
    gw: &Gateway,
    mut req: Request<Incoming>,
    target: Target,
) -> Result<Response<Body>, Response<Body>> {
    let Some(entry) = SandboxId::new(&*target.id)
        .ok()
        .and_then(|id| gw.entry(&id))
    else {
        return Err(not_found(&target.id));
    };
    if internal(target.port, req.uri().path()) {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "not found").into_response());
    }
    // The activity hook: checked and touched under the operation lock held for reading, so
    // the reaper cannot pause the sandbox between the two.
    let mut guard = entry.op.read().await;
    let mut record = entry.record();
    if let Some(rejected) =
        ports::token_rejection(record.traffic_token.as_deref(), req.headers(), &target)
    {
        return Err(rejected);
    }
    let in_flight = entry.begin_request();
    // A paused auto-resume sandbox is woken, which needs the lock for writing, and then
    // checked again under the read lock: a pause (manual, or the reaper's) may get in
    // between, and a request sent to a frozen agent would wait for whoever wakes it next.
    // A sandbox paused filesystem-only is never woken by traffic, as on E2B: it boots
    // afresh, which only an explicit connect or resume may do.
    for _ in 0..WAKE_ATTEMPTS {
        match record.lifecycle.state {
            SandboxState::Paused if record.lifecycle.policy.auto_resume && !record.paused_cold => {
                drop(guard);
                wake(gw, &entry).await.map_err(ApiError::into_response)?;
                guard = entry.op.read().await;
                record = entry.record();
            }
            _ => break,
        }
    }
    match record.lifecycle.state {
        SandboxState::Running => entry.touch(now()),
        SandboxState::Paused if record.lifecycle.policy.auto_resume && !record.paused_cold => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the sandbox was paused again each time it was woken; retry",
            )
            .into_response());
        }
        // Creating, paused without auto-resume, or killed: not reachable, as on E2B.
        _ => return Err(not_found(&target.id)),
    }
    if !ports::is_agent_port(target.port) {
        // A user's server may take its time to answer (a long poll): the lock goes now, so
        // a kill or pause never waits for it; the request stays counted as traffic.
        drop(guard);
        return ports::send(gw, req, &record.id, &target, in_flight).await;
    }
    let socket = gw.runtime.socket(&record.id);
    let stream = match tokio::net::UnixStream::connect(&socket).await {
        Ok(s) => s,
        // No socket, or nobody listening: the agent is gone, which E2B reports as its 502.
        // If it died, the sandbox ends here rather than at the watcher's next pass.
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            tracing::warn!(sandbox = %record.id, error = %e, "agent unreachable");
            drop(guard);
            crate::agent_death::check(gw, &entry).await;
            return Err(not_found(&target.id));
        }
        // Anything else (out of file descriptors, ...) is the gateway's trouble, not a
        // missing sandbox: say so, so a client retries instead of giving the sandbox up.
        Err(e) => {
            tracing::error!(sandbox = %record.id, error = %e, "cannot connect to the agent");
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the gateway cannot reach the sandbox's agent: {e}"),
            )
            .into_response());
        }
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(c) => c,
        Err(e) => {
            drop((guard, in_flight));
            return Err(agent_failed(gw, &entry, &target.id, &e).await);
        }
    };
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "agent connection ended");
        }
    });
    // The agent speaks HTTP/1.1. hyper's HTTP/1 client chunks a body of unknown length only
    // for an HTTP/1.1 request, so an HTTP/2 one (the SDKs' streamed Connect calls over TLS,
    // where ALPN picks h2) would reach the agent without its body.
    if req.version() == Version::HTTP_2 {
        ports::prepare(&mut req, false);
    }
    // The agent picks its surface from this header, whichever way the request was routed.
    if let Ok(v) = HeaderValue::from_str(&target.port.to_string()) {
        req.headers_mut().insert(SANDBOX_PORT, v);
    }
    // Once sent, the request's body belongs to the agent connection, whatever happens.
    // Body bytes are counted both ways for `coppice_proxy_bytes_total`.
    let req = req.map(|b| gw.metrics.count_in(b));
    Ok(match sender.send_request(req).await {
        Ok(resp) => tracked(gw, resp, in_flight),
        Err(e) => {
            drop((guard, in_flight));
            agent_failed(gw, &entry, &target.id, &e).await
        }
    })
}

/// The answer to a request the agent's connection failed before any response: the agent
/// may have died in the moment after it accepted the connection (a dying agent's socket
/// accepts until its last thread has exited), so the sandbox is checked as for a refused
/// connection. A dead agent's sandbox ends and gets E2B's 502 "not found"; a live agent's
/// failure is the 502 it is. The caller holds neither the operation lock nor the request's
/// in-flight count.
async fn agent_failed(
    gw: &Gateway,
    entry: &crate::Entry,
    id: &str,
    e: &hyper::Error,
) -> Response<Body> {
    tracing::warn!(sandbox = %entry.id, error = %e, "the agent's connection failed");
    if crate::agent_death::check(gw, entry).await || gw.entry(&entry.id).is_none() {
        return not_found(id);
    }
    ApiError::new(StatusCode::BAD_GATEWAY, format!("sandbox agent: {e}")).into_response()
}

/// A response from inside a sandbox as the client gets it: its body's bytes counted for
/// `coppice_proxy_bytes_total`, its request counted as under way until the body ends, and a
/// Connect stream cut off by the sandbox's end closed as Connect closes a failed stream
/// ([`stream_end`]).
pub(crate) fn tracked(
    gw: &Gateway,
    resp: Response<Incoming>,
    in_flight: crate::InFlight,
) -> Response<Body> {
    let envelopes = stream_end::Envelopes::for_response(resp.headers());
    resp.map(|b| {
        Tracked {
            inner: gw
                .metrics
                .count_out(b)
                .map_err(|e| Box::new(e) as _)
                .boxed(),
            envelopes,
            done: false,
            _in_flight: in_flight,
        }
        .boxed()
    })
}

/// A response body that keeps its request counted as under way until it ends or is dropped.
struct Tracked {
    inner: Body,
    /// For a Connect stream, where its envelopes begin and end.
    envelopes: Option<stream_end::Envelopes>,
    /// The body was ended here (by an end-of-stream envelope the gateway sent).
    done: bool,
    _in_flight: crate::InFlight,
}

impl hyper::body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        if self.done {
            return std::task::Poll::Ready(None);
        }
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        let this = &mut *self;
        match (polled, this.envelopes.as_mut()) {
            (std::task::Poll::Ready(Some(Ok(frame))), Some(envelopes)) => {
                if let Some(data) = frame.data_ref() {
                    envelopes.pass(data);
                }
                std::task::Poll::Ready(Some(Ok(frame)))
            }
            (std::task::Poll::Ready(Some(Err(e))), Some(envelopes)) => {
                match envelopes.end_for_gone_sandbox() {
                    Some(end) => {
                        tracing::debug!(error = %e, "sandbox stream cut off; ended it as unavailable");
                        this.done = true;
                        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(end))))
                    }
                    None => std::task::Poll::Ready(Some(Err(e))),
                }
            }
            (polled, _) => polled,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Resumes a paused auto-resume sandbox before its request is dispatched; concurrent
/// requests wake it once (the first takes the operation lock, the rest find it running).
async fn wake(gw: &Gateway, entry: &crate::Entry) -> Result<(), ApiError> {
    let _op = entry.op.write().await;
    let record = entry.record();
    if record.lifecycle.state != SandboxState::Paused || record.paused_cold {
        return Ok(());
    }
    let (lifecycle, event) = record
        .lifecycle
        .transition(Command::AutoResume { now: now() })?;
    gw.runtime.resume(&record.id).await?;
    gw.commit(
        entry,
        Record {
            lifecycle,
            ..record
        },
        &event,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::get("/files?path=x");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn headers_route_to_a_sandbox_and_port() {
        let t = target(
            &req(&[("E2b-Sandbox-Id", "abc"), ("E2b-Sandbox-Port", "49999")]),
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            t,
            Target {
                id: "abc".into(),
                port: 49999
            }
        );
        let t = target(&req(&[("E2b-Sandbox-Id", "abc")]), None)
            .unwrap()
            .unwrap();
        assert_eq!(t.port, 49983);
        target(
            &req(&[("E2b-Sandbox-Id", "abc"), ("E2b-Sandbox-Port", "x")]),
            None,
        )
        .unwrap()
        .unwrap_err();
        assert!(target(&req(&[]), None).is_none());
    }

    #[test]
    fn host_names_route_only_under_the_domain() {
        let r = req(&[("host", "49983-abc123.sbx.local:8080")]);
        let t = target(&r, Some("sbx.local")).unwrap().unwrap();
        assert_eq!(
            t,
            Target {
                id: "abc123".into(),
                port: 49983
            }
        );
        assert!(target(&r, None).is_none(), "no domain, no Host routing");
        assert!(target(&req(&[("host", "49983-abc.other.tld")]), Some("sbx.local")).is_none());
        assert!(target(&req(&[("host", "sbx.local")]), Some("sbx.local")).is_none());
        assert!(target(&req(&[("host", "api.sbx.local")]), Some("sbx.local")).is_none());
    }

    #[test]
    fn orchestrator_routes_are_internal() {
        assert!(internal(49983, "/init"));
        assert!(!internal(49983, "/files"));
        assert!(!internal(49999, "/init"));
    }
}
