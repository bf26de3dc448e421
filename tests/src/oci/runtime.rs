//! Runs an image with a real OCI runtime, runc (Debian's `runc` package,
//! which the test command installs), the way a kubelet's runtime would run
//! a pod's container: the image's layers unpacked as a read-only root
//! filesystem, its entrypoint, and the pod's security context (user, no
//! capabilities, no privilege escalation). The bundle's config starts from
//! `runc spec` (the runtime's own defaults: mounts, masked paths, its own
//! PID, IPC, UTS and mount namespaces, a cgroup) and changes only what the
//! pod says.
//!
//! Why runc and not crun: Debian 12's crun (1.8.1) refuses to start any
//! container on a host whose cgroups are mounted in hybrid v1/v2 mode with a
//! controller on the v2 hierarchy ("cgroups in hybrid mode not supported,
//! drop all controllers from cgroupv2"), even with `--cgroup-manager=disabled`;
//! the machines the tests run on are such hosts. runc runs there and on
//! pure v2 hosts alike.
//!
//! Differences from a pod, on purpose: the container shares the host's
//! network namespace (like `hostNetwork: true`), so the test reaches it on
//! loopback without a CNI (it binds to 127.0.0.1 only); it inherits the
//! test's resource limits (raising one needs CAP_SYS_RESOURCE, which a
//! sandbox may not grant); and no seccomp profile is loaded (`runc spec`
//! has none; a kubelet would load the runtime's default one).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::{Container as PodContainer, PodSpec};
use serde_json::{Value, json};

use super::Image;
use crate::procs::{self, Process};

/// What the pod's security context makes of the container's process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecurityContext {
    pub uid: u32,
    pub gid: u32,
    pub read_only_root: bool,
    pub no_new_privileges: bool,
    /// Capabilities left after the pod's drops and adds.
    pub capabilities: Vec<String>,
}

/// The capabilities a runtime grants by default (containerd's and CRI-O's
/// list), before the container's `drop` and `add`.
const DEFAULT_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

impl SecurityContext {
    /// The security context a kubelet would apply to `container` of `pod`
    /// running `image`: the container's settings over the pod's, the
    /// image's user where neither names one. Refuses root when the pod
    /// says `runAsNonRoot`, as a kubelet does.
    pub fn of(pod: &PodSpec, container: &PodContainer, image: &Image) -> Result<SecurityContext> {
        let psc = pod.security_context.clone().unwrap_or_default();
        let csc = container.security_context.clone().unwrap_or_default();
        let (image_uid, image_gid) = image.user()?;
        let uid = csc
            .run_as_user
            .or(psc.run_as_user)
            .map_or(Ok(image_uid), u32::try_from)?;
        let gid = csc
            .run_as_group
            .or(psc.run_as_group)
            .map_or(Ok(image_gid), u32::try_from)?;
        if csc.run_as_non_root.or(psc.run_as_non_root) == Some(true) {
            ensure!(
                uid != 0,
                "runAsNonRoot, but the container would run as root"
            );
        }
        let caps = csc.capabilities.unwrap_or_default();
        let dropped: Vec<String> = caps.drop.unwrap_or_default();
        let mut capabilities: Vec<String> = if dropped.iter().any(|c| c == "ALL") {
            Vec::new()
        } else {
            DEFAULT_CAPABILITIES
                .iter()
                .map(|c| c.to_string())
                .filter(|c| !dropped.iter().any(|d| c.ends_with(d.as_str())))
                .collect()
        };
        capabilities.extend(
            caps.add
                .unwrap_or_default()
                .into_iter()
                .map(|c| format!("CAP_{c}")),
        );
        Ok(SecurityContext {
            uid,
            gid,
            read_only_root: csc.read_only_root_filesystem == Some(true),
            no_new_privileges: csc.allow_privilege_escalation == Some(false),
            capabilities,
        })
    }
}

/// runc, or how to install it.
pub fn runc() -> Result<PathBuf> {
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let path = dir.join("runc");
        if path.is_file() {
            return Ok(path);
        }
    }
    bail!("runc is not installed; `apt-get install runc` (bash scripts/test.sh does)")
}

/// A container run by runc; dropping it kills and deletes it.
pub struct Container {
    runc: PathBuf,
    state: tempfile::TempDir,
    _bundle: tempfile::TempDir,
    id: String,
    process: Process,
}

impl Container {
    /// Starts `image` with `args` after its entrypoint and `env` over its
    /// own, under `security`. runc's output and the container's go to the
    /// log.
    pub fn start(
        image: &Image,
        args: &[&str],
        env: &[(&str, &str)],
        security: &SecurityContext,
    ) -> Result<Container> {
        let runc = runc()?;
        let bundle = tempfile::tempdir()?;
        image.unpack(&bundle.path().join("rootfs"))?;
        let spec = procs::run_with_timeout(
            {
                let mut cmd = Command::new(&runc);
                cmd.arg("spec").current_dir(bundle.path());
                cmd
            },
            None,
            Duration::from_secs(30),
        )?;
        ensure!(
            spec.status.success(),
            "runc spec: {}",
            String::from_utf8_lossy(&spec.stderr)
        );
        let path = bundle.path().join("config.json");
        let mut config: Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        configure(&mut config, image, args, env, security);
        std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;

        let state = tempfile::tempdir()?;
        let id = format!(
            "distrocache-test-{}-{}",
            image.name,
            crate::pki::random_hex(4)?
        );
        let log = bundle.path().join("container.log");
        let process = Process::spawn(
            &id,
            &runc,
            &[
                "--root".into(),
                state.path().display().to_string(),
                "run".into(),
                "--bundle".into(),
                bundle.path().display().to_string(),
                id.clone(),
            ],
            &log,
        )?;
        Ok(Container {
            runc,
            state,
            _bundle: bundle,
            id,
            process,
        })
    }

    fn runc(&self, args: &[&str]) -> Result<std::process::Output> {
        let mut cmd = Command::new(&self.runc);
        cmd.arg("--root").arg(self.state.path()).args(args);
        procs::run_with_timeout(cmd, None, Duration::from_secs(30))
    }

    /// The pid of the container's process on this host, once it runs.
    pub fn pid(&self) -> Result<u32> {
        let out = self.runc(&["state", &self.id])?;
        ensure!(
            out.status.success(),
            "runc state {}: {}{}",
            self.id,
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        let state: Value = serde_json::from_slice(&out.stdout)?;
        ensure!(
            state["status"] == "running",
            "the container is {}",
            state["status"]
        );
        state["pid"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .context("runc state without a pid")
    }

    /// Waits for the container to exit (runc's exit status is the
    /// container's).
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.process.wait_timeout(timeout)
    }

    /// The exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.process.exited()
    }

    /// What runc and the container printed.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.process.log_path()).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        self.process.log_path()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.process.exited().is_none() {
            let _ = self.runc(&["kill", &self.id, "KILL"]);
            if self.process.wait_timeout(Duration::from_secs(10)).is_none() {
                self.process.kill();
            }
        }
        if let Ok(out) = self.runc(&["delete", "--force", &self.id])
            && !out.status.success()
        {
            let stderr = String::from_utf8_lossy(&out.stderr);
            if !stderr.contains("does not exist") {
                eprintln!("runc delete {}: {stderr}", self.id);
            }
        }
    }
}

/// The bundle's config: `runc spec`'s defaults with the image's entrypoint
/// and environment, the security context, and the host's network.
fn configure(
    config: &mut Value,
    image: &Image,
    args: &[&str],
    env: &[(&str, &str)],
    security: &SecurityContext,
) {
    let mut argv = image.entrypoint();
    argv.extend(args.iter().map(|a| a.to_string()));
    let mut environment: Vec<String> = image.config["config"]["Env"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    environment.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
    let process = &mut config["process"];
    process["terminal"] = json!(false);
    process["args"] = json!(argv);
    process["env"] = json!(environment);
    process["cwd"] = json!("/");
    process["user"] = json!({"uid": security.uid, "gid": security.gid});
    process["noNewPrivileges"] = json!(security.no_new_privileges);
    let caps = json!(security.capabilities);
    process["capabilities"] = json!({
        "bounding": caps, "effective": caps, "permitted": caps,
        "inheritable": [], "ambient": [],
    });
    // The test process's own limits, inherited (see the module docs).
    process["rlimits"] = json!([]);
    config["root"] = json!({"path": "rootfs", "readonly": security.read_only_root});
    config["hostname"] = json!(image.name);
    if let Some(namespaces) = config["linux"]["namespaces"].as_array_mut() {
        namespaces.retain(|ns| ns["type"] != "network");
    }
}
