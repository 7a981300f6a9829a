//! Metrics end to end (the metrics in README): what `GET /metrics` on the admin listener exports, as a
//! real Prometheus scrapes and queries it; that the Grafana dashboard and the alert rules in
//! deploy/ name only exported series, pass promtool, and evaluate; that `--metrics false` hides
//! the endpoint; and that the capture counters follow drops and records.
//!
//! `prometheus` and `promtool` come from Debian's `prometheus` package (scripts/install-test-deps.sh);
//! the tests that need them fail when they are missing, unless SCORETAP_SKIP_PROMETHEUS=1.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;

use scoretap_tests::client::full;
use scoretap_tests::harness::upstream_args;
use scoretap_tests::metrics::{
    alert_names, alerts_path, dashboard_exprs, dashboard_path, fmt_labels, get_metrics,
    grafana_to_promql, histogram_base, load_alerts, load_dashboard, metric_names,
    prometheus_config_path, rule_exprs, scrape, Exposition, FoundExpr,
};
use scoretap_tests::prometheus::{promtool, require, Prometheus, Target};
use scoretap_tests::traces::{capture_state, TraceStore};
use scoretap_tests::util::{free_port, workspace_root, TempDir};
use scoretap_tests::*;

// ---------------------------------------------------------------- the contract

const METHODS: [&str; 8] = [
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "OTHER",
];
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
const UPSTREAM_RESULTS: [&str; 4] = ["ok", "connect_error", "timeout", "error"];
const PROXY_ERROR_KINDS: [&str; 8] = [
    "bad_request",
    "client_idle_timeout",
    "upstream_connect_failed",
    "upstream_connect_timeout",
    "upstream_timeout",
    "upstream_idle_timeout",
    "upstream_error",
    "proxy_error",
];
const OUTCOMES: [&str; 5] = [
    "ok",
    "upstream_error",
    "upstream_timeout",
    "client_cancelled",
    "proxy_error",
];
const DROP_REASONS: [&str; 3] = ["ring_full_slots", "ring_full_bytes", "collector_stopped"];
const HISTOGRAMS: [&str; 5] = [
    "scoretap_request_duration_seconds",
    "scoretap_request_body_bytes",
    "scoretap_response_body_bytes",
    "scoretap_upstream_duration_seconds",
    "scoretap_storage_duration_seconds",
];
const DURATION_BUCKETS: [&str; 17] = [
    "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1",
    "2.5", "5", "10", "30", "60", "+Inf",
];
const SIZE_BUCKETS: [&str; 12] = [
    "1024",
    "4096",
    "16384",
    "65536",
    "262144",
    "1048576",
    "4194304",
    "16777216",
    "67108864",
    "268435456",
    "1073741824",
    "+Inf",
];

/// How long a counter is given to reach its value on `/metrics` (counted at body end, copied from
/// capture stats at scrape time) and in Prometheus (1 s scrapes).
const METRICS_WAIT: Duration = Duration::from_secs(10);
const PROM_WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------- helpers

/// A proxy in front of `up` writing traces to `store`.
async fn proxy_with_store(up: &TestUpstream, store: &TraceStore, extra: &[&str]) -> Scoretap {
    Scoretap::builder()
        .args(upstream_args(up))
        .args(store.args())
        .args(extra.iter().copied())
        .start()
        .await
}

/// Scrape `/metrics` until `ok` holds or `limit` passes; the last exposition.
async fn scrape_until(
    proxy: &Scoretap,
    limit: Duration,
    ok: impl Fn(&Exposition) -> bool,
) -> Exposition {
    let start = Instant::now();
    loop {
        let e = scrape(proxy.admin).await;
        if ok(&e) || start.elapsed() > limit {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

/// Send `n` requests on one HTTP/1.1 connection, checking each status; the request body bytes
/// and response body bytes that crossed.
async fn send_n(
    c: &mut Client,
    n: usize,
    method: &str,
    path: &str,
    body: impl Fn(usize) -> Vec<u8>,
    want_status: u16,
) -> (u64, u64) {
    let (mut sent, mut got) = (0u64, 0u64);
    for i in 0..n {
        let b = body(i);
        sent += b.len() as u64;
        let id = format!("m{}-{i}", path.replace('/', "_"));
        let mut req = c.req(method, path).header("x-request-id", id);
        if !b.is_empty() {
            req = req.header("content-type", "application/json");
        }
        let r = c.fetch(req.body(full(b)).unwrap(), STEP).await;
        assert_eq!(
            r.status.as_u16(),
            want_status,
            "{method} {path} #{i}: body {:?}",
            r.text()
        );
        got += r.body.len() as u64;
    }
    (sent, got)
}

fn json_body(i: usize, pad: usize) -> Vec<u8> {
    format!("{{\"i\":{i},\"pad\":\"{}\"}}", "x".repeat(pad)).into_bytes()
}

// ---------------------------------------------------------------- a. a real Prometheus

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_counts_and_quantiles() {
    // Without prometheus (SCORETAP_SKIP_PROMETHEUS=1) the /metrics checks still run.
    let prom_bin = require("prometheus");
    let up = TestUpstream::start().await;
    let store = TraceStore::new();
    let proxy = proxy_with_store(&up, &store, &[]).await;
    let dead_store = TraceStore::new();
    let dead = Scoretap::builder()
        .upstream(&format!("http://127.0.0.1:{}", free_port()))
        .args(dead_store.args())
        .args(["--connect-timeout", "2s"])
        .start()
        .await;

    // Fresh processes: every request counter starts at 0 (and exists).
    for p in [&proxy, &dead] {
        let e = scrape(p.admin).await;
        assert_eq!(
            e.sum("scoretap_requests_total", &[]),
            0.0,
            "a fresh scoretap counts no request:\n{}",
            e.describe("scoretap_requests_total")
        );
    }

    let prom = match &prom_bin {
        Some(bin) => {
            let mut prom = Prometheus::start(
                bin,
                &[
                    Target::new("scoretap", proxy.admin),
                    Target::new("scoretap-dead", dead.admin),
                ],
                &[alerts_path()],
            )
            .await;
            // At least one scrape of the zeros before the traffic, so rates see the increase.
            prom.wait_targets_up(PROM_WAIT).await;
            Some(prom)
        }
        None => None,
    };

    // 40 × 200, 10 × 500, 5 × 404 through the proxy; 3 × 502 through the dead one.
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    let (post_sent, post_got) =
        send_n(&mut c, 40, "POST", "/echo", |i| json_body(i, 100 + i), 200).await;
    assert_eq!(post_sent, post_got, "/echo answers what it got");
    let (_, got_500) = send_n(&mut c, 10, "GET", "/status/500", |_| Vec::new(), 500).await;
    let (_, got_404) = send_n(&mut c, 5, "GET", "/status/404", |_| Vec::new(), 404).await;
    let mut d = Client::connect(dead.addr, Proto::H1).await;
    send_n(&mut d, 3, "POST", "/score", |i| json_body(i, 10), 502).await;

    // The exposition itself, exactly.
    let e = scrape_until(&proxy, METRICS_WAIT, |e| {
        e.sum("scoretap_requests_total", &[]) >= 55.0
            && e.get("scoretap_capture_records_total", &[("outcome", "ok")]) >= Some(55.0)
    })
    .await;
    let req = |m: &str, c: &str| {
        e.value(
            "scoretap_requests_total",
            &[("method", m), ("status_class", c)],
        )
    };
    assert_eq!(
        (req("POST", "2xx"), req("GET", "5xx"), req("GET", "4xx")),
        (40.0, 10.0, 5.0),
        "requests by method/status_class:\n{}",
        e.describe("scoretap_requests_total")
    );
    assert_eq!(
        e.sum("scoretap_requests_total", &[]),
        55.0,
        "{}",
        e.describe("scoretap_requests_total")
    );
    assert_eq!(
        e.value("scoretap_upstream_requests_total", &[("result", "ok")]),
        55.0,
        "{}",
        e.describe("scoretap_upstream_requests_total")
    );
    assert_eq!(
        e.histogram_count("scoretap_request_duration_seconds", &[]),
        55.0
    );
    assert_eq!(
        e.histogram_count("scoretap_upstream_duration_seconds", &[]),
        55.0
    );
    assert_eq!(e.histogram_count("scoretap_response_body_bytes", &[]), 55.0);
    assert_eq!(
        e.value("scoretap_response_body_bytes_sum", &[]),
        (post_got + got_500 + got_404) as f64,
        "response bytes that crossed: /echo bodies + 15 × \"status N\\n\""
    );
    let req_body_count = e.histogram_count("scoretap_request_body_bytes", &[]);
    assert!(
        (40.0..=55.0).contains(&req_body_count),
        "request body histogram counts the 40 POSTs (and maybe the 15 empty GETs): {req_body_count}"
    );
    assert_eq!(
        e.value("scoretap_request_body_bytes_sum", &[]),
        post_sent as f64,
        "request bytes that crossed"
    );
    assert_eq!(
        e.sum("scoretap_proxy_errors_total", &[]),
        0.0,
        "no proxy error on a healthy upstream:\n{}",
        e.describe("scoretap_proxy_errors_total")
    );
    assert_eq!(
        e.value("scoretap_capture_records_total", &[("outcome", "ok")]),
        55.0,
        "an upstream's own 4xx/5xx is an ok record:\n{}",
        e.describe("scoretap_capture_records_total")
    );

    let de = scrape_until(&dead, METRICS_WAIT, |e| {
        e.sum("scoretap_requests_total", &[]) >= 3.0
            && e.get(
                "scoretap_capture_records_total",
                &[("outcome", "upstream_error")],
            ) >= Some(3.0)
    })
    .await;
    assert_eq!(
        de.value(
            "scoretap_proxy_errors_total",
            &[("kind", "upstream_connect_failed")]
        ),
        3.0,
        "{}",
        de.describe("scoretap_proxy_errors_total")
    );
    assert_eq!(
        de.value(
            "scoretap_upstream_requests_total",
            &[("result", "connect_error")]
        ),
        3.0,
        "{}",
        de.describe("scoretap_upstream_requests_total")
    );
    assert_eq!(
        de.value("scoretap_upstream_requests_total", &[("result", "ok")]),
        0.0
    );
    assert_eq!(
        de.value(
            "scoretap_requests_total",
            &[("method", "POST"), ("status_class", "5xx")]
        ),
        3.0,
        "the proxy's own 502s are counted:\n{}",
        de.describe("scoretap_requests_total")
    );
    assert_eq!(
        de.value(
            "scoretap_capture_records_total",
            &[("outcome", "upstream_error")]
        ),
        3.0,
        "{}",
        de.describe("scoretap_capture_records_total")
    );

    if let Some(prom) = prom {
        check_in_prometheus(&prom).await;
        prom.stop().await;
    }
}

/// Test a's traffic as a real Prometheus sees it: counts, ratio, quantiles, the dashboard's
/// queries and the alert rules' state.
async fn check_in_prometheus(prom: &Prometheus) {
    // Wait for a scrape after the traffic landed.
    let job = r#"job="scoretap""#;
    let total = prom
        .value_when(
            &format!("sum(scoretap_requests_total{{{job}}})"),
            PROM_WAIT,
            |v| v == Some(55.0),
        )
        .await;
    assert_eq!(
        total,
        Some(55.0),
        "sum(scoretap_requests_total) in Prometheus"
    );
    assert_eq!(
        prom.value(&format!(
            r#"sum(scoretap_requests_total{{{job},status_class="5xx"}})"#
        ))
        .await,
        Some(10.0)
    );
    assert_eq!(
        prom.value(&format!(
            r#"sum(scoretap_requests_total{{{job},status_class="4xx"}})"#
        ))
        .await,
        Some(5.0)
    );
    let ratio = prom
        .value(&format!(
            r#"sum(scoretap_requests_total{{{job},status_class="5xx"}}) / sum(scoretap_requests_total{{{job}}})"#
        ))
        .await
        .unwrap();
    assert!(
        close(ratio, 10.0 / 55.0),
        "failure ratio {ratio}, expected 10/55"
    );
    assert_eq!(
        prom.value(&format!(
            r#"sum(scoretap_upstream_requests_total{{{job},result="ok"}})"#
        ))
        .await,
        Some(55.0)
    );
    let p99_expr = format!(
        "histogram_quantile(0.99, sum by (le) (rate(scoretap_request_duration_seconds_bucket{{{job}}}[1m])))"
    );
    let p99 = prom
        .value_when(&p99_expr, PROM_WAIT, |v| v.is_some_and(f64::is_finite))
        .await;
    let p99 = p99.unwrap_or(f64::NAN);
    assert!(
        p99.is_finite() && p99 > 0.0 && p99 < 5.0,
        "p99 request duration {p99} s (want > 0 and < 5 s)"
    );
    let up99 = prom
        .value(&format!(
            "histogram_quantile(0.99, sum by (le) (rate(scoretap_upstream_duration_seconds_bucket{{{job}}}[1m])))"
        ))
        .await
        .unwrap_or(f64::NAN);
    assert!(
        up99.is_finite() && up99 > 0.0 && up99 <= p99 * 1.5 + 0.01,
        "p99 upstream duration {up99} s vs request p99 {p99} s"
    );
    eprintln!("prometheus: p99 request {p99:.6} s, p99 upstream {up99:.6} s");
    let info = prom.query(&format!("scoretap_build_info{{{job}}}")).await;
    assert!(
        info.len() == 1
            && info[0].value == 1.0
            && info[0].labels["version"]
                .as_str()
                .is_some_and(|v| !v.is_empty()),
        "scoretap_build_info: {info:?}"
    );

    let djob = r#"job="scoretap-dead""#;
    let dead_errors = prom
        .value_when(
            &format!(
                r#"sum(scoretap_proxy_errors_total{{{djob},kind="upstream_connect_failed"}})"#
            ),
            PROM_WAIT,
            |v| v == Some(3.0),
        )
        .await;
    assert_eq!(
        dead_errors,
        Some(3.0),
        "proxy_errors upstream_connect_failed"
    );
    assert_eq!(
        prom.value(&format!(
            r#"sum(scoretap_upstream_requests_total{{{djob},result="connect_error"}})"#
        ))
        .await,
        Some(3.0)
    );

    // Every dashboard query runs in this Prometheus and returns series (all are pre-registered).
    let mut empty = Vec::new();
    for f in dashboard_exprs(&load_dashboard()) {
        if !f.origin.ends_with(".expr") {
            continue;
        }
        let q = grafana_to_promql(&f.expr);
        if prom.query(&q).await.is_empty() {
            empty.push(format!("{}: {q}", f.origin));
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard queries with no series in a live Prometheus:\n{}",
        empty.join("\n")
    );

    // The alert rules load, evaluate cleanly, and react: 10/55 = 18% 5xx (> 5%) and connection
    // errors make their alerts pending (their `for` has not passed); nothing drops.
    let start = Instant::now();
    let (groups, problems) = loop {
        let groups = prom.rule_groups().await;
        let problems = alert_problems(&groups);
        if problems.is_empty() || start.elapsed() > PROM_WAIT {
            break (groups, problems);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        problems.is_empty(),
        "alert rules in a live Prometheus: {problems:#?}\nrules: {}",
        serde_json::to_string_pretty(&groups).unwrap_or_default()
    );
}

/// What is wrong with the live rule state after test a's traffic (empty when all is as expected).
fn alert_problems(groups: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    let rules: Vec<&Value> = groups
        .iter()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .collect();
    let want: BTreeSet<String> = alert_names(&load_alerts()).into_iter().collect();
    let have: BTreeSet<String> = rules
        .iter()
        .filter_map(|r| r["name"].as_str().map(str::to_string))
        .collect();
    if want != have {
        problems.push(format!("loaded alerts {have:?}, file has {want:?}"));
    }
    for r in &rules {
        let name = r["name"].as_str().unwrap_or("?");
        if r["health"] != "ok" {
            problems.push(format!(
                "{name}: health {} lastError {}",
                r["health"], r["lastError"]
            ));
        }
    }
    let active = |name: &str, job: &str| -> Option<String> {
        rules
            .iter()
            .find(|r| r["name"] == name)?
            .get("alerts")?
            .as_array()?
            .iter()
            .find(|a| a["labels"]["job"] == job)
            .and_then(|a| a["state"].as_str().map(str::to_string))
    };
    let expect = [
        ("ScoretapHigh5xxRatio", "scoretap", Some("pending")),
        ("ScoretapHigh5xxRatio", "scoretap-dead", Some("pending")),
        (
            "ScoretapUpstreamConnectErrors",
            "scoretap-dead",
            Some("pending"),
        ),
        ("ScoretapUpstreamConnectErrors", "scoretap", None),
        ("ScoretapCaptureDropping", "scoretap", None),
        ("ScoretapStorageFailing", "scoretap", None),
        ("ScoretapSpoolNearBudget", "scoretap", None),
        ("ScoretapCaptureRingNearlyFull", "scoretap", None),
    ];
    for (name, job, state) in expect {
        let got = active(name, job);
        if got.as_deref() != state {
            problems.push(format!(
                "{name} for job {job}: state {got:?}, expected {state:?}"
            ));
        }
    }
    problems
}

// ---------------------------------------------------------------- b. deploy/ names what exists

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_name_only_exported_metrics() {
    let dashboard = load_dashboard();
    let alerts = load_alerts();
    let mut exprs: Vec<FoundExpr> = dashboard_exprs(&dashboard);
    let dash_count = exprs.len();
    let rule_list = rule_exprs(&alerts);
    assert!(
        dash_count >= 15,
        "{}: only {dash_count} queries",
        dashboard_path().display()
    );
    assert!(
        rule_list.len() >= 5,
        "{}: only {} rules",
        alerts_path().display(),
        rule_list.len()
    );
    exprs.extend(rule_list.iter().cloned());

    // A fresh scoretap, no traffic: every name must already be there.
    let up = TestUpstream::start().await;
    let store = TraceStore::new();
    let proxy = proxy_with_store(&up, &store, &[]).await;
    let e = scrape(proxy.admin).await;
    let exported = e.sample_names();

    let mut problems = Vec::new();
    for f in &exprs {
        let names = metric_names(&f.expr);
        if names.is_empty() {
            problems.push(format!(
                "{}: names no scoretap metric: {}",
                f.origin, f.expr
            ));
        }
        for n in names {
            if e.types.get(&n).is_some_and(|t| t == "histogram") {
                problems.push(format!(
                    "{}: {n} is a histogram: query {n}_bucket / _sum / _count",
                    f.origin
                ));
            } else if !exported.contains(&n) {
                problems.push(format!("{}: {n} is not in /metrics", f.origin));
            } else if let Some((base, suffix)) = histogram_base(&n) {
                if e.types.get(base).map(String::as_str) != Some("histogram") {
                    problems.push(format!(
                        "{}: {n}: {base} is not a histogram ({suffix})",
                        f.origin
                    ));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "deploy/ names series scoretap does not export:\n{}\n--- /metrics names ---\n{exported:#?}",
        problems.join("\n")
    );

    // The dashboard shows what the brief asks for.
    let used: BTreeSet<String> = exprs[..dash_count]
        .iter()
        .flat_map(|f| metric_names(&f.expr))
        .collect();
    let want = [
        "scoretap_requests_total",
        "scoretap_request_duration_seconds_bucket",
        "scoretap_upstream_duration_seconds_bucket",
        "scoretap_request_body_bytes_bucket",
        "scoretap_response_body_bytes_bucket",
        "scoretap_upstream_requests_total",
        "scoretap_proxy_errors_total",
        "scoretap_capture_records_total",
        "scoretap_capture_dropped_total",
        "scoretap_ring_bytes",
        "scoretap_ring_capacity_bytes",
        "scoretap_spill_bytes_total",
        "scoretap_storage_requests_total",
        "scoretap_storage_duration_seconds_bucket",
        "scoretap_spool_bytes",
        "scoretap_build_info",
    ];
    let missing: Vec<&str> = want
        .iter()
        .copied()
        .filter(|n| !used.contains(*n))
        .collect();
    assert!(missing.is_empty(), "the dashboard never shows {missing:?}");
    assert!(
        exprs[..dash_count].iter().any(|f| f.expr.contains(
            "histogram_quantile(0.99, sum by (le) (rate(scoretap_request_duration_seconds_bucket"
        )),
        "the dashboard has no p99 request latency"
    );
    check_dashboard_shape(&dashboard);

    // The alerts cover drops, storage, spool, 5xx and connect errors, each with severity,
    // summary and description.
    let rule_used: BTreeSet<String> = rule_list
        .iter()
        .flat_map(|f| metric_names(&f.expr))
        .collect();
    for n in [
        "scoretap_capture_dropped_total",
        "scoretap_storage_requests_total",
        "scoretap_spool_bytes",
        "scoretap_requests_total",
        "scoretap_upstream_requests_total",
    ] {
        assert!(rule_used.contains(n), "no alert rule uses {n}");
    }
    for block in alerts.split("- alert:").skip(1) {
        let name = block.lines().next().unwrap_or("").trim();
        for key in ["expr:", "for:", "severity:", "summary:", "description:"] {
            assert!(block.contains(key), "alert {name} lacks {key}");
        }
    }

    // promtool accepts the rules and the example config (whose rule file path is relative).
    let Some(promtool_bin) = require("promtool") else {
        return;
    };
    let dir = workspace_root().join("deploy/prometheus");
    let (code, out) = promtool(&promtool_bin, &["check", "rules", "alerts.yml"], &dir);
    assert_eq!(code, Some(0), "promtool check rules alerts.yml:\n{out}");
    assert!(
        out.contains(&format!("{} rules found", alert_names(&alerts).len())),
        "promtool check rules: {out}"
    );
    let config = prometheus_config_path();
    let config_text = std::fs::read_to_string(&config).unwrap();
    assert!(
        config_text.contains("- alerts.yml") && config_text.contains("metrics_path: /metrics"),
        "{} should load alerts.yml (relative) and scrape /metrics",
        config.display()
    );
    // From another directory, so the relative rule file resolves against the config's own.
    let (code, out) = promtool(
        &promtool_bin,
        &["check", "config", &config.display().to_string()],
        &std::env::temp_dir(),
    );
    assert_eq!(code, Some(0), "promtool check config:\n{out}");
    assert!(out.contains("1 rule files found"), "{out}");
}

fn check_dashboard_shape(d: &Value) {
    let what = dashboard_path().display().to_string();
    assert!(
        d["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "{what}: schemaVersion {}",
        d["schemaVersion"]
    );
    assert!(d["title"].is_string() && d["uid"].is_string(), "{what}");
    let vars = d["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        vars.iter()
            .any(|v| v["name"] == "DS_PROMETHEUS" && v["type"] == "datasource"),
        "{what}: no DS_PROMETHEUS datasource variable"
    );
    let mut ids = BTreeSet::new();
    let mut panels: Vec<Value> = Vec::new();
    for p in d["panels"].as_array().cloned().unwrap_or_default() {
        panels.extend(p["panels"].as_array().cloned().unwrap_or_default());
        panels.push(p);
    }
    for p in &panels {
        let title = p["title"].as_str().unwrap_or("?");
        let id = p["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("{what}: panel {title} has no id"));
        assert!(ids.insert(id), "{what}: panel id {id} repeated ({title})");
        assert!(
            p["gridPos"]["w"].as_u64().is_some(),
            "{what}: {title} gridPos"
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(
            p["datasource"]["uid"], "${DS_PROMETHEUS}",
            "{what}: panel {title} datasource"
        );
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        assert!(!targets.is_empty(), "{what}: panel {title} has no query");
        let mut refs = BTreeSet::new();
        for t in targets {
            assert!(
                t["expr"].is_string(),
                "{what}: {title}: target without expr"
            );
            let r = t["refId"].as_str().unwrap_or("").to_string();
            assert!(!r.is_empty() && refs.insert(r), "{what}: {title}: refIds");
        }
    }
}

// ---------------------------------------------------------------- b'. the alerts' semantics

/// `promtool test rules`: each alert goes pending when its condition holds, fires only after its
/// `for`, and stays quiet for a healthy instance. Checked through the ALERTS series, so the
/// annotation wording is free to change.
#[test]
fn alert_rules_fire_after_their_for_and_not_for_healthy_instances() {
    let Some(promtool_bin) = require("promtool") else {
        return;
    };
    // (alert, `bad` series, `good` series, a time when pending, a time when firing, extra labels)
    type Case = (
        &'static str,
        &'static [(&'static str, &'static str)],
        &'static [(&'static str, &'static str)],
        &'static str,
        &'static str,
        &'static str,
    );
    const CASES: &[Case] = &[
        (
            "ScoretapCaptureDropping",
            &[(
                r#"scoretap_capture_dropped_total{reason="ring_full_bytes"}"#,
                "0+10x40",
            )],
            &[(
                r#"scoretap_capture_dropped_total{reason="ring_full_bytes"}"#,
                "0x40",
            )],
            "5m",
            "15m",
            "",
        ),
        (
            "ScoretapCaptureRingNearlyFull",
            &[
                ("scoretap_ring_bytes", "950x40"),
                ("scoretap_ring_capacity_bytes", "1000x40"),
            ],
            &[
                ("scoretap_ring_bytes", "500x40"),
                ("scoretap_ring_capacity_bytes", "1000x40"),
            ],
            "3m",
            "10m",
            "",
        ),
        (
            "ScoretapStorageFailing",
            &[
                (
                    r#"scoretap_storage_requests_total{sink="file",operation="write",result="error"}"#,
                    "0+5x40",
                ),
                (
                    r#"scoretap_storage_requests_total{sink="file",operation="write",result="ok"}"#,
                    "0+10x40",
                ),
            ],
            &[
                (
                    r#"scoretap_storage_requests_total{sink="file",operation="write",result="error"}"#,
                    "0x40",
                ),
                (
                    r#"scoretap_storage_requests_total{sink="file",operation="write",result="ok"}"#,
                    "0+10x40",
                ),
            ],
            "5m",
            "15m",
            r#",sink="file""#,
        ),
        (
            "ScoretapSpoolNearBudget",
            &[
                ("scoretap_spool_bytes", "900000000x40"),
                ("scoretap_spool_capacity_bytes", "1000000000x40"),
            ],
            &[
                ("scoretap_spool_bytes", "700000000x40"),
                ("scoretap_spool_capacity_bytes", "1000000000x40"),
            ],
            "5m",
            "15m",
            "",
        ),
        (
            "ScoretapHigh5xxRatio",
            &[
                (
                    r#"scoretap_requests_total{method="POST",status_class="5xx"}"#,
                    "0+10x40",
                ),
                (
                    r#"scoretap_requests_total{method="POST",status_class="2xx"}"#,
                    "0+90x40",
                ),
            ],
            &[
                (
                    r#"scoretap_requests_total{method="POST",status_class="5xx"}"#,
                    "0+1x40",
                ),
                (
                    r#"scoretap_requests_total{method="POST",status_class="2xx"}"#,
                    "0+99x40",
                ),
            ],
            "3m",
            "10m",
            "",
        ),
        (
            "ScoretapUpstreamConnectErrors",
            &[(
                r#"scoretap_upstream_requests_total{result="connect_error"}"#,
                "0+3x40",
            )],
            &[(
                r#"scoretap_upstream_requests_total{result="connect_error"}"#,
                "0x40",
            )],
            "3m",
            "10m",
            "",
        ),
    ];
    let alerts = load_alerts();
    let covered: BTreeSet<&str> = CASES.iter().map(|c| c.0).collect();
    let all: BTreeSet<String> = alert_names(&alerts).into_iter().collect();
    let untested: Vec<&String> = all
        .iter()
        .filter(|a| !covered.contains(a.as_str()))
        .collect();
    assert!(
        untested.is_empty(),
        "alerts without a promtool case: {untested:?}"
    );
    let severity = |name: &str| -> String {
        let block = alerts
            .split("- alert:")
            .find(|b| b.lines().next().is_some_and(|l| l.trim() == name))
            .unwrap_or_else(|| panic!("alert {name} not in alerts.yml"));
        block
            .lines()
            .find_map(|l| l.trim().strip_prefix("severity:"))
            .map(|s| s.trim().trim_matches('"').to_string())
            .unwrap_or_else(|| panic!("alert {name} has no severity"))
    };

    let mut y = format!(
        "rule_files:\n  - {:?}\nevaluation_interval: 1m\ntests:\n",
        alerts_path().display().to_string()
    );
    for (alert, bad, good, pending_at, firing_at, extra) in CASES {
        let sev = severity(alert);
        y.push_str("  - interval: 1m\n    input_series:\n");
        for (instance, series) in [("bad", bad), ("good", good)] {
            for (s, values) in series.iter() {
                let with = format!(r#"job="scoretap",instance="{instance}""#);
                let s = match s.strip_suffix('}') {
                    Some(open) => format!("{open},{with}}}"),
                    None => format!("{s}{{{with}}}"),
                };
                y.push_str(&format!(
                    "      - series: '{s}'\n        values: '{values}'\n"
                ));
            }
        }
        let labels = |state: &str| {
            format!(
                r#"ALERTS{{alertname="{alert}",alertstate="{state}",instance="bad",job="scoretap",severity="{sev}"{extra}}}"#
            )
        };
        y.push_str("    promql_expr_test:\n");
        for (at, state) in [(pending_at, "pending"), (firing_at, "firing")] {
            y.push_str(&format!(
                "      - expr: 'ALERTS{{alertname=\"{alert}\"}}'\n        eval_time: {at}\n        exp_samples:\n          - labels: '{}'\n            value: 1\n",
                labels(state)
            ));
        }
        // Never anything for the healthy instance.
        y.push_str(&format!(
            "      - expr: 'ALERTS{{alertname=\"{alert}\",instance=\"good\"}}'\n        eval_time: 30m\n        exp_samples: []\n"
        ));
    }
    let dir = TempDir::new("promtool");
    let file: PathBuf = dir.join("alerts_test.yml");
    std::fs::write(&file, &y).unwrap();
    let (code, out) = promtool(
        &promtool_bin,
        &["test", "rules", &file.display().to_string()],
        dir.path(),
    );
    assert_eq!(
        code,
        Some(0),
        "promtool test rules:\n{out}\n--- {} ---\n{y}",
        file.display()
    );
}

// ---------------------------------------------------------------- series exist from startup

#[tokio::test]
async fn every_contract_series_exists_from_startup() {
    let up = TestUpstream::start().await;
    let store = TraceStore::new();
    let proxy = proxy_with_store(&up, &store, &["--capture-buffer-bytes", "2MiB"]).await;
    let e = scrape(proxy.admin).await;
    let mut missing = Vec::new();
    let mut check =
        |name: &str, labels: &[(&str, &str)], want: Option<f64>| match e.get(name, labels) {
            None => missing.push(format!("{name}{} missing", fmt_labels(labels))),
            Some(v) => {
                if let Some(w) = want {
                    if v != w {
                        missing.push(format!("{name}{} = {v}, expected {w}", fmt_labels(labels)));
                    }
                }
            }
        };
    for m in METHODS {
        for c in STATUS_CLASSES {
            check(
                "scoretap_requests_total",
                &[("method", m), ("status_class", c)],
                Some(0.0),
            );
        }
    }
    for r in UPSTREAM_RESULTS {
        check(
            "scoretap_upstream_requests_total",
            &[("result", r)],
            Some(0.0),
        );
    }
    for k in PROXY_ERROR_KINDS {
        check("scoretap_proxy_errors_total", &[("kind", k)], Some(0.0));
    }
    for o in OUTCOMES {
        check(
            "scoretap_capture_records_total",
            &[("outcome", o)],
            Some(0.0),
        );
    }
    for r in DROP_REASONS {
        check(
            "scoretap_capture_dropped_total",
            &[("reason", r)],
            Some(0.0),
        );
    }
    check("scoretap_ring_bytes", &[], Some(0.0));
    check(
        "scoretap_ring_capacity_bytes",
        &[],
        Some(2.0 * 1024.0 * 1024.0),
    );
    check("scoretap_spill_bytes_total", &[("sink", "file")], Some(0.0));
    check("scoretap_spool_bytes", &[], Some(0.0));
    check("scoretap_spool_capacity_bytes", &[], Some(0.0));
    for r in ["ok", "error"] {
        check(
            "scoretap_storage_requests_total",
            &[("sink", "file"), ("operation", "write"), ("result", r)],
            None,
        );
    }
    let storage = [("sink", "file"), ("operation", "write")];
    for h in HISTOGRAMS {
        let labels: &[(&str, &str)] = if h == "scoretap_storage_duration_seconds" {
            &storage
        } else {
            &[]
        };
        let buckets: &[&str] = if h.ends_with("_bytes") {
            &SIZE_BUCKETS
        } else {
            &DURATION_BUCKETS
        };
        let want = if h == "scoretap_storage_duration_seconds" {
            None
        } else {
            Some(0.0)
        };
        for le in buckets {
            let mut l = labels.to_vec();
            l.push(("le", le));
            check(&format!("{h}_bucket"), &l, want);
        }
        check(&format!("{h}_sum"), labels, want);
        check(&format!("{h}_count"), labels, want);
    }
    assert!(
        missing.is_empty(),
        "series not there (or not 0) at startup:\n{}\n--- /metrics ---\n{}",
        missing.join("\n"),
        e.text
    );
    let info = e.series("scoretap_build_info");
    assert!(
        info.len() == 1
            && info[0].value == 1.0
            && info[0].labels.keys().eq(["version"].iter())
            && !info[0].labels["version"].is_empty(),
        "scoretap_build_info: {info:?}"
    );
    for (name, ty) in [
        ("scoretap_requests_total", "counter"),
        ("scoretap_request_duration_seconds", "histogram"),
        ("scoretap_ring_bytes", "gauge"),
        ("scoretap_capture_dropped_total", "counter"),
        ("scoretap_spool_bytes", "gauge"),
        ("scoretap_spool_capacity_bytes", "gauge"),
    ] {
        assert_eq!(
            e.types.get(name).map(String::as_str),
            Some(ty),
            "# TYPE of {name}"
        );
    }
    // Labels are bounded: no series carries anything but the contract's label names.
    let allowed = [
        "method",
        "status_class",
        "result",
        "kind",
        "outcome",
        "reason",
        "sink",
        "operation",
        "le",
        "version",
    ];
    for s in &e.samples {
        assert!(
            s.name.starts_with("scoretap_"),
            "unexpected series {} in /metrics",
            s.name
        );
        for k in s.labels.keys() {
            assert!(allowed.contains(&k.as_str()), "{}: label {k}", s.name);
        }
    }
}

// ---------------------------------------------------------------- c. --metrics false

#[tokio::test]
async fn metrics_flag_off_hides_the_endpoint() {
    let up = TestUpstream::start().await;
    for (how, proxy) in [
        (
            "--metrics false",
            Scoretap::builder()
                .args(upstream_args(&up))
                .args(["--metrics", "false"])
                .start()
                .await,
        ),
        (
            "SCORETAP_METRICS=false",
            Scoretap::builder()
                .args(upstream_args(&up))
                .env("SCORETAP_METRICS", "false")
                .start()
                .await,
        ),
    ] {
        let (status, _, body) = get_metrics(proxy.admin).await.expect("admin reachable");
        assert_eq!(status, 404, "{how}: GET /metrics; body {body:?}");
        let mut c = Client::connect(proxy.addr, Proto::H1).await;
        let r = c
            .post("/echo", Bytes::from_static(b"{\"still\":\"proxying\"}"))
            .await;
        assert_eq!(r.status, 200, "{how}: proxying");
        assert_eq!(&r.body[..], b"{\"still\":\"proxying\"}", "{how}");
        assert_eq!(
            proxy.admin_get("/healthz").await.map(|(s, _)| s),
            Some(200),
            "{how}: /healthz"
        );
    }
    // And on by default / explicitly.
    for extra in [&[][..], &["--metrics", "true"][..]] {
        let proxy = Scoretap::builder()
            .args(upstream_args(&up))
            .args(extra.iter().copied())
            .start()
            .await;
        let e = scrape(proxy.admin).await;
        assert!(
            !e.series("scoretap_build_info").is_empty(),
            "{extra:?}: /metrics without scoretap_build_info"
        );
    }
}

// ---------------------------------------------------------------- d. capture counters

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_reflect_capture_drops_and_records() {
    let up = TestUpstream::start().await;

    // A stalled sink (stdout is a pipe nobody reads) and a 64 KiB ring: capture must drop.
    let mut stalled = Scoretap::builder()
        .args(upstream_args(&up))
        .args(["--store", "stdout"])
        .args(["--capture-buffer-bytes", "64KiB"])
        .pipe_stdout()
        .start()
        .await;
    let _pipe = stalled.take_stdout_pipe().expect("stdout pipe");
    let e0 = scrape(stalled.admin).await;
    assert_eq!(
        e0.value("scoretap_ring_capacity_bytes", &[]),
        65536.0,
        "--capture-buffer-bytes 64KiB"
    );
    let n = 40;
    let mut c = Client::connect(stalled.addr, Proto::H1).await;
    send_n(&mut c, n, "POST", "/echo", |i| json_body(i, 16 * 1024), 200).await;
    let drops = |e: &Exposition| {
        e.value(
            "scoretap_capture_dropped_total",
            &[("reason", "ring_full_bytes")],
        ) + e.value(
            "scoretap_capture_dropped_total",
            &[("reason", "ring_full_slots")],
        )
    };
    let e = scrape_until(&stalled, METRICS_WAIT, |e| drops(e) > 0.0).await;
    assert!(
        drops(&e) > 0.0,
        "{n} × 16 KiB bodies through a 64 KiB ring with a stalled sink must drop:\n{}\n{}",
        e.describe("scoretap_capture_dropped_total"),
        e.describe("scoretap_ring_bytes")
    );
    assert_eq!(e.value("scoretap_ring_capacity_bytes", &[]), 65536.0);
    let ring = e.value("scoretap_ring_bytes", &[]);
    assert!(
        (0.0..=65536.0).contains(&ring),
        "scoretap_ring_bytes {ring} outside the 64 KiB budget"
    );
    assert_eq!(
        e.sum("scoretap_requests_total", &[("status_class", "2xx")]),
        n as f64,
        "every request was answered and counted despite the stalled sink"
    );
    // /metrics and GET /capture tell the same story once nothing moves.
    let start = Instant::now();
    let (st, em) = loop {
        let st = capture_state(stalled.admin).await;
        let em = scrape(stalled.admin).await;
        let same = DROP_REASONS.iter().all(|r| {
            st["stats"]["dropped"][*r].as_u64().map(|v| v as f64)
                == em.get("scoretap_capture_dropped_total", &[("reason", r)])
        });
        if same || start.elapsed() > METRICS_WAIT {
            break (st, em);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for r in DROP_REASONS {
        assert_eq!(
            st["stats"]["dropped"][r].as_u64().map(|v| v as f64),
            em.get("scoretap_capture_dropped_total", &[("reason", r)]),
            "drops for {r}: GET /capture {} vs /metrics\n{}",
            st["stats"],
            em.describe("scoretap_capture_dropped_total")
        );
    }
    assert_eq!(
        st["stats"]["ring_capacity_bytes"].as_u64(),
        Some(65536),
        "{st}"
    );
    drop(c);
    drop(stalled);

    // A working file store: one ok record per request, and counted as such.
    let store = TraceStore::new();
    let proxy = proxy_with_store(&up, &store, &[]).await;
    let n = 25;
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    send_n(&mut c, n, "POST", "/echo", |i| json_body(i, 200), 200).await;
    for i in 0..n {
        store.wait(&format!("m_echo-{i}")).await;
    }
    let e = scrape_until(&proxy, METRICS_WAIT, |e| {
        e.get("scoretap_capture_records_total", &[("outcome", "ok")]) == Some(n as f64)
    })
    .await;
    assert_eq!(
        e.value("scoretap_capture_records_total", &[("outcome", "ok")]),
        n as f64,
        "records written: {}\n{}",
        store.records().len(),
        e.describe("scoretap_capture_records_total")
    );
    assert_eq!(
        e.sum("scoretap_capture_records_total", &[]),
        n as f64,
        "only ok records:\n{}",
        e.describe("scoretap_capture_records_total")
    );
    assert_eq!(
        e.sum("scoretap_capture_dropped_total", &[]),
        0.0,
        "no drop with a 64 MiB ring and a working store"
    );
    assert_eq!(
        e.value("scoretap_ring_capacity_bytes", &[]),
        64.0 * 1024.0 * 1024.0
    );
    let file_ok = e.value(
        "scoretap_storage_requests_total",
        &[("sink", "file"), ("operation", "write"), ("result", "ok")],
    );
    let file_err = e.value(
        "scoretap_storage_requests_total",
        &[
            ("sink", "file"),
            ("operation", "write"),
            ("result", "error"),
        ],
    );
    assert!(
        file_ok >= 1.0 && file_err == 0.0,
        "trace file writes: ok {file_ok}, error {file_err}\n{}",
        e.describe("scoretap_storage_requests_total")
    );
    assert_eq!(
        e.histogram_count(
            "scoretap_storage_duration_seconds",
            &[("sink", "file"), ("operation", "write")]
        ),
        file_ok + file_err,
        "every storage operation is timed:\n{}",
        e.describe("scoretap_storage_duration_seconds")
    );
}

/// `scoretap_connections_active` counts the client connections being served and
/// `scoretap_requests_in_flight` the requests whose response has not ended; both go back to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_and_requests_in_flight_are_gauges() {
    let up = TestUpstream::start().await;
    let store = TraceStore::new();
    let proxy = proxy_with_store(&up, &store, &[]).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(Client::connect(proxy.addr, Proto::H1).await);
    }
    let mut slow = Vec::new();
    for client in clients.iter_mut().take(2) {
        let request = client
            .req("GET", "/delay?ms=1500")
            .body(scoretap_tests::client::empty())
            .unwrap();
        slow.push(client.send(request));
    }
    let answers = futures_util::future::join_all(slow);
    let during = async {
        scrape_until(&proxy, Duration::from_secs(1), |e| {
            e.value("scoretap_requests_in_flight", &[]) >= 2.0
        })
        .await
    };
    let (answers, during) = tokio::join!(answers, during);
    assert_eq!(during.value("scoretap_requests_in_flight", &[]), 2.0);
    assert_eq!(during.value("scoretap_connections_active", &[]), 3.0);
    for answer in answers {
        let answer = answer.unwrap();
        assert_eq!(answer.status(), 200);
        let _ = http_body_util::BodyExt::collect(answer.into_body()).await;
    }
    let after = scrape_until(&proxy, Duration::from_secs(2), |e| {
        e.value("scoretap_requests_in_flight", &[]) == 0.0
    })
    .await;
    assert_eq!(after.value("scoretap_requests_in_flight", &[]), 0.0);
    drop(clients);
    let closed = scrape_until(&proxy, Duration::from_secs(3), |e| {
        e.value("scoretap_connections_active", &[]) == 0.0
    })
    .await;
    assert_eq!(closed.value("scoretap_connections_active", &[]), 0.0);
}
