//! Query strings: percent-decoding and `GET /v2/sandboxes`'s parameters.
//!
//! The SDK percent-encodes `metadata` three times (spec §2.6): the captured
//! `metadata=user%3Dalice%26k%252520y%3Dv%2525261` means `{"user": "alice", "k y": "v&1"}`.
//! Decoding mirrors E2B: the query parameter is decoded once as usual, the whole value once
//! more, then split on `&` and `=` with each key and value decoded a last time.

use std::collections::BTreeMap;
use std::fmt;

/// A query parameter that could not be understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryError {
    /// The parameter.
    pub param: String,
    /// Why it was refused.
    pub reason: String,
}

impl fmt::Display for QueryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid query parameter {:?}: {}",
            self.param, self.reason
        )
    }
}

impl std::error::Error for QueryError {}

fn err(param: &str, reason: impl Into<String>) -> QueryError {
    QueryError {
        param: param.to_owned(),
        reason: reason.into(),
    }
}

/// Decodes `%XX` escapes (and `+` as space when `plus_is_space`); the result must be UTF-8.
pub fn percent_decode(s: &str, plus_is_space: bool) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Splits a raw query string into decoded `(name, value)` pairs, in order.
pub fn pairs(query: &str) -> Result<Vec<(String, String)>, QueryError> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let key = percent_decode(k, true).ok_or_else(|| err(k, "bad percent-encoding"))?;
            let value = percent_decode(v, true).ok_or_else(|| err(&key, "bad percent-encoding"))?;
            Ok((key, value))
        })
        .collect()
}

/// Decodes a `metadata` value (already query-decoded once) into its pairs.
pub fn decode_metadata(value: &str) -> Result<BTreeMap<String, String>, QueryError> {
    let whole =
        percent_decode(value, false).ok_or_else(|| err("metadata", "bad percent-encoding"))?;
    let mut out = BTreeMap::new();
    for pair in whole.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| err("metadata", format!("{pair:?} is not key=value")))?;
        let k = percent_decode(k, false).ok_or_else(|| err("metadata", "bad percent-encoding"))?;
        let v = percent_decode(v, false).ok_or_else(|| err("metadata", "bad percent-encoding"))?;
        out.insert(k, v);
    }
    Ok(out)
}

/// Sandbox states a list can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateFilter {
    /// `running`.
    Running,
    /// `paused`.
    Paused,
}

/// The parameters of `GET /v2/sandboxes` (and the legacy `GET /sandboxes`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    /// Every pair must match the sandbox's metadata.
    pub metadata: BTreeMap<String, String>,
    /// States to include; empty means running and paused.
    pub states: Vec<StateFilter>,
    /// Page size, 1..=100 (default 100).
    pub limit: u32,
    /// Opaque token from a previous page's `X-Next-Token`.
    pub next_token: Option<String>,
    /// Oldest first (`order=asc`); newest first by default.
    pub ascending: bool,
    /// Only sandboxes started after this time (ms since the epoch).
    pub started_after: Option<u64>,
    /// Only sandboxes of this template.
    pub template: Option<String>,
}

impl ListQuery {
    /// Largest page.
    pub const MAX_LIMIT: u32 = 100;

    /// Parses a raw query string.
    pub fn parse(query: &str) -> Result<Self, QueryError> {
        let mut q = ListQuery {
            metadata: BTreeMap::new(),
            states: Vec::new(),
            limit: Self::MAX_LIMIT,
            next_token: None,
            ascending: false,
            started_after: None,
            template: None,
        };
        for (key, value) in pairs(query)? {
            match key.as_str() {
                "metadata" => q.metadata.extend(decode_metadata(&value)?),
                "state" => {
                    for s in value.split(',').filter(|s| !s.is_empty()) {
                        q.states.push(match s {
                            "running" => StateFilter::Running,
                            "paused" => StateFilter::Paused,
                            other => {
                                return Err(err(
                                    "state",
                                    format!("{other:?} is not running or paused"),
                                ))
                            }
                        });
                    }
                }
                "limit" => {
                    q.limit = value
                        .parse()
                        .ok()
                        .filter(|l| (1..=Self::MAX_LIMIT).contains(l))
                        .ok_or_else(|| err("limit", format!("{value:?} is not in 1..=100")))?;
                }
                "nextToken" => q.next_token = Some(value),
                "order" => {
                    q.ascending = match value.as_str() {
                        "asc" => true,
                        "desc" => false,
                        other => return Err(err("order", format!("{other:?} is not asc or desc"))),
                    }
                }
                "startedAfter" => {
                    q.started_after = Some(
                        crate::timestamp::parse_millis(&value)
                            .ok_or_else(|| err("startedAfter", "not an RFC 3339 time"))?,
                    );
                }
                "template" => q.template = Some(value),
                other => return Err(err(other, "unknown parameter")),
            }
        }
        Ok(q)
    }

    /// Whether a sandbox with `state` is included.
    pub fn wants(&self, state: StateFilter) -> bool {
        self.states.is_empty() || self.states.contains(&state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_captured_triple_encoded_metadata() {
        let q = ListQuery::parse("metadata=user%3Dalice%26k%252520y%3Dv%2525261").unwrap();
        let want: BTreeMap<String, String> = [("user", "alice"), ("k y", "v&1")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        assert_eq!(q.metadata, want);
        assert!(q.wants(StateFilter::Running) && q.wants(StateFilter::Paused));
        assert_eq!(q.limit, 100);
    }

    #[test]
    fn parses_states_limit_order_and_token() {
        let q = ListQuery::parse("state=paused&limit=1&order=asc&nextToken=abc%3D").unwrap();
        assert_eq!(q.states, [StateFilter::Paused]);
        assert!(!q.wants(StateFilter::Running));
        assert_eq!(q.limit, 1);
        assert!(q.ascending);
        assert_eq!(q.next_token.as_deref(), Some("abc="));
    }

    #[test]
    fn refuses_what_it_cannot_understand() {
        for bad in [
            "limit=0",
            "limit=101",
            "limit=x",
            "state=dead",
            "order=up",
            "metadata=%ZZ",
            "metadata=novalue",
            "startedAfter=yesterday",
            "bogus=1",
        ] {
            ListQuery::parse(bad).unwrap_err();
        }
    }

    #[test]
    fn percent_decoding_edges() {
        assert_eq!(percent_decode("a+b%20c", true).as_deref(), Some("a b c"));
        assert_eq!(percent_decode("a+b", false).as_deref(), Some("a+b"));
        assert_eq!(percent_decode("%e2%9c%93", false).as_deref(), Some("✓"));
        assert_eq!(percent_decode("%", false), None);
        assert_eq!(percent_decode("%ff", false), None, "must be UTF-8");
    }
}
