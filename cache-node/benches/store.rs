//! Store benchmarks (criterion): the bars of DESIGN section 7 that concern the
//! store alone.
//!
//! - get (hit) and set (overwrite, insert below capacity, insert at capacity
//!   where every insert evicts) with 10 thousand and 10 million items;
//! - invalidating a tag carried by 1,000 of 1,000,000 items;
//! - sweeping 10,000 expired items (1% of 1,000,000, and all of a 10,000-item
//!   store's worth among 100,000) to show the cost follows expired items only.
//!
//! Values are 100 bytes. Run with `cargo bench -p cache-node --bench store`;
//! `BENCH_SIZES=10000` skips the 10-million runs (they need ~3 GiB).
//!
//! Each benchmark must measure what its name says for any iteration count
//! criterion picks (it grows them until a sample fills its time, so millions
//! for the fast ones): items never expire unless the benchmark means them to
//! (their TTL is a century, while the clock moves by microseconds or seconds
//! per iteration), inserts below capacity never fill the store, and each
//! benchmark asserts what it assumes (no eviction, every insert evicted,
//! every short item swept).
//!
//! The allocator is the binary's (mimalloc), so the figures are the binary's.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_node::store::{ManualClock, NO_TAGS, Store, StoreConfig};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const VALUE: [u8; 100] = [b'x'; 100];

/// The TTL of the items the store is filled with: far longer than any run
/// moves the clock, so none of them expires during a benchmark.
const LONG_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

fn key(i: u64) -> String {
    format!("key:{i:012}")
}

fn sizes() -> Vec<u64> {
    std::env::var("BENCH_SIZES")
        .unwrap_or_else(|_| "10000,10000000".into())
        .split(',')
        .map(|s| s.trim().parse().expect("BENCH_SIZES is a list of numbers"))
        .collect()
}

fn filled(n: u64, max_items: u64) -> (Store, ManualClock) {
    let clock = ManualClock::new(1_700_000_000_000_000_000);
    let store = Store::new(
        StoreConfig {
            max_items: max_items as usize,
            max_bytes: 0,
            default_ttl: LONG_TTL,
            shards: 0,
        },
        Arc::new(clock.clone()),
    );
    for i in 0..n {
        store.set(&key(i), &VALUE, NO_TAGS, None, |_| ()).unwrap();
    }
    (store, clock)
}

/// A cheap deterministic sequence of indexes (xorshift), so the benchmark
/// measures the store and not the random number generator.
struct Indexes(u64);

impl Indexes {
    fn next_below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn get_and_set(c: &mut Criterion) {
    for n in sizes() {
        let mut group = c.benchmark_group(format!("store_{n}_items"));
        group.throughput(Throughput::Elements(1));
        group.sample_size(if n > 1_000_000 { 20 } else { 50 });
        group.measurement_time(Duration::from_secs(if n > 1_000_000 { 8 } else { 4 }));

        let keys: Vec<String> = (0..n).map(key).collect();
        let (store, clock) = filled(n, 2 * n);
        let mut rng = Indexes(0x9E3779B97F4A7C15);
        group.bench_function("get_hit", |b| {
            b.iter(|| {
                let k = &keys[rng.next_below(n) as usize];
                black_box(store.get(k, |item| item.value().len()))
            })
        });
        assert_eq!(store.stats().counters.misses, 0, "every get hit");
        // The clock moves on between writes, as in production, so every
        // overwrite changes the item's expiry (by a microsecond: it stays in
        // its wheel bucket, as a rewrite with the same TTL usually does).
        group.bench_function("set_overwrite", |b| {
            b.iter(|| {
                clock.advance(Duration::from_micros(1));
                let k = &keys[rng.next_below(n) as usize];
                black_box(store.set(k, &VALUE, NO_TAGS, None, |_| ()).unwrap())
            })
        });
        // The same with a tag, as the load scripts write (`"tags":
        // ["bench"]`): every overwrite keeps the key's tag.
        group.bench_function("set_overwrite_tagged", |b| {
            b.iter(|| {
                clock.advance(Duration::from_micros(1));
                let k = &keys[rng.next_below(n) as usize];
                black_box(store.set(k, &VALUE, &["bench"], None, |_| ()).unwrap())
            })
        });
        // New keys into a store with room: time the inserts, then delete them
        // untimed so every batch starts from the same n items. The store has
        // room for n more, so batches of up to n never evict.
        let mut next = n;
        group.bench_function("set_insert_below_capacity", |b| {
            b.iter_custom(|iters| {
                let mut took = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let batch = left.min(n);
                    left -= batch;
                    let new_keys: Vec<String> = (next..next + batch).map(key).collect();
                    next += batch;
                    let started = Instant::now();
                    for k in &new_keys {
                        black_box(store.set(k, &VALUE, NO_TAGS, None, |_| ()).unwrap());
                    }
                    took += started.elapsed();
                    for k in &new_keys {
                        store.delete(k);
                    }
                }
                took
            })
        });
        assert_eq!(
            store.stats().counters.evictions,
            0,
            "below capacity means no eviction"
        );
        assert_eq!(store.len() as u64, n);
        drop(store);

        let (full, _clock) = filled(n, n);
        let mut next = n;
        group.bench_function("set_insert_at_capacity", |b| {
            b.iter_custom(|iters| {
                let new_keys: Vec<String> = (next..next + iters).map(key).collect();
                next += iters;
                let started = Instant::now();
                for k in &new_keys {
                    black_box(full.set(k, &VALUE, NO_TAGS, None, |_| ()).unwrap());
                }
                started.elapsed()
            })
        });
        assert_eq!(full.len() as u64, n, "every insert evicted exactly one");
        assert_eq!(
            full.stats().counters.evictions,
            next - n,
            "every insert evicted exactly one"
        );
        group.finish();
    }
}

fn tag_invalidation(c: &mut Criterion) {
    let (store, _clock) = filled(999_000, u64::MAX);
    let hot_keys: Vec<String> = (0..1000).map(|i| format!("hot:{i}")).collect();
    let tags = vec!["hot".to_string()];
    let mut group = c.benchmark_group("invalidate_tag");
    group.sample_size(50);
    group.bench_function("1000_of_1000000", |b| {
        b.iter_custom(|iters| {
            let mut took = Duration::ZERO;
            for _ in 0..iters {
                for k in &hot_keys {
                    store.set(k, &VALUE, &tags, None, |_| ()).unwrap();
                }
                assert_eq!(store.len(), 1_000_000);
                let started = Instant::now();
                let removed = store.invalidate_tag("hot");
                took += started.elapsed();
                assert_eq!(removed, 1000);
            }
            took
        })
    });
    group.finish();
}

/// Each iteration writes 10,000 items with a 1 s TTL, moves the clock 2 s and
/// times the sweep that removes them; the base items (a century's TTL) stay
/// however many iterations run.
fn sweep(c: &mut Criterion) {
    let mut group = c.benchmark_group("sweep_10000_expired");
    group.sample_size(20);
    for total in [100_000u64, 1_000_000] {
        let (store, clock) = filled(total - 10_000, u64::MAX);
        let short: Vec<String> = (0..10_000).map(|i| format!("short:{i}")).collect();
        group.bench_with_input(BenchmarkId::new("among", total), &total, |b, _| {
            b.iter_custom(|iters| {
                let mut took = Duration::ZERO;
                for _ in 0..iters {
                    for k in &short {
                        store
                            .set(k, &VALUE, NO_TAGS, Some(Duration::from_secs(1)), |_| ())
                            .unwrap();
                    }
                    clock.advance(Duration::from_secs(2));
                    let started = Instant::now();
                    let removed = store.sweep_expired();
                    took += started.elapsed();
                    assert_eq!(removed, 10_000);
                }
                took
            })
        });
        assert_eq!(store.len() as u64, total - 10_000, "the base items stayed");
    }
    group.finish();
}

criterion_group!(benches, get_and_set, tag_invalidation, sweep);
criterion_main!(benches);
