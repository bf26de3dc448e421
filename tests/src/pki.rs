//! The control plane's credentials, made fresh for each control plane: a CA,
//! the API server's serving certificate signed by it (so clients verify TLS
//! for real instead of skipping verification), the service-account signing
//! key, and the admin bearer token.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Paths of the files written by [`Pki::write`].
#[derive(Debug, Clone)]
pub struct Pki {
    pub ca_cert: PathBuf,
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    /// An ECDSA P-256 private key (PKCS#8) that signs service-account tokens.
    pub service_account_key: PathBuf,
    /// Its public half (PKIX), with which the API server verifies them.
    pub service_account_public_key: PathBuf,
    pub admin_token: String,
}

impl Pki {
    /// Generates everything into `dir`.
    pub fn write(dir: &Path) -> Result<Pki> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;

        let ca_key = KeyPair::generate().context("generate the CA key")?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "distrocache-test-ca");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).context("self-sign the CA")?;
        let ca = Issuer::new(ca_params, ca_key);

        // The names a client may use for the API server: loopback, plus the
        // in-cluster names (only ever certificate content; nothing resolves them here).
        let serving_key = KeyPair::generate().context("generate the serving key")?;
        let mut serving_params = CertificateParams::new(vec![
            "127.0.0.1".to_string(),
            "localhost".to_string(),
            "kubernetes".to_string(),
            "kubernetes.default".to_string(),
            "kubernetes.default.svc".to_string(),
        ])?;
        serving_params
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        serving_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving_cert = serving_params
            .signed_by(&serving_key, &ca)
            .context("sign the serving certificate")?;

        let sa_key = KeyPair::generate().context("generate the service-account key")?;

        let pki = Pki {
            ca_cert: dir.join("ca.crt"),
            serving_cert: dir.join("apiserver.crt"),
            serving_key: dir.join("apiserver.key"),
            service_account_key: dir.join("sa.key"),
            service_account_public_key: dir.join("sa.pub"),
            admin_token: random_hex(32)?,
        };
        write_file(&pki.ca_cert, &ca_cert.pem())?;
        write_file(&pki.serving_cert, &serving_cert.pem())?;
        write_file(&pki.serving_key, &serving_key.serialize_pem())?;
        write_file(&pki.service_account_key, &sa_key.serialize_pem())?;
        write_file(&pki.service_account_public_key, &sa_key.public_key_pem())?;
        Ok(pki)
    }
}

fn write_file(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).with_context(|| format!("write {}", path.display()))
}

/// `bytes` random bytes from the kernel, hex-encoded.
pub(crate) fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("read /dev/urandom")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}
