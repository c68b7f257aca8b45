//! The zfs driver: layers are zfs snapshots, sandbox roots are clones of them.
//!
//! Under the root dataset (`ZfsConfig::root`, e.g. `pool/coppice`):
//!
//! ```text
//! templates/<name>          a template's files, readonly=on
//! templates/<name>@sealed   the snapshot sandboxes are cloned from
//! sandboxes/<id>            a sandbox's root: a clone of a layer snapshot
//! sandboxes/<id>@<layer>    a snapshot layer of that sandbox
//! retired/<id>-<n>          a removed sandbox kept for its snapshot layers
//! ```
//!
//! Completion is marked with the user property `coppice:state=ready`, set last (on the
//! template dataset, on the snapshot) or atomically (`zfs clone -o`); [`ZfsStorage::open`]
//! destroys whatever lacks it. A removed sandbox whose snapshots are layers is retired in
//! place (`coppice:state=retired`, `mountpoint=none`): destroying it would destroy those
//! layers and the clones of them, and zfs-fuse cannot rename a dataset while a clone of its
//! snapshot is mounted. It is moved to `retired/` only when its id is reused, and destroyed
//! when its last layer is deleted. This driver only builds command lines, so it compiles on
//! every OS and its plans are unit-tested with `testing::RecordingRunner` (feature `test-util`).

mod inventory;
mod runner;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use coppice_lifecycle::backend::{
    BackendError, Capabilities, Capability, DiskUsage, LayerId, LayerInfo, LayerKind, RootfsSpec,
    SandboxId, Storage,
};

use crate::command;
use inventory::{Inventory, Layer, PROPERTIES, READY, RETIRED, SEALED};
pub use runner::{CommandOutput, CommandRunner, SystemRunner};

/// Where and how the zfs driver works.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZfsConfig {
    /// The dataset everything lives under, e.g. `pool/coppice`; created if missing. Its
    /// mountpoint (inherited or set) decides where sandbox roots appear.
    pub root: String,
    /// The `zfs` program.
    pub zfs: String,
    /// The `cp` program that copies a template's files in (`cp -a`).
    pub cp: String,
    /// Waits between retries of a command that failed with "dataset is busy" (zfs-fuse
    /// reports that for a while after a clone is created or a file is closed).
    pub busy_backoff: Vec<Duration>,
    /// How long one `zfs` command may run before it is killed: a wedged zfs-fuse must fail
    /// the operation, not hang it. A command that times out is not retried.
    pub command_timeout: Duration,
    /// How long copying a template's files in (`cp -a`) may run before it is killed.
    pub copy_timeout: Duration,
}

impl ZfsConfig {
    /// Defaults for the root dataset `root`: `zfs` and `cp` from `PATH`, busy retries for up
    /// to about six seconds, a minute per `zfs` command and ten minutes for a template copy.
    pub fn new(root: impl Into<String>) -> Self {
        Self {
            root: root.into(),
            zfs: "zfs".into(),
            cp: "cp".into(),
            busy_backoff: [50, 100, 200, 400, 800, 1600, 3200]
                .into_iter()
                .map(Duration::from_millis)
                .collect(),
            command_timeout: command::ZFS,
            copy_timeout: command::TREE_COPY,
        }
    }

    fn validate(&self) -> Result<(), BackendError> {
        let ok = !self.root.is_empty()
            && self.root.split('/').all(|c| {
                !c.is_empty()
                    && c.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':')
                    })
            });
        if ok {
            Ok(())
        } else {
            Err(BackendError::InvalidSpec {
                field: "zfs root dataset",
                reason: format!(
                    "{:?} is not a dataset name like pool/coppice (components of [A-Za-z0-9_.:-])",
                    self.root
                ),
            })
        }
    }
}

/// Storage as zfs datasets, snapshots and clones. See the module docs.
#[derive(Debug)]
pub struct ZfsStorage<R: CommandRunner = SystemRunner> {
    inner: Arc<Inner<R>>,
}

impl<R: CommandRunner> Clone for ZfsStorage<R> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

#[derive(Debug)]
struct Inner<R> {
    config: ZfsConfig,
    runner: R,
    /// Serializes every operation that changes datasets, so a delete never races a clone.
    /// One process owns a root dataset; two processes on one root are not supported.
    lock: tokio::sync::Mutex<()>,
}

impl<R: CommandRunner> ZfsStorage<R> {
    /// Opens (creating if needed) the root dataset and its `templates`, `sandboxes` and
    /// `retired` children, then destroys whatever a crash left half-made: datasets and
    /// snapshots without `coppice:state=ready`, and retired sandboxes that hold no layer.
    pub async fn open(config: ZfsConfig, runner: R) -> Result<Self, BackendError> {
        config.validate()?;
        let storage = Self {
            inner: Arc::new(Inner {
                config,
                runner,
                lock: tokio::sync::Mutex::new(()),
            }),
        };
        let guard = storage.inner.lock.lock().await;
        storage.ensure_layout().await?;
        storage.recover().await?;
        drop(guard);
        Ok(storage)
    }

    /// The runner, e.g. to read what a `testing::RecordingRunner` (feature `test-util`) recorded.
    pub fn runner(&self) -> &R {
        &self.inner.runner
    }

    /// The configuration.
    pub fn config(&self) -> &ZfsConfig {
        &self.inner.config
    }

    fn root(&self) -> &str {
        &self.inner.config.root
    }

    /// A command's output, or [`BackendError::Command`] if it failed.
    fn checked(argv: &[String], out: CommandOutput) -> Result<String, BackendError> {
        if out.success {
            Ok(out.stdout)
        } else {
            Err(BackendError::Command {
                command: argv.join(" "),
                status: out.status,
                stderr: out.stderr.trim().to_owned(),
            })
        }
    }

    /// Runs `argv` once, for at most `timeout`; a failure becomes [`BackendError::Command`].
    async fn run(&self, argv: Vec<String>, timeout: Duration) -> Result<String, BackendError> {
        let out = self.inner.runner.run(argv.clone(), timeout).await?;
        Self::checked(&argv, out)
    }

    /// Runs `zfs <args>`, retrying with the configured backoff while zfs says the dataset
    /// is busy. A command that timed out is not retried: the backoff is for a busy answer,
    /// not for a zfs that does not answer.
    async fn zfs(&self, args: &[&str]) -> Result<String, BackendError> {
        let argv: Vec<String> = std::iter::once(self.inner.config.zfs.as_str())
            .chain(args.iter().copied())
            .map(str::to_owned)
            .collect();
        let timeout = self.inner.config.command_timeout;
        let mut delays = self.inner.config.busy_backoff.iter();
        loop {
            let out = self.inner.runner.run(argv.clone(), timeout).await?;
            if !out.success && out.stderr.contains("busy") {
                if let Some(delay) = delays.next() {
                    tracing::debug!(command = %argv.join(" "), ?delay, "dataset busy; retrying");
                    tokio::time::sleep(*delay).await;
                    continue;
                }
            }
            return Self::checked(&argv, out);
        }
    }

    /// Reads every dataset and snapshot under the root; empty if the root does not exist.
    async fn inventory(&self) -> Result<Inventory, BackendError> {
        let root = self.root().to_owned();
        match self
            .zfs(&[
                "get",
                "-H",
                "-p",
                "-r",
                "-o",
                "name,property,value,source",
                PROPERTIES,
                &root,
            ])
            .await
        {
            Ok(text) => Ok(Inventory::parse(&root, &text)),
            Err(BackendError::Command { ref stderr, .. }) if stderr.contains("does not exist") => {
                Ok(Inventory::parse(&root, ""))
            }
            Err(e) => Err(e),
        }
    }

    async fn ensure_layout(&self) -> Result<(), BackendError> {
        let inv = self.inventory().await?;
        for name in [
            self.root().to_owned(),
            inv.templates_dir(),
            inv.sandboxes_dir(),
            inv.retired_dir(),
        ] {
            if inv.get(&name).is_none() {
                self.zfs(&["create", "-p", &name]).await?;
            }
        }
        Ok(())
    }

    async fn recover(&self) -> Result<(), BackendError> {
        let inv = self.inventory().await?;
        for (name, e) in inv.template_datasets() {
            if e.state.as_deref() != Some(READY) {
                tracing::warn!(dataset = %e.name, template = name, "destroying half-made template");
                self.zfs(&["destroy", "-r", &e.name]).await?;
            }
        }
        for e in inv.sandbox_datasets() {
            if e.state.as_deref() != Some(READY) && !inv.is_retired(e) {
                tracing::warn!(dataset = %e.name, "destroying half-made sandbox root");
                self.zfs(&["destroy", "-r", &e.name]).await?;
            }
        }
        for (e, _) in inv.sandbox_snapshots() {
            if e.state.as_deref() != Some(READY) && inv.clones_of(&e.name).is_empty() {
                tracing::warn!(snapshot = %e.name, "destroying half-made snapshot layer");
                self.zfs(&["destroy", &e.name]).await?;
            }
        }
        // Retired sandboxes whose last layer went away (a crash between the layer's destroy
        // and the sandbox's) are garbage; the others stay unmounted.
        let inv = self.inventory().await?;
        for e in inv.sandbox_datasets().filter(|e| inv.is_retired(e)) {
            if inv.layers_on(&e.name).is_empty() && inv.clones_of_any_snapshot(&e.name).is_empty() {
                tracing::info!(dataset = %e.name, "destroying retired sandbox without layers");
                self.zfs(&["destroy", "-r", &e.name]).await?;
            } else if e.mountpoint.as_deref() != Some("none") {
                self.zfs(&["set", "mountpoint=none", &e.name]).await?;
            }
        }
        Ok(())
    }

    fn layer_or_not_found(inv: &Inventory, id: &LayerId) -> Result<Layer, BackendError> {
        inv.layer(id).ok_or_else(|| BackendError::NotFound {
            kind: "layer",
            id: id.to_string(),
        })
    }

    fn mountpoint(entry: &inventory::Entry) -> Result<PathBuf, BackendError> {
        match entry.mountpoint.as_deref() {
            Some(m) if m.starts_with('/') => Ok(PathBuf::from(m)),
            other => Err(BackendError::InvalidSpec {
                field: "zfs root dataset",
                reason: format!(
                    "{} has mountpoint {}; it needs a path",
                    entry.name,
                    other.unwrap_or("-")
                ),
            }),
        }
    }

    async fn import(&self, name: &LayerId, source: &Path) -> Result<LayerInfo, BackendError> {
        match std::fs::metadata(source) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(BackendError::InvalidSpec {
                    field: "template source",
                    reason: format!("{} is not a directory", source.display()),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(BackendError::NotFound {
                    kind: "template source",
                    id: source.display().to_string(),
                })
            }
            Err(e) => return Err(BackendError::io("stat", source, e)),
        }
        let _guard = self.inner.lock.lock().await;
        let inv = self.inventory().await?;
        if inv.name_taken(name) {
            return Err(BackendError::AlreadyExists {
                kind: "layer",
                id: name.to_string(),
            });
        }
        let dataset = format!("{}/{name}", inv.templates_dir());
        self.zfs(&["create", &dataset]).await?;
        let filled = self.fill_template(&dataset, source).await;
        if let Err(e) = filled {
            // Not marked ready, so open() would destroy it too; do it now.
            if let Err(cleanup) = self.zfs(&["destroy", "-r", &dataset]).await {
                tracing::warn!(%dataset, error = %cleanup, "could not destroy failed template");
            }
            return Err(e);
        }
        let inv = self.inventory().await?;
        Self::layer_or_not_found(&inv, name).map(|l| l.info())
    }

    /// Copies `source` into the new template dataset and seals it; the ready mark is last.
    async fn fill_template(&self, dataset: &str, source: &Path) -> Result<(), BackendError> {
        let mountpoint = {
            let out = self
                .zfs(&["get", "-H", "-p", "-o", "value", "mountpoint", dataset])
                .await?;
            Self::mountpoint(&inventory::Entry {
                name: dataset.to_owned(),
                mountpoint: Some(out.trim().to_owned()),
                ..inventory::Entry::default()
            })?
        };
        // `src/.` into the existing mountpoint: the files, and the owner and mode of the
        // root directory itself.
        let mut from = source.as_os_str().to_owned();
        from.push("/.");
        self.run(
            vec![
                self.inner.config.cp.clone(),
                "-a".into(),
                from.to_string_lossy().into_owned(),
                format!("{}/", mountpoint.display()),
            ],
            self.inner.config.copy_timeout,
        )
        .await?;
        self.zfs(&["set", "readonly=on", dataset]).await?;
        self.zfs(&["snapshot", &format!("{dataset}@{SEALED}")])
            .await?;
        self.zfs(&["set", &format!("coppice:state={READY}"), dataset])
            .await?;
        Ok(())
    }

    async fn create(
        &self,
        sandbox: &SandboxId,
        base: &LayerId,
    ) -> Result<RootfsSpec, BackendError> {
        let _guard = self.inner.lock.lock().await;
        let inv = self.inventory().await?;
        let dataset = inv.sandbox_dataset_name(sandbox);
        if let Some(existing) = inv.get(&dataset) {
            if existing.state.as_deref() == Some(READY) {
                return Err(BackendError::AlreadyExists {
                    kind: "sandbox",
                    id: sandbox.to_string(),
                });
            }
            if existing.state.as_deref() == Some(RETIRED) {
                self.move_retired(&inv, existing, sandbox).await?;
            } else {
                self.zfs(&["destroy", "-r", &dataset]).await?;
            }
        }
        let layer = Self::layer_or_not_found(&inv, base)?;
        self.zfs(&[
            "clone",
            "-o",
            &format!("coppice:state={READY}"),
            "-o",
            "readonly=off",
            &layer.snapshot,
            &dataset,
        ])
        .await?;
        let inv = self.inventory().await?;
        let entry = inv.sandbox(sandbox).ok_or_else(|| BackendError::NotFound {
            kind: "sandbox",
            id: sandbox.to_string(),
        })?;
        Ok(RootfsSpec::Directory(Self::mountpoint(entry)?))
    }

    /// Frees the name `sandboxes/<id>` held by a retired sandbox by renaming it into
    /// `retired/`.
    async fn move_retired(
        &self,
        inv: &Inventory,
        existing: &inventory::Entry,
        sandbox: &SandboxId,
    ) -> Result<(), BackendError> {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let target = format!("{}/{sandbox}-{nanos}", inv.retired_dir());
        match self.zfs(&["rename", &existing.name, &target]).await {
            Ok(_) => Ok(()),
            Err(BackendError::Command { ref stderr, .. }) if stderr.contains("busy") => {
                // zfs-fuse cannot rename a dataset while a clone of its snapshots is mounted.
                Err(BackendError::InUse {
                    kind: "sandbox id",
                    id: sandbox.to_string(),
                    dependents: inv
                        .layers_on(&existing.name)
                        .iter()
                        .map(|l| format!("layer {}", l.id))
                        .collect(),
                })
            }
            Err(e) => Err(e),
        }
    }

    async fn take_snapshot(
        &self,
        sandbox: &SandboxId,
        name: &LayerId,
    ) -> Result<LayerInfo, BackendError> {
        let _guard = self.inner.lock.lock().await;
        let inv = self.inventory().await?;
        let entry = inv.sandbox(sandbox).ok_or_else(|| BackendError::NotFound {
            kind: "sandbox",
            id: sandbox.to_string(),
        })?;
        if inv.name_taken(name) {
            return Err(BackendError::AlreadyExists {
                kind: "layer",
                id: name.to_string(),
            });
        }
        let snapshot = format!("{}@{name}", entry.name);
        self.zfs(&["snapshot", &snapshot]).await?;
        self.zfs(&["set", &format!("coppice:state={READY}"), &snapshot])
            .await?;
        let inv = self.inventory().await?;
        Self::layer_or_not_found(&inv, name).map(|l| l.info())
    }

    async fn remove(&self, sandbox: &SandboxId) -> Result<(), BackendError> {
        let _guard = self.inner.lock.lock().await;
        let inv = self.inventory().await?;
        let entry = inv.sandbox(sandbox).ok_or_else(|| BackendError::NotFound {
            kind: "sandbox",
            id: sandbox.to_string(),
        })?;
        if inv.layers_on(&entry.name).is_empty() {
            return self.zfs(&["destroy", "-r", &entry.name]).await.map(drop);
        }
        // Its snapshots are layers (maybe with clones): keep the dataset, retired. The state
        // goes first so that it is no longer listed even if the unmount fails.
        self.zfs(&["set", &format!("coppice:state={RETIRED}"), &entry.name])
            .await?;
        self.zfs(&["set", "mountpoint=none", &entry.name]).await?;
        Ok(())
    }

    async fn delete(&self, id: &LayerId) -> Result<(), BackendError> {
        let _guard = self.inner.lock.lock().await;
        let inv = self.inventory().await?;
        let layer = Self::layer_or_not_found(&inv, id)?;
        let dependents = inv.dependents(&layer);
        if !dependents.is_empty() {
            return Err(BackendError::InUse {
                kind: "layer",
                id: id.to_string(),
                dependents,
            });
        }
        match layer.kind {
            LayerKind::Template => {
                self.zfs(&["destroy", "-r", &layer.dataset]).await?;
            }
            LayerKind::Snapshot => {
                let holder = inv.get(&layer.dataset);
                let last_of_retired = holder.is_some_and(|h| inv.is_retired(h))
                    && inv.layers_on(&layer.dataset).len() == 1;
                if last_of_retired {
                    self.zfs(&["destroy", "-r", &layer.dataset]).await?;
                } else {
                    self.zfs(&["destroy", &layer.snapshot]).await?;
                }
            }
        }
        Ok(())
    }
}

impl<R: CommandRunner> Storage for ZfsStorage<R> {
    fn probe() -> Result<Capabilities, BackendError> {
        let answer = |program: &str, args: &[&str]| -> Capability {
            let mut cmd = std::process::Command::new(program);
            cmd.args(args);
            let out = command::output(cmd, command::PROBE, None);
            let (available, detail) = match out {
                Ok(o) if o.status.success() => {
                    (true, format!("`{program} {}` answers", args.join(" ")))
                }
                Ok(o) => (
                    false,
                    format!(
                        "`{program} {}` failed: {}",
                        args.join(" "),
                        String::from_utf8_lossy(&o.stderr).trim()
                    ),
                ),
                Err(e) => match std::error::Error::source(&e) {
                    Some(source) => (false, format!("{e}: {source}")),
                    None => (false, e.to_string()),
                },
            };
            Capability {
                name: program.into(),
                available,
                detail,
            }
        };
        Ok(Capabilities {
            driver: "zfs".into(),
            features: vec![
                answer("zpool", &["list", "-H"]),
                answer("zfs", &["list", "-H"]),
            ],
        })
    }

    async fn import_template(
        &self,
        name: &LayerId,
        source: &Path,
    ) -> Result<LayerInfo, BackendError> {
        self.import(name, source).await
    }

    async fn create_rootfs(
        &self,
        sandbox: &SandboxId,
        base: &LayerId,
    ) -> Result<RootfsSpec, BackendError> {
        self.create(sandbox, base).await
    }

    async fn rootfs(&self, sandbox: &SandboxId) -> Result<RootfsSpec, BackendError> {
        let inv = self.inventory().await?;
        let entry = inv.sandbox(sandbox).ok_or_else(|| BackendError::NotFound {
            kind: "sandbox",
            id: sandbox.to_string(),
        })?;
        Ok(RootfsSpec::Directory(Self::mountpoint(entry)?))
    }

    async fn snapshot(
        &self,
        sandbox: &SandboxId,
        name: &LayerId,
    ) -> Result<LayerInfo, BackendError> {
        self.take_snapshot(sandbox, name).await
    }

    async fn remove_rootfs(&self, sandbox: &SandboxId) -> Result<(), BackendError> {
        self.remove(sandbox).await
    }

    async fn delete_layer(&self, id: &LayerId) -> Result<(), BackendError> {
        self.delete(id).await
    }

    async fn layers(&self) -> Result<Vec<LayerInfo>, BackendError> {
        Ok(self
            .inventory()
            .await?
            .layers()
            .iter()
            .map(Layer::info)
            .collect())
    }

    async fn sandboxes(&self) -> Result<Vec<SandboxId>, BackendError> {
        Ok(self.inventory().await?.sandboxes())
    }

    async fn usage(&self, sandbox: &SandboxId) -> Result<DiskUsage, BackendError> {
        let inv = self.inventory().await?;
        let entry = inv.sandbox(sandbox).ok_or_else(|| BackendError::NotFound {
            kind: "sandbox",
            id: sandbox.to_string(),
        })?;
        let shared_bytes = entry
            .origin
            .as_deref()
            .and_then(|o| inv.get(o))
            .map_or(0, |o| o.referenced);
        Ok(DiskUsage {
            written_bytes: entry.used_by_dataset,
            shared_bytes,
        })
    }
}
