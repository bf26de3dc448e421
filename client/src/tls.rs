//! TLS to the nodes' client API (nodes started with `--tls-cert-file`, or a
//! `DistroCache` with `spec.tls`): rustls on the `ring` provider, as the
//! nodes use, with HTTP/1.1 offered through ALPN.
//!
//! One name for every node. The nodes share the client API's certificate,
//! which names the cache's Service (the operator's cert-manager
//! `Certificate` lists `<name>`, `<name>.<namespace>`, `<name>.<namespace>.svc`
//! and `<name>.<namespace>.svc.cluster.local`), while this client reaches
//! each member at the address the ring gives it, usually a pod IP. So each
//! node's certificate is checked against one server name: the first seed's
//! host unless [`crate::Builder::tls_server_name`] says otherwise. A client
//! seeded with `https://orders.shop.svc:8080` checks every member against
//! `orders.shop.svc`, which is what a client of the Service would check.
//!
//! Trust: the CA certificates the caller gives ([`crate::Builder::ca_pem`],
//! e.g. the `ca.crt` of the cache's TLS Secret, which a private issuer such
//! as cert-manager's writes), or else the public roots (`webpki-roots`).
//!
//! Mutual TLS: nodes started with `--tls-client-ca-file` ask every client
//! for a certificate; [`crate::Builder::client_cert_pem`] gives the one this
//! client presents. With TLS 1.3 such a node judges the client's
//! certificate after the client has finished its side of the handshake, so
//! a certificate it refuses (or none at all) shows up as an alert on the
//! connection's first read rather than in the handshake. [`Watched`] keeps
//! that alert ([`Refusal`]) so that the pool can tell a request the node
//! never read, and why, from one lost in flight: hyper reports the first as
//! a bare "canceled" or a connection error.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// How a client opens TLS to any node.
pub(crate) struct Tls {
    connector: TlsConnector,
    /// What every node's certificate must name.
    name: ServerName<'static>,
}

impl Tls {
    /// Trusting the CA certificates of `ca_pem` (PEM), or the public roots
    /// when `None`; every node's certificate checked against `name` (a DNS
    /// name or an IP address); presenting `client_cert` (a PEM certificate
    /// chain and its PEM private key) to nodes that ask for one.
    pub(crate) fn new(
        ca_pem: Option<&[u8]>,
        name: &str,
        client_cert: Option<(&[u8], &[u8])>,
    ) -> Result<Self, String> {
        let roots = match ca_pem {
            Some(pem) => {
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(pem) {
                    let cert = cert.map_err(|e| format!("CA certificates: not PEM: {e}"))?;
                    roots
                        .add(cert)
                        .map_err(|e| format!("CA certificates: not a usable CA: {e}"))?;
                }
                if roots.is_empty() {
                    return Err("CA certificates: no certificate in the PEM".into());
                }
                roots
            }
            None => RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            },
        };
        let builder =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS: {e}"))?
                .with_root_certificates(roots);
        let mut config = match client_cert {
            None => builder.with_no_client_auth(),
            Some((cert_pem, key_pem)) => {
                let (chain, key) = client_identity(cert_pem, key_pem)?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("client certificate: {e}"))?
            }
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = ServerName::try_from(name.to_owned())
            .map_err(|e| format!("TLS server name {name:?}: {e}"))?;
        Ok(Self {
            connector: TlsConnector::from(Arc::new(config)),
            name,
        })
    }

    /// The handshake on a connected socket; the stream keeps the alert the
    /// node may end the connection with.
    pub(crate) async fn handshake(&self, stream: TcpStream) -> io::Result<(Watched, Refusal)> {
        let stream = self.connector.connect(self.name.clone(), stream).await?;
        let refusal = Refusal::default();
        let watched = Watched {
            stream,
            refusal: refusal.clone(),
        };
        Ok((watched, refusal))
    }
}

/// The alert a node's TLS ended a connection with, once one came.
#[derive(Clone, Default)]
pub(crate) struct Refusal(Arc<OnceLock<AlertDescription>>);

impl Refusal {
    pub(crate) fn alert(&self) -> Option<AlertDescription> {
        self.0.get().copied()
    }
}

/// A TLS stream that notes in its [`Refusal`] the alert a read fails with.
pub(crate) struct Watched {
    stream: TlsStream<TcpStream>,
    refusal: Refusal,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let Poll::Ready(Err(e)) = &read
            && let Some(alert) = alert_of(e)
        {
            let _ = this.refusal.0.set(alert);
        }
        read
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The alert in a TLS stream's read error, if it is one: tokio-rustls
/// reports rustls' errors inside an `io::Error`.
fn alert_of(e: &io::Error) -> Option<AlertDescription> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(alert) => Some(*alert),
        _ => None,
    }
}

/// The certificate chain and private key a client presents, from PEM.
fn client_identity(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("client certificate: not PEM: {e}"))?;
    if chain.is_empty() {
        return Err("client certificate: no certificate in the PEM".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("client key: no PEM private key: {e}"))?;
    Ok((chain, key))
}

/// The host of a seed's `host:port` (`[v6]:port` too), the default server
/// name.
pub(crate) fn seed_host(seed: &str) -> &str {
    let host = seed.rsplit_once(':').map_or(seed, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_host_is_its_address_without_the_port() {
        assert_eq!(seed_host("orders.shop.svc:8080"), "orders.shop.svc");
        assert_eq!(seed_host("127.0.0.1:8443"), "127.0.0.1");
        assert_eq!(seed_host("[::1]:8443"), "::1");
        assert_eq!(seed_host("cache"), "cache");
    }

    #[test]
    fn bad_ca_pem_and_names_are_refused_with_a_reason() {
        let err = Tls::new(Some(b"not pem"), "cache", None)
            .err()
            .expect("refused");
        assert!(err.contains("no certificate"), "{err}");
        let err = Tls::new(None, "not a name!", None).err().expect("refused");
        assert!(err.contains("server name"), "{err}");
        assert!(Tls::new(None, "cache.example", None).is_ok());
        assert!(Tls::new(None, "10.0.0.7", None).is_ok());
    }

    #[test]
    fn a_client_certificate_needs_a_certificate_and_its_key() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["client".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (cert, key) = (cert.pem(), key.serialize_pem());
        let identity =
            |c: &str, k: &str| Tls::new(None, "cache", Some((c.as_bytes(), k.as_bytes()))).err();
        assert_eq!(identity(&cert, &key), None);
        let err = identity("", &key).expect("no certificate");
        assert!(err.contains("client certificate: no certificate"), "{err}");
        let err = identity(&cert, "not a key").expect("no key");
        assert!(err.contains("client key"), "{err}");
        // The certificate in place of its key.
        let err = identity(&cert, &cert).expect("a certificate is no key");
        assert!(err.contains("client key"), "{err}");
    }

    #[test]
    fn an_alert_is_told_from_other_read_errors() {
        let alert = rustls::Error::AlertReceived(AlertDescription::CertificateRequired);
        let io = io::Error::new(io::ErrorKind::InvalidData, alert);
        assert_eq!(alert_of(&io), Some(AlertDescription::CertificateRequired));
        let other = io::Error::new(io::ErrorKind::InvalidData, rustls::Error::DecryptError);
        assert_eq!(alert_of(&other), None);
        assert_eq!(
            alert_of(&io::Error::from(io::ErrorKind::ConnectionReset)),
            None
        );
    }
}
