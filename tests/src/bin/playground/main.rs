//! The playground: DistroCache's operator on a local Kubernetes control plane,
//! to try with kubectl without a cluster (issue 19). It reuses the test
//! harness as it is: the control plane built from Go modules (etcd,
//! kube-apiserver, kube-controller-manager), the test kubelet that runs pods
//! as local processes on loopback addresses, and `manifests/` applied with
//! kubectl. It runs in the foreground, prints a line per step, then what to
//! type next, and on Ctrl-C or SIGTERM stops every process it started and
//! removes its directory.
//!
//! The operator runs as a pod, from `manifests/` exactly as a user applies
//! them (the test kubelet maps its image to the workspace's binary), rather
//! than as a local process: so the playground exercises what users install
//! (the Deployment, the ServiceAccount and the least-privilege RBAC: the
//! operator acts with its own token, and a missing permission fails here as
//! in a cluster), `kubectl get pods -n distrocache-system` shows it, and there
//! is one way of running the operator shared with the end-to-end tests.
//!
//! `bash scripts/playground.sh` builds the workspace's binaries and runs this.

mod checks;
mod guide;
mod monitoring;
mod options;
mod session;
mod toolchain;
mod workdir;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

use options::Options;
use session::Playground;

/// How often the running playground checks that its processes still run.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let options = Options::parse();
    let mut signals = match Signals::new() {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let started = Instant::now();
    let mut playground = Playground::new(options.clone());

    let outcome = tokio::select! {
        result = playground.start() => result.map(|()| true),
        signal = signals.next() => {
            println!("{signal}: stopping before the playground was ready");
            Ok(false)
        }
    };
    let mut failed = false;
    match outcome {
        Ok(true) => {
            if let Some(facts) = playground.facts() {
                println!("{}", guide::text(&facts, started.elapsed()));
            }
            let mut check = tokio::time::interval(CHECK_INTERVAL);
            loop {
                tokio::select! {
                    signal = signals.next() => {
                        println!("{signal}: stopping");
                        break;
                    }
                    _ = check.tick() => {
                        if let Err(e) = playground.check() {
                            eprintln!("error: {e:#}");
                            failed = true;
                            break;
                        }
                    }
                }
            }
        }
        Ok(false) => {}
        Err(e) => {
            eprintln!("error: {e:#}");
            failed = true;
        }
    }

    // Stopping is bounded (each process gets a grace period); a second
    // signal ends the process at once. Its children die with it (they are
    // tied to it, see distrocache_tests::procs) and the next start removes
    // the files it leaves.
    tokio::spawn(async move {
        let signal = signals.next().await;
        eprintln!("{signal} again: exiting now; the next start cleans up what is left");
        std::process::exit(130);
    });
    if let Err(e) = tokio::task::block_in_place(|| playground.stop()) {
        eprintln!("error: {e:#}");
        failed = true;
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// SIGINT (Ctrl-C) and SIGTERM, the two ways to stop the playground.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// The name of the next signal received.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}
