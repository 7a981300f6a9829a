//! Upgraded connections (HTTP/1.1 `Upgrade`, WebSocket): once the upstream has answered 101,
//! the client's connection and the upstream's are joined and bytes are copied both ways.
//!
//! A tunnel belongs to the client connection it was upgraded from: the proxy hands it over
//! ([`TunnelHandoff`]) and the connection's task carries it ([`Tunnel::run`]) once hyper has
//! given up the connection's bytes. So a tunnel keeps what the connection held: its slot of
//! `--max-connections` (in the client side's IO), and its place among what a drain waits for.
//! A tunnel with no byte moving either way for the idle timeout is closed, both sides.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Where a client connection receives the tunnel of an upgrade accepted on it. The server puts
/// one in the extensions of each upgrade request; without it the proxy does not carry the
/// upgrade out (the upstream sees a plain request).
#[derive(Debug, Clone, Default)]
pub struct TunnelHandoff(Arc<Mutex<Option<Tunnel>>>);

impl TunnelHandoff {
    /// The tunnel handed over, if any.
    pub fn take(&self) -> Option<Tunnel> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    fn put(&self, tunnel: Tunnel) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(tunnel);
    }
}

/// The client's side of a requested upgrade, and where its tunnel goes if the upstream agrees.
#[derive(Debug)]
pub(crate) struct ClientUpgrade {
    client: OnUpgrade,
    handoff: TunnelHandoff,
}

impl ClientUpgrade {
    /// Takes the upgrade of `request` over, if its connection can carry a tunnel.
    pub(crate) fn of<B>(request: &mut Request<B>) -> Option<Self> {
        let handoff = request.extensions_mut().remove::<TunnelHandoff>()?;
        Some(Self {
            client: hyper::upgrade::on(request),
            handoff,
        })
    }

    /// The upstream switched protocols: the tunnel joining both sides goes to the client's
    /// connection.
    pub(crate) fn switched(self, upstream: OnUpgrade) {
        self.handoff.put(Tunnel {
            client: self.client,
            upstream,
        });
    }
}

/// Both sides of an accepted upgrade, each available once its connection has given up its
/// bytes.
#[derive(Debug)]
pub struct Tunnel {
    client: OnUpgrade,
    upstream: OnUpgrade,
}

impl Tunnel {
    /// Copies bytes both ways until both sides have ended, or until no byte has moved either way
    /// for `idle_timeout`. Dropping the future closes both sides.
    pub async fn run(self, idle_timeout: Duration) {
        let activity = Arc::new(Activity::new());
        let copying = async {
            let (client, upstream) = match tokio::try_join!(self.client, self.upstream) {
                Ok(sides) => sides,
                Err(error) => {
                    tracing::debug!("protocol upgrade failed: {error}");
                    return;
                }
            };
            let mut client = ActiveIo::new(TokioIo::new(client), activity.clone());
            let mut upstream = ActiveIo::new(TokioIo::new(upstream), activity.clone());
            match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                Ok((up, down)) => tracing::debug!(up, down, "upgraded connection ended"),
                Err(error) => tracing::debug!("upgraded connection ended: {error}"),
            }
        };
        tokio::select! {
            () = copying => {}
            () = activity.idle_for(idle_timeout) => {
                tracing::debug!(
                    idle_seconds = idle_timeout.as_secs_f64(),
                    "upgraded connection idle, closed"
                );
            }
        }
    }
}

/// When bytes last moved through a tunnel, either way.
#[derive(Debug)]
struct Activity {
    started: Instant,
    /// Milliseconds from `started` to the last byte.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let elapsed = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(elapsed, Ordering::Relaxed);
    }

    /// Resolves once no byte has moved for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        loop {
            let last = self.started + Duration::from_millis(self.last.load(Ordering::Relaxed));
            let deadline = last + timeout;
            if deadline <= Instant::now() {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

pin_project! {
    /// One side of a tunnel, recording each byte it moves.
    #[derive(Debug)]
    struct ActiveIo<T> {
        #[pin]
        inner: T,
        activity: Arc<Activity>,
    }
}

impl<T> ActiveIo<T> {
    fn new(inner: T, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }
}

impl<T: AsyncRead> AsyncRead for ActiveIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buffer.filled().len();
        let polled = this.inner.poll_read(context, buffer);
        if buffer.filled().len() > before {
            this.activity.touch();
        }
        polled
    }
}

impl<T: AsyncWrite> AsyncWrite for ActiveIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write(context, data);
        if matches!(polled, Poll::Ready(Ok(written)) if written > 0) {
            this.activity.touch();
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(context)
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(context)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idleness_counts_from_the_last_byte() {
        let activity = Activity::new();
        let start = Instant::now();
        tokio::time::advance(Duration::from_secs(3)).await;
        activity.touch();
        activity.idle_for(Duration::from_secs(5)).await;
        assert_eq!(Instant::now(), start + Duration::from_secs(8));
    }

    #[tokio::test]
    async fn bytes_moving_either_way_are_activity() {
        let activity = Arc::new(Activity::new());
        let (near, far) = tokio::io::duplex(64);
        let mut near = ActiveIo::new(near, activity.clone());
        let mut far = far;
        tokio::time::sleep(Duration::from_millis(20)).await;
        tokio::io::AsyncWriteExt::write_all(&mut near, b"out")
            .await
            .expect("write");
        let written = activity.last.load(Ordering::Relaxed);
        assert!(written >= 20, "{written}");
        tokio::time::sleep(Duration::from_millis(20)).await;
        tokio::io::AsyncWriteExt::write_all(&mut far, b"in")
            .await
            .expect("write");
        let mut buffer = [0u8; 8];
        tokio::io::AsyncReadExt::read(&mut near, &mut buffer)
            .await
            .expect("read");
        assert!(activity.last.load(Ordering::Relaxed) >= written + 20);
    }
}
