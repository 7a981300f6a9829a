//! The `Host` grammar: what a request may name as its target host, in `Host`, in an
//! absolute-form target's authority or in HTTP/2's `:authority`.
//!
//! RFC 9110 §7.2: `Host = uri-host [ ":" port ]`, with RFC 3986 §3.2.2 and §3.2.3:
//!
//! ```text
//! uri-host    = IP-literal / IPv4address / reg-name
//! IP-literal  = "[" ( IPv6address / IPvFuture  ) "]"
//! IPvFuture   = "v" 1*HEXDIG "." 1*( unreserved / sub-delims / ":" )
//! reg-name    = *( unreserved / pct-encoded / sub-delims )
//! port        = *DIGIT
//! unreserved  = ALPHA / DIGIT / "-" / "." / "_" / "~"
//! sub-delims  = "!" / "$" / "&" / "'" / "(" / ")" / "*" / "+" / "," / ";" / "="
//! pct-encoded = "%" HEXDIG HEXDIG
//! ```
//!
//! An IPv4 address is a registered name as far as the characters go, so it needs no rule of its
//! own. Userinfo (`user@`) is not part of the grammar: RFC 9113 §8.3.1 forbids it in
//! `:authority`, and RFC 9110 §4.2.4 has recipients treat it as an error.

use std::net::Ipv6Addr;

/// Whether `value` is `uri-host [ ":" port ]`.
pub fn is_valid_host(value: &[u8]) -> bool {
    let (host, port) = match value.first() {
        Some(b'[') => match value.iter().position(|&byte| byte == b']') {
            Some(end) => {
                if !is_ip_literal(&value[1..end]) {
                    return false;
                }
                (&value[..=end], &value[end + 1..])
            }
            None => return false,
        },
        _ => match value.iter().position(|&byte| byte == b':') {
            Some(colon) => (&value[..colon], &value[colon..]),
            None => (value, &value[value.len()..]),
        },
    };
    let port_is_valid = match port.split_first() {
        None => true,
        Some((b':', digits)) => digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    };
    port_is_valid && (host.first() == Some(&b'[') || is_reg_name(host))
}

/// The inside of an IP literal: an IPv6 address or `IPvFuture`.
fn is_ip_literal(inside: &[u8]) -> bool {
    match inside.split_first() {
        Some((b'v' | b'V', rest)) => {
            let Some(dot) = rest.iter().position(|&byte| byte == b'.') else {
                return false;
            };
            let (version, address) = (&rest[..dot], &rest[dot + 1..]);
            !version.is_empty()
                && version.iter().all(u8::is_ascii_hexdigit)
                && !address.is_empty()
                && address
                    .iter()
                    .all(|&byte| is_unreserved(byte) || is_sub_delim(byte) || byte == b':')
        }
        _ => std::str::from_utf8(inside).is_ok_and(|text| text.parse::<Ipv6Addr>().is_ok()),
    }
}

fn is_reg_name(name: &[u8]) -> bool {
    let mut rest = name;
    while let Some((&byte, after)) = rest.split_first() {
        rest = match byte {
            b'%' => match after {
                [high, low, after @ ..] if high.is_ascii_hexdigit() && low.is_ascii_hexdigit() => {
                    after
                }
                _ => return false,
            },
            _ if is_unreserved(byte) || is_sub_delim(byte) => after,
            _ => return false,
        };
    }
    true
}

fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

fn is_sub_delim(byte: u8) -> bool {
    matches!(
        byte,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'='
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_of_the_grammar_are_valid() {
        for host in [
            "",
            "h",
            "h:1",
            "h:",
            "api.example.com:8443",
            "127.0.0.1",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:8080",
            "[2001:db8::7]",
            "[v1.fe80::a+en1]",
            "x;for=6.6.6.6",
            "caf%C3%A9.example",
            "a-b_c~d.e",
        ] {
            assert!(is_valid_host(host.as_bytes()), "{host:?}");
        }
    }

    #[test]
    fn anything_else_is_not() {
        for host in [
            "x\", for=6.6.6.6",
            "a b",
            "h:1x",
            "h:1:2",
            "user@h",
            "user:pass@h:80",
            "[::1",
            "[::1]x",
            "[::1]:8x",
            "[not-ipv6]",
            "[v.x]",
            "[v1.]",
            "%zz",
            "%4",
            "h\\",
            "h/",
            "h?",
            "h#",
            "caf\u{e9}",
        ] {
            assert!(!is_valid_host(host.as_bytes()), "{host:?}");
        }
    }
}
