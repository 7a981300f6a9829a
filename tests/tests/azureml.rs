//! The real Azure ML inference server (`azmlinfsrv`) behind scoretap: answers through the proxy
//! must be byte-for-byte those of the server itself.
//!
//! `azmlinfsrv` is installed by scripts/install-test-deps.sh; the test fails if it is missing
//! unless SCORETAP_SKIP_AZUREML=1.
#![allow(clippy::unwrap_used)]

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use scoretap_tests::client::{empty, full};
use scoretap_tests::raw::try_get;
use scoretap_tests::util::{free_port, which, workspace_root, TempDir};
use scoretap_tests::*;

/// azmlinfsrv (gunicorn master + workers) in its own process group; the group is stopped on drop.
struct AzureMlServer {
    child: Child,
    port: u16,
    dir: TempDir,
}

impl AzureMlServer {
    async fn start() -> Option<AzureMlServer> {
        if std::env::var("SCORETAP_SKIP_AZUREML").as_deref() == Ok("1") {
            eprintln!("SCORETAP_SKIP_AZUREML=1: skipping the azmlinfsrv test");
            return None;
        }
        let bin = which("azmlinfsrv").unwrap_or_else(|| {
            panic!(
                "azmlinfsrv is not on PATH: run scripts/install-test-deps.sh \
                 (pip install azureml-inference-server-http scikit-learn), \
                 or set SCORETAP_SKIP_AZUREML=1 to skip"
            )
        });
        let script = workspace_root().join("tests/fixtures/azureml/score.py");
        assert!(script.is_file(), "missing {}", script.display());
        let port = free_port();
        let health_port = free_port();
        let dir = TempDir::new("azureml");
        let log = std::fs::File::create(dir.join("server.log")).unwrap();
        let child = Command::new(bin)
            .arg("--entry_script")
            .arg(&script)
            .arg("--port")
            .arg(port.to_string())
            .arg("--health_port")
            .arg(health_port.to_string())
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .process_group(0)
            .spawn()
            .expect("spawn azmlinfsrv");
        let mut s = AzureMlServer { child, port, dir };
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        let start = Instant::now();
        loop {
            if let Some(st) = s.child.try_wait().unwrap() {
                panic!("azmlinfsrv exited with {st}:\n{}", s.log());
            }
            if let Some((200, _)) = try_get(addr, "/").await {
                return Some(s);
            }
            if start.elapsed() > Duration::from_secs(90) {
                panic!("azmlinfsrv not up on {addr} within 90 s:\n{}", s.log());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for AzureMlServer {
    fn drop(&mut self) {
        let pgid = self.child.id();
        // The whole process group we created (gunicorn master and its workers).
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{pgid}")])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pgid}")])
            .status();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- azmlinfsrv log ---\n{}", self.log());
        }
    }
}

/// Headers that legitimately differ between two calls or are hop-by-hop. `x-request-id` is
/// checked separately: the proxy returns one even when the server does not.
const VOLATILE: [&str; 5] = [
    "date",
    "connection",
    "keep-alive",
    "x-ms-run-fn-exec-ms",
    "x-request-id",
];

fn comparable(h: &http::HeaderMap) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = h
        .iter()
        .filter(|(k, _)| !VOLATILE.contains(&k.as_str()))
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    v.sort();
    v
}

struct Case {
    name: &'static str,
    method: &'static str,
    path: &'static str,
    body: Option<Vec<u8>>,
}

fn cases() -> Vec<Case> {
    let big: Vec<Vec<f64>> = (0..2000)
        .map(|i| (0..10).map(|j| f64::from(i * 10 + j) / 7.0).collect())
        .collect();
    vec![
        Case {
            name: "liveness",
            method: "GET",
            path: "/",
            body: None,
        },
        Case {
            name: "score",
            method: "POST",
            path: "/score",
            body: Some(br#"{"data": [[1,2,3,4,5,6,7,8,9,10], [0,0,0,0,0,0,0,0,0,0]]}"#.to_vec()),
        },
        Case {
            name: "malformed json",
            method: "POST",
            path: "/score",
            body: Some(br#"{"data": [[1,2,3"#.to_vec()),
        },
        Case {
            name: "wrong shape",
            method: "POST",
            path: "/score",
            body: Some(br#"{"data": [[1,2]]}"#.to_vec()),
        },
        Case {
            name: "2000 rows",
            method: "POST",
            path: "/score",
            body: Some(serde_json::json!({ "data": big }).to_string().into_bytes()),
        },
        Case {
            name: "score without body",
            method: "GET",
            path: "/score",
            body: None,
        },
        Case {
            name: "unknown path",
            method: "GET",
            path: "/nope",
            body: None,
        },
    ]
}

async fn call(addr: std::net::SocketAddr, proto: Proto, case: &Case, id: &str) -> Collected {
    let mut c = Client::connect(addr, proto).await;
    let mut b = c.req(case.method, case.path).header("x-request-id", id);
    if case.body.is_some() {
        b = b.header("content-type", "application/json");
    }
    let body = match &case.body {
        Some(d) => full(d.clone()),
        None => empty(),
    };
    c.fetch(b.body(body).unwrap(), Duration::from_secs(30))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azureml_scoring_server_answers_identically_through_the_proxy() {
    let Some(server) = AzureMlServer::start().await else {
        return;
    };
    let direct_addr: std::net::SocketAddr = format!("127.0.0.1:{}", server.port).parse().unwrap();
    let proxy = Scoretap::start(&server.url(), &["--service", "azureml-test"]).await;

    for (i, case) in cases().iter().enumerate() {
        let id = format!("azml-{i}");
        let direct = call(direct_addr, Proto::H1, case, &id).await;
        let via = call(proxy.addr, Proto::H1, case, &id).await;
        assert_eq!(via.status, direct.status, "{}: status", case.name);
        assert!(
            via.body == direct.body,
            "{}: body differs\n direct: {:?}\n proxy:  {:?}",
            case.name,
            direct.text(),
            via.text()
        );
        assert_eq!(
            comparable(&via.headers),
            comparable(&direct.headers),
            "{}: headers differ",
            case.name
        );
        assert_eq!(via.header("x-request-id").as_deref(), Some(id.as_str()));
        if let Some(d) = direct.header("x-request-id") {
            assert_eq!(
                d, id,
                "{}: the server saw the client's x-request-id",
                case.name
            );
        }

        // HTTP/2 client to the proxy (HTTP/1.1 to gunicorn): same status and bytes.
        let via2 = call(proxy.addr, Proto::H2, case, &format!("{id}-h2")).await;
        assert_eq!(via2.status, direct.status, "{} (h2): status", case.name);
        assert!(
            via2.body == direct.body,
            "{} (h2): body differs: {:?}",
            case.name,
            via2.text()
        );
    }

    // The scoring itself: y = x·(1..10) + 0.5.
    let r = call(proxy.addr, Proto::H1, &cases()[1], "azml-check").await;
    let preds: Vec<f64> = serde_json::from_slice(&r.body).unwrap();
    assert!(
        (preds[0] - 385.5).abs() < 1e-6 && (preds[1] - 0.5).abs() < 1e-6,
        "{preds:?}"
    );
    let r = call(proxy.addr, Proto::H1, &cases()[2], "azml-bad").await;
    assert_eq!(
        r.status, 500,
        "malformed JSON is the scoring server's 500, passed through"
    );
}
