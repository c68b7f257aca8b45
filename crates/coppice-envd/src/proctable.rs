//! The process table: the processes started through `process.Process`, running and
//! recently ended, and the fan-out of each one's events to its streams.
//!
//! It lives apart from the service (`crate::process`) so that the agent's state can hold it
//! without the state and the service importing each other.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::json;
use tokio::sync::mpsc;

use crate::fdio::FdIo;
use crate::reaper::Exit;

/// How many exited processes keep their end event for a late `Connect`.
const RETAINED_ENDS: usize = 64;

/// The running (and recently ended) processes.
#[derive(Debug, Default)]
pub(crate) struct Manager {
    pub(crate) procs: Mutex<HashMap<u32, Arc<Proc>>>,
    ended: Mutex<VecDeque<(u32, Option<String>, EndInfo)>>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a single collection update, so a poisoned lock still
    // guards consistent data.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Manager {
    /// The running process with `pid`, else the one tagged `tag`.
    pub(crate) fn find(&self, pid: Option<u32>, tag: Option<&str>) -> Option<Arc<Proc>> {
        let procs = lock(&self.procs);
        match (pid, tag) {
            (Some(pid), _) => procs.get(&pid).cloned(),
            (None, Some(tag)) => procs
                .values()
                .find(|p| p.tag.as_deref() == Some(tag))
                .cloned(),
            (None, None) => None,
        }
    }

    /// The end of a recently ended process with `pid`, else tagged `tag`.
    pub(crate) fn find_ended(&self, pid: Option<u32>, tag: Option<&str>) -> Option<(u32, EndInfo)> {
        lock(&self.ended).iter().rev().find_map(|(p, t, end)| {
            let hit = match (pid, tag) {
                (Some(want), _) => want == *p,
                (None, Some(want)) => t.as_deref() == Some(want),
                (None, None) => false,
            };
            hit.then(|| (*p, end.clone()))
        })
    }

    /// Moves `proc` from the running to the ended table.
    pub(crate) fn finished(&self, proc: &Proc, end: EndInfo) {
        lock(&self.procs).remove(&proc.pid);
        let mut ended = lock(&self.ended);
        if ended.len() >= RETAINED_ENDS {
            ended.pop_front();
        }
        ended.push_back((proc.pid, proc.tag.clone(), end));
    }

    /// Signals every running process group (agent shutdown).
    pub(crate) fn signal_all(&self, signal: Signal) {
        for p in lock(&self.procs).values() {
            // The group may already be gone; nothing to do then.
            let _ = killpg(p.pgid(), signal);
        }
    }
}

/// One event of a process, as fanned out to its streams.
#[derive(Debug, Clone)]
pub(crate) enum Event {
    Stdout(Bytes),
    Stderr(Bytes),
    Pty(Bytes),
    End(EndInfo),
}

/// How a process ended, in envd's terms.
#[derive(Debug, Clone)]
pub(crate) struct EndInfo {
    pub(crate) exit: Exit,
    /// The agent killed the process because its lifetime (`Connect-Timeout-Ms` on Start)
    /// ran out; streams then end with `deadline_exceeded`, whichever timer fired first.
    pub(crate) timed_out: bool,
}

impl EndInfo {
    /// The exit code (-1 for a signal) and envd's `status` string.
    pub(crate) fn code_and_status(&self) -> (i32, String) {
        match self.exit {
            Exit::Code(c) => (c, format!("exit status {c}")),
            Exit::Signal(s) => (-1, format!("signal: {}", signal_name(s))),
        }
    }

    pub(crate) fn to_json(&self) -> serde_json::Value {
        let (code, status) = self.code_and_status();
        let exited = matches!(self.exit, Exit::Code(_));
        let mut end = serde_json::Map::new();
        if code != 0 {
            end.insert("exitCode".into(), json!(code));
        }
        end.insert("exited".into(), json!(exited));
        end.insert("status".into(), json!(status));
        if code != 0 {
            end.insert("error".into(), json!(status));
        }
        json!({ "event": { "end": end } })
    }
}

/// Go's names for signals, as envd's `status` strings use them.
pub(crate) fn signal_name(sig: i32) -> String {
    let name = match sig {
        1 => "hangup",
        2 => "interrupt",
        3 => "quit",
        4 => "illegal instruction",
        5 => "trace/breakpoint trap",
        6 => "aborted",
        7 => "bus error",
        8 => "floating point exception",
        9 => "killed",
        10 => "user defined signal 1",
        11 => "segmentation fault",
        12 => "user defined signal 2",
        13 => "broken pipe",
        14 => "alarm clock",
        15 => "terminated",
        _ => return format!("signal {sig}"),
    };
    name.to_owned()
}

/// The streams attached to a process, and its end once it came.
#[derive(Debug, Default)]
pub(crate) struct Fanout {
    subs: Vec<mpsc::Sender<Event>>,
    end: Option<EndInfo>,
}

/// One process started through `Start`.
#[derive(Debug)]
pub(crate) struct Proc {
    pub(crate) pid: u32,
    pub(crate) tag: Option<String>,
    /// The `ProcessConfig` as `List` reports it.
    pub(crate) config: serde_json::Value,
    pub(crate) stdin: tokio::sync::Mutex<Option<Arc<FdIo>>>,
    pub(crate) pty: Option<Arc<FdIo>>,
    pub(crate) fanout: Mutex<Fanout>,
}

impl Proc {
    pub(crate) fn pgid(&self) -> Pid {
        // Each process leads its own session, so its pid is its process group id.
        Pid::from_raw(i32::try_from(self.pid).unwrap_or(i32::MAX))
    }

    /// A new stream of this process's events; a finished process yields just its end.
    pub(crate) fn subscribe(&self) -> mpsc::Receiver<Event> {
        let (tx, rx) = mpsc::channel(8);
        let mut f = lock(&self.fanout);
        match &f.end {
            Some(end) => {
                // A fresh channel with room: this cannot fail.
                let _ = tx.try_send(Event::End(end.clone()));
            }
            None => f.subs.push(tx),
        }
        rx
    }

    pub(crate) async fn publish(&self, ev: Event) {
        let subs = lock(&self.fanout).subs.clone();
        for s in &subs {
            // A stream that went away just stops receiving.
            let _ = s.send(ev.clone()).await;
        }
        lock(&self.fanout).subs.retain(|s| !s.is_closed());
    }

    pub(crate) async fn publish_end(&self, end: EndInfo) {
        let subs = {
            let mut f = lock(&self.fanout);
            f.end = Some(end.clone());
            std::mem::take(&mut f.subs)
        };
        for s in subs {
            let _ = s.send(Event::End(end.clone())).await;
        }
    }
}
