//! How the driver runs its helpers (`nft`, `conntrack`): each with a timeout, in a process
//! group of its own, armed with the parent-death signal, so none outlives its job or the
//! gateway.
//!
//! The same pattern as `coppice-zfs`'s `command` module, cut down to what this driver needs
//! (input on stdin, output captured, no streaming); a shared helper crate is later work.
//! The parent-death signal fires when the *thread* that forked the helper ends, so a helper
//! is spawned and waited for by one thread that blocks in [`output`] for its whole life;
//! async callers run it in `spawn_blocking`.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use coppice_lifecycle::backend::BackendError;

/// One `nft -f -` transaction or `conntrack` call: milliseconds normally. Ten seconds means
/// the helper is stuck, and failing the operation beats hanging it.
pub(crate) const HELPER: Duration = Duration::from_secs(10);

/// One `apt-get` step installing a missing helper on a fresh machine: a download, so
/// minutes on a slow mirror.
pub(crate) const INSTALL: Duration = Duration::from_secs(600);

/// How many lines of stderr an error keeps.
const TAIL_LINES: usize = 8;

/// What a helper left behind.
#[derive(Debug)]
pub(crate) struct Output {
    pub(crate) status: ExitStatus,
    #[cfg_attr(not(test), allow(dead_code))] // Read by the tests (`nft -j list`).
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// Runs `cmd` with `stdin` as its input for at most `timeout`; a failed exit is the
/// caller's to judge, a timeout is [`BackendError::Command`].
pub(crate) fn output(
    mut cmd: Command,
    stdin: &[u8],
    timeout: Duration,
) -> Result<Output, BackendError> {
    let line = command_line(&cmd);
    let io_err = |e| BackendError::io("run", PathBuf::from(&line), e);
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: runs in the forked child before exec and only calls prctl, getppid and _exit,
    // which are async-signal-safe and allocate nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(io_err)?;
    let pid = libc::pid_t::try_from(child.id()).map_err(|e| io_err(io::Error::other(e)))?;
    let mut input = child.stdin.take();
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let stdin = stdin.to_vec();
    let (status, stdout, stderr, timed_out) = std::thread::scope(|s| {
        let writer = s.spawn(move || {
            if let Some(mut w) = input.take() {
                // A helper that exits without reading all of it is judged by its status.
                let _ = w.write_all(&stdin);
            }
        });
        let read_all = |r: Option<&mut dyn Read>| {
            let mut text = String::new();
            if let Some(r) = r {
                let mut bytes = Vec::new();
                let _ = r.read_to_end(&mut bytes);
                text = String::from_utf8_lossy(&bytes).into_owned();
            }
            text
        };
        let out_reader = s.spawn(move || read_all(out.as_mut().map(|r| r as &mut dyn Read)));
        let err_reader = s.spawn(move || read_all(err.as_mut().map(|r| r as &mut dyn Read)));
        let timed_out = !wait_exit(pid, timeout);
        // The leader has exited (or is about to be killed) but is not reaped, so its pid
        // still names its group: sweep whatever it left running, or kill it on timeout.
        // SAFETY: kill touches no memory.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        let status = child.wait();
        let _ = writer.join();
        let stdout = out_reader.join().unwrap_or_default();
        let stderr = err_reader.join().unwrap_or_default();
        (status, stdout, stderr, timed_out)
    });
    let status = status.map_err(io_err)?;
    if timed_out {
        return Err(BackendError::Command {
            command: line,
            status: format!("SIGKILL, timed out after {} ms", timeout.as_millis()),
            stderr: tail(&stderr),
        });
    }
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Runs `cmd` like [`output`]; a non-zero exit is [`BackendError::Command`].
pub(crate) fn run(cmd: Command, stdin: &[u8], timeout: Duration) -> Result<Output, BackendError> {
    let line = command_line(&cmd);
    let out = output(cmd, stdin, timeout)?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(BackendError::Command {
            command: line,
            status: out.status.to_string(),
            stderr: tail(&out.stderr),
        })
    }
}

/// Waits until `pid` has exited (without reaping it); false if `timeout` passed first.
fn wait_exit(pid: libc::pid_t, timeout: Duration) -> bool {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let Ok(raw) = i32::try_from(raw) else {
        return false;
    };
    if raw < 0 {
        // No pidfd (a kernel before 5.3): fall back to a waitid poll without reaping.
        return poll_exit(pid, timeout);
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(raw) };
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
        let mut fd = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&raw mut fd, 1, ms) };
        if n > 0 {
            return true;
        }
        if n == 0 || (n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted) {
            return n < 0 && poll_exit(pid, left);
        }
    }
}

fn poll_exit(pid: libc::pid_t, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        // SAFETY: `info` is written by waitid; WNOWAIT leaves the child unreaped.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above; `pid` is our unreaped child.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                libc::id_t::try_from(pid).unwrap_or(0),
                &raw mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: si_pid is valid to read after waitid filled `info` (0 when nothing exited).
        if r != 0 || unsafe { info.si_pid() } != 0 {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        let mut fd = libc::pollfd {
            fd: -1,
            events: 0,
            revents: 0,
        };
        // SAFETY: a 10 ms wait with one ignored pollfd.
        unsafe { libc::poll(&raw mut fd, 1, 10) };
    }
}

/// The command as one line, for error messages.
pub(crate) fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script);
        cmd
    }

    #[test]
    fn input_goes_in_and_output_comes_out() {
        let out = run(sh("tr a-z A-Z; echo err >&2"), b"hello", HELPER).unwrap();
        assert_eq!(
            (out.stdout.as_str(), out.stderr.as_str()),
            ("HELLO", "err\n")
        );
        let r = run(sh("echo why >&2; exit 3"), b"", HELPER);
        assert!(
            matches!(&r, Err(BackendError::Command { status, stderr, .. })
                if status == "exit status: 3" && stderr == "why"),
            "{r:?}"
        );
    }

    #[test]
    fn a_helper_past_its_timeout_is_killed_with_its_group() {
        let r = output(
            sh("sleep 600 & echo $! >&2; sleep 600"),
            b"",
            Duration::from_millis(300),
        );
        let Err(BackendError::Command { status, stderr, .. }) = r else {
            panic!("not a timeout: {r:?}");
        };
        assert!(status.contains("timed out"), "{status}");
        let background: libc::pid_t = stderr.trim().parse().unwrap();
        // The background sleep was in the group: SIGKILLed, so soon gone or a zombie.
        let dead = || {
            let stat =
                std::fs::read_to_string(format!("/proc/{background}/stat")).unwrap_or_default();
            let state = stat.rsplit_once(')').map(|(_, r)| r.trim().chars().next());
            matches!(state, None | Some(Some('Z')))
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !dead() && std::time::Instant::now() < deadline {
            #[allow(clippy::disallowed_methods)] // A plain test thread.
            std::thread::sleep(Duration::from_millis(10));
        }
        if !dead() {
            // SAFETY: kill touches no memory; leave no `sleep 600` behind.
            unsafe { libc::kill(background, libc::SIGKILL) };
            panic!("background sleep {background} outlived its group");
        }
    }
}
