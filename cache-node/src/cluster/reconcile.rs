//! Reads served from a copy that may be behind: before a node serves a read
//! from its own copy without holding a read lease, it asks the members that
//! may know better for anything newer.
//!
//! A copy may miss acknowledged writes. A coordinator that cannot reach an
//! owner answers its client anyway and hints that owner (see `repair`), and
//! the owner cannot tell. Read leases (see `leases`) say when it cannot be
//! behind: while it holds one, no member holds a hint for it. Without one,
//! the owner may be behind on any key, even one it is the primary of:
//! - a ring change may make a behind replica a key's primary;
//! - a write whose primary could not be reached goes to the next owner,
//!   which coordinates it and hints the primary.
//!
//! So the node asks the key's other owners (current and, while data moves,
//! previous), and the members that refused it a lease (they hold hints for
//! it: a tag invalidation's may live on a member that owns nothing of the
//! key), what they know that is newer than its copy, and applies it before
//! it reads: a newer copy is stored (the newest version wins), a delete or
//! tag invalidation made since its copy was written removes it. A member
//! that recently failed to answer is not asked, and one that does not answer
//! within [`RECONCILE_TIMEOUT`] adds nothing: then the node serves what it
//! has (availability over freshness, as when a key's primary cannot be
//! reached). Except for a key missing here while data moves: every owner is
//! asked, with the whole peer timeout, so a key on its way is never missed.
//!
//! What a peer knows comes from its store, its tombstones (see
//! `tombstones`: remembered for 10 minutes, with their number capped) and
//! the hints it holds for the asker (queued or on their way): those say what
//! the asker missed even once the item is gone from the peer (expired,
//! evicted, handed off) and its tombstone forgotten.
//!
//! This costs a peer round trip per read while the node holds no lease: for
//! about half a second after a ring change settles, while data moves, and
//! while any member is down. A settled cluster with every member up serves
//! every read from the copy of the owner that receives it.

use std::time::Duration;

use futures_util::future::join_all;

use super::Cluster;
use super::metrics::PeerOp;
use super::ring::RingMember;
use crate::peer::Call;
use crate::peer::protocol::{Deletion, HeldCopy, Newer, Records};
use crate::store::ItemRef;

/// How long an owner has to say what it holds newer than a copy held here,
/// once its connection is open (opening one takes up to
/// `--peer-connect-timeout`): a read waits for the slowest owner it asks,
/// so a silent owner must not hold it for a whole `--peer-timeout` (which
/// bounds it where it is shorter).
pub const RECONCILE_TIMEOUT: Duration = Duration::from_secs(1);

impl Cluster {
    /// Whether this node may serve reads from its own copies as they are:
    /// it holds read leases, so it holds every acknowledged write of every
    /// key it owns.
    pub fn serves_own_copies(&self) -> bool {
        self.holds_read_lease()
    }

    /// Brings this node's copy of `key` up to what the members that may
    /// know better can say (see the module's comment): the key's other
    /// owners and the members that did not grant this node a lease. Returns
    /// once every member asked has answered or failed.
    pub async fn reconcile(&self, key: &str) {
        let Some(rings) = self.ring.rings() else {
            return;
        };
        let held = self.store.peek(key, |item| HeldCopy {
            version: item.created_at(),
            tags: item.tags().map(str::to_owned).collect(),
        });
        // A key missing here while data moves may be held only by an owner
        // of the previous ring, so then every owner is asked, even one that
        // failed to answer lately, and given the whole peer timeout: a read
        // never misses a key on its way. Otherwise those are passed over
        // (reads do not wait for them again), and the others given
        // `RECONCILE_TIMEOUT` (the peer timeout if shorter): what is held
        // here is served if they are slow.
        let on_its_way = held.is_none() && self.is_moving_in(&rings);
        let mut asked: Vec<&RingMember> = self.replicas(&rings, key).to_vec();
        if !on_its_way {
            asked.retain(|m| !self.health.is_down(&m.id));
        }
        // Members that did not grant a lease and own nothing of the key can
        // only know of a tag invalidation: never waited for when down.
        for id in self.leases.refused_by() {
            let member = rings
                .both()
                .find_map(|ring| ring.index_of(&id).map(|i| ring.member(i)));
            if let Some(m) = member
                && m.id != self.node_id
                && !self.health.is_down(&m.id)
                && !asked.iter().any(|a| a.id == m.id)
            {
                asked.push(m);
            }
        }
        if asked.is_empty() {
            return;
        }
        let timeout =
            (!on_its_way).then(|| RECONCILE_TIMEOUT.min(self.settings.peer.request_timeout));
        let call = Call::newer(key.to_owned(), self.node_id.clone(), held);
        let answers = asked.iter().map(|m| self.call(m, &call, timeout));
        for (member, answer) in asked.iter().zip(join_all(answers).await) {
            self.metrics.peer_call(PeerOp::Reconcile, answer.is_ok());
            match answer {
                Ok(newer) => {
                    self.health.mark_up(&member.id);
                    self.absorb(key, newer);
                }
                Err(e) => {
                    if e.is_unavailable() {
                        self.health.mark_down(&member.id);
                    }
                    tracing::debug!(peer = %member.id, error = %e, "a member could not say what it holds newer");
                }
            }
        }
    }

    /// Applies to this node's copy of `key` what a peer knows newer. In any
    /// order, several peers' answers leave the newest copy that no delete
    /// or invalidation made dead: a copy applies only over an older one and
    /// not over a tombstone, a delete removes only what is at least as old.
    fn absorb(&self, key: &str, newer: Newer) {
        match newer {
            Newer::Copy(record) => {
                if let Ok(record) = record.single() {
                    self.apply_records(std::slice::from_ref(&record));
                }
            }
            Newer::Deleted { at } => {
                self.apply_deletes(&[Deletion {
                    key: key.to_owned(),
                    at,
                }]);
            }
            Newer::Nothing => {}
        }
    }

    /// What this node knows newer than the copy `held` of `key` that
    /// member `asker` holds (the answer to its `Newer`): this node's copy
    /// if newer (`record` reads it). Else, if the key was deleted after the
    /// asker's copy was written (or it holds none), or the asker missed a
    /// delete of it here, or a write whose item is gone from here since
    /// (hints), the time at or before which its copies are dead. Else, if
    /// one of the copy's tags was invalidated
    /// since (a tombstone, or a hint for the asker), the copy's own version
    /// (a copy written later without that tag lives).
    pub fn newer_than(
        &self,
        key: &str,
        asker: &str,
        held: Option<&HeldCopy>,
        record: impl FnOnce(&ItemRef<'_>) -> Records,
    ) -> Newer {
        let here = self.store.peek(key, |item| {
            held.is_none_or(|h| item.created_at() > h.version)
                .then(|| record(&item))
        });
        if let Some(Some(copy)) = here {
            return Newer::Copy(copy);
        }
        // The item may be gone from here since (expired, evicted, handed
        // off), and a tombstone forgotten: the hints still say what the
        // asker missed. A missed write counts only then: with a copy held
        // here, not newer than the asker's, the asker's is as new as what
        // this node knows (a later write, even one stamped by a clock
        // behind this one's, replaced the hinted one).
        let missed = self.hints.missed_key(asker, key, here.is_none());
        let dead_until = self.tombstones.deleted_at(key).max(missed);
        match held {
            None => dead_until.map_or(Newer::Nothing, |at| Newer::Deleted { at }),
            Some(h) => match dead_until {
                Some(at) if at >= h.version => Newer::Deleted { at },
                _ if self.tombstones.buries(key, h.version, &h.tags)
                    || self.hints.missed_tag(asker, &h.tags, h.version) =>
                {
                    Newer::Deleted { at: h.version }
                }
                _ => Newer::Nothing,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use distrocache_membership::MemberState;

    use super::*;
    use crate::cluster::testing::{self, Version};
    use crate::peer::protocol::RecordBatch;
    use crate::store::{ItemView, Store, StoreConfig};

    fn store() -> Arc<Store> {
        Arc::new(Store::with_config(StoreConfig {
            max_items: 100,
            default_ttl: Duration::from_secs(3600),
            ..StoreConfig::default()
        }))
    }

    fn node() -> (Arc<Store>, Arc<Cluster>) {
        let store = store();
        let cluster = testing::two_members(store.clone(), 100, 1 << 20);
        (store, cluster)
    }

    fn held(version: u64, tags: &[&str]) -> HeldCopy {
        HeldCopy {
            version,
            tags: tags.iter().map(|&t| t.to_owned()).collect(),
        }
    }

    fn answer(c: &Cluster, key: &str, held: Option<&HeldCopy>) -> String {
        let record = |item: &ItemRef<'_>| {
            let mut batch = RecordBatch::default();
            batch.push(item);
            batch.freeze()
        };
        match c.newer_than(key, "b", held, record) {
            Newer::Copy(record) => format!("copy {}", record.single().unwrap().meta().created_at),
            Newer::Deleted { at } => format!("deleted {at}"),
            Newer::Nothing => "nothing".into(),
        }
    }

    /// What a node answers a peer asking about its copy: its own copy only
    /// if newer (or the peer has none); that the key was deleted at a time
    /// if that came after the peer's copy (or the peer has none); that the
    /// peer's copy is dead if one of its tags was invalidated after it was
    /// written (at the copy's own version: a later write without the tag
    /// lives); otherwise nothing.
    #[test]
    fn a_peer_is_told_only_what_is_newer_than_its_copy() {
        let (store, c) = node();
        assert_eq!(answer(&c, "k", None), "nothing", "no copy here");
        store.set("k", b"1", &["red"], None, |_| ()).unwrap();
        let here = store.peek("k", |item| item.created_at()).unwrap();
        let newer = format!("copy {here}");
        assert_eq!(answer(&c, "k", None), newer, "the peer has none");
        assert_eq!(answer(&c, "k", Some(&held(here - 1, &[]))), newer);
        assert_eq!(
            answer(&c, "k", Some(&held(here, &[]))),
            "nothing",
            "the same"
        );
        assert_eq!(
            answer(&c, "k", Some(&held(here + 1, &[]))),
            "nothing",
            "older"
        );

        // Deleted here after the peer's copy was written, and not before.
        c.tombstones.deleted("gone", 100);
        assert_eq!(answer(&c, "gone", Some(&held(99, &[]))), "deleted 100");
        assert_eq!(answer(&c, "gone", Some(&held(100, &[]))), "deleted 100");
        assert_eq!(answer(&c, "gone", Some(&held(101, &[]))), "nothing");
        assert_eq!(answer(&c, "gone", None), "deleted 100", "the peer has none");
        // One of its tags invalidated after it was written.
        c.tombstones.invalidated("blue", 100);
        assert_eq!(
            answer(&c, "other", Some(&held(99, &["red", "blue"]))),
            "deleted 99"
        );
        assert_eq!(answer(&c, "other", Some(&held(99, &["red"]))), "nothing");
        assert_eq!(answer(&c, "other", Some(&held(101, &["blue"]))), "nothing");
    }

    /// What the asker missed here is told even once the item is gone from
    /// here and no tombstone says so: a missed write kills the asker's
    /// copies older than its version, a missed delete those at or before
    /// it, a missed invalidation of one of its copy's tags that copy. Only
    /// the asker's own hints count.
    #[test]
    fn what_the_asker_missed_is_told_from_the_hints() {
        let (store, c) = node();
        c.hints.write("b", "written", 100);
        c.hints.delete("b", "deleted", 100);
        c.hints.invalidate("b", "red", 100);
        assert_eq!(answer(&c, "written", Some(&held(50, &[]))), "deleted 99");
        assert_eq!(answer(&c, "written", Some(&held(100, &[]))), "nothing");
        assert_eq!(answer(&c, "written", None), "deleted 99");
        assert_eq!(answer(&c, "deleted", Some(&held(100, &[]))), "deleted 100");
        assert_eq!(answer(&c, "other", Some(&held(50, &["red"]))), "deleted 50");
        assert_eq!(answer(&c, "other", Some(&held(101, &["red"]))), "nothing");
        // A copy held here, not newer than the asker's: a later write (even
        // one stamped by a clock behind) replaced the hinted one.
        c.hints.write("b", "held", 100);
        store
            .set("held", b"1", &[] as &[String], None, |_| ())
            .unwrap();
        let here = store.peek("held", |item| item.created_at()).unwrap();
        assert_eq!(answer(&c, "held", Some(&held(here, &[]))), "nothing");
        c.hints.write("z", "only-z", 100);
        assert_eq!(
            answer(&c, "only-z", Some(&held(50, &[]))),
            "nothing",
            "another member's hint"
        );
    }

    /// One owner's answer in [`owners_answers_in_either_order_leave_the_newest_live_copy`]:
    /// a copy at a version, or a delete at a time (after this node's own
    /// copy, version 10).
    #[derive(Debug, Clone, Copy)]
    enum Told {
        Copy(u64),
        Deleted(u64),
    }

    /// Several owners' answers, applied in either order, leave the newest
    /// copy no delete made dead: a copy one owner has, deleted later
    /// through another, is gone; a copy written after a delete stays; an
    /// invalidation of the copy asked about (a delete at its version) does
    /// not remove a later one.
    #[test]
    fn owners_answers_in_either_order_leave_the_newest_live_copy() {
        use Told::{Copy, Deleted};
        let cases = [
            (vec![Copy(20), Deleted(25)], None),
            (vec![Copy(30), Deleted(25)], Some(30)),
            (vec![Copy(20), Deleted(10)], Some(20)),
            (vec![Copy(20), Copy(30)], Some(30)),
            (vec![Deleted(25)], None),
        ];
        for (answers, left) in cases {
            for reversed in [false, true] {
                let (store, c) = node();
                let now = store.now();
                let copy = |version| Newer::Copy(Version::at(now + version, b"\"v\"").records());
                c.absorb("k", copy(10));
                let mut order = answers.clone();
                if reversed {
                    order.reverse();
                }
                for told in order {
                    c.absorb(
                        "k",
                        match told {
                            Copy(version) => copy(version),
                            Deleted(at) => Newer::Deleted { at: now + at },
                        },
                    );
                }
                let kept = store.peek("k", |item| item.created_at() - now);
                assert_eq!(kept, left, "{answers:?}, reversed: {reversed}");
            }
        }
    }

    /// Members that refuse the connection add nothing and lose nothing: the
    /// copy stays as it was, and they are not asked again while they count
    /// as down (the next read does not wait for them).
    #[tokio::test]
    async fn owners_that_cannot_be_reached_leave_the_copy_as_it_is() {
        let (store, c) = node();
        store
            .set("k", b"1", &[] as &[String], None, |_| ())
            .unwrap();
        let before = store.peek("k", |item| item.created_at());
        c.reconcile("k").await;
        assert_eq!(store.peek("k", |item| item.created_at()), before);
        assert!(c.health.is_down("b"), "b refused the connection");
        let asked = || {
            c.metrics
                .peer_requests
                .with_label_values(&["reconcile"])
                .get()
        };
        assert_eq!(asked(), 1);
        c.reconcile("k").await;
        assert_eq!(asked(), 1, "b not asked again while down");
        assert_eq!(store.peek("k", |item| item.created_at()), before);
    }

    /// A key missing here while data moves (this node has not pulled its
    /// keys yet) may be on its way: every owner is asked, even one that
    /// failed to answer lately. A key held here, or a miss once the keys
    /// are pulled, passes over such an owner.
    #[tokio::test]
    async fn a_key_that_may_be_on_its_way_is_asked_of_every_owner() {
        let (store, c) = node();
        let asked = || {
            c.metrics
                .peer_requests
                .with_label_values(&["reconcile"])
                .get()
        };
        c.health.mark_down("b");
        c.reconcile("missing").await;
        assert_eq!(asked(), 1, "not pulled yet: b asked although down");
        store
            .set("k", b"1", &[] as &[String], None, |_| ())
            .unwrap();
        c.health.mark_down("b");
        c.reconcile("k").await;
        assert_eq!(asked(), 1, "held here: b passed over");
        c.progress.mark_pulled();
        c.reconcile("missing").await;
        assert_eq!(asked(), 1, "pulled, nothing moves: b passed over");
    }

    /// An owner that takes the connection and never answers holds a read of
    /// a key held here for [`RECONCILE_TIMEOUT`], not for the peer timeout
    /// (a minute), or for the peer timeout where that is shorter, and is
    /// then passed over.
    #[tokio::test]
    async fn a_silent_owner_holds_a_read_only_for_the_reconcile_timeout() {
        let (silent, _) = crate::peer::testing::fake_peer_for_each(|mut socket| async move {
            let mut sink = tokio::io::sink();
            let _ = tokio::io::copy(&mut socket, &mut sink).await;
        })
        .await;
        let peer_timeouts = [
            (
                Duration::from_secs(60),
                RECONCILE_TIMEOUT..Duration::from_secs(30),
            ),
            (
                Duration::from_millis(100),
                Duration::from_millis(100)..RECONCILE_TIMEOUT,
            ),
        ];
        for (peer_timeout, expected) in peer_timeouts {
            let mut doc =
                testing::membership(1, &[("a", MemberState::Active), ("b", MemberState::Active)]);
            doc.members[1].address = silent.to_string();
            let store = store();
            store
                .set("k", b"1", &[] as &[String], None, |_| ())
                .unwrap();
            let c = testing::node_a(store, 100, 1 << 20, peer_timeout, doc);
            let started = Instant::now();
            c.reconcile("k").await;
            let took = started.elapsed();
            assert!(
                expected.contains(&took),
                "peer timeout {peer_timeout:?}: took {took:?}"
            );
            assert!(c.health.is_down("b"), "timed out");
        }
    }
}
