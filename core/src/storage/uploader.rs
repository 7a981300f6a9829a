//! The uploader: a named OS thread with its own small async runtime (off the proxy's workers)
//! that moves sealed spool files to the remote store.
//!
//! Each file is uploaded under its key, retried with exponential backoff and full jitter until the
//! store takes it, then deleted from the spool (and its bytes given back to the spool budget).
//! A re-upload of the same file after a crash writes the same key: no duplicates. On stop, what is
//! still queued is tried until the deadline; whatever is left stays in the spool for the next
//! start.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Mutex, Notify};

use super::remote::{RemoteOptions, RemoteStore};
use super::staging::{remove_sealed, SealedObject, SealedObjectQueue, SpoolBudget};
use crate::metrics::StorageMetrics;
use crate::sink::StoreLocation;

/// How the uploader works.
#[derive(Debug, Clone)]
pub struct UploaderSettings {
    /// Uploads in flight at once.
    pub concurrency: usize,
    /// The first retry waits up to this long; each failure doubles it.
    pub retry_initial: Duration,
    /// Retries never wait longer than this.
    pub retry_maximum: Duration,
}

impl Default for UploaderSettings {
    fn default() -> Self {
        Self {
            concurrency: 4,
            retry_initial: Duration::from_millis(200),
            retry_maximum: Duration::from_secs(30),
        }
    }
}

/// Counters of the uploader, shown by `GET /capture`.
#[derive(Debug, Default)]
pub struct UploadStats {
    /// Objects handed to the uploader (including those found in the spool at start).
    pub queued: AtomicU64,
    /// Objects the store has taken.
    pub uploaded: AtomicU64,
    pub uploaded_bytes: AtomicU64,
    /// Failed attempts (each is retried).
    pub failed_attempts: AtomicU64,
}

impl UploadStats {
    /// Objects waiting or in flight.
    pub fn pending(&self) -> u64 {
        self.queued
            .load(Ordering::Relaxed)
            .saturating_sub(self.uploaded.load(Ordering::Relaxed))
    }
}

/// The collector's side: sealed files go here.
#[derive(Debug)]
pub struct UploadQueue {
    sender: mpsc::UnboundedSender<SealedObject>,
    stats: Arc<UploadStats>,
}

impl SealedObjectQueue for UploadQueue {
    fn push(&self, object: SealedObject) {
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        if self.sender.send(object).is_err() {
            // The uploader is gone (stopping): the file stays in the spool for the next start.
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The running uploader.
#[derive(Debug)]
pub struct Uploader {
    thread: JoinHandle<()>,
    stop: watch::Sender<bool>,
    abort: Arc<Notify>,
    stats: Arc<UploadStats>,
}

/// Why the uploader could not start.
#[derive(Debug, thiserror::Error)]
pub enum UploaderError {
    #[error("starting the uploader thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] super::remote::StorageError),
    #[error("the uploader thread ended while starting")]
    Ended,
}

impl Uploader {
    /// Connects to the store (no network needed for that) and starts the thread.
    pub fn start(
        location: &StoreLocation,
        options: &RemoteOptions,
        settings: UploaderSettings,
        budget: Arc<SpoolBudget>,
        metrics: StorageMetrics,
    ) -> Result<(Self, Arc<UploadQueue>), UploaderError> {
        let (sender, receiver) = mpsc::unbounded_channel();
        let stats = Arc::new(UploadStats::default());
        let queue = Arc::new(UploadQueue {
            sender,
            stats: stats.clone(),
        });
        let (stop, stop_receiver) = watch::channel(false);
        let abort = Arc::new(Notify::new());
        let (ready_sender, ready_receiver) = std::sync::mpsc::channel();
        let location = location.clone();
        let options = options.clone();
        let thread_stats = stats.clone();
        let thread_abort = abort.clone();
        let thread = std::thread::Builder::new()
            .name("scoretap-uploader".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        ready_sender.send(Err(UploaderError::Thread(error))).ok();
                        return;
                    }
                };
                runtime.block_on(async move {
                    let store = match RemoteStore::connect(&location, &options).await {
                        Ok(store) => store,
                        Err(error) => {
                            ready_sender.send(Err(UploaderError::Store(error))).ok();
                            return;
                        }
                    };
                    ready_sender.send(Ok(())).ok();
                    let shared = Arc::new(Worker {
                        store,
                        receiver: Mutex::new(receiver),
                        settings: settings.clone(),
                        budget,
                        metrics,
                        stats: thread_stats,
                    });
                    let workers: Vec<_> = (0..settings.concurrency.max(1))
                        .map(|_| tokio::spawn(shared.clone().run(stop_receiver.clone())))
                        .collect();
                    let all = async {
                        for worker in workers {
                            worker.await.ok();
                        }
                    };
                    tokio::select! {
                        () = all => {}
                        () = thread_abort.notified() => {}
                    }
                });
            })?;
        match ready_receiver.recv() {
            Ok(Ok(())) => Ok((
                Self {
                    thread,
                    stop,
                    abort,
                    stats,
                },
                queue,
            )),
            Ok(Err(error)) => {
                thread.join().ok();
                Err(error)
            }
            Err(_) => Err(UploaderError::Ended),
        }
    }

    pub fn stats(&self) -> &Arc<UploadStats> {
        &self.stats
    }

    /// Uploads what is queued until `deadline`, then stops; what is left stays in the spool.
    pub fn stop_within(self, deadline: Duration) {
        self.stop.send(true).ok();
        let started = Instant::now();
        while !self.thread.is_finished() && started.elapsed() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !self.thread.is_finished() {
            let left = self.stats.pending();
            tracing::warn!(
                "stopping with {left} objects not yet uploaded; they stay in the spool and are uploaded at the next start"
            );
            self.abort.notify_one();
        }
        self.thread.join().ok();
    }
}

struct Worker {
    store: RemoteStore,
    receiver: Mutex<mpsc::UnboundedReceiver<SealedObject>>,
    settings: UploaderSettings,
    budget: Arc<SpoolBudget>,
    metrics: StorageMetrics,
    stats: Arc<UploadStats>,
}

impl Worker {
    async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            let object = {
                let mut receiver = self.receiver.lock().await;
                if *stop.borrow() {
                    match receiver.try_recv() {
                        Ok(object) => object,
                        Err(_) => return,
                    }
                } else {
                    tokio::select! {
                        object = receiver.recv() => match object {
                            Some(object) => object,
                            None => return,
                        },
                        _ = stop.changed() => continue,
                    }
                }
            };
            self.upload(object).await;
        }
    }

    /// Uploads one object, retrying until the store takes it.
    async fn upload(&self, object: SealedObject) {
        let mut failures: u32 = 0;
        let mut last_logged: Option<Instant> = None;
        loop {
            let started = Instant::now();
            let result = self
                .store
                .put_file(&object.key, &object.path, object.content_type.as_deref())
                .await;
            self.metrics
                .write_duration
                .record(started.elapsed().as_secs_f64());
            match result {
                Ok(bytes) => {
                    self.metrics.write_ok.increment(1);
                    remove_sealed(&object);
                    self.budget.release(object.bytes);
                    self.stats.uploaded.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .uploaded_bytes
                        .fetch_add(bytes, Ordering::Relaxed);
                    if failures > 0 {
                        tracing::info!("uploaded {} after {failures} failed attempts", object.key);
                    }
                    return;
                }
                Err(error) if error.is_not_found() && !object.path.exists() => {
                    // The spool file itself is gone (removed by hand): nothing left to upload.
                    self.metrics.write_error.increment(1);
                    tracing::error!("{} vanished from the spool: {error}", object.key);
                    self.budget.release(object.bytes);
                    self.stats.uploaded.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(error) => {
                    self.metrics.write_error.increment(1);
                    self.stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
                    failures = failures.saturating_add(1);
                    let quiet =
                        last_logged.is_some_and(|last| last.elapsed() < Duration::from_secs(10));
                    if !quiet {
                        last_logged = Some(Instant::now());
                        tracing::warn!(
                            "uploading {} failed (attempt {failures}, retrying): {error}",
                            object.key
                        );
                    }
                    tokio::time::sleep(self.backoff(failures)).await;
                }
            }
        }
    }

    /// Exponential backoff with full jitter: a random wait up to `initial × 2^(failures-1)`,
    /// capped.
    fn backoff(&self, failures: u32) -> Duration {
        let exponent = failures.saturating_sub(1).min(20);
        let ceiling = self
            .settings
            .retry_initial
            .saturating_mul(1u32 << exponent)
            .min(self.settings.retry_maximum);
        let random = (uuid::Uuid::new_v4().as_u128() % 1_000_000) as f64 / 1_000_000.0;
        // Never less than a tenth of the ceiling: a retry storm helps nobody.
        ceiling.mul_f64(0.1 + 0.9 * random)
    }
}
