//! Storage with the local store (`file://`): spilled bodies, trace batches (age, gzip, key
//! templates), the `modeldata` CSV export, and memory while a 1 GiB body is spilled.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use serde_json::Value;

use scoretap_tests::client::{full, upload_pattern, Collected};
use scoretap_tests::harness::upstream_args;
use scoretap_tests::process::run_cli;
use scoretap_tests::traces::{
    inline_bytes, parse_jsonl, proc_status_kib, walk, TraceRecord, TraceStore,
};
use scoretap_tests::util::{pattern, pattern_sha256, sha256_hex, Sha256};
use scoretap_tests::*;

const SERVICE: &str = "storesvc";
const INSTANCE: &str = "storetest-1";

async fn proxy(up: &TestUpstream, store: &TraceStore, extra: &[&str]) -> Scoretap {
    Scoretap::builder()
        .args(upstream_args(up))
        .args(store.args())
        .args(["--service", SERVICE, "--instance", INSTANCE])
        .args(extra.iter().copied())
        .start()
        .await
}

async fn upload(c: &mut Client, path: &str, id: &str, size: u64, content_type: &str) -> Collected {
    upload_pattern(c, path, id, size, content_type, None).await
}

fn body<'r>(record: &'r TraceRecord, part: &str) -> &'r Value {
    record.at(&format!("/{part}/body"))
}

/// The local path of a `file://` blob pointer.
fn blob_path(record: &TraceRecord, part: &str) -> std::path::PathBuf {
    let blob = body(record, part)["blob"]
        .as_str()
        .unwrap_or_else(|| panic!("{part} has no blob: {}", record.brief()));
    std::path::PathBuf::from(
        blob.strip_prefix("file://")
            .unwrap_or_else(|| panic!("not a file:// blob: {blob}")),
    )
}

fn file_sha256(path: &std::path::Path) -> (u64, String) {
    use std::io::Read;
    let mut file = std::fs::File::open(path).unwrap();
    let mut digest = Sha256::new();
    let mut block = vec![0u8; 1 << 20];
    let mut total = 0u64;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_are_spilled_whole_and_the_record_points_at_them() {
    let up = TestUpstream::start().await;
    let store = TraceStore::new();
    let proxy = proxy(&up, &store, &[]).await;
    let mut c = Client::connect(proxy.addr, Proto::H1).await;

    // A 20 MB upload (echoed back): both bodies spilled.
    let size = 20 << 20;
    let response = upload(
        &mut c,
        "/echo",
        "spill-big",
        size,
        "application/octet-stream",
    )
    .await;
    assert_eq!(response.status, 200);
    assert_eq!(sha256_hex(&response.body), pattern_sha256(size));
    let record = store.wait_one("spill-big").await;
    for part in ["request", "response"] {
        let b = body(&record, part);
        assert_eq!(b["truncated"], true, "{}", record.brief());
        assert_eq!(b["complete"], true, "{}", record.brief());
        assert_eq!(b["size"], size);
        assert_eq!(b["sha256"], pattern_sha256(size).as_str());
        let path = blob_path(&record, part);
        let expected_key = format!(
            "bodies/{SERVICE}/{}/{}/{part}",
            &record.str_at("/started_at").unwrap()[..10].replace('-', "/"),
            record.str_at("/id").unwrap()
        );
        assert!(
            path.ends_with(&expected_key),
            "{} is not in the layout {expected_key}",
            path.display()
        );
        assert_eq!(file_sha256(&path), (size, pattern_sha256(size)), "{part}");
        // The record still shows the body's start (read back from the spilled file).
        let inline = inline_bytes(b);
        assert!(
            inline.len() >= 16 << 10 && inline == pattern(0, inline.len()),
            "{part}: {} inline bytes, not the body's start: {}",
            inline.len(),
            record.brief()
        );
    }

    // A body that fits a record alone (40 KB each way) but not both together: spilled from
    // what capture held, so every cut body has its whole copy.
    let middle = pattern(3, 40_000);
    let response = c
        .fetch(
            c.req("POST", "/echo")
                .header("x-request-id", "spill-middle")
                .header("content-type", "application/octet-stream")
                .body(full(middle.clone()))
                .unwrap(),
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(response.status, 200);
    let record = store.wait_one("spill-middle").await;
    let mut cut = 0;
    for part in ["request", "response"] {
        let b = body(&record, part);
        if b["truncated"] == true {
            cut += 1;
            let path = blob_path(&record, part);
            assert_eq!(std::fs::read(&path).unwrap(), middle, "{part}");
        } else {
            assert_eq!(b["blob"], Value::Null, "an uncut body is not spilled");
        }
    }
    assert!(
        cut >= 1,
        "two 40 KB base64 bodies cannot both fit: {}",
        record.brief()
    );

    // Small bodies stay inline only.
    let response = c
        .fetch(
            c.req("POST", "/echo")
                .header("x-request-id", "spill-small")
                .header("content-type", "application/json")
                .body(full(r#"{"data":[[1,2,3]]}"#))
                .unwrap(),
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(response.status, 200);
    let record = store.wait_one("spill-small").await;
    assert_eq!(body(&record, "request")["blob"], Value::Null);
    let bodies = walk(&store.path().join("bodies"));
    assert_eq!(bodies.len(), 2 + cut, "spilled objects: {bodies:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spilling_stops_at_the_body_limit_and_can_be_switched_off() {
    let up = TestUpstream::start().await;
    let store = TraceStore::new();
    let proxy = proxy(&up, &store, &["--capture-max-body-bytes", "3MiB"]).await;
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    let size = 5 << 20;
    let response = upload(&mut c, "/sink", "limit", size, "application/octet-stream").await;
    assert_eq!(response.status, 200);
    assert_eq!(response.json()["sha256"], pattern_sha256(size).as_str());
    let record = store.wait_one("limit").await;
    let b = body(&record, "request");
    assert_eq!(b["complete"], false, "{}", record.brief());
    assert_eq!(b["size"], size, "size counts every byte that crossed");
    let (stored, _) = file_sha256(&blob_path(&record, "request"));
    assert!(
        stored <= 3 << 20 && stored > 2 << 20,
        "the blob holds what capture took before the limit: {stored} bytes"
    );
    drop(proxy);

    let off = TraceStore::new();
    let proxy = self::proxy(&up, &off, &["--spill", "false"]).await;
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    let response = upload(
        &mut c,
        "/sink",
        "no-spill",
        1 << 20,
        "application/octet-stream",
    )
    .await;
    assert_eq!(response.status, 200);
    let record = off.wait_one("no-spill").await;
    assert_eq!(body(&record, "request")["truncated"], true);
    assert_eq!(body(&record, "request")["blob"], Value::Null);
    assert!(!off.path().join("bodies").exists(), "nothing spilled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_seal_by_age_with_gzip_and_a_custom_key_template() {
    let up = TestUpstream::start().await;
    let store = TraceStore::new();
    let proxy = proxy(
        &up,
        &store,
        &[
            "--trace-batch-age",
            "300ms",
            "--trace-compression",
            "gzip",
            "--trace-key-template",
            "exports/{service}/{yyyy}{mm}{dd}/{instance}-{seq}.jsonl",
        ],
    )
    .await;
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    for round in 0..2 {
        let id = format!("gz-{round}");
        let response = c
            .fetch(
                c.req("POST", "/echo")
                    .header("x-request-id", id.as_str())
                    .header("content-type", "application/json")
                    .body(full(format!(r#"{{"round":{round}}}"#)))
                    .unwrap(),
                Duration::from_secs(30),
            )
            .await;
        assert_eq!(response.status, 200);
        // Let the first batch age out so the second record opens another one.
        tokio::time::sleep(Duration::from_millis(900)).await;
    }
    let files: Vec<_> = walk(&store.path().join("exports"))
        .into_iter()
        .filter(|path| path.to_string_lossy().ends_with(".jsonl.gz"))
        .collect();
    assert_eq!(files.len(), 2, "one sealed gzip batch per round: {files:?}");
    let mut ids = Vec::new();
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with(&format!("{INSTANCE}-")), "{name}");
        let bytes = std::fs::read(file).unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut text)
            .unwrap();
        ids.extend(
            parse_jsonl(&text, Some(file))
                .iter()
                .map(|record| record.correlation_id().to_owned()),
        );
    }
    ids.sort();
    assert_eq!(ids, ["gz-0", "gz-1"]);
    // The query reads gzip batches too.
    let output = run_cli(
        &[
            "traces",
            "--store",
            &store.url(),
            "--trace-key-template",
            "exports/{service}/{yyyy}{mm}{dd}/{instance}-{seq}.jsonl",
            "--contains",
            "gz-1",
        ],
        &[],
        Duration::from_secs(15),
    );
    assert!(output.status.success(), "{}", output.stderr);
    assert!(output.stdout.contains("\"gz-1\""), "{}", output.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modeldata_csv_has_the_azure_ml_layout_header_and_rows() {
    let up = TestUpstream::start().await;
    let store = TraceStore::new();
    let proxy = proxy(
        &up,
        &store,
        &[
            "--modeldata",
            "sub-1/rg-1/ws-1/svc-1/model-1/3",
            "--modeldata-features",
            "age,income,score",
            "--trace-batch-age",
            "200ms",
        ],
    )
    .await;
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    // The upstream echoes: the "prediction" is the input's echo, so use /json-style bodies that
    // are valid inputs and predictions.
    let response = c
        .fetch(
            c.req("POST", "/echo")
                .header("x-request-id", "md-1")
                .header("content-type", "application/json")
                .body(full(r#"{"data": [[31, 5000.5, "a,b"], [42, 7000, null]]}"#))
                .unwrap(),
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(response.status, 200);
    let response = c
        .fetch(
            c.req("POST", "/echo")
                .header("x-request-id", "md-2")
                .header("content-type", "application/json")
                .body(full("[0.25, 0.75]"))
                .unwrap(),
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(response.status, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    let (inputs, predictions) = loop {
        let files = walk(&store.path().join("modeldata"));
        let find = |kind: &str| -> Vec<String> {
            files
                .iter()
                .filter(|path| path.to_string_lossy().contains(&format!("/{kind}/")))
                .map(|path| std::fs::read_to_string(path).unwrap())
                .collect()
        };
        let (inputs, predictions) = (find("inputs").join(""), find("predictions").join(""));
        let written = inputs.matches('\n').count() >= 4 && predictions.contains(",md-2,");
        if written || Instant::now() > deadline {
            break (inputs, predictions);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let files = walk(&store.path().join("modeldata"));
    let date = {
        let record = store.wait_one("md-1").await;
        record.str_at("/started_at").unwrap()[..10].replace('-', "/")
    };
    for path in &files {
        let relative = path
            .strip_prefix(store.path())
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let expected = "modeldata/sub-1/rg-1/ws-1/svc-1/model-1/3/";
        assert!(relative.starts_with(expected), "{relative}");
        assert!(
            relative.contains(&format!("/{date}/data-{INSTANCE}-")),
            "{relative}"
        );
        assert!(relative.ends_with(".csv"), "{relative}");
    }
    let lines: Vec<&str> = inputs.lines().collect();
    assert_eq!(
        lines[0], "$timestamp,$correlationid,age,income,score",
        "{inputs}"
    );
    assert!(
        lines
            .iter()
            .any(|line| line.ends_with(",md-1,31,5000.5,\"a,b\"")),
        "{inputs}"
    );
    assert!(
        lines.iter().any(|line| line.ends_with(",md-1,42,7000,")),
        "{inputs}"
    );
    // The echo of md-1's input is a valid prediction body too; md-2's [0.25, 0.75] gives one
    // row per element.
    assert!(
        predictions.contains("$timestamp,$correlationid,prediction\n"),
        "{predictions}"
    );
    assert!(predictions.contains(",md-2,0.25\n"), "{predictions}");
    assert!(predictions.contains(",md-2,0.75\n"), "{predictions}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_while_a_1gib_body_is_spilled() {
    let up = TestUpstream::start().await;
    let store = TraceStore::new();
    let proxy = proxy(&up, &store, &["--capture-buffer-bytes", "32MiB"]).await;
    let idle_kib = proc_status_kib(proxy.pid(), "VmRSS").unwrap();
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    let size: u64 = 1 << 30;
    let started = Instant::now();
    // 100 MB/s: faster than a scoring client sends, slower than the test build's collector
    // hashes and writes to this machine's disk, so capture keeps up and the whole body is
    // stored. (Faster, the ring fills and capture drops and counts, by design.)
    let response = upload_pattern(
        &mut c,
        "/sink",
        "gib",
        size,
        "application/octet-stream",
        Some(100_000_000),
    )
    .await;
    let elapsed = started.elapsed();
    assert_eq!(response.status, 200);
    assert_eq!(response.json()["sha256"], pattern_sha256(size).as_str());
    let record = store.wait_one("gib").await;
    let peak_kib = proc_status_kib(proxy.pid(), "VmHWM").unwrap();
    let stats = capture_stats(&proxy).await;
    eprintln!(
        "1 GiB spilled in {elapsed:?}; scoretap RSS idle {} MiB, peak {} MiB (ring budget 32 MiB); dropped {}",
        idle_kib / 1024,
        peak_kib / 1024,
        stats["stats"]["dropped"]
    );
    let b = body(&record, "request");
    let path = blob_path(&record, "request");
    assert_eq!(
        b["complete"],
        true,
        "size {} sha256 {} error {} blob holds {} bytes",
        b["size"],
        b["sha256"],
        record.at("/error"),
        std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0)
    );
    assert_eq!(file_sha256(&path), (size, pattern_sha256(size)));
    assert!(
        peak_kib < idle_kib + 32 * 1024 + 32 * 1024,
        "peak RSS {peak_kib} KiB: idle {idle_kib} KiB + the ring's 32 MiB + 32 MiB of buffers must bound it"
    );
}

async fn capture_stats(proxy: &Scoretap) -> Value {
    scoretap_tests::traces::capture_state(proxy.admin).await
}
