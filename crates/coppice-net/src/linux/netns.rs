//! Network namespaces as files: made by a short-lived thread that unshares its network
//! namespace and bind-mounts it onto a file (what `ip netns add` does), joined by threads
//! that `setns` into that file.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::linux::netlink::Netlink;

/// `NSFS_MAGIC`: the filesystem of namespace files.
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// Makes a new network namespace with `lo` up, pinned by a bind mount on `path` (which must
/// not exist). Returns the namespace file, opened, and a netlink socket inside it.
pub(crate) fn create(path: &Path) -> io::Result<(File, Netlink)> {
    File::options().write(true).create_new(true).open(path)?;
    let made = std::thread::scope(|s| {
        s.spawn(|| -> io::Result<Netlink> {
            // SAFETY: unshare affects only this thread, which ends right after.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let mut nl = Netlink::open()?;
            // `lo` is always index 1 in a new namespace.
            nl.set_up(1)?;
            bind_mount(Path::new("/proc/thread-self/ns/net"), path)?;
            Ok(nl)
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")))
    });
    match made.and_then(|nl| Ok((File::open(path)?, nl))) {
        Ok(done) => Ok(done),
        Err(e) => {
            let _ = remove(path);
            Err(e)
        }
    }
}

/// Moves the namespace mount at `from` to `to` (which must not exist) and removes the file
/// left under `from`.
pub(crate) fn move_mount(from: &Path, to: &Path) -> io::Result<()> {
    File::options().write(true).create_new(true).open(to)?;
    if let Err(e) = mount_at(from, to, libc::MS_MOVE) {
        let _ = std::fs::remove_file(to);
        return Err(e);
    }
    std::fs::remove_file(from)
}

/// Unmounts and unlinks a namespace file; missing pieces are not an error.
pub(crate) fn remove(path: &Path) -> io::Result<()> {
    let c = cpath(path)?;
    // SAFETY: `c` is a valid C string.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        let e = io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) {
            return Err(e);
        }
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Whether `file` is a namespace file (a live bind mount, not the empty file under it).
pub(crate) fn is_namespace(file: &File) -> bool {
    // SAFETY: `st` is written by fstatfs on a valid descriptor.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let r = unsafe { libc::fstatfs(file.as_raw_fd(), &raw mut st) };
    #[allow(clippy::unnecessary_cast)] // `f_type`'s width differs between libcs.
    let magic = st.f_type as i64;
    r == 0 && magic == NSFS_MAGIC
}

/// Runs `f` on a thread that has joined the network namespace `ns`.
#[cfg(test)]
pub(crate) fn within<T: Send>(
    ns: std::os::fd::BorrowedFd<'_>,
    f: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this thread only; it ends when `f` returns.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")))
    })
}

/// Bind-mounts `dir` onto itself and makes it private, unless it is a mount point already,
/// so the namespace mounts under it neither propagate to other mount namespaces nor
/// receive theirs.
pub(crate) fn private_mount_point(dir: &Path) -> io::Result<()> {
    if is_mount_point(dir)? {
        return Ok(());
    }
    bind_mount(dir, dir)?;
    // A propagation change ignores its source.
    mount_at(Path::new("none"), dir, libc::MS_PRIVATE)
}

/// Unmounts what [`private_mount_point`] mounted.
pub(crate) fn unmount_dir(dir: &Path) -> io::Result<()> {
    if !is_mount_point(dir)? {
        return Ok(());
    }
    let c = cpath(dir)?;
    // SAFETY: a valid C string.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `path` is a mount point in this mount namespace.
pub(crate) fn is_mount_point(path: &Path) -> io::Result<bool> {
    let path = match std::fs::canonicalize(path) {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .is_some_and(|m| unescape(m) == path.as_os_str().as_bytes())
    }))
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
            out.push(u8::try_from(v).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

fn bind_mount(from: &Path, to: &Path) -> io::Result<()> {
    mount_at(from, to, libc::MS_BIND)
}

/// `mount(from, to, NULL, flags, NULL)`: a bind, a move or a propagation change, which
/// take no filesystem type or data.
fn mount_at(from: &Path, to: &Path, flags: libc::c_ulong) -> io::Result<()> {
    let (f, t) = (cpath(from)?, cpath(to)?);
    // SAFETY: valid C strings; null type and data are what these mounts take.
    let r = unsafe {
        libc::mount(
            f.as_ptr(),
            t.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other)
}
