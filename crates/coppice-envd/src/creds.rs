//! File operations with the requesting user's credentials.
//!
//! Every envd file operation (the `/files` routes and `filesystem.Filesystem`) runs with
//! the filesystem credentials of the user it is for: its uid, its primary gid and its
//! supplementary groups. The kernel then checks each step of the path walk, each symlink it
//! follows and the final access against that user, in the same system call that acts, so no
//! check can be raced by swapping a symlink in between.
//!
//! The switch is per thread: the raw `setfsuid`, `setfsgid` and `setgroups` system calls
//! change only the calling thread's credentials (glibc's wrappers would broadcast the
//! change to every thread of the process, which is what a process switching for good wants
//! and what an agent serving other users at the same moment must not do). A [`Switched`]
//! guard puts the agent's own credentials back when the operation ends, even on a panic, so
//! the work must never await while switched: it runs on a blocking-pool thread
//! ([`Creds::blocking`]) or in one synchronous stretch ([`Creds::run`]).
//!
//! A filesystem uid other than 0 also drops the filesystem capabilities (`CAP_CHOWN`,
//! `CAP_DAC_OVERRIDE`, `CAP_DAC_READ_SEARCH`, `CAP_FOWNER`, `CAP_FSETID`, ...) from the
//! thread's effective set, and switching back to 0 restores them (`capabilities(7)`), so
//! sandbox root's overrides do not leak into a user's request. What a user creates is owned
//! by that user from the start (the kernel takes the filesystem ids), so nothing needs a
//! `chown` afterwards.
//!
//! A request for the agent's own user (root, when the agent is PID 1) switches nothing.

use std::io;
use std::sync::OnceLock;

use crate::state::AgentState;
use crate::users::{self, User};

/// The credentials one file operation runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Creds {
    uid: u32,
    gid: u32,
    groups: Vec<libc::gid_t>,
}

/// The agent's own credentials, read once: what every switch returns to.
#[derive(Debug)]
struct Own {
    uid: u32,
    gid: u32,
    groups: Vec<libc::gid_t>,
}

fn own() -> &'static Own {
    static OWN: OnceLock<Own> = OnceLock::new();
    OWN.get_or_init(|| Own {
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
        groups: nix::unistd::getgroups()
            .map(|g| g.into_iter().map(nix::unistd::Gid::as_raw).collect())
            .unwrap_or_default(),
    })
}

impl Creds {
    /// The credentials of `user`: its uid, primary gid and every group listing it.
    pub(crate) fn of(state: &AgentState, user: &User) -> Self {
        Self {
            uid: user.uid,
            gid: user.gid,
            groups: users::groups(state, user),
        }
    }

    /// Whether acting for this user needs a switch at all.
    fn is_own(&self) -> bool {
        let own = own();
        self.uid == own.uid && self.gid == own.gid
    }

    /// Switches the calling thread to these credentials until the guard is dropped.
    ///
    /// The caller must not yield to other work on this thread while it holds the guard.
    pub(crate) fn switch(&self) -> io::Result<Switched> {
        if self.is_own() {
            return Ok(Switched { active: false });
        }
        let guard = Switched { active: true };
        // SAFETY: raw system calls on the calling thread with a valid pointer and length;
        // they change only this thread's credentials, which the guard restores.
        unsafe {
            if libc::syscall(libc::SYS_setgroups, self.groups.len(), self.groups.as_ptr()) != 0 {
                return Err(io::Error::last_os_error());
            }
            libc::syscall(libc::SYS_setfsgid, self.gid);
            libc::syscall(libc::SYS_setfsuid, self.uid);
        }
        // setfsuid and setfsgid report the previous id, never an error: ask again with an
        // invalid id (which changes nothing) to learn whether the switch took.
        let (fsuid, fsgid) = current_fs_ids();
        if fsuid != self.uid || fsgid != self.gid {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        Ok(guard)
    }

    /// Runs `f` on the calling thread with these credentials, synchronously.
    pub(crate) fn run<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        let _switched = self.switch()?;
        Ok(f())
    }

    /// Runs `f` with these credentials on a blocking-pool thread.
    pub(crate) async fn blocking<T, E>(
        &self,
        f: impl FnOnce() -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: Send + 'static + From<io::Error>,
    {
        let creds = self.clone();
        tokio::task::spawn_blocking(move || {
            let _switched = creds.switch().map_err(E::from)?;
            f()
        })
        .await
        .unwrap_or_else(|e| {
            Err(E::from(io::Error::other(format!(
                "file operation failed: {e}"
            ))))
        })
    }
}

/// The calling thread's filesystem uid and gid.
fn current_fs_ids() -> (u32, u32) {
    // SAFETY: an id of -1 is invalid, so these calls change nothing and return the
    // current filesystem id.
    let (u, g) = unsafe {
        (
            libc::syscall(libc::SYS_setfsuid, u32::MAX),
            libc::syscall(libc::SYS_setfsgid, u32::MAX),
        )
    };
    (
        u32::try_from(u).unwrap_or(u32::MAX),
        u32::try_from(g).unwrap_or(u32::MAX),
    )
}

/// The calling thread runs with a user's filesystem credentials until this is dropped.
#[derive(Debug)]
#[must_use = "the credentials are restored when the guard is dropped"]
pub(crate) struct Switched {
    active: bool,
}

impl Drop for Switched {
    fn drop(&mut self) {
        if !self.active {
            return;
        }
        let own = own();
        // The filesystem uid first: back at the agent's own it regains the filesystem
        // capabilities. Each of these is allowed unprivileged (the effective ids), except
        // setgroups, which needs CAP_SETGID; that one is not a filesystem capability, so
        // the switch never dropped it.
        // SAFETY: raw system calls on the calling thread with a valid pointer and length.
        let restored = unsafe {
            libc::syscall(libc::SYS_setfsuid, own.uid);
            libc::syscall(libc::SYS_setfsgid, own.gid);
            libc::syscall(libc::SYS_setgroups, own.groups.len(), own.groups.as_ptr()) == 0
        };
        if !restored || current_fs_ids() != (own.uid, own.gid) {
            // A thread left with a user's credentials would run a later request for
            // another user (or root) with them; better to stop than to serve that.
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

    /// Whether the test can switch users; prints a SKIP line otherwise.
    #[allow(clippy::print_stdout)]
    fn can_switch(test: &str) -> bool {
        let root = nix::unistd::geteuid().is_root();
        if !root {
            println!("SKIP {test}: needs root");
        }
        root
    }

    fn nobody() -> Creds {
        Creds {
            uid: 65534,
            gid: 65534,
            groups: vec![65534],
        }
    }

    #[test]
    fn a_switch_is_per_thread_and_restored() {
        if !can_switch("a_switch_is_per_thread_and_restored") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "x").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (back_tx, back_rx) = std::sync::mpsc::channel::<()>();
        let creds = nobody();
        let path = secret.clone();
        let other = std::thread::spawn(move || {
            creds
                .run(|| {
                    // While this thread is nobody, the main thread stays root.
                    tx.send(()).unwrap();
                    back_rx.recv().unwrap();
                    std::fs::read(&path).map_err(|e| e.raw_os_error())
                })
                .unwrap()
        });
        rx.recv().unwrap();
        assert_eq!(std::fs::read(&secret).unwrap(), b"x");
        back_tx.send(()).unwrap();
        assert_eq!(other.join().unwrap(), Err(Some(libc::EACCES)));
        // After the guard, this thread is itself again and its files are root's.
        let made = dir.path().join("made");
        nobody()
            .run(|| std::fs::write(&made, "y").map_err(|e| e.raw_os_error()))
            .unwrap()
            .unwrap_err();
        assert_eq!(current_fs_ids(), (0, 0));
        std::fs::write(&made, "y").unwrap();
        assert_eq!(std::fs::metadata(&made).unwrap().uid(), 0);
    }

    #[test]
    fn files_made_while_switched_belong_to_the_user() {
        if !can_switch("files_made_while_switched_belong_to_the_user") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let f = dir.path().join("f");
        nobody().run(|| std::fs::write(&f, "z")).unwrap().unwrap();
        let m = std::fs::metadata(&f).unwrap();
        assert_eq!((m.uid(), m.gid()), (65534, 65534));
    }
}
