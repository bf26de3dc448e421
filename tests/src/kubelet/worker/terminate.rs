//! Graceful deletion: preStop hook, SIGTERM, the grace period, SIGKILL, a
//! last status, then the delete with grace period 0 that removes the pod.

use super::*;

impl Worker {
    /// Graceful deletion: preStop hook, SIGTERM, the grace period, SIGKILL,
    /// a last status, then the delete with grace period 0 that removes the pod.
    pub(super) async fn terminate(&mut self) {
        let grace = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .unwrap_or_else(|| self.pod_grace_period())
            .max(0);
        let mut deadline = Instant::now() + Duration::from_secs(grace as u64);
        self.event(format!("deletion requested (grace period {grace}s)"));
        self.next_start = None;
        if let Some(pid) = self.running.as_ref().map(|r| r.pid) {
            let pod = self.pod.clone();
            let pre_stop = first_container(&pod)
                .and_then(|c| c.lifecycle.as_ref()?.pre_stop.as_ref().map(|h| (c, h)));
            if let Some((container, hook)) = pre_stop {
                let budget = deadline.saturating_duration_since(Instant::now());
                let result = probe::run_hook(&self.http, hook, container, self.ip(), budget).await;
                let outcome = match result {
                    Ok(()) => "preStop hook succeeded".to_string(),
                    Err(e) => format!("preStop hook failed: {e}"),
                };
                self.pod_log(&outcome);
                self.event(&outcome);
            }
            self.pod_log("sending SIGTERM");
            signal_group(pid, libc::SIGTERM);
            let mut killed = false;
            while self.running.is_some() {
                tokio::select! {
                    status = wait_child(&mut self.running) => self.on_exit(status),
                    _ = tokio::time::sleep_until(deadline) => {
                        if killed {
                            self.event("the process survived SIGKILL; giving up on it");
                            self.running = None;
                        } else {
                            self.event(format!("still running {grace}s after SIGTERM: SIGKILL"));
                            self.pod_log("grace period over: sending SIGKILL");
                            signal_group(pid, libc::SIGKILL);
                            killed = true;
                            deadline = Instant::now() + Duration::from_secs(10);
                        }
                    }
                    command = self.cmd_rx.recv() => match command {
                        Some(Command::Crash(reply)) => {
                            let _ = reply.send(self.crash());
                        }
                        Some(Command::Stop) | None => signal_group(pid, libc::SIGKILL),
                    },
                    changed = self.pod_rx.changed() => match changed {
                        Ok(()) => {
                            self.pod = self.pod_rx.borrow_and_update().clone();
                            // A second delete may shorten the grace period (e.g. --force).
                            if let Some(new) = self.pod.metadata.deletion_grace_period_seconds {
                                let new = Instant::now() + Duration::from_secs(new.max(0) as u64);
                                if !killed && new < deadline {
                                    deadline = new;
                                }
                            }
                        }
                        Err(_) => signal_group(pid, libc::SIGKILL),
                    },
                }
            }
            let exit_code = match &self.state {
                State::Terminated(t) => t.exit_code,
                _ => 137,
            };
            self.final_phase = Some(if exit_code == 0 {
                "Succeeded"
            } else {
                "Failed"
            });
            self.status_retry_at = None;
            self.write_status().await;
        }
        // Forgotten before the API forgets it, so whoever sees the pod gone
        // from the API no longer finds its process listed here.
        self.ctx.forget_pod(&self.namespace, &self.name, &self.uid);
        self.delete_now().await;
    }

    /// Finishes the deletion with grace period 0; the uid precondition keeps
    /// it from deleting a new pod that took the same name.
    pub(super) async fn delete_now(&self) {
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..Default::default()
        };
        for _ in 0..10 {
            match tokio::time::timeout(API_TIMEOUT, self.api().delete(&self.name, &params)).await {
                Ok(Ok(_)) => {
                    self.event("deleted");
                    return;
                }
                Ok(Err(kube::Error::Api(e))) if e.code == 404 || e.code == 409 => return,
                Ok(Err(e)) => self.event(format!("delete failed, retrying: {e}")),
                Err(_) => self.event("delete timed out, retrying"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}
