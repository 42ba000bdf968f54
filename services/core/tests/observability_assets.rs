//! Checks the observability assets against the metrics contract: dashboards (`dashboards/`),
//! alert rules and their promtool tests (`alerts/`) and the runbook (`docs/runbook.md`) may name
//! only metrics of [`CONTRACT`], every alert must be actionable (severity, summary, description,
//! a `runbook_url` section that exists) and tested both firing and quiet, every dashboard panel
//! must query something, each SLO of `docs/slo.md` has its SLI recorded over every burn-rate
//! window and a paging and a ticket alert, the per-service dashboards can be narrowed by job and
//! instance, and Alertmanager (`infra/alertmanager.yml`) routes every severity and silences lag
//! alerts while the broker is down. YAML is scanned as text on purpose: the crate has no YAML
//! dependency, and the rule files keep one `key: value` per line.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use colloquy_core::metrics::{CONTRACT, is_contract_series};
use serde_json::Value;

fn repo_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().unwrap_or(root)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Files in `dir` (and its subfolders when `recursive`) whose name ends with one of `exts`, sorted.
fn files_with_ext(dir: &Path, exts: &[&str], recursive: bool) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if recursive {
                out.extend(files_with_ext(&path, exts, true));
            }
        } else if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| exts.iter().any(|e| n.ends_with(e)))
        {
            out.push(path);
        }
    }
    out.sort();
    out
}

fn dashboard_files() -> Vec<PathBuf> {
    files_with_ext(&repo_root().join("dashboards"), &[".json"], true)
}

/// The rule files Prometheus loads (`infra/prometheus.yml`: `../alerts/*.yml`).
fn rule_files() -> Vec<PathBuf> {
    files_with_ext(&repo_root().join("alerts"), &[".yml", ".yaml"], false)
}

fn rule_test_files() -> Vec<PathBuf> {
    files_with_ext(&repo_root().join("alerts/tests"), &[".yml", ".yaml"], false)
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Every `colloquy_[a-z0-9_]+` identifier in `text` that starts at an identifier boundary.
/// Recording rules are named `colloquy:…`, so they never match.
fn metric_tokens(text: &str) -> Vec<String> {
    const PREFIX: &str = "colloquy_";
    let mut out = Vec::new();
    for (start, _) in text.match_indices(PREFIX) {
        if text[..start].chars().next_back().is_some_and(is_ident_char) {
            continue;
        }
        let tail = &text[start..];
        let len = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        if len > PREFIX.len() {
            out.push(tail[..len].to_owned());
        }
    }
    out
}

/// Every `colloquy:…` recording-rule name in `text`.
fn recording_rule_tokens(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (start, _) in text.match_indices("colloquy:") {
        if text[..start].chars().next_back().is_some_and(is_ident_char) {
            continue;
        }
        let len = text[start..]
            .find(|c: char| !is_ident_char(c))
            .unwrap_or(text.len() - start);
        if len > "colloquy:".len() {
            out.push(text[start..start + len].to_owned());
        }
    }
    out
}

/// Panels of a dashboard, including those nested in (collapsed) rows.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            if let Some(nested) = p.get("panels") {
                walk(nested, out);
            }
        }
    }
    let mut out = Vec::new();
    if let Some(list) = dashboard.get("panels") {
        walk(list, &mut out);
    }
    out
}

fn parse_dashboard(path: &Path) -> Value {
    serde_json::from_str(&read(path))
        .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()))
}

/// (panel title, expr) for every query of every dashboard.
fn dashboard_exprs() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for path in dashboard_files() {
        let dash = parse_dashboard(&path);
        for panel in panels(&dash) {
            for target in panel
                .get("targets")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(expr) = target.get("expr").and_then(Value::as_str) {
                    let title = panel.get("title").and_then(Value::as_str).unwrap_or("?");
                    out.push((format!("{}: {title}", path.display()), expr.to_owned()));
                }
            }
        }
    }
    out
}

/// A datasource reference that resolves to this project's Prometheus: the `DS_PROMETHEUS`
/// variable or the provisioned datasource named / with uid `Prometheus` / `prometheus`.
fn is_prometheus_datasource(ds: &Value) -> bool {
    let ok = |s: &str| {
        matches!(
            s,
            "${DS_PROMETHEUS}" | "$DS_PROMETHEUS" | "Prometheus" | "prometheus"
        )
    };
    match ds {
        Value::String(s) => ok(s),
        Value::Object(o) => o.get("uid").and_then(Value::as_str).is_some_and(ok),
        _ => false,
    }
}

struct Alert {
    file: PathBuf,
    name: String,
    /// `key: value` lines of the rule (labels and annotations flattened; YAML is regular here).
    fields: BTreeMap<String, String>,
}

/// Alerting rules of a rule file: each `- alert:` item up to the next rule or group.
fn parse_alerts(path: &Path) -> Vec<Alert> {
    let text = read(path);
    let mut out: Vec<Alert> = Vec::new();
    let mut current: Option<Alert> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        let item = trimmed.strip_prefix("- ");
        if let Some(name) = item.and_then(|i| i.strip_prefix("alert:")) {
            out.extend(current.take());
            current = Some(Alert {
                file: path.to_owned(),
                name: name.trim().to_owned(),
                fields: BTreeMap::new(),
            });
            continue;
        }
        if item.is_some_and(|i| i.starts_with("record:") || i.starts_with("name:")) {
            out.extend(current.take());
            continue;
        }
        if let Some(alert) = current.as_mut()
            && let Some((key, value)) = trimmed.split_once(':')
            && !key.is_empty()
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
            alert
                .fields
                .entry(key.to_owned())
                .or_insert_with(|| value.to_owned());
        }
    }
    out.extend(current);
    out
}

fn recording_rule_names(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim_start().strip_prefix("- record:"))
        .map(|n| n.trim().to_owned())
        .collect()
}

/// GitHub's heading anchors: lowercase, punctuation other than `-` and `_` dropped, spaces to `-`.
fn heading_anchors(markdown: &str) -> BTreeSet<String> {
    let mut in_code = false;
    let mut out = BTreeSet::new();
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code || !line.starts_with('#') {
            continue;
        }
        let title = line.trim_start_matches('#').trim();
        let slug: String = title
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        out.insert(slug);
    }
    out
}

#[test]
fn metric_tokens_finds_raw_metrics_only() {
    let expr = r#"histogram_quantile(0.99, sum by (le) (rate(colloquy_e2e_latency_seconds_bucket[5m])))
        / colloquy:messages:rate5m{outcome="x"} + my_colloquy_thing + colloquy_messages_total"#;
    assert_eq!(
        metric_tokens(expr),
        [
            "colloquy_e2e_latency_seconds_bucket",
            "colloquy_messages_total"
        ]
    );
    assert_eq!(recording_rule_tokens(expr), ["colloquy:messages:rate5m"]);
    assert!(
        heading_anchors("## ColloquyDLQWrites\n```\n# not a heading\n```\n")
            .contains("colloquydlqwrites")
    );
}

#[test]
fn dashboards_parse_and_every_panel_queries_prometheus() {
    let files = dashboard_files();
    assert!(!files.is_empty(), "no dashboards/**/*.json");
    for path in files {
        let dash = parse_dashboard(&path);
        let p = path.display();
        assert!(
            dash.get("uid")
                .and_then(Value::as_str)
                .is_some_and(|u| !u.is_empty()),
            "{p}: no uid"
        );
        assert!(
            dash.get("title")
                .and_then(Value::as_str)
                .is_some_and(|t| !t.is_empty()),
            "{p}: no title"
        );
        assert!(
            dash.get("schemaVersion")
                .and_then(Value::as_u64)
                .is_some_and(|v| v >= 36),
            "{p}: schemaVersion < 36"
        );
        let text = read(&path);
        if text.contains("DS_PROMETHEUS") {
            let vars = dash
                .pointer("/templating/list")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            assert!(
                vars.iter().any(
                    |v| v.get("name").and_then(Value::as_str) == Some("DS_PROMETHEUS")
                        && v.get("type").and_then(Value::as_str) == Some("datasource")
                ),
                "{p}: uses ${{DS_PROMETHEUS}} but defines no datasource variable of that name"
            );
        }
        let all = panels(&dash);
        let mut ids = BTreeSet::new();
        let mut queried = 0;
        for panel in all {
            let title = panel.get("title").and_then(Value::as_str).unwrap_or("?");
            if let Some(id) = panel.get("id").and_then(Value::as_u64) {
                assert!(ids.insert(id), "{p}: duplicate panel id {id} ({title})");
            }
            if panel.get("type").and_then(Value::as_str) == Some("row") {
                continue;
            }
            let ds = panel.get("datasource").unwrap_or(&Value::Null);
            assert!(
                is_prometheus_datasource(ds),
                "{p}: panel {title:?} has datasource {ds}"
            );
            let targets = panel
                .get("targets")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            assert!(!targets.is_empty(), "{p}: panel {title:?} has no targets");
            let mut refs = BTreeSet::new();
            for t in &targets {
                let expr = t.get("expr").and_then(Value::as_str).unwrap_or_default();
                assert!(
                    !expr.trim().is_empty(),
                    "{p}: panel {title:?} has a target without expr"
                );
                let r = t.get("refId").and_then(Value::as_str).unwrap_or_default();
                assert!(
                    refs.insert(r.to_owned()),
                    "{p}: panel {title:?} repeats refId {r:?}"
                );
                if let Some(ds) = t.get("datasource") {
                    assert!(
                        is_prometheus_datasource(ds),
                        "{p}: panel {title:?} target {r} has datasource {ds}"
                    );
                }
            }
            queried += 1;
        }
        assert!(queried > 0, "{p}: no panel with a query");
    }
}

#[test]
fn grafana_provisioning_points_at_local_prometheus_and_dashboards() {
    let dir = repo_root().join("dashboards/provisioning");
    let datasources = read(&dir.join("datasources.yml"));
    for needle in [
        "type: prometheus",
        "url: http://127.0.0.1:9090",
        "name: Prometheus",
        "uid: prometheus",
    ] {
        assert!(
            datasources.contains(needle),
            "datasources.yml lacks `{needle}`"
        );
    }
    let dashboards = read(&dir.join("dashboards.yml"));
    for needle in ["type: file", "path: ${COLLOQUY_DASHBOARDS_DIR}"] {
        assert!(
            dashboards.contains(needle),
            "dashboards.yml lacks `{needle}`"
        );
    }
}

#[test]
fn dashboards_use_only_contract_metrics_and_show_all_of_them() {
    let exprs = dashboard_exprs();
    let mut used = BTreeSet::new();
    for (where_, expr) in &exprs {
        let tokens = metric_tokens(expr);
        assert!(
            !tokens.is_empty(),
            "{where_}: {expr} names no colloquy_ metric"
        );
        for t in tokens {
            assert!(
                is_contract_series(&t),
                "{where_}: {t} is not in the metrics contract"
            );
            used.insert(t);
        }
        assert!(
            recording_rule_tokens(expr).is_empty(),
            "{where_}: dashboards query raw contract metrics, not recording rules: {expr}"
        );
    }
    for def in CONTRACT {
        assert!(
            used.iter().any(|u| u == def.name
                || u.strip_prefix(def.name)
                    .is_some_and(|s| ["_bucket", "_sum", "_count"].contains(&s))),
            "no dashboard panel shows {}",
            def.name
        );
    }
}

#[test]
fn alerts_tests_and_runbook_use_only_contract_metrics() {
    let mut files = rule_files();
    assert!(!files.is_empty(), "no alerts/*.yml");
    files.extend(rule_test_files());
    files.push(repo_root().join("docs/runbook.md"));
    for path in files {
        let text = read(&path);
        for t in metric_tokens(&text) {
            assert!(
                is_contract_series(&t),
                "{}: {t} is not in the metrics contract",
                path.display()
            );
        }
    }
}

#[test]
fn recording_rules_are_prefixed_and_every_one_used_is_defined() {
    let mut defined = BTreeSet::new();
    let rules: Vec<String> = rule_files().iter().map(|p| read(p)).collect();
    for text in &rules {
        for name in recording_rule_names(text) {
            assert!(
                name.starts_with("colloquy:"),
                "recording rule {name} must be named colloquy:<what>:<window>"
            );
            assert!(
                defined.insert(name.clone()),
                "recording rule {name} defined twice"
            );
        }
    }
    let mut texts = rules;
    texts.extend(rule_test_files().iter().map(|p| read(p)));
    texts.push(read(&repo_root().join("docs/runbook.md")));
    for text in &texts {
        for used in recording_rule_tokens(text) {
            assert!(
                defined.contains(&used),
                "{used} is used but no recording rule defines it"
            );
        }
    }
}

#[test]
fn every_alert_is_actionable_and_its_runbook_section_exists() {
    let runbook = read(&repo_root().join("docs/runbook.md"));
    let anchors = heading_anchors(&runbook);
    let alerts: Vec<Alert> = rule_files().iter().flat_map(|p| parse_alerts(p)).collect();
    assert!(!alerts.is_empty(), "no alerting rules in alerts/*.yml");
    let mut names = BTreeSet::new();
    for a in &alerts {
        let at = format!("{} alert {}", a.file.display(), a.name);
        assert!(names.insert(a.name.clone()), "{at}: defined twice");
        assert!(a.fields.contains_key("expr"), "{at}: no expr");
        let severity = a.fields.get("severity").map(String::as_str);
        assert!(
            matches!(severity, Some("critical" | "warning" | "info")),
            "{at}: severity label must be critical, warning or info, not {severity:?}"
        );
        for key in ["summary", "description", "runbook_url"] {
            assert!(
                a.fields.get(key).is_some_and(|v| !v.is_empty()),
                "{at}: no {key} annotation"
            );
        }
        let runbook_link = &a.fields["runbook_url"];
        let anchor = runbook_link
            .strip_prefix("docs/runbook.md#")
            .unwrap_or_else(|| {
                panic!("{at}: runbook_url {runbook_link:?} must point at docs/runbook.md#<anchor>")
            });
        assert!(
            anchors.contains(anchor),
            "{at}: docs/runbook.md has no section #{anchor}"
        );
    }
}

#[test]
fn every_alert_has_a_firing_and_a_quiet_promtool_case() {
    let alerts: BTreeSet<String> = rule_files()
        .iter()
        .flat_map(|p| parse_alerts(p))
        .map(|a| a.name)
        .collect();
    let mut firing = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for path in rule_test_files() {
        let text = read(&path);
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let Some(name) = line.trim_start().strip_prefix("alertname:").map(str::trim) else {
                continue;
            };
            let next = lines[i + 1..]
                .iter()
                .map(|l| l.trim())
                .find(|l| !l.is_empty() && !l.starts_with('#'));
            match next {
                Some("exp_alerts: []") => quiet.insert(name.to_owned()),
                Some("exp_alerts:") => firing.insert(name.to_owned()),
                other => panic!("{}: alertname {name} followed by {other:?}", path.display()),
            };
        }
    }
    for name in &alerts {
        assert!(firing.contains(name), "no promtool test makes {name} fire");
        assert!(
            quiet.contains(name),
            "no promtool test checks that {name} stays quiet"
        );
    }
    for name in firing.union(&quiet) {
        assert!(
            alerts.contains(name),
            "promtool tests name {name}, which is no alert"
        );
    }
}

/// `promtool check rules` and `promtool test rules`, when promtool is installed.
#[test]
fn promtool_accepts_rules_and_their_tests() {
    if Command::new("promtool").arg("--version").output().is_err() {
        eprintln!(
            "note: promtool is not on PATH; skipping `promtool check rules` / `promtool test rules`"
        );
        return;
    }
    let root = repo_root();
    let run = |args: &[&str], files: &[PathBuf]| {
        let out = Command::new("promtool")
            .args(args)
            .args(files)
            .current_dir(&root)
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {} failed:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["check", "rules"], &rule_files());
    let tests = rule_test_files();
    if !tests.is_empty() {
        run(&["test", "rules"], &tests);
    }
}

/// The burn-rate windows of the SRE workbook's multi-window, multi-burn-rate alerts.
const SLO_WINDOWS: [&str; 7] = ["5m", "30m", "1h", "2h", "6h", "1d", "3d"];

/// (SLI recording-rule stem, alert-name stem) of each SLO in `docs/slo.md`.
const SLOS: [(&str, &str); 3] = [
    (
        "colloquy:sli_availability:error_ratio_",
        "ColloquyAvailabilityBudgetBurn",
    ),
    (
        "colloquy:sli_e2e_latency:error_ratio_",
        "ColloquyE2ELatencyBudgetBurn",
    ),
    (
        "colloquy:sli_first_delta_latency:error_ratio_",
        "ColloquyFirstDeltaLatencyBudgetBurn",
    ),
];

#[test]
fn every_slo_is_recorded_over_every_window_with_a_page_and_a_ticket() {
    let rules: String = rule_files().iter().map(|p| read(p)).collect();
    let recorded: BTreeSet<String> = recording_rule_names(&rules).into_iter().collect();
    let alerts: Vec<Alert> = rule_files().iter().flat_map(|p| parse_alerts(p)).collect();
    let slo_doc = read(&repo_root().join("docs/slo.md"));
    for (sli, alert) in SLOS {
        for w in SLO_WINDOWS {
            assert!(
                recorded.contains(&format!("{sli}{w}")),
                "no recording rule {sli}{w}"
            );
        }
        for (suffix, severity, windows) in [
            ("Fast", "critical", ["1h", "5m", "6h", "30m"]),
            ("Slow", "warning", ["1d", "2h", "3d", "6h"]),
        ] {
            let name = format!("{alert}{suffix}");
            let a = alerts
                .iter()
                .find(|a| a.name == name)
                .unwrap_or_else(|| panic!("no alert {name}"));
            assert_eq!(
                a.fields.get("severity").map(String::as_str),
                Some(severity),
                "{name}"
            );
            let expr: String = rules
                .split(&format!("- alert: {name}"))
                .nth(1)
                .and_then(|rest| rest.split("annotations:").next())
                .unwrap_or_default()
                .to_owned();
            for w in windows {
                assert!(
                    expr.contains(&format!("{sli}{w} ")),
                    "{name} does not read {sli}{w}"
                );
            }
        }
        assert!(slo_doc.contains(alert), "docs/slo.md does not name {alert}");
    }
}

#[test]
fn per_service_dashboards_have_job_and_instance_variables_and_a_heatmap() {
    let dir = repo_root().join("dashboards");
    for (file, service) in [
        ("colloquy-gateway.json", "gateway"),
        ("colloquy-ai-consumer.json", "ai-consumer"),
        ("colloquy-relay.json", "relay"),
        ("colloquy-kafka-redis.json", "relay"),
    ] {
        let dash = parse_dashboard(&dir.join(file));
        let vars = dash
            .pointer("/templating/list")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for name in ["job", "instance"] {
            let var = vars
                .iter()
                .find(|v| v.get("name").and_then(Value::as_str) == Some(name))
                .unwrap_or_else(|| panic!("{file}: no ${name} variable"));
            let query = var.get("definition").and_then(Value::as_str).unwrap_or("");
            assert!(
                query.starts_with("label_values(") && query.contains(service),
                "{file}: ${name} is {query:?}"
            );
        }
        let all = panels(&dash);
        assert!(
            all.iter()
                .any(|p| p.get("type").and_then(Value::as_str) == Some("heatmap")),
            "{file}: no latency heatmap"
        );
        for p in all {
            if p.get("type").and_then(Value::as_str) == Some("row") {
                continue;
            }
            for t in p
                .get("targets")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let expr = t.get("expr").and_then(Value::as_str).unwrap_or_default();
                assert!(
                    expr.contains("job=~\"$job\"") && expr.contains("instance=~\"$instance\""),
                    "{file}: panel {:?} ignores $job/$instance: {expr}",
                    p.get("title")
                );
            }
        }
    }
    let slo = read(&dir.join("colloquy-slo.json"));
    for needle in ["budget left", "burn rate", "colloquy_probe_success"] {
        assert!(slo.contains(needle), "colloquy-slo.json lacks {needle}");
    }
}

#[test]
fn alertmanager_routes_every_severity_and_silences_lag_while_the_broker_is_down() {
    let am = read(&repo_root().join("infra/alertmanager.yml"));
    for (severity, receiver) in [
        ("critical", "page"),
        ("warning", "ticket"),
        ("info", "blackhole"),
    ] {
        let route = format!("- matchers: ['severity=\"{severity}\"']\n      receiver: {receiver}");
        assert!(am.contains(&route), "alertmanager.yml: no route {route:?}");
        assert!(
            am.contains(&format!("- name: {receiver}")),
            "alertmanager.yml: no receiver {receiver}"
        );
    }
    let alerts: BTreeSet<String> = rule_files()
        .iter()
        .flat_map(|p| parse_alerts(p))
        .map(|a| a.name)
        .collect();
    let inhibit = am.split("inhibit_rules:").nth(1).unwrap_or_default();
    let inhibit = inhibit.split("receivers:").next().unwrap_or_default();
    assert!(
        inhibit.contains("source_matchers: ['alertname=\"ColloquyKafkaBrokerDown\"']"),
        "no inhibition by ColloquyKafkaBrokerDown"
    );
    for lag in ["ColloquyConsumerLagHigh", "ColloquyConsumerLagGrowing"] {
        assert!(inhibit.contains(lag), "broker down does not silence {lag}");
    }
    // Every alert name the inhibitions mention exists.
    for token in inhibit.split(|c: char| !c.is_ascii_alphanumeric()) {
        if token.starts_with("Colloquy") {
            assert!(
                alerts.contains(token),
                "inhibit_rules name {token}, which is no alert"
            );
        }
    }
    let prom = read(&repo_root().join("infra/prometheus.yml"));
    for needle in [
        "- ../alerts/*.yml",
        "job_name: prober",
        "job_name: kafka-broker",
        "targets: [\"127.0.0.1:9093\"]",
    ] {
        assert!(
            prom.contains(needle),
            "infra/prometheus.yml lacks `{needle}`"
        );
    }
}

/// `amtool check-config` and a routing test per severity, when amtool is installed.
#[test]
fn amtool_accepts_the_alertmanager_config() {
    if Command::new("amtool").arg("--version").output().is_err() {
        eprintln!("note: amtool is not on PATH; skipping `amtool check-config`");
        return;
    }
    let root = repo_root();
    let out = Command::new("amtool")
        .args(["check-config", "infra/alertmanager.yml"])
        .current_dir(&root)
        .output()
        .expect("run amtool");
    assert!(
        out.status.success(),
        "amtool check-config failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for (severity, receiver) in [("critical", "page"), ("warning", "ticket")] {
        let out = Command::new("amtool")
            .args([
                "config",
                "routes",
                "test",
                "--config.file=infra/alertmanager.yml",
                &format!("severity={severity}"),
            ])
            .current_dir(&root)
            .output()
            .expect("run amtool");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            receiver,
            "severity={severity} routes elsewhere"
        );
    }
}
