//! Signed file URLs that name no sandbox.
//!
//! E2B's SDKs build `download_url`/`upload_url` on the sandbox's envd address. When that is
//! one address for every sandbox (`E2B_SANDBOX_URL`, which the README sets to the gateway),
//! the URL is `/files?path=…&username=…&signature=…` with neither `E2b-Sandbox-Id` nor a
//! `<port>-<id>` host: a browser or `curl` fetching it sends nothing else. The signature is
//! a hash over the sandbox's access token, so it names the sandbox: the one whose token gives
//! this signature for this path, user and operation. The agent then checks the signature
//! again (and its expiry) as it does for any signed request.
//!
//! Every sandbox here has an access token, so the SDKs sign every file URL; a `/files`
//! request without a signature or a sandbox is the control plane's 404.

use coppice_envd::file_url_signature;
use coppice_lifecycle::state::SandboxState;
use coppice_wire::query::pairs;
use http::{Method, Request, StatusCode};

use crate::api::error::ApiError;
use crate::api::proxy::Target;
use crate::service::constant_time_eq;
use crate::Gateway;

/// envd's port, where `/files` is served.
const ENVD_PORT: u16 = 49983;

/// The sandbox a signed `/files` URL is for, if the request is one: the live sandbox whose
/// access token signs it, or envd's 401 when none does (as the agent of the sandbox it was
/// meant for would answer a wrong signature).
pub(crate) fn target<B>(gw: &Gateway, req: &Request<B>) -> Option<Result<Target, ApiError>> {
    if req.uri().path() != "/files" {
        return None;
    }
    let operation = match *req.method() {
        Method::GET => "read",
        Method::POST => "write",
        _ => return None,
    };
    let query = pairs(req.uri().query()?).ok()?;
    let get = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let signature = get("signature")?;
    let path = get("path").unwrap_or_default();
    let username = get("username").unwrap_or_default();
    let unauthorized = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized access, please provide a valid access token or method signing if supported",
        )
    };
    let expiration = match get("signature_expiration").map(str::parse::<u64>) {
        Some(Ok(exp)) => Some(exp),
        Some(Err(_)) => return Some(Err(ApiError::bad_request("invalid signature_expiration"))),
        None => None,
    };
    let found = gw.entries().into_iter().find_map(|entry| {
        let record = entry.record();
        if record.access_token.is_empty() || record.lifecycle.state == SandboxState::Killed {
            return None;
        }
        let want = file_url_signature(path, operation, username, &record.access_token, expiration);
        constant_time_eq(want.as_bytes(), signature.as_bytes()).then(|| Target {
            id: record.id.to_string(),
            port: ENVD_PORT,
        })
    });
    Some(found.ok_or_else(unauthorized))
}
