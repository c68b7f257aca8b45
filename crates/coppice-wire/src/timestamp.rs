//! RFC 3339 timestamps as E2B writes them (UTC, `Z`, millisecond precision).

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Formats milliseconds since the Unix epoch as `2026-01-01T00:00:00.000Z`.
pub fn format_millis(ms: u64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    let t = OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let t = t
        .replace_nanosecond(u32::from(t.millisecond()) * 1_000_000)
        .unwrap_or(t);
    t.format(&Rfc3339).unwrap_or_default()
}

/// Parses an RFC 3339 time (any offset) into milliseconds since the Unix epoch.
pub fn parse_millis(s: &str) -> Option<u64> {
    let t = OffsetDateTime::parse(s, &Rfc3339).ok()?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_milliseconds() {
        assert_eq!(format_millis(0), "1970-01-01T00:00:00Z");
        let ms = 1_795_000_000_123;
        let s = format_millis(ms);
        assert!(s.ends_with(".123Z"), "{s}");
        assert_eq!(parse_millis(&s), Some(ms));
        assert_eq!(
            parse_millis("2026-01-01T01:00:00+01:00"),
            parse_millis("2026-01-01T00:00:00Z")
        );
        assert_eq!(parse_millis("yesterday"), None);
    }
}
