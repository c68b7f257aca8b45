//! A template's `startCmd` and `readyCmd` (E2B's `set_start_cmd`): the start command is left
//! running in the sandbox, and the ready command is run until it succeeds.
//!
//! E2B runs them once at build time and snapshots the running machine, so its sandboxes start
//! ready. A jail has no memory snapshot: here a build runs them once to check them (after
//! capturing its last layer, so what the start command writes is not in the template), and
//! every sandbox of the template runs them again when it is created, whose answer waits until
//! the ready command succeeds. That costs each create the start command's warm-up (a
//! `wait_for_timeout(10_000)` ready command is ten seconds).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::builds::agent::{self, Ending};
use crate::builds::store::Defaults;

/// How long the ready command may take to succeed.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the start command may take to start, and one run of the ready command.
const ONE_RUN: Duration = Duration::from_secs(30);
/// The pause between runs of the ready command.
const READY_INTERVAL: Duration = Duration::from_millis(200);

/// Whether `defaults` has a start or a ready command.
pub(crate) fn has_commands(defaults: &Defaults) -> bool {
    defaults.start_cmd.is_some() || defaults.ready_cmd.is_some()
}

/// Starts the start command (as the template's user, else `user`, with its `ENV` and in its
/// `WORKDIR`) through the agent at `socket` and runs the ready command until it exits 0;
/// `line` gets what happens.
pub(crate) async fn start_and_wait(
    socket: &Path,
    token: Option<&str>,
    defaults: &Defaults,
    line: &mut (dyn FnMut(&str) + Send),
) -> Result<(), String> {
    let user = defaults
        .user
        .as_deref()
        .unwrap_or(crate::runtime::DEFAULT_USER);
    let command = |script| agent::Command {
        user,
        script,
        envs: &defaults.env,
        cwd: defaults.workdir.as_deref(),
        timeout: ONE_RUN,
        token,
    };
    if let Some(start) = &defaults.start_cmd {
        agent::spawn(socket, &command(start))
            .await
            .map_err(|e| format!("start command {start:?}: {e}"))?;
        line(&format!("start command started: {start}"));
    }
    let Some(ready) = &defaults.ready_cmd else {
        return Ok(());
    };
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let run = agent::Command {
            timeout: left.min(ONE_RUN).max(Duration::from_secs(1)),
            ..command(ready)
        };
        let ending = agent::run(socket, &run, &mut |_| {})
            .await
            .map_err(|e| format!("ready command {ready:?}: {e}"))?;
        if ending == Ending::Exited(0) {
            line(&format!("ready command succeeded: {ready}"));
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the ready command {ready:?} did not succeed within {}s (last: {ending:?})",
                READY_TIMEOUT.as_secs()
            ));
        }
        tokio::time::sleep(READY_INTERVAL).await;
    }
}
