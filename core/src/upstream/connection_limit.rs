//! The cap on upstream connections open at once (`--upstream-max-connections`).
//!
//! Each HTTP/1.1 upstream connection carries one request at a time, so without a cap the
//! connections follow the concurrency of the clients: one HTTP/2 client connection with 256
//! streams could make scoretap open 256 upstream connections. The connector takes a permit
//! before it dials; the permit travels inside the connection's IO and is given back when hyper
//! drops the connection (closed, idle past the pool timeout, or an upgraded tunnel ended). A
//! request that finds no permit free waits: for an idle pooled connection (hyper's pool hands it
//! over as soon as another request is done with one) or for a permit, whichever comes first, and
//! the wait counts against the connect timeout.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection};
use pin_project_lite::pin_project;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::UpstreamConnectionMetrics;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The cap was reached and no upstream connection came free within the connect timeout.
#[derive(Debug, thiserror::Error)]
#[error(
    "no upstream connection came free within the connect timeout ({timeout:?}): all {maximum} \
     allowed (--upstream-max-connections) are open"
)]
pub struct NoConnectionInTime {
    timeout: Duration,
    maximum: usize,
}

/// A connector that opens at most `maximum` connections at once.
#[derive(Debug, Clone)]
pub(super) struct LimitedConnector<C> {
    inner: C,
    permits: Arc<Semaphore>,
    maximum: usize,
    connect_timeout: Duration,
    metrics: UpstreamConnectionMetrics,
}

impl<C> LimitedConnector<C> {
    pub(super) fn new(
        inner: C,
        maximum: usize,
        connect_timeout: Duration,
        metrics: UpstreamConnectionMetrics,
    ) -> Self {
        Self {
            inner,
            permits: Arc::new(Semaphore::new(maximum)),
            maximum,
            connect_timeout,
            metrics,
        }
    }
}

impl<C> tower_service::Service<Uri> for LimitedConnector<C>
where
    C: tower_service::Service<Uri>,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = LimitedConnection<C::Response>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context).map_err(Into::into)
    }

    fn call(&mut self, target: Uri) -> Self::Future {
        // The inner connector's future does nothing until polled: dialing starts with a permit.
        let connecting = self.inner.call(target);
        let permits = self.permits.clone();
        let metrics = self.metrics.clone();
        let (maximum, timeout) = (self.maximum, self.connect_timeout);
        Box::pin(async move {
            let mut waited_for_permit = false;
            let connect = async {
                let permit = match permits.clone().try_acquire_owned() {
                    Ok(permit) => permit,
                    Err(_) => {
                        waited_for_permit = true;
                        metrics.waits.increment(1);
                        permits
                            .acquire_owned()
                            .await
                            .map_err(|closed| -> BoxError { Box::new(closed) })?
                    }
                };
                let io = connecting.await.map_err(Into::into)?;
                Ok::<_, BoxError>(LimitedConnection::new(io, permit, &metrics))
            };
            let outcome = tokio::time::timeout(timeout, connect).await;
            outcome.unwrap_or_else(|_elapsed| {
                let error = if waited_for_permit {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        NoConnectionInTime { timeout, maximum },
                    )
                } else {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        "connecting to the upstream timed out",
                    )
                };
                Err(error.into())
            })
        })
    }
}

/// One open upstream connection's share of the cap: its permit, and its count in the gauge.
#[derive(Debug)]
struct OpenConnection {
    _permit: OwnedSemaphorePermit,
    metrics: UpstreamConnectionMetrics,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.metrics.open.decrement(1.0);
    }
}

pin_project! {
    /// An upstream connection's IO, holding its place under the cap until it is dropped.
    #[derive(Debug)]
    pub struct LimitedConnection<T> {
        #[pin]
        inner: T,
        open: OpenConnection,
    }
}

impl<T> LimitedConnection<T> {
    fn new(inner: T, permit: OwnedSemaphorePermit, metrics: &UpstreamConnectionMetrics) -> Self {
        metrics.open.increment(1.0);
        Self {
            inner,
            open: OpenConnection {
                _permit: permit,
                metrics: metrics.clone(),
            },
        }
    }
}

impl<T: Connection> Connection for LimitedConnection<T> {
    fn connected(&self) -> Connected {
        self.inner.connected()
    }
}

impl<T: Read> Read for LimitedConnection<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().inner.poll_read(context, buffer)
    }
}

impl<T: Write> Write for LimitedConnection<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(context, data)
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(context)
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(context)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffers: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(context, buffers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use tower_service::Service;

    /// A connector whose connections are plain values, made at once.
    #[derive(Debug, Clone)]
    struct Dialer;

    #[derive(Debug)]
    struct Socket;

    impl tower_service::Service<Uri> for Dialer {
        type Response = Socket;
        type Error = io::Error;
        type Future = std::future::Ready<Result<Socket, io::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Uri) -> Self::Future {
            std::future::ready(Ok(Socket))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn connections_past_the_cap_wait_for_one_to_close_within_the_timeout() {
        let metrics = Metrics::disabled().upstream_connections();
        let mut connector =
            LimitedConnector::new(Dialer, 2, Duration::from_secs(1), metrics.clone());
        let target = Uri::from_static("http://upstream/");
        let first = connector.call(target.clone()).await.expect("first");
        let _second = connector.call(target.clone()).await.expect("second");
        let error = connector
            .call(target.clone())
            .await
            .expect_err("a third one waits past the timeout");
        assert!(crate::error::is_timeout(error.as_ref()), "{error}");
        assert!(error.to_string().contains("(--upstream-max-connections)"));

        let third = connector.call(target.clone());
        tokio::pin!(third);
        assert!(
            tokio::time::timeout(Duration::from_millis(500), third.as_mut())
                .await
                .is_err(),
            "no permit free"
        );
        drop(first);
        third.await.expect("the closed connection's permit");
    }
}
