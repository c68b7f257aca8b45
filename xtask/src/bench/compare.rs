//! `cargo xtask bench compare`: the regression guard a person runs before a release.
//!
//! It runs the parts afresh into `<target>/bench-compare/<date>/` (or takes `--fresh DIR`),
//! and compares every figure's median (`p50`, or `value`) with the same figure of the last
//! committed results — for each part, the newest `benchmarks/results/<date>/<part>.json` in
//! git's `HEAD` (or `--against DIR`). A median more than [`THRESHOLD`] worse, in the figure's
//! own direction, is flagged and makes the command fail. Floors (`kind: baseline`) are shown
//! but never flagged: when they moved too, the machine did.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use super::{load_dir, parts_and_args, run_parts, target_dir, today, PARTS};
use crate::project_root;

/// How much worse a median may get before it is flagged.
const THRESHOLD: f64 = 0.20;

pub(super) fn run(args: &[&str]) -> Result<(), String> {
    let mut fresh: Option<PathBuf> = None;
    let mut against: Option<PathBuf> = None;
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match *a {
            "--fresh" => fresh = Some(it.next().ok_or("--fresh needs a directory")?.into()),
            "--against" => against = Some(it.next().ok_or("--against needs a directory")?.into()),
            other => rest.push(other),
        }
    }
    let (parts, program_args) = if rest.first().is_some_and(|a| !a.starts_with("--")) {
        parts_and_args(&rest)?
    } else {
        (PARTS.iter().map(|(n, _)| *n).collect(), rest)
    };
    let keep = |reports: Vec<(String, serde_json::Value)>| -> Vec<(String, serde_json::Value)> {
        reports
            .into_iter()
            .filter(|(p, _)| parts.contains(&p.as_str()))
            .collect()
    };
    let (old, old_label) = match &against {
        Some(dir) => (keep(load_dir(dir)?), dir.display().to_string()),
        None => (keep(committed()?), "the last committed results".to_owned()),
    };
    if old.is_empty() {
        return Err(format!("nothing to compare with in {old_label}"));
    }
    let mut run_error = None;
    let new_dir = match fresh {
        Some(dir) => dir,
        None => {
            let dir = target_dir().join("bench-compare").join(today()?);
            // A part that failed is reported below as missing; the rest still compare.
            run_error = run_parts(&parts, &program_args, &dir).err();
            dir
        }
    };
    let new = keep(load_dir(&new_dir)?);
    let rows = compare(&old, &new);
    println!(
        "regression guard: {} against {old_label}; a median more than {:.0}% worse is flagged",
        new_dir.display(),
        THRESHOLD * 100.0
    );
    for (label, reports) in [("then", &old), ("now", &new)] {
        let loads: Vec<String> = reports
            .iter()
            .map(|(p, r)| {
                format!(
                    "{p} {}",
                    r["machine"]["loadavg_at_start"]
                        .as_str()
                        .and_then(|l| l.split_whitespace().next())
                        .unwrap_or("?")
                )
            })
            .collect();
        println!("  load average at start, {label}: {}", loads.join(", "));
    }
    for r in &rows {
        println!("  {}", r.line());
    }
    let worse: Vec<&str> = rows
        .iter()
        .filter(|r| r.verdict == Verdict::Worse)
        .map(|r| r.id.as_str())
        .collect();
    if let Some(e) = run_error {
        return Err(e);
    }
    if worse.is_empty() {
        println!("no median got more than {:.0}% worse", THRESHOLD * 100.0);
        Ok(())
    } else {
        Err(format!(
            "{} median(s) more than {:.0}% worse: {}",
            worse.len(),
            THRESHOLD * 100.0,
            worse.join(", ")
        ))
    }
}

/// For every part, its newest report committed under `benchmarks/results/<date>/` in `HEAD`.
fn committed() -> Result<Vec<(String, serde_json::Value)>, String> {
    let git = |args: &[&str]| -> Result<String, String> {
        let out = Command::new("git")
            .args(args)
            .current_dir(project_root())
            .output()
            .map_err(|e| format!("git: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "git {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let listing = git(&[
        "ls-tree",
        "-r",
        "--name-only",
        "HEAD",
        "--",
        "benchmarks/results",
    ])?;
    let mut newest: BTreeMap<String, String> = BTreeMap::new();
    for path in listing.lines() {
        let mut segs = path.rsplit('/');
        let (Some(file), Some(date)) = (segs.next(), segs.next()) else {
            continue;
        };
        let Some(part) = file.strip_suffix(".json") else {
            continue;
        };
        if !super::is_date(date) || !PARTS.iter().any(|(n, _)| *n == part) {
            continue;
        }
        let e = newest.entry(part.to_owned()).or_default();
        if date > e.as_str() {
            *e = date.to_owned();
        }
    }
    let mut out = Vec::new();
    for (part, _) in PARTS {
        if let Some(date) = newest.get(*part) {
            let text = git(&[
                "show",
                &format!("HEAD:benchmarks/results/{date}/{part}.json"),
            ])?;
            let v = serde_json::from_str(&text).map_err(|e| format!("{date}/{part}.json: {e}"))?;
            out.push(((*part).to_owned(), v));
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// More than the threshold worse.
    Worse,
    Better,
    Within,
    /// A floor of the same run: context, never flagged.
    Floor,
    /// Only in the fresh run.
    New,
    /// Only in the old run (the part failed or the figure was removed).
    Missing,
}

#[derive(Debug)]
struct Row {
    id: String,
    unit: String,
    old: Option<f64>,
    new: Option<f64>,
    verdict: Verdict,
}

impl Row {
    fn line(&self) -> String {
        let v = |x: Option<f64>| x.map_or("—".to_owned(), |x| format!("{x:.3} {}", self.unit));
        let change = match (self.old, self.new) {
            (Some(o), Some(n)) if o != 0.0 => format!("{:+.1}%", (n - o) / o.abs() * 100.0),
            _ => String::new(),
        };
        let verdict = match self.verdict {
            Verdict::Worse => "WORSE",
            Verdict::Better => "better",
            Verdict::Within => "ok",
            Verdict::Floor => "floor (the machine)",
            Verdict::New => "new",
            Verdict::Missing => "missing from the fresh run",
        };
        format!(
            "{:<40} {:>16} → {:<16} {:>8}  {verdict}",
            self.id,
            v(self.old),
            v(self.new),
            change
        )
    }
}

/// The median a figure is compared by.
fn median(f: &serde_json::Value) -> Option<f64> {
    f.get("p50")
        .or_else(|| f.get("value"))
        .and_then(serde_json::Value::as_f64)
}

fn figures(reports: &[(String, serde_json::Value)]) -> Vec<serde_json::Value> {
    reports
        .iter()
        .flat_map(|(_, r)| r["figures"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// Every figure of either side, in the fresh run's order (then the missing ones).
fn compare(old: &[(String, serde_json::Value)], new: &[(String, serde_json::Value)]) -> Vec<Row> {
    let old_figs = figures(old);
    let new_figs = figures(new);
    let find = |list: &[serde_json::Value], id: &str| -> Option<serde_json::Value> {
        list.iter().find(|f| f["id"] == id).cloned()
    };
    let mut rows = Vec::new();
    for f in &new_figs {
        let id = f["id"].as_str().unwrap_or("?").to_owned();
        let before = find(&old_figs, &id);
        let (o, n) = (before.as_ref().and_then(median), median(f));
        let verdict = match (o, n) {
            (None, _) | (_, None) => Verdict::New,
            _ if f["kind"] == "baseline" => Verdict::Floor,
            (Some(o), Some(n)) => judge(o, n, f["better"] == "higher"),
        };
        rows.push(Row {
            id,
            unit: f["unit"].as_str().unwrap_or("").to_owned(),
            old: o,
            new: n,
            verdict,
        });
    }
    for f in &old_figs {
        let id = f["id"].as_str().unwrap_or("?");
        if find(&new_figs, id).is_none() {
            rows.push(Row {
                id: id.to_owned(),
                unit: f["unit"].as_str().unwrap_or("").to_owned(),
                old: median(f),
                new: None,
                verdict: Verdict::Missing,
            });
        }
    }
    rows
}

/// Whether `new` is more than [`THRESHOLD`] worse than `old` (relative to `old`).
fn judge(old: f64, new: f64, higher_is_better: bool) -> Verdict {
    if old <= 0.0 {
        // A difference of medians (the proxy's overhead) can be near or below zero; a
        // relative change means nothing there.
        return Verdict::Within;
    }
    let worse_by = if higher_is_better {
        (old - new) / old
    } else {
        (new - old) / old
    };
    if worse_by > THRESHOLD {
        Verdict::Worse
    } else if worse_by < -THRESHOLD {
        Verdict::Better
    } else {
        Verdict::Within
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(figs: serde_json::Value) -> Vec<(String, serde_json::Value)> {
        vec![("create".to_owned(), serde_json::json!({ "figures": figs }))]
    }

    #[test]
    fn flags_only_medians_more_than_a_fifth_worse() {
        let old = report(serde_json::json!([
            {"id": "a", "unit": "ms", "better": "lower", "p50": 10.0},
            {"id": "b", "unit": "ms", "better": "lower", "p50": 10.0},
            {"id": "rps", "unit": "req/s", "better": "higher", "value": 100.0},
            {"id": "floor", "unit": "ms", "better": "lower", "kind": "baseline", "p50": 1.0},
            {"id": "gone", "unit": "ms", "better": "lower", "p50": 1.0},
        ]));
        let new = report(serde_json::json!([
            {"id": "a", "unit": "ms", "better": "lower", "p50": 12.1},
            {"id": "b", "unit": "ms", "better": "lower", "p50": 11.9},
            {"id": "rps", "unit": "req/s", "better": "higher", "value": 79.0},
            {"id": "floor", "unit": "ms", "better": "lower", "kind": "baseline", "p50": 3.0},
            {"id": "fresh", "unit": "ms", "better": "lower", "p50": 1.0},
        ]));
        let rows = compare(&old, &new);
        let verdict = |id: &str| rows.iter().find(|r| r.id == id).unwrap().verdict;
        assert_eq!(verdict("a"), Verdict::Worse);
        assert_eq!(verdict("b"), Verdict::Within);
        assert_eq!(verdict("rps"), Verdict::Worse);
        assert_eq!(verdict("floor"), Verdict::Floor);
        assert_eq!(verdict("fresh"), Verdict::New);
        assert_eq!(verdict("gone"), Verdict::Missing);
    }

    #[test]
    fn judges_in_each_figures_direction() {
        assert_eq!(judge(100.0, 70.0, false), Verdict::Better);
        assert_eq!(judge(100.0, 130.0, true), Verdict::Better);
        assert_eq!(judge(100.0, 119.0, false), Verdict::Within);
        assert_eq!(judge(-5.0, 50.0, false), Verdict::Within);
    }
}
