//! The REST API: routes, shared state and the item handlers.
//!
//! Paths, JSON shapes and status codes are the seed's, so its clients switch
//! without a change: `/api/v1/cache/{key}` (GET, POST, PUT, DELETE),
//! `/api/v1/invalidate/tag/{tag}`, `/api/v1/stats`, `/api/v1/health`,
//! `/metrics`; plus `/api/v1/ready` for Kubernetes readiness probes, the
//! cluster views under `/api/v1/cluster` and the peer API under
//! `/internal/v1/` (see `internal.rs`).
//!
//! Requests flow one way: handler -> cluster (who serves this key?) -> store
//! here, or the owner through the peer client. On a single node there is no
//! cluster and handlers go straight to the store.

pub mod auth;
mod cluster_view;
mod error;
pub mod fast;
mod internal;
pub mod item_json;
mod ops;
mod request;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use axum::Router;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRef, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;

pub use error::ApiError;
pub use request::{CacheKey, Limits, SetRequest, TagName};

use crate::cluster::routing::{Access, RouteError, Routed, encode_segment};
use crate::cluster::wire::{RecordBatch, SERVED_BY_HEADER};
use crate::cluster::{Cluster, peer::PeerResponse};
use crate::metrics::{Metrics, Op};
use crate::store::{Store, StoreError};

/// Everything the handlers share.
pub struct AppState {
    pub store: Arc<Store>,
    pub limits: Limits,
    pub metrics: Metrics,
    pub node_id: String,
    /// `node_id` as a header value, for `x-distrocache-served-by`.
    pub served_by: HeaderValue,
    pub started: Instant,
    /// Set once the node may receive traffic (see `/api/v1/ready`).
    pub ready: Arc<AtomicBool>,
    /// Present in cluster mode.
    pub cluster: Option<Arc<Cluster>>,
    /// Bearer tokens the client and peer APIs require, if any.
    pub tokens: auth::Tokens,
}

impl FromRef<Arc<AppState>> for Limits {
    fn from_ref(app: &Arc<AppState>) -> Limits {
        app.limits
    }
}

/// Which part of the HTTP surface a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// The client API and the peer API on one port.
    All,
    /// The client API only (the peer API has a port of its own).
    Client,
    /// The peer API only.
    Peer,
}

/// The node's HTTP surface, or the part of it one listener serves.
pub fn router(app: Arc<AppState>, surface: Surface) -> Router {
    let body_limit = app.limits.max_body_bytes;
    // Open to probes, Prometheus and the operator even with auth on: they
    // expose counters and progress, never data.
    let open = Router::new()
        .route("/api/v1/health", get(ops::health))
        .route("/api/v1/ready", get(ops::ready))
        .route("/api/v1/cluster/rebalance", get(cluster_view::rebalance))
        .route("/api/v1/cluster/handoff", get(cluster_view::handoff))
        .route("/metrics", get(ops::metrics));
    let guarded = Router::new()
        .route(
            "/api/v1/cache/{key}",
            get(get_item)
                .post(set_item)
                .put(set_item)
                .delete(delete_item),
        )
        .route("/api/v1/invalidate/tag/{tag}", post(invalidate_tag))
        .route("/api/v1/stats", get(ops::stats))
        .route("/api/v1/cluster", get(cluster_view::view))
        .route("/api/v1/cluster/stats", get(cluster_view::stats))
        .route_layer(middleware::from_fn_with_state(app.clone(), auth::client));
    let client = open.merge(guarded).layer(DefaultBodyLimit::max(body_limit));
    let routes = match surface {
        Surface::All => client.merge(internal::router(&app)),
        Surface::Client => client,
        Surface::Peer => internal::router(&app),
    };
    routes
        .fallback(error::no_route)
        .method_not_allowed_fallback(error::method_not_allowed)
        .with_state(app)
}

fn json(status: StatusCode, body: Vec<u8>) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// An item answer, marked with the node that served it.
fn served(app: &AppState, status: StatusCode, body: Vec<u8>) -> Response {
    let mut response = json(status, body);
    response
        .headers_mut()
        .insert(SERVED_BY_HEADER, app.served_by.clone());
    response
}

/// Passes an owner's answer on unchanged: same status, same body.
fn relay(answer: PeerResponse, served_by: &str) -> Response {
    let content_type = answer
        .headers
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("application/json"));
    let mut response = (answer.status, answer.body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, content_type);
    if let Ok(v) = HeaderValue::from_str(served_by) {
        headers.insert(SERVED_BY_HEADER, v);
    }
    response
}

impl From<RouteError> for ApiError {
    fn from(e: RouteError) -> Self {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    }
}

/// In cluster mode, sends a client request on `key` to the node that should
/// serve it. `None` means "serve it here".
async fn route(
    app: &AppState,
    key: &str,
    access: Access,
    method: Method,
    body: Bytes,
) -> Option<Response> {
    let cluster = app.cluster.as_ref()?;
    let path = format!("/internal/v1/cache/{}", encode_segment(key));
    match cluster.route(key, access, method, &path, body).await {
        Ok(Routed::Local) => None,
        Ok(Routed::Remote { answer, served_by }) => Some(relay(answer, &served_by)),
        Err(e) => Some(ApiError::from(e).into_response()),
    }
}

async fn get_item(State(app): State<Arc<AppState>>, CacheKey(key): CacheKey) -> Response {
    read(&app, &key).await
}

/// A client's read of `key`: sent to the node that serves it, or served here.
async fn read(app: &AppState, key: &str) -> Response {
    if let Some(answer) = route(app, key, Access::Read, Method::GET, Bytes::new()).await {
        return answer;
    }
    serve_get(app, key).await
}

/// A read served by this node as the key's owner.
async fn serve_get(app: &AppState, key: &str) -> Response {
    match get_here(app, key) {
        Some(answer) => answer,
        None => after_miss(app, key).await,
    }
}

/// The key from this node's store, as the answer to a read; `None` on a
/// miss (counted as one by the store).
fn get_here(app: &AppState, key: &str) -> Option<Response> {
    let started = Instant::now();
    let body = app.store.get(key, item_json::item_to_vec);
    app.metrics.observe(Op::Get, started.elapsed());
    Some(served(app, StatusCode::OK, body?))
}

/// The answer to a read that missed here: while data is moving the key may
/// still be on its way, so the other owners are asked first.
async fn after_miss(app: &AppState, key: &str) -> Response {
    if let Some(cluster) = &app.cluster
        && cluster.recover(key).await
        && let Some(answer) = get_here(app, key)
    {
        return answer;
    }
    not_found(key)
}

fn not_found(key: &str) -> Response {
    ApiError::not_found(format!("key {key:?} not found")).into_response()
}

async fn set_item(
    State(app): State<Arc<AppState>>,
    method: Method,
    CacheKey(key): CacheKey,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    write(
        &app,
        method,
        &key,
        &headers,
        body.map_err(request::body_error),
    )
    .await
}

/// A client's write of `key` (POST or PUT), validated here so bad input is
/// refused by the node the client talks to and never travels; then sent to
/// the key's coordinator, or coordinated here.
async fn write(
    app: &AppState,
    method: Method,
    key: &str,
    headers: &HeaderMap,
    body: Result<Bytes, ApiError>,
) -> Result<Response, ApiError> {
    let raw = body.as_ref().ok().cloned().unwrap_or_default();
    let req = SetRequest::parse(headers, body, &app.limits)?;
    if let Some(answer) = route(app, key, Access::Write, method, raw).await {
        return Ok(answer);
    }
    coordinate_set(app, key, req).await
}

/// A write this node applies as the key's coordinator: stored here, then
/// replicated to the other owners before the client gets its answer.
async fn coordinate_set(app: &AppState, key: &str, req: SetRequest) -> Result<Response, ApiError> {
    let started = Instant::now();
    let replicate = app.cluster.is_some();
    let stored = app.store.set(key, &req.value, &req.tags, req.ttl, |item| {
        let mut record = RecordBatch::default();
        if replicate {
            record.push(item);
        }
        (item_json::item_to_vec(item), record)
    });
    app.metrics.observe(Op::Set, started.elapsed());
    let (created, (body, record)) = stored.map_err(|e| match e {
        StoreError::TooLarge { .. } => ApiError::too_large(e.to_string()),
        StoreError::TtlTooLarge => ApiError::bad_request(e.to_string()),
    })?;
    let mut created = created;
    if let Some(cluster) = &app.cluster {
        let outcome = cluster.replicate(key, &record, &[]).await;
        // Mid-move this node may not hold the key yet while another owner
        // does: the write replaced it all the same.
        created &= outcome.replaced == 0;
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(served(app, status, body))
}

async fn delete_item(
    State(app): State<Arc<AppState>>,
    CacheKey(key): CacheKey,
) -> Result<Response, ApiError> {
    remove(&app, &key).await
}

/// A client's delete of `key`: sent to its coordinator, or coordinated here.
async fn remove(app: &AppState, key: &str) -> Result<Response, ApiError> {
    if let Some(answer) = route(app, key, Access::Write, Method::DELETE, Bytes::new()).await {
        return Ok(answer);
    }
    coordinate_delete(app, key).await
}

/// A delete this node applies as the key's coordinator, then sends to the
/// other owners. Found if any owner held the key.
async fn coordinate_delete(app: &AppState, key: &str) -> Result<Response, ApiError> {
    let started = Instant::now();
    let at = app.store.now();
    let mut deleted = app.store.delete(key);
    app.metrics.observe(Op::Delete, started.elapsed());
    if let Some(cluster) = &app.cluster {
        deleted |= cluster.replicate_delete(key, at).await;
    }
    if !deleted {
        return Err(ApiError::not_found(format!("key {key:?} not found")));
    }
    let body = serde_json::json!({ "key": key, "deleted": true });
    Ok(served(app, StatusCode::OK, body.to_string().into_bytes()))
}

async fn invalidate_tag(State(app): State<Arc<AppState>>, TagName(tag): TagName) -> Response {
    let started = Instant::now();
    let body = match &app.cluster {
        Some(cluster) => cluster.invalidate_everywhere(&tag).await,
        None => {
            let invalidated = app.store.invalidate_tag(&tag);
            serde_json::json!({ "tag": tag, "invalidated": invalidated })
        }
    };
    app.metrics.observe(Op::InvalidateTag, started.elapsed());
    axum::Json(body).into_response()
}
