//! Applies an image's layer tars, in order, to one directory tree: the OCI whiteouts
//! (`.wh.<name>` removes `<name>`, `.wh..wh..opq` empties its directory of what lower layers
//! put there), ownership shifted into the sandboxes' user namespace, and no path ever
//! leaving the tree.
//!
//! Every entry's parent is resolved inside the tree, component by component, with symlinks
//! followed as if the tree were `/` (an absolute target or `..` stops at the tree's root),
//! and the entry's own last component is never followed. Hard links are resolved the same
//! way and `linkat` does not follow a symlink it links. Device nodes and FIFOs are skipped
//! (a sandbox's root cannot use devices it did not get from the jail), and counted.
//! Nothing else writes to the tree while it is built, so a check and the write after it
//! see the same tree.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{lchown, symlink, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Most symlinks followed while resolving one path (Linux's own limit).
const MAX_LINKS: usize = 40;
/// The ids a sandbox's user namespace maps; an image's higher ids become `nobody`.
const MAPPED_IDS: u64 = 65_536;
/// `nobody`, what an id outside the map becomes.
const NOBODY: u64 = 65_534;

/// What applying layers found that it did not copy.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Skipped {
    /// Device nodes and FIFOs.
    pub(crate) special: u64,
}

/// Why a layer cannot be applied.
#[derive(Debug)]
pub(crate) enum LayerFault {
    /// The archive is malformed or tries to leave the tree.
    Corrupt(String),
    /// The tree could not be written.
    Io(io::Error),
}

impl From<io::Error> for LayerFault {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

fn corrupt(what: impl Into<String>) -> LayerFault {
    LayerFault::Corrupt(what.into())
}

/// One tree being built from layers.
#[derive(Debug)]
pub(crate) struct Tree {
    root: PathBuf,
    shift: u32,
    skipped: Skipped,
}

impl Tree {
    /// A tree at `root` (an empty directory, owned by shifted root with mode 0755 here),
    /// with ids shifted by `shift`.
    pub(crate) fn new(root: &Path, shift: u32) -> io::Result<Self> {
        let tree = Self {
            root: root.to_owned(),
            shift,
            skipped: Skipped::default(),
        };
        tree.own(root, 0, 0)?;
        fs::set_permissions(root, fs::Permissions::from_mode(0o755))?;
        Ok(tree)
    }

    /// What was skipped so far.
    pub(crate) fn skipped(&self) -> Skipped {
        self.skipped
    }

    fn shifted(&self, id: u64) -> u32 {
        let id = if id < MAPPED_IDS { id } else { NOBODY };
        // Below 65536 by the line above, so it fits.
        self.shift
            .saturating_add(u32::try_from(id).unwrap_or(u32::MAX))
    }

    fn own(&self, path: &Path, uid: u64, gid: u64) -> io::Result<()> {
        lchown(path, Some(self.shifted(uid)), Some(self.shifted(gid)))
    }

    /// Applies one layer, an uncompressed tar stream.
    pub(crate) fn apply(&mut self, layer: impl Read) -> Result<(), LayerFault> {
        let mut archive = tar::Archive::new(layer);
        // Paths written by this layer, which its own opaque markers must not remove.
        let mut written: HashSet<PathBuf> = HashSet::new();
        let entries = archive
            .entries()
            .map_err(|e| corrupt(format!("not a tar: {e}")))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| corrupt(format!("bad tar entry: {e}")))?;
            let raw = entry
                .path()
                .map_err(|e| corrupt(format!("bad path: {e}")))?
                .into_owned();
            let Some(rel) = clean(&raw)? else {
                continue; // The root itself.
            };
            let name = rel
                .file_name()
                .map(OsString::from)
                .ok_or_else(|| corrupt(format!("bad path {}", raw.display())))?;
            let parent_rel = rel.parent().unwrap_or(Path::new(""));
            let name_str = name.to_string_lossy();
            if let Some(hidden) = name_str.strip_prefix(".wh.") {
                let parent = self.resolve_dir(parent_rel, false)?;
                let Some(parent) = parent else { continue };
                if hidden == ".wh..opq" {
                    self.opaque(&parent, parent_rel, &written)?;
                } else if hidden.is_empty() || hidden == "." || hidden == ".." {
                    // `.wh..` would remove the parent's parent: out of the tree at its root.
                    return Err(corrupt(format!("bad whiteout {}", rel.display())));
                } else {
                    remove_any(&parent.join(hidden))?;
                }
                continue;
            }
            let parent = self
                .resolve_dir(parent_rel, true)?
                .ok_or_else(|| corrupt(format!("no parent for {}", rel.display())))?;
            let dst = parent.join(&name);
            let header = entry.header();
            let kind = header.entry_type();
            let mode = header.mode().map_err(|e| corrupt(e.to_string()))? & 0o7777;
            let uid = header.uid().map_err(|e| corrupt(e.to_string()))?;
            let gid = header.gid().map_err(|e| corrupt(e.to_string()))?;
            let mtime = header.mtime().unwrap_or(0);
            match kind {
                tar::EntryType::Directory => {
                    match fs::symlink_metadata(&dst) {
                        Ok(m) if m.is_dir() => {}
                        Ok(_) => {
                            remove_any(&dst)?;
                            fs::create_dir(&dst)?;
                        }
                        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir(&dst)?,
                        Err(e) => return Err(e.into()),
                    }
                    self.own(&dst, uid, gid)?;
                    fs::set_permissions(&dst, fs::Permissions::from_mode(mode))?;
                }
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    remove_existing(&dst)?;
                    let mut file = fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&dst)?;
                    io::copy(&mut entry, &mut file)
                        .map_err(|e| corrupt(format!("{}: {e}", rel.display())))?;
                    // chown clears setuid and setgid, so the mode comes after it.
                    self.own(&dst, uid, gid)?;
                    file.set_permissions(fs::Permissions::from_mode(mode))?;
                    let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime);
                    file.set_modified(when)?;
                }
                tar::EntryType::Symlink => {
                    let target = entry
                        .link_name()
                        .map_err(|e| corrupt(e.to_string()))?
                        .ok_or_else(|| corrupt(format!("symlink {} has no target", rel.display())))?
                        .into_owned();
                    remove_existing(&dst)?;
                    symlink(&target, &dst)?;
                    self.own(&dst, uid, gid)?;
                }
                tar::EntryType::Link => {
                    let target = entry
                        .link_name()
                        .map_err(|e| corrupt(e.to_string()))?
                        .ok_or_else(|| corrupt(format!("link {} has no target", rel.display())))?
                        .into_owned();
                    let target_rel = clean(&target)?
                        .ok_or_else(|| corrupt(format!("link {} to the root", rel.display())))?;
                    let target_parent = self
                        .resolve_dir(target_rel.parent().unwrap_or(Path::new("")), false)?
                        .ok_or_else(|| {
                            corrupt(format!(
                                "link {} to missing {}",
                                rel.display(),
                                target.display()
                            ))
                        })?;
                    let src = target_parent.join(target_rel.file_name().unwrap_or_default());
                    match fs::symlink_metadata(&src) {
                        Ok(m) if !m.is_dir() => {}
                        _ => {
                            return Err(corrupt(format!(
                                "link {} to {}, which is missing or a directory",
                                rel.display(),
                                target.display()
                            )))
                        }
                    }
                    if src != dst {
                        remove_existing(&dst)?;
                        // linkat without AT_SYMLINK_FOLLOW: a symlink is linked, not followed.
                        fs::hard_link(&src, &dst)?;
                    }
                }
                tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                    self.skipped.special += 1;
                    continue;
                }
                tar::EntryType::XGlobalHeader
                | tar::EntryType::XHeader
                | tar::EntryType::GNULongName
                | tar::EntryType::GNULongLink => continue,
                other => {
                    return Err(corrupt(format!(
                        "{}: unsupported tar entry type {other:?}",
                        rel.display()
                    )))
                }
            }
            written.insert(rel);
        }
        Ok(())
    }

    /// Empties `dir` (at `rel`) of everything this layer did not write itself.
    fn opaque(&self, dir: &Path, rel: &Path, written: &HashSet<PathBuf>) -> Result<(), LayerFault> {
        for child in fs::read_dir(dir)? {
            let child = child?;
            if !written.contains(&rel.join(child.file_name())) {
                remove_any(&child.path())?;
            }
        }
        Ok(())
    }

    /// The host path of the directory `rel` inside the tree, with symlinks resolved inside
    /// it; missing directories are created (owned by shifted root, 0755) when `create` is
    /// set, else the answer is `None`.
    fn resolve_dir(&self, rel: &Path, create: bool) -> Result<Option<PathBuf>, LayerFault> {
        let mut todo: Vec<OsString> = components(rel)?;
        todo.reverse();
        let mut at: Vec<OsString> = Vec::new();
        let mut links = 0;
        while let Some(c) = todo.pop() {
            if c == "." {
                continue;
            }
            if c == ".." {
                at.pop();
                continue;
            }
            let mut path = self.root.clone();
            path.extend(&at);
            path.push(&c);
            match fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => at.push(c),
                Ok(m) if m.file_type().is_symlink() => {
                    links += 1;
                    if links > MAX_LINKS {
                        return Err(corrupt(format!(
                            "too many symlinks resolving {}",
                            rel.display()
                        )));
                    }
                    let target = fs::read_link(&path)?;
                    if target.is_absolute() {
                        at.clear();
                    }
                    let mut more = components(&target)?;
                    more.reverse();
                    todo.extend(more);
                }
                Ok(_) => return Err(corrupt(format!("{} is not a directory", rel.display()))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(None);
                    }
                    fs::create_dir(&path)?;
                    self.own(&path, 0, 0)?;
                    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
                    at.push(c);
                }
                Err(e) => return Err(e.into()),
            }
        }
        let mut path = self.root.clone();
        path.extend(&at);
        Ok(Some(path))
    }

    /// Gives the tree E2B's default user, as E2B's template build does: `user` (uid and gid
    /// 1000, home `/home/user`, shell `/bin/bash`) unless `/etc/passwd` has one, and the
    /// home directory unless it exists. Runs after the last layer.
    pub(crate) fn provision(&self) -> Result<(), LayerFault> {
        let etc = self
            .resolve_dir(Path::new("etc"), true)?
            .ok_or_else(|| corrupt("no /etc"))?;
        let passwd = etc.join("passwd");
        let text = read_regular(&passwd)?;
        let has_root = text.lines().any(|l| l.starts_with("root:"));
        if !text.lines().any(|l| l.starts_with("user:")) {
            let mut add = String::new();
            if !has_root {
                add.push_str("root:x:0:0:root:/root:/bin/sh\n");
            }
            add.push_str("user:x:1000:1000::/home/user:/bin/bash\n");
            append(&passwd, &text, &add)?;
            self.own(&passwd, 0, 0)?;
            let group = etc.join("group");
            let groups = read_regular(&group)?;
            if !groups.lines().any(|l| l.starts_with("user:")) {
                let mut add = String::new();
                if !groups.lines().any(|l| l.starts_with("root:")) {
                    add.push_str("root:x:0:\n");
                }
                add.push_str("user:x:1000:\n");
                append(&group, &groups, &add)?;
                self.own(&group, 0, 0)?;
            }
        }
        let home = self
            .resolve_dir(Path::new("home"), true)?
            .ok_or_else(|| corrupt("no /home"))?;
        let user_home = home.join("user");
        if fs::symlink_metadata(&user_home).is_err() {
            fs::create_dir(&user_home)?;
            self.own(&user_home, 1000, 1000)?;
            fs::set_permissions(&user_home, fs::Permissions::from_mode(0o755))?;
        }
        Ok(())
    }
}

/// `path` as a relative path inside the tree (`None`: the root itself); `..` anywhere is
/// refused, a leading `/` or `./` dropped.
fn clean(path: &Path) -> Result<Option<PathBuf>, LayerFault> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(corrupt(format!(
                    "path {} leaves the image's root",
                    path.display()
                )))
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// `path`'s components, `..` kept for [`Tree::resolve_dir`] to stop at the root.
fn components(path: &Path) -> Result<Vec<OsString>, LayerFault> {
    Ok(path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect())
}

/// Removes whatever is at `path` (a directory with its contents), never following a link;
/// nothing there is fine.
fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Makes way for a new non-directory entry at `path`.
fn remove_existing(path: &Path) -> io::Result<()> {
    remove_any(path)
}

/// The contents of a regular file, or nothing when it is missing; anything else there is
/// refused (never followed).
fn read_regular(path: &Path) -> Result<String, LayerFault> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => Ok(fs::read_to_string(path)?),
        Ok(_) => Err(corrupt(format!("{} is not a regular file", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(e.into()),
    }
}

/// Writes `old` + `add` to `path` (a regular file or nothing), with a newline between when
/// `old` lacks one; mode 0644 for a new file.
fn append(path: &Path, old: &str, add: &str) -> io::Result<()> {
    let mut text = old.to_owned();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(add);
    let mode = fs::symlink_metadata(path).map_or(0o644, |m| m.permissions().mode() & 0o7777);
    fs::write(path, text)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    enum E<'a> {
        File(&'a str, u32, &'a [u8]),
        Dir(&'a str),
        Link(&'a str, &'a str),
        Hard(&'a str, &'a str),
        Dev(&'a str),
    }

    fn layer(entries: &[E<'_>]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mode(0o777);
            h.set_mtime(0);
            match e {
                E::File(p, mode, data) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    h.set_size(data.len() as u64);
                    h.set_uid(1000);
                    h.set_gid(1000);
                    b.append_data(&mut h, p, *data).unwrap();
                }
                E::Dir(p) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    b.append_data(&mut h, p, &[][..]).unwrap();
                }
                E::Link(p, t) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    b.append_link(&mut h, p, t).unwrap();
                }
                E::Hard(p, t) => {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_size(0);
                    b.append_link(&mut h, p, t).unwrap();
                }
                E::Dev(p) => {
                    h.set_entry_type(tar::EntryType::Char);
                    h.set_size(0);
                    h.set_mode(0o666);
                    b.append_data(&mut h, p, &[][..]).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    /// A raw tar whose one entry's name is written as given (the tar crate refuses `..`).
    fn raw_layer(name: &str) -> Vec<u8> {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(1);
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        out.extend_from_slice(b"x");
        out.resize(1024, 0);
        out.extend_from_slice(&[0; 1024]);
        out
    }

    fn root() -> bool {
        nix::unistd::Uid::effective().is_root()
    }

    #[test]
    #[allow(clippy::print_stdout)] // SKIP lines go to stdout.
    fn layers_apply_in_order_with_whiteouts_and_shifted_owners() {
        if !root() {
            println!("SKIP layers_apply_in_order_with_whiteouts_and_shifted_owners: needs root for lchown");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut tree = Tree::new(dir.path(), 100_000).unwrap();
        tree.apply(
            &layer(&[
                E::Dir("etc/"),
                E::File("etc/keep", 0o644, b"keep"),
                E::File("etc/gone", 0o644, b"gone"),
                E::Dir("opt/"),
                E::File("opt/old", 0o644, b"old"),
                E::File("usr/bin/su", 0o4755, b"su"),
                E::Link("bin", "usr/bin"),
                E::Dev("dev/null"),
            ])[..],
        )
        .unwrap();
        tree.apply(
            &layer(&[
                E::File("etc/.wh.gone", 0o644, b""),
                E::File("opt/new", 0o644, b"new"),
                E::File("opt/.wh..wh..opq", 0o644, b""),
                E::File("bin/tool", 0o755, b"tool"),
                E::Hard("usr/bin/tool2", "bin/tool"),
            ])[..],
        )
        .unwrap();
        tree.provision().unwrap();
        let p = dir.path();
        assert_eq!(fs::read(p.join("etc/keep")).unwrap(), b"keep");
        assert!(!p.join("etc/gone").exists());
        assert!(!p.join("opt/old").exists());
        assert_eq!(fs::read(p.join("opt/new")).unwrap(), b"new");
        // Through the symlink, inside the tree.
        assert_eq!(fs::read(p.join("usr/bin/tool")).unwrap(), b"tool");
        assert_eq!(
            fs::metadata(p.join("usr/bin/tool2")).unwrap().ino(),
            fs::metadata(p.join("usr/bin/tool")).unwrap().ino()
        );
        let su = fs::metadata(p.join("usr/bin/su")).unwrap();
        assert_eq!((su.uid(), su.gid()), (101_000, 101_000));
        assert_eq!(su.mode() & 0o7777, 0o4755);
        assert_eq!(fs::metadata(p).unwrap().uid(), 100_000);
        fs::symlink_metadata(p.join("dev/null")).unwrap_err();
        assert_eq!(tree.skipped().special, 1);
        let passwd = fs::read_to_string(p.join("etc/passwd")).unwrap();
        assert!(
            passwd.contains("user:x:1000:1000::/home/user:/bin/bash"),
            "{passwd}"
        );
        assert_eq!(fs::metadata(p.join("home/user")).unwrap().uid(), 101_000);
    }

    #[test]
    #[allow(clippy::print_stdout)] // SKIP lines go to stdout.
    fn nothing_leaves_the_tree() {
        if !root() {
            println!("SKIP nothing_leaves_the_tree: needs root for lchown");
            return;
        }
        let outside = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let tree_root = dir.path().join("t");
        fs::create_dir(&tree_root).unwrap();
        let mut tree = Tree::new(&tree_root, 100_000).unwrap();
        // A symlink to the outside, then a file written through it: it lands inside.
        let out = outside.path().to_str().unwrap().to_owned();
        tree.apply(
            &layer(&[
                E::Link("esc", &out),
                E::Link("up", "../../../.."),
                E::File("esc/pwned", 0o644, b"x"),
                E::File("up/pwned2", 0o644, b"x"),
            ])[..],
        )
        .unwrap();
        assert!(!outside.path().join("pwned").exists());
        assert!(!dir.path().join("pwned2").exists());
        assert!(tree_root
            .join(out.trim_start_matches('/'))
            .join("pwned")
            .exists());
        assert!(tree_root.join("pwned2").exists());
        // A hard link to a host file resolves inside the tree too: here, to nothing.
        fs::write(outside.path().join("secret"), b"s").unwrap();
        let secret = format!("{out}/secret");
        let r = tree.apply(&layer(&[E::Hard("stolen", &secret)])[..]);
        assert!(matches!(r, Err(LayerFault::Corrupt(_))));
        // `..` in a name is refused outright.
        let r = tree.apply(&raw_layer("../evil")[..]);
        assert!(matches!(r, Err(LayerFault::Corrupt(m)) if m.contains("leaves")));
        assert!(!dir.path().join("evil").exists());
        // A whiteout of `..` is refused, not applied to the tree's parent.
        fs::write(dir.path().join("sibling"), b"s").unwrap();
        let r = tree.apply(&layer(&[E::File(".wh...", 0o644, b"")])[..]);
        assert!(matches!(r, Err(LayerFault::Corrupt(m)) if m.contains("bad whiteout")));
        assert!(dir.path().join("sibling").exists());
        assert!(tree_root.exists());
        // A whiteout through a symlink removes nothing outside.
        fs::write(outside.path().join("victim"), b"v").unwrap();
        tree.apply(&layer(&[E::File("esc/.wh.victim", 0o644, b"")])[..])
            .unwrap();
        assert!(outside.path().join("victim").exists());
        // A truncated layer is a corrupt one.
        let mut cut = layer(&[E::File("big", 0o644, &[7u8; 5000])]);
        cut.truncate(1500);
        let r = tree.apply(&cut[..]);
        assert!(matches!(r, Err(LayerFault::Corrupt(_))));
    }
}
