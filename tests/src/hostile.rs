//! Hostile clients shared by the hostile-client tests and the `hostile_load` binary: slowloris
//! heads and HTTP/2 rapid reset (CVE-2023-44487).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::util::{within, STEP};

/// Writes a head one byte per `gap` (then keeps writing header bytes forever) and returns how
/// long after connecting the proxy closed the connection; `None` if it did not within `limit`
/// (or the connection could not be made).
pub async fn slow_head(addr: SocketAddr, gap: Duration, limit: Duration) -> Option<Duration> {
    let Ok(stream) = TcpStream::connect(addr).await else {
        // Under a flood the listen backlog can be full: try again later.
        tokio::time::sleep(Duration::from_millis(100)).await;
        return None;
    };
    stream.set_nodelay(true).unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let started = Instant::now();
    let writing = tokio::spawn(async move {
        let head = b"GET /ok?t=slow HTTP/1.1\r\nHost: h\r\nX-Endless: ";
        for byte in head.iter().chain(std::iter::repeat(&b'a')) {
            if writer.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(gap).await;
        }
    });
    let mut buffer = [0u8; 1024];
    let closed = tokio::time::timeout(limit, async {
        loop {
            match reader.read(&mut buffer).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .ok();
    writing.abort();
    closed
}

/// An HTTP/2 client connection over `tcp`, its connection task spawned; the task's result is
/// the connection's end (a GOAWAY error, say).
pub async fn h2_client(
    addr: SocketAddr,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let (client, connection) = within(STEP, "h2 handshake", h2::client::handshake(tcp))
        .await
        .unwrap();
    (client, tokio::spawn(connection))
}

pub fn h2_get(path: &str) -> Request<()> {
    Request::get(format!("http://scoretap{path}"))
        .body(())
        .unwrap()
}

/// Sends HEADERS + RST_STREAM pairs on one connection until the proxy ends it; how many pairs
/// went out, and how the connection ended.
pub async fn rapid_reset(addr: SocketAddr, pairs: usize) -> (usize, Result<(), h2::Error>) {
    let (client, connection) = h2_client(addr).await;
    let mut sent = 0;
    let mut next = Some(client);
    while let Some(client) = next.take().filter(|_| sent < pairs) {
        let Ok(mut client) = client.ready().await else {
            break;
        };
        let Ok((_, mut stream)) = client.send_request(h2_get("/stall?t=reset"), false) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
        sent += 1;
        if sent % 32 == 0 {
            tokio::task::yield_now().await;
        }
        next = Some(client);
    }
    drop(next);
    let ended = within(STEP, "the attacker's connection to end", connection)
        .await
        .unwrap();
    (sent, ended)
}
