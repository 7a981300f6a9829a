//! Redaction of secrets before anything is recorded (the record format in README): header values by name,
//! query parameter values by name, and JSON body fields by path.
//!
//! Two ways to redact a JSON body:
//! - [`Redaction::redact_json`], exact, on a body that parsed as JSON: each value a configured
//!   path selects is replaced by the string `"[redacted]"`;
//! - [`Redaction::redact_text`] / [`Redaction::redact_bytes`], the conservative fallback for a
//!   body that could not be parsed (cut to a prefix, or not quite JSON): the value following any
//!   key named like the last field name of a configured path is replaced, at any depth, up to
//!   the end of the text when the value is cut. It may redact too much; it never leaves a
//!   configured field's value, or any part of it, in the text.

use std::borrow::Cow;
use std::ops::Range;

use http::HeaderName;
use serde_json::Value;

/// What every redacted value is replaced with.
pub const REDACTED: &str = "[redacted]";

/// The [`REDACTED`] marker as a JSON string, as written into a body's text.
const REDACTED_JSON_STRING: &[u8] = b"\"[redacted]\"";

/// Headers whose values are never recorded, whatever the configuration (lower case).
pub const ALWAYS_REDACTED_HEADERS: [&str; 7] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "api-key",
    "ocp-apim-subscription-key",
];

/// Query parameters whose values are never recorded, whatever the configuration: the keys and
/// tokens clients put in URLs (Azure Functions' `code`, Azure SAS `sig`, Google's `key`, OAuth's
/// `access_token`). Names compare without regard to case, after percent-decoding.
pub const ALWAYS_REDACTED_QUERY_PARAMETERS: [&str; 15] = [
    "access_token",
    "api-key",
    "api_key",
    "apikey",
    "client_secret",
    "code",
    "key",
    "password",
    "secret",
    "sig",
    "signature",
    "subscription-key",
    "subscription_key",
    "token",
    "x-api-key",
];

/// Whether a raw (percent-encoded) query parameter name is one of
/// [`ALWAYS_REDACTED_QUERY_PARAMETERS`].
fn is_redacted_query_parameter(raw_name: &str) -> bool {
    let longest = ALWAYS_REDACTED_QUERY_PARAMETERS
        .iter()
        .map(|name| name.len())
        .max()
        .unwrap_or(0);
    // An encoded name is at most three bytes per character of a decoded one.
    if raw_name.is_empty() || raw_name.len() > longest * 3 {
        return false;
    }
    let decoded = decode_form_component(raw_name);
    ALWAYS_REDACTED_QUERY_PARAMETERS
        .iter()
        .any(|name| name.as_bytes().eq_ignore_ascii_case(&decoded))
}

/// A name or value of an `application/x-www-form-urlencoded` query, decoded: `%XX` (two hex
/// digits) is that byte, `+` a space, and anything else, a malformed escape included, itself.
pub fn decode_form_component(text: &str) -> Vec<u8> {
    let mut decoded = Vec::with_capacity(text.len());
    let mut bytes = text.bytes();
    while let Some(byte) = bytes.next() {
        let byte = match byte {
            b'%' => {
                let mut pair = bytes.clone();
                match (
                    pair.next().and_then(hex_value),
                    pair.next().and_then(hex_value),
                ) {
                    (Some(high), Some(low)) => {
                        bytes = pair;
                        high << 4 | low
                    }
                    _ => byte,
                }
            }
            b'+' => b' ',
            other => other,
        };
        decoded.push(byte);
    }
    decoded
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// A redaction setting that could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedactionError {
    /// A configured header name is not a valid HTTP field name.
    #[error(
        "invalid header name {name:?} to redact: expected an HTTP field name \
         (letters, digits and !#$%&'*+-.^_`|~)"
    )]
    InvalidHeaderName {
        /// The name as configured.
        name: String,
    },
    /// A configured JSON path could not be parsed.
    #[error(
        "invalid JSON path {path:?} to redact, at byte {position}: expected {expected} \
         (paths look like $.customer.email, $.data[*].ssn, $.items[0].card or $[\"odd key\"])"
    )]
    InvalidJsonPath {
        /// The path as configured.
        path: String,
        /// Byte offset in `path` where parsing stopped.
        position: usize,
        /// What the parser expected there.
        expected: &'static str,
    },
}

/// One step of a JSON path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PathSegment {
    /// `.name` or `["name"]`: the member of an object with that exact (case-sensitive) name.
    Field(String),
    /// `[N]`: the element of an array at index N.
    Index(usize),
    /// `.*` or `[*]`: every member of an object or element of an array.
    Wildcard,
}

/// A parsed JSON path such as `$.data[*].ssn`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct JsonPath {
    segments: Vec<PathSegment>,
}

impl JsonPath {
    /// Parses `$` followed by `.name`, `.*`, `[N]`, `[*]`, `["name"]` or `['name']` segments.
    ///
    /// A path must name at least one field: the text fallback finds values by their key, so a path
    /// made only of indexes and wildcards (`$[0]`) could not be honoured in a cut body.
    fn parse(path: &str) -> Result<Self, RedactionError> {
        let error = |position: usize, expected: &'static str| RedactionError::InvalidJsonPath {
            path: path.to_owned(),
            position,
            expected,
        };
        let bytes = path.as_bytes();
        if bytes.first() != Some(&b'$') {
            return Err(error(0, "`$` at the start"));
        }
        let mut segments = Vec::new();
        let mut position = 1;
        while let Some(&byte) = bytes.get(position) {
            match byte {
                b'.' => {
                    position += 1;
                    if bytes.get(position) == Some(&b'*') {
                        segments.push(PathSegment::Wildcard);
                        position += 1;
                        continue;
                    }
                    let start = position;
                    while bytes.get(position).is_some_and(|&b| is_bare_field_byte(b)) {
                        position += 1;
                    }
                    let name = path
                        .get(start..position)
                        .filter(|name| !name.is_empty())
                        .ok_or_else(|| error(start, "a field name or `*` after `.`"))?;
                    segments.push(PathSegment::Field(name.to_owned()));
                }
                b'[' => {
                    position += 1;
                    match bytes.get(position) {
                        Some(b'*') => {
                            segments.push(PathSegment::Wildcard);
                            position += 1;
                        }
                        Some(&quote @ (b'"' | b'\'')) => {
                            let start = position + 1;
                            let length = bytes
                                .get(start..)
                                .and_then(|rest| rest.iter().position(|&b| b == quote))
                                .ok_or_else(|| error(position, "a closing quote"))?;
                            let name = path
                                .get(start..start + length)
                                .ok_or_else(|| error(start, "a quoted field name"))?;
                            segments.push(PathSegment::Field(name.to_owned()));
                            position = start + length + 1;
                        }
                        Some(b'0'..=b'9') => {
                            let start = position;
                            while bytes.get(position).is_some_and(u8::is_ascii_digit) {
                                position += 1;
                            }
                            let index = path
                                .get(start..position)
                                .and_then(|digits| digits.parse::<usize>().ok())
                                .ok_or_else(|| error(start, "an array index that fits in usize"))?;
                            segments.push(PathSegment::Index(index));
                        }
                        _ => {
                            return Err(error(
                                position,
                                "`*`, an array index or a quoted field name after `[`",
                            ))
                        }
                    }
                    if bytes.get(position) != Some(&b']') {
                        return Err(error(position, "`]`"));
                    }
                    position += 1;
                }
                _ => return Err(error(position, "`.` or `[`")),
            }
        }
        if !segments
            .iter()
            .any(|segment| matches!(segment, PathSegment::Field(_)))
        {
            return Err(error(
                position,
                "at least one field name (a path of only indexes and wildcards cannot be \
                 redacted in a cut body)",
            ));
        }
        Ok(Self { segments })
    }

    /// The last field name of the path: every value the path selects lies inside the value of a
    /// key with this name, which is what the text fallback redacts.
    fn last_field_name(&self) -> Option<&str> {
        self.segments
            .iter()
            .rev()
            .find_map(|segment| match segment {
                PathSegment::Field(name) => Some(name.as_str()),
                _ => None,
            })
    }
}

/// Bytes allowed in an unquoted field name after `.`.
fn is_bare_field_byte(byte: u8) -> bool {
    !matches!(byte, b'.' | b'[' | b']' | b'\'' | b'"')
        && !byte.is_ascii_whitespace()
        && byte >= 0x20
}

/// Replaces every value that `segments` selects under `value` by [`REDACTED`].
fn redact_path(value: &mut Value, segments: &[PathSegment]) {
    let Some((segment, rest)) = segments.split_first() else {
        *value = Value::String(REDACTED.to_owned());
        return;
    };
    match (segment, value) {
        (PathSegment::Field(name), Value::Object(members)) => {
            if let Some(member) = members.get_mut(name) {
                redact_path(member, rest);
            }
        }
        (PathSegment::Index(index), Value::Array(elements)) => {
            if let Some(element) = elements.get_mut(*index) {
                redact_path(element, rest);
            }
        }
        (PathSegment::Wildcard, Value::Object(members)) => {
            for member in members.values_mut() {
                redact_path(member, rest);
            }
        }
        (PathSegment::Wildcard, Value::Array(elements)) => {
            for element in elements {
                redact_path(element, rest);
            }
        }
        _ => {}
    }
}

/// What is never recorded: header values by name and JSON body fields by path.
///
/// `Redaction::default()` redacts the [`ALWAYS_REDACTED_HEADERS`] and no body field.
#[derive(Debug, Clone, Default)]
pub struct Redaction {
    /// Configured header names, on top of [`ALWAYS_REDACTED_HEADERS`].
    extra_headers: Vec<HeaderName>,
    /// Configured JSON paths, for [`Redaction::redact_json`].
    json_paths: Vec<JsonPath>,
    /// The distinct last field names of `json_paths`, for the text fallback.
    text_field_names: Vec<String>,
}

impl Redaction {
    /// Builds the redaction from configured extra header names (any case) and JSON paths.
    pub fn new(extra_headers: &[String], json_paths: &[String]) -> Result<Self, RedactionError> {
        let mut redaction = Self::default();
        for name in extra_headers {
            let header = HeaderName::from_bytes(name.trim().as_bytes())
                .map_err(|_| RedactionError::InvalidHeaderName { name: name.clone() })?;
            if !redaction.extra_headers.contains(&header) {
                redaction.extra_headers.push(header);
            }
        }
        for path in json_paths {
            let parsed = JsonPath::parse(path.trim())?;
            if let Some(name) = parsed.last_field_name() {
                if !redaction.text_field_names.iter().any(|known| known == name) {
                    redaction.text_field_names.push(name.to_owned());
                }
            }
            redaction.json_paths.push(parsed);
        }
        Ok(redaction)
    }

    /// Whether the values of this header (or trailer) are replaced by [`REDACTED`].
    pub fn is_redacted_header(&self, name: &HeaderName) -> bool {
        ALWAYS_REDACTED_HEADERS.contains(&name.as_str()) || self.extra_headers.contains(name)
    }

    /// The query with the value of every [`ALWAYS_REDACTED_QUERY_PARAMETERS`] parameter
    /// replaced by [`REDACTED`]; borrowed unchanged when there is none.
    pub fn redact_query<'q>(&self, query: &'q str) -> Cow<'q, str> {
        let parameter_name = |pair: &'q str| pair.split_once('=').map_or(pair, |(name, _)| name);
        if !query
            .split('&')
            .any(|pair| is_redacted_query_parameter(parameter_name(pair)))
        {
            return Cow::Borrowed(query);
        }
        let mut redacted = String::with_capacity(query.len());
        for (index, pair) in query.split('&').enumerate() {
            if index > 0 {
                redacted.push('&');
            }
            let name = parameter_name(pair);
            if is_redacted_query_parameter(name) {
                redacted.push_str(name);
                redacted.push('=');
                redacted.push_str(REDACTED);
            } else {
                redacted.push_str(pair);
            }
        }
        Cow::Owned(redacted)
    }

    /// Whether any JSON path is configured (without one, bodies are never changed).
    pub fn has_json_paths(&self) -> bool {
        !self.json_paths.is_empty()
    }

    /// Whether `text` has a key named like the last field name of a configured path. A JSON
    /// text without one is left unchanged by [`Redaction::redact_json`]: every value a path
    /// selects is, or lies inside, the value of such a key.
    pub fn mentions_configured_field(&self, text: &[u8]) -> bool {
        !self.text_field_names.is_empty() && !self.sensitive_value_ranges(text).is_empty()
    }

    /// Replaces each value a configured path selects by the string `"[redacted]"`.
    pub fn redact_json(&self, value: &mut Value) {
        for path in &self.json_paths {
            redact_path(value, &path.segments);
        }
    }

    /// The fallback for a JSON body that could not be parsed (see the module documentation).
    ///
    /// Returns the text unchanged (borrowed) when nothing had to be redacted.
    pub fn redact_text<'t>(&self, text: &'t str) -> Cow<'t, str> {
        match self.redact_bytes(text.as_bytes()) {
            Cow::Borrowed(_) => Cow::Borrowed(text),
            // Replacements start at an ASCII byte and end at an ASCII byte or the end of the
            // text, so the result is UTF-8 whenever the text was; the lossy branch is never taken.
            Cow::Owned(bytes) => Cow::Owned(
                String::from_utf8(bytes)
                    .unwrap_or_else(|error| String::from_utf8_lossy(error.as_bytes()).into_owned()),
            ),
        }
    }

    /// [`Redaction::redact_text`] on bytes that need not be UTF-8 (JSON's structure is ASCII).
    pub fn redact_bytes<'t>(&self, text: &'t [u8]) -> Cow<'t, [u8]> {
        if self.text_field_names.is_empty() {
            return Cow::Borrowed(text);
        }
        let ranges = self.sensitive_value_ranges(text);
        if ranges.is_empty() {
            return Cow::Borrowed(text);
        }
        let mut redacted = Vec::with_capacity(text.len());
        let mut copied_up_to = 0;
        for range in ranges {
            redacted.extend_from_slice(text.get(copied_up_to..range.start).unwrap_or_default());
            redacted.extend_from_slice(REDACTED_JSON_STRING);
            copied_up_to = range.end;
        }
        redacted.extend_from_slice(text.get(copied_up_to..).unwrap_or_default());
        Cow::Owned(redacted)
    }

    /// The byte ranges of the values that follow a key named like a configured field, in order
    /// and disjoint. One pass over the text.
    fn sensitive_value_ranges(&self, text: &[u8]) -> Vec<Range<usize>> {
        let mut ranges = Vec::new();
        let mut position = 0;
        while position < text.len() {
            if text.get(position) != Some(&b'"') {
                position += 1;
                continue;
            }
            let Some(string_end) = end_of_string(text, position) else {
                // A string cut by the end of the text: a key with no value yet, or a value that
                // is not a configured field's (those are consumed with their key below).
                break;
            };
            let content = text.get(position + 1..string_end - 1).unwrap_or_default();
            position = string_end;
            // A key is followed by `:`; checked first, as it is cheaper than comparing names.
            let colon = skip_whitespace(text, string_end);
            if text.get(colon) != Some(&b':') || !self.is_configured_field(content) {
                continue;
            }
            let value_start = skip_whitespace(text, colon + 1);
            if value_start >= text.len() {
                break;
            }
            let value_end = end_of_value(text, value_start);
            ranges.push(value_start..value_end);
            position = value_end;
        }
        ranges
    }

    /// Whether a key's raw (still escaped) content names a configured field.
    fn is_configured_field(&self, raw_key: &[u8]) -> bool {
        if raw_key.contains(&b'\\') {
            let key = unescape_json_string(raw_key);
            self.text_field_names.contains(&key)
        } else {
            self.text_field_names
                .iter()
                .any(|name| name.as_bytes() == raw_key)
        }
    }
}

/// The index just past the closing quote of the string opening at `start`, or `None` when the
/// text ends first.
fn end_of_string(text: &[u8], start: usize) -> Option<usize> {
    let mut position = start + 1;
    while let Some(&byte) = text.get(position) {
        match byte {
            b'\\' => position += 2,
            b'"' => return Some(position + 1),
            _ => position += 1,
        }
    }
    None
}

/// The first index at or after `position` that is not JSON whitespace.
fn skip_whitespace(text: &[u8], mut position: usize) -> usize {
    while text
        .get(position)
        .is_some_and(|byte| matches!(byte, b' ' | b'\t' | b'\n' | b'\r'))
    {
        position += 1;
    }
    position
}

/// The index just past the value starting at `start` (a string, an object or array with all it
/// holds, or a scalar token), or the end of the text when the value is cut.
fn end_of_value(text: &[u8], start: usize) -> usize {
    match text.get(start) {
        Some(b'"') => end_of_string(text, start).unwrap_or(text.len()),
        Some(b'{' | b'[') => {
            let mut depth = 0_usize;
            let mut position = start;
            while let Some(&byte) = text.get(position) {
                match byte {
                    b'"' => match end_of_string(text, position) {
                        Some(end) => {
                            position = end;
                            continue;
                        }
                        None => return text.len(),
                    },
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.saturating_sub(1);
                        if depth == 0 {
                            return position + 1;
                        }
                    }
                    _ => {}
                }
                position += 1;
            }
            text.len()
        }
        _ => {
            let mut position = start;
            while text.get(position).is_some_and(|byte| {
                !matches!(byte, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
            }) {
                position += 1;
            }
            position
        }
    }
}

/// Decodes the content of a JSON string (`\n`, `\"`, `\uXXXX` with surrogate pairs...).
/// Malformed escapes are kept as written and invalid UTF-8 is replaced: it only has to compare
/// equal to a field name when the JSON names that field.
fn unescape_json_string(raw: &[u8]) -> String {
    let mut units: Vec<u16> = Vec::with_capacity(raw.len());
    let mut position = 0;
    while position < raw.len() {
        let literal_end = raw
            .get(position..)
            .and_then(|rest| rest.iter().position(|&b| b == b'\\'))
            .map_or(raw.len(), |offset| position + offset);
        let literal = raw.get(position..literal_end).unwrap_or_default();
        units.extend(String::from_utf8_lossy(literal).encode_utf16());
        position = literal_end;
        if position >= raw.len() {
            break;
        }
        let escaped = raw.get(position + 1).copied();
        let simple = match escaped {
            Some(b'"') => Some(b'"'),
            Some(b'\\') => Some(b'\\'),
            Some(b'/') => Some(b'/'),
            Some(b'b') => Some(0x08),
            Some(b'f') => Some(0x0c),
            Some(b'n') => Some(b'\n'),
            Some(b'r') => Some(b'\r'),
            Some(b't') => Some(b'\t'),
            _ => None,
        };
        if let Some(byte) = simple {
            units.push(u16::from(byte));
            position += 2;
            continue;
        }
        let code_unit = raw
            .get(position + 2..position + 6)
            .filter(|_| escaped == Some(b'u'))
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u16::from_str_radix(hex, 16).ok());
        match code_unit {
            Some(unit) => {
                units.push(unit);
                position += 6;
            }
            None => {
                units.push(u16::from(b'\\'));
                position += 1;
            }
        }
    }
    String::from_utf16_lossy(&units)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn query_secrets_are_redacted_by_name_in_any_case_or_encoding() {
        let redaction = Redaction::default();
        assert!(matches!(
            redaction.redact_query("t=1&model=a&keyword=x"),
            Cow::Borrowed("t=1&model=a&keyword=x")
        ));
        assert_eq!(
            redaction.redact_query("code=abc&t=1&API_KEY=x&sig=a%2Fb&Access%5Ftoken=y&key"),
            "code=[redacted]&t=1&API_KEY=[redacted]&sig=[redacted]&Access%5Ftoken=[redacted]&key=[redacted]"
        );
        assert_eq!(
            redaction.redact_query("token=a=b&&x"),
            "token=[redacted]&&x"
        );
        assert_eq!(redaction.redact_query("%zzkey=1&%"), "%zzkey=1&%");
    }

    fn redaction(paths: &[&str]) -> Redaction {
        let paths: Vec<String> = paths.iter().map(|path| (*path).to_owned()).collect();
        Redaction::new(&[], &paths).expect("test input")
    }

    #[test]
    fn always_redacted_headers_need_no_configuration() {
        let redaction = Redaction::default();
        for name in ALWAYS_REDACTED_HEADERS {
            assert!(
                redaction.is_redacted_header(&HeaderName::from_static(name)),
                "{name}"
            );
        }
        assert!(!redaction.is_redacted_header(&http::header::CONTENT_TYPE));
    }

    #[test]
    fn extra_headers_are_case_insensitive() {
        let redaction = Redaction::new(
            &["X-Customer-Token".to_owned(), " x-other ".to_owned()],
            &[],
        )
        .expect("test input");
        assert!(redaction.is_redacted_header(&HeaderName::from_static("x-customer-token")));
        assert!(redaction.is_redacted_header(&HeaderName::from_static("x-other")));
        assert!(redaction.is_redacted_header(&HeaderName::from_static("cookie")));
        assert!(!redaction.is_redacted_header(&HeaderName::from_static("x-customer")));
    }

    #[test]
    fn invalid_header_name_is_an_error() {
        let error = Redaction::new(&["bad header".to_owned()], &[]).expect_err("test input");
        assert_eq!(
            error,
            RedactionError::InvalidHeaderName {
                name: "bad header".to_owned()
            }
        );
        assert!(error.to_string().contains("\"bad header\""));
    }

    #[test]
    fn paths_parse() {
        let parse = |path: &str| JsonPath::parse(path).expect("test input").segments;
        use PathSegment::*;
        let field = |name: &str| Field(name.to_owned());
        assert_eq!(parse("$.password"), vec![field("password")]);
        assert_eq!(
            parse("$.customer.email"),
            vec![field("customer"), field("email")]
        );
        assert_eq!(
            parse("$.data[*].ssn"),
            vec![field("data"), Wildcard, field("ssn")]
        );
        assert_eq!(
            parse("$.items[0].card"),
            vec![field("items"), Index(0), field("card")]
        );
        assert_eq!(
            parse("$[\"odd key.x\"].*['y']"),
            vec![field("odd key.x"), Wildcard, field("y")]
        );
        assert_eq!(parse("$[12].a-b_c"), vec![Index(12), field("a-b_c")]);
    }

    #[test]
    fn bad_paths_say_what_is_expected() {
        let cases = [
            ("password", 0, "`$` at the start"),
            ("$", 1, "at least one field name"),
            ("$[0]", 4, "at least one field name"),
            ("$.", 2, "a field name or `*` after `.`"),
            ("$.a..b", 4, "a field name"),
            ("$.a[", 4, "`*`, an array index"),
            ("$.a[x]", 4, "`*`, an array index"),
            ("$.a[0", 5, "`]`"),
            ("$.a[\"b]", 4, "a closing quote"),
            ("$.a b", 3, "`.` or `[`"),
            (
                "$.a[99999999999999999999999]",
                4,
                "an array index that fits",
            ),
        ];
        for (path, expected_position, expected_text) in cases {
            match JsonPath::parse(path) {
                Err(RedactionError::InvalidJsonPath {
                    path: reported,
                    position,
                    expected,
                }) => {
                    assert_eq!(reported, path);
                    assert_eq!(position, expected_position, "{path}");
                    assert!(expected.starts_with(expected_text), "{path}: {expected}");
                }
                other => panic!("{path}: {other:?}"),
            }
        }
        let message = Redaction::new(&[], &["$.a[".to_owned()])
            .expect_err("test input")
            .to_string();
        assert!(
            message.contains("\"$.a[\"") && message.contains("expected"),
            "{message}"
        );
    }

    #[test]
    fn redact_json_replaces_selected_values() {
        let redaction = redaction(&[
            "$.customer.email",
            "$.data[*].ssn",
            "$.items[0].card",
            "$.password",
            "$.missing.field",
        ]);
        let mut value = json!({
            "customer": {"email": "a@b.c", "name": "Ada"},
            "data": [{"ssn": "123-45-6789", "x": 1}, {"ssn": {"nested": true}}, 7],
            "items": [{"card": 4111}, {"card": 5500}],
            "password": ["p", "w"],
            "email": "top-level stays",
        });
        redaction.redact_json(&mut value);
        assert_eq!(
            value,
            json!({
                "customer": {"email": "[redacted]", "name": "Ada"},
                "data": [{"ssn": "[redacted]", "x": 1}, {"ssn": "[redacted]"}, 7],
                "items": [{"card": "[redacted]"}, {"card": 5500}],
                "password": "[redacted]",
                "email": "top-level stays",
            })
        );
    }

    #[test]
    fn redact_json_wildcard_on_objects() {
        let redaction = redaction(&["$.secrets.*"]);
        let mut value = json!({"secrets": {"a": 1, "b": [2]}, "other": 3});
        redaction.redact_json(&mut value);
        assert_eq!(
            value,
            json!({"secrets": {"a": "[redacted]", "b": "[redacted]"}, "other": 3})
        );
    }

    #[test]
    fn redact_text_replaces_scalars_and_containers() {
        let redaction = redaction(&[
            "$.customer.email",
            "$.pin",
            "$.flag",
            "$.data[*].ssn",
            "$.card",
        ]);
        let text = r#"{"customer": {"email" : "a\"b@c.d", "name":"Ada"}, "pin":1234,"flag": true,
            "data":[{"ssn":null},{"ssn": [1, "]", {"x": "}"}]}], "card": {"n": "4111"}, "keep": "email"}"#;
        let redacted = redaction.redact_text(text);
        assert_eq!(
            redacted,
            r#"{"customer": {"email" : "[redacted]", "name":"Ada"}, "pin":"[redacted]","flag": "[redacted]",
            "data":[{"ssn":"[redacted]"},{"ssn": "[redacted]"}], "card": "[redacted]", "keep": "email"}"#
        );
        // The result is still JSON.
        serde_json::from_str::<Value>(&redacted).expect("test input");
    }

    #[test]
    fn redact_text_leaves_unrelated_text_borrowed() {
        let redaction = redaction(&["$.password"]);
        let text = r#"{"user": "password", "list": ["password"], "n": 1}"#;
        assert!(matches!(redaction.redact_text(text), Cow::Borrowed(_)));
        assert!(matches!(
            Redaction::default().redact_text(r#"{"password": "x"}"#),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn redact_text_over_redacts_same_named_keys_at_any_depth() {
        let redaction = redaction(&["$.customer.email"]);
        let redacted = redaction.redact_text(r#"{"email": "top", "customer": {"email": "deep"}}"#);
        assert_eq!(
            redacted,
            r#"{"email": "[redacted]", "customer": {"email": "[redacted]"}}"#
        );
    }

    #[test]
    fn redact_text_matches_escaped_keys() {
        let redaction = redaction(&["$.password"]);
        let redacted = redaction.redact_text(r#"{"pass\u0077ord": "hunter2", "x\"y": 1}"#);
        assert_eq!(redacted, r#"{"pass\u0077ord": "[redacted]", "x\"y": 1}"#);
        assert_eq!(
            unescape_json_string(br#"a\"\\\/\b\f\n\r\t\u00e9\ud83d\ude00\q"#),
            "a\"\\/\u{8}\u{c}\n\r\té😀\\q"
        );
    }

    #[test]
    fn a_secret_split_by_the_cut_never_leaks() {
        let redaction = redaction(&["$.token", "$.pin", "$.card"]);
        let whole = r#"{"a": 1, "token": "sk-very-secret-value\"with-quote", "pin": 98765, "card": {"number": "4111111111111111"}}"#;
        // Every prefix of the body, cut anywhere, even inside an escape or a number.
        for cut in 0..=whole.len() {
            let prefix = &whole[..cut];
            let redacted = redaction.redact_text(prefix);
            for secret in ["sk-very", "secret-value", "with-quote", "9876", "4111"] {
                // A part of a secret may only remain when the prefix has not reached its key.
                assert!(
                    !redacted.contains(secret),
                    "cut at {cut}: {prefix:?} -> {redacted:?}"
                );
            }
        }
        assert_eq!(
            redaction.redact_text(r#"{"a": 1, "token": "sk-very-sec"#),
            r#"{"a": 1, "token": "[redacted]""#
        );
        assert_eq!(
            redaction.redact_text(r#"{"pin": 987"#),
            r#"{"pin": "[redacted]""#
        );
        assert_eq!(
            redaction.redact_text(r#"{"card": {"number": "41"#),
            r#"{"card": "[redacted]""#
        );
        assert_eq!(redaction.redact_text(r#"{"token":  "#), r#"{"token":  "#);
        assert_eq!(
            redaction.redact_text(r#"{"token": "abc\"#),
            r#"{"token": "[redacted]""#
        );
    }

    #[test]
    fn redact_bytes_works_on_non_utf8() {
        let redaction = redaction(&["$.token"]);
        let text = b"{\"x\": \"\xff\xfe\", \"token\": \"s\xffecret\"}";
        let redacted = redaction.redact_bytes(text);
        assert_eq!(
            &*redacted,
            b"{\"x\": \"\xff\xfe\", \"token\": \"[redacted]\"}"
        );
    }

    #[test]
    fn json_without_a_configured_field_name_is_left_unchanged_by_paths() {
        let redaction = redaction(&[
            "$.customer.email",
            "$.data[*].ssn",
            "$.*.pin",
            "$['odd key'][0]",
        ]);
        let mentioned = [
            r#"{"customer": {"email": 1}}"#,
            r#"{"x": [{"ssn": 2}]}"#,
            r#"[{"odd key": 3}]"#,
            r#"{"p\u0069n": 1}"#,
        ];
        for text in mentioned {
            assert!(
                redaction.mentions_configured_field(text.as_bytes()),
                "{text}"
            );
        }
        assert!(!Redaction::default().mentions_configured_field(br#"{"pin": 1}"#));
        // Every document built from these keys that names no configured field keeps its values.
        let keys = ["customer", "email", "data", "ssn", "odd key", "pin", "x"];
        let mut state = 0x5851_f42d_4c95_7f2d_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut unmentioned = 0;
        for _ in 0..2_000 {
            let mut value = json!("email");
            for _ in 0..next() % 6 {
                let key = keys[(next() % keys.len() as u64) as usize];
                value = match next() % 3 {
                    0 => json!([value, 1]),
                    1 => json!({ key: value }),
                    _ => json!({ key: value, "x": [key] }),
                };
            }
            let text = serde_json::to_string(&value).expect("test input");
            if !redaction.mentions_configured_field(text.as_bytes()) {
                unmentioned += 1;
                let mut redacted = value.clone();
                redaction.redact_json(&mut redacted);
                assert_eq!(redacted, value, "{text}");
            }
        }
        assert!(unmentioned > 100, "{unmentioned}");
    }
}
