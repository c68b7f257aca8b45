//! One gateway per state directory: an exclusive, non-blocking `flock` on
//! `<state-dir>/gateway.lock`, taken before anything else at start and held for the life of
//! the process, with the holder's pid in the file so a second gateway can say who has it.
//!
//! Two gateways on one state directory would each take the other's sandboxes for its own:
//! re-adopt its live ones, and kill its warm ones and the cgroups of its creates under way
//! as unregistered. The kernel drops the lock when the holder dies, `kill -9` included, so a
//! restart never waits for a stale lock.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg, OFlag};

/// The lock file's name in the state directory.
pub(crate) const FILE: &str = "gateway.lock";

/// The held lock; dropping it releases the state directory.
#[derive(Debug)]
pub(crate) struct StateLock {
    _file: Flock<File>,
}

/// Why the state directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StateLockError {
    /// Another process holds the lock.
    #[error(
        "state dir {} is in use by another coppice-gateway ({}); stop it or pick another --state-dir",
        dir.display(),
        pid.map_or_else(|| "pid unknown".to_owned(), |p| format!("pid {p}"))
    )]
    InUse {
        /// The state directory.
        dir: PathBuf,
        /// The holder's pid, as it wrote it into the file.
        pid: Option<u32>,
    },
    /// The lock is held, but the gateway that wrote its pid is gone: a process it started
    /// inherited the descriptor before it could exec and outlived it.
    #[error(
        "{} is locked, but coppice-gateway pid {pid} that took it is gone: a process it \
         started holds it (`fuser -v {}` names it); stop that process",
        path.display(),
        path.display()
    )]
    Orphaned {
        /// The lock file.
        path: PathBuf,
        /// The gateway that took the lock.
        pid: u32,
    },
    /// The lock file could not be opened, locked or written.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The lock file.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

impl StateLock {
    /// Locks `state_dir` for this process and writes its pid into the lock file; fails at
    /// once, naming the holder, when another process has it.
    pub(crate) fn acquire(state_dir: &Path) -> Result<Self, StateLockError> {
        let path = state_dir.join(FILE);
        let io = |op: &'static str| {
            let path = path.clone();
            move |source: std::io::Error| StateLockError::Io { op, path, source }
        };
        // O_CLOEXEC (std sets it on every open; said here because it matters): a sandbox's
        // init or a helper command that inherited the descriptor would keep the lock after
        // the gateway died, and the restart would refuse to start.
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(OFlag::O_CLOEXEC.bits())
            .open(&path)
            .map_err(io("open"))?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let mut text = String::new();
                // The holder may be between its truncate and its write: then the pid is
                // unknown, which the message says.
                let _ = file.read_to_string(&mut text);
                let pid: Option<u32> = text.trim().parse().ok();
                if let Some(pid) = pid.filter(|p| !is_alive(*p)) {
                    return Err(StateLockError::Orphaned { path, pid });
                }
                return Err(StateLockError::InUse {
                    dir: state_dir.to_path_buf(),
                    pid,
                });
            }
            Err((_, errno)) => return Err(io("lock")(errno.into())),
        };
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .map_err(io("write the pid into"))?;
        Ok(Self { _file: file })
    }
}

/// Whether process `pid` exists (signal 0 checks without sending anything).
fn is_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None),
        Err(Errno::ESRCH)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_another_descriptor_fails_and_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let held = StateLock::acquire(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert_eq!(text, format!("{}\n", std::process::id()));
        // flock locks belong to the open file description, so a second open in this same
        // process conflicts just as another process would.
        let second = StateLock::acquire(dir.path());
        match &second {
            Err(StateLockError::InUse { dir: d, pid }) => {
                assert_eq!(d, dir.path());
                assert_eq!(*pid, Some(std::process::id()));
            }
            other => panic!("expected InUse, got {other:?}"),
        }
        let message = second.unwrap_err().to_string();
        assert_eq!(
            message,
            format!(
                "state dir {} is in use by another coppice-gateway (pid {}); \
                 stop it or pick another --state-dir",
                dir.path().display(),
                std::process::id()
            )
        );
        drop(held);
        // Released with the descriptor: the next gateway gets it at once.
        StateLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn a_stale_pid_from_a_dead_holder_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), "999999999\nleftover\n").unwrap();
        let _held = StateLock::acquire(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert_eq!(text, format!("{}\n", std::process::id()));
    }

    #[test]
    fn a_lock_kept_past_its_gateway_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        std::fs::write(&path, "999999999\n").unwrap();
        let file = File::options().read(true).open(&path).unwrap();
        let _inherited = Flock::lock(file, FlockArg::LockExclusiveNonblock).unwrap();
        match StateLock::acquire(dir.path()) {
            Err(StateLockError::Orphaned { path: p, pid }) => {
                assert_eq!((p, pid), (path, 999_999_999));
            }
            other => panic!("expected Orphaned, got {other:?}"),
        }
    }

    #[test]
    fn an_unreadable_pid_is_reported_as_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let file = File::options()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .unwrap();
        let _other = Flock::lock(file, FlockArg::LockExclusiveNonblock).unwrap();
        let message = StateLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(message.contains("(pid unknown)"), "{message}");
    }
}
