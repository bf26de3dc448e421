//! Unit tests of the store: LRU order, both capacity caps, TTL on a manual
//! clock, the tag index and byte accounting. Every test ends by checking the
//! store's internal invariants.

use std::sync::Arc;
use std::time::Duration;

use super::*;

const T0: UnixNanos = 1_700_000_000_000_000_000;

fn store(max_items: usize, max_bytes: u64, shards: usize) -> (Store, ManualClock) {
    let clock = ManualClock::new(T0);
    let config = StoreConfig {
        max_items,
        max_bytes,
        default_ttl: Duration::from_secs(300),
        shards,
    };
    (Store::new(config, Arc::new(clock.clone())), clock)
}

fn set(store: &Store, key: &str, value: &str, tags: &[&str], ttl_secs: u64) -> bool {
    let tags: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
    store
        .set(
            key,
            value.as_bytes(),
            &tags,
            Some(Duration::from_secs(ttl_secs)),
            |_| (),
        )
        .expect("set succeeds")
        .0
}

fn get(store: &Store, key: &str) -> Option<String> {
    store.get(key, |item| {
        String::from_utf8(item.value().to_vec()).unwrap()
    })
}

#[test]
fn set_get_delete_round_trip_with_metadata() {
    let (store, clock) = store(10, 0, 1);
    assert!(set(
        &store,
        "user:1",
        r#"{"name":"ann"}"#,
        &["user", "session"],
        60
    ));
    clock.advance(Duration::from_secs(5));
    let (value, tags, ttl, created, accessed, count) = store
        .get("user:1", |i| {
            (
                i.value().to_vec(),
                i.tags().map(str::to_owned).collect::<Vec<_>>(),
                i.ttl_nanos(),
                i.created_at(),
                i.accessed_at(),
                i.access_count(),
            )
        })
        .unwrap();
    assert_eq!(value, br#"{"name":"ann"}"#);
    let mut tags = tags;
    tags.sort();
    assert_eq!(tags, ["session", "user"]);
    assert_eq!(ttl, 60_000_000_000);
    assert_eq!(created, T0);
    assert_eq!(accessed, T0 + 5_000_000_000);
    assert_eq!(count, 1);
    assert_eq!(
        store.peek("user:1", |i| i.access_count()),
        Some(1),
        "peek does not count"
    );

    assert!(
        !set(&store, "user:1", "2", NO_TAGS, 60),
        "second write replaces"
    );
    assert_eq!(
        store.get("user:1", |i| i.access_count()),
        Some(1),
        "replace resets metadata"
    );
    assert!(store.delete("user:1"));
    assert!(!store.delete("user:1"));
    assert_eq!(get(&store, "user:1"), None);

    let c = store.stats().counters;
    assert_eq!((c.sets, c.hits, c.misses, c.deletes), (2, 2, 1, 1));
    store.assert_consistent();
}

#[test]
fn lru_order_and_eviction_count_by_item_cap() {
    let (store, _clock) = store(3, 0, 1);
    for k in ["a", "b", "c"] {
        set(&store, k, "1", NO_TAGS, 60);
    }
    assert_eq!(store.keys_by_recency()[0], ["c", "b", "a"]);
    // Reading "a" makes it most recent, so "b" is now the eviction victim.
    assert!(get(&store, "a").is_some());
    assert_eq!(store.keys_by_recency()[0], ["a", "c", "b"]);
    set(&store, "d", "1", NO_TAGS, 60);
    assert_eq!(store.keys_by_recency()[0], ["d", "a", "c"]);
    set(&store, "e", "1", NO_TAGS, 60);
    assert_eq!(store.keys_by_recency()[0], ["e", "d", "a"]);
    assert_eq!(store.len(), 3);
    assert_eq!(store.stats().counters.evictions, 2);
    // Overwriting a present key evicts nothing and refreshes its position.
    set(&store, "a", "2", NO_TAGS, 60);
    assert_eq!(store.keys_by_recency()[0], ["a", "e", "d"]);
    assert_eq!(store.stats().counters.evictions, 2);
    store.assert_consistent();
}

#[test]
fn item_cap_is_store_wide_across_shards() {
    let (store, _clock) = store(100, 0, 16);
    for i in 0..1000 {
        set(&store, &format!("key-{i}"), "v", NO_TAGS, 60);
        assert!(store.len() <= 100);
    }
    assert_eq!(store.len(), 100);
    assert_eq!(store.stats().counters.evictions, 900);
    // The most recent write always survives its own insertion.
    assert!(get(&store, "key-999").is_some());
    store.assert_consistent();
}

#[test]
fn eviction_across_shards_takes_the_oldest_tail() {
    // Many shards and few items: the writer's shard is usually empty, so the
    // victim comes from another shard, and must be the least recent overall.
    let (store, clock) = store(4, 0, 64);
    // Five keys in five different shards (the hash seed is random per store).
    let mut keys: Vec<String> = Vec::new();
    for candidate in (0..).map(|i| format!("k{i}")) {
        if keys
            .iter()
            .all(|k| store.shard_of(k) != store.shard_of(&candidate))
        {
            keys.push(candidate);
        }
        if keys.len() == 5 {
            break;
        }
    }
    for k in &keys[..4] {
        set(&store, k, "1", NO_TAGS, 60);
        clock.advance(Duration::from_millis(1));
    }
    assert!(get(&store, &keys[0]).is_some()); // keys[1] is now the least recent
    clock.advance(Duration::from_millis(1));
    set(&store, &keys[4], "1", NO_TAGS, 60);
    assert_eq!(store.len(), 4);
    assert_eq!(
        get(&store, &keys[1]),
        None,
        "the least recently used item went"
    );
    for k in [&keys[0], &keys[2], &keys[3], &keys[4]] {
        assert!(get(&store, k).is_some(), "{k} survived");
    }
    store.assert_consistent();
}

#[test]
fn byte_cap_evicts_least_recent_until_it_fits() {
    let per_item = item_cost(2, 100, []);
    let (store, _clock) = store(1000, 3 * per_item, 1);
    let value = "x".repeat(100);
    for k in ["k1", "k2", "k3"] {
        set(&store, k, &value, NO_TAGS, 60);
    }
    assert_eq!(store.bytes(), 3 * per_item);
    set(&store, "k4", &value, NO_TAGS, 60);
    assert_eq!(store.len(), 3);
    assert_eq!(get(&store, "k1"), None, "the least recent went");
    // A bigger item pushes out as many as it needs.
    let big = "y".repeat(250);
    set(&store, "k5", &big, NO_TAGS, 60);
    assert!(store.bytes() <= 3 * per_item);
    assert!(get(&store, "k5").is_some());
    store.assert_consistent();
}

#[test]
fn item_larger_than_the_whole_budget_is_refused_without_evicting() {
    let (store, _clock) = store(1000, 500, 1);
    set(&store, "small", "1", NO_TAGS, 60);
    let err = store
        .set("huge", &[b'x'; 1000], NO_TAGS, None, |_| ())
        .unwrap_err();
    assert!(matches!(err, StoreError::TooLarge { .. }));
    assert!(get(&store, "small").is_some());
    store.assert_consistent();
}

#[test]
fn ttl_expires_lazily_on_read() {
    let (store, clock) = store(10, 0, 1);
    set(&store, "short", "1", &["t"], 10);
    set(&store, "long", "1", &["t"], 100);
    clock.advance(Duration::from_secs(9));
    assert!(get(&store, "short").is_some());
    clock.advance(Duration::from_secs(1));
    assert_eq!(get(&store, "short"), None, "expired exactly at its ttl");
    assert!(get(&store, "long").is_some());
    assert_eq!(store.len(), 1, "the expired item was removed on access");
    assert_eq!(store.tag_count("t"), 1);
    assert_eq!(store.stats().counters.expirations, 1);
    store.assert_consistent();
}

#[test]
fn default_ttl_applies_when_ttl_is_absent_or_zero() {
    let (store, clock) = store(10, 0, 1);
    store.set("a", b"1", NO_TAGS, None, |_| ()).unwrap();
    store
        .set("b", b"1", NO_TAGS, Some(Duration::ZERO), |_| ())
        .unwrap();
    assert_eq!(store.peek("a", |i| i.ttl_nanos()), Some(300_000_000_000));
    clock.advance(Duration::from_secs(299));
    assert!(get(&store, "a").is_some() && get(&store, "b").is_some());
    clock.advance(Duration::from_secs(1));
    assert!(get(&store, "a").is_none() && get(&store, "b").is_none());
}

#[test]
fn sweeper_removes_only_expired_items() {
    let (store, clock) = store(10_000, 0, 8);
    for i in 0..1000 {
        let ttl = if i % 10 == 0 { 5 } else { 500 };
        set(&store, &format!("k{i}"), "v", &["all"], ttl);
    }
    // Rewrites move items in the expiry index; the old expiry must not expire
    // the new item.
    for i in (0..1000).step_by(10) {
        set(
            &store,
            &format!("k{i}"),
            "v",
            &["all"],
            if i % 20 == 0 { 5 } else { 500 },
        );
    }
    clock.advance(Duration::from_secs(6));
    assert_eq!(store.sweep_expired(), 50);
    assert_eq!(store.len(), 950);
    assert_eq!(store.tag_count("all"), 950);
    assert_eq!(store.sweep_expired(), 0, "a second sweep finds nothing");
    assert!(get(&store, "k10").is_some(), "rewritten with a long ttl");
    assert!(get(&store, "k20").is_none(), "rewritten with a short ttl");
    store.assert_consistent();
}

#[test]
fn tag_index_stays_exact_through_overwrite_delete_evict_and_expire() {
    let (store, clock) = store(3, 0, 1);
    set(&store, "a", "1", &["red", "blue"], 60);
    set(&store, "b", "1", &["red"], 10);
    set(&store, "c", "1", &["blue"], 60);
    assert_eq!((store.tag_count("red"), store.tag_count("blue")), (2, 2));

    set(&store, "a", "1", &["green"], 60); // overwrite drops old tags
    assert_eq!((store.tag_count("red"), store.tag_count("blue")), (1, 1));
    assert_eq!(store.tag_count("green"), 1);
    store.assert_consistent();

    assert!(store.delete("c")); // delete
    assert_eq!(store.tag_count("blue"), 0);

    clock.advance(Duration::from_secs(11)); // expire "b"
    assert_eq!(store.sweep_expired(), 1);
    assert_eq!(store.tag_count("red"), 0);

    set(&store, "d", "1", &["green"], 60);
    set(&store, "e", "1", &["green"], 60);
    set(&store, "f", "1", NO_TAGS, 60); // evicts "a"
    assert_eq!(get(&store, "a"), None);
    assert_eq!(store.tag_count("green"), 2);
    store.assert_consistent();

    assert_eq!(store.invalidate_tag("green"), 2);
    assert_eq!(store.invalidate_tag("green"), 0);
    assert_eq!(store.len(), 1);
    assert!(get(&store, "f").is_some());
    store.assert_consistent();
}

#[test]
fn invalidation_counts_only_live_items_and_keeps_other_tags_exact() {
    let (store, clock) = store(100, 0, 4);
    set(&store, "x", "1", &["a", "b"], 5);
    set(&store, "y", "1", &["a", "b"], 60);
    set(&store, "z", "1", &["b"], 60);
    clock.advance(Duration::from_secs(6));
    assert_eq!(
        store.invalidate_tag("a"),
        1,
        "the expired item is not reported"
    );
    assert_eq!(store.tag_count("b"), 1);
    assert_eq!(store.len(), 1);
    store.assert_consistent();
}

#[test]
fn a_rewrite_with_the_same_tags_keeps_the_tag_index_exact() {
    let (store, _clock) = store(10, 0, 1);
    set(&store, "a", "1", &["x", "y"], 60);
    set(&store, "b", "1", &["y"], 60);
    let tags = |key| {
        store
            .peek(key, |i| i.tags().map(str::to_owned).collect::<Vec<_>>())
            .unwrap()
    };
    // The same tags (the slot stays in their member sets), then the same
    // tags reordered, repeated, and a subset (each leaves and rejoins).
    for list in [
        &["x", "y"][..],
        &["x", "y"],
        &["y", "x"],
        &["y", "y", "x"],
        &["x"],
        &["x"],
    ] {
        set(&store, "a", "2", list, 60);
        let mut want: Vec<&str> = Vec::new();
        for t in list {
            if !want.contains(t) {
                want.push(t);
            }
        }
        assert_eq!(tags("a"), want);
        store.assert_consistent();
    }
    assert_eq!((store.tag_count("x"), store.tag_count("y")), (1, 1));
    assert_eq!(store.invalidate_tag("x"), 1);
    assert_eq!(store.invalidate_tag("y"), 1, "b alone carries y");
    assert_eq!(store.len(), 0);
    store.assert_consistent();
}

#[test]
fn duplicate_tags_are_stored_once() {
    let (store, _clock) = store(10, 0, 1);
    set(&store, "k", "1", &["t", "t", "u"], 60);
    assert_eq!(store.peek("k", |i| i.tags().count()), Some(2));
    assert!(store.delete("k"));
    store.assert_consistent();
}

#[test]
fn byte_accounting_returns_to_zero_when_emptied() {
    let (store, clock) = store(50, 0, 4);
    for i in 0..200 {
        let tags = if i % 2 == 0 {
            vec!["even", "all"]
        } else {
            vec!["all"]
        };
        set(
            &store,
            &format!("k{i}"),
            &"v".repeat(i),
            &tags,
            1 + (i as u64 % 3),
        );
    }
    assert!(store.bytes() > 0);
    store.invalidate_tag("even");
    for i in (1..200).step_by(4) {
        store.delete(&format!("k{i}"));
    }
    clock.advance(Duration::from_secs(10));
    store.sweep_expired();
    assert_eq!(store.len(), 0);
    assert_eq!(store.bytes(), 0);
    assert_eq!(store.stats().bytes, 0);
    store.assert_consistent();
}

#[test]
fn rewriting_an_expired_item_counts_its_expiration() {
    let (store, clock) = store(10, 0, 1);
    set(&store, "k", "1", NO_TAGS, 1);
    clock.advance(Duration::from_secs(2));
    assert!(
        set(&store, "k", "2", NO_TAGS, 60),
        "created, since the old item had expired"
    );
    let c = store.stats().counters;
    assert_eq!((c.sets, c.expirations, store.len()), (2, 1, 1));
    store.assert_consistent();
}

#[test]
fn expired_key_rewritten_counts_as_created() {
    let (store, clock) = store(10, 0, 1);
    assert!(set(&store, "k", "1", NO_TAGS, 1));
    clock.advance(Duration::from_secs(2));
    assert!(
        set(&store, "k", "2", NO_TAGS, 1),
        "an expired key is absent to clients"
    );
    store.assert_consistent();
}

#[test]
fn huge_ttl_is_refused_not_overflowed() {
    let (store, _clock) = store(10, 0, 1);
    let err = store
        .set(
            "k",
            b"1",
            NO_TAGS,
            Some(Duration::from_secs(u64::MAX / 2)),
            |_| (),
        )
        .unwrap_err();
    assert_eq!(err, StoreError::TtlTooLarge);
}

#[test]
fn shard_count_rounds_up_to_a_power_of_two() {
    assert_eq!(store(10, 0, 3).0.shard_count(), 4);
    assert!(store(1_000_000, 0, 0).0.shard_count().is_power_of_two());
    assert!(store(1_000_000, 0, 0).0.shard_count() >= 64);
    assert_eq!(
        store(3, 0, 0).0.shard_count(),
        1,
        "a tiny cache gets exact LRU"
    );
    assert_eq!(store(1000, 0, 0).0.shard_count(), 8, "~128 items per shard");
}

fn meta(created_secs: u64, ttl_secs: u64, access_count: u64) -> ItemMeta {
    let created_at = T0 + created_secs * 1_000_000_000;
    ItemMeta {
        created_at,
        accessed_at: created_at,
        expires_at: created_at + ttl_secs * 1_000_000_000,
        access_count,
    }
}

#[test]
fn replicated_writes_keep_metadata_and_the_newest_version_wins() {
    let (store, clock) = store(10, 0, 4);
    let tags = vec!["t".to_string()];
    assert_eq!(
        store
            .put_replica("k", b"\"v2\"", &tags, meta(2, 60, 7))
            .unwrap(),
        Applied::Created
    );
    // An older version arriving late (a slow replication or a rebalance
    // batch read before the write) does not overwrite the newer one.
    assert_eq!(
        store
            .put_replica("k", b"\"v1\"", NO_TAGS, meta(1, 60, 0))
            .unwrap(),
        Applied::Stale
    );
    assert_eq!(
        store.peek("k", |i| (i.value().to_vec(), i.meta(), i.tags().count())),
        Some((b"\"v2\"".to_vec(), meta(2, 60, 7), 1))
    );
    assert_eq!(
        store
            .put_replica("k", b"\"v3\"", NO_TAGS, meta(3, 60, 0))
            .unwrap(),
        Applied::Replaced
    );
    assert_eq!(store.tag_count("t"), 0);
    // An item whose time has passed is not applied at all.
    clock.advance(Duration::from_secs(100));
    assert_eq!(
        store
            .put_replica("old", b"1", NO_TAGS, meta(1, 60, 0))
            .unwrap(),
        Applied::Stale
    );
    assert!(store.peek("old", |_| ()).is_none());
    let stats = store.stats();
    assert_eq!((stats.counters.sets, stats.counters.replica_writes), (0, 2));
    store.assert_consistent();
}

#[test]
fn client_writes_of_one_key_in_one_clock_tick_get_growing_versions() {
    // The coordinator and a replica: the replica must take the second of two
    // writes made within one tick (or after the clock stepped back), or the
    // two would disagree until the item expired.
    let (coordinator, clock) = store(10, 0, 1);
    let (replica, _) = store(10, 0, 1);
    let mut versions = Vec::new();
    for (value, step_back) in [("\"v1\"", false), ("\"v2\"", false), ("\"v3\"", true)] {
        if step_back {
            clock.set(T0 - 1_000_000_000);
        }
        let (_, written) = coordinator
            .set(
                "k",
                value.as_bytes(),
                NO_TAGS,
                Some(Duration::from_secs(60)),
                |i| i.meta(),
            )
            .unwrap();
        assert_eq!(
            written.expires_at - written.created_at,
            60_000_000_000,
            "the ttl stays exact"
        );
        assert_ne!(
            replica
                .put_replica("k", value.as_bytes(), NO_TAGS, written)
                .unwrap(),
            Applied::Stale,
            "{value} is newer than what the replica holds"
        );
        versions.push(written.created_at);
    }
    assert_eq!(versions, [T0, T0 + 1, T0 + 2]);
    assert_eq!(get(&replica, "k").as_deref(), Some("\"v3\""));
    // A key that is not held starts from the clock again.
    let (_, other) = coordinator
        .set("other", b"1", NO_TAGS, None, |i| i.created_at())
        .unwrap();
    assert_eq!(other, T0 - 1_000_000_000);
    coordinator.assert_consistent();
    replica.assert_consistent();
}

#[test]
fn replicated_deletes_spare_newer_writes() {
    let (store, _clock) = store(10, 0, 1);
    store
        .put_replica("k", b"1", NO_TAGS, meta(5, 60, 0))
        .unwrap();
    assert!(
        !store.delete_replica("k", T0 + 4_000_000_000),
        "delete older than the write"
    );
    assert!(store.peek("k", |_| ()).is_some());
    assert!(store.delete_replica("k", T0 + 5_000_000_000));
    assert!(
        !store.delete_replica("k", T0 + 6_000_000_000),
        "already gone"
    );
    assert_eq!(
        store.stats().counters.deletes,
        0,
        "replica deletes are not client deletes"
    );
    store.assert_consistent();
}

#[test]
fn scan_visits_every_live_item_once_in_batches() {
    for budget in [1, 7, 100, 10_000] {
        let (store, clock) = store(1000, 0, 8);
        for i in 0..300 {
            set(
                &store,
                &format!("k{i}"),
                "1",
                NO_TAGS,
                if i % 10 == 0 { 1 } else { 60 },
            );
        }
        for i in 0..300 {
            if i % 7 == 0 {
                store.delete(&format!("k{i}"));
            }
        }
        clock.advance(Duration::from_secs(2));
        let mut seen = Vec::new();
        let mut cursor = Some(0);
        let mut calls = 0;
        while let Some(at) = cursor {
            cursor = store.scan(at, budget, |item| seen.push(item.key().to_string()));
            calls += 1;
            assert!(calls < 10_000, "scan makes progress");
        }
        seen.sort();
        let mut expected: Vec<String> = (0..300)
            .filter(|i| i % 7 != 0 && i % 10 != 0)
            .map(|i| format!("k{i}"))
            .collect();
        expected.sort();
        assert_eq!(seen, expected, "budget {budget}");
    }
}

#[test]
fn retain_drops_exactly_the_rejected_keys() {
    let (store, _clock) = store(10_000, 0, 4);
    for i in 0..5000 {
        set(&store, &format!("k{i}"), "12345", &["all"], 60);
    }
    let removed = store.retain(|key| key[1..].parse::<u32>().unwrap() % 3 == 0);
    assert_eq!(removed, 5000 - 1667);
    assert_eq!(store.len(), 1667);
    assert_eq!(store.tag_count("all"), 1667);
    assert!(get(&store, "k3").is_some() && get(&store, "k4").is_none());
    store.assert_consistent();
}

#[test]
fn tag_invalidation_can_count_a_subset() {
    let (store, _clock) = store(100, 0, 4);
    for i in 0..10 {
        set(&store, &format!("k{i}"), "1", &["t"], 60);
    }
    let (removed, counted) = store.invalidate_tag_counting("t", |k| k.ends_with(['1', '2', '3']));
    assert_eq!((removed, counted), (10, 3));
    store.assert_consistent();
}

#[test]
fn tags_come_back_in_the_order_they_were_sent() {
    // One shard: both items share the shard's interned tag ids, so an order
    // by id would give one of them its tags reversed.
    let (store, _clock) = store(10, 0, 1);
    set(&store, "a", "1", &["x", "y", "z"], 60);
    set(&store, "b", "1", &["z", "x", "y"], 60);
    set(&store, "c", "1", &["y", "y", "x", "y"], 60);
    let tags = |key| {
        store
            .peek(key, |i| i.tags().map(str::to_owned).collect::<Vec<_>>())
            .unwrap()
    };
    assert_eq!(tags("a"), ["x", "y", "z"]);
    assert_eq!(tags("b"), ["z", "x", "y"]);
    assert_eq!(tags("c"), ["y", "x"], "duplicates dropped, first one kept");
    // An overwrite takes the new order.
    set(&store, "a", "1", &["z", "y"], 60);
    assert_eq!(tags("a"), ["z", "y"]);
    store.assert_consistent();
}

/// Keys that land in `shards` different shards, `per_shard` in each, in an
/// order that cycles through the shards.
fn keys_spread_over_shards(store: &Store, per_shard: usize) -> Vec<String> {
    let mut by_shard: Vec<Vec<String>> = vec![Vec::new(); store.shard_count()];
    for i in 0.. {
        let k = format!("k{i}");
        let s = store.shard_of(&k);
        if by_shard[s].len() < per_shard {
            by_shard[s].push(k);
        }
        if by_shard.iter().all(|v| v.len() == per_shard) {
            break;
        }
    }
    (0..per_shard)
        .flat_map(|j| by_shard.iter().map(move |v| v[j].clone()))
        .collect()
}

#[test]
fn a_large_write_evicts_across_shards_until_the_byte_cap_holds() {
    // 64 shards of 4 items of ~1 KB each; then a value worth ~150 of them,
    // more than its own shard and one item of every other shard can give.
    let small = "s".repeat(1000);
    let per_item = item_cost(5, small.len(), []);
    let max_bytes = 256 * per_item + 500;
    let (store, clock) = store(100_000, max_bytes, 64);
    let keys = keys_spread_over_shards(&store, 4);
    for k in &keys {
        set(&store, k, &small, NO_TAGS, 60);
        clock.advance(Duration::from_millis(1));
    }
    assert_eq!(store.len(), 256, "all fit before the big write");
    let big_key = (0..)
        .map(|i| format!("big{i}"))
        .find(|k| store.shard_of(k) == store.shard_of(&keys[0]))
        .unwrap();
    let big = "b".repeat(150 * 1000);
    store
        .set(
            &big_key,
            big.as_bytes(),
            NO_TAGS,
            Some(Duration::from_secs(60)),
            |_| (),
        )
        .unwrap();
    assert!(
        store.bytes() <= max_bytes,
        "byte cap exceeded: {} > {max_bytes}",
        store.bytes()
    );
    assert!(store.peek(&big_key, |_| ()).is_some(), "the write survives");
    // The big key's shard gave everything it had; the others gave their
    // oldest items, oldest first: what is left is the newest of the rest.
    let own = store.shard_of(&big_key);
    let others: Vec<&String> = keys.iter().filter(|k| store.shard_of(k) != own).collect();
    let survivors: Vec<&String> = others
        .iter()
        .copied()
        .filter(|k| store.peek(k, |_| ()).is_some())
        .collect();
    assert!(!survivors.is_empty());
    assert_eq!(survivors, others[others.len() - survivors.len()..]);
    // And no more went than needed: one more survivor would not have fitted.
    let evicted_last = others[others.len() - survivors.len() - 1];
    let cost = item_cost(evicted_last.len(), small.len(), []);
    assert!(store.bytes() + cost > max_bytes, "evicted more than needed");
    assert!(
        keys.iter()
            .filter(|k| store.shard_of(k) == own)
            .all(|k| store.peek(k, |_| ()).is_none())
    );
    store.assert_consistent();
}

#[test]
fn a_replica_record_expiring_before_its_creation_is_refused() {
    let (store, _clock) = store(10, 0, 1);
    let mut m = meta(50, 60, 0);
    m.expires_at = m.created_at - 1;
    assert!(
        m.expires_at > T0,
        "still in the future, so not merely expired"
    );
    assert_eq!(
        store.put_replica("k", b"1", NO_TAGS, m).unwrap(),
        Applied::Stale
    );
    assert!(store.peek("k", |_| ()).is_none());
    assert_eq!(store.stats().counters.replica_writes, 0);
    // A record whose expiry equals its creation is as empty; one with a
    // positive ttl is taken, and reports it.
    m.expires_at = m.created_at;
    assert_eq!(
        store.put_replica("k", b"1", NO_TAGS, m).unwrap(),
        Applied::Stale
    );
    assert!(store.peek("k", |_| ()).is_none());
    let ok = meta(0, 60, 0);
    assert_eq!(
        store.put_replica("k", b"1", NO_TAGS, ok).unwrap(),
        Applied::Created
    );
    assert_eq!(store.peek("k", |i| i.ttl_nanos()), Some(60_000_000_000));
    store.assert_consistent();
}

#[test]
fn the_expiry_index_holds_one_entry_per_item_whatever_the_rewrites() {
    let (store, clock) = store(100, 0, 1);
    for i in 0..5000u64 {
        set(&store, "k", "1", NO_TAGS, 1 + i % 97);
        clock.advance(Duration::from_millis(1));
        if i % 10 == 0 {
            set(
                &store,
                &format!("other{}", i % 50),
                "1",
                NO_TAGS,
                1 + i % 13,
            );
        }
        if i % 7 == 0 {
            store.delete(&format!("other{}", i % 50));
        }
    }
    assert_eq!(store.expiry_entries(), store.len());
    store.assert_consistent();
}

#[test]
fn item_overhead_is_what_the_structures_cost() {
    assert_eq!(
        size_of::<shard::Slot>(),
        16,
        "a slab entry is a thin pointer and two LRU links"
    );
    assert_eq!(expiry::PER_ITEM, 8, "inside the item's header");
    assert_eq!(item::HEADER_BYTES, 43);
    assert_eq!(ITEM_OVERHEAD, 16 + 43 + 6);
}

/// A tiny deterministic generator for the randomised tests.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn sweeping_removes_exactly_the_expired_items_at_any_time_scale() {
    // Expiries from nanoseconds to years, rewrites, deletes, reads and sweeps
    // at arbitrary moments, against a plain map of key -> expiry. Several
    // thousand items per shard, so sweeps run in more than one batch.
    let (store, clock) = store(1_000_000, 0, 2);
    let mut model: std::collections::HashMap<String, UnixNanos> = Default::default();
    let mut rng = Rng(0x2545F4914F6CDD1D);
    let mut now = T0;
    for round in 0..40 {
        for _ in 0..600 {
            let key = format!("k{}", rng.below(3000));
            match rng.below(10) {
                0..=6 => {
                    // ttl from 1 ns to ~3 years, biased towards short.
                    let scale = rng.below(56) as u32;
                    let ttl = 1 + rng.below(1u64 << scale.max(1));
                    store
                        .set(&key, b"v", NO_TAGS, Some(Duration::from_nanos(ttl)), |_| ())
                        .unwrap();
                    model.insert(key, now + ttl);
                }
                7 => {
                    let live = model.get(&key).is_some_and(|&e| e > now);
                    assert_eq!(store.delete(&key), live);
                    model.remove(&key);
                }
                _ => {
                    let live = model.get(&key).is_some_and(|&e| e > now);
                    assert_eq!(store.get(&key, |_| ()).is_some(), live);
                    if !live {
                        model.remove(&key);
                    }
                }
            }
            if rng.below(20) == 0 {
                let scale = rng.below(40);
                let by = 1 + rng.below(1u64 << scale);
                clock.advance(Duration::from_nanos(by));
                now += by;
            }
        }
        let expired = model.values().filter(|&&e| e <= now).count();
        assert_eq!(store.sweep_expired(), expired, "round {round}");
        model.retain(|_, &mut e| e > now);
        assert_eq!(store.len(), model.len());
        assert_eq!(store.expiry_entries(), store.len());
        store.assert_consistent();
        // A big jump now and then, past many levels at once.
        if round % 8 == 7 {
            let by = 1u64 << (30 + rng.below(20));
            clock.advance(Duration::from_nanos(by));
            now += by;
        }
    }
}

#[test]
fn rewrites_that_keep_their_size_and_bucket_stay_exact() {
    // The common rewrite: the same key again, a value of the same length or
    // not, the same tags or not, an expiry moved a little (it stays in its
    // wheel bucket and its allocation is reused) or a lot (it moves). Against
    // a model of key -> (value, expiry), with sweeps as time passes, so some
    // items have been moved down the wheel's levels before they are rewritten.
    let (store, clock) = store(1_000_000, 0, 2);
    let mut model: std::collections::HashMap<String, (String, UnixNanos)> = Default::default();
    let mut rng = Rng(0x9E3779B97F4A7C15);
    let mut now = T0;
    let tag_sets: [&[&str]; 4] = [NO_TAGS, &["a"], &["a", "b"], &["b", "a"]];
    let mut writes = 0u64;
    for round in 0..60 {
        for _ in 0..500 {
            let key = format!("k{}", rng.below(400));
            // Mostly around an hour, jittered by up to a minute; now and then
            // anything from a millisecond to a day.
            let ttl = if rng.below(8) == 0 {
                1_000_000 + rng.below(86_400_000_000_000)
            } else {
                3_600_000_000_000 + rng.below(60_000_000_000)
            };
            let value = "v".repeat(1 + rng.below(3) as usize);
            let tags: Vec<String> = tag_sets[rng.below(4) as usize]
                .iter()
                .map(|t| t.to_string())
                .collect();
            store
                .set(
                    &key,
                    value.as_bytes(),
                    &tags,
                    Some(Duration::from_nanos(ttl)),
                    |_| (),
                )
                .unwrap();
            model.insert(key, (value, now + ttl));
            // Checked between sweeps too, not only after one (which would
            // quietly move an item left in the wrong bucket): the wheel's
            // check includes that each bucket covers its items' expiries.
            writes += 1;
            if writes.is_multiple_of(5) {
                store.assert_consistent();
            }
            if rng.below(50) == 0 {
                let scale = 20 + rng.below(24);
                let by = 1 + rng.below(1u64 << scale);
                clock.advance(Duration::from_nanos(by));
                now += by;
            }
        }
        let expired = model.values().filter(|&&(_, e)| e <= now).count();
        assert_eq!(store.sweep_expired(), expired, "round {round}");
        model.retain(|_, &mut (_, e)| e > now);
        for (key, (value, _)) in &model {
            assert_eq!(get(&store, key).as_ref(), Some(value), "round {round}");
        }
        assert_eq!(store.len(), model.len());
        assert_eq!(store.expiry_entries(), store.len());
        store.assert_consistent();
        // Every few rounds, most of an hour passes.
        if round % 10 == 9 {
            let by = 3_000_000_000_000 + rng.below(1_000_000_000_000);
            clock.advance(Duration::from_nanos(by));
            now += by;
        }
    }
}

#[test]
fn a_large_backlog_is_swept_in_batches() {
    // More due items in one shard than one batch; all go, none of the rest.
    let (store, clock) = store(100_000, 0, 1);
    for i in 0..5000 {
        set(&store, &format!("short{i}"), "1", NO_TAGS, 1 + (i % 3));
        set(&store, &format!("long{i}"), "1", NO_TAGS, 3600 + i);
    }
    clock.advance(Duration::from_secs(10));
    assert_eq!(store.sweep_expired(), 5000);
    assert_eq!(store.len(), 5000);
    clock.advance(Duration::from_secs(3600 + 2500 - 10)); // now T0 + 3600 + 2500 s
    assert_eq!(store.sweep_expired(), 2501);
    store.assert_consistent();
}

#[test]
fn a_clock_that_goes_back_never_expires_an_item_early() {
    let (store, clock) = store(100, 0, 1);
    set(&store, "keep", "1", NO_TAGS, 3600); // so the wheel is never empty
    set(&store, "a", "1", NO_TAGS, 10);
    clock.advance(Duration::from_secs(20));
    assert_eq!(store.sweep_expired(), 1);
    clock.set(T0); // back by 20 s
    set(&store, "b", "1", NO_TAGS, 5); // expires before the wheel's time
    clock.advance(Duration::from_secs(4));
    assert_eq!(store.sweep_expired(), 0, "b has a second to go");
    assert!(get(&store, "b").is_some());
    clock.advance(Duration::from_secs(30));
    assert_eq!(store.sweep_expired(), 1);
    store.assert_consistent();
}

#[test]
fn whole_store_walks_skip_the_slab_chunks_freed_by_deletions() {
    // One shard, four chunks of slots; deleting the first items written
    // empties and frees the first chunks, leaving holes in the slot ids
    // that every walk over the slab must step over.
    let (store, _clock) = store(100_000, 0, 1);
    for i in 0..4000 {
        set(&store, &format!("k{i}"), "v", &["t"], 300);
    }
    for i in 0..2500 {
        assert!(store.delete(&format!("k{i}")));
    }
    assert_eq!(store.retain_items(|item| item.key() != "k3000"), 1);
    assert_eq!(store.retain(|key| key != "k3001"), 1);
    assert_eq!(store.len(), 1498);
    assert_eq!(get(&store, "k3999").as_deref(), Some("v"));
    store.assert_consistent();
}

/// An item as a test compares it: value, tags, metadata.
type Held = (Vec<u8>, Vec<String>, ItemMeta);

/// Every key's full item, by key.
fn snapshot_of(store: &Store, keys: impl Iterator<Item = String>) -> Vec<(String, Option<Held>)> {
    keys.map(|k| {
        let item = store.peek(&k, |i| {
            (
                i.value().to_vec(),
                i.tags().map(str::to_owned).collect(),
                i.meta(),
            )
        });
        (k, item)
    })
    .collect()
}

#[test]
fn compacting_a_sparse_shard_keeps_every_item_its_order_and_counters() {
    let (store, clock) = store(1_000_000, 0, 2);
    let key = |i: u32| format!("k{i:06}");
    for i in 0..20_000 {
        let tags: &[&str] = match i % 3 {
            0 => &[],
            1 => &["red"],
            _ => &["red", "blue"],
        };
        // Every 50th lives a second only: expired by the time of compaction.
        let ttl = if i % 50 == 13 { 1 } else { 300 };
        set(&store, &key(i), &format!("v{i}"), tags, ttl);
    }
    // Reads change access counts and the LRU order.
    for i in (0..20_000).step_by(7) {
        get(&store, &key(i));
    }
    // Nine in ten deleted everywhere: every slab chunk keeps a few.
    for i in (0..20_000).filter(|i| i % 10 != 3) {
        store.delete(&key(i));
    }
    clock.advance(Duration::from_secs(2));
    let survivors: Vec<u32> = (0..20_000).filter(|i| i % 10 == 3).collect();
    let expired = survivors.iter().filter(|&&i| i % 50 == 13).count();
    assert!(expired > 0);
    let before = snapshot_of(&store, survivors.iter().map(|&i| key(i)));
    let order_before = store.keys_by_recency();
    let stats_before = store.stats();
    let slots_before = store.allocated_slots();

    assert_eq!(store.compact(), 2, "both shards are sparse");

    store.assert_consistent();
    assert_eq!(store.len(), survivors.len() - expired);
    // The same items with the same metadata; the expired ones went.
    let after = snapshot_of(&store, survivors.iter().map(|&i| key(i)));
    for ((k, was), (_, now)) in before.iter().zip(&after) {
        assert_eq!(was, now, "{k}");
    }
    // The same LRU order (less what expired), the same counters (plus the
    // expirations), fewer slots.
    let live = |keys: &Vec<String>| -> Vec<String> {
        keys.iter()
            .filter(|k| store.peek(k, |_| ()).is_some())
            .cloned()
            .collect()
    };
    let order_after = store.keys_by_recency();
    for (b, a) in order_before.iter().zip(&order_after) {
        assert_eq!(&live(b), a);
    }
    let mut expected = stats_before.counters;
    expected.expirations += expired as u64;
    assert_eq!(store.stats().counters, expected);
    assert_eq!(
        store.tag_count("red"),
        survivors
            .iter()
            .filter(|&&i| i % 3 != 0 && i % 50 != 13)
            .count()
    );
    assert!(
        store.allocated_slots() * 4 <= slots_before,
        "{} slots after, {slots_before} before",
        store.allocated_slots()
    );
    // Nothing left to compact; the store works on as before.
    assert_eq!(store.compact(), 0);
    set(&store, "new", "v", &["red"], 300);
    assert!(store.delete(&key(3)));
    store.assert_consistent();
}

#[test]
fn a_shard_rebuilt_midway_through_a_mass_delete_is_rebuilt_again_as_it_goes_on() {
    let (store, _clock) = store(1_000_000, 0, 2);
    // Enough items that the slab's 1,024-slot chunks do not blur the count:
    // 5,000 survivors a shard, give or take a hundred.
    let key = |i: u32| format!("k{i:06}");
    for i in 0..100_000 {
        set(&store, &key(i), "v", &[], 300);
    }
    // A release in the middle of the delete: eight in ten gone.
    for i in (0..100_000).filter(|i| i % 10 > 1) {
        store.delete(&key(i));
    }
    assert_eq!(store.compact(), 2);
    let midway = store.allocated_slots();
    // The delete goes on to nine in ten: each shard has lost half of what it
    // was rebuilt with, and is rebuilt again (its slab had kept room for
    // twice its survivors).
    for i in (0..100_000).filter(|i| i % 10 == 1) {
        store.delete(&key(i));
    }
    assert_eq!(store.compact(), 2, "both shards lost half since rebuilt");
    assert!(
        store.allocated_slots() * 3 <= midway * 2,
        "{} slots after, {midway} midway",
        store.allocated_slots()
    );
    assert_eq!(store.len(), 10_000);
    store.assert_consistent();
    // Less than a quarter more gone: not worth a rebuild.
    for i in (0..100_000).filter(|i| i % 50 == 0) {
        store.delete(&key(i));
    }
    assert_eq!(store.len(), 8_000);
    assert_eq!(store.compact(), 0, "a fifth gone since the rebuild");
    store.assert_consistent();
}

#[test]
fn a_scan_or_a_retain_across_a_compaction_misses_nothing() {
    let (store, _clock) = store(1_000_000, 0, 1);
    let key = |i: u32| format!("k{i:06}");
    for i in 0..20_000 {
        set(&store, &key(i), "v", &[], 300);
    }
    for i in (0..20_000).filter(|i| i % 10 != 0) {
        store.delete(&key(i));
    }
    // A scan gets halfway (its cursor deep in the slab), the shard is
    // rebuilt (every item to a lower slot), and the scan goes on.
    let mut seen = std::collections::HashSet::new();
    let mut cursor = store.scan(0, 10_000, |item| {
        seen.insert(item.key().to_owned());
    });
    assert!(cursor.is_some() && !seen.is_empty() && seen.len() < 2000);
    assert_eq!(store.compact(), 1);
    while let Some(at) = cursor {
        cursor = store.scan(at, 1000, |item| {
            seen.insert(item.key().to_owned());
        });
    }
    assert_eq!(seen.len(), 2000, "every survivor seen");
    // The rebuilt shard walks as any other.
    assert_eq!(store.retain(|k| k != key(10)), 1);
    assert_eq!(store.len(), 1999);
    store.assert_consistent();
}

/// A shard count given by hand is raised, if need be, so that no shard's
/// index runs out of slots before the store is full (past 16.7 million items
/// a shard refused every new key).
#[test]
fn a_shard_count_given_by_hand_still_leaves_each_shard_within_its_index() {
    // 20 million items: 1 shard would need more slots than an index holds
    // (16.7 million); 4 hold 5 million each on average.
    assert_eq!(store(20_000_000, 0, 1).0.shard_count(), 4);
    assert_eq!(store(20_000_000, 0, 64).0.shard_count(), 64);
    assert_eq!(store(1_000, 0, 1).0.shard_count(), 1);
}
