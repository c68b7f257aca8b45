//! OCI and Docker images as root filesystem trees, for layers a template build starts from.
//!
//! [`ImagePuller`] asks a registry for an image's manifest digest ([`ImagePuller::digest`],
//! which callers cache layers by) and pulls it ([`ImagePuller::pull`]) with Debian's
//! `skopeo` into a private OCI layout (skopeo speaks the registry protocol: token and basic
//! auth, manifest lists resolved to this host's platform, Docker schema 2 converted to OCI,
//! every blob's digest checked, network retries). The layers are then applied here, in
//! order, to one tree (`unpack`): whiteouts, ownership shifted by the sandboxes' uid base,
//! no path leaving the tree. The image config's `Env`, `WorkingDir` and `User` are returned
//! for the caller to apply as it chooses.
//!
//! Credentials go to skopeo in an auth file of mode 0600 in the pull's private directory,
//! never on a command line, so they are in no process listing and no error message.

mod unpack;

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;

/// How long asking for a manifest may take, retries included.
const INSPECT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long pulling an image may take, retries included.
const PULL_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How often skopeo retries a request that failed on the network.
const RETRIES: &str = "3";

/// Layer media types applied (compressed with gzip or not at all).
const LAYER_TYPES: &[(&str, bool)] = &[
    ("application/vnd.oci.image.layer.v1.tar", false),
    ("application/vnd.oci.image.layer.v1.tar+gzip", true),
    ("application/vnd.docker.image.rootfs.diff.tar.gzip", true),
    ("application/vnd.docker.image.rootfs.diff.tar", false),
];

/// A registry username and password (E2B's `registry` type). `Debug` shows neither.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password or token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(<redacted>)")
    }
}

/// What to pull and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullSpec {
    /// `registry[:port]/repository[:tag|@digest]`, with the registry always named.
    pub reference: String,
    /// Plain HTTP (or TLS without verification) is allowed for this registry.
    pub insecure: bool,
    /// Credentials for the registry.
    pub credentials: Option<Credentials>,
}

impl PullSpec {
    /// The registry part of the reference (`host[:port]`).
    pub fn registry(&self) -> &str {
        self.reference
            .split_once('/')
            .map_or(self.reference.as_str(), |(r, _)| r)
    }
}

/// What an image's config asks of containers run from it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImageConfig {
    /// `Env`: `NAME=value` lines.
    pub env: Vec<String>,
    /// `WorkingDir`, when set.
    pub working_dir: Option<String>,
    /// `User`, when set.
    pub user: Option<String>,
}

/// What a pull made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pulled {
    /// The image's config.
    pub config: ImageConfig,
    /// The manifest digest applied (of the platform's image, not of a list).
    pub manifest: String,
    /// Layers applied.
    pub layers: usize,
    /// Device nodes and FIFOs the layers held, not created.
    pub skipped_special: u64,
}

/// Why an image could not be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// The registry has no such repository, tag or digest.
    #[error("image {reference} not found: {detail}")]
    NotFound {
        /// The reference asked for.
        reference: String,
        /// What the registry said.
        detail: String,
    },
    /// The registry refused the credentials, or asked for some.
    #[error("access to {reference} denied (check the credentials): {detail}")]
    Denied {
        /// The reference asked for.
        reference: String,
        /// What the registry said.
        detail: String,
    },
    /// The registry could not be reached, or did not answer in time.
    #[error("registry {registry} unreachable: {detail}")]
    Unreachable {
        /// The registry.
        registry: String,
        /// Why.
        detail: String,
    },
    /// The image holds something this puller does not apply.
    #[error("image {reference}: unsupported media type {media_type}")]
    Unsupported {
        /// The reference asked for.
        reference: String,
        /// The media type.
        media_type: String,
    },
    /// A layer or the layout is malformed.
    #[error("image {reference}: corrupt: {detail}")]
    Corrupt {
        /// The reference asked for.
        reference: String,
        /// What is wrong.
        detail: String,
    },
    /// skopeo failed otherwise.
    #[error("pulling {reference} failed: {detail}")]
    Pull {
        /// The reference asked for.
        reference: String,
        /// skopeo's last words.
        detail: String,
    },
    /// The local filesystem failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ImageError + 'a {
    move |source| ImageError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Pulls images with skopeo into private directories under a work directory.
#[derive(Debug, Clone)]
pub struct ImagePuller {
    work: PathBuf,
    uid_shift: u32,
    skopeo: PathBuf,
}

/// A pull's private directory (mode 0700), removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %self.0.display(), error = %e, "removing a pull's scratch directory failed");
            }
        }
    }
}

impl ImagePuller {
    /// A puller keeping its scratch directories under `work` (created if missing; put it on
    /// the storage root's filesystem so trees import without copying) and shifting owners
    /// by `uid_shift`.
    pub fn new(work: impl Into<PathBuf>, uid_shift: u32) -> Self {
        Self {
            work: work.into(),
            uid_shift,
            skopeo: PathBuf::from("skopeo"),
        }
    }

    /// Whether skopeo can be run here.
    pub fn available(&self) -> bool {
        crate::command::output(
            {
                let mut c = Command::new(&self.skopeo);
                c.arg("--version");
                c
            },
            Duration::from_secs(10),
            None,
        )
        .is_ok_and(|o| o.status.success())
    }

    fn scratch(&self) -> Result<Scratch, ImageError> {
        fs::create_dir_all(&self.work).map_err(io_err("create", &self.work))?;
        let mut bytes = [0u8; 8];
        fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut bytes))
            .map_err(io_err("read", Path::new("/dev/urandom")))?;
        let name: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let dir = self.work.join(format!("pull-{name}"));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io_err("create", &dir))?;
        Ok(Scratch(dir))
    }

    /// skopeo with a private configuration: an accept-anything signature policy (images
    /// are trusted by name, as Docker does), no registries of the host's, no search of
    /// unqualified names, and `HOME` in the scratch directory so no credential of the
    /// host's is used.
    fn skopeo(&self, scratch: &Path, timeout: Duration) -> Result<Command, ImageError> {
        let policy = scratch.join("policy.json");
        fs::write(
            &policy,
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )
        .map_err(io_err("write", &policy))?;
        let registries = scratch.join("registries.conf");
        fs::write(&registries, "unqualified-search-registries = []\n")
            .map_err(io_err("write", &registries))?;
        let mut cmd = Command::new(&self.skopeo);
        cmd.env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", scratch)
            .env("TMPDIR", scratch)
            .env("CONTAINERS_REGISTRIES_CONF", &registries)
            .arg("--policy")
            .arg(&policy)
            .arg("--command-timeout")
            .arg(format!("{}s", timeout.as_secs()))
            .arg("--override-os")
            .arg("linux")
            .arg("--override-arch")
            .arg(arch());
        Ok(cmd)
    }

    /// The auth file for `spec`'s credentials, in `scratch`.
    fn auth_file(spec: &PullSpec, scratch: &Path) -> Result<Option<PathBuf>, ImageError> {
        let Some(c) = &spec.credentials else {
            return Ok(None);
        };
        let auth = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", c.username, c.password));
        let body = serde_json::json!({"auths": {spec.registry(): {"auth": auth}}});
        let path = scratch.join("auth.json");
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err("create", &path))?;
        io::Write::write_all(&mut f, body.to_string().as_bytes())
            .map_err(io_err("write", &path))?;
        Ok(Some(path))
    }

    /// The digest of the manifest `spec` names now (of the list, for a multi-platform
    /// image): one request, which answers whether a pull is needed.
    pub fn digest(&self, spec: &PullSpec) -> Result<String, ImageError> {
        let scratch = self.scratch()?;
        let mut cmd = self.skopeo(&scratch.0, INSPECT_TIMEOUT)?;
        cmd.arg("inspect")
            .arg("--raw")
            .arg("--retry-times")
            .arg(RETRIES);
        if spec.insecure {
            cmd.arg("--tls-verify=false");
        }
        if let Some(auth) = Self::auth_file(spec, &scratch.0)? {
            cmd.arg("--authfile").arg(auth);
        }
        cmd.arg(format!("docker://{}", spec.reference));
        let out = run(cmd, INSPECT_TIMEOUT + Duration::from_secs(10), spec)?;
        let digest = ring::digest::digest(&ring::digest::SHA256, &out);
        Ok(format!("sha256:{}", hex(digest.as_ref())))
    }

    /// Pulls `spec` and applies its layers to `dest` (an empty directory), then gives it
    /// E2B's default user unless it has one. `progress` gets a line per stage.
    pub fn pull(
        &self,
        spec: &PullSpec,
        dest: &Path,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Pulled, ImageError> {
        let scratch = self.scratch()?;
        let layout = scratch.0.join("layout");
        let mut cmd = self.skopeo(&scratch.0, PULL_TIMEOUT)?;
        cmd.arg("copy").arg("--retry-times").arg(RETRIES);
        if spec.insecure {
            cmd.arg("--src-tls-verify=false");
        }
        if let Some(auth) = Self::auth_file(spec, &scratch.0)? {
            cmd.arg("--src-authfile").arg(auth);
        }
        cmd.arg(format!("docker://{}", spec.reference))
            .arg(format!("oci:{}:image", layout.display()));
        progress(&format!("pulling {}", spec.reference));
        run(cmd, PULL_TIMEOUT + Duration::from_secs(10), spec)?;
        let corrupt = |detail: String| ImageError::Corrupt {
            reference: spec.reference.clone(),
            detail,
        };
        let index: Index = read_json(&layout.join("index.json")).map_err(corrupt)?;
        let top = index
            .manifests
            .first()
            .ok_or_else(|| corrupt("the pulled layout has no manifest".into()))?;
        self.check_type(
            spec,
            &top.media_type,
            &["application/vnd.oci.image.manifest.v1+json"],
        )?;
        let manifest: Manifest =
            read_json(&blob(&layout, &top.digest).map_err(corrupt)?).map_err(corrupt)?;
        let config: ConfigBlob =
            read_json(&blob(&layout, &manifest.config.digest).map_err(corrupt)?)
                .map_err(corrupt)?;
        for layer in &manifest.layers {
            if !LAYER_TYPES.iter().any(|(t, _)| *t == layer.media_type) {
                return Err(ImageError::Unsupported {
                    reference: spec.reference.clone(),
                    media_type: layer.media_type.clone(),
                });
            }
        }
        let mut tree = unpack::Tree::new(dest, self.uid_shift).map_err(io_err("own", dest))?;
        for (i, layer) in manifest.layers.iter().enumerate() {
            progress(&format!(
                "applying layer {}/{} {} ({} bytes)",
                i + 1,
                manifest.layers.len(),
                layer.digest,
                layer.size
            ));
            let path = blob(&layout, &layer.digest).map_err(corrupt)?;
            let file = fs::File::open(&path).map_err(io_err("open", &path))?;
            let mut hashed = Hashed::new(io::BufReader::new(file));
            let gz = LAYER_TYPES
                .iter()
                .any(|(t, gz)| *t == layer.media_type && *gz);
            let applied = if gz {
                tree.apply(flate2::read::GzDecoder::new(&mut hashed))
            } else {
                tree.apply(&mut hashed)
            };
            let layer_fault = |e: unpack::LayerFault| match e {
                unpack::LayerFault::Corrupt(d) => corrupt(format!("layer {}: {d}", layer.digest)),
                unpack::LayerFault::Io(source) => ImageError::Io {
                    op: "apply a layer to",
                    path: dest.to_owned(),
                    source,
                },
            };
            applied.map_err(layer_fault)?;
            // Whatever the tar reader left unread still counts towards the digest.
            io::copy(&mut hashed, &mut io::sink()).map_err(io_err("read", &path))?;
            let got = format!("sha256:{}", hex(hashed.finish().as_ref()));
            if got != layer.digest {
                return Err(corrupt(format!("layer {} hashes to {got}", layer.digest)));
            }
        }
        tree.provision().map_err(|e| match e {
            unpack::LayerFault::Corrupt(d) => corrupt(d),
            unpack::LayerFault::Io(source) => ImageError::Io {
                op: "provision",
                path: dest.to_owned(),
                source,
            },
        })?;
        let inner = config.config.unwrap_or_default();
        Ok(Pulled {
            config: ImageConfig {
                env: inner.env.unwrap_or_default(),
                working_dir: inner.working_dir.filter(|w| !w.is_empty()),
                user: inner.user.filter(|u| !u.is_empty()),
            },
            manifest: top.digest.clone(),
            layers: manifest.layers.len(),
            skipped_special: tree.skipped().special,
        })
    }

    fn check_type(&self, spec: &PullSpec, media_type: &str, ok: &[&str]) -> Result<(), ImageError> {
        if ok.contains(&media_type) {
            Ok(())
        } else {
            Err(ImageError::Unsupported {
                reference: spec.reference.clone(),
                media_type: media_type.to_owned(),
            })
        }
    }
}

/// The OCI architecture of this host.
fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs skopeo; its stdout, or its failure sorted into what a user can act on.
fn run(cmd: Command, timeout: Duration, spec: &PullSpec) -> Result<Vec<u8>, ImageError> {
    let out = match crate::command::output(cmd, timeout, None) {
        Ok(out) => out,
        // skopeo is not installed, or cannot be started.
        Err(e @ coppice_lifecycle::backend::BackendError::Io { .. }) => {
            return Err(ImageError::Pull {
                reference: spec.reference.clone(),
                detail: format!("cannot run skopeo (install Debian's skopeo): {e}"),
            })
        }
        // Killed at its timeout: the registry did not answer in time.
        Err(e) => {
            return Err(ImageError::Unreachable {
                registry: spec.registry().to_owned(),
                detail: format!("no answer in time: {e}"),
            })
        }
    };
    if out.status.success() {
        return Ok(out.stdout);
    }
    Err(classify(spec, &String::from_utf8_lossy(&out.stderr)))
}

/// Sorts skopeo's complaint.
fn classify(spec: &PullSpec, stderr: &str) -> ImageError {
    let detail = crate::command::tail(stderr.trim());
    let lower = stderr.to_ascii_lowercase();
    let reference = spec.reference.clone();
    let has = |words: &[&str]| words.iter().any(|w| lower.contains(w));
    if has(&["http response to https client"]) {
        ImageError::Unreachable {
            registry: spec.registry().to_owned(),
            detail: format!(
                "it speaks plain HTTP; allow that with --insecure-registry {} ({detail})",
                spec.registry()
            ),
        }
    } else if has(&[
        "unauthorized",
        "authentication required",
        "denied",
        "status 401",
        "status 403",
    ]) {
        ImageError::Denied { reference, detail }
    } else if has(&[
        "manifest unknown",
        "name unknown",
        "not found",
        "status 404",
    ]) {
        ImageError::NotFound { reference, detail }
    } else if has(&[
        "connection refused",
        "no such host",
        "i/o timeout",
        "network is unreachable",
        "no route to host",
        "deadline exceeded",
        "timeout",
        "tls:",
        "x509:",
        "connection reset",
    ]) {
        ImageError::Unreachable {
            registry: spec.registry().to_owned(),
            detail,
        }
    } else {
        ImageError::Pull { reference, detail }
    }
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: u64,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct ConfigBlob {
    #[serde(default)]
    config: Option<InnerConfig>,
}

#[derive(Deserialize, Default)]
struct InnerConfig {
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
    #[serde(rename = "User", default)]
    user: Option<String>,
}

/// The path of the blob `digest` in `layout`, refusing digests that are not SHA-256 hex.
fn blob(layout: &Path, digest: &str) -> Result<PathBuf, String> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| format!("unsupported digest {digest:?}"))?;
    Ok(layout.join("blobs").join("sha256").join(hex))
}

/// Reads a JSON document of at most 4 MiB.
fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, String> {
    let file = fs::File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
    let mut text = Vec::new();
    file.take(4 << 20)
        .read_to_end(&mut text)
        .map_err(|e| format!("read {}: {e}", path.display()))?;
    serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// A reader that hashes what passes through it.
struct Hashed<R> {
    inner: R,
    ctx: ring::digest::Context,
}

impl<R: Read> Hashed<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            ctx: ring::digest::Context::new(&ring::digest::SHA256),
        }
    }

    fn finish(self) -> ring::digest::Digest {
        self.ctx.finish()
    }
}

impl<R: Read> Read for Hashed<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.ctx.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(r: &str) -> PullSpec {
        PullSpec {
            reference: r.into(),
            insecure: false,
            credentials: Some(Credentials {
                username: "u".into(),
                password: "hunter2".into(),
            }),
        }
    }

    #[test]
    fn credentials_never_show() {
        let s = spec("198.51.100.9:5000/a/b:1");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(s.registry(), "198.51.100.9:5000");
    }

    #[test]
    fn skopeo_failures_are_sorted() {
        let s = spec("r.test/a:1");
        let e = |t: &str| classify(&s, t);
        assert!(matches!(
            e("time=x level=fatal msg=\"Error reading manifest 1 in r.test/a: manifest unknown: manifest unknown\""),
            ImageError::NotFound { .. }
        ));
        assert!(matches!(
            e("reading manifest 1 in r.test/a: unauthorized: authentication required"),
            ImageError::Denied { .. }
        ));
        assert!(matches!(
            e("pinging container registry r.test: Get \"https://r.test/v2/\": dial tcp 198.51.100.9:443: connect: connection refused"),
            ImageError::Unreachable { .. }
        ));
        let http = e("Get \"https://r.test/v2/\": http: server gave HTTP response to HTTPS client");
        assert!(
            matches!(&http, ImageError::Unreachable { detail, .. } if detail.contains("--insecure-registry r.test"))
        );
        assert!(matches!(e("something else"), ImageError::Pull { .. }));
    }

    #[test]
    fn blobs_are_sha256_only() {
        let l = Path::new("/l");
        blob(l, &format!("sha256:{}", "a".repeat(64))).unwrap();
        blob(l, "sha256:../../etc/passwd").unwrap_err();
        blob(l, &format!("sha512:{}", "a".repeat(128))).unwrap_err();
    }
}
