//! The collector: a dedicated, named OS thread (not a task on the proxy's workers) that drains
//! the ring in batches, assembles each exchange, and writes its record.
//!
//! An exchange is written once both of its bodies have reported their end (or the client went
//! away before a response). Body bytes are hashed as they arrive; only a prefix of each body (up
//! to the record limit) is kept, and its bytes stay counted in the ring's byte budget until the
//! record is written, so everything capture holds is bounded by one number.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::TryRecvError;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use http::HeaderMap;

use crate::record::{
    assemble_into, BodyCapture, RecordInput, RequestPart, ResponsePart, MAXIMUM_RECORD_BYTES,
};
use crate::redaction::Redaction;
use crate::ring::{
    BodyEnd, ByteBudget, CaptureEvent, Direction, ExchangeId, ExchangeStart, ResponseStart,
    RingReceiver,
};
use crate::sink::TraceSink;

/// How the collector runs.
#[derive(Debug, Clone)]
pub struct CollectorSettings {
    pub service: String,
    pub redaction: Redaction,
    /// Records are flushed to the sink at least this often.
    pub flush_interval: Duration,
    /// An exchange with no event for this long is written as incomplete (its end was lost).
    pub exchange_timeout: Duration,
    /// Most exchanges assembled at once; past it the oldest is written as incomplete.
    pub maximum_open_exchanges: usize,
    /// The sink's dependency metrics.
    pub storage_metrics: Option<crate::metrics::StorageMetrics>,
}

impl Default for CollectorSettings {
    fn default() -> Self {
        Self {
            service: "scoring".into(),
            redaction: Redaction::default(),
            flush_interval: Duration::from_millis(100),
            exchange_timeout: Duration::from_secs(300),
            maximum_open_exchanges: 10_000,
            storage_metrics: None,
        }
    }
}

/// Most events handled between two looks at the clock.
const BATCH: usize = 1024;
/// The collector's first sleep when the ring runs empty; it doubles up to the flush interval.
const MINIMUM_IDLE_SLEEP: Duration = Duration::from_millis(1);

/// Starts the collector thread. It runs until every `Ring` sender is gone or `stop` is set, then
/// takes what is still queued, writes what it holds and returns.
pub fn spawn(
    receiver: RingReceiver,
    sink: Box<dyn TraceSink>,
    settings: CollectorSettings,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("scoretap-collector".into())
        .spawn(move || Collector::new(receiver, sink, settings).run(&stop))
}

/// One body as the collector assembles it.
struct BodyState {
    digest: aws_lc_rs::digest::Context,
    prefix: Vec<u8>,
    /// Bytes received from the ring.
    received: u64,
    /// The end, with the tee's byte count and whether capture gave up.
    end: Option<(BodyEnd, u64, bool)>,
    excluded: Option<&'static str>,
}

impl std::fmt::Debug for BodyState {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("BodyState")
            .field("prefix_bytes", &self.prefix.len())
            .field("received", &self.received)
            .field("ended", &self.end.is_some())
            .finish_non_exhaustive()
    }
}

impl BodyState {
    fn new(excluded: Option<&'static str>) -> Self {
        Self {
            digest: aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256),
            prefix: Vec::new(),
            received: 0,
            end: None,
            excluded,
        }
    }

    /// Takes a chunk: hashes it, keeps what fits in the prefix, and returns the bytes it does not
    /// keep (to give back to the budget now).
    fn take(&mut self, data: &[u8]) -> u64 {
        self.digest.update(data);
        self.received += data.len() as u64;
        let room = MAXIMUM_RECORD_BYTES.saturating_sub(self.prefix.len());
        let kept = room.min(data.len());
        self.prefix.extend_from_slice(&data[..kept]);
        (data.len() - kept) as u64
    }

    fn capture(self, content_type: Option<String>) -> (BodyCapture, Option<HeaderMap>) {
        let (end, size, lost) = match self.end {
            Some((end, size, lost)) => (Some(end), size, lost),
            None => (None, self.received, true),
        };
        let ended_normally = matches!(end, Some(BodyEnd::Complete | BodyEnd::Trailers(_)));
        let complete = ended_normally && !lost && self.excluded.is_none() && self.received == size;
        let sha256 = complete.then(|| {
            let mut digest = [0u8; 32];
            digest.copy_from_slice(self.digest.finish().as_ref());
            digest
        });
        let trailers = match end {
            Some(BodyEnd::Trailers(trailers)) => Some(trailers),
            _ => None,
        };
        (
            BodyCapture {
                size,
                sha256,
                content_type,
                prefix: self.prefix,
                complete: complete || (ended_normally && self.excluded.is_some()),
                excluded: self.excluded,
                blob: None,
            },
            trailers,
        )
    }
}

#[derive(Debug)]
struct OpenExchange {
    start: Box<ExchangeStart>,
    request: BodyState,
    response_head: Option<Box<ResponseStart>>,
    response: BodyState,
    /// The response ended (or the exchange was abandoned) at this instant.
    finished_at: Option<Instant>,
    abandoned: bool,
    last_event: Instant,
    /// Budget bytes of the heads this exchange holds.
    head_bytes: u64,
}

impl OpenExchange {
    fn body(&mut self, direction: Direction) -> &mut BodyState {
        match direction {
            Direction::Request => &mut self.request,
            Direction::Response => &mut self.response,
        }
    }

    fn is_done(&self) -> bool {
        self.request.end.is_some() && self.finished_at.is_some()
    }

    fn held_bytes(&self) -> u64 {
        (self.request.prefix.len() + self.response.prefix.len()) as u64 + self.head_bytes
    }
}

struct Collector {
    receiver: RingReceiver,
    sink: Box<dyn TraceSink>,
    settings: CollectorSettings,
    open: HashMap<ExchangeId, OpenExchange>,
    /// The record being written, reused from one record to the next.
    record: Vec<u8>,
    unflushed: bool,
    last_flush: Instant,
    last_sweep: Instant,
    write_error_logged: Option<Instant>,
}

impl Collector {
    fn new(receiver: RingReceiver, sink: Box<dyn TraceSink>, settings: CollectorSettings) -> Self {
        Self {
            receiver,
            sink,
            settings,
            open: HashMap::new(),
            record: Vec::with_capacity(MAXIMUM_RECORD_BYTES),
            unflushed: false,
            last_flush: Instant::now(),
            last_sweep: Instant::now(),
            write_error_logged: None,
        }
    }

    fn budget(&self) -> &Arc<ByteBudget> {
        &self.receiver.budget
    }

    /// Drains the ring by polling: it never blocks in the channel, so producers never pay for
    /// waking it (no futex, no context switch per event). While events flow it drains without
    /// sleeping; when the ring is empty it sleeps, longer the longer it stays idle.
    fn run(mut self, stop: &AtomicBool) {
        let mut idle_sleep = MINIMUM_IDLE_SLEEP;
        loop {
            if stop.load(Ordering::Acquire) {
                while let Ok(event) = self.receiver.receiver.try_recv() {
                    self.handle(event);
                }
                break;
            }
            let mut handled = 0;
            let mut disconnected = false;
            while handled < BATCH {
                match self.receiver.receiver.try_recv() {
                    Ok(event) => {
                        self.handle(event);
                        handled += 1;
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                }
            }
            self.maintain();
            if disconnected {
                break;
            }
            if handled == 0 {
                std::thread::sleep(idle_sleep);
                idle_sleep = (idle_sleep * 2).min(self.settings.flush_interval);
            } else {
                idle_sleep = MINIMUM_IDLE_SLEEP;
            }
        }
        let open: Vec<ExchangeId> = self.open.keys().copied().collect();
        for exchange in open {
            self.write(exchange);
        }
        self.flush();
    }

    fn maintain(&mut self) {
        let now = Instant::now();
        if self.unflushed && now.duration_since(self.last_flush) >= self.settings.flush_interval {
            self.flush();
        }
        if now.duration_since(self.last_sweep) >= Duration::from_secs(1) {
            self.last_sweep = now;
            let timeout = self.settings.exchange_timeout;
            let stale: Vec<ExchangeId> = self
                .open
                .iter()
                .filter(|(_, open)| now.duration_since(open.last_event) >= timeout)
                .map(|(exchange, _)| *exchange)
                .collect();
            for exchange in stale {
                self.write(exchange);
            }
        }
    }

    fn flush(&mut self) {
        let started = Instant::now();
        let result = self.sink.flush();
        if let Some(metrics) = &self.settings.storage_metrics {
            metrics
                .write_duration
                .record(started.elapsed().as_secs_f64());
            match &result {
                Ok(()) => metrics.write_ok.increment(1),
                Err(_) => metrics.write_error.increment(1),
            }
        }
        if let Err(error) = result {
            self.log_write_error(&error);
        }
        self.unflushed = false;
        self.last_flush = Instant::now();
    }

    fn handle(&mut self, event: CaptureEvent) {
        match event {
            CaptureEvent::Start(start) => {
                if self.open.len() >= self.settings.maximum_open_exchanges {
                    if let Some(oldest) = self
                        .open
                        .iter()
                        .min_by_key(|(_, open)| open.last_event)
                        .map(|(exchange, _)| *exchange)
                    {
                        self.write(oldest);
                    }
                }
                let exchange = start.exchange;
                let head_bytes = start.budget_bytes();
                let request = BodyState::new(start.request_body_excluded);
                self.open.insert(
                    exchange,
                    OpenExchange {
                        start,
                        request,
                        response_head: None,
                        response: BodyState::new(None),
                        finished_at: None,
                        abandoned: false,
                        last_event: Instant::now(),
                        head_bytes,
                    },
                );
            }
            CaptureEvent::Response(head) => {
                let bytes = head.budget_bytes();
                match self.open.get_mut(&head.exchange) {
                    Some(open) => {
                        open.response = BodyState::new(head.body_excluded);
                        open.response_head = Some(head);
                        open.last_event = Instant::now();
                        open.head_bytes += bytes;
                    }
                    None => self.budget().release(bytes),
                }
            }
            CaptureEvent::Chunk {
                exchange,
                direction,
                data,
            } => {
                let length = data.len() as u64;
                let released = match self.open.get_mut(&exchange) {
                    Some(open) => {
                        open.last_event = Instant::now();
                        open.body(direction).take(&data)
                    }
                    None => length,
                };
                drop(data);
                self.budget().release(released);
            }
            CaptureEvent::End {
                exchange,
                direction,
                end,
                size,
                lost,
                at,
            } => {
                if let Some(open) = self.open.get_mut(&exchange) {
                    open.last_event = Instant::now();
                    open.body(direction).end = Some((end, size, lost));
                    if direction == Direction::Response {
                        open.finished_at = Some(at);
                    }
                    if open.is_done() {
                        self.write(exchange);
                    }
                }
            }
            CaptureEvent::Abandoned { exchange, at } => {
                if let Some(open) = self.open.get_mut(&exchange) {
                    open.last_event = Instant::now();
                    open.abandoned = true;
                    open.finished_at = Some(at);
                    if open.is_done() {
                        self.write(exchange);
                    }
                }
            }
        }
    }

    /// Assembles and writes one exchange, and gives its prefix bytes back to the budget.
    fn write(&mut self, exchange: ExchangeId) {
        let Some(open) = self.open.remove(&exchange) else {
            return;
        };
        let held = open.held_bytes();
        let mut record = std::mem::take(&mut self.record);
        let outcome = assemble_exchange(open, &self.settings, &mut record);
        self.budget().release(held);
        let written = self.sink.write_record(&record);
        self.record = record;
        let stats = &self.receiver.stats;
        match written {
            Ok(()) => {
                stats.records_written.fetch_add(1, Ordering::Relaxed);
                if let Some(index) = crate::metrics::OUTCOMES.iter().position(|o| *o == outcome) {
                    stats.records_by_outcome[index].fetch_add(1, Ordering::Relaxed);
                }
                self.unflushed = true;
            }
            Err(error) => {
                stats.record_write_failures.fetch_add(1, Ordering::Relaxed);
                self.log_write_error(&error);
            }
        }
    }

    fn log_write_error(&mut self, error: &std::io::Error) {
        let now = Instant::now();
        let quiet = self
            .write_error_logged
            .is_some_and(|last| now.duration_since(last) < Duration::from_secs(10));
        if !quiet {
            self.write_error_logged = Some(now);
            tracing::error!("writing trace records failed: {error}");
        }
    }
}

fn content_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}

/// Writes the record of a finished (or given-up) exchange into `record`; returns its outcome.
fn assemble_exchange(
    open: OpenExchange,
    settings: &CollectorSettings,
    record: &mut Vec<u8>,
) -> &'static str {
    let OpenExchange {
        start,
        request,
        response_head,
        response,
        finished_at,
        abandoned,
        last_event,
        head_bytes: _,
    } = open;
    let duration = finished_at
        .unwrap_or(last_event)
        .saturating_duration_since(start.at);
    let id = uuid::Uuid::now_v7().to_string();
    let request_end_error = match &request.end {
        Some((BodyEnd::Error(message), _, _)) => Some(message.clone()),
        _ => None,
    };
    let (request_body, _) = request.capture(content_type(&start.headers));

    let response_end_error = match &response.end {
        Some((BodyEnd::Error(message), _, _)) => Some(message.clone()),
        _ => None,
    };
    let response_cancelled = matches!(&response.end, Some((BodyEnd::Cancelled, _, _)));
    let response_body_and_trailers = response_head
        .as_ref()
        .map(|head| response.capture(content_type(&head.headers)));

    let mut outcome = response_head
        .as_ref()
        .map_or("client_cancelled", |head| head.outcome);
    let mut error: Option<(&str, String)> = response_head.as_ref().and_then(|head| {
        head.error
            .as_ref()
            .map(|(kind, message)| (*kind, message.clone()))
    });
    // A client whose own body failed (it reset or went away mid-upload) cancelled the exchange,
    // whatever the upstream then made of the cut request.
    if let Some(message) = request_end_error {
        if outcome != "ok" || response_cancelled {
            outcome = "client_cancelled";
            error = Some(("client_body_error", message));
        }
    }
    if outcome == "ok" {
        if let Some(message) = response_end_error {
            outcome = "upstream_error";
            error = Some(("upstream_body_error", message));
        } else if response_cancelled {
            outcome = "client_cancelled";
        }
    }
    if abandoned && response_head.is_none() {
        error = Some((
            "client_cancelled",
            "the client went away before the response".to_owned(),
        ));
    }
    if finished_at.is_none() && error.is_none() {
        error = Some((
            "capture_incomplete",
            "the end of this exchange was not captured".to_owned(),
        ));
    }

    let response_part = match (&response_head, &response_body_and_trailers) {
        (Some(head), Some((body, trailers))) => Some(ResponsePart {
            status: head.status,
            headers: &head.headers,
            body,
            trailers: trailers.as_ref(),
        }),
        _ => None,
    };
    let input = RecordInput {
        id: &id,
        correlation_id: &start.correlation_id,
        service: &settings.service,
        started_at: start.started_at,
        duration_ms: duration.as_secs_f64() * 1000.0,
        outcome,
        error: error
            .as_ref()
            .map(|(kind, message)| (*kind, message.as_str())),
        request: RequestPart {
            method: &start.method,
            path: &start.path,
            query: start.query.as_deref(),
            http_version: start.http_version,
            headers: &start.headers,
            body: &request_body,
        },
        response: response_part,
    };
    assemble_into(&input, &settings.redaction, MAXIMUM_RECORD_BYTES, record);
    outcome
}
