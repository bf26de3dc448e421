//! The item routes without the router: reads, writes and deletes of one item
//! (`/api/v1/cache/{key}`) dispatched straight from the connection to the
//! same functions the router's handlers call.
//!
//! Why by hand: a GET of a held item is a store lookup and a few hundred
//! bytes of JSON, and axum's layers around it (path matching, the auth
//! middleware, extractors, the body limit, boxing the request and response
//! bodies) cost more CPU than the lookup, the encoding and hyper together;
//! measured on one core, a read answered here costs about half the user CPU
//! of one through the router. Those are the requests a cache exists for.
//!
//! Only requests this module recognises exactly take it: the method, the
//! path (one segment that percent-decodes to a valid key within its limit),
//! the token if one is required, and no body on a read or delete. Anything
//! else, and every request that would be refused, goes through the router,
//! so each error answer still comes from one place.

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::http::{Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body as _, Incoming};
use percent_encoding::percent_decode_str;

use super::{ApiError, AppState, Surface, auth};

const ITEM_PREFIX: &str = "/api/v1/cache/";

/// A request's answer that will take a while (it awaits a body or a peer),
/// of the same type as the router's.
pub type Pending = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

/// What became of a request offered to the fast path.
pub enum Dispatch {
    /// Answered at once: a read served from this node's store.
    Answered(Response),
    /// Being answered by a future that the connection awaits under the
    /// request's deadline.
    Later(Pending),
    /// Not one of the fast path's: the router takes it.
    Router(Request<Incoming>),
}

/// The item routes of one listener.
#[derive(Clone)]
pub struct FastPath {
    app: Arc<AppState>,
}

impl FastPath {
    /// The fast path of a listener serving `surface`; none for the peer API,
    /// which has no client routes.
    pub fn new(app: Arc<AppState>, surface: Surface) -> Option<Self> {
        (surface != Surface::Peer).then_some(Self { app })
    }

    pub fn dispatch(&self, request: Request<Incoming>) -> Dispatch {
        let key = item_key(request.uri().path(), self.app.limits.max_key_bytes)
            .filter(|_| auth::client_allows(&self.app, request.headers()));
        let Some(key) = key else {
            return Dispatch::Router(request);
        };
        let method = request.method().clone();
        let no_body = request.body().is_end_stream();
        let app = self.app.clone();
        match method {
            Method::GET if no_body => {
                let cluster = app.cluster.as_deref();
                if cluster.is_none_or(|c| c.serves_here(&key)) {
                    if let Some(answer) = super::get_here(&app, &key) {
                        return Dispatch::Answered(answer);
                    }
                    if cluster.is_none_or(|c| !c.is_moving()) {
                        return Dispatch::Answered(super::not_found(&key));
                    }
                    let key = key.into_owned();
                    return Dispatch::Later(Box::pin(async move {
                        Ok(super::after_miss(&app, &key).await)
                    }));
                }
                let key = key.into_owned();
                Dispatch::Later(Box::pin(async move { Ok(super::read(&app, &key).await) }))
            }
            Method::POST | Method::PUT => {
                let key = key.into_owned();
                let (parts, body) = request.into_parts();
                Dispatch::Later(Box::pin(async move {
                    let body = read_body(body, app.limits.max_body_bytes).await;
                    Ok(super::write(&app, method, &key, &parts.headers, body)
                        .await
                        .into_response())
                }))
            }
            Method::DELETE if no_body => {
                let key = key.into_owned();
                Dispatch::Later(Box::pin(async move {
                    Ok(super::remove(&app, &key).await.into_response())
                }))
            }
            _ => Dispatch::Router(request),
        }
    }
}

/// The decoded key of a path `/api/v1/cache/{key}` that the fast path may
/// serve: one segment that percent-decodes, as axum's `Path` does, to a
/// non-empty UTF-8 key within `max_key_bytes`. `None` leaves the request,
/// and any refusal, to the router. Public for the `key_path` fuzz target,
/// which checks it against the router's decoding.
pub fn item_key(path: &str, max_key_bytes: usize) -> Option<Cow<'_, str>> {
    let segment = path.strip_prefix(ITEM_PREFIX)?;
    if segment.is_empty() || segment.contains('/') {
        return None;
    }
    let key = percent_decode_str(segment).decode_utf8().ok()?;
    (key.len() <= max_key_bytes).then_some(key)
}

/// The whole body, up to `limit` bytes, with the router's refusals: 413
/// past the limit, 400 when it broke off.
async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, ApiError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than the limit of {limit} bytes"),
        )),
        Err(e) => Err(ApiError::bad_request(format!(
            "could not read the request body: {e}"
        ))),
    }
}
