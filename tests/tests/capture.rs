//! Capture end to end: what the trace records say (README, the record format), where they go (README, "Storage"), and
//! that capture stays invisible and bounded (§5 rules 11–12): a stalled sink never slows a
//! client, memory stays bounded, secrets never reach a record or a log, selection and the admin
//! toggle apply, and recorded traces can be queried back (CLI and admin).
#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::{json, Value};

use scoretap_tests::client::{empty, full, Collected};
use scoretap_tests::harness::upstream_args;
use scoretap_tests::process::run_cli;
use scoretap_tests::raw::request_bytes;
use scoretap_tests::traces::{
    admin_request, assert_record_shape, base64_decode, capture_state, inline_bytes, is_prefix,
    parse_jsonl, proc_status_kib, put_capture, TraceRecord, TraceStore, MAX_RECORD_BYTES,
    RECORD_WAIT,
};
use scoretap_tests::util::{eventually, free_port, pattern, sha256_hex};
use scoretap_tests::*;

const SERVICE: &str = "capsvc";
const INSTANCE: &str = "captest-1";
const TOKEN: &str = "admin-token-for-tests";
const CLI_LIMIT: Duration = Duration::from_secs(15);
/// How long "nothing was recorded" is given to prove itself (≥ 5 collector flush periods).
const QUIET: Duration = Duration::from_millis(1200);

// ---------------------------------------------------------------- helpers

/// A proxy in front of `up` writing to `store`, with a fixed service and instance name.
async fn capture_proxy(up: &TestUpstream, store: &TraceStore, extra: &[&str]) -> Scoretap {
    Scoretap::builder()
        .args(upstream_args(up))
        .args(store.args())
        .args(["--service", SERVICE, "--instance", INSTANCE])
        .args(extra.iter().copied())
        .start()
        .await
}

/// Send one request with our own correlation id; the whole response, bounded.
async fn send(
    c: &mut Client,
    method: &str,
    path: &str,
    id: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Collected {
    let mut b = c.req(method, path).header("x-request-id", id);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let body: Bytes = body.into();
    let req = if body.is_empty() {
        b.body(empty()).unwrap()
    } else {
        b.body(full(body)).unwrap()
    };
    c.fetch(req, Duration::from_secs(30)).await
}

/// A JSON document of exactly `size` bytes: `{"id": marker, "inputs": [[i, f, "row-i"], ...],
/// "pad": "xxx"}`.
fn json_of_size(size: usize, marker: &str) -> Vec<u8> {
    let mut s = format!("{{\"id\":\"{marker}\",\"inputs\":[");
    let tail = "],\"pad\":\"\"}".len();
    assert!(size >= s.len() + tail, "json_of_size({size}) too small");
    let mut i = 0u64;
    loop {
        let row = format!(
            "{}[{i},{}.5,\"row-{i}\"]",
            if i > 0 { "," } else { "" },
            i * 3
        );
        if s.len() + row.len() + tail > size {
            break;
        }
        s.push_str(&row);
        i += 1;
    }
    s.push_str("],\"pad\":\"");
    let pad = size - s.len() - 2;
    s.push_str(&"x".repeat(pad));
    s.push_str("\"}");
    assert_eq!(s.len(), size);
    s.into_bytes()
}

/// A correlation id unique to this test process.
fn uid(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{tag}-{}-{nanos}", std::process::id())
}

/// The body object of `part` ("request" / "response").
fn body_of<'a>(rec: &'a TraceRecord, part: &str) -> &'a Value {
    rec.at(&format!("/{part}/body"))
}

/// size and sha256 describe the whole body; capture saw it all.
fn assert_whole(rec: &TraceRecord, part: &str, body: &[u8]) {
    let b = body_of(rec, part);
    let what = format!("{part}.body of {}", rec.correlation_id());
    assert_eq!(
        b["size"].as_u64(),
        Some(body.len() as u64),
        "{what}: size; record {}",
        rec.brief()
    );
    assert_eq!(
        b["sha256"].as_str(),
        Some(sha256_hex(body).as_str()),
        "{what}: sha256 must be the SHA-256 of the whole body; record {}",
        rec.brief()
    );
    assert_eq!(
        b["complete"],
        true,
        "{what}: complete; record {}",
        rec.brief()
    );
}

/// The trace file sits at `traces/<service>/<yyyy>/<mm>/<dd>/<HH>/<instance>-<seq>.jsonl`.
fn assert_layout(store: &TraceStore, rec: &TraceRecord) {
    let file = rec.file.as_ref().expect("record read from a file");
    let rel = file
        .strip_prefix(store.path())
        .unwrap_or_else(|_| panic!("{} outside the store", file.display()));
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let shown = rel.display();
    assert_eq!(
        parts.len(),
        7,
        "trace file {shown} is not traces/<service>/<yyyy>/<mm>/<dd>/<HH>/<instance>-<seq>.jsonl"
    );
    assert_eq!(parts[0], "traces", "{shown}");
    assert_eq!(parts[1], SERVICE, "{shown}: service directory");
    for (i, width) in [(2, 4), (3, 2), (4, 2), (5, 2)] {
        assert!(
            parts[i].len() == width && parts[i].bytes().all(|b| b.is_ascii_digit()),
            "{shown}: component {:?} should be {width} digits",
            parts[i]
        );
    }
    let name = &parts[6];
    let seq = name
        .strip_prefix(&format!("{INSTANCE}-"))
        .and_then(|s| s.strip_suffix(".jsonl"))
        .unwrap_or_else(|| panic!("{shown}: file name should be {INSTANCE}-<seq>.jsonl"));
    assert!(
        seq.len() == 6 && seq.bytes().all(|b| b.is_ascii_digit()),
        "{shown}: seq {seq:?} should be 6 digits"
    );
    // The hour directory is the record's UTC hour (skip the check at an hour boundary).
    let started = rec.str_at("/started_at").unwrap();
    if &started[14..16] != "59" && &started[14..16] != "00" {
        assert_eq!(
            format!("{}-{}-{}T{}", parts[2], parts[3], parts[4], parts[5]),
            started[..13],
            "{shown}: date/hour directories vs started_at {started}"
        );
    }
}

fn cli_lines(out: &str) -> Vec<TraceRecord> {
    let mut text = out.to_string();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    parse_jsonl(&text, None)
}

fn ids(recs: &[TraceRecord]) -> Vec<String> {
    recs.iter()
        .map(|r| r.correlation_id().to_string())
        .collect()
}

fn assert_newest_first(what: &str, recs: &[TraceRecord]) {
    let starts: Vec<&str> = recs
        .iter()
        .map(|r| r.str_at("/started_at").unwrap_or(""))
        .collect();
    let mut sorted = starts.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(starts, sorted, "{what}: records are not newest first");
}

// ---------------------------------------------------------------- 1. small JSON

#[tokio::test]
async fn capture_small_json_exchange_is_one_complete_record() {
    let up = TestUpstream::start().await;
    let store = TraceStore::new();
    let proxy = capture_proxy(&up, &store, &[]).await;
    for proto in [Proto::H1, Proto::H2] {
        let mut c = Client::connect(proxy.addr, proto).await;
        let id = uid(&format!("small-{proto:?}"));
        let body = json_of_size(1024, &id);
        let sent: Value = serde_json::from_slice(&body).unwrap();
        let r = send(
            &mut c,
            "POST",
            "/echo?t=small",
            &id,
            &[("content-type", "application/json")],
            body.clone(),
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body.as_ref(), body.as_slice());
        assert_eq!(r.header("x-request-id").as_deref(), Some(id.as_str()));

        let rec = store.wait_one(&id).await;
        let b = rec.brief();
        assert!(rec.line.len() <= MAX_RECORD_BYTES);
        assert_eq!(rec.str_at("/service"), Some(SERVICE), "{b}");
        assert_eq!(rec.str_at("/outcome"), Some("ok"), "{b}");
        assert!(rec.at("/error").is_null(), "{b}");
        assert_eq!(rec.str_at("/request/method"), Some("POST"), "{b}");
        assert_eq!(rec.str_at("/request/path"), Some("/echo"), "{b}");
        assert_eq!(rec.str_at("/request/query"), Some("t=small"), "{b}");
        let v = rec.str_at("/request/http_version").unwrap();
        match proto {
            Proto::H1 => assert_eq!(v, "HTTP/1.1", "{b}"),
            Proto::H2 => assert!(v.starts_with("HTTP/2"), "{b}"),
        }
        assert_eq!(
            rec.header("request", "content-type").as_deref(),
            Some("application/json"),
            "{b}"
        );
        assert_eq!(rec.u64_at("/response/status"), Some(200), "{b}");
        assert_eq!(
            rec.header("response", "content-type").as_deref(),
            Some("application/json"),
            "{b}"
        );
        for part in ["request", "response"] {
            assert_whole(&rec, part, &body);
            let bo = body_of(&rec, part);
            assert_eq!(bo["encoding"], "json", "{part}: {b}");
            assert_eq!(bo["truncated"], false, "{part}: {b}");
            assert_eq!(
                bo["inline"], sent,
                "{part}.inline must be the JSON sent: {b}"
            );
            assert_eq!(bo["content_type"], "application/json", "{part}: {b}");
            assert!(bo["blob"].is_null(), "{part}: blob without spilling: {b}");
        }
        let dur = rec.at("/duration_ms").as_f64().unwrap();
        assert!(dur < 10_000.0, "duration_ms {dur}");
        assert_layout(&store, &rec);
    }

    // Without a client id: the record carries the id the client was given.
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    let r = c.post("/echo?t=gen", "{\"a\":1}").await;
    assert_eq!(r.status, 200);
    let gid = r.header("x-request-id").expect("generated x-request-id");
    let rec = store.wait_one(&gid).await;
    assert_eq!(rec.str_at("/request/query"), Some("t=gen"));
    assert_whole(&rec, "request", b"{\"a\":1}");
    // Two records, two ids.
    let all = store.records();
    let mut rids: Vec<&str> = all.iter().map(|r| r.str_at("/id").unwrap_or("")).collect();
    rids.sort_unstable();
    rids.dedup();
    assert_eq!(rids.len(), all.len(), "record ids are not unique");
}

// ---------------------------------------------------------------- 2. 10 MB JSON

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_10mb_json_is_cut_to_64k_but_hashed_whole() {
    let up = TestUpstream::start().await;
    let store = TraceStore::new();
    let proxy = capture_proxy(&up, &store, &[]).await;
    let size = 10 * 1024 * 1024;
    let id = uid("big");
    let body = json_of_size(size, &id);
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    let r = send(
        &mut c,
        "POST",
        "/echo?t=big",
        &id,
        &[("content-type", "application/json")],
        body.clone(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), size, "client got a short echo");
    assert_eq!(
        sha256_hex(&r.body),
        sha256_hex(&body),
        "client got different bytes"
    );

    let rec = store.wait_one(&id).await;
    let b = rec.brief();
    assert!(
        rec.line.len() <= MAX_RECORD_BYTES,
        "record is {} bytes",
        rec.line.len()
    );
    let mut inline_total = 0;
    for part in ["request", "response"] {
        assert_whole(&rec, part, &body);
        let bo = body_of(&rec, part);
        assert_eq!(bo["truncated"], true, "{part}: {b}");
        assert_ne!(bo["encoding"], "base64", "{part}: JSON text as base64: {b}");
        let inline = bo["inline"]
            .as_str()
            .unwrap_or_else(|| panic!("{part}: a cut body's inline is a string prefix: {b}"));
        assert!(
            is_prefix(inline.as_bytes(), &body),
            "{part}: inline is not a prefix of the body: {b}"
        );
        inline_total += inline.len();
    }
    assert!(
        inline_total >= 16 * 1024,
        "the 64 KiB budget is barely used: {inline_total} inline bytes in total"
    );
}

// ---------------------------------------------------------------- 3. binary

#[tokio::test]
async fn capture_binary_body_is_base64() {
    let up = TestUpstream::start().await;
    let store = TraceStore::new();
    let proxy = capture_proxy(&up, &store, &[]).await;
    let mut c = Client::connect(proxy.addr, Proto::H2).await;
    for size in [3000usize, 200_000] {
        let body = pattern(17, size);
        assert!(
            std::str::from_utf8(&body).is_err(),
            "payload must not be UTF-8"
        );
        let id = uid(&format!("bin-{size}"));
        let r = send(
            &mut c,
            "POST",
            "/echo",
            &id,
            &[("content-type", "application/octet-stream")],
            body.clone(),
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body.as_ref(), body.as_slice());
        let rec = store.wait_one(&id).await;
        let b = rec.brief();
        for part in ["request", "response"] {
            assert_whole(&rec, part, &body);
            let bo = body_of(&rec, part);
            assert_eq!(bo["encoding"], "base64", "{part} ({size} B): {b}");
            assert_eq!(bo["content_type"], "application/octet-stream", "{b}");
            let decoded = base64_decode(bo["inline"].as_str().unwrap());
            if size == 3000 {
                assert_eq!(bo["truncated"], false, "{part}: {b}");
                assert_eq!(decoded, body, "{part}: decoded inline != body");
            } else {
                assert_eq!(bo["truncated"], true, "{part}: {b}");
                assert!(
                    decoded.len() >= 1024 && is_prefix(&decoded, &body),
                    "{part}: decoded inline ({} bytes) is not a non-trivial prefix",
                    decoded.len()
                );
            }
        }
    }
}

// ---------------------------------------------------------------- 4. 4xx / 5xx

#[tokio::test]
async fn capture_records_4xx_and_5xx_with_bodies() {
    let up = TestUpstream::start().await;
    let store = TraceStore::new();
    let proxy = capture_proxy(&up, &store, &[]).await;
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    for code in [404u16, 500] {
        let id = uid(&format!("st-{code}"));
        let r = send(&mut c, "GET", &format!("/status/{code}"), &id, &[], "").await;
        assert_eq!(r.status.as_u16(), code);
        let want = format!("status {code}\n");
        assert_eq!(r.text(), want);
        let rec = store.wait_one(&id).await;
        let b = rec.brief();
        assert_eq!(rec.u64_at("/response/status"), Some(u64::from(code)), "{b}");
        assert_eq!(
            rec.str_at("/outcome"),
            Some("ok"),
            "an upstream's own {code} is a proxied answer: {b}"
        );
        assert!(rec.at("/error").is_null(), "{b}");
        assert_whole(&rec, "response", want.as_bytes());
        assert_eq!(rec.at("/response/body/inline"), &json!(want), "{b}");
        assert_eq!(rec.str_at("/response/body/encoding"), Some("utf8"), "{b}");
        assert_eq!(rec.u64_at("/request/body/size"), Some(0), "{b}");
    }
}

#[tokio::test]
async fn capture_records_response_trailers() {
    let up = TestUpstream::start_proto(UpstreamProto::H2).await;
    let store = TraceStore::new();
    let proxy = capture_proxy(&up, &store, &[]).await;
    let mut c = Client::connect(proxy.addr, Proto::H2).await;
    let id = uid("trailers");
    let r = send(&mut c, "GET", "/trailers", &id, &[("te", "trailers")], "").await;
    assert_eq!(r.trailer("grpc-status").as_deref(), Some("0"));
    let rec = store.wait_one(&id).await;
    let b = rec.brief();
    assert_eq!(
        rec.str_at("/response/trailers/grpc-status"),
        Some("0"),
        "{b}"
    );
    assert_eq!(
        rec.str_at("/response/trailers/grpc-message"),
        Some("all-good"),
        "{b}"
    );
    assert_whole(&rec, "response", b"trailer-body");
}

// ---------------------------------------------------------------- 5. dead upstream

#[tokio::test]
async fn capture_dead_upstream_records_502() {
    let store = TraceStore::new();
    let dead = format!("http://127.0.0.1:{}", free_port());
    let proxy = Scoretap::builder()
        .upstream(&dead)
        .args(store.args())
        .args(["--service", SERVICE, "--instance", INSTANCE])
        .args(["--connect-timeout", "2s"])
        .start()
        .await;
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    let id = uid("dead");
    let r = send(
        &mut c,
        "POST",
        "/score",
        &id,
        &[("content-type", "application/json")],
        "{\"x\":1}",
    )
    .await;
    assert_eq!(r.status, 502);
    let answer = r.json();
    assert_eq!(answer["error"], "upstream_connect_failed");

    let rec = store.wait_one(&id).await;
    let b = rec.brief();
    assert_eq!(rec.str_at("/outcome"), Some("upstream_error"), "{b}");
    assert_eq!(
        rec.str_at("/error/kind"),
        Some("upstream_connect_failed"),
        "{b}"
    );
    assert!(
        rec.str_at("/error/message").is_some_and(|m| !m.is_empty()),
        "{b}"
    );
    assert_eq!(rec.u64_at("/response/status"), Some(502), "{b}");
    assert_eq!(
        rec.at("/response/body/inline"),
        &answer,
        "response.body must be the proxy's JSON error answer: {b}"
    );
    assert_whole(&rec, "response", &r.body);
    assert_eq!(rec.str_at("/request/path"), Some("/score"), "{b}");
    // The upstream never read the input; the record still has it.
    assert_whole(&rec, "request", b"{\"x\":1}");
    assert_eq!(
        rec.at("/request/body/inline"),
        &serde_json::json!({"x": 1}),
        "the input of a failed exchange is recorded: {b}"
    );
}

// ---------------------------------------------------------------- 6. upstream timeout

#[tokio::test]
async fn capture_upstream_timeout_records_504() {
    let up = TestUpstream::start().await;
    let store = TraceStore::new();
    let proxy = capture_proxy(&up, &store, &["--upstream-timeout", "500ms"]).await;
    let mut c = Client::connect(proxy.addr, Proto::H2).await;
    let id = uid("stall");
    let r = send(&mut c, "GET", "/stall?t=cap504", &id, &[], "").await;
    assert_eq!(r.status, 504);
    let answer = r.json();
    let rec = store.wait_one(&id).await;
    let b = rec.brief();
    assert_eq!(rec.str_at("/outcome"), Some("upstream_timeout"), "{b}");
    assert_eq!(rec.str_at("/error/kind"), Some("upstream_timeout"), "{b}");
    assert_eq!(rec.u64_at("/response/status"), Some(504), "{b}");
    assert_eq!(rec.at("/response/body/inline"), &answer, "{b}");
    let dur = rec.at("/duration_ms").as_f64().unwrap();
    assert!(
        (400.0..5000.0).contains(&dur),
        "duration_ms {dur} with a 500 ms timeout: {b}"
    );
}

// ---------------------------------------------------------------- 7. client leaves mid-upload

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_client_disconnect_mid_upload_is_incomplete() {
    let up = TestUpstream::start().await;
    let store = TraceStore::new();
    let proxy = capture_proxy(&up, &store, &[]).await;
    let id = uid("cut");
    let sent = pattern(0, 200_000);
    let mut raw = RawConn::connect(proxy.addr).await;
    raw.send(&request_bytes(
        "POST /sink?t=cap-cut HTTP/1.1",
        &[
            ("host", "h"),
            ("x-request-id", &id),
            ("content-type", "application/octet-stream"),
            ("content-length", "1000000"),
        ],
        &sent,
    ))
    .await;
    let at_up = up.wait_path("t=cap-cut").await;
    assert!(
        eventually(Duration::from_secs(5), || at_up.state().body_bytes
            == 200_000)
        .await,
        "the 200,000 bytes sent never all reached the upstream: {:?}",
        at_up.state()
    );
    drop(raw);

    let rec = store.wait_one(&id).await;
    let b = rec.brief();
    let outcome = rec.str_at("/outcome").unwrap();
    assert!(
        ["client_cancelled", "upstream_error"].contains(&outcome),
        "outcome {outcome:?}: {b}"
    );
    let bo = body_of(&rec, "request");
    assert_eq!(bo["complete"], false, "a cut upload is not complete: {b}");
    assert_eq!(
        bo["size"].as_u64(),
        Some(200_000),
        "size = the bytes that crossed: {b}"
    );
    let prefix = inline_bytes(bo);
    assert!(
        is_prefix(&prefix, &sent),
        "request inline is not a prefix of what was sent"
    );
}

// ---------------------------------------------------------------- 8. SSE

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_sse_streams_event_by_event_then_records_all_events() {
    let up = TestUpstream::start().await;
    let store = TraceStore::new();
    let proxy = capture_proxy(&up, &store, &[]).await;
    let gate = up.gate("cap-sse");
    let id = uid("sse");
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    let req = c
        .req("GET", "/sse?events=3&gate=cap-sse")
        .header("x-request-id", &id)
        .body(empty())
        .unwrap();
    let resp = c.send(req).await.expect("sse head");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = String::new();
    let mut expected = String::new();
    for i in 0..3 {
        let ev = format!("id: {i}\ndata: event-{i}\n\n");
        expected.push_str(&ev);
        gate.add_permits(1);
        while !got.ends_with(&ev) {
            let frame = within(
                Duration::from_secs(5),
                &format!("SSE event {i} reaching the client"),
                body.frame(),
            )
            .await
            .unwrap_or_else(|| panic!("stream ended before event {i}; got {got:?}"))
            .expect("frame");
            if let Ok(d) = frame.into_data() {
                got.push_str(std::str::from_utf8(&d).unwrap());
            }
        }
        if i == 1 {
            tokio::time::sleep(Duration::from_millis(600)).await;
            assert!(
                store.find(&id).is_none(),
                "a record was written before the stream ended"
            );
        }
    }
    let end = within(Duration::from_secs(5), "SSE end", body.frame()).await;
    assert!(end.is_none(), "expected the end of the stream");
    assert_eq!(got, expected);

    let rec = store.wait_one(&id).await;
    let b = rec.brief();
    assert_eq!(rec.str_at("/outcome"), Some("ok"), "{b}");
    assert_whole(&rec, "response", expected.as_bytes());
    let bo = body_of(&rec, "response");
    assert_eq!(bo["content_type"], "text/event-stream", "{b}");
    assert_eq!(bo["encoding"], "utf8", "{b}");
    let inline = bo["inline"].as_str().unwrap_or("");
    for i in 0..3 {
        assert!(inline.contains(&format!("data: event-{i}")), "{b}");
    }
    assert_eq!(inline, expected, "{b}");
}

// ---------------------------------------------------------------- 9. stalled sink

/// `conns` connections × `per_conn` POSTs of `body` to /echo; every answer checked; latencies.
async fn echo_load(
    addr: std::net::SocketAddr,
    tag: &str,
    conns: usize,
    per_conn: usize,
    body: Bytes,
) -> Vec<Duration> {
    let mut tasks = Vec::new();
    for k in 0..conns {
        let body = body.clone();
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(addr, Proto::H1).await;
            let mut lat = Vec::with_capacity(per_conn);
            for i in 0..per_conn {
                let id = format!("{tag}-{k}-{i}");
                let req = c
                    .req("POST", "/echo")
                    .header("x-request-id", &id)
                    .header("content-type", "application/json")
                    .body(full(body.clone()))
                    .unwrap();
                let t = Instant::now();
                let r = within(
                    Duration::from_secs(5),
                    &format!("{id} under load"),
                    c.fetch(req, Duration::from_secs(5)),
                )
                .await;
                lat.push(t.elapsed());
                assert_eq!(r.status, 200, "{id}");
                assert!(
                    r.body == body,
                    "{id}: echoed body differs ({} bytes)",
                    r.body.len()
                );
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("load task"));
    }
    all.sort();
    all
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_stalled_stdout_sink_never_slows_clients_and_stays_bounded() {
    let up = TestUpstream::start().await;
    let mut proxy = Scoretap::builder()
        .args(upstream_args(&up))
        .args(["--store", "stdout", "--service", SERVICE])
        .args(["--capture-buffer-bytes", "1MiB"])
        .pipe_stdout()
        .start()
        .await;
    let mut pipe = proxy.take_stdout_pipe().expect("stdout pipe");
    let off_store = TraceStore::new();
    let baseline_proxy = Scoretap::builder()
        .args(upstream_args(&up))
        .args(off_store.args())
        .args(["--capture", "false"])
        .start()
        .await;

    let body = Bytes::from(json_of_size(64 * 1024, "stall"));
    let base = echo_load(baseline_proxy.addr, "base", 4, 25, body.clone()).await;
    let stalled = echo_load(proxy.addr, "stall", 4, 50, body.clone()).await;
    let (b99, s50, s99, smax) = (
        pct(&base, 0.99),
        pct(&stalled, 0.5),
        pct(&stalled, 0.99),
        *stalled.last().unwrap(),
    );
    eprintln!("stall: baseline p99 {b99:?}; stalled p50 {s50:?} p99 {s99:?} max {smax:?}");
    assert!(
        smax < Duration::from_secs(1),
        "a request took {smax:?} while the sink was stalled"
    );
    assert!(
        s99 <= (b99 * 5).max(Duration::from_millis(300)),
        "p99 {s99:?} with a stalled sink vs {b99:?} without capture"
    );

    let pid = proxy.pid();
    let hwm = proc_status_kib(pid, "VmHWM").expect("VmHWM");
    let rss = proc_status_kib(pid, "VmRSS").expect("VmRSS");
    eprintln!("stall: scoretap VmRSS {rss} KiB, VmHWM {hwm} KiB");
    assert!(
        hwm < 100 * 1024,
        "peak RSS {hwm} KiB with a 1 MiB capture buffer"
    );

    let st = capture_state(proxy.admin).await;
    let stats = &st["stats"];
    assert!(
        stats["dropped_events"].as_u64().is_some_and(|d| d > 0),
        "a stalled sink with a 1 MiB ring must drop events: {st}"
    );
    let full_drops: u64 = ["ring_full_bytes", "ring_full_slots"]
        .iter()
        .map(|k| stats["dropped"][*k].as_u64().unwrap_or(0))
        .sum();
    assert!(full_drops > 0, "drops not attributed to a full ring: {st}");
    assert_eq!(
        stats["ring_capacity_bytes"].as_u64(),
        Some(1024 * 1024),
        "{st}"
    );
    assert!(
        stats["ring_bytes"].as_u64().unwrap_or(u64::MAX) <= 1024 * 1024,
        "{st}"
    );

    // Unblock the sink: drain stdout from now on.
    let out = Arc::new(Mutex::new(Vec::<u8>::new()));
    let out2 = out.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => out2.lock().unwrap().extend_from_slice(&buf[..n]),
            }
        }
    });
    let drained = {
        let deadline = Instant::now() + RECORD_WAIT;
        loop {
            let st = capture_state(proxy.admin).await;
            let used = st["stats"]["ring_bytes"].as_u64().unwrap_or(u64::MAX);
            if used < 256 * 1024 {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert!(drained, "the ring did not drain once stdout was read");

    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    let resumed: Vec<String> = (0..5).map(|i| uid(&format!("resume-{i}"))).collect();
    for id in &resumed {
        let r = send(
            &mut c,
            "POST",
            "/echo",
            id,
            &[("content-type", "application/json")],
            "{\"after\":\"stall\"}",
        )
        .await;
        assert_eq!(r.status, 200);
    }
    let found = eventually(RECORD_WAIT, || {
        let text = String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
        let recs = parse_jsonl(&text, None);
        resumed
            .iter()
            .all(|id| recs.iter().any(|r| r.correlation_id() == id))
    })
    .await;
    let text = String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    let recs = parse_jsonl(&text, None);
    assert!(
        found,
        "capture did not resume: records on stdout {:?}",
        ids(&recs)
    );
    // stdout carries records only (logs go to stderr), each within the contract.
    for r in &recs {
        assert_record_shape(r);
    }
    for id in &resumed {
        let r = recs.iter().find(|r| r.correlation_id() == id).unwrap();
        assert_whole(r, "request", b"{\"after\":\"stall\"}");
    }
}

// ---------------------------------------------------------------- 10. secrets

const SECRETS: [&str; 7] = [
    "SECRET-AUTH-123",
    "SECRET-QUERY-111",
    "SECRET-QUERY-222",
    "SECRET-COOKIE-456",
    "SECRET-KEY-789",
    "SECRET-TOKEN-000",
    "secret.person@example.com",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_redacts_secrets_everywhere_but_forwards_them() {
    let up = TestUpstream::start().await;
    let store = TraceStore::new();
    let proxy = capture_proxy(
        &up,
        &store,
        &[
            "--redact-headers",
            "x-customer-token",
            "--redact-json",
            "$.customer.email",
        ],
    )
    .await;
    let small =
        br#"{"customer": {"email": "secret.person@example.com", "name": "Pat"}, "data": [[1,2]]}"#
            .to_vec();
    let mut big =
        br#"{"customer": {"email": "secret.person@example.com", "name": "Pat"}, "data": [[1,2]"#
            .to_vec();
    while big.len() < 200_000 {
        big.extend_from_slice(b",[1,2]");
    }
    big.extend_from_slice(b"]}");
    serde_json::from_slice::<Value>(&big).expect("big body is JSON");

    let headers = [
        ("authorization", "Bearer SECRET-AUTH-123"),
        ("cookie", "session=SECRET-COOKIE-456"),
        ("x-api-key", "SECRET-KEY-789"),
        ("x-customer-token", "SECRET-TOKEN-000"),
        ("content-type", "application/json"),
    ];
    for proto in [Proto::H1, Proto::H2] {
        let mut c = Client::connect(proxy.addr, proto).await;
        for (kind, body) in [("small", &small), ("big", &big)] {
            let id = uid(&format!("secret-{kind}-{proto:?}"));
            let tag = format!("t={id}");
            let r = send(
                &mut c,
                "POST",
                &format!("/echo?{tag}&code=SECRET-QUERY-111&api%5Fkey=SECRET-QUERY-222"),
                &id,
                &headers,
                body.clone(),
            )
            .await;
            assert_eq!(r.status, 200);
            assert_eq!(
                r.body.as_ref(),
                body.as_slice(),
                "the client must get the real body"
            );
            // The upstream got the real values.
            let at_up = up.wait_path(&tag).await;
            assert!(
                at_up
                    .path_and_query()
                    .ends_with("&code=SECRET-QUERY-111&api%5Fkey=SECRET-QUERY-222"),
                "upstream must receive the real query: {}",
                at_up.path_and_query()
            );
            for (k, v) in &headers {
                assert_eq!(
                    at_up.header(k).as_deref(),
                    Some(*v),
                    "upstream must receive the real {k}"
                );
            }

            let rec = store.wait_one(&id).await;
            let b = rec.brief();
            assert_eq!(
                rec.str_at("/request/query"),
                Some(format!("{tag}&code=[redacted]&api%5Fkey=[redacted]").as_str()),
                "{b}"
            );
            for (k, _) in &headers[..4] {
                assert_eq!(
                    rec.header("request", k).as_deref(),
                    Some("[redacted]"),
                    "request header {k}: {b}"
                );
            }
            for part in ["request", "response"] {
                // size/sha256 describe the body that crossed, not the redacted copy.
                assert_whole(&rec, part, body);
                let bo = body_of(&rec, part);
                if kind == "small" {
                    assert_eq!(bo["truncated"], false, "{b}");
                    assert_eq!(
                        bo["inline"]["customer"]["email"], "[redacted]",
                        "{part}: {b}"
                    );
                    assert_eq!(
                        bo["inline"]["customer"]["name"], "Pat",
                        "{part}: over-redacted: {b}"
                    );
                    assert_eq!(bo["inline"]["data"], json!([[1, 2]]), "{part}: {b}");
                } else {
                    assert_eq!(bo["truncated"], true, "{b}");
                    let inline = bo["inline"].as_str().unwrap_or("");
                    assert!(
                        inline.contains("[redacted]"),
                        "{part}: cut body not redacted: {}",
                        &inline[..inline.len().min(300)]
                    );
                }
            }
        }
    }
    // Give the collector time to write everything it will write.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let files = store.all_files();
    assert!(!files.is_empty());
    let mut redacted_seen = false;
    for (path, bytes) in &files {
        let text = String::from_utf8_lossy(bytes);
        for s in SECRETS {
            assert!(
                !text.contains(s),
                "secret {s:?} written to {}",
                path.display()
            );
        }
        redacted_seen |= text.contains("[redacted]");
    }
    assert!(redacted_seen, "no \"[redacted]\" in any trace file");
    let log = proxy.stderr();
    for s in SECRETS {
        assert!(!log.contains(s), "secret {s:?} in scoretap's log");
    }
}

// ---------------------------------------------------------------- 11. selection

#[tokio::test]
async fn capture_sample_rate_zero_records_nothing_until_raised() {
    let up = TestUpstream::start().await;
    let store = TraceStore::new();
    let proxy = capture_proxy(&up, &store, &["--sample-rate", "0", "--admin-token", TOKEN]).await;
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    let unsampled: Vec<String> = (0..5).map(|i| uid(&format!("unsampled-{i}"))).collect();
    for id in &unsampled {
        let r = send(&mut c, "POST", "/echo", id, &[], "{\"s\":0}").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "{\"s\":0}");
    }
    let st = capture_state(proxy.admin).await;
    assert_eq!(st["enabled"], true, "{st}");
    assert_eq!(st["sample_rate"].as_f64(), Some(0.0), "{st}");
    tokio::time::sleep(QUIET).await;
    assert!(
        store.records().is_empty(),
        "--sample-rate 0 wrote records: {:?}",
        ids(&store.records())
    );
    assert_eq!(
        capture_state(proxy.admin).await["stats"]["records_written"].as_u64(),
        Some(0)
    );

    let (status, body) = put_capture(proxy.admin, Some(TOKEN), &json!({"sample_rate": 1.0})).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let j: Value = serde_json::from_slice(&body).expect("PUT /capture answers JSON");
    assert_eq!(j["sample_rate"].as_f64(), Some(1.0), "{j}");
    assert_eq!(
        capture_state(proxy.admin).await["sample_rate"].as_f64(),
        Some(1.0)
    );
    let id = uid("sampled");
    send(&mut c, "POST", "/echo", &id, &[], "{\"s\":1}").await;
    store.wait_one(&id).await;
    for u in &unsampled {
        assert!(store.find(u).is_none(), "{u} recorded at sample rate 0");
    }
    assert!(capture_state(proxy.admin).await["stats"]["records_written"]
        .as_u64()
        .is_some_and(|n| n >= 1));
}

#[tokio::test]
async fn capture_exclude_paths_and_content_types() {
    let up = TestUpstream::start().await;
    let store = TraceStore::new();
    let proxy = capture_proxy(&up, &store, &["--capture-exclude", "/health*"]).await;
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    let health = uid("health");
    assert_eq!(
        send(&mut c, "GET", "/healthcheck", &health, &[], "")
            .await
            .text(),
        "ok"
    );
    let png = pattern(3, 5000);
    let png_id = uid("png");
    let r = send(
        &mut c,
        "POST",
        "/echo?t=png",
        &png_id,
        &[("content-type", "image/png")],
        png.clone(),
    )
    .await;
    assert_eq!(r.body.as_ref(), png.as_slice());
    assert_eq!(r.header("content-type").as_deref(), Some("image/png"));
    let score = uid("score");
    send(&mut c, "GET", "/score?x=1", &score, &[], "").await;

    store.wait_one(&score).await;
    let rec = store.wait_one(&png_id).await;
    let b = rec.brief();
    for part in ["request", "response"] {
        let bo = body_of(&rec, part);
        assert!(bo["excluded"].is_string(), "{part}.body.excluded: {b}");
        assert!(bo["inline"].is_null(), "{part}.body.inline: {b}");
        assert_eq!(bo["size"].as_u64(), Some(5000), "{part}: {b}");
        assert_eq!(bo["content_type"], "image/png", "{part}: {b}");
    }
    assert!(
        store.find(&health).is_none(),
        "/healthcheck recorded despite --capture-exclude /health*"
    );
}

#[tokio::test]
async fn capture_include_paths() {
    let up = TestUpstream::start().await;
    let store = TraceStore::new();
    let proxy = capture_proxy(&up, &store, &["--capture-include", "/score*,/v1/*/predict"]).await;
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    let other = uid("other");
    send(&mut c, "GET", "/other", &other, &[], "").await;
    let scored = uid("scored");
    send(&mut c, "GET", "/score/1", &scored, &[], "").await;
    let predicted = uid("predicted");
    send(&mut c, "GET", "/v1/model-a/predict", &predicted, &[], "").await;
    store.wait_one(&scored).await;
    store.wait_one(&predicted).await;
    assert!(
        store.find(&other).is_none(),
        "/other recorded despite --capture-include /score*"
    );
}

// ---------------------------------------------------------------- 12. admin toggle

#[tokio::test]
async fn capture_admin_toggle_needs_the_token_and_applies_at_once() {
    let up = TestUpstream::start().await;
    let store = TraceStore::new();
    let proxy = capture_proxy(&up, &store, &["--admin-token", TOKEN]).await;
    let st = capture_state(proxy.admin).await;
    assert_eq!(st["enabled"], true, "{st}");
    assert_eq!(st["sample_rate"].as_f64(), Some(1.0), "{st}");
    for k in [
        "records_written",
        "dropped_events",
        "ring_bytes",
        "ring_capacity_bytes",
    ] {
        assert!(st["stats"][k].is_u64(), "stats.{k}: {st}");
    }
    assert!(st["stats"]["dropped"].is_object(), "{st}");
    assert_eq!(
        st["stats"]["ring_capacity_bytes"].as_u64(),
        Some(64 * 1024 * 1024),
        "default --capture-buffer-bytes is 64MiB: {st}"
    );

    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    let first = uid("toggle-on");
    send(&mut c, "GET", "/ok", &first, &[], "").await;
    store.wait_one(&first).await;

    let off = json!({"enabled": false});
    assert_eq!(
        put_capture(proxy.admin, None, &off).await.0,
        401,
        "no token"
    );
    assert_eq!(
        put_capture(proxy.admin, Some("wrong"), &off).await.0,
        401,
        "wrong token"
    );
    assert_eq!(capture_state(proxy.admin).await["enabled"], true);
    let (status, body) = put_capture(proxy.admin, Some(TOKEN), &off).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let j: Value = serde_json::from_slice(&body).expect("JSON state");
    assert_eq!(j["enabled"], false, "{j}");
    assert_eq!(capture_state(proxy.admin).await["enabled"], false);

    let while_off = uid("toggle-off");
    send(&mut c, "GET", "/ok", &while_off, &[], "").await;

    let (status, _) = put_capture(proxy.admin, Some(TOKEN), &json!({"enabled": true})).await;
    assert_eq!(status, 200);
    assert_eq!(capture_state(proxy.admin).await["enabled"], true);
    let again = uid("toggle-again");
    send(&mut c, "GET", "/ok", &again, &[], "").await;
    store.wait_one(&again).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        store.find(&while_off).is_none(),
        "a request was recorded while capture was disabled"
    );
    assert!(capture_state(proxy.admin).await["stats"]["records_written"]
        .as_u64()
        .is_some_and(|n| n >= 2));

    // Without a configured token, mutation is forbidden.
    let open = capture_proxy(&up, &TraceStore::new(), &[]).await;
    assert_eq!(
        put_capture(open.admin, Some(TOKEN), &off).await.0,
        403,
        "PUT /capture without --admin-token configured"
    );
    assert_eq!(capture_state(open.admin).await["enabled"], true);
}

// ---------------------------------------------------------------- 13. query

#[tokio::test]
async fn capture_traces_query_cli_and_admin() {
    let up = TestUpstream::start().await;
    let store = TraceStore::new();
    let proxy = capture_proxy(&up, &store, &[]).await;
    let marker = uid("needle");
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    let q_ok = uid("q-ok");
    let r = send(
        &mut c,
        "POST",
        "/echo",
        &q_ok,
        &[("content-type", "application/json")],
        json!({"note": marker}).to_string(),
    )
    .await;
    assert_eq!(r.status, 200);
    store.wait_one(&q_ok).await;
    let q_5xx = uid("q-5xx");
    let r = send(
        &mut c,
        "GET",
        &format!("/status/503?tag={marker}"),
        &q_5xx,
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 503);
    let q_other = uid("q-other");
    send(
        &mut c,
        "POST",
        "/echo",
        &q_other,
        &[],
        "{\"note\":\"unrelated\"}",
    )
    .await;
    store.wait_one(&q_5xx).await;
    store.wait_one(&q_other).await;

    let url = store.url();
    let traces = |extra: &[&str]| {
        let mut a = vec!["traces", "--store", url.as_str()];
        a.extend_from_slice(extra);
        let o = run_cli(&a, &[], CLI_LIMIT);
        assert_eq!(o.code(), Some(0), "scoretap {a:?}: stderr {}", o.stderr);
        let recs = cli_lines(&o.stdout);
        for r in &recs {
            assert_record_shape(r);
        }
        assert_newest_first(&format!("{a:?}"), &recs);
        ids(&recs)
    };
    assert_eq!(
        traces(&["--contains", &marker, "--limit", "10"]),
        vec![q_5xx.clone(), q_ok.clone()],
        "--contains: the two records holding the marker, newest first"
    );
    assert_eq!(
        traces(&["--contains", &marker, "--status", "5xx"]),
        vec![q_5xx.clone()]
    );
    assert_eq!(
        traces(&["--contains", &marker, "--status", "503"]),
        vec![q_5xx.clone()]
    );
    assert_eq!(
        traces(&["--contains", &marker, "--status", "2xx"]),
        vec![q_ok.clone()]
    );
    assert_eq!(
        traces(&["--contains", &marker, "--limit", "1"]),
        vec![q_5xx.clone()]
    );
    assert_eq!(
        traces(&["--contains", &marker, "--since", "1h"]),
        vec![q_5xx.clone(), q_ok.clone()]
    );
    assert!(traces(&["--contains", "no-such-text-anywhere-42"]).is_empty());
    let all = traces(&["--limit", "10"]);
    assert_eq!(all.len(), 3, "all records: {all:?}");
    assert_eq!(all[0], q_other, "newest first: {all:?}");
    for bad in [
        &["--limit", "banana"][..],
        &["--status", "banana"],
        &["--since", "yesterday-ish"],
    ] {
        let mut a = vec!["traces", "--store", url.as_str()];
        a.extend_from_slice(bad);
        let o = run_cli(&a, &[], CLI_LIMIT);
        assert_eq!(
            o.code(),
            Some(2),
            "scoretap {a:?}: stdout {} stderr {}",
            o.stdout,
            o.stderr
        );
    }

    // Admin: GET /traces.
    let get = |q: String| {
        let admin = proxy.admin;
        async move {
            let r = admin_request(admin, "GET", &format!("/traces?{q}"), &[], b"")
                .await
                .expect("admin GET /traces");
            assert_eq!(r.status(), 200, "/traces?{q}: {}", r.body_str());
            assert!(
                r.header("content-type")
                    .is_some_and(|ct| ct.starts_with("application/x-ndjson")),
                "/traces content-type {:?}",
                r.header("content-type")
            );
            let recs = cli_lines(&r.body_str());
            assert_newest_first(&q, &recs);
            ids(&recs)
        }
    };
    assert_eq!(
        get(format!("contains={marker}&limit=5")).await,
        vec![q_5xx.clone(), q_ok.clone()]
    );
    assert_eq!(
        get(format!("contains={marker}&limit=5&status=5xx")).await,
        vec![q_5xx.clone()]
    );
    assert_eq!(
        get(format!("contains={marker}&limit=1")).await,
        vec![q_5xx.clone()]
    );
    assert_eq!(
        get(format!("contains={marker}&since=1h")).await,
        vec![q_5xx.clone(), q_ok.clone()]
    );
}

// ---------------------------------------------------------------- 14. invisible

fn comparable_headers(r: &Collected) -> Vec<(String, String)> {
    let volatile = ["date", "x-upstream-conn", "x-upstream-seq"];
    let mut h: Vec<(String, String)> = r
        .headers
        .iter()
        .filter(|(k, _)| !volatile.contains(&k.as_str()))
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    h.sort();
    h
}

/// method, path, request headers, request body.
type Case = (
    &'static str,
    &'static str,
    Vec<(&'static str, &'static str)>,
    Vec<u8>,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_is_invisible_to_clients() {
    let up = TestUpstream::start().await;
    let store_on = TraceStore::new();
    let store_off = TraceStore::new();
    let on = capture_proxy(&up, &store_on, &[]).await;
    let off = capture_proxy(&up, &store_off, &["--capture", "false"]).await;
    let json_body = json_of_size(1024, "inv");
    let bin = pattern(5, 3_000_000);
    let cases: Vec<Case> = vec![
        (
            "POST",
            "/echo",
            vec![("content-type", "application/json")],
            json_body,
        ),
        (
            "POST",
            "/echo",
            vec![("content-type", "application/octet-stream")],
            bin,
        ),
        (
            "POST",
            "/echo",
            vec![("content-type", "image/png")],
            pattern(9, 4000),
        ),
        ("GET", "/bytes?size=2000000&chunked=1", vec![], vec![]),
        ("GET", "/bytes?size=100000", vec![], vec![]),
        ("GET", "/sse?events=5", vec![], vec![]),
        ("GET", "/status/404", vec![], vec![]),
        ("GET", "/status/204", vec![], vec![]),
        ("GET", "/status/500", vec![], vec![]),
        ("GET", "/trailers", vec![("te", "trailers")], vec![]),
        ("HEAD", "/head", vec![], vec![]),
        ("GET", "/hop-response", vec![], vec![]),
    ];
    let mut last_on = String::new();
    for proto in [Proto::H1, Proto::H2] {
        let mut c_on = Client::connect(on.addr, proto).await;
        let mut c_off = Client::connect(off.addr, proto).await;
        for (i, (method, path, headers, body)) in cases.iter().enumerate() {
            let headers: Vec<(&str, &str)> = headers
                .iter()
                .copied()
                .filter(|(k, _)| proto == Proto::H2 || *k != "te")
                .collect();
            let id = format!("inv-{proto:?}-{i}");
            let a = send(&mut c_on, method, path, &id, &headers, body.clone()).await;
            let b = send(&mut c_off, method, path, &id, &headers, body.clone()).await;
            let what = format!("{proto:?} {method} {path}");
            assert_eq!(a.status, b.status, "{what}: status");
            assert_eq!(a.body.len(), b.body.len(), "{what}: body length");
            assert_eq!(
                sha256_hex(&a.body),
                sha256_hex(&b.body),
                "{what}: body bytes"
            );
            assert_eq!(
                comparable_headers(&a),
                comparable_headers(&b),
                "{what}: headers"
            );
            assert_eq!(a.trailers, b.trailers, "{what}: trailers");
            last_on = id;
        }
    }
    store_on.wait_one(&last_on).await;
    assert!(
        store_on.records().len() >= cases.len(),
        "capture on recorded too little"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        store_off.trace_files().is_empty(),
        "--capture false wrote trace files: {:?}",
        store_off.trace_files()
    );
}

// ---------------------------------------------------------------- more of the contract

#[tokio::test]
async fn capture_max_body_bytes_stops_capture_but_not_the_body() {
    let up = TestUpstream::start().await;
    let store = TraceStore::new();
    let proxy = capture_proxy(&up, &store, &["--capture-max-body-bytes", "100KiB"]).await;
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    let body = pattern(11, 300_000);
    let id = uid("max-body");
    let r = send(
        &mut c,
        "POST",
        "/echo",
        &id,
        &[("content-type", "application/octet-stream")],
        body.clone(),
    )
    .await;
    assert_eq!(
        r.body.as_ref(),
        body.as_slice(),
        "client got different bytes"
    );
    let rec = store.wait_one(&id).await;
    let b = rec.brief();
    for part in ["request", "response"] {
        let bo = body_of(&rec, part);
        assert_eq!(
            bo["size"].as_u64(),
            Some(300_000),
            "{part}: size is the full size: {b}"
        );
        assert_eq!(bo["complete"], false, "{part}: {b}");
        assert!(bo["sha256"].is_null(), "{part}: {b}");
        assert!(
            is_prefix(&inline_bytes(bo), &body),
            "{part}: inline not a prefix"
        );
    }
    // Under the limit: complete.
    let small = pattern(12, 50_000);
    let id = uid("under-max");
    send(
        &mut c,
        "POST",
        "/echo",
        &id,
        &[("content-type", "application/octet-stream")],
        small.clone(),
    )
    .await;
    let rec = store.wait_one(&id).await;
    assert_whole(&rec, "request", &small);
    assert_whole(&rec, "response", &small);
}

#[tokio::test]
async fn capture_settings_from_env_and_toml() {
    let up = TestUpstream::start().await;
    // Environment.
    let store = TraceStore::new();
    let proxy = Scoretap::builder()
        .args(upstream_args(&up))
        .env("SCORETAP_STORE", store.url())
        .env("SCORETAP_SERVICE", SERVICE)
        .env("SCORETAP_INSTANCE", INSTANCE)
        .env("SCORETAP_CAPTURE_EXCLUDE", "/skip*")
        .start()
        .await;
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    let skipped = uid("env-skip");
    send(&mut c, "GET", "/skip-me", &skipped, &[], "").await;
    let id = uid("env");
    send(&mut c, "GET", "/ok", &id, &[], "").await;
    let rec = store.wait_one(&id).await;
    assert_layout(&store, &rec);
    assert!(
        store.find(&skipped).is_none(),
        "SCORETAP_CAPTURE_EXCLUDE not applied"
    );

    // TOML.
    let store = TraceStore::new();
    let dir = scoretap_tests::util::TempDir::new("capcfg");
    let path = dir.join("scoretap.toml");
    std::fs::write(
        &path,
        format!(
            "store = \"{}\"\nservice = \"{SERVICE}\"\ninstance = \"{INSTANCE}\"\nsample-rate = 0.0\nadmin-token = \"{TOKEN}\"\ncapture-buffer-bytes = \"2MiB\"\n",
            store.url()
        ),
    )
    .unwrap();
    let proxy = Scoretap::builder()
        .args(upstream_args(&up))
        .args(["--config", path.to_str().unwrap()])
        .start()
        .await;
    let st = capture_state(proxy.admin).await;
    assert_eq!(st["sample_rate"].as_f64(), Some(0.0), "{st}");
    assert_eq!(
        st["stats"]["ring_capacity_bytes"].as_u64(),
        Some(2 * 1024 * 1024),
        "{st}"
    );
    assert_eq!(
        put_capture(proxy.admin, Some(TOKEN), &json!({"sample_rate": 1.0}))
            .await
            .0,
        200,
        "admin-token from TOML"
    );
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    let id = uid("toml");
    send(&mut c, "GET", "/ok", &id, &[], "").await;
    store.wait_one(&id).await;
}

#[test]
fn capture_bad_flag_values_exit_2_and_name_the_flag() {
    let up = ["--upstream", "http://127.0.0.1:9"];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--sample-rate", "1.5"], "--sample-rate"),
        (vec!["--sample-rate", "often"], "--sample-rate"),
        (vec!["--capture", "maybe"], "--capture"),
        (
            vec!["--capture-buffer-bytes", "lots"],
            "--capture-buffer-bytes",
        ),
        (
            vec!["--capture-buffer-slots", "many"],
            "--capture-buffer-slots",
        ),
        (
            vec!["--capture-max-body-bytes", "huge"],
            "--capture-max-body-bytes",
        ),
        (vec!["--store", "ftp://example.invalid/x"], "--store"),
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
}
