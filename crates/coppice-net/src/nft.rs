//! The nftables ruleset the Linux driver owns, as text for `nft -f -`.
//!
//! One `inet` table holds every rule and five named sets; a sandbox's policy is a handful of
//! set elements keyed by its address, so attach, policy updates and release change elements
//! and never rules. One set, [`RESOLVED_SET`], holds elements with timeouts that the DNS
//! forwarder's answers add. A `bridge` table of the same name drops frames between the
//! bridge's ports, so sandboxes cannot reach each other even at layer 2. Named counters count each
//! kind of drop (tests read them; operators can too). Everything here is pure text, loaded
//! once at start with the elements of every recorded sandbox; later element changes go
//! over netlink (`linux::netlink::Netlink::change_sets`). The values come from validated
//! types and checked names, so nothing needs quoting.

use std::fmt::Write;
use std::net::Ipv4Addr;

use coppice_lifecycle::backend::{EgressPolicy, Ipv4Cidr};

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
    counter name {host} drop
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
    oifname \"{bridge}\" counter name {sandbox} drop
",
            host = counter::HOST,
            inbound = counter::INBOUND,
            policy = counter::POLICY,
            sandbox = counter::SANDBOX,
        );
        if !self.allow_metadata {
            let _ = writeln!(
                s,
                "    ip daddr 169.254.0.0/16 counter name {} drop",
                counter::METADATA
            );
        }
        if self.egress_only_to.is_some() {
            let _ = writeln!(
                s,
                "    ip daddr != @operator_allow counter name {} drop",
                counter::OPERATOR
            );
        }
        let _ = write!(
            s,
            "    ip saddr . ip daddr @allow_out accept
    ip saddr . ip daddr @{RESOLVED_SET} update @{RESOLVED_SET} {{ ip saddr . ip daddr timeout {renew}s }} accept
    ip saddr . ip daddr @deny_out counter name {policy} drop
    ip saddr @no_internet counter name {policy} drop
    accept
  }}
  chain postrouting {{
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
            policy = counter::POLICY,
            bridged = counter::BRIDGED,
            renew = crate::dns::MAX_ALLOW.as_secs(),
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
            "oifname \"coppice0\" counter name drop_sandbox drop",
            "ip daddr 169.254.0.0/16 counter name drop_metadata drop",
            "ip daddr != @operator_allow counter name drop_operator drop",
            "ip saddr . ip daddr @allow_out accept",
            "ip saddr . ip daddr @deny_out counter name drop_policy drop",
            "ip saddr @no_internet counter name drop_policy drop",
        ];
        let at: Vec<usize> = order.iter().map(|n| pos(n)).collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{at:?}");
        assert!(
            pos("ip daddr 198.51.100.129 udp dport 53 accept") < pos("counter name drop_host drop")
        );
        assert!(text.contains("ip saddr 198.51.100.128/26 oifname != \"coppice0\" masquerade"));
        assert!(text.contains("iifname \"cpv*\" counter name drop_bridged drop"));
        // Uplinks with a small MTU (1400 on our machines) must not black-hole sandbox TCP.
        assert!(
            text.contains("iifname \"coppice0\" tcp flags syn tcp option maxseg size set rt mtu")
        );
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
