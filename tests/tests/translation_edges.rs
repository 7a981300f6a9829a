//! Message translation at its edges: response framing with both `Transfer-Encoding` and
//! `Content-Length`, request bodies on GET and HEAD, the `Host` grammar and `forwarded` quoting,
//! the HTTP/2 upstream pool under `--preserve-host`, and HTTP/1.1 connections that asked for an
//! upgrade the upstream refused. Each test fails when its translation is wrong.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use scoretap_tests::client::{channel_body, collect, empty, full};
use scoretap_tests::harness::proxy_for;
use scoretap_tests::raw::{chunk, request_bytes, Framing, RawRequest};
use scoretap_tests::traces::{inline_bytes, TraceStore};
use scoretap_tests::*;

/// The body the raw upstream sends chunked: 34 bytes.
const CHUNKED_BODY: &[u8] = b"thirty-four bytes, sent in chunks.";

/// A response with `Content-Length: 5` and a 34-byte chunked body.
fn chunked_with_content_length() -> Vec<u8> {
    let mut reply =
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    reply.extend(chunk(&CHUNKED_BODY[..10]));
    reply.extend(chunk(&CHUNKED_BODY[10..]));
    reply.extend_from_slice(b"0\r\n\r\n");
    reply
}

/// A response with both `Transfer-Encoding` and `Content-Length` reaches the client whole: the
/// transfer coding overrides the length (RFC 9112 §6.3), so the proxy must drop the received
/// `Content-Length` rather than frame the forwarded body by it. Over a kept-alive HTTP/1.1
/// connection (a second request still works) and over HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_with_transfer_encoding_and_content_length_is_framed_by_the_coding() {
    assert_eq!(CHUNKED_BODY.len(), 34);
    let up = RawUpstream::start(|_| RawReply::bytes(chunked_with_content_length())).await;
    let proxy = Scoretap::start(&up.url(), &[]).await;

    let mut conn = RawConn::connect(proxy.addr).await;
    for path in ["/first", "/second"] {
        conn.send(&request_bytes(
            &format!("GET {path} HTTP/1.1"),
            &[("host", "h")],
            b"",
        ))
        .await;
        let response = within(STEP, path, conn.try_read_response(false))
            .await
            .unwrap_or_else(|| panic!("{path}: the connection closed without an answer"));
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(
            response.body_str(),
            String::from_utf8_lossy(CHUNKED_BODY),
            "{path}: the client got {} bytes of the 34-byte body (framing {:?}, content-length {:?})",
            response.body.len(),
            response.framing,
            response.header("content-length")
        );
        assert!(response.complete, "{path}: body incomplete");
        assert_ne!(
            response.header("content-length"),
            Some("5"),
            "{path}: the overridden Content-Length was forwarded"
        );
    }

    let mut h2 = Client::connect(proxy.addr, Proto::H2).await;
    let response = h2.get("/over-h2").await;
    assert_eq!(response.status, 200);
    assert_eq!(&response.body[..], CHUNKED_BODY, "over HTTP/2");
    assert_ne!(
        response.header("content-length").as_deref(),
        Some("5"),
        "over HTTP/2: the overridden Content-Length was forwarded"
    );
}

/// The raw upstream's answer to every request: a small body (none for HEAD).
fn ok_reply(request: &RawRequest) -> RawReply {
    if request.head.method() == "HEAD" {
        RawReply::bytes("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
    } else {
        RawReply::bytes("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    }
}

/// A GET or HEAD with a body reaches the upstream with that body: sent chunked by an HTTP/1.1
/// client, as DATA without `content-length` by an HTTP/2 client, or with a `Content-Length`.
/// hyper's client sends no body for a GET or HEAD whose length it does not know unless the
/// request says `transfer-encoding: chunked`. The record keeps the request body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_and_head_bodies_reach_the_upstream() {
    let up = RawUpstream::start(ok_reply).await;
    let store = TraceStore::new();
    let proxy = Scoretap::builder()
        .upstream(&up.url())
        .args(store.args())
        .start()
        .await;
    let mut expected: Vec<(String, &str, Vec<u8>)> = Vec::new();

    // HTTP/1.1, chunked.
    for method in ["GET", "HEAD"] {
        let id = format!("{}-chunked", method.to_ascii_lowercase());
        let body = format!("a {method} body, sent chunked").into_bytes();
        let mut request = request_bytes(
            &format!("{method} /score?t={id} HTTP/1.1"),
            &[
                ("host", "h"),
                ("x-request-id", &id),
                ("transfer-encoding", "chunked"),
            ],
            b"",
        );
        request.extend(chunk(&body[..7]));
        request.extend(chunk(&body[7..]));
        request.extend_from_slice(b"0\r\n\r\n");
        let mut conn = RawConn::connect(proxy.addr).await;
        conn.send(&request).await;
        let response = within(STEP, &id, conn.read_response(method == "HEAD")).await;
        assert_eq!(response.status(), 200, "{id}: {}", response.body_str());
        expected.push((id, method, body));
    }

    // HTTP/1.1, Content-Length.
    let id = "get-length".to_string();
    let body = b"a GET body with a Content-Length".to_vec();
    let mut conn = RawConn::connect(proxy.addr).await;
    conn.send(&request_bytes(
        &format!("GET /score?t={id} HTTP/1.1"),
        &[
            ("host", "h"),
            ("x-request-id", &id),
            ("content-length", &body.len().to_string()),
        ],
        &body,
    ))
    .await;
    let response = within(STEP, &id, conn.read_response(false)).await;
    assert_eq!(response.status(), 200, "{id}: {}", response.body_str());
    expected.push((id, "GET", body));

    // HTTP/2, DATA frames without content-length.
    let mut h2 = Client::connect(proxy.addr, Proto::H2).await;
    for method in ["GET", "HEAD"] {
        let id = format!("{}-h2-data", method.to_ascii_lowercase());
        let body = format!("a {method} body, sent as DATA").into_bytes();
        let (sender, request_body) = channel_body();
        let request = h2
            .req(method, &format!("/score?t={id}"))
            .header("x-request-id", &id)
            .body(request_body)
            .unwrap();
        let feeding = {
            let body = body.clone();
            tokio::spawn(async move {
                sender.data(body[..5].to_vec()).await;
                sender.data(body[5..].to_vec()).await;
            })
        };
        let response = within(STEP, &id, async {
            collect(h2.send(request).await.unwrap()).await.unwrap()
        })
        .await;
        feeding.await.unwrap();
        assert_eq!(response.status, 200, "{id}: {}", response.text());
        expected.push((id, method, body));
    }

    let requests = up.requests();
    for (id, method, body) in &expected {
        let seen = requests
            .iter()
            .find(|request| request.head.target().ends_with(&format!("t={id}")))
            .unwrap_or_else(|| panic!("{id}: never reached the upstream"));
        assert_eq!(seen.head.method(), *method, "{id}");
        assert_eq!(
            String::from_utf8_lossy(&seen.body),
            String::from_utf8_lossy(body),
            "{id}: the upstream received another body (framing {:?}, head {:?})",
            seen.framing,
            String::from_utf8_lossy(&seen.head.raw)
        );
        assert!(seen.complete, "{id}: incomplete at the upstream");
        assert_ne!(seen.framing, Framing::None, "{id}");
        let record = store.wait(id).await;
        assert_eq!(
            String::from_utf8_lossy(&inline_bytes(record.at("/request/body"))),
            String::from_utf8_lossy(body),
            "{id}: the record's request body; record {}",
            record.brief()
        );
        assert_eq!(
            record.u64_at("/request/body/size"),
            Some(body.len() as u64),
            "{id}"
        );
    }
}

fn head(lines: &str) -> Vec<u8> {
    lines.replace('|', "\r\n").into_bytes()
}

/// Sends one raw request on a fresh connection; its response.
async fn exchange(proxy: &Scoretap, request: &[u8]) -> RawResponse {
    let mut conn = RawConn::connect(proxy.addr).await;
    conn.send(request).await;
    within(STEP, "response", conn.read_response(false)).await
}

/// A `Host` that is not `uri-host [ ":" port ]` (RFC 9110 §7.2) is refused with scoretap's 400
/// and never reaches the upstream: pasted into `forwarded: host="..."` it could add a `for=`
/// element of the client's choosing. A valid host is forwarded intact and quoted (RFC 7239 §4),
/// also a registered name with `;` and `=` in it, and over HTTP/2 `:authority` follows the same
/// rule (userinfo refused, RFC 9113 §8.3.1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_host_is_validated_and_quoted() {
    let up = TestUpstream::start().await;
    let proxy = proxy_for(&up, &["--forwarded", "forwarded"]).await;
    for (what, host) in [
        ("a quote and a second element", "x\", for=6.6.6.6"),
        ("a space", "a b"),
        ("a non-numeric port", "h:1x"),
        ("userinfo", "user@h"),
        ("an unclosed IP literal", "[::1"),
    ] {
        let response = exchange(
            &proxy,
            &request_bytes("GET /headers?t=spoof HTTP/1.1", &[("host", host)], b""),
        )
        .await;
        assert_eq!(
            response.status(),
            400,
            "{what}: Host {host:?}: {}",
            response.body_str()
        );
        assert_eq!(response.json()["error"], "bad_request", "{what}");
    }
    // An absolute-form target's authority is the host too.
    let response = exchange(
        &proxy,
        &head("GET http://user@h/headers?t=spoof HTTP/1.1|Host: h||"),
    )
    .await;
    assert_eq!(
        response.status(),
        400,
        "userinfo in an absolute-form target"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        up.requests().len(),
        0,
        "a refused Host reached the upstream: {:?}",
        up.requests()
            .iter()
            .map(|r| r.header_all("forwarded"))
            .collect::<Vec<_>>()
    );

    for (host, quoted) in [
        ("h:1", "host=\"h:1\""),
        ("[::1]:8080", "host=\"[::1]:8080\""),
        ("x;for=6.6.6.6", "host=\"x;for=6.6.6.6\""),
    ] {
        let response = exchange(
            &proxy,
            &request_bytes("GET /headers?t=valid HTTP/1.1", &[("host", host)], b""),
        )
        .await;
        assert_eq!(
            response.status(),
            200,
            "Host {host:?}: {}",
            response.body_str()
        );
        let seen = up.requests().pop().unwrap();
        let forwarded = seen.header_all("forwarded");
        assert_eq!(
            forwarded,
            vec![format!("for=127.0.0.1;proto=http;{quoted}")],
            "Host {host:?}"
        );
    }

    let mut h2 = Client::connect(proxy.addr, Proto::H2).await;
    let request = http::Request::get("http://x;for=6.6.6.6/headers?t=h2")
        .version(http::Version::HTTP_2)
        .body(empty())
        .unwrap();
    let response = h2.fetch(request, STEP).await;
    assert_eq!(response.status, 200);
    let seen = up.requests().pop().unwrap();
    assert_eq!(
        seen.header_all("forwarded"),
        vec!["for=127.0.0.1;proto=http;host=\"x;for=6.6.6.6\"".to_string()],
        ":authority"
    );
    let before = up.requests().len();
    let request = http::Request::get("http://user@h/headers?t=h2-userinfo")
        .version(http::Version::HTTP_2)
        .body(full(""))
        .unwrap();
    let response = h2.fetch(request, STEP).await;
    assert_eq!(response.status, 400, ":authority with userinfo");
    assert_eq!(response.json()["error"], "bad_request");
    assert_eq!(up.requests().len(), before, ":authority with userinfo");
}

/// With `--preserve-host` and an HTTP/2 upstream, requests for many client hosts share one
/// upstream connection: the pool is keyed by the upstream, while each request's `:authority`
/// is still the client's host. The shared connection still closes after `--pool-idle-timeout`,
/// and the next request opens another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preserved_hosts_share_one_http2_upstream_connection() {
    let up = TestUpstream::start_proto(UpstreamProto::H2).await;
    let proxy = proxy_for(&up, &["--preserve-host", "--pool-idle-timeout", "500ms"]).await;
    let mut client = Client::connect(proxy.addr, Proto::H1).await;
    for n in 0..20 {
        let host = format!("tenant-{n}.example:8443");
        let request = http::Request::get(format!("/headers?t=host-{n}"))
            .header("host", &host)
            .body(empty())
            .unwrap();
        let response = client.fetch(request, STEP).await;
        assert_eq!(response.status, 200, "{host}: {}", response.text());
        let seen = up.wait_path(&format!("t=host-{n}")).await;
        assert_eq!(
            seen.authority().as_deref(),
            Some(host.as_str()),
            ":authority"
        );
    }
    assert_eq!(
        up.accepted_connections(),
        1,
        "the upstream accepted a connection per client host"
    );
    assert!(
        util::eventually(Duration::from_secs(3), || up.open_connections() == 0).await,
        "the idle HTTP/2 upstream connection was not closed (--pool-idle-timeout 500ms)"
    );
    let response = client.get("/headers?t=after-idle").await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(up.accepted_connections(), 2);
}

/// How long a connection may take to close once it should.
const CLOSE_LIMIT: Duration = Duration::from_secs(3);

/// The HTTP/1.1 request that asks for `Upgrade: h2c` (as `curl --http2` does on `http://`),
/// answered without switching protocols.
fn refused_upgrade() -> Vec<u8> {
    head(
        "GET /headers?t=upgrade HTTP/1.1|Host: h|Connection: Upgrade, HTTP2-Settings|Upgrade: h2c|HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA||",
    )
}

/// After a request that asked for a protocol upgrade the upstream did not grant, the connection
/// still carries HTTP/1.1 requests and is followed as such: a smuggling attempt on it is refused
/// with scoretap's 400 (also when it was sent before the refusal came), and a slow head on it is
/// closed after the header read timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upgrade_leaves_the_connection_followed() {
    let up = TestUpstream::start().await;
    let proxy = proxy_for(
        &up,
        &["--header-read-timeout", "1s", "--idle-timeout", "30s"],
    )
    .await;
    let smuggling = head(
        "POST /sink?t=cl-te HTTP/1.1|Host: h|Content-Length: 35|Transfer-Encoding: chunked||0||GET /smuggled HTTP/1.1|Host: h||",
    );

    // The smuggling attempt after the refusal.
    let mut conn = RawConn::connect(proxy.addr).await;
    conn.send(&refused_upgrade()).await;
    let response = within(STEP, "upgrade request", conn.read_response(false)).await;
    assert_eq!(response.status(), 200, "{}", response.body_str());
    conn.send(&smuggling).await;
    let refused = within(
        STEP,
        "smuggling after the upgrade",
        conn.try_read_response(false),
    )
    .await
    .expect("the connection closed without an answer");
    assert_eq!(refused.status(), 400, "{}", refused.body_str());
    assert_eq!(refused.json()["error"], "bad_request");
    assert!(conn.closed_within(CLOSE_LIMIT).await);

    // The same attempt pipelined behind the upgrade request, before its answer.
    let mut conn = RawConn::connect(proxy.addr).await;
    let mut pipelined = refused_upgrade();
    pipelined.extend_from_slice(&smuggling);
    conn.send(&pipelined).await;
    let response = within(STEP, "upgrade request", conn.read_response(false)).await;
    assert_eq!(response.status(), 200, "{}", response.body_str());
    let refused = within(STEP, "pipelined smuggling", conn.try_read_response(false))
        .await
        .expect("the connection closed without an answer");
    assert_eq!(refused.status(), 400, "{}", refused.body_str());
    assert_eq!(refused.json()["error"], "bad_request");
    assert!(conn.closed_within(CLOSE_LIMIT).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let paths: Vec<String> = up.requests().iter().map(|r| r.path_and_query()).collect();
    assert_eq!(
        paths,
        ["/headers?t=upgrade", "/headers?t=upgrade"],
        "only the upgrade requests reach the upstream"
    );

    // A slow head after the refusal.
    let mut conn = RawConn::connect(proxy.addr).await;
    conn.send(&refused_upgrade()).await;
    let response = within(STEP, "upgrade request", conn.read_response(false)).await;
    assert_eq!(response.status(), 200);
    let started = Instant::now();
    let slow = b"GET /headers?t=slow HTTP/1.1\r\nHost: h\r\nX-Endless: ";
    let mut closed_after = None;
    for byte in slow.iter().chain(std::iter::repeat(&b'a')) {
        if started.elapsed() > Duration::from_secs(5) {
            break;
        }
        if conn.try_send(&[*byte]).await.is_err()
            || conn.closed_within(Duration::from_millis(50)).await
        {
            closed_after = Some(started.elapsed());
            break;
        }
    }
    let closed_after =
        closed_after.expect("a slow head after a refused upgrade kept its connection past 5s");
    assert!(
        (Duration::from_millis(800)..Duration::from_millis(2500)).contains(&closed_after),
        "slow head closed after {closed_after:?}, expected about 1s"
    );
}

/// A granted upgrade still switches the connection: the upgraded bytes flow both ways and are
/// not taken for requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_granted_upgrade_still_tunnels() {
    let up = TestUpstream::start_proto(UpstreamProto::H1).await;
    let proxy = proxy_for(&up, &["--header-read-timeout", "1s"]).await;
    let mut conn = RawConn::connect(proxy.addr).await;
    conn.send(&head(
        "GET /upgrade HTTP/1.1|Host: h|Connection: Upgrade|Upgrade: websocket|Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==|Sec-WebSocket-Version: 13||",
    ))
    .await;
    let response = within(STEP, "upgrade", conn.read_head()).await.unwrap();
    assert_eq!(response.status(), 101, "{:?}", response.start_line);
    // Bytes that would be a bare-LF head on HTTP/1.1 are tunnel data here.
    let data = b"GET / HTTP/1.1\nX: y\n\n";
    conn.send(data).await;
    let echoed = within(STEP, "tunnel echo", conn.read_exact(data.len())).await;
    assert_eq!(&echoed[..], data);
}
