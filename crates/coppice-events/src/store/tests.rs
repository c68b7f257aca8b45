//! Store tests: the transaction rule, the outbox life cycle, the read API's paging, webhook
//! validation, replay and retention — all on an in-memory database.

use std::collections::BTreeMap;

use coppice_lifecycle::state::{Cause, LifecycleEvent};

use super::*;
use crate::event::SandboxContext;

const T0: Millis = Millis(1_767_225_600_000);

fn db() -> Connection {
    let conn = Connection::open_in_memory().unwrap();
    migrate(&conn).unwrap();
    // Idempotent.
    migrate(&conn).unwrap();
    conn
}

fn ctx(sandbox: &str) -> SandboxContext {
    SandboxContext {
        sandbox_id: sandbox.into(),
        template_id: "base".into(),
        build_id: "base".into(),
        execution_id: "exec".into(),
        team_id: crate::event::LOCAL_TEAM_ID.into(),
        metadata: BTreeMap::new(),
        execution: None,
    }
}

fn created(sandbox: &str, at: u64) -> Event {
    Event::lifecycle(&ctx(sandbox), &LifecycleEvent::Created, Millis(at))
}

fn killed(sandbox: &str, at: u64) -> Event {
    Event::lifecycle(
        &ctx(sandbox),
        &LifecycleEvent::Killed {
            cause: Cause::Manual,
        },
        Millis(at),
    )
}

fn hook(events: &[EventType]) -> NewWebhook {
    NewWebhook {
        name: "ops".into(),
        url: "http://127.0.0.1:9/hook".into(),
        enabled: true,
        events: events.to_vec(),
        secret: "s3cr3t".into(),
        format: Format::E2b,
    }
}

fn policy(delays_ms: &[u64]) -> RetryPolicy {
    RetryPolicy {
        delays: delays_ms
            .iter()
            .map(|&d| Duration::from_millis(d))
            .collect(),
        jitter: 0.0,
        attempt_timeout: Duration::from_secs(1),
    }
}

fn claim_all(conn: &Connection, now: Millis) -> Vec<Claim> {
    claim_due(
        conn,
        &ClaimRequest {
            now,
            limit: 100,
            per_webhook: 100,
            lease: Duration::from_secs(60),
            held: &[],
        },
    )
    .unwrap()
}

fn answered(at: Millis, status: u16) -> AttemptResult {
    AttemptResult {
        at,
        status: Some(status),
        latency: Duration::from_millis(7),
        error: None,
        retry_after: None,
    }
}

#[test]
fn an_event_commits_or_rolls_back_with_the_callers_change() {
    let mut conn = db();
    conn.execute_batch("CREATE TABLE sandboxes (id TEXT PRIMARY KEY)")
        .unwrap();
    let wh = create_webhook(&conn, &hook(&[EventType::Created]), T0).unwrap();

    let lost = created("a", T0.0);
    {
        let tx = conn.transaction().unwrap();
        tx.execute("INSERT INTO sandboxes VALUES ('a')", [])
            .unwrap();
        record(&tx, &lost).unwrap();
        tx.rollback().unwrap();
    }
    assert_eq!(list_events(&conn, &EventQuery::default()).unwrap(), []);
    assert_eq!(deliveries_of(&conn, lost.id).unwrap(), []);

    let kept = created("a", T0.0);
    {
        let tx = conn.transaction().unwrap();
        tx.execute("INSERT INTO sandboxes VALUES ('a')", [])
            .unwrap();
        assert_eq!(record(&tx, &kept).unwrap(), kept.id);
        tx.commit().unwrap();
    }
    assert_eq!(
        list_events(&conn, &EventQuery::default()).unwrap(),
        std::slice::from_ref(&kept)
    );
    let d = deliveries_of(&conn, kept.id).unwrap();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].webhook_id, wh.id);
    assert_eq!(d[0].state, DeliveryState::Pending);

    // A failure inside record leaves the caller's transaction usable and the event absent.
    let tx = conn.transaction().unwrap();
    assert!(matches!(
        record(&tx, &kept),
        Err(StoreError::Duplicate { id }) if id == kept.id
    ));
    tx.execute("INSERT INTO sandboxes VALUES ('b')", [])
        .unwrap();
    tx.commit().unwrap();
    assert_eq!(list_events(&conn, &EventQuery::default()).unwrap().len(), 1);
}

#[test]
fn deliveries_go_to_enabled_subscribed_webhooks_only() {
    let conn = db();
    let both = create_webhook(&conn, &hook(&[EventType::Created, EventType::Killed]), T0).unwrap();
    let created_only = create_webhook(&conn, &hook(&[EventType::Created]), T0).unwrap();
    let mut off = hook(&EventType::ALL);
    off.enabled = false;
    create_webhook(&conn, &off, T0).unwrap();

    let c = created("a", T0.0);
    let k = killed("a", T0.0);
    record(&conn, &c).unwrap();
    record(&conn, &k).unwrap();
    let to: Vec<Uuid> = deliveries_of(&conn, c.id)
        .unwrap()
        .iter()
        .map(|d| d.webhook_id)
        .collect();
    assert_eq!(to.len(), 2);
    assert!(to.contains(&both.id) && to.contains(&created_only.id));
    let to: Vec<Uuid> = deliveries_of(&conn, k.id)
        .unwrap()
        .iter()
        .map(|d| d.webhook_id)
        .collect();
    assert_eq!(to, [both.id]);
}

#[test]
fn listing_events_pages_filters_and_clamps() {
    let conn = db();
    let mut ids = Vec::new();
    for i in 0..120 {
        let e = if i % 2 == 0 {
            created("a", T0.0 + i)
        } else {
            killed("b", T0.0 + i)
        };
        ids.push(e.id);
        record(&conn, &e).unwrap();
    }
    let page = |q: EventQuery| -> Vec<Uuid> {
        list_events(&conn, &q)
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect()
    };
    // Default: ten, newest first.
    assert_eq!(
        page(EventQuery::default()),
        ids.iter().rev().take(10).copied().collect::<Vec<_>>()
    );
    assert_eq!(
        page(EventQuery {
            limit: Some(1000),
            ..Default::default()
        })
        .len(),
        100
    );
    assert_eq!(
        page(EventQuery {
            limit: Some(0),
            ..Default::default()
        })
        .len(),
        1
    );
    assert_eq!(
        page(EventQuery {
            limit: Some(3),
            offset: 2,
            order_asc: true,
            ..Default::default()
        }),
        ids[2..5]
    );
    let only_b = page(EventQuery {
        sandbox_id: Some("b".into()),
        limit: Some(100),
        order_asc: true,
        ..Default::default()
    });
    assert_eq!(only_b.len(), 60);
    assert_eq!(only_b[0], ids[1]);
    let killed_only = list_events(
        &conn,
        &EventQuery {
            types: vec![EventType::Killed],
            limit: Some(100),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(killed_only.len(), 60);
    assert!(killed_only
        .iter()
        .all(|e| e.event_type == EventType::Killed));
    let none = page(EventQuery {
        types: vec![EventType::Paused],
        ..Default::default()
    });
    assert!(none.is_empty(), "{none:?}");
}

#[test]
fn webhook_crud_and_validation() {
    let conn = db();
    let wh = create_webhook(&conn, &hook(&[EventType::Created, EventType::Created]), T0).unwrap();
    assert_eq!(wh.events, [EventType::Created]);
    assert_eq!(
        (wh.name.as_str(), wh.enabled, wh.created_at),
        ("ops", true, T0)
    );
    assert_eq!(get_webhook(&conn, wh.id).unwrap(), wh);
    assert_eq!(list_webhooks(&conn).unwrap(), std::slice::from_ref(&wh));
    // The secret is stored but never shown, not even in Debug output.
    assert!(!format!("{:?}", hook(&[EventType::Created])).contains("s3cr3t"));

    let bad = [
        (
            NewWebhook {
                url: "ftp://x/".into(),
                ..hook(&[EventType::Created])
            },
            "url",
        ),
        (
            NewWebhook {
                url: "not a url".into(),
                ..hook(&[EventType::Created])
            },
            "url",
        ),
        (
            NewWebhook {
                name: " ".into(),
                ..hook(&[EventType::Created])
            },
            "name",
        ),
        (
            NewWebhook {
                name: "n".repeat(MAX_NAME + 1),
                ..hook(&[EventType::Created])
            },
            "name",
        ),
        (hook(&[]), "events"),
        (
            NewWebhook {
                secret: String::new(),
                ..hook(&[EventType::Created])
            },
            "signatureSecret",
        ),
    ];
    for (new, field) in bad {
        match create_webhook(&conn, &new, T0) {
            Err(StoreError::Invalid { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: {other:?}"),
        }
    }
    assert_eq!(list_webhooks(&conn).unwrap().len(), 1);

    let patched = update_webhook(
        &conn,
        wh.id,
        &WebhookPatch {
            url: Some("http://127.0.0.1:10/other".into()),
            enabled: Some(false),
            events: Some(vec![EventType::Killed, EventType::Paused]),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(patched.url, "http://127.0.0.1:10/other");
    assert!(!patched.enabled);
    assert_eq!(patched.events, [EventType::Killed, EventType::Paused]);
    assert_eq!(patched.name, "ops");
    assert!(matches!(
        update_webhook(
            &conn,
            wh.id,
            &WebhookPatch {
                events: Some(vec![]),
                ..Default::default()
            }
        ),
        Err(StoreError::Invalid {
            field: "events",
            ..
        })
    ));
    let missing = Uuid::new_v4();
    assert!(matches!(
        update_webhook(&conn, missing, &WebhookPatch::default()),
        Err(StoreError::NotFound { .. })
    ));
    delete_webhook(&conn, wh.id).unwrap();
    assert!(matches!(
        get_webhook(&conn, wh.id),
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        delete_webhook(&conn, wh.id),
        Err(StoreError::NotFound { .. })
    ));
}

#[test]
fn a_lease_hides_a_delivery_until_recovery_and_the_event_id_survives() {
    let conn = db();
    create_webhook(&conn, &hook(&[EventType::Created]), T0).unwrap();
    let e = created("a", T0.0);
    record(&conn, &e).unwrap();

    let first = claim_all(&conn, T0);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].attempt, 1);
    assert_eq!(first[0].event_id, e.id);
    assert_eq!(first[0].body, e.to_json());
    // Leased: nobody else gets it.
    assert_eq!(claim_all(&conn, T0), []);
    // A crash here loses the dispatcher; recovery makes the attempt again, same event id,
    // same body, a new attempt id.
    assert_eq!(recover(&conn).unwrap(), 1);
    let again = claim_all(&conn, T0);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].event_id, e.id);
    assert_eq!(again[0].body, first[0].body);
    assert_eq!(again[0].attempt, 1);
    assert_ne!(again[0].attempt_id, first[0].attempt_id);
    // A lease that ran out is claimable too, without recovery.
    let later = T0.plus(Duration::from_secs(61));
    assert_eq!(claim_all(&conn, later).len(), 1);
}

#[test]
fn retries_follow_the_policy_then_fail() {
    let conn = db();
    let wh = create_webhook(&conn, &hook(&[EventType::Created]), T0).unwrap();
    let e = created("a", T0.0);
    record(&conn, &e).unwrap();
    let p = policy(&[1000, 5000]);

    let c = claim_all(&conn, T0).remove(0);
    let out = finish_attempt(&conn, &c, &answered(T0, 500), &p).unwrap();
    // Due 1 s after the attempt ended (7 ms of latency).
    assert_eq!(
        out,
        Outcome::Retrying {
            next_at: Millis(T0.0 + 1007)
        }
    );
    assert_eq!(claim_all(&conn, Millis(T0.0 + 1006)), []);
    let c = claim_all(&conn, Millis(T0.0 + 1007)).remove(0);
    assert_eq!(c.attempt, 2);
    let mut timeout = answered(Millis(T0.0 + 1007), 0);
    timeout.status = None;
    timeout.error = Some("timed out".into());
    timeout.retry_after = None;
    let out = finish_attempt(&conn, &c, &timeout, &p).unwrap();
    assert_eq!(
        out,
        Outcome::Retrying {
            next_at: Millis(T0.0 + 1007 + 7 + 5000)
        }
    );
    let c = claim_all(&conn, Millis(T0.0 + 10_000)).remove(0);
    assert_eq!(c.attempt, 3);
    assert_eq!(
        finish_attempt(&conn, &c, &answered(Millis(T0.0 + 10_000), 503), &p).unwrap(),
        Outcome::Failed
    );
    assert_eq!(claim_all(&conn, Millis(T0.0 + 99_000_000)), []);
    let d = deliveries_of(&conn, e.id).unwrap();
    assert_eq!((d[0].state, d[0].attempts), (DeliveryState::Failed, 3));

    // Every attempt is logged, newest first, with status, latency and error.
    let log = list_deliveries(
        &conn,
        &DeliveryQuery {
            webhook_id: Some(wh.id),
            ..Default::default()
        },
    )
    .unwrap();
    let summary: Vec<(Option<u16>, &str)> =
        log.iter().map(|a| (a.status, a.outcome.as_str())).collect();
    assert_eq!(
        summary,
        [
            (Some(503), "failed"),
            (None, "retrying"),
            (Some(500), "retrying")
        ]
    );
    assert_eq!(log[1].error.as_deref(), Some("timed out"));
    assert_eq!(log[2].latency, Duration::from_millis(7));
    assert!(log
        .iter()
        .all(|a| a.event_id == e.id && a.delivery_id == d[0].id));
    let ids: std::collections::HashSet<Uuid> = log.iter().map(|a| a.id).collect();
    assert_eq!(ids.len(), 3);
}

#[test]
fn retry_after_pushes_the_next_attempt_back() {
    let conn = db();
    create_webhook(&conn, &hook(&[EventType::Created]), T0).unwrap();
    record(&conn, &created("a", T0.0)).unwrap();
    let c = claim_all(&conn, T0).remove(0);
    let mut r = answered(T0, 429);
    r.retry_after = Some(Duration::from_secs(3600));
    let out = finish_attempt(&conn, &c, &r, &policy(&[10])).unwrap();
    assert_eq!(
        out,
        Outcome::Retrying {
            next_at: Millis(T0.0 + 7 + 3_600_000)
        }
    );
}

#[test]
fn gone_disables_the_webhook_until_re_enabled() {
    let conn = db();
    let wh = create_webhook(&conn, &hook(&[EventType::Created]), T0).unwrap();
    record(&conn, &created("a", T0.0)).unwrap();
    let c = claim_all(&conn, T0).remove(0);
    assert_eq!(
        finish_attempt(&conn, &c, &answered(T0, 410), &policy(&[10])).unwrap(),
        Outcome::Disabled
    );
    let now = get_webhook(&conn, wh.id).unwrap();
    assert!(!now.enabled);
    assert!(now.disabled_reason.unwrap().contains("410"));
    // Disabled: new events are not enqueued for it.
    let later = created("b", T0.0 + 1);
    record(&conn, &later).unwrap();
    assert_eq!(deliveries_of(&conn, later.id).unwrap(), []);
    let back = update_webhook(
        &conn,
        wh.id,
        &WebhookPatch {
            enabled: Some(true),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(back.enabled);
    assert_eq!(back.disabled_reason, None);
}

#[test]
fn claims_respect_limits_skips_and_disabled_webhooks() {
    let conn = db();
    let a = create_webhook(&conn, &hook(&[EventType::Created]), T0).unwrap();
    let b = create_webhook(&conn, &hook(&[EventType::Created]), T0).unwrap();
    for i in 0..5 {
        record(&conn, &created("x", T0.0 + i)).unwrap();
    }
    let req = |held: &[(Uuid, usize)]| {
        claim_due(
            &conn,
            &ClaimRequest {
                now: Millis(T0.0 + 10),
                limit: 3,
                per_webhook: 2,
                lease: Duration::from_secs(60),
                held,
            },
        )
        .unwrap()
    };
    let got = req(&[]);
    assert_eq!(got.len(), 3);
    let from_a = got.iter().filter(|c| c.target.webhook_id == a.id).count();
    assert!(from_a <= 2 && got.len() - from_a <= 2);
    recover(&conn).unwrap();
    let got = req(&[(a.id, 2)]);
    assert!(got.iter().all(|c| c.target.webhook_id == b.id));
    assert_eq!(got.len(), 2);
    recover(&conn).unwrap();
    update_webhook(
        &conn,
        b.id,
        &WebhookPatch {
            enabled: Some(false),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(req(&[(a.id, 2)]), []);
}

#[test]
fn sandforge_webhooks_get_the_sandforge_body() {
    let conn = db();
    let mut new = hook(&[EventType::Killed]);
    new.format = Format::Sandforge;
    create_webhook(&conn, &new, T0).unwrap();
    let e = killed("a", T0.0);
    record(&conn, &e).unwrap();
    let c = claim_all(&conn, T0).remove(0);
    assert_eq!(c.target.format, Format::Sandforge);
    assert_eq!(c.target.secret, "s3cr3t");
    assert_eq!(c.body, e.to_sandforge_json());
    assert!(!format!("{c:?}").contains("s3cr3t"));
}

#[test]
fn replay_a_delivery_or_everything_since() {
    let conn = db();
    let wh = create_webhook(&conn, &hook(&[EventType::Created]), T0).unwrap();
    let old = created("a", T0.0);
    let new = created("b", T0.0 + 5000);
    record(&conn, &old).unwrap();
    record(&conn, &new).unwrap();
    for c in claim_all(&conn, Millis(T0.0 + 5000)) {
        finish_attempt(&conn, &c, &answered(T0, 200), &policy(&[])).unwrap();
    }
    assert_eq!(claim_all(&conn, Millis(T0.0 + 6000)), []);

    let d = deliveries_of(&conn, old.id).unwrap()[0].clone();
    assert_eq!(d.state, DeliveryState::Delivered);
    replay_delivery(&conn, d.id, Millis(T0.0 + 6000)).unwrap();
    let again = claim_all(&conn, Millis(T0.0 + 6000));
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].event_id, again[0].attempt), (old.id, 1));
    assert!(matches!(
        replay_delivery(&conn, 9999, T0),
        Err(StoreError::NotFound { .. })
    ));
    recover(&conn).unwrap();

    // A webhook created later gets history on request.
    let late = create_webhook(&conn, &hook(&[EventType::Created]), T0).unwrap();
    assert_eq!(
        replay_since(
            &conn,
            Millis(T0.0 + 1000),
            Some(late.id),
            Millis(T0.0 + 7000)
        )
        .unwrap(),
        1
    );
    let replayed = claim_all(&conn, Millis(T0.0 + 7000));
    let pairs: Vec<(Uuid, Uuid)> = replayed
        .iter()
        .map(|c| (c.target.webhook_id, c.event_id))
        .collect();
    assert!(pairs.contains(&(late.id, new.id)));
    assert!(pairs.contains(&(wh.id, old.id)));
    assert_eq!(pairs.len(), 2);
}

#[test]
fn retention_by_age_and_count_keeps_undelivered_events() {
    let conn = db();
    for i in 0..10 {
        record(&conn, &created("a", T0.0 + i * 1000)).unwrap();
    }
    // A webhook with one pending delivery of an old event.
    let wh = create_webhook(&conn, &hook(&[EventType::Killed]), T0).unwrap();
    let pending = killed("a", T0.0 + 500);
    record(&conn, &pending).unwrap();
    let by_age = prune(
        &conn,
        &Retention {
            max_age: Some(Duration::from_secs(5)),
            max_events: None,
        },
        Millis(T0.0 + 10_000),
    )
    .unwrap();
    // Events at 0..=4 s are older than 5 s; the pending one stays.
    assert_eq!(by_age.events, 5);
    let left = list_events(
        &conn,
        &EventQuery {
            limit: Some(100),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(left.len(), 6);
    assert!(left.iter().any(|e| e.id == pending.id));

    // Count: keep the newest three (by recording order), again sparing the pending one.
    let by_count = prune(
        &conn,
        &Retention {
            max_age: None,
            max_events: Some(3),
        },
        Millis(T0.0 + 10_000),
    )
    .unwrap();
    assert_eq!(by_count.events, 3);

    // Once delivered, it ages out like the rest, along with its outbox row and attempts.
    let c = claim_all(&conn, Millis(T0.0 + 10_000)).remove(0);
    finish_attempt(
        &conn,
        &c,
        &answered(Millis(T0.0 + 10_000), 200),
        &policy(&[]),
    )
    .unwrap();
    let last = prune(
        &conn,
        &Retention::e2b(),
        Millis(T0.0 + 8 * 24 * 3600 * 1000),
    )
    .unwrap();
    assert_eq!(
        last,
        Pruned {
            events: 3,
            deliveries: 1,
            attempts: 1
        }
    );
    assert_eq!(
        list_deliveries(
            &conn,
            &DeliveryQuery {
                webhook_id: Some(wh.id),
                ..Default::default()
            }
        )
        .unwrap(),
        []
    );
}

#[test]
fn a_feed_records_each_step_exactly_once() {
    let conn = db();
    create_webhook(&conn, &hook(&[EventType::Created]), T0).unwrap();
    assert_eq!(feed_position(&conn, "agent:x").unwrap(), 0);
    let a = created("x", T0.0);
    record_feed(&conn, "agent:x", 120, std::slice::from_ref(&a)).unwrap();
    assert_eq!(feed_position(&conn, "agent:x").unwrap(), 120);
    // The same step again (a crash between reading and recording, then a re-read) fails
    // whole: the event is a duplicate and the position does not move.
    let b = created("x", T0.0 + 1);
    let err = record_feed(&conn, "agent:x", 240, &[b.clone(), a.clone()]).unwrap_err();
    assert!(matches!(err, StoreError::Duplicate { .. }), "{err}");
    assert_eq!(feed_position(&conn, "agent:x").unwrap(), 120);
    assert!(deliveries_of(&conn, b.id).unwrap().is_empty());
    record_feed(&conn, "agent:x", 240, &[b]).unwrap();
    assert_eq!(feed_position(&conn, "agent:x").unwrap(), 240);
    forget_feeds(&conn, &["agent:x"]).unwrap();
    assert_eq!(feed_position(&conn, "agent:x").unwrap(), 0);
}

#[test]
fn delivery_stats_count_the_outbox_by_state() {
    let conn = db();
    assert_eq!(delivery_stats(&conn).unwrap(), DeliveryStats::default());
    create_webhook(&conn, &hook(&[EventType::Created]), T0).unwrap();
    let p = policy(&[1000]);
    for sandbox in ["a", "b", "c"] {
        record(&conn, &created(sandbox, T0.0)).unwrap();
    }
    let mut claims = claim_all(&conn, T0);
    assert_eq!(claims.len(), 3);
    finish_attempt(&conn, &claims.remove(0), &answered(T0, 200), &p).unwrap();
    let retried = claims.remove(0);
    finish_attempt(&conn, &retried, &answered(T0, 500), &p).unwrap();
    let again = claim_all(&conn, Millis(T0.0 + 10_000)).remove(0);
    assert_eq!(again.delivery_id, retried.delivery_id);
    finish_attempt(&conn, &again, &answered(Millis(T0.0 + 10_000), 500), &p).unwrap();
    assert_eq!(
        delivery_stats(&conn).unwrap(),
        DeliveryStats {
            // The third delivery is still leased, which is pending.
            pending: 1,
            delivered: 1,
            failed: 1,
        }
    );
}
