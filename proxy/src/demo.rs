//! `scoretap demo`: a built-in scoring endpoint with scoretap in front of it, a few requests sent
//! through, and a summary of what happened — no cloud account, nothing to install.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use scoretap_core::capture::{CaptureSelection, CaptureSettings};
use scoretap_core::headers::ForwardingPolicy;
use scoretap_core::proxy::ProxySettings;
use scoretap_core::query::{query_directory, TraceQuery};
use scoretap_core::redaction::Redaction;
use scoretap_core::sink::StoreLocation;
use scoretap_core::upstream::{UpstreamProtocol, UpstreamSettings, DEFAULT_BODY_IDLE_TIMEOUT};
use scoretap_core::{BoundServer, ServerSettings};
use tokio::net::TcpListener;

use crate::settings::{parse_address, parse_store};

/// `scoretap demo`'s flags.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Keep the demo running after the sample requests, for your own curl (Ctrl-C stops it)
    #[arg(long)]
    serve: bool,
    /// Proxy address [default: 127.0.0.1:8080 with --serve, any free port otherwise]
    #[arg(long, value_name = "ADDR", value_parser = parse_address)]
    listen: Option<SocketAddr>,
    /// Admin address [default: 127.0.0.1:9901 with --serve, any free port otherwise]
    #[arg(long, value_name = "ADDR", value_parser = parse_address)]
    admin_listen: Option<SocketAddr>,
    /// Where the demo's records go [default: a directory of its own under the system's temporary directory, named in the summary]
    #[arg(long, value_name = "URL", value_parser = parse_store)]
    store: Option<StoreLocation>,
}

/// The demo's own store: a new directory under the temporary directory, so its records never
/// mix with a real store's (`./scoretap-data` is `run`'s default).
fn demo_store() -> StoreLocation {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    StoreLocation::Directory(
        std::env::temp_dir().join(format!("scoretap-demo-{stamp}-{}", std::process::id())),
    )
}

/// How to run this same binary, for the hints: its path (the demo is usually started with
/// `cargo run`, which does not put `scoretap` on PATH).
fn this_program() -> String {
    std::env::current_exe()
        .map(|path| path.display().to_string())
        .unwrap_or_else(|_| "scoretap".to_owned())
}

/// The built-in model: a linear regression over 10 features, the shape of the Azure ML sklearn
/// example (`{"data": [[10 numbers], ...]}` in, a list of predictions out).
const WEIGHTS: [f64; 10] = [
    37.9, -241.9, 542.4, 347.7, -931.5, 518.1, 163.4, 275.3, 736.2, 48.7,
];
const INTERCEPT: f64 = 152.1;

fn predict(body: &[u8]) -> Result<Vec<f64>, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|error| format!("the body is not JSON: {error}"))?;
    let rows = value
        .get("data")
        .and_then(serde_json::Value::as_array)
        .ok_or("expected {\"data\": [[10 numbers], ...]}")?;
    rows.iter()
        .map(|row| {
            let features = row
                .as_array()
                .filter(|features| features.len() == WEIGHTS.len())
                .ok_or("each row must hold 10 numbers")?;
            features
                .iter()
                .zip(WEIGHTS)
                .try_fold(INTERCEPT, |sum, (feature, weight)| {
                    feature
                        .as_f64()
                        .map(|feature| sum + feature * weight)
                        .ok_or("each row must hold 10 numbers")
                })
                .map_err(str::to_owned)
        })
        .collect()
}

async fn score(request: Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/") => (StatusCode::OK, "\"Healthy\"".to_owned()),
        (&Method::POST, "/score") => match request.into_body().collect().await {
            Ok(body) => match predict(&body.to_bytes()) {
                Ok(predictions) => (
                    StatusCode::OK,
                    serde_json::to_string(&predictions).unwrap_or_default(),
                ),
                Err(message) => (
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({ "error": message }).to_string(),
                ),
            },
            Err(error) => (
                StatusCode::BAD_REQUEST,
                serde_json::json!({ "error": error.to_string() }).to_string(),
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            "{\"error\":\"not found\"}".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Serves the built-in model until the task is dropped.
async fn serve_model(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let service = service_fn(|request| async { Ok::<_, Infallible>(score(request).await) });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

struct Sample {
    what: &'static str,
    method: Method,
    path: &'static str,
    body: &'static str,
    headers: &'static [(&'static str, &'static str)],
}

const SAMPLES: &[Sample] = &[
    Sample {
        what: "score two rows",
        method: Method::POST,
        path: "/score",
        body: r#"{"data": [[1,2,3,4,5,6,7,8,9,10], [10,9,8,7,6,5,4,3,2,1]]}"#,
        headers: &[("content-type", "application/json")],
    },
    Sample {
        what: "your own correlation id is kept; the API key and customer.email are redacted in the record",
        method: Method::POST,
        path: "/score",
        body: r#"{"data": [[0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0]], "customer": {"email": "ada@example.com"}}"#,
        headers: &[
            ("content-type", "application/json"),
            ("x-request-id", "demo-request-42"),
            ("authorization", "Bearer not-a-real-key"),
        ],
    },
    Sample {
        what: "malformed input: the model's 400 passes through",
        method: Method::POST,
        path: "/score",
        body: r#"{"data": "not rows"}"#,
        headers: &[("content-type", "application/json")],
    },
    Sample {
        what: "liveness of the scoring service",
        method: Method::GET,
        path: "/",
        body: "",
        headers: &[],
    },
];

pub async fn run(args: DemoArgs) -> ExitCode {
    match demo(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("demo failed: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn demo(args: DemoArgs) -> Result<(), Box<dyn std::error::Error>> {
    let store = args.store.clone().unwrap_or_else(demo_store);
    let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
    let (listen, admin_listen, model_address) = if args.serve {
        (
            args.listen
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8080))),
            args.admin_listen
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 9901))),
            SocketAddr::from(([127, 0, 0, 1], 5001)),
        )
    } else {
        (
            args.listen.unwrap_or(any_port),
            args.admin_listen.unwrap_or(any_port),
            any_port,
        )
    };
    let model_listener = TcpListener::bind(model_address).await?;
    let model_address = model_listener.local_addr()?;
    let model = tokio::spawn(serve_model(model_listener));

    let upstream: http::Uri = format!("http://{model_address}").parse()?;
    let server = BoundServer::bind(ServerSettings {
        listen,
        admin_listen,
        tls: None,
        drain_timeout: Duration::from_secs(5),
        upstream: UpstreamSettings {
            url: upstream,
            protocol: UpstreamProtocol::Http1,
            ca_file: None,
            connect_timeout: Duration::from_secs(2),
            response_header_timeout: Duration::from_secs(10),
            pool_idle_timeout: Duration::from_secs(30),
            pool_max_idle_per_host: 8,
            body_idle_timeout: DEFAULT_BODY_IDLE_TIMEOUT,
            max_connections: scoretap_core::upstream::DEFAULT_MAX_CONNECTIONS,
        },
        proxy: ProxySettings {
            service: "demo-model".into(),
            forwarding: ForwardingPolicy::default(),
            preserve_host: false,
            ..ProxySettings::default()
        },
        capture: Some(CaptureSettings {
            enabled: true,
            sample_rate: 1.0,
            selection: CaptureSelection::default(),
            buffer_bytes: 16 << 20,
            buffer_slots: 4096,
            max_open_exchanges: scoretap_core::ring::DEFAULT_MAXIMUM_OPEN_EXCHANGES,
            store: store.clone(),
            instance: "demo".into(),
            redaction: Redaction::new(&[], &["$.customer.email".to_owned()])?,
            flush_interval: Duration::from_millis(50),
            storage: scoretap_core::capture::StorageSettings::default(),
        }),
        admin_token: None,
        readyz_upstream: true,
        metrics: true,
        limits: scoretap_core::server::Limits::default(),
    })
    .await?;
    let proxy_address = server.proxy_address();
    let admin_address = server.admin_address();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let proxy = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));

    println!("scoretap demo");
    println!("  scoring endpoint (built-in model)  http://{model_address}/score");
    println!("  scoretap proxy in front of it      http://{proxy_address}/score");
    println!("  scoretap admin                     http://{admin_address}/healthz  /readyz");
    println!();
    println!(
        "{:<3} {:<6} {:<7} {:>6} {:>8}  {:<38} response",
        "#", "method", "path", "status", "ms", "correlation id (x-request-id)"
    );

    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut failures = 0;
    let mut correlation_ids = Vec::new();
    for (number, sample) in SAMPLES.iter().enumerate() {
        let mut request = Request::builder()
            .method(sample.method.clone())
            .uri(format!("http://{proxy_address}{}", sample.path));
        for (name, value) in sample.headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(Bytes::from_static(sample.body.as_bytes())))?;
        let started = Instant::now();
        let response = client.request(request).await?;
        let status = response.status();
        let correlation = response
            .headers()
            .get("x-request-id")
            .and_then(|value| value.to_str().ok())
            .unwrap_or("(none)")
            .to_owned();
        let body = response.into_body().collect().await?.to_bytes();
        let elapsed = started.elapsed().as_secs_f64() * 1000.0;
        let mut text = String::from_utf8_lossy(&body).into_owned();
        if text.len() > 60 {
            text.truncate(text.floor_char_boundary(57));
            text.push_str("...");
        }
        if correlation == "(none)" {
            failures += 1;
        }
        correlation_ids.push(correlation.clone());
        println!(
            "{:<3} {:<6} {:<7} {:>6} {:>8.2}  {:<38} {}",
            number + 1,
            sample.method.as_str(),
            sample.path,
            status.as_u16(),
            elapsed,
            correlation,
            text
        );
        println!("    {}", sample.what);
    }

    let admin: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let ready = admin
        .get(format!("http://{admin_address}/readyz").parse()?)
        .await?
        .status();
    println!();
    println!("readyz: {} (the upstream is reachable)", ready.as_u16());
    let exposition = admin
        .get(format!("http://{admin_address}/metrics").parse()?)
        .await?
        .into_body()
        .collect()
        .await?
        .to_bytes();
    let exposition = String::from_utf8_lossy(&exposition);
    println!("metrics (GET /metrics, Prometheus text format), a few lines:");
    for line in exposition.lines().filter(|line| {
        line.starts_with("scoretap_requests_total") && !line.ends_with(" 0")
            || line.starts_with("scoretap_request_duration_seconds_count")
            || line.starts_with("scoretap_upstream_requests_total{result=\"ok\"}")
    }) {
        println!("  {line}");
    }
    let records = wait_for_records(&store, &correlation_ids).await;
    println!();
    match &records {
        Some(records) => {
            println!(
                "captured {} of {} exchanges (inputs and predictions, cut to 64 KB each):",
                records.len(),
                correlation_ids.len()
            );
            for record in records {
                println!("  {}", summarize(record));
            }
            if let Some(first) = records.first() {
                println!();
                println!("one record in full:");
                println!("{first}");
            }
            if records.len() < correlation_ids.len() {
                failures += 1;
            }
        }
        None => println!("records go to {}", store.url()),
    }
    println!();
    println!("Where to look:");
    println!(
        "  - records: {} (JSON lines, traces/<service>/<yyyy>/<mm>/<dd>/<HH>/; the demo's own store)",
        store.url()
    );
    println!(
        "  - query them: {} traces --store {} --contains data --limit 10",
        this_program(),
        store.url()
    );
    println!("    (`cargo install --path proxy` puts scoretap on PATH)");
    println!("  - every response carries x-request-id; scoretap forwards it to the model too");
    println!(
        "  - Prometheus metrics: GET /metrics on the admin port (deploy/grafana has a dashboard)"
    );
    println!("  - scoretap logs to stderr (--log-format json for structured logs)");
    println!(
        "  - run `{} demo --serve` to keep it up and send your own requests:",
        this_program()
    );
    println!(
        "      curl -s -X POST http://127.0.0.1:8080/score -H 'content-type: application/json' \\"
    );
    println!("        -d '{{\"data\": [[1,2,3,4,5,6,7,8,9,10]]}}'");
    println!(
        "  - put scoretap in front of your own endpoint: scoretap --listen 0.0.0.0:8080 --upstream http://127.0.0.1:5001"
    );

    if args.serve {
        println!();
        println!("serving until Ctrl-C ...");
        let _ = tokio::signal::ctrl_c().await;
    }
    let _ = stop.send(());
    proxy.await?;
    model.abort();
    if failures > 0 || ready != StatusCode::OK {
        return Err("some answers did not come back through the proxy as expected".into());
    }
    Ok(())
}

/// Waits until the records of these exchanges are in the store (file stores only).
async fn wait_for_records(
    store: &StoreLocation,
    correlation_ids: &[String],
) -> Option<Vec<serde_json::Value>> {
    let StoreLocation::Directory(root) = store else {
        return None;
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut records = Vec::new();
        for id in correlation_ids {
            let query = TraceQuery {
                contains: Some(format!("\"correlation_id\":\"{id}\"")),
                limit: 1,
                ..TraceQuery::default()
            };
            if let Ok(found) = query_directory(root, "traces/", &query) {
                records.extend(
                    found
                        .records
                        .iter()
                        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok()),
                );
            }
        }
        if records.len() == correlation_ids.len() || Instant::now() >= deadline {
            return Some(records);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One line about a record: outcome, status, what went in and what came out.
fn summarize(record: &serde_json::Value) -> String {
    let clip = |value: &serde_json::Value| {
        let mut text = match value {
            serde_json::Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        if text.len() > 48 {
            text.truncate(text.floor_char_boundary(45));
            text.push_str("...");
        }
        text
    };
    format!(
        "{:<8} {:>3} {:<7} in={:<50} out={}",
        record["outcome"].as_str().unwrap_or("?"),
        record["response"]["status"],
        record["request"]["path"].as_str().unwrap_or("?"),
        clip(&record["request"]["body"]["inline"]),
        clip(&record["response"]["body"]["inline"]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_predicts_one_value_per_row() {
        let predictions =
            predict(br#"{"data": [[1,2,3,4,5,6,7,8,9,10], [0,0,0,0,0,0,0,0,0,0]]}"#).expect("ok");
        assert_eq!(predictions.len(), 2);
        assert!((predictions[1] - INTERCEPT).abs() < 1e-9);
        assert!(predict(br#"{"data": [[1,2]]}"#).is_err());
        assert!(predict(b"not json").is_err());
    }
}
