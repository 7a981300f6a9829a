//! Small shared helpers: timeouts, deterministic payloads, SHA-256, free ports, temp dirs.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// Default bound for a single network step in a test.
pub const STEP: Duration = Duration::from_secs(10);

/// Await `fut`, panicking with `what` if it takes longer than `limit`.
/// Every await on the proxy goes through this so a broken proxy fails instead of hanging.
pub async fn within<F: Future>(limit: Duration, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// Poll `cond` every 20 ms until it returns true or `limit` passes. Returns whether it became true.
pub async fn eventually<F: FnMut() -> bool>(limit: Duration, mut cond: F) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const BLOCK: usize = 65_536;

fn base_block() -> &'static [u8] {
    static BASE: OnceLock<Vec<u8>> = OnceLock::new();
    BASE.get_or_init(|| {
        let mut x: u32 = 0x9E37_79B9;
        (0..BLOCK)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 24) as u8
            })
            .collect()
    })
}

/// Deterministic pseudo-random payload: the bytes at absolute positions `offset..offset+len`.
/// The test upstream serves `/bytes` with exactly this content, so tests can recompute it.
pub fn pattern(offset: u64, len: usize) -> Vec<u8> {
    let base = base_block();
    let mut out = Vec::with_capacity(len);
    let mut pos = offset;
    while out.len() < len {
        let block = pos / BLOCK as u64;
        let within = (pos % BLOCK as u64) as usize;
        let shift = ((block.wrapping_mul(7919)) % BLOCK as u64) as usize;
        let start = (within + shift) % BLOCK;
        let want = (len - out.len()).min(BLOCK - within).min(BLOCK - start);
        out.extend_from_slice(&base[start..start + want]);
        pos += want as u64;
    }
    out
}

/// SHA-256 of `data`, lower-case hex.
pub fn sha256_hex(data: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(data);
    h.finish()
}

/// Incremental SHA-256 (ring).
pub struct Sha256(ring::digest::Context);

impl std::fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sha256")
    }
}

impl Default for Sha256 {
    fn default() -> Self {
        Self::new()
    }
}

impl Sha256 {
    pub fn new() -> Self {
        Self(ring::digest::Context::new(&ring::digest::SHA256))
    }
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }
    pub fn finish(self) -> String {
        hex(self.0.finish().as_ref())
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of `pattern(0, size)`, computed in blocks.
pub fn pattern_sha256(size: u64) -> String {
    let mut h = Sha256::new();
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(1 << 20) as usize;
        h.update(&pattern(off, n));
        off += n as u64;
    }
    h.finish()
}

/// A free TCP port on 127.0.0.1, for a server a test starts later. Chosen below the kernel's
/// ephemeral range (32768–60999 by default), where outgoing connections of parallel tests take
/// their ports, so the port is far less likely to be taken between this check and the bind;
/// spread by process id and a counter so parallel test binaries don't pick the same ones.
pub fn free_port() -> u16 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    const LOW: u64 = 20_000;
    const SPAN: u64 = 12_000;
    let start = u64::from(std::process::id()).wrapping_mul(7_919);
    for _ in 0..SPAN {
        let candidate = LOW + (start + NEXT.fetch_add(1, Ordering::Relaxed) * 13) % SPAN;
        let port = candidate as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local_addr")
        .port()
}

/// A temp directory removed on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "scoretap-tests-{prefix}-{}-{}-{}",
            std::process::id(),
            nanos,
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self { path }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The command-line argument at `position` as a number, `default` when absent (for the load
/// binaries; a bad value panics naming its position).
pub fn numeric_argument(position: usize, default: u64) -> u64 {
    std::env::args()
        .nth(position)
        .map(|text| {
            text.parse()
                .unwrap_or_else(|_| panic!("argument {position}: expected a number, got {text}"))
        })
        .unwrap_or(default)
}

/// The workspace root (parent of the `tests/` crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Is `program` on PATH?
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Find a header value (case-insensitive name) in a list of pairs.
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// All values for a header name (case-insensitive) in a list of pairs.
pub fn header_all<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}

/// Is `s` a UUID in canonical textual form?
pub fn looks_like_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && [8, 4, 4, 4, 12]
            .iter()
            .zip(&parts)
            .all(|(n, p)| p.len() == *n && p.chars().all(|c| c.is_ascii_hexdigit()))
}
