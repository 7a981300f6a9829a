//! The command line contract: --version, flag validation (exit 2 naming the flag), env vars,
//! TOML config, --check-config, `run`, readiness, SIGTERM/SIGINT graceful drain, path prefix.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use scoretap_tests::client::empty;
use scoretap_tests::harness::proxy_for;
use scoretap_tests::process::run_cli;
use scoretap_tests::util::{eventually, free_port, TempDir};
use scoretap_tests::*;

const CLI_LIMIT: Duration = Duration::from_secs(15);

fn json_has_string(v: &serde_json::Value, s: &str) -> bool {
    match v {
        serde_json::Value::String(x) => x.contains(s),
        serde_json::Value::Array(a) => a.iter().any(|x| json_has_string(x, s)),
        serde_json::Value::Object(o) => o.values().any(|x| json_has_string(x, s)),
        _ => false,
    }
}

fn local(port: u16) -> SocketAddr {
    format!("127.0.0.1:{port}").parse().unwrap()
}

#[test]
fn version_prints_name_and_semver() {
    let o = run_cli(&["--version"], &[], CLI_LIMIT);
    assert_eq!(o.code(), Some(0), "stderr: {}", o.stderr);
    let out = o.stdout.trim();
    let v = out
        .strip_prefix("scoretap ")
        .unwrap_or_else(|| panic!("unexpected --version output {out:?}"));
    let parts: Vec<&str> = v.split(['.', '-', '+']).collect();
    assert!(
        parts.len() >= 3 && parts[..3].iter().all(|p| p.parse::<u64>().is_ok()),
        "version {v:?} is not semver"
    );
    assert_eq!(v, env!("CARGO_PKG_VERSION"));
}

#[test]
fn bad_flag_values_exit_2_and_name_the_flag() {
    let up = ["--upstream", "http://127.0.0.1:9"];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--upstream-timeout", "banana"], "--upstream-timeout"),
        (vec!["--connect-timeout", "soon"], "--connect-timeout"),
        (
            vec!["--pool-idle-timeout", "3 parsecs"],
            "--pool-idle-timeout",
        ),
        (vec!["--drain-timeout", "x"], "--drain-timeout"),
        (vec!["--listen", "not-an-address"], "--listen"),
        (vec!["--admin-listen", "300.1.1.1:80"], "--admin-listen"),
        (vec!["--upstream-protocol", "http3"], "--upstream-protocol"),
        (vec!["--forwarded", "sometimes"], "--forwarded"),
        (
            vec!["--trusted-proxies", "10.0.0.0/99"],
            "--trusted-proxies",
        ),
        (vec!["--log-level", "scoretap_core=loud"], "--log-level"),
    ];
    for (bad, flag) in cases {
        let mut args = vec!["--check-config"];
        args.extend(up);
        args.extend(&bad);
        let o = run_cli(&args, &[], CLI_LIMIT);
        assert_eq!(o.code(), Some(2), "{bad:?}: exit code; stderr {}", o.stderr);
        assert!(
            o.stderr.contains(flag),
            "{bad:?}: stderr should name {flag}: {}",
            o.stderr
        );
    }
    // Bad upstream URLs.
    for url in ["ftp://127.0.0.1:9", "not a url"] {
        let o = run_cli(&["--check-config", "--upstream", url], &[], CLI_LIMIT);
        assert_eq!(o.code(), Some(2), "--upstream {url:?}: stderr {}", o.stderr);
        assert!(o.stderr.contains("--upstream"), "{}", o.stderr);
    }
    // Missing --upstream, unknown flag.
    let o = run_cli(
        &["--check-config", "--listen", "127.0.0.1:0"],
        &[],
        CLI_LIMIT,
    );
    assert_eq!(o.code(), Some(2), "missing --upstream: {}", o.stderr);
    assert!(o.stderr.contains("--upstream"), "{}", o.stderr);
    let o = run_cli(
        &[
            "--check-config",
            "--upstream",
            "http://127.0.0.1:9",
            "--no-such-flag",
        ],
        &[],
        CLI_LIMIT,
    );
    assert_eq!(o.code(), Some(2), "unknown flag: {}", o.stderr);
    // TLS half-configured.
    let o = run_cli(
        &[
            "--check-config",
            "--upstream",
            "http://127.0.0.1:9",
            "--tls-cert",
            "/nonexistent/cert.pem",
        ],
        &[],
        CLI_LIMIT,
    );
    assert_eq!(
        o.code(),
        Some(2),
        "--tls-cert without --tls-key / missing file: {}",
        o.stderr
    );
}

/// `RUST_LOG` is honoured when `--log-level` is not given, `--log-level` wins over it, and a bad
/// `RUST_LOG` stops scoretap with exit 2 naming it (before, a bad filter fell back to `info`
/// silently and `RUST_LOG` was ignored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_log_is_honoured_when_log_level_is_not_given() {
    let up = TestUpstream::start().await;
    let debug_line = "response headers sent";
    for (flags, expect_debug) in [(&[][..], true), (&["--log-level", "info"][..], false)] {
        let proxy = Scoretap::builder()
            .upstream(&up.url())
            .args(flags.iter().copied())
            .env("RUST_LOG", "scoretap_core=debug,info")
            .start()
            .await;
        let mut client = Client::connect(proxy.addr, Proto::H1).await;
        assert_eq!(client.get("/ok").await.status, 200);
        let logged = eventually(Duration::from_secs(2), || {
            proxy.stderr().contains(debug_line)
        })
        .await;
        assert_eq!(
            logged,
            expect_debug,
            "flags {flags:?} with RUST_LOG=scoretap_core=debug,info: stderr {}",
            proxy.stderr()
        );
    }
    let o = run_cli(
        &["--check-config", "--upstream", "http://127.0.0.1:9"],
        &[("RUST_LOG", "scoretap_core=loud")],
        CLI_LIMIT,
    );
    assert_eq!(o.code(), Some(2), "stderr {}", o.stderr);
    assert!(o.stderr.contains("RUST_LOG"), "{}", o.stderr);
}

/// The start-up line says where records go: the store (as a URL, which never holds a credential)
/// and, for a remote store, the spool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_up_line_names_the_store_and_the_spool() {
    let up = TestUpstream::start().await;
    let store = TempDir::new("startup-store");
    let proxy = Scoretap::builder()
        .upstream(&up.url())
        .args([
            "--store".to_owned(),
            format!("file://{}", store.path().display()),
        ])
        .start()
        .await;
    let line = proxy
        .stderr()
        .lines()
        .find(|line| line.contains("scoretap is serving"))
        .map(str::to_owned)
        .unwrap_or_default();
    assert!(
        line.contains(&format!("store=file://{}", store.path().display())),
        "{line}"
    );
    assert!(line.contains("spool=none"), "{line}");
}

/// `scoretap traces --service` and the admin's `GET /traces?service=` pick one service's records
/// out of a shared store; a query that matches nothing says so on stderr, with how many records
/// it searched (stdout stays empty for pipes). Before, there was no service filter and an empty
/// answer was silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_filter_by_service_and_say_when_nothing_matched() {
    let up = TestUpstream::start().await;
    let store = scoretap_tests::traces::TraceStore::new();
    let mut admins = Vec::new();
    for service in ["svc-a", "svc-b"] {
        let proxy = Scoretap::builder()
            .upstream(&up.url())
            .args(store.args())
            .args(["--service", service])
            .start()
            .await;
        let mut client = Client::connect(proxy.addr, Proto::H1).await;
        let request = client
            .req("POST", "/echo")
            .header("x-request-id", format!("from-{service}"))
            .body(scoretap_tests::client::full("{\"x\": 1}"))
            .unwrap();
        assert_eq!(client.fetch(request, CLI_LIMIT).await.status, 200);
        store.wait(&format!("from-{service}")).await;
        admins.push(proxy);
    }
    let url = store.url();
    let o = run_cli(
        &["traces", "--store", &url, "--service", "svc-a"],
        &[],
        CLI_LIMIT,
    );
    assert_eq!(o.code(), Some(0), "{}", o.stderr);
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{}", o.stdout);
    assert!(
        lines[0].contains("\"correlation_id\":\"from-svc-a\""),
        "{}",
        lines[0]
    );

    let o = run_cli(
        &["traces", "--store", &url, "--service", "no-such-service"],
        &[],
        CLI_LIMIT,
    );
    assert_eq!(o.code(), Some(0), "{}", o.stderr);
    assert_eq!(o.stdout, "");
    assert!(
        o.stderr.contains("0 records matched (2 searched)"),
        "stderr: {}",
        o.stderr
    );

    let answer = scoretap_tests::traces::admin_request(
        admins[1].admin,
        "GET",
        "/traces?service=svc-b",
        &[],
        b"",
    )
    .await
    .expect("admin GET /traces");
    assert_eq!(answer.status(), 200, "{}", answer.body_str());
    let body = answer.body_str();
    assert_eq!(body.lines().count(), 1, "{body}");
    assert!(body.contains("\"correlation_id\":\"from-svc-b\""), "{body}");
}

/// `--access-log json` and `text`: one line per exchange on stderr with time, client, method,
/// path, status, sizes, duration, upstream time, correlation id and outcome; a key in the query
/// and the Authorization header never appear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_a_line_per_exchange_without_secrets() {
    let up = TestUpstream::start().await;
    for format in ["json", "text"] {
        let proxy = proxy_for(&up, &["--access-log", format]).await;
        let mut client = Client::connect(proxy.addr, Proto::H1).await;
        let id = format!("access-{format}");
        let request = client
            .req("POST", "/echo?model=7&api_key=SECRET-KEY-42")
            .header("x-request-id", id.as_str())
            .header("authorization", "Bearer SECRET-TOKEN-42")
            .body(scoretap_tests::client::full("{\"data\": [1, 2, 3]}"))
            .unwrap();
        let answer = client.fetch(request, CLI_LIMIT).await;
        assert_eq!(answer.status, 200);
        let logged = eventually(Duration::from_secs(3), || {
            proxy.stderr().lines().any(|line| line.contains(&id))
        })
        .await;
        let stderr = proxy.stderr();
        assert!(logged, "{format}: no access log line for {id}: {stderr}");
        assert!(
            !stderr.contains("SECRET"),
            "{format}: a secret in the log: {stderr}"
        );
        let line = stderr.lines().find(|line| line.contains(&id)).unwrap();
        if format == "json" {
            let entry: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(entry["method"], "POST", "{line}");
            assert_eq!(
                entry["target"], "/echo?model=7&api_key=[redacted]",
                "{line}"
            );
            assert_eq!(entry["status"], 200, "{line}");
            assert_eq!(entry["request_bytes"], 19, "{line}");
            assert_eq!(entry["response_bytes"], 19, "{line}");
            assert_eq!(entry["client"], "127.0.0.1", "{line}");
            assert_eq!(entry["outcome"], "ok", "{line}");
            assert!(entry["upstream_ms"].as_f64().is_some(), "{line}");
            assert!(entry["duration_ms"].as_f64().is_some(), "{line}");
            assert!(
                entry["time"].as_str().is_some_and(|t| t.ends_with('Z')),
                "{line}"
            );
        } else {
            assert!(
                line.contains(
                    "127.0.0.1 \"POST /echo?model=7&api_key=[redacted] HTTP/1.1\" 200 19B 19B"
                ),
                "{line}"
            );
            assert!(line.ends_with(" ok"), "{line}");
        }
    }
    let o = run_cli(
        &[
            "--check-config",
            "--upstream",
            "http://127.0.0.1:9",
            "--access-log",
            "loud",
        ],
        &[],
        CLI_LIMIT,
    );
    assert_eq!(o.code(), Some(2), "{}", o.stderr);
    assert!(o.stderr.contains("--access-log"), "{}", o.stderr);
}

/// `--check-config` is a flag only: `SCORETAP_CHECK_CONFIG` left in a manifest would have made
/// every start print the configuration and exit (a restart loop).
#[test]
fn check_config_has_no_environment_variable() {
    let o = run_cli(&["--help"], &[], CLI_LIMIT);
    assert_eq!(o.code(), Some(0), "{}", o.stderr);
    assert!(o.stdout.contains("--check-config"), "{}", o.stdout);
    assert!(!o.stdout.contains("SCORETAP_CHECK_CONFIG"), "{}", o.stdout);
    assert!(
        o.stdout
            .contains("/healthz, /readyz, /metrics, /traces, /capture"),
        "--admin-listen's help names every admin endpoint: {}",
        o.stdout
    );
}

#[test]
fn bad_env_value_exit_2_and_names_the_flag() {
    let o = run_cli(
        &["--check-config"],
        &[
            ("SCORETAP_UPSTREAM", "http://127.0.0.1:9"),
            ("SCORETAP_UPSTREAM_TIMEOUT", "banana"),
        ],
        CLI_LIMIT,
    );
    assert_eq!(o.code(), Some(2), "stderr {}", o.stderr);
    assert!(
        o.stderr.contains("upstream-timeout") || o.stderr.contains("UPSTREAM_TIMEOUT"),
        "{}",
        o.stderr
    );
}

#[test]
fn check_config_prints_effective_config_json() {
    let o = run_cli(
        &[
            "--check-config",
            "--upstream",
            "http://127.0.0.1:9/base",
            "--service",
            "svc-flag",
            "--upstream-timeout",
            "2s",
        ],
        &[("SCORETAP_VIA", "via-from-env")],
        CLI_LIMIT,
    );
    assert_eq!(o.code(), Some(0), "stderr {}", o.stderr);
    let j: serde_json::Value = serde_json::from_str(o.stdout.trim())
        .unwrap_or_else(|e| panic!("--check-config stdout is not JSON ({e}): {}", o.stdout));
    assert!(j.is_object());
    for s in ["http://127.0.0.1:9/base", "svc-flag", "via-from-env"] {
        assert!(json_has_string(&j, s), "effective config lacks {s:?}: {j}");
    }
}

#[test]
fn check_config_reads_toml() {
    let dir = TempDir::new("cfg");
    let path = dir.join("scoretap.toml");
    std::fs::write(
        &path,
        "upstream = \"http://127.0.0.1:9\"\nservice = \"svc-toml\"\nupstream-timeout = \"2s\"\nforwarded = \"forwarded\"\n",
    )
    .unwrap();
    let p = path.display().to_string();
    let o = run_cli(&["--check-config", "--config", &p], &[], CLI_LIMIT);
    assert_eq!(o.code(), Some(0), "stderr {}", o.stderr);
    let j: serde_json::Value = serde_json::from_str(o.stdout.trim()).expect("json");
    assert!(json_has_string(&j, "svc-toml"), "{j}");
    // A bad value in the file is a usage error naming the key.
    std::fs::write(
        &path,
        "upstream = \"http://127.0.0.1:9\"\nupstream-timeout = \"banana\"\n",
    )
    .unwrap();
    let o = run_cli(&["--check-config", "--config", &p], &[], CLI_LIMIT);
    assert_eq!(o.code(), Some(2), "stdout {} stderr {}", o.stdout, o.stderr);
    assert!(o.stderr.contains("upstream-timeout"), "{}", o.stderr);
}

#[tokio::test]
async fn env_vars_configure_a_running_proxy() {
    let up = TestUpstream::start().await;
    let (listen, admin) = (local(free_port()), local(free_port()));
    let proxy = Scoretap::builder()
        .no_listen_flag()
        .no_admin_flag()
        .env("SCORETAP_LISTEN", listen.to_string())
        .env("SCORETAP_ADMIN_LISTEN", admin.to_string())
        .env("SCORETAP_UPSTREAM", up.url())
        .env("SCORETAP_UPSTREAM_TIMEOUT", "500ms")
        .start_with_addrs(listen, admin)
        .await;
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    assert_eq!(c.get("/ok?env=1").await.status, 200);
    up.wait_path("env=1").await;
    let t = Instant::now();
    let r = c.get("/stall?env=2").await;
    assert_eq!(r.status, 504, "SCORETAP_UPSTREAM_TIMEOUT=500ms not applied");
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn config_file_configures_a_running_proxy() {
    let up = TestUpstream::start().await;
    let (listen, admin) = (local(free_port()), local(free_port()));
    let dir = TempDir::new("cfg");
    let path = dir.join("scoretap.toml");
    std::fs::write(
        &path,
        format!(
            "listen = \"{listen}\"\nadmin-listen = \"{admin}\"\nupstream = \"{}\"\nupstream-timeout = \"500ms\"\nvia = \"cfg-via\"\n",
            up.url()
        ),
    )
    .unwrap();
    let proxy = Scoretap::builder()
        .no_listen_flag()
        .no_admin_flag()
        .arg("--config")
        .arg(path.display().to_string())
        .start_with_addrs(listen, admin)
        .await;
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    let r = c.get("/ok?cfg=1").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        up.wait_path("cfg=1").await.header("via").as_deref(),
        Some("1.1 cfg-via")
    );
    let t = Instant::now();
    assert_eq!(c.get("/stall?cfg=2").await.status, 504);
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn explicit_run_subcommand_works() {
    let up = TestUpstream::start().await;
    let proxy = Scoretap::builder()
        .arg("run")
        .upstream(&up.url())
        .start()
        .await;
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    assert_eq!(c.get("/ok").await.status, 200);
}

#[tokio::test]
async fn upstream_url_path_prefix_is_prepended() {
    let up = TestUpstream::start().await;
    let proxy = Scoretap::start(&format!("{}/prefix", up.url()), &[]).await;
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    assert_eq!(c.get("/score?x=1").await.status, 200);
    let rec = up.wait_path("x=1").await;
    assert_eq!(rec.path_and_query(), "/prefix/score?x=1");
}

/// `--readyz-upstream false`: `/readyz` answers 200 while the upstream is down (replicas in front
/// of one shared remote endpoint stay in their load balancer during its outage); draining still
/// makes it 503.
#[tokio::test]
async fn readyz_can_leave_the_upstream_out() {
    let dead = format!("http://127.0.0.1:{}", free_port());
    let proxy = Scoretap::start(&dead, &["--readyz-upstream", "false"]).await;
    assert_eq!(
        proxy.readyz().await,
        Some(200),
        "ready although the upstream is down"
    );
    let o = run_cli(
        &[
            "--check-config",
            "--upstream",
            &dead,
            "--readyz-upstream",
            "maybe",
        ],
        &[],
        CLI_LIMIT,
    );
    assert_eq!(o.code(), Some(2), "{}", o.stderr);
    assert!(o.stderr.contains("--readyz-upstream"), "{}", o.stderr);
}

#[tokio::test]
async fn healthz_and_readyz_follow_upstream_reachability() {
    let up = TestUpstream::start().await;
    let proxy = proxy_for(&up, &[]).await;
    assert_eq!(proxy.admin_get("/healthz").await.map(|r| r.0), Some(200));
    assert_eq!(
        proxy.readyz().await,
        Some(200),
        "upstream reachable → ready"
    );

    let dead = format!("http://127.0.0.1:{}", free_port());
    let proxy2 = Scoretap::start(&dead, &[]).await;
    assert_eq!(
        proxy2.admin_get("/healthz").await.map(|r| r.0),
        Some(200),
        "alive even if upstream is down"
    );
    assert_eq!(
        proxy2.readyz().await,
        Some(503),
        "unreachable upstream → not ready"
    );

    // Upstream goes away → readiness follows.
    let addr = up.addr;
    drop(up);
    let mut st = None;
    for _ in 0..50 {
        st = proxy.readyz().await;
        if st == Some(503) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        st,
        Some(503),
        "readyz still {st:?} after upstream {addr} went away"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_0() {
    let up = TestUpstream::start().await;
    let mut proxy = proxy_for(&up, &["--drain-timeout", "10s"]).await;
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    let in_flight = tokio::spawn(async move {
        let req = c
            .req("GET", "/delay?ms=1500&t=drain")
            .body(empty())
            .unwrap();
        c.fetch(req, Duration::from_secs(20)).await
    });
    up.wait_path("t=drain").await;
    let t = Instant::now();
    proxy.sigterm();

    // While draining: not ready.
    let mut saw_503 = false;
    while t.elapsed() < Duration::from_millis(1200) {
        if proxy.readyz().await == Some(503) {
            saw_503 = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(saw_503, "/readyz did not turn 503 while draining");

    // New requests are not served normally.
    let new_conn = tokio::time::timeout(Duration::from_secs(1), async {
        match tokio::net::TcpStream::connect(proxy.addr).await {
            Err(_) => None,
            Ok(s) => {
                let mut raw = RawConn::from_io(Box::new(s));
                if raw
                    .try_send(b"GET /ok?t=late HTTP/1.1\r\nHost: h\r\n\r\n")
                    .await
                    .is_err()
                {
                    return None;
                }
                raw.try_read_response(false).await.map(|r| r.status())
            }
        }
    })
    .await;
    if let Ok(Some(status)) = new_conn {
        assert_ne!(status, 200, "a new request was proxied after SIGTERM");
    }

    let r = within(Duration::from_secs(10), "in-flight request", in_flight)
        .await
        .unwrap();
    assert_eq!(
        r.status, 200,
        "in-flight request must complete during drain"
    );
    assert_eq!(r.text(), "delayed 1500");
    let st = proxy.wait_exit(Duration::from_secs(8)).await;
    assert_eq!(st.code(), Some(0), "exit status after graceful drain: {st}");
    assert!(up.find(|r| r.path_and_query().contains("t=late")).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drain_deadline_bounds_shutdown() {
    let up = TestUpstream::start().await;
    let mut proxy = proxy_for(&up, &["--drain-timeout", "1s"]).await;
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    let stuck = tokio::spawn(async move {
        let req = c.req("GET", "/stall?t=deadline").body(empty()).unwrap();
        let _ = c.send(req).await;
    });
    up.wait_path("t=deadline").await;
    let t = Instant::now();
    proxy.sigterm();
    let st = proxy.wait_exit(Duration::from_secs(6)).await;
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "shutdown took {took:?} with --drain-timeout 1s"
    );
    assert_eq!(st.code(), Some(0), "{st}");
    stuck.abort();
}

#[tokio::test]
async fn sigint_when_idle_exits_0_quickly() {
    let up = TestUpstream::start().await;
    let mut proxy = proxy_for(&up, &[]).await;
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    assert_eq!(c.get("/ok").await.status, 200);
    drop(c);
    proxy.sigint();
    let st = proxy.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(st.code(), Some(0), "{st}");
}
