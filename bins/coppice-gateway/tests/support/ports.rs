//! The in-sandbox HTTP server the port tests talk to (`fixtures/port_server.py`), and the
//! raw HTTP/1.1 reading they share.

use std::io::BufRead;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;

use super::{wait_for, Lab, Resp};

/// The server's source, written into the sandbox.
const SERVER: &str = include_str!("../fixtures/port_server.py");
/// How long the server may take to answer through the gateway.
pub const WAIT: Duration = Duration::from_secs(30);

/// A request to `port` of sandbox `id`, routed by the E2B headers.
pub fn to_port(lab: &Lab, method: &str, id: &str, port: u16, path: &str) -> http::request::Builder {
    lab.request(method, path)
        .header("e2b-sandbox-id", id)
        .header("e2b-sandbox-port", port.to_string())
}

/// `GET path` on `port` of sandbox `id`, with the traffic token if given.
pub fn get(lab: &Lab, id: &str, port: u16, path: &str, traffic: Option<&str>) -> Resp {
    let b = to_port(lab, "GET", id, port, path);
    let b = match traffic {
        Some(t) => b.header("e2b-traffic-access-token", t),
        None => b,
    };
    lab.send(b.body(Full::new(Bytes::new())).unwrap())
}

/// Starts the test server on `port` inside sandbox `id` and waits until it answers through
/// the gateway.
pub fn start_server(lab: &Lab, id: &str, token: &str, port: u16, traffic: Option<&str>) {
    let cmd = format!(
        "cat > /tmp/port_server.py <<'EOF'\n{SERVER}\nEOF\n\
         nohup python3 /tmp/port_server.py {port} >/tmp/port_server.log 2>&1 &"
    );
    lab.exec(id, Some(token), &cmd).ok();
    wait_for("the server in the sandbox to listen", WAIT, || {
        let r = get(lab, id, port, "/ready", traffic);
        (r.status == StatusCode::OK).then_some(())
    });
}

/// Reads a response head: the status and the header lines, lower case.
pub fn read_head(r: &mut impl BufRead) -> (u16, Vec<String>) {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        let h = h.trim_end().to_owned();
        if h.is_empty() {
            return (status, headers);
        }
        headers.push(h.to_ascii_lowercase());
    }
}
