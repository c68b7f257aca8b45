//! The forwarder against a fake upstream on 127.0.0.1, with clients that are loopback
//! addresses: answers pass unchanged, allowed names reach [`Clients::resolved`], unknown
//! clients and broken queries get nothing or an error, dead upstreams are skipped.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

use crate::dns::message::build::{self, canonical};
use crate::dns::message::{self, Data, Header, FORMERR, NOTIMP, SERVFAIL, TYPE_A};
use crate::dns::{ClientPolicy, Clients, Forwarder, ForwarderConfig, MAX_ALLOW, MIN_ALLOW};

/// How long a reply that should come is waited for.
const LONG: Duration = Duration::from_secs(10);
/// How long one that should not come is waited for.
const SHORT: Duration = Duration::from_millis(500);

const CLIENT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const STRANGER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// One recorded [`Clients::resolved`] call.
type Resolved = (Ipv4Addr, String, Vec<(Ipv4Addr, Duration)>);

/// Clients from a table, recording every `resolved` call.
#[derive(Debug, Default)]
struct FakeClients {
    policies: Mutex<HashMap<Ipv4Addr, ClientPolicy>>,
    resolved: Mutex<Vec<Resolved>>,
}

impl FakeClients {
    fn with(client: Ipv4Addr, domains: &[&str]) -> Arc<Self> {
        let me = Self::default();
        let domains: Vec<String> = domains.iter().map(|d| (*d).to_owned()).collect();
        me.policies
            .lock()
            .unwrap()
            .insert(client, ClientPolicy::new(&domains));
        Arc::new(me)
    }

    fn take(&self) -> Vec<Resolved> {
        std::mem::take(&mut *self.resolved.lock().unwrap())
    }
}

impl Clients for FakeClients {
    fn client(&self, addr: Ipv4Addr) -> Option<ClientPolicy> {
        self.policies.lock().unwrap().get(&addr).cloned()
    }

    async fn resolved(&self, client: Ipv4Addr, name: &str, addrs: &[(Ipv4Addr, Duration)]) {
        self.resolved
            .lock()
            .unwrap()
            .push((client, name.to_owned(), addrs.to_vec()));
    }
}

/// The fake upstream's zone: name to answer records.
fn zone(name: &str) -> Vec<(&'static str, u32, Data)> {
    let a = |s: &str| Data::A(s.parse().unwrap());
    match name {
        "www.fake.test" => vec![
            (
                "www.fake.test",
                300,
                Data::Cname(canonical("edge.cdn.test")),
            ),
            ("edge.cdn.test", 5, a("198.51.100.20")),
        ],
        "fake.test" => vec![("fake.test", 60, a("198.51.100.21"))],
        "long.fake.test" => vec![("long.fake.test", 86400, a("198.51.100.22"))],
        "other.test" => vec![("other.test", 60, a("198.51.100.23"))],
        _ => Vec::new(),
    }
}

/// What the fake upstream answers to `query`: the zone's records, or NXDOMAIN.
fn upstream_reply(query: &[u8]) -> Vec<u8> {
    let q = message::parse_query(query).unwrap();
    let records = zone(q.question.name.as_str());
    let rcode = if records.is_empty() { 3 } else { 0 };
    build::response(query, rcode, &records)
}

/// A fake upstream on 127.0.0.1 serving [`zone`] on UDP and TCP, on one port.
async fn upstream() -> (SocketAddr, Vec<JoinHandle<()>>) {
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = udp.local_addr().unwrap();
    let tcp = TcpListener::bind(addr).await.unwrap();
    let u = tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
            let _ = udp.send_to(&upstream_reply(&buf[..n]), peer).await;
        }
    });
    let t = tokio::spawn(async move {
        while let Ok((mut s, _)) = tcp.accept().await {
            tokio::spawn(async move {
                let mut len = [0u8; 2];
                while s.read_exact(&mut len).await.is_ok() {
                    let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if s.read_exact(&mut q).await.is_err() {
                        return;
                    }
                    let r = upstream_reply(&q);
                    let mut out = u16::try_from(r.len()).unwrap().to_be_bytes().to_vec();
                    out.extend(r);
                    if s.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, vec![u, t])
}

/// A forwarder on 127.0.0.1 with short timeouts.
async fn forwarder(upstreams: Vec<SocketAddr>, clients: Arc<FakeClients>) -> Forwarder {
    let config = ForwarderConfig {
        attempt_timeout: Duration::from_millis(300),
        ..ForwarderConfig::new(SocketAddrV4::new(CLIENT, 0), upstreams)
    };
    Forwarder::start(config, clients).await.unwrap()
}

/// Sends `query` over UDP from `from` and waits `wait` for a reply.
async fn ask_udp(fwd: &Forwarder, from: Ipv4Addr, query: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let s = UdpSocket::bind((from, 0)).await.unwrap();
    s.send_to(query, fwd.local_addr()).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let (n, _) = tokio::time::timeout(wait, s.recv_from(&mut buf))
        .await
        .ok()?
        .unwrap();
    buf.truncate(n);
    Some(buf)
}

/// Sends `queries` over one TCP connection and reads as many replies as come.
async fn ask_tcp(fwd: &Forwarder, from: Ipv4Addr, queries: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    let mut s: TcpStream = socket.connect(fwd.local_addr().into()).await.unwrap();
    let mut replies = Vec::new();
    for q in queries {
        let mut out = u16::try_from(q.len()).unwrap().to_be_bytes().to_vec();
        out.extend_from_slice(q);
        if s.write_all(&out).await.is_err() {
            break;
        }
        let mut len = [0u8; 2];
        match tokio::time::timeout(LONG, s.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => break,
        }
        let mut r = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut r).await.unwrap();
        replies.push(r);
    }
    replies
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

#[test]
fn patterns_match_the_name_or_what_is_below_it() {
    let p = ClientPolicy::new(&["fake.test".into(), "*.example.com".into()]);
    for yes in ["fake.test", "a.example.com", "a.b.example.com"] {
        assert!(p.allows(yes), "{yes}");
    }
    for no in [
        "",
        "www.fake.test",
        "fake.test.evil",
        "example.com",
        "notexample.com",
        ".example.com",
        "a.example.com.evil",
        "a\\046example.com",
    ] {
        assert!(!p.allows(no), "{no}");
    }
    assert!(ClientPolicy::default().is_empty());
    assert!(!ClientPolicy::default().allows("fake.test"));
}

#[test]
fn upstreams_come_from_resolv_conf() {
    let got = super::resolv_conf_upstreams("search x\nnameserver 127.0.0.53\nnameserver ::1\n");
    assert_eq!(got, [SocketAddr::from((ip("127.0.0.53"), 53))]);
    let loops = ForwarderConfig::new(
        SocketAddrV4::new(CLIENT, 53),
        vec![SocketAddr::from((CLIENT, 53))],
    );
    assert!(loops.validate().is_err());
    let none = ForwarderConfig::new(SocketAddrV4::new(CLIENT, 53), vec![]);
    assert!(none.validate().is_err());
}

#[tokio::test]
async fn answers_pass_unchanged_and_allowed_names_open_their_addresses() {
    let (up, _up) = upstream().await;
    let clients = FakeClients::with(CLIENT, &["*.fake.test", "other.test"]);
    let fwd = forwarder(vec![up], clients.clone()).await;

    // A CNAME chain: the address of its end, with the chain's shortest TTL raised to the
    // floor.
    let q = build::query(0x4242, "WWW.fake.test", TYPE_A);
    let reply = ask_udp(&fwd, CLIENT, &q, LONG).await.unwrap();
    assert_eq!(
        reply,
        upstream_reply(&q),
        "the upstream's bytes, id and case kept"
    );
    assert_eq!(
        clients.take(),
        [(
            CLIENT,
            "www.fake.test".to_owned(),
            vec![(ip("198.51.100.20"), MIN_ALLOW)]
        )]
    );

    // A long TTL is capped; an exact pattern matches.
    let q = build::query(2, "long.fake.test", TYPE_A);
    assert_eq!(
        ask_udp(&fwd, CLIENT, &q, LONG).await.unwrap(),
        upstream_reply(&q)
    );
    let q = build::query(3, "other.test", TYPE_A);
    assert_eq!(
        ask_udp(&fwd, CLIENT, &q, LONG).await.unwrap(),
        upstream_reply(&q)
    );
    assert_eq!(
        clients.take(),
        [
            (
                CLIENT,
                "long.fake.test".to_owned(),
                vec![(ip("198.51.100.22"), MAX_ALLOW)]
            ),
            (
                CLIENT,
                "other.test".to_owned(),
                vec![(ip("198.51.100.23"), Duration::from_secs(60))]
            ),
        ]
    );

    // The apex is not under its wildcard, and NXDOMAIN opens nothing; both are answered.
    for (id, name) in [(4, "fake.test"), (5, "missing.fake.test")] {
        let q = build::query(id, name, TYPE_A);
        assert_eq!(
            ask_udp(&fwd, CLIENT, &q, LONG).await.unwrap(),
            upstream_reply(&q)
        );
    }
    assert!(clients.take().is_empty());

    // TCP: several queries on one connection, forwarded over TCP.
    let qs = vec![
        build::query(6, "www.fake.test", TYPE_A),
        build::query(7, "fake.test", TYPE_A),
    ];
    let replies = ask_tcp(&fwd, CLIENT, &qs).await;
    assert_eq!(replies, [upstream_reply(&qs[0]), upstream_reply(&qs[1])]);
    assert_eq!(clients.take().len(), 1);
    fwd.stop().await;
}

#[tokio::test]
async fn strangers_get_nothing_and_broken_queries_get_errors() {
    let (up, _up) = upstream().await;
    let clients = FakeClients::with(CLIENT, &["*.fake.test"]);
    let fwd = forwarder(vec![up], clients.clone()).await;
    let q = build::query(1, "www.fake.test", TYPE_A);

    assert_eq!(ask_udp(&fwd, STRANGER, &q, SHORT).await, None);
    assert!(ask_tcp(&fwd, STRANGER, std::slice::from_ref(&q))
        .await
        .is_empty());
    assert!(clients.take().is_empty());

    // Too short for a header: dropped. A header without a question: FORMERR, same id.
    assert_eq!(ask_udp(&fwd, CLIENT, &q[..5], SHORT).await, None);
    let mut no_question = q[..12].to_vec();
    no_question[5] = 0;
    let reply = ask_udp(&fwd, CLIENT, &no_question, LONG).await.unwrap();
    let h = Header::parse(&reply).unwrap();
    assert!(
        h.is_response() && h.id == 1 && h.rcode() == FORMERR,
        "{reply:?}"
    );
    // A response sent as a query is never answered (two forwarders would bounce it).
    let mut response = upstream_reply(&q);
    response[0] = 9;
    assert_eq!(ask_udp(&fwd, CLIENT, &response, SHORT).await, None);
    // An opcode other than QUERY: NOTIMP, over TCP too.
    let mut status = q.clone();
    status[2] |= 2 << 3;
    let reply = ask_udp(&fwd, CLIENT, &status, LONG).await.unwrap();
    assert_eq!(Header::parse(&reply).unwrap().rcode(), NOTIMP);
    let replies = ask_tcp(&fwd, CLIENT, &[status, q.clone()]).await;
    assert_eq!(Header::parse(&replies[0]).unwrap().rcode(), NOTIMP);
    assert_eq!(replies[1], upstream_reply(&q), "the connection goes on");
    fwd.stop().await;
}

#[tokio::test]
async fn a_dead_upstream_is_skipped_and_none_at_all_is_servfail() {
    let (up, _up) = upstream().await;
    // Bound and never read: queries to it time out.
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let clients = FakeClients::with(CLIENT, &["*.fake.test"]);

    let fwd = forwarder(vec![silent_addr, up], clients.clone()).await;
    let q = build::query(11, "www.fake.test", TYPE_A);
    assert_eq!(
        ask_udp(&fwd, CLIENT, &q, LONG).await.unwrap(),
        upstream_reply(&q)
    );
    assert_eq!(clients.take().len(), 1);
    fwd.stop().await;

    let fwd = forwarder(vec![silent_addr], clients.clone()).await;
    let reply = ask_udp(&fwd, CLIENT, &q, LONG).await.unwrap();
    let r = message::parse_response(&reply).unwrap();
    assert_eq!(Header::parse(&reply).unwrap().id, 11);
    assert_eq!(r.rcode, SERVFAIL);
    assert_eq!(r.question.name.as_str(), "www.fake.test");
    assert!(clients.take().is_empty());
    fwd.stop().await;
}
