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
//! for a certificate. [`crate::Builder::client_cert_pem`] gives the one this
//! client presents, or [`crate::Builder::client_cert_files`] the files it is
//! read from, read again when they change ([`Identity`]), so a certificate
//! renewed in a mounted Secret is presented without a restart. With TLS 1.3
//! such a node judges the client's certificate after the client has
//! finished its side of the handshake, so a certificate it refuses (or none
//! at all) shows up as an alert on the connection's first read rather than
//! in the handshake. [`Watched`] keeps that alert ([`Refusal`]) so that the
//! pool can tell a request the node never read, and why, from one lost in
//! flight: without it, the first looks like a connection that closed
//! before its answer.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::{AlertDescription, ClientConfig, RootCertStore, SignatureScheme};
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
    /// name or an IP address); presenting `client_cert` to nodes that ask
    /// for one.
    pub(crate) fn new(
        ca_pem: Option<&[u8]>,
        name: &str,
        client_cert: Option<&ClientCert>,
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
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots);
        let mut config = match client_cert {
            None => builder.with_no_client_auth(),
            Some(cert) => {
                builder.with_client_cert_resolver(Arc::new(Identity::new(cert, provider)?))
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

/// The alert a node's TLS refused this client's certificate with, once one
/// came.
#[derive(Clone, Default)]
pub(crate) struct Refusal(Arc<OnceLock<AlertDescription>>);

impl Refusal {
    pub(crate) fn alert(&self) -> Option<AlertDescription> {
        self.0.get().copied()
    }
}

/// A TLS stream that notes in its [`Refusal`] the refusal a read fails with.
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

/// The alert in a TLS stream's read error when it is one a server refuses
/// a client's certificate with (none, an untrusted, expired or revoked one,
/// a signature that does not verify): the alerts a TLS 1.3 server can send
/// once the client's side of the handshake is done and before it reads any
/// request. Any other alert (an internal error, say) might follow an answer
/// and so says nothing about whether the request was read. tokio-rustls
/// reports rustls' errors inside an `io::Error`.
fn alert_of(e: &io::Error) -> Option<AlertDescription> {
    use AlertDescription::*;
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(
            alert @ (CertificateRequired
            | BadCertificate
            | UnsupportedCertificate
            | CertificateRevoked
            | CertificateExpired
            | CertificateUnknown
            | UnknownCA
            | AccessDenied
            | DecryptError),
        ) => Some(*alert),
        _ => None,
    }
}

/// Where the certificate a client presents comes from.
/// (Not `Debug`: it may hold a private key.)
pub(crate) enum ClientCert {
    /// A PEM certificate chain and its PEM private key, given once.
    Pem(Vec<u8>, Vec<u8>),
    /// Files holding them, read again when they change.
    Files(PathBuf, PathBuf),
}

/// How often, at most, [`ClientCert::Files`] are looked at again: when a
/// new connection's handshake asks for the certificate and this long has
/// passed since the last look.
const RECHECK: Duration = Duration::from_secs(1);
/// Largest certificate or key file read (a long chain fits many times).
const MAX_FILE_BYTES: u64 = 1 << 20;

/// The certificate this client presents, as rustls asks for it in each
/// handshake. Files are re-read there rather than by a task of their own:
/// a client has no background work otherwise, and two small reads at most
/// once a second, only while new connections are opened, cost less than a
/// timer. A pair that does not make a certificate and its key (a
/// certificate written before its key, a half-written file) is not used:
/// the last good one stays in use, and the files are tried again at the
/// next look.
struct Identity {
    files: Option<(PathBuf, PathBuf)>,
    provider: Arc<CryptoProvider>,
    held: Mutex<Held>,
}

/// rustls asks resolvers to be `Debug`; this one names its files and never
/// shows the key it holds.
impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

struct Held {
    /// The certificate chain and the signing key presented.
    key: Arc<CertifiedKey>,
    /// A digest of the files it was made from, to tell whether they
    /// changed (unused when given as PEM); the key's PEM is not kept.
    digest: u64,
    looked: Instant,
}

impl Identity {
    fn new(cert: &ClientCert, provider: Arc<CryptoProvider>) -> Result<Self, String> {
        let (key, digest, files) = match cert {
            ClientCert::Pem(cert, key) => (certified(cert, key, &provider)?, 0, None),
            ClientCert::Files(cert_file, key_file) => {
                let (cert, key) = read_pair(cert_file, key_file)?;
                let digest = digest(&cert, &key);
                let files = Some((cert_file.clone(), key_file.clone()));
                (certified(&cert, &key, &provider)?, digest, files)
            }
        };
        Ok(Self {
            files,
            provider,
            held: Mutex::new(Held {
                key: Arc::new(key),
                digest,
                looked: Instant::now(),
            }),
        })
    }

    /// Reads the files again and holds what they make, if they changed and
    /// make a certificate and its key. The lock is not held while reading:
    /// a slow file system delays this handshake alone.
    fn reread(&self, cert_file: &Path, key_file: &Path) {
        let (cert, key) = match read_pair(cert_file, key_file) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %e, "client certificate files unreadable; keeping the last");
                return;
            }
        };
        let digest = digest(&cert, &key);
        if self.held.lock().digest == digest {
            return;
        }
        match certified(&cert, &key, &self.provider) {
            Ok(key) => {
                let mut held = self.held.lock();
                held.key = Arc::new(key);
                held.digest = digest;
                tracing::info!(cert = %cert_file.display(), "client certificate renewed");
            }
            Err(e) => tracing::warn!(
                cert = %cert_file.display(), error = %e,
                "client certificate files changed but are not usable; keeping the last"
            ),
        }
    }
}

impl ResolvesClientCert for Identity {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        if let Some((cert, key)) = &self.files {
            let due = {
                let mut held = self.held.lock();
                let due = held.looked.elapsed() >= RECHECK;
                if due {
                    held.looked = Instant::now();
                }
                due
            };
            if due {
                self.reread(cert, key);
            }
        }
        Some(self.held.lock().key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A digest of a certificate file's and a key file's contents.
fn digest(cert: &[u8], key: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    (cert, key).hash(&mut hasher);
    hasher.finish()
}

/// A certificate chain and its private key, from PEM, checked to belong
/// together.
fn certified(
    cert_pem: &[u8],
    key_pem: &[u8],
    provider: &CryptoProvider,
) -> Result<CertifiedKey, String> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("client certificate: not PEM: {e}"))?;
    if chain.is_empty() {
        return Err("client certificate: no certificate in the PEM".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("client key: no PEM private key: {e}"))?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| format!("client certificate: {e}"))
}

/// The contents of a certificate file and a key file, each bounded: read
/// through a limit rather than trusting the size the file system reports
/// (a file that grows meanwhile, a FIFO or a device that reports none).
fn read_pair(cert: &Path, key: &Path) -> Result<(Vec<u8>, Vec<u8>), String> {
    let read = |path: &Path| -> Result<Vec<u8>, String> {
        use std::io::Read;
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Err(format!(
                "{}: more than {MAX_FILE_BYTES} bytes",
                path.display()
            ));
        }
        Ok(bytes)
    };
    Ok((read(cert)?, read(key)?))
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

    fn self_signed(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    #[test]
    fn a_client_certificate_needs_a_certificate_and_its_key() {
        let (cert, key) = self_signed("client");
        let (_, other_key) = self_signed("other");
        let identity = |c: &str, k: &str| {
            let pem = ClientCert::Pem(c.as_bytes().to_vec(), k.as_bytes().to_vec());
            Tls::new(None, "cache", Some(&pem)).err()
        };
        assert_eq!(identity(&cert, &key), None);
        let err = identity("", &key).expect("no certificate");
        assert!(err.contains("client certificate: no certificate"), "{err}");
        let err = identity(&cert, "not a key").expect("no key");
        assert!(err.contains("client key"), "{err}");
        let err = identity(&cert, &cert).expect("a certificate is no key");
        assert!(err.contains("client key"), "{err}");
        let err = identity(&cert, &other_key).expect("another's key");
        assert!(err.contains("KeyMismatch"), "{err}");
        let missing =
            ClientCert::Files("/nonexistent/tls.crt".into(), "/nonexistent/tls.key".into());
        let err = Tls::new(None, "cache", Some(&missing))
            .err()
            .expect("no files");
        assert!(err.contains("/nonexistent/tls.crt"), "{err}");
    }

    #[test]
    fn certificate_files_are_read_again_when_they_change_and_a_bad_pair_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let write = |(cert, key): &(String, String)| {
            std::fs::write(&cert_file, cert).unwrap();
            std::fs::write(&key_file, key).unwrap();
        };
        let first = self_signed("first");
        write(&first);
        let identity = Identity::new(
            &ClientCert::Files(cert_file.clone(), key_file.clone()),
            provider(),
        )
        .unwrap();
        let presented = |identity: &Identity| identity.resolve(&[], &[]).unwrap().cert[0].to_vec();
        let der = |(cert, _): &(String, String)| {
            CertificateDer::from_pem_slice(cert.as_bytes())
                .unwrap()
                .to_vec()
        };
        assert_eq!(presented(&identity), der(&first));

        // Renewed: presented once the recheck interval has passed.
        let second = self_signed("second");
        write(&second);
        // Looked at just now (in the future, for a slow test machine).
        identity.held.lock().looked = Instant::now() + Duration::from_secs(3600);
        assert_eq!(presented(&identity), der(&first), "looked again too soon");
        identity.held.lock().looked = Instant::now() - RECHECK;
        assert_eq!(presented(&identity), der(&second));

        // A certificate whose key is not there yet: the last good pair stays.
        let third = self_signed("third");
        std::fs::write(&cert_file, &third.0).unwrap();
        identity.held.lock().looked -= RECHECK;
        assert_eq!(presented(&identity), der(&second));
        std::fs::write(&key_file, &third.1).unwrap();
        identity.held.lock().looked -= RECHECK;
        assert_eq!(presented(&identity), der(&third));

        // Given as PEM: never read again.
        let pem = Identity::new(
            &ClientCert::Pem(first.0.clone().into(), first.1.clone().into()),
            provider(),
        )
        .unwrap();
        pem.held.lock().looked -= RECHECK;
        assert_eq!(presented(&pem), der(&first));
    }

    #[test]
    fn an_alert_is_told_from_other_read_errors() {
        let alert = rustls::Error::AlertReceived(AlertDescription::CertificateRequired);
        let io = io::Error::new(io::ErrorKind::InvalidData, alert);
        assert_eq!(alert_of(&io), Some(AlertDescription::CertificateRequired));
        let other = io::Error::new(io::ErrorKind::InvalidData, rustls::Error::DecryptError);
        assert_eq!(alert_of(&other), None);
        // An alert that may follow an answer is not a refusal.
        let internal = rustls::Error::AlertReceived(AlertDescription::InternalError);
        let internal = io::Error::new(io::ErrorKind::InvalidData, internal);
        assert_eq!(alert_of(&internal), None);
        assert_eq!(
            alert_of(&io::Error::from(io::ErrorKind::ConnectionReset)),
            None
        );
    }
}
