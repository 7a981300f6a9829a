//! Header rules of a transparent proxy: hop-by-hop removal, forwarding headers, `via`, and the
//! correlation id.

use std::borrow::Cow;
use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Version;
use ipnet::IpNet;

/// The correlation header kept from the client, or generated, and forwarded both ways.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// `keep-alive` (RFC 9112 appendix C.2.2, obsolete but still sent).
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
/// `proxy-connection`, a non-standard header some HTTP/1.0 clients send.
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The longest client-supplied correlation id kept; longer ones are replaced by a generated one.
const MAXIMUM_CORRELATION_ID_LENGTH: usize = 200;

/// Connection-specific fields that never cross the proxy.
///
/// RFC 9110 §7.6.1: "Intermediaries MUST parse a received Connection header field before a
/// message is forwarded and, for each connection-option in this field, remove any header or
/// trailer field(s) from the message with the same name as the connection-option, and then
/// remove the Connection header field itself (or replace it with the intermediary's own
/// control options for the forwarded message)." The fixed list adds the fields RFC 9110 §7.6.1
/// names as connection-specific (`proxy-connection`, `keep-alive`, `te`, `transfer-encoding`,
/// `upgrade`) and the proxy authentication fields, which belong to this hop (RFC 9110 §11.7).
///
/// `trailer` is not removed: RFC 9110 §6.6.2 makes it an end-to-end field, and an HTTP/1.1
/// recipient needs it to accept the trailer fields it announces.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::TRANSFER_ENCODING,
    header::TE,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
];

/// Removes the hop-by-hop fields of a message: the fixed list, every field named in a
/// `Connection` line, and `proxy-authorization` (credentials for this hop only).
///
/// When `keep_upgrade` is true (a protocol upgrade the proxy is carrying out end to end),
/// `connection: upgrade` and the `upgrade` field are put back after the removal.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let upgrade = if keep_upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = list_elements(headers, header::CONNECTION)
            .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(&name);
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::PROXY_AUTHORIZATION);
    if let Some(upgrade) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, upgrade);
    }
}

/// Removes the `Content-Length` of a message that also has `Transfer-Encoding`, whose body is
/// framed by the coding.
///
/// RFC 9112 §6.3: "If a message is received with both a Transfer-Encoding and a Content-Length
/// header field, the Transfer-Encoding overrides the Content-Length. ... An intermediary that
/// chooses to forward the message MUST first remove the received Content-Length field and
/// process the Transfer-Encoding (as described below) prior to forwarding the message
/// downstream." Forwarded as it came, the length would frame the body for the next recipient
/// (hyper sends a body by its `content-length` field), cutting it there.
pub fn remove_overridden_content_length(headers: &mut HeaderMap) {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
}

/// Whether the message asks for a protocol upgrade (RFC 9110 §7.8): `connection: upgrade`
/// together with an `upgrade` field, on HTTP/1.1.
pub fn is_upgrade_request(version: Version, headers: &HeaderMap) -> bool {
    version == Version::HTTP_11
        && headers.contains_key(header::UPGRADE)
        && connection_has_option(headers, "upgrade")
}

/// The elements of a comma-separated list field over all its lines, trimmed (RFC 9110 §5.6.1).
/// Lines are split as bytes: an element that is not UTF-8 is skipped, not its whole line, so
/// that one odd element (obs-text) cannot hide the others, such as the fields a `Connection`
/// line names.
fn list_elements(headers: &HeaderMap, name: HeaderName) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .into_iter()
        .flat_map(|value| value.as_bytes().split(|&byte| byte == b','))
        .filter_map(|element| std::str::from_utf8(element).ok())
        .map(str::trim)
}

/// Whether a `Connection` line of the message lists the option (case-insensitively).
fn connection_has_option(headers: &HeaderMap, option: &str) -> bool {
    list_elements(headers, header::CONNECTION).any(|token| token.eq_ignore_ascii_case(option))
}

/// Whether the client declared that it accepts trailer fields (`TE: trailers`, RFC 9110 §10.1.4).
pub fn accepts_trailers(headers: &HeaderMap) -> bool {
    list_elements(headers, header::TE).any(|element| {
        element
            .split(';')
            .next()
            .is_some_and(|name| name.trim().eq_ignore_ascii_case("trailers"))
    })
}

/// The correlation id of a request: the client's `x-request-id` when it is a sensible value,
/// otherwise the trace id of a W3C `traceparent`, otherwise a new UUID.
pub fn correlation_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(value) = headers.get(X_REQUEST_ID) {
        let length = value.len();
        if length > 0
            && length <= MAXIMUM_CORRELATION_ID_LENGTH
            && value.as_bytes().iter().all(u8::is_ascii_graphic)
        {
            return value.clone();
        }
    }
    if let Some(trace_id) = headers
        .get("traceparent")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split('-').nth(1))
        .filter(|id| id.len() == 32 && id.bytes().all(|byte| byte.is_ascii_hexdigit()))
    {
        if let Ok(value) = HeaderValue::from_str(trace_id) {
            return value;
        }
    }
    let mut buffer = uuid::Uuid::encode_buffer();
    let text = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buffer);
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// How the proxy tells the upstream who the client was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardedMode {
    /// `x-forwarded-for`, `x-forwarded-proto`, `x-forwarded-host` (the de-facto standard).
    #[default]
    XForwarded,
    /// `forwarded` (RFC 7239).
    Forwarded,
    /// Add nothing and leave any incoming forwarding headers as they are.
    None,
}

/// The forwarding-header policy.
#[derive(Debug, Clone, Default)]
pub struct ForwardingPolicy {
    pub mode: ForwardedMode,
    /// Peers whose incoming forwarding chain is believed and extended; from anyone else it is
    /// replaced.
    pub trusted_proxies: Vec<IpNet>,
    /// When set, `via: <version> <name>` is added to requests and responses (RFC 9110 §7.6.3).
    pub via: Option<String>,
}

/// What the proxy knows about the downstream connection a request arrived on.
#[derive(Debug, Clone, Copy)]
pub struct Downstream {
    pub peer: IpAddr,
    pub tls: bool,
}

/// What is wrong with a request head as it came on the wire. The connection guard finds these
/// where hyper has already resolved them by the time the request reaches the proxy (it drops
/// the `Content-Length` of a message that also has `Transfer-Encoding`, merges identical
/// `Content-Length` lines, accepts a bare LF as a line end, and bounds heads only by its read
/// buffer). The check phase refuses the request and closes the connection instead of forwarding
/// a message another server could frame differently (request smuggling).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadViolation {
    /// RFC 9112 §6.1: "A server MAY reject a request that contains both Content-Length and
    /// Transfer-Encoding or process such a request in accordance with the Transfer-Encoding
    /// alone. Regardless, the server MUST close the connection after responding to such a
    /// request to avoid the potential attacks."
    #[error("the request has both Content-Length and Transfer-Encoding")]
    ContentLengthWithTransferEncoding,
    /// RFC 9112 §6.3: "If a message is received without Transfer-Encoding and with an invalid
    /// Content-Length header field, then the message framing is invalid and the recipient MUST
    /// treat it as an unrecoverable error, unless the field value can be successfully parsed as
    /// a comma-separated list (Section 5.6.1 of \[HTTP\]), all values in the list are valid, and
    /// all values in the list are the same [...]. If this is a request message, the server MUST
    /// respond with a 400 (Bad Request) status code and then close the connection." scoretap
    /// takes the strict reading: more than one Content-Length field line is refused.
    #[error("the request has more than one Content-Length field")]
    DuplicateContentLength,
    /// RFC 9112 §2.2: "Although the line terminator for the start-line and fields is the
    /// sequence CRLF, a recipient MAY recognize a single LF as a line terminator". scoretap does
    /// not: a head with a bare LF is one that servers behind it may split differently.
    #[error("the request head has a line ending in a bare LF instead of CRLF")]
    BareLineFeed,
    /// The head is larger than `--max-header-bytes`. hyper's own bound is its read buffer,
    /// which a head can overshoot (hyper reads into the buffer's whole spare capacity); the wire
    /// shows the exact size. RFC 6585 §5: "The 431 status code indicates that the server is
    /// unwilling to process the request because its header fields are too large."
    #[error("the request head is larger than allowed")]
    HeadTooLarge,
}

impl HeadViolation {
    /// The status the client gets.
    pub fn status(self) -> http::StatusCode {
        match self {
            HeadViolation::HeadTooLarge => http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            _ => http::StatusCode::BAD_REQUEST,
        }
    }
}

impl ForwardingPolicy {
    fn trusts(&self, peer: IpAddr) -> bool {
        let peer = match peer {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(peer, IpAddr::V4),
            v4 => v4,
        };
        self.trusted_proxies.iter().any(|net| net.contains(&peer))
    }

    /// Adds the forwarding headers to a request on its way upstream.
    ///
    /// From an untrusted peer any incoming chain is dropped (a client cannot claim another
    /// address); from a trusted proxy the peer is appended to the chain it sent.
    pub fn apply(
        &self,
        headers: &mut HeaderMap,
        downstream: Downstream,
        original_host: Option<&HeaderValue>,
    ) {
        let scheme = if downstream.tls { "https" } else { "http" };
        match self.mode {
            ForwardedMode::None => {}
            ForwardedMode::XForwarded => {
                let trusted = self.trusts(downstream.peer);
                let peer = downstream.peer.to_string();
                let chain = if trusted {
                    joined_values(headers, &X_FORWARDED_FOR)
                } else {
                    None
                };
                let value = match chain {
                    Some(chain) => format!("{chain}, {peer}"),
                    None => peer,
                };
                set_text(headers, X_FORWARDED_FOR, &value);
                if !(trusted && headers.contains_key(X_FORWARDED_PROTO)) {
                    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(scheme));
                }
                if !(trusted && headers.contains_key(X_FORWARDED_HOST)) {
                    headers.remove(X_FORWARDED_HOST);
                    if let Some(host) = original_host {
                        headers.insert(X_FORWARDED_HOST, host.clone());
                    }
                }
                headers.remove(header::FORWARDED);
            }
            ForwardedMode::Forwarded => {
                let trusted = self.trusts(downstream.peer);
                let node = match downstream.peer {
                    IpAddr::V4(v4) => v4.to_string(),
                    IpAddr::V6(v6) => format!("[{v6}]"),
                };
                let mut element = format!("for={};proto={scheme}", forwarded_value(&node));
                if let Some(host) = original_host.and_then(|host| host.to_str().ok()) {
                    element.push_str(";host=");
                    element.push_str(&forwarded_value(host));
                }
                let chain = if trusted {
                    joined_values(headers, &header::FORWARDED)
                } else {
                    None
                };
                let value = match chain {
                    Some(chain) => format!("{chain}, {element}"),
                    None => element,
                };
                set_text(headers, header::FORWARDED, &value);
                if !trusted {
                    headers.remove(X_FORWARDED_FOR);
                    headers.remove(X_FORWARDED_PROTO);
                    headers.remove(X_FORWARDED_HOST);
                }
            }
        }
    }

    /// Appends this proxy to `via` when configured (RFC 9110 §7.6.3: "A proxy MUST send an
    /// appropriate Via header field ... in each message that it forwards" — optional here,
    /// because many deployments must not reveal the hop).
    pub fn add_via(&self, headers: &mut HeaderMap, received_version: Version) {
        let Some(name) = &self.via else {
            return;
        };
        let protocol = match received_version {
            Version::HTTP_09 => "0.9",
            Version::HTTP_10 => "1.0",
            Version::HTTP_2 => "2",
            Version::HTTP_3 => "3",
            _ => "1.1",
        };
        let element = format!("{protocol} {name}");
        let value = match joined_values(headers, &header::VIA) {
            Some(chain) => format!("{chain}, {element}"),
            None => element,
        };
        set_text(headers, header::VIA, &value);
    }
}

/// A `forwarded` parameter value as RFC 7239 §4 writes it: `value = token / quoted-string`. A
/// value that is not a token is a quoted-string, with `"` and `\` escaped as quoted-pairs (RFC
/// 9110 §5.6.4: "The backslash octet ("\") can be used as a single-octet quoting mechanism
/// within quoted-string"), so that no value can end its string early and add parameters or
/// elements of its own.
fn forwarded_value(value: &str) -> Cow<'_, str> {
    if !value.is_empty() && value.bytes().all(is_token_char) {
        return Cow::Borrowed(value);
    }
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('"');
    for character in value.chars() {
        if matches!(character, '"' | '\\') {
            quoted.push('\\');
        }
        quoted.push(character);
    }
    quoted.push('"');
    Cow::Owned(quoted)
}

/// `tchar` (RFC 9110 §5.6.2).
fn is_token_char(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// All lines of a field joined with `, ` (RFC 9110 §5.3), or `None` when absent.
fn joined_values(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut values = headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok());
    let first = values.next()?;
    let mut joined = first.to_owned();
    for value in values {
        joined.push_str(", ");
        joined.push_str(value);
    }
    Some(joined)
}

fn set_text(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    } else {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_static(value));
        }
        headers
    }

    #[test]
    fn removes_fixed_and_connection_named_fields() {
        let mut headers = map(&[
            ("connection", "keep-alive, X-Secret-Hop"),
            ("connection", "close"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic abc"),
            ("trailer", "grpc-status"),
            ("content-type", "application/json"),
        ]);
        remove_hop_by_hop(&mut headers, false);
        let names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, vec!["trailer", "content-type"]);
    }

    /// Found by the `headers` fuzz target: a `Connection` line with one element that is not
    /// ASCII (obs-text) used to be skipped whole, and the fields it named were forwarded.
    #[test]
    fn a_non_ascii_connection_element_hides_no_named_field() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::CONNECTION,
            HeaderValue::from_bytes(b"\xc3\xa9, X-Secret-Hop,trailer ,\xff").expect("obs-text"),
        );
        headers.append("x-secret-hop", HeaderValue::from_static("1"));
        headers.append("trailer", HeaderValue::from_static("grpc-status"));
        headers.append("content-type", HeaderValue::from_static("application/json"));
        remove_hop_by_hop(&mut headers, false);
        let names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, vec!["content-type"]);
        let mut te = HeaderMap::new();
        te.append(
            header::TE,
            HeaderValue::from_bytes(b"\xe9, trailers").expect("obs-text"),
        );
        assert!(accepts_trailers(&te));
    }

    #[test]
    fn upgrade_is_kept_when_carried_out() {
        let mut headers = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(is_upgrade_request(Version::HTTP_11, &headers));
        remove_hop_by_hop(&mut headers, true);
        assert_eq!(headers["connection"], "upgrade");
        assert_eq!(headers["upgrade"], "websocket");
    }

    #[test]
    fn trailers_acceptance_is_parsed() {
        assert!(accepts_trailers(&map(&[("te", "gzip, Trailers;q=1")])));
        assert!(!accepts_trailers(&map(&[("te", "gzip")])));
    }

    #[test]
    fn correlation_id_is_kept_or_generated() {
        let kept = correlation_id(&map(&[("x-request-id", "req-1")]));
        assert_eq!(kept, "req-1");
        let from_traceparent = correlation_id(&map(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )]));
        assert_eq!(from_traceparent, "4bf92f3577b34da6a3ce929d0e0e4736");
        let generated = correlation_id(&HeaderMap::new());
        assert_eq!(generated.len(), 36);
        let bad = correlation_id(&map(&[("x-request-id", "has space")]));
        assert_ne!(bad, "has space");
    }

    #[test]
    fn untrusted_forwarding_chain_is_replaced() {
        let policy = ForwardingPolicy::default();
        let mut headers = map(&[("x-forwarded-for", "6.6.6.6"), ("x-forwarded-host", "evil")]);
        let downstream = Downstream {
            peer: "10.0.0.7".parse().expect("ip"),
            tls: false,
        };
        policy.apply(
            &mut headers,
            downstream,
            Some(&HeaderValue::from_static("api.example")),
        );
        assert_eq!(headers["x-forwarded-for"], "10.0.0.7");
        assert_eq!(headers["x-forwarded-proto"], "http");
        assert_eq!(headers["x-forwarded-host"], "api.example");
    }

    #[test]
    fn trusted_forwarding_chain_is_extended() {
        let policy = ForwardingPolicy {
            trusted_proxies: vec!["10.0.0.0/8".parse().expect("net")],
            ..ForwardingPolicy::default()
        };
        let mut headers = map(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
        ]);
        let downstream = Downstream {
            peer: "10.0.0.7".parse().expect("ip"),
            tls: false,
        };
        policy.apply(&mut headers, downstream, None);
        assert_eq!(headers["x-forwarded-for"], "1.2.3.4, 10.0.0.7");
        assert_eq!(headers["x-forwarded-proto"], "https");
    }

    #[test]
    fn forwarded_mode_writes_rfc7239() {
        let policy = ForwardingPolicy {
            mode: ForwardedMode::Forwarded,
            via: Some("scoretap".into()),
            ..ForwardingPolicy::default()
        };
        let mut headers = map(&[("x-forwarded-for", "6.6.6.6")]);
        let downstream = Downstream {
            peer: "::1".parse().expect("ip"),
            tls: true,
        };
        policy.apply(
            &mut headers,
            downstream,
            Some(&HeaderValue::from_static("h")),
        );
        policy.add_via(&mut headers, Version::HTTP_2);
        assert_eq!(headers["forwarded"], "for=\"[::1]\";proto=https;host=h");
        assert!(!headers.contains_key("x-forwarded-for"));
        assert_eq!(headers["via"], "2 scoretap");
    }

    #[test]
    fn forwarded_values_that_are_not_tokens_are_quoted_strings() {
        assert_eq!(forwarded_value("h"), "h");
        assert_eq!(forwarded_value("10.0.0.7"), "10.0.0.7");
        assert_eq!(forwarded_value("h:1"), "\"h:1\"");
        assert_eq!(forwarded_value("[::1]:8080"), "\"[::1]:8080\"");
        assert_eq!(forwarded_value("x;for=6.6.6.6"), "\"x;for=6.6.6.6\"");
        assert_eq!(
            forwarded_value("x\", for=6.6.6.6"),
            "\"x\\\", for=6.6.6.6\""
        );
        assert_eq!(forwarded_value("a\\b"), "\"a\\\\b\"");
        assert_eq!(forwarded_value(""), "\"\"");
    }

    #[test]
    fn a_host_cannot_add_forwarded_elements() {
        let policy = ForwardingPolicy {
            mode: ForwardedMode::Forwarded,
            ..ForwardingPolicy::default()
        };
        let downstream = Downstream {
            peer: "10.0.0.7".parse().expect("ip"),
            tls: false,
        };
        let mut headers = HeaderMap::new();
        policy.apply(
            &mut headers,
            downstream,
            Some(&HeaderValue::from_static("x\", for=6.6.6.6")),
        );
        assert_eq!(
            headers["forwarded"],
            "for=10.0.0.7;proto=http;host=\"x\\\", for=6.6.6.6\""
        );
        let mut headers = HeaderMap::new();
        policy.apply(
            &mut headers,
            downstream,
            Some(&HeaderValue::from_static("h:1")),
        );
        assert_eq!(headers["forwarded"], "for=10.0.0.7;proto=http;host=\"h:1\"");
    }

    #[test]
    fn transfer_encoding_overrides_content_length() {
        let mut headers = map(&[("content-length", "5"), ("transfer-encoding", "chunked")]);
        remove_overridden_content_length(&mut headers);
        assert!(!headers.contains_key("content-length"));
        assert_eq!(headers["transfer-encoding"], "chunked");
        let mut headers = map(&[("content-length", "5")]);
        remove_overridden_content_length(&mut headers);
        assert_eq!(headers["content-length"], "5");
    }
}
