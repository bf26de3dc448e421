//! The cluster as clients and operators see it: `/api/v1/cluster` (the ring
//! this node holds, and which members own a given key), cluster-wide stats,
//! this node's data-movement progress, and the handoff wait used by the
//! pod's preStop hook. On a single node these describe a one-member cluster.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use distrocache_membership::MemberState;
use serde_json::{Value, json};

use super::{ApiError, AppState, ops};

/// `GET /api/v1/cluster[?key=K]`.
pub async fn view(
    State(app): State<Arc<AppState>>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let key = query.get("key");
    if let Some(key) = key
        && key.len() > app.limits.max_key_bytes
    {
        return Err(ApiError::bad_request(format!(
            "key is {} bytes; the limit is {}",
            key.len(),
            app.limits.max_key_bytes
        )));
    }
    let Some(cluster) = &app.cluster else {
        let mut view = json!({
            "nodeId": app.node_id,
            "mode": "single",
            "epoch": 0,
            "members": [{"id": app.node_id, "state": "active"}],
        });
        if let Some(key) = key {
            view["owners"] = json!({"key": key, "primary": app.node_id, "owners": [app.node_id]});
        }
        return Ok(axum::Json(view).into_response());
    };
    let Some(rings) = cluster.rings() else {
        return Ok(axum::Json(json!({
            "nodeId": app.node_id,
            "mode": "cluster",
            "epoch": 0,
            "members": [],
            "ready": cluster.is_ready(),
        }))
        .into_response());
    };
    let ring = &rings.current;
    let members: Vec<Value> = ring
        .members
        .iter()
        .map(|m| json!({"id": m.id, "address": m.address.to_string(), "state": m.state}))
        .collect();
    let mut view = json!({
        "nodeId": app.node_id,
        "mode": "cluster",
        "epoch": ring.epoch(),
        "replicationFactor": ring.replication_factor(),
        "hashing": ring.doc.hashing,
        "memberState": ring.my_state(),
        "members": members,
        "previousEpoch": rings.previous.as_ref().map(|p| p.epoch()),
        "settled": rings.previous.is_none(),
        "ready": cluster.is_ready(),
    });
    if let Some(key) = key {
        let owners: Vec<&str> = ring
            .owners(key.as_bytes())
            .iter()
            .map(|&i| ring.member(i).id.as_str())
            .collect();
        view["owners"] = json!({"key": key, "primary": owners.first(), "owners": owners});
    }
    Ok(axum::Json(view).into_response())
}

/// `GET /api/v1/cluster/stats`: every member's stats and their sums.
pub async fn stats(State(app): State<Arc<AppState>>) -> Response {
    let local = ops::stats_json(&app);
    match &app.cluster {
        Some(cluster) => axum::Json(cluster.cluster_stats(local).await).into_response(),
        None => axum::Json(json!({
            "epoch": 0,
            "totals": local.clone(),
            "nodes": [local],
            "unreachable": [],
        }))
        .into_response(),
    }
}

/// `GET /api/v1/cluster/rebalance`: this node's data-movement progress.
pub async fn rebalance(State(app): State<Arc<AppState>>) -> Result<Response, ApiError> {
    match &app.cluster {
        Some(cluster) => Ok(axum::Json(cluster.report()).into_response()),
        None => Err(ApiError::not_found("this node is not in cluster mode")),
    }
}

/// `GET /api/v1/cluster/handoff[?timeout=60s]`: the preStop hook. Returns at
/// once unless this node is a leaving member still handing its data off; then
/// waits (up to the timeout) until it is done. Always 200, so a stuck
/// handoff delays termination by the timeout and never blocks it forever.
pub async fn handoff(
    State(app): State<Arc<AppState>>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let timeout = match query.get("timeout") {
        Some(t) => humantime::parse_duration(t)
            .map_err(|e| ApiError::bad_request(format!("invalid timeout {t:?}: {e}")))?,
        None => Duration::from_secs(60),
    }
    .min(Duration::from_secs(3600));
    let Some(cluster) = &app.cluster else {
        return Ok(axum::Json(json!({"handoffComplete": true, "waited": 0.0})).into_response());
    };
    let started = Instant::now();
    loop {
        let report = cluster.report();
        let leaving = report.member_state == Some(MemberState::Leaving);
        if !leaving || report.handoff_complete || started.elapsed() >= timeout {
            return Ok(axum::Json(json!({
                "handoffComplete": !leaving || report.handoff_complete,
                "waited": started.elapsed().as_secs_f64(),
                "progress": report,
            }))
            .into_response());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
