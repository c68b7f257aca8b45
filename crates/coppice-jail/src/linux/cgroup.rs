//! Sandbox cgroups on hybrid (v1 + v2) and pure v2 hosts.
//!
//! Every sandbox gets `<own>/<group>/<id>` in each hierarchy it uses, where `<own>` is the
//! cgroup of the process that created it (so sandboxes nest under the gateway, never at a
//! hierarchy root). Limits go to whichever hierarchy holds the controller; freezing uses the v1
//! freezer when one is mounted, else v2 `cgroup.freeze`; teardown uses v2 `cgroup.kill` when
//! available, else SIGKILL to every listed task.
//!
//! Memory cgroups are never removed while the host keeps fewer than [`MAX_SPARES`] spare
//! ones: a sandbox gets a numbered slot, `<own>/<group>/slot-<n>`, in the hierarchy that
//! holds the memory controller, and at teardown the slot is reset and kept for the next
//! sandbox. A removed memory cgroup lingers in the kernel, offline but allocated, for as
//! long as any page charged to it stays cached, and a sandbox charges pages it never frees:
//! the blocks of the host directories and inode tables its writes dirtied, its log file,
//! template files it read first. On this host 100 creates and kills left 100 such cgroups;
//! `drop_caches` freed every one of them (`docs/backends.md`). A reused slot keeps what
//! its earlier tenants left cached, charged to it and reclaimable under its limit; its
//! counters are read at each start and subtracted, so usage reads as the sandbox's own.
//!
//! Removing a memory cgroup is also the most expensive cgroup operation there is, and it
//! grows with the host: the kernel reclaims it against every filesystem's shrinker and, under
//! the global cgroup lock, moves its share of every filesystem's dentry and inode lists to
//! the parent, and each sandbox adds a few filesystems. With 10,000 sandboxes live, killing
//! them all removed a memory cgroup per kill past the spares and ran at about 30 a second,
//! every other cgroup operation queueing behind. So a kill never removes one: its slot always
//! joins the spares, and a background thread trims the spares back to [`MAX_SPARES`], oldest
//! first, one at a time and only once no start or kill has happened for [`TRIM_QUIET`]. The
//! spares past the bound are the memory cgroups of sandboxes killed a moment ago, so they
//! never raise the host's peak, and creates take them first.

use std::collections::{HashSet, VecDeque};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coppice_lifecycle::backend::{BackendError, Limits, ResourceUsage};
use serde::{Deserialize, Serialize};

/// The pids in `dir/cgroup.procs`; none when the cgroup is gone.
fn procs(dir: &Path) -> Result<Vec<u32>, BackendError> {
    match fs::read_to_string(dir.join("cgroup.procs")) {
        Ok(s) => Ok(s.lines().filter_map(|l| l.trim().parse().ok()).collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(BackendError::io("read cgroup file", dir, e)),
    }
}

/// How long pause, resume and teardown wait for the kernel before giving up.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Spare memory cgroups the driver keeps; past this many, the oldest are removed once the
/// host is quiet.
pub(crate) const MAX_SPARES: usize = 1024;

/// How long no sandbox must have started or been killed before spare memory cgroups past
/// [`MAX_SPARES`] are removed.
const TRIM_QUIET: Duration = Duration::from_millis(500);

/// The prefix of memory cgroup slots, which no sandbox id can start with.
const SLOT_PREFIX: &str = "slot-";

/// The cgroup hierarchies of this host that sandboxes use.
#[derive(Debug, Clone)]
pub(crate) struct Hierarchies {
    /// `(controller, directory of <own>/<group>)` for each v1 controller in use.
    v1: Vec<(Controller, PathBuf)>,
    /// The v2 directory of `<own>/<group>`, and the controllers it can enable.
    v2: Option<(PathBuf, Vec<Controller>)>,
    /// Memory cgroups kept for reuse.
    slots: Arc<Slots>,
}

/// Numbered memory cgroups in the directory of the hierarchy that holds memory; see the
/// module docs.
#[derive(Debug)]
struct Slots {
    /// Freed slots, most recent last (their pages are likeliest still cached).
    free: Mutex<VecDeque<PathBuf>>,
    /// The number the next new slot gets.
    next: AtomicU64,
    /// When a slot was last taken or given back, in nanoseconds since `epoch`.
    busy_at: AtomicU64,
    epoch: Instant,
    /// Whether a thread is trimming the spares.
    trimming: AtomicBool,
}

impl Default for Slots {
    fn default() -> Self {
        Self {
            free: Mutex::default(),
            next: AtomicU64::new(0),
            busy_at: AtomicU64::new(0),
            epoch: Instant::now(),
            trimming: AtomicBool::new(false),
        }
    }
}

impl Slots {
    fn mark_busy(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.busy_at.fetch_max(now, Ordering::Relaxed);
    }

    /// How long since a slot was last taken or given back.
    fn quiet_for(&self) -> Duration {
        let busy = Duration::from_nanos(self.busy_at.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(busy)
    }

    /// Starts the trimming thread unless one runs.
    fn trim_in_background(self: &Arc<Self>) {
        if self.trimming.swap(true, Ordering::AcqRel) {
            return;
        }
        let slots = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("coppice-cgroup-trim".into())
            .spawn(move || slots.trim());
        if spawned.is_err() {
            // Tried again at the next kill.
            self.trimming.store(false, Ordering::Release);
        }
    }

    /// Removes the oldest spares past [`MAX_SPARES`], one at a time, each once the host has
    /// been quiet for [`TRIM_QUIET`]; returns when none is left to remove.
    fn trim(&self) {
        loop {
            let quiet = self.quiet_for();
            if quiet < TRIM_QUIET {
                #[allow(
                    clippy::disallowed_methods,
                    reason = "a thread of its own, which runs no async task"
                )]
                std::thread::sleep(TRIM_QUIET - quiet);
                continue;
            }
            let oldest = {
                let mut free = lock(&self.free);
                if free.len() > MAX_SPARES {
                    free.pop_front()
                } else {
                    None
                }
            };
            match oldest {
                Some(slot) => remove_slot(&slot),
                None => {
                    self.trimming.store(false, Ordering::Release);
                    // A slot given back since the check above found the flag still set.
                    if lock(&self.free).len() <= MAX_SPARES
                        || self.trimming.swap(true, Ordering::AcqRel)
                    {
                        return;
                    }
                }
            }
        }
    }
}

/// Removes a spare memory cgroup. The kernel frees it at once only if no page is charged to
/// it any more, so what can be reclaimed is reclaimed first.
fn remove_slot(slot: &Path) {
    let _ = fs::write(slot.join("memory.force_empty"), "0");
    let _ = fs::write(slot.join("memory.reclaim"), "1G");
    let _ = fs::remove_dir(slot);
}

/// Counters that only grow while a cgroup lives, as a sandbox found them when it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Counters {
    cpu_nanos: u64,
    tasks_refused: u64,
    oom_kills: u64,
}

/// The controllers Coppice uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Controller {
    Memory,
    Pids,
    Cpu,
    Cpuacct,
    Freezer,
}

impl Controller {
    const ALL: [Controller; 5] = [
        Controller::Memory,
        Controller::Pids,
        Controller::Cpu,
        Controller::Cpuacct,
        Controller::Freezer,
    ];

    fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Cpu => "cpu",
            Controller::Cpuacct => "cpuacct",
            Controller::Freezer => "freezer",
        }
    }
}

/// The cgroups of one sandbox; recorded so that another process can find them again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SandboxCgroups {
    /// v1 directories by controller.
    pub(crate) v1: Vec<(Controller, PathBuf)>,
    /// The v2 directory, if the host has a unified hierarchy.
    pub(crate) v2: Option<PathBuf>,
    /// The memory cgroup when it is a reusable slot (one of the directories above), which
    /// teardown resets and keeps instead of removing. Records written before slots existed
    /// have none.
    #[serde(default)]
    pub(crate) slot: Option<PathBuf>,
    /// What the counters read before this sandbox's first task joined.
    #[serde(default)]
    pub(crate) baseline: Counters,
}

impl Hierarchies {
    /// Reads `/proc/self/mountinfo` and `/proc/self/cgroup`; `group` is the directory under
    /// this process's own cgroup that holds every sandbox.
    pub(crate) fn detect(group: &str) -> Result<Self, BackendError> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| BackendError::io("read", "/proc/self/mountinfo", e))?;
        let own = fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| BackendError::io("read", "/proc/self/cgroup", e))?;
        Ok(Self::parse(&mountinfo, &own, group))
    }

    fn parse(mountinfo: &str, own: &str, group: &str) -> Self {
        // /proc/self/cgroup lines are `id:controllers:path`; v2 is `0::path`.
        let own_path = |key: &str| -> Option<String> {
            own.lines().find_map(|line| {
                let mut parts = line.splitn(3, ':');
                let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
                let matches = if key.is_empty() {
                    ctrls.is_empty()
                } else {
                    ctrls.split(',').any(|c| c == key)
                };
                matches.then(|| path.to_owned())
            })
        };
        let mut v1 = Vec::new();
        let mut v2 = None;
        for line in mountinfo.lines() {
            // Fields: id parent major:minor root mountpoint opts ... - fstype source superopts
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let mut l = left.split(' ');
            let mount_root = l.nth(3).unwrap_or("/");
            let Some(mountpoint) = l.next() else { continue };
            let mut r = right.split(' ');
            let fstype = r.next().unwrap_or("");
            let superopts = r.nth(1).unwrap_or("");
            // Only mounts of a hierarchy's root let us reach our own cgroup by its path.
            if mount_root != "/" {
                continue;
            }
            let join = |own: &str| -> PathBuf {
                Path::new(mountpoint)
                    .join(own.trim_start_matches('/'))
                    .join(group)
            };
            if fstype == "cgroup2" {
                if let Some(own) = own_path("") {
                    let dir = join(&own);
                    let parent_controllers = dir
                        .parent()
                        .and_then(|p| fs::read_to_string(p.join("cgroup.controllers")).ok())
                        .unwrap_or_default();
                    let enabled = Controller::ALL
                        .into_iter()
                        .filter(|c| {
                            let name = match c {
                                // v2 folds cpuacct into cpu; its freezer is a core file.
                                Controller::Cpuacct => "cpu",
                                other => other.name(),
                            };
                            *c != Controller::Freezer
                                && parent_controllers.split_whitespace().any(|n| n == name)
                        })
                        .collect();
                    v2 = Some((dir, enabled));
                }
            } else if fstype == "cgroup" {
                for c in Controller::ALL {
                    if superopts.split(',').any(|o| o == c.name()) {
                        if let Some(own) = own_path(c.name()) {
                            if !v1.iter().any(|(have, _)| *have == c) {
                                v1.push((c, join(&own)));
                            }
                        }
                    }
                }
            }
        }
        Self {
            v1,
            v2,
            slots: Arc::default(),
        }
    }

    /// The `<own>/<group>` directory of the hierarchy that holds the memory controller,
    /// where the slots live.
    fn memory_group(&self) -> Option<&Path> {
        self.v1
            .iter()
            .find(|(c, _)| *c == Controller::Memory)
            .map(|(_, d)| d.as_path())
            .or_else(|| {
                self.v2
                    .as_ref()
                    .filter(|(_, cs)| cs.contains(&Controller::Memory))
                    .map(|(d, _)| d.as_path())
            })
    }

    /// A free slot, or a new one; `None` when no hierarchy holds memory.
    fn take_slot(&self) -> Result<Option<PathBuf>, BackendError> {
        let Some(group) = self.memory_group() else {
            return Ok(None);
        };
        self.slots.mark_busy();
        if let Some(slot) = lock(&self.slots.free).pop_back() {
            return Ok(Some(slot));
        }
        fs::create_dir_all(group).map_err(|e| BackendError::io("create cgroup", group, e))?;
        loop {
            let n = self.slots.next.fetch_add(1, Ordering::Relaxed);
            let slot = group.join(format!("{SLOT_PREFIX}{n}"));
            match fs::create_dir(&slot) {
                Ok(()) => return Ok(Some(slot)),
                // Left by an earlier process and not yet adopted: take the next number.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(BackendError::io("create cgroup", &slot, e)),
            }
        }
    }

    /// Resets an empty slot and keeps it for the next sandbox (removing it only if it
    /// cannot be reset); past [`MAX_SPARES`] the oldest go in the background once the host
    /// is quiet (see the module docs).
    fn put_slot(&self, slot: &Path) {
        self.slots.mark_busy();
        if reset_slot(slot).is_err() {
            remove_slot(slot);
            return;
        }
        let spares = {
            let mut free = lock(&self.slots.free);
            free.push_back(slot.to_path_buf());
            free.len()
        };
        if spares > MAX_SPARES {
            self.slots.trim_in_background();
        }
    }

    /// Takes the slots in the memory group that no live sandbox of `in_use` holds: emptied
    /// of any task a start cut short left there, reset and kept. Numbers new slots past
    /// the highest found.
    pub(crate) fn adopt_slots(&self, in_use: &HashSet<PathBuf>) -> Result<(), BackendError> {
        let Some(group) = self.memory_group() else {
            return Ok(());
        };
        let Ok(entries) = fs::read_dir(group) else {
            return Ok(());
        };
        let held: HashSet<PathBuf> = lock(&self.slots.free).iter().cloned().collect();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(n) = name
                .strip_prefix(SLOT_PREFIX)
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            self.slots.next.fetch_max(n + 1, Ordering::Relaxed);
            let slot = entry.path();
            if in_use.contains(&slot) || held.contains(&slot) {
                continue;
            }
            kill_tasks_in(std::slice::from_ref(&slot), None, None)?;
            self.put_slot(&slot);
        }
        Ok(())
    }

    /// Removes every free slot (and the group directories, once empty): for a caller that
    /// is done with this driver for good, such as a test cleaning up. The kernel frees a
    /// removed memory cgroup only once the pages charged to it leave the page cache.
    pub(crate) fn remove_free_slots(&self) {
        let free = std::mem::take(&mut *lock(&self.slots.free));
        // Reclaimed first, as the trimmer does: a slot removed with pages still charged to
        // it stays allocated in the kernel (about 1 MiB each) until those pages go.
        for slot in &free {
            remove_slot(slot);
        }
        for dir in self.group_dirs() {
            let _ = fs::remove_dir(dir);
        }
    }

    /// Which hierarchy holds `c`, if any.
    pub(crate) fn has(&self, c: Controller) -> bool {
        self.v1.iter().any(|(have, _)| *have == c)
            || self.v2.as_ref().is_some_and(|(_, cs)| cs.contains(&c))
    }

    /// Whether v2 core files (`cgroup.freeze`, `cgroup.kill`) are usable.
    pub(crate) fn has_v2(&self) -> bool {
        self.v2.is_some()
    }

    /// The `<own>/<group>` directories, for finding orphaned sandboxes.
    pub(crate) fn group_dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = self.v1.iter().map(|(_, d)| d.clone()).collect();
        dirs.extend(self.v2.iter().map(|(d, _)| d.clone()));
        dirs
    }

    /// The cgroups a sandbox called `name` has (or would have) without a memory slot.
    pub(crate) fn sandbox(&self, name: &str) -> SandboxCgroups {
        SandboxCgroups {
            v1: self
                .v1
                .iter()
                .map(|(c, dir)| (*c, dir.join(name)))
                .collect(),
            v2: self.v2.as_ref().map(|(dir, _)| dir.join(name)),
            slot: None,
            baseline: Counters::default(),
        }
    }

    /// Creates the sandbox's cgroups, its memory cgroup a slot, and applies `limits`; on
    /// failure gives back what it took.
    pub(crate) fn create(
        &self,
        name: &str,
        limits: &Limits,
    ) -> Result<SandboxCgroups, BackendError> {
        let mut cgroups = self.sandbox(name);
        let slot = self.take_slot()?;
        if let Some(slot) = &slot {
            if self.v1.iter().any(|(c, _)| *c == Controller::Memory) {
                for (c, dir) in &mut cgroups.v1 {
                    if *c == Controller::Memory {
                        dir.clone_from(slot);
                    }
                }
            } else {
                cgroups.v2 = Some(slot.clone());
            }
        }
        cgroups.slot = slot;
        let result = (|| {
            for (c, dir) in &cgroups.v1 {
                if *c != Controller::Memory || cgroups.slot.is_none() {
                    create_dir(dir)?;
                }
            }
            if let Some((group_dir, controllers)) = &self.v2 {
                ensure_group_dir(group_dir, controllers)?;
                match &cgroups.v2 {
                    Some(dir) if cgroups.slot.as_ref() != Some(dir) => create_dir(dir)?,
                    _ => {}
                }
            }
            cgroups.apply(self, limits)?;
            cgroups.baseline = cgroups.counters()?;
            Ok(())
        })();
        if result.is_err() {
            cgroups.remove_dirs();
            if let Some(slot) = &cgroups.slot {
                self.put_slot(slot);
            }
            cgroups.remove_empty_parents();
        }
        result.map(|()| cgroups)
    }

    /// Kills every task of the sandbox, removes its cgroups and keeps its memory slot for
    /// the next one.
    pub(crate) fn release(&self, cgroups: &SandboxCgroups) -> Result<(), BackendError> {
        cgroups.kill_all_and_remove()?;
        if let Some(slot) = &cgroups.slot {
            self.put_slot(slot);
        }
        Ok(())
    }
}

/// Puts a slot's settings back to a new cgroup's: no limits, not frozen, peak and failure
/// counts cleared (the cumulative counters cannot be reset; starts read them instead).
fn reset_slot(slot: &Path) -> Result<(), BackendError> {
    if slot.join("memory.limit_in_bytes").exists() {
        // The combined limit may never drop below the memory limit: raise it first.
        let memsw = slot.join("memory.memsw.limit_in_bytes");
        if memsw.exists() {
            write(&memsw, "-1")?;
        }
        write(&slot.join("memory.limit_in_bytes"), "-1")?;
        let _ = write(&slot.join("memory.max_usage_in_bytes"), "0");
        let _ = write(&slot.join("memory.failcnt"), "0");
    } else {
        // A v2 slot is the sandbox's whole cgroup.
        for (file, value) in [
            ("memory.max", "max"),
            ("memory.swap.max", "max"),
            ("pids.max", "max"),
            ("cpu.max", "max"),
            ("cgroup.freeze", "0"),
        ] {
            let path = slot.join(file);
            if path.exists() {
                write(&path, value)?;
            }
        }
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is a single push, pop or take: a poisoned lock holds a
    // consistent list.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Creates `dir`, failing if it exists (a sandbox's cgroup is never shared).
fn create_dir(dir: &Path) -> Result<(), BackendError> {
    // A concurrent kill may remove the emptied group directory between the two calls, so
    // retry once when the parent vanished.
    for _ in 0..2 {
        if let Some(parent) = dir.parent() {
            fs::create_dir_all(parent).map_err(|e| BackendError::io("create cgroup", parent, e))?;
        }
        match fs::create_dir(dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            other => return other.map_err(|e| BackendError::io("create cgroup", dir, e)),
        }
    }
    fs::create_dir(dir).map_err(|e| BackendError::io("create cgroup", dir, e))
}

/// Creates the v2 group directory and delegates the controllers to it.
fn ensure_group_dir(dir: &Path, controllers: &[Controller]) -> Result<(), BackendError> {
    if !dir.exists() {
        fs::create_dir_all(dir).map_err(|e| BackendError::io("create cgroup", dir, e))?;
    }
    if controllers.is_empty() {
        return Ok(());
    }
    let wanted = controllers
        .iter()
        .filter(|c| **c != Controller::Cpuacct)
        .map(|c| format!("+{}", c.name()))
        .collect::<Vec<_>>()
        .join(" ");
    // The parent (our own cgroup) must delegate first; on pure v2 that fails while this
    // process sits in it, which `probe()` reports.
    if let Some(parent) = dir.parent() {
        write(&parent.join("cgroup.subtree_control"), &wanted)?;
    }
    write(&dir.join("cgroup.subtree_control"), &wanted)
}

fn write(path: &Path, value: &str) -> Result<(), BackendError> {
    fs::write(path, value).map_err(|e| BackendError::io("write cgroup file", path, e))
}

fn read(path: &Path) -> Result<String, BackendError> {
    fs::read_to_string(path).map_err(|e| BackendError::io("read cgroup file", path, e))
}

impl SandboxCgroups {
    fn dir(&self, c: Controller) -> Option<&Path> {
        self.v1
            .iter()
            .find(|(have, _)| *have == c)
            .map(|(_, d)| d.as_path())
    }

    fn apply(&self, hier: &Hierarchies, limits: &Limits) -> Result<(), BackendError> {
        let v2_has = |c| {
            hier.v2
                .as_ref()
                .is_some_and(|(_, cs): &(PathBuf, Vec<Controller>)| cs.contains(&c))
        };
        if let Some(bytes) = limits.memory_bytes {
            if let Some(dir) = self.dir(Controller::Memory) {
                write(&dir.join("memory.limit_in_bytes"), &bytes.to_string())?;
                // With swap accounting the combined limit must also hold, or a hog swaps.
                let memsw = dir.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write(&memsw, &bytes.to_string())?;
                }
            } else if let (Some(dir), true) = (&self.v2, v2_has(Controller::Memory)) {
                write(&dir.join("memory.max"), &bytes.to_string())?;
                write(&dir.join("memory.swap.max"), "0").ok();
            } else {
                return Err(missing("memory"));
            }
        }
        if let Some(pids) = limits.pids {
            if let Some(dir) = self.dir(Controller::Pids) {
                write(&dir.join("pids.max"), &pids.to_string())?;
            } else if let (Some(dir), true) = (&self.v2, v2_has(Controller::Pids)) {
                write(&dir.join("pids.max"), &pids.to_string())?;
            } else {
                return Err(missing("pids"));
            }
        }
        if let Some(millis) = limits.cpu_millis {
            const PERIOD_US: u64 = 100_000;
            let quota = u64::from(millis) * PERIOD_US / 1000;
            if let Some(dir) = self.dir(Controller::Cpu) {
                write(&dir.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
                write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
            } else if let (Some(dir), true) = (&self.v2, v2_has(Controller::Cpu)) {
                write(&dir.join("cpu.max"), &format!("{quota} {PERIOD_US}"))?;
            } else {
                return Err(missing("cpu"));
            }
        }
        Ok(())
    }

    /// Moves `pid` into every cgroup of the sandbox.
    pub(crate) fn join(&self, pid: u32) -> Result<(), BackendError> {
        let pid = pid.to_string();
        for (_, dir) in &self.v1 {
            write(&dir.join("cgroup.procs"), &pid)?;
        }
        if let Some(dir) = &self.v2 {
            write(&dir.join("cgroup.procs"), &pid)?;
        }
        Ok(())
    }

    /// Whether the sandbox is frozen (or freezing) right now.
    pub(crate) fn is_frozen(&self) -> Result<bool, BackendError> {
        if let Some(dir) = self.dir(Controller::Freezer) {
            let state = read(&dir.join("freezer.state"))?;
            Ok(state.trim() != "THAWED")
        } else if let Some(dir) = &self.v2 {
            Ok(read(&dir.join("cgroup.freeze"))?.trim() == "1")
        } else {
            Err(missing("freezer"))
        }
    }

    /// Freezes every task and waits until the kernel reports them frozen. Idempotent.
    pub(crate) fn freeze(&self) -> Result<(), BackendError> {
        if let Some(dir) = self.dir(Controller::Freezer) {
            let state = dir.join("freezer.state");
            write(&state, "FROZEN")?;
            settle(|| Ok(read(&state)?.trim() == "FROZEN"), "freeze", dir)
        } else if let Some(dir) = &self.v2 {
            write(&dir.join("cgroup.freeze"), "1")?;
            let events = dir.join("cgroup.events");
            settle(
                || Ok(read(&events)?.lines().any(|l| l == "frozen 1")),
                "freeze",
                dir,
            )
        } else {
            Err(missing("freezer"))
        }
    }

    /// Thaws every task. Idempotent.
    pub(crate) fn thaw(&self) -> Result<(), BackendError> {
        if let Some(dir) = self.dir(Controller::Freezer) {
            let state = dir.join("freezer.state");
            write(&state, "THAWED")?;
            settle(|| Ok(read(&state)?.trim() == "THAWED"), "thaw", dir)
        } else if let Some(dir) = &self.v2 {
            write(&dir.join("cgroup.freeze"), "0")?;
            let events = dir.join("cgroup.events");
            settle(
                || Ok(read(&events)?.lines().any(|l| l == "frozen 0")),
                "thaw",
                dir,
            )
        } else {
            Err(missing("freezer"))
        }
    }

    /// Host pids of every task in the sandbox.
    pub(crate) fn pids(&self) -> Result<Vec<u32>, BackendError> {
        // Every hierarchy lists the same tasks once a start has finished; prefer one.
        let dir = self
            .v2
            .as_deref()
            .or_else(|| self.v1.first().map(|(_, d)| d.as_path()));
        dir.map_or(Ok(Vec::new()), procs)
    }

    /// Kills every task, waits until none is left, and removes the cgroups but the memory
    /// slot (see [`Hierarchies::release`]).
    pub(crate) fn kill_all_and_remove(&self) -> Result<(), BackendError> {
        let v2_kill = self
            .v2
            .as_ref()
            .map(|d| d.join("cgroup.kill"))
            .filter(|f| f.exists());
        let freezer = self
            .dir(Controller::Freezer)
            .map(|d| d.join("freezer.state"));
        let dirs = self.all_dirs();
        kill_tasks_in(&dirs, v2_kill.as_deref(), freezer.as_deref())?;
        self.remove_dirs_checked()
    }
    /// Removes the (empty) cgroup directories but the slot, retrying while the kernel
    /// finishes exits.
    fn remove_dirs_checked(&self) -> Result<(), BackendError> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        for dir in self.owned_dirs() {
            let mut backoff = Backoff::patient();
            loop {
                match fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                    {
                        backoff.wait();
                    }
                    Err(e) => return Err(BackendError::io("remove cgroup", dir, e)),
                }
            }
        }
        Ok(())
    }

    /// Best-effort removal after a failed create (the slot is given back by the caller).
    pub(crate) fn remove_dirs(&self) {
        for dir in self.owned_dirs() {
            let _ = fs::remove_dir(dir);
        }
    }

    /// Every cgroup directory of the sandbox, its memory slot included.
    fn all_dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = self.v1.iter().map(|(_, d)| d.clone()).collect();
        dirs.extend(self.v2.iter().cloned());
        dirs
    }

    /// The directories that are the sandbox's alone: all but its memory slot.
    fn owned_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = self.all_dirs();
        dirs.retain(|d| self.slot.as_ref() != Some(d));
        dirs
    }

    /// The counters as they read now (for the baseline of a new sandbox).
    fn counters(&self) -> Result<Counters, BackendError> {
        let raw = SandboxCgroups {
            baseline: Counters::default(),
            ..self.clone()
        }
        .usage()?;
        Ok(Counters {
            cpu_nanos: raw.cpu_nanos,
            tasks_refused: raw.tasks_refused,
            oom_kills: raw.oom_kills,
        })
    }

    /// Removes the group directories above the sandbox's cgroups if they are now empty, so
    /// a driver with no sandboxes leaves no cgroup behind (but its spare slots).
    pub(crate) fn remove_empty_parents(&self) {
        for dir in self.owned_dirs() {
            if let Some(parent) = dir.parent() {
                // Fails with EBUSY/ENOTEMPTY while other sandboxes live there; that is fine.
                let _ = fs::remove_dir(parent);
            }
        }
    }

    /// The CPU time every task of the cgroup (its earlier tenants' included) has used, in
    /// nanoseconds: one small file, the cheapest sign that anything ran since the last
    /// reading. `None` when the host accounts CPU in neither hierarchy.
    pub(crate) fn cpu_nanos_raw(&self) -> Result<Option<u64>, BackendError> {
        if let Some(dir) = self.dir(Controller::Cpuacct) {
            Ok(Some(
                read(&dir.join("cpuacct.usage"))?
                    .trim()
                    .parse()
                    .unwrap_or(0),
            ))
        } else if let Some(dir) = &self.v2 {
            let stat = read(&dir.join("cpu.stat"))?;
            let usec: u64 = stat
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            Ok(Some(usec.saturating_mul(1000)))
        } else {
            Ok(None)
        }
    }

    /// CPU, memory and task counts.
    pub(crate) fn usage(&self) -> Result<ResourceUsage, BackendError> {
        let cpu = self.cpu_nanos_raw()?;
        self.usage_with_cpu(cpu.unwrap_or(0))
    }

    /// [`Self::usage`] with the CPU time already read by [`Self::cpu_nanos_raw`].
    pub(crate) fn usage_with_cpu(&self, cpu_nanos_raw: u64) -> Result<ResourceUsage, BackendError> {
        let mut usage = ResourceUsage {
            cpu_nanos: cpu_nanos_raw,
            ..ResourceUsage::default()
        };
        // The page cache inside that charge: v1 `total_cache` (this group and any below it)
        // or `cache`, v2 `file`, from memory.stat.
        if let Some(dir) = self.dir(Controller::Memory) {
            usage.memory_bytes = read(&dir.join("memory.usage_in_bytes"))?
                .trim()
                .parse()
                .unwrap_or(0);
            let stat = fs::read_to_string(dir.join("memory.stat")).unwrap_or_default();
            usage.memory_cache_bytes = parse_counter(&stat, "total_cache")
                .or_else(|| parse_counter(&stat, "cache"))
                .unwrap_or(0);
        } else if let Some(dir) = &self.v2 {
            if let Ok(s) = fs::read_to_string(dir.join("memory.current")) {
                usage.memory_bytes = s.trim().parse().unwrap_or(0);
            }
            usage.memory_cache_bytes = counter(&dir.join("memory.stat"), "file");
        }
        if let Some(dir) = self.dir(Controller::Pids) {
            usage.tasks = read(&dir.join("pids.current"))?.trim().parse().unwrap_or(0);
        } else {
            usage.tasks = u32::try_from(self.pids()?.len()).unwrap_or(u32::MAX);
        }
        // Enforcement counters: `max` in pids.events counts forks refused at pids.max (v1
        // and v2); `oom_kill` counts the memory limit's kills (v2 memory.events, v1
        // memory.oom_control). A missing file (older kernels) counts as none.
        let pids_dir = self.dir(Controller::Pids).or(self.v2.as_deref());
        if let Some(dir) = pids_dir {
            usage.tasks_refused = counter(&dir.join("pids.events"), "max");
        }
        if let Some(dir) = self.dir(Controller::Memory) {
            usage.oom_kills = counter(&dir.join("memory.oom_control"), "oom_kill");
        } else if let Some(dir) = &self.v2 {
            usage.oom_kills = counter(&dir.join("memory.events"), "oom_kill");
        }
        // A reused slot counted for its earlier tenants too.
        let b = self.baseline;
        usage.cpu_nanos = usage.cpu_nanos.saturating_sub(b.cpu_nanos);
        usage.tasks_refused = usage.tasks_refused.saturating_sub(b.tasks_refused);
        usage.oom_kills = usage.oom_kills.saturating_sub(b.oom_kills);
        Ok(usage)
    }
}

/// SIGKILLs every task in `dirs` until none is left: through `v2_kill` (a `cgroup.kill`
/// file) when there is one, thawing the v1 `freezer` state file when there is one (frozen
/// tasks only die once thawed).
fn kill_tasks_in(
    dirs: &[PathBuf],
    v2_kill: Option<&Path>,
    freezer: Option<&Path>,
) -> Result<(), BackendError> {
    let tasks = || -> Result<Vec<u32>, BackendError> {
        let mut all = Vec::new();
        for dir in dirs {
            all.extend(procs(dir)?);
        }
        all.sort_unstable();
        all.dedup();
        Ok(all)
    };
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut backoff = Backoff::patient();
    loop {
        if let Some(kill) = v2_kill {
            write(kill, "1")?;
        }
        // Without cgroup.kill every task, and with it those a cut-short start left outside
        // the v2 cgroup.
        for pid in tasks()? {
            let pid = libc::pid_t::try_from(pid).unwrap_or(libc::pid_t::MAX);
            // SAFETY: kill(2) with a pid read from the sandbox's cgroups; a stale pid only
            // yields ESRCH.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if let Some(state) = freezer.filter(|f| f.exists()) {
            write(state, "THAWED")?;
        }
        if tasks()?.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BackendError::io(
                "kill every task in",
                dirs.first().cloned().unwrap_or_default(),
                io::Error::from(io::ErrorKind::TimedOut),
            ));
        }
        backoff.wait();
    }
}

/// The value of the `key N` line of a flat-keyed cgroup file, 0 if absent.
fn counter(path: &Path, key: &str) -> u64 {
    fs::read_to_string(path)
        .ok()
        .and_then(|text| parse_counter(&text, key))
        .unwrap_or(0)
}

fn parse_counter(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Polls `done` until it holds, for at most [`SETTLE_TIMEOUT`].
fn settle(
    mut done: impl FnMut() -> Result<bool, BackendError>,
    op: &'static str,
    dir: &Path,
) -> Result<(), BackendError> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut backoff = Backoff::default();
    while !done()? {
        if Instant::now() > deadline {
            return Err(BackendError::io(
                op,
                dir,
                io::Error::from(io::ErrorKind::TimedOut),
            ));
        }
        backoff.wait();
    }
    Ok(())
}

/// Waiting for the kernel without burning a core: the first few polls only yield (a freeze
/// of an idle sandbox settles within them), later ones sleep, doubling from 50 µs to 2 ms.
/// These waits run on blocking threads, never on async workers.
#[derive(Debug)]
struct Backoff {
    polls: u32,
    spins: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            polls: 0,
            spins: Self::SPINS,
        }
    }
}

impl Backoff {
    const SPINS: u32 = 16;

    /// For waits that take milliseconds whatever we do (tasks dying, cgroups emptying at
    /// kill): sleeps from the first poll. Spinning there only takes the CPU the exits need:
    /// with 32 kills at once on 10,000 live sandboxes, re-reading `cgroup.procs` was the
    /// largest cost of the whole teardown.
    fn patient() -> Self {
        Self { polls: 0, spins: 0 }
    }

    fn wait(&mut self) {
        self.polls += 1;
        if self.polls <= self.spins {
            std::thread::yield_now();
        } else {
            let exp = (self.polls - self.spins).min(6);
            #[allow(
                clippy::disallowed_methods,
                reason = "cgroup waits run on blocking threads, where sleeping blocks no task"
            )]
            std::thread::sleep(Duration::from_micros(50 << exp).min(Duration::from_millis(2)));
        }
    }
}

fn missing(controller: &'static str) -> BackendError {
    BackendError::InvalidSpec {
        field: "limits",
        reason: format!("this host has no usable {controller} cgroup controller"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_MOUNTINFO: &str = "\
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const HYBRID_OWN: &str = "\
8:pids:/
6:freezer:/
4:memory:/process_api/abc
2:cpuacct:/
1:cpu:/
0::/
";

    /// A start cut short between joining one hierarchy and the next leaves its task in
    /// only the first: teardown must still find and kill it, or the cgroups stay busy.
    #[test]
    #[allow(clippy::print_stdout)] // the skip line must reach the test output
    fn teardown_kills_a_task_that_joined_only_one_hierarchy() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            println!("SKIP teardown_kills_a_task_that_joined_only_one_hierarchy: needs root");
            return;
        }
        let group = format!("coppice-unit-{}", std::process::id());
        let Ok(h) = Hierarchies::detect(&group) else {
            println!("SKIP teardown_kills_a_task_that_joined_only_one_hierarchy: no cgroups");
            return;
        };
        let cgroups = match h.create("halfjoined", &Limits::default()) {
            Ok(c) => c,
            Err(e) => {
                println!("SKIP teardown_kills_a_task_that_joined_only_one_hierarchy: {e}");
                return;
            }
        };
        let Some(last) = cgroups.all_dirs().into_iter().last() else {
            println!("SKIP teardown_kills_a_task_that_joined_only_one_hierarchy: no hierarchy");
            return;
        };
        #[allow(clippy::disallowed_methods)]
        let mut child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        // Joined the hierarchy listed last only (v2 on hybrid hosts, where pids() looks).
        let first = cgroups.all_dirs().into_iter().next().unwrap();
        let joined = if cgroups.all_dirs().len() > 1 {
            first
        } else {
            last
        };
        let result = write(&joined.join("cgroup.procs"), &child.id().to_string())
            .and_then(|()| h.release(&cgroups));
        let status = child.try_wait();
        if result.is_err() || !matches!(status, Ok(Some(_))) {
            let _ = child.kill();
            let _ = child.wait();
            let _ = cgroups.remove_dirs_checked();
        }
        cgroups.remove_empty_parents();
        h.remove_free_slots();
        result.unwrap();
        let _ = child.wait();
        assert!(cgroups.all_dirs().iter().all(|d| !d.exists()));
    }

    /// Spares past the bound are kept while slots come and go, and the oldest are removed
    /// once the host is quiet, down to the bound.
    #[test]
    #[allow(clippy::print_stdout)] // the skip line must reach the test output
    #[allow(clippy::disallowed_methods)] // a plain test thread polls the trimmer
    fn spares_past_the_bound_are_trimmed_once_quiet() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            println!("SKIP spares_past_the_bound_are_trimmed_once_quiet: needs root");
            return;
        }
        let group = format!("coppice-unit-trim-{}", std::process::id());
        let h = match Hierarchies::detect(&group) {
            Ok(h) if h.memory_group().is_some() => h,
            _ => {
                println!("SKIP spares_past_the_bound_are_trimmed_once_quiet: no memory cgroup");
                return;
            }
        };
        let taken: Vec<PathBuf> = (0..MAX_SPARES + 3)
            .map(|_| h.take_slot().unwrap().unwrap())
            .collect();
        let start = Instant::now();
        for slot in &taken {
            h.put_slot(slot);
        }
        let spares = || lock(&h.slots.free).len();
        // Given back just now: nothing is removed yet.
        let kept_while_busy = spares();
        let deadline = Instant::now() + Duration::from_secs(30);
        // The list shrinks just before each removal.
        let removed = || taken.iter().filter(|s| !s.exists()).count();
        while (spares() > MAX_SPARES || removed() < 3) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let trimmed_after = start.elapsed();
        let left = spares();
        let gone: Vec<&PathBuf> = taken.iter().filter(|s| !s.exists()).collect();
        let oldest_gone = gone.iter().all(|s| taken[..3].contains(s));
        h.remove_free_slots();
        assert_eq!(kept_while_busy, MAX_SPARES + 3);
        assert_eq!(left, MAX_SPARES, "spares were not trimmed");
        assert!(
            trimmed_after >= TRIM_QUIET,
            "trimmed before the host was quiet"
        );
        assert_eq!(gone.len(), 3, "{gone:?}");
        assert!(oldest_gone, "the newest spares went: {gone:?}");
        assert!(taken.iter().all(|s| !s.exists()));
    }

    /// A killed sandbox's memory cgroup is kept, reset, and given to the next sandbox, whose
    /// counters start from zero; nothing is left once the spares are removed.
    #[test]
    #[allow(clippy::print_stdout)] // the skip line must reach the test output
    fn memory_cgroups_are_reused_with_their_settings_reset() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            println!("SKIP memory_cgroups_are_reused_with_their_settings_reset: needs root");
            return;
        }
        let group = format!("coppice-unit-slots-{}", std::process::id());
        let h = match Hierarchies::detect(&group) {
            Ok(h) if h.memory_group().is_some() => h,
            _ => {
                println!(
                    "SKIP memory_cgroups_are_reused_with_their_settings_reset: no memory cgroup"
                );
                return;
            }
        };
        let limited = Limits {
            memory_bytes: Some(64 << 20),
            pids: None,
            cpu_millis: None,
        };
        let first = h.create("first", &limited).unwrap();
        let slot = first.slot.clone().unwrap();
        let limit_file = if slot.join("memory.limit_in_bytes").exists() {
            "memory.limit_in_bytes"
        } else {
            "memory.max"
        };
        assert_eq!(
            read(&slot.join(limit_file)).unwrap().trim(),
            (64u64 << 20).to_string()
        );
        h.release(&first).unwrap();
        assert!(slot.exists(), "the slot is kept");
        assert!(first.owned_dirs().iter().all(|d| !d.exists()));

        let second = h.create("second", &Limits::default()).unwrap();
        let same = second.slot.as_ref() == Some(&slot);
        let unlimited = read(&slot.join(limit_file)).unwrap();
        let usage = second.usage();
        h.release(&second).unwrap();
        h.remove_free_slots();
        assert!(same, "{:?} is not {slot:?}", second.slot);
        assert!(
            unlimited.trim() == "max" || unlimited.trim().parse::<u64>().unwrap() > 1 << 40,
            "the limit was not reset: {unlimited}"
        );
        assert_eq!(usage.unwrap().oom_kills, 0);
        assert!(!slot.exists(), "spares removed");
        assert!(h.group_dirs().iter().all(|d| !d.exists()));
    }

    #[test]
    fn hybrid_hosts_nest_under_each_own_cgroup() {
        let h = Hierarchies::parse(HYBRID_MOUNTINFO, HYBRID_OWN, "coppice");
        let sb = h.sandbox("abc1");
        let mem = sb.dir(Controller::Memory).unwrap();
        assert_eq!(
            mem,
            Path::new("/sys/fs/cgroup/memory/process_api/abc/coppice/abc1")
        );
        assert_eq!(
            sb.dir(Controller::Pids).unwrap(),
            Path::new("/sys/fs/cgroup/pids/coppice/abc1")
        );
        assert_eq!(
            sb.v2.as_deref(),
            Some(Path::new("/sys/fs/cgroup/unified/coppice/abc1"))
        );
        for c in Controller::ALL {
            assert!(h.has(c), "{c:?}");
        }
    }

    #[test]
    fn enforcement_counters_parse() {
        let v1_oom = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(parse_counter(v1_oom, "oom_kill"), Some(3));
        let v2_mem = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(parse_counter(v2_mem, "oom_kill"), Some(2));
        assert_eq!(parse_counter("max 17\n", "max"), Some(17));
        assert_eq!(parse_counter("", "max"), None);
    }

    #[test]
    fn pure_v2_hosts_use_the_unified_tree() {
        let mountinfo = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let own = "0::/system.slice/coppice.service\n";
        let h = Hierarchies::parse(mountinfo, own, "sandboxes");
        assert!(h.v1.is_empty());
        assert_eq!(
            h.sandbox("x").v2.as_deref(),
            Some(Path::new(
                "/sys/fs/cgroup/system.slice/coppice.service/sandboxes/x"
            ))
        );
    }

    #[test]
    fn bind_mounted_subtrees_are_ignored() {
        // A container's view of a hierarchy whose root is not "/" cannot be addressed by
        // the paths in /proc/self/cgroup.
        let mountinfo = "35 31 0:32 /docker/1 /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        let h = Hierarchies::parse(mountinfo, "4:memory:/docker/1\n", "c");
        assert!(!h.has(Controller::Memory));
    }
}
