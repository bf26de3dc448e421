//! What each fuzz target does with its input, and what it asserts beyond "no
//! panic". One function per target; `fuzz_targets/*.rs` call them, and the
//! normal test suite includes this file (`cache-node/tests/fuzz_corpus.rs`)
//! to replay every checked-in corpus file on the stable toolchain, so the
//! two can never drift apart.
//!
//! * [`set_request`]: the write body parser, `api::request::write` (its one
//!   pass is `json_text`), with arbitrary bytes, content types and limits.
//! * [`key_path`]: a key (or tag) as a raw URL path segment, through the
//!   node's real dispatcher and executor, in process.
//! * [`membership_doc`]: the ring document parser and, for documents it
//!   accepts, ring construction and key placement.
//! * [`peer_frame`]: bytes from a peer connection, through the frame decoder
//!   and the protocol's message decoders.
//! * [`snapshot_file`]: bytes as a snapshot file (`--data-dir`), through the
//!   snapshot reader.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use cache_node::api::auth::Tokens;
use cache_node::api::{Api, PeerEndpoint, Surface};
use cache_node::cluster::ring::Ring;
use cache_node::exec::{Executor, Limits};
use cache_node::metrics::Metrics;
use cache_node::peer::frame::{self, FrameCodec};
use cache_node::peer::protocol::{Answer, RecordBatch, Request};
use cache_node::snapshot::format::{self as snapshot_format, SnapshotWriter};
use cache_node::store::{ItemMeta, ItemView};
use cache_node::store::{Store, StoreConfig};
use distrocache_membership::{MemberState, MembershipDoc};
use hyper::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use tokio_util::codec::Decoder;

/// Content types the write parser is tried with, picked by the input's first
/// byte: absent, accepted spellings, refused ones, and bytes that are not
/// even valid header text.
const CONTENT_TYPES: [Option<&[u8]>; 8] = [
    None,
    Some(b"application/json"),
    Some(b"application/json; charset=utf-8"),
    Some(b"Application/Merge-Patch+JSON"),
    Some(b"text/plain"),
    Some(b"application/x-www-form-urlencoded"),
    Some(b"application/\xffjson"),
    Some(b""),
];

/// Small limits, so the fuzzer reaches every limit with short inputs.
fn small_limits() -> Limits {
    Limits {
        max_key_bytes: 16,
        max_value_bytes: 64,
        max_body_bytes: 256,
        max_tags: 3,
        max_tag_bytes: 8,
        max_json_depth: 4,
    }
}

/// Target `set_request`. Input: one selector byte (low 3 bits: content type;
/// top bit: small or default limits), then the body.
///
/// Asserts: every refusal is a 4xx; every accepted request is within every
/// limit, names an accepted content type, and keeps a value that is valid
/// UTF-8 JSON text (a slice of the body) and distinct, bounded tags.
pub fn set_request(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let limits = if selector & 0x80 != 0 {
        small_limits()
    } else {
        Limits::default()
    };
    let mut headers = HeaderMap::new();
    let content_type = CONTENT_TYPES[usize::from(selector & 7)];
    if let Some(ct) = content_type {
        match HeaderValue::from_bytes(ct) {
            Ok(v) => {
                headers.insert(header::CONTENT_TYPE, v);
            }
            // Not valid header text: hyper would never hand it over.
            Err(_) => return,
        }
    }
    let body = Bytes::copy_from_slice(body);
    match cache_node::api::request::write(&headers, body.clone(), &limits) {
        Err(e) => {
            assert!(e.status.is_client_error(), "{e}");
            assert!(!e.message.is_empty());
        }
        Ok(req) => {
            if let Some(ct) = content_type {
                // JSON by name, or the form type `curl -d` sends by default
                // (seed clients never had to name one).
                let ct = String::from_utf8_lossy(ct).to_ascii_lowercase();
                let essence = ct.split(';').next().unwrap_or("").trim();
                assert!(
                    essence == "application/json"
                        || essence.ends_with("+json")
                        || essence == "application/x-www-form-urlencoded",
                    "{ct}"
                );
            }
            assert!(req.value.len() <= limits.max_value_bytes);
            let text = std::str::from_utf8(&req.value).expect("values are UTF-8");
            // Read as a client reading it back would: numbers within a
            // double's range, surrogates in pairs.
            serde_json::from_str::<serde_json::Value>(text).expect("values are one JSON value");
            assert!(!text.starts_with(char::is_whitespace));
            // The value is the body's own bytes, not a re-encoding.
            let at = req.value.as_ptr() as usize - body.as_ptr() as usize;
            assert!(at + req.value.len() <= body.len());
            assert!(req.tags.len() <= limits.max_tags);
            for (i, tag) in req.tags.iter().enumerate() {
                assert!(!tag.is_empty() && tag.len() <= limits.max_tag_bytes);
                assert!(!req.tags[..i].contains(tag), "duplicate tag {tag:?}");
            }
            if let Some(ttl) = req.ttl {
                assert!(!ttl.is_zero());
                assert!(ttl.as_secs() <= i64::MAX as u64 / 1_000_000_000);
            }
        }
    }
}

/// One node's dispatcher on a small store, and a runtime to drive it, built
/// once per process (the fuzzer calls the target millions of times).
fn node() -> &'static (tokio::runtime::Runtime, Api) {
    static NODE: OnceLock<(tokio::runtime::Runtime, Api)> = OnceLock::new();
    NODE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let exec = Arc::new(Executor {
            store: Arc::new(Store::with_config(StoreConfig {
                max_items: 1000,
                max_bytes: 1 << 20,
                ..StoreConfig::default()
            })),
            limits: small_limits(),
            metrics: Metrics::new(),
            node_id: "fuzz".into(),
            started: Instant::now(),
            ready: Arc::new(AtomicBool::new(true)),
            cluster: None,
            backups: None,
        });
        let endpoint = PeerEndpoint {
            max_message_bytes: 1 << 20,
            drain_timeout: std::time::Duration::from_secs(1),
            shutdown: Default::default(),
            tracker: Default::default(),
            tls: None,
        };
        let api =
            Api::new(exec, Surface::All, Tokens::default(), endpoint).expect("a valid node id");
        (runtime, api)
    })
}

/// Target `key_path`. Input: one selector byte (the operation), then the raw
/// path segment, sent through the node's real dispatcher in process.
///
/// Asserts: every answer is JSON with `application/json`, no answer is a
/// 5xx, errors carry `{"error": ...}`, and for a segment that is one path
/// segment the outcome is exactly what its percent-decoding says: 400 when it
/// is empty or not UTF-8, 414 when too long, otherwise the operation works on
/// exactly the decoded key (a write answers with that key, a read after it
/// finds it).
pub fn key_path(data: &[u8]) {
    let Some((&selector, segment)) = data.split_first() else {
        return;
    };
    let Ok(segment) = std::str::from_utf8(segment) else {
        // Not ASCII-safe as a request target: hyper refuses it before routing
        // (the hostile HTTP tests cover that).
        return;
    };
    let (method, prefix, body) = match selector % 5 {
        0 => (Method::GET, "/api/v1/cache/", None),
        1 | 2 => (
            Method::PUT,
            "/api/v1/cache/",
            Some(r#"{"value": 1, "tags": ["t"]}"#),
        ),
        3 => (Method::DELETE, "/api/v1/cache/", None),
        _ => (Method::POST, "/api/v1/invalidate/tag/", None),
    };
    let path = format!("{prefix}{segment}");
    let Ok(uri) = path.parse::<Uri>() else {
        return;
    };
    let (runtime, api) = node();
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let send = |method: Method, body: Option<&str>| {
        let response = match api.parse(&method, &uri, &headers) {
            Ok(parsed) => runtime.block_on(api.answer(
                parsed,
                &headers,
                Bytes::copy_from_slice(body.unwrap_or("").as_bytes()),
            )),
            Err(refusal) => refusal.answer(),
        };
        let status = response.status();
        let ct = response.headers().get(header::CONTENT_TYPE).cloned();
        let bytes = runtime
            .block_on(http_body_util::BodyExt::collect(response.into_body()))
            .expect("a complete body")
            .to_bytes();
        (status, ct, bytes)
    };
    let (status, ct, bytes) = send(method.clone(), body);
    assert!(!status.is_server_error(), "{status} for {path:?}");
    assert!(
        ct.as_ref()
            .is_some_and(|ct| ct.as_bytes().starts_with(b"application/json")),
        "content type {ct:?} for {path:?}"
    );
    let json: serde_json::Value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{status} for {path:?}: not JSON ({e})"));
    if status.is_client_error() {
        assert!(json["error"].as_str().is_some_and(|e| !e.is_empty()));
    }

    // A single segment's outcome follows from its decoding alone. (A path
    // with '/', '?' or '#' routes elsewhere; the checks above cover it.)
    if segment.contains(['/', '?', '#']) {
        return;
    }
    let decoded: Vec<u8> = percent_encoding::percent_decode_str(segment).collect();
    let expected = if decoded.is_empty() {
        // An empty segment does not match the route at all.
        assert!(matches!(
            status,
            StatusCode::NOT_FOUND | StatusCode::BAD_REQUEST
        ));
        return;
    } else if std::str::from_utf8(&decoded).is_err() {
        Err(StatusCode::BAD_REQUEST)
    } else if prefix.contains("/tag/") {
        if decoded.len() > small_limits().max_tag_bytes {
            Err(StatusCode::BAD_REQUEST)
        } else {
            Ok(())
        }
    } else if decoded.len() > small_limits().max_key_bytes {
        Err(StatusCode::URI_TOO_LONG)
    } else {
        Ok(())
    };
    match expected {
        Err(want) => assert_eq!(status, want, "{path:?}"),
        Ok(()) => {
            let key = String::from_utf8(decoded).expect("checked above");
            match method {
                Method::PUT => {
                    assert!(matches!(status, StatusCode::OK | StatusCode::CREATED));
                    assert_eq!(json["key"], key.as_str(), "{path:?}");
                    let (status, _, bytes) = send(Method::GET, None);
                    assert_eq!(status, StatusCode::OK, "{path:?} written, not found");
                    let item: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                    assert_eq!(item["key"], key.as_str());
                    assert_eq!(item["value"], 1);
                }
                Method::POST => {
                    assert_eq!(status, StatusCode::OK);
                    assert_eq!(json["tag"], key.as_str());
                }
                _ => {
                    assert!(matches!(status, StatusCode::OK | StatusCode::NOT_FOUND));
                    if status == StatusCode::OK {
                        assert_eq!(json["key"], key.as_str());
                    }
                }
            }
        }
    }
}

/// Target `membership_doc`. Input: the document's bytes.
///
/// Asserts for every document the parser accepts: it round-trips through
/// its own JSON; a ring builds from it; every key gets
/// `min(replicationFactor, owning members)` distinct owners, none of them
/// leaving; and placement does not depend on the order members are listed in.
pub fn membership_doc(data: &[u8]) {
    let Ok(doc) = MembershipDoc::from_json(data) else {
        return;
    };
    let again = MembershipDoc::from_json(doc.to_json().as_bytes())
        .expect("a valid document's own JSON is valid");
    assert_eq!(again, doc);

    let me = doc
        .members
        .first()
        .map(|m| m.id.clone())
        .unwrap_or_default();
    let ring = Ring::new(Arc::new(doc.clone()), &me);
    let mut reversed = doc.clone();
    reversed.members.reverse();
    let ring_reversed = Ring::new(Arc::new(reversed), &me);
    let owning = doc
        .members
        .iter()
        .filter(|m| m.state != MemberState::Leaving)
        .count();
    let want = (doc.replication_factor as usize).min(owning);
    let keys: [&[u8]; 5] = [b"", b"k", b"user:123", data.get(..16).unwrap_or(data), data];
    for key in keys {
        let owners = ring.owners(key);
        assert_eq!(owners.len(), want, "owners of {key:?}");
        for (i, &idx) in owners.iter().enumerate() {
            assert!(ring.member(idx).owns());
            assert!(!owners[..i].contains(&idx), "an owner twice");
            assert!(ring.is_owner(key, idx));
        }
        let ids = |r: &Ring| -> Vec<String> {
            r.owners(key)
                .iter()
                .map(|&i| r.member(i).id.clone())
                .collect()
        };
        assert_eq!(
            ids(&ring),
            ids(&ring_reversed),
            "placement depends on order"
        );
    }
}

/// Target `peer_frame`. Input: bytes as they would arrive on a peer
/// connection.
///
/// Asserts: the frame decoder and both message decoders refuse or read any
/// bytes without panicking; every frame they read, and every request or
/// answer decoded from one, encodes back to bytes that decode to the same
/// message (so nothing a peer sends is read as something else).
pub fn peer_frame(data: &[u8]) {
    let mut codec = FrameCodec::new(4096);
    let mut src = BytesMut::from(data);
    while let Ok(Some(frame)) = codec.decode(&mut src) {
        let mut again = BytesMut::new();
        frame::encode(&mut again, frame.id, frame.epoch, |out| {
            out.extend_from_slice(&frame.body);
            frame.kind
        });
        let reread = codec
            .decode(&mut again)
            .expect("a frame's own encoding decodes")
            .expect("whole");
        assert_eq!(reread, frame);
        if let Ok(request) = Request::decode(frame.kind, &frame.body) {
            let mut out = BytesMut::new();
            let kind = request.encode(&mut out);
            assert_eq!(kind, frame.kind);
            assert_eq!(
                Request::decode(kind, &out.freeze()).expect("round trip"),
                request
            );
        }
        if let Ok(answer) = Answer::decode(frame.kind, &frame.body) {
            let mut out = BytesMut::new();
            let kind = answer.encode(&mut out);
            assert_eq!(kind, frame.kind);
            assert_eq!(
                Answer::decode(kind, &out.freeze()).expect("round trip"),
                answer
            );
        }
    }
}

/// An item read from a snapshot, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OwnedItem {
    key: String,
    value: Vec<u8>,
    tags: Vec<String>,
    meta: ItemMeta,
}

impl ItemView for OwnedItem {
    fn key(&self) -> &str {
        &self.key
    }
    fn value(&self) -> &[u8] {
        &self.value
    }
    fn meta(&self) -> ItemMeta {
        self.meta
    }
    fn tags(&self) -> impl Iterator<Item = &str> {
        self.tags.iter().map(String::as_str)
    }
}

fn read_snapshot(data: &[u8]) -> Option<(snapshot_format::Contents, Vec<OwnedItem>)> {
    let mut items = Vec::new();
    let contents = snapshot_format::read(data, |records| {
        items.extend(records.iter().map(|r| OwnedItem {
            key: r.key().to_owned(),
            value: r.value().to_vec(),
            tags: r.tags().map(str::to_owned).collect(),
            meta: r.meta(),
        }))
    })
    .ok()?;
    Some((contents, items))
}

/// Target `snapshot_file`: arbitrary bytes as a snapshot file.
///
/// Asserts: the reader refuses or reads any bytes without panicking; a file
/// it accepts counts exactly the items it handed over and was read to its
/// last byte; and writing those items back with the same header and
/// tombstones gives a file that reads back to the same items, header and
/// tombstones (so nothing in a snapshot is read as something else).
pub fn snapshot_file(data: &[u8]) {
    let Some((contents, items)) = read_snapshot(data) else {
        return;
    };
    assert_eq!(contents.items as usize, items.len());
    assert_eq!(contents.bytes as usize, data.len());
    let mut writer = SnapshotWriter::new(Vec::new(), &contents.header).expect("in memory");
    let mut batch = RecordBatch::default();
    for item in &items {
        batch.push(item);
    }
    writer.records(&batch.freeze()).expect("in memory");
    let (again, _, _) = writer.finish(&contents.tombstones).expect("in memory");
    let (reread, reitems) = read_snapshot(&again).expect("a snapshot's own encoding reads");
    assert_eq!(reread.header, contents.header);
    assert_eq!(reread.tombstones, contents.tombstones);
    assert_eq!(reitems, items);
}
