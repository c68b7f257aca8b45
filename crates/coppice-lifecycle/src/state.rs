//! The sandbox lifecycle as a pure state machine: creating → running ⇄ paused → killed.
//!
//! [`Lifecycle::transition`] is the only way to change a sandbox's state. It takes the current
//! value and a [`Command`] (each carrying the time it happens at, so the machine never reads a
//! clock) and returns the next value together with the [`LifecycleEvent`] the change causes,
//! or a [`TransitionError`] that changes nothing. The timeout window follows E2B:
//! `set_timeout` overwrites it, `connect` and refreshes only extend it, and time spent paused
//! does not consume it. For an auto-resume sandbox the window is an idle timer: traffic
//! ([`Command::Activity`]) pushes its end to the timeout after the traffic.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A point in time: milliseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Millis(pub u64);

impl Millis {
    /// `self + d`, saturating.
    pub fn plus(self, d: Duration) -> Self {
        Millis(
            self.0
                .saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        )
    }

    /// The time from `earlier` to `self`, or zero if `earlier` is later.
    pub fn since(self, earlier: Millis) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

/// Where a sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    /// Being set up; not yet usable.
    Creating,
    /// Usable; its window is running.
    Running,
    /// Frozen; its window is stopped.
    Paused,
    /// Gone for good.
    Killed,
}

/// What happens when the window runs out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    /// Kill the sandbox (E2B's default).
    #[default]
    Kill,
    /// Pause it, keeping memory and files.
    Pause,
}

/// A sandbox's lifecycle settings, fixed at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Policy {
    /// What the window's end does.
    pub on_timeout: OnTimeout,
    /// Whether traffic to a paused sandbox resumes it.
    pub auto_resume: bool,
}

impl Policy {
    /// Checks E2B's rule that auto-resume only makes sense for sandboxes that pause.
    pub fn new(on_timeout: OnTimeout, auto_resume: bool) -> Result<Self, TransitionError> {
        if auto_resume && on_timeout != OnTimeout::Pause {
            return Err(TransitionError::AutoResumeNeedsPause);
        }
        Ok(Self {
            on_timeout,
            auto_resume,
        })
    }
}

/// Why a sandbox was paused, resumed or killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// An API call asked for it.
    Manual,
    /// The window ran out.
    Timeout,
    /// `connect` resumed it.
    Connect,
    /// Traffic to a paused auto-resume sandbox woke it.
    AutoResume,
    /// Creation failed half-way, or the sandbox died on its own.
    Failure,
}

/// What a change to the window was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Update {
    /// `set_timeout` replaced the window.
    Timeout,
    /// A refresh or `connect` extended it.
    Refresh,
    /// Traffic to an auto-resume sandbox moved its idle window.
    Activity,
}

/// The event a transition causes, returned as a value for the caller to record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LifecycleEvent {
    /// `sandbox.lifecycle.created`.
    Created,
    /// `sandbox.lifecycle.paused`.
    Paused {
        /// Why.
        cause: Cause,
    },
    /// `sandbox.lifecycle.resumed`.
    Resumed {
        /// Why.
        cause: Cause,
    },
    /// `sandbox.lifecycle.updated`: the window moved.
    Updated {
        /// How.
        update: Update,
        /// The new end of the window.
        end_at: Millis,
    },
    /// `sandbox.lifecycle.killed`.
    Killed {
        /// Why.
        cause: Cause,
    },
}

impl LifecycleEvent {
    /// The dotted, past-tense event type (`sandbox.lifecycle.created`, ...).
    pub fn event_type(&self) -> &'static str {
        match self {
            LifecycleEvent::Created => "sandbox.lifecycle.created",
            LifecycleEvent::Paused { .. } => "sandbox.lifecycle.paused",
            LifecycleEvent::Resumed { .. } => "sandbox.lifecycle.resumed",
            LifecycleEvent::Updated { .. } => "sandbox.lifecycle.updated",
            LifecycleEvent::Killed { .. } => "sandbox.lifecycle.killed",
        }
    }
}

/// A request to change the lifecycle, stamped with when it happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Setup finished: start the window of `timeout`.
    Started {
        /// Now.
        now: Millis,
    },
    /// Pause the sandbox (manually, or by the reaper with [`Cause::Timeout`]).
    Pause {
        /// Now.
        now: Millis,
        /// Why.
        cause: Cause,
    },
    /// Resume a paused sandbox with a window of `timeout` (E2B's `resume`).
    Resume {
        /// Now.
        now: Millis,
        /// The new window.
        timeout: Duration,
    },
    /// E2B's `connect`: resume a paused sandbox, or extend a running one's window.
    Connect {
        /// Now.
        now: Millis,
        /// The window it asks for.
        timeout: Duration,
    },
    /// Traffic reached a paused sandbox; resumes it only if its policy allows.
    AutoResume {
        /// Now.
        now: Millis,
    },
    /// `set_timeout`: the window of a running sandbox ends `timeout` from now (may shorten it).
    SetTimeout {
        /// Now.
        now: Millis,
        /// The new window.
        timeout: Duration,
    },
    /// A refresh: extend the window to at least `duration` from now.
    Refresh {
        /// Now.
        now: Millis,
        /// How long from now.
        duration: Duration,
    },
    /// Traffic reached a running auto-resume sandbox at `at`: its window, an idle timer, ends
    /// no earlier than its timeout after that.
    Activity {
        /// When the traffic arrived.
        at: Millis,
    },
    /// The reaper found the window over: kill or pause as the policy says.
    Expire {
        /// Now.
        now: Millis,
    },
    /// Kill the sandbox.
    Kill {
        /// Now.
        now: Millis,
        /// Why.
        cause: Cause,
    },
}

/// Why a transition was refused; nothing changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransitionError {
    /// Pause of a paused sandbox (E2B answers 409).
    #[error("sandbox is already paused")]
    AlreadyPaused,
    /// Resume of a running sandbox (E2B answers 409).
    #[error("sandbox is already running")]
    AlreadyRunning,
    /// Anything on a killed sandbox.
    #[error("sandbox was killed")]
    Killed,
    /// An operation that needs a usable sandbox while it is still being created.
    #[error("sandbox is still being created")]
    StillCreating,
    /// The operation needs a running sandbox.
    #[error("sandbox is not running")]
    NotRunning,
    /// Traffic to a paused sandbox without auto-resume.
    #[error("sandbox is paused and does not resume automatically")]
    NoAutoResume,
    /// The reaper fired before the window ended.
    #[error("the sandbox's window has not ended")]
    NotExpired,
    /// Activity would not move the window: the sandbox is not an auto-resume one, or the
    /// window already ends later.
    #[error("the activity does not extend the window")]
    NoExtension,
    /// `autoResume` without `onTimeout: "pause"`.
    #[error("autoResume requires onTimeout \"pause\"")]
    AutoResumeNeedsPause,
}

/// The lifecycle of one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lifecycle {
    /// Current state.
    pub state: SandboxState,
    /// Settings from creation.
    pub policy: Policy,
    /// The window asked for at creation (or by the last `set_timeout`).
    pub timeout: Duration,
    /// When the sandbox started running (creation time until then).
    pub started_at: Millis,
    /// When the window ends, while running. While paused it is where the window stood when
    /// the sandbox was paused; [`Lifecycle::remaining`] holds what is left of it.
    pub end_at: Millis,
    /// What was left of the window when the sandbox was paused.
    pub remaining: Option<Duration>,
}

impl Lifecycle {
    /// The minimum window after an automatic wake (E2B's auto-resume gives at least this).
    pub const AUTO_RESUME_MIN_WINDOW: Duration = Duration::from_secs(300);

    /// A sandbox being created at `now` with a window of `timeout` once it starts.
    pub fn creating(now: Millis, timeout: Duration, policy: Policy) -> Self {
        Self {
            state: SandboxState::Creating,
            policy,
            timeout,
            started_at: now,
            end_at: now.plus(timeout),
            remaining: None,
        }
    }

    /// Whether the window has run out at `now` (only running sandboxes expire).
    pub fn is_expired(&self, now: Millis) -> bool {
        self.state == SandboxState::Running && now >= self.end_at
    }

    /// Whether `Pause` would be accepted.
    pub fn can_pause(&self) -> bool {
        self.state == SandboxState::Running
    }

    /// Whether `Resume` would be accepted.
    pub fn can_resume(&self) -> bool {
        self.state == SandboxState::Paused
    }

    /// Whether data-plane traffic may reach the sandbox (after waking it if needed).
    pub fn can_serve(&self) -> bool {
        self.state == SandboxState::Running
            || (self.state == SandboxState::Paused && self.policy.auto_resume)
    }

    /// Applies `cmd`: the next lifecycle and the event it causes, or why not.
    pub fn transition(&self, cmd: Command) -> Result<(Lifecycle, LifecycleEvent), TransitionError> {
        use SandboxState::{Creating, Killed, Paused, Running};
        let mut next = *self;
        if self.state == Killed {
            return Err(TransitionError::Killed);
        }
        let event = match cmd {
            Command::Started { now } => {
                if self.state != Creating {
                    return Err(TransitionError::AlreadyRunning);
                }
                next.state = Running;
                next.started_at = now;
                next.end_at = now.plus(self.timeout);
                LifecycleEvent::Created
            }
            Command::Kill { cause, .. } => {
                next.state = Killed;
                next.remaining = None;
                LifecycleEvent::Killed { cause }
            }
            _ if self.state == Creating => return Err(TransitionError::StillCreating),
            Command::Pause { now, cause } => {
                if self.state == Paused {
                    return Err(TransitionError::AlreadyPaused);
                }
                next.state = Paused;
                next.remaining = Some(self.end_at.since(now));
                next.end_at = now;
                LifecycleEvent::Paused { cause }
            }
            Command::Resume { now, timeout } => {
                if self.state != Paused {
                    return Err(TransitionError::AlreadyRunning);
                }
                next.resume_with(now, timeout);
                LifecycleEvent::Resumed {
                    cause: Cause::Manual,
                }
            }
            Command::Connect { now, timeout } => {
                if self.state == Paused {
                    let window = self.remaining.unwrap_or_default().max(timeout);
                    next.resume_with(now, window);
                    LifecycleEvent::Resumed {
                        cause: Cause::Connect,
                    }
                } else {
                    next.end_at = self.end_at.max(now.plus(timeout));
                    LifecycleEvent::Updated {
                        update: Update::Refresh,
                        end_at: next.end_at,
                    }
                }
            }
            Command::AutoResume { now } => {
                if self.state != Paused {
                    return Err(TransitionError::AlreadyRunning);
                }
                if !self.policy.auto_resume {
                    return Err(TransitionError::NoAutoResume);
                }
                next.resume_with(now, self.timeout.max(Self::AUTO_RESUME_MIN_WINDOW));
                LifecycleEvent::Resumed {
                    cause: Cause::AutoResume,
                }
            }
            Command::SetTimeout { now, timeout } => {
                // Like E2B, only a running sandbox's window can be set; a paused one gets
                // its new window when it resumes.
                if self.state != Running {
                    return Err(TransitionError::NotRunning);
                }
                next.timeout = timeout;
                next.end_at = now.plus(timeout);
                LifecycleEvent::Updated {
                    update: Update::Timeout,
                    end_at: next.end_at,
                }
            }
            Command::Refresh { now, duration } => {
                if self.state != Running {
                    return Err(TransitionError::NotRunning);
                }
                next.end_at = self.end_at.max(now.plus(duration));
                LifecycleEvent::Updated {
                    update: Update::Refresh,
                    end_at: next.end_at,
                }
            }
            Command::Activity { at } => {
                let end_at = at.plus(self.timeout);
                if self.state != Running {
                    return Err(TransitionError::NotRunning);
                }
                if !self.policy.auto_resume || end_at <= self.end_at {
                    return Err(TransitionError::NoExtension);
                }
                next.end_at = end_at;
                LifecycleEvent::Updated {
                    update: Update::Activity,
                    end_at,
                }
            }
            Command::Expire { now } => {
                if !self.is_expired(now) {
                    return Err(TransitionError::NotExpired);
                }
                match self.policy.on_timeout {
                    OnTimeout::Kill => {
                        next.state = Killed;
                        LifecycleEvent::Killed {
                            cause: Cause::Timeout,
                        }
                    }
                    OnTimeout::Pause => {
                        next.state = Paused;
                        next.remaining = Some(Duration::ZERO);
                        next.end_at = now;
                        LifecycleEvent::Paused {
                            cause: Cause::Timeout,
                        }
                    }
                }
            }
        };
        Ok((next, event))
    }

    fn resume_with(&mut self, now: Millis, window: Duration) {
        self.state = SandboxState::Running;
        self.end_at = now.plus(window);
        self.remaining = None;
    }
}

#[cfg(test)]
mod tests;
