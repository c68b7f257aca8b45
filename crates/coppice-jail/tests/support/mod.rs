//! The world every jail test runs in: the per-machine Debian template, a state directory,
//! storage root and cgroup group of the test's own, and a guard that tears it all down.

#![allow(dead_code, unreachable_pub)]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use coppice_jail::{JailConfig, LinuxJail};
use coppice_lifecycle::backend::{
    BindMount, InitSpec, Isolation, JailSpec, LayerId, Limits, SandboxId, Storage,
};
use coppice_zfs::OverlayStorage;

/// How long a test waits for a sandbox to write its answer before failing.
pub const ANSWER_WAIT: Duration = Duration::from_secs(60);

/// The per-machine template, built once per test binary (the builder locks across processes
/// and installs debootstrap when it is missing).
pub fn template() -> &'static Path {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        coppice_zfs::template::TemplateBuilder::new(
            coppice_zfs::template::default_cache_dir(),
            JailConfig::DEFAULT_UID_BASE,
        )
        .ensure(false, &mut |line: &str| eprintln!("template: {line}"))
        .unwrap_or_else(|e| panic!("building the default template failed: {e}"))
    })
}

/// Why this host cannot run the tests, if it cannot.
pub fn missing_capability() -> Option<String> {
    let caps = <LinuxJail as Isolation>::probe().expect("probe");
    let missing: Vec<String> = caps
        .missing()
        .map(|c| format!("{} ({})", c.name, c.detail))
        .collect();
    if missing.is_empty() {
        None
    } else {
        Some(missing.join(", "))
    }
}

/// One test's world: its own jail state, storage root and cgroup group.
pub struct World {
    pub name: String,
    pub dir: tempfile::TempDir,
    pub jail: LinuxJail,
    pub storage: OverlayStorage,
    pub base: LayerId,
}

impl World {
    /// Prints the skip line and returns `None` when the host cannot run sandboxes.
    pub fn new(name: &str) -> Option<Self> {
        if let Some(reason) = missing_capability() {
            println!("SKIP {name}: {reason}");
            return None;
        }
        let template = template();
        // Under /var/tmp so layers can hard-link the template cache (same filesystem).
        let dir = tempfile::Builder::new()
            .prefix("coppice-jail-test-")
            .tempdir_in("/var/tmp")
            .expect("tempdir");
        let mut config = JailConfig::new(dir.path().join("jail"));
        config.cgroup_group = group_name(dir.path());
        let jail = LinuxJail::open(config).expect("open jail");
        let storage = OverlayStorage::open(dir.path().join("storage")).expect("open storage");
        let base = LayerId::new("base").unwrap();
        let rt = runtime();
        rt.block_on(storage.import_template(&base, template))
            .expect("import template");
        Some(Self {
            name: name.to_owned(),
            dir,
            jail,
            storage,
            base,
        })
    }

    pub fn group(&self) -> String {
        group_name(self.dir.path())
    }

    /// A host directory bind-mounted at /run/coppice, writable by sandbox root.
    pub fn exchange_dir(&self, id: &str) -> PathBuf {
        let dir = self.dir.path().join("exchange").join(id);
        fs::create_dir_all(&dir).unwrap();
        let uid = self.jail.host_id(0);
        std::os::unix::fs::chown(&dir, Some(uid), Some(uid)).unwrap();
        dir
    }

    /// A spec whose init runs `script` in bash, then sleeps forever as PID 1.
    pub fn spec(&self, id: &str, rootfs_base: &LayerId, script: &str, limits: Limits) -> JailSpec {
        let sid = SandboxId::new(id).unwrap();
        let rootfs = runtime()
            .block_on(self.storage.create_rootfs(&sid, rootfs_base))
            .expect("create rootfs");
        JailSpec {
            id: sid,
            rootfs,
            init: InitSpec {
                program: "/bin/bash".into(),
                args: vec!["-c".into(), format!("{script}\nexec sleep infinity")],
                env: vec![(
                    "PATH".into(),
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                )],
                cwd: "/".into(),
            },
            mounts: vec![BindMount {
                source: self.exchange_dir(id),
                target: "/run/coppice".into(),
                read_only: false,
            }],
            limits,
            network: None,
        }
    }

    pub fn start(&self, id: &str, script: &str, limits: Limits) -> PathBuf {
        let spec = self.spec(id, &self.base, script, limits);
        runtime()
            .block_on(self.jail.start(spec))
            .unwrap_or_else(|e| panic!("{}: start {id}: {e}", self.name));
        self.dir.path().join("exchange").join(id)
    }

    pub fn kill(&self, id: &str) {
        let sid = SandboxId::new(id).unwrap();
        let rt = runtime();
        rt.block_on(self.jail.kill(&sid)).expect("kill");
        rt.block_on(self.storage.remove_rootfs(&sid))
            .expect("remove rootfs");
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // Tear down whatever a failed test left running.
        let rt = runtime();
        if let Ok(list) = rt.block_on(self.jail.list()) {
            for info in list {
                let _ = rt.block_on(self.jail.kill(&info.id));
                let _ = rt.block_on(self.storage.remove_rootfs(&info.id));
            }
        }
        if let Ok(ids) = rt.block_on(self.storage.sandboxes()) {
            for id in ids {
                let _ = rt.block_on(self.storage.remove_rootfs(&id));
            }
        }
        let _ = self.jail.remove_spare_cgroups();
    }
}

pub fn group_name(dir: &Path) -> String {
    format!(
        "coppice-test-{}",
        dir.file_name().unwrap().to_string_lossy().replace('.', "")
    )
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Waits until the sandbox has written `file` into its exchange directory.
pub fn answer(dir: &Path, file: &str) -> String {
    let path = dir.join(file);
    let deadline = Instant::now() + ANSWER_WAIT;
    loop {
        if let Ok(s) = fs::read_to_string(&path) {
            return s;
        }
        assert!(Instant::now() < deadline, "no {file} from the sandbox");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts that the world's cgroup group holds nothing but spare memory cgroups without a
/// task, then removes those and asserts that nothing of the group is left.
pub fn assert_no_cgroups_but_spares(w: &World) {
    let group = w.group();
    for dir in cgroup_dirs_named(&group) {
        for e in fs::read_dir(&dir).unwrap().flatten() {
            if !e.file_type().unwrap().is_dir() {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(
                name.starts_with("slot-"),
                "cgroup {} is left",
                e.path().display()
            );
            let procs = fs::read_to_string(e.path().join("cgroup.procs")).unwrap();
            assert!(procs.trim().is_empty(), "spare {name} holds tasks {procs}");
        }
    }
    w.jail.remove_spare_cgroups().unwrap();
    assert!(cgroup_dirs_named(&group).is_empty(), "cgroups removed");
}

/// Paths of cgroup directories named `group` anywhere under /sys/fs/cgroup.
pub fn cgroup_dirs_named(group: &str) -> Vec<PathBuf> {
    pub fn walk(dir: &Path, group: &str, depth: usize, out: &mut Vec<PathBuf>) {
        if depth > 6 {
            return;
        }
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                if e.file_name().to_string_lossy() == group {
                    out.push(p.clone());
                }
                walk(&p, group, depth + 1, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(Path::new("/sys/fs/cgroup"), group, 0, &mut out);
    out
}
