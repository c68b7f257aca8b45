//! The bench as the gateway's service manager: a child subreaper
//! (`PR_SET_CHILD_SUBREAPER`) that reaps what a gateway it started leaves behind.
//!
//! After a gateway is killed (`kill -9`, or a SIGTERM restart that keeps its sandboxes), its
//! sandboxes' inits are re-parented, and whoever adopts them reaps them when they are
//! killed later. Under systemd or rc.d that is the service manager or init, which reaps a
//! child as soon as it exits. Without this, it is this machine's own PID 1, which on these
//! VMs is Firecracker's `process_api`: it reaps 10,000 adopted children so slowly that it
//! kept a whole core of the two busy during the `scale` teardown, a cost of the VM rather
//! than of Coppice. With this, the bench takes the role of the service manager.
//!
//! A thread waits for any child; one the bench started itself and waits for ([`own`]:
//! the gateways and their helpers) is left to its owner, everything else is reaped at once.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag};
use nix::unistd::Pid;

use crate::client::Res;

fn owned() -> &'static Mutex<HashSet<i32>> {
    static OWNED: OnceLock<Mutex<HashSet<i32>>> = OnceLock::new();
    OWNED.get_or_init(Mutex::default)
}

fn lock() -> std::sync::MutexGuard<'static, HashSet<i32>> {
    owned()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Marks `pid`, a child the bench waits for itself, as not the reaper's.
pub(crate) fn own(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        lock().insert(pid);
    }
}

/// Makes this process the reaper of orphans started below it, once.
pub(crate) fn adopt() -> Res<()> {
    static STARTED: OnceLock<()> = OnceLock::new();
    if STARTED.get().is_some() {
        return Ok(());
    }
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| format!("cannot become a child subreaper: {e}"))?;
    std::thread::Builder::new()
        .name("orphan-reaper".into())
        .spawn(reap)?;
    let _ = STARTED.set(());
    Ok(())
}

fn reap() {
    loop {
        match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Ok(status) => {
                let Some(pid) = status.pid() else { continue };
                if lock().contains(&pid.as_raw()) {
                    // Its owner reaps it within milliseconds; other exits wait behind it.
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                let _ = waitpid(Pid::from_raw(pid.as_raw()), Some(WaitPidFlag::WNOHANG));
            }
            Err(Errno::EINTR) => {}
            // No children now: the next gateway's orphans come later.
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}
