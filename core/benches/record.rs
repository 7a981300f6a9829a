//! Record assembly and serialization (`assemble_into`, which writes the JSON record itself):
//! a 1 KiB JSON request and response (the common scoring call, with and without JSON-path
//! redaction), and 64 KiB bodies, JSON, text and binary, which do not both fit in a record and
//! are cut. Throughput is the bodies' bytes.

use std::hint::black_box;
use std::time::{Duration, UNIX_EPOCH};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::{HeaderMap, HeaderValue, StatusCode};
use scoretap_core::record::{
    assemble_into, BodyCapture, RecordInput, RequestPart, ResponsePart, MAXIMUM_RECORD_BYTES,
};
use scoretap_core::redaction::Redaction;

/// JSON of about `size` bytes: `{"data": [[...], ...]}` of floats, as a scoring request is,
/// with the `", "` and `": "` separators Python's `json.dumps` (and so `requests`) writes.
fn json_body(size: usize) -> Vec<u8> {
    let mut text = String::from("{\"data\": [");
    let mut row = 0_u32;
    while text.len() + 64 < size {
        if row > 0 {
            text.push_str(", ");
        }
        text.push_str(&format!(
            "[{}.25, -{}.5, {}e-3, 0.{}]",
            row % 97,
            row % 13,
            row * 7 % 1000,
            row * 31 % 10_000
        ));
        row += 1;
    }
    text.push_str("], \"id\": \"abc\"}");
    text.into_bytes()
}

/// [`json_body`] without whitespace, as most other clients send it.
fn compact_json_body(size: usize) -> Vec<u8> {
    let spaced = String::from_utf8(json_body(size)).expect("ASCII");
    spaced.replace(", ", ",").replace(": ", ":").into_bytes()
}

/// Text of `size` bytes with quotes, newlines and multibyte characters (not JSON).
fn text_body(size: usize) -> Vec<u8> {
    let line = "log line \"quoted\" value=42 é世\n";
    line.repeat(size / line.len() + 1).as_bytes()[..size].to_vec()
}

/// `size` pseudo-random bytes (not UTF-8).
fn binary_body(size: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    (0..size)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect()
}

fn capture(body: &[u8], content_type: &str) -> BodyCapture {
    BodyCapture {
        size: body.len() as u64,
        sha256: Some([0xab; 32]),
        content_type: Some(content_type.to_owned()),
        prefix: body[..body.len().min(MAXIMUM_RECORD_BYTES)].to_vec(),
        complete: body.len() <= MAXIMUM_RECORD_BYTES,
        excluded: None,
        blob: None,
    }
}

fn headers(content_type: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("host", "scoring.example:8080"),
        ("user-agent", "python-requests/2.32.3"),
        ("accept", "*/*"),
        ("authorization", "Bearer eyJhbGciOiJIUzI1NiJ9.e30.abc"),
        ("x-request-id", "0190f5b4-6c1e-7a3b-8f00-0123456789ab"),
        ("content-type", content_type),
    ] {
        headers.insert(
            name,
            HeaderValue::from_str(value).expect("a valid header value"),
        );
    }
    headers
}

struct Case {
    name: &'static str,
    request: BodyCapture,
    response: BodyCapture,
    request_headers: HeaderMap,
    response_headers: HeaderMap,
    redaction: Redaction,
}

impl Case {
    fn new(name: &'static str, request: &[u8], response: &[u8], content_type: &str) -> Self {
        Self {
            name,
            request: capture(request, content_type),
            response: capture(response, content_type),
            request_headers: headers(content_type),
            response_headers: headers(content_type),
            redaction: Redaction::default(),
        }
    }

    fn input(&self) -> RecordInput<'_> {
        RecordInput {
            id: "0190f5b4-6c1e-7a3b-8f00-0123456789ab",
            correlation_id: "0190f5b4-6c1e-7a3b-8f00-0123456789ab",
            service: "fraud-model",
            started_at: UNIX_EPOCH + Duration::new(1_795_454_445, 380_492_123),
            duration_ms: 12.5,
            outcome: "ok",
            error: None,
            request: RequestPart {
                method: "POST",
                path: "/score",
                query: None,
                http_version: "HTTP/1.1",
                headers: &self.request_headers,
                body: &self.request,
            },
            response: Some(ResponsePart {
                status: StatusCode::OK,
                headers: &self.response_headers,
                body: &self.response,
                trailers: None,
            }),
        }
    }
}

fn record(c: &mut Criterion) {
    let json_1k = json_body(1024);
    let compact_1k = compact_json_body(1024);
    let json_64k = json_body(64 * 1024);
    let text_64k = text_body(64 * 1024);
    let binary_64k = binary_body(64 * 1024);
    let mut redacted = Case::new("json_1KiB_redacted", &json_1k, &json_1k, "application/json");
    redacted.redaction =
        Redaction::new(&[], &["$.data[*].password".to_owned(), "$.ssn".to_owned()])
            .expect("valid paths");
    let mut mentioned = Case::new(
        "json_1KiB_redacted_field_present",
        &json_1k,
        &json_1k,
        "application/json",
    );
    mentioned.redaction = Redaction::new(&[], &["$.id".to_owned()]).expect("valid paths");
    let cases = [
        Case::new("json_1KiB", &json_1k, &json_1k, "application/json"),
        Case::new(
            "json_1KiB_compact",
            &compact_1k,
            &compact_1k,
            "application/json",
        ),
        redacted,
        mentioned,
        Case::new("json_64KiB", &json_64k, &json_64k, "application/json"),
        Case::new("text_64KiB", &text_64k, &text_64k, "text/plain"),
        Case::new(
            "binary_64KiB",
            &binary_64k,
            &binary_64k,
            "application/octet-stream",
        ),
    ];
    let mut group = c.benchmark_group("record");
    let mut out = Vec::with_capacity(MAXIMUM_RECORD_BYTES);
    for case in &cases {
        let input = case.input();
        assemble_into(&input, &case.redaction, MAXIMUM_RECORD_BYTES, &mut out);
        assert!(out.len() <= MAXIMUM_RECORD_BYTES);
        serde_json::from_slice::<serde_json::Value>(&out).expect("a record is JSON");
        group.throughput(Throughput::Bytes(case.request.size + case.response.size));
        group.bench_function(BenchmarkId::new("assemble_into", case.name), |b| {
            b.iter(|| {
                assemble_into(
                    black_box(&input),
                    &case.redaction,
                    MAXIMUM_RECORD_BYTES,
                    &mut out,
                );
                black_box(out.len())
            });
        });
    }
    group.finish();
}

criterion_group!(benches, record);
criterion_main!(benches);
