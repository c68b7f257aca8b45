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
    /// cgroup. The driver treats every cgroup in its group that it has no record of as an
    /// orphan of a crash and kills it, so two drivers with different state directories must
    /// use different groups; the default is derived from the state directory.
    pub cgroup_group: String,
}

impl JailConfig {
    /// The default host uid of sandbox root. Template trees are owned by ids shifted by
    /// this much (see `coppice-zfs`'s template builder).
    pub const DEFAULT_UID_BASE: u32 = 100_000;

    /// Defaults: uids 100000..165535, cgroup group `coppice-<hash of state_dir>`.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        let state_dir = state_dir.into();
        let cgroup_group = Self::group_for(&state_dir);
        Self {
            state_dir,
            uid_base: Self::DEFAULT_UID_BASE,
            uid_count: 65_536,
            cgroup_group,
        }
    }

    /// `coppice-` and 16 hex digits of a stable hash (FNV-1a) of the state directory's path:
    /// the same directory always gets the same group, across restarts and compiler versions.
    pub fn group_for(state_dir: &std::path::Path) -> String {
        use std::os::unix::ffi::OsStrExt;
        let hash = state_dir
            .as_os_str()
            .as_bytes()
            .iter()
            .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
            });
        format!("coppice-{hash:016x}")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_state_dir_gets_its_own_stable_cgroup_group() {
        let a = JailConfig::new("/var/lib/coppice/jail");
        let b = JailConfig::new("/var/tmp/other/jail");
        assert_ne!(a.cgroup_group, b.cgroup_group);
        assert_eq!(
            a.cgroup_group,
            JailConfig::new("/var/lib/coppice/jail").cgroup_group
        );
        // FNV-1a of the empty path is the offset basis: the hash is the documented one.
        assert_eq!(
            JailConfig::group_for(std::path::Path::new("")),
            "coppice-cbf29ce484222325"
        );
    }
}
