//! `reconcile` against a mocked API server, in milliseconds: tower-test's
//! mock service stands in for the API server (as kube-rs' controller-rs
//! does with its `ApiServerVerifier`), answering from a small in-memory
//! cluster, and each pod's node is a tiny HTTP server on its own loopback
//! address answering the progress report the operator asks for. Every API
//! call is recorded, so a test asserts what was written and in which order:
//! each scale step, an invalid spec, a lost ring ConfigMap and the status
//! write. The same behaviours run on the real control plane in
//! `tests/tests/operator.rs` and `e2e.rs`; these pin the controller's part.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use distrocache_membership::{
    CONFIGMAP_KEY, Hashing, Member, MemberState, MembershipDoc, NodeProgress, SyncPhase,
};
use distrocache_operator::controller::{self, Context};
use distrocache_operator::crd::DistroCache;
use distrocache_operator::metrics::Metrics;
use distrocache_operator::node_client::NodeClient;
use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};

const NS: &str = "ns";
const NAME: &str = "c";
const RING_PATH: &str = "/api/v1/namespaces/ns/configmaps/c-ring";
const STS_PATH: &str = "/apis/apps/v1/namespaces/ns/statefulsets/c";
const STATUS_PATH: &str = "/apis/distrocache.io/v1alpha1/namespaces/ns/distrocaches/c/status";

/// One API call as the mock server saw it.
#[derive(Debug, Clone)]
struct Call {
    method: Method,
    path: String,
    body: Value,
}

/// The cluster the mock API server answers from.
#[derive(Default)]
struct World {
    /// The cache as the API server holds it (the status is written here).
    cache: Value,
    /// Objects by path: what was applied, or put there by a test.
    objects: BTreeMap<String, Value>,
    pods: Vec<Value>,
    calls: Vec<Call>,
    /// Paths whose writes the API server refuses (500).
    refuse: Vec<String>,
}

impl World {
    fn answer(&mut self, method: &Method, path: &str, body: Value) -> (StatusCode, Value) {
        self.calls.push(Call {
            method: method.clone(),
            path: path.to_owned(),
            body: body.clone(),
        });
        if method != Method::GET && self.refuse.iter().any(|p| p == path) {
            return status(StatusCode::INTERNAL_SERVER_ERROR, "refused by the test");
        }
        match *method {
            Method::GET if path == "/api/v1/namespaces/ns/pods" => (
                StatusCode::OK,
                json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": self.pods}),
            ),
            Method::GET => match self.objects.get(path) {
                Some(object) => (StatusCode::OK, object.clone()),
                None => status(StatusCode::NOT_FOUND, "not found"),
            },
            Method::PATCH if path == STATUS_PATH => {
                self.cache["status"] = body["status"].clone();
                (StatusCode::OK, self.cache.clone())
            }
            // Server-side apply: the object as sent is the object as stored.
            Method::PATCH => {
                self.objects.insert(path.to_owned(), body.clone());
                (StatusCode::OK, body)
            }
            Method::POST if path.ends_with("/events") => (StatusCode::CREATED, body),
            Method::DELETE => match self.objects.remove(path) {
                Some(object) => (StatusCode::OK, object),
                None => status(StatusCode::NOT_FOUND, "not found"),
            },
            _ => status(
                StatusCode::METHOD_NOT_ALLOWED,
                "the mock does not serve this",
            ),
        }
    }

    fn ring(&self) -> Option<MembershipDoc> {
        let cm = self.objects.get(RING_PATH)?;
        let json = cm["data"][CONFIGMAP_KEY].as_str().expect("a ring document");
        Some(MembershipDoc::from_json(json.as_bytes()).expect("a valid ring"))
    }

    fn statefulset_replicas(&self) -> Option<i64> {
        self.objects.get(STS_PATH)?["spec"]["replicas"].as_i64()
    }

    /// Index of the first call matching, for ordering checks.
    fn position(&self, method: Method, path: &str) -> Option<usize> {
        self.calls
            .iter()
            .position(|c| c.method == method && c.path == path)
    }

    fn writes(&self) -> Vec<&Call> {
        self.calls
            .iter()
            .filter(|c| c.method != Method::GET && !c.path.ends_with("/events"))
            .collect()
    }

    fn events(&self) -> Vec<String> {
        self.calls
            .iter()
            .filter(|c| c.method == Method::POST && c.path.ends_with("/events"))
            .filter_map(|c| c.body["reason"].as_str().map(str::to_owned))
            .collect()
    }

    fn condition(&self, type_: &str) -> Option<(String, String)> {
        self.cache["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == type_)
            .map(|c| {
                (
                    c["status"].as_str().unwrap_or_default().to_owned(),
                    c["reason"].as_str().unwrap_or_default().to_owned(),
                )
            })
    }
}

fn status(code: StatusCode, message: &str) -> (StatusCode, Value) {
    // The API server's reason words (kube's `get_opt` looks for NotFound).
    let reason = match code {
        StatusCode::NOT_FOUND => "NotFound",
        StatusCode::METHOD_NOT_ALLOWED => "MethodNotAllowed",
        _ => "InternalError",
    };
    (
        code,
        json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

/// The mock API server and the fake nodes of one test.
struct Harness {
    world: Arc<Mutex<World>>,
    ctx: Arc<Context>,
    nodes: FakeNodes,
}

impl Harness {
    async fn new(spec: Value, pods: i32) -> Harness {
        let nodes = FakeNodes::start(pods.max(5)).await;
        let mut spec = spec;
        spec["port"] = json!(nodes.port);
        let cache = json!({
            "apiVersion": "distrocache.io/v1alpha1",
            "kind": "DistroCache",
            "metadata": {"name": NAME, "namespace": NS, "uid": "uid-c", "generation": 1,
                         "resourceVersion": "1"},
            "spec": spec,
        });
        let world = Arc::new(Mutex::new(World {
            cache,
            ..World::default()
        }));
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = world.clone();
        tokio::spawn(async move {
            while let Some((request, reply)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let bytes = body.collect_bytes().await.expect("a request body");
                let body: Value = if bytes.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&bytes).expect("the operator sends JSON")
                };
                let (code, answer) =
                    server
                        .lock()
                        .unwrap()
                        .answer(&parts.method, parts.uri.path(), body);
                reply.send_response(
                    Response::builder()
                        .status(code)
                        .header("content-type", "application/json")
                        .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                        .unwrap(),
                );
            }
        });
        let client = kube::Client::new(service, NS);
        let ctx = Context::new(
            client,
            Metrics::default(),
            NodeClient::new(Duration::from_secs(1)),
            Duration::from_secs(30),
            "distrocache-system".into(),
            "cache-node:test".into(),
        );
        let harness = Harness { world, ctx, nodes };
        for n in 0..pods {
            harness.run_pod(n);
        }
        harness
    }

    fn cache(&self) -> Arc<DistroCache> {
        let cache = self.world.lock().unwrap().cache.clone();
        Arc::new(serde_json::from_value(cache).expect("a DistroCache"))
    }

    async fn reconcile(&self) -> Result<(), controller::Error> {
        self.world.lock().unwrap().calls.clear();
        let result = controller::reconcile(self.cache(), self.ctx.clone())
            .await
            .map(|_| ());
        if let Err(e) = &result {
            let w = self.world();
            let last = w.calls.last().map(|c| format!("{} {}", c.method, c.path));
            eprintln!("reconcile failed after {last:?}: {e}");
        }
        result
    }

    /// Pod `c-<n>` running and ready on its fake node's address.
    fn run_pod(&self, n: i32) {
        let ip = self.nodes.ip(n);
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("c-{n}"), "namespace": NS, "uid": format!("pod-{n}"),
                         "labels": {"app.kubernetes.io/name": "distrocache", "app.kubernetes.io/instance": NAME}},
            "status": {"phase": "Running", "podIP": ip.to_string(),
                       "conditions": [{"type": "Ready", "status": "True"}]},
        });
        let mut world = self.world.lock().unwrap();
        world
            .pods
            .retain(|p| p["metadata"]["name"] != format!("c-{n}"));
        world.pods.push(pod);
    }

    fn remove_pod(&self, n: i32) {
        self.world
            .lock()
            .unwrap()
            .pods
            .retain(|p| p["metadata"]["name"] != format!("c-{n}"));
    }

    /// Every member of the ring written reports it has synced it (a
    /// leaving one also that its handoff is complete).
    fn nodes_sync(&self) {
        let ring = self.world.lock().unwrap().ring().expect("a ring");
        for m in &ring.members {
            let n: i32 = m.id.trim_start_matches("c-").parse().unwrap();
            self.nodes
                .report(n, progress(&m.id, ring.epoch, Some(m.state)));
        }
    }

    fn set_ring(&self, doc: &MembershipDoc) {
        let cm = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "c-ring", "namespace": NS},
            "data": {CONFIGMAP_KEY: doc.to_json()},
        });
        self.world
            .lock()
            .unwrap()
            .objects
            .insert(RING_PATH.into(), cm);
    }

    fn set_statefulset(&self, replicas: i32) {
        let sts = json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": NAME, "namespace": NS},
            "spec": {"replicas": replicas, "serviceName": "c-peers",
                     "selector": {"matchLabels": {}}, "template": {}},
        });
        self.world
            .lock()
            .unwrap()
            .objects
            .insert(STS_PATH.into(), sts);
    }

    /// A running cache of `n` active members at `epoch`, every node synced.
    fn steady(&self, n: i32, epoch: u64) {
        let doc = MembershipDoc {
            epoch,
            replication_factor: 2,
            hashing: Hashing::Rendezvous,
            members: (0..n)
                .map(|i| self.member(i, MemberState::Active))
                .collect(),
        };
        self.set_ring(&doc);
        self.set_statefulset(n);
        self.nodes_sync();
    }

    fn member(&self, n: i32, state: MemberState) -> Member {
        let ip = self.nodes.ip(n);
        Member {
            id: format!("c-{n}"),
            address: format!("{ip}:8081"),
            client_address: Some(format!("{ip}:{}", self.nodes.port)),
            state,
        }
    }

    fn set_replicas(&self, replicas: i32) {
        let mut world = self.world.lock().unwrap();
        world.cache["spec"]["replicas"] = json!(replicas);
        let generation = world.cache["metadata"]["generation"].as_i64().unwrap();
        world.cache["metadata"]["generation"] = json!(generation + 1);
    }

    fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.lock().unwrap()
    }
}

fn progress(id: &str, epoch: u64, state: Option<MemberState>) -> NodeProgress {
    NodeProgress {
        node_id: id.into(),
        epoch,
        synced_epoch: epoch,
        member_state: state,
        phase: SyncPhase::Idle,
        handoff_complete: state == Some(MemberState::Leaving),
        ready: true,
        items: 10,
        keys_sent: 0,
        keys_received: 0,
        last_sync_seconds: 0.0,
        last_backup: None,
    }
}

/// One HTTP server per pod, on 127.0.0.<20 + n> and one shared port,
/// answering `GET /api/v1/cluster/rebalance` with what the test set.
struct FakeNodes {
    port: u16,
    reports: Arc<Mutex<BTreeMap<i32, NodeProgress>>>,
}

impl FakeNodes {
    async fn start(count: i32) -> FakeNodes {
        let reports = Arc::new(Mutex::new(BTreeMap::new()));
        // The same port on every address: the spec names one client port.
        'port: for _ in 0..20 {
            let first = tokio::net::TcpListener::bind((Self::ip_of(0), 0))
                .await
                .expect("bind a loopback address");
            let port = first.local_addr().unwrap().port();
            let mut listeners = vec![first];
            for n in 1..count {
                match tokio::net::TcpListener::bind((Self::ip_of(n), port)).await {
                    Ok(l) => listeners.push(l),
                    Err(_) => continue 'port,
                }
            }
            for (n, listener) in listeners.into_iter().enumerate() {
                let reports = reports.clone();
                let n = n as i32;
                let app = axum::Router::new().route(
                    "/api/v1/cluster/rebalance",
                    axum::routing::get(move || {
                        let report = reports.lock().unwrap().get(&n).cloned();
                        async move {
                            match report {
                                Some(r) => (
                                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                                    serde_json::to_vec(&r).expect("a report serializes"),
                                )
                                    .into_response(),
                                None => axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response(),
                            }
                        }
                    }),
                );
                tokio::spawn(async move { axum::serve(listener, app).await });
            }
            return FakeNodes { port, reports };
        }
        panic!("no port free on every fake node's address");
    }

    fn ip_of(n: i32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 20 + n as u8))
    }

    fn ip(&self, n: i32) -> IpAddr {
        Self::ip_of(n)
    }

    fn report(&self, n: i32, progress: NodeProgress) {
        self.reports.lock().unwrap().insert(n, progress);
    }
}

use axum::response::IntoResponse;

#[tokio::test]
async fn a_new_cache_gets_its_children_then_a_ring_once_every_pod_reports() {
    let h = Harness::new(json!({"replicas": 3}), 0).await;
    h.reconcile().await.expect("reconcile");
    {
        let w = h.world();
        let applied: Vec<&str> = w.writes().iter().map(|c| c.path.as_str()).collect();
        for child in [
            "/api/v1/namespaces/ns/serviceaccounts/c-node",
            "/api/v1/namespaces/ns/services/c",
            STS_PATH,
        ] {
            assert!(applied.contains(&child), "{child} not in {applied:?}");
        }
        assert_eq!(w.ring(), None, "no ring before the pods report");
        assert_eq!(w.statefulset_replicas(), Some(3));
        assert_eq!(w.condition("Ready").map(|c| c.0).as_deref(), Some("False"));
    }
    // The pods start and report that they hold no ring.
    for n in 0..3 {
        h.run_pod(n);
        h.nodes.report(n, progress(&format!("c-{n}"), 0, None));
    }
    h.reconcile().await.expect("reconcile");
    let w = h.world();
    let ring = w.ring().expect("the first ring");
    assert_eq!(ring.epoch, 1);
    assert_eq!(
        ring.members
            .iter()
            .map(|m| (m.id.as_str(), m.state))
            .collect::<Vec<_>>(),
        [
            ("c-0", MemberState::Active),
            ("c-1", MemberState::Active),
            ("c-2", MemberState::Active)
        ]
    );
    assert!(
        w.position(Method::PATCH, RING_PATH) < w.position(Method::PATCH, STS_PATH),
        "the ring is written before the StatefulSet"
    );
    assert_eq!(w.cache["status"]["ringEpoch"], 1);
    assert_eq!(w.events(), ["RingCreated"]);
}

#[tokio::test]
async fn a_scale_up_grows_the_statefulset_then_adds_joining_members_then_activates_them() {
    let h = Harness::new(json!({"replicas": 3}), 3).await;
    h.steady(3, 5);
    h.set_replicas(4);
    h.reconcile().await.expect("reconcile");
    {
        let w = h.world();
        assert_eq!(w.statefulset_replicas(), Some(4), "grown first");
        assert_eq!(w.ring().unwrap().epoch, 5, "no member without an IP");
    }
    h.run_pod(3);
    h.nodes.report(3, progress("c-3", 0, None));
    h.reconcile().await.expect("reconcile");
    {
        let w = h.world();
        let ring = w.ring().unwrap();
        assert_eq!(ring.epoch, 6);
        assert_eq!(ring.members.len(), 4);
        assert_eq!(ring.members[3].state, MemberState::Joining);
        assert_eq!(w.cache["status"]["ringEpoch"], 6);
        assert_eq!(w.events(), ["MembersJoining"]);
    }
    // Until the joining node has pulled its data, nothing changes.
    h.reconcile().await.expect("reconcile");
    assert_eq!(h.world().ring().unwrap().epoch, 6);
    h.nodes_sync();
    h.reconcile().await.expect("reconcile");
    let w = h.world();
    let ring = w.ring().unwrap();
    assert_eq!(ring.epoch, 7);
    assert!(ring.members.iter().all(|m| m.state == MemberState::Active));
    assert_eq!(w.statefulset_replicas(), Some(4));
    assert_eq!(w.events(), ["MembersActive"]);
}

#[tokio::test]
async fn a_scale_down_marks_members_leaving_and_shrinks_only_after_their_handoff() {
    let h = Harness::new(json!({"replicas": 3}), 3).await;
    h.steady(3, 2);
    h.set_replicas(2);
    h.reconcile().await.expect("reconcile");
    {
        let w = h.world();
        let ring = w.ring().unwrap();
        assert_eq!(ring.epoch, 3);
        assert_eq!(ring.members[2].state, MemberState::Leaving);
        assert_eq!(w.statefulset_replicas(), Some(3), "a member's pod stays");
        assert_eq!(w.events(), ["MembersLeaving"]);
    }
    // Members synced, but the leaving one has not handed off yet.
    {
        let ring = h.world().ring().unwrap();
        for m in &ring.members {
            let n: i32 = m.id.trim_start_matches("c-").parse().unwrap();
            let mut p = progress(&m.id, ring.epoch, Some(m.state));
            p.handoff_complete = false;
            h.nodes.report(n, p);
        }
    }
    h.reconcile().await.expect("reconcile");
    assert_eq!(h.world().statefulset_replicas(), Some(3));
    assert_eq!(h.world().ring().unwrap().epoch, 3);
    h.nodes_sync();
    h.reconcile().await.expect("reconcile");
    {
        let w = h.world();
        let ring = w.ring().unwrap();
        assert_eq!(ring.epoch, 4);
        assert_eq!(
            ring.members
                .iter()
                .map(|m| m.id.as_str())
                .collect::<Vec<_>>(),
            ["c-0", "c-1"]
        );
        assert_eq!(w.statefulset_replicas(), Some(2));
        assert!(
            w.position(Method::PATCH, RING_PATH) < w.position(Method::PATCH, STS_PATH),
            "the member leaves the ring before its pod goes"
        );
        assert_eq!(w.events(), ["MembersRemoved"]);
    }
    // Its pod gone, the cache is steady at 2.
    h.remove_pod(2);
    h.nodes_sync();
    h.reconcile().await.expect("reconcile");
    let w = h.world();
    assert_eq!(w.ring().unwrap().epoch, 4);
    assert_eq!(w.cache["status"]["readyReplicas"], 2);
    assert_eq!(w.condition("Ready").map(|c| c.0).as_deref(), Some("True"));
}

#[tokio::test]
async fn an_invalid_spec_applies_nothing_and_says_why() {
    let h = Harness::new(json!({"replicas": 2, "defaultTTL": "soon"}), 2).await;
    h.steady(2, 4);
    h.reconcile()
        .await
        .expect("an invalid spec is not a reconcile error");
    let w = h.world();
    let writes: Vec<String> = w
        .writes()
        .iter()
        .map(|c| format!("{} {}", c.method, c.path))
        .collect();
    assert_eq!(writes, [format!("PATCH {STATUS_PATH}")], "only the status");
    let (status, reason) = w.condition("Degraded").expect("Degraded");
    assert_eq!((status.as_str(), reason.as_str()), ("True", "InvalidSpec"));
    assert_eq!(w.events(), ["InvalidSpec"]);
    // The running cache is still described.
    assert_eq!(w.cache["status"]["ringEpoch"], 4);
}

#[tokio::test]
async fn a_lost_ring_configmap_is_written_again_from_the_status_under_a_newer_epoch() {
    let h = Harness::new(json!({"replicas": 2}), 2).await;
    h.steady(2, 4);
    h.reconcile().await.expect("reconcile");
    assert_eq!(h.world().cache["status"]["ringEpoch"], 4);
    let before = h.world().ring().unwrap();
    h.world().objects.remove(RING_PATH);
    h.reconcile().await.expect("reconcile");
    let w = h.world();
    let after = w.ring().expect("the ring written again");
    assert!(
        after.epoch > before.epoch,
        "{} -> {}",
        before.epoch,
        after.epoch
    );
    let ids = |d: &MembershipDoc| {
        d.members
            .iter()
            .map(|m| (m.id.clone(), m.state))
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&after), ids(&before));
    assert_eq!(w.cache["status"]["ringEpoch"], after.epoch);
    assert_eq!(w.events(), ["RingRecovered"]);
}

#[tokio::test]
async fn the_status_is_written_once_per_change_and_a_refused_write_fails_the_reconcile() {
    let h = Harness::new(json!({"replicas": 2}), 2).await;
    h.steady(2, 4);
    h.reconcile().await.expect("reconcile");
    {
        let w = h.world();
        let status = &w.cache["status"];
        assert_eq!(status["observedGeneration"], 1);
        assert_eq!(status["replicas"], 2);
        assert_eq!(status["readyReplicas"], 2);
        assert_eq!(status["members"].as_array().map(Vec::len), Some(2));
        assert_eq!(
            w.condition("Ready"),
            Some(("True".to_string(), w.condition("Ready").unwrap().1))
        );
        assert_eq!(w.calls.iter().filter(|c| c.path == STATUS_PATH).count(), 1);
    }
    // Nothing changed: no status write.
    h.reconcile().await.expect("reconcile");
    assert_eq!(
        h.world().position(Method::PATCH, STATUS_PATH),
        None,
        "an unchanged status is not written again"
    );
    // A change the API server refuses to store fails the reconcile.
    h.nodes.report(0, {
        let mut p = progress("c-0", 4, Some(MemberState::Active));
        p.items = 99;
        p
    });
    h.world().refuse.push(STATUS_PATH.into());
    let err = h.reconcile().await.expect_err("a refused status write");
    assert!(err.to_string().contains("refused by the test"), "{err}");
}
