//! Rule 9 and the error contract: cancellation propagates upstream, upstream failures become
//! 502/504 with a JSON body (never a hang), correlation ids.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use scoretap_tests::client::{channel_body, collect, empty};
use scoretap_tests::harness::{assert_error_contract, proxy_for};
use scoretap_tests::raw::request_bytes;
use scoretap_tests::upstream::BodyOutcome;
use scoretap_tests::util::{eventually, free_port, looks_like_uuid};
use scoretap_tests::*;

const CANCEL_LIMIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------- client cancellation

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule9_client_disconnect_cancels_stalled_upstream_request() {
    for client in [Proto::H1, Proto::H2] {
        for upstream in [UpstreamProto::H1, UpstreamProto::H2] {
            let up = TestUpstream::start_proto(upstream).await;
            let proxy = proxy_for(&up, &[]).await;
            let mut c = Client::connect(proxy.addr, client).await;
            let req = c.req("GET", "/stall?t=dc").body(empty()).unwrap();
            let pending = tokio::spawn(async move {
                let _ = c.send(req).await;
                drop(c);
            });
            let rec = up.wait_path("t=dc").await;
            pending.abort(); // drops the client connection
            assert!(
                eventually(CANCEL_LIMIT, || rec.state().handler_dropped).await,
                "client {client:?} → upstream {upstream:?}: upstream request not cancelled after client disconnect"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule9_client_disconnect_mid_response_cancels_upstream() {
    for client in [Proto::H1, Proto::H2] {
        for upstream in [UpstreamProto::H1, UpstreamProto::H2] {
            let up = TestUpstream::start_proto(upstream).await;
            let proxy = proxy_for(&up, &[]).await;
            let mut c = Client::connect(proxy.addr, client).await;
            let resp = c
                .send(
                    c.req("GET", "/slow-body?chunks=1000&gap_ms=50&t=mid")
                        .body(empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            let mut body = resp.into_body();
            let first = within(STEP, "first chunk", body.frame()).await;
            assert!(first.is_some_and(|f| f.is_ok()));
            let rec = up.wait_path("t=mid").await;
            drop(body);
            drop(c);
            assert!(
                eventually(CANCEL_LIMIT, || rec.state().response_dropped).await,
                "client {client:?} → upstream {upstream:?}: upstream kept streaming after the client left"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule9_client_abort_mid_upload_cancels_upstream() {
    for client in [Proto::H1, Proto::H2] {
        for upstream in [UpstreamProto::H1, UpstreamProto::H2] {
            let up = TestUpstream::start_proto(upstream).await;
            let proxy = proxy_for(&up, &[]).await;
            let mut c = Client::connect(proxy.addr, client).await;
            let (tx, body) = channel_body();
            let req = c
                .req("POST", "/sink?t=abort")
                .header("content-length", "1000000")
                .body(body)
                .unwrap();
            let pending = tokio::spawn(async move {
                let _ = c.send(req).await;
                drop(c);
            });
            tx.data(vec![7u8; 64 * 1024]).await;
            let rec = up.wait_path("t=abort").await;
            assert!(
                eventually(CANCEL_LIMIT, || rec.state().body_bytes > 0).await,
                "first body bytes never reached the upstream"
            );
            pending.abort();
            drop(tx);
            assert!(
                eventually(CANCEL_LIMIT, || rec.state().body_outcome == BodyOutcome::Error
                    || rec.state().handler_dropped)
                .await,
                "client {client:?} → upstream {upstream:?}: upstream did not see the aborted upload: {:?}",
                rec.state()
            );
            assert_ne!(
                rec.state().body_outcome,
                BodyOutcome::Complete,
                "truncated upload reported complete"
            );
        }
    }
}

#[tokio::test]
async fn rule9_h2_stream_reset_cancels_upstream_keeps_connection() {
    let up = TestUpstream::start_proto(UpstreamProto::H2).await;
    let proxy = proxy_for(&up, &[]).await;
    let mut c = Client::connect(proxy.addr, Proto::H2).await;
    let resp = c
        .send(
            c.req("GET", "/slow-body?chunks=1000&gap_ms=50&t=rst")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let rec = up.wait_path("t=rst").await;
    drop(resp); // RST_STREAM(CANCEL), connection stays
    assert!(
        eventually(CANCEL_LIMIT, || rec.state().response_dropped).await,
        "RST_STREAM from the client did not cancel the upstream stream"
    );
    assert_eq!(
        c.get("/ok").await.status,
        200,
        "connection must survive a stream reset"
    );
}

// ---------------------------------------------------------------- upstream failures

#[tokio::test]
async fn rule9_connect_failure_is_502_json() {
    let dead = format!("http://127.0.0.1:{}", free_port());
    let proxy = Scoretap::start(&dead, &["--connect-timeout", "2s"]).await;
    for proto in [Proto::H1, Proto::H2] {
        let mut c = Client::connect(proxy.addr, proto).await;
        let id = format!("corr-502-{proto:?}");
        let req = c
            .req("GET", "/x")
            .header("x-request-id", &id)
            .body(empty())
            .unwrap();
        let t = Instant::now();
        let r = c.fetch(req, STEP).await;
        assert!(t.elapsed() < Duration::from_secs(4));
        assert_error_contract(
            &format!("{proto:?} dead upstream"),
            r.status.as_u16(),
            r.header("content-type").as_deref(),
            &r.body,
            502,
            Some("upstream_connect_failed"),
            Some(&id),
        );
        assert_eq!(r.header("x-request-id"), Some(id));
    }
    // Without a client id one is generated.
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    let r = c.get("/x").await;
    let j = assert_error_contract(
        "generated id",
        r.status.as_u16(),
        r.header("content-type").as_deref(),
        &r.body,
        502,
        Some("upstream_connect_failed"),
        None,
    );
    assert_eq!(
        r.header("x-request-id").as_deref(),
        j["correlation_id"].as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule9_response_header_timeout_is_504_json() {
    let up = TestUpstream::start().await;
    let proxy = proxy_for(&up, &["--upstream-timeout", "500ms"]).await;
    for proto in [Proto::H1, Proto::H2] {
        let mut c = Client::connect(proxy.addr, proto).await;
        let tag = format!("/stall?t=504-{proto:?}");
        let req = c
            .req("GET", &tag)
            .header("x-request-id", "corr-504")
            .body(empty())
            .unwrap();
        let t = Instant::now();
        let r = c.fetch(req, STEP).await;
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(400) && took < Duration::from_secs(3),
            "{proto:?}: 504 after {took:?} with --upstream-timeout 500ms"
        );
        assert_error_contract(
            &format!("{proto:?} timeout"),
            r.status.as_u16(),
            r.header("content-type").as_deref(),
            &r.body,
            504,
            Some("upstream_timeout"),
            Some("corr-504"),
        );
        let rec = up.wait_path(&tag).await;
        assert!(
            eventually(CANCEL_LIMIT, || rec.state().handler_dropped).await,
            "{proto:?}: timed-out upstream request not cancelled"
        );
    }
    // A response that starts in time but whose body is slow is NOT a timeout.
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    let r = c
        .fetch(
            c.req("GET", "/slow-body?chunks=4&gap_ms=300")
                .body(empty())
                .unwrap(),
            STEP,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 64);
}

#[tokio::test]
async fn rule9_upstream_reset_before_headers_is_502() {
    for upstream in [UpstreamProto::H1, UpstreamProto::H2] {
        let up = TestUpstream::start_proto(upstream).await;
        let proxy = proxy_for(&up, &[]).await;
        for client in [Proto::H1, Proto::H2] {
            let mut c = Client::connect(proxy.addr, client).await;
            let r = c.get("/reset?when=headers").await;
            assert_error_contract(
                &format!("client {client:?} upstream {upstream:?} reset"),
                r.status.as_u16(),
                r.header("content-type").as_deref(),
                &r.body,
                502,
                Some("upstream_error"),
                None,
            );
        }
    }
}

#[tokio::test]
async fn rule9_malformed_or_closed_upstream_response_is_502() {
    let garbage = RawUpstream::start(|_| {
        RawReply::bytes("HTTP/1.1 abc nonsense\r\n\x01\x02\r\n\r\n").close()
    })
    .await;
    let closer = RawUpstream::start(|_| RawReply::default().close()).await;
    for (what, up) in [("malformed", &garbage), ("closed", &closer)] {
        let proxy = Scoretap::start(&up.url(), &[]).await;
        let mut c = Client::connect(proxy.addr, Proto::H1).await;
        let r = c.get("/x").await;
        assert_error_contract(
            what,
            r.status.as_u16(),
            r.header("content-type").as_deref(),
            &r.body,
            502,
            Some("upstream_error"),
            None,
        );
    }
}

#[tokio::test]
async fn rule9_upstream_reset_mid_body_never_hangs() {
    for upstream in [UpstreamProto::H1, UpstreamProto::H2] {
        let up = TestUpstream::start_proto(upstream).await;
        let proxy = proxy_for(&up, &[]).await;
        // HTTP/1.1 client: the response was promised 100000 bytes; the proxy must cut the
        // connection rather than leave the client waiting or pad the body.
        let mut raw = RawConn::connect(proxy.addr).await;
        raw.send(&request_bytes(
            "GET /reset?when=body HTTP/1.1",
            &[("Host", "h")],
            b"",
        ))
        .await;
        let r = within(STEP, "truncated response", raw.read_response(false)).await;
        assert_eq!(r.status(), 200);
        assert!(
            !r.complete,
            "{upstream:?}: a truncated upstream body was reported complete"
        );
        assert!(r.body.len() < 100_000);
        // HTTP/2 client: the stream must end in an error (RST_STREAM), not a clean end.
        let mut c = Client::connect(proxy.addr, Proto::H2).await;
        let resp = c
            .send(c.req("GET", "/reset?when=body").body(empty()).unwrap())
            .await;
        if let Ok(resp) = resp {
            let res = within(STEP, "h2 truncated body", collect(resp)).await;
            assert!(
                res.is_err(),
                "{upstream:?}: h2 client saw a clean end of a truncated body"
            );
        }
    }
}

// ---------------------------------------------------------------- correlation ids

#[tokio::test]
async fn correlation_id_kept_or_generated_and_forwarded() {
    let up = TestUpstream::start().await;
    let proxy = proxy_for(&up, &[]).await;
    for proto in [Proto::H1, Proto::H2] {
        let mut c = Client::connect(proxy.addr, proto).await;
        let tag = format!("/headers?t=cid-{proto:?}");
        let req = c
            .req("GET", &tag)
            .header("x-request-id", "my-id-123")
            .body(empty())
            .unwrap();
        let r = c.fetch(req, STEP).await;
        assert_eq!(r.header("x-request-id").as_deref(), Some("my-id-123"));
        assert_eq!(
            up.wait_path(&tag).await.header_all("x-request-id"),
            vec!["my-id-123".to_string()]
        );

        let tag = format!("/headers?t=gen-{proto:?}");
        let r = c.get(&tag).await;
        let id = r
            .header("x-request-id")
            .expect("generated x-request-id on the response");
        assert!(looks_like_uuid(&id), "generated id {id:?} is not a UUID");
        assert_eq!(up.wait_path(&tag).await.header("x-request-id"), Some(id));
    }
    // Two requests get different ids.
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    let a = c.get("/ok").await.header("x-request-id");
    let b = c.get("/ok").await.header("x-request-id");
    assert_ne!(a, b);
}
