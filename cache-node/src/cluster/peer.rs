//! The HTTP client nodes use to reach each other: one pooled, keep-alive
//! HTTP/1.1 client per node, shared by forwarding, replication, rebalancing
//! and fan-out.
//!
//! hyper-util's pooled client is used directly rather than reqwest: a
//! forwarded request is on the client's latency path, and this keeps it to
//! one small allocation-light hop (no redirect, cookie or decompression
//! layers to pass through). Every call has a connect timeout and an overall
//! timeout, and answers are read up to a size bound, so a slow or hostile
//! peer cannot hold a request or the node's memory.

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::wire::{EPOCH_HEADER, FROM_HEADER};

/// An answer from a peer, read whole.
#[derive(Debug)]
pub struct PeerResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl PeerResponse {
    /// The ring epoch the peer reported holding.
    pub fn epoch(&self) -> Option<u64> {
        self.headers
            .get(EPOCH_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// No connection could be made: the request never reached the peer, so
    /// trying another owner is safe even for a write.
    #[error("cannot connect to {addr}: {reason}")]
    Refused { addr: SocketAddr, reason: String },
    /// The connection broke before a whole answer arrived: the peer may or
    /// may not have acted on the request.
    #[error("lost {addr} mid-request: {reason}")]
    Unreachable { addr: SocketAddr, reason: String },
    #[error("{addr} did not answer within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    /// The peer answered with an error status.
    #[error("{addr} answered {status}: {message}")]
    Status {
        addr: SocketAddr,
        status: StatusCode,
        message: String,
    },
    /// The peer held a newer ring, which this node has now adopted: the
    /// caller must plan again with it.
    #[error("the ring changed while talking to {addr}")]
    RingChanged { addr: SocketAddr },
    #[error("{addr} sent an answer this node cannot read: {reason}")]
    BadAnswer { addr: SocketAddr, reason: String },
}

impl PeerError {
    /// Whether trying another owner could help.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            PeerError::Refused { .. } | PeerError::Unreachable { .. } | PeerError::Timeout { .. }
        ) || matches!(self, PeerError::Status { status, .. } if status.is_server_error())
    }

    /// Whether the peer may have acted on the request although no answer
    /// says so (it was delivered, then the connection broke or the time ran
    /// out). Otherwise a write may go to another owner instead without being
    /// applied twice with different outcomes.
    pub fn may_have_acted(&self) -> bool {
        matches!(
            self,
            PeerError::Unreachable { .. } | PeerError::Timeout { .. }
        )
    }
}

/// Timeouts and bounds of peer calls.
#[derive(Debug, Clone, Copy)]
pub struct PeerSettings {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// Largest answer body read from a peer.
    pub max_answer_bytes: usize,
}

pub struct PeerClient {
    client: Client<HttpConnector, Full<Bytes>>,
    from: HeaderValue,
    /// `Bearer <peer token>`, when the peer API requires one.
    authorization: Option<HeaderValue>,
    settings: PeerSettings,
}

impl PeerClient {
    pub fn new(node_id: &str, settings: PeerSettings, token: Option<&str>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(settings.connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(15))
            .pool_max_idle_per_host(256)
            .build(connector);
        Self {
            client,
            from: HeaderValue::from_str(node_id)
                .unwrap_or_else(|_| HeaderValue::from_static("invalid-node-id")),
            authorization: token.and_then(|t| {
                let mut value = HeaderValue::from_str(&format!("Bearer {t}")).ok()?;
                value.set_sensitive(true);
                Some(value)
            }),
            settings,
        }
    }

    pub fn settings(&self) -> PeerSettings {
        self.settings
    }

    /// Sends one request and reads the whole answer. `path` is the path and
    /// query, already percent-encoded. Any status is returned as an answer;
    /// only transport failures are errors.
    pub async fn send(
        &self,
        addr: SocketAddr,
        method: Method,
        path: &str,
        epoch: u64,
        body: Bytes,
        timeout: Option<Duration>,
    ) -> Result<PeerResponse, PeerError> {
        let timeout = timeout.unwrap_or(self.settings.request_timeout);
        let uri = format!("http://{addr}{path}");
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .header(EPOCH_HEADER, epoch)
            .header(FROM_HEADER, self.from.clone());
        if !body.is_empty() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        if let Some(authorization) = &self.authorization {
            request = request.header(header::AUTHORIZATION, authorization.clone());
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| PeerError::BadAnswer {
                addr,
                reason: format!("cannot build a request for {path}: {e}"),
            })?;
        let call = async {
            let response = self.client.request(request).await.map_err(|e| {
                let reason = error_chain(&e);
                if e.is_connect() {
                    PeerError::Refused { addr, reason }
                } else {
                    PeerError::Unreachable { addr, reason }
                }
            })?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, self.settings.max_answer_bytes)
                .collect()
                .await
                .map_err(|e| PeerError::Unreachable {
                    addr,
                    reason: format!("answer broke off: {e}"),
                })?
                .to_bytes();
            Ok(PeerResponse {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| PeerError::Timeout { addr, timeout })?
    }
}

/// An error and its causes on one line (hyper's errors hide the useful part,
/// e.g. "connection refused", in their source chain).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The `{"error": ...}` message of an error answer, or its raw text.
pub fn error_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        error: String,
    }
    serde_json::from_slice::<ErrorBody>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned())
}
