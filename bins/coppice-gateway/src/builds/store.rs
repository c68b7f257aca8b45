//! Built templates, their builds, tags, build logs and the step cache, in the registry's
//! SQLite database (its own connection to the same file, as the webhook dispatcher has).
//!
//! **Invariant:** nothing here knows HTTP or the backends; rows are plain values.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

/// A failed database operation.
#[derive(Debug, thiserror::Error)]
#[error("template store: {op}")]
pub(crate) struct StoreError {
    op: &'static str,
    #[source]
    source: rusqlite::Error,
}

fn err(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError { op, source }
}

type Result<T> = std::result::Result<T, StoreError>;

/// Where a build stands (E2B's `TemplateBuildStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    /// Requested, its steps not yet sent.
    Waiting,
    /// Running.
    Building,
    /// Done: sandboxes can be created from it.
    Ready,
    /// Failed; its reason says why.
    Error,
}

impl Status {
    /// E2B's name of the status.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Building => "building",
            Self::Ready => "ready",
            Self::Error => "error",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "waiting" => Self::Waiting,
            "building" => Self::Building,
            "ready" => Self::Ready,
            _ => Self::Error,
        }
    }
}

/// What a built template gives its sandboxes besides its layer: `ENV`, `USER`, `WORKDIR`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Defaults {
    /// Environment variables.
    #[serde(default)]
    pub(crate) env: BTreeMap<String, String>,
    /// The default user of its processes, when `USER` set one.
    #[serde(default)]
    pub(crate) user: Option<String>,
    /// The default working directory, when `WORKDIR` set one.
    #[serde(default)]
    pub(crate) workdir: Option<String>,
    /// The command started in every sandbox (`startCmd`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) start_cmd: Option<String>,
    /// The command that says a sandbox is ready (`readyCmd`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) ready_cmd: Option<String>,
}

/// Why a build failed: E2B's `BuildStatusReason`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Reason {
    /// What went wrong.
    pub(crate) message: String,
    /// The step that failed (`base`, `1`, `2`, ..., `finalize`).
    pub(crate) step: Option<String>,
}

/// One built template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TemplateRow {
    /// Its id (20 characters of `[a-z0-9]`).
    pub(crate) id: String,
    /// Its name (E2B's alias).
    pub(crate) name: String,
    /// When it was first requested (ms since the epoch).
    pub(crate) created_at: u64,
    /// When a build of it last changed.
    pub(crate) updated_at: u64,
    /// Whether other teams may use it (stored for `PATCH`; one team here).
    pub(crate) public: bool,
}

/// One build of a built template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BuildRow {
    /// Its id, a UUID.
    pub(crate) id: String,
    /// Its template's id.
    pub(crate) template_id: String,
    /// Where it stands.
    pub(crate) status: Status,
    /// When it was requested.
    pub(crate) created_at: u64,
    /// When it last changed.
    pub(crate) updated_at: u64,
    /// When it ended.
    pub(crate) finished_at: Option<u64>,
    /// The tags it gets once ready.
    pub(crate) tags: Vec<String>,
    /// Its storage layer, once ready.
    pub(crate) layer: Option<String>,
    /// What its sandboxes get, once ready.
    pub(crate) defaults: Defaults,
    /// Why it failed.
    pub(crate) reason: Option<Reason>,
    /// The vCPUs its sandboxes are meant to have, as asked.
    pub(crate) cpu_count: u32,
    /// The memory its sandboxes are meant to have, as asked.
    pub(crate) memory_mb: u64,
}

/// One build log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LogRow {
    /// When (ms since the epoch).
    pub(crate) at: u64,
    /// `debug`, `info`, `warn` or `error`.
    pub(crate) level: String,
    /// The step it belongs to.
    pub(crate) step: Option<String>,
    /// The line.
    pub(crate) message: String,
}

/// A tag of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TagRow {
    /// The tag.
    pub(crate) tag: String,
    /// The build it names.
    pub(crate) build_id: String,
    /// When it was assigned.
    pub(crate) created_at: u64,
}

/// A build asked for: [`Store::request`]'s input.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NewBuild<'a> {
    /// The template's name.
    pub(crate) name: &'a str,
    /// The id the template gets if it is new.
    pub(crate) new_template_id: &'a str,
    /// The build's id.
    pub(crate) build_id: &'a str,
    /// The tags it gets once ready.
    pub(crate) tags: &'a [String],
    /// The vCPUs asked for.
    pub(crate) cpu_count: u32,
    /// The memory asked for.
    pub(crate) memory_mb: u64,
}

/// The template tables.
#[derive(Debug)]
pub(crate) struct Store {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tmpl_templates (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    public INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS tmpl_builds (
    id TEXT PRIMARY KEY,
    template_id TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    finished_at INTEGER,
    tags TEXT NOT NULL,
    layer TEXT,
    defaults TEXT,
    reason TEXT,
    cpu_count INTEGER NOT NULL,
    memory_mb INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS tmpl_builds_by_template ON tmpl_builds (template_id, created_at);
CREATE TABLE IF NOT EXISTS tmpl_tags (
    template_id TEXT NOT NULL,
    tag TEXT NOT NULL,
    build_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (template_id, tag)
);
CREATE TABLE IF NOT EXISTS tmpl_logs (
    build_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    at INTEGER NOT NULL,
    level TEXT NOT NULL,
    step TEXT,
    message TEXT NOT NULL,
    PRIMARY KEY (build_id, seq)
);
CREATE TABLE IF NOT EXISTS tmpl_step_cache (
    key TEXT PRIMARY KEY,
    layer TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
";

const BUILD_COLUMNS: &str = "id, template_id, status, created_at, updated_at, finished_at, tags, \
                             layer, defaults, reason, cpu_count, memory_mb";

fn build_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<BuildRow> {
    let tags: String = r.get(6)?;
    let defaults: Option<String> = r.get(8)?;
    let reason: Option<String> = r.get(9)?;
    Ok(BuildRow {
        id: r.get(0)?,
        template_id: r.get(1)?,
        status: Status::parse(&r.get::<_, String>(2)?),
        created_at: unsigned(r.get(3)?),
        updated_at: unsigned(r.get(4)?),
        finished_at: r.get::<_, Option<i64>>(5)?.map(unsigned),
        tags: serde_json::from_str(&tags).unwrap_or_default(),
        layer: r.get(7)?,
        defaults: defaults
            .and_then(|d| serde_json::from_str(&d).ok())
            .unwrap_or_default(),
        reason: reason.and_then(|d| serde_json::from_str(&d).ok()),
        cpu_count: r.get(10)?,
        memory_mb: unsigned(r.get(11)?),
    })
}

fn template_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TemplateRow> {
    Ok(TemplateRow {
        id: r.get(0)?,
        name: r.get(1)?,
        created_at: unsigned(r.get(2)?),
        updated_at: unsigned(r.get(3)?),
        public: r.get::<_, i64>(4)? != 0,
    })
}

/// SQLite integers are signed; times and sizes here are far below `i64::MAX`.
fn sql(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn unsigned(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn to_json<T: Serialize>(v: &T) -> String {
    // Plain maps, strings and options always serialize.
    serde_json::to_string(v).unwrap_or_default()
}

impl Store {
    /// Opens the tables in the database at `path`, creating them if needed.
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path).map_err(err("open database"))?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(err("set busy timeout"))?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err("set synchronous"))?;
        conn.execute_batch(SCHEMA).map_err(err("create schema"))?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // Transactions roll back on a panic, so a poisoned lock holds a consistent database.
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Ends every build a previous run left `building` as `error` with `message`; returns
    /// their ids.
    pub(crate) fn interrupt_unfinished(&self, message: &str, now: u64) -> Result<Vec<String>> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(err("begin"))?;
        let ids: Vec<String> = {
            let mut stmt = tx
                .prepare("SELECT id FROM tmpl_builds WHERE status = 'building'")
                .map_err(err("find unfinished builds"))?;
            let rows = stmt
                .query_map([], |r| r.get(0))
                .map_err(err("find unfinished builds"))?;
            rows.collect::<rusqlite::Result<_>>()
                .map_err(err("find unfinished builds"))?
        };
        let reason = to_json(&Reason {
            message: message.to_owned(),
            step: None,
        });
        for id in &ids {
            tx.execute(
                "UPDATE tmpl_builds SET status = 'error', reason = ?2, updated_at = ?3,
                 finished_at = ?3 WHERE id = ?1",
                params![id, reason, sql(now)],
            )
            .map_err(err("end an unfinished build"))?;
            append_log_in(&tx, id, now, "error", None, message)?;
        }
        tx.commit().map_err(err("commit"))?;
        Ok(ids)
    }

    /// The template whose id or name is `key`.
    pub(crate) fn template(&self, key: &str) -> Result<Option<TemplateRow>> {
        self.conn()
            .query_row(
                "SELECT id, name, created_at, updated_at, public FROM tmpl_templates
                 WHERE id = ?1 OR name = ?1",
                params![key],
                template_row,
            )
            .optional()
            .map_err(err("read a template"))
    }

    /// Every built template, by name.
    pub(crate) fn templates(&self) -> Result<Vec<TemplateRow>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT id, name, created_at, updated_at, public FROM tmpl_templates ORDER BY name",
            )
            .map_err(err("list templates"))?;
        let rows = stmt
            .query_map([], template_row)
            .map_err(err("list templates"))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(err("list templates"))
    }

    /// Records a new build (`waiting`) of the template `name`, creating the template with
    /// `new_id` if there is none of that name.
    pub(crate) fn request(&self, new: &NewBuild<'_>, now: u64) -> Result<(TemplateRow, BuildRow)> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(err("begin"))?;
        let made = request_in(&tx, new, now)?;
        tx.commit().map_err(err("commit"))?;
        Ok(made)
    }

    /// The build `id`.
    pub(crate) fn build(&self, id: &str) -> Result<Option<BuildRow>> {
        self.conn()
            .query_row(
                &format!("SELECT {BUILD_COLUMNS} FROM tmpl_builds WHERE id = ?1"),
                params![id],
                build_row,
            )
            .optional()
            .map_err(err("read a build"))
    }

    /// Every build of the template `template_id`, newest first.
    pub(crate) fn builds_of(&self, template_id: &str) -> Result<Vec<BuildRow>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {BUILD_COLUMNS} FROM tmpl_builds WHERE template_id = ?1
                 ORDER BY created_at DESC, id"
            ))
            .map_err(err("list builds"))?;
        let rows = stmt
            .query_map(params![template_id], build_row)
            .map_err(err("list builds"))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(err("list builds"))
    }

    /// Moves the build `id` from `waiting` to `building`; false when it was not waiting.
    pub(crate) fn start(&self, id: &str, now: u64) -> Result<bool> {
        let n = self
            .conn()
            .execute(
                "UPDATE tmpl_builds SET status = 'building', updated_at = ?2
                 WHERE id = ?1 AND status = 'waiting'",
                params![id, sql(now)],
            )
            .map_err(err("start a build"))?;
        Ok(n == 1)
    }

    /// Ends the build `id` as ready on `layer`, and points its tags at it, in one
    /// transaction.
    pub(crate) fn ready(&self, id: &str, layer: &str, defaults: &Defaults, now: u64) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(err("begin"))?;
        ready_in(&tx, id, layer, defaults, now)?;
        tx.commit().map_err(err("commit"))
    }

    /// Ends the build `id` as failed.
    pub(crate) fn fail(&self, id: &str, reason: &Reason, now: u64) -> Result<()> {
        self.conn()
            .execute(
                "UPDATE tmpl_builds SET status = 'error', reason = ?2, updated_at = ?3,
                 finished_at = ?3 WHERE id = ?1",
                params![id, to_json(reason), sql(now)],
            )
            .map(drop)
            .map_err(err("fail a build"))
    }

    /// Appends a line to the build `id`'s log.
    pub(crate) fn log(
        &self,
        id: &str,
        at: u64,
        level: &str,
        step: Option<&str>,
        message: &str,
    ) -> Result<()> {
        append_log_in(&self.conn(), id, at, level, step, message)
    }

    /// The build `id`'s log, oldest first.
    pub(crate) fn logs(&self, id: &str) -> Result<Vec<LogRow>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT at, level, step, message FROM tmpl_logs WHERE build_id = ?1 ORDER BY seq",
            )
            .map_err(err("read build logs"))?;
        let rows = stmt
            .query_map(params![id], |r| {
                Ok(LogRow {
                    at: unsigned(r.get(0)?),
                    level: r.get(1)?,
                    step: r.get(2)?,
                    message: r.get(3)?,
                })
            })
            .map_err(err("read build logs"))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(err("read build logs"))
    }

    /// The tags of the template `template_id`, by tag.
    pub(crate) fn tags(&self, template_id: &str) -> Result<Vec<TagRow>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT tag, build_id, created_at FROM tmpl_tags WHERE template_id = ?1 ORDER BY tag",
            )
            .map_err(err("read tags"))?;
        let rows = stmt
            .query_map(params![template_id], |r| {
                Ok(TagRow {
                    tag: r.get(0)?,
                    build_id: r.get(1)?,
                    created_at: unsigned(r.get(2)?),
                })
            })
            .map_err(err("read tags"))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(err("read tags"))
    }

    /// Points `tags` of the template `template_id` at `build_id`.
    pub(crate) fn assign_tags(
        &self,
        template_id: &str,
        build_id: &str,
        tags: &[String],
        now: u64,
    ) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(err("begin"))?;
        for tag in tags {
            tx.execute(
                "INSERT INTO tmpl_tags (template_id, tag, build_id, created_at)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(template_id, tag) DO UPDATE SET build_id = ?3, created_at = ?4",
                params![template_id, tag, build_id, sql(now)],
            )
            .map_err(err("tag a build"))?;
        }
        tx.commit().map_err(err("commit"))
    }

    /// Removes `tags` from the template `template_id`; returns how many there were.
    pub(crate) fn remove_tags(&self, template_id: &str, tags: &[String]) -> Result<usize> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(err("begin"))?;
        let mut n = 0;
        for tag in tags {
            n += tx
                .execute(
                    "DELETE FROM tmpl_tags WHERE template_id = ?1 AND tag = ?2",
                    params![template_id, tag],
                )
                .map_err(err("remove a tag"))?;
        }
        tx.commit().map_err(err("commit"))?;
        Ok(n)
    }

    /// Sets whether the template is public.
    pub(crate) fn set_public(&self, template_id: &str, public: bool, now: u64) -> Result<()> {
        self.conn()
            .execute(
                "UPDATE tmpl_templates SET public = ?2, updated_at = ?3 WHERE id = ?1",
                params![template_id, public, sql(now)],
            )
            .map(drop)
            .map_err(err("update a template"))
    }

    /// Forgets the template `template_id` with its builds, tags and logs.
    pub(crate) fn delete_template(&self, template_id: &str) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(err("begin"))?;
        delete_template_in(&tx, template_id)?;
        tx.commit().map_err(err("commit"))
    }

    /// The layers of every build that has one.
    pub(crate) fn build_layers(&self) -> Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT layer FROM tmpl_builds WHERE layer IS NOT NULL")
            .map_err(err("read build layers"))?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(err("read build layers"))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(err("read build layers"))
    }

    /// Whether any build is `building`.
    pub(crate) fn any_building(&self) -> Result<bool> {
        self.conn()
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM tmpl_builds WHERE status = 'building')",
                [],
                |r| r.get(0),
            )
            .map_err(err("read builds"))
    }

    /// Every step cache entry: (key, layer).
    pub(crate) fn cache_entries(&self) -> Result<Vec<(String, String)>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT key, layer FROM tmpl_step_cache")
            .map_err(err("read the step cache"))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(err("read the step cache"))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(err("read the step cache"))
    }

    /// Forgets the step cache entry `key`.
    pub(crate) fn forget_cached(&self, key: &str) -> Result<()> {
        self.conn()
            .execute("DELETE FROM tmpl_step_cache WHERE key = ?1", params![key])
            .map(drop)
            .map_err(err("write the step cache"))
    }

    /// The layer cached for the step key `key`.
    pub(crate) fn cached(&self, key: &str) -> Result<Option<String>> {
        self.conn()
            .query_row(
                "SELECT layer FROM tmpl_step_cache WHERE key = ?1",
                params![key],
                |r| r.get(0),
            )
            .optional()
            .map_err(err("read the step cache"))
    }

    /// Caches `layer` as the result of the step key `key`.
    pub(crate) fn cache(&self, key: &str, layer: &str, now: u64) -> Result<()> {
        self.conn()
            .execute(
                "INSERT INTO tmpl_step_cache (key, layer, created_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT(key) DO UPDATE SET layer = ?2, created_at = ?3",
                params![key, layer, sql(now)],
            )
            .map(drop)
            .map_err(err("write the step cache"))
    }
}

/// [`Store::request`] inside the caller's transaction `tx` (on any connection to the
/// database), for a template made by another capability (a snapshot) together with its own
/// rows.
pub(crate) fn request_in(
    tx: &Connection,
    new: &NewBuild<'_>,
    now: u64,
) -> Result<(TemplateRow, BuildRow)> {
    let NewBuild {
        name,
        new_template_id: new_id,
        build_id,
        tags,
        cpu_count,
        memory_mb,
    } = *new;
    tx.execute(
        "INSERT INTO tmpl_templates (id, name, created_at, updated_at) VALUES (?1, ?2, ?3, ?3)
         ON CONFLICT(name) DO UPDATE SET updated_at = ?3",
        params![new_id, name, sql(now)],
    )
    .map_err(err("record a template"))?;
    let template = tx
        .query_row(
            "SELECT id, name, created_at, updated_at, public FROM tmpl_templates WHERE name = ?1",
            params![name],
            template_row,
        )
        .map_err(err("read a template"))?;
    tx.execute(
        "INSERT INTO tmpl_builds (id, template_id, status, created_at, updated_at, tags,
         cpu_count, memory_mb) VALUES (?1, ?2, 'waiting', ?3, ?3, ?4, ?5, ?6)",
        params![
            build_id,
            template.id,
            sql(now),
            to_json(&tags),
            cpu_count,
            sql(memory_mb)
        ],
    )
    .map_err(err("record a build"))?;
    let build = tx
        .query_row(
            &format!("SELECT {BUILD_COLUMNS} FROM tmpl_builds WHERE id = ?1"),
            params![build_id],
            build_row,
        )
        .map_err(err("read a build"))?;
    Ok((template, build))
}

/// [`Store::ready`] inside the caller's transaction `tx`.
pub(crate) fn ready_in(
    tx: &Connection,
    id: &str,
    layer: &str,
    defaults: &Defaults,
    now: u64,
) -> Result<()> {
    let build = tx
        .query_row(
            &format!("SELECT {BUILD_COLUMNS} FROM tmpl_builds WHERE id = ?1"),
            params![id],
            build_row,
        )
        .map_err(err("read a build"))?;
    tx.execute(
        "UPDATE tmpl_builds SET status = 'ready', layer = ?2, defaults = ?3, updated_at = ?4,
         finished_at = ?4 WHERE id = ?1",
        params![id, layer, to_json(defaults), sql(now)],
    )
    .map_err(err("finish a build"))?;
    for tag in &build.tags {
        tx.execute(
            "INSERT INTO tmpl_tags (template_id, tag, build_id, created_at)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(template_id, tag) DO UPDATE SET build_id = ?3, created_at = ?4",
            params![build.template_id, tag, id, sql(now)],
        )
        .map_err(err("tag a build"))?;
    }
    tx.execute(
        "UPDATE tmpl_templates SET updated_at = ?2 WHERE id = ?1",
        params![build.template_id, sql(now)],
    )
    .map_err(err("touch a template"))?;
    Ok(())
}

/// [`Store::delete_template`] inside the caller's transaction `tx`.
pub(crate) fn delete_template_in(tx: &Connection, template_id: &str) -> Result<()> {
    for stmt in [
        "DELETE FROM tmpl_logs WHERE build_id IN
         (SELECT id FROM tmpl_builds WHERE template_id = ?1)",
        "DELETE FROM tmpl_builds WHERE template_id = ?1",
        "DELETE FROM tmpl_tags WHERE template_id = ?1",
        "DELETE FROM tmpl_templates WHERE id = ?1",
    ] {
        tx.execute(stmt, params![template_id])
            .map_err(err("delete a template"))?;
    }
    Ok(())
}

fn append_log_in(
    conn: &Connection,
    id: &str,
    at: u64,
    level: &str,
    step: Option<&str>,
    message: &str,
) -> Result<()> {
    conn.execute(
        "INSERT INTO tmpl_logs (build_id, seq, at, level, step, message)
         VALUES (?1, (SELECT COALESCE(MAX(seq) + 1, 0) FROM tmpl_logs WHERE build_id = ?1),
                 ?2, ?3, ?4, ?5)",
        params![id, sql(at), level, step, message],
    )
    .map(drop)
    .map_err(err("append a build log line"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new<'a>(name: &'a str, id: &'a str, build: &'a str, tags: &'a [String]) -> NewBuild<'a> {
        NewBuild {
            name,
            new_template_id: id,
            build_id: build,
            tags,
            cpu_count: 2,
            memory_mb: 1024,
        }
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("registry.db")).unwrap();
        (dir, s)
    }

    #[test]
    fn a_build_moves_from_waiting_to_ready_and_tags_follow_it() {
        let (_d, s) = store();
        let (t, b) = s
            .request(&new("app", "tid1", "b1", &["default".into()]), 10)
            .unwrap();
        assert_eq!(b.status, Status::Waiting);
        assert_eq!(t.name, "app");
        assert!(s.start("b1", 11).unwrap());
        assert!(!s.start("b1", 12).unwrap(), "a build starts once");
        let defaults = Defaults {
            env: [("A".to_owned(), "1".to_owned())].into(),
            user: Some("user".into()),
            workdir: Some("/app".into()),
            start_cmd: Some("sleep 100".into()),
            ready_cmd: None,
        };
        s.ready("b1", "layer1", &defaults, 20).unwrap();
        let b = s.build("b1").unwrap().unwrap();
        assert_eq!(b.status, Status::Ready);
        assert_eq!(b.defaults, defaults);
        assert_eq!(b.finished_at, Some(20));
        assert_eq!(s.tags("tid1").unwrap()[0].build_id, "b1");
        // A second build of the same name keeps the template's id.
        let (t2, _) = s
            .request(&new("app", "tid2", "b2", &["v2".into()]), 30)
            .unwrap();
        assert_eq!(t2.id, "tid1");
        assert_eq!(s.template("app").unwrap().unwrap().id, "tid1");
        assert_eq!(s.template("tid1").unwrap().unwrap().name, "app");
        assert_eq!(s.builds_of("tid1").unwrap().len(), 2);
    }

    #[test]
    fn builds_cut_short_end_as_errors_with_a_log_line() {
        let (_d, s) = store();
        s.request(&new("app", "tid1", "b1", &[]), 10).unwrap();
        s.request(&new("app", "tid1", "b2", &[]), 10).unwrap();
        s.start("b1", 11).unwrap();
        s.log("b1", 12, "info", Some("1"), "step one").unwrap();
        assert_eq!(
            s.interrupt_unfinished("restarted", 13).unwrap(),
            vec!["b1".to_owned()]
        );
        let b = s.build("b1").unwrap().unwrap();
        assert_eq!(b.status, Status::Error);
        assert_eq!(b.reason.unwrap().message, "restarted");
        let logs = s.logs("b1").unwrap();
        assert_eq!(logs.len(), 2);
        assert_eq!(logs[1].level, "error");
        // A build never triggered keeps waiting: its client may still send its steps.
        assert_eq!(s.build("b2").unwrap().unwrap().status, Status::Waiting);
    }

    #[test]
    fn tags_are_assigned_and_removed_and_templates_deleted_whole() {
        let (_d, s) = store();
        s.request(&new("app", "tid1", "b1", &[]), 10).unwrap();
        s.assign_tags("tid1", "b1", &["x".into(), "y".into()], 11)
            .unwrap();
        assert_eq!(s.tags("tid1").unwrap().len(), 2);
        assert_eq!(s.remove_tags("tid1", &["x".into(), "z".into()]).unwrap(), 1);
        s.cache("k", "l", 1).unwrap();
        assert_eq!(s.cached("k").unwrap().as_deref(), Some("l"));
        s.delete_template("tid1").unwrap();
        assert!(s.template("tid1").unwrap().is_none());
        assert!(s.build("b1").unwrap().is_none());
        assert!(s.tags("tid1").unwrap().is_empty());
    }
}
