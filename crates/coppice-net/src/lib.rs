//! The network role: every sandbox gets a network stack that the host owns, an address from
//! a pool, egress NATed through the host's routes, and E2B's egress policy enforced in the
//! kernel.
//!
//! [`LinuxNet`] implements [`coppice_lifecycle::backend::Network`] with a network namespace
//! per sandbox, made by the driver and bind-mounted under its run directory for the jail to
//! join, a veth pair to a bridge it owns, netlink, and one nftables table whose named sets
//! hold each sandbox's policy; the kernel logs the drops that are violations to an NFLOG
//! group, which `Network::blocked` reads back. [`dns`] is the sandboxes' DNS forwarder,
//! through which `allowOut`'s domains open egress. [`freebsd`] is the FreeBSD driver's
//! command plan (VNET jail, epair, bridge, pf anchor), plain data tested on every OS. See
//! `docs/network.md` for the datapath, the rules and recovery.
//!
//! **Invariant:** nothing here knows HTTP, templates or processes inside a sandbox; the
//! driver hands out a namespace file and addresses, and owns every link, address, route,
//! rule and set element it makes, so that root inside a sandbox can change none of them.

pub mod dns;
pub mod freebsd;
#[cfg(target_os = "linux")]
mod linux;
mod nft;
mod pool;

#[cfg(target_os = "linux")]
pub use linux::{LinuxNet, LinuxNetConfig};
