//! The playground (issue 19) as a newcomer uses it: the `playground` binary
//! runs as a process and this test types what its guide says, with the
//! kubectl the control plane was built with.
//!
//! - A first playground is killed with SIGKILL once ready (a crash): every
//!   process it started dies with it, and its directory is left behind.
//! - A second one in the same directory cleans that up, starts with
//!   Prometheus, and then: the example cache is applied and becomes Ready,
//!   an item written through one node is read through another, Prometheus
//!   finds and scrapes every node and the operator, the cache scales to 4 and
//!   back to 3 keeping the item, and SIGTERM stops it: no process it started
//!   is left and nothing remains in its directory.
//! - The mistakes a newcomer makes (no Go toolchain, a control-plane binary
//!   that fails to build, a port in use) each get one line.
//!
//! The playground's pods use addresses of their own (127.0.101.x, 127.0.102.x
//! here) so this test never competes with a playground a user runs (127.0.100.x)
//! or the other tests (127.0.0.x). Prints how long each start took.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use distrocache_tests::control_plane::client_from_kubeconfig;
use distrocache_tests::distrocache::{CacheClient, node_addresses, wait_ready, workspace_root};
use distrocache_tests::procs::{self, ProcessId};
use distrocache_tests::wait;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

const PLAYGROUND: &str = env!("CARGO_BIN_EXE_playground");
/// The pod addresses of the session test.
const POD_IPS: &str = "127.0.101.10-127.0.101.250";
/// How long a playground may take to print its guide (the control plane is
/// built already; this covers a slow, shared machine).
const START: Duration = Duration::from_secs(240);
/// How long the cache may take to become Ready after a change.
const READY: Duration = Duration::from_secs(180);
/// How long stopping may take: the grace periods of the control plane.
const STOP: Duration = Duration::from_secs(120);

/// A playground process, its output collected line by line.
struct Playground {
    child: Child,
    pid: u32,
    lines: mpsc::UnboundedReceiver<String>,
    transcript: Arc<Mutex<Vec<String>>>,
}

impl Playground {
    fn start(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<Playground> {
        let mut cmd = Command::new(PLAYGROUND);
        cmd.arg("--dir")
            .arg(dir)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().context("start the playground")?;
        let pid = child.id().context("the playground's pid")?;
        let (tx, lines) = mpsc::unbounded_channel();
        let transcript = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().context("stdout")?;
        let stderr = child.stderr.take().context("stderr")?;
        for (pipe, prefix) in [
            (
                Box::new(stdout) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                "",
            ),
            (Box::new(stderr), "stderr: "),
        ] {
            let (tx, transcript) = (tx.clone(), transcript.clone());
            tokio::spawn(async move {
                let mut lines = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let line = format!("{prefix}{line}");
                    eprintln!("playground[{pid}] {line}");
                    transcript
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        Ok(Playground {
            child,
            pid,
            lines,
            transcript,
        })
    }

    /// Waits for a line of output that `matches`, and returns it.
    async fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) if matches(&line) => return Ok(line),
                Ok(Some(_)) => {}
                Ok(None) => bail!(
                    "the playground ended its output before {what}; its output:\n{}",
                    self.transcript()
                ),
                Err(_) => bail!(
                    "no {what} within {timeout:?}; the playground's output:\n{}",
                    self.transcript()
                ),
            }
        }
    }

    fn transcript(&self) -> String {
        self.transcript
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .join("\n")
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: plain kill(2) on our child, not reaped yet.
        unsafe {
            libc::kill(self.pid as libc::pid_t, signal);
        }
    }

    /// Waits for the process to exit, returning its status.
    async fn exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => bail!(
                "the playground did not exit within {timeout:?}; its output:\n{}",
                self.transcript()
            ),
        }
    }
}

/// The value after `prefix` in a line of the guide.
fn after<'a>(line: &'a str, prefix: &str) -> Result<&'a str> {
    let rest = line
        .trim()
        .strip_prefix(prefix)
        .with_context(|| format!("{line:?} does not start with {prefix:?}"))?;
    rest.split_whitespace()
        .next()
        .with_context(|| format!("nothing after {prefix:?} in {line:?}"))
}

/// Runs the guide's kubectl (KUBECONFIG set, as after the guide's export).
fn kubectl(kubectl: &Path, kubeconfig: &Path, cache: &Path, args: &[&str]) -> Result<String> {
    let mut cmd = std::process::Command::new(kubectl);
    cmd.arg(format!("--cache-dir={}", cache.display()))
        .args(args)
        .env("KUBECONFIG", kubeconfig);
    let out = procs::run_with_timeout(cmd, None, Duration::from_secs(60))?;
    ensure!(
        out.status.success(),
        "kubectl {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `pid (command)`, for messages.
fn describe(p: &ProcessId) -> String {
    match std::fs::read_to_string(format!("/proc/{}/comm", p.pid)) {
        Ok(comm) => format!("{} ({})", p.pid, comm.trim()),
        Err(_) => format!("{} (gone)", p.pid),
    }
}

/// Waits until none of `processes` runs any more.
async fn all_gone(what: &str, processes: &[ProcessId]) -> Result<()> {
    wait::until(what, Duration::from_secs(30), || async move {
        let alive: Vec<u32> = processes
            .iter()
            .filter(|p| p.alive())
            .map(|p| p.pid)
            .collect();
        if alive.is_empty() {
            Ok(Some(()))
        } else {
            bail!("still running: {alive:?}")
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newcomer_session_from_start_to_sigterm_leaves_nothing_behind() -> Result<()> {
    let base = tempfile::tempdir()?;
    let dir = base.path().join("playground");
    let kubectl_cache = base.path().join("kubectl-cache");

    // A playground that crashes once ready.
    let started = Instant::now();
    let mut crashed = Playground::start(&dir, &["--pod-ips", POD_IPS], &[])?;
    crashed
        .wait_for("the guide", START, |l| l.starts_with("ready in"))
        .await?;
    let first_ready = started.elapsed();
    let orphans = procs::descendants(crashed.pid);
    ensure!(
        orphans.len() >= 4,
        "the control plane and the operator's pod run under the playground: {orphans:?}"
    );
    crashed.signal(libc::SIGKILL);
    crashed.exit(STOP).await?;
    all_gone(
        "the crashed playground's processes to die with it",
        &orphans,
    )
    .await?;
    ensure!(
        dir.join("playground.pid").exists(),
        "a crash leaves the directory behind"
    );

    // A second start in the same directory cleans up, and runs with Prometheus.
    let started = Instant::now();
    let mut pg = Playground::start(&dir, &["--pod-ips", POD_IPS, "--prometheus"], &[])?;
    pg.wait_for("the stale directory being cleaned", START, |l| {
        l.contains("did not stop cleanly")
    })
    .await?;
    pg.wait_for("the guide", START, |l| l.starts_with("ready in"))
        .await?;
    let ready_line = started.elapsed();
    let kubeconfig = PathBuf::from(after(
        &pg.wait_for("KUBECONFIG", START, |l| l.contains("export KUBECONFIG="))
            .await?,
        "export KUBECONFIG=",
    )?);
    let path_line = pg
        .wait_for("PATH", START, |l| l.contains("export PATH="))
        .await?;
    let tools = after(&path_line, "export PATH=")?
        .strip_suffix(":$PATH")
        .context("PATH=<dir>:$PATH")?;
    let kubectl_bin = Path::new(tools).join("kubectl");
    let prometheus_line = pg
        .wait_for("Prometheus' address", START, |l| {
            l.starts_with("Prometheus: ")
        })
        .await?;
    let prometheus: SocketAddr = after(&prometheus_line, "Prometheus: http://")?
        .split('/')
        .next()
        .context("Prometheus' address")?
        .parse()
        .context("Prometheus' address")?;
    ensure!(prometheus.ip().is_loopback());
    ensure!(kubeconfig.starts_with(&dir), "{}", kubeconfig.display());
    let kubectl = |args: &[&str]| kubectl(&kubectl_bin, &kubeconfig, &kubectl_cache, args);

    // A second playground in the same directory is refused, and leaves it alone.
    let error = one_line_error(&dir, &["--pod-ips", POD_IPS], &[]).await?;
    ensure!(
        error.starts_with(&format!(
            "another playground (pid {}) is running in",
            pg.pid
        )),
        "{error}"
    );
    ensure!(
        kubeconfig.exists(),
        "the refused playground left the running one's files alone"
    );

    // The example, as the guide says.
    let example = workspace_root().join("manifests/examples/distrocache.yaml");
    let applied = started.elapsed();
    kubectl(&["apply", "-f", &example.display().to_string()])?;
    let client = client_from_kubeconfig(&kubeconfig).await?;
    wait_ready(&client, "default", "example", 3, READY).await?;
    let cache_ready = started.elapsed();
    eprintln!(
        "time to Ready (control plane built): first start {first_ready:.1?} to the guide; \
         second start (cleaning a crash, with Prometheus) {ready_line:.1?} to the guide, \
         kubectl apply at {applied:.1?}, the example cache Ready with 3 members at {cache_ready:.1?}"
    );

    // Write through one node, read through another.
    let nodes: Vec<SocketAddr> = node_addresses(&client, "default", "example", 8080)
        .await?
        .into_iter()
        .map(|(_, addr)| addr)
        .collect();
    ensure!(nodes.len() == 3, "{nodes:?}");
    let range: distrocache_tests::kubelet::PodIpRange = POD_IPS.parse()?;
    for node in &nodes {
        let ip = match node.ip() {
            std::net::IpAddr::V4(ip) => ip,
            other => bail!("{other} is not IPv4"),
        };
        ensure!(
            range.first <= ip && ip <= range.last,
            "{node} is outside {POD_IPS}"
        );
    }
    let http = CacheClient::default();
    let item = json!({"value": {"greeting": "hello"}, "tags": ["playground"]});
    let (status, body) = http
        .post_json(nodes[0], "/api/v1/cache/greeting", &item)
        .await?;
    ensure!(status == 201, "write: {status} {body}");
    let read = |node: SocketAddr| {
        let http = http.clone();
        async move {
            let (status, body) = http.get_json(node, "/api/v1/cache/greeting").await?;
            ensure!(
                status == 200 && body["value"]["greeting"] == "hello",
                "read through {node}: {status} {body}"
            );
            anyhow::Ok(())
        }
    };
    read(nodes[1]).await?;

    // Prometheus found every node and every operator replica (the manifest
    // runs two that elect a leader) through the API server.
    let operator_pods = kubectl(&[
        "get",
        "pods",
        "-n",
        "distrocache-system",
        "-l",
        "app.kubernetes.io/name=distrocache-operator",
        "-o",
        "name",
    ])?
    .lines()
    .count();
    ensure!(operator_pods >= 1, "no operator pod is listed");
    let prometheus_http = reqwest::Client::builder().no_proxy().build()?;
    wait::until(
        "Prometheus scraping the 3 nodes and every operator replica",
        Duration::from_secs(90),
        || {
            let http = prometheus_http.clone();
            async move {
                let body: Value = http
                    .get(format!("http://{prometheus}/api/v1/query"))
                    .query(&[("query", "up{job=\"distrocache\"} == 1")])
                    .send()
                    .await?
                    .json()
                    .await?;
                let pods: Vec<String> = match body["data"]["result"].as_array() {
                    Some(result) => result
                        .iter()
                        .filter_map(|r| r["metric"]["pod"].as_str().map(String::from))
                        .collect(),
                    None => bail!("no result in {body}"),
                };
                let nodes = pods.iter().filter(|p| p.starts_with("example-")).count();
                let operator = pods
                    .iter()
                    .filter(|p| p.starts_with("distrocache-operator-"))
                    .count();
                if nodes == 3 && operator == operator_pods {
                    Ok(Some(()))
                } else {
                    bail!("up: {pods:?}")
                }
            }
        },
    )
    .await?;

    // Scale to 4 and back to 3; the item stays.
    kubectl(&["scale", "distrocache/example", "--replicas=4"])?;
    wait_ready(&client, "default", "example", 4, READY).await?;
    kubectl(&["scale", "distrocache/example", "--replicas=3"])?;
    wait_ready(&client, "default", "example", 3, READY).await?;
    let nodes = node_addresses(&client, "default", "example", 8080).await?;
    ensure!(nodes.len() == 3, "{nodes:?}");
    for (_, node) in &nodes {
        read(*node).await?;
    }
    drop(client);

    // SIGTERM: everything stops and the directory goes.
    let running = procs::descendants(pg.pid);
    eprintln!(
        "the playground runs {} processes: {}",
        running.len(),
        running.iter().map(describe).collect::<Vec<_>>().join(", ")
    );
    ensure!(
        running.len() >= 8,
        "etcd, kube-apiserver, kube-controller-manager, Prometheus, the operator and 3 nodes: {running:?}"
    );
    let stopping = Instant::now();
    pg.signal(libc::SIGTERM);
    let status = pg.exit(STOP).await?;
    eprintln!("SIGTERM to exit: {:.1?}", stopping.elapsed());
    ensure!(status.success(), "{status}; output:\n{}", pg.transcript());
    let left: Vec<String> = running.iter().filter(|p| p.alive()).map(describe).collect();
    ensure!(left.is_empty(), "left running after SIGTERM: {left:?}");
    let using = procs::processes_using(&dir);
    ensure!(
        using.is_empty(),
        "processes still use {}: {using:?}",
        dir.display()
    );
    ensure!(
        !dir.exists(),
        "{} should be gone; it holds {:?}",
        dir.display(),
        std::fs::read_dir(&dir)?
            .flatten()
            .map(|e| e.path())
            .collect::<Vec<_>>()
    );
    ensure!(
        pg.transcript()
            .contains(&format!("removed {}", dir.display())),
        "{}",
        pg.transcript()
    );
    Ok(())
}

/// Runs a playground that must fail at once; returns its one-line error.
/// (Whether it removed its directory is for the caller to check.)
async fn one_line_error(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<String> {
    let mut pg = Playground::start(dir, args, env)?;
    let status = pg.exit(Duration::from_secs(60)).await?;
    // Let the readers drain the pipes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let transcript = pg.transcript();
    ensure!(
        !status.success(),
        "the playground should fail:\n{transcript}"
    );
    let errors: Vec<&str> = transcript
        .lines()
        .filter(|l| l.starts_with("stderr: "))
        .collect();
    ensure!(
        errors.len() == 1 && errors[0].starts_with("stderr: error: "),
        "one line of error expected, got:\n{transcript}"
    );
    Ok(errors[0].trim_start_matches("stderr: error: ").to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newcomers_mistakes_are_explained_in_one_line() -> Result<()> {
    let base = tempfile::tempdir()?;
    let no_binaries = base.path().join("k8s-empty");
    std::fs::create_dir_all(&no_binaries)?;
    let no_binaries = no_binaries.display().to_string();
    let pod_ips = "127.0.102.10-127.0.102.20";

    // No Go toolchain, and the control plane is not built yet.
    let empty_path = base.path().join("empty-path");
    std::fs::create_dir_all(&empty_path)?;
    let error = one_line_error(
        &base.path().join("a"),
        &["--pod-ips", pod_ips],
        &[
            ("PATH", &empty_path.display().to_string()),
            ("DISTROCACHE_K8S_BIN", &no_binaries),
        ],
    )
    .await?;
    ensure!(error.starts_with("no Go toolchain on PATH"), "{error}");
    ensure!(
        !base.path().join("a").exists(),
        "a failed start removes its directory"
    );

    // A Go that fails to build kube-apiserver, the first binary the script builds.
    let fake = base.path().join("fake-go");
    std::fs::create_dir_all(&fake)?;
    std::fs::write(
        fake.join("go"),
        "#!/bin/sh\necho 'compile: the fake compiler broke' >&2\nexit 1\n",
    )?;
    std::fs::set_permissions(
        fake.join("go"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let path = format!("{}:{}", fake.display(), std::env::var("PATH")?);
    let error = one_line_error(
        &base.path().join("b"),
        &["--pod-ips", pod_ips],
        &[("PATH", &path), ("DISTROCACHE_K8S_BIN", &no_binaries)],
    )
    .await?;
    ensure!(
        error.starts_with(
            "the control plane binary kube-apiserver failed to build \
             (compile: the fake compiler broke); the full log is"
        ),
        "{error}"
    );

    // A port the pods need is taken.
    let _taken = TcpListener::bind((Ipv4Addr::new(127, 0, 102, 10), 8080))?;
    let error = one_line_error(&base.path().join("c"), &["--pod-ips", pod_ips], &[]).await?;
    ensure!(
        error.starts_with("port 8080 is already in use on 127.0.102.10"),
        "{error}"
    );
    ensure!(
        !base.path().join("c").exists(),
        "a failed start removes its directory"
    );
    Ok(())
}
