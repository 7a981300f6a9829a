//! What each timeout measures, at the edges: an upload is never cut by the wait for response
//! headers, an exchange on which no byte moves for `--body-idle-timeout` is ended whichever side
//! stalled (and its record names that side), and an error answer is sent at once, without
//! asking for or waiting on a body the upstream never read.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use scoretap_tests::client::channel_body;
use scoretap_tests::harness::proxy_with_store;
use scoretap_tests::raw::request_bytes;
use scoretap_tests::traces::TraceStore;
use scoretap_tests::util::{eventually, free_port};
use scoretap_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `--upstream-timeout` is the wait for response headers: it starts once the request body has
/// been sent whole. A 40 KB body uploaded over 3.2 s passes with `--upstream-timeout 1s`
/// (before, the timer wrapped the upload and the client got a 504 at 1 s), over HTTP/1.1 and
/// HTTP/2; an upstream that then keeps its answer still gets a 504, one timeout after the upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_is_not_cut_by_the_response_header_timeout() {
    let upstream = TestUpstream::start().await;
    let store = TraceStore::new();
    let proxy = proxy_with_store(&upstream.url(), &store, &["--upstream-timeout", "1s"]).await;
    for proto in [Proto::H1, Proto::H2] {
        let mut client = Client::connect(proxy.addr, proto).await;
        let (sender, body) = channel_body();
        let request = client.req("POST", "/sink").body(body).unwrap();
        let uploader = tokio::spawn(async move {
            for _ in 0..8 {
                assert!(
                    sender.data(vec![b'x'; 5120]).await,
                    "the proxy took the chunk"
                );
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
        });
        let started = Instant::now();
        let answer = client.fetch(request, Duration::from_secs(10)).await;
        uploader.await.unwrap();
        assert_eq!(
            answer.status,
            200,
            "{proto:?}: a steady upload is not a slow upstream: {}",
            answer.text()
        );
        assert_eq!(answer.json()["size"], 40960, "{proto:?}");
        assert!(started.elapsed() >= Duration::from_millis(2800));

        // The header timeout still runs, from the end of the upload.
        let (sender, body) = channel_body();
        let request = client.req("POST", "/stall").body(body).unwrap();
        let uploader = tokio::spawn(async move {
            for _ in 0..3 {
                assert!(sender.data(vec![b'y'; 100]).await);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        let started = Instant::now();
        let answer = client.fetch(request, Duration::from_secs(10)).await;
        uploader.await.unwrap();
        assert_eq!(answer.status, 504, "{proto:?}: {}", answer.text());
        assert_eq!(answer.json()["error"], "upstream_timeout");
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(2400) && elapsed < Duration::from_secs(5),
            "{proto:?}: 504 after {elapsed:?}: expected the 1.5 s upload plus the 1 s timeout"
        );
    }
}

/// A raw upstream that promises 100 bytes on `/stall-body`, sends 10 and then nothing; any
/// other path is answered at once.
async fn upstream_stalling_mid_body() -> RawUpstream {
    RawUpstream::start(|request| {
        if request.head.start_line.contains("/stall-body") {
            RawReply::bytes(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"pred\": [",
            )
            .hang()
        } else {
            RawReply::bytes("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        }
    })
    .await
}

/// An upstream that stalls mid-body: after `--body-idle-timeout` without a byte, the client's
/// HTTP/1.1 connection is closed (the body never looks complete), an HTTP/2 stream is reset
/// while its connection goes on serving, and the record says the upstream stalled. Before, the
/// exchange hung for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_stalls_mid_body_is_cut_after_the_body_idle_timeout() {
    let upstream = upstream_stalling_mid_body().await;
    let store = TraceStore::new();
    let proxy = proxy_with_store(&upstream.url(), &store, &["--body-idle-timeout", "1s"]).await;

    let mut raw = RawConn::connect(proxy.addr).await;
    raw.send(b"GET /stall-body HTTP/1.1\r\nhost: h\r\nx-request-id: stall-h1\r\n\r\n")
        .await;
    let started = Instant::now();
    let answer = within(
        Duration::from_secs(5),
        "the stalled response ends",
        raw.read_response(false),
    )
    .await;
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.body, b"{\"pred\": [");
    assert!(!answer.complete, "a cut body must not look complete");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900),
        "cut after {elapsed:?}"
    );

    let mut client = Client::connect(proxy.addr, Proto::H2).await;
    let request = client
        .req("GET", "/stall-body")
        .header("x-request-id", "stall-h2")
        .body(scoretap_tests::client::empty())
        .unwrap();
    let response = client
        .send_within(request, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = within(
        Duration::from_secs(5),
        "the stalled stream ends",
        response.into_body().collect(),
    )
    .await;
    assert!(body.is_err(), "the stream is reset, not ended cleanly");
    let other = client.get("/other").await;
    assert_eq!(other.status, 200, "the connection still serves");
    assert_eq!(other.body, b"ok".as_slice());

    for id in ["stall-h1", "stall-h2"] {
        let record = store.wait(id).await;
        assert_eq!(record.str_at("/outcome"), Some("upstream_timeout"), "{id}");
        assert_eq!(
            record.str_at("/error/kind"),
            Some("upstream_idle_timeout"),
            "{id}"
        );
        assert!(
            record
                .str_at("/error/message")
                .is_some_and(|message| message.contains("upstream")),
            "{id}: {:?}",
            record.at("/error")
        );
        assert_eq!(record.u64_at("/response/status"), Some(200), "{id}");
        assert_eq!(record.u64_at("/response/body/size"), Some(10), "{id}");
        assert_eq!(record.at("/response/body/complete"), false, "{id}");
    }
}

/// A client that stops reading a large response: scoretap's writes stay pending, and after
/// `--body-idle-timeout` its connection is closed, the upstream's response is cancelled, and
/// the record says the client stalled. Before, the connection and the upstream's were held for
/// ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_disconnected_after_the_body_idle_timeout() {
    let upstream = TestUpstream::start().await;
    let store = TraceStore::new();
    let proxy = proxy_with_store(&upstream.url(), &store, &["--body-idle-timeout", "1s"]).await;
    let size: u64 = 1 << 30;
    let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    tcp.write_all(
        format!("GET /bytes?size={size} HTTP/1.1\r\nhost: h\r\nx-request-id: slow-reader\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut first = vec![0u8; 1024];
    let read = tcp.read(&mut first).await.unwrap();
    assert!(first[..read].starts_with(b"HTTP/1.1 200"));
    // Read nothing for a while: the socket buffers fill and scoretap's writes block.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut received = read as u64;
    let mut buffer = vec![0u8; 1 << 20];
    let ended = within(Duration::from_secs(10), "the connection ends", async {
        loop {
            match tcp.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received += n as u64,
            }
        }
    })
    .await;
    let () = ended;
    assert!(
        received < size / 4,
        "the client got {received} bytes: the connection was not cut"
    );
    let recorded = upstream.requests();
    assert!(
        eventually(Duration::from_secs(5), || recorded[0].cancelled()).await,
        "the upstream's response is cancelled"
    );
    let record = store.wait("slow-reader").await;
    assert_eq!(record.str_at("/outcome"), Some("client_cancelled"));
    assert_eq!(record.str_at("/error/kind"), Some("client_idle_timeout"));
    assert_eq!(record.u64_at("/response/status"), Some(200));
    assert_eq!(record.at("/response/body/complete"), false);
}

/// A client that stops sending its request body gets 408 after `--body-idle-timeout` (RFC 9110
/// §15.5.9), with `connection: close`, and the record says the client stalled. Before, it waited
/// for `--upstream-timeout` and the record blamed the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_sending_its_body_gets_408() {
    let upstream = TestUpstream::start().await;
    let store = TraceStore::new();
    let proxy = proxy_with_store(
        &upstream.url(),
        &store,
        &["--body-idle-timeout", "1s", "--upstream-timeout", "30s"],
    )
    .await;
    let mut raw = RawConn::connect(proxy.addr).await;
    raw.send(&request_bytes(
        "POST /sink HTTP/1.1",
        &[
            ("host", "h"),
            ("content-length", "1000"),
            ("x-request-id", "slow-sender"),
        ],
        &[b'z'; 100],
    ))
    .await;
    let started = Instant::now();
    let answer = within(Duration::from_secs(5), "the 408", raw.read_response(false)).await;
    assert_eq!(answer.status(), 408, "{}", answer.body_str());
    assert_eq!(answer.json()["error"], "client_idle_timeout");
    assert_eq!(answer.header("connection"), Some("close"));
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(raw.closed_within(Duration::from_secs(2)).await);
    let record = store.wait("slow-sender").await;
    assert_eq!(record.str_at("/outcome"), Some("client_cancelled"));
    assert_eq!(record.str_at("/error/kind"), Some("client_idle_timeout"));
    assert_eq!(record.u64_at("/response/status"), Some(408));
    assert_eq!(record.u64_at("/request/body/size"), Some(100));
    assert_eq!(record.at("/request/body/complete"), false);
}

/// An upstream that accepts the connection and never reads the request body: once the socket
/// buffers are full nothing moves, and after `--body-idle-timeout` the client gets a 504 naming
/// the upstream. Before, the upload hung until `--upstream-timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_stops_reading_the_body_makes_a_504() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let store = TraceStore::new();
    let proxy = proxy_with_store(
        &format!("http://{upstream}"),
        &store,
        &["--body-idle-timeout", "1s", "--upstream-timeout", "30s"],
    )
    .await;
    let mut client = Client::connect(proxy.addr, Proto::H1).await;
    let (sender, body) = channel_body();
    let request = client
        .req("POST", "/score")
        .header("x-request-id", "deaf-upstream")
        .body(body)
        .unwrap();
    let uploader = tokio::spawn(async move {
        // Until the proxy stops taking chunks (or 256 MiB, far past any socket buffer).
        for _ in 0..4096 {
            let sent =
                tokio::time::timeout(Duration::from_secs(8), sender.data(vec![b'u'; 65536])).await;
            if !matches!(sent, Ok(true)) {
                break;
            }
        }
    });
    let answer = client.fetch(request, Duration::from_secs(10)).await;
    assert_eq!(answer.status, 504, "{}", answer.text());
    assert_eq!(answer.json()["error"], "upstream_idle_timeout");
    uploader.abort();
    let record = store.wait("deaf-upstream").await;
    assert_eq!(record.str_at("/outcome"), Some("upstream_timeout"));
    assert_eq!(record.str_at("/error/kind"), Some("upstream_idle_timeout"));
    holder.abort();
}

/// With capture on, an error answer (here: the upstream refuses connections) is sent at once:
/// the body the upstream never read is read for the record afterwards. Before, the answer waited
/// up to a second for a body that was not coming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_answer_does_not_wait_for_the_request_body() {
    let dead = format!("http://127.0.0.1:{}", free_port());
    let store = TraceStore::new();
    let proxy = proxy_with_store(&dead, &store, &[]).await;
    let mut raw = RawConn::connect(proxy.addr).await;
    let started = Instant::now();
    raw.send(&request_bytes(
        "POST /score HTTP/1.1",
        &[
            ("host", "h"),
            ("content-length", "100"),
            ("x-request-id", "answer-first"),
        ],
        b"{\"data\": [",
    ))
    .await;
    let answer = within(Duration::from_secs(5), "the 502", raw.read_response(false)).await;
    let elapsed = started.elapsed();
    assert_eq!(answer.status(), 502);
    assert!(
        elapsed < Duration::from_millis(500),
        "the 502 took {elapsed:?}: it waited for the body"
    );
    let record = store.wait("answer-first").await;
    assert_eq!(record.u64_at("/response/status"), Some(502));
    assert_eq!(record.u64_at("/request/body/size"), Some(10));
    assert_eq!(record.at("/request/body/complete"), false);
}

/// With capture on, a failed exchange whose client sent `Expect: 100-continue` gets its error
/// answer without a `100 Continue` first: nobody needs the upload. Before, scoretap read the
/// body for the record, which made hyper invite the client to send it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_not_answered_for_a_failed_exchange() {
    let dead = format!("http://127.0.0.1:{}", free_port());
    let store = TraceStore::new();
    let proxy = proxy_with_store(&dead, &store, &[]).await;
    let mut raw = RawConn::connect(proxy.addr).await;
    raw.send(&request_bytes(
        "POST /score HTTP/1.1",
        &[
            ("host", "h"),
            ("content-length", "1000"),
            ("expect", "100-continue"),
            ("x-request-id", "no-continue"),
        ],
        b"",
    ))
    .await;
    let answer = within(Duration::from_secs(5), "the 502", raw.read_response(false)).await;
    assert!(
        answer.interim.is_empty(),
        "no interim answer expected, got {:?}",
        answer.interim
    );
    assert_eq!(answer.status(), 502);
    let record = store.wait("no-continue").await;
    assert_eq!(record.u64_at("/response/status"), Some(502));
    assert_eq!(record.u64_at("/request/body/size"), Some(0));
    assert_eq!(record.at("/request/body/complete"), false);
}
