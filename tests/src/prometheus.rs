//! A real Prometheus (the Debian package `prometheus`) on 127.0.0.1, for the
//! monitoring test and the playground: the caller gives the scrape
//! configuration and a directory it owns (config, data and log go there);
//! this starts the process tied to the caller (see [`crate::procs`]), waits
//! for it to be ready and queries its HTTP API.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::procs::{self, Process};
use crate::wait;

/// How long Prometheus may take to answer `/-/ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long it gets to exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A running Prometheus. Dropping it kills the process.
#[derive(Debug)]
pub struct Prometheus {
    process: Process,
    addr: SocketAddr,
    http: reqwest::Client,
}

/// Where the `prometheus` executable is, or a one-line explanation.
pub(crate) fn executable() -> Result<PathBuf> {
    procs::find_on_path("prometheus").context(
        "prometheus is not installed: install the Debian package `prometheus` \
         (scripts/test.sh does), or leave Prometheus out",
    )
}

impl Prometheus {
    /// Starts Prometheus with `config` (YAML) on 127.0.0.1:`port`, keeping
    /// its files in `dir` (created), and waits until it is ready.
    pub async fn start(dir: &Path, config: &str, port: u16) -> Result<Prometheus> {
        let binary = executable()?;
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config)
            .with_context(|| format!("write {}", config_path.display()))?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let args = vec![
            format!("--config.file={}", config_path.display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address={addr}"),
        ];
        let process = Process::spawn("prometheus", &binary, &args, &dir.join("prometheus.log"))?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .context("build an HTTP client")?;
        let mut prometheus = Prometheus {
            process,
            addr,
            http,
        };
        let ready_url = format!("http://{addr}/-/ready");
        let deadline = std::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = prometheus.process.exited() {
                bail!(
                    "prometheus exited during start-up ({status}); last lines of its log:\n{}",
                    prometheus.process.log_tail(10)
                );
            }
            let last = match prometheus.http.get(&ready_url).send().await {
                Ok(resp) if resp.status().is_success() => break,
                Ok(resp) => format!("/-/ready answered {}", resp.status()),
                Err(e) => format!("{e}"),
            };
            if std::time::Instant::now() >= deadline {
                bail!(
                    "prometheus was not ready within {READY_TIMEOUT:?} ({last}); last lines of its log:\n{}",
                    prometheus.process.log_tail(10)
                );
            }
            tokio::time::sleep(wait::POLL_INTERVAL).await;
        }
        Ok(prometheus)
    }

    /// Its address, `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Fails when the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        match self.process.exited() {
            Some(status) => bail!(
                "prometheus exited ({status}); last lines of {}:\n{}",
                self.process.log_path().display(),
                self.process.log_tail(10)
            ),
            None => Ok(()),
        }
    }

    /// The result vector of an instant query.
    pub async fn query(&self, promql: &str) -> Result<Vec<Value>> {
        let url = format!("http://{}/api/v1/query", self.addr);
        let body: Value = self
            .http
            .get(url)
            .query(&[("query", promql)])
            .send()
            .await?
            .json()
            .await?;
        ensure!(body["status"] == "success", "{body}");
        match body["data"]["result"].as_array() {
            Some(result) => Ok(result.clone()),
            None => bail!("no data.result in Prometheus' answer: {body}"),
        }
    }

    /// SIGTERM, then SIGKILL after a grace period.
    pub fn stop(mut self) {
        procs::stop_all(std::slice::from_mut(&mut self.process), STOP_GRACE);
    }
}
