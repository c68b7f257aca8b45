//! The catalogue of built-in templates ([`crate::runtime::TEMPLATES`]): where each one's build
//! stands (building, ready, failed) and what identifies that build, for `/health`, the warm
//! pool and the `/templates` routes.
//!
//! A build's id is a UUID v5 of its recipe key (the cached tree's name and every package in
//! it, [`coppice_zfs::template::TemplateBuilder::recipe_key`]): the template cache holds one
//! build per recipe, so the id is known while the build runs and stays the same across
//! restarts. A build's time is the one its cache marker records; a template whose layer was
//! imported before its cache marker went away reports the time this gateway found it ready.

use std::collections::BTreeMap;
use std::sync::Mutex;

use coppice_lifecycle::state::Millis;
use uuid::Uuid;

/// The namespace of build ids (a fixed random UUID, so no other v5 scheme collides).
const BUILD_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_2a5e_8d3b_4c71_9e0a_b7d4_52c8_e913);

/// The build id of the recipe `key`: a UUID v5 (SHA-1 of the namespace and the key).
pub(crate) fn build_id(key: &str) -> Uuid {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(BUILD_NAMESPACE.as_bytes());
    ctx.update(key.as_bytes());
    let digest = ctx.finish();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest.as_ref()[..16]);
    uuid::Builder::from_sha1_bytes(bytes).into_uuid()
}

/// Where one template's build stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BuildState {
    /// Being built or imported since the gateway started.
    Building,
    /// Sandboxes can be created from it; built at `built_at`.
    Ready {
        /// When the build finished.
        built_at: Millis,
    },
    /// The build or import failed at `at`.
    Failed {
        /// When it failed.
        at: Millis,
        /// Why.
        reason: String,
    },
}

/// One template as the catalogue has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// Its name (its template id and only alias).
    pub(crate) name: &'static str,
    /// Its build's id.
    pub(crate) build_id: Uuid,
    /// When this gateway started building or importing it.
    pub(crate) started_at: Millis,
    /// Where its build stands.
    pub(crate) state: BuildState,
}

/// Every built-in template's build state.
#[derive(Debug)]
pub(crate) struct Catalogue {
    entries: Mutex<BTreeMap<&'static str, Entry>>,
}

impl Catalogue {
    /// A catalogue of `templates` (name and recipe key), all building since `now`.
    pub(crate) fn new(
        templates: impl IntoIterator<Item = (&'static str, String)>,
        now: Millis,
    ) -> Self {
        Self {
            entries: Mutex::new(
                templates
                    .into_iter()
                    .map(|(name, key)| {
                        let entry = Entry {
                            name,
                            build_id: build_id(&key),
                            started_at: now,
                            state: BuildState::Building,
                        };
                        (name, entry)
                    })
                    .collect(),
            ),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, Entry>> {
        // Every critical section is a single read or replace.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records that `name` is ready, built at `built_at` (or, when its build time is
    /// unknown, at `now`).
    pub(crate) fn ready(&self, name: &str, built_at: Option<Millis>, now: Millis) {
        if let Some(e) = self.lock().get_mut(name) {
            e.state = BuildState::Ready {
                built_at: built_at.unwrap_or(now),
            };
        }
    }

    /// Records that building or importing `name` failed at `now`.
    pub(crate) fn failed(&self, name: &str, reason: String, now: Millis) {
        if let Some(e) = self.lock().get_mut(name) {
            e.state = BuildState::Failed { at: now, reason };
        }
    }

    /// Whether sandboxes of `name` can be created.
    pub(crate) fn is_ready(&self, name: &str) -> bool {
        self.lock()
            .get(name)
            .is_some_and(|e| matches!(e.state, BuildState::Ready { .. }))
    }

    /// The template `name`, if it is one.
    pub(crate) fn get(&self, name: &str) -> Option<Entry> {
        self.lock().get(name).cloned()
    }

    /// Every template, by name.
    pub(crate) fn all(&self) -> Vec<Entry> {
        self.lock().values().cloned().collect()
    }

    /// Each template's state for `/health`: `building`, `ready` or `failed: <why>`.
    pub(crate) fn health(&self) -> BTreeMap<&'static str, String> {
        self.lock()
            .iter()
            .map(|(name, e)| {
                let state = match &e.state {
                    BuildState::Building => "building".to_owned(),
                    BuildState::Ready { .. } => "ready".to_owned(),
                    BuildState::Failed { reason, .. } => format!("failed: {reason}"),
                };
                (*name, state)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_ids_are_v5_uuids_of_the_recipe() {
        let a = build_id("debian-bookworm-base-v2-u100000:bash,sudo");
        assert_eq!(a.get_version_num(), 5);
        assert_eq!(a.get_variant(), uuid::Variant::RFC4122);
        assert_eq!(a, build_id("debian-bookworm-base-v2-u100000:bash,sudo"));
        assert_ne!(a, build_id("debian-bookworm-base-v2-u100000:bash"));
    }

    #[test]
    fn build_ids_follow_rfc_4122_v5() {
        // RFC 4122's own namespace and name give the well-known v5 result.
        let dns = Uuid::from_u128(0x6ba7_b810_9dad_11d1_80b4_00c0_4fd4_30c8);
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
        ctx.update(dns.as_bytes());
        ctx.update(b"www.example.com");
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&ctx.finish().as_ref()[..16]);
        assert_eq!(
            uuid::Builder::from_sha1_bytes(bytes)
                .into_uuid()
                .to_string(),
            "2ed6657d-e927-568b-95e1-2665a8aea6a2"
        );
    }

    #[test]
    fn states_move_from_building_to_ready_or_failed() {
        let c = Catalogue::new(
            [
                ("base", "k1".to_owned()),
                ("code-interpreter-v1", "k2".to_owned()),
            ],
            Millis(5),
        );
        assert!(!c.is_ready("base"));
        assert_eq!(c.health()["base"], "building");
        c.ready("base", Some(Millis(3)), Millis(9));
        c.ready("code-interpreter-v1", None, Millis(9));
        assert!(c.is_ready("base"));
        assert_eq!(
            c.get("base").unwrap().state,
            BuildState::Ready {
                built_at: Millis(3)
            }
        );
        assert_eq!(
            c.get("code-interpreter-v1").unwrap().state,
            BuildState::Ready {
                built_at: Millis(9)
            }
        );
        c.failed("code-interpreter-v1", "no mirror".into(), Millis(10));
        assert_eq!(c.health()["code-interpreter-v1"], "failed: no mirror");
        assert!(!c.is_ready("code-interpreter-v1"));
        assert!(c.get("nope").is_none() && !c.is_ready("nope"));
        let names: Vec<&str> = c.all().iter().map(|e| e.name).collect();
        assert_eq!(names, ["base", "code-interpreter-v1"]);
        assert_eq!(c.get("base").unwrap().build_id, build_id("k1"));
    }
}
