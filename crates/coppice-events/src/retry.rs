//! When to try a delivery again: the schedule, what a response means, and `Retry-After`.
//!
//! A [`RetryPolicy`] is a list of delays between attempts plus jitter and a per-attempt
//! timeout. [`RetryPolicy::e2b`] is E2B's default (three retries, ten seconds apart);
//! [`RetryPolicy::standard_webhooks`] is the Standard Webhooks / Svix schedule. The answer to
//! each attempt is classified by [`classify`]: 2xx delivers, 410 disables the webhook, and
//! everything else (3xx included, as Standard Webhooks says) is retried.

use std::time::{Duration, SystemTime};

use time::macros::format_description;
use time::PrimitiveDateTime;

/// The longest `Retry-After` we honour; a receiver asking for more gets this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// How deliveries are retried.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Delay before retry *n* (index 0 = the first retry). Its length is the retry count.
    pub delays: Vec<Duration>,
    /// Each delay is scaled by a random factor in `1 ± jitter` (0 disables; 0.2 = ±20 %).
    pub jitter: f64,
    /// Longest a single attempt (connect, send, response head) may take.
    pub attempt_timeout: Duration,
}

impl RetryPolicy {
    /// E2B's default: three retries, ten seconds apart, 10 s per attempt.
    pub fn e2b() -> Self {
        RetryPolicy {
            delays: vec![Duration::from_secs(10); 3],
            jitter: 0.1,
            attempt_timeout: Duration::from_secs(10),
        }
    }

    /// The Standard Webhooks schedule (Svix's): 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h
    /// after the first attempt, ±20 % jitter, 15 s per attempt.
    pub fn standard_webhooks() -> Self {
        let m = 60;
        let h = 3600;
        RetryPolicy {
            delays: [5, 5 * m, 30 * m, 2 * h, 5 * h, 10 * h, 10 * h]
                .into_iter()
                .map(Duration::from_secs)
                .collect(),
            jitter: 0.2,
            attempt_timeout: Duration::from_secs(15),
        }
    }

    /// The wait before the next attempt after `attempts` have failed, or `None` when the
    /// retries are used up. `retry_after` (already capped) is a floor: we never come back
    /// sooner than the receiver asked. `sample` is a uniform random number in `[0, 1)`.
    pub fn next_delay(
        &self,
        attempts: u32,
        retry_after: Option<Duration>,
        sample: f64,
    ) -> Option<Duration> {
        let index = usize::try_from(attempts.checked_sub(1)?).ok()?;
        let base = *self.delays.get(index)?;
        let jitter = self.jitter.clamp(0.0, 1.0);
        let factor = 1.0 + jitter * (2.0 * sample.clamp(0.0, 1.0) - 1.0);
        let delay = base.mul_f64(factor);
        Some(retry_after.map_or(delay, |ra| delay.max(ra.min(MAX_RETRY_AFTER))))
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy::e2b()
    }
}

/// What an HTTP answer means for a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx: delivered.
    Delivered,
    /// 410 Gone: the receiver is gone for good; disable the webhook.
    Gone,
    /// Anything else: try again if the schedule allows.
    Retry,
}

/// Classifies a response status.
pub fn classify(status: u16) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        410 => Verdict::Gone,
        _ => Verdict::Retry,
    }
}

/// Parses a `Retry-After` value — delay-seconds or an HTTP-date — into a wait from `now`,
/// capped at [`MAX_RETRY_AFTER`]. A date in the past means no wait.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let wait = if let Ok(secs) = value.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        // IMF-fixdate, the form RFC 9110 says senders must use.
        let fmt = format_description!(
            "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
        );
        let at = PrimitiveDateTime::parse(value, &fmt).ok()?.assume_utc();
        let at = SystemTime::from(at);
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// A uniform random number in `[0, 1)` for jitter, from the OS generator.
pub fn jitter_sample() -> f64 {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 4];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        // Without randomness the delay is simply the scheduled one.
        return 0.5;
    }
    f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_count_their_retries() {
        let e2b = RetryPolicy::e2b();
        assert_eq!(e2b.next_delay(1, None, 0.5), Some(Duration::from_secs(10)));
        assert_eq!(e2b.next_delay(3, None, 0.5), Some(Duration::from_secs(10)));
        assert_eq!(e2b.next_delay(4, None, 0.5), None);
        assert_eq!(e2b.next_delay(0, None, 0.5), None);

        let sw = RetryPolicy::standard_webhooks();
        let mid: Vec<u64> = (1..=8)
            .filter_map(|n| sw.next_delay(n, None, 0.5))
            .map(|d| d.as_secs())
            .collect();
        assert_eq!(mid, [5, 300, 1800, 7200, 18000, 36000, 36000]);
    }

    #[test]
    fn jitter_stays_within_its_band() {
        let sw = RetryPolicy::standard_webhooks();
        let low = sw.next_delay(2, None, 0.0).unwrap();
        let high = sw.next_delay(2, None, 0.999_999).unwrap();
        assert_eq!(low, Duration::from_secs(240));
        assert!(high > Duration::from_secs(359) && high <= Duration::from_secs(360));
        for _ in 0..100 {
            let s = jitter_sample();
            assert!((0.0..1.0).contains(&s), "{s}");
        }
    }

    #[test]
    fn retry_after_is_a_floor() {
        let p = RetryPolicy {
            delays: vec![Duration::from_secs(5)],
            jitter: 0.0,
            attempt_timeout: Duration::from_secs(1),
        };
        let ra = Some(Duration::from_secs(120));
        assert_eq!(p.next_delay(1, ra, 0.5), Some(Duration::from_secs(120)));
        let short = Some(Duration::from_secs(1));
        assert_eq!(p.next_delay(1, short, 0.5), Some(Duration::from_secs(5)));
        let huge = Some(Duration::from_secs(10 * 24 * 3600));
        assert_eq!(p.next_delay(1, huge, 0.5), Some(MAX_RETRY_AFTER));
        // Retry-After never adds retries beyond the schedule.
        assert_eq!(p.next_delay(2, ra, 0.5), None);
    }

    #[test]
    fn retry_after_parses_seconds_and_dates() {
        // 1994-11-06T08:49:37Z is 784111777 seconds after the epoch.
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777 - 90);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::from_secs(90))
        );
        let later = now + Duration::from_secs(1000);
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", later),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("999999999", now), Some(MAX_RETRY_AFTER));
    }

    #[test]
    fn statuses() {
        assert_eq!(classify(200), Verdict::Delivered);
        assert_eq!(classify(204), Verdict::Delivered);
        assert_eq!(classify(301), Verdict::Retry);
        assert_eq!(classify(410), Verdict::Gone);
        assert_eq!(classify(429), Verdict::Retry);
        assert_eq!(classify(503), Verdict::Retry);
    }
}
