//! The kubelet's main loop: a reflector over every pod feeds a sync that
//! binds pending pods to this node (acting as the scheduler) and keeps one
//! worker task per pod bound here, stopping the workers of pods that are gone.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Binding, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PostParams;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use super::ip_pool::IpLease;
use super::worker::{Command, Worker, WorkerInit};
use super::{Context, PodEntry, PodProcess, SHUTDOWN_TIMEOUT, START_TIMEOUT, lock, node};
use crate::control_plane::client_from_kubeconfig;

/// The kubelet's main loop, on its own runtime.
pub(super) async fn run(
    ctx: Arc<Context>,
    kubeconfig: PathBuf,
    bind_pending_pods: bool,
    ready: oneshot::Sender<Result<(), String>>,
    mut shutdown: oneshot::Receiver<()>,
) {
    let client = match client_from_kubeconfig(&kubeconfig).await {
        Ok(client) => client,
        Err(e) => {
            let _ = ready.send(Err(format!("{e:#}")));
            return;
        }
    };
    if let Err(e) = node::register(&client, &ctx.node_name).await {
        let _ = ready.send(Err(format!("register Node {}: {e:#}", ctx.node_name)));
        return;
    }
    let http = match reqwest::Client::builder().no_proxy().build() {
        Ok(http) => http,
        Err(e) => {
            let _ = ready.send(Err(format!("build the probe client: {e}")));
            return;
        }
    };

    // Every pod, through a reflector: the store is the kubelet's view and a
    // notification wakes the sync loop on every change.
    let (store, writer) = reflector::store();
    let changed = Arc::new(Notify::new());
    let watch_ctx = ctx.clone();
    let watch_changed = changed.clone();
    let pods = reflector::reflector(
        writer,
        watcher(Api::<Pod>::all(client.clone()), watcher::Config::default()),
    )
    .default_backoff();
    let watch_task = tokio::spawn(async move {
        let mut pods = std::pin::pin!(pods);
        while let Some(event) = pods.next().await {
            if let Err(e) = event {
                watch_ctx.event(&format!("pod watch error (retrying): {e}"));
            }
            watch_changed.notify_one();
        }
    });
    if tokio::time::timeout(START_TIMEOUT, store.wait_until_ready())
        .await
        .is_err()
    {
        watch_task.abort();
        let _ = ready.send(Err("the pod list did not arrive in time".into()));
        return;
    }
    ctx.event(&format!("node {} registered; watching pods", ctx.node_name));
    let _ = ready.send(Ok(()));

    let mut manager = Manager {
        ctx: ctx.clone(),
        client,
        http,
        workers: HashMap::new(),
        done: HashSet::new(),
        binding: HashSet::new(),
        bind_pending_pods,
    };
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = changed.notified() => {}
            // Also a periodic resync: it retries failed bindings.
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        manager.sync(&store).await;
    }
    ctx.event("shutting down: stopping every pod's process");
    manager.stop_all().await;
    watch_task.abort();
}

struct WorkerHandle {
    pod: watch::Sender<Arc<Pod>>,
    commands: mpsc::UnboundedSender<Command>,
    task: tokio::task::JoinHandle<()>,
}

/// Binds pending pods and keeps one worker per pod bound to this node.
struct Manager {
    ctx: Arc<Context>,
    client: Client,
    http: reqwest::Client,
    /// By pod uid.
    workers: HashMap<String, WorkerHandle>,
    /// Uids whose worker has finished (deleted pods still in the store).
    done: HashSet<String>,
    /// Uids with a binding in flight or done, not yet seen bound.
    binding: HashSet<String>,
    bind_pending_pods: bool,
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

impl Manager {
    async fn sync(&mut self, store: &Store<Pod>) {
        let pods = store.state();
        let mut present = HashSet::new();
        for pod in pods {
            let Some(uid) = pod.metadata.uid.clone() else {
                continue;
            };
            present.insert(uid.clone());
            let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
            match node {
                None => {
                    if self.bind_pending_pods
                        && pod.metadata.deletion_timestamp.is_none()
                        && !is_terminal(&pod)
                        && self.binding.insert(uid.clone())
                        && let Err(e) = self.bind(&pod).await
                    {
                        self.ctx
                            .event(&format!("{}: binding failed: {e}", pod_name(&pod)));
                        self.binding.remove(&uid);
                    }
                }
                Some(node) if node == self.ctx.node_name => {
                    self.binding.remove(&uid);
                    if let Some(worker) = self.workers.get(&uid) {
                        worker.pod.send_if_modified(|current| {
                            let changed =
                                current.metadata.resource_version != pod.metadata.resource_version;
                            if changed {
                                *current = pod.clone();
                            }
                            changed
                        });
                    } else if !self.done.contains(&uid) && !is_terminal(&pod) {
                        self.start_worker(pod.clone(), uid);
                    }
                }
                Some(_) => {
                    self.binding.remove(&uid);
                }
            }
        }
        // Pods that are gone (deleted, possibly without grace): stop their processes.
        let gone: Vec<String> = self
            .workers
            .keys()
            .filter(|uid| !present.contains(*uid))
            .cloned()
            .collect();
        for uid in gone {
            if let Some(worker) = self.workers.remove(&uid) {
                let _ = worker.commands.send(Command::Stop);
            }
        }
        let finished: Vec<String> = self
            .workers
            .iter()
            .filter(|(_, w)| w.task.is_finished())
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in finished {
            self.workers.remove(&uid);
            self.done.insert(uid);
        }
        self.done.retain(|uid| present.contains(uid));
        self.binding.retain(|uid| present.contains(uid));
    }

    /// What the scheduler does: POST pods/<name>/binding naming the node.
    async fn bind(&self, pod: &Pod) -> Result<()> {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let binding = Binding {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                // Binds this pod only, not a newer one of the same name.
                uid: pod.metadata.uid.clone(),
                ..Default::default()
            },
            target: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(self.ctx.node_name.clone()),
                ..Default::default()
            },
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        let params = PostParams::default();
        let request =
            pods.create_subresource::<_, serde_json::Value>("binding", &name, &params, &binding);
        let result = tokio::time::timeout(Duration::from_secs(10), request)
            .await
            .map_err(|_| anyhow::anyhow!("the binding request timed out"))?;
        match result {
            Ok(_) => {
                self.ctx.event(&format!(
                    "{namespace}/{name}: bound to {}",
                    self.ctx.node_name
                ));
                Ok(())
            }
            // Already bound (our own earlier try, seen late): nothing to do.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn start_worker(&mut self, pod: Arc<Pod>, uid: String) {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let Some(lease) = IpLease::take() else {
            self.ctx.event(&format!(
                "{namespace}/{name}: no free loopback address for the pod"
            ));
            return;
        };
        let short_uid = uid.get(..8).unwrap_or(&uid);
        let base = format!("{namespace}_{name}_{short_uid}");
        let log_path = self.ctx.dir.join(format!("{base}.log"));
        let dir = self.ctx.dir.join(&base);
        let (pod_tx, pod_rx) = watch::channel(pod.clone());
        let (commands, cmd_rx) = mpsc::unbounded_channel();
        lock(&self.ctx.pods).insert(
            (namespace, name),
            PodEntry {
                process: PodProcess {
                    uid: uid.clone(),
                    ip: lease.ip(),
                    log_path: log_path.clone(),
                    pid: None,
                },
                commands: commands.clone(),
            },
        );
        let worker = Worker::new(WorkerInit {
            ctx: self.ctx.clone(),
            client: self.client.clone(),
            http: self.http.clone(),
            pod,
            pod_rx,
            cmd_rx,
            lease,
            log_path,
            dir,
        });
        let task = tokio::spawn(worker.run());
        self.workers.insert(
            uid,
            WorkerHandle {
                pod: pod_tx,
                commands,
                task,
            },
        );
    }

    /// Kills every process and waits (bounded) for the workers to end.
    async fn stop_all(&mut self) {
        for worker in self.workers.values() {
            let _ = worker.commands.send(Command::Stop);
        }
        let tasks: Vec<_> = self.workers.drain().map(|(_, w)| w.task).collect();
        let all = futures::future::join_all(tasks);
        if tokio::time::timeout(SHUTDOWN_TIMEOUT, all).await.is_err() {
            self.ctx
                .event("some pods did not stop in time; their processes die with the runtime");
        }
    }
}

fn pod_name(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}
