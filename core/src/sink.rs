//! Where records go: stdout (one JSON line each, what the seeds' scoring scripts printed), or
//! rotating JSONL files in the store layout (shared README §3):
//! `traces/<service>/<yyyy>/<mm>/<dd>/<HH>/<instance>-<seq>.jsonl`.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// A store named by one URL (shared README §3): `blob` pointers use the same schemes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// Records on standard output.
    Stdout,
    /// A local directory (the embedded default).
    Directory(PathBuf),
    /// An S3-compatible bucket, with a key prefix (empty or ending in `/`).
    S3 { bucket: String, prefix: String },
    /// An Azure Blob container, with a key prefix (empty or ending in `/`).
    Azure { container: String, prefix: String },
}

/// A store URL that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("expected stdout, file:///DIR, a directory path, s3://BUCKET[/PREFIX] or az://CONTAINER[/PREFIX]; got '{0}'")]
pub struct StoreLocationError(String);

impl StoreLocation {
    /// Parses `stdout`, `file:///abs/dir`, `file://./relative`, `file:dir`, a plain path,
    /// `s3://bucket/prefix` or `az://container/prefix`.
    pub fn parse(text: &str) -> Result<Self, StoreLocationError> {
        let text = text.trim();
        if text == "stdout" || text == "-" {
            return Ok(StoreLocation::Stdout);
        }
        for (scheme, azure) in [("s3://", false), ("az://", true)] {
            if let Some(rest) = text.strip_prefix(scheme) {
                let (name, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                let prefix = prefix.trim_matches('/');
                let valid_name = name.len() >= 3
                    && name
                        .bytes()
                        .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'.');
                if !valid_name {
                    return Err(StoreLocationError(text.to_owned()));
                }
                let prefix = if prefix.is_empty() {
                    String::new()
                } else {
                    format!("{prefix}/")
                };
                let name = name.to_owned();
                return Ok(if azure {
                    StoreLocation::Azure {
                        container: name,
                        prefix,
                    }
                } else {
                    StoreLocation::S3 {
                        bucket: name,
                        prefix,
                    }
                });
            }
        }
        let path = match text.strip_prefix("file://") {
            Some(rest) => rest,
            None => match text.strip_prefix("file:") {
                Some(rest) => rest,
                None if text.contains("://") => return Err(StoreLocationError(text.to_owned())),
                None => text,
            },
        };
        if path.is_empty() {
            return Err(StoreLocationError(text.to_owned()));
        }
        Ok(StoreLocation::Directory(PathBuf::from(path)))
    }

    /// The URL form of the store itself, as logs show it.
    pub fn url(&self) -> String {
        self.object_url("")
    }

    /// The URL of one object of the store, as a record's `blob` shows it. `key` is relative to
    /// the store's prefix.
    pub fn object_url(&self, key: &str) -> String {
        match self {
            StoreLocation::Stdout => "stdout".into(),
            StoreLocation::Directory(path) => {
                let absolute = std::path::absolute(path).unwrap_or_else(|_| path.clone());
                let joined = if key.is_empty() {
                    absolute
                } else {
                    absolute.join(key)
                };
                format!("file://{}", joined.display())
            }
            StoreLocation::S3 { bucket, prefix } => format!("s3://{bucket}/{prefix}{key}"),
            StoreLocation::Azure { container, prefix } => {
                format!("az://{container}/{prefix}{key}")
            }
        }
    }

    /// Whether objects go to a remote store (through the local spool).
    pub fn is_remote(&self) -> bool {
        matches!(self, StoreLocation::S3 { .. } | StoreLocation::Azure { .. })
    }

    /// The `sink` label of this store's dependency metrics.
    pub fn sink_label(&self) -> &'static str {
        match self {
            StoreLocation::Stdout => "stdout",
            StoreLocation::Directory(_) => "file",
            StoreLocation::S3 { .. } => "s3",
            StoreLocation::Azure { .. } => "azure",
        }
    }
}

/// A destination for finished records.
pub trait TraceSink: Send {
    /// Writes one record (a JSON object without its newline).
    fn write_record(&mut self, record: &[u8]) -> std::io::Result<()>;
    /// Makes written records visible (called after each batch and when stopping).
    fn flush(&mut self) -> std::io::Result<()>;
}

/// Records on standard output, one per line.
#[derive(Debug)]
pub struct StdoutSink {
    out: BufWriter<std::io::Stdout>,
}

impl StdoutSink {
    pub fn new() -> Self {
        Self {
            out: BufWriter::with_capacity(256 * 1024, std::io::stdout()),
        }
    }
}

impl Default for StdoutSink {
    fn default() -> Self {
        Self::new()
    }
}

impl TraceSink for StdoutSink {
    fn write_record(&mut self, record: &[u8]) -> std::io::Result<()> {
        self.out.write_all(record)?;
        self.out.write_all(b"\n")
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// `yyyy/mm/dd/HH` of a time, UTC.
pub fn hour_path(time: SystemTime) -> String {
    let text = humantime::format_rfc3339_seconds(time).to_string();
    // 2026-11-23T17:20:45Z
    format!(
        "{}/{}/{}/{}",
        &text[0..4],
        &text[5..7],
        &text[8..10],
        &text[11..13]
    )
}

/// Rotating JSONL files under `<root>/traces/<service>/<yyyy>/<mm>/<dd>/<HH>/`: a new file each
/// hour and whenever the current one reaches its size limit.
#[derive(Debug)]
pub struct FileSink {
    root: PathBuf,
    service: String,
    instance: String,
    maximum_file_bytes: u64,
    current: Option<OpenFile>,
}

#[derive(Debug)]
struct OpenFile {
    hour: String,
    path: PathBuf,
    writer: BufWriter<File>,
    written: u64,
}

impl FileSink {
    pub fn new(root: &Path, service: &str, instance: &str, maximum_file_bytes: u64) -> Self {
        Self {
            root: root.to_owned(),
            service: service.to_owned(),
            instance: instance.to_owned(),
            maximum_file_bytes: maximum_file_bytes.max(1),
            current: None,
        }
    }

    /// The directory the traces of this sink's service go to.
    pub fn service_directory(&self) -> PathBuf {
        self.root.join("traces").join(&self.service)
    }

    /// The file currently written, if any.
    pub fn current_path(&self) -> Option<&Path> {
        self.current.as_ref().map(|file| file.path.as_path())
    }

    fn open(&self, hour: String) -> std::io::Result<OpenFile> {
        let directory = self.service_directory().join(&hour);
        std::fs::create_dir_all(&directory)?;
        // A restarted instance continues after the files it already wrote this hour.
        let mut sequence = 1u64;
        loop {
            let path = directory.join(format!("{}-{sequence:06}.jsonl", self.instance));
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => {
                    return Ok(OpenFile {
                        hour,
                        path,
                        writer: BufWriter::with_capacity(256 * 1024, file),
                        written: 0,
                    })
                }
                Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => sequence += 1,
                Err(error) => return Err(error),
            }
        }
    }
}

impl TraceSink for FileSink {
    fn write_record(&mut self, record: &[u8]) -> std::io::Result<()> {
        let hour = hour_path(SystemTime::now());
        let rotate = match &self.current {
            Some(file) => file.hour != hour || file.written >= self.maximum_file_bytes,
            None => true,
        };
        if rotate {
            if let Some(mut previous) = self.current.take() {
                previous.writer.flush()?;
            }
            self.current = Some(self.open(hour)?);
        }
        let Some(file) = self.current.as_mut() else {
            return Err(std::io::Error::other("no trace file open"));
        };
        file.writer.write_all(record)?;
        file.writer.write_all(b"\n")?;
        file.written += record.len() as u64 + 1;
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self.current.as_mut() {
            Some(file) => file.writer.flush(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_locations_parse() {
        assert_eq!(
            StoreLocation::parse("stdout").ok(),
            Some(StoreLocation::Stdout)
        );
        assert_eq!(
            StoreLocation::parse("file:///var/lib/scoretap").ok(),
            Some(StoreLocation::Directory("/var/lib/scoretap".into()))
        );
        assert_eq!(
            StoreLocation::parse("./data").ok(),
            Some(StoreLocation::Directory("./data".into()))
        );
        assert!(StoreLocation::parse("ftp://x/y").is_err());
        assert_eq!(
            StoreLocation::parse("s3://traces-bucket/team/a/").ok(),
            Some(StoreLocation::S3 {
                bucket: "traces-bucket".into(),
                prefix: "team/a/".into()
            })
        );
        assert_eq!(
            StoreLocation::parse("az://scoring").ok(),
            Some(StoreLocation::Azure {
                container: "scoring".into(),
                prefix: String::new()
            })
        );
        assert!(StoreLocation::parse("s3://").is_err());
        assert!(StoreLocation::parse("az://a b/x").is_err());
        assert_eq!(
            StoreLocation::parse("s3://bucket/p")
                .expect("parse")
                .object_url("bodies/x/request"),
            "s3://bucket/p/bodies/x/request"
        );
    }

    #[test]
    fn files_rotate_by_size_in_the_hour_layout() {
        let root = std::env::temp_dir().join(format!("scoretap-sink-{}", std::process::id()));
        let mut sink = FileSink::new(&root, "svc", "host-a", 5);
        sink.write_record(b"{\"a\":1}").expect("write");
        let first = sink.current_path().expect("open").to_owned();
        sink.write_record(b"{\"a\":2}").expect("write");
        sink.flush().expect("flush");
        let second = sink.current_path().expect("open").to_owned();
        assert_ne!(first, second, "rotated past 5 bytes");
        assert!(first.ends_with("host-a-000001.jsonl"), "{first:?}");
        assert!(second.ends_with("host-a-000002.jsonl"), "{second:?}");
        let relative = first.strip_prefix(root.join("traces/svc")).expect("layout");
        assert_eq!(
            relative.components().count(),
            5,
            "yyyy/mm/dd/HH/file: {relative:?}"
        );
        assert_eq!(
            std::fs::read_to_string(&second).expect("read"),
            "{\"a\":2}\n"
        );
        std::fs::remove_dir_all(&root).ok();
    }
}
