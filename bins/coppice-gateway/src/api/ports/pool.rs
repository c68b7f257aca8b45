//! Kept-alive HTTP/1.1 connections to sandbox ports, reused across requests.
//!
//! A new connection per request costs a `setns` round trip on the dialer thread and, for
//! many servers, a new worker (Python's `ThreadingHTTPServer` starts a thread per
//! connection). A connection goes back here as soon as its response head is in; one whose
//! response still streams is skipped by [`take`] until it is done. At most
//! [`MAX_IDLE`] per port are kept, each for at most [`IDLE_TIMEOUT`]: dropping the last
//! handle closes the connection once it is idle. A server that goes away (the sandbox is
//! killed) closes its end, which ends the connection, and [`take`] never hands out a closed
//! one; a kept connection never keeps a killed sandbox's namespace alive, since its socket
//! closes with the server's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use coppice_lifecycle::backend::SandboxId;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;

use crate::metrics::Counted;

/// The request half of a connection to a sandbox port.
pub(super) type Sender = SendRequest<Counted<Incoming>>;

/// Most idle connections kept per sandbox port.
const MAX_IDLE: usize = 16;
/// Longest a connection stays in the pool unused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Every this many returns, every port's list is swept of dead and expired connections.
const SWEEP_EVERY: u32 = 256;

struct Kept {
    since: Instant,
    sender: Sender,
}

type Pool = HashMap<(SandboxId, u16), Vec<Kept>>;

static POOL: Mutex<Option<Pool>> = Mutex::new(None);
static RETURNS: AtomicU32 = AtomicU32::new(0);

fn pool() -> MutexGuard<'static, Option<Pool>> {
    // Every critical section leaves the map consistent.
    POOL.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether a kept connection is still worth keeping at `now`.
fn usable(k: &Kept, now: Instant) -> bool {
    !k.sender.is_closed() && now.duration_since(k.since) < IDLE_TIMEOUT
}

/// An idle connection to `port` of sandbox `id`, if one is kept.
pub(super) fn take(id: &SandboxId, port: u16) -> Option<Sender> {
    let mut guard = pool();
    let list = guard.as_mut()?.get_mut(&(id.clone(), port))?;
    let now = Instant::now();
    list.retain(|k| usable(k, now));
    let at = list.iter().rposition(|k| k.sender.is_ready())?;
    Some(list.swap_remove(at).sender)
}

/// Keeps `sender` for the next request to `port` of sandbox `id`.
pub(super) fn give_back(id: &SandboxId, port: u16, sender: Sender) {
    if sender.is_closed() {
        return;
    }
    let now = Instant::now();
    let mut guard = pool();
    let pool = guard.get_or_insert_with(HashMap::new);
    if RETURNS
        .fetch_add(1, Ordering::Relaxed)
        .is_multiple_of(SWEEP_EVERY)
    {
        pool.retain(|_, list| {
            list.retain(|k| usable(k, now));
            !list.is_empty()
        });
    }
    let list = pool.entry((id.clone(), port)).or_default();
    if list.len() < MAX_IDLE {
        list.push(Kept { since: now, sender });
    }
}
