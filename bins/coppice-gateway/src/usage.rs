//! Each sandbox's resource history, for `GET /sandboxes/{id}/metrics`: the gateway samples
//! every running sandbox's cgroups and storage every [`SAMPLE_INTERVAL`] (E2B samples every
//! 5 s too) and keeps the last [`HISTORY`] samples in memory, one ring per sandbox. The
//! history is not persisted: it starts again empty after a gateway restart, and goes with
//! the sandbox when it is killed. Paused sandboxes are not sampled (nothing in them runs).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use coppice_lifecycle::backend::{DiskUsage, Limits, ResourceUsage};

/// How often every running sandbox is sampled.
pub(crate) const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);
/// Samples kept per sandbox: one hour at [`SAMPLE_INTERVAL`].
pub(crate) const HISTORY: usize = 720;
/// How long a sandbox whose CPU time stands still keeps its last disk reading: nothing in it
/// ran, so nothing in it wrote, and the walk of its writable layer is skipped. Thousands of
/// idle sandboxes then cost a file read each per sample, not a directory walk.
const DISK_REUSE_MS: u64 = 60_000;

/// The CPUs a sandbox with `limits` has, as E2B's `cpuCount` reports them.
pub(crate) fn cpu_count(limits: &Limits) -> u32 {
    limits.cpu_millis.map_or(1, |m| m.div_ceil(1000))
}

/// One reading of a sandbox's use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Sample {
    /// When, in milliseconds since the Unix epoch.
    pub(crate) at: u64,
    /// CPU time used since the sandbox started, in nanoseconds.
    pub(crate) cpu_nanos: u64,
    /// CPU use since the previous sample, in percent of the sandbox's CPUs.
    pub(crate) cpu_pct: f64,
    /// Memory charged to the sandbox, in bytes, page cache included.
    pub(crate) memory_bytes: u64,
    /// The page cache part of `memory_bytes`.
    pub(crate) memory_cache_bytes: u64,
    /// Bytes its own writes take on disk.
    pub(crate) disk_bytes: u64,
    /// When `disk_bytes` was read (earlier than `at` when an idle sandbox reused it).
    pub(crate) disk_at: u64,
}

/// A sandbox's samples, oldest first.
#[derive(Debug, Default)]
pub(crate) struct History {
    samples: Mutex<VecDeque<Sample>>,
}

/// CPU use between two readings, in percent of `cpus`, within 0..=100.
fn cpu_pct(cpu_nanos: u64, wall_ms: u64, cpus: u32) -> f64 {
    if wall_ms == 0 || cpus == 0 {
        return 0.0;
    }
    #[allow(
        clippy::cast_precision_loss,
        reason = "a percentage needs no more precision"
    )]
    let pct = cpu_nanos as f64 / (wall_ms as f64 * 1e6) / f64::from(cpus) * 100.0;
    pct.clamp(0.0, 100.0)
}

impl History {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Sample>> {
        // Each critical section is one push or one copy, so a poisoned lock holds
        // consistent data.
        self.samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds a reading taken at `at`; CPU use is measured from the previous sample, or for
    /// the first one as the average since `started_at`. Returns the sample.
    pub(crate) fn record(
        &self,
        at: u64,
        started_at: u64,
        cpus: u32,
        usage: &ResourceUsage,
        disk: &DiskUsage,
    ) -> Sample {
        Self::push(
            &mut self.lock(),
            at,
            started_at,
            cpus,
            usage,
            (disk.written_bytes, at),
        )
    }

    /// [`History::record`] without a new disk reading, when the sandbox used no CPU since the
    /// previous sample and that one's disk reading is younger than [`DISK_REUSE_MS`]; `None`
    /// when the disk must be read.
    pub(crate) fn record_idle(
        &self,
        at: u64,
        started_at: u64,
        cpus: u32,
        usage: &ResourceUsage,
    ) -> Option<Sample> {
        let mut samples = self.lock();
        let prev = *samples.back()?;
        if prev.cpu_nanos != usage.cpu_nanos || at.saturating_sub(prev.disk_at) >= DISK_REUSE_MS {
            return None;
        }
        let disk = (prev.disk_bytes, prev.disk_at);
        Some(Self::push(&mut samples, at, started_at, cpus, usage, disk))
    }

    fn push(
        samples: &mut VecDeque<Sample>,
        at: u64,
        started_at: u64,
        cpus: u32,
        usage: &ResourceUsage,
        (disk_bytes, disk_at): (u64, u64),
    ) -> Sample {
        let (base_at, base_cpu) = match samples.back() {
            Some(prev) if prev.at < at && prev.cpu_nanos <= usage.cpu_nanos => {
                (prev.at, prev.cpu_nanos)
            }
            _ => (started_at, 0),
        };
        let sample = Sample {
            at,
            cpu_nanos: usage.cpu_nanos,
            cpu_pct: cpu_pct(
                usage.cpu_nanos.saturating_sub(base_cpu),
                at.saturating_sub(base_at),
                cpus,
            ),
            memory_bytes: usage.memory_bytes,
            memory_cache_bytes: usage.memory_cache_bytes.min(usage.memory_bytes),
            disk_bytes,
            disk_at,
        };
        if samples.len() == HISTORY {
            samples.pop_front();
        }
        samples.push_back(sample);
        sample
    }

    /// The samples taken from `start` to `end` (milliseconds, both included), oldest first.
    pub(crate) fn between(&self, start: u64, end: u64) -> Vec<Sample> {
        self.lock()
            .iter()
            .filter(|s| (start..=end).contains(&s.at))
            .copied()
            .collect()
    }

    /// The newest sample.
    pub(crate) fn latest(&self) -> Option<Sample> {
        self.lock().back().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(cpu_nanos: u64, memory_bytes: u64) -> ResourceUsage {
        ResourceUsage {
            cpu_nanos,
            memory_bytes,
            ..ResourceUsage::default()
        }
    }

    #[test]
    fn cpu_is_measured_between_samples() {
        let h = History::default();
        let disk = DiskUsage {
            written_bytes: 4096,
            shared_bytes: 0,
        };
        // Half a CPU of two on average over the first 10 s.
        let s = h.record(10_000, 0, 2, &usage(5_000_000_000, 1 << 20), &disk);
        assert!((s.cpu_pct - 25.0).abs() < 1e-9, "{}", s.cpu_pct);
        assert_eq!((s.memory_bytes, s.disk_bytes), (1 << 20, 4096));
        // Then both CPUs flat out for 5 s.
        let s = h.record(15_000, 0, 2, &usage(15_000_000_000, 1 << 20), &disk);
        assert!((s.cpu_pct - 100.0).abs() < 1e-9, "{}", s.cpu_pct);
        // Then idle.
        let s = h.record(20_000, 0, 2, &usage(15_000_000_000, 1 << 20), &disk);
        assert_eq!(s.cpu_pct, 0.0);
        assert_eq!(h.latest(), Some(s));
        let at: Vec<u64> = h.between(10_000, 15_000).iter().map(|s| s.at).collect();
        assert_eq!(at, [10_000, 15_000]);
        assert_eq!(h.between(20_001, 30_000), []);
    }

    #[test]
    fn readings_that_go_backwards_never_make_nonsense() {
        let h = History::default();
        let disk = DiskUsage::default();
        h.record(10_000, 0, 1, &usage(2_000_000_000, 0), &disk);
        // A counter that went down (a cgroup recreated) measures from the start again.
        let s = h.record(12_000, 0, 1, &usage(1_000_000_000, 0), &disk);
        assert!((s.cpu_pct - 1_000.0 / 120.0).abs() < 1e-9, "{}", s.cpu_pct);
        // A sample at the same instant measures from the start, and more CPU than wall
        // time (a clock step) is capped.
        let s = h.record(12_000, 11_999, 1, &usage(9_000_000_000, 0), &disk);
        assert_eq!(s.cpu_pct, 100.0);
        assert_eq!(cpu_pct(1, 0, 1), 0.0);
        // The cache is never more than the charge it is part of (two files read apart).
        let odd = ResourceUsage {
            memory_bytes: 10,
            memory_cache_bytes: 12,
            ..ResourceUsage::default()
        };
        let s = h.record(13_000, 0, 1, &odd, &disk);
        assert_eq!((s.memory_bytes, s.memory_cache_bytes), (10, 10));
    }

    #[test]
    fn an_idle_sandbox_reuses_its_disk_reading_for_a_minute() {
        let h = History::default();
        let idle = usage(1_000, 1 << 20);
        // Nothing to reuse before the first full sample.
        assert_eq!(h.record_idle(5_000, 0, 1, &idle), None);
        let disk = DiskUsage {
            written_bytes: 8192,
            shared_bytes: 0,
        };
        h.record(5_000, 0, 1, &idle, &disk);
        let s = h.record_idle(10_000, 0, 1, &idle).expect("idle: reused");
        assert_eq!(
            (s.at, s.disk_bytes, s.disk_at, s.cpu_pct),
            (10_000, 8192, 5_000, 0.0)
        );
        // CPU moved: the disk must be read again.
        assert_eq!(h.record_idle(15_000, 0, 1, &usage(2_000, 1 << 20)), None);
        // Idle, but the reading is a minute old by then.
        assert!(h.record_idle(64_999, 0, 1, &idle).is_some());
        assert_eq!(h.record_idle(65_000, 0, 1, &idle), None);
        assert_eq!(h.latest().map(|s| s.at), Some(64_999));
    }

    #[test]
    fn the_ring_keeps_the_newest_hour() {
        let h = History::default();
        let disk = DiskUsage::default();
        for i in 0..(HISTORY as u64 + 10) {
            h.record(i * 5000, 0, 1, &usage(i, 0), &disk);
        }
        let all = h.between(0, u64::MAX);
        assert_eq!(all.len(), HISTORY);
        assert_eq!(all[0].at, 10 * 5000);
        assert_eq!(h.latest().unwrap().at, (HISTORY as u64 + 9) * 5000);
    }
}
