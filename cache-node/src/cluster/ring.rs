//! Key placement: which members own a key, for one membership epoch.
//!
//! A [`Ring`] is built once per membership document and then only read, so
//! lookups take no lock. Placement hashes stable member ids (pod names), never
//! addresses: a pod that restarts with a new IP keeps its keys.
//!
//! Two algorithms, chosen by the document's `hashing` field:
//! * rendezvous (highest random weight, the default): a key's owners are the
//!   `replicationFactor` members with the highest score `mix(h(key) ^ h(id))`.
//!   Balance is as good as the hash and adding or removing a member moves
//!   exactly the keys it gains or held, 1/N, with no parameter to tune. A
//!   lookup costs one cheap mix per member, which for the rings we run (tens
//!   of members) is a few tens of nanoseconds.
//! * consistent hashing with virtual nodes: `virtualNodes` points per member
//!   on a 64-bit circle; a key's owners are the distinct members of the next
//!   points clockwise. O(log points) per lookup; balance depends on the number
//!   of points.
//!
//! `cargo run --release -p cache-node --example ring_balance` measures both
//! (balance and movement against the ideal 1/N); the figures behind the
//! default are in the README.
//!
//! Members that are `leaving` own nothing: the ring computed without them is
//! where their keys go. `joining` members own keys (they receive writes and
//! rebalanced data) but do not serve reads until they are `active`.

use std::net::SocketAddr;
use std::sync::Arc;

use distrocache_membership::{Hashing, MemberState, MembershipDoc};

/// Index of a member in [`Ring::members`].
pub type MemberIdx = usize;

/// The hash every node must agree on. xxh3 has a published, stable
/// specification, unlike std's or foldhash's hashers, whose output may change
/// between releases or processes.
pub fn key_hash(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// murmur3's 64-bit finaliser: a bijection with full avalanche, so the scores
/// of one key on different members are independent enough for rendezvous.
fn mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[derive(Debug, Clone)]
pub struct RingMember {
    pub id: String,
    pub address: SocketAddr,
    pub state: MemberState,
    id_hash: u64,
}

impl RingMember {
    /// Owns keys (receives their writes and data).
    pub fn owns(&self) -> bool {
        self.state != MemberState::Leaving
    }

    /// Serves reads of the keys it owns.
    pub fn serves(&self) -> bool {
        self.state == MemberState::Active
    }
}

#[derive(Debug)]
enum Placement {
    Rendezvous,
    /// Sorted (point, member) pairs of the owning members.
    Consistent(Vec<(u64, MemberIdx)>),
}

/// The owners of one key, primary first. Rings hold at most
/// `MAX_REPLICATION_FACTOR` owners per key, so a small inline array.
pub type Owners = smallvec::SmallVec<[MemberIdx; 4]>;

#[derive(Debug)]
pub struct Ring {
    pub doc: Arc<MembershipDoc>,
    pub members: Vec<RingMember>,
    /// This node's index, when it is a member.
    pub me: Option<MemberIdx>,
    placement: Placement,
    /// Number of members that own keys.
    owning: usize,
}

impl Ring {
    /// Builds the lookup structures for `doc` as seen by node `my_id`. The
    /// document must be valid ([`MembershipDoc::validate`]).
    pub fn new(doc: Arc<MembershipDoc>, my_id: &str) -> Self {
        let members: Vec<RingMember> = doc
            .members
            .iter()
            .map(|m| RingMember {
                id: m.id.clone(),
                address: m
                    .address
                    .parse()
                    .expect("validated documents have ip:port addresses"),
                state: m.state,
                id_hash: key_hash(m.id.as_bytes()),
            })
            .collect();
        let placement = match doc.hashing {
            Hashing::Rendezvous => Placement::Rendezvous,
            Hashing::Consistent { virtual_nodes } => {
                let mut points = Vec::new();
                for (idx, m) in members.iter().enumerate().filter(|(_, m)| m.owns()) {
                    for v in 0..virtual_nodes {
                        points.push((key_hash(format!("{}#{v}", m.id).as_bytes()), idx));
                    }
                }
                // Ties (astronomically rare) are broken by member index, the
                // same on every node because member order is irrelevant only
                // up to ids: sort ties by id to stay order-independent.
                points.sort_unstable_by(|a, b| {
                    a.0.cmp(&b.0)
                        .then_with(|| members[a.1].id.cmp(&members[b.1].id))
                });
                Placement::Consistent(points)
            }
        };
        let me = members.iter().position(|m| m.id == my_id);
        let owning = members.iter().filter(|m| m.owns()).count();
        Self {
            doc,
            members,
            me,
            placement,
            owning,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.doc.epoch
    }

    pub fn replication_factor(&self) -> usize {
        self.doc.replication_factor as usize
    }

    pub fn member(&self, idx: MemberIdx) -> &RingMember {
        &self.members[idx]
    }

    pub fn index_of(&self, id: &str) -> Option<MemberIdx> {
        self.members.iter().position(|m| m.id == id)
    }

    /// This node's own state in the ring, if it is a member.
    pub fn my_state(&self) -> Option<MemberState> {
        self.me.map(|i| self.members[i].state)
    }

    /// The members that own `key`, primary first: `replicationFactor` of them,
    /// or every owning member if there are fewer.
    pub fn owners(&self, key: &[u8]) -> Owners {
        let want = self.replication_factor().min(self.owning);
        let h = key_hash(key);
        match &self.placement {
            Placement::Rendezvous => self.rendezvous(h, want),
            Placement::Consistent(points) => consistent(points, h, want),
        }
    }

    /// Whether member `idx` owns `key`.
    pub fn is_owner(&self, key: &[u8], idx: MemberIdx) -> bool {
        self.owners(key).contains(&idx)
    }

    /// The top `want` scores, kept sorted in a tiny array: insertion into a
    /// handful of slots beats a heap or a full sort at these sizes.
    fn rendezvous(&self, h: u64, want: usize) -> Owners {
        let mut best: smallvec::SmallVec<[(u64, MemberIdx); 4]> = smallvec::SmallVec::new();
        for (idx, m) in self.members.iter().enumerate() {
            if !m.owns() {
                continue;
            }
            let score = mix(h ^ m.id_hash);
            if best.len() == want && best.last().is_some_and(|&(s, _)| s >= score) {
                continue;
            }
            let at = best
                .iter()
                .position(|&(s, _)| s < score)
                .unwrap_or(best.len());
            best.insert(at, (score, idx));
            best.truncate(want);
        }
        best.into_iter().map(|(_, idx)| idx).collect()
    }
}

fn consistent(points: &[(u64, MemberIdx)], h: u64, want: usize) -> Owners {
    let mut owners = Owners::new();
    if points.is_empty() {
        return owners;
    }
    let start = points.partition_point(|&(p, _)| p < h);
    for i in 0..points.len() {
        let idx = points[(start + i) % points.len()].1;
        if !owners.contains(&idx) {
            owners.push(idx);
            if owners.len() == want {
                break;
            }
        }
    }
    owners
}

#[cfg(test)]
mod tests {
    use super::*;
    use distrocache_membership::Member;

    pub fn doc(
        epoch: u64,
        rf: u32,
        hashing: Hashing,
        members: &[(&str, MemberState)],
    ) -> MembershipDoc {
        MembershipDoc {
            epoch,
            replication_factor: rf,
            hashing,
            members: members
                .iter()
                .enumerate()
                .map(|(i, (id, state))| Member {
                    id: (*id).into(),
                    address: format!("127.0.0.{}:8080", i + 10),
                    state: *state,
                })
                .collect(),
        }
    }

    fn ring(d: MembershipDoc) -> Ring {
        Ring::new(Arc::new(d), "n0")
    }

    const ALGORITHMS: [Hashing; 2] = [
        Hashing::Rendezvous,
        Hashing::Consistent { virtual_nodes: 160 },
    ];

    #[test]
    fn owners_are_distinct_primary_first_and_order_independent() {
        use MemberState::Active;
        for hashing in ALGORITHMS {
            let a = ring(doc(
                1,
                2,
                hashing,
                &[("n0", Active), ("n1", Active), ("n2", Active)],
            ));
            let b = ring(doc(
                1,
                2,
                hashing,
                &[("n2", Active), ("n0", Active), ("n1", Active)],
            ));
            for i in 0..2000 {
                let key = format!("key:{i}");
                let oa = a.owners(key.as_bytes());
                let ob = b.owners(key.as_bytes());
                assert_eq!(oa.len(), 2);
                assert_ne!(oa[0], oa[1]);
                let ids = |r: &Ring, o: &Owners| -> Vec<String> {
                    o.iter().map(|&i| r.member(i).id.clone()).collect()
                };
                assert_eq!(ids(&a, &oa), ids(&b, &ob), "{hashing:?} {key}");
            }
        }
    }

    #[test]
    fn leaving_members_own_nothing_and_joining_ones_own_their_share() {
        use MemberState::*;
        for hashing in ALGORITHMS {
            let r = ring(doc(
                1,
                2,
                hashing,
                &[("n0", Active), ("n1", Joining), ("n2", Leaving)],
            ));
            let mut n1 = 0;
            for i in 0..1000 {
                let o = r.owners(format!("k{i}").as_bytes());
                assert_eq!(o.len(), 2);
                assert!(!o.contains(&2), "{hashing:?}: leaving member owns a key");
                n1 += usize::from(o.contains(&1));
            }
            assert_eq!(n1, 1000, "with two owning members and rf 2 both own all");
        }
    }

    #[test]
    fn fewer_members_than_the_replication_factor() {
        for hashing in ALGORITHMS {
            let r = ring(doc(1, 3, hashing, &[("n0", MemberState::Active)]));
            assert_eq!(r.owners(b"k").as_slice(), &[0]);
            let empty = ring(doc(1, 3, hashing, &[]));
            assert!(empty.owners(b"k").is_empty());
        }
    }

    #[test]
    fn adding_a_member_only_moves_keys_to_it() {
        use MemberState::Active;
        for hashing in ALGORITHMS {
            let three = ring(doc(
                1,
                1,
                hashing,
                &[("n0", Active), ("n1", Active), ("n2", Active)],
            ));
            let four = ring(doc(
                2,
                1,
                hashing,
                &[
                    ("n0", Active),
                    ("n1", Active),
                    ("n2", Active),
                    ("n3", Active),
                ],
            ));
            let mut moved = 0;
            for i in 0..20_000 {
                let key = format!("key:{i}");
                let before = three.owners(key.as_bytes())[0];
                let after = four.owners(key.as_bytes())[0];
                if before != after {
                    assert_eq!(after, 3, "{hashing:?}: a key moved between old members");
                    moved += 1;
                }
            }
            let fraction = moved as f64 / 20_000.0;
            assert!(
                (0.15..0.35).contains(&fraction),
                "{hashing:?}: moved {fraction}"
            );
        }
    }

    #[test]
    fn the_key_hash_is_stable() {
        // Every node of every version must place keys alike; pin the hash.
        assert_eq!(key_hash(b""), 0x2d06_8005_38d3_94c2);
        assert_eq!(key_hash(b"user:123"), key_hash(b"user:123"));
    }
}
