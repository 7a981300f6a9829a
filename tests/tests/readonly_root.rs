//! scoretap as a container runs it hardened: a non-root user (uid 65534) and a read-only root
//! filesystem, with one writable volume for the store and the spool. The process runs in a mount
//! namespace (`unshare --mount`) where `/` is bind-mounted onto itself and remounted read-only,
//! and a directory of the test's is bind-mounted writable (owned by the user, as a pod's volume
//! with its fsGroup): the only place the process can write, and one the test can look into
//! afterwards. Needs root to set that up; where `unshare` or `mount` is not permitted the tests
//! say so and skip (checked at run time).
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use scoretap_core::sink::StoreLocation;
use scoretap_tests::process::scoretap_bin;
use scoretap_tests::stores::MotoServer;
use scoretap_tests::traces::walk;
use scoretap_tests::util::{free_port, TempDir};
use scoretap_tests::*;

/// The unprivileged user the process runs as (`nobody`).
const USER: u32 = 65_534;

/// Whether a read-only root can be set up here; the reason when not.
fn sandbox_available() -> Result<(), String> {
    let output = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            "mount --bind / / && mount -o remount,ro,bind / && ! touch /.scoretap-probe 2>/dev/null \
             && command -v setpriv >/dev/null",
        )
        .output()
        .map_err(|error| format!("unshare cannot run: {error}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "no read-only root here (unshare --mount and mount need root, setpriv util-linux): {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// The volume: a temp directory owned by [`USER`], the only writable place in the sandbox.
fn volume(prefix: &str) -> TempDir {
    let volume = TempDir::new(prefix);
    std::os::unix::fs::chown(volume.path(), Some(USER), Some(USER)).unwrap();
    volume
}

/// `command` run as [`USER`] (no supplementary groups) inside a mount namespace whose root is
/// read-only, with `writable` (which must exist) bind-mounted writable, in `cwd`.
fn sandboxed(writable: &Path, cwd: &str, command: &[String]) -> Command {
    let quote = |word: &str| format!("'{}'", word.replace('\'', r"'\''"));
    let quoted: Vec<String> = command.iter().map(|word| quote(word)).collect();
    let writable = quote(&writable.display().to_string());
    let script = format!(
        "mount --bind / / && mount --bind {writable} {writable} && mount -o remount,ro,bind / && \
         cd {} && exec setpriv --reuid={USER} --regid={USER} --clear-groups {}",
        quote(cwd),
        quoted.join(" ")
    );
    let mut process = Command::new("unshare");
    process
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdin(Stdio::null())
        .env_remove("RUST_LOG")
        // The user's home, as a container image sets it (root's is not readable by the user).
        .env("HOME", "/nonexistent");
    process
}

/// The sandboxed process (`unshare` and `setpriv` exec into scoretap: the child is scoretap
/// itself), killed on drop.
struct Sandboxed(Child);

impl Sandboxed {
    /// SIGTERM, then its exit status (killed after 30 s).
    fn stop(&mut self) -> ExitStatus {
        scoretap_tests::process::signal(self.0.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "no exit 30 s after SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Sandboxed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_healthy(admin: SocketAddr, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if tokio::net::TcpStream::connect(admin).await.is_ok() {
            let mut client = Client::connect(admin, Proto::H1).await;
            if client.get("/healthz").await.status == 200 {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Starts scoretap in the sandbox with `arguments` (listeners added) and `environment`, waits
/// for `/healthz`; its stderr goes to `logs`.
async fn start_sandboxed(
    volume: &Path,
    arguments: &[String],
    environment: Vec<(String, String)>,
    logs: &TempDir,
) -> (Sandboxed, SocketAddr, SocketAddr) {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut command = vec![
        scoretap_bin().display().to_string(),
        "--listen".into(),
        listen.to_string(),
        "--admin-listen".into(),
        admin.to_string(),
    ];
    command.extend(arguments.iter().cloned());
    let mut process = sandboxed(volume, "/", &command);
    process
        .envs(environment)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(logs.join("stderr")).unwrap());
    let running = Sandboxed(process.spawn().unwrap());
    assert!(
        wait_healthy(admin, Duration::from_secs(20)).await,
        "not healthy as uid {USER} on a read-only root:\n{}",
        std::fs::read_to_string(logs.join("stderr")).unwrap_or_default()
    );
    (running, listen, admin)
}

/// Every file and directory under `volume`, relative, with its owner.
fn volume_contents(volume: &Path) -> Vec<(String, u32)> {
    let mut entries = Vec::new();
    let mut stack = vec![volume.to_path_buf()];
    while let Some(directory) = stack.pop() {
        for entry in std::fs::read_dir(&directory).unwrap() {
            let path = entry.unwrap().path();
            let metadata = std::fs::symlink_metadata(&path).unwrap();
            let relative = path.strip_prefix(volume).unwrap().display().to_string();
            entries.push((relative, metadata.uid()));
            if metadata.is_dir() {
                stack.push(path);
            }
        }
    }
    entries.sort();
    entries
}

/// The log has no warning or error, and no panic.
fn assert_clean_log(log: &str) {
    assert!(
        !log.contains("ERROR") && !log.contains("WARN") && !log.contains("panicked"),
        "errors or warnings as non-root on a read-only root:\n{log}"
    );
    assert!(log.contains("scoretap is serving"), "{log}");
}

#[tokio::test]
async fn serves_and_records_as_non_root_on_a_read_only_root() {
    if let Err(reason) = sandbox_available() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let upstream = TestUpstream::start().await;
    let volume = volume("readonly-volume");
    let logs = TempDir::new("readonly-logs");
    let arguments = vec![
        "--upstream".into(),
        upstream.url(),
        "--store".into(),
        format!("file://{}/data", volume.path().display()),
        "--spool-dir".into(),
        format!("{}/spool", volume.path().display()),
        "--trace-batch-age".into(),
        "200ms".into(),
    ];
    let (mut running, proxy, admin) =
        start_sandboxed(volume.path(), &arguments, Vec::new(), &logs).await;

    let mut client = Client::connect(proxy, Proto::H1).await;
    let answer = client.post("/score?readonly=1", r#"{"data": [[1]]}"#).await;
    assert_eq!(answer.status, 200);
    upstream.wait_path("readonly=1").await;

    // The record is written to the volume and read back by the admin.
    let mut admin_client = Client::connect(admin, Proto::H1).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let traces = admin_client.get("/traces?limit=10").await;
        if traces.status == 200 && traces.text().contains("readonly=1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no record of the exchange ({}): {}\n{}",
            traces.status,
            traces.text(),
            std::fs::read_to_string(logs.join("stderr")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = running.stop();
    let log = std::fs::read_to_string(logs.join("stderr")).unwrap();
    assert!(status.success(), "exit {status} after SIGTERM:\n{log}");
    assert_clean_log(&log);

    // Everything it wrote is in the volume, under the two directories it was given, owned by
    // the user; the record is there, in a trace batch.
    let contents = volume_contents(volume.path());
    for (path, owner) in &contents {
        assert!(
            path.starts_with("data") || path.starts_with("spool"),
            "{path} written outside --store and --spool-dir: {contents:?}"
        );
        assert_eq!(*owner, USER, "{path}: {contents:?}");
    }
    let batches: String = walk(&volume.path().join("data"))
        .iter()
        .filter(|path| path.display().to_string().contains("traces"))
        .map(|path| std::fs::read_to_string(path).unwrap())
        .collect();
    assert!(batches.contains("readonly=1"), "{contents:?}\n{batches}");
}

/// A remote store (S3, moto) through the spool on the volume: uploaded, the spool emptied, no
/// warning (the SDK finds no profile in the user's home and needs none).
#[tokio::test]
async fn uploads_through_the_spool_as_non_root_on_a_read_only_root() {
    if let Err(reason) = sandbox_available() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let Some(moto) = MotoServer::start_or_skip().await else {
        return;
    };
    moto.create_bucket("readonly").await;
    let upstream = TestUpstream::start().await;
    let volume = volume("readonly-spool");
    let logs = TempDir::new("readonly-spool-logs");
    let arguments = vec![
        "--upstream".into(),
        upstream.url(),
        "--store".into(),
        "s3://readonly/model".into(),
        "--s3-endpoint".into(),
        moto.endpoint(),
        "--spool-dir".into(),
        format!("{}/spool", volume.path().display()),
        "--trace-batch-age".into(),
        "200ms".into(),
    ];
    // The credentials moto takes, through the environment.
    let (mut running, listen, _) =
        start_sandboxed(volume.path(), &arguments, moto.env(), &logs).await;
    let log = || std::fs::read_to_string(logs.join("stderr")).unwrap_or_default();
    let mut client = Client::connect(listen, Proto::H1).await;
    let answer = client
        .post("/score?readonly=spool", r#"{"data": [[2]]}"#)
        .await;
    assert_eq!(answer.status, 200);

    let location = StoreLocation::parse("s3://readonly/model").unwrap();
    let store = moto.remote_store(&location).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let uploaded = loop {
        let mut text = String::new();
        for object in store.list("traces/").await.unwrap() {
            text.push_str(&String::from_utf8_lossy(
                &store.get(&object.key).await.unwrap(),
            ));
        }
        if text.contains("readonly=spool") {
            break text;
        }
        assert!(Instant::now() < deadline, "not uploaded:\n{}", log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(uploaded.contains(r#""data""#), "{uploaded}");
    let status = running.stop();
    assert!(status.success(), "exit {status} after SIGTERM:\n{}", log());
    assert_clean_log(&log());
    // The spool is on the volume and holds nothing once uploaded.
    let contents = volume_contents(volume.path());
    for (path, owner) in &contents {
        assert!(path.starts_with("spool"), "{path}: {contents:?}");
        assert_eq!(*owner, USER, "{path}: {contents:?}");
    }
    // (Its bookkeeping, `.scoretap/<instance>.traces.sequence`, stays.)
    let files: Vec<_> = walk(&volume.path().join("spool"));
    assert!(
        files.iter().all(|path| {
            let path = path.display().to_string();
            !path.contains("/traces/") && !path.ends_with(".jsonl")
        }),
        "batches left in the spool after their upload: {files:?}"
    );
}

/// Started in a read-only working directory with the defaults, scoretap exits naming the
/// directory it could not create and the flag that moves it: `--store` for the default
/// `./scoretap-data`, `--spool-dir` for the default `./scoretap-spool` of a remote store.
#[tokio::test]
async fn a_read_only_default_directory_names_the_flag_to_set() {
    if let Err(reason) = sandbox_available() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let volume = volume("readonly-unused");
    for (extra, directory, flag) in [
        (vec![], "./scoretap-data", "--store"),
        (
            vec![
                "--store".to_owned(),
                "s3://bucket/prefix".to_owned(),
                "--s3-endpoint".to_owned(),
                "http://127.0.0.1:9".to_owned(),
            ],
            "./scoretap-spool",
            "--spool-dir",
        ),
    ] {
        let mut command = vec![
            scoretap_bin().display().to_string(),
            "--upstream".into(),
            "http://127.0.0.1:9".into(),
            "--listen".into(),
            format!("127.0.0.1:{}", free_port()),
            "--admin-listen".into(),
            format!("127.0.0.1:{}", free_port()),
        ];
        command.extend(extra);
        // The working directory is on the read-only root.
        let output = sandboxed(volume.path(), "/", &command)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(directory)
                && stderr.contains(flag)
                && stderr.contains("Read-only file system"),
            "the error names the directory, the flag and why:\n{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    assert!(volume_contents(volume.path()).is_empty());
}
