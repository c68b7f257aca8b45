//! Template builds through the real gateway, driven the way E2B's SDK drives them
//! (`POST /v3/templates`, the files link and its upload, the trigger, status polling), with
//! real build sandboxes: the protocol's shapes and statuses, `RUN`/`COPY`/`ENV`/`WORKDIR`/
//! `USER` as sandboxes of the template see them, sandboxes by name, `name:tag` and id, the
//! step cache, every bad input ending the build as `error` with its step, `DELETE` while
//! sandboxes use the template, and a restart in mid-build. See `support/mod.rs`.
#![cfg(target_os = "linux")]
// An integration test crate: no `mod tests` wrapper, helpers may unwrap, skip lines must reach
// the test output, and the harness polls on plain threads, where `std::thread::sleep` blocks
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

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use serde_json::{json, Value};
use support::{id_of, token_of, wait_for, Lab};

/// How long a small build may take on a busy 2-core CI machine.
const BUILD_TIMEOUT: Duration = Duration::from_secs(120);

/// A tar of regular files (name, mode, contents), as Python's `tarfile` writes one.
fn tar_of(files: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, mode, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_mode(*mode);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut enc, data).unwrap();
    enc.finish().unwrap()
}

/// The SDK's `calculate_files_hash` of regular files copied from `src` to `dest`.
fn sdk_hash(src: &str, dest: &str, files: &[(&str, u32, &[u8])]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(format!("COPY {src} {dest}").as_bytes());
    for (name, mode, data) in files {
        ctx.update(name.as_bytes());
        ctx.update((0o100_000 | mode).to_string().as_bytes());
        ctx.update(data.len().to_string().as_bytes());
        ctx.update(data);
    }
    ctx.finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `POST /v3/templates`; asserts 202 and returns the body.
fn request(lab: &Lab, name: &str, tags: &[&str]) -> Value {
    request_sized(lab, name, tags, 2, 1024)
}

/// `POST /v3/templates` for sandboxes of `cpus` and `memory_mb`.
fn request_sized(lab: &Lab, name: &str, tags: &[&str], cpus: u32, memory_mb: u32) -> Value {
    let mut body = json!({"name": name, "cpuCount": cpus, "memoryMB": memory_mb});
    if !tags.is_empty() {
        body["tags"] = json!(tags);
    }
    let r = lab.api("POST", "/v3/templates", Some(body));
    assert_eq!(
        r.status,
        StatusCode::ACCEPTED,
        "request {name}: {}",
        r.text()
    );
    r.json()
}

/// Asks for the files link of `hash` and uploads `archive` to it when absent (or `force`);
/// returns whether they were present.
fn upload(lab: &Lab, template: &str, hash: &str, archive: &[u8], force: bool) -> bool {
    let r = lab.api("GET", &format!("/templates/{template}/files/{hash}"), None);
    assert_eq!(r.status, StatusCode::CREATED, "files link: {}", r.text());
    let link = r.json();
    let present = link["present"].as_bool().unwrap();
    let url = link["url"].as_str().unwrap().to_owned();
    if present && !force {
        return true;
    }
    let path = url.split_once("://").unwrap().1;
    let path = &path[path.find('/').unwrap()..];
    // The link is its own credential: no API key.
    let put = |body: &[u8]| {
        lab.send(
            lab.request("PUT", path)
                .body(Full::new(Bytes::copy_from_slice(body)))
                .unwrap(),
        )
    };
    let first = put(archive);
    assert_eq!(first.status, StatusCode::OK, "upload: {}", first.text());
    // One use only.
    put(archive).assert_error(403, "a used upload link");
    present
}

fn trigger(lab: &Lab, template: &str, build: &str, body: Value) {
    let r = lab.api(
        "POST",
        &format!("/v2/templates/{template}/builds/{build}"),
        Some(body),
    );
    assert_eq!(r.status, StatusCode::ACCEPTED, "trigger: {}", r.text());
}

fn status(lab: &Lab, template: &str, build: &str, query: &str) -> Value {
    let r = lab.api(
        "GET",
        &format!("/templates/{template}/builds/{build}/status?{query}"),
        None,
    );
    assert_eq!(r.status, StatusCode::OK, "status: {}", r.text());
    r.json()
}

/// Polls the status as the SDK does, collecting log lines by offset, until the build ends;
/// returns the last status and every log line.
fn wait_build(lab: &Lab, template: &str, build: &str) -> (Value, Vec<Value>) {
    let mut lines: Vec<Value> = Vec::new();
    let last = wait_for("the build to end", BUILD_TIMEOUT, || {
        let s = status(lab, template, build, &format!("logsOffset={}", lines.len()));
        assert!(s["logs"].is_array() && s["logEntries"].is_array(), "{s}");
        lines.extend(s["logEntries"].as_array().unwrap().iter().cloned());
        matches!(s["status"].as_str(), Some("ready" | "error")).then_some(s)
    });
    // An ended build answers past its last line with an empty page, at its terminal status.
    let tail = status(lab, template, build, &format!("logsOffset={}", lines.len()));
    assert_eq!(tail["logEntries"], json!([]), "{tail}");
    assert_eq!(tail["logs"], json!([]), "{tail}");
    assert_eq!(tail["status"], last["status"]);
    (last, lines)
}

fn messages(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .map(|l| l["message"].as_str().unwrap().to_owned())
        .collect()
}

/// Builds `steps` on `base` as template `name`; returns (template id, build id, status,
/// log lines).
fn build(lab: &Lab, name: &str, base: Value, steps: Value) -> (String, String, Value, Vec<Value>) {
    let req = request(lab, name, &[]);
    let (tid, bid) = (
        req["templateID"].as_str().unwrap().to_owned(),
        req["buildID"].as_str().unwrap().to_owned(),
    );
    let mut body = base;
    body["steps"] = steps;
    trigger(lab, &tid, &bid, body);
    let (s, lines) = wait_build(lab, &tid, &bid);
    (tid, bid, s, lines)
}

#[test]
fn templates_build_run_their_steps_and_make_sandboxes() {
    let Some(mut lab) = Lab::new("templates_build_run_their_steps_and_make_sandboxes") else {
        return;
    };
    lab.start();

    // The request: 202 with E2B's shape; a UUID build id; `waiting` until triggered.
    let req = request(&lab, "app", &[]);
    let tid = req["templateID"].as_str().unwrap().to_owned();
    let bid = req["buildID"].as_str().unwrap().to_owned();
    assert_eq!(uuid::Uuid::parse_str(&bid).unwrap().get_version_num(), 4);
    assert_eq!(req["names"], json!(["app"]));
    assert_eq!(req["aliases"], json!(["app"]));
    assert_eq!(req["tags"], json!(["default"]));
    assert_eq!(req["public"], false);
    assert_eq!(status(&lab, &tid, &bid, "")["status"], "waiting");

    // The files: absent, uploaded (gzipped, as the SDK does by default), then present.
    let files: &[(&str, u32, &[u8])] = &[("app/main.py", 0o644, b"print('hi')\n")];
    let hash = sdk_hash("app/main.py", "/srv/", files);
    assert!(!upload(&lab, &tid, &hash, &gzip(&tar_of(files)), false));
    assert!(upload(&lab, &tid, &hash, &[], false));
    // A wildcard copies several files into a directory, as Docker does.
    let many: &[(&str, u32, &[u8])] = &[("app/x", 0o644, b"x"), ("app/y", 0o600, b"y")];
    let many_hash = sdk_hash("app/*", "/glob", many);
    assert!(!upload(&lab, &tid, &many_hash, &tar_of(many), false));

    let steps = json!([
        {"type": "RUN", "args": ["echo hi > /hello"], "force": false},
        {"type": "COPY", "args": ["app/main.py", "/srv/", "user", "0755"], "filesHash": hash,
         "force": false},
        {"type": "COPY", "args": ["app/*", "/glob"], "filesHash": many_hash},
        {"type": "ENV", "args": ["A", "1", "B", "two words"], "force": false},
        {"type": "WORKDIR", "args": ["/srv"], "force": false},
        {"type": "RUN", "args": ["pwd > /where; echo \"$A\" > /a; whoami > /who"], "force": false},
        {"type": "USER", "args": ["user"], "force": false},
    ]);
    trigger(
        &lab,
        &tid,
        &bid,
        json!({"fromTemplate": "base", "force": false, "steps": steps}),
    );
    // A build starts once.
    lab.api(
        "POST",
        &format!("/v2/templates/{tid}/builds/{bid}"),
        Some(json!({"fromTemplate": "base"})),
    )
    .assert_error(409, "a second trigger");
    let (s, lines) = wait_build(&lab, &tid, &bid);
    assert_eq!(s["status"], "ready", "{s} {lines:?}");
    let text = messages(&lines);
    assert!(text.iter().any(|m| m == "files hash checked"), "{text:?}");
    assert!(text.iter().any(|m| m == "RUN echo hi > /hello"), "{text:?}");
    assert_eq!(lines[0]["step"], "base");
    assert!(lines.iter().any(|l| l["step"] == "2"));
    // Level filters and the logs route.
    let warn = status(&lab, &tid, &bid, "level=error");
    assert_eq!(warn["logEntries"], json!([]));
    let logs = lab
        .api(
            "GET",
            &format!("/templates/{tid}/builds/{bid}/logs?limit=2"),
            None,
        )
        .json();
    assert_eq!(logs["logs"].as_array().unwrap().len(), 2);
    assert_eq!(logs["logs"][0], lines[0]);
    let back = lab
        .api(
            "GET",
            &format!("/templates/{tid}/builds/{bid}/logs?direction=backward&limit=1"),
            None,
        )
        .json();
    assert_eq!(back["logs"][0], *lines.last().unwrap());

    // The template in the catalogue, its alias and tags.
    let alias = lab.api("GET", "/templates/aliases/app", None);
    assert_eq!(alias.json(), json!({"templateID": tid, "public": false}));
    let listed = lab.api("GET", "/templates", None).json();
    let item = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["templateID"] == tid)
        .unwrap()
        .clone();
    assert_eq!(item["buildStatus"], "ready");
    assert_eq!(item["buildID"], bid);
    assert_eq!(item["names"], json!(["app"]));
    let detail = lab.api("GET", &format!("/templates/{tid}"), None).json();
    assert_eq!(detail["builds"][0]["buildID"], bid);
    assert_eq!(detail["builds"][0]["status"], "ready");
    let tags = lab
        .api("GET", &format!("/templates/{tid}/tags"), None)
        .json();
    assert_eq!(tags[0]["tag"], "default");
    assert_eq!(tags[0]["buildID"], bid);
    let r = lab.api(
        "POST",
        "/templates/tags",
        Some(json!({"target": "app:default", "tags": ["v1"]})),
    );
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(r.json(), json!({"tags": ["v1"], "buildID": bid}));

    // Sandboxes by name, name:tag and id see every step.
    let mut ids = Vec::new();
    for reference in ["app", "app:v1", tid.as_str()] {
        let created = lab.create(json!({"templateID": reference, "envVars": {"B": "mine"}}));
        assert_eq!(created["templateID"], tid);
        let id = id_of(&created);
        let out = lab.exec(
            &id,
            Some(&token_of(&created)),
            "cat /hello /where /a /who; echo \"$A|$B\"; pwd; whoami; stat -c '%U %a' /srv/main.py; \
             cat /glob/x; stat -c %a /glob/y",
        );
        assert_eq!(out.exit_code, Some(0), "{reference}: {out:?}");
        assert_eq!(
            out.stdout, "hi\n/srv\n1\nroot\n1|mine\n/srv\nuser\nuser 755\nx600\n",
            "{reference}"
        );
        ids.push(id);
    }
    // A template used by sandboxes is not deleted; tags can go.
    lab.api("DELETE", &format!("/templates/{tid}"), None)
        .assert_error(409, "delete while used");
    let r = lab.api(
        "DELETE",
        "/templates/tags",
        Some(json!({"name": "app", "tags": ["v1"]})),
    );
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    lab.api(
        "POST",
        "/v2/sandboxes",
        Some(json!({"templateID": "app:v1"})),
    )
    .assert_error(404, "a removed tag");

    // An unchanged rebuild is all cache hits and starts no sandbox; `force` rebuilds.
    let again = request(&lab, "app", &[]);
    assert_eq!(again["templateID"], tid);
    let bid2 = again["buildID"].as_str().unwrap().to_owned();
    trigger(
        &lab,
        &tid,
        &bid2,
        json!({"fromTemplate": "base", "steps": steps}),
    );
    let (s2, lines2) = wait_build(&lab, &tid, &bid2);
    assert_eq!(s2["status"], "ready");
    let text2 = messages(&lines2);
    assert_eq!(
        text2.iter().filter(|m| *m == "CACHED").count(),
        5,
        "{text2:?}"
    );
    assert!(
        !text2.iter().any(|m| m.contains("build sandbox")),
        "{text2:?}"
    );
    let bid3 = request(&lab, "app", &[])["buildID"]
        .as_str()
        .unwrap()
        .to_owned();
    trigger(
        &lab,
        &tid,
        &bid3,
        json!({"fromTemplate": "base", "steps": steps, "force": true}),
    );
    let (s3, lines3) = wait_build(&lab, &tid, &bid3);
    assert_eq!(s3["status"], "ready");
    assert!(!messages(&lines3).iter().any(|m| m == "CACHED"));

    for id in &ids {
        let r = lab.api("DELETE", &format!("/sandboxes/{id}"), None);
        assert_eq!(r.status, StatusCode::NO_CONTENT);
    }
    let r = lab.api("DELETE", &format!("/templates/{tid}"), None);
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    lab.api("GET", "/templates/aliases/app", None)
        .assert_error(404, "a deleted template's alias");
    lab.api("DELETE", &format!("/templates/{tid}"), None)
        .assert_error(404, "a deleted template");
    lab.finish();
}

#[test]
fn bad_builds_end_as_errors_naming_their_step() {
    let Some(mut lab) = Lab::new("bad_builds_end_as_errors_naming_their_step") else {
        return;
    };
    lab.start();

    // Malformed requests are 400s with E2B's error body.
    lab.api("POST", "/v3/templates", Some(json!({"name": "Bad Name"})))
        .assert_error(400, "a bad name");
    for size in [
        json!({"cpuCount": 0}),
        json!({"memoryMB": 64}),
        json!({"cpuCount": "2"}),
    ] {
        let mut body = size.clone();
        body["name"] = json!("x");
        lab.api("POST", "/v3/templates", Some(body))
            .assert_error(400, &format!("size {size}"));
    }
    lab.api(
        "POST",
        "/v3/templates",
        Some(json!({"name": "x", "bogus": 1})),
    )
    .assert_error(400, "an unknown field");
    let req = request(&lab, "bad", &[]);
    let tid = req["templateID"].as_str().unwrap().to_owned();
    lab.api("GET", &format!("/templates/{tid}/files/nothex"), None)
        .assert_error(400, "a bad hash");
    lab.api("GET", "/templates/nope/files/abc", None)
        .assert_error(404, "an unknown template");
    lab.send(
        lab.request("PUT", "/builds/uploads/not-a-token")
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap(),
    )
    .assert_error(403, "an unknown upload token");
    let bid = req["buildID"].as_str().unwrap().to_owned();
    lab.api(
        "POST",
        &format!("/v2/templates/{tid}/builds/{bid}"),
        Some(
            json!({"fromImage": "x:1", "fromImageRegistry": {"type": "gcp",
            "serviceAccountJson": "{}"}}),
        ),
    )
    .assert_error(400, "fromImageRegistry of type gcp");
    lab.api(
        "POST",
        &format!("/v2/templates/{tid}/builds/{bid}"),
        Some(json!({"fromImage": "x:1", "fromImageRegistry": {"type": "registry"}})),
    )
    .assert_error(400, "fromImageRegistry without a password");
    lab.api(
        "POST",
        &format!("/v2/templates/{tid}/builds/00000000-0000-4000-8000-000000000000"),
        Some(json!({"fromTemplate": "base"})),
    )
    .assert_error(404, "an unknown build");
    lab.api(
        "GET",
        &format!("/templates/{tid}/builds/{bid}/status?limit=101"),
        None,
    )
    .assert_error(400, "a limit past 100");

    let files: &[(&str, u32, &[u8])] = &[("f.txt", 0o644, b"data")];
    let good = sdk_hash("f.txt", "/f", files);
    // A hash the archive does not match, and an archive that is not a tar.
    let wrong = sdk_hash("f.txt", "/f", &[("f.txt", 0o644, b"other")]);
    let corrupt = sdk_hash("g.txt", "/g", files);
    let cases: Vec<(Value, Value, &str, &str)> = vec![
        (
            json!({"fromTemplate": "base"}),
            json!([{"type": "RUN", "args": ["echo out; exit 3"]}]),
            "1",
            "exit code 3",
        ),
        (
            json!({"fromTemplate": "base"}),
            json!([{"type": "ENV", "args": ["A", "1"]}, {"type": "FROB", "args": []}]),
            "2",
            "unknown step type",
        ),
        (
            json!({"fromImage": "bad//image"}),
            json!([]),
            "base",
            "not an image reference",
        ),
        (
            json!({"fromTemplate": "base", "startCmd": "true", "readyCmd": "true"}),
            json!([{"type": "USER", "args": ["nobody123"]}]),
            "finalize",
            "invalid username",
        ),
        (
            json!({"fromTemplate": "no-such-template"}),
            json!([]),
            "base",
            "not found",
        ),
        (
            json!({"fromTemplate": "base"}),
            json!([{"type": "COPY", "args": ["f.txt", "/f"], "filesHash": wrong}]),
            "1",
            "do not match their hash",
        ),
        (
            json!({"fromTemplate": "base"}),
            json!([{"type": "COPY", "args": ["g.txt", "/g"], "filesHash": corrupt}]),
            "1",
            "not a readable tar",
        ),
        (
            json!({"fromTemplate": "base"}),
            json!([{"type": "COPY", "args": ["f.txt", "/f"], "filesHash": good.replace('a', "b")}]),
            "1",
            "never uploaded",
        ),
    ];
    // The mismatching archive is stored under the hash the client claimed; the corrupt one
    // is not a tar at all.
    upload(&lab, &tid, &wrong, &tar_of(files), false);
    upload(&lab, &tid, &corrupt, b"certainly not a tar archive", false);
    for (i, (base, steps, step, message)) in cases.into_iter().enumerate() {
        let (_, _, s, lines) = build(&lab, &format!("bad{i}"), base, steps);
        assert_eq!(s["status"], "error", "case {i}: {s}");
        assert_eq!(s["reason"]["step"], step, "case {i}: {s}");
        let why = s["reason"]["message"].as_str().unwrap();
        assert!(why.contains(message), "case {i}: {why}");
        assert!(
            lines.iter().any(|l| l["level"] == "error"),
            "case {i}: {lines:?}"
        );
    }
    // A failed check forgets the files, so the SDK uploads them again next time.
    let link = lab
        .api("GET", &format!("/templates/{tid}/files/{wrong}"), None)
        .json();
    assert_eq!(link["present"], false);
    // No build left a sandbox behind.
    assert_eq!(lab.listed_ids(), Vec::<String>::new());
    lab.finish();
}

#[test]
fn a_restart_ends_a_running_build_and_keeps_built_templates() {
    let Some(mut lab) = Lab::new("a_restart_ends_a_running_build_and_keeps_built_templates") else {
        return;
    };
    lab.start();
    // A template of its own size: its sandboxes get it, and report it.
    let req = request_sized(&lab, "kept", &[], 1, 512);
    let tid = req["templateID"].as_str().unwrap().to_owned();
    let bid = req["buildID"].as_str().unwrap().to_owned();
    trigger(
        &lab,
        &tid,
        &bid,
        json!({"fromTemplate": "base", "steps": [
            {"type": "RUN", "args": ["echo kept > /kept"]}, {"type": "ENV", "args": ["K", "v"]}],
            "startCmd": "echo \"$K $(whoami)\" > /tmp/started; exec sleep 100000",
            "readyCmd": "test -s /tmp/started"}),
    );
    let (s, _) = wait_build(&lab, &tid, &bid);
    assert_eq!(s["status"], "ready");
    let created = lab.create(json!({"templateID": "kept"}));
    let id = id_of(&created);
    let detail = lab.detail(&id);
    assert_eq!(detail["cpuCount"], 1, "{detail}");
    assert_eq!(detail["memoryMB"], 512, "{detail}");
    let listed = lab.api("GET", &format!("/templates/{tid}"), None).json();
    assert_eq!(listed["cpuCount"], 1);
    assert_eq!(listed["memoryMB"], 512);

    // A build under way when the gateway stops (SIGTERM) or dies (SIGKILL) ends as `error`,
    // and its build sandbox goes (`finish` finds nothing left).
    for (how, says) in [("stop", "stopped"), ("crash", "restarted")] {
        let req = request(&lab, &format!("slow-{how}"), &[]);
        let (stid, sbid) = (
            req["templateID"].as_str().unwrap().to_owned(),
            req["buildID"].as_str().unwrap().to_owned(),
        );
        trigger(
            &lab,
            &stid,
            &sbid,
            json!({"fromTemplate": "base", "steps": [
                {"type": "RUN", "args": ["echo started; sleep 600"]}]}),
        );
        wait_for("the slow step to start", BUILD_TIMEOUT, || {
            let s = status(&lab, &stid, &sbid, "");
            s["logEntries"]
                .as_array()
                .unwrap()
                .iter()
                .any(|l| l["message"] == "started")
                .then_some(())
        });
        if how == "stop" {
            lab.stop();
        } else {
            lab.wait_templates_imported();
            lab.crash();
        }
        lab.start();
        let s = status(&lab, &stid, &sbid, "");
        assert_eq!(s["status"], "error", "{how}: {s}");
        assert!(
            s["reason"]["message"].as_str().unwrap().contains(says),
            "{how}: {s}"
        );
    }
    // The sandbox of the built template was re-adopted with its template's files and env;
    // a new one is created from the template after the restart.
    let out = lab.exec(&id, Some(&token_of(&created)), "cat /kept; echo $K");
    assert_eq!(out.stdout, "kept\nv\n", "{out:?}");
    // The start command ran before the create answered, and still runs.
    let out = lab.exec(
        &id,
        Some(&token_of(&created)),
        "cat /tmp/started; grep -qx sleep /proc/[0-9]*/comm && echo running",
    );
    assert_eq!(out.stdout, "v user\nrunning\n", "{out:?}");
    let again = lab.create(json!({"templateID": tid}));
    let out = lab.exec(&id_of(&again), Some(&token_of(&again)), "cat /kept");
    assert_eq!(out.stdout, "kept\n");
    lab.finish();
}

/// `fromImage` against real registries (Debian's `docker-registry` in a namespace of the
/// test's own on 198.51.100.120/30) holding an image the test builds: layers with whiteouts
/// applied, the image's `Env` taken, steps run on it, the pull cached by digest, a Docker
/// Hub name through `--registry-mirror`, credentials through `fromImageRegistry`, and each
/// bad input (unknown image, bad credentials, unreachable registry, `aws`) ending as a
/// clear error that never shows the password.
#[test]
fn images_from_registries_are_build_bases() {
    use support::registry;
    let name = "images_from_registries_are_build_bases";
    if let Some(reason) = registry::tools_missing() {
        println!("SKIP {name}: {reason}");
        return;
    }
    let Some(mut lab) = Lab::new(name) else {
        return;
    };
    // After the lab's lock, as networked labs take them.
    let _slots = support::net::hold_slots();
    let reg = registry::Registry::start(&lab.state_dir);
    let layout = registry::make_image(
        &lab.state_dir,
        std::path::Path::new(env!("CARGO_BIN_EXE_coppice-gateway")),
    );
    registry::push(&layout, &format!("{}/test/img:1", registry::OPEN), None);
    registry::push(
        &layout,
        &format!("{}/private/img:1", registry::AUTH),
        Some((registry::USER, registry::PASSWORD)),
    );
    lab.options.args = vec![
        "--registry-mirror".into(),
        format!("http://{}", registry::OPEN),
        "--insecure-registry".into(),
        registry::OPEN.into(),
        "--insecure-registry".into(),
        registry::AUTH.into(),
    ];
    lab.start();

    let steps = json!([
        {"type": "RUN", "args": ["echo built > /built.txt; whoami > /who.txt"]},
        {"type": "WORKDIR", "args": ["/srv/app"]},
    ]);
    let image = format!("{}/test/img:1", registry::OPEN);
    let (tid, _, s, lines) = build(
        &lab,
        "from-image",
        json!({"fromImage": image}),
        steps.clone(),
    );
    assert_eq!(s["status"], "ready", "{s} {lines:?}");
    let text = messages(&lines);
    assert!(
        text.iter().any(|m| m.starts_with("pulling image sha256:")),
        "{text:?}"
    );
    assert!(
        text.iter().any(|m| m.starts_with("applying layer 2/2")),
        "{text:?}"
    );
    let created = lab.create(json!({"templateID": "from-image"}));
    assert_eq!(created["templateID"], tid);
    let out = lab.exec(
        &id_of(&created),
        Some(&token_of(&created)),
        "cat /hello.txt /built.txt /who.txt; ls /opt; test -e /etc/gone.txt || echo gone; \
         echo \"$IMG_VAR\"; pwd; whoami",
    );
    assert_eq!(out.exit_code, Some(0), "{out:?}");
    assert_eq!(
        out.stdout,
        "hello from the image\nbuilt\nroot\nnew.txt\ngone\nfrom the image\n/srv/app\nuser\n"
    );

    // The same image again is the cached layer; a Docker Hub name goes through the mirror.
    let (_, _, s, lines) = build(
        &lab,
        "from-image",
        json!({"fromImage": image}),
        steps.clone(),
    );
    assert_eq!(s["status"], "ready", "{s} {lines:?}");
    let text = messages(&lines);
    assert!(
        text.iter().any(|m| m.starts_with("CACHED image sha256:")),
        "{text:?}"
    );
    assert!(
        !text.iter().any(|m| m.starts_with("pulling image")),
        "{text:?}"
    );
    let (_, _, s, lines) = build(
        &lab,
        "via-mirror",
        json!({"fromImage": "test/img:1"}),
        json!([]),
    );
    assert_eq!(s["status"], "ready", "{s} {lines:?}");
    let text = messages(&lines);
    assert!(
        text.iter()
            .any(|m| m == &format!("resolving {}/test/img:1", registry::OPEN)),
        "{text:?}"
    );

    // Credentials: right ones pull, wrong ones end as a clear error; never shown.
    let private = format!("{}/private/img:1", registry::AUTH);
    let creds = |password: &str| {
        json!({"fromImage": private, "fromImageRegistry":
            {"type": "registry", "username": registry::USER, "password": password}})
    };
    let (_, _, s, lines) = build(&lab, "private", creds(registry::PASSWORD), json!([]));
    assert_eq!(s["status"], "ready", "{s} {lines:?}");
    let wrong = "wrong-Pa55word";
    let (_, _, s, lines) = build(&lab, "private-bad", creds(wrong), json!([]));
    assert_eq!(s["status"], "error", "{s}");
    assert_eq!(s["reason"]["step"], "base", "{s}");
    let reason = s["reason"]["message"].as_str().unwrap();
    assert!(
        reason.contains("access to") && reason.contains("denied"),
        "{reason}"
    );
    let (_, _, s, _) = build(
        &lab,
        "private-none",
        json!({"fromImage": private}),
        json!([]),
    );
    assert_eq!(s["status"], "error", "{s}");
    assert!(
        s["reason"]["message"].as_str().unwrap().contains("denied"),
        "{s}"
    );
    let everything = format!("{s} {lines:?} {}", lab.log());
    for secret in [registry::PASSWORD, wrong] {
        assert!(!everything.contains(secret), "a password leaked");
    }

    // An unknown image or tag, an unreachable registry.
    for (image, want) in [
        (format!("{}/test/nope:1", registry::OPEN), "not found"),
        (format!("{}/test/img:2", registry::OPEN), "not found"),
        (format!("{}:5009/test/img:1", registry::ADDR), "unreachable"),
        (format!("{}:5009/test/img:1", registry::HOST), "unreachable"),
    ] {
        let (_, _, s, _) = build(&lab, "bad-image", json!({"fromImage": image}), json!([]));
        assert_eq!(s["status"], "error", "{image}: {s}");
        assert_eq!(s["reason"]["step"], "base", "{s}");
        let m = s["reason"]["message"].as_str().unwrap();
        assert!(
            m.starts_with("fromImage: ") && m.contains(want),
            "{image}: {m}"
        );
    }
    // aws and gcp are refused by name at the trigger.
    let req = request(&lab, "aws", &[]);
    let r = lab.api(
        "POST",
        &format!(
            "/v2/templates/{}/builds/{}",
            req["templateID"].as_str().unwrap(),
            req["buildID"].as_str().unwrap()
        ),
        Some(json!({"fromImage": "x.test/a", "fromImageRegistry":
            {"type": "aws", "awsAccessKeyId": "a", "awsSecretAccessKey": "b", "awsRegion": "r"}})),
    );
    r.assert_error(400, "an aws registry");
    assert!(
        r.text().contains("aws") && r.text().contains("not supported"),
        "{}",
        r.text()
    );
    lab.finish();
    drop(reg);
}

/// The SSE events of a finished stream: (event, id, data) per event.
fn sse(text: &str) -> Vec<(String, Option<String>, Value)> {
    text.split("\n\n")
        .filter(|block| !block.trim().is_empty() && !block.starts_with(':'))
        .map(|block| {
            let (mut event, mut id, mut data) = (String::new(), None, String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    event = v.to_owned();
                } else if let Some(v) = line.strip_prefix("id: ") {
                    id = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data.push_str(v);
                }
            }
            (event, id, serde_json::from_str(&data).unwrap())
        })
        .collect()
}

/// Seed 002's jobs: `POST /templates/build` from a template and steps, the job's logs, and
/// its events as Server-Sent Events (a `log` per line, then `end`), resumed with
/// `Last-Event-ID`; a failing job's `end` carries its reason; bad requests are 400s.
#[test]
fn build_jobs_stream_their_logs_as_server_sent_events() {
    let Some(mut lab) = Lab::new("build_jobs_stream_their_logs_as_server_sent_events") else {
        return;
    };
    lab.start();
    let r = lab.api(
        "POST",
        "/templates/build",
        Some(json!({"name": "job-app", "fromTemplate": "base", "steps": [
            {"type": "RUN", "args": ["echo one; echo two > /two"]},
            {"type": "ENV", "args": ["J", "yes"]},
        ]})),
    );
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    let job = r.json();
    let id = job["jobID"].as_str().unwrap().to_owned();
    assert_eq!(job["name"], "job-app");
    assert_eq!(job["events"], format!("/templates/builds/{id}/events"));

    // The stream ends by itself once the job has ended.
    let events = lab.send(
        lab.api_request("GET", &format!("/templates/builds/{id}/events"))
            .body(support::empty())
            .unwrap(),
    );
    assert_eq!(events.status, StatusCode::OK);
    assert_eq!(events.headers["content-type"], "text/event-stream");
    let all = sse(&events.text());
    let (last, lines) = all.split_last().unwrap();
    assert_eq!(last.0, "end", "{all:?}");
    assert_eq!(last.2["status"], "ready", "{all:?}");
    assert!(lines.iter().all(|(e, _, _)| e == "log"));
    let messages: Vec<&str> = lines
        .iter()
        .map(|(_, _, d)| d["message"].as_str().unwrap())
        .collect();
    assert!(messages.contains(&"one"), "{messages:?}");
    assert!(messages.contains(&"ENV J=yes"), "{messages:?}");
    for (i, (_, n, _)) in lines.iter().enumerate() {
        assert_eq!(n.as_deref(), Some(i.to_string().as_str()));
    }
    // The logs route has the same lines; Last-Event-ID resumes after one.
    let logs = lab.api("GET", &format!("/templates/builds/{id}/logs"), None);
    assert_eq!(logs.status, StatusCode::OK, "{}", logs.text());
    let logs = logs.json();
    assert_eq!(logs["status"], "ready");
    assert_eq!(logs["logs"].as_array().unwrap().len(), lines.len());
    let resumed = lab.send(
        lab.api_request("GET", &format!("/templates/builds/{id}/events"))
            .header("last-event-id", "1")
            .body(support::empty())
            .unwrap(),
    );
    let rest = sse(&resumed.text());
    assert_eq!(rest.len(), lines.len() - 2 + 1, "{rest:?}");
    assert_eq!(rest[0].1.as_deref(), Some("2"));
    let created = lab.create(json!({"templateID": "job-app"}));
    let out = lab.exec(
        &id_of(&created),
        Some(&token_of(&created)),
        "cat /two; echo $J",
    );
    assert_eq!(out.stdout, "two\nyes\n", "{out:?}");

    // Layers go once nothing uses them: not while a child template stands on them.
    let layers = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(lab.state_dir.join("storage/layers"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("b-"))
            .collect();
        v.sort();
        v
    };
    let r = lab.api(
        "POST",
        "/templates/build",
        Some(json!({"name": "job-child", "fromTemplate": "job-app",
                    "steps": [{"type": "RUN", "args": ["echo three > /three"]}]})),
    );
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    let child = r.json()["jobID"].as_str().unwrap().to_owned();
    let ended = lab.send(
        lab.api_request("GET", &format!("/templates/builds/{child}/events"))
            .body(support::empty())
            .unwrap(),
    );
    assert_eq!(sse(&ended.text()).last().unwrap().2["status"], "ready");
    let before = layers();
    assert_eq!(before.len(), 2, "{before:?}");
    let r = lab.api("DELETE", &format!("/sandboxes/{}", id_of(&created)), None);
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = lab.api("DELETE", "/templates/job-app", None);
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    assert_eq!(layers(), before, "the child's parent layer was collected");
    let r = lab.api("DELETE", "/templates/job-child", None);
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    assert_eq!(layers(), Vec::<String>::new());
    assert!(lab.log().contains("unused layers collected"));

    // A failing job ends with its reason.
    let r = lab.api(
        "POST",
        "/templates/build",
        Some(json!({"name": "job-bad", "steps": [{"type": "RUN", "args": ["exit 3"]}]})),
    );
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    let bad = r.json()["jobID"].as_str().unwrap().to_owned();
    let events = lab.send(
        lab.api_request("GET", &format!("/templates/builds/{bad}/events"))
            .body(support::empty())
            .unwrap(),
    );
    let all = sse(&events.text());
    let end = &all.last().unwrap().2;
    assert_eq!(end["status"], "error", "{all:?}");
    assert_eq!(end["reason"]["step"], "1", "{end}");
    assert!(end["reason"]["message"]
        .as_str()
        .unwrap()
        .contains("exit code 3"));

    // Bad requests.
    for (body, what) in [
        (
            json!({"name": "j", "steps": [{"type": "COPY", "args": ["a", "/a"]}]}),
            "COPY",
        ),
        (json!({"name": "j", "frob": 1}), "an unknown field"),
        (
            json!({"name": "j", "image": "a", "fromTemplate": "base"}),
            "both bases",
        ),
        (json!({"steps": []}), "no name"),
    ] {
        lab.api("POST", "/templates/build", Some(body))
            .assert_error(400, what);
    }
    lab.api(
        "GET",
        "/templates/builds/00000000-0000-4000-8000-000000000000/logs",
        None,
    )
    .assert_error(404, "an unknown job");
    lab.send(
        lab.api_request("GET", &format!("/templates/builds/{bad}/events"))
            .header("last-event-id", "x")
            .body(support::empty())
            .unwrap(),
    )
    .assert_error(400, "a bad Last-Event-ID");
    lab.finish();
}
