//! Admission control through the real gateway: `--max-sandboxes` stops creates (both routes)
//! with E2B's 429 and a `Retry-After` while the sandboxes already running keep working, a kill
//! frees a place, concurrent creates never take more places than there are, warm sandboxes
//! count against the limit, and a memory floor above what the host has refuses every create
//! and keeps the warm pool empty; `/health` and `/metrics` show the figures. Real binary, real
//! sandboxes; see `support/mod.rs`.
#![cfg(target_os = "linux")]
// An integration test crate: no `mod tests` wrapper, helpers may unwrap, skip lines must reach
// the test output, and the tests run on plain threads, where `std::thread::sleep` blocks
// nothing else.
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::tests_outside_test_module,
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::disallowed_methods
)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use http::StatusCode;
use serde_json::{json, Value};
use support::{id_of, token_of, wait_for, Lab, Resp};

/// How long the warm-pool filler may take to start a sandbox.
const POOL_WAIT: Duration = Duration::from_secs(60);

/// `GET /metrics`: series (name with labels) → value.
fn scrape(lab: &Lab) -> BTreeMap<String, f64> {
    let r = lab.api("GET", "/metrics", None);
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.text()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(series, v)| (series.to_owned(), v.parse().unwrap()))
        .collect()
}

fn series(m: &BTreeMap<String, f64>, name: &str) -> f64 {
    *m.get(name)
        .unwrap_or_else(|| panic!("no {name} in {:?}", m.keys().collect::<Vec<_>>()))
}

/// `/health`'s `capacity` object.
fn capacity(lab: &Lab) -> Value {
    let r = lab.api("GET", "/health", None);
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let c = r.json()["capacity"].clone();
    for key in [
        "maxSandboxes",
        "used",
        "warm",
        "free",
        "memAvailableBytes",
        "minFreeMemoryBytes",
    ] {
        assert!(c[key].is_u64(), "capacity.{key} in {c}");
    }
    c
}

/// The ids of every sandbox the gateway's jail has (warm ones included), from its cgroups.
fn jailed_ids(lab: &Lab) -> BTreeSet<String> {
    lab.group_leftovers()
        .iter()
        .filter_map(|l| l.strip_prefix("cgroup "))
        .filter_map(|p| p.rsplit('/').next().map(str::to_owned))
        .collect()
}

/// Asserts a refused create: E2B's 429 body, a `Retry-After`, and a message with `says`.
fn assert_refused(r: &Resp, says: &str) {
    r.assert_error(429, "refused create");
    let message = r.json()["message"].as_str().unwrap().to_owned();
    assert!(message.contains(says), "{message:?} does not say {says:?}");
    let retry = r
        .headers
        .get(http::header::RETRY_AFTER)
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(retry.as_deref(), Some("1"), "Retry-After");
}

/// Sends `n` creates at once, alternating the v2 and legacy routes; returns the responses.
fn burst(lab: &Lab, n: usize) -> Vec<Resp> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                s.spawn(move || {
                    let path = if i % 2 == 0 {
                        "/v2/sandboxes"
                    } else {
                        "/sandboxes"
                    };
                    lab.api(
                        "POST",
                        path,
                        Some(json!({"templateID": "base", "timeout": 600})),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Splits a burst's answers into the sandboxes created and the number refused (every other
/// answer fails the test).
fn tally(answers: &[Resp]) -> (Vec<Value>, usize) {
    let mut created = Vec::new();
    let mut refused = 0;
    for r in answers {
        if r.status == StatusCode::CREATED {
            created.push(r.json());
        } else {
            assert_refused(r, "--max-sandboxes 3");
            refused += 1;
        }
    }
    (created, refused)
}

/// With `--max-sandboxes 3` and a warm pool: three creates succeed, the fourth (either route)
/// is refused with a message naming the limit while the three keep working, a kill lets the
/// next create in, and a burst of eight creates never takes more than the three places.
#[test]
fn creates_stop_at_max_sandboxes_and_start_again_after_a_kill() {
    let Some(mut lab) = Lab::new("creates_stop_at_max_sandboxes_and_start_again_after_a_kill")
    else {
        return;
    };
    lab.options.args = vec![
        "--max-sandboxes".into(),
        "3".into(),
        "--warm-pool".into(),
        "1".into(),
    ];
    lab.start();
    // A warm sandbox of `base` takes a place before any create.
    wait_for("a warm base sandbox", POOL_WAIT, || {
        let m = scrape(&lab);
        (series(&m, "coppice_warm_sandboxes{template=\"base\"}") == 1.0).then_some(())
    });
    let c = capacity(&lab);
    assert_eq!(c["maxSandboxes"], json!(3));
    assert!(c["warm"].as_u64().unwrap() >= 1, "{c}");
    assert_eq!(
        c["used"].as_u64().unwrap() + c["free"].as_u64().unwrap(),
        3,
        "{c}"
    );

    let sandboxes: Vec<Value> = (0..3)
        .map(|_| lab.create(json!({"templateID": "base", "timeout": 600})))
        .collect();
    let r = lab.api("POST", "/v2/sandboxes", Some(json!({"templateID": "base"})));
    assert_refused(
        &r,
        "sandbox limit reached: 3 of --max-sandboxes 3 are in use",
    );
    let r = lab.api("POST", "/sandboxes", Some(json!({"templateID": "base"})));
    assert_refused(&r, "--max-sandboxes 3");
    for sbx in &sandboxes {
        assert_eq!(
            lab.exec(&id_of(sbx), Some(&token_of(sbx)), "echo alive")
                .ok(),
            "alive\n"
        );
    }
    // Three live sandboxes leave no place for the pool.
    let c = capacity(&lab);
    assert_eq!(
        (&c["used"], &c["free"], &c["warm"]),
        (&json!(3), &json!(0), &json!(0)),
        "{c}"
    );
    assert!(jailed_ids(&lab).len() <= 3, "{:?}", jailed_ids(&lab));
    let m = scrape(&lab);
    assert_eq!(series(&m, "coppice_sandboxes_capacity"), 3.0);
    assert_eq!(series(&m, "coppice_sandboxes_used"), 3.0);
    assert_eq!(series(&m, "coppice_sandboxes_free"), 0.0);
    assert_eq!(
        series(
            &m,
            "coppice_creates_refused_total{reason=\"max_sandboxes\"}"
        ),
        2.0
    );
    assert_eq!(
        series(&m, "coppice_creates_refused_total{reason=\"memory\"}"),
        0.0
    );
    assert!(series(&m, "coppice_host_memory_available_bytes") > 0.0);
    assert!(series(&m, "coppice_host_memory_floor_bytes") > 0.0);

    // A kill frees its place.
    let first = id_of(&sandboxes[0]);
    let r = lab.api("DELETE", &format!("/sandboxes/{first}"), None);
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    let again = lab.create(json!({"templateID": "base", "envVars": {"X": "again"}}));
    assert_eq!(
        lab.exec(&id_of(&again), Some(&token_of(&again)), "echo $X")
            .ok(),
        "again\n"
    );

    // From no live sandboxes (the pool may have refilled meanwhile), a burst of eight
    // creates against three places: some get in, the rest are refused, never more than three.
    for id in lab.listed_ids() {
        let r = lab.api("DELETE", &format!("/sandboxes/{id}"), None);
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    }
    let (created, refused) = tally(&burst(&lab, 8));
    println!("burst: {} created, {refused} refused", created.len());
    assert!(
        (1..=3).contains(&created.len()),
        "{} created",
        created.len()
    );
    assert_eq!(created.len() + refused, 8);
    let jailed = jailed_ids(&lab);
    assert!(jailed.len() <= 3, "{jailed:?}");
    for sbx in &created {
        assert_eq!(
            lab.exec(&id_of(sbx), Some(&token_of(sbx)), "echo ok").ok(),
            "ok\n"
        );
    }
    let c = capacity(&lab);
    assert!(c["used"].as_u64().unwrap() <= 3, "{c}");
    lab.finish();
}

/// Without a warm pool nothing else takes a place: eight concurrent creates against
/// `--max-sandboxes 3` give exactly three sandboxes and five 429s, and exactly three sandboxes
/// run.
#[test]
fn concurrent_creates_take_exactly_the_free_places() {
    let Some(mut lab) = Lab::new("concurrent_creates_take_exactly_the_free_places") else {
        return;
    };
    lab.options.args = vec![
        "--max-sandboxes".into(),
        "3".into(),
        "--warm-pool".into(),
        "0".into(),
    ];
    lab.start();
    let (created, refused) = tally(&burst(&lab, 8));
    assert_eq!((created.len(), refused), (3, 5));
    let ids: BTreeSet<String> = created.iter().map(id_of).collect();
    assert_eq!(
        lab.listed_ids().into_iter().collect::<BTreeSet<_>>(),
        ids,
        "listed"
    );
    assert_eq!(jailed_ids(&lab), ids, "sandboxes on the host");
    let m = scrape(&lab);
    assert_eq!(
        series(
            &m,
            "coppice_creates_refused_total{reason=\"max_sandboxes\"}"
        ),
        5.0
    );
    assert_eq!(series(&m, "coppice_sandboxes_used"), 3.0);
    lab.finish();
}

/// A memory floor above what the host has (`COPPICE_MIN_FREE_MEMORY`, 1 PiB): every create is
/// refused with a message naming the floor, the warm pool stays empty, and `/health` and
/// `/metrics` show the floor and the host's available memory.
#[test]
fn a_memory_floor_above_the_host_refuses_creates_and_empties_the_pool() {
    let Some(mut lab) =
        Lab::new("a_memory_floor_above_the_host_refuses_creates_and_empties_the_pool")
    else {
        return;
    };
    const FLOOR: u64 = 1 << 50;
    lab.options.args = vec!["--warm-pool".into(), "2".into()];
    lab.options.env = vec![("COPPICE_MIN_FREE_MEMORY".into(), "1024T".into())];
    lab.start();
    let r = lab.api("POST", "/v2/sandboxes", Some(json!({"templateID": "base"})));
    assert_refused(&r, "host memory below the floor");
    assert_refused(&r, "--min-free-memory is 1048576 GiB");
    let r = lab.api("POST", "/sandboxes", Some(json!({"templateID": "base"})));
    assert_refused(&r, "--min-free-memory");
    let c = capacity(&lab);
    assert_eq!(c["minFreeMemoryBytes"], json!(FLOOR));
    let available = c["memAvailableBytes"].as_u64().unwrap();
    assert!(available > 0 && available < FLOOR, "{c}");
    assert_eq!((&c["warm"], &c["used"]), (&json!(0), &json!(0)), "{c}");
    let m = scrape(&lab);
    assert_eq!(series(&m, "coppice_warm_sandboxes{template=\"base\"}"), 0.0);
    assert_eq!(
        series(&m, "coppice_creates_refused_total{reason=\"memory\"}"),
        2.0
    );
    assert_eq!(
        series(
            &m,
            "coppice_creates_refused_total{reason=\"max_sandboxes\"}"
        ),
        0.0
    );
    #[allow(clippy::cast_precision_loss, reason = "2^50 is exact in an f64")]
    let floor = FLOOR as f64;
    assert_eq!(series(&m, "coppice_host_memory_floor_bytes"), floor);
    assert!(series(&m, "coppice_host_memory_available_bytes") > 0.0);
    assert!(jailed_ids(&lab).is_empty(), "{:?}", jailed_ids(&lab));
    lab.finish();
}
