use std::time::Duration;

use proptest::prelude::*;

use super::*;

const MIN: Duration = Duration::from_secs(60);

fn running(now: u64, timeout: Duration, policy: Policy) -> Lifecycle {
    let (l, e) = Lifecycle::creating(Millis(now), timeout, policy)
        .transition(Command::Started { now: Millis(now) })
        .unwrap();
    assert_eq!(e, LifecycleEvent::Created);
    l
}

fn pausing() -> Policy {
    Policy::new(OnTimeout::Pause, true).unwrap()
}

#[test]
fn auto_resume_requires_pause_on_timeout() {
    assert_eq!(
        Policy::new(OnTimeout::Kill, true),
        Err(TransitionError::AutoResumeNeedsPause)
    );
    Policy::new(OnTimeout::Pause, true).unwrap();
    Policy::new(OnTimeout::Kill, false).unwrap();
    assert_eq!(Policy::default().on_timeout, OnTimeout::Kill);
}

#[test]
fn nothing_but_kill_works_while_creating() {
    let c = Lifecycle::creating(Millis(0), MIN, Policy::default());
    assert_eq!(
        c.transition(Command::Pause {
            now: Millis(1),
            cause: Cause::Manual
        }),
        Err(TransitionError::StillCreating)
    );
    let (k, e) = c
        .transition(Command::Kill {
            now: Millis(1),
            cause: Cause::Failure,
        })
        .unwrap();
    assert_eq!(k.state, SandboxState::Killed);
    assert_eq!(e.event_type(), "sandbox.lifecycle.killed");
}

#[test]
fn the_window_starts_when_the_sandbox_runs() {
    let l = running(1_000, MIN, Policy::default());
    assert_eq!(l.started_at, Millis(1_000));
    assert_eq!(l.end_at, Millis(61_000));
    assert!(!l.is_expired(Millis(60_999)));
    assert!(l.is_expired(Millis(61_000)));
}

#[test]
fn pause_twice_is_a_conflict_and_resume_of_running_too() {
    let l = running(0, MIN, Policy::default());
    let (p, e) = l
        .transition(Command::Pause {
            now: Millis(10_000),
            cause: Cause::Manual,
        })
        .unwrap();
    assert_eq!(
        e,
        LifecycleEvent::Paused {
            cause: Cause::Manual
        }
    );
    assert_eq!(
        p.transition(Command::Pause {
            now: Millis(11_000),
            cause: Cause::Manual
        }),
        Err(TransitionError::AlreadyPaused)
    );
    assert_eq!(
        l.transition(Command::Resume {
            now: Millis(1),
            timeout: MIN
        }),
        Err(TransitionError::AlreadyRunning)
    );
}

#[test]
fn paused_time_does_not_consume_the_window() {
    let l = running(0, MIN, Policy::default());
    let (p, _) = l
        .transition(Command::Pause {
            now: Millis(20_000),
            cause: Cause::Manual,
        })
        .unwrap();
    assert_eq!(p.remaining, Some(Duration::from_secs(40)));
    assert!(
        !p.is_expired(Millis(10_000_000)),
        "paused sandboxes never expire"
    );
    // connect with a short timeout keeps the 40 s that were left.
    let (r, e) = p
        .transition(Command::Connect {
            now: Millis(1_000_000),
            timeout: Duration::from_secs(5),
        })
        .unwrap();
    assert_eq!(
        e,
        LifecycleEvent::Resumed {
            cause: Cause::Connect
        }
    );
    assert_eq!(r.end_at, Millis(1_040_000));
}

#[test]
fn set_timeout_overwrites_and_connect_and_refresh_only_extend() {
    let l = running(0, MIN, Policy::default());
    let (shorter, e) = l
        .transition(Command::SetTimeout {
            now: Millis(1_000),
            timeout: Duration::from_secs(5),
        })
        .unwrap();
    assert_eq!(shorter.end_at, Millis(6_000));
    assert_eq!(
        e,
        LifecycleEvent::Updated {
            update: Update::Timeout,
            end_at: Millis(6_000)
        }
    );
    let (same, _) = l
        .transition(Command::Connect {
            now: Millis(1_000),
            timeout: Duration::from_secs(5),
        })
        .unwrap();
    assert_eq!(same.end_at, l.end_at, "connect never shortens");
    let (longer, _) = l
        .transition(Command::Refresh {
            now: Millis(1_000),
            duration: Duration::from_secs(600),
        })
        .unwrap();
    assert_eq!(longer.end_at, Millis(601_000));
}

#[test]
fn expiry_kills_or_pauses_as_the_policy_says() {
    let kill = running(0, MIN, Policy::default());
    assert_eq!(
        kill.transition(Command::Expire {
            now: Millis(59_999)
        }),
        Err(TransitionError::NotExpired)
    );
    let (k, e) = kill
        .transition(Command::Expire {
            now: Millis(60_000),
        })
        .unwrap();
    assert_eq!(k.state, SandboxState::Killed);
    assert_eq!(
        e,
        LifecycleEvent::Killed {
            cause: Cause::Timeout
        }
    );
    let pause = running(0, MIN, pausing());
    let (p, e) = pause
        .transition(Command::Expire {
            now: Millis(60_000),
        })
        .unwrap();
    assert_eq!(p.state, SandboxState::Paused);
    assert_eq!(
        e,
        LifecycleEvent::Paused {
            cause: Cause::Timeout
        }
    );
}

#[test]
fn auto_resume_gives_at_least_five_minutes_or_the_original_window() {
    let short = running(0, MIN, pausing());
    let (p, _) = short
        .transition(Command::Expire {
            now: Millis(60_000),
        })
        .unwrap();
    let (r, e) = p
        .transition(Command::AutoResume {
            now: Millis(100_000),
        })
        .unwrap();
    assert_eq!(
        e,
        LifecycleEvent::Resumed {
            cause: Cause::AutoResume
        }
    );
    assert_eq!(r.end_at, Millis(400_000));
    let long = running(0, Duration::from_secs(3600), pausing());
    let (p, _) = long
        .transition(Command::Pause {
            now: Millis(1),
            cause: Cause::Manual,
        })
        .unwrap();
    let (r, _) = p
        .transition(Command::AutoResume { now: Millis(10) })
        .unwrap();
    assert_eq!(r.end_at, Millis(3_600_010));
    // Without auto-resume, traffic does not wake it.
    let plain = running(0, MIN, Policy::new(OnTimeout::Pause, false).unwrap());
    let (p, _) = plain
        .transition(Command::Pause {
            now: Millis(1),
            cause: Cause::Manual,
        })
        .unwrap();
    assert!(!p.can_serve());
    assert_eq!(
        p.transition(Command::AutoResume { now: Millis(2) }),
        Err(TransitionError::NoAutoResume)
    );
}

#[test]
fn set_timeout_and_refresh_need_a_running_sandbox() {
    let (p, _) = running(0, MIN, Policy::default())
        .transition(Command::Pause {
            now: Millis(1),
            cause: Cause::Manual,
        })
        .unwrap();
    assert_eq!(
        p.transition(Command::SetTimeout {
            now: Millis(2),
            timeout: MIN
        }),
        Err(TransitionError::NotRunning)
    );
    assert_eq!(
        p.transition(Command::Refresh {
            now: Millis(2),
            duration: MIN
        }),
        Err(TransitionError::NotRunning)
    );
}

#[test]
fn activity_moves_only_an_auto_resume_window_and_only_later() {
    let l = running(0, MIN, pausing());
    let (a, e) = l
        .transition(Command::Activity { at: Millis(5_000) })
        .unwrap();
    assert_eq!(a.end_at, Millis(65_000));
    assert_eq!(
        e,
        LifecycleEvent::Updated {
            update: Update::Activity,
            end_at: Millis(65_000)
        }
    );
    // Older traffic, or a window a refresh already made longer, moves nothing.
    assert_eq!(
        a.transition(Command::Activity { at: Millis(4_000) }),
        Err(TransitionError::NoExtension)
    );
    // A kill-on-timeout sandbox keeps E2B's absolute window.
    let k = running(0, MIN, Policy::default());
    assert_eq!(
        k.transition(Command::Activity { at: Millis(5_000) }),
        Err(TransitionError::NoExtension)
    );
    let (p, _) = a
        .transition(Command::Pause {
            now: Millis(6_000),
            cause: Cause::Timeout,
        })
        .unwrap();
    assert_eq!(
        p.transition(Command::Activity { at: Millis(7_000) }),
        Err(TransitionError::NotRunning)
    );
}

fn command() -> impl Strategy<Value = (u8, u64, u64)> {
    (0u8..10, 0u64..10_000, 0u64..3_600_000)
}

fn build(kind: u8, now: Millis, amount: u64) -> Command {
    let d = Duration::from_millis(amount);
    match kind {
        0 => Command::Pause {
            now,
            cause: Cause::Manual,
        },
        1 => Command::Resume { now, timeout: d },
        2 => Command::Connect { now, timeout: d },
        3 => Command::AutoResume { now },
        4 => Command::SetTimeout { now, timeout: d },
        5 => Command::Refresh { now, duration: d },
        6 => Command::Expire { now },
        7 => Command::Kill {
            now,
            cause: Cause::Manual,
        },
        8 => Command::Activity { at: now },
        _ => Command::Started { now },
    }
}

proptest! {
    /// Whatever happens, in order: killed is final, errors change nothing, every success
    /// reports the event matching the new state, and a running sandbox's window never ends
    /// before "now" right after a resume.
    #[test]
    fn lifecycle_invariants(
        timeout in 0u64..3_600_000,
        pause_policy in any::<bool>(),
        auto in any::<bool>(),
        steps in proptest::collection::vec(command(), 0..40),
    ) {
        let policy = Policy::new(
            if pause_policy { OnTimeout::Pause } else { OnTimeout::Kill },
            auto && pause_policy,
        ).unwrap();
        let mut now = Millis(1_000);
        let mut l = Lifecycle::creating(now, Duration::from_millis(timeout), policy);
        for (kind, advance, amount) in steps {
            now = Millis(now.0 + advance);
            let cmd = build(kind, now, amount);
            match l.transition(cmd) {
                Ok((next, event)) => {
                    let expected = match next.state {
                        SandboxState::Running => matches!(
                            event,
                            LifecycleEvent::Created
                                | LifecycleEvent::Resumed { .. }
                                | LifecycleEvent::Updated { .. }
                        ),
                        SandboxState::Paused => matches!(event, LifecycleEvent::Paused { .. }),
                        SandboxState::Killed => matches!(event, LifecycleEvent::Killed { .. }),
                        SandboxState::Creating => false,
                    };
                    prop_assert!(expected, "{:?} after {:?} gave {:?}", next.state, cmd, event);
                    if matches!(event, LifecycleEvent::Resumed { .. }) {
                        prop_assert!(next.end_at >= now);
                    }
                    if next.state == SandboxState::Paused {
                        prop_assert!(next.remaining.is_some());
                        prop_assert!(!next.is_expired(Millis(u64::MAX)));
                    }
                    if next.state == SandboxState::Running {
                        prop_assert!(next.remaining.is_none());
                    }
                    l = next;
                }
                Err(_) => {
                    // Refusals change nothing; killed sandboxes refuse everything.
                    if l.state == SandboxState::Killed {
                        prop_assert_eq!(l.transition(cmd), Err(TransitionError::Killed));
                    }
                }
            }
            if l.state == SandboxState::Killed {
                prop_assert_eq!(
                    l.transition(Command::Kill { now, cause: Cause::Manual }),
                    Err(TransitionError::Killed)
                );
            }
        }
    }

    /// Pausing and resuming with `connect` at any times never loses window time.
    #[test]
    fn pause_resume_preserves_remaining_window(
        timeout in 1u64..3_600_000,
        pause_at in 0u64..3_600_000,
        paused_for in 0u64..100_000_000,
    ) {
        let l = running(0, Duration::from_millis(timeout), Policy::default());
        prop_assume!(pause_at < timeout);
        let (p, _) = l.transition(Command::Pause { now: Millis(pause_at), cause: Cause::Manual }).unwrap();
        let wake = pause_at + paused_for;
        let (r, _) = p.transition(Command::Connect { now: Millis(wake), timeout: Duration::ZERO }).unwrap();
        prop_assert_eq!(r.end_at.0 - wake, timeout - pause_at);
    }
}
