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

use std::io;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
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
    /// name or an IP address).
    pub(crate) fn new(ca_pem: Option<&[u8]>, name: &str) -> Result<Self, String> {
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
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS: {e}"))?
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = ServerName::try_from(name.to_owned())
            .map_err(|e| format!("TLS server name {name:?}: {e}"))?;
        Ok(Self {
            connector: TlsConnector::from(Arc::new(config)),
            name,
        })
    }

    /// The handshake on a connected socket.
    pub(crate) async fn handshake(&self, stream: TcpStream) -> io::Result<TlsStream<TcpStream>> {
        self.connector.connect(self.name.clone(), stream).await
    }
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
        let err = Tls::new(Some(b"not pem"), "cache").err().expect("refused");
        assert!(err.contains("no certificate"), "{err}");
        let err = Tls::new(None, "not a name!").err().expect("refused");
        assert!(err.contains("server name"), "{err}");
        assert!(Tls::new(None, "cache.example").is_ok());
        assert!(Tls::new(None, "10.0.0.7").is_ok());
    }
}
