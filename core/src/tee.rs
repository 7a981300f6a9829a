//! The tee: a body wrapper that forwards every frame unchanged and hands a clone of each data
//! frame (`Bytes::clone`, a reference count — no copy) to the capture ring.
//!
//! It reports the end of the body to the collector exactly once, as one of [`BodyEnd`]:
//! complete, trailers, error, or cancelled (dropped before the end). hyper may stop polling a
//! body once `is_end_stream()` is true and never poll it to `None`, so the end is also reported
//! as soon as the inner body says it has ended.
//!
//! # What arrived together is forwarded together
//!
//! After a data frame, if the inner body does not yet know it has ended, the tee polls it once
//! more without waiting (a peek). If the body has ended, `is_end_stream()` is true as the frame
//! is handed over, and hyper writes the frame and the end of the body together (on HTTP/1.1 the
//! last chunk and the `0\r\n\r\n` terminator in one write): a client that closes as soon as it
//! has read the last event (the OpenAI Python client does so on `data: [DONE]`) finds the
//! response already complete. A peek that finds another frame keeps it (a reference count, no
//! copy) for the next poll, which hyper makes at once; a peek that finds nothing yet changes
//! nothing, so no frame waits for a peek.
//!
//! A response's tee dropped before its body was polled to the end looks once more, without
//! waiting: a body whose end had already arrived, every byte of it handed on, is complete, not
//! cancelled (the client closed after it had everything, before hyper wrote the end). The end
//! may also be on its way: hyper's upstream connection decodes a chunked body's end only after
//! the last chunk was taken, on its own task, which may not have run yet when the client's close
//! is seen. A tee made [`TeeBody::lingering`] then hands the body to a task that waits up to
//! [`LINGER`] for it: its end, before any more data, makes the body complete.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

use crate::access_log::ResponseEnd;
use crate::metrics::{method_index, Metrics};
use crate::progress::{ClientStall, ResponseBodyError};
use crate::ring::{BodyEnd, CaptureEvent, Direction, ExchangeId, Ring};

/// How a body's error is told to the collector.
pub trait BodyErrorEnd: std::fmt::Display {
    /// The end recorded for a body that failed with this error.
    fn body_end(&self) -> BodyEnd {
        BodyEnd::Error(self.to_string())
    }
}

impl BodyErrorEnd for hyper::Error {}

impl BodyErrorEnd for std::convert::Infallible {}

impl BodyErrorEnd for std::io::Error {}

impl BodyErrorEnd for crate::error::RequestBodyError {}

impl BodyErrorEnd for ResponseBodyError {
    fn body_end(&self) -> BodyEnd {
        match self {
            ResponseBodyError::Idle { waiting_for, after } => BodyEnd::Idle {
                waiting_for: *waiting_for,
                after: *after,
            },
            ResponseBodyError::Upstream(error) => BodyEnd::Error(error.to_string()),
        }
    }
}

/// The capturing side of a tee: where the frames go, and what has been seen.
#[derive(Debug)]
pub struct BodyTap {
    ring: Ring,
    exchange: ExchangeId,
    direction: Direction,
    /// Bytes that crossed, captured or not.
    size: u64,
    /// Chunks still go to the ring (false when excluded, past the limit, or after a drop).
    capturing: bool,
    /// Capture was given up before the end.
    lost: bool,
    maximum_bytes: u64,
    finished: bool,
    /// The client connection's stall flag: a body dropped because its client stopped reading
    /// is recorded as such, not as a cancellation.
    client_stall: Option<ClientStall>,
    idle_after: std::time::Duration,
}

impl BodyTap {
    /// A tap for one body. `capture_bytes` false records only the size and the end (a body
    /// excluded by content type).
    pub fn new(
        ring: Ring,
        exchange: ExchangeId,
        direction: Direction,
        capture_bytes: bool,
        maximum_bytes: u64,
    ) -> Self {
        Self {
            ring,
            exchange,
            direction,
            size: 0,
            capturing: capture_bytes,
            lost: false,
            maximum_bytes,
            finished: false,
            client_stall: None,
            idle_after: std::time::Duration::ZERO,
        }
    }

    /// Records a body dropped after `stall` was marked as ended by a client that stopped
    /// reading for `after` (the body idle timeout).
    pub fn with_client_stall(mut self, stall: ClientStall, after: std::time::Duration) -> Self {
        self.client_stall = Some(stall);
        self.idle_after = after;
        self
    }

    fn on_data(&mut self, data: &Bytes) {
        self.size += data.len() as u64;
        if !self.capturing || data.is_empty() {
            return;
        }
        if self.size > self.maximum_bytes {
            self.capturing = false;
            self.lost = true;
            return;
        }
        let event = CaptureEvent::Chunk {
            exchange: self.exchange,
            direction: self.direction,
            data: data.clone(),
        };
        if !self.ring.push(event) {
            // A gap would make the prefix and the digest wrong: stop capturing this body.
            self.capturing = false;
            self.lost = true;
        }
    }

    /// Reports the end of the body; only the first call has an effect.
    fn finish(&mut self, end: BodyEnd) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.ring.push(CaptureEvent::End {
            exchange: self.exchange,
            direction: self.direction,
            end,
            size: self.size,
            lost: self.lost,
            at: Instant::now(),
        });
    }
}

impl Drop for BodyTap {
    fn drop(&mut self) {
        let end = match &self.client_stall {
            Some(stall) if stall.is_marked() => BodyEnd::Idle {
                waiting_for: crate::progress::Side::Client,
                after: self.idle_after,
            },
            _ => BodyEnd::Cancelled,
        };
        self.finish(end);
    }
}

/// Measures one body for the metrics: its size, and for a response the exchange's end. Reports
/// once, at the body's end or when it is dropped (a cancelled exchange still counts).
#[derive(Debug)]
pub struct BodyMeter {
    metrics: Arc<Metrics>,
    size: u64,
    measured: Measured,
    reported: bool,
    /// Held until the report: the exchange's unit of `scoretap_requests_in_flight`.
    in_flight: Option<crate::metrics::GaugeUnit>,
    /// The exchange's access log line, written at the report.
    access_log: Option<Box<crate::access_log::AccessLogEntry>>,
}

#[derive(Debug)]
enum Measured {
    Request,
    Response {
        method: usize,
        status: StatusCode,
        started: Instant,
    },
}

impl BodyMeter {
    /// Measures a request body.
    pub fn request(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            size: 0,
            measured: Measured::Request,
            reported: false,
            in_flight: None,
            access_log: None,
        }
    }

    /// Measures a response body and, at its end, the whole exchange.
    pub fn response(
        metrics: Arc<Metrics>,
        method: &http::Method,
        status: StatusCode,
        started: Instant,
    ) -> Self {
        Self {
            metrics,
            size: 0,
            measured: Measured::Response {
                method: method_index(method),
                status,
                started,
            },
            reported: false,
            in_flight: None,
            access_log: None,
        }
    }

    /// Keeps the exchange counted in flight until this meter reports.
    pub fn holding(mut self, in_flight: crate::metrics::GaugeUnit) -> Self {
        self.in_flight = Some(in_flight);
        self
    }

    /// Writes the exchange's access log line at the report.
    pub fn logging(mut self, entry: Option<Box<crate::access_log::AccessLogEntry>>) -> Self {
        self.access_log = entry;
        self
    }

    fn report(&mut self, end: ResponseEnd) {
        if self.reported {
            return;
        }
        self.reported = true;
        self.in_flight = None;
        if let (Some(entry), Measured::Response { started, .. }) =
            (self.access_log.take(), &self.measured)
        {
            entry.finish(self.size, started.elapsed(), end);
        }
        match &self.measured {
            Measured::Request => self.metrics.request_body(self.size),
            Measured::Response {
                method,
                status,
                started,
            } => {
                self.metrics.response_body(self.size);
                self.metrics
                    .exchange_finished(*method, *status, started.elapsed().as_secs_f64());
            }
        }
    }
}

impl Drop for BodyMeter {
    fn drop(&mut self) {
        self.report(ResponseEnd::Dropped);
    }
}

/// What a peek found after a data frame, kept for the next poll.
type Peeked<B> = Option<Result<Frame<<B as Body>::Data>, <B as Body>::Error>>;

/// Takes over a body dropped before its end, with its tap (see [`linger_for_end`]).
pub type Linger<B> = fn(Pin<&mut B>, BodyTap);

/// How long a body dropped before its end is given for an end that may be on its way.
pub const LINGER: Duration = Duration::from_millis(100);

/// Waits, on a task of its own, up to [`LINGER`] for the next frame of `body`, whose tee was
/// dropped before its end: if it is the end, every byte had been handed on and the body is
/// reported complete; anything else (data the client never got, no end in time, no runtime)
/// reports it cancelled.
pub fn linger_for_end<B>(mut body: B, mut tap: BodyTap)
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Send,
{
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        use http_body_util::BodyExt as _;
        if let Ok(None) = tokio::time::timeout(LINGER, body.frame()).await {
            tap.finish(BodyEnd::Complete);
        }
    });
}

pin_project! {
    /// A body that forwards `inner`, measures it when `meter` is set, and tees it to capture
    /// when `tap` is set.
    pub struct TeeBody<B: Body> {
        #[pin]
        inner: B,
        tap: Option<BodyTap>,
        meter: Option<BodyMeter>,
        // What the last peek found: `Some(None)` is the end of the body.
        peeked: Option<Peeked<B>>,
        // Takes the body and its tap over when the tee is dropped before the end, the end
        // perhaps on its way.
        linger: Option<Linger<B>>,
    }

    impl<B: Body> PinnedDrop for TeeBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // Only a response is looked at: a request body's wrapper counts what it reads
            // against the client's limit, and a frame read now would be counted, never sent.
            let Some(tap) = this
                .tap
                .as_mut()
                .filter(|tap| !tap.finished && tap.direction == Direction::Response)
            else {
                return;
            };
            let mut inner = this.inner;
            let next = match this.peeked.take() {
                Some(peeked) => Poll::Ready(peeked),
                None if inner.is_end_stream() => Poll::Ready(None),
                None => {
                    let mut context = Context::from_waker(std::task::Waker::noop());
                    inner.as_mut().poll_frame(&mut context)
                }
            };
            match next {
                Poll::Ready(None) => tap.finish(BodyEnd::Complete),
                // Data, trailers or an error the client never got: the tap reports cancelled.
                Poll::Ready(Some(_)) => {}
                Poll::Pending => {
                    if let (Some(linger), Some(tap)) = (this.linger.take(), this.tap.take()) {
                        linger(inner, tap);
                    }
                }
            }
        }
    }
}

impl<B: Body> std::fmt::Debug for TeeBody<B>
where
    B: std::fmt::Debug,
{
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("TeeBody")
            .field("inner", &self.inner)
            .field("tap", &self.tap)
            .field("meter", &self.meter)
            .field("peeked", &self.peeked.is_some())
            .finish()
    }
}

impl<B: Body> TeeBody<B> {
    /// Forwards `inner`, capturing it when `tap` is given and measuring it when `meter` is. A
    /// body that is empty from the start (hyper will never poll it) is reported complete at once.
    pub fn new(inner: B, mut tap: Option<BodyTap>, mut meter: Option<BodyMeter>) -> Self {
        if inner.is_end_stream() {
            if let Some(tap) = tap.as_mut() {
                tap.finish(BodyEnd::Complete);
            }
            if let Some(meter) = meter.as_mut() {
                meter.report(ResponseEnd::Complete);
            }
        }
        Self {
            inner,
            tap,
            meter,
            peeked: None,
            linger: None,
        }
    }

    /// Dropped before its end with the end perhaps on its way, the tee hands the body and its
    /// tap to `linger` (which moves the body out, e.g. to [`linger_for_end`]).
    pub fn lingering(mut self, linger: Linger<B>) -> Self {
        self.linger = Some(linger);
        self
    }
}

impl<B> Body for TeeBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: BodyErrorEnd,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let mut inner = this.inner;
        let polled = match this.peeked.take() {
            Some(peeked) => Poll::Ready(peeked),
            None => inner.as_mut().poll_frame(context),
        };
        let ended = match &polled {
            Poll::Pending => false,
            Poll::Ready(Some(Ok(frame))) => match frame.data_ref() {
                Some(data) => {
                    if let Some(meter) = this.meter.as_mut() {
                        meter.size += data.len() as u64;
                    }
                    if let Some(tap) = this.tap.as_mut() {
                        tap.on_data(data);
                    }
                    inner.is_end_stream() || {
                        // Peek: did the end (or more) arrive with this frame?
                        match inner.as_mut().poll_frame(context) {
                            Poll::Pending => false,
                            Poll::Ready(next) => {
                                let end = next.is_none();
                                *this.peeked = Some(next);
                                end
                            }
                        }
                    }
                }
                None => frame.is_trailers(),
            },
            Poll::Ready(Some(Err(_)) | None) => true,
        };
        if ended {
            if let Some(meter) = this.meter.as_mut() {
                meter.report(match &polled {
                    Poll::Ready(Some(Err(_))) => ResponseEnd::Failed,
                    _ => ResponseEnd::Complete,
                });
            }
            if let Some(tap) = this.tap.as_mut() {
                tap.finish(match &polled {
                    Poll::Ready(Some(Ok(frame))) => match frame.trailers_ref() {
                        Some(trailers) => BodyEnd::Trailers(trailers.clone()),
                        None => BodyEnd::Complete,
                    },
                    Poll::Ready(Some(Err(error))) => error.body_end(),
                    _ => BodyEnd::Complete,
                });
            }
        }
        polled
    }

    /// True once the inner body has ended, or a peek found its end.
    fn is_end_stream(&self) -> bool {
        match &self.peeked {
            Some(peeked) => peeked.is_none(),
            None => self.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.inner.size_hint();
        if let Some(Some(Ok(frame))) = &self.peeked {
            // A frame the peek holds is still to come.
            let held = frame.data_ref().map_or(0, |data| data.len() as u64);
            let lower = hint.lower().saturating_add(held);
            if let Some(upper) = hint.upper() {
                // Raised first: a lower bound above the upper one would be refused.
                hint.set_upper(upper.saturating_add(held));
            }
            hint.set_lower(lower);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;
    use crate::ring::{ring, CaptureStats, RingReceiver};

    type Polled = Poll<Option<Result<Frame<Bytes>, std::io::Error>>>;

    /// A body that answers each poll from a script, then with its end.
    #[derive(Debug)]
    struct Scripted(VecDeque<Polled>);

    impl Body for Scripted {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> Polled {
            self.get_mut().0.pop_front().unwrap_or(Poll::Ready(None))
        }
    }

    fn data(text: &'static str) -> Polled {
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(text.as_bytes())))))
    }

    fn tee(script: Vec<Polled>) -> (TeeBody<Scripted>, RingReceiver) {
        let (ring, receiver) = ring(64, 1 << 20, Arc::new(CaptureStats::default()));
        let tap = BodyTap::new(ring, 1, Direction::Response, true, u64::MAX);
        (
            TeeBody::new(Scripted(script.into()), Some(tap), None),
            receiver,
        )
    }

    fn poll(body: &mut TeeBody<Scripted>) -> Option<Bytes> {
        let mut context = Context::from_waker(std::task::Waker::noop());
        match Pin::new(body).poll_frame(&mut context) {
            Poll::Ready(Some(Ok(frame))) => frame.into_data().ok(),
            Poll::Ready(None) => None,
            other => panic!("unexpected {other:?}"),
        }
    }

    /// The ends the tap reported.
    fn ends(receiver: &RingReceiver) -> Vec<String> {
        let mut ends = Vec::new();
        while let Ok(event) = receiver.try_receive() {
            if let CaptureEvent::End { end, .. } = event {
                ends.push(format!("{end:?}"));
            }
        }
        ends
    }

    #[test]
    fn an_end_that_arrived_with_the_last_frame_is_handed_over_with_it() {
        let (mut body, receiver) = tee(vec![data("last"), Poll::Ready(None)]);
        assert_eq!(poll(&mut body).as_deref(), Some(&b"last"[..]));
        assert!(body.is_end_stream(), "the peek found the end");
        assert_eq!(ends(&receiver), ["Complete"]);
        assert_eq!(poll(&mut body), None);
        drop(body);
        assert!(ends(&receiver).is_empty(), "reported once");
    }

    #[test]
    fn a_peek_that_finds_nothing_yet_holds_nothing_back() {
        let (mut body, receiver) =
            tee(vec![data("a"), Poll::Pending, data("b"), Poll::Ready(None)]);
        assert_eq!(poll(&mut body).as_deref(), Some(&b"a"[..]));
        assert!(!body.is_end_stream());
        assert_eq!(poll(&mut body).as_deref(), Some(&b"b"[..]));
        assert!(body.is_end_stream());
        assert_eq!(ends(&receiver), ["Complete"]);
    }

    #[test]
    fn a_peek_that_finds_a_frame_keeps_it_for_the_next_poll() {
        let (mut body, receiver) = tee(vec![data("a"), data("bc"), Poll::Pending]);
        assert_eq!(poll(&mut body).as_deref(), Some(&b"a"[..]));
        assert!(!body.is_end_stream());
        assert_eq!(
            body.size_hint().lower(),
            2,
            "the kept frame is still to come"
        );
        assert_eq!(poll(&mut body).as_deref(), Some(&b"bc"[..]));
        assert_eq!(poll(&mut body), None);
        assert_eq!(ends(&receiver), ["Complete"]);
    }

    #[test]
    fn a_tee_dropped_after_its_end_arrived_is_complete() {
        let (mut body, receiver) = tee(vec![data("a"), Poll::Pending, Poll::Ready(None)]);
        assert_eq!(poll(&mut body).as_deref(), Some(&b"a"[..]));
        assert!(!body.is_end_stream());
        drop(body);
        assert_eq!(ends(&receiver), ["Complete"]);
    }

    #[test]
    fn a_tee_dropped_before_its_end_is_cancelled() {
        for script in [
            vec![data("a"), Poll::Pending, Poll::Pending],
            vec![data("a"), Poll::Pending, data("unsent")],
        ] {
            let (mut body, receiver) = tee(script);
            assert_eq!(poll(&mut body).as_deref(), Some(&b"a"[..]));
            drop(body);
            assert_eq!(ends(&receiver), ["Cancelled"]);
        }
    }

    fn linger(body: Pin<&mut Scripted>, tap: BodyTap) {
        linger_for_end(Scripted(std::mem::take(&mut body.get_mut().0)), tap);
    }

    #[tokio::test]
    async fn a_tee_dropped_with_its_end_on_its_way_lingers_for_it() {
        let cases = [
            (vec![data("a"), Poll::Pending, Poll::Pending], "Complete"),
            (
                vec![data("a"), Poll::Pending, Poll::Pending, data("unsent")],
                "Cancelled",
            ),
        ];
        for (script, reported) in cases {
            let (body, receiver) = tee(script);
            let mut body = body.lingering(linger);
            assert_eq!(poll(&mut body).as_deref(), Some(&b"a"[..]));
            drop(body);
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert_eq!(ends(&receiver), [reported]);
        }
    }
}
