//! Probes and lifecycle hooks: `httpGet` and `tcpSocket` against the pod's
//! loopback address, with the probe's period, initial delay, timeout and
//! success/failure thresholds. `exec` and `grpc` probes are not supported
//! (there is no container to exec into): a readiness probe of those kinds
//! fails, so the pod never turns Ready and the test notices; liveness and
//! startup probes of those kinds are skipped.
//!
//! Only 127.0.0.0/8 is ever contacted: a probe whose `host` names another
//! address fails without sending anything, and an HTTP probe never follows a
//! redirect (a 3xx is a success, as the kubelet counts it), so a `Location`
//! cannot send it anywhere else; nor does it go through a proxy.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Container, HTTPGetAction, LifecycleHandler, Probe, TCPSocketAction,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProbeKind {
    Startup,
    Liveness,
    Readiness,
}

/// One probe's schedule and its current verdict.
#[derive(Debug)]
pub(crate) struct Prober {
    spec: Probe,
    next_at: Instant,
    successes: i32,
    failures: i32,
    /// The verdict: for readiness "ready", for liveness "alive", for startup "started".
    pub passing: bool,
}

impl Prober {
    /// A prober for a container that started at `started`.
    pub(crate) fn new(kind: ProbeKind, spec: &Probe, started: Instant) -> Prober {
        let delay = spec.initial_delay_seconds.unwrap_or(0).max(0) as u64;
        Prober {
            spec: spec.clone(),
            next_at: started + Duration::from_secs(delay),
            successes: 0,
            failures: 0,
            // A container is presumed alive, and neither started nor ready,
            // until its probes say otherwise.
            passing: kind == ProbeKind::Liveness,
        }
    }

    pub(crate) fn next_at(&self) -> Instant {
        self.next_at
    }

    /// Whether the probe can run at all here.
    pub(crate) fn supported(&self) -> bool {
        self.spec.http_get.is_some() || self.spec.tcp_socket.is_some()
    }

    /// Runs the probe and updates the verdict. Returns whether the verdict
    /// changed, and the probe's own result.
    pub(crate) async fn probe(
        &mut self,
        http: &reqwest::Client,
        container: &Container,
        pod_ip: Ipv4Addr,
    ) -> (bool, Result<(), String>) {
        let timeout =
            Duration::from_secs(self.spec.timeout_seconds.unwrap_or(1).clamp(1, 10) as u64);
        let result = if let Some(action) = &self.spec.http_get {
            http_get(http, action, container, pod_ip, timeout).await
        } else if let Some(action) = &self.spec.tcp_socket {
            tcp_connect(action, container, pod_ip, timeout).await
        } else {
            Err("only httpGet and tcpSocket probes are supported by the test kubelet".into())
        };
        let period = self.spec.period_seconds.unwrap_or(10).max(1) as u64;
        self.next_at = Instant::now() + Duration::from_secs(period);
        let before = self.passing;
        if result.is_ok() {
            self.failures = 0;
            self.successes += 1;
            if self.successes >= self.spec.success_threshold.unwrap_or(1).max(1) {
                self.passing = true;
            }
        } else {
            self.successes = 0;
            self.failures += 1;
            if self.failures >= self.spec.failure_threshold.unwrap_or(3).max(1) {
                self.passing = false;
            }
        }
        (before != self.passing, result)
    }

    /// After how many consecutive failures a liveness or startup probe kills the container.
    pub(crate) fn failed_for_good(&self) -> bool {
        !self.passing && self.failures >= self.spec.failure_threshold.unwrap_or(3).max(1)
    }

    /// The probe's own termination grace period, if it sets one.
    pub(crate) fn termination_grace_period(&self) -> Option<i64> {
        self.spec.termination_grace_period_seconds
    }
}

/// Runs a lifecycle hook (preStop) within `timeout`. `sleep` hooks sleep.
pub(crate) async fn run_hook(
    http: &reqwest::Client,
    handler: &LifecycleHandler,
    container: &Container,
    pod_ip: Ipv4Addr,
    timeout: Duration,
) -> Result<(), String> {
    if let Some(action) = &handler.http_get {
        http_get(http, action, container, pod_ip, timeout).await
    } else if let Some(action) = &handler.tcp_socket {
        tcp_connect(action, container, pod_ip, timeout).await
    } else if let Some(sleep) = &handler.sleep {
        let wanted = Duration::from_secs(sleep.seconds.max(0) as u64);
        tokio::time::sleep(wanted.min(timeout)).await;
        Ok(())
    } else {
        Err("only httpGet, tcpSocket and sleep hooks are supported by the test kubelet".into())
    }
}

/// The client HTTP probes and hooks send with: no redirect followed, no
/// proxy. Built once, here rather than by the caller, so no caller can hand
/// in one that follows redirects; the `http` client the probe functions
/// take is the kubelet's shared one and is not used for HTTP probes.
fn probe_client() -> Result<&'static reqwest::Client, String> {
    static CLIENT: OnceLock<Result<reqwest::Client, String>> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            reqwest::Client::builder()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(|e| format!("cannot build the probe client: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

async fn http_get(
    _shared: &reqwest::Client,
    action: &HTTPGetAction,
    container: &Container,
    pod_ip: Ipv4Addr,
    timeout: Duration,
) -> Result<(), String> {
    if action
        .scheme
        .as_deref()
        .is_some_and(|s| !s.eq_ignore_ascii_case("HTTP"))
    {
        return Err("only HTTP probes are supported by the test kubelet".into());
    }
    let addr = target(action.host.as_deref(), &action.port, container, pod_ip)?;
    let path = action.path.as_deref().unwrap_or("/");
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    let http = probe_client()?;
    let mut request = http.get(format!("http://{addr}{path}")).timeout(timeout);
    for header in action.http_headers.iter().flatten() {
        request = request.header(header.name.as_str(), header.value.as_str());
    }
    let response = request
        .send()
        .await
        .map_err(|e| format!("GET {addr}{path}: {e}"))?;
    let status = response.status();
    // The kubelet's rule: 200 <= status < 400 passes; a redirect is not
    // followed, and counts as a success.
    if status.is_success() || status.is_redirection() {
        Ok(())
    } else {
        Err(format!("GET {addr}{path}: HTTP {status}"))
    }
}

async fn tcp_connect(
    action: &TCPSocketAction,
    container: &Container,
    pod_ip: Ipv4Addr,
    timeout: Duration,
) -> Result<(), String> {
    let addr = target(action.host.as_deref(), &action.port, container, pod_ip)?;
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("connect {addr}: {e}")),
        Err(_) => Err(format!("connect {addr}: timed out after {timeout:?}")),
    }
}

/// The address a probe or hook contacts: the pod IP (or `host` when it is a
/// loopback address) and the port, resolved by name from the container's ports.
fn target(
    host: Option<&str>,
    port: &IntOrString,
    container: &Container,
    pod_ip: Ipv4Addr,
) -> Result<SocketAddr, String> {
    let ip = match host {
        None | Some("") => pod_ip,
        Some(host) => match host.parse::<Ipv4Addr>() {
            Ok(ip) if ip.is_loopback() => ip,
            _ => {
                return Err(format!(
                    "probe host {host:?} is not a loopback address; the test kubelet only contacts 127.0.0.0/8"
                ));
            }
        },
    };
    if !ip.is_loopback() {
        return Err(format!("refusing to contact {ip}: not in 127.0.0.0/8"));
    }
    Ok(SocketAddr::from((ip, resolve_port(port, container)?)))
}

/// A numeric port, or a named one looked up in the container's ports.
pub(crate) fn resolve_port(port: &IntOrString, container: &Container) -> Result<u16, String> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("bad port {n}")),
        IntOrString::String(name) => {
            if let Ok(n) = name.parse::<u16>() {
                return Ok(n);
            }
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok())
                .ok_or_else(|| format!("the container has no port named {name:?}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ContainerPort;

    fn container() -> Container {
        Container {
            name: "c".into(),
            ports: Some(vec![ContainerPort {
                name: Some("http".into()),
                container_port: 8080,
                ..Default::default()
            }]),
            ..Default::default()
        }
    }

    #[test]
    fn ports_resolve_by_number_and_by_name() {
        let c = container();
        assert_eq!(resolve_port(&IntOrString::Int(9000), &c), Ok(9000));
        assert_eq!(
            resolve_port(&IntOrString::String("http".into()), &c),
            Ok(8080)
        );
        assert!(resolve_port(&IntOrString::String("grpc".into()), &c).is_err());
        assert!(resolve_port(&IntOrString::Int(70000), &c).is_err());
    }

    /// A probe answered with a redirect passes without following it: the
    /// redirect's target (here another loopback listener) gets nothing.
    #[tokio::test]
    async fn redirects_pass_and_are_not_followed() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let elsewhere = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let elsewhere_port = elsewhere.local_addr().unwrap().port();
        let redirector = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = redirector.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = redirector.accept().await {
                let mut buf = [0u8; 1024];
                let _ = conn.read(&mut buf).await;
                let answer = format!(
                    "HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{elsewhere_port}/x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                let _ = conn.write_all(answer.as_bytes()).await;
            }
        });
        let action = HTTPGetAction {
            path: Some("/healthz".into()),
            port: IntOrString::Int(i32::from(port)),
            ..Default::default()
        };
        let shared = reqwest::Client::new();
        let result = http_get(
            &shared,
            &action,
            &container(),
            Ipv4Addr::LOCALHOST,
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(result, Ok(()));
        let followed = tokio::time::timeout(Duration::from_millis(300), elsewhere.accept()).await;
        assert!(followed.is_err(), "the redirect was followed");
    }

    #[test]
    fn probes_only_target_loopback() {
        let c = container();
        let pod_ip = Ipv4Addr::new(127, 0, 0, 10);
        let port = IntOrString::Int(80);
        assert_eq!(
            target(None, &port, &c, pod_ip),
            Ok("127.0.0.10:80".parse().expect("an address"))
        );
        assert_eq!(
            target(Some("127.0.0.1"), &port, &c, pod_ip),
            Ok("127.0.0.1:80".parse().expect("an address"))
        );
        assert!(target(Some("10.0.0.1"), &port, &c, pod_ip).is_err());
        assert!(target(Some("example.com"), &port, &c, pod_ip).is_err());
        assert!(target(None, &port, &c, Ipv4Addr::new(10, 0, 0, 1)).is_err());
    }
}
