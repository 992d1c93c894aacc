//! Reconnect delays: capped exponential backoff with jitter.

use std::time::Duration;

use rand::Rng;

/// The most a replacement waits after a connection that followed stable ones ended: one
/// loss is not overload, but many clients losing a shared path at once should not redial
/// in the same millisecond.
pub const IMMEDIATE_JITTER: Duration = Duration::from_millis(50);

/// Delays grow as `initial * 2^attempt` up to `max`; each delay is drawn uniformly between
/// `initial` and that ceiling. Jitter spreads the reconnects of many clients (a fleet
/// restarted at once must not hit `apps.connections.open` in step), and the floor of
/// `initial` means no server behaviour can drive a tight loop.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
    /// The one immediate replacement allowed since the last reset has been used.
    immediate_spent: bool,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            attempt: 0,
            immediate_spent: false,
        }
    }

    /// The backoff as it stands after `failures` failures in a row: for a retry schedule
    /// kept elsewhere (the inbox keeps each envelope's attempts on disk).
    pub fn after_failures(mut self, failures: u32) -> Self {
        self.attempt = failures;
        self
    }

    /// The ceiling of the next delay, before jitter.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The next delay; each call raises the ceiling until `max`.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        if ceiling <= self.initial {
            return ceiling;
        }
        rng.random_range(self.initial..=ceiling)
    }

    /// The wait before replacing a connection that ended or was asked to rotate: next to
    /// nothing (at most [`IMMEDIATE_JITTER`]) when nothing has gone wrong since the last
    /// reset, else the next backoff delay, so a server that keeps ending connections
    /// cannot drive a tight loop.
    pub fn after_loss(&mut self, rng: &mut impl Rng) -> Duration {
        if self.attempt == 0 && !self.immediate_spent {
            self.immediate_spent = true;
            return rng.random_range(Duration::ZERO..=IMMEDIATE_JITTER);
        }
        self.next_delay(rng)
    }

    /// Applies new bounds (after a configuration reload); the attempt count is kept.
    pub fn set_bounds(&mut self, initial: Duration, max: Duration) {
        self.initial = initial;
        self.max = max.max(initial);
    }

    /// Consecutive failures so far.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Nothing has gone wrong since the last reset.
    pub fn is_fresh(&self) -> bool {
        self.attempt == 0 && !self.immediate_spent
    }

    /// Called once a connection has proved stable.
    pub fn reset(&mut self) {
        self.attempt = 0;
        self.immediate_spent = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn delays_stay_between_floor_and_a_growing_capped_ceiling() {
        let initial = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        let mut backoff = Backoff::new(initial, max);
        let mut rng = StdRng::seed_from_u64(7);
        let mut ceilings = Vec::new();
        for _ in 0..40 {
            let ceiling = backoff.ceiling();
            let delay = backoff.next_delay(&mut rng);
            assert!(
                delay >= initial && delay <= ceiling,
                "{delay:?} > {ceiling:?}"
            );
            ceilings.push(ceiling);
        }
        assert_eq!(ceilings[0], initial);
        assert_eq!(ceilings[1], initial * 2);
        assert_eq!(ceilings[4], initial * 16);
        assert_eq!(*ceilings.last().unwrap(), max);
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(10));
        for _ in 0..10 {
            backoff.next_delay(&mut rand::rng());
        }
        let mut rng = StdRng::seed_from_u64(1);
        let delays: std::collections::HashSet<_> = (0..20)
            .map(|_| backoff.clone().next_delay(&mut rng))
            .collect();
        assert!(delays.len() > 10, "jitter produced {delays:?}");
    }

    #[test]
    fn reset_starts_over() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        for _ in 0..5 {
            backoff.next_delay(&mut rand::rng());
        }
        assert_eq!(backoff.attempts(), 5);
        backoff.reset();
        assert_eq!(backoff.ceiling(), Duration::from_secs(1));
    }

    #[test]
    fn one_loss_after_a_reset_is_replaced_at_once_and_the_next_ones_back_off() {
        let initial = Duration::from_millis(100);
        let mut backoff = Backoff::new(initial, Duration::from_secs(10));
        let mut rng = StdRng::seed_from_u64(3);
        assert!(backoff.after_loss(&mut rng) <= IMMEDIATE_JITTER);
        assert_eq!(backoff.attempts(), 0);
        assert_eq!(backoff.after_loss(&mut rng), initial);
        let third = backoff.after_loss(&mut rng);
        assert!(third >= initial && third <= initial * 2, "{third:?}");
        backoff.reset();
        assert!(backoff.after_loss(&mut rng) <= IMMEDIATE_JITTER);
    }

    #[test]
    fn a_loss_after_failed_attempts_backs_off() {
        let initial = Duration::from_millis(100);
        let mut backoff = Backoff::new(initial, Duration::from_secs(10));
        let mut rng = StdRng::seed_from_u64(5);
        backoff.next_delay(&mut rng);
        assert!(backoff.after_loss(&mut rng) >= initial);
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        for _ in 0..100 {
            backoff.next_delay(&mut rand::rng());
        }
        assert_eq!(backoff.ceiling(), Duration::from_secs(30));
    }
}
