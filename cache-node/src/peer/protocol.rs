//! The peer protocol's messages: every operation one node asks of another,
//! and every answer, as plain types with a compact binary encoding.
//!
//! One module defines them for everyone who speaks the protocol: the node's
//! peer server and client, and the tests. The operations:
//!
//! | request | asked by | answer |
//! | --- | --- | --- |
//! | `Get`, `Set`, `Delete` | a node forwarding a client's request to the key's owner (a `Set` may name the sender as its *keeper*: see `Request::Set`) | `Item`, `Missing`, `Deleted`, `Refused` |
//! | `Replicate` | a coordinator (writes and deletes), the rebalancer (pushes), repair | `Replicated` |
//! | `Pull` | a node loading the keys it owns | `Page` |
//! | `Fetch` | the copies view | `Item`, `Missing` |
//! | `Newer` | a node that may have missed writes of a key, before it serves a read of it (see `cluster::reconcile`) | `Item`, `DeletedAt`, `Missing` |
//! | `InvalidateTag` | the node fanning out a tag invalidation | `Invalidated` |
//! | `Progress`, `Stats` | settling, the cluster views | `Progress`, `Stats` |
//! | `GetRing`, `PutRing` | nodes reconciling rings of different epochs | `Ring`, `RingAdopted` |
//! | `Lease` | a replica renewing its right to serve reads | `Lease` |
//! | `Tombstones` | a node restored from a snapshot, learning the deletes made while it was down | `Tombstones` |
//!
//! Any request may also be answered `Misdirected` (the two nodes hold
//! different rings; the frame's epoch is the answerer's) or `Refused` (an
//! error with the HTTP status it stands for, so a forwarded client request
//! gets the answer it would have got from the owner).
//!
//! Encoding: integers big-endian; strings and byte strings as a u32 length
//! and their bytes (strings must be UTF-8); lists as a u32 count and their
//! elements. Item records carry the value as the client's JSON text,
//! verbatim, so no value is re-encoded on its way between nodes. The rare,
//! small, structured answers (progress, stats, a ring) travel as the JSON
//! their types already have. A decoder refuses anything short, long, or not
//! UTF-8 where text is due, with an error, never a panic.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use distrocache_membership::{MembershipDoc, NodeProgress};
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use crate::cluster::tombstones::TombstoneLog;
use crate::exec::Write;
use crate::store::{ItemMeta, ItemView, UnixNanos};

/// What a request or an answer could not be read as.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed peer message: {0}")]
pub struct DecodeError(pub String);

fn malformed<T>(why: impl Into<String>) -> Result<T, DecodeError> {
    Err(DecodeError(why.into()))
}

/// Why a replicate request was sent; the receiver counts data movement
/// apart from everyday replication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A client's write or delete, from its coordinator.
    Write,
    /// A batch a node pushes when the ring changes.
    Rebalance,
    /// A hinted write or delete, or a resync, from the repair queue.
    Repair,
}

/// What a peer takes beyond the protocol's first version: the
/// `peer::FEATURES_HEADER` of its `101` answer (absent from nodes that
/// predate it), so nodes of different versions only send each other what
/// both read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    /// `Set` requests naming a keeper (`peer::FEATURE_SET_KEEPER`).
    pub set_keeper: bool,
    /// `Newer` requests (`peer::FEATURE_NEWER`).
    pub newer: bool,
}

/// The version (its coordinator's write time) and tags of the copy of a key
/// a node holds: what it asks its peers to compare with (`Request::Newer`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldCopy {
    pub version: UnixNanos,
    pub tags: Vec<String>,
}

/// What a peer knows newer than a copy: the answer to `Request::Newer`.
#[derive(Debug, Clone, PartialEq)]
pub enum Newer {
    /// The peer's copy, newer than the one asked about (or the only one).
    Copy(Records),
    /// Every copy of the key written at or before `at` is dead: the copy
    /// asked about was deleted or one of its tags invalidated since it was
    /// written, or (none asked about) the key was deleted at `at`.
    Deleted { at: UnixNanos },
    /// Nothing newer.
    Nothing,
}

/// A delete to apply on another owner: remove the key unless it was written
/// after `at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deletion {
    pub key: String,
    pub at: UnixNanos,
}

/// What a replica did with a replicate request.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicateOutcome {
    /// Items written.
    pub applied: u64,
    /// Of those, items that replaced a copy already held.
    pub replaced: u64,
    /// Items not written because a newer version is held, they expired, they
    /// were deleted after being read, or the receiver does not own them.
    pub stale: u64,
    /// Items refused (over a limit, or too large for the receiver's budget).
    pub refused: u64,
    /// Deletes that removed an item.
    pub deleted: u64,
}

impl std::ops::AddAssign for ReplicateOutcome {
    fn add_assign(&mut self, o: Self) {
        self.applied += o.applied;
        self.replaced += o.replaced;
        self.stale += o.stale;
        self.refused += o.refused;
        self.deleted += o.deleted;
    }
}

/// The local part of a tag invalidation, as one member answers it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalInvalidation {
    /// Items this node removed (replicas included).
    pub removed: u64,
    /// Of those, the keys this node is the primary of: summed over the
    /// members, the number of distinct items invalidated.
    pub primary: u64,
}

/// A node's counters, as `/api/v1/stats` shows them (the seed's shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStats {
    pub node_id: String,
    pub hits: u64,
    pub misses: u64,
    pub sets: u64,
    pub deletes: u64,
    pub evictions: u64,
    pub expirations: u64,
    pub tag_invalidations: u64,
    pub items: u64,
    pub bytes: u64,
    pub hit_ratio: f64,
    /// The item cap (the seed's `MaxSize`).
    pub capacity: u64,
    /// The byte cap; 0 means none.
    pub max_memory: u64,
    pub uptime_seconds: f64,
    pub uptime: String,
}

/// Encoded item records, back to back: built by a node from its store
/// ([`RecordBatch`]), carried as bytes, read back as [`RecordRef`]s.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Records {
    count: u32,
    bytes: Bytes,
}

impl Records {
    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Encoded size in bytes.
    pub fn size(&self) -> usize {
        self.bytes.len()
    }

    /// Every record, each checked; the first malformed one fails them all,
    /// so a receiver never applies half of a bad batch. Inline for one
    /// record, what a write replicates and a forwarded write's answer holds.
    pub fn decode(&self) -> Result<DecodedRecords<'_>, DecodeError> {
        self.check_count()?;
        let mut out = DecodedRecords::with_capacity(self.len());
        self.read_each(|record| out.push(record))?;
        Ok(out)
    }

    /// Refuses a count the bytes cannot hold, before anything is allocated
    /// for it (the fuzzer sent a count of billions in a 100-byte frame).
    fn check_count(&self) -> Result<(), DecodeError> {
        if self.len() > self.bytes.len() / MIN_RECORD_BYTES {
            return malformed(format!(
                "{} records in {} bytes",
                self.count,
                self.bytes.len()
            ));
        }
        Ok(())
    }

    /// Reads every record, handing each to `each`, and checks that the
    /// bytes hold exactly `count` of them.
    fn read_each<'a>(&'a self, mut each: impl FnMut(RecordRef<'a>)) -> Result<(), DecodeError> {
        self.check_count()?;
        let mut reader = Reader::new(&self.bytes);
        for _ in 0..self.count {
            each(RecordRef::read(&mut reader)?);
        }
        reader.finish()
    }

    /// Records encoded elsewhere (a snapshot's block), checked whole.
    pub fn from_encoded(count: u32, bytes: Bytes) -> Result<Self, DecodeError> {
        let records = Self { count, bytes };
        records.read_each(|_| {})?;
        Ok(records)
    }

    /// The records' encoding, without their count.
    pub fn encoded(&self) -> &Bytes {
        &self.bytes
    }

    /// The only record of a one-record answer.
    pub fn single(&self) -> Result<RecordRef<'_>, DecodeError> {
        if self.count != 1 {
            return malformed(format!("{} records where one was due", self.count));
        }
        let mut reader = Reader::new(&self.bytes);
        let record = RecordRef::read(&mut reader)?;
        reader.finish()?;
        Ok(record)
    }
}

/// Decoded records, borrowed from their bytes.
pub type DecodedRecords<'a> = SmallVec<[RecordRef<'a>; 1]>;

/// Records being encoded, from store items or from records received.
#[derive(Debug, Default)]
pub struct RecordBatch {
    count: u32,
    buf: BytesMut,
}

impl RecordBatch {
    pub fn push(&mut self, item: &impl ItemView) {
        write_record(&mut self.buf, item);
        self.count += 1;
    }

    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Encoded size so far, in bytes.
    pub fn size(&self) -> usize {
        self.buf.len()
    }

    pub fn freeze(self) -> Records {
        Records {
            count: self.count,
            bytes: self.buf.freeze(),
        }
    }
}

/// An item with everything needed to recreate it on another node, borrowed
/// from the bytes it arrived in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordRef<'a> {
    key: &'a str,
    value: &'a [u8],
    /// Inline for up to two: a record is decoded on every replicated or
    /// forwarded write, and most items have a tag or two.
    tags: SmallVec<[&'a str; 2]>,
    meta: ItemMeta,
}

/// The smallest encoded record: empty key and value (a length each), no
/// tags (a count) and the four timestamps and counters of [`ItemMeta`].
const MIN_RECORD_BYTES: usize = 4 + 4 + 4 + 4 * 8;

impl<'a> RecordRef<'a> {
    fn read(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        let key = r.str()?;
        let value = r.bytes()?;
        let count = r.u32()? as usize;
        // A count the bytes cannot hold is refused before allocating for it.
        if count > r.remaining() / 4 {
            return malformed(format!("{count} tags in {} bytes", r.remaining()));
        }
        let mut tags = SmallVec::with_capacity(count);
        for _ in 0..count {
            tags.push(r.str()?);
        }
        let meta = ItemMeta {
            created_at: r.u64()?,
            accessed_at: r.u64()?,
            expires_at: r.u64()?,
            access_count: r.u64()?,
        };
        Ok(Self {
            key,
            value,
            tags,
            meta,
        })
    }

    pub fn tag_list(&self) -> &[&'a str] {
        &self.tags
    }
}

impl ItemView for RecordRef<'_> {
    fn key(&self) -> &str {
        self.key
    }

    fn value(&self) -> &[u8] {
        self.value
    }

    fn meta(&self) -> ItemMeta {
        self.meta
    }

    fn tags(&self) -> impl Iterator<Item = &str> {
        self.tags.iter().copied()
    }
}

fn write_record(out: &mut BytesMut, item: &impl ItemView) {
    // Room for the whole record at once: grown piece by piece, a record
    // took three allocations (key, value, the rest), the top allocation site
    // of a cluster SET in perf.
    let tags: usize = item.tags().map(|t| 4 + t.len()).sum();
    out.reserve(4 + item.key().len() + 4 + item.value().len() + 4 + tags + 4 * 8);
    put_str(out, item.key());
    put_bytes(out, item.value());
    let count_at = out.len();
    out.put_u32(0);
    let mut count = 0u32;
    for tag in item.tags() {
        put_str(out, tag);
        count += 1;
    }
    out[count_at..count_at + 4].copy_from_slice(&count.to_be_bytes());
    let meta = item.meta();
    out.put_u64(meta.created_at);
    out.put_u64(meta.accessed_at);
    out.put_u64(meta.expires_at);
    out.put_u64(meta.access_count);
}

/// Everything one node asks of another.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// A client's read, forwarded to an owner that serves it.
    Get {
        key: String,
    },
    /// A client's write, forwarded to the key's coordinator. `keeper`: the
    /// sender, itself an owner of the key, stores the written record from
    /// the answer before it answers its client, so the coordinator does not
    /// replicate to it (one exchange between the two instead of two). Sent
    /// only to peers that said they take it (see `peer::FEATURES_HEADER`).
    Set {
        key: String,
        write: Write,
        keeper: Option<String>,
    },
    /// A client's delete, forwarded to the key's coordinator.
    Delete {
        key: String,
    },
    /// Items and deletes to apply here.
    Replicate {
        source: Source,
        items: Records,
        deletes: Vec<Deletion>,
    },
    /// "Send me the items I own under our ring", from `cursor` on.
    Pull {
        node: String,
        cursor: u64,
        limit: u32,
    },
    /// The copy of `key` held here, without touching it.
    Fetch {
        key: String,
    },
    /// Anything newer known here than the copy of `key` that `node` (the
    /// sender) holds (`held`: its version and tags; `None`: it holds none):
    /// the copy held here if that is newer (`Item`), or that the sender's
    /// copy was deleted or invalidated since it was written, or the key
    /// deleted, or a write of it missed (`DeletedAt`); otherwise `Missing`.
    /// Sent only to peers that said they take it (see
    /// `peer::FEATURE_NEWER`); others are sent a `Fetch`.
    Newer {
        key: String,
        node: String,
        held: Option<HeldCopy>,
    },
    /// Remove the tag's items held here.
    InvalidateTag {
        tag: String,
    },
    Progress,
    Stats,
    GetRing,
    /// A ring newer than the one the receiver holds.
    PutRing {
        doc: MembershipDoc,
    },
    /// May `node` (the sender) serve reads of the keys it owns (see
    /// `cluster::leases`)?
    Lease {
        node: String,
    },
    /// The deletes and tag invalidations remembered here from `since` on.
    Tombstones {
        since: UnixNanos,
    },
}

/// Every answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// An item held (a read or fetch), or just written (`created`: it was
    /// absent before the write).
    Item {
        created: bool,
        record: Records,
    },
    /// Not held (a read, fetch or delete).
    Missing,
    Deleted,
    Replicated(ReplicateOutcome),
    /// A page of a pull; `next` is `None` once the whole store was scanned.
    Page {
        items: Records,
        next: Option<u64>,
    },
    Invalidated(LocalInvalidation),
    Progress(Box<NodeProgress>),
    Stats(Box<NodeStats>),
    Ring(Box<MembershipDoc>),
    RingAdopted {
        epoch: u64,
        adopted: bool,
    },
    Lease {
        granted: bool,
    },
    /// What is remembered, or `None` when it is more than one answer holds.
    Tombstones(Option<TombstoneLog>),
    /// To a `Newer`: the copy asked about is dead, and so is any copy of the
    /// key written at or before `at` (a delete's time, or the copy's own
    /// version when one of its tags was invalidated).
    DeletedAt {
        at: UnixNanos,
    },
    /// The request was refused or failed, with the HTTP status it stands for.
    Refused {
        status: u16,
        message: String,
    },
    /// The sender's ring epoch differs from the answerer's (the frame says
    /// which the answerer holds); nothing was done.
    Misdirected,
}

impl Answer {
    pub fn refused(status: u16, message: impl Into<String>) -> Self {
        Answer::Refused {
            status,
            message: message.into(),
        }
    }
}

// Frame kinds. Requests below 128, answers from 128.
const GET: u8 = 1;
const SET: u8 = 2;
const DELETE: u8 = 3;
const REPLICATE: u8 = 4;
const PULL: u8 = 5;
const FETCH: u8 = 6;
const INVALIDATE_TAG: u8 = 7;
const PROGRESS: u8 = 8;
const STATS: u8 = 9;
const GET_RING: u8 = 10;
const PUT_RING: u8 = 11;
const LEASE: u8 = 12;
const TOMBSTONES: u8 = 13;
/// `Set` with a keeper: a kind of its own, so a node that predates keepers
/// refuses it rather than reading it as a plain `Set`.
const SET_KEPT: u8 = 14;
const NEWER: u8 = 15;

const A_ITEM: u8 = 128;
const A_MISSING: u8 = 129;
const A_DELETED: u8 = 130;
const A_REPLICATED: u8 = 131;
const A_PAGE: u8 = 132;
const A_INVALIDATED: u8 = 133;
const A_PROGRESS: u8 = 134;
const A_STATS: u8 = 135;
const A_RING: u8 = 136;
const A_RING_ADOPTED: u8 = 137;
const A_LEASE: u8 = 138;
const A_REFUSED: u8 = 139;
const A_MISDIRECTED: u8 = 140;
const A_TOMBSTONES: u8 = 141;
const A_DELETED_AT: u8 = 142;

impl Request {
    /// Whether the receiver must hold the sender's ring epoch to act on it:
    /// everything that relies on who owns what. Reading a copy, progress,
    /// stats and the ring itself do not.
    pub fn needs_same_epoch(&self) -> bool {
        matches!(
            self,
            Request::Get { .. }
                | Request::Set { .. }
                | Request::Delete { .. }
                | Request::Replicate { .. }
                | Request::Pull { .. }
                | Request::InvalidateTag { .. }
                | Request::Lease { .. }
        )
    }

    /// This request as a peer that takes only `features` must get it.
    /// `None`: as it is.
    /// - A `Set` naming a keeper, to a peer that predates keepers: without
    ///   its keeper. The coordinator then replicates to it like any other
    ///   owner (the keeper's own apply of the answer finds that version held
    ///   and changes nothing).
    /// - `Newer`, to a peer that predates it: a `Fetch`, whose answer
    ///   (`Item`, `Missing`) is one `Newer` may get. An older copy fetched is
    ///   not applied over a newer one; a delete is not learned.
    pub(super) fn downgraded_for(&self, features: Features) -> Option<Request> {
        match self {
            Request::Set {
                key,
                write,
                keeper: Some(_),
            } if !features.set_keeper => Some(Request::Set {
                key: key.clone(),
                write: write.clone(),
                keeper: None,
            }),
            Request::Newer { key, .. } if !features.newer => {
                Some(Request::Fetch { key: key.clone() })
            }
            _ => None,
        }
    }

    /// Whether a receiver may have changed data acting on this request, so
    /// that a lost answer leaves its outcome unknown.
    pub fn writes(&self) -> bool {
        matches!(
            self,
            Request::Set { .. }
                | Request::Delete { .. }
                | Request::Replicate { .. }
                | Request::InvalidateTag { .. }
                | Request::PutRing { .. }
        )
    }

    /// A short name, for metrics and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Get { .. } => "get",
            Request::Set { .. } => "set",
            Request::Delete { .. } => "delete",
            Request::Replicate { .. } => "replicate",
            Request::Pull { .. } => "pull",
            Request::Fetch { .. } => "fetch",
            Request::Newer { .. } => "newer",
            Request::InvalidateTag { .. } => "invalidate_tag",
            Request::Progress => "progress",
            Request::Stats => "stats",
            Request::GetRing => "get_ring",
            Request::PutRing { .. } => "put_ring",
            Request::Lease { .. } => "lease",
            Request::Tombstones { .. } => "tombstones",
        }
    }

    /// The frame kind, and the body appended to `out`.
    pub fn encode(&self, out: &mut BytesMut) -> u8 {
        match self {
            Request::Get { key } => {
                put_str(out, key);
                GET
            }
            Request::Set { key, write, keeper } => {
                put_str(out, key);
                put_bytes(out, &write.value);
                out.put_u64(write.ttl.map_or(0, |t| t.as_secs()));
                put_strs(out, &write.tags);
                match keeper {
                    None => SET,
                    Some(keeper) => {
                        put_str(out, keeper);
                        SET_KEPT
                    }
                }
            }
            Request::Delete { key } => {
                put_str(out, key);
                DELETE
            }
            Request::Replicate {
                source,
                items,
                deletes,
            } => {
                out.put_u8(match source {
                    Source::Write => 0,
                    Source::Rebalance => 1,
                    Source::Repair => 2,
                });
                put_records(out, items);
                out.put_u32(len_u32(deletes.len()));
                for d in deletes {
                    put_str(out, &d.key);
                    out.put_u64(d.at);
                }
                REPLICATE
            }
            Request::Pull {
                node,
                cursor,
                limit,
            } => {
                put_str(out, node);
                out.put_u64(*cursor);
                out.put_u32(*limit);
                PULL
            }
            Request::Fetch { key } => {
                put_str(out, key);
                FETCH
            }
            Request::Newer { key, node, held } => {
                put_str(out, key);
                put_str(out, node);
                match held {
                    None => out.put_u8(0),
                    Some(held) => {
                        out.put_u8(1);
                        out.put_u64(held.version);
                        put_strs(out, &held.tags);
                    }
                }
                NEWER
            }
            Request::InvalidateTag { tag } => {
                put_str(out, tag);
                INVALIDATE_TAG
            }
            Request::Progress => PROGRESS,
            Request::Stats => STATS,
            Request::GetRing => GET_RING,
            Request::PutRing { doc } => {
                put_json(out, doc);
                PUT_RING
            }
            Request::Lease { node } => {
                put_str(out, node);
                LEASE
            }
            Request::Tombstones { since } => {
                out.put_u64(*since);
                TOMBSTONES
            }
        }
    }

    pub fn decode(kind: u8, body: &Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let request = match kind {
            GET => Request::Get { key: r.string()? },
            SET | SET_KEPT => {
                let key = r.string()?;
                let value = r.bytes_of(body)?;
                let ttl = match r.u64()? {
                    0 => None,
                    secs => Some(Duration::from_secs(secs)),
                };
                let tags = r.strings()?;
                let keeper = match kind {
                    SET_KEPT => Some(r.string()?),
                    _ => None,
                };
                Request::Set {
                    key,
                    write: Write { value, ttl, tags },
                    keeper,
                }
            }
            DELETE => Request::Delete { key: r.string()? },
            REPLICATE => {
                let source = match r.u8()? {
                    0 => Source::Write,
                    1 => Source::Rebalance,
                    2 => Source::Repair,
                    n => return malformed(format!("unknown replicate source {n}")),
                };
                let items = r.records(body)?;
                let count = r.u32()? as usize;
                if count > r.remaining() / 12 {
                    return malformed(format!("{count} deletes in {} bytes", r.remaining()));
                }
                let mut deletes = Vec::with_capacity(count);
                for _ in 0..count {
                    deletes.push(Deletion {
                        key: r.string()?,
                        at: r.u64()?,
                    });
                }
                Request::Replicate {
                    source,
                    items,
                    deletes,
                }
            }
            PULL => Request::Pull {
                node: r.string()?,
                cursor: r.u64()?,
                limit: r.u32()?,
            },
            FETCH => Request::Fetch { key: r.string()? },
            NEWER => {
                let key = r.string()?;
                let node = r.string()?;
                let held = match r.u8()? {
                    0 => None,
                    1 => Some(HeldCopy {
                        version: r.u64()?,
                        tags: r.strings()?,
                    }),
                    n => return malformed(format!("unknown held-copy flag {n}")),
                };
                Request::Newer { key, node, held }
            }
            INVALIDATE_TAG => Request::InvalidateTag { tag: r.string()? },
            PROGRESS => Request::Progress,
            STATS => Request::Stats,
            GET_RING => Request::GetRing,
            PUT_RING => {
                let json = r.bytes()?;
                let doc = MembershipDoc::from_json(json)
                    .map_err(|e| DecodeError(format!("ring document: {e}")))?;
                Request::PutRing { doc }
            }
            LEASE => Request::Lease { node: r.string()? },
            TOMBSTONES => Request::Tombstones { since: r.u64()? },
            other => return malformed(format!("unknown request kind {other}")),
        };
        r.finish()?;
        Ok(request)
    }
}

impl Answer {
    /// The frame kind, and the body appended to `out`.
    pub fn encode(&self, out: &mut BytesMut) -> u8 {
        match self {
            Answer::Item { created, record } => {
                out.put_u8(u8::from(*created));
                put_records(out, record);
                A_ITEM
            }
            Answer::Missing => A_MISSING,
            Answer::Deleted => A_DELETED,
            Answer::DeletedAt { at } => {
                out.put_u64(*at);
                A_DELETED_AT
            }
            Answer::Replicated(o) => {
                for n in [o.applied, o.replaced, o.stale, o.refused, o.deleted] {
                    out.put_u64(n);
                }
                A_REPLICATED
            }
            Answer::Page { items, next } => {
                put_records(out, items);
                match next {
                    Some(n) => {
                        out.put_u8(1);
                        out.put_u64(*n);
                    }
                    None => out.put_u8(0),
                }
                A_PAGE
            }
            Answer::Invalidated(i) => {
                out.put_u64(i.removed);
                out.put_u64(i.primary);
                A_INVALIDATED
            }
            Answer::Progress(p) => {
                put_json(out, p);
                A_PROGRESS
            }
            Answer::Stats(s) => {
                put_json(out, s);
                A_STATS
            }
            Answer::Ring(doc) => {
                put_json(out, doc);
                A_RING
            }
            Answer::RingAdopted { epoch, adopted } => {
                out.put_u64(*epoch);
                out.put_u8(u8::from(*adopted));
                A_RING_ADOPTED
            }
            Answer::Lease { granted } => {
                out.put_u8(u8::from(*granted));
                A_LEASE
            }
            Answer::Refused { status, message } => {
                out.put_u16(*status);
                put_str(out, message);
                A_REFUSED
            }
            Answer::Misdirected => A_MISDIRECTED,
            Answer::Tombstones(log) => {
                match log {
                    Some(log) => {
                        out.put_u8(1);
                        put_tombstone_log(out, log);
                    }
                    None => out.put_u8(0),
                }
                A_TOMBSTONES
            }
        }
    }

    pub fn decode(kind: u8, body: &Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let answer = match kind {
            A_ITEM => Answer::Item {
                created: r.flag()?,
                record: r.records(body)?,
            },
            A_MISSING => Answer::Missing,
            A_DELETED => Answer::Deleted,
            A_REPLICATED => Answer::Replicated(ReplicateOutcome {
                applied: r.u64()?,
                replaced: r.u64()?,
                stale: r.u64()?,
                refused: r.u64()?,
                deleted: r.u64()?,
            }),
            A_PAGE => Answer::Page {
                items: r.records(body)?,
                next: if r.flag()? { Some(r.u64()?) } else { None },
            },
            A_INVALIDATED => Answer::Invalidated(LocalInvalidation {
                removed: r.u64()?,
                primary: r.u64()?,
            }),
            A_PROGRESS => Answer::Progress(Box::new(r.json()?)),
            A_STATS => Answer::Stats(Box::new(r.json()?)),
            A_RING => {
                let json = r.bytes()?;
                let doc = MembershipDoc::from_json(json)
                    .map_err(|e| DecodeError(format!("ring document: {e}")))?;
                Answer::Ring(Box::new(doc))
            }
            A_RING_ADOPTED => Answer::RingAdopted {
                epoch: r.u64()?,
                adopted: r.flag()?,
            },
            A_LEASE => Answer::Lease { granted: r.flag()? },
            A_REFUSED => Answer::Refused {
                status: r.u16()?,
                message: r.string()?,
            },
            A_MISDIRECTED => Answer::Misdirected,
            A_DELETED_AT => Answer::DeletedAt { at: r.u64()? },
            A_TOMBSTONES => Answer::Tombstones(if r.flag()? {
                Some(read_tombstone_log(&mut r)?)
            } else {
                None
            }),
            other => return malformed(format!("unknown answer kind {other}")),
        };
        r.finish()?;
        Ok(answer)
    }
}

fn len_u32(n: usize) -> u32 {
    u32::try_from(n).expect("peer messages are bounded far below 4 GiB")
}

fn put_bytes(out: &mut BytesMut, b: &[u8]) {
    out.put_u32(len_u32(b.len()));
    out.put_slice(b);
}

fn put_str(out: &mut BytesMut, s: &str) {
    put_bytes(out, s.as_bytes());
}

fn put_strs(out: &mut BytesMut, list: &[String]) {
    out.put_u32(len_u32(list.len()));
    for s in list {
        put_str(out, s);
    }
}

/// A tombstone log: `forgotten_before`, then the deletes and the tags, each
/// a list of (name, time). Shared by the peer answer and the snapshot file.
pub fn put_tombstone_log(out: &mut BytesMut, log: &TombstoneLog) {
    out.put_u64(log.forgotten_before);
    for list in [&log.deletes, &log.tags] {
        out.put_u32(len_u32(list.len()));
        for (name, at) in list {
            put_str(out, name);
            out.put_u64(*at);
        }
    }
}

/// Reads a whole body holding one tombstone log (see [`put_tombstone_log`]).
pub fn decode_tombstone_log(body: &[u8]) -> Result<TombstoneLog, DecodeError> {
    let mut r = Reader::new(body);
    let log = read_tombstone_log(&mut r)?;
    r.finish()?;
    Ok(log)
}

fn read_tombstone_log(r: &mut Reader<'_>) -> Result<TombstoneLog, DecodeError> {
    let forgotten_before = r.u64()?;
    let mut lists = [Vec::new(), Vec::new()];
    for list in &mut lists {
        let count = r.u32()? as usize;
        if count > r.remaining() / 12 {
            return malformed(format!("{count} tombstones in {} bytes", r.remaining()));
        }
        list.reserve(count);
        for _ in 0..count {
            list.push((r.string()?, r.u64()?));
        }
    }
    let [deletes, tags] = lists;
    Ok(TombstoneLog {
        forgotten_before,
        deletes,
        tags,
    })
}

fn put_records(out: &mut BytesMut, records: &Records) {
    out.put_u32(records.count);
    out.put_u32(len_u32(records.bytes.len()));
    out.put_slice(&records.bytes);
}

fn put_json(out: &mut BytesMut, value: &impl Serialize) {
    let json = serde_json::to_vec(value).expect("protocol types always serialise");
    put_bytes(out, &json);
}

/// Reads the fields of one message, refusing it at the first one that does
/// not fit.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, at: 0 }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.at
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.remaining() {
            return malformed(format!(
                "{n} bytes wanted at offset {}, {} left",
                self.at,
                self.remaining()
            ));
        }
        let slice = &self.buf[self.at..self.at + n];
        self.at += n;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn flag(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            n => malformed(format!("{n} where a flag (0 or 1) was due")),
        }
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    /// Like `bytes`, as a slice of `whole` (the buffer this reader reads),
    /// so it is kept without a copy.
    fn bytes_of(&mut self, whole: &Bytes) -> Result<Bytes, DecodeError> {
        let n = self.u32()? as usize;
        let start = self.at;
        self.take(n)?;
        Ok(whole.slice(start..start + n))
    }

    fn str(&mut self) -> Result<&'a str, DecodeError> {
        let b = self.bytes()?;
        std::str::from_utf8(b).map_err(|e| DecodeError(format!("text is not UTF-8: {e}")))
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        self.str().map(str::to_owned)
    }

    fn strings(&mut self) -> Result<Vec<String>, DecodeError> {
        let n = self.u32()? as usize;
        if n > self.remaining() / 4 {
            return malformed(format!("{n} strings in {} bytes", self.remaining()));
        }
        (0..n).map(|_| self.string()).collect()
    }

    fn records(&mut self, whole: &Bytes) -> Result<Records, DecodeError> {
        let count = self.u32()?;
        let bytes = self.bytes_of(whole)?;
        let records = Records { count, bytes };
        // Checked here, so every `Records` a node holds decodes.
        records.read_each(|_| {})?;
        Ok(records)
    }

    fn json<T: serde::de::DeserializeOwned>(&mut self) -> Result<T, DecodeError> {
        let b = self.bytes()?;
        serde_json::from_slice(b).map_err(|e| DecodeError(format!("JSON field: {e}")))
    }

    fn finish(&self) -> Result<(), DecodeError> {
        if self.remaining() != 0 {
            return malformed(format!("{} bytes after the message", self.remaining()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use crate::store::StandInItem as Item;

    fn item() -> impl Strategy<Value = Item> {
        (
            ".{0,20}",
            proptest::collection::vec(any::<u8>(), 0..64),
            proptest::collection::vec(".{0,8}", 0..4),
            any::<[u64; 4]>(),
        )
            .prop_map(|(key, value, tags, m)| Item {
                key,
                value,
                tags,
                meta: ItemMeta {
                    created_at: m[0],
                    accessed_at: m[1],
                    expires_at: m[2],
                    access_count: m[3],
                },
            })
    }

    fn records(items: &[Item]) -> Records {
        let mut batch = RecordBatch::default();
        for i in items {
            batch.push(i);
        }
        batch.freeze()
    }

    fn round_trip_request(request: &Request) -> Request {
        let mut out = BytesMut::new();
        let kind = request.encode(&mut out);
        Request::decode(kind, &out.freeze()).unwrap()
    }

    fn round_trip_answer(answer: &Answer) -> Answer {
        let mut out = BytesMut::new();
        let kind = answer.encode(&mut out);
        Answer::decode(kind, &out.freeze()).unwrap()
    }

    /// Found by the `peer_frame` fuzz target: a record count of billions
    /// in a frame of a hundred bytes made the decoder reserve memory for
    /// them first (an abort on allocation failure). Such a count is refused
    /// before anything is allocated.
    #[test]
    fn a_record_count_the_bytes_cannot_hold_is_refused_before_allocating() {
        let err = Records::from_encoded(u32::MAX, Bytes::from_static(&[0u8; 100]))
            .expect_err("four billion records in 100 bytes");
        assert!(err.to_string().contains("records in 100 bytes"), "{err}");
        // As many as the bytes could hold still decode (or fail) by content.
        assert!(Records::from_encoded(0, Bytes::new()).is_ok());
    }

    /// Kinds whose body is JSON (status and ring documents): read by
    /// serde, which skips fields it does not know (a newer node's), so two
    /// encodings may read as one message.
    const JSON_KINDS: [u8; 4] = [PUT_RING, A_PROGRESS, A_STATS, A_RING];

    /// If `body` reads as a request or an answer under `kind`, that
    /// message's own encoding has the same kind and reads as the same
    /// message; for a binary kind it is exactly `body`, so nothing a peer
    /// sends is read as something else.
    fn read_exactly(kind: u8, body: &Bytes) -> Result<(), TestCaseError> {
        fn check<M: PartialEq + std::fmt::Debug>(
            kind: u8,
            body: &Bytes,
            message: M,
            encode: impl Fn(&M, &mut BytesMut) -> u8,
            decode: impl Fn(u8, &Bytes) -> Result<M, DecodeError>,
        ) -> Result<(), TestCaseError> {
            let mut out = BytesMut::new();
            prop_assert_eq!(encode(&message, &mut out), kind);
            let out = out.freeze();
            if !JSON_KINDS.contains(&kind) {
                prop_assert_eq!(&out[..], &body[..], "{:?}", message);
            }
            prop_assert_eq!(decode(kind, &out).expect("its own encoding"), message);
            Ok(())
        }
        if let Ok(request) = Request::decode(kind, body) {
            check(kind, body, request, Request::encode, Request::decode)?;
        }
        if let Ok(answer) = Answer::decode(kind, body) {
            check(kind, body, answer, Answer::encode, Answer::decode)?;
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn records_round_trip(items in proptest::collection::vec(item(), 0..8)) {
            let encoded = records(&items);
            {
                let decoded = encoded.decode().unwrap();
                prop_assert_eq!(decoded.len(), items.len());
                for (d, i) in decoded.iter().zip(&items) {
                    prop_assert_eq!(d.key(), i.key.as_str());
                    prop_assert_eq!(d.value(), &i.value[..]);
                    prop_assert_eq!(d.tags().collect::<Vec<_>>(), i.tags.iter().map(String::as_str).collect::<Vec<_>>());
                    prop_assert_eq!(d.meta(), i.meta);
                }
            }
            let request = Request::Replicate { source: Source::Repair, items: encoded.clone(), deletes: vec![Deletion { key: "gone".into(), at: 9 }] };
            prop_assert_eq!(round_trip_request(&request), request);
            let page = Answer::Page { items: encoded, next: Some(3) };
            prop_assert_eq!(round_trip_answer(&page), page);
        }

        #[test]
        fn writes_round_trip(key in ".{0,30}", value in proptest::collection::vec(any::<u8>(), 0..100),
                             ttl in proptest::option::of(1u64..u64::MAX), tags in proptest::collection::vec(".{0,10}", 0..5)) {
            let write = Write { value: value.into(), ttl: ttl.map(Duration::from_secs), tags };
            let request = Request::Set { key: key.clone(), write: write.clone(), keeper: None };
            prop_assert_eq!(round_trip_request(&request), request);
            let kept = Request::Set { key, write, keeper: Some("node-1".into()) };
            prop_assert_eq!(round_trip_request(&kept), kept);
        }

        /// Arbitrary bodies under every kind are refused, or read exactly
        /// (see `read_exactly`); never a panic.
        #[test]
        fn arbitrary_bodies_are_refused_or_read_exactly(kind in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..200)) {
            read_exactly(kind, &Bytes::from(body))?;
        }

        /// Every message with one byte changed is refused, or read exactly
        /// (see `read_exactly`).
        #[test]
        fn corrupted_messages_are_refused_or_read_exactly(which in any::<prop::sample::Index>(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            // The messages that have a body to change.
            let mut encoded: Vec<(u8, BytesMut)> = Vec::new();
            for r in every_request() {
                let mut out = BytesMut::new();
                encoded.push((r.encode(&mut out), out));
            }
            for a in every_answer() {
                let mut out = BytesMut::new();
                encoded.push((a.encode(&mut out), out));
            }
            encoded.retain(|(_, out)| !out.is_empty());
            let (kind, mut out) = encoded.swap_remove(which.index(encoded.len()));
            let at = at.index(out.len());
            out[at] = byte;
            read_exactly(kind, &out.freeze())?;
        }

        /// A message cut short, or with bytes after it, is refused.
        #[test]
        fn truncated_or_padded_messages_are_refused(items in proptest::collection::vec(item(), 1..4), cut in any::<prop::sample::Index>()) {
            let request = Request::Replicate { source: Source::Write, items: records(&items), deletes: vec![] };
            let mut out = BytesMut::new();
            let kind = request.encode(&mut out);
            let whole = out.freeze();
            let cut = cut.index(whole.len());
            prop_assert!(Request::decode(kind, &whole.slice(..cut)).is_err());
            let mut padded = BytesMut::from(&whole[..]);
            padded.put_u8(0);
            prop_assert!(Request::decode(kind, &padded.freeze()).is_err());
        }
    }

    fn one_record() -> Records {
        records(&[Item {
            key: "k".into(),
            value: b"\"v\"".to_vec(),
            tags: vec!["red".into(), "ü".into()],
            meta: ItemMeta {
                created_at: 1,
                accessed_at: 2,
                expires_at: 3,
                access_count: 4,
            },
        }])
    }

    /// One of every request, with its optional parts both present and not.
    fn every_request() -> Vec<Request> {
        let doc = MembershipDoc::from_json(
            br#"{"epoch": 3, "replicationFactor": 2, "members": [{"id": "a", "address": "127.0.0.1:1", "state": "active"}]}"#,
        )
        .unwrap();
        let write = |ttl| Write {
            value: Bytes::from_static(b"[1,2]"),
            ttl,
            tags: vec!["red".into()],
        };
        vec![
            Request::Get { key: "k".into() },
            Request::Set {
                key: "k".into(),
                write: write(None),
                keeper: None,
            },
            Request::Set {
                key: "k".into(),
                write: write(Some(Duration::from_secs(60))),
                keeper: Some("node-1".into()),
            },
            Request::Delete { key: "k".into() },
            Request::Replicate {
                source: Source::Write,
                items: one_record(),
                deletes: vec![],
            },
            Request::Replicate {
                source: Source::Rebalance,
                items: Records::default(),
                deletes: vec![Deletion {
                    key: "gone".into(),
                    at: 9,
                }],
            },
            Request::Pull {
                node: "b".into(),
                cursor: 77,
                limit: 1000,
            },
            Request::Fetch { key: "ü".into() },
            Request::Newer {
                key: "k".into(),
                node: "b".into(),
                held: None,
            },
            Request::Newer {
                key: "k".into(),
                node: "b".into(),
                held: Some(HeldCopy {
                    version: 7,
                    tags: vec!["red".into(), "blue".into()],
                }),
            },
            Request::InvalidateTag { tag: "red".into() },
            Request::Progress,
            Request::Stats,
            Request::GetRing,
            Request::PutRing { doc },
            Request::Lease { node: "b".into() },
            Request::Tombstones { since: 42 },
        ]
    }

    /// One of every answer, with its optional parts both present and not.
    fn every_answer() -> Vec<Answer> {
        let doc = MembershipDoc::from_json(
            br#"{"epoch": 3, "replicationFactor": 2, "members": [{"id": "a", "address": "127.0.0.1:1", "state": "active"}]}"#,
        )
        .unwrap();
        vec![
            Answer::Item {
                created: true,
                record: one_record(),
            },
            Answer::Missing,
            Answer::Deleted,
            Answer::Replicated(ReplicateOutcome {
                applied: 1,
                replaced: 2,
                stale: 3,
                refused: 4,
                deleted: 5,
            }),
            Answer::Page {
                items: Records::default(),
                next: None,
            },
            Answer::Page {
                items: one_record(),
                next: Some(3),
            },
            Answer::Invalidated(LocalInvalidation {
                removed: 4,
                primary: 2,
            }),
            Answer::Progress(Box::new(NodeProgress {
                node_id: "a".into(),
                epoch: 3,
                synced_epoch: 2,
                member_state: Some(distrocache_membership::MemberState::Active),
                phase: distrocache_membership::SyncPhase::Idle,
                handoff_complete: false,
                ready: true,
                items: 5,
                keys_sent: 6,
                keys_received: 7,
                last_sync_seconds: 0.5,
                last_backup: None,
            })),
            Answer::Stats(Box::new(NodeStats {
                node_id: "a".into(),
                hits: 1,
                misses: 2,
                sets: 3,
                deletes: 4,
                evictions: 5,
                expirations: 6,
                tag_invalidations: 7,
                items: 8,
                bytes: 9,
                hit_ratio: 0.25,
                capacity: 10,
                max_memory: 0,
                uptime_seconds: 1.5,
                uptime: "1s".into(),
            })),
            Answer::Ring(Box::new(doc)),
            Answer::RingAdopted {
                epoch: 4,
                adopted: true,
            },
            Answer::Lease { granted: true },
            Answer::Tombstones(None),
            Answer::DeletedAt { at: 12 },
            Answer::Tombstones(Some(TombstoneLog {
                forgotten_before: 7,
                deletes: vec![("k".into(), 9)],
                tags: vec![("red".into(), 11), ("ü".into(), 12)],
            })),
            Answer::refused(503, "no owner"),
            Answer::Misdirected,
        ]
    }

    #[test]
    fn every_request_and_answer_round_trips() {
        for r in &every_request() {
            assert_eq!(&round_trip_request(r), r);
        }
        for a in &every_answer() {
            assert_eq!(&round_trip_answer(a), a);
        }
    }

    /// Every message, cut short at any byte or followed by one more, is
    /// refused with an error: a message is read only whole.
    #[test]
    fn every_message_cut_short_or_padded_is_refused() {
        fn check<M: std::fmt::Debug>(
            message: &M,
            encode: impl Fn(&M, &mut BytesMut) -> u8,
            decode: impl Fn(u8, &Bytes) -> Result<M, DecodeError>,
        ) {
            let mut out = BytesMut::new();
            let kind = encode(message, &mut out);
            let whole = out.freeze();
            for cut in 0..whole.len() {
                assert!(
                    decode(kind, &whole.slice(..cut)).is_err(),
                    "{message:?} cut to {cut} of {} bytes was read",
                    whole.len()
                );
            }
            let mut padded = BytesMut::from(&whole[..]);
            padded.put_u8(0);
            assert!(
                decode(kind, &padded.freeze()).is_err(),
                "{message:?} with a byte after it was read"
            );
        }
        for r in &every_request() {
            check(r, Request::encode, Request::decode);
        }
        for a in &every_answer() {
            check(a, Answer::encode, Answer::decode);
        }
    }

    #[test]
    fn text_that_is_not_utf8_is_refused() {
        let mut out = BytesMut::new();
        put_bytes(&mut out, b"\xff\xfe");
        assert!(Request::decode(GET, &out.freeze()).is_err());
    }

    #[test]
    fn counts_larger_than_the_message_are_refused_without_allocating() {
        let mut out = BytesMut::new();
        put_str(&mut out, "k");
        put_bytes(&mut out, b"1");
        out.put_u64(0);
        out.put_u32(u32::MAX); // tags
        assert!(Request::decode(SET, &out.freeze()).is_err());
    }
}
