//! The agent's log: one flat JSON object per line on stderr, which the jail sends to the
//! sandbox's log file and the gateway serves as E2B's sandbox logs.
//!
//! A line looks like
//! `{"timestamp":"2026-01-01T00:00:00.123Z","level":"info","logger":"coppice_envd::process",
//! "message":"Process with pid 7 started","event_type":"process_start","pid":7,"command":"ls -l"}`:
//! `timestamp` (UTC, milliseconds), `level` (`debug`, `info`, `warn` or `error`), `logger`
//! (the module that logged), `message`, then the event's own fields, which are strings,
//! numbers or booleans. Like E2B's own log lines it is flat, so a reader can treat every key
//! but `level` and `message` as a field. String values are cut at [`MAX_VALUE`] bytes so no
//! line can grow without bound. [`JsonLines`] writes the format; [`parse`] reads it back.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Longest string value a line carries, in bytes; longer ones end in `…`.
pub const MAX_VALUE: usize = 1024;

/// A log level, ordered from least to most severe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// `debug` (tracing's `trace` is written as `debug` too).
    Debug,
    /// `info`.
    Info,
    /// `warn`.
    Warn,
    /// `error`.
    Error,
}

impl Level {
    /// The level's name as lines carry it.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }

    /// The level called `name`, if it is one.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "debug" => Some(Level::Debug),
            "info" => Some(Level::Info),
            "warn" => Some(Level::Warn),
            "error" => Some(Level::Error),
            _ => None,
        }
    }

    fn of(level: &tracing::Level) -> Self {
        match *level {
            tracing::Level::ERROR => Level::Error,
            tracing::Level::WARN => Level::Warn,
            tracing::Level::INFO => Level::Info,
            _ => Level::Debug,
        }
    }
}

/// The tracing-subscriber event format that writes the agent's log lines.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut fields = Fields(Map::new());
        event.record(&mut fields);
        let mut line = fields.0;
        let message = line
            .remove("message")
            .unwrap_or(Value::String(String::new()));
        // The fixed keys win over event fields of the same name.
        line.insert(
            "timestamp".into(),
            Value::String(format_millis(now_millis())),
        );
        line.insert(
            "level".into(),
            Value::String(Level::of(meta.level()).as_str().into()),
        );
        line.insert("logger".into(), Value::String(meta.target().into()));
        line.insert("message".into(), message);
        writeln!(writer, "{}", Value::Object(line))
    }
}

/// Collects an event's fields as JSON values.
struct Fields(Map<String, Value>);

impl Fields {
    fn put(&mut self, field: &Field, value: Value) {
        self.0.insert(field.name().to_owned(), value);
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(cut(value)));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::Bool(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, Value::from(value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, Value::String(cut(&format!("{value:?}"))));
    }
}

/// `s`, cut to at most [`MAX_VALUE`] bytes on a character boundary.
fn cut(s: &str) -> String {
    if s.len() <= MAX_VALUE {
        return s.to_owned();
    }
    let mut end = MAX_VALUE - '…'.len_utf8();
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// One line of the log, read back.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// When it was logged, in milliseconds since the Unix epoch; `None` for a line without
    /// a readable `timestamp` (output that did not come through [`JsonLines`]).
    pub timestamp: Option<u64>,
    /// Its level; lines that are not JSON (a panic, a start-up error) are [`Level::Error`],
    /// JSON lines without a known level [`Level::Info`] (E2B's default).
    pub level: Level,
    /// The message; for a line that is not JSON, the whole line.
    pub message: String,
    /// Every other key, with numbers and booleans written as strings, as E2B's reader does.
    /// Values that are arrays, objects or null are left out.
    pub fields: std::collections::BTreeMap<String, String>,
}

/// Reads one line of the log (without its newline).
pub fn parse(line: &str) -> Entry {
    let Ok(Value::Object(map)) = serde_json::from_str::<Value>(line) else {
        return Entry {
            timestamp: None,
            level: Level::Error,
            message: line.to_owned(),
            fields: Default::default(),
        };
    };
    let mut entry = Entry {
        timestamp: None,
        level: Level::Info,
        message: String::new(),
        fields: Default::default(),
    };
    for (key, value) in map {
        let text = match value {
            Value::String(s) => s,
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Null | Value::Array(_) | Value::Object(_) => continue,
        };
        match key.as_str() {
            "message" => entry.message = text,
            "level" => entry.level = Level::from_name(&text).unwrap_or(Level::Info),
            "timestamp" => {
                entry.timestamp = parse_millis(&text);
                entry.fields.insert(key, text);
            }
            _ => {
                entry.fields.insert(key, text);
            }
        }
    }
    entry
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of day `z` since 1970-01-01 (the inverse of [`days_from_civil`]); also the code
/// interpreter's timestamps.
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    // d is in 1..=31 and m in 1..=12 by construction.
    (
        y,
        u32::try_from(m).unwrap_or(1),
        u32::try_from(d).unwrap_or(1),
    )
}

/// `2026-01-01T00:00:00.123Z` for milliseconds since the Unix epoch.
pub fn format_millis(ms: u64) -> String {
    let secs = i64::try_from(ms / 1000).unwrap_or(i64::MAX);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60,
        ms % 1000
    )
}

/// Reads a time [`format_millis`] wrote (and the same without milliseconds); `None` for
/// anything else.
pub fn parse_millis(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let part = s.get(r)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    if b[16] != b':' || *b.last()? != b'Z' {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let millis = match &s[19..s.len() - 1] {
        "" => 0,
        frac => {
            let digits = frac.strip_prefix('.')?;
            if digits.is_empty() || digits.len() > 9 || !digits.bytes().all(|c| c.is_ascii_digit())
            {
                return None;
            }
            // Milliseconds: the first three digits, padded.
            let mut padded = digits.to_owned();
            padded.push_str("00");
            padded[..3].parse::<u64>().ok()?
        }
    };
    let days = days_from_civil(i64::from(y), mo, d);
    let secs = days * 86_400 + i64::from(h) * 3600 + i64::from(mi) * 60 + i64::from(sec);
    u64::try_from(secs)
        .ok()?
        .checked_mul(1000)?
        .checked_add(millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_across_the_calendar() {
        assert_eq!(format_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_millis(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(format_millis(1_767_225_599_999), "2025-12-31T23:59:59.999Z");
        assert_eq!(format_millis(4_107_542_400_123), "2100-03-01T00:00:00.123Z");
        for ms in [0, 1, 999, 86_399_999, 951_868_799_000, 1_795_000_000_123] {
            assert_eq!(parse_millis(&format_millis(ms)), Some(ms), "{ms}");
        }
        assert_eq!(
            parse_millis("2026-01-01T00:00:00Z"),
            Some(1_767_225_600_000)
        );
        assert_eq!(
            parse_millis("2026-01-01T00:00:00.5Z"),
            Some(1_767_225_600_500)
        );
        for bad in [
            "",
            "yesterday",
            "2026-01-01T00:00:00+01:00",
            "2026-13-01T00:00:00Z",
            "2026-01-01T00:00:00.Z",
            "2026-01-01 00:00:00Z",
            "20x6-01-01T00:00:00Z",
        ] {
            assert_eq!(parse_millis(bad), None, "{bad}");
        }
    }

    #[test]
    fn lines_are_read_as_e2b_reads_its_own() {
        let e = parse(
            r#"{"timestamp":"2026-01-01T00:00:00.123Z","level":"warn","logger":"x","message":"m","pid":7,"ok":true,"list":[1],"none":null}"#,
        );
        assert_eq!(e.timestamp, Some(1_767_225_600_123));
        assert_eq!(e.level, Level::Warn);
        assert_eq!(e.message, "m");
        let keys: Vec<&str> = e.fields.keys().map(String::as_str).collect();
        assert_eq!(keys, ["logger", "ok", "pid", "timestamp"]);
        assert_eq!(e.fields["pid"], "7");
        assert_eq!(e.fields["ok"], "true");
        // JSON without a level is info; anything that is not a JSON object is an error line.
        assert_eq!(parse(r#"{"message":"m"}"#).level, Level::Info);
        let raw = parse("thread 'main' panicked at src/agent.rs:1");
        assert_eq!(raw.level, Level::Error);
        assert_eq!(raw.message, "thread 'main' panicked at src/agent.rs:1");
        assert_eq!(raw.timestamp, None);
        assert_eq!(parse("[1,2]").level, Level::Error);
    }

    #[test]
    fn levels_are_ordered_and_named() {
        assert!(Level::Debug < Level::Info && Level::Info < Level::Warn);
        assert!(Level::Warn < Level::Error);
        for l in [Level::Debug, Level::Info, Level::Warn, Level::Error] {
            assert_eq!(Level::from_name(l.as_str()), Some(l));
        }
        assert_eq!(Level::from_name("trace"), None);
    }

    #[test]
    fn long_values_are_cut_on_a_character_boundary() {
        assert_eq!(cut("short"), "short");
        let long = "é".repeat(MAX_VALUE);
        let c = cut(&long);
        assert!(c.len() <= MAX_VALUE, "{}", c.len());
        assert!(c.ends_with('…'));
    }

    #[test]
    fn the_formatter_writes_what_parse_reads() {
        use std::io::Write;
        use std::sync::{Arc, Mutex};

        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .event_format(JsonLines)
            .with_writer(move || writer.clone())
            .finish();
        let before = now_millis();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(
                pid = 7u32,
                command = "ls -l",
                ok = true,
                "Process with pid 7 started"
            );
            tracing::warn!(level = "spoofed", "careful");
        });
        let after = now_millis();
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        let e = parse(lines[0]);
        assert_eq!(e.level, Level::Info);
        assert_eq!(e.message, "Process with pid 7 started");
        assert_eq!(e.fields["pid"], "7");
        assert_eq!(e.fields["command"], "ls -l");
        assert_eq!(e.fields["ok"], "true");
        assert_eq!(e.fields["logger"], module_path!());
        let ts = e.timestamp.unwrap();
        assert!(before <= ts && ts <= after, "{before} {ts} {after}");
        // An event field cannot override the line's own level.
        assert_eq!(parse(lines[1]).level, Level::Warn);
    }
}
