//! Ring placement figures: load balance (max/mean keys per node) for 3, 5 and
//! 10 nodes, and the fraction of keys that move when a node is added or
//! removed, against the ideal 1/N, for rendezvous hashing and for consistent
//! hashing with several virtual-node counts; plus the cost of one lookup.
//!
//! `cargo run --release -p cache-node --example ring_balance [keys]`
//! (1,000,000 keys by default; replication factor 1, so "owner" is the
//! primary; with rf 2 every figure holds per copy).

use std::sync::Arc;
use std::time::Instant;

use cache_node::cluster::ring::Ring;
use distrocache_membership::{Hashing, Member, MemberState, MembershipDoc};

fn ring(hashing: Hashing, nodes: usize) -> Ring {
    let doc = MembershipDoc {
        epoch: 1,
        replication_factor: 1,
        hashing,
        members: (0..nodes)
            .map(|i| Member {
                id: format!("cache-{i}"),
                address: format!("10.0.0.{}:8080", i + 1),
                client_address: None,
                state: MemberState::Active,
            })
            .collect(),
    };
    Ring::new(Arc::new(doc), "observer")
}

fn primaries(ring: &Ring, keys: &[String]) -> Vec<String> {
    keys.iter()
        .map(|k| ring.member(ring.owners(k.as_bytes())[0]).id.clone())
        .collect()
}

fn main() {
    let n_keys: usize = std::env::args()
        .nth(1)
        .map_or(1_000_000, |s| s.parse().expect("key count"));
    let keys: Vec<String> = (0..n_keys).map(|i| format!("user:{i}:profile")).collect();
    let algorithms = [
        ("rendezvous", Hashing::Rendezvous),
        ("consistent/16", Hashing::Consistent { virtual_nodes: 16 }),
        ("consistent/64", Hashing::Consistent { virtual_nodes: 64 }),
        ("consistent/160", Hashing::Consistent { virtual_nodes: 160 }),
        ("consistent/256", Hashing::Consistent { virtual_nodes: 256 }),
        ("consistent/512", Hashing::Consistent { virtual_nodes: 512 }),
    ];
    println!("{n_keys} keys; max/mean = most keys on one node / keys per node if perfectly even");
    println!(
        "{:<16}{:>5}{:>10}{:>14}{:>10}{:>16}{:>10}{:>12}",
        "algorithm", "N", "max/mean", "moved N->N+1", "ideal", "moved N->N-1", "ideal", "lookup ns"
    );
    for (name, hashing) in algorithms {
        for n in [3usize, 5, 10] {
            let base = ring(hashing, n);
            let owners = primaries(&base, &keys);
            let mut counts = std::collections::HashMap::new();
            for o in &owners {
                *counts.entry(o.as_str()).or_insert(0usize) += 1;
            }
            let max = *counts.values().max().unwrap() as f64;
            let mean = n_keys as f64 / n as f64;
            let moved = |other: &Ring| {
                let after = primaries(other, &keys);
                owners.iter().zip(&after).filter(|(a, b)| a != b).count() as f64 / n_keys as f64
            };
            let added = moved(&ring(hashing, n + 1));
            let removed = moved(&ring(hashing, n - 1));
            let started = Instant::now();
            let mut sink = 0usize;
            for k in &keys {
                sink = sink.wrapping_add(base.owners(k.as_bytes())[0]);
            }
            let lookup_ns = started.elapsed().as_nanos() as f64 / n_keys as f64;
            std::hint::black_box(sink);
            println!(
                "{name:<16}{n:>5}{:>10.3}{:>14.4}{:>10.4}{:>16.4}{:>10.4}{:>12.1}",
                max / mean,
                added,
                1.0 / (n + 1) as f64,
                removed,
                1.0 / n as f64,
                lookup_ns
            );
        }
    }
}
