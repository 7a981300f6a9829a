//! The tee's cost per frame: a body of N data frames polled to its end directly, through a
//! `TeeBody` as the proxy builds it with capture off (the metrics meter only) and with capture
//! on (meter and tap: each frame a `Bytes` clone pushed into the ring). Only the polling is
//! timed; the ring is drained between iterations, outside the timing, so the collector's side
//! is not counted here (see the `ring` bench).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::hint::black_box;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http_body::{Body, Frame};
use scoretap_core::metrics::Metrics;
use scoretap_core::ring::{ring, CaptureEvent, CaptureStats, Direction, RingReceiver};
use scoretap_core::tee::{BodyMeter, BodyTap, TeeBody};

/// A body of prepared data frames.
struct Frames(VecDeque<Bytes>);

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|data| Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

fn frames(count: usize, frame: &Bytes) -> Frames {
    Frames(std::iter::repeat_n(frame.clone(), count).collect())
}

/// Polls a body to its end, as hyper does.
fn drain<B: Body<Data = Bytes> + Unpin>(mut body: B) -> usize {
    let mut context = Context::from_waker(Waker::noop());
    let mut bytes = 0;
    while let Poll::Ready(Some(Ok(frame))) = Pin::new(&mut body).poll_frame(&mut context) {
        if let Some(data) = frame.data_ref() {
            bytes += data.len();
        }
        if body.is_end_stream() {
            break;
        }
    }
    black_box(bytes)
}

/// Takes every event off the ring and gives its bytes back, as the collector does.
fn empty_ring(receiver: &RingReceiver) {
    while let Ok(event) = receiver.try_receive() {
        if let CaptureEvent::Chunk { data, .. } = event {
            receiver.budget.release(data.len() as u64);
        }
    }
}

fn tee_frame(c: &mut Criterion) {
    let metrics = Metrics::disabled();
    let mut group = c.benchmark_group("tee_frame");
    for (frame_count, frame_bytes) in [(64_usize, 1024_usize), (64, 16 * 1024)] {
        let frame = Bytes::from(vec![b'x'; frame_bytes]);
        let label = format!("{frame_count}x{}KiB", frame_bytes / 1024);
        group.throughput(Throughput::Elements(frame_count as u64));
        group.bench_function(BenchmarkId::new("direct", &label), |b| {
            b.iter_batched(
                || frames(frame_count, &frame),
                drain,
                criterion::BatchSize::SmallInput,
            );
        });
        group.bench_function(BenchmarkId::new("capture_off", &label), |b| {
            b.iter_batched(
                || {
                    TeeBody::new(
                        frames(frame_count, &frame),
                        None,
                        Some(BodyMeter::request(metrics.clone())),
                    )
                },
                drain,
                criterion::BatchSize::SmallInput,
            );
        });
        let (ring, receiver) = ring(8192, 64 << 20, Arc::new(CaptureStats::default()));
        group.bench_function(BenchmarkId::new("capture_on", &label), |b| {
            b.iter_custom(|iterations| {
                let mut timed = Duration::ZERO;
                for _ in 0..iterations {
                    let body = frames(frame_count, &frame);
                    let tap = BodyTap::new(ring.clone(), 1, Direction::Request, true, u64::MAX);
                    let meter = BodyMeter::request(metrics.clone());
                    let start = Instant::now();
                    drain(TeeBody::new(body, Some(tap), Some(meter)));
                    timed += start.elapsed();
                    empty_ring(&receiver);
                }
                timed
            });
        });
        assert_eq!(ring.stats().dropped_total(), 0, "the ring never filled");
    }
    group.finish();
}

criterion_group!(benches, tee_frame);
criterion_main!(benches);
