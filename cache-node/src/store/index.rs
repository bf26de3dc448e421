//! A shard's hash index: key hash -> slot id, in 4 bytes per bucket.
//!
//! Why not hashbrown. hashbrown costs 5 bytes per bucket (the entry and a
//! control byte) and sizes its table in powers of two, growing when 7/8
//! full, so right after a growth the table is less than half full: at 1
//! million items in 64 shards it held 10.5 bytes per item. Here each bucket
//! is one `u32`, an 8-bit fingerprint of the hash above a 24-bit slot id (the
//! fingerprint answers most probes without reading the item's key), and the
//! table is sized to any length, growing by ~1.5x and shrinking when mostly
//! empty, so it stays between 3/5 and 7/8 full: 4.6 to 6.7 bytes per item.
//!
//! Open addressing with linear probing; the bucket is chosen by the hash's
//! high bits (multiply-shift onto the table's length), the fingerprint is
//! its low byte (the store picks the shard from bits 32 and up). A delete
//! leaves a tombstone, reused by a later insert on its probe path; once
//! items and tombstones together pass 7/8 of the table it is rebuilt at
//! ~5/3 of the items (which grows, shrinks or just clears it), rehashing
//! each key: amortised O(1) per operation, like any growth.

/// A bucket that never held an entry: ends a probe.
const EMPTY: u32 = u32::MAX;
/// A bucket whose entry was deleted: a probe continues past it.
const TOMB: u32 = u32::MAX - 1;
const SLOT_BITS: u32 = 24;
const SLOT_MASK: u32 = (1 << SLOT_BITS) - 1;
/// Slot ids the index can hold are below this (the top two ids of a
/// fingerprint of 0xFF would read as `EMPTY` and `TOMB`).
pub(super) const MAX_SLOTS: u32 = SLOT_MASK - 1;
/// The smallest table, so tiny shards do not rebuild on every few writes.
const MIN_BUCKETS: usize = 16;

#[derive(Debug)]
pub(super) struct Index {
    buckets: Box<[u32]>,
    /// Entries held.
    len: usize,
    /// Entries plus tombstones.
    used: usize,
}

fn fingerprint(hash: u64) -> u32 {
    (hash as u32 & 0xFF) << SLOT_BITS
}

impl Index {
    pub(super) fn new() -> Self {
        Self {
            buckets: vec![EMPTY; MIN_BUCKETS].into_boxed_slice(),
            len: 0,
            used: 0,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Buckets allocated (tests).
    #[cfg(test)]
    pub(super) fn buckets(&self) -> usize {
        self.buckets.len()
    }

    fn home(&self, hash: u64) -> usize {
        ((u128::from(hash) * self.buckets.len() as u128) >> 64) as usize
    }

    /// The slot whose entry has this hash and for which `is_key` holds.
    pub(super) fn find(&self, hash: u64, mut is_key: impl FnMut(u32) -> bool) -> Option<u32> {
        let fp = fingerprint(hash);
        let mut i = self.home(hash);
        loop {
            let e = self.buckets[i];
            if e == EMPTY {
                return None;
            }
            if e != TOMB && e & !SLOT_MASK == fp && is_key(e & SLOT_MASK) {
                return Some(e & SLOT_MASK);
            }
            i += 1;
            if i == self.buckets.len() {
                i = 0;
            }
        }
    }

    /// Adds `slot`, whose key is not in the index yet. `hash_of` gives any
    /// indexed slot's key hash, for a rebuild.
    pub(super) fn insert(&mut self, hash: u64, slot: u32, hash_of: impl Fn(u32) -> u64) {
        debug_assert!(slot < MAX_SLOTS);
        if (self.used + 1) * 8 > self.buckets.len() * 7 {
            self.rebuild(self.len + 1, &hash_of);
        }
        let mut i = self.home(hash);
        loop {
            let e = self.buckets[i];
            if e == EMPTY || e == TOMB {
                self.used += usize::from(e == EMPTY);
                self.buckets[i] = fingerprint(hash) | slot;
                self.len += 1;
                return;
            }
            i += 1;
            if i == self.buckets.len() {
                i = 0;
            }
        }
    }

    /// Removes `slot`'s entry (found by its key's hash); shrinks the table
    /// once it is mostly empty.
    pub(super) fn remove(&mut self, hash: u64, slot: u32, hash_of: impl Fn(u32) -> u64) -> bool {
        let entry = fingerprint(hash) | slot;
        let mut i = self.home(hash);
        loop {
            let e = self.buckets[i];
            if e == EMPTY {
                return false;
            }
            if e == entry {
                // A bucket followed by an empty one ends every probe through
                // it anyway: it can be emptied instead of tombstoned.
                let next = if i + 1 == self.buckets.len() {
                    0
                } else {
                    i + 1
                };
                if self.buckets[next] == EMPTY {
                    self.buckets[i] = EMPTY;
                    self.used -= 1;
                } else {
                    self.buckets[i] = TOMB;
                }
                self.len -= 1;
                if self.buckets.len() > MIN_BUCKETS && self.len * 4 < self.buckets.len() {
                    self.rebuild(self.len, &hash_of);
                }
                return true;
            }
            i += 1;
            if i == self.buckets.len() {
                i = 0;
            }
        }
    }

    /// Rebuilds the table at ~5/3 of `items` buckets, without tombstones.
    fn rebuild(&mut self, items: usize, hash_of: &impl Fn(u32) -> u64) {
        let size = (items * 5 / 3 + 1).max(MIN_BUCKETS);
        let old = std::mem::replace(&mut self.buckets, vec![EMPTY; size].into_boxed_slice());
        self.used = 0;
        self.len = 0;
        for e in old.iter().copied().filter(|&e| e != EMPTY && e != TOMB) {
            let slot = e & SLOT_MASK;
            let hash = hash_of(slot);
            debug_assert_eq!(fingerprint(hash), e & !SLOT_MASK, "a slot's hash changed");
            let mut i = self.home(hash);
            while self.buckets[i] != EMPTY {
                i += 1;
                if i == self.buckets.len() {
                    i = 0;
                }
            }
            self.buckets[i] = e;
            self.used += 1;
            self.len += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(slot: u32) -> u64 {
        // Distinct, well spread, with colliding fingerprints among them.
        u64::from(slot).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x42
    }

    #[test]
    fn insert_find_remove_through_growth_tombstones_and_shrink() {
        let mut index = Index::new();
        let n = 20_000u32;
        for s in 0..n {
            index.insert(hash(s), s, hash);
        }
        assert_eq!(index.len(), n as usize);
        assert!(index.buckets() * 7 >= n as usize * 8, "at most 7/8 full");
        assert!(
            index.buckets() * 3 <= n as usize * 5 + 3 * 16,
            "at least ~3/5 full"
        );
        for s in 0..n {
            assert_eq!(index.find(hash(s), |x| x == s), Some(s));
        }
        assert_eq!(index.find(hash(n + 1), |x| x == n + 1), None);
        // Churn: delete and reinsert, so tombstones pile up and get cleared.
        for round in 0..5 {
            for s in (round..n).step_by(3) {
                assert!(index.remove(hash(s), s, hash));
                assert!(!index.remove(hash(s), s, hash), "already gone");
            }
            for s in (round..n).step_by(3) {
                index.insert(hash(s), s, hash);
            }
            assert_eq!(index.len(), n as usize);
        }
        for s in 0..n {
            assert_eq!(index.find(hash(s), |x| x == s), Some(s), "slot {s}");
        }
        // Deleting 95% shrinks the table.
        for s in 0..n {
            if s % 20 != 0 {
                assert!(index.remove(hash(s), s, hash));
            }
        }
        assert_eq!(index.len(), n as usize / 20);
        assert!(
            index.buckets() <= n as usize / 20 * 4,
            "shrunk: {}",
            index.buckets()
        );
        for s in 0..n {
            let found = index.find(hash(s), |x| x == s);
            assert_eq!(found.is_some(), s % 20 == 0, "slot {s}");
        }
    }

    #[test]
    fn the_key_check_tells_apart_slots_with_the_same_fingerprint() {
        let mut index = Index::new();
        // Same hash for two slots: only `is_key` separates them.
        index.insert(7, 1, |_| 7);
        index.insert(7, 2, |_| 7);
        assert_eq!(index.find(7, |s| s == 2), Some(2));
        assert_eq!(index.find(7, |s| s == 1), Some(1));
        assert!(index.remove(7, 1, |_| 7));
        assert_eq!(index.find(7, |s| s == 1), None);
        assert_eq!(index.find(7, |s| s == 2), Some(2));
    }
}
