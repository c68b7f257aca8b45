//! Sandboxes made of the platform roles: a root from storage, isolation from the jail, and the
//! agent as PID 1 listening on a unix socket in a host directory bind-mounted into the sandbox.
//!
//! This is the one place that composes the backends; handlers above it see only sandbox ids.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use coppice_jail::{JailConfig, LinuxJail};
use coppice_lifecycle::backend::{
    BackendError, BindMount, DiskUsage, EgressPolicy, InitSpec, Isolation, JailSpec, LayerId,
    Limits, NetSpec, Network, ResourceUsage, RunState, SandboxId, Storage,
};
use coppice_net::dns::{Forwarder, ForwarderConfig};
use coppice_net::{LinuxNet, LinuxNetConfig};
use coppice_zfs::template::TemplateBuilder;
use coppice_zfs::OverlayStorage;
use http_body_util::{BodyExt, Full};
use tokio::sync::Mutex;

use crate::config::NetworkConfig;

/// Where the agent's socket directory appears inside every sandbox.
const SANDBOX_RUN_DIR: &str = "/run/coppice";
/// Where the agent binary appears inside every sandbox; its name makes a multi-call binary
/// (the gateway itself) run as the agent.
const SANDBOX_AGENT: &str = "/usr/local/bin/coppice-envd";
/// The socket's file name.
const SOCKET: &str = "agent.sock";
/// Length of the sandbox ids the gateway mints (E2B's are 20 characters too).
pub(crate) const SANDBOX_ID_LEN: usize = 20;
/// Longest unix socket path the kernel accepts (`sun_path` minus its NUL).
const MAX_SOCKET_PATH: usize = 107;
/// How long a new sandbox's agent may take to open its socket.
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(30);
/// The DNS port, where sandboxes' resolver listens on the bridge's address.
const DNS_PORT: u16 = 53;

/// What can go wrong below the API.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RuntimeError {
    /// A backend refused or failed.
    #[error("{op}")]
    Backend {
        /// What the gateway was doing.
        op: &'static str,
        /// The backend's error.
        #[source]
        source: BackendError,
    },
    /// The template is not one this gateway knows.
    #[error("template {0:?} not found")]
    UnknownTemplate(String),
    /// Building or importing a template failed.
    #[error("template {name:?} is unavailable: {reason}")]
    Template {
        /// The template.
        name: String,
        /// Why.
        reason: String,
    },
    /// The agent did not come up or refused its configuration.
    #[error("sandbox agent: {0}")]
    Agent(String),
}

fn backend(op: &'static str) -> impl FnOnce(BackendError) -> RuntimeError {
    move |source| RuntimeError::Backend { op, source }
}

/// The network role's configuration for the gateway's `--sandbox-*` flags.
fn net_config(state_dir: &Path, n: &NetworkConfig) -> LinuxNetConfig {
    LinuxNetConfig {
        log_group: log_group(&n.name),
        bridge: format!("{}0", n.name),
        table: n.name.clone(),
        link_prefix: format!("{}v", n.name),
        allow_metadata: n.allow_metadata,
        egress_only_to: n.egress_only_to.clone(),
        ready_namespaces: n.effective_ready(),
        global_forwarding: n.ip_forward,
        ..LinuxNetConfig::new(state_dir.join("net"), n.cidr)
    }
}

/// The NFLOG group blocked egress is logged to, one per network name: a group has one
/// reader on a host, so two gateways (two names) must not share one. `coppice` keeps the
/// network role's default; other names get a group hashed from the name (FNV-1a) above
/// 0x8000, away from the default and from the network role's test groups.
fn log_group(name: &str) -> u16 {
    if name == "coppice" {
        return LinuxNetConfig::DEFAULT_LOG_GROUP;
    }
    let hash = name.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    0x8000 | u16::try_from(hash & 0x7fff).unwrap_or(0)
}

/// Removes everything sandbox networking with `n` made on this host (`--purge-network`).
pub(crate) fn purge_network(state_dir: &Path, n: &NetworkConfig) -> Result<(), RuntimeError> {
    LinuxNet::purge(&net_config(state_dir, n)).map_err(backend("remove sandbox networking"))
}

/// What every sandbox gets (E2B's default sandbox size: 2 vCPUs, 1 GiB).
pub(crate) const DEFAULT_LIMITS: Limits = Limits {
    memory_bytes: Some(1 << 30),
    pids: Some(4096),
    cpu_millis: Some(2000),
};

/// What a new sandbox is made of.
#[derive(Debug)]
pub(crate) struct Setup<'a> {
    pub(crate) id: &'a SandboxId,
    pub(crate) template: &'a str,
    pub(crate) limits: Limits,
    pub(crate) env_vars: &'a std::collections::BTreeMap<String, String>,
    pub(crate) access_token: &'a str,
    /// Its egress policy.
    pub(crate) policy: &'a EgressPolicy,
    /// Resolvers for its `/etc/resolv.conf`; empty for the gateway's forwarder.
    pub(crate) dns_servers: &'a [std::net::Ipv4Addr],
    /// The sandbox was claimed from the warm pool ([`Runtime::claim`]) under `id` and runs
    /// with this pid: only its agent is left to configure.
    pub(crate) warm: Option<u32>,
    /// The layer of a built template; `None` for a built-in one, whose layer
    /// [`Runtime::template`] finds.
    pub(crate) layer: Option<LayerId>,
    /// The user its processes run as unless they say otherwise.
    pub(crate) default_user: &'a str,
    /// Their working directory unless they say otherwise.
    pub(crate) default_workdir: &'a str,
}

/// The default user of a built-in template's sandboxes (E2B's).
pub(crate) const DEFAULT_USER: &str = "user";
/// The default working directory of a built-in template's sandboxes (E2B's).
pub(crate) const DEFAULT_WORKDIR: &str = "/home/user";

/// A sandbox started ahead of demand: running, its agent listening, not yet configured.
#[derive(Debug)]
pub(crate) struct Warm {
    pub(crate) id: SandboxId,
    pub(crate) pid: u32,
}

/// A random string of `len` characters from `[a-z0-9]` (E2B's sandbox ids look like this).
pub(crate) fn random_token(len: usize) -> Option<String> {
    use ring::rand::SecureRandom;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = vec![0u8; len];
    ring::rand::SystemRandom::new().fill(&mut bytes).ok()?;
    // 252 is the largest multiple of 36 below 256; re-rolling would be exact, but the bias of
    // mapping 256 values onto 36 is irrelevant for ids and tokens of this length.
    Some(
        bytes
            .iter()
            .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
            .collect(),
    )
}

/// A new sandbox id.
pub(crate) fn mint_id() -> Result<SandboxId, RuntimeError> {
    random_token(SANDBOX_ID_LEN)
        .and_then(|t| SandboxId::new(t).ok())
        .ok_or_else(|| RuntimeError::Agent("no randomness available for a sandbox id".into()))
}

/// Templates the gateway serves: E2B's two SDK defaults.
/// The builder of the template `name` (one of [`TEMPLATES`]) caching under `cache`.
fn template_builder(cache: &Path, name: &str) -> TemplateBuilder {
    let extra = TEMPLATES
        .iter()
        .find(|(n, _)| *n == name)
        .map_or(&[][..], |(_, p)| *p);
    let builder = TemplateBuilder::new(cache, JailConfig::DEFAULT_UID_BASE);
    if extra.is_empty() {
        builder
    } else {
        builder.with_flavor(name, extra)
    }
}

/// Builds every template into `cache` (or finds it built), one after the other, logging the
/// build's progress: `--prepare-templates true`. Blocks; the cache's own lock makes a
/// gateway that builds the same template at the same time wait for this one.
pub(crate) fn prepare_templates(cache: &Path) -> Result<(), RuntimeError> {
    for (name, _) in TEMPLATES {
        let started = std::time::Instant::now();
        template_builder(cache, name)
            .ensure(false, &mut |line: &str| {
                tracing::info!(template = %name, "{line}");
            })
            .map_err(|e| RuntimeError::Template {
                name: (*name).to_owned(),
                reason: e.to_string(),
            })?;
        tracing::info!(template = %name, secs = started.elapsed().as_secs(), "template ready");
    }
    Ok(())
}

pub(crate) const TEMPLATES: &[(&str, &[&str])] = &[
    ("base", &[]),
    // What E2B's code-interpreter image has for rich results and its other kernels
    // (javascript and typescript, r, java), from Debian's packages.
    (
        "code-interpreter-v1",
        &[
            "python3-numpy",
            "python3-pandas",
            "python3-matplotlib",
            "python3-ipython",
            "nodejs",
            "node-acorn",
            "node-typescript",
            "r-base-core",
            "default-jdk-headless",
        ],
    ),
];

/// Templates whose agent starts a Python interpreter as soon as it listens, so that the
/// first `run_code` in a fresh sandbox (from the warm pool, most often) finds it started,
/// as E2B's code-interpreter sandboxes find their kernel running.
const PRESTART_PYTHON: &[&str] = &["code-interpreter-v1"];

/// The agent's command line in a sandbox of `template`.
fn agent_args(template: &str) -> Vec<String> {
    let mut args = vec!["--socket".into(), format!("{SANDBOX_RUN_DIR}/{SOCKET}")];
    if PRESTART_PYTHON.contains(&template) {
        args.extend(["--prestart".into(), "python".into()]);
    }
    args
}

/// The composed backends.
#[derive(Debug)]
pub(crate) struct Runtime {
    jail: LinuxJail,
    storage: OverlayStorage,
    agent: PathBuf,
    run_dir: PathBuf,
    template_cache: PathBuf,
    /// One build at a time per template; the value is its storage layer once imported.
    templates: HashMap<&'static str, Arc<Mutex<Option<LayerId>>>>,
    /// Started, unconfigured sandboxes per template, oldest first.
    warm: std::sync::Mutex<HashMap<&'static str, Vec<Warm>>>,
    /// Each sandbox's network namespace, opened on its first connection to a user port
    /// ([`Runtime::netns`]) and closed when it is killed, so it never outlives the sandbox.
    netns: std::sync::Mutex<HashMap<SandboxId, Arc<std::os::fd::OwnedFd>>>,
    /// The network role; `None` with `--sandbox-network off` (loopback only).
    net: Option<LinuxNet>,
    /// Set while a background fill of the network role's ready namespaces runs.
    net_filling: Arc<std::sync::atomic::AtomicBool>,
    /// Sandbox starts under way and when the last one ended, for the background fillers.
    starts: Arc<Starts>,
}

/// How long no sandbox may have been starting before a ready namespace is made.
const NAMESPACE_FILL_QUIET: Duration = Duration::from_millis(100);

/// Sandbox starts under way, and when the last one ended.
#[derive(Debug)]
struct Starts {
    under_way: std::sync::atomic::AtomicUsize,
    last_end: std::sync::Mutex<Instant>,
}

impl Starts {
    fn begin(self: &Arc<Self>) -> StartUnderWay {
        self.under_way
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        StartUnderWay(Arc::clone(self))
    }

    /// Whether no start is under way and none ended in the last `quiet`.
    fn quiet_for(&self, quiet: Duration) -> bool {
        self.under_way.load(std::sync::atomic::Ordering::Acquire) == 0
            && self
                .last_end
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .elapsed()
                >= quiet
    }
}

/// One sandbox start, counted until dropped.
struct StartUnderWay(Arc<Starts>);

impl Drop for StartUnderWay {
    fn drop(&mut self) {
        *self
            .0
            .last_end
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now();
        self.0
            .under_way
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Runtime {
    /// Opens storage and the jail under `state_dir`. The jail knows no sandbox until
    /// [`Runtime::recover`] has run, and nothing may start one before then.
    pub(crate) fn open(
        state_dir: &Path,
        template_cache: &Path,
        agent: PathBuf,
        network: Option<&NetworkConfig>,
    ) -> Result<Self, RuntimeError> {
        let jail = LinuxJail::attach(JailConfig::new(state_dir.join("jail")))
            .map_err(backend("open the jail driver"))?;
        // Sandboxes run an execute-only copy, so that their root can neither read the agent
        // nor trace, signal or change it (`docs/backends.md`).
        let agent = jail
            .sealed_program(&agent)
            .map_err(backend("seal the agent binary"))?;
        // Takes over the host side (bridge, nftables table) before anything can start.
        let net = network
            .map(|n| LinuxNet::start(net_config(state_dir, n)))
            .transpose()
            .map_err(backend("start sandbox networking"))?;
        let storage =
            OverlayStorage::open(state_dir.join("storage")).map_err(backend("open storage"))?;
        let run_dir = state_dir.join("run");
        // Every sandbox's agent listens at <state>/run/<id>/agent.sock: refuse a state
        // directory that makes that path too long, rather than failing every create.
        let longest = run_dir.join("x".repeat(SANDBOX_ID_LEN)).join(SOCKET);
        let len = longest.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(RuntimeError::Backend {
                op: "check the state directory",
                source: BackendError::InvalidSpec {
                    field: "state directory",
                    reason: format!(
                        "{} is too long: sandbox sockets under it would be {len} bytes, \
                         more than the {MAX_SOCKET_PATH} a unix socket path may have",
                        state_dir.display()
                    ),
                },
            });
        }
        std::fs::create_dir_all(&run_dir).map_err(|e| RuntimeError::Backend {
            op: "create the run directory",
            source: BackendError::io("create", &run_dir, e),
        })?;
        Ok(Self {
            jail,
            storage,
            agent,
            run_dir,
            template_cache: template_cache.to_path_buf(),
            templates: TEMPLATES
                .iter()
                .map(|(name, _)| (*name, Arc::new(Mutex::new(None))))
                .collect(),
            warm: std::sync::Mutex::new(HashMap::new()),
            netns: std::sync::Mutex::new(HashMap::new()),
            net,
            net_filling: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            starts: Arc::new(Starts {
                under_way: std::sync::atomic::AtomicUsize::new(0),
                last_end: std::sync::Mutex::new(Instant::now()),
            }),
        })
    }

    /// Whether sandboxes get a network (egress, DNS, an address) beside their loopback.
    pub(crate) fn has_network(&self) -> bool {
        self.net.is_some()
    }

    /// The network role, when sandboxes have one.
    pub(crate) fn network(&self) -> Option<&LinuxNet> {
        self.net.as_ref()
    }

    /// Replaces a sandbox's egress policy; connections it now denies stop at once.
    pub(crate) async fn update_policy(
        &self,
        id: &SandboxId,
        policy: &EgressPolicy,
    ) -> Result<(), RuntimeError> {
        let Some(net) = &self.net else {
            return Ok(());
        };
        net.update_policy(id, policy)
            .await
            .map(drop)
            .map_err(backend("update the sandbox's network policy"))
    }

    /// Starts the sandboxes' DNS forwarder on the bridge's address, asking `upstream` (the
    /// host's resolvers when empty); `None` without a network. Keep it for the life of the
    /// process.
    pub(crate) async fn start_dns(
        &self,
        upstream: &[std::net::SocketAddrV4],
    ) -> Result<Option<Forwarder>, RuntimeError> {
        let Some(net) = &self.net else {
            return Ok(None);
        };
        let upstreams = if upstream.is_empty() {
            ForwarderConfig::host_resolvers().map_err(backend("find the host's resolvers"))?
        } else {
            upstream
                .iter()
                .copied()
                .map(std::net::SocketAddr::V4)
                .collect()
        };
        let listen = std::net::SocketAddrV4::new(net.gateway(), DNS_PORT);
        Forwarder::start(
            ForwarderConfig::new(listen, upstreams),
            Arc::new(net.clone()),
        )
        .await
        .map(Some)
        .map_err(backend("start the sandboxes' DNS forwarder"))
    }

    /// Points a sandbox's `/etc/resolv.conf` at `servers`, or back at the gateway's resolver
    /// when there are none; nothing without a network.
    pub(crate) async fn set_resolvers(
        &self,
        id: &SandboxId,
        servers: &[std::net::Ipv4Addr],
    ) -> Result<(), RuntimeError> {
        let Some(net) = &self.net else { return Ok(()) };
        let own = [net.gateway()];
        let servers = if servers.is_empty() {
            &own[..]
        } else {
            servers
        };
        let rootfs = self
            .storage
            .rootfs(id)
            .await
            .map_err(backend("find the sandbox's root filesystem"))?;
        crate::names::set_resolvers(&rootfs, servers).map_err(|e| RuntimeError::Backend {
            op: "write the sandbox's resolver file",
            source: crate::names::error("write", &rootfs, e),
        })
    }

    /// Tops up the network role's ready namespaces in the background, one namespace at a
    /// time and only once no sandbox has been starting for [`NAMESPACE_FILL_QUIET`]: making
    /// one takes CPU and the kernel's rtnl lock, which a burst of creates needs more.
    fn refill_namespaces(&self) {
        use std::sync::atomic::Ordering;
        let Some(net) = &self.net else { return };
        if net.ready_count() >= net.config().ready_namespaces
            || self.net_filling.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let net = net.clone();
        let filling = Arc::clone(&self.net_filling);
        let starts = Arc::clone(&self.starts);
        tokio::spawn(async move {
            loop {
                while !starts.quiet_for(NAMESPACE_FILL_QUIET) {
                    tokio::time::sleep(NAMESPACE_FILL_QUIET / 4).await;
                }
                match net.fill_one().await {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "making a ready network namespace failed");
                        break;
                    }
                }
            }
            filling.store(false, Ordering::Release);
        });
    }

    /// Re-adopts the sandboxes a previous process left running and removes what is left of
    /// the others (and cgroups nobody recorded), on the blocking pool.
    pub(crate) async fn recover(&self) -> Result<(), RuntimeError> {
        let jail = self.jail.clone();
        tokio::task::spawn_blocking(move || jail.recover())
            .await
            .map_err(|e| {
                backend("re-adopt sandboxes")(BackendError::io(
                    "join the recovery task",
                    "",
                    std::io::Error::other(e),
                ))
            })?
            .map_err(backend("re-adopt sandboxes"))?;
        if let Some(net) = &self.net {
            // The networks of the sandboxes that survived are taken back; everything else
            // the network role owns (a create a crash cut short) goes.
            let live: Vec<SandboxId> = self.live().await?.into_keys().collect();
            let kept = net
                .recover(&live)
                .await
                .map_err(backend("re-adopt sandbox networks"))?;
            tracing::info!(networks = kept.len(), "sandbox networks re-adopted");
            self.refill_namespaces();
        }
        Ok(())
    }

    /// Whether `name` is a template this gateway serves.
    pub(crate) fn knows_template(name: &str) -> bool {
        TEMPLATES.iter().any(|(n, _)| *n == name)
    }

    /// The recipe key of the template `name` (see [`crate::catalogue`]).
    pub(crate) fn recipe_key(&self, name: &str) -> String {
        template_builder(&self.template_cache, name).recipe_key()
    }

    /// When the cached build of the template `name` finished, as its cache marker says;
    /// `None` when the cache holds no complete build of its recipe.
    pub(crate) fn built_at(&self, name: &str) -> Option<coppice_lifecycle::state::Millis> {
        template_builder(&self.template_cache, name)
            .built_at()
            .map(|secs| coppice_lifecycle::state::Millis(secs.saturating_mul(1000)))
    }

    /// Builds (once, cached) and imports the template; returns its layer.
    pub(crate) async fn template(&self, name: &str) -> Result<LayerId, RuntimeError> {
        let slot = self
            .templates
            .get(name)
            .ok_or_else(|| RuntimeError::UnknownTemplate(name.to_owned()))?;
        let mut layer = slot.lock().await;
        if let Some(id) = &*layer {
            return Ok(id.clone());
        }
        let failed = |reason: String| RuntimeError::Template {
            name: name.to_owned(),
            reason,
        };
        let id = LayerId::new(name).map_err(|e| failed(e.to_string()))?;
        let exists = self
            .storage
            .layers()
            .await
            .map_err(|e| failed(e.to_string()))?
            .iter()
            .any(|l| l.id == id);
        if !exists {
            let builder = template_builder(&self.template_cache, name);
            let label = name.to_owned();
            let tree = tokio::task::spawn_blocking(move || {
                builder.ensure(false, &mut |line: &str| {
                    tracing::info!(template = %label, "{line}");
                })
            })
            .await
            .map_err(|e| failed(e.to_string()))?
            .map_err(|e| failed(e.to_string()))?;
            self.storage
                .import_template(&id, &tree)
                .await
                .map_err(|e| failed(e.to_string()))?;
        }
        *layer = Some(id.clone());
        Ok(id)
    }

    fn sandbox_run_dir(&self, id: &SandboxId) -> PathBuf {
        self.run_dir.join(id.as_str())
    }

    /// The host path of the file a sandbox's agent appends its reports to.
    pub(crate) fn report_file(&self, id: &SandboxId) -> PathBuf {
        self.sandbox_run_dir(id).join(coppice_envd::report::FILE)
    }

    /// The jail's counters for a sandbox (CPU, memory, tasks and enforcement), without the
    /// disk figures [`Runtime::usage`] adds.
    pub(crate) async fn enforcement(&self, id: &SandboxId) -> Result<ResourceUsage, RuntimeError> {
        self.jail
            .usage(id)
            .await
            .map_err(backend("read resource use"))
    }

    /// The host path of a sandbox's agent socket.
    pub(crate) fn socket(&self, id: &SandboxId) -> PathBuf {
        self.sandbox_run_dir(id).join(SOCKET)
    }

    /// The network namespace of a running sandbox, for connections to its ports: opened once
    /// from its init's `/proc/<pid>/ns/net` (the jail checks the pid is still that init) and
    /// kept until [`Runtime::kill`].
    pub(crate) async fn netns(
        &self,
        id: &SandboxId,
    ) -> Result<Arc<std::os::fd::OwnedFd>, RuntimeError> {
        let cached = self
            .netns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(id)
            .cloned();
        if let Some(fd) = cached {
            return Ok(fd);
        }
        let info = self
            .jail
            .info(id)
            .await
            .map_err(backend("find the sandbox's init"))?;
        if info.state == RunState::Exited {
            return Err(backend("find the sandbox's init")(BackendError::NotFound {
                kind: "sandbox",
                id: id.to_string(),
            }));
        }
        let path = format!("/proc/{}/ns/net", info.pid);
        let fd = std::fs::File::open(&path).map_err(|e| RuntimeError::Backend {
            op: "open the sandbox's network namespace",
            source: BackendError::io("open", &path, e),
        })?;
        let fd = Arc::new(std::os::fd::OwnedFd::from(fd));
        Ok(Arc::clone(
            self.netns
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .entry(id.clone())
                .or_insert(fd),
        ))
    }

    /// Whether a sandbox's init still runs. A handle from [`Runtime::netns`] keeps its
    /// namespace (and its loopback) alive after a death the gateway has not seen yet, so a
    /// refused connection asks this before it blames the port; a dead sandbox's handle is
    /// dropped here.
    pub(crate) async fn alive(&self, id: &SandboxId) -> bool {
        let alive = self
            .jail
            .info(id)
            .await
            .is_ok_and(|info| info.state != RunState::Exited);
        if !alive {
            self.netns
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(id);
        }
        alive
    }

    /// How a sandbox's init ended, for the log, while it is a zombie nobody has reaped (the
    /// jail reaps it at the kill): `exit status N` or `killed by signal N`, from the exit
    /// code field of `/proc/<pid>/stat`. `None` once it is reaped or when it still runs.
    pub(crate) async fn init_ending(&self, id: &SandboxId) -> Option<String> {
        let info = self.jail.info(id).await.ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", info.pid)).ok()?;
        ending_of(&stat)
    }

    /// Creates and starts a sandbox, waits for its agent and configures it; a sandbox claimed
    /// from the warm pool only needs configuring (if that fails it is replaced by a fresh one
    /// under the same id). On failure nothing of the sandbox is left.
    pub(crate) async fn create(&self, setup: Setup<'_>) -> Result<u32, RuntimeError> {
        if let Some(pid) = setup.warm {
            match self.configure(&setup).await {
                Ok(()) => return Ok(pid),
                Err(e) => {
                    tracing::warn!(sandbox = %setup.id, error = %e, "warm sandbox failed; starting a fresh one");
                    self.destroy(setup.id).await;
                }
            }
        }
        let layer = match &setup.layer {
            Some(layer) => layer.clone(),
            None => self.template(setup.template).await?,
        };
        let result = async {
            let pid = self
                .boot(
                    setup.id,
                    setup.template,
                    Some(&layer),
                    setup.limits,
                    setup.policy,
                )
                .await?;
            self.configure(&setup).await?;
            Ok(pid)
        }
        .await;
        if result.is_err() {
            self.destroy(setup.id).await;
        }
        result
    }

    /// Starts a template build's sandbox on `layer` with `limits` (on the network when sandboxes have one,
    /// with E2B's default egress) and configures its agent to run commands as root in `/`
    /// unless told otherwise. On failure nothing of it is left.
    pub(crate) async fn start_builder(
        &self,
        id: &SandboxId,
        layer: &LayerId,
        limits: Limits,
    ) -> Result<u32, RuntimeError> {
        let result = async {
            let pid = self
                .boot(id, "build", Some(layer), limits, &EgressPolicy::default())
                .await?;
            let init = serde_json::json!({
                "envVars": {},
                "defaultUser": "root",
                "defaultWorkdir": "/",
            });
            let socket = self.socket(id);
            let stream = tokio::net::UnixStream::connect(&socket)
                .await
                .map_err(|e| RuntimeError::Agent(format!("connect {}: {e}", socket.display())))?;
            let status = post_json(stream, "/init", init.to_string())
                .await
                .map_err(RuntimeError::Agent)?;
            if !(200..300).contains(&status) {
                return Err(RuntimeError::Agent(format!("/init answered {status}")));
            }
            Ok(pid)
        }
        .await;
        if result.is_err() {
            self.destroy(id).await;
        }
        result
    }

    /// Captures a running sandbox's files as the new layer `name`: frozen while storage
    /// copies its writable layer, then thawed.
    pub(crate) async fn capture(&self, id: &SandboxId, name: &LayerId) -> Result<(), RuntimeError> {
        self.pause(id).await?;
        let captured = self
            .storage
            .snapshot(id, name)
            .await
            .map(drop)
            .map_err(backend("capture the sandbox's files as a layer"));
        let resumed = self.resume(id).await;
        captured.and(resumed)
    }

    /// Captures the files of a sandbox that is already frozen (paused) as the new layer
    /// `name`, leaving it frozen.
    pub(crate) async fn capture_frozen(
        &self,
        id: &SandboxId,
        name: &LayerId,
    ) -> Result<(), RuntimeError> {
        self.storage
            .snapshot(id, name)
            .await
            .map(drop)
            .map_err(backend("capture the sandbox's files as a layer"))
    }

    /// Imports the tree at `tree` as the new layer `id` (an image's files; the tree is the
    /// caller's to remove afterwards).
    pub(crate) async fn import_layer(&self, id: &LayerId, tree: &Path) -> Result<(), RuntimeError> {
        self.storage
            .import_template(id, tree)
            .await
            .map(drop)
            .map_err(backend("import an image as a layer"))
    }

    /// Every layer storage has, with its parent.
    pub(crate) async fn layers(
        &self,
    ) -> Result<Vec<coppice_lifecycle::backend::LayerInfo>, RuntimeError> {
        self.storage.layers().await.map_err(backend("list layers"))
    }

    /// Deletes the layer `id`; storage refuses ([`BackendError::InUse`]) while a sandbox or
    /// another layer depends on it.
    pub(crate) async fn delete_layer(&self, id: &LayerId) -> Result<(), BackendError> {
        self.storage.delete_layer(id).await
    }

    /// Whether storage has the layer `id`.
    pub(crate) async fn has_layer(&self, id: &LayerId) -> Result<bool, RuntimeError> {
        Ok(self
            .storage
            .layers()
            .await
            .map_err(backend("list layers"))?
            .iter()
            .any(|l| l.id == *id))
    }

    /// Takes the oldest warm sandbox of `template`, if there is one.
    pub(crate) fn claim(&self, template: &str) -> Option<Warm> {
        let mut warm = self
            .warm
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let list = warm.get_mut(template)?;
        (!list.is_empty()).then(|| list.remove(0))
    }

    /// How many warm sandboxes `template` has.
    pub(crate) fn warm_count(&self, template: &str) -> usize {
        self.warm
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(template)
            .map_or(0, Vec::len)
    }

    /// Starts one sandbox of `template` for the warm pool.
    pub(crate) async fn prestart(&self, template: &'static str) -> Result<(), RuntimeError> {
        let layer = self.template(template).await?;
        let id = mint_id()?;
        match self
            .boot(
                &id,
                template,
                Some(&layer),
                DEFAULT_LIMITS,
                &EgressPolicy::default(),
            )
            .await
        {
            Ok(pid) => {
                self.warm
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .entry(template)
                    .or_default()
                    .push(Warm { id, pid });
                Ok(())
            }
            Err(e) => {
                self.destroy(&id).await;
                Err(e)
            }
        }
    }

    /// Kills every warm sandbox (at shutdown: nobody has them, nothing re-adopts them).
    pub(crate) async fn drain(&self) {
        let all: Vec<Warm> = std::mem::take(
            &mut *self
                .warm
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
        .into_values()
        .flatten()
        .collect();
        for w in all {
            self.destroy(&w.id).await;
        }
    }

    /// Starts a sandbox on `layer`, on the network with `policy` when sandboxes have one,
    /// and waits until its agent accepts connections.
    async fn boot(
        &self,
        id: &SandboxId,
        template: &str,
        layer: Option<&LayerId>,
        limits: Limits,
        policy: &EgressPolicy,
    ) -> Result<u32, RuntimeError> {
        let _start = self.starts.begin();
        let t0 = Instant::now();
        // Without a layer the sandbox boots again on the root it kept (a filesystem-only
        // pause).
        let rootfs = match layer {
            Some(layer) => self
                .storage
                .create_rootfs(id, layer)
                .await
                .map_err(backend("create the sandbox's root filesystem"))?,
            None => self
                .storage
                .rootfs(id)
                .await
                .map_err(backend("find the sandbox's root filesystem"))?,
        };
        let run = self.sandbox_run_dir(id);
        let root = self.jail.host_id(0);
        std::fs::create_dir_all(&run)
            .and_then(|()| std::os::unix::fs::chown(&run, Some(root), Some(root)))
            .map_err(|e| RuntimeError::Backend {
                op: "create the sandbox's run directory",
                source: BackendError::io("create", &run, e),
            })?;
        let attachment = match &self.net {
            Some(net) => {
                let spec = NetSpec {
                    policy: policy.clone(),
                };
                let attached = net
                    .attach(id, &spec)
                    .await
                    .map_err(backend("attach the sandbox to the network"))?;
                self.refill_namespaces();
                Some(attached)
            }
            None => None,
        };
        let t_net = t0.elapsed();
        crate::names::write_at_start(&rootfs, id, attachment.as_ref(), root).map_err(|e| {
            RuntimeError::Backend {
                op: "write the sandbox's name files",
                source: crate::names::error("write", &rootfs, e),
            }
        })?;
        let spec = JailSpec {
            id: id.clone(),
            rootfs,
            init: InitSpec {
                program: SANDBOX_AGENT.into(),
                args: agent_args(template),
                env: vec![
                    (
                        "PATH".into(),
                        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                    ),
                    // Process starts and ends are logged at info: they are what the
                    // sandbox logs routes show (`docs/metrics.md`).
                    ("COPPICE_LOG".into(), "info".into()),
                ],
                cwd: "/".into(),
            },
            mounts: vec![
                BindMount {
                    source: self.agent.clone(),
                    target: SANDBOX_AGENT.into(),
                    read_only: true,
                },
                BindMount {
                    source: run.clone(),
                    target: SANDBOX_RUN_DIR.into(),
                    read_only: false,
                },
            ],
            limits,
            network: attachment.and_then(|a| a.namespace),
        };
        let t_rootfs = t0.elapsed();
        let info = self
            .jail
            .start(spec)
            .await
            .map_err(backend("start the sandbox"))?;
        let t_jail = t0.elapsed();
        drop(
            connect_when_listening(&run.join(SOCKET), AGENT_START_TIMEOUT)
                .await
                .map_err(|e| {
                    RuntimeError::Agent(format!("{e}; see {}", self.jail.log_path(id).display()))
                })?,
        );
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        tracing::debug!(
            sandbox = %id,
            net_ms = ms(t_net),
            rootfs_ms = ms(t_rootfs),
            jail_ms = ms(t_jail - t_rootfs),
            agent_ms = ms(t0.elapsed() - t_jail),
            "sandbox started"
        );
        Ok(info.pid)
    }

    /// Gives a started sandbox's agent its environment and access token (`/init`).
    async fn configure(&self, setup: &Setup<'_>) -> Result<(), RuntimeError> {
        let t0 = Instant::now();
        // A warm sandbox was started with the default policy and the gateway's resolver;
        // both are its own before any code of the user's runs in it.
        if setup.warm.is_some() && *setup.policy != EgressPolicy::default() {
            self.update_policy(setup.id, setup.policy).await?;
        }
        if !setup.dns_servers.is_empty() {
            self.set_resolvers(setup.id, setup.dns_servers).await?;
        }
        let init = serde_json::json!({
            "envVars": setup.env_vars,
            "accessToken": setup.access_token,
            "defaultUser": setup.default_user,
            "defaultWorkdir": setup.default_workdir,
        });
        let socket = self.socket(setup.id);
        let stream = tokio::net::UnixStream::connect(&socket)
            .await
            .map_err(|e| RuntimeError::Agent(format!("connect {}: {e}", socket.display())))?;
        let status = post_json(stream, "/init", init.to_string())
            .await
            .map_err(RuntimeError::Agent)?;
        tracing::debug!(
            sandbox = %setup.id,
            init_ms = t0.elapsed().as_secs_f64() * 1000.0,
            warm = setup.warm.is_some(),
            "sandbox configured"
        );
        if !(200..300).contains(&status) {
            return Err(RuntimeError::Agent(format!("/init answered {status}")));
        }
        Ok(())
    }

    /// Freezes a sandbox.
    pub(crate) async fn pause(&self, id: &SandboxId) -> Result<(), RuntimeError> {
        self.jail
            .pause(id)
            .await
            .map_err(backend("pause the sandbox"))
    }

    /// Thaws a sandbox.
    pub(crate) async fn resume(&self, id: &SandboxId) -> Result<(), RuntimeError> {
        self.jail
            .resume(id)
            .await
            .map_err(backend("resume the sandbox"))
    }

    /// Kills a sandbox and removes everything it had: processes, cgroups, its writable
    /// layer and its run directory. What is already gone is not an error.
    pub(crate) async fn kill(&self, id: &SandboxId) -> Result<(), RuntimeError> {
        self.release(id, "kill the sandbox").await?;
        match self.storage.remove_rootfs(id).await {
            Ok(()) | Err(BackendError::NotFound { .. }) => {}
            Err(e) => return Err(backend("remove the sandbox's root filesystem")(e)),
        }
        self.remove_run_dir(id)
    }

    /// Stops a sandbox but keeps its files (a filesystem-only pause): its processes,
    /// cgroups, network and run directory go, its writable root stays for
    /// [`Runtime::reboot`]. What is already gone is not an error.
    pub(crate) async fn stop(&self, id: &SandboxId) -> Result<(), RuntimeError> {
        self.release(id, "stop the sandbox").await?;
        self.remove_run_dir(id)
    }

    /// Ends a sandbox's processes and cgroups (`op` names it in an error), then its network
    /// namespace and address. What is already gone is not an error.
    async fn release(&self, id: &SandboxId, op: &'static str) -> Result<(), RuntimeError> {
        match self.jail.kill(id).await {
            Ok(()) | Err(BackendError::NotFound { .. }) => {}
            Err(e) => return Err(backend(op)(e)),
        }
        // After the kill: a handle opened while it ran is dropped here, none can be opened
        // after it, and the namespace goes with the last connection into it.
        self.netns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(id);
        if let Some(net) = &self.net {
            match net.release(id).await {
                Ok(()) | Err(BackendError::NotFound { .. }) => {}
                Err(e) => return Err(backend("release the sandbox's network")(e)),
            }
        }
        Ok(())
    }

    /// Removes a sandbox's run directory (its agent socket); an absent one is not an error.
    fn remove_run_dir(&self, id: &SandboxId) -> Result<(), RuntimeError> {
        let run = self.sandbox_run_dir(id);
        match std::fs::remove_dir_all(&run) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(RuntimeError::Backend {
                op: "remove the sandbox's run directory",
                source: BackendError::io("remove", &run, e),
            }),
            _ => Ok(()),
        }
    }

    /// Boots a stopped sandbox ([`Runtime::stop`]) again on the root it kept: fresh
    /// processes, the same files, configured as `setup` says (its `layer` and `warm` are not
    /// read). On failure it is stopped again, its files kept.
    pub(crate) async fn reboot(&self, setup: Setup<'_>) -> Result<u32, RuntimeError> {
        let result = async {
            let pid = self
                .boot(setup.id, setup.template, None, setup.limits, setup.policy)
                .await?;
            self.configure(&setup).await?;
            Ok(pid)
        }
        .await;
        if result.is_err() {
            if let Err(e) = self.stop(setup.id).await {
                tracing::warn!(sandbox = %setup.id, error = %e, "stopping a sandbox whose reboot failed");
            }
        }
        result
    }

    /// Whether storage still has the sandbox's writable root.
    pub(crate) async fn has_root(&self, id: &SandboxId) -> bool {
        self.storage.rootfs(id).await.is_ok()
    }

    /// Best-effort teardown after a failed create.
    pub(crate) async fn destroy(&self, id: &SandboxId) {
        if let Err(e) = self.kill(id).await {
            tracing::warn!(sandbox = %id, error = %e, "cleanup after a failed create");
        }
    }

    /// Sandboxes the jail knows (after a restart: those that survived), with their state.
    pub(crate) async fn live(&self) -> Result<HashMap<SandboxId, RunState>, RuntimeError> {
        Ok(self
            .jail
            .list()
            .await
            .map_err(backend("list sandboxes"))?
            .into_iter()
            .map(|i| (i.id, i.state))
            .collect())
    }

    /// Sandboxes with a writable root or a run directory on this host, whether or not the
    /// jail has them: a start that a crash cut short before the jail recorded it leaves
    /// both behind, and nothing else names them.
    pub(crate) async fn on_disk(&self) -> Result<HashSet<SandboxId>, RuntimeError> {
        let mut ids: HashSet<SandboxId> = self
            .storage
            .sandboxes()
            .await
            .map_err(backend("list root filesystems"))?
            .into_iter()
            .collect();
        let run = self.run_dir.clone();
        let runs = tokio::task::spawn_blocking(move || {
            std::fs::read_dir(&run).map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| SandboxId::new(e.file_name().to_string_lossy()).ok())
                    .collect::<Vec<_>>()
            })
        })
        .await
        .map_err(|e| RuntimeError::Backend {
            op: "list run directories",
            source: BackendError::io("join the listing task", "", std::io::Error::other(e)),
        })?
        .map_err(|e| RuntimeError::Backend {
            op: "list run directories",
            source: BackendError::io("read", &self.run_dir, e),
        })?;
        ids.extend(runs);
        Ok(ids)
    }

    /// The file that collects a sandbox's agent log (kept after the sandbox is killed).
    pub(crate) fn log_path(&self, id: &SandboxId) -> PathBuf {
        self.jail.log_path(id)
    }

    /// The directory of every sandbox's log.
    pub(crate) fn logs_dir(&self) -> PathBuf {
        self.jail.logs_dir()
    }

    /// The disk a sandbox's own writes take.
    pub(crate) async fn disk_usage(&self, id: &SandboxId) -> Result<DiskUsage, RuntimeError> {
        self.storage
            .usage(id)
            .await
            .map_err(backend("read disk use"))
    }
}

/// Connects to the agent's socket as soon as it accepts connections. The socket file exists
/// from the agent's `bind` a moment before its `listen`, so a missing file and a refused
/// connection both mean "not yet".
async fn connect_when_listening(
    socket: &Path,
    timeout: Duration,
) -> Result<tokio::net::UnixStream, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match tokio::net::UnixStream::connect(socket).await {
            Ok(stream) => return Ok(stream),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_micros(250)).await;
            }
            Err(e) => return Err(format!("connect {}: {e}", socket.display())),
        }
    }
}

/// `POST path` with a JSON body to the agent over `stream`; returns the status.
async fn post_json(
    stream: tokio::net::UnixStream,
    path: &str,
    body: String,
) -> Result<u16, String> {
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let req = http::Request::post(path)
        .header(http::header::HOST, "localhost")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("{path}: {e}"))?;
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    Ok(status)
}

/// The ending of a zombie from its `/proc/<pid>/stat` line: field 52 (`exit_code`) holds its
/// wait status. Fields are counted after the command name's last `)`, which may hold spaces.
fn ending_of(stat: &str) -> Option<String> {
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split(' ').collect();
    if fields.first() != Some(&"Z") {
        return None;
    }
    let status: i32 = fields.get(49)?.trim().parse().ok()?;
    Some(if status & 0x7f == 0 {
        format!("exit status {}", (status >> 8) & 0xff)
    } else {
        format!("killed by signal {}", status & 0x7f)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_code_interpreter_agents_prestart_python() {
        let socket = format!("{SANDBOX_RUN_DIR}/{SOCKET}");
        assert_eq!(agent_args("base"), ["--socket", socket.as_str()]);
        assert_eq!(
            agent_args("code-interpreter-v1"),
            ["--socket", socket.as_str(), "--prestart", "python"]
        );
        for (name, _) in TEMPLATES {
            assert!(*name == "base" || PRESTART_PYTHON.contains(name), "{name}");
        }
    }

    #[test]
    fn a_zombies_ending_reads_from_its_stat_line() {
        let mut fields = vec!["0"; 50];
        fields[0] = "Z";
        fields[49] = "9";
        let killed = format!("4242 (coppice envd) {}", fields.join(" "));
        assert_eq!(ending_of(&killed).as_deref(), Some("killed by signal 9"));
        fields[49] = "768";
        let exited = format!("4242 (a) b) {}", fields.join(" "));
        assert_eq!(ending_of(&exited).as_deref(), Some("exit status 3"));
        fields[0] = "S";
        assert_eq!(ending_of(&format!("1 (x) {}", fields.join(" "))), None);
        assert_eq!(ending_of("garbage"), None);
    }

    #[test]
    fn each_network_name_logs_to_a_group_of_its_own() {
        assert_eq!(log_group("coppice"), LinuxNetConfig::DEFAULT_LOG_GROUP);
        let groups: std::collections::BTreeSet<u16> = ["cpgt", "cpe2e", "cpbn", "cpup", "a", "b"]
            .iter()
            .map(|n| log_group(n))
            .collect();
        assert_eq!(groups.len(), 6);
        assert!(groups.iter().all(|g| *g >= 0x8000));
    }
}
