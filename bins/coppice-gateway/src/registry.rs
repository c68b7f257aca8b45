//! The durable registry: every live sandbox's record in an embedded SQLite database (WAL).
//!
//! The in-memory map in [`crate::Gateway`] serves reads; every change is written here first,
//! in one transaction, so after a crash — `kill -9` included — the gateway knows exactly the
//! sandboxes it had. WAL with `synchronous=NORMAL` survives a process crash; a power loss may
//! lose the last transactions, never the database.
//!
//! The events tables of `coppice-events` live in the same database file, so a lifecycle
//! change and the event that describes it commit in one transaction ([`Registry::put_with_events`],
//! [`Registry::delete_with_events`]): the event log is exactly what the gateway did.
//!
//! Every `sandbox.lifecycle.created` event also counts a spawn of its template in
//! `template_spawns`, in the same transaction, which event retention never prunes: the
//! catalogue's `spawnCount` and `lastSpawnedAt` ([`Registry::spawns`]).
//!
//! `pool_targets` holds each warm pool's target as `/pool` last set it
//! ([`Registry::set_pool_target`]), so a restart keeps it.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;

use coppice_events::event::{Event, EventType};
use coppice_lifecycle::backend::{Limits, SandboxId};
use coppice_lifecycle::state::Lifecycle;
use rusqlite::{params, Connection};
use serde::{Deserialize, Serialize};

/// What the gateway knows about one sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    /// E2B sandbox id.
    pub(crate) id: SandboxId,
    /// Template id as the client named it (`base`, `code-interpreter-v1`).
    pub(crate) template: String,
    /// When it was created (ms since the epoch).
    pub(crate) created_at: u64,
    /// User metadata.
    pub(crate) metadata: BTreeMap<String, String>,
    /// Sandbox-wide environment variables.
    pub(crate) env_vars: BTreeMap<String, String>,
    /// The envd access token the SDK sends as `X-Access-Token`.
    pub(crate) access_token: String,
    /// State, window and policy.
    pub(crate) lifecycle: Lifecycle,
    /// Resource limits it runs with.
    pub(crate) limits: Limits,
    /// `allow_internet_access` as asked.
    pub(crate) allow_internet: Option<bool>,
    /// Host pid of its init, for operators (the jail keeps its own identity records).
    pub(crate) pid: Option<u32>,
    /// `sandboxBuildId` of its events: the template layer its writable layer was cloned from.
    /// Empty in records written before events existed.
    #[serde(default)]
    pub(crate) build_id: String,
    /// `sandboxExecutionId` of its events: a UUID minted when it starts and on every resume.
    #[serde(default)]
    pub(crate) execution_id: String,
    /// When the current execution started (ms since the epoch).
    #[serde(default)]
    pub(crate) execution_started_at: u64,
    /// The `trafficAccessToken` that requests to its ports other than envd's must carry
    /// (`network.allowPublicTraffic: false`); `None` when they need none. Records written
    /// before it existed read as `None`: such sandboxes were created open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) traffic_token: Option<String>,
    /// The `network` block as asked at create and changed by `PUT .../network`, echoed by
    /// `GET /sandboxes/{id}`; `None` when none was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) network: Option<coppice_wire::sandbox::NetworkConfig>,
    /// It was a warm sandbox of its template's pool when its create took it (`inUse` of
    /// `GET /pool`). Records written before pools were counted read as `false`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) from_pool: bool,
    /// Paused filesystem-only (E2B's `pauseMode: "filesystem"`): its processes, memory and
    /// cgroups are gone and its files kept; a resume boots it again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) paused_cold: bool,
    /// Its window's end pauses it filesystem-only (`autoPauseMemory: false`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) auto_pause_cold: bool,
}

/// How often sandboxes were created from one template.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Spawns {
    /// Sandboxes created from it.
    pub(crate) count: u64,
    /// When the last one was created (ms since the epoch).
    pub(crate) last_at: u64,
}

/// Registry failures; the message says which operation failed.
#[derive(Debug, thiserror::Error)]
#[error("registry: {op}")]
pub(crate) struct RegistryError {
    op: &'static str,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl RegistryError {
    /// A failed SQL statement of another capability's tables in this database.
    pub(crate) fn sql(op: &'static str, source: rusqlite::Error) -> Self {
        Self {
            op,
            source: Box::new(source),
        }
    }
}

fn err<E: std::error::Error + Send + Sync + 'static>(
    op: &'static str,
) -> impl FnOnce(E) -> RegistryError {
    move |e| RegistryError {
        op,
        source: Box::new(e),
    }
}

/// The SQLite-backed store.
#[derive(Debug)]
pub(crate) struct Registry {
    conn: Mutex<Connection>,
}

impl Registry {
    /// Opens (creating if needed) the database at `path`.
    pub(crate) fn open(path: &Path) -> Result<Self, RegistryError> {
        let conn = Connection::open(path).map_err(err("open database"))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err("enable WAL"))?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err("set synchronous"))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err("set busy timeout"))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS sandboxes (
                id TEXT PRIMARY KEY,
                created_at INTEGER NOT NULL,
                record TEXT NOT NULL
            );
            CREATE TABLE IF NOT EXISTS pool_targets (
                template TEXT PRIMARY KEY,
                target INTEGER NOT NULL
            );",
        )
        .map_err(err("create schema"))?;
        coppice_events::store::migrate(&conn).map_err(err("create the events tables"))?;
        migrate_spawns(&conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (transactions roll
        // back), so a poisoned lock is still usable.
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Inserts or replaces `record`.
    pub(crate) fn put(&self, record: &Record) -> Result<(), RegistryError> {
        self.put_with_events(record, &[])
    }

    /// Inserts or replaces `record` and records `events` (with their outbox rows) in the same
    /// transaction: both commit, or neither does.
    pub(crate) fn put_with_events(
        &self,
        record: &Record,
        events: &[Event],
    ) -> Result<(), RegistryError> {
        let json = serde_json::to_string(record).map_err(err("encode record"))?;
        self.transaction(events, |tx| {
            // Every lifecycle change writes here: prepared once per connection.
            tx.prepare_cached(
                "INSERT INTO sandboxes (id, created_at, record) VALUES (?1, ?2, ?3)
                 ON CONFLICT(id) DO UPDATE SET record = excluded.record",
            )
            .and_then(|mut stmt| {
                stmt.execute(params![
                    record.id.as_str(),
                    i64::try_from(record.created_at).unwrap_or(i64::MAX),
                    json
                ])
            })
            .map_err(err("write record"))?;
            Ok(())
        })
    }

    /// Records `events` that change no record, in one transaction.
    pub(crate) fn record_events(&self, events: &[Event]) -> Result<(), RegistryError> {
        self.transaction(events, |_| Ok(()))
    }

    /// Runs `change` (rows of another capability's tables in this database, such as a
    /// snapshot's) and records `events`, in one transaction.
    pub(crate) fn change_with_events<E>(
        &self,
        events: &[Event],
        op: &'static str,
        change: impl FnOnce(&Connection) -> Result<(), E>,
    ) -> Result<(), RegistryError>
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        self.transaction(events, |tx| change(tx).map_err(err(op)))
    }

    /// Forgets a sandbox.
    pub(crate) fn delete(&self, id: &SandboxId) -> Result<(), RegistryError> {
        self.delete_with_events(id, &[])
    }

    /// Forgets a sandbox and records `events` in the same transaction.
    pub(crate) fn delete_with_events(
        &self,
        id: &SandboxId,
        events: &[Event],
    ) -> Result<(), RegistryError> {
        self.delete_many_with_events(std::slice::from_ref(id), events)
    }

    /// Forgets every sandbox of `ids` and records `events`, all in one transaction: after a
    /// restart that found thousands of sandboxes gone, one commit instead of thousands.
    pub(crate) fn delete_many_with_events(
        &self,
        ids: &[SandboxId],
        events: &[Event],
    ) -> Result<(), RegistryError> {
        self.transaction(events, |tx| {
            let mut stmt = tx
                .prepare_cached("DELETE FROM sandboxes WHERE id = ?1")
                .map_err(err("delete record"))?;
            for id in ids {
                stmt.execute(params![id.as_str()])
                    .map_err(err("delete record"))?;
            }
            Ok(())
        })
    }

    /// Runs `change`, then records `events`, in one transaction.
    fn transaction(
        &self,
        events: &[Event],
        change: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<(), RegistryError>,
    ) -> Result<(), RegistryError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(err("begin transaction"))?;
        change(&tx)?;
        for event in events {
            coppice_events::store::record(&tx, event).map_err(err("record event"))?;
            if event.event_type == EventType::Created {
                tx.prepare_cached(
                    "INSERT INTO template_spawns (template, spawns, last_at) VALUES (?1, 1, ?2)
                     ON CONFLICT(template) DO UPDATE SET spawns = spawns + 1,
                         last_at = max(last_at, excluded.last_at)",
                )
                .and_then(|mut stmt| {
                    stmt.execute(params![
                        event.sandbox_template_id,
                        i64::try_from(event.timestamp.0).unwrap_or(i64::MAX)
                    ])
                })
                .map_err(err("count a template spawn"))?;
            }
        }
        tx.commit().map_err(err("commit"))?;
        Ok(())
    }

    /// How often sandboxes were created from each template, by template id.
    pub(crate) fn spawns(&self) -> Result<HashMap<String, Spawns>, RegistryError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT template, spawns, last_at FROM template_spawns")
            .map_err(err("read template spawns"))?;
        let rows = stmt
            .query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, i64>(2)?,
                ))
            })
            .map_err(err("read template spawns"))?;
        let mut out = HashMap::new();
        for row in rows {
            let (template, count, last_at) = row.map_err(err("read template spawns"))?;
            out.insert(
                template,
                Spawns {
                    count: u64::try_from(count).unwrap_or(0),
                    last_at: u64::try_from(last_at).unwrap_or(0),
                },
            );
        }
        Ok(out)
    }

    /// Each warm pool's target as `/pool` last set it, by template id.
    pub(crate) fn pool_targets(&self) -> Result<HashMap<String, usize>, RegistryError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT template, target FROM pool_targets")
            .map_err(err("read pool targets"))?;
        let rows = stmt
            .query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
            })
            .map_err(err("read pool targets"))?;
        let mut out = HashMap::new();
        for row in rows {
            let (template, target) = row.map_err(err("read pool targets"))?;
            out.insert(template, usize::try_from(target).unwrap_or(0));
        }
        Ok(out)
    }

    /// Stores the target of `template`'s warm pool.
    pub(crate) fn set_pool_target(
        &self,
        template: &str,
        target: usize,
    ) -> Result<(), RegistryError> {
        self.conn()
            .execute(
                "INSERT INTO pool_targets (template, target) VALUES (?1, ?2)
                 ON CONFLICT(template) DO UPDATE SET target = excluded.target",
                params![template, i64::try_from(target).unwrap_or(i64::MAX)],
            )
            .map_err(err("store a pool target"))?;
        Ok(())
    }

    /// Runs `f` on the database connection, for the events and webhooks API (reads, and
    /// webhook changes that describe no sandbox).
    pub(crate) fn with_conn<T>(&self, f: impl FnOnce(&Connection) -> T) -> T {
        f(&self.conn())
    }

    /// Every stored record, oldest first.
    pub(crate) fn load_all(&self) -> Result<Vec<Record>, RegistryError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT record FROM sandboxes ORDER BY created_at, id")
            .map_err(err("read records"))?;
        let rows = stmt
            .query_map([], |row| row.get::<_, String>(0))
            .map_err(err("read records"))?;
        let mut out = Vec::new();
        for row in rows {
            let json = row.map_err(err("read record"))?;
            out.push(serde_json::from_str(&json).map_err(err("decode record"))?);
        }
        Ok(out)
    }
}

/// Creates `template_spawns`. A database from before it existed starts from the `created`
/// events it still holds (those retention has not pruned yet), so its counts do not start
/// again at zero.
fn migrate_spawns(conn: &Connection) -> Result<(), RegistryError> {
    let exists: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'template_spawns')",
            [],
            |row| row.get(0),
        )
        .map_err(err("look for the template spawns table"))?;
    if exists {
        return Ok(());
    }
    conn.execute_batch(
        "BEGIN;
         CREATE TABLE template_spawns (
             template TEXT PRIMARY KEY,
             spawns INTEGER NOT NULL,
             last_at INTEGER NOT NULL
         );
         INSERT INTO template_spawns (template, spawns, last_at)
             SELECT json_extract(body, '$.sandboxTemplateId'), count(*), max(ts) FROM events
             WHERE type = 'sandbox.lifecycle.created'
               AND json_extract(body, '$.sandboxTemplateId') IS NOT NULL
             GROUP BY 1;
         COMMIT;",
    )
    .map_err(err("create the template spawns table"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use coppice_lifecycle::state::{Millis, Policy};

    use super::*;

    fn record(id: &str, created_at: u64) -> Record {
        Record {
            id: SandboxId::new(id).unwrap(),
            template: "base".into(),
            created_at,
            metadata: [("k".to_owned(), "v".to_owned())].into(),
            env_vars: BTreeMap::new(),
            access_token: "tok".into(),
            lifecycle: Lifecycle::creating(
                Millis(created_at),
                Duration::from_secs(300),
                Policy::default(),
            ),
            limits: Limits::default(),
            allow_internet: None,
            pid: Some(42),
            build_id: "layer".into(),
            execution_id: String::new(),
            execution_started_at: 0,
            traffic_token: None,
            network: None,
            from_pool: false,
            paused_cold: false,
            auto_pause_cold: false,
        }
    }

    #[test]
    fn pool_targets_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.db");
        {
            let reg = Registry::open(&path).unwrap();
            assert!(reg.pool_targets().unwrap().is_empty());
            reg.set_pool_target("base", 4).unwrap();
            reg.set_pool_target("code-interpreter-v1", 2).unwrap();
            reg.set_pool_target("base", 0).unwrap();
        }
        let targets = Registry::open(&path).unwrap().pool_targets().unwrap();
        assert_eq!(targets.len(), 2);
        assert_eq!(targets["base"], 0);
        assert_eq!(targets["code-interpreter-v1"], 2);
    }

    #[test]
    fn records_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.db");
        {
            let reg = Registry::open(&path).unwrap();
            reg.put(&record("b", 2)).unwrap();
            reg.put(&record("a", 1)).unwrap();
            let mut changed = record("b", 2);
            changed.pid = Some(7);
            changed.from_pool = true;
            reg.put(&changed).unwrap();
            reg.put(&record("c", 3)).unwrap();
            reg.delete(&SandboxId::new("c").unwrap()).unwrap();
        }
        let reg = Registry::open(&path).unwrap();
        let all = reg.load_all().unwrap();
        let ids: Vec<&str> = all.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(all[1].pid, Some(7));
        assert!(all[1].from_pool && !all[0].from_pool);
        assert_eq!(all[0], record("a", 1));
    }

    #[test]
    fn records_from_before_the_traffic_token_read_as_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.db");
        let mut secured = record("b", 2);
        secured.traffic_token = Some("t0k".into());
        {
            let reg = Registry::open(&path).unwrap();
            reg.put(&secured).unwrap();
            // A record as an older gateway wrote it: no `traffic_token` key at all.
            let mut old = serde_json::to_value(record("a", 1)).unwrap();
            old.as_object_mut().unwrap().remove("traffic_token");
            reg.with_conn(|c| {
                c.execute(
                    "INSERT INTO sandboxes (id, created_at, record) VALUES ('a', 1, ?1)",
                    params![old.to_string()],
                )
            })
            .unwrap();
        }
        let all = Registry::open(&path).unwrap().load_all().unwrap();
        assert_eq!(all[0], record("a", 1));
        assert_eq!(all[1].traffic_token.as_deref(), Some("t0k"));
    }

    #[test]
    fn a_change_and_its_event_commit_together() {
        use coppice_events::event::SandboxContext;
        use coppice_events::store::{list_events, EventQuery};
        use coppice_lifecycle::state::LifecycleEvent;

        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(&dir.path().join("registry.db")).unwrap();
        let ctx = SandboxContext {
            sandbox_id: "a".into(),
            ..SandboxContext::default()
        };
        let created = Event::lifecycle(&ctx, &LifecycleEvent::Created, Millis(1));
        reg.put_with_events(&record("a", 1), std::slice::from_ref(&created))
            .unwrap();
        // Recording the same event again fails, and takes the record change down with it.
        let mut changed = record("a", 1);
        changed.pid = Some(7);
        reg.put_with_events(&changed, std::slice::from_ref(&created))
            .unwrap_err();
        assert_eq!(reg.load_all().unwrap()[0].pid, Some(42));
        let events = reg
            .with_conn(|c| list_events(c, &EventQuery::default()))
            .unwrap();
        assert_eq!(events, [created]);
        let killed = Event::lifecycle(
            &ctx,
            &LifecycleEvent::Killed {
                cause: coppice_lifecycle::state::Cause::Manual,
            },
            Millis(2),
        );
        reg.delete_with_events(&SandboxId::new("a").unwrap(), std::slice::from_ref(&killed))
            .unwrap();
        assert!(reg.load_all().unwrap().is_empty());
        let events = reg
            .with_conn(|c| list_events(c, &EventQuery::default()))
            .unwrap();
        assert_eq!(events.len(), 2);
    }

    #[test]
    fn created_events_count_spawns_per_template_for_good() {
        use coppice_events::event::SandboxContext;
        use coppice_lifecycle::state::{Cause, LifecycleEvent};

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.db");
        let ctx = |id: &str, template: &str| SandboxContext {
            sandbox_id: id.into(),
            template_id: template.into(),
            ..SandboxContext::default()
        };
        let created = |id: &str, template: &str, at: u64| {
            Event::lifecycle(&ctx(id, template), &LifecycleEvent::Created, Millis(at))
        };
        {
            let reg = Registry::open(&path).unwrap();
            assert!(reg.spawns().unwrap().is_empty());
            reg.put_with_events(&record("a", 1), &[created("a", "base", 1_000)])
                .unwrap();
            reg.put_with_events(&record("b", 2), &[created("b", "base", 3_000)])
                .unwrap();
            reg.put_with_events(
                &record("c", 3),
                &[created("c", "code-interpreter-v1", 2_000)],
            )
            .unwrap();
            // Other events count nothing; a failed transaction counts nothing.
            let killed = Event::lifecycle(
                &ctx("a", "base"),
                &LifecycleEvent::Killed {
                    cause: Cause::Manual,
                },
                Millis(4_000),
            );
            reg.delete_with_events(&SandboxId::new("a").unwrap(), &[killed])
                .unwrap();
            let again = created("d", "base", 5_000);
            reg.put_with_events(&record("d", 4), &[again.clone(), again])
                .unwrap_err();
        }
        // Pruning the events (retention) does not touch the counts.
        let reg = Registry::open(&path).unwrap();
        reg.with_conn(|c| c.execute("DELETE FROM events", []))
            .unwrap();
        let spawns = reg.spawns().unwrap();
        assert_eq!(
            spawns["base"],
            Spawns {
                count: 2,
                last_at: 3_000
            }
        );
        assert_eq!(spawns["code-interpreter-v1"].count, 1);
        assert_eq!(spawns.len(), 2);
    }

    #[test]
    fn a_database_from_before_the_counts_starts_from_its_events() {
        use coppice_events::event::SandboxContext;
        use coppice_lifecycle::state::LifecycleEvent;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.db");
        {
            let reg = Registry::open(&path).unwrap();
            for (id, at) in [("a", 10), ("b", 20)] {
                let ctx = SandboxContext {
                    sandbox_id: id.into(),
                    template_id: "base".into(),
                    ..SandboxContext::default()
                };
                let e = Event::lifecycle(&ctx, &LifecycleEvent::Created, Millis(at));
                reg.record_events(&[e]).unwrap();
            }
            // As an older gateway left it: events, no counts.
            reg.with_conn(|c| c.execute("DROP TABLE template_spawns", []))
                .unwrap();
        }
        let spawns = Registry::open(&path).unwrap().spawns().unwrap();
        assert_eq!(
            spawns["base"],
            Spawns {
                count: 2,
                last_at: 20
            }
        );
    }

    #[test]
    fn many_deletes_and_their_events_commit_together() {
        use coppice_events::event::SandboxContext;
        use coppice_events::store::{list_events, EventQuery};
        use coppice_lifecycle::state::{Cause, LifecycleEvent};

        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(&dir.path().join("registry.db")).unwrap();
        for (id, created_at) in [("a", 1), ("b", 2), ("c", 3)] {
            reg.put(&record(id, created_at)).unwrap();
        }
        let killed = |id: &str| {
            let ctx = SandboxContext {
                sandbox_id: id.into(),
                ..SandboxContext::default()
            };
            let cause = Cause::Failure;
            Event::lifecycle(&ctx, &LifecycleEvent::Killed { cause }, Millis(9))
        };
        let ids = [SandboxId::new("a").unwrap(), SandboxId::new("c").unwrap()];
        let events = [killed("a"), killed("c")];
        // A duplicate event fails the whole batch: no record goes, no event is kept.
        let twice = [events[0].clone(), events[0].clone()];
        reg.delete_many_with_events(&ids, &twice).unwrap_err();
        assert_eq!(reg.load_all().unwrap().len(), 3);
        reg.delete_many_with_events(&ids, &events).unwrap();
        let left: Vec<String> = reg
            .load_all()
            .unwrap()
            .into_iter()
            .map(|r| r.id.to_string())
            .collect();
        assert_eq!(left, ["b"]);
        let recorded = reg
            .with_conn(|c| list_events(c, &EventQuery::default()))
            .unwrap();
        assert_eq!(recorded.len(), 2);
    }
}
