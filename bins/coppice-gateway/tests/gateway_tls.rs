//! TLS on the gateway's listeners, through the real binary: plain HTTP and TLS on one port
//! (HTTP/1.1 and HTTP/2 by ALPN, a streamed Connect call over HTTP/2), the local CA made on the first start and kept across a
//! restart, certificates that verify for `localhost`, loopback addresses and
//! `<port>-<id>.localhost` against that CA alone, a WebSocket to a sandbox's port over TLS,
//! clients that connect and send nothing (or half a handshake) beside ones that are served,
//! `--tls-cert`/`--tls-key` served as given, and the start errors for bad TLS flags.
//! Clients are rustls on ring trusting only the CA in question; all traffic is on loopback.
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

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::task::{Context, Poll};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;
use http::StatusCode;
use http_body_util::BodyExt as _;
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use serde_json::json;
use support::ports::{read_head, start_server, WAIT};
use support::{envelope, envelopes, id_of, token_of, Lab};

const PORT: u16 = 8000;

type Tls = StreamOwned<ClientConnection, TcpStream>;

/// The certificates in the PEM file `path`.
fn certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// A client that trusts `roots` and nothing else, offering `alpn`.
fn client(roots: &[CertificateDer<'static>], alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).unwrap();
    }
    let mut c =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(store)
            .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(c)
}

/// Connects to `addr` and completes a handshake for `name` (sent as SNI when it is a DNS
/// name), verified by `config`.
fn connect(addr: SocketAddr, name: &str, config: &Arc<ClientConfig>) -> Result<Tls, String> {
    let sock = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let server_name = ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
    let conn = ClientConnection::new(Arc::clone(config), server_name).map_err(|e| e.to_string())?;
    let mut tls = StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .map_err(|e| format!("handshake for {name}: {e}"))?;
    }
    Ok(tls)
}

/// `GET path` with HTTP/1.1 over a new TLS connection for `name`; the status and body.
fn https_get(
    addr: SocketAddr,
    name: &str,
    host: &str,
    path: &str,
    config: &Arc<ClientConfig>,
) -> (u16, String) {
    let mut tls = connect(addr, name, config).unwrap();
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut r = BufReader::new(tls);
    let (status, headers) = read_head(&mut r);
    let len: usize = headers
        .iter()
        .find_map(|h| h.strip_prefix("content-length: "))
        .map_or(0, |l| l.parse().unwrap());
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A request body of unknown length, as an SDK streams it: no size hint, so an HTTP/2
/// client sends no content-length.
struct Streamed(Option<Bytes>);

impl hyper::body::Body for Streamed {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.take().map(|b| Ok(Frame::data(b))))
    }
}

/// Sends `req` with HTTP/2 over TLS, negotiated by ALPN; the status and whole body.
fn h2_send(
    addr: SocketAddr,
    ca: &[CertificateDer<'static>],
    req: http::Request<Streamed>,
) -> (StatusCode, Bytes) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let connector = tokio_rustls::TlsConnector::from(client(ca, &[b"h2"]));
        let sock = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, sock).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        let conn = tokio::spawn(conn);
        let resp = tokio::time::timeout(WAIT, sender.send_request(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let status = resp.status();
        let body = tokio::time::timeout(WAIT, resp.into_body().collect())
            .await
            .unwrap()
            .unwrap()
            .to_bytes();
        conn.abort();
        (status, body)
    })
}

/// `process.Process/Start` of `echo over h2` in sandbox `id` over HTTP/2 and TLS, its body
/// streamed; what the command wrote.
fn h2_exec(addr: SocketAddr, ca: &[CertificateDer<'static>], id: &str, token: &str) -> String {
    let msg = json!({"process": {"cmd": "/bin/sh", "args": ["-c", "echo over h2"]}});
    let req = http::Request::post(format!(
        "https://localhost:{}/process.Process/Start",
        addr.port()
    ))
    .header("e2b-sandbox-id", id)
    .header("e2b-sandbox-port", "49983")
    .header("x-access-token", token)
    .header(http::header::CONTENT_TYPE, "application/connect+json")
    .header("connect-protocol-version", "1")
    .body(Streamed(Some(Bytes::from(envelope(
        0,
        msg.to_string().as_bytes(),
    )))))
    .unwrap();
    let (status, body) = h2_send(addr, ca, req);
    assert_eq!(status, StatusCode::OK, "{body:?}");
    let mut out = String::new();
    for (flags, v) in envelopes(&body) {
        if flags & 0x02 != 0 {
            assert!(
                v.get("error").is_none(),
                "the stream ended with an error: {v}"
            );
        } else if let Some(s) = v["event"]["data"]["stdout"].as_str() {
            out.push_str(&String::from_utf8_lossy(&STANDARD.decode(s).unwrap()));
        }
    }
    out
}

/// A WebSocket to the sandbox's port over TLS, by its `<port>-<id>.localhost` name: the
/// upgrade completes and frames are echoed.
fn websocket_over_tls(addr: SocketAddr, id: &str, config: &Arc<ClientConfig>) {
    let name = format!("{PORT}-{id}.localhost");
    let mut tls = connect(addr, &name, config).unwrap();
    write!(
        tls,
        "GET /ws HTTP/1.1\r\nHost: {name}:{}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        addr.port()
    )
    .unwrap();
    let mut r = BufReader::new(tls);
    let (status, headers) = read_head(&mut r);
    assert_eq!(status, 101, "{headers:?}");
    for msg in ["ping", "over tls"] {
        let mask = [9u8, 8, 7, 6];
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
}

/// One port, both protocols, with the CA the gateway made; the CA outlives a restart.
#[test]
fn plain_http_and_tls_share_the_port_with_a_local_ca() {
    let Some(mut lab) = Lab::new("plain_http_and_tls_share_the_port_with_a_local_ca") else {
        return;
    };
    lab.start();
    let addr = lab.addr();
    let host = addr.to_string();
    let ca_path = lab.state_dir.join("tls/ca.pem");
    assert!(
        lab.log()
            .contains(&format!("trust this CA for https: {}", ca_path.display())),
        "{}",
        lab.log()
    );
    let key_mode = std::fs::metadata(lab.state_dir.join("tls/ca-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    let ca = certs(&ca_path);
    let h1 = client(&ca, &[b"h2", b"http/1.1"]);
    let h1_only = client(&ca, &[b"http/1.1"]);

    // A client that connects and says nothing, and one that stops after the first byte of a
    // handshake, are held open while others are served.
    let silent = TcpStream::connect(addr).unwrap();
    let mut stalled = TcpStream::connect(addr).unwrap();
    stalled.write_all(&[0x16]).unwrap();

    // Plain HTTP as before, and TLS on the same port: HTTP/1.1 and HTTP/2.
    assert_eq!(lab.health().status, StatusCode::OK);
    let (status, body) = https_get(addr, "localhost", &host, "/health", &h1_only);
    assert_eq!(status, 200, "{body}");
    let health = http::Request::get(format!("https://localhost:{}/health", addr.port()))
        .body(Streamed(None))
        .unwrap();
    assert_eq!(h2_send(addr, &ca, health).0, StatusCode::OK);
    // By address (no SNI): the certificate names the loopback addresses too.
    assert_eq!(https_get(addr, "127.0.0.1", &host, "/health", &h1).0, 200);

    // `<port>-<id>.localhost`, the names get_host builds, verify with the CA alone and are
    // routed by Host over TLS as over HTTP: an unknown sandbox is E2B's 502.
    let name = "49983-nosuchsandbox0.localhost";
    let (status, body) = https_get(
        addr,
        name,
        &format!("{name}:{}", addr.port()),
        "/health",
        &h1,
    );
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("The sandbox was not found"), "{body}");

    // A WebSocket to a real sandbox's port, over TLS.
    let s = lab.create(json!({}));
    let (id, token) = (id_of(&s), token_of(&s));
    // The SDKs stream their Connect calls, and over TLS they speak HTTP/2: the body must
    // reach the agent.
    assert_eq!(h2_exec(addr, &ca, &id, &token), "over h2\n");
    start_server(&lab, &id, &token, PORT, None);
    websocket_over_tls(addr, &id, &h1_only);
    let (status, body) = https_get(
        addr,
        &format!("{PORT}-{id}.localhost"),
        &format!("{PORT}-{id}.localhost:{}", addr.port()),
        "/tls",
        &h1,
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("hello /tls"), "{body}");
    drop((silent, stalled));

    // A second start keeps the CA: what users trusted still verifies.
    let kept = std::fs::read(&ca_path).unwrap();
    lab.stop();
    lab.start();
    assert_eq!(
        std::fs::read(&ca_path).unwrap(),
        kept,
        "the CA was made again"
    );
    let addr = lab.addr();
    assert_eq!(
        https_get(addr, "localhost", &addr.to_string(), "/health", &h1).0,
        200
    );
    lab.finish();
}

/// `--tls-cert`/`--tls-key`: the listeners present that chain, and make no CA of their own.
#[test]
fn given_tls_files_are_presented() {
    let Some(mut lab) = Lab::new("given_tls_files_are_presented") else {
        return;
    };
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let files = lab.state_dir.join("given");
    std::fs::create_dir_all(&files).unwrap();
    let (cert_path, key_path) = (files.join("cert.pem"), files.join("key.pem"));
    std::fs::write(&cert_path, leaf.pem() + &ca.pem()).unwrap();
    std::fs::write(&key_path, leaf_key.serialize_pem()).unwrap();
    lab.options.args = vec![
        "--tls-cert".into(),
        cert_path.display().to_string(),
        "--tls-key".into(),
        key_path.display().to_string(),
    ];
    lab.start();
    let addr = lab.addr();
    let config = client(&[ca.der().clone()], &[b"http/1.1"]);
    let tls = connect(addr, "localhost", &config).unwrap();
    let presented = tls.conn.peer_certificates().unwrap();
    assert_eq!(presented[0], *leaf.der(), "not the --tls-cert leaf");
    assert_eq!(presented.len(), 2, "the chain as given");
    drop(tls);
    assert_eq!(
        https_get(addr, "localhost", &addr.to_string(), "/health", &config).0,
        200
    );
    assert_eq!(lab.health().status, StatusCode::OK);
    assert!(!lab.state_dir.join("tls").exists());
    lab.finish();
}

/// Bad TLS flags stop the start with a message that names the problem, before anything
/// privileged happens, so no root is needed.
#[test]
fn bad_tls_flags_stop_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let run = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_coppice-gateway"));
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--state-dir")
            .arg(&state)
            .args(args);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("COPPICE_") {
                cmd.env_remove(k);
            }
        }
        let out = cmd
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--tls-cert", "/nonexistent/cert.pem"]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("--tls-cert needs --tls-key"), "{err}");
    let (code, err) = run(&["--tls-key", "/nonexistent/key.pem"]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("--tls-key needs --tls-cert"), "{err}");

    // A key file that holds only a certificate.
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let cert_path = dir.path().join("cert.pem");
    std::fs::write(&cert_path, cert.pem()).unwrap();
    let c = cert_path.to_str().unwrap();
    let (code, err) = run(&["--tls-cert", c, "--tls-key", c]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&format!("no private key in {c}")), "{err}");
}
