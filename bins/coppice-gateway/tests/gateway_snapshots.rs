//! Snapshots outlive the gateway: after a `kill -9` and a restart they are listed and
//! sandboxes are created from them with their files; a deleted snapshot's layer stays while a
//! sandbox stands on it and is collected once none does, and a fork's layer goes with its
//! last fork. Real binary, real sandboxes; see `support/mod.rs`. The SDK's view is
//! `tests/e2e/test_snapshots.py`.
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

use std::time::Duration;

use http::StatusCode;
use serde_json::json;
use support::{id_of, token_of, wait_for, Lab};

/// The layers snapshots (`s-`) and forks (`f-`) made that storage still has.
fn captured_layers(lab: &Lab, prefix: &str) -> Vec<String> {
    let dir = lab.state_dir.join("storage/layers");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

fn snapshot_ids(lab: &Lab) -> Vec<String> {
    let r = lab.api("GET", "/snapshots", None);
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let mut ids: Vec<String> = r
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["snapshotID"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

#[test]
fn snapshots_survive_a_crash_and_their_layers_go_when_unused() {
    let Some(mut lab) = Lab::new("snapshots_survive_a_crash_and_their_layers_go_when_unused")
    else {
        return;
    };
    lab.start();
    lab.wait_templates_imported();
    let src = lab.create(json!({"templateID": "base", "timeout": 300}));
    let (src_id, src_token) = (id_of(&src), token_of(&src));
    lab.exec(&src_id, Some(&src_token), "echo kept > /home/user/f")
        .ok();
    let named = lab.api(
        "POST",
        &format!("/sandboxes/{src_id}/snapshots"),
        Some(json!({"name": "keep"})),
    );
    assert_eq!(named.status, StatusCode::CREATED, "{}", named.text());
    assert_eq!(named.json()["snapshotID"], "local/keep:default");
    let unnamed = lab.api(
        "POST",
        &format!("/sandboxes/{src_id}/snapshots"),
        Some(json!({})),
    );
    assert_eq!(unnamed.status, StatusCode::CREATED, "{}", unnamed.text());
    let unnamed_id = unnamed.json()["snapshotID"].as_str().unwrap().to_owned();
    assert_eq!(captured_layers(&lab, "s-").len(), 2);

    lab.crash();
    lab.start();
    let mut want = vec!["local/keep:default".to_owned(), unnamed_id.clone()];
    want.sort();
    assert_eq!(snapshot_ids(&lab), want);
    let from = lab.create(json!({"templateID": "local/keep:default", "timeout": 300}));
    let (from_id, from_token) = (id_of(&from), token_of(&from));
    assert_eq!(
        lab.exec(&from_id, Some(&from_token), "cat /home/user/f")
            .ok(),
        "kept\n"
    );

    // The unnamed snapshot's layer has no user: it goes with the snapshot.
    let encoded = unnamed_id.replace(':', "%3A");
    let r = lab.api("DELETE", &format!("/templates/{encoded}"), None);
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    assert_eq!(captured_layers(&lab, "s-").len(), 1);
    let r = lab.api("DELETE", &format!("/templates/{encoded}"), None);
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text());
    // The named one's layer stays while a sandbox stands on it...
    let r = lab.api("DELETE", "/templates/local%2Fkeep%3Adefault", None);
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    assert_eq!(snapshot_ids(&lab), Vec::<String>::new());
    assert_eq!(captured_layers(&lab, "s-").len(), 1);
    assert_eq!(
        lab.exec(&from_id, Some(&from_token), "cat /home/user/f")
            .ok(),
        "kept\n"
    );

    // ...and so does a fork's, until its last fork is gone.
    let forks = lab.api(
        "POST",
        &format!("/sandboxes/{src_id}/fork"),
        Some(json!({"count": 2})),
    );
    assert_eq!(forks.status, StatusCode::CREATED, "{}", forks.text());
    let forks: Vec<String> = forks
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|f| id_of(&f["sandbox"]))
        .collect();
    assert_eq!(forks.len(), 2);
    assert_eq!(captured_layers(&lab, "f-").len(), 1);
    for id in forks.iter().chain([&from_id]) {
        let r = lab.api("DELETE", &format!("/sandboxes/{id}"), None);
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    }
    // Collected at the next start (and every minute while running).
    lab.stop();
    lab.start();
    wait_for(
        "the unused layers to be collected",
        Duration::from_secs(30),
        || {
            (captured_layers(&lab, "s-").is_empty() && captured_layers(&lab, "f-").is_empty())
                .then_some(())
        },
    );
    lab.finish();
}

#[test]
fn a_filesystem_only_pause_keeps_only_the_files_and_survives_a_crash() {
    let Some(mut lab) =
        Lab::new("a_filesystem_only_pause_keeps_only_the_files_and_survives_a_crash")
    else {
        return;
    };
    lab.start();
    lab.wait_templates_imported();
    let made = lab.create(json!({"templateID": "base", "timeout": 300}));
    let (id, token) = (id_of(&made), token_of(&made));
    lab.exec(
        &id,
        Some(&token),
        "echo kept > /home/user/f; (sleep 1000 &)",
    )
    .ok();
    let r = lab.api(
        "POST",
        &format!("/sandboxes/{id}/pause"),
        Some(json!({"memory": false})),
    );
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    let detail = lab.detail(&id);
    assert_eq!(detail["state"], "paused");
    assert_eq!(detail["pauseMode"], "filesystem");
    // Processes, cgroups and the run directory are gone; the writable root stays.
    assert_eq!(
        lab.leftovers_of(&id),
        vec![format!(
            "directory {}",
            lab.state_dir.join("storage/sandboxes").join(&id).display()
        )]
    );
    let r = lab.api(
        "POST",
        &format!("/sandboxes/{id}/pause"),
        Some(json!({"memory": false})),
    );
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text());

    lab.crash();
    lab.start();
    assert_eq!(lab.detail(&id)["pauseMode"], "filesystem");
    let r = lab.api(
        "POST",
        &format!("/v2/sandboxes/{id}/connect"),
        Some(json!({"timeout": 60})),
    );
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert!(lab.detail(&id).get("pauseMode").is_none());
    // Booted afresh on its files, with the same access token.
    assert_eq!(
        lab.exec(&id, Some(&token), "cat /home/user/f").ok(),
        "kept\n"
    );
    assert_eq!(
        lab.exec(&id, Some(&token), "pgrep -c sleep || true")
            .ok()
            .trim(),
        "0"
    );
    // A full pause after it is a full one again.
    let r = lab.api("POST", &format!("/sandboxes/{id}/pause"), Some(json!({})));
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    assert_eq!(lab.detail(&id)["pauseMode"], "full");
    lab.finish();
}
