//! Starting the container: look the image up, fetch the pod's service-account
//! token, resolve the launch (arguments, environment) and spawn the process
//! in its own process group on the kubelet's thread.

use super::*;

impl Worker {
    pub(super) async fn try_start(&mut self) {
        self.next_start = None;
        let pod = self.pod.clone();
        let Some(container) = first_container(&pod) else {
            self.waiting(
                "InvalidSpec",
                "the pod has no containers".into(),
                CONFIG_RETRY,
            );
            return;
        };
        let image = container.image.clone().unwrap_or_default();
        let program = self
            .ctx
            .images
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .lookup(&image)
            .cloned();
        let Some(program) = program else {
            self.waiting(
                "ErrImageNeverPull",
                format!(
                    "image {image:?} is not in the test kubelet's image table \
                     (register it with Kubelet::add_image)"
                ),
                CONFIG_RETRY,
            );
            return;
        };
        if let Err(e) = std::fs::create_dir_all(&self.dir) {
            let message = format!("create {}: {e}", self.dir.display());
            self.waiting("RunContainerError", message, CONFIG_RETRY);
            return;
        }
        let automount = pod
            .spec
            .as_ref()
            .and_then(|s| s.automount_service_account_token)
            != Some(false);
        if automount && self.kubeconfig.is_none() {
            match self.write_service_account_kubeconfig().await {
                Ok(path) => self.kubeconfig = Some(path),
                Err(e) => {
                    self.waiting("CreateContainerConfigError", e, CONFIG_RETRY);
                    return;
                }
            }
        }
        let facts = PodFacts {
            pod: &pod,
            ip: self.ip(),
            host_ip: HOST_IP,
            node_name: &self.ctx.node_name,
            dir: &self.dir,
            kubeconfig: self.kubeconfig.as_deref(),
        };
        let launch = match launch::resolve(&self.client, &facts, container, &program).await {
            Ok(launch) => launch,
            Err(e) => {
                self.waiting("CreateContainerConfigError", e, CONFIG_RETRY);
                return;
            }
        };
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .and_then(|out| Ok((out.try_clone()?, out)));
        let (stdout, stderr) = match log {
            Ok(files) => files,
            Err(e) => {
                let message = format!("open {}: {e}", self.log_path.display());
                self.waiting("RunContainerError", message, CONFIG_RETRY);
                return;
            }
        };
        self.pod_log(&format!(
            "starting {} {:?} (restart count {})",
            launch.binary.display(),
            launch.args,
            self.restart_count + i32::from(self.started_once)
        ));
        let mut cmd = tokio::process::Command::new(&launch.binary);
        cmd.args(&launch.args)
            .env_clear()
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            // Its own process group, so signals reach whatever it forks.
            .process_group(0)
            .kill_on_drop(true);
        // Spawned from the kubelet's own thread, which lives as long as the
        // kubelet (for the shared one, as long as the test process).
        procs::die_with_parent(cmd.as_std_mut());
        match cmd.spawn() {
            Ok(child) => {
                let pid = child.id().unwrap_or(0);
                if self.started_once {
                    self.restart_count += 1;
                }
                self.started_once = true;
                let started = Instant::now();
                let started_at = now();
                self.running = Some(Running {
                    child,
                    pid,
                    started_at: started_at.clone(),
                    started,
                });
                self.state = State::Running { started_at };
                self.secret_sync_at = Some(started + SECRET_SYNC);
                let probe = |kind, spec: &Option<k8s_openapi::api::core::v1::Probe>| {
                    spec.as_ref().map(|spec| Prober::new(kind, spec, started))
                };
                self.startup = probe(ProbeKind::Startup, &container.startup_probe);
                self.liveness = probe(ProbeKind::Liveness, &container.liveness_probe);
                self.readiness = probe(ProbeKind::Readiness, &container.readiness_probe);
                self.ctx
                    .set_pid(&self.namespace, &self.name, &self.uid, Some(pid));
                self.event(format!(
                    "started pid {pid}: {} {:?} (restart count {})",
                    launch.binary.display(),
                    launch.args,
                    self.restart_count
                ));
            }
            Err(e) => {
                let message = format!("start {}: {e}", launch.binary.display());
                let retry = self.backoff;
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                self.waiting("RunContainerError", message, retry);
            }
        }
    }

    /// Brings the running container's secret volumes up to date with their
    /// Secrets; a failure is logged and tried again at the next sync.
    pub(super) async fn sync_secrets(&mut self) {
        self.secret_sync_at = Some(Instant::now() + SECRET_SYNC);
        let pod = self.pod.clone();
        let Some(container) = first_container(&pod) else {
            return;
        };
        let facts = PodFacts {
            pod: &pod,
            ip: self.ip(),
            host_ip: HOST_IP,
            node_name: &self.ctx.node_name,
            dir: &self.dir,
            kubeconfig: self.kubeconfig.as_deref(),
        };
        let synced = tokio::time::timeout(
            API_TIMEOUT,
            launch::sync_secret_volumes(&self.client, &facts, container),
        )
        .await;
        match synced {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.pod_log(&format!("secret volume sync: {e}")),
            Err(_) => self.pod_log("secret volume sync timed out"),
        }
    }

    /// Asks the API server for a token of the pod's service account, bound
    /// to the pod, and writes a kubeconfig with it: what a real kubelet
    /// mounts at /var/run/secrets/kubernetes.io/serviceaccount.
    pub(super) async fn write_service_account_kubeconfig(&self) -> Result<PathBuf, String> {
        let account = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &self.namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                // Empty: the API server's own audience.
                audiences: Vec::new(),
                expiration_seconds: Some(24 * 3600),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(self.name.clone()),
                    uid: Some(self.uid.clone()),
                }),
            },
            ..Default::default()
        };
        let response: TokenRequest = tokio::time::timeout(
            API_TIMEOUT,
            accounts.create_subresource("token", &account, &PostParams::default(), &request),
        )
        .await
        .map_err(|_| format!("token request for service account {account:?} timed out"))?
        .map_err(|e| format!("token request for service account {account:?}: {e}"))?;
        let token = response
            .status
            .map(|s| s.token)
            .ok_or_else(|| format!("the token request for {account:?} returned no token"))?;
        let path = self.dir.join("kubeconfig");
        let user = format!("system:serviceaccount:{}:{account}", self.namespace);
        crate::control_plane::write_token_kubeconfig(
            &path,
            &self.ctx.server,
            &self.ctx.ca_cert,
            &token,
            &user,
        )
        .map_err(|e| format!("{e:#}"))?;
        Ok(path)
    }
}
