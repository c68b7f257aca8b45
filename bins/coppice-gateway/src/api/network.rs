//! Sandbox networking on the API: E2B's `network` block and `allow_internet_access` on
//! create, `PUT /sandboxes/{id}/network`, and the `network` that `GET /sandboxes/{id}`
//! echoes.
//!
//! E2B's semantics: `allowOut` always wins over `denyOut`, and `allow_internet_access: false`
//! is `denyOut: ["0.0.0.0/0"]`. IPs and CIDRs become the network role's [`EgressPolicy`],
//! enforced in the kernel; domains (`example.com`, `*.example.com`) open the addresses the
//! sandboxes' DNS forwarder resolves them to. Every field the gateway cannot honour is
//! refused with a 400 that names it, never accepted and ignored: `egressProxy`, `rules`,
//! `maskRequestHost`, `httpsPorts`, IPv6 destinations in `allowOut`, and anything that needs
//! egress when sandbox networking is off (`--sandbox-network off`). IPv6 entries in `denyOut`
//! are honoured as given: sandboxes have no IPv6 egress at all.

use std::net::Ipv4Addr;

use bytes::Bytes;
use coppice_events::event::Event;
use coppice_lifecycle::backend::{EgressPolicy, Ipv4Cidr, SandboxId};
use coppice_lifecycle::state::SandboxState;
use coppice_wire::sandbox::{NetworkConfig, NetworkUpdate};
use http::{Response, StatusCode};
use serde_json::Value;

use crate::api::error::ApiError;
use crate::api::{empty, Body};
use crate::{context, now, Gateway};

/// Most entries in `allowOut` or `denyOut`: each is a set element in the kernel.
const MAX_ENTRIES: usize = 1024;
/// Most `dnsServers` (glibc reads three).
const MAX_DNS_SERVERS: usize = 3;

/// What a create asks of the network, parsed and checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Requested {
    /// The egress policy to enforce.
    pub(crate) policy: EgressPolicy,
    /// Resolvers for `/etc/resolv.conf`; empty for the gateway's own.
    pub(crate) dns_servers: Vec<Ipv4Addr>,
    /// Whether its ports need a traffic access token (`allowPublicTraffic: false`).
    pub(crate) traffic_token: bool,
    /// The `network` block as recorded, echoed by `GET /sandboxes/{id}`.
    pub(crate) echo: Option<NetworkConfig>,
}

/// Parses and checks a create's `network` and `allow_internet_access`; `enabled` says
/// whether this gateway gives sandboxes a network.
pub(crate) fn on_create(
    network: Option<&Value>,
    allow_internet: Option<bool>,
    enabled: bool,
) -> Result<Requested, ApiError> {
    let config: Option<NetworkConfig> = match network {
        None | Some(Value::Null) => None,
        Some(v @ Value::Object(_)) => Some(
            serde_json::from_value(v.clone())
                .map_err(|e| ApiError::bad_request(format!("invalid network: {e}")))?,
        ),
        Some(_) => return Err(ApiError::bad_request("network must be an object")),
    };
    let Some(config) = config else {
        return Ok(Requested {
            policy: egress(None, None, allow_internet, enabled)?,
            ..Requested::default()
        });
    };
    refuse_unsupported(
        config.egress_proxy.as_ref(),
        config.rules.as_ref(),
        config.mask_request_host.as_ref(),
        config.https_ports.as_ref(),
    )?;
    let policy = egress(
        config.allow_out.as_deref(),
        config.deny_out.as_deref(),
        allow_internet,
        enabled,
    )?;
    let dns_servers = dns_servers(config.dns_servers.as_deref(), enabled)?;
    Ok(Requested {
        policy,
        dns_servers,
        traffic_token: config.allow_public_traffic == Some(false),
        echo: Some(config),
    })
}

/// The fields of E2B's network configuration this gateway does not implement: a 400 naming
/// the first one given.
fn refuse_unsupported(
    egress_proxy: Option<&Value>,
    rules: Option<&Value>,
    mask_request_host: Option<&String>,
    https_ports: Option<&Value>,
) -> Result<(), ApiError> {
    let given = |v: Option<&Value>| match v {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => !o.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(_) => true,
    };
    for (name, is_given) in [
        ("egressProxy", given(egress_proxy)),
        ("rules", given(rules)),
        ("maskRequestHost", mask_request_host.is_some()),
        ("httpsPorts", given(https_ports)),
    ] {
        if is_given {
            return Err(ApiError::bad_request(format!(
                "network.{name} is not supported by this gateway"
            )));
        }
    }
    Ok(())
}

/// The egress policy for E2B's lists and switch.
fn egress(
    allow_out: Option<&[String]>,
    deny_out: Option<&[String]>,
    allow_internet: Option<bool>,
    enabled: bool,
) -> Result<EgressPolicy, ApiError> {
    let allow_out = allow_out.unwrap_or_default();
    let deny_out = deny_out.unwrap_or_default();
    for (name, list) in [("allowOut", allow_out), ("denyOut", deny_out)] {
        if list.len() > MAX_ENTRIES {
            return Err(ApiError::bad_request(format!(
                "network.{name} has {} entries; at most {MAX_ENTRIES} are allowed",
                list.len()
            )));
        }
    }
    if !enabled && !allow_out.is_empty() {
        return Err(ApiError::bad_request(
            "network.allowOut cannot be honoured: sandbox networking is off on this gateway \
             (--sandbox-network off), so sandboxes reach nothing but their own loopback",
        ));
    }
    let mut policy = EgressPolicy {
        allow_internet: allow_internet.unwrap_or(true),
        ..EgressPolicy::default()
    };
    for entry in allow_out {
        match destination(entry) {
            Destination::V4(c) => policy.allow_out.push(c),
            Destination::V6 => {
                return Err(ApiError::bad_request(format!(
                    "network.allowOut entry {entry:?}: IPv6 destinations are not supported, \
                     sandboxes have IPv4 egress only"
                )))
            }
            Destination::Domain(name) => policy.allow_domains.push(name),
            Destination::Invalid(why) => {
                return Err(ApiError::bad_request(format!(
                    "network.allowOut entry {entry:?} is not an IP address, CIDR or domain: {why}"
                )))
            }
        }
    }
    for entry in deny_out {
        match destination(entry) {
            Destination::V4(c) => policy.deny_out.push(c),
            // Sandboxes have no IPv6 egress: the entry holds as asked.
            Destination::V6 => {}
            Destination::Domain(_) => {
                return Err(ApiError::bad_request(format!(
                    "network.denyOut entry {entry:?}: domain names are not supported for deny \
                     rules, only IP addresses and CIDRs"
                )))
            }
            Destination::Invalid(why) => {
                return Err(ApiError::bad_request(format!(
                    "network.denyOut entry {entry:?} is not an IP address or CIDR: {why}"
                )))
            }
        }
    }
    Ok(policy)
}

/// What an `allowOut` or `denyOut` entry names.
enum Destination {
    V4(Ipv4Cidr),
    V6,
    /// A hostname or `*.hostname`, as the network role checks and normalizes it.
    Domain(String),
    Invalid(String),
}

fn destination(entry: &str) -> Destination {
    let entry = entry.trim();
    let (addr, prefix) = entry.split_once('/').unwrap_or((entry, ""));
    if addr.parse::<std::net::Ipv6Addr>().is_ok() {
        return match prefix.parse::<u8>() {
            Ok(p) if p <= 128 => Destination::V6,
            _ if prefix.is_empty() => Destination::V6,
            _ => Destination::Invalid(format!("bad IPv6 prefix {prefix:?}")),
        };
    }
    if addr.parse::<Ipv4Addr>().is_ok() {
        return match entry.parse::<Ipv4Cidr>() {
            Ok(c) => Destination::V4(c),
            Err(e) => Destination::Invalid(e.to_string()),
        };
    }
    // The network role's own check of a domain entry, so both agree on what one is.
    match EgressPolicy::domain(entry) {
        Ok(name) => Destination::Domain(name),
        Err(e) => Destination::Invalid(e.to_string()),
    }
}

fn dns_servers(list: Option<&[String]>, enabled: bool) -> Result<Vec<Ipv4Addr>, ApiError> {
    let list = list.unwrap_or_default();
    if list.is_empty() {
        return Ok(Vec::new());
    }
    if !enabled {
        return Err(ApiError::bad_request(
            "network.dnsServers cannot be honoured: sandbox networking is off on this gateway \
             (--sandbox-network off)",
        ));
    }
    if list.len() > MAX_DNS_SERVERS {
        return Err(ApiError::bad_request(format!(
            "network.dnsServers has {} entries; at most {MAX_DNS_SERVERS} are used",
            list.len()
        )));
    }
    list.iter()
        .map(|s| {
            s.trim().parse::<Ipv4Addr>().map_err(|_| {
                ApiError::bad_request(format!(
                    "network.dnsServers entry {s:?} is not an IPv4 address"
                ))
            })
        })
        .collect()
}

/// `PUT /sandboxes/{id}/network`: replaces the whole egress configuration of a running or
/// paused sandbox (an omitted field is cleared), at once in the kernel, and records it with
/// a `sandbox.lifecycle.updated` event. 204; 404 for an unknown sandbox.
pub(crate) async fn update(
    gw: &Gateway,
    id: &str,
    body: &Bytes,
) -> Result<Response<Body>, ApiError> {
    let update: NetworkUpdate = if body.iter().all(u8::is_ascii_whitespace) {
        NetworkUpdate::default()
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))?
    };
    let entry = SandboxId::new(id)
        .ok()
        .and_then(|sid| gw.entry(&sid))
        .ok_or_else(|| ApiError::sandbox_not_found(id))?;
    refuse_unsupported(
        update.egress_proxy.as_ref(),
        update.rules.as_ref(),
        None,
        None,
    )?;
    let enabled = gw.runtime.has_network();
    let policy = egress(
        update.allow_out.as_deref(),
        update.deny_out.as_deref(),
        update.allow_internet_access,
        enabled,
    )?;
    let dns = dns_servers(update.dns_servers.as_deref(), enabled)?;
    let _op = entry.op.write().await;
    let record = entry.record();
    if !matches!(
        record.lifecycle.state,
        SandboxState::Running | SandboxState::Paused
    ) {
        return Err(ApiError::sandbox_not_found(id));
    }
    // A sandbox paused filesystem-only has no network now; its next boot applies the
    // recorded configuration.
    if enabled && !record.paused_cold {
        gw.runtime.update_policy(&record.id, &policy).await?;
        gw.runtime.set_resolvers(&record.id, &dns).await?;
    }
    // The ingress half of the configuration is not part of an update: it stays as created.
    let kept = record.network.clone().unwrap_or_default();
    let network = NetworkConfig {
        allow_public_traffic: kept.allow_public_traffic,
        dns_servers: update.dns_servers,
        allow_out: update.allow_out,
        deny_out: update.deny_out,
        ..NetworkConfig::default()
    };
    let record = crate::registry::Record {
        allow_internet: update.allow_internet_access,
        network: (network != NetworkConfig::default()).then_some(network),
        ..record
    };
    let mut event = Event::updated(&context(&record), "network", now());
    if let Some(Value::Object(data)) = event.event_data.as_mut() {
        data.insert(
            "network".into(),
            serde_json::to_value(&record.network).unwrap_or(Value::Null),
        );
        data.insert(
            "allow_internet_access".into(),
            Value::from(policy.allow_internet),
        );
    }
    gw.commit_event(&entry, record, event)?;
    tracing::info!(sandbox = %id, ?policy, "network policy updated");
    Ok(empty(StatusCode::NO_CONTENT))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(network: Value, internet: Option<bool>) -> Result<Requested, String> {
        on_create(Some(&network), internet, true).map_err(|e| e.message)
    }

    #[test]
    fn e2b_lists_become_a_policy() {
        let r = create(
            serde_json::json!({
                "allowOut": ["198.51.100.7", "198.51.100.64/26"],
                "denyOut": ["0.0.0.0/0", "::/0"],
                "allowPublicTraffic": false,
                "dnsServers": ["198.51.100.53"],
            }),
            None,
        )
        .unwrap();
        assert!(r.policy.allow_internet);
        assert_eq!(r.policy.allow_out.len(), 2);
        assert_eq!(r.policy.deny_out, ["0.0.0.0/0".parse().unwrap()]);
        assert!(!r.policy.allows("198.51.100.1".parse().unwrap()));
        assert!(r.policy.allows("198.51.100.7".parse().unwrap()));
        assert!(r.traffic_token);
        assert_eq!(r.dns_servers, [Ipv4Addr::new(198, 51, 100, 53)]);
        let plain = on_create(None, Some(false), true).unwrap();
        assert!(!plain.policy.allow_internet);
        assert_eq!(plain.echo, None);
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_by_name() {
        for (network, needle) in [
            (
                serde_json::json!({"egressProxy": {"address": "p:1080"}}),
                "network.egressProxy",
            ),
            (
                serde_json::json!({"rules": {"a.example": []}}),
                "network.rules",
            ),
            (
                serde_json::json!({"maskRequestHost": "${PORT}-x"}),
                "network.maskRequestHost",
            ),
            (
                serde_json::json!({"httpsPorts": [443]}),
                "network.httpsPorts",
            ),
            (serde_json::json!({"allowOut": ["2001:db8::1"]}), "IPv6"),
            (
                serde_json::json!({"denyOut": ["example.com"]}),
                "deny rules",
            ),
            (
                serde_json::json!({"allowOut": ["not a host!"]}),
                "not an IP address",
            ),
            (
                serde_json::json!({"allowOut": ["198.51.100.0/33"]}),
                "198.51.100.0/33",
            ),
            (
                serde_json::json!({"dnsServers": ["resolver"]}),
                "network.dnsServers",
            ),
            (serde_json::json!({"bogus": 1}), "bogus"),
        ] {
            let err = create(network.clone(), None).unwrap_err();
            assert!(err.contains(needle), "{network}: {err}");
        }
        let off = on_create(
            Some(&serde_json::json!({"allowOut": ["198.51.100.7"]})),
            None,
            false,
        )
        .unwrap_err()
        .message;
        assert!(off.contains("--sandbox-network off"), "{off}");
        create(serde_json::json!({"allowPublicTraffic": "no"}), None).unwrap_err();
        on_create(Some(&serde_json::json!([])), None, true).unwrap_err();
        let open = create(
            serde_json::json!({"allowPublicTraffic": true, "allowOut": []}),
            None,
        );
        assert!(!open.unwrap().traffic_token);
        // Without a network nothing is reachable anyway: these hold as asked.
        let r = on_create(
            Some(&serde_json::json!({"denyOut": ["0.0.0.0/0"], "allowOut": []})),
            Some(false),
            false,
        )
        .unwrap();
        assert!(!r.policy.allow_internet);
    }

    #[test]
    fn domains_are_told_apart_from_addresses() {
        assert!(matches!(destination("example.com"), Destination::Domain(_)));
        assert!(matches!(
            destination("*.example.com"),
            Destination::Domain(_)
        ));
        assert!(matches!(destination("10.0.0.1/8"), Destination::V4(_)));
        assert!(matches!(destination("::1"), Destination::V6));
        assert!(matches!(destination("-bad-.com"), Destination::Invalid(_)));
        assert!(matches!(destination("1.2.3"), Destination::Invalid(_)));
    }
}
