//! TLS of a cache with `spec.tls` (issue 15): which Secrets hold the client
//! API's certificate and the peers' certificate, where the nodes find them
//! (mounted read-only; the nodes re-read the files when the Secret changes,
//! so a renewed certificate needs no restart), with
//! `spec.tls.clientCaSecretName` the clients' CA that makes the client API
//! mutual TLS, and, with `spec.tls.certManager`, the cert-manager
//! Certificates that fill those Secrets. cert-manager's types are not in
//! k8s-openapi (another project's CRD), so the Certificates are dynamic
//! objects, applied only when the `cert-manager.io` API is served.
//!
//! Identity of a member: its pod's DNS name under the headless Service,
//! `<pod>.<name>-peers.<namespace>.svc`; the peer certificate carries the
//! wildcard `*.<name>-peers.<namespace>.svc`, and each node is told the
//! domain (`DISTROCACHE_PEER_TLS_DOMAIN`) to check its peers against.

use k8s_openapi::api::core::v1::{SecretVolumeSource, Volume, VolumeMount};
use kube::ResourceExt;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;

use super::{child_meta, peer_service_name};
use crate::crd::DistroCache;

pub const CERT_MANAGER_GROUP: &str = "cert-manager.io";
/// Where the client API's certificate is mounted.
pub const TLS_MOUNT: &str = "/etc/distrocache/tls";
/// Where the peer certificate is mounted.
pub const PEER_TLS_MOUNT: &str = "/etc/distrocache/peer-tls";
/// Where the clients' CA is mounted (`spec.tls.clientCaSecretName`).
pub const CLIENT_CA_MOUNT: &str = "/etc/distrocache/client-ca";

pub fn certificate_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(CERT_MANAGER_GROUP, "v1", "Certificate"),
        "certificates",
    )
}

/// The Secret of the client API's certificate: the user's, or the one
/// cert-manager fills, `<name>-tls`.
pub fn client_tls_secret_name(dc: &DistroCache) -> String {
    dc.spec
        .tls
        .secret_name
        .clone()
        .unwrap_or_else(|| format!("{}-tls", dc.name_any()))
}

/// The Secret of the peer certificate: the user's (the same one), or
/// `<name>-peer-tls`.
pub fn peer_tls_secret_name(dc: &DistroCache) -> String {
    dc.spec
        .tls
        .secret_name
        .clone()
        .unwrap_or_else(|| format!("{}-peer-tls", dc.name_any()))
}

/// `<name>-peers.<namespace>.svc`: member `x`'s identity is `x.` + this.
pub fn peer_domain(dc: &DistroCache) -> String {
    format!(
        "{}.{}.svc",
        peer_service_name(dc),
        dc.namespace().unwrap_or_default()
    )
}

pub fn tls_volumes(dc: &DistroCache) -> Vec<Volume> {
    let volume = |name: &str, secret: String| Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret),
            default_mode: Some(0o440),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    };
    let mut volumes = vec![
        volume("tls", client_tls_secret_name(dc)),
        volume("peer-tls", peer_tls_secret_name(dc)),
    ];
    if let Some(secret) = &dc.spec.tls.client_ca_secret_name {
        volumes.push(volume("client-ca", secret.clone()));
    }
    volumes
}

pub fn tls_volume_mounts(dc: &DistroCache) -> Vec<VolumeMount> {
    let mount = |name: &str, path: &str| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    };
    let mut mounts = vec![mount("tls", TLS_MOUNT), mount("peer-tls", PEER_TLS_MOUNT)];
    if dc.spec.tls.client_ca_secret_name.is_some() {
        mounts.push(mount("client-ca", CLIENT_CA_MOUNT));
    }
    mounts
}

/// The node environment of TLS: every file of both Secrets (and of the
/// clients' CA), the peer domain and the probe port.
pub fn tls_env(dc: &DistroCache) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("DISTROCACHE_TLS_CERT_FILE", format!("{TLS_MOUNT}/tls.crt")),
        ("DISTROCACHE_TLS_KEY_FILE", format!("{TLS_MOUNT}/tls.key")),
        (
            "DISTROCACHE_PEER_TLS_CERT_FILE",
            format!("{PEER_TLS_MOUNT}/tls.crt"),
        ),
        (
            "DISTROCACHE_PEER_TLS_KEY_FILE",
            format!("{PEER_TLS_MOUNT}/tls.key"),
        ),
        (
            "DISTROCACHE_PEER_TLS_CA_FILE",
            format!("{PEER_TLS_MOUNT}/ca.crt"),
        ),
        ("DISTROCACHE_PEER_TLS_DOMAIN", peer_domain(dc)),
        ("DISTROCACHE_PROBE_PORT", dc.spec.tls.probe_port.to_string()),
    ];
    if dc.spec.tls.client_ca_secret_name.is_some() {
        env.push((
            "DISTROCACHE_TLS_CLIENT_CA_FILE",
            format!("{CLIENT_CA_MOUNT}/ca.crt"),
        ));
    }
    env
}

/// The cert-manager Certificates `spec.tls.certManager` asks for: the
/// client API's (the client Service's names) and the peers' (the headless
/// Service's wildcard, server and client usage). Empty otherwise.
pub fn certificates(dc: &DistroCache) -> Vec<DynamicObject> {
    let Some(cm) = &dc.spec.tls.cert_manager else {
        return Vec::new();
    };
    let name = dc.name_any();
    let ns = dc.namespace().unwrap_or_default();
    let issuer = json!({
        "name": cm.issuer_ref.name,
        "kind": cm.issuer_ref.kind.as_deref().unwrap_or("Issuer"),
        "group": cm.issuer_ref.group.as_deref().unwrap_or(CERT_MANAGER_GROUP),
    });
    let peers = peer_domain(dc);
    let certificate = |object: String, secret: String, dns: Vec<String>, usages: &[&str]| {
        let mut c = DynamicObject::new(&object, &certificate_resource()).data(json!({
            "spec": {
                "secretName": secret,
                "dnsNames": dns,
                "usages": usages,
                "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
                "issuerRef": issuer,
            }
        }));
        c.metadata = child_meta(dc, object, "tls");
        c
    };
    vec![
        certificate(
            format!("{name}-tls"),
            client_tls_secret_name(dc),
            vec![
                name.clone(),
                format!("{name}.{ns}"),
                format!("{name}.{ns}.svc"),
                format!("{name}.{ns}.svc.cluster.local"),
            ],
            &["server auth", "digital signature", "key encipherment"],
        ),
        certificate(
            format!("{name}-peer-tls"),
            peer_tls_secret_name(dc),
            vec![format!("*.{peers}"), format!("*.{peers}.cluster.local")],
            &[
                "server auth",
                "client auth",
                "digital signature",
                "key encipherment",
            ],
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::test_support::{assert_owned, cache};

    #[test]
    fn cert_manager_certificates_name_the_services_and_fill_the_mounted_secrets() {
        assert!(certificates(&cache("{}")).is_empty());
        assert!(certificates(&cache("{tls: {secretName: mine}}")).is_empty());
        let dc = cache("{tls: {certManager: {issuerRef: {name: ca, kind: ClusterIssuer}}}}");
        let certs = certificates(&dc);
        assert_eq!(certs.len(), 2);
        let client = &certs[0];
        assert_owned(&client.metadata, "orders-tls");
        assert_eq!(client.data["spec"]["secretName"], "orders-tls");
        assert_eq!(client.data["spec"]["issuerRef"]["kind"], "ClusterIssuer");
        assert_eq!(client.data["spec"]["issuerRef"]["group"], "cert-manager.io");
        let names = client.data["spec"]["dnsNames"].as_array().unwrap();
        assert!(names.contains(&json!("orders.shop.svc")), "{names:?}");
        let peer = &certs[1];
        assert_owned(&peer.metadata, "orders-peer-tls");
        assert_eq!(peer.data["spec"]["secretName"], "orders-peer-tls");
        assert_eq!(peer.data["spec"]["dnsNames"][0], "*.orders-peers.shop.svc");
        assert!(
            peer.data["spec"]["usages"]
                .as_array()
                .unwrap()
                .contains(&json!("client auth"))
        );
        // The mounts read from those Secrets; a user's Secret serves both.
        let names = |dc: &DistroCache| {
            tls_volumes(dc)
                .into_iter()
                .map(|v| v.secret.unwrap().secret_name.unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&dc), ["orders-tls", "orders-peer-tls"]);
        assert_eq!(names(&cache("{tls: {secretName: mine}}")), ["mine", "mine"]);
        assert_eq!(peer_domain(&dc), "orders-peers.shop.svc");
    }
}
