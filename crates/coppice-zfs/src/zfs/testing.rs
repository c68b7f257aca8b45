//! A [`CommandRunner`] that records command lines and answers with canned outputs, for
//! unit tests of the zfs driver's command plans.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use coppice_lifecycle::backend::BackendError;

use super::runner::{CommandOutput, CommandRunner};

/// Records every command line (joined by spaces) and answers from rules matched by prefix:
/// the oldest one-shot answer first ([`RecordingRunner::on`]), then a standing answer
/// ([`RecordingRunner::always`]), else success with empty output.
#[derive(Debug, Default)]
pub struct RecordingRunner {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    calls: Vec<String>,
    once: VecDeque<(String, CommandOutput)>,
    always: Vec<(String, CommandOutput)>,
}

impl RecordingRunner {
    /// A runner with no rules: every command succeeds and prints nothing.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Answers the next command starting with `prefix` with `output`, once.
    pub fn on(&self, prefix: &str, output: CommandOutput) -> &Self {
        self.state().once.push_back((prefix.to_owned(), output));
        self
    }

    /// Answers every command starting with `prefix` (and matching no one-shot rule) with
    /// `output`.
    pub fn always(&self, prefix: &str, output: CommandOutput) -> &Self {
        self.state().always.push((prefix.to_owned(), output));
        self
    }

    /// The command lines run so far, oldest first.
    pub fn calls(&self) -> Vec<String> {
        self.state().calls.clone()
    }

    /// Forgets the recorded calls (not the rules).
    pub fn clear_calls(&self) {
        self.state().calls.clear();
    }
}

impl CommandRunner for RecordingRunner {
    async fn run(
        &self,
        argv: Vec<String>,
        _timeout: Duration,
    ) -> Result<CommandOutput, BackendError> {
        let line = argv.join(" ");
        let mut state = self.state();
        state.calls.push(line.clone());
        if let Some(i) = state.once.iter().position(|(p, _)| line.starts_with(p)) {
            if let Some((_, out)) = state.once.remove(i) {
                return Ok(out);
            }
        }
        Ok(state
            .always
            .iter()
            .find(|(p, _)| line.starts_with(p))
            .map_or_else(|| CommandOutput::ok(""), |(_, out)| out.clone()))
    }
}
