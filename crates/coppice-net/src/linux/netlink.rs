//! A small netlink client: the rtnetlink link, address and route messages the driver needs,
//! conntrack's dump and delete, nftables set elements, and the primitives `nflog` builds
//! its reader on.
//!
//! Hand-written rather than the `rtnetlink` crate: the driver makes about ten requests per
//! sandbox on the create path, all synchronous on a blocking thread, and this is some 300
//! lines over `libc` with no async runtime of its own, no futures plumbing and no new
//! dependency tree to audit. A socket belongs to the network namespace of the thread that
//! opened it, which is how the driver configures a sandbox's namespace without entering it
//! from the gateway's threads.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use coppice_lifecycle::backend::Ipv4Cidr;

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_GETADDR: u16 = 22;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;

const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_BROADCAST: u16 = 4;

const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_TABLE: u16 = 15;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const CT_GET: u16 = NFNL_SUBSYS_CTNETLINK << 8 | 1;
const CT_DELETE: u16 = NFNL_SUBSYS_CTNETLINK << 8 | 2;
const NFNETLINK_V0: u8 = 0;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWSETELEM: u16 = NFNL_SUBSYS_NFTABLES << 8 | 12;
const NFT_MSG_GETSETELEM: u16 = NFNL_SUBSYS_NFTABLES << 8 | 13;
const NFT_MSG_DELSETELEM: u16 = NFNL_SUBSYS_NFTABLES << 8 | 14;
const NFPROTO_INET: u8 = 1;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_SET_ELEM_EXPIRATION: u16 = 5;
const NFTA_SET_ELEM_KEY_END: u16 = 10;
const NFTA_DATA_VALUE: u16 = 1;

const AF_NETLINK: libc::sa_family_t = 16;
const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;
const IFF_UP: u32 = 1;

/// A link as a dump reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Link {
    pub(crate) index: u32,
    pub(crate) name: String,
    /// The bridge it is a port of.
    pub(crate) master: Option<u32>,
}

/// An IPv4 address on a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Address {
    pub(crate) index: u32,
    pub(crate) cidr: Ipv4Cidr,
}

/// A route of the main table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Route {
    pub(crate) dst: Ipv4Cidr,
    pub(crate) oif: Option<u32>,
}

/// A netlink socket (`NETLINK_ROUTE` or `NETLINK_NETFILTER`) of the namespace it was
/// opened in.
#[derive(Debug)]
pub(crate) struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

impl Netlink {
    /// Opens an rtnetlink socket in the calling thread's network namespace.
    pub(crate) fn open() -> io::Result<Self> {
        Self::open_protocol(libc::NETLINK_ROUTE)
    }

    /// Opens a netfilter netlink socket (conntrack) in the calling thread's namespace.
    pub(crate) fn open_netfilter() -> io::Result<Self> {
        Self::open_protocol(libc::NETLINK_NETFILTER)
    }

    fn open_protocol(protocol: libc::c_int) -> io::Result<Self> {
        // SAFETY: plain socket call; the result is checked before it is wrapped.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let nl = Self { fd, seq: 0 };
        // A kernel that never answers is a bug, but it must not hang a create: every
        // request is answered within microseconds, so five seconds means never.
        nl.set_timeout(Duration::from_secs(5))?;
        Ok(nl)
    }

    /// Sets how long a receive waits before it fails with `WouldBlock`.
    pub(crate) fn set_timeout(&self, timeout: Duration) -> io::Result<()> {
        let tv = libc::timeval {
            tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
        };
        self.set_option(libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)
    }

    /// Asks for a receive buffer of `bytes`: past `net.core.rmem_max` if the caller may
    /// (`SO_RCVBUFFORCE` needs `CAP_NET_ADMIN`), otherwise up to it.
    pub(crate) fn set_receive_buffer(&self, bytes: u32) -> io::Result<()> {
        let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        self.set_option(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &bytes)
            .or_else(|_| self.set_option(libc::SOL_SOCKET, libc::SO_RCVBUF, &bytes))
    }

    fn set_option<T>(&self, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
        // SAFETY: `value` outlives the call and its size is passed; the option names used
        // take exactly these types.
        let r = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                std::ptr::from_ref(value).cast(),
                socklen::<T>(),
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives one datagram (it may hold several messages; see [`messages`]): waiting up to
    /// the socket's timeout if `wait`, otherwise failing with `WouldBlock` at once if none
    /// is queued.
    pub(crate) fn receive_datagram(&mut self, buf: &mut [u8], wait: bool) -> io::Result<usize> {
        let flags = if wait { 0 } else { libc::MSG_DONTWAIT };
        recv_flags(self.fd.as_raw_fd(), buf, flags)
    }

    fn send(&mut self, mut msg: Msg) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        self.send_raw(msg.finish(self.seq))?;
        Ok(self.seq)
    }

    /// Receives the answers to `seq`, handing each non-error message's type and payload to
    /// `each`, until the ack, the error or the end of a dump.
    fn receive(&mut self, seq: u32, each: &mut dyn FnMut(u16, &[u8])) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = recv(self.fd.as_raw_fd(), &mut buf)?;
            let mut rest = &buf[..n];
            while rest.len() >= NLMSG_HDRLEN {
                let len = u32_at(rest, 0) as usize;
                if len < NLMSG_HDRLEN || len > rest.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "truncated netlink message",
                    ));
                }
                let ty = u16_at(rest, 4);
                let msg_seq = u32_at(rest, 8);
                let payload = &rest[NLMSG_HDRLEN..len];
                rest = &rest[align(len).min(rest.len())..];
                if msg_seq != seq {
                    continue;
                }
                match ty {
                    NLMSG_ERROR => {
                        let err = i32::from_ne_bytes(
                            payload
                                .get(..4)
                                .and_then(|b| b.try_into().ok())
                                .unwrap_or([0; 4]),
                        );
                        return if err == 0 {
                            Ok(())
                        } else {
                            Err(io::Error::from_raw_os_error(-err))
                        };
                    }
                    NLMSG_DONE => return Ok(()),
                    _ => each(ty, payload),
                }
            }
        }
    }

    /// Sends a request and waits for its acknowledgement.
    pub(crate) fn ack(&mut self, msg: Msg) -> io::Result<()> {
        let seq = self.send(msg)?;
        self.receive(seq, &mut |_, _| {})
    }

    /// Sends a dump request and collects every answer's payload.
    fn dump(&mut self, msg: Msg) -> io::Result<Vec<Vec<u8>>> {
        let seq = self.send(msg)?;
        let mut out = Vec::new();
        self.receive(seq, &mut |_, p| out.push(p.to_vec()))?;
        Ok(out)
    }

    /// The index of the link `name`, `None` if there is none.
    pub(crate) fn link_index(&mut self, name: &str) -> io::Result<Option<u32>> {
        // With an ack requested, the answer is the link and then the ack.
        let mut msg = Msg::new(RTM_GETLINK, NLM_F_REQUEST | NLM_F_ACK);
        msg.ifinfo(AF_UNSPEC, 0, 0, 0);
        msg.attr_str(IFLA_IFNAME, name);
        let seq = self.send(msg)?;
        let mut index = None;
        match self.receive(seq, &mut |_, p| index = parse_link(p).map(|l| l.index)) {
            Ok(()) => Ok(index),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every link.
    pub(crate) fn links(&mut self) -> io::Result<Vec<Link>> {
        let mut msg = Msg::new(RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP);
        msg.ifinfo(AF_UNSPEC, 0, 0, 0);
        Ok(self
            .dump(msg)?
            .iter()
            .filter_map(|p| parse_link(p))
            .collect())
    }

    /// Creates the bridge `name`.
    pub(crate) fn new_bridge(&mut self, name: &str) -> io::Result<()> {
        let mut msg = Msg::new(
            RTM_NEWLINK,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        );
        msg.ifinfo(AF_UNSPEC, 0, 0, 0);
        msg.attr_str(IFLA_IFNAME, name);
        let info = msg.begin(IFLA_LINKINFO);
        msg.attr(IFLA_INFO_KIND, b"bridge");
        msg.end(info);
        self.ack(msg)
    }

    /// Creates the veth pair `host` (a port of `master`, if given) and `peer`, with `peer`
    /// created directly in the namespace `peer_ns`.
    pub(crate) fn new_veth(
        &mut self,
        host: &str,
        master: Option<u32>,
        peer: &str,
        peer_ns: RawFd,
    ) -> io::Result<()> {
        let mut msg = Msg::new(
            RTM_NEWLINK,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        );
        msg.ifinfo(AF_UNSPEC, 0, 0, 0);
        msg.attr_str(IFLA_IFNAME, host);
        if let Some(master) = master {
            msg.attr(IFLA_MASTER, &master.to_ne_bytes());
        }
        let info = msg.begin(IFLA_LINKINFO);
        msg.attr(IFLA_INFO_KIND, b"veth");
        let data = msg.begin(IFLA_INFO_DATA);
        let peer_info = msg.begin(VETH_INFO_PEER);
        msg.ifinfo(AF_UNSPEC, 0, 0, 0);
        msg.attr_str(IFLA_IFNAME, peer);
        msg.attr(IFLA_NET_NS_FD, &peer_ns.to_ne_bytes());
        msg.end(peer_info);
        msg.end(data);
        msg.end(info);
        self.ack(msg)
    }

    /// Sets a link's hardware address.
    pub(crate) fn set_mac(&mut self, index: u32, mac: [u8; 6]) -> io::Result<()> {
        let mut msg = Msg::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK);
        msg.ifinfo(AF_UNSPEC, index, 0, 0);
        msg.attr(IFLA_ADDRESS, &mac);
        self.ack(msg)
    }

    /// Sets a link up.
    pub(crate) fn set_up(&mut self, index: u32) -> io::Result<()> {
        let mut msg = Msg::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK);
        msg.ifinfo(AF_UNSPEC, index, IFF_UP, IFF_UP);
        self.ack(msg)
    }

    /// Deletes a link (a veth takes its peer with it); `false` if there was none.
    pub(crate) fn del_link(&mut self, name: &str) -> io::Result<bool> {
        let mut msg = Msg::new(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK);
        msg.ifinfo(AF_UNSPEC, 0, 0, 0);
        msg.attr_str(IFLA_IFNAME, name);
        match self.ack(msg) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Adds `cidr` (address and prefix) to a link; `false` if it was there already.
    pub(crate) fn add_addr(&mut self, index: u32, cidr: Ipv4Cidr) -> io::Result<bool> {
        let mut msg = Msg::new(
            RTM_NEWADDR,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        );
        msg.push(&[AF_INET, cidr.prefix(), 0, RT_SCOPE_UNIVERSE]);
        msg.push(&index.to_ne_bytes());
        msg.attr(IFA_LOCAL, &cidr.addr().octets());
        msg.attr(IFA_ADDRESS, &cidr.addr().octets());
        if cidr.prefix() < 31 {
            msg.attr(IFA_BROADCAST, &cidr.last().octets());
        }
        match self.ack(msg) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every IPv4 address.
    pub(crate) fn addrs(&mut self) -> io::Result<Vec<Address>> {
        let mut msg = Msg::new(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP);
        msg.push(&[AF_INET, 0, 0, 0, 0, 0, 0, 0]);
        let mut out = Vec::new();
        for p in self.dump(msg)? {
            if p.len() < 8 || p[0] != AF_INET {
                continue;
            }
            let index = u32_at(&p, 4);
            let mut local = None;
            let mut address = None;
            for (ty, v) in attrs(&p[8..]) {
                match ty {
                    IFA_LOCAL => local = ipv4(v),
                    IFA_ADDRESS => address = ipv4(v),
                    _ => {}
                }
            }
            if let Some(ip) = local.or(address) {
                if let Ok(cidr) = Ipv4Cidr::new(ip, p[1]) {
                    out.push(Address { index, cidr });
                }
            }
        }
        Ok(out)
    }

    /// Adds the default route via `gateway` on link `oif`.
    pub(crate) fn add_default_route(&mut self, gateway: Ipv4Addr, oif: u32) -> io::Result<()> {
        let mut msg = Msg::new(
            RTM_NEWROUTE,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        );
        msg.push(&[
            AF_INET,
            0,
            0,
            0,
            RT_TABLE_MAIN,
            RTPROT_STATIC,
            RT_SCOPE_UNIVERSE,
            RTN_UNICAST,
        ]);
        msg.push(&0u32.to_ne_bytes());
        msg.attr(RTA_GATEWAY, &gateway.octets());
        msg.attr(RTA_OIF, &oif.to_ne_bytes());
        self.ack(msg)
    }

    /// The unicast IPv4 routes of the main table.
    pub(crate) fn routes(&mut self) -> io::Result<Vec<Route>> {
        let mut msg = Msg::new(RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP);
        msg.push(&[AF_INET, 0, 0, 0, 0, 0, 0, 0]);
        msg.push(&0u32.to_ne_bytes());
        let mut out = Vec::new();
        for p in self.dump(msg)? {
            if p.len() < 12 || p[0] != AF_INET || p[7] != RTN_UNICAST {
                continue;
            }
            let mut table = u32::from(p[4]);
            let mut dst = Ipv4Addr::UNSPECIFIED;
            let mut oif = None;
            for (ty, v) in attrs(&p[12..]) {
                match ty {
                    RTA_TABLE if v.len() >= 4 => table = u32_at(v, 0),
                    RTA_DST => dst = ipv4(v).unwrap_or(dst),
                    RTA_OIF if v.len() >= 4 => oif = Some(u32_at(v, 0)),
                    _ => {}
                }
            }
            if table != u32::from(RT_TABLE_MAIN) {
                continue;
            }
            if let Ok(dst) = Ipv4Cidr::new(dst, p[1]) {
                out.push(Route { dst, oif });
            }
        }
        Ok(out)
    }
}

/// The size of `T` as a socket length (a few bytes: it fits).
fn socklen<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(size_of::<T>()).unwrap_or(libc::socklen_t::MAX)
}

/// One conntrack entry, as much of it as the driver needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Flow {
    /// Source and destination of the original direction.
    pub(crate) orig: (Ipv4Addr, Ipv4Addr),
    /// Source and destination of the reply direction (differs from `orig` under NAT).
    pub(crate) reply: (Ipv4Addr, Ipv4Addr),
    /// The original tuple as the kernel sent it, to name the entry in a delete.
    tuple: Vec<u8>,
    /// Its conntrack zone, if not the default.
    zone: Option<Vec<u8>>,
}

impl Flow {
    /// Whether `addr` is any end of either direction.
    pub(crate) fn involves(&self, addr: Ipv4Addr) -> bool {
        [self.orig.0, self.orig.1, self.reply.0, self.reply.1].contains(&addr)
    }
}

impl Netlink {
    /// Every IPv4 conntrack entry of the socket's namespace (one walk of the table).
    pub(crate) fn flows(&mut self) -> io::Result<Vec<Flow>> {
        let mut msg = Msg::new(CT_GET, NLM_F_REQUEST | NLM_F_DUMP);
        msg.push(&[AF_INET, NFNETLINK_V0, 0, 0]);
        let mut out = Vec::new();
        for p in self.dump(msg)? {
            let Some(body) = p.get(4..) else { continue };
            let mut orig = None;
            let mut reply = None;
            let mut zone = None;
            for (ty, v) in attrs(body) {
                match ty {
                    CTA_TUPLE_ORIG => orig = Some((tuple_addrs(v), v.to_vec())),
                    CTA_TUPLE_REPLY => reply = Some(tuple_addrs(v)),
                    CTA_ZONE => zone = Some(v.to_vec()),
                    _ => {}
                }
            }
            if let (Some((Some(o), tuple)), Some(Some(r))) = (orig, reply) {
                out.push(Flow {
                    orig: o,
                    reply: r,
                    tuple,
                    zone,
                });
            }
        }
        Ok(out)
    }

    /// Deletes one conntrack entry; `false` if it was gone already.
    pub(crate) fn delete_flow(&mut self, flow: &Flow) -> io::Result<bool> {
        let mut msg = Msg::new(CT_DELETE, NLM_F_REQUEST | NLM_F_ACK);
        msg.push(&[AF_INET, NFNETLINK_V0, 0, 0]);
        let t = msg.begin(CTA_TUPLE_ORIG);
        msg.push(&flow.tuple);
        msg.end(t);
        if let Some(z) = &flow.zone {
            msg.attr(CTA_ZONE, z);
        }
        match self.ack(msg) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// One change to an nftables set: elements added or deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SetChange {
    /// The set, in the `inet` table the transaction names.
    pub(crate) set: &'static str,
    /// Add (true) or delete.
    pub(crate) add: bool,
    /// The elements.
    pub(crate) elements: Vec<SetElement>,
}

/// One element of a set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SetElement {
    /// Its key (network byte order, every field padded to 4 bytes).
    pub(crate) key: Vec<u8>,
    /// For interval sets, the key of the interval's end.
    pub(crate) key_end: Option<Vec<u8>>,
    /// For sets with timeouts, how long it stays (millisecond resolution); `None` for the
    /// set's default.
    pub(crate) timeout: Option<std::time::Duration>,
}

impl SetElement {
    /// An element with a key only.
    pub(crate) fn key(key: Vec<u8>) -> Self {
        Self {
            key,
            key_end: None,
            timeout: None,
        }
    }
}

/// An element as a dump of a set reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ListedElement {
    /// Its key.
    pub(crate) key: Vec<u8>,
    /// How long until it expires, for elements with a timeout.
    pub(crate) expires: Option<std::time::Duration>,
}

impl Netlink {
    /// Applies `changes` to sets of the `inet` table `table` in one nftables transaction:
    /// all or nothing.
    pub(crate) fn change_sets(&mut self, table: &str, changes: &[SetChange]) -> io::Result<()> {
        let mut batch = Vec::new();
        // A `struct nfgenmsg` whose `res_id` (network order) names the subsystem.
        let subsys = NFNL_SUBSYS_NFTABLES.to_be_bytes();
        let nfgen = [AF_UNSPEC, NFNETLINK_V0, subsys[0], subsys[1]];
        let mut begin = Msg::new(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST);
        begin.push(&nfgen);
        let mut expected = Vec::new();
        self.seq = self.seq.wrapping_add(1);
        batch.extend_from_slice(begin.finish(self.seq));
        for c in changes {
            let ty = if c.add {
                NFT_MSG_NEWSETELEM
            } else {
                NFT_MSG_DELSETELEM
            };
            let flags = NLM_F_REQUEST | NLM_F_ACK | if c.add { NLM_F_CREATE } else { 0 };
            let mut msg = Msg::new(ty, flags);
            msg.push(&[NFPROTO_INET, NFNETLINK_V0, 0, 0]);
            msg.attr_str(NFTA_SET_ELEM_LIST_TABLE, table);
            msg.attr_str(NFTA_SET_ELEM_LIST_SET, c.set);
            let list = msg.begin(NFTA_SET_ELEM_LIST_ELEMENTS);
            for el in &c.elements {
                let elem = msg.begin(NFTA_LIST_ELEM);
                let k = msg.begin(NFTA_SET_ELEM_KEY);
                msg.attr(NFTA_DATA_VALUE, &el.key);
                msg.end(k);
                if let Some(end) = &el.key_end {
                    let e = msg.begin(NFTA_SET_ELEM_KEY_END);
                    msg.attr(NFTA_DATA_VALUE, end);
                    msg.end(e);
                }
                if let Some(t) = el.timeout {
                    let ms = u64::try_from(t.as_millis()).unwrap_or(u64::MAX);
                    msg.attr(NFTA_SET_ELEM_TIMEOUT, &ms.to_be_bytes());
                }
                msg.end(elem);
            }
            msg.end(list);
            self.seq = self.seq.wrapping_add(1);
            expected.push(self.seq);
            batch.extend_from_slice(msg.finish(self.seq));
        }
        let mut end = Msg::new(NFNL_MSG_BATCH_END, NLM_F_REQUEST);
        end.push(&nfgen);
        self.seq = self.seq.wrapping_add(1);
        batch.extend_from_slice(end.finish(self.seq));
        self.send_raw(&batch)?;
        // One ack per change; the first error means the kernel aborted the transaction.
        let mut buf = vec![0u8; 64 * 1024];
        while !expected.is_empty() {
            let n = recv(self.fd.as_raw_fd(), &mut buf)?;
            let mut rest = &buf[..n];
            while rest.len() >= NLMSG_HDRLEN {
                let len = u32_at(rest, 0) as usize;
                if len < NLMSG_HDRLEN || len > rest.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "truncated netlink message",
                    ));
                }
                let (ty, seq) = (u16_at(rest, 4), u32_at(rest, 8));
                let payload = &rest[NLMSG_HDRLEN..len];
                rest = &rest[align(len).min(rest.len())..];
                if ty != NLMSG_ERROR {
                    continue;
                }
                let err = payload
                    .get(..4)
                    .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                if err != 0 {
                    return Err(io::Error::from_raw_os_error(-err));
                }
                expected.retain(|s| *s != seq);
            }
        }
        Ok(())
    }

    /// Every element of the set `set` of the `inet` table `table` (one dump).
    pub(crate) fn set_elements(
        &mut self,
        table: &str,
        set: &str,
    ) -> io::Result<Vec<ListedElement>> {
        let mut msg = Msg::new(NFT_MSG_GETSETELEM, NLM_F_REQUEST | NLM_F_DUMP);
        msg.push(&[NFPROTO_INET, NFNETLINK_V0, 0, 0]);
        msg.attr_str(NFTA_SET_ELEM_LIST_TABLE, table);
        msg.attr_str(NFTA_SET_ELEM_LIST_SET, set);
        let mut out = Vec::new();
        for p in self.dump(msg)? {
            let Some(body) = p.get(4..) else { continue };
            let lists = attrs(body).filter(|(ty, _)| *ty == NFTA_SET_ELEM_LIST_ELEMENTS);
            for (_, list) in lists {
                for (_, elem) in attrs(list).filter(|(ty, _)| *ty == NFTA_LIST_ELEM) {
                    let mut key = None;
                    let mut expires = None;
                    for (ty, v) in attrs(elem) {
                        match ty {
                            NFTA_SET_ELEM_KEY => {
                                key = attrs(v)
                                    .find(|(t, _)| *t == NFTA_DATA_VALUE)
                                    .map(|(_, k)| k.to_vec());
                            }
                            NFTA_SET_ELEM_EXPIRATION => {
                                let ms: Option<[u8; 8]> =
                                    v.get(..8).and_then(|b| b.try_into().ok());
                                expires = ms.map(|b| {
                                    std::time::Duration::from_millis(u64::from_be_bytes(b))
                                });
                            }
                            _ => {}
                        }
                    }
                    if let Some(key) = key {
                        out.push(ListedElement { key, expires });
                    }
                }
            }
        }
        Ok(out)
    }

    fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        // SAFETY: `sockaddr_nl` is plain integers, for which all zeroes is valid; zero
        // `nl_pid` addresses the kernel.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = AF_NETLINK;
        // SAFETY: `bytes` and `addr` are valid for the lengths passed.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
                (&raw const addr).cast(),
                socklen::<libc::sockaddr_nl>(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Source and destination of a `CTA_TUPLE_*` value.
fn tuple_addrs(tuple: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr)> {
    let (_, ip) = attrs(tuple).find(|(ty, _)| *ty == CTA_TUPLE_IP)?;
    let mut src = None;
    let mut dst = None;
    for (ty, v) in attrs(ip) {
        match ty {
            CTA_IP_V4_SRC => src = ipv4(v),
            CTA_IP_V4_DST => dst = ipv4(v),
            _ => {}
        }
    }
    Some((src?, dst?))
}

fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    recv_flags(fd, buf, 0)
}

fn recv_flags(fd: RawFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags) };
        if n >= 0 {
            return usize::try_from(n).map_err(io::Error::other);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn parse_link(p: &[u8]) -> Option<Link> {
    if p.len() < 16 {
        return None;
    }
    let index = u32_at(p, 4);
    let mut name = None;
    let mut master = None;
    for (ty, v) in attrs(&p[16..]) {
        match ty {
            IFLA_IFNAME => {
                name = Some(
                    String::from_utf8_lossy(v.split(|&b| b == 0).next().unwrap_or(v)).into_owned(),
                );
            }
            IFLA_MASTER if v.len() >= 4 => master = Some(u32_at(v, 0)),
            _ => {}
        }
    }
    Some(Link {
        index,
        name: name?,
        master,
    })
}

fn ipv4(v: &[u8]) -> Option<Ipv4Addr> {
    let b: [u8; 4] = v.get(..4)?.try_into().ok()?;
    Some(Ipv4Addr::from(b))
}

/// The messages in a datagram: type and payload (after the 16-byte header); stops at the
/// first malformed one.
pub(crate) fn messages(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < NLMSG_HDRLEN {
            return None;
        }
        let len = u32_at(buf, 0) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return None;
        }
        let msg = (u16_at(buf, 4), &buf[NLMSG_HDRLEN..len]);
        buf = &buf[align(len).min(buf.len())..];
        Some(msg)
    })
}

/// The attributes in `buf`: type (flags masked off) and value.
pub(crate) fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = usize::from(u16_at(buf, 0));
        let ty = u16_at(buf, 2) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let value = &buf[4..len];
        buf = &buf[align(len).min(buf.len())..];
        Some((ty, value))
    })
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// A netlink message under construction.
#[derive(Debug)]
pub(crate) struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    /// A message of type `ty` with the header flags `flags`.
    pub(crate) fn new(ty: u16, flags: u16) -> Self {
        let mut buf = vec![0u8; NLMSG_HDRLEN];
        buf[4..6].copy_from_slice(&ty.to_ne_bytes());
        buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        Self { buf }
    }

    /// Appends `bytes`, padded to 4.
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        self.buf.resize(align(self.buf.len()), 0);
    }

    /// A `struct ifinfomsg`.
    fn ifinfo(&mut self, family: u8, index: u32, flags: u32, change: u32) {
        self.push(&[family, 0, 0, 0]);
        self.push(&index.to_ne_bytes());
        self.push(&flags.to_ne_bytes());
        self.push(&change.to_ne_bytes());
    }

    /// Appends the attribute `ty` with `value`.
    pub(crate) fn attr(&mut self, ty: u16, value: &[u8]) {
        let len = u16::try_from(4 + value.len()).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.push(value);
    }

    fn attr_str(&mut self, ty: u16, s: &str) {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.attr(ty, &v);
    }

    /// Opens a nested attribute; returns where its length goes.
    fn begin(&mut self, ty: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        at
    }

    fn end(&mut self, at: usize) {
        let len = u16::try_from(self.buf.len() - at).unwrap_or(u16::MAX);
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    /// Sets the length and the sequence number; the bytes to send.
    pub(crate) fn finish(&mut self, seq: u32) -> &[u8] {
        let len = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        &self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_attributes_carry_their_length() {
        let mut msg = Msg::new(RTM_NEWLINK, NLM_F_REQUEST);
        msg.ifinfo(AF_UNSPEC, 0, 0, 0);
        let info = msg.begin(IFLA_LINKINFO);
        msg.attr(IFLA_INFO_KIND, b"veth");
        msg.end(info);
        let bytes = msg.finish(7).to_vec();
        assert_eq!(u32_at(&bytes, 0) as usize, bytes.len());
        assert_eq!(u32_at(&bytes, 8), 7);
        let outer: Vec<_> = attrs(&bytes[32..]).collect();
        assert_eq!(outer.len(), 1);
        assert_eq!(outer[0].0, IFLA_LINKINFO);
        let inner: Vec<_> = attrs(outer[0].1).collect();
        assert_eq!(inner, [(IFLA_INFO_KIND, &b"veth"[..])]);
    }
}
