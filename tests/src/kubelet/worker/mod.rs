//! One pod's life on the test kubelet: start its first container's process
//! on the pod's loopback address, probe it, restart it when it exits, report
//! all of that in the pod's status, and on deletion run the preStop hook,
//! SIGTERM, wait out the grace period, SIGKILL, and finish the deletion.
//!
//! Each pod has its own task; everything the task needs to react to (a new
//! version of the pod, a command from the test, the process exiting, a timer)
//! is one branch of a `select!` loop, so the state below has a single owner.

mod start;
mod status;
mod terminate;

use std::fs::OpenOptions;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodStatus,
    ServiceAccount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, Client};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::Context;
use super::ip_pool::IpLease;
use super::launch::{self, PodFacts};
use super::probe::{self, ProbeKind, Prober};
use crate::procs;

/// The address of the "host" the pods run on.
pub(crate) const HOST_IP: Ipv4Addr = Ipv4Addr::LOCALHOST;
const INITIAL_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A container that ran this long before exiting restarts without backoff.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(10);
/// How often an unknown image or a missing Secret is looked up again.
const CONFIG_RETRY: Duration = Duration::from_secs(1);
const API_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a running container's secret volumes are synced with their
/// Secrets (a real kubelet: about a minute; sped up for tests).
const SECRET_SYNC: Duration = Duration::from_secs(1);

/// What the kubelet or a test asks of a pod's task.
#[derive(Debug)]
pub(crate) enum Command {
    /// SIGKILL the process (it is restarted like any exited process); replies with its pid.
    Crash(oneshot::Sender<Result<u32, String>>),
    /// The pod is gone or the kubelet stops: kill the process and end.
    Stop,
}

/// The running process of the container.
struct Running {
    child: tokio::process::Child,
    pid: u32,
    started_at: Time,
    started: Instant,
}

/// The container's state as reported in its status.
#[derive(Clone)]
enum State {
    Waiting { reason: String, message: String },
    Running { started_at: Time },
    Terminated(ContainerStateTerminated),
}

pub(crate) struct Worker {
    ctx: Arc<Context>,
    client: Client,
    http: reqwest::Client,
    namespace: String,
    name: String,
    uid: String,
    pod: Arc<Pod>,
    pod_rx: watch::Receiver<Arc<Pod>>,
    cmd_rx: mpsc::UnboundedReceiver<Command>,
    lease: IpLease,
    log_path: PathBuf,
    dir: PathBuf,
    kubeconfig: Option<PathBuf>,
    start_time: Time,
    running: Option<Running>,
    state: State,
    last_state: Option<ContainerStateTerminated>,
    restart_count: i32,
    started_once: bool,
    next_start: Option<Instant>,
    backoff: Duration,
    /// When set, a SIGTERMed process (failed liveness) gets SIGKILL at this time.
    kill_at: Option<Instant>,
    startup: Option<Prober>,
    liveness: Option<Prober>,
    readiness: Option<Prober>,
    /// Succeeded or Failed once the container will not run again.
    final_phase: Option<&'static str>,
    condition_times: Vec<(&'static str, bool, Time)>,
    last_written: Option<serde_json::Value>,
    status_retry_at: Option<Instant>,
    /// When the running container's secret volumes are synced next.
    secret_sync_at: Option<Instant>,
}

/// What a worker starts from.
pub(crate) struct WorkerInit {
    pub ctx: Arc<Context>,
    pub client: Client,
    pub http: reqwest::Client,
    pub pod: Arc<Pod>,
    pub pod_rx: watch::Receiver<Arc<Pod>>,
    pub cmd_rx: mpsc::UnboundedReceiver<Command>,
    pub lease: IpLease,
    pub log_path: PathBuf,
    pub dir: PathBuf,
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

fn first_container(pod: &Pod) -> Option<&Container> {
    pod.spec.as_ref().and_then(|s| s.containers.first())
}

/// Sends `signal` to the process group the container leads (it was started
/// as its own group, so helpers it forked get the signal too).
fn signal_group(pid: u32, signal: libc::c_int) {
    if pid > 0 {
        // SAFETY: plain kill(2) on a process group we created.
        unsafe {
            libc::kill(-(pid as libc::pid_t), signal);
        }
    }
}

async fn wait_child(running: &mut Option<Running>) -> std::io::Result<ExitStatus> {
    match running {
        Some(r) => r.child.wait().await,
        None => std::future::pending().await,
    }
}

impl Worker {
    pub(crate) fn new(init: WorkerInit) -> Worker {
        let meta = &init.pod.metadata;
        Worker {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            uid: meta.uid.clone().unwrap_or_default(),
            ctx: init.ctx,
            client: init.client,
            http: init.http,
            pod: init.pod,
            pod_rx: init.pod_rx,
            cmd_rx: init.cmd_rx,
            lease: init.lease,
            log_path: init.log_path,
            dir: init.dir,
            kubeconfig: None,
            start_time: now(),
            running: None,
            state: State::Waiting {
                reason: "ContainerCreating".into(),
                message: String::new(),
            },
            last_state: None,
            restart_count: 0,
            started_once: false,
            next_start: Some(Instant::now()),
            backoff: INITIAL_BACKOFF,
            kill_at: None,
            startup: None,
            liveness: None,
            readiness: None,
            final_phase: None,
            condition_times: Vec::new(),
            last_written: None,
            status_retry_at: None,
            secret_sync_at: None,
        }
    }

    fn ip(&self) -> Ipv4Addr {
        self.lease.ip()
    }

    fn api(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn event(&self, message: impl AsRef<str>) {
        self.ctx.event(&format!(
            "{}/{} ({}): {}",
            self.namespace,
            self.name,
            self.ip(),
            message.as_ref()
        ));
    }

    /// Appends a line to the pod's log, marked as the kubelet's.
    fn pod_log(&self, message: &str) {
        if let Ok(mut file) = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
        {
            let _ = writeln!(file, "[test-kubelet {}] {message}", now().0);
        }
    }

    fn deleting(&self) -> bool {
        self.pod.metadata.deletion_timestamp.is_some()
    }

    pub(crate) async fn run(mut self) {
        self.event("assigned to this node");
        loop {
            if self.deleting() {
                self.terminate().await;
                break;
            }
            self.write_status().await;
            let wake = self.next_wake();
            tokio::select! {
                changed = self.pod_rx.changed() => match changed {
                    Ok(()) => self.pod = self.pod_rx.borrow_and_update().clone(),
                    Err(_) => {
                        self.kill_now().await;
                        break;
                    }
                },
                command = self.cmd_rx.recv() => match command {
                    Some(Command::Crash(reply)) => {
                        let _ = reply.send(self.crash());
                    }
                    Some(Command::Stop) | None => {
                        self.kill_now().await;
                        break;
                    }
                },
                status = wait_child(&mut self.running) => self.on_exit(status),
                _ = tokio::time::sleep_until(wake) => self.on_timer().await,
            }
        }
        self.ctx.forget_pod(&self.namespace, &self.name, &self.uid);
    }

    fn next_wake(&self) -> Instant {
        let mut wake = Instant::now() + Duration::from_secs(3600);
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                wake = wake.min(t);
            }
        };
        consider(self.next_start);
        consider(self.kill_at);
        consider(self.status_retry_at);
        if self.running.is_some() {
            consider(self.secret_sync_at);
            for prober in [&self.startup, &self.liveness, &self.readiness]
                .into_iter()
                .flatten()
            {
                consider(Some(prober.next_at()));
            }
        }
        wake
    }

    async fn on_timer(&mut self) {
        let now = Instant::now();
        if self.kill_at.is_some_and(|t| t <= now) {
            self.kill_at = None;
            if let Some(r) = &self.running {
                self.event("still running after its grace period: SIGKILL");
                signal_group(r.pid, libc::SIGKILL);
            }
        }
        if self.running.is_none() && self.next_start.is_some_and(|t| t <= now) {
            self.try_start().await;
        }
        if self.running.is_some() {
            self.run_due_probes().await;
        }
        if self.running.is_some() && self.secret_sync_at.is_some_and(|t| t <= now) {
            self.sync_secrets().await;
        }
        if self.status_retry_at.is_some_and(|t| t <= now) {
            self.status_retry_at = None;
        }
    }

    fn waiting(&mut self, reason: &str, message: String, retry_in: Duration) {
        if !matches!(&self.state, State::Waiting { reason: r, message: m } if r == reason && *m == message)
        {
            self.event(format!("waiting: {reason}: {message}"));
        }
        self.state = State::Waiting {
            reason: reason.into(),
            message,
        };
        self.next_start = Some(Instant::now() + retry_in);
    }

    async fn run_due_probes(&mut self) {
        let pod = self.pod.clone();
        let Some(container) = first_container(&pod) else {
            return;
        };
        let ip = self.ip();
        let now = Instant::now();
        // Liveness and readiness wait until the startup probe has passed.
        if let Some(prober) = self.startup.as_mut()
            && !prober.passing
        {
            if !prober.supported() {
                prober.passing = true;
            } else if prober.next_at() <= now {
                let (changed, result) = prober.probe(&self.http, container, ip).await;
                let failed = prober.failed_for_good();
                let grace = prober.termination_grace_period();
                if changed {
                    self.event("startup probe succeeded");
                } else if failed {
                    let reason = result.err().unwrap_or_default();
                    self.kill_unhealthy(&format!("startup probe failed: {reason}"), grace);
                }
            }
            if self.startup.as_ref().is_some_and(|p| !p.passing) {
                return;
            }
        }
        if let Some(prober) = self.liveness.as_mut()
            && prober.supported()
            && prober.next_at() <= now
            && self.kill_at.is_none()
        {
            let (_, result) = prober.probe(&self.http, container, ip).await;
            if prober.failed_for_good() {
                let grace = prober.termination_grace_period();
                let reason = result.err().unwrap_or_default();
                self.kill_unhealthy(&format!("liveness probe failed: {reason}"), grace);
            }
        }
        if let Some(prober) = self.readiness.as_mut()
            && prober.next_at() <= now
        {
            let (changed, result) = prober.probe(&self.http, container, ip).await;
            let passing = prober.passing;
            if changed {
                match result {
                    Ok(()) => self.event("readiness probe passes: ready"),
                    Err(e) => self.event(format!("readiness probe fails: not ready ({e})")),
                }
            } else if !passing && let Err(e) = result {
                self.pod_log(&format!("readiness probe failed: {e}"));
            }
        }
    }

    /// A failed liveness or startup probe: SIGTERM now, SIGKILL after the
    /// grace period; the exit then restarts the container like any other.
    fn kill_unhealthy(&mut self, reason: &str, probe_grace: Option<i64>) {
        let Some(running) = &self.running else {
            return;
        };
        let grace = probe_grace.unwrap_or_else(|| self.pod_grace_period());
        self.event(format!("{reason}; restarting (grace {grace}s)"));
        self.pod_log(reason);
        signal_group(running.pid, libc::SIGTERM);
        self.kill_at = Some(Instant::now() + Duration::from_secs(grace.max(0) as u64));
    }

    fn pod_grace_period(&self) -> i64 {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(30)
    }

    fn crash(&mut self) -> Result<u32, String> {
        match &self.running {
            Some(running) => {
                self.event(format!("crash requested: SIGKILL pid {}", running.pid));
                signal_group(running.pid, libc::SIGKILL);
                Ok(running.pid)
            }
            None => Err(format!(
                "pod {}/{} has no running process",
                self.namespace, self.name
            )),
        }
    }

    /// Records the exit of the process and decides whether it restarts.
    fn on_exit(&mut self, status: std::io::Result<ExitStatus>) {
        let Some(running) = self.running.take() else {
            return;
        };
        let (exit_code, description) = match status {
            Ok(status) => match (status.code(), status.signal()) {
                (Some(code), _) => (code, format!("exit code {code}")),
                (None, Some(signal)) => (128 + signal, format!("killed by signal {signal}")),
                (None, None) => (255, status.to_string()),
            },
            Err(e) => (255, format!("wait failed: {e}")),
        };
        let terminated = ContainerStateTerminated {
            container_id: Some(self.container_id()),
            exit_code,
            reason: Some(if exit_code == 0 { "Completed" } else { "Error" }.into()),
            started_at: Some(running.started_at),
            finished_at: Some(now()),
            ..Default::default()
        };
        self.pod_log(&format!("process exited: {description}"));
        self.ctx
            .set_pid(&self.namespace, &self.name, &self.uid, None);
        self.kill_at = None;
        self.startup = None;
        self.liveness = None;
        self.readiness = None;
        if self.deleting() {
            self.state = State::Terminated(terminated);
            return;
        }
        let policy = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.as_deref())
            .unwrap_or("Always");
        let restart = match policy {
            "Never" => false,
            "OnFailure" => exit_code != 0,
            _ => true,
        };
        if restart {
            if running.started.elapsed() >= BACKOFF_RESET_AFTER {
                self.backoff = INITIAL_BACKOFF;
            }
            let delay = self.backoff;
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            self.event(format!(
                "process exited ({description}); restarting in {delay:?}"
            ));
            self.last_state = Some(terminated);
            self.state = State::Waiting {
                reason: "CrashLoopBackOff".into(),
                message: format!("back-off {delay:?} restarting failed container"),
            };
            self.next_start = Some(Instant::now() + delay);
        } else {
            self.event(format!(
                "process exited ({description}); restartPolicy {policy}: not restarting"
            ));
            self.final_phase = Some(if exit_code == 0 {
                "Succeeded"
            } else {
                "Failed"
            });
            self.state = State::Terminated(terminated);
        }
    }

    /// Kills the process at once (the pod vanished or the kubelet stops).
    async fn kill_now(&mut self) {
        if let Some(running) = &self.running {
            self.event(format!("stopping: SIGKILL pid {}", running.pid));
            signal_group(running.pid, libc::SIGKILL);
            let status =
                tokio::time::timeout(Duration::from_secs(5), wait_child(&mut self.running)).await;
            if let Ok(status) = status {
                self.on_exit(status);
            }
        }
    }
}
