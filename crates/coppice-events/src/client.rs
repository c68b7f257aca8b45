//! The HTTP/1.1 client webhook attempts use: keep-alive connections pooled per destination.
//!
//! A destination is the URL's scheme and authority plus the one address the guard approved
//! for this attempt, so a pooled connection is only ever reused for the address it was opened
//! to. An idle connection is kept for [`IDLE`] at most — below the 5 s keep-alive of common
//! receivers (uvicorn, Node), so we rarely send on a connection the receiver is closing — and
//! a request that a pooled connection refused before sending it goes out on a fresh one.
//! The response body is read (up to [`MAX_BODY`]) so the connection can be reused; a larger
//! body closes it instead.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::tls::{self, Tls};

/// How long an idle connection is kept.
pub(crate) const IDLE: Duration = Duration::from_secs(4);
/// Idle connections kept per destination at most.
const MAX_IDLE: usize = 32;
/// Response bodies larger than this are not read; their connection is closed.
const MAX_BODY: usize = 64 * 1024;

/// Where a connection goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Destination {
    /// TLS with this server name (`None`: plain http).
    pub(crate) tls_name: Option<String>,
    /// The URL's authority, for the pool key.
    pub(crate) authority: String,
    /// The address the guard approved.
    pub(crate) addr: SocketAddr,
}

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    #[error("connect to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("tls handshake with {addr}")]
    Tls {
        addr: SocketAddr,
        #[source]
        source: tls::TlsError,
    },
    #[error("http request")]
    Http(#[source] hyper::Error),
}

/// The response to a request: its status and `Retry-After` header.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) retry_after: Option<http::HeaderValue>,
}

type Sender = SendRequest<Full<Bytes>>;

/// Pooled keep-alive connections.
#[derive(Debug)]
pub(crate) struct Client {
    idle: Mutex<HashMap<Destination, Vec<(Sender, Instant)>>>,
    tls: Tls,
    connects: std::sync::atomic::AtomicU64,
}

impl Client {
    /// A client with no connections yet, verifying https servers with `tls`.
    pub(crate) fn new(tls: Tls) -> Self {
        Client {
            idle: Mutex::new(HashMap::new()),
            tls,
            connects: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Connections opened so far.
    pub(crate) fn connects(&self) -> u64 {
        self.connects.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, HashMap<Destination, Vec<(Sender, Instant)>>> {
        // Every critical section is a single map update, so a poisoned lock is consistent.
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes the most recently used idle connection to `dest` that is still open.
    fn take(&self, dest: &Destination) -> Option<Sender> {
        let mut idle = self.idle();
        let conns = idle.get_mut(dest)?;
        while let Some((sender, since)) = conns.pop() {
            if since.elapsed() < IDLE && !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    fn put(&self, dest: Destination, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle();
        let conns = idle.entry(dest).or_default();
        if conns.len() < MAX_IDLE {
            conns.push((sender, Instant::now()));
        }
    }

    /// Closes idle connections past [`IDLE`] and forgets destinations with none left.
    pub(crate) fn sweep(&self) {
        self.idle().retain(|_, conns| {
            conns.retain(|(sender, since)| since.elapsed() < IDLE && !sender.is_closed());
            !conns.is_empty()
        });
    }

    /// Sends `req` to `dest` on a pooled connection or a new one, reads the response, and
    /// pools the connection again if it can carry another request.
    pub(crate) async fn send(
        &self,
        dest: &Destination,
        mut req: http::Request<Full<Bytes>>,
    ) -> Result<Answer, SendError> {
        while let Some(mut sender) = self.take(dest) {
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(self.finish(dest, sender, resp).await),
                Err(mut e) => match e.take_message() {
                    // Refused before a byte was written (the receiver closed it): the next
                    // connection gets the same request.
                    Some(back) => req = back,
                    None => return Err(SendError::Http(e.into_error())),
                },
            }
        }
        let mut sender = self.connect(dest).await?;
        let resp = sender.send_request(req).await.map_err(SendError::Http)?;
        Ok(self.finish(dest, sender, resp).await)
    }

    async fn finish(
        &self,
        dest: &Destination,
        sender: Sender,
        resp: http::Response<hyper::body::Incoming>,
    ) -> Answer {
        let answer = Answer {
            status: resp.status().as_u16(),
            retry_after: resp.headers().get(http::header::RETRY_AFTER).cloned(),
        };
        // Only a connection whose response was read to the end can carry the next request.
        if Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .is_ok()
        {
            self.put(dest.clone(), sender);
        }
        answer
    }

    async fn connect(&self, dest: &Destination) -> Result<Sender, SendError> {
        let addr = dest.addr;
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| SendError::Connect { addr, source })?;
        // Requests are small and written whole; do not wait for an ACK to send them.
        let _ = stream.set_nodelay(true);
        self.connects
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match &dest.tls_name {
            None => handshake(stream).await,
            Some(name) => {
                let stream = self
                    .tls
                    .connect(name, stream)
                    .await
                    .map_err(|source| SendError::Tls { addr, source })?;
                handshake(stream).await
            }
        }
    }
}

async fn handshake<S>(stream: S) -> Result<Sender, SendError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(SendError::Http)?;
    tokio::spawn(async move {
        // A connection error surfaces on the request it was carrying.
        let _ = conn.await;
    });
    Ok(sender)
}
