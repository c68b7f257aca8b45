//! How a Connect stream from a sandbox ends when the sandbox goes away under it.
//!
//! A command's output (`process.Process/Start`, `Connect`) and a directory watch are Connect
//! streams: envelopes of a flag byte, a 4-byte big-endian length and a payload, the last one
//! an end-of-stream envelope (flag `0x02`) whose JSON may carry an error. When the sandbox is
//! killed, or its agent dies, while such a stream is open, the agent's connection drops in
//! the middle of the response. Passed on as is, the client sees a body cut short, which the
//! SDKs report as a protocol error ("unexpected EOF during chunk size line"). When the cut
//! falls between envelopes, the gateway ends the stream the way Connect ends a failed one
//! instead: an end-of-stream envelope with code `unavailable` and the message E2B's SDKs
//! use for that case, which they raise as a `TimeoutException` that says so.
//! A cut inside an envelope cannot be repaired and still ends the response with an error.

use bytes::Bytes;
use http::HeaderMap;

/// The message of the end-of-stream error, in the words of E2B's SDKs.
const GONE: &str =
    "The sandbox was killed or reached its end of life while the request was in flight";

/// Follows the envelope boundaries of a Connect stream as its bytes pass.
#[derive(Debug, Default)]
pub(crate) struct Envelopes {
    /// Bytes of the current envelope's 5-byte prefix seen so far.
    prefix: [u8; 5],
    have: usize,
    /// Payload bytes of the current envelope still to come.
    remaining: u64,
    /// An end-of-stream envelope has started: nothing may follow it.
    ended: bool,
}

impl Envelopes {
    /// A tracker for a response whose headers say it is a Connect stream, `None` for
    /// anything else (unary Connect, JSON, a user's server).
    pub(crate) fn for_response(headers: &HeaderMap) -> Option<Self> {
        let ty = headers.get(http::header::CONTENT_TYPE)?.to_str().ok()?;
        ty.starts_with("application/connect+").then(Self::default)
    }

    /// Accounts for `bytes` of the stream.
    pub(crate) fn pass(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.remaining > 0 {
                let take = usize::try_from(self.remaining)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                self.remaining -= take as u64;
                bytes = &bytes[take..];
                continue;
            }
            let take = (5 - self.have).min(bytes.len());
            self.prefix[self.have..self.have + take].copy_from_slice(&bytes[..take]);
            self.have += take;
            bytes = &bytes[take..];
            if self.have == 5 {
                self.have = 0;
                self.ended |= self.prefix[0] & 0x02 != 0;
                let len = [
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ];
                self.remaining = u64::from(u32::from_be_bytes(len));
            }
        }
    }

    /// The envelope that ends the stream now, if the stream is between envelopes and has
    /// not ended; `None` when it cannot be ended cleanly.
    pub(crate) fn end_for_gone_sandbox(&self) -> Option<Bytes> {
        if self.ended || self.have != 0 || self.remaining != 0 {
            return None;
        }
        let payload = serde_json::json!({
            "error": { "code": "unavailable", "message": GONE }
        })
        .to_string();
        let len = u32::try_from(payload.len()).ok()?;
        let mut out = Vec::with_capacity(5 + payload.len());
        out.push(0x02);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(payload.as_bytes());
        Some(Bytes::from(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![flags];
        v.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn connect_stream() -> Envelopes {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::CONTENT_TYPE,
            "application/connect+json".parse().unwrap(),
        );
        Envelopes::for_response(&h).unwrap()
    }

    #[test]
    fn only_connect_streams_are_followed() {
        let mut h = HeaderMap::new();
        assert!(Envelopes::for_response(&h).is_none());
        h.insert(
            http::header::CONTENT_TYPE,
            "application/json".parse().unwrap(),
        );
        assert!(Envelopes::for_response(&h).is_none());
        h.insert(
            http::header::CONTENT_TYPE,
            "application/connect+proto".parse().unwrap(),
        );
        assert!(Envelopes::for_response(&h).is_some());
    }

    #[test]
    fn a_stream_cut_between_envelopes_ends_with_an_unavailable_error() {
        let mut e = connect_stream();
        let mut bytes = envelope(0, br#"{"event":{"start":{"pid":1}}}"#);
        bytes.extend(envelope(0, br#"{"event":{"data":{"stdout":"aGk="}}}"#));
        // Split across chunks anywhere, prefix included.
        for chunk in bytes.chunks(3) {
            e.pass(chunk);
        }
        let end = e.end_for_gone_sandbox().expect("between envelopes");
        assert_eq!(end[0], 0x02);
        let len = u32::from_be_bytes([end[1], end[2], end[3], end[4]]) as usize;
        assert_eq!(len, end.len() - 5);
        let v: serde_json::Value = serde_json::from_slice(&end[5..]).unwrap();
        assert_eq!(v["error"]["code"], "unavailable");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("killed or reached its end of life"));
    }

    #[test]
    fn a_stream_cut_inside_an_envelope_or_after_its_end_is_left_alone() {
        let whole = envelope(0, b"0123456789");
        let mut e = connect_stream();
        e.pass(&whole[..3]);
        assert!(e.end_for_gone_sandbox().is_none(), "inside the prefix");
        e.pass(&whole[3..8]);
        assert!(e.end_for_gone_sandbox().is_none(), "inside the payload");
        e.pass(&whole[8..]);
        assert!(e.end_for_gone_sandbox().is_some());
        e.pass(&envelope(0x02, b"{}"));
        assert!(e.end_for_gone_sandbox().is_none(), "the stream had ended");
    }
}
