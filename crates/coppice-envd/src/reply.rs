//! Response bodies and E2B's JSON error shape, shared by every surface.

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};

/// The body type of every response the agent sends.
pub(crate) type Body = BoxBody<Bytes, std::io::Error>;

/// A complete body from bytes.
pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An empty body.
pub(crate) fn empty() -> Body {
    full(Bytes::new())
}

/// A JSON response with `status`.
pub(crate) fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(full(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// E2B's error body `{"code": <status>, "message": ...}` with that status.
pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    json(
        status,
        &serde_json::json!({ "code": status.as_u16(), "message": message.into() }),
    )
}

/// A streaming body fed by a channel: each received chunk is sent (and flushed) as it comes.
///
/// The body ends when every sender is dropped.
pub(crate) fn channel_body(rx: tokio::sync::mpsc::Receiver<Bytes>) -> Body {
    ChannelBody { rx }.boxed()
}

/// See [`channel_body`].
#[derive(Debug)]
struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(http_body::Frame::data(b))))
    }
}
