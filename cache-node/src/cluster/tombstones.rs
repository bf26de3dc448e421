//! Short-lived memory of recent deletes and tag invalidations, so a copy of
//! an item that was read before it was deleted (a rebalancing batch or a pull
//! in flight) cannot bring it back when it lands afterwards.
//!
//! A tombstone only has to outlive the copies in flight, which are bounded
//! by the peer request timeout, so entries expire after [`TOMBSTONE_TTL`]
//! and their number is capped; with the cap reached the oldest go first.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::store::UnixNanos;

/// How long a delete or invalidation is remembered.
pub const TOMBSTONE_TTL: Duration = Duration::from_secs(120);
/// Most deletes remembered at once.
const MAX_DELETES: usize = 200_000;
/// Most tag invalidations remembered at once.
const MAX_TAGS: usize = 10_000;

#[derive(Default)]
pub struct Tombstones {
    deletes: Mutex<Timed>,
    tags: Mutex<Timed>,
}

/// Entries with the write time they cover (items created at or before it
/// are dead), queued in the order they were made for expiry. A key entered
/// twice has two queue entries; `seq` tells which one is current.
#[derive(Default)]
struct Timed {
    at: HashMap<String, (UnixNanos, u64)>,
    order: VecDeque<(Instant, String, u64)>,
    seq: u64,
}

impl Timed {
    fn insert(&mut self, key: &str, at: UnixNanos, cap: usize) {
        self.expire(cap);
        self.seq += 1;
        let entry = self.at.entry(key.to_owned()).or_insert((0, 0));
        *entry = (entry.0.max(at), self.seq);
        self.order
            .push_back((Instant::now(), key.to_owned(), self.seq));
    }

    fn expire(&mut self, cap: usize) {
        let now = Instant::now();
        while let Some((made, _, _)) = self.order.front() {
            if now.duration_since(*made) < TOMBSTONE_TTL && self.order.len() < cap {
                break;
            }
            let (_, key, seq) = self.order.pop_front().expect("front exists");
            if self
                .at
                .get(&key)
                .is_some_and(|&(_, current)| current == seq)
            {
                self.at.remove(&key);
            }
        }
    }

    fn get(&self, key: &str) -> Option<UnixNanos> {
        self.at.get(key).map(|&(at, _)| at)
    }
}

impl Tombstones {
    /// Remembers that `key` was deleted at `at` (the deleting node's clock).
    pub fn deleted(&self, key: &str, at: UnixNanos) {
        self.deletes.lock().insert(key, at, MAX_DELETES);
    }

    /// Remembers that `tag` was invalidated at `at`.
    pub fn invalidated(&self, tag: &str, at: UnixNanos) {
        self.tags.lock().insert(tag, at, MAX_TAGS);
    }

    /// Whether a copy of `key` written at `created_at` and carrying `tags` was
    /// deleted or invalidated since.
    pub fn buries(&self, key: &str, created_at: UnixNanos, tags: &[impl AsRef<str>]) -> bool {
        let dead = |at: Option<UnixNanos>| at.is_some_and(|at| created_at <= at);
        if dead(self.deletes.lock().get(key)) {
            return true;
        }
        if tags.is_empty() {
            return false;
        }
        let invalidated = self.tags.lock();
        !invalidated.at.is_empty() && tags.iter().any(|t| dead(invalidated.get(t.as_ref())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delete_buries_older_copies_only() {
        let t = Tombstones::default();
        t.deleted("k", 100);
        let none: &[&str] = &[];
        assert!(t.buries("k", 50, none));
        assert!(t.buries("k", 100, none));
        assert!(!t.buries("k", 101, none), "written after the delete");
        assert!(!t.buries("other", 50, none));
        t.invalidated("red", 200);
        assert!(t.buries("x", 150, &["blue", "red"]));
        assert!(!t.buries("x", 250, &["red"]));
        assert!(!t.buries("x", 150, &["blue"]));
    }

    #[test]
    fn the_number_of_entries_is_bounded() {
        let t = Tombstones::default();
        for i in 0..(MAX_DELETES + 1000) {
            t.deleted(&format!("k{i}"), 1);
        }
        let held = t.deletes.lock().at.len();
        assert!(held <= MAX_DELETES, "{held}");
        assert!(t.buries(&format!("k{}", MAX_DELETES + 999), 1, &[] as &[&str]));
    }
}
