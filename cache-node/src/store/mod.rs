//! The in-memory store: items with TTL, tags and LRU eviction under an item cap
//! and a byte cap. Plain synchronous Rust with no I/O, so it is tested and
//! benchmarked on its own and knows nothing of HTTP or the cluster.
//!
//! Concurrency: the key space is split over a power-of-two number of shards,
//! each behind its own mutex (a read updates LRU order and access metadata, so
//! even reads write; a reader-writer lock would buy nothing). Operations on
//! different shards never wait for each other.
//!
//! Capacity is store-wide, not per shard, so `maxSize` means what it says
//! whatever the key distribution: the totals are shared atomics, and a write
//! that pushes them over a cap evicts the least recently used items of its own
//! shard first (no second lock needed), then, if its shard has nothing else to
//! give (a value large enough to need more evictions than its shard holds),
//! the other shards' least recently used items, globally oldest tail first,
//! until both caps hold again. LRU order is therefore exact within a shard and
//! approximate across shards, like Redis's sampled LRU. The shard count is
//! chosen so each shard holds at least ~128 items at capacity, which keeps
//! that approximation close; a cache small enough for one shard has exact LRU.
//!
//! Costs: `get`, `peek`, `delete` and `set` are O(1) plus O(tags of the item),
//! evictions included, as long as the writer's shard can give what the write
//! needs, which is the rule (an insert at capacity evicts one item). A write
//! that empties its shard looks once at every other shard's tail and then pays
//! O(log shards) per further eviction, one shard lock at a time, never
//! scanning items. `sweep_expired` is O(expired items) plus the wheel's moves
//! (see [`expiry`]); `invalidate_tag` is O(shards + items carrying the tag);
//! `stats` and `tag_count` are O(shards); `scan`, `retain` and the
//! diagnostics are O(n), in batches where they run in production.

mod clock;
mod expiry;
mod index;
mod item;
mod shard;
mod slab;
mod tags;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::hash::BuildHasher;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crossbeam_utils::CachePadded;
use parking_lot::Mutex;

#[cfg(any(test, feature = "test-util"))]
pub use clock::ManualClock;
pub use clock::{Clock, SystemClock, UnixNanos};
pub use shard::{ITEM_OVERHEAD, Miss, ShardCounters, TAG_LIST_OVERHEAD, TAG_OVERHEAD, item_cost};

pub use item::{MAX_KEY_BYTES, MAX_TAGS};

use item::ItemBox;
use shard::{NewItem, Shard, VersionRule};
use tags::TagIndex;

/// Index of an entry in a shard's slab.
pub type SlotId = u32;

type Hasher = foldhash::fast::RandomState;

/// How many items the sweeper looks at (expires or moves down the wheel) per
/// lock acquisition, so that a large backlog never holds a shard's lock for long.
const SWEEP_BATCH: usize = 512;

/// How many slots [`Store::retain`] looks at per lock acquisition.
const RETAIN_BATCH: usize = 4096;

/// Where a [`Store::scan`] continues: the shard's generation in bits 48..,
/// the shard in bits 32..48, the slot in the low 32 (see [`cursor_parts`]).
pub type ScanCursor = u64;

/// A cursor's shard, that shard's generation when the cursor was made, and
/// the slot to go on from: bits 48.., 32..48 and ..32.
fn cursor_parts(cursor: ScanCursor) -> (usize, u16, SlotId) {
    (
        ((cursor >> 32) & 0xffff) as usize,
        (cursor >> 48) as u16,
        cursor as SlotId,
    )
}

fn cursor_of(shard: usize, generation: u16, slot: SlotId) -> ScanCursor {
    (u64::from(generation) << 48) | ((shard as u64) << 32) | u64::from(slot)
}

/// An item's metadata, as it travels between nodes with the item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ItemMeta {
    pub created_at: UnixNanos,
    pub accessed_at: UnixNanos,
    pub expires_at: UnixNanos,
    pub access_count: u64,
}

/// What [`Store::put_replica`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Created,
    Replaced,
    /// The store holds a newer version, or the item had already expired.
    Stale,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteKind {
    /// A client's write: counted in `sets`, always applied.
    Client,
    /// Another node's write: applied only if not older than what is held.
    Replica,
}

fn key_str(key: &[u8]) -> &str {
    std::str::from_utf8(key).expect("keys are only ever stored from &str")
}

/// Sizing and defaults of a [`Store`].
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Most items held at once (the seed's `MaxSize`). At least 1.
    pub max_items: usize,
    /// Most bytes held at once, counting keys, values, tags and bookkeeping
    /// (see [`item_cost`]). 0 means no byte cap.
    pub max_bytes: u64,
    /// TTL of items written without one.
    pub default_ttl: Duration,
    /// Number of shards; rounded up to a power of two. 0 picks a default from
    /// the core count.
    pub shards: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            max_items: 10_000,
            max_bytes: 0,
            default_ttl: Duration::from_secs(300),
            shards: 0,
        }
    }
}

/// Why a write was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error(
        "item needs {cost} bytes, more than the cache's whole memory budget of {max_bytes} bytes"
    )]
    TooLarge { cost: u64, max_bytes: u64 },
    #[error("ttl is too large")]
    TtlTooLarge,
    #[error("key is {len} bytes; the store holds keys of at most {MAX_KEY_BYTES}")]
    KeyTooLong { len: usize },
    #[error("{count} tags; the store holds at most {MAX_TAGS} per item")]
    TooManyTags { count: usize },
    #[error("value is {len} bytes; the store holds values below 4 GiB")]
    ValueTooLarge { len: usize },
}

/// The tags of an item written without any (spelled out, since an empty
/// `&[]` names no tag type). For tests and benchmarks.
#[cfg(any(test, feature = "test-util"))]
pub const NO_TAGS: &[&str] = &[];

/// An item as the encoders see it (the REST answer's JSON, the peer
/// protocol's records): a live item borrowed from the store, or a record
/// that arrived from a peer. One trait, so each encoding is written once.
pub trait ItemView {
    fn key(&self) -> &str;
    /// The value's JSON text, exactly as the client wrote it.
    fn value(&self) -> &[u8];
    fn meta(&self) -> ItemMeta;
    /// In the order the client gave them.
    fn tags(&self) -> impl Iterator<Item = &str>;
}

/// An item with every part chosen by a test: for encoding items (as the
/// seed's JSON, as peer records) without a store.
#[cfg(test)]
#[derive(Debug, Clone)]
pub struct StandInItem {
    pub key: String,
    pub value: Vec<u8>,
    pub tags: Vec<String>,
    pub meta: ItemMeta,
}

#[cfg(test)]
impl ItemView for StandInItem {
    fn key(&self) -> &str {
        &self.key
    }
    fn value(&self) -> &[u8] {
        &self.value
    }
    fn meta(&self) -> ItemMeta {
        self.meta
    }
    fn tags(&self) -> impl Iterator<Item = &str> {
        self.tags.iter().map(String::as_str)
    }
}

impl ItemView for ItemRef<'_> {
    fn key(&self) -> &str {
        ItemRef::key(self)
    }

    fn value(&self) -> &[u8] {
        ItemRef::value(self)
    }

    fn meta(&self) -> ItemMeta {
        ItemRef::meta(self)
    }

    fn tags(&self) -> impl Iterator<Item = &str> {
        ItemRef::tags(self)
    }
}

/// A live item, borrowed from its shard while the shard's lock is held.
#[derive(Clone, Copy)]
pub struct ItemRef<'a> {
    item: &'a ItemBox,
    tags: &'a TagIndex,
}

impl<'a> ItemRef<'a> {
    pub fn key(&self) -> &'a str {
        key_str(self.item.key())
    }

    pub fn meta(&self) -> ItemMeta {
        let h = self.item.header();
        ItemMeta {
            created_at: h.created_at,
            accessed_at: h.accessed_at,
            expires_at: h.expires_at,
            access_count: u64::from(h.access_count),
        }
    }

    /// The value exactly as it was written (the store treats it as opaque bytes).
    pub fn value(&self) -> &'a [u8] {
        self.item.value()
    }

    pub fn created_at(&self) -> UnixNanos {
        self.item.header().created_at
    }

    pub fn accessed_at(&self) -> UnixNanos {
        self.item.header().accessed_at
    }

    pub fn expires_at(&self) -> UnixNanos {
        self.item.header().expires_at
    }

    /// The item's time to live in nanoseconds, as written (0 for a record
    /// claiming to expire before it was created; the store refuses those from
    /// peers, see [`Store::put_replica`]).
    pub fn ttl_nanos(&self) -> u64 {
        self.expires_at().saturating_sub(self.created_at())
    }

    pub fn access_count(&self) -> u64 {
        u64::from(self.item.header().access_count)
    }

    pub fn tags(&self) -> impl Iterator<Item = &'a str> + 'a {
        let index = self.tags;
        self.item.tag_ids().map(move |t| index.name(t))
    }
}

/// Counters and sizes summed over every shard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub counters: ShardCounters,
    pub items: usize,
    pub bytes: u64,
    pub max_items: usize,
    pub max_bytes: u64,
}

pub struct Store {
    shards: Box<[CachePadded<Mutex<Shard<Hasher>>>]>,
    shard_mask: usize,
    hasher: Hasher,
    clock: Arc<dyn Clock>,
    max_items: usize,
    max_bytes: u64,
    default_ttl: Duration,
    /// Store-wide totals, kept equal to the sums over the shards. Updated under
    /// the shard lock that caused the change; read without a lock to decide
    /// whether to evict. On their own cache line, so that writes to them do
    /// not evict the read-only fields above from every core's cache.
    totals: CachePadded<Totals>,
}

#[derive(Default)]
struct Totals {
    items: AtomicUsize,
    bytes: AtomicU64,
}

impl Store {
    pub fn new(config: StoreConfig, clock: Arc<dyn Clock>) -> Self {
        let shards = match config.shards {
            0 => default_shard_count(config.max_items),
            // Never so few that a shard's slots run out before the store is
            // full (a shard then refused every new key).
            n => n
                .next_power_of_two()
                .max(shards_for_index(config.max_items)),
        }
        // A scan cursor holds the shard's index in 16 bits.
        .min(1 << 16);
        let hasher = Hasher::default();
        Self {
            shards: (0..shards)
                .map(|_| CachePadded::new(Mutex::new(Shard::new(hasher.clone()))))
                .collect(),
            shard_mask: shards - 1,
            hasher,
            clock,
            max_items: config.max_items.max(1),
            max_bytes: config.max_bytes,
            default_ttl: config.default_ttl,
            totals: CachePadded::default(),
        }
    }

    /// A store on the system clock.
    pub fn with_config(config: StoreConfig) -> Self {
        Self::new(config, Arc::new(SystemClock))
    }

    pub fn now(&self) -> UnixNanos {
        self.clock.now()
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    pub fn default_ttl(&self) -> Duration {
        self.default_ttl
    }

    /// Items currently held (expired ones not yet swept included).
    pub fn len(&self) -> usize {
        self.totals.items.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes currently charged against `max_bytes`.
    pub fn bytes(&self) -> u64 {
        self.totals.bytes.load(Ordering::Relaxed)
    }

    /// Reads an item as a client would: counts a hit or miss, updates its access
    /// metadata and LRU position, and hands it to `f` while it is locked.
    pub fn get<R>(&self, key: &str, f: impl FnOnce(ItemRef<'_>) -> R) -> Option<R> {
        self.get_with(key, Miss::Counted, f)
    }

    /// [`Self::get`], counting a miss as `miss` says: not for a read whose
    /// miss is not its answer (a replica's, which then asks the key's
    /// primary, where the read counts, once per client read).
    pub fn get_with<R>(
        &self,
        key: &str,
        miss: Miss,
        f: impl FnOnce(ItemRef<'_>) -> R,
    ) -> Option<R> {
        let now = self.clock.now();
        let (idx, hash) = self.locate(key);
        let mut shard = self.shards[idx].lock();
        let before = (shard.len(), shard.bytes());
        let found = shard.get(hash, key.as_bytes(), now, miss);
        self.account(before, (shard.len(), shard.bytes()));
        found.map(|slot| f(shard.item(slot)))
    }

    /// Reads an item without counting it or touching its metadata.
    pub fn peek<R>(&self, key: &str, f: impl FnOnce(ItemRef<'_>) -> R) -> Option<R> {
        let now = self.clock.now();
        let (idx, hash) = self.locate(key);
        let shard = self.shards[idx].lock();
        shard
            .peek(hash, key.as_bytes(), now)
            .map(|slot| f(shard.item(slot)))
    }

    /// Writes an item (`ttl` `None` or zero means the default TTL), evicts
    /// least recently used items as needed to stay within capacity, and hands
    /// the stored item to `f`. Returns whether the key was created (as opposed
    /// to replaced) with `f`'s result.
    pub fn set<R>(
        &self,
        key: &str,
        value: &[u8],
        tags: &[impl AsRef<str>],
        ttl: Option<Duration>,
        f: impl FnOnce(ItemRef<'_>) -> R,
    ) -> Result<(bool, R), StoreError> {
        let ttl = ttl.filter(|t| !t.is_zero()).unwrap_or(self.default_ttl);
        let now = self.clock.now();
        let expires_at = u64::try_from(ttl.as_nanos())
            .ok()
            .and_then(|t| now.checked_add(t))
            .ok_or(StoreError::TtlTooLarge)?;
        let meta = ItemMeta {
            created_at: now,
            accessed_at: now,
            expires_at,
            access_count: 0,
        };
        let written = self.write(key, value, tags, meta, now, WriteKind::Client, f)?;
        Ok(written.expect("client writes are never stale"))
    }

    /// Writes an item that another node wrote first (replication, rebalancing,
    /// repair), keeping its metadata. Last writer wins by creation time: an
    /// item older than the one held, or already expired, is not applied; nor
    /// is a record claiming to expire no later than it was created (a corrupt
    /// or hostile peer's; a client's write always has a positive ttl), whose
    /// life is empty.
    pub fn put_replica(
        &self,
        key: &str,
        value: &[u8],
        tags: &[impl AsRef<str>],
        meta: ItemMeta,
    ) -> Result<Applied, StoreError> {
        let now = self.clock.now();
        if meta.expires_at <= now || meta.expires_at <= meta.created_at {
            return Ok(Applied::Stale);
        }
        Ok(
            match self.write(key, value, tags, meta, now, WriteKind::Replica, |_| ())? {
                Some((true, ())) => Applied::Created,
                Some((false, ())) => Applied::Replaced,
                None => Applied::Stale,
            },
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn write<R>(
        &self,
        key: &str,
        value: &[u8],
        tags: &[impl AsRef<str>],
        meta: ItemMeta,
        now: UnixNanos,
        kind: WriteKind,
        f: impl FnOnce(ItemRef<'_>) -> R,
    ) -> Result<Option<(bool, R)>, StoreError> {
        if key.len() > MAX_KEY_BYTES {
            return Err(StoreError::KeyTooLong { len: key.len() });
        }
        if tags.len() > MAX_TAGS {
            return Err(StoreError::TooManyTags { count: tags.len() });
        }
        if u32::try_from(value.len()).is_err() {
            return Err(StoreError::ValueTooLarge { len: value.len() });
        }
        let cost = item_cost(key.len(), value.len(), tags.iter().map(AsRef::as_ref));
        if self.max_bytes > 0 && cost > self.max_bytes {
            return Err(StoreError::TooLarge {
                cost,
                max_bytes: self.max_bytes,
            });
        }
        let item = NewItem {
            key: key.as_bytes(),
            value,
            tags,
            created_at: meta.created_at,
            accessed_at: meta.accessed_at,
            expires_at: meta.expires_at,
            access_count: u32::try_from(meta.access_count).unwrap_or(u32::MAX),
            version: match kind {
                WriteKind::Client => VersionRule::Newest,
                // A replica's version is the coordinator's.
                WriteKind::Replica => VersionRule::IfNewer,
            },
        };

        let (idx, hash) = self.locate(key);
        let (created, result) = {
            let mut shard = self.shards[idx].lock();
            let before = (shard.len(), shard.bytes());
            let Some(stored) = shard.set(hash, item, now) else {
                return Ok(None);
            };
            match kind {
                WriteKind::Client => shard.counters.sets += 1,
                WriteKind::Replica => shard.counters.replica_writes += 1,
            }
            self.account(before, (shard.len(), shard.bytes()));
            while self.over_capacity() {
                let before = (shard.len(), shard.bytes());
                if !shard.evict_lru(Some(stored.slot)) {
                    break;
                }
                self.account(before, (shard.len(), shard.bytes()));
            }
            (stored.created, f(shard.item(stored.slot)))
        };
        // The writer's shard holds only the item just written: the rest comes
        // from the others.
        if self.over_capacity() {
            self.evict_from_other_shards(idx);
        }
        Ok(Some((created, result)))
    }

    /// Deletes a key; false when it was absent or expired.
    pub fn delete(&self, key: &str) -> bool {
        let now = self.clock.now();
        let (idx, hash) = self.locate(key);
        let mut shard = self.shards[idx].lock();
        let before = (shard.len(), shard.bytes());
        let deleted = shard.remove(hash, key.as_bytes(), now);
        self.account(before, (shard.len(), shard.bytes()));
        deleted
    }

    /// Deletes a key on another node's word (replication, repair) unless the
    /// item held was written after `at`, the time of the original delete.
    pub fn delete_replica(&self, key: &str, at: UnixNanos) -> bool {
        let now = self.clock.now();
        let (idx, hash) = self.locate(key);
        let mut shard = self.shards[idx].lock();
        if shard
            .created_at_of(hash, key.as_bytes(), now)
            .is_none_or(|held| held > at)
        {
            return false;
        }
        let before = (shard.len(), shard.bytes());
        let deleted = shard.remove(hash, key.as_bytes(), now);
        // Counted by the node that took the client's delete, not by replicas.
        shard.counters.deletes -= u64::from(deleted);
        self.account(before, (shard.len(), shard.bytes()));
        deleted
    }

    /// Removes every item carrying `tag`; returns how many live items went.
    /// Costs O(shards + items carrying the tag).
    pub fn invalidate_tag(&self, tag: &str) -> usize {
        self.invalidate_tag_counting(tag, |_| true).0
    }

    /// Like [`Self::invalidate_tag`], also returning how many of the removed
    /// keys `counts` accepts.
    pub fn invalidate_tag_counting(
        &self,
        tag: &str,
        mut counts: impl FnMut(&str) -> bool,
    ) -> (usize, usize) {
        let now = self.clock.now();
        let mut total = (0, 0);
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            let before = (shard.len(), shard.bytes());
            let (removed, counted) = shard.invalidate_tag(tag, now, |key| counts(key_str(key)));
            self.account(before, (shard.len(), shard.bytes()));
            total.0 += removed;
            total.1 += counted;
        }
        total
    }

    /// Hands live items to `f`, starting at `cursor` (0 for the beginning) and
    /// looking at about `budget` slots, one shard lock at a time. Returns the
    /// cursor to continue from, or `None` when the whole store has been seen.
    /// For data movement: items written during a scan may or may not be seen.
    pub fn scan(
        &self,
        cursor: ScanCursor,
        budget: usize,
        mut f: impl FnMut(ItemRef<'_>),
    ) -> Option<ScanCursor> {
        self.scan_while(cursor, budget, |item| {
            f(item);
            ControlFlow::Continue(())
        })
    }

    /// [`Self::scan`] that also stops right after an item for which `f`
    /// answers `Break`, so a caller filling a bounded batch never takes more
    /// than it can send; the cursor returned continues after that item.
    pub fn scan_while(
        &self,
        cursor: ScanCursor,
        budget: usize,
        mut f: impl FnMut(ItemRef<'_>) -> ControlFlow<()>,
    ) -> Option<ScanCursor> {
        let now = self.clock.now();
        let (mut shard_idx, mut generation, mut slot) = cursor_parts(cursor);
        let mut left = budget.max(1);
        let mut stopped = false;
        while shard_idx < self.shards.len() {
            let shard = self.shards[shard_idx].lock();
            if shard.generation != generation {
                // Compacted since the cursor was made: start it over (the
                // callers take an item seen twice as they take it once).
                (generation, slot) = (shard.generation, 0);
            }
            let (looked, next) = shard.scan(slot, left, now, |item| {
                let flow = f(item);
                stopped = flow.is_break();
                flow
            });
            drop(shard);
            match next {
                Some(next) => slot = next,
                None => (shard_idx, slot) = (shard_idx + 1, 0),
            }
            // An empty shard costs a lock too; count it as one slot.
            left = left.saturating_sub(looked.max(1));
            if left == 0 || stopped {
                break;
            }
        }
        // At slot 0 the generation carried is the previous shard's, which
        // does no harm: a shard not started yet is started from 0 anyway.
        (shard_idx < self.shards.len()).then(|| cursor_of(shard_idx, generation, slot))
    }

    /// Removes every item whose key `keep` rejects; returns how many. O(n),
    /// in batches so no shard lock is held for long.
    pub fn retain(&self, mut keep: impl FnMut(&str) -> bool) -> usize {
        self.retain_in_batches(|shard, at| shard.retain(at, RETAIN_BATCH, |key| keep(key_str(key))))
    }

    /// Like [`Self::retain`], deciding on the whole item (version, tags).
    pub fn retain_items(&self, mut keep: impl FnMut(ItemRef<'_>) -> bool) -> usize {
        self.retain_in_batches(|shard, at| shard.retain_items(at, RETAIN_BATCH, &mut keep))
    }

    /// Runs `batch` over every shard from slot 0, one lock per batch, until
    /// it says where to go on is nowhere; returns how many it removed. A
    /// shard compacted between two batches is started over.
    fn retain_in_batches(
        &self,
        mut batch: impl FnMut(&mut Shard<Hasher>, SlotId) -> (usize, Option<SlotId>),
    ) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            let (mut from, mut generation) = (Some(0), None);
            while let Some(mut at) = from {
                let mut shard = shard.lock();
                if generation.is_some_and(|g| g != shard.generation) {
                    at = 0;
                }
                generation = Some(shard.generation);
                let before = (shard.len(), shard.bytes());
                let (went, next) = batch(&mut shard, at);
                self.account(before, (shard.len(), shard.bytes()));
                removed += went;
                from = next;
            }
        }
        removed
    }

    /// Rebuilds every shard [worth rebuilding](Shard::worth_rebuilding) (see
    /// [`Shard::compacted`]), one shard's lock at a time, and then those
    /// shards once more; returns how many shards. What the old shards held
    /// is freed by the time it returns (their items, slab chunks and tables,
    /// dropped outside the locks); giving the freed pages back to the system
    /// is [`crate::memory`]'s.
    ///
    /// Why twice: the first rebuild allocates the survivors while the old
    /// items still hold their pages, so many land in those pages' holes, and
    /// those pages stay part-full once the old items go. The second allocates
    /// them again with those old items gone and packs them. Measured with the
    /// `memory_per_item` example (1M items, nine in ten deleted everywhere,
    /// against a fresh process holding the 100k left): 1.21-1.28x after one
    /// pass, 1.11x after two.
    pub fn compact(&self) -> usize {
        let rebuilt: Vec<usize> = (0..self.shards.len())
            .filter(|&i| self.rebuild_if(i, Shard::worth_rebuilding))
            .collect();
        for &i in &rebuilt {
            self.rebuild_if(i, |_| true);
        }
        rebuilt.len()
    }

    /// Rebuilds every shard, worth it or not, once: what [`Self::compact`]
    /// does to a thinned one, for the property tests to check on any state.
    #[doc(hidden)]
    pub fn compact_all(&self) -> usize {
        (0..self.shards.len())
            .filter(|&i| self.rebuild_if(i, |_| true))
            .count()
    }

    /// Rebuilds shard `i` if `due` says so; whether it did.
    fn rebuild_if(&self, i: usize, due: impl Fn(&Shard<Hasher>) -> bool) -> bool {
        let old = {
            let mut shard = self.shards[i].lock();
            if !due(&shard) {
                return false;
            }
            let before = (shard.len(), shard.bytes());
            let fresh = shard.compacted(self.clock.now());
            let old = std::mem::replace(&mut *shard, fresh);
            self.account(before, (shard.len(), shard.bytes()));
            old
        };
        drop(old);
        true
    }

    /// Removes every item whose time has passed; returns how many. The cost
    /// grows with the number of expired items, not with the number of items.
    pub fn sweep_expired(&self) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            loop {
                let now = self.clock.now();
                let mut shard = shard.lock();
                let before = (shard.len(), shard.bytes());
                let examined = shard.sweep_expired(now, SWEEP_BATCH);
                removed += before.0 - shard.len();
                self.account(before, (shard.len(), shard.bytes()));
                if examined < SWEEP_BATCH {
                    break;
                }
            }
        }
        removed
    }

    /// Counters and sizes summed over every shard.
    pub fn stats(&self) -> StoreStats {
        let mut stats = StoreStats {
            max_items: self.max_items,
            max_bytes: self.max_bytes,
            ..StoreStats::default()
        };
        for shard in self.shards.iter() {
            let shard = shard.lock();
            let c = &shard.counters;
            let total = &mut stats.counters;
            total.hits += c.hits;
            total.misses += c.misses;
            total.sets += c.sets;
            total.deletes += c.deletes;
            total.evictions += c.evictions;
            total.expirations += c.expirations;
            total.tag_invalidations += c.tag_invalidations;
            total.replica_writes += c.replica_writes;
            stats.items += shard.len();
            stats.bytes += shard.bytes();
        }
        stats
    }

    /// Number of items carrying `tag` (expired ones not yet swept included).
    pub fn tag_count(&self, tag: &str) -> usize {
        self.shards.iter().map(|s| s.lock().tag_count(tag)).sum()
    }

    /// Slab slots allocated across the shards, free or not (tests).
    #[cfg(test)]
    pub fn allocated_slots(&self) -> usize {
        self.shards.iter().map(|s| s.lock().allocated_slots()).sum()
    }

    /// Keys of each shard from most to least recently used (diagnostics and
    /// tests; O(n)).
    pub fn keys_by_recency(&self) -> Vec<Vec<String>> {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .keys_mru()
                    .into_iter()
                    .map(|k| String::from_utf8(k).expect("keys are UTF-8"))
                    .collect()
            })
            .collect()
    }

    /// Checks every internal invariant of every shard and the store-wide
    /// totals; panics on the first violation. O(n): for tests.
    pub fn assert_consistent(&self) {
        let (mut items, mut bytes) = (0, 0);
        for shard in self.shards.iter() {
            let shard = shard.lock();
            shard.assert_consistent();
            items += shard.len();
            bytes += shard.bytes();
        }
        assert_eq!(items, self.len(), "store item total drifted");
        assert_eq!(bytes, self.bytes(), "store byte total drifted");
    }

    /// Entries in the expiry indexes of all shards (tests: exactly one per
    /// item).
    #[cfg(test)]
    fn expiry_entries(&self) -> usize {
        self.shards.iter().map(|s| s.lock().expiry_entries()).sum()
    }

    /// The shard a key lives in (diagnostics and tests).
    pub fn shard_of(&self, key: &str) -> usize {
        self.locate(key).0
    }

    fn locate(&self, key: &str) -> (usize, u64) {
        let hash = self.hasher.hash_one(key.as_bytes());
        // Shard by bits 32.. of the hash: hashbrown uses the low bits for the
        // bucket and the top 7 for its tags, so these leave both well spread.
        ((hash >> 32) as usize & self.shard_mask, hash)
    }

    fn over_capacity(&self) -> bool {
        self.len() > self.max_items || (self.max_bytes > 0 && self.bytes() > self.max_bytes)
    }

    /// Applies a shard's change in size to the store-wide totals. Touches
    /// them only on a change, so a hit writes no shared cache line.
    fn account(&self, before: (usize, u64), after: (usize, u64)) {
        let Totals { items, bytes } = &*self.totals;
        if after.0 > before.0 {
            items.fetch_add(after.0 - before.0, Ordering::Relaxed);
        } else if after.0 < before.0 {
            items.fetch_sub(before.0 - after.0, Ordering::Relaxed);
        }
        if after.1 > before.1 {
            bytes.fetch_add(after.1 - before.1, Ordering::Relaxed);
        } else if after.1 < before.1 {
            bytes.fetch_sub(before.1 - after.1, Ordering::Relaxed);
        }
    }

    /// Evicts from shards other than `skip` (whose only item is the one just
    /// written) until both caps hold, always the least recently used of the
    /// other shards' LRU tails. Rare: only a write needing more evictions than
    /// its own shard could give gets here. Looks at each other shard's tail
    /// once, then keeps the tails in a heap: O(shards + evictions x log
    /// shards), one shard lock at a time, never nested, never scanning items.
    fn evict_from_other_shards(&self, skip: usize) {
        let mut tails: BinaryHeap<Reverse<(UnixNanos, usize)>> = (0..self.shards.len())
            .filter(|&i| i != skip)
            .filter_map(|i| Some(Reverse((self.shards[i].lock().lru_tail_accessed_at()?, i))))
            .collect();
        while self.over_capacity() {
            let Some(Reverse((seen, idx))) = tails.pop() else {
                return;
            };
            let mut shard = self.shards[idx].lock();
            let Some(tail) = shard.lru_tail_accessed_at() else {
                continue;
            };
            // Read or rewritten since we looked: its new tail may no longer be
            // the oldest.
            if tail > seen && tails.peek().is_some_and(|Reverse((next, _))| tail > *next) {
                tails.push(Reverse((tail, idx)));
                continue;
            }
            let before = (shard.len(), shard.bytes());
            shard.evict_lru(None);
            self.account(before, (shard.len(), shard.bytes()));
            if let Some(next) = shard.lru_tail_accessed_at() {
                tails.push(Reverse((next, idx)));
            }
        }
    }
}

/// A power of two a few times the core count and at least 64 (more shards
/// mean fewer lock collisions and smaller tables to grow under a lock), but no
/// more than leaves ~128 items per shard at capacity, so that evicting from the
/// writer's shard stays close to global LRU order.
fn default_shard_count(max_items: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let for_cores = (cores * 4).next_power_of_two().max(64);
    let for_capacity = (max_items / 128).max(1).next_power_of_two();
    for_cores.min(for_capacity).max(shards_for_index(max_items))
}

/// The fewest shards that leave a shard no more than 4 million items on
/// average at capacity, a quarter of what its index can address (see
/// `index`), whatever the shard count asked for.
fn shards_for_index(max_items: usize) -> usize {
    (max_items >> 22).max(1).next_power_of_two()
}

#[cfg(test)]
mod tests;
