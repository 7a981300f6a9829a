//! The collector: a dedicated, named OS thread (not a task on the proxy's workers) that drains
//! the ring in batches, assembles each exchange, and writes its record.
//!
//! An exchange is written once both of its bodies have reported their end (or the client went
//! away before a response). Body bytes are hashed as they arrive; only a prefix of each body (up
//! to the record limit) is kept, and its bytes stay counted in the ring's byte budget until the
//! record is written, as do the exchange's heads and a fixed cost for its state
//! ([`crate::ring::OPEN_EXCHANGE_BYTES`]), so everything capture holds is bounded by one number.
//!
//! Bodies larger than a record can hold are **spilled**: streamed chunk by chunk, as they come
//! off the ring, to a staged file under the body key template (never assembled in memory); the
//! record's `blob` points at the stored object. A body that fits alone but is cut because both
//! bodies share the record's budget is written from the bytes already held.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::TryRecvError;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use http::HeaderMap;

use crate::progress::Side;
use crate::record::{
    assemble_into, BodyCapture, RecordFit, RecordInput, RequestPart, ResponsePart,
    MAXIMUM_RECORD_BYTES,
};
use crate::redaction::Redaction;
use crate::ring::{
    BodyEnd, ByteBudget, CaptureEvent, Direction, ExchangeId, ExchangeStart, ResponseStart,
    RingReceiver,
};
use crate::sink::{StoreLocation, TraceSink};
use crate::storage::key::{DateParts, KeyTemplate, KeyValues};
use crate::storage::staging::{StagedFile, Staging};

/// How the collector runs.
#[derive(Debug, Clone)]
pub struct CollectorSettings {
    pub service: String,
    pub redaction: Redaction,
    /// Records are flushed to the sink at least this often.
    pub flush_interval: Duration,
    /// An exchange with no event for this long is written as incomplete (its end was lost).
    pub exchange_timeout: Duration,
    /// The sink's dependency metrics.
    pub storage_metrics: Option<crate::metrics::StorageMetrics>,
    /// Where spilled bodies go; `None` when nothing is spilled (stdout, `--spill false`).
    pub spill: Option<SpillSettings>,
}

/// Where and how bodies are spilled.
#[derive(Debug, Clone)]
pub struct SpillSettings {
    pub staging: Arc<Staging>,
    pub store: StoreLocation,
    pub template: KeyTemplate,
    pub instance: String,
    /// `scoretap_spill_bytes_total{sink}`.
    pub spilled_bytes: ::metrics::Counter,
}

impl SpillSettings {
    fn key(&self, service: &str, trace_id: &str, date: &DateParts, direction: Direction) -> String {
        self.template.render(&KeyValues {
            service,
            instance: &self.instance,
            trace_id,
            direction: match direction {
                Direction::Request => "request",
                Direction::Response => "response",
            },
            date: *date,
            ..KeyValues::default()
        })
    }
}

impl Default for CollectorSettings {
    fn default() -> Self {
        Self {
            service: "scoring".into(),
            redaction: Redaction::default(),
            flush_interval: Duration::from_millis(100),
            exchange_timeout: Duration::from_secs(300),
            storage_metrics: None,
            spill: None,
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
    modeldata: Option<crate::storage::modeldata::ModeldataSink>,
    settings: CollectorSettings,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("scoretap-collector".into())
        .spawn(move || {
            let mut collector = Collector::new(receiver, sink, settings);
            collector.modeldata = modeldata;
            collector.run(&stop)
        })
}

/// A body's spill.
#[derive(Debug)]
enum Spill {
    /// Nothing spilled (yet).
    Idle,
    /// Chunks go to this file as they arrive.
    Writing(StagedFile),
    /// Spilled; the key of the stored object.
    Stored(String),
    /// Spilling failed or was refused (counted); the record has no `blob`.
    Failed,
}

/// The capture path's counters and byte budget, as a body's intake needs them.
#[derive(Debug, Clone, Copy)]
struct CaptureAccounts<'a> {
    stats: &'a crate::ring::CaptureStats,
    budget: &'a ByteBudget,
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
    spill: Spill,
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
            spill: Spill::Idle,
        }
    }

    /// Whether this chunk makes the body larger than a record can hold, so it must be spilled.
    fn must_start_spill(&self, chunk: usize) -> bool {
        matches!(self.spill, Spill::Idle)
            && self.excluded.is_none()
            && self.received + chunk as u64 > MAXIMUM_RECORD_BYTES as u64
    }

    /// Takes a chunk: hashes it, keeps what fits in the prefix, spills it when a spill runs
    /// (starting one with `start`, the new object's key, when the body outgrows the record).
    /// Returns the bytes to give back to the budget now.
    ///
    /// While a spill runs the prefix is not held in memory: the spilled file starts with it,
    /// and [`BodyState::seal_spill`] reads it back when the record is written. A thousand
    /// concurrent large uploads so hold no 64 KiB prefix each, only their file handles.
    fn take(
        &mut self,
        data: &[u8],
        spill: Option<&SpillSettings>,
        start: Option<String>,
        content_type: Option<&str>,
        capture: CaptureAccounts<'_>,
    ) -> u64 {
        self.digest.update(data);
        self.received += data.len() as u64;
        if matches!(self.spill, Spill::Writing(_)) {
            self.spill_part(data, spill, content_type, capture);
            return data.len() as u64;
        }
        let room = MAXIMUM_RECORD_BYTES.saturating_sub(self.prefix.len());
        let kept = room.min(data.len());
        if self.prefix.capacity() - self.prefix.len() < kept {
            // Grow by doubling, but never past what a record holds: `Vec`'s own doubling would
            // take a 64 KiB prefix to a 96 KiB allocation, and the budget counts 64 KiB.
            let wanted = (self.prefix.len() + kept)
                .max(self.prefix.capacity() * 2)
                .min(MAXIMUM_RECORD_BYTES);
            self.prefix.reserve_exact(wanted - self.prefix.len());
        }
        self.prefix.extend_from_slice(&data[..kept]);
        let mut released = (data.len() - kept) as u64;
        if let (Some(settings), Some(key)) = (spill, start) {
            // The body outgrew the record: the spill starts with what the prefix holds.
            let started = settings
                .staging
                .create(&key, content_type)
                .and_then(
                    |mut file| match settings.staging.write(&mut file, &self.prefix) {
                        Ok(()) => Ok(file),
                        Err(error) => {
                            settings.staging.discard(file, content_type);
                            Err(error)
                        }
                    },
                );
            match started {
                Ok(file) => {
                    settings.spilled_bytes.increment(self.prefix.len() as u64);
                    self.spill = Spill::Writing(file);
                    self.spill_part(&data[kept..], spill, content_type, capture);
                    if matches!(self.spill, Spill::Writing(_)) {
                        released += self.prefix.len() as u64;
                        self.prefix = Vec::new();
                    }
                }
                Err(error) => {
                    capture.stats.count_drop(error.drop_reason());
                    tracing::debug!("spilling {key} refused: {error}");
                    self.spill = Spill::Failed;
                }
            }
        }
        released
    }

    /// Appends part of a body to its running spill. If writing fails the spill is abandoned
    /// (counted), and the prefix the file held is read back into memory first, when the byte
    /// budget has room for it, so the record still shows it.
    fn spill_part(
        &mut self,
        part: &[u8],
        spill: Option<&SpillSettings>,
        content_type: Option<&str>,
        capture: CaptureAccounts<'_>,
    ) {
        let (Spill::Writing(file), Some(settings)) = (&mut self.spill, spill) else {
            return;
        };
        if part.is_empty() {
            return;
        }
        let error = match settings.staging.write(file, part) {
            Ok(()) => {
                settings.spilled_bytes.increment(part.len() as u64);
                return;
            }
            Err(error) => error,
        };
        capture.stats.count_drop(error.drop_reason());
        tracing::debug!("spilling {} stopped: {error}", file.key());
        let Spill::Writing(file) = std::mem::replace(&mut self.spill, Spill::Failed) else {
            return;
        };
        if self.prefix.is_empty() {
            let wanted = file.written().min(MAXIMUM_RECORD_BYTES as u64);
            if capture.budget.try_reserve(wanted) {
                self.prefix = read_back_prefix(settings, &file);
                capture.budget.release(wanted - self.prefix.len() as u64);
            }
        }
        settings.staging.discard(file, content_type);
    }

    /// Seals a running spill (complete or not: the stored object holds what crossed), first
    /// reading back the prefix the record shows. The read-back bytes are held only while the
    /// record is assembled (on this thread, right after), so they take nothing from the budget.
    fn seal_spill(&mut self, spill: Option<&SpillSettings>, content_type: Option<&str>) {
        if let (Spill::Writing(_), Some(settings)) = (&self.spill, spill) {
            if let Spill::Writing(file) = std::mem::replace(&mut self.spill, Spill::Failed) {
                self.prefix = read_back_prefix(settings, &file);
                let key = settings.staging.seal(file, content_type);
                self.spill = Spill::Stored(key);
            }
        }
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
                blob: match &self.spill {
                    Spill::Stored(key) => Some(key.clone()),
                    _ => None,
                },
            },
            trailers,
        )
    }
}

/// The start of a spilled body, read back from its staged file for the record (empty, and
/// logged, if it cannot be read: the record then shows no inline part).
fn read_back_prefix(settings: &SpillSettings, file: &StagedFile) -> Vec<u8> {
    settings
        .staging
        .read_prefix(file, MAXIMUM_RECORD_BYTES)
        .unwrap_or_else(|error| {
            tracing::debug!("reading back the prefix of {} failed: {error}", file.key());
            Vec::new()
        })
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
    /// The record's id, chosen at the start so spilled bodies can be named by it.
    trace_id: String,
    /// The UTC date of the start, for keys.
    date: DateParts,
}

impl OpenExchange {
    fn content_type(&self, direction: Direction) -> Option<&str> {
        let headers = match direction {
            Direction::Request => &self.start.headers,
            Direction::Response => &self.response_head.as_ref()?.headers,
        };
        headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
    }

    /// Takes one chunk of a body (see [`BodyState::take`]); returns the bytes to give back.
    fn take_chunk(
        &mut self,
        direction: Direction,
        data: &[u8],
        spill: Option<&SpillSettings>,
        service: &str,
        capture: CaptureAccounts<'_>,
    ) -> u64 {
        let content_type = self.content_type(direction).map(str::to_owned);
        let start = match spill {
            Some(settings) if self.body(direction).must_start_spill(data.len()) => {
                Some(settings.key(service, &self.trace_id, &self.date, direction))
            }
            _ => None,
        };
        self.body(direction)
            .take(data, spill, start, content_type.as_deref(), capture)
    }

    /// Seals both bodies' spills.
    fn seal_spills(&mut self, spill: Option<&SpillSettings>) {
        for direction in [Direction::Request, Direction::Response] {
            let content_type = self.content_type(direction).map(str::to_owned);
            self.body(direction)
                .seal_spill(spill, content_type.as_deref());
        }
    }

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
    modeldata: Option<crate::storage::modeldata::ModeldataSink>,
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
            modeldata: None,
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
                while let Ok(event) = self.receiver.try_receive() {
                    self.handle(event);
                }
                break;
            }
            let mut handled = 0;
            let mut disconnected = false;
            while handled < BATCH {
                match self.receiver.try_receive() {
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
        if let Err(error) = self.sink.close() {
            self.log_write_error(&error);
        }
        if let Some(modeldata) = self.modeldata.as_mut() {
            if let Err(error) = modeldata.close() {
                tracing::error!("sealing modeldata parts failed: {error}");
            }
        }
    }

    fn maintain(&mut self) {
        let now = Instant::now();
        if self.unflushed && now.duration_since(self.last_flush) >= self.settings.flush_interval {
            self.flush();
        }
        if now.duration_since(self.last_flush) >= self.settings.flush_interval {
            if let Err(error) = self.sink.maintain() {
                self.log_write_error(&error);
            }
            if let Some(modeldata) = self.modeldata.as_mut() {
                if let Err(error) = modeldata.maintain() {
                    tracing::error!("sealing modeldata parts failed: {error}");
                }
            }
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
        if let Some(modeldata) = self.modeldata.as_mut() {
            if let Err(error) = modeldata.flush() {
                tracing::error!("writing modeldata parts failed: {error}");
            }
        }
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
                // How many exchanges are open at once is bounded where they start (the ring's
                // byte budget and open-exchange limit): none is written early to make room.
                let exchange = start.exchange;
                let head_bytes = start.budget_bytes();
                let request = BodyState::new(start.request_body_excluded);
                self.open.insert(
                    exchange,
                    OpenExchange {
                        request,
                        response_head: None,
                        response: BodyState::new(None),
                        finished_at: None,
                        abandoned: false,
                        last_event: Instant::now(),
                        head_bytes,
                        trace_id: uuid::Uuid::now_v7().to_string(),
                        date: DateParts::of(start.started_at),
                        start,
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
                        open.take_chunk(
                            direction,
                            &data,
                            self.settings.spill.as_ref(),
                            &self.settings.service,
                            CaptureAccounts {
                                stats: &self.receiver.stats,
                                budget: &self.receiver.budget,
                            },
                        )
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

    /// Assembles and writes one exchange, and gives its bytes back to the budget and its place
    /// back to the open-exchange limit.
    fn write(&mut self, exchange: ExchangeId) {
        let Some(mut open) = self.open.remove(&exchange) else {
            return;
        };
        self.receiver.open_exchanges.release(1);
        let held = open.held_bytes();
        open.seal_spills(self.settings.spill.as_ref());
        let mut record = std::mem::take(&mut self.record);
        let outcome = assemble_exchange(
            open,
            &self.settings,
            self.modeldata.as_mut(),
            &self.receiver.stats,
            &mut record,
        );
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
            Err(crate::storage::staging::StagingError::SpoolFull { .. }) => {
                stats.count_drop(crate::ring::DropReason::SpoolFull);
            }
            Err(error) => {
                stats.record_write_failures.fetch_add(1, Ordering::Relaxed);
                self.log_write_error(&error);
            }
        }
    }

    fn log_write_error(&mut self, error: &crate::storage::staging::StagingError) {
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
    modeldata: Option<&mut crate::storage::modeldata::ModeldataSink>,
    stats: &crate::ring::CaptureStats,
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
        trace_id: id,
        date,
    } = open;
    let duration = finished_at
        .unwrap_or(last_event)
        .saturating_duration_since(start.at);
    let request_end_error = match &request.end {
        Some((BodyEnd::Error(message), _, _)) => Some(message.clone()),
        _ => None,
    };
    let (mut request_body, _) = request.capture(content_type(&start.headers));

    let response_end_error = match &response.end {
        Some((BodyEnd::Error(message), _, _)) => Some(message.clone()),
        _ => None,
    };
    let response_cancelled = matches!(&response.end, Some((BodyEnd::Cancelled, _, _)));
    let response_idle = match &response.end {
        Some((BodyEnd::Idle { waiting_for, after }, _, _)) => Some((*waiting_for, *after)),
        _ => None,
    };
    let mut response_body_and_trailers = response_head
        .as_ref()
        .map(|head| response.capture(content_type(&head.headers)));
    // Spilled keys become the store's URLs.
    if let Some(spill) = &settings.spill {
        let bodies = std::iter::once(&mut request_body)
            .chain(response_body_and_trailers.as_mut().map(|(body, _)| body));
        for body in bodies {
            if let Some(key) = body.blob.take() {
                body.blob = Some(spill.store.object_url(&key));
            }
        }
    }

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
        if let Some((waiting_for, after)) = response_idle {
            let message = crate::progress::idle_message(waiting_for, after);
            (outcome, error) = match waiting_for {
                Side::Client => ("client_cancelled", Some(("client_idle_timeout", message))),
                Side::Upstream => ("upstream_timeout", Some(("upstream_idle_timeout", message))),
            };
        } else if let Some(message) = response_end_error {
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

    // At most twice: a body that fits alone but was cut because both bodies share the record is
    // then spilled from the bytes already held, and the record written again with its `blob`.
    for attempt in 0..2 {
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
            correlation_id: start.correlation_id.to_str().unwrap_or_default(),
            service: &settings.service,
            started_at: start.started_at,
            duration_ms: duration.as_secs_f64() * 1000.0,
            outcome,
            error: error
                .as_ref()
                .map(|(kind, message)| (*kind, message.as_str())),
            request: RequestPart {
                method: start.method.as_str(),
                path: start.uri.path(),
                query: start.uri.query(),
                http_version: start.http_version,
                headers: &start.headers,
                body: &request_body,
            },
            response: response_part,
        };
        let fit = assemble_into(&input, &settings.redaction, MAXIMUM_RECORD_BYTES, record);
        let Some(spill) = settings
            .spill
            .as_ref()
            .filter(|_| attempt == 0 && fit == RecordFit::Cut)
        else {
            break;
        };
        let response_body = response_body_and_trailers.as_mut().map(|(body, _)| body);
        if !spill_cut_bodies(
            spill,
            &settings.service,
            &id,
            &date,
            record,
            &mut request_body,
            response_body,
            stats,
        ) {
            break;
        }
    }
    if let Some(modeldata) = modeldata {
        let timestamp = crate::record::format_started_at(start.started_at);
        let response = response_head
            .as_ref()
            .zip(response_body_and_trailers.as_ref())
            .map(|(head, (body, _))| (head.status, body));
        modeldata.write_exchange(
            &timestamp,
            start.correlation_id.to_str().unwrap_or_default(),
            &request_body,
            response,
        );
    }
    outcome
}

/// Whether a body may be spilled from its prefix: whole, captured, not stored yet.
fn spillable_from_prefix(body: &BodyCapture) -> bool {
    body.complete
        && body.blob.is_none()
        && body.excluded.is_none()
        && body.size > 0
        && body.prefix.len() as u64 == body.size
}

/// Spills the bodies the record cut (`truncated: true`) from the bytes held; `true` when it
/// stored any, so the record is written again.
#[allow(clippy::too_many_arguments)]
fn spill_cut_bodies(
    spill: &SpillSettings,
    service: &str,
    trace_id: &str,
    date: &DateParts,
    record: &[u8],
    request_body: &mut BodyCapture,
    response_body: Option<&mut BodyCapture>,
    stats: &crate::ring::CaptureStats,
) -> bool {
    let candidates = spillable_from_prefix(request_body)
        || response_body.as_deref().is_some_and(spillable_from_prefix);
    const TRUNCATED: &[u8] = b"\"truncated\":true";
    if !candidates
        || !record
            .windows(TRUNCATED.len())
            .any(|window| window == TRUNCATED)
    {
        return false;
    }
    let Ok(parsed) = serde_json::from_slice::<serde_json::Value>(record) else {
        return false;
    };
    let mut stored = false;
    let bodies = [
        (Direction::Request, Some(request_body)),
        (Direction::Response, response_body),
    ];
    for (direction, body) in bodies {
        let Some(body) = body else { continue };
        let part = match direction {
            Direction::Request => "request",
            Direction::Response => "response",
        };
        let cut = parsed[part]["body"]["truncated"].as_bool() == Some(true);
        if !cut || !spillable_from_prefix(body) {
            continue;
        }
        let key = spill.key(service, trace_id, date, direction);
        match spill
            .staging
            .write_whole(&key, &body.prefix, body.content_type.as_deref())
        {
            Ok(key) => {
                spill.spilled_bytes.increment(body.prefix.len() as u64);
                body.blob = Some(spill.store.object_url(&key));
                stored = true;
            }
            Err(error) => {
                stats.count_drop(error.drop_reason());
                tracing::debug!("spilling {key} refused: {error}");
            }
        }
    }
    stored
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_exchange_costs_no_more_than_the_budget_counts() {
        // The map holds its entries inline, at worst half full after it grew; the record id is
        // a 36-character string.
        let entry = std::mem::size_of::<(ExchangeId, OpenExchange)>() as u64;
        let state = 2 * entry + 36;
        assert!(
            state <= crate::ring::OPEN_EXCHANGE_BYTES,
            "an open exchange holds {state} bytes, the budget counts {}",
            crate::ring::OPEN_EXCHANGE_BYTES
        );
    }

    /// Records kept in memory.
    #[derive(Debug, Clone, Default)]
    struct MemorySink(Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

    impl TraceSink for MemorySink {
        fn write_record(
            &mut self,
            record: &[u8],
        ) -> Result<(), crate::storage::staging::StagingError> {
            if let Ok(mut records) = self.0.lock() {
                records.push(record.to_vec());
            }
            Ok(())
        }

        fn flush(&mut self) -> Result<(), crate::storage::staging::StagingError> {
            Ok(())
        }
    }

    /// Slow exchanges all open at once (10,050 started before the first answers, past the
    /// 10,000 the collector once held before writing the oldest as incomplete): every one is
    /// written only at its end, with its response.
    #[test]
    fn many_open_exchanges_are_written_at_their_end_with_their_response() {
        const OPEN: u64 = 10_050;
        let stats = Arc::new(crate::ring::CaptureStats::default());
        let (_ring, receiver) = crate::ring::ring(1 << 20, 1 << 40, stats);
        let sink = MemorySink::default();
        let mut collector = Collector::new(
            receiver,
            Box::new(sink.clone()),
            CollectorSettings::default(),
        );
        for exchange in 1..=OPEN {
            collector.handle(CaptureEvent::Start(Box::new(ExchangeStart {
                exchange,
                at: Instant::now(),
                started_at: std::time::SystemTime::now(),
                correlation_id: http::HeaderValue::from_static("slow"),
                method: http::Method::POST,
                uri: http::Uri::from_static("/score"),
                http_version: "HTTP/1.1",
                headers: HeaderMap::new(),
                request_body_excluded: None,
            })));
        }
        let end = |exchange, direction| CaptureEvent::End {
            exchange,
            direction,
            end: BodyEnd::Complete,
            size: 0,
            lost: false,
            at: Instant::now(),
        };
        for exchange in 1..=OPEN {
            collector.handle(end(exchange, Direction::Request));
            collector.handle(CaptureEvent::Response(Box::new(ResponseStart {
                exchange,
                status: http::StatusCode::OK,
                headers: HeaderMap::new(),
                outcome: "ok",
                error: None,
                body_excluded: None,
            })));
            collector.handle(end(exchange, Direction::Response));
        }
        let records = sink
            .0
            .lock()
            .map(|records| records.clone())
            .unwrap_or_default();
        assert_eq!(records.len() as u64, OPEN);
        let without_response = records
            .iter()
            .filter_map(|record| serde_json::from_slice::<serde_json::Value>(record).ok())
            .filter(|record| record["response"]["status"] != 200 || record["outcome"] != "ok")
            .count();
        assert_eq!(
            without_response, 0,
            "records of answered exchanges without their response"
        );
    }
}
