//! The kubectl plugin (the `distrocache` binary linked as
//! `kubectl-distrocache`) reading and writing a real 2-node cluster
//! through a stand-in API server: it serves the DistroCache object and,
//! like kube-apiserver's Service proxy, forwards
//! `/api/v1/namespaces/<ns>/services/<name>:http/proxy/<path>` to a node
//! (each request to the next node, as a Service spreads them), passing on
//! every header but `Authorization`, which kube-apiserver keeps for itself;
//! and it serves Secrets (or refuses them, as RBAC would). The real control
//! plane cannot proxy to its loopback pods (see tests/tests/plugin.rs), so
//! the round trips through a proxy are proven here: the paths, verbs,
//! bodies and credentials the plugin sends, and how it reads the nodes'
//! answers, for an open cache and for one that wants a token.

#[path = "../../cache-node/tests/cluster_support/mod.rs"]
mod cluster_support;
#[path = "../../cache-node/tests/node_proc/mod.rs"]
mod node_proc;
#[path = "../../cache-node/tests/tls_support/mod.rs"]
mod tls_support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cluster_support::ProcCluster;
use distrocache_membership::MemberState::Active;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

const CLI: &str = env!("CARGO_BIN_EXE_distrocache");
const RUN_DEADLINE: Duration = Duration::from_secs(120);
const SETTLE: Duration = Duration::from_secs(60);
const NS: &str = "shop";
const USER_TOKEN: &str = "user-token-of-the-kubeconfig";

/// A request the stand-in API server received.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    path: String,
    authorization: Option<String>,
    /// `X-DistroCache-Token`, the node's token where a proxy takes
    /// `Authorization`.
    token: Option<String>,
}

struct State {
    caches: Vec<Value>,
    /// The nodes behind each cache's client Service, by cache name.
    nodes: Vec<(String, Vec<SocketAddr>)>,
    /// Secrets the user may read; any other is refused (403), as RBAC would.
    secrets: Vec<Value>,
    next: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
    http: reqwest::Client,
}

/// An auth Secret as the operator writes it: the client tokens under
/// `client-token`.
fn auth_secret(name: &str, client_tokens: &str) -> Value {
    use base64::Engine;
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NS},
        "type": "Opaque",
        "data": {"client-token": base64::engine::general_purpose::STANDARD.encode(client_tokens)},
    })
}

fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

fn answer(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(body))
        .expect("a valid answer")
}

fn json_answer(status: StatusCode, value: &Value) -> Response<Full<Bytes>> {
    answer(status, Bytes::from(value.to_string()))
}

async fn handle(
    state: Arc<State>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = request.method().clone();
    let uri = request.uri().clone();
    let path = uri.path().to_owned();
    let content_type = request.headers().get("content-type").cloned();
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let token = header("x-distrocache-token");
    state.seen.lock().unwrap().push(Seen {
        method: method.clone(),
        path: path.clone(),
        authorization: header("authorization"),
        token: token.clone(),
    });
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => {
            let status = status_object(400, "BadRequest", &e.to_string());
            return Ok(json_answer(StatusCode::BAD_REQUEST, &status));
        }
    };
    let caches = format!("/apis/distrocache.io/v1alpha1/namespaces/{NS}/distrocaches/");
    if let Some(name) = path.strip_prefix(&caches) {
        let found = state
            .caches
            .iter()
            .find(|c| c["metadata"]["name"] == name && method == Method::GET);
        return Ok(match found {
            Some(cache) => json_answer(StatusCode::OK, cache),
            None => json_answer(
                StatusCode::NOT_FOUND,
                &status_object(
                    404,
                    "NotFound",
                    &format!("distrocaches.distrocache.io {name:?} not found"),
                ),
            ),
        });
    }
    let secrets = format!("/api/v1/namespaces/{NS}/secrets/");
    if let Some(name) = path.strip_prefix(&secrets) {
        let found = state
            .secrets
            .iter()
            .find(|s| s["metadata"]["name"] == name && method == Method::GET);
        return Ok(match found {
            Some(secret) => json_answer(StatusCode::OK, secret),
            None => json_answer(
                StatusCode::FORBIDDEN,
                &status_object(
                    403,
                    "Forbidden",
                    &format!(
                        "secrets {name:?} is forbidden: User \"someone\" cannot get resource \"secrets\" in API group \"\" in the namespace \"{NS}\""
                    ),
                ),
            ),
        });
    }
    // The Service's proxy of every cache: the rest of the path (still
    // percent-encoded) and the query go to a node; `Authorization` (the
    // user's credential, consumed here) does not.
    let services = format!("/api/v1/namespaces/{NS}/services/");
    if let Some((service, rest)) = path
        .strip_prefix(&services)
        .and_then(|p| p.split_once(":http/proxy"))
    {
        let nodes = &state
            .nodes
            .iter()
            .find(|(cache, _)| cache == service)
            .unwrap_or_else(|| panic!("no nodes behind service {service}"))
            .1;
        let node = nodes[state.next.fetch_add(1, Ordering::Relaxed) % nodes.len()];
        let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
        let mut forward = state
            .http
            .request(method, format!("http://{node}{rest}{query}"))
            .body(body);
        if let Some(ct) = content_type {
            forward = forward.header("content-type", ct);
        }
        if let Some(token) = token {
            forward = forward.header("x-distrocache-token", token);
        }
        return Ok(match forward.send().await {
            Ok(reply) => {
                let status = reply.status();
                let bytes = reply.bytes().await.unwrap_or_default();
                answer(status, bytes)
            }
            Err(e) => json_answer(
                StatusCode::SERVICE_UNAVAILABLE,
                &status_object(
                    503,
                    "ServiceUnavailable",
                    &format!("error trying to reach service: {e}"),
                ),
            ),
        });
    }
    Ok(json_answer(
        StatusCode::NOT_FOUND,
        &status_object(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ),
    ))
}

/// Starts the stand-in API server on a loopback port; its address.
async fn stand_in_api_server(state: Arc<State>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the stand-in API server");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |r| handle(state.clone(), r));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// A kubeconfig for `server` whose context's namespace is [`NS`].
fn write_kubeconfig(path: &Path, server: SocketAddr) {
    let config = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "stand-in", "cluster": {"server": format!("http://{server}")}}],
        "users": [{"name": "user", "user": {"token": USER_TOKEN}}],
        "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "user", "namespace": NS}}],
        "current-context": "stand-in",
    });
    std::fs::write(path, config.to_string()).unwrap();
}

fn cache_object(name: &str, epoch: u64, ids: &[String], auth: Option<&str>) -> Value {
    let members: Vec<Value> = ids
        .iter()
        .map(|id| json!({"pod": id, "address": format!("{id}.peers:8081"), "state": "active", "ready": true, "items": 0}))
        .collect();
    json!({
        "apiVersion": "distrocache.io/v1alpha1",
        "kind": "DistroCache",
        "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"), "generation": 1},
        "spec": {
            "replicas": ids.len(),
            "replicationFactor": 2,
            "auth": match auth {
                None => json!({"enabled": false}),
                Some(secret) => json!({"enabled": true, "secretName": secret}),
            },
        },
        "status": {
            "observedGeneration": 1,
            "replicas": ids.len(),
            "readyReplicas": ids.len(),
            "ringEpoch": epoch,
            "members": members,
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "AllMembersReady",
                 "message": "every member is ready", "lastTransitionTime": "2026-12-03T00:00:00Z"},
                {"type": "Rebalancing", "status": "False", "reason": "Settled",
                 "message": "no data is moving", "lastTransitionTime": "2026-12-03T00:00:00Z"}
            ],
        },
    })
}

/// The plugin as the README installs it: a link named
/// `kubectl-distrocache` to the `distrocache` binary.
struct Plugin {
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

impl Plugin {
    fn install(server: SocketAddr) -> Plugin {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(CLI, dir.path().join("kubectl-distrocache")).unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        write_kubeconfig(&kubeconfig, server);
        Plugin { dir, kubeconfig }
    }

    /// Runs the plugin with `args` (and `stdin`), off the async runtime
    /// (the stand-in server runs on it), within [`RUN_DEADLINE`].
    async fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(self.dir.path().join("kubectl-distrocache"));
        cmd.args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("NO_PROXY", "*")
            .env_remove("HTTPS_PROXY")
            .env_remove("HTTP_PROXY")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let stdin = stdin.map(str::to_owned);
        let what = format!("{args:?}");
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut child = cmd.spawn().expect("start kubectl-distrocache");
            let mut input = child.stdin.take().unwrap();
            if let Some(text) = stdin {
                input.write_all(text.as_bytes()).unwrap();
            }
            drop(input);
            let deadline = Instant::now() + RUN_DEADLINE;
            while child.try_wait().unwrap().is_none() {
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    panic!("kubectl-distrocache {what} ran longer than {RUN_DEADLINE:?}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            child.wait_with_output().unwrap()
        })
        .await
        .unwrap()
    }
}

fn ok(out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{:?}: {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn json_of(out: Output) -> Value {
    let stdout = ok(out);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// Exit 1, nothing on stdout, one `error: ` line on stderr; that line.
fn failed(out: Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one error line: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    lines[0].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugin_reads_status_and_round_trips_items_through_a_service_proxy() {
    let mut c = ProcCluster::new(2, 2);
    let epoch = c.set_ring(&[(0, Active), (1, Active)]);
    for i in 0..2 {
        c.start(i);
    }
    c.wait_settled(epoch, SETTLE).await;
    let ids: Vec<String> = c.nodes.iter().map(|n| n.id.clone()).collect();
    // A one-node cluster that wants tokens, behind three caches: one whose
    // Secret holds the node's client token (first of two lines, as during a
    // rotation), one whose Secret holds a token the node does not accept,
    // and one whose Secret the user may not read.
    let mut guarded = ProcCluster::new(1, 1).with_auth();
    let guarded_epoch = guarded.set_ring(&[(0, Active)]);
    guarded.start(0);
    guarded.wait_settled(guarded_epoch, SETTLE).await;
    let auth_caches = ["locked", "stale", "sealed"];
    let mut nodes = vec![(
        "orders".to_owned(),
        c.nodes.iter().map(|n| n.addr).collect(),
    )];
    nodes.extend(auth_caches.map(|name| (name.to_owned(), vec![guarded.nodes[0].addr])));
    let state = Arc::new(State {
        caches: vec![
            cache_object("orders", epoch, &ids, None),
            cache_object("locked", 1, &ids[..1], Some("locked-auth")),
            cache_object("stale", 1, &ids[..1], Some("stale-auth")),
            cache_object("sealed", 1, &ids[..1], Some("sealed-auth")),
        ],
        nodes,
        secrets: vec![
            auth_secret("locked-auth", "\nclient-secret-token\nold-client-token\n"),
            auth_secret("stale-auth", "retired-client-token\n"),
        ],
        next: AtomicUsize::new(0),
        seen: Mutex::new(Vec::new()),
        http: reqwest::Client::builder().no_proxy().build().unwrap(),
    });
    let server = stand_in_api_server(state.clone()).await;
    let plugin = Plugin::install(server);

    // status: the resource, then what a node says through the proxy (the
    // namespace is the kubeconfig context's).
    let table = ok(plugin.run(&["status", "orders"], None).await);
    eprintln!("kubectl distrocache status orders:\n{table}");
    assert!(table.contains(&format!("ring epoch {epoch}")), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("Ready") && l.contains("True") && l.contains("AllMembersReady")),
        "{table}"
    );
    for id in &ids {
        assert!(
            table
                .lines()
                .any(|l| l.starts_with(id.as_str()) && l.contains("active")),
            "{table}"
        );
    }
    let ring_line = table
        .lines()
        .find(|l| l.starts_with("ring seen by node"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        ring_line.contains(&format!(
            "epoch {epoch}, 2 member(s), replication factor 2, settled"
        )),
        "{ring_line}"
    );
    let rebalance_line = table
        .lines()
        .find(|l| l.starts_with("rebalance on node"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        rebalance_line.contains(&format!("phase idle, epoch {epoch}, synced epoch {epoch}")),
        "{rebalance_line}"
    );

    let status = json_of(plugin.run(&["status", "orders", "-o", "json"], None).await);
    assert_eq!(status["ringEpoch"], epoch);
    assert_eq!(status["readyReplicas"], 2);
    assert!(status["nodesError"].is_null(), "{status}");
    assert_eq!(status["ring"]["epoch"], epoch);
    assert_eq!(status["ring"]["settled"], true);
    assert_eq!(status["ring"]["members"].as_array().map(Vec::len), Some(2));
    assert_eq!(status["rebalance"]["syncedEpoch"], epoch);
    assert!(ids.contains(&status["rebalance"]["nodeId"].as_str().unwrap().to_owned()));

    // set through one node, get through the other (the stand-in alternates).
    let stored = json_of(
        plugin
            .run(
                &[
                    "set",
                    "orders",
                    "cart:42",
                    r#"{"items":["tea"],"total":3.5}"#,
                    "--ttl",
                    "5m",
                    "--tag",
                    "carts",
                    "-o",
                    "json",
                ],
                None,
            )
            .await,
    );
    assert_eq!(stored["key"], "cart:42");
    for _ in 0..2 {
        let read = json_of(
            plugin
                .run(&["get", "orders", "cart:42", "-n", NS, "-o", "json"], None)
                .await,
        );
        assert_eq!(read["value"], json!({"items": ["tea"], "total": 3.5}));
        assert_eq!(read["tags"], json!(["carts"]));
        assert_eq!(read["ttl"], 300_000_000_000u64);
    }
    // From stdin as text, and from a file.
    ok(plugin
        .run(&["set", "orders", "note", "--string"], Some("plain text"))
        .await);
    let note = json_of(
        plugin
            .run(&["get", "orders", "note", "-o", "json"], None)
            .await,
    );
    assert_eq!(note["value"], "plain text");
    let file = plugin.dir.path().join("value.json");
    std::fs::write(&file, r#"[1,2,3]"#).unwrap();
    ok(plugin
        .run(
            &["set", "orders", "list", "--file", file.to_str().unwrap()],
            None,
        )
        .await);
    let list = ok(plugin.run(&["get", "orders", "list"], None).await);
    assert!(
        list.lines()
            .any(|l| l.starts_with("value") && l.contains("[1,2,3]")),
        "{list}"
    );

    // Failures: one line, exit 1.
    let line = failed(plugin.run(&["get", "orders", "no-such-key"], None).await);
    assert!(
        line.contains(r#"key "no-such-key" not found in distrocache orders"#),
        "{line}"
    );
    let line = failed(plugin.run(&["set", "orders", "k", "{not json"], None).await);
    assert!(line.contains("not JSON"), "{line}");
    let line = failed(plugin.run(&["status", "nope"], None).await);
    assert!(
        line.contains(r#"distrocache "nope" not found in namespace "shop""#),
        "{line}"
    );
    let line = failed(
        plugin
            .run(&["get", "orders", "k", "-n", "elsewhere"], None)
            .await,
    );
    assert!(
        line.contains(r#"not found in namespace "elsewhere""#),
        "{line}"
    );
    // A cache that wants a token: the plugin reads it from the cache's
    // Secret and items round-trip through the proxy.
    let stored = json_of(
        plugin
            .run(&["set", "locked", "door", "\"open\"", "-o", "json"], None)
            .await,
    );
    assert_eq!(stored["value"], "open");
    let read = json_of(
        plugin
            .run(&["get", "locked", "door", "-o", "json"], None)
            .await,
    );
    assert_eq!(read["value"], "open");
    let status = json_of(plugin.run(&["status", "locked", "-o", "json"], None).await);
    assert!(status["nodesError"].is_null(), "{status}");
    assert_eq!(status["ring"]["epoch"], guarded_epoch, "{status}");
    assert_eq!(
        status["rebalance"]["syncedEpoch"], guarded_epoch,
        "{status}"
    );
    // A token the node no longer accepts: the node's 401, said plainly.
    let line = failed(plugin.run(&["get", "stale", "door"], None).await);
    assert!(
        line.contains("invalid bearer token") && line.contains("not one of its client tokens"),
        "{line}"
    );
    // A Secret the user may not read: the API server's refusal, and no
    // request to the nodes; status still shows the resource.
    let line = failed(plugin.run(&["get", "sealed", "door"], None).await);
    assert!(
        line.contains("Secret shop/sealed-auth") && line.contains("forbidden"),
        "{line}"
    );
    let status = json_of(plugin.run(&["status", "sealed", "-o", "json"], None).await);
    assert_eq!(status["ringEpoch"], 1);
    let nodes_error = status["nodesError"]
        .as_str()
        .unwrap_or_else(|| panic!("no nodesError: {status}"));
    assert!(nodes_error.contains("sealed-auth"), "{status}");
    // The open rebalance progress is still read; the ring view is not.
    assert!(status["ring"].is_null(), "{status}");
    assert_eq!(
        status["rebalance"]["syncedEpoch"], guarded_epoch,
        "{status}"
    );

    // What the stand-in saw: the user's token on every request, the
    // DistroCache read first, items through the client Service's proxy
    // (POST for set: the `create` verb of services/proxy), the node's token
    // on exactly the auth caches' requests (the first line of the Secret).
    let seen = state.seen.lock().unwrap().clone();
    assert!(!seen.is_empty());
    for s in &seen {
        assert_eq!(
            s.authorization.as_deref(),
            Some(format!("Bearer {USER_TOKEN}").as_str()),
            "{s:?}"
        );
    }
    let proxy = format!("/api/v1/namespaces/{NS}/services/orders:http/proxy");
    let sets: Vec<&Seen> = seen
        .iter()
        .filter(|s| {
            s.path.starts_with(&proxy)
                && s.path.contains("/api/v1/cache/")
                && s.method != Method::GET
        })
        .collect();
    assert_eq!(sets.len(), 3, "{sets:?}");
    assert!(sets.iter().all(|s| s.method == Method::POST), "{sets:?}");
    assert!(
        seen.iter().any(|s| s.method == Method::GET && s.path == format!("{proxy}/api/v1/cache/cart%3A42")),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|s| s.path == format!("{proxy}/api/v1/cluster"))
    );
    assert!(
        seen.iter()
            .any(|s| s.path == format!("{proxy}/api/v1/cluster/rebalance"))
    );
    for s in &seen {
        let expected = if s.path.contains("services/locked:") {
            Some("client-secret-token")
        } else if s.path.contains("services/stale:") {
            Some("retired-client-token")
        } else {
            None
        };
        assert_eq!(s.token.as_deref(), expected, "{s:?}");
    }
    assert!(
        seen.iter().any(|s| s.path.contains("services/locked:")),
        "{seen:?}"
    );
    // The cache whose Secret was refused: only `status`'s read of the open
    // rebalance progress reached its node, and no item request.
    let sealed: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.path.contains("services/sealed:"))
        .collect();
    assert!(!sealed.is_empty(), "{seen:?}");
    for s in sealed {
        assert!(
            s.method == Method::GET && s.path.ends_with("/api/v1/cluster/rebalance"),
            "{s:?}"
        );
    }
}
