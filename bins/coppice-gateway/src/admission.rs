//! Admission control: whether the host takes one more sandbox.
//!
//! Two limits keep the host answering. `--max-sandboxes` caps the sandboxes that exist at
//! once: those the gateway has (running, paused, being created or torn down), the warm pool,
//! and starts under way. `--min-free-memory` is a floor under the host's available memory
//! (`MemAvailable` in `/proc/meminfo`, read fresh for every decision) that no start may cross;
//! each start under way reserves [`START_RESERVE`] of what is available until it ends.
//!
//! [`Admission::admit`] is the one way a create gets a place: under one lock it counts, decides
//! ([`decide`], a pure function) and books a [`Ticket`], taking a warm sandbox of the template
//! when the pool has one, or a warm sandbox of another template to destroy when only that
//! makes room (the pool shrinks first). The warm-pool filler asks [`Admission::admit_warm`]
//! before every start and [`Admission::surplus_warm`] for a warm sandbox to destroy while memory
//! is below the floor. [`Admission::capacity`] is what `/health` and `/metrics` show.
//!
//! **Invariant:** nothing here knows HTTP (`api/error.rs` turns an [`AdmissionError`] into 429);
//! the only sandboxes it destroys are warm ones, to make room.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::config::Config;
use crate::runtime::{Warm, DEFAULT_LIMITS, TEMPLATES};
use crate::{lock, Gateway};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// The file host memory is read from.
const MEMINFO: &str = "/proc/meminfo";
/// The least `--min-free-memory` defaults to: what a small host needs for the gateway, sshd
/// and the page cache of the template layers.
const MIN_DEFAULT_FLOOR: u64 = 512 * MIB;
/// The default floor is this fraction of the host's memory (1/20 = 5%), when that is more.
const DEFAULT_FLOOR_DIVISOR: u64 = 20;
/// How many times the sandbox memory limit the default `--max-sandboxes` overcommits: each
/// sandbox is budgeted 1/16 of its limit (64 MiB of 1 GiB). Sandboxes are charged only for
/// what they use (an idle one costs about 1 MiB), so dividing by the limit itself would cap a
/// 24 GiB host at 23 sandboxes; the memory floor, not this count, is what protects the host.
pub(crate) const OVERCOMMIT: u64 = 16;
/// What a start reserves of the available memory until it ends: its agent, a shell and the
/// first commands, with room to spare (an idle sandbox settles at about 1 MiB). Concurrent
/// starts each reserve it, so a burst cannot cross the floor between two readings.
pub(crate) const START_RESERVE: u64 = 64 * MIB;
/// What a refused create's `Retry-After` says. The E2B SDKs retry a 429 three times, waiting
/// this long each time, before raising `RateLimitException` with the message.
pub(crate) const RETRY_AFTER: Duration = Duration::from_secs(1);
/// How long a create at the limit waits for a warm start under way (which it can then
/// claim or evict) before it is refused; such a start takes milliseconds.
const WARMING_WAIT: Duration = Duration::from_secs(5);

/// Why a create was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AdmissionError {
    /// `--max-sandboxes` sandboxes exist already.
    #[error("sandbox limit reached: {used} of --max-sandboxes {max} are in use (warm pool included: {warm})")]
    SandboxLimit {
        /// Sandboxes that exist or are being started.
        used: usize,
        /// `--max-sandboxes`.
        max: usize,
        /// Of `used`, warm ones and warm starts.
        warm: usize,
    },
    /// A start would take the host's available memory below `--min-free-memory`.
    #[error(
        "host memory below the floor: {} available, --min-free-memory is {} and a sandbox \
         start reserves {}",
        format_size(*available),
        format_size(*floor),
        format_size(*reserve)
    )]
    MemoryFloor {
        /// Available memory less what starts under way reserve.
        available: u64,
        /// `--min-free-memory`.
        floor: u64,
        /// [`START_RESERVE`].
        reserve: u64,
    },
}

impl AdmissionError {
    /// The `reason` label of `coppice_creates_refused_total`.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            AdmissionError::SandboxLimit { .. } => "max_sandboxes",
            AdmissionError::MemoryFloor { .. } => "memory",
        }
    }
}

/// The limits in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Policy {
    /// `--max-sandboxes`.
    pub(crate) max_sandboxes: usize,
    /// `--min-free-memory`, in bytes.
    pub(crate) min_free_memory: u64,
    /// What each start reserves ([`START_RESERVE`]).
    pub(crate) start_reserve: u64,
}

impl Policy {
    /// The configured limits, with defaults derived from the host's memory (`mem_total`, which
    /// is needed only for a limit left unset).
    pub(crate) fn new(config: &Config, mem_total: Option<u64>) -> Result<Self, String> {
        let total = || {
            mem_total.ok_or_else(|| {
                format!(
                    "cannot read MemTotal from {MEMINFO} to derive the defaults; \
                     set --max-sandboxes and --min-free-memory"
                )
            })
        };
        let min_free_memory = match config.min_free_memory {
            Some(b) => b,
            None => default_floor(total()?),
        };
        let max_sandboxes = match config.max_sandboxes {
            Some(n) => n,
            None => default_max_sandboxes(
                total()?,
                min_free_memory,
                DEFAULT_LIMITS.memory_bytes.unwrap_or(GIB),
            ),
        };
        Ok(Self {
            max_sandboxes,
            min_free_memory,
            start_reserve: START_RESERVE,
        })
    }
}

/// The default `--min-free-memory`: 5% of the host's memory, at least 512 MiB.
pub(crate) fn default_floor(mem_total: u64) -> u64 {
    (mem_total / DEFAULT_FLOOR_DIVISOR).max(MIN_DEFAULT_FLOOR)
}

/// The default `--max-sandboxes`: the memory above the floor divided by the sandbox memory
/// limit, times [`OVERCOMMIT`]; at least 1.
pub(crate) fn default_max_sandboxes(mem_total: u64, floor: u64, memory_limit: u64) -> usize {
    let budget = (memory_limit / OVERCOMMIT).max(1);
    let n = mem_total.saturating_sub(floor) / budget;
    usize::try_from(n).unwrap_or(usize::MAX).max(1)
}

/// Parses a size: bytes, or a whole number with `K`, `M`, `G` or `T` (powers of 1024, also
/// spelled `KiB`, `MB`, ... and in lower case), as in `512M` or `2G`.
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = s.split_at(digits);
    if number.is_empty() {
        return Err(format!(
            "{s:?} is not a size (bytes, or a number with K, M, G or T)"
        ));
    }
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(format!(
                "{s:?} is not a size (bytes, or a number with K, M, G or T)"
            ))
        }
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// A size for people: `300 MiB`, `2 GiB`, `1.5 GiB`.
pub(crate) fn format_size(bytes: u64) -> String {
    let (unit, name) = match bytes {
        b if b >= GIB => (GIB, "GiB"),
        b if b >= MIB => (MIB, "MiB"),
        b if b >= KIB => (KIB, "KiB"),
        _ => return format!("{bytes} B"),
    };
    let whole = bytes / unit;
    // Two decimals, rounded down, without trailing zeros.
    let hundredths = (bytes % unit) * 100 / unit;
    match hundredths {
        0 => format!("{whole} {name}"),
        h if h % 10 == 0 => format!("{whole}.{} {name}", h / 10),
        h => format!("{whole}.{h:02} {name}"),
    }
}

/// `MemTotal` and `MemAvailable` of a `/proc/meminfo` text, in bytes.
pub(crate) fn parse_meminfo(text: &str) -> (Option<u64>, Option<u64>) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|kib| kib.saturating_mul(KIB))
    };
    (field("MemTotal"), field("MemAvailable"))
}

/// What a decision looks at, counted under the admission lock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Census {
    /// Sandboxes the gateway has, in any state (a killed one until its teardown ended).
    pub(crate) live: usize,
    /// Warm sandboxes, every template.
    pub(crate) warm: usize,
    /// Warm sandboxes of the template asked for.
    pub(crate) warm_here: usize,
    /// Places booked by creates whose sandbox is not yet in the registry.
    pub(crate) creating: usize,
    /// Places booked by warm starts whose sandbox is not yet in the pool.
    pub(crate) warming: usize,
    /// Starts under way, each reserving [`Policy::start_reserve`].
    pub(crate) starts: usize,
    /// The host's available memory, if it could be read.
    pub(crate) mem_available: Option<u64>,
}

impl Census {
    /// Places taken: sandboxes that exist plus those booked.
    pub(crate) fn used(&self) -> usize {
        self.live + self.warm + self.creating + self.warming
    }

    /// Available memory less what starts under way reserve.
    fn unreserved(&self, policy: &Policy) -> Option<u64> {
        let reserved = policy
            .start_reserve
            .saturating_mul(u64::try_from(self.starts).unwrap_or(u64::MAX));
        self.mem_available.map(|m| m.saturating_sub(reserved))
    }
}

/// Who asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Want {
    /// A create.
    Create,
    /// The warm-pool filler, for one more warm sandbox.
    Warm,
}

/// How an admitted request gets its sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Take a warm sandbox of the template: the total does not change.
    Claim,
    /// Start a sandbox in a free place.
    Start,
    /// Destroy a warm sandbox of another template, then start one in its place.
    Evict,
}

/// The admission rule. A create takes a warm sandbox of its template if there is one, else a
/// free place, else the place of a warm sandbox of another template; a warm start needs a
/// free place. Either way the available memory, less what starts under way reserve, must stay
/// at or above the floor with this start's reservation too (a claim starts nothing, so it only
/// needs the floor). Unknown memory does not refuse: the count limit still holds.
pub(crate) fn decide(
    policy: &Policy,
    census: &Census,
    want: Want,
) -> Result<Decision, AdmissionError> {
    let free = census.used() < policy.max_sandboxes;
    let decision = match want {
        Want::Create if census.warm_here > 0 => Decision::Claim,
        _ if free => Decision::Start,
        Want::Create if census.warm > 0 => Decision::Evict,
        _ => {
            return Err(AdmissionError::SandboxLimit {
                used: census.used(),
                max: policy.max_sandboxes,
                warm: census.warm + census.warming,
            })
        }
    };
    if let Some(available) = census.unreserved(policy) {
        let needed = match decision {
            Decision::Claim => policy.min_free_memory,
            Decision::Start | Decision::Evict => {
                policy.min_free_memory.saturating_add(policy.start_reserve)
            }
        };
        if available < needed {
            return Err(AdmissionError::MemoryFloor {
                available,
                floor: policy.min_free_memory,
                reserve: policy.start_reserve,
            });
        }
    }
    Ok(decision)
}

/// What the admission lock guards: places booked and starts under way.
#[derive(Debug, Default)]
struct Books {
    creating: usize,
    warming: usize,
    starts: usize,
}

/// An admitted request's hold on its place (until the sandbox is counted in the registry or
/// the pool) and on its start's memory reservation (until the ticket is dropped, after the
/// start). Dropping it gives back whatever it still holds, so a failed start frees both.
#[derive(Debug)]
pub(crate) struct Ticket<'a> {
    books: &'a Mutex<Books>,
    /// The place is still held here: the sandbox is counted nowhere else yet.
    place: Option<Want>,
    /// This ticket reserves a start's memory.
    start: bool,
}

impl Ticket<'_> {
    /// The sandbox is in the registry (or the pool) now, which counts it: the place goes.
    pub(crate) fn counted(&mut self) {
        if let Some(want) = self.place.take() {
            let mut books = lock(self.books);
            match want {
                Want::Create => books.creating -= 1,
                Want::Warm => books.warming -= 1,
            }
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.counted();
        if self.start {
            lock(self.books).starts -= 1;
        }
    }
}

/// Refused creates by reason, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Refused {
    /// Past `--max-sandboxes`.
    pub(crate) max_sandboxes: u64,
    /// Below `--min-free-memory`.
    pub(crate) memory: u64,
}

/// The figures `/health` shows under `capacity` and `/metrics` as gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Capacity {
    /// `--max-sandboxes`.
    pub(crate) max_sandboxes: usize,
    /// Places taken: sandboxes the gateway has, warm ones, starts under way.
    pub(crate) used: usize,
    /// Of `used`, warm sandboxes.
    pub(crate) warm: usize,
    /// Places left under `--max-sandboxes`.
    pub(crate) free: usize,
    /// The host's available memory, if it could be read.
    pub(crate) mem_available_bytes: Option<u64>,
    /// `--min-free-memory`.
    pub(crate) min_free_memory_bytes: u64,
}

/// The admission state of a gateway.
#[derive(Debug)]
pub(crate) struct Admission {
    policy: Policy,
    books: Mutex<Books>,
    refused_count: AtomicU64,
    refused_memory: AtomicU64,
    /// Whether reading the host's memory failed already (it is reported once).
    unreadable: AtomicBool,
}

impl Admission {
    /// The limits of `config`, with defaults derived from this host's memory; logs them.
    pub(crate) fn new(config: &Config) -> Result<Self, String> {
        let (total, available) = match std::fs::read_to_string(MEMINFO) {
            Ok(text) => parse_meminfo(&text),
            Err(_) => (None, None),
        };
        let policy = Policy::new(config, total)?;
        tracing::info!(
            max_sandboxes = policy.max_sandboxes,
            max_sandboxes_from = if config.max_sandboxes.is_some() { "flag" } else { "host memory" },
            min_free_memory = %format_size(policy.min_free_memory),
            min_free_memory_from = if config.min_free_memory.is_some() { "flag" } else { "host memory" },
            start_reserve = %format_size(policy.start_reserve),
            mem_total = %total.map_or_else(|| "unknown".into(), format_size),
            mem_available = %available.map_or_else(|| "unknown".into(), format_size),
            "admission limits"
        );
        Ok(Self::with_policy(policy))
    }

    fn with_policy(policy: Policy) -> Self {
        Self {
            policy,
            books: Mutex::new(Books::default()),
            refused_count: AtomicU64::new(0),
            refused_memory: AtomicU64::new(0),
            unreadable: AtomicBool::new(false),
        }
    }

    /// The host's available memory now (about 13 µs to read, so every decision reads it).
    fn mem_available(&self) -> Option<u64> {
        let read = std::fs::read_to_string(MEMINFO).map_err(|e| e.to_string());
        let available = read.and_then(|t| {
            parse_meminfo(&t)
                .1
                .ok_or_else(|| "no MemAvailable line".to_owned())
        });
        match available {
            Ok(a) => Some(a),
            Err(e) => {
                if !self.unreadable.swap(true, Ordering::Relaxed) {
                    tracing::warn!(file = MEMINFO, error = %e, "cannot read the host's available memory; only --max-sandboxes limits creates");
                }
                None
            }
        }
    }

    /// Counts what exists and what is booked; the caller holds the books' lock.
    fn census(&self, gw: &Gateway, books: &Books, template: Option<&str>) -> Census {
        Census {
            live: lock(&gw.sandboxes).len(),
            warm: TEMPLATES
                .iter()
                .map(|(name, _)| gw.runtime.warm_count(name))
                .sum(),
            warm_here: template.map_or(0, |t| gw.runtime.warm_count(t)),
            creating: books.creating,
            warming: books.warming,
            starts: books.starts,
            mem_available: self.mem_available(),
        }
    }

    /// Decides under the lock and books the outcome; `take` takes the warm sandbox a claim or
    /// an eviction needs, under the same lock, so two requests never count on the same one.
    fn book(
        &self,
        want: Want,
        census: impl FnOnce(&Books) -> Census,
        take: impl FnOnce(Decision) -> Option<Warm>,
    ) -> Result<(Ticket<'_>, Decision, Option<Warm>), (AdmissionError, Census)> {
        let mut books = lock(&self.books);
        let census = census(&books);
        let mut decision = decide(&self.policy, &census, want).map_err(|e| (e, census))?;
        let warm = match decision {
            Decision::Start => None,
            Decision::Claim | Decision::Evict => {
                let taken = take(decision);
                if taken.is_none() {
                    // Only the shutdown drain takes warm sandboxes outside this lock, and the
                    // one it took frees the place this start takes.
                    decision = Decision::Start;
                }
                taken
            }
        };
        match want {
            Want::Create => books.creating += 1,
            Want::Warm => books.warming += 1,
        }
        let start = decision != Decision::Claim;
        if start {
            books.starts += 1;
        }
        Ok((
            Ticket {
                books: &self.books,
                place: Some(want),
                start,
            },
            decision,
            warm,
        ))
    }

    /// Admits a create of `template`: a ticket to keep until the create ends (calling
    /// [`Ticket::counted`] once the sandbox is in the registry), and the warm sandbox it
    /// claimed, if any. Below the memory floor the warm pool is destroyed before the create is
    /// refused, and the decision taken again.
    pub(crate) async fn admit(
        &self,
        gw: &Gateway,
        template: &str,
    ) -> Result<(Ticket<'_>, Option<Warm>), AdmissionError> {
        let mut drained = false;
        // A warm start under way holds a place a create may take once it is done; it takes
        // milliseconds, so a create waits for it rather than be refused.
        let warming_deadline = tokio::time::Instant::now() + WARMING_WAIT;
        loop {
            match self.book(
                Want::Create,
                |books| self.census(gw, books, Some(template)),
                |decision| match decision {
                    Decision::Claim => gw.runtime.claim(template),
                    _ => take_any_warm(gw),
                },
            ) {
                Ok((ticket, Decision::Evict, Some(evicted))) => {
                    tracing::info!(sandbox = %evicted.id, "destroying a warm sandbox to make room for a create");
                    gw.runtime.destroy(&evicted.id).await;
                    return Ok((ticket, None));
                }
                Ok((ticket, _, warm)) => return Ok((ticket, warm)),
                Err((AdmissionError::MemoryFloor { .. }, census))
                    if census.warm > 0 && !drained =>
                {
                    drained = true;
                    let pool: Vec<Warm> = std::iter::from_fn(|| take_any_warm(gw)).collect();
                    tracing::warn!(
                        warm = pool.len(),
                        "host memory below --min-free-memory: destroying the warm pool"
                    );
                    for w in pool {
                        gw.runtime.destroy(&w.id).await;
                    }
                }
                Err((AdmissionError::SandboxLimit { .. }, census))
                    if census.warming > 0 && tokio::time::Instant::now() < warming_deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((e, _)) => {
                    let counter = match e {
                        AdmissionError::SandboxLimit { .. } => &self.refused_count,
                        AdmissionError::MemoryFloor { .. } => &self.refused_memory,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    // At debug: a runaway client would flood the log; the counter is what to watch.
                    tracing::debug!(reason = e.reason(), "create refused: {e}");
                    return Err(e);
                }
            }
        }
    }

    /// Admits one more warm start, if a place and the memory for it are free; the ticket is
    /// kept until the start ended (the sandbox is then in the pool, or gone).
    pub(crate) fn admit_warm(&self, gw: &Gateway) -> Option<Ticket<'_>> {
        self.book(Want::Warm, |books| self.census(gw, books, None), |_| None)
            .ok()
            .map(|(ticket, _, _)| ticket)
    }

    /// A warm sandbox for the filler to destroy: while the host's memory is below the floor,
    /// or while more sandboxes exist than `--max-sandboxes` (after a restart re-adopted them).
    pub(crate) fn surplus_warm(&self, gw: &Gateway) -> Option<Warm> {
        let books = lock(&self.books);
        let census = self.census(gw, &books, None);
        let low = census
            .mem_available
            .is_some_and(|m| m < self.policy.min_free_memory);
        let over = census.used() > self.policy.max_sandboxes;
        if census.warm == 0 || !(low || over) {
            return None;
        }
        let w = take_any_warm(gw)?;
        tracing::info!(sandbox = %w.id, low_memory = low, over_limit = over, "destroying a warm sandbox");
        Some(w)
    }

    /// The figures for `/health` and `/metrics`.
    pub(crate) fn capacity(&self, gw: &Gateway) -> Capacity {
        let books = lock(&self.books);
        let census = self.census(gw, &books, None);
        Capacity {
            max_sandboxes: self.policy.max_sandboxes,
            used: census.used(),
            warm: census.warm,
            free: self.policy.max_sandboxes.saturating_sub(census.used()),
            mem_available_bytes: census.mem_available,
            min_free_memory_bytes: self.policy.min_free_memory,
        }
    }

    /// Refused creates so far.
    pub(crate) fn refused(&self) -> Refused {
        Refused {
            max_sandboxes: self.refused_count.load(Ordering::Relaxed),
            memory: self.refused_memory.load(Ordering::Relaxed),
        }
    }
}

/// Takes a warm sandbox of the template with the most of them.
fn take_any_warm(gw: &Gateway) -> Option<Warm> {
    let name = TEMPLATES
        .iter()
        .map(|(name, _)| *name)
        .max_by_key(|name| gw.runtime.warm_count(name))?;
    gw.runtime.claim(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max: usize, floor: u64) -> Policy {
        Policy {
            max_sandboxes: max,
            min_free_memory: floor,
            start_reserve: 64 * MIB,
        }
    }

    fn plenty() -> Census {
        Census {
            mem_available: Some(100 * GIB),
            ..Census::default()
        }
    }

    #[test]
    fn sizes_parse_as_bytes_or_with_binary_suffixes() {
        assert_eq!(parse_size("1048576"), Ok(MIB));
        assert_eq!(parse_size("512M"), Ok(512 * MIB));
        assert_eq!(parse_size("2G"), Ok(2 * GIB));
        assert_eq!(parse_size("2g"), Ok(2 * GIB));
        assert_eq!(parse_size("2GiB"), Ok(2 * GIB));
        assert_eq!(parse_size("2 GB"), Ok(2 * GIB));
        assert_eq!(parse_size("64k"), Ok(64 * KIB));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size(" 10b "), Ok(10));
        for bad in ["", "M", "-1G", "1.5G", "2X", "G2", "twelve"] {
            assert!(
                parse_size(bad).unwrap_err().contains("not a size"),
                "{bad:?}"
            );
        }
        assert!(parse_size("99999999999T")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn sizes_print_for_people() {
        assert_eq!(format_size(300 * MIB), "300 MiB");
        assert_eq!(format_size(2 * GIB), "2 GiB");
        assert_eq!(format_size(GIB + GIB / 2), "1.5 GiB");
        assert_eq!(format_size(GIB + GIB / 4), "1.25 GiB");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(12), "12 B");
    }

    #[test]
    fn meminfo_gives_total_and_available_in_bytes() {
        let text = "MemTotal:       24683784 kB\nMemFree:        21980980 kB\n\
                    MemAvailable:   24157792 kB\nBuffers:           35636 kB\n";
        assert_eq!(
            parse_meminfo(text),
            (Some(24_683_784 * KIB), Some(24_157_792 * KIB))
        );
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), (Some(KIB), None));
        assert_eq!(parse_meminfo("garbage"), (None, None));
    }

    #[test]
    fn defaults_come_from_host_memory() {
        // 5%, at least 512 MiB.
        assert_eq!(default_floor(4 * GIB), 512 * MIB);
        assert_eq!(default_floor(24 * GIB), 24 * GIB / 20);
        // The incident's host: 24 GiB, 1 GiB sandboxes, 64 MiB budgeted each above the floor.
        let floor = default_floor(24 * GIB);
        assert_eq!(default_max_sandboxes(24 * GIB, floor, GIB), 364);
        assert_eq!(default_max_sandboxes(2 * GIB, 512 * MIB, GIB), 24);
        // Never 0, even on a host smaller than its floor.
        assert_eq!(default_max_sandboxes(256 * MIB, 512 * MIB, GIB), 1);
        // Explicit values win and need no host figure.
        let config = Config::from_args_and_env(
            ["--max-sandboxes", "7", "--min-free-memory", "2G"]
                .into_iter()
                .map(str::to_owned),
            |_| None,
        )
        .unwrap();
        assert_eq!(Policy::new(&config, None).unwrap(), policy(7, 2 * GIB));
        let derived = Config::from_args_and_env(std::iter::empty(), |_| None).unwrap();
        assert!(Policy::new(&derived, None)
            .unwrap_err()
            .contains("--max-sandboxes"));
        let p = Policy::new(&derived, Some(24 * GIB)).unwrap();
        assert_eq!(p, policy(364, floor));
    }

    #[test]
    fn creates_claim_then_start_then_evict_then_stop() {
        let p = policy(3, GIB);
        let c = |live, warm, warm_here| Census {
            live,
            warm,
            warm_here,
            ..plenty()
        };
        assert_eq!(decide(&p, &c(0, 1, 1), Want::Create), Ok(Decision::Claim));
        // At the limit a warm sandbox of the template is still a sandbox for the create.
        assert_eq!(decide(&p, &c(2, 1, 1), Want::Create), Ok(Decision::Claim));
        assert_eq!(decide(&p, &c(1, 1, 0), Want::Create), Ok(Decision::Start));
        // The pool shrinks first: another template's warm sandbox makes room.
        assert_eq!(decide(&p, &c(2, 1, 0), Want::Create), Ok(Decision::Evict));
        assert_eq!(
            decide(&p, &c(3, 0, 0), Want::Create),
            Err(AdmissionError::SandboxLimit {
                used: 3,
                max: 3,
                warm: 0
            })
        );
        // The filler only ever takes a free place.
        assert_eq!(decide(&p, &c(1, 1, 1), Want::Warm), Ok(Decision::Start));
        assert!(matches!(
            decide(&p, &c(2, 1, 1), Want::Warm),
            Err(AdmissionError::SandboxLimit { .. })
        ));
        // Places booked by creates and warm starts count like sandboxes.
        let booked = Census {
            live: 1,
            creating: 1,
            warming: 1,
            ..plenty()
        };
        assert_eq!(
            decide(&p, &booked, Want::Create),
            Err(AdmissionError::SandboxLimit {
                used: 3,
                max: 3,
                warm: 1
            })
        );
    }

    #[test]
    fn starts_keep_the_floor_with_their_reservations() {
        let p = policy(100, GIB);
        let at = |available, starts| Census {
            starts,
            mem_available: Some(available),
            ..Census::default()
        };
        assert_eq!(
            decide(&p, &at(GIB + 64 * MIB, 0), Want::Create),
            Ok(Decision::Start)
        );
        // One start under way reserves 64 MiB, so the next one no longer fits.
        assert_eq!(
            decide(&p, &at(GIB + 64 * MIB, 1), Want::Create),
            Err(AdmissionError::MemoryFloor {
                available: GIB,
                floor: GIB,
                reserve: 64 * MIB
            })
        );
        assert!(matches!(
            decide(&p, &at(GIB, 0), Want::Warm),
            Err(AdmissionError::MemoryFloor { .. })
        ));
        // A claim starts nothing: the floor alone.
        let claim = Census {
            warm: 1,
            warm_here: 1,
            ..at(GIB, 0)
        };
        assert_eq!(decide(&p, &claim, Want::Create), Ok(Decision::Claim));
        let below = Census {
            mem_available: Some(GIB - 1),
            ..claim
        };
        assert!(matches!(
            decide(&p, &below, Want::Create),
            Err(AdmissionError::MemoryFloor { .. })
        ));
        // Unknown memory leaves the count limit in charge.
        let unknown = Census {
            mem_available: None,
            ..Census::default()
        };
        assert_eq!(decide(&p, &unknown, Want::Create), Ok(Decision::Start));
    }

    #[test]
    fn refusals_say_which_limit() {
        let e = AdmissionError::SandboxLimit {
            used: 10,
            max: 10,
            warm: 0,
        };
        assert_eq!(
            e.to_string(),
            "sandbox limit reached: 10 of --max-sandboxes 10 are in use (warm pool included: 0)"
        );
        assert_eq!(e.reason(), "max_sandboxes");
        let e = AdmissionError::MemoryFloor {
            available: 300 * MIB,
            floor: 2 * GIB,
            reserve: 64 * MIB,
        };
        assert_eq!(
            e.to_string(),
            "host memory below the floor: 300 MiB available, --min-free-memory is 2 GiB and \
             a sandbox start reserves 64 MiB"
        );
        assert_eq!(e.reason(), "memory");
    }

    /// Books tickets the way `Admission::admit` does, with `live` and `warm` standing for the
    /// registry and the pool.
    fn book<'a>(
        a: &'a Admission,
        want: Want,
        live: usize,
        warm: &mut Vec<Warm>,
    ) -> Result<(Ticket<'a>, Decision), AdmissionError> {
        let n = warm.len();
        a.book(
            want,
            |books| Census {
                live,
                warm: n,
                warm_here: n,
                creating: books.creating,
                warming: books.warming,
                starts: books.starts,
                mem_available: Some(100 * GIB),
            },
            |_| warm.pop(),
        )
        .map(|(t, d, _)| (t, d))
        .map_err(|(e, _)| e)
    }

    #[test]
    fn concurrent_bookings_never_exceed_the_limit() {
        let a = Admission::with_policy(policy(3, GIB));
        let mut pool = Vec::new();
        // Three creates booked at once, none in the registry yet: the fourth is refused.
        let held: Vec<Ticket<'_>> = (0..3)
            .map(|_| book(&a, Want::Create, 0, &mut pool).unwrap().0)
            .collect();
        assert!(matches!(
            book(&a, Want::Create, 0, &mut pool),
            Err(AdmissionError::SandboxLimit { used: 3, .. })
        ));
        assert!(matches!(
            book(&a, Want::Warm, 0, &mut pool),
            Err(AdmissionError::SandboxLimit { .. })
        ));
        assert_eq!(lock(&a.books).starts, 3);
        // Once they are in the registry their places move there; the starts end with the
        // tickets.
        let mut held = held;
        for t in &mut held {
            t.counted();
        }
        assert_eq!(lock(&a.books).creating, 0);
        assert_eq!(lock(&a.books).starts, 3);
        drop(held);
        assert_eq!(lock(&a.books).starts, 0);
        // A failed create gives its place back.
        let (t, _) = book(&a, Want::Create, 2, &mut pool).unwrap();
        assert!(matches!(
            book(&a, Want::Create, 2, &mut pool),
            Err(AdmissionError::SandboxLimit { .. })
        ));
        drop(t);
        book(&a, Want::Create, 2, &mut pool).unwrap();
    }

    #[test]
    fn a_claim_keeps_the_total_and_reserves_no_start() {
        let a = Admission::with_policy(policy(3, GIB));
        let id = |s: &str| coppice_lifecycle::backend::SandboxId::new(s).unwrap();
        let mut pool = vec![Warm {
            id: id("warm1"),
            pid: 1,
        }];
        // Two live and one warm fill the limit; a create takes the warm one.
        let (mut t, d) = book(&a, Want::Create, 2, &mut pool).unwrap();
        assert_eq!(d, Decision::Claim);
        assert!(pool.is_empty());
        assert_eq!(lock(&a.books).starts, 0);
        // Until it is in the registry, its place is booked: nothing else fits.
        assert!(matches!(
            book(&a, Want::Create, 2, &mut pool),
            Err(AdmissionError::SandboxLimit { .. })
        ));
        t.counted();
        assert!(matches!(
            book(&a, Want::Create, 3, &mut pool),
            Err(AdmissionError::SandboxLimit { .. })
        ));
        drop(t);
        assert_eq!(lock(&a.books).creating, 0);
    }
}
