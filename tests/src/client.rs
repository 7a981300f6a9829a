//! Real hyper clients (HTTP/1.1 and HTTP/2, plain or TLS with ALPN), one connection each.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::raw::Io;
use crate::tls::{server_name_ip, ALPN_H1, ALPN_H2};
use crate::upstream::BoxError;
use crate::util::{within, STEP};

pub type ReqBody = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(b: impl Into<Bytes>) -> ReqBody {
    Full::new(b.into())
        .map_err(|e: Infallible| -> BoxError { match e {} })
        .boxed_unsync()
}

pub fn empty() -> ReqBody {
    Empty::<Bytes>::new()
        .map_err(|e: Infallible| -> BoxError { match e {} })
        .boxed_unsync()
}

/// Sending half of a streaming request body.
#[derive(Debug, Clone)]
pub struct BodySender(mpsc::Sender<Result<Frame<Bytes>, BoxError>>);

impl BodySender {
    pub async fn data(&self, b: impl Into<Bytes>) -> bool {
        self.0.send(Ok(Frame::data(b.into()))).await.is_ok()
    }
    pub async fn trailers(&self, t: HeaderMap) -> bool {
        self.0.send(Ok(Frame::trailers(t))).await.is_ok()
    }
    /// Abort the body with an error (the client resets the request).
    pub async fn abort(&self) -> bool {
        self.0
            .send(Err(Box::new(std::io::Error::other("client aborted body"))))
            .await
            .is_ok()
    }
}

/// A streaming request body fed through a channel; dropping the sender ends the body.
pub fn channel_body() -> (BodySender, ReqBody) {
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
    let s = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (BodySender(tx), StreamBody::new(s).boxed_unsync())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    H1,
    H2,
}

impl Proto {
    pub fn version(self) -> Version {
        match self {
            Proto::H1 => Version::HTTP_11,
            Proto::H2 => Version::HTTP_2,
        }
    }
}

enum SenderKind {
    H1(http1::SendRequest<ReqBody>),
    H2(http2::SendRequest<ReqBody>),
}

/// One client connection. Dropping it closes the connection.
pub struct Client {
    sender: SenderKind,
    pub proto: Proto,
    pub scheme: &'static str,
    pub authority: String,
    /// ALPN protocol negotiated (TLS only).
    pub alpn: Option<Vec<u8>>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("proto", &self.proto)
            .field("authority", &self.authority)
            .finish()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A fully read response.
#[derive(Debug, Clone)]
pub struct Collected {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Collected {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }
    pub fn trailer(&self, name: &str) -> Option<String> {
        self.trailers
            .as_ref()?
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): status {} body {:?}",
                self.status,
                self.text()
            )
        })
    }
}

/// Read the whole response (data + trailers).
pub async fn collect(resp: Response<Incoming>) -> Result<Collected, hyper::Error> {
    let (parts, body) = resp.into_parts();
    let c = body.collect().await?;
    let trailers = c.trailers().cloned();
    Ok(Collected {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body: c.to_bytes(),
        trailers,
    })
}

/// A connection to `addr` from the local address `local`: any address of 127.0.0.0/8 is this
/// machine's, so a client the proxy sees as another peer.
pub async fn tcp_from(local: std::net::IpAddr, addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(local, 0)).unwrap();
    let stream = within(Duration::from_secs(5), "tcp connect", socket.connect(addr))
        .await
        .unwrap_or_else(|e| panic!("connect {addr} from {local}: {e}"));
    stream.set_nodelay(true).ok();
    stream
}

async fn tcp(addr: SocketAddr) -> TcpStream {
    let s = within(
        Duration::from_secs(5),
        "tcp connect",
        TcpStream::connect(addr),
    )
    .await
    .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_nodelay(true).ok();
    s
}

impl Client {
    /// Plain TCP: HTTP/1.1, or HTTP/2 with prior knowledge (h2c).
    pub async fn connect(addr: SocketAddr, proto: Proto) -> Client {
        let io: Box<dyn Io> = Box::new(tcp(addr).await);
        Self::handshake(io, proto, "http", addr.to_string(), None).await
    }

    /// Like [`Client::connect`], from the local address `local` (see [`tcp_from`]).
    pub async fn connect_from(local: std::net::IpAddr, addr: SocketAddr, proto: Proto) -> Client {
        let stream = tcp_from(local, addr).await;
        Self::handshake(Box::new(stream), proto, "http", addr.to_string(), None).await
    }

    /// TLS with ALPN (`h2` for H2, `http/1.1` for H1); `cfg` supplies the trust roots.
    pub async fn connect_tls(
        addr: SocketAddr,
        proto: Proto,
        cfg: Arc<rustls::ClientConfig>,
    ) -> Client {
        let mut c = (*cfg).clone();
        c.alpn_protocols = match proto {
            Proto::H1 => vec![ALPN_H1.to_vec()],
            Proto::H2 => vec![ALPN_H2.to_vec()],
        };
        let connector = tokio_rustls::TlsConnector::from(Arc::new(c));
        let tls = within(
            Duration::from_secs(5),
            "tls handshake",
            connector.connect(server_name_ip(), tcp(addr).await),
        )
        .await
        .unwrap_or_else(|e| panic!("TLS handshake with {addr}: {e}"));
        let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        Self::handshake(Box::new(tls), proto, "https", addr.to_string(), alpn).await
    }

    async fn handshake(
        io: Box<dyn Io>,
        proto: Proto,
        scheme: &'static str,
        authority: String,
        alpn: Option<Vec<u8>>,
    ) -> Client {
        let io = TokioIo::new(io);
        match proto {
            Proto::H1 => {
                let (sender, conn) = within(STEP, "h1 handshake", http1::handshake(io))
                    .await
                    .expect("h1 handshake");
                let task = tokio::spawn(async move {
                    let _ = conn.with_upgrades().await;
                });
                Client {
                    sender: SenderKind::H1(sender),
                    proto,
                    scheme,
                    authority,
                    alpn,
                    task,
                }
            }
            Proto::H2 => {
                let mut b = http2::Builder::new(TokioExecutor::new());
                b.timer(TokioTimer::new());
                let (sender, conn) = within(STEP, "h2 handshake", b.handshake(io))
                    .await
                    .expect("h2 handshake");
                let task = tokio::spawn(async move {
                    let _ = conn.await;
                });
                Client {
                    sender: SenderKind::H2(sender),
                    proto,
                    scheme,
                    authority,
                    alpn,
                    task,
                }
            }
        }
    }

    /// A request builder for `path` on this connection: origin-form + Host on HTTP/1.1,
    /// absolute URI (→ :scheme/:authority) on HTTP/2.
    pub fn req(&self, method: &str, path: &str) -> http::request::Builder {
        match self.proto {
            Proto::H1 => Request::builder()
                .method(method)
                .uri(path)
                .header("host", &self.authority),
            Proto::H2 => Request::builder()
                .method(method)
                .uri(format!("{}://{}{}", self.scheme, self.authority, path))
                .version(Version::HTTP_2),
        }
    }

    /// Send a request (waits for the connection to be ready). Bounded by STEP.
    pub async fn send(
        &mut self,
        req: Request<ReqBody>,
    ) -> Result<Response<Incoming>, hyper::Error> {
        self.send_within(req, STEP).await
    }

    /// Send a request; its response head must arrive within `limit` (long uploads answered
    /// at their end).
    pub async fn send_within(
        &mut self,
        req: Request<ReqBody>,
        limit: Duration,
    ) -> Result<Response<Incoming>, hyper::Error> {
        within(limit, "response head", async {
            match &mut self.sender {
                SenderKind::H1(s) => {
                    s.ready().await?;
                    s.send_request(req).await
                }
                SenderKind::H2(s) => {
                    s.ready().await?;
                    s.send_request(req).await
                }
            }
        })
        .await
    }

    /// Send and collect the whole response, bounded by `limit`.
    pub async fn fetch(&mut self, req: Request<ReqBody>, limit: Duration) -> Collected {
        let resp = self.send(req).await.expect("send request");
        within(limit, "response body", collect(resp))
            .await
            .expect("read response body")
    }

    pub async fn get(&mut self, path: &str) -> Collected {
        let req = self.req("GET", path).body(empty()).expect("request");
        self.fetch(req, STEP).await
    }

    pub async fn post(&mut self, path: &str, body: impl Into<Bytes>) -> Collected {
        let req = self.req("POST", path).body(full(body)).expect("request");
        self.fetch(req, STEP).await
    }

    /// Is the underlying connection still usable?
    pub fn is_closed(&self) -> bool {
        match &self.sender {
            SenderKind::H1(s) => s.is_closed(),
            SenderKind::H2(s) => s.is_closed(),
        }
    }
}

/// Streams `size` bytes of [`crate::util::pattern`] to `path` in 1 MiB frames, at most
/// `bytes_per_second` when given (a model client, not a loopback flood), with `id` as its
/// `x-request-id`; the whole response. The response head may come only after the whole upload.
pub async fn upload_pattern(
    client: &mut Client,
    path: &str,
    id: &str,
    size: u64,
    content_type: &str,
    bytes_per_second: Option<u64>,
) -> Collected {
    let (sender, body) = channel_body();
    let request = client
        .req("POST", path)
        .header("x-request-id", id)
        .header("content-type", content_type)
        .header("content-length", size.to_string())
        .body(body)
        .expect("upload request");
    let producer = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let mut offset = 0u64;
        while offset < size {
            if let Some(rate) = bytes_per_second {
                let due = Duration::from_secs_f64(offset as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
            let n = (size - offset).min(1 << 20) as usize;
            if !sender
                .data(Bytes::from(crate::util::pattern(offset, n)))
                .await
            {
                break;
            }
            offset += n as u64;
        }
    });
    let response = client
        .send_within(request, Duration::from_secs(600))
        .await
        .expect("upload response");
    let response = collect(response).await.expect("upload response body");
    producer.await.expect("upload producer");
    response
}
