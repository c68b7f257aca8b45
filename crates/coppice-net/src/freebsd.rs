//! The FreeBSD driver's command plan: what the driver runs for the host, for each sandbox
//! and for a policy change, as plain data. It compiles and is tested on every OS; the
//! driver that executes it (through a helper with timeouts, like `coppice-zfs`'s) is later
//! work.
//!
//! The datapath mirrors the Linux one: a VNET jail per sandbox holds the `b` end of an
//! `epair(4)`; the `a` end, renamed `<prefix><offset>`, is a `private` member of a bridge
//! (private members cannot talk to each other); the bridge holds the gateway address; pf
//! NATs the pool out of the egress interface. The driver's pf rules live in an anchor
//! (`coppice` by default) that the operator hooks into `/etc/pf.conf` once
//! ([`FreebsdPlan::pf_conf_hooks`]); each sandbox gets a sub-anchor `coppice/sbx/<id>` with
//! its own `allow` and `deny` tables, so a policy change reloads one small anchor and never
//! touches another sandbox.
//!
//! One difference from Linux: root in a VNET jail may reconfigure the jail's own interface
//! and routes. pf therefore pins each port to its sandbox's address (`block in on <port>
//! from !<addr>`), so a changed address or route inside gains nothing.
//!
//! Blocked egress: the rules that stand for a sandbox's violation (the host, metadata, the
//! operator's allow-list, other sandboxes, its own policy) log to a `pflog(4)` interface of
//! the driver's own (`pflog1` by default, so the operator's `pflogd` on `pflog0` does not
//! see them). Reading it (bpf, `struct pfloghdr`, whose anchor path names the sandbox) and
//! limiting the reports per sandbox (pf has no log rate limit) is not planned: the FreeBSD
//! driver's `Network::blocked` is to return `Unsupported` until it is.

use std::net::Ipv4Addr;

use coppice_lifecycle::backend::{BackendError, EgressPolicy, Ipv4Cidr, SandboxId};

use crate::nft::{minimal, DNS_PORT};
use crate::pool::Pool;

/// How the FreeBSD driver is set up; [`FreebsdNetConfig::new`] gives the defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreebsdNetConfig {
    /// The sandbox address pool, a /16 to a /29; the first usable address is the bridge's.
    pub pool: Ipv4Cidr,
    /// The host's egress interface, which NAT uses (e.g. `vtnet0`).
    pub egress_interface: String,
    /// The bridge the driver owns (default `coppice0`).
    pub bridge: String,
    /// The pf anchor the driver owns (default `coppice`).
    pub anchor: String,
    /// Prefix of the host-side epair names (default `cpv`).
    pub link_prefix: String,
    /// The first `epair(4)` unit number; a sandbox at pool offset `n` uses unit
    /// `epair_base + n` (default 1000, clear of units made by hand).
    pub epair_base: u32,
    /// Let sandboxes reach 169.254.0.0/16 (cloud metadata); default false.
    pub allow_metadata: bool,
    /// If set, the only destinations any sandbox may reach, whatever its policy.
    pub egress_only_to: Option<Vec<Ipv4Cidr>>,
    /// The `pflog(4)` interface violations are logged to (default `pflog1`).
    pub log_interface: String,
}

impl FreebsdNetConfig {
    /// The defaults, for `pool` and the egress interface.
    pub fn new(pool: Ipv4Cidr, egress_interface: impl Into<String>) -> Self {
        Self {
            pool,
            egress_interface: egress_interface.into(),
            bridge: "coppice0".into(),
            anchor: "coppice".into(),
            link_prefix: "cpv".into(),
            epair_base: 1000,
            allow_metadata: false,
            egress_only_to: None,
            log_interface: "pflog1".into(),
        }
    }
}

/// One command: its argument vector and what goes to its stdin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Input (pf rules for `pfctl -f -`).
    pub stdin: Option<String>,
}

impl Step {
    fn new(argv: &[&str]) -> Self {
        Self {
            argv: argv.iter().map(|s| (*s).to_owned()).collect(),
            stdin: None,
        }
    }

    fn with_stdin(mut self, stdin: String) -> Self {
        self.stdin = Some(stdin);
        self
    }

    /// The command as one line (without its input).
    pub fn line(&self) -> String {
        self.argv.join(" ")
    }
}

/// Everything one sandbox's network takes on FreeBSD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxPlan {
    /// Run on the host before the jail is created: the epair, its bridge membership, the
    /// sandbox's anchor.
    pub before_jail: Vec<Step>,
    /// Parameters for `jail -c`: a VNET jail that takes the sandbox end of the epair.
    pub jail_params: Vec<(String, String)>,
    /// Run inside the new jail (`jexec <jid> ...`), before its init: loopback, address,
    /// default route.
    pub in_jail: Vec<Step>,
    /// The host-side interface.
    pub host_interface: String,
    /// The interface the jail receives.
    pub jail_interface: String,
}

/// The FreeBSD network driver's plans.
#[derive(Debug, Clone)]
pub struct FreebsdPlan {
    config: FreebsdNetConfig,
    pool: Pool,
}

impl FreebsdPlan {
    /// Checks `config`.
    pub fn new(config: FreebsdNetConfig) -> Result<Self, BackendError> {
        let pool = Pool::new(config.pool)?;
        for (field, v) in [
            ("bridge name", &config.bridge),
            ("pf anchor", &config.anchor),
            ("link prefix", &config.link_prefix),
            ("egress interface", &config.egress_interface),
            ("log interface", &config.log_interface),
        ] {
            let ok = !v.is_empty()
                && v.len() <= 15
                && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !ok {
                return Err(BackendError::InvalidSpec {
                    field,
                    reason: format!("{v:?} is not 1 to 15 characters of [A-Za-z0-9_]"),
                });
            }
        }
        Ok(Self { config, pool })
    }

    /// The bridge's address, every sandbox's gateway and resolver.
    pub fn gateway(&self) -> Ipv4Addr {
        self.pool.gateway()
    }

    /// The two lines the operator adds to `/etc/pf.conf` (once) so the driver's anchor is
    /// evaluated; the driver never loads the main ruleset.
    pub fn pf_conf_hooks(&self) -> String {
        let a = &self.config.anchor;
        format!("nat-anchor \"{a}\"\nanchor \"{a}\"\n")
    }

    /// Host set-up at driver start: modules, forwarding, the bridge and the top anchor.
    pub fn host_setup(&self) -> Vec<Step> {
        let c = &self.config;
        let gw = format!("{}/{}", self.gateway(), self.pool.cidr().prefix());
        vec![
            Step::new(&["kldload", "-n", "if_bridge"]),
            Step::new(&["kldload", "-n", "if_epair"]),
            Step::new(&["kldload", "-n", "pf"]),
            Step::new(&["kldload", "-n", "pflog"]),
            Step::new(&["sysctl", "net.inet.ip.forwarding=1"]),
            // Filter bridged traffic on the member ports, where each sandbox has its rules.
            Step::new(&["sysctl", "net.link.bridge.pfil_member=1"]),
            Step::new(&["ifconfig", "bridge", "create", "name", &c.bridge]),
            Step::new(&["ifconfig", &c.bridge, "inet", &gw, "up"]),
            Step::new(&["ifconfig", &c.log_interface, "create"]),
            Step::new(&["ifconfig", &c.log_interface, "up"]),
            Step::new(&["pfctl", "-a", &c.anchor, "-f", "-"]).with_stdin(self.top_anchor()),
            Step::new(&["pfctl", "-e"]),
        ]
    }

    /// The top anchor: NAT and the operator's limits, then every sandbox's sub-anchor.
    pub fn top_anchor(&self) -> String {
        let c = &self.config;
        let pool = self.pool.cidr();
        let gw = self.gateway();
        let mut s = String::new();
        if let Some(only) = &c.egress_only_to {
            s.push_str(&format!(
                "table <operator_allow> const {{ {} }}\n",
                join(&minimal(only))
            ));
        }
        s.push_str(&format!(
            "nat on {ext} inet from {pool} to any -> ({ext})\n",
            ext = c.egress_interface
        ));
        // No interface on these two: traffic for the host is matched wherever pf sees it.
        s.push_str(&format!(
            "pass in quick inet proto {{ udp tcp }} from {pool} to {gw} port {DNS_PORT}\n"
        ));
        let log = self.log();
        s.push_str(&format!(
            "block drop in {log} quick inet from {pool} to (self)\n"
        ));
        if !c.allow_metadata {
            s.push_str(&format!(
                "block drop in {log} quick inet from {pool} to 169.254.0.0/16\n"
            ));
        }
        if c.egress_only_to.is_some() {
            s.push_str(&format!(
                "block drop in {log} quick inet from {pool} to ! <operator_allow>\n"
            ));
        }
        s.push_str(&format!(
            "block drop in {log} quick inet from {pool} to {pool}\n"
        ));
        s.push_str("block drop in quick inet6 all\n");
        s.push_str("anchor \"sbx/*\"\n");
        s
    }

    /// `log (to <log interface>)`, for the rules whose drops are violations.
    fn log(&self) -> String {
        format!("log (to {})", self.config.log_interface)
    }

    fn ports(&self, addr: Ipv4Addr) -> Result<(String, String, u32), BackendError> {
        let offset = self
            .pool
            .offset(addr)
            .ok_or_else(|| BackendError::InvalidSpec {
                field: "sandbox address",
                reason: format!("{addr} is not a sandbox address of {}", self.pool.cidr()),
            })?;
        let unit = self.config.epair_base + offset;
        Ok((
            format!("{}{offset:x}", self.config.link_prefix),
            format!("epair{unit}b"),
            unit,
        ))
    }

    fn anchor_of(&self, id: &SandboxId) -> String {
        format!("{}/sbx/{id}", self.config.anchor)
    }

    /// The sub-anchor of one sandbox: its port pinned to its address, then E2B's order —
    /// `allow` wins, then `deny`, then internet access.
    pub fn sandbox_anchor(
        &self,
        addr: Ipv4Addr,
        policy: &EgressPolicy,
    ) -> Result<String, BackendError> {
        let (port, _, _) = self.ports(addr)?;
        let mut s = String::new();
        s.push_str(&table("allow", &policy.allow_out));
        s.push_str(&table("deny", &policy.deny_out));
        s.push_str(&format!(
            "block drop in quick on {port} inet from ! {addr}\n"
        ));
        s.push_str(&format!(
            "pass in quick on {port} inet from {addr} to <allow> keep state\n"
        ));
        let log = self.log();
        s.push_str(&format!(
            "block drop in {log} quick on {port} inet from {addr} to <deny>\n"
        ));
        if !policy.allow_internet {
            s.push_str(&format!(
                "block drop in {log} quick on {port} inet from {addr} to any\n"
            ));
        }
        s.push_str(&format!(
            "pass in quick on {port} inet from {addr} to any keep state\n"
        ));
        Ok(s)
    }

    /// What one sandbox's network takes.
    pub fn attach(
        &self,
        id: &SandboxId,
        addr: Ipv4Addr,
        policy: &EgressPolicy,
    ) -> Result<SandboxPlan, BackendError> {
        let (port, jail_if, unit) = self.ports(addr)?;
        let epair = format!("epair{unit}");
        let cidr = format!("{addr}/{}", self.pool.cidr().prefix());
        let gw = self.gateway().to_string();
        Ok(SandboxPlan {
            before_jail: vec![
                Step::new(&["ifconfig", &epair, "create"]),
                Step::new(&["ifconfig", &format!("{epair}a"), "name", &port]),
                Step::new(&["ifconfig", &port, "up"]),
                Step::new(&[
                    "ifconfig",
                    &self.config.bridge,
                    "addm",
                    &port,
                    "private",
                    &port,
                ]),
                Step::new(&["pfctl", "-a", &self.anchor_of(id), "-f", "-"])
                    .with_stdin(self.sandbox_anchor(addr, policy)?),
            ],
            jail_params: vec![
                ("vnet".into(), String::new()),
                ("vnet.interface".into(), jail_if.clone()),
            ],
            in_jail: vec![
                Step::new(&["ifconfig", "lo0", "inet", "127.0.0.1/8", "up"]),
                Step::new(&["ifconfig", &jail_if, "inet", &cidr, "up"]),
                Step::new(&["route", "add", "default", &gw]),
            ],
            host_interface: port,
            jail_interface: jail_if,
        })
    }

    /// A policy change: the sandbox's anchor reloaded in one `pfctl` transaction, then the
    /// states of its connections killed so the new rules apply to them at once (states
    /// that are still allowed are re-made by the next packet: `keep state` on a pass rule).
    pub fn update_policy(
        &self,
        id: &SandboxId,
        addr: Ipv4Addr,
        policy: &EgressPolicy,
    ) -> Result<Vec<Step>, BackendError> {
        let a = addr.to_string();
        Ok(vec![
            Step::new(&["pfctl", "-a", &self.anchor_of(id), "-f", "-"])
                .with_stdin(self.sandbox_anchor(addr, policy)?),
            Step::new(&["pfctl", "-k", &a]),
        ])
    }

    /// Release, after the jail is removed (its end of the epair is back on the host):
    /// the epair, the anchor and every state of the address.
    pub fn release(&self, id: &SandboxId, addr: Ipv4Addr) -> Result<Vec<Step>, BackendError> {
        let (port, _, _) = self.ports(addr)?;
        let a = addr.to_string();
        Ok(vec![
            Step::new(&["ifconfig", &self.config.bridge, "deletem", &port]),
            Step::new(&["ifconfig", &port, "destroy"]),
            Step::new(&["pfctl", "-a", &self.anchor_of(id), "-F", "all"]),
            Step::new(&["pfctl", "-k", &a]),
            Step::new(&["pfctl", "-k", "0.0.0.0/0", "-k", &a]),
        ])
    }

    /// Uninstall: the top anchor and the bridge.
    pub fn teardown(&self) -> Vec<Step> {
        vec![
            Step::new(&["pfctl", "-a", &self.config.anchor, "-F", "all"]),
            Step::new(&["ifconfig", &self.config.bridge, "destroy"]),
        ]
    }
}

/// A pf table declaration; `persist` keeps it when empty.
fn table(name: &str, list: &[Ipv4Cidr]) -> String {
    let list = minimal(list);
    if list.is_empty() {
        format!("table <{name}> persist\n")
    } else {
        format!("table <{name}> persist {{ {} }}\n", join(&list))
    }
}

fn join(list: &[Ipv4Cidr]) -> String {
    list.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Ipv4Cidr {
        s.parse().unwrap()
    }

    fn plan() -> FreebsdPlan {
        let mut c = FreebsdNetConfig::new(cidr("198.51.100.128/26"), "vtnet0");
        c.egress_only_to = Some(vec![cidr("198.51.100.0/24")]);
        FreebsdPlan::new(c).unwrap()
    }

    fn lines(steps: &[Step]) -> Vec<String> {
        steps.iter().map(Step::line).collect()
    }

    #[test]
    fn the_host_gets_a_bridge_forwarding_and_the_top_anchor() {
        let p = plan();
        assert_eq!(
            p.pf_conf_hooks(),
            "nat-anchor \"coppice\"\nanchor \"coppice\"\n"
        );
        let steps = p.host_setup();
        assert_eq!(
            lines(&steps)[3..11],
            [
                "kldload -n pflog",
                "sysctl net.inet.ip.forwarding=1",
                "sysctl net.link.bridge.pfil_member=1",
                "ifconfig bridge create name coppice0",
                "ifconfig coppice0 inet 198.51.100.129/26 up",
                "ifconfig pflog1 create",
                "ifconfig pflog1 up",
                "pfctl -a coppice -f -",
            ]
        );
        let top = steps[10].stdin.as_deref().unwrap();
        let at = |n: &str| top.find(n).unwrap_or_else(|| panic!("{n:?} not in\n{top}"));
        assert!(
            at("nat on vtnet0 inet from 198.51.100.128/26 to any -> (vtnet0)")
                < at("anchor \"sbx/*\"")
        );
        assert!(at("port 53") < at("to (self)"));
        assert!(at("to 169.254.0.0/16") < at("anchor \"sbx/*\""));
        assert!(
            at("table <operator_allow> const { 198.51.100.0/24 }") < at("to ! <operator_allow>")
        );
        assert!(at("to ! <operator_allow>") < at("anchor \"sbx/*\""));
        // Violations are logged to the driver's pflog interface; IPv6 is not a violation.
        for rule in [
            "block drop in log (to pflog1) quick inet from 198.51.100.128/26 to (self)",
            "block drop in log (to pflog1) quick inet from 198.51.100.128/26 to 169.254.0.0/16",
            "block drop in log (to pflog1) quick inet from 198.51.100.128/26 to ! <operator_allow>",
            "block drop in log (to pflog1) quick inet from 198.51.100.128/26 to 198.51.100.128/26",
            "block drop in quick inet6 all",
        ] {
            assert!(top.contains(&format!("{rule}\n")), "{rule:?} not in\n{top}");
        }
    }

    #[test]
    fn a_sandbox_is_a_vnet_jail_on_a_private_bridge_port() {
        let p = plan();
        let id = SandboxId::new("abc").unwrap();
        let addr: Ipv4Addr = "198.51.100.130".parse().unwrap();
        let s = p.attach(&id, addr, &EgressPolicy::default()).unwrap();
        assert_eq!(
            lines(&s.before_jail),
            [
                "ifconfig epair1002 create",
                "ifconfig epair1002a name cpv2",
                "ifconfig cpv2 up",
                "ifconfig coppice0 addm cpv2 private cpv2",
                "pfctl -a coppice/sbx/abc -f -",
            ]
        );
        assert_eq!(
            s.jail_params,
            [
                ("vnet".to_owned(), String::new()),
                ("vnet.interface".to_owned(), "epair1002b".to_owned())
            ]
        );
        assert_eq!(
            lines(&s.in_jail),
            [
                "ifconfig lo0 inet 127.0.0.1/8 up",
                "ifconfig epair1002b inet 198.51.100.130/26 up",
                "route add default 198.51.100.129",
            ]
        );
        let outside: Ipv4Addr = "198.51.100.129".parse().unwrap();
        let r = p.attach(&id, outside, &EgressPolicy::default());
        assert!(matches!(r, Err(BackendError::InvalidSpec { .. })), "{r:?}");
    }

    #[test]
    fn the_sandbox_anchor_keeps_e2b_order() {
        let p = plan();
        let addr: Ipv4Addr = "198.51.100.130".parse().unwrap();
        let policy = EgressPolicy {
            allow_internet: false,
            allow_out: vec![cidr("198.51.100.66"), cidr("198.51.100.64/28")],
            deny_out: vec![cidr("198.51.100.0/24")],
            allow_domains: vec![],
        };
        let text = p.sandbox_anchor(addr, &policy).unwrap();
        assert_eq!(
            text,
            "table <allow> persist { 198.51.100.64/28 }\n\
             table <deny> persist { 198.51.100.0/24 }\n\
             block drop in quick on cpv2 inet from ! 198.51.100.130\n\
             pass in quick on cpv2 inet from 198.51.100.130 to <allow> keep state\n\
             block drop in log (to pflog1) quick on cpv2 inet from 198.51.100.130 to <deny>\n\
             block drop in log (to pflog1) quick on cpv2 inet from 198.51.100.130 to any\n\
             pass in quick on cpv2 inet from 198.51.100.130 to any keep state\n"
        );
        let open = p.sandbox_anchor(addr, &EgressPolicy::default()).unwrap();
        assert!(!open.contains("to any\n"), "{open}");
    }

    #[test]
    fn updates_reload_one_anchor_and_kill_states_and_release_removes_all() {
        let p = plan();
        let id = SandboxId::new("abc").unwrap();
        let addr: Ipv4Addr = "198.51.100.130".parse().unwrap();
        let closed = EgressPolicy {
            allow_internet: false,
            ..EgressPolicy::default()
        };
        let up = p.update_policy(&id, addr, &closed).unwrap();
        assert_eq!(
            lines(&up),
            ["pfctl -a coppice/sbx/abc -f -", "pfctl -k 198.51.100.130"]
        );
        assert!(up[0].stdin.as_deref().unwrap().contains("to any\n"));
        assert_eq!(
            lines(&p.release(&id, addr).unwrap()),
            [
                "ifconfig coppice0 deletem cpv2",
                "ifconfig cpv2 destroy",
                "pfctl -a coppice/sbx/abc -F all",
                "pfctl -k 198.51.100.130",
                "pfctl -k 0.0.0.0/0 -k 198.51.100.130",
            ]
        );
        assert_eq!(
            lines(&p.teardown()),
            ["pfctl -a coppice -F all", "ifconfig coppice0 destroy"]
        );
    }

    #[test]
    fn names_are_checked() {
        let c = FreebsdNetConfig {
            anchor: "bad anchor".into(),
            ..FreebsdNetConfig::new(cidr("198.51.100.128/26"), "vtnet0")
        };
        assert!(matches!(
            FreebsdPlan::new(c),
            Err(BackendError::InvalidSpec {
                field: "pf anchor",
                ..
            })
        ));
    }
}
