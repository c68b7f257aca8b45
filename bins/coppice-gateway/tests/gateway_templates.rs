//! The template catalogue through the real gateway: `GET /templates` and `/v2/templates`
//! (with pages), `GET /templates/{id}`, `GET /templates/aliases/{alias}`, with build ids, build
//! times, limits and spawn counts checked against the template cache, the sandboxes and a
//! restart; `DELETE`/`PATCH` and the build routes refused for the built-in templates.
//! Real binary, real sandboxes; see `support/mod.rs`.
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

use coppice_jail::JailConfig;
use coppice_zfs::template::TemplateBuilder;
use http::StatusCode;
use serde_json::{json, Value};
use support::{id_of, millis, now_millis, template_cache, Lab, Resp};

const BUILT_IN: [&str; 2] = ["base", "code-interpreter-v1"];

/// When the template cache's marker says the build of `name` finished, in ms.
fn built_at(name: &str) -> u64 {
    let cache = template_cache();
    let builder = TemplateBuilder::new(&cache, JailConfig::DEFAULT_UID_BASE);
    // A flavor's cache name does not depend on its packages.
    let builder = if name == "base" {
        builder
    } else {
        builder.with_flavor(name, &[])
    };
    let marker = cache.join(format!("{}.ready.json", builder.name()));
    let v: Value = serde_json::from_slice(&std::fs::read(&marker).unwrap()).unwrap();
    v["built_unix"].as_u64().unwrap() * 1000
}

fn by_id(list: &Value) -> std::collections::BTreeMap<String, Value> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|t| (t["templateID"].as_str().unwrap().to_owned(), t.clone()))
        .collect()
}

fn get(lab: &Lab, path: &str) -> Resp {
    lab.api("GET", path, None)
}

/// Every required field of E2B's `Template`, with the values sandboxes really get.
fn check_listed(list: &Value, envd_version: &str) {
    let templates = by_id(list);
    assert_eq!(templates.keys().collect::<Vec<_>>(), BUILT_IN, "{list}");
    for (name, t) in &templates {
        assert_eq!(t.as_object().unwrap().len(), 16, "{t}");
        assert_eq!(t["buildStatus"], "ready", "{t}");
        let build = uuid::Uuid::parse_str(t["buildID"].as_str().unwrap()).unwrap();
        assert_eq!(build.get_version_num(), 5, "{t}");
        assert_eq!(t["names"], json!([name]));
        assert_eq!(t["aliases"], json!([name]));
        assert_eq!(t["public"], true);
        assert!(t["createdBy"].is_null());
        assert_eq!(t["buildCount"], 1);
        assert_eq!(t["envdVersion"], envd_version);
        assert_eq!(millis(&t["createdAt"]), built_at(name), "{t}");
        assert_eq!(t["updatedAt"], t["createdAt"]);
    }
}

#[test]
fn the_catalogue_lists_the_built_in_templates_with_real_values() {
    let Some(mut lab) = Lab::new("the_catalogue_lists_the_built_in_templates_with_real_values")
    else {
        return;
    };
    lab.options.api_keys = Some("templates-key".into());
    lab.options.args = vec!["--warm-pool".into(), "0".into()];
    lab.key = Some("templates-key".into());
    lab.start();
    lab.wait_templates_imported();

    // Behind the API key, as every control-plane route.
    let anonymous = lab.send(
        lab.request("GET", "/templates")
            .body(support::empty())
            .unwrap(),
    );
    anonymous.assert_error(401, "no key");

    // A sandbox: its create answer says what limits and envd version sandboxes get.
    let before = now_millis();
    let sbx = lab.create(json!({"templateID": "base"}));
    let id = id_of(&sbx);
    let envd = sbx["envdVersion"].as_str().unwrap().to_owned();
    let detail = lab.detail(&id);

    let r = get(&lab, "/templates");
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let list = r.json();
    check_listed(&list, &envd);
    let templates = by_id(&list);
    let base = &templates["base"];
    assert_eq!(base["cpuCount"], detail["cpuCount"]);
    assert_eq!(base["memoryMB"], detail["memoryMB"]);
    assert_eq!(base["diskSizeMB"], detail["diskSizeMB"]);
    assert_eq!(base["spawnCount"], 1, "{base}");
    let spawned = millis(&base["lastSpawnedAt"]);
    assert!(spawned >= before && spawned <= now_millis(), "{base}");
    let interpreter = &templates["code-interpreter-v1"];
    assert_eq!(interpreter["spawnCount"], 0);
    assert!(interpreter["lastSpawnedAt"].is_null());
    assert_ne!(interpreter["buildID"], base["buildID"]);

    // v2 pages: one at a time, the next template's id as the token.
    let first = get(&lab, "/v2/templates?limit=1");
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
    assert_eq!(by_id(&first.json()).keys().collect::<Vec<_>>(), ["base"]);
    let token = first.headers["x-next-token"].to_str().unwrap().to_owned();
    let rest = get(&lab, &format!("/v2/templates?limit=1&nextToken={token}"));
    assert_eq!(
        by_id(&rest.json()).keys().collect::<Vec<_>>(),
        ["code-interpreter-v1"]
    );
    assert!(!rest.headers.contains_key("x-next-token"));
    let all = get(&lab, "/v2/templates");
    assert!(!all.headers.contains_key("x-next-token"));
    check_listed(&all.json(), &envd);
    get(&lab, "/v2/templates?limit=0").assert_error(400, "limit 0");
    get(&lab, "/v2/templates?limit=101").assert_error(400, "limit 101");
    get(&lab, "/v2/templates?nextToken=nope").assert_error(400, "unknown token");

    // One template with its builds; ids arrive percent-encoded.
    let one = get(&lab, "/templates/code%2Dinterpreter%2Dv1");
    assert_eq!(one.status, StatusCode::OK, "{}", one.text());
    let one = one.json();
    assert_eq!(one["templateID"], "code-interpreter-v1");
    // The SDK reads every field of the list item here too.
    let mut item = interpreter.as_object().unwrap().clone();
    item.insert("builds".into(), one["builds"].clone());
    assert_eq!(one, Value::Object(item));
    assert_eq!(one["builds"].as_array().unwrap().len(), 1, "{one}");
    let build = &one["builds"][0];
    assert_eq!(build["buildID"], interpreter["buildID"]);
    assert_eq!(build["status"], "ready");
    assert_eq!(build["finishedAt"], interpreter["createdAt"]);
    assert_eq!(build["cpuCount"], interpreter["cpuCount"]);
    assert_eq!(build["envdVersion"], envd.as_str());
    get(&lab, "/templates/nope").assert_error(404, "unknown template");
    get(&lab, "/templates/bad%zz").assert_error(400, "bad encoding");

    // Aliases: each template's name; 404 when unknown, as Template.exists expects.
    let alias = get(&lab, "/templates/aliases/%62ase");
    assert_eq!(alias.status, StatusCode::OK, "{}", alias.text());
    assert_eq!(alias.json(), json!({"templateID": "base", "public": true}));
    get(&lab, "/templates/aliases/no-such-template").assert_error(404, "unknown alias");
    get(&lab, "/templates/aliases/team%2Fbase%3Adefault").assert_error(404, "namespaced");

    // Built-in templates cannot be deleted or changed; unknown ones are 404 (the SDK's
    // delete_snapshot reads that as "not found").
    lab.api("DELETE", "/templates/base", None)
        .assert_error(403, "delete base");
    lab.api("DELETE", "/templates/team%2Fsnap1%3Adefault", None)
        .assert_error(404, "delete unknown");
    for path in ["/templates/base", "/v2/templates/code-interpreter-v1"] {
        lab.api("PATCH", path, Some(json!({"public": false})))
            .assert_error(403, path);
        lab.api("PATCH", path, Some(json!({"bogus": 1})))
            .assert_error(400, "unknown field");
        lab.api_raw("PATCH", path, "[]")
            .assert_error(400, "not an object");
    }
    lab.api("PATCH", "/templates/nope", Some(json!({"public": true})))
        .assert_error(404, "patch unknown");
    assert_eq!(get(&lab, "/templates/aliases/base").status, StatusCode::OK);

    // The build routes refuse the built-in templates (403) and malformed requests (400);
    // the older build protocol is not served, and says which one is.
    for (method, path, status) in [
        ("POST", "/v3/templates", 400),
        ("POST", "/v2/templates/base/builds/x", 403),
        ("GET", "/templates/base/files/abc", 403),
        ("GET", "/templates/base/builds/x/status", 403),
        ("POST", "/templates/tags", 400),
        ("POST", "/templates", 404),
    ] {
        let body = (method == "POST").then(|| json!({}));
        let r = lab.api(method, path, body);
        r.assert_error(status, path);
    }
    assert!(lab
        .api("POST", "/templates", Some(json!({})))
        .text()
        .contains("v3 template build protocol"));
    lab.api("POST", "/v3/templates", Some(json!({"name": "base"})))
        .assert_error(403, "rebuild base");

    // A restart keeps the build ids and the spawn counts; the sandbox is re-adopted.
    lab.stop();
    lab.start();
    lab.wait_templates_imported();
    let again = by_id(&get(&lab, "/templates").json());
    for name in BUILT_IN {
        assert_eq!(again[name]["buildID"], templates[name]["buildID"], "{name}");
        assert_eq!(again[name]["createdAt"], templates[name]["createdAt"]);
    }
    assert_eq!(again["base"]["spawnCount"], 1);
    assert_eq!(again["base"]["lastSpawnedAt"], base["lastSpawnedAt"]);
    assert_eq!(lab.detail(&id)["templateID"], "base");
    let health = lab.health().json();
    assert_eq!(health["templates"]["base"], "ready", "{health}");
    lab.finish();
}
