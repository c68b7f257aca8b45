//! The overlay driver for real: layers on disk, roots mounted with overlayfs in a private
//! mount namespace, snapshots, forks, refusals and crash recovery.

// Integration tests are a test crate of their own: no `mod tests` wrapper, and SKIP lines
// go to stdout.
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::tests_outside_test_module,
    clippy::print_stdout
)]

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use coppice_lifecycle::backend::{
    BackendError, LayerId, LayerKind, RootfsSpec, SandboxId, Storage,
};
use coppice_zfs::OverlayStorage;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use tempfile::TempDir;

const SHIFT: u32 = 100_000;

/// Whether this test can run; prints the SKIP line if not.
fn privileged(test: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP {test}: needs root");
        return false;
    }
    let caps = <OverlayStorage as Storage>::probe().unwrap();
    if let Some(missing) = caps.missing().next() {
        println!(
            "SKIP {test}: {} unavailable: {}",
            missing.name, missing.detail
        );
        return false;
    }
    true
}

/// A scratch directory under /var/tmp (the same filesystem as the template cache).
fn scratch() -> TempDir {
    tempfile::Builder::new()
        .prefix("coppice-zfs-test-")
        .tempdir_in("/var/tmp")
        .unwrap()
}

fn layer(name: &str) -> LayerId {
    LayerId::new(name).unwrap()
}

fn sandbox(name: &str) -> SandboxId {
    SandboxId::new(name).unwrap()
}

/// A small template tree owned by the shifted root, like the real one.
fn template_tree(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    for d in ["etc", "data", "keep/sub"] {
        fs::create_dir_all(src.join(d)).unwrap();
    }
    fs::write(src.join("etc/conf"), "orig\n").unwrap();
    fs::write(src.join("data/a"), "a\n").unwrap();
    fs::write(src.join("data/b"), "b\n").unwrap();
    fs::write(src.join("keep/sub/x"), "x\n").unwrap();
    std::os::unix::fs::symlink("etc/conf", src.join("conf-link")).unwrap();
    for entry in walk(&src) {
        std::os::unix::fs::lchown(&entry, Some(SHIFT), Some(SHIFT)).unwrap();
    }
    fs::set_permissions(&src, fs::Permissions::from_mode(0o755)).unwrap();
    src
}

fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        let p = out[i].clone();
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            for e in fs::read_dir(&p).unwrap() {
                out.push(e.unwrap().path());
            }
        }
        i += 1;
    }
    out
}

/// Mounts `spec` at `target` in a new mount namespace on a thread of its own, runs `f` on
/// the merged tree, and unmounts; the namespace (and anything left mounted in it) dies with
/// the thread, so the host never sees the mount.
fn with_overlay<T: Send>(spec: &RootfsSpec, target: &Path, f: impl FnOnce(&Path) -> T + Send) -> T {
    let RootfsSpec::Overlay { lower, upper, work } = spec else {
        panic!("not an overlay spec: {spec:?}");
    };
    let lowers: Vec<String> = lower.iter().map(|p| p.display().to_string()).collect();
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lowers.join(":"),
        upper.display(),
        work.display()
    );
    fs::create_dir_all(target).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).unwrap();
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .unwrap();
            mount(
                Some("overlay"),
                target,
                Some("overlay"),
                MsFlags::empty(),
                Some(options.as_str()),
            )
            .unwrap();
            struct Unmount<'a>(&'a Path);
            impl Drop for Unmount<'_> {
                fn drop(&mut self) {
                    let _ = umount2(self.0, MntFlags::MNT_DETACH);
                }
            }
            let _guard = Unmount(target);
            f(target)
        })
        .join()
        .unwrap()
    })
}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: both strings are NUL-terminated and live across the call; the buffer pointer
    // and length describe `buf`, which the kernel writes at most `buf.len()` bytes into.
    let len =
        unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    let len = usize::try_from(len).ok()?;
    buf.truncate(len);
    Some(buf)
}

fn lower_of(spec: &RootfsSpec) -> Vec<PathBuf> {
    match spec {
        RootfsSpec::Overlay { lower, .. } => lower.clone(),
        RootfsSpec::Directory(_) => panic!("not an overlay spec"),
    }
}

fn upper_of(spec: &RootfsSpec) -> PathBuf {
    match spec {
        RootfsSpec::Overlay { upper, .. } => upper.clone(),
        RootfsSpec::Directory(_) => panic!("not an overlay spec"),
    }
}

#[tokio::test]
async fn writes_through_the_overlay_never_reach_the_template() {
    if !privileged("writes_through_the_overlay_never_reach_the_template") {
        return;
    }
    let dir = scratch();
    let src = template_tree(dir.path());
    let storage = OverlayStorage::open(dir.path().join("store")).unwrap();
    let info = storage.import_template(&layer("base"), &src).await.unwrap();
    assert_eq!(info.kind, LayerKind::Template);
    assert_eq!(info.parent, None);
    assert!(info.disk_bytes > 0);

    let spec = storage
        .create_rootfs(&sandbox("one"), &layer("base"))
        .await
        .unwrap();
    assert_eq!(lower_of(&spec), [storage.layer_tree(&layer("base"))]);
    let upper = fs::metadata(upper_of(&spec)).unwrap();
    assert_eq!((upper.uid(), upper.gid()), (SHIFT, SHIFT));
    assert_eq!(upper.mode() & 0o7777, 0o755);
    assert_eq!(storage.rootfs(&sandbox("one")).await.unwrap(), spec);

    with_overlay(&spec, &dir.path().join("mnt"), |m| {
        assert_eq!(fs::read_to_string(m.join("etc/conf")).unwrap(), "orig\n");
        fs::write(m.join("etc/conf"), "changed\n").unwrap();
        fs::write(m.join("new"), "new\n").unwrap();
        fs::remove_file(m.join("data/a")).unwrap();
    });

    let base = storage.layer_tree(&layer("base"));
    for tree in [&src, &base] {
        assert_eq!(fs::read_to_string(tree.join("etc/conf")).unwrap(), "orig\n");
        assert!(tree.join("data/a").exists());
        assert!(!tree.join("new").exists());
    }
    assert_eq!(
        fs::read_to_string(upper_of(&spec).join("etc/conf")).unwrap(),
        "changed\n"
    );
    // The template was on the same filesystem, so the layer shares its inodes.
    assert_eq!(
        fs::metadata(src.join("data/b")).unwrap().ino(),
        fs::metadata(base.join("data/b")).unwrap().ino()
    );
    assert_eq!(
        fs::read_link(base.join("conf-link")).unwrap(),
        Path::new("etc/conf")
    );
}

#[tokio::test]
async fn snapshots_keep_deletions_and_opaque_dirs_and_forks_are_isolated() {
    if !privileged("snapshots_keep_deletions_and_opaque_dirs_and_forks_are_isolated") {
        return;
    }
    let dir = scratch();
    let src = template_tree(dir.path());
    let storage = OverlayStorage::open(dir.path().join("store")).unwrap();
    storage.import_template(&layer("base"), &src).await.unwrap();
    let source = storage
        .create_rootfs(&sandbox("src"), &layer("base"))
        .await
        .unwrap();
    let mnt = dir.path().join("mnt");
    with_overlay(&source, &mnt, |m| {
        fs::write(m.join("etc/conf"), "changed\n").unwrap();
        fs::remove_file(m.join("data/a")).unwrap();
        fs::remove_dir_all(m.join("keep")).unwrap();
        fs::create_dir(m.join("keep")).unwrap();
        fs::write(m.join("keep/fresh"), "fresh\n").unwrap();
        fs::write(m.join("big"), vec![1u8; 1 << 20]).unwrap();
        fs::hard_link(m.join("big"), m.join("big-link")).unwrap();
    });

    let snap = storage
        .snapshot(&sandbox("src"), &layer("snap1"))
        .await
        .unwrap();
    assert_eq!(snap.kind, LayerKind::Snapshot);
    assert_eq!(snap.parent, Some(layer("base")));
    assert!(snap.disk_bytes >= 1 << 20);

    // The layer holds overlayfs's own records of the changes: a 0/0 whiteout and an opaque dir.
    let tree = storage.layer_tree(&layer("snap1"));
    let whiteout = fs::symlink_metadata(tree.join("data/a")).unwrap();
    assert!(whiteout.file_type().is_char_device());
    assert_eq!(whiteout.rdev(), 0);
    assert_eq!(
        xattr(&tree.join("keep"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(
        fs::metadata(tree.join("big")).unwrap().ino(),
        fs::metadata(tree.join("big-link")).unwrap().ino(),
        "hard links were not kept"
    );
    assert_eq!(fs::metadata(&tree).unwrap().uid(), SHIFT);

    let fork = storage
        .create_rootfs(&sandbox("fork"), &layer("snap1"))
        .await
        .unwrap();
    assert_eq!(
        lower_of(&fork),
        [tree.clone(), storage.layer_tree(&layer("base"))]
    );

    // The source keeps changing after the snapshot.
    with_overlay(&source, &mnt, |m| {
        fs::write(m.join("etc/conf"), "after\n").unwrap();
        fs::write(m.join("later"), "later\n").unwrap();
    });

    with_overlay(&fork, &mnt, |m| {
        assert_eq!(fs::read_to_string(m.join("etc/conf")).unwrap(), "changed\n");
        assert!(!m.join("data/a").exists(), "deleted file came back");
        assert_eq!(fs::read_to_string(m.join("data/b")).unwrap(), "b\n");
        let keep: Vec<_> = fs::read_dir(m.join("keep"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(keep, ["fresh"], "opaque dir shows the template's entries");
        assert!(
            !m.join("later").exists(),
            "source write leaked into the fork"
        );
        fs::write(m.join("etc/conf"), "fork\n").unwrap();
    });
    assert_eq!(
        fs::read_to_string(tree.join("etc/conf")).unwrap(),
        "changed\n",
        "a fork's write reached its snapshot"
    );
    with_overlay(&source, &mnt, |m| {
        assert_eq!(fs::read_to_string(m.join("etc/conf")).unwrap(), "after\n");
    });
}

#[tokio::test]
async fn layers_in_use_cannot_be_deleted() {
    if !privileged("layers_in_use_cannot_be_deleted") {
        return;
    }
    let dir = scratch();
    let src = template_tree(dir.path());
    let storage = OverlayStorage::open(dir.path().join("store")).unwrap();
    storage.import_template(&layer("base"), &src).await.unwrap();
    storage
        .create_rootfs(&sandbox("a"), &layer("base"))
        .await
        .unwrap();
    let upper = upper_of(&storage.rootfs(&sandbox("a")).await.unwrap());
    fs::write(upper.join("mine"), "mine\n").unwrap();

    let err = storage.delete_layer(&layer("base")).await.unwrap_err();
    assert!(
        matches!(&err, BackendError::InUse { kind: "layer", id, dependents }
            if id == "base" && dependents == &["sandbox a"]),
        "{err:?}"
    );

    storage.snapshot(&sandbox("a"), &layer("s")).await.unwrap();
    storage.remove_rootfs(&sandbox("a")).await.unwrap();
    assert_eq!(storage.sandboxes().await.unwrap(), Vec::<SandboxId>::new());
    // The snapshot is a copy: removing its sandbox left it whole.
    assert_eq!(
        fs::read_to_string(storage.layer_tree(&layer("s")).join("mine")).unwrap(),
        "mine\n"
    );

    let err = storage.delete_layer(&layer("base")).await.unwrap_err();
    assert!(
        matches!(&err, BackendError::InUse { dependents, .. } if dependents == &["layer s"]),
        "{err:?}"
    );
    assert!(err.to_string().contains("layer s"), "{err}");

    storage
        .create_rootfs(&sandbox("f"), &layer("s"))
        .await
        .unwrap();
    let err = storage.delete_layer(&layer("s")).await.unwrap_err();
    assert!(
        matches!(&err, BackendError::InUse { dependents, .. } if dependents == &["sandbox f"]),
        "{err:?}"
    );
    let err = storage.delete_layer(&layer("base")).await.unwrap_err();
    assert!(
        matches!(&err, BackendError::InUse { dependents, .. }
            if dependents == &["sandbox f", "layer s"]),
        "{err:?}"
    );

    storage.remove_rootfs(&sandbox("f")).await.unwrap();
    storage.delete_layer(&layer("s")).await.unwrap();
    storage.delete_layer(&layer("base")).await.unwrap();
    assert!(storage.layers().await.unwrap().is_empty());
    assert_eq!(
        fs::read_dir(dir.path().join("store/tmp")).unwrap().count(),
        0
    );
    assert_eq!(
        fs::read_dir(dir.path().join("store/layers"))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test]
async fn crash_leftovers_are_never_listed_and_are_removed_on_open() {
    if !privileged("crash_leftovers_are_never_listed_and_are_removed_on_open") {
        return;
    }
    let dir = scratch();
    let src = template_tree(dir.path());
    let root = dir.path().join("store");
    let storage = OverlayStorage::open(root.clone()).unwrap();
    storage.import_template(&layer("base"), &src).await.unwrap();
    storage
        .create_rootfs(&sandbox("live"), &layer("base"))
        .await
        .unwrap();

    // What crashes in the middle of operations leave: a staging tree, a layer directory
    // without metadata, a sandbox directory without metadata.
    let staging = root.join("tmp/layer-half-999-0");
    fs::create_dir_all(staging.join("tree/etc")).unwrap();
    fs::write(staging.join("layer.json"), "{}").unwrap();
    fs::create_dir_all(root.join("layers/half/tree")).unwrap();
    fs::create_dir_all(root.join("sandboxes/ghost/upper")).unwrap();

    let names = |v: Vec<coppice_lifecycle::backend::LayerInfo>| {
        v.into_iter().map(|l| l.id.to_string()).collect::<Vec<_>>()
    };
    assert_eq!(names(storage.layers().await.unwrap()), ["base"]);
    assert_eq!(storage.sandboxes().await.unwrap(), [sandbox("live")]);
    assert!(matches!(
        storage.create_rootfs(&sandbox("x"), &layer("half")).await,
        Err(BackendError::NotFound { kind: "layer", .. })
    ));

    let reopened = OverlayStorage::open(root.clone()).unwrap();
    assert!(!staging.exists());
    assert!(!root.join("layers/half").exists());
    assert!(!root.join("sandboxes/ghost").exists());
    assert_eq!(fs::read_dir(root.join("tmp")).unwrap().count(), 0);
    assert_eq!(names(reopened.layers().await.unwrap()), ["base"]);
    assert_eq!(reopened.sandboxes().await.unwrap(), [sandbox("live")]);
    // The name of the half-made layer is free again.
    reopened
        .import_template(&layer("half"), &src)
        .await
        .unwrap();
}

#[tokio::test]
async fn bad_input_gets_typed_errors_and_leaves_nothing_behind() {
    if !privileged("bad_input_gets_typed_errors_and_leaves_nothing_behind") {
        return;
    }
    let dir = scratch();
    let src = template_tree(dir.path());
    let root = dir.path().join("store");
    let storage = OverlayStorage::open(root.clone()).unwrap();

    let missing = dir.path().join("no-such-rootfs");
    let err = storage
        .import_template(&layer("base"), &missing)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, BackendError::NotFound { kind: "template source", id } if id.contains("no-such-rootfs")),
        "{err:?}"
    );
    let err = storage
        .import_template(&layer("base"), &src.join("etc/conf"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            BackendError::InvalidSpec {
                field: "template source",
                ..
            }
        ),
        "{err:?}"
    );

    let err = storage
        .create_rootfs(&sandbox("a"), &layer("nope"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, BackendError::NotFound { kind: "layer", id } if id == "nope"),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "layer \"nope\" not found");

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
        storage.snapshot(&sandbox("zz"), &layer("s")).await,
        Err(BackendError::NotFound {
            kind: "sandbox",
            ..
        })
    ));
    assert!(matches!(
        storage.snapshot(&sandbox("a"), &layer("base")).await,
        Err(BackendError::AlreadyExists { kind: "layer", .. })
    ));
    assert!(matches!(
        storage.remove_rootfs(&sandbox("zz")).await,
        Err(BackendError::NotFound {
            kind: "sandbox",
            ..
        })
    ));
    assert!(matches!(
        storage.rootfs(&sandbox("zz")).await,
        Err(BackendError::NotFound {
            kind: "sandbox",
            ..
        })
    ));
    assert!(matches!(
        storage.usage(&sandbox("zz")).await,
        Err(BackendError::NotFound {
            kind: "sandbox",
            ..
        })
    ));
    assert!(matches!(
        storage.delete_layer(&layer("zz")).await,
        Err(BackendError::NotFound { kind: "layer", .. })
    ));
    // Ids are validated before they reach storage, so a path can never be smuggled in.
    assert!(matches!(
        SandboxId::new("../etc"),
        Err(BackendError::InvalidSpec {
            field: "sandbox id",
            ..
        })
    ));
    assert!(matches!(
        LayerId::new("a/b"),
        Err(BackendError::InvalidSpec {
            field: "layer id",
            ..
        })
    ));

    assert_eq!(fs::read_dir(root.join("tmp")).unwrap().count(), 0);
    assert_eq!(storage.sandboxes().await.unwrap(), [sandbox("a")]);
    assert_eq!(storage.layers().await.unwrap().len(), 1);
}

#[tokio::test]
async fn usage_moves_when_files_are_written() {
    if !privileged("usage_moves_when_files_are_written") {
        return;
    }
    let dir = scratch();
    let src = template_tree(dir.path());
    let storage = OverlayStorage::open(dir.path().join("store")).unwrap();
    let base = storage.import_template(&layer("base"), &src).await.unwrap();
    let spec = storage
        .create_rootfs(&sandbox("a"), &layer("base"))
        .await
        .unwrap();
    let before = storage.usage(&sandbox("a")).await.unwrap();
    assert_eq!(before.shared_bytes, base.disk_bytes);

    with_overlay(&spec, &dir.path().join("mnt"), |m| {
        fs::write(m.join("blob"), vec![9u8; 2 << 20]).unwrap();
    });
    let after = storage.usage(&sandbox("a")).await.unwrap();
    assert!(
        after.written_bytes >= before.written_bytes + (2 << 20),
        "{before:?} -> {after:?}"
    );
    assert_eq!(after.shared_bytes, before.shared_bytes);

    let snap = storage.snapshot(&sandbox("a"), &layer("s")).await.unwrap();
    let fork_usage = {
        storage
            .create_rootfs(&sandbox("b"), &layer("s"))
            .await
            .unwrap();
        storage.usage(&sandbox("b")).await.unwrap()
    };
    assert_eq!(fork_usage.shared_bytes, base.disk_bytes + snap.disk_bytes);
    assert!(fork_usage.written_bytes < before.written_bytes + (1 << 20));
}

#[test]
fn probe_reports_what_the_driver_needs() {
    let caps = <OverlayStorage as Storage>::probe().unwrap();
    assert_eq!(caps.driver, "overlay");
    let listed = fs::read_to_string("/proc/filesystems")
        .unwrap()
        .lines()
        .any(|l| l.ends_with("\toverlay"));
    assert_eq!(caps.has("overlayfs"), listed);
    assert_eq!(caps.has("root"), nix::unistd::geteuid().is_root());

    let dir = scratch();
    let caps = OverlayStorage::probe_at(dir.path()).unwrap();
    let reflink = caps.features.iter().find(|c| c.name == "reflink").unwrap();
    assert!(reflink.detail.contains(&dir.path().display().to_string()));
    // The probe cleans up after itself.
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn the_default_template_imports_by_hard_links_and_mounts() {
    let test = "the_default_template_imports_by_hard_links_and_mounts";
    if !privileged(test) {
        return;
    }
    let builder = coppice_zfs::template::TemplateBuilder::new(
        coppice_zfs::template::default_cache_dir(),
        SHIFT,
    );
    if !builder.is_cached() && !Path::new("/usr/sbin/debootstrap").exists() {
        println!("SKIP {test}: debootstrap missing");
        return;
    }
    let template = builder
        .ensure(false, &mut |line| println!("template: {line}"))
        .unwrap();
    let dir = scratch();
    let storage = OverlayStorage::open(dir.path().join("store")).unwrap();
    storage
        .import_template(&layer("base"), &template)
        .await
        .unwrap();
    let tree = storage.layer_tree(&layer("base"));
    let python = fs::metadata(tree.join("usr/bin/python3")).unwrap();
    assert_eq!(
        python.ino(),
        fs::metadata(template.join("usr/bin/python3"))
            .unwrap()
            .ino(),
        "the template cache was copied instead of linked"
    );
    let spec = storage
        .create_rootfs(&sandbox("deb"), &layer("base"))
        .await
        .unwrap();
    let upper = fs::metadata(upper_of(&spec)).unwrap();
    assert_eq!((upper.uid(), upper.gid()), (SHIFT, SHIFT));
    with_overlay(&spec, &dir.path().join("mnt"), |m| {
        let sudo = fs::metadata(m.join("usr/bin/sudo")).unwrap();
        assert_eq!(sudo.mode() & 0o4000, 0o4000);
        assert!(m.join("run/coppice").is_dir());
        assert!(fs::read_to_string(m.join("etc/passwd"))
            .unwrap()
            .contains("user:x:1000:1000::/home/user:/bin/bash"));
    });
}

/// Roots are built outside the storage lock: concurrent creates of distinct ids all succeed,
/// concurrent creates of one id publish exactly one root, a layer being deleted and a
/// sandbox being created on it never both succeed, and concurrent removals leave nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_and_removes_stay_consistent() {
    if !privileged("concurrent_creates_and_removes_stay_consistent") {
        return;
    }
    let dir = scratch();
    let src = template_tree(dir.path());
    let storage = std::sync::Arc::new(OverlayStorage::open(dir.path().join("store")).unwrap());
    storage.import_template(&layer("base"), &src).await.unwrap();

    let creates: Vec<_> = (0..24)
        .map(|i| {
            let s = std::sync::Arc::clone(&storage);
            tokio::spawn(async move {
                s.create_rootfs(&sandbox(&format!("c{i}")), &layer("base"))
                    .await
            })
        })
        .collect();
    for c in creates {
        c.await.unwrap().unwrap();
    }
    let same: Vec<_> = (0..8)
        .map(|_| {
            let s = std::sync::Arc::clone(&storage);
            tokio::spawn(async move { s.create_rootfs(&sandbox("dup"), &layer("base")).await })
        })
        .collect();
    let mut won = 0;
    for c in same {
        match c.await.unwrap() {
            Ok(_) => won += 1,
            Err(BackendError::AlreadyExists { .. }) => {}
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(won, 1);
    assert_eq!(storage.sandboxes().await.unwrap().len(), 25);

    // A layer deleted while a root is created on it: the create fails or the delete does.
    storage
        .import_template(&layer("other"), &src)
        .await
        .unwrap();
    let s1 = std::sync::Arc::clone(&storage);
    let s2 = std::sync::Arc::clone(&storage);
    let (created, deleted) = tokio::join!(
        tokio::spawn(async move { s1.create_rootfs(&sandbox("race"), &layer("other")).await }),
        tokio::spawn(async move { s2.delete_layer(&layer("other")).await }),
    );
    let (created, deleted) = (created.unwrap(), deleted.unwrap());
    assert!(
        created.is_ok() != deleted.is_ok(),
        "create {created:?}, delete {deleted:?}"
    );

    let mut ids = storage.sandboxes().await.unwrap();
    ids.sort();
    let removes: Vec<_> = ids
        .into_iter()
        .map(|id| {
            let s = std::sync::Arc::clone(&storage);
            tokio::spawn(async move { s.remove_rootfs(&id).await })
        })
        .collect();
    for r in removes {
        r.await.unwrap().unwrap();
    }
    assert!(storage.sandboxes().await.unwrap().is_empty());
    assert_eq!(
        fs::read_dir(dir.path().join("store/tmp")).unwrap().count(),
        0
    );
}
