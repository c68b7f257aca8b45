//! File operations run with the requesting user's credentials: what `user` may not read,
//! write, list or remove is refused (403 on `/files`, `permission_denied` on
//! `filesystem.Filesystem`), including through `..` and symlinks, and root still may.

// Integration tests are a test crate of their own: no `mod tests` wrapper, and SKIP
// lines go to stdout as DEVELOPERS.md asks.
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::tests_outside_test_module,
    clippy::print_stdout
)]

mod support;

use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::PathBuf;

use http_body_util::BodyExt as _;
use serde_json::{json, Value};
use support::{basic, full, is_root, Agent, Item};

const FS: &str = "/filesystem.Filesystem";

/// A root-only corner of the scratch directory: `<tmp>/secret` (0700) holding `shadow`
/// (0600), and `<tmp>/etc` (0755, root's) where only root may create files.
fn root_only(agent: &Agent) -> (PathBuf, PathBuf) {
    let secret = agent.path("secret");
    std::fs::create_dir(&secret).unwrap();
    std::fs::write(secret.join("shadow"), "root:$6$hash\n").unwrap();
    std::fs::set_permissions(
        secret.join("shadow"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o700)).unwrap();
    let etc = agent.path("etc");
    std::fs::create_dir(&etc).unwrap();
    std::fs::set_permissions(&etc, std::fs::Permissions::from_mode(0o755)).unwrap();
    (secret, etc)
}

async fn get(agent: &Agent, path: &str, user: &str) -> (u16, Value, Vec<u8>) {
    let uri = format!("/files?path={}&username={user}", path.replace('/', "%2F"));
    let resp = agent
        .send(agent.request("GET", &uri).body(full("")).unwrap())
        .await;
    let st = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (st, v, bytes)
}

async fn put(agent: &Agent, path: &str, user: &str, data: &str) -> (u16, Value) {
    let uri = format!("/files?path={}&username={user}", path.replace('/', "%2F"));
    let req = agent
        .request("POST", &uri)
        .header("content-type", "application/octet-stream")
        .body(full(data.to_owned()))
        .unwrap();
    let resp = agent.send(req).await;
    let st = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (st, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_route_reads_and_writes_as_the_user() {
    if !is_root() {
        println!("SKIP files_route_reads_and_writes_as_the_user: needs root");
        return;
    }
    let agent = Agent::start().await;
    let (secret, etc) = root_only(&agent);
    let shadow = secret.join("shadow").display().to_string();

    // Reading root's file: refused for `user`, directly, through `..` and through a
    // symlink the user owns; allowed for root.
    let (st, v, _) = get(&agent, &shadow, "user").await;
    assert_eq!(st, 403, "{v}");
    assert_eq!(v["code"], 403);
    assert!(
        v["message"].as_str().unwrap().contains("permission denied"),
        "{v}"
    );
    let dotdot = "~/../../secret/shadow";
    assert_eq!(get(&agent, dotdot, "user").await.0, 403);
    std::os::unix::fs::symlink(secret.join("shadow"), agent.home().join("link")).unwrap();
    agent.give_to_user(&agent.home().join("link"));
    assert_eq!(get(&agent, "link", "user").await.0, 403);
    let (st, _, body) = get(&agent, &shadow, "root").await;
    assert_eq!((st, body.as_slice()), (200, b"root:$6$hash\n".as_slice()));

    // Writing into root's directory, or over root's file: refused, nothing written.
    let cron = etc.join("cron.d/x").display().to_string();
    let (st, v) = put(&agent, &cron, "user", "* * * * * root sh\n").await;
    assert_eq!(st, 403, "{v}");
    assert!(!etc.join("cron.d").exists());
    assert_eq!(put(&agent, &shadow, "user", "pwned").await.0, 403);
    assert_eq!(
        std::fs::read_to_string(secret.join("shadow")).unwrap(),
        "root:$6$hash\n"
    );
    // Writing through a symlink to root's file is the same refusal.
    assert_eq!(put(&agent, "link", "user", "pwned").await.0, 403);
    assert_eq!(
        std::fs::read_to_string(secret.join("shadow")).unwrap(),
        "root:$6$hash\n"
    );

    // The user's own writes work and are its own from the start; root's stay root's.
    let (st, _) = put(&agent, "mine/a.txt", "user", "A").await;
    assert_eq!(st, 200);
    assert_eq!(support::owner(&agent.home().join("mine")), agent.user_uid);
    assert_eq!(
        support::owner(&agent.home().join("mine/a.txt")),
        agent.user_uid
    );
    assert_eq!(put(&agent, &cron, "root", "ok").await.0, 200);
    assert_eq!(support::owner(&etc.join("cron.d/x")), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filesystem_service_acts_as_the_user() {
    if !is_root() {
        println!("SKIP filesystem_service_acts_as_the_user: needs root");
        return;
    }
    let agent = Agent::start().await;
    let (secret, etc) = root_only(&agent);
    let as_user = basic("user");
    let user = [("authorization", as_user.as_str())];
    let as_root = basic("root");
    let root = [("authorization", as_root.as_str())];
    let shadow = secret.join("shadow").display().to_string();
    let secret_s = secret.display().to_string();
    let etc_s = etc.display().to_string();

    let denied = |(st, v): (http::StatusCode, Value)| {
        assert_eq!(
            (st.as_u16(), v["code"].as_str()),
            (403, Some("permission_denied")),
            "{v}"
        );
    };
    denied(
        agent
            .unary(&format!("{FS}/Stat"), json!({"path": shadow}), &user)
            .await,
    );
    denied(
        agent
            .unary(&format!("{FS}/ListDir"), json!({"path": secret_s}), &user)
            .await,
    );
    denied(
        agent
            .unary(
                &format!("{FS}/MakeDir"),
                json!({"path": format!("{etc_s}/d")}),
                &user,
            )
            .await,
    );
    denied(
        agent
            .unary(&format!("{FS}/Remove"), json!({"path": shadow}), &user)
            .await,
    );
    denied(
        agent
            .unary(
                &format!("{FS}/Move"),
                json!({"source": shadow, "destination": "~/stolen"}),
                &user,
            )
            .await,
    );
    denied(
        agent
            .unary(
                &format!("{FS}/CreateWatcher"),
                json!({"path": secret_s}),
                &user,
            )
            .await,
    );
    assert!(secret.join("shadow").exists() && !etc.join("d").exists());
    assert!(!agent.home().join("stolen").exists());

    // A streaming watch of root's directory ends with the same refusal.
    let mut s = agent
        .stream(&format!("{FS}/WatchDir"), json!({"path": secret_s}), &user)
        .await;
    loop {
        match s.next().await {
            Some(Item::Message(_)) => {}
            Some(Item::End(v)) => {
                assert_eq!(v["error"]["code"], "permission_denied", "{v}");
                break;
            }
            None => panic!("stream ended without an end envelope"),
        }
    }

    // Root may do all of it; the user's own MakeDir makes a directory it owns.
    let (st, v) = agent
        .unary(&format!("{FS}/Stat"), json!({"path": shadow}), &root)
        .await;
    assert_eq!(
        (st.as_u16(), v["entry"]["owner"].as_str()),
        (200, Some("root"))
    );
    let (st, _) = agent
        .unary(
            &format!("{FS}/MakeDir"),
            json!({"path": format!("{etc_s}/d")}),
            &root,
        )
        .await;
    assert_eq!(st, 200);
    let (st, v) = agent
        .unary(&format!("{FS}/MakeDir"), json!({"path": "~/x/y"}), &user)
        .await;
    assert_eq!(
        (st.as_u16(), v["entry"]["owner"].as_str()),
        (200, Some("user"))
    );
    assert_eq!(support::owner(&agent.home().join("x")), agent.user_uid);
    let (st, _) = agent
        .unary(&format!("{FS}/Remove"), json!({"path": shadow}), &root)
        .await;
    assert_eq!(st, 200);
    assert!(!secret.join("shadow").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recursive_watch_sees_only_what_the_user_may() {
    if !is_root() {
        println!("SKIP a_recursive_watch_sees_only_what_the_user_may: needs root");
        return;
    }
    let agent = Agent::start().await;
    let as_user = basic("user");
    let user = [("authorization", as_user.as_str())];
    let home = agent.home();
    let mut s = agent
        .stream(
            &format!("{FS}/WatchDir"),
            json!({"path": home.display().to_string(), "recursive": true}),
            &user,
        )
        .await;
    assert!(s.message().await.get("start").is_some());
    // Root makes a private directory in the home, then a file inside it: the user sees
    // the directory appear but cannot watch inside it, so the file's creation is not
    // reported; a file in the home itself is.
    let private = home.join("private");
    // Made 0700 at once, so there is no moment the user could have added a watch.
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .unwrap();
    let first = s.message().await;
    assert_eq!(first["filesystem"]["name"], "private", "{first}");
    std::fs::write(private.join("hidden"), "x").unwrap();
    std::fs::write(home.join("visible"), "x").unwrap();
    let next = s.message().await;
    assert_eq!(next["filesystem"]["name"], "visible", "{next}");
}
