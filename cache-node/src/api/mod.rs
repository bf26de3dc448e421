//! The REST API: routes, shared state and the item handlers.
//!
//! Paths, JSON shapes and status codes are the seed's, so its clients switch
//! without a change: `/api/v1/cache/{key}` (GET, POST, PUT, DELETE),
//! `/api/v1/invalidate/tag/{tag}`, `/api/v1/stats`, `/api/v1/health`,
//! `/metrics`; plus `/api/v1/ready` for Kubernetes readiness probes.
//!
//! Requests flow one way: handler -> store. Cluster routing will sit between
//! the two without changing either side's contract.

mod error;
pub mod item_json;
mod ops;
mod request;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use axum::Router;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRef, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;

pub use error::ApiError;
pub use request::{CacheKey, Limits, SetRequest, TagName};

use crate::metrics::{Metrics, Op};
use crate::store::{Store, StoreError};

/// Everything the handlers share.
pub struct AppState {
    pub store: Store,
    pub limits: Limits,
    pub metrics: Metrics,
    pub node_id: String,
    pub started: Instant,
    /// Set once the node may receive traffic (see `/api/v1/ready`).
    pub ready: AtomicBool,
}

impl FromRef<Arc<AppState>> for Limits {
    fn from_ref(app: &Arc<AppState>) -> Limits {
        app.limits
    }
}

/// The node's whole HTTP surface.
pub fn router(app: Arc<AppState>) -> Router {
    let body_limit = app.limits.max_body_bytes;
    Router::new()
        .route(
            "/api/v1/cache/{key}",
            get(get_item)
                .post(set_item)
                .put(set_item)
                .delete(delete_item),
        )
        .route("/api/v1/invalidate/tag/{tag}", post(invalidate_tag))
        .route("/api/v1/stats", get(ops::stats))
        .route("/api/v1/health", get(ops::health))
        .route("/api/v1/ready", get(ops::ready))
        .route("/metrics", get(ops::metrics))
        .fallback(error::no_route)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(app)
}

fn json(status: StatusCode, body: Vec<u8>) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn get_item(State(app): State<Arc<AppState>>, CacheKey(key): CacheKey) -> Response {
    let started = Instant::now();
    let body = app.store.get(&key, item_json::item_to_vec);
    app.metrics.observe(Op::Get, started.elapsed());
    match body {
        Some(body) => json(StatusCode::OK, body),
        None => ApiError::not_found(format!("key {key:?} not found")).into_response(),
    }
}

async fn set_item(
    State(app): State<Arc<AppState>>,
    CacheKey(key): CacheKey,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req = SetRequest::parse(&headers, body, &app.limits)?;
    let started = Instant::now();
    let stored = app
        .store
        .set(&key, &req.value, &req.tags, req.ttl, item_json::item_to_vec);
    app.metrics.observe(Op::Set, started.elapsed());
    let (created, body) = stored.map_err(|e| match e {
        StoreError::TooLarge { .. } => ApiError::too_large(e.to_string()),
        StoreError::TtlTooLarge => ApiError::bad_request(e.to_string()),
    })?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json(status, body))
}

async fn delete_item(
    State(app): State<Arc<AppState>>,
    CacheKey(key): CacheKey,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let deleted = app.store.delete(&key);
    app.metrics.observe(Op::Delete, started.elapsed());
    if !deleted {
        return Err(ApiError::not_found(format!("key {key:?} not found")));
    }
    let body = serde_json::json!({ "key": key, "deleted": true });
    Ok((StatusCode::OK, axum::Json(body)).into_response())
}

async fn invalidate_tag(State(app): State<Arc<AppState>>, TagName(tag): TagName) -> Response {
    let started = Instant::now();
    let invalidated = app.store.invalidate_tag(&tag);
    app.metrics.observe(Op::InvalidateTag, started.elapsed());
    axum::Json(serde_json::json!({ "tag": tag, "invalidated": invalidated })).into_response()
}
