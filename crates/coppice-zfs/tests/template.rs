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

    for exe in ["bin/bash", "usr/bin/python3", "usr/bin/ps", "usr/bin/sudo"] {
        let m = fs::metadata(root.join(exe)).unwrap();
        assert!(
            m.is_file() && m.mode() & 0o111 != 0,
            "{exe} is not executable"
        );
    }
    assert!(root.join("etc/ssl/certs/ca-certificates.crt").exists());

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
