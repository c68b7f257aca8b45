//! User ports through the real gateway: a server started inside a sandbox (the template's
//! python3 running `fixtures/port_server.py`) is reached through the E2B headers and through
//! `<port>-<id>.localhost` Host names, with streamed bodies both ways, Server-Sent Events,
//! and a WebSocket; a closed port, a killed sandbox and a sandbox that died behind the
//! gateway's back get E2B's 502s; the traffic access token guards the ports of a sandbox
//! created with `allowPublicTraffic: false` (and survives a restart); port traffic wakes a
//! paused auto-resume sandbox. Real binary, real sandboxes; see `support/mod.rs`.
//! All traffic is on loopback or inside the sandbox's own network namespace.
#![cfg(target_os = "linux")]
// An integration test crate: no `mod tests` wrapper, helpers may unwrap, skip lines and the
// measured latencies must reach the test output, and the tests run on plain threads, where
// `std::thread::sleep` blocks nothing else.
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::tests_outside_test_module,
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::disallowed_methods
)]

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use serde_json::{json, Value};
use support::ports::{get, read_head, start_server, to_port, WAIT};
use support::{id_of, token_of, Lab, Resp};

const PORT: u16 = 8000;

/// Asserts E2B's 502 for a sandbox that is not there.
fn assert_not_found(r: &Resp, id: &str) {
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"sandboxId": id, "message": "The sandbox was not found", "code": 502})
    );
}

/// Opens a raw connection to the gateway and sends `head` (the request line and headers,
/// without the blank line that ends them).
fn raw(lab: &Lab, head: &str) -> TcpStream {
    let mut s = TcpStream::connect(lab.addr()).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(format!("{head}\r\n\r\n").as_bytes()).unwrap();
    s
}

fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// GETs through headers and Host names, uploads streamed both ways, SSE unbuffered, a
/// WebSocket echo, and E2B's 502 bodies for a closed port, a killed sandbox and one that
/// died behind the gateway's back.
#[test]
fn user_ports_carry_http_streams_and_websockets() {
    let Some(mut lab) = Lab::new("user_ports_carry_http_streams_and_websockets") else {
        return;
    };
    lab.start();
    let gw_port = lab.addr().port();
    let s = lab.create(json!({}));
    let (id, token) = (id_of(&s), token_of(&s));
    // Without --domain, get_host(port) is `<port>-<id>.localhost:<gateway port>`.
    assert_eq!(s["domain"], json!(format!("localhost:{gw_port}")), "{s}");
    assert_eq!(s["trafficAccessToken"], Value::Null, "{s}");
    start_server(&lab, &id, &token, PORT, None);

    // Through the headers; the server sees the client's Host.
    let r = get(&lab, &id, PORT, "/a?b=c", None);
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        r.text(),
        format!("hello /a?b=c host={} token=None", lab.addr())
    );

    // Through the Host name the SDK's get_host builds, as a browser or curl sends it.
    let host = format!("{PORT}-{id}.localhost:{gw_port}");
    let r = lab.send(
        http::Request::get("/by-host")
            .header(http::header::HOST, host.as_str())
            .body(Full::new(Bytes::new()))
            .unwrap(),
    );
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.text(), format!("hello /by-host host={host} token=None"));

    // An HTTP/2 client (prior knowledge, as hyper-util's server takes it): the server gets
    // HTTP/1.1 with the :authority as its Host.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (status, text) = rt.block_on(async {
        let stream = tokio::net::TcpStream::connect(lab.addr()).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let req = http::Request::get(format!("http://{host}/over-h2"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status();
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    });
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(text, format!("hello /over-h2 host={host} token=None"));

    // A body larger than any buffer, both with a length and chunked as it is written.
    let big: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    let r = lab.send(
        to_port(&lab, "POST", &id, PORT, "/upload")
            .body(Full::new(Bytes::from(big.clone())))
            .unwrap(),
    );
    assert_eq!(r.text(), format!("{} {}", big.len(), sha256_hex(&big)));
    let mut s = raw(
        &lab,
        &format!(
            "POST /chunked HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\nConnection: close"
        ),
    );
    let mut sent = Vec::new();
    for i in 0..64u8 {
        let chunk = vec![i; 10_000 + usize::from(i)];
        write!(s, "{:x}\r\n", chunk.len()).unwrap();
        s.write_all(&chunk).unwrap();
        s.write_all(b"\r\n").unwrap();
        sent.extend_from_slice(&chunk);
    }
    s.write_all(b"0\r\n\r\n").unwrap();
    let mut r = BufReader::new(s);
    let (status, _) = read_head(&mut r);
    assert_eq!(status, 200);
    let mut body = String::new();
    r.read_to_string(&mut body).unwrap();
    assert_eq!(body, format!("{} {}", sent.len(), sha256_hex(&sent)));

    // Server-Sent Events: the first event arrives while the server still holds the second,
    // which it sends only after /release; a buffering proxy would deliver neither.
    let s = raw(
        &lab,
        &format!("GET /sse HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream"),
    );
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r);
    assert_eq!(status, 200);
    assert!(
        headers
            .iter()
            .any(|h| h == "content-type: text/event-stream"),
        "{headers:?}"
    );
    let mut seen = String::new();
    while !seen.contains("data: first") {
        let mut line = String::new();
        assert_ne!(r.read_line(&mut line).unwrap(), 0, "stream ended: {seen:?}");
        seen.push_str(&line);
    }
    assert!(!seen.contains("second"), "{seen:?}");
    assert_eq!(get(&lab, &id, PORT, "/release", None).text(), "released");
    while !seen.contains("data: second") {
        let mut line = String::new();
        assert_ne!(r.read_line(&mut line).unwrap(), 0, "stream ended: {seen:?}");
        seen.push_str(&line);
    }

    // A WebSocket: the upgrade completes through the gateway, then frames go both ways.
    let s = raw(
        &lab,
        &format!(
            "GET /ws HTTP/1.1\r\nHost: {}\r\ne2b-sandbox-id: {id}\r\ne2b-sandbox-port: {PORT}\r\n\
             Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            lab.addr()
        ),
    );
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r);
    assert_eq!(status, 101, "{headers:?}");
    assert!(
        headers.contains(&"sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=".to_owned()),
        "{headers:?}"
    );
    for msg in ["ping", "second message"] {
        let mask = [1u8, 2, 3, 4];
        let mut frame = vec![0x81, 0x80 | u8::try_from(msg.len()).unwrap()];
        frame.extend_from_slice(&mask);
        frame.extend(msg.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        r.get_mut().write_all(&frame).unwrap();
        let mut head = [0u8; 2];
        r.read_exact(&mut head).unwrap();
        assert_eq!(head[0], 0x81);
        let mut payload = vec![0u8; usize::from(head[1] & 0x7f)];
        r.read_exact(&mut payload).unwrap();
        assert_eq!(String::from_utf8(payload).unwrap(), format!("echo: {msg}"));
    }
    r.get_mut().write_all(&[0x88, 0x80, 0, 0, 0, 0]).unwrap();
    let mut close = [0u8; 2];
    r.read_exact(&mut close).unwrap();
    assert_eq!(close, [0x88, 0x00]);

    // Nothing listens on 8001: E2B's 502 for a closed port, byte for byte.
    let r = get(&lab, &id, 8001, "/", None);
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert_eq!(
        r.headers[http::header::CONTENT_TYPE],
        "application/json; charset=utf-8"
    );
    assert_eq!(
        r.text(),
        format!(
            r#"{{"sandboxId":"{id}","message":"The sandbox is running but port is not open","port":8001,"code":502}}"#
        )
    );

    // A sandbox that died behind the gateway's back: E2B's "not found", not a hang.
    let other = lab.create(json!({}));
    let other_id = id_of(&other);
    start_server(&lab, &other_id, &token_of(&other), PORT, None);
    lab.kill_in_jail(&other_id);
    assert_not_found(&get(&lab, &other_id, PORT, "/", None), &other_id);

    // Killed through the API: the same 502 on its ports, by headers and by Host.
    let r = lab.api("DELETE", &format!("/sandboxes/{id}"), None);
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_not_found(&get(&lab, &id, PORT, "/", None), &id);
    let r = lab.send(
        http::Request::get("/")
            .header(http::header::HOST, host.as_str())
            .body(Full::new(Bytes::new()))
            .unwrap(),
    );
    assert_not_found(&r, &id);
    assert_not_found(
        &get(&lab, "nosuchsandbox", PORT, "/", None),
        "nosuchsandbox",
    );
    let _ = lab.api("DELETE", &format!("/sandboxes/{other_id}"), None);
    lab.finish();
}

/// `allowPublicTraffic: false`: a token on create and connect, required on user ports (403
/// without or with a wrong one), not on envd's, and still required after a restart.
/// `maskRequestHost` is refused by name.
#[test]
fn the_traffic_token_guards_user_ports() {
    let Some(mut lab) = Lab::new("the_traffic_token_guards_user_ports") else {
        return;
    };
    lab.start();
    let r = lab.api(
        "POST",
        "/v2/sandboxes",
        Some(json!({"network": {"maskRequestHost": "localhost:${PORT}"}})),
    );
    r.assert_error(400, "maskRequestHost");
    assert!(r.text().contains("maskRequestHost"), "{}", r.text());

    let s = lab.create(json!({"network": {"allowPublicTraffic": false}}));
    let (id, token) = (id_of(&s), token_of(&s));
    let traffic = s["trafficAccessToken"].as_str().unwrap().to_owned();
    assert!(traffic.len() >= 32, "{s}");
    assert_ne!(traffic, token);
    start_server(&lab, &id, &token, PORT, Some(&traffic));

    let check = |lab: &Lab| {
        let r = get(lab, &id, PORT, "/", None);
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
        assert_eq!(
            r.json(),
            json!({
                "sandboxId": id,
                "message": "Sandbox is secured with traffic access token. Token header 'e2b-traffic-access-token' is missing",
                "code": 403,
            })
        );
        let r = get(lab, &id, PORT, "/", Some("wrong"));
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
        assert!(r.json()["message"]
            .as_str()
            .unwrap()
            .ends_with("'e2b-traffic-access-token' is invalid"));
        let r = get(lab, &id, PORT, "/", Some(&traffic));
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        // envd answers with its own access token and no traffic token.
        assert_eq!(lab.exec(&id, Some(&token), "echo envd").ok(), "envd\n");
    };
    check(&lab);
    // An open sandbox beside it needs no token.
    let open = lab.create(json!({"network": {"allowPublicTraffic": true}}));
    assert_eq!(open["trafficAccessToken"], Value::Null);
    start_server(&lab, &id_of(&open), &token_of(&open), PORT, None);

    // Connect returns the token; a restart keeps it (it is in the registry).
    let r = lab.api(
        "POST",
        &format!("/v2/sandboxes/{id}/connect"),
        Some(json!({"timeout": 300})),
    );
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["trafficAccessToken"], json!(traffic));
    lab.stop();
    lab.start();
    check(&lab);
    lab.finish();
}

/// A request to a user port of a paused auto-resume sandbox resumes it and is answered.
#[test]
fn port_traffic_wakes_a_paused_sandbox() {
    let Some(mut lab) = Lab::new("port_traffic_wakes_a_paused_sandbox") else {
        return;
    };
    lab.start();
    let s = lab.create(json!({"autoPause": true, "autoResume": {"enabled": true}}));
    let (id, token) = (id_of(&s), token_of(&s));
    start_server(&lab, &id, &token, PORT, None);
    let r = lab.api("POST", &format!("/sandboxes/{id}/pause"), None);
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    assert_eq!(lab.detail(&id)["state"], "paused");
    let r = get(&lab, &id, PORT, "/woken", None);
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(r.text().starts_with("hello /woken"), "{}", r.text());
    assert_eq!(lab.detail(&id)["state"], "running");

    // Without auto-resume a paused sandbox's ports are E2B's "not found".
    let plain = lab.create(json!({}));
    let plain_id = id_of(&plain);
    start_server(&lab, &plain_id, &token_of(&plain), PORT, None);
    let r = lab.api("POST", &format!("/sandboxes/{plain_id}/pause"), None);
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    assert_not_found(&get(&lab, &plain_id, PORT, "/", None), &plain_id);
    lab.finish();
}

/// The proxy's cost over a direct connection to the same server, both on one kept-alive
/// client connection, in the same run: printed, not asserted (tests never assert durations).
#[test]
fn proxy_overhead_is_measured() {
    let Some(mut lab) = Lab::new("proxy_overhead_is_measured") else {
        return;
    };
    lab.start();
    let s = lab.create(json!({}));
    let (id, token) = (id_of(&s), token_of(&s));
    start_server(&lab, &id, &token, PORT, None);
    const N: usize = 400;

    let gw = lab.addr();
    let via_gateway = format!(
        "GET /bench HTTP/1.1\r\nHost: {gw}\r\ne2b-sandbox-id: {id}\r\ne2b-sandbox-port: {PORT}\r\n\r\n"
    );
    let proxied = timed(gw, &via_gateway, N, None);

    // The direct client runs on a thread that entered the sandbox's network namespace.
    let pid = sandbox_pid(&id);
    let direct_req = format!("GET /bench HTTP/1.1\r\nHost: 127.0.0.1:{PORT}\r\n\r\n");
    let addr = SocketAddr::from(([127, 0, 0, 1], PORT));
    let (direct, direct_fresh) = std::thread::spawn(move || {
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).unwrap();
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let kept = timed(addr, &direct_req, N, None);
        let fresh = timed(addr, &direct_req, N, Some(()));
        (kept, fresh)
    })
    .join()
    .unwrap();
    let p = |v: &[Duration], q: usize| v[v.len() * q / 100];
    println!(
        "proxy overhead: N={N} p50 via gateway {:?}, direct {:?} (direct with a new connection \
         per request {:?}): p50 overhead {:?}; p90 via gateway {:?}, direct {:?}",
        p(&proxied, 50),
        p(&direct, 50),
        p(&direct_fresh, 50),
        p(&proxied, 50).saturating_sub(p(&direct, 50)),
        p(&proxied, 90),
        p(&direct, 90),
    );
    lab.finish();
}

/// Sends `req` `n` times to `addr` on one kept-alive connection (or a new one per request
/// with `fresh`), asserting 200 each time; returns the sorted round-trip times.
fn timed(addr: SocketAddr, req: &str, n: usize, fresh: Option<()>) -> Vec<Duration> {
    let connect = || {
        let s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        BufReader::new(s)
    };
    let mut conn = connect();
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        if fresh.is_some() {
            conn = connect();
        }
        let t = Instant::now();
        conn.get_mut().write_all(req.as_bytes()).unwrap();
        let (status, headers) = read_head(&mut conn);
        assert_eq!(status, 200, "{headers:?}");
        let len: usize = headers
            .iter()
            .find_map(|h| h.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        let mut body = vec![0u8; len];
        conn.read_exact(&mut body).unwrap();
        times.push(t.elapsed());
    }
    times.sort();
    times
}

/// The host pid of a process of sandbox `id` (all of them share its network namespace).
fn sandbox_pid(id: &str) -> u32 {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .is_ok_and(|c| c.lines().any(|l| l.ends_with(&format!("/{id}"))))
        })
        .unwrap_or_else(|| panic!("no process of sandbox {id}"))
}
