//! The cost of placing one key: `Placement::owners` for the ring shapes the
//! nodes and clients run (3, 12 and 100 members, replication factor 2),
//! with both algorithms. A node places a key several times per request
//! (its read route, the forward, the replicas of a write), so this is on
//! every request's path.
//!
//!   cargo bench -p distrocache-membership --bench placement

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use distrocache_membership::placement::Placement;
use distrocache_membership::{Hashing, Member, MemberState, MembershipDoc};

fn doc(members: usize, hashing: Hashing) -> MembershipDoc {
    MembershipDoc {
        epoch: 1,
        replication_factor: 2,
        hashing,
        members: (0..members)
            .map(|i| Member {
                id: format!("cache-{i}"),
                address: format!("127.0.0.{}:8080", i % 250 + 1),
                client_address: None,
                state: MemberState::Active,
            })
            .collect(),
    }
}

fn owners(c: &mut Criterion) {
    let keys: Vec<String> = (0..1024).map(|i| format!("bench:{i}")).collect();
    let mut group = c.benchmark_group("owners");
    for (name, hashing) in [
        ("rendezvous", Hashing::Rendezvous),
        ("consistent", Hashing::Consistent { virtual_nodes: 160 }),
    ] {
        for members in [3, 12, 100] {
            let placement = Placement::new(&doc(members, hashing));
            let mut i = 0;
            group.bench_function(BenchmarkId::new(name, members), |b| {
                b.iter(|| {
                    i = (i + 1) % keys.len();
                    placement.owners(black_box(keys[i].as_bytes()))
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, owners);
criterion_main!(benches);
