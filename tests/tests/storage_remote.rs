//! Storage against real remote stores, each started and stopped by its test: a real
//! S3-compatible server (moto) and a real Azure Blob emulator (Azurite). Bodies spilled through
//! the proxy arrive whole (sha256), trace batches parse, a store outage and a `kill -9` lose
//! nothing and duplicate nothing, and a full spool drops and counts without slowing clients.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;

use scoretap_core::sink::StoreLocation;
use scoretap_core::storage::remote::RemoteStore;
use scoretap_tests::client::{channel_body, full, upload_pattern, Collected};
use scoretap_tests::harness::upstream_args;
use scoretap_tests::process::{run_cli, signal};
use scoretap_tests::stores::{Azurite, MotoServer};
use scoretap_tests::traces::{capture_state, parse_jsonl, proc_status_kib, TraceRecord};
use scoretap_tests::util::{pattern, pattern_sha256, Sha256, TempDir};
use scoretap_tests::*;

const SERVICE: &str = "remotesvc";

/// The two tests that stream a body of hundreds of MiB through the proxy take it in turns. Each
/// keeps the 2-core machine busy for seconds (client, upstream, proxy, collector and Azurite); run
/// side by side, the collector falls behind and drops chunks, by design, so the spilled body is
/// partial for a reason neither test is about.
static ONE_LARGE_BODY_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const INSTANCE: &str = "remote-1";

/// One remote store under test: how scoretap is pointed at it, and a client to check it.
struct Store {
    url: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    client: RemoteStore,
}

async fn s3_store(moto: &MotoServer, bucket: &str) -> Store {
    moto.create_bucket(bucket).await;
    let url = format!("s3://{bucket}/team-a");
    let location = StoreLocation::parse(&url).unwrap();
    Store {
        args: vec!["--s3-endpoint".into(), moto.endpoint()],
        env: moto.env(),
        client: moto.remote_store(&location).await,
        url,
    }
}

async fn azure_store(azurite: &Azurite, container: &str) -> Store {
    azurite.create_container(container).await;
    let url = format!("az://{container}/team-b");
    let location = StoreLocation::parse(&url).unwrap();
    Store {
        args: vec!["--azure-endpoint".into(), azurite.endpoint()],
        env: azurite.env(),
        client: azurite.remote_store(&location).await,
        url,
    }
}

async fn proxy(up: &TestUpstream, store: &Store, spool: &Path, extra: &[&str]) -> Scoretap {
    let mut builder = Scoretap::builder()
        .args(upstream_args(up))
        .args(["--store", store.url.as_str()])
        .args(store.args.iter().map(String::as_str))
        .args(["--service", SERVICE, "--instance", INSTANCE])
        .args(["--spool-dir", spool.to_str().unwrap()])
        .args(["--trace-batch-age", "500ms"])
        .args(extra.iter().copied());
    for (name, value) in &store.env {
        builder = builder.env(name.as_str(), value.as_str());
    }
    builder.start().await
}

async fn upload(c: &mut Client, path: &str, id: &str, size: u64) -> Collected {
    upload_pattern(c, path, id, size, "application/octet-stream", None).await
}

async fn post_json(c: &mut Client, id: &str, body: &str) -> Collected {
    c.fetch(
        c.req("POST", "/echo")
            .header("x-request-id", id)
            .header("content-type", "application/json")
            .body(full(body.to_owned()))
            .unwrap(),
        Duration::from_secs(30),
    )
    .await
}

/// Waits until the spool is empty and nothing is pending (batches sealed and uploaded).
async fn wait_uploaded(proxy: &Scoretap, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let state = capture_state(proxy.admin).await;
        let storage = &state["storage"];
        if storage["uploads_pending"] == 0 && storage["spool_bytes"] == 0 {
            return state;
        }
        assert!(
            Instant::now() < deadline,
            "uploads still pending after {limit:?}: {storage}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every record in every trace batch of the store, with the key of its batch.
async fn stored_records(store: &RemoteStore) -> Vec<(String, TraceRecord)> {
    let mut out = Vec::new();
    for object in store.list("traces/").await.unwrap() {
        let bytes = store.get(&object.key).await.unwrap();
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        for record in parse_jsonl(&text, None) {
            out.push((object.key.clone(), record));
        }
    }
    out
}

/// Polls until the store holds a record for each id; returns them by id (each exactly once).
async fn wait_records(
    store: &RemoteStore,
    ids: &[String],
    limit: Duration,
) -> HashMap<String, TraceRecord> {
    let deadline = Instant::now() + limit;
    loop {
        let records = stored_records(store).await;
        let mut by_id: HashMap<String, Vec<TraceRecord>> = HashMap::new();
        for (_, record) in records {
            by_id
                .entry(record.correlation_id().to_owned())
                .or_default()
                .push(record);
        }
        if ids.iter().all(|id| by_id.contains_key(id)) {
            for id in ids {
                assert_eq!(by_id[id].len(), 1, "{id} stored {} times", by_id[id].len());
            }
            return ids
                .iter()
                .map(|id| (id.clone(), by_id.remove(id).unwrap().remove(0)))
                .collect();
        }
        assert!(
            Instant::now() < deadline,
            "records missing after {limit:?}: {:?}",
            ids.iter()
                .filter(|id| !by_id.contains_key(*id))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The key of a blob pointer, relative to the store's prefix.
fn blob_key(store: &Store, record: &TraceRecord, part: &str) -> String {
    let blob = record.at(&format!("/{part}/body/blob"));
    let blob = blob
        .as_str()
        .unwrap_or_else(|| panic!("{part} has no blob: {}", record.brief()));
    let prefix = format!("{}/", store.url);
    blob.strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{blob} is not under {prefix}"))
        .to_owned()
}

/// Downloads an object to a file and hashes it (never into memory whole).
async fn object_sha256(store: &Store, key: &str) -> (u64, String) {
    use std::io::Read;
    let dir = TempDir::new("object");
    let path = dir.join("object");
    store.client.download_to(key, &path).await.unwrap();
    let mut file = std::fs::File::open(&path).unwrap();
    let mut digest = Sha256::new();
    let mut block = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        let n = file.read(&mut block).unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
        digest.update(&block[..n]);
    }
    (total, digest.finish())
}

/// Small and large bodies through the proxy end up in the store whole, the batches parse, and
/// `scoretap traces` reads them back.
async fn bodies_and_batches_arrive(store: Store, large: u64) {
    let up = TestUpstream::start().await;
    let spool = TempDir::new("spool");
    let proxy = proxy(&up, &store, spool.path(), &[]).await;
    let mut c = Client::connect(proxy.addr, Proto::H1).await;

    let small = post_json(&mut c, "small-1", r#"{"data":[[1,2,3]]}"#).await;
    assert_eq!(small.status, 200);
    let big = upload(&mut c, "/sink", "large-1", large).await;
    assert_eq!(big.status, 200);
    assert_eq!(big.json()["sha256"], pattern_sha256(large).as_str());
    let download_size: u64 = 12 << 20;
    let download = c
        .fetch(
            c.req("GET", &format!("/bytes?size={download_size}"))
                .header("x-request-id", "download-1")
                .body(scoretap_tests::client::empty())
                .unwrap(),
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(download.status, 200);

    wait_uploaded(&proxy, Duration::from_secs(120)).await;
    let ids: Vec<String> = ["small-1", "large-1", "download-1"]
        .iter()
        .map(|id| id.to_string())
        .collect();
    let records = wait_records(&store.client, &ids, Duration::from_secs(30)).await;

    let small = &records["small-1"];
    assert_eq!(
        small.at("/request/body/inline"),
        &serde_json::json!({"data": [[1, 2, 3]]})
    );
    assert_eq!(small.at("/request/body/blob"), &Value::Null);

    let large_record = &records["large-1"];
    let key = blob_key(&store, large_record, "request");
    assert!(key.starts_with(&format!("bodies/{SERVICE}/")), "{key}");
    assert!(key.ends_with(&format!("/{}/request", large_record.str_at("/id").unwrap())));
    assert_eq!(
        object_sha256(&store, &key).await,
        (large, pattern_sha256(large))
    );
    assert_eq!(
        large_record.str_at("/request/body/sha256"),
        Some(pattern_sha256(large).as_str())
    );
    assert_eq!(
        store.client.content_type(&key).await.unwrap().as_deref(),
        Some("application/octet-stream"),
        "the original content type is kept"
    );

    let download_record = &records["download-1"];
    let key = blob_key(&store, download_record, "response");
    assert_eq!(
        object_sha256(&store, &key).await,
        (download_size, pattern_sha256(download_size))
    );

    // Every spilled object belongs to a record: nothing twice, nothing stray.
    let bodies = store.client.list("bodies/").await.unwrap();
    assert_eq!(
        bodies.len(),
        2,
        "{:?}",
        bodies.iter().map(|o| &o.key).collect::<Vec<_>>()
    );

    // Read back with the query command.
    let mut args = vec![
        "traces",
        "--store",
        store.url.as_str(),
        "--contains",
        "large-1",
    ];
    args.extend(store.args.iter().map(String::as_str));
    let env: Vec<(&str, &str)> = store
        .env
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect();
    let output = run_cli(&args, &env, Duration::from_secs(30));
    assert!(output.status.success(), "{}", output.stderr);
    assert!(output.stdout.contains("\"large-1\""), "{}", output.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_bodies_and_batches_arrive_whole() {
    let Some(moto) = MotoServer::start_or_skip().await else {
        return;
    };
    let store = s3_store(&moto, "scoretap-traces").await;
    bodies_and_batches_arrive(store, 100 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_bodies_and_batches_arrive_whole() {
    let Some(azurite) = Azurite::start_or_skip().await else {
        return;
    };
    let store = azure_store(&azurite, "scoretap-traces").await;
    bodies_and_batches_arrive(store, 100 << 20).await;
}

/// The store goes away for a while: clients see nothing, and when it is back every record and
/// every spilled body arrives, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_loses_nothing_and_duplicates_nothing() {
    let Some(mut azurite) = Azurite::start_or_skip().await else {
        return;
    };
    let store = azure_store(&azurite, "outage").await;
    let up = TestUpstream::start().await;
    let spool = TempDir::new("spool");
    let proxy = proxy(&up, &store, spool.path(), &[]).await;
    let mut c = Client::connect(proxy.addr, Proto::H1).await;

    // Warm: one exchange stored before the outage.
    assert_eq!(
        post_json(&mut c, "before", r#"{"data":[[0]]}"#)
            .await
            .status,
        200
    );
    wait_uploaded(&proxy, Duration::from_secs(30)).await;

    azurite.stop();
    let mut ids = vec!["before".to_owned()];
    let mut slowest = Duration::ZERO;
    for n in 0..30 {
        let id = format!("during-{n}");
        let started = Instant::now();
        let response = if n % 10 == 0 {
            upload(&mut c, "/sink", &id, 2 << 20).await
        } else {
            post_json(&mut c, &id, &format!(r#"{{"data":[[{n}]]}}"#)).await
        };
        slowest = slowest.max(started.elapsed());
        assert_eq!(response.status, 200, "{id}: clients are unaffected");
        ids.push(id);
    }
    eprintln!("slowest exchange while the store was down: {slowest:?}");
    // Batches seal and fail to upload for a while: attempts fail and are retried.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let state = capture_state(proxy.admin).await;
    assert!(
        state["storage"]["upload_failed_attempts"].as_u64().unwrap() > 0,
        "{}",
        state["storage"]
    );
    assert!(state["storage"]["uploads_pending"].as_u64().unwrap() > 0);

    azurite.restart_same_port();
    wait_uploaded(&proxy, Duration::from_secs(120)).await;
    let records = wait_records(&store.client, &ids, Duration::from_secs(30)).await;
    for n in [0, 10, 20] {
        let record = &records[&format!("during-{n}")];
        let key = blob_key(&store, record, "request");
        assert_eq!(
            object_sha256(&store, &key).await,
            (2 << 20, pattern_sha256(2 << 20))
        );
    }
    let bodies = store.client.list("bodies/").await.unwrap();
    assert_eq!(bodies.len(), 3, "one object per spilled body");
    assert!(
        slowest < Duration::from_secs(2),
        "a client waited {slowest:?}"
    );
}

/// `kill -9` while a large body waits in the spool (the store is down): the next start replays
/// the spool and the store ends complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_spill_loses_nothing() {
    let Some(mut azurite) = Azurite::start_or_skip().await else {
        return;
    };
    let _turn = ONE_LARGE_BODY_AT_A_TIME.lock().await;
    let store = azure_store(&azurite, "crash").await;
    let up = TestUpstream::start().await;
    let spool = TempDir::new("spool");
    let size: u64 = 150 << 20;
    {
        // A ring that holds the whole first body: on a loaded machine the collector can fall
        // behind the upload and drop chunks (by design), which would make the spilled body
        // partial for reasons other than the kill. (The whole suite once dropped 53 MiB of it.)
        let proxy = proxy(
            &up,
            &store,
            spool.path(),
            &["--capture-buffer-bytes", "256m"],
        )
        .await;
        azurite.stop();
        let mut c = Client::connect(proxy.addr, Proto::H1).await;
        let response = upload(&mut c, "/sink", "crash-1", size).await;
        assert_eq!(response.status, 200);
        // A second body is cut by the kill while it streams.
        let (sender, body) = channel_body();
        let request = c
            .req("POST", "/sink")
            .header("x-request-id", "crash-2")
            .header("content-length", (size).to_string())
            .body(body)
            .unwrap();
        let mut second = Client::connect(proxy.addr, Proto::H1).await;
        let pending =
            tokio::spawn(async move { second.send_within(request, Duration::from_secs(60)).await });
        for offset in (0..20u64 << 20).step_by(1 << 20) {
            assert!(sender.data(Bytes::from(pattern(offset, 1 << 20))).await);
        }
        // The first record is sealed into a batch (age 500ms), the second body is mid-spill.
        tokio::time::sleep(Duration::from_secs(1)).await;
        signal(proxy.pid(), "KILL");
        drop(sender);
        let _ = pending.await;
    }
    azurite.restart_same_port();
    let proxy = proxy(&up, &store, spool.path(), &[]).await;
    wait_uploaded(&proxy, Duration::from_secs(120)).await;
    let records = wait_records(
        &store.client,
        &["crash-1".to_owned()],
        Duration::from_secs(30),
    )
    .await;
    let key = blob_key(&store, &records["crash-1"], "request");
    let objects = store.client.list("").await.unwrap();
    assert_eq!(
        object_sha256(&store, &key).await,
        (size, pattern_sha256(size)),
        "the replayed body; the store holds {:?}; record {}",
        objects
            .iter()
            .map(|object| (&object.key, object.size))
            .collect::<Vec<_>>(),
        records["crash-1"].brief()
    );
    // What crossed of the cut body before the kill is stored too (no record names it: the
    // process died before writing one).
    let bodies = store.client.list("bodies/").await.unwrap();
    assert_eq!(
        bodies.len(),
        2,
        "{:?}",
        bodies.iter().map(|o| (&o.key, o.size)).collect::<Vec<_>>()
    );
    let cut = bodies.iter().find(|object| object.key != key).unwrap();
    assert!(cut.size > 0 && cut.size <= 20 << 20, "{}", cut.size);
    let left = walk_files(spool.path());
    assert!(
        left.is_empty(),
        "the spool is empty once uploaded: {left:?}"
    );
}

fn walk_files(root: &Path) -> Vec<std::path::PathBuf> {
    scoretap_tests::traces::walk(root)
        .into_iter()
        .filter(|path| {
            !path
                .components()
                .any(|part| part.as_os_str() == ".scoretap")
        })
        .collect()
}

/// The spool's disk budget runs out while the store is down: new data is dropped and counted,
/// clients never wait, and the process keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_drops_and_counts_without_slowing_clients() {
    let Some(mut azurite) = Azurite::start_or_skip().await else {
        return;
    };
    let store = azure_store(&azurite, "fullspool").await;
    let up = TestUpstream::start().await;
    let spool = TempDir::new("spool");
    let proxy = proxy(&up, &store, spool.path(), &["--spool-max-bytes", "3MiB"]).await;
    azurite.stop();
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    let mut slowest = Duration::ZERO;
    for n in 0..8 {
        let started = Instant::now();
        let response = upload(&mut c, "/sink", &format!("full-{n}"), 1 << 20).await;
        slowest = slowest.max(started.elapsed());
        assert_eq!(response.status, 200);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let state = capture_state(proxy.admin).await;
    let dropped = state["stats"]["dropped"]["spool_full"].as_u64().unwrap();
    assert!(dropped > 0, "{state}");
    let spool_bytes = state["storage"]["spool_bytes"].as_u64().unwrap();
    assert!(
        spool_bytes <= 3 << 20,
        "the spool stays in its budget: {spool_bytes}"
    );
    let metrics = scoretap_tests::metrics::scrape(proxy.admin).await;
    assert_eq!(
        metrics.value(
            "scoretap_capture_dropped_total",
            &[("reason", "spool_full")]
        ),
        dropped as f64,
        "spool drops are a metric"
    );
    assert!(
        metrics.value(
            "scoretap_storage_requests_total",
            &[("sink", "azure"), ("operation", "put"), ("result", "error")]
        ) > 0.0,
        "failed uploads are dependency metrics"
    );
    assert!(
        metrics.value("scoretap_spool_bytes", &[]) > 0.0,
        "the spool's size is a metric"
    );
    eprintln!("spool full: {dropped} drops, spool {spool_bytes} bytes, slowest client {slowest:?}");
    assert!(
        slowest < Duration::from_secs(2),
        "a client waited {slowest:?}"
    );
    // Once the store is back, what the spool kept is uploaded and new data flows again.
    azurite.restart_same_port();
    wait_uploaded(&proxy, Duration::from_secs(60)).await;
    assert_eq!(
        post_json(&mut c, "after", r#"{"data":[[1]]}"#).await.status,
        200
    );
    wait_uploaded(&proxy, Duration::from_secs(30)).await;
    wait_records(
        &store.client,
        &["after".to_owned()],
        Duration::from_secs(30),
    )
    .await;
}

/// A 1 GiB body spilled to Azure Blob: streamed to the spool as it arrives, uploaded in 8 MiB
/// parts; scoretap's memory stays within its ring budget plus the uploads' part buffers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1gib_body_reaches_azure_with_bounded_memory() {
    let Some(azurite) = Azurite::start_or_skip().await else {
        return;
    };
    let _turn = ONE_LARGE_BODY_AT_A_TIME.lock().await;
    let store = azure_store(&azurite, "gib").await;
    let up = TestUpstream::start().await;
    let spool = TempDir::new("spool");
    let proxy = proxy(
        &up,
        &store,
        spool.path(),
        &[
            "--capture-buffer-bytes",
            "32MiB",
            "--upload-concurrency",
            "2",
        ],
    )
    .await;
    let idle_kib = proc_status_kib(proxy.pid(), "VmRSS").unwrap();
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    let size: u64 = 1 << 30;
    let started = Instant::now();
    // 100 MB/s: the test build's collector keeps up (faster, capture drops and counts).
    let response = upload_pattern(
        &mut c,
        "/sink",
        "gib-azure",
        size,
        "application/octet-stream",
        Some(100_000_000),
    )
    .await;
    assert_eq!(response.status, 200);
    wait_uploaded(&proxy, Duration::from_secs(300)).await;
    let elapsed = started.elapsed();
    let peak_kib = proc_status_kib(proxy.pid(), "VmHWM").unwrap();
    let records = wait_records(
        &store.client,
        &["gib-azure".to_owned()],
        Duration::from_secs(30),
    )
    .await;
    let record = &records["gib-azure"];
    let metrics = scoretap_tests::metrics::scrape(proxy.admin).await;
    assert_eq!(
        record.at("/request/body/complete"),
        &Value::Bool(true),
        "capture dropped {} chunk events (ring full); {}",
        metrics.sum("scoretap_capture_dropped_total", &[]),
        record.brief()
    );
    let key = blob_key(&store, record, "request");
    assert_eq!(
        object_sha256(&store, &key).await,
        (size, pattern_sha256(size))
    );
    eprintln!(
        "1 GiB spilled and uploaded to Azurite in {elapsed:?}; scoretap RSS idle {} MiB, peak {} MiB (ring 32 MiB, 2 uploads x 2 parts x 8 MiB)",
        idle_kib / 1024,
        peak_kib / 1024
    );
    assert!(
        peak_kib < idle_kib + (32 + 32 + 32) * 1024,
        "peak RSS {peak_kib} KiB over idle {idle_kib} KiB + ring 32 MiB + part buffers 32 MiB + 32 MiB"
    );
}
