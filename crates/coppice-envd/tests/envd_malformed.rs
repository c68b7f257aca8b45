//! Malformed input gets the right Connect or HTTP error and never wedges the agent.

// Integration tests are a test crate of their own: no `mod tests` wrapper.
#![allow(missing_docs, clippy::unwrap_used, clippy::tests_outside_test_module)]

mod support;

use bytes::Bytes;
use serde_json::json;
use support::{envelope, full, Agent, Item};

async fn still_healthy(agent: &Agent) {
    let resp = agent
        .send(agent.request("GET", "/health").body(full("")).unwrap())
        .await;
    assert_eq!(resp.status(), 204);
    let out = agent.run("echo ok", &[]).await;
    assert_eq!(out.stdout, b"ok\n");
}

async fn end_code(mut s: support::RpcStream) -> String {
    assert_eq!(
        s.status, 200,
        "stream errors travel in the end-of-stream envelope"
    );
    loop {
        match s.next().await {
            Some(Item::End(v)) => return v["error"]["code"].as_str().unwrap_or("").to_owned(),
            Some(Item::Message(_)) => {}
            None => panic!("stream ended without end-of-stream"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_envelopes_get_connect_errors() {
    let agent = Agent::start().await;
    let start = "/process.Process/Start";
    // Truncated frame: header promises 100 bytes, body ends after 10.
    let mut body = vec![0, 0, 0, 0, 100];
    body.extend_from_slice(b"{\"process\"");
    assert_eq!(
        end_code(agent.stream_raw(start, body, &[]).await).await,
        "invalid_argument"
    );
    // Huge length prefix: refused without allocating.
    let body = vec![0, 0xff, 0xff, 0xff, 0xf0, b'{'];
    assert_eq!(
        end_code(agent.stream_raw(start, body, &[]).await).await,
        "resource_exhausted"
    );
    // Compressed flag without negotiated compression.
    assert_eq!(
        end_code(agent.stream_raw(start, envelope(1, b"{}"), &[]).await).await,
        "internal"
    );
    // Not JSON, and JSON of the wrong shape.
    assert_eq!(
        end_code(agent.stream_raw(start, envelope(0, b"\xff\xfe"), &[]).await).await,
        "invalid_argument"
    );
    assert_eq!(
        end_code(
            agent
                .stream_raw(start, envelope(0, br#"{"process":{"cmd":7}}"#), &[])
                .await
        )
        .await,
        "invalid_argument"
    );
    // No message, and two messages, for a server stream.
    assert_eq!(
        end_code(agent.stream_raw(start, Vec::new(), &[]).await).await,
        "invalid_argument"
    );
    let mut two = envelope(0, br#"{"process":{"cmd":"/bin/true"}}"#);
    two.extend(envelope(0, br#"{"process":{"cmd":"/bin/true"}}"#));
    assert_eq!(
        end_code(agent.stream_raw(start, two, &[]).await).await,
        "invalid_argument"
    );
    // A bad Connect-Timeout-Ms.
    let ok = envelope(0, br#"{"process":{"cmd":"/bin/true"}}"#);
    assert_eq!(
        end_code(
            agent
                .stream_raw(start, ok, &[("connect-timeout-ms", "soon")])
                .await
        )
        .await,
        "invalid_argument"
    );
    still_healthy(&agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_content_types_unknown_rpcs_and_bad_unary_bodies() {
    let agent = Agent::start().await;
    // Unary body on a streaming procedure, and the reverse: 415.
    let (st, _) = agent.unary("/process.Process/Start", json!({}), &[]).await;
    assert_eq!(st, 415);
    let s = agent.stream("/process.Process/List", json!({}), &[]).await;
    assert_eq!(s.status, 415);
    // The proto codec is not served.
    let req = agent
        .request("POST", "/filesystem.Filesystem/Stat")
        .header("content-type", "application/proto")
        .body(full(&b"\x0a\x01/"[..]))
        .unwrap();
    assert_eq!(agent.send(req).await.status(), 415);
    // Unknown procedures and services.
    let (st, v) = agent.unary("/process.Process/Fork", json!({}), &[]).await;
    assert_eq!(
        (st.as_u16(), v["code"].as_str()),
        (501, Some("unimplemented"))
    );
    let (st, v) = agent.unary("/nope.Service/Call", json!({}), &[]).await;
    assert_eq!(
        (st.as_u16(), v["code"].as_str()),
        (404, Some("unimplemented"))
    );
    // GET on an RPC.
    let req = agent
        .request("GET", "/process.Process/List")
        .body(full(""))
        .unwrap();
    assert_eq!(agent.send(req).await.status(), 405);
    // Bad unary JSON.
    let req = agent
        .request("POST", "/filesystem.Filesystem/Stat")
        .header("content-type", "application/json")
        .body(full("{not json"))
        .unwrap();
    let resp = agent.send(req).await;
    assert_eq!(resp.status(), 400);
    // An oversized unary body is refused.
    let req = agent
        .request("POST", "/process.Process/List")
        .header("content-type", "application/json")
        .body(support::Chunked::new(vec![Bytes::from(vec![
            b' ';
            17 * 1024
                * 1024
        ])]))
        .unwrap();
    let resp = agent.send(req).await;
    assert_eq!(resp.status(), 429);
    // Empty unary body is the empty message.
    let req = agent
        .request("POST", "/process.Process/List")
        .header("content-type", "application/json")
        .body(full(""))
        .unwrap();
    assert_eq!(agent.send(req).await.status(), 200);
    still_healthy(&agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_http_and_abandoned_requests_do_not_wedge_the_agent() {
    let agent = Agent::start().await;
    let answer = agent.raw(b"NOT HTTP AT ALL\r\n\r\n").await;
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // A chunked request whose body never finishes, then the client leaves.
    {
        use tokio::io::AsyncWriteExt as _;
        let mut s = tokio::net::UnixStream::connect(&agent.socket)
            .await
            .unwrap();
        s.write_all(b"POST /process.Process/Start HTTP/1.1\r\nhost: x\r\ncontent-type: application/connect+json\r\ntransfer-encoding: chunked\r\n\r\n5\r\n\x00\x00\x00")
            .await
            .unwrap();
    }
    // A streaming-input request that is abandoned midway.
    let (tx, body) = support::channel_body();
    let req = agent
        .request("POST", "/process.Process/StreamInput")
        .header("content-type", "application/connect+json")
        .body(body)
        .unwrap();
    let pending = tokio::spawn({
        let socket = agent.socket.clone();
        async move {
            let stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .unwrap();
            let c = tokio::spawn(conn);
            let r = sender.send_request(req).await;
            c.abort();
            r.map(|r| r.status())
        }
    });
    tx.send(Bytes::from(
        envelope(0, br#"{"start":{"process":{"pid":1}}}"#)[..3].to_vec(),
    ))
    .await
    .unwrap();
    pending.abort();
    drop(tx);
    still_healthy(&agent).await;
    // A stdin stream for a pid that does not exist.
    let chunks = vec![Bytes::from(envelope(
        0,
        br#"{"start":{"process":{"pid":999999999}}}"#,
    ))];
    let req = agent
        .request("POST", "/process.Process/StreamInput")
        .header("content-type", "application/connect+json")
        .body(support::Chunked::new(chunks))
        .unwrap();
    let resp = agent.send(req).await;
    assert_eq!(resp.status(), 200);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("not_found"));
}
