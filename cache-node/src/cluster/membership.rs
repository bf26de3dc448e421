//! Where a node learns its ring: a watched file (clusters outside Kubernetes,
//! and the multi-node tests) or a watched Kubernetes ConfigMap (DESIGN 3.2).
//! Either way each document is parsed, validated and handed to
//! [`Cluster::adopt`], which ignores anything not newer than what it holds;
//! a bad document is logged and the ring held is kept.

use std::path::PathBuf;
use std::sync::Arc;

use distrocache_membership::{CONFIGMAP_KEY, MAX_DOC_BYTES, MembershipDoc};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;

use super::Cluster;
use super::pace::UntilDone;

/// Where the membership comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A JSON file, re-read every poll interval.
    File(PathBuf),
    /// The ConfigMap `name` in `namespace`, key `ring.json`, watched through
    /// the Kubernetes API with the pod's service account.
    ConfigMap { namespace: String, name: String },
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(path) => write!(f, "file {}", path.display()),
            Source::ConfigMap { namespace, name } => write!(f, "configmap {namespace}/{name}"),
        }
    }
}

/// Feeds documents from `source` to the cluster until `stop` fires.
pub async fn run(cluster: Arc<Cluster>, source: Source, stop: watch::Receiver<bool>) {
    match source {
        Source::File(path) => watch_file(cluster, path, stop).await,
        Source::ConfigMap { namespace, name } => {
            watch_configmap(cluster, namespace, name, stop).await
        }
    }
}

/// Polls the file rather than using inotify: a ConfigMap or Secret mounted
/// as a volume changes through a symlink swap that inotify watches on the
/// file miss, editors replace files, and a poll of one small file a second
/// costs nothing.
async fn watch_file(cluster: Arc<Cluster>, path: PathBuf, mut stop: watch::Receiver<bool>) {
    let interval = cluster.settings().file_poll_interval;
    let mut last: Option<Vec<u8>> = None;
    loop {
        match read_bounded(&path).await {
            Ok(bytes) if last.as_ref() != Some(&bytes) => {
                offer(&cluster, &bytes, &path.display().to_string());
                last = Some(bytes);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the membership file")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn read_bounded(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    let len = tokio::fs::metadata(path).await?.len();
    if len > MAX_DOC_BYTES as u64 {
        return Err(std::io::Error::other(format!(
            "{len} bytes; the limit is {MAX_DOC_BYTES}"
        )));
    }
    tokio::fs::read(path).await
}

/// Watches one ConfigMap with kube's watcher, which re-lists and re-watches
/// on errors with backoff, so an API server restart or a dropped watch only
/// delays the next document.
async fn watch_configmap(
    cluster: Arc<Cluster>,
    namespace: String,
    name: String,
    mut stop: watch::Receiver<bool>,
) {
    // Without a client this node never learns its ring: never given up, at
    // the pace of the cluster's other work that is never given up.
    let mut pace = UntilDone::new();
    let client = loop {
        match kube::Client::try_default().await {
            Ok(client) => break client,
            Err(e) => {
                let pause = pace.next_pause();
                tracing::error!(error = %e, retry_in = ?pause, "cannot build a Kubernetes client; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    };
    let api: kube::Api<ConfigMap> = kube::Api::namespaced(client, &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher(api, config).default_backoff().boxed();
    let origin = format!("configmap {namespace}/{name}");
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            _ = stop.changed() => return,
        };
        match event {
            Some(Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm))) => {
                match cm.data.as_ref().and_then(|d| d.get(CONFIGMAP_KEY)) {
                    Some(json) => offer(&cluster, json.as_bytes(), &origin),
                    None => {
                        tracing::warn!(%origin, key = CONFIGMAP_KEY, "the ring ConfigMap has no membership key yet")
                    }
                }
            }
            Some(Ok(watcher::Event::Delete(_))) => {
                // Keep serving with the ring held: the operator recreates the
                // ConfigMap, and dropping the ring would strand every key.
                tracing::warn!(%origin, "the ring ConfigMap was deleted; keeping the ring held");
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::warn!(%origin, error = %e, "watching the ring ConfigMap failed; retrying")
            }
            None => return,
        }
    }
}

fn offer(cluster: &Cluster, bytes: &[u8], origin: &str) {
    match MembershipDoc::from_json(bytes) {
        Ok(doc) => {
            let epoch = doc.epoch;
            if !cluster.adopt(doc) {
                tracing::debug!(
                    origin,
                    epoch,
                    "membership document not newer than the ring held"
                );
            }
        }
        Err(e) => tracing::error!(origin, error = %e, "ignoring an invalid membership document"),
    }
}
