//! Warm pools as state: each built-in template's target, what its pool did (creates it
//! served, creates that found it empty, the last warm start that failed), and the shrinking
//! of a pool above its target.
//!
//! A target comes from the registry (`pool_targets`, written by `POST /pool/{template}/warm`
//! and `/drain`), else from `--warm-pool`; it survives restarts. The warm sandboxes themselves
//! are [`crate::runtime::Runtime`]'s (`claim`, `warm_count`, `prestart`); the filler in
//! `lib.rs` (`Gateway::keep_warm`) starts them up to the target, and `api/pool.rs` reads and
//! sets targets. Hits and misses count from this gateway's start, as Prometheus counters do.
//!
//! **Invariant:** a warm sandbox leaves a pool only by `Runtime::claim`, which removes it, so
//! a sandbox handed out (or destroyed) is never in a pool again; nothing here knows HTTP.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use coppice_lifecycle::state::Millis;

use crate::runtime::Runtime;

/// The last warm start of a template that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LastError {
    /// Why, with its causes.
    pub(crate) message: String,
    /// When.
    pub(crate) at: Millis,
}

/// One template's pool, as `GET /pool` reads it (without the sandboxes, which the runtime
/// and the registry count).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Pool {
    /// How many started sandboxes the filler keeps.
    pub(crate) target: usize,
    /// Creates that took a warm sandbox.
    pub(crate) hits: u64,
    /// Creates that found the pool empty and started a sandbox.
    pub(crate) misses: u64,
    /// The last warm start that failed.
    pub(crate) last_error: Option<LastError>,
}

/// Every built-in template's pool.
#[derive(Debug)]
pub(crate) struct Pools {
    pools: Mutex<BTreeMap<&'static str, Pool>>,
    /// Held by the filler across one warm start and by a shrink: a shrink that waits for a
    /// start under way finds its sandbox in the pool, and a start re-checks the target once
    /// it holds this, so a lowered target is never exceeded after the shrink answered.
    filling: tokio::sync::Mutex<()>,
}

impl Pools {
    /// Pools of `templates`, each with its `stored` target, else `default` (`--warm-pool`).
    pub(crate) fn new(
        templates: impl IntoIterator<Item = &'static str>,
        default: usize,
        stored: &HashMap<String, usize>,
    ) -> Self {
        let pools = templates
            .into_iter()
            .map(|name| {
                let target = stored.get(name).copied().unwrap_or(default);
                (
                    name,
                    Pool {
                        target,
                        ..Pool::default()
                    },
                )
            })
            .collect();
        Self {
            pools: Mutex::new(pools),
            filling: tokio::sync::Mutex::new(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, Pool>> {
        // Every critical section is a single read or update (and a target's write to the
        // registry, which either happened or did not).
        self.pools
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The target of `name`'s pool (0 for an unknown template).
    pub(crate) fn target(&self, name: &str) -> usize {
        self.lock().get(name).map_or(0, |p| p.target)
    }

    /// Sets the target of `name`'s pool once `store` has written it durably; `None` for an
    /// unknown template. Under the pools' lock, so two changes are stored and applied in the
    /// same order.
    pub(crate) fn set_target<E>(
        &self,
        name: &str,
        target: usize,
        store: impl FnOnce() -> Result<(), E>,
    ) -> Option<Result<(), E>> {
        let mut pools = self.lock();
        let pool = pools.get_mut(name)?;
        Some(store().map(|()| pool.target = target))
    }

    /// Counts a create of `name`: it took a warm sandbox (`hit`), or found none.
    pub(crate) fn count_create(&self, name: &str, hit: bool) {
        if let Some(p) = self.lock().get_mut(name) {
            if hit {
                p.hits += 1;
            } else {
                p.misses += 1;
            }
        }
    }

    /// Records a failed warm start of `name`.
    pub(crate) fn failed(&self, name: &str, at: Millis, message: String) {
        if let Some(p) = self.lock().get_mut(name) {
            p.last_error = Some(LastError { message, at });
        }
    }

    /// The pool of `name`, if it is a template.
    pub(crate) fn get(&self, name: &str) -> Option<Pool> {
        self.lock().get(name).cloned()
    }

    /// Every pool, by template name.
    pub(crate) fn all(&self) -> Vec<(&'static str, Pool)> {
        self.lock().iter().map(|(n, p)| (*n, p.clone())).collect()
    }

    /// Held across one warm start; see the field.
    pub(crate) async fn filling(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.filling.lock().await
    }

    /// A template whose pool holds more warm sandboxes than its target.
    pub(crate) fn over_target(&self, runtime: &Runtime) -> Option<&'static str> {
        self.lock()
            .iter()
            .find(|(name, p)| runtime.warm_count(name) > p.target)
            .map(|(name, _)| *name)
    }

    /// Destroys `name`'s warm sandboxes above its target, oldest first, once a warm start
    /// under way has ended; returns how many. Sandboxes handed out are not the pool's.
    pub(crate) async fn shrink(&self, runtime: &Runtime, name: &str) -> usize {
        let _filling = self.filling().await;
        let mut destroyed = 0;
        while runtime.warm_count(name) > self.target(name) {
            let Some(w) = runtime.claim(name) else {
                break;
            };
            runtime.destroy(&w.id).await;
            destroyed += 1;
        }
        destroyed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pools(stored: &[(&str, usize)]) -> Pools {
        let stored = stored.iter().map(|(n, t)| ((*n).to_owned(), *t)).collect();
        Pools::new(["base", "code-interpreter-v1"], 3, &stored)
    }

    #[test]
    fn a_stored_target_wins_over_the_flag() {
        let p = pools(&[("code-interpreter-v1", 0), ("gone", 7)]);
        assert_eq!(p.target("base"), 3);
        assert_eq!(p.target("code-interpreter-v1"), 0);
        assert_eq!(p.target("gone"), 0);
        assert!(p.get("gone").is_none());
        let names: Vec<&str> = p.all().iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["base", "code-interpreter-v1"]);
    }

    #[test]
    fn a_target_changes_only_once_stored() {
        let p = pools(&[]);
        assert_eq!(
            p.set_target("base", 5, || Err("disk full")),
            Some(Err("disk full"))
        );
        assert_eq!(p.target("base"), 3);
        assert_eq!(p.set_target("base", 5, || Ok::<(), ()>(())), Some(Ok(())));
        assert_eq!(p.target("base"), 5);
        let mut stored = false;
        assert!(p
            .set_target("nope", 1, || {
                stored = true;
                Ok::<(), ()>(())
            })
            .is_none());
        assert!(!stored, "an unknown template's target is not stored");
    }

    #[test]
    fn creates_count_as_hits_or_misses_and_failures_keep_the_last() {
        let p = pools(&[]);
        p.count_create("base", true);
        p.count_create("base", false);
        p.count_create("base", false);
        p.count_create("nope", true);
        p.failed("base", Millis(5), "first".into());
        p.failed("base", Millis(9), "second".into());
        let base = p.get("base").unwrap();
        assert_eq!((base.hits, base.misses), (1, 2));
        assert_eq!(
            base.last_error,
            Some(LastError {
                message: "second".into(),
                at: Millis(9)
            })
        );
        let other = p.get("code-interpreter-v1").unwrap();
        assert_eq!((other.hits, other.misses, other.last_error), (0, 0, None));
    }
}
