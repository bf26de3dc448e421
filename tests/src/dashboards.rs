//! The Grafana dashboard and the alert rules (charts/distrocache/files/) as
//! the tests read them: every dashboard query and variable, every alert
//! expression, and the metric selectors inside an expression. The alert
//! tests lint them; the monitoring test evaluates them on a real Prometheus
//! scraping a real cache, so a renamed metric or label breaks the build.

use std::path::PathBuf;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::distrocache::workspace_root;

/// What the Grafana variable `$__rate_interval` becomes when a query is
/// evaluated outside Grafana: several scrapes of the tests' 1 s interval.
pub const RATE_INTERVAL: &str = "30s";

pub fn alerts_path() -> PathBuf {
    workspace_root().join("charts/distrocache/files/alerts.yaml")
}

pub fn dashboard_path() -> PathBuf {
    workspace_root().join("charts/distrocache/files/dashboard.json")
}

pub fn alert_tests_path() -> PathBuf {
    workspace_root().join("tests/promtool/alerts_test.yaml")
}

/// One alert rule: its group, name and PromQL expression.
#[derive(Debug, Clone)]
pub struct Alert {
    pub group: String,
    pub name: String,
    pub expr: String,
}

/// Every alert of the rules file.
pub fn alerts() -> Result<Vec<Alert>> {
    let path = alerts_path();
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let doc: serde_yaml::Value = serde_yaml::from_str(&text)?;
    let mut out = Vec::new();
    for group in doc["groups"].as_sequence().context("no groups")? {
        let group_name = group["name"].as_str().context("a group without a name")?;
        for rule in group["rules"]
            .as_sequence()
            .context("a group without rules")?
        {
            out.push(Alert {
                group: group_name.to_owned(),
                name: rule["alert"]
                    .as_str()
                    .context("a rule without `alert` (only alerts are expected)")?
                    .to_owned(),
                expr: rule["expr"]
                    .as_str()
                    .context("an alert without expr")?
                    .to_owned(),
            });
        }
    }
    Ok(out)
}

/// The dashboard JSON.
pub fn dashboard() -> Result<Value> {
    let path = dashboard_path();
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// One query of a dashboard panel, as written (with Grafana variables).
#[derive(Debug, Clone)]
pub struct PanelQuery {
    pub panel: String,
    pub expr: String,
}

/// Every query of every panel (rows included).
pub fn panel_queries(dashboard: &Value) -> Result<Vec<PanelQuery>> {
    let mut out = Vec::new();
    let panels = dashboard["panels"].as_array().context("no panels")?;
    for panel in panels {
        let title = panel["title"].as_str().context("a panel without a title")?;
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"]
            .as_array()
            .with_context(|| format!("panel {title:?} has no targets"))?;
        ensure!(!targets.is_empty(), "panel {title:?} has no queries");
        for target in targets {
            let expr = target["expr"]
                .as_str()
                .with_context(|| format!("a query of panel {title:?} has no expr"))?;
            out.push(PanelQuery {
                panel: title.to_owned(),
                expr: expr.to_owned(),
            });
        }
    }
    Ok(out)
}

/// A `label_values(selector, label)` variable of the dashboard.
#[derive(Debug, Clone)]
pub struct Variable {
    pub name: String,
    pub selector: String,
    pub label: String,
}

/// The dashboard's query variables.
pub fn variables(dashboard: &Value) -> Result<Vec<Variable>> {
    let mut out = Vec::new();
    for var in dashboard["templating"]["list"]
        .as_array()
        .context("no templating")?
    {
        if var["type"] != "query" {
            continue;
        }
        let name = var["name"].as_str().context("a variable without a name")?;
        let query = var["query"]["query"]
            .as_str()
            .with_context(|| format!("variable {name} has no query"))?;
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .with_context(|| format!("variable {name}: not label_values(...): {query}"))?;
        let (selector, label) = inner
            .rsplit_once(',')
            .with_context(|| format!("variable {name}: label_values needs a label"))?;
        out.push(Variable {
            name: name.to_owned(),
            selector: selector.trim().to_owned(),
            label: label.trim().to_owned(),
        });
    }
    Ok(out)
}

/// `expr` with the dashboard's variables replaced: `$namespace`, `$cache`,
/// and `$__rate_interval` (as [`RATE_INTERVAL`]).
pub fn substitute(expr: &str, namespace: &str, cache: &str) -> String {
    expr.replace("$__rate_interval", RATE_INTERVAL)
        .replace("$namespace", namespace)
        .replace("$cache", cache)
}

/// The metric selectors in a PromQL expression: each `distrocache_*` or
/// `up` metric name with its `{...}` matchers when it has them. Evaluating
/// each on its own tells which metric or label value is missing when an
/// expression has no data.
pub fn selectors(expr: &str) -> Result<Vec<String>> {
    let bytes = expr.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    let mut in_string = false;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'"' {
            in_string = !in_string;
            i += 1;
            continue;
        }
        if in_string || !ident(b) || (i > 0 && ident(bytes[i - 1])) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && ident(bytes[i]) {
            i += 1;
        }
        let name = &expr[start..i];
        if !(name.starts_with("distrocache_") || name == "up") {
            continue;
        }
        let mut selector = name.to_owned();
        if bytes.get(i) == Some(&b'{') {
            let Some(end) = expr[i..].find('}') else {
                bail!("unclosed matchers after {name} in {expr}");
            };
            selector.push_str(&expr[i..=i + end]);
            i += end + 1;
        }
        if !out.contains(&selector) {
            out.push(selector);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_keep_matchers_and_skip_strings_and_functions() {
        let got = selectors(
            r#"sum by (pod) (rate(distrocache_hits_total{namespace="a", service="b"}[1m])) / scalar(avg(distrocache_items)) and on (instance) (distrocache_operator_leader == 1) + label_replace(up, "x", "distrocache_fake", "", "")"#,
        )
        .unwrap();
        assert_eq!(
            got,
            vec![
                r#"distrocache_hits_total{namespace="a", service="b"}"#,
                "distrocache_items",
                "distrocache_operator_leader",
                "up",
            ]
        );
    }

    #[test]
    fn the_committed_files_parse() {
        let alerts = alerts().unwrap();
        assert!(alerts.len() >= 9);
        let dashboard = dashboard().unwrap();
        assert!(!panel_queries(&dashboard).unwrap().is_empty());
        let vars = variables(&dashboard).unwrap();
        assert_eq!(
            vars.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
            ["namespace", "cache"]
        );
    }
}
