//! Remembers recently handled event ids so Slack's redeliveries are acked but handled once.

use std::collections::{HashSet, VecDeque};
use std::hash::Hasher;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use siphasher::sip::SipHasher13;
use tokio::time::Instant;

/// Insertions within this long share one age record: expiry is this coarse, so keys live
/// up to this much longer than the TTL, never shorter.
const AGE_GRANULARITY: Duration = Duration::from_secs(1);

/// A time- and size-bounded set of keys.
///
/// Keys are stored as 64-bit SipHash values under a random key, which keeps memory at
/// about 20 bytes an entry whatever the key length; with 2^64 values the chance that two of
/// the at most `capacity` live keys collide is negligible (about 1e-10 at 50 000 keys).
/// Ages are kept per second of insertions, not per key, for the same reason. The hash key
/// travels with a [`DedupSnapshot`], so a successor process can take the set over.
#[derive(Debug)]
pub struct Dedup {
    ttl: Duration,
    capacity: usize,
    hash_key: [u64; 2],
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
            hash_key: [rand::random(), rand::random()],
            live: HashSet::new(),
            order: VecDeque::new(),
            ages: VecDeque::new(),
        }
    }

    /// True when `key` was recorded within the TTL.
    pub fn contains(&mut self, key: &str, now: Instant) -> bool {
        self.expire(now);
        self.live.contains(&self.hash(key))
    }

    /// Records `key` as handled at `now`.
    pub fn insert(&mut self, key: &str, now: Instant) {
        self.expire(now);
        let hash = self.hash(key);
        if !self.live.insert(hash) {
            return;
        }
        self.push(hash, now);
    }

    /// Forgets `key`, recorded for an envelope whose handler did not take it: Slack's
    /// redelivery must be handled again. Recent keys are found near the back, where the
    /// search starts.
    pub fn forget(&mut self, key: &str) {
        let hash = self.hash(key);
        if !self.live.remove(&hash) {
            return;
        }
        let Some(position) = self.order.iter().rposition(|h| *h == hash) else {
            return;
        };
        self.order.remove(position);
        // The run holding `position`: runs cover `order` front to back.
        let mut start = 0;
        for index in 0..self.ages.len() {
            let count = self.ages[index].1;
            if position < start + count {
                self.ages[index].1 -= 1;
                if self.ages[index].1 == 0 {
                    self.ages.remove(index);
                }
                return;
            }
            start += count;
        }
    }

    fn hash(&self, key: &str) -> u64 {
        let mut hasher = SipHasher13::new_with_keys(self.hash_key[0], self.hash_key[1]);
        hasher.write(key.as_bytes());
        hasher.finish()
    }

    /// Appends a hash known to be new, inserted at `at`.
    fn push(&mut self, hash: u64, now: Instant) {
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

    /// Everything remembered, for a successor: the hash key and each entry's age.
    pub fn snapshot(&mut self, now: Instant) -> DedupSnapshot {
        self.expire(now);
        let mut hashes = self.order.iter().copied();
        let mut runs = Vec::with_capacity(self.ages.len());
        for &(started, count) in &self.ages {
            runs.push(AgeRun {
                age_ms: now.duration_since(started).as_millis() as u64,
                hashes: hashes.by_ref().take(count).collect(),
            });
        }
        DedupSnapshot {
            hash_key: self.hash_key,
            runs,
        }
    }

    /// Takes over a predecessor's set. Only an empty set can adopt one, since entries
    /// hashed under another key could not be compared; returns false otherwise.
    pub fn adopt(&mut self, snapshot: DedupSnapshot, now: Instant) -> bool {
        if !self.is_empty() {
            return false;
        }
        self.hash_key = snapshot.hash_key;
        for run in snapshot.runs {
            let Some(at) = now.checked_sub(Duration::from_millis(run.age_ms)) else {
                continue;
            };
            for hash in run.hashes {
                if self.live.insert(hash) {
                    self.push(hash, at);
                }
            }
        }
        while self.order.len() > self.capacity {
            self.evict_oldest();
        }
        self.expire(now);
        true
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

/// A deduplication set in transit from one process to its successor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupSnapshot {
    hash_key: [u64; 2],
    /// Oldest first.
    runs: Vec<AgeRun>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct AgeRun {
    age_ms: u64,
    hashes: Vec<u64>,
}

/// Longest JSON of a hash in a run's list, its comma included (`u64::MAX` has 20 digits).
const HASH_JSON_MAX: usize = 21;
/// Longest JSON of a run without its hashes: `{"age_ms":<20 digits>,"hashes":[]},`.
const RUN_JSON_MAX: usize = 44;
/// Longest JSON of a snapshot without its runs: `{"hash_key":[<20>,<20>],"runs":[]}`.
const SNAPSHOT_JSON_MAX: usize = 66;

impl DedupSnapshot {
    /// Splits the set into parts whose JSON is at most `max_json_bytes` long each (at least
    /// one part, oldest entries first); [`merge`](Self::merge) puts them together again.
    /// A budget too small for one entry still gets one entry a part.
    pub fn into_parts(self, max_json_bytes: usize) -> Vec<DedupSnapshot> {
        let budget = max_json_bytes.saturating_sub(SNAPSHOT_JSON_MAX);
        let empty = || DedupSnapshot {
            hash_key: self.hash_key,
            runs: Vec::new(),
        };
        let mut parts = Vec::new();
        let mut part = empty();
        let mut used = 0;
        for run in self.runs {
            let mut hashes = run.hashes.as_slice();
            loop {
                let room = budget.saturating_sub(used + RUN_JSON_MAX) / HASH_JSON_MAX;
                if room == 0 && !part.runs.is_empty() {
                    parts.push(std::mem::replace(&mut part, empty()));
                    used = 0;
                    continue;
                }
                let (now, later) = hashes.split_at(room.max(1).min(hashes.len()));
                part.runs.push(AgeRun {
                    age_ms: run.age_ms,
                    hashes: now.to_vec(),
                });
                used += RUN_JSON_MAX + now.len() * HASH_JSON_MAX;
                hashes = later;
                if hashes.is_empty() {
                    break;
                }
            }
        }
        parts.push(part);
        parts
    }

    /// Appends a part that follows this one (from [`into_parts`](Self::into_parts)); a run
    /// split between two parts becomes one again. False, and nothing merged, when the part
    /// belongs to another set (another hash key).
    pub fn merge(&mut self, part: DedupSnapshot) -> bool {
        if part.hash_key != self.hash_key {
            return false;
        }
        let mut runs = part.runs.into_iter();
        if let Some(first) = runs.next() {
            match self.runs.last_mut() {
                Some(last) if last.age_ms == first.age_ms => last.hashes.extend(first.hashes),
                _ => self.runs.push(first),
            }
        }
        self.runs.extend(runs);
        true
    }

    pub fn len(&self) -> usize {
        self.runs.iter().map(|r| r.hashes.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forgotten_key_is_new_again_and_the_ages_stay_consistent() {
        let start = Instant::now();
        let mut dedup = Dedup::new(Duration::from_secs(60), 100);
        dedup.insert("a", start);
        dedup.insert("b", start);
        dedup.insert("c", start + Duration::from_secs(2));
        dedup.forget("b");
        dedup.forget("c");
        dedup.forget("never");
        assert!(!dedup.contains("b", start) && !dedup.contains("c", start));
        assert!(dedup.contains("a", start));
        assert_eq!(dedup.len(), 1);
        assert_eq!(dedup.order.len(), 1);
        assert_eq!(dedup.ages.iter().map(|(_, n)| n).sum::<usize>(), 1);
        dedup.insert("b", start + Duration::from_secs(3));
        assert!(!dedup.contains("a", start + Duration::from_secs(61)));
        assert!(dedup.contains("b", start + Duration::from_secs(61)));
    }

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
    fn a_snapshot_carries_keys_and_ages_to_a_successor() {
        let ttl = Duration::from_secs(600);
        let mut old = Dedup::new(ttl, 100);
        let t0 = Instant::now();
        old.insert("Ev-old", t0);
        old.insert("Ev-new", t0 + Duration::from_secs(300));
        let handover = t0 + Duration::from_secs(301);
        let snapshot = old.snapshot(handover);
        assert_eq!(snapshot.len(), 2);
        let wire = serde_json::to_string(&snapshot).unwrap();
        let mut new = Dedup::new(ttl, 100);
        assert!(new.adopt(serde_json::from_str(&wire).unwrap(), handover));
        assert!(new.contains("Ev-old", handover));
        assert!(new.contains("Ev-new", handover));
        assert!(!new.contains("Ev-other", handover));
        // Ages survived: the old key expires when it would have in the predecessor.
        let later = t0 + Duration::from_secs(601);
        assert!(!new.contains("Ev-old", later));
        assert!(new.contains("Ev-new", later));
    }

    #[test]
    fn only_an_empty_set_adopts() {
        let mut old = Dedup::new(Duration::from_secs(600), 100);
        let now = Instant::now();
        old.insert("a", now);
        let mut busy = Dedup::new(Duration::from_secs(600), 100);
        busy.insert("b", now);
        assert!(!busy.adopt(old.snapshot(now), now));
        assert!(!busy.contains("a", now));
    }

    /// Parts fit their budget even in the worst case (every number as long as it gets, runs
    /// of one hash and long runs), and merge back into the same set.
    #[test]
    fn a_snapshot_splits_into_bounded_parts_and_merges_back() {
        let budget = 4096;
        let snapshot = DedupSnapshot {
            hash_key: [u64::MAX, u64::MAX],
            runs: (0..300)
                .map(|i| AgeRun {
                    age_ms: u64::MAX - i,
                    hashes: vec![u64::MAX - i; if i % 3 == 0 { 1 } else { 250 }],
                })
                .collect(),
        };
        let parts = snapshot.clone().into_parts(budget);
        assert!(parts.len() > 10, "{} parts", parts.len());
        let mut merged: Option<DedupSnapshot> = None;
        for part in parts {
            let json = serde_json::to_string(&part).unwrap();
            assert!(json.len() <= budget, "{} bytes", json.len());
            match &mut merged {
                Some(merged) => assert!(merged.merge(part)),
                None => merged = Some(part),
            }
        }
        assert_eq!(merged, Some(snapshot.clone()));

        let empty = DedupSnapshot {
            hash_key: [1, 2],
            runs: Vec::new(),
        };
        assert_eq!(empty.clone().into_parts(budget), vec![empty.clone()]);
        let mut other = empty;
        assert!(!other.merge(snapshot), "another hash key");
        assert!(other.is_empty());
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
