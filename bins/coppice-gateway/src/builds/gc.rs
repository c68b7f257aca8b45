//! Layer garbage collection after a template is deleted.
//!
//! Layers builds made (`b-...`: each filesystem step's result) and images pulled
//! (`i1-...`) are collected once no template build, step cache entry or sandbox uses them.
//! A deleted template's layers are still named by the step cache, so its deletion first
//! forgets the cache entries whose layers only it used (a layer that a remaining build
//! stands on, directly or through its parents, is kept with its entry); then every
//! candidate layer that nothing remaining names, directly or as an ancestor, is deleted,
//! children first. Storage refuses to delete a layer a sandbox or another layer uses
//! (`InUse`), which is the last guard: such a layer stays for a later collection.
//! Built-in templates' layers and sandbox snapshots are never candidates.
//!
//! Collection is skipped while a build runs: a build's layers are named by nothing until
//! their step is cached, and an image's until the build ends.

use std::collections::{HashMap, HashSet};

use coppice_lifecycle::backend::LayerId;

use crate::Gateway;

/// What one collection did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Collected {
    /// Layers deleted.
    pub(crate) layers: Vec<String>,
    /// Bytes they held on disk by themselves.
    pub(crate) bytes: u64,
    /// Step cache entries forgotten.
    pub(crate) cache_entries: usize,
    /// Set when a running build deferred collection.
    pub(crate) deferred: bool,
}

/// Whether `id` names a layer builds make (a step's result or a pulled image).
fn collectable(id: &str) -> bool {
    id.starts_with("b-") || id.starts_with(crate::builds::image::LAYER_PREFIX)
}

/// `roots` and all their ancestors, by `parents`.
fn closure<'a>(
    roots: impl IntoIterator<Item = &'a str>,
    parents: &'a HashMap<String, Option<String>>,
) -> HashSet<&'a str> {
    let mut out = HashSet::new();
    let mut todo: Vec<&str> = roots.into_iter().collect();
    while let Some(id) = todo.pop() {
        let Some((key, parent)) = parents.get_key_value(id) else {
            continue;
        };
        if out.insert(key.as_str()) {
            if let Some(p) = parent {
                todo.push(p.as_str());
            }
        }
    }
    out
}

/// Collects after the template whose builds had `dropped` layers was deleted.
pub(crate) async fn collect(gw: &Gateway, dropped: &[String]) -> Result<Collected, String> {
    let builds = &gw.builds;
    if builds.store.any_building().map_err(|e| e.to_string())? {
        return Ok(Collected {
            deferred: true,
            ..Collected::default()
        });
    }
    let infos = gw
        .runtime
        .layers()
        .await
        .map_err(|e| crate::api::error::error_chain(&e))?;
    let parents: HashMap<String, Option<String>> = infos
        .iter()
        .map(|l| {
            (
                l.id.as_str().to_owned(),
                l.parent.as_ref().map(|p| p.as_str().to_owned()),
            )
        })
        .collect();
    let sizes: HashMap<&str, u64> = infos
        .iter()
        .map(|l| (l.id.as_str(), l.disk_bytes))
        .collect();
    let remaining = builds.store.build_layers().map_err(|e| e.to_string())?;
    let kept = closure(remaining.iter().map(String::as_str), &parents);
    // The deleted template's layers and their ancestors that no remaining build uses: the
    // cache entries naming them go.
    let orphaned: HashSet<&str> = closure(dropped.iter().map(String::as_str), &parents)
        .into_iter()
        .filter(|l| !kept.contains(l))
        .collect();
    let mut result = Collected::default();
    let mut cached = Vec::new();
    for (key, layer) in builds.store.cache_entries().map_err(|e| e.to_string())? {
        if orphaned.contains(layer.as_str()) {
            builds
                .store
                .forget_cached(&key)
                .map_err(|e| e.to_string())?;
            result.cache_entries += 1;
        } else {
            cached.push(layer);
        }
    }
    let in_use: HashSet<&str> = kept
        .iter()
        .copied()
        .chain(closure(cached.iter().map(String::as_str), &parents))
        .collect();
    let mut candidates: Vec<&str> = parents
        .keys()
        .map(String::as_str)
        .filter(|id| collectable(id) && !in_use.contains(id))
        .collect();
    // Children before their parents: by depth, deepest first.
    let depth = |id: &str| {
        let mut d = 0usize;
        let mut at = parents.get(id).and_then(Option::as_deref);
        while let Some(p) = at {
            d += 1;
            at = parents.get(p).and_then(Option::as_deref);
        }
        d
    };
    candidates.sort_by_key(|id| std::cmp::Reverse(depth(id)));
    for id in candidates {
        let Ok(layer) = LayerId::new(id) else {
            continue;
        };
        match gw.runtime.delete_layer(&layer).await {
            Ok(()) => {
                result.layers.push(id.to_owned());
                result.bytes += sizes.get(id).copied().unwrap_or(0);
                if id.starts_with(crate::builds::image::LAYER_PREFIX) {
                    let meta = builds.image_meta_path(id);
                    if let Err(e) = std::fs::remove_file(&meta) {
                        if e.kind() != std::io::ErrorKind::NotFound {
                            tracing::warn!(path = %meta.display(), error = %e, "removing an image's defaults failed");
                        }
                    }
                }
            }
            Err(e) => {
                tracing::info!(layer = id, reason = %crate::api::error::error_chain(&e), "layer kept");
            }
        }
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closures_follow_parents() {
        let parents: HashMap<String, Option<String>> = [
            ("base", None),
            ("b-1", Some("base")),
            ("b-2", Some("b-1")),
            ("b-3", Some("base")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.map(str::to_owned)))
        .collect();
        let c = closure(["b-2"], &parents);
        assert_eq!(c, HashSet::from(["b-2", "b-1", "base"]));
        assert!(closure(["nope"], &parents).is_empty());
        assert!(collectable("b-1") && collectable("i1-ab") && !collectable("base"));
    }
}
