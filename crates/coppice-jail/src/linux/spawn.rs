//! Creating a sandbox's PID 1: a fork-like `clone` into new namespaces, then a precomputed
//! plan of mounts and credential changes, then `execve`.
//!
//! The gateway is multi-threaded, so the child may only make async-signal-safe calls: every
//! string, pointer array and filter is built in the parent ([`Plan`]) and the child just walks
//! it with raw system calls — no allocation, no locks, no unwinding. Parent and child talk over
//! a `SOCK_SEQPACKET` pair:
//!
//! 1. parent → `G` once the child sits in its cgroups (so its cgroup namespace is rooted there);
//! 2. child, now pivoted into its root, unshares its user namespace and sends `U`;
//! 3. parent writes `uid_map`/`gid_map` and answers `M`;
//! 4. the child's end is close-on-exec, so end-of-file means `execve` succeeded; on failure
//!    the child sends `E` + step + errno and exits.
//!
//! Everything that needs host privileges (mounts, device nodes, hostname, loopback) happens
//! before the user namespace is entered, so the sandbox's root owns none of the mount, pid,
//! network, uts or ipc namespaces and cannot remount, reconfigure or escape them.
//!
//! A child never outlives a parent that dies before its `execve`: its first act is to arm
//! `PR_SET_PDEATHSIG(SIGKILL)` and close every descriptor but the three it needs (so it holds
//! none of the gateway's listener, database, logs or client sockets, nor the handshake sockets
//! of sandboxes started beside it, even for an instant), then to check the parent through a
//! pidfd, in case it died before the `prctl`. Changing credentials disarms the signal, so the
//! parent is checked again after becoming sandbox root; from there to `execve` the child only
//! drops privileges. A parent gone in that last stretch leaves a sandbox that has no record,
//! which the next start removes as an orphan. Once init runs, the signal is off: a sandbox
//! outlives the gateway by design and is re-adopted.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use coppice_lifecycle::backend::{BackendError, BindMount, JailSpec, RootfsSpec};

use crate::linux::seccomp;

/// Longest overlayfs option string the kernel accepts in one page, with margin.
const MAX_MOUNT_DATA: usize = 4000;
/// How long setup may take before the parent gives up on the child.
const SETUP_TIMEOUT: Duration = Duration::from_secs(20);

/// Capabilities a sandbox's root keeps in its bounding set (Docker's default set): enough
/// for package managers, sudo and servers, nothing that administers the machine.
const KEPT_CAPS: [u32; 14] = [
    0,  // CAP_CHOWN
    1,  // CAP_DAC_OVERRIDE
    3,  // CAP_FOWNER
    4,  // CAP_FSETID
    5,  // CAP_KILL
    6,  // CAP_SETGID
    7,  // CAP_SETUID
    8,  // CAP_SETPCAP
    10, // CAP_NET_BIND_SERVICE
    13, // CAP_NET_RAW
    18, // CAP_SYS_CHROOT
    27, // CAP_MKNOD
    29, // CAP_AUDIT_WRITE
    31, // CAP_SETFCAP
];

/// One filesystem operation of the plan, run by the child before `pivot_root`.
#[derive(Debug)]
enum Step {
    Mkdir {
        path: CString,
        mode: libc::mode_t,
    },
    Touch {
        path: CString,
    },
    Mount {
        source: Option<CString>,
        target: CString,
        fstype: Option<CString>,
        flags: libc::c_ulong,
        data: Option<CString>,
    },
    Mknod {
        path: CString,
        major: u32,
        minor: u32,
    },
    Chown {
        path: CString,
    },
    Symlink {
        target: CString,
        link: CString,
    },
}

impl Step {
    fn describe(&self) -> String {
        let s = |c: &CString| c.to_string_lossy().into_owned();
        match self {
            Step::Mkdir { path, .. } => format!("mkdir {}", s(path)),
            Step::Touch { path } => format!("create mount point {}", s(path)),
            Step::Mount { target, fstype, .. } => format!(
                "mount {} at {}",
                fstype.as_ref().map_or_else(|| "bind".to_owned(), s),
                s(target)
            ),
            Step::Mknod { path, .. } => format!("mknod {}", s(path)),
            Step::Chown { path } => format!("chown {}", s(path)),
            Step::Symlink { link, .. } => format!("symlink {}", s(link)),
        }
    }
}

/// Fixed stages after the plan's steps, numbered after them in error reports.
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
enum Stage {
    ParentGone,
    WaitCgroup,
    UnshareCgroup,
    Hostname,
    Loopback,
    PivotRoot,
    UnshareUser,
    WaitMaps,
    SetIds,
    DropCaps,
    Stdio,
    Chdir,
    Seccomp,
    Exec,
}

impl Stage {
    const ALL: [Stage; 14] = [
        Stage::ParentGone,
        Stage::WaitCgroup,
        Stage::UnshareCgroup,
        Stage::Hostname,
        Stage::Loopback,
        Stage::PivotRoot,
        Stage::UnshareUser,
        Stage::WaitMaps,
        Stage::SetIds,
        Stage::DropCaps,
        Stage::Stdio,
        Stage::Chdir,
        Stage::Seccomp,
        Stage::Exec,
    ];

    fn describe(self) -> &'static str {
        match self {
            Stage::ParentGone => "check that the parent lives",
            Stage::WaitCgroup => "wait for cgroup placement",
            Stage::UnshareCgroup => "unshare cgroup namespace",
            Stage::Hostname => "set hostname",
            Stage::Loopback => "join the network namespace or bring up loopback",
            Stage::PivotRoot => "pivot_root",
            Stage::UnshareUser => "unshare user namespace",
            Stage::WaitMaps => "wait for uid/gid maps",
            Stage::SetIds => "become sandbox root",
            Stage::DropCaps => "drop capabilities",
            Stage::Stdio => "set up stdio",
            Stage::Chdir => "chdir to init cwd",
            Stage::Seccomp => "install seccomp filter",
            Stage::Exec => "exec init",
        }
    }
}

/// Everything the child needs, prepared in the parent.
#[derive(Debug)]
pub(crate) struct Plan {
    root: CString,
    steps: Vec<Step>,
    hostname: CString,
    program: CString,
    cwd: CString,
    // Owners of the strings the pointer arrays point into.
    _argv: Vec<CString>,
    _envp: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    filter: Vec<libc::sock_filter>,
    drop_caps: Vec<libc::c_ulong>,
    log_fd: OwnedFd,
    /// The network namespace to join, opened in the parent; `None` gives the child a new
    /// one with only `lo`.
    netns: Option<OwnedFd>,
    /// Host uid/gid of sandbox root and the size of the mapped range.
    uid_base: u32,
    uid_count: u32,
}

// SAFETY: the raw pointers in `argv`/`envp` point into the `CString`s owned by the same plan,
// which are never mutated; moving the plan between threads keeps them valid.
unsafe impl Send for Plan {}

fn cstr(path: impl AsRef<OsStr>) -> Result<CString, BackendError> {
    CString::new(path.as_ref().as_bytes()).map_err(|_| BackendError::InvalidSpec {
        field: "path",
        reason: format!("{:?} contains a NUL byte", path.as_ref()),
    })
}

fn absolute(field: &'static str, p: &Path) -> Result<(), BackendError> {
    if p.is_absolute() && !p.components().any(|c| c.as_os_str() == "..") {
        Ok(())
    } else {
        Err(BackendError::InvalidSpec {
            field,
            reason: format!("{} is not an absolute path without '..'", p.display()),
        })
    }
}

/// Overlay option strings separate with `:` and `,`; paths containing them are refused.
fn overlay_path(p: &Path) -> Result<String, BackendError> {
    let s = p.to_str().ok_or_else(|| BackendError::InvalidSpec {
        field: "rootfs",
        reason: format!("{} is not UTF-8", p.display()),
    })?;
    if s.contains([':', ',', '\\']) {
        return Err(BackendError::InvalidSpec {
            field: "rootfs",
            reason: format!("{s} contains ':', ',' or '\\', which overlayfs options cannot carry"),
        });
    }
    Ok(s.to_owned())
}

fn must_exist(field: &'static str, p: &Path) -> Result<(), BackendError> {
    if p.exists() {
        Ok(())
    } else {
        Err(BackendError::InvalidSpec {
            field,
            reason: format!("{} does not exist", p.display()),
        })
    }
}

impl Plan {
    /// Validates `spec` and builds the child's plan; `root` is an empty host directory to
    /// mount the sandbox root on (inside the sandbox's mount namespace only).
    pub(crate) fn new(
        spec: &JailSpec,
        root: &Path,
        log_fd: OwnedFd,
        uid_base: u32,
        uid_count: u32,
    ) -> Result<Self, BackendError> {
        let inside = |p: &Path| -> Result<CString, BackendError> {
            cstr(root.join(p.strip_prefix("/").unwrap_or(p)))
        };
        let netns = spec.network.as_deref().map(open_netns).transpose()?;
        let mut steps = vec![Step::Mount {
            source: None,
            target: cstr("/")?,
            fstype: None,
            flags: libc::MS_REC | libc::MS_PRIVATE,
            data: None,
        }];
        match &spec.rootfs {
            RootfsSpec::Overlay { lower, upper, work } => {
                if lower.is_empty() {
                    return Err(BackendError::InvalidSpec {
                        field: "rootfs",
                        reason: "an overlay needs at least one lower layer".into(),
                    });
                }
                let mut lowers = Vec::with_capacity(lower.len());
                for l in lower {
                    absolute("rootfs", l)?;
                    must_exist("rootfs", l)?;
                    lowers.push(overlay_path(l)?);
                }
                for p in [upper, work] {
                    absolute("rootfs", p)?;
                    must_exist("rootfs", p)?;
                }
                let data = format!(
                    "lowerdir={},upperdir={},workdir={}",
                    lowers.join(":"),
                    overlay_path(upper)?,
                    overlay_path(work)?
                );
                if data.len() > MAX_MOUNT_DATA {
                    return Err(BackendError::InvalidSpec {
                        field: "rootfs",
                        reason: format!(
                            "{} lower layers make {} bytes of overlay options (max {MAX_MOUNT_DATA})",
                            lower.len(),
                            data.len()
                        ),
                    });
                }
                steps.push(Step::Mount {
                    source: Some(cstr("overlay")?),
                    target: cstr(root)?,
                    fstype: Some(cstr("overlay")?),
                    flags: 0,
                    data: Some(cstr(data)?),
                });
            }
            RootfsSpec::Directory(dir) => {
                absolute("rootfs", dir)?;
                must_exist("rootfs", dir)?;
                steps.push(Step::Mount {
                    source: Some(cstr(dir)?),
                    target: cstr(root)?,
                    fstype: None,
                    flags: libc::MS_BIND | libc::MS_REC,
                    data: None,
                });
            }
        }
        for m in &spec.mounts {
            bind_steps(&mut steps, m, &inside)?;
        }
        // /proc, then a minimal /dev owned by sandbox root.
        let owner = format!("uid={uid_base},gid={uid_base}");
        steps.push(Step::Mkdir {
            path: inside(Path::new("/proc"))?,
            mode: 0o555,
        });
        steps.push(Step::Mount {
            source: Some(cstr("proc")?),
            target: inside(Path::new("/proc"))?,
            fstype: Some(cstr("proc")?),
            flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            data: None,
        });
        let dev = |p: &str| inside(&Path::new("/dev").join(p));
        steps.push(Step::Mkdir {
            path: inside(Path::new("/dev"))?,
            mode: 0o755,
        });
        steps.push(Step::Mount {
            source: Some(cstr("tmpfs")?),
            target: inside(Path::new("/dev"))?,
            fstype: Some(cstr("tmpfs")?),
            flags: libc::MS_NOSUID | libc::MS_NOEXEC,
            data: Some(cstr(format!("mode=755,size=1m,{owner}"))?),
        });
        for (name, major, minor) in [
            ("null", 1, 3),
            ("zero", 1, 5),
            ("full", 1, 7),
            ("random", 1, 8),
            ("urandom", 1, 9),
            ("tty", 5, 0),
        ] {
            steps.push(Step::Mknod {
                path: dev(name)?,
                major,
                minor,
            });
            steps.push(Step::Chown { path: dev(name)? });
        }
        steps.push(Step::Mkdir {
            path: dev("pts")?,
            mode: 0o755,
        });
        steps.push(Step::Mount {
            source: Some(cstr("devpts")?),
            target: dev("pts")?,
            fstype: Some(cstr("devpts")?),
            flags: libc::MS_NOSUID | libc::MS_NOEXEC,
            // gid 5 is the tty group inside the sandbox.
            data: Some(cstr(format!(
                "newinstance,ptmxmode=0666,mode=0620,gid={}",
                uid_base + 5
            ))?),
        });
        steps.push(Step::Mkdir {
            path: dev("shm")?,
            mode: 0o1777,
        });
        steps.push(Step::Mount {
            source: Some(cstr("shm")?),
            target: dev("shm")?,
            fstype: Some(cstr("tmpfs")?),
            flags: libc::MS_NOSUID | libc::MS_NODEV,
            data: Some(cstr(format!("mode=1777,size=64m,{owner}"))?),
        });
        for (link, target) in [
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
            ("ptmx", "pts/ptmx"),
        ] {
            steps.push(Step::Symlink {
                target: cstr(target)?,
                link: dev(link)?,
            });
            steps.push(Step::Chown { path: dev(link)? });
        }

        absolute("init program", &spec.init.program)?;
        absolute("init cwd", &spec.init.cwd)?;
        let program = cstr(&spec.init.program)?;
        let mut argv_owned = vec![program.clone()];
        for a in &spec.init.args {
            argv_owned.push(cstr(a)?);
        }
        let mut envp_owned = Vec::with_capacity(spec.init.env.len());
        for (k, v) in &spec.init.env {
            if k.is_empty() || k.contains('=') {
                return Err(BackendError::InvalidSpec {
                    field: "init env",
                    reason: format!("{k:?} is not a valid variable name"),
                });
            }
            envp_owned.push(cstr(format!("{k}={v}"))?);
        }
        let ptrs = |v: &[CString]| -> Vec<*const libc::c_char> {
            v.iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect()
        };
        let last_cap: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(40);
        let drop_caps = (0..=last_cap)
            .filter(|c| !KEPT_CAPS.contains(c))
            .map(libc::c_ulong::from)
            .collect();
        Ok(Self {
            root: cstr(root)?,
            steps,
            hostname: cstr(spec.id.as_str())?,
            program,
            cwd: cstr(&spec.init.cwd)?,
            argv: ptrs(&argv_owned),
            envp: ptrs(&envp_owned),
            _argv: argv_owned,
            _envp: envp_owned,
            filter: seccomp::filter(),
            drop_caps,
            log_fd,
            netns,
            uid_base,
            uid_count,
        })
    }

    fn describe_stage(&self, index: u32) -> String {
        let i = usize::try_from(index).unwrap_or(usize::MAX);
        if let Some(step) = self.steps.get(i) {
            return step.describe();
        }
        Stage::ALL
            .get(i.saturating_sub(self.steps.len()))
            .map_or_else(|| format!("stage {index}"), |s| s.describe().to_owned())
    }

    fn stage_index(&self, stage: Stage) -> u32 {
        u32::try_from(self.steps.len()).unwrap_or(0) + stage as u32
    }
}

/// Adds the steps that make `m` visible at its target.
fn bind_steps(
    steps: &mut Vec<Step>,
    m: &BindMount,
    inside: &impl Fn(&Path) -> Result<CString, BackendError>,
) -> Result<(), BackendError> {
    absolute("mount source", &m.source)?;
    absolute("mount target", &m.target)?;
    let meta = std::fs::metadata(&m.source).map_err(|e| BackendError::InvalidSpec {
        field: "mount source",
        reason: format!("{}: {e}", m.source.display()),
    })?;
    // Create missing parents of the target, then the mount point itself.
    let mut parents: Vec<&Path> = m.target.ancestors().skip(1).collect();
    parents.reverse();
    for p in parents.into_iter().skip(1) {
        steps.push(Step::Mkdir {
            path: inside(p)?,
            mode: 0o755,
        });
    }
    if meta.is_dir() {
        steps.push(Step::Mkdir {
            path: inside(&m.target)?,
            mode: 0o755,
        });
    } else {
        steps.push(Step::Touch {
            path: inside(&m.target)?,
        });
    }
    steps.push(Step::Mount {
        source: Some(cstr(&m.source)?),
        target: inside(&m.target)?,
        fstype: None,
        flags: libc::MS_BIND | libc::MS_REC,
        data: None,
    });
    if m.read_only {
        steps.push(Step::Mount {
            source: None,
            target: inside(&m.target)?,
            fstype: None,
            flags: libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
            data: None,
        });
    }
    Ok(())
}

/// Callbacks the parent runs during the handshake.
pub(crate) trait Handshake {
    /// Puts the child into the sandbox's cgroups.
    fn join_cgroups(&mut self, pid: u32) -> Result<(), BackendError>;
}

/// Starts the child described by `plan` and waits until it has exec'd. Returns its host pid.
pub(crate) fn spawn(
    id: &str,
    plan: &Plan,
    handshake: &mut dyn Handshake,
) -> Result<u32, BackendError> {
    let (parent_end, child_end) = seqpacket_pair()?;
    let parent = own_pidfd()?;
    let mut flags =
        libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
    if plan.netns.is_none() {
        flags |= libc::CLONE_NEWNET;
    }
    // SAFETY: a fork-like clone (no CLONE_VM, no new stack): the child gets a copy of this
    // thread's memory and continues here. It only runs `child_main`, which makes raw,
    // async-signal-safe system calls on data prepared in `plan` and never returns.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            libc::c_ulong::try_from(flags | libc::SIGCHLD).unwrap_or(0),
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if ret == 0 {
        // SAFETY: we are the freshly cloned child; see `child_main`.
        unsafe { child_main(plan, child_end.as_raw_fd(), parent.as_raw_fd()) }
    }
    drop(child_end);
    drop(parent);
    if ret < 0 {
        return Err(BackendError::Start {
            id: id.to_owned(),
            stage: "clone".into(),
            source: io::Error::last_os_error(),
        });
    }
    // Kernel pids fit in pid_t; a value that does not would be a kernel bug.
    let child = libc::pid_t::try_from(ret).unwrap_or(libc::pid_t::MAX);
    let pid = u32::try_from(ret).unwrap_or(0);
    let result = parent_side(id, plan, pid, &parent_end, handshake);
    if result.is_err() {
        // SAFETY: `child` is our child; kill and reap it so nothing is left half-started.
        unsafe {
            libc::kill(child, libc::SIGKILL);
            libc::waitpid(child, std::ptr::null_mut(), 0);
        }
    }
    result.map(|()| pid)
}

fn parent_side(
    id: &str,
    plan: &Plan,
    pid: u32,
    sock: &OwnedFd,
    handshake: &mut dyn Handshake,
) -> Result<(), BackendError> {
    let fail = |stage: String, source: io::Error| BackendError::Start {
        id: id.to_owned(),
        stage,
        source,
    };
    handshake.join_cgroups(pid)?;
    send(sock, b"G").map_err(|e| fail("signal child".into(), e))?;
    let mut buf = [0u8; 16];
    let n = recv(sock, &mut buf).map_err(|e| fail("wait for child".into(), e))?;
    match &buf[..n] {
        [b'U'] => {}
        msg => return Err(child_failure(id, plan, msg, pid)),
    }
    let map = format!("0 {} {}\n", plan.uid_base, plan.uid_count);
    for file in ["uid_map", "gid_map"] {
        let path = format!("/proc/{pid}/{file}");
        std::fs::write(&path, &map).map_err(|e| fail(format!("write {path}"), e))?;
    }
    send(sock, b"M").map_err(|e| fail("signal child".into(), e))?;
    let n = recv(sock, &mut buf).map_err(|e| fail("wait for exec".into(), e))?;
    if n == 0 {
        // End of file: the child's end closed on exec — unless the child died instead.
        let mut status = 0;
        // SAFETY: non-blocking wait on our own child.
        let r = unsafe {
            libc::waitpid(
                libc::pid_t::try_from(pid).unwrap_or(libc::pid_t::MAX),
                &mut status,
                libc::WNOHANG,
            )
        };
        if r == 0 {
            return Ok(());
        }
        return Err(fail(
            "exec init".into(),
            io::Error::other(format!("init exited at once (wait status {status:#x})")),
        ));
    }
    Err(child_failure(id, plan, &buf[..n], pid))
}

fn child_failure(id: &str, plan: &Plan, msg: &[u8], pid: u32) -> BackendError {
    match msg {
        [b'E', rest @ ..] if rest.len() == 8 => {
            let stage = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
            let errno = i32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
            BackendError::Start {
                id: id.to_owned(),
                stage: plan.describe_stage(stage),
                source: io::Error::from_raw_os_error(errno),
            }
        }
        _ => BackendError::Start {
            id: id.to_owned(),
            stage: "setup".into(),
            source: io::Error::other(format!("child {pid} ended its handshake without a report")),
        },
    }
}

fn seqpacket_pair() -> Result<(OwnedFd, OwnedFd), BackendError> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: socketpair writes two fds into the array we own.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(BackendError::io(
            "create socketpair",
            "",
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A pidfd of this process, for a child to tell whether its parent still lives (a child in
/// a new pid namespace sees 0 from `getppid`, so it cannot compare pids). Close-on-exec.
fn own_pidfd() -> Result<OwnedFd, BackendError> {
    // SAFETY: pidfd_open on our own pid with no flags; it returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0u32) };
    match RawFd::try_from(fd) {
        // SAFETY: the fd was just created and is owned by nobody else.
        Ok(fd) if fd >= 0 => Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
        _ => Err(BackendError::io(
            "open a pidfd of",
            "this process",
            io::Error::last_os_error(),
        )),
    }
}

/// Whether the process behind `pidfd` has exited (a pidfd polls readable then).
///
/// # Safety
///
/// Async-signal-safe; `pidfd` must be a pidfd.
unsafe fn has_exited(pidfd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: pidfd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one fd without waiting.
    unsafe { libc::poll(&mut pfd, 1, 0) != 0 }
}

/// The parent's next one-byte message on `sock`; `None` on end-of-file, on an error, when
/// the parent has exited (the other end may live on in a process that inherited it), or when
/// nothing comes within twice the parent's own setup timeout.
///
/// # Safety
///
/// Async-signal-safe; only for the child.
unsafe fn parent_says(sock: RawFd, parent: RawFd) -> Option<u8> {
    let mut fds = [
        libc::pollfd {
            fd: sock,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: parent,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let timeout = i32::try_from(2 * SETUP_TIMEOUT.as_millis()).unwrap_or(i32::MAX);
    loop {
        // SAFETY: polls two fds this child owns.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        // SAFETY: reads this thread's errno.
        if r < 0 && unsafe { *libc::__errno_location() } == libc::EINTR {
            continue;
        }
        if r <= 0 || fds[1].revents != 0 {
            return None;
        }
        break;
    }
    let mut byte = 0u8;
    // SAFETY: reads one byte into a local.
    let n = unsafe { libc::recv(sock, (&raw mut byte).cast(), 1, 0) };
    (n == 1).then_some(byte)
}

/// Closes every descriptor from 3 up except those in `keep`.
///
/// # Safety
///
/// Async-signal-safe; only for the child, which owns nothing else.
unsafe fn close_all_but(keep: &mut [RawFd]) {
    keep.sort_unstable();
    let mut from: u32 = 3;
    for &fd in keep.iter() {
        let Ok(fd) = u32::try_from(fd) else { continue };
        if fd > from {
            // SAFETY: closes a range of descriptors this child does not use.
            unsafe { libc::syscall(libc::SYS_close_range, from, fd - 1, 0u32) };
        }
        from = from.max(fd + 1);
    }
    // SAFETY: as above, for everything above the last kept descriptor.
    unsafe { libc::syscall(libc::SYS_close_range, from, u32::MAX, 0u32) };
}

fn send(sock: &OwnedFd, msg: &[u8]) -> io::Result<()> {
    // SAFETY: writes from a live buffer to a socket we own.
    let r = unsafe { libc::send(sock.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn recv(sock: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    let mut pfd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let timeout = i32::try_from(SETUP_TIMEOUT.as_millis()).unwrap_or(i32::MAX);
    loop {
        // SAFETY: polls one fd we own.
        let r = unsafe { libc::poll(&mut pfd, 1, timeout) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "sandbox setup did not finish in time",
            ));
        }
        break;
    }
    // SAFETY: reads into a buffer we own, bounded by its length.
    let r = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    usize::try_from(r).map_err(|_| io::Error::last_os_error())
}

/// The child: runs the plan and execs init, or reports where it failed and exits.
///
/// # Safety
///
/// Must only be called in the child of a fork-like clone. It makes only async-signal-safe
/// system calls on memory prepared before the clone and never returns.
unsafe fn child_main(plan: &Plan, sock: RawFd, parent: RawFd) -> ! {
    // SAFETY: every pointer passed below comes from a `CString` or `Vec` owned by `plan`,
    // which the clone copied intact into this process.
    unsafe {
        let fail = |stage: u32| -> ! {
            let errno = *libc::__errno_location();
            let mut msg = [0u8; 9];
            msg[0] = b'E';
            msg[1..5].copy_from_slice(&stage.to_le_bytes());
            msg[5..9].copy_from_slice(&errno.to_le_bytes());
            libc::send(sock, msg.as_ptr().cast(), msg.len(), libc::MSG_NOSIGNAL);
            libc::_exit(127)
        };
        let stage = |s: Stage| plan.stage_index(s);

        // First, before anything can block: die with the parent, and hold nothing of it.
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        let netns = plan.netns.as_ref().map_or(-1, AsRawFd::as_raw_fd);
        close_all_but(&mut [sock, parent, plan.log_fd.as_raw_fd(), netns]);
        if has_exited(parent) {
            libc::_exit(127);
        }
        if parent_says(sock, parent) != Some(b'G') {
            fail(stage(Stage::WaitCgroup));
        }
        if libc::unshare(libc::CLONE_NEWCGROUP) != 0 {
            fail(stage(Stage::UnshareCgroup));
        }
        libc::umask(0);
        for (i, step) in plan.steps.iter().enumerate() {
            let ok = match step {
                Step::Mkdir { path, mode } => {
                    libc::mkdir(path.as_ptr(), *mode) == 0
                        || *libc::__errno_location() == libc::EEXIST
                }
                Step::Touch { path } => {
                    let fd = libc::open(
                        path.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                        0o644,
                    );
                    fd >= 0 && libc::close(fd) == 0
                }
                Step::Mount {
                    source,
                    target,
                    fstype,
                    flags,
                    data,
                } => {
                    let p =
                        |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
                    libc::mount(
                        p(source),
                        target.as_ptr(),
                        p(fstype),
                        *flags,
                        p(data).cast(),
                    ) == 0
                }
                Step::Mknod { path, major, minor } => {
                    libc::mknod(
                        path.as_ptr(),
                        libc::S_IFCHR | 0o666,
                        libc::makedev(*major, *minor),
                    ) == 0
                }
                Step::Chown { path } => {
                    libc::lchown(path.as_ptr(), plan.uid_base, plan.uid_base) == 0
                }
                Step::Symlink { target, link } => {
                    libc::symlink(target.as_ptr(), link.as_ptr()) == 0
                }
            };
            if !ok {
                fail(u32::try_from(i).unwrap_or(u32::MAX));
            }
        }
        let host = plan.hostname.as_bytes();
        if libc::sethostname(host.as_ptr().cast(), host.len()) != 0 {
            fail(stage(Stage::Hostname));
        }
        // Still in the host's user namespace, which owns the joined namespace: sandbox root,
        // in the user namespace made below, gets no say over its interfaces and routes.
        let network = if netns >= 0 {
            libc::setns(netns, libc::CLONE_NEWNET) == 0 && libc::close(netns) == 0
        } else {
            loopback_up()
        };
        if !network {
            fail(stage(Stage::Loopback));
        }
        let dot = c".".as_ptr();
        if libc::chdir(plan.root.as_ptr()) != 0
            || libc::syscall(libc::SYS_pivot_root, dot, dot) != 0
            || libc::umount2(dot, libc::MNT_DETACH) != 0
            || libc::chdir(c"/".as_ptr()) != 0
        {
            fail(stage(Stage::PivotRoot));
        }
        if libc::unshare(libc::CLONE_NEWUSER) != 0 {
            fail(stage(Stage::UnshareUser));
        }
        if libc::send(sock, b"U".as_ptr().cast(), 1, libc::MSG_NOSIGNAL) != 1
            || parent_says(sock, parent) != Some(b'M')
        {
            fail(stage(Stage::WaitMaps));
        }
        // Raw system calls, not glibc's wrappers: those broadcast the change to every thread
        // glibc believes exists and take its internal locks, which a thread of the parent
        // may have held at the moment of the clone — the child would wait forever.
        if libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) != 0
            || libc::syscall(libc::SYS_setresgid, 0u32, 0u32, 0u32) != 0
            || libc::syscall(libc::SYS_setresuid, 0u32, 0u32, 0u32) != 0
        {
            fail(stage(Stage::SetIds));
        }
        // The new credentials disarmed the parent-death signal; a parent that died since
        // the handshake's last message is caught here.
        if has_exited(parent) {
            fail(stage(Stage::ParentGone));
        }
        for cap in &plan.drop_caps {
            if libc::prctl(libc::PR_CAPBSET_DROP, *cap, 0, 0, 0) != 0
                && *libc::__errno_location() != libc::EINVAL
            {
                fail(stage(Stage::DropCaps));
            }
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
        if null < 0
            || libc::dup2(null, 0) < 0
            || libc::dup2(plan.log_fd.as_raw_fd(), 1) < 0
            || libc::dup2(plan.log_fd.as_raw_fd(), 2) < 0
        {
            fail(stage(Stage::Stdio));
        }
        // Nothing from the host process may leak into the sandbox past exec.
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
        libc::setsid();
        if libc::chdir(plan.cwd.as_ptr()) != 0 {
            fail(stage(Stage::Chdir));
        }
        // The host process ignores SIGPIPE and may block signals; init starts clean.
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        for sig in 1..32 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        libc::umask(0o022);
        let prog = libc::sock_fprog {
            len: u16::try_from(plan.filter.len()).unwrap_or(0),
            filter: plan.filter.as_ptr().cast_mut(),
        };
        if libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &prog as *const libc::sock_fprog,
            0,
            0,
        ) != 0
        {
            fail(stage(Stage::Seccomp));
        }
        libc::execve(
            plan.program.as_ptr(),
            plan.argv.as_ptr(),
            plan.envp.as_ptr(),
        );
        fail(stage(Stage::Exec))
    }
}

/// Opens the network namespace file `path` for the child to join, refusing anything that
/// is not a network namespace.
fn open_netns(path: &Path) -> Result<OwnedFd, BackendError> {
    /// `NS_GET_NSTYPE` from `linux/nsfs.h`: `_IO(0xb7, 0x3)`.
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    let file = std::fs::File::open(path).map_err(|e| BackendError::InvalidSpec {
        field: "network namespace",
        reason: format!("{}: {e}", path.display()),
    })?;
    // SAFETY: an ioctl without arguments on a descriptor we own.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) };
    if kind != libc::CLONE_NEWNET {
        return Err(BackendError::InvalidSpec {
            field: "network namespace",
            reason: format!("{} is not a network namespace", path.display()),
        });
    }
    Ok(file.into())
}

/// Sets `IFF_UP` on `lo` in the current network namespace.
///
/// # Safety
///
/// Async-signal-safe; only used in the child.
unsafe fn loopback_up() -> bool {
    // SAFETY: a datagram socket for the interface ioctls, and an `ifreq` we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return false;
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        req.ifr_name[0] = b'l'.cast_signed();
        req.ifr_name[1] = b'o'.cast_signed();
        let mut ok = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) == 0;
        if ok {
            req.ifr_ifru.ifru_flags |= libc::c_short::try_from(libc::IFF_UP).unwrap_or(1);
            ok = libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) == 0;
        }
        libc::close(fd);
        ok
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Instant;

    use coppice_lifecycle::backend::{InitSpec, Limits, SandboxId};

    use super::*;

    /// Set in the environment of this test binary re-executed as a parent that dies.
    const DYING_PARENT: &str = "COPPICE_SPAWN_TEST_DYING_PARENT";

    fn skip(name: &str) -> bool {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            #[allow(clippy::print_stdout)] // the skip line must reach the test output
            {
                println!("SKIP {name}: cloning into new namespaces needs root");
            }
            return true;
        }
        false
    }

    /// A plan whose child never gets past the handshake's first message in these tests.
    fn plan(root: &Path) -> Plan {
        let spec = JailSpec {
            id: SandboxId::new("spawntest").unwrap(),
            rootfs: RootfsSpec::Directory(root.to_path_buf()),
            init: InitSpec {
                program: PathBuf::from("/bin/true"),
                args: Vec::new(),
                env: Vec::new(),
                cwd: PathBuf::from("/"),
            },
            mounts: Vec::new(),
            limits: Limits::default(),
            network: None,
        };
        let log = std::fs::File::create(root.join("log")).unwrap().into();
        Plan::new(&spec, root, log, 100_000, 65_536).unwrap()
    }

    /// Waits, boundedly, for `done`.
    fn eventually(mut done: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if done() {
                return true;
            }
            #[allow(clippy::disallowed_methods)] // a plain test thread
            std::thread::sleep(Duration::from_millis(10));
        }
        done()
    }

    /// What the descriptors above stdio of `pid` point to.
    fn fds_of(pid: u32) -> Vec<PathBuf> {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| {
                d.flatten()
                    .filter(|e| {
                        e.file_name()
                            .to_str()
                            .and_then(|n| n.parse::<u32>().ok())
                            .is_some_and(|n| n > 2)
                    })
                    .filter_map(|e| std::fs::read_link(e.path()).ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Inspects the child while it waits for its cgroups, then fails the start.
    struct Inspect<F: FnMut(u32)>(F);
    impl<F: FnMut(u32)> Handshake for Inspect<F> {
        fn join_cgroups(&mut self, pid: u32) -> Result<(), BackendError> {
            (self.0)(pid);
            Err(BackendError::InvalidSpec {
                field: "test",
                reason: "stop here".into(),
            })
        }
    }

    /// Right after the clone the child lets go of everything the parent has open: here a
    /// marker file standing for the gateway's listener and database.
    #[test]
    fn a_new_child_holds_none_of_the_parents_descriptors() {
        if skip("a_new_child_holds_none_of_the_parents_descriptors") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("marker");
        let _held = std::fs::File::create(&marker).unwrap();
        let plan = plan(dir.path());
        let mut seen = Vec::new();
        let result = spawn(
            "spawntest",
            &plan,
            &mut Inspect(|pid| {
                let settled = eventually(|| !fds_of(pid).contains(&marker));
                seen = fds_of(pid);
                assert!(
                    settled,
                    "the child still holds {}: {seen:?}",
                    marker.display()
                );
            }),
        );
        assert!(matches!(result, Err(BackendError::InvalidSpec { .. })));
        // Its handshake socket, the parent's pidfd and its log file; nothing else.
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(
            seen.iter().any(|p| p == &dir.path().join("log")),
            "{seen:?}"
        );
    }

    /// A child whose parent dies before it has exec'd dies too, even when something else
    /// keeps the other end of its handshake socket open (as a sibling cloned at the same
    /// moment did before children closed what they inherit), so end-of-file never comes.
    #[test]
    fn a_child_dies_with_its_parent_before_exec() {
        if std::env::var_os(DYING_PARENT).is_some() {
            // The re-executed parent: start a child, keep its socket open elsewhere, die.
            let dir = PathBuf::from(std::env::var_os(DYING_PARENT).unwrap());
            let plan = plan(&dir);
            let _ = spawn(
                "spawntest",
                &plan,
                &mut Inspect(|pid| {
                    // SAFETY: a plain fork of this single-purpose process; the fork only
                    // sleeps and holds the descriptors it inherited.
                    let holder = unsafe { libc::fork() };
                    if holder == 0 {
                        // SAFETY: async-signal-safe calls in the forked child, which lets go
                        // of the test's output so that nobody waits for it.
                        unsafe {
                            for fd in 0..3 {
                                libc::close(fd);
                            }
                            libc::sleep(30);
                            libc::_exit(0)
                        }
                    }
                    std::fs::write(dir.join("holder"), holder.to_string()).unwrap();
                    std::fs::write(dir.join("child"), pid.to_string()).unwrap();
                    // SAFETY: ends this process at once, as a kill -9 would.
                    unsafe { libc::_exit(0) }
                }),
            );
            return;
        }
        if skip("a_child_dies_with_its_parent_before_exec") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        #[allow(clippy::disallowed_methods)]
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "linux::spawn::tests::a_child_dies_with_its_parent_before_exec",
                "--test-threads=1",
            ])
            .env(DYING_PARENT, dir.path())
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "{status}");
        let pid: u32 = std::fs::read_to_string(dir.path().join("child"))
            .unwrap()
            .parse()
            .unwrap();
        let holder: libc::pid_t = std::fs::read_to_string(dir.path().join("holder"))
            .unwrap()
            .parse()
            .unwrap();
        let gone = eventually(|| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
                s.rfind(')').is_some_and(|i| s[i + 2..].starts_with('Z'))
            })
        });
        // SAFETY: kill(2) on the processes this test started.
        unsafe {
            libc::kill(holder, libc::SIGKILL);
            if !gone {
                libc::kill(libc::pid_t::try_from(pid).unwrap(), libc::SIGKILL);
            }
        }
        assert!(gone, "child {pid} outlived its parent");
    }
}
