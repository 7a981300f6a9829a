//! The tee: a body wrapper that forwards every frame unchanged and hands a clone of each data
//! frame (`Bytes::clone`, a reference count — no copy) to the capture ring.
//!
//! It reports the end of the body to the collector exactly once, as one of [`BodyEnd`]:
//! complete, trailers, error, or cancelled (dropped before the end). hyper may stop polling a
//! body once `is_end_stream()` is true and never poll it to `None`, so the end is also reported
//! as soon as the inner body says it has ended.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use std::sync::Arc;

use http::StatusCode;

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
        }
    }

    fn report(&mut self) {
        if self.reported {
            return;
        }
        self.reported = true;
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
        self.report();
    }
}

pin_project! {
    /// A body that forwards `inner`, measures it when `meter` is set, and tees it to capture
    /// when `tap` is set.
    #[derive(Debug)]
    pub struct TeeBody<B> {
        #[pin]
        inner: B,
        tap: Option<BodyTap>,
        meter: Option<BodyMeter>,
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
                meter.report();
            }
        }
        Self { inner, tap, meter }
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
        let polled = inner.as_mut().poll_frame(context);
        if this.tap.is_none() && this.meter.is_none() {
            return polled;
        }
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
                    inner.is_end_stream()
                }
                None => frame.is_trailers(),
            },
            Poll::Ready(Some(Err(_)) | None) => true,
        };
        if ended {
            if let Some(meter) = this.meter.as_mut() {
                meter.report();
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

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
