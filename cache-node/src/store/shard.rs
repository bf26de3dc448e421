//! One shard of the store: a slab of entries threaded on an intrusive LRU list,
//! a hash index into the slab, an expiry wheel (see [`super::expiry`]) and a
//! tag index.
//!
//! This is written by hand rather than taken from an LRU crate because it is the
//! heart of the product and the per-item overhead matters: the index holds a
//! 4-byte slot id instead of a second copy of the key, the slab entry is a
//! thin pointer and the LRU links (16 bytes), the metadata, key, value and tag
//! ids share one allocation (see [`super::item`]), the LRU and expiry links
//! are 4-byte slab indices instead of pointers, and nothing is allocated per
//! operation beyond the item's own bytes.
//!
//! Costs: get, set, delete and evicting the least recently used item are O(1)
//! plus O(tags of the item) (amortised: the slab, the hash index and the
//! link array grow by doubling). Sweeping costs O(1) per expired item plus
//! O(1) per move of a live item down the wheel, at most ~6 moves in an item's
//! life (see [`super::expiry`]). Tag invalidation is O(items carrying the
//! tag). `scan`, `retain`, `keys_mru` and `assert_consistent` are O(n) and
//! meant for data movement, diagnostics and tests.
//!
//! A shard knows nothing of locking, HTTP or the cluster; [`super::Store`] wraps
//! each shard in its own mutex and keeps the store-wide capacity.

use std::hash::BuildHasher;
use std::ops::ControlFlow;

use smallvec::SmallVec;

use super::clock::UnixNanos;
use super::expiry::{self, ExpiryWheel, Link, LinkStore};
use super::index::{self, Index};
use super::item::{HEADER_BYTES, ItemBox, ItemParts};
use super::slab::Slab;
use super::tags::{TagId, TagIndex};
use super::{ItemRef, SlotId};

/// The "no slot" link value.
const NIL: SlotId = SlotId::MAX;
/// Below this capacity a hash table is not worth shrinking.
pub(super) const SHRINK_FLOOR: usize = 64;

/// Bytes a hash table costs per entry of `entry` bytes: hashbrown keeps one
/// control byte per bucket and between 8/7 and 16/7 buckets per entry (it
/// doubles when 7/8 full); this charges the middle, 2 buckets per entry.
const fn hashed(entry: usize) -> usize {
    2 * (entry + 1)
}

/// Index bytes per item: a 4-byte bucket in a table 3/5 to 7/8 full (see
/// [`super::index`]), charged at its middle.
const INDEX_BYTES: usize = 6;

/// Bookkeeping bytes charged to every item on top of its key, value and tags:
/// the slab entry (16 bytes), the item's header with its expiry-wheel links
/// (43) and its hash-index bucket (~6). Charging them makes `maxMemory` bound
/// the memory really used, not just the payload. Not charged: the allocator's
/// rounding of the item's allocation to its size class (mimalloc: at most
/// 1/8) and the slab's unused capacity after a shrink.
pub const ITEM_OVERHEAD: u64 = (size_of::<Slot>() + HEADER_BYTES + INDEX_BYTES) as u64;
/// Bookkeeping bytes per tag an item carries: its id in the item and its entry in
/// the tag's member set. (The tag's name is charged to every item carrying it,
/// though a shard keeps it once.)
pub const TAG_OVERHEAD: u64 = (size_of::<TagId>() + hashed(size_of::<SlotId>())) as u64;
/// Bookkeeping bytes of an item with at least one tag beyond [`TAG_OVERHEAD`]
/// per tag: none since the tag ids moved into the item's own allocation (it
/// was a separate list's 16-byte header).
pub const TAG_LIST_OVERHEAD: u64 = 0;

/// The bytes an item is charged for against `maxMemory`.
pub fn item_cost<'a>(
    key_len: usize,
    value_len: usize,
    tags: impl IntoIterator<Item = &'a str>,
) -> u64 {
    let (count, tags) = tags.into_iter().fold((0u64, 0u64), |(n, b), t| {
        (n + 1, b + t.len() as u64 + TAG_OVERHEAD)
    });
    let list = if count > 0 { TAG_LIST_OVERHEAD } else { 0 };
    key_len as u64 + value_len as u64 + tags + list + ITEM_OVERHEAD
}

/// A slab entry: 16 bytes (the item's thin pointer, niche-optimised, and two
/// 4-byte LRU links).
#[derive(Debug)]
pub(super) struct Slot {
    /// `None` on the free list.
    pub(super) item: Option<ItemBox>,
    /// Towards the most recently used end; on the free list, unused.
    prev: SlotId,
    /// Towards the least recently used end; on the free list, the next free
    /// slot of its chunk (see [`super::slab`]).
    pub(super) next: SlotId,
}

impl Slot {
    /// A slot on the free list, followed by `next`.
    pub(super) fn free(next: SlotId) -> Self {
        Self {
            item: None,
            prev: NIL,
            next,
        }
    }

    fn is_live(&self) -> bool {
        self.item.is_some()
    }

    /// The item of a live slot.
    pub(super) fn item(&self) -> &ItemBox {
        self.item.as_ref().expect("a live slot")
    }

    fn item_mut(&mut self) -> &mut ItemBox {
        self.item.as_mut().expect("a live slot")
    }
}

/// The wheel's links live in the items' headers.
impl LinkStore for Slab {
    fn link_of(&self, slot: SlotId) -> Link {
        self[slot as usize].item().header().expiry
    }

    fn set_link(&mut self, slot: SlotId, link: Link) {
        self[slot as usize].item_mut().header_mut().expiry = link;
    }
}

/// Whether a read that finds nothing counts as a miss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    Counted,
    /// Not the read's answer: it goes on to another node, which counts it.
    NotCounted,
}

/// Operation counters of one shard, summed by the store for stats and metrics.
/// Kept per shard, under the shard's lock, so a hit costs no shared atomic.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ShardCounters {
    pub hits: u64,
    pub misses: u64,
    pub sets: u64,
    pub deletes: u64,
    pub evictions: u64,
    pub expirations: u64,
    pub tag_invalidations: u64,
    /// Writes applied on another node's word (replication, rebalancing).
    pub replica_writes: u64,
}

/// What [`Shard::set`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub slot: SlotId,
    /// True when the key was absent (or expired) before this write.
    pub created: bool,
}

/// The item to write, already validated by the caller.
#[derive(Debug, Clone, Copy)]
pub struct NewItem<'a, T> {
    pub key: &'a [u8],
    pub value: &'a [u8],
    pub tags: &'a [T],
    pub created_at: UnixNanos,
    pub accessed_at: UnixNanos,
    pub expires_at: UnixNanos,
    pub access_count: u32,
    pub version: VersionRule,
}

/// How a write's version (its creation time) meets the live item's it
/// would replace. Decided under the shard's lock, with the one lookup the
/// write makes anyway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionRule {
    /// Applied whatever is held (compaction moving items as they are).
    Any,
    /// A client's write: always applied, its version raised past the held
    /// one's. Its creation time is the clock's and could equal (same tick)
    /// or precede (the clock stepped back) the held one, which replicas
    /// would then take as stale and keep.
    Newest,
    /// Another node's write (replication, rebalancing): applied only if
    /// newer than the live item held; last writer wins.
    IfNewer,
}

/// A shard that never held more items than this is not worth compacting.
pub const COMPACT_MIN_PEAK: usize = 256;
/// A shard holding more items than this is not compacted: a rebuild holds
/// the shard's lock for O(its items), about 0.3 µs each and two passes, so
/// this bounds that pause to about 20 ms. (At the default shard counts a
/// shard this big means millions of items left.)
pub const COMPACT_MAX_LEN: usize = 1 << 15;

#[derive(Debug)]
pub struct Shard<S> {
    hasher: S,
    index: Index,
    slots: Slab,
    /// Most recently used.
    lru_head: SlotId,
    /// Least recently used: the next to be evicted.
    lru_tail: SlotId,
    len: usize,
    /// The most items held since the shard was built (see [`Self::worth_rebuilding`]).
    peak_len: usize,
    bytes: u64,
    /// Every live item, by expiry time; exact (an item is unlinked when it is
    /// removed, and relinked when its expiry changes unless its bucket
    /// covers the new one, see `ExpiryWheel::keeps`).
    expiry: ExpiryWheel,
    tags: TagIndex,
    pub counters: ShardCounters,
    /// Counts the rebuilds ([`Self::compacted`]), which move every item to
    /// another slot: a walk that resumes at a slot id (a scan's cursor, a
    /// batch of `retain`) checks it and starts the shard over when it
    /// changed, rather than skip what moved below its position.
    pub generation: u16,
}

impl<S: BuildHasher> Shard<S> {
    pub fn new(hasher: S) -> Self {
        Self {
            hasher,
            index: Index::new(),
            slots: Slab::new(expiry::MAX_SLOTS.min(index::MAX_SLOTS)),
            lru_head: NIL,
            lru_tail: NIL,
            len: 0,
            peak_len: 0,
            bytes: 0,
            expiry: ExpiryWheel::default(),
            tags: TagIndex::default(),
            counters: ShardCounters::default(),
            generation: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn item(&self, slot: SlotId) -> ItemRef<'_> {
        ItemRef {
            item: self.slots[slot as usize].item(),
            tags: &self.tags,
        }
    }

    fn header(&self, slot: SlotId) -> &super::item::Header {
        self.slots[slot as usize].item().header()
    }

    /// Looks a key up without touching its LRU position or metadata. An expired
    /// item is reported absent but left for [`Self::get`] or the sweeper.
    pub fn peek(&self, hash: u64, key: &[u8], now: UnixNanos) -> Option<SlotId> {
        let slot = self.find(hash, key)?;
        (self.header(slot).expires_at > now).then_some(slot)
    }

    /// Looks a key up as a client read: counts a hit or (as `miss` says) a
    /// miss, expires the item if its time has passed, and otherwise marks it
    /// most recently used.
    pub fn get(&mut self, hash: u64, key: &[u8], now: UnixNanos, miss: Miss) -> Option<SlotId> {
        let missed = u64::from(miss == Miss::Counted);
        let Some(slot) = self.find(hash, key) else {
            self.counters.misses += missed;
            return None;
        };
        if self.header(slot).expires_at <= now {
            self.remove_slot(slot);
            self.counters.expirations += 1;
            self.counters.misses += missed;
            return None;
        }
        self.counters.hits += 1;
        let h = self.slots[slot as usize].item_mut().header_mut();
        h.accessed_at = now;
        h.access_count = h.access_count.saturating_add(1);
        self.move_to_front(slot);
        Some(slot)
    }

    /// Inserts or replaces an item and makes it most recently used, unless
    /// its [`VersionRule`] loses to the live item held (`None`: stale). Capacity
    /// is the caller's concern (see [`Self::evict_lru`]).
    pub fn set<T: AsRef<str>>(
        &mut self,
        hash: u64,
        mut item: NewItem<'_, T>,
        now: UnixNanos,
    ) -> Option<Stored> {
        let existing = self.find(hash, item.key);
        let created = match existing {
            Some(slot) => self.header(slot).expires_at <= now,
            None => true,
        };
        if let Some(slot) = existing.filter(|_| !created) {
            let held = self.header(slot).created_at;
            match item.version {
                VersionRule::Any => {}
                VersionRule::IfNewer if held >= item.created_at => return None,
                VersionRule::IfNewer => {}
                VersionRule::Newest if held >= item.created_at => {
                    // Creation and expiry move together, so the ttl stays
                    // exact; the access time stays the clock's, as eviction
                    // across shards compares it.
                    let shift = held + 1 - item.created_at;
                    item.created_at += shift;
                    item.expires_at = item.expires_at.saturating_add(shift);
                }
                VersionRule::Newest => {}
            }
        }
        if created && existing.is_some() {
            // The item it replaces had expired unswept: that item's end is
            // an expiration, so `items` keeps equalling creations minus
            // every kind of removal.
            self.counters.expirations += 1;
        }
        // The tags of a rewrite that keeps them (the usual rewrite: the
        // same key written again with the same tags); the slot then stays in
        // their member sets instead of leaving and rejoining each.
        let mut kept_tags = None;
        // A rewrite with the same tags and a value of the same length costs
        // the same bytes; one whose new expiry falls in the bucket the item
        // is in stays there (see `ExpiryWheel::keeps`).
        let mut same_cost = false;
        let mut keep_expiry = false;
        let slot = match existing {
            Some(slot) => {
                // Rewrite: the slot keeps its index entry and its id.
                kept_tags = self.same_tags(slot, item.tags);
                same_cost = kept_tags.is_some()
                    && self.slots[slot as usize].item().value_len() == item.value.len();
                if !same_cost {
                    self.bytes -= self.cost_of(slot);
                }
                if kept_tags.is_none() {
                    self.detach_tags(slot, None);
                }
                keep_expiry = self
                    .expiry
                    .keeps(self.header(slot).expires_at, item.expires_at);
                if !keep_expiry {
                    self.expiry.unlink(&mut self.slots, slot);
                }
                self.move_to_front(slot);
                slot
            }
            None => {
                let slot = self.alloc_slot();
                self.push_front(slot);
                self.len += 1;
                self.peak_len = self.peak_len.max(self.len);
                slot
            }
        };

        // In the order the client sent them, each once (a repeat finds the
        // slot already in the tag's member set).
        let tag_ids: SmallVec<[TagId; 8]> = kept_tags.unwrap_or_else(|| {
            item.tags
                .iter()
                .filter_map(|t| self.tags.attach(t.as_ref(), slot))
                .collect()
        });

        let parts = ItemParts {
            key: item.key,
            value: item.value,
            tags: &tag_ids,
            created_at: item.created_at,
            accessed_at: item.accessed_at,
            expires_at: item.expires_at,
            access_count: item.access_count,
        };
        // A rewrite of the same size reuses the item's allocation; any other
        // gets a new one, which takes over the expiry links if they stay.
        let rewritten =
            existing.is_some() && self.slots[slot as usize].item_mut().overwrite(&parts);
        if !rewritten {
            let links = match existing {
                Some(_) if keep_expiry => self.header(slot).expiry,
                _ => Link::UNLINKED,
            };
            let mut new = ItemBox::new(parts);
            new.header_mut().expiry = links;
            self.slots[slot as usize].item = Some(new);
        }
        if existing.is_none() {
            // Indexed once the slot holds its key, which a rebuild rehashes.
            let hasher = &self.hasher;
            let slots = &self.slots;
            self.index.insert(hash, slot, |s| {
                hasher.hash_one(slots[s as usize].item().key())
            });
        }
        if !keep_expiry {
            if self.expiry.is_empty() {
                self.expiry.reset(now);
            }
            self.expiry.link(&mut self.slots, slot, item.expires_at);
        }
        if !same_cost {
            self.bytes += self.cost_of(slot);
        }
        Some(Stored { slot, created })
    }

    /// Deletes a key. Returns false when it was absent or already expired.
    pub fn remove(&mut self, hash: u64, key: &[u8], now: UnixNanos) -> bool {
        let Some(slot) = self.find(hash, key) else {
            return false;
        };
        let live = self.header(slot).expires_at > now;
        self.remove_slot(slot);
        if live {
            self.counters.deletes += 1;
        } else {
            self.counters.expirations += 1;
        }
        live
    }

    /// Evicts the least recently used item unless it is `keep` (the item just
    /// written, which must survive its own insertion). Returns whether one went.
    pub fn evict_lru(&mut self, keep: Option<SlotId>) -> bool {
        let tail = self.lru_tail;
        if tail == NIL || Some(tail) == keep {
            return false;
        }
        self.remove_slot(tail);
        self.counters.evictions += 1;
        true
    }

    /// When the least recently used item was last read or written.
    pub fn lru_tail_accessed_at(&self) -> Option<UnixNanos> {
        (self.lru_tail != NIL).then(|| self.header(self.lru_tail).accessed_at)
    }

    /// Removes items whose time has passed, looking at no more than `budget`
    /// items (each either expired or moved down the wheel). Returns how many
    /// it looked at, so the caller can tell whether the shard may have more
    /// work left (`== budget`).
    pub fn sweep_expired(&mut self, now: UnixNanos, budget: usize) -> usize {
        let mut examined = 0;
        while examined < budget {
            let Some((bucket, start)) = self.expiry.next_due() else {
                break;
            };
            if start > now {
                break;
            }
            self.expiry.advance(start);
            while examined < budget {
                let Some(slot) = self.expiry.first(bucket) else {
                    break;
                };
                examined += 1;
                let expires_at = self.header(slot).expires_at;
                if expires_at <= now {
                    self.remove_slot(slot);
                    self.counters.expirations += 1;
                } else {
                    // Lands in a lower level: it differs from the bucket's
                    // start only in bits below this level's.
                    self.expiry.unlink(&mut self.slots, slot);
                    self.expiry.link(&mut self.slots, slot, expires_at);
                }
            }
        }
        if examined < budget {
            // Nothing due is left: later writes are placed relative to now.
            self.expiry.advance(now);
        }
        examined
    }

    /// Removes every live item carrying `tag`; returns how many, and how many
    /// of those `counts` says to count (the cluster counts the keys it is the
    /// primary of, so a fan-out over replicas sums to the distinct items).
    pub fn invalidate_tag(
        &mut self,
        tag: &str,
        now: UnixNanos,
        mut counts: impl FnMut(&[u8]) -> bool,
    ) -> (usize, usize) {
        let Some((id, members)) = self.tags.take_members(tag) else {
            return (0, 0);
        };
        let mut removed = 0;
        let mut counted = 0;
        for slot in members {
            if self.header(slot).expires_at > now {
                removed += 1;
                counted += usize::from(counts(self.slots[slot as usize].item().key()));
            } else {
                self.counters.expirations += 1;
            }
            // The tag's member set is already empty: its id stays interned
            // (so the item's cost is still computed with it) until `forget`,
            // and is not detached a second time.
            self.remove_slot_except_tag(slot, Some(id));
        }
        self.tags.forget(id);
        self.counters.tag_invalidations += removed as u64;
        (removed, counted)
    }

    /// The creation time of the live item under `key`: the version a
    /// replicated write is compared against.
    pub fn created_at_of(&self, hash: u64, key: &[u8], now: UnixNanos) -> Option<UnixNanos> {
        self.peek(hash, key, now)
            .map(|slot| self.header(slot).created_at)
    }

    /// Hands the live items of slots `from..` to `f`, looking at no more than
    /// `budget` slots, and stopping early after an item for which `f` answers
    /// `Break` (a batch that filled up). Returns how many slots it looked at
    /// and where to continue, or `None` at the end. Slots
    /// are visited in slab order, so a scan interleaved with writes may miss
    /// items written meanwhile or see a reused slot twice; its callers (data
    /// movement) are idempotent and see later writes through replication.
    pub fn scan(
        &self,
        from: SlotId,
        budget: usize,
        now: UnixNanos,
        mut f: impl FnMut(ItemRef<'_>) -> ControlFlow<()>,
    ) -> (usize, Option<SlotId>) {
        let from = (from as usize).min(self.slots.len());
        let mut end = self.slots.len().min(from + budget.max(1));
        for slot in from..end {
            let Some(s) = self.slots.get(slot) else {
                continue;
            };
            if s.is_live()
                && s.item().header().expires_at > now
                && f(self.item(slot as SlotId)).is_break()
            {
                end = slot + 1;
                break;
            }
        }
        (
            end - from,
            (end < self.slots.len()).then_some(end as SlotId),
        )
    }

    /// Removes the items of slots `from..` (at most `budget` slots looked at)
    /// whose key `keep` rejects. Returns how many went and where to continue.
    pub fn retain(
        &mut self,
        from: SlotId,
        budget: usize,
        mut keep: impl FnMut(&[u8]) -> bool,
    ) -> (usize, Option<SlotId>) {
        let end = self.slots.len().min(from as usize + budget.max(1));
        let mut removed = 0;
        for slot in from as usize..end {
            let Some(s) = self.slots.get(slot) else {
                continue;
            };
            if s.is_live() && !keep(s.item().key()) {
                self.remove_slot(slot as SlotId);
                removed += 1;
            }
        }
        (removed, (end < self.slots.len()).then_some(end as SlotId))
    }

    /// Like [`Self::retain`], deciding on the whole item (its version and
    /// tags as well as its key).
    pub fn retain_items(
        &mut self,
        from: SlotId,
        budget: usize,
        mut keep: impl FnMut(ItemRef<'_>) -> bool,
    ) -> (usize, Option<SlotId>) {
        let end = self.slots.len().min(from as usize + budget.max(1));
        // `get`, not indexing: a chunk freed by deletions is a hole here.
        let doomed: Vec<SlotId> = (from as usize..end)
            .filter(|&slot| {
                self.slots.get(slot).is_some_and(|s| s.is_live())
                    && !keep(self.item(slot as SlotId))
            })
            .map(|slot| slot as SlotId)
            .collect();
        for &slot in &doomed {
            self.remove_slot(slot);
        }
        (
            doomed.len(),
            (end < self.slots.len()).then_some(end as SlotId),
        )
    }

    /// Whether the shard lost more than a quarter of the most items it held
    /// since it was built (and that most was at least [`COMPACT_MIN_PEAK`],
    /// and what it holds now at most [`COMPACT_MAX_LEN`]).
    /// Its slab chunks and the allocator pages of its items were filled at
    /// that peak; deletions spread over the keys leave a few survivors in
    /// each, so none empties and nothing can be given back until the shard
    /// is [compacted](Self::compacted). So after a compaction no shard
    /// keeps room for more than a third over what its live items take.
    ///
    /// Why a quarter and not more: deletions come in stages (a release in
    /// the middle of a mass delete rebuilds the shards at, say, a fifth of
    /// their items; the delete goes on to a tenth). A rebuilt shard's peak is
    /// what it held when rebuilt, so with a rule of "less than a quarter
    /// left" the second stage (half of a fifth) would never rebuild it, and
    /// it kept twice the pages its survivors need for good. Rebuilding costs
    /// O(live items), and a shard must lose a quarter between rebuilds, so
    /// the work stays within three times the deletions that called for it.
    pub fn worth_rebuilding(&self) -> bool {
        self.peak_len >= COMPACT_MIN_PEAK
            && self.len * 4 < self.peak_len * 3
            && self.len <= COMPACT_MAX_LEN
    }

    /// Slab slots allocated, free or not (tests).
    #[cfg(test)]
    pub fn allocated_slots(&self) -> usize {
        self.slots.allocated_slots()
    }

    /// A new shard holding this one's live items (expired ones are counted
    /// as expirations and left out) in the same LRU order, with the same
    /// metadata and counters, built by inserting them afresh: its slab,
    /// index and tag index sized to what it holds and every item in a new
    /// allocation, packed into as few allocator pages as they fill. The
    /// caller swaps it in and drops this one, which frees the rest.
    ///
    /// Written as a rebuild through [`Self::set`], not as slot moves in
    /// place, so it relies on nothing but the insertion path every write
    /// takes. It costs O(live items) under the shard's lock, which is why it
    /// waits for [`Self::worth_rebuilding`] and for [`COMPACT_MAX_LEN`].
    pub fn compacted(&self, now: UnixNanos) -> Self
    where
        S: Clone,
    {
        let mut fresh = Self::new(self.hasher.clone());
        fresh.counters = self.counters;
        fresh.generation = self.generation.wrapping_add(1);
        // From the least recently used up: each insertion goes to the front.
        let mut at = self.lru_tail;
        while at != NIL {
            let slot = &self.slots[at as usize];
            let item = slot.item();
            let h = item.header();
            let (created_at, accessed_at, expires_at, access_count) =
                (h.created_at, h.accessed_at, h.expires_at, h.access_count);
            if expires_at <= now {
                fresh.counters.expirations += 1;
            } else {
                let tags: SmallVec<[&str; 8]> = item.tag_ids().map(|t| self.tags.name(t)).collect();
                let hash = self.hasher.hash_one(item.key());
                fresh.set(
                    hash,
                    NewItem {
                        key: item.key(),
                        value: item.value(),
                        tags: &tags,
                        created_at,
                        accessed_at,
                        expires_at,
                        access_count,
                        version: VersionRule::Any,
                    },
                    now,
                );
            }
            at = slot.prev;
        }
        fresh
    }

    /// Number of items that carry `tag`, expired or not.
    pub fn tag_count(&self, tag: &str) -> usize {
        self.tags.count(tag)
    }

    /// Entries in the expiry index (tests).
    #[cfg(test)]
    pub fn expiry_entries(&self) -> usize {
        self.expiry.len()
    }

    /// Keys from most to least recently used, for tests and diagnostics.
    pub fn keys_mru(&self) -> Vec<Vec<u8>> {
        let mut keys = Vec::with_capacity(self.len);
        let mut at = self.lru_head;
        while at != NIL {
            keys.push(self.slots[at as usize].item().key().to_vec());
            at = self.slots[at as usize].next;
        }
        keys
    }

    /// Checks every internal invariant; panics with a description on the first
    /// violation. Used by the tests after each operation.
    pub fn assert_consistent(&self) {
        let mut seen = 0;
        let mut bytes = 0;
        let mut at = self.lru_head;
        let mut prev = NIL;
        while at != NIL {
            let s = &self.slots[at as usize];
            assert!(s.is_live(), "free slot {at} on the LRU list");
            assert_eq!(s.prev, prev, "broken back link at slot {at}");
            let hash = self.hasher.hash_one(s.item().key());
            assert_eq!(
                self.find(hash, s.item().key()),
                Some(at),
                "slot {at} missing from the index"
            );
            for t in s.item().tag_ids() {
                assert!(
                    self.tags.contains(t, at),
                    "slot {at} carries tag {t} but is not in its member set"
                );
            }
            bytes += self.cost_of(at);
            seen += 1;
            prev = at;
            at = s.next;
        }
        assert_eq!(self.lru_tail, prev, "tail is not the last list element");
        assert_eq!(seen, self.len, "list length differs from len");
        assert_eq!(self.index.len(), self.len, "index size differs from len");
        assert_eq!(bytes, self.bytes, "byte accounting drifted");
        for (tag, slot) in self.tags.memberships() {
            let s = &self.slots[slot as usize];
            assert!(s.is_live(), "tag {tag} lists free slot {slot}");
            assert!(
                s.item().tag_ids().any(|t| self.tags.name(t) == tag),
                "tag {tag} lists slot {slot} which does not carry it"
            );
        }
        let in_wheel = self.expiry.assert_consistent(&self.slots, |slot| {
            let s = self.slots.get(slot as usize)?;
            s.item.as_ref().map(|i| i.header().expires_at)
        });
        assert_eq!(in_wheel, self.len, "an item has no expiry entry");
    }

    fn find(&self, hash: u64, key: &[u8]) -> Option<SlotId> {
        self.index
            .find(hash, |s| self.slots[s as usize].item().key() == key)
    }

    fn cost_of(&self, slot: SlotId) -> u64 {
        let item = self.slots[slot as usize].item();
        let tags = item.tag_ids().map(|t| self.tags.name(t));
        item_cost(item.key_len(), item.value_len(), tags)
    }

    /// Unlinks a live slot from the index, the LRU list and its tags, frees its
    /// memory and puts it on the free list.
    fn remove_slot(&mut self, slot: SlotId) {
        self.remove_slot_except_tag(slot, None);
    }

    /// [`Self::remove_slot`], leaving tag `skip`'s member set alone.
    fn remove_slot_except_tag(&mut self, slot: SlotId, skip: Option<TagId>) {
        self.bytes -= self.cost_of(slot);
        self.detach_tags(slot, skip);
        let hash = self.hasher.hash_one(self.slots[slot as usize].item().key());
        let hasher = &self.hasher;
        let slots = &self.slots;
        // The index shrinks by itself once mostly empty.
        self.index.remove(hash, slot, |s| {
            hasher.hash_one(slots[s as usize].item().key())
        });
        self.unlink(slot);
        self.expiry.unlink(&mut self.slots, slot);
        let s = &mut self.slots[slot as usize];
        s.item = None;
        s.prev = NIL;
        self.slots.free(slot);
        self.len -= 1;
    }

    /// The tag ids of the item in `slot` if `tags` names exactly them, in
    /// the same order (a list with a repeat never matches: the item holds
    /// each tag once).
    fn same_tags<T: AsRef<str>>(&self, slot: SlotId, tags: &[T]) -> Option<SmallVec<[TagId; 8]>> {
        let held = self.slots[slot as usize].item().tag_ids();
        if held.len() != tags.len() {
            return None;
        }
        let ids: SmallVec<[TagId; 8]> = held.collect();
        ids.iter()
            .zip(tags)
            .all(|(&id, name)| self.tags.name(id) == name.as_ref())
            .then_some(ids)
    }

    /// Takes `slot` out of the member sets of its tags (but `skip`'s).
    fn detach_tags(&mut self, slot: SlotId, skip: Option<TagId>) {
        let ids: SmallVec<[TagId; 8]> = self.slots[slot as usize].item().tag_ids().collect();
        for t in ids {
            if Some(t) != skip {
                self.tags.detach(t, slot);
            }
        }
    }

    fn alloc_slot(&mut self) -> SlotId {
        self.slots.alloc()
    }

    fn push_front(&mut self, slot: SlotId) {
        let old_head = self.lru_head;
        {
            let s = &mut self.slots[slot as usize];
            s.prev = NIL;
            s.next = old_head;
        }
        if old_head != NIL {
            self.slots[old_head as usize].prev = slot;
        } else {
            self.lru_tail = slot;
        }
        self.lru_head = slot;
    }

    fn unlink(&mut self, slot: SlotId) {
        let (prev, next) = {
            let s = &self.slots[slot as usize];
            (s.prev, s.next)
        };
        if prev != NIL {
            self.slots[prev as usize].next = next;
        } else {
            self.lru_head = next;
        }
        if next != NIL {
            self.slots[next as usize].prev = prev;
        } else {
            self.lru_tail = prev;
        }
    }

    fn move_to_front(&mut self, slot: SlotId) {
        if self.lru_head != slot {
            self.unlink(slot);
            self.push_front(slot);
        }
    }
}
