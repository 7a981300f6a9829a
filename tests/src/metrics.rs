//! Reading scoretap's Prometheus metrics: `GET /metrics` on the admin listener, a parser for the
//! text exposition format, and scanners that pull metric names out of PromQL expressions (the
//! Grafana dashboard's and the alert rules') without a YAML or PromQL dependency.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde_json::Value;

use crate::traces::{admin_request, cut};
use crate::util::workspace_root;

/// The prefix of every metric scoretap exports.
pub const PREFIX: &str = "scoretap_";

/// Suffixes of a histogram's series (`NAME_bucket{le=..}`, `NAME_sum`, `NAME_count`).
pub const HISTOGRAM_SUFFIXES: [&str; 3] = ["_bucket", "_sum", "_count"];

/// One sample line: `name{labels} value [timestamp]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    /// Does this sample carry every `(name, value)` pair of `filter`?
    pub fn matches(&self, filter: &[(&str, &str)]) -> bool {
        filter
            .iter()
            .all(|(k, v)| self.labels.get(*k).is_some_and(|have| have == v))
    }
    /// Are this sample's labels exactly `labels`?
    pub fn has_exactly(&self, labels: &[(&str, &str)]) -> bool {
        self.labels.len() == labels.len() && self.matches(labels)
    }
}

/// A parsed exposition: samples in order, and `# TYPE` / `# HELP` per metric family.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    /// Family name → `counter`, `gauge`, `histogram`, `summary`, `untyped`.
    pub types: BTreeMap<String, String>,
    pub help: BTreeMap<String, String>,
    pub text: String,
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse().map_err(|e| format!("bad value {s:?}: {e}")),
    }
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// `{a="x",b="y\"z"}` at the start of `s` → (labels, rest after `}`).
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s.strip_prefix('{').ok_or("labels must start with {")?;
    loop {
        rest = rest.trim_start_matches([' ', ',']);
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let end = rest
            .find(|c: char| !is_name_char(c))
            .ok_or("unterminated label set")?;
        let name = &rest[..end];
        if name.is_empty() {
            return Err(format!("empty label name at {rest:?}"));
        }
        rest = rest[end..].trim_start();
        rest = rest
            .strip_prefix('=')
            .ok_or_else(|| format!("label {name}: expected ="))?
            .trim_start();
        rest = rest
            .strip_prefix('"')
            .ok_or_else(|| format!("label {name}: expected a quoted value"))?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let close = loop {
            match chars.next() {
                None => return Err(format!("label {name}: unterminated value")),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => return Err(format!("label {name}: dangling escape")),
                },
                Some((_, c)) => value.push(c),
            }
        };
        rest = &rest[close + 1..];
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("label {name} repeated"));
        }
    }
}

impl Exposition {
    /// Parse the Prometheus text format (0.0.4). Any malformed line is an error naming it.
    pub fn parse(text: &str) -> Result<Exposition, String> {
        let mut out = Exposition {
            text: text.to_string(),
            ..Default::default()
        };
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() {
                continue;
            }
            let err = |e: String| format!("line {}: {e}: {raw:?}", n + 1);
            if let Some(c) = line.strip_prefix('#') {
                let mut it = c.trim_start().splitn(3, ' ');
                match (it.next(), it.next(), it.next()) {
                    (Some("TYPE"), Some(name), Some(ty)) => {
                        out.types.insert(name.to_string(), ty.trim().to_string());
                    }
                    (Some("HELP"), Some(name), help) => {
                        out.help
                            .insert(name.to_string(), help.unwrap_or("").to_string());
                    }
                    _ => {}
                }
                continue;
            }
            if !line.starts_with(is_name_start) {
                return Err(err("does not start with a metric name".into()));
            }
            let end = line.find(|c: char| !is_name_char(c)).unwrap_or(line.len());
            let name = &line[..end];
            let mut rest = &line[end..];
            let mut labels = BTreeMap::new();
            if rest.starts_with('{') {
                let (l, r) = parse_labels(rest).map_err(err)?;
                labels = l;
                rest = r;
            }
            let mut fields = rest.split_whitespace();
            let value = fields
                .next()
                .ok_or_else(|| err("no value".into()))
                .and_then(|v| parse_value(v).map_err(err))?;
            if let Some(ts) = fields.next() {
                ts.parse::<i64>()
                    .map_err(|e| err(format!("bad timestamp {ts:?}: {e}")))?;
            }
            if fields.next().is_some() {
                return Err(err("trailing fields".into()));
            }
            out.samples.push(Sample {
                name: name.to_string(),
                labels,
                value,
            });
        }
        Ok(out)
    }

    /// Every sample name (histograms contribute `_bucket`, `_sum`, `_count`).
    pub fn sample_names(&self) -> BTreeSet<String> {
        self.samples.iter().map(|s| s.name.clone()).collect()
    }

    /// Samples of `name` (exact sample name).
    pub fn series(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }

    /// The value of the sample `name` whose labels are exactly `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| s.name == name && s.has_exactly(labels))
            .map(|s| s.value)
    }

    /// Like [`Exposition::get`], panicking with the family's series when it is missing.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or_else(|| {
            panic!(
                "/metrics has no {name}{} — its series are:\n{}",
                fmt_labels(labels),
                self.describe(name)
            )
        })
    }

    /// Sum of every sample `name` carrying the `filter` labels (0 when there is none).
    pub fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name && s.matches(filter))
            .map(|s| s.value)
            .sum()
    }

    /// The `_count` of histogram `base` with exactly `labels`.
    pub fn histogram_count(&self, base: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(&format!("{base}_count"), labels)
    }

    /// The series of a family (by exact name or histogram base), one per line, for messages.
    pub fn describe(&self, name: &str) -> String {
        let base = histogram_base(name).map_or(name, |(b, _)| b);
        let mut s = String::new();
        for sample in &self.samples {
            let belongs = sample.name == name
                || sample.name == base
                || HISTOGRAM_SUFFIXES
                    .iter()
                    .any(|suf| sample.name.strip_suffix(suf) == Some(base));
            if belongs {
                let _ = writeln!(
                    s,
                    "  {}{} {}",
                    sample.name,
                    fmt_map(&sample.labels),
                    sample.value
                );
            }
        }
        if s.is_empty() {
            s = format!("  (none; the exposition is)\n{}", cut(&self.text, 6000));
        }
        s
    }
}

/// `{a="x",b="y"}` (empty string for no labels).
pub fn fmt_labels(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    format!("{{{}}}", inner.join(","))
}

fn fmt_map(labels: &BTreeMap<String, String>) -> String {
    let pairs: Vec<(&str, &str)> = labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    fmt_labels(&pairs)
}

/// `NAME_bucket` → `(NAME, "_bucket")`, likewise `_sum` / `_count`; None otherwise.
pub fn histogram_base(name: &str) -> Option<(&str, &'static str)> {
    HISTOGRAM_SUFFIXES
        .iter()
        .find_map(|suf| name.strip_suffix(suf).map(|base| (base, *suf)))
}

/// `GET /metrics` on the admin listener → (status, content-type, body); None if unreachable.
pub async fn get_metrics(admin: SocketAddr) -> Option<(u16, Option<String>, String)> {
    let r = admin_request(admin, "GET", "/metrics", &[], b"").await?;
    Some((
        r.status(),
        r.header("content-type").map(str::to_string),
        r.body_str(),
    ))
}

/// `GET /metrics` → the parsed exposition. Panics unless 200 + text/plain + parseable.
pub async fn scrape(admin: SocketAddr) -> Exposition {
    let (status, ct, body) = get_metrics(admin)
        .await
        .unwrap_or_else(|| panic!("GET http://{admin}/metrics: no response"));
    assert_eq!(
        status,
        200,
        "GET http://{admin}/metrics status; body {}",
        cut(&body, 2000)
    );
    let ct = ct.unwrap_or_default();
    assert!(
        ct.starts_with("text/plain"),
        "GET /metrics content-type should be text/plain (Prometheus text format), got {ct:?}"
    );
    Exposition::parse(&body).unwrap_or_else(|e| {
        panic!(
            "/metrics is not valid Prometheus text format: {e}\n{}",
            cut(&body, 6000)
        )
    })
}

// ---------------------------------------------------------------- PromQL name scanning

/// Metric names (identifiers starting with `prefix`) in a PromQL expression. String literals
/// (`"..."`, `'...'`, `` `...` ``) are skipped, so label values never count; so are Grafana
/// variables (`$job`, `${DS}`, `$__rate_interval`) since `$` is not an identifier character.
pub fn metric_names_with_prefix(expr: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut chars = expr.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' | '\'' | '`' => {
                // Skip the literal (backslash escapes apply to "..." and '...').
                while let Some((_, d)) = chars.next() {
                    if d == '\\' && c != '`' {
                        chars.next();
                    } else if d == c {
                        break;
                    }
                }
            }
            '$' => {
                // A Grafana variable: skip `${...}` or `$name`.
                if chars.peek().is_some_and(|(_, d)| *d == '{') {
                    for (_, d) in chars.by_ref() {
                        if d == '}' {
                            break;
                        }
                    }
                } else {
                    while chars.peek().is_some_and(|(_, d)| is_name_char(*d)) {
                        chars.next();
                    }
                }
            }
            c if is_name_start(c) => {
                let mut end = i + c.len_utf8();
                while let Some((j, d)) = chars.peek().copied() {
                    if !is_name_char(d) {
                        break;
                    }
                    end = j + d.len_utf8();
                    chars.next();
                }
                let ident = &expr[i..end];
                if ident.starts_with(prefix) {
                    out.insert(ident.to_string());
                }
            }
            c if c.is_ascii_digit() => {
                // A number (1e3, 0x1f, 5m): eat the alphanumerics glued to it.
                while chars
                    .peek()
                    .is_some_and(|(_, d)| is_name_char(*d) || *d == '.')
                {
                    chars.next();
                }
            }
            _ => {}
        }
    }
    out
}

/// scoretap metric names in a PromQL expression.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    metric_names_with_prefix(expr, PREFIX)
}

/// A PromQL expression found in a deploy file, with where it was found.
#[derive(Debug, Clone)]
pub struct FoundExpr {
    pub origin: String,
    pub expr: String,
}

/// Every PromQL string of a Grafana dashboard: panel targets' `expr` (rows' nested panels
/// included) and query variables' `query` / `definition`.
pub fn dashboard_exprs(dashboard: &Value) -> Vec<FoundExpr> {
    fn walk(v: &Value, path: &str, out: &mut Vec<FoundExpr>) {
        match v {
            Value::Object(o) => {
                let here = o
                    .get("title")
                    .or_else(|| o.get("name"))
                    .and_then(Value::as_str)
                    .map(|t| format!("{path} > {t}"))
                    .unwrap_or_else(|| path.to_string());
                for (k, child) in o {
                    match (k.as_str(), child) {
                        ("expr" | "definition", Value::String(s)) => out.push(FoundExpr {
                            origin: format!("{here} .{k}"),
                            expr: s.clone(),
                        }),
                        ("query", Value::String(s)) if s.contains(PREFIX) => out.push(FoundExpr {
                            origin: format!("{here} .query"),
                            expr: s.clone(),
                        }),
                        _ => walk(child, &here, out),
                    }
                }
            }
            Value::Array(a) => {
                for child in a {
                    walk(child, path, out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dashboard, "dashboard", &mut out);
    out
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// Strip a trailing `# comment` outside quotes from a plain YAML scalar.
fn strip_yaml_comment(s: &str) -> &str {
    let mut quote = None;
    for (i, c) in s.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') if i == 0 || s[..i].ends_with(' ') => return s[..i].trim_end(),
            _ => {}
        }
    }
    s
}

/// `expr:` values of a Prometheus rule file, line based: plain or quoted scalars on the same line,
/// and block scalars (`expr: |`, `expr: >-`) spanning the more-indented lines after it. Each is
/// named by the `alert:` / `record:` above it.
pub fn rule_exprs(yaml: &str) -> Vec<FoundExpr> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    let mut rule = String::from("?");
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let t = line.trim_start().trim_start_matches("- ").trim_start();
        for key in ["alert:", "record:"] {
            if let Some(v) = t.strip_prefix(key) {
                rule = format!("{key} {}", strip_yaml_comment(v.trim()).trim_matches('"'));
            }
        }
        if let Some(v) = t.strip_prefix("expr:") {
            let v = strip_yaml_comment(v.trim());
            let expr = if v.starts_with('|') || v.starts_with('>') {
                let base = indent_of(line);
                let mut body = Vec::new();
                while i + 1 < lines.len()
                    && (lines[i + 1].trim().is_empty() || indent_of(lines[i + 1]) > base)
                {
                    i += 1;
                    body.push(lines[i].trim());
                }
                body.join(" ").trim().to_string()
            } else if let Some(q) = v.strip_prefix('"').and_then(|q| q.strip_suffix('"')) {
                q.replace("\\\"", "\"").replace("\\\\", "\\")
            } else if let Some(q) = v.strip_prefix('\'').and_then(|q| q.strip_suffix('\'')) {
                q.replace("''", "'")
            } else {
                v.to_string()
            };
            out.push(FoundExpr {
                origin: format!("{rule} .expr"),
                expr,
            });
        }
        i += 1;
    }
    out
}

/// `deploy/grafana/scoretap.json`
pub fn dashboard_path() -> PathBuf {
    workspace_root().join("deploy/grafana/scoretap.json")
}

/// `deploy/prometheus/alerts.yml`
pub fn alerts_path() -> PathBuf {
    workspace_root().join("deploy/prometheus/alerts.yml")
}

/// `deploy/prometheus/prometheus.yml`
pub fn prometheus_config_path() -> PathBuf {
    workspace_root().join("deploy/prometheus/prometheus.yml")
}

/// The dashboard, parsed.
pub fn load_dashboard() -> Value {
    let p = dashboard_path();
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", p.display()))
}

/// The alert rules file's text.
pub fn load_alerts() -> String {
    let p = alerts_path();
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// Alert names (`- alert: NAME`) of a rule file.
pub fn alert_names(yaml: &str) -> Vec<String> {
    yaml.lines()
        .filter_map(|l| {
            let t = l.trim_start().trim_start_matches("- ").trim_start();
            t.strip_prefix("alert:")
                .map(|v| strip_yaml_comment(v.trim()).trim_matches('"').to_string())
        })
        .collect()
}

/// Replace Grafana's variables so a dashboard expression runs as plain PromQL.
pub fn grafana_to_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "5m")
        .replace("${job}", ".*")
        .replace("${instance}", ".*")
        .replace("$job", ".*")
        .replace("$instance", ".*")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_counters_gauges_histograms() {
        let text = "# HELP a_total Things.\n# TYPE a_total counter\n\
            a_total{method=\"GET\",status_class=\"2xx\"} 3\n\
            a_total{method=\"POST\",status_class=\"5xx\"} 1 1700000000000\n\
            # TYPE g gauge\ng 1.5e3\n\
            # TYPE h histogram\nh_bucket{le=\"0.5\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.7\nh_count 2\n\
            b{v=\"a\\\"q\\\\z\\n\"} NaN\n";
        let e = Exposition::parse(text).unwrap();
        assert_eq!(e.types["a_total"], "counter");
        assert_eq!(e.types["h"], "histogram");
        assert_eq!(
            e.get("a_total", &[("method", "GET"), ("status_class", "2xx")]),
            Some(3.0)
        );
        assert_eq!(e.get("a_total", &[("method", "GET")]), None);
        assert_eq!(e.sum("a_total", &[]), 4.0);
        assert_eq!(e.sum("a_total", &[("status_class", "5xx")]), 1.0);
        assert_eq!(e.value("g", &[]), 1500.0);
        assert_eq!(e.get("h_bucket", &[("le", "+Inf")]), Some(2.0));
        assert_eq!(e.histogram_count("h", &[]), 2.0);
        let b = e.series("b");
        assert_eq!(b[0].labels["v"], "a\"q\\z\n");
        assert!(b[0].value.is_nan());
        assert!(e.sample_names().contains("h_sum"));
        assert!(Exposition::parse("x{a=\"1\" 2\n").is_err());
        assert!(Exposition::parse("x 1 2 3\n").is_err());
        assert!(Exposition::parse("x abc\n").is_err());
    }

    #[test]
    fn finds_metric_names_in_promql() {
        let e = r#"histogram_quantile(0.99, sum by (le) (rate(scoretap_request_duration_seconds_bucket{job=~"$job", x="scoretap_not_a_metric"}[$__rate_interval]))) / on() scoretap_ring_bytes + ${scoretap_var} + 1e3"#;
        let names: Vec<String> = metric_names(e).into_iter().collect();
        assert_eq!(
            names,
            [
                "scoretap_request_duration_seconds_bucket",
                "scoretap_ring_bytes"
            ]
        );
        assert!(metric_names("up == 0").is_empty());
        assert_eq!(
            histogram_base("scoretap_x_seconds_count"),
            Some(("scoretap_x_seconds", "_count"))
        );
        assert_eq!(histogram_base("scoretap_requests_total"), None);
    }

    #[test]
    fn extracts_rule_exprs_plain_quoted_and_block() {
        let y = "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: scoretap_a > 0 # c\n\
                 \x20     - alert: B\n        expr: \"scoretap_b{x=\\\"y\\\"} > 1\"\n\
                 \x20     - record: r:c\n        expr: |\n          sum(scoretap_c)\n            / 2\n        labels:\n          a: b\n\
                 \x20     - alert: D\n        expr: >-\n          scoretap_d\n        for: 5m\n";
        let found = rule_exprs(y);
        let got: Vec<(&str, &str)> = found
            .iter()
            .map(|f| (f.origin.as_str(), f.expr.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("alert: A .expr", "scoretap_a > 0"),
                ("alert: B .expr", "scoretap_b{x=\"y\"} > 1"),
                ("record: r:c .expr", "sum(scoretap_c) / 2"),
                ("alert: D .expr", "scoretap_d"),
            ]
        );
        assert_eq!(alert_names(y), ["A", "B", "D"]);
    }

    #[test]
    fn collects_dashboard_exprs_from_nested_panels_and_variables() {
        let d = serde_json::json!({
            "panels": [
                {"title": "p1", "targets": [{"expr": "scoretap_a"}]},
                {"type": "row", "title": "r", "panels": [{"title": "p2", "targets": [{"expr": "scoretap_b"}]}]}
            ],
            "templating": {"list": [{"name": "job", "definition": "label_values(scoretap_c, job)",
                "query": {"query": "label_values(scoretap_c, job)"}}]}
        });
        let exprs: Vec<String> = dashboard_exprs(&d).into_iter().map(|f| f.expr).collect();
        assert!(exprs.contains(&"scoretap_a".to_string()), "{exprs:?}");
        assert!(exprs.contains(&"scoretap_b".to_string()), "{exprs:?}");
        assert!(
            exprs.contains(&"label_values(scoretap_c, job)".to_string()),
            "{exprs:?}"
        );
    }
}
