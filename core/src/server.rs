//! The listeners: the proxy port (HTTP/1.1 and HTTP/2 on one port, optional TLS) and the admin
//! port, and the process's run loop with graceful draining.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};

use crate::admin::AdminState;
use crate::capture::{CaptureRuntime, CaptureSettings, CollectorStopper};
use crate::headers::Downstream;
use crate::metrics::Metrics;
use crate::proxy::{Proxy, ProxySettings};
use crate::tls::{ReloadableServerConfig, ServerCertificateFiles, TlsError};
use crate::upstream::{Upstream, UpstreamError, UpstreamSettings};
use metrics_exporter_prometheus::PrometheusHandle;

/// How long a TLS handshake may take before the connection is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request's headers (HTTP/1.1).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the certificate files are checked for a renewal.
const CERTIFICATE_POLL_INTERVAL: Duration = Duration::from_secs(1);

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
    pub admin_token: Option<String>,
    /// Export Prometheus metrics at the admin's `GET /metrics`.
    pub metrics: bool,
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
    admin_token: Option<String>,
    store: Option<(crate::sink::StoreLocation, String)>,
    prometheus: Option<PrometheusHandle>,
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
        let upstream = Upstream::new(&settings.upstream)?;
        let tls = match &settings.tls {
            Some(files) => Some(Arc::new(ReloadableServerConfig::new(files.clone())?)),
            None => None,
        };
        let (proxy_listener, proxy_address) = bind(settings.listen).await?;
        let (admin_listener, admin_address) = bind(settings.admin_listen).await?;
        let (metrics, prometheus) = if settings.metrics {
            let (metrics, handle) = Metrics::prometheus().map_err(StartError::Metrics)?;
            (metrics, Some(handle))
        } else {
            (Metrics::disabled(), None)
        };
        let (capture, collector) = match &settings.capture {
            Some(capture) => {
                let runtime = CaptureRuntime::start(capture, &settings.proxy.service, &metrics)
                    .map_err(StartError::Capture)?;
                let (capture, collector) = runtime.into_parts();
                (Some(capture), Some(collector))
            }
            None => (None, None),
        };
        // Where `GET /traces` reads: the store, and the batches' directory in it.
        let store = settings.capture.as_ref().map(|capture| {
            (
                capture.store.clone(),
                crate::query::template_directory(capture.storage.trace_template.as_str())
                    .to_owned(),
            )
        });
        Ok(Self {
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
        );
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

        let builder = Arc::new(connection_builder());
        let graceful = GracefulShutdown::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = self.proxy_listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let connection = Connection {
                            builder: builder.clone(),
                            proxy: self.proxy.clone(),
                            tls: self.tls.clone(),
                            watcher: graceful.watcher(),
                        };
                        tokio::spawn(connection.serve(stream, peer));
                    }
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
            connections = graceful.count(),
            deadline_seconds = self.drain_timeout.as_secs_f64(),
            "draining"
        );
        if tokio::time::timeout(self.drain_timeout, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("drain deadline reached with requests still in flight");
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

fn connection_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .adaptive_window(true)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    builder
}

/// One accepted downstream connection.
struct Connection {
    builder: Arc<auto::Builder<TokioExecutor>>,
    proxy: Arc<Proxy>,
    tls: Option<Arc<ReloadableServerConfig>>,
    watcher: Watcher,
}

impl Connection {
    async fn serve(self, stream: TcpStream, peer: SocketAddr) {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {error}");
        }
        let downstream = Downstream {
            peer: peer.ip(),
            tls: self.tls.is_some(),
        };
        let proxy = self.proxy;
        let service = service_fn(move |request| {
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(proxy.handle(downstream, request).await) }
        });
        let result =
            match self.tls {
                None => {
                    let connection = self
                        .builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service);
                    self.watcher.watch(connection).await
                }
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
                    let connection = self
                        .builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service);
                    self.watcher.watch(connection).await
                }
            };
        if let Err(error) = result {
            tracing::debug!(%peer, "connection ended with an error: {error}");
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
