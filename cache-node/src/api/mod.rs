//! The REST API: one dispatcher for every route of a listener. It matches
//! the path (axum's own router, `matchit`, without the rest of axum: no
//! layers, no extractors, no boxed bodies), checks the method and the
//! bearer token, decodes the key or tag and bounds it, reads and validates
//! a write's body, turns the request into one typed [`Operation`], hands it
//! to the [`Executor`], and encodes the [`Outcome`] as the answer
//! ([`answer`]). Each of those is done once, here, for every route; every
//! refusal is a JSON error.
//!
//! Paths, JSON shapes and status codes are the seed's, so its clients switch
//! without a change: `/api/v1/cache/{key}` (GET, POST, PUT, DELETE),
//! `/api/v1/invalidate/tag/{tag}`, `/api/v1/stats`, `/api/v1/health`,
//! `/metrics`; plus `/api/v1/ready` for readiness probes, the cluster views
//! under `/api/v1/cluster`, and `/internal/v1/connect`, where other nodes
//! open peer-protocol connections (see `peer`).

pub mod answer;
pub mod auth;
pub mod openapi;
pub mod request;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use distrocache_membership::{CLUSTER_PATH, PROGRESS_PATH};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri, header};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::exec::{Execution, Executor, Failure, Limits, Operation, Outcome};
use crate::http::{self, Conn, Dispatch, Response};
use crate::peer::{self, PROTOCOL};
use answer::EpochTold;
use auth::Tokens;

/// Which part of the HTTP surface a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// The client API and the peer API on one port.
    All,
    /// The client API only (the peer API has a port of its own).
    Client,
    /// The peer API only.
    Peer,
    /// What probes, Prometheus and the operator read (health, readiness,
    /// metrics, rebalance and handoff progress), on the plain
    /// `--probe-port` listener: never data.
    Probe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Item,
    InvalidateTag,
    Stats,
    Health,
    Ready,
    Metrics,
    Cluster,
    ClusterStats,
    ClusterCopies,
    Rebalance,
    Handoff,
    Backup,
    OpenApi,
    PeerConnect,
}

/// Who may use a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Guard {
    /// Probes, Prometheus and the operator, even with auth on: counters and
    /// progress, never data.
    Open,
    /// The client token, when one is configured.
    Client,
    /// The peer token.
    Peer,
}

const GET: &[Method] = &[Method::GET, Method::HEAD];
const POST: &[Method] = &[Method::POST];
const PUT: &[Method] = &[Method::PUT];
const ITEM: &[Method] = &[
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::DELETE,
];

impl Route {
    fn methods(self) -> &'static [Method] {
        match self {
            Route::Item => ITEM,
            Route::InvalidateTag => POST,
            Route::Backup => PUT,
            _ => GET,
        }
    }

    fn guard(self) -> Guard {
        match self {
            Route::Health
            | Route::Ready
            | Route::Metrics
            | Route::Rebalance
            | Route::Handoff
            | Route::OpenApi => Guard::Open,
            Route::PeerConnect => Guard::Peer,
            _ => Guard::Client,
        }
    }
}

/// The settings of peer connections accepted on a listener.
#[derive(Debug, Clone)]
pub struct PeerEndpoint {
    pub max_message_bytes: usize,
    pub drain_timeout: Duration,
    /// Fires when the node shuts down: peer connections go away.
    pub shutdown: CancellationToken,
    /// Where peer connections are tracked, so shutdown waits for them.
    pub tracker: TaskTracker,
    /// Peer mutual TLS: the connecting node's certificate must name the
    /// member it says it is.
    pub tls: Option<Arc<crate::tls::PeerTls>>,
}

/// The dispatcher of one listener.
#[derive(Clone)]
pub struct Api {
    inner: Arc<Inner>,
}

struct Inner {
    exec: Arc<Executor>,
    routes: matchit::Router<Route>,
    tokens: Tokens,
    limits: Limits,
    /// This node's id, for `x-distrocache-served-by`.
    node: HeaderValue,
    peer: Option<PeerEndpoint>,
}

impl Api {
    /// The dispatcher of a listener serving `surface`; `peer` is where peer
    /// connections are served, when the surface includes the peer API.
    pub fn new(
        exec: Arc<Executor>,
        surface: Surface,
        tokens: Tokens,
        peer: PeerEndpoint,
    ) -> Result<Self, Failure> {
        let node = HeaderValue::from_str(&exec.node_id)
            .map_err(|_| Failure::bad_request("node id must be printable ASCII"))?;
        let mut routes = matchit::Router::new();
        let client: &[(&str, Route)] = &[
            ("/api/v1/cache/{key}", Route::Item),
            ("/api/v1/invalidate/tag/{tag}", Route::InvalidateTag),
            ("/api/v1/stats", Route::Stats),
            ("/api/v1/health", Route::Health),
            ("/api/v1/openapi.json", Route::OpenApi),
            ("/api/v1/ready", Route::Ready),
            ("/metrics", Route::Metrics),
            (CLUSTER_PATH, Route::Cluster),
            ("/api/v1/cluster/stats", Route::ClusterStats),
            ("/api/v1/cluster/copies", Route::ClusterCopies),
            (PROGRESS_PATH, Route::Rebalance),
            ("/api/v1/cluster/handoff", Route::Handoff),
            ("/api/v1/backups/{id}", Route::Backup),
        ];
        let peers: &[(&str, Route)] = &[(peer::CONNECT_PATH, Route::PeerConnect)];
        let table: Vec<&(&str, Route)> = match surface {
            Surface::All => client.iter().chain(peers).collect(),
            Surface::Client => client.iter().collect(),
            Surface::Peer => peers.iter().collect(),
            Surface::Probe => client
                .iter()
                .filter(|(_, route)| route.guard() == Guard::Open)
                .collect(),
        };
        for (path, route) in table {
            routes
                .insert(*path, *route)
                .expect("the route table has no conflicts");
        }
        let serves_peers = matches!(surface, Surface::All | Surface::Peer);
        Ok(Self {
            inner: Arc::new(Inner {
                limits: exec.limits,
                exec,
                routes,
                tokens,
                node,
                peer: serves_peers.then_some(peer),
            }),
        })
    }
}

/// Why a request was refused from its head alone.
#[derive(Debug)]
pub enum Refusal {
    Failed(Failure),
    /// A known path asked with a method it does not serve.
    Method {
        method: Method,
        path: String,
        allowed: &'static [Method],
    },
}

impl Refusal {
    pub fn answer(&self) -> Response {
        match self {
            Refusal::Failed(f) => answer::failure(f),
            Refusal::Method {
                method,
                path,
                allowed,
            } => answer::method_not_allowed(method, path, allowed),
        }
    }
}

impl From<Failure> for Refusal {
    fn from(f: Failure) -> Self {
        Refusal::Failed(f)
    }
}

/// A request as the dispatcher understood it from its head.
#[derive(Debug)]
pub enum Parsed {
    /// An operation, ready to execute.
    Op(Operation),
    /// A write of `key`, whose body is still to be read.
    Write { key: String },
    /// A peer asking to open a peer-protocol connection.
    PeerConnect,
}

impl http::Service for Api {
    type PerConnection = EpochTold;

    fn call(&self, request: Request<Incoming>, conn: &Conn<EpochTold>) -> Dispatch {
        let told = conn.kept();
        let parsed = self.parse(request.method(), request.uri(), request.headers());
        match parsed {
            Ok(Parsed::Op(op)) => self.inner.run(op, told),
            Ok(Parsed::Write { key }) => self.inner.write(key, request, told),
            Ok(Parsed::PeerConnect) => Dispatch::Now(
                self.inner
                    .stamp_answer(told)
                    .epoch_on(self.inner.connect(request, conn)),
            ),
            Err(refusal) => Dispatch::Now(self.inner.stamp_answer(told).epoch_on(refusal.answer())),
        }
    }
}

impl Api {
    /// Routes a request by its head: the route, the method, the token, the
    /// key or tag and the query, each checked once; any refusal is the
    /// answer. Public for the `key_path` fuzz target, which drives it and
    /// the executor in process.
    pub fn parse(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Result<Parsed, Refusal> {
        self.inner.parse(method, uri, headers)
    }

    /// Executes an operation and encodes its outcome, as `call` does for a
    /// connection's first answer.
    /// For the `key_path` fuzz target (the `test-util` feature).
    #[cfg(feature = "test-util")]
    pub async fn answer(&self, parsed: Parsed, headers: &HeaderMap, body: Bytes) -> Response {
        let inner = &self.inner;
        let outcome = match parsed {
            Parsed::Op(op) => match inner.exec.execute(op) {
                Execution::Now(outcome) => outcome,
                Execution::Later(outcome) => outcome.await,
            },
            Parsed::Write { key } => {
                inner
                    .set(key, request::write(headers, body, &inner.limits))
                    .await
            }
            Parsed::PeerConnect => Outcome::Failed(Failure::bad_request("not an upgrade")),
        };
        answer::encode(outcome, &inner.stamp_answer(&EpochTold::default()))
    }
}

impl Inner {
    fn parse(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Result<Parsed, Refusal> {
        let path = uri.path();
        let Ok(matched) = self.routes.at(path) else {
            return Err(Failure::not_found(format!("no route for {method} {path}")).into());
        };
        let route = *matched.value;
        if !route.methods().contains(method) {
            return Err(Refusal::Method {
                method: method.clone(),
                path: path.to_owned(),
                allowed: route.methods(),
            });
        }
        let token = match route.guard() {
            Guard::Open => None,
            Guard::Client => self.tokens.client.as_deref(),
            Guard::Peer => self.tokens.peer.as_deref(),
        };
        auth::check(token, headers)?;
        let segment = |name: &str| matched.params.get(name).unwrap_or_default();
        let op = match route {
            Route::Item => {
                let key = request::key(segment("key"), &self.limits)?;
                match *method {
                    Method::POST | Method::PUT => return Ok(Parsed::Write { key }),
                    Method::DELETE => Operation::Delete { key },
                    _ => Operation::Get { key },
                }
            }
            Route::InvalidateTag => Operation::InvalidateTag {
                tag: request::tag(segment("tag"), &self.limits)?,
            },
            Route::Stats => Operation::Stats,
            Route::Health => Operation::Health,
            Route::Ready => Operation::Ready,
            Route::Metrics => Operation::Metrics,
            Route::Cluster => Operation::ClusterView {
                key: self.query_key(uri, false)?,
            },
            Route::ClusterStats => Operation::ClusterStats,
            Route::ClusterCopies => Operation::Copies {
                key: self.query_key(uri, true)?.expect("required"),
            },
            Route::Rebalance => Operation::Rebalance,
            Route::Handoff => {
                let query = request::query(uri.query(), &["timeout", "epoch"])?;
                let mut timeout = Duration::from_secs(60);
                let mut epoch = None;
                for (name, value) in &query {
                    match *name {
                        "timeout" => {
                            timeout = parse_timeout(value).ok_or_else(|| {
                                Failure::bad_request(format!(
                                    "invalid timeout {value:?}: a whole number and a unit (ms, s, m or h), e.g. 30s"
                                ))
                            })?;
                        }
                        _ => {
                            epoch = Some(value.parse::<u64>().map_err(|_| {
                                Failure::bad_request(format!(
                                    "invalid epoch {value:?}: a ring epoch (unsigned integer)"
                                ))
                            })?);
                        }
                    }
                }
                Operation::Handoff {
                    timeout: timeout.min(Duration::from_secs(3600)),
                    epoch,
                }
            }
            Route::Backup => {
                request::query(uri.query(), &[])?;
                let id = segment("id");
                crate::backup::check_id(id).map_err(|e| Failure::bad_request(e.to_string()))?;
                Operation::Backup { id: id.to_owned() }
            }
            Route::OpenApi => Operation::OpenApi,
            Route::PeerConnect => {
                // The route takes no query: refuse one (as JSON, like every
                // refusal) rather than ignore what a caller meant.
                request::query(uri.query(), &[])?;
                return Ok(Parsed::PeerConnect);
            }
        };
        Ok(Parsed::Op(op))
    }

    /// The `key` query field of the cluster views (`required`: refused
    /// without one).
    fn query_key(&self, uri: &Uri, required: bool) -> Result<Option<String>, Failure> {
        let query = request::query(uri.query(), &["key"])?;
        let key = query.into_iter().next().map(|(_, key)| key);
        match &key {
            Some(key) => self.limits.check_key(key)?,
            None if required => {
                return Err(Failure::bad_request("the query field `key` is required"));
            }
            None => {}
        }
        Ok(key)
    }

    /// The stamp of the answer being made on a connection that has been
    /// `told` what it has of the ring epoch. Called once per answer, as it
    /// is made: it notes what the answer tells the connection.
    fn stamp_answer(&self, told: &EpochTold) -> answer::Stamp<'_> {
        answer::Stamp {
            node: &self.node,
            epoch: self
                .exec
                .cluster
                .as_ref()
                .map(|c| c.epoch())
                .filter(|&epoch| told.names(epoch)),
        }
    }

    fn run(self: &Arc<Self>, op: Operation, told: &Arc<EpochTold>) -> Dispatch {
        match self.exec.execute(op) {
            Execution::Now(outcome) => {
                Dispatch::Now(answer::encode(outcome, &self.stamp_answer(told)))
            }
            Execution::Later(outcome) => {
                let api = self.clone();
                let told = told.clone();
                Dispatch::Later(Box::pin(async move {
                    answer::encode(outcome.await, &api.stamp_answer(&told))
                }))
            }
        }
    }

    /// A write (POST or PUT): the body read within its limit and validated
    /// here, so bad input is refused by the node the client talks to and
    /// never travels; then executed.
    fn write(
        self: &Arc<Self>,
        key: String,
        request: Request<Incoming>,
        told: &Arc<EpochTold>,
    ) -> Dispatch {
        let api = self.clone();
        let told = told.clone();
        Dispatch::Later(Box::pin(async move {
            let (parts, body) = request.into_parts();
            let write = match read_body(body, api.limits.max_body_bytes).await {
                Ok(body) => request::write(&parts.headers, body, &api.limits),
                Err(f) => Err(f),
            };
            answer::encode(api.set(key, write).await, &api.stamp_answer(&told))
        }))
    }

    async fn set(&self, key: String, write: Result<crate::exec::Write, Failure>) -> Outcome {
        match write {
            Ok(write) => match self.exec.execute(Operation::Set { key, write }) {
                Execution::Now(outcome) => outcome,
                Execution::Later(outcome) => outcome.await,
            },
            Err(f) => Outcome::Failed(f),
        }
    }

    /// `GET /internal/v1/connect` with `Upgrade: distrocache-peer/1`: a peer
    /// opening a connection of the peer protocol. Answered 101, then served
    /// by the peer server for as long as the peer keeps it; it keeps its
    /// place among the listener's connections meanwhile.
    fn connect(self: &Arc<Self>, request: Request<Incoming>, conn: &Conn<EpochTold>) -> Response {
        let Some(endpoint) = self.peer.clone() else {
            return answer::failure(&Failure::not_found("no peer API on this listener"));
        };
        if self.exec.cluster.is_none() {
            return answer::failure(&Failure::not_found("this node is not in cluster mode"));
        }
        let upgrade = request
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok());
        if !upgrade.is_some_and(|u| u.eq_ignore_ascii_case(PROTOCOL)) {
            let mut refusal = answer::failure(&Failure::new(
                StatusCode::UPGRADE_REQUIRED,
                format!("peer connections must ask for Upgrade: {PROTOCOL}"),
            ));
            refusal
                .headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_static(PROTOCOL));
            return refusal;
        }
        if let Some(tls) = &endpoint.tls {
            // The handshake verified the certificate against the peer CA;
            // here, that it is the certificate of the member it claims to be.
            let from = request
                .headers()
                .get(peer::FROM_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let named = match conn.peer_certificate() {
                Some(cert) => tls.names_member(cert, from),
                None => Err("no client certificate".to_owned()),
            };
            if let Err(why) = named {
                tracing::warn!(%from, %why, "refused a peer connection");
                return answer::failure(&Failure::new(
                    StatusCode::FORBIDDEN,
                    format!("peer certificate refused: {why}"),
                ));
            }
        }
        let slot = conn.keep_slot();
        let exec = self.exec.clone();
        endpoint.tracker.clone().spawn(async move {
            let _slot = slot;
            let settings = (
                endpoint.max_message_bytes,
                endpoint.drain_timeout,
                endpoint.shutdown,
            );
            match http::upgraded(request).await {
                Ok((http::Stream::Plain(stream), read_buf)) => {
                    let (read, write) = stream.into_split();
                    serve_peer(read, write, read_buf, exec, settings).await;
                }
                Ok((http::Stream::Tls(stream), read_buf)) => {
                    let (read, write) = tokio::io::split(*stream);
                    serve_peer(read, write, read_buf, exec, settings).await;
                }
                Err(e) => tracing::debug!(error = %e, "a peer connection failed to upgrade"),
            }
        });
        let mut switching = hyper::Response::new(http_body_util::Full::new(Bytes::new()));
        *switching.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = switching.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static(PROTOCOL));
        headers.insert(
            peer::FEATURES_HEADER,
            HeaderValue::from_static(peer::FEATURES),
        );
        switching
    }
}

/// Serves an upgraded peer connection (plain: TCP's own halves; TLS: a
/// split of the TLS stream).
async fn serve_peer<R, W>(
    read: R,
    write: W,
    read_buf: Bytes,
    exec: Arc<Executor>,
    (max_message_bytes, drain_timeout, shutdown): (usize, Duration, CancellationToken),
) where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    peer::server::serve(
        read,
        write,
        read_buf,
        exec,
        max_message_bytes,
        drain_timeout,
        shutdown,
    )
    .await;
}

/// The whole body, up to `limit` bytes: 413 past the limit, 400 when it
/// broke off.
async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, Failure> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Failure::too_large(format!(
            "request body is larger than the limit of {limit} bytes"
        ))),
        Err(e) => Err(Failure::bad_request(format!(
            "could not read the request body: {e}"
        ))),
    }
}

/// The handoff timeout as the OpenAPI document describes it,
/// `^[0-9]+(ms|s|m|h)$`: exactly that and nothing more lenient, so the
/// document and the server agree (schemathesis found `timeout=0` accepted).
fn parse_timeout(text: &str) -> Option<Duration> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    if number.is_empty() {
        return None;
    }
    // Any run of digits is in the grammar; past u64 is past the cap anyway
    // (schemathesis sent `3483510991944527841670077h`).
    let n: u64 = number.parse().unwrap_or(u64::MAX);
    let per: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    // Beyond u64 milliseconds is beyond the 1 h cap anyway.
    Some(Duration::from_millis(n.saturating_mul(per)))
}

#[cfg(test)]
mod timeout_tests {
    use super::*;

    #[test]
    fn parse_timeout_takes_exactly_the_documented_grammar() {
        assert_eq!(parse_timeout("35s"), Some(Duration::from_secs(35)));
        assert_eq!(parse_timeout("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_timeout("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_timeout("0s"), Some(Duration::ZERO));
        for bad in [
            "", "0", "s", "1.5s", "1h30m", "1 s", "-1s", "1sec", "1d", " 1s",
        ] {
            assert_eq!(parse_timeout(bad), None, "{bad:?}");
        }
        assert_eq!(
            parse_timeout("99999999999999999999h"),
            Some(Duration::from_millis(u64::MAX)),
            "more digits than u64 holds: past the cap all the same"
        );
        assert_eq!(
            parse_timeout("18446744073709551615h"),
            Some(Duration::from_millis(u64::MAX))
        );
    }
}
