//! The default template: a Debian bookworm root filesystem like E2B's base image, built once
//! with debootstrap and apt, and cached.
//!
//! [`TemplateBuilder::ensure`] returns the cached tree, or builds it: `debootstrap
//! --variant=minbase`, then [`PACKAGES`] (and a flavor's extras) installed by `apt-get` inside
//! the tree, with `/proc` mounted in a mount namespace of its own; then E2B's user setup (user
//! `user`, uid/gid 1000, home `/home/user`, in group `sudo` with passwordless sudo, an empty
//! password), `/etc/pip.conf` and a profile script that make it behave as E2B's image does,
//! a world-writable `/code` and `/usr/local`, `apt-get clean`, empty apt lists, `/run/coppice`,
//! and every file's uid and gid shifted by the sandboxes' user-namespace offset. The tree is
//! built in a staging directory and published by an atomic rename (or exchange, on rebuild); a
//! marker file written after that says it is complete. An exclusive `flock` on
//! `<cache>/.lock` makes concurrent callers build once.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use coppice_lifecycle::backend::BackendError;
use serde::{Deserialize, Serialize};

use crate::command;
use crate::linux::tree;

/// Packages installed on top of debootstrap's minbase set: what E2B's base image (Debian
/// bookworm's `python` image plus Node.js, git and a compiler; `templates/base` in
/// e2b-dev/E2B) gives its users, from Debian's own archive.
pub const PACKAGES: &[&str] = &[
    "bash",
    "coreutils",
    "procps",
    "ca-certificates",
    "sudo",
    // Python with pip and venv; `python` is a command, as in E2B's image; the headers let
    // `pip install` build C extensions.
    "python3",
    "python3-pip",
    "python3-venv",
    "python3-dev",
    "python-is-python3",
    // Node.js with npm (Debian's 18.x; E2B's image carries 20.x).
    "nodejs",
    "npm",
    // What the image's `buildpack-deps` layers give: fetching, version control, archives.
    "git",
    "curl",
    "wget",
    "gnupg",
    "openssh-client",
    "netbase",
    "unzip",
    "zip",
    "xz-utils",
    "bzip2",
    "file",
    "less",
    // The compiler toolchain.
    "build-essential",
    "pkg-config",
    // GitHub's CLI, which E2B's image adds.
    "gh",
];

/// The Debian suite the template is built from.
pub const SUITE: &str = "bookworm";

/// Mirror used when the host's apt sources name none.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// Bumped whenever the recipe changes, so an old cache is never mistaken for a new one.
const RECIPE_VERSION: u32 = 2;

/// The default cache directory shared by every crate's tests on a machine:
/// `$COPPICE_TEMPLATE_CACHE`, or `/var/cache/coppice/templates`.
pub fn default_cache_dir() -> PathBuf {
    std::env::var_os("COPPICE_TEMPLATE_CACHE")
        .filter(|v| !v.is_empty())
        .map_or_else(
            || PathBuf::from("/var/cache/coppice/templates"),
            PathBuf::from,
        )
}

/// Builds and caches the default template. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateBuilder {
    cache_dir: PathBuf,
    uid_shift: u32,
    mirror: Option<String>,
    /// `base`, or the name of a flavor that adds packages to it.
    flavor: String,
    /// Packages the flavor adds to [`PACKAGES`].
    extra: Vec<String>,
}

/// What the completion marker records about a build.
#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    recipe: u32,
    suite: String,
    packages: Vec<String>,
    uid_shift: u32,
    mirror: String,
    built_unix: u64,
}

impl TemplateBuilder {
    /// A builder caching under `cache_dir` whose tree is owned by ids shifted by
    /// `uid_shift` (sandbox uid `n` is host uid `n + uid_shift`).
    pub fn new(cache_dir: impl Into<PathBuf>, uid_shift: u32) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            uid_shift,
            mirror: None,
            flavor: "base".to_owned(),
            extra: Vec::new(),
        }
    }

    /// Builds the flavor `name` instead: the default template plus the Debian packages
    /// `extra` (e.g. `code-interpreter-v1` adds numpy, pandas and matplotlib). It is cached
    /// under its own name. `name` is reduced to `[a-z0-9-]` for the cache directory.
    #[must_use]
    pub fn with_flavor(mut self, name: &str, extra: &[&str]) -> Self {
        self.flavor = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        self.extra = extra.iter().map(|p| (*p).to_owned()).collect();
        self
    }

    /// Every package installed beyond minbase.
    fn packages(&self) -> Vec<String> {
        PACKAGES
            .iter()
            .map(|p| (*p).to_owned())
            .chain(self.extra.iter().cloned())
            .collect()
    }

    /// Uses `mirror` instead of the host's apt sources (or [`DEFAULT_MIRROR`]).
    #[must_use]
    pub fn with_mirror(mut self, mirror: impl Into<String>) -> Self {
        self.mirror = Some(mirror.into());
        self
    }

    /// Versioned name of the cached tree, e.g. `debian-bookworm-base-v2-u100000`.
    pub fn name(&self) -> String {
        format!(
            "debian-{SUITE}-{}-v{RECIPE_VERSION}-u{}",
            self.flavor, self.uid_shift
        )
    }

    /// Where the sealed root filesystem lives once built.
    pub fn path(&self) -> PathBuf {
        self.cache_dir.join(self.name())
    }

    fn marker_path(&self) -> PathBuf {
        self.cache_dir.join(format!("{}.ready.json", self.name()))
    }

    /// Whether a complete build is cached (without taking the lock).
    pub fn is_cached(&self) -> bool {
        self.read_marker()
            .is_some_and(|m| m.recipe == RECIPE_VERSION && m.packages == self.packages())
            && self.path().is_dir()
    }

    /// When the cached build finished (seconds since the Unix epoch), as its completion
    /// marker records it; `None` while no complete build of this recipe is cached.
    pub fn built_at(&self) -> Option<u64> {
        self.read_marker()
            .filter(|m| m.recipe == RECIPE_VERSION && m.packages == self.packages())
            .filter(|_| self.path().is_dir())
            .map(|m| m.built_unix)
    }

    /// What identifies this recipe: the cached tree's name and every package it installs,
    /// so two builders with the same key build the same tree.
    pub fn recipe_key(&self) -> String {
        format!("{}:{}", self.name(), self.packages().join(","))
    }

    fn read_marker(&self) -> Option<Marker> {
        let bytes = tree::read_optional(&self.marker_path()).ok()??;
        serde_json::from_slice(&bytes).ok()
    }

    /// Returns the cached template, building it first if it is missing or if
    /// `force_rebuild`. Building takes a few minutes and reports progress lines (including
    /// debootstrap's and apt's output) through `progress`. Blocking: call it from a plain thread or
    /// `spawn_blocking`.
    pub fn ensure(
        &self,
        force_rebuild: bool,
        progress: &mut dyn FnMut(&str),
    ) -> Result<PathBuf, BackendError> {
        fs::create_dir_all(&self.cache_dir)
            .map_err(|e| BackendError::io("create template cache", &self.cache_dir, e))?;
        let _lock = tree::lock_exclusive(&self.cache_dir.join(".lock"), &mut || {
            progress("another process is building the template; waiting for it");
        })?;
        self.remove_leftovers()?;
        if !force_rebuild && self.is_cached() {
            return Ok(self.path());
        }
        let staging =
            self.cache_dir
                .join(format!(".staging-{}-{}", self.name(), std::process::id()));
        let built = self.build(&staging, progress);
        let published = built.and_then(|mirror| self.publish(&staging, &mirror, progress));
        // On failure nothing but the staging directory was touched; on success it holds the
        // replaced tree, if any.
        let cleanup = tree::remove(&staging);
        published?;
        cleanup?;
        Ok(self.path())
    }

    /// Removes staging directories of builds that died (the lock is held, so none is live).
    fn remove_leftovers(&self) -> Result<(), BackendError> {
        let entries = fs::read_dir(&self.cache_dir)
            .map_err(|e| BackendError::io("read dir", &self.cache_dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| BackendError::io("read dir", &self.cache_dir, e))?;
            if entry.file_name().to_string_lossy().starts_with(".staging-") {
                tracing::info!(path = %entry.path().display(), "removing unfinished template build");
                tree::remove(&entry.path())?;
            }
        }
        Ok(())
    }

    /// Builds the tree in `staging`; returns the mirror used.
    fn build(
        &self,
        staging: &Path,
        progress: &mut dyn FnMut(&str),
    ) -> Result<String, BackendError> {
        tree::remove(staging)?;
        let mirror = self
            .mirror
            .clone()
            .or_else(host_mirror)
            .unwrap_or_else(|| DEFAULT_MIRROR.to_owned());
        ensure_debootstrap(progress)?;
        progress(&format!(
            "building the {SUITE} template with debootstrap from {mirror} (a few minutes)"
        ));
        let mut cmd = Command::new("debootstrap");
        cmd.arg("--variant=minbase")
            .arg(SUITE)
            .arg(staging)
            .arg(&mirror);
        command::stream(cmd, command::INSTALL, progress)?;

        // apt, not debootstrap's `--include`, installs the packages: debootstrap's resolver
        // takes the first of alternatives and knows no virtual packages, which npm's hundred
        // dependencies need.
        let packages = self.packages();
        progress(&format!(
            "installing {} packages with apt-get: {}",
            packages.len(),
            packages.join(" ")
        ));
        apt_in_chroot(staging, &["update", "-q"], progress)?;
        let mut install = vec![
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "-o",
            "Dpkg::Use-Pty=0",
        ];
        install.extend(packages.iter().map(String::as_str));
        apt_in_chroot(staging, &install, progress)?;

        progress("creating user `user` (uid 1000, group sudo) with passwordless sudo");
        in_chroot(staging, &["groupadd", "--gid", "1000", "user"])?;
        in_chroot(
            staging,
            &[
                "useradd",
                "--uid",
                "1000",
                "--gid",
                "1000",
                "--groups",
                "sudo",
                "--home-dir",
                "/home/user",
                "--create-home",
                "--shell",
                "/bin/bash",
                "user",
            ],
        )?;
        // E2B's user has an empty password rather than a locked one.
        in_chroot(staging, &["passwd", "--delete", "user"])?;
        write_file(
            staging,
            "etc/sudoers.d/user",
            "user ALL=(ALL:ALL) NOPASSWD: ALL\n",
            0o440,
        )?;
        in_chroot(
            staging,
            &["visudo", "--check", "--file", "/etc/sudoers.d/user"],
        )?;

        progress("configuring pip, the login shell, /code and /usr/local as E2B's image has them");
        // E2B's python is not Debian's, so `pip install` there never meets PEP 668's
        // "externally managed environment" refusal; this makes Debian's pip behave the same
        // (it installs into /usr/local, which `user` may write too).
        write_file(
            staging,
            "etc/pip.conf",
            "[global]\nbreak-system-packages = true\n",
            0o644,
        )?;
        // Commands arrive as `bash -l -c`, so this reaches every command the SDK runs.
        write_file(staging, "etc/profile.d/coppice-e2b.sh", PROFILE, 0o644)?;
        let code = staging.join("code");
        fs::create_dir_all(&code)
            .and_then(|()| fs::set_permissions(&code, fs::Permissions::from_mode(0o777)))
            .map_err(|e| BackendError::io("create", &code, e))?;
        // E2B makes /usr/local writable by everyone, so `npm install -g` and `pip install`
        // into it work without sudo.
        in_chroot(staging, &["chmod", "-R", "a+rwX", "/usr/local"])?;

        progress("cleaning apt caches");
        in_chroot(staging, &["apt-get", "clean"])?;
        let lists = staging.join("var/lib/apt/lists");
        for entry in fs::read_dir(&lists).map_err(|e| BackendError::io("read dir", &lists, e))? {
            let entry = entry.map_err(|e| BackendError::io("read dir", &lists, e))?;
            tree::remove(&entry.path())?;
        }
        let run = staging.join("run/coppice");
        fs::create_dir_all(&run)
            .and_then(|()| fs::set_permissions(&run, fs::Permissions::from_mode(0o755)))
            .map_err(|e| BackendError::io("create", &run, e))?;

        progress(&format!("shifting file ownership by {}", self.uid_shift));
        shift_ownership(staging, self.uid_shift)?;
        tree::sync_filesystem(staging)?;
        Ok(mirror)
    }

    /// Moves the finished `staging` tree to its final name, then writes the marker.
    fn publish(
        &self,
        staging: &Path,
        mirror: &str,
        progress: &mut dyn FnMut(&str),
    ) -> Result<(), BackendError> {
        let path = self.path();
        if path.exists() {
            // A rebuild: swap atomically so the name always holds a complete tree; the old
            // tree ends up in `staging` and is removed by the caller.
            nix::fcntl::renameat2(
                None,
                staging,
                None,
                &path,
                nix::fcntl::RenameFlags::RENAME_EXCHANGE,
            )
            .map_err(|e| BackendError::io("exchange template with", &path, io::Error::from(e)))?;
        } else {
            fs::rename(staging, &path)
                .map_err(|e| BackendError::io("publish template", &path, e))?;
        }
        tree::fsync_dir(&self.cache_dir)?;
        let marker = Marker {
            recipe: RECIPE_VERSION,
            suite: SUITE.to_owned(),
            packages: self.packages(),
            uid_shift: self.uid_shift,
            mirror: mirror.to_owned(),
            built_unix: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let json = serde_json::to_vec_pretty(&marker)
            .map_err(|e| BackendError::io("serialize", self.marker_path(), io::Error::other(e)))?;
        tree::write_atomic(&self.marker_path(), &json)?;
        progress(&format!("template ready at {}", path.display()));
        Ok(())
    }
}

/// The first bookworm mirror named in the host's apt sources (deb822 `.sources` files or
/// one-line `sources.list`), skipping the security archive.
pub fn host_mirror() -> Option<String> {
    let mut texts = Vec::new();
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        texts.extend(paths.iter().filter_map(|p| fs::read_to_string(p).ok()));
    }
    texts.extend(fs::read_to_string("/etc/apt/sources.list").ok());
    texts.iter().find_map(|t| mirror_from_sources(t))
}

/// Parses apt sources in either format; see [`host_mirror`].
fn mirror_from_sources(text: &str) -> Option<String> {
    let usable = |uri: &str| {
        (uri.starts_with("http://") || uri.starts_with("https://")) && !uri.contains("security")
    };
    // deb822: paragraphs of `Key: value` lines separated by blank lines.
    for para in text.split("\n\n") {
        let field = |key: &str| {
            para.lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .find_map(|l| l.strip_prefix(key).map(str::trim))
        };
        if let (Some(uris), Some(suites)) = (field("URIs:"), field("Suites:")) {
            if suites.split_whitespace().any(|s| s == SUITE) {
                if let Some(uri) = uris.split_whitespace().find(|u| usable(u)) {
                    return Some(uri.trim_end_matches('/').to_owned());
                }
            }
        }
    }
    // One-line format: `deb [options] uri suite components...`.
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace().filter(|w| !w.starts_with('['));
        if words.next()? != "deb" {
            return None;
        }
        let uri = words.find(|w| !w.contains('='))?;
        (words.next()? == SUITE && usable(uri)).then(|| uri.trim_end_matches('/').to_owned())
    })
}

/// Whether `program` is on `PATH` or in the sbin directories root's `PATH` usually has.
fn installed(program: &str) -> bool {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|dir| dir.join(program).is_file())
}

/// apt-get waits this long for another apt or dpkg (an operator's, unattended-upgrades) to
/// release the package database instead of failing at once; well inside `command::INSTALL`.
const APT_LOCK_WAIT: [&str; 2] = ["-o", "DPkg::Lock::Timeout=300"];

/// Installs debootstrap from the host's Debian repositories when it is missing, so that a
/// fresh machine needs nothing else; elsewhere says what to install.
fn ensure_debootstrap(progress: &mut dyn FnMut(&str)) -> Result<(), BackendError> {
    if installed("debootstrap") {
        return Ok(());
    }
    if !installed("apt-get") || !nix::unistd::geteuid().is_root() {
        return Err(BackendError::Unsupported {
            op: "building the default template without debootstrap (install it)",
            os: std::env::consts::OS,
        });
    }
    progress("debootstrap is not installed; installing it with apt-get");
    let install = || {
        let mut cmd = Command::new("apt-get");
        cmd.args([
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "debootstrap",
        ])
        .args(APT_LOCK_WAIT)
        .env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    if command::stream(install(), command::INSTALL, progress).is_err() {
        // A fresh machine may have no package lists yet.
        let mut update = Command::new("apt-get");
        update.args(["update", "-q"]).args(APT_LOCK_WAIT);
        command::stream(update, command::INSTALL, progress)?;
        command::stream(install(), command::INSTALL, progress)?;
    }
    Ok(())
}

/// Runs `args` inside the chroot `root` with a clean, fixed environment.
fn in_chroot(root: &Path, args: &[&str]) -> Result<(), BackendError> {
    let mut cmd = Command::new("chroot");
    cmd.arg(root)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LC_ALL", "C")
        .env("DEBIAN_FRONTEND", "noninteractive");
    command::run(cmd, command::CHROOT_STEP)
}

/// Runs `apt-get args` inside the chroot `root`, with `/proc` mounted there in a mount and
/// PID namespace of its own (package scripts read it), so the mount vanishes with the
/// command however it ends and never lingers in the tree. Output goes to `progress`.
fn apt_in_chroot(
    root: &Path,
    args: &[&str],
    progress: &mut dyn FnMut(&str),
) -> Result<(), BackendError> {
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--pid", "--fork"])
        .arg(format!("--mount-proc={}", root.join("proc").display()))
        .arg("chroot")
        .arg(root)
        .arg("apt-get")
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LC_ALL", "C")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("DEBCONF_NONINTERACTIVE_SEEN", "true");
    command::stream(cmd, command::INSTALL, progress)
}

/// Writes `contents` to `rel` under `root` with `mode`, creating its parent directories.
fn write_file(root: &Path, rel: &str, contents: &str, mode: u32) -> Result<(), BackendError> {
    let path = root.join(rel);
    path.parent()
        .map_or(Ok(()), fs::create_dir_all)
        .and_then(|()| fs::write(&path, contents))
        .and_then(|()| fs::set_permissions(&path, fs::Permissions::from_mode(mode)))
        .map_err(|e| BackendError::io("write", &path, e))
}

/// `/etc/profile.d/coppice-e2b.sh`: the environment E2B's image gives login shells (its
/// `SHELL` and prompt, and the `LANG` of the `python` image it is built on).
const PROFILE: &str = "\
# Written by Coppice's template builder: what E2B's base image sets for login shells.
export SHELL=/bin/bash
export LANG=\"${LANG:-C.UTF-8}\"
export PS1='\\w \\$ '
";

/// Adds `shift` to the uid and gid of every file under `root` (not following symlinks), so
/// that sandbox root, host uid `shift`, owns what root owned. `chown` clears setuid and
/// setgid bits, so the original mode is put back afterwards (sudo stays setuid).
pub fn shift_ownership(root: &Path, shift: u32) -> Result<(), BackendError> {
    let root_dev = fs::symlink_metadata(root)
        .map_err(|e| BackendError::io("stat", root, e))?
        .dev();
    let mut seen = HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = fs::symlink_metadata(&path).map_err(|e| BackendError::io("stat", &path, e))?;
        if meta.dev() != root_dev {
            return Err(BackendError::InvalidSpec {
                field: "template tree",
                reason: format!("{} is another filesystem mounted inside it", path.display()),
            });
        }
        // A hard-linked inode is shifted once, however many names it has.
        if meta.nlink() > 1 && !meta.is_dir() && !seen.insert(meta.ino()) {
            continue;
        }
        let overflow = || BackendError::InvalidSpec {
            field: "uid shift",
            reason: format!("{shift} overflows the owner of {}", path.display()),
        };
        let uid = meta.uid().checked_add(shift).ok_or_else(overflow)?;
        let gid = meta.gid().checked_add(shift).ok_or_else(overflow)?;
        std::os::unix::fs::lchown(&path, Some(uid), Some(gid))
            .map_err(|e| BackendError::io("chown", &path, e))?;
        let mode = meta.mode() & 0o7777;
        if !meta.file_type().is_symlink() && mode & 0o6000 != 0 {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                .map_err(|e| BackendError::io("chmod", &path, e))?;
        }
        if meta.is_dir() {
            for entry in fs::read_dir(&path).map_err(|e| BackendError::io("read dir", &path, e))? {
                let entry = entry.map_err(|e| BackendError::io("read dir", &path, e))?;
                stack.push(entry.path());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_from_deb822_skips_security() {
        let text = "Types: deb\n# comment\nURIs: http://deb.debian.org/debian/\nSuites: bookworm bookworm-updates\nComponents: main\n\nTypes: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n";
        assert_eq!(
            mirror_from_sources(text).as_deref(),
            Some("http://deb.debian.org/debian")
        );
        let only_security = "URIs: http://security.debian.org/x\nSuites: bookworm-security\n";
        assert_eq!(mirror_from_sources(only_security), None);
    }

    #[test]
    fn mirror_from_one_line_sources() {
        let text =
            "# x\ndeb [arch=amd64 signed-by=/k] http://mirror.example/debian bookworm main\n";
        assert_eq!(
            mirror_from_sources(text).as_deref(),
            Some("http://mirror.example/debian")
        );
        assert_eq!(
            mirror_from_sources("deb http://mirror.example/debian trixie main\n"),
            None
        );
    }

    #[test]
    fn names_carry_recipe_and_shift() {
        let b = TemplateBuilder::new("/c", 100_000);
        assert_eq!(b.path(), Path::new("/c/debian-bookworm-base-v2-u100000"));
        assert_ne!(TemplateBuilder::new("/c", 0).name(), b.name());
    }

    #[test]
    fn flavors_add_packages_under_their_own_name() {
        let b = TemplateBuilder::new("/c", 100_000)
            .with_flavor("code-interpreter-v1", &["python3-numpy", "python3-pandas"]);
        assert_eq!(b.name(), "debian-bookworm-code-interpreter-v1-v2-u100000");
        let packages = b.packages();
        assert!(packages.iter().any(|p| p == "sudo"));
        assert!(packages.ends_with(&["python3-numpy".to_owned(), "python3-pandas".to_owned()]));
        assert_eq!(
            TemplateBuilder::new("/c", 1)
                .with_flavor("Odd/Name", &[])
                .name(),
            "debian-bookworm-odd-name-v2-u1"
        );
    }

    #[test]
    fn the_build_time_comes_from_a_complete_marker_of_the_same_recipe() {
        let dir = tempfile::tempdir().unwrap();
        let b = TemplateBuilder::new(dir.path(), 7);
        assert_eq!(b.built_at(), None);
        let marker = |packages: Vec<String>| Marker {
            recipe: RECIPE_VERSION,
            suite: SUITE.to_owned(),
            packages,
            uid_shift: 7,
            mirror: DEFAULT_MIRROR.to_owned(),
            built_unix: 1_700_000_000,
        };
        let write = |m: &Marker| fs::write(b.marker_path(), serde_json::to_vec(m).unwrap());
        write(&marker(b.packages())).unwrap();
        // A marker without its tree is no build.
        assert_eq!(b.built_at(), None);
        fs::create_dir(b.path()).unwrap();
        assert_eq!(b.built_at(), Some(1_700_000_000));
        // Another recipe's marker under the same name is not this build.
        write(&marker(vec!["bash".into()])).unwrap();
        assert_eq!(b.built_at(), None);
    }

    #[test]
    fn recipe_keys_differ_by_packages_and_shift() {
        let base = TemplateBuilder::new("/c", 1);
        let more = TemplateBuilder::new("/c", 1).with_flavor("base", &["r-base-core"]);
        assert_eq!(base.name(), more.name());
        assert_ne!(base.recipe_key(), more.recipe_key());
        assert_ne!(
            base.recipe_key(),
            TemplateBuilder::new("/c", 2).recipe_key()
        );
        assert_eq!(
            base.recipe_key(),
            TemplateBuilder::new("/other", 1).recipe_key()
        );
    }

    #[test]
    #[allow(clippy::print_stdout)] // SKIP lines go to stdout.
    fn shift_keeps_setuid_and_counts_hard_links_once() {
        if !nix::unistd::geteuid().is_root() {
            println!("SKIP shift_keeps_setuid_and_counts_hard_links_once: needs root for chown");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        let suid = root.join("sudo");
        fs::write(&suid, b"x").unwrap();
        fs::set_permissions(&suid, fs::Permissions::from_mode(0o4755)).unwrap();
        fs::hard_link(&suid, root.join("sudo-link")).unwrap();
        std::os::unix::fs::symlink("sudo", root.join("link")).unwrap();
        std::os::unix::fs::lchown(root.join("link"), Some(5), Some(6)).unwrap();
        shift_ownership(&root, 100_000).unwrap();
        let m = fs::metadata(&suid).unwrap();
        assert_eq!((m.uid(), m.gid()), (100_000, 100_000));
        assert_eq!(m.mode() & 0o7777, 0o4755);
        let l = fs::symlink_metadata(root.join("link")).unwrap();
        assert_eq!((l.uid(), l.gid()), (100_005, 100_006));
        assert_eq!(fs::metadata(&root).unwrap().uid(), 100_000);
    }
}
