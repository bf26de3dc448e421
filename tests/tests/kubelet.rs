//! The test kubelet with the real StatefulSet controller and garbage
//! collector: pods become processes on their own loopback addresses, the
//! readiness probe gates Ready, scaling down and deletion stop processes,
//! crashes restart them, and graceful deletion runs preStop, SIGTERM and,
//! after the grace period, SIGKILL.
//!
//! The pods run `test-http-server` (this crate's tiny HTTP program).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use distrocache_tests::procs::{port_open, process_alive};
use distrocache_tests::{ControlPlane, Kubelet, KubeletConfig, Program, TestNamespace, wait};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);
const PORT: u16 = 8080;
const IMAGE: &str = "test-http-server";

/// The shared control plane and kubelet, with the test program registered,
/// and a fresh namespace.
async fn setup(
    prefix: &str,
) -> (
    &'static ControlPlane,
    &'static Kubelet,
    TestNamespace<'static>,
) {
    let cp = ControlPlane::shared()
        .await
        .expect("the shared control plane");
    let kubelet = Kubelet::shared().await.expect("the shared kubelet");
    kubelet.add_image(IMAGE, server_program());
    let ns = TestNamespace::create(cp, prefix)
        .await
        .expect("a namespace")
        .with_kubelet(kubelet);
    (cp, kubelet, ns)
}

/// The test program, told to listen on its pod's IP.
fn server_program() -> Program {
    Program::new(env!("CARGO_BIN_EXE_test-http-server")).env("TEST_HTTP_HOST", "{podIP}")
}

/// The pod template's one container: the test program on port 8080 (named
/// `http`), its name and IP from the downward API, a 1 s readiness probe.
fn container(args: &[&str]) -> serde_json::Value {
    json!({
        "name": "server",
        "image": format!("{IMAGE}:1"),
        "args": args,
        "ports": [{"name": "http", "containerPort": PORT}],
        "env": [
            {"name": "TEST_HTTP_PORT", "value": PORT.to_string()},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "GREETING", "value": "hello from $(POD_NAME)"},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "http"},
            "periodSeconds": 1,
            "failureThreshold": 1,
        },
    })
}

fn statefulset(
    name: &str,
    replicas: i32,
    policy: &str,
    container: serde_json::Value,
) -> StatefulSet {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "serviceName": name,
            "podManagementPolicy": policy,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"terminationGracePeriodSeconds": 5, "containers": [container]},
            },
        },
    }))
    .expect("a StatefulSet")
}

async fn create_statefulset(client: &Client, ns: &str, sts: &StatefulSet) -> Api<StatefulSet> {
    let api: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    api.create(&PostParams::default(), sts)
        .await
        .expect("create the StatefulSet");
    api
}

fn condition(pod: &Pod, type_: &str) -> Option<String> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.clone())
}

/// Running, its container running and ready, and the Ready condition True.
fn running_and_ready(pod: &Pod) -> bool {
    let Some(status) = pod.status.as_ref() else {
        return false;
    };
    let container = status.container_statuses.as_ref().and_then(|s| s.first());
    status.phase.as_deref() == Some("Running")
        && container
            .is_some_and(|c| c.ready && c.state.as_ref().is_some_and(|s| s.running.is_some()))
        && condition(pod, "Ready").as_deref() == Some("True")
}

fn pod_ip(pod: &Pod) -> Ipv4Addr {
    let ip: Ipv4Addr = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .expect("the pod has an IP")
        .parse()
        .expect("an IPv4 address");
    assert!(ip.is_loopback(), "pod IPs are loopback addresses, got {ip}");
    ip
}

fn name(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

/// Waits until exactly `count` pods match `app=<app>`, all running and ready.
async fn wait_ready_pods(pods: &Api<Pod>, app: &str, count: usize) -> Vec<Pod> {
    let params = ListParams::default().labels(&format!("app={app}"));
    let mut ready = wait::until(&format!("{count} ready pods of {app}"), TIMEOUT, || async {
        let list = pods.list(&params).await?.items;
        let all_ready = list.len() == count && list.iter().all(running_and_ready);
        Ok(all_ready.then_some(list))
    })
    .await
    .expect("the pods become ready");
    ready.sort_by_key(name);
    ready
}

/// GET http://ip:port/path from the test, answering (status, body).
async fn http_get(ip: Ipv4Addr, path: &str) -> anyhow::Result<(u16, String)> {
    assert!(
        ip.is_loopback(),
        "the tests only contact loopback addresses"
    );
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()?;
    let response = client
        .get(format!("http://{ip}:{PORT}{path}"))
        .send()
        .await?;
    let status = response.status().as_u16();
    Ok((status, response.text().await?))
}

fn addr(ip: Ipv4Addr) -> SocketAddr {
    SocketAddr::from((ip, PORT))
}

async fn wait_gone(pods: &Api<Pod>, names: &[String]) {
    wait::until(
        &format!("pods {names:?} to be deleted"),
        TIMEOUT,
        || async {
            for name in names {
                if pods.get_opt(name).await?.is_some() {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
    .await
    .expect("the pods are deleted");
}

#[tokio::test]
async fn a_statefulset_runs_ready_processes_and_scaling_down_stops_them() {
    let (_cp, kubelet, ns) = setup("sts").await;
    let client = ns.client().await.expect("a client");
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    let sts = statefulset("web", 3, "OrderedReady", container(&[]));
    let statefulsets = create_statefulset(&client, ns.name(), &sts).await;

    let ready = wait_ready_pods(&pods, "web", 3).await;
    assert_eq!(
        ready.iter().map(name).collect::<Vec<_>>(),
        ["web-0", "web-1", "web-2"]
    );
    let mut ips = Vec::new();
    let mut pids = Vec::new();
    for pod in &ready {
        let pod_name = name(pod);
        let ip = pod_ip(pod);
        assert_eq!(
            pod.spec.as_ref().and_then(|s| s.node_name.as_deref()),
            Some(kubelet.node_name())
        );
        let process = kubelet
            .pod(ns.name(), &pod_name)
            .expect("the kubelet runs the pod");
        assert_eq!(process.ip, ip);
        let pid = process.pid.expect("a running process");
        assert!(process_alive(pid));
        // The program really runs with the pod's environment, on the pod's IP.
        assert_eq!(
            http_get(ip, "/healthz").await.expect("GET /healthz"),
            (200, "ok".into())
        );
        assert_eq!(
            http_get(ip, "/env/POD_NAME").await.expect("GET"),
            (200, pod_name.clone())
        );
        assert_eq!(
            http_get(ip, "/env/POD_IP").await.expect("GET"),
            (200, ip.to_string())
        );
        assert_eq!(
            http_get(ip, "/env/GREETING").await.expect("GET"),
            (200, format!("hello from {pod_name}"))
        );
        assert_eq!(
            http_get(ip, "/pid").await.expect("GET"),
            (200, pid.to_string())
        );
        ips.push(ip);
        pids.push(pid);
    }
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 3, "every pod has its own IP");

    wait::until(
        "the StatefulSet to count 3 ready replicas",
        TIMEOUT,
        || async {
            let sts = statefulsets.get_status("web").await?;
            Ok((sts.status.and_then(|s| s.ready_replicas) == Some(3)).then_some(()))
        },
    )
    .await
    .expect("the StatefulSet controller sees the pods ready");

    statefulsets
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 1}})),
        )
        .await
        .expect("scale to 1");
    wait_gone(&pods, &["web-1".into(), "web-2".into()]).await;
    for (i, pid) in pids.iter().enumerate().skip(1) {
        let ip = pod_ip(&ready[i]);
        assert!(
            !process_alive(*pid),
            "web-{i}'s process (pid {pid}) is stopped"
        );
        assert!(
            !port_open(addr(ip)),
            "web-{i}'s port {} is closed",
            addr(ip)
        );
        assert!(kubelet.pod(ns.name(), &format!("web-{i}")).is_none());
    }
    let remaining = wait_ready_pods(&pods, "web", 1).await;
    assert_eq!(
        remaining[0].metadata.uid, ready[0].metadata.uid,
        "web-0 was left alone"
    );
    assert!(process_alive(pids[0]));
    let log = std::fs::read_to_string(kubelet.pod_log_path(ns.name(), "web-0").expect("a log"))
        .expect("read web-0's log");
    assert!(
        log.contains(&format!("listening on {}", addr(pod_ip(&ready[0])))),
        "{log}"
    );
}

#[tokio::test]
async fn the_readiness_probe_gates_ready_and_the_statefulset_rollout() {
    let (_cp, kubelet, ns) = setup("gated").await;
    let client = ns.client().await.expect("a client");
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    let files = tempfile::tempdir().expect("a temporary directory");
    let ready_file = files.path().join("ready");
    let ready_arg = ready_file.to_str().expect("a UTF-8 path");
    let sts = statefulset(
        "gated",
        2,
        "OrderedReady",
        container(&["--ready-file", ready_arg]),
    );
    let statefulsets = create_statefulset(&client, ns.name(), &sts).await;

    let pod = wait::until("gated-0 to run", TIMEOUT, || async {
        let pod = pods.get_opt("gated-0").await?;
        Ok(pod.filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")))
    })
    .await
    .expect("gated-0 runs");
    let ip = pod_ip(&pod);
    wait::until("gated-0 to serve", TIMEOUT, || async {
        // An error is "not yet", kept as the last observation for the report.
        http_get(ip, "/healthz").await.map(|_| Some(()))
    })
    .await
    .expect("the program serves");

    // Several probe periods (1 s) while the program says it is not ready.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let pod = pods.get("gated-0").await.expect("get gated-0");
        assert_eq!(
            condition(&pod, "Ready").as_deref(),
            Some("False"),
            "not ready yet"
        );
        assert_eq!(condition(&pod, "ContainersReady").as_deref(), Some("False"));
        let status = &pod
            .status
            .as_ref()
            .expect("a status")
            .container_statuses
            .as_ref()
            .expect("statuses")[0];
        assert!(!status.ready);
        assert!(
            status
                .state
                .as_ref()
                .and_then(|s| s.running.as_ref())
                .is_some(),
            "it runs"
        );
        assert_eq!(http_get(ip, "/readyz").await.expect("GET /readyz").0, 503);
        // OrderedReady: the controller must not create gated-1 before gated-0 is Ready.
        assert!(
            pods.get_opt("gated-1").await.expect("get").is_none(),
            "gated-1 waits for gated-0"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let sts = statefulsets
        .get_status("gated")
        .await
        .expect("get the StatefulSet");
    assert_eq!(sts.status.and_then(|s| s.ready_replicas).unwrap_or(0), 0);

    std::fs::write(&ready_file, "").expect("create the ready file");
    let ready = wait_ready_pods(&pods, "gated", 2).await;
    assert_eq!(
        ready.iter().map(name).collect::<Vec<_>>(),
        ["gated-0", "gated-1"]
    );
    let log = std::fs::read_to_string(kubelet.pod_log_path(ns.name(), "gated-0").expect("a log"))
        .expect("read the log");
    assert!(
        log.contains("readiness probe failed"),
        "the failed probes are in the pod log: {log}"
    );
}

#[tokio::test]
async fn a_crashed_process_is_restarted_in_the_same_pod() {
    let (_cp, kubelet, ns) = setup("crash").await;
    let client = ns.client().await.expect("a client");
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    let sts = statefulset("crashy", 1, "Parallel", container(&[]));
    create_statefulset(&client, ns.name(), &sts).await;
    let before = wait_ready_pods(&pods, "crashy", 1).await.remove(0);
    let ip = pod_ip(&before);
    let old_pid = kubelet
        .pod_pid(ns.name(), "crashy-0")
        .expect("a running process");

    let killed = kubelet
        .crash(ns.name(), "crashy-0")
        .await
        .expect("crash the pod");
    assert_eq!(killed, old_pid);

    let after = wait::until("crashy-0 to be restarted and ready", TIMEOUT, || async {
        let pod = pods.get("crashy-0").await?;
        let restarts = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|s| s.first())
            .map(|c| c.restart_count);
        Ok((restarts == Some(1) && running_and_ready(&pod)).then_some(pod))
    })
    .await
    .expect("the process comes back");
    assert_eq!(
        after.metadata.uid, before.metadata.uid,
        "the same pod, not a replacement"
    );
    assert_eq!(
        pod_ip(&after),
        ip,
        "a restarted container keeps its pod's IP"
    );
    let status = &after
        .status
        .as_ref()
        .expect("a status")
        .container_statuses
        .as_ref()
        .expect("statuses")[0];
    let last = status
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .expect("the crash is the last state");
    assert_eq!(last.exit_code, 137, "SIGKILL is exit code 128 + 9");
    assert_eq!(last.reason.as_deref(), Some("Error"));

    let new_pid = kubelet
        .pod_pid(ns.name(), "crashy-0")
        .expect("a new process");
    assert_ne!(new_pid, old_pid);
    assert!(!process_alive(old_pid), "the crashed process is gone");
    assert_eq!(
        http_get(ip, "/pid").await.expect("GET /pid"),
        (200, new_pid.to_string())
    );
}

#[tokio::test]
async fn deleting_a_statefulset_garbage_collects_its_pods_gracefully() {
    let (_cp, kubelet, ns) = setup("gc").await;
    let client = ns.client().await.expect("a client");
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    let mut server = container(&[]);
    server["lifecycle"] = json!({"preStop": {"httpGet": {"path": "/prestop", "port": "http"}}});
    let sts = statefulset("doomed", 2, "Parallel", server);
    let statefulsets = create_statefulset(&client, ns.name(), &sts).await;
    let ready = wait_ready_pods(&pods, "doomed", 2).await;
    let mut processes = Vec::new();
    for pod in &ready {
        let process = kubelet
            .pod(ns.name(), &name(pod))
            .expect("the kubelet runs the pod");
        processes.push((
            name(pod),
            process.pid.expect("a pid"),
            process.ip,
            process.log_path,
        ));
    }

    statefulsets
        .delete("doomed", &DeleteParams::background())
        .await
        .expect("delete the StatefulSet");
    wait_gone(
        &pods,
        &processes.iter().map(|p| p.0.clone()).collect::<Vec<_>>(),
    )
    .await;
    for (pod, pid, ip, log) in processes {
        assert!(
            !process_alive(pid),
            "{pod}'s process (pid {pid}) is stopped"
        );
        assert!(!port_open(addr(ip)), "{pod}'s port is closed");
        let log = std::fs::read_to_string(&log).expect("read the pod log");
        let hook = log
            .find("prestop hook called")
            .expect("the preStop hook ran");
        let term = log
            .find("received SIGTERM, exiting")
            .expect("the program got SIGTERM");
        assert!(hook < term, "preStop runs before SIGTERM: {log}");
    }
}

#[tokio::test]
async fn a_process_ignoring_sigterm_is_killed_after_the_grace_period() {
    let (_cp, kubelet, ns) = setup("grace").await;
    let pods: Api<Pod> = Api::namespaced(ns.client().await.expect("a client"), ns.name());
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "stubborn", "labels": {"app": "stubborn"}},
        "spec": {"terminationGracePeriodSeconds": 2, "containers": [container(&["--ignore-sigterm"])]},
    }))
    .expect("a Pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create the pod");
    wait_ready_pods(&pods, "stubborn", 1).await;
    let process = kubelet
        .pod(ns.name(), "stubborn")
        .expect("the kubelet runs the pod");
    let pid = process.pid.expect("a pid");

    let deleted = Instant::now();
    pods.delete("stubborn", &DeleteParams::default())
        .await
        .expect("delete the pod");
    wait_gone(&pods, &["stubborn".into()]).await;
    let took = deleted.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "the grace period is honoured (took {took:?})"
    );
    assert!(
        took < Duration::from_secs(15),
        "SIGKILL ends it soon after (took {took:?})"
    );
    assert!(!process_alive(pid));
    let log = std::fs::read_to_string(&process.log_path).expect("read the pod log");
    assert!(log.contains("received SIGTERM, ignoring it"), "{log}");
    assert!(log.contains("grace period over: sending SIGKILL"), "{log}");
}

#[tokio::test]
async fn an_image_missing_from_the_table_waits_with_err_image_never_pull() {
    let (_cp, _kubelet, ns) = setup("noimage").await;
    let pods: Api<Pod> = Api::namespaced(ns.client().await.expect("a client"), ns.name());
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "unknown"},
        "spec": {"containers": [{"name": "main", "image": "not-in-the-table:1"}]},
    }))
    .expect("a Pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create the pod");
    let pod = wait::until("the pod to report ErrImageNeverPull", TIMEOUT, || async {
        let pod = pods.get("unknown").await?;
        let reason = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|s| s.first())
            .and_then(|c| c.state.as_ref()?.waiting.as_ref()?.reason.clone());
        Ok((reason.as_deref() == Some("ErrImageNeverPull")).then_some(pod))
    })
    .await
    .expect("a clear waiting reason");
    let status = pod.status.expect("a status");
    assert_eq!(status.phase.as_deref(), Some("Pending"));
    let waiting = status.container_statuses.expect("statuses")[0]
        .state
        .clone()
        .and_then(|s| s.waiting)
        .expect("waiting");
    assert!(
        waiting
            .message
            .unwrap_or_default()
            .contains("not-in-the-table:1")
    );

    pods.delete("unknown", &DeleteParams::default())
        .await
        .expect("delete the pod");
    wait_gone(&pods, &["unknown".into()]).await;
}

#[tokio::test]
async fn pods_get_secrets_config_maps_and_a_service_account_kubeconfig() {
    let (cp, kubelet, ns) = setup("env").await;
    let client = ns.client().await.expect("a client");
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "creds"},
        "stringData": {"password": "s3cret"},
    }))
    .expect("a Secret");
    Api::<Secret>::namespaced(client.clone(), ns.name())
        .create(&PostParams::default(), &secret)
        .await
        .expect("create the Secret");
    let map: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "settings"},
        "data": {"mode": "fast", "LEVEL": "3"},
    }))
    .expect("a ConfigMap");
    Api::<ConfigMap>::namespaced(client.clone(), ns.name())
        .create(&PostParams::default(), &map)
        .await
        .expect("create the ConfigMap");

    let mut server = container(&[]);
    // command[0] names a file in the image, which the table replaces; the
    // rest of command, then args, are the arguments, with $(VAR) expanded.
    server["command"] = json!(["/usr/local/bin/server", "--listen"]);
    server["args"] = json!(["$(POD_IP):8080"]);
    let env = server["env"].as_array_mut().expect("env");
    // Would make the program listen elsewhere if the arguments were lost.
    env.push(json!({"name": "TEST_HTTP_PORT", "value": "9"}));
    env.push(json!({"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}}));
    env.push(json!({"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}}));
    env.push(json!({"name": "NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}));
    server["envFrom"] = json!([{"configMapRef": {"name": "settings"}, "prefix": "CFG_"}]);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "configured", "labels": {"app": "configured"}},
        "spec": {"containers": [server]},
    }))
    .expect("a Pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create the pod");
    let ip = pod_ip(&wait_ready_pods(&pods, "configured", 1).await[0]);

    for (var, value) in [
        ("PASSWORD", "s3cret"),
        ("MODE", "fast"),
        ("NAMESPACE", ns.name()),
        ("CFG_LEVEL", "3"),
        ("CFG_mode", "fast"),
    ] {
        assert_eq!(
            http_get(ip, &format!("/env/{var}")).await.expect("GET"),
            (200, value.to_string()),
            "{var}"
        );
    }

    // The pod's kubeconfig carries a token of its service account, bound to the pod.
    let (status, kubeconfig) = http_get(ip, "/env/KUBECONFIG").await.expect("GET");
    assert_eq!(status, 200);
    let output = cp
        .kubectl([
            "auth",
            "whoami",
            "-o",
            "json",
            &format!("--kubeconfig={kubeconfig}"),
        ])
        .expect("run kubectl");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let whoami: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(
        whoami["status"]["userInfo"]["username"],
        format!("system:serviceaccount:{}:default", ns.name())
    );
    let process = kubelet
        .pod(ns.name(), "configured")
        .expect("the kubelet runs the pod");
    assert!(process.pid.is_some());
    let log = std::fs::read_to_string(&process.log_path).expect("read the pod log");
    assert!(log.contains(&format!("listening on {ip}:{PORT}")), "{log}");
}

#[tokio::test]
async fn a_mounted_secret_follows_its_updates_while_the_process_runs() {
    let (_cp, kubelet, ns) = setup("secret-sync").await;
    let client = ns.client().await.expect("a client");
    let secrets = Api::<Secret>::namespaced(client.clone(), ns.name());
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "rotating"},
        "stringData": {"token": "first"},
    }))
    .expect("a Secret");
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .expect("create the Secret");
    let mut server = container(&[]);
    server["volumeMounts"] =
        json!([{"name": "creds", "mountPath": "/etc/creds", "readOnly": true}]);
    server["env"]
        .as_array_mut()
        .expect("env")
        .push(json!({"name": "TOKEN_FILE", "value": "/etc/creds/token"}));
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "mounted", "labels": {"app": "mounted"}},
        "spec": {
            "containers": [server],
            "volumes": [{"name": "creds", "secret": {"secretName": "rotating"}}],
        },
    }))
    .expect("a Pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create the pod");
    let ip = pod_ip(&wait_ready_pods(&pods, "mounted", 1).await[0]);
    // The mount path is rewritten to where the kubelet wrote the volume.
    let (status, file) = http_get(ip, "/env/TOKEN_FILE").await.expect("GET");
    assert_eq!(status, 200);
    assert_ne!(file, "/etc/creds/token");
    assert_eq!(
        std::fs::read_to_string(&file).expect("the token file"),
        "first"
    );
    let pid = kubelet.pod(ns.name(), "mounted").expect("the pod").pid;

    secrets
        .patch(
            "rotating",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"token": "second"}})),
        )
        .await
        .expect("update the Secret");
    wait::until("the file follows the Secret", TIMEOUT, || {
        let file = file.clone();
        async move { Ok((std::fs::read_to_string(&file)? == "second").then_some(())) }
    })
    .await
    .expect("the update reaches the file");
    // Without a restart.
    assert_eq!(kubelet.pod(ns.name(), "mounted").expect("the pod").pid, pid);
}

#[tokio::test]
async fn a_failing_liveness_probe_restarts_the_process() {
    let (_cp, kubelet, ns) = setup("liveness").await;
    let pods: Api<Pod> = Api::namespaced(ns.client().await.expect("a client"), ns.name());
    let files = tempfile::tempdir().expect("a temporary directory");
    let alive_file = files.path().join("alive");
    let mut server = container(&["--ready-file", alive_file.to_str().expect("a UTF-8 path")]);
    server["livenessProbe"] = json!({
        "httpGet": {"path": "/livez", "port": "http"},
        "periodSeconds": 1,
        "failureThreshold": 2,
        "terminationGracePeriodSeconds": 1,
    });
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "unhealthy", "labels": {"app": "unhealthy"}},
        "spec": {"containers": [server]},
    }))
    .expect("a Pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create the pod");

    let restarted = wait::until("a liveness restart", TIMEOUT, || async {
        let pod = pods.get("unhealthy").await?;
        let status = pod
            .status
            .and_then(|s| s.container_statuses)
            .and_then(|s| s.into_iter().next());
        Ok(status.filter(|s| s.restart_count >= 1))
    })
    .await
    .expect("the failing liveness probe restarts the container");
    let last = restarted
        .last_state
        .and_then(|s| s.terminated)
        .expect("the killed container is the last state");
    assert_eq!(last.exit_code, 0, "SIGTERM made the program exit cleanly");
    let process = kubelet
        .pod(ns.name(), "unhealthy")
        .expect("the kubelet runs the pod");
    let log = std::fs::read_to_string(&process.log_path).expect("read the pod log");
    assert!(log.contains("liveness probe failed"), "{log}");
    assert!(log.contains("received SIGTERM, exiting"), "{log}");

    // Once the probe passes, the container is left alone.
    std::fs::write(&alive_file, "").expect("create the file");
    let pod = wait_ready_pods(&pods, "unhealthy", 1).await.remove(0);
    let restarts = |pod: &Pod| {
        pod.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .map(|s| s[0].restart_count)
    };
    let count = restarts(&pod);
    let pid = kubelet.pod_pid(ns.name(), "unhealthy").expect("a process");
    // Counted in probes, not seconds: more passing liveness probes than the
    // failure threshold, plus one (a wrong kill after a pass would land
    // before the next probe, which then goes to a new process).
    let passed = |log: &str| log.lines().filter(|l| l.ends_with("livez 200")).count();
    wait::until("4 passing liveness probes", TIMEOUT, || async {
        let log = std::fs::read_to_string(&process.log_path)?;
        Ok((passed(&log) >= 4).then_some(()))
    })
    .await
    .expect("the liveness probe keeps passing");
    let pod = pods.get("unhealthy").await.expect("get the pod");
    assert_eq!(
        restarts(&pod),
        count,
        "a passing liveness probe restarts nothing"
    );
    assert_eq!(
        kubelet.pod_pid(ns.name(), "unhealthy"),
        Some(pid),
        "the same process still runs"
    );
    assert!(running_and_ready(&pod));
}

#[tokio::test]
async fn an_owned_kubelet_kills_its_processes_when_dropped() {
    let (cp, _shared, ns) = setup("owned").await;
    // A second kubelet on the shared control plane must not schedule: it
    // runs only the pods that name its node.
    let mut config = KubeletConfig::for_control_plane(cp);
    config.node_name = "owned-kubelet".into();
    config.bind_pending_pods = false;
    let kubelet = Kubelet::start_with(config).await.expect("start a kubelet");
    kubelet.add_image(IMAGE, server_program());
    let pods: Api<Pod> = Api::namespaced(ns.client().await.expect("a client"), ns.name());
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "owned", "labels": {"app": "owned"}},
        "spec": {"nodeName": "owned-kubelet", "containers": [container(&[])]},
    }))
    .expect("a Pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create the pod");
    let ip = pod_ip(&wait_ready_pods(&pods, "owned", 1).await[0]);
    let pid = kubelet.pod_pid(ns.name(), "owned").expect("a process");
    assert!(process_alive(pid));

    drop(kubelet);
    assert!(
        !process_alive(pid),
        "dropping the kubelet killed the pod's process"
    );
    assert!(!port_open(addr(ip)));
}
