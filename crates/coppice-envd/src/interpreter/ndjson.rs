//! The `/execute` wire format: one JSON object per `\n`-terminated line, never a blank one.
//!
//! Every line the client sees is built here, so the shapes E2B's SDK parses live in one place.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::{json, Map, Value};

/// `{"type":"number_of_executions","execution_count":n}`.
pub(super) fn number_of_executions(count: u64) -> Bytes {
    line(&json!({ "type": "number_of_executions", "execution_count": count }))
}

/// A `stdout` or `stderr` line stamped with the current time.
pub(super) fn stream(kind: StreamKind, text: &str) -> Bytes {
    let name = match kind {
        StreamKind::Stdout => "stdout",
        StreamKind::Stderr => "stderr",
    };
    line(&json!({ "type": name, "text": text, "timestamp": timestamp(SystemTime::now()) }))
}

/// An `error` line.
pub(super) fn error(name: &str, value: &str, traceback: &str) -> Bytes {
    line(&json!({ "type": "error", "name": name, "value": value, "traceback": traceback }))
}

/// `{"type":"keepalive"}`, sent after a stretch of silence.
pub(super) fn keepalive() -> Bytes {
    Bytes::from_static(b"{\"type\":\"keepalive\"}\n")
}

/// `{"type":"end_of_execution"}`, always the last line.
pub(super) fn end_of_execution() -> Bytes {
    Bytes::from_static(b"{\"type\":\"end_of_execution\"}\n")
}

/// A `result` line from a MIME bundle, mapped the way E2B's server maps Jupyter's.
///
/// Known MIME types get their own field, `e2b/data` and `e2b/chart` become `data` and
/// `chart`, everything else lands in `extra` (always present, as E2B sends it).
/// `text/plain` loses one pair of surrounding quotes, so `'abc'` reads `abc`.
pub(super) fn result(mut bundle: Map<String, Value>, is_main_result: bool) -> Bytes {
    let mut out = Map::new();
    out.insert("type".into(), Value::from("result"));
    if let Some(Value::String(text)) = bundle.remove("text/plain") {
        out.insert("text".into(), Value::from(strip_quotes(&text)));
    }
    for (mime, field) in [
        ("text/html", "html"),
        ("text/markdown", "markdown"),
        ("image/svg+xml", "svg"),
        ("image/png", "png"),
        ("image/jpeg", "jpeg"),
        ("application/pdf", "pdf"),
        ("text/latex", "latex"),
        ("application/json", "json"),
        ("application/javascript", "javascript"),
        ("e2b/data", "data"),
        ("e2b/chart", "chart"),
    ] {
        if let Some(v) = bundle.remove(mime) {
            if !v.is_null() {
                out.insert(field.into(), v);
            }
        }
    }
    out.insert("extra".into(), Value::Object(bundle));
    out.insert("is_main_result".into(), Value::from(is_main_result));
    line(&Value::Object(out))
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StreamKind {
    /// The context's fd 1.
    Stdout,
    /// The context's fd 2.
    Stderr,
}

fn line(value: &Value) -> Bytes {
    // serde_json escapes control characters, so the text holds no raw newline.
    let mut text = value.to_string();
    text.push('\n');
    Bytes::from(text)
}

/// E2B's rule: one pair of matching surrounding quotes is removed (Python `text[1:-1]`).
fn strip_quotes(text: &str) -> &str {
    let quoted = (text.starts_with('\'') && text.ends_with('\''))
        || (text.starts_with('"') && text.ends_with('"'));
    if !quoted {
        return text;
    }
    // The quotes are one byte each, so these are char boundaries.
    text.get(1..text.len().saturating_sub(1)).unwrap_or("")
}

/// ISO-8601 in UTC with microseconds and `+00:00`, the shape Jupyter's header dates have.
pub(super) fn timestamp(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (y, m, d) = crate::journal::civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}+00:00",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        since.subsec_micros()
    )
}

/// Turns a byte stream into text without splitting a UTF-8 sequence across two lines.
///
/// Invalid bytes (a program writing Latin-1, say) become U+FFFD rather than stopping the
/// stream.
#[derive(Debug, Default)]
pub(super) struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Appends `bytes` and returns all text that is complete so far.
    pub(super) fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let keep = incomplete_tail(&self.pending);
        let cut = self.pending.len() - keep;
        let text = String::from_utf8_lossy(&self.pending[..cut]).into_owned();
        self.pending.drain(..cut);
        text
    }

    /// Whatever is left, decoded lossily.
    pub(super) fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

/// How many trailing bytes start a UTF-8 sequence that is not complete yet.
fn incomplete_tail(bytes: &[u8]) -> usize {
    // A sequence is at most 4 bytes, so only the last 3 can be an unfinished one.
    for back in 1..=bytes.len().min(3) {
        let b = bytes[bytes.len() - back];
        if b & 0xC0 == 0x80 {
            continue;
        }
        let need = match b {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => return 0,
        };
        return if need > back { back } else { 0 };
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_iso_utc_with_micros() {
        let at = UNIX_EPOCH + std::time::Duration::from_micros(1_767_225_600_000_001);
        assert_eq!(timestamp(at), "2026-01-01T00:00:00.000001+00:00");
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000000+00:00");
        let leap = UNIX_EPOCH + std::time::Duration::from_secs(951_782_400 + 3_723);
        assert_eq!(timestamp(leap), "2000-02-29T01:02:03.000000+00:00");
    }

    #[test]
    fn utf8_sequences_are_never_split() {
        let mut s = Utf8Stream::default();
        let snow = "☃".as_bytes();
        assert_eq!(s.push(&[b'a', snow[0]]), "a");
        assert_eq!(s.push(&snow[1..2]), "");
        assert_eq!(s.push(&snow[2..]), "☃");
        assert_eq!(s.push(&[0xFF, b'b']), "\u{FFFD}b");
        assert_eq!(s.push(&[0xF0, 0x9F]), "");
        assert_eq!(s.finish(), "\u{FFFD}");
    }

    #[test]
    fn results_map_mime_types_like_e2b() {
        let bundle = json!({
            "text/plain": "'hi'",
            "text/html": "<b>hi</b>",
            "image/png": "aGk=",
            "application/x-thing": "x"
        });
        let Value::Object(bundle) = bundle else {
            unreachable!()
        };
        let line = result(bundle, true);
        assert!(line.ends_with(b"\n"));
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["type"], "result");
        assert_eq!(v["text"], "hi");
        assert_eq!(v["html"], "<b>hi</b>");
        assert_eq!(v["png"], "aGk=");
        assert_eq!(v["extra"], json!({ "application/x-thing": "x" }));
        assert_eq!(v["is_main_result"], true);
        assert_eq!(strip_quotes("'"), "");
        assert_eq!(strip_quotes("\"a\""), "a");
        assert_eq!(strip_quotes("'a\""), "'a\"");
    }

    #[test]
    fn lines_have_no_inner_newlines() {
        let l = stream(StreamKind::Stdout, "a\nb\n");
        assert_eq!(l.iter().filter(|&&b| b == b'\n').count(), 1);
        let l = error("E", "v\n", "tb\nline");
        assert_eq!(l.iter().filter(|&&b| b == b'\n').count(), 1);
    }
}
