//! The Connect protocol as envd speaks it, JSON codec only (spec §3.3).
//!
//! Unary calls carry `application/json` bodies and answer with the message or with a
//! `{"code","message"}` error and the HTTP status of the Connect code. Streaming calls carry
//! `application/connect+json` bodies made of 5-byte envelopes (flags, big-endian length) and
//! answer 200 with message envelopes followed by exactly one end-of-stream envelope whose
//! JSON payload holds the error, if any. The binary protobuf codec is not offered: the E2B
//! SDKs never send it, and a request asking for it gets 415 as Connect prescribes.

use std::fmt;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use http_body::Body as HttpBody;
use http_body_util::BodyExt;
use tokio::sync::mpsc;

use crate::reply::{self, Body};

/// The largest single message (unary body or one envelope) the agent accepts.
///
/// Big enough for any stdin chunk or request the SDK builds, small enough that a hostile
/// length prefix cannot make the agent allocate without bound.
pub(crate) const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// Envelope flag: the payload is compressed (never negotiated here).
const FLAG_COMPRESSED: u8 = 0x01;
/// Envelope flag: this is the end-of-stream envelope.
const FLAG_END_STREAM: u8 = 0x02;

/// envd's keepalive interval when the client sends no usable `Keepalive-Ping-Interval`.
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(90);

/// Content type of unary JSON requests and responses.
pub(crate) const UNARY_JSON: &str = "application/json";
/// Content type of streaming JSON requests and responses.
pub(crate) const STREAM_JSON: &str = "application/connect+json";

/// Connect error codes, with the names used on the wire.
///
/// The whole table is kept (some codes are never produced here) so that the mapping to
/// HTTP statuses stays complete and checkable against the spec.
#[allow(dead_code)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Code {
    Canceled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
}

impl Code {
    /// The code's wire name (`not_found`).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::Unknown => "unknown",
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Aborted => "aborted",
            Code::OutOfRange => "out_of_range",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::DataLoss => "data_loss",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// The HTTP status a unary error with this code is sent with (Connect's table).
    pub(crate) fn http_status(self) -> StatusCode {
        match self {
            Code::Canceled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                StatusCode::BAD_REQUEST
            }
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        }
    }
}

/// A Connect error: a code and a human message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RpcError {
    pub(crate) code: Code,
    pub(crate) message: String,
}

impl RpcError {
    pub(crate) fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(Code::NotFound, message)
    }

    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Self::new(Code::Internal, message)
    }

    /// The `{"code","message"}` object used in unary bodies and end-stream payloads.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "code": self.code.as_str(), "message": self.message })
    }
}

impl From<std::io::Error> for RpcError {
    /// A failure outside any one path: switching credentials, or the blocking pool.
    fn from(e: std::io::Error) -> Self {
        Self::internal(format!("file operation failed: {e}"))
    }
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

/// Which half of the protocol a request speaks, from its content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Unary,
    Streaming,
}

/// Checks the request's content type against what the procedure expects; the 415
/// response to send when it does not match.
///
/// Connect answers a content type it does not serve with HTTP 415; that covers the proto
/// codec, which this agent does not implement.
pub(crate) fn check_content_type(headers: &HeaderMap, want: Kind) -> Option<Response<Body>> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = ct.split(';').next().unwrap_or("").trim();
    let ok = match want {
        Kind::Unary => essence.eq_ignore_ascii_case(UNARY_JSON),
        Kind::Streaming => essence.eq_ignore_ascii_case(STREAM_JSON),
    };
    if ok {
        return None;
    }
    let expected = match want {
        Kind::Unary => UNARY_JSON,
        Kind::Streaming => STREAM_JSON,
    };
    let mut resp = Response::new(reply::empty());
    *resp.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
    resp.headers_mut().insert(
        header::HeaderName::from_static("accept-post"),
        HeaderValue::from_static(expected),
    );
    Some(resp)
}

/// A unary success: 200 with the message as JSON.
pub(crate) fn unary_ok(message: &serde_json::Value) -> Response<Body> {
    reply::json(StatusCode::OK, message)
}

/// A unary failure: the code's HTTP status with `{"code","message"}`.
pub(crate) fn unary_error(err: &RpcError) -> Response<Body> {
    reply::json(err.code.http_status(), &err.to_json())
}

/// A unary response from a handler result.
pub(crate) fn unary(result: Result<serde_json::Value, RpcError>) -> Response<Body> {
    match result {
        Ok(v) => unary_ok(&v),
        Err(e) => unary_error(&e),
    }
}

/// Serves a unary RPC: checks the content type, runs `call` within the request's
/// `Connect-Timeout-Ms` (if any), and encodes its result. `call` is not started unless the
/// checks pass.
pub(crate) async fn serve_unary(
    headers: &HeaderMap,
    call: impl std::future::Future<Output = Result<serde_json::Value, RpcError>>,
) -> Response<Body> {
    if let Some(resp) = check_content_type(headers, Kind::Unary) {
        return resp;
    }
    let deadline = match timeout(headers) {
        Ok(d) => d,
        Err(e) => return unary_error(&e),
    };
    let result = match deadline {
        Some(d) => tokio::time::timeout(d, call)
            .await
            .unwrap_or_else(|_| Err(RpcError::new(Code::DeadlineExceeded, "deadline exceeded"))),
        None => call.await,
    };
    unary(result)
}

/// One envelope: flags, big-endian length, payload.
pub(crate) fn envelope(flags: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + payload.len());
    out.extend_from_slice(&[flags]);
    // Payloads are bounded by MAX_MESSAGE or by what we serialize ourselves (one ≤ 32 KiB
    // output chunk in base64), so they always fit in the 32-bit length.
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    out.freeze()
}

/// A message envelope carrying `message` as JSON.
pub(crate) fn message_envelope(message: &serde_json::Value) -> Bytes {
    envelope(0, message.to_string().as_bytes())
}

/// The end-of-stream envelope: `{}` on success, `{"error":{...}}` on failure.
pub(crate) fn end_stream_envelope(error: Option<&RpcError>) -> Bytes {
    let payload = match error {
        None => serde_json::json!({}),
        Some(e) => serde_json::json!({ "error": e.to_json() }),
    };
    envelope(FLAG_END_STREAM, payload.to_string().as_bytes())
}

/// Incremental envelope parser for streaming request bodies.
#[derive(Debug, Default)]
pub(crate) struct EnvelopeDecoder {
    buf: BytesMut,
    ended: bool,
}

impl EnvelopeDecoder {
    /// Feeds more body bytes.
    pub(crate) fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete message, if one is buffered.
    ///
    /// An end-of-stream envelope from the client (Connect allows one) ends the stream: no
    /// further message is returned. Compressed envelopes and lengths over
    /// [`MAX_MESSAGE`] are errors.
    pub(crate) fn next_message(&mut self) -> Result<Option<Bytes>, RpcError> {
        loop {
            if self.ended || self.buf.len() < 5 {
                return Ok(None);
            }
            let flags = self.buf[0];
            let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            if flags & FLAG_COMPRESSED != 0 {
                return Err(RpcError::new(
                    Code::Internal,
                    "protocol error: received compressed message without a negotiated encoding",
                ));
            }
            if len > MAX_MESSAGE {
                return Err(RpcError::new(
                    Code::ResourceExhausted,
                    format!("message size {len} is larger than configured max {MAX_MESSAGE}"),
                ));
            }
            if self.buf.len() < 5 + len {
                return Ok(None);
            }
            self.buf.advance(5);
            let payload = self.buf.split_to(len).freeze();
            if flags & FLAG_END_STREAM != 0 {
                self.ended = true;
                continue;
            }
            return Ok(Some(payload));
        }
    }

    /// Whether bytes of an unfinished envelope are left over.
    pub(crate) fn has_partial(&self) -> bool {
        !self.ended && !self.buf.is_empty()
    }
}

/// Reads envelopes from a streaming request body as they arrive.
#[derive(Debug)]
pub(crate) struct EnvelopeReader<B> {
    body: B,
    decoder: EnvelopeDecoder,
    done: bool,
}

impl<B> EnvelopeReader<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: fmt::Display,
{
    pub(crate) fn new(body: B) -> Self {
        Self {
            body,
            decoder: EnvelopeDecoder::default(),
            done: false,
        }
    }

    /// The next message, `Ok(None)` at a clean end of body.
    pub(crate) async fn next(&mut self) -> Result<Option<Bytes>, RpcError> {
        loop {
            if let Some(msg) = self.decoder.next_message()? {
                return Ok(Some(msg));
            }
            if self.done {
                if self.decoder.has_partial() {
                    return Err(RpcError::invalid(
                        "protocol error: incomplete envelope at end of body",
                    ));
                }
                return Ok(None);
            }
            match self.body.frame().await {
                None => self.done = true,
                Some(Err(e)) => {
                    return Err(RpcError::new(
                        Code::Canceled,
                        format!("reading request body: {e}"),
                    ))
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.decoder.push(&data);
                    }
                }
            }
        }
    }

    /// Exactly one message, as server-streaming calls require.
    pub(crate) async fn single(mut self) -> Result<Bytes, RpcError> {
        let Some(first) = self.next().await? else {
            return Err(RpcError::invalid(
                "protocol error: stream ended without a message",
            ));
        };
        if self.next().await?.is_some() {
            return Err(RpcError::invalid(
                "protocol error: expected one request message, got more",
            ));
        }
        Ok(first)
    }
}

/// Reads a whole unary body, refusing more than [`MAX_MESSAGE`] bytes.
pub(crate) async fn read_unary<B>(body: B) -> Result<Bytes, RpcError>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: fmt::Display,
{
    let mut body = body;
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| RpcError::new(Code::Canceled, format!("reading request body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > MAX_MESSAGE {
                return Err(RpcError::new(
                    Code::ResourceExhausted,
                    format!("request body is larger than configured max {MAX_MESSAGE}"),
                ));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// Decodes a JSON message; an empty body is the empty message `{}`.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, RpcError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    serde_json::from_slice(bytes).map_err(|e| RpcError::invalid(format!("unmarshal message: {e}")))
}

/// Parses `Connect-Timeout-Ms`: absent is `None`; Connect allows at most 10 digits.
pub(crate) fn timeout(headers: &HeaderMap) -> Result<Option<Duration>, RpcError> {
    let Some(v) = headers.get("connect-timeout-ms") else {
        return Ok(None);
    };
    let s = v.to_str().unwrap_or("");
    if s.is_empty() || s.len() > 10 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RpcError::invalid(format!(
            "protocol error: invalid connect-timeout-ms {s:?}"
        )));
    }
    let ms: u64 = s
        .parse()
        .map_err(|_| RpcError::invalid("protocol error: invalid connect-timeout-ms"))?;
    Ok(Some(Duration::from_millis(ms)))
}

/// The keepalive interval asked for by `Keepalive-Ping-Interval` (seconds), else envd's 90 s.
pub(crate) fn keepalive_interval(headers: &HeaderMap) -> Duration {
    headers
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|&s| s > 0)
        .map_or(DEFAULT_KEEPALIVE, Duration::from_secs)
}

/// The sending half of a server stream.
///
/// Messages are flushed as they are sent (the body yields each envelope as its own chunk).
/// A send fails once the client has gone away, which is how handlers learn to stop.
#[derive(Debug, Clone)]
pub(crate) struct StreamSender {
    tx: mpsc::Sender<Bytes>,
}

impl StreamSender {
    /// Sends one message; `false` when the client is gone.
    pub(crate) async fn send(&self, message: &serde_json::Value) -> bool {
        self.tx.send(message_envelope(message)).await.is_ok()
    }

    /// Sends the end-of-stream envelope, consuming the sender.
    pub(crate) async fn finish(self, error: Option<&RpcError>) {
        // A client that went away needs no end of stream.
        let _ = self.tx.send(end_stream_envelope(error)).await;
    }

    /// Resolves when the client has gone away.
    pub(crate) async fn closed(&self) {
        self.tx.closed().await;
    }
}

/// A 200 streaming response and the sender that feeds it.
pub(crate) fn stream_response() -> (StreamSender, Response<Body>) {
    // A small queue: output is produced faster than most clients read, and a short queue
    // keeps back-pressure on the producer (a process writing to its pipe) instead of
    // buffering its output in the agent.
    let (tx, rx) = mpsc::channel(16);
    let mut resp = Response::new(reply::channel_body(rx));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(STREAM_JSON));
    (StreamSender { tx }, resp)
}

/// A streaming response that only carries an error (HTTP 200, as Connect streams do).
pub(crate) fn stream_error(err: &RpcError) -> Response<Body> {
    let mut resp = Response::new(reply::full(end_stream_envelope(Some(err))));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(STREAM_JSON));
    resp
}

#[cfg(test)]
mod tests {
    use http_body_util::Full;

    use super::*;

    #[test]
    fn envelope_layout_matches_capture() {
        let e = envelope(0, b"{}");
        assert_eq!(&e[..], b"\x00\x00\x00\x00\x02{}");
        let end = end_stream_envelope(None);
        assert_eq!(&end[..], b"\x02\x00\x00\x00\x02{}");
    }

    #[test]
    fn end_stream_error_payload() {
        let end = end_stream_envelope(Some(&RpcError::not_found("no such pid")));
        let v: serde_json::Value = serde_json::from_slice(&end[5..]).unwrap();
        assert_eq!(v["error"]["code"], "not_found");
        assert_eq!(v["error"]["message"], "no such pid");
    }

    #[test]
    fn decoder_handles_split_envelopes() {
        let raw = b"\x00\x00\x00\x00\"{\"start\":{\"process\":{\"pid\":4242}}}\x00\x00\x00\x00#{\"data\":{\"input\":{\"stdin\":\"YQ==\"}}}";
        let mut d = EnvelopeDecoder::default();
        let mut got = Vec::new();
        for b in raw.iter() {
            d.push(&[*b]);
            while let Some(m) = d.next_message().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got.len(), 2);
        assert_eq!(&got[0][..], br#"{"start":{"process":{"pid":4242}}}"#);
        assert!(!d.has_partial());
    }

    #[test]
    fn decoder_rejects_huge_and_compressed() {
        let mut d = EnvelopeDecoder::default();
        d.push(b"\x00\xff\xff\xff\xff");
        assert_eq!(d.next_message().unwrap_err().code, Code::ResourceExhausted);
        let mut d = EnvelopeDecoder::default();
        d.push(b"\x01\x00\x00\x00\x02{}");
        assert_eq!(d.next_message().unwrap_err().code, Code::Internal);
    }

    #[test]
    fn client_end_stream_envelope_ends_the_stream() {
        let mut d = EnvelopeDecoder::default();
        d.push(b"\x02\x00\x00\x00\x02{}\x00\x00\x00\x00\x02{}");
        assert_eq!(d.next_message().unwrap(), None);
    }

    #[tokio::test]
    async fn truncated_body_is_an_error() {
        let body = Full::new(Bytes::from_static(b"\x00\x00\x00\x00\x10{\"a\""));
        let mut r = EnvelopeReader::new(body);
        assert_eq!(r.next().await.unwrap_err().code, Code::InvalidArgument);
    }

    #[tokio::test]
    async fn single_wants_exactly_one() {
        let body = Full::new(Bytes::from_static(
            b"\x00\x00\x00\x00\x02{}\x00\x00\x00\x00\x02{}",
        ));
        assert_eq!(
            EnvelopeReader::new(body).single().await.unwrap_err().code,
            Code::InvalidArgument
        );
        let body = Full::new(Bytes::new());
        assert_eq!(
            EnvelopeReader::new(body).single().await.unwrap_err().code,
            Code::InvalidArgument
        );
        let body = Full::new(Bytes::from_static(b"\x00\x00\x00\x00\x02{}"));
        assert_eq!(
            &EnvelopeReader::new(body).single().await.unwrap()[..],
            b"{}"
        );
    }

    #[test]
    fn timeout_header_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(timeout(&h).unwrap(), None);
        h.insert("connect-timeout-ms", HeaderValue::from_static("60000"));
        assert_eq!(timeout(&h).unwrap(), Some(Duration::from_secs(60)));
        h.insert("connect-timeout-ms", HeaderValue::from_static("-1"));
        assert_eq!(timeout(&h).unwrap_err().code, Code::InvalidArgument);
        h.insert(
            "connect-timeout-ms",
            HeaderValue::from_static("12345678901"),
        );
        assert_eq!(timeout(&h).unwrap_err().code, Code::InvalidArgument);
    }

    #[test]
    fn keepalive_header_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(keepalive_interval(&h), DEFAULT_KEEPALIVE);
        h.insert("keepalive-ping-interval", HeaderValue::from_static("50"));
        assert_eq!(keepalive_interval(&h), Duration::from_secs(50));
        h.insert("keepalive-ping-interval", HeaderValue::from_static("x"));
        assert_eq!(keepalive_interval(&h), DEFAULT_KEEPALIVE);
    }

    #[test]
    fn status_table() {
        assert_eq!(Code::NotFound.http_status(), StatusCode::NOT_FOUND);
        assert_eq!(Code::Canceled.http_status().as_u16(), 499);
        assert_eq!(
            Code::Unauthenticated.http_status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            Code::Unavailable.http_status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            Code::FailedPrecondition.http_status(),
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn content_type_checks() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        assert!(check_content_type(&h, Kind::Unary).is_none());
        let r = check_content_type(&h, Kind::Streaming).unwrap();
        assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/proto"),
        );
        assert!(check_content_type(&h, Kind::Unary).is_some());
    }
}
