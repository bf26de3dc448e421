//! Request parsing benchmarks (criterion): what a node does with a write's
//! body before the store sees it (the content type, UTF-8, the one pass of
//! `json_text` over the body, the tags), and the same pass over a value a
//! peer sends (`Limits::check_value`).
//!
//! The body is `bench/load.sh`'s SET: a 200-byte string value, a ttl and
//! one tag. Run with `cargo bench -p cache-node --bench request`.

use std::hint::black_box;

use bytes::Bytes;
use cache_node::api::request;
use cache_node::exec::Limits;
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

criterion_group!(benches, write_body);
criterion_main!(benches);
