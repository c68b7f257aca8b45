//! Sandboxes for real: namespaces, cgroups and overlay roots on this host, over the default
//! Debian template built by the storage role's template builder (cached per machine).
//!
//! Each test gets its own state directory and cgroup group, so tests run in parallel without
//! seeing each other, and tears everything down through a guard even when it fails. Without
//! root, namespaces, overlayfs or cgroups a test prints `SKIP <name>: <reason>` and returns.
#![cfg(target_os = "linux")]
// An integration test crate: no `mod tests` wrapper, helpers may unwrap, skip lines must reach
// the test output, and the tests run on plain threads, where `std::thread::sleep` blocks
// nothing else.
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::tests_outside_test_module,
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::disallowed_methods
)]

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use coppice_jail::{JailConfig, LinuxJail};
use coppice_lifecycle::backend::{
    BackendError, BindMount, InitSpec, Isolation, JailSpec, LayerId, Limits, RunState, SandboxId,
    Storage,
};
use support::{
    answer, assert_no_cgroups_but_spares, cgroup_dirs_named, runtime, template, World, ANSWER_WAIT,
};

mod support;

#[test]
fn sandbox_sees_neither_host_processes_nor_host_files() {
    let Some(w) = World::new("sandbox_sees_neither_host_processes_nor_host_files") else {
        return;
    };
    let marker = w.dir.path().join("host-only-marker");
    fs::write(&marker, "host").unwrap();
    let ex = w.start(
        "isolated1",
        &format!(
            "ps -e -o pid= | wc -l > /run/coppice/procs
             id -u > /run/coppice/uid
             hostname > /run/coppice/hostname
             cat /proc/self/uid_map > /run/coppice/uid_map
             test -e {marker} && echo visible > /run/coppice/marker || echo absent > /run/coppice/marker
             ls /sys | wc -l > /run/coppice/sys
             tail -n +3 /proc/net/dev | wc -l > /run/coppice/links
             python3 -c 'import socket; s = socket.create_server((\"127.0.0.1\", 0)); c = socket.create_connection(s.getsockname()); print(\"up\")' > /run/coppice/loopback 2>&1
             mount -t tmpfs none /mnt 2> /run/coppice/mount_err; echo $? > /run/coppice/mount_rc
             touch /run/coppice/done",
            marker = marker.display()
        ),
        Limits::default(),
    );
    answer(&ex, "done");
    // bash (PID 1) and ps, plus the wc pipeline's processes: nothing of the host.
    let procs: u32 = answer(&ex, "procs").trim().parse().unwrap();
    assert!(procs <= 4, "sandbox sees {procs} processes");
    assert_eq!(answer(&ex, "uid").trim(), "0");
    assert_eq!(answer(&ex, "hostname").trim(), "isolated1");
    let map: Vec<String> = answer(&ex, "uid_map")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(map, ["0", "100000", "65536"]);
    assert_eq!(answer(&ex, "marker").trim(), "absent");
    assert_eq!(
        answer(&ex, "sys").trim(),
        "0",
        "host /sys must not be mounted"
    );
    assert_eq!(
        answer(&ex, "links").trim(),
        "1",
        "only loopback in the sandbox's netns"
    );
    assert_eq!(answer(&ex, "loopback").trim(), "up", "loopback is up");
    assert_ne!(answer(&ex, "mount_rc").trim(), "0", "mount must be refused");
    w.kill("isolated1");
}

#[test]
fn sandboxes_do_not_see_each_others_files() {
    let Some(w) = World::new("sandboxes_do_not_see_each_others_files") else {
        return;
    };
    let a = w.start(
        "peera",
        "echo secret > /root/peer-a-secret; touch /run/coppice/done",
        Limits::default(),
    );
    answer(&a, "done");
    let b = w.start(
        "peerb",
        "test -e /root/peer-a-secret && echo visible > /run/coppice/seen || echo absent > /run/coppice/seen
         ls /proc | grep -c '^[0-9]' > /run/coppice/pids
         touch /run/coppice/done",
        Limits::default(),
    );
    answer(&b, "done");
    assert_eq!(answer(&b, "seen").trim(), "absent");
    let pids: u32 = answer(&b, "pids").trim().parse().unwrap();
    assert!(pids <= 4, "peer b sees {pids} processes");
    w.kill("peera");
    w.kill("peerb");
}

#[test]
fn writes_never_reach_the_template() {
    let Some(w) = World::new("writes_never_reach_the_template") else {
        return;
    };
    let template = template();
    let passwd_before = fs::read(template.join("etc/passwd")).unwrap();
    let ex = w.start(
        "writer1",
        "echo intruder:x:0:0::/:/bin/sh >> /etc/passwd
         rm -f /etc/hostname
         echo new > /usr/bin/new-file
         sudo -u user touch /home/user/from-user && stat -c %u /home/user/from-user > /run/coppice/owner
         touch /run/coppice/done",
        Limits::default(),
    );
    answer(&ex, "done");
    assert_eq!(answer(&ex, "owner").trim(), "1000", "sudo -u user works");
    assert_eq!(
        fs::read(template.join("etc/passwd")).unwrap(),
        passwd_before
    );
    assert!(template.join("etc/hostname").exists());
    assert!(!template.join("usr/bin/new-file").exists());
    let usage = runtime()
        .block_on(w.storage.usage(&SandboxId::new("writer1").unwrap()))
        .unwrap();
    assert!(
        usage.written_bytes > 0,
        "the sandbox's writes land in its own layer"
    );
    w.kill("writer1");
}

#[test]
fn fork_bomb_is_stopped_by_the_pids_limit() {
    let Some(w) = World::new("fork_bomb_is_stopped_by_the_pids_limit") else {
        return;
    };
    let limits = Limits {
        pids: Some(48),
        ..Limits::default()
    };
    let ex = w.start(
        "forkbomb",
        "timeout -s KILL 3 bash -c 'bomb() { bomb | bomb & }; bomb' 2>/dev/null
         echo survived > /run/coppice/after
         touch /run/coppice/done",
        limits,
    );
    let id = SandboxId::new("forkbomb").unwrap();
    let rt = runtime();
    let mut peak = 0;
    let deadline = Instant::now() + ANSWER_WAIT;
    while !ex.join("done").exists() {
        peak = peak.max(rt.block_on(w.jail.usage(&id)).unwrap().tasks);
        assert!(Instant::now() < deadline, "the sandbox never finished");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(answer(&ex, "after").trim(), "survived");
    // The refused forks are counted: what the gateway reports as a security.violation. The
    // bomb's first shell returns at once and its children keep forking in the background,
    // so on a busy machine the limit may be reached only after `done`: wait for it.
    let usage = loop {
        let usage = rt.block_on(w.jail.usage(&id)).unwrap();
        peak = peak.max(usage.tasks);
        if usage.tasks_refused > 0 {
            break usage;
        }
        assert!(
            Instant::now() < deadline,
            "no refused fork counted: {usage:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(peak <= 48, "{peak} tasks despite pids.max=48");
    assert_eq!(usage.oom_kills, 0, "{usage:?}");
    // The host can still fork.
    assert!(std::process::Command::new("true")
        .status()
        .unwrap()
        .success());
    w.kill("forkbomb");
}

#[test]
fn memory_hog_is_stopped_by_the_memory_limit() {
    let Some(w) = World::new("memory_hog_is_stopped_by_the_memory_limit") else {
        return;
    };
    let limits = Limits {
        memory_bytes: Some(64 << 20),
        ..Limits::default()
    };
    let ex = w.start(
        "memhog",
        "python3 -c 'b = bytearray(512 << 20); b[::4096] = b\"x\" * len(b[::4096])'
         echo $? > /run/coppice/rc
         touch /run/coppice/done",
        limits,
    );
    answer(&ex, "done");
    assert_eq!(answer(&ex, "rc").trim(), "137", "the hog is OOM-killed");
    let usage = runtime()
        .block_on(w.jail.usage(&SandboxId::new("memhog").unwrap()))
        .unwrap();
    assert!(usage.memory_bytes <= 64 << 20);
    assert!(usage.oom_kills >= 1, "{usage:?}");
    assert_eq!(usage.tasks_refused, 0, "{usage:?}");
    w.kill("memhog");
}

#[test]
fn frozen_sandbox_accrues_no_cpu_and_keeps_its_state() {
    let Some(w) = World::new("frozen_sandbox_accrues_no_cpu_and_keeps_its_state") else {
        return;
    };
    let ex = w.start(
        "freezer1",
        "echo on-disk > /root/state-file
         python3 -c '
import os
n = 0
while True:
    n += 1
    if n % 20000 == 0:
        with open(\"/run/coppice/count.tmp\", \"w\") as f: f.write(str(n))
        os.replace(\"/run/coppice/count.tmp\", \"/run/coppice/count\")
' &
         touch /run/coppice/done",
        Limits::default(),
    );
    answer(&ex, "done");
    answer(&ex, "count");
    let id = SandboxId::new("freezer1").unwrap();
    let rt = runtime();
    rt.block_on(w.jail.pause(&id)).unwrap();
    rt.block_on(w.jail.pause(&id)).expect("pause is idempotent");
    assert_eq!(
        rt.block_on(w.jail.info(&id)).unwrap().state,
        RunState::Paused
    );
    let cpu_frozen = rt.block_on(w.jail.usage(&id)).unwrap().cpu_nanos;
    let count_frozen: u64 = answer(&ex, "count").trim().parse().unwrap();
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        rt.block_on(w.jail.usage(&id)).unwrap().cpu_nanos,
        cpu_frozen
    );
    assert_eq!(
        answer(&ex, "count").trim().parse::<u64>().unwrap(),
        count_frozen
    );
    rt.block_on(w.jail.resume(&id)).unwrap();
    rt.block_on(w.jail.resume(&id))
        .expect("resume is idempotent");
    assert_eq!(
        rt.block_on(w.jail.info(&id)).unwrap().state,
        RunState::Running
    );
    // The counter lives in the process's memory: it continues from where it stopped.
    let deadline = Instant::now() + ANSWER_WAIT;
    loop {
        let n: u64 = answer(&ex, "count").trim().parse().unwrap_or(0);
        if n > count_frozen {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the counter never moved after resume"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(rt.block_on(w.jail.usage(&id)).unwrap().cpu_nanos > cpu_frozen);
    let upper_state = rt.block_on(w.storage.rootfs(&id)).unwrap();
    let coppice_lifecycle::backend::RootfsSpec::Overlay { upper, .. } = upper_state else {
        panic!("overlay storage gives overlay roots");
    };
    assert_eq!(
        fs::read_to_string(upper.join("root/state-file")).unwrap(),
        "on-disk\n"
    );
    w.kill("freezer1");
}

#[test]
fn kill_leaves_no_process_mount_cgroup_or_directory() {
    let Some(w) = World::new("kill_leaves_no_process_mount_cgroup_or_directory") else {
        return;
    };
    let ex = w.start(
        "victim1",
        "(sleep infinity &) ; sleep infinity & touch /run/coppice/done",
        Limits {
            memory_bytes: Some(128 << 20),
            pids: Some(100),
            cpu_millis: Some(500),
        },
    );
    answer(&ex, "done");
    let id = SandboxId::new("victim1").unwrap();
    let rt = runtime();
    let info = rt.block_on(w.jail.info(&id)).unwrap();
    let group = w.group();
    assert!(!cgroup_dirs_named(&group).is_empty());
    // Kill while frozen: frozen tasks must die too.
    rt.block_on(w.jail.pause(&id)).unwrap();
    w.kill("victim1");
    assert!(
        !Path::new(&format!("/proc/{}", info.pid)).exists(),
        "init is gone and reaped"
    );
    assert_no_cgroups_but_spares(&w);
    let jail_dir = w.dir.path().join("jail");
    for sub in ["sandboxes", "roots"] {
        let left: Vec<_> = fs::read_dir(jail_dir.join(sub)).unwrap().collect();
        assert!(left.is_empty(), "{sub} still holds {left:?}");
    }
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&w.dir.path().to_string_lossy().into_owned()));
    assert!(rt.block_on(w.storage.sandboxes()).unwrap().is_empty());
    assert!(matches!(
        rt.block_on(w.jail.info(&id)),
        Err(BackendError::NotFound { .. })
    ));
}

/// Runs in two roles: normally it starts a second copy of this test binary as "the first
/// process", which starts a sandbox and exits; then it re-adopts that sandbox. With
/// `COPPICE_JAIL_HANDOFF` set it is that first process.
#[test]
fn a_new_process_readopts_sandboxes_of_an_earlier_one() {
    const NAME: &str = "a_new_process_readopts_sandboxes_of_an_earlier_one";
    if let Some(state) = std::env::var_os("COPPICE_JAIL_HANDOFF") {
        let state = PathBuf::from(state);
        let mut config = JailConfig::new(state.join("jail"));
        config.cgroup_group = std::env::var("COPPICE_JAIL_HANDOFF_GROUP").unwrap();
        let jail = LinuxJail::open(config).unwrap();
        let rootfs: coppice_lifecycle::backend::RootfsSpec =
            serde_json::from_slice(&fs::read(state.join("rootfs.json")).unwrap()).unwrap();
        let exchange = state.join("exchange").join("adopted1");
        let spec = JailSpec {
            id: SandboxId::new("adopted1").unwrap(),
            rootfs,
            init: InitSpec {
                program: "/bin/bash".into(),
                args: vec![
                    "-c".into(),
                    "echo $$ > /run/coppice/pid; exec sleep infinity".into(),
                ],
                env: vec![],
                cwd: "/".into(),
            },
            mounts: vec![BindMount {
                source: exchange,
                target: "/run/coppice".into(),
                read_only: false,
            }],
            limits: Limits::default(),
            network: None,
        };
        runtime().block_on(jail.start(spec)).unwrap();
        // Exit without killing: the sandbox must outlive this process.
        return;
    }
    let Some(w) = World::new(NAME) else { return };
    let id = SandboxId::new("adopted1").unwrap();
    let rt = runtime();
    let rootfs = rt.block_on(w.storage.create_rootfs(&id, &w.base)).unwrap();
    fs::write(
        w.dir.path().join("rootfs.json"),
        serde_json::to_vec(&rootfs).unwrap(),
    )
    .unwrap();
    let exchange = w.exchange_dir("adopted1");
    // The first process shares our state dir; our own `w.jail` must not be the one that
    // knows the sandbox, so open a fresh driver after the first process is gone.
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env("COPPICE_JAIL_HANDOFF", w.dir.path())
        .env("COPPICE_JAIL_HANDOFF_GROUP", w.group())
        .status()
        .unwrap();
    assert!(status.success(), "first process failed: {status}");
    answer(&exchange, "pid");
    let mut config = JailConfig::new(w.dir.path().join("jail"));
    config.cgroup_group = w.group();
    let second = LinuxJail::open(config).unwrap();
    let list = rt.block_on(second.list()).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].id, id);
    assert_eq!(list[0].state, RunState::Running);
    rt.block_on(second.pause(&id)).unwrap();
    assert_eq!(
        rt.block_on(second.info(&id)).unwrap().state,
        RunState::Paused
    );
    rt.block_on(second.resume(&id)).unwrap();
    assert_eq!(
        rt.block_on(second.info(&id)).unwrap().state,
        RunState::Running
    );
    rt.block_on(second.kill(&id)).unwrap();
    rt.block_on(w.storage.remove_rootfs(&id)).unwrap();
    // Init's parent (the first process) is gone, so the host's init reaps it; wait for that.
    let proc_dir = PathBuf::from(format!("/proc/{}", list[0].pid));
    let deadline = Instant::now() + ANSWER_WAIT;
    while proc_dir.exists() {
        assert!(
            Instant::now() < deadline,
            "the adopted init never went away"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_no_cgroups_but_spares(&w);
}

#[test]
fn a_fork_sees_its_snapshot_and_not_later_writes() {
    let Some(w) = World::new("a_fork_sees_its_snapshot_and_not_later_writes") else {
        return;
    };
    let ex = w.start(
        "source1",
        "echo one > /root/value; rm /etc/issue; touch /run/coppice/done",
        Limits::default(),
    );
    answer(&ex, "done");
    let src = SandboxId::new("source1").unwrap();
    let snap = LayerId::new("source1-snap").unwrap();
    let rt = runtime();
    rt.block_on(w.jail.pause(&src)).unwrap();
    rt.block_on(w.storage.snapshot(&src, &snap)).unwrap();
    rt.block_on(w.jail.resume(&src)).unwrap();
    // Later writes in the source go to its own layer only.
    let upper = match rt.block_on(w.storage.rootfs(&src)).unwrap() {
        coppice_lifecycle::backend::RootfsSpec::Overlay { upper, .. } => upper,
        other => panic!("unexpected {other:?}"),
    };
    fs::write(upper.join("root/value"), "two\n").unwrap();
    let spec = w.spec(
        "fork1",
        &snap,
        "cat /root/value > /run/coppice/value
         test -e /etc/issue && echo present > /run/coppice/issue || echo deleted > /run/coppice/issue
         touch /run/coppice/done",
        Limits::default(),
    );
    rt.block_on(w.jail.start(spec)).unwrap();
    let fork_ex = w.dir.path().join("exchange/fork1");
    answer(&fork_ex, "done");
    assert_eq!(answer(&fork_ex, "value").trim(), "one");
    assert_eq!(answer(&fork_ex, "issue").trim(), "deleted");
    assert!(matches!(
        rt.block_on(w.storage.delete_layer(&snap)),
        Err(BackendError::InUse { .. })
    ));
    w.kill("fork1");
    w.kill("source1");
    rt.block_on(w.storage.delete_layer(&snap)).unwrap();
}

#[test]
fn twenty_sandboxes_start_concurrently() {
    let Some(w) = World::new("twenty_sandboxes_start_concurrently") else {
        return;
    };
    let ids: Vec<String> = (0..20).map(|i| format!("many{i}")).collect();
    let specs: Vec<JailSpec> = ids
        .iter()
        .map(|id| {
            w.spec(
                id,
                &w.base,
                "hostname > /run/coppice/hostname; touch /run/coppice/done",
                Limits {
                    memory_bytes: Some(128 << 20),
                    pids: Some(64),
                    cpu_millis: Some(500),
                },
            )
        })
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let results = rt.block_on(async {
        let tasks: Vec<_> = specs
            .into_iter()
            .map(|spec| {
                let jail = w.jail.clone();
                tokio::spawn(async move { jail.start(spec).await })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    for r in &results {
        assert!(r.is_ok(), "{r:?}");
    }
    for id in &ids {
        let ex = w.dir.path().join("exchange").join(id);
        // `done` comes last: the answer may exist before the shell has written into it.
        answer(&ex, "done");
        assert_eq!(answer(&ex, "hostname").trim(), id);
    }
    assert_eq!(rt.block_on(w.jail.list()).unwrap().len(), 20);
    for id in &ids {
        w.kill(id);
    }
    assert_no_cgroups_but_spares(&w);
}

#[test]
fn bad_specs_are_refused_and_leave_nothing_behind() {
    let Some(w) = World::new("bad_specs_are_refused_and_leave_nothing_behind") else {
        return;
    };
    let rt = runtime();
    let over = Limits {
        memory_bytes: Some(1),
        ..Limits::default()
    };
    let spec = w.spec("badlimits", &w.base, "true", over);
    assert!(matches!(
        rt.block_on(w.jail.start(spec)),
        Err(BackendError::InvalidSpec {
            field: "memory limit",
            ..
        })
    ));

    let mut spec = w.spec("norootfs", &w.base, "true", Limits::default());
    spec.rootfs = coppice_lifecycle::backend::RootfsSpec::Directory("/nonexistent/rootfs".into());
    assert!(matches!(
        rt.block_on(w.jail.start(spec)),
        Err(BackendError::InvalidSpec {
            field: "rootfs",
            ..
        })
    ));

    let mut spec = w.spec("noinit", &w.base, "true", Limits::default());
    spec.init.program = "/no/such/init".into();
    match rt.block_on(w.jail.start(spec)) {
        Err(BackendError::Start { stage, source, .. }) => {
            assert_eq!(stage, "exec init");
            assert_eq!(source.raw_os_error(), Some(libc::ENOENT));
        }
        other => panic!("expected a start error, got {other:?}"),
    }

    let mut spec = w.spec("relinit", &w.base, "true", Limits::default());
    spec.init.program = "bin/bash".into();
    assert!(matches!(
        rt.block_on(w.jail.start(spec)),
        Err(BackendError::InvalidSpec {
            field: "init program",
            ..
        })
    ));

    let ex = w.start("dupe1", "touch /run/coppice/done", Limits::default());
    answer(&ex, "done");
    let spec = JailSpec {
        rootfs: rt
            .block_on(w.storage.rootfs(&SandboxId::new("dupe1").unwrap()))
            .unwrap(),
        ..w.spec("dupe2", &w.base, "true", Limits::default())
    };
    let spec = JailSpec {
        id: SandboxId::new("dupe1").unwrap(),
        ..spec
    };
    assert!(matches!(
        rt.block_on(w.jail.start(spec)),
        Err(BackendError::AlreadyExists { .. })
    ));
    w.kill("dupe1");

    let ghost = SandboxId::new("ghost").unwrap();
    assert!(matches!(
        rt.block_on(w.jail.pause(&ghost)),
        Err(BackendError::NotFound { .. })
    ));
    assert!(matches!(
        rt.block_on(w.jail.kill(&ghost)),
        Err(BackendError::NotFound { .. })
    ));
    // Nothing from the failed starts remains: no record, no cgroup, no mount point.
    assert!(rt.block_on(w.jail.list()).unwrap().is_empty());
    assert_no_cgroups_but_spares(&w);
    let roots: Vec<_> = fs::read_dir(w.dir.path().join("jail/roots"))
        .unwrap()
        .collect();
    assert!(roots.is_empty(), "{roots:?}");
    // The uid of a fresh directory is unaffected by the sandboxes (sanity for the checks).
    assert_eq!(fs::metadata(w.dir.path()).unwrap().uid(), 0);
}

#[test]
fn a_sandbox_joins_the_network_namespace_it_is_given_and_cannot_change_it() {
    let Some(w) =
        World::new("a_sandbox_joins_the_network_namespace_it_is_given_and_cannot_change_it")
    else {
        return;
    };
    // A namespace made by the host, as the network role makes one, kept open by this file.
    let netns = std::thread::spawn(|| {
        // SAFETY: unshares only this thread, which ends right after.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
        fs::File::open("/proc/thread-self/ns/net").unwrap()
    })
    .join()
    .unwrap();
    let inode = netns.metadata().unwrap().ino();
    let mut spec = w.spec(
        "joined1",
        &w.base,
        "stat -L -c %i /proc/self/ns/net > /run/coppice/netns
         python3 -c '
import fcntl, socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    fcntl.ioctl(s, 0x8914, struct.pack(\"16sH14x\", b\"lo\", 1))
    print(\"changed\")
except PermissionError:
    print(\"denied\")
' > /run/coppice/ifup 2>&1
         echo 1 > /proc/sys/net/ipv4/conf/lo/forwarding 2> /dev/null && echo changed > /run/coppice/sysctl || echo denied > /run/coppice/sysctl
         touch /run/coppice/done",
        Limits::default(),
    );
    spec.network = Some(
        PathBuf::from("/proc/self/fd").join(std::os::fd::AsRawFd::as_raw_fd(&netns).to_string()),
    );
    runtime().block_on(w.jail.start(spec)).unwrap();
    let ex = w.dir.path().join("exchange").join("joined1");
    answer(&ex, "done");
    assert_eq!(answer(&ex, "netns").trim(), inode.to_string());
    assert_eq!(
        answer(&ex, "ifup").trim(),
        "denied",
        "sandbox root set a link up"
    );
    assert_eq!(
        answer(&ex, "sysctl").trim(),
        "denied",
        "sandbox root wrote a sysctl"
    );
    w.kill("joined1");

    // Anything but a network namespace is refused before a process exists.
    let mut spec = w.spec("joined2", &w.base, "true", Limits::default());
    spec.network = Some(w.dir.path().to_path_buf());
    assert!(matches!(
        runtime().block_on(w.jail.start(spec)),
        Err(BackendError::InvalidSpec {
            field: "network namespace",
            ..
        })
    ));
    runtime()
        .block_on(w.storage.remove_rootfs(&SandboxId::new("joined2").unwrap()))
        .unwrap();
}
