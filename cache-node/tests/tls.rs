//! TLS on the client API, against a real node process: who is served and
//! who is refused (no CA, another CA, expired and wrong-host certificates,
//! client certificates required), plain HTTP on the TLS port, a stalled
//! handshake, the plain probe port, and rotation of certificate, key, CA and
//! token files under traffic with no failed request.

mod node_proc;
mod tls_support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use node_proc::{Launch, NodeProc};
use serde_json::{Value, json};
use tls_support::{Https, Issued, TestCa, Validity, client_config, once};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Every wait in these tests gives up (and fails) after this long.
const DEADLINE: Duration = Duration::from_secs(20);

/// A node on 127.0.0.1 (the kernel chooses the ports) with `flags`, which
/// re-reads credential files every 100 ms.
async fn start(flags: &[String]) -> NodeProc {
    Launch::new()
        .args(flags)
        .args(["--credentials-poll-interval", "100ms"])
        .spawn()
}

fn tls_flags(server: &Issued) -> Vec<String> {
    vec![
        "--tls-cert-file".into(),
        server.cert.display().to_string(),
        "--tls-key-file".into(),
        server.key.display().to_string(),
    ]
}

#[tokio::test]
async fn a_client_with_the_ca_reads_and_writes_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let server = ca.issue("server", &["localhost", "127.0.0.1"], Validity::Current);
    let node = start(&tls_flags(&server)).await;
    let mut conn = Https::connect(client_config(&[&ca.ca_file], None), node.addr, "localhost")
        .await
        .expect("handshake with the CA");
    assert_eq!(conn.alpn.as_deref(), Some(&b"http/1.1"[..]), "ALPN");
    assert_eq!(conn.served, server.der());
    let (status, item) = conn
        .request(
            "PUT",
            "/api/v1/cache/k",
            Some(json!({"value": {"a": 1}})),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{item}");
    // Same connection, kept alive.
    let (status, item) = conn
        .request("GET", "/api/v1/cache/k", None, None)
        .await
        .unwrap();
    assert_eq!((status, &item["value"]), (200, &json!({"a": 1})));
    // Errors stay JSON under TLS.
    let (status, error) = conn.request("GET", "/nope", None, None).await.unwrap();
    assert_eq!(status, 404);
    assert!(error["error"].is_string(), "{error}");
}

#[tokio::test]
async fn clients_that_cannot_verify_the_server_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let other = TestCa::new(&dir.path().join("other"), "other-ca");

    let server = ca.issue("server", &["localhost"], Validity::Current);
    let node = start(&tls_flags(&server)).await;
    for (config, why) in [
        (client_config(&[], None), "no CA"),
        (client_config(&[&other.ca_file], None), "another CA"),
    ] {
        let refused = Https::connect(config, node.addr, "localhost").await;
        assert!(refused.is_err(), "{why}: connected");
    }
    let wrong_host = Https::connect(
        client_config(&[&ca.ca_file], None),
        node.addr,
        "cache.example",
    )
    .await;
    let err = wrong_host.err().expect("wrong host: connected");
    assert!(err.contains("not valid for name"), "{err}");

    let expired = ca.issue("expired", &["localhost"], Validity::Expired);
    let node = start(&tls_flags(&expired)).await;
    let err = Https::connect(client_config(&[&ca.ca_file], None), node.addr, "localhost")
        .await
        .err()
        .expect("expired server certificate: connected");
    assert!(err.to_lowercase().contains("expired"), "{err}");
}

#[tokio::test]
async fn client_certificates_are_required_and_verified_when_a_client_ca_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let other = TestCa::new(&dir.path().join("other"), "other-ca");
    let server = ca.issue("server", &["localhost"], Validity::Current);
    let mut flags = tls_flags(&server);
    flags.extend([
        "--tls-client-ca-file".into(),
        ca.ca_file.display().to_string(),
    ]);
    let node = start(&flags).await;

    let good = ca.issue("client", &["client"], Validity::Current);
    let (status, _) = once(
        client_config(&[&ca.ca_file], Some(&good)),
        node.addr,
        "GET",
        "/api/v1/stats",
        None,
    )
    .await
    .expect("a client certificate from the CA is served");
    assert_eq!(status, 200);

    let expired = ca.issue("client-expired", &["client"], Validity::Expired);
    let foreign = other.issue("client-other", &["client"], Validity::Current);
    for (client, why) in [
        (None, "no client certificate"),
        (Some(&expired), "an expired client certificate"),
        (Some(&foreign), "a client certificate from another CA"),
    ] {
        let result = once(
            client_config(&[&ca.ca_file], client),
            node.addr,
            "GET",
            "/api/v1/stats",
            None,
        )
        .await;
        assert!(result.is_err(), "{why}: served {result:?}");
    }
}

#[tokio::test]
async fn plain_http_on_the_tls_port_gets_a_json_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let server = ca.issue("server", &["localhost"], Validity::Current);
    let node = start(&tls_flags(&server)).await;
    let mut tcp = TcpStream::connect(node.addr).await.unwrap();
    tcp.write_all(b"GET /api/v1/health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, tcp.read_to_end(&mut answer))
        .await
        .expect("answered and closed")
        .unwrap();
    let answer = String::from_utf8(answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
    let error: Value = serde_json::from_str(body).unwrap();
    assert!(
        error["error"].as_str().unwrap().contains("https://"),
        "{error}"
    );
}

#[tokio::test]
async fn a_stalled_handshake_is_dropped_and_frees_its_connection_slot() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let server = ca.issue("server", &["localhost"], Validity::Current);
    let mut flags = tls_flags(&server);
    flags.extend([
        "--header-read-timeout".into(),
        "300ms".into(),
        "--max-connections".into(),
        "1".into(),
    ]);
    let node = start(&flags).await;
    // The first byte of a handshake record, then nothing.
    let mut stalled = TcpStream::connect(node.addr).await.unwrap();
    stalled.write_all(&[0x16]).await.unwrap();
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(DEADLINE, stalled.read_to_end(&mut rest))
        .await
        .expect("the stalled handshake is cut off");
    // End of stream or a reset: either way the node closed it, unanswered.
    assert!(rest.is_empty(), "{ended:?}: {rest:?}");
    // Its slot is free again: a real client is served.
    let (status, _) = tokio::time::timeout(
        DEADLINE,
        once(
            client_config(&[&ca.ca_file], None),
            node.addr,
            "GET",
            "/api/v1/health",
            None,
        ),
    )
    .await
    .expect("served within the deadline")
    .expect("served");
    assert_eq!(status, 200);
}

#[tokio::test]
async fn probes_and_metrics_are_plain_on_the_probe_port_and_data_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let server = ca.issue("server", &["localhost"], Validity::Current);
    let mut flags = tls_flags(&server);
    flags.extend([
        "--tls-client-ca-file".into(),
        ca.ca_file.display().to_string(),
        "--probe-port".into(),
        "18082".into(),
    ]);
    // --probe-port 0 means no probe listener, so the port is fixed, on a
    // loopback address of this test's own (nothing else listens there).
    let node = Launch::new()
        .at(SocketAddr::from(([127, 0, 33, 1], 0)))
        .args(&flags)
        .spawn();
    let probe = node.probe_addr.expect("a probe listener");
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    for path in [
        "/api/v1/health",
        "/api/v1/ready",
        "/metrics",
        "/api/v1/cluster/rebalance",
    ] {
        let resp = client
            .get(format!("http://{probe}{path}"))
            .send()
            .await
            .unwrap();
        // Rebalance progress exists only in cluster mode: 404, but routed.
        let expected = if path.contains("rebalance") { 404 } else { 200 };
        assert_eq!(resp.status().as_u16(), expected, "{path}");
    }
    for path in ["/api/v1/cache/k", "/api/v1/stats", "/internal/v1/connect"] {
        let resp = client
            .get(format!("http://{probe}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status().as_u16(),
            404,
            "{path} is not on the probe port"
        );
        let body: Value = resp.json().await.unwrap();
        assert!(
            body["error"].as_str().unwrap().contains("no route"),
            "{body}"
        );
    }
}

/// Requests on new connections (each handshake takes the current
/// certificate) and on one kept-alive connection, until `stop`; counts
/// successes and panics on the first failure.
fn traffic(
    config: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    token: Arc<parking_lot::Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut kept = Https::connect(config.clone(), addr, "localhost")
            .await
            .expect("the kept-alive connection");
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let token = token.lock().clone();
            let mut fresh = Https::connect(config.clone(), addr, "localhost")
                .await
                .unwrap_or_else(|e| panic!("request {i}: new connection failed: {e}"));
            let key = format!("/api/v1/cache/k{}", i % 50);
            let (status, body) = fresh
                .request("PUT", &key, Some(json!({"value": i})), token.as_deref())
                .await
                .unwrap_or_else(|e| panic!("request {i}: {e}"));
            assert!(
                status == 200 || status == 201,
                "request {i}: {status} {body}"
            );
            let (status, body) = kept
                .request("GET", &key, None, token.as_deref())
                .await
                .unwrap_or_else(|e| panic!("request {i} on the kept connection: {e}"));
            assert_eq!(status, 200, "request {i} on the kept connection: {body}");
            served.fetch_add(1, Ordering::Relaxed);
        }
    })
}

/// Waits until `check` holds, failing past [`DEADLINE`].
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_key_and_token_rotation_under_traffic_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let server = ca.issue("server", &["localhost"], Validity::Current);
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "old-token\n").unwrap();
    let mut flags = tls_flags(&server);
    flags.extend(["--auth-token-file".into(), token_file.display().to_string()]);
    let node = start(&flags).await;
    let config = client_config(&[&ca.ca_file], None);
    let first = server.der();

    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let token = Arc::new(parking_lot::Mutex::new(Some("old-token".to_owned())));
    let load = traffic(
        config.clone(),
        node.addr,
        token.clone(),
        stop.clone(),
        served.clone(),
    );
    // The old connection stays up through every change below.
    let mut old = Https::connect(config.clone(), node.addr, "localhost")
        .await
        .unwrap();
    assert_eq!(old.served, first);

    // Certificate and key, the key written first: the node never adopts
    // the mismatched pair, and new handshakes get the new certificate.
    ca.issue_to(&server, &["localhost"], Validity::Current);
    let second = server.der();
    assert_ne!(first, second);
    eventually("the new certificate is served", || {
        let config = config.clone();
        let second = second.clone();
        async move {
            let conn = Https::connect(config, node.addr, "localhost")
                .await
                .unwrap();
            conn.served == second
        }
    })
    .await;

    // Tokens: old -> old+new -> new, the traffic switching in between.
    std::fs::write(&token_file, "old-token\nnew-token\n").unwrap();
    eventually("the new token is accepted", || {
        let config = config.clone();
        async move {
            let mut conn = Https::connect(config, node.addr, "localhost")
                .await
                .unwrap();
            let (status, _) = conn
                .request("GET", "/api/v1/stats", None, Some("new-token"))
                .await
                .unwrap();
            status == 200
        }
    })
    .await;
    *token.lock() = Some("new-token".into());
    let before = served.load(Ordering::Relaxed);
    eventually("traffic moved to the new token", || {
        let served = served.clone();
        async move { served.load(Ordering::Relaxed) > before + 5 }
    })
    .await;
    std::fs::write(&token_file, "new-token\n").unwrap();
    eventually("the old token is refused", || {
        let config = config.clone();
        async move {
            let mut conn = Https::connect(config, node.addr, "localhost")
                .await
                .unwrap();
            let (status, _) = conn
                .request("GET", "/api/v1/stats", None, Some("old-token"))
                .await
                .unwrap();
            status == 401
        }
    })
    .await;

    // The connection made before any change still works.
    let (status, _) = old
        .request("GET", "/api/v1/stats", None, Some("new-token"))
        .await
        .expect("the established connection survived the rotation");
    assert_eq!(status, 200);

    stop.store(true, Ordering::Relaxed);
    load.await.expect("no request failed during the rotation");
    assert!(served.load(Ordering::Relaxed) > 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_client_ca_admits_the_new_clients_without_dropping_the_old() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let next = TestCa::new(&dir.path().join("next"), "next-ca");
    let server = ca.issue("server", &["localhost"], Validity::Current);
    let client_ca = dir.path().join("client-ca.crt");
    std::fs::write(&client_ca, &ca.ca_pem).unwrap();
    let mut flags = tls_flags(&server);
    flags.extend([
        "--tls-client-ca-file".into(),
        client_ca.display().to_string(),
    ]);
    let node = start(&flags).await;
    let old_client = ca.issue("old-client", &["client"], Validity::Current);
    let new_client = next.issue("new-client", &["client"], Validity::Current);
    let old_config = client_config(&[&ca.ca_file], Some(&old_client));
    let new_config = client_config(&[&ca.ca_file], Some(&new_client));
    assert!(
        once(new_config.clone(), node.addr, "GET", "/api/v1/health", None)
            .await
            .is_err(),
        "a client of the next CA before the rotation"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let load = traffic(
        old_config.clone(),
        node.addr,
        Arc::new(parking_lot::Mutex::new(None)),
        stop.clone(),
        served.clone(),
    );
    // The bundle of both CAs, as during a CA rotation.
    tls_support::write_atomically(&client_ca, &format!("{}{}", ca.ca_pem, next.ca_pem));
    eventually("the next CA's clients are admitted", || {
        let config = new_config.clone();
        async move {
            once(config, node.addr, "GET", "/api/v1/health", None)
                .await
                .is_ok_and(|(s, _)| s == 200)
        }
    })
    .await;
    let before = served.load(Ordering::Relaxed);
    eventually("old clients still served", || {
        let served = served.clone();
        async move { served.load(Ordering::Relaxed) > before + 5 }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    load.await
        .expect("no request failed during the CA rotation");
}
