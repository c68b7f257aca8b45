//! `cargo xtask ci`: everything CI does, runnable on a fresh machine of our kind (root,
//! Debian, Rust toolchain present).

use std::process::Command;

use crate::run_cmd;

/// Debian packages the tests use:
/// - debootstrap builds the default template;
/// - zfs-fuse gives the storage role's zfs driver a real `zfs`/`zpool` without a kernel module;
/// - bubblewrap is a start-time baseline for benchmarks;
/// - python3 and python3-matplotlib let the code interpreter's figure test run against
///   Debian's python, the one sandbox templates carry;
/// - python3-ipython: the interpreter's IPython shell, tested in the agent's own tests;
/// - python3-pandas: DataFrame results (`data`) in the agent's interpreter tests;
/// - python3-pip: `%pip install` of a local wheel in the agent's interpreter tests;
/// - python3-venv lets `e2e` make the venv the E2B Python SDKs are installed into;
/// - nodejs and npm run the E2B JS SDK suite (`tests/e2e-js`) and the agent's javascript
///   contexts in its tests (an installed Node.js that provides `npm` itself, as NodeSource's
///   does, is kept: see [`provided`]);
/// - node-acorn: the parser the agent's javascript driver rewrites cells with, in its tests;
/// - node-typescript: the `tsc` the agent's typescript contexts transpile with in its tests;
/// - r-base-core: the R the agent's `r` contexts run, in its tests;
/// - default-jdk-headless: the JShell behind the agent's `java` contexts, in its tests;
/// - nftables is the `nft` the network role loads its ruleset with, and iproute2 the `ip`
///   that network tests build their fake internet with;
/// - skopeo is how the gateway pulls `fromImage` images (and how tests push theirs),
///   docker-registry the registry those tests run in a namespace of their own, and
///   apache2-utils the `htpasswd` that gives one of them a password;
/// - chromium: the headless browser `tests/e2e-js/dashboard.test.mjs` drives the dashboard in.
const DEBIAN_PACKAGES: &[&str] = &[
    "debootstrap",
    "zfs-fuse",
    "bubblewrap",
    "python3",
    "python3-matplotlib",
    "python3-ipython",
    "python3-pandas",
    "python3-pip",
    "python3-venv",
    "nodejs",
    "npm",
    "node-acorn",
    "node-typescript",
    "r-base-core",
    "default-jdk-headless",
    "nftables",
    "iproute2",
    "chromium",
    "skopeo",
    "docker-registry",
    "apache2-utils",
];

/// The cargo-deny release CI pins.
const CARGO_DENY_VERSION: &str = "0.20.2";

pub(crate) fn run(args: &[&str]) -> Result<(), String> {
    let install = !args.contains(&"--no-install");
    if install {
        install_debian_packages(DEBIAN_PACKAGES)?;
        install_cargo_deny()?;
    }
    run_cmd("cargo", &["fmt", "--all", "--", "--check"])?;
    run_cmd(
        "cargo",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    prepare_templates()?;
    run_cmd("cargo", &["test", "--workspace", "--no-fail-fast"])?;
    // The unmodified E2B SDKs against a real gateway (pip needs PyPI).
    crate::e2e::run(&[])?;
    // The advisory database lives on GitHub, which our machines cannot reach; bans, licenses
    // and sources need nothing but the lock file.
    run_cmd("cargo", &["deny", "check", "bans", "licenses", "sources"])?;
    eprintln!("xtask ci: all checks passed");
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Whether an installed package `Provides` `package`: NodeSource's `nodejs` provides (and
/// conflicts with) `npm`, and installing Debian's npm would replace that Node.js with
/// Debian's older one.
fn provided(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}\t${Provides}\n"])
        .output()
        .map(|o| provides(&String::from_utf8_lossy(&o.stdout), package))
        .unwrap_or(false)
}

/// Whether a line of `dpkg-query -W -f='${Status}\t${Provides}\n'` output is an installed
/// package providing `package` (`Provides: a, b (= 1.0)`).
fn provides(listing: &str, package: &str) -> bool {
    listing.lines().any(|line| {
        let Some((status, provides)) = line.split_once('\t') else {
            return false;
        };
        status.contains("install ok installed")
            && provides
                .split(',')
                .filter_map(|p| p.split_whitespace().next())
                .any(|p| p == package || p.split_once(':').is_some_and(|(n, _)| n == package))
    })
}

/// Builds every sandbox template into the cache the tests share, once, before the tests:
/// `code-interpreter-v1` takes minutes, and a gateway test that starts it in the background
/// would only be stopped halfway, again by every following test.
fn prepare_templates() -> Result<(), String> {
    if !is_root() {
        eprintln!(
            "xtask ci: not root, templates are not prepared; tests that need them print SKIP"
        );
        return Ok(());
    }
    let cache = std::env::var("COPPICE_TEMPLATE_CACHE")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "/var/cache/coppice/templates".to_owned());
    run_cmd(
        "cargo",
        &[
            "run",
            "-q",
            "-p",
            "coppice-gateway",
            "--",
            "--prepare-templates",
            "true",
            "--template-cache",
            &cache,
        ],
    )
}

/// Installs those of `packages` that are missing (as root; otherwise says why not).
pub(crate) fn install_debian_packages(packages: &[&str]) -> Result<(), String> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !installed(p) && !provided(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        eprintln!(
            "xtask ci: not root, cannot install {}; tests that need them will print SKIP",
            missing.join(" ")
        );
        return Ok(());
    }
    // Wait for another apt or dpkg (unattended-upgrades on a fresh machine) instead of failing.
    let lock_wait = ["-o", "DPkg::Lock::Timeout=300"];
    run_cmd("apt-get", &["update", "-qq", lock_wait[0], lock_wait[1]])?;
    // `--no-remove`: a package that conflicts with something installed must fail the run,
    // not remove what the machine had.
    let mut args = vec![
        "install",
        "-y",
        "-qq",
        "--no-install-recommends",
        "--no-remove",
    ];
    args.extend(lock_wait);
    args.extend(missing);
    run_cmd("apt-get", &args)
}

fn install_cargo_deny() -> Result<(), String> {
    let have = Command::new("cargo")
        .args(["deny", "--version"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_DENY_VERSION))
        .unwrap_or(false);
    if have {
        return Ok(());
    }
    run_cmd(
        "cargo",
        &[
            "install",
            "cargo-deny",
            "--locked",
            "--version",
            CARGO_DENY_VERSION,
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provides_reads_dpkg_query_lines() {
        let listing = "install ok installed\tnodejs-dev, nodejs-doc, npm\n\
                       install ok installed\t\n\
                       deinstall ok config-files\tfoo\n\
                       install ok installed\tpython3-foo (= 1.0), bar:any\n";
        assert!(provides(listing, "npm"));
        assert!(provides(listing, "python3-foo"));
        assert!(provides(listing, "bar"));
        assert!(!provides(listing, "foo"), "not installed any more");
        assert!(
            !provides(listing, "nodejs"),
            "a package is not its own provider"
        );
        assert!(!provides("garbage\n", "npm"));
    }
}
