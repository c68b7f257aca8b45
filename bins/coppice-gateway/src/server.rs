//! Listeners and accept loops: [`bind`] takes the ports first thing at start, [`serve`] runs
//! every listener with the same router (HTTP/1.1 and HTTP/2 via hyper-util's auto builder)
//! until SIGTERM or SIGINT, then open connections get a bounded graceful shutdown. Sandboxes
//! are not touched: they keep running for the next gateway process.
//!
//! Every listener speaks plain HTTP and TLS on the same port: a connection whose first byte
//! starts a TLS handshake record is handed to the acceptor of `tls.rs`, any other is HTTP as
//! it arrives. A connection that sends nothing, or never finishes its handshake, is dropped
//! after a bound and holds only its own task until then.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::config::Config;
use crate::service::Router;
use crate::{Gateway, StartError};

/// How long open connections get to finish after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Back-off after an accept error (e.g. out of file descriptors) instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How long a new connection may wait before its first byte.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a TLS handshake may take once its first byte is in.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The content type of a TLS record that carries a handshake, the first byte a TLS client
/// sends (RFC 8446 §5.1). No HTTP/1 method and not the HTTP/2 preface starts with it.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Binds every listener of `config`. The gateway binds first thing after taking its state
/// directory's lock, before it opens the backends or re-adopts a sandbox, so a restart gets
/// its port back at once however many sandboxes it has.
///
/// `TcpListener::bind` sets SO_REUSEADDR on Unix (tokio 1.54 `net/tcp/listener.rs` binds
/// through mio 1.2 `TcpListener::bind`, which calls `set_reuseaddr(.., true)` before `bind`),
/// so connections the previous process left in TIME_WAIT do not keep a restart off its port.
/// Never SO_REUSEPORT: that would let a second gateway share the port instead of failing.
pub(crate) async fn bind(config: &Config) -> Result<Vec<TcpListener>, StartError> {
    let mut addrs = vec![config.listen];
    addrs.extend(config.extra_listen.iter().copied());
    let mut listeners = Vec::new();
    for addr in addrs {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Listen { addr, source })?;
        let local = l.local_addr().unwrap_or(addr);
        tracing::info!(address = %local, "listening");
        listeners.push(l);
    }
    Ok(listeners)
}

/// Serves `listeners`, plain HTTP and TLS with `tls`, until SIGTERM or SIGINT.
pub(crate) async fn serve(
    gw: Arc<Gateway>,
    listeners: Vec<TcpListener>,
    tls: TlsAcceptor,
) -> Result<(), StartError> {
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| StartError::Setup(format!("install the SIGTERM handler: {e}")))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|e| StartError::Setup(format!("install the SIGINT handler: {e}")))?;
    let graceful = Arc::new(GracefulShutdown::new());
    // Tells connections that have not started HTTP yet (no first byte, or mid-handshake) to
    // go: they have no request to finish.
    let (stop, stopping) = watch::channel(false);
    let router = Router { gw };
    let mut accepting = Vec::new();
    for listener in listeners {
        let graceful = Arc::clone(&graceful);
        let router = router.clone();
        let tls = tls.clone();
        let stopping = stopping.clone();
        accepting.push(tokio::spawn(async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                // Streams are many small writes (Connect frames, NDJSON lines): without
                // TCP_NODELAY each waits for the peer's delayed ACK.
                let _ = stream.set_nodelay(true);
                tokio::spawn(connection(
                    stream,
                    peer,
                    router.clone(),
                    tls.clone(),
                    graceful.watcher(),
                    stopping.clone(),
                ));
            }
        }));
    }
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down; sandboxes keep running"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down; sandboxes keep running"),
    }
    for task in &accepting {
        task.abort();
    }
    for task in accepting {
        let _ = task.await;
    }
    let _ = stop.send(true);
    // The aborted accept loops held the only other references.
    let Ok(graceful) = Arc::try_unwrap(graceful) else {
        return Ok(());
    };
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(SHUTDOWN_GRACE) => {
            tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; exiting anyway");
        }
    }
    Ok(())
}

/// A connection's stream once it is known which protocol it speaks.
enum Opened {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// Serves one accepted connection: TLS if its first byte starts a handshake, else plain
/// HTTP, with the router; `watcher` lets a shutdown end it gracefully.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    tls: TlsAcceptor,
    watcher: Watcher,
    mut stopping: watch::Receiver<bool>,
) {
    let opened = tokio::select! {
        opened = open(stream, peer, &tls) => opened,
        _ = stopping.wait_for(|stop| *stop) => None,
    };
    match opened {
        Some(Opened::Plain(stream)) => serve_http(stream, peer, router, watcher).await,
        Some(Opened::Tls(stream)) => serve_http(stream, peer, router, watcher).await,
        None => {}
    }
}

/// Waits (bounded) for the first byte of `stream` and, for TLS, its handshake; `None` when
/// the client sent nothing in time, closed, or failed the handshake.
async fn open(stream: TcpStream, peer: SocketAddr, tls: &TlsAcceptor) -> Option<Opened> {
    let mut first = [0u8; 1];
    // `peek` leaves the byte for hyper or rustls to read.
    match tokio::time::timeout(FIRST_BYTE_TIMEOUT, stream.peek(&mut first)).await {
        Ok(Ok(0)) => return None,
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "connection failed before its first byte");
            return None;
        }
        Err(_) => {
            tracing::debug!(%peer, "connection sent nothing within {FIRST_BYTE_TIMEOUT:?}");
            return None;
        }
    }
    if first[0] != TLS_HANDSHAKE_RECORD {
        return Some(Opened::Plain(stream));
    }
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
        Ok(Ok(stream)) => Some(Opened::Tls(Box::new(stream))),
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "tls handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "tls handshake not done within {HANDSHAKE_TIMEOUT:?}");
            None
        }
    }
}

/// Serves HTTP/1.1 or HTTP/2 (and upgrades, for WebSockets) on `io` until it closes.
async fn serve_http<I>(io: I, peer: SocketAddr, router: Router, watcher: Watcher)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(io), router)
        .into_owned();
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
