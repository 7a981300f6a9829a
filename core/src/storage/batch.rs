//! Batches: trace records as JSONL files (and `modeldata` CSV parts), staged locally and sealed
//! by size, by age and at each new hour, then handed to the store.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::key::{DateParts, KeyTemplate, KeyValues};
use super::staging::{SequenceFile, StagedFile, Staging, StagingError};
use crate::sink::TraceSink;

/// When a batch is sealed, and how it is stored.
#[derive(Debug, Clone)]
pub struct BatchSettings {
    /// A batch is sealed once it holds this many bytes.
    pub maximum_bytes: u64,
    /// A batch is sealed this long after its first record.
    pub maximum_age: Duration,
    /// Sealed trace batches are gzip-compressed (`.jsonl.gz`).
    pub gzip: bool,
}

impl Default for BatchSettings {
    fn default() -> Self {
        Self {
            maximum_bytes: 64 << 20,
            maximum_age: Duration::from_secs(60),
            gzip: false,
        }
    }
}

/// Bytes gathered before they are written to the staged file.
const WRITE_BUFFER_BYTES: usize = 256 * 1024;

/// One open batch.
#[derive(Debug)]
struct OpenBatch {
    file: StagedFile,
    pending: Vec<u8>,
    date: DateParts,
    opened: Instant,
    bytes: u64,
    /// The header line the file started with (CSV parts).
    header: Option<String>,
}

/// A file that is sealed and replaced by the next one by size, age and hour.
#[derive(Debug)]
pub struct RotatingFile {
    staging: Arc<Staging>,
    template: KeyTemplate,
    content_type: &'static str,
    settings: BatchSettings,
    compress: bool,
    current: Option<OpenBatch>,
}

impl RotatingFile {
    pub fn new(
        staging: Arc<Staging>,
        template: KeyTemplate,
        content_type: &'static str,
        settings: BatchSettings,
        compress: bool,
    ) -> Self {
        Self {
            staging,
            template,
            content_type,
            settings,
            compress,
            current: None,
        }
    }

    /// The key of the file being written, if any.
    pub fn current_key(&self) -> Option<&str> {
        self.current.as_ref().map(|batch| batch.file.key())
    }

    /// Appends `line` and a newline, opening a file first if needed (`header` starts a new file
    /// and, when it differs from the open file's, seals that one). The spool budget is taken per
    /// line, so a full spool refuses whole lines.
    pub fn append(
        &mut self,
        line: &[u8],
        header: Option<&str>,
        values: &KeyValues<'_>,
        sequence: &mut SequenceFile,
    ) -> Result<(), StagingError> {
        let now = SystemTime::now();
        let date = DateParts::of(now);
        let rotate = self.current.as_ref().is_some_and(|batch| {
            batch.date.hour != date.hour
                || batch.date.day != date.day
                || batch.bytes >= self.settings.maximum_bytes
                || (header.is_some() && batch.header.as_deref() != header)
        });
        if rotate {
            self.seal()?;
        }
        if self.current.is_none() {
            let number = sequence.take().map_err(|source| StagingError::Io {
                path: self.staging.root().to_owned(),
                source,
            })?;
            let key = self.template.render(&KeyValues {
                sequence: number,
                date,
                ..values.clone()
            });
            let file = self.staging.create(&key, None)?;
            let mut batch = OpenBatch {
                file,
                pending: Vec::with_capacity(WRITE_BUFFER_BYTES),
                date,
                opened: Instant::now(),
                bytes: 0,
                header: header.map(str::to_owned),
            };
            if let Some(header) = header {
                self.reserve(header.len() as u64 + 1)?;
                batch.pending.extend_from_slice(header.as_bytes());
                batch.pending.push(b'\n');
                batch.bytes += header.len() as u64 + 1;
            }
            self.current = Some(batch);
        }
        self.reserve(line.len() as u64 + 1)?;
        let Some(batch) = self.current.as_mut() else {
            return Ok(());
        };
        batch.pending.extend_from_slice(line);
        batch.pending.push(b'\n');
        batch.bytes += line.len() as u64 + 1;
        if batch.pending.len() >= WRITE_BUFFER_BYTES {
            self.write_pending()?;
        }
        Ok(())
    }

    fn reserve(&self, bytes: u64) -> Result<(), StagingError> {
        match self.staging.budget() {
            Some(budget) if !budget.try_reserve(bytes) => Err(StagingError::SpoolFull {
                used: budget.used(),
                limit: budget.limit(),
            }),
            _ => Ok(()),
        }
    }

    fn write_pending(&mut self) -> Result<(), StagingError> {
        let Some(batch) = self.current.as_mut() else {
            return Ok(());
        };
        if batch.pending.is_empty() {
            return Ok(());
        }
        let result = self.staging.write_reserved(&mut batch.file, &batch.pending);
        batch.pending.clear();
        result
    }

    /// Makes what was appended visible in the file (local readers, crash safety).
    pub fn flush(&mut self) -> Result<(), StagingError> {
        self.write_pending()
    }

    /// Seals the open file if it is older than the age limit.
    pub fn maintain(&mut self) -> Result<(), StagingError> {
        let expired = self
            .current
            .as_ref()
            .is_some_and(|batch| batch.opened.elapsed() >= self.settings.maximum_age);
        if expired {
            self.seal()?;
        }
        Ok(())
    }

    /// Seals the open file (if any) and hands it to the store.
    pub fn seal(&mut self) -> Result<(), StagingError> {
        self.write_pending()?;
        let Some(batch) = self.current.take() else {
            return Ok(());
        };
        if batch.file.written() == 0 {
            self.staging.discard(batch.file, None);
            return Ok(());
        }
        let file = if self.compress {
            self.staging.gzip(batch.file)?
        } else {
            batch.file
        };
        let content_type = if self.compress {
            "application/gzip"
        } else {
            self.content_type
        };
        self.staging.seal(file, Some(content_type));
        Ok(())
    }
}

impl Staging {
    /// Replaces a staged file by its gzip-compressed form (`<key>.gz`), streamed.
    pub fn gzip(&self, file: StagedFile) -> Result<StagedFile, StagingError> {
        let key = format!("{}.gz", file.key());
        let source_path = file.path().to_owned();
        let mut compressed = self.create(&key, None)?;
        let result = (|| -> std::io::Result<Vec<u8>> {
            let mut reader = std::fs::File::open(&source_path)?;
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            let mut block = vec![0u8; 256 * 1024];
            loop {
                let read = reader.read(&mut block)?;
                if read == 0 {
                    break;
                }
                encoder.write_all(&block[..read])?;
            }
            encoder.finish()
        })();
        match result {
            Ok(bytes) => {
                self.discard(file, None);
                if let Err(error) = self.write(&mut compressed, &bytes) {
                    self.discard(compressed, None);
                    return Err(error);
                }
                Ok(compressed)
            }
            Err(source) => {
                self.discard(compressed, None);
                Err(StagingError::Io {
                    path: source_path,
                    source,
                })
            }
        }
    }
}

/// Trace records to JSONL batches under the trace key template.
#[derive(Debug)]
pub struct BatchSink {
    file: RotatingFile,
    sequence: SequenceFile,
    service: String,
    instance: String,
}

impl BatchSink {
    pub fn new(
        staging: Arc<Staging>,
        template: KeyTemplate,
        settings: BatchSettings,
        service: &str,
        instance: &str,
    ) -> std::io::Result<Self> {
        let sequence = SequenceFile::open(staging.root(), &format!("{instance}.traces"))?;
        let gzip = settings.gzip;
        Ok(Self {
            file: RotatingFile::new(staging, template, "application/x-ndjson", settings, gzip),
            sequence,
            service: service.to_owned(),
            instance: instance.to_owned(),
        })
    }

    /// The key of the batch being written, if any.
    pub fn current_key(&self) -> Option<&str> {
        self.file.current_key()
    }
}

impl TraceSink for BatchSink {
    fn write_record(&mut self, record: &[u8]) -> Result<(), StagingError> {
        let values = KeyValues {
            service: &self.service,
            instance: &self.instance,
            ..KeyValues::default()
        };
        self.file.append(record, None, &values, &mut self.sequence)
    }

    fn flush(&mut self) -> Result<(), StagingError> {
        self.file.flush()
    }

    fn maintain(&mut self) -> Result<(), StagingError> {
        self.file.maintain()
    }

    fn close(&mut self) -> Result<(), StagingError> {
        self.file.seal()
    }
}

#[cfg(test)]
mod tests {
    use super::super::key::{KeyField, DEFAULT_TRACE_TEMPLATE};
    use super::*;

    #[test]
    fn batches_rotate_by_size_and_seal_with_gzip() {
        let root = std::env::temp_dir().join(format!("scoretap-batch-{}", std::process::id()));
        std::fs::remove_dir_all(&root).ok();
        let staging = Arc::new(Staging::local(&root).expect("staging"));
        let template =
            KeyTemplate::parse(DEFAULT_TRACE_TEMPLATE, &[KeyField::Sequence]).expect("template");
        let mut sink = BatchSink::new(
            staging,
            template,
            BatchSettings {
                maximum_bytes: 5,
                maximum_age: Duration::from_secs(60),
                gzip: true,
            },
            "svc",
            "host-a",
        )
        .expect("sink");
        sink.write_record(b"{\"a\":1}").expect("write");
        let first = sink.current_key().expect("open").to_owned();
        sink.write_record(b"{\"a\":2}").expect("write");
        let second = sink.current_key().expect("open").to_owned();
        sink.close().expect("close");
        assert_ne!(first, second, "rotated past 5 bytes");
        assert!(first.ends_with("host-a-000001.jsonl"), "{first}");
        assert!(second.ends_with("host-a-000002.jsonl"), "{second}");
        assert!(!root.join(&first).exists(), "replaced by its .gz");
        let compressed = std::fs::read(root.join(format!("{second}.gz"))).expect("gz");
        let mut text = String::new();
        flate2::read::GzDecoder::new(&compressed[..])
            .read_to_string(&mut text)
            .expect("gunzip");
        assert_eq!(text, "{\"a\":2}\n");
        std::fs::remove_dir_all(&root).ok();
    }
}
