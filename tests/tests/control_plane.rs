//! The shared test control plane: the tools (kubectl, helm) work against it at
//! the expected versions, CRDs and custom resources apply and are validated,
//! and invalid objects are rejected by the API server.

use std::time::Duration;

use distrocache_tests::binaries::{HELM_VERSION, K8S_VERSION};
use distrocache_tests::{ControlPlane, TestNamespace, wait};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::PostParams;

const TIMEOUT: Duration = Duration::from_secs(60);

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs kubectl and insists that it succeeds, returning its stdout.
fn kubectl_ok(cp: &ControlPlane, args: &[&str]) -> String {
    let output = cp.kubectl(args).expect("run kubectl");
    assert!(
        output.status.success(),
        "kubectl {args:?} failed: {}",
        stderr(&output)
    );
    stdout(&output)
}

#[tokio::test]
async fn kubectl_and_the_api_server_report_the_built_version() {
    let cp = ControlPlane::shared()
        .await
        .expect("the shared control plane");
    let _logs = cp.logs_on_panic();

    let client: serde_json::Value =
        serde_json::from_str(&kubectl_ok(cp, &["version", "--client", "-o", "json"]))
            .expect("kubectl version prints JSON");
    assert_eq!(client["clientVersion"]["gitVersion"], K8S_VERSION);

    let both: serde_json::Value = serde_json::from_str(&kubectl_ok(cp, &["version", "-o", "json"]))
        .expect("kubectl version prints JSON");
    assert_eq!(both["clientVersion"]["gitVersion"], K8S_VERSION);
    assert_eq!(both["serverVersion"]["gitVersion"], K8S_VERSION);
}

const WIDGET_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.tests.distrocache.io
spec:
  group: tests.distrocache.io
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [size]
            properties:
              size: {type: integer, minimum: 1}
              color: {type: string, enum: [red, green]}
"#;

#[tokio::test]
async fn a_crd_applies_becomes_established_and_validates_its_resources() {
    let cp = ControlPlane::shared()
        .await
        .expect("the shared control plane");
    let ns = TestNamespace::create(cp, "crd").await.expect("a namespace");
    let client = ns.client().await.expect("a client");

    let output = cp
        .kubectl_with_stdin(["apply", "-f", "-"], WIDGET_CRD)
        .expect("run kubectl apply");
    assert!(
        output.status.success(),
        "apply the CRD: {}",
        stderr(&output)
    );

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    wait::until("the Widget CRD to be Established", TIMEOUT, || async {
        let crd = crds.get("widgets.tests.distrocache.io").await?;
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        Ok(established.then_some(()))
    })
    .await
    .expect("the CRD becomes Established");

    let widget = r#"
apiVersion: tests.distrocache.io/v1
kind: Widget
metadata: {name: small}
spec: {size: 3, color: green}
"#;
    let output = cp
        .kubectl_with_stdin(["apply", "-n", ns.name(), "-f", "-"], widget)
        .expect("run kubectl apply");
    assert!(
        output.status.success(),
        "apply a Widget: {}",
        stderr(&output)
    );
    let stored: serde_json::Value = serde_json::from_str(&kubectl_ok(
        cp,
        &["get", "widget", "small", "-n", ns.name(), "-o", "json"],
    ))
    .expect("kubectl get prints JSON");
    assert_eq!(stored["spec"]["size"], 3);
    assert_eq!(stored["spec"]["color"], "green");

    // Each violates the schema; the API server must refuse it and say why.
    let invalid = [
        ("size: 0", "spec.size", "greater than or equal to 1"),
        ("size: 2, color: blue", "spec.color", "Unsupported value"),
        ("color: red", "spec.size", "Required value"),
    ];
    for (spec, field, reason) in invalid {
        let widget = format!(
            "apiVersion: tests.distrocache.io/v1\nkind: Widget\nmetadata: {{name: bad}}\nspec: {{{spec}}}\n"
        );
        let output = cp
            .kubectl_with_stdin(["apply", "-n", ns.name(), "-f", "-"], &widget)
            .expect("run kubectl apply");
        let err = stderr(&output);
        assert!(
            !output.status.success(),
            "a Widget with {spec} must be rejected"
        );
        assert!(
            err.contains("is invalid") && err.contains(field) && err.contains(reason),
            "the rejection of {spec} should name {field} and say {reason:?}: {err}"
        );
    }
    let output = cp
        .kubectl(["get", "widget", "bad", "-n", ns.name()])
        .expect("run kubectl get");
    assert!(!output.status.success(), "no invalid Widget was stored");
}

#[tokio::test]
async fn the_api_server_rejects_a_pod_without_containers() {
    let cp = ControlPlane::shared()
        .await
        .expect("the shared control plane");
    let ns = TestNamespace::create(cp, "invalid")
        .await
        .expect("a namespace");
    let pods: Api<Pod> = Api::namespaced(ns.client().await.expect("a client"), ns.name());
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "empty"},
        "spec": {"containers": []},
    }))
    .expect("a Pod");
    let error = pods
        .create(&PostParams::default(), &pod)
        .await
        .expect_err("a pod without containers is invalid");
    match error {
        kube::Error::Api(status) => {
            assert_eq!(status.code, 422, "{status:?}");
            assert_eq!(status.reason, "Invalid", "{status:?}");
            assert!(
                status.message.contains("spec.containers: Required value"),
                "{status:?}"
            );
        }
        other => panic!("expected a 422 from the API server, got {other}"),
    }
    assert!(pods.get_opt("empty").await.expect("get").is_none());
}

/// Writes a one-template chart into a new temporary directory.
fn write_chart() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let chart = dir.path().join("greeter");
    std::fs::create_dir_all(chart.join("templates")).expect("create the chart");
    std::fs::write(
        chart.join("Chart.yaml"),
        "apiVersion: v2\nname: greeter\nversion: 0.1.0\n",
    )
    .expect("write Chart.yaml");
    std::fs::write(chart.join("values.yaml"), "greeting: hello\n").expect("write values.yaml");
    std::fs::write(
        chart.join("templates/configmap.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-greeter\n\
         data:\n  greeting: {{ .Values.greeting | quote }}\n",
    )
    .expect("write the template");
    dir
}

#[tokio::test]
async fn helm_renders_and_installs_a_chart() {
    let cp = ControlPlane::shared()
        .await
        .expect("the shared control plane");
    let ns = TestNamespace::create(cp, "helm")
        .await
        .expect("a namespace");

    let output = cp
        .helm(["version", "--template", "{{.Version}}"])
        .expect("run helm version");
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output).trim(), HELM_VERSION);

    let charts = write_chart();
    let chart = charts.path().join("greeter");
    let chart = chart.to_str().expect("a UTF-8 path");
    let output = cp
        .helm(["template", "demo", chart, "--set", "greeting=hi"])
        .expect("run helm template");
    assert!(output.status.success(), "{}", stderr(&output));
    let rendered = stdout(&output);
    for line in ["kind: ConfigMap", "name: demo-greeter", "greeting: \"hi\""] {
        assert!(
            rendered.lines().any(|l| l.trim() == line),
            "{line:?} missing in:\n{rendered}"
        );
    }

    // The rendered object is valid for the API server, and helm itself can
    // install the chart through the kubeconfig.
    let output = cp
        .kubectl_with_stdin(["apply", "-n", ns.name(), "-f", "-"], &rendered)
        .expect("run kubectl apply");
    assert!(output.status.success(), "{}", stderr(&output));
    let output = cp
        .helm([
            "install",
            "installed",
            chart,
            "-n",
            ns.name(),
            "--set",
            "greeting=hey",
        ])
        .expect("run helm install");
    assert!(output.status.success(), "{}", stderr(&output));

    let maps: Api<ConfigMap> = Api::namespaced(ns.client().await.expect("a client"), ns.name());
    for (name, greeting) in [("demo-greeter", "hi"), ("installed-greeter", "hey")] {
        let map = maps.get(name).await.expect("the ConfigMap exists");
        let data = map.data.unwrap_or_default();
        assert_eq!(data.get("greeting").map(String::as_str), Some(greeting));
    }
    let output = cp
        .helm(["list", "-n", ns.name(), "-o", "json"])
        .expect("run helm list");
    let releases: serde_json::Value =
        serde_json::from_str(&stdout(&output)).expect("helm list prints JSON");
    assert_eq!(releases[0]["name"], "installed");
    assert_eq!(releases[0]["status"], "deployed");
}
