//! `cargo xtask e2e [pytest args | js [node args]]`: the unmodified E2B SDKs against a real
//! gateway on loopback, in Python (`tests/e2e/`) and in JavaScript (`tests/e2e-js/`).
//!
//! 1. A venv at `<target>/e2e-venv` with `tests/e2e/requirements.txt`, made with Debian's
//!    python3 (else the one on `PATH`) and rebuilt only when that file or the python changes
//!    (a stamp file records both).
//! 2. `tests/e2e-js/node_modules` from the committed `package-lock.json` by `npm ci`, redone
//!    only when the lock file, `package.json` or the Node.js version changes (a stamp inside
//!    `node_modules` records them); Node.js must be at least [`NODE_MIN`], the `e2b`
//!    package's own requirement.
//! 3. `cargo build -p coppice-gateway`.
//! 4. Two runs of the gateway, each on a free `127.0.0.1` port with a fresh state dir under
//!    `/var/tmp`, the shared template cache and sandbox networking on 198.51.100.0/24 only
//!    ([`NETWORK_ARGS`]; `tests/e2e/test_network.py` makes the fake internet it reaches): with `COPPICE_API_KEYS` (the whole Python suite, then the JS suite with
//!    `node --test`, both with a valid key) and without (the `auth`-marked Python tests, which
//!    then expect any key to work). Both SDKs see the gateway through the same environment
//!    ([`sdk_env`]).
//!    Given pytest arguments, only the first run happens, with those arguments and no JS.
//!    Given `js`, only the first run happens, with the JS suite alone: every
//!    `tests/e2e-js/*.test.mjs`, or the `node --test` arguments that follow (file names are
//!    relative to `tests/e2e-js`; options, as `--opt=value`, are put before them).
//! 5. After each run, whatever happened: every sandbox still listed is deleted, the gateway
//!    gets SIGTERM (it leaves sandboxes running by design, hence the deletes), its network is
//!    removed with `--purge-network true`, and the state dir is removed unless something is
//!    still mounted in it.
//!
//! Needs root, as the gateway does; otherwise it prints `SKIP` and succeeds.

use std::fs::{self, File};
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::project_root;

/// How long a gateway may take to answer `/health` 200: the first start on a machine builds
/// the templates (debootstrap plus the code interpreter's packages). `COPPICE_E2E_HEALTH_TIMEOUT`
/// (seconds) overrides it.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// How long the gateway gets to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The oldest Node.js the JS suite runs on: the `e2b` package's `engines` (`>=20.18.1`).
const NODE_MIN: (u32, u32, u32) = (20, 18, 1);

/// Each JS test's deadline, so a stream the gateway never ends fails that test, not the run.
const NODE_TEST_TIMEOUT_MS: u32 = 120_000;

/// Lines of the gateway's log shown when a run fails.
const LOG_TAIL: usize = 60;

/// Sandbox networking of the e2e gateway: a pool, a name and the fake internet's resolver,
/// all in 198.51.100.0/24 (TEST-NET-2), with egress allowed into that range only. These are
/// the ranges of the network role's test slots 0 to 3, which the run holds (see
/// [`hold_net_slots`]); `tests/e2e/test_network.py` makes the fake internet on
/// 198.51.100.0/26.
const NETWORK_ARGS: &[&str] = &[
    "--sandbox-cidr",
    "198.51.100.128/26",
    "--sandbox-network-name",
    "cpe2e",
    "--egress-only-to",
    "198.51.100.0/24",
    "--ip-forward",
    "false",
    "--dns-upstream",
    "198.51.100.2",
];

/// Where `fromImage` pulls from: `tests/e2e/test_template_image.py` runs two registries
/// (open, and with a password) on 198.51.100.58 in a namespace of its own, inside the ranges
/// of the slots this run holds; Docker Hub names go to the open one.
const REGISTRY_ARGS: &[&str] = &[
    "--registry-mirror",
    "http://198.51.100.58:5000",
    "--insecure-registry",
    "198.51.100.58:5000",
    "--insecure-registry",
    "198.51.100.58:5001",
];

/// Takes the network role's test slots 0 to 3 host-wide (the `flock`s its tests and the
/// gateway's network tests take), so no other test meets this run's bridge and routes.
fn hold_net_slots() -> Result<Vec<File>, String> {
    let dir = Path::new("/run/lock");
    let dir = if dir.is_dir() { dir } else { Path::new("/tmp") };
    (0..4)
        .map(|n| {
            let path = dir.join(format!("coppice-net-test-slot-{n}"));
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| format!("open {}: {e}", path.display()))?;
            file.lock()
                .map_err(|e| format!("lock {}: {e}", path.display()))?;
            Ok(file)
        })
        .collect()
}

pub(crate) fn run(args: &[&str]) -> Result<(), String> {
    if !is_root() {
        // As every privileged test here does: say so and skip.
        eprintln!("SKIP xtask e2e: needs root (the gateway runs sandboxes in jails)");
        return Ok(());
    }
    let root = project_root();
    let target = target_dir();
    let (pytest, node) = match args {
        [] => (vec!["tests/e2e".to_owned()], js_suite(&root)?),
        ["js"] => (Vec::new(), js_suite(&root)?),
        ["js", rest @ ..] => (Vec::new(), rest.iter().map(|a| (*a).to_owned()).collect()),
        _ => (args.iter().map(|a| (*a).to_owned()).collect(), Vec::new()),
    };
    let python = if pytest.is_empty() {
        None
    } else {
        Some(ensure_venv(&root, &target)?)
    };
    if !node.is_empty() {
        ensure_node_modules(&root)?;
    }
    build_gateway()?;
    let gateway = target.join("debug/coppice-gateway");
    let keys = [random_key()?, random_key()?];

    let mut phases = vec![Phase {
        name: "keys",
        keys: Some(&keys),
        pytest,
        node,
    }];
    if args.is_empty() {
        phases.push(Phase {
            name: "open",
            keys: None,
            pytest: vec!["tests/e2e".into(), "-m".into(), "auth".into()],
            node: Vec::new(),
        });
    }

    let mut failures = Vec::new();
    for phase in &phases {
        eprintln!("xtask e2e: run `{}`", phase.name);
        if let Err(e) = run_phase(&gateway, python.as_deref(), &target, phase) {
            eprintln!("xtask e2e: run `{}` failed: {e}", phase.name);
            failures.push(format!("{}: {e}", phase.name));
        }
    }
    if failures.is_empty() {
        eprintln!("xtask e2e: all SDK tests passed");
        Ok(())
    } else {
        Err(format!("e2e failed:\n  {}", failures.join("\n  ")))
    }
}

/// One gateway process and the SDK runs against it.
pub(crate) struct Phase<'a> {
    pub(crate) name: &'static str,
    /// `Some([valid, second valid])` starts the gateway with `COPPICE_API_KEYS`.
    pub(crate) keys: Option<&'a [String; 2]>,
    /// pytest's arguments; empty runs no Python tests.
    pub(crate) pytest: Vec<String>,
    /// `node --test`'s arguments, in `tests/e2e-js`; empty runs no JS tests.
    pub(crate) node: Vec<String>,
}

fn run_phase(
    gateway: &Path,
    python: Option<&Path>,
    target: &Path,
    phase: &Phase<'_>,
) -> Result<(), String> {
    let log_path = target.join(format!("e2e-gateway-{}.log", phase.name));
    let mut gw = Gateway::start(gateway, phase, &log_path)?;
    let api_key = match phase.keys {
        Some([key, _]) => key.clone(),
        None => "coppice-e2e-any-key".to_owned(),
    };
    let outcome = gw.wait_healthy().and_then(|()| {
        // Both suites run even when the first fails, and both failures are reported.
        let py = match python {
            _ if phase.pytest.is_empty() => Ok(()),
            Some(python) => run_pytest(python, gw.port, &api_key, phase),
            None => Err("pytest arguments but no venv".to_owned()),
        };
        let js = if phase.node.is_empty() {
            Ok(())
        } else {
            run_node(gw.port, &api_key, phase)
        };
        match (py, js) {
            (Err(a), Err(b)) => Err(format!("{a}; {b}")),
            (py, js) => py.and(js),
        }
    });
    let cleanup = gw.shutdown(&api_key);
    if outcome.is_err() || cleanup.is_err() {
        print_tail(&log_path);
    }
    outcome.and(cleanup)
}

/// Points an SDK process at the gateway on `port`: the same variables for Python and JS.
fn sdk_env(cmd: &mut Command, port: u16, api_key: &str) {
    let url = format!("http://127.0.0.1:{port}");
    cmd.env("E2B_API_URL", &url)
        .env("E2B_SANDBOX_URL", &url)
        .env("E2B_API_KEY", api_key)
        // Each of these would point the SDK somewhere else (§1.1 of the protocol notes).
        .env_remove("E2B_DEBUG")
        .env_remove("E2B_DOMAIN")
        .env_remove("E2B_ACCESS_TOKEN");
}

fn run_pytest(python: &Path, port: u16, api_key: &str, phase: &Phase<'_>) -> Result<(), String> {
    let mut cmd = Command::new(python);
    cmd.args(["-m", "pytest", "-p", "no:cacheprovider"])
        .args(&phase.pytest)
        .current_dir(project_root())
        .env("COPPICE_E2E_AUTH", phase.name)
        .env("COPPICE_E2E_NETWORK", "1")
        .env(
            "COPPICE_E2E_FAKE_INTERNET",
            project_root().join("bins/coppice-gateway/tests/fixtures/fake_internet.py"),
        )
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1");
    sdk_env(&mut cmd, port, api_key);
    match phase.keys {
        Some([_, second]) => cmd.env("COPPICE_E2E_SECOND_KEY", second),
        None => cmd.env_remove("COPPICE_E2E_SECOND_KEY"),
    };
    eprintln!(
        "$ E2B_API_URL=http://127.0.0.1:{port} E2B_SANDBOX_URL=http://127.0.0.1:{port} COPPICE_E2E_AUTH={} {} -m pytest -p no:cacheprovider {}",
        phase.name,
        python.display(),
        phase.pytest.join(" ")
    );
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run pytest: {e}"))?;
    match status.code() {
        Some(0) => Ok(()),
        Some(5) => Err(format!(
            "pytest collected no tests (exit 5) from `{}`: a selection that matches nothing \
             tests nothing",
            phase.pytest.join(" ")
        )),
        _ => Err(format!("pytest failed: {status}")),
    }
}

// ---- The JS suite ----

/// Every `*.test.mjs` in `tests/e2e-js`, sorted: the default JS selection.
fn js_suite(root: &Path) -> Result<Vec<String>, String> {
    let dir = root.join("tests/e2e-js");
    let mut files: Vec<String> = fs::read_dir(&dir)
        .map_err(|e| format!("read {}: {e}", dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".test.mjs"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!("no *.test.mjs in {}", dir.display()));
    }
    Ok(files)
}

fn run_node(port: u16, api_key: &str, phase: &Phase<'_>) -> Result<(), String> {
    // node takes options only before the files (`--opt=value`, one argument each).
    let (options, files): (Vec<&String>, Vec<&String>) =
        phase.node.iter().partition(|a| a.starts_with('-'));
    let mut cmd = Command::new("node");
    cmd.args(["--test", "--test-concurrency=1"])
        .arg(format!("--test-timeout={NODE_TEST_TIMEOUT_MS}"))
        .args(&options)
        .args(&files)
        .current_dir(project_root().join("tests/e2e-js"));
    sdk_env(&mut cmd, port, api_key);
    // Debug shows the directory and the environment changes too.
    eprintln!("$ {cmd:?}");
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run node --test: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("node --test failed: {status}"))
    }
}

/// Makes sure `tests/e2e-js/node_modules` matches the committed lock file, with `npm ci`.
fn ensure_node_modules(root: &Path) -> Result<(), String> {
    let dir = root.join("tests/e2e-js");
    let version = Command::new("node")
        .arg("--version")
        .output()
        .map_err(|e| {
            format!("cannot run node ({e}): the JS suite needs Node.js and npm (`cargo xtask ci` installs them)")
        })?;
    let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
    match parse_node_version(&version) {
        Some(v) if v >= NODE_MIN => {}
        _ => {
            let (a, b, c) = NODE_MIN;
            return Err(format!(
                "node {version:?} is older than {a}.{b}.{c}, which the e2b package needs"
            ));
        }
    }
    let mut fingerprint = Vec::new();
    for file in ["package.json", "package-lock.json"] {
        let path = dir.join(file);
        fingerprint.extend(fs::read(&path).map_err(|e| format!("read {}: {e}", path.display()))?);
    }
    fingerprint.extend_from_slice(version.as_bytes());
    let stamp_text = format!("{:016x}\n", fnv1a(&fingerprint));
    let stamp = dir.join("node_modules/.coppice-lock.stamp");
    if fs::read_to_string(&stamp).ok().as_deref() == Some(stamp_text.as_str()) {
        return Ok(());
    }
    // `npm ci` removes node_modules (and the stamp with it) before it installs.
    run_checked(
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir),
        "npm ci in tests/e2e-js",
    )?;
    // Written last, so an interrupted install is redone next time.
    fs::write(&stamp, stamp_text).map_err(|e| format!("write {}: {e}", stamp.display()))
}

/// `v20.20.2` as `(20, 20, 2)`.
fn parse_node_version(text: &str) -> Option<(u32, u32, u32)> {
    let mut parts = text.trim().strip_prefix('v')?.splitn(3, '.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    let patch = parts
        .next()?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    Some((major, minor, patch))
}

pub(crate) fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The cargo target directory (`CARGO_TARGET_DIR` or `<root>/target`).
pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| project_root().join("target"))
}

/// The template cache the gateway shares with every crate's tests: the default of
/// `coppice_zfs::template::default_cache_dir` (xtask may not depend on coppice-zfs).
fn template_cache() -> PathBuf {
    std::env::var_os("COPPICE_TEMPLATE_CACHE")
        .filter(|v| !v.is_empty())
        .map_or_else(
            || PathBuf::from("/var/cache/coppice/templates"),
            PathBuf::from,
        )
}

fn build_gateway() -> Result<(), String> {
    eprintln!("$ cargo build -p coppice-gateway");
    let status = Command::new(env!("CARGO"))
        .args(["build", "-p", "coppice-gateway"])
        .current_dir(project_root())
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("cargo build -p coppice-gateway failed: {status}"))
    }
}

// ---- The venv ----

/// Makes sure `<target>/e2e-venv` holds the suite's requirements; returns its python.
pub(crate) fn ensure_venv(root: &Path, target: &Path) -> Result<PathBuf, String> {
    let requirements = root.join("tests/e2e/requirements.txt");
    let wanted =
        fs::read(&requirements).map_err(|e| format!("read {}: {e}", requirements.display()))?;
    let base_python = base_python();
    let version = Command::new(&base_python)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", base_python.display()))?;
    let mut fingerprint = wanted.clone();
    fingerprint.extend_from_slice(base_python.as_os_str().as_encoded_bytes());
    fingerprint.extend_from_slice(&version.stdout);
    let stamp_text = format!("{:016x}\n", fnv1a(&fingerprint));

    let venv = target.join("e2e-venv");
    let python = venv.join("bin/python");
    let stamp = venv.join("coppice-requirements.stamp");
    if python.exists() && fs::read_to_string(&stamp).ok().as_deref() == Some(stamp_text.as_str()) {
        return Ok(python);
    }
    if venv.exists() {
        eprintln!(
            "xtask e2e: requirements changed, recreating {}",
            venv.display()
        );
        fs::remove_dir_all(&venv).map_err(|e| format!("remove {}: {e}", venv.display()))?;
    }
    fs::create_dir_all(target).map_err(|e| format!("create {}: {e}", target.display()))?;
    run_checked(
        Command::new(&base_python).arg("-m").arg("venv").arg(&venv),
        "python3 -m venv (on Debian: apt-get install python3-venv)",
    )?;
    run_checked(
        Command::new(&python)
            .args(["-m", "pip", "install", "--disable-pip-version-check", "-r"])
            .arg(&requirements),
        "pip install -r tests/e2e/requirements.txt",
    )?;
    // Written last, so an interrupted install is redone next time.
    fs::write(&stamp, stamp_text).map_err(|e| format!("write {}: {e}", stamp.display()))?;
    Ok(python)
}

/// Debian's python3 (the one CI installs), else whatever `python3` is on `PATH`.
fn base_python() -> PathBuf {
    let debian = PathBuf::from("/usr/bin/python3");
    if debian.exists() {
        debian
    } else {
        PathBuf::from("python3")
    }
}

/// 64-bit FNV-1a: a stable fingerprint for the venv stamp (std's hasher may change).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn run_checked(cmd: &mut Command, what: &str) -> Result<(), String> {
    eprintln!("$ {cmd:?}");
    let status = cmd.status().map_err(|e| format!("{what}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what} failed: {status}"))
    }
}

/// A random API key in the format E2B issues (`e2b_` and hex), which the JS SDK checks
/// before it sends one.
pub(crate) fn random_key() -> Result<String, String> {
    let mut bytes = [0u8; 20];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| format!("read /dev/urandom: {e}"))?;
    Ok(format!(
        "e2b_{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

// ---- The gateway process ----

pub(crate) struct Gateway {
    child: Option<Child>,
    binary: PathBuf,
    /// The network test slots, held while the gateway's network exists.
    _slots: Vec<File>,
    pub(crate) port: u16,
    state_dir: PathBuf,
    log_path: PathBuf,
    /// Whether the gateway's output also goes to the terminal (until it is healthy).
    echo: Arc<AtomicBool>,
}

impl Gateway {
    pub(crate) fn start(binary: &Path, phase: &Phase<'_>, log_path: &Path) -> Result<Self, String> {
        let slots = hold_net_slots()?;
        let port = free_port()?;
        let state_dir = PathBuf::from(format!(
            "/var/tmp/coppice-e2e-{}-{}",
            std::process::id(),
            phase.name
        ));
        if state_dir.exists() {
            remove_state_dir(&state_dir)?;
        }
        fs::create_dir_all(&state_dir)
            .map_err(|e| format!("create {}: {e}", state_dir.display()))?;
        let listen = format!("127.0.0.1:{port}");
        let mut cmd = Command::new(binary);
        cmd.arg("--listen")
            .arg(&listen)
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--template-cache")
            .arg(template_cache())
            .args(NETWORK_ARGS)
            .args(REGISTRY_ARGS)
            // test_supervision.py's webhook receiver listens on loopback.
            .args(["--webhook-allow", "127.0.0.0/8"])
            .env_remove("COPPICE_API_KEYS_FILE")
            // Plain log lines: they go to a file, not a terminal.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match phase.keys {
            Some(keys) => cmd.env("COPPICE_API_KEYS", keys.join(",")),
            None => cmd.env_remove("COPPICE_API_KEYS"),
        };
        let log = File::create(log_path)
            .map(|f| Arc::new(Mutex::new(f)))
            .map_err(|e| format!("create {}: {e}", log_path.display()))?;
        eprintln!("$ {cmd:?}");
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                let _ = remove_state_dir(&state_dir);
                return Err(format!("cannot start {}: {e}", binary.display()));
            }
        };
        let echo = Arc::new(AtomicBool::new(true));
        // Threads that copy the output to the log; not joined, because sandboxes that outlive
        // the gateway may hold the pipes open.
        if let Some(out) = child.stdout.take() {
            forward(out, Arc::clone(&log), Arc::clone(&echo));
        }
        if let Some(err) = child.stderr.take() {
            forward(err, log, Arc::clone(&echo));
        }
        Ok(Self {
            child: Some(child),
            binary: binary.to_owned(),
            _slots: slots,
            port,
            state_dir,
            log_path: log_path.to_owned(),
            echo,
        })
    }

    /// Polls `GET /health` until it answers 200 with every template ready, the gateway exits,
    /// or the deadline passes.
    pub(crate) fn wait_healthy(&mut self) -> Result<(), String> {
        let timeout = std::env::var("COPPICE_E2E_HEALTH_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or(HEALTH_TIMEOUT, Duration::from_secs);
        let started = Instant::now();
        let deadline = started + timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!(
                        "the gateway exited before it was healthy ({status}); log: {}",
                        self.log_path.display()
                    ));
                }
            }
            if let Ok(r) = http(self.port, "GET", "/health", None) {
                // 200 means the default template is ready; the suite also uses
                // code-interpreter-v1, which a fresh machine builds for minutes after that, so
                // wait for every template (a create would otherwise block past the SDK's
                // request timeout).
                let body: serde_json::Value =
                    serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null);
                let states: Vec<(String, String)> = body["templates"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                            .collect()
                    })
                    .unwrap_or_default();
                if let Some((name, state)) = states.iter().find(|(_, s)| s.starts_with("failed")) {
                    return Err(format!(
                        "template {name} {state}; log: {}",
                        self.log_path.display()
                    ));
                }
                let all_ready = states.iter().all(|(_, s)| s == "ready");
                if r.status == 200 && all_ready {
                    eprintln!(
                        "xtask e2e: gateway healthy on 127.0.0.1:{} after {:.1} s (log: {})",
                        self.port,
                        started.elapsed().as_secs_f64(),
                        self.log_path.display()
                    );
                    self.echo.store(false, Ordering::Relaxed);
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no 200 from /health within {} s (set COPPICE_E2E_HEALTH_TIMEOUT to wait longer)",
                    timeout.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Deletes every sandbox left, stops the gateway, removes the state dir. Runs every step
    /// even when one fails, and reports the first failure.
    pub(crate) fn shutdown(&mut self, api_key: &str) -> Result<(), String> {
        self.echo.store(true, Ordering::Relaxed);
        let running = self
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
        let swept = if running {
            sweep_sandboxes(self.port, api_key)
        } else {
            Err("the gateway died during the run".to_owned())
        };
        let stopped = self.stop();
        let purged = self.purge_network();
        let removed = remove_state_dir(&self.state_dir);
        swept.and(stopped).and(purged).and(removed)
    }

    /// Removes the bridge, rules and namespaces the gateway's sandbox networking made, with
    /// the gateway's own `--purge-network`, bounded in time.
    fn purge_network(&self) -> Result<(), String> {
        let mut child = Command::new(&self.binary)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(NETWORK_ARGS)
            .args(["--purge-network", "true"])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run {} --purge-network: {e}", self.binary.display()))?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => return Err(format!("--purge-network failed: {status}")),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err("--purge-network did not finish in time".into());
                }
            }
        }
    }

    fn stop(&mut self) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if matches!(child.try_wait(), Ok(Some(_))) {
            return Ok(());
        }
        let pid = child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    eprintln!("xtask e2e: gateway stopped ({status})");
                    return Ok(());
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "the gateway did not exit within {} s of SIGTERM; killed it",
                        STOP_TIMEOUT.as_secs()
                    ));
                }
            }
        }
    }
}

impl Drop for Gateway {
    /// A backstop for early returns and panics: never leave the gateway behind.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn forward(
    pipe: impl std::io::Read + Send + 'static,
    log: Arc<Mutex<File>>,
    echo: Arc<AtomicBool>,
) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end();
            if echo.load(Ordering::Relaxed) {
                eprintln!("gateway| {text}");
            }
            if let Ok(mut f) = log.lock() {
                let _ = writeln!(f, "{text}");
            }
            line.clear();
        }
    });
}

pub(crate) fn print_tail(log_path: &Path) {
    let Ok(text) = fs::read_to_string(log_path) else {
        return;
    };
    let lines: Vec<&str> = text.lines().collect();
    let skip = lines.len().saturating_sub(LOG_TAIL);
    eprintln!(
        "xtask e2e: last {} lines of {}:",
        lines.len() - skip,
        log_path.display()
    );
    for l in &lines[skip..] {
        eprintln!("gateway| {l}");
    }
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("find a free port: {e}"))
}

// ---- Cleanup ----

/// Deletes every sandbox the gateway still lists, running or paused.
fn sweep_sandboxes(port: u16, api_key: &str) -> Result<(), String> {
    let mut ids = Vec::new();
    let mut next: Option<String> = None;
    for _ in 0..100 {
        let mut path = "/v2/sandboxes?state=running,paused".to_owned();
        if let Some(token) = &next {
            path.push_str("&nextToken=");
            path.push_str(&percent_encode(token));
        }
        let r =
            http(port, "GET", &path, Some(api_key)).map_err(|e| format!("list sandboxes: {e}"))?;
        if r.status != 200 {
            return Err(format!(
                "list sandboxes: {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            ));
        }
        let listed: serde_json::Value = serde_json::from_slice(&r.body)
            .map_err(|e| format!("list sandboxes: not JSON: {e}"))?;
        for item in listed.as_array().into_iter().flatten() {
            if let Some(id) = item["sandboxID"].as_str() {
                ids.push(id.to_owned());
            }
        }
        next = r.header("x-next-token").map(str::to_owned);
        if next.is_none() {
            break;
        }
    }
    if ids.is_empty() {
        return Ok(());
    }
    eprintln!(
        "xtask e2e: deleting {} sandbox(es) the suite left: {}",
        ids.len(),
        ids.join(" ")
    );
    let mut failed = Vec::new();
    for id in &ids {
        if id.is_empty()
            || !id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            failed.push(format!("{id:?}: not a sandbox id"));
            continue;
        }
        match http(port, "DELETE", &format!("/sandboxes/{id}"), Some(api_key)) {
            Ok(r) if r.status < 300 || r.status == 404 => {}
            Ok(r) => failed.push(format!(
                "{id}: {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            )),
            Err(e) => failed.push(format!("{id}: {e}")),
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("could not delete sandboxes: {}", failed.join("; ")))
    }
}

/// Removes the state dir, unless a mount is still inside it: deleting through a sandbox's
/// mounts could reach files outside the state dir.
fn remove_state_dir(dir: &Path) -> Result<(), String> {
    if !dir.exists() {
        return Ok(());
    }
    let mounts = mounts_under(dir);
    if !mounts.is_empty() {
        return Err(format!(
            "left {} in place: still mounted inside it: {}",
            dir.display(),
            mounts.join(", ")
        ));
    }
    fs::remove_dir_all(dir).map_err(|e| format!("remove {}: {e}", dir.display()))
}

/// Mount points at or below `dir`, from /proc/self/mountinfo.
fn mounts_under(dir: &Path) -> Vec<String> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return vec![format!(
            "(cannot read /proc/self/mountinfo, assuming mounts)"
        )];
    };
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|m| Path::new(m).starts_with(dir))
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\ooo` octal escapes.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if let Some(d) = octal {
            out.push(d.iter().fold(0u8, |n, c| n.wrapping_mul(8) + (c - b'0')));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

// ---- A minimal HTTP/1.1 client (one request per connection) ----

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn http(port: u16, method: &str, path: &str, api_key: Option<&str>) -> Result<Response, String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let timeout = Some(Duration::from_secs(60));
    stream
        .set_read_timeout(timeout)
        .and_then(|()| stream.set_write_timeout(timeout))
        .map_err(|e| e.to_string())?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nAccept: application/json\r\n"
    );
    if let Some(key) = api_key {
        request.push_str(&format!("X-API-KEY: {key}\r\n"));
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("send {method} {path}: {e}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("read the answer to {method} {path}: {e}"))?;
    parse_response(&raw).ok_or_else(|| {
        format!(
            "{method} {path}: not an HTTP response: {:?}",
            String::from_utf8_lossy(&raw[..raw.len().min(200)])
        )
    })
}

fn parse_response(raw: &[u8]) -> Option<Response> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let rest = &raw[end + 4..];
    let mut response = Response {
        status,
        headers,
        body: Vec::new(),
    };
    let chunked = response
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    response.body = if chunked {
        dechunk(rest)?
    } else {
        rest.to_vec()
    };
    Some(response)
}

fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size_text = size_text.split(';').next()?.trim();
        let size = usize::from_str_radix(size_text, 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let plain =
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Next-Token: abc\r\n\r\n[]")
                .unwrap();
        assert_eq!(plain.status, 200);
        assert_eq!(plain.body, b"[]");
        assert_eq!(plain.header("x-next-token"), Some("abc"));

        let chunked = parse_response(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\n[{}\r\n1;x=y\r\n]\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(chunked.body, b"[{}]");
        assert_eq!(chunked.header("X-Next-Token"), None);

        assert!(parse_response(b"garbage").is_none());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
                .is_none()
        );
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/var/tmp/a\040b"), "/var/tmp/a b");
        assert_eq!(unescape_mountinfo(r"/x\134y"), r"/x\y");
        assert_eq!(unescape_mountinfo(r"/plain\9"), r"/plain\9");
    }

    #[test]
    fn sees_mounts_below_a_dir_only() {
        assert!(!mounts_under(Path::new("/proc")).is_empty());
        assert!(mounts_under(Path::new("/proc/no-such-dir-xtask")).is_empty());
    }

    #[test]
    fn fingerprint_is_fnv1a() {
        // Reference values of 64-bit FNV-1a.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn node_versions() {
        assert_eq!(parse_node_version("v20.20.2\n"), Some((20, 20, 2)));
        assert_eq!(parse_node_version("v22.1.0-nightly"), Some((22, 1, 0)));
        assert_eq!(parse_node_version("20.1.0"), None);
        assert_eq!(parse_node_version(""), None);
        assert!(parse_node_version("v18.20.4").unwrap() < NODE_MIN);
        assert!(parse_node_version("v20.18.1").unwrap() >= NODE_MIN);
    }

    #[test]
    fn keys_look_like_e2b_keys() {
        let key = random_key().unwrap();
        let hex = key.strip_prefix("e2b_").unwrap();
        assert_eq!(hex.len(), 40);
        assert!(hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_ne!(key, random_key().unwrap());
    }

    #[test]
    fn percent_encodes_tokens() {
        assert_eq!(percent_encode("a+b/c=="), "a%2Bb%2Fc%3D%3D");
        assert_eq!(percent_encode("Zz0-._~"), "Zz0-._~");
    }
}
