//! Input generators shared by the fuzz targets: they turn libFuzzer's bytes into strings, header
//! maps and bodies shaped like what scoretap meets (JSON with odd whitespace, escapes and nesting,
//! multibyte text cut anywhere, binary, bodies far larger than a record), so that the fuzzer
//! spends its time on the interesting cases rather than on rediscovering JSON.

use std::fmt::Write as _;

use http::{HeaderMap, HeaderName, HeaderValue};
pub use libfuzzer_sys::arbitrary::{self, Result, Unstructured};

/// Pieces strings are made of: escapes, control characters, multibyte characters, JSON syntax.
const PIECES: [&str; 24] = [
    "a", "Z9 ", "\"", "\\", "\u{1}", "\n", "\t", "\r", "\u{7f}", "é", "世", "😀", "\u{2028}", "{",
    "}", "[", "]", ":", ",", "password", "null", "0.5e-3", "\u{0}", "\\u00",
];

/// Header names the header rules and the redaction treat specially, and a few ordinary ones.
pub const HEADER_NAMES: [&str; 26] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
    "trailer",
    "authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "api-key",
    "ocp-apim-subscription-key",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
    "via",
    "x-request-id",
    "traceparent",
    "host",
    "content-type",
    "x-custom",
    "x-secret-hop",
];

/// A length, mostly small, sometimes far past a record's 64 KiB.
pub fn length(u: &mut Unstructured<'_>, small: usize) -> Result<usize> {
    Ok(match u.int_in_range(0_u8..=15)? {
        0 => u.int_in_range(small..=300_000)?,
        1 => u.int_in_range(60_000..=70_000)?,
        _ => u.int_in_range(0..=small)?,
    })
}

/// A string of dictionary pieces and characters from the input.
pub fn text(u: &mut Unstructured<'_>, most_pieces: usize) -> Result<String> {
    let count = u.int_in_range(0..=most_pieces)?;
    let mut text = String::new();
    for _ in 0..count {
        if u.ratio(1_u8, 2)? {
            text.push_str(u.choose(&PIECES)?);
        } else {
            text.push(u.arbitrary::<char>()?);
        }
    }
    Ok(text)
}

/// [`text`], repeated to a length drawn by [`length`]: short mostly, sometimes huge.
pub fn long_text(u: &mut Unstructured<'_>) -> Result<String> {
    let unit = text(u, 8)?;
    let target = length(u, 64)?;
    if unit.is_empty() || unit.len() >= target {
        return Ok(unit);
    }
    Ok(unit.repeat(target.div_ceil(unit.len())))
}

/// Bytes that make a valid header value (no control character but tab, no DEL).
fn header_value_bytes(u: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    let mut value: Vec<u8> = match u.int_in_range(0_u8..=3)? {
        0 => {
            let length = u.int_in_range(0..=64)?;
            u.bytes(length.min(u.len()))?.to_vec()
        }
        1 => {
            // A list, as `connection`, `te` or a forwarding chain carry.
            let count = u.int_in_range(0..=5)?;
            let mut list = Vec::new();
            for index in 0..count {
                if index > 0 {
                    list.extend_from_slice(u.choose(&[&b","[..], b", ", b" ,", b",,"])?);
                }
                let element: &str = u.choose(&HEADER_NAMES)?;
                match u.int_in_range(0_u8..=3)? {
                    0 => list.extend_from_slice(element.to_ascii_uppercase().as_bytes()),
                    1 => list.extend_from_slice(u.choose(&[
                        &b"trailers;q=1"[..],
                        b"close",
                        b"Upgrade",
                        b"\xc3\xa9",
                        b"\t",
                    ])?),
                    _ => list.extend_from_slice(element.as_bytes()),
                }
            }
            list
        }
        2 => long_text(u)?.into_bytes(),
        _ => text(u, 6)?.into_bytes(),
    };
    value.retain(|&byte| byte == b'\t' || (byte >= 0x20 && byte != 0x7f));
    Ok(value)
}

/// A header name: a special one, or a token from the input.
pub fn header_name(u: &mut Unstructured<'_>) -> Result<HeaderName> {
    if u.ratio(3_u8, 4)? {
        let name: &str = u.choose(&HEADER_NAMES)?;
        let name = if u.ratio(1_u8, 4)? {
            name.to_ascii_uppercase()
        } else {
            name.to_owned()
        };
        if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
            return Ok(name);
        }
    }
    let length = u.int_in_range(1..=24)?;
    let bytes = u.bytes(length.min(u.len()))?;
    Ok(HeaderName::from_bytes(bytes).unwrap_or(HeaderName::from_static("x-fuzz")))
}

/// A header map of up to `most` fields, names repeated at times.
pub fn header_map(u: &mut Unstructured<'_>, most: usize) -> Result<HeaderMap> {
    let count = u.int_in_range(0..=most)?;
    let mut map = HeaderMap::new();
    for _ in 0..count {
        let name = header_name(u)?;
        let value = header_value_bytes(u)?;
        let value = HeaderValue::from_bytes(&value).unwrap_or(HeaderValue::from_static("v"));
        map.append(name, value);
    }
    Ok(map)
}

/// A body and what is known about its shape.
#[derive(Debug, Clone, Default)]
pub struct Body {
    pub bytes: Vec<u8>,
    /// The body is an object whose top-level `password` members hold the only `SECRET`s of
    /// the body, written literally (see [`secret_json`]).
    pub has_secret: bool,
}

/// A body of any kind: bytes from the input, a repeated pattern, text, JSON (sometimes with
/// secrets), sometimes with a few bytes changed.
pub fn body(u: &mut Unstructured<'_>) -> Result<Body> {
    let mut body = Body::default();
    match u.int_in_range(0_u8..=6)? {
        0 => {
            let length = u.int_in_range(0..=4096)?;
            body.bytes = u.bytes(length.min(u.len()))?.to_vec();
        }
        1 => {
            let length = u.int_in_range(1..=64)?;
            let pattern = u.bytes(length.min(u.len()))?.to_vec();
            let target = length_of_body(u)?;
            if !pattern.is_empty() {
                body.bytes = pattern.repeat(target.div_ceil(pattern.len()));
                body.bytes.truncate(target);
            }
        }
        2 => body.bytes = long_text(u)?.into_bytes(),
        3 | 4 => {
            let mut text = String::new();
            let target = length_of_body(u)?;
            json_document(u, target, &mut text, false)?;
            body.bytes = text.into_bytes();
        }
        _ => {
            let mut text = String::new();
            let target = length_of_body(u)?;
            secret_json(u, target, &mut text)?;
            body.bytes = text.into_bytes();
            body.has_secret = true;
            return Ok(body);
        }
    }
    if !body.bytes.is_empty() && u.ratio(1_u8, 8)? {
        for _ in 0..u.int_in_range(1..=4)? {
            let index = u.choose_index(body.bytes.len())?;
            if let Some(byte) = body.bytes.get_mut(index) {
                *byte = u.arbitrary()?;
            }
        }
    }
    Ok(body)
}

/// A body's length: up to 4 KiB mostly, sometimes around or far past 64 KiB.
fn length_of_body(u: &mut Unstructured<'_>) -> Result<usize> {
    length(u, 4096)
}

/// JSON whitespace, often none.
fn whitespace(u: &mut Unstructured<'_>, out: &mut String) -> Result<()> {
    if u.ratio(1_u8, 3)? {
        out.push_str(u.choose(&[" ", "\n  ", "\t", "\r\n", "  \n\t "])?);
    }
    Ok(())
}

/// A JSON document of at least about `target` bytes (the values are repeated in a top-level
/// array or object to reach it), sometimes nested deeper than a record allows, sometimes
/// slightly invalid.
pub fn json_document(
    u: &mut Unstructured<'_>,
    target: usize,
    out: &mut String,
    secret_free: bool,
) -> Result<()> {
    whitespace(u, out)?;
    match u.int_in_range(0_u8..=9)? {
        0 => {
            // Deep nesting around the 124 levels a body may have in a record.
            let depth = u.int_in_range(90..=140)?;
            let open = if u.ratio(1_u8, 2)? { "[" } else { "{\"k\":[" };
            let close = if open == "[" { "]" } else { "]}" };
            for _ in 0..depth {
                out.push_str(open);
            }
            json_value(u, 0, out, secret_free)?;
            for _ in 0..depth {
                out.push_str(close);
            }
        }
        1 => json_value(u, 0, out, secret_free)?,
        _ => {
            let object = u.ratio(1_u8, 2)?;
            out.push(if object { '{' } else { '[' });
            let mut first = true;
            let start = out.len();
            loop {
                if !first {
                    whitespace(u, out)?;
                    out.push(',');
                }
                first = false;
                whitespace(u, out)?;
                if object {
                    json_string(u, out, secret_free)?;
                    whitespace(u, out)?;
                    out.push(':');
                    whitespace(u, out)?;
                }
                let before = out.len();
                json_value(u, 0, out, secret_free)?;
                // Repeat the last value to reach the target without drawing more input.
                if u.is_empty() && out.len() - start < target {
                    let value = out.get(before..).unwrap_or_default().to_owned();
                    let separator = if object { ",\"k\":" } else { "," };
                    while out.len() - start < target {
                        out.push_str(separator);
                        out.push_str(&value);
                    }
                }
                if out.len() - start >= target || u.ratio(1_u8, 16)? {
                    break;
                }
            }
            whitespace(u, out)?;
            out.push(if object { '}' } else { ']' });
        }
    }
    whitespace(u, out)?;
    if u.ratio(1_u8, 32)? {
        // Not quite JSON: a trailing comma, a second value, a cut.
        match u.int_in_range(0_u8..=2)? {
            0 => out.push(','),
            1 => out.push_str(" 1"),
            _ => {
                let keep = u.int_in_range(0..=out.len())?;
                let mut keep = keep.min(out.len());
                while !out.is_char_boundary(keep) {
                    keep -= 1;
                }
                out.truncate(keep);
            }
        }
    }
    Ok(())
}

/// A JSON value at `depth`.
fn json_value(
    u: &mut Unstructured<'_>,
    depth: u32,
    out: &mut String,
    secret_free: bool,
) -> Result<()> {
    let kinds = if depth >= 6 { 4 } else { 6 };
    match u.int_in_range(0..=kinds - 1)? {
        0 => out.push_str(u.choose(&["null", "true", "false"])?),
        1 => {
            let number = u.choose(&[
                "0",
                "-0",
                "1",
                "-12.5",
                "1e3",
                "2E-7",
                "123456789012345678901234567890",
                "1e299",
                "1e300",
                "1.7976931348623157e308",
                "1e309",
                "-1e400",
                "0.1e0001",
                "9007199254740993",
                "1.5e+10",
            ])?;
            out.push_str(number);
        }
        2 | 3 => json_string(u, out, secret_free)?,
        4 => {
            out.push('[');
            let count = u.int_in_range(0..=4)?;
            for index in 0..count {
                if index > 0 {
                    out.push(',');
                }
                whitespace(u, out)?;
                json_value(u, depth + 1, out, secret_free)?;
            }
            out.push(']');
        }
        _ => {
            out.push('{');
            let count = u.int_in_range(0..=4)?;
            for index in 0..count {
                if index > 0 {
                    out.push(',');
                }
                whitespace(u, out)?;
                json_string(u, out, secret_free)?;
                out.push(':');
                whitespace(u, out)?;
                json_value(u, depth + 1, out, secret_free)?;
            }
            out.push('}');
        }
    }
    Ok(())
}

/// A JSON string with escapes of every kind (and, rarely, a lone surrogate escape, which
/// serde_json refuses). With `secret_free`, it holds no `S` (so never `SECRET`), and no key
/// named `password`.
fn json_string(u: &mut Unstructured<'_>, out: &mut String, secret_free: bool) -> Result<()> {
    let mut content = text(u, 6)?;
    if secret_free {
        content = content.replace(['S', 's'], "x");
    }
    out.push('"');
    for character in content.chars() {
        match character {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '/' => out.push_str(if u.ratio(1_u8, 2)? { "\\/" } else { "/" }),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            control if (control as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", control as u32);
            }
            other if !other.is_ascii() && u.ratio(1_u8, 3)? => {
                let mut units = [0_u16; 2];
                for unit in other.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04X}");
                }
            }
            other => out.push(other),
        }
    }
    if u.ratio(1_u8, 64)? {
        out.push_str(u.choose(&["\\ud800", "\\udc00x", "\\ud83d\\ude00"])?);
    }
    out.push('"');
    Ok(())
}

/// A JSON object whose top-level `password` members (key sometimes escaped) hold `SECRET`s:
/// strings, or containers of strings. Nothing else in it has an `S`, a `password` key, or a
/// `\u` escape of an ASCII letter, so a recorded `SEC` can only come from a secret.
pub fn secret_json(u: &mut Unstructured<'_>, target: usize, out: &mut String) -> Result<()> {
    out.push('{');
    let mut first = true;
    loop {
        if !first {
            out.push(',');
        }
        first = false;
        whitespace(u, out)?;
        if u.ratio(1_u8, 3)? {
            out.push_str(u.choose(&[
                "\"password\"",
                "\"pass\\u0077ord\"",
                "\"\\u0070assword\"",
            ])?);
            whitespace(u, out)?;
            out.push(':');
            whitespace(u, out)?;
            let secret = u.choose(&[
                "\"SECRET\"",
                "\"SECRET \\\" SECRET \\\\ SECRET\"",
                "[\"SECRET\", {\"a\": \"SECRET\"}]",
                "{\"deep\": {\"password\": \"SECRET\"}, \"b\": [1, \"SECRET\"]}",
                "\"SECRET with é and 😀 and \\n\"",
            ])?;
            out.push_str(secret);
        } else {
            json_string(u, out, true)?;
            whitespace(u, out)?;
            out.push(':');
            whitespace(u, out)?;
            json_value(u, 0, out, true)?;
        }
        if out.len() >= target || (u.is_empty() && out.len() >= target / 4) || u.ratio(1_u8, 16)? {
            break;
        }
        if u.is_empty() {
            // Fill up to the target without drawing more input.
            while out.len() < target {
                out.push_str(",\"n\":[1,2,3],\"password\":\"SECRET\"");
            }
            break;
        }
    }
    whitespace(u, out)?;
    out.push('}');
    Ok(())
}

/// Lowercase hexadecimal.
pub fn hex(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(text, "{byte:02x}");
    }
    text
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}
