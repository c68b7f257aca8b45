//! Sandbox networking for gateway tests, on 198.51.100.0/24 (TEST-NET-2) only.
//!
//! A lab with networking holds the network role's test slots 4 to 7 host-wide (the `flock`s
//! `coppice-net`'s own tests take), so it never meets their bridges or routes, and uses their
//! ranges: the sandbox pool [`POOL`] and a [`FakeInternet`] on [`FAKE_NET`], a namespace this
//! harness makes and joins to the host with a veth. Every gateway is limited to egress into
//! 198.51.100.0/24 (`--egress-only-to`) and leaves host-wide forwarding alone. Nothing here
//! touches another address or the host's own routes.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coppice_net::{LinuxNet, LinuxNetConfig};
use nix::fcntl::{Flock, FlockArg};

/// The sandbox pool of networked labs.
pub const POOL: &str = "198.51.100.192/26";
/// The bridge's address: sandboxes' gateway and resolver.
pub const GATEWAY: &str = "198.51.100.193";
/// The fake internet's network, the host side's address, and its two servers.
pub const FAKE_NET: &str = "198.51.100.64/26";
pub const FAKE_HOST: &str = "198.51.100.65";
pub const SERVER: &str = "198.51.100.66";
pub const SERVER2: &str = "198.51.100.67";
/// What the gateway's network is called: bridge `cpgt0`, table `cpgt`, links `cpgtv*`.
pub const NAME: &str = "cpgt";
const FAKE_NS: &str = "cpgt-fake";
const FAKE_LINK: &str = "cpgtfi";
const FIXTURE: &str = include_str!("../fixtures/fake_internet.py");

/// The gateway flags of a networked lab.
pub fn gateway_args() -> Vec<String> {
    [
        "--sandbox-cidr",
        POOL,
        "--sandbox-network-name",
        NAME,
        "--egress-only-to",
        "198.51.100.0/24",
        "--ip-forward",
        "false",
        // The fake internet's DNS server: nothing leaves 198.51.100.0/24.
        "--dns-upstream",
        SERVER,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// Takes the network test slots 4 to 7, in order, waiting for whoever has them.
pub fn hold_slots() -> Vec<Flock<File>> {
    let dir = Path::new("/run/lock");
    let dir = if dir.is_dir() { dir } else { Path::new("/tmp") };
    (4..8)
        .map(|n| {
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(format!("coppice-net-test-slot-{n}")))
                .unwrap();
            Flock::lock(file, FlockArg::LockExclusive)
                .map_err(|(_, e)| e)
                .unwrap()
        })
        .collect()
}

/// What the gateway of a lab on `state_dir` made: the same configuration it derives.
pub fn driver_config(state_dir: &Path) -> LinuxNetConfig {
    LinuxNetConfig {
        bridge: format!("{NAME}0"),
        table: NAME.into(),
        link_prefix: format!("{NAME}v"),
        egress_only_to: Some(vec!["198.51.100.0/24".parse().unwrap()]),
        global_forwarding: false,
        ..LinuxNetConfig::new(state_dir.join("net"), POOL.parse().unwrap())
    }
}

/// Removes everything the gateway's network role made (after the gateway is gone).
pub fn purge(state_dir: &Path) -> Result<(), String> {
    LinuxNet::purge(&driver_config(state_dir)).map_err(|e| e.to_string())
}

/// Runs `ip` with `args`, bounded; panics with its output when it fails and `must` is set.
fn ip(args: &[&str], must: bool) {
    let mut child = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("ip {args:?} did not finish in 10 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    if must && !status.success() {
        let out = child.wait_with_output().unwrap();
        panic!(
            "ip {args:?}: {status}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A namespace with an HTTP server (8080), a TCP echo server (7007) and a DNS server for
/// made-up names (`fake.test`) on [`SERVER`] and [`SERVER2`], reached from the host through
/// the connected route of a veth; removed on drop.
pub struct FakeInternet {
    servers: Option<Child>,
    dir: PathBuf,
}

impl FakeInternet {
    /// Makes it; the caller holds the slots (a networked lab, started).
    pub fn new(dir: &Path) -> Self {
        Self::remove_leftovers();
        let dir = dir.join("fake-internet");
        std::fs::create_dir_all(&dir).unwrap();
        let mut fake = Self { servers: None, dir };
        let host = format!("{FAKE_HOST}/26");
        let s1 = format!("{SERVER}/26");
        let s2 = format!("{SERVER2}/26");
        ip(&["netns", "add", FAKE_NS], true);
        ip(
            &[
                "link", "add", FAKE_LINK, "type", "veth", "peer", "name", "eth0", "netns", FAKE_NS,
            ],
            true,
        );
        ip(&["addr", "add", &host, "dev", FAKE_LINK], true);
        ip(&["link", "set", FAKE_LINK, "up"], true);
        // Replies to NATed connections come in here and are forwarded to the bridge.
        std::fs::write(
            format!("/proc/sys/net/ipv4/conf/{FAKE_LINK}/forwarding"),
            "1",
        )
        .unwrap();
        for a in [&s1, &s2] {
            ip(&["-n", FAKE_NS, "addr", "add", a, "dev", "eth0"], true);
        }
        ip(&["-n", FAKE_NS, "link", "set", "eth0", "up"], true);
        ip(&["-n", FAKE_NS, "link", "set", "lo", "up"], true);
        ip(
            &["-n", FAKE_NS, "route", "add", "default", "via", FAKE_HOST],
            true,
        );
        let script = fake.dir.join("fake_internet.py");
        std::fs::write(&script, FIXTURE).unwrap();
        let ready = fake.dir.join("ready");
        fake.servers = Some(
            Command::new("ip")
                .args(["netns", "exec", FAKE_NS, "python3"])
                .arg(&script)
                .arg(&ready)
                .arg(format!("fake.test={SERVER}"))
                .arg(format!("www.fake.test={SERVER}"))
                .arg(format!("other.test={SERVER2}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(File::create(fake.dir.join("servers.log")).unwrap())
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready.exists() {
            assert!(
                Instant::now() < deadline,
                "the fake internet's servers did not start: {}",
                std::fs::read_to_string(fake.dir.join("servers.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        fake
    }

    fn remove_leftovers() {
        ip(&["link", "del", FAKE_LINK], false);
        ip(&["netns", "del", FAKE_NS], false);
    }
}

impl Drop for FakeInternet {
    fn drop(&mut self) {
        if let Some(mut c) = self.servers.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        Self::remove_leftovers();
    }
}
