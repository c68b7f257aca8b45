//! The default template's contents at work inside a real sandbox: every command E2B's base
//! image gives its users runs as `user` (through a login shell, as the SDK's commands do),
//! and the package managers and the compiler work offline, as they would on E2B.
//!
//! Prints `SKIP <name>: <reason>` without root, namespaces, overlayfs or cgroups.
#![cfg(target_os = "linux")]
// An integration test crate: no `mod tests` wrapper, helpers may unwrap, skip lines must reach
// the test output, and the test runs on a plain thread.
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::tests_outside_test_module,
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::disallowed_methods
)]

use std::fmt::Write as _;

use coppice_lifecycle::backend::Limits;
use support::{answer, World};

mod support;

/// Each check: a file name, the command `user` runs in a login shell in its home, and what
/// its output must start with.
const CHECKS: &[(&str, &str, &str)] = &[
    ("python", "python --version", "Python 3.11."),
    ("python3", "python3 --version", "Python 3.11."),
    ("pip", "pip --version", "pip "),
    ("pip3", "pip3 --version", "pip "),
    ("venv", "python -m venv --help | head -n 1", "usage: venv"),
    ("node", "node --version", "v"),
    ("npm", "npm --version", ""),
    ("git", "git --version", "git version 2."),
    ("curl", "curl --version", "curl 7."),
    ("wget", "wget --version", "GNU Wget"),
    ("gcc", "gcc --version", "gcc "),
    ("gxx", "g++ --version", "g++ "),
    ("make", "make --version", "GNU Make"),
    ("ps", "ps --version", "ps from procps-ng"),
    ("sudo", "sudo -n whoami", "root"),
    ("gh", "gh --version", "gh version"),
    ("ssl", "python -c 'import ssl, sqlite3, ctypes; print(ssl.OPENSSL_VERSION)'", "OpenSSL 3."),
    // The environment E2B's image gives a login shell.
    ("env", "echo \"$HOME $SHELL $LANG $(pwd) $(id -nG)\"", "/home/user /bin/bash C.UTF-8 /home/user user sudo"),
    // E2B's /usr/local and /code are writable by everyone.
    ("writable", "touch /usr/local/bin/probe /code/probe && echo yes", "yes"),
    // A C program compiles and runs.
    (
        "cc",
        "mkdir -p cc && echo '#include <stdio.h>' > cc/h.c && echo 'int main(void) { printf(\"%d\\n\", 6 * 7); return 0; }' >> cc/h.c && cc -o cc/h cc/h.c && ./cc/h",
        "42",
    ),
    // pip installs a local project as `user` (PEP 668's refusal is turned off, as on E2B),
    // with the build backend already installed: the sandbox has no network.
    (
        "pip_install",
        "mkdir -p pkg && printf '[build-system]\\nrequires = [\"setuptools\"]\\nbuild-backend = \"setuptools.build_meta\"\\n[project]\\nname = \"coppice_probe\"\\nversion = \"0.1\"\\n' > pkg/pyproject.toml && echo 'ANSWER = 42' > pkg/coppice_probe.py && pip install -q --no-index --no-build-isolation ./pkg >/dev/null 2>&1 && cd / && python -c 'import coppice_probe; print(coppice_probe.ANSWER)'",
        "42",
    ),
    // npm installs a local package offline, and node imports it as an ES module.
    (
        "npm_install",
        "mkdir -p lib app && echo '{\"name\":\"coppice-lib\",\"version\":\"1.0.0\",\"type\":\"module\",\"exports\":\"./index.js\"}' > lib/package.json && echo 'export const answer = 6 * 7' > lib/index.js && cd app && echo '{\"name\":\"app\",\"version\":\"1.0.0\",\"type\":\"module\",\"private\":true}' > package.json && npm install --offline --no-audit --no-fund ../lib >/dev/null 2>&1 && node --input-type=module -e \"import { answer } from 'coppice-lib'; console.log(await Promise.resolve(answer))\"",
        "42",
    ),
    (
        "git_commit",
        "git init -q -b main repo && cd repo && echo hi > f && git add f && git -c user.name=C -c user.email=c@example.com commit -q -m first && git log --format=%s",
        "first",
    ),
];

#[test]
fn the_base_image_commands_work_as_user() {
    let Some(w) = World::new("the_base_image_commands_work_as_user") else {
        return;
    };
    // The gateway writes the sandbox's name into /etc/hosts (`names.rs`); without it sudo
    // warns that it cannot resolve its host on every call.
    let mut script = String::from("echo \"127.0.1.1 $(hostname)\" >> /etc/hosts\n");
    for (name, command, _) in CHECKS {
        // `sudo -u user -i` would need a tty for nothing; `-H` and a login shell give what
        // envd gives: the user's home, its environment, and /etc/profile.d.
        let quoted = command.replace('\'', "'\\''");
        writeln!(
            script,
            "(cd /home/user && sudo -u user -H bash -lc '{quoted}') > /run/coppice/{name}.out 2>&1; echo $? > /run/coppice/{name}.rc"
        )
        .unwrap();
    }
    let ex = w.start("template1", &script, Limits::default());
    let mut failures = Vec::new();
    // In the order the script writes them, so each check has the whole answer deadline.
    for (name, command, expected) in CHECKS {
        let rc = answer(&ex, &format!("{name}.rc"));
        let out = answer(&ex, &format!("{name}.out"));
        if rc.trim() != "0" || !out.starts_with(expected) {
            failures.push(format!(
                "`{command}` exited {} with {out:?}, wanted output starting {expected:?}",
                rc.trim()
            ));
        }
    }
    w.kill("template1");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
