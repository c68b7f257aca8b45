//! Snapshots and forks: a running sandbox's files captured as a storage layer.
//!
//! A snapshot is a template, as on E2B: a build of a template in the builds store
//! ([`crate::builds::store`], through its `*_in` functions, inside this module's own
//! transactions) whose layer is the capture, so `POST /sandboxes` creates from a snapshot ID
//! through the same name resolution as from any built template. This module adds
//! `snap_builds` to the registry database, which says which builds are snapshots and of which
//! sandbox. A snapshot ID is `local/<name>:<tag>` for a named snapshot (`local` is this
//! single-team gateway's namespace, E2B's team slug) and `<template id>:<tag>` otherwise.
//!
//! A fork is a capture that is no template: its sandboxes start on it directly.
//!
//! Captures are filesystem-only: the sandbox is frozen for the copy of its writable layer,
//! then thawed (a paused one stays frozen). Memory capture is not built.
//!
//! Layers made here (`s-…` for snapshots, `f-…` for forks) are collected by [`collect`]
//! once nothing uses them: no template build names them and storage refuses to delete a layer
//! a sandbox or another layer stands on ([`coppice_lifecycle::backend::BackendError::InUse`]).
//! A capture under way holds [`Snapshots::layers`] for reading until its layer is recorded or
//! its forks started, and [`collect`] holds it for writing, so a fresh layer is never taken
//! for unused.
//!
//! **Invariant:** nothing here knows HTTP statuses; `api/snapshots.rs` maps [`SnapError`].

use coppice_events::event::Event;
use coppice_lifecycle::backend::{BackendError, LayerId, SandboxId};
use coppice_lifecycle::state::SandboxState;
use rusqlite::{params, Connection, OptionalExtension};

use crate::builds::store::{self, Defaults, NewBuild};
use crate::builds::{check_name, check_tag, split_tag, BuildsError, DEFAULT_TAG};
use crate::registry::{Record, Registry, RegistryError};
use crate::runtime::{Runtime, RuntimeError};
use crate::{now, Entry, Gateway};

/// This gateway's namespace in snapshot names (E2B's team slug; one team here).
pub(crate) const NAMESPACE: &str = "local";
/// Prefix of the layers snapshots capture.
const SNAPSHOT_LAYER: &str = "s-";
/// Prefix of the layers forks capture.
const FORK_LAYER: &str = "f-";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS snap_builds (
    build_id TEXT PRIMARY KEY,
    template_id TEXT NOT NULL,
    sandbox_id TEXT NOT NULL,
    named INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS snap_builds_by_template ON snap_builds (template_id);
";

/// What can go wrong with a snapshot or a fork.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SnapError {
    /// The request is malformed; the message names the field.
    #[error("{0}")]
    Invalid(String),
    /// No such sandbox or snapshot.
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the sandbox's or the name's state.
    #[error("{0}")]
    Conflict(String),
    /// A memory snapshot was asked for; captures here are filesystem-only.
    #[error("{0}")]
    MemoryUnsupported(String),
    /// Storage or the sandbox failed.
    #[error("capture")]
    Runtime(#[from] RuntimeError),
    /// The database failed.
    #[error("snapshot records")]
    Registry(#[from] RegistryError),
    /// The templates' records failed.
    #[error("snapshot templates")]
    Store(#[from] store::StoreError),
}

impl From<BuildsError> for SnapError {
    fn from(e: BuildsError) -> Self {
        match e {
            BuildsError::Invalid(m) => Self::Invalid(m),
            BuildsError::NotFound(m) => Self::NotFound(m),
            BuildsError::Conflict(m) | BuildsError::BuiltIn(m) => Self::Conflict(m),
            BuildsError::Store(e) => Self::Store(e),
            BuildsError::Io { .. } => Self::Conflict(e.to_string()),
        }
    }
}

/// This capability's state.
#[derive(Debug, Default)]
pub(crate) struct Snapshots {
    /// Held for reading by a capture until its layer is recorded or used, and for writing by
    /// [`collect`].
    layers: tokio::sync::RwLock<()>,
}

impl Snapshots {
    /// Creates this module's table in the registry database.
    pub(crate) fn open(registry: &Registry) -> Result<Self, SnapError> {
        registry.change_with_events(&[], "create the snapshot table", |c: &Connection| {
            c.execute_batch(SCHEMA)
        })?;
        Ok(Self::default())
    }
}

/// `reference` without this gateway's namespace (`local/app:v1` is `app:v1`), for name
/// resolution; any other reference as it is.
pub(crate) fn local_name(reference: &str) -> &str {
    reference
        .strip_prefix(NAMESPACE)
        .and_then(|r| r.strip_prefix('/'))
        .unwrap_or(reference)
}

/// A snapshot name as asked: `name`, `name:tag`, `namespace/name[:tag]`. Returns the name
/// (without the namespace) and the tag, if one was given.
fn parse_name(asked: &str) -> Result<(String, Option<String>), SnapError> {
    let explicit = asked.contains(':');
    let (identifier, tag) = split_tag(asked);
    if let Some((ns, _)) = identifier.split_once('/') {
        if ns != NAMESPACE {
            return Err(SnapError::Invalid(format!(
                "invalid name {asked:?}: the namespace must be {NAMESPACE:?}, this gateway's"
            )));
        }
    }
    let name = local_name(identifier);
    check_name(name).map_err(|e| SnapError::Invalid(format!("name: {e}")))?;
    if explicit {
        check_tag(tag).map_err(|e| SnapError::Invalid(format!("name: {e}")))?;
    }
    Ok((name.to_owned(), explicit.then(|| tag.to_owned())))
}

/// One snapshot: a tag of a snapshot template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Snapshot {
    /// `local/<name>:<tag>`, or `<template id>:<tag>` for an unnamed one.
    pub(crate) id: String,
    /// `local/<name>` for a named one.
    pub(crate) names: Vec<String>,
    /// Its template.
    pub(crate) template_id: String,
    /// The sandbox it was taken from.
    pub(crate) sandbox_id: String,
    /// When its tag was last pointed at a capture (ms since the epoch).
    pub(crate) created_at: u64,
}

fn snapshot_of(name: &str, template_id: &str, tag: &str, named: bool) -> (String, Vec<String>) {
    if named {
        let full = format!("{NAMESPACE}/{name}");
        (format!("{full}:{tag}"), vec![full])
    } else {
        (format!("{template_id}:{tag}"), Vec::new())
    }
}

/// Whether the template `template_id` is a snapshot template.
fn is_snapshot(conn: &Connection, template_id: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT 1 FROM snap_builds WHERE template_id = ?1 LIMIT 1",
        params![template_id],
        |_| Ok(()),
    )
    .optional()
    .map(|found| found.is_some())
}

/// What a snapshot of `record` gives its sandboxes: its template's `USER`, `WORKDIR`, start
/// and ready commands (when it was made from a built template or a snapshot) and the
/// sandbox's environment.
fn defaults_of(gw: &Gateway, record: &Record) -> Result<Defaults, SnapError> {
    let mut defaults = if record.build_id.is_empty() {
        Defaults::default()
    } else {
        gw.builds
            .store
            .build(&record.build_id)?
            .map(|b| b.defaults)
            .unwrap_or_default()
    };
    defaults.env = record.env_vars.clone();
    Ok(defaults)
}

/// The built template (or snapshot) build `record`'s sandbox was made from, if it was made
/// from one: its forks run its start and ready commands as its creates do.
pub(crate) fn built_of(
    gw: &Gateway,
    record: &Record,
) -> Result<Option<crate::builds::Resolved>, SnapError> {
    if record.build_id.is_empty() {
        return Ok(None);
    }
    let Some(build) = gw.builds.store.build(&record.build_id)? else {
        return Ok(None);
    };
    let Some(layer) = build.layer.as_deref().and_then(|l| LayerId::new(l).ok()) else {
        return Ok(None);
    };
    Ok(Some(crate::builds::Resolved {
        limits: crate::builds::limits_of(&build),
        template_id: build.template_id,
        build_id: build.id,
        layer,
        defaults: build.defaults,
    }))
}

fn fresh_layer(prefix: &str) -> Result<LayerId, SnapError> {
    LayerId::new(format!("{prefix}{}", uuid::Uuid::new_v4().simple())).map_err(|source| {
        SnapError::Runtime(RuntimeError::Backend {
            op: "name a layer",
            source,
        })
    })
}

/// Captures the files of `entry`'s sandbox as the new layer `layer`: frozen for the copy
/// and thawed after it when running, left frozen when paused. The caller holds the entry's
/// operation lock for writing.
async fn capture(gw: &Gateway, entry: &Entry, layer: &LayerId) -> Result<(), SnapError> {
    let record = entry.record();
    match record.lifecycle.state {
        SandboxState::Running => {
            crate::freeze(&gw.runtime, entry).await?;
            let captured = gw.runtime.capture_frozen(&record.id, layer).await;
            let thawed = gw.runtime.resume(&record.id).await;
            captured.and(thawed)?;
        }
        SandboxState::Paused => gw.runtime.capture_frozen(&record.id, layer).await?,
        _ => {
            return Err(SnapError::NotFound(format!(
                "sandbox {:?} not found",
                record.id.as_str()
            )))
        }
    }
    Ok(())
}

fn entry_of(gw: &Gateway, id: &str) -> Result<std::sync::Arc<Entry>, SnapError> {
    SandboxId::new(id)
        .ok()
        .and_then(|id| gw.entry(&id))
        .filter(|e| e.record().lifecycle.state != SandboxState::Creating)
        .ok_or_else(|| SnapError::NotFound(format!("sandbox {id:?} not found")))
}

/// Takes a snapshot of the sandbox `id` named `name` (a new template, or a new build of the
/// snapshot template of that name); `memory` other than `false` asks for a memory capture,
/// which is refused.
pub(crate) async fn take(
    gw: &Gateway,
    id: &str,
    name: Option<&str>,
    memory: Option<bool>,
) -> Result<Snapshot, SnapError> {
    let parsed = name.map(parse_name).transpose()?;
    let entry = entry_of(gw, id)?;
    if memory == Some(true) {
        return Err(SnapError::MemoryUnsupported(
            "memory: true is not supported by this gateway: snapshots here capture the \
             filesystem only (send memory: false, or leave it out)"
                .into(),
        ));
    }
    if let Some((n, _)) = &parsed {
        if Runtime::knows_template(n) {
            return Err(SnapError::Conflict(format!(
                "the name {n:?} is a template built into this gateway"
            )));
        }
        if let Some(t) = gw.builds.store.template(n)? {
            let snapshot = gw
                .registry
                .with_conn(|c| is_snapshot(c, &t.id))
                .map_err(store_read)?;
            if !snapshot {
                return Err(SnapError::Conflict(format!(
                    "the name {n:?} belongs to a template that is not a snapshot"
                )));
            }
        }
    }
    let _layers = gw.snapshots.layers.read().await;
    let layer = fresh_layer(SNAPSHOT_LAYER)?;
    let record = {
        let _op = entry.op.write().await;
        // A kill may have won the lock first.
        let record = entry_of(gw, id)?.record();
        capture(gw, &entry, &layer).await?;
        record
    };
    let at = now().0;
    let new_template_id = crate::runtime::mint_id()
        .map_err(SnapError::Runtime)?
        .to_string();
    let build_id = uuid::Uuid::new_v4().to_string();
    let (template_name, tag, named) = match &parsed {
        Some((n, tag)) => (
            n.clone(),
            tag.clone().unwrap_or_else(|| DEFAULT_TAG.to_owned()),
            true,
        ),
        None => (new_template_id.clone(), DEFAULT_TAG.to_owned(), false),
    };
    let defaults = defaults_of(gw, &record)?;
    let tags = [tag.clone()];
    let new = NewBuild {
        name: &template_name,
        new_template_id: &new_template_id,
        build_id: &build_id,
        tags: &tags,
        cpu_count: crate::api::sandboxes::cpu_count(&record.limits),
        memory_mb: crate::api::sandboxes::memory_mb(&record.limits),
    };
    // The template id is known only inside the transaction (a named snapshot's template may
    // exist), and the event names the snapshot ID: the template is written first, in the
    // same transaction as the event.
    let template_id = gw
        .registry
        .with_conn(|c| {
            c.query_row(
                "SELECT id FROM tmpl_templates WHERE name = ?1",
                params![template_name],
                |r| r.get::<_, String>(0),
            )
            .optional()
        })
        .map_err(store_read)?
        .unwrap_or_else(|| new_template_id.clone());
    let (snapshot_id, names) = snapshot_of(&template_name, &template_id, &tag, named);
    let event = Event::snapshotted(&crate::context(&record), &snapshot_id, now());
    let written = gw.registry.change_with_events(
        std::slice::from_ref(&event),
        "record a snapshot",
        |tx: &Connection| -> Result<(), SnapError> {
            let (template, _) = store::request_in(tx, &new, at)?;
            if template.id != template_id {
                return Err(SnapError::Conflict(format!(
                    "the snapshot template {template_name:?} changed while it was taken"
                )));
            }
            store::ready_in(tx, &build_id, layer.as_str(), &defaults, at)?;
            tx.execute(
                "INSERT INTO snap_builds (build_id, template_id, sandbox_id, named, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    build_id,
                    template.id,
                    record.id.as_str(),
                    named,
                    i64::try_from(at).unwrap_or(i64::MAX)
                ],
            )
            .map_err(|e| SnapError::Registry(RegistryError::sql("record a snapshot build", e)))?;
            Ok(())
        },
    );
    if let Err(e) = written {
        if let Err(del) = gw.runtime.delete_layer(&layer).await {
            tracing::warn!(layer = %layer, error = %del, "removing the layer of an unrecorded snapshot");
        }
        return Err(e.into());
    }
    gw.waker.wake();
    tracing::info!(sandbox = %record.id, snapshot = %snapshot_id, layer = %layer, "snapshot taken");
    Ok(Snapshot {
        id: snapshot_id,
        names,
        template_id,
        sandbox_id: record.id.to_string(),
        created_at: at,
    })
}

fn store_read(e: rusqlite::Error) -> SnapError {
    SnapError::Registry(RegistryError::sql("read snapshots", e))
}

/// What `GET /snapshots` filters on.
#[derive(Debug, Default)]
pub(crate) struct Filter {
    /// Snapshots of this sandbox.
    pub(crate) sandbox_id: Option<String>,
    /// Snapshots of this name or template id, of this tag when one is given.
    pub(crate) name: Option<String>,
}

/// Every snapshot `filter` selects, newest first (then by ID).
pub(crate) fn list(gw: &Gateway, filter: &Filter) -> Result<Vec<Snapshot>, SnapError> {
    let (template, tag) = match &filter.name {
        None => (None, None),
        Some(asked) => {
            let explicit = asked.contains(':');
            let (identifier, tag) = split_tag(asked);
            if let Some((ns, _)) = identifier.split_once('/') {
                if ns != NAMESPACE {
                    return Err(SnapError::Invalid(format!(
                        "invalid name {asked:?}: the namespace must be {NAMESPACE:?}"
                    )));
                }
            }
            match gw.builds.store.template(local_name(identifier))? {
                Some(t) => (Some(t.id), explicit.then(|| tag.to_owned())),
                None => return Ok(Vec::new()),
            }
        }
    };
    let rows = gw
        .registry
        .with_conn(|c| -> rusqlite::Result<Vec<Snapshot>> {
            let mut stmt = c.prepare(
                "SELECT t.tag, t.created_at, s.template_id, s.sandbox_id, s.named, tt.name
                 FROM tmpl_tags t
                 JOIN snap_builds s ON s.build_id = t.build_id
                 JOIN tmpl_templates tt ON tt.id = t.template_id
                 WHERE (?1 IS NULL OR s.sandbox_id = ?1)
                   AND (?2 IS NULL OR t.template_id = ?2)
                   AND (?3 IS NULL OR t.tag = ?3)",
            )?;
            let rows = stmt.query_map(params![filter.sandbox_id, template, tag], |r| {
                let tag: String = r.get(0)?;
                let template_id: String = r.get(2)?;
                let named: bool = r.get(4)?;
                let name: String = r.get(5)?;
                let (id, names) = snapshot_of(&name, &template_id, &tag, named);
                Ok(Snapshot {
                    id,
                    names,
                    template_id,
                    sandbox_id: r.get(3)?,
                    created_at: u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                })
            })?;
            rows.collect()
        })
        .map_err(store_read)?;
    let mut rows = rows;
    rows.sort_by(|a, b| (b.created_at, &a.id).cmp(&(a.created_at, &b.id)));
    Ok(rows)
}

/// The snapshot template `reference` (a snapshot ID, with or without its tag, a name or a
/// template id) names, if it names one.
pub(crate) fn find(gw: &Gateway, reference: &str) -> Result<Option<String>, SnapError> {
    let (identifier, _) = split_tag(reference);
    let Some(t) = gw.builds.store.template(local_name(identifier))? else {
        return Ok(None);
    };
    let snapshot = gw
        .registry
        .with_conn(|c| is_snapshot(c, &t.id))
        .map_err(store_read)?;
    Ok(snapshot.then_some(t.id))
}

/// Deletes the snapshot template `template_id` with all its builds; their layers go once no
/// sandbox or layer uses them ([`collect`]).
pub(crate) async fn delete(gw: &Gateway, template_id: &str) -> Result<(), SnapError> {
    gw.registry.change_with_events(
        &[],
        "delete a snapshot",
        |tx: &Connection| -> Result<(), SnapError> {
            tx.execute(
                "DELETE FROM snap_builds WHERE template_id = ?1",
                params![template_id],
            )
            .map_err(|e| SnapError::Registry(RegistryError::sql("delete a snapshot", e)))?;
            store::delete_template_in(tx, template_id)?;
            Ok(())
        },
    )?;
    tracing::info!(template = %template_id, "snapshot deleted");
    collect(gw).await;
    Ok(())
}

/// Captures the files of the running sandbox `id` for its forks, which must start while the
/// returned guard is held (until then [`collect`] would take the layer for unused).
pub(crate) async fn capture_for_fork<'g>(
    gw: &'g Gateway,
    id: &str,
) -> Result<(Record, LayerId, tokio::sync::RwLockReadGuard<'g, ()>), SnapError> {
    let entry = entry_of(gw, id)?;
    let guard = gw.snapshots.layers.read().await;
    let layer = fresh_layer(FORK_LAYER)?;
    let _op = entry.op.write().await;
    let record = entry_of(gw, id)?.record();
    if record.lifecycle.state == SandboxState::Paused {
        return Err(SnapError::Conflict(format!(
            "sandbox {id:?} is paused; resume it to fork it"
        )));
    }
    capture(gw, &entry, &layer).await?;
    tracing::info!(sandbox = %record.id, layer = %layer, "captured for forks");
    Ok((record, layer, guard))
}

/// Deletes the layers snapshots and forks made that nothing uses any more: no template build
/// names them, and storage refuses those a sandbox or another layer stands on.
pub(crate) async fn collect(gw: &Gateway) {
    let _layers = gw.snapshots.layers.write().await;
    let layers = match gw.runtime.layers().await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "listing layers to collect");
            return;
        }
    };
    let named = gw.registry.with_conn(|c| -> rusqlite::Result<Vec<String>> {
        let mut stmt = c.prepare("SELECT layer FROM tmpl_builds WHERE layer IS NOT NULL")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        rows.collect()
    });
    let named: std::collections::HashSet<String> = match named {
        Ok(n) => n.into_iter().collect(),
        Err(e) => {
            tracing::warn!(error = %e, "reading the layers templates use");
            return;
        }
    };
    for layer in layers.into_iter().map(|l| l.id) {
        let ours =
            layer.as_str().starts_with(SNAPSHOT_LAYER) || layer.as_str().starts_with(FORK_LAYER);
        if !ours || named.contains(layer.as_str()) {
            continue;
        }
        match gw.runtime.delete_layer(&layer).await {
            Ok(()) => tracing::info!(layer = %layer, "unused layer deleted"),
            Err(BackendError::InUse { .. } | BackendError::NotFound { .. }) => {}
            Err(e) => tracing::warn!(layer = %layer, error = %e, "deleting an unused layer"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_take_this_namespace_or_none() {
        assert_eq!(parse_name("snap").unwrap(), ("snap".into(), None));
        assert_eq!(
            parse_name("local/snap:v2").unwrap(),
            ("snap".into(), Some("v2".into()))
        );
        assert!(matches!(
            parse_name("other/snap"),
            Err(SnapError::Invalid(m)) if m.contains("namespace")
        ));
        assert!(matches!(parse_name("Snap"), Err(SnapError::Invalid(m)) if m.starts_with("name")));
        assert!(matches!(parse_name("s:"), Err(SnapError::Invalid(_))));
        assert_eq!(local_name("local/app:v1"), "app:v1");
        assert_eq!(local_name("app"), "app");
        assert_eq!(local_name("localx/app"), "localx/app");
    }

    #[test]
    fn snapshot_ids_are_e2b_shaped() {
        assert_eq!(
            snapshot_of("snap", "tid", "default", true),
            ("local/snap:default".into(), vec!["local/snap".into()])
        );
        assert_eq!(
            snapshot_of("tid", "tid", "default", false),
            ("tid:default".into(), vec![])
        );
    }
}
