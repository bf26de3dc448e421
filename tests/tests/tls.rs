//! `spec.tls` against the real control plane (issue 15). The operator runs
//! as its Deployment's pod, the nodes are real `cache-node` processes run by
//! the test kubelet, and the certificates are made here with `rcgen`, in the
//! place of cert-manager: with `spec.tls.secretName` the test creates the
//! `kubernetes.io/tls` Secret; with `spec.tls.certManager` it applies
//! cert-manager's Certificate CRD as a fixture (no cert-manager runs) and
//! fills the Secrets the Certificates name. With `spec.tls.clientCaSecretName`
//! the client API takes only clients whose certificate that CA signed, and a
//! rotated CA takes effect without a restart.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use distrocache_operator::crd::DistroCache;
use distrocache_tests::distrocache::{
    self, CacheClient, apply_cache, apply_crd_fixture, condition, installed, kubectl_ok,
    node_addresses, wait_ready,
};
use distrocache_tests::tls::{HttpsClient, TestCa};
use distrocache_tests::{TestNamespace, wait};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Container, Secret};
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

const READY: Duration = Duration::from_secs(180);

/// Creates a `kubernetes.io/tls` Secret with `data` (as cert-manager would).
async fn create_tls_secret(
    client: &Client,
    ns: &str,
    name: &str,
    data: BTreeMap<String, String>,
) -> Result<()> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret = Secret {
        metadata: kube::core::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        string_data: Some(data),
        ..Secret::default()
    };
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .with_context(|| format!("create Secret {ns}/{name}"))?;
    Ok(())
}

/// The names of the client Service a client may use.
fn client_names(name: &str, ns: &str) -> Vec<String> {
    vec![
        name.to_owned(),
        format!("{name}.{ns}"),
        format!("{name}.{ns}.svc"),
    ]
}

/// A new CA, and from it the `kubernetes.io/tls` Secret `secret` in `ns`
/// for cache `name`: the client Service's names and the peers' wildcard.
async fn cache_tls_secret(client: &Client, ns: &str, name: &str, secret: &str) -> Result<TestCa> {
    let ca = TestCa::new(&format!("distrocache-test-{name}-ca"))?;
    let mut names = client_names(name, ns);
    names.push(format!("*.{name}-peers.{ns}.svc"));
    create_tls_secret(client, ns, secret, ca.secret_data(&names)?).await?;
    Ok(ca)
}

/// The ServiceMonitor of cache `name`, once the operator has applied it.
async fn service_monitor(client: &Client, ns: &str, name: &str) -> Result<DynamicObject> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("monitoring.coreos.com", "v1", "ServiceMonitor"),
        "servicemonitors",
    );
    let monitors: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &resource);
    wait::until("the ServiceMonitor", Duration::from_secs(60), || {
        let monitors = monitors.clone();
        async move { Ok(monitors.get_opt(name).await?) }
    })
    .await
}

/// Writes `keys` keys through `writer` over HTTPS, then reads every one
/// back through every node. With a replication factor below the node
/// count, the writer and each reader own only part of the keys, so the
/// rest are forwarded to their owners over the peer API's mutual TLS.
async fn write_and_read_everywhere(
    https: &HttpsClient,
    writer: SocketAddr,
    nodes: &[SocketAddr],
    keys: usize,
) -> Result<()> {
    for i in 0..keys {
        let path = format!("/api/v1/cache/tls:{i}");
        let (status, body) = https
            .request(
                writer,
                "POST",
                &path,
                Some(&json!({"value": {"n": i}})),
                None,
            )
            .await?;
        ensure!(
            status == 200 || status == 201,
            "write {path} through {writer}: {status} {body}"
        );
    }
    for &node in nodes {
        for i in 0..keys {
            let path = format!("/api/v1/cache/tls:{i}");
            let (status, body) = https.request(node, "GET", &path, None, None).await?;
            ensure!(status == 200, "read {path} through {node}: {status} {body}");
            ensure!(
                body["value"] == json!({"n": i}),
                "read {path} through {node}: {body}"
            );
        }
    }
    Ok(())
}

/// Reads keys `tls:0..keys` (as written by [`write_and_read_everywhere`])
/// through every node over HTTPS; any miss or wrong value fails `step`.
async fn read_everything(
    https: &HttpsClient,
    nodes: &[SocketAddr],
    keys: usize,
    step: &str,
) -> Result<()> {
    for &node in nodes {
        for i in 0..keys {
            let path = format!("/api/v1/cache/tls:{i}");
            let (status, body) = https.request(node, "GET", &path, None, None).await?;
            ensure!(
                status == 200 && body["value"] == json!({"n": i}),
                "{step}, {path} through {node}: {status} {body}"
            );
        }
    }
    Ok(())
}

fn node_container(sts: &StatefulSet) -> Container {
    sts.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .map(|s| s.containers[0].clone())
        .expect("a node container")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_with_a_tls_secret_serves_https_forwards_over_peer_mtls_and_probes_plain()
-> Result<()> {
    let (cp, kubelet) = installed().await?;
    let _logs = cp.logs_on_panic();
    apply_crd_fixture(
        cp,
        "servicemonitor-crd.yaml",
        "servicemonitors.monitoring.coreos.com",
    )?;
    let ns = TestNamespace::create(cp, "tls-secret")
        .await?
        .with_kubelet(kubelet);
    let n = ns.name();
    let client = ns.client().await?;
    let name = "secure";

    let ca = cache_tls_secret(&client, n, name, "secure-cert").await?;
    apply_cache(
        cp,
        n,
        name,
        "  replicas: 3\n  replicationFactor: 2\n  tls:\n    secretName: secure-cert\n  \
         monitoring:\n    serviceMonitor:\n      enabled: true\n",
    )?;
    let dc: DistroCache = wait_ready(&client, n, name, 3, READY).await?;

    // The StatefulSet mounts the Secret for both certificates, tells the
    // nodes where the files are, and probes on the plain probe port.
    let sts: StatefulSet = Api::namespaced(client.clone(), n).get(name).await?;
    let pod_spec = sts.spec.as_ref().unwrap().template.spec.clone().unwrap();
    let secrets_of = |volume: &str| {
        pod_spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == volume)
            .and_then(|v| v.secret.as_ref()?.secret_name.clone())
    };
    ensure!(secrets_of("tls").as_deref() == Some("secure-cert"));
    ensure!(secrets_of("peer-tls").as_deref() == Some("secure-cert"));
    let container = node_container(&sts);
    let mounts: BTreeMap<String, String> = container
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.name.clone(), m.mount_path.clone()))
        .collect();
    ensure!(mounts.get("tls").map(String::as_str) == Some("/etc/distrocache/tls"));
    ensure!(mounts.get("peer-tls").map(String::as_str) == Some("/etc/distrocache/peer-tls"));
    let env: BTreeMap<String, String> = container
        .env
        .iter()
        .flatten()
        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
        .collect();
    for (key, value) in [
        ("DISTROCACHE_TLS_CERT_FILE", "/etc/distrocache/tls/tls.crt"),
        ("DISTROCACHE_TLS_KEY_FILE", "/etc/distrocache/tls/tls.key"),
        (
            "DISTROCACHE_PEER_TLS_CERT_FILE",
            "/etc/distrocache/peer-tls/tls.crt",
        ),
        (
            "DISTROCACHE_PEER_TLS_KEY_FILE",
            "/etc/distrocache/peer-tls/tls.key",
        ),
        (
            "DISTROCACHE_PEER_TLS_CA_FILE",
            "/etc/distrocache/peer-tls/ca.crt",
        ),
        ("DISTROCACHE_PROBE_PORT", "8082"),
    ] {
        ensure!(
            env.get(key).map(String::as_str) == Some(value),
            "{key}: {:?}",
            env.get(key)
        );
    }
    ensure!(
        env.get("DISTROCACHE_PEER_TLS_DOMAIN") == Some(&format!("{name}-peers.{n}.svc")),
        "{env:?}"
    );
    let probe_port = container
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("probe"))
        .map(|p| p.container_port);
    ensure!(probe_port == Some(8082), "{:?}", container.ports);
    for (what, port) in [
        (
            "readiness",
            container
                .readiness_probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .map(|h| h.port.clone()),
        ),
        (
            "liveness",
            container
                .liveness_probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .map(|h| h.port.clone()),
        ),
        (
            "preStop",
            container
                .lifecycle
                .as_ref()
                .and_then(|l| l.pre_stop.as_ref())
                .and_then(|h| h.http_get.as_ref())
                .map(|h| h.port.clone()),
        ),
    ] {
        ensure!(
            port == Some(
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("probe".into())
            ),
            "{what} goes to {port:?}, not the probe port"
        );
    }

    // The ServiceMonitor scrapes over HTTPS, verified against the Secret's CA.
    let sm = service_monitor(&client, n, name).await?;
    let endpoint = &sm.data["spec"]["endpoints"][0];
    ensure!(endpoint["scheme"] == "https", "{endpoint}");
    ensure!(
        endpoint["tlsConfig"]["ca"]["secret"] == json!({"name": "secure-cert", "key": "ca.crt"}),
        "{endpoint}"
    );
    ensure!(
        endpoint["tlsConfig"]["serverName"] == Value::String(format!("{name}.{n}.svc")),
        "{endpoint}"
    );
    ensure!(
        sm.owner_references()
            .iter()
            .any(|o| Some(&o.uid) == dc.metadata.uid.as_ref())
    );

    // Data over HTTPS, verified by the client Service's name; forwarding
    // between the nodes goes over the peer API's mutual TLS.
    let nodes: Vec<SocketAddr> = node_addresses(&client, n, name, 8080)
        .await?
        .into_iter()
        .map(|(_, a)| a)
        .collect();
    ensure!(nodes.len() == 3, "{nodes:?}");
    let https = HttpsClient::new(&ca.ca_pem, &format!("{name}.{n}.svc"))?;
    write_and_read_everywhere(&https, nodes[0], &nodes, 40).await?;

    // Plain HTTP on the client port: a JSON 400, not data and not a hang.
    let plain = CacheClient::default();
    let (status, body) = plain.get_json(nodes[1], "/api/v1/cache/tls:1").await?;
    ensure!(status == 400, "plain HTTP on the TLS port: {status} {body}");
    ensure!(body["error"].as_str().is_some(), "{body}");
    // The probe port is plain and serves health and metrics, never data.
    let probe = SocketAddr::new(nodes[1].ip(), 8082);
    let (status, _) = plain.get_json(probe, "/api/v1/health").await?;
    ensure!(status == 200, "health on the probe port: {status}");
    ensure!(
        plain
            .text(probe, "/metrics")
            .await?
            .contains("distrocache_items_total")
    );
    let (status, body) = plain.get_json(probe, "/api/v1/cache/tls:1").await?;
    ensure!(status == 404, "data on the probe port: {status} {body}");
    // Scaling up under TLS: the new member pulls its share over the peer
    // API's mutual TLS, the operator follows the rebalance on the plain
    // probe port, and no key is lost.
    let caches: Api<DistroCache> = Api::namespaced(client.clone(), n);
    caches
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 4}})),
        )
        .await?;
    wait_ready(&client, n, name, 4, READY).await?;
    let nodes: Vec<SocketAddr> = node_addresses(&client, n, name, 8080)
        .await?
        .into_iter()
        .map(|(_, a)| a)
        .collect();
    ensure!(nodes.len() == 4, "{nodes:?}");
    read_everything(&https, &nodes, 40, "after the scale-up").await?;

    // kill -9 of a node: it restarts under its name, pulls its keys back
    // over mutual TLS, and nothing is lost.
    kubelet.crash(n, &format!("{name}-1")).await?;
    distrocache::wait_restarted(&client, n, &format!("{name}-1"), READY).await?;
    wait_ready(&client, n, name, 4, READY).await?;
    read_everything(&https, &nodes, 40, "after a kill -9").await?;

    // Scaling down 4 -> 2: the leaving members hand their keys off over
    // mutual TLS before their pods go, and nothing is lost.
    caches
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 2}})),
        )
        .await?;
    wait_ready(&client, n, name, 2, READY).await?;
    let nodes: Vec<SocketAddr> = wait::until("two node pods left", READY, || async {
        let nodes = node_addresses(&client, n, name, 8080).await?;
        Ok((nodes.len() == 2).then(|| nodes.into_iter().map(|(_, a)| a).collect()))
    })
    .await?;
    read_everything(&https, &nodes, 40, "after the scale-down").await?;
    // A client that does not trust the Secret's CA cannot talk to a node.
    let stranger = TestCa::new("another-ca")?;
    let untrusting = HttpsClient::new(&stranger.ca_pem, &format!("{name}.{n}.svc"))?;
    let refused = untrusting
        .request(nodes[1], "GET", "/api/v1/cache/tls:1", None, None)
        .await;
    ensure!(
        refused.is_err(),
        "a client without the CA was answered: {refused:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_manager_certificates_wait_for_the_crd_then_fill_the_mounted_secrets() -> Result<()> {
    let (cp, kubelet) = installed().await?;
    let _logs = cp.logs_on_panic();
    // This test alone in this binary (and so on this control plane) uses
    // cert-manager's CRD: it starts without it.
    kubectl_ok(
        cp,
        &[
            "delete",
            "--ignore-not-found",
            "--wait",
            "crd/certificates.cert-manager.io",
        ],
    )?;
    let ns = TestNamespace::create(cp, "tls-cm")
        .await?
        .with_kubelet(kubelet);
    let n = ns.name();
    let client = ns.client().await?;
    let name = "issued";
    apply_cache(
        cp,
        n,
        name,
        "  replicas: 2\n  replicationFactor: 2\n  podDisruptionBudget:\n    enabled: false\n  \
         tls:\n    certManager:\n      issuerRef:\n        name: test-ca\n        kind: ClusterIssuer\n",
    )?;
    let caches: Api<DistroCache> = Api::namespaced(client.clone(), n);

    // Without the CRD, the condition says what is missing.
    let (reason, message) = wait::until(
        "the TLSCertificates condition without the CRD",
        READY,
        || {
            let caches = caches.clone();
            async move {
                let dc = caches.get(name).await?;
                Ok(condition(&dc, "TLSCertificates")
                    .filter(|(status, _, _)| status == "False")
                    .map(|(_, reason, message)| (reason, message)))
            }
        },
    )
    .await?;
    ensure!(reason == "CRDNotInstalled", "{reason}: {message}");
    ensure!(
        message.contains("cert-manager") && message.contains("secretName"),
        "{message}"
    );

    // With the CRD served, the operator creates both Certificates.
    apply_crd_fixture(
        cp,
        "cert-manager-certificate-crd.yaml",
        "certificates.cert-manager.io",
    )?;
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cert-manager.io", "v1", "Certificate"),
        "certificates",
    );
    let certificates: Api<DynamicObject> = Api::namespaced_with(client.clone(), n, &resource);
    let (client_cert, peer_cert) = wait::until("both Certificates", READY, || {
        let certificates = certificates.clone();
        async move {
            let client_cert = certificates.get_opt(&format!("{name}-tls")).await?;
            let peer_cert = certificates.get_opt(&format!("{name}-peer-tls")).await?;
            Ok(client_cert.zip(peer_cert))
        }
    })
    .await?;
    let dc = caches.get(name).await?;
    for cert in [&client_cert, &peer_cert] {
        ensure!(
            cert.owner_references()
                .iter()
                .any(|o| Some(&o.uid) == dc.metadata.uid.as_ref() && o.controller == Some(true)),
            "{} is not owned by the cache",
            cert.name_any()
        );
        ensure!(
            cert.data["spec"]["issuerRef"]
                == json!({"name": "test-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}),
            "{}",
            cert.data
        );
    }
    ensure!(client_cert.data["spec"]["secretName"] == format!("{name}-tls"));
    ensure!(peer_cert.data["spec"]["secretName"] == format!("{name}-peer-tls"));
    let dns = |cert: &DynamicObject| -> Vec<String> {
        cert.data["spec"]["dnsNames"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    };
    ensure!(
        dns(&client_cert).contains(&format!("{name}.{n}.svc")),
        "{:?}",
        dns(&client_cert)
    );
    ensure!(
        dns(&peer_cert).contains(&format!("*.{name}-peers.{n}.svc")),
        "{:?}",
        dns(&peer_cert)
    );
    ensure!(
        peer_cert.data["spec"]["usages"]
            .as_array()
            .is_some_and(|u| u.contains(&json!("client auth")) && u.contains(&json!("server auth"))),
        "{}",
        peer_cert.data
    );

    // In cert-manager's place, fill the Secrets the Certificates name, for
    // the names they ask for; the nodes then start with them.
    let ca = TestCa::new("test-cluster-issuer")?;
    create_tls_secret(
        &client,
        n,
        &format!("{name}-tls"),
        ca.secret_data(&dns(&client_cert))?,
    )
    .await?;
    create_tls_secret(
        &client,
        n,
        &format!("{name}-peer-tls"),
        ca.secret_data(&dns(&peer_cert))?,
    )
    .await?;
    wait_ready(&client, n, name, 2, READY).await?;
    let dc = caches.get(name).await?;
    let (status, reason, message) =
        condition(&dc, "TLSCertificates").context("no TLSCertificates condition")?;
    ensure!(
        status == "True" && reason == "Applied",
        "{status} {reason}: {message}"
    );
    let nodes: Vec<SocketAddr> = node_addresses(&client, n, name, 8080)
        .await?
        .into_iter()
        .map(|(_, a)| a)
        .collect();
    ensure!(nodes.len() == 2, "{nodes:?}");
    let https = HttpsClient::new(&ca.ca_pem, &format!("{name}.{n}.svc"))?;
    write_and_read_everywhere(&https, nodes[0], &nodes, 10).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_ca_lets_in_only_the_clients_it_signed_and_rotates_without_a_restart()
-> Result<()> {
    let (cp, kubelet) = installed().await?;
    let _logs = cp.logs_on_panic();
    apply_crd_fixture(
        cp,
        "servicemonitor-crd.yaml",
        "servicemonitors.monitoring.coreos.com",
    )?;
    let ns = TestNamespace::create(cp, "tls-clients")
        .await?
        .with_kubelet(kubelet);
    let n = ns.name();
    let client = ns.client().await?;
    let name = "guarded";

    let ca = cache_tls_secret(&client, n, name, "guarded-cert").await?;
    // The clients' CA: a Secret with `ca.crt` (the CA's own cert-manager
    // Secret would do), and a certificate it signed for Prometheus.
    let clients = TestCa::new("distrocache-test-clients-ca")?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), n);
    let ca_secret = |pem: &str| Secret {
        metadata: kube::core::ObjectMeta {
            name: Some("clients".into()),
            ..Default::default()
        },
        string_data: Some(BTreeMap::from([("ca.crt".to_owned(), pem.to_owned())])),
        ..Secret::default()
    };
    secrets
        .create(&PostParams::default(), &ca_secret(&clients.ca_pem))
        .await?;
    create_tls_secret(
        &client,
        n,
        "prom-client",
        clients.secret_data(&["prometheus".to_owned()])?,
    )
    .await?;
    apply_cache(
        cp,
        n,
        name,
        "  replicas: 2\n  replicationFactor: 1\n  podDisruptionBudget:\n    enabled: false\n  \
         tls:\n    secretName: guarded-cert\n    clientCaSecretName: clients\n  \
         monitoring:\n    serviceMonitor:\n      enabled: true\n      clientCertSecretName: prom-client\n",
    )?;
    // Ready: the kubelet's probes and the operator use the plain probe
    // port, which asks for no certificate.
    wait_ready(&client, n, name, 2, READY).await?;
    let sts: StatefulSet = Api::namespaced(client.clone(), n).get(name).await?;
    let env: BTreeMap<String, String> = node_container(&sts)
        .env
        .iter()
        .flatten()
        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
        .collect();
    ensure!(
        env.get("DISTROCACHE_TLS_CLIENT_CA_FILE")
            .map(String::as_str)
            == Some("/etc/distrocache/client-ca/ca.crt"),
        "{env:?}"
    );
    // Prometheus scrapes with the certificate named.
    let sm = service_monitor(&client, n, name).await?;
    let tls = &sm.data["spec"]["endpoints"][0]["tlsConfig"];
    ensure!(
        tls["cert"] == json!({"secret": {"name": "prom-client", "key": "tls.crt"}})
            && tls["keySecret"] == json!({"name": "prom-client", "key": "tls.key"}),
        "{tls}"
    );

    // One key per node at least (replication factor 1: the rest are
    // forwarded between the nodes over the peer API's mutual TLS).
    let nodes: Vec<SocketAddr> = node_addresses(&client, n, name, 8080)
        .await?
        .into_iter()
        .map(|(_, a)| a)
        .collect();
    ensure!(nodes.len() == 2, "{nodes:?}");
    let server_name = format!("{name}.{n}.svc");
    let app = HttpsClient::with_client_cert(
        &ca.ca_pem,
        &server_name,
        &clients.secret_data(&["app".to_owned()])?,
    )?;
    write_and_read_everywhere(&app, nodes[0], &nodes, 20).await?;

    // Refused: no certificate, and one another CA signed.
    let refusal = |https: HttpsClient, node: SocketAddr| async move {
        match https
            .request(node, "GET", "/api/v1/cache/tls:1", None, None)
            .await
        {
            Ok(answer) => Err(anyhow::anyhow!("answered: {answer:?}")),
            Err(e) => Ok(format!("{e:#}")),
        }
    };
    let why = refusal(HttpsClient::new(&ca.ca_pem, &server_name)?, nodes[1]).await?;
    ensure!(why.contains("CertificateRequired"), "no certificate: {why}");
    let strangers = TestCa::new("distrocache-test-strangers-ca")?;
    let stranger = HttpsClient::with_client_cert(
        &ca.ca_pem,
        &server_name,
        &strangers.secret_data(&["app".to_owned()])?,
    )?;
    let why = refusal(stranger.clone(), nodes[1]).await?;
    ensure!(why.contains("UnknownCA"), "another CA's certificate: {why}");

    // Rotation: the Secret now holds the strangers' CA. Every node takes
    // it without a restart: the strangers' certificate is served and the
    // app's refused.
    let before = pod_identities(&client, n, name).await?;
    secrets
        .patch(
            "clients",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"ca.crt": strangers.ca_pem}})),
        )
        .await?;
    wait::until("every node trusts the rotated clients' CA", READY, || {
        let (app, stranger, nodes) = (app.clone(), stranger.clone(), nodes.clone());
        async move {
            for node in nodes {
                if stranger
                    .request(node, "GET", "/api/v1/cache/tls:0", None, None)
                    .await
                    .is_err()
                    || app
                        .request(node, "GET", "/api/v1/cache/tls:0", None, None)
                        .await
                        .is_ok()
                {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        }
    })
    .await?;
    read_everything(&stranger, &nodes, 20, "after the clients' CA rotated").await?;
    let after = pod_identities(&client, n, name).await?;
    ensure!(before == after, "pods changed: {before:?} -> {after:?}");
    Ok(())
}

/// Each node pod of cache `name`: its name, uid and container restarts,
/// sorted; equal before and after means no pod was replaced or restarted.
async fn pod_identities(
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<Vec<(String, String, i32)>> {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), ns);
    let selector = format!("app.kubernetes.io/instance={name},app.kubernetes.io/name=distrocache");
    let list = pods
        .list(&kube::api::ListParams::default().labels(&selector))
        .await?;
    // A pod without a uid or container statuses cannot be compared: an
    // error, not a blank that would match another blank.
    let mut out = list
        .items
        .iter()
        .map(|p| {
            let uid = p
                .uid()
                .with_context(|| format!("pod {} has no uid", p.name_any()))?;
            let restarts = p
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .with_context(|| format!("pod {} has no container statuses", p.name_any()))?
                .iter()
                .map(|c| c.restart_count)
                .sum();
            Ok((p.name_any(), uid, restarts))
        })
        .collect::<Result<Vec<(String, String, i32)>>>()?;
    out.sort();
    Ok(out)
}

/// Sets the auth Secret's two token files.
async fn set_tokens(secrets: &Api<Secret>, name: &str, client: &str, peer: &str) -> Result<()> {
    secrets
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"client-token": client, "peer-token": peer}})),
        )
        .await
        .with_context(|| format!("edit Secret {name}"))?;
    Ok(())
}

/// The status of `GET url` with `Authorization: Bearer <token>` (and the
/// peer protocol's upgrade headers when `upgrade`).
async fn status_with(http: &reqwest::Client, url: &str, token: &str, upgrade: bool) -> Result<u16> {
    let mut request = http.get(url).bearer_auth(token);
    if upgrade {
        request = request
            .header("connection", "upgrade")
            .header("upgrade", "distrocache-peer/1");
    }
    Ok(request.send().await?.status().as_u16())
}

/// Waits until every node answers `url_of(node)` with `token` by `expected`.
async fn every_node(
    http: &reqwest::Client,
    nodes: &[SocketAddr],
    what: &str,
    url_of: impl Fn(SocketAddr) -> String,
    token: &str,
    upgrade: bool,
    expected: u16,
) -> Result<()> {
    for &node in nodes {
        let url = url_of(node);
        wait::until(&format!("{what} on {node}"), READY, || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let status = status_with(&http, &url, token, upgrade).await?;
                Ok((status == expected).then_some(()))
            }
        })
        .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_auth_secrets_tokens_under_traffic_restarts_nothing_and_fails_nothing()
-> Result<()> {
    let (cp, kubelet) = installed().await?;
    let _logs = cp.logs_on_panic();
    let ns = TestNamespace::create(cp, "tls-tokens")
        .await?
        .with_kubelet(kubelet);
    let n = ns.name();
    let client = ns.client().await?;
    let name = "rotated";
    let secrets: Api<Secret> = Api::namespaced(client.clone(), n);
    let mut data = BTreeMap::new();
    data.insert("client-token".to_owned(), "client-old".to_owned());
    data.insert("peer-token".to_owned(), "peer-old".to_owned());
    secrets
        .create(
            &PostParams::default(),
            &Secret {
                metadata: kube::core::ObjectMeta {
                    name: Some("rotated-tokens".into()),
                    ..Default::default()
                },
                string_data: Some(data),
                ..Secret::default()
            },
        )
        .await?;
    // Three nodes, two copies: each node owns only part of the keys and
    // forwards the rest, so a peer token a node does not accept fails
    // client requests too.
    apply_cache(
        cp,
        n,
        name,
        "  replicas: 3\n  replicationFactor: 2\n  auth:\n    enabled: true\n    \
         secretName: rotated-tokens\n",
    )?;
    wait_ready(&client, n, name, 3, READY).await?;
    let identities = || pod_identities(&client, n, name);
    let before = identities().await?;
    ensure!(before.len() == 3, "{before:?}");
    let nodes: Vec<SocketAddr> = node_addresses(&client, n, name, 8080)
        .await?
        .into_iter()
        .map(|(_, a)| a)
        .collect();
    ensure!(nodes.len() == 3 && nodes.iter().all(|a| a.ip().is_loopback()));
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()?;

    // Traffic until told to stop: writes through one node, reads through
    // the next, with the token the clients currently hold; the first
    // failed request ends it with an error.
    let token = std::sync::Arc::new(std::sync::Mutex::new("client-old".to_owned()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let load = {
        let (http, nodes, token, stop, served) = (
            http.clone(),
            nodes.clone(),
            token.clone(),
            stop.clone(),
            served.clone(),
        );
        tokio::spawn(async move {
            use std::sync::atomic::Ordering;
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let bearer = token.lock().unwrap().clone();
                let key = format!("/api/v1/cache/rot:{}", i % 200);
                let writer = nodes[i % nodes.len()];
                let resp = http
                    .post(format!("http://{writer}{key}"))
                    .bearer_auth(&bearer)
                    .json(&json!({"value": i}))
                    .send()
                    .await
                    .with_context(|| format!("request {i}: write {key} through {writer}"))?;
                let status = resp.status().as_u16();
                ensure!(
                    status == 200 || status == 201,
                    "request {i}: write {key} through {writer} with {bearer}: {status} {}",
                    resp.text().await.unwrap_or_default()
                );
                let reader = nodes[(i + 1) % nodes.len()];
                let resp = http
                    .get(format!("http://{reader}{key}"))
                    .bearer_auth(&bearer)
                    .send()
                    .await
                    .with_context(|| format!("request {i}: read {key} through {reader}"))?;
                let status = resp.status().as_u16();
                ensure!(
                    status == 200,
                    "request {i}: read {key} through {reader} with {bearer}: {status} {}",
                    resp.text().await.unwrap_or_default()
                );
                served.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        })
    };
    let progressed = |what: &'static str| {
        let served = served.clone();
        let load_done = load.is_finished();
        async move {
            ensure!(!load_done, "the traffic stopped before {what}");
            let from = served.load(std::sync::atomic::Ordering::Relaxed);
            wait::until(&format!("traffic {what}"), READY, || {
                let served = served.clone();
                async move {
                    Ok(
                        (served.load(std::sync::atomic::Ordering::Relaxed) > from + 20)
                            .then_some(()),
                    )
                }
            })
            .await
        }
    };
    progressed("with the old tokens").await?;

    // The documented rotation: old -> old+new -> new+old -> new.
    let client_url = |node: SocketAddr| format!("http://{node}/api/v1/stats");
    let peer_url = |node: SocketAddr| format!("http://{}:8081/internal/v1/connect", node.ip());
    set_tokens(
        &secrets,
        "rotated-tokens",
        "client-old\nclient-new\n",
        "peer-old\npeer-new\n",
    )
    .await?;
    every_node(
        &http,
        &nodes,
        "the new client token accepted",
        client_url,
        "client-new",
        false,
        200,
    )
    .await?;
    every_node(
        &http,
        &nodes,
        "the new peer token accepted",
        peer_url,
        "peer-new",
        true,
        101,
    )
    .await?;
    *token.lock().unwrap() = "client-new".into();
    progressed("with the new client token").await?;
    set_tokens(
        &secrets,
        "rotated-tokens",
        "client-new\nclient-old\n",
        "peer-new\npeer-old\n",
    )
    .await?;
    // Nothing tells from outside which token a node sends; the test
    // kubelet syncs the files every second and the nodes poll them every
    // second (--credentials-poll-interval): a few of both.
    tokio::time::sleep(Duration::from_secs(6)).await;
    progressed("while the nodes send the new peer token").await?;
    set_tokens(&secrets, "rotated-tokens", "client-new\n", "peer-new\n").await?;
    every_node(
        &http,
        &nodes,
        "the old client token refused",
        client_url,
        "client-old",
        false,
        401,
    )
    .await?;
    every_node(
        &http,
        &nodes,
        "the old peer token refused",
        peer_url,
        "peer-old",
        true,
        401,
    )
    .await?;
    progressed("with the new tokens only").await?;

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.await??;
    // No pod was replaced or restarted: the nodes re-read the files.
    let after = identities().await?;
    ensure!(before == after, "pods changed: {before:?} -> {after:?}");
    let dc: DistroCache = Api::namespaced(client.clone(), n).get(name).await?;
    ensure!(
        condition(&dc, "Ready").is_some_and(|(s, _, _)| s == "True"),
        "{:?}",
        condition(&dc, "Ready")
    );
    eprintln!(
        "token rotation: {} request pairs, none failed, no pod restarted",
        served.load(std::sync::atomic::Ordering::Relaxed)
    );
    Ok(())
}
