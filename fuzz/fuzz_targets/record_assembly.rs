//! Record assembly and truncation: arbitrary heads, bodies (any size, cut anywhere, complete or
//! not, JSON, text, binary, excluded, spilled), trailers and redaction settings, assembled into
//! a record of at most 65,536 bytes (and then of an arbitrary smaller limit).
//!
//! Checked on every record: it is valid JSON within the limit; `schema` is there (at 64 KiB the
//! whole record is, never the last-resort minimal object); each body's `size`, `sha256`,
//! `complete`, `excluded` are the capture's; `inline` decodes to a prefix of the captured bytes
//! (`utf8`: cut on a character boundary; `base64`: only for bytes that are not UTF-8; `json`:
//! the whole body, equal as a value), `truncated` says whether it is all of the body; headers are
//! the message's (lower-cased, repeated fields joined) with secrets replaced; fields are the
//! input's unless `record_truncated`. With JSON paths configured, no `SECRET` put under a
//! top-level `password` ever reaches a record, whole or cut.
#![no_main]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use http::{HeaderMap, StatusCode};
use libfuzzer_sys::fuzz_target;
use scoretap_core::record::{
    assemble_into, BodyCapture, RecordInput, RequestPart, ResponsePart, MAXIMUM_RECORD_BYTES,
    SCHEMA,
};
use scoretap_core::redaction::{Redaction, REDACTED};
use scoretap_fuzz::{arbitrary, body, contains, header_map, hex, long_text, text, Unstructured};
use serde_json::Value;

/// The owned parts of an exchange.
#[derive(Debug)]
struct Exchange {
    id: String,
    correlation_id: String,
    service: String,
    started_at: SystemTime,
    duration_ms: f64,
    outcome: String,
    error: Option<(String, String)>,
    method: String,
    path: String,
    query: Option<String>,
    http_version: String,
    request_headers: HeaderMap,
    request_body: BodyCapture,
    request_secret: bool,
    response: Option<Response>,
}

#[derive(Debug)]
struct Response {
    status: StatusCode,
    headers: HeaderMap,
    body: BodyCapture,
    secret: bool,
    trailers: Option<HeaderMap>,
}

const EXCLUSION_REASONS: [&str; 2] = ["content_type", "image/png"];

/// A capture of a body, as the tee and collector could make it, or stranger.
fn capture(u: &mut Unstructured<'_>) -> arbitrary::Result<(BodyCapture, bool)> {
    let body = body(u)?;
    // The tee keeps at most a record's worth of a body.
    let whole_size = u64::try_from(body.bytes.len()).unwrap_or(u64::MAX);
    let mut prefix = body.bytes;
    prefix.truncate(MAXIMUM_RECORD_BYTES);
    let mut size = whole_size;
    match u.int_in_range(0_u8..=7)? {
        // Cut by capture: the prefix is shorter than the body.
        0 => {
            let keep = u.int_in_range(0..=prefix.len())?;
            prefix.truncate(keep);
        }
        // A body larger than what was kept, by any amount.
        1 => size = whole_size.saturating_add(u.arbitrary::<u64>()?),
        2 => size = whole_size.saturating_add(u.int_in_range(1..=300_000)?),
        _ => {}
    }
    let holds_whole = u64::try_from(prefix.len()).ok() == Some(size);
    let complete = if u.ratio(1_u8, 8)? {
        u.arbitrary()?
    } else {
        holds_whole
    };
    let sha256 = if u.ratio(7_u8, 8)? {
        Some(u.arbitrary::<[u8; 32]>()?)
    } else {
        None
    };
    let content_type = match u.int_in_range(0_u8..=5)? {
        0 => None,
        1 => Some("application/json".to_owned()),
        2 => Some("text/plain; charset=utf-8".to_owned()),
        3 => Some("application/octet-stream".to_owned()),
        4 => Some(text(u, 4)?),
        _ => Some(long_text(u)?),
    };
    let excluded = if u.ratio(1_u8, 16)? {
        Some(*u.choose(&EXCLUSION_REASONS)?)
    } else {
        None
    };
    let blob = if u.ratio(1_u8, 8)? {
        Some(long_text(u)?)
    } else {
        None
    };
    Ok((
        BodyCapture {
            size,
            sha256,
            content_type,
            prefix,
            complete,
            excluded,
            blob,
        },
        body.has_secret,
    ))
}

impl Exchange {
    fn arbitrary(u: &mut Unstructured<'_>) -> arbitrary::Result<Self> {
        let (request_body, request_secret) = capture(u)?;
        let response = if u.ratio(7_u8, 8)? {
            let (body, secret) = capture(u)?;
            Some(Response {
                status: StatusCode::from_u16(u.int_in_range(100..=999)?).unwrap_or(StatusCode::OK),
                headers: header_map(u, 12)?,
                body,
                secret,
                trailers: if u.ratio(1_u8, 4)? {
                    Some(header_map(u, 4)?)
                } else {
                    None
                },
            })
        } else {
            None
        };
        Ok(Self {
            id: if u.ratio(7_u8, 8)? {
                "0190f5b4-6c1e-7a3b-8f00-0123456789ab".to_owned()
            } else {
                long_text(u)?
            },
            correlation_id: text(u, 4)?,
            service: text(u, 3)?,
            started_at: if u.ratio(1_u8, 2)? {
                UNIX_EPOCH + Duration::new(u.arbitrary::<u64>()? >> 20, 0)
            } else {
                UNIX_EPOCH + Duration::new(1_795_454_445, u.int_in_range(0..=999_999_999)?)
            },
            duration_ms: u.arbitrary()?,
            outcome: text(u, 2)?,
            error: if u.ratio(1_u8, 4)? {
                Some((text(u, 3)?, long_text(u)?))
            } else {
                None
            },
            method: text(u, 2)?,
            path: long_text(u)?,
            query: if u.ratio(1_u8, 2)? {
                Some(long_text(u)?)
            } else {
                None
            },
            http_version: text(u, 2)?,
            request_headers: header_map(u, 16)?,
            request_body,
            request_secret,
            response,
        })
    }

    fn input(&self) -> RecordInput<'_> {
        RecordInput {
            id: &self.id,
            correlation_id: &self.correlation_id,
            service: &self.service,
            started_at: self.started_at,
            duration_ms: self.duration_ms,
            outcome: &self.outcome,
            error: self
                .error
                .as_ref()
                .map(|(kind, message)| (kind.as_str(), message.as_str())),
            request: RequestPart {
                method: &self.method,
                path: &self.path,
                query: self.query.as_deref(),
                http_version: &self.http_version,
                headers: &self.request_headers,
                body: &self.request_body,
            },
            response: self.response.as_ref().map(|response| ResponsePart {
                status: response.status,
                headers: &response.headers,
                body: &response.body,
                trailers: response.trailers.as_ref(),
            }),
        }
    }
}

const JSON_PATHS: [&str; 6] = [
    "$.password",
    "$[*].password",
    "$.data[*].ssn",
    "$['odd key'].x",
    "$.a.*.b[0].c",
    "$[\"n\"]",
];

/// The redaction: none, or extra headers and JSON paths (always `$.password` then).
fn redaction(u: &mut Unstructured<'_>) -> arbitrary::Result<Redaction> {
    if u.ratio(1_u8, 2)? {
        return Ok(Redaction::default());
    }
    let mut headers = Vec::new();
    for _ in 0..u.int_in_range(0..=3)? {
        headers.push(if u.ratio(1_u8, 2)? {
            scoretap_fuzz::header_name(u)?.as_str().to_owned()
        } else {
            text(u, 3)?
        });
    }
    let mut paths = vec!["$.password".to_owned()];
    for _ in 0..u.int_in_range(0..=2)? {
        paths.push(if u.ratio(3_u8, 4)? {
            (*u.choose(&JSON_PATHS)?).to_owned()
        } else {
            text(u, 4)?
        });
    }
    // Invalid settings are refused, never a panic; the valid part is then used.
    Ok(Redaction::new(&headers, &paths)
        .or_else(|_| Redaction::new(&[], &paths))
        .or_else(|_| Redaction::new(&[], &["$.password".to_owned()]))
        .unwrap_or_default())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(redaction) = redaction(&mut u) else {
        return;
    };
    let Ok(exchange) = Exchange::arbitrary(&mut u) else {
        return;
    };
    let smaller = u.int_in_range(0..=MAXIMUM_RECORD_BYTES).ok();
    let mut record = Vec::new();
    assemble_into(
        &exchange.input(),
        &redaction,
        MAXIMUM_RECORD_BYTES,
        &mut record,
    );
    check(&exchange, &redaction, MAXIMUM_RECORD_BYTES, &record);
    if let Some(maximum) = smaller.filter(|maximum| *maximum < 4096 || data.len() % 4 == 0) {
        assemble_into(&exchange.input(), &redaction, maximum, &mut record);
        check(&exchange, &redaction, maximum, &record);
    }
});

fn check(exchange: &Exchange, redaction: &Redaction, maximum: usize, bytes: &[u8]) {
    assert!(bytes.len() <= maximum, "{} > {maximum}", bytes.len());
    if bytes.is_empty() {
        assert!(maximum < 2, "empty record at a limit of {maximum}");
        return;
    }
    let record: Value = serde_json::from_slice(bytes).expect("a record is JSON");
    let object = record.as_object().expect("a record is an object");
    if object.is_empty() {
        let minimal = minimal_record_length(&exchange.id);
        assert!(
            maximum < minimal,
            "`{{}}` at a limit of {maximum} ≥ {minimal}"
        );
        return;
    }
    assert_eq!(record["schema"], SCHEMA);
    if !object.contains_key("request") {
        // The minimal record, the last resort.
        assert!(
            maximum < MAXIMUM_RECORD_BYTES,
            "minimal record at 64 KiB: {record}"
        );
        let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["id", "record_truncated", "schema"]);
        return;
    }
    let record_truncated = record["record_truncated"] == true;
    if !record_truncated {
        assert_eq!(record["id"], exchange.id.as_str());
        assert_eq!(record["correlation_id"], exchange.correlation_id.as_str());
        assert_eq!(record["service"], exchange.service.as_str());
        assert_eq!(record["outcome"], exchange.outcome.as_str());
        assert_eq!(record["request"]["method"], exchange.method.as_str());
        assert_eq!(record["request"]["path"], exchange.path.as_str());
        // Secret query parameters are redacted by name, everything else is kept.
        assert_eq!(
            record["request"]["query"],
            exchange
                .query
                .as_deref()
                .map_or(Value::Null, |query| Value::from(
                    redaction.redact_query(query).as_ref()
                ))
        );
        assert_eq!(
            record["request"]["http_version"],
            exchange.http_version.as_str()
        );
        match &exchange.error {
            Some((kind, message)) => {
                assert_eq!(record["error"]["kind"], kind.as_str());
                assert_eq!(record["error"]["message"], message.as_str());
            }
            None => assert_eq!(record["error"], Value::Null),
        }
    }
    if !exchange.duration_ms.is_finite() {
        assert_eq!(record["duration_ms"], Value::Null);
    }
    assert!(record["started_at"].is_string());
    let request = &record["request"];
    check_headers(
        &request["headers"],
        request["headers_truncated"] == true,
        &exchange.request_headers,
        redaction,
    );
    check_body(
        &request["body"],
        &exchange.request_body,
        exchange.request_secret,
        redaction,
        record_truncated,
    );
    let Some(response) = &exchange.response else {
        assert_eq!(record["response"], Value::Null);
        return;
    };
    let recorded = &record["response"];
    assert_eq!(recorded["status"], response.status.as_u16());
    check_headers(
        &recorded["headers"],
        recorded["headers_truncated"] == true,
        &response.headers,
        redaction,
    );
    check_body(
        &recorded["body"],
        &response.body,
        response.secret,
        redaction,
        record_truncated,
    );
    match &response.trailers {
        None => assert_eq!(recorded["trailers"], Value::Null),
        Some(trailers) => check_headers(
            &recorded["trailers"],
            recorded["trailers_truncated"] == true,
            trailers,
            redaction,
        ),
    }
}

/// The length of the last-resort record `{"schema","id","record_truncated"}` (its `id` cut to
/// 64 bytes).
fn minimal_record_length(id: &str) -> usize {
    let id = if id.len() > 64 {
        let mut end = 64;
        while !id.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…[cut]", id.get(..end).unwrap_or_default())
    } else {
        id.to_owned()
    };
    serde_json::json!({"schema": SCHEMA, "id": id, "record_truncated": true})
        .to_string()
        .len()
}

/// Recorded headers are the map's, lower-cased and joined with `, ` (lossily decoded), with
/// redacted names' values replaced; all of them unless the part is flagged truncated, where
/// values may be cut and entries dropped.
fn check_headers(recorded: &Value, truncated: bool, map: &HeaderMap, redaction: &Redaction) {
    let recorded = recorded.as_object().expect("headers are an object");
    if !truncated {
        assert_eq!(recorded.len(), map.keys_len(), "every header is recorded");
    }
    for (name, value) in recorded {
        let header = http::HeaderName::from_bytes(name.as_bytes()).expect("a recorded name");
        assert_eq!(header.as_str(), name, "names are lower case");
        assert!(map.contains_key(&header), "{name} was in the message");
        let value = value.as_str().expect("a header value is a string");
        if redaction.is_redacted_header(&header) {
            assert_eq!(value, REDACTED, "{name} is redacted");
            continue;
        }
        let expected = map
            .get_all(&header)
            .iter()
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(", ");
        if truncated {
            let kept = value.strip_suffix("…[cut]").unwrap_or(value);
            assert!(
                expected.starts_with(kept),
                "{name}: a cut value is a prefix"
            );
        } else {
            assert_eq!(value, expected, "{name}");
        }
    }
    for name in ["authorization", "cookie", "x-api-key", "set-cookie"] {
        if let Some(value) = recorded.get(name) {
            assert_eq!(value, REDACTED);
        }
    }
}

fn check_body(
    body: &Value,
    capture: &BodyCapture,
    secret: bool,
    redaction: &Redaction,
    record_truncated: bool,
) {
    assert_eq!(body["size"], capture.size, "size");
    match &capture.sha256 {
        Some(digest) => assert_eq!(body["sha256"], hex(digest), "sha256"),
        None => assert_eq!(body["sha256"], Value::Null, "sha256"),
    }
    assert_eq!(body["complete"], capture.complete);
    if !record_truncated {
        assert_eq!(
            body["content_type"],
            capture
                .content_type
                .as_deref()
                .map_or(Value::Null, Value::from)
        );
        assert_eq!(
            body["blob"],
            capture.blob.as_deref().map_or(Value::Null, Value::from)
        );
    }
    if let Some(reason) = capture.excluded {
        assert_eq!(body["excluded"], reason);
        assert_eq!(body["encoding"], Value::Null);
        assert_eq!(body["inline"], Value::Null);
        assert_eq!(body["truncated"], false);
        return;
    }
    assert!(body.get("excluded").is_none());
    let truncated = body["truncated"].as_bool().expect("truncated is a boolean");
    let holds_whole = u64::try_from(capture.prefix.len()).ok() == Some(capture.size);
    // Without JSON paths nothing changes the bytes: `inline` is the captured prefix, or a part.
    let exact = !redaction.has_json_paths();
    let inline: Vec<u8> = match body["encoding"].as_str().expect("an encoding") {
        "json" => {
            assert!(
                capture.complete && holds_whole,
                "json only for a whole body"
            );
            assert!(!truncated);
            let parsed: Value =
                serde_json::from_slice(&capture.prefix).expect("a json body is JSON");
            if exact {
                assert_eq!(body["inline"], parsed, "json inline is the body");
            }
            body["inline"].to_string().into_bytes()
        }
        "utf8" => {
            let inline = body["inline"].as_str().expect("utf8 inline is a string");
            if exact {
                assert!(
                    capture.prefix.starts_with(inline.as_bytes()),
                    "utf8 inline is a prefix"
                );
                assert!(is_text(&capture.prefix, holds_whole), "utf8 only for text");
            }
            inline.as_bytes().to_vec()
        }
        "base64" => {
            let inline = body["inline"].as_str().expect("base64 inline is a string");
            let decoded = BASE64.decode(inline).expect("base64 inline decodes");
            if exact {
                assert!(capture.prefix.starts_with(&decoded), "base64 is a prefix");
                assert!(
                    !is_text(&capture.prefix, holds_whole),
                    "base64 only for bytes that are not text"
                );
            }
            decoded
        }
        other => panic!("encoding {other}"),
    };
    if exact && body["encoding"] != "json" {
        let whole = u64::try_from(inline.len()).ok() == Some(capture.size);
        assert_eq!(truncated, !whole, "truncated says whether inline is all");
    }
    if secret && redaction.has_json_paths() {
        assert!(!contains(&inline, b"SEC"), "a secret leaked");
    }
}

/// Whether a prefix is recorded as text: UTF-8, or, when the body goes on, UTF-8 up to an
/// incomplete character at its end.
fn is_text(prefix: &[u8], holds_whole: bool) -> bool {
    match std::str::from_utf8(prefix) {
        Ok(_) => true,
        Err(error) => error.error_len().is_none() && !holds_whole,
    }
}
