//! `coppice-gateway --check-config`: the configuration as the gateway would use it, with the
//! files and directories it names checked, before a service manager starts or reloads it.
//! It takes no lock, binds nothing and creates nothing, so it is safe beside a running
//! gateway.

use std::fmt::Write as _;
use std::path::Path;

use crate::config::{Config, LogFormat};

/// A summary of `config` for people (never a key or a secret), or every problem found.
pub fn check_config(config: &Config) -> Result<String, String> {
    let mut problems = Vec::new();
    let mut note = |r: Result<(), String>| {
        if let Err(e) = r {
            problems.push(e);
        }
    };
    note(writable_dir(&config.state_dir, "--state-dir"));
    note(writable_dir(&config.template_cache, "--template-cache"));
    if let Some(files) = &config.tls_files {
        note(crate::tls::check_files(files).map_err(|e| format!("--tls-cert/--tls-key: {e}")));
    }
    if let Some(ca) = &config.webhook_ca_file {
        note(
            std::fs::read(ca)
                .map(drop)
                .map_err(|e| format!("--webhook-ca-file {}: {e}", ca.display())),
        );
    }
    if let Some(agent) = &config.agent {
        note(executable(agent));
    }
    if !problems.is_empty() {
        return Err(problems.join("\n"));
    }
    let mut s = String::new();
    let _ = writeln!(s, "configuration OK");
    let _ = writeln!(s, "listen          {}", config.listen);
    for extra in &config.extra_listen {
        let _ = writeln!(s, "listen (Host)   {extra}");
    }
    let _ = writeln!(s, "state dir       {}", config.state_dir.display());
    let _ = writeln!(s, "template cache  {}", config.template_cache.display());
    let _ = writeln!(
        s,
        "api keys        {}",
        match config.api_keys.len() {
            0 => "none: any key is accepted".to_owned(),
            1 => "1 key".to_owned(),
            n => format!("{n} keys"),
        }
    );
    let _ = writeln!(
        s,
        "tls             {}",
        config.tls_files.as_ref().map_or_else(
            || format!("local CA in {}", config.state_dir.join("tls").display()),
            |f| f.cert.display().to_string()
        )
    );
    let _ = writeln!(
        s,
        "network         {}",
        config.network.as_ref().map_or_else(
            || "off (loopback only)".to_owned(),
            |n| format!("{} as {}", n.cidr, n.name)
        )
    );
    let _ = writeln!(
        s,
        "webhook         {}",
        config.webhook.as_ref().map_or("none", |w| w.url.as_str())
    );
    let _ = writeln!(
        s,
        "log format      {}",
        match config.log_format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    );
    Ok(s)
}

/// `dir` exists and this process may write in it, or the nearest existing ancestor does, so
/// the gateway can make it.
fn writable_dir(dir: &Path, flag: &str) -> Result<(), String> {
    let mut at = dir;
    loop {
        match std::fs::metadata(at) {
            Ok(m) if m.is_dir() => {
                return nix::unistd::access(
                    at,
                    nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
                )
                .map_err(|e| {
                    format!(
                        "{flag} {}: {} is not writable: {e}",
                        dir.display(),
                        at.display()
                    )
                });
            }
            Ok(_) => {
                return Err(format!(
                    "{flag} {}: {} is not a directory",
                    dir.display(),
                    at.display()
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match at.parent() {
                Some(p) if !p.as_os_str().is_empty() => at = p,
                _ => return Err(format!("{flag} {}: no existing parent", dir.display())),
            },
            Err(e) => return Err(format!("{flag} {}: {e}", dir.display())),
        }
    }
}

fn executable(path: &Path) -> Result<(), String> {
    nix::unistd::access(path, nix::unistd::AccessFlags::X_OK)
        .map_err(|e| format!("--agent {}: not an executable file: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Config {
        Config::from_args_and_env(args.iter().map(|s| (*s).to_owned()), |_| None).unwrap()
    }

    #[test]
    fn a_good_configuration_is_summarised_without_its_keys() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        std::fs::write(&keys, "secret-one\nsecret-two\n").unwrap();
        let state = dir.path().join("state/not/yet");
        let c = config(&[
            "--state-dir",
            state.to_str().unwrap(),
            "--api-keys-file",
            keys.to_str().unwrap(),
            "--sandbox-network",
            "off",
            "--log-format",
            "json",
        ]);
        let summary = check_config(&c).unwrap();
        assert!(summary.starts_with("configuration OK\n"), "{summary}");
        assert!(summary.contains("2 keys"), "{summary}");
        assert!(!summary.contains("secret"), "{summary}");
        assert!(summary.contains("off (loopback only)"), "{summary}");
        assert!(summary.contains("log format      json"), "{summary}");
        assert!(!state.exists(), "a check creates nothing");
    }

    #[test]
    fn every_problem_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, "x").unwrap();
        let bad_cert = dir.path().join("cert.pem");
        std::fs::write(&bad_cert, "not pem").unwrap();
        let c = config(&[
            "--state-dir",
            file.join("state").to_str().unwrap(),
            "--tls-cert",
            bad_cert.to_str().unwrap(),
            "--tls-key",
            bad_cert.to_str().unwrap(),
            "--agent",
            file.to_str().unwrap(),
            "--webhook-ca-file",
            dir.path().join("missing.pem").to_str().unwrap(),
        ]);
        let e = check_config(&c).unwrap_err();
        assert!(
            e.contains("--state-dir") && e.contains("Not a directory"),
            "{e}"
        );
        assert!(e.contains("--tls-cert/--tls-key"), "{e}");
        assert!(
            e.contains("--agent") && e.contains("not an executable"),
            "{e}"
        );
        assert!(e.contains("--webhook-ca-file"), "{e}");
        assert_eq!(
            Config::from_args_and_env(
                ["--log-format", "xml"].iter().map(|s| (*s).to_owned()),
                |_| None
            )
            .unwrap_err(),
            "--log-format (COPPICE_LOG_FORMAT): \"xml\" is neither text nor json"
        );
    }
}
