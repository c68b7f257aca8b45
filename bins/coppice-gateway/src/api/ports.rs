//! User ports: data-plane requests for any port of a sandbox other than its agent's go to
//! that TCP port inside the sandbox, unchanged and streaming both ways.
//!
//! The gateway connects from inside the sandbox's network namespace ([`netns`]): a socket
//! made on a thread that has entered that namespace stays in it, so a connection to
//! `127.0.0.1:<port>` reaches a server bound there or to the wildcard address, with no
//! address, route or forwarder in the sandbox. Bodies pass through frame by frame (chunked
//! uploads, Server-Sent Events); an `Upgrade` (WebSocket) is completed on both sides and then
//! copied byte for byte. Connections to a server are kept alive and reused ([`pool`]).
//! Nothing listening is E2B's 502 "port is not open".
//!
//! A sandbox created with `network.allowPublicTraffic: false` has a traffic access token:
//! requests to its ports other than envd's must carry it in `e2b-traffic-access-token`, or
//! get E2B's 403. envd checks its own `X-Access-Token`.

mod netns;
mod pool;

use std::time::Duration;

use coppice_lifecycle::backend::SandboxId;
use coppice_wire::error::{PortClosed, TrafficTokenRejected};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::api::error::ApiError;
use crate::api::proxy::{self, Target};
use crate::api::{empty, json, Body};
use crate::config::Config;
use crate::{Gateway, InFlight};

/// The header that carries the traffic access token.
pub(crate) const TRAFFIC_TOKEN_HEADER: &str = "e2b-traffic-access-token";
/// envd's port: its own access token, never the traffic token.
const ENVD_PORT: u16 = 49983;
/// The code interpreter's port, which the agent also serves.
const CODE_PORT: u16 = 49999;
/// Host routing's domain without `--domain`.
const DEFAULT_DOMAIN: &str = "localhost";
/// How long a connection to a user port may take; on loopback it is immediate unless the
/// sandbox is wedged.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The domain under which a Host `<port>-<id>.<domain>` routes to a sandbox: `--domain`, or
/// else `localhost`, whose names resolve to loopback without any DNS setup in browsers, curl
/// and systemd's nss-myhostname.
pub(crate) fn routing_domain(config: &Config) -> &str {
    config.domain.as_deref().unwrap_or(DEFAULT_DOMAIN)
}

/// The `domain` of create and connect answers, from which the SDKs build `get_host(port)`
/// as `<port>-<id>.<domain>`: `--domain`, or else `localhost:<listener port>`, so that
/// `http://` + `get_host(8000)` reaches port 8000 of the sandbox through this gateway on
/// its own machine.
pub(crate) fn advertised_domain(gw: &Gateway) -> String {
    match &gw.config.domain {
        Some(d) => d.clone(),
        None => format!("{DEFAULT_DOMAIN}:{}", gw.config.listen.port()),
    }
}

/// Whether the sandbox's agent serves `port` (envd and the code interpreter); every other
/// port is a user port.
pub(crate) fn is_agent_port(port: u16) -> bool {
    matches!(port, ENVD_PORT | CODE_PORT)
}

/// Checks a request to `target` against the sandbox's traffic token, as E2B's proxy does
/// (only ports other than envd's, and only when the sandbox has one): the 403 to answer
/// instead of forwarding, if any.
pub(crate) fn token_rejection(
    token: Option<&str>,
    headers: &HeaderMap,
    target: &Target,
) -> Option<Response<Body>> {
    let token = token?;
    if target.port == ENVD_PORT {
        return None;
    }
    let rejected = match headers.get(TRAFFIC_TOKEN_HEADER) {
        None => TrafficTokenRejected::missing(&*target.id, TRAFFIC_TOKEN_HEADER),
        Some(given) if crate::service::constant_time_eq(given.as_bytes(), token.as_bytes()) => {
            return None
        }
        Some(_) => TrafficTokenRejected::invalid(&*target.id, TRAFFIC_TOKEN_HEADER),
    };
    Some(e2b_json(StatusCode::FORBIDDEN, &rejected))
}

/// A body of E2B's proxy, with its content type.
fn e2b_json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let mut resp = json(status, value);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

/// Sends `req` to `target.port` inside sandbox `id`, which the caller found running;
/// `in_flight` keeps it counted as traffic until the response (or the upgraded connection)
/// ends. `Err` is an answer given without sending the request.
pub(crate) async fn send(
    gw: &Gateway,
    mut req: Request<Incoming>,
    id: &SandboxId,
    target: &Target,
    in_flight: InFlight,
) -> Result<Response<Body>, Response<Body>> {
    let upgrade = wants_upgrade(&req);
    let client_side = upgrade.then(|| hyper::upgrade::on(&mut req));
    prepare(&mut req, upgrade);
    let mut req = req.map(|b| gw.metrics.count_in(b));
    let port_error = |e: hyper::Error| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("sandbox port {}: {e}", target.port),
        )
        .into_response()
    };
    // A kept connection first; an upgrade takes its connection for good, so it gets a new one.
    if !upgrade {
        if let Some(mut sender) = pool::take(id, target.port) {
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    pool::give_back(id, target.port, sender);
                    return Ok(answer(gw, resp, in_flight));
                }
                // Closed by the server before the request went out: a new connection.
                Err(mut e) => match e.take_message() {
                    Some(back) => req = back,
                    None => return Ok(port_error(e.into_error())),
                },
            }
        }
    }
    let stream = connect(gw, id, target).await?;
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(port_error)?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "sandbox port connection ended");
        }
    });
    let mut resp = match sender.send_request(req).await {
        Ok(resp) => resp,
        // The request is gone with the connection: no `Err`, whose callers close because
        // the body is unread.
        Err(e) => return Ok(port_error(e)),
    };
    if !upgrade {
        pool::give_back(id, target.port, sender);
    }
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_side) = client_side {
            let server_side = hyper::upgrade::on(&mut resp);
            let id = id.clone();
            tokio::spawn(async move {
                // The open connection is traffic for as long as it lasts.
                let _in_flight = in_flight;
                match tokio::try_join!(client_side, server_side) {
                    Ok((client, server)) => {
                        let (mut client, mut server) = (TokioIo::new(client), TokioIo::new(server));
                        if let Err(e) =
                            tokio::io::copy_bidirectional(&mut client, &mut server).await
                        {
                            tracing::debug!(sandbox = %id, error = %e, "upgraded connection ended");
                        }
                    }
                    Err(e) => tracing::debug!(sandbox = %id, error = %e, "upgrade failed"),
                }
            });
            return Ok(resp.map(|_| empty_body()));
        }
    }
    Ok(answer(gw, resp, in_flight))
}

/// The server's response as the client gets it.
fn answer(gw: &Gateway, mut resp: Response<Incoming>, in_flight: InFlight) -> Response<Body> {
    strip_hop_by_hop(resp.headers_mut(), false);
    proxy::tracked(gw, resp, in_flight)
}

/// A new connection to `target.port` inside sandbox `id`; `Err` is the answer to give.
async fn connect(
    gw: &Gateway,
    id: &SandboxId,
    target: &Target,
) -> Result<tokio::net::TcpStream, Response<Body>> {
    let ns = match gw.runtime.netns(id).await {
        Ok(ns) => ns,
        Err(e) => {
            // Its init is gone: the sandbox died under the gateway.
            tracing::warn!(sandbox = %id, error = %e, "no network namespace");
            return Err(proxy::not_found(&target.id));
        }
    };
    let port_closed = || {
        e2b_json(
            StatusCode::BAD_GATEWAY,
            &PortClosed::new(&*target.id, target.port),
        )
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, netns::connect(ns, target.port)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) if closed(&e) => {
            // A namespace handle outlives a death the gateway has not seen yet.
            if gw.runtime.alive(id).await {
                Err(port_closed())
            } else {
                Err(proxy::not_found(&target.id))
            }
        }
        Err(_) => {
            tracing::warn!(sandbox = %id, port = target.port, "connection timed out");
            Err(port_closed())
        }
        // Out of file descriptors and the like: the gateway's trouble, not the sandbox's.
        Ok(Err(e)) => {
            tracing::error!(sandbox = %id, port = target.port, error = %e, "cannot connect to a sandbox port");
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the gateway cannot reach the sandbox's port {}: {e}",
                    target.port
                ),
            )
            .into_response())
        }
    }
}

fn empty_body() -> Body {
    empty(StatusCode::OK).into_body()
}

/// Whether a connection error means nothing listens on the port.
fn closed(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::NotFound
    )
}

/// Whether the request asks to switch protocols (an HTTP/1.1 WebSocket handshake, say).
fn wants_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_tokens(req.headers()).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

/// The tokens of every `Connection` header.
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// Removes the headers that describe one hop (RFC 9110 §7.6.1), keeping `Connection` and
/// `Upgrade` for an upgrade. hyper frames the body itself on each side.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .filter(|n| !(upgrade && n == header::UPGRADE))
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if !upgrade {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

/// Makes a request from any client (HTTP/1.1 or HTTP/2) an HTTP/1.1 request in origin form
/// for the sandbox's server (or its agent), with the Host the client named.
pub(crate) fn prepare<B>(req: &mut Request<B>, upgrade: bool) {
    if !req.headers().contains_key(header::HOST) {
        if let Some(v) = req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            req.headers_mut().insert(header::HOST, v);
        }
    }
    let origin = req
        .uri()
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    if let Ok(uri) = origin.parse::<Uri>() {
        *req.uri_mut() = uri;
    }
    *req.version_mut() = Version::HTTP_11;
    strip_hop_by_hop(req.headers_mut(), upgrade);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(port: u16) -> Target {
        Target {
            id: "abc".into(),
            port,
        }
    }

    #[test]
    fn the_token_guards_every_port_but_envd() {
        let mut h = HeaderMap::new();
        assert!(token_rejection(None, &h, &target(8000)).is_none());
        assert!(token_rejection(Some("tok"), &h, &target(ENVD_PORT)).is_none());
        let missing = token_rejection(Some("tok"), &h, &target(8000)).unwrap();
        assert_eq!(missing.status(), StatusCode::FORBIDDEN);
        assert!(token_rejection(Some("tok"), &h, &target(CODE_PORT)).is_some());
        h.insert(TRAFFIC_TOKEN_HEADER, HeaderValue::from_static("tok2"));
        assert!(token_rejection(Some("tok"), &h, &target(8000)).is_some());
        h.insert(TRAFFIC_TOKEN_HEADER, HeaderValue::from_static("tok"));
        assert!(token_rejection(Some("tok"), &h, &target(8000)).is_none());
    }

    #[test]
    fn requests_leave_in_origin_form_without_hop_headers() {
        let mut req = Request::get("http://8000-abc.localhost:3000/a/b?c=d")
            .version(Version::HTTP_2)
            .header("connection", "keep-alive, x-hop")
            .header("x-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("x-end", "2")
            .body(())
            .unwrap();
        prepare(&mut req, false);
        assert_eq!(req.uri(), "/a/b?c=d");
        assert_eq!(req.version(), Version::HTTP_11);
        assert_eq!(req.headers()["host"], "8000-abc.localhost:3000");
        assert!(!req.headers().contains_key("x-hop"));
        assert!(!req.headers().contains_key("keep-alive"));
        assert!(!req.headers().contains_key("connection"));
        assert_eq!(req.headers()["x-end"], "2");
    }

    #[test]
    fn upgrades_keep_their_connection_headers() {
        let mut req = Request::get("/ws")
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-key", "x")
            .body(())
            .unwrap();
        assert!(wants_upgrade(&req));
        prepare(&mut req, true);
        assert_eq!(req.headers()["connection"], "Upgrade");
        assert_eq!(req.headers()["upgrade"], "websocket");
        let plain = Request::get("/").header("upgrade", "h2c").body(()).unwrap();
        assert!(!wants_upgrade(&plain), "no Connection: upgrade");
    }
}
