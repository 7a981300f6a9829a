//! The listeners: the proxy port (HTTP/1.1 and HTTP/2 on one port, optional TLS) and the admin
//! port, and the process's run loop with graceful draining.

mod framing;
mod guard;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use self::guard::{CancelAllowance, ConnectionGuard, Expiry, GuardLimits, GuardedBody, GuardedIo};

use crate::admin::AdminState;
use crate::capture::{CaptureRuntime, CaptureSettings, CollectorStopper};
use crate::headers::{is_upgrade_request, Downstream};
use crate::metrics::Metrics;
use crate::penalty::{AbusePenalty, Admission};
use crate::progress::ClientStall;
use crate::proxy::{Proxy, ProxySettings};
use crate::tls::{ReloadableServerConfig, ServerCertificateFiles, TlsError};
use crate::tunnel::TunnelHandoff;
use crate::upstream::{Upstream, UpstreamError, UpstreamSettings};
use metrics_exporter_prometheus::PrometheusHandle;

/// How long a TLS handshake may take before the connection is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the certificate files are checked for a renewal.
const CERTIFICATE_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// HTTP/2 keep-alive: a PING after this much silence; no PING ACK within the timeout closes the
/// connection (a dead peer, not an idle one: idle connections are `Limits::idle_timeout`'s).
const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Streams hyper may reset itself for a client's protocol errors before it sends GOAWAY
/// (RUSTSEC-2024-0003; hyper's own default, made explicit).
const H2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;
/// How long an HTTP/2 connection sent GOAWAY has to close by itself, once no stream is left in
/// flight on it, before it is dropped.
const GOAWAY_GRACE: Duration = Duration::from_secs(5);
/// At most one warning per this interval about connections refused at `--max-connections`.
const REFUSED_WARNING_INTERVAL: Duration = Duration::from_secs(10);
/// hyper's smallest HTTP/1 read buffer; `max_header_bytes` cannot be below it.
pub const MINIMUM_HEADER_BYTES: usize = 8192;

/// What clients may hold, one and all together (README "Limits").
#[derive(Debug, Clone)]
pub struct Limits {
    /// The largest request head: on HTTP/1.1 the request line and fields, as bytes on the wire
    /// (past it hyper answers 431 and closes); on HTTP/2 the field list as RFC 9113 §6.5.2
    /// measures it, name + value + 32 per field (past it h2 answers 431 on that stream). At
    /// least [`MINIMUM_HEADER_BYTES`].
    ///
    /// It is also the most an HTTP/1.1 connection's read buffer grows to, so it sets each
    /// upload's memory: a body frame pins the buffer block it was read into until the upstream
    /// has taken it. The 16 KiB default is what the scoring servers behind scoretap accept anyway
    /// (uvicorn/h11 refuses heads past 16 KiB, gunicorn fields past 8,190 bytes, Node.js heads
    /// past 16 KiB). 64 KiB cost about 150 KiB more per concurrent upload: peak RSS 296 MiB
    /// against 151 MiB for 1,000 uploads with capture off (`memory_load 1000 10 1024`, the
    /// harness behind `scripts/bench-memory.sh`).
    pub max_header_bytes: usize,
    /// A client must send a whole request head within this of its first byte (or of
    /// connecting); else the connection is closed without an answer (slowloris).
    pub header_read_timeout: Duration,
    /// A connection with no request in flight this long is closed (HTTP/1.1) or sent GOAWAY
    /// (HTTP/2).
    pub idle_timeout: Duration,
    /// Client connections open at once; past it new ones are accepted and closed at once.
    pub max_connections: usize,
    /// HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`. It also sets how many started streams a
    /// client may cancel: twice this many at once, refilled at this many a second; past it the
    /// connection gets GOAWAY (its streams in flight may finish).
    pub max_concurrent_streams: u32,
    /// HTTP/2 streams a client may open and reset before scoretap has accepted them; past it
    /// GOAWAY `ENHANCE_YOUR_CALM` (rapid reset, CVE-2023-44487).
    pub h2_max_pending_reset_streams: usize,
    /// How long the next connection of a peer cut off with `ENHANCE_YOUR_CALM` waits before it
    /// is served, doubling per repeat up to a second ([`crate::penalty`]); zero switches it off.
    pub abuse_delay: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 16 << 10,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            max_concurrent_streams: 256,
            // h2's own default (h2::server::Builder::max_pending_accept_reset_streams).
            h2_max_pending_reset_streams: 20,
            // Measured: a rapid-reset client reconnecting at once made ~3,300 connections a
            // second and took a well-behaved client's p99 from 0.3 ms to 3 ms; made to wait
            // 20 ms or more between connections, it stayed under 2x (tests/tests/hostile.rs).
            abuse_delay: Duration::from_millis(50),
        }
    }
}

/// Where the server is in its life, as its connections see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Serving,
    /// Shutting down: connections finish what is in flight, up to the drain deadline.
    Draining,
    /// The drain deadline has passed: what is still open is closed (tunnels).
    Stopping,
}

/// Everything needed to start scoretap's listeners.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub tls: Option<ServerCertificateFiles>,
    /// How long in-flight requests may take to finish after a shutdown signal.
    pub drain_timeout: Duration,
    pub upstream: UpstreamSettings,
    pub proxy: ProxySettings,
    /// Capture of every exchange; `None` runs a plain proxy.
    pub capture: Option<CaptureSettings>,
    /// Bearer token for the admin's mutating endpoints (`PUT /capture`); `None` refuses them.
    pub admin_token: Option<crate::secret::Secret>,
    /// Export Prometheus metrics at the admin's `GET /metrics`.
    pub metrics: bool,
    /// `/readyz` also checks that the upstream accepts connections.
    pub readyz_upstream: bool,
    pub limits: Limits,
}

/// How long the collector may take to write what it holds when scoretap stops.
const COLLECTOR_STOP_DEADLINE: Duration = Duration::from_secs(10);

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("listener TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("cannot start capture: {0}")]
    Capture(std::io::Error),
    #[error("cannot set up metrics: {0}")]
    Metrics(String),
}

/// The listeners, bound and ready to run.
#[derive(Debug)]
pub struct BoundServer {
    proxy_listener: TcpListener,
    admin_listener: TcpListener,
    proxy_address: SocketAddr,
    admin_address: SocketAddr,
    tls: Option<Arc<ReloadableServerConfig>>,
    proxy: Arc<Proxy>,
    drain_timeout: Duration,
    draining: Arc<AtomicBool>,
    collector: Option<CollectorStopper>,
    admin_token: Option<crate::secret::Secret>,
    readyz_upstream: bool,
    store: Option<(crate::sink::StoreLocation, String)>,
    prometheus: Option<PrometheusHandle>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    limits: Limits,
    penalty: Arc<AbusePenalty>,
}

/// How often histogram upkeep runs, so their memory stays bounded between scrapes.
const METRICS_UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

async fn bind(address: SocketAddr) -> Result<(TcpListener, SocketAddr), StartError> {
    let listener = TcpListener::bind(address)
        .await
        .map_err(|source| StartError::Bind { address, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| StartError::Bind { address, source })?;
    Ok((listener, bound))
}

impl BoundServer {
    /// Builds the upstream client, loads the certificate, and binds both listeners.
    pub async fn bind(settings: ServerSettings) -> Result<Self, StartError> {
        let (metrics, prometheus) = if settings.metrics {
            let (metrics, handle) = Metrics::prometheus().map_err(StartError::Metrics)?;
            (metrics, Some(handle))
        } else {
            (Metrics::disabled(), None)
        };
        let upstream = Upstream::new(&settings.upstream, metrics.upstream_connections())?;
        let tls = match &settings.tls {
            Some(files) => Some(Arc::new(ReloadableServerConfig::new(files.clone())?)),
            None => None,
        };
        let (proxy_listener, proxy_address) = bind(settings.listen).await?;
        let (admin_listener, admin_address) = bind(settings.admin_listen).await?;
        let (capture, collector) = match &settings.capture {
            Some(capture) => {
                let runtime = CaptureRuntime::start(capture, &settings.proxy.service, &metrics)
                    .map_err(StartError::Capture)?;
                let (capture, collector) = runtime.into_parts();
                (Some(capture), Some(collector))
            }
            None => (None, None),
        };
        warn_if_over_open_file_limit(settings.limits.max_connections);
        // Where `GET /traces` reads: the store, and the batches' directory in it.
        let store = settings.capture.as_ref().map(|capture| {
            (
                capture.store.clone(),
                crate::query::template_directory(capture.storage.trace_template.as_str())
                    .to_owned(),
            )
        });
        let builder = Arc::new(connection_builder(
            &settings.limits,
            settings.proxy.max_headers,
        ));
        Ok(Self {
            builder,
            penalty: Arc::new(AbusePenalty::new(settings.limits.abuse_delay)),
            limits: settings.limits,
            proxy_listener,
            admin_listener,
            proxy_address,
            admin_address,
            tls,
            proxy: Arc::new(Proxy::new(upstream, settings.proxy, capture, metrics)),
            drain_timeout: settings.drain_timeout,
            draining: Arc::new(AtomicBool::new(false)),
            collector,
            admin_token: settings.admin_token,
            readyz_upstream: settings.readyz_upstream,
            store,
            prometheus,
        })
    }

    /// The proxy listener's address (useful when bound to port 0).
    pub fn proxy_address(&self) -> SocketAddr {
        self.proxy_address
    }

    /// The admin listener's address.
    pub fn admin_address(&self) -> SocketAddr {
        self.admin_address
    }

    /// Serves until `shutdown` resolves, then drains: stops accepting, turns `/readyz` to 503,
    /// and lets in-flight requests finish for up to the drain timeout.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let admin = AdminState::new(
            self.proxy.clone(),
            self.draining.clone(),
            self.admin_token.clone(),
            self.store.clone(),
            self.prometheus.clone(),
        )
        .checking_upstream(self.readyz_upstream);
        let admin_task = tokio::spawn(crate::admin::serve(self.admin_listener, admin));
        let upkeep_task = self.prometheus.clone().map(|handle| {
            tokio::spawn(async move {
                let mut interval = tokio::time::interval(METRICS_UPKEEP_INTERVAL);
                loop {
                    interval.tick().await;
                    handle.run_upkeep();
                }
            })
        });
        let reload_task = self
            .tls
            .clone()
            .map(|tls| tokio::spawn(watch_certificate(tls)));

        let slots = Arc::new(Semaphore::new(self.limits.max_connections));
        let mut refused = RefusedConnections::default();
        let (phase, phase_seen) = watch::channel(Phase::Serving);
        // Every connection task holds a clone; `recv` returns `None` once all have ended.
        let (alive, mut all_ended) = mpsc::channel::<()>(1);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = self.proxy_listener.accept() => match accepted {
                    Ok((stream, peer)) => match slots.clone().try_acquire_owned() {
                        Ok(slot) => {
                            let connection = Connection {
                                builder: self.builder.clone(),
                                proxy: self.proxy.clone(),
                                tls: self.tls.clone(),
                                limits: self.limits.clone(),
                                penalty: self.penalty.clone(),
                                phase: phase_seen.clone(),
                                _alive: alive.clone(),
                            };
                            tokio::spawn(connection.serve(stream, peer, slot));
                        }
                        // At --max-connections: accepted and closed at once, so the client
                        // fails fast (and can try another replica) instead of waiting in the
                        // listen backlog.
                        Err(_) => refused.refuse(stream, self.limits.max_connections),
                    },
                    Err(error) => {
                        // Out of file descriptors and the like: wait rather than spin.
                        tracing::warn!("accept failed: {error}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }

        self.draining.store(true, Ordering::SeqCst);
        drop(self.proxy_listener);
        tracing::info!(
            connections = self.limits.max_connections - slots.available_permits(),
            deadline_seconds = self.drain_timeout.as_secs_f64(),
            "draining"
        );
        // Receivers may all be gone already (no connection open): nothing to tell then.
        let _ = phase.send(Phase::Draining);
        drop(alive);
        if tokio::time::timeout(self.drain_timeout, all_ended.recv())
            .await
            .is_err()
        {
            tracing::warn!("drain deadline reached with requests or tunnels still open");
            let _ = phase.send(Phase::Stopping);
        }
        if let Some(collector) = self.collector {
            collector.stop(COLLECTOR_STOP_DEADLINE).await;
        }
        admin_task.abort();
        for task in [reload_task, upkeep_task].into_iter().flatten() {
            task.abort();
        }
        tracing::info!("stopped");
    }
}

/// The HTTP/1.1 and HTTP/2 server settings, limits applied.
fn connection_builder(limits: &Limits, max_headers: usize) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let mut http1 = builder.http1();
    http1
        .timer(TokioTimer::new())
        // A head must fit hyper's read buffer: past it hyper answers 431 and closes. (hyper-util's
        // builder does not expose hyper's `max_header_size`; the buffer bound is the same limit.)
        .max_buf_size(limits.max_header_bytes.max(MINIMUM_HEADER_BYTES))
        // hyper's own timer runs from the end of one exchange to the end of the next head; the
        // guard enforces the two finer limits, this is only a backstop above both.
        .header_read_timeout(limits.header_read_timeout + limits.idle_timeout)
        .keep_alive(true);
    // More than 100 moves hyper's header array from the stack to the heap for every request:
    // only do it when asked. Past the count hyper answers 431.
    if max_headers != DEFAULT_MAX_HEADERS {
        http1.max_headers(max_headers);
    }
    builder
        .http2()
        .timer(TokioTimer::new())
        .adaptive_window(true)
        .keep_alive_interval(Some(H2_KEEP_ALIVE_INTERVAL))
        .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_pending_accept_reset_streams(limits.h2_max_pending_reset_streams)
        .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESET_STREAMS);
    builder
}

/// hyper's HTTP/1 header count without `max_headers`.
const DEFAULT_MAX_HEADERS: usize = 100;

/// Warns when `--max-connections` cannot be reached because the process may not open that many
/// files (each client connection can hold an upstream connection too).
fn warn_if_over_open_file_limit(max_connections: usize) {
    let Ok(limits) = std::fs::read_to_string("/proc/self/limits") else {
        return;
    };
    let soft = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(3))
        .and_then(|soft| soft.parse::<usize>().ok());
    if let Some(soft) = soft.filter(|&soft| soft < max_connections.saturating_mul(2)) {
        tracing::warn!(
            open_file_limit = soft,
            max_connections,
            "the open-file limit (ulimit -n) is below twice --max-connections (a client \
             connection and its upstream connection): accepting will fail before the limit"
        );
    }
}

/// Connections refused at `--max-connections`, logged at most once per interval.
#[derive(Debug, Default)]
struct RefusedConnections {
    last_warning: Option<Instant>,
    since_warning: u64,
}

impl RefusedConnections {
    fn refuse(&mut self, stream: TcpStream, max_connections: usize) {
        drop(stream);
        self.since_warning += 1;
        if self
            .last_warning
            .is_none_or(|last| last.elapsed() >= REFUSED_WARNING_INTERVAL)
        {
            tracing::warn!(
                refused = self.since_warning,
                max_connections,
                "connection limit reached: new connections are closed at once"
            );
            self.last_warning = Some(Instant::now());
            self.since_warning = 0;
        }
    }
}

/// One accepted downstream connection.
struct Connection {
    builder: Arc<auto::Builder<TokioExecutor>>,
    proxy: Arc<Proxy>,
    tls: Option<Arc<ReloadableServerConfig>>,
    limits: Limits,
    penalty: Arc<AbusePenalty>,
    /// Where the server is: draining, then stopping.
    phase: watch::Receiver<Phase>,
    /// Dropped when the connection ends, upgraded tunnel included (see `BoundServer::run`).
    _alive: mpsc::Sender<()>,
}

impl Connection {
    async fn serve(self, stream: TcpStream, peer: SocketAddr, slot: OwnedSemaphorePermit) {
        let _active = self.proxy.metrics().connection_opened();
        match self.penalty.admit(peer.ip()) {
            Admission::Now => {}
            Admission::After(wait) => {
                self.proxy.metrics().connection_delayed();
                tracing::debug!(%peer, wait_ms = wait.as_millis(), "delaying a connection after abuse");
                tokio::time::sleep(wait).await;
            }
            Admission::TurnedAway => {
                self.proxy.metrics().connection_delayed();
                tracing::debug!(%peer, "turning a connection away after abuse");
                tokio::time::sleep(crate::penalty::MAXIMUM_WAIT).await;
                return;
            }
        }
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {error}");
        }
        let downstream = Downstream {
            peer: peer.ip(),
            tls: self.tls.is_some(),
        };
        let result =
            match self.tls.clone() {
                None => self.serve_http(stream, downstream, slot).await,
                Some(tls) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
                    let stream =
                        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                            .await
                        {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(error)) => {
                                tracing::debug!(%peer, "TLS handshake failed: {error}");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "TLS handshake timed out");
                                return;
                            }
                        };
                    self.serve_http(stream, downstream, slot).await
                }
            };
        if let Err(error) = result {
            tracing::debug!(%peer, "connection ended with an error: {error}");
        }
    }

    /// Serves HTTP on the connection until it ends, scoretap drains, or the guard expires it.
    async fn serve_http<S>(
        mut self,
        stream: S,
        downstream: Downstream,
        slot: OwnedSemaphorePermit,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let guard = ConnectionGuard::new(GuardLimits {
            header_read: self.limits.header_read_timeout,
            idle: self.limits.idle_timeout,
            cancelled_streams: CancelAllowance::for_streams(self.limits.max_concurrent_streams),
            maximum_head_bytes: self.limits.max_header_bytes,
            goaway_grace: GOAWAY_GRACE,
        });
        let client_stall = ClientStall::default();
        // The slot is held by the connection's bytes: by an upgraded tunnel as well.
        let io = GuardedIo::new(
            stream,
            guard.clone(),
            slot,
            self.proxy.body_idle_timeout(),
            client_stall.clone(),
        );
        let tunnels = TunnelHandoff::default();
        let service = {
            let guard = guard.clone();
            let proxy = self.proxy.clone();
            let tunnels = tunnels.clone();
            service_fn(move |mut request: Request<Incoming>| {
                let proxy = proxy.clone();
                let (in_flight, violation) = guard.request_started();
                let client_stall = client_stall.clone();
                if is_upgrade_request(request.version(), request.headers()) {
                    request.extensions_mut().insert(tunnels.clone());
                }
                async move {
                    if let Some(violation) = violation {
                        request.extensions_mut().insert(violation);
                    }
                    request.extensions_mut().insert(client_stall);
                    let response = proxy.handle(downstream, request).await;
                    // Before hyper writes the response and reads the next request: the guard
                    // learns whether the connection still carries HTTP/1.1 requests.
                    in_flight.responded(response.status() == StatusCode::SWITCHING_PROTOCOLS);
                    Ok::<_, Infallible>(response.map(|body| GuardedBody::new(body, in_flight)))
                }
            })
        };
        let connection = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(connection);
        let mut shutting_down = false;
        loop {
            tokio::select! {
                result = connection.as_mut() => {
                    // Before the connection is dropped: the peer may reconnect as soon as it
                    // reads the end of this one.
                    if result
                        .as_ref()
                        .is_err_and(|error| crate::penalty::ended_for_abuse(error.as_ref()))
                    {
                        self.penalty.strike(downstream.peer);
                    }
                    // hyper has given up an upgraded connection's bytes: its tunnel is carried
                    // here, so that it holds what the connection held.
                    if let Some(tunnel) = tunnels.take().filter(|_| result.is_ok()) {
                        tokio::select! {
                            () = tunnel.run(self.limits.idle_timeout) => {}
                            Ok(()) = async {
                                self.phase.wait_for(|&phase| phase == Phase::Stopping).await.map(drop)
                            } => tracing::debug!(peer = %downstream.peer, "upgraded connection closed at the drain deadline"),
                        }
                    }
                    return result;
                }
                Ok(()) = async {
                    self.phase.wait_for(|&phase| phase != Phase::Serving).await.map(drop)
                }, if !shutting_down => {
                    shutting_down = true;
                    connection.as_mut().graceful_shutdown();
                }
                expiry = guard.expired() => match expiry {
                    Expiry::Close => return Ok(()),
                    Expiry::GoAway | Expiry::CancelledTooMany => {
                        // hyper's graceful GOAWAY says NO_ERROR: the client may open no new
                        // stream, and the streams in flight finish (RFC 9113 §6.8: GOAWAY
                        // "enables an endpoint to gracefully stop accepting new streams while
                        // still finishing processing of previously established streams"); hyper
                        // closes the connection after the last one.
                        if expiry == Expiry::CancelledTooMany {
                            tracing::debug!(peer = %downstream.peer, "HTTP/2 client cancelled too many streams, sending GOAWAY");
                        }
                        connection.as_mut().graceful_shutdown();
                        // From now on the guard gives the connection its grace to close by
                        // itself once no stream is left (and drops it at once if the client goes
                        // on cancelling past its allowance).
                        guard.went_away();
                    }
                },
            }
        }
    }
}

/// Reloads the listener's certificate on SIGHUP or when its files change.
async fn watch_certificate(tls: Arc<ReloadableServerConfig>) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(error) => {
            tracing::warn!(
                "cannot listen for SIGHUP, certificate reload by file change only: {error}"
            );
            None
        }
    };
    let mut poll = tokio::time::interval(CERTIFICATE_POLL_INTERVAL);
    loop {
        let signalled = tokio::select! {
            _ = poll.tick() => false,
            Some(()) = async {
                match hangup.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            } => true,
        };
        if signalled || tls.files_changed() {
            match tls.reload() {
                Ok(()) => tracing::info!("TLS certificate reloaded"),
                Err(error) => {
                    tracing::error!(
                        "TLS certificate reload failed, keeping the previous one: {error}"
                    )
                }
            }
        }
    }
}
