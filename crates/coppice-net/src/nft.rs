//! The nftables ruleset the Linux driver owns, as text for `nft -f -`.
//!
//! One `inet` table holds every rule and six named sets; a sandbox's policy is a handful of
//! set elements keyed by its address, so attach, policy updates and release change elements
//! and never rules. One set, [`RESOLVED_SET`], holds elements with timeouts that the DNS
//! forwarder's answers add. A `bridge` table of the same name drops frames between the
//! bridge's ports, so sandboxes cannot reach each other even at layer 2. Named counters
//! count each kind of drop (tests read them; operators can too). The drops that stand for a
//! sandbox reaching for something it may not (see [`VIOLATIONS`]) also send new connection
//! attempts to an NFLOG group, rate-limited per sandbox (the set `violation_rate`), for
//! `linux::nflog` to read; the drop itself is unconditional. Everything here is pure text,
//! loaded once at start with the elements of every recorded sandbox; later element changes
//! go over netlink (`linux::netlink::Netlink::change_sets`). The values come from validated
//! types and checked names, so nothing needs quoting.

use std::fmt::Write;
use std::net::Ipv4Addr;

use coppice_lifecycle::backend::{BlockReason, EgressPolicy, Ipv4Cidr};

/// The port of the DNS forwarder on the gateway address, the one host port sandboxes reach.
pub(crate) const DNS_PORT: u16 = 53;

/// The set of destinations sandboxes resolved through the DNS forwarder for one of their
/// allowed domains (sandbox . destination), each element with its answer's clamped TTL as
/// timeout. Traffic from the sandbox to one renews it to [`crate::dns::MAX_ALLOW`], so a
/// connection outlives the answer that opened it; an unused one expires on its own.
pub(crate) const RESOLVED_SET: &str = "allow_resolved";
/// Most elements of [`RESOLVED_SET`], all sandboxes together.
const RESOLVED_SET_SIZE: u32 = 262_144;

/// What the ruleset is built from.
#[derive(Debug, Clone)]
pub(crate) struct Rules<'a> {
    /// Table name (in both the `inet` and the `bridge` family).
    pub(crate) table: &'a str,
    /// The bridge the sandboxes hang off.
    pub(crate) bridge: &'a str,
    /// Prefix of the host-side veth names.
    pub(crate) link_prefix: &'a str,
    /// The sandbox pool.
    pub(crate) pool: Ipv4Cidr,
    /// The bridge's address.
    pub(crate) gateway: Ipv4Addr,
    /// Whether sandboxes may reach 169.254.0.0/16.
    pub(crate) allow_metadata: bool,
    /// If set, the only destinations any sandbox may reach.
    pub(crate) egress_only_to: Option<&'a [Ipv4Cidr]>,
    /// The NFLOG group violations are logged to.
    pub(crate) log_group: u16,
}

/// How many violation reports per second the kernel passes on for one sandbox, after a
/// burst of [`LOG_BURST`]; the rest are dropped unlogged (and still counted).
pub(crate) const LOG_RATE: u32 = 5;
/// The burst of [`LOG_RATE`].
pub(crate) const LOG_BURST: u32 = 10;

/// The drops that count as a sandbox's violation, one per [`BlockReason`]: each has a chain
/// `deny_<reason>` that logs (rate-limited) and drops, with the log prefix
/// `<table>:<reason>` ([`log_prefix`]) that tells the reader which it was.
///
/// Not violations: inbound traffic and the reply direction of connections (the sandbox did
/// not start them), IPv6 (not routed at all yet; a sandbox's kernel sends some on its own),
/// spoofed sources (they name no sandbox), broadcast and multicast to the host (daemons'
/// chatter, not an attempt to reach it), and frames between bridge ports (the bridge table
/// sees a sandbox's every ARP broadcast there; an IP packet to a neighbour meets the
/// `sandbox` rule instead).
pub(crate) const VIOLATIONS: [BlockReason; 5] = BlockReason::ALL;

/// The log prefix of `reason`'s drops in the table `table`.
pub(crate) fn log_prefix(table: &str, reason: BlockReason) -> String {
    format!("{table}:{}", reason.as_str())
}

/// The reason a log prefix of the table `table` stands for.
pub(crate) fn reason_of_prefix(table: &str, prefix: &str) -> Option<BlockReason> {
    let name = prefix.strip_prefix(table)?.strip_prefix(':')?;
    BlockReason::from_name(name)
}

/// The verdict that counts and drops a violation: `counter name <counter> goto deny_<reason>`.
fn verdict(reason: BlockReason) -> String {
    let counter = match reason {
        BlockReason::Policy => counter::POLICY,
        BlockReason::Operator => counter::OPERATOR,
        BlockReason::Metadata => counter::METADATA,
        BlockReason::Host => counter::HOST,
        BlockReason::Sandbox => counter::SANDBOX,
    };
    format!("counter name {counter} goto deny_{}", reason.as_str())
}

/// The names of the drop counters, for [`Rules::counter`] readers.
pub(crate) mod counter {
    /// Sandbox to one of the host's own addresses.
    pub(crate) const HOST: &str = "drop_host";
    /// Sandbox to 169.254.0.0/16.
    pub(crate) const METADATA: &str = "drop_metadata";
    /// Outside the operator's egress allow-list.
    pub(crate) const OPERATOR: &str = "drop_operator";
    /// Denied by the sandbox's own policy.
    pub(crate) const POLICY: &str = "drop_policy";
    /// Sandbox to sandbox, routed.
    pub(crate) const SANDBOX: &str = "drop_sandbox";
    /// Sandbox to sandbox, bridged (in the `bridge` table).
    pub(crate) const BRIDGED: &str = "drop_bridged";
    /// Unsolicited traffic towards a sandbox.
    pub(crate) const INBOUND: &str = "drop_inbound";
}

impl Rules<'_> {
    /// The whole ruleset, replacing any earlier version of the driver's tables atomically
    /// (the add-then-delete idiom makes the delete succeed whether or not they exist).
    pub(crate) fn load_script(&self) -> String {
        let Rules {
            table,
            bridge,
            link_prefix,
            pool,
            gateway,
            log_group,
            ..
        } = *self;
        let pool = pool.normalized();
        let mut s = String::new();
        let _ = writeln!(s, "add table inet {table}\ndelete table inet {table}");
        let _ = writeln!(s, "add table bridge {table}\ndelete table bridge {table}");
        let _ = writeln!(s, "table inet {table} {{");
        for c in [
            counter::HOST,
            counter::METADATA,
            counter::OPERATOR,
            counter::POLICY,
            counter::SANDBOX,
            counter::INBOUND,
        ] {
            let _ = writeln!(s, "  counter {c} {{ }}");
        }
        if let Some(only) = self.egress_only_to {
            let _ = write!(
                s,
                "  set operator_allow {{ type ipv4_addr; flags interval; auto-merge;"
            );
            if !only.is_empty() {
                let list = minimal(only);
                let _ = write!(
                    s,
                    " elements = {};",
                    braced(list.iter().map(ToString::to_string))
                );
            }
            let _ = writeln!(s, " }}");
        }
        let _ = writeln!(s, "  set no_internet {{ type ipv4_addr; }}");
        // One rate-limit bucket per sandbox address, shared by every kind of violation. Each
        // hit refreshes its timeout, so a flooding sandbox keeps its spent bucket, and an
        // idle one expires (a reused address starts afresh). One element per address of the
        // pool fits.
        let _ = writeln!(
            s,
            "  set violation_rate {{ type ipv4_addr; size {}; flags dynamic,timeout; timeout 1m; }}",
            pool_size(pool)
        );
        for set in ["allow_out", "deny_out"] {
            let _ = writeln!(
                s,
                "  set {set} {{ type ipv4_addr . ipv4_addr; flags interval; }}"
            );
        }
        let _ = writeln!(
            s,
            "  set {RESOLVED_SET} {{ type ipv4_addr . ipv4_addr; flags dynamic, timeout; size {RESOLVED_SET_SIZE}; }}"
        );
        let _ = write!(
            s,
            "  chain input {{
    type filter hook input priority filter; policy accept;
    iifname \"{bridge}\" jump sandbox_to_host
  }}
  chain sandbox_to_host {{
    ct state established,related accept
    ip daddr {gateway} udp dport {DNS_PORT} accept
    ip daddr {gateway} tcp dport {DNS_PORT} accept
    {host}
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname \"{bridge}\" tcp flags syn tcp option maxseg size set rt mtu
    iifname \"{bridge}\" jump sandbox_out
    oifname \"{bridge}\" ct state established,related jump sandbox_reply
    oifname \"{bridge}\" counter name {inbound} drop
  }}
  chain sandbox_reply {{
    ip daddr . ip saddr @allow_out accept
    ip daddr . ip saddr @{RESOLVED_SET} accept
    ip daddr . ip saddr @deny_out counter name {policy} drop
    ip daddr @no_internet counter name {policy} drop
    accept
  }}
  chain sandbox_out {{
    meta nfproto ipv6 drop
    ip saddr != {pool} drop
    oifname \"{bridge}\" {sandbox}
",
            host = verdict(BlockReason::Host),
            inbound = counter::INBOUND,
            policy = counter::POLICY,
            sandbox = verdict(BlockReason::Sandbox),
        );
        if !self.allow_metadata {
            let _ = writeln!(
                s,
                "    ip daddr 169.254.0.0/16 {}",
                verdict(BlockReason::Metadata)
            );
        }
        if self.egress_only_to.is_some() {
            let _ = writeln!(
                s,
                "    ip daddr != @operator_allow {}",
                verdict(BlockReason::Operator)
            );
        }
        let _ = write!(
            s,
            "    ip saddr . ip daddr @allow_out accept
    ip saddr . ip daddr @{RESOLVED_SET} update @{RESOLVED_SET} {{ ip saddr . ip daddr timeout {renew}s }} accept
    ip saddr . ip daddr @deny_out {policy}
    ip saddr @no_internet {policy}
    accept
  }}
",
            policy = verdict(BlockReason::Policy),
            renew = crate::dns::MAX_ALLOW.as_secs(),
        );
        // Only new connection attempts in unicast IPv4 are logged, at most LOG_RATE a second
        // per sandbox: a flood or a SYN retry storm costs the kernel a bucket lookup, not a
        // message each. The drop after the log rule is unconditional.
        for reason in VIOLATIONS {
            let _ = writeln!(
                s,
                "  chain deny_{name} {{
    meta nfproto ipv4 meta pkttype host ct state new \
update @violation_rate {{ ip saddr limit rate {LOG_RATE}/second burst {LOG_BURST} packets }} \
log prefix \"{prefix}\" group {log_group}
    drop
  }}",
                name = reason.as_str(),
                prefix = log_prefix(table, reason),
            );
        }
        let _ = write!(
            s,
            "  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {pool} oifname != \"{bridge}\" masquerade
  }}
}}
table bridge {table} {{
  counter {bridged} {{ }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname \"{link_prefix}*\" counter name {bridged} drop
  }}
}}
",
            bridged = counter::BRIDGED,
        );
        s
    }

    /// Removes both tables.
    pub(crate) fn delete_script(&self) -> String {
        let t = self.table;
        format!("add table inet {t}\ndelete table inet {t}\nadd table bridge {t}\ndelete table bridge {t}\n")
    }
}

/// The set elements that stand for one sandbox's policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Elements {
    /// Whether its address is in `no_internet`.
    pub(crate) no_internet: bool,
    /// Its `allow_out` destinations, normalized.
    pub(crate) allow: Vec<Ipv4Cidr>,
    /// Its `deny_out` destinations, normalized.
    pub(crate) deny: Vec<Ipv4Cidr>,
}

impl Elements {
    /// The elements for `policy`.
    pub(crate) fn of(policy: &EgressPolicy) -> Self {
        Self {
            no_internet: !policy.allow_internet,
            allow: minimal(&policy.allow_out),
            deny: minimal(&policy.deny_out),
        }
    }

    /// Whether there is nothing to put in the sets (the default policy).
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        !self.no_internet && self.allow.is_empty() && self.deny.is_empty()
    }
}

/// The commands that turn `old` into `new` for the sandbox at `addr`, as one transaction;
/// `None` if nothing changes. Used at start, inside the load transaction.
pub(crate) fn update_script(
    table: &str,
    addr: Ipv4Addr,
    old: &Elements,
    new: &Elements,
) -> Option<String> {
    if old == new {
        return None;
    }
    let mut s = String::new();
    let pairs = |list: &[Ipv4Cidr]| braced(list.iter().map(|c| format!("{addr} . {c}")));
    // Deleting first and adding after keeps the transaction valid when an element is in both.
    if old.no_internet {
        let _ = writeln!(s, "delete element inet {table} no_internet {{ {addr} }}");
    }
    for (set, list) in [("allow_out", &old.allow), ("deny_out", &old.deny)] {
        if !list.is_empty() {
            let _ = writeln!(s, "delete element inet {table} {set} {}", pairs(list));
        }
    }
    if new.no_internet {
        let _ = writeln!(s, "add element inet {table} no_internet {{ {addr} }}");
    }
    for (set, list) in [("allow_out", &new.allow), ("deny_out", &new.deny)] {
        if !list.is_empty() {
            let _ = writeln!(s, "add element inet {table} {set} {}", pairs(list));
        }
    }
    Some(s)
}

/// The commands that put resolved destinations back into [`RESOLVED_SET`] at start, each
/// `(sandbox, destination, time left)`, inside the load transaction.
pub(crate) fn resolved_script(
    table: &str,
    elements: &[(Ipv4Addr, Ipv4Addr, std::time::Duration)],
) -> String {
    let mut s = String::new();
    // Lines of a bounded length: one element is about 40 characters.
    for chunk in elements.chunks(256) {
        let items = chunk.iter().map(|(sandbox, dst, left)| {
            // At least a second: `timeout 0s` would mean the set's default, forever.
            let ms = left.as_millis().clamp(1000, u128::from(u32::MAX));
            format!("{sandbox} . {dst} timeout {ms}ms")
        });
        let _ = writeln!(
            s,
            "add element inet {table} {RESOLVED_SET} {}",
            braced(items)
        );
    }
    s
}

/// How many addresses `pool` holds.
fn pool_size(pool: Ipv4Cidr) -> u64 {
    1u64 << (32 - u32::from(pool.prefix()))
}

/// `{ a, b }`.
fn braced(items: impl Iterator<Item = String>) -> String {
    format!("{{ {} }}", items.collect::<Vec<_>>().join(", "))
}

/// The CIDRs normalized, deduplicated and without those inside another: interval sets
/// refuse overlapping elements, and a contained one adds nothing.
pub(crate) fn minimal(list: &[Ipv4Cidr]) -> Vec<Ipv4Cidr> {
    let mut sorted: Vec<Ipv4Cidr> = list.iter().map(Ipv4Cidr::normalized).collect();
    sorted.sort_by_key(|c| (c.prefix(), u32::from(c.network())));
    let mut kept: Vec<Ipv4Cidr> = Vec::new();
    for c in sorted {
        if !kept.iter().any(|k| k.contains(c.network())) {
            kept.push(c);
        }
    }
    kept.sort_by_key(|c| u32::from(c.network()));
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Ipv4Cidr {
        s.parse().unwrap()
    }

    fn rules(only: Option<&[Ipv4Cidr]>, allow_metadata: bool) -> String {
        Rules {
            table: "coppice",
            bridge: "coppice0",
            link_prefix: "cpv",
            pool: cidr("198.51.100.128/26"),
            gateway: "198.51.100.129".parse().unwrap(),
            allow_metadata,
            egress_only_to: only,
            log_group: 7,
        }
        .load_script()
    }

    #[test]
    fn the_ruleset_orders_operator_limits_before_the_policy() {
        let only = [cidr("198.51.100.0/24")];
        let text = rules(Some(&only), false);
        let pos = |needle: &str| {
            text.find(needle)
                .unwrap_or_else(|| panic!("{needle:?} not in\n{text}"))
        };
        assert!(text.starts_with("add table inet coppice\ndelete table inet coppice\n"));
        assert!(pos("elements = { 198.51.100.0/24 }") < pos("chain input"));
        let order = [
            "ip saddr != 198.51.100.128/26 drop",
            "oifname \"coppice0\" counter name drop_sandbox goto deny_sandbox",
            "ip daddr 169.254.0.0/16 counter name drop_metadata goto deny_metadata",
            "ip daddr != @operator_allow counter name drop_operator goto deny_operator",
            "ip saddr . ip daddr @allow_out accept",
            "ip saddr . ip daddr @allow_resolved update @allow_resolved",
            "ip saddr . ip daddr @deny_out counter name drop_policy goto deny_policy",
            "ip saddr @no_internet counter name drop_policy goto deny_policy",
        ];
        let at: Vec<usize> = order.iter().map(|n| pos(n)).collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{at:?}");
        // The reply direction: the same policy, mirrored, in the same order, never logged.
        let reply = &text[pos("  chain sandbox_reply {")..pos("  chain sandbox_out {")];
        assert_eq!(
            reply,
            "  chain sandbox_reply {
    ip daddr . ip saddr @allow_out accept
    ip daddr . ip saddr @allow_resolved accept
    ip daddr . ip saddr @deny_out counter name drop_policy drop
    ip daddr @no_internet counter name drop_policy drop
    accept
  }
"
        );
        assert!(
            pos("ip daddr 198.51.100.129 udp dport 53 accept")
                < pos("counter name drop_host goto deny_host")
        );
        assert!(text.contains("ip saddr 198.51.100.128/26 oifname != \"coppice0\" masquerade"));
        assert!(text.contains("iifname \"cpv*\" counter name drop_bridged drop"));
        // Uplinks with a small MTU (1400 on our machines) must not black-hole sandbox TCP.
        assert!(
            text.contains("iifname \"coppice0\" tcp flags syn tcp option maxseg size set rt mtu")
        );
    }

    #[test]
    fn violations_are_logged_rate_limited_and_always_dropped() {
        let text = rules(None, false);
        assert!(text.contains(
            "set violation_rate { type ipv4_addr; size 64; flags dynamic,timeout; timeout 1m; }"
        ));
        for reason in VIOLATIONS {
            let chain = format!(
                "  chain deny_{name} {{\n    meta nfproto ipv4 meta pkttype host ct state new \
                 update @violation_rate {{ ip saddr limit rate 5/second burst 10 packets }} \
                 log prefix \"coppice:{name}\" group 7\n    drop\n  }}\n",
                name = reason.as_str()
            );
            assert!(text.contains(&chain), "{chain}\nnot in\n{text}");
            let prefix = log_prefix("coppice", reason);
            assert_eq!(reason_of_prefix("coppice", &prefix), Some(reason));
            assert_eq!(reason_of_prefix("coppice_t1", &prefix), None);
        }
        assert_eq!(log_prefix("coppice", BlockReason::Policy), "coppice:policy");
        assert_eq!(reason_of_prefix("coppice", "coppice:dns"), None);
        // Replies and unsolicited inbound traffic are dropped without a log.
        assert!(text.contains("ip daddr @no_internet counter name drop_policy drop"));
        assert!(text.contains("oifname \"coppice0\" counter name drop_inbound drop"));
        assert_eq!(text.matches("log prefix").count(), VIOLATIONS.len());
        // Without an allow-list nothing jumps to its chain; the chain is there all the same.
        assert!(!text.contains("goto deny_operator"));
    }

    #[test]
    fn operator_flags_remove_their_rules() {
        let text = rules(None, true);
        assert!(!text.contains("169.254.0.0/16"), "{text}");
        assert!(!text.contains("operator_allow"), "{text}");
    }

    #[test]
    fn cidrs_inside_others_are_dropped() {
        let got = minimal(&[
            cidr("198.51.100.70/28"),
            cidr("198.51.100.66"),
            cidr("198.51.100.0/28"),
            cidr("198.51.100.64/28"),
        ]);
        let got: Vec<String> = got.iter().map(ToString::to_string).collect();
        assert_eq!(got, ["198.51.100.0/28", "198.51.100.64/28"]);
    }

    #[test]
    fn resolved_destinations_are_allowed_right_after_allow_out() {
        let text = rules(None, false);
        let pos = |needle: &str| {
            text.find(needle)
                .unwrap_or_else(|| panic!("{needle:?} not in\n{text}"))
        };
        assert!(text.contains(
            "set allow_resolved { type ipv4_addr . ipv4_addr; flags dynamic, timeout; size 262144; }"
        ));
        let out = pos("ip saddr . ip daddr @allow_resolved update @allow_resolved { ip saddr . ip daddr timeout 3600s } accept");
        assert!(pos("ip saddr . ip daddr @allow_out accept") < out);
        assert!(out < pos("ip saddr . ip daddr @deny_out"));
        let reply = pos("ip daddr . ip saddr @allow_resolved accept");
        assert!(pos("ip daddr . ip saddr @allow_out accept") < reply);
        assert!(reply < pos("ip daddr . ip saddr @deny_out"));
        let a: Ipv4Addr = "198.51.100.130".parse().unwrap();
        let d: Ipv4Addr = "198.51.100.7".parse().unwrap();
        let secs = std::time::Duration::from_secs;
        assert_eq!(
            resolved_script("t", &[(a, d, secs(90)), (a, a, secs(0))]),
            "add element inet t allow_resolved { 198.51.100.130 . 198.51.100.7 timeout 90000ms, \
             198.51.100.130 . 198.51.100.130 timeout 1000ms }\n"
        );
        assert_eq!(resolved_script("t", &[]), "");
    }

    #[test]
    fn a_policy_change_is_a_set_element_change() {
        let addr: Ipv4Addr = "198.51.100.130".parse().unwrap();
        let default = Elements::of(&EgressPolicy::default());
        assert!(default.is_empty());
        assert_eq!(update_script("t", addr, &default, &default), None);
        let closed = Elements::of(&EgressPolicy {
            allow_internet: false,
            allow_out: vec![cidr("198.51.100.64/28")],
            deny_out: vec![cidr("198.51.100.0/24"), cidr("198.51.100.5")],
            allow_domains: vec![],
        });
        let up = update_script("t", addr, &default, &closed).unwrap();
        assert_eq!(
            up,
            "add element inet t no_internet { 198.51.100.130 }\n\
             add element inet t allow_out { 198.51.100.130 . 198.51.100.64/28 }\n\
             add element inet t deny_out { 198.51.100.130 . 198.51.100.0/24 }\n"
        );
        let down = update_script("t", addr, &closed, &default).unwrap();
        assert_eq!(down, up.replace("add ", "delete "));
    }
}
