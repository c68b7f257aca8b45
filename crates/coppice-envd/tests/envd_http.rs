//! envd's plain HTTP endpoints over the agent's socket: `/health`, `/init`, `/envs`,
//! `/metrics`, `/files`, and access-token enforcement.

// Integration tests are a test crate of their own: no `mod tests` wrapper, and SKIP
// lines go to stdout as DEVELOPERS.md asks.
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::tests_outside_test_module,
    clippy::print_stdout
)]

mod support;

use std::io::{Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::BodyExt as _;
use serde_json::{json, Value};
use support::{channel_body, full, is_root, Agent};

async fn body_of(
    resp: http::Response<hyper::body::Incoming>,
) -> (http::StatusCode, http::HeaderMap, Bytes) {
    let status = resp.status();
    let headers = resp.headers().clone();
    (
        status,
        headers,
        resp.into_body().collect().await.unwrap().to_bytes(),
    )
}

/// Replays a captured multipart upload, with `/home/user` moved under the test's home.
fn captured_upload(agent: &Agent) -> (String, Vec<u8>) {
    let home = agent.home().display().to_string();
    let boundary = "204d9ba40c4ebedd3310356642cad0ee";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{home}/hello.txt\"\r\nContent-Type: text/plain\r\n\r\nhello from file\n\r\n--{boundary}--\r\n"
    );
    (
        format!("multipart/form-data; boundary={boundary}"),
        body.into_bytes(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_envs_metrics_and_surfaces() {
    let agent = Agent::start().await;
    let (st, _, body) = body_of(
        agent
            .send(agent.request("GET", "/health").body(full("")).unwrap())
            .await,
    )
    .await;
    assert_eq!((st.as_u16(), body.len()), (204, 0));

    let (st, _) = agent
        .unary(
            "/init",
            json!({"envVars": {"A": "1"}, "defaultUser": "user"}),
            &[],
        )
        .await;
    assert_eq!(st, 204);
    let (st, _, body) = body_of(
        agent
            .send(agent.request("GET", "/envs").body(full("")).unwrap())
            .await,
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap(),
        json!({"A": "1"})
    );

    let (st, _, body) = body_of(
        agent
            .send(agent.request("GET", "/metrics").body(full("")).unwrap())
            .await,
    )
    .await;
    assert_eq!(st, 200);
    let m: Value = serde_json::from_slice(&body).unwrap();
    for k in [
        "ts",
        "cpu_count",
        "cpu_used_pct",
        "mem_total",
        "mem_used",
        "mem_cache",
        "mem_total_mib",
        "mem_used_mib",
        "disk_used",
        "disk_total",
    ] {
        assert!(m.get(k).is_some(), "metrics has {k}");
    }
    assert!(m["mem_total"].as_u64().unwrap() > 0);
    assert!(m["disk_total"].as_u64().unwrap() > 0);

    // Another port is not served here; a non-numeric port is a bad request.
    let req = http::Request::get("/health")
        .header("e2b-sandbox-port", "3000")
        .body(full(""))
        .unwrap();
    let (st, _, body) = body_of(agent.send(req).await).await;
    assert_eq!(st, 502);
    assert!(String::from_utf8_lossy(&body).contains("port is not open"));
    let req = http::Request::get("/health")
        .header("e2b-sandbox-port", "nope")
        .body(full(""))
        .unwrap();
    assert_eq!(agent.send(req).await.status(), 400);
    // No routing header at all is envd (the gateway's own calls).
    let req = http::Request::get("/health")
        .header("host", "agent")
        .body(full(""))
        .unwrap();
    assert_eq!(agent.send(req).await.status(), 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_token_guards_everything_but_the_exempt_paths() {
    let agent = Agent::start().await;
    let (st, _) = agent
        .unary("/init", json!({"accessToken": "tok-1"}), &[])
        .await;
    assert_eq!(st, 204);
    // A second /init must present the token.
    let (st, body) = agent
        .unary("/init", json!({"accessToken": "stolen"}), &[])
        .await;
    assert_eq!((st.as_u16(), body["code"].as_u64()), (401, Some(401)));

    let (st, body) = agent.unary("/process.Process/List", json!({}), &[]).await;
    assert_eq!(
        (st.as_u16(), body["code"].as_str()),
        (401, Some("unauthenticated"))
    );
    let (st, _) = agent
        .unary(
            "/process.Process/List",
            json!({}),
            &[("x-access-token", "tok-1")],
        )
        .await;
    assert_eq!(st, 200);
    let out = agent.run("echo hi", &[]).await;
    assert_eq!(out.error_code().as_deref(), Some("unauthenticated"));
    let out = agent.run("echo hi", &[("x-access-token", "tok-1")]).await;
    assert_eq!(out.stdout, b"hi\n");
    let (st, _, body) = body_of(
        agent
            .send(agent.request("GET", "/envs").body(full("")).unwrap())
            .await,
    )
    .await;
    assert_eq!(st, 401);
    assert!(String::from_utf8_lossy(&body).contains("unauthorized access"));
    assert_eq!(
        agent
            .send(agent.request("GET", "/health").body(full("")).unwrap())
            .await
            .status(),
        204
    );

    // /files: a wrong header fails, a valid signature works without the header.
    std::fs::write(agent.home().join("s.txt"), "signed").unwrap();
    let path = agent.home().join("s.txt").display().to_string();
    let enc = path.replace('/', "%2F");
    let req = agent
        .request("GET", &format!("/files?path={enc}"))
        .header("x-access-token", "bad")
        .body(full(""))
        .unwrap();
    assert_eq!(agent.send(req).await.status(), 401);
    let req = agent
        .request("GET", &format!("/files?path={enc}"))
        .body(full(""))
        .unwrap();
    assert_eq!(agent.send(req).await.status(), 401);
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        format!("{path}:read::tok-1").as_bytes(),
    );
    let sig = format!(
        "v1_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest.as_ref())
    );
    let sig_q = sig.replace('+', "%2B").replace('/', "%2F");
    let req = agent
        .request("GET", &format!("/files?path={enc}&signature={sig_q}"))
        .body(full(""))
        .unwrap();
    let (st, _, body) = body_of(agent.send(req).await).await;
    assert_eq!((st.as_u16(), &body[..]), (200, &b"signed"[..]));
    // Expired signatures are refused.
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        format!("{path}:read::tok-1:1").as_bytes(),
    );
    let sig = format!(
        "v1_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest.as_ref())
    );
    let sig_q = sig.replace('+', "%2B").replace('/', "%2F");
    let req = agent
        .request(
            "GET",
            &format!("/files?path={enc}&signature={sig_q}&signature_expiration=1"),
        )
        .body(full(""))
        .unwrap();
    assert_eq!(agent.send(req).await.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_multipart_upload_then_read_plain_gzip_and_range() {
    let agent = Agent::start().await;
    let (ct, body) = captured_upload(&agent);
    let enc = agent
        .home()
        .join("hello.txt")
        .display()
        .to_string()
        .replace('/', "%2F");
    let req = agent
        .request("POST", &format!("/files?path={enc}"))
        .header("content-type", ct)
        .header("accept-encoding", "gzip, deflate")
        .body(full(body))
        .unwrap();
    let (st, _, resp) = body_of(agent.send(req).await).await;
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&resp));
    let written: Value = serde_json::from_slice(&resp).unwrap();
    let path = agent.home().join("hello.txt");
    assert_eq!(
        written,
        json!([{"path": path.display().to_string(), "name": "hello.txt", "type": "file"}])
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"hello from file\n");
    assert_eq!(support::owner(&path), agent.user_uid);

    // Plain read.
    let req = agent
        .request("GET", &format!("/files?path={enc}"))
        .body(full(""))
        .unwrap();
    let (st, h, data) = body_of(agent.send(req).await).await;
    assert_eq!((st.as_u16(), &data[..]), (200, &b"hello from file\n"[..]));
    assert_eq!(h["content-type"], "text/plain; charset=utf-8");
    assert_eq!(h["content-disposition"], "inline; filename=\"hello.txt\"");
    // gzip when asked, as httpx always asks.
    let req = agent
        .request("GET", &format!("/files?path={enc}"))
        .header("accept-encoding", "gzip, deflate")
        .body(full(""))
        .unwrap();
    let (st, h, data) = body_of(agent.send(req).await).await;
    assert_eq!(
        (st.as_u16(), h["content-encoding"].to_str().unwrap()),
        (200, "gzip")
    );
    let mut plain = String::new();
    flate2::read::GzDecoder::new(&data[..])
        .read_to_string(&mut plain)
        .unwrap();
    assert_eq!(plain, "hello from file\n");
    // Ranges.
    let req = agent
        .request("GET", &format!("/files?path={enc}"))
        .header("range", "bytes=6-9")
        .body(full(""))
        .unwrap();
    let (st, h, data) = body_of(agent.send(req).await).await;
    assert_eq!((st.as_u16(), &data[..]), (206, &b"from"[..]));
    assert_eq!(h["content-range"], "bytes 6-9/16");
    let req = agent
        .request("GET", &format!("/files?path={enc}"))
        .header("range", "bytes=99-")
        .body(full(""))
        .unwrap();
    let (st, h, _) = body_of(agent.send(req).await).await;
    assert_eq!(
        (st.as_u16(), h["content-range"].to_str().unwrap()),
        (416, "bytes */16")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn octet_stream_relative_path_as_root_and_gzip_upload() {
    let agent = Agent::start().await;
    // Request #23 of the capture: relative path, user root, raw bytes.
    let req = agent
        .request("POST", "/files?path=rel.bin&username=root")
        .header("content-type", "application/octet-stream")
        .body(full(&b"\x00\x01binary"[..]))
        .unwrap();
    let (st, _, body) = body_of(agent.send(req).await).await;
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
    let path = agent.root_home().join("rel.bin");
    assert_eq!(std::fs::read(&path).unwrap(), b"\x00\x01binary");
    let listed: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(listed[0]["path"], path.display().to_string());

    // gzip-encoded upload into missing parents, as the default user, streamed chunked.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(&big).unwrap();
    let gz = enc.finish().unwrap();
    let chunks: Vec<Bytes> = gz.chunks(7000).map(Bytes::copy_from_slice).collect();
    let req = agent
        .request("POST", "/files?path=deep/er/big.bin")
        .header("content-type", "application/octet-stream")
        .header("content-encoding", "gzip")
        .body(support::Chunked::new(chunks))
        .unwrap();
    let (st, _, body) = body_of(agent.send(req).await).await;
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
    let path = agent.home().join("deep/er/big.bin");
    assert!(std::fs::read(&path).unwrap() == big);
    assert_eq!(support::owner(&agent.home().join("deep")), agent.user_uid);
    assert_eq!(
        support::owner(&agent.home().join("deep/er")),
        agent.user_uid
    );
    assert_eq!(support::owner(&path), agent.user_uid);

    // Octet-stream without a path is a bad request; an unknown user is 401.
    let req = agent
        .request("POST", "/files")
        .header("content-type", "application/octet-stream")
        .body(full("x"))
        .unwrap();
    assert_eq!(agent.send(req).await.status(), 400);
    let req = agent
        .request("POST", "/files?path=x&username=mallory")
        .header("content-type", "application/octet-stream")
        .body(full("x"))
        .unwrap();
    assert_eq!(agent.send(req).await.status(), 401);
    let req = agent
        .request("POST", "/files?path=x")
        .header("content-type", "text/plain")
        .body(full("x"))
        .unwrap();
    assert_eq!(agent.send(req).await.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_with_several_files_and_dotdot_paths() {
    let agent = Agent::start().await;
    let a = agent.home().join("multi/a.txt").display().to_string();
    let b = "../user/x/../b.txt"; // relative, with `..`: lands in the home
    let boundary = "17693ab361cb2a689a46a16eacb815db";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{a}\"\r\nContent-Type: text/plain\r\n\r\nA\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{b}\"\r\nContent-Type: text/plain\r\n\r\nB\r\n--{boundary}--\r\n"
    );
    let req = agent
        .request("POST", "/files")
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(full(body))
        .unwrap();
    let (st, _, resp) = body_of(agent.send(req).await).await;
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&resp));
    let v: Value = serde_json::from_slice(&resp).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_eq!(std::fs::read(&a).unwrap(), b"A");
    assert_eq!(std::fs::read(agent.home().join("b.txt")).unwrap(), b"B");

    // A truncated multipart body is a 400, not a hang.
    let req = agent
        .request("POST", "/files")
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .body(full(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"t\"\r\n\r\nabc")))
        .unwrap();
    assert_eq!(agent.send(req).await.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multipart_upload_is_answered_only_after_its_whole_body() {
    // The JS SDK's closing boundary and its CRLF (and a chunked body's end) can arrive after
    // the part is complete; an answer sent before them made the connection close under the
    // writer, which the gateway turned into a 502 for an upload that had succeeded.
    let agent = Agent::start().await;
    let path = agent.home().join("late-epilogue.txt").display().to_string();
    let boundary = "b0undary";
    let (tx, body) = channel_body();
    let req = agent
        .request("POST", &format!("/files?path={}", path.replace('/', "%2F")))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body)
        .unwrap();
    let answer = {
        let agent = &agent;
        async move { agent.send(req).await }
    };
    tokio::pin!(answer);
    tx.send(Bytes::from(format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n\r\nhello\r\n--{boundary}--"
    )))
    .await
    .unwrap();
    // The part and the closing boundary are in; the agent waits for the rest of the body.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut answer)
            .await
            .is_err(),
        "answered before the body ended"
    );
    tx.send(Bytes::from_static(b"\r\n")).await.unwrap();
    drop(tx);
    let (st, _, resp) = body_of(answer.await).await;
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&resp));
    assert_eq!(std::fs::read(&path).unwrap(), b"hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_edge_cases_missing_directories_and_symlinks() {
    let agent = Agent::start().await;
    let get = |p: String| {
        agent
            .request("GET", &format!("/files?path={}", p.replace('/', "%2F")))
            .body(full(""))
            .unwrap()
    };
    let (st, _, body) = body_of(
        agent
            .send(get(agent.path("nope").display().to_string()))
            .await,
    )
    .await;
    assert_eq!(st, 404);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["code"], 404);
    assert!(v["message"].as_str().unwrap().contains("does not exist"));
    let (st, _, _) = body_of(agent.send(get(agent.home().display().to_string())).await).await;
    assert_eq!(st, 400);
    // A symlink is read through.
    std::fs::write(agent.home().join("target.txt"), "via link").unwrap();
    std::os::unix::fs::symlink(
        agent.home().join("target.txt"),
        agent.home().join("link.txt"),
    )
    .unwrap();
    let (st, _, body) = body_of(agent.send(get("link.txt".into())).await).await;
    assert_eq!((st.as_u16(), &body[..]), (200, &b"via link"[..]));
    // Uploading onto a directory, or below a file, fails cleanly.
    std::fs::create_dir(agent.home().join("adir")).unwrap();
    agent.give_to_user(&agent.home());
    let up = |p: &str| {
        agent
            .request("POST", &format!("/files?path={p}"))
            .header("content-type", "application/octet-stream")
            .body(full("x"))
            .unwrap()
    };
    assert_eq!(agent.send(up("adir")).await.status(), 400);
    assert_eq!(agent.send(up("target.txt/below")).await.status(), 400);
    // Overwrite replaces the content.
    assert_eq!(agent.send(up("target.txt")).await.status(), 200);
    assert_eq!(
        std::fs::read(agent.home().join("target.txt")).unwrap(),
        b"x"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_owned_by_the_named_user() {
    if !is_root() {
        println!("SKIP uploads_are_owned_by_the_named_user: needs root");
        return;
    }
    let agent = Agent::start().await;
    // Like /tmp: anyone may create files there.
    let shared = agent.path("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    for (user, uid) in [("root", 0), ("user", support::USER_UID)] {
        let p = shared
            .join(format!("{user}.txt"))
            .display()
            .to_string()
            .replace('/', "%2F");
        let req = agent
            .request("POST", &format!("/files?path={p}&username={user}"))
            .header("content-type", "application/octet-stream")
            .body(full("x"))
            .unwrap();
        assert_eq!(agent.send(req).await.status(), 200);
        assert_eq!(support::owner(&shared.join(format!("{user}.txt"))), uid);
    }
}
