//! Raw HTTP/1.x over TCP: for malformed requests, HTTP/1.0, absolute-form, Expect, upgrades,
//! and for asserting exact framing (content-length vs chunked) on the wire.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::util::{header, header_all};

/// Any bidirectional byte stream.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A parsed start line + header block.
#[derive(Debug, Clone, Default)]
pub struct Head {
    pub start_line: String,
    pub headers: Vec<(String, String)>,
    pub raw: Vec<u8>,
}

impl Head {
    fn token(&self, i: usize) -> &str {
        self.start_line.split(' ').nth(i).unwrap_or("")
    }
    /// Response: status code.
    pub fn status(&self) -> u16 {
        self.token(1).parse().unwrap_or(0)
    }
    /// Response: "HTTP/1.1" etc.
    pub fn version(&self) -> &str {
        self.token(0)
    }
    /// Request: method.
    pub fn method(&self) -> &str {
        self.token(0)
    }
    /// Request: target.
    pub fn target(&self) -> &str {
        self.token(1)
    }
    /// Request: version.
    pub fn request_version(&self) -> &str {
        self.token(2)
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        header_all(&self.headers, name)
    }
    pub fn has(&self, name: &str) -> bool {
        self.header(name).is_some()
    }
    /// Tokens of all `connection` header lines, lower-cased.
    pub fn connection_tokens(&self) -> Vec<String> {
        self.header_all("connection")
            .iter()
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect()
    }
}

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
    Close,
}

/// A complete HTTP/1 response read off the wire.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub head: Head,
    /// 1xx responses seen before the final one (e.g. 100 Continue).
    pub interim: Vec<Head>,
    pub body: Vec<u8>,
    pub trailers: Vec<(String, String)>,
    pub framing: Framing,
    /// false when the connection ended before the framing said the body was complete.
    pub complete: bool,
}

impl RawResponse {
    pub fn status(&self) -> u16 {
        self.head.status()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.header(name)
    }
    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}): status {} body {:?}",
                self.status(),
                self.body_str()
            )
        })
    }
}

/// A complete HTTP/1 request read off the wire (server side of the raw upstream).
#[derive(Debug, Clone)]
pub struct RawRequest {
    pub head: Head,
    pub body: Vec<u8>,
    pub trailers: Vec<(String, String)>,
    pub framing: Framing,
    pub complete: bool,
}

/// A buffered raw connection.
pub struct RawConn {
    io: Box<dyn Io>,
    buf: Vec<u8>,
    eof: bool,
}

impl std::fmt::Debug for RawConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawConn")
            .field("buffered", &self.buf.len())
            .field("eof", &self.eof)
            .finish()
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Response body framing per RFC 9112 §6.3.
pub fn response_framing(head: &Head, request_was_head: bool) -> Framing {
    let status = head.status();
    if request_was_head || (100..200).contains(&status) || status == 204 || status == 304 {
        return Framing::None;
    }
    if is_chunked(head) {
        return Framing::Chunked;
    }
    if let Some(cl) = head.header("content-length") {
        return Framing::Length(cl.trim().parse().unwrap_or(0));
    }
    Framing::Close
}

/// Request body framing per RFC 9112 §6.3.
pub fn request_framing(head: &Head) -> Framing {
    if is_chunked(head) {
        return Framing::Chunked;
    }
    match head.header("content-length") {
        Some(cl) => Framing::Length(cl.trim().parse().unwrap_or(0)),
        None => Framing::None,
    }
}

fn is_chunked(head: &Head) -> bool {
    head.header_all("transfer-encoding")
        .iter()
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .next_back()
        .is_some_and(|t| t == "chunked")
}

impl RawConn {
    pub async fn connect(addr: SocketAddr) -> Self {
        let s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
            .await
            .unwrap_or_else(|_| panic!("connect to {addr} timed out"))
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        s.set_nodelay(true).ok();
        Self::from_io(Box::new(s))
    }

    pub fn from_io(io: Box<dyn Io>) -> Self {
        Self {
            io,
            buf: Vec::new(),
            eof: false,
        }
    }

    /// Write all bytes and flush. Errors (peer closed) are returned, not panicked.
    pub async fn try_send(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.io.write_all(data).await?;
        self.io.flush().await
    }

    pub async fn send(&mut self, data: &[u8]) {
        self.try_send(data).await.expect("raw send");
    }

    /// Half-close the write side.
    pub async fn shutdown_write(&mut self) {
        let _ = self.io.shutdown().await;
    }

    /// Read more bytes into the buffer; returns false on EOF or error.
    async fn fill(&mut self) -> bool {
        if self.eof {
            return false;
        }
        let mut tmp = vec![0u8; 64 * 1024];
        match self.io.read(&mut tmp).await {
            Ok(0) | Err(_) => {
                self.eof = true;
                false
            }
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                true
            }
        }
    }

    /// Bytes currently buffered (already read from the socket).
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// Read one head (start line + headers). None if the connection closed first.
    pub async fn read_head(&mut self) -> Option<Head> {
        loop {
            if let Some(pos) = find(&self.buf, b"\r\n\r\n") {
                let raw: Vec<u8> = self.buf.drain(..pos + 4).collect();
                let text = String::from_utf8_lossy(&raw[..pos]).into_owned();
                let mut lines = text.split("\r\n");
                let start_line = lines.next().unwrap_or("").to_string();
                let headers = lines
                    .filter_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        Some((k.trim().to_string(), v.trim().to_string()))
                    })
                    .collect();
                return Some(Head {
                    start_line,
                    headers,
                    raw,
                });
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    async fn read_line(&mut self) -> Option<String> {
        loop {
            if let Some(pos) = find(&self.buf, b"\r\n") {
                let raw: Vec<u8> = self.buf.drain(..pos + 2).collect();
                return Some(String::from_utf8_lossy(&raw[..pos]).into_owned());
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// Read exactly `n` bytes (fewer if the connection ends).
    pub async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            if !self.fill().await {
                break;
            }
        }
        let take = n.min(self.buf.len());
        self.buf.drain(..take).collect()
    }

    /// Whatever is buffered, or one read's worth. Empty on EOF.
    pub async fn read_some(&mut self) -> Vec<u8> {
        if self.buf.is_empty() {
            self.fill().await;
        }
        std::mem::take(&mut self.buf)
    }

    /// Read until EOF.
    pub async fn read_to_end(&mut self) -> Vec<u8> {
        while self.fill().await {}
        std::mem::take(&mut self.buf)
    }

    /// Read a body with the given framing. Returns (body, trailers, complete).
    pub async fn read_body(&mut self, framing: Framing) -> (Vec<u8>, Vec<(String, String)>, bool) {
        match framing {
            Framing::None => (Vec::new(), Vec::new(), true),
            Framing::Length(n) => {
                let body = self.read_exact(n as usize).await;
                let complete = body.len() as u64 == n;
                (body, Vec::new(), complete)
            }
            Framing::Close => (self.read_to_end().await, Vec::new(), true),
            Framing::Chunked => {
                let mut body = Vec::new();
                loop {
                    let Some(line) = self.read_line().await else {
                        return (body, Vec::new(), false);
                    };
                    let size_txt = line.split(';').next().unwrap_or("").trim().to_string();
                    let Ok(size) = usize::from_str_radix(&size_txt, 16) else {
                        return (body, Vec::new(), false);
                    };
                    if size == 0 {
                        let mut trailers = Vec::new();
                        loop {
                            let Some(l) = self.read_line().await else {
                                return (body, trailers, false);
                            };
                            if l.is_empty() {
                                return (body, trailers, true);
                            }
                            if let Some((k, v)) = l.split_once(':') {
                                trailers.push((k.trim().to_string(), v.trim().to_string()));
                            }
                        }
                    }
                    let chunk = self.read_exact(size).await;
                    let got = chunk.len();
                    body.extend_from_slice(&chunk);
                    if got < size {
                        return (body, Vec::new(), false);
                    }
                    let crlf = self.read_exact(2).await;
                    if crlf != b"\r\n" {
                        return (body, Vec::new(), false);
                    }
                }
            }
        }
    }

    /// Read one chunk of a chunked body: Some(data) (empty for the last chunk), None on error/EOF.
    /// Trailers after the last chunk are consumed and discarded.
    pub async fn read_chunk(&mut self) -> Option<Vec<u8>> {
        let line = self.read_line().await?;
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            loop {
                let l = self.read_line().await?;
                if l.is_empty() {
                    return Some(Vec::new());
                }
            }
        }
        let data = self.read_exact(size).await;
        if data.len() < size {
            return None;
        }
        if self.read_exact(2).await != b"\r\n" {
            return None;
        }
        Some(data)
    }

    /// Read a full response, collecting 1xx interim responses (except 101, which is final).
    /// Panics if the connection closes before a head arrives.
    pub async fn read_response(&mut self, request_was_head: bool) -> RawResponse {
        self.try_read_response(request_was_head)
            .await
            .expect("connection closed before a response head arrived")
    }

    /// Like `read_response` but None if the connection closed before any head.
    pub async fn try_read_response(&mut self, request_was_head: bool) -> Option<RawResponse> {
        let mut interim = Vec::new();
        loop {
            let head = self.read_head().await?;
            let status = head.status();
            if (100..200).contains(&status) && status != 101 {
                interim.push(head);
                continue;
            }
            let framing = response_framing(&head, request_was_head);
            let (body, trailers, complete) = if status == 101 {
                (Vec::new(), Vec::new(), true)
            } else {
                self.read_body(framing).await
            };
            return Some(RawResponse {
                head,
                interim,
                body,
                trailers,
                framing,
                complete,
            });
        }
    }

    /// Server side: read one request. None if the connection closed first.
    pub async fn read_request(&mut self) -> Option<RawRequest> {
        let head = self.read_head().await?;
        let framing = request_framing(&head);
        let expects = head
            .header("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
        if expects && framing != Framing::None {
            let _ = self.try_send(b"HTTP/1.1 100 Continue\r\n\r\n").await;
        }
        let (body, trailers, complete) = self.read_body(framing).await;
        Some(RawRequest {
            head,
            body,
            trailers,
            framing,
            complete,
        })
    }

    /// True if the peer closes (EOF/reset) within `limit` — any data read meanwhile is discarded.
    pub async fn closed_within(&mut self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            self.buf.clear();
            match tokio::time::timeout_at(deadline, self.fill()).await {
                Ok(true) => continue,
                Ok(false) => return true,
                Err(_) => return false,
            }
        }
    }
}

/// Build a request head. `headers` are emitted in order; the blank line is added.
pub fn request_bytes(start_line: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(start_line.as_bytes());
    out.extend_from_slice(b"\r\n");
    for (k, v) in headers {
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// Encode one chunk of a chunked body.
pub fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

/// One-shot: connect, send `req`, read the response (not HEAD), return it.
pub async fn exchange(addr: SocketAddr, req: &[u8]) -> RawResponse {
    let mut c = RawConn::connect(addr).await;
    c.send(req).await;
    c.read_response(false).await
}

/// Simple `GET path` to addr over HTTP/1.1 with Connection: close; returns (status, body).
/// Returns None on connection failure (used for readiness polling).
pub async fn try_get(addr: SocketAddr, path: &str) -> Option<(u16, Vec<u8>)> {
    let s = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    let mut c = RawConn::from_io(Box::new(s));
    let req = request_bytes(
        &format!("GET {path} HTTP/1.1"),
        &[("host", &addr.to_string()), ("connection", "close")],
        b"",
    );
    c.try_send(&req).await.ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(5), c.try_read_response(false))
        .await
        .ok()??;
    Some((resp.status(), resp.body))
}
