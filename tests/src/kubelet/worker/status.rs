//! The pod status the kubelet reports: phase, IPs, container states and
//! restart counts, and the conditions, written through the status subresource
//! only when something changed.

use super::*;

impl Worker {
    pub(super) fn container_id(&self) -> String {
        let short = self.uid.get(..8).unwrap_or(&self.uid);
        format!("test-kubelet://{short}-{}", self.restart_count)
    }

    pub(super) fn ready(&self) -> bool {
        self.running.is_some()
            && self.startup.as_ref().is_none_or(|p| p.passing)
            && self.readiness.as_ref().is_none_or(|p| p.passing)
    }

    /// A condition whose lastTransitionTime changes only when its status does.
    pub(super) fn condition(
        &mut self,
        type_: &'static str,
        status: bool,
        reason: Option<&str>,
    ) -> PodCondition {
        let since = match self
            .condition_times
            .iter_mut()
            .find(|(t, _, _)| *t == type_)
        {
            Some((_, old, since)) if *old == status => since.clone(),
            Some(entry) => {
                entry.1 = status;
                entry.2 = now();
                entry.2.clone()
            }
            None => {
                let since = now();
                self.condition_times.push((type_, status, since.clone()));
                since
            }
        };
        PodCondition {
            type_: type_.into(),
            status: if status { "True" } else { "False" }.into(),
            last_transition_time: Some(since),
            reason: reason.map(Into::into),
            ..Default::default()
        }
    }

    pub(super) fn build_status(&mut self) -> PodStatus {
        let pod = self.pod.clone();
        let ready = self.ready();
        let containers = pod
            .spec
            .as_ref()
            .map(|s| s.containers.as_slice())
            .unwrap_or_default();
        let mut statuses = Vec::new();
        for (i, container) in containers.iter().enumerate() {
            let image = container.image.clone().unwrap_or_default();
            if i > 0 {
                statuses.push(ContainerStatus {
                    name: container.name.clone(),
                    image,
                    image_id: String::new(),
                    ready: false,
                    restart_count: 0,
                    started: Some(false),
                    state: Some(ContainerState {
                        waiting: Some(ContainerStateWaiting {
                            reason: Some("NotSupported".into()),
                            message: Some(
                                "the test kubelet runs only a pod's first container".into(),
                            ),
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                });
                continue;
            }
            let state = match &self.state {
                State::Waiting { reason, message } => ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some(reason.clone()),
                        message: (!message.is_empty()).then(|| message.clone()),
                    }),
                    ..Default::default()
                },
                State::Running { started_at } => ContainerState {
                    running: Some(ContainerStateRunning {
                        started_at: Some(started_at.clone()),
                    }),
                    ..Default::default()
                },
                State::Terminated(t) => ContainerState {
                    terminated: Some(t.clone()),
                    ..Default::default()
                },
            };
            let binary = self
                .ctx
                .images
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .lookup(&image)
                .map(|p| format!("test-kubelet://{}", p.binary.display()))
                .unwrap_or_default();
            statuses.push(ContainerStatus {
                name: container.name.clone(),
                image,
                image_id: binary,
                container_id: self.running.is_some().then(|| self.container_id()),
                ready,
                restart_count: self.restart_count,
                started: Some(
                    self.running.is_some() && self.startup.as_ref().is_none_or(|p| p.passing),
                ),
                state: Some(state),
                last_state: self.last_state.clone().map(|t| ContainerState {
                    terminated: Some(t),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        let all_ready = ready && containers.len() == 1;
        let not_ready = (!all_ready).then_some("ContainersNotReady");
        let phase = match self.final_phase {
            Some(phase) => phase,
            None if self.started_once => "Running",
            None => "Pending",
        };
        let conditions = vec![
            self.condition("PodReadyToStartContainers", true, None),
            self.condition("Initialized", true, None),
            self.condition("Ready", all_ready, not_ready),
            self.condition("ContainersReady", all_ready, not_ready),
            self.condition("PodScheduled", true, None),
        ];
        let ip = self.ip().to_string();
        PodStatus {
            phase: Some(phase.into()),
            conditions: Some(conditions),
            host_ip: Some(HOST_IP.to_string()),
            host_ips: Some(vec![HostIP {
                ip: HOST_IP.to_string(),
            }]),
            pod_ip: Some(ip.clone()),
            pod_ips: Some(vec![PodIP { ip }]),
            start_time: Some(self.start_time.clone()),
            container_statuses: Some(statuses),
            ..Default::default()
        }
    }

    /// Writes the status through the status subresource when it changed.
    pub(super) async fn write_status(&mut self) {
        if self.status_retry_at.is_some() {
            return;
        }
        let status = match serde_json::to_value(self.build_status()) {
            Ok(status) => status,
            Err(e) => {
                self.event(format!("cannot serialise the status: {e}"));
                return;
            }
        };
        if self.last_written.as_ref() == Some(&status) {
            return;
        }
        let patch = Patch::Merge(serde_json::json!({ "status": status }));
        let result = tokio::time::timeout(
            API_TIMEOUT,
            self.api()
                .patch_status(&self.name, &PatchParams::default(), &patch),
        )
        .await;
        match result {
            Ok(Ok(_)) => self.last_written = Some(status),
            // The pod is gone; the kubelet will stop this task.
            Ok(Err(kube::Error::Api(e))) if e.code == 404 => self.last_written = Some(status),
            Ok(Err(e)) => {
                self.event(format!("status update failed, retrying: {e}"));
                self.status_retry_at = Some(Instant::now() + Duration::from_millis(500));
            }
            Err(_) => {
                self.event("status update timed out, retrying");
                self.status_retry_at = Some(Instant::now() + Duration::from_millis(500));
            }
        }
    }
}
