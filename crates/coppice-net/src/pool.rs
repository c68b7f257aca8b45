//! The sandbox address pool: the first usable address of the CIDR is the host side (the
//! gateway), the rest go to sandboxes, lowest free first.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use coppice_lifecycle::backend::{BackendError, Ipv4Cidr};

/// Addresses of one pool CIDR and which are taken.
#[derive(Debug, Clone)]
pub(crate) struct Pool {
    cidr: Ipv4Cidr,
    taken: BTreeSet<u32>,
}

impl Pool {
    /// Smallest pool: a /29 has a gateway and five sandbox addresses.
    pub(crate) const LONGEST_PREFIX: u8 = 29;
    /// Largest pool: a /16, which keeps interface names short (the offset is 4 hex digits).
    pub(crate) const SHORTEST_PREFIX: u8 = 16;

    pub(crate) fn new(cidr: Ipv4Cidr) -> Result<Self, BackendError> {
        let cidr = cidr.normalized();
        if !(Self::SHORTEST_PREFIX..=Self::LONGEST_PREFIX).contains(&cidr.prefix()) {
            return Err(BackendError::InvalidSpec {
                field: "sandbox cidr",
                reason: format!(
                    "{cidr} must be a /{} to a /{}",
                    Self::SHORTEST_PREFIX,
                    Self::LONGEST_PREFIX
                ),
            });
        }
        Ok(Self {
            cidr,
            taken: BTreeSet::new(),
        })
    }

    /// The pool's network.
    pub(crate) fn cidr(&self) -> Ipv4Cidr {
        self.cidr
    }

    /// The host side's address: the first usable one.
    pub(crate) fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.cidr.network()) + 1)
    }

    /// An address's offset from the network address, if it is a sandbox address of the pool.
    pub(crate) fn offset(&self, addr: Ipv4Addr) -> Option<u32> {
        let first = u32::from(self.gateway()) + 1;
        let last = u32::from(self.cidr.last()) - 1;
        let a = u32::from(addr);
        (first..=last)
            .contains(&a)
            .then(|| a - u32::from(self.cidr.network()))
    }

    /// Takes the lowest free sandbox address.
    pub(crate) fn take(&mut self) -> Result<Ipv4Addr, BackendError> {
        let first = u32::from(self.gateway()) + 1;
        let last = u32::from(self.cidr.last()) - 1;
        let free = (first..=last).find(|a| !self.taken.contains(a));
        match free {
            Some(a) => {
                self.taken.insert(a);
                Ok(Ipv4Addr::from(a))
            }
            None => Err(BackendError::InvalidState {
                op: "attach",
                id: String::new(),
                reason: format!("the sandbox address pool {} is exhausted", self.cidr),
            }),
        }
    }

    /// Marks `addr` taken (re-adoption); false if it is not a sandbox address of the pool or
    /// already taken.
    pub(crate) fn claim(&mut self, addr: Ipv4Addr) -> bool {
        self.offset(addr).is_some() && self.taken.insert(u32::from(addr))
    }

    /// Gives `addr` back.
    pub(crate) fn put(&mut self, addr: Ipv4Addr) {
        self.taken.remove(&u32::from(addr));
    }
}

/// Refuses a pool that collides with the host: one of its addresses, a route (other than a
/// default route) or a resolver. The caller leaves out the addresses and routes of the
/// driver's own bridge.
pub(crate) fn check_overlap(
    pool: Ipv4Cidr,
    host_addrs: &[Ipv4Cidr],
    routes: &[Ipv4Cidr],
    resolvers: &[Ipv4Addr],
) -> Result<(), BackendError> {
    let refuse = |what: String| BackendError::InvalidSpec {
        field: "sandbox cidr",
        reason: format!("{pool} overlaps {what}; pick a range this host does not use"),
    };
    for a in host_addrs {
        if pool.contains(a.addr()) {
            return Err(refuse(format!("the host address {a}")));
        }
    }
    for r in routes {
        if r.prefix() > 0 && r.overlaps(&pool) {
            return Err(refuse(format!("the host route {r}")));
        }
    }
    for ns in resolvers {
        if pool.contains(*ns) {
            return Err(refuse(format!("the resolver {ns} in /etc/resolv.conf")));
        }
    }
    Ok(())
}

/// The IPv4 `nameserver` lines of a resolv.conf.
pub(crate) fn resolvers(resolv_conf: &str) -> Vec<Ipv4Addr> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next()?.parse().ok())
                .flatten()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_that_collides_with_the_host_is_refused() {
        let c = |s: &str| s.parse::<Ipv4Cidr>().unwrap();
        let pool = c("198.51.100.128/26");
        let addrs = [c("127.0.0.1/8"), c("192.0.2.2/24")];
        let routes = [c("0.0.0.0/0"), c("192.0.2.0/24")];
        let ns = resolvers("# x\nsearch example\nnameserver 10.255.255.53\nnameserver ::1\n");
        assert_eq!(ns, [Ipv4Addr::new(10, 255, 255, 53)]);
        check_overlap(pool, &addrs, &routes, &ns).unwrap();
        let cases = [
            check_overlap(pool, &[c("198.51.100.140/24")], &routes, &ns),
            check_overlap(pool, &addrs, &[c("198.51.100.0/24")], &ns),
            check_overlap(pool, &addrs, &[c("198.51.100.160/28")], &ns),
            check_overlap(pool, &addrs, &routes, &[Ipv4Addr::new(198, 51, 100, 153)]),
        ];
        for (i, r) in cases.into_iter().enumerate() {
            assert!(
                matches!(&r, Err(BackendError::InvalidSpec { field: "sandbox cidr", reason })
                    if reason.contains("overlaps")),
                "case {i}: {r:?}"
            );
        }
    }

    #[test]
    fn the_gateway_is_first_and_sandboxes_follow() {
        let mut p = Pool::new("198.51.100.130/29".parse().unwrap()).unwrap();
        assert_eq!(p.cidr().to_string(), "198.51.100.128/29");
        assert_eq!(p.gateway(), Ipv4Addr::new(198, 51, 100, 129));
        let got: Vec<_> = (0..5).map(|_| p.take().unwrap().octets()[3]).collect();
        assert_eq!(got, [130, 131, 132, 133, 134]);
        assert!(matches!(p.take(), Err(BackendError::InvalidState { .. })));
        p.put(Ipv4Addr::new(198, 51, 100, 132));
        assert_eq!(p.take().unwrap(), Ipv4Addr::new(198, 51, 100, 132));
    }

    #[test]
    fn claims_only_free_sandbox_addresses() {
        let mut p = Pool::new("198.51.100.128/28".parse().unwrap()).unwrap();
        assert!(p.claim(Ipv4Addr::new(198, 51, 100, 140)));
        assert!(!p.claim(Ipv4Addr::new(198, 51, 100, 140)));
        for outside in [128, 129, 143, 144] {
            assert!(!p.claim(Ipv4Addr::new(198, 51, 100, outside)), "{outside}");
        }
        assert_eq!(p.offset(Ipv4Addr::new(198, 51, 100, 140)), Some(12));
        assert_eq!(p.take().unwrap(), Ipv4Addr::new(198, 51, 100, 130));
    }

    #[test]
    fn pool_sizes_are_bounded() {
        for bad in ["198.51.100.0/30", "10.0.0.0/8"] {
            assert!(Pool::new(bad.parse().unwrap()).is_err(), "{bad}");
        }
    }
}
