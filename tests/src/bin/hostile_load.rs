//! The attackers of `hostile_clients_do_not_starve_a_well_behaved_one` (tests/tests/hostile.rs)
//! as a process of their own, so the test can run them at the lowest CPU priority: on a machine
//! where they share two cores with the proxy, the upstream and the measured client, their own
//! CPU time (a real attacker's is spent on another machine) would otherwise be counted against
//! the proxy. What the proxy spends on the attack (accepting, parsing, timing out, GOAWAY) still
//! counts.
//!
//! Usage: hostile_load ADDR [slowloris connections=200] [gap between slowloris bytes, ms=100]
//! Attacks until its standard input closes, then prints one line:
//! `slowloris_closed=N resets=N goaways=N seconds=F`.

use std::io::Read;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use scoretap_tests::hostile::{rapid_reset, slow_head};
use scoretap_tests::util::numeric_argument;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .expect("usage: hostile_load ADDR [slowloris] [gap-ms]")
        .parse()
        .expect("ADDR: expected host:port");
    let slowloris = numeric_argument(2, 200) as usize;
    let gap = Duration::from_millis(numeric_argument(3, 100));
    let stop = Arc::new(AtomicBool::new(false));
    let closed = Arc::new(AtomicUsize::new(0));
    let resets = Arc::new(AtomicUsize::new(0));
    let goaways = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    for _ in 0..slowloris {
        let (stop, closed) = (stop.clone(), closed.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if slow_head(addr, gap, Duration::from_secs(30))
                    .await
                    .is_some()
                {
                    closed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    {
        let (stop, resets, goaways) = (stop.clone(), resets.clone(), goaways.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (sent, ended) = rapid_reset(addr, 100_000).await;
                resets.fetch_add(sent, Ordering::Relaxed);
                if ended.is_err_and(|error| error.is_go_away()) {
                    goaways.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    tokio::task::spawn_blocking(|| {
        let mut sink = [0u8; 64];
        let mut stdin = std::io::stdin();
        while stdin.read(&mut sink).is_ok_and(|read| read > 0) {}
    })
    .await
    .expect("reading standard input");
    stop.store(true, Ordering::Relaxed);
    println!(
        "slowloris_closed={} resets={} goaways={} seconds={:.1}",
        closed.load(Ordering::Relaxed),
        resets.load(Ordering::Relaxed),
        goaways.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
}
