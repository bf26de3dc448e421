//! Short-lived memory of recent deletes and tag invalidations, so a copy of
//! an item that was read before it was deleted (a rebalancing batch or a pull
//! in flight) cannot bring it back when it lands afterwards.
//!
//! A tombstone only has to outlive the copies in flight, which are bounded
//! by the peer request timeout, so entries expire after [`TOMBSTONE_TTL`]
//! and their number is capped; with the cap reached the oldest go first.
//!
//! They also carry deletes across restarts (see `cluster::restore`): the
//! node's snapshot keeps them, and a node that comes back from a snapshot
//! asks its peers for theirs, so a delete made while it was down does not
//! come back with its snapshot. For that each node also tracks
//! `forgotten_before`: the newest delete time it has let go of, so a peer
//! can tell whether this node's memory reaches back far enough.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::store::UnixNanos;

/// How long a delete or invalidation is remembered: long enough for the
/// copies in flight (the peer timeout), and for a node restarted from a
/// snapshot to learn the deletes made while it was down (a node down longer
/// than this, with deletes made meanwhile, discards its snapshot).
pub const TOMBSTONE_TTL: Duration = Duration::from_secs(600);
/// Most deletes remembered at once.
const MAX_DELETES: usize = 200_000;
/// Most tag invalidations remembered at once.
const MAX_TAGS: usize = 10_000;

#[derive(Default)]
pub struct Tombstones {
    deletes: Mutex<Timed>,
    tags: Mutex<Timed>,
}

/// Remembered deletes and tag invalidations, as they travel in a snapshot
/// and between peers: each name with the write time it covers (items
/// created at or before it are dead).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TombstoneLog {
    /// The newest time of a delete or invalidation the writer has let go
    /// of (0: none): its memory is complete only for later ones.
    pub forgotten_before: UnixNanos,
    pub deletes: Vec<(String, UnixNanos)>,
    pub tags: Vec<(String, UnixNanos)>,
}

/// Entries with the write time they cover (items created at or before it
/// are dead), queued in the order they were made for expiry. A key entered
/// twice has two queue entries; `seq` tells which one is current.
#[derive(Default)]
struct Timed {
    at: HashMap<String, (UnixNanos, u64)>,
    order: VecDeque<(Instant, String, u64)>,
    seq: u64,
    /// The newest time of an entry dropped (expired or pushed out by the cap).
    forgotten_before: UnixNanos,
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
            if let Some(&(at, current)) = self.at.get(&key)
                && current == seq
            {
                self.at.remove(&key);
                self.forgotten_before = self.forgotten_before.max(at);
            }
        }
    }

    fn get(&self, key: &str) -> Option<UnixNanos> {
        self.at.get(key).map(|&(at, _)| at)
    }

    /// Entries at or after `since`, until `max_bytes` of names are taken;
    /// the flag says whether some were left out.
    fn since(&self, since: UnixNanos, max_bytes: usize) -> (Vec<(String, UnixNanos)>, bool) {
        let mut out = Vec::new();
        let mut bytes = 0;
        for (name, &(at, _)) in &self.at {
            if at < since {
                continue;
            }
            bytes += name.len() + 16;
            if bytes > max_bytes {
                return (out, true);
            }
            out.push((name.clone(), at));
        }
        (out, false)
    }
}

impl Tombstones {
    /// Remembers that `key` was deleted at `at` (the deleting node's clock).
    pub(super) fn deleted(&self, key: &str, at: UnixNanos) {
        self.deletes.lock().insert(key, at, MAX_DELETES);
    }

    /// Remembers that `tag` was invalidated at `at`.
    pub(super) fn invalidated(&self, tag: &str, at: UnixNanos) {
        self.tags.lock().insert(tag, at, MAX_TAGS);
    }

    /// When `key` was last deleted, if that is remembered.
    pub(super) fn deleted_at(&self, key: &str) -> Option<UnixNanos> {
        self.deletes.lock().get(key)
    }

    /// Whether a copy of `key` written at `created_at` and carrying `tags` was
    /// deleted or invalidated since.
    pub(super) fn buries(
        &self,
        key: &str,
        created_at: UnixNanos,
        tags: &[impl AsRef<str>],
    ) -> bool {
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

    /// What is remembered with a time at or after `since`, in at most about
    /// `max_bytes`; `None` when more than that is remembered (the caller
    /// then cannot learn every delete, and must act as if it could not).
    pub(super) fn log_since(&self, since: UnixNanos, max_bytes: usize) -> Option<TombstoneLog> {
        let deletes = self.deletes.lock();
        let tags = self.tags.lock();
        let (tag_list, cut) = tags.since(since, max_bytes);
        if cut {
            return None;
        }
        let used: usize = tag_list.iter().map(|(t, _)| t.len() + 16).sum();
        let (delete_list, cut) = deletes.since(since, max_bytes.saturating_sub(used));
        if cut {
            return None;
        }
        Some(TombstoneLog {
            forgotten_before: deletes.forgotten_before.max(tags.forgotten_before),
            deletes: delete_list,
            tags: tag_list,
        })
    }

    /// Everything remembered (for a snapshot; bounded by the caps).
    pub(super) fn log(&self) -> TombstoneLog {
        self.log_since(0, usize::MAX)
            .expect("no byte limit, nothing cut")
    }

    /// Takes in what another node (or this node's snapshot) remembers.
    pub(super) fn absorb(&self, log: &TombstoneLog) {
        {
            let mut deletes = self.deletes.lock();
            deletes.forgotten_before = deletes.forgotten_before.max(log.forgotten_before);
            for (key, at) in &log.deletes {
                deletes.insert(key, *at, MAX_DELETES);
            }
        }
        let mut tags = self.tags.lock();
        for (tag, at) in &log.tags {
            tags.insert(tag, *at, MAX_TAGS);
        }
    }

    /// The newest delete or invalidation time this node has let go of.
    #[cfg(test)]
    fn forgotten_before(&self) -> UnixNanos {
        let deletes = self.deletes.lock().forgotten_before;
        deletes.max(self.tags.lock().forgotten_before)
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
    fn a_log_carries_what_is_remembered_and_what_was_forgotten() {
        let t = Tombstones::default();
        t.deleted("k", 100);
        t.deleted("old", 10);
        t.invalidated("red", 200);
        let log = t.log_since(50, 1 << 20).unwrap();
        assert_eq!(log.deletes, vec![("k".to_string(), 100)]);
        assert_eq!(log.tags, vec![("red".to_string(), 200)]);
        assert_eq!(log.forgotten_before, 0);
        assert!(t.log_since(0, 10).is_none(), "more than fits is refused");
        let other = Tombstones::default();
        other.absorb(&t.log());
        assert!(other.buries("old", 10, &[] as &[&str]));
        assert!(other.buries("x", 150, &["red"]));
        for i in 0..(MAX_DELETES + 1) {
            other.deleted(&format!("k{i}"), 1000 + i as u64);
        }
        assert!(other.forgotten_before() >= 10, "the cap forgot entries");
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
