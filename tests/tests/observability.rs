//! What operators plug in (issue 26, item 5): the Prometheus alert rules pass `promtool check
//! rules` and their unit tests (`promtool test rules`: each alert fires on the series it is
//! about, after its `for`, and not before); the Grafana dashboard is a dashboard (panels with
//! Prometheus targets). That every metric they name is one the daemon serves is checked by the
//! controller's `the_shipped_rules_and_dashboard_name_only_metrics_the_daemon_serves`.

use std::path::PathBuf;
use std::process::Command;

fn deploy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(deploy().join("prometheus"))
        .output()
        .unwrap_or_else(|e| {
            panic!("promtool: {e}: install it with `apt-get install prometheus` (scripts/test.sh does)")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn the_alert_rules_check_and_their_unit_tests_pass() {
    let checked = promtool(&["check", "rules", "unistor.rules.yml"]);
    assert!(checked.contains("SUCCESS: 9 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "unistor.rules.test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

#[test]
fn the_grafana_dashboard_has_prometheus_panels() {
    let text = std::fs::read_to_string(deploy().join("grafana/unistor.json")).unwrap();
    let d: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(d["uid"], "unistor-fleet");
    let panels = d["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "{} panels", panels.len());
    for p in panels {
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{}", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().expect("an expression");
            assert!(expr.contains("unistor_"), "{}: {expr}", p["title"]);
        }
        assert_eq!(p["datasource"]["type"], "prometheus", "{}", p["title"]);
    }
}
