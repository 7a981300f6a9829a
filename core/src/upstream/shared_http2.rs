//! One HTTP/2 connection to the upstream, shared by every request whatever authority its URI
//! names, opened again once it has closed or stayed idle.
//!
//! hyper-util's pooled client keys connections by the request URI's scheme and authority, and
//! on HTTP/2 that same authority becomes the request's `:authority`. Forwarding the client's
//! host (`--preserve-host`) through it would open an upstream connection per distinct client
//! host. Here the connection belongs to the configured upstream, and each request's URI only
//! says what its `:authority` is. RFC 9113 §9.1: "Clients SHOULD NOT open more than one HTTP/2
//! connection to a given host and port pair".

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::Mutex;
use tokio::time::Instant;
use tower_service::Service;

use super::{Connector, UpstreamRequestBody};

/// How often HTTP/2 pings check an upstream connection with requests open.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// Why a request could not be sent on the shared connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SharedHttp2Error {
    #[error("connecting to the upstream: {0}")]
    Connect(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("HTTP/2 handshake with the upstream: {0}")]
    Handshake(#[source] hyper::Error),
    #[error("upstream HTTP/2 request: {0}")]
    Request(#[source] hyper::Error),
}

impl SharedHttp2Error {
    /// Whether the upstream could not be reached at all.
    pub(crate) fn is_connect(&self) -> bool {
        matches!(self, Self::Connect(_) | Self::Handshake(_))
    }
}

/// The open connection and when a request last started on it.
#[derive(Debug)]
struct Open {
    sender: http2::SendRequest<UpstreamRequestBody>,
    last_used: Instant,
    /// Which connection this is, counting from 1.
    number: u64,
}

/// The shared HTTP/2 connection to the upstream.
#[derive(Debug)]
pub(crate) struct SharedHttp2 {
    connector: Connector,
    /// Where the connector dials (it ignores the URI it is given anyway).
    target: Uri,
    builder: http2::Builder<TokioExecutor>,
    /// A connection unused this long is closed (the upstream may be closing it).
    idle_timeout: Duration,
    open: Arc<Mutex<Option<Open>>>,
    /// Connections opened so far.
    opened: std::sync::atomic::AtomicU64,
}

impl SharedHttp2 {
    pub(crate) fn new(connector: Connector, target: Uri, idle_timeout: Duration) -> Self {
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .adaptive_window(true)
            .keep_alive_interval(KEEP_ALIVE_INTERVAL)
            .keep_alive_while_idle(false);
        Self {
            connector,
            target,
            builder,
            idle_timeout,
            open: Arc::new(Mutex::new(None)),
            opened: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Sends a request on the shared connection (opening it first if need be) and waits for
    /// the response head. A request the connection refused before it was sent (the upstream
    /// closed it meanwhile) is sent once more on a new connection.
    pub(crate) async fn send(
        &self,
        request: Request<UpstreamRequestBody>,
    ) -> Result<Response<Incoming>, SharedHttp2Error> {
        let (mut sender, reused) = self.sender(false).await?;
        match sender.try_send_request(request).await {
            Ok(response) => Ok(response),
            Err(mut error) => match error.take_message() {
                Some(request) if reused => {
                    let (mut sender, _) = self.sender(true).await?;
                    sender
                        .send_request(request)
                        .await
                        .map_err(SharedHttp2Error::Request)
                }
                _ => Err(SharedHttp2Error::Request(error.into_error())),
            },
        }
    }

    /// A handle on the open connection, or on a new one; whether it was open already.
    /// `renew` drops the open one first.
    async fn sender(
        &self,
        renew: bool,
    ) -> Result<(http2::SendRequest<UpstreamRequestBody>, bool), SharedHttp2Error> {
        let mut open = self.open.lock().await;
        let now = Instant::now();
        if let Some(current) = open.as_mut().filter(|current| {
            !renew
                && !current.sender.is_closed()
                && now.duration_since(current.last_used) < self.idle_timeout
        }) {
            current.last_used = now;
            return Ok((current.sender.clone(), true));
        }
        // Dropping the last handle lets the old connection close once its streams are over.
        *open = None;
        let io = self
            .connector
            .clone()
            .call(self.target.clone())
            .await
            .map_err(SharedHttp2Error::Connect)?;
        let (sender, connection) = self
            .builder
            .handshake(io)
            .await
            .map_err(SharedHttp2Error::Handshake)?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!("upstream HTTP/2 connection ended: {error}");
            }
        });
        let number = self
            .opened
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        *open = Some(Open {
            sender: sender.clone(),
            last_used: now,
            number,
        });
        tokio::spawn(close_when_idle(
            Arc::downgrade(&self.open),
            number,
            self.idle_timeout,
        ));
        Ok((sender, false))
    }
}

/// Drops the handle on connection `number` once no request has started on it for
/// `idle_timeout`; the connection then closes when its last stream is over. Ends early when
/// another connection has taken its place or the upstream is gone.
async fn close_when_idle(
    open: std::sync::Weak<Mutex<Option<Open>>>,
    number: u64,
    idle_timeout: Duration,
) {
    let mut wake_at = Instant::now() + idle_timeout;
    loop {
        tokio::time::sleep_until(wake_at).await;
        let Some(open) = open.upgrade() else {
            return;
        };
        let mut open = open.lock().await;
        match open.as_ref() {
            Some(current) if current.number == number => {
                let idle_until = current.last_used + idle_timeout;
                if idle_until <= Instant::now() {
                    *open = None;
                    return;
                }
                wake_at = idle_until;
            }
            _ => return,
        }
    }
}
