//! Users and groups from the sandbox's own `passwd(5)` and `group(5)` files.
//!
//! The agent reads the files itself instead of going through NSS, so the binary can be
//! linked statically and sees exactly the users of the template it is mounted into.
//! The files are read on every lookup: they are small, and a template may add users at
//! run time.

use std::path::{Component, Path, PathBuf};

use base64::Engine as _;
use http::HeaderMap;

use crate::connect::{Code, RpcError};
use crate::state::AgentState;

/// One `passwd` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct User {
    pub(crate) name: String,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) home: PathBuf,
}

fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|s| s.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

fn parse_user(line: &str) -> Option<User> {
    let f: Vec<&str> = line.split(':').collect();
    if f.len() < 7 || line.starts_with('#') {
        return None;
    }
    Some(User {
        name: f[0].to_owned(),
        uid: f[2].parse().ok()?,
        gid: f[3].parse().ok()?,
        home: PathBuf::from(f[5]),
    })
}

/// The user called `name`.
pub(crate) fn by_name(state: &AgentState, name: &str) -> Option<User> {
    read_lines(&state.config.passwd)
        .iter()
        .filter_map(|l| parse_user(l))
        .find(|u| u.name == name)
}

/// The name of the user with `uid`, or the number as text.
pub(crate) fn uid_name(state: &AgentState, uid: u32) -> String {
    read_lines(&state.config.passwd)
        .iter()
        .filter_map(|l| parse_user(l))
        .find(|u| u.uid == uid)
        .map_or_else(|| uid.to_string(), |u| u.name)
}

/// The name of the group with `gid`, or the number as text.
pub(crate) fn gid_name(state: &AgentState, gid: u32) -> String {
    read_lines(&state.config.group)
        .iter()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 3 && f[2].parse::<u32>().ok() == Some(gid)).then(|| f[0].to_owned())
        })
        .unwrap_or_else(|| gid.to_string())
}

/// The supplementary groups of `user`: its primary group plus every group listing it.
pub(crate) fn groups(state: &AgentState, user: &User) -> Vec<u32> {
    let mut out = vec![user.gid];
    for l in read_lines(&state.config.group) {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 4 {
            continue;
        }
        if f[3].split(',').any(|m| m == user.name) {
            if let Ok(g) = f[2].parse::<u32>() {
                if !out.contains(&g) {
                    out.push(g);
                }
            }
        }
    }
    out
}

/// The user named by `Authorization: Basic base64("<user>:")`, else the sandbox default.
///
/// Unknown users are `unauthenticated` with envd's message.
pub(crate) fn from_headers(state: &AgentState, headers: &HeaderMap) -> Result<User, RpcError> {
    let name = match headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        Some(v) => {
            let Some(b64) = v.strip_prefix("Basic ") else {
                return Err(RpcError::new(
                    Code::Unauthenticated,
                    "invalid authorization header",
                ));
            };
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|_| {
                    RpcError::new(Code::Unauthenticated, "invalid authorization header")
                })?;
            let text = String::from_utf8_lossy(&raw).into_owned();
            text.split(':').next().unwrap_or("").to_owned()
        }
        None => String::new(),
    };
    named_or_default(state, &name)
}

/// The user called `name`, or the sandbox default when `name` is empty.
pub(crate) fn named_or_default(state: &AgentState, name: &str) -> Result<User, RpcError> {
    let name = if name.is_empty() {
        state.default_user_name()
    } else {
        name.to_owned()
    };
    by_name(state, &name)
        .ok_or_else(|| RpcError::new(Code::Unauthenticated, format!("invalid username: '{name}'")))
}

/// Resolves a request path the way envd does: `~` and relative paths against the user's
/// home, then `.` and `..` removed lexically (`/..` stays `/`).
pub(crate) fn resolve_path(path: &str, user: &User) -> PathBuf {
    let joined = if path == "~" {
        user.home.clone()
    } else if let Some(rest) = path.strip_prefix("~/") {
        user.home.join(rest)
    } else if path.starts_with('/') {
        PathBuf::from(path)
    } else {
        user.home.join(path)
    };
    clean(&joined)
}

/// Lexical clean of an absolute path.
pub(crate) fn clean(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user() -> User {
        User {
            name: "user".into(),
            uid: 1000,
            gid: 1000,
            home: PathBuf::from("/home/user"),
        }
    }

    #[test]
    fn paths_resolve_like_envd() {
        let u = user();
        assert_eq!(resolve_path("a.txt", &u), PathBuf::from("/home/user/a.txt"));
        assert_eq!(resolve_path("~/x/../y", &u), PathBuf::from("/home/user/y"));
        assert_eq!(resolve_path("/../../etc", &u), PathBuf::from("/etc"));
        assert_eq!(resolve_path("../other", &u), PathBuf::from("/home/other"));
        assert_eq!(resolve_path("", &u), PathBuf::from("/home/user"));
        assert_eq!(resolve_path("/tmp/./a//b/", &u), PathBuf::from("/tmp/a/b"));
    }

    #[test]
    fn passwd_lines_parse() {
        let u = parse_user("user:x:1000:1001:User:/home/user:/bin/bash").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1001));
        assert_eq!(parse_user("garbage"), None);
        assert_eq!(parse_user("a:x:notanumber:1:::"), None);
    }
}
