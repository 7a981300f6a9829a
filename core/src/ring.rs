//! The bounded queue between the proxy's request path and the collector thread.
//!
//! Three limits bound it: a number of slots (every event takes one), a byte budget (body bytes
//! of chunk events, the heads and state of every exchange the collector holds open, and the
//! prefixes it keeps until it writes a record), and a number of open exchanges. Pushing never
//! blocks and never allocates per byte: a chunk is a `Bytes` clone (a reference count).
//!
//! The queue underneath is std's list channel, which allocates blocks of slots as it fills and
//! frees them as the collector empties them: an idle ring of 65,536 slots takes no memory (an
//! array channel would hold all of them, about 9 MiB, from the start). The slot limit is a
//! counter beside it.
//!
//! # When full
//!
//! [`WhenFull::DropNewest`] is the only policy: the event being pushed is dropped, the drop is
//! counted by reason, and the body it belonged to stops being captured (its record says
//! `complete: false`). The client's bytes are never delayed: capture falls behind, traffic does
//! not.
//!
//! Only two kinds of event can be refused: an exchange's start (the exchange is then not
//! captured at all) and a body chunk. Once an exchange's start is accepted, the events that say
//! what happened to it (its response head, the ends of its bodies, its abandonment) are never
//! refused, so a record never claims what did not happen (a completed answer recorded as a
//! cancelled one, or as having no response). They are tiny and at most three per exchange, and
//! the exchanges captured at once are bounded (by the byte budget, which each open exchange's
//! state counts against, and by a count): they take their slot even past the slot limit, and
//! the start sets [`RESPONSE_HEAD_ROOM`] bytes aside for the head (a larger head takes the rest
//! even past the byte budget).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};

/// What the ring does with an event when it is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Drop the event being pushed, count it, mark its body incomplete. Never block.
    DropNewest,
}

/// Identifies one exchange between its events.
pub type ExchangeId = u64;

/// Which body of an exchange an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Request,
    Response,
}

/// How a body ended: exactly one of these is reported per body.
#[derive(Debug)]
pub enum BodyEnd {
    /// The body ended normally.
    Complete,
    /// The body ended with trailers.
    Trailers(HeaderMap),
    /// Reading the body failed (reset, malformed framing).
    Error(String),
    /// The body was dropped before its end (client gone, upstream answered early).
    Cancelled,
    /// No byte crossed either way for the body idle timeout: the exchange was ended, and the
    /// side it was waiting for is named.
    Idle {
        waiting_for: crate::progress::Side,
        after: std::time::Duration,
    },
}

/// The request half of an exchange, known when it starts.
#[derive(Debug)]
pub struct ExchangeStart {
    pub exchange: ExchangeId,
    pub at: Instant,
    pub started_at: std::time::SystemTime,
    /// Held as the proxy has them (reference-counted clones, no copy on the request path);
    /// read as text by the collector.
    pub correlation_id: HeaderValue,
    pub method: Method,
    /// The request target: its path and query are recorded.
    pub uri: Uri,
    pub http_version: &'static str,
    pub headers: HeaderMap,
    /// Why the request body is not captured, if it is not.
    pub request_body_excluded: Option<&'static str>,
}

/// The response head, as the client receives it.
#[derive(Debug)]
pub struct ResponseStart {
    pub exchange: ExchangeId,
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// The outcome so far: "ok", "upstream_error", "upstream_timeout", "proxy_error".
    pub outcome: &'static str,
    /// `(kind, message)` of the proxy's error, if it made the answer.
    pub error: Option<(&'static str, String)>,
    /// Why the response body is not captured, if it is not.
    pub body_excluded: Option<&'static str>,
}

/// One event on its way to the collector.
#[derive(Debug)]
pub enum CaptureEvent {
    Start(Box<ExchangeStart>),
    Response(Box<ResponseStart>),
    Chunk {
        exchange: ExchangeId,
        direction: Direction,
        data: Bytes,
    },
    End {
        exchange: ExchangeId,
        direction: Direction,
        end: BodyEnd,
        /// Bytes of this body that crossed the proxy, counted whether or not captured.
        size: u64,
        /// Capture of this body was given up before its end (ring full, size limit).
        lost: bool,
        at: Instant,
    },
    /// The exchange ended without a response (the client went away while waiting).
    Abandoned {
        exchange: ExchangeId,
        at: Instant,
    },
}

/// Roughly what a header map holds in memory.
fn header_bytes(headers: &HeaderMap) -> u64 {
    headers
        .iter()
        .map(|(name, value)| (name.as_str().len() + value.len() + 32) as u64)
        .sum()
}

/// What the collector holds for each open exchange besides its heads and body prefixes: its
/// state, the two running digests, the map entry and the record id (checked against their
/// sizes by a collector test).
pub const OPEN_EXCHANGE_BYTES: u64 = 1536;

/// Bytes an exchange's start sets aside for its response head, so the head always has room.
pub const RESPONSE_HEAD_ROOM: u64 = 1024;

impl ExchangeStart {
    /// An estimate of what this head holds in memory.
    pub fn head_bytes(&self) -> u64 {
        256 + header_bytes(&self.headers)
            + self
                .uri
                .path_and_query()
                .map_or(0, |target| target.as_str().len()) as u64
    }

    /// What an open exchange takes from the byte budget from its start until its record is
    /// written: its request head, the collector's state for it, and the room set aside for its
    /// response head.
    pub fn budget_bytes(&self) -> u64 {
        self.head_bytes() + OPEN_EXCHANGE_BYTES + RESPONSE_HEAD_ROOM
    }
}

impl ResponseStart {
    /// An estimate of what this head holds in memory.
    pub fn head_bytes(&self) -> u64 {
        128 + header_bytes(&self.headers)
    }

    /// What the head takes from the byte budget beyond the room its exchange's start set aside.
    pub fn budget_bytes(&self) -> u64 {
        self.head_bytes().saturating_sub(RESPONSE_HEAD_ROOM)
    }
}

impl CaptureEvent {
    /// What the event takes from the byte budget: body bytes of a chunk, an estimate of the
    /// heads and of the collector's state for the exchange (held until the record is written).
    /// Ends take none.
    pub fn budget_bytes(&self) -> u64 {
        match self {
            CaptureEvent::Chunk { data, .. } => data.len() as u64,
            CaptureEvent::Start(start) => start.budget_bytes(),
            CaptureEvent::Response(head) => head.budget_bytes(),
            CaptureEvent::End { .. } | CaptureEvent::Abandoned { .. } => 0,
        }
    }

    /// Whether the event says what happened to an exchange already captured (its response
    /// head, a body's end, its abandonment): such events are never refused.
    fn follows_up(&self) -> bool {
        matches!(
            self,
            CaptureEvent::Response(_) | CaptureEvent::End { .. } | CaptureEvent::Abandoned { .. }
        )
    }
}

/// Why an event was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Every slot was taken.
    RingFullSlots,
    /// The byte budget was spent.
    RingFullBytes,
    /// The collector has stopped.
    CollectorStopped,
    /// The spool's disk budget was spent (a remote store is down or slow).
    SpoolFull,
    /// Writing locally failed (disk full, permissions, too many open files).
    StorageError,
    /// As many exchanges as `--capture-max-open-exchanges` were already being captured: a new
    /// one is not captured.
    OpenExchangesFull,
}

impl DropReason {
    pub const ALL: [DropReason; 6] = [
        DropReason::RingFullSlots,
        DropReason::RingFullBytes,
        DropReason::CollectorStopped,
        DropReason::SpoolFull,
        DropReason::StorageError,
        DropReason::OpenExchangesFull,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::RingFullSlots => "ring_full_slots",
            DropReason::RingFullBytes => "ring_full_bytes",
            DropReason::CollectorStopped => "collector_stopped",
            DropReason::SpoolFull => "spool_full",
            DropReason::StorageError => "storage_error",
            DropReason::OpenExchangesFull => "open_exchanges_full",
        }
    }
}

/// Counters of the capture path, shared by the proxy, the collector and the admin endpoints.
#[derive(Debug, Default)]
pub struct CaptureStats {
    pub records_written: AtomicU64,
    pub record_write_failures: AtomicU64,
    /// Records written, by outcome, in the order of [`crate::metrics::OUTCOMES`].
    pub records_by_outcome: [AtomicU64; 5],
    dropped: [AtomicU64; DropReason::ALL.len()],
}

impl CaptureStats {
    pub fn count_drop(&self, reason: DropReason) {
        self.dropped[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason as usize].load(Ordering::Relaxed)
    }

    pub fn dropped_total(&self) -> u64 {
        DropReason::ALL
            .iter()
            .map(|reason| self.dropped(*reason))
            .sum()
    }
}

/// A budget of units taken and given back without a lock: the ring's body bytes (shared with
/// the collector's kept prefixes), and its slots (one unit per event).
#[derive(Debug)]
pub struct ByteBudget {
    used: AtomicU64,
    capacity: u64,
}

impl ByteBudget {
    pub fn new(capacity: u64) -> Self {
        Self {
            used: AtomicU64::new(0),
            capacity,
        }
    }

    /// Takes `bytes` from the budget, or returns false (taking nothing) if they do not fit.
    pub fn try_reserve(&self, bytes: u64) -> bool {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let Some(next) = used
                .checked_add(bytes)
                .filter(|next| *next <= self.capacity)
            else {
                return false;
            };
            match self
                .used
                .compare_exchange_weak(used, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(actual) => used = actual,
            }
        }
    }

    /// Takes `units` whether or not they fit: for what is never refused, whose room was set
    /// aside earlier.
    pub fn take(&self, units: u64) {
        if units > 0 {
            self.used.fetch_add(units, Ordering::AcqRel);
        }
    }

    /// Gives `bytes` back.
    pub fn release(&self, bytes: u64) {
        if bytes > 0 {
            self.used.fetch_sub(bytes, Ordering::AcqRel);
        }
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }
}

/// The producer side of the ring, cloned into every tee.
#[derive(Debug, Clone)]
pub struct Ring {
    sender: Sender<CaptureEvent>,
    /// Events in the ring against its slot limit, counted as a budget of one unit per event.
    slots: Arc<ByteBudget>,
    /// Exchanges started and not yet written by the collector, one unit each.
    open_exchanges: Arc<ByteBudget>,
    /// Set when the receiver is dropped: a push then reports the collector stopped.
    receiver_dropped: Arc<AtomicBool>,
    budget: Arc<ByteBudget>,
    stats: Arc<CaptureStats>,
}

/// The consumer side, owned by the collector thread.
#[derive(Debug)]
pub struct RingReceiver {
    receiver: Receiver<CaptureEvent>,
    slots: Arc<ByteBudget>,
    /// The collector gives an exchange back when it writes its record.
    pub open_exchanges: Arc<ByteBudget>,
    receiver_dropped: Arc<AtomicBool>,
    pub budget: Arc<ByteBudget>,
    pub stats: Arc<CaptureStats>,
}

impl RingReceiver {
    /// Takes the oldest event without waiting, giving its slot back (its bytes stay taken
    /// until the collector releases them).
    pub fn try_receive(&self) -> Result<CaptureEvent, TryRecvError> {
        let event = self.receiver.try_recv()?;
        self.slots.release(1);
        Ok(event)
    }
}

impl Drop for RingReceiver {
    fn drop(&mut self) {
        self.receiver_dropped.store(true, Ordering::Release);
    }
}

/// The default most exchanges captured at once (`--capture-max-open-exchanges`). The byte
/// budget, which each open exchange's state counts against, usually binds first.
pub const DEFAULT_MAXIMUM_OPEN_EXCHANGES: usize = 100_000;

/// The limits of a ring.
#[derive(Debug, Clone, Copy)]
pub struct RingLimits {
    /// Events it holds.
    pub slots: usize,
    /// Its byte budget, shared with what the collector holds.
    pub bytes: u64,
    /// Exchanges captured at once (started, record not yet written).
    pub open_exchanges: usize,
}

/// Makes a ring of `slots` events and `capacity_bytes` body bytes.
pub fn ring(slots: usize, capacity_bytes: u64, stats: Arc<CaptureStats>) -> (Ring, RingReceiver) {
    ring_with_limits(
        RingLimits {
            slots,
            bytes: capacity_bytes,
            open_exchanges: DEFAULT_MAXIMUM_OPEN_EXCHANGES,
        },
        stats,
    )
}

/// Makes a ring with these limits.
pub fn ring_with_limits(limits: RingLimits, stats: Arc<CaptureStats>) -> (Ring, RingReceiver) {
    let (sender, receiver) = std::sync::mpsc::channel();
    let slots = Arc::new(ByteBudget::new(limits.slots.max(1) as u64));
    let open_exchanges = Arc::new(ByteBudget::new(limits.open_exchanges.max(1) as u64));
    let receiver_dropped = Arc::new(AtomicBool::new(false));
    let budget = Arc::new(ByteBudget::new(limits.bytes));
    (
        Ring {
            sender,
            slots: slots.clone(),
            open_exchanges: open_exchanges.clone(),
            receiver_dropped: receiver_dropped.clone(),
            budget: budget.clone(),
            stats: stats.clone(),
        },
        RingReceiver {
            receiver,
            slots,
            open_exchanges,
            receiver_dropped,
            budget,
            stats,
        },
    )
}

/// The policy in force; see the module documentation.
pub const WHEN_FULL: WhenFull = WhenFull::DropNewest;

impl Ring {
    /// Pushes an event without waiting; on a refusal the event is dropped and counted, and
    /// false is returned.
    ///
    /// A start takes its [`CaptureEvent::budget_bytes`] from the byte budget, one open exchange
    /// and a slot, or is refused. A chunk takes its bytes and a slot, or is refused. A follow-up
    /// (response head, end, abandonment) is refused only when the collector has stopped: it
    /// takes its slot even past the limit, and a head takes from the byte budget only what it
    /// needs beyond the [`RESPONSE_HEAD_ROOM`] its start set aside.
    pub fn push(&self, event: CaptureEvent) -> bool {
        let WhenFull::DropNewest = WHEN_FULL;
        if self.receiver_dropped.load(Ordering::Acquire) {
            self.stats.count_drop(DropReason::CollectorStopped);
            return false;
        }
        let bytes = event.budget_bytes();
        let open = u64::from(matches!(event, CaptureEvent::Start(_)));
        if event.follows_up() {
            self.budget.take(bytes);
            self.slots.take(1);
        } else if let Some(reason) = self.reserve(bytes, open) {
            self.stats.count_drop(reason);
            return false;
        }
        match self.sender.send(event) {
            Ok(()) => true,
            Err(_) => {
                self.slots.release(1);
                self.open_exchanges.release(open);
                self.budget.release(bytes);
                self.stats.count_drop(DropReason::CollectorStopped);
                false
            }
        }
    }

    /// Takes `bytes`, a slot and `open` exchanges, all or none; the reason of a refusal.
    fn reserve(&self, bytes: u64, open: u64) -> Option<DropReason> {
        if open > 0 && !self.open_exchanges.try_reserve(open) {
            return Some(DropReason::OpenExchangesFull);
        }
        if bytes > 0 && !self.budget.try_reserve(bytes) {
            self.open_exchanges.release(open);
            return Some(DropReason::RingFullBytes);
        }
        if !self.slots.try_reserve(1) {
            self.open_exchanges.release(open);
            self.budget.release(bytes);
            return Some(DropReason::RingFullSlots);
        }
        None
    }

    pub fn budget(&self) -> &ByteBudget {
        &self.budget
    }

    pub fn stats(&self) -> &CaptureStats {
        &self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(bytes: usize) -> CaptureEvent {
        CaptureEvent::Chunk {
            exchange: 1,
            direction: Direction::Request,
            data: Bytes::from(vec![0u8; bytes]),
        }
    }

    #[test]
    fn drops_newest_when_the_byte_budget_is_spent() {
        let stats = Arc::new(CaptureStats::default());
        let (ring, receiver) = ring(16, 100, stats.clone());
        assert!(ring.push(chunk(60)));
        assert!(!ring.push(chunk(60)), "over the budget");
        assert_eq!(stats.dropped(DropReason::RingFullBytes), 1);
        assert_eq!(ring.budget().used(), 60);
        assert!(matches!(
            receiver.try_receive(),
            Ok(CaptureEvent::Chunk { .. })
        ));
        receiver.budget.release(60);
        assert!(ring.push(chunk(60)), "budget given back");
    }

    fn start(exchange: ExchangeId) -> CaptureEvent {
        CaptureEvent::Start(Box::new(ExchangeStart {
            exchange,
            at: Instant::now(),
            started_at: std::time::SystemTime::now(),
            correlation_id: HeaderValue::from_static("test"),
            method: Method::POST,
            uri: Uri::from_static("/score"),
            http_version: "HTTP/1.1",
            headers: HeaderMap::new(),
            request_body_excluded: None,
        }))
    }

    fn response(exchange: ExchangeId, header_bytes: usize) -> CaptureEvent {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-padding",
            HeaderValue::from_str(&"p".repeat(header_bytes)).expect("a header value"),
        );
        CaptureEvent::Response(Box::new(ResponseStart {
            exchange,
            status: StatusCode::OK,
            headers,
            outcome: "ok",
            error: None,
            body_excluded: None,
        }))
    }

    fn end(exchange: ExchangeId, direction: Direction) -> CaptureEvent {
        CaptureEvent::End {
            exchange,
            direction,
            end: BodyEnd::Complete,
            size: 0,
            lost: false,
            at: Instant::now(),
        }
    }

    #[test]
    fn what_happened_to_a_started_exchange_is_never_refused() {
        let stats = Arc::new(CaptureStats::default());
        let start_bytes = start(1).budget_bytes();
        let (ring, receiver) = ring(2, start_bytes + 100, stats.clone());
        assert!(ring.push(start(1)));
        assert!(ring.push(chunk(100)), "the rest of the budget");
        assert!(!ring.push(chunk(1)), "no byte left");
        assert!(!ring.push(start(2)), "no room for another exchange");
        // The ring is full in bytes and slots; the started exchange's head and ends still go.
        assert!(ring.push(response(1, 100)));
        assert!(ring.push(end(1, Direction::Request)));
        assert!(ring.push(end(1, Direction::Response)));
        assert_eq!(
            ring.budget().used(),
            start_bytes + 100,
            "a head within the room its start set aside takes nothing more"
        );
        let mut received = 0;
        while receiver.try_receive().is_ok() {
            received += 1;
        }
        assert_eq!(received, 5);
        receiver.budget.release(100); // as the collector does with a chunk it took
        assert!(ring.push(chunk(1)), "follow-ups gave their slots back");
        // A head larger than the room takes the rest, even past the budget.
        assert!(ring.push(response(1, RESPONSE_HEAD_ROOM as usize)));
        assert!(ring.budget().used() > ring.budget().capacity());
        drop(receiver);
        assert!(
            !ring.push(end(1, Direction::Response)),
            "the collector stopped"
        );
    }

    #[test]
    fn past_the_open_exchange_limit_a_new_exchange_is_not_captured() {
        let stats = Arc::new(CaptureStats::default());
        let (ring, receiver) = ring_with_limits(
            RingLimits {
                slots: 16,
                bytes: 1 << 20,
                open_exchanges: 2,
            },
            stats.clone(),
        );
        assert!(ring.push(start(1)));
        assert!(ring.push(start(2)));
        assert!(!ring.push(start(3)));
        assert_eq!(stats.dropped(DropReason::OpenExchangesFull), 1);
        assert!(ring.push(chunk(10)), "chunks are not exchanges");
        // The collector wrote one record.
        receiver.open_exchanges.release(1);
        assert!(ring.push(start(4)));
    }

    #[test]
    fn drops_newest_when_slots_are_taken() {
        let stats = Arc::new(CaptureStats::default());
        let (ring, receiver) = ring(2, 1_000, stats.clone());
        assert!(ring.push(chunk(1)));
        assert!(ring.push(chunk(1)));
        assert!(!ring.push(chunk(1)));
        assert_eq!(stats.dropped(DropReason::RingFullSlots), 1);
        assert_eq!(
            ring.budget().used(),
            2,
            "a refused chunk gives its bytes back"
        );
        assert!(receiver.try_receive().is_ok());
        assert!(ring.push(chunk(1)), "a received event gives its slot back");
        assert!(!ring.push(chunk(1)));
        assert_eq!(stats.dropped(DropReason::RingFullSlots), 2);
        drop(receiver);
        assert!(!ring.push(chunk(1)));
        assert_eq!(stats.dropped(DropReason::CollectorStopped), 1);
    }
}
