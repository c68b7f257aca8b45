//! Tables for people, JSON for programs.

use std::io::{self, Write};

use serde_json::Value;

/// Writes `rows` under `headers` as left-aligned columns two spaces apart; a table with no
/// rows says so in one line instead.
pub(crate) fn table(
    out: &mut dyn Write,
    headers: &[&str],
    rows: &[Vec<String>],
    none: &str,
) -> io::Result<()> {
    if rows.is_empty() {
        return writeln!(out, "{none}");
    }
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |out: &mut dyn Write, cells: &mut dyn Iterator<Item = &str>| -> io::Result<()> {
        let mut text = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            text.push_str(cell);
            let pad = w.saturating_sub(cell.chars().count());
            text.extend(std::iter::repeat_n(' ', pad));
        }
        writeln!(out, "{}", text.trim_end())
    };
    line(out, &mut headers.iter().copied())?;
    for row in rows {
        line(out, &mut row.iter().map(String::as_str))?;
    }
    Ok(())
}

/// `v` as pretty JSON.
pub(crate) fn json(out: &mut dyn Write, v: &Value) -> io::Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(io::Error::other)?;
    writeln!(out, "{text}")
}

/// The field `key` of `v` as table text: strings bare, `-` for missing or null, other JSON
/// as JSON.
pub(crate) fn cell(v: &Value, key: &str) -> String {
    match v.get(key) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// A byte count for people: `512 B`, `1.5 KiB`, `20.0 MiB`.
pub(crate) fn bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_say_when_empty() {
        let mut out = Vec::new();
        table(
            &mut out,
            &["ID", "STATE"],
            &[
                vec!["a".into(), "running".into()],
                vec!["longer-id".into(), "-".into()],
            ],
            "no sandboxes",
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "ID         STATE\na          running\nlonger-id  -\n"
        );
        let mut out = Vec::new();
        table(&mut out, &["ID"], &[], "no sandboxes").unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "no sandboxes\n");
    }

    #[test]
    fn cells_and_sizes_read_well() {
        let v = serde_json::json!({"s": "x", "n": 3, "z": null});
        assert_eq!(cell(&v, "s"), "x");
        assert_eq!(cell(&v, "n"), "3");
        assert_eq!(cell(&v, "z"), "-");
        assert_eq!(cell(&v, "missing"), "-");
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(1536.0), "1.5 KiB");
        assert_eq!(bytes(20.0 * 1024.0 * 1024.0), "20.0 MiB");
    }
}
