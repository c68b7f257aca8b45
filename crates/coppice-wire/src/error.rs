//! E2B's error body.

use serde::{Deserialize, Serialize};

/// `{"code": <HTTP status>, "message": "...", "error_code"?: "..."}`: the body of every
/// control-plane error the SDK parses (`handle_api_exception` reads `message`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The HTTP status, repeated.
    pub code: u16,
    /// What went wrong, for people.
    pub message: String,
    /// A machine-readable code where E2B defines one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
}

impl ErrorBody {
    /// An error body for `status` with `message`.
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            code: status,
            message: message.into(),
            error_code: None,
        }
    }
}

/// The data-plane answer for a sandbox that does not exist (any more): the SDK string-matches
/// "was not found" in it and raises `SandboxNotRunningException`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxNotFound {
    /// The id the request named.
    #[serde(rename = "sandboxId")]
    pub sandbox_id: String,
    /// Always "The sandbox was not found".
    pub message: String,
    /// Always 502.
    pub code: u16,
}

impl SandboxNotFound {
    /// The 502 body for `sandbox_id`.
    pub fn new(sandbox_id: impl Into<String>) -> Self {
        Self {
            sandbox_id: sandbox_id.into(),
            message: "The sandbox was not found".into(),
            code: 502,
        }
    }
}

/// The data-plane answer for a live sandbox where nothing listens on the requested port: the
/// SDK string-matches "port is not open" in it and raises `SandboxUnreachableException`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortClosed {
    /// The id the request named.
    #[serde(rename = "sandboxId")]
    pub sandbox_id: String,
    /// Always "The sandbox is running but port is not open".
    pub message: String,
    /// The port the request named.
    pub port: u16,
    /// Always 502.
    pub code: u16,
}

impl PortClosed {
    /// The 502 body for `port` of `sandbox_id`.
    pub fn new(sandbox_id: impl Into<String>, port: u16) -> Self {
        Self {
            sandbox_id: sandbox_id.into(),
            message: "The sandbox is running but port is not open".into(),
            port,
            code: 502,
        }
    }
}

/// The data-plane answer for a request to a sandbox secured with a traffic access token
/// (`network.allowPublicTraffic: false`) that did not carry it, or carried another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficTokenRejected {
    /// The id the request named.
    #[serde(rename = "sandboxId")]
    pub sandbox_id: String,
    /// Says whether the header was missing or wrong, and names it.
    pub message: String,
    /// Always 403.
    pub code: u16,
}

impl TrafficTokenRejected {
    /// The 403 body for a request without the `header`.
    pub fn missing(sandbox_id: impl Into<String>, header: &str) -> Self {
        Self {
            sandbox_id: sandbox_id.into(),
            message: format!(
                "Sandbox is secured with traffic access token. Token header '{header}' is missing"
            ),
            code: 403,
        }
    }

    /// The 403 body for a request whose `header` holds another token.
    pub fn invalid(sandbox_id: impl Into<String>, header: &str) -> Self {
        Self {
            sandbox_id: sandbox_id.into(),
            message: format!(
                "Sandbox is secured with traffic access token. Provided token in header '{header}' is invalid"
            ),
            code: 403,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_has_e2b_field_names() {
        let v = serde_json::to_value(ErrorBody::new(404, "sandbox abc not found")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"code": 404, "message": "sandbox abc not found"})
        );
    }

    #[test]
    fn sandbox_not_found_is_byte_exact() {
        let s = serde_json::to_string(&SandboxNotFound::new("abc")).unwrap();
        assert_eq!(
            s,
            r#"{"sandboxId":"abc","message":"The sandbox was not found","code":502}"#
        );
    }

    #[test]
    fn port_closed_and_token_bodies_are_e2b_s() {
        let s = serde_json::to_string(&PortClosed::new("abc", 8000)).unwrap();
        assert_eq!(
            s,
            r#"{"sandboxId":"abc","message":"The sandbox is running but port is not open","port":8000,"code":502}"#
        );
        let v = serde_json::to_value(TrafficTokenRejected::missing(
            "abc",
            "e2b-traffic-access-token",
        ))
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "sandboxId": "abc",
                "message": "Sandbox is secured with traffic access token. Token header 'e2b-traffic-access-token' is missing",
                "code": 403,
            })
        );
        let v = TrafficTokenRejected::invalid("abc", "e2b-traffic-access-token");
        assert!(v.message.ends_with("'e2b-traffic-access-token' is invalid"));
    }
}
