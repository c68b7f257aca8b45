//! How this crate runs helper processes (debootstrap, apt-get, chroot, cp, zfs, zpool), so that
//! none outlives its job or the gateway.
//!
//! Every helper runs in a process group of its own and carries a timeout. When it exits, runs
//! out of time, or its caller gives up (a dropped [`Lifeline`], a panic in a progress
//! callback), the whole group gets SIGKILL: debootstrap's dpkg and apt go with it.
//! The helper is also armed with a parent-death signal (Linux `PR_SET_PDEATHSIG`, FreeBSD
//! `PROC_PDEATHSIG_CTL`, both SIGKILL), so the kernel kills it if the gateway dies.
//!
//! That signal fires when the *thread* that forked the helper ends, not the process. So a
//! helper is spawned and waited for by one thread, which blocks in [`run`], [`output`] or
//! [`stream`] for the helper's whole life; async callers run those in `spawn_blocking`,
//! never `tokio::process` on a runtime thread (a worker that goes through `block_in_place`
//! later retires as a blocking thread, and blocking threads exit when idle).
//! The signal is not inherited by the helper's own children, so on Linux every helper is
//! also the first process (PID 1) of a PID namespace of its own: when it dies, from the
//! parent-death signal or any other way, the kernel kills everything in that namespace,
//! descendants that left its process group included. If the gateway dies abruptly,
//! debootstrap goes and the dpkg it started goes with it (see `docs/storage.md`).

// `run`, `stream` and their timeouts serve the overlay driver and the template builder,
// which are Linux-only; elsewhere only the zfs driver's `output` is used.
#![cfg_attr(not(target_os = "linux"), allow(dead_code))]

use std::io::{self, PipeReader, PipeWriter, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use coppice_lifecycle::backend::BackendError;

/// debootstrap and `apt-get install`: they download and unpack about a hundred packages
/// from a mirror, a minute or two normally, but a slow or distant mirror can make that ten
/// times longer without anything being wrong.
pub(crate) const INSTALL: Duration = Duration::from_secs(30 * 60);

/// One step inside the template's chroot (`useradd`, `visudo --check`, `apt-get clean`):
/// seconds normally; ten minutes means it is waiting for something that will not come.
pub(crate) const CHROOT_STEP: Duration = Duration::from_secs(10 * 60);

/// `cp -a` of a whole tree (a 200 MB template, or a sandbox's upper directory): seconds
/// with hard links or reflinks, a minute or two for a full copy of a few GB on slow disks.
pub(crate) const TREE_COPY: Duration = Duration::from_secs(10 * 60);

/// One `zfs` or `zpool` command: well under a second, or a few seconds under zfs-fuse. A
/// minute is far beyond that, and short enough that a wedged zfs-fuse ("dataset is busy"
/// forever) fails the operation instead of hanging it.
pub(crate) const ZFS: Duration = Duration::from_secs(60);

/// A capability probe (`zfs list -H`): it answers at once or the tool is not usable.
pub(crate) const PROBE: Duration = Duration::from_secs(10);

/// How long a killed helper gets to die before it is left to a background reaper: SIGKILL
/// is prompt unless the process is stuck in the kernel (a FUSE request to a deaf daemon),
/// and then the caller must not hang with it.
const KILL_GRACE: Duration = Duration::from_secs(10);

/// How many lines of output an error message keeps.
const TAIL_LINES: usize = 8;

/// What a helper that ran to completion left behind.
#[derive(Debug)]
pub(crate) struct Output {
    /// How it exited.
    pub(crate) status: ExitStatus,
    /// Everything it wrote to stdout.
    pub(crate) stdout: Vec<u8>,
    /// Everything it wrote to stderr.
    pub(crate) stderr: Vec<u8>,
}

/// Held by whoever waits for a helper from elsewhere (an async task); dropping it kills the
/// helper, which is how a dropped future keeps `kill_on_drop` semantics.
#[derive(Debug)]
pub(crate) struct Lifeline {
    _cut_on_drop: PipeWriter,
}

/// The end of a [`Lifeline`] handed to [`output`].
#[derive(Debug)]
pub(crate) struct LifelineEnd(PipeReader);

/// A lifeline pair: pass the end to [`output`], keep the [`Lifeline`].
pub(crate) fn lifeline() -> io::Result<(Lifeline, LifelineEnd)> {
    // Both ends are close-on-exec, so no helper holds the write end open.
    let (reader, writer) = io::pipe()?;
    Ok((
        Lifeline {
            _cut_on_drop: writer,
        },
        LifelineEnd(reader),
    ))
}

/// Runs `cmd` for at most `timeout` with stdout and stderr captured; a failed exit status
/// is the caller's to judge, a timeout is [`BackendError::Command`].
pub(crate) fn output(
    mut cmd: Command,
    timeout: Duration,
    lifeline: Option<LifelineEnd>,
) -> Result<Output, BackendError> {
    let line = command_line(&cmd);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let end = supervise(
        cmd,
        &line,
        timeout,
        lifeline.as_ref(),
        &mut |from, bytes| match from {
            Pipe::Stdout => stdout.extend_from_slice(bytes),
            Pipe::Stderr => stderr.extend_from_slice(bytes),
        },
    )?;
    match end {
        End::Exited(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        End::Killed(why) => Err(killed(line, why, &tail(&String::from_utf8_lossy(&stderr)))),
    }
}

/// Runs `cmd` for at most `timeout` with its output captured; a failure or a timeout becomes
/// [`BackendError::Command`] with the tail of its stderr.
pub(crate) fn run(cmd: Command, timeout: Duration) -> Result<(), BackendError> {
    let line = command_line(&cmd);
    let out = output(cmd, timeout, None)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(BackendError::Command {
            command: line,
            status: out.status.to_string(),
            stderr: tail(&String::from_utf8_lossy(&out.stderr)),
        })
    }
}

/// Runs `cmd` for at most `timeout` with stdout and stderr merged, handing each line to
/// `progress` as it arrives; a failure or a timeout becomes [`BackendError::Command`] with
/// the last lines.
pub(crate) fn stream(
    mut cmd: Command,
    timeout: Duration,
    progress: &mut dyn FnMut(&str),
) -> Result<(), BackendError> {
    let line = command_line(&cmd);
    let spawn_err = |e| BackendError::io("run", PathBuf::from(&line), e);
    let (reader, writer) = io::pipe().map_err(spawn_err)?;
    cmd.stdout(writer.try_clone().map_err(spawn_err)?)
        .stderr(writer);
    let mut lines = Lines::default();
    let end = supervise_merged(cmd, reader, &line, timeout, &mut |bytes| {
        lines.push(bytes, progress);
    });
    lines.finish(progress);
    let last = lines.last.join("\n");
    match end? {
        End::Exited(status) if status.success() => Ok(()),
        End::Exited(status) => Err(BackendError::Command {
            command: line,
            status: status.to_string(),
            stderr: last,
        }),
        End::Killed(why) => Err(killed(line, why, &last)),
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

/// The last few lines of a command's output, enough to say why it failed.
pub(crate) fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}

/// Which pipe some output came from.
#[derive(Debug, Clone, Copy)]
enum Pipe {
    Stdout,
    Stderr,
}

/// How a supervised helper ended.
#[derive(Debug)]
enum End {
    /// It exited by itself (or was killed by someone else).
    Exited(ExitStatus),
    /// We killed it.
    Killed(Why),
}

/// Why we killed a helper.
#[derive(Debug, Clone, Copy)]
enum Why {
    TimedOut(Duration),
    Abandoned,
}

fn killed(command: String, why: Why, stderr: &str) -> BackendError {
    let status = match why {
        Why::TimedOut(t) => format!("SIGKILL, timed out after {}", human(t)),
        Why::Abandoned => "SIGKILL, abandoned by its caller".to_owned(),
    };
    BackendError::Command {
        command,
        status,
        stderr: stderr.to_owned(),
    }
}

/// `30 min`, `600 s`, `300 ms`.
fn human(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        format!("{} ms", d.as_millis())
    } else if secs.is_multiple_of(60) {
        format!("{} min", secs / 60)
    } else {
        format!("{secs} s")
    }
}

/// Splits merged output into lines for [`stream`], keeping the last few for errors.
#[derive(Debug, Default)]
struct Lines {
    partial: Vec<u8>,
    last: Vec<String>,
}

impl Lines {
    fn push(&mut self, bytes: &[u8], progress: &mut dyn FnMut(&str)) {
        let mut rest = bytes;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            self.partial.extend_from_slice(&rest[..i]);
            let line = std::mem::take(&mut self.partial);
            self.emit(&line, progress);
            rest = &rest[i + 1..];
        }
        self.partial.extend_from_slice(rest);
    }

    fn finish(&mut self, progress: &mut dyn FnMut(&str)) {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.emit(&line, progress);
        }
    }

    fn emit(&mut self, line: &[u8], progress: &mut dyn FnMut(&str)) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let text = String::from_utf8_lossy(line);
        progress(&text);
        if self.last.len() == TAIL_LINES {
            self.last.remove(0);
        }
        self.last.push(text.into_owned());
    }
}

/// [`supervise`] with stdout and stderr already pointed at the write end of `reader`'s pipe.
fn supervise_merged(
    cmd: Command,
    reader: PipeReader,
    line: &str,
    timeout: Duration,
    sink: &mut dyn FnMut(&[u8]),
) -> Result<End, BackendError> {
    let mut job = Job::spawn(cmd, line)?;
    job.outputs.push((Pipe::Stdout, Box::new(reader)));
    job.supervise(timeout, None, &mut |_, bytes| sink(bytes))
}

/// Spawns `cmd` and supervises it: see [`Job::supervise`].
fn supervise(
    cmd: Command,
    line: &str,
    timeout: Duration,
    lifeline: Option<&LifelineEnd>,
    sink: &mut dyn FnMut(Pipe, &[u8]),
) -> Result<End, BackendError> {
    let mut job = Job::spawn(cmd, line)?;
    if let Some(out) = job.child.as_mut().and_then(|c| c.stdout.take()) {
        job.outputs.push((Pipe::Stdout, Box::new(out)));
    }
    if let Some(err) = job.child.as_mut().and_then(|c| c.stderr.take()) {
        job.outputs.push((Pipe::Stderr, Box::new(err)));
    }
    job.supervise(timeout, lifeline, sink)
}

/// A pipe the helper writes to.
trait Source: Read + AsRawFd {}
impl<T: Read + AsRawFd> Source for T {}

/// A running helper: the leader of its own process group, not yet reaped. Dropping it kills
/// the group and reaps the leader.
struct Job {
    /// `None` once reaped (or handed to a background reaper).
    child: Option<Child>,
    /// The leader's pid, which is also the group's id. It cannot be reused while the leader
    /// is unreaped, so signalling it is safe until then.
    pid: libc::pid_t,
    /// Readable once the leader has exited (not yet reaped).
    exited: PipeReader,
    outputs: Vec<(Pipe, Box<dyn Source>)>,
    line: String,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("pid", &self.pid)
            .field("line", &self.line)
            .finish_non_exhaustive()
    }
}

impl Job {
    /// Spawns `cmd` with stdin from `/dev/null`, in a new process group, armed with the
    /// parent-death signal.
    fn spawn(mut cmd: Command, line: &str) -> Result<Self, BackendError> {
        let io_err = |e| BackendError::io("run", PathBuf::from(line), e);
        let parent = Parent::this()?;
        cmd.stdin(Stdio::null()).process_group(0);
        // SAFETY: the closure runs in the forked child before exec, where only
        // async-signal-safe functions may be called: `arm_parent_death` calls prctl (or
        // procctl), poll or getppid, and _exit, and allocates nothing (`last_os_error` does
        // not).
        unsafe {
            cmd.pre_exec(move || arm_parent_death(&parent));
        }
        #[cfg(target_os = "linux")]
        let own_namespace = pid_namespace::ForChildren::enter();
        let spawned = cmd.spawn();
        #[cfg(target_os = "linux")]
        drop(own_namespace);
        let mut child = spawned.map_err(io_err)?;
        // Dropping `cmd` closes our copies of the pipes' write ends handed to the child.
        drop(cmd);
        let watched = libc::pid_t::try_from(child.id())
            .map_err(io::Error::other)
            .and_then(|pid| Ok((pid, watch_exit(pid)?)));
        match watched {
            Ok((pid, exited)) => Ok(Self {
                child: Some(child),
                pid,
                exited,
                outputs: Vec::new(),
                line: line.to_owned(),
            }),
            Err(e) => {
                // Without the watcher it cannot be supervised; it is still unreaped, so
                // `Child::kill` reaches the right process.
                let _ = child.kill();
                let _ = child.wait();
                Err(io_err(e))
            }
        }
    }

    /// Copies the helper's output to `sink` until it exits, `timeout` passes or `lifeline`
    /// is cut; then kills what is left of its process group and reaps it.
    fn supervise(
        &mut self,
        timeout: Duration,
        lifeline: Option<&LifelineEnd>,
        sink: &mut dyn FnMut(Pipe, &[u8]),
    ) -> Result<End, BackendError> {
        let line = self.line.clone();
        let io_err = |e| BackendError::io("supervise", PathBuf::from(&line), e);
        // A timeout too large to add is no timeout.
        let deadline = Instant::now().checked_add(timeout);
        let mut open = vec![true; self.outputs.len()];
        let mut buf = vec![0u8; 64 * 1024];
        let killed = loop {
            let wait = match deadline.map(|d| d.saturating_duration_since(Instant::now())) {
                Some(Duration::ZERO) => break Some(Why::TimedOut(timeout)),
                wait => wait,
            };
            let mut fds = vec![
                pollfd(self.exited.as_raw_fd()),
                pollfd(lifeline.map_or(-1, |l| l.0.as_raw_fd())),
            ];
            fds.extend(self.output_fds(&open));
            if poll(&mut fds, wait).map_err(io_err)? == 0 {
                continue;
            }
            for (i, fd) in fds[2..].iter().enumerate() {
                if fd.revents != 0 {
                    open[i] = self.read_once(i, &mut buf, sink);
                }
            }
            if fds[1].revents != 0 {
                break Some(Why::Abandoned);
            }
            if fds[0].revents != 0 {
                break None;
            }
        };
        // After an exit this sweeps up whatever the helper left running in its group; after
        // a timeout or abandonment it is the kill itself.
        self.kill_group();
        // The leader's output is all in the pipes now (it exited, or everything in its group
        // is dying), so what is buffered is read without waiting for an EOF that a process
        // outside the group could hold back; bounded in case such a process keeps writing.
        let drain_until = Instant::now() + KILL_GRACE;
        while open.iter().any(|&o| o) && Instant::now() < drain_until {
            let mut fds = self.output_fds(&open);
            if poll(&mut fds, Some(Duration::ZERO)).map_err(io_err)? == 0 {
                break;
            }
            for (i, fd) in fds.iter().enumerate() {
                if fd.revents != 0 {
                    open[i] = self.read_once(i, &mut buf, sink);
                }
            }
        }
        let status = self.reap().map_err(io_err)?;
        Ok(match (killed, status) {
            (None, Some(status)) => End::Exited(status),
            (Some(why), _) => End::Killed(why),
            // Cannot happen: an exited leader is reaped at once.
            (None, None) => End::Killed(Why::TimedOut(timeout)),
        })
    }

    /// A pollfd per output, `-1` (ignored by poll) for those at EOF.
    fn output_fds(&self, open: &[bool]) -> Vec<libc::pollfd> {
        self.outputs
            .iter()
            .zip(open)
            .map(|((_, s), &o)| pollfd(if o { s.as_raw_fd() } else { -1 }))
            .collect()
    }

    /// Reads what output `i` has ready into `sink`; whether it is still open.
    fn read_once(&mut self, i: usize, buf: &mut [u8], sink: &mut dyn FnMut(Pipe, &[u8])) -> bool {
        let (from, source) = &mut self.outputs[i];
        // poll said readable (or hung up), so this read does not block.
        match source.read(buf) {
            Ok(0) => false,
            Ok(n) => {
                sink(*from, &buf[..n]);
                true
            }
            Err(e) => e.kind() == io::ErrorKind::Interrupted,
        }
    }

    /// Sends SIGKILL to the helper's process group, and to the leader itself in case it
    /// moved to another group.
    fn kill_group(&self) {
        if self.child.is_none() {
            return;
        }
        // SAFETY: kill touches no memory. The leader is not reaped yet, so `pid` still names
        // it and the group it leads; no other process can have that id.
        unsafe {
            libc::kill(-self.pid, libc::SIGKILL);
            libc::kill(self.pid, libc::SIGKILL);
        }
    }

    /// Waits for the (exited or killed) leader and reaps it. `None` if it did not die within
    /// [`KILL_GRACE`]: it is then left to a background thread to reap.
    fn reap(&mut self) -> io::Result<Option<ExitStatus>> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        let mut fds = [pollfd(self.exited.as_raw_fd())];
        if poll(&mut fds, Some(KILL_GRACE))? == 0 {
            tracing::warn!(command = %self.line, pid = self.pid, "helper survived SIGKILL; leaving it to a background reaper");
            std::thread::spawn(move || child.wait());
            return Ok(None);
        }
        child.wait().map(Some)
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        // Only does something after an early return or a panic in the sink.
        self.kill_group();
        let _ = self.reap();
    }
}

/// The gateway as a helper between fork and exec sees it, to tell whether it still lives.
/// On Linux a pidfd: a helper that is PID 1 of its own namespace sees 0 from `getppid`, so
/// it cannot compare pids. Elsewhere its pid.
#[derive(Debug)]
struct Parent {
    #[cfg(target_os = "linux")]
    pidfd: std::os::fd::OwnedFd,
    #[cfg(not(target_os = "linux"))]
    pid: libc::pid_t,
}

impl Parent {
    fn this() -> Result<Self, BackendError> {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::FromRawFd;
            // SAFETY: pidfd_open on our own pid with no flags; it returns a new
            // close-on-exec fd or -1.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0u32) };
            match RawFd::try_from(fd) {
                Ok(fd) if fd >= 0 => Ok(Self {
                    // SAFETY: the fd was just created and is owned by nobody else.
                    pidfd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) },
                }),
                _ => Err(BackendError::io(
                    "open a pidfd of",
                    "this process",
                    io::Error::last_os_error(),
                )),
            }
        }
        #[cfg(not(target_os = "linux"))]
        {
            // SAFETY: getpid has no preconditions and cannot fail.
            Ok(Self {
                pid: unsafe { libc::getpid() },
            })
        }
    }

    /// Whether the gateway has exited. Async-signal-safe.
    fn is_gone(&self) -> bool {
        #[cfg(target_os = "linux")]
        {
            // A pidfd polls readable once its process has exited.
            let mut pfd = pollfd(self.pidfd.as_raw_fd());
            // SAFETY: polls one fd we own without waiting.
            unsafe { libc::poll(&mut pfd, 1, 0) != 0 }
        }
        #[cfg(not(target_os = "linux"))]
        {
            // SAFETY: getppid has no preconditions and cannot fail.
            unsafe { libc::getppid() != self.pid }
        }
    }
}

/// Runs in the forked child between fork and exec: arms SIGKILL on the parent's death,
/// then makes sure the parent had not died already (before the signal was armed).
fn arm_parent_death(parent: &Parent) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_PDEATHSIG takes a signal number and reads no memory of ours.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    #[cfg(target_os = "freebsd")]
    {
        let mut signal: libc::c_int = libc::SIGKILL;
        // SAFETY: PROC_PDEATHSIG_CTL on the calling process (id 0) reads one c_int through
        // the pointer, which is valid for the whole call.
        let rc = unsafe {
            libc::procctl(
                libc::P_PID,
                0,
                libc::PROC_PDEATHSIG_CTL,
                std::ptr::from_mut(&mut signal).cast(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    if parent.is_gone() {
        // The parent died before the signal was armed, so it will never fire: nobody is
        // left to wait for this helper.
        // SAFETY: _exit ends this forked child at once, running nothing of the parent's.
        unsafe { libc::_exit(127) };
    }
    Ok(())
}

/// Starts a thread that waits until the child `pid` has exited, without reaping it, and
/// then makes the returned pipe readable.
fn watch_exit(pid: libc::pid_t) -> io::Result<PipeReader> {
    // `id_t` is u32 on Linux and i64 on FreeBSD, so this cannot fail on one of them.
    #[allow(clippy::unnecessary_fallible_conversions)]
    let id = libc::id_t::try_from(pid).map_err(io::Error::other)?;
    let (reader, mut writer) = io::pipe()?;
    std::thread::Builder::new()
        .name("coppice-helper-exit".into())
        .spawn(move || {
            loop {
                // SAFETY: siginfo_t is plain data for which all zeroes is a valid value.
                let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
                // SAFETY: waitid writes only into `info`. WNOWAIT leaves the child
                // unreaped, so its pid stays valid for the supervising thread's kill.
                let rc = unsafe {
                    libc::waitid(libc::P_PID, id, &mut info, libc::WEXITED | libc::WNOWAIT)
                };
                if rc == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                    break;
                }
            }
            // A byte rather than a hang-up: a process forked elsewhere in the gateway may
            // briefly hold a copy of the write end.
            let _ = writer.write_all(&[1]);
        })?;
    Ok(reader)
}

/// The PID namespace a helper is the first process of (Linux).
#[cfg(target_os = "linux")]
mod pid_namespace {
    use std::fs::File;
    use std::os::fd::AsRawFd;

    /// While held, children forked by this thread start a new PID namespace; dropping it
    /// puts the thread back, so later forks from it (a blocking-pool thread runs anything)
    /// land where they always did.
    #[derive(Debug)]
    pub(super) struct ForChildren {
        /// This thread's namespace for children before [`ForChildren::enter`].
        before: File,
    }

    impl ForChildren {
        /// `None` where a PID namespace cannot be made (not root, or a kernel without
        /// them): the helper then runs in the gateway's, and only its process group and
        /// parent-death signal guard it.
        pub(super) fn enter() -> Option<Self> {
            let before = File::open("/proc/thread-self/ns/pid_for_children").ok()?;
            // SAFETY: unshare with one flag; it changes only where this thread's next
            // children go.
            if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
                return None;
            }
            Some(Self { before })
        }
    }

    impl Drop for ForChildren {
        fn drop(&mut self) {
            // SAFETY: setns to the namespace this thread's children went to before: our
            // own active PID namespace, which setns always accepts for root.
            let rc = unsafe { libc::setns(self.before.as_raw_fd(), libc::CLONE_NEWPID) };
            assert_eq!(
                rc,
                0,
                "restoring this thread's PID namespace for children: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// `poll(2)` for at most `wait` (`None`: no limit); retries on EINTR. Returns how many fds
/// are ready.
fn poll(fds: &mut [libc::pollfd], wait: Option<Duration>) -> io::Result<usize> {
    // Rounded up, so a wait never ends just before the deadline it aims for.
    let ms = wait.map_or(-1, |w| {
        i32::try_from(w.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
    });
    let n = libc::nfds_t::try_from(fds.len()).map_err(io::Error::other)?;
    loop {
        // SAFETY: `fds` is a valid, exclusively borrowed array of `n` pollfd structs.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), n, ms) };
        match usize::try_from(rc) {
            Ok(ready) => return Ok(ready),
            Err(_) => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::zfs::{CommandRunner, SystemRunner};

    /// Set in the environment of the copy of this test binary that plays the parent who
    /// dies in [`a_helper_dies_with_its_parent`].
    const DYING_PARENT: &str = "COPPICE_TEST_DYING_PARENT";

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script);
        cmd
    }

    /// Polls `done` until it holds, for at most 30 s; whether it held.
    #[allow(clippy::disallowed_methods)] // A plain test thread, not a tokio worker.
    fn eventually(mut done: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if done() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        done()
    }

    /// `/proc/<pid>/stat`'s state and process group, `None` if there is no such process.
    fn stat(pid: &str) -> Option<(char, libc::pid_t)> {
        let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let mut fields = text.rsplit_once(')')?.1.split_whitespace();
        let state = fields.next()?.chars().next()?;
        let pgrp = fields.nth(1)?.parse().ok()?;
        Some((state, pgrp))
    }

    /// Whether `pid` is gone or a zombie. Zombies count as dead: an orphan killed here is
    /// reparented to PID 1, and on some hosts (this one's init) PID 1 never reaps.
    fn dead(pid: libc::pid_t) -> bool {
        stat(&pid.to_string()).is_none_or(|(state, _)| state == 'Z')
    }

    /// Whether no live (non-zombie) process is left in the group `pgid`.
    fn group_dead(pgid: libc::pid_t) -> bool {
        // SAFETY: signal 0 only checks whether the group has members.
        if unsafe { libc::kill(-pgid, 0) } == -1 {
            return io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        }
        fs::read_dir("/proc").unwrap().all(|e| {
            stat(&e.unwrap().file_name().to_string_lossy())
                .is_none_or(|(state, pgrp)| pgrp != pgid || state == 'Z')
        })
    }

    /// Asserts that the group `pgid` dies, killing it first if not (no `sleep 600` is left
    /// behind by a failing test).
    fn assert_group_dies(pgid: libc::pid_t) {
        let died = eventually(|| group_dead(pgid));
        if !died {
            // SAFETY: kill touches no memory; the group has live members, just observed.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
        assert!(died, "group {pgid} lives");
    }

    /// Sets `$me` to the shell's pid as the host sees it: `$$` is its pid inside the
    /// helper's own PID namespace (1).
    const ME: &str = "read -r me _ < /proc/self/stat; ";

    /// Shell that starts `sleep 600` in the background (in a session of its own when
    /// `escape`, so out of the helper's process group) and sets `$bg` to its host pid,
    /// passed through `file`.
    fn background(file: &std::path::Path, escape: bool) -> String {
        let setsid = if escape { "setsid " } else { "" };
        format!(
            "{setsid}sh -c 'read -r b _ < /proc/self/stat; echo $b > {f}.tmp; mv {f}.tmp {f}; \
             exec sleep 600' & while [ ! -s {f} ]; do sleep 0.01; done; read -r bg < {f}; ",
            f = file.display()
        )
    }

    fn pids(text: &str) -> Vec<libc::pid_t> {
        text.split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect()
    }

    #[test]
    fn a_helper_that_outlives_its_timeout_is_killed_with_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let bg = background(&dir.path().join("bg"), false);
        let r = output(
            sh(&format!("{ME}{bg}echo $me $bg >&2; sleep 600")),
            Duration::from_secs(3),
            None,
        );
        let Err(BackendError::Command { status, stderr, .. }) = r else {
            panic!("not a timeout: {r:?}");
        };
        assert_eq!(status, "SIGKILL, timed out after 3 s");
        let [leader, background] = pids(&stderr)[..] else {
            panic!("no pids in {stderr:?}");
        };
        assert_group_dies(leader);
        assert!(dead(background), "background sleep {background} lives");
    }

    #[test]
    fn what_an_exited_helper_leaves_in_its_group_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let bg = background(&dir.path().join("bg"), false);
        let script = format!("{ME}{bg}echo $me $bg");
        let out = output(sh(&script), Duration::from_secs(60), None).unwrap();
        assert!(out.status.success(), "{out:?}");
        let [leader, background] = pids(&String::from_utf8_lossy(&out.stdout))[..] else {
            panic!("no pids in {out:?}");
        };
        assert_group_dies(leader);
        assert!(dead(background));
    }

    /// A descendant that left the helper's process group (a daemon dpkg starts, say) is out
    /// of reach of the group kill, but not of its PID namespace's end.
    #[test]
    fn what_an_exited_helper_leaves_outside_its_group_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let bg = background(&dir.path().join("bg"), true);
        let script = format!("{ME}{bg}echo $me $bg");
        let out = output(sh(&script), Duration::from_secs(60), None).unwrap();
        assert!(out.status.success(), "{out:?}");
        let [leader, escaped] = pids(&String::from_utf8_lossy(&out.stdout))[..] else {
            panic!("no pids in {out:?}");
        };
        assert_ne!(stat(&escaped.to_string()).map(|s| s.1), Some(leader));
        let died = eventually(|| dead(escaped));
        if !died {
            // SAFETY: kill touches no memory; `escaped` is the live sleep just observed.
            unsafe { libc::kill(escaped, libc::SIGKILL) };
        }
        assert!(
            died,
            "{escaped}, which left the helper's group, outlived it"
        );
    }

    #[test]
    fn output_keeps_stdout_and_stderr_apart_however_long() {
        // More than a pipe buffer on each, so a reader that drained one pipe at a time
        // would deadlock.
        let out = output(
            sh("head -c 300000 /dev/zero | tr '\\0' o; head -c 300000 /dev/zero | tr '\\0' e >&2; exit 3"),
            Duration::from_secs(60),
            None,
        )
        .unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert!(out.stdout.len() == 300_000 && out.stdout.iter().all(|&b| b == b'o'));
        assert!(out.stderr.len() == 300_000 && out.stderr.iter().all(|&b| b == b'e'));
    }

    #[test]
    fn run_reports_the_status_and_the_tail_of_stderr() {
        let r = run(
            sh("echo out; for i in $(seq 1 20); do echo err $i >&2; done; exit 4"),
            Duration::from_secs(60),
        );
        let Err(BackendError::Command {
            command,
            status,
            stderr,
        }) = r
        else {
            panic!("{r:?}");
        };
        assert!(command.starts_with("sh -c echo out;"), "{command}");
        assert_eq!(status, "exit status: 4");
        assert!(
            stderr.starts_with("err 13\n") && stderr.ends_with("err 20"),
            "{stderr}"
        );
        run(sh("true"), Duration::from_secs(60)).unwrap();
    }

    #[test]
    fn a_missing_program_is_an_io_error() {
        let r = run(
            Command::new("/nonexistent/coppice-helper"),
            Duration::from_secs(60),
        );
        assert!(
            matches!(r, Err(BackendError::Io { op: "run", .. })),
            "{r:?}"
        );
    }

    #[test]
    fn stream_delivers_merged_lines_in_order() {
        let mut lines = Vec::new();
        stream(
            sh("for i in $(seq 1 300); do echo out $i; echo err $i >&2; done; printf 'no newline'"),
            Duration::from_secs(60),
            &mut |l| lines.push(l.to_owned()),
        )
        .unwrap();
        let expected: Vec<String> = (1..=300)
            .flat_map(|i| [format!("out {i}"), format!("err {i}")])
            .chain(["no newline".to_owned()])
            .collect();
        assert_eq!(lines, expected);
    }

    #[test]
    fn stream_reports_the_last_lines() {
        let r = stream(
            sh("for i in $(seq 1 20); do echo line $i; done; exit 2"),
            Duration::from_secs(60),
            &mut |_| {},
        );
        let Err(BackendError::Command { status, stderr, .. }) = r else {
            panic!("{r:?}");
        };
        assert_eq!(status, "exit status: 2");
        assert!(
            stderr.starts_with("line 13\n") && stderr.ends_with("line 20"),
            "{stderr}"
        );
        let r = stream(
            sh("exec sleep 600"),
            Duration::from_millis(300),
            &mut |_| {},
        );
        assert!(
            matches!(&r, Err(BackendError::Command { status, .. }) if status == "SIGKILL, timed out after 300 ms"),
            "{r:?}"
        );
    }

    #[test]
    fn a_panicking_progress_callback_kills_the_helper() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!(
            "{ME}echo $me > {}; echo go; exec sleep 600",
            pidfile.display()
        );
        let r = std::panic::catch_unwind(move || {
            stream(sh(&script), Duration::from_secs(600), &mut |_| {
                panic!("callback")
            })
        });
        let payload = r.unwrap_err();
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"callback"));
        let pid = fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Reaped by the unwinding, so gone at once.
        assert!(dead(pid), "helper {pid} lives");
    }

    #[tokio::test]
    async fn dropping_the_runner_future_kills_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!("{ME}echo $me > {}; exec sleep 600", pidfile.display());
        let mut run = Box::pin(SystemRunner.run(
            vec!["sh".into(), "-c".into(), script],
            Duration::from_secs(600),
        ));
        let deadline = Instant::now() + Duration::from_secs(30);
        let pid: libc::pid_t = loop {
            assert!(Instant::now() < deadline, "the command never started");
            tokio::select! {
                r = &mut run => panic!("it finished: {r:?}"),
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
            let text = fs::read_to_string(&pidfile).unwrap_or_default();
            if text.ends_with('\n') {
                break text.trim().parse().unwrap();
            }
        };
        drop(run);
        assert!(
            eventually(|| dead(pid)),
            "command {pid} outlived its future"
        );
    }

    #[tokio::test]
    async fn the_runner_times_out() {
        let r = SystemRunner
            .run(
                vec!["sh".into(), "-c".into(), "exec sleep 600".into()],
                Duration::from_millis(300),
            )
            .await;
        assert!(
            matches!(&r, Err(BackendError::Command { status, .. }) if status.contains("timed out")),
            "{r:?}"
        );
        let out = SystemRunner
            .run(
                vec![
                    "sh".into(),
                    "-c".into(),
                    "echo hi; echo ho >&2; exit 1".into(),
                ],
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        assert_eq!(
            (out.success, out.stdout.as_str(), out.stderr.as_str()),
            (false, "hi\n", "ho\n")
        );
    }

    /// Re-runs this test binary as a parent that starts a helper and dies abruptly (as a
    /// SIGKILLed gateway would, running no destructor); the kernel must then kill the
    /// helper, and what the helper started, even outside its process group.
    #[test]
    #[allow(clippy::print_stdout)] // The dying parent reports the helper's pid on stdout.
    fn a_helper_dies_with_its_parent() {
        if let Some(dir) = std::env::var_os(DYING_PARENT) {
            let bg = background(&std::path::Path::new(&dir).join("bg"), true);
            let r = stream(
                sh(&format!("{ME}{bg}echo $me $bg; exec sleep 600")),
                Duration::from_secs(600),
                &mut |line| {
                    println!("helper pid {line}");
                    let _ = io::stdout().flush();
                    // SAFETY: ends this process at once; nothing of it runs afterwards.
                    unsafe { libc::_exit(0) };
                },
            );
            panic!("the helper ended first: {r:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "command::tests::a_helper_dies_with_its_parent",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(DYING_PARENT, dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        // The test harness prints the test's name on the same line.
        let reported = stdout
            .split("helper pid ")
            .nth(1)
            .unwrap_or_else(|| panic!("no pids from the dying parent: {out:?}"));
        let found: Vec<libc::pid_t> = reported
            .split_whitespace()
            .take(2)
            .map(|p| p.parse().unwrap())
            .collect();
        let [helper, escaped] = found[..] else {
            panic!("no pids from the dying parent: {out:?}");
        };
        for (pid, what) in [
            (helper, "helper"),
            (escaped, "what it started outside its group"),
        ] {
            let died = eventually(|| dead(pid));
            if !died {
                // SAFETY: kill touches no memory; `pid` is the live process just observed.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            assert!(died, "{what} ({pid}) outlived the helper's parent");
        }
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let text: String = (0..20).map(|i| format!("line {i}\n")).collect();
        let t = tail(&text);
        assert!(t.starts_with("line 12"), "{t}");
        assert!(t.ends_with("line 19"), "{t}");
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human(Duration::from_millis(300)), "300 ms");
        assert_eq!(human(Duration::from_secs(10)), "10 s");
        assert_eq!(human(INSTALL), "30 min");
    }
}
