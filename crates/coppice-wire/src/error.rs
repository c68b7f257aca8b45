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
}
