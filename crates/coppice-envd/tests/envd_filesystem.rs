//! `filesystem.Filesystem` over the agent's socket, including watchers.

// Integration tests are a test crate of their own: no `mod tests` wrapper.
#![allow(missing_docs, clippy::unwrap_used, clippy::tests_outside_test_module)]

mod support;

use serde_json::{json, Value};
use support::{Agent, Item};

const FS: &str = "/filesystem.Filesystem";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stat_list_make_move_remove() {
    let agent = Agent::start().await;
    let home = agent.home();
    std::fs::write(home.join("hello.txt"), "hello from file\n").unwrap();
    std::fs::create_dir_all(home.join("d1/d2")).unwrap();
    std::fs::write(home.join("d1/d2/deep.txt"), "x").unwrap();
    std::os::unix::fs::symlink(home.join("d1"), home.join("ln")).unwrap();
    agent.give_to_user(&home);

    // Request #6 of the capture, with the home substituted.
    let (st, v) = agent
        .unary(
            &format!("{FS}/ListDir"),
            json!({"path": home, "depth": 1}),
            &[],
        )
        .await;
    assert_eq!(st, 200);
    let names: Vec<&str> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["d1", "hello.txt", "ln"]);
    let hello = &v["entries"][1];
    assert_eq!(hello["type"], "FILE_TYPE_FILE");
    assert_eq!(hello["size"], "16");
    assert_eq!(hello["mode"], 0o644);
    assert_eq!(hello["permissions"], "-rw-r--r--");
    assert_eq!(hello["path"], home.join("hello.txt").display().to_string());
    assert!(hello["modifiedTime"].as_str().unwrap().ends_with('Z'));
    let ln = &v["entries"][2];
    assert_eq!(
        (ln["type"].as_str(), ln["isSymlink"].as_bool()),
        (Some("FILE_TYPE_DIRECTORY"), Some(true))
    );
    assert_eq!(ln["symlinkTarget"], home.join("d1").display().to_string());

    // Depth 2 descends one more level, but not through the symlink; relative paths work.
    let (_, v) = agent
        .unary(
            &format!("{FS}/ListDir"),
            json!({"path": ".", "depth": 3}),
            &[],
        )
        .await;
    let paths: Vec<String> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap().to_owned())
        .collect();
    assert!(paths.contains(&home.join("d1/d2/deep.txt").display().to_string()));
    assert!(!paths
        .iter()
        .any(|p| p.starts_with(&home.join("ln/").display().to_string())));
    let (st, v) = agent
        .unary(&format!("{FS}/ListDir"), json!({"path": "hello.txt"}), &[])
        .await;
    assert_eq!(
        (st.as_u16(), v["code"].as_str()),
        (400, Some("invalid_argument"))
    );
    let (st, v) = agent
        .unary(&format!("{FS}/ListDir"), json!({"path": "missing"}), &[])
        .await;
    assert_eq!((st.as_u16(), v["code"].as_str()), (404, Some("not_found")));

    // Request #7 of the capture: Stat on a missing path.
    let (st, v) = agent
        .unary(
            &format!("{FS}/Stat"),
            json!({"path": "/nope/definitely"}),
            &[],
        )
        .await;
    assert_eq!((st.as_u16(), v["code"].as_str()), (404, Some("not_found")));
    let (st, v) = agent
        .unary(&format!("{FS}/Stat"), json!({"path": "~/hello.txt"}), &[])
        .await;
    assert_eq!(
        (st.as_u16(), v["entry"]["name"].as_str()),
        (200, Some("hello.txt"))
    );

    // MakeDir: parents, then already_exists, then a file in the way.
    let (st, v) = agent
        .unary(&format!("{FS}/MakeDir"), json!({"path": "new/a/b"}), &[])
        .await;
    assert_eq!(
        (st.as_u16(), v["entry"]["type"].as_str()),
        (200, Some("FILE_TYPE_DIRECTORY"))
    );
    assert_eq!(support::owner(&home.join("new/a")), agent.user_uid);
    let (st, v) = agent
        .unary(&format!("{FS}/MakeDir"), json!({"path": "new/a/b"}), &[])
        .await;
    assert_eq!(
        (st.as_u16(), v["code"].as_str()),
        (409, Some("already_exists"))
    );
    let (st, v) = agent
        .unary(&format!("{FS}/MakeDir"), json!({"path": "hello.txt"}), &[])
        .await;
    assert_eq!(
        (st.as_u16(), v["code"].as_str()),
        (400, Some("invalid_argument"))
    );
    let (st, v) = agent
        .unary(
            &format!("{FS}/MakeDir"),
            json!({"path": "hello.txt/sub"}),
            &[],
        )
        .await;
    assert_eq!(
        (st.as_u16(), v["code"].as_str()),
        (400, Some("invalid_argument"))
    );

    // Move into missing parents; a missing source is not_found.
    let (st, v) = agent
        .unary(
            &format!("{FS}/Move"),
            json!({"source": "hello.txt", "destination": "moved/h.txt"}),
            &[],
        )
        .await;
    assert_eq!(
        (st.as_u16(), v["entry"]["name"].as_str()),
        (200, Some("h.txt"))
    );
    assert!(home.join("moved/h.txt").is_file() && !home.join("hello.txt").exists());
    let (st, v) = agent
        .unary(
            &format!("{FS}/Move"),
            json!({"source": "gone", "destination": "x"}),
            &[],
        )
        .await;
    assert_eq!((st.as_u16(), v["code"].as_str()), (404, Some("not_found")));

    // Remove: a symlink goes alone, a directory goes recursively, a missing path is fine.
    let (st, _) = agent
        .unary(&format!("{FS}/Remove"), json!({"path": "ln"}), &[])
        .await;
    assert_eq!(st, 200);
    assert!(home.join("d1/d2/deep.txt").exists());
    let (st, _) = agent
        .unary(&format!("{FS}/Remove"), json!({"path": "d1"}), &[])
        .await;
    assert_eq!(st, 200);
    assert!(!home.join("d1").exists());
    let (st, _) = agent
        .unary(&format!("{FS}/Remove"), json!({"path": "d1"}), &[])
        .await;
    assert_eq!(st, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_dir_streams_start_then_events() {
    let agent = Agent::start().await;
    let home = agent.home();
    std::fs::create_dir(home.join("sub")).unwrap();
    // Request #15 of log B, with the home substituted and recursion on.
    let msg = json!({"path": home, "recursive": true, "includeEntry": true});
    let mut s = agent
        .stream(
            &format!("{FS}/WatchDir"),
            msg,
            &[("keepalive-ping-interval", "50")],
        )
        .await;
    assert_eq!(s.status, 200);
    assert_eq!(s.message().await, json!({"start": {}}));
    std::fs::write(home.join("x.txt"), "1").unwrap();
    std::fs::write(home.join("sub/y.txt"), "2").unwrap();
    std::fs::remove_file(home.join("x.txt")).unwrap();
    let mut seen: Vec<(String, String)> = Vec::new();
    while !seen
        .iter()
        .any(|(n, t)| n == "x.txt" && t == "EVENT_TYPE_REMOVE")
    {
        match s.next().await {
            Some(Item::Message(v)) => {
                let ev = &v["filesystem"];
                seen.push((
                    ev["name"].as_str().unwrap().to_owned(),
                    ev["type"].as_str().unwrap().to_owned(),
                ));
                // x.txt may be gone before its event is read; sub/y.txt stays.
                if ev["name"] == "sub/y.txt" && ev["type"] == "EVENT_TYPE_CREATE" {
                    assert_eq!(ev["entry"]["name"], "y.txt");
                }
            }
            other => panic!("watch ended early: {other:?}"),
        }
    }
    assert!(
        seen.contains(&("x.txt".into(), "EVENT_TYPE_CREATE".into())),
        "{seen:?}"
    );
    assert!(
        seen.contains(&("x.txt".into(), "EVENT_TYPE_WRITE".into())),
        "{seen:?}"
    );
    assert!(
        seen.contains(&("sub/y.txt".into(), "EVENT_TYPE_CREATE".into())),
        "{seen:?}"
    );

    let msg = json!({"path": home.join("x.txt")});
    let out = agent.stream(&format!("{FS}/WatchDir"), msg, &[]).await;
    let mut out = out;
    match out.next().await {
        Some(Item::End(v)) => assert_eq!(v["error"]["code"], "not_found"),
        other => panic!("expected an error end of stream, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_watchers_collect_and_drain_events() {
    let agent = Agent::start().await;
    let home = agent.home();
    // Request #5 of log B.
    let (st, v) = agent
        .unary(
            &format!("{FS}/CreateWatcher"),
            json!({"path": home, "recursive": true}),
            &[("keepalive-ping-interval", "50")],
        )
        .await;
    assert_eq!(st, 200);
    let id = v["watcherId"].as_str().unwrap().to_owned();
    std::fs::write(home.join("new.txt"), "n").unwrap();
    let mut events: Vec<Value> = Vec::new();
    for _ in 0..500 {
        let (st, v) = agent
            .unary(
                &format!("{FS}/GetWatcherEvents"),
                json!({"watcherId": id}),
                &[],
            )
            .await;
        assert_eq!(st, 200);
        events.extend(v["events"].as_array().cloned().unwrap_or_default());
        if events
            .iter()
            .any(|e| e["name"] == "new.txt" && e["type"] == "EVENT_TYPE_CREATE")
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        events
            .iter()
            .any(|e| e["name"] == "new.txt" && e["type"] == "EVENT_TYPE_CREATE"),
        "{events:?}"
    );
    // Drained: asking again without changes gives nothing new for that file's creation.
    let (_, v) = agent
        .unary(
            &format!("{FS}/GetWatcherEvents"),
            json!({"watcherId": id}),
            &[],
        )
        .await;
    assert!(!v["events"]
        .as_array()
        .map(|a| a.iter().any(|e| e["type"] == "EVENT_TYPE_CREATE"))
        .unwrap_or(false));
    let (st, _) = agent
        .unary(
            &format!("{FS}/RemoveWatcher"),
            json!({"watcherId": id}),
            &[],
        )
        .await;
    assert_eq!(st, 200);
    let (st, v) = agent
        .unary(
            &format!("{FS}/GetWatcherEvents"),
            json!({"watcherId": id}),
            &[],
        )
        .await;
    assert_eq!((st.as_u16(), v["code"].as_str()), (404, Some("not_found")));
    let (st, v) = agent
        .unary(
            &format!("{FS}/CreateWatcher"),
            json!({"path": "nowhere"}),
            &[],
        )
        .await;
    assert_eq!((st.as_u16(), v["code"].as_str()), (404, Some("not_found")));
}

/// A new file written through `/files` shows a watcher what E2B's envd shows (it writes as
/// root, then chowns to the user): create, write and an attribute change. E2B's SDK tests
/// count three events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_written_file_gives_create_write_and_chmod_as_e2b() {
    let agent = Agent::start().await;
    let home = agent.home();
    let (st, v) = agent
        .unary(
            &format!("{FS}/CreateWatcher"),
            json!({"path": home, "recursive": false}),
            &[],
        )
        .await;
    assert_eq!(st, 200);
    let id = v["watcherId"].as_str().unwrap().to_owned();
    let req = agent
        .request("POST", "/files?path=watched.txt")
        .header("content-type", "application/octet-stream")
        .body(support::full(&b"content"[..]))
        .unwrap();
    assert_eq!(agent.send(req).await.status(), 200);
    let mut types: Vec<String> = Vec::new();
    for _ in 0..100 {
        let (_, v) = agent
            .unary(
                &format!("{FS}/GetWatcherEvents"),
                json!({"watcherId": id}),
                &[],
            )
            .await;
        types.extend(
            v["events"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .filter(|e| e["name"] == "watched.txt")
                .filter_map(|e| e["type"].as_str().map(str::to_owned)),
        );
        if types.len() >= 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    types.sort();
    assert_eq!(
        types,
        ["EVENT_TYPE_CHMOD", "EVENT_TYPE_CREATE", "EVENT_TYPE_WRITE"],
        "{types:?}"
    );
}
