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

use crate::ring::{BodyEnd, CaptureEvent, Direction, ExchangeId, Ring};

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
        }
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
        self.finish(BodyEnd::Cancelled);
    }
}

pin_project! {
    /// A body that forwards `inner` and, when `tap` is set, tees it to capture.
    #[derive(Debug)]
    pub struct TeeBody<B> {
        #[pin]
        inner: B,
        tap: Option<BodyTap>,
    }
}

impl<B: Body> TeeBody<B> {
    /// Forwards `inner`, capturing it when `tap` is given. A body that is empty from the start
    /// (hyper will never poll it) is reported complete at once.
    pub fn new(inner: B, mut tap: Option<BodyTap>) -> Self {
        if inner.is_end_stream() {
            if let Some(tap) = tap.as_mut() {
                tap.finish(BodyEnd::Complete);
            }
        }
        Self { inner, tap }
    }
}

impl<B> Body for TeeBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
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
        let Some(tap) = this.tap.as_mut() else {
            return polled;
        };
        match &polled {
            Poll::Pending => {}
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    tap.on_data(data);
                    if inner.is_end_stream() {
                        tap.finish(BodyEnd::Complete);
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    tap.finish(BodyEnd::Trailers(trailers.clone()));
                }
            }
            Poll::Ready(Some(Err(error))) => tap.finish(BodyEnd::Error(error.to_string())),
            Poll::Ready(None) => tap.finish(BodyEnd::Complete),
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
