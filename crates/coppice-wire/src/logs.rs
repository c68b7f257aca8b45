//! `GET /sandboxes/{id}/logs` (legacy) and `GET /v2/sandboxes/{id}/logs`: E2B's log shapes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A log level as E2B names it (`LogLevel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// `debug`.
    Debug,
    /// `info`.
    Info,
    /// `warn`.
    Warn,
    /// `error`.
    Error,
}

impl LogLevel {
    /// The level called `name` (`debug`, `info`, `warn`, `error`), if it is one.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "debug" => Some(LogLevel::Debug),
            "info" => Some(LogLevel::Info),
            "warn" => Some(LogLevel::Warn),
            "error" => Some(LogLevel::Error),
            _ => None,
        }
    }
}

/// The order logs come in (`LogsDirection`): oldest first or newest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogsDirection {
    /// Oldest first, from the cursor on.
    Forward,
    /// Newest first, back from the cursor (E2B's default for v2).
    Backward,
}

impl LogsDirection {
    /// The direction called `name`, if it is one.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "forward" => Some(LogsDirection::Forward),
            "backward" => Some(LogsDirection::Backward),
            _ => None,
        }
    }
}

/// One raw line (`SandboxLog`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxLog {
    /// RFC 3339.
    pub timestamp: String,
    /// The line as logged.
    pub line: String,
}

/// One structured entry (`SandboxLogEntry`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxLogEntry {
    /// RFC 3339.
    pub timestamp: String,
    /// The level.
    pub level: LogLevel,
    /// The message.
    pub message: String,
    /// Every other key of the line, as strings.
    pub fields: BTreeMap<String, String>,
}

/// The legacy route's body (`SandboxLogs`): the same entries raw and structured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxLogs {
    /// Raw lines.
    pub logs: Vec<SandboxLog>,
    /// Structured entries.
    pub log_entries: Vec<SandboxLogEntry>,
}

/// The v2 route's body (`SandboxLogsV2Response`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxLogsV2 {
    /// Structured entries.
    pub logs: Vec<SandboxLogEntry>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_follow_the_spec() {
        let entry = SandboxLogEntry {
            timestamp: "2026-01-01T00:00:00.123Z".into(),
            level: LogLevel::Warn,
            message: "m".into(),
            fields: BTreeMap::from([("pid".into(), "7".into())]),
        };
        let legacy = SandboxLogs {
            logs: vec![SandboxLog {
                timestamp: entry.timestamp.clone(),
                line: "{}".into(),
            }],
            log_entries: vec![entry.clone()],
        };
        assert_eq!(
            serde_json::to_value(&legacy).unwrap(),
            serde_json::json!({
                "logs": [{"timestamp": "2026-01-01T00:00:00.123Z", "line": "{}"}],
                "logEntries": [{"timestamp": "2026-01-01T00:00:00.123Z", "level": "warn",
                                "message": "m", "fields": {"pid": "7"}}]
            })
        );
        let v2 = serde_json::to_value(SandboxLogsV2 { logs: vec![entry] }).unwrap();
        assert_eq!(v2["logs"][0]["level"], "warn");
        assert!(LogLevel::Debug < LogLevel::Error);
        assert_eq!(LogLevel::from_name("info"), Some(LogLevel::Info));
        assert_eq!(LogLevel::from_name("INFO"), None);
        assert_eq!(
            LogsDirection::from_name("backward"),
            Some(LogsDirection::Backward)
        );
        assert_eq!(LogsDirection::from_name("up"), None);
    }
}
