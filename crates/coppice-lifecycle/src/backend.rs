//! The backend traits: one per platform role, exchanging only plain data.
//!
//! | role | trait | Linux driver | FreeBSD driver |
//! |---|---|---|---|
//! | jail | [`Isolation`] | namespaces + cgroups (`coppice-jail`) | jail(8) + jexec |
//! | bhyve | [`Machine`] | QEMU microVM | bhyve |
//! | ZFS | [`Storage`] | overlay layers, or zfs | zfs |
//! | network | [`Network`] | netns + veth + bridge + nftables (`coppice-net`) | VNET jail + epair + pf |
//!
//! Every operation an OS lacks returns [`BackendError::Unsupported`]; no trait item is behind a
//! `cfg`. Specs are validated by their constructors or by the backend, and bad specs come back
//! as [`BackendError::InvalidSpec`] before anything is created.

use std::fmt;
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// A sandbox id in E2B's format: 1 to 63 characters of `[a-z0-9]`.
///
/// The length bound keeps it usable as a hostname, a cgroup name and a dataset name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SandboxId(String);

impl SandboxId {
    /// Longest accepted id.
    pub const MAX_LEN: usize = 63;

    /// Validates `id` and wraps it.
    pub fn new(id: impl Into<String>) -> Result<Self, BackendError> {
        let id = id.into();
        let ok = !id.is_empty()
            && id.len() <= Self::MAX_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if ok {
            Ok(Self(id))
        } else {
            Err(BackendError::InvalidSpec {
                field: "sandbox id",
                reason: format!(
                    "{id:?} is not 1 to {} characters of [a-z0-9]",
                    Self::MAX_LEN
                ),
            })
        }
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for SandboxId {
    type Error = BackendError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<SandboxId> for String {
    fn from(id: SandboxId) -> Self {
        id.0
    }
}

/// The name of a read-only layer: a template (`base`) or a snapshot.
///
/// 1 to 63 characters of `[a-z0-9._-]`, starting with a letter or digit, so it is safe as a
/// directory name, a dataset name and a snapshot name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LayerId(String);

impl LayerId {
    /// Longest accepted layer name.
    pub const MAX_LEN: usize = 63;

    /// Validates `name` and wraps it.
    pub fn new(name: impl Into<String>) -> Result<Self, BackendError> {
        let name = name.into();
        let first_ok = name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        let ok = first_ok
            && name.len() <= Self::MAX_LEN
            && name.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
            });
        if ok {
            Ok(Self(name))
        } else {
            Err(BackendError::InvalidSpec {
                field: "layer id",
                reason: format!(
                    "{name:?} is not 1 to {} characters of [a-z0-9._-] starting with [a-z0-9]",
                    Self::MAX_LEN
                ),
            })
        }
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for LayerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for LayerId {
    type Error = BackendError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<LayerId> for String {
    fn from(id: LayerId) -> Self {
        id.0
    }
}

/// What a backend found it can do on this host, from its `probe()`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// The driver that probed, e.g. `linux-namespaces`, `overlay`, `zfs`.
    pub driver: String,
    /// One entry per feature the driver uses.
    pub features: Vec<Capability>,
}

/// One feature of a [`Capabilities`] report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capability {
    /// Short stable name, e.g. `user-namespace`, `cgroup-freezer`, `reflink`.
    pub name: String,
    /// Whether it works here.
    pub available: bool,
    /// What was found: a path, a version, or why it is missing.
    pub detail: String,
}

impl Capabilities {
    /// Whether the feature `name` was probed and is available.
    pub fn has(&self, name: &str) -> bool {
        self.features.iter().any(|c| c.name == name && c.available)
    }

    /// The features that are not available, for a skip or startup message.
    pub fn missing(&self) -> impl Iterator<Item = &Capability> {
        self.features.iter().filter(|c| !c.available)
    }
}

/// How a sandbox's root filesystem is assembled, as the storage role hands it to the
/// isolation role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RootfsSpec {
    /// An overlay for the isolation driver to mount inside the sandbox's own mount namespace.
    Overlay {
        /// Read-only layers, topmost first (overlayfs `lowerdir` order).
        lower: Vec<PathBuf>,
        /// The sandbox's private writable layer.
        upper: PathBuf,
        /// Overlayfs work directory on the same filesystem as `upper`.
        work: PathBuf,
    },
    /// A directory already holding the writable root (a ZFS clone's mountpoint), to be
    /// bind-mounted as the sandbox root.
    Directory(PathBuf),
}

/// A host path made visible inside a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindMount {
    /// Absolute host path (file or directory).
    pub source: PathBuf,
    /// Absolute path inside the sandbox; created if missing.
    pub target: PathBuf,
    /// Mount it read-only.
    pub read_only: bool,
}

/// The program that becomes PID 1 of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitSpec {
    /// Absolute path inside the sandbox (often a [`BindMount`] target).
    pub program: PathBuf,
    /// Arguments after `argv[0]`.
    pub args: Vec<String>,
    /// The complete environment.
    pub env: Vec<(String, String)>,
    /// Working directory inside the sandbox.
    pub cwd: PathBuf,
}

/// Resource limits; `None` leaves a resource unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Memory ceiling in bytes ([`Limits::MEMORY_RANGE`]).
    pub memory_bytes: Option<u64>,
    /// Maximum number of tasks ([`Limits::PIDS_RANGE`]).
    pub pids: Option<u32>,
    /// CPU bandwidth in thousandths of a core ([`Limits::CPU_MILLIS_RANGE`]).
    pub cpu_millis: Option<u32>,
}

impl Limits {
    /// Accepted memory limits: 16 MiB to 1 TiB.
    pub const MEMORY_RANGE: std::ops::RangeInclusive<u64> = (16 << 20)..=(1 << 40);
    /// Accepted task limits.
    pub const PIDS_RANGE: std::ops::RangeInclusive<u32> = 4..=4_194_304;
    /// Accepted CPU limits: a hundredth of a core to 1024 cores.
    pub const CPU_MILLIS_RANGE: std::ops::RangeInclusive<u32> = 10..=1_024_000;

    /// Checks every set limit against its range.
    pub fn validate(&self) -> Result<(), BackendError> {
        fn check<T: PartialOrd + fmt::Display>(
            field: &'static str,
            value: Option<T>,
            range: &std::ops::RangeInclusive<T>,
        ) -> Result<(), BackendError> {
            match value {
                Some(v) if !range.contains(&v) => Err(BackendError::InvalidSpec {
                    field,
                    reason: format!("{v} is outside {}..={}", range.start(), range.end()),
                }),
                _ => Ok(()),
            }
        }
        check("memory limit", self.memory_bytes, &Self::MEMORY_RANGE)?;
        check("pids limit", self.pids, &Self::PIDS_RANGE)?;
        check("cpu limit", self.cpu_millis, &Self::CPU_MILLIS_RANGE)
    }
}

/// Everything the isolation role needs to start a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailSpec {
    /// The sandbox id; also its hostname.
    pub id: SandboxId,
    /// The root filesystem, from [`Storage::create_rootfs`].
    pub rootfs: RootfsSpec,
    /// PID 1.
    pub init: InitSpec,
    /// Host paths to expose (the agent binary, the directory of its socket, ...).
    pub mounts: Vec<BindMount>,
    /// Resource limits.
    pub limits: Limits,
    /// A network namespace file to join (from [`NetAttachment::namespace`]) instead of a
    /// network stack of the sandbox's own, which has only a loopback. The namespace stays
    /// owned by the host, so sandbox root cannot change its interfaces, routes or filters.
    #[serde(default)]
    pub network: Option<PathBuf>,
}

/// Run state of an isolated sandbox as the backend sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Its processes run.
    Running,
    /// Its processes are frozen.
    Paused,
    /// PID 1 has exited; only `kill` (cleanup) remains.
    Exited,
}

/// A sandbox the isolation role knows, whether it started it or re-adopted it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailInfo {
    /// The sandbox id.
    pub id: SandboxId,
    /// Host pid of the sandbox's PID 1.
    pub pid: u32,
    /// Current run state.
    pub state: RunState,
    /// When it was started.
    pub started_at: SystemTime,
    /// The spec it was started with.
    pub spec: JailSpec,
}

/// Resource use of one sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceUsage {
    /// CPU time consumed by all its tasks, in nanoseconds.
    pub cpu_nanos: u64,
    /// Memory charged to it, in bytes.
    pub memory_bytes: u64,
    /// The part of `memory_bytes` that is page cache (file data the kernel can reclaim);
    /// 0 where the driver cannot tell.
    #[serde(default)]
    pub memory_cache_bytes: u64,
    /// Tasks (processes and threads) alive in it.
    pub tasks: u32,
    /// Times a new task was refused because the sandbox was at its task limit (a fork that
    /// failed), since it started; 0 where the driver cannot count them.
    #[serde(default)]
    pub tasks_refused: u64,
    /// Processes the kernel killed for the sandbox's memory limit, since it started; 0
    /// where the driver cannot count them.
    #[serde(default)]
    pub oom_kills: u64,
}

/// The jail role: isolated process trees with limits, freezing and teardown.
///
/// Implementations record enough identity to re-adopt their sandboxes from a new process:
/// a sandbox outlives the process that started it until [`Isolation::kill`].
pub trait Isolation: Send + Sync + 'static {
    /// Reports what this host supports for this driver.
    fn probe() -> Result<Capabilities, BackendError>
    where
        Self: Sized;

    /// Starts a sandbox; resolves once its PID 1 has exec'd `spec.init.program`.
    fn start(&self, spec: JailSpec) -> impl Future<Output = Result<JailInfo, BackendError>> + Send;

    /// Freezes every process of the sandbox; a no-op if already paused.
    fn pause(&self, id: &SandboxId) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Thaws a paused sandbox; a no-op if it runs.
    fn resume(&self, id: &SandboxId) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Kills every process of the sandbox and removes what the driver created for it (not
    /// its storage: the caller removes the rootfs through [`Storage::remove_rootfs`]).
    fn kill(&self, id: &SandboxId) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Sandboxes this driver knows, including those started by an earlier process.
    fn list(&self) -> impl Future<Output = Result<Vec<JailInfo>, BackendError>> + Send;

    /// One sandbox.
    fn info(&self, id: &SandboxId) -> impl Future<Output = Result<JailInfo, BackendError>> + Send;

    /// Current resource use.
    fn usage(
        &self,
        id: &SandboxId,
    ) -> impl Future<Output = Result<ResourceUsage, BackendError>> + Send;
}

/// Everything the machine role needs to boot a microVM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineSpec {
    /// The sandbox id.
    pub id: SandboxId,
    /// Guest kernel image.
    pub kernel: PathBuf,
    /// Optional initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Root disk image, owned by the sandbox (a clone from storage).
    pub disk: PathBuf,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Host unix socket on which the guest agent is reachable.
    pub agent_socket: PathBuf,
}

/// The bhyve role: sandboxes as virtual machines.
pub trait Machine: Send + Sync + 'static {
    /// Reports what this host supports (hardware acceleration, vsock, ...).
    fn probe() -> Result<Capabilities, BackendError>
    where
        Self: Sized;

    /// Boots a VM; resolves once its agent socket accepts connections.
    fn boot(
        &self,
        spec: MachineSpec,
    ) -> impl Future<Output = Result<RunState, BackendError>> + Send;

    /// Suspends the VM's vCPUs; a no-op if already paused.
    fn pause(&self, id: &SandboxId) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Resumes the VM's vCPUs; a no-op if it runs.
    fn resume(&self, id: &SandboxId) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Powers the VM off and frees its resources.
    fn destroy(&self, id: &SandboxId) -> impl Future<Output = Result<(), BackendError>> + Send;
}

/// A read-only layer as storage reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    /// Its name.
    pub id: LayerId,
    /// The layer below it (a snapshot's template chain), if any.
    pub parent: Option<LayerId>,
    /// Whether it is a template or a sandbox snapshot.
    pub kind: LayerKind,
    /// Bytes it occupies on disk by itself.
    pub disk_bytes: u64,
}

/// What made a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerKind {
    /// Imported from a root filesystem tree.
    Template,
    /// Frozen from a sandbox's writable layer.
    Snapshot,
}

/// Disk use of one sandbox's writable layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskUsage {
    /// Bytes allocated for the sandbox's own changes.
    pub written_bytes: u64,
    /// Bytes of the read-only layers beneath it, shared with other sandboxes.
    pub shared_bytes: u64,
}

/// The ZFS role: immutable layers and per-sandbox copy-on-write roots.
///
/// Layers are immutable once made. A layer that a sandbox or another layer depends on cannot
/// be deleted. A crash during any operation leaves nothing that later looks valid.
pub trait Storage: Send + Sync + 'static {
    /// Reports what this host supports for this driver.
    fn probe() -> Result<Capabilities, BackendError>
    where
        Self: Sized;

    /// Seals the directory tree at `source` as the template layer `name`; `source` is not
    /// modified and may be removed afterwards.
    fn import_template(
        &self,
        name: &LayerId,
        source: &std::path::Path,
    ) -> impl Future<Output = Result<LayerInfo, BackendError>> + Send;

    /// Gives `sandbox` a private writable root over `base` (a template or a snapshot: a
    /// fork is a rootfs over a snapshot).
    fn create_rootfs(
        &self,
        sandbox: &SandboxId,
        base: &LayerId,
    ) -> impl Future<Output = Result<RootfsSpec, BackendError>> + Send;

    /// The root of an existing sandbox, for re-adoption.
    fn rootfs(
        &self,
        sandbox: &SandboxId,
    ) -> impl Future<Output = Result<RootfsSpec, BackendError>> + Send;

    /// Freezes the sandbox's current writable layer into the new read-only layer `name`.
    /// The caller pauses the sandbox first so the copy is consistent.
    fn snapshot(
        &self,
        sandbox: &SandboxId,
        name: &LayerId,
    ) -> impl Future<Output = Result<LayerInfo, BackendError>> + Send;

    /// Removes a sandbox's writable layer. Snapshots taken from it stay valid.
    fn remove_rootfs(
        &self,
        sandbox: &SandboxId,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Deletes a layer; refused with [`BackendError::InUse`] while anything depends on it.
    fn delete_layer(&self, id: &LayerId) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// All layers.
    fn layers(&self) -> impl Future<Output = Result<Vec<LayerInfo>, BackendError>> + Send;

    /// Sandboxes that have a writable root.
    fn sandboxes(&self) -> impl Future<Output = Result<Vec<SandboxId>, BackendError>> + Send;

    /// Disk use of one sandbox.
    fn usage(
        &self,
        sandbox: &SandboxId,
    ) -> impl Future<Output = Result<DiskUsage, BackendError>> + Send;
}

/// An IPv4 network in CIDR notation, e.g. `198.51.100.0/24`; a bare address is a `/32`.
///
/// The address is kept as given (host bits are not cleared); [`Ipv4Cidr::network`] gives the
/// network address. IPv4 only for now: the network role does not route IPv6 yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Cidr {
    /// `addr/prefix`; a prefix above 32 is [`BackendError::InvalidSpec`].
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, BackendError> {
        if prefix > 32 {
            return Err(BackendError::InvalidSpec {
                field: "cidr",
                reason: format!("prefix /{prefix} is longer than 32 bits"),
            });
        }
        Ok(Self { addr, prefix })
    }

    /// The address as given.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The prefix length, 0 to 32.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The netmask as a number.
    pub fn mask(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0)
    }

    /// The network address (host bits cleared).
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    /// The last address of the network.
    pub fn last(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network()) | !self.mask())
    }

    /// The same network with host bits cleared.
    pub fn normalized(&self) -> Self {
        Self {
            addr: self.network(),
            prefix: self.prefix,
        }
    }

    /// Whether `ip` is inside this network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
    }

    /// Whether the two networks share at least one address.
    pub fn overlaps(&self, other: &Ipv4Cidr) -> bool {
        self.contains(other.network()) || other.contains(self.network())
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = BackendError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| BackendError::InvalidSpec {
            field: "cidr",
            reason: format!("{s:?} is not an IPv4 address or CIDR: {why}"),
        };
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (
                a,
                p.parse::<u8>()
                    .map_err(|_| bad("the prefix is not a number"))?,
            ),
            None => (s, 32),
        };
        let addr = addr
            .parse::<Ipv4Addr>()
            .map_err(|_| bad("the address does not parse"))?;
        Self::new(addr, prefix).map_err(|_| bad("the prefix is longer than 32 bits"))
    }
}

impl TryFrom<String> for Ipv4Cidr {
    type Error = BackendError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Ipv4Cidr> for String {
    fn from(c: Ipv4Cidr) -> Self {
        c.to_string()
    }
}

impl From<Ipv4Addr> for Ipv4Cidr {
    fn from(addr: Ipv4Addr) -> Self {
        Self { addr, prefix: 32 }
    }
}

/// A sandbox's egress policy, with E2B's semantics.
///
/// A packet from the sandbox to `dst` is allowed if `dst` is in `allow_out`; otherwise it is
/// denied if `dst` is in `deny_out` or if `allow_internet` is false (which denies `0.0.0.0/0`);
/// otherwise allowed. So `allow_out` always wins over `deny_out`. Operator-wide limits (cloud
/// metadata, the host's own addresses, other sandboxes, an egress allow-list) apply before
/// this policy and cannot be lifted by it.
///
/// `allow_domains` are `allowOut`'s domain entries: an address a sandbox resolved for a
/// matching name through the network role's DNS forwarder counts as in `allow_out` for as
/// long as the answer lives. [`EgressPolicy::allows`] cannot know those addresses, so it
/// judges IPs and CIDRs only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressPolicy {
    /// E2B's `allowInternetAccess`; false denies every destination not in `allow_out`.
    pub allow_internet: bool,
    /// E2B's `network.allowOut` (IPs and CIDRs).
    pub allow_out: Vec<Ipv4Cidr>,
    /// E2B's `network.denyOut` (IPs and CIDRs).
    pub deny_out: Vec<Ipv4Cidr>,
    /// E2B's `network.allowOut` domain entries, each `example.com` (that name only) or
    /// `*.example.com` (every name under it, not `example.com` itself), in the form
    /// [`EgressPolicy::domain`] returns.
    #[serde(default)]
    pub allow_domains: Vec<String>,
}

impl Default for EgressPolicy {
    /// E2B's default: internet allowed, no lists.
    fn default() -> Self {
        Self {
            allow_internet: true,
            allow_out: Vec::new(),
            deny_out: Vec::new(),
            allow_domains: Vec::new(),
        }
    }
}

impl EgressPolicy {
    /// Longest domain entry, without its `*.`: the longest DNS name in text form.
    pub const MAX_DOMAIN_LEN: usize = 253;

    /// Whether a connection to `dst` is allowed by this policy's addresses alone (not by an
    /// address resolved for one of its domains).
    pub fn allows(&self, dst: Ipv4Addr) -> bool {
        if self.allow_out.iter().any(|c| c.contains(dst)) {
            return true;
        }
        self.allow_internet && !self.deny_out.iter().any(|c| c.contains(dst))
    }

    /// Checks one `allowOut` domain entry and returns it in the form `allow_domains` holds:
    /// ASCII lowercased (DNS names compare without case) and without a trailing dot. An
    /// entry is a hostname (labels of 1 to 63 letters, digits and inner hyphens, 253
    /// characters at most, a last label that is not all digits, so `198.51.100.7` is never
    /// taken for a name) with an optional leading `*.`. The error names the entry.
    pub fn domain(entry: &str) -> Result<String, BackendError> {
        let bad = |why: String| BackendError::InvalidSpec {
            field: "allowed domain",
            reason: format!("{entry:?} is not a hostname or *.hostname: {why}"),
        };
        let lower = entry.to_ascii_lowercase();
        let name = lower.strip_suffix('.').unwrap_or(&lower);
        let host = name.strip_prefix("*.").unwrap_or(name);
        if host.is_empty() {
            return Err(bad("it is empty".into()));
        }
        if host.len() > Self::MAX_DOMAIN_LEN {
            return Err(bad(format!(
                "it is longer than {} characters",
                Self::MAX_DOMAIN_LEN
            )));
        }
        for label in host.split('.') {
            if label.is_empty() || label.len() > 63 {
                return Err(bad(format!("a label of {} characters", label.len())));
            }
            if let Some(c) = label
                .chars()
                .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
            {
                return Err(bad(format!("{c:?} in the label {label:?}")));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(bad(format!("the label {label:?} starts or ends with '-'")));
            }
        }
        if host
            .rsplit('.')
            .next()
            .is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(bad("its last label is all digits".into()));
        }
        Ok(name.to_owned())
    }

    /// Checks the parts of the policy a deserializer cannot: every `allow_domains` entry is
    /// in [`EgressPolicy::domain`]'s form. The error names the first bad entry.
    pub fn validate(&self) -> Result<(), BackendError> {
        for d in &self.allow_domains {
            if Self::domain(d)? != *d {
                return Err(BackendError::InvalidSpec {
                    field: "allowed domain",
                    reason: format!("{d:?} is not lowercase without a trailing dot"),
                });
            }
        }
        Ok(())
    }
}

/// What a sandbox asks of the network role when it is created.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSpec {
    /// Its egress policy.
    pub policy: EgressPolicy,
}

/// A sandbox's network as the network role made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetAttachment {
    /// The sandbox.
    pub id: SandboxId,
    /// Its address and the prefix of its network, e.g. `198.51.100.130/26`.
    pub address: Ipv4Cidr,
    /// The host side's address: the sandbox's default route.
    pub gateway: Ipv4Addr,
    /// The resolver the sandbox's `/etc/resolv.conf` should name.
    pub dns: Ipv4Addr,
    /// A file the isolation role joins instead of making a network stack of its own (a
    /// network namespace file); `None` where the driver hands over an interface instead.
    pub namespace: Option<PathBuf>,
    /// The sandbox-side interface: already inside `namespace` when there is one, otherwise
    /// the interface the isolation role moves into the sandbox's network stack.
    pub interface: String,
    /// The egress policy in force.
    pub policy: EgressPolicy,
}

/// Why the network role blocked a sandbox's packet: which of its limits the destination hit.
///
/// Operator limits come first, so a destination that is both the host's and denied by the
/// policy is reported as `Host`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockReason {
    /// The sandbox's own [`EgressPolicy`] denies it (`deny_out`, or no internet access).
    Policy,
    /// Outside the operator's egress allow-list.
    Operator,
    /// Cloud metadata, 169.254.0.0/16, which the operator has not opened.
    Metadata,
    /// One of the host's own addresses (other than the DNS port on the gateway).
    Host,
    /// Another sandbox.
    Sandbox,
}

impl BlockReason {
    /// Every reason.
    pub const ALL: [Self; 5] = [
        Self::Policy,
        Self::Operator,
        Self::Metadata,
        Self::Host,
        Self::Sandbox,
    ];

    /// A short stable name: `policy`, `operator`, `metadata`, `host`, `sandbox`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Policy => "policy",
            Self::Operator => "operator",
            Self::Metadata => "metadata",
            Self::Host => "host",
            Self::Sandbox => "sandbox",
        }
    }

    /// The reason named `name` by [`BlockReason::as_str`].
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

impl fmt::Display for BlockReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The transport of a blocked packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpProtocol {
    /// TCP (6).
    Tcp,
    /// UDP (17).
    Udp,
    /// ICMP (1).
    Icmp,
    /// Any other IP protocol, by number.
    Other(u8),
}

impl IpProtocol {
    /// The protocol with IP protocol number `n`.
    pub fn from_number(n: u8) -> Self {
        match n {
            1 => Self::Icmp,
            6 => Self::Tcp,
            17 => Self::Udp,
            n => Self::Other(n),
        }
    }

    /// Its IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Self::Icmp => 1,
            Self::Tcp => 6,
            Self::Udp => 17,
            Self::Other(n) => n,
        }
    }

    /// `tcp`, `udp`, `icmp`, or `other`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Icmp => "icmp",
            Self::Other(_) => "other",
        }
    }
}

/// A sandbox's attempt to open a connection that the network role blocked, as the kernel
/// reported it: the raw material of a `security.violation` event.
///
/// Reports are a rate-limited sample (a driver passes on a few per second per sandbox), not
/// a count of every blocked packet; a flood of attempts yields a handful of these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockedEgress {
    /// The sandbox that sent it.
    pub id: SandboxId,
    /// Where it was going.
    pub destination: Ipv4Addr,
    /// The destination port, for TCP and UDP (not for ICMP or a later fragment).
    pub port: Option<u16>,
    /// Its transport.
    pub protocol: IpProtocol,
    /// Which limit blocked it.
    pub reason: BlockReason,
}

/// The network role: each sandbox's network stack, owned by the host, with egress through
/// the host's routes under an [`EgressPolicy`].
///
/// The driver owns everything it makes (interfaces, addresses, routes, filter rules) so that
/// root inside a sandbox cannot change it. Attachments outlive the process that made them
/// until [`Network::release`]; a new process takes them back with [`Network::recover`].
pub trait Network: Send + Sync + 'static {
    /// Reports what this host supports for this driver.
    fn probe() -> Result<Capabilities, BackendError>
    where
        Self: Sized;

    /// Gives `id` a network stack with an address from the pool, a default route through the
    /// host and `spec.policy` in force. A failure leaves nothing behind.
    fn attach(
        &self,
        id: &SandboxId,
        spec: &NetSpec,
    ) -> impl Future<Output = Result<NetAttachment, BackendError>> + Send;

    /// Replaces the whole egress policy of `id`; connections it now denies stop at once.
    fn update_policy(
        &self,
        id: &SandboxId,
        policy: &EgressPolicy,
    ) -> impl Future<Output = Result<NetAttachment, BackendError>> + Send;

    /// Removes everything made for `id` and returns its address to the pool.
    fn release(&self, id: &SandboxId) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// The attachments this driver holds.
    fn list(&self) -> impl Future<Output = Result<Vec<NetAttachment>, BackendError>> + Send;

    /// After a restart: takes back the attachments of `live` sandboxes that survived and
    /// removes everything else the driver owns. Returns what it took back.
    fn recover(
        &self,
        live: &[SandboxId],
    ) -> impl Future<Output = Result<Vec<NetAttachment>, BackendError>> + Send;

    /// Waits for the next reports of blocked egress and returns them, at least one; or an
    /// empty list after about a second without any, so a caller's loop can check for
    /// shutdown. Meant for one consumer that calls it in a loop from after
    /// [`Network::recover`] on; a driver keeps reports from its first call on, and those
    /// that arrive while nobody waits are kept for the next call (up to a bound; a driver
    /// counts what it had to drop). Reports are a sample, limited per sandbox (see
    /// [`BlockedEgress`]). A driver that cannot observe its drops returns
    /// [`BackendError::Unsupported`].
    fn blocked(&self) -> impl Future<Output = Result<Vec<BlockedEgress>, BackendError>> + Send;
}

/// The one error type of every backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// A spec or argument is malformed or out of range.
    #[error("invalid {field}: {reason}")]
    InvalidSpec {
        /// What was wrong, e.g. `sandbox id`, `memory limit`.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The named thing does not exist.
    #[error("{kind} {id:?} not found")]
    NotFound {
        /// `sandbox`, `layer`, `template`, ...
        kind: &'static str,
        /// Its id.
        id: String,
    },
    /// The named thing exists already.
    #[error("{kind} {id:?} already exists")]
    AlreadyExists {
        /// `sandbox`, `layer`, ...
        kind: &'static str,
        /// Its id.
        id: String,
    },
    /// Refused because other things depend on it.
    #[error("{kind} {id:?} is in use by {}", dependents.join(", "))]
    InUse {
        /// `layer`, ...
        kind: &'static str,
        /// Its id.
        id: String,
        /// What depends on it (`sandbox x`, `layer y`).
        dependents: Vec<String>,
    },
    /// The operation does not fit the current state (e.g. snapshot of an exited sandbox).
    #[error("cannot {op} sandbox {id:?}: {reason}")]
    InvalidState {
        /// The operation.
        op: &'static str,
        /// The sandbox.
        id: String,
        /// Why not.
        reason: String,
    },
    /// This platform or driver cannot do this.
    #[error("{op} is not supported on {os}")]
    Unsupported {
        /// The operation.
        op: &'static str,
        /// The OS or driver that lacks it.
        os: &'static str,
    },
    /// A system call or file operation failed.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done, e.g. `create cgroup`, `mount overlay at`.
        op: &'static str,
        /// The path involved (empty when none).
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An external command (`zfs`, `debootstrap`, `jail`, ...) failed.
    #[error("{command} exited with {status}: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status, as text.
        status: String,
        /// The tail of what it wrote to stderr.
        stderr: String,
    },
    /// The sandbox's init could not be started; `stage` names the setup step that failed.
    #[error("sandbox {id:?} failed to start at {stage}")]
    Start {
        /// The sandbox.
        id: String,
        /// The setup step, e.g. `pivot_root`, `exec init`.
        stage: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl BackendError {
    /// Builds an [`BackendError::Io`] from an error and what was being done.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_ids_follow_e2b_format() {
        SandboxId::new("i1a2b3c4d5e6f7g8h9j0").unwrap();
        for bad in [
            "",
            "has-dash",
            "UPPER",
            "with space",
            "ünï",
            &"a".repeat(64),
        ] {
            let err = SandboxId::new(bad).unwrap_err();
            assert!(
                matches!(
                    err,
                    BackendError::InvalidSpec {
                        field: "sandbox id",
                        ..
                    }
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn layer_ids_are_path_safe() {
        for good in ["base", "code-interpreter-v1", "snap.1_a"] {
            LayerId::new(good).unwrap();
        }
        for bad in ["", ".hidden", "-x", "a/b", "..", "A", "a b"] {
            LayerId::new(bad).unwrap_err();
        }
    }

    #[test]
    fn ids_deserialize_with_validation() {
        let ok: SandboxId = serde_json::from_str("\"abc123\"").unwrap();
        assert_eq!(ok.as_str(), "abc123");
        serde_json::from_str::<SandboxId>("\"a-b\"").unwrap_err();
    }

    #[test]
    fn limits_are_range_checked() {
        Limits::default().validate().unwrap();
        let ok = Limits {
            memory_bytes: Some(512 << 20),
            pids: Some(256),
            cpu_millis: Some(1500),
        };
        ok.validate().unwrap();
        let low_mem = Limits {
            memory_bytes: Some(1024),
            ..Limits::default()
        };
        assert!(matches!(
            low_mem.validate(),
            Err(BackendError::InvalidSpec {
                field: "memory limit",
                ..
            })
        ));
        let zero_pids = Limits {
            pids: Some(0),
            ..Limits::default()
        };
        assert!(matches!(
            zero_pids.validate(),
            Err(BackendError::InvalidSpec {
                field: "pids limit",
                ..
            })
        ));
        let no_cpu = Limits {
            cpu_millis: Some(1),
            ..Limits::default()
        };
        assert!(matches!(
            no_cpu.validate(),
            Err(BackendError::InvalidSpec {
                field: "cpu limit",
                ..
            })
        ));
    }

    #[test]
    fn capabilities_report_missing_features() {
        let caps = Capabilities {
            driver: "test".into(),
            features: vec![
                Capability {
                    name: "a".into(),
                    available: true,
                    detail: String::new(),
                },
                Capability {
                    name: "b".into(),
                    available: false,
                    detail: "absent".into(),
                },
            ],
        };
        assert!(caps.has("a"));
        assert!(!caps.has("b"));
        assert!(!caps.has("c"));
        assert_eq!(
            caps.missing().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            ["b"]
        );
    }

    #[test]
    fn cidrs_parse_and_compare() {
        let c: Ipv4Cidr = "198.51.100.130/26".parse().unwrap();
        assert_eq!(c.network(), Ipv4Addr::new(198, 51, 100, 128));
        assert_eq!(c.last(), Ipv4Addr::new(198, 51, 100, 191));
        assert!(c.contains(Ipv4Addr::new(198, 51, 100, 190)));
        assert!(!c.contains(Ipv4Addr::new(198, 51, 100, 192)));
        let host: Ipv4Cidr = "198.51.100.7".parse().unwrap();
        assert_eq!(host.prefix(), 32);
        let all: Ipv4Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(203, 0, 113, 1)) && all.overlaps(&c));
        assert!(!c.overlaps(&"198.51.100.0/26".parse().unwrap()));
        for bad in ["", "198.51.100.1/33", "198.51.100/24", "x/1", "1.2.3.4/"] {
            assert!(bad.parse::<Ipv4Cidr>().is_err(), "{bad}");
        }
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(json, "\"198.51.100.130/26\"");
        assert_eq!(serde_json::from_str::<Ipv4Cidr>(&json).unwrap(), c);
    }

    #[test]
    fn block_reasons_and_protocols_have_stable_names() {
        for r in BlockReason::ALL {
            assert_eq!(BlockReason::from_name(r.as_str()), Some(r));
            assert_eq!(r.to_string(), r.as_str());
        }
        assert_eq!(BlockReason::from_name("dns"), None);
        for n in [1, 6, 17, 47] {
            assert_eq!(IpProtocol::from_number(n).number(), n);
        }
        assert_eq!(IpProtocol::from_number(6).as_str(), "tcp");
        assert_eq!(IpProtocol::from_number(47), IpProtocol::Other(47));
    }

    #[test]
    fn allow_out_wins_over_deny_out() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let cidr = |s: &str| s.parse::<Ipv4Cidr>().unwrap();
        assert!(EgressPolicy::default().allows(ip("198.51.100.1")));
        let closed = EgressPolicy {
            allow_internet: false,
            allow_out: vec![cidr("198.51.100.64/28")],
            deny_out: vec![],
            allow_domains: vec![],
        };
        assert!(closed.allows(ip("198.51.100.65")));
        assert!(!closed.allows(ip("198.51.100.1")));
        let both = EgressPolicy {
            allow_internet: true,
            allow_out: vec![cidr("198.51.100.66")],
            deny_out: vec![cidr("198.51.100.64/28")],
            allow_domains: vec![],
        };
        assert!(both.allows(ip("198.51.100.66")));
        assert!(!both.allows(ip("198.51.100.67")));
        assert!(both.allows(ip("198.51.100.1")));
    }

    #[test]
    fn domain_entries_are_hostnames_with_an_optional_wildcard() {
        for (entry, form) in [
            ("example.com", "example.com"),
            ("Example.COM.", "example.com"),
            ("*.example.com", "*.example.com"),
            ("a-1.b2.test", "a-1.b2.test"),
            ("localhost", "localhost"),
            ("x.123abc", "x.123abc"),
        ] {
            assert_eq!(EgressPolicy::domain(entry).unwrap(), form, "{entry}");
        }
        let long = format!("{}.com", vec!["a".repeat(63); 4].join("."));
        for bad in [
            "",
            ".",
            "*.",
            "*",
            "**.example.com",
            "a.*.example.com",
            "example..com",
            ".example.com",
            "-a.example.com",
            "a-.example.com",
            "exa_mple.com",
            "exam ple.com",
            "bücher.de",
            "198.51.100.7",
            "198.51.100.0/24",
            "example.com:443",
            &"a".repeat(64),
            &long,
        ] {
            let r = EgressPolicy::domain(bad);
            assert!(
                matches!(&r, Err(BackendError::InvalidSpec { field: "allowed domain", reason })
                    if reason.contains(&format!("{bad:?}"))),
                "{bad:?}: {r:?}"
            );
        }
    }

    #[test]
    fn a_policy_holds_domains_only_in_their_checked_form() {
        let mut p = EgressPolicy {
            allow_domains: vec!["example.com".into(), "*.example.org".into()],
            ..EgressPolicy::default()
        };
        p.validate().unwrap();
        p.allow_domains.push("Example.net".into());
        assert!(matches!(
            p.validate(),
            Err(BackendError::InvalidSpec { reason, .. }) if reason.contains("Example.net")
        ));
        // Records written before domains existed still read.
        let old = r#"{"allow_internet":false,"allow_out":[],"deny_out":[]}"#;
        let p: EgressPolicy = serde_json::from_str(old).unwrap();
        assert!(p.allow_domains.is_empty() && !p.allow_internet);
    }
}
