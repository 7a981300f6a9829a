//! A real Prometheus server (and `promtool`) for the metrics tests: Debian's `prometheus` package,
//! installed by scripts/install-test-deps.sh. Tests that need them fail when they are missing,
//! unless `SCORETAP_SKIP_PROMETHEUS=1`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::traces::{admin_request, cut};
use crate::util::{free_port, which, TempDir};

/// Set to `1` to skip the tests that need `prometheus` / `promtool`.
pub const SKIP_ENV: &str = "SCORETAP_SKIP_PROMETHEUS";

/// Is `SCORETAP_SKIP_PROMETHEUS=1`?
pub fn skipped() -> bool {
    std::env::var(SKIP_ENV).as_deref() == Ok("1")
}

/// The path of `program` (`prometheus`, `promtool`); None when skipped (after saying so),
/// a clear panic when it is missing.
pub fn require(program: &str) -> Option<PathBuf> {
    if skipped() {
        eprintln!("{SKIP_ENV}=1: skipping the part of this test that needs {program}");
        return None;
    }
    Some(which(program).unwrap_or_else(|| {
        panic!(
            "{program} is not on PATH: run scripts/install-test-deps.sh (apt-get install \
             prometheus, which ships both prometheus and promtool), or set {SKIP_ENV}=1 to skip"
        )
    }))
}

/// Run `promtool ARGS` (bounded) → (exit code, stdout + stderr).
pub fn promtool(bin: &Path, args: &[&str], cwd: &Path) -> (Option<i32>, String) {
    let mut child = Command::new(bin)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    let start = Instant::now();
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("promtool {args:?} did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("promtool output");
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A scrape target: a job name and the admin address serving `/metrics`.
#[derive(Debug, Clone)]
pub struct Target {
    pub job: String,
    pub addr: SocketAddr,
}

impl Target {
    pub fn new(job: &str, addr: SocketAddr) -> Self {
        Self {
            job: job.to_string(),
            addr,
        }
    }
}

/// The config a test Prometheus runs with: 1 s scrapes and rule evaluations.
pub fn test_config(targets: &[Target], rule_files: &[PathBuf]) -> String {
    let mut s = String::from(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n",
    );
    if !rule_files.is_empty() {
        s.push_str("rule_files:\n");
        for f in rule_files {
            s.push_str(&format!("  - {:?}\n", f.display().to_string()));
        }
    }
    s.push_str("scrape_configs:\n");
    for t in targets {
        s.push_str(&format!(
            "  - job_name: {:?}\n    metrics_path: /metrics\n    static_configs:\n      - targets: [\"{}\"]\n",
            t.job, t.addr
        ));
    }
    s
}

/// A running Prometheus on 127.0.0.1 with its own TSDB in a temp dir; killed on drop (the
/// directory goes with it).
#[derive(Debug)]
pub struct Prometheus {
    child: Child,
    pub addr: SocketAddr,
    pub targets: Vec<Target>,
    dir: TempDir,
}

/// One element of an instant-query answer.
#[derive(Debug, Clone)]
pub struct QueryResult {
    pub labels: serde_json::Map<String, Value>,
    pub value: f64,
}

fn pct_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn sample_value(v: &Value) -> Option<f64> {
    // [ <unix time>, "<value>" ]
    let s = v.get(1)?.as_str()?;
    match s {
        "NaN" => Some(f64::NAN),
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => s.parse().ok(),
    }
}

impl Prometheus {
    /// Start `bin` scraping `targets` every second (and evaluating `rule_files` every second),
    /// then wait until it is ready. Panics (with its log) if it exits or is not ready in 30 s.
    pub async fn start(bin: &Path, targets: &[Target], rule_files: &[PathBuf]) -> Prometheus {
        let dir = TempDir::new("prometheus");
        let config = dir.join("prometheus.yml");
        std::fs::write(&config, test_config(targets, rule_files)).expect("write prometheus.yml");
        std::fs::create_dir_all(dir.join("data")).expect("tsdb dir");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log file");
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--web.enable-lifecycle")
            .arg("--log.level=info")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let mut p = Prometheus {
            child,
            addr,
            targets: targets.to_vec(),
            dir,
        };
        p.wait_ready(Duration::from_secs(30)).await;
        p
    }

    /// Prometheus's own log (stdout + stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let s = self.log();
        let mut start = s.len().saturating_sub(4000);
        while !s.is_char_boundary(start) {
            start += 1;
        }
        s[start..].to_string()
    }

    fn check_alive(&mut self) {
        if let Some(st) = self.child.try_wait().expect("try_wait") {
            panic!(
                "prometheus exited with {st}\n--- prometheus log ---\n{}",
                self.log_tail()
            );
        }
    }

    async fn wait_ready(&mut self, limit: Duration) {
        let start = Instant::now();
        loop {
            self.check_alive();
            if let Some(r) = admin_request(self.addr, "GET", "/-/ready", &[], b"").await {
                if r.status() == 200 {
                    return;
                }
            }
            if start.elapsed() > limit {
                panic!(
                    "prometheus on {} not ready within {limit:?}\n--- prometheus log ---\n{}",
                    self.addr,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// GET an API path → its `data` (panics unless 200 and `status: success`).
    pub async fn api(&self, path_and_query: &str) -> Value {
        let r = admin_request(self.addr, "GET", path_and_query, &[], b"")
            .await
            .unwrap_or_else(|| panic!("prometheus GET {path_and_query}: no response"));
        let body: Value = serde_json::from_slice(&r.body).unwrap_or_else(|e| {
            panic!(
                "prometheus GET {path_and_query}: status {} body not JSON ({e}): {}",
                r.status(),
                cut(&r.body_str(), 2000)
            )
        });
        assert!(
            r.status() == 200 && body["status"] == "success",
            "prometheus GET {path_and_query}: status {} {body}",
            r.status()
        );
        body["data"].clone()
    }

    /// `/api/v1/query` → the result as (labels, value) rows, a scalar as one row without labels.
    /// Panics on a query error (bad PromQL), naming the expression.
    pub async fn query(&self, expr: &str) -> Vec<QueryResult> {
        let r = admin_request(
            self.addr,
            "GET",
            &format!("/api/v1/query?query={}", pct_encode(expr)),
            &[],
            b"",
        )
        .await
        .unwrap_or_else(|| panic!("prometheus query {expr:?}: no response"));
        let body: Value = serde_json::from_slice(&r.body).unwrap_or_else(|e| {
            panic!(
                "prometheus query {expr:?}: body not JSON ({e}): {}",
                r.body_str()
            )
        });
        assert_eq!(
            body["status"], "success",
            "prometheus query {expr:?} failed: {body}"
        );
        let data = &body["data"];
        match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|e| QueryResult {
                            labels: e["metric"].as_object().cloned().unwrap_or_default(),
                            value: sample_value(&e["value"]).unwrap_or(f64::NAN),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            Some("scalar") => vec![QueryResult {
                labels: Default::default(),
                value: sample_value(&data["result"]).unwrap_or(f64::NAN),
            }],
            other => panic!("prometheus query {expr:?}: unexpected result type {other:?}: {data}"),
        }
    }

    /// The single value of `expr`; None when the result is empty. Panics on several rows.
    pub async fn value(&self, expr: &str) -> Option<f64> {
        let rows = self.query(expr).await;
        assert!(
            rows.len() <= 1,
            "prometheus query {expr:?}: expected at most one row, got {rows:?}"
        );
        rows.first().map(|r| r.value)
    }

    /// Poll `expr` every 250 ms until `ok(value)` holds or `limit` passes; the last value seen.
    pub async fn value_when(
        &self,
        expr: &str,
        limit: Duration,
        ok: impl Fn(Option<f64>) -> bool,
    ) -> Option<f64> {
        let start = Instant::now();
        loop {
            let v = self.value(expr).await;
            if ok(v) || start.elapsed() > limit {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// `/api/v1/targets` active targets.
    pub async fn active_targets(&self) -> Vec<Value> {
        self.api("/api/v1/targets")
            .await
            .get("activeTargets")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    }

    /// Wait until every configured target has been scraped with health `up` (bounded).
    pub async fn wait_targets_up(&mut self, limit: Duration) {
        let start = Instant::now();
        loop {
            self.check_alive();
            let active = self.active_targets().await;
            let up = |t: &Target| {
                active.iter().any(|a| {
                    a["labels"]["job"] == t.job.as_str()
                        && a["health"] == "up"
                        && a["scrapeUrl"]
                            .as_str()
                            .is_some_and(|u| u.contains(&t.addr.to_string()))
                })
            };
            if self.targets.iter().all(up) {
                return;
            }
            if start.elapsed() > limit {
                panic!(
                    "prometheus targets not all up within {limit:?}: {}\n--- prometheus log ---\n{}",
                    serde_json::to_string_pretty(&active).unwrap_or_default(),
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `/api/v1/rules` groups.
    pub async fn rule_groups(&self) -> Vec<Value> {
        self.api("/api/v1/rules")
            .await
            .get("groups")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    }

    /// Stop it gracefully (`POST /-/quit`, then SIGKILL after 5 s); the temp dir goes on drop.
    pub async fn stop(mut self) {
        let _ = admin_request(self.addr, "POST", "/-/quit", &[], b"").await;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- prometheus {} log (tail) ---\n{}\n--- end ---",
                self.addr,
                self.log_tail()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_and_encoding() {
        let c = test_config(
            &[Target::new("scoretap", "127.0.0.1:9901".parse().unwrap())],
            &[PathBuf::from("/x/alerts.yml")],
        );
        assert!(c.contains("scrape_interval: 1s"), "{c}");
        assert!(c.contains("- \"/x/alerts.yml\""), "{c}");
        assert!(c.contains("job_name: \"scoretap\""), "{c}");
        assert!(c.contains("targets: [\"127.0.0.1:9901\"]"), "{c}");
        assert_eq!(pct_encode("sum(a{b=\"c\"})"), "sum%28a%7Bb%3D%22c%22%7D%29");
    }
}
