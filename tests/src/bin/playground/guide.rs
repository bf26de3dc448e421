//! What the playground prints once it is ready: the commands a newcomer
//! types next, in another terminal, with this session's paths and addresses
//! filled in. The README shows the same session.

use std::fmt::Write;
use std::time::Duration;

use distrocache_tests::distrocache::workspace_root;

use crate::session::Facts;

/// The line that starts the guide; the playground's test waits for it.
pub const READY: &str = "ready in";

pub fn text(facts: &Facts, elapsed: Duration) -> String {
    // Paths relative to the repository when the user stands in it.
    let example = match std::env::current_dir() {
        Ok(cwd) if cwd == workspace_root() => "manifests/examples/distrocache.yaml".to_string(),
        _ => workspace_root()
            .join("manifests/examples/distrocache.yaml")
            .display()
            .to_string(),
    };
    let mut out = String::new();
    let mut line = |text: String| {
        let _ = writeln!(out, "{text}");
    };
    line(format!(
        "{READY} {:.1}s. In another terminal:\n",
        elapsed.as_secs_f64()
    ));
    line(format!(
        "  export KUBECONFIG={}",
        facts.kubeconfig.display()
    ));
    line(format!(
        "  export PATH={}:$PATH   # the kubectl built with the control plane",
        facts.tools.display()
    ));
    line(format!("  kubectl apply -f {example}"));
    line("  kubectl get distrocaches -w          # Ctrl-C once READY is 3".into());
    line(format!(
        "  kubectl get pods -o wide             # each pod has its own address in {}",
        facts.pod_ips
    ));
    line("  NODE=$(kubectl get pod example-0 -o jsonpath='{.status.podIP}')".into());
    line(
        "  curl -X PUT http://$NODE:8080/api/v1/cache/greeting -H 'Content-Type: application/json' -d '{\"value\": \"hello\"}'"
            .into(),
    );
    line("  curl http://$NODE:8080/api/v1/cache/greeting".into());
    line("  kubectl scale distrocache/example --replicas=4".into());
    line(
        "  kubectl describe distrocache example  # members, ring epoch, conditions, events".into(),
    );
    line(String::new());
    line(format!(
        "Pod logs are files in {}/kubelet/ (no real kubelet runs, so there is no kubectl logs or exec).",
        facts.dir.display()
    ));
    if let Some(addr) = facts.prometheus {
        line(format!(
            "Prometheus: http://{addr}/graph?g0.expr=distrocache_items_total&g0.tab=1"
        ));
    }
    line(format!(
        "Stop with Ctrl-C here (or kill {}): every process stops and {} is removed.",
        std::process::id(),
        facts.dir.display()
    ));
    out
}
