//! Listeners and accept loops: [`bind`] takes the ports first thing at start, [`serve`] runs
//! every listener with the same router (HTTP/1.1 and HTTP/2 via hyper-util's auto builder)
//! until SIGTERM or SIGINT, then open connections get a bounded graceful shutdown. Sandboxes
//! are not touched: they keep running for the next gateway process.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;
use crate::service::Router;
use crate::{Gateway, StartError};

/// How long open connections get to finish after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Back-off after an accept error (e.g. out of file descriptors) instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

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

/// Serves `listeners` until SIGTERM or SIGINT.
pub(crate) async fn serve(gw: Arc<Gateway>, listeners: Vec<TcpListener>) -> Result<(), StartError> {
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| StartError::Setup(format!("install the SIGTERM handler: {e}")))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|e| StartError::Setup(format!("install the SIGINT handler: {e}")))?;
    let graceful = Arc::new(GracefulShutdown::new());
    let router = Router { gw };
    let mut accepting = Vec::new();
    for listener in listeners {
        let graceful = Arc::clone(&graceful);
        let router = router.clone();
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
                let router = router.clone();
                let conn = auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), router)
                    .into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
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
