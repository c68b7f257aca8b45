//! The HTTP handlers, one module per resource; each parses, calls the lifecycle and the
//! runtime, and serializes. `error` is the only place that picks statuses for errors.

pub(crate) mod builds;
pub(crate) mod dashboard;
pub(crate) mod error;
pub(crate) mod events;
pub(crate) mod jobs;
pub(crate) mod logs;
pub(crate) mod metrics;
pub(crate) mod network;
pub(crate) mod pool;
pub(crate) mod ports;
pub(crate) mod proxy;
pub(crate) mod sandboxes;
pub(crate) mod signed;
pub(crate) mod snapshots;
pub(crate) mod stream_end;
pub(crate) mod templates;

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};

/// The body type of every response.
pub(crate) type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// A complete body.
pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A JSON response.
pub(crate) fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    let mut resp = Response::new(full(bytes));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// Whether a request comes with a body (which a handler may answer without reading).
pub(crate) fn has_body<B>(req: &http::Request<B>) -> bool {
    let h = req.headers();
    h.contains_key(header::TRANSFER_ENCODING)
        || h.get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0")
}

/// Marks `resp` as the last on its connection. An answer given before the request's body was
/// read leaves that body on the connection, so hyper closes it afterwards; without saying so,
/// the client would reuse the pooled connection and fail on its next request.
pub(crate) fn closing(mut resp: Response<Body>) -> Response<Body> {
    resp.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    resp
}

/// An empty response.
pub(crate) fn empty(status: StatusCode) -> Response<Body> {
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = status;
    resp
}
