//! The REST API over real HTTP: every endpoint, the seed's JSON shapes, escaped
//! keys, every error path, and many concurrent clients.

mod node_proc;
mod support;

use serde_json::{Value, json};
use support::{TestNode, read};

fn assert_error(status: u16, body: &Value, expected: u16) {
    assert_eq!(status, expected, "body: {body}");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "error body must be {{\"error\": ...}}: {body}"
    );
}

#[tokio::test]
async fn crud_round_trip_keeps_the_seed_shape() {
    let node = TestNode::start(&[]).await;
    let (status, item) = node
        .set(
            "user:123",
            json!({"value": {"name": "John", "email": "john@example.com"}, "ttl": 300, "tags": ["user", "session"]}),
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(item["key"], "user:123");
    assert_eq!(
        item["value"],
        json!({"name": "John", "email": "john@example.com"})
    );
    assert_eq!(
        item["ttl"], 300_000_000_000u64,
        "ttl is in nanoseconds, as Go's time.Duration"
    );
    assert_eq!(item["access_count"], 0);
    assert_eq!(item["tags"], json!(["user", "session"]));
    for field in ["created_at", "accessed_at", "expires_at"] {
        let t = item[field].as_str().unwrap();
        chrono::DateTime::parse_from_rfc3339(t).unwrap_or_else(|e| panic!("{field} {t}: {e}"));
        assert!(t.ends_with('Z'), "{field} is UTC");
    }

    let (status, got) = node.get("user:123").await;
    assert_eq!(status, 200);
    assert_eq!(got["value"], item["value"]);
    assert_eq!(got["access_count"], 1);
    assert_eq!(got["created_at"], item["created_at"]);

    // PUT replaces: 200, new value, new ttl.
    let resp = node
        .client
        .put(node.url("/api/v1/cache/user:123"))
        .json(&json!({"value": [1, 2, 3], "ttl": 60}))
        .send()
        .await
        .unwrap();
    let (status, replaced) = read(resp).await;
    assert_eq!(status, 200);
    assert_eq!(replaced["value"], json!([1, 2, 3]));
    assert_eq!(replaced["ttl"], 60_000_000_000u64);
    assert_eq!(replaced["tags"], json!([]));

    let (status, deleted) = node.delete("user:123").await;
    assert_eq!(status, 200);
    assert_eq!(deleted["deleted"], true);
    let (status, body) = node.get("user:123").await;
    assert_error(status, &body, 404);
    let (status, body) = node.delete("user:123").await;
    assert_error(status, &body, 404);
}

#[tokio::test]
async fn ttl_absent_or_zero_uses_the_default_and_items_expire() {
    let node = TestNode::start(&["--default-ttl", "90s"]).await;
    let (_, item) = node.set("a", json!({"value": 1})).await;
    assert_eq!(item["ttl"], 90_000_000_000u64);
    let (_, item) = node.set("b", json!({"value": 1, "ttl": 0})).await;
    assert_eq!(item["ttl"], 90_000_000_000u64);

    let (status, _) = node.set("short", json!({"value": 1, "ttl": 1})).await;
    assert_eq!(status, 201);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let (status, body) = node.get("short").await;
    assert_error(status, &body, 404);
}

#[tokio::test]
async fn escaped_keys_are_percent_decoded() {
    let node = TestNode::start(&[]).await;
    for (encoded, decoded) in [
        ("user:123", "user:123"),
        ("a%2Fb", "a/b"),
        ("with%20space", "with space"),
        ("%E2%9C%93", "\u{2713}"),
        ("q%3Fx%3D1%26y", "q?x=1&y"),
        ("%25", "%"),
    ] {
        let (status, item) = node.set(encoded, json!({"value": decoded})).await;
        assert_eq!(status, 201, "{encoded}");
        assert_eq!(item["key"], decoded);
        let (status, item) = node.get(encoded).await;
        assert_eq!(status, 200, "{encoded}");
        assert_eq!(item["value"], decoded);
    }
    // "a/b" stored through a%2Fb is one key, not the path /a/b.
    let (status, body) = node.get("a/b").await;
    assert_error(status, &body, 404);
}

#[tokio::test]
async fn tag_invalidation_removes_exactly_the_tagged_items() {
    let node = TestNode::start(&[]).await;
    for i in 0..5 {
        let tags = if i < 3 {
            json!(["user", "all"])
        } else {
            json!(["all"])
        };
        node.set(&format!("k{i}"), json!({"value": i, "tags": tags}))
            .await;
    }
    let (status, body) = node.post_empty("/api/v1/invalidate/tag/user").await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"tag": "user", "invalidated": 3}));
    for i in 0..5 {
        let (status, _) = node.get(&format!("k{i}")).await;
        assert_eq!(status, if i < 3 { 404 } else { 200 });
    }
    let (_, body) = node.post_empty("/api/v1/invalidate/tag/user").await;
    assert_eq!(body["invalidated"], 0);
    let (_, body) = node.post_empty("/api/v1/invalidate/tag/all").await;
    assert_eq!(body["invalidated"], 2);
}

#[tokio::test]
async fn stats_health_and_ready() {
    let node = TestNode::start(&["--node-id", "node-7", "--max-size", "3"]).await;
    for i in 0..5 {
        node.set(&format!("k{i}"), json!({"value": i})).await;
    }
    node.get("k4").await;
    node.get("k0").await; // evicted
    node.delete("k4").await;

    let (status, stats) = node.get_json("/api/v1/stats").await;
    assert_eq!(status, 200);
    assert_eq!(stats["node_id"], "node-7");
    assert_eq!(stats["sets"], 5);
    assert_eq!(stats["hits"], 1);
    assert_eq!(stats["misses"], 1);
    assert_eq!(stats["deletes"], 1);
    assert_eq!(stats["evictions"], 2);
    assert_eq!(stats["items"], 2);
    assert_eq!(stats["capacity"], 3);
    assert_eq!(stats["hit_ratio"], 0.5);
    assert!(stats["bytes"].as_u64().unwrap() > 0);
    assert!(stats["uptime_seconds"].as_f64().unwrap() >= 0.0);

    let (status, health) = node.get_json("/api/v1/health").await;
    assert_eq!(status, 200);
    assert_eq!(health["status"], "healthy");
    let (status, ready) = node.get_json("/api/v1/ready").await;
    assert_eq!(status, 200);
    assert_eq!(ready["status"], "ready");
}

#[tokio::test]
async fn metrics_use_the_seed_names() {
    let node = TestNode::start(&[]).await;
    node.set("k", json!({"value": 1})).await;
    node.get("k").await;
    node.get("missing").await;
    let resp = node.client.get(node.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = resp.text().await.unwrap();
    let sample = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("{name} missing from:\n{text}"))
            .parse()
            .unwrap()
    };
    assert_eq!(sample("distrocache_hits_total"), 1.0);
    assert_eq!(sample("distrocache_misses_total"), 1.0);
    assert_eq!(sample("distrocache_sets_total"), 1.0);
    assert_eq!(sample("distrocache_deletes_total"), 0.0);
    assert_eq!(sample("distrocache_evictions_total"), 0.0);
    assert_eq!(sample("distrocache_items_total"), 1.0);
    assert_eq!(sample("distrocache_items"), 1.0);
    assert_eq!(sample("distrocache_expirations_total"), 0.0);
    assert!(sample("distrocache_memory_used_bytes") > 0.0);
    assert_eq!(
        sample("distrocache_access_duration_seconds_count{operation=\"get\"}"),
        2.0
    );
}

/// Every metric passes Prometheus' own linter (`promtool`, Debian package
/// `prometheus`, installed by the test script).
#[tokio::test]
async fn metrics_pass_promtool() {
    let node = TestNode::start(&[]).await;
    node.set("k", json!({"value": 1, "tags": ["t"]})).await;
    node.get("k").await;
    let text = node
        .client
        .get(node.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed (Debian package prometheus; scripts/test.sh installs it)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn bad_write_bodies_get_400() {
    let node = TestNode::start(&[]).await;
    for body in [
        "",
        "not json",
        "{\"value\": 1",
        "[1, 2]",
        "{\"ttl\": 5}",
        "{\"value\": null}",
        "{\"value\": 1, \"ttl\": -5}",
        "{\"value\": 1, \"ttl\": \"5m\"}",
        "{\"value\": 1, \"ttl\": 2.5}",
        "{\"value\": 1, \"tags\": \"user\"}",
        "{\"value\": 1, \"tags\": [1, 2]}",
        "{\"value\": 1, \"tags\": [\"\"]}",
        "{\"value\": 1, \"ttl\": 99999999999999999999}",
        "{\"value\": 1, \"ttl\": 9223372037}",
    ] {
        let resp = node
            .client
            .post(node.url("/api/v1/cache/k"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let (status, err) = read(resp).await;
        assert_error(status, &err, 400);
    }
    let (status, _) = node.get("k").await;
    assert_eq!(status, 404, "nothing was stored by a bad request");
}

#[tokio::test]
async fn limits_answer_413_414_and_400() {
    let node = TestNode::start(&[
        "--max-value-bytes",
        "100",
        "--max-body-bytes",
        "1000",
        "--max-key-bytes",
        "16",
        "--max-tags",
        "2",
        "--max-tag-bytes",
        "8",
    ])
    .await;
    let (status, body) = node.set("k", json!({"value": "x".repeat(200)})).await;
    assert_error(status, &body, 413);
    let (status, body) = node
        .set("k", json!({"value": 1, "pad": "x".repeat(2000)}))
        .await;
    assert_error(status, &body, 413);
    let (status, body) = node.set(&"k".repeat(17), json!({"value": 1})).await;
    assert_error(status, &body, 414);
    let (status, body) = node.get(&"k".repeat(17)).await;
    assert_error(status, &body, 414);
    let (status, body) = node
        .set("k", json!({"value": 1, "tags": ["a", "b", "c"]}))
        .await;
    assert_error(status, &body, 400);
    let (status, body) = node
        .set("k", json!({"value": 1, "tags": ["waytoolongtag"]}))
        .await;
    assert_error(status, &body, 400);
    let (status, body) = node
        .post_empty("/api/v1/invalidate/tag/waytoolongtag")
        .await;
    assert_error(status, &body, 400);
    // Within every limit it works.
    let (status, _) = node
        .set(
            &"k".repeat(16),
            json!({"value": "x".repeat(50), "tags": ["a", "b"]}),
        )
        .await;
    assert_eq!(status, 201);
}

#[tokio::test]
async fn a_byte_budget_too_small_for_one_item_answers_413() {
    let node = TestNode::start(&["--max-memory", "300"]).await;
    let (status, body) = node.set("k", json!({"value": "x".repeat(500)})).await;
    assert_error(status, &body, 413);
    let (status, _) = node.set("k", json!({"value": 1})).await;
    assert_eq!(status, 201);
}

#[tokio::test]
async fn wrong_content_type_method_route_and_encoding() {
    let node = TestNode::start(&[]).await;
    let resp = node
        .client
        .post(node.url("/api/v1/cache/k"))
        .header("content-type", "text/plain")
        .body("{\"value\": 1}")
        .send()
        .await
        .unwrap();
    let (status, body) = read(resp).await;
    assert_error(status, &body, 415);

    let resp = node
        .client
        .patch(node.url("/api/v1/cache/k"))
        .send()
        .await
        .unwrap();
    let (status, body) = read(resp).await;
    assert_error(status, &body, 405);
    let resp = node
        .client
        .get(node.url("/api/v1/invalidate/tag/t"))
        .send()
        .await
        .unwrap();
    let (status, body) = read(resp).await;
    assert_error(status, &body, 405);
    let resp = node
        .client
        .delete(node.url("/api/v1/stats"))
        .send()
        .await
        .unwrap();
    let (status, body) = read(resp).await;
    assert_error(status, &body, 405);

    for path in [
        "/",
        "/api/v1/cache",
        "/api/v1/cache/",
        "/api/v1/cache/a/b",
        "/api/v2/stats",
    ] {
        let (status, body) = node.get_json(path).await;
        assert_error(status, &body, 404);
    }

    // %FF does not decode to UTF-8.
    let (status, body) = node.get("%FF").await;
    assert_error(status, &body, 400);

    // A body with no content type is taken as JSON, as the seed did.
    let resp = node
        .client
        .post(node.url("/api/v1/cache/k"))
        .body("{\"value\": 1}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);

    // So is one sent as curl -d sends it (the seed never checked), and any
    // +json type; a form body that is not JSON is a 400, another type a 415.
    for (i, ct) in [
        "application/x-www-form-urlencoded",
        "application/vnd.example+json",
    ]
    .into_iter()
    .enumerate()
    {
        let resp = node
            .client
            .put(node.url(&format!("/api/v1/cache/form{i}")))
            .header("content-type", ct)
            .body("{\"value\": [1, 2, 3]}")
            .send()
            .await
            .unwrap();
        let (status, item) = read(resp).await;
        assert_eq!(status, 201, "{ct}: {item}");
        assert_eq!(item["value"], json!([1, 2, 3]));
    }
    let resp = node
        .client
        .put(node.url("/api/v1/cache/form"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("value=1")
        .send()
        .await
        .unwrap();
    let (status, body) = read(resp).await;
    assert_error(status, &body, 400);
    let resp = node
        .client
        .put(node.url("/api/v1/cache/form"))
        .header("content-type", "multipart/form-data; boundary=x")
        .body("{\"value\": 1}")
        .send()
        .await
        .unwrap();
    let (status, body) = read(resp).await;
    assert_error(status, &body, 415);
}

#[tokio::test]
async fn concurrent_clients_see_consistent_results() {
    let node = std::sync::Arc::new(TestNode::start(&["--max-size", "100000"]).await);
    let clients = 16;
    let per_client = 100;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_client {
                // Each client owns some keys and shares "shared-{i}" with the others.
                let (status, _) = node
                    .set(
                        &format!("c{c}-k{i}"),
                        json!({"value": [c, i], "tags": ["load"]}),
                    )
                    .await;
                assert_eq!(status, 201);
                let (status, item) = node.get(&format!("c{c}-k{i}")).await;
                assert_eq!(status, 200);
                assert_eq!(item["value"], json!([c, i]));
                let (status, _) = node.set(&format!("shared-{i}"), json!({"value": c})).await;
                assert!(status == 200 || status == 201);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (_, stats) = node.get_json("/api/v1/stats").await;
    assert_eq!(stats["sets"], (2 * clients * per_client) as u64);
    assert_eq!(stats["hits"], (clients * per_client) as u64);
    assert_eq!(stats["items"], (clients * per_client + per_client) as u64);
    let (_, body) = node.post_empty("/api/v1/invalidate/tag/load").await;
    assert_eq!(body["invalidated"], (clients * per_client) as u64);
    let (_, stats) = node.get_json("/api/v1/stats").await;
    assert_eq!(stats["items"], per_client as u64);
}

/// With a client token and no peer token, a peer API sharing the client port
/// requires the client token: a peer connection (which reads and writes any
/// key and replaces the ring) is no way around it. Two such nodes still
/// reach each other, since they send that token to each other.
#[tokio::test]
async fn a_peer_api_on_the_client_port_requires_the_client_token() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let ring = dir.path().join("ring.json");
    let start = |id: &'static str| {
        let token = token.display().to_string();
        let ring = ring.display().to_string();
        async move {
            TestNode::start(&[
                "--node-id",
                id,
                "--auth-token-file",
                &token,
                "--membership-file",
                &ring,
                "--membership-poll-interval",
                "50ms",
            ])
            .await
        }
    };
    let a = start("a").await;
    let b = start("b").await;
    let doc = json!({
        "epoch": 1,
        "replicationFactor": 1,
        "hashing": {"algorithm": "rendezvous"},
        "members": [
            {"id": "a", "address": a.addr.to_string(), "state": "active"},
            {"id": "b", "address": b.addr.to_string(), "state": "active"},
        ],
    });
    std::fs::write(&ring, doc.to_string()).unwrap();
    for node in [&a, &b] {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while node.get_json("/api/v1/ready").await.0 != 200 {
            assert!(std::time::Instant::now() < deadline, "never ready");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    // Opening a peer connection takes the token: without it (or with a
    // wrong one) the upgrade is refused with a JSON 401, and no peer
    // operation can be sent.
    for auth in [None, Some("Bearer wrong"), Some("Basic s3cret")] {
        let mut request = a
            .client
            .get(a.url("/internal/v1/connect"))
            .header("connection", "upgrade")
            .header("upgrade", "distrocache-peer/1");
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        let (status, body) = read(request.send().await.unwrap()).await;
        assert_error(status, &body, 401);
    }
    let settings = cache_node::peer::PeerSettings {
        connect_timeout: std::time::Duration::from_secs(2),
        request_timeout: std::time::Duration::from_secs(2),
        max_message_bytes: 1 << 20,
    };
    let hostile_ring = distrocache_membership::MembershipDoc::from_json(
        br#"{"epoch": 99, "replicationFactor": 1, "members": []}"#,
    )
    .unwrap();
    for token in [None, Some("wrong")] {
        let intruder = cache_node::peer::PeerClient::new("intruder", settings, token);
        let refused = intruder.put_ring(a.addr, &hostile_ring).await.unwrap_err();
        assert!(
            matches!(&refused, cache_node::peer::PeerError::Status { status, .. } if status.as_u16() == 401),
            "{refused}"
        );
        assert!(intruder.ring(a.addr).await.is_err());
    }
    // With the token the ring can be read, and it was never replaced.
    let peer = cache_node::peer::PeerClient::new("peer", settings, Some("s3cret"));
    assert_eq!(
        peer.ring(a.addr).await.unwrap().epoch,
        1,
        "the ring was not replaced"
    );

    // Writes through a, reads through b: keys owned by the other node travel
    // over the peer API, with the token.
    let mut served_by_b = 0;
    for i in 0..32 {
        let resp = a
            .client
            .put(a.url(&format!("/api/v1/cache/k{i}")))
            .bearer_auth("s3cret")
            .json(&json!({"value": i}))
            .send()
            .await
            .unwrap();
        if resp.headers()["x-distrocache-served-by"] == "b" {
            served_by_b += 1;
        }
        let (status, body) = read(resp).await;
        assert_eq!(status, 201, "{body}");
        let resp = b
            .client
            .get(b.url(&format!("/api/v1/cache/k{i}")))
            .bearer_auth("s3cret")
            .send()
            .await
            .unwrap();
        let (status, item) = read(resp).await;
        assert_eq!(status, 200, "{item}");
        assert_eq!(item["value"], i);
    }
    assert!(
        (1..32).contains(&served_by_b),
        "both nodes own keys ({served_by_b} of 32 on b)"
    );
    let (status, body) = b.get_json("/api/v1/cache/k0").await;
    assert_error(status, &body, 401);
}
