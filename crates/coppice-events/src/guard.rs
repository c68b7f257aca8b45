//! The SSRF guard: which addresses a webhook may reach.
//!
//! A webhook URL is operator- or user-supplied, and the gateway sits inside the operator's
//! network, so a URL must not become a way to reach cloud metadata services or internal hosts.
//! [`WebhookUrl::parse`] accepts only `http`/`https` URLs with a host and no userinfo.
//! [`Guard::resolve`] resolves the host once, checks every candidate with [`Guard::check`],
//! and returns the one address the caller must connect to — so no second lookup can swap in
//! another address (the DNS-rebinding gap).
//!
//! Policy: the operator's deny list always wins; public addresses pass; cloud metadata,
//! loopback, private, link-local and other special addresses are refused unless a CIDR on the
//! operator's allow list covers them. Well-known metadata host names are refused outright.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// Host names of cloud metadata services, refused whatever they resolve to.
pub const METADATA_NAMES: &[&str] = &[
    "metadata.google.internal",
    "metadata.goog",
    "metadata",
    "instance-data",
    "instance-data.ec2.internal",
    "metadata.azure.com",
];

/// Why a URL or address was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GuardError {
    /// Not a URL we can deliver to.
    #[error("invalid webhook url: {reason}")]
    InvalidUrl {
        /// What is wrong with it.
        reason: String,
    },
    /// A scheme other than http or https.
    #[error("unsupported url scheme {scheme:?}: use http or https")]
    Scheme {
        /// The scheme given.
        scheme: String,
    },
    /// The host did not resolve.
    #[error("cannot resolve webhook host {host}")]
    Resolve {
        /// The host name.
        host: String,
        /// The resolver's error.
        #[source]
        source: std::io::Error,
    },
    /// The host name is a cloud metadata service.
    #[error("webhook host {host} is a cloud metadata service")]
    MetadataName {
        /// The host name.
        host: String,
    },
    /// The address is not an allowed destination.
    #[error("webhook address {addr} is not allowed ({reason})")]
    Denied {
        /// The refused address.
        addr: IpAddr,
        /// Why.
        reason: DenyReason,
    },
}

/// Why an address is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// On the operator's deny list.
    DenyList,
    /// A special-purpose class not on the allow list.
    Class(AddrClass),
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DenyReason::DenyList => f.write_str("on the operator deny list"),
            DenyReason::Class(c) => write!(f, "{c} address"),
        }
    }
}

/// What kind of address an IP is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrClass {
    /// A cloud metadata endpoint (169.254.169.254, fd00:ec2::254, 100.100.100.200, ...).
    Metadata,
    /// 127.0.0.0/8, ::1.
    Loopback,
    /// RFC 1918, shared address space (100.64/10), unique local (fc00::/7).
    Private,
    /// 169.254/16, fe80::/10.
    LinkLocal,
    /// 0.0.0.0/8, ::.
    Unspecified,
    /// Multicast and broadcast.
    Multicast,
    /// Documentation, benchmarking, reserved and other non-routable ranges.
    Reserved,
    /// Anything else.
    Public,
}

impl fmt::Display for AddrClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddrClass::Metadata => "cloud metadata",
            AddrClass::Loopback => "loopback",
            AddrClass::Private => "private",
            AddrClass::LinkLocal => "link-local",
            AddrClass::Unspecified => "unspecified",
            AddrClass::Multicast => "multicast",
            AddrClass::Reserved => "reserved",
            AddrClass::Public => "public",
        })
    }
}

/// Classifies `ip`; IPv4-mapped and NAT64 (64:ff9b::/96) IPv6 addresses count as the IPv4
/// address they carry.
pub fn classify(ip: IpAddr) -> AddrClass {
    match normalize(ip) {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [a, b] = s[6].to_be_bytes();
                let [c, d] = s[7].to_be_bytes();
                return IpAddr::V4(Ipv4Addr::new(a, b, c, d));
            }
            ip
        }
        IpAddr::V4(_) => ip,
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddrClass {
    const METADATA: [Ipv4Addr; 5] = [
        Ipv4Addr::new(169, 254, 169, 254), // AWS, GCP, Azure, OpenStack, DigitalOcean...
        Ipv4Addr::new(169, 254, 170, 2),   // AWS ECS task metadata
        Ipv4Addr::new(100, 100, 100, 200), // Alibaba Cloud
        Ipv4Addr::new(192, 0, 0, 192),     // Oracle Cloud
        Ipv4Addr::new(168, 63, 129, 16),   // Azure WireServer
    ];
    let [a, b, ..] = ip.octets();
    if METADATA.contains(&ip) {
        AddrClass::Metadata
    } else if ip.is_loopback() {
        AddrClass::Loopback
    } else if ip.is_unspecified() || a == 0 {
        AddrClass::Unspecified
    } else if ip.is_private() || (a == 100 && (64..128).contains(&b)) {
        AddrClass::Private
    } else if ip.is_link_local() {
        AddrClass::LinkLocal
    } else if ip.is_multicast() || ip.is_broadcast() {
        AddrClass::Multicast
    } else if ip.is_documentation()
        || a >= 240
        || (a == 192 && b == 0 && ip.octets()[2] == 0)
        || (a == 198 && (b == 18 || b == 19))
    {
        AddrClass::Reserved
    } else {
        AddrClass::Public
    }
}

fn classify_v6(ip: Ipv6Addr) -> AddrClass {
    let s = ip.segments();
    if ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
        AddrClass::Metadata
    } else if ip.is_loopback() {
        AddrClass::Loopback
    } else if ip.is_unspecified() {
        AddrClass::Unspecified
    } else if s[0] & 0xfe00 == 0xfc00 {
        AddrClass::Private
    } else if s[0] & 0xffc0 == 0xfe80 {
        AddrClass::LinkLocal
    } else if ip.is_multicast() {
        AddrClass::Multicast
    } else if (s[0] == 0x2001 && s[1] == 0xdb8) || s[0] & 0xe000 != 0x2000 {
        // Documentation, and everything outside global unicast 2000::/3.
        AddrClass::Reserved
    } else {
        AddrClass::Public
    }
}

/// An address range, `10.0.0.0/8` or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` (normalized like [`classify`] does) lies in the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, normalize(ip)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = GuardError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || GuardError::InvalidUrl {
            reason: format!("{s:?} is not an address or CIDR range"),
        };
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (s, None),
        };
        let net: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        Ok(Cidr { net, prefix })
    }
}

/// `http` or `https`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP.
    Http,
    /// HTTP over TLS.
    Https,
}

/// The host part of a webhook URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// An address literal.
    Ip(IpAddr),
    /// A DNS name, lowercase, without a trailing dot.
    Name(String),
}

/// A syntactically valid webhook URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl {
    /// The scheme.
    pub scheme: Scheme,
    /// The host.
    pub host: Host,
    /// The port (default 80 or 443).
    pub port: u16,
    /// The `Host` header value: the URL's authority.
    pub authority: String,
    /// Path and query, `/` at least.
    pub path_and_query: String,
}

impl WebhookUrl {
    /// Longest URL accepted.
    pub const MAX_LEN: usize = 2048;

    /// Parses and checks the syntax; addresses are checked later by [`Guard`].
    pub fn parse(url: &str) -> Result<Self, GuardError> {
        let invalid = |reason: &str| GuardError::InvalidUrl {
            reason: reason.to_owned(),
        };
        if url.len() > Self::MAX_LEN {
            return Err(invalid("longer than 2048 bytes"));
        }
        let uri: http::Uri = url
            .parse()
            .map_err(|_| invalid("not an absolute http(s) URL"))?;
        let scheme = match uri.scheme_str() {
            Some("http") => Scheme::Http,
            Some("https") => Scheme::Https,
            Some(other) => {
                return Err(GuardError::Scheme {
                    scheme: other.to_owned(),
                })
            }
            None => return Err(invalid("not an absolute http(s) URL")),
        };
        let authority = uri.authority().ok_or_else(|| invalid("no host"))?;
        if authority.as_str().contains('@') {
            return Err(invalid("credentials in the URL are not allowed"));
        }
        let raw_host = authority.host();
        if raw_host.is_empty() {
            return Err(invalid("no host"));
        }
        let bare = raw_host.trim_start_matches('[').trim_end_matches(']');
        let host = match bare.parse::<IpAddr>() {
            Ok(ip) => Host::Ip(ip),
            Err(_) => Host::Name(bare.trim_end_matches('.').to_ascii_lowercase()),
        };
        let port = authority.port_u16().unwrap_or(match scheme {
            Scheme::Http => 80,
            Scheme::Https => 443,
        });
        Ok(WebhookUrl {
            scheme,
            host,
            port,
            authority: authority.as_str().to_owned(),
            path_and_query: uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
        })
    }
}

/// The operator's policy for webhook destinations.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    allow: Vec<Cidr>,
    deny: Vec<Cidr>,
}

impl Guard {
    /// A guard that permits public addresses plus `allow`, and never `deny`.
    pub fn new(allow: Vec<Cidr>, deny: Vec<Cidr>) -> Self {
        Guard { allow, deny }
    }

    /// Whether `ip` may be connected to.
    pub fn check(&self, ip: IpAddr) -> Result<(), GuardError> {
        if self.deny.iter().any(|c| c.contains(ip)) {
            return Err(GuardError::Denied {
                addr: ip,
                reason: DenyReason::DenyList,
            });
        }
        match classify(ip) {
            AddrClass::Public => Ok(()),
            _ if self.allow.iter().any(|c| c.contains(ip)) => Ok(()),
            class => Err(GuardError::Denied {
                addr: ip,
                reason: DenyReason::Class(class),
            }),
        }
    }

    /// The checks that need no DNS: a metadata host name, or an address literal the policy
    /// refuses. The gateway runs this when a webhook is created, to answer 400 early.
    pub fn check_url(&self, url: &WebhookUrl) -> Result<(), GuardError> {
        match &url.host {
            Host::Ip(ip) => self.check(*ip),
            Host::Name(name) => check_name(name),
        }
    }

    /// Resolves `url`'s host once and returns the first address the policy allows: the
    /// address to connect to. Errors with the first refusal when none is allowed.
    pub async fn resolve(&self, url: &WebhookUrl) -> Result<SocketAddr, GuardError> {
        let candidates: Vec<SocketAddr> = match &url.host {
            Host::Ip(ip) => vec![SocketAddr::new(*ip, url.port)],
            Host::Name(name) => {
                check_name(name)?;
                tokio::net::lookup_host((name.as_str(), url.port))
                    .await
                    .map_err(|source| GuardError::Resolve {
                        host: name.clone(),
                        source,
                    })?
                    .collect()
            }
        };
        let mut first_err = None;
        for addr in candidates {
            match self.check(addr.ip()) {
                Ok(()) => return Ok(addr),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.unwrap_or_else(|| GuardError::Resolve {
            host: url.authority.clone(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses"),
        }))
    }
}

fn check_name(name: &str) -> Result<(), GuardError> {
    if METADATA_NAMES.contains(&name) {
        Err(GuardError::MetadataName {
            host: name.to_owned(),
        })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn classifies_special_addresses() {
        let cases = [
            ("169.254.169.254", AddrClass::Metadata),
            ("fd00:ec2::254", AddrClass::Metadata),
            ("100.100.100.200", AddrClass::Metadata),
            ("::ffff:169.254.169.254", AddrClass::Metadata),
            ("64:ff9b::a9fe:a9fe", AddrClass::Metadata),
            ("127.0.0.1", AddrClass::Loopback),
            ("127.8.9.10", AddrClass::Loopback),
            ("::1", AddrClass::Loopback),
            ("::ffff:127.0.0.1", AddrClass::Loopback),
            ("10.1.2.3", AddrClass::Private),
            ("172.16.0.1", AddrClass::Private),
            ("192.168.1.1", AddrClass::Private),
            ("100.64.0.1", AddrClass::Private),
            ("fd12::1", AddrClass::Private),
            ("169.254.1.1", AddrClass::LinkLocal),
            ("fe80::1", AddrClass::LinkLocal),
            ("0.0.0.0", AddrClass::Unspecified),
            ("::", AddrClass::Unspecified),
            ("224.0.0.1", AddrClass::Multicast),
            ("255.255.255.255", AddrClass::Multicast),
            ("ff02::1", AddrClass::Multicast),
            ("192.0.2.1", AddrClass::Reserved),
            ("2001:db8::1", AddrClass::Reserved),
            ("240.0.0.1", AddrClass::Reserved),
            ("93.184.216.34", AddrClass::Public),
            ("100.128.0.1", AddrClass::Public),
            ("2606:4700::1111", AddrClass::Public),
        ];
        for (s, class) in cases {
            assert_eq!(classify(ip(s)), class, "{s}");
        }
    }

    #[test]
    fn policy_allow_and_deny_lists() {
        let default = Guard::default();
        assert!(matches!(
            default.check(ip("127.0.0.1")),
            Err(GuardError::Denied {
                reason: DenyReason::Class(AddrClass::Loopback),
                ..
            })
        ));
        default.check(ip("93.184.216.34")).unwrap();
        assert!(matches!(
            default.check(ip("169.254.169.254")),
            Err(GuardError::Denied { .. })
        ));

        let loopback = Guard::new(
            vec!["127.0.0.0/8".parse().unwrap(), "::1".parse().unwrap()],
            vec![
                "93.184.216.0/24".parse().unwrap(),
                "127.0.0.2".parse().unwrap(),
            ],
        );
        loopback.check(ip("127.0.0.1")).unwrap();
        loopback.check(ip("::1")).unwrap();
        loopback.check(ip("::ffff:127.0.0.1")).unwrap();
        // Allowing loopback does not allow metadata or private ranges.
        assert!(matches!(
            loopback.check(ip("169.254.169.254")),
            Err(GuardError::Denied { .. })
        ));
        assert!(matches!(
            loopback.check(ip("10.0.0.1")),
            Err(GuardError::Denied { .. })
        ));
        // The deny list wins over the allow list and over "public".
        for denied in ["127.0.0.2", "93.184.216.34"] {
            assert!(matches!(
                loopback.check(ip(denied)),
                Err(GuardError::Denied {
                    reason: DenyReason::DenyList,
                    ..
                })
            ));
        }
    }

    #[test]
    fn cidr_parsing() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains(ip("10.255.0.1")));
        assert!(!c.contains(ip("11.0.0.1")));
        assert!(!c.contains(ip("::1")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("8.8.8.8")));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fd00:ec2::254")));
        for bad in ["10.0.0.0/33", "::/129", "nope", "10.0.0.0/x"] {
            assert!(matches!(
                bad.parse::<Cidr>(),
                Err(GuardError::InvalidUrl { .. })
            ));
        }
    }

    #[test]
    fn url_syntax() {
        let u = WebhookUrl::parse("http://127.0.0.1:8080/hook?x=1").unwrap();
        assert_eq!(u.host, Host::Ip(ip("127.0.0.1")));
        assert_eq!(u.port, 8080);
        assert_eq!(u.path_and_query, "/hook?x=1");
        assert_eq!(u.authority, "127.0.0.1:8080");
        let u = WebhookUrl::parse("https://Example.COM.").unwrap();
        assert_eq!(u.host, Host::Name("example.com".into()));
        assert_eq!(
            (u.scheme, u.port, u.path_and_query.as_str()),
            (Scheme::Https, 443, "/")
        );
        let u = WebhookUrl::parse("http://[::1]:9/x").unwrap();
        assert_eq!(u.host, Host::Ip(ip("::1")));
        assert!(matches!(
            WebhookUrl::parse("ftp://example.com/"),
            Err(GuardError::Scheme { .. })
        ));
        for bad in [
            "",
            "example.com/hook",
            "http://user:pw@example.com/",
            "/relative",
        ] {
            assert!(
                matches!(WebhookUrl::parse(bad), Err(GuardError::InvalidUrl { .. })),
                "{bad}"
            );
        }
        let long = format!("http://example.com/{}", "a".repeat(3000));
        assert!(matches!(
            WebhookUrl::parse(&long),
            Err(GuardError::InvalidUrl { .. })
        ));
    }

    #[tokio::test]
    async fn resolve_returns_the_checked_address() {
        let guard = Guard::new(vec!["127.0.0.0/8".parse().unwrap()], vec![]);
        let u = WebhookUrl::parse("http://127.0.0.1:4000/").unwrap();
        assert_eq!(
            guard.resolve(&u).await.unwrap(),
            "127.0.0.1:4000".parse().unwrap()
        );
        // "localhost" resolves from /etc/hosts, no network needed; loopback is refused by
        // default and the name does not get around it.
        let by_name = WebhookUrl::parse("http://localhost:4000/").unwrap();
        assert!(matches!(
            Guard::default().resolve(&by_name).await,
            Err(GuardError::Denied { .. })
        ));
        let meta = WebhookUrl::parse("http://metadata.google.internal/computeMetadata/").unwrap();
        assert!(matches!(
            guard.resolve(&meta).await,
            Err(GuardError::MetadataName { .. })
        ));
        assert!(matches!(
            guard.check_url(&meta),
            Err(GuardError::MetadataName { .. })
        ));
        let literal = WebhookUrl::parse("http://169.254.169.254/latest/").unwrap();
        assert!(matches!(
            guard.resolve(&literal).await,
            Err(GuardError::Denied { .. })
        ));
    }
}
