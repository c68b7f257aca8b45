//! The jail role: sandboxes as isolated process trees with resource limits.
//!
//! [`LinuxJail`] implements [`coppice_lifecycle::backend::Isolation`] with namespaces
//! (mount, pid, uts, ipc, net, cgroup, and a user namespace that maps sandbox root to an
//! unprivileged host uid range), an overlay or bind-mounted root, cgroup limits and the cgroup
//! freezer; [`JailConfig`] says where it keeps its records. Every sandbox is recorded on disk
//! so that a new process re-adopts the sandboxes of an earlier one. `docs/backends.md` explains
//! the isolation model and why each choice was made. The FreeBSD driver (jail(8), jexec) will
//! sit beside the Linux one behind the same trait.
//!
//! **Invariant:** this crate knows nothing of templates, layers or HTTP; it isolates whatever
//! root filesystem the storage role hands it and runs whatever init the caller names.

use std::path::PathBuf;

#[cfg(target_os = "linux")]
mod linux;

#[cfg(target_os = "linux")]
pub use linux::LinuxJail;

/// Where and how the jail driver keeps its sandboxes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailConfig {
    /// Directory for sandbox records, mount points and init logs.
    pub state_dir: PathBuf,
    /// Host uid and gid that sandbox root (uid 0) maps to.
    pub uid_base: u32,
    /// How many ids are mapped (sandbox ids `0..uid_count`).
    pub uid_count: u32,
    /// Name of the cgroup, under this process's own cgroup, that holds every sandbox's
    /// cgroup. Two drivers with different state directories must use different groups.
    pub cgroup_group: String,
}

impl JailConfig {
    /// The default host uid of sandbox root. Template trees are owned by ids shifted by
    /// this much (see `coppice-zfs`'s template builder).
    pub const DEFAULT_UID_BASE: u32 = 100_000;

    /// Defaults: uids 100000..165535, cgroup group `coppice`.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
            uid_base: Self::DEFAULT_UID_BASE,
            uid_count: 65_536,
            cgroup_group: "coppice".into(),
        }
    }

    fn records_dir(&self) -> PathBuf {
        self.state_dir.join("sandboxes")
    }

    fn roots_dir(&self) -> PathBuf {
        self.state_dir.join("roots")
    }

    fn logs_dir(&self) -> PathBuf {
        self.state_dir.join("logs")
    }
}
