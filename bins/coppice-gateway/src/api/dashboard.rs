//! The operator's dashboard at `/dashboard`: one page, a script and a stylesheet, embedded in
//! the binary (no CDN, no build step). They hold no data: the page asks for the API key and
//! reads everything through the same API, with that key, so serving them needs none. Strict
//! headers keep the page to its own files: no inline script, no framing, no sniffing.

use http::{header, HeaderValue, Method, Response, StatusCode};

use super::{full, Body};

const INDEX: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/app.css");

/// Only the page's own files, from this origin; the API is this origin too.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// The dashboard's answer to `method path`, or `None` when the path is not one of its files.
pub(crate) fn serve(method: &Method, path: &str) -> Option<Response<Body>> {
    let (body, kind) = match path {
        "/dashboard" | "/dashboard/" | "/dashboard/index.html" => {
            (INDEX, "text/html; charset=utf-8")
        }
        "/dashboard/app.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        "/dashboard/app.css" => (STYLE, "text/css; charset=utf-8"),
        _ => return None,
    };
    if method != Method::GET && method != Method::HEAD {
        let mut resp = super::error::ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on {path}"),
        )
        .into_response();
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Some(resp);
    }
    let mut resp = Response::new(full(if method == Method::HEAD { "" } else { body }));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    Some(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_files_are_served_with_their_types_and_nothing_else() {
        let page = serve(&Method::GET, "/dashboard").unwrap();
        assert_eq!(page.status(), StatusCode::OK);
        assert_eq!(
            page.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        assert!(page.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .contains("script-src 'self'"));
        assert_eq!(
            serve(&Method::GET, "/dashboard/app.js").unwrap().headers()[header::CONTENT_TYPE],
            "text/javascript; charset=utf-8"
        );
        assert!(serve(&Method::GET, "/dashboard/app.css").is_some());
        assert!(serve(&Method::GET, "/dashboard/secrets").is_none());
        assert!(serve(&Method::GET, "/dashboards").is_none());
        assert_eq!(
            serve(&Method::POST, "/dashboard").unwrap().status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[test]
    fn the_page_loads_only_its_own_files_and_no_inline_script() {
        assert!(INDEX.contains(r#"<script type="module" src="/dashboard/app.js"></script>"#));
        assert!(INDEX.contains(r#"href="/dashboard/app.css""#));
        assert_eq!(INDEX.matches("<script").count(), 1);
        assert!(!INDEX.contains("http://") && !INDEX.contains("https://"));
        // Values from the API reach the page as text only.
        assert!(!SCRIPT.contains("innerHTML"));
    }
}
