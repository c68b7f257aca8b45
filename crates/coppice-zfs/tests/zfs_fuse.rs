//! The zfs driver for real, against zfs-fuse (the real `zfs`/`zpool` CLI without a kernel
//! module): each test makes its own pool on a sparse file and destroys it, even on failure.
//!
//! Pool tests run one at a time per machine (an flock on `/tmp/coppice-zfs-fuse-tests.lock`)
//! because concurrent pool and dataset creation has wedged zfs-fuse. The daemon is started
//! if none answers (under a file lock, so concurrent test binaries start one) and is left
//! running: stopping it safely would need to know that no
//! other process's pool is in it, and a running daemon with no pools costs nothing.

// Integration tests are a test crate of their own: no `mod tests` wrapper, and SKIP lines
// go to stdout. Pool setup and teardown poll on the test's plain thread (see
// docs/conventions.md, "Waiting in tests").
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::tests_outside_test_module,
    clippy::print_stdout,
    clippy::disallowed_methods
)]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use coppice_lifecycle::backend::{
    BackendError, LayerId, LayerKind, RootfsSpec, SandboxId, Storage,
};
use coppice_zfs::zfs::SystemRunner;
use coppice_zfs::{ZfsConfig, ZfsStorage};
use nix::fcntl::{Flock, FlockArg};

const SHIFT: u32 = 100_000;

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(program).is_file())
}

fn zpool_answers() -> bool {
    Command::new("zpool")
        .arg("list")
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Starts `zfs-fuse -n` unless a daemon already answers; one starter at a time.
fn ensure_daemon() -> Result<(), String> {
    let lock_file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/tmp/coppice-zfs-fuse-start.lock")
        .map_err(|e| format!("open lock: {e}"))?;
    let _lock =
        Flock::lock(lock_file, FlockArg::LockExclusive).map_err(|(_, e)| format!("lock: {e}"))?;
    if zpool_answers() {
        return Ok(());
    }
    // Detached into its own process group with no inherited pipes, so it outlives this test
    // binary without holding cargo's output open.
    let child = Command::new("zfs-fuse")
        .args(["-n", "--no-kstat-mount"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("start zfs-fuse: {e}"))?;
    let pid = child.id();
    // The daemon is deliberately left running (see the file docs), so it is never waited for.
    std::mem::forget(child);
    for _ in 0..100 {
        if zpool_answers() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!(
        "zfs-fuse (pid {pid}) started but zpool does not answer"
    ))
}

/// A pool on a sparse file, destroyed with its file when dropped.
struct Pool {
    name: String,
    file: PathBuf,
    mountpoint: PathBuf,
    /// Held for the pool's whole life (released after `Drop` has destroyed it): zfs-fuse
    /// wedged for good, with `zfs create` stuck in the kernel waiting on FUSE, when two
    /// processes created pools and datasets at the same moment, so pool tests on one
    /// machine run one at a time.
    _serial: Flock<fs::File>,
}

static POOLS: AtomicU32 = AtomicU32::new(0);

impl Pool {
    /// A fresh pool, or `None` (after a SKIP line) when this host cannot run zfs-fuse.
    fn create(test: &str) -> Option<Self> {
        if !nix::unistd::geteuid().is_root() {
            println!("SKIP {test}: needs root");
            return None;
        }
        for program in ["zfs", "zpool", "zfs-fuse"] {
            if !on_path(program) {
                println!("SKIP {test}: {program} not installed (apt-get install zfs-fuse)");
                return None;
            }
        }
        if !Path::new("/dev/fuse").exists() {
            println!("SKIP {test}: /dev/fuse missing");
            return None;
        }
        let serial = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/tmp/coppice-zfs-fuse-tests.lock")
            .unwrap();
        let serial = Flock::lock(serial, FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .unwrap();
        if let Err(e) = ensure_daemon() {
            println!("SKIP {test}: {e}");
            return None;
        }
        let name = format!(
            "coppicet{}x{}",
            std::process::id(),
            POOLS.fetch_add(1, Ordering::Relaxed)
        );
        let pool = Self {
            file: PathBuf::from(format!("/var/tmp/{name}.img")),
            mountpoint: PathBuf::from(format!("/var/tmp/{name}-mnt")),
            name,
            _serial: serial,
        };
        fs::File::create(&pool.file)
            .unwrap()
            .set_len(256 << 20)
            .unwrap();
        zfs_cmd(
            "zpool",
            &[
                "create",
                "-m",
                pool.mountpoint.to_str().unwrap(),
                &pool.name,
                pool.file.to_str().unwrap(),
            ],
        )
        .unwrap();
        Some(pool)
    }

    fn root(&self) -> String {
        format!("{}/coppice", self.name)
    }

    async fn storage(&self) -> ZfsStorage<SystemRunner> {
        ZfsStorage::open(ZfsConfig::new(self.root()), SystemRunner)
            .await
            .unwrap()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // zfs-fuse reports a pool busy for a moment after its last file is closed.
        let mut destroyed = false;
        for _ in 0..40 {
            if zfs_cmd("zpool", &["destroy", "-f", &self.name]).is_ok() {
                destroyed = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        if !destroyed {
            println!("could not destroy pool {}", self.name);
        }
        let _ = fs::remove_file(&self.file);
        let _ = fs::remove_dir(&self.mountpoint);
    }
}

fn zfs_cmd(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn layer(s: &str) -> LayerId {
    LayerId::new(s).unwrap()
}

fn sandbox(s: &str) -> SandboxId {
    SandboxId::new(s).unwrap()
}

/// A few files owned by the shifted root, like a real template.
fn template_tree(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    fs::create_dir_all(src.join("etc")).unwrap();
    fs::create_dir_all(src.join("data")).unwrap();
    fs::write(src.join("etc/conf"), "orig\n").unwrap();
    fs::write(src.join("data/a"), "a\n").unwrap();
    std::os::unix::fs::symlink("etc/conf", src.join("link")).unwrap();
    for p in [
        src.clone(),
        src.join("etc"),
        src.join("data"),
        src.join("etc/conf"),
        src.join("data/a"),
        src.join("link"),
    ] {
        std::os::unix::fs::lchown(&p, Some(SHIFT), Some(SHIFT)).unwrap();
    }
    fs::set_permissions(&src, fs::Permissions::from_mode(0o755)).unwrap();
    src
}

fn dir_of(spec: &RootfsSpec) -> PathBuf {
    match spec {
        RootfsSpec::Directory(d) => d.clone(),
        RootfsSpec::Overlay { .. } => panic!("zfs handed out an overlay"),
    }
}

fn datasets(pool: &Pool) -> Vec<String> {
    let out = zfs_cmd(
        "zfs",
        &["list", "-H", "-r", "-t", "all", "-o", "name", &pool.root()],
    )
    .unwrap();
    out.lines().map(str::to_owned).collect()
}

#[test]
fn zfs_layers_roots_snapshots_and_forks() {
    let Some(pool) = Pool::create("zfs_layers_roots_snapshots_and_forks") else {
        return;
    };
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let src = template_tree(dir.path());
    rt().block_on(async {
        let storage = pool.storage().await;
        let base = storage.import_template(&layer("base"), &src).await.unwrap();
        assert_eq!(base.kind, LayerKind::Template);

        let a = dir_of(
            &storage
                .create_rootfs(&sandbox("a"), &layer("base"))
                .await
                .unwrap(),
        );
        assert_eq!(
            storage.rootfs(&sandbox("a")).await.unwrap(),
            RootfsSpec::Directory(a.clone())
        );
        let root = fs::metadata(&a).unwrap();
        assert_eq!(
            (root.uid(), root.gid(), root.mode() & 0o7777),
            (SHIFT, SHIFT, 0o755)
        );
        assert_eq!(fs::read_to_string(a.join("etc/conf")).unwrap(), "orig\n");
        assert_eq!(
            fs::read_link(a.join("link")).unwrap(),
            Path::new("etc/conf")
        );

        let before = storage.usage(&sandbox("a")).await.unwrap();
        assert!(before.shared_bytes > 0);
        fs::write(a.join("etc/conf"), "changed\n").unwrap();
        fs::remove_file(a.join("data/a")).unwrap();
        fs::write(a.join("blob"), vec![3u8; 1 << 20]).unwrap();

        let s1 = storage.snapshot(&sandbox("a"), &layer("s1")).await.unwrap();
        assert_eq!(
            (s1.kind, s1.parent.clone()),
            (LayerKind::Snapshot, Some(layer("base")))
        );
        let after = storage.usage(&sandbox("a")).await.unwrap();
        assert!(
            after.written_bytes > before.written_bytes,
            "{before:?} -> {after:?}"
        );

        let fork = dir_of(
            &storage
                .create_rootfs(&sandbox("fork"), &layer("s1"))
                .await
                .unwrap(),
        );
        fs::write(a.join("etc/conf"), "later\n").unwrap();
        assert_eq!(
            fs::read_to_string(fork.join("etc/conf")).unwrap(),
            "changed\n"
        );
        assert!(!fork.join("data/a").exists());
        fs::write(fork.join("mine"), "fork\n").unwrap();
        assert!(!a.join("mine").exists());

        let err = storage.delete_layer(&layer("base")).await.unwrap_err();
        assert!(
            matches!(&err, BackendError::InUse { dependents, .. }
                if dependents == &["sandbox a", "sandbox fork", "layer s1"]),
            "{err:?}"
        );

        // Removing the source keeps its snapshot (and the fork over it) alive.
        storage.remove_rootfs(&sandbox("a")).await.unwrap();
        assert_eq!(storage.sandboxes().await.unwrap(), [sandbox("fork")]);
        let ids: Vec<_> = storage
            .layers()
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.id)
            .collect();
        assert_eq!(ids, [layer("base"), layer("s1")]);
        assert_eq!(
            fs::read_to_string(fork.join("etc/conf")).unwrap(),
            "changed\n"
        );
        let err = storage.delete_layer(&layer("s1")).await.unwrap_err();
        assert_eq!(err.to_string(), "layer \"s1\" is in use by sandbox fork");

        // The fork goes (zfs-fuse says "busy" for a moment; the driver retries), then its
        // id can be reused and the retired source is moved aside.
        storage.remove_rootfs(&sandbox("fork")).await.unwrap();
        let again = dir_of(
            &storage
                .create_rootfs(&sandbox("a"), &layer("base"))
                .await
                .unwrap(),
        );
        assert_eq!(
            fs::read_to_string(again.join("etc/conf")).unwrap(),
            "orig\n"
        );
        assert!(datasets(&pool)
            .iter()
            .any(|d| d.starts_with(&format!("{}/retired/a-", pool.root()))));
        storage.remove_rootfs(&sandbox("a")).await.unwrap();

        // Deleting the last layer of the retired sandbox collects it.
        storage.delete_layer(&layer("s1")).await.unwrap();
        storage.delete_layer(&layer("base")).await.unwrap();
        assert!(storage.layers().await.unwrap().is_empty());
        let root = pool.root();
        assert_eq!(
            datasets(&pool),
            [
                root.clone(),
                format!("{root}/retired"),
                format!("{root}/sandboxes"),
                format!("{root}/templates")
            ]
        );
    });
}

#[test]
fn zfs_half_made_objects_are_never_listed_and_are_destroyed_on_open() {
    let Some(pool) =
        Pool::create("zfs_half_made_objects_are_never_listed_and_are_destroyed_on_open")
    else {
        return;
    };
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let src = template_tree(dir.path());
    rt().block_on(async {
        let storage = pool.storage().await;
        storage.import_template(&layer("base"), &src).await.unwrap();
        storage
            .create_rootfs(&sandbox("a"), &layer("base"))
            .await
            .unwrap();
        storage
            .snapshot(&sandbox("a"), &layer("good"))
            .await
            .unwrap();

        // What crashes leave: a template that was never sealed, a snapshot never marked,
        // a clone never marked.
        let root = pool.root();
        zfs_cmd("zfs", &["create", &format!("{root}/templates/half")]).unwrap();
        zfs_cmd(
            "zfs",
            &["snapshot", &format!("{root}/sandboxes/a@halfsnap")],
        )
        .unwrap();
        zfs_cmd(
            "zfs",
            &[
                "clone",
                &format!("{root}/templates/base@sealed"),
                &format!("{root}/sandboxes/b"),
            ],
        )
        .unwrap();

        let ids: Vec<_> = storage
            .layers()
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.id)
            .collect();
        assert_eq!(ids, [layer("base"), layer("good")]);
        assert_eq!(storage.sandboxes().await.unwrap(), [sandbox("a")]);
        assert!(matches!(
            storage.create_rootfs(&sandbox("c"), &layer("half")).await,
            Err(BackendError::NotFound { kind: "layer", .. })
        ));

        let reopened = pool.storage().await;
        let names = datasets(&pool);
        for gone in ["templates/half", "sandboxes/a@halfsnap", "sandboxes/b"] {
            assert!(
                !names.contains(&format!("{root}/{gone}")),
                "{gone} survived: {names:?}"
            );
        }
        assert!(names.contains(&format!("{root}/sandboxes/a@good")));
        assert_eq!(reopened.sandboxes().await.unwrap(), [sandbox("a")]);
        reopened
            .import_template(&layer("half"), &src)
            .await
            .unwrap();
    });
}

#[test]
fn zfs_bad_input_gets_typed_errors_and_creates_nothing() {
    let Some(pool) = Pool::create("zfs_bad_input_gets_typed_errors_and_creates_nothing") else {
        return;
    };
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let src = template_tree(dir.path());
    rt().block_on(async {
        let storage = pool.storage().await;
        let empty = datasets(&pool);
        assert!(matches!(
            storage
                .import_template(&layer("t"), &dir.path().join("missing"))
                .await,
            Err(BackendError::NotFound {
                kind: "template source",
                ..
            })
        ));
        assert!(matches!(
            storage.create_rootfs(&sandbox("a"), &layer("nope")).await,
            Err(BackendError::NotFound { kind: "layer", .. })
        ));
        assert!(matches!(
            storage.snapshot(&sandbox("a"), &layer("s")).await,
            Err(BackendError::NotFound {
                kind: "sandbox",
                ..
            })
        ));
        assert_eq!(datasets(&pool), empty);

        storage.import_template(&layer("base"), &src).await.unwrap();
        assert!(matches!(
            storage.import_template(&layer("base"), &src).await,
            Err(BackendError::AlreadyExists { kind: "layer", .. })
        ));
        storage
            .create_rootfs(&sandbox("a"), &layer("base"))
            .await
            .unwrap();
        assert!(matches!(
            storage.create_rootfs(&sandbox("a"), &layer("base")).await,
            Err(BackendError::AlreadyExists {
                kind: "sandbox",
                ..
            })
        ));
        assert!(matches!(
            storage.snapshot(&sandbox("a"), &layer("base")).await,
            Err(BackendError::AlreadyExists { kind: "layer", .. })
        ));
        // A template's files are sealed read-only.
        let t = PathBuf::from(format!(
            "{}/coppice/templates/base",
            pool.mountpoint.display()
        ));
        assert!(fs::write(t.join("etc/new"), "x").is_err());
        storage.remove_rootfs(&sandbox("a")).await.unwrap();
        storage.delete_layer(&layer("base")).await.unwrap();
        assert_eq!(datasets(&pool), empty);
    });
}

#[test]
fn zfs_probe_sees_the_cli() {
    if Pool::create("zfs_probe_sees_the_cli").is_none() {
        return;
    }
    let caps = <ZfsStorage as Storage>::probe().unwrap();
    assert_eq!(caps.driver, "zfs");
    assert!(caps.has("zfs") && caps.has("zpool"), "{caps:?}");
}
