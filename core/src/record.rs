//! The trace record `scoretap.trace/1` (the record format in README): assembly of one exchange into one JSON
//! object of at most a given number of bytes (65,536 in production), whatever the bodies and
//! headers, with secrets redacted.
//!
//! How a record is fitted, in [`assemble`]:
//! 1. each body is prepared once: checked as JSON when the whole body is there (then redacted by
//!    path), else taken as UTF-8 text, else kept as bytes for base64; text and bytes go through
//!    the redaction's text fallback whenever JSON paths are configured, whatever the content
//!    type (it only touches values that follow a configured `"key":`);
//! 2. the record with every header and both bodies whole is written: when it fits, as it most
//!    often does, that is the record. It is not even written when its headers and bodies alone
//!    are over the limit;
//! 3. else the record is measured without headers and with empty inline bodies; headers get what
//!    is left after reserving up to half of it for the bodies. Headers that do not fit have their
//!    values longer than 1 KiB cut (`…[cut]` appended), and if that is not enough, each header
//!    map gets a fair share and the headers past it are dropped (`headers_truncated: true`, or
//!    `trailers_truncated: true`, on that part);
//! 4. the record is measured again with its headers and empty inline bodies; what remains is the
//!    bodies' budget: both whole when they fit, else each up to half and any unused share to the
//!    other. Sizes are counted exactly (JSON escaping included), and the final serialization is
//!    checked anyway: when over, the bodies' budgets shrink and the record is rebuilt, ending with
//!    empty inline bodies, which the measurement showed to fit;
//! 5. when even that skeleton does not fit, headers are dropped, then the record's own strings
//!    (path, query, error message, ...) are cut (`record_truncated: true`), then a minimal
//!    `{"schema","id","record_truncated"}` object, then `{}`, then nothing: the limit always holds.
//!
//! Records are written by hand into one buffer (see [`assemble_into`]), byte for byte as
//! serde_json would serialize the same fields (same escapes, same number formatting): nothing is
//! built only to be serialized, and a JSON body is copied in as text. Measuring is writing into
//! that buffer too.
//!
//! Body encodings:
//! - `json`: the whole body was captured and is JSON, exactly as `serde_json::Value` accepts it,
//!   nested at most 124 levels (the record, 3 levels more, stays within serde_json's 127);
//!   `inline` is the body as sent, without its insignificant whitespace (object keys in their
//!   order, numbers and escapes as written). When the body has a key named like the last field
//!   of a configured JSON path, it is instead parsed, redacted and re-serialized compactly
//!   (serde_json then orders object keys and re-prints numbers);
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
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use http::{HeaderMap, StatusCode};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
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
/// About the size of a record without its headers and inline bodies, to size its buffer once.
const SKELETON_ESTIMATE_BYTES: usize = 1024;

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
    let mut record = Vec::new();
    assemble_into(input, redaction, maximum_bytes, &mut record);
    record
}

/// [`assemble`] into `record`, which is cleared first: a caller writing records one after the
/// other can keep one buffer and spare an allocation per record. The buffer also serves as
/// scratch space while the record is measured.
///
/// Returns [`RecordFit::Whole`] when the record holds every header and both bodies as far as
/// they were captured (nothing cut to fit), so a caller need not look for `truncated` in it.
pub fn assemble_into(
    input: &RecordInput<'_>,
    redaction: &Redaction,
    maximum_bytes: usize,
    record: &mut Vec<u8>,
) -> RecordFit {
    record.clear();
    let assembly = Assembly::new(input, redaction);
    match assembly.fit(maximum_bytes, record) {
        Some(fit) => fit,
        None => {
            write_minimal_record(input.id, maximum_bytes, record);
            RecordFit::Cut
        }
    }
}

/// Whether a record had to cut anything to fit its size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordFit {
    /// Every header and both bodies (as far as captured) are in the record whole.
    Whole,
    /// Something was cut or dropped: a header, a field, a body (`truncated: true`).
    Cut,
}

/// An exchange prepared once, from which records of decreasing size are built and measured.
struct Assembly<'i> {
    input: &'i RecordInput<'i>,
    started_at: String,
    /// `duration_ms` as JSON text.
    duration_ms: String,
    /// The request's query with secret parameters redacted.
    query: Option<Cow<'i, str>>,
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
            duration_ms: json_float(input.duration_ms),
            query: input
                .request
                .query
                .map(|query| redaction.redact_query(query)),
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

    /// Writes into `out` the record at the first shrink level that fits and says whether it is
    /// whole; `None` (and `out` empty) when none fits.
    fn fit(mut self, maximum: usize, out: &mut Vec<u8>) -> Option<RecordFit> {
        out.reserve(self.size_estimate().min(maximum));
        if self.fit_whole(maximum, out) {
            return Some(RecordFit::Whole);
        }
        if self.fit_with_headers(maximum, out) {
            return Some(RecordFit::Cut);
        }
        let field_limits = [None].into_iter().chain(FIELD_LIMITS.map(Some));
        for field_limit in field_limits {
            let headers = self.header_choices(HeaderState::Dropped);
            if self.fit_bodies(headers, FieldCut(field_limit), maximum, out) {
                return Some(RecordFit::Cut);
            }
        }
        None
    }

    /// The common case first: the record with every header and both bodies whole, written once
    /// and kept if it fits. Not even written when its headers and bodies alone are too big.
    fn fit_whole(&self, maximum: usize, out: &mut Vec<u8>) -> bool {
        if self.headers_and_bodies_size() > maximum {
            return false;
        }
        out.clear();
        self.view(
            self.header_choices(HeaderState::AsFitted),
            FieldCut(None),
            self.request_body.render(usize::MAX),
            self.response_body
                .as_ref()
                .map(|body| body.render(usize::MAX)),
        )
        .write(out);
        if out.len() <= maximum {
            return true;
        }
        out.clear();
        false
    }

    /// About the size of the whole record, to allocate its buffer once.
    fn size_estimate(&self) -> usize {
        SKELETON_ESTIMATE_BYTES.saturating_add(self.headers_and_bodies_size())
    }

    /// What the headers and both bodies whole take in the record, about.
    fn headers_and_bodies_size(&self) -> usize {
        [&self.request_headers, &self.response_headers]
            .into_iter()
            .chain(self.trailers.as_ref())
            .map(RecordedHeaders::content_size)
            .fold(self.bodies_desired_extra(), usize::saturating_add)
    }

    /// What both bodies would take whole, beyond empty inline strings.
    fn bodies_desired_extra(&self) -> usize {
        self.request_body.desired_extra().saturating_add(
            self.response_body
                .as_ref()
                .map_or(0, PreparedBody::desired_extra),
        )
    }

    /// Level 0: every field whole, headers fitted into what the bodies leave them.
    fn fit_with_headers(&mut self, maximum: usize, out: &mut Vec<u8>) -> bool {
        let without_headers = measure(
            &self.view(
                self.header_choices(HeaderState::Empty),
                FieldCut(None),
                self.request_body.placeholder(),
                self.response_body.as_ref().map(PreparedBody::placeholder),
            ),
            out,
        );
        let Some(available) = maximum.checked_sub(without_headers) else {
            return false;
        };
        let bodies_desired = self.bodies_desired_extra();
        let header_budget = available - bodies_desired.min(available / 2);
        let mut lists: Vec<&mut RecordedHeaders<'_>> =
            vec![&mut self.request_headers, &mut self.response_headers];
        lists.extend(self.trailers.as_mut());
        fit_headers(&mut lists, header_budget);
        self.fit_bodies(
            self.header_choices(HeaderState::AsFitted),
            FieldCut(None),
            maximum,
            out,
        )
    }

    /// Measures the record with empty inline bodies, shares what remains between the bodies,
    /// and writes the record into `out`, shrinking the bodies until it fits. `false` (and `out`
    /// empty) when even empty inline bodies do not fit.
    fn fit_bodies(
        &self,
        headers: HeaderChoices<'_>,
        fields: FieldCut,
        maximum: usize,
        out: &mut Vec<u8>,
    ) -> bool {
        let response_body = self.response_body.as_ref();
        let skeleton = measure(
            &self.view(
                headers,
                fields,
                self.request_body.placeholder(),
                response_body.map(PreparedBody::placeholder),
            ),
            out,
        );
        let Some(remaining) = maximum.checked_sub(skeleton) else {
            return false;
        };
        let (mut request_extra, mut response_extra) = split_body_budget(
            remaining,
            self.request_body.desired_extra(),
            response_body.map(PreparedBody::desired_extra),
        );
        out.reserve(
            skeleton
                .saturating_add(request_extra)
                .saturating_add(response_extra),
        );
        // Sizes are counted exactly, so the first attempt fits; the others are a safety net.
        for attempt in 0..=BODY_FIT_ATTEMPTS {
            if attempt == BODY_FIT_ATTEMPTS {
                (request_extra, response_extra) = (0, 0);
            }
            out.clear();
            self.view(
                headers,
                fields,
                self.request_body.render(request_extra),
                response_body.map(|body| body.render(response_extra)),
            )
            .write(out);
            let Some(overshoot) = out.len().checked_sub(maximum).filter(|over| *over > 0) else {
                return true;
            };
            request_extra = request_extra.saturating_sub(overshoot) / (attempt + 1);
            response_extra = response_extra.saturating_sub(overshoot) / (attempt + 1);
        }
        out.clear();
        false
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

    /// The record as it will be written.
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
            duration_ms: &self.duration_ms,
            outcome: fields.cut_identity(input.outcome),
            error: input.error.map(|(kind, message)| ErrorView {
                kind: fields.cut(kind),
                message: fields.cut(message),
            }),
            request: RequestView {
                method: fields.cut(request.method),
                path: fields.cut(request.path),
                query: self.query.as_deref().map(|query| fields.cut(query)),
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

/// The length of a view once written; `out` serves as scratch space and is left empty.
fn measure(view: &RecordView<'_>, out: &mut Vec<u8>) -> usize {
    out.clear();
    view.write(out);
    let length = out.len();
    out.clear();
    length
}

/// The last resort: `{"schema","id","record_truncated":true}`, else `{}`, else nothing.
fn write_minimal_record(id: &str, maximum: usize, out: &mut Vec<u8>) {
    out.clear();
    let mut record = ObjectWriter::open(out);
    record.string("schema", SCHEMA);
    record.string("id", &FieldCut(Some(MINIMAL_ID_BYTES)).cut(id));
    record.boolean("record_truncated", true);
    record.close();
    if out.len() > maximum {
        out.clear();
        if maximum >= 2 {
            out.extend_from_slice(b"{}");
        }
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
pub fn format_started_at(started_at: SystemTime) -> String {
    const LAST_FORMATTABLE: Duration = Duration::new(253_402_300_799, 999_999_999);
    let since_epoch = started_at
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .min(LAST_FORMATTABLE);
    let clamped = UNIX_EPOCH.checked_add(since_epoch).unwrap_or(UNIX_EPOCH);
    humantime::format_rfc3339_micros(clamped).to_string()
}

/// Lowercase hexadecimal digits.
const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Lowercase hexadecimal.
fn lowercase_hex(bytes: &[u8]) -> String {
    let mut hex = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        hex.push(char::from(HEX_DIGITS[usize::from(byte >> 4)]));
        hex.push(char::from(HEX_DIGITS[usize::from(byte & 0x0f)]));
    }
    hex
}

/// Whether serde_json escapes this byte inside a string.
fn needs_escape(byte: u8) -> bool {
    byte < 0x20 || byte == b'"' || byte == b'\\'
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
    let bytes = text.as_bytes();
    if is_short_and_plain(bytes) {
        return bytes.len();
    }
    bytes
        .chunks(ESCAPE_CHUNK_BYTES)
        .map(escaped_chunk_len)
        .sum()
}

/// Whether `bytes`, shorter than a chunk, have nothing to escape: a quicker check than
/// measuring a chunk for most of a record's strings (names, values of headers, ...).
fn is_short_and_plain(bytes: &[u8]) -> bool {
    bytes.len() < ESCAPE_CHUNK_BYTES && find_escaped_byte(bytes).is_none()
}

/// [`escaped_len`] of at most [`ESCAPE_CHUNK_BYTES`] bytes.
fn escaped_chunk_len(chunk: &[u8]) -> usize {
    let mut escaped = 0_u8;
    let mut long_escapes = 0_u8;
    for &byte in chunk {
        escaped += u8::from(needs_escape(byte));
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

    /// Writes `"name":"value"`.
    fn write(&self, out: &mut Vec<u8>) {
        // Nothing to escape, as is most often the case: the size says so.
        let plain = self.size == self.name.len() + self.value.len() + 6;
        let write = if plain {
            write_plain_string
        } else {
            write_string
        };
        write(out, self.name);
        out.push(b':');
        write(out, &self.value);
    }
}

impl<'i> RecordedHeaders<'i> {
    fn new(map: &'i HeaderMap, redaction: &Redaction) -> Self {
        let mut entries: Vec<HeaderEntry<'i>> = Vec::with_capacity(map.keys_len());
        // The map yields all the values of a name one after the other, names in the order of
        // `HeaderMap::keys`: no lookup by name is needed to join them.
        let mut fields = map.iter().peekable();
        while let Some((name, first)) = fields.next() {
            let redacted = redaction.is_redacted_header(name);
            let mut value = if redacted {
                Cow::Borrowed(REDACTED)
            } else {
                header_text(first.as_bytes())
            };
            while let Some((_, next)) = fields.next_if(|(next_name, _)| *next_name == name) {
                if !redacted {
                    let joined = value.to_mut();
                    joined.push_str(", ");
                    joined.push_str(&header_text(next.as_bytes()));
                }
            }
            entries.push(HeaderEntry::new(name.as_str(), value));
        }
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

/// A header value as text: borrowed when it is UTF-8, else decoded lossily.
fn header_text(value: &[u8]) -> Cow<'_, str> {
    std::str::from_utf8(value).map_or_else(
        |_| Cow::Owned(String::from_utf8_lossy(value).into_owned()),
        Cow::Borrowed,
    )
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

/// A body prepared once: its whole JSON text if it has one, and lazily its text or bytes.
struct PreparedBody<'i> {
    capture: &'i BodyCapture,
    redaction: &'i Redaction,
    sha256_hex: Option<String>,
    /// The whole body as one line of compact, redacted JSON, when it is JSON.
    json: Option<Cow<'i, str>>,
    text: OnceCell<TextForm<'i>>,
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

    fn prepare_json(capture: &'i BodyCapture, redaction: &Redaction) -> Option<Cow<'i, str>> {
        if capture.excluded.is_some()
            || !capture.complete
            || !holds_whole_body(capture)
            || capture.prefix.is_empty()
        {
            return None;
        }
        compact_json(&capture.prefix, redaction)
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
            return json.len().saturating_sub(2);
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
            if json.len() <= extra.saturating_add(2) {
                return BodyRender {
                    encoding: Some("json"),
                    inline: Some(InlineView::Json(json)),
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
                    inline: Some(InlineView::Base64(bytes.get(..kept).unwrap_or_default())),
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

/// A whole body as one line of compact JSON, redacted by path; `None` when it is not JSON.
///
/// A body is JSON when `serde_json::Value` would parse it (UTF-8, numbers that fit in an `f64`,
/// no lone surrogate escape, ...) and it is nested at most [`MAXIMUM_BODY_DEPTH`] levels, so
/// that the record stays readable by serde_json. It is checked without building a value (by
/// [`compact_common_json`], else [`AnyJson`]) and kept as sent, without its insignificant
/// whitespace. Only a body with a key named like the last field of a configured path, the only
/// kind in which a path can select a value, is parsed into a value, redacted and re-serialized.
fn compact_json<'b>(body: &'b [u8], redaction: &Redaction) -> Option<Cow<'b, str>> {
    // JSON is UTF-8; checked once here, so that serde_json reads `&str` without checking each
    // string again.
    let text = std::str::from_utf8(body).ok()?;
    if redaction.has_json_paths() && redaction.mentions_configured_field(body) {
        let mut value: Value = serde_json::from_str(text).ok()?;
        redaction.redact_json(&mut value);
        let compact = serde_json::to_string(&value).ok()?;
        return fits_in_a_record(&compact).then_some(Cow::Owned(compact));
    }
    if let Some(compact) = compact_common_json(text) {
        return Some(compact);
    }
    serde_json::from_str::<AnyJson>(text).ok()?;
    let compact = strip_insignificant_whitespace(text);
    fits_in_a_record(&compact).then_some(compact)
}

/// A record holds a body 3 levels down (the record, its request or response, the body): a body
/// nested deeper than this would make the record deeper than the 127 levels serde_json reads.
const MAXIMUM_BODY_DEPTH: usize = 124;

/// Whether compact JSON is nested at most [`MAXIMUM_BODY_DEPTH`] levels.
fn fits_in_a_record(json: &str) -> bool {
    let bytes = json.as_bytes();
    let (mut depth, mut deepest) = (0_usize, 0_usize);
    let mut position = 0;
    while let Some(&byte) = bytes.get(position) {
        match byte {
            b'"' => {
                position = end_of_json_string(bytes, position);
                continue;
            }
            b'{' | b'[' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        position += 1;
    }
    deepest <= MAXIMUM_BODY_DEPTH
}

/// Nesting deeper than this is left to serde_json (and [`fits_in_a_record`]).
const SCANNED_DEPTH: u32 = 100;

/// Checks and compacts JSON text in one pass, as [`compact_json`] does in two, for the JSON met
/// in practice. `None` when the text is not JSON, and also when it holds what is rarely seen
/// and only serde_json can rule on: a surrogate `\u` escape, a number of 1e300 or more, an
/// exponent of more than 3 digits, more than [`SCANNED_DEPTH`] levels. Whatever it accepts,
/// `serde_json::Value` accepts.
fn compact_common_json(text: &str) -> Option<Cow<'_, str>> {
    let mut compactor = Compactor {
        text,
        position: 0,
        stripped: None,
        kept_from: 0,
    };
    // Bit `n` is set when the container at depth `n + 1` is an object, clear for an array.
    let mut objects = 0_u128;
    let mut depth = 0_u32;
    'value: loop {
        match compactor.skip_whitespace()? {
            open @ (b'{' | b'[') => {
                compactor.position += 1;
                let close = if open == b'{' { b'}' } else { b']' };
                if compactor.skip_whitespace()? == close {
                    // Empty: a complete value.
                    compactor.position += 1;
                } else {
                    if depth >= SCANNED_DEPTH {
                        return None;
                    }
                    if open == b'{' {
                        objects |= 1 << depth;
                        compactor.key()?;
                    } else {
                        objects &= !(1 << depth);
                    }
                    depth += 1;
                    continue 'value;
                }
            }
            _ => compactor.position = end_of_common_scalar(text.as_bytes(), compactor.position)?,
        }
        // After a value: a comma before the next one, or the ends of containers.
        loop {
            if depth == 0 {
                // Nothing but whitespace may follow the top-level value.
                return match compactor.skip_whitespace() {
                    None => Some(compactor.finish()),
                    Some(_) => None,
                };
            }
            let in_object = (objects >> (depth - 1)) & 1 == 1;
            match compactor.skip_whitespace()? {
                b',' => {
                    compactor.position += 1;
                    if in_object {
                        compactor.key()?;
                    }
                    continue 'value;
                }
                b'}' if in_object => {}
                b']' if !in_object => {}
                _ => return None,
            }
            compactor.position += 1;
            depth -= 1;
        }
    }
}

/// [`compact_common_json`]'s progress through the text, and the text kept so far once some
/// whitespace was dropped.
struct Compactor<'t> {
    text: &'t str,
    position: usize,
    /// `None` while no whitespace was dropped.
    stripped: Option<String>,
    /// Where the text not yet copied into `stripped` starts.
    kept_from: usize,
}

impl<'t> Compactor<'t> {
    /// Drops the whitespace at the position; returns the byte after it, `None` at the end.
    #[inline(always)]
    fn skip_whitespace(&mut self) -> Option<u8> {
        let byte = *self.text.as_bytes().get(self.position)?;
        if matches!(byte, b' ' | b'\t' | b'\n' | b'\r') {
            self.drop_whitespace()
        } else {
            Some(byte)
        }
    }

    /// [`Compactor::skip_whitespace`] when there is some: out of line, as compact JSON has none.
    #[cold]
    #[inline(never)]
    fn drop_whitespace(&mut self) -> Option<u8> {
        let bytes = self.text.as_bytes();
        let run = bytes.get(self.position..).map_or(0, |rest| {
            rest.iter()
                .take_while(|byte| matches!(byte, b' ' | b'\t' | b'\n' | b'\r'))
                .count()
        });
        // Whitespace is ASCII: both ends are character boundaries.
        let kept = self
            .text
            .get(self.kept_from..self.position)
            .unwrap_or_default();
        self.stripped
            .get_or_insert_with(|| String::with_capacity(self.text.len()))
            .push_str(kept);
        self.position += run;
        self.kept_from = self.position;
        bytes.get(self.position).copied()
    }

    /// Steps over a key and the colon after it.
    fn key(&mut self) -> Option<()> {
        if self.skip_whitespace()? != b'"' {
            return None;
        }
        self.position = end_of_common_string(self.text.as_bytes(), self.position)?;
        if self.skip_whitespace()? != b':' {
            return None;
        }
        self.position += 1;
        Some(())
    }

    /// The text without the whitespace dropped.
    fn finish(self) -> Cow<'t, str> {
        match self.stripped {
            None => Cow::Borrowed(self.text),
            Some(mut stripped) => {
                stripped.push_str(self.text.get(self.kept_from..).unwrap_or_default());
                Cow::Owned(stripped)
            }
        }
    }
}

/// The index just past the string, number or literal starting at `start`, for the values
/// [`compact_common_json`] accepts.
fn end_of_common_scalar(bytes: &[u8], start: usize) -> Option<usize> {
    let literal = |literal: &[u8]| {
        (bytes.get(start..start + literal.len()) == Some(literal)).then_some(start + literal.len())
    };
    match bytes.get(start)? {
        b'"' => end_of_common_string(bytes, start),
        b'-' | b'0'..=b'9' => end_of_common_number(bytes, start),
        b't' => literal(b"true"),
        b'f' => literal(b"false"),
        b'n' => literal(b"null"),
        _ => None,
    }
}

/// The index just past the closing quote of the string opening at `start`, when it holds no
/// control character, no invalid escape and no surrogate escape (`\ud83d`...).
fn end_of_common_string(bytes: &[u8], start: usize) -> Option<usize> {
    let mut position = start + 1;
    loop {
        position += find_escaped_byte(bytes.get(position..)?)?;
        match *bytes.get(position)? {
            b'"' => return Some(position + 1),
            b'\\' => {
                position += match *bytes.get(position + 1)? {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => 2,
                    b'u' => {
                        let code_unit = bytes
                            .get(position + 2..position + 6)?
                            .iter()
                            .try_fold(0_u32, |unit, &digit| {
                                Some(unit << 4 | char::from(digit).to_digit(16)?)
                            })?;
                        if (0xd800..=0xdfff).contains(&code_unit) {
                            return None;
                        }
                        6
                    }
                    _ => return None,
                };
            }
            // A control character.
            _ => return None,
        }
    }
}

/// The index of the first byte of `bytes` for which [`needs_escape`] holds, looked for eight
/// bytes at a time.
fn find_escaped_byte(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH_BITS: u64 = 0x8080_8080_8080_8080;
    // The high bit of each byte that is zero (`has_zero`) or below 0x20 (`has_control`) is set;
    // a borrow can set it in bytes above too, but the lowest one set is always right.
    let has_zero = |word: u64| word.wrapping_sub(ONES) & !word;
    let has_control = |word: u64| word.wrapping_sub(ONES * 0x20) & !word;
    let mut words = bytes.chunks_exact(8);
    let mut offset = 0;
    for word in &mut words {
        let Ok(word) = <[u8; 8]>::try_from(word).map(u64::from_le_bytes) else {
            break;
        };
        let found = (has_zero(word ^ (ONES * u64::from(b'"')))
            | has_zero(word ^ (ONES * u64::from(b'\\')))
            | has_control(word))
            & HIGH_BITS;
        if found != 0 {
            return Some(offset + found.trailing_zeros() as usize / 8);
        }
        offset += 8;
    }
    let rest = bytes.get(offset..)?;
    rest.iter()
        .position(|&byte| needs_escape(byte))
        .map(|index| offset + index)
}

/// The index just past the number starting at `start`, when it is a JSON number below 1e300 in
/// magnitude (serde_json refuses numbers that overflow an `f64`) with at most 3 exponent digits.
fn end_of_common_number(bytes: &[u8], start: usize) -> Option<usize> {
    let digits_at = |position: usize| {
        bytes.get(position..).map_or(0, |rest| {
            rest.iter().take_while(|byte| byte.is_ascii_digit()).count()
        })
    };
    let mut position = start + usize::from(bytes.get(start) == Some(&b'-'));
    let integer_digits = digits_at(position);
    // No digit, or a leading zero (`01`).
    if integer_digits == 0 || (integer_digits > 1 && bytes.get(position) == Some(&b'0')) {
        return None;
    }
    position += integer_digits;
    if bytes.get(position) == Some(&b'.') {
        let fraction_digits = digits_at(position + 1);
        if fraction_digits == 0 {
            return None;
        }
        position += 1 + fraction_digits;
    }
    let mut exponent = 0_usize;
    if matches!(bytes.get(position), Some(b'e' | b'E')) {
        position += 1;
        let negative = bytes.get(position) == Some(&b'-');
        position += usize::from(matches!(bytes.get(position), Some(b'+' | b'-')));
        let exponent_digits = digits_at(position);
        if exponent_digits == 0 || exponent_digits > 3 {
            return None;
        }
        if !negative {
            exponent = bytes
                .get(position..position + exponent_digits)?
                .iter()
                .fold(0, |value, digit| value * 10 + usize::from(digit - b'0'));
        }
        position += exponent_digits;
    }
    // The magnitude is below 10^(integer digits + exponent).
    (integer_digits + exponent <= 300).then_some(position)
}

/// Any JSON value, accepted exactly when `serde_json::Value` accepts it (both are read through
/// `deserialize_any`, with the same checks of strings, numbers and depth), but kept nowhere:
/// checking a body allocates nothing.
struct AnyJson;

impl<'de> Deserialize<'de> for AnyJson {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(AnyJson)
    }
}

impl<'de> Visitor<'de> for AnyJson {
    type Value = AnyJson;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut elements: A) -> Result<Self, A::Error> {
        while elements.next_element::<AnyJson>()?.is_some() {}
        Ok(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut members: A) -> Result<Self, A::Error> {
        while members.next_key::<AnyJson>()?.is_some() {
            members.next_value::<AnyJson>()?;
        }
        Ok(self)
    }
}

/// Valid JSON text without the whitespace between its tokens, so that it fits on the record's
/// line; borrowed when there is none.
fn strip_insignificant_whitespace(text: &str) -> Cow<'_, str> {
    let is_whitespace = |byte: &u8| matches!(byte, b' ' | b'\t' | b'\n' | b'\r');
    let bytes = text.as_bytes();
    let mut stripped: Option<String> = None;
    // Where the text not yet copied into `stripped` starts.
    let mut kept_from = 0;
    let mut position = 0;
    while let Some(byte) = bytes.get(position) {
        if *byte == b'"' {
            position = end_of_json_string(bytes, position);
        } else if is_whitespace(byte) {
            let run = bytes.get(position..).map_or(0, |rest| {
                rest.iter().take_while(|byte| is_whitespace(byte)).count()
            });
            // Whitespace is ASCII: both ends are character boundaries.
            let kept = text.get(kept_from..position).unwrap_or_default();
            stripped
                .get_or_insert_with(|| String::with_capacity(text.len()))
                .push_str(kept);
            position += run;
            kept_from = position;
        } else {
            position += 1;
        }
    }
    match stripped {
        None => Cow::Borrowed(text),
        Some(mut stripped) => {
            stripped.push_str(text.get(kept_from..).unwrap_or_default());
            Cow::Owned(stripped)
        }
    }
}

/// The index just past the closing quote of the JSON string opening at `start` (the end of the
/// text if it has none).
fn end_of_json_string(bytes: &[u8], start: usize) -> usize {
    let mut position = start + 1;
    while let Some(&byte) = bytes.get(position) {
        match byte {
            b'\\' => position += 2,
            b'"' => return position + 1,
            _ => position += 1,
        }
    }
    bytes.len()
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
    /// Compact JSON text, written as it is.
    Json(&'v str),
    /// Text, written as a JSON string.
    Text(&'v str),
    /// Bytes, written as a base64 string.
    Base64(&'v [u8]),
}

impl InlineView<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        match self {
            InlineView::Json(json) => out.extend_from_slice(json.as_bytes()),
            InlineView::Text(text) => write_string(out, text),
            InlineView::Base64(bytes) => write_base64(out, bytes),
        }
    }
}

/// A header map, written as an object in its order.
#[derive(Debug, Clone, Copy)]
struct HeadersView<'v>(&'v [HeaderEntry<'v>]);

impl HeadersView<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        out.push(b'{');
        for (index, entry) in self.0.iter().enumerate() {
            if index > 0 {
                out.push(b',');
            }
            entry.write(out);
        }
        out.push(b'}');
    }
}

/// The record as written; field order is the contract's (the record format in README).
struct RecordView<'v> {
    schema: &'static str,
    id: Cow<'v, str>,
    correlation_id: Cow<'v, str>,
    service: Cow<'v, str>,
    started_at: &'v str,
    /// JSON text.
    duration_ms: &'v str,
    outcome: Cow<'v, str>,
    error: Option<ErrorView<'v>>,
    request: RequestView<'v>,
    response: Option<ResponseView<'v>>,
    /// The record's own strings were cut to fit (written only when true).
    record_truncated: bool,
}

impl RecordView<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        let mut record = ObjectWriter::open(out);
        record.string("schema", self.schema);
        record.string("id", &self.id);
        record.string("correlation_id", &self.correlation_id);
        record.string("service", &self.service);
        record.string("started_at", self.started_at);
        record
            .member("duration_ms")
            .extend_from_slice(self.duration_ms.as_bytes());
        record.string("outcome", &self.outcome);
        match &self.error {
            Some(error) => error.write(record.member("error")),
            None => record.null("error"),
        }
        self.request.write(record.member("request"));
        match &self.response {
            Some(response) => response.write(record.member("response")),
            None => record.null("response"),
        }
        record.flag("record_truncated", self.record_truncated);
        record.close();
    }
}

struct ErrorView<'v> {
    kind: Cow<'v, str>,
    message: Cow<'v, str>,
}

impl ErrorView<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        let mut error = ObjectWriter::open(out);
        error.string("kind", &self.kind);
        error.string("message", &self.message);
        error.close();
    }
}

struct RequestView<'v> {
    method: Cow<'v, str>,
    path: Cow<'v, str>,
    query: Option<Cow<'v, str>>,
    http_version: Cow<'v, str>,
    headers: HeadersView<'v>,
    /// Written only when true.
    headers_truncated: bool,
    body: BodyView<'v>,
}

impl RequestView<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        let mut request = ObjectWriter::open(out);
        request.string("method", &self.method);
        request.string("path", &self.path);
        request.optional_string("query", self.query.as_deref());
        request.string("http_version", &self.http_version);
        self.headers.write(request.member("headers"));
        request.flag("headers_truncated", self.headers_truncated);
        self.body.write(request.member("body"));
        request.close();
    }
}

struct ResponseView<'v> {
    status: u16,
    headers: HeadersView<'v>,
    /// Written only when true.
    headers_truncated: bool,
    body: BodyView<'v>,
    trailers: Option<HeadersView<'v>>,
    /// Written only when true.
    trailers_truncated: bool,
}

impl ResponseView<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        let mut response = ObjectWriter::open(out);
        write_u64(response.member("status"), u64::from(self.status));
        self.headers.write(response.member("headers"));
        response.flag("headers_truncated", self.headers_truncated);
        self.body.write(response.member("body"));
        match &self.trailers {
            Some(trailers) => trailers.write(response.member("trailers")),
            None => response.null("trailers"),
        }
        response.flag("trailers_truncated", self.trailers_truncated);
        response.close();
    }
}

struct BodyView<'v> {
    size: u64,
    sha256: Option<&'v str>,
    content_type: Option<Cow<'v, str>>,
    encoding: Option<&'static str>,
    truncated: bool,
    inline: Option<InlineView<'v>>,
    blob: Option<Cow<'v, str>>,
    complete: bool,
    /// Written only when set.
    excluded: Option<&'static str>,
}

impl BodyView<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        let mut body = ObjectWriter::open(out);
        write_u64(body.member("size"), self.size);
        body.optional_string("sha256", self.sha256);
        body.optional_string("content_type", self.content_type.as_deref());
        body.optional_string("encoding", self.encoding);
        body.boolean("truncated", self.truncated);
        match &self.inline {
            Some(inline) => inline.write(body.member("inline")),
            None => body.null("inline"),
        }
        body.optional_string("blob", self.blob.as_deref());
        body.boolean("complete", self.complete);
        if let Some(reason) = self.excluded {
            body.string("excluded", reason);
        }
        body.close();
    }
}

/// Writes one JSON object member by member, commas included. Member names are written as
/// given: they must need no escaping (the record's own field names).
struct ObjectWriter<'o> {
    out: &'o mut Vec<u8>,
    empty: bool,
}

impl<'o> ObjectWriter<'o> {
    fn open(out: &'o mut Vec<u8>) -> Self {
        out.push(b'{');
        Self { out, empty: true }
    }

    /// Starts a member (`"name":`, after a comma unless it is the first) and returns the buffer
    /// its value is to be written to.
    fn member(&mut self, name: &str) -> &mut Vec<u8> {
        if !self.empty {
            self.out.push(b',');
        }
        self.empty = false;
        self.out.push(b'"');
        self.out.extend_from_slice(name.as_bytes());
        self.out.extend_from_slice(b"\":");
        self.out
    }

    fn string(&mut self, name: &str, value: &str) {
        write_string(self.member(name), value);
    }

    fn optional_string(&mut self, name: &str, value: Option<&str>) {
        match value {
            Some(value) => self.string(name, value),
            None => self.null(name),
        }
    }

    fn null(&mut self, name: &str) {
        self.member(name).extend_from_slice(b"null");
    }

    fn boolean(&mut self, name: &str, value: bool) {
        let literal: &[u8] = if value { b"true" } else { b"false" };
        self.member(name).extend_from_slice(literal);
    }

    /// A boolean member written only when true.
    fn flag(&mut self, name: &str, value: bool) {
        if value {
            self.boolean(name, true);
        }
    }

    fn close(self) {
        self.out.push(b'}');
    }
}

/// Writes `text` as a JSON string escaped exactly as serde_json escapes it, which
/// [`escaped_len`] measures: `\"`, `\\`, `\b`, `\f`, `\n`, `\r`, `\t`, and the other control
/// characters as `\u00xx`. Chunks with nothing to escape are copied whole.
fn write_string(out: &mut Vec<u8>, text: &str) {
    let bytes = text.as_bytes();
    if is_short_and_plain(bytes) {
        write_plain_string(out, text);
        return;
    }
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut chunks = bytes.chunks(ESCAPE_CHUNK_BYTES);
    while let Some(chunk) = chunks.next() {
        if escaped_chunk_len(chunk) != chunk.len() {
            write_escaped_chunks(out, chunk, chunks);
            break;
        }
        out.extend_from_slice(chunk);
    }
    out.push(b'"');
}

/// Writes a text that needs no escaping as a JSON string.
fn write_plain_string(out: &mut Vec<u8>, text: &str) {
    out.reserve(text.len() + 2);
    out.push(b'"');
    out.extend_from_slice(text.as_bytes());
    out.push(b'"');
}

/// The rest of [`write_string`], from its first chunk with something to escape. Such chunks
/// are escaped byte by byte, without a branch per byte, into a local buffer: escapes are often
/// dense (JSON text in a string), and copying the runs between them one by one costs more.
fn write_escaped_chunks<'t>(
    out: &mut Vec<u8>,
    first: &'t [u8],
    rest: impl Iterator<Item = &'t [u8]>,
) {
    // Room for the longest escape (6 bytes) of each byte of a chunk; the table's 8-byte
    // entries, copied whole, end at most 2 bytes further.
    let mut escaped = [0_u8; ESCAPE_CHUNK_BYTES * 6 + 2];
    for chunk in std::iter::once(first).chain(rest) {
        if escaped_chunk_len(chunk) == chunk.len() {
            out.extend_from_slice(chunk);
            continue;
        }
        let mut length = 0;
        for &byte in chunk {
            let entry = &ESCAPE_TABLE[usize::from(byte)];
            if let Some(slot) = escaped.get_mut(length..length + entry.len()) {
                slot.copy_from_slice(entry);
            }
            length += usize::from(entry[ESCAPE_LENGTH_INDEX]);
        }
        out.extend_from_slice(escaped.get(..length).unwrap_or_default());
    }
}

/// Where an [`ESCAPE_TABLE`] entry holds the length of its sequence.
const ESCAPE_LENGTH_INDEX: usize = 7;

/// For each byte, what serde_json writes for it in a string: up to 6 bytes, then padding, and
/// the sequence's length at [`ESCAPE_LENGTH_INDEX`].
const ESCAPE_TABLE: [[u8; 8]; 256] = escape_table();

const fn escape_table() -> [[u8; 8]; 256] {
    let mut table = [[0_u8; 8]; 256];
    let mut index = 0;
    while index < table.len() {
        let byte = index as u8;
        let short = match byte {
            b'"' => b'"',
            b'\\' => b'\\',
            0x08 => b'b',
            0x0c => b'f',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            _ => 0,
        };
        table[index] = if short != 0 {
            [b'\\', short, 0, 0, 0, 0, 0, 2]
        } else if byte < 0x20 {
            let high = HEX_DIGITS[(byte >> 4) as usize];
            let low = HEX_DIGITS[(byte & 0x0f) as usize];
            [b'\\', b'u', b'0', b'0', high, low, 0, 6]
        } else {
            [byte, 0, 0, 0, 0, 0, 0, 1]
        };
        index += 1;
    }
    table
}

/// Writes `bytes` base64-encoded, as a JSON string.
fn write_base64(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'"');
    let start = out.len();
    out.resize(start + base64_len(bytes.len()), 0);
    match BASE64.encode_slice(bytes, out.get_mut(start..).unwrap_or_default()) {
        Ok(written) => out.truncate(start + written),
        // The slice is exactly long enough; encoding into a new string is only a fallback.
        Err(_) => {
            out.truncate(start);
            out.extend_from_slice(BASE64.encode(bytes).as_bytes());
        }
    }
    out.push(b'"');
}

/// Writes an unsigned integer in decimal.
fn write_u64(out: &mut Vec<u8>, value: u64) {
    // u64::MAX has 20 digits.
    let mut digits = [0_u8; 20];
    let mut remaining = value;
    let mut start = digits.len();
    for digit in digits.iter_mut().rev() {
        *digit = b'0' + (remaining % 10) as u8;
        remaining /= 10;
        start -= 1;
        if remaining == 0 {
            break;
        }
    }
    out.extend_from_slice(digits.get(start..).unwrap_or_default());
}

/// A float as serde_json writes it: its shortest round-trip form, `null` when not finite.
fn json_float(value: f64) -> String {
    serde_json::Number::from_f64(value)
        .map_or_else(|| "null".to_owned(), |number| number.to_string())
}

#[cfg(test)]
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
                HeaderName::from_bytes(name.as_bytes()).expect("test input"),
                HeaderValue::from_str(value).expect("test input"),
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
            let value: Value = serde_json::from_slice(&bytes).expect("test input");
            (bytes, value)
        }
    }

    fn empty() -> BodyCapture {
        capture(b"", None)
    }

    fn base64_decode(text: &str) -> Vec<u8> {
        BASE64.decode(text).expect("test input")
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
        exchange.request_headers.append(
            "x-latin1",
            HeaderValue::from_bytes(b"caf\xe9").expect("test input"),
        );
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
        let text = serde_json::to_string_pretty(&document).expect("test input");
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
        let inline = body["inline"].as_str().expect("test input");
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
        assert!(text.starts_with(body["inline"].as_str().expect("test input")));
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
            let decoded = base64_decode(request_body["inline"].as_str().expect("test input"));
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
            let serialized = serde_json::to_string(&text).expect("test input");
            assert_eq!(escaped_len(&text) + 2, serialized.len(), "U+{code:04X}");
        }
    }

    #[test]
    fn chunked_measuring_matches_serde_json() {
        let text = "ab\"\\\u{1}\n\té世😀\u{1f}x".repeat(40);
        for end in (0..=text.len()).filter(|end| text.is_char_boundary(*end)) {
            let prefix = &text[..end];
            let serialized = serde_json::to_string(prefix).expect("test input").len() - 2;
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
            assert!(body.starts_with(request_body["inline"].as_str().expect("test input")));
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
            let inline = record["request"]["body"]["inline"]
                .as_str()
                .expect("test input");
            assert!(body.starts_with(inline));
            assert_eq!(record["request"]["body"]["encoding"], "utf8");
        }
        // The capture itself ends inside an emoji: the partial character is dropped, still utf8.
        let mut cut = capture(body.as_bytes(), None);
        let emoji_start = body.find('😀').expect("test input");
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
                HeaderName::from_bytes(format!("x-header-{index:03}").as_bytes())
                    .expect("test input"),
                HeaderValue::from_str(&value).expect("test input"),
            );
        }
        let body = "b".repeat(50_000);
        for maximum in [2_000, 10_000, MAXIMUM_RECORD_BYTES] {
            let mut exchange = Exchange::new(capture(body.as_bytes(), None), capture(b"{}", None));
            exchange.request_headers = headers.clone();
            exchange.response.as_mut().expect("test input").0 = headers.clone();
            exchange.trailers = Some(header_map(&[("grpc-status", "0")]));
            let (_, record) = exchange.record(&Redaction::default(), maximum);
            let request = &record["request"];
            assert_eq!(request["headers_truncated"], true);
            let kept = request["headers"].as_object().expect("test input");
            assert!(kept.len() < 200);
            for kept_value in kept.values() {
                let kept_value = kept_value.as_str().expect("test input");
                assert!(kept_value.ends_with(CUT_MARKER));
                assert_eq!(kept_value.len(), 1024 + CUT_MARKER.len());
            }
            assert_eq!(record["response"]["headers_truncated"], true);
            // Small maps keep their entries, and bodies keep a share.
            assert_eq!(record["response"]["trailers"], json!({"grpc-status": "0"}));
            assert_eq!(record["response"]["body"]["inline"], json!({}));
            if maximum == MAXIMUM_RECORD_BYTES {
                assert!(kept.len() > 10);
                let inline = request["body"]["inline"].as_str().expect("test input");
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
        let redaction = Redaction::new(&["X-Customer-Token".to_owned()], &[]).expect("test input");
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
        let (headers, body) = exchange.response.take().expect("test input");
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
        Redaction::new(&[], &["$.rows[*].ssn".to_owned(), "$.password".to_owned()])
            .expect("test input")
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
        let decoded = base64_decode(request_body["inline"].as_str().expect("test input"));
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
    fn a_record_says_whether_it_cut_anything() {
        let small = Exchange::new(
            capture(b"{\"data\": [[1, 2]]}", None),
            capture(b"[0.5]", None),
        );
        let mut out = Vec::new();
        let fit = assemble_into(&small.input(), &Redaction::default(), 2_000, &mut out);
        assert_eq!(fit, RecordFit::Whole);
        assert!(!contains(&out, "\"truncated\":true"));
        // The same exchange in less room: the request body is cut.
        let room = out.len() - 4;
        let fit = assemble_into(&small.input(), &Redaction::default(), room, &mut out);
        assert_eq!(fit, RecordFit::Cut);
        // Nothing can fit: the last-resort record is cut too.
        let fit = assemble_into(&small.input(), &Redaction::default(), 300, &mut out);
        assert_eq!(fit, RecordFit::Cut);
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
        let request_length = record["request"]["body"]["inline"]
            .as_str()
            .expect("test input")
            .len();
        let response_length = record["response"]["body"]["inline"]
            .as_str()
            .expect("test input")
            .len();
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
                let record: Value = serde_json::from_slice(&bytes).expect("test input");
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
            let [request_body, response_body] =
                <[BodyCapture; 2]>::try_from(bodies).expect("test input");
            let mut exchange = Exchange::new(request_body, response_body);
            let header_count = next() % 40;
            for index in 0..header_count {
                let length = (next() % 3_000) as usize;
                exchange.request_headers.append(
                    HeaderName::from_bytes(format!("x-h{index}").as_bytes()).expect("test input"),
                    HeaderValue::from_str(&"v".repeat(length)).expect("test input"),
                );
            }
            let (_, record) = exchange.record(&Redaction::default(), maximum);
            let bodies = [
                (&record["request"]["body"], &exchange.request_body),
                (
                    &record["response"]["body"],
                    &exchange.response.as_ref().expect("test input").1,
                ),
            ];
            for (body, body_capture) in bodies {
                let context = format!("iteration {iteration}, maximum {maximum}");
                assert_eq!(body["size"], body_capture.size, "{context}");
                assert_eq!(
                    body["sha256"],
                    lowercase_hex(&body_capture.sha256.expect("test input")),
                    "{context}"
                );
                let inline_bytes = match body["encoding"].as_str().expect("test input") {
                    "json" => {
                        let parsed: Value =
                            serde_json::from_slice(&body_capture.prefix).expect("test input");
                        assert_eq!(body["inline"], parsed, "{context}");
                        assert_eq!(body["truncated"], false, "{context}");
                        continue;
                    }
                    "utf8" => body["inline"]
                        .as_str()
                        .expect("test input")
                        .as_bytes()
                        .to_vec(),
                    "base64" => base64_decode(body["inline"].as_str().expect("test input")),
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
        let redaction = Redaction::new(&[], &["$[*].password".to_owned(), "$[*].x.pin".to_owned()])
            .expect("test input");
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
                    Some("base64") => base64_decode(body["inline"].as_str().expect("test input")),
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
                        &serde_json::to_string(&piece.repeat(1 + (next() % 20) as usize))
                            .expect("test input"),
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

    #[test]
    fn a_json_body_is_recorded_as_sent_without_its_whitespace() {
        // Keys out of order, numbers and escapes serde_json would re-print, whitespace around
        // every token and inside strings.
        let body = "\r\n {\n  \"zeta\" : [1.0e2, -0, 0.1, 1.1099999999999999],\n\t\"alpha\": \
                    \"caf\\u00e9 \\/ a\\nb\",  \"mid\" : { } , \"list\":[ ] }\n";
        let exchange = Exchange::new(capture(body.as_bytes(), Some("application/json")), empty());
        let (bytes, record) = exchange.record(&Redaction::default(), MAXIMUM_RECORD_BYTES);
        let compact = concat!(
            r#"{"zeta":[1.0e2,-0,0.1,1.1099999999999999],"#,
            r#""alpha":"caf\u00e9 \/ a\nb","mid":{},"list":[]}"#
        );
        assert!(contains(&bytes, &format!(r#""inline":{compact},"#)));
        let request_body = &record["request"]["body"];
        assert_eq!(request_body["encoding"], "json");
        assert_eq!(request_body["truncated"], false);
        assert_eq!(
            request_body["inline"],
            serde_json::from_str::<Value>(body).expect("test input")
        );
        // Compact JSON is copied as it is.
        let exchange = Exchange::new(capture(compact.as_bytes(), None), empty());
        let (bytes, _) = exchange.record(&Redaction::default(), MAXIMUM_RECORD_BYTES);
        assert!(contains(&bytes, &format!(r#""inline":{compact},"#)));
    }

    #[test]
    fn a_json_body_is_json_exactly_when_serde_json_parses_it() {
        let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let bodies: Vec<String> = [
            // Taken by the one-pass check.
            r#"{"a":[1,-2.5e-3,1E+2,0,true,false,null,"\"\\\/\b\f\n\r\t\u00e9"]}"#,
            "[1e299]",
            "[1e-999, -0.0e-0, 1E+07, 12345678901234567890123]",
            " 42 ",
            r#""é 😀 \u2028""#,
            // Left to serde_json, which takes them.
            "[1e305]",
            "[1e0005]",
            "[0e999]",
            r#""\ud83d\ude00""#,
            // Refused.
            "[1e400]",
            "[-1e309]",
            r#""\ud800""#,
            r#""\udc00""#,
            r#""\ud83dx""#,
            "[1,]",
            r#"{"a":1,}"#,
            r#"{"a" 1}"#,
            r#"{"a":1"b":2}"#,
            "[01]",
            "[1.]",
            "[.5]",
            "[+1]",
            "[1e]",
            "[-]",
            "[NaN]",
            "\"tab\there\"",
            "\"\\x\"",
            "\"\\u12g4\"",
            "[1] [2]",
            "{'a':1}",
            "tru",
            "nul",
            "[",
            "{\"a\":[}",
            "   ",
            "\u{feff}{}",
        ]
        .iter()
        .map(|body| (*body).to_owned())
        .chain([99, 100, 101, 124, 125, 127, 128, 200].map(nested))
        .collect();
        for body in &bodies {
            // The record holds its bodies 3 levels down, and serde_json reads 127.
            let deep = body.starts_with(&"[".repeat(MAXIMUM_BODY_DEPTH + 1));
            let parses = serde_json::from_str::<Value>(body).is_ok() && !deep;
            for redaction in [Redaction::default(), path_redaction()] {
                let exchange = Exchange::new(capture(body.as_bytes(), None), empty());
                let (_, record) = exchange.record(&redaction, MAXIMUM_RECORD_BYTES);
                let encoding = &record["request"]["body"]["encoding"];
                assert_eq!(encoding == "json", parses, "{body:?}: {encoding}");
            }
        }
    }

    #[test]
    fn json_paths_redact_a_body_only_when_it_names_their_field() {
        let redaction = path_redaction();
        // No `password` nor `ssn` key: the body is kept as sent, in its order.
        let body = br#"{"z": 1, "rows": [{"id": 1}], "note": "password"}"#;
        let exchange = Exchange::new(capture(body, None), empty());
        let (bytes, _) = exchange.record(&redaction, MAXIMUM_RECORD_BYTES);
        assert!(contains(
            &bytes,
            r#""inline":{"z":1,"rows":[{"id":1}],"note":"password"}"#
        ));
        // A `password` key, even escaped: parsed, redacted, re-serialized.
        let body = br#"{"z": 1, "pass\u0077ord": "SECRET", "rows": []}"#;
        let exchange = Exchange::new(capture(body, None), empty());
        let (bytes, record) = exchange.record(&redaction, MAXIMUM_RECORD_BYTES);
        assert!(!contains(&bytes, "SECRET"));
        assert_eq!(
            record["request"]["body"]["inline"],
            json!({"z": 1, "password": REDACTED, "rows": []})
        );
    }

    /// Random JSON-like texts, valid or broken in small ways: what the one-pass check accepts,
    /// serde_json accepts, and its compact text is the same value without whitespace.
    #[test]
    fn property_the_one_pass_json_check_agrees_with_serde_json() {
        // Separated by `|`.
        const TOKENS: &str = concat!(
            "{|}|[|]|,|:| |\n\t|\"k\"|\"a b\"|\"\\\"\"|\"\\u00e9\"|\"\\ud83d\\ude00\"|",
            "\"\\ud83d\"|\"é\"|0|-1|2.5|1e3|1e400|01|true|null|fals|\"\\q\"|\"\u{1}\"|",
            "1e-999|-0.0e-0|1E+07|9e299|1e300|0e999|12345678901234567890123"
        );
        let tokens: Vec<&str> = TOKENS.split('|').collect();
        let mut state = 0x853c_49e6_748f_ea9b_u64;
        let mut next = move || {
            state = xorshift(state);
            state
        };
        let (mut accepted, mut json) = (0, 0);
        for iteration in 0..20_000 {
            let mut text = String::new();
            if next().is_multiple_of(2) {
                // A valid document, maybe broken by one token.
                let value = random_json(&mut next, 0);
                text = if next().is_multiple_of(2) {
                    serde_json::to_string_pretty(&value).expect("test input")
                } else {
                    serde_json::to_string(&value).expect("test input")
                };
                if next().is_multiple_of(3) {
                    let mut at = (next() % (text.len() as u64 + 1)) as usize;
                    while !text.is_char_boundary(at) {
                        at -= 1;
                    }
                    text.insert_str(at, tokens[(next() % tokens.len() as u64) as usize]);
                }
            } else {
                for _ in 0..next() % 12 {
                    text.push_str(tokens[(next() % tokens.len() as u64) as usize]);
                }
            }
            let parsed = serde_json::from_str::<Value>(&text);
            json += usize::from(parsed.is_ok());
            assert_eq!(
                compact_json(text.as_bytes(), &Redaction::default()).is_some(),
                parsed.is_ok(),
                "{iteration}: {text:?}"
            );
            if let Some(compact) = compact_common_json(&text) {
                accepted += 1;
                let parsed = parsed.unwrap_or_else(|error| panic!("{text:?}: {error}"));
                assert_eq!(
                    serde_json::from_str::<Value>(&compact).expect("test input"),
                    parsed
                );
                assert_eq!(compact, strip_insignificant_whitespace(&text));
                assert!(!compact.contains(['\n', '\r']), "{compact:?}");
            }
        }
        // Most valid documents take the one-pass check, and enough texts are not JSON.
        assert!(accepted > json * 3 / 4, "{accepted} of {json}");
        assert!(json < 15_000, "{json}");
    }

    /// A random JSON value: objects, arrays, strings with escapes, numbers of every form.
    fn random_json(next: &mut impl FnMut() -> u64, depth: u32) -> Value {
        const STRINGS: [&str; 7] = ["", "a", "\"q\" \\", "\u{1}\n\t", "é世😀", "\u{2028}", "/"];
        match next() % if depth > 3 { 6 } else { 8 } {
            0 => Value::Null,
            1 => Value::Bool(next().is_multiple_of(2)),
            2 => json!(next() >> (next() % 64)),
            3 => json!(-((next() % 1_000_000) as i64)),
            4 => json!(f64::from_bits(next() >> 2)),
            5 => Value::String(STRINGS[(next() % STRINGS.len() as u64) as usize].repeat(2)),
            6 => Value::Array(
                (0..next() % 5)
                    .map(|_| random_json(next, depth + 1))
                    .collect(),
            ),
            _ => Value::Object(
                (0..next() % 5)
                    .map(|index| (format!("k{index}"), random_json(next, depth + 1)))
                    .collect(),
            ),
        }
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        let mut texts: Vec<String> = (0_u32..0x80)
            .chain([0x7f, 0xe9, 0x2028, 0x1f600])
            .filter_map(char::from_u32)
            .map(|character| format!("a{character}b"))
            .collect();
        let mixed = "ab\"\\\u{1}\n\té世😀\u{1f}x/";
        for length in [0, 1, 7, 8, 9, 63, 64, 65, 127, 128, 129, 1_000] {
            texts.push("p".repeat(length));
            texts.push(format!("{}\"", "p".repeat(length)));
            texts.push(mixed.repeat(length / mixed.len() + 1));
            texts.push("\"".repeat(length));
            texts.push("\u{0}".repeat(length));
        }
        for text in &texts {
            let mut written = Vec::new();
            write_string(&mut written, text);
            assert_eq!(
                written,
                serde_json::to_vec(text).expect("test input"),
                "{text:?}"
            );
            assert_eq!(escaped_len(text) + 2, written.len(), "{text:?}");
        }
    }

    #[test]
    fn numbers_are_written_as_serde_json_writes_them() {
        for value in [
            0.0,
            -0.0,
            12.5,
            0.1 + 0.2,
            1e21,
            1e-7,
            3.0,
            f64::MAX,
            f64::MIN_POSITIVE,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ] {
            assert_eq!(
                json_float(value),
                serde_json::to_string(&value).expect("test input")
            );
        }
        for value in [0, 7, 10, 99, 100, 12_345, u64::from(u32::MAX), u64::MAX] {
            let mut written = Vec::new();
            write_u64(&mut written, value);
            assert_eq!(written, value.to_string().into_bytes());
        }
    }

    #[test]
    fn assemble_into_reuses_its_buffer() {
        let body =
            serde_json::to_vec(&json!({"features": [1, 2, 3], "id": "x"})).expect("test input");
        let exchange = Exchange::new(capture(&body, None), capture(b"{\"score\":0.5}", None));
        let input = exchange.input();
        let mut buffer = b"left over".to_vec();
        for maximum in [MAXIMUM_RECORD_BYTES, 700, 150, 1] {
            assemble_into(&input, &Redaction::default(), maximum, &mut buffer);
            assert_eq!(
                buffer,
                assemble(&input, &Redaction::default(), maximum),
                "{maximum}"
            );
        }
        assemble_into(
            &input,
            &Redaction::default(),
            MAXIMUM_RECORD_BYTES,
            &mut buffer,
        );
        let capacity = buffer.capacity();
        assemble_into(
            &input,
            &Redaction::default(),
            MAXIMUM_RECORD_BYTES,
            &mut buffer,
        );
        assert_eq!(buffer.capacity(), capacity);
    }

    #[test]
    fn a_record_that_fits_whole_is_never_cut() {
        let body = "q\"".repeat(300);
        let mut exchange = Exchange::new(capture(body.as_bytes(), None), capture(b"[1,2]", None));
        exchange.request_headers = header_map(&[("x-a", &"v".repeat(2_000))]);
        let whole = assemble(
            &exchange.input(),
            &Redaction::default(),
            MAXIMUM_RECORD_BYTES,
        );
        let (bytes, record) = exchange.record(&Redaction::default(), whole.len());
        assert_eq!(bytes, whole);
        assert_eq!(record["request"]["body"]["truncated"], false);
        // One byte less and something is cut, within the limit.
        let (bytes, record) = exchange.record(&Redaction::default(), whole.len() - 1);
        assert!(bytes.len() < whole.len());
        let request = &record["request"];
        assert!(request["body"]["truncated"] == true || request["headers_truncated"] == true);
    }
}
