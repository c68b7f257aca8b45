//! Reports from the agent to the gateway: what happened to the processes it started, as
//! NDJSON lines appended to [`FILE`] beside the agent's socket (`/run/coppice/events.ndjson`
//! in the sandbox, which is the host directory `<state>/run/<id>/`).
//!
//! One [`Report`] per line, written with a single `write` on an `O_APPEND` file, so lines
//! never interleave. The file is bounded: past [`MAX_FILE`] bytes nothing more is appended
//! (and a warning is logged), so a sandbox that times out commands in a loop cannot fill the
//! host's disk. The gateway reads the file from a persisted offset, records each line as an
//! event exactly once, and empties the file once it has read all of it ([`compact`]), so the
//! bound is never reached while the gateway keeps up. Appends and the emptying exclude each
//! other with `flock`. Anything in the sandbox running as its root can write this file too,
//! so a report is only as trustworthy as the sandbox.

use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::os::fd::AsRawFd as _;
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
/// Longest process tag kept in a report.
const MAX_TAG: usize = 256;
/// How many times, a millisecond apart, an append tries to take the file's lock before it
/// writes without it (the gateway holds it for a `stat` and a truncate; only something in
/// the sandbox holding it for longer makes an append wait that long).
const LOCK_TRIES: u32 = 50;

/// How a process ended, as both task reports carry it. Fields missing from a line (reports
/// of agents older than them) read as zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Ending {
    /// The process id in the sandbox.
    pub pid: u32,
    /// The exit status, or -1 when a signal ended the process (envd's `exitCode`).
    pub exit_code: i32,
    /// The signal that ended the process, if one did.
    pub signal: Option<i32>,
    /// From start to exit, in milliseconds.
    pub duration_ms: u64,
}

impl Ending {
    /// The ending of process `pid`, which ran for `ran` and exited with `code`, or was ended
    /// by `signal`.
    pub fn new(pid: u32, code: Option<i32>, signal: Option<i32>, ran: Duration) -> Self {
        Ending {
            pid,
            exit_code: code.unwrap_or(-1),
            signal,
            duration_ms: millis(ran),
        }
    }
}

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
        /// How it ended.
        #[serde(flatten)]
        ending: Ending,
    },
    /// A command started through `process.Process/Start` ended, however it ended.
    #[serde(rename = "task.completed")]
    TaskCompleted {
        /// When, in milliseconds since the Unix epoch.
        at_ms: u64,
        /// The command line as started (program and arguments, space-separated).
        command: String,
        /// The tag the command was started with, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tag: Option<String>,
        /// Whether the agent killed it because its lifetime ran out.
        timed_out: bool,
        /// How it ended.
        #[serde(flatten)]
        ending: Ending,
    },
}

impl Report {
    /// A `task.timeout` report for `command`, now: it was killed after `limit`, having used
    /// `cpu`, and ended as `ending` says.
    pub fn task_timeout(command: &str, limit: Duration, cpu: Duration, ending: Ending) -> Self {
        Report::TaskTimeout {
            at_ms: now_ms(),
            command: cut(command, MAX_COMMAND),
            limit_ms: millis(limit),
            cpu_ms: millis(cpu),
            ending,
        }
    }

    /// A `task.completed` report for `command`, now.
    pub fn task_completed(
        command: &str,
        tag: Option<&str>,
        timed_out: bool,
        ending: Ending,
    ) -> Self {
        Report::TaskCompleted {
            at_ms: now_ms(),
            command: cut(command, MAX_COMMAND),
            tag: tag.map(|t| cut(t, MAX_TAG)),
            timed_out,
            ending,
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, millis)
}

/// `s` cut to at most `max` bytes at a character boundary.
fn cut(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Takes `flock(op | LOCK_NB)` on `file`; whether it got it.
fn try_lock(file: &std::fs::File, op: libc::c_int) -> bool {
    // SAFETY: flock on a descriptor this function's caller owns for the call's duration.
    unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) == 0 }
}

/// Appends `report` to the file at `path`, waiting (without blocking a thread) for the file's
/// lock as long as [`LOCK_TRIES`] allows, then writing anyway: something in the sandbox
/// holding the lock can only cost the sandbox's own reports their exclusion from the
/// gateway's [`compact`]. Failures are logged, never returned (a report must not fail the
/// operation it reports on).
pub(crate) async fn append(path: &Path, report: &Report) {
    let mut tries = 0;
    while !append_now(path, report, tries >= LOCK_TRIES) {
        tries += 1;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// One attempt at [`append`]: `false` if the lock is taken and `force` is not set (nothing
/// was written), `true` otherwise (written, or failed and logged).
fn append_now(path: &Path, report: &Report, force: bool) -> bool {
    let Ok(mut line) = serde_json::to_vec(report) else {
        return true;
    };
    line.push(b'\n');
    let file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        // Never through a symlink, and never waiting on a FIFO planted in its place.
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path);
    let mut file = match file {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot open the report file");
            return true;
        }
    };
    // The lock goes with the descriptor, when this returns.
    if !try_lock(&file, libc::LOCK_EX) && !force {
        return false;
    }
    let full = file
        .metadata()
        .map(|m| m.len() + line.len() as u64 > MAX_FILE)
        .unwrap_or(true);
    if full {
        tracing::warn!(path = %path.display(), "report file is full; report dropped");
        return true;
    }
    if let Err(e) = file.write_all(&line) {
        tracing::warn!(path = %path.display(), error = %e, "cannot append a report");
    }
    true
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

/// Empties the report file at `path` if it holds exactly `consumed` bytes, i.e. the reader has
/// read every line of it; says whether it did. Never waits: when an append holds the lock
/// (or something in the sandbox does), it does nothing and the next pass tries again. Only
/// from a regular file, never through a symlink.
///
/// The reader must then read from offset 0. If it crashes before it has stored that, it
/// finds its stored offset past the end of the file, which is how it knows to start over.
pub fn compact(path: &Path, consumed: u64) -> std::io::Result<bool> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    if meta.len() != consumed || !try_lock(&file, libc::LOCK_EX) {
        return Ok(false);
    }
    // Under the lock no append can land between this check and the truncate.
    if file.metadata()?.len() != consumed {
        return Ok(false);
    }
    file.set_len(0)?;
    Ok(true)
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
        let ending = Ending::new(42, None, Some(9), Duration::from_millis(2003));
        let r = Report::task_timeout(
            "sleep 60",
            Duration::from_secs(2),
            Duration::from_millis(10),
            ending,
        );
        let line = serde_json::to_string(&r).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["type"], "task.timeout");
        assert_eq!(v["command"], "sleep 60");
        assert_eq!(v["limit_ms"], 2000);
        assert_eq!(v["cpu_ms"], 10);
        assert_eq!(v["pid"], 42);
        assert_eq!(v["exit_code"], -1);
        assert_eq!(v["signal"], 9);
        assert_eq!(v["duration_ms"], 2003);
        assert_eq!(serde_json::from_str::<Report>(&line).unwrap(), r);
        let long = "é".repeat(MAX_COMMAND);
        let Report::TaskTimeout { command, .. } =
            Report::task_timeout(&long, Duration::ZERO, Duration::ZERO, Ending::default())
        else {
            panic!("a timeout report");
        };
        assert!(command.len() <= MAX_COMMAND && long.starts_with(&command));

        let done = Report::task_completed(
            "/bin/bash -l -c npm install",
            Some("npm"),
            false,
            Ending::new(7, Some(3), None, Duration::from_millis(1500)),
        );
        let line = serde_json::to_string(&done).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["type"], "task.completed");
        assert_eq!(v["command"], "/bin/bash -l -c npm install");
        assert_eq!(v["tag"], "npm");
        assert_eq!(v["timed_out"], false);
        assert_eq!(v["pid"], 7);
        assert_eq!(v["exit_code"], 3);
        assert_eq!(v["signal"], serde_json::Value::Null);
        assert_eq!(v["duration_ms"], 1500);
        assert_eq!(serde_json::from_str::<Report>(&line).unwrap(), done);
    }

    #[test]
    fn timeout_lines_of_older_agents_still_parse() {
        let old =
            r#"{"type":"task.timeout","at_ms":1,"command":"sleep 9","limit_ms":500,"cpu_ms":0}"#;
        let Report::TaskTimeout {
            ending, limit_ms, ..
        } = serde_json::from_str(old).unwrap()
        else {
            panic!("a timeout report");
        };
        assert_eq!((ending, limit_ms), (Ending::default(), 500));
    }

    #[tokio::test]
    async fn compaction_empties_only_a_file_read_to_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let r = Report::task_completed("true", None, false, Ending::default());
        append(&path, &r).await;
        let len = std::fs::metadata(&path).unwrap().len();
        // Not everything read: nothing happens.
        assert!(!compact(&path, len - 1).unwrap());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
        // Someone holds the lock (an append under way): nothing happens either.
        let holder = std::fs::File::open(&path).unwrap();
        assert!(try_lock(&holder, libc::LOCK_EX));
        assert!(!compact(&path, len).unwrap());
        // An append waits for the lock a while, then writes anyway.
        append(&path, &r).await;
        let len = std::fs::metadata(&path).unwrap().len();
        assert_eq!(read_from(&path, 0).unwrap().lines.len(), 2);
        drop(holder);
        assert!(compact(&path, len).unwrap());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        // Appends after it start the file over.
        append(&path, &r).await;
        let c = read_from(&path, 0).unwrap();
        assert_eq!(c.lines.len(), 1);
        // Never through a symlink.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        compact(&link, c.end).unwrap_err();
    }

    #[tokio::test]
    async fn appends_stop_at_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let r = Report::task_timeout("x", Duration::ZERO, Duration::ZERO, Ending::default());
        append(&path, &r).await;
        append(&path, &r).await;
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
        std::fs::write(&path, vec![b' '; usize::try_from(MAX_FILE).unwrap()]).unwrap();
        append(&path, &r).await;
        assert_eq!(std::fs::metadata(&path).unwrap().len(), MAX_FILE);
        // A symlink planted in its place is not followed.
        let target = dir.path().join("elsewhere");
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        append(&path, &r).await;
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
