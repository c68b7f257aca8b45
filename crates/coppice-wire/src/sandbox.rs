//! Control-plane requests and responses (`/sandboxes`, `/v2/sandboxes`).
//!
//! Field names are exactly those on the wire, camelCase except E2B's own snake_case
//! `allow_internet_access`. Requests use `deny_unknown_fields`: the SDKs never send other
//! fields, so anything else is a client bug that deserves a 400.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `POST /v2/sandboxes` (`NewSandboxV2`) and legacy `POST /sandboxes` (`NewSandbox`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NewSandbox {
    /// Template id or alias; `base` when absent.
    #[serde(rename = "templateID", default)]
    pub template_id: Option<String>,
    /// Window in seconds.
    #[serde(default)]
    pub timeout: Option<i64>,
    /// Window in milliseconds (Coppice extension; wins over `timeout`).
    #[serde(default)]
    pub timeout_ms: Option<i64>,
    /// User metadata.
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
    /// Environment variables for every process.
    #[serde(default)]
    pub env_vars: Option<BTreeMap<String, String>>,
    /// E2B's snake_case internet switch.
    #[serde(rename = "allow_internet_access", default)]
    pub allow_internet_access: Option<bool>,
    /// `true`: pause instead of kill when the window ends.
    #[serde(default)]
    pub auto_pause: Option<bool>,
    /// `false`: filesystem-only pause.
    #[serde(default)]
    pub auto_pause_memory: Option<bool>,
    /// Resume on traffic: `{"enabled": bool}` as `e2b` sends it, or a bare bool.
    #[serde(default)]
    pub auto_resume: Option<AutoResume>,
    /// Coppice's explicit lifecycle block.
    #[serde(default)]
    pub lifecycle: Option<LifecycleRequest>,
    /// Legacy `secure` flag (every Coppice sandbox has an access token).
    #[serde(default)]
    pub secure: Option<bool>,
    /// Network policy, kept as sent.
    #[serde(default)]
    pub network: Option<serde_json::Value>,
    /// MCP gateway config, kept as sent.
    #[serde(default)]
    pub mcp: Option<serde_json::Value>,
    /// Workload identity, kept as sent.
    #[serde(default)]
    pub iam: Option<serde_json::Value>,
    /// Volume mounts, kept as sent.
    #[serde(default)]
    pub volume_mounts: Option<serde_json::Value>,
}

/// E2B's `SandboxNetworkConfig`: the `network` block of a create.
///
/// `allowOut` entries are IPs, CIDRs or domains (`example.com`, `*.example.com`); `denyOut`
/// entries are IPs or CIDRs. Fields a gateway does not implement are still parsed, so that it
/// can refuse them by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkConfig {
    /// `false`: requests to the sandbox's ports need its `trafficAccessToken`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_public_traffic: Option<bool>,
    /// Destinations always allowed, whatever `denyOut` says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_out: Option<Vec<String>>,
    /// Destinations denied unless `allowOut` allows them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny_out: Option<Vec<String>>,
    /// Resolvers for the sandbox's `/etc/resolv.conf`, instead of the gateway's forwarder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_servers: Option<Vec<String>>,
    /// A SOCKS5 proxy for egress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_proxy: Option<serde_json::Value>,
    /// A host mask for requests to the sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_request_host: Option<String>,
    /// Ports served over TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub https_ports: Option<serde_json::Value>,
    /// Per-domain header transforms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<serde_json::Value>,
}

/// E2B's `SandboxNetworkUpdateConfig`, the body of `PUT /sandboxes/{id}/network`: it replaces
/// the whole egress configuration, and an omitted field is cleared.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkUpdate {
    /// As in [`NetworkConfig::allow_out`].
    #[serde(default)]
    pub allow_out: Option<Vec<String>>,
    /// As in [`NetworkConfig::deny_out`].
    #[serde(default)]
    pub deny_out: Option<Vec<String>>,
    /// As in [`NetworkConfig::dns_servers`]; omitted means the gateway's resolver.
    #[serde(default)]
    pub dns_servers: Option<Vec<String>>,
    /// As in [`NetworkConfig::egress_proxy`].
    #[serde(default)]
    pub egress_proxy: Option<serde_json::Value>,
    /// As in [`NetworkConfig::rules`].
    #[serde(default)]
    pub rules: Option<serde_json::Value>,
    /// E2B's snake_case internet switch; omitted means allowed.
    #[serde(rename = "allow_internet_access", default)]
    pub allow_internet_access: Option<bool>,
}

/// `autoResume` on the wire: `{"enabled": true}` (e2b 2.63) or `true`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum AutoResume {
    /// `true` / `false`.
    Flag(bool),
    /// `{"enabled": bool}`.
    Object {
        /// Whether it is on.
        enabled: bool,
    },
}

impl AutoResume {
    /// Whether auto-resume is on.
    pub fn enabled(self) -> bool {
        match self {
            AutoResume::Flag(b) | AutoResume::Object { enabled: b } => b,
        }
    }
}

/// `lifecycle: {"onTimeout": "pause"|"kill", "autoResume": bool}` on create.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LifecycleRequest {
    /// What the window's end does.
    #[serde(default)]
    pub on_timeout: Option<OnTimeoutWire>,
    /// Resume on traffic.
    #[serde(default)]
    pub auto_resume: Option<bool>,
}

/// `"kill"` or `"pause"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeoutWire {
    /// Kill at the end of the window.
    Kill,
    /// Pause at the end of the window.
    Pause,
}

/// `POST /v2/sandboxes/{id}/connect` and legacy `/sandboxes/{id}/connect`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectRequest {
    /// Window in seconds (300 when absent).
    #[serde(default)]
    pub timeout: Option<i64>,
    /// `false` for `on_resume="reboot"`.
    #[serde(default)]
    pub memory: Option<bool>,
}

/// `POST /sandboxes/{id}/timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutRequest {
    /// New window in seconds from now.
    pub timeout: i64,
}

/// `POST /sandboxes/{id}/refreshes`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    /// Seconds from now (at most 3600).
    #[serde(default)]
    pub duration: Option<i64>,
}

/// `POST /sandboxes/{id}/pause`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PauseRequest {
    /// `false` for a filesystem-only pause.
    #[serde(default)]
    pub memory: Option<bool>,
    /// Fail unless the guest agent answers.
    #[serde(default)]
    pub require_healthy_guest: Option<bool>,
}

/// Legacy `POST /sandboxes/{id}/resume`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ResumeRequest {
    /// Window in seconds.
    #[serde(default)]
    pub timeout: Option<i64>,
    /// Legacy flag.
    #[serde(default)]
    pub auto_pause: Option<bool>,
}

/// The `Sandbox` body of create, connect and resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sandbox {
    /// Template id.
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Sandbox id.
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    /// Deprecated; any string.
    #[serde(rename = "clientID")]
    pub client_id: String,
    /// envd version the SDK gates features on.
    pub envd_version: String,
    /// Becomes the SDK's `X-Access-Token`.
    pub envd_access_token: Option<String>,
    /// Traffic token (unused: always null).
    pub traffic_access_token: Option<String>,
    /// Sandbox domain (null: the SDK uses `E2B_SANDBOX_URL` or its own domain).
    pub domain: Option<String>,
    /// Template alias.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
}

/// The `lifecycle` block of detail and list responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LifecycleBlock {
    /// Resume on traffic.
    pub auto_resume: bool,
    /// `"kill"` or `"pause"`.
    pub on_timeout: OnTimeoutWire,
    /// The window in milliseconds (Coppice extension).
    pub timeout_ms: u64,
}

/// `SandboxDetail` (`GET /sandboxes/{id}`) and `ListedSandbox` (`GET /v2/sandboxes` items).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxDetail {
    /// Template id.
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Sandbox id.
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    /// Deprecated; any string.
    #[serde(rename = "clientID")]
    pub client_id: String,
    /// Template alias.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// RFC 3339 start of the sandbox.
    pub started_at: String,
    /// RFC 3339 end of the window.
    pub end_at: String,
    /// envd version.
    pub envd_version: String,
    /// The envd access token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub envd_access_token: Option<String>,
    /// CPUs the sandbox may use.
    pub cpu_count: u32,
    /// Memory limit in MiB.
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    /// Disk size in MiB.
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    /// `"running"` or `"paused"`.
    pub state: String,
    /// User metadata.
    pub metadata: BTreeMap<String, String>,
    /// Internet access as asked.
    pub allow_internet_access: Option<bool>,
    /// Sandbox domain.
    pub domain: Option<String>,
    /// The network configuration in force; absent when none was given (the Python SDK
    /// parses a `null` here as an object and fails).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkConfig>,
    /// Lifecycle settings.
    pub lifecycle: LifecycleBlock,
    /// How a paused sandbox was paused: `"full"` (memory kept) or `"filesystem"` (files
    /// only; a resume boots it again). Absent while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_mode: Option<String>,
}

/// One sample of `GET /sandboxes/{id}/metrics`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxMetric {
    /// RFC 3339 sample time.
    pub timestamp: String,
    /// Unix seconds of the sample.
    pub timestamp_unix: i64,
    /// CPUs available.
    pub cpu_count: u32,
    /// CPU use in percent of the available CPUs.
    pub cpu_used_pct: f64,
    /// Bytes of memory used.
    pub mem_used: u64,
    /// Memory limit in bytes.
    pub mem_total: u64,
    /// Page cache bytes.
    pub mem_cache: u64,
    /// Bytes written to the sandbox's disk.
    pub disk_used: u64,
    /// Disk size in bytes.
    pub disk_total: u64,
}

/// `GET /sandboxes/metrics`: the latest sample of each sandbox asked for (`SandboxesWithMetrics`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxesWithMetrics {
    /// Sandbox id → its latest sample; sandboxes without one are left out.
    pub sandboxes: std::collections::BTreeMap<String, SandboxMetric>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_e2b_263_sends_on_create() {
        // Captured body (spec §7.1) with lifecycle on_timeout=pause, auto_resume=True.
        let body = r#"{"templateID":"base","timeout":60,"metadata":{"k":"v"},"envVars":{"A":"1"},
            "autoPause":true,"autoResume":{"enabled":true},"allow_internet_access":false}"#;
        let r: NewSandbox = serde_json::from_str(body).unwrap();
        assert_eq!(r.template_id.as_deref(), Some("base"));
        assert_eq!(r.timeout, Some(60));
        assert_eq!(r.auto_pause, Some(true));
        assert!(r.auto_resume.unwrap().enabled());
        assert_eq!(r.allow_internet_access, Some(false));
        assert_eq!(r.env_vars.unwrap()["A"], "1");
    }

    #[test]
    fn legacy_create_and_lifecycle_block_parse() {
        let r: NewSandbox = serde_json::from_str(
            r#"{"templateID":"base","timeout":300,"secure":true,"lifecycle":{"onTimeout":"pause","autoResume":true},"autoResume":true}"#,
        )
        .unwrap();
        assert_eq!(r.secure, Some(true));
        let l = r.lifecycle.unwrap();
        assert_eq!(l.on_timeout, Some(OnTimeoutWire::Pause));
        assert_eq!(l.auto_resume, Some(true));
        assert_eq!(r.auto_resume, Some(AutoResume::Flag(true)));
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_rejected() {
        serde_json::from_str::<NewSandbox>(r#"{"templateId":"base"}"#).unwrap_err();
        serde_json::from_str::<NewSandbox>(r#"{"timeout":"60"}"#).unwrap_err();
        serde_json::from_str::<TimeoutRequest>(r#"{}"#).unwrap_err();
        serde_json::from_str::<ConnectRequest>(r#"{"timeout":1,"x":2}"#).unwrap_err();
        serde_json::from_str::<LifecycleRequest>(r#"{"onTimeout":"explode"}"#).unwrap_err();
    }

    #[test]
    fn sandbox_response_has_the_fields_the_sdk_reads() {
        let s = Sandbox {
            template_id: "base".into(),
            sandbox_id: "abc".into(),
            client_id: "coppice".into(),
            envd_version: "0.6.13".into(),
            envd_access_token: Some("tok".into()),
            traffic_access_token: None,
            domain: None,
            alias: Some("base".into()),
        };
        let v = serde_json::to_value(&s).unwrap();
        for key in [
            "templateID",
            "sandboxID",
            "clientID",
            "envdVersion",
            "envdAccessToken",
            "trafficAccessToken",
            "domain",
            "alias",
        ] {
            assert!(v.get(key).is_some(), "{key} missing in {v}");
        }
    }
}
