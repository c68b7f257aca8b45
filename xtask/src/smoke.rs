//! `cargo xtask smoke <name>`: receipts that a feature works as a user of the real SDK sees
//! it, with the timings of the run, written under `benchmarks/results/<receipt>/<date>.json`.
//!
//! - `lifecycle`: `tests/smoke/lifecycle.py` against a release gateway on loopback (with an
//!   API key, a fresh state dir, the shared template cache): a sandbox with
//!   `on_timeout: pause` and `auto_resume` goes idle until it is paused, then a command through
//!   the SDK wakes it; the script checks the command, the file it left, the states, the
//!   `resumed_total` counter and the events. The receipt goes to
//!   `benchmarks/results/auto-suspend-resume/`.
//!
//! Needs root, as the gateway does; otherwise it prints `SKIP` and succeeds.

use std::fs;
use std::path::Path;
use std::process::Command;

use crate::e2e::{self, Phase};
use crate::project_root;

/// The receipts `cargo xtask smoke` knows.
pub(crate) const NAMES: &[&str] = &["lifecycle"];

pub(crate) fn run(name: &str) -> Result<(), String> {
    match name {
        "lifecycle" => lifecycle(),
        _ => Err(format!(
            "unknown smoke receipt {name:?}; known: {}",
            NAMES.join(", ")
        )),
    }
}

fn lifecycle() -> Result<(), String> {
    if !e2e::is_root() {
        eprintln!("SKIP xtask smoke lifecycle: needs root (the gateway runs sandboxes in jails)");
        return Ok(());
    }
    let root = project_root();
    let target = e2e::target_dir();
    let python = e2e::ensure_venv(&root, &target)?;
    crate::run_cmd(
        env!("CARGO"),
        &["build", "--release", "-p", "coppice-gateway"],
    )?;
    let gateway = target.join("release/coppice-gateway");
    let keys = [e2e::random_key()?, e2e::random_key()?];
    let phase = Phase {
        name: "smoke-lifecycle",
        keys: Some(&keys),
        pytest: Vec::new(),
        node: Vec::new(),
    };
    let date = crate::bench::today()?;
    let dir = root.join("benchmarks/results/auto-suspend-resume");
    fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let receipt = dir.join(format!("{date}.json"));
    let log_path = target.join("smoke-lifecycle-gateway.log");
    let mut gw = e2e::Gateway::start(&gateway, &phase, &log_path)?;
    let outcome = gw
        .wait_healthy()
        .and_then(|()| run_script(&python, gw.port, &keys[0], &receipt));
    let cleanup = gw.shutdown(&keys[0]);
    if outcome.is_err() || cleanup.is_err() {
        e2e::print_tail(&log_path);
    }
    outcome.and(cleanup)?;
    eprintln!("xtask smoke lifecycle: receipt {}", receipt.display());
    Ok(())
}

fn run_script(python: &Path, port: u16, api_key: &str, receipt: &Path) -> Result<(), String> {
    let url = format!("http://127.0.0.1:{port}");
    let status = Command::new(python)
        .arg("tests/smoke/lifecycle.py")
        .arg(receipt)
        .current_dir(project_root())
        .env("E2B_API_URL", &url)
        .env("E2B_SANDBOX_URL", &url)
        .env("E2B_API_KEY", api_key)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("E2B_DEBUG")
        .env_remove("E2B_DOMAIN")
        .env_remove("E2B_ACCESS_TOKEN")
        .status()
        .map_err(|e| format!("cannot run tests/smoke/lifecycle.py: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "tests/smoke/lifecycle.py failed ({status}); see {}",
            receipt.display()
        ))
    }
}
