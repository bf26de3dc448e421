//! The expiry index of a shard: a hierarchical timing wheel whose buckets are
//! intrusive doubly linked lists threaded through a per-slot link array.
//!
//! Why a wheel and not a heap. The store must sweep expired items at a cost
//! that follows the expired items, and must set, delete and evict in O(1)
//! without ever scanning. A binary heap with lazy deletion (stale entries left
//! behind on rewrite and delete) needs periodic rebuilds that walk every item
//! under the shard lock, and holds several entries per item. An indexed heap
//! (each item knowing its heap position) has no stale entries but makes every
//! delete and eviction an O(log n) sift that writes the heap position of each
//! item it moves, all cache misses at 10 million items; and at capacity the
//! least recently used item is usually the one expiring first, i.e. the heap's
//! root, so every insert that evicts would pay the full depth. Here, linking
//! and unlinking an item are a few pointer writes whatever the size.
//!
//! Layout. Time is nanoseconds, in 11 levels of 64 buckets (6 bits each, the
//! top level holding the last 4 bits of a `u64`). An item goes into the level
//! of the highest bit in which its expiry differs from `elapsed` (the time the
//! wheel has been swept to) and into the bucket those 6 bits of its expiry
//! name, so level 0 holds items expiring in the current 64 ns, level 1 those
//! in the current ~4 µs, ..., level 6 those in the current ~73 min. Level 0's
//! buckets are exact nanoseconds, so an item is never swept early and every
//! item whose time has passed is found, without the rounding of a coarser tick.
//!
//! Sweeping takes the due bucket with the earliest start; an item in it whose
//! time has passed is expired, any other is moved to a lower level (it lies in
//! the bucket's range, so it differs from the bucket's start in lower bits
//! only). So an item is moved at most once per level below the one it started
//! in (about 6 times for TTLs of minutes to hours) over its whole life, and
//! the sweeper's work is the expired items plus those moves, never the items
//! merely held. The work is done in budgeted batches so no lock is held long.
//!
//! Memory: 8 bytes per item (two 4-byte links, kept in the item's own header,
//! see [`super::item`], and reached through [`LinkStore`]) plus 2.8 KiB of
//! bucket heads and occupancy bits per shard. The first entry of a bucket marks itself by a
//! `prev` of [`HEAD`] plus the bucket number, so unlinking needs no separate
//! bucket field; the shard keeps its slot ids below [`MAX_SLOTS`] for this.
//!
//! Invariant (checked by [`ExpiryWheel::assert_consistent`]): every bucket at
//! a level lies at or after `elapsed`'s bucket in `elapsed`'s window of that
//! level, so its start is computed without wrapping; a bucket at `elapsed`'s
//! own position above level 0 starts exactly at `elapsed` (the sweep stopped
//! inside it). `elapsed` only moves to the start of the earliest due bucket,
//! or to `now` once none is due, so it never passes a bucket unvisited. An
//! item expiring before `elapsed` (only when the clock went backwards) goes
//! into level 0 at `elapsed`'s bucket.

use super::SlotId;
use super::clock::UnixNanos;

const SLOT_BITS: u32 = 6;
const SLOTS: usize = 1 << SLOT_BITS;
/// Levels to cover a `u64` at 6 bits each.
const LEVELS: usize = (u64::BITS as usize).div_ceil(SLOT_BITS as usize);
const BUCKETS: usize = LEVELS * SLOTS;
const NIL: SlotId = SlotId::MAX;
/// A `prev` of `HEAD + b` marks the first entry of bucket `b`.
const HEAD: SlotId = NIL - BUCKETS as SlotId;
/// Slot ids the wheel can link are below this.
pub(super) const MAX_SLOTS: SlotId = HEAD;

/// Bytes per item the wheel costs: its links.
#[cfg(test)]
pub(super) const PER_ITEM: usize = size_of::<Link>();

/// An item's place in its bucket's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Link {
    prev: SlotId,
    next: SlotId,
}

impl Link {
    /// The links of an item not in the wheel.
    pub(super) const UNLINKED: Link = Link {
        prev: NIL,
        next: NIL,
    };
}

const UNLINKED: Link = Link::UNLINKED;

/// Where the wheel keeps each item's [`Link`]: the shard's items, by slot id.
pub(super) trait LinkStore {
    fn link_of(&self, slot: SlotId) -> Link;
    fn set_link(&mut self, slot: SlotId, link: Link);
}

#[derive(Debug)]
pub(super) struct ExpiryWheel {
    heads: [SlotId; BUCKETS],
    /// Bit `i` of `occupied[l]`: bucket `i` of level `l` is non-empty.
    occupied: [u64; LEVELS],
    /// Everything expiring before this has been swept (see the module doc).
    elapsed: UnixNanos,
    len: usize,
}

fn level_for(elapsed: UnixNanos, when: UnixNanos) -> usize {
    match elapsed ^ when {
        0 => 0,
        x => ((u64::BITS - 1 - x.leading_zeros()) / SLOT_BITS) as usize,
    }
}

fn slot_for(when: UnixNanos, level: usize) -> usize {
    ((when >> (level as u32 * SLOT_BITS)) & (SLOTS as u64 - 1)) as usize
}

/// The start of `at`'s window at `level` (the range its 64 buckets cover).
fn window_start(at: UnixNanos, level: usize) -> UnixNanos {
    let bits = (level as u32 + 1) * SLOT_BITS;
    if bits >= u64::BITS {
        0
    } else {
        at & !((1 << bits) - 1)
    }
}

/// The first time bucket `slot` of `level` covers, in `at`'s window.
fn bucket_start(at: UnixNanos, level: usize, slot: usize) -> UnixNanos {
    window_start(at, level) + ((slot as u64) << (level as u32 * SLOT_BITS))
}

/// How long a bucket of `level` is, saturated to `u64::MAX`.
fn bucket_len(level: usize) -> u64 {
    1u64.checked_shl(level as u32 * SLOT_BITS)
        .unwrap_or(u64::MAX)
}

impl Default for ExpiryWheel {
    fn default() -> Self {
        Self {
            heads: [NIL; BUCKETS],
            occupied: [0; LEVELS],
            elapsed: 0,
            len: 0,
        }
    }
}

impl ExpiryWheel {
    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Moves an empty wheel's time to `now`, so the first items written do not
    /// start in the top levels (and move down through all of them).
    pub(super) fn reset(&mut self, now: UnixNanos) {
        debug_assert!(self.is_empty());
        self.elapsed = now;
    }

    /// Adds `slot`, expiring at `when`. O(1).
    pub(super) fn link(&mut self, links: &mut impl LinkStore, slot: SlotId, when: UnixNanos) {
        debug_assert!(slot < MAX_SLOTS);
        let when = when.max(self.elapsed);
        let level = level_for(self.elapsed, when);
        let index = slot_for(when, level);
        let bucket = level * SLOTS + index;
        debug_assert_eq!(links.link_of(slot), UNLINKED, "slot {slot} linked twice");
        let head = self.heads[bucket];
        links.set_link(
            slot,
            Link {
                prev: HEAD + bucket as SlotId,
                next: head,
            },
        );
        if head != NIL {
            let mut l = links.link_of(head);
            l.prev = slot;
            links.set_link(head, l);
        }
        self.heads[bucket] = slot;
        self.occupied[level] |= 1 << index;
        self.len += 1;
    }

    /// Whether an item linked for `old` may stay where it is when its expiry
    /// becomes `new`, so a rewrite touches no neighbour's links (the usual
    /// rewrite moves its expiry by less than a bucket of its level: a TTL of
    /// an hour sits in buckets of 68 s).
    ///
    /// The item sits at the level where `old` differed from the wheel's time
    /// when it was linked, or lower if the sweep has moved it since; never
    /// below the level where `old` differs from `elapsed` now (as `elapsed`
    /// rises towards `old`, their highest differing bit only falls). If `new`
    /// agrees with `old` on every bit from that level up, it lies in the
    /// bucket the item is in, whichever of those levels that is.
    pub(super) fn keeps(&self, old: UnixNanos, new: UnixNanos) -> bool {
        if old < self.elapsed || new < self.elapsed {
            // Linked clamped to `elapsed`, or due to be: placed afresh.
            return false;
        }
        let level = level_for(self.elapsed, old);
        (old ^ new) >> (level as u32 * SLOT_BITS) == 0
    }

    /// Removes `slot`. O(1).
    pub(super) fn unlink(&mut self, links: &mut impl LinkStore, slot: SlotId) {
        let Link { prev, next } = links.link_of(slot);
        debug_assert_ne!(prev, NIL, "slot {slot} is not linked");
        if prev >= HEAD {
            let bucket = (prev - HEAD) as usize;
            self.heads[bucket] = next;
            if next == NIL {
                self.occupied[bucket / SLOTS] &= !(1 << (bucket % SLOTS));
            }
        } else {
            let mut l = links.link_of(prev);
            l.next = next;
            links.set_link(prev, l);
        }
        if next != NIL {
            let mut l = links.link_of(next);
            l.prev = prev;
            links.set_link(next, l);
        }
        links.set_link(slot, UNLINKED);
        self.len -= 1;
    }

    /// The non-empty bucket with the earliest start, and that start; on a tie
    /// the higher level, whose items may belong below. O(levels).
    pub(super) fn next_due(&self) -> Option<(usize, UnixNanos)> {
        let mut best: Option<(usize, UnixNanos)> = None;
        for (level, &mask) in self.occupied.iter().enumerate() {
            if mask == 0 {
                continue;
            }
            let pos = slot_for(self.elapsed, level) as u32;
            let ahead = mask.rotate_right(pos).trailing_zeros();
            debug_assert!(pos + ahead < SLOTS as u32, "a bucket behind elapsed");
            let index = ((pos + ahead) as usize) % SLOTS;
            let start = bucket_start(self.elapsed, level, index);
            if best.is_none_or(|(_, at)| start <= at) {
                best = Some((level * SLOTS + index, start));
            }
        }
        best
    }

    /// The first item of `bucket`, if any.
    pub(super) fn first(&self, bucket: usize) -> Option<SlotId> {
        let head = self.heads[bucket];
        (head != NIL).then_some(head)
    }

    /// Moves the wheel's time forward to `to` (never back). The caller
    /// guarantees no bucket starting before `to` still holds items, except
    /// the one starting exactly at `to`.
    pub(super) fn advance(&mut self, to: UnixNanos) {
        self.elapsed = self.elapsed.max(to);
    }

    /// Checks the links, the occupancy bits and the invariant of the module
    /// doc; `expires_at` gives a slot's expiry, `None` for a free slot.
    /// Returns how many items are linked.
    pub(super) fn assert_consistent(
        &self,
        links: &impl LinkStore,
        expires_at: impl Fn(SlotId) -> Option<UnixNanos>,
    ) -> usize {
        let mut seen = 0;
        for bucket in 0..BUCKETS {
            let (level, index) = (bucket / SLOTS, bucket % SLOTS);
            let occupied = self.occupied[level] & (1 << index) != 0;
            assert_eq!(
                occupied,
                self.heads[bucket] != NIL,
                "occupancy bit of bucket {bucket}"
            );
            if !occupied {
                continue;
            }
            let pos = slot_for(self.elapsed, level);
            assert!(index >= pos, "bucket {bucket} lies behind elapsed");
            let start = bucket_start(self.elapsed, level, index);
            assert!(
                index > pos || level == 0 || start == self.elapsed,
                "bucket {bucket} at elapsed's position starts before it"
            );
            let mut prev = HEAD + bucket as SlotId;
            let mut at = self.heads[bucket];
            while at != NIL {
                let link = links.link_of(at);
                assert_eq!(link.prev, prev, "broken wheel back link at slot {at}");
                let when = expires_at(at).unwrap_or_else(|| panic!("free slot {at} in the wheel"));
                let in_range = when >= start && when - start < bucket_len(level);
                let clamped = level == 0 && when < start && start == self.elapsed;
                assert!(
                    in_range || clamped,
                    "slot {at} (expiry {when}) in the wrong bucket {bucket}"
                );
                seen += 1;
                prev = at;
                at = link.next;
            }
        }
        assert_eq!(seen, self.len, "wheel length drifted");
        seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_item_stays_in_its_bucket_only_for_an_expiry_that_bucket_covers() {
        let now: UnixNanos = 1_700_000_000_000_000_000;
        let mut wheel = ExpiryWheel::default();
        wheel.reset(now);
        let old = now + 3_600_000_000_000; // in an hour
        let level = level_for(now, old);
        assert!(level >= 6, "an hour ahead is in buckets of at least 68 s");
        let len = bucket_len(level);
        let start = old & !(len - 1);
        assert!(wheel.keeps(old, old));
        assert!(wheel.keeps(old, start));
        assert!(wheel.keeps(old, start + len - 1));
        assert!(!wheel.keeps(old, start + len));
        assert!(!wheel.keeps(old, start - 1));
        // At level 0 a bucket is one nanosecond.
        assert!(wheel.keeps(now, now));
        assert!(!wheel.keeps(now, now + 1));
        // Behind the wheel's time (clamped when linked): always placed afresh.
        assert!(!wheel.keeps(now - 1, now - 1));
        assert!(!wheel.keeps(old, now - 1));
    }
}
