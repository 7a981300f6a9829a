//! scoretap as a container runs it hardened: a non-root user (uid 65534) and a read-only root
//! filesystem, with one writable volume for the store and the spool. The process runs in a mount
//! namespace (`unshare --mount`) where `/` is remounted read-only and a tmpfs is the only writable
//! place. Needs root to set that up; where `unshare` is not permitted the tests say so and skip.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use scoretap_tests::process::scoretap_bin;
use scoretap_tests::util::{free_port, TempDir};
use scoretap_tests::*;

/// The unprivileged user the process runs as (`nobody`).
const USER: &str = "65534";

/// Whether a read-only root can be set up here; the reason when not.
fn sandbox_available() -> Result<(), String> {
    let output = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount --bind / / && mount -o remount,ro,bind / && ! touch /.scoretap-probe 2>/dev/null")
        .output()
        .map_err(|error| format!("unshare cannot run: {error}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "no read-only root here (unshare --mount needs root): {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// `command` run as [`USER`] inside a mount namespace whose root is read-only, with a tmpfs
/// mounted on `writable` (which must exist) and `cwd` as working directory.
fn sandboxed(writable: &str, cwd: &str, command: &[String]) -> Command {
    let quoted: Vec<String> = command
        .iter()
        .map(|word| format!("'{}'", word.replace('\'', r"'\''")))
        .collect();
    let script = format!(
        "mount --bind / / && mount -o remount,ro,bind / && \
         mount -t tmpfs -o mode=1777,size=64m tmpfs '{writable}' && cd '{cwd}' && \
         exec setpriv --reuid={USER} --regid={USER} --clear-groups {}",
        quoted.join(" ")
    );
    let mut process = Command::new("unshare");
    process
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdin(Stdio::null())
        .env_remove("RUST_LOG");
    process
}

/// Kills the sandboxed process on drop.
struct Sandboxed(Child);

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

#[tokio::test]
async fn serves_and_records_as_non_root_on_a_read_only_root() {
    if let Err(reason) = sandbox_available() {
        eprintln!("skipped: {reason}");
        return;
    }
    let upstream = TestUpstream::start().await;
    let volume = TempDir::new("readonly-volume");
    let volume_path = volume.path().display().to_string();
    let logs = TempDir::new("readonly-logs");
    let (listen, admin) = (free_port(), free_port());
    let command = vec![
        scoretap_bin().display().to_string(),
        "--upstream".into(),
        upstream.url(),
        "--listen".into(),
        format!("127.0.0.1:{listen}"),
        "--admin-listen".into(),
        format!("127.0.0.1:{admin}"),
        "--store".into(),
        format!("file://{volume_path}/data"),
        "--spool-dir".into(),
        format!("{volume_path}/spool"),
        "--trace-batch-age".into(),
        "200ms".into(),
    ];
    let stderr_path = logs.join("stderr");
    let mut process = sandboxed(&volume_path, "/", &command);
    process
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap());
    let _running = Sandboxed(process.spawn().unwrap());
    let admin: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let stderr = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
    assert!(
        wait_healthy(admin, Duration::from_secs(20)).await,
        "not healthy as uid {USER} on a read-only root:\n{}",
        stderr()
    );

    let proxy: SocketAddr = format!("127.0.0.1:{listen}").parse().unwrap();
    let mut client = Client::connect(proxy, Proto::H1).await;
    let answer = client.post("/score?readonly=1", r#"{"data": [[1]]}"#).await;
    assert_eq!(answer.status, 200);
    upstream.wait_path("readonly=1").await;

    // The record is written to the volume (the only writable place) and read back by the admin.
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
            stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = stderr();
    assert!(
        !log.contains("ERROR") && !log.contains("WARN"),
        "errors or warnings as non-root on a read-only root:\n{log}"
    );
}

#[tokio::test]
async fn a_read_only_default_store_names_the_flag_to_set() {
    if let Err(reason) = sandbox_available() {
        eprintln!("skipped: {reason}");
        return;
    }
    let volume = TempDir::new("readonly-unused");
    let volume_path = volume.path().display().to_string();
    let command = vec![
        scoretap_bin().display().to_string(),
        "--upstream".into(),
        "http://127.0.0.1:9".into(),
        "--listen".into(),
        format!("127.0.0.1:{}", free_port()),
        "--admin-listen".into(),
        format!("127.0.0.1:{}", free_port()),
    ];
    // The working directory is on the read-only root: the default ./scoretap-data cannot be made.
    let output = sandboxed(&volume_path, "/", &command)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("./scoretap-data") && stderr.contains("--store"),
        "the error names the directory and the flag:\n{stderr}"
    );
}
