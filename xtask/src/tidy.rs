//! Repository rules written as code: every crate documents its job, inherits the workspace
//! lints, and depends only downward.

use std::fs;
use std::path::Path;
use std::process::Command;

/// Layers of the architecture; a crate may depend only on crates of a lower layer.
const LAYERS: &[(&str, u8)] = &[
    ("coppice-wire", 0),
    ("coppice-lifecycle", 1),
    ("coppice-events", 2),
    ("coppice-jail", 2),
    ("coppice-bhyve", 2),
    ("coppice-zfs", 2),
    ("coppice-net", 2),
    ("coppice-envd", 3),
    ("coppice-gateway", 4),
    ("coppice-envd-bin", 4),
    ("coppice-cli", 4),
];

/// Test and bench targets may compose sibling backends (a jail test needs a real rootfs
/// from storage); those edges are allowed for dev-dependencies only, and listed here.
const DEV_EDGES: &[(&str, &str)] = &[
    ("coppice-jail", "coppice-zfs"),
    // The CLI's tests drive it in-process against a real gateway from the gateway's lab.
    ("coppice-gateway", "coppice-cli"),
];

pub(crate) fn run(root: &Path) -> Result<(), String> {
    let problems = check(root)?;
    if problems.is_empty() {
        eprintln!("tidy: ok");
        Ok(())
    } else {
        Err(format!("tidy found problems:\n  {}", problems.join("\n  ")))
    }
}

fn layer(name: &str) -> Option<u8> {
    LAYERS.iter().find(|(n, _)| *n == name).map(|(_, l)| *l)
}

fn check(root: &Path) -> Result<Vec<String>, String> {
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(root)
        .output()
        .map_err(|e| format!("cargo metadata: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("cargo metadata: {e}"))?;
    let mut problems = Vec::new();
    let packages = meta["packages"].as_array().cloned().unwrap_or_default();
    for pkg in &packages {
        let name = pkg["name"].as_str().unwrap_or_default();
        let manifest = Path::new(pkg["manifest_path"].as_str().unwrap_or_default());
        let dir = manifest.parent().unwrap_or(root);
        check_manifest(name, manifest, &mut problems);
        check_roots(name, dir, &mut problems);
        for dep in pkg["dependencies"].as_array().cloned().unwrap_or_default() {
            let dep_name = dep["name"].as_str().unwrap_or_default();
            if !dep_name.starts_with("coppice-") {
                continue;
            }
            let dev = dep["kind"].as_str() == Some("dev");
            if let Some(p) = check_edge(name, dep_name, dev) {
                problems.push(p);
            }
        }
    }
    Ok(problems)
}

fn check_edge(from: &str, to: &str, dev: bool) -> Option<String> {
    if from == "xtask" {
        return (to != "coppice-wire")
            .then(|| format!("xtask may depend only on coppice-wire, not {to}"));
    }
    let (Some(lf), Some(lt)) = (layer(from), layer(to)) else {
        return Some(format!(
            "{from} → {to}: a crate missing from tidy's layer table"
        ));
    };
    if lt < lf || (dev && DEV_EDGES.contains(&(from, to))) {
        None
    } else {
        Some(format!(
            "{from} (layer {lf}) must not depend on {to} (layer {lt}): dependencies point down"
        ))
    }
}

fn check_manifest(name: &str, manifest: &Path, problems: &mut Vec<String>) {
    let text = fs::read_to_string(manifest).unwrap_or_default();
    if !text.contains("[lints]\nworkspace = true") {
        problems.push(format!(
            "{name}: Cargo.toml must inherit `[lints] workspace = true`"
        ));
    }
    for key in ["edition", "license", "rust-version", "publish"] {
        if !text.contains(&format!("{key}.workspace = true")) {
            problems.push(format!(
                "{name}: Cargo.toml must set `{key}.workspace = true`"
            ));
        }
    }
}

fn check_roots(name: &str, dir: &Path, problems: &mut Vec<String>) {
    for root in ["src/lib.rs", "src/main.rs"] {
        let path = dir.join(root);
        let Ok(text) = fs::read_to_string(&path) else {
            continue;
        };
        let docs = text.lines().take_while(|l| l.starts_with("//!")).count();
        if docs == 0 {
            problems.push(format!("{name}/{root}: must open with a `//!` crate doc"));
        }
        if root == "src/lib.rs" && !text.contains("**Invariant:**") && name != "xtask" {
            problems.push(format!(
                "{name}/{root}: the crate doc must state one **Invariant:**"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_is_tidy() {
        let problems = check(&crate::project_root()).unwrap();
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }

    #[test]
    fn dependency_rules() {
        assert_eq!(check_edge("coppice-jail", "coppice-lifecycle", false), None);
        assert!(check_edge("coppice-lifecycle", "coppice-jail", false).is_some());
        assert!(check_edge("coppice-jail", "coppice-zfs", false).is_some());
        assert_eq!(check_edge("coppice-jail", "coppice-zfs", true), None);
        assert!(check_edge("coppice-zfs", "coppice-jail", true).is_some());
        assert!(check_edge("xtask", "coppice-jail", false).is_some());
        assert_eq!(check_edge("xtask", "coppice-wire", false), None);
        assert!(check_edge("coppice-new", "coppice-wire", false).is_some());
    }
}
