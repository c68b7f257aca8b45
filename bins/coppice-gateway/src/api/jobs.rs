//! Seed 002's build jobs, thin over E2B's build protocol (`api/builds.rs`) and its engine:
//! `POST /templates/build` requests and starts a build in one call, from an image
//! reference or a template and a list of steps; its build id is the job id.
//! `GET /templates/builds/{job}/logs` reads the job's log lines, and
//! `GET /templates/builds/{job}/events` streams them as Server-Sent Events, one `log` event
//! per line, ending with one `end` event that carries the job's terminal status.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use coppice_wire::build::{TemplateBuildRequestV3, TemplateBuildStartV2, TemplateStep};
use http::{header, Response, StatusCode};
use http_body_util::BodyExt;
use serde::Deserialize;

use crate::api::builds::{entry, level_rank, new_build, number, start_build, wire_status};
use crate::api::error::ApiError;
use crate::api::sandboxes::parse;
use crate::api::templates::path_param;
use crate::api::{json, Body};
use crate::builds::store::Status;
use crate::builds::Builds;
use crate::Gateway;

type Result<T> = std::result::Result<T, ApiError>;

/// How often the event stream looks for new lines.
const POLL: Duration = Duration::from_millis(200);
/// A comment line sent when nothing else was for this long, so proxies keep the stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Most lines one `logs` answer holds.
const MAX_LINES: usize = 1000;

/// `POST /templates/build`'s body.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct JobRequest {
    /// The template's name, optionally `name:tag`.
    name: String,
    /// An OCI image reference to build from.
    #[serde(default)]
    image: Option<String>,
    /// Credentials for `image`'s registry (E2B's `fromImageRegistry` shape).
    #[serde(default)]
    image_registry: Option<serde_json::Value>,
    /// A template to build from.
    #[serde(default)]
    from_template: Option<String>,
    /// The steps, as E2B's (`RUN`, `ENV`, `WORKDIR`, `USER`; `COPY` needs uploaded files).
    #[serde(default)]
    steps: Vec<TemplateStep>,
    /// More tags.
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    cpu_count: Option<i64>,
    #[serde(default, rename = "memoryMB")]
    memory_mb: Option<i64>,
    #[serde(default)]
    start_cmd: Option<String>,
    #[serde(default)]
    ready_cmd: Option<String>,
    /// Rebuild every step.
    #[serde(default)]
    force: Option<bool>,
}

/// `POST /templates/build`: 202 with the job (`jobID`, the build's id), which runs in the
/// background. Neither `image` nor `fromTemplate`: E2B's base image (the built-in `base`).
pub(crate) fn create(gw: &Gateway, body: &Bytes) -> Result<Response<Body>> {
    let req: JobRequest = parse(body)?;
    if let Some(i) = req.steps.iter().position(|s| s.kind == "COPY") {
        return Err(ApiError::bad_request(format!(
            "steps[{i}]: COPY needs files uploaded through E2B's build protocol (POST \
             /v3/templates and its files links); this route builds from RUN, ENV, WORKDIR and \
             USER steps"
        )));
    }
    if req.image.is_some() && req.from_template.is_some() {
        return Err(ApiError::bad_request(
            "give image or fromTemplate, not both",
        ));
    }
    let made = new_build(
        gw,
        &TemplateBuildRequestV3 {
            name: Some(req.name),
            tags: req.tags,
            cpu_count: req.cpu_count,
            memory_mb: req.memory_mb,
            ..TemplateBuildRequestV3::default()
        },
    )?;
    start_build(
        gw,
        &made.template_id,
        &made.build_id,
        TemplateBuildStartV2 {
            from_image: req.image,
            from_template: req.from_template,
            from_image_registry: req.image_registry,
            force: req.force,
            steps: Some(req.steps),
            start_cmd: req.start_cmd,
            ready_cmd: req.ready_cmd,
        },
    )?;
    let job = &made.build_id;
    Ok(json(
        StatusCode::ACCEPTED,
        &serde_json::json!({
            "jobID": job,
            "templateID": made.template_id,
            "name": made.names.first(),
            "tags": made.tags,
            "status": "building",
            "logs": format!("/templates/builds/{job}/logs"),
            "events": format!("/templates/builds/{job}/events"),
        }),
    ))
}

/// The build `raw` names.
fn job(gw: &Gateway, raw: &str) -> Result<crate::builds::store::BuildRow> {
    let id = path_param(raw, "job id")?;
    gw.builds
        .store
        .build(&id)?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("build job {id:?} not found")))
}

/// The job's status and reason as JSON.
fn ending(build: &crate::builds::store::BuildRow) -> serde_json::Value {
    serde_json::json!({
        "jobID": build.id,
        "templateID": build.template_id,
        "status": wire_status(build.status),
        "reason": build.reason,
    })
}

/// `GET /templates/builds/{job}/logs`: the job's status and its log lines from `offset`
/// (default 0), at most `limit` (default and most 1000), at least `level`.
pub(crate) fn logs(gw: &Gateway, raw: &str, query: &str) -> Result<Response<Body>> {
    let build = job(gw, raw)?;
    let mut offset = 0usize;
    let mut limit = MAX_LINES;
    let mut min_level = 0usize;
    for (name, value) in
        coppice_wire::query::pairs(query).map_err(|e| ApiError::bad_request(e.to_string()))?
    {
        match name.as_str() {
            "offset" => {
                offset = usize::try_from(number("offset", &value, u64::from(u32::MAX))?)
                    .unwrap_or(usize::MAX);
            }
            "limit" => {
                limit = usize::try_from(number("limit", &value, MAX_LINES as u64)?)
                    .unwrap_or(MAX_LINES);
            }
            "level" => {
                min_level = level_rank(&value);
                if !matches!(value.as_str(), "debug" | "info" | "warn" | "error") {
                    return Err(ApiError::bad_request(format!(
                        "level must be one of debug, info, warn, error; got {value:?}"
                    )));
                }
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {other:?}"
                )))
            }
        }
    }
    let lines: Vec<_> = gw
        .builds
        .store
        .logs(&build.id)?
        .iter()
        .filter(|r| level_rank(&r.level) >= min_level)
        .skip(offset)
        .take(limit)
        .map(entry)
        .collect();
    let mut body = ending(&build);
    body["logs"] = serde_json::json!(lines);
    Ok(json(StatusCode::OK, &body))
}

/// `GET /templates/builds/{job}/events`: Server-Sent Events. Each log line is an event
/// `log` whose `id` is its index and whose data is the line as JSON; once the job has
/// ended and every line is sent, one event `end` with its status and reason, and the
/// stream closes. `Last-Event-ID` resumes after that line.
pub(crate) fn events(
    gw: &Gateway,
    raw: &str,
    last_event_id: Option<&header::HeaderValue>,
) -> Result<Response<Body>> {
    let build = job(gw, raw)?;
    let from = match last_event_id {
        None => 0,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .map(|n| n + 1)
            .ok_or_else(|| ApiError::bad_request("Last-Event-ID must be a line number"))?,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(stream(Arc::clone(&gw.builds), build.id, from, tx));
    let body = Channel(rx).boxed();
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    Ok(resp)
}

/// Sends the job's lines from `next` on, then its end; stops when the client goes.
async fn stream(
    builds: Arc<Builds>,
    job: String,
    mut next: usize,
    tx: tokio::sync::mpsc::Sender<Bytes>,
) {
    let mut quiet = std::time::Instant::now();
    loop {
        // The status first: lines read after it include every line of an ended build.
        let Ok(Some(build)) = builds.store.build(&job) else {
            return;
        };
        let Ok(rows) = builds.store.logs(&job) else {
            return;
        };
        for (i, row) in rows.iter().enumerate().skip(next) {
            let data = serde_json::to_string(&entry(row)).unwrap_or_default();
            if tx
                .send(Bytes::from(format!(
                    "id: {i}\nevent: log\ndata: {data}\n\n"
                )))
                .await
                .is_err()
            {
                return;
            }
            next = i + 1;
            quiet = std::time::Instant::now();
        }
        if matches!(build.status, Status::Ready | Status::Error) {
            let data = ending(&build).to_string();
            let _ = tx
                .send(Bytes::from(format!("event: end\ndata: {data}\n\n")))
                .await;
            return;
        }
        if quiet.elapsed() >= KEEP_ALIVE {
            if tx
                .send(Bytes::from_static(b": keep-alive\n\n"))
                .await
                .is_err()
            {
                return;
            }
            quiet = std::time::Instant::now();
        }
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            () = tx.closed() => return,
        }
    }
}

/// A body fed by a channel; it ends when the sender is dropped.
struct Channel(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for Channel {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<std::result::Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|b| b.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}
