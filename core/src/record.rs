//! The trace record `scoretap.trace/1` (shared README §2): assembly of one exchange into one JSON
//! object of at most a given number of bytes (65,536 in production), whatever the bodies and
//! headers, with secrets redacted.
//!
//! How a record is fitted, in [`assemble`]:
//! 1. each body is prepared once: parsed as JSON when the whole body is there (then redacted by
//!    path), else taken as UTF-8 text, else kept as bytes for base64; text and bytes go through
//!    the redaction's text fallback whenever JSON paths are configured, whatever the content
//!    type (it only touches values that follow a configured `"key":`);
//! 2. the record is measured without headers and with empty inline bodies; headers get what is
//!    left after reserving up to half of it for the bodies. Headers that do not fit have their
//!    values longer than 1 KiB cut (`…[cut]` appended), and if that is not enough, each header
//!    map gets a fair share and the headers past it are dropped (`headers_truncated: true`, or
//!    `trailers_truncated: true`, on that part);
//! 3. the record is measured again with its headers and empty inline bodies; what remains is the
//!    bodies' budget: both whole when they fit, else each up to half and any unused share to the
//!    other. Sizes are counted exactly (JSON escaping included), and the final serialization is
//!    checked anyway: when over, the bodies' budgets shrink and the record is rebuilt, ending with
//!    empty inline bodies, which the measurement showed to fit;
//! 4. when even that skeleton does not fit, headers are dropped, then the record's own strings
//!    (path, query, error message, ...) are cut (`record_truncated: true`), then a minimal
//!    `{"schema","id","record_truncated"}` object, then `{}`, then nothing: the limit always holds.
//!
//! Body encodings:
//! - `json`: the whole body was captured and parsed; `inline` is the redacted value, compactly
//!   re-serialized (serde_json orders object keys and re-prints numbers);
//! - `utf8`: `inline` is a string, the body (or a prefix of it) cut on a character boundary. An
//!   incomplete character at the end of a cut capture is dropped. A body that parsed as JSON but
//!   did not fit is recorded this way too, from its original text. An empty body is `utf8` with
//!   `inline: ""`;
//! - `base64`: standard alphabet with padding, of the longest prefix that fits;
//! - excluded bodies (`excluded: "<reason>"`) have `encoding: null`, `inline: null`.
//!
//! `truncated` is true when `inline` holds fewer bytes than `size`. `size` and `sha256` come from
//! the capture and always describe the whole body.

use std::borrow::Cow;
use std::cell::OnceCell;
use std::io;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use http::{HeaderMap, StatusCode};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::Value;

use crate::redaction::{Redaction, REDACTED};

/// The schema name written in every record.
pub const SCHEMA: &str = "scoretap.trace/1";
/// The largest serialized record, the 64 KB limit users know from Application Insights.
pub const MAXIMUM_RECORD_BYTES: usize = 65_536;

/// Header values longer than this (bytes) are cut when a record's headers do not fit.
const HEADER_VALUE_CUT_BYTES: usize = 1024;
/// Appended to a cut header value or record field.
const CUT_MARKER: &str = "…[cut]";
/// Upper bound of the serialized `,"trailers_truncated":true` flag.
const TRUNCATION_FLAG_BYTES: usize = 28;
/// Serializations tried with shrinking body budgets before falling back to empty inline bodies.
const BODY_FIT_ATTEMPTS: usize = 3;
/// The length (bytes) record strings are cut to by the successive shrink levels.
const FIELD_LIMITS: [usize; 3] = [256, 32, 0];
/// The length identity fields (`id`, `correlation_id`, ...) are never cut below.
const MINIMAL_ID_BYTES: usize = 64;

/// What capture knows about one body when its exchange is recorded.
#[derive(Debug, Clone, Default)]
pub struct BodyCapture {
    /// Bytes that crossed the proxy, counted by the tee whatever capture kept.
    pub size: u64,
    /// SHA-256 of the whole body; `None` when capture did not see every byte.
    pub sha256: Option<[u8; 32]>,
    /// The message's `content-type`, if any.
    pub content_type: Option<String>,
    /// The body's first bytes, contiguous from byte 0 (at most [`MAXIMUM_RECORD_BYTES`]).
    pub prefix: Vec<u8>,
    /// Capture saw every byte and the body ended normally (not cancelled, not errored, nothing
    /// dropped, not past the capture limit).
    pub complete: bool,
    /// The body was deliberately not captured (e.g. `image/*`); the reason is recorded.
    pub excluded: Option<&'static str>,
    /// Where the whole body was stored, when spilled (`s3://`, `az://`, `file://`).
    pub blob: Option<String>,
}

/// The request half of an exchange.
#[derive(Debug, Clone)]
pub struct RequestPart<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    /// "HTTP/1.0", "HTTP/1.1", "HTTP/2".
    pub http_version: &'a str,
    pub headers: &'a HeaderMap,
    pub body: &'a BodyCapture,
}

/// The response half of an exchange.
#[derive(Debug, Clone)]
pub struct ResponsePart<'a> {
    pub status: StatusCode,
    pub headers: &'a HeaderMap,
    pub body: &'a BodyCapture,
    pub trailers: Option<&'a HeaderMap>,
}

/// One exchange, ready to be written.
#[derive(Debug, Clone)]
pub struct RecordInput<'a> {
    /// Time-sortable unique id (UUID v7).
    pub id: &'a str,
    pub correlation_id: &'a str,
    pub service: &'a str,
    pub started_at: SystemTime,
    pub duration_ms: f64,
    /// "ok" | "upstream_error" | "upstream_timeout" | "client_cancelled" | "proxy_error".
    pub outcome: &'a str,
    /// `(kind, message)` of the error, if any.
    pub error: Option<(&'a str, &'a str)>,
    pub request: RequestPart<'a>,
    pub response: Option<ResponsePart<'a>>,
}

/// Assembles one exchange into one serialized JSON object (no trailing newline) of at most
/// `maximum_bytes` bytes, with headers and body fields redacted by `redaction`.
///
/// Never fails and never panics: bodies, then headers, then the record's own strings are cut
/// until the record fits (see the module documentation); below about 100 bytes only a minimal
/// object fits, below 2 bytes nothing does and the result is empty.
pub fn assemble(input: &RecordInput<'_>, redaction: &Redaction, maximum_bytes: usize) -> Vec<u8> {
    let assembly = Assembly::new(input, redaction);
    assembly
        .fit(maximum_bytes)
        .unwrap_or_else(|| minimal_record(input.id, maximum_bytes))
}

/// An exchange prepared once, from which records of decreasing size are built and measured.
struct Assembly<'i> {
    input: &'i RecordInput<'i>,
    started_at: String,
    request_body: PreparedBody<'i>,
    /// `Some` exactly when the exchange has a response.
    response_body: Option<PreparedBody<'i>>,
    request_headers: RecordedHeaders<'i>,
    /// Empty when the exchange has no response.
    response_headers: RecordedHeaders<'i>,
    trailers: Option<RecordedHeaders<'i>>,
}

impl<'i> Assembly<'i> {
    fn new(input: &'i RecordInput<'i>, redaction: &'i Redaction) -> Self {
        let response = input.response.as_ref();
        Self {
            input,
            started_at: format_started_at(input.started_at),
            request_body: PreparedBody::new(input.request.body, redaction),
            response_body: response.map(|response| PreparedBody::new(response.body, redaction)),
            request_headers: RecordedHeaders::new(input.request.headers, redaction),
            response_headers: response
                .map(|response| RecordedHeaders::new(response.headers, redaction))
                .unwrap_or_default(),
            trailers: response
                .and_then(|response| response.trailers)
                .map(|trailers| RecordedHeaders::new(trailers, redaction)),
        }
    }

    /// The record at the first shrink level that fits, if any.
    fn fit(mut self, maximum: usize) -> Option<Vec<u8>> {
        if let Some(record) = self.fit_with_headers(maximum) {
            return Some(record);
        }
        let field_limits = [None].into_iter().chain(FIELD_LIMITS.map(Some));
        for field_limit in field_limits {
            let headers = self.header_choices(HeaderState::Dropped);
            if let Some(record) = self.fit_bodies(headers, FieldCut(field_limit), maximum) {
                return Some(record);
            }
        }
        None
    }

    /// Level 0: every field whole, headers fitted into what the bodies leave them.
    fn fit_with_headers(&mut self, maximum: usize) -> Option<Vec<u8>> {
        let without_headers = serialize(&self.view(
            self.header_choices(HeaderState::Empty),
            FieldCut(None),
            self.request_body.placeholder(),
            self.response_body.as_ref().map(PreparedBody::placeholder),
        ))?;
        let available = maximum.checked_sub(without_headers.len())?;
        let bodies_desired = self.request_body.desired_extra().saturating_add(
            self.response_body
                .as_ref()
                .map_or(0, PreparedBody::desired_extra),
        );
        let header_budget = available - bodies_desired.min(available / 2);
        let mut lists: Vec<&mut RecordedHeaders<'_>> =
            vec![&mut self.request_headers, &mut self.response_headers];
        lists.extend(self.trailers.as_mut());
        fit_headers(&mut lists, header_budget);
        self.fit_bodies(
            self.header_choices(HeaderState::AsFitted),
            FieldCut(None),
            maximum,
        )
    }

    /// Measures the record with empty inline bodies, shares what remains between the bodies,
    /// and builds the record, shrinking the bodies until it fits. `None` when even empty inline
    /// bodies do not fit.
    fn fit_bodies(
        &self,
        headers: HeaderChoices<'_>,
        fields: FieldCut,
        maximum: usize,
    ) -> Option<Vec<u8>> {
        let response_body = self.response_body.as_ref();
        let skeleton = serialize(&self.view(
            headers,
            fields,
            self.request_body.placeholder(),
            response_body.map(PreparedBody::placeholder),
        ))?;
        let remaining = maximum.checked_sub(skeleton.len())?;
        let (mut request_extra, mut response_extra) = split_body_budget(
            remaining,
            self.request_body.desired_extra(),
            response_body.map(PreparedBody::desired_extra),
        );
        // Sizes are counted exactly, so the first attempt fits; the others are a safety net.
        for attempt in 0..=BODY_FIT_ATTEMPTS {
            if attempt == BODY_FIT_ATTEMPTS {
                (request_extra, response_extra) = (0, 0);
            }
            let record = serialize(&self.view(
                headers,
                fields,
                self.request_body.render(request_extra),
                response_body.map(|body| body.render(response_extra)),
            ))?;
            let Some(overshoot) = record.len().checked_sub(maximum).filter(|over| *over > 0) else {
                return Some(record);
            };
            request_extra = request_extra.saturating_sub(overshoot) / (attempt + 1);
            response_extra = response_extra.saturating_sub(overshoot) / (attempt + 1);
        }
        None
    }

    fn header_choices<'v>(&'v self, state: HeaderState) -> HeaderChoices<'v> {
        let choose = |headers: &'v RecordedHeaders<'i>| match state {
            HeaderState::AsFitted => HeaderChoice {
                entries: &headers.entries,
                truncated: headers.truncated,
            },
            HeaderState::Empty => HeaderChoice::default(),
            HeaderState::Dropped => HeaderChoice {
                entries: &[],
                truncated: headers.original_count > 0,
            },
        };
        HeaderChoices {
            request: choose(&self.request_headers),
            response: choose(&self.response_headers),
            trailers: self.trailers.as_ref().map(choose),
        }
    }

    /// The record as it will be serialized.
    fn view<'v>(
        &'v self,
        headers: HeaderChoices<'v>,
        fields: FieldCut,
        request_body: BodyRender<'v>,
        response_body: Option<BodyRender<'v>>,
    ) -> RecordView<'v> {
        let input = self.input;
        let request = &input.request;
        let response = input
            .response
            .as_ref()
            .zip(self.response_body.as_ref())
            .zip(response_body)
            .map(|((response, prepared), render)| ResponseView {
                status: response.status.as_u16(),
                headers: HeadersView(headers.response.entries),
                headers_truncated: headers.response.truncated,
                body: prepared.view(render, fields),
                trailers: headers
                    .trailers
                    .map(|trailers| HeadersView(trailers.entries)),
                trailers_truncated: headers.trailers.is_some_and(|trailers| trailers.truncated),
            });
        RecordView {
            schema: SCHEMA,
            id: fields.cut_identity(input.id),
            correlation_id: fields.cut_identity(input.correlation_id),
            service: fields.cut_identity(input.service),
            started_at: &self.started_at,
            duration_ms: input.duration_ms,
            outcome: fields.cut_identity(input.outcome),
            error: input.error.map(|(kind, message)| ErrorView {
                kind: fields.cut(kind),
                message: fields.cut(message),
            }),
            request: RequestView {
                method: fields.cut(request.method),
                path: fields.cut(request.path),
                query: request.query.map(|query| fields.cut(query)),
                http_version: fields.cut(request.http_version),
                headers: HeadersView(headers.request.entries),
                headers_truncated: headers.request.truncated,
                body: self.request_body.view(request_body, fields),
            },
            response,
            record_truncated: fields.0.is_some(),
        }
    }
}

/// Serializes a record view; `None` only if serde_json refuses it, which these types never cause.
fn serialize(view: &RecordView<'_>) -> Option<Vec<u8>> {
    serde_json::to_vec(view).ok()
}

/// The last resort: `{"schema","id","record_truncated":true}`, else `{}`, else nothing.
fn minimal_record(id: &str, maximum: usize) -> Vec<u8> {
    #[derive(Serialize)]
    struct MinimalRecord<'a> {
        schema: &'static str,
        id: Cow<'a, str>,
        record_truncated: bool,
    }
    let minimal = MinimalRecord {
        schema: SCHEMA,
        id: FieldCut(Some(MINIMAL_ID_BYTES)).cut(id),
        record_truncated: true,
    };
    match serde_json::to_vec(&minimal) {
        Ok(record) if record.len() <= maximum => record,
        _ if maximum >= 2 => b"{}".to_vec(),
        _ => Vec::new(),
    }
}

/// Shares the bytes left for inline bodies: both whole when they fit, else each up to half and
/// any unused share to the other.
fn split_body_budget(
    remaining: usize,
    request_desired: usize,
    response_desired: Option<usize>,
) -> (usize, usize) {
    let Some(response_desired) = response_desired else {
        return (remaining, 0);
    };
    if request_desired.saturating_add(response_desired) <= remaining {
        return (request_desired, response_desired);
    }
    let half = remaining / 2;
    if request_desired <= half {
        (request_desired, remaining - request_desired)
    } else if response_desired <= half {
        (remaining - response_desired, response_desired)
    } else {
        (half, remaining - half)
    }
}

/// RFC 3339 UTC with microseconds; times humantime cannot format (before 1970, after 9999)
/// are clamped.
fn format_started_at(started_at: SystemTime) -> String {
    const LAST_FORMATTABLE: Duration = Duration::new(253_402_300_799, 999_999_999);
    let since_epoch = started_at
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .min(LAST_FORMATTABLE);
    let clamped = UNIX_EPOCH.checked_add(since_epoch).unwrap_or(UNIX_EPOCH);
    humantime::format_rfc3339_micros(clamped).to_string()
}

/// Lowercase hexadecimal.
fn lowercase_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        hex.push(char::from(DIGITS[usize::from(byte >> 4)]));
        hex.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    hex
}

/// How many bytes serde_json writes for this byte of a string's content.
fn escaped_byte_len(byte: u8) -> usize {
    match byte {
        b'"' | b'\\' | 0x08 | b'\t' | b'\n' | 0x0c | b'\r' => 2,
        0x00..=0x1f => 6,
        _ => 1,
    }
}

/// Bytes are measured in chunks of this many, with `u8` counters the compiler vectorizes.
const ESCAPE_CHUNK_BYTES: usize = 64;

/// How many bytes serde_json writes for this string's content (without the quotes).
fn escaped_len(text: &str) -> usize {
    text.as_bytes()
        .chunks(ESCAPE_CHUNK_BYTES)
        .map(escaped_chunk_len)
        .sum()
}

/// [`escaped_len`] of at most [`ESCAPE_CHUNK_BYTES`] bytes.
fn escaped_chunk_len(chunk: &[u8]) -> usize {
    let mut escaped = 0_u8;
    let mut long_escapes = 0_u8;
    for &byte in chunk {
        escaped += u8::from(byte < 0x20 || byte == b'"' || byte == b'\\');
        // `\u00XX` takes 4 more bytes than the two-byte escapes (`\"`, `\n`, ...).
        long_escapes += u8::from(byte < 0x20 && !matches!(byte, 0x08..=0x0a | 0x0c | 0x0d));
    }
    chunk.len() + usize::from(escaped) + 4 * usize::from(long_escapes)
}

/// The length of the longest prefix of `text`, cut on a character boundary, whose escaped
/// content takes at most `budget` bytes.
fn cut_to_escaped_budget(text: &str, budget: usize) -> usize {
    let mut used = 0_usize;
    let mut chunk_start = 0_usize;
    for chunk in text.as_bytes().chunks(ESCAPE_CHUNK_BYTES) {
        let chunk_size = escaped_chunk_len(chunk);
        if used + chunk_size > budget {
            for (offset, &byte) in chunk.iter().enumerate() {
                used += escaped_byte_len(byte);
                if used > budget {
                    return floor_char_boundary(text, chunk_start + offset);
                }
            }
        }
        used += chunk_size;
        chunk_start += chunk.len();
    }
    text.len()
}

/// The largest character boundary of `text` at or below `index`.
fn floor_char_boundary(text: &str, index: usize) -> usize {
    let mut boundary = index.min(text.len());
    while !text.is_char_boundary(boundary) {
        boundary -= 1;
    }
    boundary
}

/// The length of a base64 encoding (with padding) of `length` bytes.
fn base64_len(length: usize) -> usize {
    length.div_ceil(3).saturating_mul(4)
}

/// Counts the bytes written to it.
struct ByteCounter(usize);

impl io::Write for ByteCounter {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        self.0 += buffer.len();
        Ok(buffer.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Cuts the record's own strings (path, query, error message...) at the last shrink levels.
#[derive(Debug, Clone, Copy)]
struct FieldCut(Option<usize>);

impl FieldCut {
    /// Cuts a field that identifies the exchange (`id`, `correlation_id`, `service`, `outcome`):
    /// never shorter than [`MINIMAL_ID_BYTES`].
    fn cut_identity(self, text: &str) -> Cow<'_, str> {
        FieldCut(self.0.map(|limit| limit.max(MINIMAL_ID_BYTES))).cut(text)
    }

    /// Cuts a field to the limit, marking it with [`CUT_MARKER`] (empty at a limit of 0).
    fn cut(self, text: &str) -> Cow<'_, str> {
        match self.0 {
            Some(0) if !text.is_empty() => Cow::Borrowed(""),
            Some(limit) if text.len() > limit => {
                let kept = text
                    .get(..floor_char_boundary(text, limit))
                    .unwrap_or_default();
                Cow::Owned(format!("{kept}{CUT_MARKER}"))
            }
            _ => Cow::Borrowed(text),
        }
    }
}

/// One header map as recorded: lower-cased names, repeated fields joined, secrets redacted.
#[derive(Debug, Default)]
struct RecordedHeaders<'i> {
    entries: Vec<HeaderEntry<'i>>,
    /// Values were cut or entries dropped to fit.
    truncated: bool,
    /// How many entries the map had before fitting.
    original_count: usize,
}

/// One recorded header, borrowed from the message when it can be.
#[derive(Debug)]
struct HeaderEntry<'i> {
    name: &'i str,
    value: Cow<'i, str>,
    /// Serialized size of `"name":"value",`.
    size: usize,
}

impl<'i> HeaderEntry<'i> {
    fn new(name: &'i str, value: Cow<'i, str>) -> Self {
        Self {
            size: escaped_len(name) + escaped_len(&value) + 6,
            name,
            value,
        }
    }
}

impl<'i> RecordedHeaders<'i> {
    fn new(map: &'i HeaderMap, redaction: &Redaction) -> Self {
        let entries: Vec<HeaderEntry<'i>> = map
            .keys()
            .map(|name| {
                let values = map.get_all(name);
                let mut iterator = values.iter();
                let value = match (iterator.next(), iterator.next()) {
                    _ if redaction.is_redacted_header(name) => Cow::Borrowed(REDACTED),
                    (Some(only), None) => match std::str::from_utf8(only.as_bytes()) {
                        Ok(text) => Cow::Borrowed(text),
                        Err(_) => Cow::Owned(String::from_utf8_lossy(only.as_bytes()).into_owned()),
                    },
                    _ => {
                        let mut joined = String::new();
                        for (index, value) in values.iter().enumerate() {
                            if index > 0 {
                                joined.push_str(", ");
                            }
                            joined.push_str(&String::from_utf8_lossy(value.as_bytes()));
                        }
                        Cow::Owned(joined)
                    }
                };
                HeaderEntry::new(name.as_str(), value)
            })
            .collect();
        Self {
            original_count: entries.len(),
            entries,
            truncated: false,
        }
    }

    /// Serialized size of the entries inside the braces, plus the truncation flag if set.
    fn content_size(&self) -> usize {
        let entries: usize = self.entries.iter().map(|entry| entry.size).sum();
        entries
            + if self.truncated {
                TRUNCATION_FLAG_BYTES
            } else {
                0
            }
    }

    /// Cuts every value longer than [`HEADER_VALUE_CUT_BYTES`] and marks it.
    fn cut_long_values(&mut self) {
        for entry in &mut self.entries {
            if entry.value.len() > HEADER_VALUE_CUT_BYTES {
                let kept = entry
                    .value
                    .get(..floor_char_boundary(&entry.value, HEADER_VALUE_CUT_BYTES))
                    .unwrap_or_default();
                *entry = HeaderEntry::new(entry.name, Cow::Owned(format!("{kept}{CUT_MARKER}")));
                self.truncated = true;
            }
        }
    }

    /// Keeps, in order, the entries that fit in `share` bytes (flag included).
    fn keep_within(&mut self, share: usize) {
        if self.content_size() <= share {
            return;
        }
        self.truncated = true;
        let mut left = share.saturating_sub(TRUNCATION_FLAG_BYTES);
        self.entries.retain(|entry| {
            let fits = entry.size <= left;
            if fits {
                left -= entry.size;
            }
            fits
        });
    }
}

/// Fits header maps into `budget` serialized bytes: untouched if they fit, else long values
/// cut, else each map gets a fair share (smallest map first, unused shares passed on) and the
/// entries past it are dropped.
fn fit_headers(lists: &mut [&mut RecordedHeaders<'_>], budget: usize) {
    let total = |lists: &[&mut RecordedHeaders<'_>]| -> usize {
        lists.iter().map(|list| list.content_size()).sum()
    };
    if total(lists) <= budget {
        return;
    }
    for list in lists.iter_mut() {
        list.cut_long_values();
    }
    if total(lists) <= budget {
        return;
    }
    lists.sort_by_key(|list| list.content_size());
    let mut remaining = budget;
    let count = lists.len();
    for (position, list) in lists.iter_mut().enumerate() {
        let share = remaining / (count - position);
        list.keep_within(share);
        remaining = remaining.saturating_sub(list.content_size());
    }
}

/// Which headers a record view shows.
#[derive(Debug, Clone, Copy)]
enum HeaderState {
    /// As fitted by [`fit_headers`].
    AsFitted,
    /// None, unflagged: for measuring the record without headers.
    Empty,
    /// None, flagged as truncated where there were some.
    Dropped,
}

/// The entries a record view shows for one header map, and its truncation flag.
#[derive(Debug, Clone, Copy, Default)]
struct HeaderChoice<'v> {
    entries: &'v [HeaderEntry<'v>],
    truncated: bool,
}

/// [`HeaderChoice`] for each header map of an exchange.
#[derive(Debug, Clone, Copy)]
struct HeaderChoices<'v> {
    request: HeaderChoice<'v>,
    response: HeaderChoice<'v>,
    trailers: Option<HeaderChoice<'v>>,
}

/// A body prepared once: its whole JSON value if it has one, and lazily its text or bytes.
struct PreparedBody<'i> {
    capture: &'i BodyCapture,
    redaction: &'i Redaction,
    sha256_hex: Option<String>,
    json: Option<PreparedJson>,
    text: OnceCell<TextForm<'i>>,
}

/// A whole body that parsed as JSON, redacted, with its compact serialized size.
struct PreparedJson {
    value: Value,
    serialized_size: usize,
}

/// A body's captured prefix, ready to be cut: UTF-8 text or raw bytes, redacted.
enum TextForm<'i> {
    Utf8 {
        text: Cow<'i, str>,
        /// Serialized size of `text` without the quotes.
        escaped_size: usize,
        /// `text` is the whole body (before redaction).
        whole: bool,
    },
    Binary {
        bytes: Cow<'i, [u8]>,
    },
}

impl<'i> PreparedBody<'i> {
    fn new(capture: &'i BodyCapture, redaction: &'i Redaction) -> Self {
        Self {
            capture,
            redaction,
            sha256_hex: capture.sha256.as_ref().map(|digest| lowercase_hex(digest)),
            json: Self::prepare_json(capture, redaction),
            text: OnceCell::new(),
        }
    }

    fn is_excluded(&self) -> bool {
        self.capture.excluded.is_some()
    }

    /// The prefix is every byte of the body.
    fn holds_whole_body(&self) -> bool {
        holds_whole_body(self.capture)
    }

    fn prepare_json(capture: &BodyCapture, redaction: &Redaction) -> Option<PreparedJson> {
        if capture.excluded.is_some()
            || !capture.complete
            || !holds_whole_body(capture)
            || capture.prefix.is_empty()
        {
            return None;
        }
        let mut value: Value = serde_json::from_slice(&capture.prefix).ok()?;
        redaction.redact_json(&mut value);
        let mut counter = ByteCounter(0);
        serde_json::to_writer(&mut counter, &value).ok()?;
        Some(PreparedJson {
            value,
            serialized_size: counter.0,
        })
    }

    fn text_form(&self) -> &TextForm<'i> {
        self.text.get_or_init(|| {
            let capture = self.capture;
            let prefix = capture.prefix.as_slice();
            // Whenever paths are configured, not only for bodies that look like JSON: a JSON
            // part of a multipart body, or JSON after a byte-order mark, must not leak either.
            let redact = self.redaction.has_json_paths();
            match utf8_prefix(prefix, self.holds_whole_body()) {
                Some(text) => {
                    let whole = self.holds_whole_body() && text.len() == prefix.len();
                    let text = if redact {
                        self.redaction.redact_text(text)
                    } else {
                        Cow::Borrowed(text)
                    };
                    TextForm::Utf8 {
                        escaped_size: escaped_len(&text),
                        text,
                        whole,
                    }
                }
                None => TextForm::Binary {
                    bytes: if redact {
                        self.redaction.redact_bytes(prefix)
                    } else {
                        Cow::Borrowed(prefix)
                    },
                },
            }
        })
    }

    /// Bytes beyond an empty inline string (`""`) that the whole body would take inline.
    fn desired_extra(&self) -> usize {
        if self.is_excluded() {
            return 0;
        }
        if let Some(json) = &self.json {
            return json.serialized_size.saturating_sub(2);
        }
        match self.text_form() {
            TextForm::Utf8 { escaped_size, .. } => *escaped_size,
            TextForm::Binary { bytes } => base64_len(bytes.len()),
        }
    }

    /// What stands for the body while measuring: serialized at least as long as any rendering
    /// with an extra budget of 0.
    fn placeholder(&self) -> BodyRender<'_> {
        if self.is_excluded() {
            return BodyRender::EXCLUDED;
        }
        BodyRender {
            encoding: Some("base64"),
            inline: Some(InlineView::Text("")),
            truncated: false,
        }
    }

    /// The body inline in at most `extra` bytes beyond an empty string.
    fn render(&self, extra: usize) -> BodyRender<'_> {
        if self.is_excluded() {
            return BodyRender::EXCLUDED;
        }
        if let Some(json) = &self.json {
            if json.serialized_size <= extra.saturating_add(2) {
                return BodyRender {
                    encoding: Some("json"),
                    inline: Some(InlineView::Json(&json.value)),
                    truncated: false,
                };
            }
        }
        match self.text_form() {
            TextForm::Utf8 {
                text,
                escaped_size,
                whole,
            } => {
                let (inline, truncated) = if *escaped_size <= extra {
                    (text.as_ref(), !whole)
                } else {
                    let end = cut_to_escaped_budget(text, extra);
                    (text.get(..end).unwrap_or_default(), true)
                };
                BodyRender {
                    encoding: Some("utf8"),
                    inline: Some(InlineView::Text(inline)),
                    truncated,
                }
            }
            TextForm::Binary { bytes } => {
                let kept = bytes.len().min(extra / 4 * 3);
                BodyRender {
                    encoding: Some("base64"),
                    inline: Some(InlineView::Base64(
                        BASE64.encode(bytes.get(..kept).unwrap_or_default()),
                    )),
                    truncated: kept < bytes.len() || !self.holds_whole_body(),
                }
            }
        }
    }

    fn view<'v>(&'v self, render: BodyRender<'v>, fields: FieldCut) -> BodyView<'v> {
        let capture = self.capture;
        BodyView {
            size: capture.size,
            sha256: self.sha256_hex.as_deref(),
            content_type: capture
                .content_type
                .as_deref()
                .map(|content_type| fields.cut(content_type)),
            encoding: render.encoding,
            truncated: render.truncated,
            inline: render.inline,
            blob: capture.blob.as_deref().map(|blob| fields.cut(blob)),
            complete: capture.complete,
            excluded: capture.excluded,
        }
    }
}

fn holds_whole_body(capture: &BodyCapture) -> bool {
    u64::try_from(capture.prefix.len()).ok() == Some(capture.size)
}

/// The prefix as text when it is UTF-8, allowing an incomplete character at the end of a cut
/// prefix (dropped).
fn utf8_prefix(prefix: &[u8], holds_whole_body: bool) -> Option<&str> {
    match std::str::from_utf8(prefix) {
        Ok(text) => Some(text),
        Err(error) if error.error_len().is_none() && !holds_whole_body => prefix
            .get(..error.valid_up_to())
            .and_then(|valid| std::str::from_utf8(valid).ok()),
        Err(_) => None,
    }
}

/// A body's `encoding`, `inline` and `truncated` fields.
#[derive(Debug, Clone)]
struct BodyRender<'v> {
    encoding: Option<&'static str>,
    inline: Option<InlineView<'v>>,
    truncated: bool,
}

impl BodyRender<'_> {
    const EXCLUDED: Self = Self {
        encoding: None,
        inline: None,
        truncated: false,
    };
}

/// A body's `inline` value.
#[derive(Debug, Clone)]
enum InlineView<'v> {
    Json(&'v Value),
    Text(&'v str),
    Base64(String),
}

impl Serialize for InlineView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            InlineView::Json(value) => value.serialize(serializer),
            InlineView::Text(text) => serializer.serialize_str(text),
            InlineView::Base64(encoded) => serializer.serialize_str(encoded),
        }
    }
}

/// A header map, serialized as an object in its order.
#[derive(Debug, Clone, Copy)]
struct HeadersView<'v>(&'v [HeaderEntry<'v>]);

impl Serialize for HeadersView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for entry in self.0 {
            map.serialize_entry(entry.name, &entry.value)?;
        }
        map.end()
    }
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// The record as serialized; field order is the contract's (shared README §2).
#[derive(Serialize)]
struct RecordView<'v> {
    schema: &'static str,
    id: Cow<'v, str>,
    correlation_id: Cow<'v, str>,
    service: Cow<'v, str>,
    started_at: &'v str,
    duration_ms: f64,
    outcome: Cow<'v, str>,
    error: Option<ErrorView<'v>>,
    request: RequestView<'v>,
    response: Option<ResponseView<'v>>,
    /// The record's own strings were cut to fit.
    #[serde(skip_serializing_if = "is_false")]
    record_truncated: bool,
}

#[derive(Serialize)]
struct ErrorView<'v> {
    kind: Cow<'v, str>,
    message: Cow<'v, str>,
}

#[derive(Serialize)]
struct RequestView<'v> {
    method: Cow<'v, str>,
    path: Cow<'v, str>,
    query: Option<Cow<'v, str>>,
    http_version: Cow<'v, str>,
    headers: HeadersView<'v>,
    #[serde(skip_serializing_if = "is_false")]
    headers_truncated: bool,
    body: BodyView<'v>,
}

#[derive(Serialize)]
struct ResponseView<'v> {
    status: u16,
    headers: HeadersView<'v>,
    #[serde(skip_serializing_if = "is_false")]
    headers_truncated: bool,
    body: BodyView<'v>,
    trailers: Option<HeadersView<'v>>,
    #[serde(skip_serializing_if = "is_false")]
    trailers_truncated: bool,
}

#[derive(Serialize)]
struct BodyView<'v> {
    size: u64,
    sha256: Option<&'v str>,
    content_type: Option<Cow<'v, str>>,
    encoding: Option<&'static str>,
    truncated: bool,
    inline: Option<InlineView<'v>>,
    blob: Option<Cow<'v, str>>,
    complete: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    excluded: Option<&'static str>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use http::{HeaderName, HeaderValue};
    use serde_json::json;

    use super::*;

    const STARTED_AT_SECONDS: u64 = 1_795_454_445; // 2026-11-23T17:20:45Z

    /// A fake digest: assembly copies it, it never computes one.
    fn digest(seed: u64) -> [u8; 32] {
        let mut digest = [0_u8; 32];
        let mut state = seed | 1;
        for byte in &mut digest {
            state = xorshift(state);
            *byte = state.to_le_bytes()[0];
        }
        digest
    }

    fn xorshift(mut state: u64) -> u64 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }

    /// A capture of `body` as the tee makes it: at most [`MAXIMUM_RECORD_BYTES`] kept.
    fn capture(body: &[u8], content_type: Option<&str>) -> BodyCapture {
        let kept = body.len().min(MAXIMUM_RECORD_BYTES);
        BodyCapture {
            size: body.len() as u64,
            sha256: Some(digest(body.len() as u64)),
            content_type: content_type.map(str::to_owned),
            prefix: body[..kept].to_vec(),
            complete: kept == body.len(),
            excluded: None,
            blob: None,
        }
    }

    fn header_map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    /// The owned parts of an exchange, from which a [`RecordInput`] borrows.
    struct Exchange {
        request_headers: HeaderMap,
        request_body: BodyCapture,
        response: Option<(HeaderMap, BodyCapture)>,
        trailers: Option<HeaderMap>,
        path: String,
        error: Option<(String, String)>,
    }

    impl Exchange {
        fn new(request_body: BodyCapture, response_body: BodyCapture) -> Self {
            Self {
                request_headers: header_map(&[
                    ("content-type", "application/json"),
                    ("x-request-id", "corr-1"),
                ]),
                request_body,
                response: Some((
                    header_map(&[("content-type", "application/json")]),
                    response_body,
                )),
                trailers: None,
                path: "/score".to_owned(),
                error: None,
            }
        }

        fn input(&self) -> RecordInput<'_> {
            RecordInput {
                id: "0190f5b4-6c1e-7a3b-8f00-0123456789ab",
                correlation_id: "corr-1",
                service: "fraud-model",
                started_at: UNIX_EPOCH + Duration::new(STARTED_AT_SECONDS, 380_492_123),
                duration_ms: 12.5,
                outcome: "ok",
                error: self
                    .error
                    .as_ref()
                    .map(|(kind, message)| (kind.as_str(), message.as_str())),
                request: RequestPart {
                    method: "POST",
                    path: &self.path,
                    query: None,
                    http_version: "HTTP/1.1",
                    headers: &self.request_headers,
                    body: &self.request_body,
                },
                response: self.response.as_ref().map(|(headers, body)| ResponsePart {
                    status: StatusCode::OK,
                    headers,
                    body,
                    trailers: self.trailers.as_ref(),
                }),
            }
        }

        /// Assembles and checks the invariants every record has.
        fn record(&self, redaction: &Redaction, maximum: usize) -> (Vec<u8>, Value) {
            let bytes = assemble(&self.input(), redaction, maximum);
            assert!(bytes.len() <= maximum, "{} > {maximum}", bytes.len());
            assert_ne!(bytes.last(), Some(&b'\n'));
            let value: Value = serde_json::from_slice(&bytes).unwrap();
            (bytes, value)
        }
    }

    fn empty() -> BodyCapture {
        capture(b"", None)
    }

    fn base64_decode(text: &str) -> Vec<u8> {
        BASE64.decode(text).unwrap()
    }

    fn contains(haystack: &[u8], needle: &str) -> bool {
        haystack
            .windows(needle.len())
            .any(|window| window == needle.as_bytes())
    }

    #[test]
    fn record_has_every_contract_field() {
        let mut exchange = Exchange::new(capture(b"{\"x\":1}", None), capture(b"ok", None));
        exchange.error = Some(("upstream_error".to_owned(), "reset".to_owned()));
        exchange.trailers = Some(header_map(&[("grpc-status", "0")]));
        let (_, record) = exchange.record(&Redaction::default(), MAXIMUM_RECORD_BYTES);
        assert_eq!(record["schema"], SCHEMA);
        assert_eq!(record["id"], "0190f5b4-6c1e-7a3b-8f00-0123456789ab");
        assert_eq!(record["correlation_id"], "corr-1");
        assert_eq!(record["service"], "fraud-model");
        assert_eq!(record["started_at"], "2026-11-23T17:20:45.380492Z");
        assert_eq!(record["duration_ms"], 12.5);
        assert_eq!(record["outcome"], "ok");
        assert_eq!(
            record["error"],
            json!({"kind": "upstream_error", "message": "reset"})
        );
        let request = &record["request"];
        assert_eq!(request["method"], "POST");
        assert_eq!(request["path"], "/score");
        assert_eq!(request["query"], Value::Null);
        assert_eq!(request["http_version"], "HTTP/1.1");
        assert_eq!(
            request["headers"],
            json!({"content-type": "application/json", "x-request-id": "corr-1"})
        );
        assert!(request.get("headers_truncated").is_none());
        let body = &request["body"];
        assert_eq!(body["size"], 7);
        assert_eq!(body["sha256"], lowercase_hex(&digest(7)));
        assert_eq!(body["content_type"], Value::Null);
        assert_eq!(body["encoding"], "json");
        assert_eq!(body["truncated"], false);
        assert_eq!(body["inline"], json!({"x": 1}));
        assert_eq!(body["blob"], Value::Null);
        assert_eq!(body["complete"], true);
        assert!(body.get("excluded").is_none());
        let response = &record["response"];
        assert_eq!(response["status"], 200);
        assert_eq!(response["body"]["encoding"], "utf8");
        assert_eq!(response["body"]["inline"], "ok");
        assert_eq!(response["trailers"], json!({"grpc-status": "0"}));
        assert!(record.get("record_truncated").is_none());
    }

    #[test]
    fn no_response_is_null_and_no_trailers_are_null() {
        let mut exchange = Exchange::new(empty(), empty());
        let (_, record) = exchange.record(&Redaction::default(), MAXIMUM_RECORD_BYTES);
        assert_eq!(record["response"]["trailers"], Value::Null);
        exchange.response = None;
        let (_, record) = exchange.record(&Redaction::default(), MAXIMUM_RECORD_BYTES);
        assert_eq!(record["response"], Value::Null);
    }

    #[test]
    fn headers_are_lower_cased_joined_and_lossy() {
        let mut exchange = Exchange::new(empty(), empty());
        exchange.request_headers =
            header_map(&[("Accept", "a"), ("ACCEPT", "b"), ("X-Mixed", "1")]);
        exchange
            .request_headers
            .append("x-latin1", HeaderValue::from_bytes(b"caf\xe9").unwrap());
        let (_, record) = exchange.record(&Redaction::default(), MAXIMUM_RECORD_BYTES);
        assert_eq!(
            record["request"]["headers"],
            json!({"accept": "a, b", "x-mixed": "1", "x-latin1": "caf\u{fffd}"})
        );
    }

    #[test]
    fn started_at_out_of_range_is_clamped() {
        assert_eq!(format_started_at(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        let before = UNIX_EPOCH - Duration::from_secs(10);
        assert_eq!(format_started_at(before), "1970-01-01T00:00:00.000000Z");
        let far = UNIX_EPOCH + Duration::from_secs(400_000_000_000);
        assert_eq!(format_started_at(far), "9999-12-31T23:59:59.999999Z");
    }

    #[test]
    fn empty_body_is_utf8_empty_string() {
        let exchange = Exchange::new(empty(), empty());
        let (_, record) = exchange.record(&Redaction::default(), MAXIMUM_RECORD_BYTES);
        let body = &record["request"]["body"];
        assert_eq!(body["encoding"], "utf8");
        assert_eq!(body["inline"], "");
        assert_eq!(body["truncated"], false);
        assert_eq!(body["size"], 0);
    }

    #[test]
    fn one_kib_json_round_trips_as_a_json_value() {
        let items: Vec<Value> = (0..40)
            .map(|index| json!({"feature": index, "name": format!("f{index}")}))
            .collect();
        let document = json!({"data": items});
        let text = serde_json::to_string_pretty(&document).unwrap();
        assert!(text.len() >= 1024, "{}", text.len());
        let exchange = Exchange::new(capture(text.as_bytes(), Some("application/json")), empty());
        let (_, record) = exchange.record(&Redaction::default(), MAXIMUM_RECORD_BYTES);
        let body = &record["request"]["body"];
        assert_eq!(body["encoding"], "json");
        assert_eq!(body["inline"], document);
        assert_eq!(body["truncated"], false);
        assert_eq!(body["size"], text.len());
        assert_eq!(body["content_type"], "application/json");
    }

    /// A JSON document of about `size` bytes with a secret in every row.
    fn big_json(size: usize) -> String {
        let mut text = String::from("{\"rows\":[");
        let mut index = 0;
        while text.len() < size {
            text.push_str(&format!(
                "{{\"id\":{index},\"ssn\":\"SECRET-{index:07}\",\"note\":\"row {index}\"}},"
            ));
            index += 1;
        }
        text.push_str("{}]}");
        text
    }

    #[test]
    fn ten_mib_json_with_a_64_kib_prefix_is_cut_utf8() {
        let text = big_json(10 * 1024 * 1024);
        let exchange = Exchange::new(capture(text.as_bytes(), Some("application/json")), empty());
        let (bytes, record) = exchange.record(&Redaction::default(), MAXIMUM_RECORD_BYTES);
        assert!(bytes.len() > MAXIMUM_RECORD_BYTES - 64, "{}", bytes.len());
        let body = &record["request"]["body"];
        assert_eq!(body["encoding"], "utf8");
        assert_eq!(body["truncated"], true);
        assert_eq!(body["complete"], false);
        assert_eq!(body["size"], text.len());
        assert_eq!(body["sha256"], lowercase_hex(&digest(text.len() as u64)));
        let inline = body["inline"].as_str().unwrap();
        assert!(text.starts_with(inline));
        assert!(inline.len() > 50_000, "{}", inline.len());
    }

    #[test]
    fn json_that_parses_but_does_not_fit_is_utf8_from_its_text() {
        let text = big_json(40_000);
        let exchange = Exchange::new(capture(text.as_bytes(), None), empty());
        let (_, record) = exchange.record(&Redaction::default(), 20_000);
        let body = &record["request"]["body"];
        assert_eq!(body["encoding"], "utf8");
        assert_eq!(body["truncated"], true);
        assert!(text.starts_with(body["inline"].as_str().unwrap()));
    }

    #[test]
    fn binary_body_is_base64_of_a_prefix() {
        let body: Vec<u8> = (0..100_000_u32)
            .map(|index| (index * 7 % 251) as u8 | 0x80)
            .collect();
        for maximum in [2_000, 10_001, MAXIMUM_RECORD_BYTES] {
            let exchange = Exchange::new(capture(&body, Some("application/octet-stream")), empty());
            let (bytes, record) = exchange.record(&Redaction::default(), maximum);
            let request_body = &record["request"]["body"];
            assert_eq!(request_body["encoding"], "base64");
            assert_eq!(request_body["truncated"], true);
            let decoded = base64_decode(request_body["inline"].as_str().unwrap());
            assert!(body.starts_with(&decoded));
            assert!(decoded.len() > 100);
            assert!(bytes.len() + 8 > maximum, "{} of {maximum}", bytes.len());
        }
        let small = [0xff_u8, 0x00, 0xfe];
        let exchange = Exchange::new(capture(&small, None), empty());
        let (_, record) = exchange.record(&Redaction::default(), 2_000);
        let request_body = &record["request"]["body"];
        assert_eq!(request_body["encoding"], "base64");
        assert_eq!(request_body["inline"], "/wD+");
        assert_eq!(request_body["truncated"], false);
    }

    #[test]
    fn escaped_sizes_match_serde_json() {
        for code in (0_u32..0x300).chain([0x2028, 0x2029, 0xfeff, 0x1f600]) {
            let Some(character) = char::from_u32(code) else {
                continue;
            };
            let text = character.to_string();
            let serialized = serde_json::to_string(&text).unwrap();
            assert_eq!(escaped_len(&text) + 2, serialized.len(), "U+{code:04X}");
        }
    }

    #[test]
    fn chunked_measuring_matches_serde_json() {
        let text = "ab\"\\\u{1}\n\té世😀\u{1f}x".repeat(40);
        for end in (0..=text.len()).filter(|end| text.is_char_boundary(*end)) {
            let prefix = &text[..end];
            let serialized = serde_json::to_string(prefix).unwrap().len() - 2;
            assert_eq!(escaped_len(prefix), serialized, "{end}");
            // The cut for a budget of exactly this size keeps the whole prefix, one byte less
            // keeps a shorter one.
            assert_eq!(cut_to_escaped_budget(&text, serialized), end, "{end}");
            if end > 0 {
                let shorter = cut_to_escaped_budget(&text, serialized - 1);
                assert!(shorter < end && text.is_char_boundary(shorter), "{end}");
                assert!(escaped_len(&text[..shorter]) < serialized);
            }
        }
    }

    #[test]
    fn quotes_and_control_characters_near_the_limit_stay_within_it() {
        let body: String = (0..30_000)
            .map(|index| match index % 3 {
                0 => '"',
                1 => '\u{1}',
                _ => 'a',
            })
            .collect();
        for maximum in [
            1_000,
            2_000,
            2_001,
            2_002,
            2_003,
            2_004,
            2_005,
            30_000,
            MAXIMUM_RECORD_BYTES,
        ] {
            let exchange = Exchange::new(capture(body.as_bytes(), Some("text/plain")), empty());
            let (bytes, record) = exchange.record(&Redaction::default(), maximum);
            let request_body = &record["request"]["body"];
            assert_eq!(request_body["encoding"], "utf8");
            assert_eq!(request_body["truncated"], true);
            assert!(body.starts_with(request_body["inline"].as_str().unwrap()));
            // Exact accounting: what is left unused is at most one escaped character (5 bytes)
            // and the placeholders' longer `encoding`/`truncated` values (3 bytes per body).
            assert!(bytes.len() + 12 > maximum, "{} of {maximum}", bytes.len());
        }
    }

    #[test]
    fn multibyte_characters_are_never_cut() {
        let body = "héllo 😀 世界 ".repeat(5_000);
        for maximum in 1_000..1_040 {
            let exchange = Exchange::new(capture(body.as_bytes(), None), empty());
            let (_, record) = exchange.record(&Redaction::default(), maximum);
            let inline = record["request"]["body"]["inline"].as_str().unwrap();
            assert!(body.starts_with(inline));
            assert_eq!(record["request"]["body"]["encoding"], "utf8");
        }
        // The capture itself ends inside an emoji: the partial character is dropped, still utf8.
        let mut cut = capture(body.as_bytes(), None);
        let emoji_start = body.find('😀').unwrap();
        cut.prefix.truncate(emoji_start + 2);
        cut.complete = false;
        let exchange = Exchange::new(cut, empty());
        let (_, record) = exchange.record(&Redaction::default(), MAXIMUM_RECORD_BYTES);
        let request_body = &record["request"]["body"];
        assert_eq!(request_body["encoding"], "utf8");
        assert_eq!(request_body["inline"], &body[..emoji_start]);
        assert_eq!(request_body["truncated"], true);
        // A whole body ending in a broken character is not text.
        let mut broken = body.as_bytes()[..emoji_start + 2].to_vec();
        broken.truncate(emoji_start + 2);
        let exchange = Exchange::new(capture(&broken, None), empty());
        let (_, record) = exchange.record(&Redaction::default(), MAXIMUM_RECORD_BYTES);
        assert_eq!(record["request"]["body"]["encoding"], "base64");
        assert_eq!(record["request"]["body"]["truncated"], false);
    }

    #[test]
    fn huge_headers_are_cut_and_dropped_to_fit() {
        let value = "v".repeat(4 * 1024);
        let mut headers = HeaderMap::new();
        for index in 0..200 {
            headers.append(
                HeaderName::from_bytes(format!("x-header-{index:03}").as_bytes()).unwrap(),
                HeaderValue::from_str(&value).unwrap(),
            );
        }
        let body = "b".repeat(50_000);
        for maximum in [2_000, 10_000, MAXIMUM_RECORD_BYTES] {
            let mut exchange = Exchange::new(capture(body.as_bytes(), None), capture(b"{}", None));
            exchange.request_headers = headers.clone();
            exchange.response.as_mut().unwrap().0 = headers.clone();
            exchange.trailers = Some(header_map(&[("grpc-status", "0")]));
            let (_, record) = exchange.record(&Redaction::default(), maximum);
            let request = &record["request"];
            assert_eq!(request["headers_truncated"], true);
            let kept = request["headers"].as_object().unwrap();
            assert!(kept.len() < 200);
            for kept_value in kept.values() {
                let kept_value = kept_value.as_str().unwrap();
                assert!(kept_value.ends_with(CUT_MARKER));
                assert_eq!(kept_value.len(), 1024 + CUT_MARKER.len());
            }
            assert_eq!(record["response"]["headers_truncated"], true);
            // Small maps keep their entries, and bodies keep a share.
            assert_eq!(record["response"]["trailers"], json!({"grpc-status": "0"}));
            assert_eq!(record["response"]["body"]["inline"], json!({}));
            if maximum == MAXIMUM_RECORD_BYTES {
                assert!(kept.len() > 10);
                let inline = request["body"]["inline"].as_str().unwrap();
                assert!(inline.len() > 10_000, "{}", inline.len());
            }
        }
    }

    #[test]
    fn headers_that_fit_are_untouched() {
        let value = "v".repeat(3_000);
        let mut exchange = Exchange::new(empty(), empty());
        exchange.request_headers = header_map(&[("x-long", &value)]);
        let (_, record) = exchange.record(&Redaction::default(), MAXIMUM_RECORD_BYTES);
        assert_eq!(record["request"]["headers"]["x-long"], value);
        assert!(record["request"].get("headers_truncated").is_none());
    }

    #[test]
    fn redacted_headers_never_appear() {
        let redaction = Redaction::new(&["X-Customer-Token".to_owned()], &[]).unwrap();
        let mut exchange = Exchange::new(capture(b"{}", None), empty());
        exchange.request_headers = header_map(&[
            ("authorization", "Bearer SECRET-A"),
            ("cookie", "a=SECRET-B"),
            ("cookie", "b=SECRET-C"),
            ("x-api-key", "SECRET-D"),
            ("api-key", "SECRET-E"),
            ("ocp-apim-subscription-key", "SECRET-F"),
            ("proxy-authorization", "Basic SECRET-G"),
            ("x-customer-token", "SECRET-H"),
            ("accept", "text/plain"),
        ]);
        let (headers, body) = exchange.response.take().unwrap();
        let mut headers = headers;
        headers.append("set-cookie", HeaderValue::from_static("s=SECRET-I"));
        headers.append("set-cookie", HeaderValue::from_static("t=SECRET-J"));
        exchange.response = Some((headers, body));
        exchange.trailers = Some(header_map(&[("x-customer-token", "SECRET-K")]));
        let (bytes, record) = exchange.record(&redaction, MAXIMUM_RECORD_BYTES);
        assert!(
            !contains(&bytes, "SECRET"),
            "{}",
            String::from_utf8_lossy(&bytes)
        );
        let request_headers = &record["request"]["headers"];
        assert_eq!(request_headers["authorization"], REDACTED);
        assert_eq!(request_headers["cookie"], REDACTED);
        assert_eq!(request_headers["x-customer-token"], REDACTED);
        assert_eq!(request_headers["accept"], "text/plain");
        assert_eq!(record["response"]["headers"]["set-cookie"], REDACTED);
        assert_eq!(record["response"]["trailers"]["x-customer-token"], REDACTED);
    }

    fn path_redaction() -> Redaction {
        Redaction::new(&[], &["$.rows[*].ssn".to_owned(), "$.password".to_owned()]).unwrap()
    }

    #[test]
    fn json_paths_never_appear_in_a_whole_json_body() {
        let body = br#"{"password": "SECRET-P", "rows": [{"ssn": "SECRET-1", "id": 1}]}"#;
        let exchange = Exchange::new(capture(body, None), capture(body, None));
        let (bytes, record) = exchange.record(&path_redaction(), MAXIMUM_RECORD_BYTES);
        assert!(!contains(&bytes, "SECRET"));
        assert_eq!(
            record["request"]["body"]["inline"],
            json!({"password": "[redacted]", "rows": [{"ssn": "[redacted]", "id": 1}]})
        );
        assert_eq!(record["response"]["body"]["encoding"], "json");
    }

    #[test]
    fn json_paths_never_appear_in_a_cut_json_prefix() {
        let text = big_json(10 * 1024 * 1024);
        // Cut by capture, and by the record budget, at many places, including inside a secret.
        for maximum in (2_000..2_100).chain([20_000, MAXIMUM_RECORD_BYTES]) {
            let exchange =
                Exchange::new(capture(text.as_bytes(), Some("application/json")), empty());
            let (bytes, record) = exchange.record(&path_redaction(), maximum);
            assert!(!contains(&bytes, "SECRET"), "{maximum}");
            assert_eq!(record["request"]["body"]["encoding"], "utf8");
        }
        for cut in 0..80 {
            let mut partial = capture(text.as_bytes(), None);
            partial.prefix.truncate(20 + cut);
            let exchange = Exchange::new(partial, empty());
            let (bytes, _) = exchange.record(&path_redaction(), MAXIMUM_RECORD_BYTES);
            assert!(!contains(&bytes, "SECRET"), "cut {cut}");
            assert!(!contains(&bytes, "SEC"), "cut {cut}");
        }
        // A whole JSON body too big to be inline as JSON falls back to its text, redacted.
        let whole = big_json(40_000);
        let exchange = Exchange::new(capture(whole.as_bytes(), None), empty());
        let (bytes, record) = exchange.record(&path_redaction(), 20_000);
        assert_eq!(record["request"]["body"]["encoding"], "utf8");
        assert!(!contains(&bytes, "SECRET"));
        // JSON-looking bytes that are not UTF-8 are base64 of the redacted bytes.
        let mut latin1 = b"{\"name\": \"caf\xe9\", \"password\": \"SECRET-Q\"".to_vec();
        latin1.extend_from_slice(b"}");
        let exchange = Exchange::new(capture(&latin1, None), empty());
        let (_, record) = exchange.record(&path_redaction(), MAXIMUM_RECORD_BYTES);
        let request_body = &record["request"]["body"];
        assert_eq!(request_body["encoding"], "base64");
        let decoded = base64_decode(request_body["inline"].as_str().unwrap());
        assert!(!contains(&decoded, "SECRET"));
    }

    #[test]
    fn excluded_body_has_null_inline() {
        let mut excluded = capture(b"\x89PNG....", Some("image/png"));
        excluded.excluded = Some("content_type");
        excluded.prefix.clear();
        let exchange = Exchange::new(excluded, empty());
        let (_, record) = exchange.record(&Redaction::default(), MAXIMUM_RECORD_BYTES);
        let body = &record["request"]["body"];
        assert_eq!(body["inline"], Value::Null);
        assert_eq!(body["encoding"], Value::Null);
        assert_eq!(body["truncated"], false);
        assert_eq!(body["excluded"], "content_type");
        assert_eq!(body["size"], 8);
    }

    #[test]
    fn blob_is_recorded() {
        let mut spilled = capture(&vec![b'a'; 100_000], None);
        spilled.blob = Some("s3://bucket/bodies/x/request".to_owned());
        let exchange = Exchange::new(spilled, empty());
        let (_, record) = exchange.record(&Redaction::default(), MAXIMUM_RECORD_BYTES);
        assert_eq!(
            record["request"]["body"]["blob"],
            "s3://bucket/bodies/x/request"
        );
    }

    #[test]
    fn bodies_share_the_budget() {
        let big = "r".repeat(60_000);
        let small = "s".repeat(1_000);
        // A small response stays whole, the big request takes the rest.
        let exchange = Exchange::new(
            capture(big.as_bytes(), None),
            capture(small.as_bytes(), None),
        );
        let (bytes, record) = exchange.record(&Redaction::default(), 20_000);
        assert_eq!(record["response"]["body"]["inline"], small);
        assert_eq!(record["response"]["body"]["truncated"], false);
        assert!(bytes.len() > 19_990);
        // Two big bodies get half each.
        let exchange = Exchange::new(capture(big.as_bytes(), None), capture(big.as_bytes(), None));
        let (_, record) = exchange.record(&Redaction::default(), 20_000);
        let request_length = record["request"]["body"]["inline"].as_str().unwrap().len();
        let response_length = record["response"]["body"]["inline"].as_str().unwrap().len();
        assert!(
            request_length.abs_diff(response_length) <= 1,
            "{request_length} {response_length}"
        );
        assert!(request_length > 9_000);
        // Both fit whole.
        let exchange = Exchange::new(
            capture(small.as_bytes(), None),
            capture(small.as_bytes(), None),
        );
        let (_, record) = exchange.record(&Redaction::default(), 20_000);
        assert_eq!(record["request"]["body"]["truncated"], false);
        assert_eq!(record["response"]["body"]["truncated"], false);
    }

    #[test]
    fn tiny_limits_and_huge_fields_never_exceed() {
        let mut exchange = Exchange::new(capture(&[b'x'; 5_000], None), capture(b"{}", None));
        exchange.path = format!("/{}", "p\u{1}".repeat(100_000));
        exchange.error = Some(("proxy_error".to_owned(), "m".repeat(100_000)));
        exchange.request_headers = header_map(&[("x-a", &"h".repeat(5_000))]);
        for maximum in [
            0, 1, 2, 3, 10, 60, 80, 100, 200, 500, 700, 900, 1_000, 2_000, 65_536,
        ] {
            let bytes = assemble(&exchange.input(), &Redaction::default(), maximum);
            assert!(bytes.len() <= maximum, "{} > {maximum}", bytes.len());
            if maximum >= 2 {
                let record: Value = serde_json::from_slice(&bytes).unwrap();
                if maximum >= 100 {
                    assert_eq!(record["schema"], SCHEMA);
                    assert_eq!(record["record_truncated"], true, "{maximum}");
                }
                if maximum >= 1_000 {
                    assert_eq!(record["id"], exchange.input().id);
                    assert_eq!(record["request"]["body"]["size"], 5_000, "{maximum}");
                }
            } else {
                assert!(bytes.is_empty());
            }
        }
    }

    /// Pseudo-random bodies of every kind, captured in part or whole, under random limits.
    #[test]
    fn property_records_fit_parse_and_describe_their_bodies() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state = xorshift(state);
            state
        };
        for iteration in 0..300 {
            let bodies: Vec<BodyCapture> = (0..2)
                .map(|_| {
                    let size_class = [64, 4 * 1024, 64 * 1024, 200 * 1024][(next() % 4) as usize];
                    let size = (next() % (size_class + 1)) as usize;
                    let body = random_body(&mut next, size);
                    let mut body_capture = capture(&body, None);
                    if next().is_multiple_of(3) {
                        let kept = (next() % (body_capture.prefix.len() as u64 + 1)) as usize;
                        body_capture.prefix.truncate(kept);
                        body_capture.complete = kept == body.len() && next().is_multiple_of(2);
                    }
                    if next().is_multiple_of(4) {
                        body_capture.content_type = Some("application/json".to_owned());
                    }
                    body_capture
                })
                .collect();
            let maximum = 1_000 + (next() % 64_537) as usize;
            let [request_body, response_body] = <[BodyCapture; 2]>::try_from(bodies).unwrap();
            let mut exchange = Exchange::new(request_body, response_body);
            let header_count = next() % 40;
            for index in 0..header_count {
                let length = (next() % 3_000) as usize;
                exchange.request_headers.append(
                    HeaderName::from_bytes(format!("x-h{index}").as_bytes()).unwrap(),
                    HeaderValue::from_str(&"v".repeat(length)).unwrap(),
                );
            }
            let (_, record) = exchange.record(&Redaction::default(), maximum);
            let bodies = [
                (&record["request"]["body"], &exchange.request_body),
                (
                    &record["response"]["body"],
                    &exchange.response.as_ref().unwrap().1,
                ),
            ];
            for (body, body_capture) in bodies {
                let context = format!("iteration {iteration}, maximum {maximum}");
                assert_eq!(body["size"], body_capture.size, "{context}");
                assert_eq!(
                    body["sha256"],
                    lowercase_hex(&body_capture.sha256.unwrap()),
                    "{context}"
                );
                let inline_bytes = match body["encoding"].as_str().unwrap() {
                    "json" => {
                        let parsed: Value = serde_json::from_slice(&body_capture.prefix).unwrap();
                        assert_eq!(body["inline"], parsed, "{context}");
                        assert_eq!(body["truncated"], false, "{context}");
                        continue;
                    }
                    "utf8" => body["inline"].as_str().unwrap().as_bytes().to_vec(),
                    "base64" => base64_decode(body["inline"].as_str().unwrap()),
                    other => panic!("{context}: encoding {other}"),
                };
                assert!(body_capture.prefix.starts_with(&inline_bytes), "{context}");
                let whole = inline_bytes.len() as u64 == body_capture.size;
                assert_eq!(body["truncated"], !whole, "{context}");
            }
        }
    }

    /// Random JSON with secrets at random depths, cut anywhere by capture and by the budget:
    /// no secret, nor a piece of one, is ever recorded.
    #[test]
    fn property_configured_fields_never_leak() {
        let redaction =
            Redaction::new(&[], &["$[*].password".to_owned(), "$[*].x.pin".to_owned()]).unwrap();
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            state = xorshift(state);
            state
        };
        for iteration in 0..200 {
            let mut text = String::from("[");
            let target = (next() % 150_000) as usize;
            while text.len() < target {
                match next() % 4 {
                    0 => text.push_str(r#"{"password": "SECRET\"SECRET\\u0001SECRET", "n": 1},"#),
                    1 => text.push_str(r#"{"x": {"pin": 97531864}, "y": "pin"},"#),
                    2 => text.push_str(r#"{"password":{"deep":["SECRET",{"a":"SECRET"}]}},"#),
                    _ => text.push_str(r#""filler \" é 😀 \n", 42, {"other": "ok"},"#),
                }
            }
            text.push_str("{}]");
            let mut body_capture = capture(text.as_bytes(), Some("application/json"));
            if next().is_multiple_of(2) {
                let kept = (next() % (body_capture.prefix.len() as u64 + 1)) as usize;
                body_capture.prefix.truncate(kept);
                body_capture.complete = false;
            }
            let maximum = 1_000 + (next() % 64_537) as usize;
            let exchange = Exchange::new(body_capture.clone(), body_capture);
            let (bytes, record) = exchange.record(&redaction, maximum);
            assert!(!contains(&bytes, "SEC"), "iteration {iteration}");
            for part in ["request", "response"] {
                let body = &record[part]["body"];
                let inline = match body["encoding"].as_str() {
                    Some("base64") => base64_decode(body["inline"].as_str().unwrap()),
                    _ => body["inline"].to_string().into_bytes(),
                };
                for secret in ["SEC", "9753", "1864"] {
                    assert!(
                        !contains(&inline, secret),
                        "iteration {iteration}: {secret}"
                    );
                }
            }
        }
    }

    /// A body of `size` bytes: ASCII, escapes, multibyte text, binary, or JSON.
    fn random_body(next: &mut impl FnMut() -> u64, size: usize) -> Vec<u8> {
        const PIECES: [&str; 8] = ["a", "Z9 ", "\"", "\\", "\u{1}", "\n", "é世", "😀"];
        let mut body = Vec::with_capacity(size + 8);
        match next() % 5 {
            0 => body.extend((0..size).map(|_| b' ' + (next() % 95) as u8)),
            1 | 2 => {
                let kinds = 1 + next() % PIECES.len() as u64;
                while body.len() < size {
                    body.extend_from_slice(PIECES[(next() % kinds) as usize].as_bytes());
                }
                if next().is_multiple_of(2) {
                    body.truncate(size); // may cut a character
                }
            }
            3 => body.extend((0..size).map(|_| next().to_le_bytes()[0])),
            _ => {
                let mut text = String::from("[");
                while text.len() < size {
                    let piece = PIECES[(next() % PIECES.len() as u64) as usize];
                    text.push_str(
                        &serde_json::to_string(&piece.repeat(1 + (next() % 20) as usize)).unwrap(),
                    );
                    text.push_str(if next().is_multiple_of(3) {
                        ",\n "
                    } else {
                        ","
                    });
                }
                text.push_str("0]");
                body = text.into_bytes();
            }
        }
        body
    }
}
