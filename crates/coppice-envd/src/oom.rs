//! The agent and the kernel's out-of-memory killer.
//!
//! The agent must be the last thing the OOM killer picks when the sandbox's processes fill
//! its memory limit: it is PID 1, and when it dies every process of the sandbox dies with it.
//! So every process the agent starts (commands, code-interpreter contexts) raises its own
//! OOM score adjustment to [`CHILD_SCORE_ADJ`], the maximum, before `exec` ([`yield_in_child`]):
//! raising needs no privilege, and a process so marked always outranks the agent, whose own
//! adjustment is the gateway's (0) or lower. A process may lower its score again only down to
//! the floor it inherited (`oom_score_adj_min`, 0 from the gateway), never below the agent's,
//! even as root in the sandbox, which lacks `CAP_SYS_RESOURCE` in the host's user namespace.
//! Where the host has that capability, the jail also lowers the agent's own score before it
//! starts (`coppice-jail`, `docs/backends.md`).
//!
//! [`kills_so_far`] is the host's count of OOM kills, which the code interpreter compares
//! across a cell to say that the OOM killer, not a crash, ended the context's process
//! ([`restart_reason`]).

use std::io;

/// The OOM score adjustment of every process the agent starts: the maximum, so the OOM
/// killer takes user code before the agent (and, when the whole host runs out, before the
/// host's own processes).
pub(crate) const CHILD_SCORE_ADJ: &str = "1000";

/// Raises the calling process's OOM score adjustment to [`CHILD_SCORE_ADJ`].
///
/// For `pre_exec`: async-signal-safe (`open`, `write`, `close` on static data). A failure is
/// ignored: with no `/proc` the child keeps the agent's adjustment and competes with it by
/// size, as every process does by default.
///
/// It first makes the child dumpable again: the agent is not (so that the sandbox cannot
/// trace it), a fork inherits that, and a non-dumpable process's `/proc` files belong to the
/// root of the user namespace its memory belongs to, which for the agent is the host's
/// (`docs/backends.md`), so sandbox root could not write this one. `exec` decides again
/// from the new program, so what runs there is dumpable as any program is.
pub(crate) fn yield_in_child() -> io::Result<()> {
    // SAFETY: prctl with integer arguments, and open/write/close on a NUL-terminated static
    // path and a static buffer; no allocation, no locks.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0);
        let fd = libc::open(
            c"/proc/self/oom_score_adj".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        );
        if fd >= 0 {
            libc::write(fd, CHILD_SCORE_ADJ.as_ptr().cast(), CHILD_SCORE_ADJ.len());
            libc::close(fd);
        }
    }
    Ok(())
}

/// The number of processes the kernel's OOM killer has killed since boot, host-wide
/// (`oom_kill` in `/proc/vmstat`, which is not namespaced); `None` if it cannot be read.
pub(crate) fn kills_so_far() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/vmstat").ok()?;
    parse_vmstat(&text)
}

/// What the code interpreter says when a context's process died during a cell: that the OOM
/// killer ended it if the host's count of OOM kills moved since `before` (taken when the cell
/// started), which the memory limit of the sandbox does when user code fills it. The count is
/// host-wide, so an OOM kill elsewhere at the same moment would be blamed too.
pub(crate) fn restart_reason(before: Option<u64>) -> &'static str {
    reason(before, kills_so_far())
}

fn reason(before: Option<u64>, now: Option<u64>) -> &'static str {
    match (before, now) {
        (Some(b), Some(now)) if now > b => {
            "Context was restarted: its process was killed by the out-of-memory killer \
             (the cell used more memory than the sandbox has)"
        }
        _ => "Context was restarted",
    }
}

fn parse_vmstat(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmstat_gives_the_kill_count() {
        assert_eq!(
            parse_vmstat("nr_free_pages 1\noom_kill 7\npgfault 3\n"),
            Some(7)
        );
        assert_eq!(parse_vmstat("nr_free_pages 1\n"), None);
        // This host's kernel has the counter.
        let now = kills_so_far().unwrap();
        assert_eq!(restart_reason(Some(now)), "Context was restarted");
        assert!(reason(Some(3), Some(4)).contains("out-of-memory killer"));
        assert_eq!(reason(Some(4), Some(4)), "Context was restarted");
        assert_eq!(reason(None, Some(4)), "Context was restarted");
    }

    /// A child the agent starts takes the maximum score, whatever the agent's own is;
    /// raising a score needs no privilege.
    #[test]
    fn children_take_the_maximum_score() {
        use std::io::Read as _;
        use std::os::unix::process::CommandExt as _;
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.args(["-c", "cat /proc/self/oom_score_adj"])
            .stdout(std::process::Stdio::piped());
        // SAFETY: the closure runs in the forked child and only calls async-signal-safe
        // functions on static data.
        unsafe {
            cmd.pre_exec(yield_in_child);
        }
        // Through the reaper: other tests of this binary run it, and it reaps every child.
        let (mut child, exit) = crate::reaper::spawn(&mut cmd).unwrap();
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(exit.blocking_recv().unwrap(), crate::reaper::Exit::Code(0));
        assert_eq!(out.trim(), CHILD_SCORE_ADJ);
    }
}
