//! TLS with rustls (the `ring` provider; no OpenSSL): the client API's
//! server certificate (optionally requiring client certificates), and the
//! peer API's mutual TLS, where every node verifies the other's certificate
//! against the peer CA and against the member's identity.
//!
//! Identity of a member: the DNS name `<member id>.<peer TLS domain>` (with
//! `--peer-tls-domain` set; the operator sets it to the headless Service's
//! name, `<name>-peers.<namespace>.svc`, so a pod's DNS name under the
//! headless Service is its identity, and one certificate with the wildcard
//! `*.<name>-peers.<namespace>.svc` serves every pod), or the member id
//! itself as a DNS SAN when no domain is set. A client checks the server
//! it dials is the member it meant (the ring maps the address to the id);
//! a server checks the connecting node's certificate names the member id
//! it claims in `x-distrocache-from`.
//!
//! The configs are [`Reloadable`]: rebuilt when the certificate, key or CA
//! files change, used by the next handshake.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::reload::Reloadable;

/// The one protocol served over TLS, announced through ALPN.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// A server config that follows its files.
pub type ServerTls = Reloadable<ServerConfig>;
/// A client config that follows its files.
pub type ClientTls = Reloadable<ClientConfig>;

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn invalid(why: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.to_string())
}

/// The certificates of a PEM file (a chain: leaf first).
pub fn certs(pem: &[u8], what: &str) -> io::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("{what}: not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(format!("{what}: no certificate in the file")));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn key(pem: &[u8], what: &str) -> io::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| invalid(format!("{what}: no private key: {e}")))
}

fn roots(pem: &[u8], what: &str) -> io::Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for cert in certs(pem, what)? {
        roots
            .add(cert)
            .map_err(|e| invalid(format!("{what}: not a usable CA certificate: {e}")))?;
    }
    Ok(Arc::new(roots))
}

/// A certificate chain and its key, checked to belong together (a
/// certificate rotated before its key must not be adopted half-way).
fn certified_key(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> io::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let chain = certs(cert_pem, "certificate file")?;
    let key = key(key_pem, "key file")?;
    let signing = provider()
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| invalid(format!("key file: unsupported key: {e}")))?;
    rustls::sign::CertifiedKey::new(chain.clone(), signing)
        .keys_match()
        .map_err(|e| invalid(format!("the key does not match the certificate: {e}")))?;
    Ok((chain, key))
}

/// A server config: `cert` and `key`, and when `client_ca` is given,
/// client certificates required and verified against it. HTTP/1.1 is the
/// only ALPN protocol.
pub fn server_config(
    cert: &[u8],
    key: &[u8],
    client_ca: Option<&[u8]>,
) -> io::Result<ServerConfig> {
    let (chain, key) = certified_key(cert, key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(invalid)?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(roots(ca, "CA file")?, provider())
                    .build()
                    .map_err(|e| invalid(format!("CA file: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| invalid(format!("certificate: {e}")))?;
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(config)
}

/// The peer client's config: servers verified against `ca`, this node's
/// `cert` and `key` presented.
pub fn client_config(ca: &[u8], cert: &[u8], key: &[u8]) -> io::Result<ClientConfig> {
    let (chain, key) = certified_key(cert, key)?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(invalid)?
        .with_root_certificates(roots(ca, "peer CA file")?)
        .with_client_auth_cert(chain, key)
        .map_err(|e| invalid(format!("peer certificate: {e}")))?;
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(config)
}

/// The client API's TLS, from `--tls-cert-file`, `--tls-key-file` and
/// optionally `--tls-client-ca-file`.
pub fn load_server(
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    what: &'static str,
) -> io::Result<Arc<ServerTls>> {
    let mut files = vec![cert, key];
    files.extend(client_ca);
    Reloadable::load(what, files, |f| {
        server_config(&f[0], &f[1], f.get(2).map(Vec::as_slice))
    })
}

/// The peer API's mutual TLS: one certificate serves both directions.
#[derive(Debug)]
pub struct PeerTls {
    /// Served on the peer listener, client certificates required.
    pub server: Arc<ServerTls>,
    /// Used to dial peers.
    pub client: Arc<ClientTls>,
    /// `--peer-tls-domain`: a member's name is `<id>.<domain>`.
    pub domain: Option<String>,
}

impl PeerTls {
    pub fn load(
        cert: PathBuf,
        key: PathBuf,
        ca: PathBuf,
        domain: Option<String>,
    ) -> io::Result<Arc<Self>> {
        let server = load_server(
            cert.clone(),
            key.clone(),
            Some(ca.clone()),
            "peer TLS (server)",
        )?;
        let client = Reloadable::load("peer TLS (client)", vec![ca, cert, key], |f| {
            client_config(&f[0], &f[1], &f[2])
        })?;
        Ok(Arc::new(Self {
            server,
            client,
            domain,
        }))
    }

    /// The DNS name member `id`'s certificate must carry.
    pub fn member_name(&self, id: &str) -> io::Result<ServerName<'static>> {
        member_name(id, self.domain.as_deref())
    }

    /// Whether `cert` (already verified against the CA by the handshake)
    /// names member `id`.
    pub fn names_member(&self, cert: &CertificateDer<'_>, id: &str) -> Result<(), String> {
        let name = self.member_name(id).map_err(|e| e.to_string())?;
        let cert = webpki::EndEntityCert::try_from(cert)
            .map_err(|e| format!("unreadable peer certificate: {e}"))?;
        cert.verify_is_valid_for_subject_name(&name)
            .map_err(|_| format!("the peer certificate does not name member {id:?} ({name:?})"))
    }
}

/// `<id>.<domain>`, or `id` with no domain, as a DNS name.
pub fn member_name(id: &str, domain: Option<&str>) -> io::Result<ServerName<'static>> {
    let name = match domain {
        Some(domain) => format!("{id}.{domain}"),
        None => id.to_owned(),
    };
    ServerName::try_from(name.clone())
        .map_err(|_| invalid(format!("member name {name:?} is not a DNS name")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_refused_with_a_reason() {
        let err = server_config(b"not pem", b"not pem", None).unwrap_err();
        assert!(err.to_string().contains("certificate"), "{err}");
        assert!(member_name("node-0", Some("peers.example")).is_ok());
        assert!(member_name("bad name!", None).is_err());
    }
}
