//! What nodes send each other under `/internal/v1/`: header names, items with
//! their metadata, and the request and answer bodies of the peer API.
//!
//! Items travel as JSON whose `value` is the stored JSON text verbatim, so a
//! move costs no re-encoding of values. Records are written by hand (the
//! rebalancing hot path, like `api::item_json`) and read with serde, which
//! validates every value a peer sends before it reaches the store.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::api::item_json::write_json_string;
use crate::store::{ItemMeta, ItemRef, UnixNanos};

/// The sender's (on requests) or the answerer's (on answers) ring epoch.
pub const EPOCH_HEADER: &str = "x-distrocache-epoch";
/// The id of the node that sent a peer request.
pub const FROM_HEADER: &str = "x-distrocache-from";
/// The id of the node that served a client request (set on every answer to
/// `/api/v1/cache/...`, forwarded or not).
pub const SERVED_BY_HEADER: &str = "x-distrocache-served-by";

/// An item with everything needed to recreate it on another node.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Record<'a> {
    #[serde(borrow)]
    pub key: Cow<'a, str>,
    #[serde(borrow)]
    pub value: &'a RawValue,
    #[serde(default)]
    pub tags: Vec<String>,
    pub created_at: UnixNanos,
    pub accessed_at: UnixNanos,
    pub expires_at: UnixNanos,
    #[serde(default)]
    pub access_count: u64,
}

impl Record<'_> {
    pub fn meta(&self) -> ItemMeta {
        ItemMeta {
            created_at: self.created_at,
            accessed_at: self.accessed_at,
            expires_at: self.expires_at,
            access_count: self.access_count,
        }
    }
}

/// Records encoded back to back (comma-separated) for a batch body.
#[derive(Debug, Default)]
pub struct RecordBatch {
    buf: Vec<u8>,
    count: usize,
}

impl RecordBatch {
    pub fn push(&mut self, item: ItemRef<'_>) {
        if self.count > 0 {
            self.buf.push(b',');
        }
        write_record(&mut self.buf, item);
        self.count += 1;
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// The encoded record of a batch holding one item.
    pub fn into_single(self) -> Vec<u8> {
        debug_assert_eq!(self.count, 1);
        self.buf
    }

    /// Empties the batch, returning its contents.
    pub fn take(&mut self) -> RecordBatch {
        std::mem::take(self)
    }
}

/// Appends one item as a [`Record`] object.
fn write_record(out: &mut Vec<u8>, item: ItemRef<'_>) {
    let mut int = itoa::Buffer::new();
    let meta = item.meta();
    out.extend_from_slice(b"{\"key\":");
    write_json_string(out, item.key());
    out.extend_from_slice(b",\"value\":");
    out.extend_from_slice(item.value());
    out.extend_from_slice(b",\"tags\":[");
    for (i, tag) in item.tags().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_json_string(out, tag);
    }
    out.extend_from_slice(b"],\"createdAt\":");
    out.extend_from_slice(int.format(meta.created_at).as_bytes());
    out.extend_from_slice(b",\"accessedAt\":");
    out.extend_from_slice(int.format(meta.accessed_at).as_bytes());
    out.extend_from_slice(b",\"expiresAt\":");
    out.extend_from_slice(int.format(meta.expires_at).as_bytes());
    out.extend_from_slice(b",\"accessCount\":");
    out.extend_from_slice(int.format(meta.access_count).as_bytes());
    out.push(b'}');
}

/// A delete to apply on another owner: remove the key unless it was written
/// after `at`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Deletion {
    pub key: String,
    pub at: UnixNanos,
}

/// `POST /internal/v1/replicate`: items and deletes to apply locally.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReplicateBody<'a> {
    #[serde(borrow, default)]
    pub items: Vec<Record<'a>>,
    #[serde(default)]
    pub deletes: Vec<Deletion>,
}

/// The answer to a replicate request.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicateOutcome {
    /// Items written.
    pub applied: u64,
    /// Of those, items that replaced a copy already held.
    #[serde(default)]
    pub replaced: u64,
    /// Items not written because a newer version is held, they expired, or
    /// they were deleted after being read.
    pub stale: u64,
    /// Items refused (too large for this node's budget).
    pub refused: u64,
    /// Deletes that removed an item.
    pub deleted: u64,
}

/// Builds a replicate body from encoded records and deletions.
pub fn replicate_body(records: &RecordBatch, deletes: &[Deletion]) -> Vec<u8> {
    let mut out = Vec::with_capacity(records.bytes() + 32 + deletes.len() * 48);
    out.extend_from_slice(b"{\"items\":[");
    out.extend_from_slice(&records.buf);
    out.extend_from_slice(b"],\"deletes\":");
    serde_json::to_writer(&mut out, deletes).expect("deletions always serialise");
    out.push(b'}');
    out
}

/// `POST /internal/v1/pull`: "send me the items I own under our ring".
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PullRequest {
    /// The id of the member asking.
    pub node: String,
    /// Where to continue (from the previous answer's `next`); 0 to start.
    #[serde(default)]
    pub cursor: u64,
    /// Most items to return.
    pub limit: usize,
}

/// The answer to a pull: encoded by hand like the replicate body, read as this.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PullAnswer<'a> {
    #[serde(borrow)]
    pub items: Vec<Record<'a>>,
    /// `None` once the answering node's whole store has been scanned.
    pub next: Option<u64>,
}

pub fn pull_answer(records: &RecordBatch, next: Option<u64>) -> Vec<u8> {
    let mut out = Vec::with_capacity(records.bytes() + 48);
    out.extend_from_slice(b"{\"items\":[");
    out.extend_from_slice(&records.buf);
    out.extend_from_slice(b"],\"next\":");
    match next {
        Some(n) => out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes()),
        None => out.extend_from_slice(b"null"),
    }
    out.push(b'}');
    out
}

/// The local part of a tag invalidation, as one member answers it.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalInvalidation {
    /// Items this node removed (replicas included).
    pub removed: u64,
    /// Of those, the keys this node is the primary of: summed over the
    /// members, the number of distinct items invalidated.
    pub primary: u64,
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::store::{ManualClock, Store, StoreConfig};

    #[test]
    fn records_round_trip_with_values_verbatim() {
        let clock = ManualClock::new(1_000_000_000_000);
        let store = Store::new(StoreConfig::default(), Arc::new(clock));
        let tags = vec!["a\"b".to_string(), "ü".to_string()];
        store
            .set(
                "k\n1",
                br#"{"x": [1, 2.5e3]}"#,
                &tags,
                Some(Duration::from_secs(9)),
                |_| (),
            )
            .unwrap();
        store.set("other", b"2", &[], None, |_| ()).unwrap();
        let mut records = RecordBatch::default();
        let meta = store
            .peek("k\n1", |item| {
                records.push(item);
                item.meta()
            })
            .unwrap();
        store.peek("other", |item| records.push(item)).unwrap();
        let body = replicate_body(
            &records,
            &[Deletion {
                key: "gone".into(),
                at: 5,
            }],
        );
        let parsed: ReplicateBody<'_> = serde_json::from_slice(&body).unwrap();
        let r = &parsed.items[0];
        assert_eq!(r.key, "k\n1");
        assert_eq!(r.value.get(), r#"{"x": [1, 2.5e3]}"#);
        assert_eq!(r.tags, tags);
        assert_eq!(r.meta(), meta);
        assert_eq!(parsed.items[1].key, "other");
        assert_eq!(parsed.deletes[0].key, "gone");

        let answer = pull_answer(&records, Some(7));
        let parsed: PullAnswer<'_> = serde_json::from_slice(&answer).unwrap();
        assert_eq!((parsed.items.len(), parsed.next), (2, Some(7)));
        let none = RecordBatch::default();
        let empty_answer = pull_answer(&none, None);
        let empty: PullAnswer<'_> = serde_json::from_slice(&empty_answer).unwrap();
        assert!(empty.items.is_empty() && empty.next.is_none());
    }

    #[test]
    fn a_record_with_an_invalid_value_is_refused() {
        let body = br#"{"items": [{"key": "k", "value": {oops}, "createdAt": 1, "accessedAt": 1, "expiresAt": 2}]}"#;
        assert!(serde_json::from_slice::<ReplicateBody<'_>>(body).is_err());
    }
}
