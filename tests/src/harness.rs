//! Glue used by many tests: a proxy in front of a test upstream, clients to it, external
//! clients (curl, the httpx fixture), and checks of the error contract.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::client::{Client, Proto};
use crate::process::Scoretap;
use crate::tls::Pki;
use crate::upstream::{TestUpstream, UpstreamProto};
use crate::util::{looks_like_uuid, workspace_root};

/// Proxy flags matching an upstream: `--upstream URL --upstream-protocol ..` (+ `--upstream-ca`).
pub fn upstream_args(up: &TestUpstream) -> Vec<String> {
    let mut a = vec!["--upstream".to_string(), up.url()];
    a.push("--upstream-protocol".into());
    a.push(
        match up.opts.proto {
            UpstreamProto::H2 => "http2",
            _ => "http1",
        }
        .into(),
    );
    if let Some(pki) = &up.opts.tls {
        a.push("--upstream-ca".into());
        a.push(pki.ca_path().display().to_string());
    }
    a
}

/// TLS listener flags for a PKI.
pub fn listener_tls_args(pki: &Pki) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        pki.cert_path().display().to_string(),
        "--tls-key".into(),
        pki.key_path().display().to_string(),
    ]
}

/// Start a proxy in front of `up` with extra flags.
pub async fn proxy_for(up: &TestUpstream, extra: &[&str]) -> Scoretap {
    Scoretap::builder()
        .args(upstream_args(up))
        .args(extra.iter().copied())
        .start()
        .await
}

/// A hyper client to the proxy (TLS if `pki` is given).
pub async fn client_to(proxy: &Scoretap, proto: Proto, pki: Option<&Arc<Pki>>) -> Client {
    match pki {
        Some(p) => Client::connect_tls(proxy.addr, proto, p.client_config(&[])).await,
        None => Client::connect(proxy.addr, proto).await,
    }
}

/// Check the proxy's error contract: status, JSON body `{error, message, correlation_id}` with
/// the given kind, content-type application/json, and (if given) the correlation id.
pub fn assert_error_contract(
    what: &str,
    status: u16,
    content_type: Option<&str>,
    body: &[u8],
    want_status: u16,
    want_kind: Option<&str>,
    want_correlation: Option<&str>,
) -> serde_json::Value {
    assert_eq!(
        status,
        want_status,
        "{what}: expected status {want_status}, got {status}; body {:?}",
        String::from_utf8_lossy(body)
    );
    let ct = content_type.unwrap_or("");
    assert!(
        ct.starts_with("application/json"),
        "{what}: error content-type should be application/json, got {ct:?}"
    );
    let j: serde_json::Value = serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "{what}: error body is not JSON ({e}): {:?}",
            String::from_utf8_lossy(body)
        )
    });
    let kind = j.get("error").and_then(|v| v.as_str());
    assert!(
        kind.is_some(),
        "{what}: error body lacks string \"error\": {j}"
    );
    if let Some(k) = want_kind {
        assert_eq!(kind, Some(k), "{what}: error kind; body {j}");
    }
    assert!(
        j.get("message").and_then(|v| v.as_str()).is_some(),
        "{what}: error body lacks string \"message\": {j}"
    );
    let cid = j.get("correlation_id").and_then(|v| v.as_str());
    assert!(
        cid.is_some_and(|c| !c.is_empty()),
        "{what}: error body lacks \"correlation_id\": {j}"
    );
    match want_correlation {
        Some(c) => assert_eq!(cid, Some(c), "{what}: correlation_id; body {j}"),
        None => assert!(
            looks_like_uuid(cid.unwrap_or("")),
            "{what}: generated correlation_id should be a UUID: {j}"
        ),
    }
    j
}

/// Result of an external command.
#[derive(Debug)]
pub struct ExtOutput {
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl ExtOutput {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Run a program with a hard time limit (killed on timeout/drop).
pub async fn run_ext(program: &str, args: &[String], limit: Duration) -> ExtOutput {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish within {limit:?}"))
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    ExtOutput {
        code: out.status.code(),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `curl -sS --max-time 30 <args>`.
pub async fn curl(args: &[&str]) -> ExtOutput {
    let mut a: Vec<String> = vec!["-sS".into(), "--max-time".into(), "30".into()];
    a.extend(args.iter().map(|s| s.to_string()));
    run_ext("curl", &a, Duration::from_secs(40)).await
}

/// Path of the httpx fixture client.
pub fn httpx_fixture() -> PathBuf {
    workspace_root().join("tests/fixtures/httpx_client.py")
}

/// Run the httpx fixture; returns its JSON output.
pub async fn httpx(args: &[&str]) -> serde_json::Value {
    let script = httpx_fixture();
    assert!(
        script.is_file(),
        "missing {} (written by the fixtures helper)",
        script.display()
    );
    let mut a = vec![script.display().to_string()];
    a.extend(args.iter().map(|s| s.to_string()));
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string());
    let out = run_ext(&python, &a, Duration::from_secs(60)).await;
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "httpx client output is not JSON ({e}); exit {:?}\nstdout: {}\nstderr: {}",
            out.code,
            out.stdout_str(),
            out.stderr
        )
    })
}

/// scoretap in front of `upstream_url`, writing records to `store`, with `extra` flags.
pub async fn proxy_with_store(
    upstream_url: &str,
    store: &crate::traces::TraceStore,
    extra: &[&str],
) -> Scoretap {
    Scoretap::builder()
        .upstream(upstream_url)
        .args(store.args())
        .args(extra.iter().copied())
        .start()
        .await
}
