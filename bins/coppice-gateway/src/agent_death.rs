//! A sandbox whose agent died: noticed, recorded and torn down.
//!
//! The agent is the sandbox's PID 1, so when it dies every process in the sandbox dies with
//! it and nothing can come back. Two places notice: the proxy, when the agent's socket
//! refuses a connection, and the sampler, when a sandbox is down to one task or none.

use coppice_lifecycle::state::SandboxState;

use crate::{Cause, Entry, Gateway};

/// Checks that a running sandbox's agent still lives, and if it died, ends the sandbox.
/// The sandbox is recorded as killed with cause `failure` (E2B's way of saying a sandbox
/// is gone; the event is `sandbox.lifecycle.killed`), the gateway's log says so with how
/// the agent ended, the memory limit's kill count and where the sandbox's own log is, and
/// the sandbox is torn down. From then on, as for any sandbox that is gone, the control
/// plane answers 404 and the data plane E2B's 502 "The sandbox was not found", which the
/// SDKs read as not running. Returns whether the agent was dead.
///
/// The caller must not hold the sandbox's operation lock.
pub(crate) async fn check(gw: &Gateway, entry: &Entry) -> bool {
    if entry.lifecycle().state != SandboxState::Running || gw.runtime.alive(&entry.id).await {
        return false;
    }
    let _op = entry.op.write().await;
    // Again under the lock: a kill or pause may have got there first.
    if gw.entry(&entry.id).is_none()
        || entry.lifecycle().state != SandboxState::Running
        || gw.runtime.alive(&entry.id).await
    {
        return false;
    }
    let oom_kills = gw
        .runtime
        .enforcement(&entry.id)
        .await
        .map(|u| u.oom_kills)
        .ok();
    let ending = gw.runtime.init_ending(&entry.id).await;
    tracing::error!(
        sandbox = %entry.id,
        agent = ending.as_deref().unwrap_or("gone"),
        ?oom_kills,
        sandbox_log = %gw.runtime.log_path(&entry.id).display(),
        "the sandbox's agent died, and the sandbox with it; recording it as killed (cause failure)"
    );
    if let Err(e) = gw.kill(entry, Cause::Failure).await {
        tracing::error!(sandbox = %entry.id, error = ?e, "recording the agent's death failed");
    }
    true
}
