//! Webhook signatures: E2B's `e2b-signature`, Standard Webhooks and Sandforge, each with the
//! verifier a receiver would run.
//!
//! Every scheme signs the raw body bytes exactly as sent; a receiver that re-serializes the
//! JSON before checking (as Sandforge's published example does) will fail on any body whose
//! bytes differ from its serializer's. [`headers`] produces the full header set for one
//! attempt.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ring::{digest, hmac};

/// Which payload and signature scheme a webhook receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Format {
    /// E2B's event body, `e2b-*` headers, plus the Standard Webhooks headers.
    #[default]
    E2b,
    /// Sandforge's `{"event","id","timestamp","data"}` body and `X-Sandforge-Signature`, plus
    /// the Standard Webhooks headers.
    Sandforge,
}

impl Format {
    /// The stored name: `e2b` or `sandforge`.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::E2b => "e2b",
            Format::Sandforge => "sandforge",
        }
    }

    /// Parses [`Format::as_str`]'s output.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "e2b" => Some(Format::E2b),
            "sandforge" => Some(Format::Sandforge),
            _ => None,
        }
    }
}

/// Why a signature did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The header is not in the scheme's syntax.
    #[error("malformed signature header")]
    Malformed,
    /// The signed timestamp is further from now than the tolerance (a possible replay).
    #[error("signature timestamp {timestamp} is outside the tolerance around {now}")]
    Stale {
        /// The signed time, Unix seconds.
        timestamp: i64,
        /// The verifier's time, Unix seconds.
        now: i64,
    },
    /// No signature in the header matches.
    #[error("signature mismatch")]
    Mismatch,
}

/// E2B v1: base64url without padding of SHA-256(secret's UTF-8 bytes ‖ raw body).
///
/// A plain hash, not an HMAC, and no timestamp: exactly what E2B's published JS/Python/Go
/// verifiers compute (`+`→`-`, `/`→`_`, `=` stripped).
pub fn e2b_signature(secret: &str, body: &[u8]) -> String {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(secret.as_bytes());
    ctx.update(body);
    URL_SAFE_NO_PAD.encode(ctx.finish().as_ref())
}

/// Checks an `e2b-signature` header value, in constant time.
pub fn verify_e2b(secret: &str, body: &[u8], signature: &str) -> Result<(), VerifyError> {
    if ct_eq(
        e2b_signature(secret, body).as_bytes(),
        signature.trim().as_bytes(),
    ) {
        Ok(())
    } else {
        Err(VerifyError::Mismatch)
    }
}

/// The HMAC key for Standard Webhooks: a `whsec_<base64>` secret is decoded as the spec says;
/// any other secret (E2B lets users pick any string) keys the HMAC with its UTF-8 bytes.
pub fn standard_key(secret: &str) -> Vec<u8> {
    secret
        .strip_prefix("whsec_")
        .and_then(|b64| STANDARD.decode(b64).ok())
        .unwrap_or_else(|| secret.as_bytes().to_vec())
}

/// Standard Webhooks v1: `v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>`.
pub fn standard_signature(secret: &str, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, &standard_key(secret));
    let tag = hmac::sign(&key, &standard_content(msg_id, timestamp, body));
    format!("v1,{}", STANDARD.encode(tag.as_ref()))
}

/// Verifies Standard Webhooks headers: the timestamp within `tolerance_secs` of `now` and any
/// `v1,` entry of the space-separated `webhook-signature` list matching.
pub fn verify_standard(
    secret: &str,
    msg_id: &str,
    timestamp: &str,
    signatures: &str,
    body: &[u8],
    now: i64,
    tolerance_secs: i64,
) -> Result<(), VerifyError> {
    let ts: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| VerifyError::Malformed)?;
    if (now - ts).abs() > tolerance_secs {
        return Err(VerifyError::Stale { timestamp: ts, now });
    }
    let key = hmac::Key::new(hmac::HMAC_SHA256, &standard_key(secret));
    let content = standard_content(msg_id, ts, body);
    let mut any = false;
    for entry in signatures.split(' ').filter(|s| !s.is_empty()) {
        let Some(b64) = entry.strip_prefix("v1,") else {
            continue;
        };
        any = true;
        if let Ok(tag) = STANDARD.decode(b64) {
            if hmac::verify(&key, &content, &tag).is_ok() {
                return Ok(());
            }
        }
    }
    Err(if any {
        VerifyError::Mismatch
    } else {
        VerifyError::Malformed
    })
}

fn standard_content(msg_id: &str, timestamp: i64, body: &[u8]) -> Vec<u8> {
    let mut content = format!("{msg_id}.{timestamp}.").into_bytes();
    content.extend_from_slice(body);
    content
}

/// Sandforge: `t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>`.
pub fn sandforge_signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let mut content = format!("{timestamp}.").into_bytes();
    content.extend_from_slice(body);
    format!(
        "t={timestamp},v1={}",
        hex(hmac::sign(&key, &content).as_ref())
    )
}

/// Verifies an `X-Sandforge-Signature` header: `t` within `tolerance_secs` (Sandforge's
/// example uses 300) and any `v1` matching.
pub fn verify_sandforge(
    secret: &str,
    header: &str,
    body: &[u8],
    now: i64,
    tolerance_secs: i64,
) -> Result<(), VerifyError> {
    let mut ts = None;
    let mut sigs = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => ts = Some(v.parse::<i64>().map_err(|_| VerifyError::Malformed)?),
            Some(("v1", v)) => sigs.push(v),
            _ => {}
        }
    }
    let ts = ts.ok_or(VerifyError::Malformed)?;
    if sigs.is_empty() {
        return Err(VerifyError::Malformed);
    }
    if (now - ts).abs() > tolerance_secs {
        return Err(VerifyError::Stale { timestamp: ts, now });
    }
    let expected = sandforge_signature(secret, ts, body);
    let expected = expected.rsplit_once("v1=").map_or("", |(_, h)| h);
    if sigs
        .iter()
        .any(|s| ct_eq(s.to_ascii_lowercase().as_bytes(), expected.as_bytes()))
    {
        Ok(())
    } else {
        Err(VerifyError::Mismatch)
    }
}

/// What one attempt needs signed.
#[derive(Debug, Clone, Copy)]
pub struct Attempt<'a> {
    /// The webhook's id (`e2b-webhook-id`).
    pub webhook_id: &'a str,
    /// This attempt's id, new per attempt (`e2b-delivery-id`).
    pub delivery_id: &'a str,
    /// The event's id: Standard Webhooks' `webhook-id`, stable across retries so receivers
    /// can deduplicate.
    pub event_id: &'a str,
    /// The attempt's time, Unix seconds.
    pub timestamp: i64,
    /// The exact body bytes.
    pub body: &'a [u8],
    /// The webhook's secret.
    pub secret: &'a str,
}

/// Every header one attempt carries besides `content-type`, as (lowercase name, value).
pub fn headers(format: Format, a: &Attempt<'_>) -> Vec<(&'static str, String)> {
    let mut h = Vec::with_capacity(7);
    match format {
        Format::E2b => {
            h.push(("e2b-webhook-id", a.webhook_id.to_owned()));
            h.push(("e2b-delivery-id", a.delivery_id.to_owned()));
            h.push(("e2b-signature-version", "v1".to_owned()));
            h.push(("e2b-signature", e2b_signature(a.secret, a.body)));
        }
        Format::Sandforge => {
            h.push((
                "x-sandforge-signature",
                sandforge_signature(a.secret, a.timestamp, a.body),
            ));
        }
    }
    h.push(("webhook-id", a.event_id.to_owned()));
    h.push(("webhook-timestamp", a.timestamp.to_string()));
    h.push((
        "webhook-signature",
        standard_signature(a.secret, a.event_id, a.timestamp, a.body),
    ));
    h
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// Equality that takes the same time wherever the inputs differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    // Fixtures computed independently with Python 3.11's standard library:
    //   import hashlib, hmac, base64
    //   body = b'{"id":"evt","type":"sandbox.lifecycle.created"}'
    //   base64.urlsafe_b64encode(hashlib.sha256(b"s3cr3t" + body).digest()).rstrip(b"=")
    //   base64.b64encode(hmac.new(base64.b64decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
    //       b"msg_p5jXN8AQM9LWM0D4loKWxJek.1614265330." + b'{"test": 2432232314}',
    //       "sha256").digest())
    //   hmac.new(b"sf_wh_secret_xyz123", b"1779435911." + body, "sha256").hexdigest()
    const BODY: &[u8] = br#"{"id":"evt","type":"sandbox.lifecycle.created"}"#;
    const E2B_SIG: &str = "8Tl8dxb6Asr8VCuUM6CwPjTncGGH3dIpY9mv2roz1Qc";
    const SF_SIG: &str = "619b3b3584a5417a2e5f51d71b9b0b41e3acddfcceaee57aaa4f06f18d0e3b36";
    // The Standard Webhooks spec's own example (secret, id, timestamp, body, signature).
    const SW_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SW_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SW_TS: i64 = 1_614_265_330;
    const SW_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SW_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn e2b_signature_matches_the_published_verifier() {
        assert_eq!(e2b_signature("s3cr3t", BODY), E2B_SIG);
        assert_eq!(verify_e2b("s3cr3t", BODY, E2B_SIG), Ok(()));
        assert_eq!(
            verify_e2b("other", BODY, E2B_SIG),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            verify_e2b("s3cr3t", b"{}", E2B_SIG),
            Err(VerifyError::Mismatch)
        );
        // base64url, no padding: never '+', '/' or '='.
        for i in 0..64 {
            let s = e2b_signature(&format!("k{i}"), BODY);
            assert!(!s.contains(['+', '/', '=']), "{s}");
            assert_eq!(s.len(), 43);
        }
    }

    #[test]
    fn standard_webhooks_matches_the_spec_example() {
        assert_eq!(standard_signature(SW_SECRET, SW_ID, SW_TS, SW_BODY), SW_SIG);
        assert_eq!(
            verify_standard(
                SW_SECRET,
                SW_ID,
                "1614265330",
                SW_SIG,
                SW_BODY,
                SW_TS + 10,
                300
            ),
            Ok(())
        );
        // One good entry in a rotation list is enough.
        let list = format!("v1,AAAA v1a,xyz {SW_SIG}");
        assert_eq!(
            verify_standard(SW_SECRET, SW_ID, "1614265330", &list, SW_BODY, SW_TS, 300),
            Ok(())
        );
        assert_eq!(
            verify_standard(
                SW_SECRET,
                "msg_other",
                "1614265330",
                SW_SIG,
                SW_BODY,
                SW_TS,
                300
            ),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            verify_standard(
                SW_SECRET,
                SW_ID,
                "1614265330",
                SW_SIG,
                SW_BODY,
                SW_TS + 301,
                300
            ),
            Err(VerifyError::Stale {
                timestamp: SW_TS,
                now: SW_TS + 301
            })
        );
        assert_eq!(
            verify_standard(SW_SECRET, SW_ID, "soon", SW_SIG, SW_BODY, SW_TS, 300),
            Err(VerifyError::Malformed)
        );
        // A secret without the prefix keys the HMAC with its raw bytes.
        assert_eq!(standard_key("plain"), b"plain");
        assert_eq!(standard_key("whsec_AAEC"), [0, 1, 2]);
    }

    #[test]
    fn sandforge_signature_is_stripe_style() {
        let header = sandforge_signature("sf_wh_secret_xyz123", 1_779_435_911, BODY);
        assert_eq!(header, format!("t=1779435911,v1={SF_SIG}"));
        assert_eq!(
            verify_sandforge("sf_wh_secret_xyz123", &header, BODY, 1_779_435_911, 300),
            Ok(())
        );
        assert_eq!(
            verify_sandforge("wrong", &header, BODY, 1_779_435_911, 300),
            Err(VerifyError::Mismatch)
        );
        assert!(matches!(
            verify_sandforge("sf_wh_secret_xyz123", &header, BODY, 1_779_436_212, 300),
            Err(VerifyError::Stale { .. })
        ));
        assert_eq!(
            verify_sandforge("sf_wh_secret_xyz123", "v1=abc", BODY, 0, 300),
            Err(VerifyError::Malformed)
        );
    }

    #[test]
    fn headers_per_format() {
        let a = Attempt {
            webhook_id: "wh1",
            delivery_id: "d1",
            event_id: "ev1",
            timestamp: 1_779_435_911,
            body: BODY,
            secret: "sf_wh_secret_xyz123",
        };
        let e2b = headers(Format::E2b, &a);
        let get =
            |h: &[(&str, String)], k: &str| h.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
        assert_eq!(get(&e2b, "e2b-webhook-id").as_deref(), Some("wh1"));
        assert_eq!(get(&e2b, "e2b-delivery-id").as_deref(), Some("d1"));
        assert_eq!(get(&e2b, "e2b-signature-version").as_deref(), Some("v1"));
        assert_eq!(get(&e2b, "webhook-id").as_deref(), Some("ev1"));
        assert_eq!(get(&e2b, "x-sandforge-signature"), None);
        let sig = get(&e2b, "e2b-signature").unwrap();
        assert_eq!(verify_e2b(a.secret, BODY, &sig), Ok(()));
        let sw = get(&e2b, "webhook-signature").unwrap();
        assert_eq!(
            verify_standard(a.secret, "ev1", "1779435911", &sw, BODY, a.timestamp, 300),
            Ok(())
        );
        let sf = headers(Format::Sandforge, &a);
        assert_eq!(
            get(&sf, "x-sandforge-signature").as_deref(),
            Some(format!("t=1779435911,v1={SF_SIG}").as_str())
        );
        assert_eq!(get(&sf, "e2b-signature"), None);
        for f in [Format::E2b, Format::Sandforge] {
            assert_eq!(Format::parse(f.as_str()), Some(f));
        }
        assert_eq!(Format::parse("svix"), None);
    }
}
