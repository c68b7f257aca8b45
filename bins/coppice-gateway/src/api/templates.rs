//! The template catalogue: `GET /templates`, `GET /v2/templates`, `GET /templates/{id}`,
//! `GET /templates/aliases/{alias}`, and `DELETE`/`PATCH` of a template. The catalogue is the
//! built-in templates ([`crate::runtime::TEMPLATES`], each build's state in
//! [`crate::catalogue`]), which refuse changes, followed by the templates built with E2B's
//! `Template` builder ([`crate::builds`]), with the limits their sandboxes get
//! ([`crate::runtime::DEFAULT_LIMITS`]) and the spawns the registry counts. Building is
//! `api/builds.rs`.

use bytes::Bytes;
use coppice_wire::template::{
    BuildStatus, Template, TemplateAliasResponse, TemplateBuild, TemplateUpdateRequest,
    TemplateWithBuilds,
};
use coppice_wire::timestamp::format_millis;
use http::{HeaderValue, Response, StatusCode};

use crate::api::builds::wire_status;
use crate::api::error::ApiError;
use crate::api::sandboxes::{cpu_count, memory_mb, parse, DISK_SIZE_MB, ENVD_VERSION};
use crate::api::{empty, json, Body};
use crate::builds::store::{BuildRow, Status, TemplateRow};
use crate::catalogue::{BuildState, Entry};
use crate::registry::Spawns;
use crate::runtime::DEFAULT_LIMITS;
use crate::Gateway;

type Result<T> = std::result::Result<T, ApiError>;

/// The most items a page of `GET /v2/templates` holds, and its default (E2B's).
const MAX_LIMIT: usize = 100;

/// A percent-encoded path parameter, decoded: the SDKs encode template ids and aliases
/// (`team%2Fname%3Atag`). A `%` not followed by two hex digits, a result that is not UTF-8,
/// and an empty result are 400s.
pub(crate) fn path_param(raw: &str, what: &str) -> Result<String> {
    let bytes = raw.as_bytes();
    let well_formed = bytes.iter().enumerate().all(|(i, b)| {
        *b != b'%'
            || bytes
                .get(i + 1..i + 3)
                .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    });
    let decoded = well_formed
        .then(|| coppice_wire::query::percent_decode(raw, false))
        .flatten()
        .ok_or_else(|| {
            ApiError::bad_request(format!("invalid {what} {raw:?}: bad percent-encoding"))
        })?;
    if decoded.is_empty() {
        return Err(ApiError::bad_request(format!("{what} must not be empty")));
    }
    Ok(decoded)
}

/// What a template's build says about it: status, created and updated, and how many builds
/// finished.
fn build_times(entry: &Entry) -> (BuildStatus, u64, u64, u32) {
    match &entry.state {
        BuildState::Building => (
            BuildStatus::Building,
            entry.started_at.0,
            entry.started_at.0,
            0,
        ),
        BuildState::Ready { built_at } => (BuildStatus::Ready, built_at.0, built_at.0, 1),
        BuildState::Failed { at, .. } => (BuildStatus::Error, entry.started_at.0, at.0, 0),
    }
}

/// The list item of `entry`.
fn template_body(entry: &Entry, spawns: Spawns) -> Template {
    let (status, created, updated, build_count) = build_times(entry);
    Template {
        template_id: entry.name.to_owned(),
        build_id: entry.build_id.to_string(),
        cpu_count: cpu_count(&DEFAULT_LIMITS),
        memory_mb: memory_mb(&DEFAULT_LIMITS),
        disk_size_mb: DISK_SIZE_MB,
        // Every team may use a built-in template, as E2B's `base` is public.
        public: true,
        aliases: vec![entry.name.to_owned()],
        names: vec![entry.name.to_owned()],
        created_at: format_millis(created),
        updated_at: format_millis(updated),
        created_by: None,
        last_spawned_at: last_spawned(spawns),
        spawn_count: spawns.count,
        build_count,
        envd_version: ENVD_VERSION.to_owned(),
        build_status: status,
    }
}

fn last_spawned(spawns: Spawns) -> Option<String> {
    (spawns.count > 0).then(|| format_millis(spawns.last_at))
}

/// `GET /templates/{id}`'s body for `entry`: the template with its one build.
fn with_builds(entry: &Entry, spawns: Spawns) -> TemplateWithBuilds {
    let (status, created, updated, _) = build_times(entry);
    let finished = !matches!(entry.state, BuildState::Building);
    TemplateWithBuilds {
        template: template_body(entry, spawns),
        builds: vec![TemplateBuild {
            build_id: entry.build_id.to_string(),
            status,
            created_at: format_millis(created),
            updated_at: format_millis(updated),
            finished_at: finished.then(|| format_millis(updated)),
            cpu_count: cpu_count(&DEFAULT_LIMITS),
            memory_mb: memory_mb(&DEFAULT_LIMITS),
            disk_size_mb: Some(DISK_SIZE_MB),
            envd_version: Some(ENVD_VERSION.to_owned()),
        }],
    }
}

/// A page request: `limit` (1..=100, default 100) and `nextToken`.
#[derive(Debug, Default, PartialEq, Eq)]
struct Page {
    limit: Option<usize>,
    next_token: Option<String>,
}

/// Reads `limit` and `nextToken` (when `paged`) and `teamID` from `query`; other parameters
/// are ignored, as E2B's API ignores them.
fn page(query: &str, paged: bool) -> Result<Page> {
    let pairs =
        coppice_wire::query::pairs(query).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let mut page = Page::default();
    for (name, value) in pairs {
        match name.as_str() {
            "limit" if paged => {
                let n: usize = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "limit must be a whole number from 1 to {MAX_LIMIT}, got {value:?}"
                        ))
                    })?;
                page.limit = Some(n);
            }
            "nextToken" if paged => page.next_token = Some(value),
            // Built-in templates are public: every team sees the same list.
            _ => {}
        }
    }
    Ok(page)
}

fn spawns_of(gw: &Gateway) -> Result<std::collections::HashMap<String, Spawns>> {
    Ok(gw.registry().spawns()?)
}

/// A built template's list item: its newest ready build (else its newest build) is the one
/// it shows, and its status is its newest build's.
fn built_body(t: &TemplateRow, builds: &[BuildRow], spawns: Spawns) -> Template {
    let newest = builds.first();
    let shown = builds.iter().find(|b| b.status == Status::Ready).or(newest);
    Template {
        template_id: t.id.clone(),
        build_id: shown.map(|b| b.id.clone()).unwrap_or_default(),
        cpu_count: shown.map_or(cpu_count(&DEFAULT_LIMITS), |b| b.cpu_count),
        memory_mb: shown.map_or(memory_mb(&DEFAULT_LIMITS), |b| b.memory_mb),
        disk_size_mb: DISK_SIZE_MB,
        public: t.public,
        aliases: vec![t.name.clone()],
        names: vec![t.name.clone()],
        created_at: format_millis(t.created_at),
        updated_at: format_millis(t.updated_at),
        created_by: None,
        last_spawned_at: last_spawned(spawns),
        spawn_count: spawns.count,
        build_count: u32::try_from(builds.iter().filter(|b| b.status == Status::Ready).count())
            .unwrap_or(u32::MAX),
        envd_version: ENVD_VERSION.to_owned(),
        build_status: newest.map_or(BuildStatus::Waiting, |b| wire_status(b.status)),
    }
}

/// One build of a built template, for `GET /templates/{id}`.
fn built_build(b: &BuildRow) -> TemplateBuild {
    TemplateBuild {
        build_id: b.id.clone(),
        status: wire_status(b.status),
        created_at: format_millis(b.created_at),
        updated_at: format_millis(b.updated_at),
        finished_at: b.finished_at.map(format_millis),
        cpu_count: b.cpu_count,
        memory_mb: b.memory_mb,
        disk_size_mb: Some(DISK_SIZE_MB),
        envd_version: Some(ENVD_VERSION.to_owned()),
    }
}

/// `GET /templates` (every template) and `GET /v2/templates` (`paged`: `limit`,
/// `nextToken`, and `X-Next-Token` when more follow; the token is the next template's id).
/// Built-in templates come first, then built ones by name.
pub(crate) fn list(gw: &Gateway, query: &str, paged: bool) -> Result<Response<Body>> {
    let page = page(query, paged)?;
    let spawns = spawns_of(gw)?;
    let spawned = |id: &str| spawns.get(id).copied().unwrap_or_default();
    let mut items: Vec<Template> = gw
        .templates
        .all()
        .iter()
        .map(|e| template_body(e, spawned(e.name)))
        .collect();
    for t in gw.builds.store.templates()? {
        let builds = gw.builds.store.builds_of(&t.id)?;
        items.push(built_body(&t, &builds, spawned(&t.id)));
    }
    let start = match &page.next_token {
        None => 0,
        Some(token) => items
            .iter()
            .position(|t| t.template_id == *token)
            .ok_or_else(|| ApiError::bad_request(format!("invalid nextToken {token:?}")))?,
    };
    let limit = page.limit.unwrap_or(MAX_LIMIT);
    let next = items.get(start + limit).map(|t| t.template_id.clone());
    let items: Vec<Template> = items.into_iter().skip(start).take(limit).collect();
    let mut resp = json(StatusCode::OK, &items);
    if paged {
        if let Some(next) = next {
            if let Ok(v) = HeaderValue::from_str(&next) {
                resp.headers_mut().insert("x-next-token", v);
            }
        }
    }
    Ok(resp)
}

/// A template by id or name: built-in or built.
enum Found {
    BuiltIn(Entry),
    Built(TemplateRow),
}

fn lookup(gw: &Gateway, raw: &str) -> Result<Found> {
    let id = path_param(raw, "template id")?;
    if let Some(e) = gw.templates.get(&id) {
        return Ok(Found::BuiltIn(e));
    }
    gw.builds
        .template(&id)?
        .map(Found::Built)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("template {id:?} not found")))
}

/// `GET /templates/{templateID}`: the template with its builds (one: the cache holds one
/// build per recipe). `limit` and `nextToken` page the builds.
pub(crate) fn get(gw: &Gateway, raw_id: &str, query: &str) -> Result<Response<Body>> {
    let page = page(query, true)?;
    let entry = match lookup(gw, raw_id)? {
        Found::BuiltIn(e) => e,
        Found::Built(t) => return get_built(gw, &t, &page),
    };
    if let Some(token) = page.next_token {
        // Every build fits on the first page, so no token was ever handed out.
        return Err(ApiError::bad_request(format!(
            "invalid nextToken {token:?}"
        )));
    }
    let spawns = spawns_of(gw)?.get(entry.name).copied().unwrap_or_default();
    Ok(json(StatusCode::OK, &with_builds(&entry, spawns)))
}

/// `GET /templates/{id}` of a built template: its builds, newest first, paged by `limit`
/// and `nextToken` (the next build's id).
fn get_built(gw: &Gateway, t: &TemplateRow, page: &Page) -> Result<Response<Body>> {
    let builds = gw.builds.store.builds_of(&t.id)?;
    let spawns = spawns_of(gw)?.get(&t.id).copied().unwrap_or_default();
    let start = match &page.next_token {
        None => 0,
        Some(token) => builds
            .iter()
            .position(|b| b.id == *token)
            .ok_or_else(|| ApiError::bad_request(format!("invalid nextToken {token:?}")))?,
    };
    let limit = page.limit.unwrap_or(MAX_LIMIT);
    let body = TemplateWithBuilds {
        template: built_body(t, &builds, spawns),
        builds: builds
            .iter()
            .skip(start)
            .take(limit)
            .map(built_build)
            .collect(),
    };
    let mut resp = json(StatusCode::OK, &body);
    if let Some(next) = builds.get(start + limit) {
        if let Ok(v) = HeaderValue::from_str(&next.id) {
            resp.headers_mut().insert("x-next-token", v);
        }
    }
    Ok(resp)
}

/// `GET /templates/aliases/{alias}`: 200 with the template the alias names (each built-in
/// template's name is its alias), 404 when no template has it.
pub(crate) fn alias(gw: &Gateway, raw_alias: &str) -> Result<Response<Body>> {
    let alias = path_param(raw_alias, "alias")?;
    if gw.templates.get(&alias).is_none() {
        if let Some(t) = gw.builds.store.template(&alias)? {
            return Ok(json(
                StatusCode::OK,
                &TemplateAliasResponse {
                    template_id: t.id,
                    public: t.public,
                },
            ));
        }
    }
    let entry = gw.templates.get(&alias).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("template alias {alias:?} not found"),
        )
    })?;
    Ok(json(
        StatusCode::OK,
        &TemplateAliasResponse {
            template_id: entry.name.to_owned(),
            public: true,
        },
    ))
}

/// E2B's answer to a change of a template the caller's team does not own: 403.
fn built_in(entry: &Entry, change: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        format!(
            "template {:?} is built into this gateway and cannot be {change}",
            entry.name
        ),
    )
}

/// `DELETE /templates/{templateID}`: 204; 404 for an unknown id (the SDK's
/// `delete_snapshot` reads it as "not found"), 403 for a built-in template, 409 for a built
/// template that live sandboxes or a running build still use. Its layers stay in storage as
/// the step cache (nothing collects unused layers yet).
pub(crate) async fn delete(gw: &Gateway, raw_id: &str) -> Result<Response<Body>> {
    let t = match lookup(gw, raw_id)? {
        Found::BuiltIn(entry) => return Err(built_in(&entry, "deleted")),
        Found::Built(t) => t,
    };
    let users = gw
        .entries()
        .iter()
        .filter(|e| e.record().template == t.id)
        .count();
    if users > 0 {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "template {:?} is used by {users} sandbox(es); kill them first",
                t.name
            ),
        ));
    }
    if gw
        .builds
        .store
        .builds_of(&t.id)?
        .iter()
        .any(|b| b.status == Status::Building)
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "template {:?} is being built; wait for the build to end",
                t.name
            ),
        ));
    }
    let dropped: Vec<String> = gw
        .builds
        .store
        .builds_of(&t.id)?
        .into_iter()
        .filter_map(|b| b.layer)
        .collect();
    gw.builds.store.delete_template(&t.id)?;
    tracing::info!(template = %t.id, name = %t.name, "template deleted");
    // Its layers no longer used are collected before the answer; a failure leaves them
    // for the next deletion.
    match crate::builds::gc::collect(gw, &dropped).await {
        Ok(c) if c.deferred => {
            tracing::info!(template = %t.id, "layer collection deferred: a build is running");
        }
        Ok(c) => tracing::info!(
            template = %t.id,
            layers = c.layers.len(),
            bytes = c.bytes,
            cache_entries = c.cache_entries,
            "unused layers collected"
        ),
        Err(e) => tracing::warn!(template = %t.id, error = %e, "collecting unused layers failed"),
    }
    Ok(empty(StatusCode::NO_CONTENT))
}

/// `PATCH /templates/{templateID}` (200) and `PATCH /v2/templates/{templateID}` (200 with
/// the template's names): 404 for an unknown id, 400 for a body that is not a
/// `TemplateUpdateRequest`, 403 for a built-in template.
pub(crate) fn update(gw: &Gateway, raw_id: &str, body: &Bytes, v2: bool) -> Result<Response<Body>> {
    let found = lookup(gw, raw_id)?;
    let request: TemplateUpdateRequest = parse(body)?;
    let t = match found {
        Found::BuiltIn(entry) => return Err(built_in(&entry, "changed")),
        Found::Built(t) => t,
    };
    if let Some(public) = request.public {
        gw.builds.store.set_public(&t.id, public, crate::now().0)?;
    }
    Ok(if v2 {
        json(StatusCode::OK, &serde_json::json!({ "names": [t.name] }))
    } else {
        empty(StatusCode::OK)
    })
}

#[cfg(test)]
mod tests {
    use coppice_lifecycle::state::Millis;

    use super::*;

    #[test]
    fn path_parameters_are_percent_decoded() {
        assert_eq!(path_param("base", "id").unwrap(), "base");
        assert_eq!(
            path_param("team%2Fsnap1%3Adefault", "id").unwrap(),
            "team/snap1:default"
        );
        assert_eq!(path_param("a+b%20c", "id").unwrap(), "a+b c");
        assert_eq!(path_param("%e2%9c%93", "id").unwrap(), "\u{2713}");
        for bad in ["%", "%2", "%zz", "%+1", "a%2", "%ff", ""] {
            let e = path_param(bad, "template id").unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad:?}");
        }
        assert!(path_param("%", "alias")
            .unwrap_err()
            .message
            .contains("alias"));
    }

    fn entry(state: BuildState) -> Entry {
        Entry {
            name: "base",
            build_id: crate::catalogue::build_id("k"),
            started_at: Millis(1_000),
            state,
        }
    }

    #[test]
    fn a_ready_template_reports_its_build_and_the_limits_sandboxes_get() {
        let e = entry(BuildState::Ready {
            built_at: Millis(1_700_000_000_000),
        });
        let spawns = Spawns {
            count: 3,
            last_at: 1_700_000_500_000,
        };
        let t = serde_json::to_value(template_body(&e, spawns)).unwrap();
        assert_eq!(t["templateID"], "base");
        assert_eq!(t["buildID"], e.build_id.to_string());
        assert_eq!(t["buildStatus"], "ready");
        assert_eq!(t["buildCount"], 1);
        assert_eq!(t["cpuCount"], 2);
        assert_eq!(t["memoryMB"], 1024);
        assert_eq!(t["diskSizeMB"], DISK_SIZE_MB);
        assert_eq!(t["envdVersion"], ENVD_VERSION);
        assert_eq!(t["createdAt"], format_millis(1_700_000_000_000));
        assert_eq!(t["updatedAt"], t["createdAt"]);
        assert_eq!(t["spawnCount"], 3);
        assert_eq!(t["lastSpawnedAt"], format_millis(1_700_000_500_000));
        assert!(t["createdBy"].is_null());
        assert_eq!(t["aliases"], serde_json::json!(["base"]));
        assert_eq!(t["names"], serde_json::json!(["base"]));

        let w = serde_json::to_value(with_builds(&e, spawns)).unwrap();
        // Every field of the list item, and the builds.
        let mut item = t.as_object().unwrap().clone();
        item.insert("builds".into(), w["builds"].clone());
        assert_eq!(w, serde_json::Value::Object(item));
        assert_eq!(w["builds"].as_array().unwrap().len(), 1);
        assert_eq!(w["builds"][0]["buildID"], t["buildID"]);
        assert_eq!(w["builds"][0]["status"], "ready");
        assert_eq!(w["builds"][0]["finishedAt"], t["createdAt"]);
    }

    #[test]
    fn a_template_still_building_or_failed_says_so() {
        let t = template_body(&entry(BuildState::Building), Spawns::default());
        assert_eq!(t.build_status, BuildStatus::Building);
        assert_eq!(t.build_count, 0);
        assert_eq!(t.last_spawned_at, None);
        assert_eq!(t.created_at, format_millis(1_000));
        let w = with_builds(&entry(BuildState::Building), Spawns::default());
        assert_eq!(w.builds[0].finished_at, None);

        let failed = entry(BuildState::Failed {
            at: Millis(9_000),
            reason: "no mirror".into(),
        });
        let t = template_body(&failed, Spawns::default());
        assert_eq!(t.build_status, BuildStatus::Error);
        assert_eq!(t.updated_at, format_millis(9_000));
    }

    #[test]
    fn pages_take_limit_and_next_token() {
        assert_eq!(page("", true).unwrap(), Page::default());
        assert_eq!(
            page("limit=1&nextToken=code-interpreter-v1&teamID=x", true).unwrap(),
            Page {
                limit: Some(1),
                next_token: Some("code-interpreter-v1".into())
            }
        );
        for bad in ["limit=0", "limit=101", "limit=x", "limit=-1"] {
            assert_eq!(
                page(bad, true).unwrap_err().status,
                StatusCode::BAD_REQUEST,
                "{bad}"
            );
        }
        // The v1 list has no pages: the parameters mean nothing there, as in E2B's spec.
        assert_eq!(page("limit=0", false).unwrap(), Page::default());
    }
}
