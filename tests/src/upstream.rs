//! A real hyper test upstream (HTTP/1.1, h2c, TLS) with a recorder.
//!
//! Endpoints (query parameters in brackets):
//! - `/echo`               streams the request body back (frame by frame); copies content-length/content-type
//! - `/sink`               consumes the body, answers JSON `{size, sha256, trailers}`
//! - `/headers`            answers JSON `{method, uri, version, headers: [[name, value], ...]}`
//! - `/bytes`  [size, chunk, chunked=1, gap_ms]  deterministic `util::pattern` body, streamed
//! - `/sse`    [events, gate, gap_ms]  text/event-stream; with `gate=NAME` each event waits for one
//!   permit of `TestUpstream::gate(NAME)`, so a test controls when the next event exists
//! - `/trailers`           body + trailers `grpc-status: 0`, `grpc-message: all-good`
//! - `/status/N`  [empty=1] status N (204/304 without body, 304 with an etag)
//! - `/head`               content-length 1234 (body only for GET)
//! - `/stall`              never answers
//! - `/delay`  [ms]        answers after a delay
//! - `/slow-body` [chunks, gap_ms, size]  headers at once, then chunks with gaps
//! - `/upgrade` [refuse=1] 101 + raw echo of the upgraded connection when the client asks to upgrade
//! - `/reset`  [when=headers|body]  fails before the head (connection dropped / RST_STREAM) or mid-body
//! - `/hop-response`       a response full of hop-by-hop headers
//! - `/expect-reject`      401 without reading the body
//! - anything else         200 "ok"
//!
//! Every response carries `x-upstream-version` (the HTTP version the upstream saw) and `x-upstream-conn`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::AbortHandle;

use crate::raw::Io;
use crate::tls::{Pki, ALPN_H1, ALPN_H2};
use crate::util::{pattern, Sha256};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type RespBody = UnsyncBoxBody<Bytes, BoxError>;

/// Which protocols the upstream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProto {
    /// HTTP/1.1 only.
    H1,
    /// HTTP/2 only (prior knowledge on plain TCP, ALPN h2 with TLS).
    H2,
    /// Both (h2c detected by preface; ALPN h2 + http/1.1 with TLS).
    Auto,
}

#[derive(Debug, Clone)]
pub struct UpstreamOptions {
    pub proto: UpstreamProto,
    pub tls: Option<Arc<Pki>>,
    /// HTTP/1 idle keep-alive limit (header read timeout): idle connections are closed after it.
    pub idle_timeout: Option<Duration>,
}

impl Default for UpstreamOptions {
    fn default() -> Self {
        Self {
            proto: UpstreamProto::Auto,
            tls: None,
            idle_timeout: None,
        }
    }
}

/// How the request body stream ended, as seen by the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyOutcome {
    /// Not (yet) finished, or not read at all.
    #[default]
    Pending,
    Complete,
    /// The body stream ended with an error: the sender went away mid-body.
    Error,
}

/// Mutable part of a recorded request.
#[derive(Debug, Clone, Default)]
pub struct RecState {
    pub body_bytes: u64,
    pub body_outcome: BodyOutcome,
    pub body_error: Option<String>,
    pub request_trailers: Option<HeaderMap>,
    /// The handler future was dropped before it produced a response (request cancelled).
    pub handler_dropped: bool,
    /// The response body was dropped before its end (response cancelled).
    pub response_dropped: bool,
    pub response_complete: bool,
}

/// One request as received by the upstream.
#[derive(Debug)]
pub struct Recorded {
    pub seq: usize,
    pub conn_id: usize,
    pub peer: SocketAddr,
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    pub at: Instant,
    state: Mutex<RecState>,
}

impl Recorded {
    pub fn path(&self) -> &str {
        self.uri.path()
    }
    pub fn path_and_query(&self) -> String {
        self.uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default()
    }
    /// `:authority` (HTTP/2) or the authority of an absolute-form target.
    pub fn authority(&self) -> Option<String> {
        self.uri.authority().map(|a| a.as_str().to_string())
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    }
    pub fn has(&self, name: &str) -> bool {
        self.headers.contains_key(name)
    }
    pub fn state(&self) -> RecState {
        self.state.lock().expect("lock").clone()
    }
    /// Did the upstream observe this request being cancelled (handler dropped, response body
    /// dropped early, or request body ending in an error)?
    pub fn cancelled(&self) -> bool {
        let s = self.state();
        s.handler_dropped || s.response_dropped || s.body_outcome == BodyOutcome::Error
    }
    fn update(&self, f: impl FnOnce(&mut RecState)) {
        f(&mut self.state.lock().expect("lock"));
    }
}

#[derive(Debug, Default)]
struct Shared {
    accepted: AtomicUsize,
    open: AtomicUsize,
    seq: AtomicUsize,
    requests: Mutex<Vec<Arc<Recorded>>>,
    gates: Mutex<HashMap<String, Arc<Semaphore>>>,
    tasks: Mutex<Vec<AbortHandle>>,
}

impl Shared {
    fn gate(&self, name: &str) -> Arc<Semaphore> {
        self.gates
            .lock()
            .expect("lock")
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(0)))
            .clone()
    }
}

/// A running test upstream; stops (and drops its connections) on drop.
#[derive(Debug)]
pub struct TestUpstream {
    pub addr: SocketAddr,
    pub opts: UpstreamOptions,
    shared: Arc<Shared>,
}

impl TestUpstream {
    /// Plain HTTP, both HTTP/1.1 and h2c.
    pub async fn start() -> Self {
        Self::start_with(UpstreamOptions::default()).await
    }

    pub async fn start_proto(proto: UpstreamProto) -> Self {
        Self::start_with(UpstreamOptions {
            proto,
            ..Default::default()
        })
        .await
    }

    pub async fn start_tls(proto: UpstreamProto, pki: Arc<Pki>) -> Self {
        Self::start_with(UpstreamOptions {
            proto,
            tls: Some(pki),
            ..Default::default()
        })
        .await
    }

    pub async fn start_with(opts: UpstreamOptions) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let shared = Arc::new(Shared::default());
        let acceptor = opts.tls.as_ref().map(|pki| {
            let alpn: Vec<&[u8]> = match opts.proto {
                UpstreamProto::H1 => vec![ALPN_H1],
                UpstreamProto::H2 => vec![ALPN_H2],
                UpstreamProto::Auto => vec![ALPN_H2, ALPN_H1],
            };
            tokio_rustls::TlsAcceptor::from(pki.server_config(&alpn))
        });
        let sh = shared.clone();
        let o = opts.clone();
        let accept_task = tokio::spawn(async move {
            loop {
                let Ok((tcp, peer)) = listener.accept().await else {
                    continue;
                };
                tcp.set_nodelay(true).ok();
                let conn_id = sh.accepted.fetch_add(1, Ordering::SeqCst) + 1;
                let sh2 = sh.clone();
                let o2 = o.clone();
                let acc = acceptor.clone();
                let t = tokio::spawn(async move {
                    sh2.open.fetch_add(1, Ordering::SeqCst);
                    let _open = OpenGuard(sh2.clone());
                    let io: Box<dyn Io> = match acc {
                        Some(a) => match a.accept(tcp).await {
                            Ok(s) => Box::new(s),
                            Err(_) => return,
                        },
                        None => Box::new(tcp),
                    };
                    serve_conn(io, peer, conn_id, o2, sh2.clone()).await;
                });
                sh.tasks.lock().expect("lock").push(t.abort_handle());
            }
        });
        shared
            .tasks
            .lock()
            .expect("lock")
            .push(accept_task.abort_handle());
        Self { addr, opts, shared }
    }

    /// Base URL (`http://127.0.0.1:PORT` or `https://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        let scheme = if self.opts.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    pub fn authority(&self) -> String {
        self.addr.to_string()
    }

    /// Number of TCP connections accepted so far.
    pub fn accepted_connections(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Number of connections currently open.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> Vec<Arc<Recorded>> {
        self.shared.requests.lock().expect("lock").clone()
    }

    pub fn request_count(&self) -> usize {
        self.shared.requests.lock().expect("lock").len()
    }

    /// The semaphore controlling `/sse?gate=NAME`.
    pub fn gate(&self, name: &str) -> Arc<Semaphore> {
        self.shared.gate(name)
    }

    /// First recorded request matching `pred`, if any.
    pub fn find(&self, pred: impl Fn(&Recorded) -> bool) -> Option<Arc<Recorded>> {
        self.requests().into_iter().find(|r| pred(r))
    }

    /// Wait up to `limit` for a request matching `pred`; panics with what was seen otherwise.
    pub async fn wait_request(
        &self,
        limit: Duration,
        pred: impl Fn(&Recorded) -> bool,
    ) -> Arc<Recorded> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(r) = self.find(&pred) {
                return r;
            }
            if Instant::now() > deadline {
                let seen: Vec<String> = self
                    .requests()
                    .iter()
                    .map(|r| format!("{} {}", r.method, r.uri))
                    .collect();
                panic!(
                    "upstream did not receive the expected request within {limit:?}; saw {seen:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Wait for a request whose path-and-query contains `needle`.
    pub async fn wait_path(&self, needle: &str) -> Arc<Recorded> {
        let n = needle.to_string();
        self.wait_request(Duration::from_secs(10), move |r| {
            r.path_and_query().contains(&n)
        })
        .await
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        for t in self.shared.tasks.lock().expect("lock").drain(..) {
            t.abort();
        }
    }
}

struct OpenGuard(Arc<Shared>);
impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn serve_conn(
    io: Box<dyn Io>,
    peer: SocketAddr,
    conn_id: usize,
    opts: UpstreamOptions,
    shared: Arc<Shared>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder = match opts.proto {
        UpstreamProto::H1 => builder.http1_only(),
        UpstreamProto::H2 => builder.http2_only(),
        UpstreamProto::Auto => builder,
    };
    if let Some(t) = opts.idle_timeout {
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(t);
    }
    let svc = service_fn(move |req: Request<Incoming>| {
        let shared = shared.clone();
        async move {
            handle(req, peer, conn_id, shared)
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))
        }
    });
    let _ = builder
        .serve_connection_with_upgrades(TokioIo::new(io), svc)
        .await;
}

/// Marks the request's handler as dropped unless disarmed.
struct HandlerGuard {
    rec: Arc<Recorded>,
    armed: bool,
}
impl Drop for HandlerGuard {
    fn drop(&mut self) {
        if self.armed {
            self.rec.update(|s| s.handler_dropped = true);
        }
    }
}

/// Request body wrapper that records bytes/trailers/outcome.
struct RecordingBody {
    inner: Incoming,
    rec: Arc<Recorded>,
}

impl RecordingBody {
    fn new(inner: Incoming, rec: Arc<Recorded>) -> Self {
        if inner.is_end_stream() {
            // An empty body (or END_STREAM on the headers) is complete before any poll.
            rec.update(|s| s.body_outcome = BodyOutcome::Complete);
        }
        Self { inner, rec }
    }
}

impl Body for RecordingBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let rec = self.rec.clone();
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                rec.update(|s| {
                    if s.body_outcome == BodyOutcome::Pending {
                        s.body_outcome = BodyOutcome::Complete;
                    }
                });
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    let n = d.len() as u64;
                    rec.update(|s| s.body_bytes += n);
                } else if let Some(t) = frame.trailers_ref() {
                    let t = t.clone();
                    rec.update(|s| s.request_trailers = Some(t));
                }
                // A length-delimited body is over once its last byte is read: hyper may never
                // poll for the final `None`.
                if self.inner.is_end_stream() {
                    rec.update(|s| {
                        if s.body_outcome == BodyOutcome::Pending {
                            s.body_outcome = BodyOutcome::Complete;
                        }
                    });
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let msg = e.to_string();
                rec.update(|s| {
                    s.body_outcome = BodyOutcome::Error;
                    s.body_error = Some(msg);
                });
                Poll::Ready(Some(Err(Box::new(e))))
            }
        }
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Response body wrapper that records completion or early drop.
struct GuardedBody {
    inner: RespBody,
    rec: Arc<Recorded>,
    done: bool,
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = r {
            self.done = true;
            self.rec.update(|s| s.response_complete = true);
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for GuardedBody {
    fn drop(&mut self) {
        if !self.done && !self.inner.is_end_stream() {
            self.rec.update(|s| s.response_dropped = true);
        } else if !self.done {
            self.rec.update(|s| s.response_complete = true);
        }
    }
}

fn boxed<B>(b: B) -> RespBody
where
    B: Body<Data = Bytes, Error = BoxError> + Send + 'static,
{
    b.boxed_unsync()
}

fn full(b: impl Into<Bytes>) -> RespBody {
    Full::new(b.into())
        .map_err(|e: Infallible| -> BoxError { match e {} })
        .boxed_unsync()
}

fn empty() -> RespBody {
    Empty::<Bytes>::new()
        .map_err(|e: Infallible| -> BoxError { match e {} })
        .boxed_unsync()
}

fn query(uri: &Uri) -> HashMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (p.to_string(), String::new()),
        })
        .collect()
}

fn qnum(q: &HashMap<String, String>, k: &str, default: u64) -> u64 {
    q.get(k).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "?",
    }
}

fn headers_json(h: &HeaderMap) -> serde_json::Value {
    serde_json::Value::Array(
        h.iter()
            .map(|(k, v)| serde_json::json!([k.as_str(), String::from_utf8_lossy(v.as_bytes())]))
            .collect(),
    )
}

async fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    conn_id: usize,
    shared: Arc<Shared>,
) -> Result<Response<RespBody>, BoxError> {
    let seq = shared.seq.fetch_add(1, Ordering::SeqCst) + 1;
    let rec = Arc::new(Recorded {
        seq,
        conn_id,
        peer,
        method: req.method().clone(),
        uri: req.uri().clone(),
        version: req.version(),
        headers: req.headers().clone(),
        at: Instant::now(),
        state: Mutex::new(RecState::default()),
    });
    shared.requests.lock().expect("lock").push(rec.clone());
    let mut guard = HandlerGuard {
        rec: rec.clone(),
        armed: true,
    };
    let version = req.version();
    let result = route(req, rec.clone(), &shared).await;
    guard.armed = false;
    let mut resp = result?;
    let resp_headers = resp.headers_mut();
    resp_headers.insert(
        "x-upstream-version",
        HeaderValue::from_static(version_str(version)),
    );
    resp_headers.insert("x-upstream-conn", HeaderValue::from(conn_id));
    resp_headers.insert("x-upstream-seq", HeaderValue::from(seq));
    let (parts, body) = resp.into_parts();
    let body = GuardedBody {
        inner: body,
        rec,
        done: false,
    };
    Ok(Response::from_parts(parts, boxed(body)))
}

fn err_msg(m: &str) -> BoxError {
    Box::new(std::io::Error::other(m.to_string()))
}

fn resp(status: u16, body: RespBody) -> Response<RespBody> {
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    r
}

async fn route(
    req: Request<Incoming>,
    rec: Arc<Recorded>,
    shared: &Shared,
) -> Result<Response<RespBody>, BoxError> {
    let q = query(req.uri());
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/echo" => {
            let cl = req.headers().get("content-length").cloned();
            let ct = req.headers().get("content-type").cloned();
            let body = RecordingBody::new(req.into_body(), rec);
            let mut r = resp(200, boxed(body));
            if let Some(cl) = cl {
                r.headers_mut().insert("content-length", cl);
            }
            r.headers_mut().insert(
                "content-type",
                ct.unwrap_or(HeaderValue::from_static("application/octet-stream")),
            );
            Ok(r)
        }
        "/sink" => {
            let mut body = RecordingBody::new(req.into_body(), rec);
            let mut h = Sha256::new();
            let mut size = 0u64;
            let mut trailers = serde_json::Map::new();
            while let Some(frame) = body.frame().await {
                let frame = frame?;
                if let Some(d) = frame.data_ref() {
                    size += d.len() as u64;
                    h.update(d);
                } else if let Some(t) = frame.trailers_ref() {
                    for (k, v) in t {
                        trailers.insert(
                            k.as_str().to_string(),
                            String::from_utf8_lossy(v.as_bytes()).into(),
                        );
                    }
                }
            }
            let j = serde_json::json!({"size": size, "sha256": h.finish(), "trailers": trailers});
            let mut r = resp(200, full(j.to_string()));
            r.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/json"));
            Ok(r)
        }
        "/headers" => {
            let j = serde_json::json!({
                "method": req.method().as_str(),
                "uri": req.uri().to_string(),
                "version": version_str(req.version()),
                "headers": headers_json(req.headers()),
            });
            let mut r = resp(200, full(j.to_string()));
            r.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/json"));
            Ok(r)
        }
        "/bytes" => {
            let size = qnum(&q, "size", 1024);
            let chunk = qnum(&q, "chunk", 65536).max(1);
            let gap = Duration::from_millis(qnum(&q, "gap_ms", 0));
            let chunked = q.get("chunked").is_some_and(|v| v == "1");
            let s = stream::unfold(0u64, move |off| async move {
                if off >= size {
                    return None;
                }
                if off > 0 && !gap.is_zero() {
                    tokio::time::sleep(gap).await;
                }
                let n = (size - off).min(chunk) as usize;
                let data = Bytes::from(pattern(off, n));
                Some((Ok::<_, BoxError>(Frame::data(data)), off + n as u64))
            });
            let mut r = resp(200, boxed(StreamBody::new(s)));
            if !chunked {
                r.headers_mut()
                    .insert("content-length", HeaderValue::from(size));
            }
            r.headers_mut().insert(
                "content-type",
                HeaderValue::from_static("application/octet-stream"),
            );
            Ok(r)
        }
        "/sse" => {
            let events = qnum(&q, "events", 3);
            let gap = Duration::from_millis(qnum(&q, "gap_ms", 0));
            let gate = q.get("gate").map(|g| shared.gate(g));
            let s = stream::unfold(0u64, move |i| {
                let gate = gate.clone();
                async move {
                    if i >= events {
                        return None;
                    }
                    if let Some(g) = gate {
                        g.acquire().await.ok()?.forget();
                    } else if i > 0 && !gap.is_zero() {
                        tokio::time::sleep(gap).await;
                    }
                    let ev = Bytes::from(format!("id: {i}\ndata: event-{i}\n\n"));
                    Some((Ok::<_, BoxError>(Frame::data(ev)), i + 1))
                }
            });
            let mut r = resp(200, boxed(StreamBody::new(s)));
            r.headers_mut().insert(
                "content-type",
                HeaderValue::from_static("text/event-stream"),
            );
            r.headers_mut()
                .insert("cache-control", HeaderValue::from_static("no-cache"));
            Ok(r)
        }
        "/trailers" => {
            let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
                Ok(Frame::data(Bytes::from_static(b"trailer-body"))),
                Ok(Frame::trailers({
                    let mut t = HeaderMap::new();
                    t.insert("grpc-status", HeaderValue::from_static("0"));
                    t.insert("grpc-message", HeaderValue::from_static("all-good"));
                    t
                })),
            ];
            // Drain the request body first so gRPC-like request trailers are recorded.
            let mut body = RecordingBody::new(req.into_body(), rec);
            while let Some(f) = body.frame().await {
                f?;
            }
            let mut r = resp(200, boxed(StreamBody::new(stream::iter(frames))));
            r.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/grpc"));
            r.headers_mut().insert(
                "trailer",
                HeaderValue::from_static("grpc-status, grpc-message"),
            );
            Ok(r)
        }
        p if p.starts_with("/status/") => {
            let code: u16 = p["/status/".len()..].parse().unwrap_or(200);
            let empty_body = q.get("empty").is_some_and(|v| v == "1");
            let mut r = if code == 204 || code == 304 || empty_body {
                resp(code, empty())
            } else {
                resp(code, full(format!("status {code}\n")))
            };
            if code == 304 {
                r.headers_mut()
                    .insert("etag", HeaderValue::from_static("\"v1\""));
            }
            if empty_body && code != 204 && code != 304 {
                r.headers_mut()
                    .insert("content-length", HeaderValue::from_static("0"));
            }
            Ok(r)
        }
        "/head" => {
            let body = if req.method() == Method::HEAD {
                empty()
            } else {
                full(pattern(0, 1234))
            };
            let mut r = resp(200, body);
            r.headers_mut()
                .insert("content-length", HeaderValue::from_static("1234"));
            Ok(r)
        }
        "/stall" => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        "/delay" => {
            let ms = qnum(&q, "ms", 1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(resp(200, full(format!("delayed {ms}"))))
        }
        "/slow-body" => {
            let chunks = qnum(&q, "chunks", 10);
            let gap = Duration::from_millis(qnum(&q, "gap_ms", 100));
            let size = qnum(&q, "size", 16) as usize;
            let s = stream::unfold(0u64, move |i| async move {
                if i >= chunks {
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(gap).await;
                }
                Some((
                    Ok::<_, BoxError>(Frame::data(Bytes::from(vec![b'a' + (i % 26) as u8; size]))),
                    i + 1,
                ))
            });
            Ok(resp(200, boxed(StreamBody::new(s))))
        }
        "/upgrade" => {
            let wants = req.headers().get("upgrade").cloned();
            let refuse = q.get("refuse").is_some_and(|v| v == "1");
            match wants {
                Some(proto) if !refuse => {
                    let on_upgrade = hyper::upgrade::on(req);
                    tokio::spawn(async move {
                        if let Ok(up) = on_upgrade.await {
                            let mut io = TokioIo::new(up);
                            let mut buf = vec![0u8; 65536];
                            loop {
                                match io.read(&mut buf).await {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => {
                                        if io.write_all(&buf[..n]).await.is_err() {
                                            break;
                                        }
                                        let _ = io.flush().await;
                                    }
                                }
                            }
                            let _ = io.shutdown().await;
                        }
                    });
                    let mut r = resp(101, empty());
                    r.headers_mut()
                        .insert("connection", HeaderValue::from_static("upgrade"));
                    r.headers_mut().insert("upgrade", proto);
                    Ok(r)
                }
                _ => Ok(resp(200, full("upgrade refused"))),
            }
        }
        "/reset" => {
            let when = q.get("when").map(String::as_str).unwrap_or("headers");
            if when == "headers" {
                return Err(err_msg("reset requested before headers"));
            }
            // 1000 bytes, a pause (so the head and first bytes reach the peer), then failure.
            let s = stream::unfold(0u8, |step| async move {
                match step {
                    0 => Some((
                        Ok::<_, BoxError>(Frame::data(Bytes::from(vec![b'x'; 1000]))),
                        1,
                    )),
                    1 => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Some((Err(err_msg("reset requested mid-body")), 2))
                    }
                    _ => None,
                }
            });
            let mut r = resp(200, boxed(StreamBody::new(s)));
            r.headers_mut()
                .insert("content-length", HeaderValue::from_static("100000"));
            Ok(r)
        }
        "/hop-response" => {
            let mut r = resp(200, full("hop"));
            let h = r.headers_mut();
            h.insert("connection", HeaderValue::from_static("x-resp-hop"));
            h.insert("x-resp-hop", HeaderValue::from_static("1"));
            h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
            h.insert(
                "proxy-authenticate",
                HeaderValue::from_static("Basic realm=\"x\""),
            );
            h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
            h.insert("upgrade", HeaderValue::from_static("foo/1"));
            h.insert("trailer", HeaderValue::from_static("x-never"));
            h.insert("x-end-to-end", HeaderValue::from_static("yes"));
            h.insert("content-length", HeaderValue::from_static("3"));
            Ok(r)
        }
        "/expect-reject" => Ok(resp(401, full("denied"))),
        _ => Ok(resp(200, full("ok"))),
    }
}
