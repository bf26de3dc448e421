//! Outcomes as REST answers: the one place that decides an answer's status,
//! headers and body. The shapes are the seed's (the item as JSON, errors as
//! `{"error": "..."}`), plus the cluster views.
//!
//! Every item answer (`/api/v1/cache/...`) names the node that served it in
//! `x-distrocache-served-by`. In cluster mode an answer names the answering
//! node's ring epoch in `x-distrocache-epoch` whenever that is news to the
//! connection ([`EpochTold`]), so a ring-aware client learns when to
//! refresh its copy of the ring.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use serde::Serialize;

use crate::exec::{Failure, ItemStatus, Outcome, ServedBy};
use crate::http::Response;
use crate::peer::{EPOCH_HEADER, SERVED_BY_HEADER};

// The stamp's header names, parsed once: inserting by `&str` parses and
// validates the name on every answer (a tenth of a microsecond each, seen
// in a profile of cluster GETs).
const SERVED_BY: HeaderName = HeaderName::from_static(SERVED_BY_HEADER);
const EPOCH: HeaderName = HeaderName::from_static(EPOCH_HEADER);

const JSON: HeaderValue = HeaderValue::from_static("application/json");
const PROMETHEUS_TEXT: HeaderValue =
    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8");

/// What every answer of one node shares.
pub struct Stamp<'a> {
    /// This node's id, as a header value.
    pub node: &'a HeaderValue,
    /// The ring epoch this answer names: the one held, in cluster mode, when
    /// it is news to the connection.
    pub epoch: Option<u64>,
}

/// How many answers a connection gets at most before one names the epoch
/// again, though it has not changed: the reminder heals a client whose
/// refresh reached a node still on the older ring (it learns the newer one
/// again from a later answer), at a sixty-fourth of the cost of naming it on
/// every answer.
pub const EPOCH_REMINDER_EVERY: u32 = 64;

/// What one client connection has been told of the ring epoch. An answer
/// names the epoch on the connection's first answer, on the first after
/// the node adopts another ring, and on the [`EPOCH_REMINDER_EVERY`]th after
/// the last that named it; the others leave it out. A client that refreshes
/// its ring when an answer names a newer epoch than its own still learns of
/// a change from the first answer after it on each connection, and the
/// header is neither sent nor parsed on the answers in between: parsing it
/// was about 1% of a ring-aware client's CPU per GET, a cost only a
/// cluster has (`bench/HISTORY.md`, session 46).
#[derive(Debug, Default)]
pub struct EpochTold {
    /// The epoch last named.
    epoch: AtomicU64,
    /// Answers left before one names it again; 0 (a new connection's) means
    /// the next one does.
    quiet: AtomicU32,
}

impl EpochTold {
    /// Whether the connection's next answer names `epoch`, noting it if so.
    /// A connection's answers are made one at a time (HTTP/1.1), so these
    /// loads and stores never race; the atomics only make the state
    /// shareable with an answer that is made after an await.
    pub fn names(&self, epoch: u64) -> bool {
        let quiet = self.quiet.load(Ordering::Relaxed);
        if quiet > 0 && self.epoch.load(Ordering::Relaxed) == epoch {
            self.quiet.store(quiet - 1, Ordering::Relaxed);
            return false;
        }
        self.epoch.store(epoch, Ordering::Relaxed);
        self.quiet
            .store(EPOCH_REMINDER_EVERY - 1, Ordering::Relaxed);
        true
    }
}

fn response(status: StatusCode, content_type: HeaderValue, body: impl Into<Bytes>) -> Response {
    let mut response = hyper::Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, content_type);
    response
}

fn json(status: StatusCode, value: &impl Serialize) -> Response {
    let body = serde_json::to_vec(value).expect("answers always serialise");
    response(status, JSON, body)
}

/// A failure as `{"error": ...}` with its status.
pub fn failure(f: &Failure) -> Response {
    let mut answer = json(f.status, &serde_json::json!({ "error": f.message }));
    if f.status == StatusCode::UNAUTHORIZED {
        answer
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    answer
}

/// A known path asked with a method it does not serve: 405, naming the
/// methods it does.
pub fn method_not_allowed(method: &Method, path: &str, allowed: &[Method]) -> Response {
    let mut answer = failure(&Failure::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} is not allowed on {path}"),
    ));
    let allow: Vec<&str> = allowed.iter().map(Method::as_str).collect();
    if let Ok(v) = HeaderValue::from_str(&allow.join(", ")) {
        answer.headers_mut().insert(header::ALLOW, v);
    }
    answer
}

/// The answer to an outcome.
pub fn encode(outcome: Outcome, stamp: &Stamp<'_>) -> Response {
    let (mut answer, served_by) = match outcome {
        Outcome::Item {
            json: body,
            status,
            served_by,
        } => {
            let status = match status {
                ItemStatus::Found | ItemStatus::Replaced => StatusCode::OK,
                ItemStatus::Created => StatusCode::CREATED,
            };
            (response(status, JSON, body), Some(served_by))
        }
        Outcome::Missing { key, served_by } => (
            failure(&Failure::not_found(format!("key {key:?} not found"))),
            Some(served_by),
        ),
        Outcome::Deleted { key, served_by } => (
            json(
                StatusCode::OK,
                &serde_json::json!({ "key": key, "deleted": true }),
            ),
            Some(served_by),
        ),
        Outcome::TagInvalidated(report) => (json(StatusCode::OK, &report), None),
        Outcome::Stats(stats) => (json(StatusCode::OK, &stats), None),
        Outcome::Health(health) => (json(StatusCode::OK, &health), None),
        Outcome::Ready(readiness) => {
            let status = if readiness.error.is_none() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (json(status, &readiness), None)
        }
        Outcome::Metrics(text) => (response(StatusCode::OK, PROMETHEUS_TEXT, text), None),
        Outcome::OpenApi => (
            response(
                StatusCode::OK,
                JSON,
                Bytes::from_static(super::openapi::DOCUMENT.as_bytes()),
            ),
            None,
        ),
        Outcome::ClusterView(view) => (json(StatusCode::OK, &view), None),
        Outcome::ClusterStats(stats) => (json(StatusCode::OK, &stats), None),
        Outcome::Copies(copies) => (json(StatusCode::OK, &copies), None),
        Outcome::Progress(progress) => (json(StatusCode::OK, &progress), None),
        Outcome::Handoff(handoff) => (json(StatusCode::OK, &handoff), None),
        Outcome::Backup(uploaded) => (json(StatusCode::CREATED, &uploaded), None),
        Outcome::Failed(f) => (failure(&f), None),
    };
    let headers = answer.headers_mut();
    match served_by {
        Some(ServedBy::Here) => {
            headers.insert(SERVED_BY, stamp.node.clone());
        }
        Some(ServedBy::Peer(id)) => {
            if let Ok(v) = HeaderValue::from_str(&id) {
                headers.insert(SERVED_BY, v);
            }
        }
        None => {}
    }
    stamp.epoch_on(answer)
}

impl Stamp<'_> {
    /// `answer` naming the ring epoch, when this stamp does: any answer of
    /// the API may, refusals included, so a ring-aware client learns of a
    /// new ring from whichever answer comes first.
    pub fn epoch_on(&self, mut answer: Response) -> Response {
        if let Some(epoch) = self.epoch {
            answer.headers_mut().insert(EPOCH, HeaderValue::from(epoch));
        }
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_told_the_epoch_first_on_change_and_as_a_reminder() {
        let told = EpochTold::default();
        assert!(told.names(7), "the first answer");
        for n in 1..EPOCH_REMINDER_EVERY {
            assert!(!told.names(7), "answer {n} after the first");
        }
        assert!(told.names(7), "the reminder");
        assert!(!told.names(7), "the answer after the reminder");
        assert!(told.names(8), "the first answer after a new ring");
        assert!(!told.names(8));
        // Any other epoch is news, an older one too.
        assert!(told.names(5));
        assert!(!told.names(5));
    }

    #[test]
    fn the_first_answer_names_any_epoch_even_the_first_and_the_last() {
        for epoch in [0, 1, u64::MAX] {
            let told = EpochTold::default();
            assert!(told.names(epoch), "epoch {epoch}");
            assert!(!told.names(epoch), "epoch {epoch}");
        }
    }
}
