//! Reports from the agent to the gateway: enforcement the agent did, as NDJSON lines appended
//! to [`FILE`] beside the agent's socket (`/run/coppice/events.ndjson` in the sandbox, which
//! is the host directory `<state>/run/<id>/`).
//!
//! One [`Report`] per line, written with a single `write` on an `O_APPEND` file, so lines
//! never interleave. The file is bounded: past [`MAX_FILE`] bytes nothing more is appended
//! (and a warning is logged), so a sandbox that times out commands in a loop cannot fill the
//! host's disk. The gateway reads the file from a persisted offset and records each line as
//! an event exactly once. Anything in the sandbox running as its root can write this file too,
//! so a report is only as trustworthy as the sandbox.

use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// The file's name in the agent's run directory.
pub const FILE: &str = "events.ndjson";
/// The file is not appended to past this size.
pub const MAX_FILE: u64 = 4 << 20;
/// Longest line a reader needs to accept.
pub const MAX_LINE: usize = 16 * 1024;
/// Longest command line kept in a report (longer ones are cut at a character boundary).
const MAX_COMMAND: usize = 4096;

/// One thing the agent reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
#[non_exhaustive]
pub enum Report {
    /// A command was killed because its lifetime (`Connect-Timeout-Ms` on Start) ran out.
    #[serde(rename = "task.timeout")]
    TaskTimeout {
        /// When, in milliseconds since the Unix epoch.
        at_ms: u64,
        /// The command line as started (program and arguments, space-separated).
        command: String,
        /// The lifetime it exceeded, in milliseconds.
        limit_ms: u64,
        /// CPU time (user + system) its process group had used when it was killed, in
        /// milliseconds.
        cpu_ms: u64,
    },
}

impl Report {
    /// A `task.timeout` report for `command`, now.
    pub fn task_timeout(command: &str, limit: Duration, cpu: Duration) -> Self {
        let mut command = command.to_owned();
        if command.len() > MAX_COMMAND {
            let mut end = MAX_COMMAND;
            while !command.is_char_boundary(end) {
                end -= 1;
            }
            command.truncate(end);
        }
        Report::TaskTimeout {
            at_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            command,
            limit_ms: u64::try_from(limit.as_millis()).unwrap_or(u64::MAX),
            cpu_ms: u64::try_from(cpu.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

/// Appends `report` to the file at `path`; failures are logged, never returned (a report
/// must not fail the operation it reports on).
pub(crate) fn append(path: &Path, report: &Report) {
    let Ok(mut line) = serde_json::to_vec(report) else {
        return;
    };
    line.push(b'\n');
    let file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path);
    let mut file = match file {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot open the report file");
            return;
        }
    };
    let full = file
        .metadata()
        .map(|m| m.len() + line.len() as u64 > MAX_FILE)
        .unwrap_or(true);
    if full {
        tracing::warn!(path = %path.display(), "report file is full; report dropped");
        return;
    }
    if let Err(e) = file.write_all(&line) {
        tracing::warn!(path = %path.display(), error = %e, "cannot append a report");
    }
}

/// Bytes read from a report file per pass at most.
const CHUNK: u64 = 256 * 1024;

/// Complete lines read from a report file, and the offset after the last one.
#[derive(Debug)]
pub struct Chunk {
    /// The lines, without their newlines; blank ones left out.
    pub lines: Vec<Vec<u8>>,
    /// Where the next read starts.
    pub end: u64,
}

/// Reads complete lines from `from`, at most [`CHUNK`] bytes, without following a symlink
/// and only from a regular file (the sandbox controls the directory). A line longer than
/// [`MAX_LINE`] is skipped.
pub fn read_from(path: &Path, from: u64) -> std::io::Result<Chunk> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    file.seek(SeekFrom::Start(from))?;
    let mut buf = Vec::new();
    file.take(CHUNK).read_to_end(&mut buf)?;
    let mut lines = Vec::new();
    let mut consumed = 0;
    let mut start = 0;
    for (i, b) in buf.iter().enumerate() {
        if *b == b'\n' {
            let line = &buf[start..i];
            if line.len() > MAX_LINE {
                tracing::warn!(path = %path.display(), len = line.len(), "oversized report line skipped");
            } else if !line.iter().all(u8::is_ascii_whitespace) {
                lines.push(line.to_vec());
            }
            start = i + 1;
            consumed = start;
        }
    }
    // A partial last line waits for its newline, unless it can never be a valid line.
    if consumed == 0 && buf.len() as u64 >= CHUNK {
        tracing::warn!(path = %path.display(), "report data without a newline skipped");
        consumed = buf.len();
    }
    Ok(Chunk {
        lines,
        end: from + consumed as u64,
    })
}

/// CPU time (user + system) used so far by the live processes of process group `pgid`,
/// including the children they have reaped, from `/proc`.
pub(crate) fn group_cpu(pgid: i32) -> Duration {
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|t| *t > 0)
        .unwrap_or(100);
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Duration::ZERO;
    };
    let mut ticks = 0u64;
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some((group, t)) = parse_stat(&stat) {
            if group == pgid {
                ticks = ticks.saturating_add(t);
            }
        }
    }
    Duration::from_millis(ticks.saturating_mul(1000) / tick)
}

/// `(pgrp, utime + stime + cutime + cstime)` from a `/proc/<pid>/stat` line. The command name
/// may hold spaces and parentheses, so fields are counted from the last `)`.
fn parse_stat(stat: &str) -> Option<(i32, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(3) ppid(4) pgrp(5) ... utime(14) stime(15) cutime(16) cstime(17).
    let pgrp = fields.get(2)?.parse().ok()?;
    let mut sum = 0u64;
    for i in 11..=14 {
        // cutime/cstime are signed in the kernel's format but never negative in practice.
        sum = sum.saturating_add(fields.get(i)?.parse::<i64>().ok()?.max(0).unsigned_abs());
    }
    Some((pgrp, sum))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_one_json_line_each() {
        let r = Report::task_timeout(
            "sleep 60",
            Duration::from_secs(2),
            Duration::from_millis(10),
        );
        let line = serde_json::to_string(&r).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["type"], "task.timeout");
        assert_eq!(v["command"], "sleep 60");
        assert_eq!(v["limit_ms"], 2000);
        assert_eq!(v["cpu_ms"], 10);
        assert_eq!(serde_json::from_str::<Report>(&line).unwrap(), r);
        let long = "é".repeat(MAX_COMMAND);
        let Report::TaskTimeout { command, .. } =
            Report::task_timeout(&long, Duration::ZERO, Duration::ZERO);
        assert!(command.len() <= MAX_COMMAND && long.starts_with(&command));
    }

    #[test]
    fn appends_stop_at_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let r = Report::task_timeout("x", Duration::ZERO, Duration::ZERO);
        append(&path, &r);
        append(&path, &r);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
        std::fs::write(&path, vec![b' '; usize::try_from(MAX_FILE).unwrap()]).unwrap();
        append(&path, &r);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), MAX_FILE);
        // A symlink planted in its place is not followed.
        let target = dir.path().join("elsewhere");
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        append(&path, &r);
        assert!(!target.exists());
    }

    #[test]
    fn stat_lines_parse_past_odd_names() {
        let stat = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 7 3 20 0 1 0";
        assert_eq!(parse_stat(stat), Some((4242, 310)));
        assert_eq!(parse_stat("garbage"), None);
        // Burn some CPU in this process; its group's total must show it.
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(100) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(group_cpu(nix::unistd::getpgrp().as_raw()) >= Duration::from_millis(10));
    }

    #[test]
    fn chunks_stop_at_the_last_complete_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.ndjson");
        std::fs::write(&path, b"{\"a\":1}\n\n{\"b\":2}\n{\"partial\"").unwrap();
        let c = read_from(&path, 0).unwrap();
        assert_eq!(c.lines, vec![b"{\"a\":1}".to_vec(), b"{\"b\":2}".to_vec()]);
        assert_eq!(c.end, 17);
        let again = read_from(&path, c.end).unwrap();
        assert!(again.lines.is_empty());
        assert_eq!(again.end, c.end);
    }

    #[test]
    fn oversized_lines_and_symlinks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.ndjson");
        let mut big = vec![b'x'; MAX_LINE + 1];
        big.extend_from_slice(b"\n{\"ok\":1}\n");
        std::fs::write(&path, &big).unwrap();
        let c = read_from(&path, 0).unwrap();
        assert_eq!(c.lines, vec![b"{\"ok\":1}".to_vec()]);
        assert_eq!(c.end, big.len() as u64);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        read_from(&link, 0).unwrap_err();
    }
}
