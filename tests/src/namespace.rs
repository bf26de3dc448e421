//! One namespace per test on a shared control plane: created with a unique
//! name, deleted when the test ends (the namespace controller then deletes
//! everything in it, and the kubelet stops the pods' processes). When the
//! test fails, its drop prints what helps to understand why: the objects in
//! the namespace, the kubelet's notes and pod logs, and the control plane's logs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PostParams;
use kube::{Api, Client};

use crate::control_plane::{ControlPlane, LOG_TAIL_LINES};
use crate::kubelet::Kubelet;

/// How long to wait for the namespace's `default` ServiceAccount, without
/// which the API server rejects pods.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A namespace that lives as long as this value.
pub struct TestNamespace<'a> {
    name: String,
    cp: &'a ControlPlane,
    kubelet: Option<&'a Kubelet>,
}

impl<'a> TestNamespace<'a> {
    /// Creates `<prefix>-<unique suffix>` and waits until pods can be created in it.
    pub async fn create(cp: &'a ControlPlane, prefix: &str) -> Result<TestNamespace<'a>> {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        let suffix = crate::pki::random_hex(3)?;
        let name = format!("{prefix}-{n}-{suffix}");
        let client = cp.client().await?;
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([("distrocache.io/test".to_string(), prefix.to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        };
        namespaces
            .create(&PostParams::default(), &namespace)
            .await
            .with_context(|| format!("create namespace {name}"))?;
        let ns = TestNamespace {
            name,
            cp,
            kubelet: None,
        };
        ns.wait_for_default_service_account(&client).await?;
        Ok(ns)
    }

    /// Includes this kubelet's notes and pod logs in the failure report.
    pub fn with_kubelet(mut self, kubelet: &'a Kubelet) -> TestNamespace<'a> {
        self.kubelet = Some(kubelet);
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A new client for the caller's runtime.
    pub async fn client(&self) -> Result<Client> {
        self.cp.client().await
    }

    async fn wait_for_default_service_account(&self, client: &Client) -> Result<()> {
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &self.name);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if accounts.get_opt("default").await?.is_some() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "namespace {}: no `default` ServiceAccount after {READY_TIMEOUT:?} \
                     (is the controller manager running?)",
                    self.name
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Everything a failure report shows about this namespace.
    pub fn report(&self) -> String {
        let mut out = format!("===== namespace {} =====\n", self.name);
        match self.cp.kubectl([
            "get",
            "all,events",
            "-n",
            &self.name,
            "-o",
            "wide",
            "--request-timeout=10s",
        ]) {
            Ok(output) => {
                out.push_str(&String::from_utf8_lossy(&output.stdout));
                out.push_str(&String::from_utf8_lossy(&output.stderr));
            }
            Err(e) => out.push_str(&format!("(kubectl get failed: {e:#})\n")),
        }
        if let Some(kubelet) = self.kubelet {
            out.push_str(&kubelet.log_tails(&self.name, LOG_TAIL_LINES));
        }
        out.push_str(&self.cp.log_tails(LOG_TAIL_LINES));
        out
    }
}

impl Drop for TestNamespace<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.report());
        }
        // kubectl rather than the API: Drop cannot await, and the caller's
        // runtime may be shutting down. --wait=false: the namespace
        // controller finishes the deletion in the background.
        let result = self.cp.kubectl([
            "delete",
            "namespace",
            &self.name,
            "--wait=false",
            "--ignore-not-found",
            "--request-timeout=10s",
        ]);
        match result {
            Ok(output) if output.status.success() => {}
            Ok(output) => eprintln!(
                "delete namespace {}: {}",
                self.name,
                String::from_utf8_lossy(&output.stderr)
            ),
            Err(e) => eprintln!("delete namespace {}: {e:#}", self.name),
        }
    }
}
