//! The ring: one chunk event (a 1 KiB `Bytes` clone) pushed and popped on one thread, and the
//! same with 2 producer threads pushing while 1 consumer drains, as the proxy's workers and the
//! collector do. Times are per event; under contention a push refused because the ring was full
//! counts as an event too (capture drops, it never waits) and the share refused is printed.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use scoretap_core::ring::{ring, CaptureEvent, CaptureStats, Direction, Ring, RingReceiver};

const SLOTS: usize = 4096;
const BUDGET_BYTES: u64 = 64 << 20;

fn chunk(data: &Bytes) -> CaptureEvent {
    CaptureEvent::Chunk {
        exchange: 1,
        direction: Direction::Request,
        data: data.clone(),
    }
}

/// Pops one event, if any, and gives its bytes back.
fn pop(receiver: &RingReceiver) -> bool {
    match receiver.try_receive() {
        Ok(event) => {
            receiver.budget.release(event.budget_bytes());
            drop(black_box(event));
            true
        }
        Err(_) => false,
    }
}

fn single_thread(c: &mut Criterion, data: &Bytes) {
    let (ring, receiver) = ring(SLOTS, BUDGET_BYTES, Arc::new(CaptureStats::default()));
    let mut group = c.benchmark_group("ring");
    group.throughput(Throughput::Elements(1));
    group.bench_function("push_pop/1_thread", |b| {
        b.iter(|| {
            black_box(ring.push(chunk(data)));
            pop(&receiver)
        });
    });
    group.finish();
}

/// 2 producers push `iterations` events in all while the consumer (this thread) drains; the
/// time until the last event is popped.
fn contended(ring: &Ring, receiver: &RingReceiver, data: &Bytes, iterations: u64) -> Duration {
    let done = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let producers: Vec<_> = [iterations / 2, iterations - iterations / 2]
        .into_iter()
        .map(|count| {
            let ring = ring.clone();
            let data = data.clone();
            std::thread::spawn(move || {
                for _ in 0..count {
                    black_box(ring.push(chunk(&data)));
                }
            })
        })
        .collect();
    let watcher = {
        let done = done.clone();
        std::thread::spawn(move || {
            for producer in producers {
                producer.join().expect("a producer never panics");
            }
            done.store(true, Ordering::Release);
        })
    };
    loop {
        if !pop(receiver) {
            if done.load(Ordering::Acquire) {
                while pop(receiver) {}
                break;
            }
            std::hint::spin_loop();
        }
    }
    let elapsed = start.elapsed();
    watcher.join().expect("the watcher never panics");
    elapsed
}

fn two_producers(c: &mut Criterion, data: &Bytes) {
    let stats = Arc::new(CaptureStats::default());
    let (ring, receiver) = ring(SLOTS, BUDGET_BYTES, stats.clone());
    let mut group = c.benchmark_group("ring");
    group.throughput(Throughput::Elements(1));
    let mut pushed = 0_u64;
    group.bench_function("push_pop/2_producers_1_consumer", |b| {
        b.iter_custom(|iterations| {
            pushed += iterations;
            contended(&ring, &receiver, data, iterations)
        });
    });
    group.finish();
    let dropped = stats.dropped_total();
    println!(
        "ring/push_pop/2_producers_1_consumer: {dropped} of {pushed} pushes refused ({:.2} %)",
        dropped as f64 * 100.0 / pushed.max(1) as f64
    );
}

fn ring_benches(c: &mut Criterion) {
    let data = Bytes::from(vec![7_u8; 1024]);
    single_thread(c, &data);
    two_producers(c, &data);
}

criterion_group!(benches, ring_benches);
criterion_main!(benches);
