//! `filesystem.Filesystem`: stat, list, make, move, remove, and inotify-based watchers.
//!
//! Paths resolve like `/files` (relative and `~` against the user's home). Every operation,
//! watches included, runs with the calling user's credentials (`crate::creds`): what the
//! user may not do is `permission_denied`, and what it creates is its own.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd as _, AsRawFd, RawFd};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body as HttpBody;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use serde::Deserialize;
use serde_json::json;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::connect::{self, Code, EnvelopeReader, Kind, RpcError};
use crate::creds::Creds;
use crate::files::{ensure_dir, ensure_parents};
use crate::reply::Body;
use crate::state::AgentState;
use crate::users;
use crate::watchers::PollingWatcher;
use crate::xattr;

/// Events kept per polling watcher between two `GetWatcherEvents` calls.
const MAX_BUFFERED_EVENTS: usize = 10_000;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each critical section is a single collection update.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

// ---- Wire messages. ----

#[derive(Debug, Default, Deserialize)]
struct PathRequest {
    #[serde(default)]
    path: String,
}

#[derive(Debug, Default, Deserialize)]
struct ListDirRequest {
    #[serde(default)]
    path: String,
    #[serde(default)]
    depth: Option<serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
struct MoveRequest {
    #[serde(default)]
    source: String,
    #[serde(default)]
    destination: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WatchRequest {
    #[serde(default)]
    path: String,
    #[serde(default)]
    recursive: bool,
    #[serde(default, alias = "include_entry")]
    include_entry: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WatcherIdRequest {
    #[serde(default, alias = "watcher_id")]
    watcher_id: String,
}

/// Serves `POST /filesystem.Filesystem/<method>`.
pub(crate) async fn handle<B>(
    state: Arc<AgentState>,
    method: &str,
    req: Request<B>,
) -> Response<Body>
where
    B: HttpBody<Data = Bytes> + Unpin + Send + 'static,
    B::Error: std::fmt::Display,
{
    match method {
        "WatchDir" => {
            if let Some(resp) = connect::check_content_type(req.headers(), Kind::Streaming) {
                return resp;
            }
            watch_dir(state, req)
                .await
                .unwrap_or_else(|e| connect::stream_error(&e))
        }
        "Stat" | "MakeDir" | "Move" | "ListDir" | "Remove" | "CreateWatcher"
        | "GetWatcherEvents" | "RemoveWatcher" => {
            let headers = req.headers().clone();
            connect::serve_unary(&headers, unary(state, method, req)).await
        }
        other => connect::unary_error(&RpcError::new(
            Code::Unimplemented,
            format!("filesystem.Filesystem/{other} is not implemented"),
        )),
    }
}

fn fs_err(path: &Path, e: &io::Error) -> RpcError {
    let p = path.display();
    match e.raw_os_error() {
        Some(libc::ENOENT) => RpcError::not_found(format!("path '{p}' does not exist")),
        Some(libc::ENOTDIR) => {
            RpcError::invalid(format!("a component of path '{p}' is not a directory"))
        }
        Some(libc::EACCES | libc::EPERM) => RpcError::new(
            Code::PermissionDenied,
            format!("permission denied for '{p}'"),
        ),
        Some(libc::ENOSPC | libc::EDQUOT) => RpcError::new(
            Code::ResourceExhausted,
            format!("no space left to write '{p}'"),
        ),
        _ => RpcError::internal(format!("error accessing '{p}': {e}")),
    }
}

async fn unary<B>(
    state: Arc<AgentState>,
    method: &str,
    req: Request<B>,
) -> Result<serde_json::Value, RpcError>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let user = users::from_headers(&state, req.headers())?;
    let creds = Creds::of(&state, &user);
    let body = connect::read_unary(req.into_body()).await?;
    let st = Arc::clone(&state);
    match method {
        "Stat" => {
            let r: PathRequest = connect::decode(&body)?;
            let path = users::resolve_path(&r.path, &user);
            creds
                .blocking(move || Ok(json!({ "entry": entry_info(&st, &path)? })))
                .await
        }
        "MakeDir" => {
            let r: PathRequest = connect::decode(&body)?;
            let path = users::resolve_path(&r.path, &user);
            creds.blocking(move || make_dir(&st, &path)).await
        }
        "Move" => {
            let r: MoveRequest = connect::decode(&body)?;
            let src = users::resolve_path(&r.source, &user);
            let dst = users::resolve_path(&r.destination, &user);
            creds
                .blocking(move || {
                    std::fs::symlink_metadata(&src).map_err(|e| fs_err(&src, &e))?;
                    ensure_parents(&dst).map_err(|e| fs_err(&dst, &e))?;
                    std::fs::rename(&src, &dst).map_err(|e| match e.raw_os_error() {
                        // Either end may be what the user may not change.
                        Some(libc::EACCES | libc::EPERM) => RpcError::new(
                            Code::PermissionDenied,
                            format!(
                                "permission denied moving '{}' to '{}'",
                                src.display(),
                                dst.display()
                            ),
                        ),
                        _ => fs_err(&dst, &e),
                    })?;
                    Ok(json!({ "entry": entry_info(&st, &dst)? }))
                })
                .await
        }
        "ListDir" => {
            let r: ListDirRequest = connect::decode(&body)?;
            let depth = match &r.depth {
                None | Some(serde_json::Value::Null) => 1,
                Some(v) => v
                    .as_u64()
                    .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                    .ok_or_else(|| RpcError::invalid("depth must be a uint32"))?,
            }
            .max(1);
            let path = users::resolve_path(&r.path, &user);
            creds.blocking(move || list_dir(&st, &path, depth)).await
        }
        "Remove" => {
            let r: PathRequest = connect::decode(&body)?;
            let path = users::resolve_path(&r.path, &user);
            creds
                .blocking(move || {
                    let meta = match std::fs::symlink_metadata(&path) {
                        Ok(m) => m,
                        // Like `os.RemoveAll`: removing what is not there succeeds.
                        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(json!({})),
                        Err(e) => return Err(fs_err(&path, &e)),
                    };
                    let res = if meta.is_dir() {
                        std::fs::remove_dir_all(&path)
                    } else {
                        std::fs::remove_file(&path)
                    };
                    res.map_err(|e| fs_err(&path, &e))?;
                    Ok(json!({}))
                })
                .await
        }
        "CreateWatcher" => {
            let r: WatchRequest = connect::decode(&body)?;
            let path = users::resolve_path(&r.path, &user);
            let watch = Watch::new(&path, r.recursive, creds)?;
            let events = Arc::new(Mutex::new(Vec::new()));
            let sink = Arc::clone(&events);
            let include = r.include_entry;
            let st2 = Arc::clone(&state);
            let task = tokio::spawn(async move {
                let mut watch = watch;
                while let Some(ev) = watch.next(&st2, include).await {
                    let mut evs = lock(&sink);
                    if evs.len() >= MAX_BUFFERED_EVENTS {
                        evs.remove(0);
                    }
                    evs.push(ev);
                }
            });
            let id = format!(
                "w{}",
                state.watchers.next.fetch_add(1, Ordering::Relaxed) + 1
            );
            lock(&state.watchers.map).insert(
                id.clone(),
                PollingWatcher {
                    events,
                    task: task.abort_handle(),
                },
            );
            Ok(json!({ "watcherId": id }))
        }
        "GetWatcherEvents" => {
            let r: WatcherIdRequest = connect::decode(&body)?;
            let map = lock(&state.watchers.map);
            let w = map.get(&r.watcher_id).ok_or_else(|| {
                RpcError::not_found(format!("watcher '{}' not found", r.watcher_id))
            })?;
            let events = std::mem::take(&mut *lock(&w.events));
            Ok(json!({ "events": events }))
        }
        "RemoveWatcher" => {
            let r: WatcherIdRequest = connect::decode(&body)?;
            lock(&state.watchers.map)
                .remove(&r.watcher_id)
                .ok_or_else(|| {
                    RpcError::not_found(format!("watcher '{}' not found", r.watcher_id))
                })?;
            Ok(json!({}))
        }
        _ => Err(RpcError::new(Code::Unimplemented, "unknown method")),
    }
}

fn make_dir(state: &AgentState, path: &Path) -> Result<serde_json::Value, RpcError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => {
            return Err(RpcError::new(
                Code::AlreadyExists,
                format!("directory '{}' already exists", path.display()),
            ))
        }
        Ok(_) => {
            return Err(RpcError::invalid(format!(
                "path '{}' already exists and is not a directory",
                path.display()
            )))
        }
        Err(_) => {}
    }
    ensure_dir(path).map_err(|e| fs_err(path, &e))?;
    Ok(json!({ "entry": entry_info(state, path)? }))
}

fn list_dir(state: &AgentState, root: &Path, depth: u64) -> Result<serde_json::Value, RpcError> {
    let meta = std::fs::metadata(root).map_err(|e| fs_err(root, &e))?;
    if !meta.is_dir() {
        return Err(RpcError::invalid(format!(
            "path '{}' is not a directory",
            root.display()
        )));
    }
    let mut entries = Vec::new();
    walk(state, root, depth, &mut entries)?;
    Ok(json!({ "entries": entries }))
}

/// Depth-first, names in byte order (like Go's `filepath.WalkDir`), not following
/// symlinked directories.
fn walk(
    state: &AgentState,
    dir: &Path,
    depth: u64,
    out: &mut Vec<serde_json::Value>,
) -> Result<(), RpcError> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| fs_err(dir, &e))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    names.sort();
    for p in names {
        // An entry removed while listing is skipped.
        let Ok(info) = entry_info(state, &p) else {
            continue;
        };
        out.push(info);
        if depth > 1 {
            if let Ok(m) = std::fs::symlink_metadata(&p) {
                if m.is_dir() {
                    walk(state, &p, depth - 1, out)?;
                }
            }
        }
    }
    Ok(())
}

/// envd's `EntryInfo` for `path` (not following a symlink at `path` itself).
pub(crate) fn entry_info(state: &AgentState, path: &Path) -> Result<serde_json::Value, RpcError> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| fs_err(path, &e))?;
    let is_symlink = meta.file_type().is_symlink();
    let target_meta = if is_symlink {
        std::fs::metadata(path).ok()
    } else {
        None
    };
    let kind_of = |m: &std::fs::Metadata| {
        if m.is_dir() {
            "FILE_TYPE_DIRECTORY"
        } else {
            "FILE_TYPE_FILE"
        }
    };
    // A symlink reports its target's type (what older SDKs understand) plus
    // `isSymlink`; a dangling one reports FILE_TYPE_SYMLINK.
    let kind = match (&target_meta, is_symlink) {
        (Some(t), true) => kind_of(t),
        (None, true) => "FILE_TYPE_SYMLINK",
        _ => kind_of(&meta),
    };
    let name = path
        .file_name()
        .map_or_else(|| "/".to_owned(), |n| n.to_string_lossy().into_owned());
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .unwrap_or_default();
    let mut entry = json!({
        "name": name,
        "type": kind,
        "path": path.to_string_lossy(),
        "size": meta.len().to_string(),
        "mode": meta.permissions().mode() & 0o777,
        "permissions": mode_string(meta.mode(), is_symlink),
        "owner": users::uid_name(state, meta.uid()),
        "group": users::gid_name(state, meta.gid()),
        "modifiedTime": rfc3339(modified),
    });
    // Like ProtoJSON (and Go's envd), an empty map is left out.
    let metadata = xattr::read(path);
    if !metadata.is_empty() {
        entry["metadata"] = json!(metadata);
    }
    if is_symlink {
        entry["isSymlink"] = json!(true);
        if let Ok(t) = std::fs::read_link(path) {
            let abs = if t.is_absolute() {
                t
            } else {
                path.parent().unwrap_or(Path::new("/")).join(t)
            };
            entry["symlinkTarget"] = json!(users::clean(&abs).to_string_lossy());
        }
    }
    Ok(entry)
}

/// Go's `FileMode.String()`: type letter(s) then `rwxrwxrwx`.
fn mode_string(mode: u32, is_symlink: bool) -> String {
    let mut s = String::new();
    let fmt = mode & libc::S_IFMT;
    if is_symlink {
        s.push('L');
    } else if fmt == libc::S_IFDIR {
        s.push('d');
    } else if fmt == libc::S_IFIFO {
        s.push('p');
    } else if fmt == libc::S_IFSOCK {
        s.push('S');
    } else if fmt == libc::S_IFCHR {
        s.push_str("Dc");
    } else if fmt == libc::S_IFBLK {
        s.push('D');
    }
    if mode & libc::S_ISUID != 0 {
        s.push('u');
    }
    if mode & libc::S_ISGID != 0 {
        s.push('g');
    }
    if mode & libc::S_ISVTX != 0 {
        s.push('t');
    }
    if s.is_empty() {
        s.push('-');
    }
    for (i, c) in "rwxrwxrwx".chars().enumerate() {
        s.push(if mode & (1 << (8 - i)) != 0 { c } else { '-' });
    }
    s
}

/// RFC 3339 UTC with 0, 3, 6 or 9 fraction digits, as protobuf's JSON mapping prints.
pub(crate) fn rfc3339(since_epoch: Duration) -> String {
    let secs = since_epoch.as_secs();
    let nanos = since_epoch.subsec_nanos();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    let frac = if nanos == 0 {
        String::new()
    } else if (nanos / 1_000_000) * 1_000_000 == nanos {
        format!(".{:03}", nanos / 1_000_000)
    } else if (nanos / 1_000) * 1_000 == nanos {
        format!(".{:06}", nanos / 1_000)
    } else {
        format!(".{nanos:09}")
    };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}{frac}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    (
        y,
        u32::try_from(m).unwrap_or(1),
        u32::try_from(d).unwrap_or(1),
    )
}

// ---- Watching. ----

/// An inotify instance in the tokio reactor.
#[derive(Debug)]
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// One watched tree.
#[derive(Debug)]
struct Watch {
    fd: AsyncFd<InotifyFd>,
    root: PathBuf,
    recursive: bool,
    dirs: HashMap<WatchDescriptor, PathBuf>,
    pending: std::collections::VecDeque<serde_json::Value>,
    /// The watching user's: directories added later and entries read for events too.
    creds: Creds,
}

fn watch_mask() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_DONT_FOLLOW
}

impl Watch {
    /// Watches `root` as the user of `creds`; runs synchronously on the calling thread.
    fn new(root: &Path, recursive: bool, creds: Creds) -> Result<Self, RpcError> {
        let _switched = creds.switch()?;
        let meta = std::fs::metadata(root).map_err(|e| fs_err(root, &e))?;
        if !meta.is_dir() {
            return Err(RpcError::invalid(format!(
                "path '{}' is not a directory",
                root.display()
            )));
        }
        let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| RpcError::internal(format!("error creating watcher: {e}")))?;
        // SAFETY: `Inotify` owns its descriptor and keeps it open and unchanged until it is
        // dropped with the `AsyncFd`; `as_raw_fd` always returns that descriptor.
        let fd = unsafe { AsyncFd::register(InotifyFd(ino)) }
            .map_err(|e| e.into_parts().1)
            .map_err(|e| RpcError::internal(format!("error creating watcher: {e}")))?;
        let mut w = Self {
            fd,
            root: root.to_path_buf(),
            recursive,
            dirs: HashMap::new(),
            pending: std::collections::VecDeque::new(),
            creds: creds.clone(),
        };
        w.add_tree(root)
            .map_err(|e| fs_err(root, &io::Error::from(e)))?;
        Ok(w)
    }

    fn add_tree(&mut self, dir: &Path) -> nix::Result<()> {
        let wd = self.fd.get_ref().0.add_watch(dir, watch_mask())?;
        self.dirs.insert(wd, dir.to_path_buf());
        if self.recursive {
            if let Ok(rd) = std::fs::read_dir(dir) {
                for e in rd.filter_map(Result::ok) {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        // A subdirectory that vanished meanwhile is simply not watched.
                        let _ = self.add_tree(&e.path());
                    }
                }
            }
        }
        Ok(())
    }

    /// The next event as a `FilesystemEvent` JSON object; `None` if the watch broke.
    async fn next(&mut self, state: &AgentState, include_entry: bool) -> Option<serde_json::Value> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Some(ev);
            }
            let mut guard = self.fd.readable().await.ok()?;
            let events = match guard
                .try_io(|inner| inner.get_ref().0.read_events().map_err(io::Error::from))
            {
                Ok(Ok(evs)) => evs,
                Ok(Err(_)) => return None,
                Err(_would_block) => continue,
            };
            drop(guard);
            // One synchronous stretch with the watcher's credentials: new subdirectories
            // are watched, and entries read, only as far as the user may.
            let Ok(_switched) = self.creds.switch() else {
                return None;
            };
            for ev in events {
                if ev.mask.contains(AddWatchFlags::IN_IGNORED) {
                    self.dirs.remove(&ev.wd);
                    continue;
                }
                let Some(dir) = self.dirs.get(&ev.wd).cloned() else {
                    continue;
                };
                let Some(name) = ev.name.as_deref() else {
                    continue;
                };
                let full = dir.join(name);
                let kind = event_type(ev.mask);
                let Some(kind) = kind else { continue };
                if self.recursive
                    && ev.mask.contains(AddWatchFlags::IN_ISDIR)
                    && ev
                        .mask
                        .intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
                {
                    let _ = self.add_tree(&full);
                }
                let rel = full.strip_prefix(&self.root).unwrap_or(Path::new(name));
                let mut out = json!({ "name": rel_name(rel.as_os_str()), "type": kind });
                if include_entry {
                    if let Ok(entry) = entry_info(state, &full) {
                        out["entry"] = entry;
                    }
                }
                self.pending.push_back(out);
            }
        }
    }
}

fn rel_name(s: &OsStr) -> String {
    s.to_string_lossy().into_owned()
}

/// fsnotify's mapping from inotify masks to envd event types.
fn event_type(mask: AddWatchFlags) -> Option<&'static str> {
    if mask.intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO) {
        Some("EVENT_TYPE_CREATE")
    } else if mask.contains(AddWatchFlags::IN_MODIFY) {
        Some("EVENT_TYPE_WRITE")
    } else if mask.intersects(AddWatchFlags::IN_DELETE | AddWatchFlags::IN_DELETE_SELF) {
        Some("EVENT_TYPE_REMOVE")
    } else if mask.contains(AddWatchFlags::IN_MOVED_FROM) {
        Some("EVENT_TYPE_RENAME")
    } else if mask.contains(AddWatchFlags::IN_ATTRIB) {
        Some("EVENT_TYPE_CHMOD")
    } else {
        None
    }
}

async fn watch_dir<B>(state: Arc<AgentState>, req: Request<B>) -> Result<Response<Body>, RpcError>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let deadline = connect::timeout(req.headers())?.map(|d| Instant::now() + d);
    let keepalive = connect::keepalive_interval(req.headers());
    let user = users::from_headers(&state, req.headers())?;
    let msg = EnvelopeReader::new(req.into_body()).single().await?;
    let r: WatchRequest = connect::decode(&msg)?;
    let path = users::resolve_path(&r.path, &user);
    let mut watch = Watch::new(&path, r.recursive, Creds::of(&state, &user))?;
    let include = r.include_entry;
    let (tx, resp) = connect::stream_response();
    tokio::spawn(async move {
        if !tx.send(&json!({ "start": {} })).await {
            return;
        }
        let (evtx, mut evrx) = mpsc::channel(64);
        let st = Arc::clone(&state);
        let reader = tokio::spawn(async move {
            while let Some(ev) = watch.next(&st, include).await {
                if evtx.send(ev).await.is_err() {
                    return;
                }
            }
        });
        let mut next_ping = Instant::now() + keepalive;
        loop {
            let deadline_sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ev = evrx.recv() => match ev {
                    Some(ev) => {
                        if !tx.send(&json!({ "filesystem": ev })).await { break; }
                        next_ping = Instant::now() + keepalive;
                    }
                    None => {
                        tx.finish(Some(&RpcError::internal("watcher stopped"))).await;
                        break;
                    }
                },
                () = tokio::time::sleep_until(next_ping) => {
                    if !tx.send(&json!({ "keepalive": {} })).await { break; }
                    next_ping = Instant::now() + keepalive;
                }
                () = deadline_sleep => {
                    tx.finish(Some(&RpcError::new(Code::DeadlineExceeded, "deadline exceeded"))).await;
                    break;
                }
                () = tx.closed() => break,
            }
        }
        reader.abort();
    });
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(Duration::from_secs(0)), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(Duration::from_secs(1_767_225_600)),
            "2026-01-01T00:00:00Z"
        );
        assert_eq!(
            rfc3339(Duration::new(951_782_400, 5_000_000)),
            "2000-02-29T00:00:00.005Z"
        );
    }

    #[test]
    fn modes_like_go() {
        assert_eq!(mode_string(libc::S_IFREG | 0o644, false), "-rw-r--r--");
        assert_eq!(mode_string(libc::S_IFDIR | 0o755, false), "drwxr-xr-x");
        assert_eq!(mode_string(libc::S_IFLNK | 0o777, true), "Lrwxrwxrwx");
        assert_eq!(
            mode_string(libc::S_IFDIR | libc::S_ISVTX | 0o777, false),
            "dtrwxrwxrwx"
        );
    }
}
