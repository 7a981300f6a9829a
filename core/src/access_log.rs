//! The access log: one line per exchange, as Envoy's and nginx's, written to stderr when the
//! exchange ends (its response's last byte, a failure, or the client gone). `--access-log text`
//! writes a line for people, `json` one JSON object for log pipelines; `off` (the default) costs
//! nothing. Secrets never appear: no header is written, and the query's key and token parameters
//! are redacted as in records.

use std::io::Write;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Method, Request, StatusCode, Version};

use crate::progress::ExchangeProgress;
use crate::redaction::Redaction;

/// What `--access-log` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    /// Nothing.
    #[default]
    Off,
    /// `<time> <client> "<method> <target> <version>" <status> <in>B <out>B <ms>ms upstream=<ms>ms id=<id> <outcome>`.
    Text,
    /// One JSON object per exchange.
    Json,
}

/// How the response body ended, as far as the access log tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseEnd {
    Complete,
    Failed,
    Dropped,
}

/// One exchange's line, filled in as the exchange goes and written at its end.
#[derive(Debug)]
pub struct AccessLogEntry {
    format: AccessLogFormat,
    started_at: SystemTime,
    client: IpAddr,
    method: Method,
    target: String,
    version: Version,
    correlation_id: HeaderValue,
    status: StatusCode,
    outcome: &'static str,
    progress: Arc<ExchangeProgress>,
}

impl AccessLogEntry {
    /// The entry of a request, or `None` with the access log off. Boxed: it rides in the
    /// request's future and its response body, which hyper moves.
    pub fn begin<B>(
        format: AccessLogFormat,
        request: &Request<B>,
        client: IpAddr,
        correlation_id: &HeaderValue,
        progress: &Arc<ExchangeProgress>,
    ) -> Option<Box<Self>> {
        if format == AccessLogFormat::Off {
            return None;
        }
        let uri = request.uri();
        let target = match uri.query() {
            Some(query) => format!(
                "{}?{}",
                uri.path(),
                Redaction::default().redact_query(query)
            ),
            None => uri.path().to_owned(),
        };
        Some(Box::new(Self {
            format,
            started_at: SystemTime::now(),
            client,
            method: request.method().clone(),
            target,
            version: request.version(),
            correlation_id: correlation_id.clone(),
            status: StatusCode::OK,
            outcome: "ok",
            progress: progress.clone(),
        }))
    }

    /// The answer's status and the exchange's outcome so far.
    pub fn respond(&mut self, status: StatusCode, outcome: &'static str) {
        self.status = status;
        self.outcome = outcome;
    }

    /// Writes the line: the response's size, the exchange's duration, how the response ended.
    pub fn finish(self, response_bytes: u64, duration: Duration, end: ResponseEnd) {
        let outcome = match (end, self.outcome) {
            (ResponseEnd::Dropped, "ok") => "client_cancelled",
            (ResponseEnd::Failed, "ok") => "upstream_error",
            (_, outcome) => outcome,
        };
        let time = humantime::format_rfc3339_millis(self.started_at);
        let request_bytes = self.progress.request_bytes();
        let upstream_ms = self
            .progress
            .upstream_headers_after()
            .map(|after| after.as_secs_f64() * 1000.0);
        let duration_ms = duration.as_secs_f64() * 1000.0;
        let correlation_id = String::from_utf8_lossy(self.correlation_id.as_bytes());
        let line = match self.format {
            AccessLogFormat::Off => return,
            AccessLogFormat::Text => format!(
                "{time} {} \"{} {} {:?}\" {} {request_bytes}B {response_bytes}B {duration_ms:.3}ms upstream={} id={correlation_id} {outcome}",
                self.client,
                self.method,
                self.target,
                self.version,
                self.status.as_u16(),
                upstream_ms.map_or_else(|| "-".to_owned(), |ms| format!("{ms:.3}ms")),
            ),
            AccessLogFormat::Json => serde_json::json!({
                "time": time.to_string(),
                "client": self.client.to_string(),
                "method": self.method.as_str(),
                "target": self.target,
                "version": format!("{:?}", self.version),
                "status": self.status.as_u16(),
                "request_bytes": request_bytes,
                "response_bytes": response_bytes,
                "duration_ms": duration_ms,
                "upstream_ms": upstream_ms,
                "correlation_id": correlation_id,
                "outcome": outcome,
            })
            .to_string(),
        };
        // One write per line: lines of concurrent exchanges do not interleave.
        let _ = std::io::stderr()
            .lock()
            .write_all(format!("{line}\n").as_bytes());
    }
}
