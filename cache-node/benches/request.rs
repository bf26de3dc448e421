//! Request benchmarks (criterion): what a node does with a write's body
//! before the store sees it (the content type, UTF-8, the one pass of
//! `json_text` over the body, the tags), the same pass over a value a peer
//! sends (`Limits::check_value`), and a GET's answer: the item as the seed's
//! JSON (`item_json`, three timestamps included).
//!
//! The body is `bench/load.sh`'s SET: a 200-byte string value, a ttl and
//! one tag. Run with `cargo bench -p cache-node --bench request`.

use std::hint::black_box;

use bytes::Bytes;
use cache_node::api::request;
use cache_node::exec::Limits;
use cache_node::item_json;
use cache_node::store::{ItemMeta, ItemView};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hyper::http::{HeaderMap, HeaderValue, header};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn write_body(c: &mut Criterion) {
    let value = format!("\"{}\"", "v".repeat(200));
    let body = Bytes::from(format!(
        r#"{{"value":{value},"ttl":3600,"tags":["bench"]}}"#
    ));
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let limits = Limits::default();
    let write = request::write(&headers, body.clone(), &limits).expect("a valid body");
    assert_eq!(&write.value[..], value.as_bytes());
    assert_eq!(write.tags, ["bench"]);

    let mut group = c.benchmark_group("request");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("write body (200-byte value, ttl, one tag)", |b| {
        b.iter(|| request::write(&headers, black_box(body.clone()), &limits).unwrap())
    });
    group.throughput(Throughput::Bytes(value.len() as u64));
    group.bench_function("peer value check (200-byte string)", |b| {
        b.iter(|| limits.check_value(black_box(value.as_bytes())).unwrap())
    });
    let object = br#"{"user": {"id": 42, "name": "Ada", "roles": ["admin", "ops"]}, "seen": [1.5, -2, true, null]}"#;
    group.throughput(Throughput::Bytes(object.len() as u64));
    group.bench_function("peer value check (nested object)", |b| {
        b.iter(|| limits.check_value(black_box(object)).unwrap())
    });
    group.finish();
}

/// An item as the store holds `bench/load.sh`'s: a 200-byte string, one tag.
struct BenchItem {
    value: Vec<u8>,
    meta: ItemMeta,
}

impl ItemView for BenchItem {
    fn key(&self) -> &str {
        "bench:4242"
    }
    fn value(&self) -> &[u8] {
        &self.value
    }
    fn meta(&self) -> ItemMeta {
        self.meta
    }
    fn tags(&self) -> impl Iterator<Item = &str> {
        ["bench"].into_iter()
    }
}

fn item_answer(c: &mut Criterion) {
    let created = 1_764_950_400_123_456_789; // 2025-12-05, a full fraction
    let item = BenchItem {
        value: format!("\"{}\"", "v".repeat(200)).into_bytes(),
        meta: ItemMeta {
            created_at: created,
            accessed_at: created + 1_234_567_000,
            expires_at: created + 3_600_000_000_000,
            access_count: 17,
        },
    };
    let json = item_json::item_to_vec(&item);
    let parsed: serde_json::Value = serde_json::from_slice(&json).expect("valid JSON");
    assert_eq!(parsed["accessed_at"], "2025-12-05T16:00:01.358023789Z");
    let mut group = c.benchmark_group("answer");
    group.throughput(Throughput::Bytes(json.len() as u64));
    group.bench_function("item as JSON (200-byte value, one tag)", |b| {
        b.iter(|| item_json::item_to_vec(black_box(&item)))
    });
    group.throughput(Throughput::Elements(1));
    group.bench_function("one RFC 3339 timestamp", |b| {
        let mut out = Vec::with_capacity(64);
        b.iter(|| {
            out.clear();
            item_json::write_rfc3339(&mut out, black_box(created));
        })
    });
    group.finish();
}

criterion_group!(benches, write_body, item_answer);
criterion_main!(benches);
