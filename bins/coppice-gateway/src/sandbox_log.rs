//! Each sandbox's log, as `GET /sandboxes/{id}/logs` and `GET /v2/sandboxes/{id}/logs` serve
//! it: the agent's stderr, which the jail appends to one file per sandbox and the agent writes
//! as `coppice_envd::journal` lines (one JSON object per line).
//!
//! The file is bounded: once it passes [`MAX_FILE_BYTES`] the gateway moves its content to a
//! `.1` file beside it (replacing the previous one) and empties it, so a sandbox keeps at most
//! about twice that. The agent holds the file open for appending, so this is a copy and a
//! truncate (logrotate's `copytruncate`): a line the agent writes between the two is lost.
//! The files outlive the sandbox: a killed sandbox's log stays readable until it is
//! [`RETENTION`] old (E2B keeps sandbox logs for 7 days), then [`prune`] removes it.

use std::fs;
use std::io::{self, Read as _, Seek as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use coppice_envd::journal::{self, Entry, Level};

/// Size at which a sandbox's log is rotated.
pub(crate) const MAX_FILE_BYTES: u64 = 4 << 20;
/// How long a killed sandbox's log is kept, and how far back a query may look.
pub(crate) const RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// One line of a sandbox's log.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Line {
    /// When it was logged (ms since the epoch). A line without its own time (not written
    /// by the agent's logger) takes the time of the line before it.
    pub(crate) at: u64,
    /// The line as written.
    pub(crate) raw: String,
    /// The line read as a log entry.
    pub(crate) entry: Entry,
}

/// The older generation of the log at `path`.
pub(crate) fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

fn mtime_ms(meta: &fs::Metadata) -> u64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Every line of the log at `path`, oldest first (the rotated generation, then the current
/// file). `None` when there is no log at all.
pub(crate) fn read(path: &Path) -> io::Result<Option<Vec<Line>>> {
    let mut text = String::new();
    let mut newest_mtime = None;
    for p in [rotated(path), path.to_path_buf()] {
        match fs::read(&p) {
            Ok(bytes) => {
                newest_mtime = fs::metadata(&p).ok().map(|m| mtime_ms(&m));
                text.push_str(&String::from_utf8_lossy(&bytes));
                if !text.is_empty() && !text.ends_with('\n') {
                    text.push('\n');
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    let Some(mtime) = newest_mtime else {
        return Ok(None);
    };
    let mut lines: Vec<Line> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|raw| {
            let entry = journal::parse(raw);
            Line {
                at: entry.timestamp.unwrap_or(0),
                raw: raw.to_owned(),
                entry,
            }
        })
        .collect();
    // Lines without a time take the one before them; leading ones the first time there is,
    // and in a log without any, the file's modification time.
    let first = lines
        .iter()
        .find_map(|l| l.entry.timestamp)
        .unwrap_or(mtime);
    let mut last = first;
    for l in &mut lines {
        match l.entry.timestamp {
            Some(t) => last = t,
            None => l.at = last,
        }
    }
    Ok(Some(lines))
}

/// Which lines a query wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Query {
    /// Earliest time, included (ms).
    pub(crate) start: u64,
    /// Latest time, excluded (ms).
    pub(crate) end: u64,
    /// At most this many lines.
    pub(crate) limit: usize,
    /// Newest first (and the limit keeps the newest).
    pub(crate) newest_first: bool,
    /// Lines below this level are left out.
    pub(crate) min_level: Option<Level>,
    /// Only lines whose message contains this (case-sensitive).
    pub(crate) search: Option<String>,
}

/// The lines of `lines` (oldest first) that `q` asks for, in its order.
pub(crate) fn select<'a>(lines: &'a [Line], q: &Query) -> Vec<&'a Line> {
    let wanted = |l: &&Line| {
        (q.start..q.end).contains(&l.at)
            && q.min_level.is_none_or(|m| l.entry.level >= m)
            && q.search
                .as_deref()
                .is_none_or(|s| l.entry.message.contains(s))
    };
    // Stable by time: lines logged in the same millisecond keep the file's order.
    let mut picked: Vec<&Line> = lines.iter().filter(wanted).collect();
    picked.sort_by_key(|l| l.at);
    if q.newest_first {
        picked.reverse();
    }
    picked.truncate(q.limit);
    picked
}

/// Rotates the log at `path` if it is larger than `max` bytes; says whether it did.
pub(crate) fn rotate_if_large(path: &Path, max: u64) -> io::Result<bool> {
    let mut file = match fs::OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if file.metadata()?.len() <= max {
        return Ok(false);
    }
    let mut content = Vec::new();
    file.read_to_end(&mut content)?;
    // Emptied right after reading, to keep the window in which a line can be lost small;
    // the agent appends, so its next line starts the file again.
    file.set_len(0)?;
    file.rewind()?;
    // Only whole lines move; the partial tail of a line being written is dropped.
    if let Some(end) = content.iter().rposition(|b| *b == b'\n') {
        content.truncate(end + 1);
    }
    let old = rotated(path);
    let mut tmp = old.as_os_str().to_owned();
    tmp.push(".tmp");
    fs::write(&tmp, &content)?;
    fs::rename(&tmp, &old)?;
    Ok(true)
}

/// Removes from `dir` the logs of sandboxes for which `keep` is false that have not been
/// written for `retention`; returns how many files went.
pub(crate) fn prune(
    dir: &Path,
    keep: impl Fn(&str) -> bool,
    now: SystemTime,
    retention: Duration,
) -> io::Result<usize> {
    let mut removed = 0;
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(id) = name
            .strip_suffix(".log")
            .or_else(|| name.strip_suffix(".log.1"))
            .or_else(|| name.strip_suffix(".log.1.tmp"))
        else {
            continue;
        };
        if keep(id) {
            continue;
        }
        let Ok(modified) = entry.metadata().and_then(|m| m.modified()) else {
            continue;
        };
        if now.duration_since(modified).unwrap_or_default() >= retention {
            match fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    fn line(ms: u64, level: &str, message: &str) -> String {
        format!(
            r#"{{"timestamp":"{}","level":"{level}","logger":"t","message":"{message}"}}"#,
            journal::format_millis(ms)
        )
    }

    const T: u64 = 1_767_225_600_000;

    fn lines(dir: &Path) -> Vec<Line> {
        read(&dir.join("a.log")).unwrap().unwrap()
    }

    #[test]
    fn reads_both_generations_and_dates_unstructured_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        assert_eq!(read(&path).unwrap(), None);
        fs::write(
            rotated(&path),
            format!("early panic\n{}\n", line(T, "info", "one")),
        )
        .unwrap();
        fs::write(
            &path,
            format!(
                "{}\nnot json\n\n{}",
                line(T + 5, "warn", "two"),
                line(T + 9, "error", "three")
            ),
        )
        .unwrap();
        let got = lines(dir.path());
        let seen: Vec<(u64, &str, Level)> = got
            .iter()
            .map(|l| (l.at, l.entry.message.as_str(), l.entry.level))
            .collect();
        assert_eq!(
            seen,
            [
                (T, "early panic", Level::Error),
                (T, "one", Level::Info),
                (T + 5, "two", Level::Warn),
                (T + 5, "not json", Level::Error),
                (T + 9, "three", Level::Error),
            ]
        );
        assert_eq!(got[1].raw, line(T, "info", "one"));
    }

    #[test]
    fn queries_filter_by_time_level_and_text_in_either_order() {
        let dir = tempfile::tempdir().unwrap();
        let text: String = (0..10)
            .map(|i| {
                let level = if i % 2 == 0 { "info" } else { "warn" };
                line(T + i, level, &format!("msg {i}")) + "\n"
            })
            .collect();
        fs::write(dir.path().join("a.log"), text).unwrap();
        let all = lines(dir.path());
        let q = Query {
            start: T + 2,
            end: T + 8,
            limit: 100,
            newest_first: false,
            min_level: None,
            search: None,
        };
        let msgs = |q: &Query| -> Vec<String> {
            select(&all, q)
                .iter()
                .map(|l| l.entry.message.clone())
                .collect()
        };
        assert_eq!(
            msgs(&q),
            ["msg 2", "msg 3", "msg 4", "msg 5", "msg 6", "msg 7"]
        );
        let newest = Query {
            newest_first: true,
            limit: 2,
            ..q.clone()
        };
        assert_eq!(msgs(&newest), ["msg 7", "msg 6"]);
        let oldest = Query {
            limit: 2,
            ..q.clone()
        };
        assert_eq!(msgs(&oldest), ["msg 2", "msg 3"]);
        let warn = Query {
            min_level: Some(Level::Warn),
            ..q.clone()
        };
        assert_eq!(msgs(&warn), ["msg 3", "msg 5", "msg 7"]);
        let search = Query {
            search: Some("msg 4".into()),
            ..q.clone()
        };
        assert_eq!(msgs(&search), ["msg 4"]);
        let case = Query {
            search: Some("MSG".into()),
            ..q
        };
        assert_eq!(msgs(&case), Vec::<String>::new());
    }

    #[test]
    fn rotation_keeps_whole_lines_and_bounds_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        assert!(!rotate_if_large(&path, 10).unwrap(), "no file, no rotation");
        // The agent's way of writing: an append-only descriptor held open throughout.
        let mut writer = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        for i in 0..3 {
            writeln!(writer, "{}", line(T + i, "info", "first")).unwrap();
        }
        write!(writer, "partial").unwrap();
        let before = fs::metadata(&path).unwrap().len();
        assert!(!rotate_if_large(&path, before).unwrap());
        assert!(rotate_if_large(&path, before - 1).unwrap());
        assert_eq!(fs::metadata(&path).unwrap().len(), 0);
        let old = fs::read_to_string(rotated(&path)).unwrap();
        assert_eq!(old.lines().count(), 3);
        assert!(old.ends_with('\n'));
        // The writer goes on at the start of the emptied file, not at its old offset.
        writeln!(writer, "{}", line(T + 10, "info", "second")).unwrap();
        let now = fs::read_to_string(&path).unwrap();
        assert!(now.starts_with('{'), "{now:?}");
        let got = lines(dir.path());
        assert_eq!(got.len(), 4);
        assert_eq!(got[3].entry.message, "second");
        // A second rotation replaces the older generation.
        assert!(rotate_if_large(&path, 1).unwrap());
        let old = fs::read_to_string(rotated(&path)).unwrap();
        assert_eq!(old.lines().count(), 1);
        assert!(!dir.path().join("a.log.1.tmp").exists());
    }

    #[test]
    fn pruning_removes_only_old_logs_of_forgotten_sandboxes() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["live.log", "gone.log", "gone.log.1", "other.txt"] {
            fs::write(dir.path().join(name), "x\n").unwrap();
        }
        let now = SystemTime::now();
        let day = Duration::from_secs(24 * 3600);
        let keep = |id: &str| id == "live";
        // Nothing is old enough yet.
        assert_eq!(prune(dir.path(), keep, now, day).unwrap(), 0);
        // A week later the forgotten sandbox's logs go, the live one's and others stay.
        assert_eq!(prune(dir.path(), keep, now + 7 * day, day).unwrap(), 2);
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["live.log", "other.txt"]);
        assert_eq!(
            prune(&dir.path().join("missing"), keep, now, day).unwrap(),
            0
        );
    }
}
