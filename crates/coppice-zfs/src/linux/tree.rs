//! Whole-tree file operations shared by the overlay driver and the template builder:
//! copying, measuring, removing and making durable.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use coppice_lifecycle::backend::BackendError;
use nix::fcntl::{Flock, FlockArg};

use crate::command;

/// How [`copy`] shares data with its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CopyMode {
    /// Hard links for every non-directory: only valid when both trees are immutable and on
    /// one filesystem.
    Hardlink,
    /// Real copies, reflinked where the filesystem can (`cp --reflink=auto`).
    Reflink,
}

/// Copies the tree `src` to the not yet existing `dst`, keeping owners, modes, timestamps,
/// xattrs (`trusted.overlay.*` included), device nodes (overlay whiteouts), symlinks and
/// hard links.
///
/// This is coreutils `cp -a`: it already gets every one of those right, including sparse
/// files and `FICLONE` with `--reflink=auto`, and a hand-written copier would be a second
/// implementation of the same thing to keep correct.
pub(crate) fn copy(src: &Path, dst: &Path, mode: CopyMode) -> Result<(), BackendError> {
    let mut cmd = Command::new("cp");
    match mode {
        CopyMode::Hardlink => cmd.arg("-al"),
        CopyMode::Reflink => cmd.args(["-a", "--reflink=auto"]),
    };
    cmd.arg("--no-target-directory").arg(src).arg(dst);
    command::run(cmd, command::TREE_COPY)
}

/// Whether `a` and `b` are on the same filesystem (so hard links between them work).
pub(crate) fn same_filesystem(a: &Path, b: &Path) -> Result<bool, BackendError> {
    let da = fs::metadata(a).map_err(|e| BackendError::io("stat", a, e))?;
    let db = fs::metadata(b).map_err(|e| BackendError::io("stat", b, e))?;
    Ok(da.dev() == db.dev())
}

/// Bytes allocated on disk for everything under `root`, each hard-linked inode once.
pub(crate) fn disk_bytes(root: &Path) -> Result<u64, BackendError> {
    let mut seen = HashSet::new();
    let mut total = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            // Something removed concurrently is simply not counted.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(BackendError::io("stat", &path, e)),
        };
        if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        total = total.saturating_add(meta.blocks().saturating_mul(512));
        if meta.is_dir() {
            let entries =
                fs::read_dir(&path).map_err(|e| BackendError::io("read dir", &path, e))?;
            for entry in entries {
                let entry = entry.map_err(|e| BackendError::io("read dir", &path, e))?;
                stack.push(entry.path());
            }
        }
    }
    Ok(total)
}

/// Flushes every dirty page and inode of the filesystem holding `path` (`syncfs`): cheaper
/// and simpler than an fsync per file of a 7,000-file tree, and what makes a staged tree
/// durable before it is published by rename.
pub(crate) fn sync_filesystem(path: &Path) -> Result<(), BackendError> {
    let dir = File::open(path).map_err(|e| BackendError::io("open", path, e))?;
    nix::unistd::syncfs(dir.as_raw_fd())
        .map_err(|e| BackendError::io("syncfs", path, io::Error::from(e)))
}

/// Makes a rename or creation inside `dir` durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), BackendError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| BackendError::io("fsync dir", dir, e))
}

/// Writes `bytes` to `path` atomically: a temporary sibling, fsync, rename, fsync of the
/// directory. A reader sees the old content, the new content, or no file.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), BackendError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let write = || -> io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    write().map_err(|e| BackendError::io("write", &tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| BackendError::io("rename into place", path, e))?;
    fsync_dir(dir)
}

/// Reads a small file, `None` if it does not exist.
pub(crate) fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, BackendError> {
    let mut buf = Vec::new();
    match File::open(path).and_then(|mut f| f.read_to_end(&mut buf)) {
        Ok(_) => Ok(Some(buf)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(BackendError::io("read", path, e)),
    }
}

/// Removes the tree at `path` if it exists, first detaching anything mounted inside it (a
/// debootstrap that died with `/proc` mounted in its target) so the removal never walks
/// into a host filesystem.
pub(crate) fn remove(path: &Path) -> Result<(), BackendError> {
    unmount_under(path)?;
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(BackendError::io("stat", path, e)),
        Ok(m) if m.is_dir() => match fs::remove_dir_all(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(BackendError::io("remove tree", path, e))
            }
            _ => Ok(()),
        },
        Ok(_) => fs::remove_file(path).map_err(|e| BackendError::io("remove", path, e)),
    }
}

/// Lazily unmounts every mount at or below `path` in this mount namespace, deepest first.
pub(crate) fn unmount_under(path: &Path) -> Result<(), BackendError> {
    let Ok(path) = fs::canonicalize(path) else {
        return Ok(());
    };
    let info = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| BackendError::io("read", "/proc/self/mountinfo", e))?;
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mount_path(p)))
        .filter(|p| p.starts_with(&path))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH)
            .map_err(|e| BackendError::io("unmount", &p, io::Error::from(e)))?;
    }
    Ok(())
}

/// Undoes the octal escapes (`\040` for a space) of `/proc/self/mountinfo`.
fn unescape_mount_path(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Takes an exclusive `flock` on `path` (created if missing), calling `waiting` once if
/// another process or thread holds it. Each call opens its own file description, so the lock
/// also excludes other threads of this process.
pub(crate) fn lock_exclusive(
    path: &Path,
    waiting: &mut dyn FnMut(),
) -> Result<Flock<File>, BackendError> {
    let open = || {
        fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| BackendError::io("open lock file", path, e))
    };
    match Flock::lock(open()?, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            waiting();
            Flock::lock(open()?, FlockArg::LockExclusive)
                .map_err(|(_, e)| BackendError::io("lock", path, io::Error::from(e)))
        }
        Err((_, e)) => Err(BackendError::io("lock", path, io::Error::from(e))),
    }
}

/// Whether the filesystem holding `dir` can share extents between files (`FICLONE`), tried
/// on two scratch files that are removed again.
pub(crate) fn reflink_supported(dir: &Path) -> Result<bool, BackendError> {
    let src_path = dir.join(format!(".reflink-probe-{}-a", std::process::id()));
    let dst_path = dir.join(format!(".reflink-probe-{}-b", std::process::id()));
    let result = (|| -> io::Result<bool> {
        let mut src = File::create(&src_path)?;
        src.write_all(&[0u8; 4096])?;
        src.sync_all()?;
        let dst = File::create(&dst_path)?;
        // SAFETY: FICLONE takes the source fd as its integer argument; both fds are open
        // for the duration of the call and the kernel reads no memory from us.
        let rc = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
        if rc == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EOPNOTSUPP | libc::EINVAL | libc::EXDEV | libc::ENOTTY) => Ok(false),
            _ => Err(err),
        }
    })();
    let _ = fs::remove_file(&src_path);
    let _ = fs::remove_file(&dst_path);
    result.map_err(|e| BackendError::io("probe reflink in", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mount_path("/a\\040b/c"), "/a b/c");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
        assert_eq!(unescape_mount_path("/trailing\\"), "/trailing\\");
    }

    #[test]
    fn disk_bytes_counts_hard_links_once() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![7u8; 64 * 1024];
        fs::write(dir.path().join("a"), &data).unwrap();
        let one = disk_bytes(dir.path()).unwrap();
        fs::hard_link(dir.path().join("a"), dir.path().join("b")).unwrap();
        assert_eq!(disk_bytes(dir.path()).unwrap(), one);
        fs::write(dir.path().join("c"), &data).unwrap();
        assert!(disk_bytes(dir.path()).unwrap() >= one + 64 * 1024);
    }

    #[test]
    fn write_atomic_replaces_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("meta.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(read_optional(&p).unwrap().unwrap(), b"two");
        assert_eq!(read_optional(&dir.path().join("none")).unwrap(), None);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
