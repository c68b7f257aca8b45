//! Supervision of what runs in a sandbox, with the agent as it really runs: PID 1 of a jail
//! on the default template with a small memory limit, reached through its unix socket.
//!
//! - A memory hog, as a command or in a code-interpreter cell, is what the OOM killer takes:
//!   the agent (last in line), the other contexts and the sandbox survive, and the cell says
//!   why it stopped.
//! - Root in the sandbox cannot stop the agent with signals.
//! - The agent answers on E2B's ports on the sandbox's loopback, as E2B's processes do, and a
//!   kernel killed from inside comes back at the next execution (E2B's `test_systemd`).
//!
//! Prints `SKIP <name>: <reason>` and returns where the host cannot run sandboxes.
#![cfg(target_os = "linux")]
// An integration test crate: no `mod tests` wrapper, helpers may unwrap, skip lines reach the
// output, and waiting happens on plain threads.
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::tests_outside_test_module,
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::disallowed_methods
)]

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::Sandbox;

/// Small, so a hog reaches it in a moment.
const MEMORY: u64 = 256 << 20;
/// A cell or command that appends 64 MiB blocks until something stops it.
const HOG: &str = "x = []\nwhile True:\n    x.append(bytearray(64 * 1024 * 1024))\n";

/// The main result's text of an execution, if any.
fn text_of(lines: &[Value]) -> Option<String> {
    lines
        .iter()
        .find(|l| l["type"] == "result" && l["is_main_result"] == true)
        .and_then(|l| l["text"].as_str().map(str::to_owned))
}

fn error_of(lines: &[Value]) -> Option<&Value> {
    lines.iter().find(|l| l["type"] == "error")
}

#[test]
fn a_memory_hog_is_killed_and_the_sandbox_lives_on() {
    let name = "a_memory_hog_is_killed_and_the_sandbox_lives_on";
    let Some(sbx) = Sandbox::start(name, "hogjail1", MEMORY) else {
        return;
    };
    // The agent is last in line for the OOM killer: what it starts takes the maximum score
    // and cannot put itself below the agent (whose score is -941 where the host lets the
    // jail lower it, and 0 where it does not).
    let agent: i32 = sbx
        .run("cat /proc/1/oom_score_adj")
        .stdout
        .trim()
        .parse()
        .unwrap();
    assert!(agent == -941 || agent == 0, "{agent}");
    for user in ["user", "root"] {
        let below = agent - 1;
        let scores = sbx.run_as(
            user,
            &format!(
                "cat /proc/self/oom_score_adj; \
                 echo {below} > /proc/self/oom_score_adj 2>/dev/null || echo refused"
            ),
        );
        assert_eq!(
            scores.stdout,
            "1000\nrefused\n",
            "{user}: {scores:?}; log: {}",
            sbx.log()
        );
    }

    // A context with state, which the hog in another context must not disturb.
    let bystander = sbx.context("python");
    let set = sbx.execute(json!({"code": "kept = 41", "context_id": bystander}));
    assert!(error_of(&set).is_none(), "{set:?}");

    // The hog as a command: killed by the kernel, reported as a signal.
    let hog = sbx.run(&format!("python3 -c '{HOG}'"));
    // SIGKILL, seen directly (bash ran python in its place) or through bash.
    assert!(
        hog.status == "signal: killed" || hog.exit_code == 137,
        "{hog:?}; log: {}",
        sbx.log()
    );

    // The hog in a cell of the default python context: the cell ends with an error that
    // says why, and the context starts afresh at the next execution.
    let lines = sbx.execute(json!({ "code": HOG }));
    let error = error_of(&lines).unwrap_or_else(|| panic!("{lines:?}"));
    assert_eq!(error["name"], "ContextRestarting", "{error}");
    assert!(
        error["value"].as_str().unwrap().contains("out-of-memory"),
        "{error}"
    );
    assert_eq!(lines.last().unwrap()["type"], "end_of_execution");
    let again = sbx.execute(json!({"code": "x = 1; x"}));
    assert_eq!(text_of(&again).as_deref(), Some("1"), "{again:?}");

    // The agent, the other context and the sandbox are all still there.
    let kept = sbx.execute(json!({"code": "kept + 1", "context_id": bystander}));
    assert_eq!(text_of(&kept).as_deref(), Some("42"), "{kept:?}");
    assert_eq!(sbx.run("echo alive").stdout, "alive\n");
}

#[test]
fn root_in_the_sandbox_cannot_stop_the_agent_and_killed_kernels_come_back() {
    let name = "root_in_the_sandbox_cannot_stop_the_agent_and_killed_kernels_come_back";
    let Some(sbx) = Sandbox::start(name, "sigjail1", MEMORY) else {
        return;
    };
    // E2B's ports answer on the sandbox's loopback, where E2B's own test_systemd looks for
    // the code interpreter's health (with curl; bash's /dev/tcp here, which every template
    // has).
    let probe = |port: u16, path: &str| {
        sbx.run(&format!(
            "exec 3<>/dev/tcp/0.0.0.0/{port} && \
             printf 'GET {path} HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && \
             head -n 1 <&3"
        ))
        .stdout
    };
    assert!(
        probe(49999, "/health").starts_with("HTTP/1.1 200"),
        "log: {}",
        sbx.log()
    );
    assert!(probe(49983, "/health").starts_with("HTTP/1.1 204"));

    // The agent's threads block its stop signals; what it starts blocks none, so commands
    // can be stopped and cells interrupted (SIGINT) with their context kept.
    let blocked = sbx.run("grep SigBlk /proc/self/status");
    assert_eq!(blocked.stdout, "SigBlk:\t0000000000000000\n", "{blocked:?}");
    let set = sbx.execute(json!({"code": "state = 1"}));
    assert!(error_of(&set).is_none(), "{set:?}");
    let slow = sbx.execute(json!({"code": "import time; time.sleep(30)", "timeout": 1}));
    assert_eq!(
        error_of(&slow).unwrap()["name"],
        "KeyboardInterrupt",
        "{slow:?}"
    );
    let kept = sbx.execute(json!({"code": "state"}));
    assert_eq!(text_of(&kept).as_deref(), Some("1"), "{kept:?}");

    // A kernel with state; its process is then killed from inside, as root.
    let killed = sbx.run_as("root", "pkill -9 -f '[d]river.py' && echo killed");
    assert_eq!(killed.stdout, "killed\n", "{killed:?}");
    // As E2B's test does: health first, then code.
    assert!(probe(49999, "/health").starts_with("HTTP/1.1 200"));
    // The next execution starts a fresh kernel: the state is gone, the context works.
    let after = sbx.execute(json!({"code": "x = 1; x"}));
    assert_eq!(
        text_of(&after).as_deref(),
        Some("1"),
        "{after:?}; log: {}",
        sbx.log()
    );
    let gone = sbx.execute(json!({"code": "state"}));
    assert_eq!(error_of(&gone).unwrap()["name"], "NameError", "{gone:?}");

    // Stop signals sent by root in the sandbox to the agent are ignored (SIGKILL by the
    // kernel, SIGTERM and SIGINT by the agent, which only obeys senders outside).
    let sent = sbx.run_as("root", "kill -TERM 1; kill -INT 1; kill -KILL 1; echo sent");
    assert_eq!(sent.stdout, "sent\n", "{sent:?}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(sbx.run("echo alive").stdout, "alive\n");
    assert!(
        sbx.log()
            .contains("ignoring a stop signal sent from inside the sandbox"),
        "{}",
        sbx.log()
    );
}

/// What sandbox root tries against its init, one line per attempt: the attempt's name, then
/// `ok` or the errno's name.
const ATTACKS: &str = r#"
import ctypes, errno, os, resource
libc = ctypes.CDLL(None, use_errno=True)
def report(name, f):
    try:
        r = f()
        if r == -1:
            print(name, errno.errorcode[ctypes.get_errno()])
        else:
            print(name, "ok")
    except OSError as e:
        print(name, errno.errorcode[e.errno])
report("ptrace_attach", lambda: libc.ptrace(16, 1, None, None))
report("ptrace_seize", lambda: libc.ptrace(0x4206, 1, None, None))
report("proc_mem_write", lambda: open("/proc/1/mem", "r+b").close())
report("proc_mem_read", lambda: open("/proc/1/mem", "rb").read(1))
report("proc_environ", lambda: open("/proc/1/environ", "rb").read())
report("oom_score_adj", lambda: open("/proc/1/oom_score_adj", "w").write("1000"))
report("prlimit", lambda: resource.prlimit(1, resource.RLIMIT_NOFILE, (0, 0)))
report("setpriority", lambda: os.setpriority(os.PRIO_PROCESS, 1, 19))
report("renice_user", lambda: os.setpriority(os.PRIO_USER, 0, 19))
report("sched_idle", lambda: os.sched_setscheduler(1, os.SCHED_IDLE, os.sched_param(0)))
report("affinity", lambda: os.sched_setaffinity(1, {0}))
report("read_agent", lambda: open("/usr/local/bin/coppice-envd", "rb").read(1))
"#;

#[test]
fn sandbox_root_cannot_trace_change_or_signal_the_agent() {
    let name = "sandbox_root_cannot_trace_change_or_signal_the_agent";
    let Some(sbx) = Sandbox::start(name, "reach1", MEMORY) else {
        return;
    };
    let script = ATTACKS.replace('\'', "'\\''");
    let ran = sbx.run_as("root", &format!("python3 -c '{script}'"));
    let lines: Vec<&str> = ran.stdout.lines().collect();
    assert_eq!(lines.len(), 12, "{ran:?}");
    for line in &lines {
        let (attempt, outcome) = line.split_once(' ').unwrap();
        assert!(
            outcome == "EPERM" || outcome == "EACCES",
            "{attempt} was not refused: {outcome} ({ran:?})"
        );
    }
    // The kernel rule alone (no filter involved): the agent is not dumpable, and its /proc
    // files belong to the host's root, which the sandbox sees as the overflow id.
    let status = sbx.run_as("root", "stat -c '%u' /proc/1/mem");
    assert_eq!(status.stdout, "65534\n", "{status:?}");
    assert_eq!(sbx.run("echo alive").stdout, "alive\n");

    // Signals: the kernel drops SIGSTOP and SIGKILL to a namespace's init from inside, and
    // every other signal the agent has no handler for; the stop signals it reads are
    // ignored when sent from inside. `kill -1 -1` reaches everything but the init.
    let sent = sbx.run_as(
        "root",
        "kill -STOP 1; kill -TERM 1; kill -HUP 1; kill -USR1 1; kill -KILL 1; echo sent",
    );
    assert_eq!(sent.stdout, "sent\n", "{sent:?}");
    let all = sbx.run_as("root", "kill -1 -1; kill -9 -1; echo survived");
    assert_eq!(all.stdout, "survived\n", "{all:?}");
    std::thread::sleep(Duration::from_millis(300));
    let state = sbx.run_as("root", "grep State /proc/1/status");
    assert!(
        state.stdout.contains("S (sleeping)") || state.stdout.contains("R (running)"),
        "{state:?}"
    );
    assert_eq!(sbx.run("echo alive").stdout, "alive\n");
    // Commands the agent starts still take the top OOM score (they make themselves dumpable
    // again to write it), as `user` too.
    assert_eq!(
        sbx.run_as("user", "cat /proc/self/oom_score_adj").stdout,
        "1000\n"
    );
}
