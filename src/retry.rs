//! Exponential backoff with jitter, for retrying transient failures.

use std::time::Duration;

use rand::Rng;

/// Delays between attempts: `base * factor^(attempt-1)`, capped, then
/// spread by ±`jitter` so that replicas that failed together do not retry
/// together.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub base: Duration,
    pub factor: f64,
    pub cap: Duration,
    pub jitter: f64,
}

impl Backoff {
    /// The delay before retry number `attempt` (1 = first retry), without jitter.
    pub fn nominal(&self, attempt: u32) -> Duration {
        let exp = self.factor.powi(attempt.saturating_sub(1).min(64) as i32);
        let secs = (self.base.as_secs_f64() * exp).min(self.cap.as_secs_f64());
        Duration::from_secs_f64(secs.max(0.0))
    }

    /// The delay before retry number `attempt`, with jitter applied.
    pub fn delay(&self, attempt: u32) -> Duration {
        let nominal = self.nominal(attempt).as_secs_f64();
        let spread = if self.jitter > 0.0 {
            rand::thread_rng().gen_range(-self.jitter..=self.jitter)
        } else {
            0.0
        };
        Duration::from_secs_f64((nominal * (1.0 + spread)).max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff() -> Backoff {
        Backoff {
            base: Duration::from_secs(1),
            factor: 2.0,
            cap: Duration::from_secs(30),
            jitter: 0.1,
        }
    }

    #[test]
    fn delays_double_until_the_cap() {
        let b = backoff();
        let secs: Vec<u64> = (1..=7).map(|a| b.nominal(a).as_secs()).collect();
        assert_eq!(secs, vec![1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(b.nominal(10_000), Duration::from_secs(30));
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        let b = backoff();
        for _ in 0..1000 {
            let d = b.delay(3).as_secs_f64();
            assert!((3.6..=4.4).contains(&d), "{d}");
        }
    }
}
