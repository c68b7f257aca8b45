//! The default template, built (or loaded) through the per-machine cache every crate's tests
//! share.

// Integration tests are a test crate of their own: no `mod tests` wrapper, and SKIP lines
// and build progress go to stdout.
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::tests_outside_test_module,
    clippy::print_stdout
)]

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use coppice_zfs::template::{default_cache_dir, TemplateBuilder};

const SHIFT: u32 = 100_000;

#[test]
fn default_template_has_the_e2b_base_image_contents() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP default_template_has_the_e2b_base_image_contents: needs root");
        return;
    }
    let builder = TemplateBuilder::new(default_cache_dir(), SHIFT);
    let root = builder
        .ensure(false, &mut |line| println!("template: {line}"))
        .unwrap();
    assert_eq!(root, builder.path());
    assert!(builder.is_cached());

    // What E2B's base image gives its users (`python` is a command there too); running them
    // is coppice-jail's `tests/template.rs`, inside a sandbox, so the shared cache is never
    // written to.
    for exe in [
        "bin/bash",
        "usr/bin/python3",
        "usr/bin/python",
        "usr/bin/pip",
        "usr/bin/pip3",
        "usr/bin/node",
        "usr/bin/npm",
        "usr/bin/git",
        "usr/bin/curl",
        "usr/bin/wget",
        "usr/bin/gcc",
        "usr/bin/g++",
        "usr/bin/make",
        "usr/bin/gh",
        "usr/bin/ps",
        "usr/bin/sudo",
    ] {
        let m = fs::metadata(root.join(exe)).unwrap_or_else(|e| panic!("{exe}: {e}"));
        assert!(
            m.is_file() && m.mode() & 0o111 != 0,
            "{exe} is not executable"
        );
    }
    assert!(root.join("etc/ssl/certs/ca-certificates.crt").exists());
    assert!(root.join("usr/include/python3.11/Python.h").exists());
    assert_eq!(
        fs::read_to_string(root.join("etc/pip.conf")).unwrap(),
        "[global]\nbreak-system-packages = true\n"
    );
    let profile = fs::read_to_string(root.join("etc/profile.d/coppice-e2b.sh")).unwrap();
    assert!(profile.contains("export SHELL=/bin/bash"), "{profile}");
    assert!(profile.contains("C.UTF-8"), "{profile}");
    for dir in ["code", "usr/local", "usr/local/bin", "usr/local/lib"] {
        let m = fs::metadata(root.join(dir)).unwrap();
        assert_eq!(
            m.mode() & 0o777,
            0o777,
            "/{dir} is not writable by everyone"
        );
    }
    // The jail does not translate file capabilities, so no file may carry one.
    assert_eq!(files_with_capabilities(&root), Vec::<PathBuf>::new());

    // Everything root owned is owned by the shifted root, and sudo is still setuid.
    let sudo = fs::metadata(root.join("usr/bin/sudo")).unwrap();
    assert_eq!((sudo.uid(), sudo.gid()), (SHIFT, SHIFT));
    assert_eq!(sudo.mode() & 0o4000, 0o4000, "sudo lost its setuid bit");
    assert_eq!(fs::metadata(&root).unwrap().uid(), SHIFT);

    let passwd = fs::read_to_string(root.join("etc/passwd")).unwrap();
    let user: Vec<&str> = passwd
        .lines()
        .find(|l| l.starts_with("user:"))
        .expect("no user in /etc/passwd")
        .split(':')
        .collect();
    assert_eq!(user[2..], ["1000", "1000", "", "/home/user", "/bin/bash"]);
    let group = fs::read_to_string(root.join("etc/group")).unwrap();
    let sudo_members = group
        .lines()
        .find_map(|l| l.strip_prefix("sudo:"))
        .and_then(|l| l.rsplit(':').next())
        .expect("no sudo group");
    assert!(
        sudo_members.split(',').any(|m| m == "user"),
        "user is not in group sudo: {sudo_members:?}"
    );
    // An empty password, as E2B's user has, not a locked one.
    let shadow = fs::read_to_string(root.join("etc/shadow")).unwrap();
    let user_shadow: Vec<&str> = shadow
        .lines()
        .find(|l| l.starts_with("user:"))
        .expect("no user in /etc/shadow")
        .split(':')
        .collect();
    assert_eq!(user_shadow[1], "", "user's password is not empty");
    let home = fs::metadata(root.join("home/user")).unwrap();
    assert_eq!((home.uid(), home.gid()), (SHIFT + 1000, SHIFT + 1000));

    let sudoers = root.join("etc/sudoers.d/user");
    assert_eq!(
        fs::read_to_string(&sudoers).unwrap(),
        "user ALL=(ALL:ALL) NOPASSWD: ALL\n"
    );
    let s = fs::metadata(&sudoers).unwrap();
    assert_eq!(s.mode() & 0o7777, 0o440);
    assert_eq!(s.uid(), SHIFT);

    assert!(root.join("run/coppice").is_dir());
    for dir in ["proc", "dev", "sys", "tmp"] {
        assert!(root.join(dir).is_dir(), "/{dir} missing");
    }
    assert_eq!(
        fs::read_dir(root.join("var/lib/apt/lists"))
            .unwrap()
            .count(),
        0,
        "apt lists were not removed"
    );

    // A second call finds the cache and does not build again.
    let mut lines = Vec::new();
    let again = builder
        .ensure(false, &mut |line| lines.push(line.to_owned()))
        .unwrap();
    assert_eq!(again, root);
    assert!(lines.is_empty(), "cached template was rebuilt: {lines:?}");
}

/// Files under `root` (not following symlinks) that carry a `security.capability` xattr.
fn files_with_capabilities(root: &Path) -> Vec<PathBuf> {
    let name = c"security.capability";
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                let path =
                    std::ffi::CString::new(entry.path().as_os_str().as_encoded_bytes()).unwrap();
                // SAFETY: both strings are NUL-terminated and a null buffer of size 0 only
                // asks for the value's length.
                let len = unsafe {
                    libc::lgetxattr(path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0)
                };
                if len >= 0 {
                    found.push(entry.path());
                }
            }
        }
    }
    found
}
