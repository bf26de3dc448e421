//! Resident memory per item: fills a store with N items (default 1,000,000)
//! with 100-byte values and reports the growth of the process's resident set
//! divided by N, next to the payload (key + value) per item.
//!
//! `cargo run --release -p cache-node --example memory_per_item -- 1000000`
//! (`bench/memory.sh` runs it beside Redis holding the same data).
//!
//! The allocator is the binary's (mimalloc), whose size classes and page
//! handling are what the resident set of a real node reflects.

use std::time::Duration;

use cache_node::store::{ITEM_OVERHEAD, NO_TAGS, Store, StoreConfig};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("Linux /proc");
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .map_or(1_000_000, |s| s.parse().expect("item count"));
    let value = [b'v'; 100];
    let keys: Vec<String> = (0..n).map(|i| format!("key:{i:012}")).collect();
    let key_bytes: u64 = keys.iter().map(|k| k.len() as u64).sum();
    let before = rss_bytes();
    let store = Store::with_config(StoreConfig {
        max_items: n as usize,
        max_bytes: 0,
        default_ttl: Duration::from_secs(3600),
        shards: 0,
    });
    for k in &keys {
        store.set(k, &value, NO_TAGS, None, |_| ()).unwrap();
    }
    let after = rss_bytes();
    let per_item = (after - before) as f64 / n as f64;
    let payload = (key_bytes + 100 * n) as f64 / n as f64;
    println!("items={n}");
    println!("rss_growth_bytes={}", after - before);
    println!("rss_bytes_per_item={per_item:.1}");
    println!("payload_bytes_per_item={payload:.1}");
    println!("overhead_bytes_per_item={:.1}", per_item - payload);
    println!(
        "charged_bytes_per_item={:.1}",
        store.bytes() as f64 / n as f64
    );
    println!("charged_overhead_bytes_per_item={ITEM_OVERHEAD}");
}
