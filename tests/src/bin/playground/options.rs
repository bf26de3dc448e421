//! The playground's command line: where it keeps its files, which loopback
//! ports and addresses it uses, and whether it starts Prometheus. Every
//! option is also an environment variable (`DISTROCACHE_PLAYGROUND_*`).

use std::path::PathBuf;

use clap::Parser;
use distrocache_tests::kubelet::PodIpRange;
use distrocache_tests::procs::PortRange;

/// The pod addresses used unless told otherwise: away from the tests'
/// (127.0.0.10 upwards), so the playground and a test run can share a machine.
pub const DEFAULT_POD_IPS: &str = "127.0.100.10-127.0.100.254";

/// Try the DistroCache operator with kubectl, without a cluster: starts etcd,
/// kube-apiserver, kube-controller-manager and a test kubelet (pods run as
/// local processes on loopback addresses), installs the CRD and the operator
/// from manifests/, and prints what to type next. Ctrl-C stops everything
/// and removes its files.
#[derive(Debug, Clone, Parser)]
#[command(name = "playground", version)]
pub struct Options {
    /// Where the playground keeps its files (etcd data, credentials, the
    /// kubeconfig, logs); removed when it stops. Default:
    /// $TMPDIR/distrocache-playground.
    #[arg(long, env = "DISTROCACHE_PLAYGROUND_DIR", value_name = "DIR")]
    pub dir: Option<PathBuf>,

    /// The ports on 127.0.0.1 for etcd, kube-apiserver and Prometheus, as
    /// FIRST-LAST; the lowest free ones are taken. Default: any free ports.
    #[arg(long, env = "DISTROCACHE_PLAYGROUND_PORTS", value_name = "FIRST-LAST")]
    pub ports: Option<PortRange>,

    /// The loopback addresses pods get, one each, as FIRST-LAST inside
    /// 127.0.0.0/8. Cache nodes listen on ports 8080 and 8081 of theirs.
    #[arg(
        long,
        env = "DISTROCACHE_PLAYGROUND_POD_IPS",
        value_name = "FIRST-LAST",
        default_value = DEFAULT_POD_IPS
    )]
    pub pod_ips: PodIpRange,

    /// Also start Prometheus (the Debian package `prometheus`), scraping every
    /// cache node and the operator (their targets follow the pods).
    #[arg(long, env = "DISTROCACHE_PLAYGROUND_PROMETHEUS")]
    pub prometheus: bool,

    /// Use the control plane's binaries as they are (DISTROCACHE_K8S_BIN or
    /// the cache) instead of running scripts/build-control-plane.sh first.
    #[arg(long, env = "DISTROCACHE_PLAYGROUND_NO_BUILD")]
    pub no_build: bool,
}

impl Options {
    /// The directory, with its default filled in.
    pub fn dir(&self) -> PathBuf {
        self.dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("distrocache-playground"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent_and_parses() {
        Options::command().debug_assert();
        let o = Options::try_parse_from([
            "playground",
            "--dir",
            "/tmp/x",
            "--ports",
            "30000-30009",
            "--pod-ips",
            "127.0.5.10-127.0.5.20",
            "--prometheus",
        ])
        .expect("valid options");
        assert_eq!(o.dir(), PathBuf::from("/tmp/x"));
        assert_eq!(
            o.ports.map(|p| p.to_string()).as_deref(),
            Some("30000-30009")
        );
        assert_eq!(o.pod_ips.to_string(), "127.0.5.10-127.0.5.20");
        assert!(o.prometheus && !o.no_build);
        let defaults = Options::try_parse_from(["playground"]).expect("no options");
        assert_eq!(defaults.pod_ips.to_string(), DEFAULT_POD_IPS);
    }

    #[test]
    fn addresses_outside_loopback_are_refused() {
        let e = Options::try_parse_from(["playground", "--pod-ips", "10.0.0.1-10.0.0.5"])
            .expect_err("not loopback");
        assert!(e.to_string().contains("loopback"), "{e}");
    }
}
