//! A sandbox's name files, `/etc/hosts` and `/etc/resolv.conf`, written as plain files into
//! its writable root before it starts, the way E2B's images have them.
//!
//! They are not bind mounts: a mount is one more operation under the kernel's global mount
//! lock on every start (and again at teardown), which every sandbox starting at the same
//! time waits for. Files in the writable layer cost a write each, and a snapshot or fork
//! simply gets new ones when its sandbox starts.
//!
//! **Invariant:** the gateway writes into a sandbox's root only through descriptors opened
//! with `O_NOFOLLOW` from the root down, and only regular files: a sandbox that replaced
//! `/etc` or a name file with a symlink (its root user can) gets an error, never a write
//! outside its root.

use std::fs::{File, Permissions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{fchown, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use coppice_lifecycle::backend::{BackendError, NetAttachment, RootfsSpec, SandboxId};
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{mkdirat, Mode};

/// The resolver file's name under `/etc`.
pub(crate) const RESOLV_CONF: &str = "resolv.conf";
/// The hosts file's name under `/etc`.
const HOSTS: &str = "hosts";

/// Writes `/etc/hosts` (always: `localhost` and the sandbox's own name resolve without DNS)
/// and, on a network, `/etc/resolv.conf` naming `attachment`'s resolver, into the writable
/// root of a sandbox that has not started yet. `owner` is the sandbox's root on the host.
pub(crate) fn write_at_start(
    rootfs: &RootfsSpec,
    id: &SandboxId,
    attachment: Option<&NetAttachment>,
    owner: u32,
) -> io::Result<()> {
    let etc = open_etc(rootfs, true)?;
    let own = attachment.map_or_else(|| "127.0.1.1".to_owned(), |a| a.address.addr().to_string());
    let hosts = format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
         ff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n{own}\t{id}\n"
    );
    write_file(&etc, HOSTS, &hosts, Some(owner))?;
    if let Some(a) = attachment {
        write_file(&etc, RESOLV_CONF, &resolv_conf(&[a.dns]), Some(owner))?;
    }
    Ok(())
}

/// Replaces the servers in the `/etc/resolv.conf` of a sandbox with root `rootfs` (which
/// may be running): the file keeps its inode, owner and mode, so what a process inside has
/// open sees the change.
pub(crate) fn set_resolvers(rootfs: &RootfsSpec, servers: &[Ipv4Addr]) -> io::Result<()> {
    let etc = open_etc(rootfs, false)?;
    write_file(&etc, RESOLV_CONF, &resolv_conf(servers), None)
}

/// The text of a resolver file naming `servers`.
fn resolv_conf(servers: &[Ipv4Addr]) -> String {
    let mut text = String::new();
    for s in servers {
        text.push_str(&format!("nameserver {s}\n"));
    }
    text.push_str("options timeout:2 attempts:2\n");
    text
}

/// The directory that holds the sandbox's own files (an overlay's upper layer, or the
/// writable root itself), and the read-only layers under it, topmost first.
fn writable_root(rootfs: &RootfsSpec) -> (&Path, &[PathBuf]) {
    match rootfs {
        RootfsSpec::Overlay { upper, lower, .. } => (upper, lower),
        RootfsSpec::Directory(root) => (root, &[]),
    }
}

/// Opens `etc` in the sandbox's writable root without following symlinks. An overlay's
/// upper layer has no `etc` until something in it changes: with `create`, one is made with
/// the owner and mode of the topmost layer's `/etc` (the directory the sandbox sees is the
/// upper one).
fn open_etc(rootfs: &RootfsSpec, create: bool) -> io::Result<OwnedFd> {
    let (root, lower) = writable_root(rootfs);
    let root = open_dir(None, root)?;
    match open_dir(Some(&root), Path::new("etc")) {
        Err(e) if create && e.kind() == io::ErrorKind::NotFound => {
            let template = lower
                .iter()
                .find_map(|l| std::fs::symlink_metadata(l.join("etc")).ok())
                .filter(std::fs::Metadata::is_dir)
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, "no layer of the root has /etc")
                })?;
            mkdirat(
                Some(root.as_raw_fd()),
                "etc",
                Mode::from_bits_truncate(0o700),
            )
            .map_err(io::Error::from)?;
            let etc = File::from(open_dir(Some(&root), Path::new("etc"))?);
            fchown(&etc, Some(template.uid()), Some(template.gid()))?;
            etc.set_permissions(Permissions::from_mode(template.mode() & 0o7777))?;
            let etc = OwnedFd::from(etc);
            Ok(etc)
        }
        other => other,
    }
}

/// Writes `text` to the regular file `name` under `dir`, creating it (owned by `owner`, mode
/// 0644) when `owner` is given, else only replacing the contents of the one that is there.
fn write_file(dir: &OwnedFd, name: &str, text: &str, owner: Option<u32>) -> io::Result<()> {
    let mut flags = OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
    if owner.is_some() {
        flags |= OFlag::O_CREAT;
    }
    let fd = openat(
        Some(dir.as_raw_fd()),
        name,
        flags,
        Mode::from_bits_truncate(0o644),
    )
    .map_err(io::Error::from)?;
    let mut file = File::from(owned(fd));
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("/etc/{name} is not a regular file"),
        ));
    }
    if let Some(owner) = owner {
        fchown(&file, Some(owner), Some(owner))?;
        file.set_permissions(Permissions::from_mode(0o644))?;
    }
    file.set_len(0)?;
    file.write_all(text.as_bytes())
}

/// Opens the directory `path` (relative to `at` when given) without following a symlink in
/// its last component.
fn open_dir(at: Option<&OwnedFd>, path: &Path) -> io::Result<OwnedFd> {
    let fd = openat(
        at.map(AsRawFd::as_raw_fd),
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(io::Error::from)?;
    Ok(owned(fd))
}

/// Takes ownership of a descriptor `openat` just returned.
fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: a descriptor `openat` returned is new and nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Maps a name-file failure to the runtime's error.
pub(crate) fn error(op: &'static str, rootfs: &RootfsSpec, e: io::Error) -> BackendError {
    BackendError::io(op, writable_root(rootfs).0.join("etc"), e)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use coppice_lifecycle::backend::Ipv4Cidr;

    use super::*;

    /// An overlay root as storage hands it over: a template layer with `/etc`, an empty
    /// upper layer.
    fn overlay(dir: &Path) -> RootfsSpec {
        let lower = dir.join("lower");
        std::fs::create_dir_all(lower.join("etc")).unwrap();
        std::fs::set_permissions(lower.join("etc"), Permissions::from_mode(0o751)).unwrap();
        std::fs::write(lower.join("etc/hosts"), "template's\n").unwrap();
        std::fs::create_dir_all(dir.join("upper")).unwrap();
        RootfsSpec::Overlay {
            lower: vec![lower],
            upper: dir.join("upper"),
            work: dir.join("work"),
        }
    }

    fn attachment(id: &SandboxId) -> NetAttachment {
        NetAttachment {
            id: id.clone(),
            address: Ipv4Cidr::new(Ipv4Addr::new(198, 51, 100, 7), 24).unwrap(),
            gateway: Ipv4Addr::new(198, 51, 100, 1),
            dns: Ipv4Addr::new(198, 51, 100, 1),
            namespace: None,
            interface: "eth0".into(),
            policy: Default::default(),
        }
    }

    #[test]
    fn the_files_go_into_the_upper_layer_under_an_etc_like_the_templates() {
        let dir = tempfile::tempdir().unwrap();
        let root = overlay(dir.path());
        let id = SandboxId::new("abc123").unwrap();
        let me = std::fs::metadata(dir.path()).unwrap().uid();
        write_at_start(&root, &id, Some(&attachment(&id)), me).unwrap();

        let etc = std::fs::metadata(dir.path().join("upper/etc")).unwrap();
        assert_eq!(
            etc.mode() & 0o7777,
            0o751,
            "the upper /etc shadows the template's"
        );
        let hosts = std::fs::read_to_string(dir.path().join("upper/etc/hosts")).unwrap();
        assert!(hosts.contains("127.0.0.1\tlocalhost\n"), "{hosts}");
        assert!(hosts.contains("198.51.100.7\tabc123\n"), "{hosts}");
        let resolv = dir.path().join("upper/etc/resolv.conf");
        assert!(std::fs::read_to_string(&resolv)
            .unwrap()
            .starts_with("nameserver 198.51.100.1\n"));
        assert_eq!(std::fs::metadata(&resolv).unwrap().mode() & 0o777, 0o644);
        // The template's own file is untouched.
        assert_eq!(
            std::fs::read_to_string(dir.path().join("lower/etc/hosts")).unwrap(),
            "template's\n"
        );
    }

    #[test]
    fn without_a_network_there_is_a_hosts_file_and_no_resolver_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = overlay(dir.path());
        let id = SandboxId::new("abc123").unwrap();
        write_at_start(&root, &id, None, 0).unwrap();
        let hosts = std::fs::read_to_string(dir.path().join("upper/etc/hosts")).unwrap();
        assert!(hosts.contains("127.0.1.1\tabc123\n"), "{hosts}");
        assert!(!dir.path().join("upper/etc/resolv.conf").exists());
    }

    #[test]
    fn new_resolvers_replace_the_contents_and_keep_the_inode() {
        let dir = tempfile::tempdir().unwrap();
        let root = overlay(dir.path());
        let id = SandboxId::new("abc123").unwrap();
        write_at_start(&root, &id, Some(&attachment(&id)), 0).unwrap();
        let path = dir.path().join("upper/etc/resolv.conf");
        let before = std::fs::metadata(&path).unwrap().ino();
        set_resolvers(&root, &[Ipv4Addr::new(198, 51, 100, 53)]).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), before);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "nameserver 198.51.100.53\noptions timeout:2 attempts:2\n"
        );
    }

    #[test]
    fn symlinks_the_sandbox_put_in_place_are_refused_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let root = overlay(dir.path());
        let id = SandboxId::new("abc123").unwrap();
        write_at_start(&root, &id, Some(&attachment(&id)), 0).unwrap();
        let outside = dir.path().join("host-file");
        std::fs::write(&outside, "host's\n").unwrap();

        // The file itself replaced by a symlink to a host path.
        let resolv = dir.path().join("upper/etc/resolv.conf");
        std::fs::remove_file(&resolv).unwrap();
        symlink(&outside, &resolv).unwrap();
        assert!(set_resolvers(&root, &[Ipv4Addr::new(198, 51, 100, 53)]).is_err());
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "host's\n");

        // `/etc` replaced by a symlink to a host directory holding a resolv.conf.
        let host_etc = dir.path().join("host-etc");
        std::fs::create_dir(&host_etc).unwrap();
        std::fs::write(host_etc.join("resolv.conf"), "host's\n").unwrap();
        std::fs::remove_dir_all(dir.path().join("upper/etc")).unwrap();
        symlink(&host_etc, dir.path().join("upper/etc")).unwrap();
        assert!(set_resolvers(&root, &[Ipv4Addr::new(198, 51, 100, 53)]).is_err());
        assert_eq!(
            std::fs::read_to_string(host_etc.join("resolv.conf")).unwrap(),
            "host's\n"
        );
    }

    #[test]
    fn a_directory_root_gets_the_files_in_its_own_etc() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        let root = RootfsSpec::Directory(dir.path().to_path_buf());
        let id = SandboxId::new("abc123").unwrap();
        write_at_start(&root, &id, Some(&attachment(&id)), 0).unwrap();
        assert!(dir.path().join("etc/hosts").is_file());
        assert!(dir.path().join("etc/resolv.conf").is_file());
    }
}
