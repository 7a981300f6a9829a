//! The capture pipeline never claims what did not happen: a full ring, many open exchanges, or a
//! client that closes the moment it has what it wanted must not turn a completed answer into a
//! cancelled one, nor a record without its response.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use scoretap_tests::client::upload_pattern;
use scoretap_tests::harness::upstream_args;
use scoretap_tests::metrics::scrape;
use scoretap_tests::raw::{chunk, request_bytes};
use scoretap_tests::traces::{TraceRecord, TraceStore};
use scoretap_tests::util::{pattern_sha256, sha256_hex};
use scoretap_tests::*;

/// How long "nothing was recorded" is given to prove itself (several collector flush periods).
const QUIET: Duration = Duration::from_millis(1500);

async fn capture_proxy(up_args: Vec<String>, store: &TraceStore, extra: &[&str]) -> Scoretap {
    Scoretap::builder()
        .args(up_args)
        .args(store.args())
        .args(["--service", "edges", "--instance", "edges-1"])
        .args(extra.iter().copied())
        .start()
        .await
}

/// Stops the proxy (SIGTERM: the collector writes everything it holds) and reads every record,
/// by correlation id.
async fn records_after_exit(
    proxy: &mut Scoretap,
    store: &TraceStore,
) -> HashMap<String, TraceRecord> {
    proxy.sigterm();
    proxy.wait_exit(Duration::from_secs(30)).await;
    let mut by_id = HashMap::new();
    for record in store.records() {
        let id = record.correlation_id().to_owned();
        assert!(
            by_id.insert(id.clone(), record).is_none(),
            "two records for {id}"
        );
    }
    by_id
}

/// What a recorded body claims must hold: incomplete means no digest; complete means the digest
/// of the bytes that crossed.
fn check_body(record: &TraceRecord, part: &str, expected_sha256: &str) {
    let body = record.at(&format!("/{part}/body"));
    match body["complete"].as_bool() {
        Some(true) => assert_eq!(
            body["sha256"].as_str(),
            Some(expected_sha256),
            "a complete {part} body has the digest of what crossed: {}",
            record.brief()
        ),
        Some(false) => assert!(
            body["sha256"].is_null(),
            "an incomplete {part} body has no digest: {}",
            record.brief()
        ),
        None => panic!("{part} body without complete: {}", record.brief()),
    }
}

fn ring_full_drops(e: &scoretap_tests::metrics::Exposition) -> f64 {
    ["ring_full_bytes", "ring_full_slots"]
        .iter()
        .map(|reason| e.value("scoretap_capture_dropped_total", &[("reason", reason)]))
        .sum()
}

/// When the capture ring has no room for a response head (or a body's end), a completed 200 was
/// recorded as `client_cancelled` with `response: null` (or, its end refused, written only at
/// shutdown as `capture_incomplete`). A ring filled by concurrent large uploads while small
/// exchanges complete: every record of a 200 says 200 and `ok`; what was dropped is body bytes
/// only (counted; that body `complete: false`, `sha256: null`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_ring_never_records_a_completed_answer_as_cancelled() {
    let up = TestUpstream::start().await;
    let store = TraceStore::new();
    let mut proxy = capture_proxy(
        upstream_args(&up),
        &store,
        &[
            "--capture-buffer-bytes",
            "64KiB",
            "--capture-buffer-slots",
            "16",
        ],
    )
    .await;

    const UPLOADS: usize = 6;
    const UPLOAD_BYTES: u64 = 8 << 20;
    let mut uploads = Vec::new();
    for i in 0..UPLOADS {
        let addr = proxy.addr;
        uploads.push(tokio::spawn(async move {
            let mut c = Client::connect(addr, Proto::H1).await;
            let id = format!("upload-{i}");
            let r = upload_pattern(
                &mut c,
                "/sink",
                &id,
                UPLOAD_BYTES,
                "application/octet-stream",
                None,
            )
            .await;
            (id, r.status.as_u16())
        }));
    }
    const SMALL_TASKS: usize = 4;
    const SMALL_EACH: usize = 40;
    let mut smalls = Vec::new();
    for t in 0..SMALL_TASKS {
        let addr = proxy.addr;
        smalls.push(tokio::spawn(async move {
            let mut c = Client::connect(addr, Proto::H1).await;
            let mut out = Vec::new();
            for i in 0..SMALL_EACH {
                let id = format!("small-{t}-{i}");
                let body = format!("{{\"small\":\"{id}\"}}");
                let req = c
                    .req("POST", "/echo")
                    .header("x-request-id", id.as_str())
                    .header("content-type", "application/json")
                    .body(client::full(body.clone()))
                    .unwrap();
                let r = c.fetch(req, Duration::from_secs(30)).await;
                out.push((id, r.status.as_u16(), body));
            }
            out
        }));
    }
    let mut statuses: HashMap<String, (u16, String)> = HashMap::new();
    for u in uploads {
        let (id, status) = u.await.unwrap();
        statuses.insert(id, (status, pattern_sha256(UPLOAD_BYTES)));
    }
    for s in smalls {
        for (id, status, body) in s.await.unwrap() {
            statuses.insert(id, (status, sha256_hex(body.as_bytes())));
        }
    }
    assert!(
        statuses.values().all(|(status, _)| *status == 200),
        "every exchange answered 200: {statuses:?}"
    );
    let e = scrape(proxy.admin).await;
    let drops = ring_full_drops(&e);
    assert!(
        drops > 0.0,
        "the uploads must fill the 64 KiB ring: {}",
        e.describe("scoretap_capture_dropped_total")
    );

    let records = records_after_exit(&mut proxy, &store).await;
    let mut wrong = Vec::new();
    let mut small_recorded = 0;
    for (id, record) in &records {
        let Some((_, sha)) = statuses.get(id) else {
            panic!("a record nobody sent: {}", record.brief());
        };
        small_recorded += usize::from(id.starts_with("small-"));
        let status = record.u64_at("/response/status");
        let outcome = record.str_at("/outcome");
        if status != Some(200) || outcome != Some("ok") || !record.at("/error").is_null() {
            wrong.push(format!(
                "{id}: response.status {status:?}, outcome {outcome:?}, error {}",
                record.at("/error")
            ));
            continue;
        }
        let request_sha = if id.starts_with("small-") {
            sha.as_str()
        } else {
            &pattern_sha256(UPLOAD_BYTES)
        };
        check_body(record, "request", request_sha);
        if id.starts_with("small-") {
            check_body(record, "response", sha);
        }
    }
    eprintln!(
        "full ring: {drops} drops, {} records ({small_recorded} small of {})",
        records.len(),
        SMALL_TASKS * SMALL_EACH
    );
    assert!(
        wrong.is_empty(),
        "{} of {} records of 200 exchanges claim something else:\n{}",
        wrong.len(),
        records.len(),
        wrong.join("\n")
    );
    assert!(small_recorded > 0, "no small exchange was captured at all");
}

/// Open exchanges were capped at a hard-coded 10,000 in the collector, past which the oldest was
/// written as incomplete: 500 req/s of 30 s inferences lost their responses. Now a new exchange
/// past `--capture-max-open-exchanges` is not captured (counted as `open_exchanges_full`), and
/// the exchanges already captured keep their responses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchanges_past_the_open_limit_are_not_captured_and_none_loses_its_response() {
    let up = TestUpstream::start().await;
    let store = TraceStore::new();
    const OPEN: usize = 8;
    const LATE: usize = 4;
    let proxy = capture_proxy(
        upstream_args(&up),
        &store,
        &["--capture-max-open-exchanges", &OPEN.to_string()],
    )
    .await;
    let slow = |addr, id: String| async move {
        let mut c = Client::connect(addr, Proto::H1).await;
        let req = c
            .req("GET", "/delay?ms=2000")
            .header("x-request-id", id.as_str())
            .body(client::empty())
            .unwrap();
        let r = c.fetch(req, Duration::from_secs(30)).await;
        (id, r.status, r.body)
    };
    let mut tasks = Vec::new();
    for i in 0..OPEN {
        tasks.push(tokio::spawn(slow(proxy.addr, format!("first-{i}"))));
    }
    assert!(
        util::eventually(Duration::from_secs(10), || up.request_count() >= OPEN).await,
        "the upstream saw {} of the first {OPEN}",
        up.request_count()
    );
    for i in 0..LATE {
        tasks.push(tokio::spawn(slow(proxy.addr, format!("late-{i}"))));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    for (id, status, body) in &answers {
        assert_eq!(*status, 200, "{id}: {body:?}");
    }
    for (id, _, body) in answers.iter().filter(|(id, ..)| id.starts_with("first-")) {
        let record = store.wait_one(id).await;
        assert_eq!(
            record.u64_at("/response/status"),
            Some(200),
            "{}",
            record.brief()
        );
        assert_eq!(record.str_at("/outcome"), Some("ok"), "{}", record.brief());
        assert!(record.at("/error").is_null(), "{}", record.brief());
        assert_eq!(
            record.at("/response/body/complete").as_bool(),
            Some(true),
            "{}",
            record.brief()
        );
        assert_eq!(
            record.str_at("/response/body/sha256"),
            Some(sha256_hex(body).as_str()),
            "{}",
            record.brief()
        );
    }
    tokio::time::sleep(QUIET).await;
    for (id, ..) in answers.iter().filter(|(id, ..)| id.starts_with("late-")) {
        assert!(
            store.find(id).is_none(),
            "{id} was past the limit and must not be captured: {}",
            store.find(id).unwrap().brief()
        );
    }
    let e = scrape(proxy.admin).await;
    assert_eq!(
        e.value(
            "scoretap_capture_dropped_total",
            &[("reason", "open_exchanges_full")]
        ),
        LATE as f64,
        "{}",
        e.describe("scoretap_capture_dropped_total")
    );
    // Written records give their place back.
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    let req = c
        .req("GET", "/delay?ms=10")
        .header("x-request-id", "after")
        .body(client::empty())
        .unwrap();
    assert_eq!(c.fetch(req, Duration::from_secs(10)).await.status, 200);
    let record = store.wait_one("after").await;
    assert_eq!(record.str_at("/outcome"), Some("ok"), "{}", record.brief());
}

/// The byte budget bounds open exchanges too: each one's state counts against it from its start
/// to its record. With a small budget and slow exchanges, only some are captured, the rest are
/// counted as dropped, and every record has its response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_exchanges_count_against_the_byte_budget() {
    let up = TestUpstream::start().await;
    let store = TraceStore::new();
    const SENT: usize = 24;
    let proxy = capture_proxy(
        upstream_args(&up),
        &store,
        &["--capture-buffer-bytes", "16KiB"],
    )
    .await;
    let mut tasks = Vec::new();
    for i in 0..SENT {
        let addr = proxy.addr;
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(addr, Proto::H1).await;
            let id = format!("slow-{i}");
            let req = c
                .req("GET", "/delay?ms=1500")
                .header("x-request-id", id.as_str())
                .body(client::empty())
                .unwrap();
            (id, c.fetch(req, Duration::from_secs(30)).await.status)
        }));
    }
    for t in tasks {
        let (id, status) = t.await.unwrap();
        assert_eq!(status, 200, "{id}");
    }
    tokio::time::sleep(QUIET).await;
    let records = store.records();
    for record in &records {
        assert_eq!(
            record.u64_at("/response/status"),
            Some(200),
            "{}",
            record.brief()
        );
        assert_eq!(record.str_at("/outcome"), Some("ok"), "{}", record.brief());
        assert!(record.at("/error").is_null(), "{}", record.brief());
    }
    let e = scrape(proxy.admin).await;
    let drops = e.value(
        "scoretap_capture_dropped_total",
        &[("reason", "ring_full_bytes")],
    );
    eprintln!(
        "16 KiB budget: {} of {SENT} captured, {drops} dropped",
        records.len()
    );
    assert!(
        !records.is_empty() && records.len() < SENT,
        "{} of {SENT} slow exchanges captured in a 16 KiB budget",
        records.len()
    );
    assert_eq!(
        drops,
        (SENT - records.len()) as f64,
        "every exchange not captured is counted: {}",
        e.describe("scoretap_capture_dropped_total")
    );
}

/// A streamed response whose every byte reached the client was sometimes recorded as
/// `client_cancelled` with `sha256: null`: the client (like the OpenAI Python client) closes
/// as soon as it has read `data: [DONE]`, and scoretap wrote the last event and the end of the
/// body in two writes although the upstream sent them in one, so the close could land between
/// them. Every record must be `ok` with the whole body and its digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_read_to_its_last_event_is_recorded_complete() {
    const EVENTS: [&[u8]; 3] = [
        b"data: {\"delta\":\"hel\"}\n\n",
        b"data: {\"delta\":\"lo\"}\n\n",
        b"data: [DONE]\n\n",
    ];
    let up = RawUpstream::start(|_| {
        let head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
        let mut first = head.to_vec();
        first.extend(chunk(EVENTS[0]));
        first.extend(chunk(EVENTS[1]));
        // The last event and the end of the body in one write.
        let mut last = chunk(EVENTS[2]);
        last.extend_from_slice(b"0\r\n\r\n");
        RawReply::bytes(first).then(Duration::from_millis(2), last)
    })
    .await;
    let store = TraceStore::new();
    let proxy = capture_proxy(vec!["--upstream".into(), up.url()], &store, &[]).await;
    let whole: Vec<u8> = EVENTS.concat();
    let whole_sha = sha256_hex(&whole);

    const ROUNDS: usize = 320;
    const PARALLEL: usize = 16;
    let mut tasks = Vec::new();
    for p in 0..PARALLEL {
        let addr = proxy.addr;
        tasks.push(tokio::spawn(async move {
            let mut together = 0;
            for i in 0..ROUNDS / PARALLEL {
                let id = format!("sse-{p}-{i}");
                let mut conn = RawConn::connect(addr).await;
                conn.send(&request_bytes(
                    "GET /v1/chat/completions HTTP/1.1",
                    &[("host", "model"), ("x-request-id", &id)],
                    b"",
                ))
                .await;
                let mut received = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    let bytes = conn.read_some().await;
                    assert!(
                        !bytes.is_empty(),
                        "{id}: closed before [DONE]: {received:?}"
                    );
                    assert!(Instant::now() < deadline, "{id}: no [DONE] in time");
                    received.extend_from_slice(&bytes);
                    if let Some(at) = find(&received, b"data: [DONE]\n\n") {
                        // What arrived with the last event: its chunk's CRLF, then the end.
                        together += usize::from(received[at..].ends_with(b"\r\n0\r\n\r\n"));
                        break;
                    }
                }
                // Close at once, as the OpenAI client does.
                drop(conn);
            }
            together
        }));
    }
    let mut together = 0;
    for t in tasks {
        together += t.await.unwrap();
    }
    let mut wrong = Vec::new();
    for p in 0..PARALLEL {
        for i in 0..ROUNDS / PARALLEL {
            let record = store.wait(&format!("sse-{p}-{i}")).await;
            let body = record.at("/response/body");
            if record.str_at("/outcome") != Some("ok")
                || body["complete"].as_bool() != Some(true)
                || body["sha256"].as_str() != Some(whole_sha.as_str())
            {
                wrong.push(format!(
                    "sse-{p}-{i}: outcome {:?}, error {}, complete {}, sha256 {}",
                    record.str_at("/outcome"),
                    record.at("/error"),
                    body["complete"],
                    body["sha256"]
                ));
            }
        }
    }
    eprintln!(
        "[DONE] and the end of the body in the same read: {together} of {ROUNDS}; wrong records: {}",
        wrong.len()
    );
    assert!(
        wrong.is_empty(),
        "{} of {ROUNDS} streams read to their last event recorded as not complete:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}
