//! The HTTP client object storage is reached with: hyper's pooled client
//! over rustls (the `ring` provider, as the node's own TLS, and the Mozilla
//! roots bundled, so it works in an image with no CA files), plugged into
//! `object_store` as its [`HttpConnector`].
//!
//! Why not object_store's own reqwest client: its TLS would take the
//! process-wide rustls provider, and cargo unifies reqwest's features over
//! the workspace, so every reqwest client of every crate built with this
//! one (the operator's, the tests') would need that provider installed
//! first or panic. This client configures its TLS explicitly.

use std::time::Duration;

use async_trait::async_trait;
use http_body_util::BodyExt;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector as TcpConnector;
use hyper_util::rt::TokioExecutor;
use object_store::ClientOptions;
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpRequestBody,
    HttpResponse, HttpResponseBody, HttpService,
};

/// Longest wait for a TCP connection to the store.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a response's head (a part upload included: its body is
/// sent before the head comes back). object_store retries what times out.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(120);

/// Makes [`S3Client`]s; plain HTTP only when `allow_http`.
#[derive(Debug, Clone, Copy)]
pub struct S3Connector {
    pub allow_http: bool,
}

impl HttpConnector for S3Connector {
    fn connect(&self, _options: &ClientOptions) -> object_store::Result<HttpClient> {
        let mut tcp = TcpConnector::new();
        tcp.enforce_http(false);
        tcp.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(crate::tls::provider())
            .map_err(|e| object_store::Error::Generic {
                store: "S3",
                source: Box::new(e),
            })?;
        let https = if self.allow_http {
            builder.https_or_http()
        } else {
            builder.https_only()
        }
        .enable_http1()
        .wrap_connector(tcp);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(https);
        Ok(HttpClient::new(S3Client { client }))
    }
}

#[derive(Debug, Clone)]
pub struct S3Client {
    client: Client<HttpsConnector<TcpConnector>, HttpRequestBody>,
}

#[async_trait]
impl HttpService for S3Client {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let response = tokio::time::timeout(RESPONSE_TIMEOUT, self.client.request(req))
            .await
            .map_err(|e| HttpError::new(HttpErrorKind::Timeout, e))?
            .map_err(|e| {
                let kind = if e.is_connect() {
                    HttpErrorKind::Connect
                } else {
                    HttpErrorKind::Request
                };
                HttpError::new(kind, e)
            })?;
        let (parts, body) = response.into_parts();
        let body = body.map_err(|e| HttpError::new(HttpErrorKind::Interrupted, e));
        Ok(HttpResponse::from_parts(parts, HttpResponseBody::new(body)))
    }
}
