//! E2B's template build protocol, as `Template.build` drives it: `POST /v3/templates` (a
//! build of a named template), `GET /templates/{id}/files/{hash}` (whether a `COPY` step's
//! files are here, and a one-time upload link), `PUT /builds/uploads/{token}` (the upload,
//! authorised by its token alone), `POST /v2/templates/{id}/builds/{buildID}` (the steps),
//! `GET .../status` and `GET .../logs`, and the tag routes. The engine is
//! [`crate::builds::engine`].

use std::time::Duration;

use bytes::Bytes;
use coppice_wire::build::{
    AssignTemplateTagsRequest, AssignedTemplateTags, BuildLogEntry, BuildStatusReason,
    DeleteTemplateTagsRequest, TemplateBuildFileUpload, TemplateBuildInfo,
    TemplateBuildLogsResponse, TemplateBuildRequestV3, TemplateBuildStartV2,
    TemplateRequestResponseV3, TemplateTag,
};
use coppice_wire::template::BuildStatus;
use coppice_wire::timestamp::format_millis;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::api::error::ApiError;
use crate::api::sandboxes::{cpu_count, memory_mb, parse};
use crate::api::templates::path_param;
use crate::api::{empty, json, Body};
use crate::builds::store::{LogRow, NewBuild, Status};
use crate::builds::{self, files, Base, BuildsError, Job, DEFAULT_TAG};
use crate::runtime::{Runtime, DEFAULT_LIMITS};
use crate::Gateway;

type Result<T> = std::result::Result<T, ApiError>;

/// The path prefix of upload links.
pub(crate) const UPLOAD_PREFIX: &str = "/builds/uploads/";
/// The largest archive an upload may carry.
const MAX_UPLOAD: u64 = 1 << 30;
/// How long an upload may take.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// The most vCPUs a template's sandboxes may have.
const MAX_CPUS: u32 = 64;
/// The least memory a template's sandboxes may have (E2B's minimum), in MiB.
const MIN_MEMORY_MB: u64 = 128;
/// The most memory a template's sandboxes may have, in MiB.
const MAX_MEMORY_MB: u64 = 256 * 1024;
/// The most log lines a page holds, and its default (E2B's).
const MAX_LOGS: usize = 100;

/// E2B's wire status of a build.
pub(crate) fn wire_status(s: Status) -> BuildStatus {
    match s {
        Status::Waiting => BuildStatus::Waiting,
        Status::Building => BuildStatus::Building,
        Status::Ready => BuildStatus::Ready,
        Status::Error => BuildStatus::Error,
    }
}

fn built_in(name: &str, what: &str) -> ApiError {
    BuildsError::BuiltIn(format!(
        "template {name:?} is built into this gateway and cannot be {what}"
    ))
    .into()
}

/// `POST /v3/templates`: 202 with the template (made on its first build) and a new build,
/// `waiting` for its steps.
pub(crate) fn request(gw: &Gateway, body: &Bytes) -> Result<Response<Body>> {
    let req: TemplateBuildRequestV3 = parse(body)?;
    Ok(json(StatusCode::ACCEPTED, &new_build(gw, &req)?))
}

/// Makes the template `req` names (on its first build) and a new build of it, `waiting`.
pub(crate) fn new_build(
    gw: &Gateway,
    req: &TemplateBuildRequestV3,
) -> Result<TemplateRequestResponseV3> {
    let full = req
        .name
        .clone()
        .or(req.alias.clone())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::bad_request("name is required"))?;
    let (name, tag) = match full.rsplit_once(':') {
        Some((n, t)) => (n.to_owned(), Some(t.to_owned())),
        None => (full.clone(), None),
    };
    builds::check_name(&name)?;
    if Runtime::knows_template(&name) {
        return Err(built_in(&name, "rebuilt"));
    }
    let mut tags: Vec<String> = tag.into_iter().collect();
    tags.extend(req.tags.clone().unwrap_or_default());
    for t in &tags {
        builds::check_tag(t)?;
    }
    if tags.is_empty() {
        tags.push(DEFAULT_TAG.to_owned());
    }
    tags.dedup();
    // The size of the template's sandboxes (and of its build sandbox): E2B's minimums, and
    // bounds that keep one create from asking for a machine's worth.
    let cpus = req.cpu_count.map_or(Ok(cpu_count(&DEFAULT_LIMITS)), |c| {
        u32::try_from(c)
            .ok()
            .filter(|c| (1..=MAX_CPUS).contains(c))
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "cpuCount must be a whole number from 1 to {MAX_CPUS}, got {c}"
                ))
            })
    })?;
    let memory = req
        .memory_mb
        .map_or(Ok(memory_mb(&DEFAULT_LIMITS)), |m| {
            u64::try_from(m)
                .ok()
                .filter(|m| (MIN_MEMORY_MB..=MAX_MEMORY_MB).contains(m))
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "memoryMB must be a whole number from {MIN_MEMORY_MB} to {MAX_MEMORY_MB}, got {m}"
                    ))
                })
        })?;
    let new_id = crate::runtime::random_token(crate::runtime::SANDBOX_ID_LEN)
        .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "no randomness"))?;
    let build_id = uuid::Uuid::new_v4().to_string();
    let (template, build) = gw.builds.store.request(
        &NewBuild {
            name: &name,
            new_template_id: &new_id,
            build_id: &build_id,
            tags: &tags,
            cpu_count: cpus,
            memory_mb: memory,
        },
        crate::now().0,
    )?;
    tracing::info!(template = %template.id, name = %name, build = %build.id, "template build requested");
    Ok(TemplateRequestResponseV3 {
        template_id: template.id,
        build_id: build.id,
        public: template.public,
        names: vec![template.name.clone()],
        tags: build.tags,
        aliases: vec![template.name],
    })
}

fn built_template(gw: &Gateway, raw_id: &str) -> Result<crate::builds::store::TemplateRow> {
    let id = path_param(raw_id, "template id")?;
    gw.builds.template(&id)?.ok_or_else(|| {
        if Runtime::knows_template(builds::split_tag(&id).0) {
            built_in(&id, "built")
        } else {
            ApiError::new(StatusCode::NOT_FOUND, format!("template {id:?} not found"))
        }
    })
}

/// `GET /templates/{templateID}/files/{hash}`: 201 with whether the files with `hash` are
/// here, and a one-time link to upload them to (used when they are not, or when the SDK
/// forces the upload). `base` is the scheme and authority the request came in on.
pub(crate) fn file_link(
    gw: &Gateway,
    raw_id: &str,
    raw_hash: &str,
    base: &str,
) -> Result<Response<Body>> {
    built_template(gw, raw_id)?;
    let hash = path_param(raw_hash, "hash")?;
    if !files::valid_hash(&hash) {
        return Err(ApiError::bad_request(format!(
            "invalid hash {hash:?}: expected a SHA-256 hex digest"
        )));
    }
    let token = gw
        .builds
        .upload_token(&hash)
        .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "no randomness"))?;
    Ok(json(
        StatusCode::CREATED,
        &TemplateBuildFileUpload {
            present: gw.builds.has_files(&hash),
            url: Some(format!("{base}{UPLOAD_PREFIX}{token}")),
        },
    ))
}

/// `PUT /builds/uploads/{token}`: stores the body as the files of the hash the token was
/// minted for. The token is the only credential (as a presigned URL is) and works once;
/// 403 for an unknown or used one, 413 past [`MAX_UPLOAD`].
pub(crate) async fn upload(
    gw: &Gateway,
    token: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>> {
    let hash = gw.builds.take_upload(token).ok_or_else(|| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "this upload link is unknown, expired or already used; ask for a new one",
        )
    })?;
    let staging = gw
        .builds
        .staging_path(&hash)
        .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "no randomness"))?;
    let written = tokio::time::timeout(UPLOAD_TIMEOUT, write_body(req.into_body(), &staging)).await;
    let result = match written {
        Ok(r) => r,
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!("the upload took longer than {}s", UPLOAD_TIMEOUT.as_secs()),
        )),
    };
    if let Err(e) = result {
        let _ = tokio::fs::remove_file(&staging).await;
        return Err(e);
    }
    let dest = gw.builds.file_path(&hash);
    tokio::fs::rename(&staging, &dest).await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("store the upload as {}: {e}", dest.display()),
        )
    })?;
    Ok(empty(StatusCode::OK))
}

async fn write_body(mut body: Incoming, path: &std::path::Path) -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let io_err = |e: std::io::Error| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("write the upload to {}: {e}", path.display()),
        )
    };
    let mut file = tokio::fs::File::create(path).await.map_err(io_err)?;
    let mut total: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| ApiError::bad_request(format!("cannot read the upload: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        total += u64::try_from(data.len()).unwrap_or(u64::MAX);
        if total > MAX_UPLOAD {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the upload is larger than {MAX_UPLOAD} bytes"),
            ));
        }
        file.write_all(&data).await.map_err(io_err)?;
    }
    file.sync_all().await.map_err(io_err)?;
    if total == 0 {
        return Err(ApiError::bad_request("the upload is empty"));
    }
    Ok(())
}

/// `fromImageRegistry`: E2B's `registry` type (username and password, for basic or token
/// auth); `aws` and `gcp` are 400s that name them.
fn registry_credentials(
    value: Option<&serde_json::Value>,
) -> Result<Option<coppice_zfs::image::Credentials>> {
    let Some(v) = value.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let field = |name: &str| v.get(name).and_then(serde_json::Value::as_str);
    match field("type") {
        Some("registry") => {
            let (Some(username), Some(password)) = (field("username"), field("password")) else {
                return Err(ApiError::bad_request(
                    "fromImageRegistry of type registry needs username and password strings",
                ));
            };
            if let Some(extra) = v
                .as_object()
                .and_then(|o| o.keys().find(|k| !matches!(k.as_str(), "type" | "username" | "password")))
            {
                return Err(ApiError::bad_request(format!(
                    "fromImageRegistry: unknown field {extra:?}"
                )));
            }
            Ok(Some(coppice_zfs::image::Credentials {
                username: username.to_owned(),
                password: password.to_owned(),
            }))
        }
        Some(t @ ("aws" | "gcp")) => Err(ApiError::bad_request(format!(
            "fromImageRegistry of type {t:?} is not supported by this gateway; use type \"registry\" \
             with a username and password (a token) for the registry"
        ))),
        Some(other) => Err(ApiError::bad_request(format!(
            "fromImageRegistry: unknown type {other:?} (expected \"registry\", \"aws\" or \"gcp\")"
        ))),
        None => Err(ApiError::bad_request("fromImageRegistry needs a type")),
    }
}

/// `POST /v2/templates/{templateID}/builds/{buildID}`: 202, and the build runs.
/// `fromImageRegistry` of a type other than `registry` is a 400; a build already started
/// is a 409.
pub(crate) fn trigger(
    gw: &Gateway,
    raw_id: &str,
    raw_build: &str,
    body: &Bytes,
) -> Result<Response<Body>> {
    let template = built_template(gw, raw_id)?;
    let build_id = path_param(raw_build, "build id")?;
    let req: TemplateBuildStartV2 = parse(body)?;
    start_build(gw, &template.id, &build_id, req)?;
    Ok(empty(StatusCode::ACCEPTED))
}

/// Starts the build `build_id` of the template `template_id` as `req` says: queued,
/// `building`.
pub(crate) fn start_build(
    gw: &Gateway,
    template_id: &str,
    build_id: &str,
    req: TemplateBuildStartV2,
) -> Result<()> {
    let build = gw.builds.build_of(template_id, build_id)?;
    let registry = registry_credentials(req.from_image_registry.as_ref())?;
    if registry.is_some() && req.from_image.is_none() {
        return Err(ApiError::bad_request(
            "fromImageRegistry needs fromImage: it holds the credentials of fromImage's registry",
        ));
    }
    let base = match (req.from_template.clone(), req.from_image.clone()) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "give fromTemplate or fromImage, not both",
            ))
        }
        (Some(t), None) => Base::Template(t),
        (None, Some(i)) => Base::Image(i),
        (None, None) => Base::Image(crate::builds::engine::E2B_BASE_IMAGE.to_owned()),
    };
    if !gw.builds.store.start(&build.id, crate::now().0)? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "build {} has already been started (it is {})",
                build.id,
                build.status.as_str()
            ),
        ));
    }
    let job = Job {
        build_id: build.id.clone(),
        template_id: build.template_id.clone(),
        base,
        steps: req.steps.unwrap_or_default(),
        force: req.force.unwrap_or(false),
        limits: builds::limits_of(&build),
        start_cmd: req.start_cmd.filter(|c| !c.is_empty()),
        ready_cmd: req.ready_cmd.filter(|c| !c.is_empty()),
        registry,
    };
    if let Err(e) = gw.builds.enqueue(job) {
        let reason = crate::builds::store::Reason {
            message: e.to_string(),
            step: None,
        };
        gw.builds.store.fail(&build.id, &reason, crate::now().0)?;
        return Err(e.into());
    }
    tracing::info!(template = %build.template_id, build = %build.id, "template build started");
    Ok(())
}

/// The log levels, least severe first.
const LEVELS: [&str; 4] = ["debug", "info", "warn", "error"];

pub(crate) fn level_rank(level: &str) -> usize {
    LEVELS.iter().position(|l| *l == level).unwrap_or(1)
}

pub(crate) fn entry(row: &LogRow) -> BuildLogEntry {
    BuildLogEntry {
        timestamp: format_millis(row.at),
        message: row.message.clone(),
        level: row.level.clone(),
        step: row.step.clone(),
    }
}

/// Reads `name`'s value as a whole number from 0 to `max`.
pub(crate) fn number(name: &str, value: &str, max: u64) -> Result<u64> {
    value
        .parse::<u64>()
        .ok()
        .filter(|n| *n <= max)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "{name} must be a whole number from 0 to {max}, got {value:?}"
            ))
        })
}

fn level_param(value: &str) -> Result<usize> {
    LEVELS.iter().position(|l| *l == value).ok_or_else(|| {
        ApiError::bad_request(format!(
            "level must be one of debug, info, warn, error; got {value:?}"
        ))
    })
}

/// `GET /templates/{templateID}/builds/{buildID}/status`: the status with the log lines
/// from `logsOffset` (at most `limit`, at least `level`). `logs` and `logEntries` are always
/// present; an ended build answers with an empty page past its last line.
pub(crate) fn status(
    gw: &Gateway,
    raw_id: &str,
    raw_build: &str,
    query: &str,
) -> Result<Response<Body>> {
    let template = built_template(gw, raw_id)?;
    let build_id = path_param(raw_build, "build id")?;
    let mut offset = 0usize;
    let mut limit = MAX_LOGS;
    let mut min_level = 0usize;
    for (name, value) in
        coppice_wire::query::pairs(query).map_err(|e| ApiError::bad_request(e.to_string()))?
    {
        match name.as_str() {
            "logsOffset" => {
                offset = usize::try_from(number("logsOffset", &value, u64::from(u32::MAX))?)
                    .unwrap_or(usize::MAX);
            }
            "limit" => {
                limit =
                    usize::try_from(number("limit", &value, MAX_LOGS as u64)?).unwrap_or(MAX_LOGS);
            }
            "level" => min_level = level_param(&value)?,
            _ => {}
        }
    }
    let build = gw.builds.build_of(&template.id, &build_id)?;
    let rows = gw.builds.store.logs(&build.id)?;
    let page: Vec<BuildLogEntry> = rows
        .iter()
        .filter(|r| level_rank(&r.level) >= min_level)
        .skip(offset)
        .take(limit)
        .map(entry)
        .collect();
    let reason = build.reason.as_ref().map(|r| BuildStatusReason {
        message: r.message.clone(),
        step: r.step.clone(),
        log_entries: rows
            .iter()
            .filter(|row| row.level == "error")
            .map(entry)
            .collect(),
    });
    Ok(json(
        StatusCode::OK,
        &TemplateBuildInfo {
            logs: page.iter().map(|e| e.message.clone()).collect(),
            log_entries: page,
            template_id: template.id,
            build_id: build.id,
            status: wire_status(build.status),
            reason,
        },
    ))
}

/// `GET /templates/{templateID}/builds/{buildID}/logs`: lines from `cursor` (ms, inclusive)
/// on, `forward` (default) or `backward`, at most `limit`, at least `level`. Every line is
/// kept for good, so `source` (`temporary` or `persistent`) reads the same lines.
pub(crate) fn logs(
    gw: &Gateway,
    raw_id: &str,
    raw_build: &str,
    query: &str,
) -> Result<Response<Body>> {
    let template = built_template(gw, raw_id)?;
    let build_id = path_param(raw_build, "build id")?;
    let mut cursor: Option<u64> = None;
    let mut limit = MAX_LOGS;
    let mut backward = false;
    let mut min_level = 0usize;
    for (name, value) in
        coppice_wire::query::pairs(query).map_err(|e| ApiError::bad_request(e.to_string()))?
    {
        match name.as_str() {
            "cursor" => cursor = Some(number("cursor", &value, i64::MAX as u64)?),
            "limit" => {
                limit =
                    usize::try_from(number("limit", &value, MAX_LOGS as u64)?).unwrap_or(MAX_LOGS);
            }
            "direction" => {
                backward = match value.as_str() {
                    "forward" => false,
                    "backward" => true,
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "direction must be forward or backward, got {other:?}"
                        )))
                    }
                }
            }
            "level" => min_level = level_param(&value)?,
            "source" if !matches!(value.as_str(), "temporary" | "persistent") => {
                return Err(ApiError::bad_request(format!(
                    "source must be temporary or persistent, got {value:?}"
                )));
            }
            _ => {}
        }
    }
    let build = gw.builds.build_of(&template.id, &build_id)?;
    let rows = gw.builds.store.logs(&build.id)?;
    let matching = rows.iter().filter(|r| level_rank(&r.level) >= min_level);
    let logs: Vec<BuildLogEntry> = if backward {
        let mut v: Vec<BuildLogEntry> = matching
            .filter(|r| cursor.is_none_or(|c| r.at <= c))
            .map(entry)
            .collect();
        v.reverse();
        v.truncate(limit);
        v
    } else {
        matching
            .filter(|r| cursor.is_none_or(|c| r.at >= c))
            .take(limit)
            .map(entry)
            .collect()
    };
    Ok(json(StatusCode::OK, &TemplateBuildLogsResponse { logs }))
}

/// `POST /templates/tags`: points `tags` of the template `target` names (`name:tag`) at the
/// build its tag names; 201.
pub(crate) fn assign_tags(gw: &Gateway, body: &Bytes) -> Result<Response<Body>> {
    let req: AssignTemplateTagsRequest = parse(body)?;
    if req.tags.is_empty() {
        return Err(ApiError::bad_request("tags must not be empty"));
    }
    for t in &req.tags {
        builds::check_tag(t)?;
    }
    let (name, _) = builds::split_tag(&req.target);
    if Runtime::knows_template(name) {
        return Err(built_in(name, "tagged"));
    }
    let resolved = gw.builds.resolve(&req.target)?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("template {name:?} not found"),
        )
    })?;
    gw.builds.store.assign_tags(
        &resolved.template_id,
        &resolved.build_id,
        &req.tags,
        crate::now().0,
    )?;
    Ok(json(
        StatusCode::CREATED,
        &AssignedTemplateTags {
            tags: req.tags,
            build_id: resolved.build_id,
        },
    ))
}

/// `DELETE /templates/tags`: removes `tags` from the template `name`; 204, 404 for an
/// unknown template.
pub(crate) fn remove_tags(gw: &Gateway, body: &Bytes) -> Result<Response<Body>> {
    let req: DeleteTemplateTagsRequest = parse(body)?;
    let (name, _) = builds::split_tag(&req.name);
    if Runtime::knows_template(name) {
        return Err(built_in(name, "untagged"));
    }
    let template = gw.builds.store.template(name)?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("template {name:?} not found"),
        )
    })?;
    gw.builds.store.remove_tags(&template.id, &req.tags)?;
    Ok(empty(StatusCode::NO_CONTENT))
}

/// `GET /templates/{templateID}/tags`: a built template's tags; a built-in template has the
/// one tag `default`, on its one build.
pub(crate) fn tags(gw: &Gateway, raw_id: &str) -> Result<Response<Body>> {
    let id = path_param(raw_id, "template id")?;
    if let Some(entry) = gw.templates.get(&id) {
        let created = match entry.state {
            crate::catalogue::BuildState::Ready { built_at } => built_at.0,
            _ => entry.started_at.0,
        };
        return Ok(json(
            StatusCode::OK,
            &vec![TemplateTag {
                tag: DEFAULT_TAG.to_owned(),
                build_id: entry.build_id.to_string(),
                created_at: format_millis(created),
            }],
        ));
    }
    let template = gw.builds.template(&id)?.ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, format!("template {id:?} not found"))
    })?;
    let items: Vec<TemplateTag> = gw
        .builds
        .store
        .tags(&template.id)?
        .into_iter()
        .map(|t| TemplateTag {
            tag: t.tag,
            build_id: t.build_id,
            created_at: format_millis(t.created_at),
        })
        .collect();
    Ok(json(StatusCode::OK, &items))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_rank_from_debug_to_error() {
        assert!(level_rank("error") > level_rank("warn"));
        assert!(level_rank("info") > level_rank("debug"));
        assert_eq!(level_param("warn").unwrap(), 2);
        assert_eq!(
            level_param("loud").unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(number("limit", "100", 100).unwrap(), 100);
        assert_eq!(
            number("limit", "101", 100).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }
}
