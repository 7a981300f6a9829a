//! The remote store backends (`scoretap_core::storage::remote`) against real servers: moto's S3
//! server and Azurite, each started and stopped by its test.
//!
//! Both run the same suite: small objects with their content type; files of 0 B, 1 KiB,
//! 8 MiB + 1 (the first multipart size) and 100 MiB (multipart, downloaded to a file and compared
//! by SHA-256); string-prefix listings and a listing longer than one page; idempotent
//! re-uploads; deletes; then outages (server paused, server stopped) that must fail within the
//! request timeout with messages free of secrets, and recovery after a restart on the same
//! port.
//!
//! A missing `moto_server` / `azurite-blob` skips the test (with a message) unless `CI` is set.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use scoretap_core::sink::StoreLocation;
use scoretap_core::storage::remote::{
    RemoteOptions, RemoteStore, StorageError, MULTIPART_PART_SIZE,
};
use scoretap_tests::stores::{Azurite, MotoServer, AZURITE_ACCOUNT_KEY, MOTO_SECRET_ACCESS_KEY};
use scoretap_tests::util::{pattern, pattern_sha256, Sha256, TempDir};

const MIB: u64 = 1024 * 1024;

/// The request timeout of the client used during outages.
const OUTAGE_TIMEOUT: Duration = Duration::from_secs(3);

/// How much later than the request timeout an outage error may arrive (SDK retry backoff,
/// scheduling on a loaded 2-core machine).
const OUTAGE_SLACK: Duration = Duration::from_secs(4);

/// Writes `pattern(0, size)` to `path` in 1 MiB blocks.
fn write_pattern_file(path: &Path, size: u64) {
    use std::io::Write;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).expect("create file"));
    let mut offset = 0;
    while offset < size {
        let length = (size - offset).min(MIB) as usize;
        file.write_all(&pattern(offset, length))
            .expect("write file");
        offset += length as u64;
    }
    file.flush().expect("flush file");
}

/// SHA-256 of a file, read in 1 MiB blocks.
fn file_sha256(path: &Path) -> String {
    use std::io::Read;
    let mut file = std::fs::File::open(path).expect("open file");
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; MIB as usize];
    loop {
        let read = file.read(&mut buffer).expect("read file");
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    hasher.finish()
}

/// Peak resident memory of this test process (VmHWM), in MiB.
fn peak_resident_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kilobytes| kilobytes / 1024)
}

/// Uploads `count` tiny objects `PREFIX/NNNNN` with 16 in flight.
async fn upload_many(store: &RemoteStore, prefix: &str, count: usize) {
    futures_util::stream::iter(0..count)
        .map(|index| {
            let store = store.clone();
            let key = format!("{prefix}{index:05}");
            async move {
                store
                    .put_bytes(&key, Bytes::from(key.clone()), Some("text/plain"))
                    .await
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await
        .expect("upload many small objects");
}

/// Puts, gets, lists and deletes through `store`; `page_objects` objects make a listing longer
/// than one page of the store.
async fn round_trips(store: &RemoteStore, page_objects: usize) {
    let scratch = TempDir::new("store-backends");
    let started = Instant::now();

    // Small objects keep their bytes and their content type.
    let json = Bytes::from_static(br#"{"input":[1,2,3]}"#);
    store
        .put_bytes("small/a.json", json.clone(), Some("application/json"))
        .await
        .expect("put_bytes");
    assert_eq!(store.get("small/a.json").await.expect("get"), json);
    assert_eq!(
        store.content_type("small/a.json").await.expect("head"),
        Some("application/json".to_string())
    );
    store
        .put_bytes("small/b.bin", Bytes::from_static(b"\x00\x01"), None)
        .await
        .expect("put_bytes without content type");
    assert_eq!(
        store.get("small/b.bin").await.expect("get").as_ref(),
        b"\x00\x01"
    );

    // Files: empty, small, the first multipart size, and a large multipart one.
    for (size, content_type) in [
        (0, Some("application/octet-stream")),
        (1024, Some("application/x-ndjson")),
        (MULTIPART_PART_SIZE + 1, Some("image/png")),
        (100 * MIB, None),
    ] {
        let step = Instant::now();
        let key = format!("files/size-{size}");
        let source = scratch.join(&format!("source-{size}"));
        write_pattern_file(&source, size);
        let uploaded = store
            .put_file(&key, &source, content_type)
            .await
            .unwrap_or_else(|error| panic!("put_file {size} B: {error}"));
        assert_eq!(uploaded, size, "bytes uploaded for {key}");
        let upload_time = step.elapsed();
        let target = scratch.join(&format!("downloaded-{size}"));
        let written = store
            .download_to(&key, &target)
            .await
            .unwrap_or_else(|error| panic!("download_to {key}: {error}"));
        assert_eq!(written, size, "bytes downloaded for {key}");
        assert_eq!(
            std::fs::metadata(&target).expect("downloaded file").len(),
            size
        );
        assert_eq!(
            file_sha256(&target),
            pattern_sha256(size),
            "{key}: downloaded bytes differ from the file"
        );
        if let Some(content_type) = content_type {
            assert_eq!(
                store.content_type(&key).await.expect("head").as_deref(),
                Some(content_type),
                "{key}: content type"
            );
        }
        let listed = store.list(&key).await.expect("list one file");
        assert_eq!(listed.len(), 1, "{key}: {listed:?}");
        assert_eq!(
            (listed[0].key.as_str(), listed[0].size),
            (key.as_str(), size)
        );
        eprintln!(
            "{}: {size} B uploaded in {upload_time:?}, downloaded and checked in {:?}; peak RSS {} MiB",
            store.sink_label(),
            step.elapsed() - upload_time,
            peak_resident_mib()
        );
        std::fs::remove_file(&source).expect("remove source");
        std::fs::remove_file(&target).expect("remove download");
    }
    assert!(store
        .get("files/size-0")
        .await
        .expect("get empty")
        .is_empty());

    // The same key uploaded again (single and multipart) leaves one object with the new bytes.
    let first = scratch.join("first");
    let second = scratch.join("second");
    std::fs::write(&first, b"first version").expect("write");
    write_pattern_file(&second, MULTIPART_PART_SIZE + 4096);
    for source in [&first, &first, &second, &second] {
        store
            .put_file("again/object", source, Some("text/plain"))
            .await
            .expect("re-upload");
    }
    let listed = store.list("again/").await.expect("list re-uploads");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].size, MULTIPART_PART_SIZE + 4096);
    let target = scratch.join("again-downloaded");
    store
        .download_to("again/object", &target)
        .await
        .expect("download re-upload");
    assert_eq!(file_sha256(&target), file_sha256(&second));
    store
        .put_file("again/object", &first, Some("text/plain"))
        .await
        .expect("replace multipart object by a small one");
    assert_eq!(
        store.get("again/object").await.expect("get").as_ref(),
        b"first version"
    );

    // Listings take a plain string prefix and are relative to the store prefix.
    for key in ["list/a1", "list/a2", "list/b1", "list/a/nested", "listing"] {
        store
            .put_bytes(key, Bytes::from(key), None)
            .await
            .expect("put list object");
    }
    let keys = |entries: Vec<scoretap_core::storage::remote::ObjectEntry>| {
        let mut keys: Vec<String> = entries.into_iter().map(|entry| entry.key).collect();
        keys.sort();
        keys
    };
    assert_eq!(
        keys(store.list("list/a").await.expect("list")),
        ["list/a/nested", "list/a1", "list/a2"]
    );
    assert_eq!(
        keys(store.list("list/").await.expect("list")),
        ["list/a/nested", "list/a1", "list/a2", "list/b1"]
    );
    assert_eq!(
        keys(store.list("list").await.expect("list")),
        ["list/a/nested", "list/a1", "list/a2", "list/b1", "listing"]
    );
    assert!(store.list("nothing/").await.expect("list").is_empty());
    let everything = keys(store.list("").await.expect("list all"));
    assert!(
        everything.contains(&"small/a.json".to_string()),
        "{everything:?}"
    );
    assert!(everything.iter().all(|key| !key.starts_with("run/")));

    // A listing longer than one page comes back whole.
    let step = Instant::now();
    upload_many(store, "many/", page_objects).await;
    let upload_time = step.elapsed();
    let many = keys(store.list("many/").await.expect("list many"));
    assert_eq!(many.len(), page_objects);
    let expected: Vec<String> = (0..page_objects)
        .map(|index| format!("many/{index:05}"))
        .collect();
    assert_eq!(many, expected);
    eprintln!(
        "{}: {page_objects} objects uploaded in {upload_time:?}, listed in {:?}",
        store.sink_label(),
        step.elapsed() - upload_time
    );

    // Deletes; a missing object is "not found"; deleting it again is fine.
    store.delete("small/a.json").await.expect("delete");
    let error = store
        .get("small/a.json")
        .await
        .expect_err("deleted object is gone");
    assert!(error.is_not_found(), "{error}");
    assert_eq!(error.operation(), "get");
    assert_eq!(error.key(), "small/a.json");
    let error = store
        .content_type("small/a.json")
        .await
        .expect_err("deleted object has no head");
    assert!(error.is_not_found(), "{error}");
    let error = store
        .download_to("small/a.json", &scratch.join("missing"))
        .await
        .expect_err("deleted object cannot be downloaded");
    assert!(error.is_not_found(), "{error}");
    store
        .delete("small/a.json")
        .await
        .expect("deleting a missing object succeeds");
    assert!(!keys(store.list("small/").await.expect("list")).contains(&"small/a.json".into()));

    // A file that does not exist is a local error, not a store one.
    let error = store
        .put_file("never", &scratch.join("no-such-file"), None)
        .await
        .expect_err("missing local file");
    assert!(matches!(error, StorageError::LocalFile { .. }), "{error:?}");
    eprintln!(
        "{}: round trips took {:?}",
        store.sink_label(),
        started.elapsed()
    );
}

/// Asserts an outage error: a `put` of `key`, within the timeout, no secret in its text.
fn check_outage_error(
    result: Result<(), StorageError>,
    elapsed: Duration,
    secrets: &[&str],
    what: &str,
) {
    let error = result.expect_err(what);
    eprintln!("{what}: error after {elapsed:?}: {error}");
    assert!(
        elapsed <= OUTAGE_TIMEOUT + OUTAGE_SLACK,
        "{what}: the error took {elapsed:?} (request timeout {OUTAGE_TIMEOUT:?})"
    );
    assert_eq!(error.operation(), "put");
    assert!(!error.is_not_found(), "{what}: {error}");
    let display = error.to_string();
    let debug = format!("{error:?}");
    for secret in secrets {
        assert!(
            !display.contains(secret) && !debug.contains(secret),
            "{what}: the error shows a secret: {display} / {debug}"
        );
    }
    for marker in ["sig=", "Signature=", "SharedKey "] {
        assert!(
            !display.contains(marker) || display.contains(&format!("{marker}[redacted]")),
            "{what}: {display}"
        );
    }
}

async fn put_small(store: &RemoteStore, key: &str) -> (Result<(), StorageError>, Duration) {
    let started = Instant::now();
    let result = store
        .put_bytes(
            key,
            Bytes::from_static(b"during an outage"),
            Some("text/plain"),
        )
        .await;
    (result, started.elapsed())
}

fn outage_options(options: RemoteOptions) -> RemoteOptions {
    RemoteOptions {
        request_timeout: OUTAGE_TIMEOUT,
        ..options
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_backend_against_moto() {
    let Some(mut moto) = MotoServer::start_or_skip().await else {
        return;
    };
    let bucket = "scoretap-backends";
    moto.create_bucket(bucket).await;
    let location = StoreLocation::S3 {
        bucket: bucket.into(),
        prefix: "run/".into(),
    };
    let store = moto.remote_store(&location).await;
    assert_eq!(store.sink_label(), "s3");
    // ListObjectsV2 pages hold 1,000 keys: two pages.
    round_trips(&store, 1_050).await;

    // A missing bucket is an error, but not "not found".
    let other = moto
        .remote_store(&StoreLocation::S3 {
            bucket: "no-such-bucket".into(),
            prefix: String::new(),
        })
        .await;
    let error = other.get("x").await.expect_err("missing bucket");
    eprintln!("missing bucket: {error}");
    assert!(!error.is_not_found(), "{error}");
    assert!(error.to_string().contains("NoSuchBucket"), "{error}");
    let error = other
        .delete("x")
        .await
        .expect_err("delete in a missing bucket");
    assert!(!error.is_not_found(), "{error}");

    let fast = RemoteStore::connect(&location, &outage_options(moto.remote_options()))
        .await
        .expect("connect");
    let secrets = [MOTO_SECRET_ACCESS_KEY];
    fast.put_bytes("outage/before", Bytes::from_static(b"before"), None)
        .await
        .expect("put before the outage");

    moto.pause();
    let (result, elapsed) = put_small(&fast, "outage/paused").await;
    moto.resume();
    check_outage_error(result, elapsed, &secrets, "moto paused");
    fast.put_bytes("outage/resumed", Bytes::from_static(b"resumed"), None)
        .await
        .expect("put after resume");
    assert_eq!(
        store
            .get("outage/before")
            .await
            .expect("data kept")
            .as_ref(),
        b"before"
    );

    moto.stop();
    let (result, elapsed) = put_small(&fast, "outage/stopped").await;
    check_outage_error(result, elapsed, &secrets, "moto stopped");

    // moto keeps its data in memory: after a restart the bucket has to be created again.
    moto.restart_same_port();
    let error = fast
        .get("outage/before")
        .await
        .expect_err("moto forgot everything");
    assert!(error.to_string().contains("NoSuchBucket"), "{error}");
    moto.create_bucket(bucket).await;
    fast.put_bytes("outage/restarted", Bytes::from_static(b"restarted"), None)
        .await
        .expect("put after restart, same client");
    assert_eq!(
        store.get("outage/restarted").await.expect("get").as_ref(),
        b"restarted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_backend_against_azurite() {
    let Some(mut azurite) = Azurite::start_or_skip().await else {
        return;
    };
    let container = "scoretap-backends";
    azurite.create_container(container).await;
    let location = StoreLocation::Azure {
        container: container.into(),
        prefix: "run/".into(),
    };
    let store = azurite.remote_store(&location).await;
    assert_eq!(store.sink_label(), "azure");
    // Azure list pages hold 5,000 blobs: two pages.
    round_trips(&store, 5_001).await;

    // A missing container is an error, but not "not found".
    let other = azurite
        .remote_store(&StoreLocation::Azure {
            container: "no-such-container".into(),
            prefix: String::new(),
        })
        .await;
    let error = other.get("x").await.expect_err("missing container");
    eprintln!("missing container: {error}");
    assert!(!error.is_not_found(), "{error}");
    assert!(error.to_string().contains("ContainerNotFound"), "{error}");
    let error = other
        .delete("x")
        .await
        .expect_err("delete in a missing container");
    assert!(!error.is_not_found(), "{error}");

    let fast = RemoteStore::connect(&location, &outage_options(azurite.remote_options()))
        .await
        .expect("connect");
    let secrets = [AZURITE_ACCOUNT_KEY];
    fast.put_bytes("outage/before", Bytes::from_static(b"before"), None)
        .await
        .expect("put before the outage");

    azurite.pause();
    let (result, elapsed) = put_small(&fast, "outage/paused").await;
    azurite.resume();
    check_outage_error(result, elapsed, &secrets, "Azurite paused");
    fast.put_bytes("outage/resumed", Bytes::from_static(b"resumed"), None)
        .await
        .expect("put after resume");

    azurite.stop();
    let (result, elapsed) = put_small(&fast, "outage/stopped").await;
    check_outage_error(result, elapsed, &secrets, "Azurite stopped");

    // Azurite keeps its data on disk: a restart on the same port serves it again.
    azurite.restart_same_port();
    assert_eq!(
        fast.get("outage/before").await.expect("data kept").as_ref(),
        b"before"
    );
    fast.put_bytes("outage/restarted", Bytes::from_static(b"restarted"), None)
        .await
        .expect("put after restart, same client");
    assert_eq!(
        store.get("outage/restarted").await.expect("get").as_ref(),
        b"restarted"
    );
}
