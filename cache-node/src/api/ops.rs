//! The operational endpoints: stats, liveness, readiness and Prometheus metrics.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::AppState;
use super::item_json::write_rfc3339;

#[derive(Serialize)]
struct Stats<'a> {
    node_id: &'a str,
    hits: u64,
    misses: u64,
    sets: u64,
    deletes: u64,
    evictions: u64,
    expirations: u64,
    tag_invalidations: u64,
    items: usize,
    bytes: u64,
    hit_ratio: f64,
    /// The item cap (the seed's `MaxSize`).
    capacity: usize,
    /// The byte cap; 0 means none.
    max_memory: u64,
    uptime_seconds: f64,
    uptime: String,
}

pub async fn stats(State(app): State<Arc<AppState>>) -> Response {
    axum::Json(stats_json(&app)).into_response()
}

/// This node's counters as the JSON `/api/v1/stats` answers.
pub fn stats_json(app: &AppState) -> serde_json::Value {
    let s = app.store.stats();
    let c = s.counters;
    let lookups = c.hits + c.misses;
    let uptime = app.started.elapsed();
    serde_json::to_value(Stats {
        node_id: &app.node_id,
        hits: c.hits,
        misses: c.misses,
        sets: c.sets,
        deletes: c.deletes,
        evictions: c.evictions,
        expirations: c.expirations,
        tag_invalidations: c.tag_invalidations,
        items: s.items,
        bytes: s.bytes,
        hit_ratio: if lookups == 0 {
            0.0
        } else {
            c.hits as f64 / lookups as f64
        },
        capacity: s.max_items,
        max_memory: s.max_bytes,
        uptime_seconds: uptime.as_secs_f64(),
        uptime: humantime::format_duration(std::time::Duration::from_secs(uptime.as_secs()))
            .to_string(),
    })
    .expect("stats always serialise")
}

/// Liveness: the process is up and serving HTTP.
pub async fn health(State(app): State<Arc<AppState>>) -> Response {
    let mut now = Vec::new();
    write_rfc3339(&mut now, app.store.now());
    axum::Json(serde_json::json!({
        "status": "healthy",
        "node_id": app.node_id,
        "timestamp": String::from_utf8_lossy(&now),
    }))
    .into_response()
}

/// Readiness: the node holds the data it owns and may receive traffic. A
/// single node is ready as soon as it listens; in a cluster, once it has loaded
/// its ring and received its keys.
pub async fn ready(State(app): State<Arc<AppState>>) -> Response {
    if app.ready.load(Ordering::Acquire) {
        axum::Json(serde_json::json!({ "status": "ready", "node_id": app.node_id })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({
                "status": "not ready",
                "node_id": app.node_id,
                "error": "node is still loading the data it owns",
            })),
        )
            .into_response()
    }
}

pub async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    let body = app
        .metrics
        .render(&app.store.stats(), app.started.elapsed());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}
