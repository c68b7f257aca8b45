//! An OCI registry for `fromImage` tests: Debian's `docker-registry` in a network namespace
//! this harness makes, on 198.51.100.120/30 (inside the ranges of the network test slots 4
//! to 7, which the caller holds), reached from the host through a veth; and an image built
//! here from a few host binaries, in two layers with whiteouts, pushed with `skopeo`.
//! Everything is removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

/// The host's side of the veth.
pub const HOST: &str = "198.51.100.121";
/// The registry's address.
pub const ADDR: &str = "198.51.100.122";
/// The registry without authentication.
pub const OPEN: &str = "198.51.100.122:5000";
/// The registry with htpasswd authentication ([`USER`], [`PASSWORD`]).
pub const AUTH: &str = "198.51.100.122:5001";
pub const USER: &str = "puller";
pub const PASSWORD: &str = "s3cret-Pa55word";
const NS: &str = "cpgt-reg";
const LINK: &str = "cpgtrg";

/// Why the registry tests cannot run here, if they cannot.
pub fn tools_missing() -> Option<String> {
    for tool in ["skopeo", "docker-registry", "htpasswd", "ip"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
        if !found {
            return Some(format!("{tool} is not installed (xtask ci installs it)"));
        }
    }
    None
}

/// Runs `cmd` for at most 60 s; its stdout, or a panic with its stderr.
pub fn run(mut cmd: Command) -> String {
    let line = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{line}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{line} did not finish in 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{line}: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &[&str]) -> String {
    let mut c = Command::new("ip");
    c.args(args);
    run(c)
}

/// The registries' namespace and processes.
pub struct Registry {
    children: Vec<Child>,
}

impl Registry {
    /// Makes the namespace and starts both registries under `dir`; waits until they answer.
    pub fn start(dir: &Path) -> Self {
        Self::remove_leftovers();
        let mut reg = Self {
            children: Vec::new(),
        };
        ip(&["netns", "add", NS]);
        ip(&[
            "link", "add", LINK, "type", "veth", "peer", "name", "eth0", "netns", NS,
        ]);
        ip(&["addr", "add", &format!("{HOST}/30"), "dev", LINK]);
        ip(&["link", "set", LINK, "up"]);
        for args in [
            &["addr", "add", &format!("{ADDR}/30"), "dev", "eth0"][..],
            &["link", "set", "eth0", "up"],
            &["link", "set", "lo", "up"],
        ] {
            let mut full = vec!["netns", "exec", NS, "ip"];
            full.extend_from_slice(args);
            ip(&full);
        }
        let htpasswd = dir.join("htpasswd");
        let mut c = Command::new("htpasswd");
        c.args(["-Bbn", USER, PASSWORD]);
        std::fs::write(&htpasswd, run(c)).unwrap();
        for (addr, auth) in [(OPEN, false), (AUTH, true)] {
            let root = dir.join(format!("registry-{}", &addr[addr.len() - 4..]));
            std::fs::create_dir_all(&root).unwrap();
            let mut config = json!({
                "version": 0.1,
                "log": {"level": "info"},
                "storage": {"filesystem": {"rootdirectory": root}},
                "http": {"addr": addr},
            });
            if auth {
                config["auth"] = json!({"htpasswd": {"realm": "coppice-test", "path": htpasswd}});
            }
            // YAML is a superset of JSON.
            let file = root.join("config.yml");
            std::fs::write(&file, config.to_string()).unwrap();
            let log = std::fs::File::create(root.join("registry.log")).unwrap();
            let child = Command::new("ip")
                .args(["netns", "exec", NS, "docker-registry", "serve"])
                .arg(&file)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            reg.children.push(child);
        }
        for addr in [OPEN, AUTH] {
            let deadline = Instant::now() + Duration::from_secs(30);
            while std::net::TcpStream::connect_timeout(
                &addr.parse().unwrap(),
                Duration::from_secs(1),
            )
            .is_err()
            {
                assert!(Instant::now() < deadline, "registry {addr} did not listen");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        reg
    }

    fn remove_leftovers() {
        for args in [&["link", "del", LINK][..], &["netns", "del", NS]] {
            let _ = Command::new("ip")
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        for c in &mut self.children {
            // `ip netns exec` execs the registry, so this is its pid.
            let _ = c.kill();
            let _ = c.wait();
        }
        Self::remove_leftovers();
    }
}

/// Pushes the OCI layout `layout` (tag `1`) to `dest` (`host:port/repo:tag`).
pub fn push(layout: &Path, dest: &str, creds: Option<(&str, &str)>) {
    let mut c = Command::new("skopeo");
    c.args(["--insecure-policy", "copy", "--dest-tls-verify=false"]);
    if let Some((u, p)) = creds {
        c.arg("--dest-creds").arg(format!("{u}:{p}"));
    }
    c.arg(format!("oci:{}:1", layout.display()))
        .arg(format!("docker://{dest}"));
    run(c);
}

fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A tar layer builder, entries owned by root unless said.
struct Layer(tar::Builder<Vec<u8>>);

impl Layer {
    fn new() -> Self {
        Self(tar::Builder::new(Vec::new()))
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h
    }

    fn dir(&mut self, path: &str, mode: u32) {
        let mut h = Self::header(tar::EntryType::Directory, mode, 0);
        self.0.append_data(&mut h, path, &[][..]).unwrap();
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        let mut h = Self::header(tar::EntryType::Regular, mode, data.len() as u64);
        self.0.append_data(&mut h, path, data).unwrap();
    }

    fn symlink(&mut self, path: &str, target: &str) {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.0.append_link(&mut h, path, target).unwrap();
    }

    fn gzipped(self) -> Vec<u8> {
        let tar = self.0.into_inner().unwrap();
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut enc, &tar).unwrap();
        enc.finish().unwrap()
    }
}

/// The shared libraries `binary` loads, from `ldd`.
fn libraries(binary: &Path) -> Vec<PathBuf> {
    let mut c = Command::new("ldd");
    c.arg(binary);
    run(c)
        .lines()
        .filter_map(|l| {
            let path = l.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Writes an OCI layout of a small image under `dir` and returns its path. Layer one: the
/// host's bash, coreutils the tests use and their libraries (and the agent's, which runs
/// from the gateway binary inside the image's root), `/etc/gone.txt` and `/opt/old.txt`;
/// layer two: whiteouts of `/etc/gone.txt` and (opaque) everything in `/opt`, then
/// `/opt/new.txt` and `/hello.txt`. The config sets `IMG_VAR`, `PATH`, `WorkingDir` and
/// `User`.
pub fn make_image(dir: &Path, agent: &Path) -> PathBuf {
    let tools = [
        "bash", "sh", "cat", "ls", "env", "mkdir", "pwd", "id", "whoami", "sleep", "rm", "cp",
        "chown", "chmod", "find", "tar", "dirname", "test",
    ];
    let mut files: Vec<PathBuf> = Vec::new();
    for t in tools {
        let p = PathBuf::from("/usr/bin").join(t);
        if p.exists() {
            files.push(std::fs::canonicalize(&p).unwrap());
            files.push(p);
        }
    }
    let mut libs: Vec<PathBuf> = Vec::new();
    for f in files.iter().chain(std::iter::once(&agent.to_path_buf())) {
        libs.extend(libraries(f));
    }
    libs.sort();
    libs.dedup();
    let mut one = Layer::new();
    for d in [
        "usr",
        "usr/bin",
        "usr/lib",
        "usr/lib64",
        "etc",
        "tmp",
        "opt",
        "root",
        "srv",
    ] {
        one.dir(d, if d == "tmp" { 0o1777 } else { 0o755 });
    }
    one.symlink("bin", "usr/bin");
    one.symlink("lib", "usr/lib");
    one.symlink("lib64", "usr/lib64");
    let mut seen = std::collections::HashSet::new();
    for f in files.iter().chain(&libs) {
        // Paths through the host's /lib and /bin links land in /usr, as in the image.
        let rel = f.to_string_lossy().trim_start_matches('/').to_owned();
        let rel = ["lib/", "lib64/", "bin/"]
            .iter()
            .find_map(|p| rel.strip_prefix(p).map(|r| format!("usr/{p}{r}")))
            .unwrap_or(rel);
        if !seen.insert(rel.clone()) {
            continue;
        }
        let mut parent = String::new();
        for part in Path::new(&rel).parent().unwrap().iter() {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(&part.to_string_lossy());
            if seen.insert(format!("{parent}/")) {
                one.dir(&parent, 0o755);
            }
        }
        // Contents, links followed: the image needs no link target the host has.
        one.file(&rel, 0o755, &std::fs::read(f).unwrap());
    }
    one.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/bash\n");
    one.file("etc/group", 0o644, b"root:x:0:\n");
    one.file("etc/gone.txt", 0o644, b"whited out\n");
    one.file("opt/old.txt", 0o644, b"old\n");
    let mut two = Layer::new();
    two.file("etc/.wh.gone.txt", 0o644, b"");
    two.file("opt/.wh..wh..opq", 0o644, b"");
    two.file("opt/new.txt", 0o644, b"new\n");
    two.file("hello.txt", 0o644, b"hello from the image\n");
    let layers = [one.gzipped(), two.gzipped()];

    let layout = dir.join("layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| -> (String, usize) {
        let hex = sha256_hex(data);
        std::fs::write(blobs.join(&hex), data).unwrap();
        (format!("sha256:{hex}"), data.len())
    };
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|gz| {
            let mut raw = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut raw)
                .unwrap();
            format!("sha256:{}", sha256_hex(&raw))
        })
        .collect();
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "IMG_VAR=from the image"],
            "WorkingDir": "/srv",
            "User": "nobody",
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let (config_digest, config_size) = put(config.to_string().as_bytes());
    let layer_descs: Vec<_> = layers
        .iter()
        .map(|l| {
            let (d, s) = put(l);
            json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": s})
        })
        .collect();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": layer_descs,
    });
    let (m_digest, m_size) = put(manifest.to_string().as_bytes());
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": m_digest, "size": m_size,
                       "annotations": {"org.opencontainers.image.ref.name": "1"}}],
    });
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
    layout
}
