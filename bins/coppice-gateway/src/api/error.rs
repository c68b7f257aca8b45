//! The one mapping from failures to HTTP statuses and E2B's `{code, message}` body.

use coppice_events::store::StoreError;
use coppice_lifecycle::backend::BackendError;
use coppice_lifecycle::state::TransitionError;
use coppice_wire::error::ErrorBody;
use http::{Response, StatusCode};

use crate::admission::AdmissionError;
use crate::adoption::Adopting;
use crate::api::{json, Body};
use crate::builds::BuildsError;
use crate::registry::RegistryError;
use crate::runtime::RuntimeError;

/// A request that failed: status and message for E2B's error body.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
    /// Seconds for a `Retry-After` header: the failure is expected to pass by itself.
    pub(crate) retry_after: Option<u64>,
    /// E2B's machine-readable `error_code`, where it defines one.
    pub(crate) error_code: Option<&'static str>,
}

impl ApiError {
    /// An error with `status`.
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
            error_code: None,
        }
    }

    /// The same error with E2B's `error_code`.
    pub(crate) fn with_code(self, code: &'static str) -> Self {
        Self {
            error_code: Some(code),
            ..self
        }
    }

    /// 400.
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 404 for a sandbox.
    pub(crate) fn sandbox_not_found(id: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, format!("sandbox {id:?} not found"))
    }

    /// The response.
    pub(crate) fn into_response(self) -> Response<Body> {
        // An answer that tells the client when to retry is the gateway working as meant.
        if self.status.is_server_error() && self.retry_after.is_none() {
            tracing::error!(status = %self.status, message = %self.message, "request failed");
        }
        let mut body = ErrorBody::new(self.status.as_u16(), self.message);
        body.error_code = self.error_code.map(str::to_owned);
        let mut resp = json(self.status, &body);
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
        }
        resp
    }
}

impl From<Adopting> for ApiError {
    fn from(e: Adopting) -> Self {
        // Re-adoption takes seconds even with thousands of sandboxes.
        Self {
            retry_after: Some(1),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
    }
}

impl From<AdmissionError> for ApiError {
    fn from(e: AdmissionError) -> Self {
        // E2B's status for "not now": the SDKs retry it after Retry-After, then raise
        // RateLimitException with the message.
        Self {
            retry_after: Some(crate::admission::RETRY_AFTER.as_secs()),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, e.to_string())
        }
    }
}

impl From<TransitionError> for ApiError {
    fn from(e: TransitionError) -> Self {
        let status = match e {
            TransitionError::AlreadyPaused | TransitionError::AlreadyRunning => {
                StatusCode::CONFLICT
            }
            TransitionError::Killed => StatusCode::NOT_FOUND,
            TransitionError::AutoResumeNeedsPause => StatusCode::BAD_REQUEST,
            _ => StatusCode::CONFLICT,
        };
        Self::new(status, e.to_string())
    }
}

impl From<RuntimeError> for ApiError {
    fn from(e: RuntimeError) -> Self {
        let status = match &e {
            RuntimeError::UnknownTemplate(_) => StatusCode::NOT_FOUND,
            RuntimeError::Backend {
                source: BackendError::InvalidSpec { .. },
                ..
            } => StatusCode::BAD_REQUEST,
            RuntimeError::Backend {
                source: BackendError::NotFound { .. },
                ..
            } => StatusCode::NOT_FOUND,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, error_chain(&e))
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let status = match &e {
            StoreError::Invalid { .. } => StatusCode::BAD_REQUEST,
            StoreError::NotFound { .. } => StatusCode::NOT_FOUND,
            StoreError::Duplicate { .. } => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, error_chain(&e))
    }
}

impl From<BuildsError> for ApiError {
    fn from(e: BuildsError) -> Self {
        let status = match &e {
            BuildsError::Invalid(_) => StatusCode::BAD_REQUEST,
            BuildsError::NotFound(_) => StatusCode::NOT_FOUND,
            BuildsError::Conflict(_) => StatusCode::CONFLICT,
            BuildsError::BuiltIn(_) => StatusCode::FORBIDDEN,
            BuildsError::Store(_) | BuildsError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, error_chain(&e))
    }
}

impl From<crate::builds::store::StoreError> for ApiError {
    fn from(e: crate::builds::store::StoreError) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, error_chain(&e))
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, error_chain(&e))
    }
}

/// "op: cause: cause" — the whole chain, since our messages never repeat their source.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflicts_and_not_found_follow_e2b() {
        assert_eq!(
            ApiError::from(TransitionError::AlreadyPaused).status,
            StatusCode::CONFLICT
        );
        assert_eq!(
            ApiError::from(TransitionError::Killed).status,
            StatusCode::NOT_FOUND
        );
        let e = ApiError::from(RuntimeError::UnknownTemplate("nope".into()));
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert_eq!(e.message, "template \"nope\" not found");
    }

    #[test]
    fn backend_causes_are_kept_in_the_message() {
        let e = ApiError::from(RuntimeError::Backend {
            op: "start the sandbox",
            source: BackendError::io(
                "mount",
                "/x",
                std::io::Error::from_raw_os_error(libc_eperm()),
            ),
        });
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(
            e.message.starts_with("start the sandbox: mount /x: "),
            "{}",
            e.message
        );
    }

    #[test]
    fn re_adoption_is_a_503_with_retry_after() {
        let resp = ApiError::from(Adopting {
            adopted: 1,
            total: 4,
        })
        .into_response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[http::header::RETRY_AFTER], "1");
        assert_eq!(
            resp.headers()[http::header::CONTENT_TYPE],
            "application/json"
        );
        let body = body_json(resp);
        assert_eq!(body["code"], 503);
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.contains("re-adopting its sandboxes after a restart")),
            "{body}"
        );
    }

    fn body_json(resp: Response<Body>) -> serde_json::Value {
        use http_body_util::BodyExt;
        let bytes = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(resp.into_body().collect())
            .unwrap()
            .to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn refused_creates_are_429_with_retry_after() {
        let resp = ApiError::from(AdmissionError::SandboxLimit {
            used: 3,
            max: 3,
            warm: 0,
        })
        .into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[http::header::RETRY_AFTER], "1");
    }

    fn libc_eperm() -> i32 {
        1
    }
}
