//! Secrets never leave the process in clear. With an admin token, storage credentials (an Azure
//! account key, a SAS token, a service principal's secret, an AWS secret key and session token)
//! and a client's `Authorization`, `Cookie` and API keys in play, at debug and trace log level in
//! both log formats, none of them appears in the logs, the records and files written (spool and
//! store), `/metrics`, the `--check-config` dump, or the message refusing a bad flag. Stores are
//! real (moto, Azurite) where uploads must succeed, dead or refusing where failures must be
//! logged.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use scoretap_core::sink::StoreLocation;
use scoretap_tests::stores::{Azurite, MotoServer, AZURITE_ACCOUNT, AZURITE_ACCOUNT_KEY};
use scoretap_tests::traces::walk;
use scoretap_tests::util::{free_port, TempDir};
use scoretap_tests::*;

const ADMIN_TOKEN: &str = "admin-token-Zq81vXk3";
/// Base64 of "account-key-secret-bytes": the key as Azure hands it out.
const ACCOUNT_KEY: &str = "YWNjb3VudC1rZXktc2VjcmV0LWJ5dGVz";
const BEARER: &str = "bearer-Hn4T7wq0Lx";
const COOKIE: &str = "session-Pm2Ks9dE1r";
const API_KEY: &str = "apikey-Wc6Bv3Nn8y";
const AZURE_API_KEY: &str = "azureapikey-Rt5Yu7Io9p";
const SUBSCRIPTION_KEY: &str = "apimkey-Gh3Jk5Lm7n";
const EXTRA_HEADER_SECRET: &str = "extraHeader0Qx7Vb2Mk5";
/// The `sig` of a SAS token (the rest of a SAS is not secret).
const SAS_SIGNATURE: &str = "sasSigN4rT6yU8iO0pQ2";
const CLIENT_SECRET: &str = "clientSecret-Bv1Cx3Dz5Ew7";
const AWS_SECRET_KEY: &str = "awsSecretKey-Fq9Gr1Hs3It5Ju7Kv";
const AWS_SESSION_TOKEN: &str = "awsSessionToken-Lw2Mx4Ny6Oz8Pa0Qb";

/// Every secret in play; Azurite's key is public, but scoretap may not print it either.
const SECRETS: [&str; 13] = [
    ADMIN_TOKEN,
    ACCOUNT_KEY,
    BEARER,
    COOKIE,
    API_KEY,
    AZURE_API_KEY,
    SUBSCRIPTION_KEY,
    EXTRA_HEADER_SECRET,
    SAS_SIGNATURE,
    CLIENT_SECRET,
    AWS_SECRET_KEY,
    AWS_SESSION_TOKEN,
    AZURITE_ACCOUNT_KEY,
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

/// The Azure variables for an account key, toward an endpoint nobody listens on.
fn azure_environment(dead_port: u16) -> Vec<(String, String)> {
    vec![
        (
            "AZURE_STORAGE_ACCOUNT_NAME".into(),
            "scoretapaccount".into(),
        ),
        ("AZURE_STORAGE_ACCOUNT_KEY".into(), ACCOUNT_KEY.into()),
        (
            "SCORETAP_AZURE_ENDPOINT".into(),
            format!("http://127.0.0.1:{dead_port}/scoretapaccount"),
        ),
    ]
}

/// One run's store: its flags and variables, and whether its uploads succeed.
struct StoreSetup {
    store: String,
    arguments: Vec<String>,
    environment: Vec<(String, String)>,
    uploads_succeed: bool,
}

/// What a run left behind, for the store-specific checks.
struct RunOutcome {
    stderr: String,
}

/// Runs scoretap with `setup` at `log_level` in `log_format`, sends one request carrying every
/// client credential, switches capture with a wrong and the right admin token, waits until the
/// batch is uploaded (or its upload failed and was logged), stops it, and checks that no secret
/// is in its stderr, stdout, `/metrics`, the spool or its working directory.
async fn run_with_secrets(setup: StoreSetup, log_format: &str, log_level: &str) -> RunOutcome {
    let upstream = TestUpstream::start().await;
    let spool = TempDir::new("secrets-spool");
    let spool_dir = spool.path().display().to_string();
    let mut builder = Scoretap::builder()
        .upstream(&upstream.url())
        .args([
            "--store",
            &setup.store,
            "--spool-dir",
            &spool_dir,
            "--trace-batch-age",
            "200ms",
            "--log-level",
            log_level,
            "--log-format",
            log_format,
            "--redact-headers",
            "x-session-secret",
        ])
        .args(setup.arguments.iter().cloned())
        .env("SCORETAP_ADMIN_TOKEN", ADMIN_TOKEN);
    for (name, value) in &setup.environment {
        builder = builder.env(name, value);
    }
    let mut proxy = builder.start().await;

    let mut client = Client::connect(proxy.addr, Proto::H1).await;
    let request = client
        .req("POST", "/score?sig=ignored")
        .header("authorization", format!("Bearer {BEARER}"))
        .header("cookie", format!("session={COOKIE}"))
        .header("x-api-key", API_KEY)
        .header("api-key", AZURE_API_KEY)
        .header("ocp-apim-subscription-key", SUBSCRIPTION_KEY)
        .header("x-session-secret", EXTRA_HEADER_SECRET)
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
    assert_eq!(forwarded.header("x-api-key").as_deref(), Some(API_KEY));

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

    // The batch is sealed after 200 ms; then it is uploaded, or its upload fails (logged).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, state) = proxy.admin_get("/capture").await.unwrap();
        assert_eq!(status, 200);
        let state: serde_json::Value = serde_json::from_slice(&state).unwrap();
        let storage = &state["storage"];
        let done = if setup.uploads_succeed {
            storage["uploads_done"].as_u64() >= Some(1) && storage["uploads_pending"] == 0
        } else {
            storage["upload_failed_attempts"].as_u64() >= Some(1)
                && proxy.stderr().contains("uploading")
        };
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "uploads did not {} within 20 s: {state}\n{}",
            if setup.uploads_succeed {
                "finish"
            } else {
                "fail"
            },
            proxy.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
        stderr.contains("scoretap is serving"),
        "logs were written:\n{stderr}"
    );
    assert_eq!(leaked(&stderr), Vec::<&str>::new(), "stderr:\n{stderr}");
    assert_eq!(leaked(&proxy.stdout()), Vec::<&str>::new());
    assert_eq!(leaked(&metrics), Vec::<&str>::new(), "{metrics}");
    assert_eq!(files_with_secrets(spool.path()), Vec::new());
    assert_eq!(files_with_secrets(proxy.dir()), Vec::new());
    if !setup.uploads_succeed {
        // The record waits in the spool (the store is down): it is there, with no secret in it.
        let records = spooled_records(spool.path());
        assert!(
            records.contains(r#""/score""#) && records.contains(r#""x-api-key":"[redacted]""#),
            "the exchange is recorded, its credentials redacted:\n{records}"
        );
    }
    RunOutcome { stderr }
}

/// The trace batches left in the spool, concatenated.
fn spooled_records(spool: &Path) -> String {
    walk(spool)
        .iter()
        .filter(|path| path.display().to_string().contains("traces"))
        .map(|path| std::fs::read_to_string(path).unwrap_or_default())
        .collect()
}

/// Sends `method path` to the admin with a bearer token; the status.
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

/// The trace batches the store holds under `location`, downloaded and concatenated.
async fn stored_records(store: &scoretap_core::storage::remote::RemoteStore) -> String {
    let mut text = String::new();
    for object in store.list("traces/").await.unwrap() {
        let bytes = store.get(&object.key).await.unwrap();
        text.push_str(&String::from_utf8_lossy(&bytes));
    }
    text
}

fn dead_azure_store() -> StoreSetup {
    StoreSetup {
        store: "az://scoring-data/model".into(),
        arguments: Vec::new(),
        environment: azure_environment(free_port()),
        uploads_succeed: false,
    }
}

#[tokio::test]
async fn no_secret_in_text_logs_records_or_metrics() {
    run_with_secrets(dead_azure_store(), "text", "debug").await;
}

#[tokio::test]
async fn no_secret_in_json_logs_records_or_metrics() {
    run_with_secrets(dead_azure_store(), "json", "debug").await;
}

/// S3 with a secret key and a session token, at trace level (every dependency's own logging
/// on: the SDK's signing and requests, hyper, rustls): the upload succeeds, and neither the key,
/// the token nor a request signature is printed.
#[tokio::test]
async fn no_secret_at_trace_level_with_s3_credentials() {
    let Some(moto) = MotoServer::start_or_skip().await else {
        return;
    };
    moto.create_bucket("secrets").await;
    let setup = StoreSetup {
        store: "s3://secrets/model".into(),
        arguments: vec!["--s3-endpoint".into(), moto.endpoint()],
        environment: vec![
            ("AWS_ACCESS_KEY_ID".into(), "AKIASCORETAPTEST".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), AWS_SECRET_KEY.into()),
            ("AWS_SESSION_TOKEN".into(), AWS_SESSION_TOKEN.into()),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
        ],
        uploads_succeed: true,
    };
    let outcome = run_with_secrets(setup, "json", "trace").await;
    // Trace level really was on, down to the SDK's signing.
    assert!(
        outcome.stderr.contains("aws_sigv4") || outcome.stderr.contains("signing"),
        "{}",
        outcome.stderr
    );
    assert_no_signature(&outcome.stderr, "Signature=");
    let location = StoreLocation::parse("s3://secrets/model").unwrap();
    let records = stored_records(&moto.remote_store(&location).await).await;
    assert!(
        records.contains(r#""/score""#) && records.contains(r#""authorization":"[redacted]""#),
        "the uploaded record, its credentials redacted:\n{records}"
    );
    assert_eq!(leaked(&records), Vec::<&str>::new(), "{records}");
}

/// Azure Blob with the account key (Shared Key signing), at trace level: the upload succeeds,
/// and neither the key nor a request's signature is printed.
#[tokio::test]
async fn no_secret_at_trace_level_with_an_azure_account_key() {
    let Some(azurite) = Azurite::start_or_skip().await else {
        return;
    };
    azurite.create_container("secrets").await;
    let setup = StoreSetup {
        store: "az://secrets/model".into(),
        arguments: vec!["--azure-endpoint".into(), azurite.endpoint()],
        environment: vec![
            ("AZURE_STORAGE_ACCOUNT_NAME".into(), AZURITE_ACCOUNT.into()),
            (
                "AZURE_STORAGE_ACCOUNT_KEY".into(),
                AZURITE_ACCOUNT_KEY.into(),
            ),
        ],
        uploads_succeed: true,
    };
    let outcome = run_with_secrets(setup, "text", "trace").await;
    assert!(outcome.stderr.contains("TRACE"), "{}", outcome.stderr);
    assert_no_signature(&outcome.stderr, &format!("SharedKey {AZURITE_ACCOUNT}:"));
    let location = StoreLocation::parse("az://secrets/model").unwrap();
    let records = stored_records(&azurite.remote_store(&location).await).await;
    assert!(
        records.contains(r#""/score""#) && records.contains(r#""cookie":"[redacted]""#),
        "the uploaded record, its credentials redacted:\n{records}"
    );
    assert_eq!(leaked(&records), Vec::<&str>::new(), "{records}");
}

/// A SAS token that Azurite refuses (its signature is made up): every upload fails with 403
/// and is logged, at trace level, without the token's signature.
#[tokio::test]
async fn no_secret_at_trace_level_with_a_refused_sas_token() {
    let Some(azurite) = Azurite::start_or_skip().await else {
        return;
    };
    azurite.create_container("secrets").await;
    let sas = format!(
        "sv=2022-11-02&ss=b&srt=co&sp=rwdlac&se=2099-01-01T00:00:00Z&spr=https,http&sig={SAS_SIGNATURE}"
    );
    let setup = StoreSetup {
        store: "az://secrets/model".into(),
        arguments: vec!["--azure-endpoint".into(), azurite.endpoint()],
        environment: vec![
            ("AZURE_STORAGE_ACCOUNT_NAME".into(), AZURITE_ACCOUNT.into()),
            // The test process's own account key would win otherwise.
            ("AZURE_CREDENTIAL_TYPE".into(), "sas_token".into()),
            ("AZURE_STORAGE_SAS_TOKEN".into(), sas),
        ],
        uploads_succeed: false,
    };
    let outcome = run_with_secrets(setup, "json", "trace").await;
    assert!(outcome.stderr.contains("403"), "{}", outcome.stderr);
}

/// A service principal's client secret, toward an Entra ID nobody answers for: the token
/// request fails (logged) without the secret.
#[tokio::test]
async fn no_secret_with_a_client_secret_whose_token_request_fails() {
    let dead_port = free_port();
    let setup = StoreSetup {
        store: "az://scoring-data/model".into(),
        arguments: vec![
            "--azure-endpoint".into(),
            format!("http://127.0.0.1:{}/scoretapaccount", free_port()),
        ],
        environment: vec![
            (
                "AZURE_STORAGE_ACCOUNT_NAME".into(),
                "scoretapaccount".into(),
            ),
            ("AZURE_CREDENTIAL_TYPE".into(), "client_secret".into()),
            ("AZURE_CLIENT_ID".into(), "client-id-not-secret".into()),
            ("AZURE_TENANT_ID".into(), "tenant-id-not-secret".into()),
            ("AZURE_CLIENT_SECRET".into(), CLIENT_SECRET.into()),
            (
                "AZURE_AUTHORITY_HOST".into(),
                format!("http://127.0.0.1:{dead_port}/"),
            ),
        ],
        uploads_succeed: false,
    };
    run_with_secrets(setup, "text", "debug").await;
}

/// No request signature after `marker` in `text` (the marker itself may be printed, with
/// `[redacted]` after it).
fn assert_no_signature(text: &str, marker: &str) {
    for (index, _) in text.match_indices(marker) {
        let after = &text[index + marker.len()..];
        let value: String = after
            .chars()
            .take_while(|character| character.is_ascii_alphanumeric() || "+/=".contains(*character))
            .collect();
        assert!(
            value.len() < 8,
            "a signature after {marker:?}: {value}\n{}",
            &text[index.saturating_sub(200)..(index + 200).min(text.len())]
        );
    }
}

#[test]
fn check_config_prints_no_secret() {
    let environment = azure_environment(free_port());
    let mut envs: Vec<(&str, &str)> = environment
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect();
    envs.push(("SCORETAP_ADMIN_TOKEN", ADMIN_TOKEN));
    envs.push(("AWS_SECRET_ACCESS_KEY", AWS_SECRET_KEY));
    envs.push(("AZURE_CLIENT_SECRET", CLIENT_SECRET));
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
    // Nor does --help show the token's variable's value.
    let help = run_cli(&["--help"], &envs, Duration::from_secs(20));
    assert_eq!(help.code(), Some(0), "{}", help.stderr);
    assert!(
        help.stdout.contains("SCORETAP_ADMIN_TOKEN"),
        "{}",
        help.stdout
    );
    assert_eq!(leaked(&help.stdout), Vec::<&str>::new(), "{}", help.stdout);
}

/// A URL with credentials in it is refused, as a flag, a variable or a config key, and the
/// refusal names the flag without quoting the password; a store endpoint with a SAS in its
/// query, or a store URL with one, is refused without its signature.
#[test]
fn refused_urls_are_not_quoted_with_their_credentials() {
    const PASSWORD: &str = "urlPassword-Xy7Wv5";
    let with_password = format!("https://scorer:{PASSWORD}@model.example:8443/score");
    let s3_with_keys = format!("http://AKIASCORETAPTEST:{PASSWORD}@127.0.0.1:9000");
    let sas_endpoint =
        format!("https://account.blob.core.windows.net/?sv=2022-11-02&sig={PASSWORD}");
    let sas_store = format!("az://scoring-data/model?sv=2022-11-02&sig={PASSWORD}");
    let sas_blob_url =
        format!("https://account.blob.core.windows.net/scoring-data?sv=2022-11-02&sig={PASSWORD}");
    let directory = TempDir::new("secrets-config");
    let config = directory.join("scoretap.toml");
    std::fs::write(&config, format!("upstream = \"{with_password}\"\n")).unwrap();
    let config = config.display().to_string();
    /// Arguments, environment, and the flag or key the refusal names.
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (vec!["--upstream", &with_password], vec![], "--upstream"),
        (
            vec![],
            vec![("SCORETAP_UPSTREAM", &with_password)],
            "--upstream",
        ),
        (vec!["--config", &config], vec![], "upstream"),
        (
            vec![
                "--upstream",
                "http://127.0.0.1:9",
                "--s3-endpoint",
                &s3_with_keys,
            ],
            vec![],
            "--s3-endpoint",
        ),
        (
            vec![
                "--upstream",
                "http://127.0.0.1:9",
                "--azure-endpoint",
                &sas_endpoint,
            ],
            vec![],
            "--azure-endpoint",
        ),
        (
            vec![
                "traces",
                "--store",
                "az://scoring-data/model",
                "--azure-endpoint",
                &sas_endpoint,
            ],
            vec![],
            "--azure-endpoint",
        ),
        // A SAS pasted into the store URL: refused (it would be part of every key), unquoted.
        (
            vec!["--upstream", "http://127.0.0.1:9", "--store", &sas_store],
            vec![],
            "--store",
        ),
        (
            vec!["--upstream", "http://127.0.0.1:9"],
            vec![("SCORETAP_STORE", &sas_blob_url)],
            "--store",
        ),
        (vec!["traces", "--store", &sas_store], vec![], "--store"),
    ];
    for (arguments, environment, flag) in cases {
        let output = run_cli(&arguments, &environment, Duration::from_secs(20));
        let everything = format!("{}{}", output.stdout, output.stderr);
        assert_eq!(output.code(), Some(2), "{arguments:?}: {everything}");
        assert!(
            output.stderr.contains(flag) && output.stderr.contains("[redacted]"),
            "{arguments:?}: {everything}"
        );
        assert!(
            !everything.contains(PASSWORD),
            "{arguments:?}: {everything}"
        );
    }
}

/// The listener's TLS configuration (certificate and private key loaded) prints the key file's
/// path at most, never the key.
#[test]
fn tls_configuration_debug_prints_no_private_key() {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let directory = TempDir::new("secrets-tls");
    let certificate = directory.join("cert.pem");
    let private_key = directory.join("key.pem");
    std::fs::write(&certificate, certified.cert.pem()).unwrap();
    let key_pem = certified.key_pair.serialize_pem();
    std::fs::write(&private_key, &key_pem).unwrap();
    let config = scoretap_core::tls::ReloadableServerConfig::new(
        scoretap_core::tls::ServerCertificateFiles {
            certificate,
            private_key,
        },
    )
    .unwrap();
    let text = format!("{config:?} {config:#?} {:?}", config.current());
    assert!(text.contains("key.pem"), "{text}");
    let key_der = certified.key_pair.serialize_der();
    // The key as PEM lines, as base64 of the DER, and as Debug's list of byte values.
    let base64_body: String = key_pem
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    let bytes_listed = format!("{:?}", &key_der[key_der.len() - 16..]);
    let bytes_listed = bytes_listed.trim_matches(|c| c == '[' || c == ']');
    for form in base64_body
        .as_bytes()
        .chunks(24)
        .filter(|chunk| chunk.len() == 24)
        .map(|chunk| std::str::from_utf8(chunk).unwrap())
        .chain([bytes_listed])
    {
        assert!(!text.contains(form), "{form} in {text}");
    }
}
