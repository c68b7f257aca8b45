//! A small DNS forwarder for sandboxes, through which `allowOut`'s domain entries open
//! egress.
//!
//! [`Forwarder::start`] listens on UDP and TCP at one address (the bridge's, port 53, where
//! sandboxes' `/etc/resolv.conf` points), answers only clients a [`Clients`] knows (the
//! network driver: each attached sandbox's address), and forwards every query unchanged to
//! upstream resolvers (the host's, [`ForwarderConfig::host_resolvers`]), one at a time
//! with a timeout and a retry on the next. The upstream's answer goes back unchanged, id
//! included. When the query's name matches one of the client's domain patterns
//! ([`ClientPolicy`]), the answer's A records (through CNAME chains inside it) go to
//! [`Clients::resolved`] first, so the sandbox's first connection finds its destination
//! open. Queries in flight are capped per client and overall, and beyond the caps they are
//! dropped; nothing waits without a timeout. Plain tokio sockets: this part is OS-neutral.

mod forward;
pub(crate) mod message;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use coppice_lifecycle::backend::{BackendError, EgressPolicy};
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinHandle;

use crate::dns::forward::Shared;

/// The shortest time a resolved address stays allowed, whatever the answer's TTL: a
/// sandbox's resolver may cache an answer a little past its TTL, and zero-TTL answers must
/// still be usable for one connection.
pub const MIN_ALLOW: Duration = Duration::from_secs(30);
/// The longest time a resolved address stays allowed after its answer, however long the
/// TTL, so a policy's domain entries keep following the names' addresses.
pub const MAX_ALLOW: Duration = Duration::from_secs(3600);

/// What the forwarder needs to know about its clients; the network driver implements it.
pub trait Clients: Send + Sync + 'static {
    /// The policy of the sandbox with address `addr`, or `None` if no sandbox has it: its
    /// queries are dropped unanswered.
    fn client(&self, addr: Ipv4Addr) -> Option<ClientPolicy>;

    /// `client` resolved `name`, which its [`ClientPolicy`] allowed, to `addrs`, each with
    /// how long to allow it (the answer's TTL clamped to [`MIN_ALLOW`]..=[`MAX_ALLOW`]).
    /// The answer goes back to the client when the future completes, so it should complete
    /// once connections to them pass. The implementor checks the name against the
    /// client's policy again: the policy can change while a query is upstream.
    fn resolved(
        &self,
        client: Ipv4Addr,
        name: &str,
        addrs: &[(Ipv4Addr, Duration)],
    ) -> impl Future<Output = ()> + Send;
}

/// A client's domain patterns (`allowOut`'s domain entries): `example.com` matches that
/// name only, and `*.example.com` matches every name below it but not `example.com` itself,
/// as E2B's own egress matching does. Patterns and names compare in the canonical form of
/// [`EgressPolicy::domain`] (lowercase, no trailing dot). Cheap to clone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientPolicy {
    domains: Arc<[String]>,
}

impl ClientPolicy {
    /// The policy for these patterns.
    pub fn new(domains: &[String]) -> Self {
        Self {
            domains: domains.into(),
        }
    }

    /// Whether queries for `name` may open the addresses they resolve to.
    pub fn allows(&self, name: &str) -> bool {
        self.domains.iter().any(|p| domain_matches(p, name))
    }

    /// Whether it has no patterns (no answer opens anything).
    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }
}

impl From<&EgressPolicy> for ClientPolicy {
    fn from(policy: &EgressPolicy) -> Self {
        Self::new(&policy.allow_domains)
    }
}

/// Whether `name` matches `pattern` (see [`ClientPolicy`]).
fn domain_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(parent) => name
            .strip_suffix(parent)
            .and_then(|head| head.strip_suffix('.'))
            .is_some_and(|head| !head.is_empty()),
        None => !name.is_empty() && name == pattern,
    }
}

/// How a [`Forwarder`] runs; [`ForwarderConfig::new`] gives the defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwarderConfig {
    /// Where it listens, on UDP and TCP: the bridge's address and port 53 in production.
    /// Port 0 picks a free port, the same for both.
    pub listen: SocketAddrV4,
    /// The resolvers queries go to, in order.
    pub upstreams: Vec<SocketAddr>,
    /// How long one upstream gets for one query (default 2 s).
    pub attempt_timeout: Duration,
    /// How many upstreams one query tries, going round the list (default 2: one retry).
    pub attempts: usize,
    /// The most queries in flight, and client TCP connections open, at once (default 512).
    pub max_in_flight: usize,
    /// The same for one client (default 32).
    pub max_in_flight_per_client: usize,
    /// How long a client's TCP connection may wait between queries (default 10 s).
    pub tcp_idle: Duration,
}

impl ForwarderConfig {
    /// The defaults, listening on `listen` and forwarding to `upstreams`.
    pub fn new(listen: SocketAddrV4, upstreams: Vec<SocketAddr>) -> Self {
        Self {
            listen,
            upstreams,
            attempt_timeout: Duration::from_secs(2),
            attempts: 2,
            max_in_flight: 512,
            max_in_flight_per_client: 32,
            tcp_idle: Duration::from_secs(10),
        }
    }

    /// The host's resolvers: the IPv4 `nameserver`s of `/etc/resolv.conf`, port 53.
    pub fn host_resolvers() -> Result<Vec<SocketAddr>, BackendError> {
        let path = "/etc/resolv.conf";
        let text = std::fs::read_to_string(path).map_err(|e| BackendError::io("read", path, e))?;
        let found = resolv_conf_upstreams(&text);
        if found.is_empty() {
            return Err(BackendError::InvalidSpec {
                field: "DNS upstream",
                reason: format!("{path} names no IPv4 nameserver"),
            });
        }
        Ok(found)
    }

    fn validate(&self) -> Result<(), BackendError> {
        let bad = |reason: String| {
            Err(BackendError::InvalidSpec {
                field: "DNS forwarder",
                reason,
            })
        };
        if self.upstreams.is_empty() {
            return bad("no upstream resolver".into());
        }
        if self.upstreams.contains(&SocketAddr::V4(self.listen)) {
            return bad(format!("{} would forward to itself", self.listen));
        }
        if self.attempts == 0 || self.max_in_flight == 0 || self.max_in_flight_per_client == 0 {
            return bad("attempts and in-flight limits must be at least 1".into());
        }
        Ok(())
    }
}

/// The IPv4 nameservers of a resolv.conf, port 53.
fn resolv_conf_upstreams(text: &str) -> Vec<SocketAddr> {
    crate::pool::resolvers(text)
        .into_iter()
        .map(|ip| SocketAddr::from((ip, 53)))
        .collect()
}

/// A running forwarder; dropping it (or [`Forwarder::stop`]) stops it.
#[derive(Debug)]
pub struct Forwarder {
    local: SocketAddrV4,
    tasks: Vec<JoinHandle<()>>,
}

impl Forwarder {
    /// Binds UDP and TCP at `config.listen` and serves `clients` from tasks on the current
    /// tokio runtime. Call it after the network driver has started (the bridge's address
    /// must exist to be bound).
    pub async fn start<C: Clients>(
        config: ForwarderConfig,
        clients: Arc<C>,
    ) -> Result<Self, BackendError> {
        config.validate()?;
        let (udp, tcp) = bind(config.listen).await?;
        let local = match udp.local_addr() {
            Ok(SocketAddr::V4(a)) => a,
            Ok(SocketAddr::V6(_)) => config.listen,
            Err(e) => return Err(BackendError::io("read the address of", "DNS forwarder", e)),
        };
        tracing::info!(%local, upstreams = ?config.upstreams, "DNS forwarder started");
        let shared = Arc::new(Shared::new(config, clients));
        let tasks = vec![
            tokio::spawn(forward::serve_udp(shared.clone(), Arc::new(udp))),
            tokio::spawn(forward::serve_tcp(shared, tcp)),
        ];
        Ok(Self { local, tasks })
    }

    /// The address it listens on (UDP and TCP).
    pub fn local_addr(&self) -> SocketAddrV4 {
        self.local
    }

    /// Stops serving and waits until its sockets are closed; queries in flight are dropped.
    pub async fn stop(mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Binds the UDP socket and the TCP listener on the same port.
async fn bind(listen: SocketAddrV4) -> Result<(UdpSocket, TcpListener), BackendError> {
    let err = |op, e| BackendError::io(op, listen.to_string(), e);
    // With port 0 the UDP port is free for UDP only; another try finds one free for both.
    let tries = if listen.port() == 0 { 8 } else { 1 };
    let mut last = None;
    for _ in 0..tries {
        let udp = UdpSocket::bind(listen)
            .await
            .map_err(|e| err("bind the DNS forwarder's UDP socket to", e))?;
        let port = udp
            .local_addr()
            .map_err(|e| err("read the address of the DNS forwarder's UDP socket", e))?
            .port();
        match TcpListener::bind(SocketAddrV4::new(*listen.ip(), port)).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = Some(e),
        }
    }
    Err(err(
        "bind the DNS forwarder's TCP listener to",
        last.unwrap_or_else(|| std::io::ErrorKind::AddrInUse.into()),
    ))
}
