//! The ring-aware client against nodes that serve their client API over
//! TLS (real cache-node processes on loopback): with `https://` seeds it
//! trusts the CA it is given and checks every node's certificate against one
//! name (by default the first seed's host); a node it cannot verify (no CA
//! given, another CA, another name), plain HTTP against TLS and TLS against
//! plain HTTP are each a clear error, never a hang; and against a 3-node
//! cache whose nodes share a certificate naming the cache's Service, it
//! learns every member from one seed and sends each write straight to the
//! key's primary over TLS. Against a node that asks for client certificates
//! (mutual TLS) it presents the one it is given; a node that refuses it
//! (none, another CA's, a CA rotated away) refuses every new connection,
//! and a write on one is reported as never sent, and is not applied; a
//! client whose certificate files are renewed presents the new one.

#[path = "../../cache-node/tests/cluster_support/mod.rs"]
mod cluster_support;
#[path = "../../cache-node/tests/node_proc/mod.rs"]
mod node_proc;
#[path = "../../cache-node/tests/tls_support/mod.rs"]
mod tls_support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cluster_support::{CLIENT_TLS_NAME, ProcCluster, sample};
use distrocache_client::{Client, Error, Method};
use distrocache_membership::MemberState::Active;
use node_proc::{Launch, NodeProc};
use tls_support::{Issued, TestCa, Validity, write_atomically};

/// Every wait here gives up (and fails the test) after this long.
const DEADLINE: Duration = Duration::from_secs(30);
const FORWARDS: &str = r#"distrocache_peer_requests_total{operation="forward"}"#;

fn tls_node(cert: &tls_support::Issued) -> NodeProc {
    Launch::new()
        .arg("--tls-cert-file")
        .arg(&cert.cert)
        .arg("--tls-key-file")
        .arg(&cert.key)
        .spawn()
}

fn https(addr: SocketAddr) -> String {
    format!("https://{addr}")
}

/// What connecting failed with; the test fails if it connected.
async fn refused(builder: distrocache_client::Builder, why: &str) -> String {
    match builder.connect().await {
        Ok(_) => panic!("{why}: connected"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn a_client_trusts_the_ca_it_is_given_and_checks_every_node_against_one_name() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let server = ca.issue("server", &[CLIENT_TLS_NAME, "127.0.0.1"], Validity::Current);
    let node = tls_node(&server);
    let ca_pem = std::fs::read(&ca.ca_file).unwrap();

    let client = Client::builder([https(node.addr)])
        .ca_pem(ca_pem.clone())
        .tls_server_name(CLIENT_TLS_NAME)
        .connect()
        .await
        .expect("the client learns the ring over TLS");
    let written = client
        .set_raw(
            "k",
            Bytes::from_static(br#"{"value":{"a":1},"tags":["t"]}"#),
        )
        .await
        .expect("a write over TLS");
    assert_eq!(written.status, 201);
    let item = client.get("k").await.unwrap().expect("the item");
    assert_eq!(item.value, serde_json::json!({"a": 1}));
    assert_eq!(item.tags, ["t"]);
    assert_eq!(client.invalidate_tag("t").await.unwrap(), 1);
    assert!(!client.delete("k").await.unwrap(), "invalidated already");

    // By default every node is checked against the first seed's host: here
    // an IP address, which the certificate names too.
    let by_seed = Client::builder([https(node.addr)])
        .ca_pem(ca_pem.clone())
        .connect()
        .await
        .expect("the seed's host is the default name");
    assert!(by_seed.get_raw("absent").await.unwrap().is_none());

    // Refused, each with the reason, when the node cannot be verified.
    let other = TestCa::new(&dir.path().join("other"), "other-ca");
    let err = refused(
        Client::builder([https(node.addr)]).tls_server_name(CLIENT_TLS_NAME),
        "the public roots only",
    )
    .await;
    assert!(
        err.contains("TLS with") && err.contains("certificate"),
        "{err}"
    );
    let err = refused(
        Client::builder([https(node.addr)])
            .ca_pem(std::fs::read(&other.ca_file).unwrap())
            .tls_server_name(CLIENT_TLS_NAME),
        "another CA",
    )
    .await;
    assert!(err.contains("certificate"), "{err}");
    let err = refused(
        Client::builder([https(node.addr)])
            .ca_pem(ca_pem.clone())
            .tls_server_name("elsewhere.test"),
        "another name",
    )
    .await;
    assert!(err.contains("not valid for name"), "{err}");

    // Plain HTTP to the TLS port is answered with the node's JSON error.
    let err = refused(Client::builder([node.addr.to_string()]), "plain HTTP").await;
    assert!(err.contains("400"), "{err}");

    // TLS to a plain node fails in the handshake, not in a hang.
    let plain = NodeProc::start(&[]);
    let started = Instant::now();
    let err = refused(
        Client::builder([https(plain.addr)]).ca_pem(ca_pem.clone()),
        "TLS to a plain node",
    )
    .await;
    assert!(err.contains("TLS with"), "{err}");
    assert!(started.elapsed() < DEADLINE, "took {:?}", started.elapsed());

    // Settings that cannot mean anything are refused before any request.
    let err = refused(
        Client::builder([https(node.addr), plain.addr.to_string()]),
        "mixed schemes",
    )
    .await;
    assert!(err.contains("mix http:// and https://"), "{err}");
    let err = refused(
        Client::builder([plain.addr.to_string()]).ca_pem(ca_pem.clone()),
        "a CA for a plain seed",
    )
    .await;
    assert!(err.contains("no seed is https://"), "{err}");
    let err = refused(
        Client::builder([https(node.addr)]).ca_pem(b"not PEM".to_vec()),
        "a CA file without certificates",
    )
    .await;
    assert!(err.contains("no certificate"), "{err}");
}

#[tokio::test]
async fn a_node_asking_for_client_certificates_takes_those_it_trusts_and_refuses_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let server = ca.issue("server", &[CLIENT_TLS_NAME], Validity::Current);
    let clients = TestCa::new(&dir.path().join("clients"), "clients-ca");
    let app = clients.issue("app", &["app"], Validity::Current);
    let strangers = TestCa::new(&dir.path().join("strangers"), "strangers-ca");
    let stranger = strangers.issue("stranger", &["stranger"], Validity::Current);
    // The node's client CA, a file of its own so that it can be rotated.
    let trusted = dir.path().join("trusted-clients.crt");
    write_atomically(&trusted, &clients.ca_pem);
    let node = Launch::new()
        .arg("--tls-cert-file")
        .arg(&server.cert)
        .arg("--tls-key-file")
        .arg(&server.key)
        .arg("--tls-client-ca-file")
        .arg(&trusted)
        .arg("--credentials-poll-interval")
        .arg("100ms")
        .spawn();
    let ca_pem = std::fs::read(&ca.ca_file).unwrap();
    let read = |path: &std::path::Path| std::fs::read(path).unwrap();
    let builder = |cert: Option<&Issued>| {
        let builder = Client::builder([https(node.addr)])
            .ca_pem(ca_pem.clone())
            .tls_server_name(CLIENT_TLS_NAME);
        match cert {
            Some(c) => builder.client_cert_pem(read(&c.cert), read(&c.key)),
            None => builder,
        }
    };

    let client = builder(Some(&app))
        .connect()
        .await
        .expect("a client with a certificate the node trusts");
    // Another reads its certificate from files of its own (a mounted
    // Secret's), which are renewed below.
    let mine = Issued {
        cert: dir.path().join("mine.crt"),
        key: dir.path().join("mine.key"),
    };
    std::fs::copy(&app.cert, &mine.cert).unwrap();
    std::fs::copy(&app.key, &mine.key).unwrap();
    let by_files = Client::builder([https(node.addr)])
        .ca_pem(ca_pem.clone())
        .tls_server_name(CLIENT_TLS_NAME)
        .client_cert_files(&mine.cert, &mine.key)
        .connect()
        .await
        .expect("a client with its certificate in files");
    assert!(by_files.get_raw("absent").await.unwrap().is_none());
    let written = client
        .set_raw("k", Bytes::from_static(br#"{"value":1}"#))
        .await
        .expect("a write with a client certificate");
    assert_eq!(written.status, 201);
    assert_eq!(client.get("k").await.unwrap().expect("the item").value, 1);

    // Refused, each with the node's reason.
    let err = refused(builder(None), "no client certificate").await;
    assert!(
        err.contains("the node refused the handshake: CertificateRequired"),
        "{err}"
    );
    let err = refused(builder(Some(&stranger)), "another CA's certificate").await;
    assert!(
        err.contains("the node refused the handshake: UnknownCA"),
        "{err}"
    );
    let err = refused(
        builder(None).client_cert_pem(read(&app.cert), read(&stranger.key)),
        "a certificate with another's key",
    )
    .await;
    assert!(
        err.contains("client certificate:") && err.contains("KeyMismatch"),
        "{err}"
    );
    let err = refused(
        builder(None).client_cert_pem(read(&app.cert), b"not a key".to_vec()),
        "a key file without a key",
    )
    .await;
    assert!(err.contains("client key"), "{err}");
    let plain = NodeProc::start(&[]);
    let err = refused(
        Client::builder([plain.addr.to_string()]).client_cert_pem(read(&app.cert), read(&app.key)),
        "a client certificate for a plain seed",
    )
    .await;
    assert!(err.contains("no seed is https://"), "{err}");

    // The node now trusts only the strangers' CA. Once it has re-read the
    // file, the app's certificate opens no new connection.
    write_atomically(&trusted, &strangers.ca_pem);
    let started = Instant::now();
    loop {
        match builder(Some(&app)).connect().await {
            Err(e) if e.to_string().contains("refused the handshake") => break,
            other => {
                assert!(
                    started.elapsed() < DEADLINE,
                    "the node still takes the rotated-out CA: {:?}",
                    other.err()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    // The client from before keeps its open connection (a rotation cuts
    // none); writes beyond it need new connections, which the node refuses.
    // Each of those is reported as never sent, never as "may have been
    // applied", and none of them was applied.
    let reader = builder(Some(&stranger))
        .connect()
        .await
        .expect("the newly trusted CA's certificate");
    let refused_writes = eight_writes(&client, "w", &reader).await;
    assert!(refused_writes > 0, "every write found an open connection");

    // The client with files: refused while they hold the app's certificate,
    // then, once they hold one the strangers' CA signed (the key written
    // first, then the certificate, as a careless renewal would), served on
    // new connections without being built again.
    assert!(eight_writes(&by_files, "f", &reader).await > 0);
    strangers.issue_to(&mine, &["app"], Validity::Current);
    let started = Instant::now();
    let mut round = 0;
    while eight_writes(&by_files, &format!("g{round}-"), &reader).await > 0 {
        assert!(
            started.elapsed() < DEADLINE,
            "the renewed certificate files were never presented"
        );
        round += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Eight writes at once through `client` (so that most need a new
/// connection), each then checked through `reader`: acknowledged and
/// stored, or refused by the node's TLS, reported as never sent, and not
/// stored; anything else fails the test. Returns how many were refused.
async fn eight_writes(client: &Client, prefix: &str, reader: &Client) -> usize {
    let keys: Vec<String> = (0..8).map(|i| format!("{prefix}{i}")).collect();
    let tasks: Vec<_> = keys
        .iter()
        .map(|key| {
            let (client, key) = (client.clone(), key.clone());
            tokio::spawn(async move {
                client
                    .set_raw(&key, Bytes::from_static(br#"{"value":2}"#))
                    .await
            })
        })
        .collect();
    let mut refused = 0;
    for (key, task) in keys.iter().zip(tasks) {
        let written = task.await.expect("a write task");
        let stored = reader.get_raw(key).await.unwrap();
        match written {
            Ok(answer) => {
                assert_eq!(answer.status, 201, "{key}");
                assert!(stored.is_some(), "{key} was acknowledged but is absent");
            }
            Err(Error::Unreachable(why)) => {
                assert!(why.contains("refused the handshake"), "{key}: {why}");
                assert!(stored.is_none(), "{key} was refused but applied");
                refused += 1;
            }
            Err(e) => panic!("{key}: {e}"),
        }
    }
    refused
}

/// The sum over the members of `series` in their `/metrics`, asked over TLS
/// (every node shows its peer counters from its start).
async fn total(client: &Client, members: &[SocketAddr], series: &str) -> f64 {
    let mut sum = 0.0;
    for &addr in members {
        let answer = client
            .at(addr, Method::GET, "/metrics".into())
            .await
            .unwrap_or_else(|e| panic!("metrics of {addr}: {e}"));
        assert_eq!(answer.status, 200, "metrics of {addr}");
        let text = String::from_utf8(answer.body.to_vec()).expect("metrics are text");
        sum += sample(&text, series).unwrap_or_else(|| panic!("{addr} shows no {series}"));
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cache_is_reached_member_by_member_under_its_services_name() {
    let (mut cluster, ca_file) = ProcCluster::new(3, 2).with_client_tls();
    cluster.set_ring(&[(0, Active), (1, Active), (2, Active)]);
    for i in 0..3 {
        cluster.start(i);
    }
    let members: Vec<SocketAddr> = cluster.nodes.iter().map(|n| n.addr).collect();
    let client = Client::builder([https(members[0])])
        .ca_pem(std::fs::read(&ca_file).unwrap())
        .tls_server_name(CLIENT_TLS_NAME)
        .connect()
        .await
        .expect("the client learns the ring from one seed over TLS");
    let deadline = Instant::now() + DEADLINE;
    while client.ring().nodes.len() < 3 {
        assert!(Instant::now() < deadline, "the ring never named 3 members");
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.refresh().await.expect("refresh over TLS");
    }
    let mut addresses: Vec<SocketAddr> = client.ring().nodes.iter().map(|n| n.address).collect();
    addresses.sort();
    let mut expected = members.clone();
    expected.sort();
    assert_eq!(addresses, expected, "every member at its own address");

    let forwards_before = total(&client, &members, FORWARDS).await;
    for i in 0..30 {
        let key = format!("tls-key-{i}");
        let body = Bytes::from(format!(r#"{{"value":{i}}}"#));
        let answer = loop {
            match client.set_raw(&key, body.clone()).await {
                Ok(answer) => break answer,
                // A member may still be taking its place in the ring.
                Err(Error::Status { status, .. }) if status == 503 => {
                    assert!(Instant::now() < deadline, "{key}: 503 until the deadline");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("{key}: {e}"),
            }
        };
        assert_eq!(
            answer.served_by(),
            Some(cluster.primary_of(&key).as_str()),
            "{key}: served by its primary"
        );
    }
    assert_eq!(
        total(&client, &members, FORWARDS).await,
        forwards_before,
        "no write was forwarded: each went straight to its primary"
    );
    for i in 0..30 {
        let key = format!("tls-key-{i}");
        let read = client.get(&key).await.unwrap().expect("written");
        assert_eq!(read.value, serde_json::json!(i), "{key}");
    }
}
