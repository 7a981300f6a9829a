//! The memory goal, measured: many concurrent uploads plus one very large one through
//! scoretap, every body checked byte for byte by the upstream (its SHA-256 against the pattern
//! the client sent), scoretap's RSS sampled every 100 ms. Run by `scripts/bench-memory.sh`.
//!
//! Usage: memory_load [uploads=1000] [upload-MiB=10] [large-MiB=1024] [scoretap flags...]
//! Env: SCORETAP_BIN (the binary measured; the release build for figures that mean anything).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use scoretap_core::metrics::names;
use scoretap_tests::client::upload_pattern;
use scoretap_tests::traces::proc_status_kib;
use scoretap_tests::util::{numeric_argument, pattern_sha256, TempDir};
use scoretap_tests::{Client, Proto, Scoretap, TestUpstream};

const MIB: u64 = 1 << 20;

/// One upload through the proxy on its own connection; whether the upstream got it whole.
async fn upload(proxy: std::net::SocketAddr, id: String, size: u64, expected: Arc<String>) -> bool {
    let mut client = Client::connect(proxy, Proto::H1).await;
    let answer = upload_pattern(
        &mut client,
        "/sink",
        &id,
        size,
        "application/octet-stream",
        None,
    )
    .await;
    if answer.status != 200 {
        eprintln!("{id}: status {}", answer.status);
        return false;
    }
    let received = answer.json();
    let whole = received["size"] == size && received["sha256"] == expected.as_str();
    if !whole {
        eprintln!("{id}: the upstream got {received}");
    }
    whole
}

/// A counter of the metric `name` (summed over its label sets) in a Prometheus exposition.
fn metric_sum(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::main]
async fn main() {
    let uploads = numeric_argument(1, 1000) as usize;
    let upload_bytes = numeric_argument(2, 10) * MIB;
    let large_bytes = numeric_argument(3, 1024) * MIB;
    let flags: Vec<String> = std::env::args().skip(4).collect();

    let upstream = TestUpstream::start().await;
    let store = TempDir::new("memory-store");
    let proxy = Scoretap::builder()
        .upstream(&upstream.url())
        .args([
            "--store".to_owned(),
            format!("file://{}", store.path().display()),
            "--log-level".to_owned(),
            "warn".to_owned(),
        ])
        .args(flags.iter().cloned())
        .start()
        .await;
    let pid = proxy.pid();
    let idle_kib = proc_status_kib(pid, "VmRSS").unwrap_or(0);

    let stop = Arc::new(AtomicBool::new(false));
    let peak_kib = Arc::new(AtomicU64::new(idle_kib));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak_kib.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Some(rss) = proc_status_kib(pid, "VmRSS") {
                    peak.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let expected_upload = Arc::new(pattern_sha256(upload_bytes));
    let expected_large = Arc::new(pattern_sha256(large_bytes));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(uploads + 1);
    tasks.push(tokio::spawn(upload(
        proxy.addr,
        "memory-large".to_owned(),
        large_bytes,
        expected_large,
    )));
    for number in 0..uploads {
        tasks.push(tokio::spawn(upload(
            proxy.addr,
            format!("memory-{number}"),
            upload_bytes,
            expected_upload.clone(),
        )));
    }
    let mut whole = 0;
    for task in tasks {
        if task.await.unwrap_or(false) {
            whole += 1;
        }
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    let high_water_kib = proc_status_kib(pid, "VmHWM").unwrap_or(0);
    let exposition = proxy
        .admin_get("/metrics")
        .await
        .map(|(_, body)| String::from_utf8_lossy(&body).into_owned())
        .unwrap_or_default();

    let total_bytes = uploads as u64 * upload_bytes + large_bytes;
    println!(
        "{uploads} x {} MiB + 1 x {} MiB through scoretap ({}): {whole}/{} bodies byte-exact at the upstream, {:.1} s, {:.0} MB/s",
        upload_bytes / MIB,
        large_bytes / MIB,
        if flags.is_empty() { "defaults".to_owned() } else { flags.join(" ") },
        uploads + 1,
        elapsed.as_secs_f64(),
        total_bytes as f64 / 1e6 / elapsed.as_secs_f64()
    );
    println!(
        "scoretap RSS: idle {} MiB, peak {} MiB (sampled every 100 ms), VmHWM {} MiB; goal < 128 MiB: {}",
        idle_kib / 1024,
        peak_kib.load(Ordering::Relaxed) / 1024,
        high_water_kib / 1024,
        if high_water_kib < 128 * 1024 { "met" } else { "NOT met" }
    );
    println!(
        "capture: records written {}, capture drops {}, bytes spilled {:.0} MB",
        metric_sum(&exposition, names::CAPTURE_RECORDS),
        metric_sum(&exposition, names::CAPTURE_DROPPED),
        metric_sum(&exposition, names::SPILL_BYTES) / 1e6
    );
    if whole != uploads + 1 {
        std::process::exit(1);
    }
}
