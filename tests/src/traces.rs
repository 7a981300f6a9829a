//! Reading what capture wrote: trace files of a `file://` store (README, "Storage"), JSONL on
//! stdout, the record contract `scoretap.trace/1` (§2), and the admin capture endpoints.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::raw::{request_bytes, RawConn, RawResponse};
use crate::util::{looks_like_uuid, TempDir};

/// The schema name every record carries.
pub const SCHEMA: &str = "scoretap.trace/1";
/// The largest serialized record (one JSONL line without its newline).
pub const MAX_RECORD_BYTES: usize = 65_536;
/// How long tests wait for a record to show up (the collector flushes every ~200 ms).
pub const RECORD_WAIT: Duration = Duration::from_secs(10);

static NULL: Value = Value::Null;

/// One record as read back: the raw line, its JSON, and the file it came from (if any).
#[derive(Debug, Clone)]
pub struct TraceRecord {
    pub line: String,
    pub json: Value,
    pub file: Option<PathBuf>,
}

impl TraceRecord {
    /// The value at a JSON pointer (`/request/body/size`), `null` when absent.
    pub fn at(&self, pointer: &str) -> &Value {
        self.json.pointer(pointer).unwrap_or(&NULL)
    }
    pub fn str_at(&self, pointer: &str) -> Option<&str> {
        self.at(pointer).as_str()
    }
    pub fn u64_at(&self, pointer: &str) -> Option<u64> {
        self.at(pointer).as_u64()
    }
    pub fn correlation_id(&self) -> &str {
        self.str_at("/correlation_id").unwrap_or("")
    }
    /// A header of the request (`"request"`) or response (`"response"`), a string or the first
    /// of an array of strings.
    pub fn header(&self, part: &str, name: &str) -> Option<String> {
        header_value(self.at(&format!("/{part}/headers")), name)
    }
    /// Compact description for assertion messages (the line, cut).
    pub fn brief(&self) -> String {
        cut(&self.line, 3000)
    }
}

/// A header value out of a record's `headers` object (string, or array of strings → first).
pub fn header_value(headers: &Value, name: &str) -> Option<String> {
    match headers.get(name)? {
        Value::String(s) => Some(s.clone()),
        Value::Array(a) => a.first().and_then(Value::as_str).map(str::to_string),
        other => Some(other.to_string()),
    }
}

/// `s` cut to at most `n` bytes (on a char boundary), with a marker when cut.
pub fn cut(s: &str, n: usize) -> String {
    if s.len() <= n {
        return s.to_string();
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[{} bytes]", &s[..end], s.len())
}

/// Parse JSONL text into records. Only newline-terminated lines are taken (a writer may be in the
/// middle of the last one); a complete line that is not JSON is a test failure.
pub fn parse_jsonl(text: &str, file: Option<&Path>) -> Vec<TraceRecord> {
    let mut out = Vec::new();
    let complete = match text.rfind('\n') {
        Some(i) => &text[..i],
        None => return out,
    };
    for line in complete.split('\n') {
        if line.trim().is_empty() {
            continue;
        }
        let json: Value = serde_json::from_str(line).unwrap_or_else(|e| {
            panic!(
                "trace line is not JSON ({e}) in {:?}: {}",
                file,
                cut(line, 2000)
            )
        });
        out.push(TraceRecord {
            line: line.to_string(),
            json,
            file: file.map(Path::to_path_buf),
        });
    }
    out
}

/// Every file below `dir`, recursively (sorted).
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(_) => out.push(p),
                Err(_) => {}
            }
        }
    }
    out.sort();
    out
}

/// A `file://` trace store in a fresh temp dir (removed on drop).
#[derive(Debug)]
pub struct TraceStore {
    dir: TempDir,
}

impl Default for TraceStore {
    fn default() -> Self {
        Self::new()
    }
}

impl TraceStore {
    pub fn new() -> Self {
        Self {
            dir: TempDir::new("store"),
        }
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    /// `file:///ABS/DIR`
    pub fn url(&self) -> String {
        format!("file://{}", self.path().display())
    }
    /// `["--store", url]`
    pub fn args(&self) -> Vec<String> {
        vec!["--store".into(), self.url()]
    }
    /// Trace batch files (`traces/**/*.jsonl`).
    pub fn trace_files(&self) -> Vec<PathBuf> {
        walk(&self.path().join("traces"))
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
            .collect()
    }
    /// Every record in every trace file.
    pub fn records(&self) -> Vec<TraceRecord> {
        let mut out = Vec::new();
        for f in self.trace_files() {
            let Ok(text) = std::fs::read_to_string(&f) else {
                continue;
            };
            out.extend(parse_jsonl(&text, Some(&f)));
        }
        out
    }
    /// Records with this correlation id.
    pub fn find_all(&self, correlation_id: &str) -> Vec<TraceRecord> {
        self.records()
            .into_iter()
            .filter(|r| r.correlation_id() == correlation_id)
            .collect()
    }
    pub fn find(&self, correlation_id: &str) -> Option<TraceRecord> {
        self.find_all(correlation_id).into_iter().next()
    }
    /// Poll until a record with this correlation id exists (panics after [`RECORD_WAIT`] with
    /// what the store holds). The record's shape is checked against the contract.
    pub async fn wait(&self, correlation_id: &str) -> TraceRecord {
        let deadline = Instant::now() + RECORD_WAIT;
        loop {
            if let Some(r) = self.find(correlation_id) {
                assert_record_shape(&r);
                return r;
            }
            if Instant::now() > deadline {
                let seen: Vec<String> = self
                    .records()
                    .iter()
                    .map(|r| r.correlation_id().to_string())
                    .collect();
                panic!(
                    "no trace record with correlation_id {correlation_id:?} within {RECORD_WAIT:?} in {}; \
                     files {:?}; correlation ids seen {seen:?}",
                    self.path().display(),
                    self.trace_files()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    /// Exactly one record for the id: waits for it, then gives a duplicate time to show up.
    pub async fn wait_one(&self, correlation_id: &str) -> TraceRecord {
        let r = self.wait(correlation_id).await;
        let all = self.find_all(correlation_id);
        assert_eq!(
            all.len(),
            1,
            "expected exactly one record for {correlation_id:?}, found {}: {:#?}",
            all.len(),
            all.iter().map(TraceRecord::brief).collect::<Vec<_>>()
        );
        r
    }
    /// Every file in the store (trace batches and anything else, e.g. spilled bodies).
    pub fn all_files(&self) -> Vec<(PathBuf, Vec<u8>)> {
        walk(self.path())
            .into_iter()
            .filter_map(|p| std::fs::read(&p).ok().map(|b| (p, b)))
            .collect()
    }
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A UUID v7 in canonical text form.
pub fn is_uuid_v7(s: &str) -> bool {
    looks_like_uuid(s) && s.as_bytes()[14] == b'7'
}

/// RFC 3339 UTC with microseconds: `YYYY-MM-DDTHH:MM:SS.ffffff` then `Z` or `+00:00`.
pub fn is_rfc3339_utc_micros(s: &str) -> bool {
    let rest = if let Some(r) = s.strip_suffix('Z') {
        r
    } else if let Some(r) = s.strip_suffix("+00:00") {
        r
    } else {
        return false;
    };
    let b = rest.as_bytes();
    if b.len() != 26 {
        return false;
    }
    let digit = |i: usize| b[i].is_ascii_digit();
    (0..4).all(digit)
        && b[4] == b'-'
        && (5..7).all(digit)
        && b[7] == b'-'
        && (8..10).all(digit)
        && b[10] == b'T'
        && (11..13).all(digit)
        && b[13] == b':'
        && (14..16).all(digit)
        && b[16] == b':'
        && (17..19).all(digit)
        && b[19] == b'.'
        && (20..26).all(digit)
}

fn check_headers(what: &str, h: &Value, errs: &mut Vec<String>) {
    let Some(o) = h.as_object() else {
        errs.push(format!("{what}.headers is not an object: {h}"));
        return;
    };
    for (k, v) in o {
        if k.chars().any(|c| c.is_ascii_uppercase()) {
            errs.push(format!("{what}.headers key {k:?} is not lower-case"));
        }
        let ok = v.is_string() || v.as_array().is_some_and(|a| a.iter().all(Value::is_string));
        if !ok {
            errs.push(format!(
                "{what}.headers[{k:?}] is not a string (or array of strings): {v}"
            ));
        }
    }
}

fn check_body(what: &str, b: &Value, errs: &mut Vec<String>) {
    if !b.is_object() {
        errs.push(format!("{what}.body is not an object: {b}"));
        return;
    }
    if b["size"].as_u64().is_none() {
        errs.push(format!("{what}.body.size is not an unsigned integer"));
    }
    match &b["sha256"] {
        Value::Null => {}
        Value::String(s) if is_lower_hex(s, 64) => {}
        other => errs.push(format!(
            "{what}.body.sha256 is neither null nor 64 lower-case hex: {other}"
        )),
    }
    if !(b["content_type"].is_null() || b["content_type"].is_string()) {
        errs.push(format!("{what}.body.content_type is not string/null"));
    }
    // An excluded body (e.g. image/*) has no inline: its encoding and hash may be null.
    let excluded = b["excluded"].is_string();
    let encoding = b["encoding"].as_str().unwrap_or("");
    let encoding_ok =
        ["json", "utf8", "base64"].contains(&encoding) || (excluded && b["encoding"].is_null());
    if !encoding_ok {
        errs.push(format!(
            "{what}.body.encoding {:?} is not json|utf8|base64",
            b["encoding"]
        ));
    }
    if !b["truncated"].is_boolean() {
        errs.push(format!("{what}.body.truncated is not a bool"));
    }
    if !b["complete"].is_boolean() {
        errs.push(format!("{what}.body.complete is not a bool"));
    }
    if b.get("inline").is_none() {
        errs.push(format!("{what}.body.inline is missing"));
    }
    if !(b["blob"].is_null() || b["blob"].is_string()) {
        errs.push(format!("{what}.body.blob is not string/null"));
    }
    if encoding == "base64" && !(b["inline"].is_string() || b["inline"].is_null()) {
        errs.push(format!("{what}.body.inline is base64 but not a string"));
    }
    if !excluded && b["complete"] == Value::Bool(true) && !b["sha256"].is_string() {
        errs.push(format!("{what}.body is complete but has no sha256"));
    }
    match &b["excluded"] {
        Value::Null => {}
        Value::String(_) => {
            if !b["inline"].is_null() {
                errs.push(format!("{what}.body is excluded but inline is not null"));
            }
        }
        other => errs.push(format!("{what}.body.excluded is not string/null: {other}")),
    }
}

/// Problems with a record against the §2 contract (empty when it conforms).
pub fn record_shape_errors(r: &TraceRecord) -> Vec<String> {
    let mut errs = Vec::new();
    let j = &r.json;
    if r.line.len() > MAX_RECORD_BYTES {
        errs.push(format!(
            "record line is {} bytes > {MAX_RECORD_BYTES}",
            r.line.len()
        ));
    }
    if r.line.contains('\n') {
        errs.push("record line contains a newline".into());
    }
    if j["schema"] != SCHEMA {
        errs.push(format!("schema {:?} != {SCHEMA:?}", j["schema"]));
    }
    if !j["id"].as_str().is_some_and(is_uuid_v7) {
        errs.push(format!("id {:?} is not a UUID v7", j["id"]));
    }
    if j["correlation_id"].as_str().is_none_or(str::is_empty) {
        errs.push(format!(
            "correlation_id {:?} is not a non-empty string",
            j["correlation_id"]
        ));
    }
    if !j["service"].is_string() {
        errs.push(format!("service {:?} is not a string", j["service"]));
    }
    if !j["started_at"].as_str().is_some_and(is_rfc3339_utc_micros) {
        errs.push(format!(
            "started_at {:?} is not RFC 3339 UTC with microseconds",
            j["started_at"]
        ));
    }
    if !j["duration_ms"].as_f64().is_some_and(|d| d >= 0.0) {
        errs.push(format!(
            "duration_ms {:?} is not a non-negative number",
            j["duration_ms"]
        ));
    }
    let outcomes = [
        "ok",
        "upstream_error",
        "upstream_timeout",
        "client_cancelled",
        "proxy_error",
    ];
    if !j["outcome"].as_str().is_some_and(|o| outcomes.contains(&o)) {
        errs.push(format!(
            "outcome {:?} is not one of {outcomes:?}",
            j["outcome"]
        ));
    }
    match &j["error"] {
        Value::Null => {}
        Value::Object(o) => {
            if !o.get("kind").is_some_and(Value::is_string)
                || !o.get("message").is_some_and(Value::is_string)
            {
                errs.push(format!("error lacks string kind/message: {}", j["error"]));
            }
        }
        other => errs.push(format!("error is neither null nor an object: {other}")),
    }
    let req = &j["request"];
    if !req.is_object() {
        errs.push("request is not an object".into());
    } else {
        if !req["method"].is_string() {
            errs.push("request.method is not a string".into());
        }
        if !req["path"].as_str().is_some_and(|p| p.starts_with('/')) {
            errs.push(format!(
                "request.path {:?} does not start with /",
                req["path"]
            ));
        }
        if !(req["query"].is_null() || req["query"].is_string()) {
            errs.push("request.query is not string/null".into());
        }
        if !req["http_version"]
            .as_str()
            .is_some_and(|v| ["HTTP/1.0", "HTTP/1.1", "HTTP/2", "HTTP/2.0"].contains(&v))
        {
            errs.push(format!(
                "request.http_version {:?} unexpected",
                req["http_version"]
            ));
        }
        check_headers("request", &req["headers"], &mut errs);
        check_body("request", &req["body"], &mut errs);
    }
    let resp = &j["response"];
    if !resp.is_null() {
        if !resp["status"]
            .as_u64()
            .is_some_and(|s| (100..600).contains(&s))
        {
            errs.push(format!(
                "response.status {:?} is not a status",
                resp["status"]
            ));
        }
        check_headers("response", &resp["headers"], &mut errs);
        check_body("response", &resp["body"], &mut errs);
        let t = &resp["trailers"];
        if !(t.is_null() || t.is_object()) {
            errs.push(format!("response.trailers is not object/null: {t}"));
        }
    }
    errs
}

/// Panic (showing the record) if it does not follow the contract.
pub fn assert_record_shape(r: &TraceRecord) {
    let errs = record_shape_errors(r);
    assert!(
        errs.is_empty(),
        "trace record violates scoretap.trace/1: {errs:#?}\nrecord: {}",
        r.brief()
    );
}

/// Decode base64 (standard or URL-safe alphabet, padding optional).
pub fn base64_decode(s: &str) -> Vec<u8> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        } as u32)
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0u32;
    for &c in s.as_bytes() {
        if c == b'=' || c.is_ascii_whitespace() {
            continue;
        }
        let v = val(c).unwrap_or_else(|| panic!("invalid base64 character {:?}", c as char));
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// One admin request over HTTP/1.1 (`connection: close`); None if the listener is unreachable.
pub async fn admin_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<RawResponse> {
    admin_request_from(None, addr, method, path, headers, body).await
}

/// [`admin_request`] from the local address `local` when given (`127.0.0.2`: another address of
/// this host, as a client on another host would be to the admin; a failed connect then panics).
pub async fn admin_request_from(
    local: Option<std::net::IpAddr>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<RawResponse> {
    let s = match local {
        Some(local) => crate::client::tcp_from(local, addr).await,
        None => tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
            .await
            .ok()?
            .ok()?,
    };
    let mut c = RawConn::from_io(Box::new(s));
    let host = addr.to_string();
    let len = body.len().to_string();
    let mut h: Vec<(&str, &str)> = vec![("host", &host), ("connection", "close")];
    if !body.is_empty() || method != "GET" {
        h.push(("content-length", &len));
    }
    h.extend_from_slice(headers);
    let req = request_bytes(&format!("{method} {path} HTTP/1.1"), &h, body);
    c.try_send(&req).await.ok()?;
    tokio::time::timeout(Duration::from_secs(10), c.try_read_response(false))
        .await
        .ok()?
}

/// `GET /capture` → its JSON (panics unless 200 + JSON).
pub async fn capture_state(admin: SocketAddr) -> Value {
    let r = admin_request(admin, "GET", "/capture", &[], b"")
        .await
        .expect("admin GET /capture: no response");
    assert_eq!(
        r.status(),
        200,
        "GET /capture status; body {}",
        r.body_str()
    );
    r.json()
}

/// `PUT /capture` with a JSON body and an optional bearer token → (status, body).
pub async fn put_capture(admin: SocketAddr, token: Option<&str>, body: &Value) -> (u16, Vec<u8>) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut h: Vec<(&str, &str)> = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        h.push(("authorization", a));
    }
    let r = admin_request(admin, "PUT", "/capture", &h, body.to_string().as_bytes())
        .await
        .expect("admin PUT /capture: no response");
    (r.status(), r.body)
}

/// A line of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The inline of a body decoded to bytes (base64 decoded; a string as its UTF-8; a JSON value
/// re-serialized).
pub fn inline_bytes(b: &Value) -> Vec<u8> {
    match (&b["inline"], b["encoding"].as_str()) {
        (Value::String(s), Some("base64")) => base64_decode(s),
        (Value::String(s), _) => s.as_bytes().to_vec(),
        (Value::Null, _) => Vec::new(),
        (v, _) => v.to_string().into_bytes(),
    }
}

/// Is `prefix` a (byte) prefix of `body`?
pub fn is_prefix(prefix: &[u8], body: &[u8]) -> bool {
    prefix.len() <= body.len() && &body[..prefix.len()] == prefix
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_known_vectors() {
        assert_eq!(base64_decode(""), b"");
        assert_eq!(base64_decode("Zg=="), b"f");
        assert_eq!(base64_decode("Zm8="), b"fo");
        assert_eq!(base64_decode("Zm9v"), b"foo");
        assert_eq!(base64_decode("Zm9vYmFy"), b"foobar");
        assert_eq!(base64_decode("//79"), [0xff, 0xfe, 0xfd]);
        assert_eq!(base64_decode("__79"), [0xff, 0xfe, 0xfd]);
    }

    #[test]
    fn timestamps_and_ids() {
        assert!(is_rfc3339_utc_micros("2025-01-02T03:04:05.123456Z"));
        assert!(is_rfc3339_utc_micros("2025-01-02T03:04:05.123456+00:00"));
        assert!(!is_rfc3339_utc_micros("2025-01-02T03:04:05Z"));
        assert!(!is_rfc3339_utc_micros("2025-01-02T03:04:05.123Z"));
        assert!(!is_rfc3339_utc_micros("2025-01-02 03:04:05.123456Z"));
        assert!(is_uuid_v7("01890a5d-ac96-774b-bcce-b302099a8057"));
        assert!(!is_uuid_v7("6ba7b810-9dad-41d1-80b4-00c04fd430c8"));
    }

    #[test]
    fn jsonl_takes_complete_lines_only() {
        let recs = parse_jsonl("{\"a\":1}\n{\"a\":2}\n{\"a\":", None);
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[1].at("/a"), &serde_json::json!(2));
        assert!(parse_jsonl("{\"a\":1}", None).is_empty());
    }

    #[test]
    fn shape_check_accepts_a_conforming_record() {
        let body = serde_json::json!({"size": 2, "sha256": "a".repeat(64), "content_type": null,
            "encoding": "utf8", "truncated": false, "inline": "hi", "blob": null, "complete": true});
        let j = serde_json::json!({
            "schema": SCHEMA, "id": "01890a5d-ac96-774b-bcce-b302099a8057", "correlation_id": "c",
            "service": "s", "started_at": "2025-01-02T03:04:05.123456Z", "duration_ms": 1.5,
            "outcome": "ok", "error": null,
            "request": {"method": "GET", "path": "/", "query": null, "http_version": "HTTP/1.1",
                "headers": {"a": "b", "c": ["d", "e"]}, "body": body},
            "response": {"status": 200, "headers": {}, "body": body, "trailers": {}},
        });
        let r = TraceRecord {
            line: j.to_string(),
            json: j,
            file: None,
        };
        assert_eq!(record_shape_errors(&r), Vec::<String>::new());
        let mut bad = r.clone();
        bad.json["request"]["headers"]["X-Up"] = "v".into();
        bad.json["response"]["body"]["sha256"] = Value::Null;
        assert_eq!(record_shape_errors(&bad).len(), 2);
    }
}
