//! How the zfs driver runs its commands: a trait, so command plans can be recorded in tests.

use std::future::Future;
use std::time::Duration;

use coppice_lifecycle::backend::BackendError;

use crate::command;

/// What one command produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandOutput {
    /// Whether it exited with status 0.
    pub success: bool,
    /// Its exit status as text (`exit status: 1`).
    pub status: String,
    /// Everything it wrote to stdout.
    pub stdout: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

impl CommandOutput {
    /// A successful run that printed `stdout`.
    pub fn ok(stdout: impl Into<String>) -> Self {
        Self {
            success: true,
            status: "exit status: 0".into(),
            stdout: stdout.into(),
            stderr: String::new(),
        }
    }

    /// A run that exited with status 1 after printing `stderr`.
    pub fn failed(stderr: impl Into<String>) -> Self {
        Self {
            success: false,
            status: "exit status: 1".into(),
            stdout: String::new(),
            stderr: stderr.into(),
        }
    }
}

/// Runs one command line (`argv[0]` is the program) to completion, or kills it after
/// `timeout`.
///
/// A command that runs and fails is `Ok` with `success == false`; `Err` means it could not
/// be run at all or did not finish in time (then it is `BackendError::Command` whose status
/// says so), and the driver does not retry it.
pub trait CommandRunner: Send + Sync + 'static {
    /// Runs `argv` and collects its output.
    fn run(
        &self,
        argv: Vec<String>,
        timeout: Duration,
    ) -> impl Future<Output = Result<CommandOutput, BackendError>> + Send;
}

/// Runs commands for real.
///
/// Each command runs to completion on a `spawn_blocking` thread, in its own process group,
/// with a parent-death signal that is tied to the thread that forked it (see the crate's
/// `command` module); `tokio::process` would fork on a runtime thread that may end while
/// the command runs. Dropping the future kills the command and its group, as
/// `kill_on_drop` would.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemRunner;

impl CommandRunner for SystemRunner {
    async fn run(
        &self,
        argv: Vec<String>,
        timeout: Duration,
    ) -> Result<CommandOutput, BackendError> {
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| BackendError::InvalidSpec {
                field: "command",
                reason: "empty command line".into(),
            })?;
        let mut cmd = std::process::Command::new(program);
        cmd.args(args);
        let (lifeline, end) =
            command::lifeline().map_err(|e| BackendError::io("run", program, e))?;
        let out = tokio::task::spawn_blocking(move || command::output(cmd, timeout, Some(end)))
            .await
            .map_err(|e| BackendError::io("run", program, std::io::Error::other(e)))??;
        // Held until here, so that dropping this future while it waits kills the command.
        drop(lifeline);
        Ok(CommandOutput {
            success: out.status.success(),
            status: out.status.to_string(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}
