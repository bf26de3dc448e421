//! One playground session: the steps that start it, each printing a line with
//! what it did and how long it took; the check made while it runs; and the
//! stop that undoes the steps in reverse. Each piece is stored as soon as it
//! exists, so a start cut short (an error, Ctrl-C) is stopped just as fully.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use distrocache_tests::control_plane::ControlPlane;
use distrocache_tests::distrocache;
use distrocache_tests::kubelet::{Kubelet, KubeletConfig, PodIpRange, set_pod_ip_range};
use distrocache_tests::{ControlPlaneOptions, procs};

use crate::checks;
use crate::monitoring::Monitoring;
use crate::options::Options;
use crate::toolchain;
use crate::workdir::{Found, Workdir};

/// The Node the playground's kubelet registers.
pub const NODE_NAME: &str = "playground";
/// How many steps `start` prints.
const STEPS: usize = 6;

/// The running pieces; `None` until started, and again once stopped.
pub struct Playground {
    options: Options,
    workdir: Option<Workdir>,
    cp: Option<ControlPlane>,
    kubelet: Option<Kubelet>,
    monitoring: Option<Monitoring>,
}

fn step(n: usize, what: &str, detail: &str, since: Instant) {
    println!(
        "[{n}/{STEPS}] {what}: {detail} ({:.1}s)",
        since.elapsed().as_secs_f64()
    );
}

impl Playground {
    pub fn new(options: Options) -> Playground {
        Playground {
            options,
            workdir: None,
            cp: None,
            kubelet: None,
            monitoring: None,
        }
    }

    /// Runs every step; returns once the operator is ready.
    pub async fn start(&mut self) -> Result<()> {
        let t = Instant::now();
        let (workdir, found) = Workdir::claim(&self.options.dir())?;
        let dir = workdir.path().to_path_buf();
        self.workdir = Some(workdir);
        checks::pod_ports_free(self.options.pod_ips.first)?;
        set_pod_ip_range(self.options.pod_ips)?;
        let detail = match found {
            Found::Fresh => dir.display().to_string(),
            Found::Stale(pid) => format!(
                "{} (removed what a playground that did not stop cleanly, pid {pid}, left there)",
                dir.display()
            ),
        };
        step(1, "directory", &detail, t);

        let t = Instant::now();
        let built = toolchain::control_plane(self.options.no_build).await?;
        let (node_bin, operator_bin) = toolchain::workspace_binaries()?;
        step(
            2,
            "binaries",
            &format!(
                "control plane {}; {} and {}",
                built.summary,
                node_bin.display(),
                operator_bin.display()
            ),
            t,
        );

        let t = Instant::now();
        let cp = ControlPlane::start_with(ControlPlaneOptions {
            dir: Some(dir.join("control-plane")),
            ports: self.options.ports,
            binaries: Some(built.binaries),
        })
        .await?;
        let server = cp.server().to_string();
        let cp = self.cp.insert(cp);
        step(
            3,
            "control plane",
            &format!("etcd, kube-apiserver and kube-controller-manager, API at {server}"),
            t,
        );

        let t = Instant::now();
        let kubelet = Kubelet::start_with(KubeletConfig {
            node_name: NODE_NAME.into(),
            kubeconfig: cp.kubeconfig().to_path_buf(),
            server: server.clone(),
            ca_cert: cp.ca_cert().to_path_buf(),
            dir: dir.join("kubelet"),
            bind_pending_pods: true,
        })
        .await?;
        let kubelet = self.kubelet.insert(kubelet);
        distrocache::register_images(kubelet)?;
        step(
            4,
            "test kubelet",
            &format!(
                "node {NODE_NAME}, pods run as local processes on {}",
                self.options.pod_ips
            ),
            t,
        );

        let t = Instant::now();
        distrocache::install(cp)
            .await
            .context("install DistroCache from manifests/")?;
        step(
            5,
            "operator",
            "kubectl apply -f manifests/: the CRD is established and the operator's pod is Ready",
            t,
        );

        let t = Instant::now();
        if self.options.prometheus {
            let port = procs::free_ports(1, self.options.ports)?[0];
            let monitoring =
                Monitoring::start(&dir.join("prometheus"), port, cp.client().await?).await?;
            let addr = self.monitoring.insert(monitoring).prometheus.addr();
            step(
                6,
                "prometheus",
                &format!("http://{addr}, scraping every cache node and the operator"),
                t,
            );
        } else {
            step(6, "prometheus", "not started (--prometheus starts it)", t);
        }
        Ok(())
    }

    /// Fails when a control-plane component has exited. A Prometheus that
    /// exited is reported once and left out: the cache does not need it.
    pub fn check(&mut self) -> Result<()> {
        if let Some(cp) = &self.cp {
            cp.check_running()
                .context("the control plane stopped working")?;
        }
        if let Some(monitoring) = &mut self.monitoring
            && let Err(e) = monitoring.prometheus.check_running()
        {
            eprintln!("warning: {e:#}");
            if let Some(monitoring) = self.monitoring.take() {
                monitoring.stop();
            }
        }
        Ok(())
    }

    /// Stops whatever runs (pods, Prometheus, the control plane) and
    /// removes the directory. Blocking; bounded by the grace periods.
    pub fn stop(&mut self) -> Result<()> {
        let t = Instant::now();
        let mut stopped = Vec::new();
        if let Some(kubelet) = self.kubelet.take() {
            kubelet.shutdown();
            stopped.push("the pods");
        }
        if let Some(monitoring) = self.monitoring.take() {
            monitoring.stop();
            stopped.push("prometheus");
        }
        if let Some(cp) = self.cp.take() {
            cp.stop();
            stopped.push("the control plane");
        }
        if !stopped.is_empty() {
            println!(
                "stopped {} ({:.1}s)",
                stopped.join(", "),
                t.elapsed().as_secs_f64()
            );
        }
        if let Some(workdir) = self.workdir.take() {
            let path = workdir.path().display().to_string();
            workdir.remove()?;
            println!("removed {path}");
        }
        Ok(())
    }

    /// What the guide shows; `None` until the control plane runs.
    pub fn facts(&self) -> Option<Facts> {
        let cp = self.cp.as_ref()?;
        Some(Facts {
            dir: self.workdir.as_ref()?.path().to_path_buf(),
            kubeconfig: cp.kubeconfig().to_path_buf(),
            tools: cp.binaries().dir.clone(),
            pod_ips: self.options.pod_ips,
            prometheus: self.monitoring.as_ref().map(|m| m.prometheus.addr()),
        })
    }
}

/// Where things are, for the guide.
pub struct Facts {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    /// The directory holding the kubectl (and helm) built with the control plane.
    pub tools: PathBuf,
    pub pod_ips: PodIpRange,
    pub prometheus: Option<std::net::SocketAddr>,
}
