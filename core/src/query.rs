//! Reading records back from a local store, newest first: what users ran as
//! `traces | where customDimensions contains "input" | limit 10`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Which records to return.
#[derive(Debug, Clone, Default)]
pub struct TraceQuery {
    /// Only records whose JSON text contains this.
    pub contains: Option<String>,
    /// At most this many records.
    pub limit: usize,
    /// Only records that started within this long before now.
    pub since: Option<Duration>,
    pub status: Option<StatusFilter>,
    /// Only records of this service.
    pub service: Option<String>,
}

/// What a query found, newest first, and how many records it looked at to find them.
#[derive(Debug, Clone, Default)]
pub struct QueryResult {
    pub records: Vec<String>,
    pub searched: usize,
}

/// A filter on the response status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFilter {
    /// `2xx`, `4xx`, `5xx`: the hundreds digit.
    Class(u16),
    /// One exact status.
    Exact(u16),
}

impl StatusFilter {
    /// Parses `5xx` or `503`.
    pub fn parse(text: &str) -> Result<Self, String> {
        const EXPECTED: &str = "expected a status class such as 5xx or a status such as 503";
        let text = text.trim().to_ascii_lowercase();
        if let Some(class) = text.strip_suffix("xx") {
            return match class.parse::<u16>() {
                Ok(class) if (1..=5).contains(&class) => Ok(StatusFilter::Class(class)),
                _ => Err(EXPECTED.into()),
            };
        }
        match text.parse::<u16>() {
            Ok(status) if (100..=599).contains(&status) => Ok(StatusFilter::Exact(status)),
            _ => Err(EXPECTED.into()),
        }
    }

    fn matches(self, status: Option<u64>) -> bool {
        let Some(status) = status else {
            return false;
        };
        match self {
            StatusFilter::Class(class) => status / 100 == u64::from(class),
            StatusFilter::Exact(exact) => status == u64::from(exact),
        }
    }
}

/// The directory part of a trace key template before its first field (`traces/` by default):
/// where batches are looked for.
pub fn template_directory(template: &str) -> &str {
    let fixed = template.split('{').next().unwrap_or_default();
    fixed.rfind('/').map_or("", |end| &fixed[..=end])
}

/// All trace files under `root`'s `directory`, newest first (by their path, then time).
fn trace_files(root: &Path, directory: &str) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let traces = root.join(directory);
    if !traces.is_dir() {
        return Ok(files);
    }
    let mut stack = vec![traces];
    while let Some(directory) = stack.pop() {
        for entry in std::fs::read_dir(&directory)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                stack.push(path);
            } else if is_trace_batch(&path.to_string_lossy()) {
                files.push(path);
            }
        }
    }
    // Paths end in yyyy/mm/dd/HH/<instance>-<seq>.jsonl: sorting the part after the service
    // directory sorts by time, then sequence.
    files.sort_by_cached_key(|path| {
        let components: Vec<String> = path
            .components()
            .rev()
            .take(5)
            .map(|component| component.as_os_str().to_string_lossy().into_owned())
            .collect();
        let modified = std::fs::metadata(path)
            .and_then(|meta| meta.modified())
            .ok();
        (components.into_iter().rev().collect::<Vec<_>>(), modified)
    });
    files.reverse();
    Ok(files)
}

/// Whether a file or object name is a trace batch (`.jsonl` or `.jsonl.gz`).
fn is_trace_batch(name: &str) -> bool {
    name.ends_with(".jsonl") || name.ends_with(".jsonl.gz")
}

/// The text of a batch, gunzipped when its name says so.
fn batch_text(name: &str, bytes: Vec<u8>) -> std::io::Result<String> {
    if name.ends_with(".gz") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut text)?;
        Ok(text)
    } else {
        String::from_utf8(bytes)
            .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidData, error))
    }
}

/// A query being answered: the filters, prepared once, and what was found.
struct Search<'q> {
    query: &'q TraceQuery,
    since: Option<String>,
    found: QueryResult,
}

impl<'q> Search<'q> {
    fn new(query: &'q TraceQuery) -> Self {
        Self {
            query,
            since: query.since.map(|since| {
                humantime::format_rfc3339_micros(SystemTime::now() - since).to_string()
            }),
            found: QueryResult::default(),
        }
    }

    fn done(&self) -> bool {
        self.found.records.len() >= self.query.limit
    }

    /// Takes the matching lines of one batch, newest (last) first.
    fn scan(&mut self, text: &str) {
        for line in text.lines().rev() {
            if self.done() {
                return;
            }
            if line.is_empty() {
                continue;
            }
            self.found.searched += 1;
            if let Some(needle) = &self.query.contains {
                if !line.contains(needle.as_str()) {
                    continue;
                }
            }
            if self.since.is_some() || self.query.status.is_some() || self.query.service.is_some() {
                let Ok(record) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                if let Some(since) = &self.since {
                    let started = record["started_at"].as_str().unwrap_or_default();
                    if started < since.as_str() {
                        continue;
                    }
                }
                if let Some(status) = self.query.status {
                    if !status.matches(record["response"]["status"].as_u64()) {
                        continue;
                    }
                }
                if let Some(service) = &self.query.service {
                    if record["service"].as_str() != Some(service.as_str()) {
                        continue;
                    }
                }
            }
            self.found.records.push(line.to_owned());
        }
    }
}

/// Finds records in a local store, newest first. `directory` is where batches are, relative to
/// `root` (see [`template_directory`]).
pub fn query_directory(
    root: &Path,
    directory: &str,
    query: &TraceQuery,
) -> std::io::Result<QueryResult> {
    let mut search = Search::new(query);
    for file in trace_files(root, directory)? {
        if search.done() {
            break;
        }
        let bytes = match std::fs::read(&file) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => return Err(error),
        };
        search.scan(&batch_text(&file.to_string_lossy(), bytes)?);
    }
    Ok(search.found)
}

/// Finds records in a remote store, newest first: lists the batches under `prefix` (the trace
/// key template's fixed start, e.g. `traces/`), newest key first, and reads them until enough
/// records are found.
pub async fn query_remote(
    store: &crate::storage::remote::RemoteStore,
    prefix: &str,
    query: &TraceQuery,
) -> Result<QueryResult, crate::storage::remote::StorageError> {
    let mut search = Search::new(query);
    let mut objects = store.list(prefix).await?;
    objects.retain(|object| is_trace_batch(&object.key));
    objects.sort_by(|left, right| right.key.cmp(&left.key));
    for object in objects {
        if search.done() {
            break;
        }
        let bytes = store.get(&object.key).await?;
        match batch_text(&object.key, bytes.to_vec()) {
            Ok(text) => search.scan(&text),
            Err(error) => tracing::warn!("{} is not a readable batch: {error}", object.key),
        }
    }
    Ok(search.found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_filters_parse() {
        assert_eq!(StatusFilter::parse("5xx"), Ok(StatusFilter::Class(5)));
        assert_eq!(StatusFilter::parse("404"), Ok(StatusFilter::Exact(404)));
        assert!(StatusFilter::parse("9xx").is_err());
        assert!(StatusFilter::Class(5).matches(Some(502)));
        assert!(!StatusFilter::Class(5).matches(None));
    }

    #[test]
    fn finds_newest_matching_records() {
        let root = std::env::temp_dir().join(format!("scoretap-query-{}", std::process::id()));
        let hour = root.join("traces/svc/2026/11/23/17");
        std::fs::create_dir_all(&hour).expect("dir");
        let now = humantime::format_rfc3339_micros(SystemTime::now()).to_string();
        std::fs::write(
            hour.join("a-000001.jsonl"),
            format!(
                "{{\"n\":1,\"started_at\":\"{now}\",\"response\":{{\"status\":200}},\"input\":1}}\n{{\"n\":2,\"started_at\":\"{now}\",\"response\":{{\"status\":502}}}}\n"
            ),
        )
        .expect("write");
        let all = query_directory(
            &root,
            "traces/",
            &TraceQuery {
                limit: 10,
                ..TraceQuery::default()
            },
        )
        .expect("query");
        assert_eq!(all.records.len(), 2);
        assert_eq!(all.searched, 2);
        assert!(all.records[0].contains("\"n\":2"), "newest first");
        let failing = query_directory(
            &root,
            "traces/",
            &TraceQuery {
                limit: 10,
                status: Some(StatusFilter::Class(5)),
                since: Some(Duration::from_secs(3600)),
                ..TraceQuery::default()
            },
        )
        .expect("query");
        assert_eq!(failing.records.len(), 1);
        let contains = query_directory(
            &root,
            "traces/",
            &TraceQuery {
                limit: 10,
                contains: Some("input".into()),
                ..TraceQuery::default()
            },
        )
        .expect("query");
        assert_eq!(contains.records.len(), 1);
        std::fs::remove_dir_all(&root).ok();
    }
}
