//! File metadata: `X-Metadata-*` upload headers stored as `user.e2b.*` extended
//! attributes, echoed in the upload answer and read back through `EntryInfo`.

// Integration tests are a test crate of their own: no `mod tests` wrapper, and SKIP
// lines go to stdout as DEVELOPERS.md asks.
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::tests_outside_test_module,
    clippy::print_stdout
)]

mod support;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use http_body_util::BodyExt as _;
use serde_json::{json, Value};
use support::{full, is_root, Agent};

const FS: &str = "/filesystem.Filesystem";

/// Request headers as name and raw value bytes.
type Headers<'a> = Vec<(&'a str, &'a [u8])>;

fn cpath(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

/// Sets an attribute on disk directly, as a tool inside the sandbox would.
fn set_disk_xattr(path: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    let (p, n) = (cpath(path), CString::new(name).unwrap());
    // SAFETY: both strings are NUL-terminated and `value` is valid for its length.
    let rc = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Reads an attribute on disk directly; `None` if it is not there.
fn disk_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let (p, n) = (cpath(path), CString::new(name).unwrap());
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: both strings are NUL-terminated and `buf` is valid for writes of its length.
    let rc = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    let len = usize::try_from(rc).ok()?;
    buf.truncate(len);
    Some(buf)
}

/// Whether the agent's home can hold user attributes; prints SKIP otherwise.
fn xattrs_supported(agent: &Agent, test: &str) -> bool {
    let probe = agent.home().join(".xattr-probe");
    std::fs::write(&probe, "").unwrap();
    let res = set_disk_xattr(&probe, "user.coppice.probe", b"1");
    std::fs::remove_file(&probe).unwrap();
    match res {
        Ok(()) => true,
        Err(e) => {
            println!(
                "SKIP {test}: {} has no user xattrs ({e})",
                agent.home().display()
            );
            false
        }
    }
}

fn enc(path: &str) -> String {
    path.replace('%', "%25")
        .replace('/', "%2F")
        .replace(' ', "%20")
}

/// `POST /files` with a raw body; returns the status and the JSON answer.
async fn upload_raw(
    agent: &Agent,
    path: &str,
    body: &str,
    headers: &[(&str, &[u8])],
) -> (u16, Value) {
    let mut b = agent
        .request("POST", &format!("/files?path={}", enc(path)))
        .header("content-type", "application/octet-stream");
    for (k, v) in headers {
        b = b.header(*k, http::HeaderValue::from_bytes(v).unwrap());
    }
    answer(agent.send(b.body(full(body.to_owned())).unwrap()).await).await
}

/// `POST /files` multipart, one part per `(destination, content)`, without a `path` query.
async fn upload_multipart(
    agent: &Agent,
    files: &[(&str, &str)],
    headers: &[(&str, &[u8])],
) -> (u16, Value) {
    let boundary = "b0c2f1e9a7d34c5e8f6a1b2c3d4e5f60";
    let mut body = String::new();
    for (dest, content) in files {
        body.push_str(&format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{dest}\"\r\nContent-Type: application/octet-stream\r\n\r\n{content}\r\n"
        ));
    }
    body.push_str(&format!("--{boundary}--\r\n"));
    let mut b = agent.request("POST", "/files").header(
        "content-type",
        format!("multipart/form-data; boundary={boundary}"),
    );
    for (k, v) in headers {
        b = b.header(*k, http::HeaderValue::from_bytes(v).unwrap());
    }
    answer(agent.send(b.body(full(body)).unwrap()).await).await
}

async fn answer(resp: http::Response<hyper::body::Incoming>) -> (u16, Value) {
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, v)
}

async fn stat(agent: &Agent, path: &Path) -> Value {
    let (st, v) = agent
        .unary(&format!("{FS}/Stat"), json!({ "path": path }), &[])
        .await;
    assert_eq!(st, 200, "{v}");
    v["entry"].clone()
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn octet_stream_upload_stores_metadata_and_stat_reads_it() {
    let agent = Agent::start().await;
    if !xattrs_supported(
        &agent,
        "octet_stream_upload_stores_metadata_and_stat_reads_it",
    ) {
        return;
    }
    // The SDK's `files.write(..., metadata={"Author": "Mish", "purpose": "a b"})`.
    let (st, v) = upload_raw(
        &agent,
        "m.txt",
        "hello",
        &[
            ("X-Metadata-Author", b"Mish"),
            ("X-Metadata-purpose", b"a b"),
        ],
    )
    .await;
    let path = agent.home().join("m.txt");
    assert_eq!(st, 200, "{v}");
    let want = json!({"author": "Mish", "purpose": "a b"});
    assert_eq!(
        v,
        json!([{"path": p(&path), "name": "m.txt", "type": "file", "metadata": want}])
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"hello");
    assert_eq!(
        disk_xattr(&path, "user.e2b.author").as_deref(),
        Some(&b"Mish"[..])
    );
    assert_eq!(support::owner(&path), agent.user_uid);
    assert_eq!(stat(&agent, &path).await["metadata"], want);

    // What a tool inside the sandbox sets under `user.e2b.` shows too; other
    // `user.*` attributes do not.
    set_disk_xattr(&path, "user.e2b.extra", b"x").unwrap();
    set_disk_xattr(&path, "user.other", b"y").unwrap();
    assert_eq!(
        stat(&agent, &path).await["metadata"],
        json!({"author": "Mish", "purpose": "a b", "extra": "x"})
    );
    // No metadata at all: the key is left out, as ProtoJSON does for an empty map.
    std::fs::write(agent.home().join("bare.txt"), "").unwrap();
    let bare = stat(&agent, &agent.home().join("bare.txt")).await;
    assert_eq!(bare.get("metadata"), None, "{bare}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_upload_gives_every_file_the_metadata_and_list_dir_shows_it() {
    let agent = Agent::start().await;
    if !xattrs_supported(&agent, "multipart_upload_gives_every_file_the_metadata") {
        return;
    }
    let d = agent.home().join("d");
    let (st, v) = upload_multipart(
        &agent,
        &[(&p(&d.join("a.txt")), "A"), (&p(&d.join("b.txt")), "B")],
        &[("X-Metadata-Tag", b"both")],
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        v,
        json!([
            {"path": p(&d.join("a.txt")), "name": "a.txt", "type": "file", "metadata": {"tag": "both"}},
            {"path": p(&d.join("b.txt")), "name": "b.txt", "type": "file", "metadata": {"tag": "both"}},
        ])
    );
    let (st, v) = upload_multipart(&agent, &[(&p(&d.join("plain.txt")), "P")], &[]).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v[0].get("metadata"), None, "{v}");

    let (st, v) = agent
        .unary(
            &format!("{FS}/ListDir"),
            json!({"path": d, "depth": 1}),
            &[],
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let got: Vec<(String, Option<Value>)> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_owned(),
                e.get("metadata").cloned(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("a.txt".to_owned(), Some(json!({"tag": "both"}))),
            ("b.txt".to_owned(), Some(json!({"tag": "both"}))),
            ("plain.txt".to_owned(), None),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reupload_replaces_metadata_and_move_keeps_it() {
    let agent = Agent::start().await;
    if !xattrs_supported(&agent, "reupload_replaces_metadata_and_move_keeps_it") {
        return;
    }
    let path = agent.home().join("r.txt");
    let (st, v) = upload_raw(
        &agent,
        "r.txt",
        "one",
        &[("x-metadata-a", b"1"), ("x-metadata-b", b"2")],
    )
    .await;
    assert_eq!(st, 200, "{v}");
    set_disk_xattr(&path, "user.keep", b"not ours").unwrap();

    // A second upload (multipart this time) replaces the whole set.
    let (st, v) = upload_multipart(
        &agent,
        &[(&p(&path), "two")],
        &[("x-metadata-b", b"3"), ("x-metadata-c", b"4")],
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v[0]["metadata"], json!({"b": "3", "c": "4"}));
    assert_eq!(
        stat(&agent, &path).await["metadata"],
        json!({"b": "3", "c": "4"})
    );
    assert_eq!(disk_xattr(&path, "user.e2b.a"), None);
    assert_eq!(std::fs::read(&path).unwrap(), b"two");

    // An upload without metadata clears it; attributes outside `user.e2b.` stay.
    let (st, v) = upload_raw(&agent, "r.txt", "three", &[]).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v[0].get("metadata"), None, "{v}");
    assert_eq!(stat(&agent, &path).await.get("metadata"), None);
    assert_eq!(
        disk_xattr(&path, "user.keep").as_deref(),
        Some(&b"not ours"[..])
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"three");

    // Move answers with the moved file's entry, metadata included.
    let (st, _) = upload_raw(&agent, "r.txt", "four", &[("x-metadata-z", b"1")]).await;
    assert_eq!(st, 200);
    let dst = agent.home().join("moved/r2.txt");
    let (st, v) = agent
        .unary(
            &format!("{FS}/Move"),
            json!({"source": path, "destination": dst}),
            &[],
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["entry"]["metadata"], json!({"z": "1"}));
    // A new directory has none.
    let (st, v) = agent
        .unary(
            &format!("{FS}/MakeDir"),
            json!({"path": agent.home().join("fresh")}),
            &[],
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["entry"].get("metadata"), None, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_metadata_headers_are_refused_and_write_nothing() {
    let agent = Agent::start().await;
    if !xattrs_supported(&agent, "bad_metadata_headers_are_refused_and_write_nothing") {
        return;
    }
    let keep = agent.home().join("keep.txt");
    let (st, v) = upload_raw(&agent, "keep.txt", "old", &[("x-metadata-keep", b"yes")]).await;
    assert_eq!(st, 200, "{v}");

    let long_key = format!("x-metadata-{}", "k".repeat(247));
    let half = vec![b'v'; 2100];
    let cases: Vec<(&str, Headers<'_>)> = vec![
        ("empty key", vec![("x-metadata-", b"v")]),
        ("non-UTF-8 value", vec![("x-metadata-k", b"\xff\xfe")]),
        (
            "UTF-8 but not ASCII",
            vec![("x-metadata-k", "café".as_bytes())],
        ),
        ("control byte", vec![("x-metadata-k", b"a\tb")]),
        ("key over 246 bytes", vec![(&long_key, b"v")]),
        (
            "set over 4096 bytes",
            vec![("x-metadata-a", &half), ("x-metadata-b", &half)],
        ),
    ];
    for (what, headers) in &cases {
        let (st, v) = upload_raw(&agent, "keep.txt", "new", headers).await;
        assert_eq!((st, v["code"].as_u64()), (400, Some(400)), "{what}: {v}");
        assert!(
            v["message"].as_str().unwrap().contains("invalid metadata"),
            "{what}: {v}"
        );
        let (st, v) =
            upload_multipart(&agent, &[(&p(&agent.home().join("new.txt")), "N")], headers).await;
        assert_eq!(st, 400, "{what}: {v}");
    }
    // Nothing was touched: old content, old metadata, no new file.
    assert_eq!(std::fs::read(&keep).unwrap(), b"old");
    assert_eq!(
        stat(&agent, &keep).await["metadata"],
        json!({"keep": "yes"})
    );
    assert!(!agent.home().join("new.txt").exists());

    // The largest key is fine.
    let max_key = "k".repeat(246);
    let (st, v) = upload_raw(
        &agent,
        "keep.txt",
        "new",
        &[(&format!("x-metadata-{max_key}"), b"v")],
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v[0]["metadata"], json!({ max_key: "v" }));
}

/// A ramfs mounted for one test (ramfs has no extended attributes at all).
struct RamfsMount(PathBuf);

impl Drop for RamfsMount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filesystem_without_xattrs_takes_uploads_only_without_metadata() {
    const NAME: &str = "filesystem_without_xattrs_takes_uploads_only_without_metadata";
    if !is_root() {
        println!("SKIP {NAME}: needs root to mount a ramfs");
        return;
    }
    let agent = Agent::start().await;
    let mnt = agent.path("ramfs");
    std::fs::create_dir(&mnt).unwrap();
    if let Err(e) = nix::mount::mount(
        Some("ramfs"),
        &mnt,
        Some("ramfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    ) {
        println!("SKIP {NAME}: cannot mount a ramfs ({e})");
        return;
    }
    let _mount = RamfsMount(mnt.clone());
    // Uploads run as `user`, who must be able to write there.
    agent.give_to_user(&mnt);
    let file = mnt.join("f.txt");

    // No metadata asked: an ordinary upload.
    let (st, v) = upload_raw(&agent, &p(&file), "plain", &[]).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v[0].get("metadata"), None, "{v}");
    assert_eq!(stat(&agent, &file).await.get("metadata"), None);

    // Metadata asked: refused with a clear message, the existing file untouched...
    let (st, v) = upload_raw(&agent, &p(&file), "replaced", &[("x-metadata-k", b"v")]).await;
    assert_eq!((st, v["code"].as_u64()), (400, Some(400)), "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("does not support user extended attributes"),
        "{v}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"plain");
    // ...and a new file is not left behind, in either upload mode.
    let new = mnt.join("new.txt");
    let (st, v) = upload_raw(&agent, &p(&new), "x", &[("x-metadata-k", b"v")]).await;
    assert_eq!(st, 400, "{v}");
    let (st, v) = upload_multipart(&agent, &[(&p(&new), "x")], &[("x-metadata-k", b"v")]).await;
    assert_eq!(st, 400, "{v}");
    assert!(!new.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_entries_carry_metadata() {
    let agent = Agent::start().await;
    if !xattrs_supported(&agent, "watcher_entries_carry_metadata") {
        return;
    }
    let home = agent.home();
    let (st, v) = agent
        .unary(
            &format!("{FS}/CreateWatcher"),
            json!({"path": home, "includeEntry": true}),
            &[],
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let id = v["watcherId"].as_str().unwrap().to_owned();
    let (st, v) = upload_raw(&agent, "w.txt", "watched", &[("x-metadata-k", b"v")]).await;
    assert_eq!(st, 200, "{v}");
    // The body is written after the metadata, so the entry of the last write event has it.
    let has_it = |e: &Value| e["name"] == "w.txt" && e["entry"]["metadata"] == json!({"k": "v"});
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
        if events.iter().any(has_it) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(events.iter().any(has_it), "{events:?}");
}
