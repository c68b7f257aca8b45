//! User-defined file metadata, stored as `user.e2b.<key>` extended attributes.
//!
//! Uploads carry it as `X-Metadata-<key>: <value>` headers (spec §3.2), and `EntryInfo`
//! reports it as `metadata` (spec §3.6). The rules follow E2B's envd: keys are lowercased,
//! keys and values are printable US-ASCII, a key is at most 246 bytes (the VFS's 255-byte
//! name limit minus the prefix), and one file's set is at most 4096 bytes counting each
//! prefixed name and its value. Each upload replaces the whole set.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd as _, BorrowedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

use http::HeaderMap;

/// The attribute namespace of E2B metadata; `user.` is what unprivileged tools may write.
pub(crate) const PREFIX: &str = "user.e2b.";
/// The longest key: the VFS caps a whole attribute name at 255 bytes.
pub(crate) const MAX_KEY_LEN: usize = 255 - PREFIX.len();
/// The largest set on one file (prefixed names plus values), so it fits one ext4 block.
pub(crate) const MAX_TOTAL_LEN: usize = 4096;
/// The request-header prefix, as the `http` crate spells names (lowercase).
const HEADER_PREFIX: &str = "x-metadata-";

/// Metadata keys (without the prefix) to values; ordered so writes are reproducible.
pub(crate) type Metadata = BTreeMap<String, String>;

/// Why a set of `X-Metadata-*` headers was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum MetadataError {
    /// `X-Metadata-` with nothing after the prefix.
    #[error("metadata key must not be empty")]
    EmptyKey,
    /// A key longer than [`MAX_KEY_LEN`].
    #[error("metadata key '{key}' is longer than {MAX_KEY_LEN} bytes")]
    KeyTooLong {
        /// The offending key.
        key: String,
    },
    /// A byte outside 0x20..=0x7e in the key or value of `key`.
    #[error(
        "metadata {part} of key '{key}' has byte 0x{byte:02x}, which is not printable US-ASCII"
    )]
    NotPrintable {
        /// The key, lossily decoded.
        key: String,
        /// `"key"` or `"value"`.
        part: &'static str,
        /// The first offending byte.
        byte: u8,
    },
    /// A set larger than [`MAX_TOTAL_LEN`].
    #[error("metadata takes {total} bytes, more than the {MAX_TOTAL_LEN} a file can hold")]
    TooLarge {
        /// Prefixed names plus values, in bytes.
        total: usize,
    },
}

/// Collects and checks the `X-Metadata-*` headers of an upload.
///
/// A header sent more than once counts with its first value, as in E2B's envd.
pub(crate) fn from_headers(headers: &HeaderMap) -> Result<Metadata, MetadataError> {
    let mut out = Metadata::new();
    let mut total = 0;
    for name in headers.keys() {
        let Some(key) = name.as_str().strip_prefix(HEADER_PREFIX) else {
            continue;
        };
        let key = key.to_ascii_lowercase();
        let Some(value) = headers.get(name) else {
            continue;
        };
        if key.is_empty() {
            return Err(MetadataError::EmptyKey);
        }
        if key.len() > MAX_KEY_LEN {
            return Err(MetadataError::KeyTooLong { key });
        }
        // Header names are HTTP tokens, so only the value can hold such bytes today;
        // checking both keeps this rule independent of the parser.
        let bad = [("key", key.as_bytes()), ("value", value.as_bytes())]
            .into_iter()
            .find_map(|(part, bytes)| {
                let byte = bytes.iter().find(|b| !(0x20..=0x7e).contains(*b))?;
                Some((part, *byte))
            });
        if let Some((part, byte)) = bad {
            return Err(MetadataError::NotPrintable { key, part, byte });
        }
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        total += PREFIX.len() + key.len() + value.len();
        out.insert(key, value);
    }
    if total > MAX_TOTAL_LEN {
        return Err(MetadataError::TooLarge { total });
    }
    Ok(out)
}

/// Why [`replace`] failed; the file's previous metadata has been put back.
#[derive(Debug, thiserror::Error)]
pub(crate) enum XattrError {
    /// The filesystem has no user extended attributes, and metadata was asked for.
    #[error("the filesystem does not support user extended attributes")]
    Unsupported,
    /// A syscall failed.
    #[error("{op} extended attribute '{name}'")]
    Io {
        /// `"list"`, `"read"`, `"remove"` or `"write"`.
        op: &'static str,
        /// The attribute name (empty for a listing).
        name: String,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
}

/// `ENOTSUP`: no user attributes here. (Linux's `EOPNOTSUPP` is the same number.)
fn unsupported(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOTSUP)
}

/// Replaces every `user.e2b.*` attribute of the open file with `meta`.
///
/// All or nothing: if any step fails, the attributes the file had before are restored
/// (best effort) and the error is returned. On a filesystem without user attributes an
/// empty `meta` succeeds, since there is nothing to clear.
pub(crate) fn replace(fd: BorrowedFd<'_>, meta: &Metadata) -> Result<(), XattrError> {
    let names = match list_fd(fd) {
        Ok(names) => names,
        Err(e) if unsupported(&e) => {
            return if meta.is_empty() {
                Ok(())
            } else {
                Err(XattrError::Unsupported)
            };
        }
        Err(source) => {
            return Err(XattrError::Io {
                op: "list",
                name: String::new(),
                source,
            })
        }
    };
    let mut old = Vec::new();
    for name in names
        .into_iter()
        .filter(|n| n.to_bytes().starts_with(PREFIX.as_bytes()))
    {
        match get_fd(fd, &name) {
            Ok(value) => old.push((name, value)),
            // Removed meanwhile: nothing to keep.
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(source) => {
                return Err(XattrError::Io {
                    op: "read",
                    name: name.to_string_lossy().into_owned(),
                    source,
                })
            }
        }
    }
    let result = apply(fd, &old, meta);
    if result.is_err() {
        rollback(fd, &old);
    }
    result
}

fn apply(
    fd: BorrowedFd<'_>,
    old: &[(CString, Vec<u8>)],
    meta: &Metadata,
) -> Result<(), XattrError> {
    for (name, _) in old {
        match remove_fd(fd, name) {
            Err(e) if e.raw_os_error() != Some(libc::ENODATA) => {
                return Err(XattrError::Io {
                    op: "remove",
                    name: name.to_string_lossy().into_owned(),
                    source: e,
                })
            }
            _ => {}
        }
    }
    for (key, value) in meta {
        let full = format!("{PREFIX}{key}");
        let io_err = |source| XattrError::Io {
            op: "write",
            name: full.clone(),
            source,
        };
        let name = CString::new(full.as_bytes())
            .map_err(|_| io_err(io::Error::from_raw_os_error(libc::EINVAL)))?;
        match set_fd(fd, &name, value.as_bytes()) {
            Ok(()) => {}
            Err(e) if unsupported(&e) => return Err(XattrError::Unsupported),
            Err(e) => return Err(io_err(e)),
        }
    }
    Ok(())
}

/// Puts back exactly the `user.e2b.*` set `old`; failures are ignored, as the caller
/// already reports the error that made this necessary.
fn rollback(fd: BorrowedFd<'_>, old: &[(CString, Vec<u8>)]) {
    if let Ok(now) = list_fd(fd) {
        for name in now
            .iter()
            .filter(|n| n.to_bytes().starts_with(PREFIX.as_bytes()))
        {
            let _ = remove_fd(fd, name);
        }
    }
    for (name, value) in old {
        let _ = set_fd(fd, name, value);
    }
}

/// The `user.e2b.*` metadata of `path` (following a symlink, as envd does), for
/// `EntryInfo`. Best effort: unreadable or unsupported attributes give an empty map, and
/// entries that are not UTF-8 (set from inside the sandbox) are skipped, since the JSON
/// map cannot carry them.
pub(crate) fn read(path: &Path) -> Metadata {
    let mut out = Metadata::new();
    let Ok(cpath) = CString::new(path.as_os_str().as_bytes()) else {
        return out;
    };
    let Ok(names) = list_path(&cpath) else {
        return out;
    };
    for name in names {
        let Some(key) = name.to_bytes().strip_prefix(PREFIX.as_bytes()) else {
            continue;
        };
        let Ok(key) = std::str::from_utf8(key) else {
            continue;
        };
        let Ok(value) = get_path(&cpath, &name) else {
            continue;
        };
        if let Ok(value) = String::from_utf8(value) {
            out.insert(key.to_owned(), value);
        }
    }
    out
}

// ---- The syscalls. ----
//
// Neither std nor nix (0.29) wraps the xattr calls, and the crate's dependency list is
// owned by the workspace; the few calls below are small enough to wrap here.

/// Runs a `*getxattr`/`*listxattr` call that fills `buf`, growing `buf` until the answer
/// fits (an attribute may grow between asking for the size and reading it).
fn read_sized(mut call: impl FnMut(&mut [u8]) -> libc::ssize_t) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    for _ in 0..8 {
        // An empty buffer asks for the size needed.
        let want = call(&mut []);
        let want = usize::try_from(want).map_err(|_| io::Error::last_os_error())?;
        buf.resize(want, 0);
        let got = call(&mut buf);
        match usize::try_from(got) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::ERANGE) {
                    return Err(e);
                }
            }
        }
    }
    Err(io::Error::from_raw_os_error(libc::ERANGE))
}

/// Splits a `listxattr` answer (NUL-terminated names back to back) into names.
fn split_names(raw: &[u8]) -> Vec<CString> {
    raw.split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .filter_map(|n| CString::new(n).ok())
        .collect()
}

fn list_fd(fd: BorrowedFd<'_>) -> io::Result<Vec<CString>> {
    let raw = read_sized(|buf| {
        // SAFETY: `fd` is an open descriptor borrowed for this call, and `buf` is valid
        // for writes of `buf.len()` bytes (the kernel writes at most that many).
        unsafe { libc::flistxattr(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) }
    })?;
    Ok(split_names(&raw))
}

fn get_fd(fd: BorrowedFd<'_>, name: &CStr) -> io::Result<Vec<u8>> {
    read_sized(|buf| {
        // SAFETY: `fd` is open, `name` is NUL-terminated, and `buf` is valid for writes
        // of `buf.len()` bytes.
        unsafe {
            libc::fgetxattr(
                fd.as_raw_fd(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        }
    })
}

fn set_fd(fd: BorrowedFd<'_>, name: &CStr, value: &[u8]) -> io::Result<()> {
    // SAFETY: `fd` is open, `name` is NUL-terminated, and `value` is valid for reads of
    // `value.len()` bytes; the kernel copies it before returning.
    let rc = unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn remove_fd(fd: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: `fd` is open and `name` is NUL-terminated.
    let rc = unsafe { libc::fremovexattr(fd.as_raw_fd(), name.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn list_path(path: &CStr) -> io::Result<Vec<CString>> {
    let raw = read_sized(|buf| {
        // SAFETY: `path` is NUL-terminated and `buf` is valid for writes of `buf.len()`
        // bytes.
        unsafe { libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) }
    })?;
    Ok(split_names(&raw))
}

fn get_path(path: &CStr, name: &CStr) -> io::Result<Vec<u8>> {
    read_sized(|buf| {
        // SAFETY: `path` and `name` are NUL-terminated and `buf` is valid for writes of
        // `buf.len()` bytes.
        unsafe {
            libc::getxattr(
                path.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;

    use http::{HeaderName, HeaderValue};

    use super::*;

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_bytes(v).unwrap(),
            );
        }
        h
    }

    fn meta(pairs: &[(&str, &str)]) -> Metadata {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn headers_become_lowercase_keys_and_first_value_wins() {
        let h = headers(&[
            ("X-Metadata-Author", b"Mish"),
            ("x-metadata-author", b"second"),
            ("X-Metadata-Empty-Value", b""),
            ("Content-Type", b"application/octet-stream"),
            ("X-Metadatax", b"not ours"),
        ]);
        assert_eq!(
            from_headers(&h),
            Ok(meta(&[("author", "Mish"), ("empty-value", "")]))
        );
        assert_eq!(from_headers(&HeaderMap::new()), Ok(Metadata::new()));
    }

    #[test]
    fn bad_headers_are_refused() {
        assert_eq!(
            from_headers(&headers(&[("x-metadata-", b"v")])),
            Err(MetadataError::EmptyKey)
        );
        assert_eq!(
            from_headers(&headers(&[("x-metadata-k", b"caf\xc3\xa9")])),
            Err(MetadataError::NotPrintable {
                key: "k".into(),
                part: "value",
                byte: 0xc3
            })
        );
        assert!(matches!(
            from_headers(&headers(&[("x-metadata-k", b"a\tb")])),
            Err(MetadataError::NotPrintable { byte: b'\t', .. })
        ));
        let long = format!("x-metadata-{}", "k".repeat(MAX_KEY_LEN + 1));
        assert!(matches!(
            from_headers(&headers(&[(&long, b"v")])),
            Err(MetadataError::KeyTooLong { .. })
        ));
        let longest = "k".repeat(MAX_KEY_LEN);
        assert_eq!(
            from_headers(&headers(&[(&format!("x-metadata-{longest}"), b"v")])),
            Ok(meta(&[(&longest, "v")]))
        );
        // Two values that fit alone but not together.
        let half = vec![b'v'; MAX_TOTAL_LEN / 2];
        assert_eq!(
            from_headers(&headers(&[("x-metadata-a", &half)])).map(|m| m.len()),
            Ok(1)
        );
        assert!(matches!(
            from_headers(&headers(&[
                ("x-metadata-a", &half),
                ("x-metadata-b", &half)
            ])),
            Err(MetadataError::TooLarge { .. })
        ));
    }

    /// A scratch file on a filesystem with user attributes, or `None` (and a SKIP line).
    #[allow(clippy::print_stdout)]
    fn scratch(test: &str) -> Option<(tempfile::TempDir, std::fs::File, std::path::PathBuf)> {
        let dir = tempfile::tempdir().ok()?;
        let path = dir.path().join("f");
        let file = std::fs::File::create(&path).ok()?;
        let probe = CString::new("user.coppice.probe").ok()?;
        if let Err(e) = set_fd(file.as_fd(), &probe, b"1") {
            println!("SKIP {test}: the temp dir has no user xattrs ({e})");
            return None;
        }
        Some((dir, file, path))
    }

    #[test]
    fn replace_swaps_the_whole_set_and_keeps_foreign_attributes() {
        let Some((_dir, file, path)) = scratch("replace_swaps_the_whole_set") else {
            return;
        };
        replace(file.as_fd(), &meta(&[("a", "1"), ("b", "2")])).unwrap();
        assert_eq!(read(&path), meta(&[("a", "1"), ("b", "2")]));
        replace(file.as_fd(), &meta(&[("b", "3"), ("c", "")])).unwrap();
        assert_eq!(read(&path), meta(&[("b", "3"), ("c", "")]));
        replace(file.as_fd(), &Metadata::new()).unwrap();
        assert_eq!(read(&path), Metadata::new());
        // The probe attribute is outside `user.e2b.` and survives every replacement.
        let probe = CString::new("user.coppice.probe").unwrap();
        assert_eq!(get_fd(file.as_fd(), &probe).unwrap(), b"1");
    }

    #[test]
    fn a_failed_replace_restores_the_previous_set() {
        let Some((_dir, file, path)) = scratch("a_failed_replace_restores") else {
            return;
        };
        replace(file.as_fd(), &meta(&[("keep", "yes")])).unwrap();
        // The VFS refuses values over 64 KiB on every filesystem; `a` is written first
        // (keys are ordered), so the rollback has something to undo.
        let huge = "x".repeat(64 * 1024 + 1);
        let err = replace(file.as_fd(), &meta(&[("a", "1"), ("b", &huge)])).unwrap_err();
        assert!(
            matches!(&err, XattrError::Io { op: "write", source, .. } if source.raw_os_error() == Some(libc::E2BIG)),
            "{err:?}"
        );
        assert_eq!(read(&path), meta(&[("keep", "yes")]));
    }

    #[test]
    fn unsupported_filesystem_allows_only_an_empty_set() {
        // procfs has no user attributes; a read-only descriptor is enough to try.
        let file = std::fs::File::open("/proc/self/status").unwrap();
        assert!(matches!(
            replace(file.as_fd(), &meta(&[("a", "1")])),
            Err(XattrError::Unsupported)
        ));
        assert!(matches!(replace(file.as_fd(), &Metadata::new()), Ok(())));
        assert_eq!(read(Path::new("/proc/self/status")), Metadata::new());
    }

    #[test]
    fn non_utf8_entries_are_skipped_when_reading() {
        let Some((_dir, file, path)) = scratch("non_utf8_entries_are_skipped") else {
            return;
        };
        replace(file.as_fd(), &meta(&[("ok", "fine")])).unwrap();
        // Set from inside the sandbox, bypassing the upload checks.
        let bad = CString::new("user.e2b.bin").unwrap();
        set_fd(file.as_fd(), &bad, b"\xff\xfe").unwrap();
        assert_eq!(read(&path), meta(&[("ok", "fine")]));
    }
}
