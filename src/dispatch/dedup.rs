//! Remembers recently handled event ids so Slack's redeliveries are acked but handled once.

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

use tokio::time::Instant;

/// Insertions within this long share one age record: expiry is this coarse, so keys live
/// up to this much longer than the TTL, never shorter.
const AGE_GRANULARITY: Duration = Duration::from_secs(1);

/// A time- and size-bounded set of keys.
///
/// Keys are stored as 64-bit hashes (randomly keyed per process), which keeps memory at
/// about 20 bytes an entry whatever the key length; with 2^64 values the chance that two of
/// the at most `capacity` live keys collide is negligible (about 1e-10 at 50 000 keys).
/// Ages are kept per second of insertions, not per key, for the same reason.
#[derive(Debug)]
pub struct Dedup {
    ttl: Duration,
    capacity: usize,
    hasher: RandomState,
    live: HashSet<u64>,
    /// Hashes in insertion order, oldest first, for expiry and eviction.
    order: VecDeque<u64>,
    /// Runs of `order`: when the run started and how many hashes it holds.
    ages: VecDeque<(Instant, usize)>,
}

impl Dedup {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Dedup {
            ttl,
            capacity: capacity.max(1),
            hasher: RandomState::new(),
            live: HashSet::new(),
            order: VecDeque::new(),
            ages: VecDeque::new(),
        }
    }

    /// True when `key` was recorded within the TTL.
    pub fn contains(&mut self, key: &str, now: Instant) -> bool {
        self.expire(now);
        self.live.contains(&self.hasher.hash_one(key))
    }

    /// Records `key` as handled at `now`.
    pub fn insert(&mut self, key: &str, now: Instant) {
        self.expire(now);
        let hash = self.hasher.hash_one(key);
        if !self.live.insert(hash) {
            return;
        }
        self.order.push_back(hash);
        match self.ages.back_mut() {
            Some((started, count)) if now.duration_since(*started) < AGE_GRANULARITY => *count += 1,
            _ => self.ages.push_back((now, 1)),
        }
        // Memory stays bounded under any load: past capacity the oldest key goes, even
        // before its TTL.
        while self.order.len() > self.capacity {
            self.evict_oldest();
        }
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(started, count)) = self.ages.front() {
            if now.duration_since(started) < self.ttl {
                break;
            }
            for _ in 0..count {
                self.evict_oldest();
            }
        }
    }

    fn evict_oldest(&mut self) {
        let Some(hash) = self.order.pop_front() else {
            return;
        };
        self.live.remove(&hash);
        if let Some((_, count)) = self.ages.front_mut() {
            *count -= 1;
            if *count == 0 {
                self.ages.pop_front();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_within_the_ttl_are_caught() {
        let mut dedup = Dedup::new(Duration::from_secs(600), 100);
        let t0 = Instant::now();
        assert!(!dedup.contains("Ev1", t0));
        dedup.insert("Ev1", t0);
        assert!(dedup.contains("Ev1", t0 + Duration::from_secs(599)));
        assert!(!dedup.contains("Ev2", t0));
    }

    #[test]
    fn keys_expire_after_the_ttl() {
        let mut dedup = Dedup::new(Duration::from_secs(600), 100);
        let t0 = Instant::now();
        dedup.insert("Ev1", t0);
        assert!(!dedup.contains("Ev1", t0 + Duration::from_secs(600)));
        assert!(dedup.is_empty());
    }

    #[test]
    fn capacity_bounds_memory() {
        let mut dedup = Dedup::new(Duration::from_secs(600), 3);
        let t0 = Instant::now();
        for key in ["a", "b", "c", "d"] {
            dedup.insert(key, t0);
        }
        assert_eq!(dedup.len(), 3);
        assert!(!dedup.contains("a", t0), "oldest key was evicted");
        assert!(dedup.contains("d", t0));
    }

    #[test]
    fn expiry_follows_insertion_time_across_runs() {
        let mut dedup = Dedup::new(Duration::from_secs(600), 100);
        let t0 = Instant::now();
        dedup.insert("early", t0);
        dedup.insert("late", t0 + Duration::from_secs(300));
        let later = t0 + Duration::from_secs(601);
        assert!(!dedup.contains("early", later));
        assert!(dedup.contains("late", later));
        assert_eq!(dedup.len(), 1);
    }

    #[test]
    fn inserting_twice_keeps_one_entry() {
        let mut dedup = Dedup::new(Duration::from_secs(600), 10);
        let t0 = Instant::now();
        dedup.insert("x", t0);
        dedup.insert("x", t0);
        assert_eq!(dedup.len(), 1);
    }
}
