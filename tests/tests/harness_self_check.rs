//! The harness checked against itself (no proxy): the test upstream, the clients and the raw
//! helpers must be right before they can judge the proxy.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use http::HeaderMap;
use scoretap_tests::client::{channel_body, collect, empty, full};
use scoretap_tests::raw::{request_bytes, Framing};
use scoretap_tests::upstream::BodyOutcome;
use scoretap_tests::util::{eventually, pattern, pattern_sha256, sha256_hex};
use scoretap_tests::*;

#[tokio::test]
async fn upstream_echo_and_bytes_over_h1_h2_plain_and_tls() {
    let pki = Pki::new();
    for tls in [false, true] {
        let up = if tls {
            TestUpstream::start_tls(UpstreamProto::Auto, pki.clone()).await
        } else {
            TestUpstream::start().await
        };
        for proto in [Proto::H1, Proto::H2] {
            let mut c = if tls {
                Client::connect_tls(up.addr, proto, pki.client_config(&[])).await
            } else {
                Client::connect(up.addr, proto).await
            };
            if tls {
                let want: &[u8] = if proto == Proto::H2 {
                    b"h2"
                } else {
                    b"http/1.1"
                };
                assert_eq!(c.alpn.as_deref(), Some(want));
            }
            for size in [0usize, 1, 65536, 1 << 20] {
                let body = pattern(0, size);
                let r = c.post("/echo", body.clone()).await;
                assert_eq!(r.status, 200);
                assert_eq!(r.version, proto.version());
                assert_eq!(r.body.len(), size);
                assert!(r.body[..] == body[..]);
                let r = c.get(&format!("/bytes?size={size}")).await;
                assert_eq!(r.header("content-length"), Some(size.to_string()));
                assert_eq!(sha256_hex(&r.body), pattern_sha256(size as u64));
            }
            let last = up.requests().last().cloned().unwrap();
            assert_eq!(last.version, proto.version());
        }
    }
}

#[test]
fn pattern_is_deterministic_and_offsettable() {
    let whole = pattern(0, 300_000);
    assert_eq!(&whole[70_000..200_000], &pattern(70_000, 130_000)[..]);
    assert_ne!(&whole[0..65536], &whole[65536..131072]);
    assert_eq!(sha256_hex(&whole), pattern_sha256(300_000));
}

#[tokio::test]
async fn upstream_sse_gate_controls_events() {
    let up = TestUpstream::start().await;
    let gate = up.gate("g1");
    let mut c = Client::connect(up.addr, Proto::H1).await;
    gate.add_permits(1);
    let resp = c
        .send(c.req("GET", "/sse?events=3&gate=g1").body(empty()).unwrap())
        .await
        .unwrap();
    let mut body = resp.into_body();
    use http_body_util::BodyExt;
    let f = within(STEP, "event 0", body.frame())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(f.data_ref().unwrap().as_ref(), b"id: 0\ndata: event-0\n\n");
    // No permit: the next event must not arrive.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), body.frame())
            .await
            .is_err()
    );
    gate.add_permits(2);
    let rest = within(STEP, "rest", body.collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(
        &rest[..],
        b"id: 1\ndata: event-1\n\nid: 2\ndata: event-2\n\n"
    );
}

#[tokio::test]
async fn upstream_trailers_on_h2_and_h1_with_te() {
    let up = TestUpstream::start().await;
    let mut c = Client::connect(up.addr, Proto::H2).await;
    let r = c.get("/trailers").await;
    assert_eq!(r.text(), "trailer-body");
    assert_eq!(r.trailer("grpc-status").as_deref(), Some("0"));
    let mut c = Client::connect(up.addr, Proto::H1).await;
    let req = c
        .req("GET", "/trailers")
        .header("te", "trailers")
        .body(empty())
        .unwrap();
    let r = c.fetch(req, STEP).await;
    assert_eq!(r.trailer("grpc-message").as_deref(), Some("all-good"));
    // Request trailers are recorded.
    let mut c = Client::connect(up.addr, Proto::H2).await;
    let (tx, body) = channel_body();
    let req = c.req("POST", "/trailers?rt=1").body(body).unwrap();
    let fut = tokio::spawn(async move {
        tx.data("abc").await;
        let mut t = HeaderMap::new();
        t.insert("x-req-trailer", "yes".parse().unwrap());
        tx.trailers(t).await;
    });
    let _ = c.fetch(req, STEP).await;
    fut.await.unwrap();
    let rec = up.wait_path("rt=1").await;
    let st = rec.state();
    assert_eq!(st.body_outcome, BodyOutcome::Complete);
    assert_eq!(
        st.request_trailers.unwrap().get("x-req-trailer").unwrap(),
        "yes"
    );
}

#[tokio::test]
async fn upstream_detects_cancellation() {
    let up = TestUpstream::start().await;
    for proto in [Proto::H1, Proto::H2] {
        // Stalled handler dropped when the client goes away.
        let tag = format!("/stall?p={proto:?}");
        let mut c = Client::connect(up.addr, proto).await;
        let req = c.req("GET", &tag).body(empty()).unwrap();
        let h = tokio::spawn(async move {
            let _ = c.send(req).await;
        });
        let rec = up.wait_path(&tag).await;
        h.abort();
        assert!(
            eventually(Duration::from_secs(5), || rec.state().handler_dropped).await,
            "{proto:?}: stall handler not dropped"
        );
        // Response body dropped mid-stream.
        let tag = format!("/slow-body?chunks=100&gap_ms=50&p={proto:?}");
        let mut c = Client::connect(up.addr, proto).await;
        let resp = c
            .send(c.req("GET", &tag).body(empty()).unwrap())
            .await
            .unwrap();
        let rec = up.wait_path(&tag).await;
        drop(resp);
        drop(c);
        assert!(
            eventually(Duration::from_secs(5), || rec.state().response_dropped).await,
            "{proto:?}: response drop not seen"
        );
        // Request body aborted mid-upload.
        let tag = format!("/sink?p={proto:?}");
        let mut c = Client::connect(up.addr, proto).await;
        let (tx, body) = channel_body();
        let req = c
            .req("POST", &tag)
            .header("content-length", "100000")
            .body(body)
            .unwrap();
        let h = tokio::spawn(async move {
            let _ = c.send(req).await;
        });
        tx.data(vec![0u8; 1000]).await;
        let rec = up.wait_path(&tag).await;
        assert!(eventually(Duration::from_secs(5), || rec.state().body_bytes == 1000).await);
        h.abort();
        drop(tx);
        assert!(
            eventually(Duration::from_secs(5), || rec.state().body_outcome
                == BodyOutcome::Error)
            .await,
            "{proto:?}: body error not seen: {:?}",
            rec.state()
        );
        assert!(rec.cancelled());
    }
}

#[tokio::test]
async fn upstream_upgrade_head_status_and_connection_counting() {
    let up = TestUpstream::start_proto(UpstreamProto::H1).await;
    let mut raw = RawConn::connect(up.addr).await;
    raw.send(&request_bytes(
        "GET /upgrade HTTP/1.1",
        &[
            ("host", "x"),
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
        ],
        b"",
    ))
    .await;
    let r = within(STEP, "101", raw.read_response(false)).await;
    assert_eq!(r.status(), 101);
    raw.send(b"ping").await;
    assert_eq!(within(STEP, "echo", raw.read_exact(4)).await, b"ping");

    let mut raw = RawConn::connect(up.addr).await;
    raw.send(&request_bytes("HEAD /head HTTP/1.1", &[("host", "x")], b""))
        .await;
    let r = within(STEP, "head", raw.read_response(true)).await;
    assert_eq!(r.header("content-length"), Some("1234"));
    assert!(r.body.is_empty());
    raw.send(&request_bytes(
        "GET /status/204 HTTP/1.1",
        &[("host", "x")],
        b"",
    ))
    .await;
    let r = within(STEP, "204", raw.read_response(false)).await;
    assert_eq!((r.status(), r.framing), (204, Framing::None));
    raw.send(&request_bytes(
        "GET /bytes?size=10&chunked=1 HTTP/1.1",
        &[("host", "x")],
        b"",
    ))
    .await;
    let r = within(STEP, "chunked", raw.read_response(false)).await;
    assert_eq!(r.framing, Framing::Chunked);
    assert_eq!(r.body, pattern(0, 10));

    // Keep-alive: many requests, one connection.
    let before = up.accepted_connections();
    let mut c = Client::connect(up.addr, Proto::H1).await;
    for _ in 0..20 {
        assert_eq!(c.get("/ok").await.status, 200);
    }
    assert_eq!(up.accepted_connections() - before, 1);
}

#[tokio::test]
async fn upstream_reset_and_idle_timeout() {
    let up = TestUpstream::start_with(UpstreamOptions {
        proto: UpstreamProto::Auto,
        idle_timeout: Some(Duration::from_millis(500)),
        ..Default::default()
    })
    .await;
    let mut c = Client::connect(up.addr, Proto::H1).await;
    let r = c
        .send(c.req("GET", "/reset?when=headers").body(empty()).unwrap())
        .await;
    assert!(r.is_err(), "h1 reset before headers must fail the request");
    let mut c = Client::connect(up.addr, Proto::H2).await;
    let r = c
        .send(c.req("GET", "/reset?when=headers").body(empty()).unwrap())
        .await;
    assert!(r.is_err(), "h2 reset before headers must fail the stream");
    let resp = c
        .send(c.req("GET", "/reset?when=body").body(empty()).unwrap())
        .await
        .unwrap();
    assert!(within(STEP, "body", collect(resp)).await.is_err());

    // (hyper's header-read timeout acts as the keep-alive idle limit after a first request)
    let mut c = Client::connect(up.addr, Proto::H1).await;
    assert_eq!(c.get("/ok").await.status, 200);
    assert!(
        eventually(Duration::from_secs(3), || c.is_closed()).await,
        "idle connection should be closed by the upstream"
    );
    let _ = full("x");
}

#[tokio::test]
async fn raw_upstream_serves_canned_bytes() {
    let up = RawUpstream::start(|_req| {
        RawReply::bytes(
            "HTTP/1.1 200 OK\r\ntrailer: grpc-status\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\ngrpc-status: 0\r\n\r\n",
        )
    })
    .await;
    let mut raw = RawConn::connect(up.addr).await;
    raw.send(&request_bytes(
        "POST /x HTTP/1.1",
        &[("host", "h"), ("content-length", "3")],
        b"xyz",
    ))
    .await;
    let r = within(STEP, "raw", raw.read_response(false)).await;
    assert_eq!(r.body, b"abc");
    assert_eq!(r.trailers, vec![("grpc-status".into(), "0".into())]);
    let reqs = up.requests();
    assert_eq!(reqs[0].body, b"xyz");
    assert_eq!(reqs[0].head.target(), "/x");
}
