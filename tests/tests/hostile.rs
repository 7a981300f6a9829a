//! Hostile clients: request smuggling (RFC 9112 §6.1, §6.3, §2.2), the limits (head size and
//! count, header read timeout, idle timeout, connections, HTTP/2 streams, request body) and
//! floods (slowloris, HTTP/2 rapid reset), over raw sockets and raw HTTP/2 frames against the
//! real binary. Each test fails when its defence is removed.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::StatusCode;
use http_body_util::BodyExt;
use scoretap_tests::client::{channel_body, empty, full, tcp_from};
use scoretap_tests::harness::proxy_for;
use scoretap_tests::hostile::{h2_client, h2_get, slow_head};
use scoretap_tests::metrics::scrape;
use scoretap_tests::raw::{chunk, request_bytes, Framing};
use scoretap_tests::traces::proc_status_kib;
use scoretap_tests::upstream::BodyOutcome;
use scoretap_tests::util::eventually;
use scoretap_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a connection may take to close once it should.
const CLOSE_LIMIT: Duration = Duration::from_secs(3);

/// Who answers a refused request: scoretap's check phase (JSON body, `connection: close`) or
/// hyper's parser (its own bodiless 400, then the connection closes), or either of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AnsweredBy {
    Scoretap,
    Hyper,
    Either,
}

/// Sends `request` on a fresh connection and checks the contract for a refused request: the
/// status, the answer's form, and that the connection is closed after it.
async fn assert_refused(proxy: &Scoretap, what: &str, request: &[u8], status: u16, by: AnsweredBy) {
    let mut conn = RawConn::connect(proxy.addr).await;
    conn.send(request).await;
    let response = within(STEP, what, conn.try_read_response(false))
        .await
        .unwrap_or_else(|| panic!("{what}: the connection closed without an answer"));
    assert_eq!(
        response.status(),
        status,
        "{what}: {:?}",
        response.body_str()
    );
    match by {
        AnsweredBy::Scoretap => {
            let json = response.json();
            assert_eq!(json["error"], "bad_request", "{what}: {json}");
            assert_eq!(
                response.header("connection").map(str::to_ascii_lowercase),
                Some("close".into()),
                "{what}: scoretap's refusal must close the connection"
            );
        }
        AnsweredBy::Hyper => assert!(
            response.body.is_empty(),
            "{what}: expected hyper's own bodiless answer, got {:?}",
            response.body_str()
        ),
        AnsweredBy::Either => {}
    }
    assert!(
        conn.closed_within(CLOSE_LIMIT).await,
        "{what}: the connection stayed open after the refusal"
    );
}

/// The upstream received nothing at all (no request, not even a connection) within a moment.
async fn assert_nothing_reached(up: &TestUpstream, what: &str) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen: Vec<String> = up.requests().iter().map(|r| r.uri.to_string()).collect();
    assert!(seen.is_empty(), "{what}: the upstream received {seen:?}");
    assert_eq!(
        up.accepted_connections(),
        0,
        "{what}: the upstream was connected to"
    );
}

fn head(lines: &str) -> Vec<u8> {
    lines.replace('|', "\r\n").into_bytes()
}

// ---------------------------------------------------------------- request smuggling

/// `Content-Length` with `Transfer-Encoding`, both orders, with a second request hidden behind
/// the chunked terminator (CL.TE) or inside the chunk (TE.CL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_content_length_with_transfer_encoding_is_refused() {
    let up = TestUpstream::start().await;
    let proxy = proxy_for(&up, &[]).await;
    let smuggled = "GET /smuggled HTTP/1.1|Host: h||";
    let cl_te_body = format!("0||{smuggled}");
    let cl_te = head(&format!(
        "POST /cl-te HTTP/1.1|Host: h|Content-Length: {}|Transfer-Encoding: chunked||{cl_te_body}",
        cl_te_body.len()
    ));
    let inner = "GET /smuggled HTTP/1.1|Host: h|Content-Length: 5||x=1|";
    let te_cl = head(&format!(
        "POST /te-cl HTTP/1.1|Host: h|Transfer-Encoding: chunked|Content-Length: 4||{:x}|{inner}|0||",
        inner.len()
    ));
    let lowercase_late_te = head(
        "POST /late HTTP/1.1|host: h|content-length: 5|x: y|transfer-encoding: chunked||0||GET /smuggled HTTP/1.1|Host: h||",
    );
    for (what, request) in [
        ("CL.TE", cl_te),
        ("TE.CL", te_cl),
        ("CL then TE, lower case", lowercase_late_te),
    ] {
        assert_refused(&proxy, what, &request, 400, AnsweredBy::Scoretap).await;
    }
    assert_nothing_reached(&up, "CL+TE").await;
}

/// Two `Content-Length` lines: identical ones are refused by scoretap (hyper would merge them),
/// differing ones by hyper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_duplicate_content_length_is_refused() {
    let up = TestUpstream::start().await;
    let proxy = proxy_for(&up, &[]).await;
    assert_refused(
        &proxy,
        "identical Content-Length lines",
        &head("POST /dup HTTP/1.1|Host: h|Content-Length: 5|Content-Length: 5||helloGET /smuggled HTTP/1.1|Host: h||"),
        400,
        AnsweredBy::Scoretap,
    )
    .await;
    assert_refused(
        &proxy,
        "differing Content-Length lines",
        &head("POST /dup HTTP/1.1|Host: h|Content-Length: 5|Content-Length: 50||hello"),
        400,
        AnsweredBy::Hyper,
    )
    .await;
    assert_refused(
        &proxy,
        "a Content-Length list",
        &head("POST /dup HTTP/1.1|Host: h|Content-Length: 5, 5||hello"),
        400,
        AnsweredBy::Hyper,
    )
    .await;
    assert_nothing_reached(&up, "duplicate Content-Length").await;
}

/// Invalid `Content-Length` values and transfer codings that do not end in chunked: hyper's
/// parser refuses them before scoretap sees a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_invalid_content_length_and_transfer_encoding_are_refused() {
    let up = TestUpstream::start().await;
    let proxy = proxy_for(&up, &[]).await;
    for value in ["+5", "-1", "5a", "0x5", " ", "99999999999999999999999"] {
        let request = head(&format!(
            "POST /cl HTTP/1.1|Host: h|Content-Length: {value}||hello"
        ));
        assert_refused(
            &proxy,
            &format!("Content-Length: {value:?}"),
            &request,
            400,
            AnsweredBy::Hyper,
        )
        .await;
    }
    for te in [
        "Transfer-Encoding: chunked, identity",
        "Transfer-Encoding: xchunked",
        "Transfer-Encoding: chunked|Transfer-Encoding: gzip",
        "Transfer-Encoding : chunked",
    ] {
        let request = head(&format!("POST /te HTTP/1.1|Host: h|{te}||0||"));
        assert_refused(&proxy, te, &request, 400, AnsweredBy::Hyper).await;
    }
    let http10 = head("POST /te HTTP/1.0|Host: h|Transfer-Encoding: chunked||0||");
    assert_refused(
        &proxy,
        "HTTP/1.0 with chunked",
        &http10,
        400,
        AnsweredBy::Hyper,
    )
    .await;
    assert_nothing_reached(&up, "invalid framing").await;
}

/// obs-fold (RFC 9112 §5.2: "A server that receives an obs-fold in a request message [...]
/// MUST either reject the message by sending a 400 (Bad Request) [...]").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_obs_fold_is_refused() {
    let up = TestUpstream::start().await;
    let proxy = proxy_for(&up, &[]).await;
    for (what, request) in [
        (
            "a folded field",
            head("GET /fold HTTP/1.1|Host: h|X-Long: a| b||"),
        ),
        (
            "a folded Transfer-Encoding",
            head("POST /fold HTTP/1.1|Host: h|Transfer-Encoding:|\tchunked|Content-Length: 3||0||"),
        ),
    ] {
        assert_refused(&proxy, what, &request, 400, AnsweredBy::Hyper).await;
    }
    assert_nothing_reached(&up, "obs-fold").await;
}

/// A bare LF ending a line (accepted by hyper's parser) is refused by scoretap; a bare CR by
/// hyper (RFC 9112 §2.2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_bare_line_feeds_are_refused() {
    let up = TestUpstream::start().await;
    let proxy = proxy_for(&up, &[]).await;
    for (what, request) in [
        (
            "after the request line",
            &b"GET /lf HTTP/1.1\nHost: h\r\n\r\n"[..],
        ),
        (
            "after a field",
            b"GET /lf HTTP/1.1\r\nHost: h\nX: y\r\n\r\n",
        ),
        ("as the empty line", b"GET /lf HTTP/1.1\r\nHost: h\r\n\n"),
        (
            "everywhere",
            b"POST /lf HTTP/1.1\nHost: h\nContent-Length: 5\n\nhello",
        ),
    ] {
        assert_refused(
            &proxy,
            &format!("bare LF {what}"),
            request,
            400,
            AnsweredBy::Scoretap,
        )
        .await;
    }
    assert_refused(
        &proxy,
        "bare CR in a field",
        b"GET /cr HTTP/1.1\r\nHost: h\r\nX: a\rb\r\n\r\n",
        400,
        AnsweredBy::Hyper,
    )
    .await;
    assert_nothing_reached(&up, "bare LF").await;
}

/// The guard follows kept-alive connections through bodies of every framing: a smuggling head
/// after a Content-Length body, a chunked body with trailers and a pipelined request is still
/// found, and what came before was served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_is_found_on_a_kept_alive_connection_after_other_bodies() {
    let up = TestUpstream::start().await;
    let proxy = proxy_for(&up, &[]).await;
    let mut conn = RawConn::connect(proxy.addr).await;
    // A body that looks like requests must not be taken for them.
    let decoy = b"GET /decoy HTTP/1.1\nContent-Length: 1\nTransfer-Encoding: chunked\n\n";
    conn.send(&request_bytes(
        "POST /sink?t=first HTTP/1.1",
        &[("host", "h"), ("content-length", &decoy.len().to_string())],
        decoy,
    ))
    .await;
    assert_eq!(conn.read_response(false).await.status(), 200);
    let mut chunked = request_bytes(
        "POST /sink?t=second HTTP/1.1",
        &[
            ("host", "h"),
            ("transfer-encoding", "chunked"),
            ("trailer", "x-t"),
        ],
        b"",
    );
    chunked.extend(chunk(b"GET /decoy HTTP/1.1\r\nHost: h\r\n\r\n"));
    chunked.extend_from_slice(b"0\r\nx-t: 1\r\n\r\n");
    // Pipelined behind it: a plain GET, then the smuggling attempt.
    chunked.extend(request_bytes(
        "GET /ok?t=third HTTP/1.1",
        &[("host", "h")],
        b"",
    ));
    chunked.extend(head(
        "POST /cl-te HTTP/1.1|Host: h|Content-Length: 35|Transfer-Encoding: chunked||0||GET /smuggled HTTP/1.1|Host: h||",
    ));
    conn.send(&chunked).await;
    assert_eq!(conn.read_response(false).await.status(), 200);
    assert_eq!(conn.read_response(false).await.status(), 200);
    let refused = conn.read_response(false).await;
    assert_eq!(refused.status(), 400, "{}", refused.body_str());
    assert_eq!(refused.json()["error"], "bad_request");
    assert!(conn.closed_within(CLOSE_LIMIT).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let paths: Vec<String> = up.requests().iter().map(|r| r.path_and_query()).collect();
    assert_eq!(
        paths,
        ["/sink?t=first", "/sink?t=second", "/ok?t=third"],
        "exactly the three honest requests reach the upstream"
    );
}

// ---------------------------------------------------------------- head limits

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_header_bytes() {
    let up = TestUpstream::start().await;
    // Below hyper's HTTP/2 default (16 KB) and its HTTP/1 buffer (~400 KB), so both are ours.
    let proxy = proxy_for(&up, &["--max-header-bytes", "12KiB"]).await;
    let over = "a".repeat(13 * 1024);
    let far_over = "a".repeat(40 * 1024);
    let under = "a".repeat(11 * 1024);
    // HTTP/1.1, just over: hyper's buffer can hold such a head (it reads into the buffer's
    // spare capacity), so it is measured on the wire and refused by scoretap, or by hyper when
    // its buffer filled first; far over: hyper refuses it. Either way 431 and a close.
    let request = request_bytes(
        "GET /ok?t=over HTTP/1.1",
        &[("host", "h"), ("x-big", &over)],
        b"",
    );
    assert_refused(
        &proxy,
        "HTTP/1.1 head just over the limit",
        &request,
        431,
        AnsweredBy::Either,
    )
    .await;
    let request = request_bytes(
        "GET /ok?t=far HTTP/1.1",
        &[("host", "h"), ("x-big", &far_over)],
        b"",
    );
    assert_refused(
        &proxy,
        "HTTP/1.1 head far over the limit",
        &request,
        431,
        AnsweredBy::Hyper,
    )
    .await;
    // The same head sent in small pieces, each read on its own.
    let mut conn = RawConn::connect(proxy.addr).await;
    for piece in request_bytes(
        "GET /ok?t=pieces HTTP/1.1",
        &[("host", "h"), ("x-big", &over)],
        b"",
    )
    .chunks(1024)
    {
        if conn.try_send(piece).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let r = within(STEP, "431", conn.try_read_response(false)).await;
    assert_eq!(
        r.map(|r| r.status()),
        Some(431),
        "a head over the limit sent in pieces"
    );
    // HTTP/2: h2 answers 431 on the stream.
    let mut c = Client::connect(proxy.addr, Proto::H2).await;
    let r = c
        .fetch(
            c.req("GET", "/ok?t=over2")
                .header("x-big", &over)
                .body(empty())
                .unwrap(),
            STEP,
        )
        .await;
    assert_eq!(r.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_nothing_reached(&up, "heads over the limit").await;
    // Below the limit both pass.
    let request = request_bytes(
        "GET /ok?t=under HTTP/1.1",
        &[("host", "h"), ("x-big", &under)],
        b"",
    );
    assert_eq!(exchange_raw(proxy.addr, &request).await.status(), 200);
    let mut c = Client::connect(proxy.addr, Proto::H2).await;
    let r = c
        .fetch(
            c.req("GET", "/ok?t=under2")
                .header("x-big", &under)
                .body(empty())
                .unwrap(),
            STEP,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
}

async fn exchange_raw(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut conn = RawConn::connect(addr).await;
    conn.send(request).await;
    within(STEP, "response", conn.read_response(false)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_header_count() {
    let up = TestUpstream::start().await;
    let proxy = proxy_for(&up, &["--max-headers", "20"]).await;
    let fields = |n: usize| -> Vec<(String, String)> {
        (0..n)
            .map(|i| (format!("x-field-{i}"), "v".to_string()))
            .collect()
    };
    let raw = |n: usize| {
        let mut all = vec![("host".to_string(), "h".to_string())];
        all.extend(fields(n));
        let refs: Vec<(&str, &str)> = all.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        request_bytes(&format!("GET /ok?t=h1-{n} HTTP/1.1"), &refs, b"")
    };
    assert_refused(
        &proxy,
        "HTTP/1.1 with 25 fields",
        &raw(25),
        431,
        AnsweredBy::Hyper,
    )
    .await;
    let mut c = Client::connect(proxy.addr, Proto::H2).await;
    let mut request = c.req("GET", "/ok?t=h2-25");
    for (name, value) in fields(25) {
        request = request.header(name, value);
    }
    let r = c.fetch(request.body(empty()).unwrap(), STEP).await;
    assert_eq!(
        r.status,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "{}",
        r.text()
    );
    assert_eq!(r.json()["error"], "bad_request");
    assert_nothing_reached(&up, "too many fields").await;
    assert_eq!(exchange_raw(proxy.addr, &raw(15)).await.status(), 200);
    let mut request = c.req("GET", "/ok?t=h2-15");
    for (name, value) in fields(15) {
        request = request.header(name, value);
    }
    assert_eq!(
        c.fetch(request.body(empty()).unwrap(), STEP).await.status,
        StatusCode::OK
    );
}

// ---------------------------------------------------------------- timeouts

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_header_read_timeout_closes_slow_heads() {
    let up = TestUpstream::start().await;
    let proxy = proxy_for(
        &up,
        &["--header-read-timeout", "1s", "--idle-timeout", "30s"],
    )
    .await;
    // A connection that never sends anything.
    let mut silent = RawConn::connect(proxy.addr).await;
    let t = Instant::now();
    assert!(
        silent.closed_within(CLOSE_LIMIT).await,
        "a silent connection was kept"
    );
    let silent_for = t.elapsed();
    // A head sent one byte at a time, forever (slowloris): closed although bytes keep coming.
    let slow = slow_head(
        proxy.addr,
        Duration::from_millis(50),
        Duration::from_secs(5),
    )
    .await;
    println!("silent connection closed after {silent_for:?}, slow head after {slow:?}");
    assert!(
        silent_for >= Duration::from_millis(800),
        "closed after {silent_for:?}"
    );
    let slow = slow.expect("a slow head kept its connection past 5s (or could not connect)");
    assert!(
        (Duration::from_millis(800)..Duration::from_millis(2500)).contains(&slow),
        "slow head closed after {slow:?}, expected about 1s"
    );
    assert_nothing_reached(&up, "slow heads").await;
    // A head that is slow but whole within the timeout is served, and a request body may take
    // longer than the header read timeout.
    let mut conn = RawConn::connect(proxy.addr).await;
    for part in [
        &b"GET /ok?t=steady HTTP/1.1\r\n"[..],
        b"Host: h\r\n",
        b"\r\n",
    ] {
        conn.send(part).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(conn.read_response(false).await.status(), 200);
    conn.send(b"POST /sink?t=slow-body HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n")
        .await;
    for part in [b"a", b"b", b"c"] {
        tokio::time::sleep(Duration::from_millis(700)).await;
        conn.send(part).await;
    }
    let r = conn.read_response(false).await;
    assert_eq!(r.status(), 200, "a 2s body on a 1s header timeout");
    assert_eq!(r.json()["size"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_idle_timeout_closes_idle_connections() {
    let up = TestUpstream::start().await;
    let proxy = proxy_for(
        &up,
        &["--idle-timeout", "1s", "--header-read-timeout", "5s"],
    )
    .await;
    // HTTP/1.1 keep-alive: open after the response, closed about 1s later.
    let mut conn = RawConn::connect(proxy.addr).await;
    conn.send(&request_bytes("GET /ok HTTP/1.1", &[("host", "h")], b""))
        .await;
    assert_eq!(conn.read_response(false).await.status(), 200);
    let t = Instant::now();
    assert!(
        !conn.closed_within(Duration::from_millis(600)).await,
        "closed before the idle timeout"
    );
    assert!(
        conn.closed_within(CLOSE_LIMIT).await,
        "an idle HTTP/1.1 connection was kept"
    );
    let h1_idle = t.elapsed();
    // HTTP/2: GOAWAY and close about 1s after the last stream.
    let mut c = Client::connect(proxy.addr, Proto::H2).await;
    assert_eq!(c.get("/ok").await.status, StatusCode::OK);
    let t = Instant::now();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        !c.is_closed(),
        "HTTP/2 connection closed before the idle timeout"
    );
    assert!(
        eventually(CLOSE_LIMIT, || c.is_closed()).await,
        "an idle HTTP/2 connection was kept"
    );
    let h2_idle = t.elapsed();
    println!("idle HTTP/1.1 connection closed after {h1_idle:?}, HTTP/2 after {h2_idle:?}");
    // A request in flight longer than the idle timeout is not idle.
    for proto in [Proto::H1, Proto::H2] {
        let mut c = Client::connect(proxy.addr, proto).await;
        let r = c
            .fetch(c.req("GET", "/delay?ms=2500").body(empty()).unwrap(), STEP)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{proto:?}");
        assert_eq!(r.text(), "delayed 2500");
    }
}

// ---------------------------------------------------------------- connections and streams

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_max_connections_closes_connections_past_it() {
    let up = TestUpstream::start().await;
    let proxy = proxy_for(&up, &["--max-connections", "3"]).await;
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut conn = RawConn::connect(proxy.addr).await;
        conn.send(&request_bytes(
            "GET /ok?t=held HTTP/1.1",
            &[("host", "h")],
            b"",
        ))
        .await;
        assert_eq!(conn.read_response(false).await.status(), 200);
        open.push(conn);
    }
    // The fourth is accepted and closed at once, without an answer.
    let mut extra = RawConn::connect(proxy.addr).await;
    let _ = extra
        .try_send(&request_bytes(
            "GET /ok?t=extra HTTP/1.1",
            &[("host", "h")],
            b"",
        ))
        .await;
    let answer = within(STEP, "refused connection", extra.try_read_response(false)).await;
    assert!(
        answer.is_none(),
        "a connection past the limit was served: {answer:?}"
    );
    assert!(up
        .find(|r| r.path_and_query().contains("t=extra"))
        .is_none());
    // The held ones still work; once one closes, a new connection is served.
    let held = &mut open[0];
    held.send(&request_bytes(
        "GET /ok?t=again HTTP/1.1",
        &[("host", "h")],
        b"",
    ))
    .await;
    assert_eq!(held.read_response(false).await.status(), 200);
    drop(open.pop());
    let mut served = false;
    for _ in 0..50 {
        let mut conn = RawConn::connect(proxy.addr).await;
        if conn
            .try_send(&request_bytes(
                "GET /ok?t=after HTTP/1.1",
                &[("host", "h")],
                b"",
            ))
            .await
            .is_ok()
            && conn
                .try_read_response(false)
                .await
                .is_some_and(|r| r.status() == 200)
        {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        served,
        "no connection was served after one of the three closed"
    );
    assert!(
        proxy.stderr().contains("connection limit reached"),
        "the refusal is logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_max_concurrent_streams() {
    let up = TestUpstream::start().await;
    let proxy = proxy_for(&up, &["--max-concurrent-streams", "2"]).await;
    let (client, _connection) = h2_client(proxy.addr).await;
    let mut waiting = Vec::new();
    for i in 0..4 {
        let client = client.clone();
        waiting.push(tokio::spawn(async move {
            let mut client = client.ready().await?;
            let (response, _) =
                client.send_request(h2_get(&format!("/stall?t=stream-{i}")), true)?;
            response.await.map(drop)
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stalled = up
        .requests()
        .iter()
        .filter(|r| r.path() == "/stall")
        .count();
    for task in waiting {
        task.abort();
    }
    assert_eq!(
        stalled, 2,
        "streams open at once with --max-concurrent-streams 2"
    );
}

// ---------------------------------------------------------------- request body

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_request_body_declared_over_the_limit_is_413_before_the_upstream() {
    let up = TestUpstream::start().await;
    let proxy = proxy_for(&up, &["--max-request-body-bytes", "1000"]).await;
    let errors = |text: &scoretap_tests::metrics::Exposition| {
        text.value("scoretap_proxy_errors_total", &[("kind", "bad_request")])
    };
    let before = errors(&scrape(proxy.admin).await);
    // HTTP/1.1: answered from the head alone; the body is never read.
    let mut conn = RawConn::connect(proxy.addr).await;
    conn.send(
        b"POST /sink?t=declared HTTP/1.1\r\nHost: h\r\nContent-Length: 5000\r\n\r\nfirst bytes",
    )
    .await;
    let r = within(STEP, "413", conn.read_response(false)).await;
    assert_eq!(r.status(), 413, "{}", r.body_str());
    assert_eq!(r.json()["error"], "bad_request");
    assert_eq!(r.header("connection"), Some("close"));
    assert!(conn.closed_within(CLOSE_LIMIT).await);
    // With Expect: 100-continue the client never sends the body at all.
    let mut conn = RawConn::connect(proxy.addr).await;
    conn.send(b"POST /sink?t=expect HTTP/1.1\r\nHost: h\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n").await;
    let r = within(STEP, "413", conn.read_response(false)).await;
    assert_eq!(r.status(), 413);
    assert!(
        r.interim.is_empty(),
        "100 Continue was sent for a body over the limit"
    );
    // HTTP/2 with a content-length.
    let mut c = Client::connect(proxy.addr, Proto::H2).await;
    let (tx, body) = channel_body();
    let request = c
        .req("POST", "/sink?t=declared-h2")
        .header("content-length", "5000")
        .body(body)
        .unwrap();
    let response = c.send(request).await.unwrap();
    drop(tx);
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_nothing_reached(&up, "declared bodies over the limit").await;
    // Counted as proxy errors.
    let after = errors(&scrape(proxy.admin).await);
    assert!(after >= before + 3.0, "proxy errors {before} → {after}");
    // At the limit the body goes through.
    let r = c
        .fetch(
            c.req("POST", "/sink?t=at-limit")
                .body(full(vec![b'x'; 1000]))
                .unwrap(),
            STEP,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["size"], 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_request_body_streamed_over_the_limit_aborts_the_upstream_and_is_413() {
    let up = TestUpstream::start().await;
    let proxy = proxy_for(&up, &["--max-request-body-bytes", "1000"]).await;
    // HTTP/1.1 chunked: the second chunk crosses the limit.
    let mut conn = RawConn::connect(proxy.addr).await;
    conn.send(&request_bytes(
        "POST /sink?t=chunked HTTP/1.1",
        &[("host", "h"), ("transfer-encoding", "chunked")],
        b"",
    ))
    .await;
    conn.send(&chunk(&[b'a'; 600])).await;
    let upstream = up.wait_path("t=chunked").await;
    conn.send(&chunk(&[b'b'; 600])).await;
    let r = within(STEP, "413", conn.read_response(false)).await;
    assert_eq!(r.status(), 413, "{}", r.body_str());
    assert_eq!(r.json()["error"], "bad_request");
    assert!(conn.closed_within(CLOSE_LIMIT).await);
    assert!(
        eventually(CLOSE_LIMIT, || upstream.state().body_outcome
            == BodyOutcome::Error)
        .await,
        "the upstream request was not aborted: {:?}",
        upstream.state()
    );
    assert!(
        upstream.state().body_bytes <= 1000,
        "{:?}",
        upstream.state()
    );
    // HTTP/2 streamed.
    let mut c = Client::connect(proxy.addr, Proto::H2).await;
    let (tx, body) = channel_body();
    let pending = c.send(c.req("POST", "/sink?t=streamed").body(body).unwrap());
    let feeding = async {
        tx.data(vec![b'a'; 600]).await;
        let upstream = up.wait_path("t=streamed").await;
        tx.data(vec![b'b'; 600]).await;
        upstream
    };
    let (response, upstream) = tokio::join!(pending, feeding);
    let response = response.unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        eventually(CLOSE_LIMIT, || upstream.state().body_outcome
            == BodyOutcome::Error)
        .await,
        "the upstream request was not aborted: {:?}",
        upstream.state()
    );
    assert!(
        upstream.state().body_bytes <= 1000,
        "{:?}",
        upstream.state()
    );
}

/// When the upstream has already answered, a body crossing the limit resets the exchange: the
/// response is cut (HTTP/1.1: the connection closes mid-body; HTTP/2: RST_STREAM).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_request_body_over_the_limit_after_the_response_started_resets() {
    let up = TestUpstream::start().await;
    let proxy = proxy_for(&up, &["--max-request-body-bytes", "1000"]).await;
    let mut conn = RawConn::connect(proxy.addr).await;
    conn.send(&request_bytes(
        "POST /echo?t=started HTTP/1.1",
        &[("host", "h"), ("transfer-encoding", "chunked")],
        b"",
    ))
    .await;
    conn.send(&chunk(&[b'a'; 600])).await;
    let head = within(STEP, "response head", conn.read_head())
        .await
        .unwrap();
    assert!(head.start_line.contains("200"), "{}", head.start_line);
    conn.send(&chunk(&[b'b'; 600])).await;
    let (body, _, complete) = within(STEP, "cut body", conn.read_body(Framing::Chunked)).await;
    assert!(
        !complete,
        "the response ended normally after the body crossed the limit"
    );
    assert!(
        body.len() <= 1000 && !body.contains(&b'b'),
        "{} bytes echoed",
        body.len()
    );
    let mut c = Client::connect(proxy.addr, Proto::H2).await;
    let (tx, body) = channel_body();
    let pending = c.send(c.req("POST", "/echo?t=started-h2").body(body).unwrap());
    let (response, sent) = tokio::join!(pending, tx.data(vec![b'a'; 600]));
    assert!(sent);
    let response = response.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    tx.data(vec![b'b'; 600]).await;
    let collected = within(STEP, "cut body", response.into_body().collect()).await;
    assert!(collected.is_err(), "the HTTP/2 response was not reset");
}

// ---------------------------------------------------------------- HTTP/2 floods

/// One HTTP/2 frame: length, type, flags, stream id, payload (RFC 9113 §4.1).
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut frame = vec![length[1], length[2], length[3], kind, flags];
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_DATA: u8 = 0x0;
const FRAME_HEADERS: u8 = 0x1;
const FRAME_RST_STREAM: u8 = 0x3;
const FRAME_SETTINGS: u8 = 0x4;
const FRAME_PING: u8 = 0x6;
const FRAME_GOAWAY: u8 = 0x7;
const END_HEADERS: u8 = 0x4;
const END_STREAM: u8 = 0x1;
const NO_ERROR: u32 = 0x0;
const CANCEL: u32 = 0x8;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// Writes the preface, empty SETTINGS and `pairs` HEADERS + RST_STREAM pairs in one write (the
/// rapid reset pattern of CVE-2023-44487: every stream cancelled before the server can start
/// it), then reads frames until the connection ends. The GOAWAY error code, if one came.
async fn rapid_reset_burst(addr: SocketAddr, pairs: u32) -> Option<u32> {
    // HPACK static table: :method GET (2), :scheme http (6), :path / (4).
    const GET_SLASH: [u8; 3] = [0x82, 0x86, 0x84];
    let mut burst = H2_PREFACE.to_vec();
    burst.extend(h2_frame(FRAME_SETTINGS, 0, 0, &[]));
    for stream in (1..).step_by(2).take(pairs as usize) {
        burst.extend(h2_frame(FRAME_HEADERS, END_HEADERS, stream, &GET_SLASH));
        burst.extend(h2_frame(FRAME_RST_STREAM, 0, stream, &CANCEL.to_be_bytes()));
    }
    send_and_read_goaway(addr, &burst).await
}

/// Writes `bytes` on a new connection, then reads frames until the connection ends: the GOAWAY
/// error code, if one came.
async fn send_and_read_goaway(addr: SocketAddr, bytes: &[u8]) -> Option<u32> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    if tcp.write_all(bytes).await.is_err() {
        return None;
    }
    read_goaway(&mut tcp, STEP).await
}

/// Reads frames until the connection ends or stays quiet for `quiet`: the GOAWAY error code, if
/// one came.
async fn read_goaway(tcp: &mut TcpStream, quiet: Duration) -> Option<u32> {
    let mut received = Vec::new();
    let mut buffer = [0u8; 16 * 1024];
    loop {
        match tokio::time::timeout(quiet, tcp.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => received.extend_from_slice(&buffer[..n]),
        }
    }
    first_goaway(&received)
}

/// The error code of the first GOAWAY among `received` frames.
fn first_goaway(received: &[u8]) -> Option<u32> {
    let mut frames = received;
    while frames.len() >= 9 {
        let length =
            usize::from(frames[0]) << 16 | usize::from(frames[1]) << 8 | usize::from(frames[2]);
        let payload = frames.get(9..9 + length)?;
        if frames[3] == FRAME_GOAWAY && payload.len() >= 8 {
            return Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
        }
        frames = &frames[9 + length..];
    }
    None
}

/// CVE-2023-44487: streams opened and reset before the server accepts them count against
/// `--h2-max-pending-reset-streams`; past it the connection gets GOAWAY `ENHANCE_YOUR_CALM`
/// and none of the streams reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_rapid_reset_is_cut_off_with_goaway() {
    let up = TestUpstream::start().await;
    let proxy = proxy_for(&up, &["--h2-max-pending-reset-streams", "20"]).await;
    for attempt in 0..3 {
        let code = rapid_reset_burst(proxy.addr, 100).await;
        assert_eq!(
            code,
            Some(ENHANCE_YOUR_CALM),
            "attempt {attempt}: 100 HEADERS+RST_STREAM pairs did not end in GOAWAY ENHANCE_YOUR_CALM"
        );
    }
    assert_nothing_reached(&up, "rapid reset bursts").await;
    // A burst under the limit is not an attack.
    assert_eq!(rapid_reset_burst_then_close(proxy.addr, 10).await, None);
    // The proxy still serves.
    let mut c = Client::connect(proxy.addr, Proto::H2).await;
    assert_eq!(c.get("/ok").await.status, StatusCode::OK);
}

/// An HTTP/2 connection written frame by frame, with what it has received so far.
struct RawH2 {
    tcp: TcpStream,
    received: Vec<u8>,
}

impl RawH2 {
    async fn open(addr: SocketAddr) -> Self {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let mut opening = H2_PREFACE.to_vec();
        opening.extend(h2_frame(FRAME_SETTINGS, 0, 0, &[]));
        tcp.write_all(&opening).await.unwrap();
        Self {
            tcp,
            received: Vec::new(),
        }
    }

    /// Reads what comes within `wait` (returning early at a GOAWAY): the GOAWAY's error code,
    /// if one has come.
    async fn goaway_within(&mut self, wait: Duration) -> Option<u32> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut buffer = [0u8; 16 * 1024];
        while first_goaway(&self.received).is_none() {
            match tokio::time::timeout_at(deadline, self.tcp.read(&mut buffer)).await {
                Ok(Ok(n)) if n > 0 => self.received.extend_from_slice(&buffer[..n]),
                _ => break,
            }
        }
        first_goaway(&self.received)
    }
}

/// Opens up to `batches` x `per_batch` streams (GET /delay?ms=10000) on one HTTP/2 connection
/// and resets each batch once all of it has reached the upstream, so that every stream was
/// started by the proxy before it was cancelled (the rapid reset the proxy keeps up with, which
/// h2's pending-reset limit does not see). Stops at a GOAWAY. The GOAWAY error code, if one came
/// (at the latest a second after the last reset), and how many streams reached the upstream.
async fn cancel_started_streams(
    up: &TestUpstream,
    addr: SocketAddr,
    batches: usize,
    per_batch: usize,
) -> (Option<u32>, usize) {
    // :method GET (static 2), :scheme http (6), :path as a literal with the indexed name 4.
    const PATH: &[u8] = b"/delay?ms=10000";
    let mut get_delay = vec![0x82, 0x86, 0x04, PATH.len() as u8];
    get_delay.extend_from_slice(PATH);
    let before = up.request_count();
    let mut connection = RawH2::open(addr).await;
    let mut next_stream = 1u32;
    for batch in 1..=batches {
        let streams: Vec<u32> = (0..per_batch)
            .map(|_| {
                next_stream += 2;
                next_stream - 2
            })
            .collect();
        let mut headers = Vec::new();
        for &stream in &streams {
            headers.extend(h2_frame(
                FRAME_HEADERS,
                END_HEADERS | END_STREAM,
                stream,
                &get_delay,
            ));
        }
        connection.tcp.write_all(&headers).await.unwrap();
        // Until the batch has reached the upstream, or a GOAWAY came (late for the last batch).
        let deadline = Instant::now() + STEP;
        while up.request_count() < before + batch * per_batch {
            if let Some(code) = connection.goaway_within(Duration::from_millis(20)).await {
                return (Some(code), up.request_count() - before);
            }
            assert!(
                Instant::now() < deadline,
                "batch {batch}: {} of {} streams reached the upstream",
                up.request_count() - before,
                batch * per_batch
            );
        }
        let mut resets = Vec::new();
        for &stream in &streams {
            resets.extend(h2_frame(FRAME_RST_STREAM, 0, stream, &CANCEL.to_be_bytes()));
        }
        connection.tcp.write_all(&resets).await.unwrap();
        let wait = if batch == batches {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(100)
        };
        if let Some(code) = connection.goaway_within(wait).await {
            return (Some(code), up.request_count() - before);
        }
    }
    (None, up.request_count() - before)
}

/// Streams cancelled after the proxy started them pass h2's pending-reset limit, and each has
/// already cost the upstream a request. A client may cancel twice `--max-concurrent-streams` of
/// them at once (refilled at that many a second); past it the connection gets GOAWAY. The peer
/// takes no strike (a gateway cancelling on short deadlines does this without abuse): its next
/// connection is served without waiting `--abuse-delay`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_streams_cancelled_after_they_started_are_cut_off_past_the_allowance() {
    const DELAY: Duration = Duration::from_millis(400);
    let up = TestUpstream::start().await;
    let proxy = proxy_for(
        &up,
        &["--max-concurrent-streams", "20", "--abuse-delay", "400ms"],
    )
    .await;
    // 30 cancellations, within the allowance of 40.
    let (goaway, reached) = cancel_started_streams(&up, proxy.addr, 2, 15).await;
    assert_eq!(reached, 30);
    assert_eq!(goaway, None, "30 cancelled streams are not abuse");
    let (status, fresh) = get_from([127, 0, 0, 1].into(), proxy.addr).await;
    assert_eq!(status, 200);
    assert!(fresh < DELAY, "no penalty yet: {fresh:?}");

    // Batches of 20 until a GOAWAY: past 40 at once, and 20 more for every second it takes.
    let (goaway, reached) = cancel_started_streams(&up, proxy.addr, 10, 20).await;
    assert_eq!(
        goaway,
        Some(NO_ERROR),
        "{reached} streams cancelled after they started did not end in GOAWAY"
    );
    assert!(reached > 40, "cut off after {reached} cancellations");
    let (status, waited) = get_from([127, 0, 0, 1].into(), proxy.addr).await;
    assert_eq!(status, 200);
    assert!(
        waited < DELAY / 2,
        "the peer was served {waited:?} after it connected again"
    );
    let delayed = scrape(proxy.admin)
        .await
        .value("scoretap_connections_delayed_total", &[]);
    assert_eq!(delayed, 0.0, "scoretap_connections_delayed_total");
    let mut c = Client::connect_from([127, 0, 0, 2].into(), proxy.addr, Proto::H2).await;
    assert_eq!(c.get("/ok").await.status, StatusCode::OK);
}

/// After the GOAWAY for cancelling too many started streams, the streams in flight may finish,
/// but a client that ignores it (it never answers the PING that precedes hyper's final GOAWAY,
/// so it may still open streams) and goes on opening and cancelling streams is dropped once it
/// passes its allowance again, instead of keeping the connection open for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_a_client_cancelling_on_after_its_goaway_is_dropped() {
    // :method GET (static 2), :scheme http (6), :path as a literal with the indexed name 4.
    const PATH: &[u8] = b"/delay?ms=10000&t=ignoring";
    let mut get_delay = vec![0x82, 0x86, 0x04, PATH.len() as u8];
    get_delay.extend_from_slice(PATH);
    let up = TestUpstream::start().await;
    let proxy = proxy_for(&up, &["--max-concurrent-streams", "20"]).await;
    let mut connection = RawH2::open(proxy.addr).await;
    let mut next_stream = 1u32;
    let mut goaway_at = None;
    let mut buffer = [0u8; 16 * 1024];
    for batch in 1..=60 {
        let streams: Vec<u32> = (0..15)
            .map(|_| {
                next_stream += 2;
                next_stream - 2
            })
            .collect();
        let mut headers = Vec::new();
        let mut resets = Vec::new();
        for &stream in &streams {
            let flags = END_HEADERS | END_STREAM;
            headers.extend(h2_frame(FRAME_HEADERS, flags, stream, &get_delay));
            resets.extend(h2_frame(FRAME_RST_STREAM, 0, stream, &CANCEL.to_be_bytes()));
        }
        let before = up.request_count();
        if connection.tcp.write_all(&headers).await.is_err() {
            break;
        }
        // The batch reaches the upstream (so every stream was started), or the connection ends.
        let deadline = Instant::now() + Duration::from_secs(2);
        while up.request_count() < before + streams.len() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if connection.tcp.write_all(&resets).await.is_err() {
            break;
        }
        // Read what came, without answering anything.
        let closed = loop {
            match tokio::time::timeout(Duration::from_millis(50), connection.tcp.read(&mut buffer))
                .await
            {
                Ok(Ok(0)) | Ok(Err(_)) => break true,
                Ok(Ok(n)) => connection.received.extend_from_slice(&buffer[..n]),
                Err(_) => break false,
            }
        };
        if goaway_at.is_none() && first_goaway(&connection.received).is_some() {
            goaway_at = Some((batch, Instant::now()));
        }
        if closed {
            break;
        }
    }
    let (goaway_batch, goaway_time) = goaway_at.expect("no GOAWAY for cancelling too many streams");
    let dropped_after = goaway_time.elapsed();
    let batches_after = next_stream / 30 - goaway_batch as u32;
    assert!(
        dropped_after < Duration::from_secs(3),
        "the connection went on {dropped_after:?} ({batches_after} batches of 15 cancelled \
         streams) after its GOAWAY"
    );
}

/// Empty DATA frames cost a server work without moving a byte: h2 allows a stream at most 100
/// of them without END_STREAM, then sends GOAWAY `ENHANCE_YOUR_CALM` (h2's own limit, not
/// configurable; this test fails if a hyper/h2 upgrade loses it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_empty_data_frame_flood_is_cut_off_with_goaway() {
    // HPACK static table: :method POST (3), :scheme http (6), :path / (4).
    const POST_SLASH: [u8; 3] = [0x83, 0x86, 0x84];
    let up = TestUpstream::start().await;
    let proxy = proxy_for(&up, &[]).await;
    let mut flood = H2_PREFACE.to_vec();
    flood.extend(h2_frame(FRAME_SETTINGS, 0, 0, &[]));
    flood.extend(h2_frame(FRAME_HEADERS, END_HEADERS, 1, &POST_SLASH));
    for _ in 0..1_000 {
        flood.extend(h2_frame(FRAME_DATA, 0, 1, &[]));
    }
    assert_eq!(
        send_and_read_goaway(proxy.addr, &flood).await,
        Some(ENHANCE_YOUR_CALM),
        "1,000 empty DATA frames did not end in GOAWAY ENHANCE_YOUR_CALM"
    );
    let mut c = Client::connect_from([127, 0, 0, 2].into(), proxy.addr, Proto::H2).await;
    assert_eq!(c.get("/ok").await.status, StatusCode::OK);
}

/// Writes `frame` over and over on a new HTTP/2 connection for `duration` without reading what
/// comes back; returns the bytes the proxy took (the rest waits in socket buffers).
async fn flood_unread(addr: SocketAddr, frame: &[u8], duration: Duration) -> (u64, TcpStream) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut opening = H2_PREFACE.to_vec();
    opening.extend(h2_frame(FRAME_SETTINGS, 0, 0, &[]));
    tcp.write_all(&opening).await.unwrap();
    let block: Vec<u8> = frame
        .iter()
        .copied()
        .cycle()
        .take(frame.len() * (64 * 1024 / frame.len()))
        .collect();
    let deadline = Instant::now() + duration;
    let mut written = 0u64;
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(200), tcp.write(&block)).await {
            Ok(Ok(n)) if n > 0 => written += n as u64,
            Ok(_) => break,
            // The proxy stopped reading: the socket buffers are full.
            Err(_) => {}
        }
    }
    (written, tcp)
}

/// PING and SETTINGS floods whose answers are never read: each needs an answer (PING ACK,
/// SETTINGS ACK), and h2 reads the next frame only once the last answer is queued for writing,
/// so an unread flood stops being read when the socket is full instead of queueing answers
/// without bound. Measured: memory does not grow with the flood, and another client is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_ping_and_settings_floods_do_not_grow_memory() {
    const FLOOD: Duration = Duration::from_secs(2);
    let up = TestUpstream::start().await;
    let proxy = proxy_for(&up, &[]).await;
    let rss_before = proc_status_kib(proxy.pid(), "VmRSS").unwrap();
    let ping = h2_frame(FRAME_PING, 0, 0, &[1, 2, 3, 4, 5, 6, 7, 8]);
    let settings = h2_frame(FRAME_SETTINGS, 0, 0, &[]);
    let mut held = Vec::new();
    for (name, frame) in [("PING", &ping), ("SETTINGS", &settings)] {
        let (written, tcp) = flood_unread(proxy.addr, frame, FLOOD).await;
        let frames = written / frame.len() as u64;
        let rss = proc_status_kib(proxy.pid(), "VmRSS").unwrap();
        println!(
            "{name} flood: {frames} frames taken in {FLOOD:?} without reading an answer; \
             proxy RSS {} -> {} KiB",
            rss_before, rss
        );
        // Socket buffers on loopback hold a few MiB: far fewer frames than an unbounded reader
        // would take in two seconds.
        assert!(
            written < 64 << 20,
            "{name}: the proxy kept reading an unread flood: {written} bytes"
        );
        assert!(
            rss < rss_before + 32 * 1024,
            "{name}: proxy RSS grew from {rss_before} to {rss} KiB"
        );
        held.push(tcp);
    }
    // Another client is served while both floods are still open.
    let mut c = Client::connect_from([127, 0, 0, 2].into(), proxy.addr, Proto::H2).await;
    assert_eq!(c.get("/ok").await.status, StatusCode::OK);
    drop(held);
}

/// A GET on a new connection from `local` (any address of 127.0.0.0/8 is this machine's): its
/// status and how long it took from connecting.
async fn get_from(local: std::net::IpAddr, addr: SocketAddr) -> (u16, Duration) {
    let started = Instant::now();
    let stream = tcp_from(local, addr).await;
    let mut conn = RawConn::from_io(Box::new(stream));
    conn.send(b"GET /ok?t=after-abuse HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        .await;
    let response = within(STEP, "response", conn.read_response(false)).await;
    (response.status(), started.elapsed())
}

/// A peer cut off for rapid reset has its next connection served only after `--abuse-delay`
/// (it doubles with each repeat); other peers are served at once, and `0s` switches it off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abusive_peer_waits_before_its_next_connection() {
    const DELAY: Duration = Duration::from_millis(400);
    let attacker: std::net::IpAddr = [127, 0, 0, 1].into();
    let bystander: std::net::IpAddr = [127, 0, 0, 2].into();
    let up = TestUpstream::start().await;
    let proxy = proxy_for(&up, &["--abuse-delay", "400ms"]).await;
    let (status, fresh) = get_from(attacker, proxy.addr).await;
    assert_eq!(status, 200);
    assert!(fresh < DELAY, "before any abuse: {fresh:?}");

    assert_eq!(
        rapid_reset_burst(proxy.addr, 100).await,
        Some(ENHANCE_YOUR_CALM)
    );
    let cut_off = Instant::now();
    // The strike is recorded as the connection ends, a moment after the attacker can see it end.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, _) = get_from(attacker, proxy.addr).await;
    let waited = cut_off.elapsed();
    assert_eq!(status, 200, "the connection is served, late");
    assert!(
        waited >= DELAY,
        "the abusive peer was served {waited:?} after it was cut off"
    );
    let (status, other) = get_from(bystander, proxy.addr).await;
    assert_eq!(status, 200);
    assert!(other < DELAY, "another peer waited {other:?}");
    let delayed = scrape(proxy.admin)
        .await
        .value("scoretap_connections_delayed_total", &[]);
    assert!(
        delayed >= 1.0,
        "scoretap_connections_delayed_total {delayed}"
    );

    let up = TestUpstream::start().await;
    let proxy = proxy_for(&up, &["--abuse-delay", "0s"]).await;
    assert_eq!(
        rapid_reset_burst(proxy.addr, 100).await,
        Some(ENHANCE_YOUR_CALM)
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, off) = get_from(attacker, proxy.addr).await;
    assert_eq!(status, 200);
    assert!(off < DELAY, "with --abuse-delay 0s: {off:?}");
}

/// Like [`rapid_reset_burst`], but the client ends the connection itself after a moment: the
/// GOAWAY error code the server sent meanwhile, if any.
async fn rapid_reset_burst_then_close(addr: SocketAddr, pairs: u32) -> Option<u32> {
    tokio::time::timeout(Duration::from_millis(1500), rapid_reset_burst(addr, pairs))
        .await
        .ok()
        .flatten()
}

// ---------------------------------------------------------------- floods vs a good client

/// The least the attacked p99 bound can be (see the test below).
const ATTACKED_P99_FLOOR: Duration = Duration::from_millis(10);

fn p99(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[(samples.len() * 99 / 100).min(samples.len() - 1)]
}

/// Latencies of `n` small sequential requests on one kept-alive connection from 127.0.0.2: a
/// peer other than the attackers (127.0.0.1), as a real attacker's address differs from the
/// clients it hurts.
async fn small_requests(addr: SocketAddr, n: usize) -> Vec<Duration> {
    let mut c = Client::connect_from([127, 0, 0, 2].into(), addr, Proto::H1).await;
    for _ in 0..20 {
        assert_eq!(c.get("/ok?t=warm").await.status, StatusCode::OK);
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r = c.get("/ok?t=good").await;
        samples.push(t.elapsed());
        assert_eq!(r.status, StatusCode::OK);
    }
    samples
}

/// Slowloris connections (heads one byte at a time, reconnecting when closed) and an HTTP/2
/// rapid-reset loop run while a well-behaved client sends small requests; its p99 is compared
/// with the p99 it had alone, measured the same way in the same test.
///
/// The attackers are a process of their own (`hostile_load`) run at the lowest CPU priority
/// (`nice -n 19`), from 127.0.0.1 while the measured client connects from 127.0.0.2: this
/// machine's two cores are shared by the proxy, the upstream, the client and the attackers, and
/// the attackers' own CPU time (another machine's in a real attack) would otherwise be taken from
/// the others and measured as the proxy's failure. The proxy's work for the attack (accepting,
/// reading, timing out, GOAWAY, penalties) still counts. The bound is twice the baseline or
/// [`ATTACKED_P99_FLOOR`], whichever is larger (a p99 of a few hundred microseconds doubles with
/// one scheduling hiccup); the test prints both figures and the attack's size. `SCORETAP_BIN`
/// runs it against a release build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_do_not_starve_a_well_behaved_one() {
    const SAMPLES: usize = 500;
    const SLOWLORIS: usize = 200;
    let up = TestUpstream::start().await;
    let proxy = proxy_for(&up, &["--header-read-timeout", "2s"]).await;
    let baseline = p99(small_requests(proxy.addr, SAMPLES).await);

    let mut attackers = tokio::process::Command::new("nice")
        .args(["-n", "19", env!("CARGO_BIN_EXE_hostile_load")])
        .arg(proxy.addr.to_string())
        .arg(SLOWLORIS.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("nice hostile_load");
    // Let the attack build up (every slowloris connection open, resets flowing).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let attacked = p99(small_requests(proxy.addr, SAMPLES).await);
    // Long enough for the header read timeout to close slowloris connections.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    drop(attackers.stdin.take());
    let report = within(STEP, "the attackers to stop", attackers.wait_with_output())
        .await
        .unwrap();
    let report = String::from_utf8_lossy(&report.stdout).trim().to_owned();
    let count = |name: &str| -> usize {
        report
            .split_whitespace()
            .find_map(|field| field.strip_prefix(name)?.strip_prefix('='))
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("hostile_load reported no {name}: {report:?}"))
    };
    let (closed, resets) = (count("slowloris_closed"), count("resets"));
    let bound = (baseline * 2).max(ATTACKED_P99_FLOOR);
    println!(
        "p99 of {SAMPLES} small requests: alone {baseline:?}, under attack {attacked:?} (bound {bound:?}); \
         {SLOWLORIS} slowloris connections, attack: {report}"
    );
    assert!(
        closed >= SLOWLORIS / 2,
        "slowloris connections were not closed: {closed}"
    );
    assert!(
        resets > 10_000,
        "the rapid reset attack was too small to mean anything: {resets}"
    );
    // The GOAWAYs the report counts are not asserted here: one comes only when the attacker
    // outruns the proxy's accept loop (h2 counts streams reset before they are accepted), which
    // on a loaded 2-core machine it sometimes does not (0 in one run of the whole suite, 2 to 4
    // alone). The cut-off is asserted deterministically by `h2_rapid_reset_is_cut_off_with_goaway`,
    // the penalty after it by `abusive_peer_waits_before_its_next_connection`.
    assert!(
        attacked <= bound,
        "a well-behaved client's p99 went from {baseline:?} to {attacked:?} under attack (bound {bound:?})"
    );
}
