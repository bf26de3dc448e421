//! Test support for TLS: certificates made with `rcgen` (a CA, server and
//! client certificates, expired ones, ones for the wrong name, ones from
//! another CA), written as PEM files the way a mounted Secret holds them,
//! and an HTTPS/1.1 client over tokio-rustls and hyper that reports the
//! certificate the server presented.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use serde_json::Value;
use tokio::net::TcpStream;

/// A certificate authority that writes the certificates it issues to files.
pub struct TestCa {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate (PEM), as `ca.crt` of a Secret.
    pub ca_file: PathBuf,
    pub ca_pem: String,
}

/// How long an issued certificate is valid.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// Valid now (the rcgen default: 1975 to 4096).
    Current,
    /// Expired in 2021.
    Expired,
}

/// Files of an issued certificate and its key.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Issued {
    /// The leaf certificate as DER, to compare with what a server presents.
    pub fn der(&self) -> Vec<u8> {
        let pem = std::fs::read(&self.cert).expect("certificate file");
        CertificateDer::pem_slice_iter(&pem)
            .next()
            .expect("a certificate")
            .expect("PEM")
            .to_vec()
    }
}

impl TestCa {
    pub fn new(dir: &Path, name: &str) -> Self {
        std::fs::create_dir_all(dir).expect("pki dir");
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("self-sign the CA");
        let ca_file = dir.join(format!("{name}.crt"));
        std::fs::write(&ca_file, cert.pem()).expect("write CA");
        Self {
            dir: dir.to_owned(),
            issuer: Issuer::new(params, key),
            ca_file,
            ca_pem: cert.pem(),
        }
    }

    /// Issues a certificate for `names` (DNS names or IP addresses) usable
    /// as server and client certificate, written to `<file>.crt` and
    /// `<file>.key`.
    pub fn issue(&self, file: &str, names: &[&str], validity: Validity) -> Issued {
        let issued = Issued {
            cert: self.dir.join(format!("{file}.crt")),
            key: self.dir.join(format!("{file}.key")),
        };
        self.issue_to(&issued, names, validity);
        issued
    }

    /// Issues a new certificate and key into existing files: the key first,
    /// then the certificate, as a careless rotation would (the node must not
    /// adopt the mismatched pair in between).
    pub fn issue_to(&self, to: &Issued, names: &[&str], validity: Validity) {
        let (cert, key) = self.make(names, validity);
        write_atomically(&to.key, &key);
        write_atomically(&to.cert, &cert);
    }

    fn make(&self, names: &[&str], validity: Validity) -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().copied().unwrap_or("x"));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        if validity == Validity::Expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        (cert.pem(), key.serialize_pem())
    }
}

pub fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// A client config trusting `cas` (none: trusts nothing), presenting
/// `client` when given, offering ALPN `http/1.1`.
pub fn client_config(cas: &[&Path], client: Option<&Issued>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        let pem = std::fs::read(ca).expect("CA file");
        for cert in CertificateDer::pem_slice_iter(&pem) {
            roots.add(cert.expect("PEM")).expect("a CA certificate");
        }
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots);
    let mut config = match client {
        Some(issued) => {
            let pem = std::fs::read(&issued.cert).expect("cert file");
            let chain = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .expect("PEM");
            let key = PrivateKeyDer::from_pem_file(&issued.key).expect("key file");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client cert")
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// One keep-alive HTTPS connection.
pub struct Https {
    sender: SendRequest<Full<Bytes>>,
    /// The leaf certificate the server presented.
    pub served: Vec<u8>,
    /// The protocol ALPN agreed on.
    pub alpn: Option<Vec<u8>>,
}

impl Https {
    /// Connects and completes the TLS handshake; `Err` says why it failed.
    pub async fn connect(
        config: Arc<ClientConfig>,
        addr: SocketAddr,
        name: &str,
    ) -> Result<Self, String> {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let name = ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let (_, session) = tls.get_ref();
        let served = session
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .ok_or("no server certificate")?;
        let alpn = session.alpn_protocol().map(|p| p.to_vec());
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("http handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(Self {
            sender,
            served,
            alpn,
        })
    }

    /// One request; `Err` when the connection failed (a refused client
    /// certificate shows here under TLS 1.3, at the first read).
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<Value>,
        token: Option<&str>,
    ) -> Result<(u16, Value), String> {
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost");
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let body = match body {
            Some(v) => {
                request = request.header("content-type", "application/json");
                Bytes::from(v.to_string())
            }
            None => Bytes::new(),
        };
        self.sender
            .ready()
            .await
            .map_err(|e| format!("connection: {e}"))?;
        let response = self
            .sender
            .send_request(request.body(Full::new(body)).expect("request"))
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok((status, json))
    }
}

/// One request on a new connection.
pub async fn once(
    config: Arc<ClientConfig>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, Value), String> {
    Https::connect(config, addr, "localhost")
        .await?
        .request(method, path, body, None)
        .await
}
