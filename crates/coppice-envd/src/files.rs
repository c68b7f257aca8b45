//! `GET /files` and `POST /files`: raw file download and upload (spec §3.2).
//!
//! Downloads stream the file (with `Range`, or gzip when the client accepts it). Uploads
//! stream each file to disk as it arrives, from a multipart body (one part per file, the
//! part's filename being the destination) or a raw `application/octet-stream` body
//! (optionally gzip-encoded). Every step that touches the filesystem runs with the
//! requesting user's credentials (`crate::creds`), so what the user may not read or write is
//! refused with 403 and what it creates is its own. `X-Metadata-*` headers replace each
//! written file's metadata (`crate::xattr`) before its old content is dropped.

use std::collections::HashMap;
use std::io::{self, Write as _};
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::{Buf as _, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::Body as HttpBody;
use http_body_util::BodyExt as _;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;

use crate::creds::Creds;
use crate::reply::{self, Body};
use crate::secret::constant_time_eq;
use crate::state::AgentState;
use crate::users::{self, User};
use crate::xattr::{self, Metadata, XattrError};

/// Download chunk size.
const CHUNK: usize = 64 * 1024;
/// Largest header block of one multipart part.
const MAX_PART_HEADERS: usize = 16 * 1024;

/// A failed `/files` request: an HTTP status and E2B's `{code, message}`.
#[derive(Debug)]
pub(crate) struct FileError {
    status: StatusCode,
    message: String,
}

impl FileError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// Maps an I/O error on `path` to envd's statuses.
    fn io(path: &Path, e: &io::Error) -> Self {
        let p = path.display();
        match e.raw_os_error() {
            Some(libc::ENOENT) => {
                Self::new(StatusCode::NOT_FOUND, format!("path '{p}' does not exist"))
            }
            Some(libc::EISDIR) => Self::bad(format!("path '{p}' is a directory")),
            Some(libc::EACCES | libc::EPERM) => Self::new(
                StatusCode::FORBIDDEN,
                format!("error accessing '{p}': permission denied"),
            ),
            Some(libc::ENOTDIR) => Self::bad(format!("a parent of path '{p}' is not a directory")),
            Some(libc::ENOSPC | libc::EDQUOT) => Self::new(
                StatusCode::INSUFFICIENT_STORAGE,
                format!("not enough disk space to write '{p}'"),
            ),
            _ => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("error accessing '{p}': {e}"),
            ),
        }
    }

    /// Maps a failure to store metadata on `path`.
    fn metadata(path: &Path, e: &XattrError) -> Self {
        let p = path.display();
        let source = match e {
            XattrError::Unsupported => {
                return Self::bad(format!(
                    "cannot store metadata on '{p}': the filesystem does not support user extended attributes"
                ))
            }
            XattrError::Io { source, .. } => source,
        };
        match source.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT) => Self::new(
                StatusCode::INSUFFICIENT_STORAGE,
                format!("not enough space for the metadata of '{p}'"),
            ),
            Some(libc::E2BIG | libc::ERANGE) => Self::bad(format!(
                "the metadata does not fit in the extended attributes of '{p}'"
            )),
            _ => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("error storing metadata of '{p}': {e}: {source}"),
            ),
        }
    }

    fn into_response(self) -> Response<Body> {
        reply::error(self.status, self.message)
    }
}

impl From<io::Error> for FileError {
    /// A failure outside any one path: switching credentials, or the blocking pool.
    fn from(e: io::Error) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("file operation failed: {e}"),
        )
    }
}

/// Decodes a query string into its last value per key (`+` is a space).
pub(crate) fn query(uri: &http::Uri) -> HashMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The `signature` query parameter of a file URL that E2B's SDKs sign for a sandbox with an
/// access token (`download_url`/`upload_url`): `v1_` and the unpadded base64 of
/// SHA-256(`path:operation:username:token[:expiration]`), where `operation` is `read` for a
/// download and `write` for an upload and `expiration` is in Unix seconds.
pub fn file_url_signature(
    path: &str,
    operation: &str,
    username: &str,
    token: &str,
    expiration: Option<u64>,
) -> String {
    let mut material = format!("{path}:{operation}:{username}:{token}");
    if let Some(exp) = expiration {
        material.push_str(&format!(":{exp}"));
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, material.as_bytes());
    format!(
        "v1_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest.as_ref())
    )
}

/// Checks `X-Access-Token`, else the `signature` query (spec §3.1), then resolves the user.
fn authorize(
    state: &AgentState,
    headers: &HeaderMap,
    q: &HashMap<String, String>,
    op: &str,
) -> Result<User, FileError> {
    let username = q.get("username").map_or("", String::as_str);
    if let Some(token) = state.token() {
        let unauthorized = || {
            FileError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized access, please provide a valid access token or method signing if supported",
            )
        };
        match headers.get("x-access-token").and_then(|v| v.to_str().ok()) {
            Some(got) => {
                if !constant_time_eq(got.as_bytes(), token.as_bytes()) {
                    return Err(unauthorized());
                }
            }
            None => {
                let sig = q.get("signature").ok_or_else(unauthorized)?;
                let path = q.get("path").map_or("", String::as_str);
                let expiration = q.get("signature_expiration");
                let expiration = expiration
                    .map(|exp| {
                        let exp: u64 = exp
                            .parse()
                            .map_err(|_| FileError::bad("invalid signature_expiration"))?;
                        let now = SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .map(|d| d.as_secs())
                            .unwrap_or(0);
                        if exp < now {
                            return Err(FileError::new(
                                StatusCode::UNAUTHORIZED,
                                "signature is already expired",
                            ));
                        }
                        Ok(exp)
                    })
                    .transpose()?;
                let want = file_url_signature(path, op, username, &token, expiration);
                if !constant_time_eq(sig.as_bytes(), want.as_bytes()) {
                    return Err(unauthorized());
                }
            }
        }
    }
    users::named_or_default(state, username)
        .map_err(|e| FileError::new(StatusCode::UNAUTHORIZED, e.message))
}

// ---- Download. ----

/// `GET /files?path=&username=`.
pub(crate) async fn get<B>(state: Arc<AgentState>, req: Request<B>) -> Response<Body> {
    download(&state, &req)
        .await
        .unwrap_or_else(FileError::into_response)
}

async fn download<B>(state: &AgentState, req: &Request<B>) -> Result<Response<Body>, FileError> {
    let q = query(req.uri());
    let user = authorize(state, req.headers(), &q, "read")?;
    let raw = q.get("path").map_or("", String::as_str);
    if raw.is_empty() {
        return Err(FileError::bad("path is required"));
    }
    let path = users::resolve_path(raw, &user);
    let opened = path.clone();
    let (file, size) = Creds::of(state, &user)
        .blocking(move || open_for_download(&opened))
        .await?;
    let mut file = tokio::fs::File::from_std(file);

    let range = match req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
    {
        None => None,
        Some(r) => match parse_range(r, size) {
            RangeSpec::Ignore => None,
            RangeSpec::Unsatisfiable => {
                let mut resp = reply::error(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    format!("range '{r}' is not satisfiable for a file of {size} bytes"),
                );
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    resp.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                return Ok(resp);
            }
            RangeSpec::Range(a, b) => Some((a, b)),
        },
    };

    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let gzip = range.is_none() && accepts_gzip(req.headers());
    let (start, len) = range.map_or((0, size), |(a, b)| (a, b - a + 1));
    if start > 0 {
        file.seek(io::SeekFrom::Start(start))
            .await
            .map_err(|e| FileError::io(&path, &e))?;
    }
    let body = if gzip {
        gzip_body(file.into_std().await, len)
    } else {
        plain_body(file, len)
    };
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(&name)),
    );
    if let Ok(v) = HeaderValue::from_str(&format!(
        "inline; filename=\"{}\"",
        name.replace('\\', "\\\\").replace('"', "\\\"")
    )) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if gzip {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        h.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    } else {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    if let Some((a, b)) = range {
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {a}-{b}/{size}")) {
            resp.headers_mut().insert(header::CONTENT_RANGE, v);
        }
    }
    Ok(resp)
}

/// Opens `path` for reading (with the caller's credentials in force) and returns it with
/// its size; a directory is refused, and a FIFO does not block the open.
fn open_for_download(path: &Path) -> Result<(std::fs::File, u64), FileError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| FileError::io(path, &e))?;
    // The checks are on the open file, not on the path again, so what is checked is what
    // is read.
    let meta = file.metadata().map_err(|e| FileError::io(path, &e))?;
    if meta.is_dir() {
        return Err(FileError::bad(format!(
            "path '{}' is a directory",
            path.display()
        )));
    }
    let flags = nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)
        .map_err(|e| FileError::io(path, &e.into()))?;
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) & !nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))
        .map_err(|e| FileError::io(path, &e.into()))?;
    Ok((file, meta.len()))
}

#[derive(Debug, PartialEq, Eq)]
enum RangeSpec {
    /// Not a single byte range we serve: answer with the whole file (RFC 9110 allows it).
    Ignore,
    Unsatisfiable,
    /// Inclusive first and last byte.
    Range(u64, u64),
}

fn parse_range(header: &str, size: u64) -> RangeSpec {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return RangeSpec::Ignore;
    };
    if spec.contains(',') {
        return RangeSpec::Ignore;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeSpec::Ignore;
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        // Suffix: the last N bytes.
        let Ok(n) = b.parse::<u64>() else {
            return RangeSpec::Ignore;
        };
        if n == 0 || size == 0 {
            return RangeSpec::Unsatisfiable;
        }
        return RangeSpec::Range(size.saturating_sub(n), size - 1);
    }
    let Ok(first) = a.parse::<u64>() else {
        return RangeSpec::Ignore;
    };
    let last = if b.is_empty() {
        size.saturating_sub(1)
    } else {
        match b.parse::<u64>() {
            Ok(l) if l >= first => l.min(size.saturating_sub(1)),
            _ => return RangeSpec::Ignore,
        }
    };
    if first >= size {
        return RangeSpec::Unsatisfiable;
    }
    RangeSpec::Range(first, last)
}

fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim();
            let zero_q = parts.any(|p| {
                let p = p.trim();
                p == "q=0" || p == "q=0.0" || p == "q=0.00" || p == "q=0.000"
            });
            coding.eq_ignore_ascii_case("gzip") && !zero_q
        })
}

/// Content types by extension, as Go's `mime` package knows them.
fn content_type(name: &str) -> &'static str {
    let ext = name
        .rsplit_once('.')
        .map_or("", |(_, e)| e)
        .to_ascii_lowercase();
    match ext.as_str() {
        "txt" => "text/plain; charset=utf-8",
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" => "application/json",
        "xml" => "text/xml; charset=utf-8",
        "csv" => "text/csv; charset=utf-8",
        "md" => "text/markdown; charset=utf-8",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "svg" => "image/svg+xml",
        "webp" => "image/webp",
        "pdf" => "application/pdf",
        "wasm" => "application/wasm",
        "zip" => "application/zip",
        "gz" => "application/gzip",
        _ => "application/octet-stream",
    }
}

fn plain_body(mut file: tokio::fs::File, mut remaining: u64) -> Body {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        while remaining > 0 {
            let want = usize::try_from(remaining.min(CHUNK as u64)).unwrap_or(CHUNK);
            match file.read(&mut buf[..want]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    remaining -= n as u64;
                    if tx.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    reply::channel_body(rx)
}

/// A writer that sends what it is given down a channel (from a blocking thread).
struct ChannelWriter(mpsc::Sender<Bytes>);

impl io::Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .blocking_send(Bytes::copy_from_slice(buf))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "client went away"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn gzip_body(file: std::fs::File, len: u64) -> Body {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    tokio::task::spawn_blocking(move || {
        let mut enc = flate2::write::GzEncoder::new(
            io::BufWriter::with_capacity(CHUNK, ChannelWriter(tx)),
            flate2::Compression::fast(),
        );
        let mut reader = io::Read::take(file, len);
        // A client that goes away ends the copy; nothing to report to anyone.
        if io::copy(&mut reader, &mut enc).is_ok() {
            if let Ok(mut w) = enc.finish() {
                let _ = w.flush();
            }
        }
    });
    reply::channel_body(rx)
}

// ---- Upload. ----

/// `POST /files?path=&username=`, multipart or octet-stream.
pub(crate) async fn post<B>(state: Arc<AgentState>, req: Request<B>) -> Response<Body>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    match upload(&state, req).await {
        Ok(written) => reply::json(StatusCode::OK, &json!(written)),
        Err(e) => e.into_response(),
    }
}

/// Bytes a multipart upload may carry after its closing boundary (RFC 2046's epilogue).
const MAX_EPILOGUE: usize = 64 * 1024;

async fn upload<B>(state: &AgentState, req: Request<B>) -> Result<Vec<serde_json::Value>, FileError>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let q = query(req.uri());
    let user = authorize(state, req.headers(), &q, "write")?;
    let creds = Creds::of(state, &user);
    // Checked before any byte of the body is read, so a refused set writes nothing.
    let meta = xattr::from_headers(req.headers())
        .map_err(|e| FileError::bad(format!("invalid metadata: {e}")))?;
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let gzipped = req
        .headers()
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("gzip"));
    let query_path = q.get("path").filter(|p| !p.is_empty()).cloned();
    let mut body = req.into_body();
    match essence.as_str() {
        "application/octet-stream" => {
            let Some(raw) = query_path else {
                return Err(FileError::bad(
                    "path is required for application/octet-stream uploads",
                ));
            };
            let path = users::resolve_path(&raw, &user);
            let mut sink = FileSink::create(&path, &creds, gzipped, &meta).await?;
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| FileError::bad(format!("reading body: {e}")))?;
                if let Ok(data) = frame.into_data() {
                    sink.write(&data).await?;
                }
            }
            sink.finish().await?;
            Ok(vec![written(&path, &creds)?])
        }
        "multipart/form-data" => {
            let boundary = ct
                .split(';')
                .skip(1)
                .filter_map(|p| p.trim().split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
                .map(|(_, v)| v.trim().trim_matches('"').to_owned())
                .filter(|b| !b.is_empty() && b.len() <= 200)
                .ok_or_else(|| FileError::bad("multipart body without a boundary"))?;
            let mut parser = Multipart::new(&boundary);
            let mut out = Vec::new();
            let mut current: Option<(PathBuf, FileSink)> = None;
            let mut eof = false;
            loop {
                match parser.next().map_err(FileError::bad)? {
                    Some(Part::Start { name, filename }) => {
                        if name != "file" {
                            current = None;
                            parser.skip_part();
                            continue;
                        }
                        let raw = match (&query_path, out.is_empty()) {
                            (Some(p), true) => p.clone(),
                            _ => filename.ok_or_else(|| {
                                FileError::bad("multipart file part without a filename")
                            })?,
                        };
                        if raw.is_empty() {
                            return Err(FileError::bad("multipart file part without a filename"));
                        }
                        let path = users::resolve_path(&raw, &user);
                        let sink = FileSink::create(&path, &creds, false, &meta).await?;
                        current = Some((path, sink));
                    }
                    Some(Part::Data(d)) => {
                        if let Some((_, sink)) = current.as_mut() {
                            sink.write(&d).await?;
                        }
                    }
                    Some(Part::End) => {
                        if let Some((path, sink)) = current.take() {
                            sink.finish().await?;
                            out.push(written(&path, &creds)?);
                        }
                    }
                    Some(Part::Done) => break,
                    None if eof => {
                        return Err(FileError::bad(
                            "multipart body ended before its closing boundary",
                        ))
                    }
                    None => match body.frame().await {
                        None => eof = true,
                        Some(Err(e)) => return Err(FileError::bad(format!("reading body: {e}"))),
                        Some(Ok(frame)) => {
                            if let Ok(d) = frame.into_data() {
                                parser.push(&d);
                            }
                        }
                    },
                }
            }
            if out.is_empty() {
                return Err(FileError::bad("multipart body has no file part"));
            }
            // Read what follows the closing boundary (its CRLF, the chunked body's end)
            // before answering: an answer sent while the client still writes makes the
            // connection close under it, and the gateway then reports a 502 for an upload
            // that succeeded. The epilogue carries nothing, so it is bounded.
            if !eof {
                let mut epilogue = 0usize;
                while let Some(frame) = body.frame().await {
                    let frame = frame.map_err(|e| FileError::bad(format!("reading body: {e}")))?;
                    if let Ok(d) = frame.into_data() {
                        epilogue += d.len();
                        if epilogue > MAX_EPILOGUE {
                            return Err(FileError::bad(
                                "multipart body goes on past its closing boundary",
                            ));
                        }
                    }
                }
            }
            Ok(out)
        }
        _ => Err(FileError::bad(format!(
            "unsupported content type '{ct}', want multipart/form-data or application/octet-stream"
        ))),
    }
}

/// One entry of the upload answer; `metadata` is read back from the file (as envd does, and
/// as the uploading user), so it shows what was stored, and is left out when there is none.
fn written(path: &Path, creds: &Creds) -> Result<serde_json::Value, FileError> {
    let meta = creds.run(|| xattr::read(path))?;
    let mut entry = json!({
        "path": path.to_string_lossy(),
        "name": path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        "type": "file",
    });
    if !meta.is_empty() {
        entry["metadata"] = json!(meta);
    }
    Ok(entry)
}

/// Creates the missing directories above `path` (owned by whoever the calling thread's
/// credentials say, `crate::creds`).
pub(crate) fn ensure_parents(path: &Path) -> io::Result<()> {
    let Some(parent) = path.parent() else {
        return Ok(());
    };
    ensure_dir(parent)
}

/// Creates `dir` and its missing ancestors.
pub(crate) fn ensure_dir(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur {
        match std::fs::symlink_metadata(d) {
            Ok(m) if m.is_dir() => break,
            Ok(m) if m.file_type().is_symlink() && d.is_dir() => break,
            Ok(_) => return Err(io::Error::from_raw_os_error(libc::ENOTDIR)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push(d.to_path_buf()),
            Err(e) => return Err(e),
        }
        cur = d.parent();
    }
    for d in missing.iter().rev() {
        match std::fs::DirBuilder::new().mode(0o755).create(d) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One file being written by an upload.
struct FileSink {
    path: PathBuf,
    file: tokio::fs::File,
    gunzip: Option<flate2::write::GzDecoder<Vec<u8>>>,
}

impl FileSink {
    /// Opens `path` for a new upload: creates it (and its parents) for `user`, replaces
    /// its metadata with `meta`, and only then truncates it.
    ///
    /// Metadata goes first so that a set the filesystem refuses leaves an existing file
    /// untouched and removes one this call created.
    async fn create(
        path: &Path,
        creds: &Creds,
        gzipped: bool,
        meta: &Metadata,
    ) -> Result<Self, FileError> {
        let (opened, meta) = (path.to_path_buf(), meta.clone());
        let std_file = creds.blocking(move || Self::open(&opened, &meta)).await?;
        Ok(Self {
            path: path.to_path_buf(),
            file: tokio::fs::File::from_std(std_file),
            gunzip: gzipped.then(|| flate2::write::GzDecoder::new(Vec::new())),
        })
    }

    /// The synchronous part of [`FileSink::create`], with the user's credentials in force.
    fn open(path: &Path, meta: &Metadata) -> Result<std::fs::File, FileError> {
        if path.is_dir() {
            return Err(FileError::bad(format!(
                "path '{}' is a directory",
                path.display()
            )));
        }
        ensure_parents(path).map_err(|e| FileError::io(path, &e))?;
        let mut open = std::fs::OpenOptions::new();
        open.write(true).mode(0o644);
        let (std_file, created) = match open.clone().create_new(true).open(path) {
            Ok(f) => (f, true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => (
                open.create(true)
                    .open(path)
                    .map_err(|e| FileError::io(path, &e))?,
                false,
            ),
            Err(e) => return Err(FileError::io(path, &e)),
        };
        // E2B's envd writes as root and then chowns the file to the user, so a watcher sees
        // an attribute change (`chmod`) with every write: SDK code counts on three events for
        // a new file. The file is already the user's here; handing it to its own owner again
        // changes nothing but tells watchers what E2B's would.
        let prepared = xattr::replace(std_file.as_fd(), meta)
            .map_err(|e| FileError::metadata(path, &e))
            .and_then(|()| {
                let owner = std_file.metadata().map_err(|e| FileError::io(path, &e))?;
                std::os::unix::fs::fchown(
                    &std_file,
                    Some(std::os::unix::fs::MetadataExt::uid(&owner)),
                    Some(std::os::unix::fs::MetadataExt::gid(&owner)),
                )
                .map_err(|e| FileError::io(path, &e))
            });
        if let Err(e) = prepared {
            if created {
                // Nothing of this upload may stay behind; a failed removal changes nothing
                // for the client, who gets the original error.
                let _ = std::fs::remove_file(path);
            }
            return Err(e);
        }
        // What `O_TRUNC` would have done at open; devices and FIFOs are not truncated
        // (and `ftruncate` would fail on them).
        let is_file = std_file
            .metadata()
            .map_err(|e| FileError::io(path, &e))?
            .is_file();
        if is_file && !created {
            std_file.set_len(0).map_err(|e| FileError::io(path, &e))?;
        }
        Ok(std_file)
    }

    async fn write(&mut self, data: &[u8]) -> Result<(), FileError> {
        let plain = match self.gunzip.as_mut() {
            Some(dec) => {
                dec.write_all(data)
                    .map_err(|e| FileError::bad(format!("invalid gzip body: {e}")))?;
                std::mem::take(dec.get_mut())
            }
            None => data.to_vec(),
        };
        self.file
            .write_all(&plain)
            .await
            .map_err(|e| FileError::io(&self.path, &e))
    }

    async fn finish(mut self) -> Result<(), FileError> {
        if let Some(dec) = self.gunzip.take() {
            let rest = dec
                .finish()
                .map_err(|e| FileError::bad(format!("invalid gzip body: {e}")))?;
            self.file
                .write_all(&rest)
                .await
                .map_err(|e| FileError::io(&self.path, &e))?;
        }
        self.file
            .flush()
            .await
            .map_err(|e| FileError::io(&self.path, &e))
    }
}

/// Events of the streaming multipart parser.
#[derive(Debug, PartialEq, Eq)]
enum Part {
    Start {
        name: String,
        filename: Option<String>,
    },
    Data(Bytes),
    End,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MpState {
    Preamble,
    AfterDelimiter,
    Headers,
    Body,
    Done,
}

/// A streaming `multipart/form-data` parser: push bytes, pull events.
#[derive(Debug)]
struct Multipart {
    /// `\r\n--boundary`; the first delimiter lacks the leading CRLF.
    delimiter: Vec<u8>,
    buf: BytesMut,
    state: MpState,
    skipping: bool,
    end_pending: bool,
}

impl Multipart {
    fn new(boundary: &str) -> Self {
        Self {
            delimiter: format!("\r\n--{boundary}").into_bytes(),
            buf: BytesMut::new(),
            state: MpState::Preamble,
            skipping: false,
            end_pending: false,
        }
    }

    fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Drops the data of the current part.
    fn skip_part(&mut self) {
        self.skipping = true;
    }

    /// The next event, `Ok(None)` when more input is needed.
    fn next(&mut self) -> Result<Option<Part>, String> {
        if self.end_pending {
            self.end_pending = false;
            return Ok(Some(Part::End));
        }
        loop {
            match self.state {
                MpState::Done => return Ok(Some(Part::Done)),
                MpState::Preamble => {
                    let first = &self.delimiter[2..];
                    match find(&self.buf, first) {
                        Some(i) => {
                            self.buf.advance(i + first.len());
                            self.state = MpState::AfterDelimiter;
                        }
                        None => {
                            let keep = first.len();
                            if self.buf.len() > keep {
                                let drop = self.buf.len() - keep;
                                self.buf.advance(drop);
                            }
                            return Ok(None);
                        }
                    }
                }
                MpState::AfterDelimiter => {
                    if self.buf.len() < 2 {
                        return Ok(None);
                    }
                    if &self.buf[..2] == b"--" {
                        self.state = MpState::Done;
                        continue;
                    }
                    // Transport padding (spaces, tabs) may follow a delimiter.
                    let Some(eol) = find(&self.buf, b"\r\n") else {
                        if self.buf.len() > 1024 {
                            return Err("malformed multipart delimiter line".into());
                        }
                        return Ok(None);
                    };
                    if self.buf[..eol].iter().any(|b| *b != b' ' && *b != b'\t') {
                        return Err("malformed multipart delimiter line".into());
                    }
                    self.buf.advance(eol + 2);
                    self.state = MpState::Headers;
                }
                MpState::Headers => {
                    let Some(end) = find(&self.buf, b"\r\n\r\n").or_else(|| {
                        // A part with no headers at all.
                        self.buf.starts_with(b"\r\n").then_some(0)
                    }) else {
                        if self.buf.len() > MAX_PART_HEADERS {
                            return Err("multipart part headers too large".into());
                        }
                        return Ok(None);
                    };
                    let block = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                    let skip = if end == 0 { 2 } else { end + 4 };
                    self.buf.advance(skip);
                    self.state = MpState::Body;
                    self.skipping = false;
                    let (name, filename) = disposition(&block);
                    return Ok(Some(Part::Start { name, filename }));
                }
                MpState::Body => {
                    if let Some(i) = find(&self.buf, &self.delimiter) {
                        let data = self.buf.split_to(i).freeze();
                        self.buf.advance(self.delimiter.len());
                        self.state = MpState::AfterDelimiter;
                        if !data.is_empty() && !self.skipping {
                            // Emit the data now; the End follows on the next call.
                            self.end_pending = true;
                            return Ok(Some(Part::Data(data)));
                        }
                        return Ok(Some(Part::End));
                    }
                    let keep = self.delimiter.len() - 1;
                    if self.buf.len() > keep {
                        let n = self.buf.len() - keep;
                        let data = self.buf.split_to(n).freeze();
                        if !self.skipping {
                            return Ok(Some(Part::Data(data)));
                        }
                    }
                    return Ok(None);
                }
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `name` and `filename` from a part's `Content-Disposition` header.
fn disposition(headers: &str) -> (String, Option<String>) {
    let mut name = String::new();
    let mut filename = None;
    for line in headers.split("\r\n") {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        if !k.trim().eq_ignore_ascii_case("content-disposition") {
            continue;
        }
        for param in split_params(v) {
            let Some((pk, pv)) = param.split_once('=') else {
                continue;
            };
            let pv = unquote(pv.trim());
            match pk.trim().to_ascii_lowercase().as_str() {
                "name" => name = pv,
                "filename" => filename = Some(pv),
                _ => {}
            }
        }
    }
    (name, filename)
}

/// Splits `a; b="x;y"; c` on semicolons outside quotes.
fn split_params(v: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut escaped = false;
    for c in v.chars() {
        if escaped {
            cur.push(c);
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted => {
                cur.push(c);
                escaped = true;
            }
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            ';' if !quoted => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out
}

fn unquote(v: &str) -> String {
    let Some(inner) = v.strip_prefix('"').and_then(|s| s.strip_suffix('"')) else {
        return v.to_owned();
    };
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(body: &[u8], boundary: &str, step: usize) -> Result<Vec<Part>, String> {
        let mut p = Multipart::new(boundary);
        let mut out = Vec::new();
        let mut chunks = body.chunks(step);
        loop {
            match p.next()? {
                Some(Part::Done) => return Ok(out),
                Some(ev) => out.push(ev),
                None => match chunks.next() {
                    Some(c) => p.push(c),
                    None => return Err("eof".into()),
                },
            }
        }
    }

    fn files(parts: Vec<Part>) -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<(String, Vec<u8>)> = Vec::new();
        for p in parts {
            match p {
                Part::Start { filename, .. } => {
                    out.push((filename.unwrap_or_default(), Vec::new()));
                }
                Part::Data(d) => out.last_mut().unwrap().1.extend_from_slice(&d),
                Part::End | Part::Done => {}
            }
        }
        out
    }

    #[test]
    fn captured_two_file_multipart_parses_at_any_split() {
        let body = b"--17693ab361cb2a689a46a16eacb815db\r\nContent-Disposition: form-data; name=\"file\"; filename=\"/a.txt\"\r\nContent-Type: text/plain\r\n\r\nA\r\n--17693ab361cb2a689a46a16eacb815db\r\nContent-Disposition: form-data; name=\"file\"; filename=\"/b.txt\"\r\nContent-Type: text/plain\r\n\r\nB\r\n--17693ab361cb2a689a46a16eacb815db--\r\n";
        for step in [1, 2, 3, 7, 64, 1000] {
            let parts = parse_all(body, "17693ab361cb2a689a46a16eacb815db", step).unwrap();
            assert_eq!(
                files(parts),
                vec![
                    ("/a.txt".into(), b"A".to_vec()),
                    ("/b.txt".into(), b"B".to_vec())
                ],
                "step {step}"
            );
        }
    }

    #[test]
    fn binary_data_with_crlf_and_dashes_survives() {
        let data: Vec<u8> = b"\r\n--\r\n--y\r\n-x--"
            .iter()
            .copied()
            .chain(0u8..=255)
            .collect();
        let mut body =
            b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f\"\r\n\r\n"
                .to_vec();
        body.extend_from_slice(&data);
        body.extend_from_slice(b"\r\n--x--");
        for step in [1, 5, 4096] {
            let got = files(parse_all(&body, "x", step).unwrap());
            assert_eq!(got, vec![("f".into(), data.clone())]);
        }
    }

    #[test]
    fn truncated_multipart_needs_more() {
        let body =
            b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f\"\r\n\r\nabc";
        assert_eq!(parse_all(body, "x", 3).unwrap_err(), "eof");
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-3", 10), RangeSpec::Range(0, 3));
        assert_eq!(parse_range("bytes=5-", 10), RangeSpec::Range(5, 9));
        assert_eq!(parse_range("bytes=-4", 10), RangeSpec::Range(6, 9));
        assert_eq!(parse_range("bytes=8-100", 10), RangeSpec::Range(8, 9));
        assert_eq!(parse_range("bytes=10-", 10), RangeSpec::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-1,4-5", 10), RangeSpec::Ignore);
        assert_eq!(parse_range("items=0-1", 10), RangeSpec::Ignore);
    }

    #[test]
    fn query_decoding() {
        let uri: http::Uri = "/files?path=%2Fhome%2Fuser%2Fa+b.txt&username=root"
            .parse()
            .unwrap();
        let q = query(&uri);
        assert_eq!(q["path"], "/home/user/a b.txt");
        assert_eq!(q["username"], "root");
        let uri: http::Uri = "/files?path=%zz%".parse().unwrap();
        assert_eq!(query(&uri)["path"], "%zz%");
    }

    #[test]
    fn gzip_negotiation() {
        let mut h = HeaderMap::new();
        assert!(!accepts_gzip(&h));
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("gzip, deflate"),
        );
        assert!(accepts_gzip(&h));
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("gzip;q=0, br"),
        );
        assert!(!accepts_gzip(&h));
    }
}
