//! Message translation at its edges: response framing with both `Transfer-Encoding` and
//! `Content-Length`, request bodies on GET and HEAD, the `Host` grammar and `forwarded` quoting,
//! the HTTP/2 upstream pool under `--preserve-host`, and HTTP/1.1 connections that asked for an
//! upgrade the upstream refused. Each test fails when its translation is wrong.
#![allow(clippy::unwrap_used)]

use scoretap_tests::raw::{chunk, request_bytes};
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

