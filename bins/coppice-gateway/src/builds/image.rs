//! `fromImage`: an OCI or Docker image from a registry as a build's base layer.
//!
//! [`Registries`] is the operator's side (`--registry-mirror`, `--insecure-registry`): it
//! turns an image name into what to pull and from where. Docker Hub names (`python:3.12`,
//! `library/python`, `docker.io/...`) go to the mirror when there is one; a registry is
//! reached over plain HTTP only when the operator allowed it by name.
//! [`base_layer`] asks the registry for the image's digest, and pulls and imports the
//! image only when storage has no layer for that digest yet, so an image is pulled once
//! per digest. Of the image's config it takes what E2B's template build takes: `Env`.

use std::path::PathBuf;

use coppice_lifecycle::backend::LayerId;
use coppice_zfs::image::{Credentials, ImageError, PullSpec};

use crate::builds::store::Defaults;
use crate::Gateway;

/// Docker Hub's registry, where names without one live.
const DOCKER_HUB: &str = "docker.io";
/// Bumped whenever what a pull makes of an image changes, so an old layer is not reused.
const LAYER_VERSION: &str = "i1";
/// How the names of image layers start.
pub(crate) const LAYER_PREFIX: &str = "i1-";

/// Where images come from: the operator's mirror and the registries allowed plain HTTP.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Registries {
    /// The registry Docker Hub names are pulled from (`host[:port]`, no scheme).
    pub(crate) mirror: Option<String>,
    /// Registries (`host[:port]`) reached over plain HTTP or unverified TLS.
    pub(crate) insecure: Vec<String>,
}

impl Registries {
    /// Reads `--registry-mirror` (`[https://|http://]host[:port][/]`) and the
    /// `--insecure-registry` list; a plain-HTTP mirror must be in that list.
    pub(crate) fn new(mirror: Option<&str>, insecure: Vec<String>) -> Result<Self, String> {
        let mirror = match mirror {
            None => None,
            Some(url) => {
                let (plain, rest) = if let Some(r) = url.strip_prefix("http://") {
                    (true, r)
                } else {
                    (false, url.strip_prefix("https://").unwrap_or(url))
                };
                let host = rest.trim_end_matches('/');
                if host.is_empty() || host.contains('/') || host.contains('@') {
                    return Err(format!(
                        "--registry-mirror (COPPICE_REGISTRY_MIRROR): {url:?} is not \
                         [http[s]://]host[:port]"
                    ));
                }
                if plain && !insecure.iter().any(|i| i == host) {
                    return Err(format!(
                        "--registry-mirror (COPPICE_REGISTRY_MIRROR): {url:?} is plain HTTP; \
                         allow it with --insecure-registry {host}"
                    ));
                }
                Some(host.to_owned())
            }
        };
        for i in &insecure {
            if i.is_empty() || i.contains('/') || i.contains("://") {
                return Err(format!(
                    "--insecure-registry (COPPICE_INSECURE_REGISTRY): {i:?} is not host[:port]"
                ));
            }
        }
        Ok(Self { mirror, insecure })
    }

    /// What to pull for the image name `image`: the registry named, else Docker Hub (or
    /// its mirror), with `library/` for official images and `latest` for no tag.
    pub(crate) fn spec(
        &self,
        image: &str,
        credentials: Option<Credentials>,
    ) -> Result<PullSpec, String> {
        let image = image.trim();
        let bad = || format!("fromImage {image:?} is not an image reference");
        if image.is_empty()
            || image.chars().any(|c| c.is_whitespace() || c.is_control())
            || image.contains("://")
        {
            return Err(bad());
        }
        let (first, rest) = image.split_once('/').unwrap_or(("", image));
        let names_registry = !first.is_empty()
            && (first.contains('.') || first.contains(':') || first == "localhost");
        let (registry, path) = if names_registry {
            (first.to_owned(), rest.to_owned())
        } else {
            (DOCKER_HUB.to_owned(), image.to_owned())
        };
        let hub = matches!(
            registry.as_str(),
            "docker.io" | "index.docker.io" | "registry-1.docker.io"
        );
        let mut path = path;
        if hub && !path.contains('/') {
            path = format!("library/{path}");
        }
        let (name, _) = path.split_once('@').unwrap_or((&path, ""));
        let last = name.rsplit('/').next().unwrap_or(name);
        if name.is_empty()
            || name.split('/').any(str::is_empty)
            || name
                .split('/')
                .next_back()
                .is_some_and(|l| l.starts_with(':'))
        {
            return Err(bad());
        }
        if !path.contains('@') && !last.contains(':') {
            path.push_str(":latest");
        }
        let registry = match (&self.mirror, hub) {
            (Some(m), true) => m.clone(),
            (None, true) => DOCKER_HUB.to_owned(),
            _ => registry,
        };
        let insecure = self.insecure.contains(&registry);
        Ok(PullSpec {
            reference: format!("{registry}/{path}"),
            insecure,
            credentials,
        })
    }
}

/// The storage layer of the image `image` and the defaults it gives the build: pulled
/// and imported unless storage has its digest's layer already. Lines for the build log
/// go to `log`.
pub(crate) async fn base_layer(
    gw: &Gateway,
    image: &str,
    credentials: Option<Credentials>,
    log: &(dyn Fn(&str, &str) + Sync),
) -> Result<(LayerId, Defaults), String> {
    let spec = gw.builds.registries.spec(image, credentials)?;
    let puller = gw.builds.puller.clone();
    log("info", &format!("resolving {}", spec.reference));
    let s = spec.clone();
    let p = puller.clone();
    let digest = tokio::task::spawn_blocking(move || p.digest(&s))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| message(&e))?;
    let hex = digest.trim_start_matches("sha256:");
    let layer = LayerId::new(format!("{LAYER_VERSION}-{}", &hex[..hex.len().min(48)]))
        .map_err(|e| e.to_string())?;
    let meta = gw.builds.image_meta_path(layer.as_str());
    if gw
        .runtime
        .has_layer(&layer)
        .await
        .map_err(|e| crate::api::error::error_chain(&e))?
    {
        if let Some(defaults) = read_meta(&meta) {
            log("info", &format!("CACHED image {digest}"));
            return Ok((layer, defaults));
        }
    }
    log("info", &format!("pulling image {digest}"));
    let tree = gw
        .builds
        .image_work()
        .join(format!("tree-{}", layer.as_str()));
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(&tree).map_err(|e| format!("create {}: {e}", tree.display()))?;
    let (t, s) = (tree.clone(), spec.clone());
    let (lines_tx, mut lines_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let pull = tokio::task::spawn_blocking(move || {
        puller.pull(&s, &t, &mut |line: &str| {
            let _ = lines_tx.send(line.to_owned());
        })
    });
    let mut pull = std::pin::pin!(pull);
    let pulled = loop {
        tokio::select! {
            line = lines_rx.recv() => if let Some(line) = line { log("info", &line) },
            done = &mut pull => break done,
        }
    };
    while let Ok(line) = lines_rx.try_recv() {
        log("info", &line);
    }
    let result = match pulled {
        Ok(Ok(p)) => Ok(p),
        Ok(Err(e)) => Err(message(&e)),
        Err(e) => Err(e.to_string()),
    };
    let pulled = match result {
        Ok(p) => p,
        Err(e) => {
            remove_tree(tree).await;
            return Err(e);
        }
    };
    if pulled.skipped_special > 0 {
        log(
            "warn",
            &format!(
                "{} device nodes and FIFOs in the image were not created (sandboxes get /dev from the gateway)",
                pulled.skipped_special
            ),
        );
    }
    let defaults = defaults_of(&pulled.config);
    let imported = gw.runtime.import_layer(&layer, &tree).await;
    remove_tree(tree).await;
    imported.map_err(|e| format!("import the image: {}", crate::api::error::error_chain(&e)))?;
    if let Err(e) = write_meta(&meta, &defaults) {
        tracing::warn!(error = %e, "recording an image's defaults failed");
    }
    log(
        "info",
        &format!("image {} ready ({} layers)", pulled.manifest, pulled.layers),
    );
    Ok((layer, defaults))
}

async fn remove_tree(tree: PathBuf) {
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(tree)).await;
}

/// A pull's failure as the build's reason says it.
fn message(e: &ImageError) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    format!("fromImage: {text}")
}

/// What E2B's template build takes from an image's config: its `Env` (lines without `=` or
/// with an empty name or value dropped, names and values trimmed, as E2B's `ParseEnvs`).
/// Build steps run as root in `/` and sandboxes as `user` in `/home/user`, whatever the
/// image's `User` and `WorkingDir` say.
fn defaults_of(config: &coppice_zfs::image::ImageConfig) -> Defaults {
    let mut defaults = Defaults::default();
    for line in &config.env {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        if !k.is_empty() && !v.is_empty() {
            defaults.env.insert(k.to_owned(), v.to_owned());
        }
    }
    defaults
}

fn read_meta(path: &std::path::Path) -> Option<Defaults> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

fn write_meta(path: &std::path::Path, defaults: &Defaults) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(defaults)?)?;
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(r: &Registries, image: &str) -> (String, bool) {
        let s = r.spec(image, None).unwrap();
        (s.reference, s.insecure)
    }

    #[test]
    fn docker_hub_names_go_to_the_mirror() {
        let plain = Registries::default();
        assert_eq!(
            reference(&plain, "python:3.12").0,
            "docker.io/library/python:3.12"
        );
        let r = Registries::new(
            Some("http://198.51.100.9:5000/"),
            vec!["198.51.100.9:5000".into()],
        )
        .unwrap();
        for (image, want) in [
            ("python:3.12", "198.51.100.9:5000/library/python:3.12"),
            ("library/python", "198.51.100.9:5000/library/python:latest"),
            (
                "docker.io/library/python:3",
                "198.51.100.9:5000/library/python:3",
            ),
            (
                "docker.io/python",
                "198.51.100.9:5000/library/python:latest",
            ),
            ("team/app:v1", "198.51.100.9:5000/team/app:v1"),
            ("ghcr.io/o/app", "ghcr.io/o/app:latest"),
            ("localhost:5000/a@sha256:abc", "localhost:5000/a@sha256:abc"),
        ] {
            assert_eq!(reference(&r, image).0, want, "{image}");
        }
        assert!(reference(&r, "python").1);
        assert!(!reference(&r, "ghcr.io/o/app").1);
        for bad in ["", "a b", "http://x/y", "r.io/", "r.io//a", "r.io/:tag"] {
            assert!(r.spec(bad, None).is_err(), "{bad}");
        }
    }

    #[test]
    fn plain_http_needs_an_explicit_allow() {
        let e = Registries::new(Some("http://198.51.100.9:5000"), vec![]).unwrap_err();
        assert!(e.contains("--insecure-registry 198.51.100.9:5000"), "{e}");
        assert_eq!(
            Registries::new(Some("https://mirror.test"), vec![])
                .unwrap()
                .mirror
                .as_deref(),
            Some("mirror.test")
        );
        Registries::new(Some("https://m.test/path"), vec![]).unwrap_err();
        Registries::new(None, vec!["http://x".into()]).unwrap_err();
    }

    #[test]
    fn only_env_is_taken_from_the_image_config() {
        let d = defaults_of(&coppice_zfs::image::ImageConfig {
            env: vec![
                "PATH=/usr/local/bin:/usr/bin".into(),
                " A = 1 ".into(),
                "EMPTY=".into(),
                "NOEQ".into(),
            ],
            working_dir: Some("/srv".into()),
            user: Some("nobody".into()),
        });
        assert_eq!(
            d.env.get("PATH").map(String::as_str),
            Some("/usr/local/bin:/usr/bin")
        );
        assert_eq!(d.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(d.env.len(), 2);
        assert_eq!(d.user, None);
        assert_eq!(d.workdir, None);
    }
}
