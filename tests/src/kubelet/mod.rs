//! The test kubelet (DESIGN 6): no real kubelet runs here, so this one plays
//! both the scheduler and the kubelet for one Node. It registers the Node,
//! binds every pending pod to it (the `binding` subresource, as the scheduler
//! does), and runs each bound pod's first container as a local process on its
//! own loopback address (127.0.0.10 upwards, unless [`set_pod_ip_range`] picks
//! others), mapping the container image to a local executable through a table
//! the test fills ([`Kubelet::add_image`]).
//! It writes the pod status the way a kubelet does (phase, IPs, container
//! states, restart counts, Ready from the readiness probe), restarts exited
//! processes, and carries out graceful deletion (preStop, SIGTERM, grace
//! period, SIGKILL, then the final delete), so the StatefulSet controller and
//! the garbage collector behave as in a cluster.
//!
//! It runs on its own thread with its own Tokio runtime: a shared kubelet
//! must outlive the runtime of the test that started it, and the processes it
//! spawns are tied to that thread's life (PDEATHSIG, see [`crate::procs`]).
//!
//! Known gaps, on purpose: only the first container of a pod runs (others
//! report `NotSupported`), init containers are ignored, only secret,
//! emptyDir and persistentVolumeClaim volumes are materialised (as
//! directories, see `launch`), node selectors, affinity and taints are not
//! considered when binding, no node heartbeats are sent (no node-lifecycle
//! controller runs), and `exec`/`grpc` probes are not supported.

mod images;
mod ip_pool;
mod launch;
mod manager;
mod node;
mod probe;
mod worker;

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use tokio::sync::{mpsc, oneshot};

pub use images::{ImageTable, Program};
pub use ip_pool::{PodIpRange, set_pod_ip_range};

use crate::control_plane::ControlPlane;
use crate::procs;
use worker::Command;

/// The Node name of a kubelet started with [`Kubelet::start`].
pub(crate) const DEFAULT_NODE_NAME: &str = "test-kubelet";
/// How long a kubelet may take to register its Node and list the pods.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long shutting down may take before the kubelet's thread is left behind.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(20);

/// How to start a kubelet.
#[derive(Debug, Clone)]
pub struct KubeletConfig {
    /// The Node this kubelet registers and binds pods to.
    pub node_name: String,
    /// The kubeconfig the kubelet itself uses (an admin one is fine).
    pub kubeconfig: PathBuf,
    /// The API server's URL and CA, for the pods' service-account kubeconfigs.
    pub server: String,
    pub ca_cert: PathBuf,
    /// Where pod logs, pod working directories and `kubelet.log` go.
    pub dir: PathBuf,
    /// Whether to act as the scheduler too, binding every pending pod to this
    /// node. Only one kubelet per control plane should; another one runs only
    /// the pods whose `spec.nodeName` already names it.
    pub bind_pending_pods: bool,
}

impl KubeletConfig {
    /// A kubelet for `cp`, node [`DEFAULT_NODE_NAME`], files in a new
    /// directory inside the control plane's.
    pub fn for_control_plane(cp: &ControlPlane) -> KubeletConfig {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        KubeletConfig {
            node_name: DEFAULT_NODE_NAME.into(),
            kubeconfig: cp.kubeconfig().to_path_buf(),
            server: cp.server().to_string(),
            ca_cert: cp.ca_cert().to_path_buf(),
            dir: cp.dir().join(format!("kubelet-{n}")),
            bind_pending_pods: true,
        }
    }
}

/// What the kubelet knows about a pod's process, for tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodProcess {
    pub uid: String,
    pub ip: Ipv4Addr,
    /// The process's stdout and stderr, plus the kubelet's notes (lines
    /// starting with `[test-kubelet`), across restarts.
    pub log_path: PathBuf,
    /// The pid while a process runs.
    pub pid: Option<u32>,
}

/// State shared by the kubelet's tasks and its handle.
pub(crate) struct Context {
    pub node_name: String,
    pub dir: PathBuf,
    pub server: String,
    pub ca_cert: PathBuf,
    pub images: RwLock<ImageTable>,
    pods: Mutex<HashMap<(String, String), PodEntry>>,
    events: Mutex<Option<File>>,
}

struct PodEntry {
    process: PodProcess,
    commands: mpsc::UnboundedSender<Command>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Context {
    /// Appends a line to `kubelet.log`.
    pub(crate) fn event(&self, message: &str) {
        if let Some(file) = lock(&self.events).as_mut() {
            let time = k8s_openapi::jiff::Timestamp::now();
            let _ = writeln!(file, "{time} {message}");
        }
    }

    fn event_log(&self) -> PathBuf {
        self.dir.join("kubelet.log")
    }

    pub(crate) fn set_pid(&self, namespace: &str, name: &str, uid: &str, pid: Option<u32>) {
        let mut pods = lock(&self.pods);
        if let Some(entry) = pods.get_mut(&(namespace.to_string(), name.to_string()))
            && entry.process.uid == uid
        {
            entry.process.pid = pid;
        }
    }

    pub(crate) fn forget_pod(&self, namespace: &str, name: &str, uid: &str) {
        let mut pods = lock(&self.pods);
        let key = (namespace.to_string(), name.to_string());
        if pods.get(&key).is_some_and(|e| e.process.uid == uid) {
            pods.remove(&key);
        }
    }
}

/// A running test kubelet. Dropping it kills every process it started.
pub struct Kubelet {
    ctx: Arc<Context>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

static SHARED: tokio::sync::OnceCell<Result<Kubelet, String>> = tokio::sync::OnceCell::const_new();

impl Kubelet {
    /// Starts a kubelet for `cp` (node [`DEFAULT_NODE_NAME`]).
    pub async fn start(cp: &ControlPlane) -> Result<Kubelet> {
        Self::start_with(KubeletConfig::for_control_plane(cp)).await
    }

    /// The kubelet of the shared control plane ([`ControlPlane::shared`]),
    /// started by the first caller. Tests register their images on it; its
    /// processes die with the test process.
    pub async fn shared() -> Result<&'static Kubelet> {
        let cp = ControlPlane::shared().await?;
        let result = SHARED
            .get_or_init(|| async { Self::start(cp).await.map_err(|e| format!("{e:#}")) })
            .await;
        result
            .as_ref()
            .map_err(|e| anyhow!("the shared test kubelet did not start: {e}"))
    }

    /// Starts a kubelet: registers the Node, lists the pods, then returns.
    pub async fn start_with(config: KubeletConfig) -> Result<Kubelet> {
        std::fs::create_dir_all(&config.dir)
            .with_context(|| format!("create {}", config.dir.display()))?;
        let events = File::create(config.dir.join("kubelet.log")).context("create kubelet.log")?;
        let ctx = Arc::new(Context {
            node_name: config.node_name.clone(),
            dir: config.dir.clone(),
            server: config.server.clone(),
            ca_cert: config.ca_cert.clone(),
            images: RwLock::new(ImageTable::default()),
            pods: Mutex::new(HashMap::new()),
            events: Mutex::new(Some(events)),
        });
        let (ready_tx, ready_rx) = oneshot::channel();
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let thread_ctx = ctx.clone();
        let kubeconfig = config.kubeconfig.clone();
        let thread_name = format!("kubelet-{}", config.node_name);
        let schedule = config.bind_pending_pods;
        let thread = std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("build the kubelet's runtime: {e}")));
                        return;
                    }
                };
                runtime.block_on(manager::run(
                    thread_ctx,
                    kubeconfig,
                    schedule,
                    ready_tx,
                    shutdown_rx,
                ));
            })
            .context("start the kubelet's thread")?;
        let kubelet = Kubelet {
            ctx,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        };
        match tokio::time::timeout(START_TIMEOUT, ready_rx).await {
            Ok(Ok(Ok(()))) => Ok(kubelet),
            Ok(Ok(Err(e))) => bail!("the test kubelet did not start: {e}"),
            Ok(Err(_)) => bail!("the test kubelet's thread ended during start-up"),
            Err(_) => bail!("the test kubelet did not start within {START_TIMEOUT:?}"),
        }
    }

    pub fn node_name(&self) -> &str {
        &self.ctx.node_name
    }

    /// The directory holding pod logs and `kubelet.log`.
    pub fn dir(&self) -> &Path {
        &self.ctx.dir
    }

    /// Maps a container image to a program. `image` without a tag matches
    /// every tag; with one, only that tag. Pods already waiting for the image
    /// pick it up within a second.
    pub fn add_image(&self, image: &str, program: Program) {
        self.ctx
            .images
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(image, program);
    }

    /// The process behind a pod bound to this kubelet, if it has one.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<PodProcess> {
        lock(&self.ctx.pods)
            .get(&(namespace.to_string(), name.to_string()))
            .map(|e| e.process.clone())
    }

    pub fn pod_ip(&self, namespace: &str, name: &str) -> Option<Ipv4Addr> {
        self.pod(namespace, name).map(|p| p.ip)
    }

    pub fn pod_log_path(&self, namespace: &str, name: &str) -> Option<PathBuf> {
        self.pod(namespace, name).map(|p| p.log_path)
    }

    pub fn pod_pid(&self, namespace: &str, name: &str) -> Option<u32> {
        self.pod(namespace, name).and_then(|p| p.pid)
    }

    /// SIGKILLs the pod's process, as a crash would; the kubelet restarts it
    /// (restartCount goes up). Returns the killed pid.
    pub async fn crash(&self, namespace: &str, name: &str) -> Result<u32> {
        let commands = lock(&self.ctx.pods)
            .get(&(namespace.to_string(), name.to_string()))
            .map(|e| e.commands.clone())
            .ok_or_else(|| anyhow!("pod {namespace}/{name} is not running on this kubelet"))?;
        let (reply_tx, reply_rx) = oneshot::channel();
        commands
            .send(Command::Crash(reply_tx))
            .map_err(|_| anyhow!("pod {namespace}/{name} is shutting down"))?;
        tokio::time::timeout(Duration::from_secs(10), reply_rx)
            .await
            .map_err(|_| anyhow!("pod {namespace}/{name} did not answer the crash request"))?
            .map_err(|_| anyhow!("pod {namespace}/{name} ended before crashing"))?
            .map_err(|e| anyhow!(e))
    }

    /// The tail of `kubelet.log` (lines about `namespace`) and of the logs of
    /// every pod of `namespace`, for failure reports.
    pub fn log_tails(&self, namespace: &str, lines: usize) -> String {
        let mut out = String::new();
        let marker = format!(" {namespace}/");
        let events = std::fs::read_to_string(self.ctx.event_log()).unwrap_or_default();
        let relevant: Vec<&str> = events.lines().filter(|l| l.contains(&marker)).collect();
        out.push_str(&format!(
            "----- test kubelet {} ({}), last {lines} lines about {namespace} -----\n{}\n",
            self.ctx.node_name,
            self.ctx.event_log().display(),
            relevant[relevant.len().saturating_sub(lines)..].join("\n")
        ));
        let prefix = format!("{namespace}_");
        let mut logs: Vec<PathBuf> = std::fs::read_dir(&self.ctx.dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension().is_some_and(|e| e == "log")
                    && p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
            })
            .collect();
        logs.sort();
        for log in logs {
            out.push_str(&format!(
                "----- pod log {}, last {lines} lines -----\n{}\n",
                log.display(),
                procs::tail(&log, lines)
            ));
        }
        out
    }

    /// Stops the kubelet: kills every process it started and waits for its
    /// thread (bounded).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let deadline = std::time::Instant::now() + SHUTDOWN_TIMEOUT;
            while !thread.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                eprintln!(
                    "test kubelet {}: its thread did not stop within {SHUTDOWN_TIMEOUT:?}",
                    self.ctx.node_name
                );
            }
        }
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- test kubelet {}: last lines of {} -----\n{}",
                self.ctx.node_name,
                self.ctx.event_log().display(),
                procs::tail(&self.ctx.event_log(), crate::control_plane::LOG_TAIL_LINES)
            );
        }
        self.stop();
    }
}
