//! [`LinuxNet`]: a network namespace per sandbox, a veth pair to a bridge the driver owns,
//! NAT and policy in one nftables table.
//!
//! The driver makes each namespace itself, fully configured, and pins it with a bind mount
//! on `<run_dir>/<id>`; the jail joins that file with `setns` instead of making a network
//! namespace of its own. Sandbox root, in its own user namespace, owns nothing of it. A
//! record `<run_dir>/<id>.json` (address and policy) is written before anything is made, so
//! a new process can take a sandbox back or clean up after a create a crash cut short.
//! Blocked egress comes back from the kernel over NFLOG (`nflog.rs`), mapped from the
//! packet's source address to the sandbox that holds it.

mod command;
mod netlink;
mod netns;
mod nflog;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use coppice_lifecycle::backend::{
    BackendError, BlockedEgress, Capabilities, Capability, EgressPolicy, Ipv4Cidr, NetAttachment,
    NetSpec, Network, SandboxId,
};
use serde::{Deserialize, Serialize};

use crate::dns::{ClientPolicy, Clients};
use crate::linux::command::HELPER;
use crate::linux::netlink::{Flow, ListedElement, Netlink, SetChange, SetElement};
use crate::linux::nflog::Logged;
use crate::nft::{reason_of_prefix, resolved_script, update_script, Elements, Rules, RESOLVED_SET};
use crate::pool::{check_overlap, resolvers, Pool};

/// The sandbox-side interface's name.
pub(crate) const SANDBOX_INTERFACE: &str = "eth0";

/// The most destinations one sandbox's domain entries hold open at once; answers beyond it
/// open nothing more until some expire.
const MAX_RESOLVED_PER_SANDBOX: usize = 1024;
/// The most elements in one netlink message of a set change (its attributes' lengths are
/// 16 bits).
const ELEMENTS_PER_MESSAGE: usize = 256;

/// How the Linux driver is set up; [`LinuxNetConfig::new`] gives the defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxNetConfig {
    /// Where namespace files and records live, e.g. `/run/coppice/net`. It is made a private
    /// mount point so namespace mounts under it do not propagate.
    pub run_dir: PathBuf,
    /// The sandbox address pool (`--sandbox-cidr`), a /16 to a /29. Its first usable address
    /// goes to the bridge.
    pub pool: Ipv4Cidr,
    /// The bridge the driver owns (default `coppice0`).
    pub bridge: String,
    /// The nftables table the driver owns, in the `inet` and `bridge` families (default
    /// `coppice`).
    pub table: String,
    /// Prefix of the host-side veth names, followed by the address's offset in hex (default
    /// `cpv`). No other bridge's ports may start with it.
    pub link_prefix: String,
    /// The resolver sandboxes are told to use; default the bridge's address, where the
    /// gateway's DNS forwarder is to listen.
    pub dns: Option<Ipv4Addr>,
    /// Let sandboxes reach 169.254.0.0/16 (cloud metadata); default false.
    pub allow_metadata: bool,
    /// If set, the only destinations any sandbox may reach, whatever its policy.
    pub egress_only_to: Option<Vec<Ipv4Cidr>>,
    /// How many ready namespaces [`LinuxNet::fill_ready`] keeps (default 0): fully made
    /// (veth, address, route) with an address taken, so an attach only moves one into place
    /// and records it.
    pub ready_namespaces: usize,
    /// Turn on IPv4 forwarding host-wide (`net.ipv4.ip_forward`), as NAT through the host's
    /// default route needs; default true. When false, forwarding is turned on for the bridge
    /// only and the operator enables it on the uplinks.
    pub global_forwarding: bool,
    /// The NFLOG group the rules log blocked egress to and [`Network::blocked`] reads
    /// (default [`LinuxNetConfig::DEFAULT_LOG_GROUP`]). One reader per group on a host:
    /// two drivers need two groups.
    pub log_group: u16,
}

impl LinuxNetConfig {
    /// The default NFLOG group for blocked egress, 0x636f ("co"): clear of group 0, which
    /// `ulogd` and hand-written rules tend to use.
    pub const DEFAULT_LOG_GROUP: u16 = 0x636f;

    /// The defaults, for `run_dir` and `pool`.
    pub fn new(run_dir: impl Into<PathBuf>, pool: Ipv4Cidr) -> Self {
        Self {
            run_dir: run_dir.into(),
            pool,
            bridge: "coppice0".into(),
            table: "coppice".into(),
            link_prefix: "cpv".into(),
            dns: None,
            allow_metadata: false,
            egress_only_to: None,
            ready_namespaces: 0,
            global_forwarding: true,
            log_group: Self::DEFAULT_LOG_GROUP,
        }
    }

    fn validate(&self) -> Result<(), BackendError> {
        let name = |field: &'static str, v: &str, max: usize| {
            let ok = !v.is_empty()
                && v.len() <= max
                && v.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if ok {
                Ok(())
            } else {
                Err(BackendError::InvalidSpec {
                    field,
                    reason: format!("{v:?} is not 1 to {max} characters of [a-z0-9_]"),
                })
            }
        };
        name("bridge name", &self.bridge, 15)?;
        name("nftables table name", &self.table, 32)?;
        // Interface names hold 15 bytes: the prefix and up to 4 hex digits of offset.
        name("link prefix", &self.link_prefix, 11)?;
        if self.bridge.starts_with(&self.link_prefix) {
            return Err(BackendError::InvalidSpec {
                field: "link prefix",
                reason: format!("the bridge {:?} starts with it", self.bridge),
            });
        }
        if !self.run_dir.is_absolute() {
            return Err(BackendError::InvalidSpec {
                field: "network run directory",
                reason: format!("{} is not absolute", self.run_dir.display()),
            });
        }
        Ok(())
    }

    fn rules(&self, gateway: Ipv4Addr) -> Rules<'_> {
        Rules {
            table: &self.table,
            bridge: &self.bridge,
            link_prefix: &self.link_prefix,
            pool: self.pool,
            gateway,
            allow_metadata: self.allow_metadata,
            egress_only_to: self.egress_only_to.as_deref(),
            log_group: self.log_group,
        }
    }
}

/// The Linux network driver; cheap to clone (one shared state).
#[derive(Debug, Clone)]
pub struct LinuxNet {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: LinuxNetConfig,
    gateway: Ipv4Addr,
    bridge_index: u32,
    state: Mutex<State>,
    /// Held by [`Inner::fill_ready`], so two fills do not overshoot.
    filling: Mutex<()>,
    /// Every sandbox's domain patterns by address, for the DNS forwarder: set when its
    /// network is made or recorded, replaced by a policy update, removed first thing when
    /// it goes. Never held across a system call.
    clients: RwLock<HashMap<Ipv4Addr, ClientPolicy>>,
    /// What the driver put in the resolved set, by sandbox address: each destination and
    /// when it expires. Held while that set changes, so that an addition for a sandbox and
    /// the flush of its elements never interleave.
    resolved: Mutex<HashMap<Ipv4Addr, HashMap<Ipv4Addr, Instant>>>,
    /// The reading side of blocked egress.
    blocked: Blocked,
}

/// The reading side of blocked egress.
#[derive(Debug, Default)]
struct Blocked {
    /// Bound to the log group on the first [`Network::blocked`] call; its lock is held for
    /// the length of a read (a second), so nothing else waits on it.
    reader: Mutex<Option<nflog::Reader>>,
    /// Reports read and not yet returned (their caller went away mid-read); read into only
    /// when empty, so it holds one batch at most.
    pending: Mutex<Vec<BlockedEgress>>,
    /// How many times the kernel reported lost reports.
    lost: AtomicU64,
}

#[derive(Debug)]
struct State {
    pool: Pool,
    entries: BTreeMap<SandboxId, Entry>,
    /// Addresses of the ready namespaces, each at [`Inner::ready_path`].
    ready: Vec<Ipv4Addr>,
}

#[derive(Debug, Clone)]
struct Entry {
    attachment: NetAttachment,
    /// What is in the nftables sets for it.
    elements: Elements,
    phase: Phase,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Being made by `attach`.
    Building,
    /// Made, and known to belong to a live sandbox.
    Ready,
    /// Found at start from its record; `recover` decides.
    Unconfirmed,
}

/// What is kept on disk per sandbox.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    address: Ipv4Addr,
    policy: EgressPolicy,
}

impl LinuxNet {
    /// Takes over the host side: checks the pool against the host, makes the run directory,
    /// the bridge and its address if missing, and (re)loads the nftables table in one
    /// transaction with the set elements of every sandbox recorded under the run directory,
    /// so a restart never opens a gap in their policies. Blocking: call it from a blocking
    /// thread. Call [`Network::recover`] next, before any attach.
    pub fn start(config: LinuxNetConfig) -> Result<Self, BackendError> {
        config.validate()?;
        ensure_nft()?;
        let mut pool = Pool::new(config.pool)?;
        let gateway = pool.gateway();
        let mut nl = Netlink::open().map_err(|e| nl_err("open netlink socket", "", e))?;
        let existing = nl
            .link_index(&config.bridge)
            .map_err(|e| nl_err("look up bridge", &config.bridge, e))?;
        let addrs: Vec<Ipv4Cidr> = nl
            .addrs()
            .map_err(|e| nl_err("list addresses", "", e))?
            .into_iter()
            .filter(|a| Some(a.index) != existing)
            .map(|a| a.cidr)
            .collect();
        let routes: Vec<Ipv4Cidr> = nl
            .routes()
            .map_err(|e| nl_err("list routes", "", e))?
            .into_iter()
            .filter(|r| existing.is_none() || r.oif != existing)
            .map(|r| r.dst)
            .collect();
        let resolv = fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        check_overlap(pool.cidr(), &addrs, &routes, &resolvers(&resolv))?;

        fs::create_dir_all(&config.run_dir)
            .map_err(|e| BackendError::io("create", &config.run_dir, e))?;
        netns::private_mount_point(&config.run_dir)
            .map_err(|e| BackendError::io("make a private mount point of", &config.run_dir, e))?;

        let bridge_index = match existing {
            Some(i) => i,
            None => {
                nl.new_bridge(&config.bridge)
                    .map_err(|e| nl_err("create bridge", &config.bridge, e))?;
                nl.link_index(&config.bridge)
                    .map_err(|e| nl_err("look up bridge", &config.bridge, e))?
                    .ok_or_else(|| {
                        nl_err(
                            "look up bridge",
                            &config.bridge,
                            io::ErrorKind::NotFound.into(),
                        )
                    })?
            }
        };
        // A bridge without an address of its own takes the lowest of its ports' and changes
        // it when that port goes: every sandbox's cached gateway MAC would then be wrong
        // until its ARP entry expired. A fixed address never changes.
        nl.set_mac(bridge_index, bridge_mac(&config.bridge))
            .map_err(|e| nl_err("set the address of", &config.bridge, e))?;
        let prefix = pool.cidr().prefix();
        let gw_cidr = Ipv4Cidr::new(gateway, prefix)?;
        nl.add_addr(bridge_index, gw_cidr)
            .map_err(|e| nl_err("add the gateway address to", &config.bridge, e))?;
        nl.set_up(bridge_index)
            .map_err(|e| nl_err("set up", &config.bridge, e))?;
        let sysctl = |path: String| {
            fs::write(&path, "1").map_err(|e| BackendError::io("turn on forwarding in", path, e))
        };
        sysctl(format!(
            "/proc/sys/net/ipv4/conf/{}/forwarding",
            config.bridge
        ))?;
        if config.global_forwarding {
            sysctl("/proc/sys/net/ipv4/ip_forward".into())?;
        }

        let mut script = config.rules(gateway).load_script();
        let mut entries = BTreeMap::new();
        let mut clients = HashMap::new();
        let mut resolved = HashMap::new();
        let mut carried = Vec::new();
        let dns = config.dns.unwrap_or(gateway);
        let old_resolved = resolved_elements(&config.table);
        let now = Instant::now();
        for (id, record) in read_records(&config.run_dir) {
            if !pool.claim(record.address) {
                // Not an address of this pool (the pool changed) or a duplicate: recover
                // removes its namespace as a stray.
                continue;
            }
            // The destinations its domains opened go back in with the time they had left,
            // so its connections through them survive the restart.
            if !record.policy.allow_domains.is_empty() {
                let mine: &mut HashMap<Ipv4Addr, Instant> =
                    resolved.entry(record.address).or_default();
                for (dst, left) in old_resolved
                    .iter()
                    .filter_map(|e| resolved_key(e, record.address))
                {
                    carried.push((record.address, dst, left));
                    mine.insert(dst, now + left);
                }
            }
            clients.insert(record.address, ClientPolicy::from(&record.policy));
            let elements = Elements::of(&record.policy);
            if let Some(s) = update_script(
                &config.table,
                record.address,
                &Elements::default(),
                &elements,
            ) {
                script.push_str(&s);
            }
            let attachment = NetAttachment {
                address: Ipv4Cidr::new(record.address, prefix)?,
                gateway,
                dns,
                namespace: Some(config.run_dir.join(id.as_str())),
                interface: SANDBOX_INTERFACE.into(),
                policy: record.policy,
                id: id.clone(),
            };
            entries.insert(
                id,
                Entry {
                    attachment,
                    elements,
                    phase: Phase::Unconfirmed,
                },
            );
        }
        script.push_str(&resolved_script(&config.table, &carried));
        nft(&script)?;
        tracing::info!(
            bridge = %config.bridge,
            pool = %pool.cidr(),
            recorded = entries.len(),
            "network driver started"
        );
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                gateway,
                bridge_index,
                state: Mutex::new(State {
                    pool,
                    entries,
                    ready: Vec::new(),
                }),
                filling: Mutex::new(()),
                clients: RwLock::new(clients),
                resolved: Mutex::new(resolved),
                blocked: Blocked::default(),
            }),
        })
    }

    /// Makes ready namespaces until there are [`LinuxNetConfig::ready_namespaces`] (each
    /// holds a pool address meanwhile); returns how many it made. For a background filler:
    /// call it after [`Network::recover`] and after attaches.
    pub async fn fill_ready(&self) -> Result<usize, BackendError> {
        let inner = self.inner.clone();
        blocking(move || inner.fill_ready(usize::MAX)).await
    }

    /// Makes one ready namespace if fewer than [`LinuxNetConfig::ready_namespaces`] wait and
    /// the pool has an address; returns whether it made one. For a filler that works only
    /// while nothing else does, one namespace at a time.
    pub async fn fill_one(&self) -> Result<bool, BackendError> {
        let inner = self.inner.clone();
        blocking(move || inner.fill_ready(1)).await.map(|n| n > 0)
    }

    /// How many times blocked-egress reports were lost because [`Network::blocked`] was not
    /// called often enough: the kernel found the NFLOG socket's buffer full (each time may
    /// stand for several reports). For a metric; zero in normal operation.
    pub fn blocked_lost(&self) -> u64 {
        self.inner.blocked.lost.load(Ordering::Relaxed)
    }

    /// How many ready namespaces wait.
    pub fn ready_count(&self) -> usize {
        self.inner.lock().ready.len()
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &LinuxNetConfig {
        &self.inner.config
    }

    /// The bridge's address: every sandbox's default gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        self.inner.gateway
    }

    /// Removes everything a driver with `config` can have made on this host: namespace
    /// files and records, the bridge and its ports, both nftables tables, conntrack entries
    /// of the pool, and the run directory's mount. For uninstalling and for tests; it does
    /// not need a running driver and tolerates missing pieces. Blocking.
    pub fn purge(config: &LinuxNetConfig) -> Result<(), BackendError> {
        config.validate()?;
        let mut first_err = None;
        let mut note = |r: Result<(), BackendError>| {
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        };
        if let Ok(dir) = fs::read_dir(&config.run_dir) {
            for entry in dir.flatten() {
                let path = entry.path();
                note(remove_file_or_ns(&path));
            }
        }
        let mut nl = Netlink::open().map_err(|e| nl_err("open netlink socket", "", e))?;
        if let Some(bridge) = nl
            .link_index(&config.bridge)
            .map_err(|e| nl_err("look up bridge", &config.bridge, e))?
        {
            let links = nl.links().map_err(|e| nl_err("list links", "", e))?;
            for l in links.iter().filter(|l| l.master == Some(bridge)) {
                note(
                    nl.del_link(&l.name)
                        .map(drop)
                        .map_err(|e| nl_err("delete link", &l.name, e)),
                );
            }
            note(
                nl.del_link(&config.bridge)
                    .map(drop)
                    .map_err(|e| nl_err("delete bridge", &config.bridge, e)),
            );
        }
        let rules = config.rules(Pool::new(config.pool)?.gateway());
        note(nft(&rules.delete_script()));
        let pool = config.pool;
        note(delete_flows(|f| {
            [f.orig.0, f.orig.1, f.reply.0, f.reply.1]
                .iter()
                .any(|a| pool.contains(*a))
        }));
        note(
            netns::unmount_dir(&config.run_dir)
                .map_err(|e| BackendError::io("unmount", &config.run_dir, e)),
        );
        first_err.map_or(Ok(()), Err)
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the maps consistent (every change is one
        // insert or remove), so a poisoned lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn clients_read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Ipv4Addr, ClientPolicy>> {
        // Every change is one insert or remove: still consistent after a panic.
        self.clients.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn clients_write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<Ipv4Addr, ClientPolicy>> {
        self.clients.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn resolved_lock(&self) -> MutexGuard<'_, HashMap<Ipv4Addr, HashMap<Ipv4Addr, Instant>>> {
        // The map only ever records less than the set holds, which the next change repairs.
        self.resolved.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits up to about [`nflog::WAIT`] for blocked-egress reports and keeps them for
    /// [`Inner::take_blocked`]; returns at once if some are kept already. Blocking.
    fn read_blocked(&self) -> Result<(), BackendError> {
        // Poisoned locks are still consistent: every change is one assignment.
        let mut reader = self
            .blocked
            .reader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !self.pending().is_empty() {
            return Ok(());
        }
        let group = self.config.log_group;
        let bound = match &mut *reader {
            Some(r) => r,
            None => {
                let r = nflog::Reader::bind(group)
                    .map_err(|e| nl_err("bind the NFLOG group", &group.to_string(), e))?;
                tracing::debug!(group, "reading blocked egress");
                reader.insert(r)
            }
        };
        let read = bound.read();
        self.blocked
            .lost
            .fetch_add(bound.take_overruns(), Ordering::Relaxed);
        match read {
            Ok(logged) => {
                *self.pending() = self.reports(logged);
                Ok(())
            }
            Err(e) => {
                // A fresh socket on the next call, rather than one in an unknown state.
                *reader = None;
                Err(nl_err("read the NFLOG group", &group.to_string(), e))
            }
        }
    }

    /// The reports kept by [`Inner::read_blocked`].
    fn take_blocked(&self) -> Vec<BlockedEgress> {
        std::mem::take(&mut *self.pending())
    }

    fn pending(&self) -> MutexGuard<'_, Vec<BlockedEgress>> {
        self.blocked
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The logged packets as reports: the reason from the rule's prefix, the sandbox from
    /// the source address. Packets of other tables or of no sandbox are dropped.
    fn reports(&self, logged: Vec<Logged>) -> Vec<BlockedEgress> {
        if logged.is_empty() {
            return Vec::new();
        }
        let owners: HashMap<Ipv4Addr, SandboxId> = self
            .lock()
            .entries
            .values()
            .map(|e| (e.attachment.address.addr(), e.attachment.id.clone()))
            .collect();
        logged
            .into_iter()
            .filter_map(|l| {
                let reason = reason_of_prefix(&self.config.table, &l.prefix);
                let id = owners.get(&l.source);
                let (Some(reason), Some(id)) = (reason, id) else {
                    tracing::debug!(
                        source = %l.source,
                        prefix = %l.prefix,
                        "a logged packet of no sandbox of this driver"
                    );
                    return None;
                };
                Some(BlockedEgress {
                    id: id.clone(),
                    destination: l.destination,
                    port: l.port,
                    protocol: l.protocol,
                    reason,
                })
            })
            .collect()
    }

    fn ns_path(&self, id: &SandboxId) -> PathBuf {
        self.config.run_dir.join(id.as_str())
    }

    fn record_path(&self, id: &SandboxId) -> PathBuf {
        self.config.run_dir.join(format!("{id}.json"))
    }

    /// Turns the set elements of the sandbox at `addr` from `old` into `new`, in one
    /// nftables transaction over netlink (no helper process).
    fn change_sets(
        &self,
        addr: Ipv4Addr,
        old: &Elements,
        new: &Elements,
    ) -> Result<(), BackendError> {
        if old == new {
            return Ok(());
        }
        Netlink::open_netfilter()
            .and_then(|mut nl| nl.change_sets(&self.config.table, &set_changes(addr, old, new)))
            .map_err(|e| nl_err("update the nftables sets of", &addr.to_string(), e))
    }

    /// Where a ready namespace waits; not a valid sandbox id, so never a sandbox's path.
    fn ready_path(&self, addr: Ipv4Addr) -> PathBuf {
        let offset = u32::from(addr) - u32::from(self.config.pool.network());
        self.config.run_dir.join(format!("ready-{offset:x}"))
    }

    fn link_name(&self, addr: Ipv4Addr) -> String {
        let offset = u32::from(addr) - u32::from(self.config.pool.network());
        format!("{}{offset:x}", self.config.link_prefix)
    }

    fn attach(&self, id: &SandboxId, spec: &NetSpec) -> Result<NetAttachment, BackendError> {
        spec.policy.validate()?;
        let (attachment, warm) = {
            let mut state = self.lock();
            if state.entries.contains_key(id) {
                return Err(BackendError::AlreadyExists {
                    kind: "sandbox network",
                    id: id.to_string(),
                });
            }
            let warm = state.ready.pop();
            let addr = match warm {
                Some(addr) => addr,
                None => state.pool.take().map_err(|e| match e {
                    BackendError::InvalidState { op, reason, .. } => BackendError::InvalidState {
                        op,
                        id: id.to_string(),
                        reason,
                    },
                    e => e,
                })?,
            };
            let attachment = NetAttachment {
                id: id.clone(),
                address: Ipv4Cidr::new(addr, state.pool.cidr().prefix())?,
                gateway: self.gateway,
                dns: self.config.dns.unwrap_or(self.gateway),
                namespace: Some(self.ns_path(id)),
                interface: SANDBOX_INTERFACE.into(),
                policy: spec.policy.clone(),
            };
            state.entries.insert(
                id.clone(),
                Entry {
                    attachment: attachment.clone(),
                    elements: Elements::default(),
                    phase: Phase::Building,
                },
            );
            (attachment, warm.is_some())
        };
        let addr = attachment.address.addr();
        match self.build(&attachment, warm) {
            Ok(elements) => {
                let mut state = self.lock();
                if let Some(e) = state.entries.get_mut(id) {
                    e.elements = elements;
                    e.phase = Phase::Ready;
                }
                self.clients_write()
                    .insert(addr, ClientPolicy::from(&attachment.policy));
                tracing::debug!(sandbox = %id, %addr, "network attached");
                Ok(attachment)
            }
            Err(e) => {
                // `build` applies the set elements last and atomically: none are in.
                let mut undone = self.remove_parts(id, addr, &Elements::default());
                if warm {
                    undone = undone.and(
                        netns::remove(&self.ready_path(addr))
                            .map_err(|e| BackendError::io("remove", self.ready_path(addr), e)),
                    );
                }
                let mut state = self.lock();
                state.entries.remove(id);
                if undone.is_ok() {
                    state.pool.put(addr);
                }
                Err(e)
            }
        }
    }

    /// Records the sandbox, puts its namespace in place (a ready one moved, or a new one
    /// made), and adds its set elements.
    fn build(&self, a: &NetAttachment, warm: bool) -> Result<Elements, BackendError> {
        let addr = a.address.addr();
        write_record(
            &self.record_path(&a.id),
            &Record {
                address: addr,
                policy: a.policy.clone(),
            },
        )?;
        let path = self.ns_path(&a.id);
        if warm {
            let ready = self.ready_path(addr);
            netns::move_mount(&ready, &path)
                .map_err(|e| BackendError::io("move a ready network namespace to", &path, e))?;
        } else {
            self.make_namespace(&path, addr)?;
        }
        let elements = Elements::of(&a.policy);
        self.change_sets(addr, &Elements::default(), &elements)?;
        Ok(elements)
    }

    /// Makes a network namespace pinned at `path`: `lo` up, `eth0` with `addr` and the
    /// default route, its peer a forwarding port of the bridge.
    fn make_namespace(&self, path: &Path, addr: Ipv4Addr) -> Result<(), BackendError> {
        let prefix = self.config.pool.prefix();
        let (ns, mut ns_nl) = netns::create(path)
            .map_err(|e| BackendError::io("create network namespace", path, e))?;
        let link = self.link_name(addr);
        let mut nl = Netlink::open().map_err(|e| nl_err("open netlink socket", "", e))?;
        nl.new_veth(
            &link,
            Some(self.bridge_index),
            SANDBOX_INTERFACE,
            ns.as_raw_fd(),
        )
        .map_err(|e| nl_err("create veth", &link, e))?;
        let host = nl
            .link_index(&link)
            .and_then(|i| i.ok_or_else(|| io::ErrorKind::NotFound.into()))
            .map_err(|e| nl_err("look up", &link, e))?;
        nl.set_up(host).map_err(|e| nl_err("set up", &link, e))?;
        let inside = |e| BackendError::io("configure eth0 in", path, e);
        let eth0 = ns_nl
            .link_index(SANDBOX_INTERFACE)
            .and_then(|i| i.ok_or_else(|| io::ErrorKind::NotFound.into()))
            .map_err(inside)?;
        ns_nl
            .add_addr(eth0, Ipv4Cidr::new(addr, prefix)?)
            .map_err(inside)?;
        ns_nl.set_up(eth0).map_err(inside)?;
        ns_nl
            .add_default_route(self.gateway, eth0)
            .map_err(inside)?;
        wait_forwarding(&link);
        Ok(())
    }

    /// Makes ready namespaces until there are [`LinuxNetConfig::ready_namespaces`], at most
    /// `at_most` of them, while the pool has addresses; returns how many it made.
    fn fill_ready(&self, at_most: usize) -> Result<usize, BackendError> {
        let _one_at_a_time = self
            .filling
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut made = 0;
        loop {
            let addr = {
                let mut state = self.lock();
                if made >= at_most || state.ready.len() >= self.config.ready_namespaces {
                    return Ok(made);
                }
                // A full pool is not the filler's failure: sandboxes took the addresses.
                match state.pool.take() {
                    Ok(addr) => addr,
                    Err(_) => return Ok(made),
                }
            };
            let path = self.ready_path(addr);
            if let Err(e) = self.make_namespace(&path, addr) {
                let link = self.link_name(addr);
                let undone = Netlink::open()
                    .and_then(|mut nl| nl.del_link(&link))
                    .and_then(|_| netns::remove(&path));
                if undone.is_ok() {
                    self.lock().pool.put(addr);
                }
                return Err(e);
            }
            self.lock().ready.push(addr);
            made += 1;
        }
    }

    /// Removes everything of one sandbox; tries every step and reports the first failure.
    fn remove_parts(
        &self,
        id: &SandboxId,
        addr: Ipv4Addr,
        elements: &Elements,
    ) -> Result<(), BackendError> {
        // First, so that no answer of the DNS forwarder adds to what is removed below.
        self.clients_write().remove(&addr);
        let mut results = Vec::new();
        let link = self.link_name(addr);
        // Deleting the host end takes the sandbox end with it at once, rather than when the
        // kernel gets round to freeing the namespace.
        results.push(
            Netlink::open()
                .and_then(|mut nl| nl.del_link(&link))
                .map(drop)
                .map_err(|e| nl_err("delete veth", &link, e)),
        );
        let path = self.ns_path(id);
        results.push(
            netns::remove(&path)
                .map_err(|e| BackendError::io("remove network namespace", &path, e)),
        );
        results.push(self.change_sets(addr, elements, &Elements::default()));
        // After the link is gone, so the rule that renews an element on traffic cannot
        // bring one back.
        results.push(self.flush_resolved(addr));
        // After the link is gone, so no new entry can appear.
        results.push(delete_flows(|f| f.involves(addr)));
        let record = self.record_path(id);
        results.push(match fs::remove_file(&record) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(BackendError::io("remove", &record, e))
            }
            _ => Ok(()),
        });
        results.into_iter().collect()
    }

    /// Opens `addrs` to the sandbox at `client` for the time each comes with, if its
    /// current patterns still allow `name`. A destination it already holds open for longer
    /// is left alone; one it holds for less is deleted and added again in the same
    /// transaction (some kernels keep an element's old timeout on a second add).
    fn resolved(
        &self,
        client: Ipv4Addr,
        name: &str,
        addrs: &[(Ipv4Addr, Duration)],
    ) -> Result<(), BackendError> {
        let mut all = self.resolved_lock();
        let allowed = self
            .clients_read()
            .get(&client)
            .is_some_and(|p| p.allows(name));
        if !allowed {
            return Ok(());
        }
        let now = Instant::now();
        let held = all.entry(client).or_default();
        held.retain(|_, until| *until > now);
        let key = |dst: Ipv4Addr| [client.octets(), dst.octets()].concat();
        let (mut deletes, mut adds) = (Vec::new(), Vec::new());
        for &(dst, ttl) in addrs {
            let until = now + ttl;
            match held.get(&dst) {
                Some(old) if *old >= until => continue,
                // A second's margin, so it cannot expire before the delete reaches it.
                Some(old) if *old > now + Duration::from_secs(1) => {
                    deletes.push(SetElement::key(key(dst)));
                }
                Some(_) => {}
                None if held.len() >= MAX_RESOLVED_PER_SANDBOX => {
                    tracing::debug!(%client, %dst, "too many resolved destinations, not opened");
                    continue;
                }
                None => {}
            }
            adds.push(SetElement {
                timeout: Some(ttl),
                ..SetElement::key(key(dst))
            });
            held.insert(dst, until);
        }
        if adds.is_empty() {
            return Ok(());
        }
        let changes: Vec<SetChange> = chunked(false, deletes)
            .into_iter()
            .chain(chunked(true, adds.clone()))
            .collect();
        let table = &self.config.table;
        let applied = Netlink::open_netfilter().and_then(|mut nl| {
            match nl.change_sets(table, &changes) {
                // One expired after all: adding alone is enough for it.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    nl.change_sets(table, &chunked(true, adds.clone()))
                }
                r => r,
            }
        });
        if let Err(e) = applied {
            for a in &adds {
                if let Some(dst) = a.key.get(4..8).and_then(|b| <[u8; 4]>::try_from(b).ok()) {
                    held.remove(&Ipv4Addr::from(dst));
                }
            }
            return Err(nl_err(
                "add resolved destinations of",
                &client.to_string(),
                e,
            ));
        }
        tracing::debug!(%client, name, count = adds.len(), "resolved destinations opened");
        Ok(())
    }

    /// Deletes every element of the sandbox at `addr` from the resolved set: those the
    /// driver added and those a restart carried over, as the kernel lists them.
    fn flush_resolved(&self, addr: Ipv4Addr) -> Result<(), BackendError> {
        let mut all = self.resolved_lock();
        all.remove(&addr);
        let err = |e| nl_err("flush the resolved destinations of", &addr.to_string(), e);
        let mut nl = Netlink::open_netfilter().map_err(err)?;
        // Done when a listing finds none. An element can expire between a listing and the
        // delete, which fails the whole transaction; and a packet of a live sandbox that
        // matched an element just before its delete can renew it back in (the renewing
        // rule adds what it updates). The next round lists again either way.
        for _ in 0..4 {
            let mine: Vec<SetElement> = nl
                .set_elements(&self.config.table, RESOLVED_SET)
                .map_err(err)?
                .into_iter()
                .filter(|e| e.key.get(..4) == Some(&addr.octets()[..]))
                .map(|e| SetElement::key(e.key))
                .collect();
            if mine.is_empty() {
                return Ok(());
            }
            match nl.change_sets(&self.config.table, &chunked(false, mine)) {
                Err(e) if e.raw_os_error() != Some(libc::ENOENT) => return Err(err(e)),
                _ => {}
            }
        }
        Err(err(io::Error::other("elements keep coming back")))
    }

    fn update_policy(
        &self,
        id: &SandboxId,
        policy: &EgressPolicy,
    ) -> Result<NetAttachment, BackendError> {
        policy.validate()?;
        let (attachment, domains_changed) = {
            // Held across the nft call, so two updates cannot interleave their bookkeeping.
            let mut state = self.lock();
            let entry = ready(&mut state, id, "update the network policy of")?;
            let new = Elements::of(policy);
            let addr = entry.attachment.address.addr();
            self.change_sets(addr, &entry.elements, &new)?;
            let domains_changed = entry.attachment.policy.allow_domains != policy.allow_domains;
            entry.elements = new;
            entry.attachment.policy = policy.clone();
            // Before the flush below: an answer that arrives later is judged by the new
            // patterns.
            self.clients_write()
                .insert(addr, ClientPolicy::from(policy));
            write_record(
                &self.record_path(id),
                &Record {
                    address: addr,
                    policy: policy.clone(),
                },
            )?;
            (entry.attachment.clone(), domains_changed)
        };
        let addr = attachment.address.addr();
        // Unchanged patterns keep what their answers opened; changed ones start afresh (an
        // address an old pattern opened may not match any new one).
        let kept: BTreeSet<Ipv4Addr> = if domains_changed {
            self.flush_resolved(addr)?;
            BTreeSet::new()
        } else {
            self.resolved_lock()
                .get(&addr)
                .map(|m| m.keys().copied().collect())
                .unwrap_or_default()
        };
        flush_denied(addr, policy, &kept)?;
        Ok(attachment)
    }

    fn release(&self, id: &SandboxId) -> Result<(), BackendError> {
        let entry = {
            let mut state = self.lock();
            let entry = ready(&mut state, id, "release the network of")?.clone();
            state.entries.remove(id);
            entry
        };
        let addr = entry.attachment.address.addr();
        let result = self.remove_parts(id, addr, &entry.elements);
        let mut state = self.lock();
        match result {
            Ok(()) => {
                state.pool.put(addr);
                tracing::debug!(sandbox = %id, %addr, "network released");
                Ok(())
            }
            Err(e) => {
                // Kept (unconfirmed) so that a retry, or the next recovery, finishes the job;
                // the address is not reused meanwhile.
                state.entries.insert(
                    id.clone(),
                    Entry {
                        phase: Phase::Unconfirmed,
                        ..entry
                    },
                );
                Err(e)
            }
        }
    }

    fn list(&self) -> Vec<NetAttachment> {
        self.lock()
            .entries
            .values()
            .filter(|e| e.phase == Phase::Ready)
            .map(|e| e.attachment.clone())
            .collect()
    }

    fn recover(&self, live: &[SandboxId]) -> Result<Vec<NetAttachment>, BackendError> {
        let live: BTreeSet<&SandboxId> = live.iter().collect();
        let mut nl = Netlink::open().map_err(|e| nl_err("open netlink socket", "", e))?;
        let unconfirmed: Vec<Entry> = self
            .lock()
            .entries
            .values()
            .filter(|e| e.phase == Phase::Unconfirmed)
            .cloned()
            .collect();
        let mut adopted = Vec::new();
        let mut first_err = None;
        for entry in unconfirmed {
            let id = &entry.attachment.id;
            let addr = entry.attachment.address.addr();
            // A netlink error is not evidence that the link is gone: it fails the recovery
            // rather than tearing down a live sandbox's network.
            let link = self.link_name(addr);
            let has_link = nl
                .link_index(&link)
                .map_err(|e| nl_err("look up", &link, e))?
                .is_some();
            let intact = live.contains(id)
                && has_link
                && fs::File::open(self.ns_path(id)).is_ok_and(|f| netns::is_namespace(&f));
            if intact {
                if let Some(e) = self.lock().entries.get_mut(id) {
                    e.phase = Phase::Ready;
                }
                adopted.push(entry.attachment);
                continue;
            }
            let r = self.remove_parts(id, addr, &entry.elements);
            let mut state = self.lock();
            match r {
                Ok(()) => {
                    state.entries.remove(id);
                    state.pool.put(addr);
                    tracing::info!(sandbox = %id, %addr, "removed an orphaned sandbox network");
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        // Strays: namespace files and records with no entry, ports with no owner.
        let (known, links): (BTreeSet<String>, BTreeSet<String>) = {
            let state = self.lock();
            let ready_names = state.ready.iter().map(|a| {
                self.ready_path(*a)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
            let addrs = state
                .entries
                .values()
                .map(|e| e.attachment.address.addr())
                .chain(state.ready.iter().copied());
            (
                state
                    .entries
                    .keys()
                    .map(ToString::to_string)
                    .chain(ready_names)
                    .collect(),
                addrs.map(|a| self.link_name(a)).collect(),
            )
        };
        if let Ok(dir) = fs::read_dir(&self.config.run_dir) {
            for f in dir.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                let stem = name.strip_suffix(".json").unwrap_or(&name);
                if !known.contains(stem) {
                    if let Err(e) = remove_file_or_ns(&f.path()) {
                        first_err.get_or_insert(e);
                    }
                }
            }
        }
        let ports = nl.links().map_err(|e| nl_err("list links", "", e))?;
        for l in ports
            .iter()
            .filter(|l| l.master == Some(self.bridge_index) && !links.contains(&l.name))
        {
            tracing::info!(link = %l.name, "removed a stray sandbox link");
            if let Err(e) = nl.del_link(&l.name) {
                first_err.get_or_insert(nl_err("delete link", &l.name, e));
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(adopted),
        }
    }
}

impl Network for LinuxNet {
    fn probe() -> Result<Capabilities, BackendError> {
        Ok(probe())
    }

    async fn attach(&self, id: &SandboxId, spec: &NetSpec) -> Result<NetAttachment, BackendError> {
        let (inner, id, spec) = (self.inner.clone(), id.clone(), spec.clone());
        blocking(move || inner.attach(&id, &spec)).await
    }

    async fn update_policy(
        &self,
        id: &SandboxId,
        policy: &EgressPolicy,
    ) -> Result<NetAttachment, BackendError> {
        let (inner, id, policy) = (self.inner.clone(), id.clone(), policy.clone());
        blocking(move || inner.update_policy(&id, &policy)).await
    }

    async fn release(&self, id: &SandboxId) -> Result<(), BackendError> {
        let (inner, id) = (self.inner.clone(), id.clone());
        blocking(move || inner.release(&id)).await
    }

    async fn list(&self) -> Result<Vec<NetAttachment>, BackendError> {
        Ok(self.inner.list())
    }

    async fn recover(&self, live: &[SandboxId]) -> Result<Vec<NetAttachment>, BackendError> {
        let (inner, live) = (self.inner.clone(), live.to_vec());
        blocking(move || inner.recover(&live)).await
    }

    async fn blocked(&self) -> Result<Vec<BlockedEgress>, BackendError> {
        let inner = self.inner.clone();
        // The read keeps what it finds in `inner`, so a caller that goes away mid-read
        // (a select on shutdown) loses nothing: the next call takes it.
        blocking(move || inner.read_blocked()).await?;
        Ok(self.inner.take_blocked())
    }
}

/// The DNS forwarder's view of the driver: every attached sandbox is a client, and the
/// destinations its allowed names resolve to enter the resolved set with their answers'
/// TTLs. Errors are logged: the answer goes back to the sandbox either way.
impl Clients for LinuxNet {
    fn client(&self, addr: Ipv4Addr) -> Option<ClientPolicy> {
        self.inner.clients_read().get(&addr).cloned()
    }

    async fn resolved(&self, client: Ipv4Addr, name: &str, addrs: &[(Ipv4Addr, Duration)]) {
        let (inner, name, addrs) = (self.inner.clone(), name.to_owned(), addrs.to_vec());
        if let Err(e) = blocking(move || inner.resolved(client, &name, &addrs)).await {
            tracing::warn!(%client, error = %e, "resolved destinations not opened");
        }
    }
}

/// Set changes of `elements` to the resolved set, in messages of a bounded size.
fn chunked(add: bool, elements: Vec<SetElement>) -> Vec<SetChange> {
    elements
        .chunks(ELEMENTS_PER_MESSAGE)
        .map(|c| SetChange {
            set: RESOLVED_SET,
            add,
            elements: c.to_vec(),
        })
        .collect()
}

/// The entry of a sandbox whose network is made, or why not.
fn ready<'a>(
    state: &'a mut State,
    id: &SandboxId,
    op: &'static str,
) -> Result<&'a mut Entry, BackendError> {
    match state.entries.get_mut(id) {
        None => Err(BackendError::NotFound {
            kind: "sandbox network",
            id: id.to_string(),
        }),
        Some(e) if e.phase == Phase::Building => Err(BackendError::InvalidState {
            op,
            id: id.to_string(),
            reason: "its network is still being made".into(),
        }),
        Some(e) => Ok(e),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BackendError> + Send + 'static,
) -> Result<T, BackendError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BackendError::io("join a blocking network task", "", io::Error::other(e)))?
}

fn nl_err(op: &'static str, what: &str, e: io::Error) -> BackendError {
    BackendError::io(op, what, e)
}

/// The set changes that turn `old` into `new` for the sandbox at `addr`: deletions first,
/// so an element in both is deleted and added again within the one transaction.
fn set_changes(addr: Ipv4Addr, old: &Elements, new: &Elements) -> Vec<SetChange> {
    let a = addr.octets();
    let key = |c: &Ipv4Cidr| [a, c.network().octets()].concat();
    let key_end = |c: &Ipv4Cidr| [a, c.last().octets()].concat();
    let pairs = |list: &[Ipv4Cidr]| -> Vec<SetElement> {
        list.iter()
            .map(|c| SetElement {
                key_end: Some(key_end(c)),
                ..SetElement::key(key(c))
            })
            .collect()
    };
    let mut changes = Vec::new();
    for (add, e) in [(false, old), (true, new)] {
        if e.no_internet {
            changes.push(SetChange {
                set: "no_internet",
                add,
                elements: vec![SetElement::key(a.to_vec())],
            });
        }
        for (set, list) in [("allow_out", &e.allow), ("deny_out", &e.deny)] {
            if !list.is_empty() {
                changes.push(SetChange {
                    set,
                    add,
                    elements: pairs(list),
                });
            }
        }
    }
    changes
}

/// A locally administered unicast MAC derived from the bridge's name (FNV-1a), the same on
/// every start.
fn bridge_mac(name: &str) -> [u8; 6] {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let b = hash.to_be_bytes();
    [0x02, b[0], b[1], b[2], b[3], b[4]]
}

/// How long an attach waits for its bridge port to forward.
const PORT_READY: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits until the bridge forwards on `link`. The bridge enables a port only when the
/// kernel's link-watch work sees the veth's carrier, asynchronously and under the rtnl lock:
/// on a busy host that is tens to hundreds of milliseconds after the link came up, and a
/// sandbox's first SYN sent before then is dropped and retried a second later.
fn wait_forwarding(link: &str) {
    let state = format!("/sys/class/net/{link}/brport/state");
    let start = std::time::Instant::now();
    // 3 is BR_STATE_FORWARDING.
    while fs::read_to_string(&state)
        .map(|s| s.trim() != "3")
        .unwrap_or(true)
    {
        if start.elapsed() > PORT_READY {
            tracing::warn!(%link, "bridge port not forwarding after {PORT_READY:?}");
            return;
        }
        // This runs on a blocking thread, never on a tokio worker.
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(std::time::Duration::from_micros(500));
    }
    tracing::trace!(%link, waited = ?start.elapsed(), "bridge port forwarding");
}

/// Runs one `nft -f -` transaction.
/// Installs `nft` from the host's Debian repositories when it is missing, so that a fresh
/// machine needs nothing else; elsewhere says what to install.
/// apt-get waits this long for another apt or dpkg (an operator's, unattended-upgrades) to
/// release the package database instead of failing at once; well inside `command::INSTALL`.
const APT_LOCK_WAIT: [&str; 2] = ["-o", "DPkg::Lock::Timeout=300"];

fn ensure_nft() -> Result<(), BackendError> {
    let on_path = |program: &str| {
        std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .any(|dir| dir.join(program).is_file())
    };
    if on_path("nft") {
        return Ok(());
    }
    // SAFETY: geteuid cannot fail.
    if !on_path("apt-get") || unsafe { libc::geteuid() } != 0 {
        return Err(BackendError::Unsupported {
            op: "sandbox networking without nft (install nftables)",
            os: std::env::consts::OS,
        });
    }
    tracing::info!("nft is not installed; installing nftables with apt-get");
    let install = || {
        let mut cmd = Command::new("apt-get");
        cmd.args(["install", "-y", "-q", "--no-install-recommends", "nftables"])
            .args(APT_LOCK_WAIT)
            .env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    if command::run(install(), b"", command::INSTALL).is_err() {
        // A fresh machine may have no package lists yet.
        let mut update = Command::new("apt-get");
        update.args(["update", "-q"]).args(APT_LOCK_WAIT);
        command::run(update, b"", command::INSTALL)?;
        command::run(install(), b"", command::INSTALL)?;
    }
    Ok(())
}

fn nft(script: &str) -> Result<(), BackendError> {
    let mut cmd = Command::new("nft");
    cmd.args(["-f", "-"]);
    command::run(cmd, script.as_bytes(), HELPER).map(drop)
}

/// Deletes the conntrack entries `doomed` picks, in one walk of the table (its cost grows
/// with the table's size, not with the number of entries deleted).
fn delete_flows(doomed: impl Fn(&Flow) -> bool) -> Result<(), BackendError> {
    let mut nl = Netlink::open_netfilter().map_err(|e| nl_err("open a conntrack socket", "", e))?;
    let flows = nl
        .flows()
        .map_err(|e| nl_err("list conntrack entries", "", e))?;
    for f in flows.iter().filter(|f| doomed(f)) {
        nl.delete_flow(f)
            .map_err(|e| nl_err("delete a conntrack entry of", &f.orig.0.to_string(), e))?;
    }
    Ok(())
}

/// Deletes the conntrack entries of `addr` towards destinations `policy` now denies (and
/// that its domains do not keep open), so that nothing of a cut connection stays (the rules
/// already drop its packets both ways).
fn flush_denied(
    addr: Ipv4Addr,
    policy: &EgressPolicy,
    kept: &BTreeSet<Ipv4Addr>,
) -> Result<(), BackendError> {
    delete_flows(|f| f.orig.0 == addr && !policy.allows(f.orig.1) && !kept.contains(&f.orig.1))
}

/// The elements of the resolved set of a table that may exist from an earlier run; none if
/// it does not exist. An error loses them (the sandboxes resolve again), it does not stop
/// the start.
fn resolved_elements(table: &str) -> Vec<ListedElement> {
    match Netlink::open_netfilter().and_then(|mut nl| nl.set_elements(table, RESOLVED_SET)) {
        Ok(v) => v,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Vec::new(),
        Err(e) => {
            tracing::warn!(%table, error = %e, "could not read the resolved set; its elements are lost");
            Vec::new()
        }
    }
}

/// The destination and time left of an element of the resolved set, if it is `sandbox`'s
/// and has a second or more left.
fn resolved_key(e: &ListedElement, sandbox: Ipv4Addr) -> Option<(Ipv4Addr, Duration)> {
    let key: [u8; 8] = e.key.as_slice().try_into().ok()?;
    let left = e.expires?;
    let (mine, dst) = key.split_at(4);
    (mine == sandbox.octets() && left >= Duration::from_secs(1))
        .then(|| (Ipv4Addr::new(dst[0], dst[1], dst[2], dst[3]), left))
}

fn write_record(path: &Path, record: &Record) -> Result<(), BackendError> {
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec(record)
        .map_err(|e| BackendError::io("encode", path, io::Error::other(e)))?;
    fs::write(&tmp, bytes).map_err(|e| BackendError::io("write", &tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| BackendError::io("rename", path, e))
}

/// The records under `dir` that parse, with valid ids.
fn read_records(dir: &Path) -> Vec<(SandboxId, Record)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let id = SandboxId::new(name.strip_suffix(".json")?).ok()?;
            let record = serde_json::from_slice(&fs::read(e.path()).ok()?).ok()?;
            Some((id, record))
        })
        .collect()
}

/// Removes a record, a temporary file or a namespace file.
fn remove_file_or_ns(path: &Path) -> Result<(), BackendError> {
    let is_file = path.extension().is_some_and(|e| e == "json" || e == "tmp");
    if is_file {
        fs::remove_file(path).map_err(|e| BackendError::io("remove", path, e))
    } else {
        netns::remove(path).map_err(|e| BackendError::io("remove network namespace", path, e))
    }
}

/// One probed feature: what was found, or why it is missing.
type Found = Result<String, String>;

/// What [`Network::probe`] reports.
fn probe() -> Capabilities {
    let mut features = Vec::new();
    let mut feature = |name: &str, r: Result<String, String>| {
        let (available, detail) = match r {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        features.push(Capability {
            name: name.into(),
            available,
            detail,
        });
    };
    // A throwaway namespace: veth and bridge are tried inside it and vanish with it.
    let scratch = std::thread::scope(|s| {
        s.spawn(|| -> Result<(Found, Found, Found), String> {
            // SAFETY: affects only this thread, which ends right after.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(format!(
                    "unshare(CLONE_NEWNET): {}",
                    io::Error::last_os_error()
                ));
            }
            let mut nl = Netlink::open().map_err(|e| format!("netlink: {e}"))?;
            let bridge = nl
                .new_bridge("probe0")
                .and_then(|()| nl.link_index("probe0"))
                .map_err(|e| format!("create a bridge: {e}"))
                .and_then(|i| i.ok_or_else(|| "the new bridge is missing".to_owned()));
            let veth = match &bridge {
                Ok(b) => fs::File::open("/proc/thread-self/ns/net")
                    .and_then(|ns| nl.new_veth("probe1", Some(*b), "probe2", ns.as_raw_fd()))
                    .map(|()| "veth pairs can be made".to_owned())
                    .map_err(|e| format!("create a veth pair: {e}")),
                Err(e) => Err(format!("no bridge to try a veth on: {e}")),
            };
            // NFLOG groups are per namespace: binding one here takes none of the host's.
            let nflog = nflog::Reader::bind(LinuxNetConfig::DEFAULT_LOG_GROUP)
                .map(|_| "an NFLOG group can be bound".to_owned())
                .map_err(|e| format!("bind an NFLOG group: {e}"));
            Ok((
                bridge.map(|_| "bridges can be made".to_owned()),
                veth,
                nflog,
            ))
        })
        .join()
        .unwrap_or_else(|_| Err("probe thread panicked".into()))
    });
    match scratch {
        Ok((bridge, veth, nflog)) => {
            feature(
                "network-namespace",
                Ok("unshare(CLONE_NEWNET) works".into()),
            );
            feature("bridge", bridge);
            feature("veth", veth);
            feature("nflog", nflog);
        }
        Err(e) => {
            for name in ["network-namespace", "bridge", "veth", "nflog"] {
                feature(name, Err(e.clone()));
            }
        }
    }
    let check = "table inet coppice_probe {\n  chain p {\n    type nat hook postrouting priority srcnat; policy accept;\n    masquerade\n  }\n}\n";
    let mut cmd = Command::new("nft");
    cmd.args(["-c", "-f", "-"]);
    feature(
        "nftables",
        command::run(cmd, check.as_bytes(), HELPER)
            .map(|_| "nft accepts a NAT table".to_owned())
            .map_err(|e| e.to_string()),
    );
    feature(
        "conntrack",
        Netlink::open_netfilter()
            .and_then(|mut nl| nl.flows())
            .map(|f| format!("ctnetlink lists {} IPv4 entries", f.len()))
            .map_err(|e| format!("ctnetlink: {e}")),
    );
    Capabilities {
        driver: "linux-netns".into(),
        features,
    }
}
