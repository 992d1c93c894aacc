//! Rate limits for log lines that an outage or a misbehaving server could repeat without
//! end: the first few go out at once, then one per interval, each saying how many were
//! held back since the one before.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct LogThrottle {
    burst: u32,
    every: Duration,
    passed: u32,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogThrottle {
    /// Lets `burst` lines through at once, then one per `every`.
    pub fn new(burst: u32, every: Duration) -> Self {
        LogThrottle {
            burst,
            every,
            passed: 0,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(held back since the last line)` when this line should be logged; `None` when
    /// it is held back (and counted).
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        let due = self
            .last
            .is_none_or(|last| now.saturating_duration_since(last) >= self.every);
        if self.passed < self.burst || due {
            self.passed = self.passed.saturating_add(1);
            self.last = Some(now);
            return Some(std::mem::take(&mut self.suppressed));
        }
        self.suppressed += 1;
        None
    }

    /// The trouble is over: the next lines go out at once again (still reporting what was
    /// held back).
    pub fn reset(&mut self) {
        self.passed = 0;
        self.last = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_per_interval_with_the_count_held_back() {
        let mut throttle = LogThrottle::new(2, Duration::from_secs(10));
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        assert_eq!(throttle.admit(at(0)), Some(0));
        assert_eq!(throttle.admit(at(0)), Some(0));
        assert_eq!(throttle.admit(at(1)), None);
        assert_eq!(throttle.admit(at(5)), None);
        assert_eq!(throttle.admit(at(10)), Some(2));
        assert_eq!(throttle.admit(at(11)), None);
        assert_eq!(throttle.admit(at(20)), Some(1));
        // An hour of failures every second is a few hundred lines at most, not thousands.
        let logged = (21..3600)
            .filter(|s| throttle.admit(at(*s)).is_some())
            .count();
        assert!(logged <= 360, "{logged}");
    }

    #[test]
    fn reset_lets_the_next_burst_through() {
        let mut throttle = LogThrottle::new(1, Duration::from_secs(60));
        let now = Instant::now();
        assert_eq!(throttle.admit(now), Some(0));
        assert_eq!(throttle.admit(now), None);
        throttle.reset();
        assert_eq!(throttle.admit(now), Some(1));
    }
}
