//! The template build protocol's bodies, as E2B's OpenAPI spec has them and the SDKs'
//! `Template.build` sends and reads them: `TemplateBuildRequestV3` and
//! `TemplateRequestResponseV3` (`POST /v3/templates`), `TemplateBuildFileUpload`
//! (`GET /templates/{id}/files/{hash}`), `TemplateBuildStartV2` with its `TemplateStep`s
//! (`POST /v2/templates/{id}/builds/{buildID}`), `TemplateBuildInfo` (the build's status) and
//! `TemplateBuildLogsResponse` (its logs), and the tag bodies.

use serde::{Deserialize, Serialize};

use crate::template::BuildStatus;

/// `TemplateBuildRequestV3`: asks for a build of the template `name` (`name:tag` allowed).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TemplateBuildRequestV3 {
    /// The template's name, optionally with a tag.
    #[serde(default)]
    pub name: Option<String>,
    /// Tags the build gets.
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    /// Deprecated by E2B: the name.
    #[serde(default)]
    pub alias: Option<String>,
    /// Deprecated by E2B: the team (one team here).
    #[serde(default, rename = "teamID")]
    pub team_id: Option<String>,
    /// vCPUs of the template's sandboxes.
    #[serde(default)]
    pub cpu_count: Option<i64>,
    /// Memory of the template's sandboxes.
    #[serde(default, rename = "memoryMB")]
    pub memory_mb: Option<i64>,
}

/// `TemplateRequestResponseV3`: the template and its new build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateRequestResponseV3 {
    /// The template's id.
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// The new build's id.
    #[serde(rename = "buildID")]
    pub build_id: String,
    /// Whether other teams may use it.
    pub public: bool,
    /// Its names.
    pub names: Vec<String>,
    /// The tags the build gets.
    pub tags: Vec<String>,
    /// Its names again (deprecated by E2B).
    pub aliases: Vec<String>,
}

/// `TemplateBuildFileUpload`: whether the files are there, and where to upload them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateBuildFileUpload {
    /// Whether the files with that hash are already here.
    pub present: bool,
    /// Where to `PUT` them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// `TemplateStep`: one instruction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateStep {
    /// `RUN`, `COPY`, `ENV`, `WORKDIR`, `USER`, or another the server may not know.
    #[serde(rename = "type")]
    pub kind: String,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// The hash of a `COPY` step's files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_hash: Option<String>,
    /// Rebuild this step whatever the cache holds.
    #[serde(default)]
    pub force: Option<bool>,
    /// The SDK's own upload flag; the server has nothing to do with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force_upload: Option<bool>,
}

/// `TemplateBuildStartV2`: what to build.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TemplateBuildStartV2 {
    /// An OCI image to start from.
    #[serde(default)]
    pub from_image: Option<String>,
    /// A template to start from.
    #[serde(default)]
    pub from_template: Option<String>,
    /// Credentials for `fromImage`'s registry.
    #[serde(default)]
    pub from_image_registry: Option<serde_json::Value>,
    /// Rebuild every step whatever the cache holds.
    #[serde(default)]
    pub force: Option<bool>,
    /// The steps.
    #[serde(default)]
    pub steps: Option<Vec<TemplateStep>>,
    /// A command started in every sandbox of the template.
    #[serde(default)]
    pub start_cmd: Option<String>,
    /// A command that says when the start command is ready.
    #[serde(default)]
    pub ready_cmd: Option<String>,
}

/// `BuildLogEntry`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildLogEntry {
    /// RFC 3339.
    pub timestamp: String,
    /// The line.
    pub message: String,
    /// `debug`, `info`, `warn` or `error`.
    pub level: String,
    /// The step it belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

/// `BuildStatusReason`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildStatusReason {
    /// What went wrong.
    pub message: String,
    /// The step that failed: `base`, `1`, `2`, ... or `finalize`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// Log lines about it.
    #[serde(default)]
    pub log_entries: Vec<BuildLogEntry>,
}

/// `TemplateBuildInfo`: a build's status with a page of its logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateBuildInfo {
    /// The page's lines, as text.
    pub logs: Vec<String>,
    /// The page's lines.
    pub log_entries: Vec<BuildLogEntry>,
    /// The template's id.
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// The build's id.
    #[serde(rename = "buildID")]
    pub build_id: String,
    /// Where it stands.
    pub status: BuildStatus,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<BuildStatusReason>,
}

/// `TemplateBuildLogsResponse`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateBuildLogsResponse {
    /// The lines.
    pub logs: Vec<BuildLogEntry>,
}

/// `AssignTemplateTagsRequest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssignTemplateTagsRequest {
    /// `name:tag` of the build to tag.
    pub target: String,
    /// The new tags.
    pub tags: Vec<String>,
}

/// `AssignedTemplateTags`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignedTemplateTags {
    /// The tags assigned.
    pub tags: Vec<String>,
    /// The build they name.
    #[serde(rename = "buildID")]
    pub build_id: String,
}

/// `DeleteTemplateTagsRequest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteTemplateTagsRequest {
    /// The template's name.
    pub name: String,
    /// The tags to remove.
    pub tags: Vec<String>,
}

/// `TemplateTag`: one item of `GET /templates/{id}/tags`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateTag {
    /// The tag.
    pub tag: String,
    /// The build it names.
    #[serde(rename = "buildID")]
    pub build_id: String,
    /// When it was assigned (RFC 3339).
    pub created_at: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_python_sdks_build_start_parses() {
        // What `Template().from_template("base").copy(...).run_cmd(...)` sends.
        let body = r#"{"steps":[{"type":"COPY","args":["app/","/app","",""],"force":false,
            "filesHash":"ab","forceUpload":null},{"type":"RUN","args":["echo hi"],"force":false}],
            "force":false,"fromTemplate":"base"}"#;
        let s: TemplateBuildStartV2 = serde_json::from_str(body).unwrap();
        let steps = s.steps.unwrap();
        assert_eq!(steps[0].kind, "COPY");
        assert_eq!(steps[0].files_hash.as_deref(), Some("ab"));
        assert_eq!(steps[1].args, ["echo hi"]);
        assert_eq!(s.from_template.as_deref(), Some("base"));
        serde_json::from_str::<TemplateBuildStartV2>(r#"{"fromImagez":"x"}"#).unwrap_err();
    }

    #[test]
    fn a_build_status_always_carries_its_logs() {
        let info = TemplateBuildInfo {
            logs: vec![],
            log_entries: vec![],
            template_id: "t".into(),
            build_id: "b".into(),
            status: BuildStatus::Ready,
            reason: None,
        };
        let v = serde_json::to_value(&info).unwrap();
        assert_eq!(v["logs"], serde_json::json!([]));
        assert_eq!(v["logEntries"], serde_json::json!([]));
        assert_eq!(v["templateID"], "t");
        assert!(v.get("reason").is_none());
    }
}
