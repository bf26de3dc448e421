//! Reads served from a copy that may be behind: before a node serves a read
//! from its own copy without holding a read lease, it asks the key's other
//! owners for anything newer.
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
//! previous) what they know that is newer than its copy, and applies it
//! before it reads: a newer copy is stored (the newest version wins), a
//! delete or tag invalidation made since its copy was written removes it.
//! An owner that recently failed to answer is not asked, and one that does
//! not answer adds nothing: then the node serves what it has (availability
//! over freshness, as when a key's primary cannot be reached).
//!
//! This costs a peer round trip per read while the node holds no lease: for
//! about half a second after a ring change settles, while data moves, and
//! while any member is down. A settled cluster with every member up serves
//! every read from the copy of the owner that receives it.

use futures_util::future::join_all;

use super::Cluster;
use super::metrics::PeerOp;
use crate::peer::protocol::{Deletion, HeldCopy, Newer, Records};
use crate::peer::{Request, expect};
use crate::store::ItemRef;

impl Cluster {
    /// Whether this node may serve reads from its own copies as they are:
    /// it holds read leases, so it holds every acknowledged write of every
    /// key it owns.
    pub fn serves_own_copies(&self) -> bool {
        self.holds_read_lease()
    }

    /// Brings this node's copy of `key` up to what its other reachable
    /// owners know (see the module's comment). Returns once every owner
    /// asked has answered or failed.
    pub async fn reconcile(&self, key: &str) {
        let Some(rings) = self.ring.rings() else {
            return;
        };
        let held = self.store.peek(key, |item| HeldCopy {
            version: item.created_at(),
            tags: item.tags().map(str::to_owned).collect(),
        });
        let owners: Vec<_> = self
            .replicas(&rings, key)
            .into_iter()
            .filter(|m| !self.health.is_down(&m.id))
            .collect();
        if owners.is_empty() {
            return;
        }
        let request = Request::Newer {
            key: key.to_owned(),
            held: held.clone(),
        };
        let asked = owners
            .iter()
            .map(|m| self.call(m, &request, None, expect::newer));
        for (member, answer) in owners.iter().zip(join_all(asked).await) {
            self.metrics.peer_call(PeerOp::Reconcile, answer.is_ok());
            match answer {
                Ok(Newer::Copy(record)) => {
                    self.health.mark_up(&member.id);
                    if let Ok(record) = record.single() {
                        self.apply_records(std::slice::from_ref(&record));
                    }
                }
                Ok(Newer::Deleted) => {
                    self.health.mark_up(&member.id);
                    if let Some(held) = &held {
                        // Whatever copy is at least as old as the one asked
                        // about is dead; a write made here since stays.
                        self.apply_deletes(&[Deletion {
                            key: key.to_owned(),
                            at: held.version,
                        }]);
                    }
                }
                Ok(Newer::Nothing) => self.health.mark_up(&member.id),
                Err(e) => {
                    if e.is_unavailable() {
                        self.health.mark_down(&member.id);
                    }
                    tracing::debug!(peer = %member.id, error = %e, "an owner could not say what it holds newer");
                }
            }
        }
    }

    /// What this node knows newer than a peer's copy `held` of `key` (the
    /// answer to its `Newer`): this node's copy if newer (`record` reads
    /// it), or that the peer's copy was deleted or invalidated since it was
    /// written.
    pub fn newer_than(
        &self,
        key: &str,
        held: Option<&HeldCopy>,
        record: impl FnOnce(&ItemRef<'_>) -> Records,
    ) -> Newer {
        let newer = self
            .store
            .peek(key, |item| {
                held.is_none_or(|h| item.created_at() > h.version)
                    .then(|| record(&item))
            })
            .flatten();
        match (newer, held) {
            (Some(copy), _) => Newer::Copy(copy),
            (None, Some(h)) if self.tombstones.buries(key, h.version, &h.tags) => Newer::Deleted,
            (None, _) => Newer::Nothing,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::cluster::testing;
    use crate::store::{ItemView, Store, StoreConfig};

    fn node() -> (Arc<Store>, Arc<Cluster>) {
        let store = Arc::new(Store::with_config(StoreConfig {
            max_items: 100,
            default_ttl: Duration::from_secs(3600),
            ..StoreConfig::default()
        }));
        let cluster = testing::two_members(store.clone(), 100, 1 << 20);
        (store, cluster)
    }

    fn held(version: u64, tags: &[&str]) -> HeldCopy {
        HeldCopy {
            version,
            tags: tags.iter().map(|&t| t.to_owned()).collect(),
        }
    }

    /// What a node answers a peer asking about its copy: its own copy only
    /// if newer (or the peer has none), that the peer's copy is dead if a
    /// delete or an invalidation of one of its tags came after it, and
    /// otherwise nothing.
    #[test]
    fn a_peer_is_told_only_what_is_newer_than_its_copy() {
        let (store, c) = node();
        let answer = |key: &str, held: Option<&HeldCopy>| match c.newer_than(key, held, |item| {
            let mut batch = crate::peer::protocol::RecordBatch::default();
            batch.push(item);
            batch.freeze()
        }) {
            Newer::Copy(record) => format!("copy {}", record.single().unwrap().meta().created_at),
            Newer::Deleted => "deleted".into(),
            Newer::Nothing => "nothing".into(),
        };
        assert_eq!(answer("k", None), "nothing", "no copy here");
        store.set("k", b"1", &["red"], None, |_| ()).unwrap();
        let here = store.peek("k", |item| item.created_at()).unwrap();
        assert_eq!(
            answer("k", None),
            format!("copy {here}"),
            "the peer has none"
        );
        assert_eq!(
            answer("k", Some(&held(here - 1, &[]))),
            format!("copy {here}")
        );
        assert_eq!(answer("k", Some(&held(here, &[]))), "nothing", "the same");
        assert_eq!(answer("k", Some(&held(here + 1, &[]))), "nothing", "older");

        // Deleted here after the peer's copy was written, and not before.
        c.tombstones.deleted("gone", 100);
        assert_eq!(answer("gone", Some(&held(99, &[]))), "deleted");
        assert_eq!(answer("gone", Some(&held(100, &[]))), "deleted");
        assert_eq!(answer("gone", Some(&held(101, &[]))), "nothing");
        assert_eq!(answer("gone", None), "nothing");
        // One of its tags invalidated after it was written.
        c.tombstones.invalidated("blue", 100);
        assert_eq!(
            answer("other", Some(&held(99, &["red", "blue"]))),
            "deleted"
        );
        assert_eq!(answer("other", Some(&held(99, &["red"]))), "nothing");
        assert_eq!(answer("other", Some(&held(101, &["blue"]))), "nothing");
    }

    /// Asking owners that cannot be reached adds nothing and loses nothing:
    /// the copy stays as it was, and the owner is not asked again while it
    /// counts as down (the next read does not wait for it).
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
}
