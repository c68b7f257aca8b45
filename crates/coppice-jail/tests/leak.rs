//! Create and kill sandboxes by the thousand and check that the kernel gives back what they
//! took: the count of memory cgroups (`/proc/cgroups`, dying ones included) and unreclaimable
//! slab (`SUnreclaim` in `/proc/meminfo`).
//!
//! A removed memory cgroup stays allocated for as long as pages charged to it are cached,
//! and every sandbox charges some it never frees (see `docs/backends.md`), so without reuse
//! each cycle leaves one more. The test is alone in its binary because both figures are the
//! whole host's: no other test of this crate may create sandboxes beside it.
#![cfg(target_os = "linux")]
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::tests_outside_test_module,
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::disallowed_methods
)]

use std::fs;

use coppice_lifecycle::backend::Limits;
use support::{answer, assert_no_cgroups_but_spares, World};

mod support;

/// Cycles measured; `COPPICE_LEAK_CYCLES` overrides it (the benchmark runs 5,000).
const CYCLES: usize = 2000;
/// Cycles before the first reading, so that one-time allocations (the first slot, caches
/// warming) are not counted as growth.
const WARM_UP: usize = 50;
/// Growth allowed over the measured cycles.
const TOLERANCE: f64 = 0.05;

/// `memory`'s `num_cgroups` in `/proc/cgroups`, dying cgroups included.
fn memory_cgroups() -> Option<u64> {
    fs::read_to_string("/proc/cgroups")
        .ok()?
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next()? == "memory").then(|| f.nth(1)?.parse().ok())?
        })
}

/// `SUnreclaim` from `/proc/meminfo`, in KiB.
fn unreclaimable_slab_kib() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("SUnreclaim:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// One sandbox that writes to its root, its `/tmp` and its log, then is killed.
fn cycle(w: &World, n: usize) {
    let id = format!("leak{n}");
    let ex = w.start(
        &id,
        "echo a > /root/a; mkdir -p /home/user/d; echo b > /home/user/d/b; \
         echo c > /tmp/c; echo to-the-log; touch /run/coppice/done",
        Limits {
            memory_bytes: Some(256 << 20),
            pids: Some(64),
            cpu_millis: None,
        },
    );
    answer(&ex, "done");
    w.kill(&id);
    fs::remove_dir_all(&ex).unwrap();
}

fn grown(before: u64, after: u64) -> f64 {
    (after as f64 - before as f64) / before as f64
}

#[test]
fn thousands_of_sandboxes_leave_no_kernel_memory_behind() {
    let Some(w) = World::new("thousands_of_sandboxes_leave_no_kernel_memory_behind") else {
        return;
    };
    let Some(_) = memory_cgroups() else {
        println!("SKIP thousands_of_sandboxes_leave_no_kernel_memory_behind: no memory controller");
        return;
    };
    let cycles = std::env::var("COPPICE_LEAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CYCLES);
    for n in 0..WARM_UP {
        cycle(&w, n);
    }
    let cgroups_before = memory_cgroups().unwrap();
    let slab_before = unreclaimable_slab_kib();
    for n in WARM_UP..WARM_UP + cycles {
        cycle(&w, n);
    }
    let cgroups_after = memory_cgroups().unwrap();
    let slab_after = unreclaimable_slab_kib();
    println!(
        "{cycles} create+kill cycles: memory cgroups {cgroups_before} -> {cgroups_after} \
         ({:+.1}%), SUnreclaim {slab_before} -> {slab_after} KiB ({:+.1}%)",
        100.0 * grown(cgroups_before, cgroups_after),
        100.0 * grown(slab_before, slab_after),
    );
    assert!(
        grown(cgroups_before, cgroups_after) <= TOLERANCE,
        "memory cgroups grew from {cgroups_before} to {cgroups_after} over {cycles} cycles"
    );
    assert!(
        grown(slab_before, slab_after) <= TOLERANCE,
        "SUnreclaim grew from {slab_before} to {slab_after} KiB over {cycles} cycles"
    );
    assert_no_cgroups_but_spares(&w);
}
