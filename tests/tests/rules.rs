//! One or more tests per proxy correctness rule of README §5 (rules 1–8 and 10; rule 9 lives in
//! errors.rs). Each test fails when its rule is broken.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use http::{HeaderMap, Request, Version};
use http_body_util::BodyExt;
use scoretap_tests::client::{channel_body, empty, full};
use scoretap_tests::harness::{client_to, curl, listener_tls_args, proxy_for};
use scoretap_tests::raw::{chunk, request_bytes, Framing};
use scoretap_tests::upstream::BodyOutcome;
use scoretap_tests::util::{eventually, pattern};
use scoretap_tests::*;

const HOP_REQUEST_HEADERS: [&str; 8] = [
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "upgrade",
    "transfer-encoding",
    "x-custom-hop",
    "x-other-hop",
];

/// A `connection` header the proxy itself adds for its own hop may only say keep-alive/close.
fn assert_connection_header_clean(what: &str, values: &[String]) {
    for v in values {
        for t in v.split(',').map(|t| t.trim().to_ascii_lowercase()) {
            assert!(
                t.is_empty() || t == "keep-alive" || t == "close",
                "{what}: `connection: {v}` forwarded (token {t:?} is the client's hop-by-hop list)"
            );
        }
    }
}

fn hop_request(path: &str) -> Vec<u8> {
    request_bytes(
        &format!("GET {path} HTTP/1.1"),
        &[
            ("Host", "app.example"),
            ("Connection", "keep-alive, X-Custom-Hop"),
            ("Connection", "x-other-hop"),
            ("X-Custom-Hop", "secret"),
            ("X-Other-Hop", "2"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Connection", "keep-alive"),
            ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
            ("TE", "gzip"),
            ("Trailer", "x-foo"),
            ("Upgrade", "foo/1"),
            ("X-End-To-End", "kept"),
        ],
        b"",
    )
}

// ---------------------------------------------------------------- rule 1: hop-by-hop headers

#[tokio::test]
async fn rule1_hop_by_hop_request_headers_removed() {
    for proto in [UpstreamProto::H1, UpstreamProto::H2] {
        let up = TestUpstream::start_proto(proto).await;
        let proxy = proxy_for(&up, &[]).await;
        let mut raw = RawConn::connect(proxy.addr).await;
        raw.send(&hop_request("/headers?t=rule1")).await;
        let r = within(STEP, "response", raw.read_response(false)).await;
        assert_eq!(r.status(), 200, "{proto:?}: {}", r.body_str());
        let rec = up.wait_path("t=rule1").await;
        let leaked: Vec<String> = HOP_REQUEST_HEADERS
            .iter()
            .filter(|h| rec.has(h))
            .map(|h| format!("{h}: {}", rec.header(h).unwrap_or_default()))
            .collect();
        assert!(
            leaked.is_empty(),
            "upstream {proto:?} received hop-by-hop request headers {leaked:?}"
        );
        assert_connection_header_clean(
            &format!("upstream {proto:?}"),
            &rec.header_all("connection"),
        );
        assert_eq!(
            rec.header("x-end-to-end").as_deref(),
            Some("kept"),
            "end-to-end header must be forwarded"
        );
    }
}

#[tokio::test]
async fn rule1_te_never_forwarded_verbatim() {
    // The client's TE is hop-by-hop. Toward HTTP/2 only `te: trailers` may exist (RFC 9113
    // §8.2.2) and it must, since the client accepts trailers. Toward HTTP/1.1 the proxy may
    // announce its *own* trailer support (`te: trailers` + `connection: te`, RFC 9110 §10.1.4)
    // but never pass the client's value through.
    for proto in [UpstreamProto::H1, UpstreamProto::H2] {
        let up = TestUpstream::start_proto(proto).await;
        let proxy = proxy_for(&up, &[]).await;
        for (i, te) in ["trailers", "gzip, trailers;q=1", "gzip"]
            .iter()
            .enumerate()
        {
            let mut raw = RawConn::connect(proxy.addr).await;
            raw.send(&request_bytes(
                &format!("GET /headers?t=te{i} HTTP/1.1"),
                &[("Host", "app.example"), ("TE", te)],
                b"",
            ))
            .await;
            let r = within(STEP, "response", raw.read_response(false)).await;
            assert_eq!(r.status(), 200);
            let rec = up.wait_path(&format!("t=te{i}")).await;
            let got = rec.header_all("te");
            let accepts_trailers = te.contains("trailers");
            match proto {
                UpstreamProto::H2 if accepts_trailers => assert_eq!(
                    got,
                    vec!["trailers".to_string()],
                    "client TE {te:?}: HTTP/2 upstream must get exactly `te: trailers`"
                ),
                UpstreamProto::H2 => {
                    assert!(got.is_empty(), "client TE {te:?} → h2 upstream got {got:?}")
                }
                _ => {
                    assert!(
                        got.is_empty() || got == vec!["trailers".to_string()],
                        "client TE {te:?} forwarded to the HTTP/1.1 upstream as {got:?}"
                    );
                    if !got.is_empty() {
                        assert!(
                            accepts_trailers,
                            "te: trailers invented for client TE {te:?}"
                        );
                        let conn = rec.header_all("connection").join(",").to_ascii_lowercase();
                        assert!(
                            conn.split(',').any(|t| t.trim() == "te"),
                            "`te` sent to an HTTP/1.1 upstream without `connection: te`: {conn:?}"
                        );
                    }
                }
            }
        }
    }
}

#[tokio::test]
async fn rule1_trailer_field_is_end_to_end() {
    // the proxy rules' first one lists `trailer` with the hop-by-hop fields (RFC 2616 §13.5.1);
    // RFC 9110 §6.6.2 made it end-to-end, and an HTTP/1.1 recipient needs it to accept the
    // trailer fields it announces (hyper sends only announced trailers). scoretap follows
    // RFC 9110: the field crosses the proxy both ways, unchanged.
    let up = RawUpstream::start(|_| hop_response()).await;
    let proxy = Scoretap::start(&up.url(), &[]).await;
    let mut raw = RawConn::connect(proxy.addr).await;
    raw.send(&request_bytes(
        "GET /trailer-field HTTP/1.1",
        &[("Host", "app.example"), ("Trailer", "x-foo")],
        b"",
    ))
    .await;
    let r = within(STEP, "response", raw.read_response(false)).await;
    assert_eq!(r.status(), 200);
    let reqs = up.wait_requests(1, STEP).await;
    assert_eq!(
        reqs[0].head.header("trailer"),
        Some("x-foo"),
        "the upstream must receive the client's `trailer` field"
    );
    assert_eq!(
        r.header("trailer"),
        Some("x-never"),
        "the client must receive the upstream's `trailer` field"
    );
}

/// Raw upstream answer full of hop-by-hop response headers.
fn hop_response() -> RawReply {
    RawReply::bytes(
        "HTTP/1.1 200 OK\r\n\
         Connection: x-resp-hop, keep-alive\r\n\
         X-Resp-Hop: 1\r\n\
         Keep-Alive: timeout=5, max=100\r\n\
         Proxy-Authenticate: Basic realm=\"x\"\r\n\
         Proxy-Connection: keep-alive\r\n\
         Upgrade: foo/1\r\n\
         Trailer: x-never\r\n\
         X-End-To-End: yes\r\n\
         Content-Length: 3\r\n\r\nhop",
    )
}

const HOP_RESPONSE_HEADERS: [&str; 5] = [
    "x-resp-hop",
    "keep-alive",
    "proxy-authenticate",
    "proxy-connection",
    "upgrade",
];

#[tokio::test]
async fn rule1_hop_by_hop_response_headers_removed() {
    let up = RawUpstream::start(|_| hop_response()).await;
    let proxy = Scoretap::start(&up.url(), &[]).await;
    let mut raw = RawConn::connect(proxy.addr).await;
    raw.send(&request_bytes(
        "GET /hop HTTP/1.1",
        &[("Host", "app.example")],
        b"",
    ))
    .await;
    let r = within(STEP, "response", raw.read_response(false)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.body, b"hop");
    let leaked: Vec<String> = HOP_RESPONSE_HEADERS
        .iter()
        .filter(|h| r.head.has(h))
        .map(|h| format!("{h}: {}", r.header(h).unwrap_or_default()))
        .collect();
    assert!(
        leaked.is_empty(),
        "client received hop-by-hop response headers {leaked:?}"
    );
    let conn: Vec<String> = r
        .head
        .header_all("connection")
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_connection_header_clean("response to client", &conn);
    assert_eq!(r.header("x-end-to-end"), Some("yes"));
}

// ---------------------------------------------------------------- rule 2: HTTP/2 translation

#[tokio::test]
async fn rule2_h1_upstream_hop_headers_never_reach_h2_client() {
    let up = RawUpstream::start(|_| hop_response()).await;
    let proxy = Scoretap::start(&up.url(), &[]).await;
    let mut c = Client::connect(proxy.addr, Proto::H2).await;
    let r = c.get("/hop").await;
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[..], b"hop");
    let leaked: Vec<String> = HOP_RESPONSE_HEADERS
        .iter()
        .chain(["connection"].iter())
        .filter_map(|h| r.header(h).map(|v| format!("{h}: {v}")))
        .collect();
    assert!(
        leaked.is_empty(),
        "h2 client received connection-specific headers {leaked:?}"
    );
    assert_eq!(r.header("x-end-to-end").as_deref(), Some("yes"));
}

#[tokio::test]
async fn rule2_h1_client_with_connection_headers_to_h2_upstream() {
    // A chunked HTTP/1.1 request full of connection-specific fields must become a valid HTTP/2
    // request (an h2 server rejects connection-specific fields).
    let up = TestUpstream::start_proto(UpstreamProto::H2).await;
    let proxy = proxy_for(&up, &[]).await;
    let mut raw = RawConn::connect(proxy.addr).await;
    let mut req = request_bytes(
        "POST /echo?t=r2 HTTP/1.1",
        &[
            ("Host", "app.example"),
            ("Connection", "keep-alive, x-custom-hop"),
            ("X-Custom-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Transfer-Encoding", "chunked"),
        ],
        b"",
    );
    req.extend(chunk(b"hello "));
    req.extend(chunk(b"world"));
    req.extend(b"0\r\n\r\n");
    raw.send(&req).await;
    let r = within(STEP, "response", raw.read_response(false)).await;
    assert_eq!(r.status(), 200, "{}", r.body_str());
    assert_eq!(r.body, b"hello world");
    let rec = up.wait_path("t=r2").await;
    assert_eq!(rec.version, Version::HTTP_2);
    for h in [
        "connection",
        "keep-alive",
        "transfer-encoding",
        "x-custom-hop",
    ] {
        assert!(!rec.has(h), "h2 upstream received `{h}`");
    }
}

async fn authority_case(preserve: bool) {
    let up = TestUpstream::start_proto(UpstreamProto::H2).await;
    let extra: &[&str] = if preserve { &["--preserve-host"] } else { &[] };
    let proxy = proxy_for(&up, extra).await;
    let mut raw = RawConn::connect(proxy.addr).await;
    raw.send(&request_bytes(
        "GET /headers?t=auth HTTP/1.1",
        &[("Host", "app.example:8080")],
        b"",
    ))
    .await;
    let r = within(STEP, "response", raw.read_response(false)).await;
    assert_eq!(r.status(), 200);
    let rec = up.wait_path("t=auth").await;
    let want = if preserve {
        "app.example:8080".to_string()
    } else {
        up.authority()
    };
    assert_eq!(
        rec.authority().as_deref(),
        Some(want.as_str()),
        "preserve_host={preserve}: :authority toward the h2 upstream"
    );
    let hosts = rec.header_all("host");
    assert!(
        hosts.is_empty() || hosts == vec![want.clone()],
        "preserve_host={preserve}: host header {hosts:?} disagrees with :authority {want}"
    );
    if !preserve {
        assert_eq!(
            rec.header("x-forwarded-host").as_deref(),
            Some("app.example:8080"),
            "original host goes to x-forwarded-host"
        );
    }
}

#[tokio::test]
async fn rule2_host_and_authority_consistent_h1_to_h2() {
    authority_case(false).await;
}

#[tokio::test]
async fn rule2_preserve_host_sets_h2_authority() {
    // --preserve-host forwards the client's Host; toward HTTP/2 that is `:authority`.
    authority_case(true).await;
}

#[tokio::test]
async fn rule2_authority_becomes_host_h2_to_h1() {
    for preserve in [false, true] {
        let up = TestUpstream::start_proto(UpstreamProto::H1).await;
        let extra: &[&str] = if preserve { &["--preserve-host"] } else { &[] };
        let proxy = proxy_for(&up, extra).await;
        let mut c = Client::connect(proxy.addr, Proto::H2).await;
        let req = Request::builder()
            .method("GET")
            .uri("http://app.example:8443/headers?t=h2h1")
            .version(Version::HTTP_2)
            .body(empty())
            .unwrap();
        let r = c.fetch(req, STEP).await;
        assert_eq!(r.status, 200);
        let rec = up.wait_path("t=h2h1").await;
        let want = if preserve {
            "app.example:8443".to_string()
        } else {
            up.authority()
        };
        assert_eq!(
            rec.header_all("host"),
            vec![want.clone()],
            "preserve_host={preserve}: exactly one Host toward the h1 upstream"
        );
        assert_eq!(rec.version, Version::HTTP_11);
        if !preserve {
            assert_eq!(
                rec.header("x-forwarded-host").as_deref(),
                Some("app.example:8443")
            );
        }
    }
}

// ---------------------------------------------------------------- rule 3: forwarding headers

async fn forwarded_case(
    extra: &[&str],
    headers: &[(&str, &str)],
) -> std::sync::Arc<upstream::Recorded> {
    let up = TestUpstream::start().await;
    let proxy = proxy_for(&up, extra).await;
    let mut h = vec![("Host", "app.example")];
    h.extend_from_slice(headers);
    let mut raw = RawConn::connect(proxy.addr).await;
    raw.send(&request_bytes("GET /headers?t=fwd HTTP/1.1", &h, b""))
        .await;
    let r = within(STEP, "response", raw.read_response(false)).await;
    assert_eq!(r.status(), 200);
    up.wait_path("t=fwd").await
}

const SPOOFED: [(&str, &str); 3] = [
    ("X-Forwarded-For", "203.0.113.9"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "evil.example"),
];

#[tokio::test]
async fn rule3_untrusted_forwarded_chain_replaced() {
    let rec = forwarded_case(&[], &SPOOFED).await;
    assert_eq!(
        rec.header_all("x-forwarded-for"),
        vec!["127.0.0.1".to_string()],
        "from an untrusted peer x-forwarded-for must be replaced by the peer address"
    );
    assert_eq!(
        rec.header_all("x-forwarded-proto"),
        vec!["http".to_string()]
    );
    assert_eq!(
        rec.header_all("x-forwarded-host"),
        vec!["app.example".to_string()]
    );
}

#[tokio::test]
async fn rule3_trusted_forwarded_chain_appended() {
    let rec = forwarded_case(&["--trusted-proxies", "127.0.0.1/32"], &SPOOFED).await;
    let xff = rec.header_all("x-forwarded-for").join(", ");
    assert_eq!(
        xff, "203.0.113.9, 127.0.0.1",
        "from a trusted peer the peer address is appended to the chain"
    );
}

#[tokio::test]
async fn rule3_trusted_proxies_other_network_not_trusted() {
    let rec = forwarded_case(
        &["--trusted-proxies", "10.0.0.0/8,192.168.0.0/16"],
        &SPOOFED,
    )
    .await;
    assert_eq!(
        rec.header_all("x-forwarded-for"),
        vec!["127.0.0.1".to_string()]
    );
}

#[tokio::test]
async fn rule3_forwarded_header_mode() {
    let rec = forwarded_case(
        &["--forwarded", "forwarded"],
        &[("Forwarded", "for=198.51.100.1;proto=https")],
    )
    .await;
    let fwd = rec.header_all("forwarded").join(", ");
    assert!(
        fwd.contains("for=127.0.0.1") || fwd.contains("for=\"127.0.0.1\""),
        "forwarded header should name the peer: {fwd:?}"
    );
    assert!(
        fwd.contains("proto=http"),
        "forwarded header should carry proto: {fwd:?}"
    );
    assert!(
        !fwd.contains("198.51.100.1"),
        "untrusted incoming forwarded chain must not survive: {fwd:?}"
    );
    assert!(!fwd.contains("proto=https"), "{fwd:?}");
}

#[tokio::test]
async fn rule3_forwarded_none_adds_nothing() {
    let rec = forwarded_case(&["--forwarded", "none"], &[]).await;
    for h in ["x-forwarded-for", "forwarded"] {
        assert!(
            !rec.header_all(h).iter().any(|v| v.contains("127.0.0.1")),
            "--forwarded none must not add {h}: {:?}",
            rec.header_all(h)
        );
    }
}

#[tokio::test]
async fn rule3_x_forwarded_proto_https_on_tls_listener() {
    let pki = Pki::new();
    let up = TestUpstream::start().await;
    let extra = listener_tls_args(&pki);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let proxy = proxy_for(&up, &extra).await;
    for proto in [Proto::H1, Proto::H2] {
        let mut c = client_to(&proxy, proto, Some(&pki)).await;
        let path = format!("/headers?t=xfp-{proto:?}");
        assert_eq!(c.get(&path).await.status, 200);
        let rec = up.wait_path(&path).await;
        assert_eq!(
            rec.header_all("x-forwarded-proto"),
            vec!["https".to_string()]
        );
        assert_eq!(
            rec.header_all("x-forwarded-for"),
            vec!["127.0.0.1".to_string()]
        );
    }
}

#[tokio::test]
async fn rule3_via_only_when_configured() {
    // Off by default.
    let up = TestUpstream::start().await;
    let proxy = proxy_for(&up, &[]).await;
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    let r = c.get("/headers?t=novia").await;
    assert!(r.header("via").is_none(), "via added without --via");
    assert!(!up.wait_path("t=novia").await.has("via"));
    drop(proxy);

    let proxy = proxy_for(&up, &["--via", "edge-test"]).await;
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    let req = c
        .req("GET", "/headers?t=via1")
        .header("via", "1.0 fred")
        .body(empty())
        .unwrap();
    let r = c.fetch(req, STEP).await;
    let rec = up.wait_path("t=via1").await;
    assert_eq!(
        rec.header_all("via").join(", "),
        "1.0 fred, 1.1 edge-test",
        "via must be appended to the request's chain"
    );
    let resp_via = r.header("via").unwrap_or_default();
    assert!(
        resp_via.contains("1.1 edge-test"),
        "response via: {resp_via:?}"
    );

    let mut c = Client::connect(proxy.addr, Proto::H2).await;
    let r = c.get("/headers?t=via2").await;
    let rec = up.wait_path("t=via2").await;
    assert_eq!(
        rec.header_all("via"),
        vec!["2 edge-test".to_string()],
        "request received over HTTP/2 → `via: 2 NAME`"
    );
    assert!(r.header("via").is_some_and(|v| v.contains("edge-test")));
}

// ---------------------------------------------------------------- rule 4: upgrades

fn ws_request(path: &str) -> Vec<u8> {
    request_bytes(
        &format!("GET {path} HTTP/1.1"),
        &[
            ("Host", "app.example"),
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
        ],
        b"",
    )
}

#[tokio::test]
async fn rule4_websocket_upgrade_copies_bytes_both_ways() {
    let up = TestUpstream::start_proto(UpstreamProto::H1).await;
    let proxy = proxy_for(&up, &[]).await;
    let mut raw = RawConn::connect(proxy.addr).await;
    raw.send(&ws_request("/upgrade?t=ws")).await;
    let r = within(STEP, "101", raw.read_response(false)).await;
    assert_eq!(
        r.status(),
        101,
        "upgrade accepted upstream must give 101: {:?}",
        r.head
    );
    assert!(
        r.header("upgrade")
            .is_some_and(|u| u.eq_ignore_ascii_case("websocket")),
        "101 must carry upgrade: websocket"
    );
    assert!(
        r.head.connection_tokens().contains(&"upgrade".to_string()),
        "101 must carry connection: upgrade"
    );
    let rec = up.wait_path("t=ws").await;
    assert_eq!(rec.header("upgrade").as_deref(), Some("websocket"));
    assert!(rec
        .header("connection")
        .is_some_and(|c| c.to_ascii_lowercase().contains("upgrade")));
    assert!(rec.has("sec-websocket-key"));

    for msg in [b"hello".to_vec(), pattern(0, 256 * 1024), b"bye".to_vec()] {
        within(STEP, "upgraded send", raw.send(&msg)).await;
        let got = within(STEP, "upgraded echo", raw.read_exact(msg.len())).await;
        assert_eq!(got.len(), msg.len(), "upgraded stream truncated");
        assert!(got == msg, "upgraded bytes differ");
    }
    // Client closes its side: the upstream tunnel closes and the proxy closes ours.
    raw.shutdown_write().await;
    assert!(
        raw.closed_within(Duration::from_secs(5)).await,
        "tunnel not closed after client EOF"
    );
}

#[tokio::test]
async fn rule4_no_101_when_upstream_refuses() {
    let up = TestUpstream::start_proto(UpstreamProto::H1).await;
    let proxy = proxy_for(&up, &[]).await;
    let mut raw = RawConn::connect(proxy.addr).await;
    raw.send(&ws_request("/upgrade?refuse=1")).await;
    let r = within(STEP, "response", raw.read_response(false)).await;
    assert_eq!(
        r.status(),
        200,
        "upstream refused the upgrade; got {:?}",
        r.head
    );
    assert_eq!(r.body, b"upgrade refused");
    assert!(!r.head.has("upgrade"));
}

// ---------------------------------------------------------------- rule 5: Expect: 100-continue

#[tokio::test]
async fn rule5_expect_100_continue_without_buffering() {
    for proto in [UpstreamProto::H1, UpstreamProto::H2] {
        let up = TestUpstream::start_proto(proto).await;
        let proxy = proxy_for(&up, &[]).await;
        let mut raw = RawConn::connect(proxy.addr).await;
        raw.send(&request_bytes(
            "POST /echo?t=expect HTTP/1.1",
            &[
                ("Host", "app.example"),
                ("Content-Length", "11"),
                ("Expect", "100-continue"),
            ],
            b"",
        ))
        .await;
        // The request reaches the upstream before the client sent any body byte.
        let rec = up.wait_path("t=expect").await;
        assert_eq!(rec.state().body_bytes, 0);
        // The client is told to continue.
        let head = within(STEP, "100 Continue", raw.read_head())
            .await
            .expect("a head");
        assert_eq!(
            head.status(),
            100,
            "{proto:?}: expected 100 Continue, got {head:?}"
        );
        raw.send(b"hello world").await;
        let r = within(STEP, "final response", raw.read_response(false)).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.body, b"hello world");
        assert_eq!(rec.state().body_outcome, BodyOutcome::Complete);
    }
}

#[tokio::test]
async fn rule5_expect_rejected_by_upstream_without_body() {
    let up = TestUpstream::start_proto(UpstreamProto::H1).await;
    let proxy = proxy_for(&up, &[]).await;
    let mut raw = RawConn::connect(proxy.addr).await;
    raw.send(&request_bytes(
        "POST /expect-reject HTTP/1.1",
        &[
            ("Host", "app.example"),
            ("Content-Length", "1000000"),
            ("Expect", "100-continue"),
        ],
        b"",
    ))
    .await;
    // The final answer arrives although the body was never sent.
    let r = within(STEP, "401 without body", raw.read_response(false)).await;
    assert_eq!(r.status(), 401);
    assert_eq!(r.body, b"denied");
}

// ---------------------------------------------------------------- rule 6: trailers

#[tokio::test]
async fn rule6_grpc_trailers_h2_end_to_end() {
    let pki = Pki::new();
    for tls in [false, true] {
        let up = if tls {
            TestUpstream::start_tls(UpstreamProto::H2, pki.clone()).await
        } else {
            TestUpstream::start_proto(UpstreamProto::H2).await
        };
        let extra = if tls { listener_tls_args(&pki) } else { vec![] };
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let proxy = proxy_for(&up, &extra).await;
        let mut c = client_to(&proxy, Proto::H2, tls.then_some(&pki)).await;
        // Request trailers go up, response trailers come down.
        let (tx, body) = channel_body();
        let req = c
            .req("POST", "/trailers?t=grpc")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body)
            .unwrap();
        let send = tokio::spawn(async move {
            tx.data(&b"\0\0\0\0\x03abc"[..]).await;
            let mut t = HeaderMap::new();
            t.insert("x-req-trailer", "sent".parse().unwrap());
            tx.trailers(t).await;
        });
        let r = c.fetch(req, STEP).await;
        send.await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "trailer-body");
        assert_eq!(
            r.trailer("grpc-status").as_deref(),
            Some("0"),
            "tls={tls}: grpc-status trailer lost"
        );
        assert_eq!(r.trailer("grpc-message").as_deref(), Some("all-good"));
        let rec = up.wait_path("t=grpc").await;
        assert_eq!(rec.header("te").as_deref(), Some("trailers"));
        let st = rec.state();
        assert_eq!(
            st.request_trailers
                .as_ref()
                .and_then(|t| t.get("x-req-trailer"))
                .map(|v| v.to_str().unwrap().to_string())
                .as_deref(),
            Some("sent"),
            "tls={tls}: request trailers lost"
        );
    }
}

fn chunked_trailer_reply() -> RawReply {
    RawReply::bytes(
        "HTTP/1.1 200 OK\r\n\
         Content-Type: application/grpc\r\n\
         Trailer: grpc-status\r\n\
         Transfer-Encoding: chunked\r\n\r\n\
         5\r\nhello\r\n0\r\ngrpc-status: 0\r\n\r\n",
    )
}

#[tokio::test]
async fn rule6_chunked_h1_trailers_pass_through() {
    let up = RawUpstream::start(|_| chunked_trailer_reply()).await;
    let proxy = Scoretap::start(&up.url(), &[]).await;
    let mut raw = RawConn::connect(proxy.addr).await;
    raw.send(&request_bytes(
        "GET /t HTTP/1.1",
        &[("Host", "app.example"), ("TE", "trailers")],
        b"",
    ))
    .await;
    let r = within(STEP, "response", raw.read_response(false)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.framing, Framing::Chunked);
    assert_eq!(r.body, b"hello");
    assert_eq!(
        r.trailers,
        vec![("grpc-status".to_string(), "0".to_string())],
        "chunked trailers must reach an HTTP/1.1 client that sent te: trailers"
    );
}

#[tokio::test]
async fn rule6_h1_upstream_trailers_reach_h2_client() {
    let up = RawUpstream::start(|_| chunked_trailer_reply()).await;
    let proxy = Scoretap::start(&up.url(), &[]).await;
    let mut c = Client::connect(proxy.addr, Proto::H2).await;
    let req = c
        .req("GET", "/t")
        .header("te", "trailers")
        .body(empty())
        .unwrap();
    let r = c.fetch(req, STEP).await;
    assert_eq!(&r.body[..], b"hello");
    assert_eq!(r.trailer("grpc-status").as_deref(), Some("0"));
}

// ---------------------------------------------------------------- rule 7: framing

#[tokio::test]
async fn rule7_head_204_304_content_length_zero_framing() {
    for proto in [UpstreamProto::H1, UpstreamProto::H2] {
        let up = TestUpstream::start_proto(proto).await;
        let proxy = proxy_for(&up, &[]).await;
        // All on one keep-alive connection: a stray body byte would corrupt the next response.
        let mut raw = RawConn::connect(proxy.addr).await;
        let req = |m: &str, p: &str| {
            request_bytes(
                &format!("{m} {p} HTTP/1.1"),
                &[("Host", "app.example")],
                b"",
            )
        };

        raw.send(&req("HEAD", "/head")).await;
        let r = within(STEP, "HEAD", raw.read_response(true)).await;
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.header("content-length"),
            Some("1234"),
            "{proto:?}: HEAD keeps content-length"
        );
        assert!(
            !r.head.has("transfer-encoding"),
            "{proto:?}: HEAD got transfer-encoding"
        );

        raw.send(&req("GET", "/status/204")).await;
        let r = within(STEP, "204", raw.read_response(false)).await;
        assert_eq!(r.status(), 204);
        assert!(
            !r.head.has("transfer-encoding"),
            "{proto:?}: 204 got transfer-encoding"
        );
        assert!(
            r.header("content-length").is_none_or(|v| v == "0"),
            "{proto:?}: 204 with content-length {:?}",
            r.header("content-length")
        );

        raw.send(&req("GET", "/status/304")).await;
        let r = within(STEP, "304", raw.read_response(false)).await;
        assert_eq!(r.status(), 304);
        assert!(
            !r.head.has("transfer-encoding"),
            "{proto:?}: 304 got transfer-encoding"
        );
        assert_eq!(r.header("etag"), Some("\"v1\""));

        raw.send(&req("GET", "/status/200?empty=1")).await;
        let r = within(STEP, "cl0", raw.read_response(false)).await;
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.header("content-length"),
            Some("0"),
            "{proto:?}: content-length: 0 must be kept"
        );
        assert!(
            !r.head.has("transfer-encoding"),
            "{proto:?}: cl:0 got transfer-encoding"
        );

        raw.send(&req("GET", "/bytes?size=100000")).await;
        let r = within(STEP, "fixed", raw.read_response(false)).await;
        assert_eq!(
            r.framing,
            Framing::Length(100_000),
            "{proto:?}: length-delimited response re-framed"
        );
        assert!(!r.head.has("transfer-encoding"));
        assert_eq!(r.body, pattern(0, 100_000));

        // And the connection is still in sync.
        raw.send(&req("GET", "/ok")).await;
        let r = within(STEP, "after", raw.read_response(false)).await;
        assert_eq!((r.status(), r.body.as_slice()), (200, &b"ok"[..]));
    }
}

#[tokio::test]
async fn rule7_request_framing_preserved_upstream() {
    let up =
        RawUpstream::start(|_| RawReply::bytes("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
            .await;
    let proxy = Scoretap::start(&up.url(), &[]).await;
    let mut raw = RawConn::connect(proxy.addr).await;
    raw.send(&request_bytes(
        "POST /a HTTP/1.1",
        &[("Host", "h"), ("Content-Length", "5")],
        b"12345",
    ))
    .await;
    assert_eq!(
        within(STEP, "a", raw.read_response(false)).await.status(),
        200
    );
    raw.send(&request_bytes(
        "POST /b HTTP/1.1",
        &[("Host", "h"), ("Content-Length", "0")],
        b"",
    ))
    .await;
    assert_eq!(
        within(STEP, "b", raw.read_response(false)).await.status(),
        200
    );
    raw.send(&request_bytes("GET /c HTTP/1.1", &[("Host", "h")], b""))
        .await;
    assert_eq!(
        within(STEP, "c", raw.read_response(false)).await.status(),
        200
    );

    let reqs = up.wait_requests(3, STEP).await;
    let a = &reqs[0];
    assert_eq!(
        a.framing,
        Framing::Length(5),
        "content-length request re-framed: {:?}",
        a.head
    );
    assert_eq!(a.body, b"12345");
    let b = &reqs[1];
    assert!(
        !b.head.has("transfer-encoding"),
        "cl:0 request became chunked: {:?}",
        b.head
    );
    assert_eq!(
        b.head.header("content-length"),
        Some("0"),
        "content-length: 0 must be kept"
    );
    let c = &reqs[2];
    assert!(
        !c.head.has("transfer-encoding"),
        "bodyless GET got transfer-encoding: {:?}",
        c.head
    );
    assert!(c.head.header("content-length").is_none_or(|v| v == "0"));
}

async fn sse_streaming_case(client: Proto, upstream: UpstreamProto) {
    let up = TestUpstream::start_proto(upstream).await;
    let proxy = proxy_for(&up, &[]).await;
    let gate_name = format!("g-{client:?}-{upstream:?}");
    let gate = up.gate(&gate_name);
    let path = format!("/sse?events=3&gate={gate_name}");
    let label = format!("client {client:?} upstream {upstream:?}");
    match client {
        Proto::H1 => {
            let mut raw = RawConn::connect(proxy.addr).await;
            raw.send(&request_bytes(
                &format!("GET {path} HTTP/1.1"),
                &[("Host", "h")],
                b"",
            ))
            .await;
            gate.add_permits(1);
            let head = within(STEP, "sse head", raw.read_head()).await.unwrap();
            assert_eq!(head.status(), 200);
            assert!(!head.has("content-length"));
            for i in 0..3 {
                if i > 0 {
                    gate.add_permits(1);
                }
                let want = format!("id: {i}\ndata: event-{i}\n\n");
                // The event must arrive while the upstream has not produced the next one.
                let got = within(
                    Duration::from_secs(5),
                    &format!("{label}: event {i} streamed"),
                    async {
                        let mut acc = Vec::new();
                        while acc.len() < want.len() {
                            match raw.read_chunk().await {
                                Some(d) if !d.is_empty() => acc.extend(d),
                                other => panic!("{label}: stream ended early: {other:?}"),
                            }
                        }
                        acc
                    },
                )
                .await;
                assert_eq!(String::from_utf8_lossy(&got), want, "{label}");
            }
            assert_eq!(
                within(STEP, "last chunk", raw.read_chunk()).await,
                Some(vec![])
            );
        }
        Proto::H2 => {
            let mut c = Client::connect(proxy.addr, Proto::H2).await;
            gate.add_permits(1);
            let resp = c
                .send(c.req("GET", &path).body(empty()).unwrap())
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            let mut body = resp.into_body();
            for i in 0..3 {
                if i > 0 {
                    gate.add_permits(1);
                }
                let want = format!("id: {i}\ndata: event-{i}\n\n");
                let got = within(
                    Duration::from_secs(5),
                    &format!("{label}: event {i} streamed"),
                    async {
                        let mut acc = Vec::new();
                        while acc.len() < want.len() {
                            let f = body.frame().await.expect("frame").expect("frame ok");
                            if let Some(d) = f.data_ref() {
                                acc.extend_from_slice(d);
                            }
                        }
                        acc
                    },
                )
                .await;
                assert_eq!(String::from_utf8_lossy(&got), want, "{label}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule7_sse_streams_event_by_event() {
    for client in [Proto::H1, Proto::H2] {
        for upstream in [UpstreamProto::H1, UpstreamProto::H2] {
            sse_streaming_case(client, upstream).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule7_request_body_streams_to_upstream() {
    for client in [Proto::H1, Proto::H2] {
        for upstream in [UpstreamProto::H1, UpstreamProto::H2] {
            let up = TestUpstream::start_proto(upstream).await;
            let proxy = proxy_for(&up, &[]).await;
            let mut c = Client::connect(proxy.addr, client).await;
            let (tx, body) = channel_body();
            let tag = format!("/sink?t=stream-{client:?}-{upstream:?}");
            let req = c.req("POST", &tag).body(body).unwrap();
            let resp = tokio::spawn(async move { c.fetch(req, Duration::from_secs(20)).await });
            tx.data(vec![b'a'; 1000]).await;
            let rec = up.wait_path(&tag).await;
            assert!(
                eventually(Duration::from_secs(5), || rec.state().body_bytes == 1000).await,
                "client {client:?} upstream {upstream:?}: first piece did not reach the upstream \
                 before the body ended (request body buffered?)"
            );
            tx.data(vec![b'b'; 500]).await;
            drop(tx);
            let r = within(STEP, "sink", resp).await.unwrap();
            assert_eq!(r.json()["size"], 1500);
        }
    }
}

#[tokio::test]
async fn rule7_conflicting_length_headers_never_forwarded() {
    // Content-Length + Transfer-Encoding (request smuggling shape): reject with 400, or forward
    // a message with one consistent framing — never both headers.
    let up =
        RawUpstream::start(|_| RawReply::bytes("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
            .await;
    let proxy = Scoretap::start(&up.url(), &[]).await;
    let mut raw = RawConn::connect(proxy.addr).await;
    let mut req = request_bytes(
        "POST /smuggle HTTP/1.1",
        &[
            ("Host", "h"),
            ("Content-Length", "4"),
            ("Transfer-Encoding", "chunked"),
        ],
        b"",
    );
    req.extend(chunk(b"hello"));
    req.extend(b"0\r\n\r\n");
    raw.send(&req).await;
    let r = within(STEP, "response", raw.read_response(false)).await;
    assert!(
        r.status() == 400 || r.status() == 200,
        "unexpected {:?}",
        r.head
    );
    if r.status() == 200 {
        let reqs = up.wait_requests(1, STEP).await;
        let h = &reqs[0].head;
        assert!(
            !(h.has("content-length") && h.has("transfer-encoding")),
            "both content-length and transfer-encoding forwarded: {h:?}"
        );
        assert_eq!(
            reqs[0].body, b"hello",
            "chunked framing must win over content-length"
        );
    }
}

#[tokio::test]
async fn rule7_head_over_h2_client() {
    for proto in [UpstreamProto::H1, UpstreamProto::H2] {
        let up = TestUpstream::start_proto(proto).await;
        let proxy = proxy_for(&up, &[]).await;
        let mut c = Client::connect(proxy.addr, Proto::H2).await;
        let r = c
            .fetch(c.req("HEAD", "/head").body(empty()).unwrap(), STEP)
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("content-length").as_deref(),
            Some("1234"),
            "{proto:?}"
        );
        assert!(r.body.is_empty());
        let r = c.get("/status/204").await;
        assert_eq!(r.status, 204);
        assert!(r.body.is_empty());
    }
}

#[tokio::test]
async fn repeated_headers_and_request_target_forwarded_verbatim() {
    let up = RawUpstream::start(|_| {
        RawReply::bytes(
            "HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nX-Multi: one\r\nX-Multi: two\r\nContent-Length: 2\r\n\r\nok",
        )
    })
    .await;
    let proxy = Scoretap::start(&up.url(), &[]).await;
    let target = "/a%2Fb/./c/../d;p=1?x=%41&y=1+2&z=&w=%zz";
    let mut raw = RawConn::connect(proxy.addr).await;
    raw.send(&request_bytes(
        &format!("GET {target} HTTP/1.1"),
        &[
            ("Host", "h"),
            ("X-Multi", "first"),
            ("X-Multi", "second"),
            ("Accept", "a/b, c/d;q=0.5"),
        ],
        b"",
    ))
    .await;
    let r = within(STEP, "response", raw.read_response(false)).await;
    assert_eq!(r.status(), 200, "{}", r.body_str());
    assert_eq!(
        r.head.header_all("set-cookie"),
        vec!["a=1", "b=2"],
        "repeated response headers"
    );
    assert_eq!(r.head.header_all("x-multi"), vec!["one", "two"]);
    let reqs = up.wait_requests(1, STEP).await;
    let h = &reqs[0].head;
    assert_eq!(
        h.target(),
        target,
        "request target must not be normalised or re-encoded"
    );
    assert_eq!(
        h.header_all("x-multi"),
        vec!["first", "second"],
        "repeated request headers"
    );
    assert_eq!(h.header("accept"), Some("a/b, c/d;q=0.5"));
}

// ---------------------------------------------------------------- rule 8: HTTP/1.0, absolute-form, Host

#[tokio::test]
async fn rule8_http10_client_gets_correct_answers() {
    let up = TestUpstream::start().await;
    let proxy = proxy_for(&up, &[]).await;
    // Fixed length body, no Host header (allowed in HTTP/1.0).
    let mut raw = RawConn::connect(proxy.addr).await;
    raw.send(b"GET /bytes?size=100 HTTP/1.0\r\n\r\n").await;
    let r = within(STEP, "1.0", raw.read_response(false)).await;
    assert_eq!(r.status(), 200);
    assert!(r.head.version().starts_with("HTTP/1."), "{:?}", r.head);
    assert_ne!(
        r.framing,
        Framing::Chunked,
        "HTTP/1.0 client must not get chunked"
    );
    assert_eq!(r.body, pattern(0, 100));
    assert!(
        raw.closed_within(Duration::from_secs(5)).await,
        "HTTP/1.0 without keep-alive: close"
    );

    // Unknown-length (chunked upstream) body: must be close-delimited, never chunked.
    let mut raw = RawConn::connect(proxy.addr).await;
    raw.send(b"GET /bytes?size=5000&chunked=1 HTTP/1.0\r\nHost: app.example\r\n\r\n")
        .await;
    let r = within(STEP, "1.0 chunked upstream", raw.read_response(false)).await;
    assert_eq!(r.status(), 200);
    assert_ne!(
        r.framing,
        Framing::Chunked,
        "chunked sent to an HTTP/1.0 client"
    );
    assert!(!r.head.has("transfer-encoding"));
    assert_eq!(r.body, pattern(0, 5000));

    // curl --http1.0 too.
    let url = format!("{}/bytes?size=2000", proxy.url());
    let o = curl(&[
        "--http1.0",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_download}",
        &url,
    ])
    .await;
    assert_eq!(o.stdout_str(), "200 2000", "{}", o.stderr);
}

#[tokio::test]
async fn rule8_absolute_form_target() {
    let up = TestUpstream::start_proto(UpstreamProto::H1).await;
    let proxy = proxy_for(&up, &[]).await;
    let mut raw = RawConn::connect(proxy.addr).await;
    raw.send(&request_bytes(
        "GET http://app.example/headers?t=abs HTTP/1.1",
        &[("Host", "app.example")],
        b"",
    ))
    .await;
    let r = within(STEP, "absolute-form", raw.read_response(false)).await;
    assert_eq!(r.status(), 200, "{}", r.body_str());
    let rec = up.wait_path("t=abs").await;
    assert_eq!(rec.path_and_query(), "/headers?t=abs");
    assert!(
        rec.authority().is_none(),
        "upstream got an absolute-form target {}; expected origin-form",
        rec.uri
    );
    assert_eq!(rec.header_all("host"), vec![up.authority()]);
    assert_eq!(
        rec.header("x-forwarded-host").as_deref(),
        Some("app.example")
    );
}

#[tokio::test]
async fn rule8_absolute_form_authority_overrides_host() {
    // RFC 9112 §3.2.2: with an absolute-form target the Host header is ignored.
    let up = TestUpstream::start_proto(UpstreamProto::H1).await;
    let proxy = proxy_for(&up, &["--preserve-host"]).await;
    let mut raw = RawConn::connect(proxy.addr).await;
    raw.send(&request_bytes(
        "GET http://target.example/headers?t=abs2 HTTP/1.1",
        &[("Host", "other.example")],
        b"",
    ))
    .await;
    let r = within(STEP, "absolute-form", raw.read_response(false)).await;
    assert_eq!(r.status(), 200, "{}", r.body_str());
    let rec = up.wait_path("t=abs2").await;
    assert_eq!(rec.header_all("host"), vec!["target.example".to_string()]);
}

#[tokio::test]
async fn rule8_missing_or_duplicate_host_is_400() {
    let up = TestUpstream::start().await;
    let proxy = proxy_for(&up, &[]).await;
    let cases: [(&str, Vec<u8>); 2] = [
        (
            "missing Host",
            b"GET /ok?t=nohost HTTP/1.1\r\n\r\n".to_vec(),
        ),
        (
            "two Host headers",
            b"GET /ok?t=twohost HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n".to_vec(),
        ),
    ];
    for (what, req) in cases {
        let mut raw = RawConn::connect(proxy.addr).await;
        raw.send(&req).await;
        let r = within(STEP, what, raw.read_response(false)).await;
        assert_eq!(r.status(), 400, "{what}: expected 400, got {:?}", r.head);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        up.find(|r| r.path_and_query().contains("host")).is_none(),
        "a request without a valid Host must not reach the upstream"
    );
}

// ---------------------------------------------------------------- rule 10: pooling

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule10_upstream_connections_pooled_and_reused() {
    for proto in [UpstreamProto::H1, UpstreamProto::H2] {
        let up = TestUpstream::start_proto(proto).await;
        let proxy = proxy_for(&up, &[]).await;
        // 40 sequential requests, each on a fresh client connection.
        for i in 0..40 {
            let mut c = Client::connect(proxy.addr, Proto::H1).await;
            let r = c.get(&format!("/ok?i={i}")).await;
            assert_eq!(r.status, 200);
        }
        // And 40 on one client connection.
        let mut c = Client::connect(proxy.addr, Proto::H2).await;
        for i in 0..40 {
            assert_eq!(c.post(&format!("/echo?j={i}"), "x").await.status, 200);
        }
        let n = up.accepted_connections();
        assert!(
            n <= 3,
            "{proto:?}: 80 sequential requests opened {n} upstream connections (not pooled)"
        );
    }
}

#[tokio::test]
async fn rule10_idle_connections_evicted() {
    let up = TestUpstream::start_with(UpstreamOptions {
        proto: UpstreamProto::H1,
        idle_timeout: Some(Duration::from_secs(5)),
        ..Default::default()
    })
    .await;
    let proxy = proxy_for(&up, &["--pool-idle-timeout", "500ms"]).await;
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    assert_eq!(c.get("/ok").await.status, 200);
    assert!(up.open_connections() >= 1);
    let t = Instant::now();
    assert!(
        eventually(Duration::from_secs(3), || up.open_connections() == 0).await,
        "idle pooled connection not closed by the proxy within 3 s (--pool-idle-timeout 500ms)"
    );
    assert!(t.elapsed() < Duration::from_secs(3));
    assert_eq!(c.get("/ok").await.status, 200, "request after eviction");
}

#[tokio::test]
async fn rule10_connections_closed_by_upstream_are_not_reused() {
    // The upstream drops idle keep-alive connections after 300 ms; the proxy must never answer 502
    // because it picked a dead pooled connection.
    let up = TestUpstream::start_with(UpstreamOptions {
        proto: UpstreamProto::H1,
        idle_timeout: Some(Duration::from_millis(300)),
        ..Default::default()
    })
    .await;
    let proxy = proxy_for(&up, &[]).await;
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    for i in 0..4 {
        let r = c.get(&format!("/ok?stale={i}")).await;
        assert_eq!(
            r.status,
            200,
            "request {i} after upstream idle close: {}",
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    let _ = full("");
}
