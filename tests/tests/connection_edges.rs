//! Connections at their limits and at their ends: an HTTP/2 connection told to go away for
//! cancelling too many streams, the upstream connections one client can make scoretap open, and
//! upgraded connections (WebSocket tunnels) left idle or open at shutdown. Real sockets against
//! the real binary.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use scoretap_tests::harness::proxy_for;
use scoretap_tests::hostile::{h2_client, h2_get};
use scoretap_tests::metrics::scrape;
use scoretap_tests::raw::request_bytes;
use scoretap_tests::util::eventually;
use scoretap_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------- HTTP/2 cancellations

/// Reads an HTTP/2 response whole: its status and body.
async fn h2_response(
    response: h2::client::ResponseFuture,
) -> Result<(http::StatusCode, Vec<u8>), h2::Error> {
    let response = response.await?;
    let status = response.status();
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    while let Some(data) = body.data().await {
        let data = data?;
        let _ = body.flow_control().release_capacity(data.len());
        bytes.extend_from_slice(&data);
    }
    Ok((status, bytes))
}

/// A gateway that cancels its requests on short deadlines while the model is slow cancels many
/// started HTTP/2 streams. Past the allowance the connection gets GOAWAY, but what is still in
/// flight on it must finish: a slow answer (7 s) arrives whole, more than 5 s after the GOAWAY,
/// and the peer (every client behind that gateway) takes no strike, so its next connection is
/// served at once. The penalty is for floods of streams reset before they were served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_in_flight_finish_after_the_too_many_cancellations_goaway_and_the_peer_is_not_penalized(
) {
    const PENALTY: Duration = Duration::from_millis(400);
    let up = TestUpstream::start().await;
    let proxy = proxy_for(
        &up,
        &["--max-concurrent-streams", "20", "--abuse-delay", "400ms"],
    )
    .await;
    let (mut client, connection) = h2_client(proxy.addr).await;
    let started = Instant::now();
    let (slow, _) = client
        .send_request(h2_get("/delay?ms=7000&t=slow"), true)
        .unwrap();
    let slow = tokio::spawn(h2_response(slow));
    up.wait_path("t=slow").await;

    // Batches of 18 streams (19 open with the slow one, under the 20 allowed), each batch reset
    // once all of it has reached the upstream, until the GOAWAY: the allowance is 40 at once.
    let mut cancelled = 0;
    let mut goaway = None;
    'batches: for _ in 0..10 {
        let before = up.request_count();
        let mut streams = Vec::new();
        for _ in 0..18 {
            let opened = match std::future::poll_fn(|context| client.poll_ready(context)).await {
                Ok(()) => client.send_request(h2_get("/stall?t=cancelled"), true),
                Err(error) => Err(error),
            };
            match opened {
                Ok((_, stream)) => streams.push(stream),
                Err(error) => {
                    goaway = Some(error);
                    break 'batches;
                }
            }
        }
        assert!(
            eventually(STEP, || up.request_count() >= before + streams.len()).await,
            "a batch of streams did not reach the upstream"
        );
        for stream in &mut streams {
            stream.send_reset(h2::Reason::CANCEL);
        }
        cancelled += streams.len();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let goaway = goaway.unwrap_or_else(|| panic!("no GOAWAY after {cancelled} cancellations"));
    let goaway_seen = Instant::now();
    assert!(
        goaway.is_go_away() && goaway.reason() == Some(h2::Reason::NO_ERROR),
        "after {cancelled} cancellations: {goaway:?}"
    );

    let mut problems = Vec::new();
    // Right after: the same peer connects again.
    let connecting = Instant::now();
    let mut next = Client::connect(proxy.addr, Proto::H1).await;
    let answer = next.get("/ok?t=next-connection").await;
    let waited = connecting.elapsed();
    assert_eq!(answer.status, 200);
    if waited >= PENALTY / 2 {
        problems.push(format!(
            "the peer's next connection was served {waited:?} after it connected"
        ));
    }
    let delayed = scrape(proxy.admin)
        .await
        .value("scoretap_connections_delayed_total", &[]);
    if delayed != 0.0 {
        problems.push(format!("scoretap_connections_delayed_total is {delayed}"));
    }

    match within(Duration::from_secs(15), "the slow answer", slow)
        .await
        .unwrap()
    {
        Ok((status, body)) => {
            if status != 200 || body != b"delayed 7000" {
                problems.push(format!(
                    "the slow answer: {status} {:?}",
                    String::from_utf8_lossy(&body)
                ));
            }
            let after_goaway = goaway_seen.elapsed();
            assert!(
                after_goaway > Duration::from_secs(5)
                    && started.elapsed() >= Duration::from_secs(7),
                "the slow answer came {after_goaway:?} after the GOAWAY"
            );
        }
        Err(error) => problems.push(format!(
            "the slow request in flight failed {:?} after the GOAWAY ({:?} after it was sent): \
             {error}",
            goaway_seen.elapsed(),
            started.elapsed()
        )),
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // Nothing left in flight: the connection ends by itself.
    within(
        STEP,
        "the connection to end after its last stream",
        connection,
    )
    .await
    .unwrap()
    .ok();
}

// ---------------------------------------------------------------- upstream connections

/// The most connections `up` had open at once while `work` ran (sampled every 2 ms).
async fn most_open_during<F: std::future::Future>(
    up: &TestUpstream,
    work: F,
) -> (usize, F::Output) {
    let most = AtomicUsize::new(0);
    let done = AtomicBool::new(false);
    let sample = async {
        while !done.load(Ordering::SeqCst) {
            most.fetch_max(up.open_connections(), Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    let work = async {
        let output = work.await;
        done.store(true, Ordering::SeqCst);
        output
    };
    let ((), output) = tokio::join!(sample, work);
    (most.load(Ordering::SeqCst), output)
}

/// One HTTP/2 client connection can carry hundreds of concurrent requests, and each needs an
/// HTTP/1.1 upstream connection of its own: nothing capped them, so one client could make
/// scoretap open hundreds. With `--upstream-max-connections 4` (set here as its variable
/// `SCORETAP_UPSTREAM_MAX_CONNECTIONS`), 16 concurrent slow requests share 4 upstream
/// connections: the rest wait for one, and all are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_capped_and_requests_wait_for_one() {
    let up = TestUpstream::start_proto(UpstreamProto::H1).await;
    let proxy = Scoretap::builder()
        .upstream(&up.url())
        .env("SCORETAP_UPSTREAM_MAX_CONNECTIONS", "4")
        .start()
        .await;
    let (client, _connection) = h2_client(proxy.addr).await;
    let requests = (0..16).map(|index| {
        let mut client = client.clone();
        async move {
            std::future::poll_fn(|context| client.poll_ready(context))
                .await
                .unwrap();
            let (response, _) = client
                .send_request(h2_get(&format!("/delay?ms=300&t=capped-{index}")), true)
                .unwrap();
            h2_response(response).await
        }
    });
    let (most_open, answers) = most_open_during(
        &up,
        within(
            Duration::from_secs(20),
            "16 requests",
            futures_util::future::join_all(requests),
        ),
    )
    .await;
    let accepted = up.accepted_connections();
    for answer in &answers {
        let (status, body) = answer.as_ref().unwrap();
        assert_eq!(
            (*status, String::from_utf8_lossy(body).into_owned()),
            (http::StatusCode::OK, "delayed 300".to_owned())
        );
    }
    assert!(
        most_open <= 4 && accepted <= 4,
        "the upstream had {most_open} connections open at once ({accepted} accepted)"
    );
    let metrics = scrape(proxy.admin).await;
    let waits = metrics.value("scoretap_upstream_connection_waits_total", &[]);
    assert!(
        waits > 0.0,
        "scoretap_upstream_connection_waits_total {waits}"
    );
    let open = metrics.value("scoretap_upstream_connections", &[]);
    assert!(
        (1.0..=4.0).contains(&open),
        "scoretap_upstream_connections {open}"
    );
}

/// Waiting for an upstream connection counts against `--connect-timeout`: a request that gets
/// none in time is answered 504 `upstream_connect_timeout`, as if the connect itself had taken
/// too long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_gets_no_upstream_connection_in_time_gets_504() {
    let up = TestUpstream::start_proto(UpstreamProto::H1).await;
    let proxy = Scoretap::builder()
        .upstream(&up.url())
        .args(["--connect-timeout", "300ms"])
        .env("SCORETAP_UPSTREAM_MAX_CONNECTIONS", "1")
        .start()
        .await;
    let mut holding = Client::connect(proxy.addr, Proto::H1).await;
    let held = tokio::spawn(async move { holding.get("/delay?ms=3000&t=holding").await });
    up.wait_path("t=holding").await;
    let mut waiting = Client::connect(proxy.addr, Proto::H1).await;
    let asked = Instant::now();
    let answer = waiting.get("/ok?t=waiting").await;
    let took = asked.elapsed();
    assert_eq!(
        answer.status,
        504,
        "with the only upstream connection busy: {} {}",
        answer.status,
        answer.text()
    );
    assert_eq!(answer.json()["error"], "upstream_connect_timeout");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "answered after {took:?}"
    );
    assert!(up
        .find(|r| r.path_and_query().contains("t=waiting"))
        .is_none());
    assert_eq!(
        within(STEP, "the first request", held)
            .await
            .unwrap()
            .status,
        200
    );
}

// ---------------------------------------------------------------- upgraded connections

/// An upstream that switches protocols (101) for every request carrying `Upgrade`, then echoes
/// the tunnel's bytes; any other request gets 200 `ok` and a close. It counts the tunnels closed
/// from scoretap's side.
struct UpgradeUpstream {
    addr: SocketAddr,
    tunnels_closed: Arc<AtomicUsize>,
}

impl UpgradeUpstream {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tunnels_closed = Arc::new(AtomicUsize::new(0));
        let closed = tunnels_closed.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(Self::serve(tcp, closed.clone()));
            }
        });
        Self {
            addr,
            tunnels_closed,
        }
    }

    async fn serve(mut tcp: TcpStream, closed: Arc<AtomicUsize>) {
        let mut head = Vec::new();
        let mut buffer = vec![0u8; 64 * 1024];
        while !head.windows(4).any(|window| window == b"\r\n\r\n") {
            match tcp.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buffer[..n]),
            }
        }
        if !String::from_utf8_lossy(&head)
            .to_ascii_lowercase()
            .contains("\r\nupgrade:")
        {
            let _ = tcp
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                .await;
            return;
        }
        if tcp
            .write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
            )
            .await
            .is_err()
        {
            return;
        }
        loop {
            match tcp.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tcp.write_all(&buffer[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
        closed.fetch_add(1, Ordering::SeqCst);
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn tunnels_closed(&self) -> usize {
        self.tunnels_closed.load(Ordering::SeqCst)
    }
}

/// Upgrades a new connection to scoretap (a WebSocket handshake) and checks a round trip. A
/// connection closed without an answer (refused at `--max-connections` while a previous one still
/// holds the slot for a moment) is tried again, for up to 2 s.
async fn open_tunnel(addr: SocketAddr) -> RawConn {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let mut conn = RawConn::connect(addr).await;
        conn.send(&request_bytes(
            "GET /socket HTTP/1.1",
            &[
                ("Host", "app.example"),
                ("Connection", "Upgrade"),
                ("Upgrade", "websocket"),
                ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                ("Sec-WebSocket-Version", "13"),
            ],
            b"",
        ))
        .await;
        match within(STEP, "101", conn.try_read_response(false)).await {
            Some(response) => {
                assert_eq!(response.status(), 101, "{:?}", response.head);
                assert_round_trip(&mut conn, b"hello").await;
                return conn;
            }
            None if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            None => panic!("no connection to {addr} was answered within 2 s"),
        }
    }
}

/// Sends `message` through the tunnel and reads its echo.
async fn assert_round_trip(conn: &mut RawConn, message: &[u8]) {
    conn.try_send(message)
        .await
        .unwrap_or_else(|error| panic!("sending through the tunnel: {error}"));
    let echo = within(STEP, "the echo", conn.read_exact(message.len())).await;
    assert_eq!(
        echo,
        message,
        "the tunnel's echo of {:?}",
        String::from_utf8_lossy(message)
    );
}

/// An upgraded connection on which no byte moves either way for `--idle-timeout` is closed on
/// both sides (before, such a tunnel stayed open for ever, as did its upstream connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tunnel_is_closed_on_both_sides_after_the_idle_timeout() {
    let up = UpgradeUpstream::start().await;
    let proxy = Scoretap::start(&up.url(), &["--idle-timeout", "1s"]).await;
    let mut tunnel = open_tunnel(proxy.addr).await;
    // Bytes moving keep it open past the timeout.
    for round in 0..4 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_round_trip(&mut tunnel, format!("round {round}").as_bytes()).await;
    }
    let quiet = Instant::now();
    assert!(
        tunnel.closed_within(Duration::from_secs(4)).await,
        "a tunnel idle for 4 s with --idle-timeout 1s is still open"
    );
    let closed_after = quiet.elapsed();
    assert!(
        closed_after >= Duration::from_millis(900) && closed_after < Duration::from_millis(2500),
        "closed {closed_after:?} after the last byte"
    );
    assert!(
        eventually(Duration::from_secs(2), || up.tunnels_closed() == 1).await,
        "the upstream side of the tunnel is still open"
    );
}

/// A tunnel holds its client connection's slot of `--max-connections` while it is open, and
/// gives it back when it is closed for idleness.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_tunnel_gives_back_its_connection_slot() {
    let up = UpgradeUpstream::start().await;
    let proxy = Scoretap::start(
        &up.url(),
        &["--idle-timeout", "1s", "--max-connections", "1"],
    )
    .await;
    // The start-up check's connection may hold the slot a moment longer.
    assert_eq!(
        served_within(proxy.addr, Duration::from_secs(2)).await,
        Some(200)
    );
    let mut tunnel = open_tunnel(proxy.addr).await;
    let mut refused = RawConn::connect(proxy.addr).await;
    assert!(
        refused.closed_within(Duration::from_millis(500)).await,
        "a second connection was kept while the tunnel holds the only slot"
    );
    assert!(
        tunnel.closed_within(Duration::from_secs(4)).await,
        "the idle tunnel was not closed"
    );
    assert_eq!(
        served_within(proxy.addr, Duration::from_secs(2)).await,
        Some(200),
        "no connection served after the tunnel was closed"
    );
}

/// The status of a GET on a new connection, tried until one is answered or `limit` passes (a
/// connection refused at `--max-connections` is closed without an answer).
async fn served_within(addr: SocketAddr, limit: Duration) -> Option<u16> {
    let deadline = Instant::now() + limit;
    loop {
        let mut conn = RawConn::connect(addr).await;
        conn.send(b"GET /ok HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            .await;
        let served = conn.try_read_response(false).await.map(|r| r.status());
        if served.is_some() || Instant::now() >= deadline {
            return served;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// At SIGTERM an upgraded connection is waited for like a request in flight: bytes keep flowing
/// through it while scoretap drains, and it is closed at `--drain-timeout`, when scoretap exits
/// (an idle tunnel too). Before, the tunnel was not counted: scoretap exited at once, cutting it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_waits_for_tunnels_and_closes_them_at_the_deadline() {
    let up = UpgradeUpstream::start().await;
    let mut proxy = Scoretap::start(&up.url(), &["--drain-timeout", "3s"]).await;
    let mut active = open_tunnel(proxy.addr).await;
    let mut idle = open_tunnel(proxy.addr).await;
    let signalled = Instant::now();
    proxy.sigterm();
    while signalled.elapsed() < Duration::from_millis(2300) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let message = format!("{} ms after SIGTERM", signalled.elapsed().as_millis());
        if active.try_send(message.as_bytes()).await.is_err() {
            panic!("the tunnel was cut {message}, before the 3 s drain deadline");
        }
        let echo = within(
            Duration::from_secs(1),
            "the echo",
            active.read_exact(message.len()),
        )
        .await;
        assert_eq!(
            String::from_utf8_lossy(&echo),
            message,
            "the tunnel was cut {message}, before the 3 s drain deadline"
        );
    }
    let status = proxy.wait_exit(Duration::from_secs(5)).await;
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(
        took >= Duration::from_millis(2800) && took < Duration::from_secs(5),
        "scoretap exited {took:?} after SIGTERM with --drain-timeout 3s and tunnels open"
    );
    for (name, tunnel) in [("active", &mut active), ("idle", &mut idle)] {
        assert!(
            tunnel.closed_within(Duration::from_secs(1)).await,
            "the {name} tunnel is open after scoretap exited"
        );
    }
    assert!(
        eventually(Duration::from_secs(2), || up.tunnels_closed() == 2).await,
        "{} of 2 tunnels closed at the upstream",
        up.tunnels_closed()
    );
}
