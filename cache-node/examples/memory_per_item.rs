//! Resident memory per item: fills a store with N items (default 1,000,000;
//! keys like `key:000000000042`, 16 bytes) and reports the growth of the
//! process's resident set divided by N, next to the payload (key + value)
//! per item.
//!
//! `cargo run --release -p cache-node --example memory_per_item -- ITEMS [VALUE_BYTES [TAGS [DELETE_PERCENT [ORDER]]]]`
//!
//! - VALUE_BYTES (default 100): every value's length.
//! - TAGS (default 0): tags per item, from a pool of 1,000 names
//!   (`tag:000`..`tag:999`), so tag names are shared as in real use.
//! - DELETE_PERCENT (default 0): then deletes that share of the items, gives
//!   freed memory back as the node does after a drop (`memory::release`),
//!   and reports the process's whole resident set, to compare with a fresh
//!   process holding only what is left (`bench/memory.sh` does).
//! - ORDER (default `oldest`): which items go, the first written (`oldest`,
//!   as expiry and eviction take them) or nine in ten everywhere (`spread`).
//!
//! (`bench/memory.sh` runs it beside Redis and memcached holding the same data.)
//! The allocator is the binary's (mimalloc), whose size classes and page
//! handling are what the resident set of a real node reflects. Keys are
//! generated as they are written, so no copy of them sits in the process.

use std::io::Write as _;
use std::time::Duration;

use cache_node::store::{ITEM_OVERHEAD, Store, StoreConfig};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("Linux /proc");
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn arg<T: std::str::FromStr>(n: usize, default: T) -> T {
    std::env::args()
        .nth(n)
        .map_or(default, |s| s.parse().ok().expect("a number"))
}

fn key(buf: &mut Vec<u8>, i: u64) -> &str {
    buf.clear();
    write!(buf, "key:{i:012}").unwrap();
    std::str::from_utf8(buf).unwrap()
}

fn main() {
    let n: u64 = arg(1, 1_000_000);
    let value_len: usize = arg(2, 100);
    let tag_count: usize = arg(3, 0);
    let delete_percent: u64 = arg(4, 0);
    let order = std::env::args().nth(5).unwrap_or_else(|| "oldest".into());
    assert!(
        order == "oldest" || order == "spread",
        "ORDER is oldest or spread"
    );
    let value = vec![b'v'; value_len];
    let pool: Vec<String> = (0..1000).map(|i| format!("tag:{i:03}")).collect();
    let mut buf = Vec::with_capacity(32);

    let before = rss_bytes();
    let store = Store::with_config(StoreConfig {
        max_items: n as usize,
        max_bytes: 0,
        default_ttl: Duration::from_secs(3600),
        shards: 0,
    });
    let mut key_bytes = 0u64;
    for i in 0..n {
        let k = key(&mut buf, i);
        key_bytes += k.len() as u64;
        let tags: Vec<&str> = (0..tag_count as u64)
            .map(|t| pool[((i * 7 + t * 331) % 1000) as usize].as_str())
            .collect();
        store.set(k, &value, &tags, None, |_| ()).unwrap();
    }
    // What a node does after the burst of allocations settles (memory.rs):
    // the hash tables' and slabs' old buffers go back.
    cache_node::memory::release_on_this_thread();
    let after = rss_bytes();
    let per_item = (after - before) as f64 / n as f64;
    let payload = (key_bytes + value_len as u64 * n) as f64 / n as f64;
    println!("items={n}");
    println!("value_bytes={value_len}");
    println!("tags_per_item={tag_count}");
    println!("rss_growth_bytes={}", after - before);
    println!("rss_bytes_per_item={per_item:.1}");
    println!("payload_bytes_per_item={payload:.1}");
    println!("overhead_bytes_per_item={:.1}", per_item - payload);
    println!(
        "charged_bytes_per_item={:.1}",
        store.bytes() as f64 / n as f64
    );
    println!("charged_overhead_bytes_per_item={ITEM_OVERHEAD}");
    println!("process_rss_bytes={after}");

    if delete_percent > 0 {
        let doomed = |i: u64| match order.as_str() {
            "oldest" => i < n * delete_percent / 100,
            _ => i % 100 < delete_percent,
        };
        let mut deleted = 0u64;
        for i in (0..n).filter(|&i| doomed(i)) {
            deleted += u64::from(store.delete(key(&mut buf, i)));
        }
        // What the node's memory watcher does after a drop.
        cache_node::memory::give_back(&store);
        println!("deleted={deleted} order={order}");
        println!("items_left={}", store.len());
        println!("process_rss_after_delete_bytes={}", rss_bytes());
    }
}
