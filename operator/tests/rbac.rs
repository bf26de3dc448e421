//! Least privilege: the operator's RBAC in `manifests/` and in the Helm chart
//! grants no wildcard, and both grant exactly the same rules (the chart's
//! come from one template shared by its ClusterRole and namespaced Role).

use distrocache_operator::crdgen::workspace_root;
use serde::Deserialize;
use serde_yaml::Value;

#[derive(Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Rule {
    api_groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
    #[serde(default)]
    resource_names: Vec<String>,
}

fn manifest_rules() -> Vec<Rule> {
    let mut rules = Vec::new();
    for entry in std::fs::read_dir(workspace_root().join("manifests")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = Value::deserialize(doc).unwrap();
            let kind = value["kind"].as_str().unwrap_or_default();
            if kind == "ClusterRole" || kind == "Role" {
                rules.extend(serde_yaml::from_value::<Vec<Rule>>(value["rules"].clone()).unwrap());
            }
        }
    }
    rules
}

/// The rules of one `define` in the chart's helpers.
fn chart_template_rules(name: &str) -> Vec<Rule> {
    let helpers =
        std::fs::read_to_string(workspace_root().join("charts/distrocache/templates/_helpers.tpl"))
            .unwrap();
    let start = helpers
        .find(&format!(r#"define "{name}" -}}}}"#))
        .unwrap_or_else(|| panic!("the {name} template"));
    let body = &helpers[start..];
    let body = &body[body.find('\n').unwrap()..body.find("{{- end -}}").unwrap()];
    serde_yaml::from_str(body).expect("the rules template is plain YAML")
}

/// The chart's rules: the caches' (a ClusterRole, or a Role per watched
/// namespace) and the leader election's (a Role in its own namespace).
fn chart_rules() -> Vec<Rule> {
    let mut rules = chart_template_rules("distrocache.rules");
    rules.extend(chart_template_rules("distrocache.leaseRules"));
    rules
}

#[test]
fn the_operator_is_granted_no_wildcard() {
    for (source, rules) in [("manifests", manifest_rules()), ("chart", chart_rules())] {
        assert!(!rules.is_empty(), "{source}: no rules found");
        for rule in &rules {
            for field in [&rule.api_groups, &rule.resources, &rule.verbs] {
                assert!(
                    !field.iter().any(|v| v.contains('*')),
                    "{source} grants a wildcard: {rule:?}"
                );
            }
            for verb in &rule.verbs {
                assert!(
                    ["get", "list", "watch", "create", "patch", "delete"].contains(&verb.as_str()),
                    "{source}: unexpected verb {verb} in {rule:?}"
                );
            }
        }
    }
}

#[test]
fn the_chart_and_the_manifests_grant_the_same() {
    assert_eq!(chart_rules(), manifest_rules());
}

/// Every verb the operator's code uses, by resource, and nothing else: a
/// verb granted but unused is a privilege for an attacker to take. Keep this
/// table next to the calls it lists when either changes.
#[test]
fn the_operator_is_granted_exactly_the_verbs_it_uses() {
    use std::collections::BTreeSet;
    let uses: &[(&str, &str, &[&str])] = &[
        // main.rs lists them once at start; the controller watches them.
        ("distrocache.io", "distrocaches", &["list", "watch"]),
        // patch_status, and report_failure in the error policy.
        ("distrocache.io", "distrocaches/status", &["patch"]),
        // observe() reads it; apply() creates or patches it; owns() watches.
        (
            "apps",
            "statefulsets",
            &["get", "list", "watch", "create", "patch"],
        ),
        // apply() and owns(); never read one by one.
        ("", "services", &["list", "watch", "create", "patch"]),
        // The ring: observe() reads it, apply() writes it, owns() watches.
        (
            "",
            "configmaps",
            &["get", "list", "watch", "create", "patch"],
        ),
        // apply(), owns(), and delete_if_owned() (get, then delete).
        (
            "policy",
            "poddisruptionbudgets",
            &["get", "list", "watch", "create", "patch", "delete"],
        ),
        ("", "serviceaccounts", &["create", "patch"]),
        ("rbac.authorization.k8s.io", "roles", &["create", "patch"]),
        (
            "rbac.authorization.k8s.io",
            "rolebindings",
            &["create", "patch"],
        ),
        // apply() and delete_if_owned(); not watched.
        (
            "networking.k8s.io",
            "networkpolicies",
            &["get", "create", "patch", "delete"],
        ),
        // ensure_auth_secret() only ever creates.
        ("", "secrets", &["create"]),
        // observe_pods() lists them; the controller watches them.
        ("", "pods", &["list", "watch"]),
        // kube's event Recorder creates an event, then patches its series.
        ("events.k8s.io", "events", &["create", "patch"]),
        // Like the NetworkPolicy (discovery needs no RBAC).
        (
            "monitoring.coreos.com",
            "servicemonitors",
            &["get", "create", "patch", "delete"],
        ),
        // reconcile_certificates() applies them (server-side apply: patch,
        // create on first apply); never read or deleted (owner references).
        ("cert-manager.io", "certificates", &["create", "patch"]),
        // Leader election (kube-lease-manager): reads the Lease, creates it
        // once, takes and renews it with server-side apply and patches.
        ("coordination.k8s.io", "leases", &["get", "create", "patch"]),
    ];
    let expected: BTreeSet<(String, String, String)> = uses
        .iter()
        .flat_map(|(group, resource, verbs)| {
            verbs
                .iter()
                .map(|v| (group.to_string(), resource.to_string(), v.to_string()))
        })
        .collect();
    for (source, rules) in [("manifests", manifest_rules()), ("chart", chart_rules())] {
        let mut granted = BTreeSet::new();
        for rule in &rules {
            assert!(
                rule.resource_names.is_empty(),
                "{source}: the operator's rules are not pinned to names: {rule:?}"
            );
            for group in &rule.api_groups {
                for resource in &rule.resources {
                    for verb in &rule.verbs {
                        granted.insert((group.clone(), resource.clone(), verb.clone()));
                    }
                }
            }
        }
        let extra: Vec<_> = granted.difference(&expected).collect();
        let missing: Vec<_> = expected.difference(&granted).collect();
        assert!(
            extra.is_empty() && missing.is_empty(),
            "{source}: granted but unused: {extra:?}; used but not granted: {missing:?}"
        );
    }
}
