//! The in-sandbox agent: what E2B's `envd` (port 49983) and its code-interpreter server
//! (port 49999) do, served on one unix socket inside the sandbox.
//!
//! Entry points: [`hop`] serves the socket and picks the surface of each request (the
//! internal hop is documented there and in `docs/envd.md`); `process` and `filesystem` are
//! the Connect-RPC services; `http_api` holds envd's plain HTTP endpoints (`/health`,
//! `/init`, `/envs`, `/metrics`; `files` serves `/files`); `interpreter` is the code
//! interpreter. [`state::AgentState`] is the per-sandbox state set by `/init`, and
//! [`reaper`] owns every `wait` in the process (the agent is PID 1); [`report`] is what the
//! agent tells the gateway about the processes it started (`task.completed`, `task.timeout`),
//! as NDJSON in its run directory; `oom` keeps the agent last in the OOM killer's line and its
//! children first; [`journal`] is the format of the agent's log (JSON lines on stderr) and its
//! reader. [`file_url_signature`] is how a signed file URL is checked, for a router that
//! must find the sandbox a URL without one is for.
//!
//! **Invariant:** nothing here knows about other sandboxes, the gateway's routing or
//! lifecycle; the agent sees one sandbox from the inside.

pub mod agent;
pub mod hop;
pub mod journal;
pub mod reaper;
pub mod report;
pub mod state;

mod connect;
mod creds;
mod fdio;
mod files;
mod filesystem;
mod http_api;
mod interpreter;
mod oom;
mod process;
mod proctable;
mod reply;
mod secret;
mod users;
mod watchers;
mod xattr;

pub use files::file_url_signature;
