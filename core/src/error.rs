//! Errors of the proxy path, typed by where they came from, and their mapping to HTTP answers.
//!
//! Every error a client can see is made here, in one place: the status code, the stable `kind`
//! string, and the small JSON body `{"error": kind, "message": ..., "correlation_id": ...}`.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::ResponseBody;
use crate::headers::HeadViolation;

/// Which side of the proxy an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorOrigin {
    /// The downstream client sent something the proxy must refuse.
    Client,
    /// The upstream (the scoring endpoint) failed, timed out or could not be reached.
    Upstream,
    /// The proxy itself failed.
    Proxy,
}

/// An error on a request's path through the proxy.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The client's request is malformed or not allowed (400, 405, 413, ...).
    #[error("{message}")]
    BadRequest {
        status: StatusCode,
        message: &'static str,
    },
    /// The request head, as it came on the wire, is ambiguous or too large (400 or 431,
    /// connection closed).
    #[error("{0}")]
    MalformedHead(HeadViolation),
    /// The request body is larger than the limit (413, connection closed).
    #[error("the request body is larger than the limit of {0} bytes")]
    PayloadTooLarge(u64),
    /// No connection could be made to the upstream.
    #[error("could not connect to the upstream: {0}")]
    UpstreamConnect(String),
    /// Connecting to the upstream took longer than the connect timeout.
    #[error("connecting to the upstream timed out after {0:?}")]
    UpstreamConnectTimeout(Duration),
    /// The upstream did not send response headers within the response-header timeout.
    #[error("the upstream sent no response headers within {0:?}")]
    UpstreamTimeout(Duration),
    /// The client stopped sending its request body for the body idle timeout (408, connection
    /// closed).
    #[error("{}", crate::progress::idle_message(crate::progress::Side::Client, *.0))]
    ClientIdle(Duration),
    /// The upstream stopped reading the request body for the body idle timeout (504).
    #[error("{}", crate::progress::idle_message(crate::progress::Side::Upstream, *.0))]
    UpstreamIdle(Duration),
    /// The upstream reset the connection, sent malformed HTTP, or failed mid-exchange.
    #[error("the upstream failed: {0}")]
    Upstream(String),
    /// The proxy failed for a reason of its own.
    #[error("internal proxy error: {0}")]
    Internal(String),
}

impl ProxyError {
    /// A 400 Bad Request with a fixed explanation.
    pub fn bad_request(message: &'static str) -> Self {
        ProxyError::BadRequest {
            status: StatusCode::BAD_REQUEST,
            message,
        }
    }

    /// Where the error came from.
    pub fn origin(&self) -> ErrorOrigin {
        match self {
            ProxyError::BadRequest { .. }
            | ProxyError::MalformedHead(_)
            | ProxyError::PayloadTooLarge(_)
            | ProxyError::ClientIdle(_) => ErrorOrigin::Client,
            ProxyError::UpstreamConnect(_)
            | ProxyError::UpstreamConnectTimeout(_)
            | ProxyError::UpstreamTimeout(_)
            | ProxyError::UpstreamIdle(_)
            | ProxyError::Upstream(_) => ErrorOrigin::Upstream,
            ProxyError::Internal(_) => ErrorOrigin::Proxy,
        }
    }

    /// The status code the client receives.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest { status, .. } => *status,
            ProxyError::MalformedHead(violation) => violation.status(),
            ProxyError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            // RFC 9110 §15.5.9: "The 408 (Request Timeout) status code indicates that the server
            // did not receive a complete request message within the time that it was prepared to
            // wait."
            ProxyError::ClientIdle(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::UpstreamConnect(_) | ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamConnectTimeout(_)
            | ProxyError::UpstreamTimeout(_)
            | ProxyError::UpstreamIdle(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A stable, machine-readable name for the error (the JSON body's `error`). Every request
    /// the client got wrong is a `bad_request`, whatever its status; a client too slow with its
    /// body is a `client_idle_timeout`.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::BadRequest { .. }
            | ProxyError::MalformedHead(_)
            | ProxyError::PayloadTooLarge(_) => "bad_request",
            ProxyError::UpstreamConnect(_) => "upstream_connect_failed",
            ProxyError::UpstreamConnectTimeout(_) => "upstream_connect_timeout",
            ProxyError::UpstreamTimeout(_) => "upstream_timeout",
            ProxyError::ClientIdle(_) => "client_idle_timeout",
            ProxyError::UpstreamIdle(_) => "upstream_idle_timeout",
            ProxyError::Upstream(_) => "upstream_error",
            ProxyError::Internal(_) => "proxy_error",
        }
    }

    /// The trace record's `outcome` for an exchange that ended with this error.
    pub fn outcome(&self) -> &'static str {
        match self {
            ProxyError::BadRequest { .. }
            | ProxyError::MalformedHead(_)
            | ProxyError::PayloadTooLarge(_)
            | ProxyError::Internal(_) => "proxy_error",
            ProxyError::UpstreamConnect(_) | ProxyError::Upstream(_) => "upstream_error",
            ProxyError::ClientIdle(_) => "client_cancelled",
            ProxyError::UpstreamConnectTimeout(_)
            | ProxyError::UpstreamTimeout(_)
            | ProxyError::UpstreamIdle(_) => "upstream_timeout",
        }
    }

    /// Whether the client's connection must end after this answer (HTTP/1.x): after ambiguous
    /// framing nothing that follows on the connection can be trusted (RFC 9112 §6.1, §6.3), and
    /// a body refused at the limit, or given up on, is left unread.
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            ProxyError::MalformedHead(_)
                | ProxyError::PayloadTooLarge(_)
                | ProxyError::ClientIdle(_)
        )
    }

    /// Whether the proxy should still read an unread request body for the record: not one it
    /// refused for its size, nor one whose client stopped sending it.
    pub fn reads_request_body(&self) -> bool {
        !matches!(
            self,
            ProxyError::PayloadTooLarge(_) | ProxyError::ClientIdle(_)
        )
    }

    /// The answer the client receives: the status and a small JSON body.
    pub fn to_response(&self, correlation_id: &HeaderValue) -> Response<ResponseBody> {
        let body = serde_json::json!({
            "error": self.kind(),
            "message": self.to_string(),
            "correlation_id": correlation_id.to_str().unwrap_or_default(),
        });
        let mut response = Response::new(ResponseBody::full(Bytes::from(body.to_string())));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(crate::headers::X_REQUEST_ID, correlation_id.clone());
        response
    }
}

/// Why a request body stopped on its way to the upstream.
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    /// Reading it from the client failed (the client went away, or sent malformed framing).
    #[error(transparent)]
    Client(#[from] hyper::Error),
    /// It went past the request body limit.
    #[error("the request body is larger than the limit of {0} bytes")]
    TooLarge(u64),
}

/// Walks an error's source chain looking for an I/O timeout.
pub(crate) fn is_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = current {
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        current = error.source();
    }
    false
}

/// Renders an error with its whole source chain: `outer: inner: innermost`.
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut current = error.source();
    while let Some(source) = current {
        let part = source.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        current = source.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_origin() {
        assert_eq!(
            ProxyError::UpstreamConnect("refused".into()).status(),
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(
            ProxyError::UpstreamTimeout(Duration::from_secs(1)).status(),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            ProxyError::bad_request("no host").status(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            ProxyError::bad_request("no host").origin(),
            ErrorOrigin::Client
        );
    }

    #[test]
    fn error_body_is_json_with_the_correlation_id() {
        let id = HeaderValue::from_static("abc-123");
        let response = ProxyError::UpstreamConnect("connection refused".into()).to_response(&id);
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(response.headers()[crate::headers::X_REQUEST_ID], "abc-123");
        let ResponseBody::Full { data: Some(bytes) } = response.into_body() else {
            panic!("expected a full body");
        };
        let json: serde_json::Value = serde_json::from_slice(&bytes).expect("json body");
        assert_eq!(json["error"], "upstream_connect_failed");
        assert_eq!(json["correlation_id"], "abc-123");
    }
}
