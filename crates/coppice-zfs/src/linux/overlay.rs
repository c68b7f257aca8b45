//! The overlay driver: layers are plain directory trees, a sandbox root is an overlayfs
//! stack the jail mounts.
//!
//! Layout under the storage root:
//!
//! ```text
//! layers/<id>/tree/          the layer's files (immutable)
//! layers/<id>/layer.json     kind, parent, created, disk bytes
//! sandboxes/<id>/upper/      the sandbox's writable layer
//! sandboxes/<id>/work/       overlayfs work dir
//! sandboxes/<id>/sandbox.json  its base layer
//! tmp/                       staging of unfinished operations and trees being deleted
//! .lock                      flock held by every mutating operation
//! ```
//!
//! Every object is built complete, metadata included, under `tmp/`, made durable with
//! `syncfs`, and published by one `rename`; deletion is the reverse (rename into `tmp/`,
//! then remove). So a crash leaves only `tmp/` entries, which [`OverlayStorage::open`]
//! removes, and a directory under `layers/` or `sandboxes/` is always complete.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use coppice_lifecycle::backend::{
    BackendError, Capabilities, Capability, DiskUsage, LayerId, LayerInfo, LayerKind, RootfsSpec,
    SandboxId, Storage,
};
use nix::fcntl::Flock;
use serde::{Deserialize, Serialize};

use super::tree::{self, CopyMode};

/// Longest chain of layers followed before the metadata is declared corrupt (overlayfs
/// itself stacks at most 500 lower layers).
const MAX_CHAIN: usize = 500;

/// Storage as overlayfs layers in a directory. See the module docs for the layout.
#[derive(Debug, Clone)]
pub struct OverlayStorage {
    inner: Arc<Layout>,
}

/// The paths of one storage root; every blocking operation is a method on it.
#[derive(Debug)]
struct Layout {
    root: PathBuf,
}

/// `layers/<id>/layer.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LayerMeta {
    kind: LayerKind,
    parent: Option<LayerId>,
    created_unix: u64,
    disk_bytes: u64,
}

/// `sandboxes/<id>/sandbox.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SandboxMeta {
    base: LayerId,
    created_unix: u64,
}

impl OverlayStorage {
    /// Opens (creating if needed) the storage rooted at `root`, and recovers from any crash:
    /// staging trees of unfinished operations are removed, and so is anything under
    /// `layers/` or `sandboxes/` without valid metadata.
    pub fn open(root: PathBuf) -> Result<Self, BackendError> {
        let layout = Layout { root };
        for dir in [
            layout.root.clone(),
            layout.layers_dir(),
            layout.sandboxes_dir(),
            layout.tmp_dir(),
        ] {
            fs::create_dir_all(&dir).map_err(|e| BackendError::io("create", &dir, e))?;
        }
        layout.recover()?;
        Ok(Self {
            inner: Arc::new(layout),
        })
    }

    /// The storage root.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The directory tree of layer `id` (whether or not it exists).
    pub fn layer_tree(&self, id: &LayerId) -> PathBuf {
        self.inner.layer_tree(id)
    }

    /// [`Storage::probe`] plus whether the filesystem of `dir` (the intended storage root)
    /// can reflink, which decides whether snapshots share data with their source.
    pub fn probe_at(dir: &Path) -> Result<Capabilities, BackendError> {
        let mut caps = <Self as Storage>::probe()?;
        let (available, detail) = match tree::reflink_supported(dir) {
            Ok(true) => (true, format!("FICLONE works in {}", dir.display())),
            Ok(false) => (
                false,
                format!(
                    "{} cannot reflink; snapshots are full copies",
                    dir.display()
                ),
            ),
            Err(e) => (false, e.to_string()),
        };
        caps.features.push(Capability {
            name: "reflink".into(),
            available,
            detail,
        });
        Ok(caps)
    }

    /// Runs `op` on the blocking pool.
    async fn blocking<T, F>(&self, op: F) -> Result<T, BackendError>
    where
        T: Send + 'static,
        F: FnOnce(&Layout) -> Result<T, BackendError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || op(&inner))
            .await
            .map_err(|e| {
                BackendError::io("join storage task", PathBuf::new(), io::Error::other(e))
            })?
    }
}

impl Storage for OverlayStorage {
    fn probe() -> Result<Capabilities, BackendError> {
        let filesystems = fs::read_to_string("/proc/filesystems").unwrap_or_default();
        let overlay = filesystems
            .lines()
            .any(|l| l.split_whitespace().last() == Some("overlay"));
        let cp = ["/usr/bin/cp", "/bin/cp"]
            .iter()
            .find(|p| Path::new(p).exists());
        let root = nix::unistd::geteuid().is_root();
        Ok(Capabilities {
            driver: "overlay".into(),
            features: vec![
                Capability {
                    name: "overlayfs".into(),
                    available: overlay,
                    detail: if overlay {
                        "listed in /proc/filesystems".into()
                    } else {
                        "overlay is not in /proc/filesystems".into()
                    },
                },
                Capability {
                    name: "cp".into(),
                    available: cp.is_some(),
                    detail: cp.map_or_else(|| "coreutils cp not found".into(), |p| (*p).into()),
                },
                Capability {
                    name: "root".into(),
                    available: root,
                    detail: if root {
                        "can chown upper dirs and copy whiteouts and trusted.* xattrs".into()
                    } else {
                        "not root: cannot chown upper dirs or copy whiteouts".into()
                    },
                },
            ],
        })
    }

    async fn import_template(
        &self,
        name: &LayerId,
        source: &Path,
    ) -> Result<LayerInfo, BackendError> {
        let (name, source) = (name.clone(), source.to_path_buf());
        self.blocking(move |l| l.import_template(&name, &source))
            .await
    }

    async fn create_rootfs(
        &self,
        sandbox: &SandboxId,
        base: &LayerId,
    ) -> Result<RootfsSpec, BackendError> {
        let (sandbox, base) = (sandbox.clone(), base.clone());
        self.blocking(move |l| l.create_rootfs(&sandbox, &base))
            .await
    }

    async fn rootfs(&self, sandbox: &SandboxId) -> Result<RootfsSpec, BackendError> {
        let sandbox = sandbox.clone();
        self.blocking(move |l| l.rootfs(&sandbox)).await
    }

    async fn snapshot(
        &self,
        sandbox: &SandboxId,
        name: &LayerId,
    ) -> Result<LayerInfo, BackendError> {
        let (sandbox, name) = (sandbox.clone(), name.clone());
        self.blocking(move |l| l.snapshot(&sandbox, &name)).await
    }

    async fn remove_rootfs(&self, sandbox: &SandboxId) -> Result<(), BackendError> {
        let sandbox = sandbox.clone();
        self.blocking(move |l| l.remove_rootfs(&sandbox)).await
    }

    async fn delete_layer(&self, id: &LayerId) -> Result<(), BackendError> {
        let id = id.clone();
        self.blocking(move |l| l.delete_layer(&id)).await
    }

    async fn layers(&self) -> Result<Vec<LayerInfo>, BackendError> {
        self.blocking(Layout::layers).await
    }

    async fn sandboxes(&self) -> Result<Vec<SandboxId>, BackendError> {
        self.blocking(Layout::sandboxes).await
    }

    async fn usage(&self, sandbox: &SandboxId) -> Result<DiskUsage, BackendError> {
        let sandbox = sandbox.clone();
        self.blocking(move |l| l.usage(&sandbox)).await
    }
}

/// Distinguishes staging directories of concurrent operations in one process.
static STAGING_SEQ: AtomicU64 = AtomicU64::new(0);

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn to_json<T: Serialize>(value: &T, path: &Path) -> Result<Vec<u8>, BackendError> {
    serde_json::to_vec_pretty(value)
        .map_err(|e| BackendError::io("serialize", path, io::Error::other(e)))
}

impl Layout {
    fn layers_dir(&self) -> PathBuf {
        self.root.join("layers")
    }

    fn sandboxes_dir(&self) -> PathBuf {
        self.root.join("sandboxes")
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn layer_dir(&self, id: &LayerId) -> PathBuf {
        self.layers_dir().join(id.as_str())
    }

    fn layer_tree(&self, id: &LayerId) -> PathBuf {
        self.layer_dir(id).join("tree")
    }

    fn sandbox_dir(&self, id: &SandboxId) -> PathBuf {
        self.sandboxes_dir().join(id.as_str())
    }

    /// Serializes mutating operations across threads and processes.
    fn lock(&self) -> Result<Flock<fs::File>, BackendError> {
        tree::lock_exclusive(&self.root.join(".lock"), &mut || {})
    }

    /// A fresh, empty directory under `tmp/` for building `what`.
    fn staging(&self, what: &str) -> Result<PathBuf, BackendError> {
        let seq = STAGING_SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = self
            .tmp_dir()
            .join(format!("{what}-{}-{seq}", std::process::id()));
        tree::remove(&dir)?;
        fs::create_dir(&dir).map_err(|e| BackendError::io("create staging dir", &dir, e))?;
        Ok(dir)
    }

    /// Makes `staging` durable and renames it to `target` in one step.
    fn publish(&self, staging: &Path, target: &Path) -> Result<(), BackendError> {
        tree::sync_filesystem(staging)?;
        fs::rename(staging, target).map_err(|e| BackendError::io("publish", target, e))?;
        tree::fsync_dir(target.parent().unwrap_or(&self.root))
    }

    /// Publishes a sandbox's writable layer: atomic against a crash of this process (the
    /// rename), but not flushed to disk. A sandbox's processes do not survive a power loss or
    /// a kernel crash either, so durability would only buy a `syncfs` of the whole
    /// filesystem on every start (3 ms here, and more under write load).
    fn publish_volatile(&self, staging: &Path, target: &Path) -> Result<(), BackendError> {
        fs::rename(staging, target).map_err(|e| BackendError::io("publish", target, e))
    }

    /// Unpublishes `path` by one rename into `tmp/`, then removes it. A crash after the
    /// rename leaves only a `tmp/` entry for [`Layout::recover`].
    fn retire(&self, path: &Path, what: &str) -> Result<(), BackendError> {
        let doomed = self.unpublish(path, what)?;
        tree::remove(&doomed)
    }

    /// The first half of [`Layout::retire`]: renames `path` into `tmp/` and returns where it
    /// went. Removing it needs no lock, since nothing refers to a `tmp/` entry.
    fn unpublish(&self, path: &Path, what: &str) -> Result<PathBuf, BackendError> {
        let seq = STAGING_SEQ.fetch_add(1, Ordering::Relaxed);
        let doomed = self
            .tmp_dir()
            .join(format!("deleting-{what}-{}-{seq}", std::process::id()));
        fs::rename(path, &doomed).map_err(|e| BackendError::io("unpublish", path, e))?;
        tree::fsync_dir(path.parent().unwrap_or(&self.root))?;
        Ok(doomed)
    }

    fn recover(&self) -> Result<(), BackendError> {
        let _lock = self.lock()?;
        for entry in read_dir(&self.tmp_dir())? {
            tracing::info!(path = %entry.display(), "removing leftover of an unfinished operation");
            // A leftover is never published, so failing to remove it now harms nothing: a
            // copy orphaned by a crashed process (`cp` outlives a `kill -9`d parent) may still
            // be writing into it. It goes at a later open; opening must not fail over it.
            if let Err(e) = tree::remove(&entry) {
                tracing::warn!(path = %entry.display(), error = %e, "leftover not removed yet");
            }
        }
        for entry in read_dir(&self.layers_dir())? {
            let valid = entry
                .file_name()
                .and_then(|n| LayerId::new(n.to_string_lossy()).ok())
                .is_some_and(|id| matches!(self.layer_meta(&id), Ok(Some(_))));
            if !valid {
                tracing::warn!(path = %entry.display(), "removing layer without valid metadata");
                self.retire(&entry, "invalid-layer")?;
            }
        }
        for entry in read_dir(&self.sandboxes_dir())? {
            let valid = entry
                .file_name()
                .and_then(|n| SandboxId::new(n.to_string_lossy()).ok())
                .is_some_and(|id| matches!(self.sandbox_meta(&id), Ok(Some(_))));
            if !valid {
                tracing::warn!(path = %entry.display(), "removing sandbox root without valid metadata");
                self.retire(&entry, "invalid-sandbox")?;
            }
        }
        Ok(())
    }

    fn layer_meta(&self, id: &LayerId) -> Result<Option<LayerMeta>, BackendError> {
        let path = self.layer_dir(id).join("layer.json");
        let Some(bytes) = tree::read_optional(&path)? else {
            return Ok(None);
        };
        let meta = serde_json::from_slice(&bytes)
            .map_err(|e| BackendError::io("parse", &path, io::Error::other(e)))?;
        Ok(self.layer_tree(id).is_dir().then_some(meta))
    }

    fn sandbox_meta(&self, id: &SandboxId) -> Result<Option<SandboxMeta>, BackendError> {
        let path = self.sandbox_dir(id).join("sandbox.json");
        let Some(bytes) = tree::read_optional(&path)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| BackendError::io("parse", &path, io::Error::other(e)))
    }

    fn require_sandbox(&self, id: &SandboxId) -> Result<SandboxMeta, BackendError> {
        self.sandbox_meta(id)?
            .ok_or_else(|| BackendError::NotFound {
                kind: "sandbox",
                id: id.to_string(),
            })
    }

    /// `id` and the layers beneath it, topmost first.
    fn chain(&self, id: &LayerId) -> Result<Vec<(LayerId, LayerMeta)>, BackendError> {
        let mut chain = Vec::new();
        let mut next = Some(id.clone());
        while let Some(id) = next {
            let meta = self
                .layer_meta(&id)?
                .ok_or_else(|| BackendError::NotFound {
                    kind: "layer",
                    id: id.to_string(),
                })?;
            if chain.len() >= MAX_CHAIN || chain.iter().any(|(c, _)| c == &id) {
                return Err(BackendError::InvalidSpec {
                    field: "layer chain",
                    reason: format!("the parents of layer {id:?} loop or exceed {MAX_CHAIN}"),
                });
            }
            next = meta.parent.clone();
            chain.push((id, meta));
        }
        Ok(chain)
    }

    fn spec(&self, id: &SandboxId, meta: &SandboxMeta) -> Result<RootfsSpec, BackendError> {
        let dir = self.sandbox_dir(id);
        Ok(RootfsSpec::Overlay {
            lower: self
                .chain(&meta.base)?
                .iter()
                .map(|(l, _)| self.layer_tree(l))
                .collect(),
            upper: dir.join("upper"),
            work: dir.join("work"),
        })
    }

    /// Publishes the tree in `staging/tree` as layer `id`.
    fn publish_layer(
        &self,
        staging: &Path,
        id: &LayerId,
        kind: LayerKind,
        parent: Option<LayerId>,
    ) -> Result<LayerInfo, BackendError> {
        let meta = LayerMeta {
            kind,
            parent: parent.clone(),
            created_unix: now_unix(),
            disk_bytes: tree::disk_bytes(&staging.join("tree"))?,
        };
        let meta_path = staging.join("layer.json");
        fs::write(&meta_path, to_json(&meta, &meta_path)?)
            .map_err(|e| BackendError::io("write", &meta_path, e))?;
        self.publish(staging, &self.layer_dir(id))?;
        Ok(LayerInfo {
            id: id.clone(),
            parent,
            kind,
            disk_bytes: meta.disk_bytes,
        })
    }

    fn refuse_existing_layer(&self, id: &LayerId) -> Result<(), BackendError> {
        if self.layer_dir(id).exists() {
            return Err(BackendError::AlreadyExists {
                kind: "layer",
                id: id.to_string(),
            });
        }
        Ok(())
    }

    fn import_template(&self, name: &LayerId, source: &Path) -> Result<LayerInfo, BackendError> {
        match fs::metadata(source) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(BackendError::InvalidSpec {
                    field: "template source",
                    reason: format!("{} is not a directory", source.display()),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(BackendError::NotFound {
                    kind: "template source",
                    id: source.display().to_string(),
                })
            }
            Err(e) => return Err(BackendError::io("stat", source, e)),
        }
        self.refuse_existing_layer(name)?;
        // The copy (seconds for a large template) goes into a staging directory private to
        // this call, outside the storage lock, so sandboxes keep being created meanwhile;
        // only publishing takes the lock.
        let staging = self.staging(&format!("layer-{name}"))?;
        // Layers and the template cache are both immutable, so on one filesystem the layer
        // can share every inode with its source: no data is copied at all.
        let mode = if tree::same_filesystem(source, &staging)? {
            CopyMode::Hardlink
        } else {
            CopyMode::Reflink
        };
        let result = tree::copy(source, &staging.join("tree"), mode).and_then(|()| {
            let _lock = self.lock()?;
            self.refuse_existing_layer(name)?;
            self.publish_layer(&staging, name, LayerKind::Template, None)
        });
        if result.is_err() {
            tree::remove(&staging)?;
        }
        result
    }

    fn create_rootfs(
        &self,
        sandbox: &SandboxId,
        base: &LayerId,
    ) -> Result<RootfsSpec, BackendError> {
        // The root is built outside the storage lock, so concurrent creates overlap; only the
        // checks that must agree with `delete_layer` and the publishing rename take it.
        if self.sandbox_dir(sandbox).exists() {
            return Err(BackendError::AlreadyExists {
                kind: "sandbox",
                id: sandbox.to_string(),
            });
        }
        self.chain(base)?;
        let staging = self.staging(&format!("sandbox-{sandbox}"))?;
        let result = (|| {
            let base_root = self.layer_tree(base);
            let root_meta =
                fs::metadata(&base_root).map_err(|e| BackendError::io("stat", &base_root, e))?;
            // The upper root is the sandbox's `/` once mounted: it must look like the base's
            // root (owned by the shifted root uid), or `/` is unwritable in the sandbox.
            let upper = staging.join("upper");
            fs::create_dir(&upper).map_err(|e| BackendError::io("create", &upper, e))?;
            std::os::unix::fs::chown(&upper, Some(root_meta.uid()), Some(root_meta.gid()))
                .map_err(|e| BackendError::io("chown", &upper, e))?;
            fs::set_permissions(
                &upper,
                fs::Permissions::from_mode(root_meta.mode() & 0o7777),
            )
            .map_err(|e| BackendError::io("chmod", &upper, e))?;
            let work = staging.join("work");
            fs::create_dir(&work).map_err(|e| BackendError::io("create", &work, e))?;
            let meta = SandboxMeta {
                base: base.clone(),
                created_unix: now_unix(),
            };
            let meta_path = staging.join("sandbox.json");
            fs::write(&meta_path, to_json(&meta, &meta_path)?)
                .map_err(|e| BackendError::io("write", &meta_path, e))?;
            {
                let _lock = self.lock()?;
                if self.sandbox_dir(sandbox).exists() {
                    return Err(BackendError::AlreadyExists {
                        kind: "sandbox",
                        id: sandbox.to_string(),
                    });
                }
                // The base may have been deleted while the root was built.
                self.chain(base)?;
                self.publish_volatile(&staging, &self.sandbox_dir(sandbox))?;
            }
            self.spec(sandbox, &meta)
        })();
        if result.is_err() && staging.exists() {
            tree::remove(&staging)?;
        }
        result
    }

    fn rootfs(&self, sandbox: &SandboxId) -> Result<RootfsSpec, BackendError> {
        let meta = self.require_sandbox(sandbox)?;
        self.spec(sandbox, &meta)
    }

    fn snapshot(&self, sandbox: &SandboxId, name: &LayerId) -> Result<LayerInfo, BackendError> {
        let _lock = self.lock()?;
        let meta = self.require_sandbox(sandbox)?;
        self.refuse_existing_layer(name)?;
        let staging = self.staging(&format!("layer-{name}"))?;
        // The upper dir changes while the sandbox runs; the caller has frozen it, and a
        // copy (not a hard link) keeps the layer immutable when the sandbox resumes.
        let upper = self.sandbox_dir(sandbox).join("upper");
        let result = tree::copy(&upper, &staging.join("tree"), CopyMode::Reflink).and_then(|()| {
            self.publish_layer(&staging, name, LayerKind::Snapshot, Some(meta.base.clone()))
        });
        if result.is_err() {
            tree::remove(&staging)?;
        }
        result
    }

    fn remove_rootfs(&self, sandbox: &SandboxId) -> Result<(), BackendError> {
        let doomed = {
            let _lock = self.lock()?;
            self.require_sandbox(sandbox)?;
            self.unpublish(&self.sandbox_dir(sandbox), &format!("sandbox-{sandbox}"))?
        };
        // The files go outside the lock: other creates and removals need not wait for them.
        tree::remove(&doomed)
    }

    fn delete_layer(&self, id: &LayerId) -> Result<(), BackendError> {
        let _lock = self.lock()?;
        self.chain(id)?;
        let mut dependents = Vec::new();
        for other in self.sandboxes()? {
            let Some(meta) = self.sandbox_meta(&other)? else {
                continue;
            };
            if self.chain(&meta.base)?.iter().any(|(l, _)| l == id) {
                dependents.push(format!("sandbox {other}"));
            }
        }
        for layer in self.layers()? {
            if &layer.id != id && self.chain(&layer.id)?.iter().any(|(l, _)| l == id) {
                dependents.push(format!("layer {}", layer.id));
            }
        }
        if !dependents.is_empty() {
            return Err(BackendError::InUse {
                kind: "layer",
                id: id.to_string(),
                dependents,
            });
        }
        self.retire(&self.layer_dir(id), &format!("layer-{id}"))
    }

    fn layers(&self) -> Result<Vec<LayerInfo>, BackendError> {
        let mut out = Vec::new();
        for entry in read_dir(&self.layers_dir())? {
            let Some(id) = entry
                .file_name()
                .and_then(|n| LayerId::new(n.to_string_lossy()).ok())
            else {
                continue;
            };
            // A layer being deleted concurrently, or one without metadata, is not listed.
            if let Ok(Some(meta)) = self.layer_meta(&id) {
                out.push(LayerInfo {
                    id,
                    parent: meta.parent,
                    kind: meta.kind,
                    disk_bytes: meta.disk_bytes,
                });
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    fn sandboxes(&self) -> Result<Vec<SandboxId>, BackendError> {
        let mut out: Vec<SandboxId> = read_dir(&self.sandboxes_dir())?
            .iter()
            .filter_map(|p| {
                p.file_name()
                    .and_then(|n| SandboxId::new(n.to_string_lossy()).ok())
            })
            .filter(|id| matches!(self.sandbox_meta(id), Ok(Some(_))))
            .collect();
        out.sort();
        Ok(out)
    }

    fn usage(&self, sandbox: &SandboxId) -> Result<DiskUsage, BackendError> {
        let meta = self.require_sandbox(sandbox)?;
        let written_bytes = tree::disk_bytes(&self.sandbox_dir(sandbox).join("upper"))?;
        let shared_bytes = self
            .chain(&meta.base)?
            .iter()
            .map(|(_, m)| m.disk_bytes)
            .fold(0u64, u64::saturating_add);
        Ok(DiskUsage {
            written_bytes,
            shared_bytes,
        })
    }
}

/// The entries of `dir`, sorted.
fn read_dir(dir: &Path) -> Result<Vec<PathBuf>, BackendError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| BackendError::io("read dir", dir, e))? {
        out.push(
            entry
                .map_err(|e| BackendError::io("read dir", dir, e))?
                .path(),
        );
    }
    out.sort();
    Ok(out)
}
