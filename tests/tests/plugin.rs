//! The kubectl plugin (issue 16) on the real control plane: the workspace's
//! `distrocache` binary linked as `kubectl-distrocache`, run by itself with
//! KUBECONFIG and through the built kubectl with the link's directory on
//! PATH (as users type it), against a cache the operator runs.
//!
//! What this control plane cannot do: proxy to the nodes. Its pods are
//! processes on loopback IPs (127.0.x.y), and kube-apiserver refuses both
//! ways to them: the pods' proxy answers "address not allowed" to an IP
//! that is not global unicast, and the Services' proxy reads the Service's
//! Endpoints object, which does not exist here (the endpoints controller
//! does not run) and could not hold the pods' addresses anyway (Endpoints
//! validation refuses loopback addresses). So here the
//! plugin's node requests reach the Service's proxy, pass RBAC and get the
//! API server's 404, and these tests check that the plugin reports that in
//! one clear line; the round trips through a proxy to a real node are
//! `cli/tests/plugin.rs` (a stand-in API server in front of a real node).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result};
use distrocache_operator::crd::DistroCache;
use distrocache_tests::distrocache::{self, apply_cache, installed, wait_ready};
use distrocache_tests::{ControlPlane, TestNamespace, procs};
use kube::Api;
use serde_json::{Value, json};

const READY: Duration = Duration::from_secs(120);
/// One plugin run (a few requests to the API server).
const RUN: Duration = Duration::from_secs(60);

/// The plugin installed as the README says: the `distrocache` binary
/// linked as `kubectl-distrocache` in a directory of its own.
struct Plugin {
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    kubectl: PathBuf,
}

impl Plugin {
    fn install(cp: &ControlPlane) -> Result<Plugin> {
        let dir = tempfile::tempdir()?;
        let binary = distrocache::workspace_bin("distrocache")?;
        std::os::unix::fs::symlink(&binary, dir.path().join("kubectl-distrocache"))
            .context("link kubectl-distrocache")?;
        Ok(Plugin {
            dir,
            kubeconfig: cp.kubeconfig().to_path_buf(),
            kubectl: cp.binaries().kubectl.clone(),
        })
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("kubectl-distrocache")
    }

    /// `kubectl-distrocache ARGS` with KUBECONFIG set.
    fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<Output> {
        self.run_with(&self.kubeconfig, args, stdin)
    }

    fn run_with(&self, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Result<Output> {
        let mut cmd = Command::new(self.path());
        cmd.args(args).env("KUBECONFIG", kubeconfig);
        procs::run_with_timeout(cmd, stdin, RUN)
    }

    /// `kubectl distrocache ARGS`: kubectl finds the plugin on PATH.
    fn kubectl(&self, args: &[&str]) -> Result<Output> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![self.dir.path().to_path_buf()];
        dirs.extend(std::env::split_paths(&path));
        let mut cmd = Command::new(&self.kubectl);
        cmd.arg("distrocache")
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("PATH", std::env::join_paths(dirs)?);
        procs::run_with_timeout(cmd, None, RUN)
    }
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// The run succeeded; its stdout.
fn ok(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what}: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// The run failed with exit status 1 and one line on stderr; that line.
fn failed(what: &str, out: Output) -> String {
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: {:?}\nstdout: {}\nstderr: {stderr}",
        out.status,
        text(&out.stdout)
    );
    assert!(out.stdout.is_empty(), "{what}: {}", text(&out.stdout));
    let line = stderr.trim_end();
    assert!(
        line.starts_with("error: ") && !line.contains('\n'),
        "{what}: not one error line: {stderr:?}"
    );
    line.to_owned()
}

fn json_of(what: &str, out: Output) -> Value {
    let stdout = ok(what, out);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{what}: {e}: {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_distrocache_shows_the_status_and_reports_failures_in_one_line() -> Result<()> {
    let (cp, kubelet) = installed().await?;
    let ns = TestNamespace::create(cp, "plugin")
        .await?
        .with_kubelet(kubelet);
    let n = ns.name();
    apply_cache(
        cp,
        n,
        "shop",
        "  replicas: 2\n  replicationFactor: 2\n  podDisruptionBudget:\n    enabled: false\n",
    )?;
    let client = ns.client().await?;
    wait_ready(&client, n, "shop", 2, READY).await?;
    let dc = Api::<DistroCache>::namespaced(client.clone(), n)
        .get("shop")
        .await?;
    let epoch = dc.status.as_ref().map(|s| s.ring_epoch).unwrap_or(0);
    assert!(epoch > 0, "a Ready cache of two has a ring");

    // The premise of the module comment: the client Service has no
    // Endpoints object, and none can hold its pods' loopback IPs.
    let out = cp.kubectl(["get", "endpoints", "shop", "-n", n])?;
    assert!(
        !out.status.success() && text(&out.stderr).contains("NotFound"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let pod_ip = &dc.status.as_ref().unwrap().members[0].address;
    let pod_ip = pod_ip
        .rsplit_once(':')
        .map_or(pod_ip.as_str(), |(ip, _)| ip);
    let endpoints = format!(
        "apiVersion: v1\nkind: Endpoints\nmetadata:\n  name: shop\n  namespace: {n}\n\
         subsets:\n- addresses:\n  - ip: {pod_ip}\n  ports:\n  - name: http\n    port: 8080\n"
    );
    let out = cp.kubectl_with_stdin(["apply", "-f", "-"], &endpoints)?;
    assert!(
        !out.status.success() && text(&out.stderr).contains("may not be in the loopback range"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    let plugin = Plugin::install(cp)?;

    // As users type it: kubectl finds the plugin on PATH. The resource's
    // status is printed; the nodes' part says why it is missing.
    let out = plugin.kubectl(&["status", "shop", "-n", n])?;
    let warning = text(&out.stderr);
    let table = ok("kubectl distrocache status", out);
    eprintln!("kubectl distrocache status shop:\n{table}");
    assert!(
        table.contains(&format!("ring epoch {epoch}")),
        "no ring epoch {epoch}:\n{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("Ready") && l.contains("True")),
        "no Ready True condition:\n{table}"
    );
    for pod in ["shop-0", "shop-1"] {
        assert!(
            table
                .lines()
                .any(|l| l.starts_with(pod) && l.contains("active")),
            "member {pod} not active:\n{table}"
        );
    }
    let unproxied = table
        .lines()
        .find(|l| l.starts_with("nodes: not read through the API server's proxy"))
        .unwrap_or_else(|| panic!("no line about the nodes:\n{table}"));
    assert!(
        unproxied.contains("/api/v1/cluster")
            && unproxied.contains("the API server answered 404 Not Found"),
        "{unproxied}"
    );
    assert!(
        warning.starts_with("warning: ") && warning.trim_end().lines().count() == 1,
        "{warning:?}"
    );

    // The same as JSON, from the binary run by itself.
    let status = json_of(
        "status -o json",
        plugin.run(&["status", "shop", "-n", n, "-o", "json"], None)?,
    );
    assert_eq!(status["name"], "shop");
    assert_eq!(status["namespace"], n);
    assert_eq!(status["replicas"], 2);
    assert_eq!(status["readyReplicas"], 2);
    assert_eq!(status["ringEpoch"], epoch);
    let ready = status["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Ready")
        .unwrap_or_else(|| panic!("no Ready condition: {status}"));
    assert_eq!(ready["status"], "True", "{status}");
    let members: Vec<(&str, &str)> = status["members"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| (m["pod"].as_str().unwrap(), m["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        members,
        [("shop-0", "active"), ("shop-1", "active")],
        "{status}"
    );
    assert!(status["ring"].is_null() && status["rebalance"].is_null());
    let nodes_error = status["nodesError"].as_str().unwrap_or("");
    assert!(nodes_error.contains("404 Not Found"), "{status}");

    // get and set go to the Service's proxy: one line with the API
    // server's answer, exit 1.
    let line = failed(
        "kubectl distrocache set",
        plugin.kubectl(&["set", "shop", "cart:42", r#"{"total":3.5}"#, "-n", n])?,
    );
    assert!(
        line.contains(
            "POST /api/v1/cache/cart%3A42 on distrocache shop: the API server answered 404"
        ),
        "{line}"
    );
    let line = failed(
        "get",
        plugin.run(&["get", "shop", "cart:42", "-n", n], None)?,
    );
    assert!(
        line.contains(
            "GET /api/v1/cache/cart%3A42 on distrocache shop: the API server answered 404"
        ),
        "{line}"
    );

    // An unknown cache.
    let line = failed(
        "status of an unknown cache",
        plugin.run(&["status", "nope", "-n", n], None)?,
    );
    assert!(
        line.contains(r#"distrocache "nope" not found in namespace"#),
        "{line}"
    );
    let line = failed(
        "get of an unknown cache",
        plugin.kubectl(&["get", "nope", "k", "-n", n])?,
    );
    assert!(line.contains("not found"), "{line}");

    // An API server that does not answer.
    let dead = plugin.dir.path().join("dead-kubeconfig");
    let kubeconfig = std::fs::read_to_string(cp.kubeconfig())?;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    std::fs::write(
        &dead,
        kubeconfig.replace(cp.server(), &format!("https://{closed}")),
    )?;
    assert!(std::fs::read_to_string(&dead)?.contains(&closed.to_string()));
    let line = failed(
        "status with no API server",
        plugin.run_with(&dead, &["status", "shop", "-n", n], None)?,
    );
    assert!(line.contains("cannot reach the API server"), "{line}");

    // Bad usage is clap's exit 2.
    let out = plugin.run(&["get", "shop"], None)?;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));

    // RBAC: the README's rules pass the proxy's authorization (the answer
    // is the proxy's 404, not a 403); without services/proxy the nodes'
    // part says forbidden; without distrocaches the status is refused.
    let rbac = format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: cache-user\n  namespace: {n}\n---\n\
         apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: reader\n  namespace: {n}\n---\n\
         apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: nobody\n  namespace: {n}\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: cache-user\n  namespace: {n}\n\
         rules:\n- apiGroups: [distrocache.io]\n  resources: [distrocaches]\n  verbs: [get]\n\
         - apiGroups: [\"\"]\n  resources: [services/proxy]\n  verbs: [get, create]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: reader\n  namespace: {n}\n\
         rules:\n- apiGroups: [distrocache.io]\n  resources: [distrocaches]\n  verbs: [get]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: cache-user\n  namespace: {n}\n\
         roleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: Role\n  name: cache-user\n\
         subjects:\n- kind: ServiceAccount\n  name: cache-user\n  namespace: {n}\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: reader\n  namespace: {n}\n\
         roleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: Role\n  name: reader\n\
         subjects:\n- kind: ServiceAccount\n  name: reader\n  namespace: {n}\n"
    );
    let out = cp.kubectl_with_stdin(["apply", "-f", "-"], &rbac)?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let user = plugin.dir.path().join("user-kubeconfig");
    write_service_account_kubeconfig(cp, &client, n, "cache-user", &user).await?;
    let status = json_of(
        "status as cache-user",
        plugin.run_with(&user, &["status", "shop", "-n", n, "-o", "json"], None)?,
    );
    assert_eq!(status["ringEpoch"], epoch);
    let nodes_error = status["nodesError"].as_str().unwrap_or("");
    assert!(
        nodes_error.contains("404 Not Found") && !nodes_error.contains("forbidden"),
        "{status}"
    );
    let line = failed(
        "set as cache-user",
        plugin.run_with(&user, &["set", "shop", "k", "7", "-n", n], None)?,
    );
    assert!(
        line.contains("answered 404") && !line.contains("forbidden"),
        "{line}"
    );

    let reader = plugin.dir.path().join("reader-kubeconfig");
    write_service_account_kubeconfig(cp, &client, n, "reader", &reader).await?;
    let status = json_of(
        "status as reader",
        plugin.run_with(&reader, &["status", "shop", "-n", n, "-o", "json"], None)?,
    );
    assert_eq!(status["ringEpoch"], epoch);
    let nodes_error = status["nodesError"].as_str().unwrap_or("");
    assert!(
        nodes_error.contains("403 Forbidden") && nodes_error.contains("services/proxy"),
        "{status}"
    );

    let nobody = plugin.dir.path().join("nobody-kubeconfig");
    write_service_account_kubeconfig(cp, &client, n, "nobody", &nobody).await?;
    let line = failed(
        "status without RBAC",
        plugin.run_with(&nobody, &["status", "shop", "-n", n], None)?,
    );
    assert!(line.contains("forbidden"), "{line}");
    Ok(())
}

/// A kubeconfig like the admin's that authenticates as a ServiceAccount
/// (a token from the TokenRequest API).
async fn write_service_account_kubeconfig(
    cp: &ControlPlane,
    client: &kube::Client,
    ns: &str,
    account: &str,
    path: &Path,
) -> Result<()> {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::ServiceAccount;
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: Vec::new(),
            expiration_seconds: Some(3600),
            ..TokenRequestSpec::default()
        },
        ..TokenRequest::default()
    };
    let token = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(account, &Default::default(), &request)
        .await?
        .status
        .context("a TokenRequest without a status")?
        .token;
    let mut kubeconfig: Value = serde_json::from_str(&std::fs::read_to_string(cp.kubeconfig())?)
        .context("the admin kubeconfig is JSON")?;
    let users = kubeconfig["users"]
        .as_array_mut()
        .context("a kubeconfig without users")?;
    assert_eq!(users.len(), 1, "one user in the admin kubeconfig");
    users[0]["user"] = json!({ "token": token });
    std::fs::write(path, serde_json::to_vec_pretty(&kubeconfig)?)?;
    Ok(())
}

/// With `spec.auth.enabled` the plugin reads the client token from the
/// Secret the operator made (`<name>-auth`) with the user's credentials and
/// goes on to the nodes (here the proxy's 404, see the module comment); a
/// user who may not read that Secret gets the API server's refusal in one
/// line, naming the Secret, and `status` still shows the resource.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auth_cache_is_read_with_the_token_from_its_secret() -> Result<()> {
    let (cp, kubelet) = installed().await?;
    let ns = TestNamespace::create(cp, "plugin-auth")
        .await?
        .with_kubelet(kubelet);
    let n = ns.name();
    apply_cache(
        cp,
        n,
        "locked",
        "  replicas: 2\n  replicationFactor: 2\n  podDisruptionBudget:\n    enabled: false\n  auth:\n    enabled: true\n",
    )?;
    let client = ns.client().await?;
    let dc = wait_ready(&client, n, "locked", 2, READY).await?;
    let epoch = dc.status.as_ref().map(|s| s.ring_epoch).unwrap_or(0);

    let plugin = Plugin::install(cp)?;
    let status = json_of(
        "status of an auth cache",
        plugin.run(&["status", "locked", "-n", n, "-o", "json"], None)?,
    );
    assert_eq!(status["ringEpoch"], epoch);
    assert_eq!(status["members"].as_array().map(Vec::len), Some(2));
    // The Secret was read (no refusal), so the nodes were asked: the
    // proxy's own answer (see the module comment).
    let nodes_error = status["nodesError"].as_str().unwrap_or("");
    assert!(
        nodes_error.contains("GET /api/v1/cluster on distrocache locked")
            && nodes_error.contains("404")
            && !nodes_error.contains("Secret"),
        "{status}"
    );
    let table = ok(
        "kubectl distrocache status of an auth cache",
        plugin.kubectl(&["status", "locked", "-n", n])?,
    );
    assert!(table.contains(&format!("ring epoch {epoch}")), "{table}");
    for args in [
        &["get", "locked", "k", "-n", n][..],
        &["set", "locked", "k", "1", "-n", n][..],
    ] {
        let line = failed(&args.join(" "), plugin.kubectl(args)?);
        assert!(line.contains("answered 404"), "{line}");
        assert!(!line.contains("Secret"), "{line}");
    }

    // A user with the README's rules but no access to Secrets.
    let rbac = format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: no-secrets\n  namespace: {n}\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: no-secrets\n  namespace: {n}\n\
         rules:\n- apiGroups: [distrocache.io]\n  resources: [distrocaches]\n  verbs: [get]\n\
         - apiGroups: [\"\"]\n  resources: [services/proxy]\n  verbs: [get, create]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: no-secrets\n  namespace: {n}\n\
         roleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: Role\n  name: no-secrets\n\
         subjects:\n- kind: ServiceAccount\n  name: no-secrets\n  namespace: {n}\n"
    );
    let out = cp.kubectl_with_stdin(["apply", "-f", "-"], &rbac)?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let user = plugin.dir.path().join("no-secrets-kubeconfig");
    write_service_account_kubeconfig(cp, &client, n, "no-secrets", &user).await?;
    let line = failed(
        "get without access to the Secret",
        plugin.run_with(&user, &["get", "locked", "k", "-n", n], None)?,
    );
    assert!(
        line.contains(&format!("Secret {n}/locked-auth")) && line.contains("forbidden"),
        "{line}"
    );
    let status = json_of(
        "status without access to the Secret",
        plugin.run_with(&user, &["status", "locked", "-n", n, "-o", "json"], None)?,
    );
    assert_eq!(status["ringEpoch"], epoch);
    let nodes_error = status["nodesError"].as_str().unwrap_or("");
    assert!(
        nodes_error.contains("locked-auth") && nodes_error.contains("forbidden"),
        "{status}"
    );
    Ok(())
}
