//! Where re-adopting the sandboxes of a previous run stands.
//!
//! The gateway listens before it knows its sandboxes: after a restart, the jail's recovery
//! and the reconciliation with the registry run in the background. Until they are done the
//! gateway must not start a sandbox (recovery takes every cgroup it has no record of for an
//! orphan, reconciliation kills every sandbox the registry does not name) and cannot answer
//! for the ones it has, so every sandbox route answers [`Adopting`] and `/health` says how
//! far it is.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Progress of the re-adoption; starts unfinished.
#[derive(Debug, Default)]
pub(crate) struct Adoption {
    done: AtomicBool,
    adopted: AtomicUsize,
    total: AtomicUsize,
}

/// A sandbox route while re-adoption is under way: the client should retry shortly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the gateway is re-adopting its sandboxes after a restart ({adopted} of {total} so far); \
     retry shortly"
)]
pub(crate) struct Adopting {
    /// Sandboxes re-adopted so far.
    pub(crate) adopted: usize,
    /// Sandboxes the registry has on record.
    pub(crate) total: usize,
}

impl Adoption {
    /// The registry has `total` sandboxes on record.
    pub(crate) fn begin(&self, total: usize) {
        self.total.store(total, Ordering::Release);
    }

    /// One more sandbox is re-adopted.
    pub(crate) fn adopted_one(&self) {
        self.adopted.fetch_add(1, Ordering::AcqRel);
    }

    /// Re-adoption is over: sandbox routes are served from here on.
    pub(crate) fn finish(&self) {
        self.done.store(true, Ordering::Release);
    }

    /// Whether re-adoption is over.
    pub(crate) fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// `Ok` once re-adoption is over, else how far it is.
    pub(crate) fn check(&self) -> Result<(), Adopting> {
        if self.is_done() {
            return Ok(());
        }
        Err(Adopting {
            adopted: self.adopted.load(Ordering::Acquire),
            total: self.total.load(Ordering::Acquire),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_routes_wait_until_the_end_and_see_the_progress() {
        let a = Adoption::default();
        assert_eq!(
            a.check(),
            Err(Adopting {
                adopted: 0,
                total: 0
            })
        );
        a.begin(3);
        a.adopted_one();
        a.adopted_one();
        let e = a.check().unwrap_err();
        assert_eq!(
            e,
            Adopting {
                adopted: 2,
                total: 3
            }
        );
        assert_eq!(
            e.to_string(),
            "the gateway is re-adopting its sandboxes after a restart (2 of 3 so far); retry shortly"
        );
        assert!(!a.is_done());
        a.finish();
        assert!(a.is_done());
        assert_eq!(a.check(), Ok(()));
    }
}
