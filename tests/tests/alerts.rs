//! The alert rules and the dashboard without a cluster: `promtool check
//! rules` and `promtool test rules` (every alert firing and not firing, in
//! tests/promtool/alerts_test.yaml), the chart rendering them (PrometheusRule
//! and dashboard ConfigMap hold exactly the files), the dashboard's queries
//! all scoped to the selected cache, and a runbook in the README for every
//! alert. The monitoring test evaluates the same expressions on a real
//! Prometheus.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use distrocache_tests::Binaries;
use distrocache_tests::dashboards::{self, alert_tests_path, alerts_path, dashboard_path};
use distrocache_tests::distrocache::workspace_root;
use distrocache_tests::procs;
use serde::Deserialize as _;

fn run(program: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .current_dir(workspace_root())
        .output()
        .with_context(|| format!("run {}", program.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success(),
        "{} {} failed:\n{text}",
        program.display(),
        args.join(" ")
    );
    Ok(text)
}

fn promtool() -> Result<std::path::PathBuf> {
    procs::find_on_path("promtool").context(
        "promtool is not installed: install the Debian package `prometheus` (scripts/test.sh does)",
    )
}

#[test]
fn promtool_checks_the_rules_and_every_alert_fires_and_stays_quiet_as_tested() -> Result<()> {
    let promtool = promtool()?;
    let rules = alerts_path();
    let out = run(
        &promtool,
        &["check", "rules", rules.to_str().context("UTF-8")?],
    )?;
    let alerts = dashboards::alerts()?;
    ensure!(
        out.contains(&format!("SUCCESS: {} rules found", alerts.len())),
        "{out}"
    );

    let tests = alert_tests_path();
    let out = run(
        &promtool,
        &["test", "rules", tests.to_str().context("UTF-8")?],
    )?;
    ensure!(out.contains("SUCCESS"), "{out}");

    // Every alert has a firing case (exp_alerts not empty) and a quiet one.
    let doc: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&tests)?)?;
    let cases: Vec<(String, bool)> = doc["tests"]
        .as_sequence()
        .context("no tests")?
        .iter()
        .flat_map(|t| {
            t["alert_rule_test"]
                .as_sequence()
                .cloned()
                .unwrap_or_default()
        })
        .map(|c| {
            (
                c["alertname"].as_str().unwrap_or_default().to_owned(),
                c["exp_alerts"].as_sequence().is_some_and(|a| !a.is_empty()),
            )
        })
        .collect();
    for alert in &alerts {
        for firing in [true, false] {
            ensure!(
                cases.contains(&(alert.name.clone(), firing)),
                "{} has no promtool case where it {}",
                alert.name,
                if firing { "fires" } else { "stays quiet" }
            );
        }
    }
    eprintln!(
        "promtool: {} alerts checked, {} unit cases pass",
        alerts.len(),
        cases.len()
    );
    Ok(())
}

#[test]
fn the_chart_ships_exactly_the_rules_and_the_dashboard() -> Result<()> {
    let helm = Binaries::default_dir().join("helm");
    ensure!(
        helm.exists(),
        "{} is missing: run scripts/build-control-plane.sh",
        helm.display()
    );
    let chart = workspace_root().join("charts/distrocache");
    let chart = chart.to_str().context("UTF-8")?;
    let render = |extra: &[&str]| -> Result<Vec<serde_yaml::Value>> {
        let mut args = vec![
            "template",
            "dc",
            chart,
            "--kube-version",
            distrocache_tests::binaries::K8S_VERSION,
        ];
        args.extend_from_slice(extra);
        let out = run(&helm, &args)?;
        let mut docs = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(&out) {
            let value = serde_yaml::Value::deserialize(doc)?;
            if !value.is_null() {
                docs.push(value);
            }
        }
        Ok(docs)
    };
    let of_kind = |docs: &[serde_yaml::Value], kind: &str| -> Vec<serde_yaml::Value> {
        docs.iter().filter(|d| d["kind"] == kind).cloned().collect()
    };
    // Off by default.
    let docs = render(&[])?;
    ensure!(of_kind(&docs, "PrometheusRule").is_empty());
    ensure!(
        !docs
            .iter()
            .any(|d| d["metadata"]["labels"]["grafana_dashboard"].is_string())
    );

    let file: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(alerts_path())?)?;
    let all_groups = file["groups"].as_sequence().context("groups")?.clone();
    let default_groups: Vec<serde_yaml::Value> = all_groups
        .iter()
        .filter(|g| g["name"] != "distrocache-hit-ratio")
        .cloned()
        .collect();
    for (extra, expected) in [
        (vec![], default_groups),
        (
            vec!["--set", "prometheusRule.lowHitRatio.enabled=true"],
            all_groups,
        ),
    ] {
        let mut args = vec![
            "--set",
            "prometheusRule.enabled=true",
            "--set",
            "grafanaDashboard.enabled=true",
        ];
        args.extend(extra);
        let docs = render(&args)?;
        let rules = of_kind(&docs, "PrometheusRule");
        ensure!(rules.len() == 1, "one PrometheusRule, got {}", rules.len());
        ensure!(
            rules[0]["spec"]["groups"].as_sequence() == Some(&expected),
            "the PrometheusRule differs from {}",
            alerts_path().display()
        );
        let dashboards: Vec<serde_yaml::Value> = of_kind(&docs, "ConfigMap")
            .into_iter()
            .filter(|d| d["metadata"]["labels"]["grafana_dashboard"] == "1")
            .collect();
        ensure!(dashboards.len() == 1, "one dashboard ConfigMap");
        let shipped: serde_json::Value = serde_json::from_str(
            dashboards[0]["data"]["distrocache.json"]
                .as_str()
                .context("data.distrocache.json")?,
        )?;
        ensure!(
            shipped == dashboards::dashboard()?,
            "the dashboard ConfigMap differs from {}",
            dashboard_path().display()
        );
    }
    Ok(())
}

#[test]
fn every_dashboard_query_is_scoped_and_every_alert_has_a_runbook() -> Result<()> {
    let dashboard = dashboards::dashboard()?;
    let mut ids = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().context("panels")? {
        ensure!(
            ids.insert(panel["id"].as_i64().context("panel id")?),
            "duplicate panel id {}",
            panel["id"]
        );
    }
    for q in dashboards::panel_queries(&dashboard)? {
        // Node metrics are read for the selected cache; the operator's
        // per-cache metrics by namespace and name; its own counters are
        // the operator's as a whole.
        let scoped = q
            .expr
            .contains(r#"namespace="$namespace", service="$cache""#)
            || q.expr.contains(r#"namespace="$namespace", name="$cache""#);
        let operator_wide = dashboards::selectors(&q.expr)?
            .iter()
            .all(|s| s.starts_with("distrocache_operator_"));
        ensure!(
            scoped || operator_wide,
            "panel {:?}: a query not scoped to the selected cache: {}",
            q.panel,
            q.expr
        );
        ensure!(
            !dashboards::selectors(&q.expr)?.is_empty(),
            "panel {:?}: {} reads no DistroCache metric",
            q.panel,
            q.expr
        );
    }

    let readme = std::fs::read_to_string(workspace_root().join("README.md"))?;
    for alert in dashboards::alerts()? {
        ensure!(
            readme.contains(&format!("#### {}\n", alert.name)),
            "README.md has no runbook section `#### {}`",
            alert.name
        );
    }
    Ok(())
}
