//! The build engine: one worker that takes triggered builds in order and runs each one's
//! steps in a build sandbox (the jail and storage roles sandboxes use, with the agent, on
//! the network when the gateway has one), capturing each filesystem step's result as a
//! storage layer.
//!
//! A build starts from its base's layer (`fromTemplate`: a built-in or built template;
//! `fromImage`: E2B's own base image is the built-in `base`, any other image is pulled from
//! its registry, see [`crate::builds::image`]). `ENV`, `USER` and
//! `WORKDIR` change the build's state, which later steps run with and the template's
//! sandboxes get. `RUN` runs `/bin/bash -c` through the agent as the step's user (else the
//! build's `USER`, else root). `COPY` checks the uploaded archive and its hash, moves it into
//! the sandbox and unpacks it there as root, so no host path ever follows a link the
//! sandbox made. `WORKDIR` creates its directory.
//!
//! Each filesystem step's result is cached under a key of (the layer it ran on, the build's
//! state, the step with its files hash): an unchanged rebuild finds every step cached and
//! starts no sandbox. `force` on the build or a step skips the lookup; a rebuilt step's new
//! layer changes every later key.

use std::sync::Arc;
use std::time::Duration;

use coppice_lifecycle::backend::{LayerId, SandboxId};
use coppice_wire::build::TemplateStep;

use crate::builds::agent::{self, Ending};
use crate::builds::files;
use crate::builds::store::{Defaults, Reason};
use crate::builds::{start, Base, Builds, Job};
use crate::runtime::Runtime;
use crate::Gateway;

/// How long one `RUN` step may take.
pub(crate) const STEP_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How long unpacking one `COPY` step's files may take, or creating a `WORKDIR`.
const COPY_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// How long a whole build may take.
const BUILD_TIMEOUT: Duration = Duration::from_secs(2 * 60 * 60);
/// The image `Template().from_base_image()` (and the SDK's default) names: E2B's base image,
/// which the built-in `base` template stands for.
pub(crate) const E2B_BASE_IMAGE: &str = "e2bdev/base";

/// Whether `image` names E2B's base image (any registry prefix of Docker Hub, tag `latest`
/// or none).
pub(crate) fn is_e2b_base(image: &str) -> bool {
    let image = image
        .strip_prefix("docker.io/")
        .or_else(|| image.strip_prefix("index.docker.io/"))
        .or_else(|| image.strip_prefix("registry-1.docker.io/"))
        .unwrap_or(image);
    image == E2B_BASE_IMAGE || image == "e2bdev/base:latest"
}

/// Ends the build under way at shutdown: the caller has stopped [`work`]; its build sandbox
/// is killed and every build still `building` ends as `error`.
pub(crate) async fn stop(gw: &Gateway) {
    if let Some(id) = gw.builds.take_running() {
        gw.runtime.destroy(&id).await;
    }
    match gw.builds.store.interrupt_unfinished(
        "the gateway stopped while this build was running; build it again",
        crate::now().0,
    ) {
        Ok(cut) if !cut.is_empty() => {
            tracing::warn!(builds = ?cut, "template builds cut short by shutdown end as errors");
        }
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, "ending template builds at shutdown failed"),
    }
}

/// Runs triggered builds, one at a time, for the life of the gateway.
pub(crate) async fn work(gw: Arc<Gateway>) {
    let Some(mut jobs) = gw.builds.take_jobs() else {
        return;
    };
    while let Some(job) = jobs.recv().await {
        // A sandbox started before re-adoption ends would be killed as unregistered.
        while !gw.adoption_done() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let builds = &gw.builds;
        let result = match tokio::time::timeout(BUILD_TIMEOUT, build(&gw, &job)).await {
            Ok(r) => r,
            Err(_) => Err(Reason {
                message: format!(
                    "the build took longer than {} minutes",
                    BUILD_TIMEOUT.as_secs() / 60
                ),
                step: None,
            }),
        };
        let now = crate::now().0;
        let stored = match result {
            Ok((layer, defaults)) => {
                tracing::info!(template = %job.template_id, build = %job.build_id, layer = %layer, "template built");
                log(
                    builds,
                    &job.build_id,
                    "info",
                    Some("finalize"),
                    "build finished",
                );
                builds
                    .store
                    .ready(&job.build_id, layer.as_str(), &defaults, now)
            }
            Err(reason) => {
                tracing::warn!(template = %job.template_id, build = %job.build_id, reason = %reason.message, "template build failed");
                log(
                    builds,
                    &job.build_id,
                    "error",
                    reason.step.as_deref(),
                    &format!("build failed: {}", reason.message),
                );
                builds.store.fail(&job.build_id, &reason, now)
            }
        };
        if let Err(e) = stored {
            tracing::error!(build = %job.build_id, error = %e, "recording a build's end failed");
        }
    }
}

fn log(builds: &Builds, build: &str, level: &str, step: Option<&str>, message: &str) {
    if let Err(e) = builds
        .store
        .log(build, crate::now().0, level, step, message)
    {
        tracing::warn!(build, error = %e, "recording a build log line failed");
    }
}

/// Runs `job`; its template's layer and defaults, or why it failed.
async fn build(gw: &Gateway, job: &Job) -> Result<(LayerId, Defaults), Reason> {
    let step_fail = |step: &str| {
        let step = step.to_owned();
        move |message: String| Reason {
            message,
            step: Some(step),
        }
    };
    let from = match &job.base {
        Base::Template(t) => format!("FROM template {t}"),
        Base::Image(i) => format!("FROM image {i}"),
    };
    log(&gw.builds, &job.build_id, "info", Some("base"), &from);
    let (layer, defaults) = base_layer(gw, job).await.map_err(step_fail("base"))?;
    let mut run = Run {
        gw,
        job,
        sandbox: None,
        layer,
        state: defaults,
    };
    let mut result = Ok(());
    for (i, step) in job.steps.iter().enumerate() {
        let name = (i + 1).to_string();
        if let Err(message) = run.step(&name, step).await {
            result = Err(step_fail(&name)(message));
            break;
        }
    }
    if result.is_ok() {
        if let Some(c) = &job.start_cmd {
            run.state.start_cmd = Some(c.clone());
        }
        if let Some(c) = &job.ready_cmd {
            run.state.ready_cmd = Some(c.clone());
        }
        if start::has_commands(&run.state) {
            result = run.check_start().await.map_err(step_fail("finalize"));
        }
    }
    run.stop().await;
    result.map(|()| (run.layer, run.state))
}

/// The layer and defaults a build starts from.
async fn base_layer(gw: &Gateway, job: &Job) -> Result<(LayerId, Defaults), String> {
    let name = match &job.base {
        Base::Image(image) if is_e2b_base(image) && job.registry.is_none() => "base".to_owned(),
        Base::Image(image) => {
            let sink =
                |level: &str, line: &str| log(&gw.builds, &job.build_id, level, Some("base"), line);
            return crate::builds::image::base_layer(gw, image, job.registry.clone(), &sink).await;
        }
        Base::Template(t) => t.clone(),
    };
    if Runtime::knows_template(&name) {
        let layer = gw
            .runtime
            .template(&name)
            .await
            .map_err(|e| crate::api::error::error_chain(&e))?;
        return Ok((layer, Defaults::default()));
    }
    match gw.builds.resolve(&name) {
        Ok(Some(r)) => Ok((r.layer, r.defaults)),
        Ok(None) => Err(format!("fromTemplate: template {name:?} not found")),
        Err(e) => Err(format!("fromTemplate: {e}")),
    }
}

/// What a filesystem step does.
#[derive(Debug, Clone, Copy)]
enum Action<'a> {
    /// `RUN`.
    Run,
    /// `COPY`.
    Copy,
    /// `WORKDIR`: create this directory.
    Workdir(&'a str),
}

/// A build under way.
struct Run<'a> {
    gw: &'a Gateway,
    job: &'a Job,
    /// The build sandbox and its init's pid, once a step needed one.
    sandbox: Option<(SandboxId, u32)>,
    /// The layer the build has reached.
    layer: LayerId,
    /// `ENV`, `USER` and `WORKDIR` so far.
    state: Defaults,
}

/// A step's cache key: SHA-256 of the layer it runs on, the build's state and the step.
fn cache_key(layer: &LayerId, state: &Defaults, step: &TemplateStep) -> String {
    let input = serde_json::json!({
        "layer": layer.as_str(),
        "state": state,
        "type": step.kind,
        "args": step.args,
        "filesHash": step.files_hash,
    });
    let digest = ring::digest::digest(&ring::digest::SHA256, input.to_string().as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// `path` made absolute against `workdir` (else `/`), as Docker resolves `WORKDIR` and `COPY`
/// destinations.
fn absolute(path: &str, workdir: Option<&str>) -> String {
    if path.starts_with('/') {
        path.to_owned()
    } else {
        let base = workdir.unwrap_or("/").trim_end_matches('/');
        format!("{base}/{path}")
    }
}

/// Checks a `COPY` mode: three or four octal digits.
fn check_mode(mode: &str) -> Result<(), String> {
    if (3..=4).contains(&mode.len()) && mode.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        Ok(())
    } else {
        Err(format!(
            "COPY mode {mode:?} is not three or four octal digits"
        ))
    }
}

/// Unpacks a `COPY` step's archive inside the build sandbox (as root) and copies `src` to
/// `dest` with Docker's rules: a directory's contents go into `dest`; a file goes into
/// `dest` when it ends in `/`, is a directory or `src` is a wildcard, else becomes `dest`.
/// Links stay links, dangling ones too.
const COPY_SCRIPT: &str = r#"set -eu
a="$COPPICE_ARCHIVE"; ctx="$a.d"
trap 'rm -rf "$ctx" "$a"' EXIT
mkdir -m 700 "$ctx"
tar -x --no-same-owner -f "$a" -C "$ctx"
cd "$ctx"
if [ -n "$COPPICE_OWNER" ]; then chown -R -h "$COPPICE_OWNER" .; fi
if [ -n "$COPPICE_MODE" ]; then find . -mindepth 1 ! -type d ! -type l -exec chmod "$COPPICE_MODE" {} +; fi
dest="$COPPICE_DEST"
found=0
IFS=
# Several sources (a wildcard) make the destination a directory, as in Docker.
case "$COPPICE_SRC" in *[*?[]*) case "$dest" in */) ;; *) dest="$dest/" ;; esac ;; esac
for s in $COPPICE_SRC; do
  s="${s%/}"; [ -n "$s" ] || s=.
  if [ ! -e "$s" ] && [ ! -L "$s" ]; then continue; fi
  found=1
  if [ -d "$s" ] && [ ! -L "$s" ]; then
    mkdir -p "$dest"
    cp -a "$s/." "$dest/"
  else
    case "$dest" in
      */) mkdir -p "$dest"; cp -a "$s" "$dest" ;;
      *) if [ -d "$dest" ] && [ ! -L "$dest" ]; then cp -a "$s" "$dest/"
         else mkdir -p "$(dirname "$dest")"; cp -a "$s" "$dest"; fi ;;
    esac
  fi
done
if [ "$found" != 1 ]; then echo "nothing in the uploaded files matches $COPPICE_SRC" >&2; exit 1; fi
"#;

impl Run<'_> {
    fn log(&self, level: &str, step: &str, message: &str) {
        log(
            &self.gw.builds,
            &self.job.build_id,
            level,
            Some(step),
            message,
        );
    }

    /// Runs step `name`.
    async fn step(&mut self, name: &str, step: &TemplateStep) -> Result<(), String> {
        let args = &step.args;
        let arg = |i: usize, what: &str| {
            args.get(i)
                .filter(|a| !a.is_empty())
                .cloned()
                .ok_or_else(|| format!("{} needs {what}", step.kind))
        };
        match step.kind.as_str() {
            "ENV" => {
                if args.is_empty() || !args.len().is_multiple_of(2) {
                    return Err("ENV needs pairs of name and value".into());
                }
                for pair in args.chunks(2) {
                    if pair[0].is_empty() || pair[0].contains('=') {
                        return Err(format!("ENV name {:?} is not valid", pair[0]));
                    }
                    self.log("info", name, &format!("ENV {}={}", pair[0], pair[1]));
                    self.state.env.insert(pair[0].clone(), pair[1].clone());
                }
                Ok(())
            }
            "USER" => {
                let user = arg(0, "a user name")?;
                self.log("info", name, &format!("USER {user}"));
                self.state.user = Some(user);
                Ok(())
            }
            "WORKDIR" => {
                let dir = absolute(&arg(0, "a directory")?, self.state.workdir.as_deref());
                self.log("info", name, &format!("WORKDIR {dir}"));
                let probe = TemplateStep {
                    args: vec![dir.clone()],
                    ..step.clone()
                };
                self.filesystem_step(name, &probe, Action::Workdir(&dir))
                    .await?;
                self.state.workdir = Some(dir);
                Ok(())
            }
            "RUN" => {
                let script = arg(0, "a command")?;
                self.log("info", name, &format!("RUN {script}"));
                self.filesystem_step(name, step, Action::Run).await
            }
            "COPY" => {
                let src = arg(0, "a source")?;
                let dest = arg(1, "a destination")?;
                self.log("info", name, &format!("COPY {src} {dest}"));
                self.filesystem_step(name, step, Action::Copy).await
            }
            other => Err(format!(
                "unknown step type {other:?}: this gateway builds RUN, COPY, ENV, WORKDIR and USER"
            )),
        }
    }

    /// Runs a step that changes files: from the cache when it holds the step's result, else
    /// in the build sandbox, whose result becomes a new layer.
    async fn filesystem_step(
        &mut self,
        name: &str,
        step: &TemplateStep,
        action: Action<'_>,
    ) -> Result<(), String> {
        let key = cache_key(&self.layer, &self.state, step);
        let forced = self.job.force || step.force == Some(true);
        if !forced {
            if let Some(layer) = self.cached(&key).await {
                // A cached step follows only cached steps (a rebuilt one's new layer changes
                // every later key), so no sandbox is running yet.
                self.stop().await;
                self.layer = layer;
                self.log("info", name, "CACHED");
                return Ok(());
            }
        }
        let sandbox = self.sandbox(name).await?;
        match action {
            Action::Run => self.run_command(name, &sandbox, step).await?,
            Action::Copy => self.copy(name, &sandbox, step).await?,
            Action::Workdir(dir) => self.workdir(name, &sandbox, dir).await?,
        }
        let layer = LayerId::new(format!("b-{}", uuid::Uuid::new_v4().simple()))
            .map_err(|e| e.to_string())?;
        self.gw
            .runtime
            .capture(&sandbox.0, &layer)
            .await
            .map_err(|e| {
                format!(
                    "capture the step's result: {}",
                    crate::api::error::error_chain(&e)
                )
            })?;
        if let Err(e) = self
            .gw
            .builds
            .store
            .cache(&key, layer.as_str(), crate::now().0)
        {
            tracing::warn!(error = %e, "caching a build step failed");
        }
        self.layer = layer;
        Ok(())
    }

    /// The build sandbox, started on the layer the build has reached if none runs.
    async fn sandbox(&mut self, name: &str) -> Result<(SandboxId, u32), String> {
        if let Some(s) = &self.sandbox {
            return Ok(s.clone());
        }
        let id = crate::runtime::mint_id().map_err(|e| e.to_string())?;
        self.log("info", name, "starting the build sandbox");
        let pid = self
            .gw
            .runtime
            .start_builder(&id, &self.layer, self.job.limits)
            .await
            .map_err(|e| {
                format!(
                    "start the build sandbox: {}",
                    crate::api::error::error_chain(&e)
                )
            })?;
        self.gw.builds.set_running(Some(id.clone()));
        self.sandbox = Some((id.clone(), pid));
        Ok((id, pid))
    }

    /// Runs the template's start and ready commands once in the build sandbox, after the
    /// last layer is captured (so what they write stays out of the template).
    async fn check_start(&mut self) -> Result<(), String> {
        let name = "finalize";
        let (id, _) = self.sandbox(name).await?;
        let socket = self.gw.runtime.socket(&id);
        let builds = &self.gw.builds;
        let build = self.job.build_id.as_str();
        let mut sink = |line: &str| log(builds, build, "info", Some(name), line);
        start::start_and_wait(&socket, None, &self.state, &mut sink).await
    }

    /// The cached result of the step key `key`, if its layer still exists.
    async fn cached(&self, key: &str) -> Option<LayerId> {
        let layer = self.gw.builds.store.cached(key).ok()??;
        let layer = LayerId::new(layer).ok()?;
        self.gw
            .runtime
            .has_layer(&layer)
            .await
            .ok()?
            .then_some(layer)
    }

    /// Kills the build sandbox, if one runs.
    async fn stop(&mut self) {
        if let Some((id, _)) = self.sandbox.take() {
            self.gw.runtime.destroy(&id).await;
            self.gw.builds.set_running(None);
        }
    }

    /// Runs `script` in the sandbox as `user`, logging its output under step `name`.
    async fn exec(
        &self,
        name: &str,
        sandbox: &(SandboxId, u32),
        cmd: &agent::Command<'_>,
    ) -> Result<Ending, String> {
        let socket = self.gw.runtime.socket(&sandbox.0);
        let builds = &self.gw.builds;
        let build = self.job.build_id.as_str();
        let mut sink = |line: &str| log(builds, build, "info", Some(name), line);
        agent::run(&socket, cmd, &mut sink).await
    }

    async fn run_command(
        &self,
        name: &str,
        sandbox: &(SandboxId, u32),
        step: &TemplateStep,
    ) -> Result<(), String> {
        let script = step.args.first().cloned().unwrap_or_default();
        let user = step
            .args
            .get(1)
            .filter(|u| !u.is_empty())
            .or(self.state.user.as_ref())
            .map_or("root", String::as_str);
        let ending = self
            .exec(
                name,
                sandbox,
                &agent::Command {
                    user,
                    script: &script,
                    envs: &self.state.env,
                    cwd: self.state.workdir.as_deref(),
                    timeout: STEP_TIMEOUT,
                    token: None,
                },
            )
            .await?;
        match ending {
            Ending::Exited(0) => Ok(()),
            Ending::Exited(code) => Err(format!(
                "RUN {script:?} (as {user}) failed with exit code {code}"
            )),
            Ending::Killed(status) => Err(format!(
                "RUN {script:?} (as {user}) was killed ({status}); a step may run for at most {} minutes",
                STEP_TIMEOUT.as_secs() / 60
            )),
        }
    }

    async fn workdir(
        &self,
        name: &str,
        sandbox: &(SandboxId, u32),
        dir: &str,
    ) -> Result<(), String> {
        let envs = [("COPPICE_DIR".to_owned(), dir.to_owned())].into();
        match self
            .exec(
                name,
                sandbox,
                &agent::Command {
                    user: "root",
                    script: r#"mkdir -p "$COPPICE_DIR""#,
                    envs: &envs,
                    cwd: Some("/"),
                    timeout: COPY_TIMEOUT,
                    token: None,
                },
            )
            .await?
        {
            Ending::Exited(0) => Ok(()),
            other => Err(format!("WORKDIR {dir}: cannot create it ({other:?})")),
        }
    }

    async fn copy(
        &self,
        name: &str,
        sandbox: &(SandboxId, u32),
        step: &TemplateStep,
    ) -> Result<(), String> {
        let src = step.args.first().cloned().unwrap_or_default();
        let dest = absolute(
            step.args.get(1).map_or("", String::as_str),
            self.state.workdir.as_deref(),
        );
        let owner = step
            .args
            .get(2)
            .filter(|o| !o.is_empty())
            .cloned()
            .or_else(|| self.state.user.clone().filter(|u| u != "root"))
            .unwrap_or_default();
        let mode = step.args.get(3).cloned().unwrap_or_default();
        if !mode.is_empty() {
            check_mode(&mode)?;
        }
        let hash = step
            .files_hash
            .clone()
            .ok_or_else(|| "COPY needs filesHash".to_owned())?;
        if !files::valid_hash(&hash) {
            return Err(format!(
                "COPY filesHash {hash:?} is not a SHA-256 hex digest"
            ));
        }
        let builds = &self.gw.builds;
        let archive = builds.file_path(&hash);
        if !archive.is_file() {
            return Err(format!(
                "the files of this COPY step (hash {hash}) were never uploaded"
            ));
        }
        // The SDK hashes the destination as it wrote it.
        let sdk_dest = step.args.get(1).cloned().unwrap_or_default();
        let (path, s, d) = (archive.clone(), src.clone(), sdk_dest);
        let checked = tokio::task::spawn_blocking(move || files::sdk_hash(&path, &s, &d))
            .await
            .map_err(|e| format!("check the uploaded files: {e}"))?;
        match checked {
            Ok(Some(computed)) if computed == hash => {
                self.log("info", name, "files hash checked");
            }
            Ok(Some(computed)) => {
                builds.forget_files(&hash);
                return Err(format!(
                    "the uploaded files do not match their hash: the SDK sent {hash}, the \
                     archive hashes to {computed}; upload them again"
                ));
            }
            Ok(None) => self.log(
                "warn",
                name,
                "the files hash cannot be checked: the archive holds directories, whose size \
                 the hash includes but a tar does not carry",
            ),
            Err(e) => {
                builds.forget_files(&hash);
                return Err(crate::api::error::error_chain(&e));
            }
        }
        // Into the sandbox through its init's root: a fresh name created exclusively in the
        // root directory, so no link the sandbox made is followed.
        let token = crate::runtime::random_token(20).ok_or("no randomness available")?;
        let inside = format!("/.coppice-copy-{token}");
        let host = std::path::PathBuf::from(format!("/proc/{}/root{inside}", sandbox.1));
        let from = archive.clone();
        tokio::task::spawn_blocking(move || {
            let mut src = std::fs::File::open(&from)?;
            let mut dst = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&host)?;
            std::io::copy(&mut src, &mut dst)?;
            dst.sync_all()
        })
        .await
        .map_err(|e| format!("move the files into the build sandbox: {e}"))?
        .map_err(|e| format!("move the files into the build sandbox: {e}"))?;
        let envs = [
            ("COPPICE_ARCHIVE".to_owned(), inside),
            ("COPPICE_SRC".to_owned(), src.clone()),
            ("COPPICE_DEST".to_owned(), dest.clone()),
            ("COPPICE_OWNER".to_owned(), owner),
            ("COPPICE_MODE".to_owned(), mode),
        ]
        .into();
        match self
            .exec(
                name,
                sandbox,
                &agent::Command {
                    user: "root",
                    script: COPY_SCRIPT,
                    envs: &envs,
                    cwd: Some("/"),
                    timeout: COPY_TIMEOUT,
                    token: None,
                },
            )
            .await?
        {
            Ending::Exited(0) => Ok(()),
            Ending::Exited(code) => Err(format!(
                "COPY {src} {dest} failed (exit code {code}); the step's log says why"
            )),
            Ending::Killed(status) => Err(format!("COPY {src} {dest} was killed ({status})")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e2bs_base_image_is_the_built_in_base() {
        assert!(is_e2b_base("e2bdev/base"));
        assert!(is_e2b_base("e2bdev/base:latest"));
        assert!(is_e2b_base("docker.io/e2bdev/base"));
        assert!(!is_e2b_base("e2bdev/base:other"));
        assert!(!is_e2b_base("python:3.12"));
    }

    #[test]
    fn cache_keys_cover_the_layer_the_state_and_the_step() {
        let layer = LayerId::new("base").unwrap();
        let step = TemplateStep {
            kind: "RUN".into(),
            args: vec!["echo hi".into()],
            files_hash: None,
            force: None,
            force_upload: None,
        };
        let state = Defaults::default();
        let k = cache_key(&layer, &state, &step);
        assert_eq!(k.len(), 64);
        assert_eq!(k, cache_key(&layer, &state, &step));
        assert_ne!(k, cache_key(&LayerId::new("other").unwrap(), &state, &step));
        let mut env = state.clone();
        env.env.insert("A".into(), "1".into());
        assert_ne!(k, cache_key(&layer, &env, &step));
        let mut other = step.clone();
        other.files_hash = Some("x".into());
        assert_ne!(k, cache_key(&layer, &state, &other));
        // The force flag is not part of the key: forcing rebuilds, it does not rename.
        other = step.clone();
        other.force = Some(true);
        assert_eq!(k, cache_key(&layer, &state, &other));
    }

    #[test]
    fn paths_and_modes_follow_dockers_rules() {
        assert_eq!(absolute("/a", Some("/w")), "/a");
        assert_eq!(absolute("a", Some("/w/")), "/w/a");
        assert_eq!(absolute("a", None), "/a");
        check_mode("0755").unwrap();
        check_mode("644").unwrap();
        for bad in ["", "9", "07555", "rwx"] {
            check_mode(bad).unwrap_err();
        }
    }
}
