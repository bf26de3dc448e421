//! Property test: random operations against the store and against a plain
//! model (a Vec in recency order), compared after every step.
//!
//! One shard makes the store's LRU exact, so the model can predict every
//! eviction. Time is a manual clock so expiry is exact too.

use std::sync::Arc;
use std::time::Duration;

use cache_node::store::{ManualClock, Store, StoreConfig};
use proptest::prelude::*;

const KEYS: &[&str] = &["a", "b", "c", "d", "e", "f", "g", "h"];
const TAGS: &[&str] = &["red", "green", "blue"];
const CAP: usize = 5;

#[derive(Debug, Clone)]
enum Op {
    Set {
        key: usize,
        value: u8,
        ttl: u64,
        tags: Vec<usize>,
    },
    Get(usize),
    Delete(usize),
    Invalidate(usize),
    Advance(u64),
    Sweep,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..KEYS.len(), any::<u8>(), 1..20u64, prop::collection::vec(0..TAGS.len(), 0..3))
            .prop_map(|(key, value, ttl, tags)| Op::Set { key, value, ttl, tags }),
        3 => (0..KEYS.len()).prop_map(Op::Get),
        1 => (0..KEYS.len()).prop_map(Op::Delete),
        1 => (0..TAGS.len()).prop_map(Op::Invalidate),
        1 => (1..10u64).prop_map(Op::Advance),
        1 => Just(Op::Sweep),
    ]
}

#[derive(Debug, Clone)]
struct ModelItem {
    key: &'static str,
    value: Vec<u8>,
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
        let mut model = Model { now: clock_secs(&clock), ..Model::default() };

        for op in ops {
            match op {
                Op::Set { key, value, ttl, tags } => {
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
                    if let Some(p) = model.position(key) { model.items.remove(p); }
                    model.items.insert(0, ModelItem {
                        key, value: vec![value], expires_at: model.now + ttl, tags: tag_names, access_count: 0,
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
                    model.now += secs;
                }
                Op::Sweep => {
                    let now = model.now;
                    let expected = model.items.iter().filter(|i| i.expires_at <= now).count();
                    prop_assert_eq!(store.sweep_expired(), expected);
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

fn clock_secs(clock: &ManualClock) -> u64 {
    use cache_node::store::Clock;
    clock.now() / 1_000_000_000
}
