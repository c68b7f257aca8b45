//! A reader of the kernel's NFLOG reports (`nfnetlink_log`): the packets the ruleset's
//! `deny_<reason>` chains log to the driver's group, each with its rule's prefix and the
//! start of the packet, decoded into addresses, protocol and port.
//!
//! Hand-written over `linux::netlink` like the rest: one config message binds the group
//! (copying [`COPY_RANGE`] bytes of each packet, every report sent at once), then the socket
//! only receives. One socket per group per namespace: the kernel refuses a second binder
//! with `EPERM` (the error a binder without `CAP_NET_ADMIN` gets too), and closing the
//! socket unbinds. A full receive buffer makes the next receive
//! fail with `ENOBUFS`; the reader counts that and reads on (the kernel's rate limit keeps
//! it rare).

use std::io;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use coppice_lifecycle::backend::IpProtocol;

use crate::linux::netlink::{attrs, messages, Msg, Netlink, NLM_F_ACK, NLM_F_REQUEST};

const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = NFNL_SUBSYS_ULOG << 8;
const NFULNL_MSG_CONFIG: u16 = NFNL_SUBSYS_ULOG << 8 | 1;
const NFULA_PACKET_HDR: u16 = 1;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULA_CFG_TIMEOUT: u16 = 4;
const NFULA_CFG_QTHRESH: u16 = 5;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;
const AF_UNSPEC: u8 = 0;
const NFNETLINK_V0: u8 = 0;
const ETH_P_IP: u16 = 0x0800;

/// Bytes copied of each logged packet: the longest IPv4 header (60 bytes) and the two
/// ports after it.
pub(crate) const COPY_RANGE: u32 = 64;
/// How long [`Reader::read`] waits for a first report.
pub(crate) const WAIT: Duration = Duration::from_secs(1);
/// The most reports one [`Reader::read`] returns; the rest wait in the socket.
const BATCH: usize = 256;
/// The receive buffer asked for: room for thousands of reports.
const RECEIVE_BUFFER: u32 = 1 << 20;

/// A packet the kernel logged, as far as a report needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Logged {
    /// The prefix of the rule that logged it.
    pub(crate) prefix: String,
    /// Its source address: the sandbox's.
    pub(crate) source: Ipv4Addr,
    /// Where it was going.
    pub(crate) destination: Ipv4Addr,
    /// Its transport.
    pub(crate) protocol: IpProtocol,
    /// The destination port, for TCP and UDP in a first fragment.
    pub(crate) port: Option<u16>,
}

/// A netlink socket bound to one NFLOG group.
#[derive(Debug)]
pub(crate) struct Reader {
    nl: Netlink,
    group: u16,
    buf: Vec<u8>,
    /// How many times the kernel reported lost reports (a full receive buffer) since
    /// [`Reader::take_overruns`].
    overruns: u64,
}

impl Reader {
    /// Binds `group` in the calling thread's network namespace; `EPERM` if another socket
    /// holds it.
    pub(crate) fn bind(group: u16) -> io::Result<Self> {
        let mut nl = Netlink::open_netfilter()?;
        if let Err(e) = nl.set_receive_buffer(RECEIVE_BUFFER) {
            // The default buffer still works; reports are just lost sooner under a burst.
            tracing::debug!(error = %e, "could not enlarge the NFLOG receive buffer");
        }
        nl.ack(bind_message(group))?;
        nl.set_timeout(WAIT)?;
        Ok(Self {
            nl,
            group,
            buf: vec![0; 64 * 1024],
            overruns: 0,
        })
    }

    /// Waits up to about [`WAIT`] for reports, then takes whatever else is queued without
    /// waiting; returns up to [`BATCH`] of them, or none if none came.
    pub(crate) fn read(&mut self) -> io::Result<Vec<Logged>> {
        let mut out = Vec::new();
        let deadline = Instant::now() + WAIT;
        while out.len() < BATCH {
            let wait = out.is_empty();
            if wait && Instant::now() >= deadline {
                break;
            }
            match self.nl.receive_datagram(&mut self.buf, wait) {
                Ok(n) => out.extend(parse(&self.buf[..n], self.group)),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    self.overruns += 1;
                    tracing::warn!(
                        group = self.group,
                        "blocked-egress reports were lost: the NFLOG socket's buffer was full"
                    );
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// How many times the kernel reported lost reports since the last call.
    pub(crate) fn take_overruns(&mut self) -> u64 {
        std::mem::take(&mut self.overruns)
    }
}

/// The config message that binds `group`, copying [`COPY_RANGE`] bytes of each packet and
/// sending every report at once (a queue threshold of one; the kernel's default batches
/// up to a second).
fn bind_message(group: u16) -> Msg {
    let mut msg = Msg::new(NFULNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK);
    let g = group.to_be_bytes();
    msg.push(&[AF_UNSPEC, NFNETLINK_V0, g[0], g[1]]);
    msg.attr(NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND]);
    // `struct nfulnl_msg_config_mode`: the copy range (network order), the mode, a pad.
    let r = COPY_RANGE.to_be_bytes();
    msg.attr(
        NFULA_CFG_MODE,
        &[r[0], r[1], r[2], r[3], NFULNL_COPY_PACKET, 0],
    );
    msg.attr(NFULA_CFG_QTHRESH, &1u32.to_be_bytes());
    // In hundredths of a second; with a threshold of one it only matters as a bound.
    msg.attr(NFULA_CFG_TIMEOUT, &1u32.to_be_bytes());
    msg
}

/// The reports of `group` in one datagram; anything else (other messages, IPv6, packets cut
/// short) is skipped.
pub(crate) fn parse(datagram: &[u8], group: u16) -> Vec<Logged> {
    messages(datagram)
        .filter(|(ty, _)| *ty == NFULNL_MSG_PACKET)
        .filter_map(|(_, payload)| parse_packet(payload, group))
        .collect()
}

/// One `NFULNL_MSG_PACKET`'s payload: a `struct nfgenmsg` whose `res_id` is the group
/// (network order), then attributes.
fn parse_packet(payload: &[u8], group: u16) -> Option<Logged> {
    let header = payload.get(..4)?;
    if u16::from_be_bytes([header[2], header[3]]) != group {
        return None;
    }
    let mut ipv4 = false;
    let mut prefix = None;
    let mut packet = None;
    for (ty, v) in attrs(&payload[4..]) {
        match ty {
            // `struct nfulnl_msg_packet_hdr`: the packet's ethertype first.
            NFULA_PACKET_HDR if v.len() >= 2 => {
                ipv4 = u16::from_be_bytes([v[0], v[1]]) == ETH_P_IP;
            }
            NFULA_PREFIX => {
                let s = v.split(|&b| b == 0).next().unwrap_or(v);
                prefix = Some(String::from_utf8_lossy(s).into_owned());
            }
            NFULA_PAYLOAD => packet = Some(v),
            _ => {}
        }
    }
    if !ipv4 {
        return None;
    }
    let (source, destination, protocol, port) = parse_ipv4(packet?)?;
    Some(Logged {
        prefix: prefix?,
        source,
        destination,
        protocol,
        port,
    })
}

/// Source, destination, protocol and (TCP, UDP) destination port of the IPv4 packet that
/// starts `p`.
fn parse_ipv4(p: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, IpProtocol, Option<u16>)> {
    let first = *p.first()?;
    let header_len = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || header_len < 20 || p.len() < 20 {
        return None;
    }
    let fragment_offset = u16::from_be_bytes([p[6], p[7]]) & 0x1fff;
    let protocol = IpProtocol::from_number(p[9]);
    let source = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
    let destination = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
    // Ports are in the first fragment only, right after the options.
    let port = match protocol {
        IpProtocol::Tcp | IpProtocol::Udp if fragment_offset == 0 => p
            .get(header_len + 2..header_len + 4)
            .map(|b| u16::from_be_bytes([b[0], b[1]])),
        _ => None,
    };
    Some((source, destination, protocol, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GROUP: u16 = 0x636f;

    /// An IPv4 header (no options unless `options` words) from .130 to .2, protocol
    /// `proto`, followed by `rest`.
    fn ipv4(proto: u8, options: u8, fragment: u16, rest: &[u8]) -> Vec<u8> {
        let mut p = vec![0x45 + options, 0, 0, 0, 0, 0];
        p.extend(fragment.to_be_bytes());
        p.extend([64, proto, 0, 0, 198, 51, 100, 130, 198, 51, 100, 2]);
        p.extend(std::iter::repeat_n(1u8, usize::from(options) * 4));
        p.extend(rest);
        p
    }

    /// An `NFULNL_MSG_PACKET` the way the kernel lays it out.
    fn report(group: u16, ethertype: u16, prefix: Option<&str>, packet: &[u8]) -> Vec<u8> {
        let mut msg = Msg::new(NFULNL_MSG_PACKET, 0);
        let g = group.to_be_bytes();
        msg.push(&[2, NFNETLINK_V0, g[0], g[1]]);
        let e = ethertype.to_be_bytes();
        // Hook 2 is forward.
        msg.attr(NFULA_PACKET_HDR, &[e[0], e[1], 2, 0]);
        // The in-interface, to be skipped.
        msg.attr(4, &7u32.to_be_bytes());
        if let Some(p) = prefix {
            let mut v = p.as_bytes().to_vec();
            v.push(0);
            msg.attr(NFULA_PREFIX, &v);
        }
        msg.attr(NFULA_PAYLOAD, packet);
        msg.finish(0).to_vec()
    }

    /// Reports captured from this kernel (6.18) by the root test's slot 5: a TCP SYN and a
    /// UDP datagram from 198.51.100.210 to 198.51.100.82:8080, denied by the policy of the
    /// table `coppice_t5`, logged in the forward hook with interface, MAC, timestamp and
    /// hardware-header attributes around the ones read.
    const CAPTURED_TCP: &[&str] = &[
        "d400000000040000000000000000000002007435080001000800020016000a00636f70706963655f",
        "74353a706f6c6963790000000800040000000e070800060000000e080800050000000e0610000800",
        "0006000092bc35d5e17f000006000f000001000006001100000e00001200100002abdf8f37f892bc",
        "35d5e17f0800000014000300000000006b1626b90000000000073680400009004500003cb2ba4000",
        "3f063376c63364d2c6336452c8901f90b57ef23300000000a002faf055ba0000020405b40402080a",
        "1e01fb39000000000103030a",
    ];
    const CAPTURED_UDP: &[&str] = &[
        "b800000000040000000000000000000002007435080001000800020016000a00636f70706963655f",
        "74353a706f6c6963790000000800040000000e070800060000000e080800050000000e0610000800",
        "0006000092bc35d5e17f000006000f000001000006001100000e00001200100002abdf8f37f892bc",
        "35d5e17f0800000014000300000000006b1626bd00000000000e1981210009004500001def304000",
        "3f11f713c63364d2c6336452a6991f90000955a678000000",
    ];

    fn unhex(lines: &[&str]) -> Vec<u8> {
        let hex: String = lines.concat();
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn captured_kernel_reports_parse() {
        let sandbox = Ipv4Addr::new(198, 51, 100, 210);
        let server = Ipv4Addr::new(198, 51, 100, 82);
        for (lines, protocol) in [
            (CAPTURED_TCP, IpProtocol::Tcp),
            (CAPTURED_UDP, IpProtocol::Udp),
        ] {
            let got = parse(&unhex(lines), 0x7435);
            assert_eq!(
                got,
                [Logged {
                    prefix: "coppice_t5:policy".into(),
                    source: sandbox,
                    destination: server,
                    protocol,
                    port: Some(8080),
                }]
            );
            assert!(parse(&unhex(lines), 0x7436).is_empty());
        }
    }

    #[test]
    fn a_tcp_syn_report_gives_addresses_port_and_prefix() {
        // Source port 40000, destination port 8080, then the rest of a TCP header.
        let tcp = [0x9c, 0x40, 0x1f, 0x90, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02];
        let got = parse(
            &report(
                GROUP,
                ETH_P_IP,
                Some("coppice:policy"),
                &ipv4(6, 0, 0, &tcp),
            ),
            GROUP,
        );
        assert_eq!(
            got,
            [Logged {
                prefix: "coppice:policy".into(),
                source: Ipv4Addr::new(198, 51, 100, 130),
                destination: Ipv4Addr::new(198, 51, 100, 2),
                protocol: IpProtocol::Tcp,
                port: Some(8080),
            }]
        );
    }

    #[test]
    fn ports_follow_options_and_only_tcp_and_udp_have_them() {
        // UDP after the longest header: 60 bytes, so the port ends at the copy range.
        let udp = ipv4(17, 10, 0, &[0x13, 0x88, 0x00, 0x35]);
        assert_eq!(udp.len(), COPY_RANGE as usize);
        let got = parse(&report(GROUP, ETH_P_IP, Some("t:host"), &udp), GROUP);
        assert_eq!(got[0].protocol, IpProtocol::Udp);
        assert_eq!(got[0].port, Some(53));
        // ICMP echo: no port.
        let icmp = ipv4(1, 0, 0, &[8, 0, 0, 0]);
        let got = parse(&report(GROUP, ETH_P_IP, Some("t:host"), &icmp), GROUP);
        assert_eq!((got[0].protocol, got[0].port), (IpProtocol::Icmp, None));
        // A later fragment carries no transport header; GRE has no ports.
        let later = ipv4(6, 0, 185, &[0x1f, 0x90, 0x1f, 0x90]);
        assert_eq!(
            parse(&report(GROUP, ETH_P_IP, Some("t:x"), &later), GROUP)[0].port,
            None
        );
        let gre = ipv4(47, 0, 0, &[0, 0, 0x08, 0]);
        let got = parse(&report(GROUP, ETH_P_IP, Some("t:x"), &gre), GROUP);
        assert_eq!(
            (got[0].protocol, got[0].port),
            (IpProtocol::Other(47), None)
        );
        // A copy cut short before the ports.
        let short = ipv4(6, 0, 0, &[0x9c]);
        assert_eq!(
            parse(&report(GROUP, ETH_P_IP, Some("t:x"), &short), GROUP)[0].port,
            None
        );
    }

    #[test]
    fn other_groups_ipv6_and_malformed_reports_are_skipped() {
        let tcp = ipv4(6, 0, 0, &[0, 1, 0, 2]);
        let ok = report(GROUP, ETH_P_IP, Some("t:policy"), &tcp);
        assert!(parse(&report(GROUP + 1, ETH_P_IP, Some("t:p"), &tcp), GROUP).is_empty());
        assert!(parse(&report(GROUP, 0x86dd, Some("t:p"), &tcp), GROUP).is_empty());
        assert!(parse(&report(GROUP, ETH_P_IP, None, &tcp), GROUP).is_empty());
        let mut v6 = tcp.clone();
        v6[0] = 0x60;
        assert!(parse(&report(GROUP, ETH_P_IP, Some("t:p"), &v6), GROUP).is_empty());
        assert!(parse(&report(GROUP, ETH_P_IP, Some("t:p"), &tcp[..19]), GROUP).is_empty());
        // Several messages in one datagram, the last cut short: the whole ones count.
        let mut batch = ok.clone();
        batch.extend(&ok);
        batch.extend(&ok[..ok.len() - 3]);
        assert_eq!(parse(&batch, GROUP).len(), 2);
        // An ack in the stream is not a report.
        let mut ack = Msg::new(2, 0);
        ack.push(&[0; 20]);
        assert!(parse(ack.finish(1), GROUP).is_empty());
    }

    #[test]
    fn binding_asks_for_packets_at_once() {
        let mut msg = bind_message(GROUP);
        let bytes = msg.finish(1).to_vec();
        let (ty, payload) = messages(&bytes).next().unwrap();
        assert_eq!(ty, NFULNL_MSG_CONFIG);
        assert_eq!(payload[..4], [0, 0, 0x63, 0x6f]);
        let got: Vec<(u16, &[u8])> = attrs(&payload[4..]).collect();
        assert_eq!(
            got,
            [
                (NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND][..]),
                (NFULA_CFG_MODE, &[0, 0, 0, 64, NFULNL_COPY_PACKET, 0][..]),
                (NFULA_CFG_QTHRESH, &[0, 0, 0, 1][..]),
                (NFULA_CFG_TIMEOUT, &[0, 0, 0, 1][..]),
            ]
        );
    }
}
