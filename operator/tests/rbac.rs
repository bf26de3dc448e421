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

fn chart_rules() -> Vec<Rule> {
    let helpers =
        std::fs::read_to_string(workspace_root().join("charts/distrocache/templates/_helpers.tpl"))
            .unwrap();
    let start = helpers
        .find(r#"define "distrocache.rules" -}}"#)
        .expect("the rules template");
    let body = &helpers[start..];
    let body = &body[body.find('\n').unwrap()..body.find("{{- end -}}").unwrap()];
    serde_yaml::from_str(body).expect("the rules template is plain YAML")
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
