//! Staging: every object is written to a local file first.
//!
//! For a `file://` store the staging root is the store itself: a sealed file is already where it
//! belongs. For a remote store the staging root is the **spool**: a sealed file is handed to the
//! uploader, which deletes it once the store has it. Because nothing is uploaded that was not on
//! disk first, a store outage or a `kill -9` loses nothing that reached the spool: on start, the
//! files a previous process left are found and queued again ([`Staging::spool`]). Keys are
//! deterministic (trace ids, instance and persisted sequence numbers), so a re-upload replaces the
//! same object instead of adding a second one.
//!
//! The spool has a disk budget ([`SpoolBudget`]): past it, new data is refused and the caller
//! counts the drop; the process is never killed and never blocks.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Suffix of the file that keeps a spilled body's content type beside it in the spool.
pub const CONTENT_TYPE_SUFFIX: &str = ".scoretap-content-type";
/// Directory (under the staging root) of scoretap's own state, never uploaded.
pub const STATE_DIRECTORY: &str = ".scoretap";

/// The spool's disk budget, shared by the collector (which reserves) and the uploader (which
/// releases once an object is stored).
#[derive(Debug)]
pub struct SpoolBudget {
    used: AtomicU64,
    limit: u64,
}

impl SpoolBudget {
    pub fn new(limit: u64) -> Self {
        Self {
            used: AtomicU64::new(0),
            limit,
        }
    }

    /// Takes `bytes` from the budget; `false` (and nothing taken) when they do not fit.
    pub fn try_reserve(&self, bytes: u64) -> bool {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let next = used.saturating_add(bytes);
            if next > self.limit {
                return false;
            }
            match self
                .used
                .compare_exchange_weak(used, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(actual) => used = actual,
            }
        }
    }

    /// Counts bytes already on disk (found at start), whether or not they fit.
    pub fn add_existing(&self, bytes: u64) {
        self.used.fetch_add(bytes, Ordering::AcqRel);
    }

    pub fn release(&self, bytes: u64) {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let next = used.saturating_sub(bytes);
            match self
                .used
                .compare_exchange_weak(used, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(actual) => used = actual,
            }
        }
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }
}

/// A sealed file, ready for the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedObject {
    /// The object's key, relative to the store's prefix.
    pub key: String,
    /// The local file.
    pub path: PathBuf,
    pub content_type: Option<String>,
    /// A content-type file lies beside it (removed with it).
    pub has_side_file: bool,
    /// The file's size and its content-type file's (what they hold of the spool budget).
    pub bytes: u64,
}

/// Receives sealed files (the uploader's queue).
pub trait SealedObjectQueue: Send + Sync + std::fmt::Debug {
    fn push(&self, object: SealedObject);
}

/// Why staging refused or failed to write.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error("the spool is full ({used} of {limit} bytes)")]
    SpoolFull { used: u64, limit: u64 },
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl StagingError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        StagingError::Io {
            path: path.to_owned(),
            source,
        }
    }

    /// The `reason` label of the drop this error causes.
    pub fn drop_reason(&self) -> crate::ring::DropReason {
        match self {
            StagingError::SpoolFull { .. } => crate::ring::DropReason::SpoolFull,
            StagingError::Io { .. } => crate::ring::DropReason::StorageError,
        }
    }
}

/// Where objects are written before they reach the store.
#[derive(Debug)]
pub struct Staging {
    root: PathBuf,
    /// For remote stores: the uploader's queue and the spool budget.
    spool: Option<(Arc<dyn SealedObjectQueue>, Arc<SpoolBudget>)>,
}

/// A file being written in the staging root.
#[derive(Debug)]
pub struct StagedFile {
    key: String,
    path: PathBuf,
    file: File,
    written: u64,
    /// Bytes of the content-type file beside it (spool only).
    side_bytes: u64,
}

impl StagedFile {
    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn written(&self) -> u64 {
        self.written
    }
}

impl Staging {
    /// Staging straight into a local store directory.
    pub fn local(root: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(root)?;
        Ok(Self {
            root: root.to_owned(),
            spool: None,
        })
    }

    /// A spool for a remote store. Returns the files a previous process left in it (recovered:
    /// a trace batch cut mid-line loses only its torn last line), already counted in `budget`;
    /// queue them for upload before new ones.
    pub fn spool(
        root: &Path,
        queue: Arc<dyn SealedObjectQueue>,
        budget: Arc<SpoolBudget>,
    ) -> std::io::Result<(Self, Vec<SealedObject>)> {
        std::fs::create_dir_all(root)?;
        let leftovers = recover(root)?;
        for object in &leftovers {
            budget.add_existing(object.bytes);
        }
        Ok((
            Self {
                root: root.to_owned(),
                spool: Some((queue, budget)),
            },
            leftovers,
        ))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn is_spool(&self) -> bool {
        self.spool.is_some()
    }

    pub fn budget(&self) -> Option<&Arc<SpoolBudget>> {
        self.spool.as_ref().map(|(_, budget)| budget)
    }

    /// Creates the file of `key` (replacing a file of the same key, which only a key template
    /// without unique fields could produce). For a spool, `content_type` is kept beside it so a
    /// replay after a crash uploads it with the same type.
    pub fn create(
        &self,
        key: &str,
        content_type: Option<&str>,
    ) -> Result<StagedFile, StagingError> {
        let path = self.root.join(key);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|error| StagingError::io(parent, error))?;
        }
        let mut side_bytes = 0;
        if let (Some(content_type), true) = (content_type, self.is_spool()) {
            let side = side_path(&path);
            self.reserve(content_type.len() as u64)?;
            if let Err(error) = std::fs::write(&side, content_type) {
                self.release(content_type.len() as u64);
                return Err(StagingError::io(&side, error));
            }
            side_bytes = content_type.len() as u64;
        }
        let file = match OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
        {
            Ok(file) => file,
            Err(error) => {
                if side_bytes > 0 {
                    std::fs::remove_file(side_path(&path)).ok();
                    self.release(side_bytes);
                }
                return Err(StagingError::io(&path, error));
            }
        };
        Ok(StagedFile {
            key: key.to_owned(),
            path,
            file,
            written: 0,
            side_bytes,
        })
    }

    fn release(&self, bytes: u64) {
        if let Some(budget) = self.budget() {
            budget.release(bytes);
        }
    }

    fn reserve(&self, bytes: u64) -> Result<(), StagingError> {
        match self.budget() {
            Some(budget) if !budget.try_reserve(bytes) => Err(StagingError::SpoolFull {
                used: budget.used(),
                limit: budget.limit(),
            }),
            _ => Ok(()),
        }
    }

    /// Appends to a staged file (reserving spool budget first: nothing is written past it).
    pub fn write(&self, file: &mut StagedFile, data: &[u8]) -> Result<(), StagingError> {
        self.reserve(data.len() as u64)?;
        if let Err(error) = file.file.write_all(data) {
            if let Some(budget) = self.budget() {
                budget.release(data.len() as u64);
            }
            return Err(StagingError::io(&file.path, error));
        }
        file.written += data.len() as u64;
        Ok(())
    }

    /// Reads back up to `limit` bytes from the start of a staged file (what a spilled body's
    /// record shows). The staged file is written without a user-space buffer, so everything
    /// written is there to read.
    pub fn read_prefix(&self, file: &StagedFile, limit: usize) -> Result<Vec<u8>, StagingError> {
        let wanted = usize::try_from(file.written).map_or(limit, |written| written.min(limit));
        let mut prefix = vec![0u8; wanted];
        File::open(&file.path)
            .and_then(|mut reader| reader.read_exact(&mut prefix))
            .map_err(|error| StagingError::io(&file.path, error))?;
        Ok(prefix)
    }

    /// Appends bytes whose spool budget the caller already took.
    pub fn write_reserved(&self, file: &mut StagedFile, data: &[u8]) -> Result<(), StagingError> {
        file.file
            .write_all(data)
            .map_err(|error| StagingError::io(&file.path, error))?;
        file.written += data.len() as u64;
        Ok(())
    }

    /// Closes a staged file and hands it on: to the uploader for a spool; a local store already
    /// holds it. Returns the key.
    pub fn seal(&self, file: StagedFile, content_type: Option<&str>) -> String {
        let StagedFile {
            key,
            path,
            file,
            written,
            side_bytes,
        } = file;
        drop(file);
        if let Some((queue, _)) = &self.spool {
            queue.push(SealedObject {
                key: key.clone(),
                path,
                content_type: content_type.map(str::to_owned),
                has_side_file: side_bytes > 0,
                bytes: written + side_bytes,
            });
        }
        key
    }

    /// Abandons a staged file: deletes it and gives its budget back.
    pub fn discard(&self, file: StagedFile, _content_type: Option<&str>) {
        let StagedFile {
            path,
            file,
            written,
            side_bytes,
            ..
        } = file;
        drop(file);
        std::fs::remove_file(&path).ok();
        if side_bytes > 0 {
            std::fs::remove_file(side_path(&path)).ok();
        }
        self.release(written + side_bytes);
    }

    /// Writes a whole small object at once (a body spilled from the bytes capture already held).
    pub fn write_whole(
        &self,
        key: &str,
        data: &[u8],
        content_type: Option<&str>,
    ) -> Result<String, StagingError> {
        let mut file = self.create(key, content_type)?;
        if let Err(error) = self.write(&mut file, data) {
            self.discard(file, content_type);
            return Err(error);
        }
        Ok(self.seal(file, content_type))
    }
}

/// The path of the file keeping `path`'s content type.
pub fn side_path(path: &Path) -> PathBuf {
    let mut side = path.as_os_str().to_owned();
    side.push(CONTENT_TYPE_SUFFIX);
    PathBuf::from(side)
}

/// Removes an uploaded file and its content-type file.
pub fn remove_sealed(object: &SealedObject) {
    std::fs::remove_file(&object.path).ok();
    if object.has_side_file {
        std::fs::remove_file(side_path(&object.path)).ok();
    }
    // Empty directories left behind are removed up to the spool root by the next recovery;
    // removing them now could race with the collector creating files in them.
}

/// Finds what a previous process left in a spool.
fn recover(root: &Path) -> std::io::Result<Vec<SealedObject>> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(directory) = stack.pop() {
        let mut entries = 0usize;
        for entry in std::fs::read_dir(&directory)? {
            let entry = entry?;
            entries += 1;
            let path = entry.path();
            let file_type = entry.file_type()?;
            if file_type.is_dir() {
                if path != root.join(STATE_DIRECTORY) {
                    stack.push(path);
                }
                continue;
            }
            let name = path.to_string_lossy();
            if name.ends_with(CONTENT_TYPE_SUFFIX) {
                continue;
            }
            let Ok(relative) = path.strip_prefix(root) else {
                continue;
            };
            let key = relative
                .components()
                .map(|part| part.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            if key.ends_with(".jsonl") {
                trim_torn_line(&path)?;
            }
            let side = side_path(&path);
            let side_content_type = std::fs::read_to_string(&side).ok();
            let side_bytes = side_content_type
                .as_ref()
                .map_or(0, |text| text.len() as u64);
            let has_side_file = side_content_type.is_some();
            let content_type = side_content_type.or_else(|| content_type_of_key(&key));
            let bytes = std::fs::metadata(&path)?.len() + side_bytes;
            found.push(SealedObject {
                key,
                path,
                has_side_file,
                content_type,
                bytes,
            });
        }
        if entries == 0 && directory != root {
            std::fs::remove_dir(&directory).ok();
        }
    }
    found.sort_by(|left, right| left.key.cmp(&right.key));
    Ok(found)
}

/// The content type of a batch file, from its name.
fn content_type_of_key(key: &str) -> Option<String> {
    let content_type = if key.ends_with(".jsonl") {
        "application/x-ndjson"
    } else if key.ends_with(".gz") {
        "application/gzip"
    } else if key.ends_with(".csv") {
        "text/csv"
    } else {
        return None;
    };
    Some(content_type.to_owned())
}

/// Cuts a JSONL file after its last complete line (a process killed mid-write leaves a torn one).
fn trim_torn_line(path: &Path) -> std::io::Result<()> {
    let mut file = OpenOptions::new().read(true).write(true).open(path)?;
    let length = file.metadata()?.len();
    if length == 0 {
        return Ok(());
    }
    let mut tail = [0u8; 1];
    file.seek(std::io::SeekFrom::Start(length - 1))?;
    file.read_exact(&mut tail)?;
    if tail[0] == b'\n' {
        return Ok(());
    }
    // Walk back in blocks to the last newline.
    let mut end = length;
    let mut block = vec![0u8; 64 * 1024];
    let keep = loop {
        if end == 0 {
            break 0;
        }
        let start = end.saturating_sub(block.len() as u64);
        let size = (end - start) as usize;
        file.seek(std::io::SeekFrom::Start(start))?;
        file.read_exact(&mut block[..size])?;
        if let Some(position) = block[..size].iter().rposition(|byte| *byte == b'\n') {
            break start + position as u64 + 1;
        }
        end = start;
    };
    tracing::warn!(
        "{}: dropped a torn last line ({} bytes) left by a previous process",
        path.display(),
        length - keep
    );
    file.set_len(keep)
}

/// Numbers for `{seq}` that keep growing across restarts: the next number is kept in the staging
/// root, so a restarted instance never reuses the key of a batch it already wrote (a remote store
/// would otherwise be overwritten).
#[derive(Debug)]
pub struct SequenceFile {
    path: PathBuf,
    next: u64,
}

impl SequenceFile {
    pub fn open(root: &Path, instance: &str) -> std::io::Result<Self> {
        let directory = root.join(STATE_DIRECTORY);
        std::fs::create_dir_all(&directory)?;
        let path = directory.join(format!("{instance}.sequence"));
        let next = match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().parse::<u64>().unwrap_or(1).max(1),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => 1,
            Err(error) => return Err(error),
        };
        Ok(Self { path, next })
    }

    /// Takes the next number and records the one after it before it is used.
    pub fn take(&mut self) -> std::io::Result<u64> {
        let taken = self.next;
        self.next += 1;
        let temporary = self.path.with_extension("sequence.new");
        std::fs::write(&temporary, self.next.to_string())?;
        std::fs::rename(&temporary, &self.path)?;
        Ok(taken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Debug, Default)]
    struct Collected(Mutex<Vec<SealedObject>>);

    impl SealedObjectQueue for Collected {
        fn push(&self, object: SealedObject) {
            self.0.lock().expect("lock").push(object);
        }
    }

    fn temporary(name: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!("scoretap-{name}-{}", std::process::id()));
        std::fs::remove_dir_all(&root).ok();
        root
    }

    #[test]
    fn budget_refuses_past_its_limit_and_counts_releases() {
        let budget = SpoolBudget::new(10);
        assert!(budget.try_reserve(6));
        assert!(!budget.try_reserve(5));
        assert_eq!(budget.used(), 6);
        budget.release(6);
        assert!(budget.try_reserve(10));
    }

    #[test]
    fn spool_seals_into_the_queue_and_recovers_leftovers() {
        let root = temporary("spool");
        let queue = Arc::new(Collected::default());
        let budget = Arc::new(SpoolBudget::new(1 << 20));
        let (staging, leftovers) =
            Staging::spool(&root, queue.clone(), budget.clone()).expect("spool");
        assert!(leftovers.is_empty());
        let mut body = staging
            .create("bodies/s/2026/11/23/id/request", Some("application/json"))
            .expect("create");
        staging.write(&mut body, b"{\"a\":1}").expect("write");
        staging.seal(body, Some("application/json"));
        let mut batch = staging
            .create("traces/s/2026/11/23/10/i-000001.jsonl", None)
            .expect("create");
        staging
            .write(&mut batch, b"{\"n\":1}\n{\"n\":2}\n{\"n\"")
            .expect("write");
        drop(batch); // the process "dies" before sealing it
        let sealed = queue.0.lock().expect("lock").clone();
        assert_eq!(sealed.len(), 1);
        assert_eq!(sealed[0].content_type.as_deref(), Some("application/json"));
        assert_eq!(budget.used(), 7 + 16 + 20);

        let again = Arc::new(SpoolBudget::new(1 << 20));
        let (_, leftovers) = Staging::spool(&root, queue.clone(), again.clone()).expect("spool");
        let keys: Vec<&str> = leftovers.iter().map(|object| object.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "bodies/s/2026/11/23/id/request",
                "traces/s/2026/11/23/10/i-000001.jsonl"
            ]
        );
        assert_eq!(
            leftovers[0].content_type.as_deref(),
            Some("application/json")
        );
        let batch = std::fs::read_to_string(&leftovers[1].path).expect("read");
        assert_eq!(batch, "{\"n\":1}\n{\"n\":2}\n", "torn line cut");
        assert_eq!(again.used(), 7 + 16 + 16);
        std::fs::remove_dir_all(&root).ok();
    }

    #[test]
    fn a_full_spool_refuses_writes() {
        let root = temporary("full");
        let queue = Arc::new(Collected::default());
        let (staging, _) =
            Staging::spool(&root, queue, Arc::new(SpoolBudget::new(8))).expect("spool");
        let mut file = staging.create("bodies/x", None).expect("create");
        staging.write(&mut file, b"12345678").expect("fits");
        let error = staging.write(&mut file, b"9").expect_err("full");
        assert!(matches!(error, StagingError::SpoolFull { .. }), "{error}");
        staging.discard(file, None);
        assert_eq!(staging.budget().expect("budget").used(), 0);
        std::fs::remove_dir_all(&root).ok();
    }

    #[test]
    fn sequences_survive_a_restart() {
        let root = temporary("sequence");
        let mut first = SequenceFile::open(&root, "pod").expect("open");
        assert_eq!(first.take().expect("take"), 1);
        assert_eq!(first.take().expect("take"), 2);
        let mut second = SequenceFile::open(&root, "pod").expect("open");
        assert_eq!(second.take().expect("take"), 3);
        std::fs::remove_dir_all(&root).ok();
    }
}
