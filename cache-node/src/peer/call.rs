//! Every peer operation as a [`Call`]: the request a node sends and the
//! answer it is due, made together by one constructor per operation.
//!
//! The pairing is made once, where the operation is defined, so a caller
//! cannot send one operation and read its answer as another's:
//! `Call::set(..)` is a `Call<(bool, Records)>`, and
//! [`crate::peer::PeerClient::ask`] (and the cluster's routing and retries,
//! which take a `Call`) return that `T`. The request stays the one typed
//! [`Request`] that the frame codec encodes.

use distrocache_membership::{MembershipDoc, NodeProgress};

use super::protocol::{
    Answer, Deletion, HeldCopy, LocalInvalidation, Newer, NodeStats, Records, ReplicateOutcome,
    Request, Source,
};
use crate::cluster::tombstones::TombstoneLog;
use crate::exec::Write;
use crate::store::UnixNanos;

/// A peer request and the answer it is due (`T`).
pub struct Call<T> {
    request: Request,
    /// Takes the answer the request is due, or gives back what came
    /// instead.
    expect: fn(Answer) -> Result<T, Answer>,
}

// By hand: the derive would ask `T: Clone`, and `T` is only what an answer
// becomes.
impl<T> Clone for Call<T> {
    fn clone(&self) -> Self {
        Self {
            request: self.request.clone(),
            expect: self.expect,
        }
    }
}

impl<T> std::fmt::Debug for Call<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Call").field(&self.request).finish()
    }
}

impl<T> Call<T> {
    /// What is sent.
    pub fn request(&self) -> &Request {
        &self.request
    }

    /// Reads `answer` as what the call is due, or gives it back when it is
    /// another (a refusal and a different epoch are the caller's to tell).
    pub fn read(&self, answer: Answer) -> Result<T, Answer> {
        (self.expect)(answer)
    }
}

impl Call<Option<Records>> {
    /// A client's read, forwarded to an owner: the item held, or `None`.
    pub fn get(key: String) -> Self {
        Self {
            request: Request::Get { key },
            expect: item,
        }
    }

    /// The copy of `key` a peer holds, untouched: the item, or `None`.
    pub fn fetch(key: String) -> Self {
        Self {
            request: Request::Fetch { key },
            expect: item,
        }
    }
}

impl Call<(bool, Records)> {
    /// A client's write, forwarded to its coordinator: whether the key was
    /// created, and the item as stored (see `Request::Set` for `keeper`).
    pub fn set(key: String, write: Write, keeper: Option<String>) -> Self {
        Self {
            request: Request::Set { key, write, keeper },
            expect: |a| match a {
                Answer::Item { created, record } => Ok((created, record)),
                other => Err(other),
            },
        }
    }
}

impl Call<bool> {
    /// A client's delete, forwarded to its coordinator: whether any owner
    /// held the key.
    pub fn delete(key: String) -> Self {
        Self {
            request: Request::Delete { key },
            expect: |a| match a {
                Answer::Deleted => Ok(true),
                Answer::Missing => Ok(false),
                other => Err(other),
            },
        }
    }

    /// Offers a peer a ring newer than its own: whether it adopted it.
    pub fn put_ring(doc: MembershipDoc) -> Self {
        Self {
            request: Request::PutRing { doc },
            expect: |a| match a {
                Answer::RingAdopted { adopted, .. } => Ok(adopted),
                other => Err(other),
            },
        }
    }

    /// Asks a member for a read lease for `node` (see `cluster::leases`):
    /// whether it granted it.
    pub fn lease(node: String) -> Self {
        Self {
            request: Request::Lease { node },
            expect: |a| match a {
                Answer::Lease { granted } => Ok(granted),
                other => Err(other),
            },
        }
    }
}

impl Call<ReplicateOutcome> {
    /// Items and deletes for a peer to apply: what it did with them.
    pub fn replicate(source: Source, items: Records, deletes: Vec<Deletion>) -> Self {
        Self {
            request: Request::Replicate {
                source,
                items,
                deletes,
            },
            expect: |a| match a {
                Answer::Replicated(outcome) => Ok(outcome),
                other => Err(other),
            },
        }
    }
}

impl Call<(Records, Option<u64>)> {
    /// A page of the items `node` owns that a peer holds, from `cursor` on:
    /// the page, and where to continue (`None`: done).
    pub fn pull(node: String, cursor: u64, limit: u32) -> Self {
        Self {
            request: Request::Pull {
                node,
                cursor,
                limit,
            },
            expect: |a| match a {
                Answer::Page { items, next } => Ok((items, next)),
                other => Err(other),
            },
        }
    }
}

impl Call<Newer> {
    /// Anything newer a peer knows of `key` than the copy `node` holds
    /// (see `Request::Newer`; an older peer is sent a `Fetch`, whose
    /// answers read the same way).
    pub fn newer(key: String, node: String, held: Option<HeldCopy>) -> Self {
        Self {
            request: Request::Newer { key, node, held },
            expect: |a| match a {
                Answer::Item { record, .. } => Ok(Newer::Copy(record)),
                Answer::DeletedAt { at } => Ok(Newer::Deleted { at }),
                Answer::Missing => Ok(Newer::Nothing),
                other => Err(other),
            },
        }
    }
}

impl Call<LocalInvalidation> {
    /// Removes the tag's items a peer holds: what it removed.
    pub fn invalidate_tag(tag: String) -> Self {
        Self {
            request: Request::InvalidateTag { tag },
            expect: |a| match a {
                Answer::Invalidated(local) => Ok(local),
                other => Err(other),
            },
        }
    }
}

impl Call<NodeProgress> {
    /// A peer's data-movement progress.
    pub fn progress() -> Self {
        Self {
            request: Request::Progress,
            expect: |a| match a {
                Answer::Progress(p) => Ok(*p),
                other => Err(other),
            },
        }
    }
}

impl Call<NodeStats> {
    /// A peer's own statistics.
    pub fn stats() -> Self {
        Self {
            request: Request::Stats,
            expect: |a| match a {
                Answer::Stats(s) => Ok(*s),
                other => Err(other),
            },
        }
    }
}

impl Call<MembershipDoc> {
    /// The ring a peer holds.
    pub fn ring() -> Self {
        Self {
            request: Request::GetRing,
            expect: |a| match a {
                Answer::Ring(doc) => Ok(*doc),
                other => Err(other),
            },
        }
    }
}

impl Call<Option<TombstoneLog>> {
    /// The deletes and tag invalidations a peer remembers from `since` on;
    /// `None` when that is more than it keeps.
    pub fn tombstones(since: UnixNanos) -> Self {
        Self {
            request: Request::Tombstones { since },
            expect: |a| match a {
                Answer::Tombstones(log) => Ok(log),
                other => Err(other),
            },
        }
    }
}

/// `Get`, `Fetch`.
fn item(a: Answer) -> Result<Option<Records>, Answer> {
    match a {
        Answer::Item { record, .. } => Ok(Some(record)),
        Answer::Missing => Ok(None),
        other => Err(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Records {
        let mut batch = crate::peer::protocol::RecordBatch::default();
        batch.push(&crate::store::StandInItem {
            key: "k".into(),
            value: b"1".to_vec(),
            tags: Vec::new(),
            meta: crate::store::ItemMeta {
                created_at: 1,
                accessed_at: 1,
                expires_at: 0,
                access_count: 0,
            },
        });
        batch.freeze()
    }

    /// Each call reads the answer it is due and gives back any other, so a
    /// peer that answers out of turn is told apart from one that answered.
    #[test]
    fn a_call_reads_its_own_answer_and_gives_back_another() {
        let record = record();
        let found = Answer::Item {
            created: true,
            record: record.clone(),
        };

        let get = Call::get("k".into());
        assert!(matches!(get.request(), Request::Get { key } if key == "k"));
        assert_eq!(get.read(Answer::Missing), Ok(None));
        assert_eq!(get.read(found.clone()), Ok(Some(record.clone())));
        assert_eq!(get.read(Answer::Deleted), Err(Answer::Deleted));

        let set = Call::set(
            "k".into(),
            crate::exec::Write {
                value: bytes::Bytes::from_static(b"1"),
                ttl: None,
                tags: Vec::new(),
            },
            Some("b".into()),
        );
        assert!(matches!(set.request(), Request::Set { keeper: Some(k), .. } if k == "b"));
        assert_eq!(set.read(found.clone()), Ok((true, record.clone())));
        assert_eq!(set.read(Answer::Missing), Err(Answer::Missing));

        let delete = Call::delete("k".into());
        assert_eq!(delete.read(Answer::Deleted), Ok(true));
        assert_eq!(delete.read(Answer::Missing), Ok(false));
        assert_eq!(delete.read(found.clone()), Err(found.clone()));

        let newer = Call::newer("k".into(), "a".into(), None);
        assert_eq!(newer.read(found.clone()), Ok(Newer::Copy(record)));
        assert_eq!(
            newer.read(Answer::DeletedAt { at: 7 }),
            Ok(Newer::Deleted { at: 7 })
        );
        assert_eq!(newer.read(Answer::Missing), Ok(Newer::Nothing));
        assert_eq!(newer.read(Answer::Deleted), Err(Answer::Deleted));

        let lease = Call::lease("a".into());
        assert_eq!(lease.read(Answer::Lease { granted: true }), Ok(true));
        assert_eq!(lease.read(found.clone()), Err(found));

        let progress = Call::progress();
        assert_eq!(progress.read(Answer::Missing), Err(Answer::Missing));
        assert!(matches!(progress.request(), Request::Progress));
    }
}
