//! The `net` part's own network namespaces, on 198.51.100.0/24 (TEST-NET-2) only:
//!
//! - a **fake internet**, namespace [`FAKE_NS`] joined to the host by the veth [`FAKE_LINK`]
//!   on 198.51.100.0/27 (host side [`FAKE_HOST`], server [`FAKE_SERVER`]), which sandboxes
//!   reach through the gateway's bridge, the host's forwarding and its NAT;
//! - a **bare veth pair** between namespaces [`FLOOR_CLIENT_NS`] and [`FLOOR_SERVER_NS`] on
//!   198.51.100.32/27, which never touches the host's own stack: the floor.
//!
//! Each server namespace runs `api-bench peer serve`. These are the ranges of the network
//! role's test slots (fake internets in 198.51.100.0/25, sandbox pools in
//! 198.51.100.128/25), all of which [`hold_slots`] takes host-wide, so no
//! test meets this bench's bridge, links or routes. Only [`FAKE_LINK`] has forwarding turned
//! on; the host-wide switch is left alone. Everything is removed on drop, and whatever a
//! crashed run left is removed first. Every `ip` command is bounded in time.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::client::{check_interrupted, Res};
use crate::gateway::lock_file;

/// The fake internet's namespace, its veth on the host, and the addresses on either end.
pub(crate) const FAKE_NS: &str = "cpbn-fake";
pub(crate) const FAKE_LINK: &str = "cpbnfi";
pub(crate) const FAKE_HOST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub(crate) const FAKE_SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// The floor's two namespaces and their addresses, one veth pair between them.
pub(crate) const FLOOR_CLIENT_NS: &str = "cpbn-a";
pub(crate) const FLOOR_SERVER_NS: &str = "cpbn-b";
const FLOOR_CLIENT: &str = "198.51.100.33/27";
pub(crate) const FLOOR_SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 34);
/// The network test slots this bench holds, and how long it waits for them.
const SLOTS: std::ops::Range<u32> = 0..8;
const SLOT_WAIT: Duration = Duration::from_secs(15 * 60);
/// Bound on one `ip` command.
const IP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a server may take to listen, and how long it lives at most.
const SERVER_START: Duration = Duration::from_secs(10);
const SERVER_LIFETIME_SECS: u32 = 3600;

/// Takes the network test slots 0 to 7 host-wide (exclusive `flock`s on
/// `/run/lock/coppice-net-test-slot-N`), waiting a bounded time for whoever has them.
pub(crate) fn hold_slots() -> Res<Vec<nix::fcntl::Flock<File>>> {
    let dir = Path::new("/run/lock");
    let dir = if dir.is_dir() { dir } else { Path::new("/tmp") };
    SLOTS
        .map(|n| {
            lock_file(
                &dir.join(format!("coppice-net-test-slot-{n}")),
                SLOT_WAIT,
                "network tests or e2e running",
            )
        })
        .collect()
}

/// The namespaces, links and servers made; removed on drop.
pub(crate) struct Namespaces {
    dir: tempfile::TempDir,
    servers: Vec<Child>,
}

impl Namespaces {
    /// Makes both topologies and starts a server in each, running `peer` (this program).
    pub(crate) fn new(peer: &Path) -> Res<Self> {
        remove_leftovers();
        let dir = tempfile::Builder::new()
            .prefix("coppice-net-bench-")
            .tempdir_in("/var/tmp")?;
        let mut made = Self {
            dir,
            servers: Vec::new(),
        };
        made.build()?;
        for ns in [FAKE_NS, FLOOR_SERVER_NS] {
            made.start_server(peer, ns)?;
        }
        Ok(made)
    }

    fn build(&self) -> Res<()> {
        let fake_host = format!("{FAKE_HOST}/27");
        let fake_server = format!("{FAKE_SERVER}/27");
        let floor_server = format!("{FLOOR_SERVER}/27");
        let host = FAKE_HOST.to_string();
        for ns in [FAKE_NS, FLOOR_CLIENT_NS, FLOOR_SERVER_NS] {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        // The fake internet: a veth from the host, reached through its connected route.
        ip(&[
            "link", "add", FAKE_LINK, "type", "veth", "peer", "name", "eth0", "netns", FAKE_NS,
        ])?;
        ip(&["addr", "add", &fake_host, "dev", FAKE_LINK])?;
        ip(&["link", "set", FAKE_LINK, "up"])?;
        // Replies to NATed connections come in here and are forwarded to the bridge.
        let forwarding = format!("/proc/sys/net/ipv4/conf/{FAKE_LINK}/forwarding");
        std::fs::write(&forwarding, "1").map_err(|e| format!("write {forwarding}: {e}"))?;
        ip(&["-n", FAKE_NS, "addr", "add", &fake_server, "dev", "eth0"])?;
        ip(&["-n", FAKE_NS, "link", "set", "eth0", "up"])?;
        ip(&["-n", FAKE_NS, "route", "add", "default", "via", &host])?;
        // The floor: one veth pair between two namespaces, nothing else on the path.
        ip(&[
            "-n",
            FLOOR_CLIENT_NS,
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            FLOOR_SERVER_NS,
        ])?;
        ip(&[
            "-n",
            FLOOR_CLIENT_NS,
            "addr",
            "add",
            FLOOR_CLIENT,
            "dev",
            "eth0",
        ])?;
        ip(&[
            "-n",
            FLOOR_SERVER_NS,
            "addr",
            "add",
            &floor_server,
            "dev",
            "eth0",
        ])?;
        for ns in [FLOOR_CLIENT_NS, FLOOR_SERVER_NS] {
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        }
        Ok(())
    }

    fn start_server(&mut self, peer: &Path, ns: &str) -> Res<()> {
        let ready = self.dir.path().join(format!("{ns}.ready"));
        let log = self.dir.path().join(format!("{ns}.log"));
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(peer)
            .args(["peer", "serve", "--secs", &SERVER_LIFETIME_SECS.to_string()])
            .arg("--ready")
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log)?)
            .spawn()?;
        self.servers.push(child);
        let deadline = Instant::now() + SERVER_START;
        while !ready.exists() {
            check_interrupted()?;
            if Instant::now() > deadline {
                return Err(format!(
                    "the server in {ns} did not start: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Runs `peer args` in the floor's client namespace, bounded by `limit`; returns its
    /// stdout.
    pub(crate) fn run_in_floor(&self, peer: &Path, args: &[&str], limit: Duration) -> Res<String> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", FLOOR_CLIENT_NS])
            .arg(peer)
            .args(args);
        let out = bounded(&mut cmd, limit)?;
        if !out.status.success() {
            return Err(format!(
                "peer {args:?} in {FLOOR_CLIENT_NS}: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Where the servers' logs are, for an error message.
    pub(crate) fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for child in &mut self.servers {
            let _ = child.kill();
            let _ = child.wait();
        }
        remove_leftovers();
    }
}

/// Removes whatever this module makes, ignoring what is not there.
fn remove_leftovers() {
    // Deleting a namespace deletes the links in it, and with them their peers.
    let _ = ip(&["link", "del", FAKE_LINK]);
    for ns in [FAKE_NS, FLOOR_CLIENT_NS, FLOOR_SERVER_NS] {
        let _ = ip(&["netns", "del", ns]);
    }
}

/// `ip args`, bounded by [`IP_TIMEOUT`]; an error names the command and what it said.
fn ip(args: &[&str]) -> Res<()> {
    let out = bounded(Command::new("ip").args(args), IP_TIMEOUT)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into())
    }
}

/// Runs `cmd` with its output captured (a few lines at most: more would fill the pipe and
/// stall it until the limit), killing it after `limit`.
pub(crate) fn bounded(cmd: &mut Command, limit: Duration) -> Res<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{cmd:?} did not finish within {limit:?}").into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
