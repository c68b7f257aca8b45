//! Child reaping for the whole agent process.
//!
//! As PID 1 the agent must reap every zombie, including orphans it never started, without
//! stealing the exit status of its own commands. One thread does all the waiting: it
//! peeks at the next exited child with `waitid(P_ALL, WNOWAIT)`, takes the registry lock,
//! and only then reaps that pid, handing the status to whoever registered it. Spawning
//! holds the same lock from `fork` until the pid is registered, so a child that exits
//! instantly is never reaped before its waiter exists, and `std`'s own reaping of a child
//! whose `exec` failed never races with ours.
//!
//! The agent binary does the same waiting on its runtime's one thread instead
//! ([`drive_from_sigchld`], then [`reap_exited`] at every SIGCHLD its signalfd reads), so an
//! idle agent is a single-threaded process: when a process whose other threads still hold
//! its memory dies first in its thread group, the kernel looks for a new owner of that
//! memory among its parent's children and every process on the host (memory cgroup
//! `mm_update_next_owner`), which at 10,000 sandboxes cost about 1.6 ms per kill.
//!
//! Consequence for the rest of the process: nothing else may wait for children. Use
//! [`spawn`] instead of `tokio::process` or `std::process::Command::status`/`output`.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::oneshot;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exit {
    /// `exit(code)`.
    Code(i32),
    /// Killed by a signal.
    Signal(i32),
}

#[derive(Debug, Default)]
struct Registry {
    waiters: HashMap<i32, oneshot::Sender<Exit>>,
    /// Whether someone waits for children: the reaping thread, or the agent's runtime
    /// ([`drive_from_sigchld`]).
    reaping: bool,
    /// Children spawned so far: the reaper compares it across a `waitid` that found none, so
    /// a spawn in between is never slept through.
    spawned: u64,
}

/// How long the reaper sleeps when the agent has no child at all. Every child comes from
/// [`spawn`], which wakes it, and an orphan can only be re-parented to the agent from a
/// child of its own, so this is a safety net, not a poll: with a poll of its own in each
/// of thousands of idle sandboxes, the host spent a quarter of its CPU waking reapers.
const IDLE_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
struct Reaper {
    registry: Mutex<Registry>,
    children: Condvar,
}

fn reaper() -> &'static Reaper {
    static REAPER: OnceLock<Reaper> = OnceLock::new();
    REAPER.get_or_init(Reaper::default)
}

fn lock() -> MutexGuard<'static, Registry> {
    // The registry stays consistent even if a holder panicked: every update is a single
    // map operation.
    reaper()
        .registry
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Starts the reaping thread if it is not running yet.
///
/// The agent binary calls this at start-up so orphans are reaped even before the first
/// command; [`spawn`] calls it too.
pub fn start() {
    let mut reg = lock();
    ensure_thread(&mut reg);
}

fn ensure_thread(reg: &mut Registry) {
    if reg.reaping {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("coppice-reaper".into())
        .stack_size(64 * 1024)
        .spawn(run);
    match spawned {
        Ok(_) => reg.reaping = true,
        Err(e) => tracing::error!(error = %e, "cannot start the reaper thread"),
    }
}

/// Spawns `cmd` and registers its pid; the receiver yields its exit.
pub(crate) fn spawn(cmd: &mut Command) -> io::Result<(Child, oneshot::Receiver<Exit>)> {
    let mut reg = lock();
    ensure_thread(&mut reg);
    let child = cmd.spawn()?;
    let (tx, rx) = oneshot::channel();
    let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
    reg.waiters.insert(pid, tx);
    reg.spawned += 1;
    drop(reg);
    reaper().children.notify_all();
    Ok((child, rx))
}

/// Hands the waiting to the caller, who blocks SIGCHLD in every thread and calls
/// [`reap_exited`] whenever one arrives (and once after this): no reaping thread starts.
pub(crate) fn drive_from_sigchld() {
    lock().reaping = true;
}

/// Reaps every child that has exited by now, handing each status to whoever registered
/// it; returns at once when none has.
pub(crate) fn reap_exited() {
    loop {
        match waitid(
            Id::All,
            WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT | WaitPidFlag::WNOHANG,
        ) {
            Ok(status) => {
                // No pid: children exist, none has exited.
                let Some(pid) = status.pid() else { return };
                reap_one(pid);
            }
            Err(Errno::EINTR) => {}
            // ECHILD: no children at all.
            Err(_) => return,
        }
    }
}

/// Reaps `pid`, which `waitid(WNOWAIT)` found exited, under the registry lock: a spawn in
/// progress finishes registering first.
fn reap_one(pid: Pid) {
    let mut reg = lock();
    match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::Exited(p, code)) => deliver(&mut reg, p, Exit::Code(code)),
        Ok(WaitStatus::Signaled(p, sig, _)) => {
            deliver(&mut reg, p, Exit::Signal(sig as i32));
        }
        // Already reaped elsewhere (std reaps a child whose exec failed).
        Ok(_) | Err(_) => {}
    }
}

fn run() {
    loop {
        let spawned = lock().spawned;
        match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Ok(status) => {
                let Some(pid) = status.pid() else { continue };
                reap_one(pid);
            }
            Err(Errno::EINTR) => {}
            Err(Errno::ECHILD) => {
                // No children: sleep until a spawn, unless one came since the wait began.
                let reg = lock();
                if reg.spawned == spawned {
                    let _unused = reaper().children.wait_timeout(reg, IDLE_WAIT);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "waitid failed");
                let reg = lock();
                let _unused = reaper().children.wait_timeout(reg, Duration::from_secs(1));
            }
        }
    }
}

fn deliver(reg: &mut Registry, pid: Pid, exit: Exit) {
    if let Some(tx) = reg.waiters.remove(&pid.as_raw()) {
        // The waiter may have been dropped; the status is then of no interest.
        let _ = tx.send(exit);
    }
}
