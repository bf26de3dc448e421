//! A real Kubernetes control plane for tests (DESIGN 6): etcd, kube-apiserver
//! and kube-controller-manager as local processes on free 127.0.0.1 ports,
//! with token authentication, RBAC, a service-account key and a kubeconfig.
//!
//! Two ways to have one:
//! - [`ControlPlane::start`]: owned; dropping it stops every process and
//!   removes its files. [`ControlPlane::start_with`] picks its directory and
//!   port range (the playground does).
//! - [`ControlPlane::shared`]: one per test binary, started by the first test
//!   that asks and shared by all (each test in its own [`crate::TestNamespace`]).
//!   It lives in a `static`, so it is never dropped: its processes die with
//!   the test process (PDEATHSIG, see [`crate::procs`]) and its files are
//!   removed at exit, or by the next run if the process was killed.
//!
//! A `kube::Client` is bound to the Tokio runtime it was first used on, and
//! each `#[tokio::test]` has its own runtime, so [`ControlPlane::client`]
//! builds a fresh client on every call instead of handing out a shared one.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::{Api, Client};

mod components;
mod kubeconfig;

pub use kubeconfig::client_from_kubeconfig;
pub(crate) use kubeconfig::{write_kubeconfig, write_token_kubeconfig};

use crate::binaries::Binaries;
use crate::pki::Pki;
use crate::procs::{self, PortRange, Process};

/// How long the control plane may take to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the processes get to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(15);
/// How long one kubectl or helm invocation may take.
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);
/// How many log lines of each component are printed when something fails.
pub(crate) const LOG_TAIL_LINES: usize = 40;

/// The ports the control plane listens on, all on 127.0.0.1.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub etcd_client: u16,
    pub etcd_peer: u16,
    pub apiserver: u16,
}

/// How to start an owned control plane; the default is what tests use.
#[derive(Debug, Clone, Default)]
pub struct ControlPlaneOptions {
    /// Where its files go: created if missing, refused if not empty, and
    /// removed when the control plane is dropped. Default: a new directory
    /// under `$TMPDIR/distrocache-test-cp`.
    pub dir: Option<PathBuf>,
    /// The range its ports (etcd client and peer, API server) come from, on
    /// 127.0.0.1. Default: any free ports.
    pub ports: Option<PortRange>,
    /// The binaries to run. Default: [`Binaries::locate`].
    pub binaries: Option<Binaries>,
}

/// How long the start took.
#[derive(Debug, Clone, Copy)]
pub struct StartupTimings {
    /// From the first process spawned to the API server's `/readyz` answering 200.
    pub readyz: Duration,
    /// From the first process spawned to the controllers working (the
    /// `default` ServiceAccount exists in the `default` namespace).
    pub ready: Duration,
}

/// A running control plane. See the module docs.
pub struct ControlPlane {
    dir: PathBuf,
    binaries: Binaries,
    pki: Pki,
    kubeconfig: PathBuf,
    server: String,
    ports: Ports,
    processes: Mutex<Vec<Process>>,
    timings: StartupTimings,
    /// Removes `dir` when the control plane is dropped (after the processes
    /// are stopped: fields drop after `Drop::drop` runs).
    _dir: RemoveOnDrop,
}

/// Removes a directory tree when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("control plane: remove {}: {e}", self.0.display());
        }
    }
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("server", &self.server)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

static SHARED: tokio::sync::OnceCell<Result<ControlPlane, String>> =
    tokio::sync::OnceCell::const_new();

impl ControlPlane {
    /// Starts an owned control plane and waits until it is ready. Dropping it
    /// stops every process.
    pub async fn start() -> Result<ControlPlane> {
        Self::start_with(ControlPlaneOptions::default()).await
    }

    /// Starts an owned control plane as `options` say and waits until it is
    /// ready. Dropping it stops every process and removes its directory.
    pub async fn start_with(options: ControlPlaneOptions) -> Result<ControlPlane> {
        // A free port can be taken by someone else between our probe and the
        // component's bind; such a start is retried with new ports.
        let mut attempt = 1;
        loop {
            match Self::start_once(&options).await {
                Ok(cp) => return Ok(cp),
                Err(e) if attempt < 3 && format!("{e:#}").contains("address already in use") => {
                    eprintln!("control plane: a port was taken, retrying: {e:#}");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The control plane shared by every test of this test binary, started by
    /// the first caller. If it failed to start, every caller gets that error.
    pub async fn shared() -> Result<&'static ControlPlane> {
        let result = SHARED
            .get_or_init(|| async {
                let result = Self::start().await;
                if let Ok(cp) = &result {
                    // The static is never dropped: stop the processes and
                    // remove the files when the test process exits.
                    // SAFETY: registering a plain extern "C" function.
                    unsafe {
                        libc::atexit(cleanup_shared_at_exit);
                    }
                    eprintln!(
                        "shared control plane ready in {:?} (readyz {:?}), files in {}",
                        cp.timings.ready,
                        cp.timings.readyz,
                        cp.dir.display()
                    );
                }
                result.map_err(|e| format!("{e:#}"))
            })
            .await;
        result
            .as_ref()
            .map_err(|e| anyhow!("the shared control plane did not start: {e}"))
    }

    async fn start_once(options: &ControlPlaneOptions) -> Result<ControlPlane> {
        let binaries = match &options.binaries {
            Some(binaries) => binaries.clone(),
            None => Binaries::locate()?,
        };
        // Created first, so whatever fails below leaves no directory behind.
        let guard = match &options.dir {
            Some(dir) => {
                create_empty_dir(dir)?;
                RemoveOnDrop(dir.clone())
            }
            None => {
                let root = std::env::temp_dir().join("distrocache-test-cp");
                std::fs::create_dir_all(&root)
                    .with_context(|| format!("create {}", root.display()))?;
                remove_stale_dirs(&root);
                let tempdir = tempfile::Builder::new()
                    .prefix(&format!("cp-{}-", std::process::id()))
                    .tempdir_in(&root)
                    .context("create the control plane's directory")?;
                RemoveOnDrop(tempdir.keep())
            }
        };
        let dir = guard.0.clone();

        let pki = Pki::write(&dir.join("pki"))?;
        let tokens = dir.join("tokens.csv");
        std::fs::write(
            &tokens,
            format!("{},admin,admin,\"system:masters\"\n", pki.admin_token),
        )
        .context("write the token file")?;

        let ports = match procs::free_ports(3, options.ports)?[..] {
            [etcd_client, etcd_peer, apiserver] => Ports {
                etcd_client,
                etcd_peer,
                apiserver,
            },
            _ => bail!("free_ports returned the wrong number of ports"),
        };
        let server = format!("https://127.0.0.1:{}", ports.apiserver);
        let kubeconfig = dir.join("kubeconfig");
        write_kubeconfig(&kubeconfig, &server, &pki)?;

        let mut cp = ControlPlane {
            dir,
            binaries,
            pki,
            kubeconfig,
            server,
            ports,
            processes: Mutex::new(Vec::new()),
            timings: StartupTimings {
                readyz: Duration::ZERO,
                ready: Duration::ZERO,
            },
            _dir: guard,
        };
        let started = Instant::now();
        // All three start at once: the API server retries etcd and the
        // controller manager waits for the API server, so nothing is gained
        // by starting them one after another.
        cp.spawn_components(&tokens)?;
        match cp.wait_ready(started).await {
            Ok(timings) => {
                cp.timings = timings;
                Ok(cp)
            }
            Err(e) => {
                // The cause first (one line a newcomer can act on), the
                // components' logs after it.
                let logs = cp.log_tails(LOG_TAIL_LINES);
                Err(anyhow!(
                    "the control plane did not start: {e:#}\nits components' logs:\n{logs}"
                ))
            }
        }
    }

    fn spawn_components(&self, tokens: &Path) -> Result<()> {
        let layout = components::Layout {
            dir: &self.dir,
            ports: self.ports,
            pki: &self.pki,
            tokens,
            kubeconfig: &self.kubeconfig,
        };
        let components = [
            ("etcd", &self.binaries.etcd, components::etcd(&layout)),
            (
                "kube-apiserver",
                &self.binaries.kube_apiserver,
                components::apiserver(&layout),
            ),
            (
                "kube-controller-manager",
                &self.binaries.kube_controller_manager,
                components::controller_manager(&layout),
            ),
        ];
        let mut processes = self.processes();
        for (name, binary, args) in components {
            let log = self.dir.join(format!("{name}.log"));
            processes.push(Process::spawn(name, binary, &args, &log)?);
        }
        Ok(())
    }

    /// Polls until `/readyz` answers 200 and the controllers work, failing
    /// early when a component exits.
    async fn wait_ready(&self, started: Instant) -> Result<StartupTimings> {
        let deadline = started + START_TIMEOUT;
        let client = self.client().await?;
        let mut readyz = None;
        let mut last_error = String::from("not polled yet");
        loop {
            if let Some(exited) = self.first_exited() {
                bail!("{exited}");
            }
            if readyz.is_none() {
                let request = http::Request::get("/readyz").body(Vec::new())?;
                match tokio::time::timeout(Duration::from_secs(2), client.request_text(request))
                    .await
                {
                    Ok(Ok(body)) if body.trim() == "ok" => readyz = Some(started.elapsed()),
                    Ok(Ok(body)) => last_error = format!("/readyz answered {body:?}"),
                    Ok(Err(e)) => last_error = format!("/readyz: {e}"),
                    Err(_) => last_error = "/readyz timed out".into(),
                }
            }
            if let Some(readyz) = readyz {
                let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
                match tokio::time::timeout(Duration::from_secs(2), accounts.get_opt("default"))
                    .await
                {
                    Ok(Ok(Some(_))) => {
                        return Ok(StartupTimings {
                            readyz,
                            ready: started.elapsed(),
                        });
                    }
                    Ok(Ok(None)) => {
                        last_error = "the controller manager has not created the `default` \
                                      ServiceAccount yet"
                            .into()
                    }
                    Ok(Err(e)) => last_error = format!("get ServiceAccount default/default: {e}"),
                    Err(_) => last_error = "get ServiceAccount default/default timed out".into(),
                }
            }
            if Instant::now() >= deadline {
                bail!("not ready after {START_TIMEOUT:?}: {last_error}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Fails naming the first component that has exited, if one has.
    pub fn check_running(&self) -> Result<()> {
        match self.first_exited() {
            Some(exited) => bail!("{exited}"),
            None => Ok(()),
        }
    }

    /// A description of the first component that has exited, if any.
    fn first_exited(&self) -> Option<String> {
        let mut processes = self.processes();
        processes.iter_mut().find_map(|p| {
            p.exited()
                .map(|status| format!("{} exited early ({status})", p.name()))
        })
    }

    fn processes(&self) -> MutexGuard<'_, Vec<Process>> {
        // A panic while holding the lock leaves the list intact.
        self.processes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A new client for the admin user, for the caller's Tokio runtime.
    pub async fn client(&self) -> Result<Client> {
        client_from_kubeconfig(&self.kubeconfig).await
    }

    /// The admin kubeconfig (token auth, the test CA).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The API server's URL, `https://127.0.0.1:<port>`.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The CA certificate that signed the API server's serving certificate.
    pub fn ca_cert(&self) -> &Path {
        &self.pki.ca_cert
    }

    /// The directory holding the logs, credentials and etcd data.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn binaries(&self) -> &Binaries {
        &self.binaries
    }

    pub fn ports(&self) -> Ports {
        self.ports
    }

    pub fn timings(&self) -> StartupTimings {
        self.timings
    }

    /// `(component name, pid)` of each process.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.processes()
            .iter()
            .map(|p| (p.name().to_string(), p.pid()))
            .collect()
    }

    /// Runs kubectl against this control plane (bounded in time).
    pub fn kubectl<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        procs::run_with_timeout(self.kubectl_command(args), None, TOOL_TIMEOUT)
    }

    /// Runs kubectl with `stdin` as its standard input (for `apply -f -`).
    pub fn kubectl_with_stdin<I, S>(&self, args: I, stdin: &str) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        procs::run_with_timeout(self.kubectl_command(args), Some(stdin), TOOL_TIMEOUT)
    }

    fn kubectl_command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(&self.binaries.kubectl);
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            // Keeps kubectl's discovery cache out of the user's ~/.kube.
            .arg(format!(
                "--cache-dir={}",
                self.dir.join("kubectl-cache").display()
            ))
            .args(args)
            .env_remove("KUBECONFIG");
        cmd
    }

    /// Runs helm against this control plane (KUBECONFIG set, helm's own
    /// cache, config and data kept in the control plane's directory).
    pub fn helm<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let helm_home = self.dir.join("helm");
        let mut cmd = Command::new(&self.binaries.helm);
        cmd.args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", helm_home.join("cache"))
            .env("HELM_CONFIG_HOME", helm_home.join("config"))
            .env("HELM_DATA_HOME", helm_home.join("data"));
        procs::run_with_timeout(cmd, None, TOOL_TIMEOUT)
    }

    /// The last `lines` lines of each component's log.
    pub fn log_tails(&self, lines: usize) -> String {
        let processes = self.processes();
        let mut out = String::new();
        for p in processes.iter() {
            out.push_str(&format!(
                "----- {} (pid {}, {}), last {lines} lines -----\n{}\n",
                p.name(),
                p.pid(),
                p.log_path().display(),
                p.log_tail(lines)
            ));
        }
        out
    }

    /// A guard that prints the components' log tails if the current thread
    /// panics (a failing test) while it is alive.
    pub fn logs_on_panic(&self) -> LogsOnPanic<'_> {
        LogsOnPanic { cp: self }
    }

    /// Stops every process (SIGTERM, then SIGKILL after a grace period) and
    /// returns how long that took. The directory is removed when `self` drops.
    pub fn stop(self) -> Duration {
        let started = Instant::now();
        self.stop_processes();
        started.elapsed()
    }

    fn stop_processes(&self) {
        let mut processes = self.processes();
        // In reverse order of dependency: the API server's shutdown hangs
        // when etcd is already gone, so etcd goes last.
        processes.reverse();
        let mut killed = Vec::new();
        for p in processes.iter_mut() {
            killed.extend(procs::stop_all(std::slice::from_mut(p), STOP_GRACE));
        }
        processes.reverse();
        if !killed.is_empty() {
            eprintln!(
                "control plane: {} did not stop within {STOP_GRACE:?} of SIGTERM and was killed",
                killed.join(", ")
            );
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "control plane at {} (files in {}):\n{}",
                self.server,
                self.dir.display(),
                self.log_tails(LOG_TAIL_LINES)
            );
        }
        self.stop_processes();
    }
}

/// Prints the control plane's logs when dropped during a panic.
#[must_use = "the logs are printed when the guard is dropped"]
pub struct LogsOnPanic<'a> {
    cp: &'a ControlPlane,
}

impl Drop for LogsOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "control plane at {} (files in {}):\n{}",
                self.cp.server,
                self.cp.dir.display(),
                self.cp.log_tails(LOG_TAIL_LINES)
            );
        }
    }
}

/// Creates `dir`, or accepts it if it exists and is empty.
fn create_empty_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut entries = std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))?;
    if entries.next().is_some() {
        bail!(
            "{} is not empty; a control plane starts in a new or empty directory",
            dir.display()
        );
    }
    Ok(())
}

/// Removes the directories of earlier test processes that are gone (a test
/// binary killed before its exit handler ran leaves its etcd data behind).
fn remove_stale_dirs(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let pid = name
            .strip_prefix("cp-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = pid
            && pid != std::process::id()
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

extern "C" fn cleanup_shared_at_exit() {
    // Never unwind into C.
    let _ = std::panic::catch_unwind(|| {
        if let Some(Ok(cp)) = SHARED.get() {
            if let Ok(mut processes) = cp.processes.try_lock() {
                for p in processes.iter_mut() {
                    p.kill();
                }
            }
            let _ = std::fs::remove_dir_all(&cp.dir);
        }
    });
}
