//! Where records go: stdout (one JSON line each, what the seeds' scoring scripts printed), or a
//! store (README, "Storage") named by one URL, through [`crate::storage`].

use std::io::{BufWriter, Write};
use std::path::PathBuf;

use crate::storage::staging::StagingError;

/// A store named by one URL (README, "Storage"): `blob` pointers use the same schemes.
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
pub enum StoreLocationError {
    /// Not a form scoretap knows.
    #[error("expected stdout, file:///DIR, a directory path, s3://BUCKET[/PREFIX] or az://CONTAINER[/PREFIX]; got '{}'", crate::storage::remote::sanitize(.0))]
    Unrecognized(String),
    /// An `s3://` or `az://` URL with a query or fragment: a SAS token pasted into the URL would
    /// otherwise become part of every key, and of every log line naming the store. The query is
    /// not repeated in the message.
    #[error("'{without_query}?…' takes no query: give a SAS token in AZURE_STORAGE_SAS_TOKEN and other credentials in the environment (the query is not shown, as it may hold one)")]
    QueryNotAllowed { without_query: String },
    /// An `s3://` or `az://` URL whose bucket or container name no store accepts.
    #[error("'{name}' in '{text}' is not a valid {kind} name: expected at least 3 characters, letters, digits, '-' and '.' only (S3 and Azure names are 3 to 63 characters)")]
    InvalidName {
        text: String,
        name: String,
        /// "bucket" or "container".
        kind: &'static str,
    },
}

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
                if let Some((before, _)) = text.split_once(['?', '#']) {
                    return Err(StoreLocationError::QueryNotAllowed {
                        without_query: before.to_owned(),
                    });
                }
                let (name, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                let prefix = prefix.trim_matches('/');
                let valid_name = name.len() >= 3
                    && name
                        .bytes()
                        .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'.');
                if !valid_name {
                    return Err(StoreLocationError::InvalidName {
                        text: text.to_owned(),
                        name: name.to_owned(),
                        kind: if azure { "container" } else { "bucket" },
                    });
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
                None if text.contains("://") => {
                    return Err(StoreLocationError::Unrecognized(text.to_owned()))
                }
                None => text,
            },
        };
        if path.is_empty() {
            return Err(StoreLocationError::Unrecognized(text.to_owned()));
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
    fn write_record(&mut self, record: &[u8]) -> Result<(), StagingError>;
    /// Makes written records visible (called after each batch and when stopping).
    fn flush(&mut self) -> Result<(), StagingError>;
    /// Periodic upkeep (sealing batches by age).
    fn maintain(&mut self) -> Result<(), StagingError> {
        Ok(())
    }
    /// The collector is stopping: seal what is open.
    fn close(&mut self) -> Result<(), StagingError> {
        self.flush()
    }
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

fn stdout_error(source: std::io::Error) -> StagingError {
    StagingError::Io {
        path: PathBuf::from("stdout"),
        source,
    }
}

impl TraceSink for StdoutSink {
    fn write_record(&mut self, record: &[u8]) -> Result<(), StagingError> {
        self.out.write_all(record).map_err(stdout_error)?;
        self.out.write_all(b"\n").map_err(stdout_error)
    }

    fn flush(&mut self) -> Result<(), StagingError> {
        self.out.flush().map_err(stdout_error)
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
        let short = StoreLocation::parse("s3://b/p")
            .expect_err("a one-letter bucket")
            .to_string();
        assert!(
            short.contains("'b' in 's3://b/p' is not a valid bucket name")
                && short.contains("at least 3 characters"),
            "{short}"
        );
        let container = StoreLocation::parse("az://a_b/x")
            .expect_err("an underscore")
            .to_string();
        assert!(container.contains("valid container name"), "{container}");
        assert!(StoreLocation::parse("ftp://x/y")
            .expect_err("unknown scheme")
            .to_string()
            .starts_with("expected stdout, file:///DIR"));
        assert_eq!(
            StoreLocation::parse("s3://bucket/p")
                .expect("parse")
                .object_url("bodies/x/request"),
            "s3://bucket/p/bodies/x/request"
        );
    }

    /// A query (a pasted SAS token) is refused, and no error repeats it.
    #[test]
    fn store_urls_with_a_query_are_refused_without_repeating_it() {
        for (text, shown) in [
            (
                "az://scoring/traces?sv=2024&sig=SECRETSIG",
                "'az://scoring/traces?…'",
            ),
            ("s3://traces-bucket/p#SECRETSIG", "'s3://traces-bucket/p?…'"),
            (
                "https://account.blob.core.windows.net/scoring?sv=1&sig=SECRETSIG",
                "'https://account.blob.core.windows.net/scoring?sv=1&sig=[redacted]'",
            ),
        ] {
            let message = StoreLocation::parse(text).expect_err("refused").to_string();
            assert!(message.contains(shown), "{message}");
            assert!(!message.contains("SECRETSIG"), "{message}");
        }
        assert!(StoreLocation::parse("az://scoring/traces?sig=x")
            .expect_err("refused")
            .to_string()
            .contains("AZURE_STORAGE_SAS_TOKEN"));
    }
}
