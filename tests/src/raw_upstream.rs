//! A raw-socket HTTP/1 upstream: reads each request off the wire (recording it exactly) and
//! answers with canned bytes. For malformed responses, exact framing and chunked trailers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::AbortHandle;

use crate::raw::{RawConn, RawRequest};

/// What to send back: byte segments written in order (each followed by its delay), then
/// optionally close the connection.
#[derive(Debug, Clone, Default)]
pub struct RawReply {
    pub parts: Vec<(Vec<u8>, Duration)>,
    pub close: bool,
    /// Read nothing more and hold the connection open forever after writing.
    pub hang: bool,
}

impl RawReply {
    pub fn bytes(b: impl Into<Vec<u8>>) -> Self {
        Self {
            parts: vec![(b.into(), Duration::ZERO)],
            ..Default::default()
        }
    }
    pub fn then(mut self, delay: Duration, b: impl Into<Vec<u8>>) -> Self {
        if let Some(last) = self.parts.last_mut() {
            last.1 = delay;
        }
        self.parts.push((b.into(), Duration::ZERO));
        self
    }
    pub fn close(mut self) -> Self {
        self.close = true;
        self
    }
    pub fn hang(mut self) -> Self {
        self.hang = true;
        self
    }
}

pub type RawHandler = Arc<dyn Fn(&RawRequest) -> RawReply + Send + Sync>;

/// A running raw upstream; stops on drop.
pub struct RawUpstream {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<RawRequest>>>,
    accepted: Arc<AtomicUsize>,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

impl std::fmt::Debug for RawUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawUpstream")
            .field("addr", &self.addr)
            .finish()
    }
}

impl RawUpstream {
    pub async fn start(handler: impl Fn(&RawRequest) -> RawReply + Send + Sync + 'static) -> Self {
        let handler: RawHandler = Arc::new(handler);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind raw upstream");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let tasks: Arc<Mutex<Vec<AbortHandle>>> = Arc::new(Mutex::new(Vec::new()));
        let (rq, acc, ts) = (requests.clone(), accepted.clone(), tasks.clone());
        let t = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                tcp.set_nodelay(true).ok();
                acc.fetch_add(1, Ordering::SeqCst);
                let (rq2, h) = (rq.clone(), handler.clone());
                let ct = tokio::spawn(async move {
                    let mut c = RawConn::from_io(Box::new(tcp));
                    while let Some(req) = c.read_request().await {
                        let reply = h(&req);
                        rq2.lock().expect("lock").push(req);
                        for (bytes, delay) in &reply.parts {
                            if c.try_send(bytes).await.is_err() {
                                return;
                            }
                            if !delay.is_zero() {
                                tokio::time::sleep(*delay).await;
                            }
                        }
                        if reply.hang {
                            std::future::pending::<()>().await;
                        }
                        if reply.close {
                            c.shutdown_write().await;
                            return;
                        }
                    }
                });
                ts.lock().expect("lock").push(ct.abort_handle());
            }
        });
        tasks.lock().expect("lock").push(t.abort_handle());
        Self {
            addr,
            requests,
            accepted,
            tasks,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<RawRequest> {
        self.requests.lock().expect("lock").clone()
    }

    pub fn accepted_connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Wait for the n-th (1-based) request to be fully read.
    pub async fn wait_requests(&self, n: usize, limit: Duration) -> Vec<RawRequest> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let r = self.requests();
            if r.len() >= n {
                return r;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("raw upstream saw {} requests, expected {n}", r.len());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        for t in self.tasks.lock().expect("lock").drain(..) {
            t.abort();
        }
    }
}
