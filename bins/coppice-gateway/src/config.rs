//! The gateway's configuration: command-line flags, each also readable from a `COPPICE_*`
//! environment variable (the flag wins).

use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;

use coppice_events::guard::Cidr;
use coppice_lifecycle::backend::Ipv4Cidr;

/// Everything the gateway needs to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Main listener: control plane and header-routed data plane (`--listen`).
    pub listen: SocketAddr,
    /// Extra listeners for `<port>-<id>.<domain>` Host routing (`--envd-listen`,
    /// `--code-listen`).
    pub extra_listen: Vec<SocketAddr>,
    /// The wildcard domain for Host routing (`--domain`).
    pub domain: Option<String>,
    /// Registry, sandbox state, storage (`--state-dir`).
    pub state_dir: PathBuf,
    /// Where built template trees are cached (`--template-cache`; default
    /// `<state-dir>/templates`).
    pub template_cache: PathBuf,
    /// Build every template into `template_cache`, printing progress, then exit
    /// (`--prepare-templates true`): for images, packages and CI that want the first start
    /// fast. Touches nothing else, so it may run beside a gateway.
    pub prepare_templates: bool,
    /// The agent binary bind-mounted into sandboxes (`--agent`); default: the gateway itself,
    /// which runs as the agent when started under the agent's name.
    pub agent: Option<PathBuf>,
    /// Accepted API keys; empty means any key is accepted (`COPPICE_API_KEYS`,
    /// `--api-keys-file`).
    pub api_keys: Vec<String>,
    /// How log lines are written (`--log-format`): text for people, JSON lines for
    /// collectors.
    pub log_format: LogFormat,
    /// A Sandforge-format subscription to every event type, created or refreshed at start
    /// (`--webhook-url`, `--webhook-secret`).
    pub webhook: Option<CliWebhook>,
    /// Webhook destinations allowed although private or loopback (`--webhook-allow`).
    pub webhook_allow: Vec<Cidr>,
    /// Webhook destinations always refused (`--webhook-deny`).
    pub webhook_deny: Vec<Cidr>,
    /// Extra CA certificates (PEM) that https webhook receivers may chain to, beside the
    /// system bundle (`--webhook-ca-file`).
    pub webhook_ca_file: Option<PathBuf>,
    /// Events older than this many days are pruned; 0 keeps them by age
    /// (`--event-retention-days`, default 7, like E2B's delivery logs).
    pub event_retention_days: u64,
    /// At most this many events are kept (`--event-retention-count`; default unlimited).
    pub event_retention_count: Option<u64>,
    /// Sandboxes kept started, per template, ahead of creates (`--warm-pool`, default
    /// [`Config::DEFAULT_WARM_POOL`]; 0 turns the pool off): the target of every template
    /// whose target `/pool` has not stored.
    pub warm_pool: usize,
    /// Most sandboxes at once, warm ones and starts under way included (`--max-sandboxes`;
    /// `None`: derived from host memory, see `docs/api.md`).
    pub max_sandboxes: Option<usize>,
    /// Host memory no sandbox start may take, in bytes (`--min-free-memory`; `None`: 5% of
    /// the host's memory, at least 512 MiB).
    pub min_free_memory: Option<u64>,
    /// Sandbox networking; `None` (`--sandbox-network off`) leaves every sandbox with only
    /// a loopback.
    pub network: Option<NetworkConfig>,
    /// The certificate chain and key the listeners serve TLS with (`--tls-cert`,
    /// `--tls-key`); `None`: a local CA's, see `tls.rs`.
    pub tls_files: Option<TlsFiles>,
    /// The registry `fromImage` pulls Docker Hub names from (`--registry-mirror`,
    /// `[http[s]://]host[:port]`; plain HTTP only when also in `insecure_registries`).
    pub registry_mirror: Option<String>,
    /// Registries (`host[:port]`) `fromImage` may reach over plain HTTP or unverified TLS
    /// (`--insecure-registry`, repeatable).
    pub insecure_registries: Vec<String>,
}

/// How sandboxes reach the network (`docs/network.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// The sandbox address pool (`--sandbox-cidr`, default [`NetworkConfig::DEFAULT_CIDR`]).
    pub cidr: Ipv4Cidr,
    /// Names what the gateway owns on the host (`--sandbox-network-name`, default
    /// `coppice`): the bridge `<name>0`, the nftables table `<name>` and the host-side
    /// links `<name>v<n>`.
    pub name: String,
    /// Let sandboxes reach 169.254.0.0/16, where clouds serve instance metadata
    /// (`--allow-metadata`, default false).
    pub allow_metadata: bool,
    /// If set, the only destinations any sandbox may reach, whatever its own policy
    /// (`--egress-only-to`).
    pub egress_only_to: Option<Vec<Ipv4Cidr>>,
    /// Turn IPv4 forwarding on host-wide, as NAT through the host's uplinks needs
    /// (`--ip-forward`, default true); false turns it on for the bridge only and leaves the
    /// uplinks to the operator.
    pub ip_forward: bool,
    /// Where the sandboxes' DNS forwarder sends queries (`--dns-upstream`); empty: the
    /// host's own resolvers, from `/etc/resolv.conf`.
    pub dns_upstream: Vec<SocketAddrV4>,
    /// Network namespaces kept made ahead of creates (`--ready-namespaces`, default
    /// [`NetworkConfig::DEFAULT_READY`]); each holds a pool address, so at most half the
    /// pool's addresses are used for them.
    pub ready_namespaces: usize,
    /// Remove everything sandbox networking made on this host, then exit
    /// (`--purge-network true`): for uninstalling, once no sandbox is left.
    pub purge: bool,
}

impl NetworkConfig {
    /// The default pool: private, and unlikely to meet a host's own networks (a collision
    /// is refused at start, naming the route or resolver it meets).
    pub const DEFAULT_CIDR: &'static str = "10.200.0.0/16";
    /// Longest `--sandbox-network-name`: the bridge's name adds one character and
    /// interface names hold 15.
    pub const MAX_NAME: usize = 10;
    /// Ready namespaces unless configured: a burst of 64 cold creates (past the warm pool)
    /// attaches without taking the kernel's rtnl lock (`cargo xtask bench net`).
    pub const DEFAULT_READY: usize = 64;

    /// How many ready namespaces the pool affords: at most half its usable addresses.
    pub fn effective_ready(&self) -> usize {
        let usable = (1usize << (32 - u32::from(self.cidr.prefix()))).saturating_sub(3);
        self.ready_namespaces.min(usable / 2)
    }
}

/// The PEM files `--tls-cert`/`--tls-key` name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// The subscription `--webhook-url`/`--webhook-secret` ask for.
#[derive(Clone, PartialEq, Eq)]
pub struct CliWebhook {
    /// Where to POST.
    pub url: String,
    /// The signing secret.
    pub secret: String,
}

impl std::fmt::Debug for CliWebhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CliWebhook")
            .field("url", &self.url)
            .field("secret", &"<redacted>")
            .finish()
    }
}

const USAGE: &str = "\
usage: coppice-gateway [options]

  --listen ADDR           control plane + data plane (default 127.0.0.1:3000)   COPPICE_LISTEN
  --state-dir DIR         registry and sandbox state (default /var/lib/coppice) COPPICE_STATE_DIR
  --template-cache DIR    built templates (default <state-dir>/templates)       COPPICE_TEMPLATE_CACHE
  --prepare-templates BOOL  build every template into the cache, then exit     COPPICE_PREPARE_TEMPLATES
  --domain D              route Host <port>-<id>.D to sandboxes                 COPPICE_DOMAIN
  --envd-listen ADDR      extra listener, e.g. :49983, for Host routing         COPPICE_ENVD_LISTEN
  --code-listen ADDR      extra listener, e.g. :49999, for Host routing         COPPICE_CODE_LISTEN
  --agent PATH            agent binary for sandboxes (default: built in)        COPPICE_AGENT
  --api-keys-file FILE    one accepted API key per line                         COPPICE_API_KEYS_FILE
                          (or COPPICE_API_KEYS=k1,k2; unset: any key is accepted)
  --webhook-url URL       Sandforge-format webhook for every event type         COPPICE_WEBHOOK_URL
  --webhook-secret S      its signing secret (required with --webhook-url)      COPPICE_WEBHOOK_SECRET
  --webhook-allow CIDRS   private/loopback webhook destinations to allow        COPPICE_WEBHOOK_ALLOW
  --webhook-deny CIDRS    webhook destinations to refuse (wins over allow)      COPPICE_WEBHOOK_DENY
  --webhook-ca-file FILE  extra CA certificates (PEM) for https webhooks        COPPICE_WEBHOOK_CA_FILE
  --event-retention-days N   prune events older than N days (default 7; 0: never) COPPICE_EVENT_RETENTION_DAYS
  --event-retention-count N  keep at most the newest N events (default: all)   COPPICE_EVENT_RETENTION_COUNT
  --warm-pool N           sandboxes kept started per template (default 10; 0: off) COPPICE_WARM_POOL
                          (a target stored through POST /pool/{template}/warm wins)
  --max-sandboxes N       most sandboxes at once, warm ones included            COPPICE_MAX_SANDBOXES
                          (default: (memory - floor) / 1 GiB sandbox limit x 16)
  --min-free-memory SIZE  host memory kept free; creates past it get 429        COPPICE_MIN_FREE_MEMORY
                          (bytes or 512M, 2G; default 5% of memory, at least 512M)
  --sandbox-network on|off  egress, DNS and addresses for sandboxes (default on;  COPPICE_SANDBOX_NETWORK
                          off: loopback only)
  --sandbox-cidr CIDR     sandbox address pool (default 10.200.0.0/16)          COPPICE_SANDBOX_CIDR
  --sandbox-network-name N  bridge N0, nftables table N, links Nv* (default coppice) COPPICE_SANDBOX_NETWORK_NAME
  --allow-metadata BOOL   let sandboxes reach 169.254.0.0/16 (default false)    COPPICE_ALLOW_METADATA
  --egress-only-to CIDRS  the only destinations sandboxes may reach (default: any) COPPICE_EGRESS_ONLY_TO
  --ip-forward BOOL       turn on IPv4 forwarding host-wide (default true;      COPPICE_IP_FORWARD
                          false: on the bridge only, uplinks are yours)
  --dns-upstream ADDRS    resolvers the sandboxes' DNS forwarder asks          COPPICE_DNS_UPSTREAM
                          (IPv4[:port],...; default: those in /etc/resolv.conf)
  --ready-namespaces N    network namespaces made ahead of creates (default 64; COPPICE_READY_NAMESPACES
                          at most half the pool)
  --purge-network BOOL    remove the bridge, rules and namespaces sandbox       COPPICE_PURGE_NETWORK
                          networking made, then exit (uninstall)
  --tls-cert FILE         certificate chain (PEM) for TLS on every listener     COPPICE_TLS_CERT
  --tls-key FILE          its private key (PEM; both or neither; default: a     COPPICE_TLS_KEY
                          local CA in <state-dir>/tls, see docs/network.md)
  --registry-mirror URL   registry fromImage pulls Docker Hub names from        COPPICE_REGISTRY_MIRROR
                          ([http[s]://]host[:port]; http needs --insecure-registry)
  --insecure-registry H   registry host[:port] fromImage may reach over plain   COPPICE_INSECURE_REGISTRY
                          HTTP (repeatable; the variable takes a comma list)
  --log-format text|json  log lines as text (default) or JSON objects           COPPICE_LOG_FORMAT
  --check-config          check the configuration and the files it names, print
                          what the gateway would use, and exit (0: good, 78: not)";

/// How the gateway writes its log (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One line of text per event, coloured only on a terminal.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, target, fields).
    Json,
}

impl Config {
    /// Warm sandboxes per template unless configured: a burst of ten creates (an agent
    /// framework fanning out) skips the jail start. An idle sandbox costs the host about
    /// 1–1.3 MiB (`cargo xtask bench density`), so the default pool of both templates about
    /// 25 MiB, and no CPU while idle.
    pub const DEFAULT_WARM_POOL: usize = 10;
    /// Largest `--warm-pool`.
    pub const MAX_WARM_POOL: usize = 256;

    /// Parses `args` (without the program name), falling back to `env` for unset flags.
    pub fn from_args_and_env(
        args: impl Iterator<Item = String>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        let mut flags: Vec<(String, String)> = Vec::new();
        let mut args = args;
        while let Some(a) = args.next() {
            if a == "-h" || a == "--help" {
                return Err(USAGE.into());
            }
            let Some(name) = a.strip_prefix("--") else {
                return Err(format!("unexpected argument {a:?}\n\n{USAGE}"));
            };
            let (name, value) = match name.split_once('=') {
                Some((n, v)) => (n.to_owned(), v.to_owned()),
                None => (
                    name.to_owned(),
                    args.next().ok_or(format!("--{name} needs a value"))?,
                ),
            };
            const KNOWN: [&str; 33] = [
                "registry-mirror",
                "insecure-registry",
                "listen",
                "state-dir",
                "template-cache",
                "domain",
                "envd-listen",
                "code-listen",
                "agent",
                "api-keys-file",
                "webhook-url",
                "webhook-secret",
                "webhook-allow",
                "webhook-deny",
                "webhook-ca-file",
                "event-retention-days",
                "event-retention-count",
                "warm-pool",
                "max-sandboxes",
                "min-free-memory",
                "sandbox-network",
                "sandbox-cidr",
                "sandbox-network-name",
                "allow-metadata",
                "egress-only-to",
                "ip-forward",
                "dns-upstream",
                "ready-namespaces",
                "purge-network",
                "prepare-templates",
                "tls-cert",
                "tls-key",
                "log-format",
            ];
            if !KNOWN.contains(&name.as_str()) {
                return Err(format!("unknown option --{name}\n\n{USAGE}"));
            }
            flags.push((name, value));
        }
        let get = |flag: &str, var: &str| -> Option<String> {
            flags
                .iter()
                .rev()
                .find(|(n, _)| n == flag)
                .map(|(_, v)| v.clone())
                .or_else(|| env(var).filter(|v| !v.is_empty()))
        };
        let addr = |flag: &str, var: &str, s: String| -> Result<SocketAddr, String> {
            // ":49983" means every interface of the loopback-first default host.
            let s = if s.starts_with(':') {
                format!("127.0.0.1{s}")
            } else {
                s
            };
            s.parse()
                .map_err(|e| format!("--{flag} ({var}): {s:?} is not an address: {e}"))
        };
        let listen = addr(
            "listen",
            "COPPICE_LISTEN",
            get("listen", "COPPICE_LISTEN").unwrap_or_else(|| "127.0.0.1:3000".into()),
        )?;
        let mut extra_listen = Vec::new();
        for (flag, var) in [
            ("envd-listen", "COPPICE_ENVD_LISTEN"),
            ("code-listen", "COPPICE_CODE_LISTEN"),
        ] {
            if let Some(v) = get(flag, var) {
                extra_listen.push(addr(flag, var, v)?);
            }
        }
        let state_dir = PathBuf::from(
            get("state-dir", "COPPICE_STATE_DIR").unwrap_or_else(|| "/var/lib/coppice".into()),
        );
        let template_cache = get("template-cache", "COPPICE_TEMPLATE_CACHE")
            .map_or_else(|| state_dir.join("templates"), PathBuf::from);
        let prepare_templates = match get("prepare-templates", "COPPICE_PREPARE_TEMPLATES")
            .as_deref()
        {
            None | Some("false") => false,
            Some("true") => true,
            Some(v) => {
                return Err(format!(
                    "--prepare-templates (COPPICE_PREPARE_TEMPLATES): expected true or false, got {v:?}"
                ))
            }
        };
        let domain = get("domain", "COPPICE_DOMAIN").map(|d| d.trim_matches('.').to_owned());
        if !extra_listen.is_empty() && domain.is_none() {
            return Err("--envd-listen/--code-listen need --domain for Host routing".into());
        }
        let mut api_keys: Vec<String> = env("COPPICE_API_KEYS")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(str::to_owned)
            .collect();
        if let Some(file) = get("api-keys-file", "COPPICE_API_KEYS_FILE") {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| format!("--api-keys-file {file}: {e}"))?;
            api_keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_owned),
            );
        }
        let webhook = match (
            get("webhook-url", "COPPICE_WEBHOOK_URL"),
            get("webhook-secret", "COPPICE_WEBHOOK_SECRET"),
        ) {
            (Some(url), Some(secret)) => Some(CliWebhook { url, secret }),
            (None, None) => None,
            (Some(_), None) => return Err("--webhook-url needs --webhook-secret".into()),
            (None, Some(_)) => return Err("--webhook-secret needs --webhook-url".into()),
        };
        let cidrs = |flag: &str, var: &str| -> Result<Vec<Cidr>, String> {
            get(flag, var)
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(|c| c.parse().map_err(|e| format!("--{flag} ({var}): {e}")))
                .collect()
        };
        let number = |flag: &str, var: &str| -> Result<Option<u64>, String> {
            get(flag, var)
                .map(|v| {
                    v.parse()
                        .map_err(|_| format!("--{flag} ({var}): {v:?} is not a number"))
                })
                .transpose()
        };
        let warm_pool = match number("warm-pool", "COPPICE_WARM_POOL")? {
            None => Self::DEFAULT_WARM_POOL,
            Some(n) if usize::try_from(n).is_ok_and(|n| n <= Self::MAX_WARM_POOL) => {
                usize::try_from(n).unwrap_or(Self::MAX_WARM_POOL)
            }
            Some(n) => {
                return Err(format!(
                    "--warm-pool (COPPICE_WARM_POOL): {n} is more than {}",
                    Self::MAX_WARM_POOL
                ))
            }
        };
        let max_sandboxes = match number("max-sandboxes", "COPPICE_MAX_SANDBOXES")? {
            None => None,
            Some(0) => {
                return Err("--max-sandboxes (COPPICE_MAX_SANDBOXES): must be at least 1".into())
            }
            Some(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        };
        let min_free_memory = get("min-free-memory", "COPPICE_MIN_FREE_MEMORY")
            .map(|v| {
                crate::admission::parse_size(&v)
                    .map_err(|e| format!("--min-free-memory (COPPICE_MIN_FREE_MEMORY): {e}"))
            })
            .transpose()?;
        let tls_files = match (
            get("tls-cert", "COPPICE_TLS_CERT"),
            get("tls-key", "COPPICE_TLS_KEY"),
        ) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.into(),
                key: key.into(),
            }),
            (None, None) => None,
            (Some(_), None) => return Err("--tls-cert needs --tls-key (COPPICE_TLS_KEY)".into()),
            (None, Some(_)) => return Err("--tls-key needs --tls-cert (COPPICE_TLS_CERT)".into()),
        };
        let network = network_config(&get)?;
        let registry_mirror = get("registry-mirror", "COPPICE_REGISTRY_MIRROR");
        let mut insecure_registries: Vec<String> = flags
            .iter()
            .filter(|(n, _)| n == "insecure-registry")
            .map(|(_, v)| v.clone())
            .collect();
        if insecure_registries.is_empty() {
            insecure_registries = env("COPPICE_INSECURE_REGISTRY")
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|r| !r.is_empty())
                .map(str::to_owned)
                .collect();
        }
        // Checked here, so a bad value stops the start with a message.
        crate::builds::image::Registries::new(
            registry_mirror.as_deref(),
            insecure_registries.clone(),
        )?;
        Ok(Self {
            registry_mirror,
            insecure_registries,
            network,
            tls_files,
            warm_pool,
            max_sandboxes,
            min_free_memory,
            webhook,
            webhook_allow: cidrs("webhook-allow", "COPPICE_WEBHOOK_ALLOW")?,
            webhook_deny: cidrs("webhook-deny", "COPPICE_WEBHOOK_DENY")?,
            webhook_ca_file: get("webhook-ca-file", "COPPICE_WEBHOOK_CA_FILE").map(PathBuf::from),
            event_retention_days: number("event-retention-days", "COPPICE_EVENT_RETENTION_DAYS")?
                .unwrap_or(7),
            event_retention_count: number(
                "event-retention-count",
                "COPPICE_EVENT_RETENTION_COUNT",
            )?,
            listen,
            extra_listen,
            domain,
            state_dir,
            template_cache,
            prepare_templates,
            agent: get("agent", "COPPICE_AGENT").map(PathBuf::from),
            api_keys,
            log_format: match get("log-format", "COPPICE_LOG_FORMAT").as_deref() {
                None | Some("text") => LogFormat::Text,
                Some("json") => LogFormat::Json,
                Some(other) => {
                    return Err(format!(
                        "--log-format (COPPICE_LOG_FORMAT): {other:?} is neither text nor json"
                    ))
                }
            },
        })
    }
}

/// The network flags; `get` reads a flag or its variable.
fn network_config(
    get: &impl Fn(&str, &str) -> Option<String>,
) -> Result<Option<NetworkConfig>, String> {
    let flag = |name: &str, var: &str, v: &str| -> Result<bool, String> {
        match v {
            "on" | "true" | "yes" | "1" => Ok(true),
            "off" | "false" | "no" | "0" => Ok(false),
            _ => Err(format!("--{name} ({var}): {v:?} is neither on nor off")),
        }
    };
    let on = get("sandbox-network", "COPPICE_SANDBOX_NETWORK")
        .map(|v| flag("sandbox-network", "COPPICE_SANDBOX_NETWORK", &v))
        .transpose()?
        .unwrap_or(true);
    let cidr = |s: &str, flag: &str, var: &str| -> Result<Ipv4Cidr, String> {
        s.parse::<Ipv4Cidr>()
            .map_err(|e| format!("--{flag} ({var}): {e}"))
    };
    let pool = get("sandbox-cidr", "COPPICE_SANDBOX_CIDR");
    let name = get("sandbox-network-name", "COPPICE_SANDBOX_NETWORK_NAME");
    let metadata = get("allow-metadata", "COPPICE_ALLOW_METADATA");
    let only = get("egress-only-to", "COPPICE_EGRESS_ONLY_TO");
    let forward = get("ip-forward", "COPPICE_IP_FORWARD");
    let upstream = get("dns-upstream", "COPPICE_DNS_UPSTREAM");
    let purge = get("purge-network", "COPPICE_PURGE_NETWORK");
    let ready = get("ready-namespaces", "COPPICE_READY_NAMESPACES");
    if !on {
        let given = [
            &pool, &name, &metadata, &only, &forward, &upstream, &ready, &purge,
        ];
        if given.iter().any(|v| v.is_some()) {
            return Err("--sandbox-cidr, --sandbox-network-name, --allow-metadata, \
                 --egress-only-to, --ip-forward, --dns-upstream, --ready-namespaces and \
                 --purge-network concern \
                 sandbox networking, which --sandbox-network off turns off"
                .into());
        }
        return Ok(None);
    }
    let name = name.unwrap_or_else(|| "coppice".into());
    let valid = !name.is_empty()
        && name.len() <= NetworkConfig::MAX_NAME
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !valid {
        return Err(format!(
            "--sandbox-network-name (COPPICE_SANDBOX_NETWORK_NAME): {name:?} is not 1 to {} \
             characters of [a-z0-9_] starting with a letter",
            NetworkConfig::MAX_NAME
        ));
    }
    Ok(Some(NetworkConfig {
        cidr: cidr(
            pool.as_deref().unwrap_or(NetworkConfig::DEFAULT_CIDR),
            "sandbox-cidr",
            "COPPICE_SANDBOX_CIDR",
        )?,
        name,
        allow_metadata: metadata
            .map(|v| flag("allow-metadata", "COPPICE_ALLOW_METADATA", &v))
            .transpose()?
            .unwrap_or(false),
        egress_only_to: only
            .map(|list| {
                list.split(',')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(|c| cidr(c, "egress-only-to", "COPPICE_EGRESS_ONLY_TO"))
                    .collect()
            })
            .transpose()?,
        ip_forward: forward
            .map(|v| flag("ip-forward", "COPPICE_IP_FORWARD", &v))
            .transpose()?
            .unwrap_or(true),
        dns_upstream: upstream
            .map(|list| {
                list.split(',')
                    .map(str::trim)
                    .filter(|a| !a.is_empty())
                    .map(|a| {
                        a.parse::<SocketAddrV4>()
                            .or_else(|_| {
                                a.parse::<std::net::Ipv4Addr>()
                                    .map(|ip| SocketAddrV4::new(ip, 53))
                            })
                            .map_err(|_| {
                                format!(
                                    "--dns-upstream (COPPICE_DNS_UPSTREAM): {a:?} is not an \
                                     IPv4 address with an optional port"
                                )
                            })
                    })
                    .collect::<Result<Vec<_>, String>>()
            })
            .transpose()?
            .unwrap_or_default(),
        ready_namespaces: ready
            .map(|v| {
                v.parse::<usize>().map_err(|_| {
                    format!("--ready-namespaces (COPPICE_READY_NAMESPACES): {v:?} is not a number")
                })
            })
            .transpose()?
            .unwrap_or(NetworkConfig::DEFAULT_READY),
        purge: purge
            .map(|v| flag("purge-network", "COPPICE_PURGE_NETWORK", &v))
            .transpose()?
            .unwrap_or(false),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str], env: &[(&str, &str)]) -> Result<Config, String> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::from_args_and_env(args.iter().map(|s| (*s).to_owned()), |k| {
            env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn defaults() {
        let c = parse(&[], &[]).unwrap();
        assert_eq!(c.listen, "127.0.0.1:3000".parse().unwrap());
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/coppice"));
        assert_eq!(
            c.template_cache,
            PathBuf::from("/var/lib/coppice/templates")
        );
        assert!(c.api_keys.is_empty());
        assert!(c.domain.is_none());
        assert_eq!(c.warm_pool, Config::DEFAULT_WARM_POOL);
        assert_eq!(c.max_sandboxes, None);
        assert_eq!(c.min_free_memory, None);
        let net = c.network.unwrap();
        assert_eq!(net.cidr.to_string(), NetworkConfig::DEFAULT_CIDR);
        assert_eq!(net.name, "coppice");
        assert!(!net.allow_metadata);
        assert_eq!(net.egress_only_to, None);
    }

    #[test]
    fn network_flags() {
        assert_eq!(
            parse(&["--sandbox-network", "off"], &[]).unwrap().network,
            None
        );
        let c = parse(
            &[
                "--sandbox-cidr",
                "198.51.100.64/26",
                "--sandbox-network-name=cpg1",
                "--allow-metadata",
                "true",
            ],
            &[("COPPICE_EGRESS_ONLY_TO", "198.51.100.0/24, 198.51.100.7")],
        )
        .unwrap();
        let net = c.network.unwrap();
        assert_eq!(net.cidr.to_string(), "198.51.100.64/26");
        assert_eq!(net.name, "cpg1");
        assert!(net.allow_metadata);
        assert_eq!(net.egress_only_to.clone().unwrap().len(), 2);
        assert!(net.dns_upstream.is_empty());
        assert_eq!(net.ready_namespaces, NetworkConfig::DEFAULT_READY);
        // A /26 has 61 usable addresses: at most 30 wait in ready namespaces.
        assert_eq!(net.effective_ready(), 30);
        let c = parse(&["--ready-namespaces", "4"], &[]).unwrap();
        assert_eq!(c.network.unwrap().effective_ready(), 4);
        let c = parse(&["--dns-upstream", "198.51.100.2, 198.51.100.3:5353"], &[]).unwrap();
        let up: Vec<String> = c
            .network
            .unwrap()
            .dns_upstream
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(up, ["198.51.100.2:53", "198.51.100.3:5353"]);
        for (args, needle) in [
            (&["--sandbox-network", "maybe"][..], "--sandbox-network"),
            (&["--sandbox-cidr", "10.0.0.0/40"][..], "--sandbox-cidr"),
            (
                &["--sandbox-network-name", "Bad-Name"][..],
                "--sandbox-network-name",
            ),
            (
                &["--sandbox-network-name", "elevenchars"][..],
                "--sandbox-network-name",
            ),
            (&["--egress-only-to", "nowhere"][..], "--egress-only-to"),
            (&["--dns-upstream", "resolver"][..], "--dns-upstream"),
            (&["--ready-namespaces", "many"][..], "--ready-namespaces"),
            (
                &["--sandbox-network", "off", "--sandbox-cidr", "10.0.0.0/24"][..],
                "turns off",
            ),
        ] {
            let err = parse(args, &[]).unwrap_err();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }

    #[test]
    fn admission_limits() {
        let c = parse(&["--max-sandboxes", "3", "--min-free-memory", "2G"], &[]).unwrap();
        assert_eq!(c.max_sandboxes, Some(3));
        assert_eq!(c.min_free_memory, Some(2 << 30));
        let c = parse(
            &[],
            &[
                ("COPPICE_MAX_SANDBOXES", "40"),
                ("COPPICE_MIN_FREE_MEMORY", "536870912"),
            ],
        )
        .unwrap();
        assert_eq!(c.max_sandboxes, Some(40));
        assert_eq!(c.min_free_memory, Some(512 << 20));
        assert!(parse(&["--max-sandboxes", "0"], &[])
            .unwrap_err()
            .contains("at least 1"));
        assert!(parse(&["--min-free-memory", "lots"], &[])
            .unwrap_err()
            .contains("--min-free-memory"));
        assert!(USAGE.contains("--max-sandboxes") && USAGE.contains("COPPICE_MIN_FREE_MEMORY"));
    }

    #[test]
    fn prepare_templates_is_a_yes_or_no() {
        assert!(!parse(&[], &[]).unwrap().prepare_templates);
        assert!(
            parse(&["--prepare-templates", "true"], &[])
                .unwrap()
                .prepare_templates
        );
        assert!(
            parse(&[], &[("COPPICE_PREPARE_TEMPLATES", "true")])
                .unwrap()
                .prepare_templates
        );
        let err = parse(&["--prepare-templates", "yes"], &[]).unwrap_err();
        assert!(err.contains("--prepare-templates"), "{err}");
    }

    #[test]
    fn warm_pool_size() {
        assert_eq!(parse(&["--warm-pool", "0"], &[]).unwrap().warm_pool, 0);
        assert_eq!(
            parse(&[], &[("COPPICE_WARM_POOL", "12")])
                .unwrap()
                .warm_pool,
            12
        );
        assert!(parse(&["--warm-pool", "-1"], &[])
            .unwrap_err()
            .contains("--warm-pool"));
        assert!(parse(&["--warm-pool", "100000"], &[])
            .unwrap_err()
            .contains("more than"));
    }

    #[test]
    fn flags_win_over_env() {
        let c = parse(
            &["--listen", "127.0.0.1:4000", "--state-dir=/tmp/s"],
            &[
                ("COPPICE_LISTEN", "127.0.0.1:5000"),
                ("COPPICE_API_KEYS", "a, b,,"),
            ],
        )
        .unwrap();
        assert_eq!(c.listen.port(), 4000);
        assert_eq!(c.state_dir, PathBuf::from("/tmp/s"));
        assert_eq!(c.api_keys, ["a", "b"]);
    }

    #[test]
    fn host_routing_listeners_need_a_domain() {
        parse(&["--envd-listen", ":49983"], &[]).unwrap_err();
        let c = parse(
            &["--envd-listen", ":49983", "--domain", "sbx.example."],
            &[],
        )
        .unwrap();
        assert_eq!(c.extra_listen, ["127.0.0.1:49983".parse().unwrap()]);
        assert_eq!(c.domain.as_deref(), Some("sbx.example"));
    }

    #[test]
    fn bad_input_says_what_was_wrong() {
        assert!(parse(&["--listen", "nowhere"], &[])
            .unwrap_err()
            .contains("--listen"));
        assert!(parse(&["--bogus", "1"], &[])
            .unwrap_err()
            .contains("unknown option"));
        assert!(parse(&["--listen"], &[])
            .unwrap_err()
            .contains("needs a value"));
        assert!(parse(&["stray"], &[]).unwrap_err().contains("unexpected"));
    }

    #[test]
    fn webhook_flags() {
        let c = parse(&[], &[]).unwrap();
        assert!(c.webhook.is_none());
        assert_eq!(c.event_retention_days, 7);
        assert_eq!(c.event_retention_count, None);
        let c = parse(
            &[
                "--webhook-url",
                "http://127.0.0.1:9/hook",
                "--webhook-allow",
                "127.0.0.0/8, ::1",
                "--event-retention-count=100",
            ],
            &[("COPPICE_WEBHOOK_SECRET", "s3cret")],
        )
        .unwrap();
        let hook = c.webhook.unwrap();
        assert_eq!(hook.url, "http://127.0.0.1:9/hook");
        assert_eq!(hook.secret, "s3cret");
        assert_eq!(c.webhook_allow.len(), 2);
        assert_eq!(c.event_retention_count, Some(100));
        assert!(!format!("{hook:?}").contains("s3cret"));
        assert!(parse(&["--webhook-url", "http://x/"], &[])
            .unwrap_err()
            .contains("--webhook-secret"));
        assert!(parse(&["--webhook-deny", "10.0.0.0/99"], &[])
            .unwrap_err()
            .contains("--webhook-deny"));
        assert_eq!(c.webhook_ca_file, None);
        let c = parse(&[], &[("COPPICE_WEBHOOK_CA_FILE", "/etc/coppice/ca.pem")]).unwrap();
        assert_eq!(
            c.webhook_ca_file,
            Some(PathBuf::from("/etc/coppice/ca.pem"))
        );
    }

    #[test]
    fn registries_are_flags_or_variables_and_plain_http_is_explicit() {
        let c = parse(&[], &[]).unwrap();
        assert_eq!((c.registry_mirror, c.insecure_registries), (None, vec![]));
        let c = parse(
            &[
                "--registry-mirror",
                "http://198.51.100.9:5000",
                "--insecure-registry",
                "198.51.100.9:5000",
                "--insecure-registry",
                "r.test:5001",
            ],
            &[("COPPICE_INSECURE_REGISTRY", "ignored:1")],
        )
        .unwrap();
        assert_eq!(
            c.registry_mirror.as_deref(),
            Some("http://198.51.100.9:5000")
        );
        assert_eq!(c.insecure_registries, ["198.51.100.9:5000", "r.test:5001"]);
        let c = parse(
            &[],
            &[
                ("COPPICE_REGISTRY_MIRROR", "mirror.test"),
                ("COPPICE_INSECURE_REGISTRY", "a:1, b:2"),
            ],
        )
        .unwrap();
        assert_eq!(c.registry_mirror.as_deref(), Some("mirror.test"));
        assert_eq!(c.insecure_registries, ["a:1", "b:2"]);
        let e = parse(&["--registry-mirror", "http://198.51.100.9:5000"], &[]).unwrap_err();
        assert!(e.contains("--insecure-registry 198.51.100.9:5000"), "{e}");
    }

    #[test]
    fn tls_files_come_in_pairs() {
        assert_eq!(parse(&[], &[]).unwrap().tls_files, None);
        let c = parse(
            &["--tls-cert", "/etc/coppice/cert.pem"],
            &[("COPPICE_TLS_KEY", "/etc/coppice/key.pem")],
        )
        .unwrap();
        assert_eq!(
            c.tls_files,
            Some(TlsFiles {
                cert: "/etc/coppice/cert.pem".into(),
                key: "/etc/coppice/key.pem".into(),
            })
        );
        assert!(parse(&["--tls-cert", "c.pem"], &[])
            .unwrap_err()
            .contains("--tls-key"));
        assert!(parse(&[], &[("COPPICE_TLS_KEY", "k.pem")])
            .unwrap_err()
            .contains("--tls-cert"));
        assert!(USAGE.contains("--tls-cert") && USAGE.contains("COPPICE_TLS_KEY"));
    }
}
