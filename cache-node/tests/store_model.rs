//! Property tests: random operations against the store and against a plain
//! model (a Vec in recency order), compared after every step.
//!
//! The first runs on one shard, which makes the store's LRU exact, so the
//! model predicts every eviction. The second runs on several shards with a
//! byte cap as well, where LRU is exact within a shard only: the model learns
//! which items were evicted from the store, and checks everything that is
//! still exact (both caps, byte accounting, values and metadata, per-shard
//! order, that evictions take shard tails, the writer's shard first, then the
//! oldest of the others, and no more than needed). Time is a manual clock so
//! expiry is exact too.

use std::sync::Arc;
use std::time::Duration;

use cache_node::store::{ManualClock, Store, StoreConfig, StoreError, item_cost};
use proptest::prelude::*;

const KEYS: &[&str] = &["a", "b", "c", "d", "e", "f", "g", "h"];
const TAGS: &[&str] = &["red", "green", "blue"];
const CAP: usize = 5;

#[derive(Debug, Clone)]
enum Op {
    Set {
        key: usize,
        value: u8,
        /// How many times `value` is repeated.
        len: usize,
        ttl: u64,
        tags: Vec<usize>,
    },
    Get(usize),
    Delete(usize),
    Invalidate(usize),
    Advance(u64),
    Sweep,
    /// Rebuilds every shard, as the compactor rebuilds sparse ones.
    Compact,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..KEYS.len(), any::<u8>(), 1..20u64, prop::collection::vec(0..TAGS.len(), 0..3))
            .prop_map(|(key, value, ttl, tags)| Op::Set { key, value, len: 1, ttl, tags }),
        3 => (0..KEYS.len()).prop_map(Op::Get),
        1 => (0..KEYS.len()).prop_map(Op::Delete),
        1 => (0..TAGS.len()).prop_map(Op::Invalidate),
        1 => (1..10u64).prop_map(Op::Advance),
        1 => Just(Op::Sweep),
        1 => Just(Op::Compact),
    ]
}

#[derive(Debug, Clone)]
struct ModelItem {
    key: &'static str,
    value: Vec<u8>,
    created_at: u64,
    expires_at: u64,
    tags: Vec<&'static str>,
    access_count: u64,
}

/// Items in recency order, most recent first.
#[derive(Default)]
struct Model {
    items: Vec<ModelItem>,
    now: u64,
    evictions: u64,
}

impl Model {
    fn position(&self, key: &str) -> Option<usize> {
        self.items.iter().position(|i| i.key == key)
    }

    fn live(&self, key: &str) -> Option<usize> {
        self.position(key)
            .filter(|&p| self.items[p].expires_at > self.now)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn store_behaves_like_the_model(ops in prop::collection::vec(op(), 1..200)) {
        let clock = ManualClock::new(1_000_000_000_000);
        let store = Store::new(
            StoreConfig { max_items: CAP, max_bytes: 0, default_ttl: Duration::from_secs(60), shards: 1 },
            Arc::new(clock.clone()),
        );
        let mut model = Model { now: clock_now(&clock), ..Model::default() };

        for op in ops {
            match op {
                Op::Set { key, value, len: _, ttl, tags } => {
                    let key = KEYS[key];
                    let mut tag_names: Vec<&'static str> = Vec::new();
                    for t in tags {
                        if !tag_names.contains(&TAGS[t]) { tag_names.push(TAGS[t]); }
                    }
                    let owned: Vec<String> = tag_names.iter().map(|t| t.to_string()).collect();
                    let (created, _) = store
                        .set(key, &[value], &owned, Some(Duration::from_secs(ttl)), |_| ())
                        .unwrap();
                    prop_assert_eq!(created, model.live(key).is_none());
                    let held = model.live(key).map(|p| model.items[p].created_at);
                    let (created_at, expires_at) = versioned(held, model.now, ttl * NANOS);
                    if let Some(p) = model.position(key) { model.items.remove(p); }
                    model.items.insert(0, ModelItem {
                        key, value: vec![value], created_at, expires_at, tags: tag_names, access_count: 0,
                    });
                    while model.items.len() > CAP {
                        model.items.pop();
                        model.evictions += 1;
                    }
                }
                Op::Get(k) => {
                    let key = KEYS[k];
                    let got = store.get(key, |i| (i.value().to_vec(), i.access_count()));
                    match model.live(key) {
                        Some(p) => {
                            let mut item = model.items.remove(p);
                            item.access_count += 1;
                            prop_assert_eq!(got, Some((item.value.clone(), item.access_count)));
                            model.items.insert(0, item);
                        }
                        None => {
                            prop_assert_eq!(got, None);
                            if let Some(p) = model.position(key) { model.items.remove(p); }
                        }
                    }
                }
                Op::Delete(k) => {
                    let key = KEYS[k];
                    prop_assert_eq!(store.delete(key), model.live(key).is_some());
                    if let Some(p) = model.position(key) { model.items.remove(p); }
                }
                Op::Invalidate(t) => {
                    let tag = TAGS[t];
                    let now = model.now;
                    let expected = model.items.iter().filter(|i| i.tags.contains(&tag) && i.expires_at > now).count();
                    prop_assert_eq!(store.invalidate_tag(tag), expected);
                    model.items.retain(|i| !i.tags.contains(&tag));
                }
                Op::Advance(secs) => {
                    clock.advance(Duration::from_secs(secs));
                    model.now += secs * NANOS;
                }
                Op::Sweep => {
                    let now = model.now;
                    let expected = model.items.iter().filter(|i| i.expires_at <= now).count();
                    prop_assert_eq!(store.sweep_expired(), expected);
                    model.items.retain(|i| i.expires_at > now);
                }
                Op::Compact => {
                    // Every item kept, in its order; the expired ones go.
                    prop_assert_eq!(store.compact_all(), 1);
                    let now = model.now;
                    model.items.retain(|i| i.expires_at > now);
                }
            }

            store.assert_consistent();
            let order: Vec<String> = model.items.iter().map(|i| i.key.to_string()).collect();
            prop_assert_eq!(&store.keys_by_recency()[0], &order);
            prop_assert_eq!(store.stats().counters.evictions, model.evictions);
            for tag in TAGS {
                let expected = model.items.iter().filter(|i| i.tags.contains(tag)).count();
                prop_assert_eq!(store.tag_count(tag), expected, "tag {}", tag);
            }
        }
    }
}

// Room for ~16 small items, so that a large value needs more evictions than
// its own shard and one item of each other shard can give; values from empty
// to too large for the whole budget.
const SHARDED_KEYS: usize = 24;
const SHARDED_CAP: usize = 16;
const SHARDED_MAX_BYTES: u64 = 1600;
const SHARDS: usize = 4;

fn sharded_op() -> impl Strategy<Value = Op> {
    let len = prop_oneof![12 => 0..40usize, 1 => 600..1600usize];
    prop_oneof![
        5 => (0..SHARDED_KEYS, any::<u8>(), len, 1..20u64, prop::collection::vec(0..TAGS.len(), 0..4))
            .prop_map(|(key, value, len, ttl, tags)| Op::Set { key, value, len, ttl, tags }),
        3 => (0..SHARDED_KEYS).prop_map(Op::Get),
        1 => (0..SHARDED_KEYS).prop_map(Op::Delete),
        1 => (0..TAGS.len()).prop_map(Op::Invalidate),
        1 => (1..10u64).prop_map(Op::Advance),
        1 => Just(Op::Sweep),
        1 => Just(Op::Compact),
    ]
}

fn key_name(k: usize) -> String {
    format!("key-{k}")
}

#[derive(Debug, Clone)]
struct HeldItem {
    key: String,
    value: Vec<u8>,
    created_at: u64,
    expires_at: u64,
    accessed_at: u64,
    tags: Vec<&'static str>,
    access_count: u64,
}

impl HeldItem {
    fn cost(&self) -> u64 {
        item_cost(self.key.len(), self.value.len(), self.tags.iter().copied())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn sharded_store_with_both_caps_agrees_with_the_model(ops in prop::collection::vec(sharded_op(), 1..200)) {
        let clock = ManualClock::new(1_000_000_000_000);
        let store = Store::new(
            StoreConfig {
                max_items: SHARDED_CAP,
                max_bytes: SHARDED_MAX_BYTES,
                default_ttl: Duration::from_secs(60),
                shards: SHARDS,
            },
            Arc::new(clock.clone()),
        );
        prop_assert_eq!(store.shard_count(), SHARDS);
        // Exactly what the store holds (expired items not yet removed
        // included), most recent first.
        let mut held: Vec<HeldItem> = Vec::new();
        let mut now = clock_now(&clock);
        let mut evictions = 0;
        let live = |held: &[HeldItem], key: &str, now: u64| held.iter().position(|i| i.key == key && i.expires_at > now);
        let position = |held: &[HeldItem], key: &str| held.iter().position(|i| i.key == key);

        for op in ops {
            match op {
                Op::Set { key, value, len, ttl, tags } => {
                    let key = key_name(key);
                    let mut tag_names: Vec<&'static str> = Vec::new();
                    for t in tags {
                        if !tag_names.contains(&TAGS[t]) { tag_names.push(TAGS[t]); }
                    }
                    let owned: Vec<String> = tag_names.iter().map(|t| t.to_string()).collect();
                    let (created_at, expires_at) =
                        versioned(live(&held, &key, now).map(|p| held[p].created_at), now, ttl * NANOS);
                    let item = HeldItem {
                        key: key.clone(), value: vec![value; len], created_at, expires_at,
                        accessed_at: now, tags: tag_names, access_count: 0,
                    };
                    let result = store.set(&key, &item.value, &owned, Some(Duration::from_secs(ttl)), |i| {
                        ((i.value().to_vec(), i.tags().map(str::to_owned).collect::<Vec<_>>()), (i.created_at(), i.ttl_nanos()))
                    });
                    if item.cost() > SHARDED_MAX_BYTES {
                        prop_assert!(matches!(result, Err(StoreError::TooLarge { .. })), "{:?}", result);
                    } else {
                        let (created, ((stored, stored_tags), (version, stored_ttl))) = result.unwrap();
                        prop_assert_eq!(created, live(&held, &key, now).is_none());
                        prop_assert_eq!(version, item.created_at);
                        prop_assert_eq!(stored_ttl, ttl * NANOS, "the ttl is exact whatever the version");
                        prop_assert_eq!(&stored, &item.value);
                        prop_assert_eq!(stored_tags, owned);
                        let before = held.clone();
                        if let Some(p) = position(&held, &key) { held.remove(p); }
                        held.insert(0, item);
                        // Learn the evictions from the store, then check they
                        // are ones the policy allows.
                        let now_held: Vec<String> = store.keys_by_recency().concat();
                        let evicted: Vec<HeldItem> = held.iter().filter(|i| !now_held.contains(&i.key)).cloned().collect();
                        prop_assert!(evicted.iter().all(|i| i.key != key), "the write survives its own insertion");
                        held.retain(|i| now_held.contains(&i.key));
                        evictions += evicted.len() as u64;
                        let own = store.shard_of(&key);
                        for shard in 0..SHARDS {
                            // Within a shard, the least recent went.
                            let was: Vec<&HeldItem> = before.iter().filter(|i| i.key != key && store.shard_of(&i.key) == shard).collect();
                            let gone = was.iter().filter(|i| evicted.iter().any(|e| e.key == i.key)).count();
                            prop_assert!(was[was.len() - gone..].iter().all(|i| evicted.iter().any(|e| e.key == i.key)),
                                "shard {} lost items that are not its tail", shard);
                        }
                        let from_others: Vec<&HeldItem> = evicted.iter().filter(|i| store.shard_of(&i.key) != own).collect();
                        if !from_others.is_empty() {
                            prop_assert!(held.iter().all(|i| i.key == key || store.shard_of(&i.key) != own),
                                "the writer's shard gives first");
                            let newest_gone = from_others.iter().map(|i| i.accessed_at).max().unwrap();
                            prop_assert!(held.iter().filter(|i| store.shard_of(&i.key) != own).all(|i| i.accessed_at >= newest_gone),
                                "other shards give their oldest first");
                        }
                        if let Some(largest) = evicted.iter().map(HeldItem::cost).max() {
                            let bytes: u64 = held.iter().map(HeldItem::cost).sum();
                            prop_assert!(held.len() + 1 > SHARDED_CAP || bytes + largest > SHARDED_MAX_BYTES,
                                "evicted more than needed");
                        }
                    }
                }
                Op::Get(k) => {
                    let key = key_name(k);
                    let got = store.get(&key, |i| (i.value().to_vec(), i.access_count(), i.accessed_at()));
                    match live(&held, &key, now) {
                        Some(p) => {
                            let mut item = held.remove(p);
                            item.access_count += 1;
                            item.accessed_at = now;
                            prop_assert_eq!(got, Some((item.value.clone(), item.access_count, now)));
                            held.insert(0, item);
                        }
                        None => {
                            prop_assert_eq!(got, None);
                            if let Some(p) = position(&held, &key) { held.remove(p); }
                        }
                    }
                }
                Op::Delete(k) => {
                    let key = key_name(k);
                    prop_assert_eq!(store.delete(&key), live(&held, &key, now).is_some());
                    if let Some(p) = position(&held, &key) { held.remove(p); }
                }
                Op::Invalidate(t) => {
                    let tag = TAGS[t];
                    let expected = held.iter().filter(|i| i.tags.contains(&tag) && i.expires_at > now).count();
                    prop_assert_eq!(store.invalidate_tag(tag), expected);
                    held.retain(|i| !i.tags.contains(&tag));
                }
                Op::Advance(secs) => {
                    clock.advance(Duration::from_secs(secs));
                    now += secs * NANOS;
                }
                Op::Compact => {
                    prop_assert_eq!(store.compact_all(), SHARDS);
                    held.retain(|i| i.expires_at > now);
                }
                Op::Sweep => {
                    let expected = held.iter().filter(|i| i.expires_at <= now).count();
                    prop_assert_eq!(store.sweep_expired(), expected);
                    held.retain(|i| i.expires_at > now);
                }
            }

            store.assert_consistent();
            prop_assert!(store.len() <= SHARDED_CAP, "item cap exceeded: {}", store.len());
            prop_assert!(store.bytes() <= SHARDED_MAX_BYTES, "byte cap exceeded: {}", store.bytes());
            prop_assert_eq!(store.len(), held.len());
            prop_assert_eq!(store.bytes(), held.iter().map(HeldItem::cost).sum::<u64>());
            prop_assert_eq!(store.stats().counters.evictions, evictions);
            let by_shard = store.keys_by_recency();
            for (shard, keys) in by_shard.iter().enumerate() {
                let expected: Vec<&String> = held.iter().map(|i| &i.key).filter(|k| store.shard_of(k) == shard).collect();
                prop_assert_eq!(keys.iter().collect::<Vec<_>>(), expected, "order of shard {}", shard);
            }
            for item in &held {
                let seen = store.peek(&item.key, |i| (i.value().to_vec(), i.access_count(), i.tags().map(str::to_owned).collect::<Vec<_>>()));
                if item.expires_at > now {
                    let tags: Vec<String> = item.tags.iter().map(|t| t.to_string()).collect();
                    prop_assert_eq!(seen, Some((item.value.clone(), item.access_count, tags)));
                } else {
                    prop_assert_eq!(seen, None);
                }
            }
            for tag in TAGS {
                let expected = held.iter().filter(|i| i.tags.contains(tag)).count();
                prop_assert_eq!(store.tag_count(tag), expected, "tag {}", tag);
            }
        }
    }
}

const NANOS: u64 = 1_000_000_000;

fn clock_now(clock: &ManualClock) -> u64 {
    use cache_node::store::Clock;
    clock.now()
}

/// The version (creation time) and expiry the store gives a client's write
/// at `now`: a key's versions grow with each write, so a write in the same
/// tick as the live version it replaces (the manual clock often stands
/// still) is shifted just past it, its ttl kept whole.
fn versioned(held_created: Option<u64>, now: u64, ttl: u64) -> (u64, u64) {
    let shift = held_created
        .filter(|&h| h >= now)
        .map_or(0, |h| h + 1 - now);
    (now + shift, now + ttl + shift)
}
