//! Secrets never leave the process in clear: with an admin token, an Azure account key and a
//! client's `Authorization`, `Cookie` and API key in play, at debug log level in both log
//! formats, none of them appears in the logs, the `--check-config` dump, the records and files
//! written, or `/metrics`. The Azure store is unreachable, so failed uploads are logged too.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use scoretap_tests::traces::walk;
use scoretap_tests::util::{free_port, TempDir};
use scoretap_tests::*;

const ADMIN_TOKEN: &str = "admin-token-Zq81vXk3";
/// Base64 of "account-key-secret-bytes": the key as Azure hands it out.
const ACCOUNT_KEY: &str = "YWNjb3VudC1rZXktc2VjcmV0LWJ5dGVz";
const BEARER: &str = "bearer-Hn4T7wq0Lx";
const COOKIE: &str = "session-Pm2Ks9dE1r";
const API_KEY: &str = "apikey-Wc6Bv3Nn8y";
const SAS_SIGNATURE: &str = "sasSig0Qx7Vb2Mk5";

const SECRETS: [&str; 6] = [
    ADMIN_TOKEN,
    ACCOUNT_KEY,
    BEARER,
    COOKIE,
    API_KEY,
    SAS_SIGNATURE,
];

/// Every secret the text contains.
fn leaked(text: &str) -> Vec<&'static str> {
    SECRETS
        .into_iter()
        .filter(|secret| text.contains(secret))
        .collect()
}

/// Every file under `dir` with a secret in it, and which.
fn files_with_secrets(dir: &Path) -> Vec<(String, Vec<&'static str>)> {
    walk(dir)
        .into_iter()
        .filter_map(|path| {
            let bytes = std::fs::read(&path).ok()?;
            let found = leaked(&String::from_utf8_lossy(&bytes));
            (!found.is_empty()).then(|| (path.display().to_string(), found))
        })
        .collect()
}

fn azure_environment(dead_port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("AZURE_STORAGE_ACCOUNT_NAME", "scoretapaccount".to_owned()),
        ("AZURE_STORAGE_ACCOUNT_KEY", ACCOUNT_KEY.to_owned()),
        (
            "SCORETAP_AZURE_ENDPOINT",
            format!("http://127.0.0.1:{dead_port}/scoretapaccount"),
        ),
    ]
}

async fn run_with_secrets(log_format: &str) {
    let upstream = TestUpstream::start().await;
    let dead_port = free_port();
    let spool = TempDir::new("secrets-spool");
    let spool_dir = spool.path().display().to_string();
    let mut builder = Scoretap::builder()
        .upstream(&upstream.url())
        .args([
            "--store",
            "az://scoring-data/model",
            "--spool-dir",
            &spool_dir,
            "--trace-batch-age",
            "200ms",
            "--log-level",
            "debug",
            "--log-format",
            log_format,
            "--redact-headers",
            "x-session-secret",
        ])
        .env("SCORETAP_ADMIN_TOKEN", ADMIN_TOKEN);
    for (name, value) in azure_environment(dead_port) {
        builder = builder.env(name, value);
    }
    let mut proxy = builder.start().await;

    let mut client = Client::connect(proxy.addr, Proto::H1).await;
    let request = client
        .req("POST", "/score?sig=ignored")
        .header("authorization", format!("Bearer {BEARER}"))
        .header("cookie", format!("session={COOKIE}"))
        .header("x-api-key", API_KEY)
        .header("x-session-secret", SAS_SIGNATURE)
        .header("content-type", "application/json")
        .body(scoretap_tests::client::full(r#"{"data": [[1, 2]]}"#))
        .unwrap();
    let answer = client.fetch(request, Duration::from_secs(10)).await;
    assert_eq!(answer.status, 200);
    // The upstream gets every credential unchanged: redaction is for what scoretap writes.
    let forwarded = upstream.wait_path("/score").await;
    assert_eq!(
        forwarded.header("authorization").as_deref(),
        Some(format!("Bearer {BEARER}").as_str())
    );

    // A wrong admin token is refused; the right one is accepted (and neither is logged).
    let wrong = raw_admin(proxy.admin, "PUT", "/capture", "wrong-token-value", "{}").await;
    assert_eq!(wrong, 401);
    let right = raw_admin(
        proxy.admin,
        "PUT",
        "/capture",
        ADMIN_TOKEN,
        r#"{"sample_rate": 1.0}"#,
    )
    .await;
    assert_eq!(right, 200);

    // The batch is sealed after 200 ms and its upload to the dead endpoint fails (logged).
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let (status, metrics) = proxy.admin_get("/metrics").await.unwrap();
    assert_eq!(status, 200);
    let metrics = String::from_utf8_lossy(&metrics).to_string();
    assert!(
        metrics.contains("scoretap_storage_requests_total"),
        "{metrics}"
    );
    proxy.sigterm();
    proxy.wait_exit(Duration::from_secs(30)).await;

    let stderr = proxy.stderr();
    assert!(
        stderr.contains("upload") || stderr.contains("storage"),
        "the failed upload is logged:\n{stderr}"
    );
    assert_eq!(leaked(&stderr), Vec::<&str>::new(), "stderr:\n{stderr}");
    assert_eq!(leaked(&proxy.stdout()), Vec::<&str>::new());
    assert_eq!(leaked(&metrics), Vec::<&str>::new(), "{metrics}");
    // The record waits in the spool (the store is down): it is there, with no secret in it.
    let spooled = walk(spool.path());
    assert!(
        spooled
            .iter()
            .any(|path| path.display().to_string().contains("traces")),
        "{spooled:?}"
    );
    let records: String = spooled
        .iter()
        .filter(|path| path.display().to_string().contains("traces"))
        .map(|path| std::fs::read_to_string(path).unwrap_or_default())
        .collect();
    assert!(
        records.contains(r#""/score""#) && records.contains(r#""x-api-key":"[redacted]""#),
        "the exchange is recorded, its credentials redacted:\n{records}"
    );
    assert_eq!(files_with_secrets(spool.path()), Vec::new());
    assert_eq!(files_with_secrets(proxy.dir()), Vec::new());
}

/// `PUT`s to the admin with a bearer token; the status.
async fn raw_admin(
    admin: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: &str,
) -> u16 {
    let mut client = Client::connect(admin, Proto::H1).await;
    let request = client
        .req(method, path)
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(scoretap_tests::client::full(body.to_owned()))
        .unwrap();
    client
        .fetch(request, Duration::from_secs(5))
        .await
        .status
        .as_u16()
}

#[tokio::test]
async fn no_secret_in_text_logs_records_or_metrics() {
    run_with_secrets("text").await;
}

#[tokio::test]
async fn no_secret_in_json_logs_records_or_metrics() {
    run_with_secrets("json").await;
}

#[test]
fn check_config_prints_no_secret() {
    let dead_port = free_port();
    let environment = azure_environment(dead_port);
    let mut envs: Vec<(&str, &str)> = environment
        .iter()
        .map(|(name, value)| (*name, value.as_str()))
        .collect();
    envs.push(("SCORETAP_ADMIN_TOKEN", ADMIN_TOKEN));
    let output = run_cli(
        &[
            "--check-config",
            "--upstream",
            "http://127.0.0.1:9",
            "--store",
            "az://scoring-data/model",
        ],
        &envs,
        Duration::from_secs(20),
    );
    assert_eq!(output.code(), Some(0), "{}", output.stderr);
    assert!(output.stdout.contains("[redacted]"), "{}", output.stdout);
    // The admin (which can switch capture and read records) is on loopback unless moved.
    let config: serde_json::Value = serde_json::from_str(&output.stdout).unwrap();
    assert_eq!(config["admin_listen"], "127.0.0.1:9901");
    assert_eq!(config["admin_token"], "[redacted]");
    let everything = format!("{}{}", output.stdout, output.stderr);
    assert_eq!(leaked(&everything), Vec::<&str>::new(), "{everything}");
}
