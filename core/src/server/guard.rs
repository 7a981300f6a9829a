//! The connection guard: one per accepted client connection. It sits under hyper on the
//! connection's bytes and beside the service, and knows what hyper does not tell:
//!
//! - whether a request head is being read, and since when (the header read timeout: a client
//!   must send a whole head within `--header-read-timeout` of its first byte, or of connecting);
//! - whether the connection is idle — no request in flight — and since when (`--idle-timeout`
//!   for HTTP/1.1 keep-alive and for HTTP/2 connections without streams);
//! - what was ambiguous in each HTTP/1.1 head on the wire ([`HeadViolation`]), handed to the
//!   request it belongs to;
//! - the connection's slot of `--max-connections`, held as long as the bytes flow (an upgraded
//!   connection keeps it);
//! - how many HTTP/2 streams the client cancelled after scoretap had started them, which is
//!   rapid reset (CVE-2023-44487) when a client outpaces its allowance ([`CancelAllowance`]).

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::time::Instant;

use super::framing::{FramingEvent, RequestFraming};
use crate::headers::HeadViolation;
use crate::progress::{ClientStall, Side, WriteStall};

/// What the guard has learned the connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// HTTP/1.1 requests, heads followed on the wire.
    Http1,
    /// HTTP/2 (the preface came).
    Http2,
    /// HTTP/1.1 no longer followed (upgraded, or a head hyper refuses).
    Untracked,
}

/// What the wire showed of one request head, for the request it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HeadVerdict {
    violation: Option<HeadViolation>,
    /// The request asked to switch protocols: the tracker holds what follows until its answer.
    awaits_upgrade: bool,
}

/// What to do when the connection's deadline passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expiry {
    /// Drop the connection: an HTTP/1.1 client too slow with its head, or idle; an HTTP/2
    /// connection sent GOAWAY that is still open its grace after its last stream ended, or whose
    /// client goes on cancelling streams past its allowance regardless (it can only do that by
    /// ignoring the GOAWAY and opening new ones).
    Close,
    /// An idle HTTP/2 connection: GOAWAY, then close.
    GoAway,
    /// An HTTP/2 client cancelled streams faster than its [`CancelAllowance`]: GOAWAY, and the
    /// streams already in flight may finish. No penalty: a gateway cancelling on short deadlines
    /// in front of a slow model does this without any abuse, and a strike would delay every
    /// client behind it ([`crate::penalty`] is for streams reset before they were served).
    CancelledTooMany,
}

/// How a dispatched request ended, as far as the connection can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestEnd {
    /// Its response was handed to hyper whole (or failed on scoretap's side).
    Answered,
    /// It was dropped first: the client reset the stream or went away.
    Cancelled,
}

/// How many HTTP/2 streams a client may cancel after scoretap has started them, as a leaky
/// bucket: `burst` at once, refilled at `per_second`.
///
/// RFC 9113 §10.5: "An endpoint that doesn't monitor use of these features exposes itself to a
/// risk of denial of service. Implementations SHOULD track the use of these features and set
/// limits on their use." h2's own limit (`--h2-max-pending-reset-streams`) counts only streams
/// reset before they are accepted; a client whose resets the proxy keeps up with passes it, and
/// every stream it cancels has already started a request to the upstream. This counts those.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct CancelAllowance {
    pub burst: f64,
    pub per_second: f64,
}

impl CancelAllowance {
    /// A client may cancel every stream it may have open (`SETTINGS_MAX_CONCURRENT_STREAMS`)
    /// twice at once, and that many again every second: a client timing out all its requests
    /// together stays far inside it, one resetting streams as fast as it opens them does not.
    pub(crate) fn for_streams(max_concurrent_streams: u32) -> Self {
        let streams = f64::from(max_concurrent_streams.max(1));
        Self {
            burst: 2.0 * streams,
            per_second: streams,
        }
    }
}

#[derive(Debug)]
struct State {
    protocol: Protocol,
    connected: Instant,
    /// Requests dispatched whose response has not ended.
    in_flight: usize,
    /// At least one request was dispatched.
    served: bool,
    /// When the last in-flight request ended.
    idle_since: Instant,
    /// The first byte of a head still incomplete.
    head_started: Option<Instant>,
    /// One entry per head seen whole on the wire and not yet dispatched, in order.
    verdicts: VecDeque<HeadVerdict>,
    /// The cancellation bucket's level (HTTP/2 only), as of `cancelled_at`.
    cancelled: f64,
    cancelled_at: Instant,
    /// How many times the bucket overflowed (it empties each time).
    cancel_overflows: u32,
    /// The connection was sent GOAWAY: when, and how many overflows there had been by then.
    went_away: Option<(Instant, u32)>,
}

/// The limits the guard enforces.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GuardLimits {
    pub header_read: Duration,
    pub idle: Duration,
    pub cancelled_streams: CancelAllowance,
    /// `--max-header-bytes`: past it a head is refused with 431.
    pub maximum_head_bytes: usize,
    /// How long a connection sent GOAWAY has to close by itself once no stream is left.
    pub goaway_grace: Duration,
}

/// One connection's guard, shared by its IO, its service and its watchdog.
#[derive(Debug)]
pub(crate) struct ConnectionGuard {
    /// The HTTP/1.1 request framing on the wire. Locked before `state` where both are.
    framing: Mutex<RequestFraming>,
    state: Mutex<State>,
    /// Wakes the watchdog when the deadline may have moved earlier.
    changed: Notify,
    limits: GuardLimits,
}

impl ConnectionGuard {
    pub(crate) fn new(limits: GuardLimits) -> Arc<Self> {
        let now = Instant::now();
        Arc::new(Self {
            framing: Mutex::new(RequestFraming::new(limits.maximum_head_bytes)),
            state: Mutex::new(State {
                protocol: Protocol::Http1,
                connected: now,
                in_flight: 0,
                served: false,
                idle_since: now,
                head_started: None,
                verdicts: VecDeque::new(),
                cancelled: 0.0,
                cancelled_at: now,
                cancel_overflows: 0,
                went_away: None,
            }),
            changed: Notify::new(),
            limits,
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain data behind; keep using it.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn framing(&self) -> MutexGuard<'_, RequestFraming> {
        self.framing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Follows bytes the client sent; whether the connection is still followed.
    fn follow(&self, data: &[u8]) -> bool {
        let mut framing = self.framing();
        framing.feed(data, &mut |event| self.on_framing(event));
        framing.is_tracking()
    }

    /// The answer to a request that asked to switch protocols is known.
    fn upgrade_answered(&self, switched: bool) {
        self.framing()
            .upgrade_answered(switched, &mut |event| self.on_framing(event));
    }

    fn on_framing(&self, event: FramingEvent) {
        let mut state = self.state();
        match event {
            FramingEvent::HeadStarted => {
                state.head_started = Some(Instant::now());
                if state.in_flight == 0 {
                    drop(state);
                    self.changed.notify_one();
                }
            }
            FramingEvent::HeadComplete(violation) => {
                state.head_started = None;
                state.verdicts.push_back(HeadVerdict {
                    violation,
                    awaits_upgrade: false,
                });
            }
            FramingEvent::UpgradeRequested => {
                if let Some(verdict) = state.verdicts.back_mut() {
                    verdict.awaits_upgrade = true;
                }
            }
            // The head may still be coming: its deadline stays.
            FramingEvent::HeadTooLarge => {
                state.verdicts.push_back(HeadVerdict {
                    violation: Some(HeadViolation::HeadTooLarge),
                    awaits_upgrade: false,
                });
            }
            FramingEvent::Http2 => state.protocol = Protocol::Http2,
            FramingEvent::Untracked => {
                if state.protocol == Protocol::Http1 {
                    state.protocol = Protocol::Untracked;
                }
            }
        }
    }

    /// A request was dispatched: it is in flight until the returned token is dropped. On
    /// HTTP/1.1, also what the wire showed of its head.
    pub(crate) fn request_started(self: &Arc<Self>) -> (InFlight, Option<HeadViolation>) {
        let mut state = self.state();
        state.in_flight += 1;
        state.served = true;
        let verdict = match state.protocol {
            Protocol::Http1 => state.verdicts.pop_front(),
            Protocol::Untracked => {
                // No head is followed any more: the one being read, if any, is this one.
                state.head_started = None;
                state.verdicts.pop_front()
            }
            Protocol::Http2 => None,
        };
        let in_flight = InFlight {
            guard: Some(self.clone()),
            awaits_upgrade: verdict.is_some_and(|verdict| verdict.awaits_upgrade),
        };
        (in_flight, verdict.and_then(|verdict| verdict.violation))
    }

    fn request_finished(&self, end: RequestEnd) {
        let mut state = self.state();
        state.in_flight = state.in_flight.saturating_sub(1);
        let mut wake = false;
        if end == RequestEnd::Cancelled && state.protocol == Protocol::Http2 {
            let now = Instant::now();
            let CancelAllowance { burst, per_second } = self.limits.cancelled_streams;
            let leaked = now.duration_since(state.cancelled_at).as_secs_f64() * per_second;
            state.cancelled = (state.cancelled - leaked).max(0.0) + 1.0;
            state.cancelled_at = now;
            if state.cancelled > burst {
                state.cancel_overflows += 1;
                state.cancelled = 0.0;
                wake = true;
            }
        }
        if state.in_flight == 0 {
            state.idle_since = Instant::now();
            wake = true;
        }
        drop(state);
        if wake {
            self.changed.notify_one();
        }
    }

    /// The connection switched protocols: its bytes are no longer requests.
    fn upgraded(&self) {
        self.upgrade_answered(true);
        let mut state = self.state();
        state.protocol = Protocol::Untracked;
        state.head_started = None;
    }

    /// The connection was sent GOAWAY: from now on it only has its grace to close by itself.
    pub(crate) fn went_away(&self) {
        let mut state = self.state();
        if state.went_away.is_none() {
            state.went_away = Some((Instant::now(), state.cancel_overflows));
        }
        drop(state);
        self.changed.notify_one();
    }

    /// When the connection expires and what to do then; `None` while a request is in flight,
    /// unless the client cancelled too many streams (then at once).
    fn deadline(&self) -> Option<(Instant, Expiry)> {
        let state = self.state();
        if let Some((sent, overflows)) = state.went_away {
            // The streams in flight finish; a client that opens and cancels more regardless is
            // dropped at once.
            if state.cancel_overflows > overflows {
                return Some((state.cancelled_at, Expiry::Close));
            }
            if state.in_flight > 0 {
                return None;
            }
            return Some((
                state.idle_since.max(sent) + self.limits.goaway_grace,
                Expiry::Close,
            ));
        }
        if state.cancel_overflows > 0 {
            return Some((state.cancelled_at, Expiry::CancelledTooMany));
        }
        if state.in_flight > 0 {
            return None;
        }
        let GuardLimits {
            header_read, idle, ..
        } = self.limits;
        Some(match (state.protocol, state.head_started) {
            (Protocol::Http2, _) => (state.idle_since + idle, Expiry::GoAway),
            (_, Some(started)) => (started + header_read, Expiry::Close),
            (Protocol::Http1, None) if !state.served => {
                (state.connected + header_read, Expiry::Close)
            }
            (_, None) => (state.idle_since + idle, Expiry::Close),
        })
    }

    /// Resolves when the connection has expired.
    pub(crate) async fn expired(&self) -> Expiry {
        loop {
            let changed = self.changed.notified();
            match self.deadline() {
                None => changed.await,
                Some((at, expiry)) if at <= Instant::now() => return expiry,
                Some((at, _)) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = changed => {}
                    }
                }
            }
        }
    }
}

/// A dispatched request, in flight until dropped.
#[derive(Debug)]
pub(crate) struct InFlight {
    guard: Option<Arc<ConnectionGuard>>,
    /// The request asked to switch protocols, and the connection's bytes wait for the answer.
    awaits_upgrade: bool,
}

impl InFlight {
    /// The response is ready to go: `switched` when it switches protocols (101). Until a
    /// request that asked for an upgrade is answered, the framing tracker holds what follows it.
    pub(crate) fn responded(&self, switched: bool) {
        let Some(guard) = &self.guard else {
            return;
        };
        if switched {
            guard.upgraded();
        } else if self.awaits_upgrade {
            guard.upgrade_answered(false);
        }
    }

    fn finish(&mut self, end: RequestEnd) {
        if let Some(guard) = self.guard.take() {
            guard.request_finished(end);
        }
    }
}

impl Drop for InFlight {
    /// Dropped before its response ended: the client reset the stream or went away (or
    /// scoretap is stopping).
    fn drop(&mut self) {
        self.finish(RequestEnd::Cancelled);
    }
}

pin_project! {
    /// A response body that keeps its request in flight until it ends or is dropped.
    #[derive(Debug)]
    pub(crate) struct GuardedBody<B> {
        #[pin]
        inner: B,
        in_flight: InFlight,
    }
}

impl<B: Body> GuardedBody<B> {
    pub(crate) fn new(inner: B, mut in_flight: InFlight) -> Self {
        // hyper sends a body that is already over with the head, without polling it.
        if inner.is_end_stream() {
            in_flight.finish(RequestEnd::Answered);
        }
        Self { inner, in_flight }
    }
}

impl<B: Body<Data = Bytes>> Body for GuardedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(context);
        // hyper stops polling after the frame that leaves the body at its end (or after
        // trailers), and after an error, which is scoretap's or the upstream's, not the client's.
        let over = match &polled {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => true,
            Poll::Ready(Some(Ok(frame))) => frame.is_trailers() || this.inner.is_end_stream(),
            Poll::Pending => false,
        };
        if over {
            this.in_flight.finish(RequestEnd::Answered);
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

pin_project! {
    /// A client connection's byte stream as hyper reads and writes it: unchanged, followed by
    /// the guard. A write that stays pending for the body idle timeout (the client stopped
    /// reading) fails, which ends the connection, and marks [`ClientStall`].
    #[derive(Debug)]
    pub(crate) struct GuardedIo<S> {
        #[pin]
        inner: S,
        // The guard still follows the connection's requests.
        following: bool,
        guard: Arc<ConnectionGuard>,
        // The connection's slot of --max-connections, released with the connection.
        _slot: OwnedSemaphorePermit,
        write_stall: WriteStall,
    }
}

impl<S> GuardedIo<S> {
    pub(crate) fn new(
        inner: S,
        guard: Arc<ConnectionGuard>,
        slot: OwnedSemaphorePermit,
        write_timeout: Duration,
        client_stall: ClientStall,
    ) -> Self {
        Self {
            inner,
            following: true,
            guard,
            _slot: slot,
            write_stall: WriteStall::new(write_timeout, Side::Client).marking(client_stall),
        }
    }
}

impl<S: AsyncRead> AsyncRead for GuardedIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buffer.filled().len();
        let polled = this.inner.poll_read(context, buffer);
        if *this.following {
            let read = &buffer.filled()[before..];
            if !read.is_empty() {
                *this.following = this.guard.follow(read);
            }
        }
        polled
    }
}

impl<S: AsyncWrite> AsyncWrite for GuardedIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write(context, data);
        this.write_stall.limit(polled, context)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffers: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write_vectored(context, buffers);
        this.write_stall.limit(polled, context)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let polled = this.inner.poll_flush(context);
        this.write_stall.limit(polled, context)
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(context)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUTS: GuardLimits = GuardLimits {
        header_read: Duration::from_secs(10),
        idle: Duration::from_secs(60),
        cancelled_streams: CancelAllowance {
            burst: 10.0,
            per_second: 5.0,
        },
        maximum_head_bytes: 1024,
        goaway_grace: Duration::from_secs(5),
    };

    #[tokio::test(start_paused = true)]
    async fn deadlines_follow_the_connection() {
        let guard = ConnectionGuard::new(TIMEOUTS);
        let start = Instant::now();
        // A fresh connection must send a head within the header read timeout.
        assert_eq!(
            guard.deadline(),
            Some((start + TIMEOUTS.header_read, Expiry::Close))
        );
        guard.on_framing(FramingEvent::HeadStarted);
        guard.on_framing(FramingEvent::HeadComplete(None));
        let (in_flight, violation) = guard.request_started();
        assert_eq!(violation, None);
        assert_eq!(
            guard.deadline(),
            None,
            "no deadline while a request is in flight"
        );
        tokio::time::advance(Duration::from_secs(100)).await;
        drop(in_flight);
        let idle = Instant::now();
        assert_eq!(
            guard.deadline(),
            Some((idle + TIMEOUTS.idle, Expiry::Close))
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        guard.on_framing(FramingEvent::HeadStarted);
        assert_eq!(
            guard.deadline(),
            Some((
                idle + Duration::from_secs(5) + TIMEOUTS.header_read,
                Expiry::Close
            ))
        );
        tokio::time::advance(TIMEOUTS.header_read).await;
        assert_eq!(guard.expired().await, Expiry::Close);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_upgrade_keeps_the_connection_followed() {
        let guard = ConnectionGuard::new(TIMEOUTS);
        let upgrade = b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n";
        assert!(guard.follow(upgrade));
        let (in_flight, _) = guard.request_started();
        // A head starts before the answer: held, not yet timed.
        assert!(guard.follow(b"GET /slow HTTP/1.1\r\n"));
        tokio::time::advance(Duration::from_secs(3)).await;
        in_flight.responded(false);
        let resumed = Instant::now();
        drop(in_flight);
        assert_eq!(
            guard.deadline(),
            Some((resumed + TIMEOUTS.header_read, Expiry::Close)),
            "the held head is timed from the refusal"
        );
        // A violation ends the following (the connection closes after the refusal).
        assert!(!guard.follow(b"Host: h\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n"));
        assert_eq!(
            guard.request_started().1,
            Some(HeadViolation::DuplicateContentLength)
        );

        let granted = ConnectionGuard::new(TIMEOUTS);
        assert!(granted.follow(upgrade));
        let (in_flight, _) = granted.request_started();
        in_flight.responded(true);
        assert!(!granted.follow(b"GET / HTTP/1.1\nX: y\n\n"));
        assert_eq!(granted.state().verdicts.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn verdicts_go_to_their_requests_in_order() {
        let guard = ConnectionGuard::new(TIMEOUTS);
        guard.on_framing(FramingEvent::HeadComplete(None));
        guard.on_framing(FramingEvent::HeadComplete(Some(
            HeadViolation::BareLineFeed,
        )));
        assert_eq!(guard.request_started().1, None);
        assert_eq!(guard.request_started().1, Some(HeadViolation::BareLineFeed));
        assert_eq!(guard.request_started().1, None);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_http2_connections_go_away() {
        let guard = ConnectionGuard::new(TIMEOUTS);
        guard.on_framing(FramingEvent::Http2);
        let start = Instant::now();
        assert_eq!(
            guard.deadline(),
            Some((start + TIMEOUTS.idle, Expiry::GoAway))
        );
        let (first, _) = guard.request_started();
        let (second, _) = guard.request_started();
        drop(first);
        assert_eq!(guard.deadline(), None);
        drop(second);
        assert!(guard.deadline().is_some());
    }

    /// Cancels `n` requests on the guard at once (started and dropped before their response).
    fn cancel(guard: &Arc<ConnectionGuard>, n: usize) {
        let requests: Vec<_> = (0..n).map(|_| guard.request_started().0).collect();
        drop(requests);
    }

    #[tokio::test(start_paused = true)]
    async fn http2_clients_cancelling_past_their_allowance_are_cut_off() {
        let guard = ConnectionGuard::new(TIMEOUTS);
        guard.on_framing(FramingEvent::Http2);
        cancel(&guard, 10);
        assert_eq!(
            guard.deadline().map(|(_, expiry)| expiry),
            Some(Expiry::GoAway),
            "a burst within the allowance is not abuse"
        );
        let (open, _) = guard.request_started();
        cancel(&guard, 1);
        assert_eq!(
            guard.deadline().map(|(_, expiry)| expiry),
            Some(Expiry::CancelledTooMany),
            "one more is, even with a request in flight"
        );
        assert_eq!(guard.expired().await, Expiry::CancelledTooMany);
        drop(open);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_told_to_go_away_has_its_grace_once_its_last_stream_ends() {
        let grace = TIMEOUTS.goaway_grace;
        let guard = ConnectionGuard::new(TIMEOUTS);
        guard.on_framing(FramingEvent::Http2);
        let (slow, _) = guard.request_started();
        cancel(&guard, 11);
        assert_eq!(guard.expired().await, Expiry::CancelledTooMany);
        guard.went_away();
        assert_eq!(
            guard.deadline(),
            None,
            "no deadline while a stream is in flight"
        );
        // Its streams in flight may still be cancelled (fewer than the allowance).
        cancel(&guard, 5);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(guard.deadline(), None);
        drop(slow);
        let ended = Instant::now();
        assert_eq!(guard.expired().await, Expiry::Close);
        assert_eq!(Instant::now(), ended + grace);

        // Idle since long before the GOAWAY: the grace still runs from the GOAWAY.
        let idle = ConnectionGuard::new(TIMEOUTS);
        idle.on_framing(FramingEvent::Http2);
        tokio::time::advance(TIMEOUTS.idle).await;
        assert_eq!(idle.expired().await, Expiry::GoAway);
        let goaway = Instant::now();
        idle.went_away();
        assert_eq!(idle.expired().await, Expiry::Close);
        assert_eq!(Instant::now(), goaway + grace);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_cancelling_past_its_allowance_again_after_the_goaway_is_dropped() {
        let guard = ConnectionGuard::new(TIMEOUTS);
        guard.on_framing(FramingEvent::Http2);
        let (_slow, _) = guard.request_started();
        cancel(&guard, 11);
        assert_eq!(guard.expired().await, Expiry::CancelledTooMany);
        guard.went_away();
        cancel(&guard, 10);
        assert_eq!(
            guard.deadline(),
            None,
            "a full bucket again is not yet too many"
        );
        cancel(&guard, 1);
        assert_eq!(
            guard.deadline().map(|(_, expiry)| expiry),
            Some(Expiry::Close),
            "past the allowance again, with a stream in flight"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn cancelling_at_the_allowed_rate_goes_on_for_ever() {
        let guard = ConnectionGuard::new(TIMEOUTS);
        guard.on_framing(FramingEvent::Http2);
        for _ in 0..100 {
            cancel(&guard, 5);
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert_ne!(
            guard.deadline().map(|(_, expiry)| expiry),
            Some(Expiry::CancelledTooMany)
        );
        cancel(&guard, 11);
        assert_eq!(
            guard.deadline().map(|(_, expiry)| expiry),
            Some(Expiry::CancelledTooMany)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn answered_requests_and_http1_cancellations_are_not_counted() {
        let guard = ConnectionGuard::new(TIMEOUTS);
        guard.on_framing(FramingEvent::Http2);
        for _ in 0..100 {
            let (in_flight, _) = guard.request_started();
            // An empty body is over before hyper polls it.
            drop(GuardedBody::new(
                http_body_util::Empty::<Bytes>::new(),
                in_flight,
            ));
        }
        let (in_flight, _) = guard.request_started();
        let mut body = Box::pin(GuardedBody::new(
            http_body_util::Full::new(Bytes::from_static(b"answer")),
            in_flight,
        ));
        let frame = std::future::poll_fn(|context| body.as_mut().poll_frame(context)).await;
        assert!(frame.is_some_and(|frame| frame.is_ok()));
        // Full is at its end after its one frame: hyper would not poll again.
        drop(body);
        assert_eq!(
            guard.deadline().map(|(_, expiry)| expiry),
            Some(Expiry::GoAway)
        );

        let http1 = ConnectionGuard::new(TIMEOUTS);
        for _ in 0..100 {
            http1.on_framing(FramingEvent::HeadComplete(None));
            cancel(&http1, 1);
        }
        assert_eq!(
            http1.deadline().map(|(_, expiry)| expiry),
            Some(Expiry::Close)
        );
    }
}
