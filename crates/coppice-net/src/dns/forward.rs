//! The forwarder's serving loops: one for UDP, one accepting TCP, a task per query or
//! connection, each holding a slot of the in-flight limits until it ends.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::timeout;

use crate::dns::message::{self, Query, NOTIMP, SERVFAIL};
use crate::dns::{Clients, ForwarderConfig, MAX_ALLOW, MIN_ALLOW};

/// The largest DNS message (its TCP length prefix is 16 bits).
const MAX_MESSAGE: usize = 65535;
/// The most addresses one answer opens: more would only come from a hostile upstream, and
/// each is a set element.
const MAX_ADDRS_PER_ANSWER: usize = 64;
/// How long [`Clients::resolved`] gets before the answer goes back regardless.
const RESOLVED_TIMEOUT: Duration = Duration::from_secs(5);
/// The pause after a failed receive or accept (a full descriptor table, say), so a
/// persistent error does not spin.
const BACKOFF: Duration = Duration::from_millis(50);

/// Which transport a query came in on, and goes upstream on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

/// What every task of one forwarder shares.
#[derive(Debug)]
pub(super) struct Shared<C> {
    config: ForwarderConfig,
    clients: Arc<C>,
    limits: Arc<Limits>,
}

impl<C: Clients> Shared<C> {
    pub(super) fn new(config: ForwarderConfig, clients: Arc<C>) -> Self {
        let limits = Arc::new(Limits::new(
            config.max_in_flight,
            config.max_in_flight_per_client,
        ));
        Self {
            config,
            clients,
            limits,
        }
    }

    /// The reply to one query from `client`, or `None` to send nothing.
    async fn answer(
        &self,
        client: Ipv4Addr,
        query: &[u8],
        transport: Transport,
    ) -> Option<Vec<u8>> {
        let parsed = match message::parse_query(query) {
            Ok(q) => q,
            Err(why) => {
                tracing::debug!(%client, why, "malformed DNS query");
                return message::formerr(query);
            }
        };
        let name = parsed.question.name.as_str();
        if parsed.header.opcode() != 0 {
            tracing::debug!(%client, opcode = parsed.header.opcode(), "DNS opcode not handled");
            return Some(message::error_reply(query, &parsed, NOTIMP));
        }
        let Some(reply) = self.forward(query, &parsed, transport).await else {
            tracing::debug!(%client, name, "no upstream answered");
            return Some(message::error_reply(query, &parsed, SERVFAIL));
        };
        self.allow(client, &parsed, &reply).await;
        Some(reply)
    }

    /// Hands the addresses of an answer to [`Clients::resolved`] if the client's policy
    /// allows the name.
    async fn allow(&self, client: Ipv4Addr, query: &Query, reply: &[u8]) {
        let name = query.question.name.as_str();
        let allowed = self.clients.client(client).is_some_and(|p| p.allows(name));
        if !allowed {
            return;
        }
        let response = match message::parse_response(reply) {
            Ok(r) if r.rcode == 0 => r,
            Ok(_) => return,
            Err(why) => {
                tracing::debug!(%client, name, why, "answer not understood, nothing allowed");
                return;
            }
        };
        let addrs: Vec<(Ipv4Addr, Duration)> = message::addresses(&response, &query.question.name)
            .into_iter()
            .take(MAX_ADDRS_PER_ANSWER)
            .map(|(a, ttl)| {
                (
                    a,
                    Duration::from_secs(ttl.into()).clamp(MIN_ALLOW, MAX_ALLOW),
                )
            })
            .collect();
        if addrs.is_empty() {
            return;
        }
        tracing::debug!(%client, name, ?addrs, "allowing resolved addresses");
        if timeout(
            RESOLVED_TIMEOUT,
            self.clients.resolved(client, name, &addrs),
        )
        .await
        .is_err()
        {
            tracing::debug!(%client, name, "allowing resolved addresses timed out");
        }
    }

    /// The upstreams' answer to `query`: each attempt goes to the next upstream, on the
    /// transport the query came in on.
    async fn forward(&self, query: &[u8], parsed: &Query, transport: Transport) -> Option<Vec<u8>> {
        let ups = &self.config.upstreams;
        for attempt in 0..self.config.attempts {
            let up = ups[attempt % ups.len()];
            let exchange = async {
                match transport {
                    Transport::Udp => udp_exchange(up, query, parsed).await,
                    Transport::Tcp => tcp_exchange(up, query, parsed).await,
                }
            };
            match timeout(self.config.attempt_timeout, exchange).await {
                Ok(Ok(reply)) => return Some(reply),
                Ok(Err(e)) => tracing::debug!(upstream = %up, error = %e, "DNS upstream failed"),
                Err(_) => tracing::debug!(upstream = %up, "DNS upstream timed out"),
            }
        }
        None
    }
}

/// One query to one upstream over UDP, from a fresh socket (a random source port): the
/// first datagram that answers it.
async fn udp_exchange(up: SocketAddr, query: &[u8], parsed: &Query) -> io::Result<Vec<u8>> {
    let any: SocketAddr = if up.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(any).await?;
    socket.connect(up).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let n = socket.recv(&mut buf).await?;
        if message::answers(&buf[..n], parsed) {
            buf.truncate(n);
            buf.shrink_to_fit();
            return Ok(buf);
        }
    }
}

/// One query to one upstream over TCP, on a connection of its own.
async fn tcp_exchange(up: SocketAddr, query: &[u8], parsed: &Query) -> io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(up).await?;
    write_framed(&mut stream, query).await?;
    loop {
        let reply = read_framed(&mut stream).await?;
        if message::answers(&reply, parsed) {
            return Ok(reply);
        }
    }
}

/// Writes one length-prefixed message.
async fn write_framed(stream: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    let len = u16::try_from(msg.len()).map_err(io::Error::other)?;
    let mut out = Vec::with_capacity(2 + msg.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    stream.write_all(&out).await
}

/// Reads one length-prefixed message.
async fn read_framed(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut msg).await?;
    Ok(msg)
}

/// Serves queries on `socket` until aborted (which aborts the queries in flight too).
pub(super) async fn serve_udp<C: Clients>(shared: Arc<Shared<C>>, socket: Arc<UdpSocket>) {
    let mut tasks = JoinSet::new();
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        while tasks.try_join_next().is_some() {}
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "DNS forwarder receive failed");
                tokio::time::sleep(BACKOFF).await;
                continue;
            }
        };
        let SocketAddr::V4(peer) = peer else {
            continue;
        };
        let client = *peer.ip();
        let Some(slot) = shared.admit(client) else {
            continue;
        };
        let query = buf[..n].to_vec();
        let (shared, socket) = (shared.clone(), socket.clone());
        tasks.spawn(async move {
            let _slot = slot;
            if let Some(reply) = shared.answer(client, &query, Transport::Udp).await {
                if let Err(e) = socket.send_to(&reply, peer).await {
                    tracing::debug!(%client, error = %e, "DNS reply not sent");
                }
            }
        });
    }
}

/// Accepts TCP connections on `listener` until aborted (which aborts them too).
pub(super) async fn serve_tcp<C: Clients>(shared: Arc<Shared<C>>, listener: TcpListener) {
    let mut tasks = JoinSet::new();
    loop {
        while tasks.try_join_next().is_some() {}
        let (stream, peer) = match listener.accept().await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "DNS forwarder accept failed");
                tokio::time::sleep(BACKOFF).await;
                continue;
            }
        };
        let SocketAddr::V4(peer) = peer else {
            continue;
        };
        let client = *peer.ip();
        // Dropping the stream closes it.
        let Some(slot) = shared.admit(client) else {
            continue;
        };
        tasks.spawn(serve_connection(shared.clone(), stream, client, slot));
    }
}

/// Answers the queries of one client connection, one after another, until it closes, idles
/// out, or its client is no longer known.
async fn serve_connection<C: Clients>(
    shared: Arc<Shared<C>>,
    mut stream: TcpStream,
    client: Ipv4Addr,
    _slot: Slot,
) {
    let config = &shared.config;
    loop {
        let mut len = [0u8; 2];
        if !matches!(
            timeout(config.tcp_idle, stream.read_exact(&mut len)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
        let body = timeout(config.attempt_timeout, stream.read_exact(&mut query)).await;
        if !matches!(body, Ok(Ok(_))) || shared.clients.client(client).is_none() {
            return;
        }
        let Some(reply) = shared.answer(client, &query, Transport::Tcp).await else {
            return;
        };
        let sent = timeout(config.attempt_timeout, write_framed(&mut stream, &reply)).await;
        if !matches!(sent, Ok(Ok(()))) {
            return;
        }
    }
}

impl<C: Clients> Shared<C> {
    /// A slot for a query or connection of `client`, if it is a known client under its
    /// limits; the reason is logged when not.
    fn admit(&self, client: Ipv4Addr) -> Option<Slot> {
        if self.clients.client(client).is_none() {
            tracing::debug!(%client, "DNS query from an unknown client dropped");
            return None;
        }
        let slot = self.limits.admit(client);
        if slot.is_none() {
            tracing::debug!(%client, "too many DNS queries in flight, one dropped");
        }
        slot
    }
}

/// The in-flight limits: a semaphore overall and a count per client.
#[derive(Debug)]
struct Limits {
    total: Arc<Semaphore>,
    per_client: Mutex<HashMap<Ipv4Addr, usize>>,
    per_client_max: usize,
}

/// One query's or connection's place under the limits, given back on drop.
#[derive(Debug)]
struct Slot {
    limits: Arc<Limits>,
    client: Ipv4Addr,
    _permit: OwnedSemaphorePermit,
}

impl Limits {
    fn new(total: usize, per_client_max: usize) -> Self {
        Self {
            total: Arc::new(Semaphore::new(total)),
            per_client: Mutex::new(HashMap::new()),
            per_client_max,
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<Ipv4Addr, usize>> {
        // Every change is one insert or remove: a panic cannot leave the map inconsistent.
        self.per_client
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn admit(self: &Arc<Self>, client: Ipv4Addr) -> Option<Slot> {
        let permit = self.total.clone().try_acquire_owned().ok()?;
        let mut counts = self.counts();
        let n = counts.entry(client).or_insert(0);
        if *n >= self.per_client_max {
            return None;
        }
        *n += 1;
        Some(Slot {
            limits: self.clone(),
            client,
            _permit: permit,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.limits.counts();
        if let Some(n) = counts.get_mut(&self.client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_cap_each_client_and_the_total() {
        let limits = Arc::new(Limits::new(3, 2));
        let (a, b) = (
            Ipv4Addr::new(198, 51, 100, 1),
            Ipv4Addr::new(198, 51, 100, 2),
        );
        let a1 = limits.admit(a).unwrap();
        let _a2 = limits.admit(a).unwrap();
        assert!(limits.admit(a).is_none(), "a third for one client");
        let b1 = limits.admit(b).unwrap();
        assert!(limits.admit(b).is_none(), "a fourth overall");
        drop(a1);
        let _b2 = limits.admit(b).unwrap();
        drop(b1);
        assert_eq!(limits.counts().get(&b), Some(&1));
        assert_eq!(limits.total.available_permits(), 1);
    }
}
