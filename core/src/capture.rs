//! What to capture, and the per-exchange handle the proxy uses to feed the ring.
//!
//! Selection happens once per exchange, at its start: capture enabled (switchable at run time),
//! sampling, path include/exclude patterns. Bodies whose content type is excluded (by default
//! audio, video and images, as the Azure ML data collector did) are recorded without their bytes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::{header, HeaderMap, HeaderValue, Request, Response, Version};

use crate::ring::{
    CaptureEvent, CaptureStats, Direction, ExchangeId, ExchangeStart, ResponseStart, Ring,
};
use crate::tee::BodyTap;

/// A path pattern: `*` matches any run of characters, everything else itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern(String);

impl PathPattern {
    pub fn new(pattern: &str) -> Self {
        Self(pattern.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `path` matches the whole pattern.
    pub fn matches(&self, path: &str) -> bool {
        let mut parts = self.0.split('*');
        let Some(first) = parts.next() else {
            return path.is_empty();
        };
        let Some(mut rest) = path.strip_prefix(first) else {
            return false;
        };
        let parts: Vec<&str> = parts.collect();
        let Some((last, middle)) = parts.split_last() else {
            return rest.is_empty();
        };
        for part in middle {
            match rest.find(part) {
                Some(index) => rest = &rest[index + part.len()..],
                None => return false,
            }
        }
        rest.len() >= last.len() && rest.ends_with(last)
    }
}

/// A media-type pattern such as `image/*` or `application/octet-stream`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContentTypePattern(String);

impl ContentTypePattern {
    pub fn new(pattern: &str) -> Self {
        Self(pattern.trim().to_ascii_lowercase())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn matches(&self, media_type: &str) -> bool {
        match self.0.strip_suffix("/*") {
            Some(kind) => media_type
                .split_once('/')
                .is_some_and(|(candidate, _)| candidate == kind),
            None => media_type == self.0,
        }
    }
}

/// The capture policy.
#[derive(Debug, Clone)]
pub struct CaptureSelection {
    /// When non-empty, only matching paths are captured.
    pub include_paths: Vec<PathPattern>,
    /// Matching paths are never captured (no record at all).
    pub exclude_paths: Vec<PathPattern>,
    /// Bodies of these types are recorded without their bytes.
    pub excluded_content_types: Vec<ContentTypePattern>,
    /// Past this many bytes a body's capture stops (`complete: false`).
    pub maximum_body_bytes: u64,
}

impl Default for CaptureSelection {
    fn default() -> Self {
        Self {
            include_paths: Vec::new(),
            exclude_paths: Vec::new(),
            excluded_content_types: ["audio/*", "video/*", "image/*"]
                .into_iter()
                .map(ContentTypePattern::new)
                .collect(),
            maximum_body_bytes: 1 << 30,
        }
    }
}

impl CaptureSelection {
    fn selects_path(&self, path: &str) -> bool {
        (self.include_paths.is_empty() || self.include_paths.iter().any(|p| p.matches(path)))
            && !self.exclude_paths.iter().any(|p| p.matches(path))
    }

    /// Why a body with these headers is not captured, if it is not.
    fn body_exclusion(&self, headers: &HeaderMap) -> Option<&'static str> {
        if self.excluded_content_types.is_empty() {
            return None;
        }
        let media_type = headers
            .get(header::CONTENT_TYPE)?
            .to_str()
            .ok()?
            .split(';')
            .next()?
            .trim();
        // Patterns are lower case; a media type usually is too (no copy on the request path).
        let media_type = if media_type.bytes().any(|byte| byte.is_ascii_uppercase()) {
            std::borrow::Cow::Owned(media_type.to_ascii_lowercase())
        } else {
            std::borrow::Cow::Borrowed(media_type)
        };
        self.excluded_content_types
            .iter()
            .any(|pattern| pattern.matches(&media_type))
            .then_some("content_type")
    }
}

/// Switches that apply without a restart (`PUT /capture`).
#[derive(Debug)]
pub struct CaptureControl {
    enabled: AtomicBool,
    sample_rate_bits: AtomicU64,
}

impl CaptureControl {
    pub fn new(enabled: bool, sample_rate: f64) -> Self {
        Self {
            enabled: AtomicBool::new(enabled),
            sample_rate_bits: AtomicU64::new(sample_rate.clamp(0.0, 1.0).to_bits()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    pub fn set_enabled(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::Relaxed);
    }

    pub fn sample_rate(&self) -> f64 {
        f64::from_bits(self.sample_rate_bits.load(Ordering::Relaxed))
    }

    pub fn set_sample_rate(&self, rate: f64) {
        self.sample_rate_bits
            .store(rate.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
    }
}

/// The proxy's side of capture: selection, and the ring to feed.
#[derive(Debug)]
pub struct Capture {
    ring: Ring,
    control: Arc<CaptureControl>,
    selection: Arc<CaptureSelection>,
    next_exchange: AtomicU64,
    storage: StorageStatus,
}

impl Capture {
    pub fn new(ring: Ring, control: Arc<CaptureControl>, selection: CaptureSelection) -> Self {
        Self {
            ring,
            control,
            selection: Arc::new(selection),
            next_exchange: AtomicU64::new(1),
            storage: StorageStatus::default(),
        }
    }

    /// The spool and uploads, for a remote store.
    pub fn storage(&self) -> &StorageStatus {
        &self.storage
    }

    pub fn control(&self) -> &Arc<CaptureControl> {
        &self.control
    }

    pub fn stats(&self) -> &CaptureStats {
        self.ring.stats()
    }

    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// Decides whether this exchange is captured and, if so, announces its start.
    pub fn begin<B>(
        &self,
        request: &Request<B>,
        correlation_id: &HeaderValue,
    ) -> Option<ExchangeCapture> {
        if !self.control.enabled() || !self.selection.selects_path(request.uri().path()) {
            return None;
        }
        let exchange = self.next_exchange.fetch_add(1, Ordering::Relaxed);
        let rate = self.control.sample_rate();
        if rate < 1.0 && unit_interval(exchange) >= rate {
            return None;
        }
        let request_body_excluded = self.selection.body_exclusion(request.headers());
        let start = ExchangeStart {
            exchange,
            at: Instant::now(),
            started_at: SystemTime::now(),
            correlation_id: correlation_id.clone(),
            method: request.method().clone(),
            uri: request.uri().clone(),
            http_version: version_name(request.version()),
            headers: request.headers().clone(),
            request_body_excluded,
        };
        if !self.ring.push(CaptureEvent::Start(Box::new(start))) {
            return None;
        }
        Some(ExchangeCapture {
            ring: self.ring.clone(),
            exchange,
            selection: self.selection.clone(),
            request_body_excluded: request_body_excluded.is_some(),
            responded: false,
        })
    }
}

/// Maps an exchange number to a well-spread value in [0, 1) (SplitMix64), for sampling.
fn unit_interval(exchange: u64) -> f64 {
    let mut z = exchange.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// The protocol name recorded for a version.
pub fn version_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

/// One captured exchange, held by the proxy while it handles the request. Dropped without a
/// response (the client went away while waiting), it reports the exchange abandoned.
#[derive(Debug)]
pub struct ExchangeCapture {
    ring: Ring,
    exchange: ExchangeId,
    selection: Arc<CaptureSelection>,
    request_body_excluded: bool,
    responded: bool,
}

impl ExchangeCapture {
    /// The tap for the request body.
    pub fn request_tap(&self) -> BodyTap {
        BodyTap::new(
            self.ring.clone(),
            self.exchange,
            Direction::Request,
            !self.request_body_excluded,
            self.selection.maximum_body_bytes,
        )
    }

    /// Announces the response head and returns the tap for its body.
    pub fn respond<B>(
        mut self,
        response: &Response<B>,
        outcome: &'static str,
        error: Option<(&'static str, String)>,
    ) -> BodyTap {
        self.responded = true;
        let body_excluded = self.selection.body_exclusion(response.headers());
        self.ring
            .push(CaptureEvent::Response(Box::new(ResponseStart {
                exchange: self.exchange,
                status: response.status(),
                headers: response.headers().clone(),
                outcome,
                error,
                body_excluded,
            })));
        BodyTap::new(
            self.ring.clone(),
            self.exchange,
            Direction::Response,
            body_excluded.is_none(),
            self.selection.maximum_body_bytes,
        )
    }
}

impl Drop for ExchangeCapture {
    fn drop(&mut self) {
        if !self.responded {
            self.ring.push(CaptureEvent::Abandoned {
                exchange: self.exchange,
                at: Instant::now(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_patterns_match_whole_paths() {
        assert!(PathPattern::new("/score*").matches("/score"));
        assert!(PathPattern::new("/score*").matches("/score/v2"));
        assert!(!PathPattern::new("/score").matches("/score/v2"));
        assert!(PathPattern::new("*/health*").matches("/api/healthz"));
        assert!(PathPattern::new("/a*b*c").matches("/a-b-c"));
        assert!(!PathPattern::new("/a*b*c").matches("/a-c"));
        assert!(PathPattern::new("*").matches("/anything"));
    }

    #[test]
    fn content_type_patterns() {
        let selection = CaptureSelection::default();
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("Image/PNG"));
        assert_eq!(selection.body_exclusion(&headers), Some("content_type"));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        assert_eq!(selection.body_exclusion(&headers), None);
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(" video/mp4; codecs=avc1"),
        );
        assert_eq!(selection.body_exclusion(&headers), Some("content_type"));
    }

    #[test]
    fn sampling_is_spread() {
        let selected = (0..10_000).filter(|n| unit_interval(*n) < 0.25).count();
        assert!((2_200..2_800).contains(&selected), "{selected}");
    }
}

/// Everything needed to run capture: the policy, the ring's limits, the store, redaction.
#[derive(Debug, Clone)]
pub struct CaptureSettings {
    pub enabled: bool,
    pub sample_rate: f64,
    pub selection: CaptureSelection,
    /// The byte budget of the ring (and of the prefixes the collector holds).
    pub buffer_bytes: u64,
    /// The number of events the ring holds.
    pub buffer_slots: usize,
    /// Most exchanges captured at once; past it new ones are not captured (counted).
    pub max_open_exchanges: usize,
    pub store: crate::sink::StoreLocation,
    /// Names this process in trace file names.
    pub instance: String,
    pub redaction: crate::redaction::Redaction,
    pub flush_interval: std::time::Duration,
    pub storage: StorageSettings,
}

/// How records, spilled bodies and CSV parts are stored.
#[derive(Debug, Clone)]
pub struct StorageSettings {
    /// Trace batches: sealed by size and age, optionally gzip.
    pub batches: crate::storage::batch::BatchSettings,
    pub trace_template: crate::storage::key::KeyTemplate,
    pub body_template: crate::storage::key::KeyTemplate,
    /// Bodies larger than a record holds are stored whole.
    pub spill: bool,
    /// The local spool of a remote store.
    pub spool_directory: std::path::PathBuf,
    /// The spool's disk budget; past it new data is dropped and counted.
    pub spool_maximum_bytes: u64,
    pub remote: crate::storage::remote::RemoteOptions,
    pub uploader: crate::storage::uploader::UploaderSettings,
    pub modeldata: Option<crate::storage::modeldata::ModeldataSettings>,
}

impl Default for StorageSettings {
    fn default() -> Self {
        use crate::storage::key::{
            KeyField, KeyTemplate, DEFAULT_BODY_TEMPLATE, DEFAULT_TRACE_TEMPLATE,
        };
        Self {
            batches: crate::storage::batch::BatchSettings::default(),
            trace_template: KeyTemplate::parse(DEFAULT_TRACE_TEMPLATE, &[KeyField::Sequence])
                .unwrap_or_else(|error| unreachable!("default trace template: {error}")),
            body_template: KeyTemplate::parse(DEFAULT_BODY_TEMPLATE, &[KeyField::TraceId])
                .unwrap_or_else(|error| unreachable!("default body template: {error}")),
            spill: true,
            spool_directory: std::path::PathBuf::from("./scoretap-spool"),
            spool_maximum_bytes: 10 << 30,
            remote: crate::storage::remote::RemoteOptions::default(),
            uploader: crate::storage::uploader::UploaderSettings::default(),
            modeldata: None,
        }
    }
}

/// What the admin endpoints and metrics show of storage.
#[derive(Debug, Clone, Default)]
pub struct StorageStatus {
    pub spool: Option<Arc<crate::storage::staging::SpoolBudget>>,
    pub uploads: Option<Arc<crate::storage::uploader::UploadStats>>,
}

/// Capture running: the proxy's handle and the collector thread.
#[derive(Debug)]
pub struct CaptureRuntime {
    pub capture: Capture,
    collector: std::thread::JoinHandle<()>,
    stop: Arc<AtomicBool>,
    uploader: Option<crate::storage::uploader::Uploader>,
}

/// A directory capture writes to could not be set up: the error names it and the flag that
/// moves it (a read-only root filesystem needs both on a writable volume).
fn unwritable(error: std::io::Error, directory: &std::path::Path, flag: &str) -> std::io::Error {
    std::io::Error::new(
        error.kind(),
        format!(
            "{}: {error} (set {flag} to a writable directory)",
            directory.display()
        ),
    )
}

impl CaptureRuntime {
    /// Creates the ring, the store's staging (and for a remote store the spool and its
    /// uploader, replaying what a previous process left), and starts the collector thread.
    pub fn start(
        settings: &CaptureSettings,
        service: &str,
        metrics: &crate::metrics::Metrics,
    ) -> std::io::Result<Self> {
        use crate::sink::StoreLocation;
        use crate::storage::staging::{SealedObjectQueue, SpoolBudget, Staging};
        let stats = Arc::new(CaptureStats::default());
        let (ring, receiver) = crate::ring::ring_with_limits(
            crate::ring::RingLimits {
                slots: settings.buffer_slots,
                bytes: settings.buffer_bytes,
                open_exchanges: settings.max_open_exchanges,
            },
            stats,
        );
        let storage = &settings.storage;
        let sink_label = settings.store.sink_label();
        let storage_metrics = metrics.storage(sink_label);
        let mut status = StorageStatus::default();
        let mut uploader = None;
        let staging = match &settings.store {
            StoreLocation::Stdout => None,
            StoreLocation::Directory(root) => Some(Arc::new(
                Staging::local(root).map_err(|error| unwritable(error, root, "--store"))?,
            )),
            remote => {
                let budget = Arc::new(SpoolBudget::new(storage.spool_maximum_bytes));
                let (running, queue) = crate::storage::uploader::Uploader::start(
                    remote,
                    &storage.remote,
                    storage.uploader.clone(),
                    budget.clone(),
                    storage_metrics.clone(),
                )
                .map_err(|error| std::io::Error::other(error.to_string()))?;
                let (staging, leftovers) =
                    Staging::spool(&storage.spool_directory, queue.clone(), budget.clone())
                        .map_err(|error| {
                            unwritable(error, &storage.spool_directory, "--spool-dir")
                        })?;
                if !leftovers.is_empty() {
                    let bytes: u64 = leftovers.iter().map(|object| object.bytes).sum();
                    tracing::info!(
                        "the spool holds {} objects ({bytes} bytes) from a previous run; uploading them",
                        leftovers.len()
                    );
                }
                for object in leftovers {
                    queue.push(object);
                }
                status.spool = Some(budget);
                status.uploads = Some(running.stats().clone());
                uploader = Some(running);
                Some(Arc::new(staging))
            }
        };
        let sink: Box<dyn crate::sink::TraceSink> = match &staging {
            None => Box::new(crate::sink::StdoutSink::new()),
            Some(staging) => Box::new(crate::storage::batch::BatchSink::new(
                staging.clone(),
                storage.trace_template.clone(),
                storage.batches.clone(),
                service,
                &settings.instance,
            )?),
        };
        let modeldata = match (&storage.modeldata, &staging) {
            (Some(modeldata), Some(staging)) => Some(
                crate::storage::modeldata::ModeldataSink::new(
                    staging.clone(),
                    modeldata,
                    storage.batches.clone(),
                    &settings.instance,
                )
                .map_err(std::io::Error::other)?,
            ),
            _ => None,
        };
        let spill =
            staging
                .filter(|_| storage.spill)
                .map(|staging| crate::collector::SpillSettings {
                    staging,
                    store: settings.store.clone(),
                    template: storage.body_template.clone(),
                    instance: settings.instance.clone(),
                    spilled_bytes: metrics.spill_bytes(sink_label),
                });
        let stop = Arc::new(AtomicBool::new(false));
        let collector = crate::collector::spawn(
            receiver,
            sink,
            modeldata,
            crate::collector::CollectorSettings {
                service: service.to_owned(),
                redaction: settings.redaction.clone(),
                flush_interval: settings.flush_interval,
                storage_metrics: (!settings.store.is_remote()).then_some(storage_metrics),
                spill,
                ..crate::collector::CollectorSettings::default()
            },
            stop.clone(),
        )?;
        let control = Arc::new(CaptureControl::new(settings.enabled, settings.sample_rate));
        let mut capture = Capture::new(ring, control, settings.selection.clone());
        capture.storage = status;
        Ok(Self {
            capture,
            collector,
            stop,
            uploader,
        })
    }

    /// Splits into the proxy's handle and the collector's stopper.
    pub fn into_parts(self) -> (Capture, CollectorStopper) {
        (
            self.capture,
            CollectorStopper {
                collector: self.collector,
                stop: self.stop,
                uploader: self.uploader,
            },
        )
    }
}

/// Stops the collector: it takes what is queued, writes what it holds, and ends; then the
/// uploader uploads what it can before the deadline (the rest stays in the spool).
#[derive(Debug)]
pub struct CollectorStopper {
    collector: std::thread::JoinHandle<()>,
    stop: Arc<AtomicBool>,
    uploader: Option<crate::storage::uploader::Uploader>,
}

impl CollectorStopper {
    /// Asks the collector to finish and waits up to `deadline` for it (a sink stalled on a full
    /// pipe could block it for ever; the process must still exit), then gives the uploader up to
    /// `deadline` too.
    pub async fn stop(self, deadline: std::time::Duration) {
        self.stop.store(true, Ordering::Release);
        let collector = self.collector;
        let joined = tokio::task::spawn_blocking(move || collector.join());
        match tokio::time::timeout(deadline, joined).await {
            Ok(Ok(Ok(()))) => {}
            Ok(_) => tracing::error!("the collector thread failed"),
            Err(_) => tracing::warn!(
                "the collector did not finish within {deadline:?}; records it held are lost"
            ),
        }
        if let Some(uploader) = self.uploader {
            tokio::task::spawn_blocking(move || uploader.stop_within(deadline))
                .await
                .ok();
        }
    }
}
