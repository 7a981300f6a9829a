//! An exchange's progress, shared by its two bodies and the proxy: whether the request body has
//! been sent whole (the response-header timeout starts then), when a body byte last crossed
//! either way, and which side the exchange is waiting for (the body idle timeout names it).
//!
//! Three places enforce `--body-idle-timeout` ("no byte either way on an exchange for that long
//! ends it"), each where the wait can be seen:
//! - while the request body uploads, [`crate::upstream::Upstream::send`] watches the progress:
//!   a client that stops sending gets 408, an upstream that stops reading makes a 504;
//! - once the response has started, [`IdleLimitedBody`] fails the response body when the
//!   upstream sends nothing (HTTP/1.1: the client's connection closes; HTTP/2: RST_STREAM);
//! - a client that stops reading leaves scoretap's writes pending: the connection's IO fails
//!   them after the timeout ([`ClientStall`] tells the record why the connection ended).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

/// The side of the proxy an exchange is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The downstream client: it stopped sending its request body, or stopped reading.
    Client,
    /// The upstream: it stopped reading the request body, or stopped sending the response's.
    Upstream,
}

/// Where the request body stands.
const REQUEST_WAITING_FOR_UPSTREAM: u8 = 0;
const REQUEST_WAITING_FOR_CLIENT: u8 = 1;
const REQUEST_SENT: u8 = 2;

/// One exchange's progress; shared (`Arc`) by its bodies and the proxy.
#[derive(Debug)]
pub struct ExchangeProgress {
    origin: Instant,
    /// Nanoseconds from `origin` to the last body byte either way.
    last_progress: AtomicU64,
    /// One of the `REQUEST_*` states.
    request: AtomicU8,
    /// Nanoseconds from `origin` to when the request body had been sent whole.
    request_sent_at: AtomicU64,
    /// Request body bytes handed to the upstream.
    request_bytes: AtomicU64,
    /// Nanoseconds from `origin` to the upstream's response headers (or its failure); 0 before.
    upstream_answered_at: AtomicU64,
}

impl ExchangeProgress {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            origin: Instant::now(),
            last_progress: AtomicU64::new(0),
            request: AtomicU8::new(REQUEST_WAITING_FOR_UPSTREAM),
            request_sent_at: AtomicU64::new(0),
            request_bytes: AtomicU64::new(0),
            upstream_answered_at: AtomicU64::new(0),
        })
    }

    fn nanos_since_origin(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// A body byte crossed, either way.
    fn advanced(&self) {
        self.last_progress
            .store(self.nanos_since_origin(), Ordering::Relaxed);
    }

    /// When the exchange goes idle for `timeout` if nothing crosses before.
    pub fn idle_deadline(&self, timeout: Duration) -> Instant {
        self.origin + Duration::from_nanos(self.last_progress.load(Ordering::Relaxed)) + timeout
    }

    /// Whether the request body has been sent whole.
    pub fn request_sent(&self) -> bool {
        self.request.load(Ordering::Acquire) == REQUEST_SENT
    }

    /// Request body bytes handed to the upstream so far.
    pub fn request_bytes(&self) -> u64 {
        self.request_bytes.load(Ordering::Relaxed)
    }

    /// The upstream answered (response headers, or a failure): now.
    pub fn upstream_answered(&self) {
        self.upstream_answered_at
            .store(self.nanos_since_origin().max(1), Ordering::Relaxed);
    }

    /// How long after the exchange began the upstream answered, if it did.
    pub fn upstream_headers_after(&self) -> Option<Duration> {
        match self.upstream_answered_at.load(Ordering::Relaxed) {
            0 => None,
            nanos => Some(Duration::from_nanos(nanos)),
        }
    }

    /// When the request body had been sent whole, if it has.
    pub fn request_sent_at(&self) -> Option<Instant> {
        self.request_sent().then(|| {
            self.origin + Duration::from_nanos(self.request_sent_at.load(Ordering::Relaxed))
        })
    }

    fn set_request(&self, state: u8) {
        if state == REQUEST_SENT {
            if self.request.load(Ordering::Relaxed) != REQUEST_SENT {
                self.request_sent_at
                    .store(self.nanos_since_origin(), Ordering::Relaxed);
                self.request.store(REQUEST_SENT, Ordering::Release);
            }
        } else if self.request.load(Ordering::Relaxed) != REQUEST_SENT {
            self.request.store(state, Ordering::Release);
        }
    }

    /// Who the exchange is waiting for when no byte crosses: the client while its request body
    /// is unfinished and it was asked for more, else the upstream.
    pub fn stalled_side(&self) -> Side {
        match self.request.load(Ordering::Acquire) {
            REQUEST_WAITING_FOR_CLIENT => Side::Client,
            _ => Side::Upstream,
        }
    }
}

pin_project! {
    /// A request body that reports its progress: each frame, whether the upstream's reader is
    /// waiting for the client, and its end. It changes nothing it forwards.
    #[derive(Debug)]
    pub struct ProgressBody<B> {
        #[pin]
        inner: B,
        progress: Arc<ExchangeProgress>,
    }
}

impl<B: Body> ProgressBody<B> {
    pub fn new(inner: B, progress: Arc<ExchangeProgress>) -> Self {
        // hyper never polls a body that is over from the start.
        if inner.is_end_stream() {
            progress.set_request(REQUEST_SENT);
        }
        Self { inner, progress }
    }
}

impl<B: Body<Data = Bytes>> Body for ProgressBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let mut inner = this.inner;
        let polled = inner.as_mut().poll_frame(context);
        let progress = &**this.progress;
        match &polled {
            Poll::Pending => progress.set_request(REQUEST_WAITING_FOR_CLIENT),
            Poll::Ready(Some(Ok(frame))) => {
                progress.advanced();
                if let Some(data) = frame.data_ref() {
                    progress
                        .request_bytes
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                let over = frame.is_trailers() || inner.is_end_stream();
                progress.set_request(if over {
                    REQUEST_SENT
                } else {
                    REQUEST_WAITING_FOR_UPSTREAM
                });
            }
            Poll::Ready(None) => progress.set_request(REQUEST_SENT),
            // The exchange fails with the body's error; nothing waits any more.
            Poll::Ready(Some(Err(_))) => progress.set_request(REQUEST_WAITING_FOR_UPSTREAM),
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why a response body stopped on its way to the client.
#[derive(Debug, thiserror::Error)]
pub enum ResponseBodyError {
    /// Reading the upstream's body failed (reset, malformed framing).
    #[error(transparent)]
    Upstream(#[from] hyper::Error),
    /// No body byte crossed either way for the body idle timeout.
    #[error("{}", idle_message(*.waiting_for, *.after))]
    Idle { waiting_for: Side, after: Duration },
}

/// The message of an exchange ended for idleness, naming the side that stalled.
pub fn idle_message(waiting_for: Side, after: Duration) -> String {
    match waiting_for {
        Side::Client => {
            format!("the client sent or read nothing for {after:?} (--body-idle-timeout)")
        }
        Side::Upstream => {
            format!("the upstream sent or read nothing for {after:?} (--body-idle-timeout)")
        }
    }
}

pin_project! {
    /// A response body that fails when no byte crosses either way for the idle timeout while it
    /// waits for the upstream. The timer is armed only while the upstream keeps it waiting and
    /// is not moved per frame: when it fires early (bytes crossed meanwhile) it is moved to the
    /// new deadline.
    #[derive(Debug)]
    pub struct IdleLimitedBody<B> {
        #[pin]
        inner: B,
        progress: Arc<ExchangeProgress>,
        timeout: Duration,
        timer: Option<Pin<Box<Sleep>>>,
    }
}

impl<B> IdleLimitedBody<B> {
    pub fn new(inner: B, progress: Arc<ExchangeProgress>, timeout: Duration) -> Self {
        Self {
            inner,
            progress,
            timeout,
            timer: None,
        }
    }
}

impl IdleLimitedBody<crate::body::ResponseBody> {
    /// Hands the upstream's body and its tap over when the tee is dropped before the body's end
    /// (a [`crate::tee::Linger`]).
    pub fn linger(self: Pin<&mut Self>, tap: crate::tee::BodyTap) {
        crate::body::ResponseBody::linger(self.project().inner, tap);
    }
}

impl<B> Body for IdleLimitedBody<B>
where
    B: Body<Data = Bytes, Error = hyper::Error>,
{
    type Data = Bytes;
    type Error = ResponseBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ResponseBodyError>>> {
        let this = self.project();
        match this.inner.poll_frame(context) {
            Poll::Ready(polled) => {
                if polled.is_some() {
                    this.progress.advanced();
                }
                Poll::Ready(polled.map(|frame| frame.map_err(ResponseBodyError::Upstream)))
            }
            Poll::Pending => {
                let progress = &**this.progress;
                loop {
                    let deadline = progress.idle_deadline(*this.timeout);
                    let timer = this
                        .timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                    if timer.deadline() != deadline {
                        timer.as_mut().reset(deadline);
                    }
                    if timer.as_mut().poll(context).is_pending() {
                        return Poll::Pending;
                    }
                    if progress.idle_deadline(*this.timeout) <= Instant::now() {
                        return Poll::Ready(Some(Err(ResponseBodyError::Idle {
                            waiting_for: progress.stalled_side(),
                            after: *this.timeout,
                        })));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Fails a connection's write that stays pending for the body idle timeout: the peer stopped
/// reading. Armed by the first pending write, disarmed by any write that goes through; nothing
/// is done per write otherwise.
#[derive(Debug)]
pub struct WriteStall {
    timeout: Duration,
    waiting_for: Side,
    timer: Option<Pin<Box<Sleep>>>,
    /// Marked when a write is failed.
    stalled: Option<ClientStall>,
}

impl WriteStall {
    pub fn new(timeout: Duration, waiting_for: Side) -> Self {
        Self {
            timeout,
            waiting_for,
            timer: None,
            stalled: None,
        }
    }

    /// Marks `stalled` when a write is failed.
    pub fn marking(mut self, stalled: ClientStall) -> Self {
        self.stalled = Some(stalled);
        self
    }

    /// Passes a write's result through, or fails it once it has been pending for the timeout.
    pub fn limit<T>(
        &mut self,
        polled: Poll<std::io::Result<T>>,
        context: &mut Context<'_>,
    ) -> Poll<std::io::Result<T>> {
        if polled.is_ready() {
            self.timer = None;
            return polled;
        }
        let timeout = self.timeout;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match timer.as_mut().poll(context) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                if let Some(stalled) = &self.stalled {
                    stalled.mark();
                }
                Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    WriteStalled {
                        waiting_for: self.waiting_for,
                        after: timeout,
                    },
                )))
            }
        }
    }
}

/// The error of a write failed by [`WriteStall`] (inside an `io::Error` of kind `TimedOut`).
#[derive(Debug, thiserror::Error)]
#[error("{}", idle_message(*.waiting_for, *.after))]
pub struct WriteStalled {
    pub waiting_for: Side,
    pub after: Duration,
}

impl WriteStalled {
    /// The stalled write somewhere in an error's source chain, if any.
    pub fn find_in<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a WriteStalled> {
        let mut current = Some(error);
        while let Some(error) = current {
            let stalled = error
                .downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
                .and_then(|inner| inner.downcast_ref::<WriteStalled>());
            if stalled.is_some() {
                return stalled;
            }
            current = error.source();
        }
        None
    }
}

/// Set on a client connection whose writes stayed pending for the body idle timeout (the client
/// stopped reading); the connection is closed, and the records of its exchanges say why.
#[derive(Debug, Clone, Default)]
pub struct ClientStall(Arc<AtomicBool>);

impl ClientStall {
    pub fn mark(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_marked(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test(start_paused = true)]
    async fn a_request_body_is_sent_at_its_end() {
        let progress = ExchangeProgress::new();
        let empty = ProgressBody::new(http_body_util::Empty::<Bytes>::new(), progress.clone());
        assert!(
            progress.request_sent(),
            "an empty body is sent from the start"
        );
        drop(empty);

        let progress = ExchangeProgress::new();
        let mut body = ProgressBody::new(
            http_body_util::Full::new(Bytes::from_static(b"input")),
            progress.clone(),
        );
        assert!(!progress.request_sent());
        assert_eq!(progress.stalled_side(), Side::Upstream);
        let frame = body.frame().await.expect("a frame").expect("data");
        assert_eq!(frame.into_data().ok(), Some(Bytes::from_static(b"input")));
        assert!(progress.request_sent());
        assert!(progress.request_sent_at().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_pending_for_the_timeout_fails_and_marks_the_stall() {
        let stalled = ClientStall::default();
        let mut limit =
            WriteStall::new(Duration::from_secs(60), Side::Client).marking(stalled.clone());
        let polled = std::future::poll_fn(|context| {
            Poll::Ready(limit.limit::<usize>(Poll::Pending, context))
        })
        .await;
        assert!(polled.is_pending());
        tokio::time::advance(Duration::from_secs(61)).await;
        let polled = std::future::poll_fn(|context| {
            Poll::Ready(limit.limit::<usize>(Poll::Pending, context))
        })
        .await;
        let Poll::Ready(Err(error)) = polled else {
            panic!("the write should have failed");
        };
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
        let found = WriteStalled::find_in(&error).expect("the stall is in the error");
        assert_eq!(found.waiting_for, Side::Client);
        assert!(stalled.is_marked());
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_deadline_follows_the_last_byte() {
        let progress = ExchangeProgress::new();
        let start = Instant::now();
        let timeout = Duration::from_secs(60);
        assert_eq!(progress.idle_deadline(timeout), start + timeout);
        tokio::time::advance(Duration::from_secs(5)).await;
        progress.advanced();
        assert_eq!(
            progress.idle_deadline(timeout),
            start + Duration::from_secs(5) + timeout
        );
    }
}
