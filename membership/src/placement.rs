//! Key placement: which members own a key under one membership document.
//!
//! It lives here, beside the document, because everyone who routes a key
//! must place it exactly alike: the nodes (which forward and replicate by
//! it) and ring-aware clients (`distrocache-client`, which send each
//! request straight to an owner). A [`Placement`] is built once per
//! document and then only read, so lookups take no lock. Placement hashes
//! stable member ids (pod names), never addresses: a pod that restarts with
//! a new IP keeps its keys.
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
//! Members that are `leaving` own nothing: the placement computed without
//! them is where their keys go. `joining` members own keys (they receive
//! writes and rebalanced data) but do not serve reads until they are
//! `active`.

use crate::{Hashing, MemberState, MembershipDoc};

/// Index of a member in [`MembershipDoc::members`].
pub type MemberIdx = usize;

/// The owners of one key, primary first. Rings hold at most
/// [`crate::MAX_REPLICATION_FACTOR`] owners per key and usually 2-3, so a
/// small inline array.
pub type Owners = smallvec::SmallVec<[MemberIdx; 4]>;

/// The hash every node and client must agree on. xxh3 has a published,
/// stable specification, unlike std's or foldhash's hashers, whose output
/// may change between releases or processes.
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
enum Algorithm {
    Rendezvous,
    /// Sorted (point, member) pairs of the owning members.
    Consistent(Vec<(u64, MemberIdx)>),
}

/// The placement of keys under one document.
#[derive(Debug, Clone)]
pub struct Placement {
    /// Per member: the hash of its id, and whether it owns keys.
    members: Vec<(u64, bool)>,
    algorithm: Algorithm,
    /// Owners per key: the replication factor, or every owning member if
    /// there are fewer.
    want: usize,
}

impl Placement {
    pub fn new(doc: &MembershipDoc) -> Self {
        let members: Vec<(u64, bool)> = doc
            .members
            .iter()
            .map(|m| (key_hash(m.id.as_bytes()), m.state != MemberState::Leaving))
            .collect();
        let algorithm = match doc.hashing {
            Hashing::Rendezvous => Algorithm::Rendezvous,
            Hashing::Consistent { virtual_nodes } => {
                let mut points = Vec::new();
                for (idx, m) in doc.members.iter().enumerate() {
                    if m.state == MemberState::Leaving {
                        continue;
                    }
                    for v in 0..virtual_nodes {
                        points.push((key_hash(format!("{}#{v}", m.id).as_bytes()), idx));
                    }
                }
                // Ties (astronomically rare) are broken by member id, so the
                // order of the members in the document never matters.
                points.sort_unstable_by(|a, b| {
                    a.0.cmp(&b.0)
                        .then_with(|| doc.members[a.1].id.cmp(&doc.members[b.1].id))
                });
                Algorithm::Consistent(points)
            }
        };
        let owning = members.iter().filter(|(_, owns)| *owns).count();
        Self {
            members,
            algorithm,
            // A valid document's factor is at most MAX_REPLICATION_FACTOR
            // (`MembershipDoc::validate`); rendezvous keeps that many at most.
            want: (doc.replication_factor as usize)
                .min(owning)
                .min(crate::MAX_REPLICATION_FACTOR as usize),
        }
    }

    /// The members that own `key`, primary first, each once.
    pub fn owners(&self, key: &[u8]) -> Owners {
        let h = key_hash(key);
        match &self.algorithm {
            Algorithm::Rendezvous => self.rendezvous(h),
            Algorithm::Consistent(points) => consistent(points, h, self.want),
        }
    }

    /// Whether member `idx` owns `key`.
    pub fn is_owner(&self, key: &[u8], idx: MemberIdx) -> bool {
        self.owners(key).contains(&idx)
    }

    /// The top `want` scores, kept sorted in a fixed array on the stack:
    /// insertion into a handful of slots beats a heap or a full sort at
    /// these sizes, and a plain array (rather than a growable small vector,
    /// whose insert and truncate are calls with their own checks) halves a
    /// 3-member lookup (`cargo bench -p distrocache-membership --bench
    /// placement`: 44 -> 23 ns).
    fn rendezvous(&self, h: u64) -> Owners {
        let want = self.want;
        // Nothing to keep (and `want - 1` below needs one at least).
        if want == 0 {
            return Owners::new();
        }
        // (score, member), best first; ties keep the earlier member first.
        let mut best = [(0u64, 0 as MemberIdx); crate::MAX_REPLICATION_FACTOR as usize];
        let mut len = 0;
        for (idx, &(id_hash, owns)) in self.members.iter().enumerate() {
            if !owns {
                continue;
            }
            let score = mix(h ^ id_hash);
            if len == want && best[len - 1].0 >= score {
                continue;
            }
            // Shift the lower scores down a slot (the last falls off when
            // full) and put this one above them.
            let mut at = len.min(want - 1);
            while at > 0 && best[at - 1].0 < score {
                best[at] = best[at - 1];
                at -= 1;
            }
            best[at] = (score, idx);
            len = (len + 1).min(want);
        }
        best[..len].iter().map(|&(_, idx)| idx).collect()
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
    use crate::Member;

    fn doc(rf: u32, hashing: Hashing, members: &[(&str, MemberState)]) -> MembershipDoc {
        MembershipDoc {
            epoch: 1,
            replication_factor: rf,
            hashing,
            members: members
                .iter()
                .enumerate()
                .map(|(i, (id, state))| Member {
                    id: (*id).into(),
                    address: format!("127.0.0.{}:8080", i + 10),
                    client_address: None,
                    state: *state,
                })
                .collect(),
        }
    }

    const ALGORITHMS: [Hashing; 2] = [
        Hashing::Rendezvous,
        Hashing::Consistent { virtual_nodes: 160 },
    ];

    #[test]
    fn owners_are_distinct_primary_first_and_order_independent() {
        use MemberState::Active;
        for hashing in ALGORITHMS {
            let da = doc(
                2,
                hashing,
                &[("n0", Active), ("n1", Active), ("n2", Active)],
            );
            let db = doc(
                2,
                hashing,
                &[("n2", Active), ("n0", Active), ("n1", Active)],
            );
            let (a, b) = (Placement::new(&da), Placement::new(&db));
            for i in 0..2000 {
                let key = format!("key:{i}");
                let oa = a.owners(key.as_bytes());
                let ob = b.owners(key.as_bytes());
                assert_eq!(oa.len(), 2);
                assert_ne!(oa[0], oa[1]);
                let ids = |d: &MembershipDoc, o: &Owners| -> Vec<String> {
                    o.iter().map(|&i| d.members[i].id.clone()).collect()
                };
                assert_eq!(ids(&da, &oa), ids(&db, &ob), "{hashing:?} {key}");
            }
        }
    }

    #[test]
    fn leaving_members_own_nothing_and_joining_ones_own_their_share() {
        use MemberState::*;
        for hashing in ALGORITHMS {
            let p = Placement::new(&doc(
                2,
                hashing,
                &[("n0", Active), ("n1", Joining), ("n2", Leaving)],
            ));
            let mut n1 = 0;
            for i in 0..1000 {
                let o = p.owners(format!("k{i}").as_bytes());
                assert_eq!(o.len(), 2);
                assert!(!o.contains(&2), "{hashing:?}: leaving member owns a key");
                n1 += usize::from(o.contains(&1));
            }
            assert_eq!(n1, 1000, "with two owning members and rf 2 both own all");
        }
    }

    /// Rendezvous against its definition: every owning member scored, the
    /// `want` highest first (ties: the earlier member first).
    #[test]
    fn rendezvous_picks_the_highest_scores() {
        for n in 0..20 {
            for rf in 1..=5 {
                let members: Vec<(String, MemberState)> = (0..n)
                    .map(|i| {
                        let state = if i % 7 == 3 {
                            MemberState::Leaving
                        } else {
                            MemberState::Active
                        };
                        (format!("m{i}"), state)
                    })
                    .collect();
                let named: Vec<(&str, MemberState)> =
                    members.iter().map(|(id, s)| (id.as_str(), *s)).collect();
                let d = doc(rf, Hashing::Rendezvous, &named);
                let p = Placement::new(&d);
                for k in 0..200 {
                    let key = format!("key:{k}");
                    let h = key_hash(key.as_bytes());
                    let mut scored: Vec<(u64, MemberIdx)> = d
                        .members
                        .iter()
                        .enumerate()
                        .filter(|(_, m)| m.state != MemberState::Leaving)
                        .map(|(i, m)| (mix(h ^ key_hash(m.id.as_bytes())), i))
                        .collect();
                    scored.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
                    let expected: Vec<MemberIdx> =
                        scored.iter().take(rf as usize).map(|&(_, i)| i).collect();
                    assert_eq!(
                        p.owners(key.as_bytes()).as_slice(),
                        expected,
                        "{n} members, rf {rf}, {key}"
                    );
                }
            }
        }
    }

    #[test]
    fn fewer_members_than_the_replication_factor() {
        for hashing in ALGORITHMS {
            let p = Placement::new(&doc(3, hashing, &[("n0", MemberState::Active)]));
            assert_eq!(p.owners(b"k").as_slice(), &[0]);
            let empty = Placement::new(&doc(3, hashing, &[]));
            assert!(empty.owners(b"k").is_empty());
        }
    }

    #[test]
    fn adding_a_member_only_moves_keys_to_it() {
        use MemberState::Active;
        for hashing in ALGORITHMS {
            let three = Placement::new(&doc(
                1,
                hashing,
                &[("n0", Active), ("n1", Active), ("n2", Active)],
            ));
            let four = Placement::new(&doc(
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
        // Every node, client and version must place keys alike; pin the hash.
        assert_eq!(key_hash(b""), 0x2d06_8005_38d3_94c2);
        assert_eq!(key_hash(b"user:123"), key_hash(b"user:123"));
    }

    #[test]
    fn placements_are_pinned() {
        // A client in any language must reproduce these (README, "Ring-aware
        // clients"): rendezvous, rf 2, members a, b, c; each member scores
        // mix(xxh3(key) ^ xxh3(id)), the highest two own the key.
        use MemberState::Active;
        let d = doc(
            2,
            Hashing::Rendezvous,
            &[("a", Active), ("b", Active), ("c", Active)],
        );
        let p = Placement::new(&d);
        let ids = |key: &str| -> Vec<&str> {
            p.owners(key.as_bytes())
                .iter()
                .map(|&i| d.members[i].id.as_str())
                .collect()
        };
        assert_eq!(ids("user:1"), ["b", "c"]);
        assert_eq!(ids("user:2"), ["c", "a"]);
        assert_eq!(ids("session:42"), ["b", "a"]);
        assert_eq!(ids("k"), ["a", "b"]);
    }
}
