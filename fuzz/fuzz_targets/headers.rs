//! Header handling: arbitrary header maps (the special names, odd case, list syntax, bytes
//! that are not ASCII) through the proxy's header rules and the record's header redaction.
//!
//! Checked: nothing panics; after `remove_hop_by_hop` no hop-by-hop field, no field named in a
//! `Connection` line and no `proxy-authorization` is left (but `connection: upgrade` and the
//! `upgrade` field when an upgrade is carried out), and every other field is untouched; the
//! forwarding headers carry the peer, and an untrusted client's chain is replaced; the
//! correlation id is a sensible header value; in a record, the values of `authorization`,
//! `cookie`, `x-api-key` (every always-redacted name, and configured ones) are `[redacted]`.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::UNIX_EPOCH;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, Version};
use libfuzzer_sys::fuzz_target;
use scoretap_core::headers::{
    accepts_trailers, correlation_id, is_upgrade_request, remove_hop_by_hop, Downstream,
    ForwardedMode, ForwardingPolicy,
};
use scoretap_core::record::{assemble, BodyCapture, RecordInput, RequestPart, ResponsePart};
use scoretap_core::redaction::{Redaction, ALWAYS_REDACTED_HEADERS, REDACTED};
use scoretap_fuzz::{arbitrary, header_map, header_name, text, Unstructured};
use serde_json::Value;

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = run(&mut u);
});

fn run(u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    let original = header_map(u, 24)?;
    hop_by_hop(&original, u.arbitrary()?);
    let version = *u.choose(&[
        Version::HTTP_09,
        Version::HTTP_10,
        Version::HTTP_11,
        Version::HTTP_2,
        Version::HTTP_3,
    ])?;
    if is_upgrade_request(version, &original) {
        assert_eq!(version, Version::HTTP_11);
        assert!(original.contains_key("upgrade"));
    }
    accepts_trailers(&original);
    correlation(&original);
    forwarding(u, &original, version)?;
    redaction(u, &original)?;
    Ok(())
}

/// The elements of every line of a comma-separated list field, from its bytes.
fn list_elements<'m>(map: &'m HeaderMap, name: &str) -> Vec<&'m [u8]> {
    map.get_all(name)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&byte| byte == b','))
        .map(|element| element.trim_ascii())
        .collect()
}

fn hop_by_hop(original: &HeaderMap, keep_upgrade: bool) {
    let mut headers = original.clone();
    remove_hop_by_hop(&mut headers, keep_upgrade);
    let upgraded = keep_upgrade && original.contains_key("upgrade");
    if upgraded {
        assert_eq!(headers["connection"], "upgrade");
        assert_eq!(headers.get("upgrade"), original.get("upgrade"));
    }
    let named: Vec<HeaderName> = list_elements(original, "connection")
        .into_iter()
        .filter_map(|element| HeaderName::from_bytes(element).ok())
        .collect();
    for name in headers.keys() {
        if upgraded && (name == "connection" || name == "upgrade") {
            continue;
        }
        assert!(
            !HOP_BY_HOP.contains(&name.as_str()),
            "hop-by-hop {name} forwarded"
        );
        assert!(
            !named.contains(name),
            "{name}, named in Connection, forwarded: {original:?}"
        );
        // Everything else crosses untouched.
        let before: Vec<&HeaderValue> = original.get_all(name).iter().collect();
        let after: Vec<&HeaderValue> = headers.get_all(name).iter().collect();
        assert_eq!(before, after, "{name} changed");
    }
    for name in original.keys() {
        let hop = HOP_BY_HOP.contains(&name.as_str()) || named.contains(name);
        assert_eq!(
            headers.contains_key(name),
            !hop || (upgraded && (name == "connection" || name == "upgrade")),
            "{name}"
        );
    }
}

fn correlation(original: &HeaderMap) {
    let id = correlation_id(original);
    assert!(!id.is_empty() && id.len() <= 200, "{id:?}");
    assert!(id.as_bytes().iter().all(u8::is_ascii_graphic), "{id:?}");
    if let Some(sent) = original.get("x-request-id") {
        if !sent.is_empty() && sent.len() <= 200 && sent.as_bytes().iter().all(u8::is_ascii_graphic)
        {
            assert_eq!(&id, sent);
        }
    }
}

fn peer(u: &mut Unstructured<'_>) -> arbitrary::Result<IpAddr> {
    Ok(match u.int_in_range(0_u8..=2)? {
        0 => IpAddr::V4(Ipv4Addr::from(u.arbitrary::<u32>()?)),
        1 => IpAddr::V6(Ipv6Addr::from(u.arbitrary::<u128>()?)),
        _ => IpAddr::V6(Ipv4Addr::from(u.arbitrary::<u32>()?).to_ipv6_mapped()),
    })
}

fn forwarding(
    u: &mut Unstructured<'_>,
    original: &HeaderMap,
    version: Version,
) -> arbitrary::Result<()> {
    let mode = *u.choose(&[
        ForwardedMode::XForwarded,
        ForwardedMode::Forwarded,
        ForwardedMode::None,
    ])?;
    let mut trusted_proxies = Vec::new();
    for _ in 0..u.int_in_range(0..=3)? {
        let net = match peer(u)? {
            IpAddr::V4(v4) => ipnet::Ipv4Net::new(v4, u.int_in_range(0..=32)?)
                .map(ipnet::IpNet::V4)
                .ok(),
            IpAddr::V6(v6) => ipnet::Ipv6Net::new(v6, u.int_in_range(0..=128)?)
                .map(ipnet::IpNet::V6)
                .ok(),
        };
        trusted_proxies.extend(net);
    }
    let via = if u.ratio(1_u8, 2)? {
        Some(text(u, 3)?)
    } else {
        None
    };
    let policy = ForwardingPolicy {
        mode,
        trusted_proxies,
        via: via.clone(),
    };
    let downstream = Downstream {
        peer: peer(u)?,
        tls: u.arbitrary()?,
    };
    let host = if u.ratio(1_u8, 2)? {
        HeaderValue::from_bytes(text(u, 3)?.as_bytes()).ok()
    } else {
        None
    };
    let trusted = {
        let peer = match downstream.peer {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(downstream.peer, IpAddr::V4),
            v4 => v4,
        };
        policy.trusted_proxies.iter().any(|net| net.contains(&peer))
    };
    let mut headers = original.clone();
    policy.apply(&mut headers, downstream, host.as_ref());
    let peer_text = downstream.peer.to_string();
    match mode {
        ForwardedMode::None => assert_eq!(headers, *original),
        ForwardedMode::XForwarded => {
            let chain = headers["x-forwarded-for"].to_str().expect("ASCII");
            if trusted {
                assert!(chain.ends_with(&peer_text), "{chain}");
            } else {
                assert_eq!(chain, peer_text, "an untrusted chain is replaced");
                let scheme = if downstream.tls { "https" } else { "http" };
                assert_eq!(headers["x-forwarded-proto"], scheme);
                assert_eq!(headers.get("x-forwarded-host"), host.as_ref());
            }
            assert!(!headers.contains_key("forwarded"));
            assert_eq!(headers.get_all("x-forwarded-for").iter().count(), 1);
        }
        ForwardedMode::Forwarded => {
            let chain = headers["forwarded"].to_str().expect("ASCII");
            let node = match downstream.peer {
                IpAddr::V4(v4) => v4.to_string(),
                IpAddr::V6(v6) => format!("\"[{v6}]\""),
            };
            let scheme = if downstream.tls { "https" } else { "http" };
            let mut element = format!("for={node};proto={scheme}");
            if let Some(host) = host.as_ref().and_then(|host| host.to_str().ok()) {
                // RFC 7239 §4: a token as it is, anything else a quoted-string.
                let token = !host.is_empty()
                    && host
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
                if token {
                    element.push_str(&format!(";host={host}"));
                } else {
                    let escaped = host.replace('\\', "\\\\").replace('"', "\\\"");
                    element.push_str(&format!(";host=\"{escaped}\""));
                }
            }
            assert!(chain.ends_with(&element), "{chain}");
            if !trusted {
                assert_eq!(chain, element, "an untrusted chain is replaced");
                for name in ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"] {
                    assert!(!headers.contains_key(name));
                }
            }
        }
    }
    policy.add_via(&mut headers, version);
    if let Some(name) = via.filter(|name| {
        name.bytes()
            .all(|byte| byte == b'\t' || (0x20..0x7f).contains(&byte))
    }) {
        let value = headers["via"].to_str().expect("ASCII");
        assert!(value.ends_with(&format!(" {name}")), "{value}");
    }
    Ok(())
}

fn redaction(u: &mut Unstructured<'_>, original: &HeaderMap) -> arbitrary::Result<()> {
    let mut extra = Vec::new();
    for _ in 0..u.int_in_range(0..=2)? {
        extra.push(header_name(u)?.as_str().to_ascii_uppercase());
    }
    let redaction = Redaction::new(&extra, &[]).unwrap_or_default();
    for name in ALWAYS_REDACTED_HEADERS {
        assert!(redaction.is_redacted_header(&HeaderName::from_static(name)));
    }
    let body = BodyCapture::default();
    let input = RecordInput {
        id: "id",
        correlation_id: "c",
        service: "s",
        started_at: UNIX_EPOCH,
        duration_ms: 1.0,
        outcome: "ok",
        error: None,
        request: RequestPart {
            method: "POST",
            path: "/",
            query: None,
            http_version: "HTTP/1.1",
            headers: original,
            body: &body,
        },
        response: Some(ResponsePart {
            status: StatusCode::OK,
            headers: original,
            body: &body,
            trailers: Some(original),
        }),
    };
    let record = assemble(
        &input,
        &redaction,
        scoretap_core::record::MAXIMUM_RECORD_BYTES,
    );
    let record: Value = serde_json::from_slice(&record).expect("a record is JSON");
    let parts = [
        &record["request"]["headers"],
        &record["response"]["headers"],
        &record["response"]["trailers"],
    ];
    for headers in parts {
        let headers = headers.as_object().expect("an object");
        for name in original.keys() {
            let Some(value) = headers.get(name.as_str()) else {
                continue;
            };
            if redaction.is_redacted_header(name) {
                assert_eq!(value, REDACTED, "{name}");
            }
        }
        for name in ["authorization", "cookie", "x-api-key"]
            .into_iter()
            .chain(extra.iter().map(String::as_str))
        {
            let lower = name.to_ascii_lowercase();
            if let Some(value) = headers.get(&lower) {
                assert_eq!(value, REDACTED, "{name}");
            }
        }
    }
    Ok(())
}
