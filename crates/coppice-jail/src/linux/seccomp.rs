//! The seccomp filter installed in every sandbox right before its init is exec'd.
//!
//! A deny-list, like Docker's default profile in spirit: it refuses the system calls that
//! reach past the sandbox — module loading, kexec, bpf, the keyring, mounting and the new
//! mount API, namespace creation and entry, swap, reboot, clock setting, raw port I/O, file
//! handles that bypass path checks — with `EPERM`, and everything else is allowed. The user
//! namespace already denies most of these; the filter is the second wall. `clone3` gets
//! `ENOSYS` because its flags live in memory a filter cannot read, and libc then falls back to
//! `clone`, whose namespace flags the filter does check. Foreign architectures are killed.
//!
//! It also keeps the sandbox's hands off its init, the agent: system calls that act on
//! another process by pid and that the kernel allows between processes of the same uid
//! (resource limits, scheduling and I/O priority, CPU affinity), or that the kernel already
//! refuses for the agent (`ptrace`, `process_vm_readv`/`writev`: the agent's memory belongs
//! to the host's user namespace, `docs/backends.md`), are refused with `EPERM` when they
//! name pid 1, which in the sandbox's pid namespace is always its init (no nested pid
//! namespace can be made). Only the low 32 bits of a pid argument are compared, as the
//! kernel reads a pid as an `int`. Renicing and I/O priorities by user are refused outright,
//! since the agent runs as sandbox root.

use libc::sock_filter;

/// `AUDIT_ARCH_X86_64` from `<linux/audit.h>`.
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
/// `AUDIT_ARCH_AARCH64` from `<linux/audit.h>`.
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

/// Syscalls refused with `EPERM`, by name so the table can be read.
const DENIED: &[(&str, libc::c_long)] = &[
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("bpf", libc::SYS_bpf),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("open_tree", libc::SYS_open_tree),
    ("move_mount", libc::SYS_move_mount),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("unshare", libc::SYS_unshare),
    ("setns", libc::SYS_setns),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("reboot", libc::SYS_reboot),
    ("acct", libc::SYS_acct),
    ("quotactl", libc::SYS_quotactl),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("syslog", libc::SYS_syslog),
    ("vhangup", libc::SYS_vhangup),
    #[cfg(target_arch = "x86_64")]
    ("iopl", libc::SYS_iopl),
    #[cfg(target_arch = "x86_64")]
    ("ioperm", libc::SYS_ioperm),
    #[cfg(target_arch = "x86_64")]
    ("uselib", libc::SYS_uselib),
    #[cfg(target_arch = "x86_64")]
    ("_sysctl", libc::SYS__sysctl),
    #[cfg(target_arch = "x86_64")]
    ("lookup_dcookie", libc::SYS_lookup_dcookie),
];

/// Syscalls refused with `EPERM` when the pid in the given argument is 1 (the init).
const INIT_GUARDED: &[(&str, libc::c_long, u32)] = &[
    ("ptrace", libc::SYS_ptrace, 1),
    ("process_vm_readv", libc::SYS_process_vm_readv, 0),
    ("process_vm_writev", libc::SYS_process_vm_writev, 0),
    ("prlimit64", libc::SYS_prlimit64, 0),
    ("sched_setaffinity", libc::SYS_sched_setaffinity, 0),
    ("sched_setscheduler", libc::SYS_sched_setscheduler, 0),
    ("sched_setparam", libc::SYS_sched_setparam, 0),
    ("sched_setattr", libc::SYS_sched_setattr, 0),
];

/// Syscalls of the `(which, who)` shape refused when `which` is the given "by user" value,
/// or `who` is 1 (the init's pid, and its process group: the agent leads its own session).
const INIT_GUARDED_WHICH_WHO: &[(&str, libc::c_long, u32)] = &[
    // `PRIO_USER`.
    ("setpriority", libc::SYS_setpriority, 2),
    // `IOPRIO_WHO_USER`.
    ("ioprio_set", libc::SYS_ioprio_set, 3),
];

/// Namespace flags refused in `clone`'s first argument.
const NAMESPACE_FLAGS: u32 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u32;

// Classic BPF opcodes (`<linux/filter.h>`); every one fits in 8 bits.
#[allow(clippy::cast_possible_truncation)]
const BPF_LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
#[allow(clippy::cast_possible_truncation)]
const BPF_JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
#[allow(clippy::cast_possible_truncation)]
const BPF_JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
#[allow(clippy::cast_possible_truncation)]
const BPF_JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
#[allow(clippy::cast_possible_truncation)]
const BPF_RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

// Offsets in `struct seccomp_data`.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARG0_LOW: u32 = 16;

/// Offset of the low 32 bits of argument `n` (little-endian).
const fn off_arg_low(n: u32) -> u32 {
    OFF_ARG0_LOW + 8 * n
}

/// x32 syscalls carry this bit; the filter refuses them all.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// The syscall names the filter denies, for tests.
#[cfg(test)]
pub(crate) fn denied_names() -> impl Iterator<Item = &'static str> {
    DENIED.iter().map(|(name, _)| *name)
}

/// Builds the filter program.
pub(crate) fn filter() -> Vec<sock_filter> {
    let nr = |n: libc::c_long| u32::try_from(n).unwrap_or(u32::MAX);
    // Layout: header, one JEQ per denied syscall, the clone check, then three returns.
    // Jumps are relative, so each jump is computed against the final return block.
    let mut prog = vec![
        stmt(BPF_LD_W_ABS, OFF_ARCH),
        jump(BPF_JEQ_K, AUDIT_ARCH, 1, 0),
        stmt(BPF_RET_K, libc::SECCOMP_RET_KILL_PROCESS),
        stmt(BPF_LD_W_ABS, OFF_NR),
    ];
    // Index of the returns once everything is laid out.
    let body = DENIED.len()
        + 2 /* x32 + clone3 */
        + 3 * INIT_GUARDED.len()
        + 5 * INIT_GUARDED_WHICH_WHO.len()
        + 4 /* clone check */;
    let ret_allow = prog.len() + body;
    let ret_eperm = ret_allow + 1;
    let ret_enosys = ret_allow + 2;
    let rel = |from: usize, to: usize| u8::try_from(to - from - 1).unwrap_or(u8::MAX);

    let i = prog.len();
    prog.push(jump(BPF_JGE_K, X32_SYSCALL_BIT, rel(i, ret_eperm), 0));
    for (_, n) in DENIED {
        let i = prog.len();
        prog.push(jump(BPF_JEQ_K, nr(*n), rel(i, ret_eperm), 0));
    }
    // The init's guards: a matching syscall loads its pid argument and is decided there.
    for (_, n, arg) in INIT_GUARDED {
        prog.push(jump(BPF_JEQ_K, nr(*n), 0, 2));
        prog.push(stmt(BPF_LD_W_ABS, off_arg_low(*arg)));
        let i = prog.len();
        prog.push(jump(BPF_JEQ_K, 1, rel(i, ret_eperm), rel(i, ret_allow)));
    }
    for (_, n, by_user) in INIT_GUARDED_WHICH_WHO {
        prog.push(jump(BPF_JEQ_K, nr(*n), 0, 4));
        prog.push(stmt(BPF_LD_W_ABS, off_arg_low(0)));
        let i = prog.len();
        prog.push(jump(BPF_JEQ_K, *by_user, rel(i, ret_eperm), 0));
        prog.push(stmt(BPF_LD_W_ABS, off_arg_low(1)));
        let i = prog.len();
        prog.push(jump(BPF_JEQ_K, 1, rel(i, ret_eperm), rel(i, ret_allow)));
    }
    let i = prog.len();
    prog.push(jump(BPF_JEQ_K, nr(libc::SYS_clone3), rel(i, ret_enosys), 0));
    // clone: refuse namespace flags in its first argument.
    let i = prog.len();
    prog.push(jump(BPF_JEQ_K, nr(libc::SYS_clone), 0, rel(i, ret_allow)));
    prog.push(stmt(BPF_LD_W_ABS, OFF_ARG0_LOW));
    let i = prog.len();
    prog.push(jump(BPF_JSET_K, NAMESPACE_FLAGS, rel(i, ret_eperm), 0));
    let i = prog.len();
    prog.push(jump(BPF_JEQ_K, 0, rel(i, ret_allow), rel(i, ret_allow)));
    debug_assert_eq!(prog.len(), ret_allow);
    let errno = |e: i32| libc::SECCOMP_RET_ERRNO | (u32::try_from(e).unwrap_or(1) & 0xffff);
    prog.push(stmt(BPF_RET_K, libc::SECCOMP_RET_ALLOW));
    prog.push(stmt(BPF_RET_K, errno(libc::EPERM)));
    prog.push(stmt(BPF_RET_K, errno(libc::ENOSYS)));
    prog
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny interpreter for the instructions the filter uses, so the program's decisions
    /// are checked without installing it.
    fn run(prog: &[sock_filter], arch: u32, nr: u32, arg0: u32) -> u32 {
        run_args(prog, arch, nr, [arg0, 0])
    }

    const OFF_ARG1_LOW: u32 = off_arg_low(1);

    fn run_args(prog: &[sock_filter], arch: u32, nr: u32, args: [u32; 2]) -> u32 {
        let mut acc = 0u32;
        let mut pc = 0usize;
        loop {
            let ins = prog[pc];
            match ins.code {
                BPF_LD_W_ABS => {
                    acc = match ins.k {
                        OFF_NR => nr,
                        OFF_ARCH => arch,
                        OFF_ARG0_LOW => args[0],
                        OFF_ARG1_LOW => args[1],
                        other => panic!("unexpected load offset {other}"),
                    };
                    pc += 1;
                }
                BPF_JEQ_K | BPF_JGE_K | BPF_JSET_K => {
                    let taken = match ins.code {
                        BPF_JEQ_K => acc == ins.k,
                        BPF_JGE_K => acc >= ins.k,
                        _ => acc & ins.k != 0,
                    };
                    pc += 1 + usize::from(if taken { ins.jt } else { ins.jf });
                }
                BPF_RET_K => return ins.k,
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    fn n(x: libc::c_long) -> u32 {
        u32::try_from(x).unwrap()
    }

    const EPERM: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;

    #[test]
    fn denies_host_escape_syscalls_and_allows_the_rest() {
        let prog = filter();
        assert!(prog.len() < 255, "jumps must stay in u8 range");
        for (name, nr) in DENIED {
            assert_eq!(run(&prog, AUDIT_ARCH, n(*nr), 0), EPERM, "{name}");
        }
        for nr in [
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_execve,
            libc::SYS_getpid,
        ] {
            assert_eq!(run(&prog, AUDIT_ARCH, n(nr), 0), libc::SECCOMP_RET_ALLOW);
        }
        assert!(denied_names().any(|x| x == "kexec_load"));
    }

    #[test]
    fn clone_is_allowed_without_namespace_flags() {
        let prog = filter();
        let fork_flags = (libc::CLONE_CHILD_SETTID | libc::SIGCHLD) as u32;
        assert_eq!(
            run(&prog, AUDIT_ARCH, n(libc::SYS_clone), fork_flags),
            libc::SECCOMP_RET_ALLOW
        );
        let userns = fork_flags | libc::CLONE_NEWUSER as u32;
        assert_eq!(run(&prog, AUDIT_ARCH, n(libc::SYS_clone), userns), EPERM);
        assert_eq!(
            run(&prog, AUDIT_ARCH, n(libc::SYS_clone3), 0),
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32
        );
    }

    #[test]
    fn foreign_architectures_and_x32_are_refused() {
        let prog = filter();
        assert_eq!(
            run(&prog, 0x4000_0003, n(libc::SYS_getpid), 0),
            libc::SECCOMP_RET_KILL_PROCESS
        );
        assert_eq!(run(&prog, AUDIT_ARCH, X32_SYSCALL_BIT | 39, 0), EPERM);
    }

    #[test]
    fn the_init_is_out_of_reach_by_pid() {
        let prog = filter();
        assert!(prog.len() < 255, "jumps must stay in u8 range");
        let allow = libc::SECCOMP_RET_ALLOW;
        for (name, nr, arg) in INIT_GUARDED {
            let mut at_init = [0u32; 2];
            at_init[*arg as usize] = 1;
            assert_eq!(
                run_args(&prog, AUDIT_ARCH, n(*nr), at_init),
                EPERM,
                "{name}"
            );
            let mut other = [0u32; 2];
            other[*arg as usize] = 42;
            assert_eq!(run_args(&prog, AUDIT_ARCH, n(*nr), other), allow, "{name}");
            // Pid 0 is the caller itself.
            assert_eq!(run_args(&prog, AUDIT_ARCH, n(*nr), [0, 0]), allow, "{name}");
        }
        // ptrace's request is its first argument: PTRACE_ATTACH (16) of pid 1 is refused.
        assert_eq!(
            run_args(&prog, AUDIT_ARCH, n(libc::SYS_ptrace), [16, 1]),
            EPERM
        );
        assert_eq!(
            run_args(&prog, AUDIT_ARCH, n(libc::SYS_ptrace), [16, 7]),
            allow
        );
        let setprio = n(libc::SYS_setpriority);
        // PRIO_PROCESS 1 and PRIO_PGRP 1 are the agent; PRIO_USER anyone is refused.
        assert_eq!(run_args(&prog, AUDIT_ARCH, setprio, [0, 1]), EPERM);
        assert_eq!(run_args(&prog, AUDIT_ARCH, setprio, [1, 1]), EPERM);
        assert_eq!(run_args(&prog, AUDIT_ARCH, setprio, [2, 1000]), EPERM);
        assert_eq!(run_args(&prog, AUDIT_ARCH, setprio, [0, 0]), allow);
        assert_eq!(run_args(&prog, AUDIT_ARCH, setprio, [0, 99]), allow);
        let ioprio = n(libc::SYS_ioprio_set);
        assert_eq!(run_args(&prog, AUDIT_ARCH, ioprio, [1, 1]), EPERM);
        assert_eq!(run_args(&prog, AUDIT_ARCH, ioprio, [3, 0]), EPERM);
        assert_eq!(run_args(&prog, AUDIT_ARCH, ioprio, [1, 0]), allow);
        // The other rules still hold after the guards.
        assert_eq!(run(&prog, AUDIT_ARCH, n(libc::SYS_mount), 0), EPERM);
        let userns = libc::CLONE_NEWUSER as u32;
        assert_eq!(run(&prog, AUDIT_ARCH, n(libc::SYS_clone), userns), EPERM);
        assert_eq!(run(&prog, AUDIT_ARCH, n(libc::SYS_getpid), 1), allow);
    }
}
