//! Templates built with E2B's `Template` builder: their records ([`store`], in the registry
//! database), the build-context archives the SDK uploads ([`files`], kept under
//! `<state>/builds/files/<hash>`), and the engine ([`engine`]) that runs a build's steps in a
//! build sandbox and captures the result as a storage layer. `fromImage` bases are pulled
//! from registries ([`image`]) and kept as layers under their digest.
//!
//! [`Builds`] is this capability's state: the store, the one-time upload tokens, and the
//! queue of triggered builds that the engine's one worker takes in order.
//! A template is named `name`, `name:tag` or by its id; a name without a tag means the tag
//! `default`, which every build requested without tags gets.
//!
//! **Invariant:** nothing here knows HTTP statuses; the handlers in `api/builds.rs` do.

pub(crate) mod agent;
pub(crate) mod engine;
pub(crate) mod files;
pub(crate) mod gc;
pub(crate) mod image;
pub(crate) mod start;
pub(crate) mod store;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use coppice_lifecycle::backend::{LayerId, Limits};
use coppice_wire::build::TemplateStep;

use crate::builds::store::{BuildRow, Defaults, Status, Store, StoreError, TemplateRow};

/// The tag a name without one means.
pub(crate) const DEFAULT_TAG: &str = "default";
/// How long an upload link stays valid.
const UPLOAD_LINK_TTL: Duration = Duration::from_secs(60 * 60);
/// Upload links kept at most (older ones go first).
const MAX_UPLOAD_LINKS: usize = 4096;

/// What can go wrong with a template request.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BuildsError {
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// No such template, build or tag.
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the template's state.
    #[error("{0}")]
    Conflict(String),
    /// A built-in template cannot be changed.
    #[error("{0}")]
    BuiltIn(String),
    /// The database failed.
    #[error("template store")]
    Store(#[from] StoreError),
    /// The files directory failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// Where.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What a triggered build runs: the steps and where they start.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    /// The build.
    pub(crate) build_id: String,
    /// Its template's id.
    pub(crate) template_id: String,
    /// What it starts from.
    pub(crate) base: Base,
    /// Its steps.
    pub(crate) steps: Vec<TemplateStep>,
    /// Rebuild every step.
    pub(crate) force: bool,
    /// The build sandbox's limits: the template's size.
    pub(crate) limits: Limits,
    /// `startCmd`, when given (else the base's).
    pub(crate) start_cmd: Option<String>,
    /// `readyCmd`, when given (else the base's).
    pub(crate) ready_cmd: Option<String>,
    /// `fromImageRegistry`'s credentials for `fromImage`; kept in memory only.
    pub(crate) registry: Option<coppice_zfs::image::Credentials>,
}

/// Where a build starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Base {
    /// A template, built-in or built, by name, `name:tag` or id.
    Template(String),
    /// An OCI image reference.
    Image(String),
}

/// A ready template build, as sandboxes are created from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Resolved {
    /// The template's id.
    pub(crate) template_id: String,
    /// The build's id.
    pub(crate) build_id: String,
    /// Its storage layer.
    pub(crate) layer: LayerId,
    /// What its sandboxes get.
    pub(crate) defaults: Defaults,
    /// The limits its sandboxes run with (`cpuCount`, `memoryMB`).
    pub(crate) limits: Limits,
}

/// The limits of sandboxes of `build`: its `cpuCount` and `memoryMB`, the default pids.
pub(crate) fn limits_of(build: &BuildRow) -> Limits {
    Limits {
        cpu_millis: Some(build.cpu_count.saturating_mul(1000)),
        memory_bytes: Some(build.memory_mb.saturating_mul(1 << 20)),
        ..crate::runtime::DEFAULT_LIMITS
    }
}

/// Splits `name:tag`; the tag is `default` when absent.
pub(crate) fn split_tag(name: &str) -> (&str, &str) {
    match name.rsplit_once(':') {
        Some((n, t)) => (n, t),
        None => (name, DEFAULT_TAG),
    }
}

/// Checks a template name: 1 to 128 characters of `[a-z0-9._-]`, starting with a letter or
/// digit (what E2B accepts for aliases), optionally after one `namespace/`.
pub(crate) fn check_name(name: &str) -> Result<(), BuildsError> {
    let plain = name
        .rsplit_once('/')
        .map_or(name, |(ns, n)| if ns.is_empty() { "" } else { n });
    let ok = !plain.is_empty()
        && name.len() <= 128
        && plain
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-' | b'/')
        })
        && name.matches('/').count() <= 1;
    if ok {
        Ok(())
    } else {
        Err(BuildsError::Invalid(format!(
            "invalid template name {name:?}: use 1 to 128 lowercase letters, digits, '.', '_' \
             and '-', starting with a letter or digit"
        )))
    }
}

/// Checks a tag: 1 to 128 characters of `[A-Za-z0-9._-]`.
pub(crate) fn check_tag(tag: &str) -> Result<(), BuildsError> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(BuildsError::Invalid(format!(
            "invalid tag {tag:?}: use 1 to 128 letters, digits, '.', '_' and '-'"
        )))
    }
}

/// This capability's state.
#[derive(Debug)]
pub(crate) struct Builds {
    /// The records.
    pub(crate) store: Store,
    files_dir: PathBuf,
    /// Upload token → (files hash, when it was minted).
    uploads: Mutex<HashMap<String, (String, Instant)>>,
    queue: tokio::sync::mpsc::UnboundedSender<Job>,
    jobs: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Job>>>,
    /// The build sandbox running now, for shutdown to kill.
    running: Mutex<Option<coppice_lifecycle::backend::SandboxId>>,
    /// Where images come from (`--registry-mirror`, `--insecure-registry`).
    pub(crate) registries: image::Registries,
    /// Pulls images into trees under `<dir>/images`.
    pub(crate) puller: coppice_zfs::image::ImagePuller,
    images_dir: PathBuf,
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> BuildsError + 'a {
    move |source| BuildsError::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}

impl Builds {
    /// Opens the template tables in the database at `db` and the files under `dir`; every
    /// build a previous run left `building` ends as `error`. Images come from
    /// `registries`, with owners shifted by `uid_shift`.
    pub(crate) fn open(
        db: &Path,
        dir: &Path,
        now: u64,
        registries: image::Registries,
        uid_shift: u32,
    ) -> Result<Self, BuildsError> {
        let files_dir = dir.join("files");
        std::fs::create_dir_all(&files_dir).map_err(io("create", &files_dir))?;
        let images_dir = dir.join("images");
        // Pulls and trees a previous run left unfinished.
        let work = images_dir.join("work");
        if let Err(e) = std::fs::remove_dir_all(&work) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %work.display(), error = %e, "removing old image pulls failed");
            }
        }
        std::fs::create_dir_all(&work).map_err(io("create", &work))?;
        let store = Store::open(db)?;
        let cut = store.interrupt_unfinished(
            "the gateway restarted while this build was running; build it again",
            now,
        )?;
        if !cut.is_empty() {
            tracing::warn!(builds = ?cut, "template builds cut short by a restart end as errors");
        }
        let (queue, jobs) = tokio::sync::mpsc::unbounded_channel();
        Ok(Self {
            store,
            files_dir,
            uploads: Mutex::new(HashMap::new()),
            queue,
            jobs: Mutex::new(Some(jobs)),
            running: Mutex::new(None),
            puller: coppice_zfs::image::ImagePuller::new(&work, uid_shift),
            registries,
            images_dir,
        })
    }

    /// Where image pulls and their trees are made (emptied at start).
    pub(crate) fn image_work(&self) -> PathBuf {
        self.images_dir.join("work")
    }

    /// Where the defaults an image's layer gives builds are kept.
    pub(crate) fn image_meta_path(&self, layer: &str) -> PathBuf {
        self.images_dir.join(format!("{layer}.json"))
    }

    /// The queue of triggered builds, for the engine's worker (once).
    pub(crate) fn take_jobs(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<Job>> {
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Records the build sandbox running now (`None` once it is gone).
    pub(crate) fn set_running(&self, id: Option<coppice_lifecycle::backend::SandboxId>) {
        *self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = id;
    }

    /// Takes the build sandbox running now, at shutdown.
    pub(crate) fn take_running(&self) -> Option<coppice_lifecycle::backend::SandboxId> {
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Queues a build whose record says `building`.
    pub(crate) fn enqueue(&self, job: Job) -> Result<(), BuildsError> {
        self.queue
            .send(job)
            .map_err(|_| BuildsError::Conflict("the build engine has stopped".into()))
    }

    /// Where the files with `hash` are kept.
    pub(crate) fn file_path(&self, hash: &str) -> PathBuf {
        self.files_dir.join(hash)
    }

    /// Whether the files with `hash` are here.
    pub(crate) fn has_files(&self, hash: &str) -> bool {
        self.file_path(hash).is_file()
    }

    /// Forgets the files with `hash` (a corrupt or mismatching upload), so the SDK uploads
    /// them again next time.
    pub(crate) fn forget_files(&self, hash: &str) {
        let path = self.file_path(hash);
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "removing uploaded files failed");
            }
        }
    }

    /// A new one-time upload token for the files with `hash`.
    pub(crate) fn upload_token(&self, hash: &str) -> Option<String> {
        let token = crate::runtime::random_token(40)?;
        let mut uploads = self
            .uploads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        uploads.retain(|_, (_, at)| at.elapsed() < UPLOAD_LINK_TTL);
        if uploads.len() >= MAX_UPLOAD_LINKS {
            if let Some(oldest) = uploads
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| k.clone())
            {
                uploads.remove(&oldest);
            }
        }
        uploads.insert(token.clone(), (hash.to_owned(), Instant::now()));
        Some(token)
    }

    /// Uses up the upload token `token`: the hash it was minted for, if it is valid.
    pub(crate) fn take_upload(&self, token: &str) -> Option<String> {
        let mut uploads = self
            .uploads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (hash, at) = uploads.remove(token)?;
        (at.elapsed() < UPLOAD_LINK_TTL).then_some(hash)
    }

    /// A private path for an upload under way.
    pub(crate) fn staging_path(&self, hash: &str) -> Option<PathBuf> {
        let r = crate::runtime::random_token(12)?;
        Some(self.files_dir.join(format!(".upload-{hash}-{r}")))
    }

    /// The built template that `key` (id or name) names.
    pub(crate) fn template(&self, key: &str) -> Result<Option<TemplateRow>, BuildsError> {
        let (name, _) = split_tag(key);
        Ok(self.store.template(name)?)
    }

    /// The ready build `reference` (`name`, `name:tag`, `id`, `id:tag`) names, or `None`
    /// when no built template has that name or id. Without a tag it is the build tagged
    /// `default`, else the newest ready build (a template built only with other tags). A
    /// known template whose tag names no ready build is an error.
    pub(crate) fn resolve(&self, reference: &str) -> Result<Option<Resolved>, BuildsError> {
        let explicit = reference.contains(':');
        let (name, tag) = split_tag(reference);
        let Some(template) = self.store.template(name)? else {
            return Ok(None);
        };
        let tags = self.store.tags(&template.id)?;
        let build = match tags.iter().find(|t| t.tag == tag) {
            Some(tagged) => self.store.build(&tagged.build_id)?,
            None if !explicit => self
                .store
                .builds_of(&template.id)?
                .into_iter()
                .find(|b| b.status == Status::Ready),
            None => None,
        };
        let Some(build) = build else {
            return Err(BuildsError::NotFound(format!(
                "template {name:?} has no ready build tagged {tag:?}"
            )));
        };
        let layer = build
            .layer
            .as_deref()
            .filter(|_| build.status == Status::Ready)
            .and_then(|l| LayerId::new(l).ok())
            .ok_or_else(|| BuildsError::NotFound(format!("the build {} is not ready", build.id)))?;
        Ok(Some(Resolved {
            limits: limits_of(&build),
            template_id: template.id,
            build_id: build.id,
            layer,
            defaults: build.defaults,
        }))
    }

    /// The build `build_id` of the template `key` names.
    pub(crate) fn build_of(&self, key: &str, build_id: &str) -> Result<BuildRow, BuildsError> {
        let not_found =
            || BuildsError::NotFound(format!("build {build_id:?} of template {key:?} not found"));
        let template = self.template(key)?.ok_or_else(not_found)?;
        let build = self.store.build(build_id)?.ok_or_else(not_found)?;
        if build.template_id != template.id {
            return Err(not_found());
        }
        Ok(build)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_tags_are_checked_and_split() {
        assert_eq!(split_tag("app"), ("app", "default"));
        assert_eq!(split_tag("app:v1"), ("app", "v1"));
        for good in ["app", "my-agent", "a.b_c", "team/app", "0x"] {
            check_name(good).unwrap();
        }
        for bad in [
            "",
            "App",
            "-a",
            "a b",
            "a:b",
            "/a",
            "a/b/c",
            &"a".repeat(129),
        ] {
            assert!(
                matches!(check_name(bad), Err(BuildsError::Invalid(_))),
                "{bad}"
            );
        }
        check_tag("v1.0_RC-2").unwrap();
        for bad in ["", "a:b", "a/b", "a b"] {
            assert!(
                matches!(check_tag(bad), Err(BuildsError::Invalid(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn upload_tokens_are_used_once() {
        let dir = tempfile::tempdir().unwrap();
        let b = Builds::open(
            &dir.path().join("r.db"),
            dir.path(),
            1,
            image::Registries::default(),
            100_000,
        )
        .unwrap();
        let t = b.upload_token("h").unwrap();
        assert_eq!(t.len(), 40);
        assert_eq!(b.take_upload(&t).as_deref(), Some("h"));
        assert_eq!(b.take_upload(&t), None);
        assert_eq!(b.take_upload("nope"), None);
    }
}
