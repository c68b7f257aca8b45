//! Root tests of the Linux driver against the real kernel: namespaces, veths, a bridge and
//! nftables tables made for each test and removed after it, even when it fails.
//!
//! Every address is from 198.51.100.0/24 (TEST-NET-2). Test slot `n` (0 to 7) owns the
//! sandbox pool 198.51.100.(128+16n)/28 and a "fake internet" namespace on
//! 198.51.100.(16n)/28, reached through the connected route of a veth the test makes: the
//! host side is `.16n+1`, the fake internet's servers are `.16n+2` and `.16n+3`. Names
//! carry the slot (`cpt<n>br`, `coppice_t<n>`, `cpt<n>v*`, NFLOG group 0x7430 + n), so
//! slots run in parallel and never touch the host's own configuration. Every driver is restricted to egress into
//! 198.51.100.0/24 at most. A slot is held through an exclusive `flock` on a file under
//! `/run/lock`, so tests that share a slot, in this process or in any other (a second
//! worktree, the gateway's network tests), wait for each other instead of colliding.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use coppice_lifecycle::backend::{
    BackendError, BlockReason, BlockedEgress, EgressPolicy, IpProtocol, Ipv4Cidr, NetAttachment,
    NetSpec, Network, SandboxId,
};

use crate::dns::message::{self, build, Data, TYPE_A};
use crate::dns::{Forwarder, ForwarderConfig};
use crate::linux::command::{self, HELPER};
use crate::linux::netlink::Netlink;
use crate::linux::netns;
use crate::linux::nflog::Reader;
use crate::linux::{LinuxNet, LinuxNetConfig};
use crate::nft::{LOG_BURST, LOG_RATE};

/// The fake internet's echo port.
const PORT: u16 = 8080;
/// How long a connection attempt that should fail is given.
const SHORT: Duration = Duration::from_millis(800);
/// How long one that should succeed is given.
const LONG: Duration = Duration::from_secs(10);

fn ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, n)
}

fn cidr(s: &str) -> Ipv4Cidr {
    s.parse().unwrap()
}

fn id(s: &str) -> SandboxId {
    SandboxId::new(s).unwrap()
}

/// Whether this host can run the root tests; prints `SKIP` with the reason if not.
#[allow(clippy::print_stdout)] // The skip is reported on the test's output.
fn capable(test: &str) -> bool {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP {test}: not root");
        return false;
    }
    let caps = <LinuxNet as Network>::probe().unwrap();
    let missing: Vec<String> = caps
        .missing()
        .map(|c| format!("{} ({})", c.name, c.detail))
        .collect();
    if missing.is_empty() {
        true
    } else {
        println!("SKIP {test}: {}", missing.join(", "));
        false
    }
}

/// One test slot's names and ranges.
#[derive(Debug, Clone, Copy)]
struct Slot(u8);

impl Slot {
    fn pool(self) -> Ipv4Cidr {
        Ipv4Cidr::new(ip(128 + 16 * self.0), 28).unwrap()
    }
    fn fake_net(self) -> Ipv4Cidr {
        Ipv4Cidr::new(ip(16 * self.0), 28).unwrap()
    }
    fn fake_host(self) -> Ipv4Addr {
        ip(16 * self.0 + 1)
    }
    fn server(self) -> Ipv4Addr {
        ip(16 * self.0 + 2)
    }
    fn server2(self) -> Ipv4Addr {
        ip(16 * self.0 + 3)
    }
    fn log_group(self) -> u16 {
        0x7430 + u16::from(self.0)
    }
    fn config(self, run_dir: &Path) -> LinuxNetConfig {
        let n = self.0;
        LinuxNetConfig {
            bridge: format!("cpt{n}br"),
            table: format!("coppice_t{n}"),
            link_prefix: format!("cpt{n}v"),
            egress_only_to: Some(vec![cidr("198.51.100.0/24")]),
            global_forwarding: false,
            // A group per slot, so parallel slots never read each other's reports.
            log_group: self.log_group(),
            ..LinuxNetConfig::new(run_dir.join("net"), self.pool())
        }
    }
}

/// Waits for and takes slot `slot` host-wide: an exclusive `flock` on its lock file, held
/// while the returned file is open (the kernel releases it if the process dies).
fn hold_slot(slot: Slot) -> File {
    let dir = Path::new("/run/lock");
    let dir = if dir.is_dir() { dir } else { Path::new("/tmp") };
    let path = dir.join(format!("coppice-net-test-slot-{}", slot.0));
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap();
    // SAFETY: flock on a descriptor we own; it blocks until the slot is free.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(
        r,
        0,
        "flock {}: {}",
        path.display(),
        io::Error::last_os_error()
    );
    file
}

/// A test's world: a run directory, the fake internet, and whatever a driver with the
/// slot's config made, all removed on drop.
struct World {
    slot: Slot,
    config: LinuxNetConfig,
    fake: Option<Fake>,
    _dir: tempfile::TempDir,
    /// Dropped after `World::drop` has cleaned up, which releases the slot.
    _held: File,
}

impl World {
    fn new(slot: Slot) -> Self {
        let held = hold_slot(slot);
        let dir = tempfile::tempdir().unwrap();
        let config = slot.config(dir.path());
        // Whatever a crashed earlier run of this slot left.
        let _ = LinuxNet::purge(&config);
        let mut world = Self {
            slot,
            config,
            fake: None,
            _dir: dir,
            _held: held,
        };
        world.fake = Some(Fake::new(slot).unwrap());
        world
    }

    fn start(&self) -> LinuxNet {
        LinuxNet::start(self.config.clone()).unwrap()
    }

    fn fake(&self) -> &Fake {
        self.fake.as_ref().unwrap()
    }

    fn server(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.slot.server(), PORT)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let purged = LinuxNet::purge(&self.config);
        drop(self.fake.take());
        if !std::thread::panicking() {
            purged.unwrap();
        }
    }
}

/// A network namespace with two echo servers, joined to the host by a veth pair.
struct Fake {
    link: String,
    stop: Arc<AtomicBool>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    threads: Vec<JoinHandle<()>>,
    ns: File,
}

impl Fake {
    fn new(slot: Slot) -> io::Result<Self> {
        let link = format!("cpt{}fi", slot.0);
        let mut host = Netlink::open()?;
        let _ = host.del_link(&link);
        let (ns, mut inside) = std::thread::scope(|s| {
            s.spawn(|| -> io::Result<(File, Netlink)> {
                // SAFETY: only this thread, which ends right after.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                let mut nl = Netlink::open()?;
                nl.set_up(1)?;
                Ok((File::open("/proc/thread-self/ns/net")?, nl))
            })
            .join()
            .unwrap()
        })?;
        host.new_veth(&link, None, "eth0", ns.as_raw_fd())?;
        let made = (|| -> io::Result<()> {
            let index = host.link_index(&link)?.unwrap();
            host.add_addr(index, Ipv4Cidr::new(slot.fake_host(), 28).unwrap())?;
            host.set_up(index)?;
            // Replies to NATed connections arrive here and are forwarded to the bridge.
            std::fs::write(format!("/proc/sys/net/ipv4/conf/{link}/forwarding"), "1")?;
            let eth0 = inside.link_index("eth0")?.unwrap();
            inside.add_addr(eth0, Ipv4Cidr::new(slot.server(), 28).unwrap())?;
            inside.add_addr(eth0, Ipv4Cidr::new(slot.server2(), 28).unwrap())?;
            inside.set_up(eth0)?;
            // The fake internet routes everything back through the host, so it can try to
            // open connections to sandboxes (in its own namespace: the host's routes are
            // untouched).
            inside.add_default_route(slot.fake_host(), eth0)
        })();
        if let Err(e) = made {
            let _ = host.del_link(&link);
            return Err(e);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let listener = netns::within(ns.as_fd(), || {
            TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT))
        })?;
        let threads = vec![serve(listener, stop.clone(), Some(peers.clone()))];
        Ok(Self {
            link,
            stop,
            peers,
            threads,
            ns,
        })
    }

    /// The source addresses of the connections it accepted.
    fn peers(&self) -> Vec<Ipv4Addr> {
        self.peers
            .lock()
            .unwrap()
            .iter()
            .filter_map(|p| match p {
                SocketAddr::V4(v4) => Some(*v4.ip()),
                SocketAddr::V6(_) => None,
            })
            .collect()
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Ok(mut nl) = Netlink::open() {
            let _ = nl.del_link(&self.link);
        }
    }
}

/// Accepts on `listener` and echoes every connection until `stop`.
#[allow(clippy::disallowed_methods)] // Plain test threads, not tokio workers.
fn serve(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    peers: Option<Arc<Mutex<Vec<SocketAddr>>>>,
) -> JoinHandle<()> {
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let mut conns = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((mut s, peer)) => {
                    if let Some(p) = &peers {
                        p.lock().unwrap().push(peer);
                    }
                    let stop = stop.clone();
                    conns.push(std::thread::spawn(move || {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
                        let mut buf = [0u8; 1024];
                        while !stop.load(Ordering::SeqCst) {
                            match s.read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => {
                                    if s.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                                Err(e)
                                    if e.kind() == io::ErrorKind::WouldBlock
                                        || e.kind() == io::ErrorKind::TimedOut => {}
                                Err(_) => break,
                            }
                        }
                    }));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        for c in conns {
            let _ = c.join();
        }
    })
}

/// Connects from inside the sandbox's namespace.
fn connect(a: &NetAttachment, to: SocketAddrV4, timeout: Duration) -> io::Result<TcpStream> {
    let ns = File::open(a.namespace.as_ref().unwrap())?;
    netns::within(ns.as_fd(), || {
        TcpStream::connect_timeout(&SocketAddr::V4(to), timeout)
    })
}

/// Sends `msg` and reads it back.
fn echo(s: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    if s.read_timeout()?.is_none() {
        s.set_read_timeout(Some(LONG))?;
    }
    s.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back)?;
    if back == msg {
        Ok(())
    } else {
        Err(io::Error::other("echo mismatch"))
    }
}

/// Whether the sandbox gets an echo from `to`, given time enough for a loaded machine.
fn reaches(a: &NetAttachment, to: SocketAddrV4) -> bool {
    connect(a, to, LONG)
        .and_then(|mut s| {
            s.set_read_timeout(Some(LONG))?;
            echo(&mut s, b"ping")
        })
        .is_ok()
}

/// Whether the sandbox gets no echo from `to` within [`SHORT`] (a dropped SYN).
fn blocked(a: &NetAttachment, to: SocketAddrV4) -> bool {
    connect(a, to, SHORT)
        .and_then(|mut s| {
            s.set_read_timeout(Some(SHORT))?;
            echo(&mut s, b"ping")
        })
        .is_err()
}

/// Packets counted by a named counter of the driver's tables.
fn counter(config: &LinuxNetConfig, family: &str, name: &str) -> u64 {
    let mut cmd = Command::new("nft");
    cmd.args(["-j", "list", "counter", family, &config.table, name]);
    let out = command::run(cmd, b"", HELPER).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|o| o["counter"]["packets"].as_u64())
        .unwrap()
}

/// The elements of one of the driver's sets, as nft prints them.
fn set_elements(config: &LinuxNetConfig, set: &str) -> String {
    let mut cmd = Command::new("nft");
    cmd.args(["-j", "list", "set", "inet", &config.table, set]);
    let out = command::run(cmd, b"", HELPER).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|o| o["set"].get("elem").map(ToString::to_string))
        .unwrap_or_default()
}

/// How many of the host's conntrack entries have `addr` at either end, and how many of
/// those go from it to `dst`.
fn flows(addr: &str, dst: &str) -> (usize, usize) {
    let (addr, dst): (Ipv4Addr, Ipv4Addr) = (addr.parse().unwrap(), dst.parse().unwrap());
    let all = Netlink::open_netfilter().unwrap().flows().unwrap();
    let mine: Vec<_> = all.into_iter().filter(|f| f.involves(addr)).collect();
    let to = mine.iter().filter(|f| f.orig == (addr, dst)).count();
    (mine.len(), to)
}

/// Names of the host's links.
fn links() -> Vec<String> {
    Netlink::open()
        .unwrap()
        .links()
        .unwrap()
        .into_iter()
        .map(|l| l.name)
        .collect()
}

fn policy(allow_internet: bool, allow: &[Ipv4Cidr], deny: &[Ipv4Cidr]) -> NetSpec {
    NetSpec {
        policy: EgressPolicy {
            allow_internet,
            allow_out: allow.to_vec(),
            deny_out: deny.to_vec(),
            allow_domains: vec![],
        },
    }
}

#[test]
fn resolved_elements_are_told_apart_by_sandbox_and_time_left() {
    use crate::linux::netlink::ListedElement;
    let (mine, theirs) = (ip(130), ip(131));
    let el = |sandbox: Ipv4Addr, ms| ListedElement {
        key: [sandbox.octets(), ip(7).octets()].concat(),
        expires: Some(Duration::from_millis(ms)),
    };
    let left = Duration::from_millis(90_000);
    assert_eq!(
        super::resolved_key(&el(mine, 90_000), mine),
        Some((ip(7), left))
    );
    assert_eq!(super::resolved_key(&el(theirs, 90_000), mine), None);
    assert_eq!(
        super::resolved_key(&el(mine, 999), mine),
        None,
        "about to go"
    );
    let forever = ListedElement {
        expires: None,
        ..el(mine, 0)
    };
    assert_eq!(super::resolved_key(&forever, mine), None, "not one of ours");
}

#[test]
fn probe_finds_everything_here() {
    if !capable("probe_finds_everything_here") {
        return;
    }
    let caps = <LinuxNet as Network>::probe().unwrap();
    for f in [
        "network-namespace",
        "bridge",
        "veth",
        "nftables",
        "conntrack",
        "nflog",
    ] {
        assert!(caps.has(f), "{f}: {caps:?}");
    }
    // The probe's scratch namespace took its links with it.
    assert!(!links().iter().any(|l| l.starts_with("probe")));
}

#[tokio::test]
async fn egress_goes_through_nat_under_e2b_policy() {
    if !capable("egress_goes_through_nat_under_e2b_policy") {
        return;
    }
    let w = World::new(Slot(0));
    let net = w.start();
    let fake = w.slot.fake_net();
    let server = cidr(&w.slot.server().to_string());
    let open = net.attach(&id("open"), &NetSpec::default()).await.unwrap();
    let closed = net
        .attach(&id("closed"), &policy(false, &[], &[]))
        .await
        .unwrap();
    let allowed = net
        .attach(&id("allowed"), &policy(false, &[fake], &[]))
        .await
        .unwrap();
    let both = net
        .attach(&id("both"), &policy(true, &[server], &[fake]))
        .await
        .unwrap();
    let denied = net
        .attach(&id("denied"), &policy(true, &[], &[fake]))
        .await
        .unwrap();
    assert_eq!(net.list().await.unwrap().len(), 5);
    assert_eq!(open.address.addr(), ip(130));
    assert_eq!(open.gateway, ip(129));
    assert_eq!(open.dns, ip(129));

    assert!(reaches(&open, w.server()), "default policy");
    // The server saw the host's address on its link, not the sandbox's: NAT.
    assert_eq!(w.fake().peers(), [w.slot.fake_host()]);
    let policy_drops = counter(&w.config, "inet", "drop_policy");
    assert!(blocked(&closed, w.server()), "allow_internet=false");
    assert!(counter(&w.config, "inet", "drop_policy") > policy_drops);
    assert!(reaches(&allowed, w.server()), "allowOut over no internet");
    assert!(reaches(&both, w.server()), "allowOut over denyOut");
    let other = SocketAddrV4::new(w.slot.server2(), PORT);
    assert!(blocked(&both, other), "denyOut outside allowOut");
    assert!(blocked(&denied, w.server()), "denyOut");
    assert!(reaches(&open, other), "a second fake destination");
    assert_eq!(w.fake().peers().len(), 4, "{:?}", w.fake().peers());
}

#[tokio::test]
async fn a_policy_update_cuts_an_open_connection() {
    if !capable("a_policy_update_cuts_an_open_connection") {
        return;
    }
    let w = World::new(Slot(1));
    let net = w.start();
    let sbx = id("sbx");
    let a = net.attach(&sbx, &NetSpec::default()).await.unwrap();
    let addr = a.address.addr().to_string();
    let server = w.slot.server().to_string();
    let mut conn = connect(&a, w.server(), SHORT).unwrap();
    echo(&mut conn, b"before").unwrap();
    assert_eq!(flows(&addr, &server).1, 1);

    let closed = net
        .update_policy(&sbx, &policy(false, &[], &[]).policy)
        .await
        .unwrap();
    assert!(!closed.policy.allow_internet);
    conn.set_read_timeout(Some(SHORT)).unwrap();
    assert!(
        echo(&mut conn, b"after").is_err(),
        "the open connection still works"
    );
    assert!(flows(&addr, &server).1 == 0, "its conntrack entry is left");
    assert!(blocked(&a, w.server()));

    // allowOut for the server alone opens it again, and a default policy opens everything.
    let only = cidr(&server);
    net.update_policy(&sbx, &policy(false, &[only], &[]).policy)
        .await
        .unwrap();
    assert!(reaches(&a, w.server()));
    assert!(blocked(&a, SocketAddrV4::new(w.slot.server2(), PORT)));
    net.update_policy(&sbx, &EgressPolicy::default())
        .await
        .unwrap();
    assert!(reaches(&a, SocketAddrV4::new(w.slot.server2(), PORT)));
    assert!(set_elements(&w.config, "allow_out").is_empty());
    assert!(set_elements(&w.config, "no_internet").is_empty());
    let unknown = net
        .update_policy(&id("nobody"), &EgressPolicy::default())
        .await;
    assert!(
        matches!(unknown, Err(BackendError::NotFound { .. })),
        "{unknown:?}"
    );
}

#[tokio::test]
async fn a_sandbox_is_fenced_off_from_host_neighbours_and_metadata() {
    if !capable("a_sandbox_is_fenced_off_from_host_neighbours_and_metadata") {
        return;
    }
    let w = World::new(Slot(2));
    let config = LinuxNetConfig {
        // The operator's allow-list: only the first fake server, and the pool itself so
        // that neighbours are kept apart by their own rules.
        egress_only_to: Some(vec![
            cidr(&format!("{}/32", w.slot.server())),
            w.slot.pool(),
        ]),
        ..w.config.clone()
    };
    let net = LinuxNet::start(config).unwrap();
    let a = net.attach(&id("a"), &NetSpec::default()).await.unwrap();
    let b = net.attach(&id("b"), &NetSpec::default()).await.unwrap();

    // The host's own addresses: a listener on the gateway address and one on the host's
    // side of the fake internet's link, both reachable from the host itself.
    let stop = Arc::new(AtomicBool::new(false));
    let on_gateway = TcpListener::bind((a.gateway, 8081)).unwrap();
    let on_link = TcpListener::bind((w.slot.fake_host(), 8082)).unwrap();
    let dns = TcpListener::bind((a.gateway, 53)).unwrap();
    let mut servers = vec![
        serve(on_gateway, stop.clone(), None),
        serve(on_link, stop.clone(), None),
        serve(dns, stop.clone(), None),
    ];
    let gw = SocketAddrV4::new(a.gateway, 8081);
    let link = SocketAddrV4::new(w.slot.fake_host(), 8082);
    let mut from_host = TcpStream::connect_timeout(&SocketAddr::V4(gw), SHORT).unwrap();
    echo(&mut from_host, b"host").unwrap();
    let host_drops = counter(&w.config, "inet", "drop_host");
    assert!(blocked(&a, gw), "the gateway address");
    assert!(blocked(&a, link), "another host address");
    assert!(counter(&w.config, "inet", "drop_host") >= host_drops + 2);
    assert!(
        reaches(&a, SocketAddrV4::new(a.gateway, 53)),
        "the DNS port on the gateway"
    );

    // Another sandbox, listening: reachable from itself, not from its neighbour.
    let b_ns = File::open(b.namespace.as_ref().unwrap()).unwrap();
    let b_addr = SocketAddrV4::new(b.address.addr(), 8083);
    let listener = netns::within(b_ns.as_fd(), || TcpListener::bind(b_addr)).unwrap();
    servers.push(serve(listener, stop.clone(), None));
    assert!(reaches(&b, b_addr), "b from itself");
    // The host reaches into a sandbox (the gateway's way to its ports)...
    let mut from_host = TcpStream::connect_timeout(&SocketAddr::V4(b_addr), LONG).unwrap();
    from_host.set_read_timeout(Some(LONG)).unwrap();
    echo(&mut from_host, b"ingress").unwrap();
    // ...but the internet does not, even with a route to it.
    let inbound = counter(&w.config, "inet", "drop_inbound");
    let from_outside = netns::within(w.fake().ns.as_fd(), || {
        TcpStream::connect_timeout(&SocketAddr::V4(b_addr), SHORT)
    });
    assert!(from_outside.is_err(), "{from_outside:?}");
    assert!(counter(&w.config, "inet", "drop_inbound") > inbound);
    let bridged = counter(&w.config, "bridge", "drop_bridged");
    let routed = counter(&w.config, "inet", "drop_sandbox");
    assert!(blocked(&a, b_addr), "a neighbour");
    // Bridged frames meet the bridge table; where br_netfilter also hands them to the IP
    // hooks, the inet table's neighbour rule sees them first.
    assert!(
        counter(&w.config, "bridge", "drop_bridged") > bridged
            || counter(&w.config, "inet", "drop_sandbox") > routed
    );
    assert!(
        blocked(&a, SocketAddrV4::new(b.gateway, 8083)),
        "via the gateway"
    );

    // Cloud metadata: dropped on the host, never routed anywhere.
    let metadata = counter(&w.config, "inet", "drop_metadata");
    let operator = counter(&w.config, "inet", "drop_operator");
    let r = connect(
        &a,
        SocketAddrV4::new(Ipv4Addr::new(169, 254, 169, 254), 80),
        SHORT,
    );
    assert!(r.is_err(), "{r:?}");
    assert!(counter(&w.config, "inet", "drop_metadata") > metadata);
    // Dropped by the metadata rule itself, not by the operator's allow-list after it.
    assert_eq!(counter(&w.config, "inet", "drop_operator"), operator);

    // The operator's allow-list beats a sandbox's default policy.
    assert!(reaches(&a, w.server()));
    let operator = counter(&w.config, "inet", "drop_operator");
    assert!(blocked(&a, SocketAddrV4::new(w.slot.server2(), PORT)));
    assert!(counter(&w.config, "inet", "drop_operator") > operator);

    // Root in a user namespace of its own, as sandbox root is, changes nothing.
    let ns = a.namespace.as_ref().unwrap().display().to_string();
    for change in [
        "ip route del default",
        "ip addr add 198.51.100.200/32 dev eth0",
        "ip link set eth0 down",
        "nft add table inet mine",
    ] {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={ns}")).args([
            "unshare",
            "--user",
            "--map-root-user",
            "sh",
            "-c",
            change,
        ]);
        let out = command::output(cmd, b"", HELPER).unwrap();
        assert!(!out.status.success(), "{change}: {out:?}");
        assert!(
            out.stderr.contains("Operation not permitted"),
            "{change}: {}",
            out.stderr
        );
    }
    assert!(reaches(&a, w.server()), "still routed");

    stop.store(true, Ordering::SeqCst);
    for s in servers {
        s.join().unwrap();
    }
}

#[tokio::test]
async fn release_and_failed_attach_leave_nothing_behind() {
    if !capable("release_and_failed_attach_leave_nothing_behind") {
        return;
    }
    let w = World::new(Slot(3));
    let net = w.start();
    let sbx = id("gone");
    let a = net
        .attach(
            &sbx,
            &policy(false, &[w.slot.fake_net()], &[cidr("198.51.100.0/24")]),
        )
        .await
        .unwrap();
    let addr = a.address.addr().to_string();
    let ns = a.namespace.clone().unwrap();
    let prefix = &w.config.link_prefix;
    let mut conn = connect(&a, w.server(), SHORT).unwrap();
    echo(&mut conn, b"x").unwrap();
    assert_eq!(links().iter().filter(|l| l.starts_with(prefix)).count(), 1);
    assert!(netns::is_mount_point(&ns).unwrap());
    let server = w.slot.server().to_string();
    assert_eq!(flows(&addr, &server), (1, 1));
    assert!(set_elements(&w.config, "deny_out").contains(&addr));
    let again = net.attach(&sbx, &NetSpec::default()).await;
    assert!(
        matches!(again, Err(BackendError::AlreadyExists { .. })),
        "{again:?}"
    );

    net.release(&sbx).await.unwrap();
    drop(conn);
    assert_eq!(links().iter().filter(|l| l.starts_with(prefix)).count(), 0);
    assert!(!ns.exists());
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mountinfo.contains(&ns.display().to_string()));
    assert_eq!(flows(&addr, &server), (0, 0));
    for set in ["no_internet", "allow_out", "deny_out"] {
        assert_eq!(set_elements(&w.config, set), "", "{set}");
    }
    assert!(!w.config.run_dir.join("gone.json").exists());
    assert!(net.list().await.unwrap().is_empty());
    let twice = net.release(&sbx).await;
    assert!(
        matches!(twice, Err(BackendError::NotFound { .. })),
        "{twice:?}"
    );

    // A create that fails half-way (its namespace file is taken) leaves nothing either, and
    // its address goes back to the pool.
    let blocked = w.config.run_dir.join("blocked");
    std::fs::write(&blocked, "").unwrap();
    let failed = net.attach(&id("blocked"), &policy(false, &[], &[])).await;
    assert!(matches!(failed, Err(BackendError::Io { .. })), "{failed:?}");
    assert_eq!(links().iter().filter(|l| l.starts_with(prefix)).count(), 0);
    assert!(!w.config.run_dir.join("blocked.json").exists());
    assert_eq!(set_elements(&w.config, "no_internet"), "");
    let next = net.attach(&id("next"), &NetSpec::default()).await.unwrap();
    assert_eq!(next.address, a.address, "the address came back to the pool");
    // The run directory is the driver's: the stale file went with the failed create.
    assert!(!blocked.exists());

    // Purging takes the bridge, the tables and the run directory's mount.
    LinuxNet::purge(&w.config).unwrap();
    assert!(!links().contains(&w.config.bridge));
    assert!(!links().iter().any(|l| l.starts_with(prefix)));
    let mut cmd = Command::new("nft");
    cmd.args(["-j", "list", "tables"]);
    let tables = command::run(cmd, b"", HELPER).unwrap().stdout;
    assert!(
        !tables.contains(&format!("\"{}\"", w.config.table)),
        "{tables}"
    );
    assert!(!netns::is_mount_point(&w.config.run_dir).unwrap());
}

#[tokio::test]
async fn a_restart_takes_back_live_sandboxes_and_removes_orphans() {
    if !capable("a_restart_takes_back_live_sandboxes_and_removes_orphans") {
        return;
    }
    let w = World::new(Slot(4));
    let (kept, orphan) = (id("kept"), id("orphan"));
    let (a, b) = {
        let first = w.start();
        let a = first
            .attach(&kept, &policy(false, &[w.slot.fake_net()], &[]))
            .await
            .unwrap();
        let b = first.attach(&orphan, &NetSpec::default()).await.unwrap();
        assert!(reaches(&b, w.server()));
        // The first driver dies without cleaning up, like a gateway after kill -9.
        (a, b)
    };
    std::fs::write(w.config.run_dir.join("stray"), "").unwrap();
    let b_link = format!(
        "{}{:x}",
        w.config.link_prefix,
        b.address.addr().octets()[3] - 128 - 16 * 4
    );
    assert!(links().contains(&b_link));

    let second = w.start();
    // Before recovery the recorded policy is already in force again.
    assert!(set_elements(&w.config, "no_internet").contains(&a.address.addr().to_string()));
    let adopted = second.recover(std::slice::from_ref(&kept)).await.unwrap();
    assert_eq!(adopted, std::slice::from_ref(&a));
    assert_eq!(second.list().await.unwrap(), std::slice::from_ref(&a));
    assert!(reaches(&a, w.server()), "the kept sandbox still has egress");
    assert!(!b.namespace.as_ref().unwrap().exists());
    assert!(!links().contains(&b_link));
    assert!(!w.config.run_dir.join("orphan.json").exists());
    assert!(!w.config.run_dir.join("stray").exists());
    let server = w.slot.server().to_string();
    assert_eq!(flows(&b.address.addr().to_string(), &server), (0, 0));
    // The orphan's address is free again; the kept one's is not.
    let c = second
        .attach(&id("new"), &NetSpec::default())
        .await
        .unwrap();
    assert_eq!(c.address, b.address);
    second.release(&kept).await.unwrap();
    second.release(&id("new")).await.unwrap();
    assert_eq!(set_elements(&w.config, "no_internet"), "");
}

#[test]
fn a_pool_that_collides_with_the_host_is_refused() {
    if !capable("a_pool_that_collides_with_the_host_is_refused") {
        return;
    }
    let w = World::new(Slot(5));
    // The fake internet's link put 198.51.100.81/28 and its route on the host.
    for pool in [w.slot.fake_net(), cidr("198.51.100.80/29")] {
        let config = LinuxNetConfig {
            pool,
            ..w.config.clone()
        };
        let r = LinuxNet::start(config);
        assert!(
            matches!(&r, Err(BackendError::InvalidSpec { field: "sandbox cidr", reason })
                if reason.contains("overlaps")),
            "{pool}: {r:?}"
        );
    }
    assert!(!links().contains(&w.config.bridge), "nothing was made");
    assert!(!w.config.run_dir.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_attaches_get_distinct_working_networks() {
    if !capable("concurrent_attaches_get_distinct_working_networks") {
        return;
    }
    let w = World::new(Slot(6));
    let net = w.start();
    // A /28 holds 13 sandboxes: fill it at once, then one more is refused.
    let ids: Vec<SandboxId> = (0..13).map(|i| id(&format!("c{i}"))).collect();
    let tasks: Vec<_> = ids
        .iter()
        .map(|i| {
            let (net, i) = (net.clone(), i.clone());
            tokio::spawn(async move { net.attach(&i, &NetSpec::default()).await })
        })
        .collect();
    let mut addrs = std::collections::BTreeSet::new();
    let mut all = Vec::new();
    for t in tasks {
        let a = t.await.unwrap().unwrap();
        assert!(addrs.insert(a.address.addr()), "{a:?}");
        all.push(a);
    }
    let full = net.attach(&id("onemore"), &NetSpec::default()).await;
    assert!(
        matches!(full, Err(BackendError::InvalidState { .. })),
        "{full:?}"
    );
    for a in all.iter().step_by(4) {
        assert!(reaches(a, w.server()), "{}", a.id);
    }
    let mac =
        || std::fs::read_to_string(format!("/sys/class/net/{}/address", w.config.bridge)).unwrap();
    let before = mac();
    // A bridge without an address of its own would take its lowest port's: releasing that
    // sandbox would change it under every other sandbox's cached gateway MAC.
    let lowest = all
        .iter()
        .min_by_key(|a| {
            let offset = u32::from(a.address.addr()) - u32::from(w.slot.pool().network());
            let link = format!("{}{offset:x}", w.config.link_prefix);
            std::fs::read_to_string(format!("/sys/class/net/{link}/address")).unwrap()
        })
        .unwrap();
    let a_neighbour = all.iter().find(|a| a.id != lowest.id).unwrap();
    assert!(reaches(a_neighbour, w.server()));
    net.release(&lowest.id).await.unwrap();
    assert_eq!(mac(), before);
    assert!(reaches(a_neighbour, w.server()), "after a neighbour left");
    let tasks: Vec<_> = ids
        .iter()
        .filter(|i| **i != lowest.id)
        .map(|i| {
            let (net, i) = (net.clone(), i.clone());
            tokio::spawn(async move { net.release(&i).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let prefix = &w.config.link_prefix;
    assert!(!links().iter().any(|l| l.starts_with(prefix)));
    assert!(std::fs::read_dir(&w.config.run_dir)
        .unwrap()
        .next()
        .is_none());
}

#[tokio::test]
async fn ready_namespaces_make_attach_a_move() {
    if !capable("ready_namespaces_make_attach_a_move") {
        return;
    }
    let w = World::new(Slot(7));
    let config = LinuxNetConfig {
        ready_namespaces: 2,
        ..w.config.clone()
    };
    let net = LinuxNet::start(config.clone()).unwrap();
    assert_eq!(net.fill_ready().await.unwrap(), 2);
    assert_eq!(net.ready_count(), 2);
    let ready = |dir: &Path| {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(ready(&config.run_dir), ["ready-2", "ready-3"]);

    // An attach takes a ready one (the last made), moved to the sandbox's path.
    let a = net
        .attach(&id("warm"), &policy(false, &[w.slot.fake_net()], &[]))
        .await
        .unwrap();
    assert_eq!(a.address.addr(), ip(128 + 16 * 7 + 3));
    assert_eq!(ready(&config.run_dir), ["ready-2", "warm", "warm.json"]);
    assert!(netns::is_mount_point(a.namespace.as_ref().unwrap()).unwrap());
    assert!(reaches(&a, w.server()));
    assert!(set_elements(&config, "no_internet").contains(&a.address.addr().to_string()));
    assert_eq!(net.fill_ready().await.unwrap(), 1);

    // A restart removes the ready ones (they hold no sandbox) and keeps the sandbox.
    let second = LinuxNet::start(config.clone()).unwrap();
    let kept = second.recover(&[id("warm")]).await.unwrap();
    assert_eq!(kept, std::slice::from_ref(&a));
    assert_eq!(ready(&config.run_dir), ["warm", "warm.json"]);
    let prefix = &config.link_prefix;
    assert_eq!(links().iter().filter(|l| l.starts_with(prefix)).count(), 1);
    assert!(reaches(&a, w.server()));
    second.release(&id("warm")).await.unwrap();
    assert!(ready(&config.run_dir).is_empty());
}

/// The reports that come next: waits for a first batch (each call waits about a second;
/// 30 calls is far more than a report takes to arrive), then reads until a call finds none.
async fn next_reports(net: &LinuxNet) -> Vec<BlockedEgress> {
    let mut all = Vec::new();
    for _ in 0..30 {
        let batch = net.blocked().await.unwrap();
        if batch.is_empty() && !all.is_empty() {
            break;
        }
        all.extend(batch);
    }
    all
}

#[tokio::test]
async fn blocked_egress_is_reported_from_the_kernel_rate_limited() {
    if !capable("blocked_egress_is_reported_from_the_kernel_rate_limited") {
        return;
    }
    let w = World::new(Slot(5));
    let net = w.start();
    let server = cidr(&w.slot.server().to_string());
    let denied = net
        .attach(&id("denied"), &policy(true, &[], &[server]))
        .await
        .unwrap();
    let open = net.attach(&id("open"), &NetSpec::default()).await.unwrap();
    // The first call binds the group; nothing was blocked yet.
    assert_eq!(net.blocked().await.unwrap(), []);

    // Allowed connections report nothing; the denied one after them is the first report.
    let other = SocketAddrV4::new(w.slot.server2(), PORT);
    assert!(reaches(&open, w.server()));
    assert!(reaches(&denied, other));
    assert!(blocked(&denied, w.server()));
    let got = next_reports(&net).await;
    let expected = BlockedEgress {
        id: denied.id.clone(),
        destination: w.slot.server(),
        port: Some(PORT),
        protocol: IpProtocol::Tcp,
        reason: BlockReason::Policy,
    };
    // A SYN retry is a second report of the same attempt.
    assert!(!got.is_empty());
    assert!(got.iter().all(|r| *r == expected), "{got:#?}");

    // The operator's limits say which one: the host's own address, cloud metadata.
    let gateway = SocketAddrV4::new(open.gateway, 9);
    assert!(blocked(&open, gateway));
    let metadata = SocketAddrV4::new(Ipv4Addr::new(169, 254, 169, 254), 80);
    assert!(blocked(&open, metadata));
    let got: Vec<_> = next_reports(&net)
        .await
        .into_iter()
        .map(|r| (r.id, r.destination, r.port, r.reason))
        .collect();
    let host = (open.id.clone(), open.gateway, Some(9), BlockReason::Host);
    let cloud = (
        open.id.clone(),
        *metadata.ip(),
        Some(80),
        BlockReason::Metadata,
    );
    assert!(got.contains(&host) && got.contains(&cloud), "{got:?}");
    assert!(got.iter().all(|r| *r == host || *r == cloud), "{got:?}");

    // A flood of 100 denied datagrams is dropped whole but reported at most at the rate
    // limit: its burst, plus its rate for every second the flood could have lasted.
    let drops = counter(&w.config, "inet", "drop_policy");
    let ns = File::open(denied.namespace.as_ref().unwrap()).unwrap();
    let started = Instant::now();
    netns::within(ns.as_fd(), || {
        let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
        for _ in 0..100 {
            socket.send_to(b"x", w.server())?;
        }
        Ok(())
    })
    .unwrap();
    let lasted = started.elapsed();
    assert!(counter(&w.config, "inet", "drop_policy") >= drops + 100);
    let got = next_reports(&net).await;
    let bound = u64::from(LOG_BURST) + u64::from(LOG_RATE) * (lasted.as_secs() + 1);
    assert!(!got.is_empty());
    assert!(got.len() as u64 <= bound, "{} > {bound}", got.len());
    assert!(
        got.iter().all(|r| r.id == denied.id
            && r.protocol == IpProtocol::Udp
            && r.port == Some(PORT)
            && r.reason == BlockReason::Policy),
        "{got:?}"
    );
    assert_eq!(net.blocked_lost(), 0);
}

#[test]
fn an_nflog_group_has_one_reader_at_a_time() {
    if !capable("an_nflog_group_has_one_reader_at_a_time") {
        return;
    }
    // In a scratch namespace, whose groups are its own.
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: only this thread, which ends right after.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            let first = Reader::bind(LinuxNetConfig::DEFAULT_LOG_GROUP).unwrap();
            let second = Reader::bind(LinuxNetConfig::DEFAULT_LOG_GROUP);
            assert!(
                matches!(&second, Err(e) if e.raw_os_error() == Some(libc::EPERM)),
                "{second:?}"
            );
            Reader::bind(LinuxNetConfig::DEFAULT_LOG_GROUP + 1).unwrap();
            // Closing the socket unbinds.
            drop(first);
            Reader::bind(LinuxNetConfig::DEFAULT_LOG_GROUP).unwrap();
        })
        .join()
        .unwrap();
    });
}

/// A DNS server in the fake internet, on the second server address, port 53: `fake.test`
/// is the first server, `other.test` the second, anything else NXDOMAIN.
struct FakeDns {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeDns {
    fn new(w: &World) -> Self {
        let (first, second) = (w.slot.server(), w.slot.server2());
        let socket = netns::within(w.fake().ns.as_fd(), || UdpSocket::bind((second, 53))).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !flag.load(Ordering::SeqCst) {
                let Ok((n, peer)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(q) = message::parse_query(&buf[..n]) else {
                    continue;
                };
                let (rcode, records) = match q.question.name.as_str() {
                    "fake.test" => (0, vec![("fake.test", 60, Data::A(first))]),
                    "other.test" => (0, vec![("other.test", 60, Data::A(second))]),
                    _ => (3, vec![]),
                };
                let _ = socket.send_to(&build::response(&buf[..n], rcode, &records), peer);
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for FakeDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Resolves `name` from inside the sandbox through its resolver; the answer's addresses.
fn resolve(a: &NetAttachment, name: &str) -> Vec<Ipv4Addr> {
    let ns = File::open(a.namespace.as_ref().unwrap()).unwrap();
    let socket = netns::within(ns.as_fd(), || UdpSocket::bind("0.0.0.0:0")).unwrap();
    socket.set_read_timeout(Some(LONG)).unwrap();
    let query = build::query(0x5a5a, name, TYPE_A);
    socket.send_to(&query, (a.dns, 53)).unwrap();
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf).unwrap();
    let reply = message::parse_response(&buf[..n]).unwrap();
    reply
        .answers
        .iter()
        .filter_map(|r| match r.data {
            Data::A(addr) => Some(addr),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_domains_open_what_they_resolve_to_through_the_forwarder() {
    if !capable("allowed_domains_open_what_they_resolve_to_through_the_forwarder") {
        return;
    }
    let w = World::new(Slot(5));
    let _dns = FakeDns::new(&w);
    let net = w.start();
    let upstream = SocketAddr::from((w.slot.server2(), 53));
    let listen = SocketAddrV4::new(net.gateway(), 53);
    let forwarder = Forwarder::start(
        ForwarderConfig::new(listen, vec![upstream]),
        Arc::new(net.clone()),
    )
    .await
    .unwrap();
    let only_fake = EgressPolicy {
        allow_internet: false,
        allow_domains: vec!["fake.test".into()],
        ..EgressPolicy::default()
    };
    let spec = NetSpec {
        policy: only_fake.clone(),
    };
    let sbx = id("dns");
    let a = net.attach(&sbx, &spec).await.unwrap();
    let b = net.attach(&id("dnsb"), &spec).await.unwrap();
    let addr = a.address.addr().to_string();
    let other = SocketAddrV4::new(w.slot.server2(), PORT);
    // The first call binds the log group, so the drops below are reported.
    assert_eq!(net.blocked().await.unwrap(), []);
    assert!(blocked(&a, w.server()), "before resolving");

    // A name not allowed resolves, and opens nothing.
    assert_eq!(resolve(&a, "other.test"), [w.slot.server2()]);
    assert!(blocked(&a, other), "a name not allowed");
    assert_eq!(set_elements(&w.config, "allow_resolved"), "");
    // Both were the policy's drops, reported as such (a SYN retry may repeat one).
    let denied = |s: &NetAttachment, to: Ipv4Addr| (s.id.clone(), to, BlockReason::Policy);
    let got: Vec<_> = next_reports(&net)
        .await
        .into_iter()
        .map(|r| (r.id, r.destination, r.reason))
        .collect();
    let expected = [denied(&a, w.slot.server()), denied(&a, w.slot.server2())];
    assert!(expected.iter().all(|e| got.contains(e)), "{got:?}");
    assert!(got.iter().all(|r| expected.contains(r)), "{got:?}");

    // The allowed name opens its address, to this sandbox only.
    assert_eq!(resolve(&a, "fake.test"), [w.slot.server()]);
    assert!(set_elements(&w.config, "allow_resolved").contains(&addr));
    let mut conn = connect(&a, w.server(), LONG).unwrap();
    conn.set_read_timeout(Some(LONG)).unwrap();
    echo(&mut conn, b"open").unwrap();
    // The element lives as long as the answer's TTL; a second answer replaces it (deleted
    // and added in one transaction), under the open connection.
    let elements = set_elements(&w.config, "allow_resolved");
    assert!(elements.contains("\"timeout\":60"), "{elements}");
    assert_eq!(resolve(&a, "fake.test"), [w.slot.server()]);
    echo(&mut conn, b"again").unwrap();
    assert!(set_elements(&w.config, "allow_resolved").contains(&addr));
    assert!(blocked(&a, other), "the other server stays closed");
    assert!(blocked(&b, w.server()), "a sandbox that did not resolve it");
    // The resolved set accepts before the policy's logging drop: the connection it let
    // through was never reported, the attempts it did not cover were.
    let got: Vec<_> = next_reports(&net)
        .await
        .into_iter()
        .map(|r| (r.id, r.destination, r.reason))
        .collect();
    let expected = [denied(&a, w.slot.server2()), denied(&b, w.slot.server())];
    assert!(expected.iter().all(|e| got.contains(e)), "{got:?}");
    assert!(got.iter().all(|r| expected.contains(r)), "{got:?}");

    // An update that keeps the domains keeps what they opened, and the connection; a
    // domain entry wins over denyOut.
    let denying = EgressPolicy {
        deny_out: vec![w.slot.fake_net()],
        ..only_fake.clone()
    };
    net.update_policy(&sbx, &denying).await.unwrap();
    echo(&mut conn, b"kept").unwrap();
    // One that drops them closes it, open connection included.
    let closed = EgressPolicy {
        allow_internet: false,
        ..EgressPolicy::default()
    };
    net.update_policy(&sbx, &closed).await.unwrap();
    assert_eq!(set_elements(&w.config, "allow_resolved"), "");
    conn.set_read_timeout(Some(SHORT)).unwrap();
    assert!(
        echo(&mut conn, b"cut").is_err(),
        "the open connection still works"
    );
    assert!(blocked(&a, w.server()));
    assert!(resolve(&a, "fake.test") == [w.slot.server()] && blocked(&a, w.server()));

    // A bad pattern is refused before anything changes.
    let bad = EgressPolicy {
        allow_domains: vec!["Fake.test".into()],
        ..only_fake.clone()
    };
    let r = net.update_policy(&sbx, &bad).await;
    assert!(matches!(r, Err(BackendError::InvalidSpec { .. })), "{r:?}");

    // Back again, then a restart: the recorded policy and what it opened come back in the
    // same transaction as the ruleset.
    net.update_policy(&sbx, &only_fake).await.unwrap();
    assert_eq!(resolve(&a, "fake.test"), [w.slot.server()]);
    assert!(reaches(&a, w.server()));
    forwarder.stop().await;
    let second = w.start();
    assert!(set_elements(&w.config, "allow_resolved").contains(&addr));
    second.recover(&[sbx.clone(), id("dnsb")]).await.unwrap();
    assert!(reaches(&a, w.server()), "after a restart");

    // Release leaves no element behind.
    second.release(&sbx).await.unwrap();
    second.release(&id("dnsb")).await.unwrap();
    assert_eq!(set_elements(&w.config, "allow_resolved"), "");
}
