//! The template catalogue's bodies: `Template` (the items of `GET /templates` and
//! `GET /v2/templates`), `TemplateWithBuilds` (`GET /templates/{templateID}`: a `Template`
//! with its `TemplateBuild`s), `TemplateAliasResponse` (`GET /templates/aliases/{alias}`) and the
//! `TemplateUpdateRequest` of `PATCH /templates/{templateID}`, as E2B's OpenAPI spec has them.
//! Every field the spec marks required is always present; a nullable one is sent as `null`.

use serde::{Deserialize, Serialize};

/// `TemplateBuildStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildStatus {
    /// Being built.
    Building,
    /// Queued, not started yet.
    Waiting,
    /// Built; sandboxes can be created from it.
    Ready,
    /// The build failed.
    Error,
}

/// `TeamUser`: who created a template (`createdBy`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeamUser {
    /// The user's id (a UUID).
    pub id: String,
    /// Deprecated by E2B; may be null.
    pub email: Option<String>,
}

/// `Template`: one item of the template lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Template {
    /// The template's id.
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// The last successful build's id.
    #[serde(rename = "buildID")]
    pub build_id: String,
    /// CPUs its sandboxes get.
    pub cpu_count: u32,
    /// Memory its sandboxes get, in MiB.
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    /// Disk its sandboxes get, in MiB.
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    /// Whether every team may use it.
    pub public: bool,
    /// Its aliases (deprecated by E2B in favour of `names`).
    pub aliases: Vec<String>,
    /// Its names.
    pub names: Vec<String>,
    /// RFC 3339: when it was created.
    pub created_at: String,
    /// RFC 3339: when it last changed.
    pub updated_at: String,
    /// Who created it; null when no user did.
    pub created_by: Option<TeamUser>,
    /// RFC 3339: when a sandbox was last created from it; null if never.
    pub last_spawned_at: Option<String>,
    /// How many sandboxes were created from it.
    pub spawn_count: u64,
    /// How many times it was built.
    pub build_count: u32,
    /// The envd version its sandboxes run.
    pub envd_version: String,
    /// Its last build's status.
    pub build_status: BuildStatus,
}

/// `TemplateBuild`: one build in `TemplateWithBuilds`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateBuild {
    /// The build's id (a UUID).
    #[serde(rename = "buildID")]
    pub build_id: String,
    /// Where it stands.
    pub status: BuildStatus,
    /// RFC 3339: when it started.
    pub created_at: String,
    /// RFC 3339: when it last changed.
    pub updated_at: String,
    /// RFC 3339: when it finished; absent while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// CPUs its sandboxes get.
    pub cpu_count: u32,
    /// Memory its sandboxes get, in MiB.
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    /// Disk its sandboxes get, in MiB.
    #[serde(
        rename = "diskSizeMB",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub disk_size_mb: Option<u64>,
    /// The envd version in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envd_version: Option<String>,
}

/// `TemplateWithBuilds`: `GET /templates/{templateID}`. The SDK (`e2b` 2.63) reads every
/// field of [`Template`] here as required, and the builds beside them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateWithBuilds {
    /// The template, as the lists show it.
    #[serde(flatten)]
    pub template: Template,
    /// Its builds, newest first.
    pub builds: Vec<TemplateBuild>,
}

/// `TemplateAliasResponse`: `GET /templates/aliases/{alias}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateAliasResponse {
    /// The template the alias names.
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Whether every team may use it.
    pub public: bool,
}

/// `TemplateUpdateRequest`: the body of `PATCH /templates/{templateID}` (and `/v2`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateUpdateRequest {
    /// Make the template public or private.
    #[serde(default)]
    pub public: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_carries_every_required_field_with_e2bs_names() {
        let t = Template {
            template_id: "base".into(),
            build_id: "5f0c6b5e-2d8e-5a43-9d3c-0a4b7c1e9f10".into(),
            cpu_count: 2,
            memory_mb: 1024,
            disk_size_mb: 10240,
            public: true,
            aliases: vec!["base".into()],
            names: vec!["base".into()],
            created_at: "2026-12-07T17:00:00.000Z".into(),
            updated_at: "2026-12-07T17:00:00.000Z".into(),
            created_by: None,
            last_spawned_at: None,
            spawn_count: 0,
            build_count: 1,
            envd_version: "0.6.13".into(),
            build_status: BuildStatus::Ready,
        };
        let v = serde_json::to_value(&t).unwrap();
        // The spec's `required` list for `Template`.
        for field in [
            "templateID",
            "buildID",
            "cpuCount",
            "memoryMB",
            "diskSizeMB",
            "public",
            "createdAt",
            "updatedAt",
            "createdBy",
            "lastSpawnedAt",
            "spawnCount",
            "buildCount",
            "envdVersion",
            "aliases",
            "names",
            "buildStatus",
        ] {
            assert!(v.get(field).is_some(), "{field} missing from {v}");
        }
        assert_eq!(v.as_object().unwrap().len(), 16, "{v}");
        assert!(v["createdBy"].is_null() && v["lastSpawnedAt"].is_null());
        assert_eq!(v["buildStatus"], "ready");
        let back: Template = serde_json::from_value(v).unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn a_running_build_has_no_finish_time() {
        let b = TemplateBuild {
            build_id: "x".into(),
            status: BuildStatus::Building,
            created_at: "t".into(),
            updated_at: "t".into(),
            finished_at: None,
            cpu_count: 2,
            memory_mb: 1024,
            disk_size_mb: Some(10240),
            envd_version: None,
        };
        let v = serde_json::to_value(&b).unwrap();
        assert_eq!(v["status"], "building");
        assert!(v.get("finishedAt").is_none() && v.get("envdVersion").is_none());
        assert_eq!(v["diskSizeMB"], 10240);
    }

    #[test]
    fn updates_take_only_public() {
        let r: TemplateUpdateRequest = serde_json::from_str(r#"{"public":false}"#).unwrap();
        assert_eq!(r.public, Some(false));
        let empty: TemplateUpdateRequest = serde_json::from_str("{}").unwrap();
        assert_eq!(empty.public, None);
        serde_json::from_str::<TemplateUpdateRequest>(r#"{"name":"x"}"#).unwrap_err();
        serde_json::from_str::<TemplateUpdateRequest>(r#"{"public":"yes"}"#).unwrap_err();
    }
}
