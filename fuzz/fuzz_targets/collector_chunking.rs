//! The capture path end to end, through public API only: two bodies split into arbitrary frames
//! (empty ones, trailers, an error, a drop before the end) are polled through real `TeeBody`s
//! into a ring of arbitrary slots and byte budget, then a real collector thread drains it into a
//! memory sink.
//!
//! Checked: at most one record, exactly one when the exchange's start got into the ring; it is
//! JSON within 65,536 bytes; a body recorded `complete` (or with a `sha256`) has the size of
//! the whole body and the SHA-256 of the whole body however it was chunked; a body that crossed
//! whole with nothing dropped is recorded complete; `size` never exceeds what crossed; `inline`
//! is always a prefix of the body.
#![no_main]

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Instant, SystemTime};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body::{Body, Frame};
use libfuzzer_sys::fuzz_target;
use scoretap_core::collector::{self, CollectorSettings};
use scoretap_core::record::MAXIMUM_RECORD_BYTES;
use scoretap_core::ring::{
    self, CaptureEvent, CaptureStats, Direction, ExchangeStart, ResponseStart,
};
use scoretap_core::sink::TraceSink;
use scoretap_core::storage::staging::StagingError;
use scoretap_core::tee::{BodyErrorEnd, BodyTap, TeeBody};
use scoretap_fuzz::{arbitrary, body, hex, Unstructured};
use serde_json::Value;

/// Records kept in memory.
#[derive(Debug, Clone, Default)]
struct MemorySink(Arc<Mutex<Vec<Vec<u8>>>>);

impl TraceSink for MemorySink {
    fn write_record(&mut self, record: &[u8]) -> Result<(), StagingError> {
        if let Ok(mut records) = self.0.lock() {
            records.push(record.to_vec());
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StagingError> {
        Ok(())
    }
}

#[derive(Debug)]
struct BodyError;

impl fmt::Display for BodyError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("reset by peer")
    }
}

impl BodyErrorEnd for BodyError {}

/// A body of prepared frames, ending with trailers or an error when asked.
#[derive(Debug)]
struct Frames {
    frames: VecDeque<Result<Frame<Bytes>, BodyError>>,
}

impl Body for Frames {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        Poll::Ready(self.frames.pop_front())
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
    }
}

/// How one body crosses.
#[derive(Debug)]
struct Plan {
    whole: Vec<u8>,
    frames: VecDeque<Result<Frame<Bytes>, BodyError>>,
    /// Frames polled before the body is dropped (all of them when `None`).
    polled: Option<usize>,
    /// The body ends normally after its data (with or without trailers).
    ends_normally: bool,
    capture_bytes: bool,
}

fn plan(u: &mut Unstructured<'_>) -> arbitrary::Result<Plan> {
    let whole = body(u)?.bytes;
    let mut frames = VecDeque::new();
    let mut offset = 0;
    while offset < whole.len() {
        // The rest in one frame once the input or the frame count runs out.
        let length = if u.is_empty() || frames.len() >= 1024 {
            whole.len() - offset
        } else {
            match u.int_in_range(0_u8..=7)? {
                0 => 0,
                1 => 1,
                2 => u.int_in_range(1..=16)?,
                3 => u.int_in_range(60_000..=70_000)?,
                _ => u.int_in_range(1..=16_384)?,
            }
        };
        let end = offset.saturating_add(length).min(whole.len());
        let data = Bytes::copy_from_slice(whole.get(offset..end).unwrap_or_default());
        frames.push_back(Ok(Frame::data(data)));
        offset = end;
    }
    let ends_normally = match u.int_in_range(0_u8..=7)? {
        0 => {
            frames.push_back(Err(BodyError));
            false
        }
        1 => {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            frames.push_back(Ok(Frame::trailers(trailers)));
            true
        }
        _ => true,
    };
    let polled = if u.ratio(1_u8, 8)? {
        Some(u.int_in_range(0..=frames.len())?)
    } else {
        None
    };
    Ok(Plan {
        whole,
        frames,
        polled,
        ends_normally,
        capture_bytes: u.ratio(15_u8, 16)?,
    })
}

/// Polls a tee over the planned frames, as hyper would; returns whether it crossed whole.
fn cross(plan: &mut Plan, tap: BodyTap) -> bool {
    let frames = std::mem::take(&mut plan.frames);
    let count = frames.len();
    let mut tee = TeeBody::new(Frames { frames }, Some(tap), None);
    let mut context = Context::from_waker(Waker::noop());
    let mut polled = 0;
    while plan.polled.is_none_or(|most| polled < most) {
        match Pin::new(&mut tee).poll_frame(&mut context) {
            Poll::Ready(Some(_)) => polled += 1,
            Poll::Ready(None) | Poll::Pending => break,
        }
        if tee.is_end_stream() {
            break;
        }
    }
    polled >= count && plan.ends_normally
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(mut request) = plan(&mut u) else {
        return;
    };
    let Ok(mut response) = plan(&mut u) else {
        return;
    };
    let slots = u.int_in_range(1..=600).unwrap_or(600);
    let budget = match u.int_in_range(0_u8..=3).unwrap_or(0) {
        0 => u.int_in_range(0..=200_000).unwrap_or(0),
        _ => 64 << 20,
    };
    let stats = Arc::new(CaptureStats::default());
    let (ring, receiver) = ring::ring(slots, budget, stats.clone());
    let mut content_type = HeaderMap::new();
    content_type.insert("content-type", HeaderValue::from_static("application/json"));
    let started = ring.push(CaptureEvent::Start(Box::new(ExchangeStart {
        exchange: 7,
        at: Instant::now(),
        started_at: SystemTime::now(),
        correlation_id: HeaderValue::from_static("fuzz"),
        method: http::Method::POST,
        uri: http::Uri::from_static("/score"),
        http_version: "HTTP/1.1",
        headers: content_type.clone(),
        request_body_excluded: (!request.capture_bytes).then_some("content_type"),
    })));
    // The tee's capture limit: past it a body is given up (recorded incomplete).
    let limit = if u.ratio(1_u8, 8).unwrap_or(false) {
        u.int_in_range(0..=300_000).unwrap_or(0)
    } else {
        MAXIMUM_RECORD_BYTES as u64 * 16
    };
    let tap = BodyTap::new(
        ring.clone(),
        7,
        Direction::Request,
        request.capture_bytes,
        limit,
    );
    let request_whole = cross(&mut request, tap);
    ring.push(CaptureEvent::Response(Box::new(ResponseStart {
        exchange: 7,
        status: StatusCode::OK,
        headers: content_type,
        outcome: "ok",
        error: None,
        body_excluded: (!response.capture_bytes).then_some("content_type"),
    })));
    let tap = BodyTap::new(
        ring.clone(),
        7,
        Direction::Response,
        response.capture_bytes,
        limit,
    );
    let response_whole = cross(&mut response, tap);
    let nothing_dropped = stats.dropped_total() == 0;
    drop(ring);

    let sink = MemorySink::default();
    let collector = collector::spawn(
        receiver,
        Box::new(sink.clone()),
        None,
        CollectorSettings::default(),
        Arc::new(AtomicBool::new(false)),
    )
    .expect("the collector thread starts");
    collector.join().expect("the collector never panics");
    let records = sink.0.lock().expect("not poisoned").clone();
    assert!(records.len() <= 1, "one exchange, one record");
    if !started {
        assert!(records.is_empty());
        return;
    }
    assert_eq!(records.len(), 1, "a started exchange is recorded");
    let record = &records[0];
    assert!(record.len() <= MAXIMUM_RECORD_BYTES);
    let record: Value = serde_json::from_slice(record).expect("a record is JSON");
    let bodies = [
        (&record["request"]["body"], &request, request_whole),
        (&record["response"]["body"], &response, response_whole),
    ];
    for (body, plan, whole) in bodies {
        let whole = whole && (!plan.capture_bytes || plan.whole.len() as u64 <= limit);
        if body.is_null() {
            // No response head reached the collector.
            assert!(!nothing_dropped);
            continue;
        }
        check_body(body, plan, whole && nothing_dropped);
    }
});

fn check_body(body: &Value, plan: &Plan, crossed_whole: bool) {
    let length = plan.whole.len() as u64;
    let size = body["size"].as_u64().expect("size is a number");
    assert!(size <= length, "size {size} > {length}");
    let digest = hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &plan.whole).as_ref());
    let complete = body["complete"] == true;
    if !body["sha256"].is_null() {
        assert_eq!(body["sha256"], digest.as_str(), "sha256 of the whole body");
        assert_eq!(size, length);
        assert!(complete);
    }
    if crossed_whole {
        assert_eq!(size, length, "the size of a body that crossed");
        assert!(complete, "a body that crossed whole is complete");
        if plan.capture_bytes {
            assert_eq!(body["sha256"], digest.as_str(), "sha256 of a whole body");
        }
    }
    if !plan.capture_bytes {
        assert_eq!(body["inline"], Value::Null);
        return;
    }
    let inline: Vec<u8> = match body["encoding"].as_str() {
        Some("json") => {
            // A JSON inline is the whole body: compared as a value.
            assert!(complete);
            let parsed: Value = serde_json::from_slice(&plan.whole).expect("json is JSON");
            assert_eq!(body["inline"], parsed);
            return;
        }
        Some("utf8") => body["inline"]
            .as_str()
            .expect("a string")
            .as_bytes()
            .to_vec(),
        Some("base64") => BASE64
            .decode(body["inline"].as_str().expect("a string"))
            .expect("base64"),
        other => panic!("encoding {other:?}"),
    };
    assert!(
        plan.whole.starts_with(&inline),
        "inline is a prefix of the body"
    );
}
