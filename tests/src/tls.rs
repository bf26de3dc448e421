//! TLS for the tests of caches with `spec.tls` (issue 15): certificates made
//! with `rcgen` in the place of cert-manager (a CA, and a certificate for
//! given DNS names with server and client usage, written as a
//! `kubernetes.io/tls` Secret's keys), and a minimal HTTPS/1.1 client over
//! tokio-rustls that verifies the nodes against that CA by a given name
//! while connecting to their loopback pod IPs, and presents a client
//! certificate to nodes that ask for one.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A test CA that issues leaf certificates.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pub ca_pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> Result<TestCa> {
        let key = KeyPair::generate().context("CA key")?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).context("self-sign the CA")?;
        Ok(TestCa {
            ca_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The keys of a `kubernetes.io/tls` Secret as cert-manager writes it
    /// (`tls.crt`, `tls.key`, `ca.crt`), for a certificate valid for
    /// `names`, with the server and client usages.
    pub fn secret_data(&self, names: &[String]) -> Result<BTreeMap<String, String>> {
        let key = KeyPair::generate().context("leaf key")?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().map_or("leaf", |n| n));
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params
            .signed_by(&key, &self.issuer)
            .context("sign the leaf")?;
        Ok(BTreeMap::from([
            ("tls.crt".to_owned(), cert.pem()),
            ("tls.key".to_owned(), key.serialize_pem()),
            ("ca.crt".to_owned(), self.ca_pem.clone()),
        ]))
    }
}

/// An HTTPS client that trusts one CA and checks the server for one name.
#[derive(Clone)]
pub struct HttpsClient {
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
}

impl HttpsClient {
    pub fn new(ca_pem: &str, server_name: &str) -> Result<HttpsClient> {
        Self::build(ca_pem, server_name, None)
    }

    /// One that presents a client certificate: the `tls.crt` and `tls.key`
    /// of [`TestCa::secret_data`].
    pub fn with_client_cert(
        ca_pem: &str,
        server_name: &str,
        cert: &BTreeMap<String, String>,
    ) -> Result<HttpsClient> {
        Self::build(ca_pem, server_name, Some(cert))
    }

    fn build(
        ca_pem: &str,
        server_name: &str,
        client_cert: Option<&BTreeMap<String, String>>,
    ) -> Result<HttpsClient> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(cert.context("CA PEM")?)?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
        let mut config = match client_cert {
            None => builder.with_no_client_auth(),
            Some(data) => {
                let pem = |key: &str| data.get(key).with_context(|| format!("no {key}"));
                let chain = CertificateDer::pem_slice_iter(pem("tls.crt")?.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .context("client certificate PEM")?;
                let key = PrivateKeyDer::from_pem_slice(pem("tls.key")?.as_bytes())
                    .context("client key PEM")?;
                builder.with_client_auth_cert(chain, key)?
            }
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(HttpsClient {
            config: Arc::new(config),
            server_name: ServerName::try_from(server_name.to_owned())?,
        })
    }

    /// One request on a new connection (`Connection: close`): the status
    /// and the body as JSON (`Value::Null` when empty or not JSON).
    /// Only loopback addresses are contacted.
    pub async fn request(
        &self,
        addr: SocketAddr,
        method: &str,
        path: &str,
        body: Option<&Value>,
        token: Option<&str>,
    ) -> Result<(u16, Value)> {
        ensure!(addr.ip().is_loopback(), "{addr} is not a loopback address");
        tokio::time::timeout(Duration::from_secs(10), async {
            let tcp = TcpStream::connect(addr)
                .await
                .with_context(|| format!("connect {addr}"))?;
            let connector = tokio_rustls::TlsConnector::from(self.config.clone());
            let mut tls = connector
                .connect(self.server_name.clone(), tcp)
                .await
                .with_context(|| format!("TLS handshake with {addr}"))?;
            let body = body.map(|b| b.to_string()).unwrap_or_default();
            let mut head = format!(
                "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
                body.len()
            );
            if !body.is_empty() {
                head.push_str("Content-Type: application/json\r\n");
            }
            if let Some(token) = token {
                head.push_str(&format!("Authorization: Bearer {token}\r\n"));
            }
            head.push_str("\r\n");
            tls.write_all(head.as_bytes()).await?;
            tls.write_all(body.as_bytes()).await?;
            tls.flush().await?;
            let mut raw = Vec::new();
            // A server closing without close_notify still gave a whole
            // response when its length checks out below.
            if let Err(e) = tls.read_to_end(&mut raw).await
                && e.kind() != std::io::ErrorKind::UnexpectedEof
            {
                return Err(e).with_context(|| format!("read the response of {addr}"));
            }
            parse_response(&raw).with_context(|| format!("{method} {path} on {addr}"))
        })
        .await
        .with_context(|| format!("{method} {path} on {addr}: no response within 10s"))?
    }
}

/// Status and JSON body of a whole HTTP/1.1 response.
fn parse_response(raw: &[u8]) -> Result<(u16, Value)> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of the response head")?;
    let head = std::str::from_utf8(&raw[..split]).context("response head")?;
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .context("status line")?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") && value.contains("chunked") {
            chunked = true;
        } else if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<usize>().context("content-length")?);
        }
    }
    if chunked {
        body = dechunk(&body)?;
    } else if let Some(length) = length {
        ensure!(
            body.len() >= length,
            "body cut short: {} of {length} bytes",
            body.len()
        );
        body.truncate(length);
    }
    let value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).unwrap_or(Value::Null)
    };
    Ok((status, value))
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("chunk size line")?;
        let size = std::str::from_utf8(&data[..end])?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .context("chunk size")?;
        data = &data[end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            bail!("chunk cut short");
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_with_a_length_or_chunks_parse() {
        let (status, body) =
            parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n{\"a\":1}").unwrap();
        assert_eq!((status, body), (200, serde_json::json!({"a": 1})));
        let (status, body) = parse_response(
            b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n3\r\n{\"a\r\n4\r\n\":2}\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((status, body), (404, serde_json::json!({"a": 2})));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n{}").is_err());
    }
}
