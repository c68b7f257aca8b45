//! Snapshots and forks: `POST /sandboxes/{id}/snapshots`, `GET /snapshots` and
//! `POST /sandboxes/{id}/fork`.

use serde::{Deserialize, Serialize};

use crate::error::ErrorBody;
use crate::sandbox::Sandbox;

/// `POST /sandboxes/{id}/snapshots` (`SandboxSnapshotRequest`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// The snapshot template's name (`name`, `name:tag`, `namespace/name[:tag]`); a repeated
    /// name adds a build to the same template.
    #[serde(default)]
    pub name: Option<String>,
    /// `false` for a filesystem-only snapshot; E2B's default (absent) is a full one.
    #[serde(default)]
    pub memory: Option<bool>,
}

/// `SnapshotInfo`: the answer of a snapshot and each item of `GET /snapshots`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// `namespace/name:tag` for a named snapshot, `<template id>:<tag>` otherwise.
    #[serde(rename = "snapshotID")]
    pub snapshot_id: String,
    /// The template's full names (`namespace/name`), without the tag.
    pub names: Vec<String>,
}

/// `POST /sandboxes/{id}/fork` (`SandboxForkRequest`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForkRequest {
    /// The forks' window in seconds (15 when absent).
    #[serde(default)]
    pub timeout: Option<i64>,
    /// How many forks, 1 to 100 (1 when absent).
    #[serde(default)]
    pub count: Option<i64>,
}

/// `SandboxForkResult`: exactly one of `sandbox` and `error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkResult {
    /// The fork, when it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<Sandbox>,
    /// Why it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_refuse_unknown_fields() {
        let r: SnapshotRequest =
            serde_json::from_str(r#"{"name":"snap1","memory":false}"#).unwrap();
        assert_eq!(r.name.as_deref(), Some("snap1"));
        assert_eq!(r.memory, Some(false));
        serde_json::from_str::<SnapshotRequest>(r#"{"nmae":"x"}"#).unwrap_err();
        let f: ForkRequest = serde_json::from_str(r#"{"timeout":30,"count":2}"#).unwrap();
        assert_eq!((f.timeout, f.count), (Some(30), Some(2)));
        serde_json::from_str::<ForkRequest>(r#"{"count":"2"}"#).unwrap_err();
    }

    #[test]
    fn answers_have_e2b_names() {
        let info = SnapshotInfo {
            snapshot_id: "local/s:default".into(),
            names: vec!["local/s".into()],
        };
        assert_eq!(
            serde_json::to_value(&info).unwrap(),
            serde_json::json!({"snapshotID": "local/s:default", "names": ["local/s"]})
        );
        let failed = ForkResult {
            sandbox: None,
            error: Some(ErrorBody::new(500, "no")),
        };
        assert_eq!(
            serde_json::to_value(&failed).unwrap(),
            serde_json::json!({"error": {"code": 500, "message": "no"}})
        );
    }
}
