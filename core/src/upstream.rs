//! The upstream client: one scoring endpoint, reached over HTTP/1.1 or HTTP/2, plain or TLS,
//! through a pool of kept-alive connections, at most `--upstream-max-connections` of them open
//! at once ([`connection_limit`]).

mod connection_limit;

use std::path::PathBuf;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use self::connection_limit::LimitedConnector;
use crate::error::{error_chain, is_timeout, ProxyError};
use crate::metrics::UpstreamConnectionMetrics;
use crate::tls::{upstream_client_config, TlsError};

/// The body type sent upstream: the client's body, cut at the body limit, forwarded as it
/// arrives through the tee, and handed back to the proxy if the upstream never reads it.
pub type UpstreamRequestBody =
    crate::returnable::ReturnableBody<crate::tee::TeeBody<crate::proxy::LimitedBody<Incoming>>>;

/// The HTTP version spoken to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 (the default; what scoring servers such as gunicorn speak).
    #[default]
    Http1,
    /// HTTP/2: prior knowledge on `http://`, ALPN `h2` on `https://` (gRPC needs it).
    Http2,
}

/// How to reach the upstream.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// `http://` or `https://` base URL; a path in it is prepended to every request path.
    pub url: Uri,
    pub protocol: UpstreamProtocol,
    /// An extra PEM CA bundle trusted besides the system's roots.
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// How long to wait for the upstream's response headers.
    pub response_header_timeout: Duration,
    /// Idle pooled connections are closed after this long (keep it below the upstream's own
    /// keep-alive timeout, so the proxy never reuses a connection the upstream is closing).
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    /// Upstream connections open at once (idle, busy or upgraded); past it a request waits for
    /// one, within `connect_timeout`.
    pub max_connections: usize,
}

/// The default `max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// Errors building the upstream client.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("the upstream URL {0} must start with http:// or https:// and name a host")]
    InvalidUrl(String),
    #[error("upstream TLS: {0}")]
    Tls(#[from] TlsError),
}

/// A connector that always dials the configured upstream, whatever authority a request's URI
/// names. The URI's authority only becomes `:authority`/`host` and the pool key, so a client's
/// `Host` can be forwarded (`--preserve-host`) without ever choosing where the proxy connects.
#[derive(Debug, Clone)]
struct FixedTarget<C> {
    inner: C,
    target: Uri,
}

impl<C: tower_service::Service<Uri>> tower_service::Service<Uri> for FixedTarget<C> {
    type Response = C::Response;
    type Error = C::Error;
    type Future = C::Future;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, _requested: Uri) -> Self::Future {
        self.inner.call(self.target.clone())
    }
}

type Connector = FixedTarget<HttpsConnector<LimitedConnector<HttpConnector>>>;

/// The most an upstream HTTP/1.1 connection buffers, each way (hyper's minimum is 8 KiB): the
/// request body frames queued for writing, and the response head (nginx's `proxy_buffer_size`
/// refuses upstream heads past 4 or 8 KiB by default; 16 KiB is more generous).
const UPSTREAM_BUFFER_BYTES: usize = 16 * 1024;

/// The upstream endpoint and its connection pool.
#[derive(Debug, Clone)]
pub struct Upstream {
    client: Client<Connector, UpstreamRequestBody>,
    scheme: Scheme,
    authority: Authority,
    /// The base URL's path without its trailing `/` (empty for none).
    path_prefix: String,
    /// `host` for HTTP/1.1 requests: the upstream's authority.
    host_header: HeaderValue,
    protocol: UpstreamProtocol,
    response_header_timeout: Duration,
    connect_timeout: Duration,
}

impl Upstream {
    pub fn new(
        settings: &UpstreamSettings,
        metrics: UpstreamConnectionMetrics,
    ) -> Result<Self, UpstreamError> {
        let invalid = || UpstreamError::InvalidUrl(settings.url.to_string());
        let scheme = settings.url.scheme().cloned().ok_or_else(invalid)?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(invalid());
        }
        let authority = settings.url.authority().cloned().ok_or_else(invalid)?;
        let path_prefix = settings.url.path().trim_end_matches('/').to_owned();
        let host_header = HeaderValue::from_str(authority.as_str()).map_err(|_| invalid())?;

        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(settings.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        // The cap is taken before dialing, under TLS: the wait and the TCP connect share the
        // connect timeout.
        let http = LimitedConnector::new(
            http,
            settings.max_connections,
            settings.connect_timeout,
            metrics,
        );
        let tls = upstream_client_config(settings.ca_file.as_deref())?;
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http();
        let connector = FixedTarget {
            inner: match settings.protocol {
                UpstreamProtocol::Http1 => builder.enable_http1().wrap_connector(http),
                UpstreamProtocol::Http2 => builder.enable_http2().wrap_connector(http),
            },
            target: Uri::from_parts({
                let mut parts = http::uri::Parts::default();
                parts.scheme = Some(scheme.clone());
                parts.authority = Some(authority.clone());
                parts.path_and_query = Some(PathAndQuery::from_static("/"));
                parts
            })
            .map_err(|_| invalid())?,
        };

        let mut client = Client::builder(TokioExecutor::new());
        client
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(settings.pool_idle_timeout)
            .pool_max_idle_per_host(settings.pool_max_idle_per_host)
            .http2_only(settings.protocol == UpstreamProtocol::Http2)
            .http2_adaptive_window(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_keep_alive_while_idle(false)
            // hyper queues request body frames for a connection until this many bytes wait
            // (400 KiB by default) before it stops reading the client's body: with many
            // concurrent uploads to a slower upstream that is most of the proxy's memory. Body
            // frames are at most the server's read buffer (`--max-header-bytes`, 16 KiB by
            // default), so this still lets a whole frame through while bounding each upload to
            // about twice that.
            .http1_max_buf_size(UPSTREAM_BUFFER_BYTES)
            .set_host(false);
        Ok(Self {
            client: client.build(connector),
            scheme,
            authority,
            path_prefix,
            host_header,
            protocol: settings.protocol,
            response_header_timeout: settings.response_header_timeout,
            connect_timeout: settings.connect_timeout,
        })
    }

    /// The protocol spoken to the upstream.
    pub fn protocol(&self) -> UpstreamProtocol {
        self.protocol
    }

    /// The upstream's authority as a `host` header value.
    pub fn host_header(&self) -> &HeaderValue {
        &self.host_header
    }

    /// The absolute URI of a request's target at the upstream. `authority` replaces the
    /// upstream's own in the URI (it becomes HTTP/2's `:authority`); the connection still goes to
    /// the upstream.
    pub fn target_uri(
        &self,
        path_and_query: Option<&PathAndQuery>,
        authority: Option<&HeaderValue>,
    ) -> Result<Uri, ProxyError> {
        let authority = match authority {
            Some(value) => Authority::try_from(value.as_bytes())
                .map_err(|_| ProxyError::bad_request("the Host header is not a valid authority"))?,
            None => self.authority.clone(),
        };
        let path_and_query = match (self.path_prefix.is_empty(), path_and_query) {
            (true, Some(path_and_query)) => path_and_query.clone(),
            (true, None) => PathAndQuery::from_static("/"),
            (false, path_and_query) => {
                let rest = path_and_query.map_or("/", PathAndQuery::as_str);
                PathAndQuery::try_from(format!("{}{}", self.path_prefix, rest)).map_err(|_| {
                    ProxyError::bad_request("the request target is not a valid path")
                })?
            }
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(authority)
            .path_and_query(path_and_query)
            .build()
            .map_err(|error| ProxyError::Internal(error.to_string()))
    }

    /// Sends a request upstream and waits for the response headers, up to the response-header
    /// timeout. The body streams afterwards.
    pub async fn send(
        &self,
        request: Request<UpstreamRequestBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        match tokio::time::timeout(self.response_header_timeout, self.client.request(request)).await
        {
            Err(_elapsed) => Err(ProxyError::UpstreamTimeout(self.response_header_timeout)),
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) => Err(self.classify(&error)),
        }
    }

    fn classify(&self, error: &hyper_util::client::legacy::Error) -> ProxyError {
        let message = error_chain(error);
        if error.is_connect() {
            if is_timeout(error) {
                ProxyError::UpstreamConnectTimeout(self.connect_timeout)
            } else {
                ProxyError::UpstreamConnect(message)
            }
        } else {
            ProxyError::Upstream(message)
        }
    }

    /// Whether a TCP connection to the upstream can be opened now (for `/readyz`).
    pub async fn is_reachable(&self) -> bool {
        let host = self
            .authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = self
            .authority
            .port_u16()
            .unwrap_or(if self.scheme == Scheme::HTTPS {
                443
            } else {
                80
            });
        let connect = tokio::net::TcpStream::connect((host, port));
        matches!(
            tokio::time::timeout(self.connect_timeout.min(Duration::from_secs(2)), connect).await,
            Ok(Ok(_))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str) -> UpstreamSettings {
        UpstreamSettings {
            url: url.parse().expect("uri"),
            protocol: UpstreamProtocol::Http1,
            ca_file: None,
            connect_timeout: Duration::from_secs(1),
            response_header_timeout: Duration::from_secs(1),
            pool_idle_timeout: Duration::from_secs(1),
            pool_max_idle_per_host: 8,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }

    fn upstream_for(url: &str) -> Result<Upstream, UpstreamError> {
        Upstream::new(
            &settings(url),
            crate::metrics::Metrics::disabled().upstream_connections(),
        )
    }

    #[tokio::test]
    async fn target_uri_joins_the_base_path() {
        let upstream = upstream_for("http://127.0.0.1:5001/api/").expect("upstream");
        let path = PathAndQuery::from_static("/score?x=1");
        let uri = upstream.target_uri(Some(&path), None).expect("uri");
        assert_eq!(uri.to_string(), "http://127.0.0.1:5001/api/score?x=1");
        let plain = upstream_for("http://127.0.0.1:5001").expect("upstream");
        assert_eq!(
            plain
                .target_uri(Some(&path), None)
                .expect("uri")
                .to_string(),
            "http://127.0.0.1:5001/score?x=1"
        );
        assert_eq!(plain.host_header(), "127.0.0.1:5001");
    }

    #[tokio::test]
    async fn rejects_other_schemes() {
        assert!(upstream_for("ftp://example.com/").is_err());
    }
}
