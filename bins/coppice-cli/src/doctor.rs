//! `coppice doctor`: what the host has of what sandboxes need, each with the fix.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use http::Method;
use serde_json::{json, Value};

use crate::args::Invocation;
use crate::client::{expect_json, Client};
use crate::output::{self, table};
use crate::{EXIT_FAILED, EXIT_OK};

/// A helper program or a name lookup may take this long.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Ok,
    Warn,
    Fail,
}

impl Verdict {
    fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Warn => "warn",
            Self::Fail => "FAIL",
        }
    }
}

struct Check {
    name: &'static str,
    verdict: Verdict,
    detail: String,
}

fn check(name: &'static str, verdict: Verdict, detail: impl Into<String>) -> Check {
    Check {
        name,
        verdict,
        detail: detail.into(),
    }
}

/// Runs every check; fails when one of them fails (a warning is a limit, not a failure).
pub(crate) fn run(
    inv: &Invocation,
    state_dir: Option<&str>,
    out: &mut dyn Write,
) -> Result<u8, String> {
    let state_dir = PathBuf::from(state_dir.unwrap_or("/var/lib/coppice"));
    let checks = [
        gateway(inv),
        user_namespaces(),
        cgroups(Path::new("/sys/fs/cgroup")),
        overlay(),
        nftables(),
        sandbox_names(),
        tls_trust(&state_dir),
    ];
    let failed = checks.iter().any(|c| c.verdict == Verdict::Fail);
    let written = if inv.json {
        let v: Vec<Value> = checks
            .iter()
            .map(|c| json!({ "check": c.name, "verdict": c.verdict.as_str().to_lowercase(), "detail": c.detail }))
            .collect();
        output::json(out, &Value::Array(v))
    } else {
        let rows: Vec<Vec<String>> = checks
            .iter()
            .map(|c| {
                vec![
                    c.name.to_owned(),
                    c.verdict.as_str().to_owned(),
                    c.detail.clone(),
                ]
            })
            .collect();
        table(out, &["CHECK", "RESULT", "DETAIL"], &rows, "")
    };
    written.map_err(|e| format!("writing the output: {e}"))?;
    Ok(if failed { EXIT_FAILED } else { EXIT_OK })
}

fn gateway(inv: &Invocation) -> Check {
    let answer = Client::new(&inv.url, inv.api_key.clone()).and_then(|c| {
        let reply = c.call(Method::GET, "/health", None)?;
        if reply.status.as_u16() == 503 {
            let v: Value = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
            return Ok(check(
                "gateway",
                Verdict::Warn,
                format!("{} answers but is not ready: {v}", inv.url),
            ));
        }
        let v = expect_json(&Method::GET, "/health", &reply)?;
        let templates = v.get("templates").map(Value::to_string).unwrap_or_default();
        Ok(check(
            "gateway",
            Verdict::Ok,
            format!("{} is up; templates {templates}", inv.url),
        ))
    });
    answer.unwrap_or_else(|e| {
        check(
            "gateway",
            Verdict::Fail,
            format!("{e} (start it: coppice-gateway)"),
        )
    })
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

fn user_namespaces() -> Check {
    match read_trimmed("/proc/sys/user/max_user_namespaces").and_then(|s| s.parse::<u64>().ok()) {
        Some(0) => check(
            "user namespaces",
            Verdict::Fail,
            "user.max_user_namespaces is 0: sysctl -w user.max_user_namespaces=65536",
        ),
        Some(n) => check("user namespaces", Verdict::Ok, format!("up to {n}")),
        None => check(
            "user namespaces",
            Verdict::Fail,
            "the kernel has no user namespaces (CONFIG_USER_NS)",
        ),
    }
}

/// cgroup v2 (unified) or v1 with the controllers the jail uses.
fn cgroups(root: &Path) -> Check {
    if root.join("cgroup.controllers").exists() {
        let controllers =
            std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        let missing: Vec<&str> = ["cpu", "memory", "pids"]
            .into_iter()
            .filter(|c| !controllers.split_whitespace().any(|x| x == *c))
            .collect();
        return if missing.is_empty() {
            check(
                "cgroups",
                Verdict::Ok,
                "v2 (unified) with cpu, memory and pids",
            )
        } else {
            check(
                "cgroups",
                Verdict::Fail,
                format!("v2 without {}", missing.join(", ")),
            )
        };
    }
    let missing: Vec<&str> = ["memory", "pids", "freezer", "cpu"]
        .into_iter()
        .filter(|c| !root.join(c).join("cgroup.procs").exists())
        .collect();
    if missing.is_empty() {
        check(
            "cgroups",
            Verdict::Ok,
            "v1 with memory, pids, freezer and cpu",
        )
    } else {
        check(
            "cgroups",
            Verdict::Fail,
            format!(
                "no cgroup v2 at {} and v1 lacks {}",
                root.display(),
                missing.join(", ")
            ),
        )
    }
}

fn overlay() -> Check {
    let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if fs
        .lines()
        .any(|l| l.split_whitespace().last() == Some("overlay"))
    {
        check("overlayfs", Verdict::Ok, "available")
    } else {
        check(
            "overlayfs",
            Verdict::Fail,
            "not in /proc/filesystems: modprobe overlay (the overlay storage driver needs it)",
        )
    }
}

/// Runs `program args` with [`CHECK_TIMEOUT`]; its first line of output, or why not.
fn run_helper(program: &str, args: &[&str]) -> Result<String, String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("{program}: {e}"))?;
    let deadline = Instant::now() + CHECK_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut text = String::new();
                if let Some(mut o) = child.stdout.take() {
                    let _ = std::io::Read::read_to_string(&mut o, &mut text);
                }
                return if status.success() {
                    Ok(text.lines().next().unwrap_or_default().trim().to_owned())
                } else {
                    Err(format!("{program} exited with {status}"))
                };
            }
            Ok(None) if Instant::now() < deadline => {
                #[allow(
                    clippy::disallowed_methods,
                    reason = "a plain thread of a command-line program, no async runtime here"
                )]
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{program} did not answer within {}s",
                    CHECK_TIMEOUT.as_secs()
                ));
            }
            Err(e) => return Err(format!("{program}: {e}")),
        }
    }
}

fn nftables() -> Check {
    match run_helper("nft", &["--version"]) {
        Ok(v) => check("nftables", Verdict::Ok, v),
        Err(e) => check(
            "nftables",
            Verdict::Warn,
            format!("{e}: sandbox networking needs it (apt-get install nftables), or run the gateway with --sandbox-network off"),
        ),
    }
}

/// Whether `<port>-<id>.localhost`, the names `get_host` gives without `--domain`, resolve
/// here. The lookup runs on a thread of its own so a stuck resolver cannot hang the check.
fn sandbox_names() -> Check {
    let name = "49983-doctor.localhost";
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = std::net::ToSocketAddrs::to_socket_addrs(&(name, 80u16))
            .map(|a| a.map(|s| s.ip()).collect::<Vec<_>>());
        let _ = tx.send(r);
    });
    match rx.recv_timeout(CHECK_TIMEOUT) {
        Ok(Ok(ips)) if !ips.is_empty() && ips.iter().all(std::net::IpAddr::is_loopback) => {
            check("sandbox host names", Verdict::Ok, format!("{name} resolves to loopback"))
        }
        Ok(Ok(ips)) => check(
            "sandbox host names",
            Verdict::Warn,
            format!("{name} resolves to {ips:?}, not loopback"),
        ),
        Ok(Err(e)) => check(
            "sandbox host names",
            Verdict::Warn,
            format!("{name} does not resolve ({e}): get_host() URLs need *.localhost to resolve to 127.0.0.1 (systemd-resolved does), or --domain with wildcard DNS; the E2b-Sandbox-* headers work regardless"),
        ),
        Err(_) => check(
            "sandbox host names",
            Verdict::Warn,
            format!("looking up {name} took over {}s", CHECK_TIMEOUT.as_secs()),
        ),
    }
}

/// Whether the gateway's local CA (`<state-dir>/tls/ca.pem`) is in the system's trust store.
fn tls_trust(state_dir: &Path) -> Check {
    let ca = state_dir.join("tls").join("ca.pem");
    let Ok(pem) = std::fs::read_to_string(&ca) else {
        return check(
            "TLS trust",
            Verdict::Warn,
            format!(
                "no local CA at {} (is --state-dir right? a gateway with --tls-cert has none)",
                ca.display()
            ),
        );
    };
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let bundle = std::fs::read_to_string("/etc/ssl/certs/ca-certificates.crt").unwrap_or_default();
    let bundle: String = bundle.lines().filter(|l| !l.starts_with("-----")).collect();
    if !body.is_empty() && bundle.contains(&body) {
        check(
            "TLS trust",
            Verdict::Ok,
            format!("{} is trusted", ca.display()),
        )
    } else {
        check(
            "TLS trust",
            Verdict::Warn,
            format!(
                "{} is not in the system trust store: cp {} /usr/local/share/ca-certificates/coppice.crt && update-ca-certificates (https:// SDK URLs need it)",
                ca.display(),
                ca.display()
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_layouts_are_told_apart() {
        let dir = std::env::temp_dir().join(format!("coppice-doctor-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cgroup.controllers"), "cpu io memory pids\n").unwrap();
        assert_eq!(cgroups(&dir).verdict, Verdict::Ok);
        std::fs::write(dir.join("cgroup.controllers"), "cpu io\n").unwrap();
        let c = cgroups(&dir);
        assert_eq!(c.verdict, Verdict::Fail);
        assert!(c.detail.contains("memory, pids"), "{}", c.detail);
        std::fs::remove_file(dir.join("cgroup.controllers")).unwrap();
        for c in ["memory", "pids", "freezer"] {
            std::fs::create_dir_all(dir.join(c)).unwrap();
            std::fs::write(dir.join(c).join("cgroup.procs"), "").unwrap();
        }
        let c = cgroups(&dir);
        assert_eq!(c.verdict, Verdict::Fail);
        assert!(c.detail.ends_with("lacks cpu"), "{}", c.detail);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn helpers_that_hang_are_cut_off() {
        let t = Instant::now();
        let e = run_helper("sleep", &["30"]).unwrap_err();
        assert!(e.contains("did not answer"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(15));
        assert_eq!(run_helper("echo", &["hi"]).unwrap(), "hi");
        run_helper("/nonexistent/program", &[]).unwrap_err();
    }
}
