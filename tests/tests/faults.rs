//! The fault suite's proxy half (the storage half is in `storage_remote.rs`): for each fault,
//! what the client sees, the record written, what was lost, and whether other clients were
//! served meanwhile. A well-behaved client sends small requests on its own connection for the
//! whole of each fault; every case prints one summary line (`-- --nocapture` shows them; the
//! table is in tests/README.md).
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use scoretap_tests::client::{channel_body, empty};
use scoretap_tests::harness::proxy_with_store;
use scoretap_tests::harness::upstream_args;
use scoretap_tests::traces::{TraceRecord, TraceStore};
use scoretap_tests::util::{eventually, free_port};
use scoretap_tests::*;

/// What the well-behaved client saw while a fault happened.
struct Others {
    answered: usize,
    sent: usize,
    /// Answers with the expected status.
    expected: usize,
    p99: Duration,
}

impl std::fmt::Display for Others {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "others={}/{} as_expected={} others_p99={:.1}ms",
            self.answered,
            self.sent,
            self.expected,
            self.p99.as_secs_f64() * 1000.0
        )
    }
}

/// Sends `GET path` every 10 ms on its own connection until stopped.
struct OtherClient {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Others>,
}

impl OtherClient {
    async fn start(proxy: SocketAddr, path: &'static str, expected_status: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let running = stop.clone();
        let task = tokio::spawn(async move {
            let mut client = Client::connect(proxy, Proto::H1).await;
            let (mut answered, mut sent, mut expected) = (0, 0, 0);
            let mut latencies = Vec::new();
            while !running.load(Ordering::Relaxed) {
                sent += 1;
                let started = Instant::now();
                let request = client.req("GET", path).body(empty()).unwrap();
                if let Ok(answer) = client.send_within(request, Duration::from_secs(5)).await {
                    answered += 1;
                    latencies.push(started.elapsed());
                    if answer.status().as_u16() == expected_status {
                        expected += 1;
                    }
                    let _ = answer.into_body().collect().await;
                } else {
                    client = Client::connect(proxy, Proto::H1).await;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            latencies.sort();
            let p99 = latencies
                .get((latencies.len() * 99 / 100).min(latencies.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default();
            Others {
                answered,
                sent,
                expected,
                p99,
            }
        });
        // Some traffic before the fault.
        tokio::time::sleep(Duration::from_millis(200)).await;
        Self { stop, task }
    }

    /// Keeps going a little after the fault, then stops; every request must have been
    /// answered as expected.
    async fn finish(self) -> Others {
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.stop.store(true, Ordering::Relaxed);
        let others = self.task.await.unwrap();
        assert!(others.sent >= 20, "too few requests: {others}");
        assert_eq!(
            others.answered, others.sent,
            "a request went unanswered: {others}"
        );
        assert_eq!(
            others.expected, others.sent,
            "an unexpected status: {others}"
        );
        others
    }
}

fn body_summary(record: &TraceRecord, part: &str) -> String {
    let body = record.at(&format!("/{part}/body"));
    format!(
        "{part}.size={} {part}.complete={}",
        body["size"], body["complete"]
    )
}

/// The request that meets the fault, on its own connection, with `id` as its correlation id.
async fn faulty_request(
    proxy: SocketAddr,
    method: &str,
    path: &str,
    id: &str,
    body: scoretap_tests::client::ReqBody,
) -> scoretap_tests::Collected {
    let mut client = Client::connect(proxy, Proto::H1).await;
    let request = client
        .req(method, path)
        .header("x-request-id", id)
        .body(body)
        .unwrap();
    client.fetch(request, Duration::from_secs(10)).await
}

/// Exactly one record has this correlation id.
async fn the_record(store: &TraceStore, correlation_id: &str) -> TraceRecord {
    let record = store.wait(correlation_id).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        store.find_all(correlation_id).len(),
        1,
        "one record per exchange"
    );
    record
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_refuses_connections() {
    let dead = format!("http://127.0.0.1:{}", free_port());
    let store = TraceStore::new();
    let proxy = proxy_with_store(&dead, &store, &[]).await;
    // Every request fails the same way: the others get prompt 502s, not hangs.
    let others = OtherClient::start(proxy.addr, "/other", 502).await;
    let answer = faulty_request(
        proxy.addr,
        "POST",
        "/score",
        "fault-refused",
        scoretap_tests::client::full(r#"{"data": [[1]]}"#),
    )
    .await;
    assert_eq!(answer.status, 502);
    assert_eq!(
        answer.json()["error"],
        "upstream_connect_failed",
        "{}",
        answer.text()
    );
    let others = others.finish().await;
    let record = the_record(&store, "fault-refused").await;
    assert_eq!(record.str_at("/outcome"), Some("upstream_error"));
    assert_eq!(record.u64_at("/response/status"), Some(502));
    // The input is kept although the upstream never read it.
    assert_eq!(record.at("/request/body/complete"), true);
    assert_eq!(record.u64_at("/request/body/size"), Some(15));
    println!(
        "fault=upstream_refuses client_saw=502_json records=1 outcome=upstream_error {} lost=0 {others}",
        body_summary(&record, "request")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_resets_mid_response() {
    let upstream = TestUpstream::start().await;
    let store = TraceStore::new();
    let proxy = proxy_with_store(&upstream.url(), &store, &[]).await;
    let others = OtherClient::start(proxy.addr, "/ok", 200).await;
    let mut raw = RawConn::connect(proxy.addr).await;
    raw.send(b"GET /reset?when=body HTTP/1.1\r\nHost: h\r\nx-request-id: fault-reset\r\n\r\n")
        .await;
    let answer = within(STEP, "cut response", raw.read_response(false)).await;
    assert_eq!(answer.status(), 200);
    assert!(!answer.complete, "a cut body must not look complete");
    assert_eq!(answer.body.len(), 1000);
    let others = others.finish().await;
    let record = the_record(&store, "fault-reset").await;
    assert_eq!(record.u64_at("/response/status"), Some(200));
    assert_eq!(record.at("/response/body/complete"), false);
    // What crossed is recorded: the 1,000 bytes the client got.
    assert_eq!(record.u64_at("/response/body/size"), Some(1000));
    assert!(record.at("/error").is_object(), "{}", record.brief());
    println!(
        "fault=upstream_resets_mid_response client_saw=200_then_cut_at_1000_of_100000 records=1 {} error={} {others}",
        body_summary(&record, "response"),
        record.at("/error/kind")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_stalls() {
    let upstream = TestUpstream::start().await;
    let store = TraceStore::new();
    let proxy = proxy_with_store(&upstream.url(), &store, &["--upstream-timeout", "500ms"]).await;
    let others = OtherClient::start(proxy.addr, "/ok", 200).await;
    let started = Instant::now();
    let answer = faulty_request(proxy.addr, "GET", "/stall", "fault-stall", empty()).await;
    let waited = started.elapsed();
    assert_eq!(answer.status, 504);
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    let others = others.finish().await;
    let record = the_record(&store, "fault-stall").await;
    assert_eq!(record.str_at("/outcome"), Some("upstream_timeout"));
    assert_eq!(record.u64_at("/response/status"), Some(504));
    println!(
        "fault=upstream_stalls client_saw=504_json_after_{}ms records=1 outcome=upstream_timeout lost=0 {others}",
        waited.as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_sends_malformed_http() {
    // Garbage for /bad, a proper answer for everything else.
    let upstream = RawUpstream::start(|request| {
        if request.head.target().starts_with("/bad") {
            RawReply::bytes("HTTP/1.1 abc nonsense\r\n\x01\x02\r\n\r\n").close()
        } else {
            RawReply::bytes("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        }
    })
    .await;
    let store = TraceStore::new();
    let proxy = proxy_with_store(&upstream.url(), &store, &[]).await;
    let others = OtherClient::start(proxy.addr, "/ok", 200).await;
    let answer = faulty_request(proxy.addr, "GET", "/bad", "fault-malformed", empty()).await;
    assert_eq!(answer.status, 502);
    assert_eq!(
        answer.json()["error"],
        "upstream_error",
        "{}",
        answer.text()
    );
    let others = others.finish().await;
    let record = the_record(&store, "fault-malformed").await;
    assert_eq!(record.str_at("/outcome"), Some("upstream_error"));
    assert_eq!(record.u64_at("/response/status"), Some(502));
    println!(
        "fault=upstream_sends_malformed_http client_saw=502_json records=1 outcome=upstream_error error={} lost=0 {others}",
        record.at("/error/kind")
    );
}

/// An upstream response head must fit the upstream connection's 16 KiB buffer: past it a 502,
/// under it every field through unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_sends_an_oversized_head() {
    let upstream = RawUpstream::start(|request| {
        let size = if request.head.target().starts_with("/huge") {
            20 * 1024
        } else {
            12 * 1024
        };
        RawReply::bytes(format!(
            "HTTP/1.1 200 OK\r\nx-padding: {}\r\ncontent-length: 2\r\n\r\nok",
            "p".repeat(size)
        ))
    })
    .await;
    let store = TraceStore::new();
    let proxy = proxy_with_store(&upstream.url(), &store, &[]).await;
    let fits = faulty_request(proxy.addr, "GET", "/fits", "fault-head-fits", empty()).await;
    assert_eq!(fits.status, 200);
    assert_eq!(fits.headers["x-padding"].len(), 12 * 1024);
    assert_eq!(fits.body, b"ok".as_slice());
    let huge = faulty_request(proxy.addr, "GET", "/huge", "fault-head-huge", empty()).await;
    assert_eq!(huge.status, 502, "{}", huge.text());
    assert_eq!(huge.json()["error"], "upstream_error", "{}", huge.text());
    let record = the_record(&store, "fault-head-huge").await;
    assert_eq!(record.str_at("/outcome"), Some("upstream_error"));
    assert_eq!(record.u64_at("/response/status"), Some(502));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_resets_mid_upload() {
    let upstream = TestUpstream::start().await;
    let store = TraceStore::new();
    let proxy = Scoretap::builder()
        .args(upstream_args(&upstream))
        .args(store.args())
        .start()
        .await;
    let others = OtherClient::start(proxy.addr, "/ok", 200).await;
    let mut client = Client::connect(proxy.addr, Proto::H1).await;
    let (sender, body) = channel_body();
    let request = client
        .req("POST", "/sink?t=upload-reset")
        .header("content-length", "1000000")
        .header("x-request-id", "fault-upload-reset")
        .body(body)
        .unwrap();
    let pending = tokio::spawn(async move {
        let _ = client.send(request).await;
        drop(client);
    });
    sender.data(vec![7_u8; 64 * 1024]).await;
    let seen = upstream.wait_path("t=upload-reset").await;
    assert!(
        eventually(Duration::from_secs(5), || seen.state().body_bytes
            >= 64 * 1024)
        .await
    );
    pending.abort();
    drop(sender);
    assert!(
        eventually(Duration::from_secs(5), || seen.state().handler_dropped
            || seen.state().body_outcome
                == scoretap_tests::upstream::BodyOutcome::Error)
        .await,
        "the upstream request was not aborted: {:?}",
        seen.state()
    );
    let others = others.finish().await;
    let record = the_record(&store, "fault-upload-reset").await;
    assert_eq!(record.at("/request/body/complete"), false);
    assert_eq!(record.u64_at("/request/body/size"), Some(64 * 1024));
    println!(
        "fault=client_resets_mid_upload upstream_saw=aborted_after_{}_bytes records=1 outcome={} {} lost=0_of_what_arrived {others}",
        seen.state().body_bytes,
        record.at("/outcome"),
        body_summary(&record, "request")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_resets_mid_download() {
    let upstream = TestUpstream::start().await;
    let store = TraceStore::new();
    let proxy = Scoretap::builder()
        .args(upstream_args(&upstream))
        .args(store.args())
        .start()
        .await;
    let others = OtherClient::start(proxy.addr, "/ok", 200).await;
    let mut client = Client::connect(proxy.addr, Proto::H1).await;
    let request = client
        .req(
            "GET",
            "/bytes?size=20000000&chunk=65536&gap_ms=2&t=download-reset",
        )
        .header("x-request-id", "fault-download-reset")
        .body(empty())
        .unwrap();
    let answer = client.send(request).await.unwrap();
    let mut body = answer.into_body();
    let mut received = 0_usize;
    while received < 1_000_000 {
        let frame = within(STEP, "a body frame", body.frame())
            .await
            .unwrap()
            .unwrap();
        received += frame.data_ref().map_or(0, |data| data.len());
    }
    drop(body);
    drop(client);
    let seen = upstream.wait_path("t=download-reset").await;
    assert!(
        eventually(Duration::from_secs(5), || seen.state().response_dropped).await,
        "the upstream kept sending after the client left"
    );
    let others = others.finish().await;
    let record = the_record(&store, "fault-download-reset").await;
    assert_eq!(record.at("/response/body/complete"), false);
    let recorded = record.u64_at("/response/body/size").unwrap();
    assert!(
        (received as u64..20_000_000).contains(&recorded),
        "recorded {recorded}, the client read {received}"
    );
    println!(
        "fault=client_resets_mid_download client_read={received} upstream=stopped records=1 outcome={} {} {others}",
        record.at("/outcome"),
        body_summary(&record, "response")
    );
}
