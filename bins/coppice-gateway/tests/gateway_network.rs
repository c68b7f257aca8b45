//! Sandbox networking through the real gateway: egress to a fake internet that the test
//! makes in a network namespace of its own, under E2B's policy (`allow_internet_access`,
//! `allowOut`, `denyOut`, precedence), changed live by `PUT /sandboxes/{id}/network`; the
//! names a sandbox gets (`/etc/hosts`, `/etc/resolv.conf`); what it cannot reach (the host);
//! and a host left clean after kills and after a `kill -9` of the gateway and a restart.
//! Every address is from 198.51.100.0/24; see `support/net.rs`.
#![cfg(target_os = "linux")]
// An integration test crate: no `mod tests` wrapper, helpers may unwrap, skip lines must
// reach the test output, and the tests run on plain threads, where `std::thread::sleep`
// blocks nothing else.
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::tests_outside_test_module,
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::disallowed_methods
)]

mod support;

use serde_json::{json, Value};
use support::net::{FakeInternet, GATEWAY, SERVER, SERVER2};
use support::{events_of, id_of, token_of, Lab};

/// Prints what a sandbox gets from `http://<addr>:8080/`: the fake server's greeting, or
/// `failed <why>` within three seconds.
const FETCH: &str = r#"fetch() { python3 -c '
import sys, urllib.request
try:
    print(urllib.request.urlopen("http://" + sys.argv[1] + ":8080/", timeout=3).read().decode().strip())
except Exception as e:
    print("failed", type(e).__name__)
' "$1"; }"#;

fn networked_lab(name: &str) -> Option<Lab> {
    let mut lab = Lab::new(name)?;
    lab.options.network = true;
    // Two warm sandboxes per template: creates below take both the warm path (a policy
    // applied to a running sandbox before it is handed out) and the cold one.
    lab.options.args = vec!["--warm-pool".into(), "2".into()];
    lab.start();
    Some(lab)
}

/// What sandbox `sbx` (a create answer) gets from `addr`.
fn fetch(lab: &Lab, sbx: &Value, addr: &str) -> String {
    let out = lab.exec(
        &id_of(sbx),
        Some(&token_of(sbx)),
        &format!("{FETCH}\nfetch {addr}"),
    );
    out.ok().trim().to_owned()
}

fn hello(addr: &str) -> String {
    format!("hello from {addr}")
}

fn host_links() -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("{}v", support::net::NAME)))
        .collect()
}

#[test]
fn sandboxes_reach_the_fake_internet_under_their_policy() {
    let Some(lab) = networked_lab("sandboxes_reach_the_fake_internet_under_their_policy") else {
        return;
    };
    let _fake = FakeInternet::new(&lab.state_dir);

    // E2B's default: the internet is open, by address.
    let open = lab.create(json!({"templateID": "base"}));
    assert_eq!(fetch(&lab, &open, SERVER), hello(SERVER));
    assert_eq!(fetch(&lab, &open, SERVER2), hello(SERVER2));
    // By name, through the gateway's DNS forwarder, which asks the fake internet's resolver.
    assert_eq!(fetch(&lab, &open, "fake.test"), hello(SERVER));
    assert!(fetch(&lab, &open, "nosuch.test").starts_with("failed"));
    // The host's own addresses are not the internet: the bridge answers only DNS.
    assert!(fetch(&lab, &open, GATEWAY).starts_with("failed"));
    let detail = lab.detail(&id_of(&open));
    // Absent, not null: e2b 2.63 parses a null network as an object and fails.
    assert!(detail.get("network").is_none(), "{detail}");
    assert_eq!(detail["allowInternetAccess"], Value::Null);

    // allow_internet_access=False denies everything.
    let closed = lab.create(json!({"templateID": "base", "allow_internet_access": false}));
    assert!(fetch(&lab, &closed, SERVER).starts_with("failed"));
    assert_eq!(lab.detail(&id_of(&closed))["allowInternetAccess"], false);

    // allowOut wins over denyOut: a whitelist.
    let network = json!({"allowOut": [SERVER], "denyOut": ["0.0.0.0/0"]});
    let listed = lab.create(json!({"templateID": "base", "network": network}));
    assert_eq!(fetch(&lab, &listed, SERVER), hello(SERVER));
    assert!(fetch(&lab, &listed, SERVER2).starts_with("failed"));
    assert_eq!(lab.detail(&id_of(&listed))["network"], network);

    // A domain in allowOut opens what the forwarder resolves it to, and nothing else.
    let network = json!({"allowOut": ["fake.test"], "denyOut": ["0.0.0.0/0"]});
    let named = lab.create(json!({"templateID": "base", "network": network}));
    assert!(
        fetch(&lab, &named, SERVER).starts_with("failed"),
        "not resolved yet"
    );
    assert_eq!(fetch(&lab, &named, "fake.test"), hello(SERVER));
    assert!(fetch(&lab, &named, "other.test").starts_with("failed"));

    // denyOut alone takes out one destination.
    let denied = lab.create(json!({"templateID": "base", "network": {"denyOut": [SERVER2]}}));
    assert_eq!(fetch(&lab, &denied, SERVER), hello(SERVER));
    assert!(fetch(&lab, &denied, SERVER2).starts_with("failed"));

    // Fields the gateway cannot honour are refused by name.
    let r = lab.api(
        "POST",
        "/v2/sandboxes",
        Some(json!({"templateID": "base", "network": {"egressProxy": {"address": "p:1080"}}})),
    );
    r.assert_error(400, "network.egressProxy");

    // Each blocked attempt is a `security.violation` from the kernel's log of the drop.
    let id = id_of(&denied);
    let found = support::wait_for(
        "a security.violation",
        std::time::Duration::from_secs(20),
        || {
            events_of(
                &lab,
                &format!("/events/sandboxes/{id}?types=security.violation"),
            )
            .into_iter()
            .next()
        },
    );
    let data = &found["eventData"];
    assert_eq!(data["violation_type"], "network_egress");
    assert_eq!(data["destination_address"], SERVER2);
    assert_eq!(data["destination_port"], 8080);
    assert_eq!(data["protocol"], "tcp");
    assert_eq!(data["reason"], "policy");
    assert_eq!(data["action"], "blocked");
    let metrics = lab.api("GET", "/metrics", None).text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("coppice_egress_blocked_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );

    for sbx in [&open, &closed, &listed, &named, &denied] {
        let r = lab.api("DELETE", &format!("/sandboxes/{}", id_of(sbx)), None);
        assert_eq!(r.status, 204);
    }
}

#[test]
fn a_sandbox_has_its_names_and_no_say_over_its_network() {
    let Some(lab) = networked_lab("a_sandbox_has_its_names_and_no_say_over_its_network") else {
        return;
    };
    let sbx = lab.create(json!({"templateID": "base"}));
    let id = id_of(&sbx);
    let token = token_of(&sbx);
    let out = lab.exec(
        &id,
        Some(&token),
        "getent hosts localhost | head -1; getent hosts $(hostname); cat /etc/resolv.conf",
    );
    let text = out.ok();
    assert!(text.contains("127.0.0.1") || text.contains("::1"), "{text}");
    let own = text
        .lines()
        .find(|l| l.contains(&id))
        .unwrap_or_else(|| panic!("the sandbox's hostname does not resolve: {text}"));
    let addr: std::net::Ipv4Addr = own.split_whitespace().next().unwrap().parse().unwrap();
    let pool: coppice_lifecycle::backend::Ipv4Cidr = support::net::POOL.parse().unwrap();
    assert!(pool.contains(addr), "{addr} is not in {pool}");
    assert!(text.contains(&format!("nameserver {GATEWAY}")), "{text}");

    // Root in the sandbox (the agent runs commands as root when asked) owns nothing of it.
    let root = lab.exec_with(
        lab.request("POST", "/process.Process/Start")
            .header("e2b-sandbox-id", &id)
            .header("e2b-sandbox-port", "49983")
            .header("authorization", "Basic cm9vdDo="),
        Some(&token),
        r#"id -u; python3 -c '
import fcntl, socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    fcntl.ioctl(s, 0x8914, struct.pack("16sH14x", b"eth0", 0))
    print("link down")
except PermissionError:
    print("denied")
'; echo 0 > /proc/sys/net/ipv4/conf/eth0/rp_filter 2>/dev/null && echo sysctl written || echo sysctl denied"#,
    );
    let text = root.ok();
    assert!(text.starts_with("0\n"), "not root: {text}");
    assert!(text.contains("denied\n"), "{text}");
    assert!(text.contains("sysctl denied"), "{text}");
    let r = lab.api("DELETE", &format!("/sandboxes/{id}"), None);
    assert_eq!(r.status, 204);

    // `network.dnsServers` at create names its resolvers; an update replaces them in the
    // same file, which a process inside that holds it open reads again; an update without
    // them points back at the gateway's forwarder.
    let sbx =
        lab.create(json!({"templateID": "base", "network": {"dnsServers": ["198.51.100.53"]}}));
    let id = id_of(&sbx);
    let token = token_of(&sbx);
    let read = |lab: &Lab| {
        lab.exec(
            &id,
            Some(&token),
            "cat /etc/resolv.conf; stat -c %i /etc/resolv.conf",
        )
        .ok()
        .to_owned()
    };
    let first = read(&lab);
    assert!(first.starts_with("nameserver 198.51.100.53\n"), "{first}");
    let r = lab.api(
        "PUT",
        &format!("/sandboxes/{id}/network"),
        Some(json!({"dnsServers": ["198.51.100.54", "198.51.100.55"]})),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let second = read(&lab);
    assert!(
        second.starts_with("nameserver 198.51.100.54\nnameserver 198.51.100.55\n"),
        "{second}"
    );
    assert_eq!(
        first.lines().last(),
        second.lines().last(),
        "the file was replaced"
    );
    let r = lab.api("PUT", &format!("/sandboxes/{id}/network"), Some(json!({})));
    assert_eq!(r.status, 204, "{}", r.text());
    let third = read(&lab);
    assert!(
        third.starts_with(&format!("nameserver {GATEWAY}\n")),
        "{third}"
    );
    let r = lab.api("DELETE", &format!("/sandboxes/{id}"), None);
    assert_eq!(r.status, 204);
}

#[test]
fn update_network_replaces_the_policy_of_a_running_sandbox() {
    let Some(lab) = networked_lab("update_network_replaces_the_policy_of_a_running_sandbox") else {
        return;
    };
    let _fake = FakeInternet::new(&lab.state_dir);
    let sbx = lab.create(json!({"templateID": "base"}));
    let id = id_of(&sbx);
    assert_eq!(fetch(&lab, &sbx, SERVER), hello(SERVER));

    let r = lab.api(
        "PUT",
        &format!("/sandboxes/{id}/network"),
        Some(json!({"denyOut": [SERVER]})),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(fetch(&lab, &sbx, SERVER).starts_with("failed"));
    assert_eq!(fetch(&lab, &sbx, SERVER2), hello(SERVER2));
    assert_eq!(lab.detail(&id)["network"], json!({"denyOut": [SERVER]}));

    // Everything omitted is cleared; allow_internet_access=false closes the rest.
    let r = lab.api(
        "PUT",
        &format!("/sandboxes/{id}/network"),
        Some(json!({"allowOut": [SERVER2], "allow_internet_access": false})),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(fetch(&lab, &sbx, SERVER).starts_with("failed"));
    assert_eq!(fetch(&lab, &sbx, SERVER2), hello(SERVER2));
    assert_eq!(lab.detail(&id)["allowInternetAccess"], false);

    let r = lab.api("PUT", &format!("/sandboxes/{id}/network"), Some(json!({})));
    assert_eq!(r.status, 204);
    assert_eq!(fetch(&lab, &sbx, SERVER), hello(SERVER));
    assert!(lab.detail(&id).get("network").is_none());

    // Each update is a `sandbox.lifecycle.updated` with the policy it set. Asked for by type:
    // every command above is a `task.completed` too, and a page holds 10 events.
    let updates = events_of(
        &lab,
        &format!("/events/sandboxes/{id}?types=sandbox.lifecycle.updated"),
    );
    assert_eq!(updates.len(), 3, "{updates:?}");
    assert!(updates
        .iter()
        .any(|e| e["eventData"]["network"] == json!({"denyOut": [SERVER]})));

    let r = lab.api(
        "PUT",
        "/sandboxes/nosuchsandbox0000000/network",
        Some(json!({})),
    );
    r.assert_error(404, "nosuchsandbox0000000");
    let r = lab.api(
        "PUT",
        &format!("/sandboxes/{id}/network"),
        Some(json!({"rules": {}, "denyOut": []})),
    );
    assert_eq!(r.status, 204, "an empty rules map asks for nothing");
    let r = lab.api(
        "PUT",
        &format!("/sandboxes/{id}/network"),
        Some(json!({"rules": {"example.com": [{"transform": {}}]}})),
    );
    r.assert_error(400, "network.rules");
    let r = lab.api("DELETE", &format!("/sandboxes/{id}"), None);
    assert_eq!(r.status, 204);
}

#[test]
fn networks_survive_a_crash_and_leave_nothing_after_kill() {
    let Some(mut lab) = networked_lab("networks_survive_a_crash_and_leave_nothing_after_kill")
    else {
        return;
    };
    let _fake = FakeInternet::new(&lab.state_dir);
    let sbx = lab.create(json!({"templateID": "base", "network": {"denyOut": [SERVER2]}}));
    let id = id_of(&sbx);
    assert_eq!(fetch(&lab, &sbx, SERVER), hello(SERVER));
    lab.crash();
    lab.start();
    // Re-adopted with its address and its policy.
    assert_eq!(fetch(&lab, &sbx, SERVER), hello(SERVER));
    assert!(fetch(&lab, &sbx, SERVER2).starts_with("failed"));
    let before = host_links();
    let r = lab.api("DELETE", &format!("/sandboxes/{id}"), None);
    assert_eq!(r.status, 204);
    let after = host_links();
    assert_eq!(
        after.len() + 1,
        before.len(),
        "the killed sandbox's link stays: {before:?} -> {after:?}"
    );
    assert!(
        !lab.state_dir.join("net").join(&id).exists(),
        "its namespace file stays"
    );
    lab.stop();
    // What is left once the gateway is gone (ready namespaces, warm sandboxes' networks,
    // the bridge and the tables) is the lab's to remove, and goes.
    support::net::purge(&lab.state_dir).unwrap();
    assert!(host_links().is_empty(), "{:?}", host_links());
}
