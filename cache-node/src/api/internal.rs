//! The peer API under `/internal/v1/`: what nodes of one cluster ask each
//! other. Never used by clients.
//!
//! Requests that act on ownership carry the sender's ring epoch and are
//! refused with 421 Misdirected Request when it differs from this node's;
//! the answer names this node's epoch and the sender reconciles (see
//! `Cluster::call`) and retries. Every answer carries this node's epoch.

use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use distrocache_membership::MembershipDoc;
use serde_json::json;

use super::{ApiError, AppState, CacheKey, Limits, SetRequest, TagName, json, ops};
use crate::cluster::Cluster;
use crate::cluster::wire::{
    EPOCH_HEADER, PullRequest, Record, RecordBatch, ReplicateBody, ReplicateOutcome,
};

pub fn router(app: &Arc<AppState>) -> Router<Arc<AppState>> {
    // Peer batches are larger than client bodies: a batch of records up to
    // the rebalancing byte limit, plus one item that may overshoot it.
    let body_limit = app.cluster.as_ref().map_or(app.limits.max_body_bytes, |c| {
        c.settings().peer.max_answer_bytes
    });
    let epoch_checked = Router::new()
        .route(
            "/internal/v1/cache/{key}",
            get(owner_get)
                .post(owner_set)
                .put(owner_set)
                .delete(owner_delete),
        )
        .route("/internal/v1/items/{key}", get(export_item))
        .route("/internal/v1/replicate", post(replicate))
        .route("/internal/v1/pull", post(pull))
        .route("/internal/v1/invalidate/tag/{tag}", post(invalidate_local))
        .route_layer(middleware::from_fn_with_state(app.clone(), same_epoch));
    epoch_checked
        .route("/internal/v1/ring", get(get_ring).put(put_ring))
        .route("/internal/v1/progress", get(progress))
        .route("/internal/v1/stats", get(ops::stats))
        .layer(middleware::from_fn_with_state(app.clone(), cluster_only))
        .layer(middleware::from_fn_with_state(
            app.clone(),
            super::auth::peer,
        ))
        .layer(DefaultBodyLimit::max(body_limit))
}

fn cluster(app: &AppState) -> &Arc<Cluster> {
    app.cluster
        .as_ref()
        .expect("cluster_only lets only cluster-mode requests through")
}

/// Answers 404 on a single node (there are no peers), and marks every answer
/// with this node's ring epoch.
async fn cluster_only(State(app): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let Some(cluster) = &app.cluster else {
        return ApiError::not_found("this node is not in cluster mode").into_response();
    };
    let epoch = cluster.epoch();
    let mut response = next.run(request).await;
    response
        .headers_mut()
        .insert(EPOCH_HEADER, HeaderValue::from(epoch));
    response
}

/// Refuses a request made with a different ring (421, naming our epoch).
async fn same_epoch(State(app): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let Some(cluster) = &app.cluster else {
        return next.run(request).await;
    };
    let theirs = request
        .headers()
        .get(EPOCH_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mine = cluster.epoch();
    match theirs {
        Some(theirs) if theirs == mine => next.run(request).await,
        Some(theirs) => ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            format!("ring epoch mismatch: the sender holds {theirs}, this node {mine}"),
        )
        .into_response(),
        None => ApiError::bad_request(format!("peer requests must carry {EPOCH_HEADER}"))
            .into_response(),
    }
}

/// A forwarded read: this node serves it as the key's owner.
async fn owner_get(State(app): State<Arc<AppState>>, CacheKey(key): CacheKey) -> Response {
    super::serve_get(&app, &key).await
}

/// A forwarded write: this node coordinates it.
async fn owner_set(
    State(app): State<Arc<AppState>>,
    CacheKey(key): CacheKey,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req = SetRequest::parse(
        &headers,
        body.map_err(super::request::body_error),
        &app.limits,
    )?;
    super::coordinate_set(&app, &key, req).await
}

async fn owner_delete(
    State(app): State<Arc<AppState>>,
    CacheKey(key): CacheKey,
) -> Result<Response, ApiError> {
    super::coordinate_delete(&app, &key).await
}

/// One item with its metadata, without touching it (read fallback during moves).
async fn export_item(State(app): State<Arc<AppState>>, CacheKey(key): CacheKey) -> Response {
    let mut record = RecordBatch::default();
    match app.store.peek(&key, |item| record.push(item)) {
        Some(()) => json(StatusCode::OK, record.into_single()),
        None => ApiError::not_found(format!("key {key:?} not held here")).into_response(),
    }
}

/// What a replicate request carries, named by its sender so the receiver
/// can count data movement apart from everyday replication.
#[derive(Debug, Default, serde::Deserialize)]
struct ReplicateQuery {
    /// `rebalance` for the batches a node pushes when the ring changes.
    #[serde(default)]
    source: Option<String>,
}

async fn replicate(
    State(app): State<Arc<AppState>>,
    Query(query): Query<ReplicateQuery>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let mut batch: ReplicateBody<'_> = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid replicate body: {e}")))?;
    let cluster = cluster(&app);
    let most = cluster.settings().batch_items;
    if batch.items.len() > most || batch.deletes.len() > most {
        return Err(ApiError::too_large(format!(
            "a batch holds at most {most} items and {most} deletes (--rebalance-batch-items); got {} and {}",
            batch.items.len(),
            batch.deletes.len()
        )));
    }
    // A peer's items meet the same limits as a client's: the peer API may
    // be reachable by more than the cache's own nodes.
    let before = batch.items.len();
    batch.items.retain(|r| match record_within(&app.limits, r) {
        Ok(()) => true,
        Err(why) => {
            tracing::warn!(key = %r.key.chars().take(64).collect::<String>(), why, "refused an item from a peer");
            false
        }
    });
    batch
        .deletes
        .retain(|d| !d.key.is_empty() && d.key.len() <= app.limits.max_key_bytes);
    let mut outcome: ReplicateOutcome = cluster.apply_records(&batch.items);
    outcome.refused += (before - batch.items.len()) as u64;
    outcome.deleted = cluster.apply_deletes(&batch.deletes);
    if query.source.as_deref() == Some("rebalance") {
        cluster.count_received(outcome.applied);
    }
    Ok(axum::Json(outcome).into_response())
}

/// Whether a record from a peer fits the limits a client's write must meet.
fn record_within(limits: &Limits, r: &Record<'_>) -> Result<(), &'static str> {
    if r.key.is_empty() || r.key.len() > limits.max_key_bytes {
        return Err("key empty or too long");
    }
    if r.value.get().len() > limits.max_value_bytes {
        return Err("value too large");
    }
    if r.tags.len() > limits.max_tags
        || r.tags
            .iter()
            .any(|t| t.is_empty() || t.len() > limits.max_tag_bytes)
    {
        return Err("too many tags, or a tag empty or too long");
    }
    if r.created_at > r.expires_at {
        return Err("created after it expires");
    }
    Ok(())
}

async fn pull(
    State(app): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let request: PullRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid pull body: {e}")))?;
    let answer = cluster(&app)
        .serve_pull(&request)
        .map_err(ApiError::bad_request)?;
    Ok(json(StatusCode::OK, answer))
}

async fn invalidate_local(State(app): State<Arc<AppState>>, TagName(tag): TagName) -> Response {
    axum::Json(cluster(&app).invalidate_locally(&tag)).into_response()
}

async fn get_ring(State(app): State<Arc<AppState>>) -> Response {
    match cluster(&app).rings() {
        Some(rings) => json(StatusCode::OK, rings.current.doc.to_json().into_bytes()),
        None => ApiError::not_found("no ring held yet").into_response(),
    }
}

/// A peer holding a newer ring sends it here; adopted if newer.
async fn put_ring(
    State(app): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let doc = MembershipDoc::from_json(&body).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let cluster = cluster(&app);
    let adopted = cluster.adopt(doc);
    Ok(axum::Json(json!({ "epoch": cluster.epoch(), "adopted": adopted })).into_response())
}

async fn progress(State(app): State<Arc<AppState>>) -> Response {
    axum::Json(cluster(&app).report()).into_response()
}
