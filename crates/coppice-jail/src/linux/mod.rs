//! The Linux driver: namespaces + cgroups + overlay root, with a durable record per sandbox.

mod cgroup;
mod seccomp;
mod spawn;

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use coppice_lifecycle::backend::{
    BackendError, Capabilities, Capability, Isolation, JailInfo, JailSpec, ResourceUsage, RunState,
    SandboxId,
};
use serde::{Deserialize, Serialize};

use crate::JailConfig;
use cgroup::{Controller, Hierarchies, SandboxCgroups};

/// What is persisted for each sandbox so that any later process can find it again.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    spec: JailSpec,
    pid: u32,
    /// Start time of `pid` in clock ticks since boot (`/proc/<pid>/stat` field 22), so a
    /// recycled pid is never mistaken for the sandbox.
    pid_start: u64,
    started_at: SystemTime,
    cgroups: SandboxCgroups,
}

/// Sandboxes as Linux namespaces and cgroups. See the crate docs for the isolation model.
#[derive(Debug, Clone)]
pub struct LinuxJail {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: JailConfig,
    hierarchies: Hierarchies,
    records: Mutex<HashMap<SandboxId, Record>>,
    /// Each sandbox's last full usage reading, served again while its CPU time stands still.
    readings: Mutex<HashMap<SandboxId, Reading>>,
}

/// A full usage reading and the raw CPU time it was taken at.
#[derive(Debug, Clone, Copy)]
struct Reading {
    cpu_nanos_raw: u64,
    at: Instant,
    usage: ResourceUsage,
}

/// How long a reading is served again while the sandbox's CPU time stands still. Nothing in
/// an idle sandbox moves its memory up, its task count or its enforcement counters (each
/// takes a task running in it), but the kernel may reclaim its page cache meanwhile, so an
/// idle sandbox is still read in full this often.
const READING_REUSE: Duration = Duration::from_secs(60);

impl LinuxJail {
    /// Opens the driver on `config.state_dir`, re-adopting every sandbox a previous process
    /// recorded there and cleaning up those that are gone (and cgroups nobody recorded).
    pub fn open(config: JailConfig) -> Result<Self, BackendError> {
        let jail = Self::attach(config)?;
        jail.recover()?;
        Ok(jail)
    }

    /// Opens the driver without looking at what an earlier process left: it knows no sandbox
    /// until [`LinuxJail::recover`] has run. For a caller that must answer (say, bind its
    /// port) before re-adopting thousands of sandboxes; it must start none before then,
    /// because recovery treats every cgroup it has no record of as an orphan.
    pub fn attach(config: JailConfig) -> Result<Self, BackendError> {
        if config.uid_count < 65536 || config.uid_base == 0 {
            return Err(BackendError::InvalidSpec {
                field: "uid range",
                reason: format!(
                    "{}+{} must start above 0 and map at least 65536 ids",
                    config.uid_base, config.uid_count
                ),
            });
        }
        for dir in [config.records_dir(), config.roots_dir(), config.logs_dir()] {
            fs::create_dir_all(&dir).map_err(|e| BackendError::io("create directory", &dir, e))?;
        }
        let hierarchies = Hierarchies::detect(&config.cgroup_group)?;
        let jail = Self {
            inner: Arc::new(Inner {
                config,
                hierarchies,
                records: Mutex::new(HashMap::new()),
                readings: Mutex::new(HashMap::new()),
            }),
        };
        Ok(jail)
    }

    /// The host uid (and gid) that sandbox uid `uid` runs as; for giving sandboxes write
    /// access to host directories bind-mounted into them.
    pub fn host_id(&self, sandbox_uid: u32) -> u32 {
        self.inner.config.uid_base + sandbox_uid
    }

    /// An execute-only copy of `program` (mode 0711, owned by host root), made once under
    /// the state directory and reused while `program`'s size and modification time match,
    /// for a caller to bind into sandboxes as their init.
    ///
    /// Sandbox root cannot read that file: host root is not mapped in its user namespace, so
    /// its capabilities do not override the file's mode. The kernel then makes the exec'd
    /// init non-dumpable and ties its memory to the nearest user namespace that could read
    /// the file, the host's (`would_dump` in `fs/exec.c`), and tracing it, reading or writing
    /// its memory, or writing its `/proc` files needs a capability in that namespace, which
    /// nothing in the sandbox has (`docs/backends.md`).
    pub fn sealed_program(&self, program: &Path) -> Result<PathBuf, BackendError> {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        let dir = self.inner.config.state_dir.join("programs");
        fs::create_dir_all(&dir).map_err(|e| BackendError::io("create", &dir, e))?;
        let name = program
            .file_name()
            .ok_or_else(|| BackendError::InvalidSpec {
                field: "program",
                reason: format!("{} names no file", program.display()),
            })?;
        let sealed = dir.join(name);
        let src = fs::metadata(program).map_err(|e| BackendError::io("stat", program, e))?;
        let current = fs::metadata(&sealed).ok().is_some_and(|m| {
            m.len() == src.len()
                && m.mtime() == src.mtime()
                && m.mtime_nsec() == src.mtime_nsec()
                && m.mode() & 0o7777 == 0o711
                && m.uid() == 0
                && m.gid() == 0
        });
        if current {
            return Ok(sealed);
        }
        let tmp = dir.join(format!(
            ".{}.{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let copied = (|| {
            fs::copy(program, &tmp)?;
            std::os::unix::fs::chown(&tmp, Some(0), Some(0))?;
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o711))?;
            let file = fs::File::options().write(true).open(&tmp)?;
            file.set_modified(src.modified()?)?;
            file.sync_all()?;
            fs::rename(&tmp, &sealed)
        })();
        if let Err(e) = copied {
            let _ = fs::remove_file(&tmp);
            return Err(BackendError::io("copy", &sealed, e));
        }
        Ok(sealed)
    }

    /// The file that collects the sandbox init's stdout and stderr. It is never removed by
    /// the driver: it outlives the sandbox for whoever reads it.
    pub fn log_path(&self, id: &SandboxId) -> PathBuf {
        self.logs_dir().join(format!("{id}.log"))
    }

    /// The directory of every sandbox's [`LinuxJail::log_path`].
    pub fn logs_dir(&self) -> PathBuf {
        self.inner.config.logs_dir()
    }

    fn readings(&self) -> MutexGuard<'_, HashMap<SandboxId, Reading>> {
        // Every critical section is one lookup, insert or remove.
        self.inner
            .readings
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn records(&self) -> MutexGuard<'_, HashMap<SandboxId, Record>> {
        // A poisoned lock only means another thread panicked mid-operation; the map itself
        // is always left consistent (inserts and removes are single calls).
        self.inner
            .records
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Re-adopts every sandbox recorded under the state directory whose init still runs,
    /// and removes what is left of the others and of starts that never wrote a record.
    /// Blocking; [`LinuxJail::open`] runs it, [`LinuxJail::attach`] leaves it to the caller.
    pub fn recover(&self) -> Result<(), BackendError> {
        let dir = self.inner.config.records_dir();
        let entries = fs::read_dir(&dir).map_err(|e| BackendError::io("read", &dir, e))?;
        // A set: every cgroup of every hierarchy is looked up in it, and with thousands of
        // sandboxes a list would make recovery quadratic.
        let mut known = std::collections::HashSet::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            // Temporary files of an interrupted write are never valid records.
            let Some(id) = name.strip_suffix(".json") else {
                let _ = fs::remove_file(&path);
                continue;
            };
            let Ok(id) = SandboxId::new(id) else { continue };
            let record: Option<Record> = fs::read(&path)
                .ok()
                .and_then(|bytes| serde_json::from_slice(&bytes).ok());
            match record {
                Some(r) if pid_start(r.pid) == Some(r.pid_start) => {
                    known.insert(id.as_str().to_owned());
                    self.records().insert(id, r);
                }
                Some(r) => {
                    // Init is gone: whatever is left in its cgroups goes too.
                    self.inner.hierarchies.release(&r.cgroups)?;
                    self.forget(&id);
                }
                None => {
                    let _ = fs::remove_file(&path);
                }
            }
        }
        // Cgroups without a record belong to a start that crashed half-way.
        for group in self.inner.hierarchies.group_dirs() {
            let Ok(entries) = fs::read_dir(&group) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if entry.path().is_dir() && !known.contains(&name) && SandboxId::new(&*name).is_ok()
                {
                    self.inner
                        .hierarchies
                        .sandbox(&name)
                        .kill_all_and_remove()?;
                }
            }
        }
        // Mount points of starts cut short before their record was written.
        let roots = self.inner.config.roots_dir();
        if let Ok(entries) = fs::read_dir(&roots) {
            for entry in entries.flatten() {
                if !known.contains(entry.file_name().to_string_lossy().as_ref()) {
                    let _ = fs::remove_dir(entry.path());
                }
            }
        }
        self.adopt_slots()
    }

    /// Takes every memory slot that no recorded sandbox holds as free, whatever a crash left
    /// in it; only while no start is under way.
    fn adopt_slots(&self) -> Result<(), BackendError> {
        let in_use = self
            .records()
            .values()
            .filter_map(|r| r.cgroups.slot.clone())
            .collect();
        self.inner.hierarchies.adopt_slots(&in_use)
    }

    /// Removes the spare memory cgroups kept for reuse under this state directory, by this
    /// process or an earlier one (the sandboxes' other cgroups go at each kill). For a caller
    /// done with the directory for good, such as a test, while no start is under way; a
    /// gateway keeps them across restarts, because a removed memory cgroup stays allocated
    /// in the kernel for as long as pages charged to it are cached.
    pub fn remove_spare_cgroups(&self) -> Result<(), BackendError> {
        self.adopt_slots()?;
        self.inner.hierarchies.remove_free_slots();
        Ok(())
    }

    fn forget(&self, id: &SandboxId) {
        self.records().remove(id);
        self.readings().remove(id);
        let cfg = &self.inner.config;
        let _ = fs::remove_file(cfg.records_dir().join(format!("{id}.json")));
        let _ = fs::remove_dir(cfg.roots_dir().join(id.as_str()));
    }

    fn persist(&self, id: &SandboxId, record: &Record) -> Result<(), BackendError> {
        let dir = self.inner.config.records_dir();
        let tmp = dir.join(format!(".{id}.tmp"));
        let path = dir.join(format!("{id}.json"));
        let bytes = serde_json::to_vec_pretty(record)
            .map_err(|e| BackendError::io("encode record for", &path, io::Error::other(e)))?;
        (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        })()
        .map_err(|e| BackendError::io("write record", &path, e))
    }

    fn record(&self, id: &SandboxId) -> Result<Record, BackendError> {
        self.records()
            .get(id)
            .cloned()
            .ok_or_else(|| BackendError::NotFound {
                kind: "sandbox",
                id: id.to_string(),
            })
    }

    fn info_of(&self, id: &SandboxId, r: &Record) -> Result<JailInfo, BackendError> {
        let state = if pid_start(r.pid) != Some(r.pid_start) || is_zombie(r.pid) {
            RunState::Exited
        } else if r.cgroups.is_frozen()? {
            RunState::Paused
        } else {
            RunState::Running
        };
        Ok(JailInfo {
            id: id.clone(),
            pid: r.pid,
            state,
            started_at: r.started_at,
            spec: r.spec.clone(),
        })
    }

    fn start_blocking(&self, spec: JailSpec) -> Result<JailInfo, BackendError> {
        spec.limits.validate()?;
        let id = spec.id.clone();
        let cfg = &self.inner.config;
        if self.records().contains_key(&id) || cfg.records_dir().join(format!("{id}.json")).exists()
        {
            return Err(BackendError::AlreadyExists {
                kind: "sandbox",
                id: id.to_string(),
            });
        }
        let root = cfg.roots_dir().join(id.as_str());
        fs::create_dir_all(&root).map_err(|e| BackendError::io("create directory", &root, e))?;
        let log_path = self.log_path(&id);
        let log: OwnedFd = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| BackendError::io("open log", &log_path, e))?
            .into();
        let plan = match spawn::Plan::new(&spec, &root, log, cfg.uid_base, cfg.uid_count) {
            Ok(plan) => plan,
            Err(e) => {
                let _ = fs::remove_dir(&root);
                return Err(e);
            }
        };
        let cgroups = match self.inner.hierarchies.create(id.as_str(), &spec.limits) {
            Ok(c) => c,
            Err(e) => {
                let _ = fs::remove_dir(&root);
                return Err(e);
            }
        };
        struct Join<'a>(&'a SandboxCgroups);
        impl spawn::Handshake for Join<'_> {
            fn join_cgroups(&mut self, pid: u32) -> Result<(), BackendError> {
                self.0.join(pid)?;
                // Before init runs. Best effort: see `protect_init`.
                protect_init(pid);
                Ok(())
            }
        }
        let started_at = SystemTime::now();
        let pid = match spawn::spawn(id.as_str(), &plan, &mut Join(&cgroups)) {
            Ok(pid) => pid,
            Err(e) => {
                let _ = self.inner.hierarchies.release(&cgroups);
                let _ = fs::remove_dir(&root);
                return Err(e);
            }
        };
        let record = Record {
            spec,
            pid,
            pid_start: pid_start(pid).unwrap_or(0),
            started_at,
            cgroups,
        };
        if let Err(e) = self.persist(&id, &record) {
            let _ = self.inner.hierarchies.release(&record.cgroups);
            reap(pid);
            let _ = fs::remove_dir(&root);
            return Err(e);
        }
        let info = JailInfo {
            id: id.clone(),
            pid,
            state: RunState::Running,
            started_at,
            spec: record.spec.clone(),
        };
        self.records().insert(id, record);
        Ok(info)
    }

    fn kill_blocking(&self, id: &SandboxId) -> Result<(), BackendError> {
        let record = self.record(id)?;
        self.inner.hierarchies.release(&record.cgroups)?;
        record.cgroups.remove_empty_parents();
        // Init is our child when this process started it; reap it so no zombie lingers.
        reap(record.pid);
        self.forget(id);
        Ok(())
    }
}

/// Runs blocking work off the async executor.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BackendError> + Send + 'static,
) -> Result<T, BackendError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BackendError::io("join blocking task", "", io::Error::other(e)))?
}

impl Isolation for LinuxJail {
    fn probe() -> Result<Capabilities, BackendError> {
        Ok(probe_host())
    }

    async fn start(&self, spec: JailSpec) -> Result<JailInfo, BackendError> {
        let this = self.clone();
        blocking(move || this.start_blocking(spec)).await
    }

    async fn pause(&self, id: &SandboxId) -> Result<(), BackendError> {
        let record = self.record(id)?;
        blocking(move || record.cgroups.freeze()).await
    }

    async fn resume(&self, id: &SandboxId) -> Result<(), BackendError> {
        let record = self.record(id)?;
        blocking(move || record.cgroups.thaw()).await
    }

    async fn kill(&self, id: &SandboxId) -> Result<(), BackendError> {
        let this = self.clone();
        let id = id.clone();
        blocking(move || this.kill_blocking(&id)).await
    }

    async fn list(&self) -> Result<Vec<JailInfo>, BackendError> {
        let records: Vec<(SandboxId, Record)> = self
            .records()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut out = Vec::with_capacity(records.len());
        for (id, r) in &records {
            out.push(self.info_of(id, r)?);
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn info(&self, id: &SandboxId) -> Result<JailInfo, BackendError> {
        let r = self.record(id)?;
        self.info_of(id, &r)
    }

    /// A full reading is half a dozen cgroup files; a sandbox whose CPU time has not moved
    /// since the last one costs one (see [`READING_REUSE`]), so sampling thousands of idle
    /// sandboxes stays cheap.
    async fn usage(&self, id: &SandboxId) -> Result<ResourceUsage, BackendError> {
        let cgroups = self
            .records()
            .get(id)
            .map(|r| r.cgroups.clone())
            .ok_or_else(|| BackendError::NotFound {
                kind: "sandbox",
                id: id.to_string(),
            })?;
        let Some(cpu) = cgroups.cpu_nanos_raw()? else {
            return cgroups.usage_with_cpu(0);
        };
        if let Some(r) = self.readings().get(id) {
            if r.cpu_nanos_raw == cpu && r.at.elapsed() < READING_REUSE {
                return Ok(r.usage);
            }
        }
        let usage = cgroups.usage_with_cpu(cpu)?;
        // Not for a sandbox killed meanwhile: `forget` has run, and nothing would remove it.
        // (Lock order: records, then readings.)
        let records = self.records();
        if records.contains_key(id) {
            self.readings().insert(
                id.clone(),
                Reading {
                    cpu_nanos_raw: cpu,
                    at: Instant::now(),
                    usage,
                },
            );
        }
        Ok(usage)
    }
}

/// The legacy `oom_adj` value that makes a sandbox's init the last process the OOM killer
/// picks in it: -16 of -17..15, an `oom_score_adj` of -941. Not -17 (never): an init alone
/// at its limit is still killable, so nothing in the sandbox can wedge its memory cgroup.
const INIT_OOM_ADJ: &str = "-16";

/// Lowers the OOM score of the sandbox init `pid`, so that it is the last thing the OOM
/// killer picks when the sandbox fills its memory limit (when the init dies, the whole
/// sandbox does); says whether it could.
///
/// Lowering a score needs `CAP_SYS_RESOURCE` in the host's user namespace; a host without it
/// (some container platforms drop it) leaves the init at this process's score, and the init
/// keeps its place behind its children only through theirs, which the agent raises to the
/// maximum. The legacy `oom_adj` file lowers the score without lowering the floor
/// (`oom_score_adj_min`) that the init's descendants inherit, as a privileged write to
/// `oom_score_adj` would, so nothing in the sandbox can lower its own score below 0, let
/// alone below the init's. The kernel logs once that `oom_adj` is deprecated.
fn protect_init(pid: u32) -> bool {
    fs::write(format!("/proc/{pid}/oom_adj"), INIT_OOM_ADJ).is_ok()
}

/// Reaps `pid` if it is our child (no-op otherwise).
fn reap(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: waitpid on a specific pid; for a pid that is not our child it returns ECHILD.
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
}

/// Field 22 of `/proc/<pid>/stat`: the process start time, in clock ticks since boot.
fn pid_start(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields resume after its last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
        .unwrap_or(true)
}

fn probe_host() -> Capabilities {
    let mut features = Vec::new();
    let mut add = |name: &str, available: bool, detail: String| {
        features.push(Capability {
            name: name.into(),
            available,
            detail,
        });
    };
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    add(
        "root",
        root,
        if root {
            "running as root".into()
        } else {
            "namespaces and mounts need root".into()
        },
    );
    for (name, ns) in [
        ("user-namespace", "user"),
        ("pid-namespace", "pid"),
        ("mount-namespace", "mnt"),
        ("network-namespace", "net"),
        ("uts-namespace", "uts"),
        ("ipc-namespace", "ipc"),
        ("cgroup-namespace", "cgroup"),
    ] {
        let path = format!("/proc/self/ns/{ns}");
        let ok = Path::new(&path).exists();
        add(name, ok, path);
    }
    let max_userns = fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    if let Some(n) = max_userns {
        if n == 0 {
            add(
                "user-namespace",
                false,
                "user.max_user_namespaces is 0".into(),
            );
        }
    }
    let filesystems = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    let has_fs = |fs: &str| {
        filesystems
            .lines()
            .any(|l| l.split_whitespace().last() == Some(fs))
    };
    add("overlayfs", has_fs("overlay"), "/proc/filesystems".into());
    add("devpts", has_fs("devpts"), "/proc/filesystems".into());
    let seccomp = fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Seccomp:")))
        .unwrap_or(false);
    add(
        "seccomp",
        seccomp,
        "Seccomp field in /proc/self/status".into(),
    );
    match Hierarchies::detect("coppice") {
        Ok(h) => {
            for (name, c) in [
                ("cgroup-memory", Controller::Memory),
                ("cgroup-pids", Controller::Pids),
                ("cgroup-cpu", Controller::Cpu),
            ] {
                add(name, h.has(c), String::new());
            }
            let freezer = h.has(Controller::Freezer) || h.has_v2();
            add(
                "cgroup-freezer",
                freezer,
                if h.has(Controller::Freezer) {
                    "v1 freezer"
                } else {
                    "v2 cgroup.freeze"
                }
                .into(),
            );
        }
        Err(e) => add("cgroups", false, e.to_string()),
    }
    Capabilities {
        driver: "linux-namespaces".into(),
        features,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where this process may lower scores, the init's score is lowered but its floor is
    /// not: what it starts can raise its own score and cannot lower it again. Checked on a
    /// plain child of this test (the same files, without a sandbox around them).
    #[test]
    fn the_init_is_protected_and_its_children_are_not() {
        let name = "the_init_is_protected_and_its_children_are_not";
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            #[allow(clippy::print_stdout)] // the skip line must reach the test output
            {
                println!("SKIP {name}: needs root");
            }
            return;
        }
        // A child that drops privilege (as sandbox processes have none in the host's user
        // namespace) and then tries to move its score both ways.
        let mut child = std::process::Command::new("/bin/sh")
            .args([
                "-c",
                "read go; cat /proc/self/oom_score_adj; \
                 setpriv --reuid=65534 --regid=65534 --clear-groups sh -c \
                 'cat /proc/self/oom_score_adj; echo 1000 > /proc/self/oom_score_adj; \
                  cat /proc/self/oom_score_adj; echo -941 > /proc/self/oom_score_adj \
                  || echo refused'",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let protected = protect_init(child.id());
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().collect();
        if !protected {
            // Only a host without CAP_SYS_RESOURCE may refuse, and nothing changed then.
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            let eff = status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                .unwrap();
            assert_eq!(eff & (1 << 24), 0, "refused with CAP_SYS_RESOURCE");
            #[allow(clippy::print_stdout)] // the skip line must reach the test output
            {
                println!("SKIP {name}: this host withholds CAP_SYS_RESOURCE");
            }
            assert_eq!(lines, ["0", "0", "1000", "refused"], "{text}");
            return;
        }
        assert_eq!(lines, ["-941", "-941", "1000", "refused"], "{text}");
    }

    #[test]
    fn pid_start_reads_our_own_process() {
        let me = std::process::id();
        let a = pid_start(me).unwrap();
        assert_eq!(pid_start(me), Some(a));
        assert!(!is_zombie(me));
        assert_eq!(pid_start(u32::MAX), None);
    }

    #[test]
    fn seccomp_table_names_the_escape_routes() {
        let names: Vec<_> = seccomp::denied_names().collect();
        for must in [
            "init_module",
            "kexec_load",
            "bpf",
            "keyctl",
            "mount",
            "setns",
        ] {
            assert!(names.contains(&must), "{must}");
        }
    }
}
