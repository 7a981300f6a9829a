//! The admin listener's security: changes need `--admin-token` (refused when none is configured,
//! 401 for a missing or wrong one, whatever its length), records (`GET /traces`) need it once
//! one is set (and without one are served only to a client on the admin's own address), the
//! probes and metrics never do, and the listener stays on loopback unless `--admin-allow-remote`
//! says otherwise.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use scoretap_tests::traces::{admin_request_from, capture_state, TraceStore};
use scoretap_tests::util::TempDir;
use scoretap_tests::*;
use serde_json::json;

const TOKEN: &str = "admin-token-3Kd8Qm2Zx7";
/// Another address of this host: to the admin, a client on another host.
const ELSEWHERE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

async fn proxy_with(upstream: &TestUpstream, store: &TraceStore, extra: &[&str]) -> Scoretap {
    Scoretap::builder()
        .upstream(&upstream.url())
        .args(store.args())
        .args(extra.iter().copied())
        .start()
        .await
}

/// `method path` on the admin with `authorization` when given; status, `www-authenticate` and
/// body.
async fn admin(
    address: SocketAddr,
    method: &str,
    path: &str,
    authorization: Option<&str>,
    body: &str,
) -> (u16, Option<String>, String) {
    admin_from(None, address, method, path, authorization, body).await
}

/// [`admin`] from the local address `local` when given.
async fn admin_from(
    local: Option<IpAddr>,
    address: SocketAddr,
    method: &str,
    path: &str,
    authorization: Option<&str>,
    body: &str,
) -> (u16, Option<String>, String) {
    let mut headers = vec![("content-type", "application/json")];
    if let Some(value) = authorization {
        headers.push(("authorization", value));
    }
    let response = admin_request_from(local, address, method, path, &headers, body.as_bytes())
        .await
        .unwrap_or_else(|| panic!("{method} {path}: no answer"));
    (
        response.status(),
        response.header("www-authenticate").map(str::to_owned),
        response.body_str(),
    )
}

/// One exchange through the proxy, and its record in the store.
async fn record_one(proxy: &Scoretap, store: &TraceStore, marker: &str) {
    let mut client = Client::connect(proxy.addr, Proto::H1).await;
    let path = format!("/echo?marker={marker}");
    let answer = client.post(&path, r#"{"data": [[1]]}"#).await;
    assert_eq!(answer.status, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !store
        .records()
        .iter()
        .any(|record| record.line.contains(marker))
    {
        assert!(Instant::now() < deadline, "no record of {path}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn without_a_configured_token_changes_are_refused() {
    let upstream = TestUpstream::start().await;
    let store = TraceStore::new();
    let proxy = proxy_with(&upstream, &store, &[]).await;
    let off = r#"{"enabled": false}"#;
    for authorization in [
        None,
        Some(format!("Bearer {TOKEN}")),
        Some("Bearer ".into()),
    ] {
        let (status, _, body) = admin(
            proxy.admin,
            "PUT",
            "/capture",
            authorization.as_deref(),
            off,
        )
        .await;
        assert_eq!(status, 403, "{authorization:?}: {body}");
        assert!(body.contains("--admin-token"), "{body}");
    }
    assert_eq!(capture_state(proxy.admin).await["enabled"], true);
    // Without a token, reading is open (on loopback), as are the probes and metrics.
    record_one(&proxy, &store, "open-read").await;
    let (status, _, body) = admin(proxy.admin, "GET", "/traces?limit=5", None, "").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("open-read"), "{body}");
    for path in ["/healthz", "/readyz", "/metrics", "/capture"] {
        assert_eq!(
            admin(proxy.admin, "GET", path, None, "").await.0,
            200,
            "{path}"
        );
    }
    // From another address (127.0.0.2, as another host, or the kubelet reaching a pod, would
    // be), records are refused without a token; probes, metrics and the state stay open.
    let elsewhere = Some(ELSEWHERE);
    let (status, _, body) =
        admin_from(elsewhere, proxy.admin, "GET", "/traces?limit=5", None, "").await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("--admin-token"), "{body}");
    assert!(!body.contains("open-read"), "{body}");
    for path in ["/healthz", "/readyz", "/metrics", "/capture"] {
        assert_eq!(
            admin_from(elsewhere, proxy.admin, "GET", path, None, "")
                .await
                .0,
            200,
            "{path} from 127.0.0.2"
        );
    }
}

#[tokio::test]
async fn a_missing_or_wrong_token_is_refused_and_the_right_one_works() {
    let upstream = TestUpstream::start().await;
    let store = TraceStore::new();
    let proxy = proxy_with(&upstream, &store, &["--admin-token", TOKEN]).await;
    let off = r#"{"enabled": false}"#;
    let same_length_wrong = format!("{}X", &TOKEN[..TOKEN.len() - 1]);
    let refused = [
        None,
        Some(String::new()),
        Some("Bearer".into()),
        Some("Bearer ".into()),
        Some(format!("Bearer {same_length_wrong}")),
        Some(format!("Bearer {}", &TOKEN[..TOKEN.len() - 1])),
        Some(format!("Bearer {TOKEN}x")),
        Some(format!("Bearer {}", TOKEN.to_uppercase())),
        Some(format!("Basic {TOKEN}")),
        Some(TOKEN.to_owned()),
    ];
    for authorization in &refused {
        let (status, challenge, body) = admin(
            proxy.admin,
            "PUT",
            "/capture",
            authorization.as_deref(),
            off,
        )
        .await;
        assert_eq!(status, 401, "{authorization:?}: {body}");
        assert_eq!(
            challenge.as_deref(),
            Some("Bearer realm=\"scoretap-admin\""),
            "{authorization:?}"
        );
        assert!(!body.contains(TOKEN), "{body}");
    }
    assert_eq!(capture_state(proxy.admin).await["enabled"], true);

    let (status, _, body) = admin(
        proxy.admin,
        "PUT",
        "/capture",
        Some(&format!("Bearer {TOKEN}")),
        off,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(capture_state(proxy.admin).await["enabled"], false);
    // The scheme is case-insensitive (RFC 9110 §11.1).
    let (status, _, body) = admin(
        proxy.admin,
        "PUT",
        "/capture",
        Some(&format!("bearer {TOKEN}")),
        r#"{"enabled": true}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(capture_state(proxy.admin).await["enabled"], true);
}

#[tokio::test]
async fn records_need_the_token_once_one_is_set() {
    let upstream = TestUpstream::start().await;
    let store = TraceStore::new();
    let proxy = proxy_with(&upstream, &store, &["--admin-token", TOKEN]).await;
    record_one(&proxy, &store, "guarded-read").await;
    for authorization in [None, Some("Bearer wrong-token-value".to_owned())] {
        let (status, _, body) = admin(
            proxy.admin,
            "GET",
            "/traces?limit=5",
            authorization.as_deref(),
            "",
        )
        .await;
        assert_eq!(status, 401, "{authorization:?}: {body}");
        assert!(!body.contains("guarded-read"), "{body}");
    }
    // With the token, records are served to this host and to other addresses alike.
    for local in [None, Some(ELSEWHERE)] {
        let (status, _, body) = admin_from(
            local,
            proxy.admin,
            "GET",
            "/traces?limit=5",
            Some(&format!("Bearer {TOKEN}")),
            "",
        )
        .await;
        assert_eq!(status, 200, "from {local:?}: {body}");
        assert!(body.contains("guarded-read"), "{body}");
    }
    // Probes, metrics and the capture state stay open: orchestrators and Prometheus have no token.
    for path in ["/healthz", "/readyz", "/metrics", "/capture"] {
        assert_eq!(
            admin(proxy.admin, "GET", path, None, "").await.0,
            200,
            "{path}"
        );
    }
    // The capture state's JSON is the same as before any refusal: nothing changed.
    assert_eq!(
        capture_state(proxy.admin).await["enabled"],
        json!(true),
        "refused reads change nothing"
    );
}

/// A non-loopback admin address is refused at start, naming the flag that allows it; loopback
/// addresses need nothing; the flag, its variable and the config key each allow it. (Checked
/// with `--check-config` and one refused start: the tests bind nothing but 127.0.0.1.)
#[test]
fn a_remote_admin_address_needs_admin_allow_remote() {
    const LIMIT: Duration = Duration::from_secs(20);
    let base = ["--upstream", "http://127.0.0.1:9"];
    for remote in ["0.0.0.0:9901", "[::]:9901", "192.0.2.10:9901"] {
        for check in [true, false] {
            let mut arguments = base.to_vec();
            arguments.extend(["--admin-listen", remote]);
            if check {
                arguments.push("--check-config");
            }
            let output = run_cli(&arguments, &[], LIMIT);
            assert_eq!(output.code(), Some(2), "{arguments:?}: {}", output.stderr);
            assert!(
                output.stderr.contains("--admin-listen")
                    && output.stderr.contains("--admin-allow-remote")
                    && output.stderr.contains(remote),
                "{arguments:?}: {}",
                output.stderr
            );
            assert!(output.stdout.is_empty(), "{}", output.stdout);
        }
    }
    let directory = TempDir::new("admin-remote");
    let config = directory.join("scoretap.toml");
    std::fs::write(
        &config,
        "upstream = \"http://127.0.0.1:9\"\nadmin-listen = \"0.0.0.0:9901\"\nadmin-allow-remote = true\n",
    )
    .unwrap();
    let config = config.display().to_string();
    /// Extra arguments and environment that allow a remote admin address.
    type Allowance<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>);
    let allowed: [Allowance; 4] = [
        (vec!["--admin-allow-remote"], vec![]),
        (vec!["--admin-allow-remote", "true"], vec![]),
        (vec![], vec![("SCORETAP_ADMIN_ALLOW_REMOTE", "true")]),
        (vec!["--config", &config], vec![]),
    ];
    for (extra, environment) in allowed {
        let mut arguments = vec!["--check-config", "--admin-listen", "0.0.0.0:9901"];
        if !extra.contains(&"--config") {
            arguments.extend(base);
        }
        arguments.extend(extra);
        let output = run_cli(&arguments, &environment, LIMIT);
        assert_eq!(output.code(), Some(0), "{arguments:?}: {}", output.stderr);
        let config: serde_json::Value = serde_json::from_str(&output.stdout).unwrap();
        assert_eq!(config["admin_listen"], "0.0.0.0:9901");
        assert_eq!(config["admin_allow_remote"], true);
    }
    // An explicit false refuses, even with the config file allowing it.
    let output = run_cli(
        &[
            "--check-config",
            "--config",
            &config,
            "--admin-allow-remote",
            "false",
        ],
        &[],
        LIMIT,
    );
    assert_eq!(output.code(), Some(2), "{}", output.stderr);
    for loopback in ["127.0.0.1:9901", "[::1]:9901", "localhost:9901"] {
        let mut arguments = base.to_vec();
        arguments.extend(["--check-config", "--admin-listen", loopback]);
        let output = run_cli(&arguments, &[], LIMIT);
        assert_eq!(output.code(), Some(0), "{loopback}: {}", output.stderr);
        let config: serde_json::Value = serde_json::from_str(&output.stdout).unwrap();
        assert_eq!(config["admin_allow_remote"], false);
    }
    let output = run_cli(
        &["--check-config", "--upstream", "http://127.0.0.1:9"],
        &[],
        LIMIT,
    );
    let config: serde_json::Value = serde_json::from_str(&output.stdout).unwrap();
    assert_eq!(config["admin_listen"], "127.0.0.1:9901", "the default");
    assert_eq!(config["admin_allow_remote"], false, "the default");
}
