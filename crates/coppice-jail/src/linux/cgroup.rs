//! Sandbox cgroups on hybrid (v1 + v2) and pure v2 hosts.
//!
//! Every sandbox gets `<own>/<group>/<id>` in each hierarchy it uses, where `<own>` is the
//! cgroup of the process that created it (so sandboxes nest under the gateway, never at a
//! hierarchy root). Limits go to whichever hierarchy holds the controller; freezing uses the v1
//! freezer when one is mounted, else v2 `cgroup.freeze`; teardown uses v2 `cgroup.kill` when
//! available, else SIGKILL to every listed task.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
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

/// The cgroup hierarchies of this host that sandboxes use.
#[derive(Debug, Clone)]
pub(crate) struct Hierarchies {
    /// `(controller, directory of <own>/<group>)` for each v1 controller in use.
    v1: Vec<(Controller, PathBuf)>,
    /// The v2 directory of `<own>/<group>`, and the controllers it can enable.
    v2: Option<(PathBuf, Vec<Controller>)>,
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
        Self { v1, v2 }
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

    /// The cgroups a sandbox called `name` has (or would have).
    pub(crate) fn sandbox(&self, name: &str) -> SandboxCgroups {
        SandboxCgroups {
            v1: self
                .v1
                .iter()
                .map(|(c, dir)| (*c, dir.join(name)))
                .collect(),
            v2: self.v2.as_ref().map(|(dir, _)| dir.join(name)),
        }
    }

    /// Creates the sandbox's cgroups and applies `limits`; on failure removes what it made.
    pub(crate) fn create(
        &self,
        name: &str,
        limits: &Limits,
    ) -> Result<SandboxCgroups, BackendError> {
        let cgroups = self.sandbox(name);
        let result = (|| {
            for (_, dir) in &cgroups.v1 {
                create_dir(dir)?;
            }
            if let Some((group_dir, controllers)) = &self.v2 {
                ensure_group_dir(group_dir, controllers)?;
                if let Some(dir) = &cgroups.v2 {
                    create_dir(dir)?;
                }
            }
            cgroups.apply(self, limits)
        })();
        if result.is_err() {
            cgroups.remove_dirs();
            cgroups.remove_empty_parents();
        }
        result.map(|()| cgroups)
    }
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

    /// Host pids of every task in any of the sandbox's cgroups: a start cut short between
    /// joining one hierarchy and the next leaves its task in only some of them.
    fn pids_anywhere(&self) -> Result<Vec<u32>, BackendError> {
        let mut all = Vec::new();
        for dir in self.all_dirs() {
            all.extend(procs(&dir)?);
        }
        all.sort_unstable();
        all.dedup();
        Ok(all)
    }

    /// Kills every task, waits until none is left, and removes the cgroups.
    pub(crate) fn kill_all_and_remove(&self) -> Result<(), BackendError> {
        let has_v2_kill = self
            .v2
            .as_ref()
            .is_some_and(|d| d.join("cgroup.kill").exists());
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let mut backoff = Backoff::default();
        loop {
            if has_v2_kill {
                if let Some(dir) = &self.v2 {
                    write(&dir.join("cgroup.kill"), "1")?;
                }
            }
            // Without cgroup.kill every task, and with it those a cut-short start left
            // outside the v2 cgroup.
            for pid in self.pids_anywhere()? {
                let pid = libc::pid_t::try_from(pid).unwrap_or(libc::pid_t::MAX);
                // SAFETY: kill(2) with a pid read from the sandbox's cgroups; a stale pid
                // only yields ESRCH.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            // Tasks frozen by the v1 freezer only die once thawed.
            if let Some(dir) = self.dir(Controller::Freezer) {
                let state = dir.join("freezer.state");
                if state.exists() {
                    write(&state, "THAWED")?;
                }
            }
            if self.pids_anywhere()?.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                return Err(BackendError::io(
                    "kill every task in",
                    self.v2.clone().unwrap_or_default(),
                    io::Error::from(io::ErrorKind::TimedOut),
                ));
            }
            backoff.wait();
        }
        self.remove_dirs_checked()
    }

    /// Removes the (empty) cgroup directories, retrying while the kernel finishes exits.
    fn remove_dirs_checked(&self) -> Result<(), BackendError> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        for dir in self.all_dirs() {
            let mut backoff = Backoff::default();
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

    /// Best-effort removal after a failed create.
    pub(crate) fn remove_dirs(&self) {
        for dir in self.all_dirs() {
            let _ = fs::remove_dir(dir);
        }
    }

    fn all_dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = self.v1.iter().map(|(_, d)| d.clone()).collect();
        dirs.extend(self.v2.iter().cloned());
        dirs
    }

    /// Removes the group directories above the sandbox's cgroups if they are now empty, so
    /// a driver with no sandboxes leaves no cgroup behind.
    pub(crate) fn remove_empty_parents(&self) {
        for dir in self.all_dirs() {
            if let Some(parent) = dir.parent() {
                // Fails with EBUSY/ENOTEMPTY while other sandboxes live there; that is fine.
                let _ = fs::remove_dir(parent);
            }
        }
    }

    /// CPU, memory and task counts.
    pub(crate) fn usage(&self) -> Result<ResourceUsage, BackendError> {
        let mut usage = ResourceUsage::default();
        if let Some(dir) = self.dir(Controller::Cpuacct) {
            usage.cpu_nanos = read(&dir.join("cpuacct.usage"))?
                .trim()
                .parse()
                .unwrap_or(0);
        } else if let Some(dir) = &self.v2 {
            let stat = read(&dir.join("cpu.stat"))?;
            let usec: u64 = stat
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            usage.cpu_nanos = usec.saturating_mul(1000);
        }
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
        Ok(usage)
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
#[derive(Debug, Default)]
struct Backoff {
    polls: u32,
}

impl Backoff {
    const SPINS: u32 = 16;

    fn wait(&mut self) {
        self.polls += 1;
        if self.polls <= Self::SPINS {
            std::thread::yield_now();
        } else {
            let exp = (self.polls - Self::SPINS).min(6);
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
            .and_then(|()| cgroups.kill_all_and_remove());
        let status = child.try_wait();
        if result.is_err() || !matches!(status, Ok(Some(_))) {
            let _ = child.kill();
            let _ = child.wait();
            let _ = cgroups.remove_dirs_checked();
        }
        cgroups.remove_empty_parents();
        result.unwrap();
        let _ = child.wait();
        assert!(cgroups.all_dirs().iter().all(|d| !d.exists()));
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
