//! Real object stores for the storage tests: moto's S3 server ([`MotoServer`]) and Azurite's
//! Blob service ([`Azurite`]), both installed by scripts/install-test-deps.sh
//! (`pip install 'moto[server]'`, `npm install -g azurite`).
//!
//! Each runs on 127.0.0.1 on a free port, is killed on drop, and can be stopped, restarted on
//! the same port, paused (`SIGSTOP`: connections are accepted by the kernel but never
//! answered) and resumed, for the outage tests.
//!
//! A missing server binary makes [`MotoServer::start_or_skip`] / [`Azurite::start_or_skip`] return `None` after
//! saying so, unless the environment variable `CI` is set (to anything but `false` or `0`):
//! then it is a failure.
//!
//! Credentials: scoretap's store clients read them from the environment. [`MotoServer::env`] /
//! [`Azurite::env`] are the variables to give a spawned scoretap; for clients built in the
//! test process ([`MotoServer::remote_store`], [`Azurite::remote_store`]) the same fixed values
//! are set once in this process's environment ([`set_store_credentials_env`]) before any
//! server starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use scoretap_core::sink::StoreLocation;
use scoretap_core::storage::remote::{RemoteOptions, RemoteStore};

use crate::process::signal;
use crate::traces::admin_request;
use crate::util::{free_port, which, TempDir};

/// The access key id the tests use with moto (moto accepts any).
pub const MOTO_ACCESS_KEY_ID: &str = "scoretaptestaccesskey";
/// The secret access key the tests use with moto: error messages must never show it.
pub const MOTO_SECRET_ACCESS_KEY: &str = "scoretap-test-secret-4f9c2d7e1a8b6c3d5e0f";
/// The region the tests use with moto.
pub const MOTO_REGION: &str = "us-east-1";
/// Azurite's account.
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
/// Azurite's well-known account key (public; error messages must still never show it).
pub const AZURITE_ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// How long a server may take to answer after it is started.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Is the environment variable `CI` set to something true?
pub fn on_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| {
        let value = value.trim().to_ascii_lowercase();
        !value.is_empty() && value != "false" && value != "0"
    })
}

/// The path of `program`. When it is missing: a panic on CI, else `None` after saying why the
/// test is skipped.
pub fn require_server(program: &str, install: &str) -> Option<PathBuf> {
    if let Some(path) = which(program) {
        return Some(path);
    }
    if on_ci() {
        panic!("{program} is not on PATH (CI is set, so this fails): {install}");
    }
    eprintln!(
        "SKIPPED: {program} is not on PATH ({install}); \
         with CI=true a missing {program} fails the test"
    );
    None
}

/// Sets the credentials the in-process store clients read (fixed values, the same for every
/// server), once per process.
pub fn set_store_credentials_env() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for (name, value) in [
            ("AWS_ACCESS_KEY_ID", MOTO_ACCESS_KEY_ID),
            ("AWS_SECRET_ACCESS_KEY", MOTO_SECRET_ACCESS_KEY),
            ("AWS_REGION", MOTO_REGION),
            ("AWS_EC2_METADATA_DISABLED", "true"),
            ("AZURE_STORAGE_ACCOUNT_NAME", AZURITE_ACCOUNT),
            ("AZURE_STORAGE_ACCOUNT_KEY", AZURITE_ACCOUNT_KEY),
        ] {
            std::env::set_var(name, value);
        }
        // Nothing from the developer's shell may point the clients elsewhere.
        for name in [
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3",
            "AZURE_STORAGE_USE_EMULATOR",
            "AZURE_STORAGE_SAS_TOKEN",
            "AZURE_STORAGE_SAS_KEY",
            "AZURE_STORAGE_TOKEN",
            "AZURE_STORAGE_ENDPOINT",
            "AZURE_CREDENTIAL_TYPE",
        ] {
            std::env::remove_var(name);
        }
    });
}

/// A server process on a fixed port, with its log in a temp dir.
#[derive(Debug)]
struct ServerProcess {
    name: &'static str,
    program: PathBuf,
    arguments: Vec<String>,
    port: u16,
    child: Option<Child>,
    paused: bool,
    directory: TempDir,
    starts: u32,
}

impl ServerProcess {
    fn new(name: &'static str, program: PathBuf, arguments: Vec<String>, port: u16) -> Self {
        Self {
            name,
            program,
            arguments,
            port,
            child: None,
            paused: false,
            directory: TempDir::new(name),
            starts: 0,
        }
    }

    fn address(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn log_path(&self) -> PathBuf {
        self.directory.join("server.log")
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let mut start = text.len().saturating_sub(4000);
        while !text.is_char_boundary(start) {
            start += 1;
        }
        text[start..].to_string()
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("server log file");
        self.starts += 1;
        let child = Command::new(&self.program)
            .args(&self.arguments)
            .current_dir(self.directory.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log file")))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|error| panic!("spawn {}: {error}", self.program.display()));
        self.child = Some(child);
        self.paused = false;
    }

    /// Whether something on the port answers an HTTP request (any status).
    fn answers(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut stream) =
            std::net::TcpStream::connect_timeout(&self.address(), Duration::from_millis(500))
        else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
        let request = format!(
            "GET / HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n\r\n",
            self.address()
        );
        let mut first = [0u8; 5];
        stream.write_all(request.as_bytes()).is_ok()
            && stream.read_exact(&mut first).is_ok()
            && &first == b"HTTP/"
    }

    /// Waits (blocking, bounded) until the server answers HTTP on its port.
    fn wait_ready(&mut self) {
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait().expect("try_wait") {
                    panic!(
                        "{} exited with {status} before answering on port {}\n--- log ---\n{}",
                        self.name,
                        self.port,
                        self.log_tail()
                    );
                }
            }
            if self.answers() {
                return;
            }
            if started.elapsed() > READY_TIMEOUT {
                panic!(
                    "{} did not answer on port {} within {READY_TIMEOUT:?}\n--- log ---\n{}",
                    self.name,
                    self.port,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn start(&mut self) {
        self.spawn();
        self.wait_ready();
    }

    /// Stops the server gracefully (`SIGTERM`, after `SIGCONT` when paused; `SIGKILL` if it
    /// is still running 10 s later) and waits until its port is free again.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.paused {
                signal(child.id(), "CONT");
            }
            if child.try_wait().expect("try_wait").is_none() {
                signal(child.id(), "TERM");
            }
            let started = Instant::now();
            while child.try_wait().expect("try_wait").is_none() {
                if started.elapsed() > Duration::from_secs(10) {
                    eprintln!("{} ignored SIGTERM for 10 s: killing it", self.name);
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.paused = false;
        self.wait_port_free();
    }

    /// Kills the server at once (`SIGKILL`: a crash) and waits until its port is free again.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused = false;
        self.wait_port_free();
    }

    fn wait_port_free(&self) {
        let started = Instant::now();
        while std::net::TcpListener::bind(self.address()).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "port {} still busy 10 s after stopping {}",
                self.port,
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .unwrap_or_else(|| panic!("{} is not running", self.name))
            .id()
    }

    fn pause(&mut self) {
        signal(self.pid(), "STOP");
        self.paused = true;
    }

    fn resume(&mut self) {
        signal(self.pid(), "CONT");
        self.paused = false;
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL ends a stopped process too.
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- {} (port {}, started {} time(s)) log tail ---\n{}\n--- end ---",
                self.name,
                self.port,
                self.starts,
                self.log_tail()
            );
        }
    }
}

/// moto's S3-compatible server (`moto_server -H 127.0.0.1 -p PORT`). It keeps everything in
/// memory: [`MotoServer::restart_same_port`] comes back empty (buckets included); use
/// [`MotoServer::pause`] / [`MotoServer::resume`] for an outage that keeps the data.
#[derive(Debug)]
pub struct MotoServer {
    process: ServerProcess,
}

impl MotoServer {
    /// Starts moto on a free port and waits until it answers; `None` (after saying so) when
    /// `moto_server` is missing and `CI` is not set.
    pub async fn start_or_skip() -> Option<Self> {
        let program = require_server(
            "moto_server",
            "run scripts/install-test-deps.sh (pip install 'moto[server]>=5.2.2')",
        )?;
        set_store_credentials_env();
        let port = free_port();
        let arguments = vec![
            "-H".to_string(),
            "127.0.0.1".to_string(),
            "-p".to_string(),
            port.to_string(),
        ];
        let mut process = ServerProcess::new("moto", program, arguments, port);
        process.start();
        Some(Self { process })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.process.port)
    }

    /// The server's address.
    pub fn address(&self) -> SocketAddr {
        self.process.address()
    }

    /// Environment for a spawned scoretap (pass [`Self::endpoint`] as its S3 endpoint flag).
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", MOTO_ACCESS_KEY_ID),
            ("AWS_SECRET_ACCESS_KEY", MOTO_SECRET_ACCESS_KEY),
            ("AWS_REGION", MOTO_REGION),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
    }

    /// Remote options reaching this server (path-style, 10 s requests).
    pub fn remote_options(&self) -> RemoteOptions {
        RemoteOptions {
            s3_endpoint: Some(self.endpoint()),
            s3_region: Some(MOTO_REGION.to_string()),
            s3_force_path_style: true,
            request_timeout: Duration::from_secs(10),
            ..RemoteOptions::default()
        }
    }

    /// A store client for `location` on this server, for assertions.
    pub async fn remote_store(&self, location: &StoreLocation) -> RemoteStore {
        RemoteStore::connect(location, &self.remote_options())
            .await
            .unwrap_or_else(|error| panic!("connect to moto: {error}"))
    }

    /// Creates a bucket (moto does not check signatures, so a plain `PUT /bucket` does).
    pub async fn create_bucket(&self, name: &str) {
        let response = admin_request(self.address(), "PUT", &format!("/{name}"), &[], b"")
            .await
            .unwrap_or_else(|| panic!("moto PUT /{name}: no answer"));
        assert_eq!(
            response.status(),
            200,
            "moto PUT /{name}: {}",
            response.body_str()
        );
    }

    /// Stops the server (`SIGTERM`; its data is lost) and waits until the port is free.
    pub fn stop(&mut self) {
        self.process.stop();
    }

    /// Kills the server (`SIGKILL`, a crash) and waits until the port is free.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts it again on the same port (stopping it first if it runs). moto starts empty:
    /// buckets must be created again.
    pub fn restart_same_port(&mut self) {
        self.process.stop();
        self.process.start();
    }

    /// `SIGSTOP`: connections are accepted (by the kernel) but never answered; data is kept.
    pub fn pause(&mut self) {
        self.process.pause();
    }

    /// `SIGCONT` after [`Self::pause`].
    pub fn resume(&mut self) {
        self.process.resume();
    }

    /// Whether it is paused.
    pub fn is_paused(&self) -> bool {
        self.process.paused
    }
}

/// Azurite's Blob service (`azurite-blob`), with its data in a temp dir: [`Azurite::stop`] and
/// [`Azurite::restart_same_port`] keep every container and blob (a [`Azurite::kill`] may lose
/// the last 5 s).
#[derive(Debug)]
pub struct Azurite {
    process: ServerProcess,
    data: TempDir,
}

impl Azurite {
    /// Starts Azurite on a free port and waits until it answers; `None` (after saying so) when
    /// `azurite-blob` is missing and `CI` is not set.
    pub async fn start_or_skip() -> Option<Self> {
        let program = require_server(
            "azurite-blob",
            "run scripts/install-test-deps.sh (npm install -g azurite)",
        )?;
        set_store_credentials_env();
        let port = free_port();
        let data = TempDir::new("azurite-data");
        let arguments = vec![
            "--blobHost".to_string(),
            "127.0.0.1".to_string(),
            "--blobPort".to_string(),
            port.to_string(),
            "--location".to_string(),
            data.path().display().to_string(),
            "--silent".to_string(),
            "--skipApiVersionCheck".to_string(),
            "--disableTelemetry".to_string(),
        ];
        let mut process = ServerProcess::new("azurite", program, arguments, port);
        process.start();
        Some(Self { process, data })
    }

    /// `http://127.0.0.1:PORT/devstoreaccount1`: the account URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{AZURITE_ACCOUNT}", self.process.port)
    }

    /// The server's address.
    pub fn address(&self) -> SocketAddr {
        self.process.address()
    }

    /// Where Azurite keeps its data.
    pub fn data_directory(&self) -> &Path {
        self.data.path()
    }

    /// Environment for a spawned scoretap: the emulator account and key, and the emulator URL
    /// (used when no Azure endpoint flag is given; with the flag, pass [`Self::endpoint`]).
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AZURE_STORAGE_ACCOUNT_NAME", AZURITE_ACCOUNT.to_string()),
            ("AZURE_STORAGE_ACCOUNT_KEY", AZURITE_ACCOUNT_KEY.to_string()),
            ("AZURE_STORAGE_USE_EMULATOR", "true".to_string()),
            (
                "AZURITE_BLOB_STORAGE_URL",
                format!("http://127.0.0.1:{}", self.process.port),
            ),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect()
    }

    /// Remote options reaching this server (its endpoint, 10 s requests).
    pub fn remote_options(&self) -> RemoteOptions {
        RemoteOptions {
            azure_endpoint: Some(self.endpoint()),
            request_timeout: Duration::from_secs(10),
            ..RemoteOptions::default()
        }
    }

    /// A store client for `location` on this server, for assertions.
    pub async fn remote_store(&self, location: &StoreLocation) -> RemoteStore {
        RemoteStore::connect(location, &self.remote_options())
            .await
            .unwrap_or_else(|error| panic!("connect to Azurite: {error}"))
    }

    /// Creates a container (names: 3 to 63 lower-case letters, digits and dashes), signed with
    /// the account key (Shared Key).
    pub async fn create_container(&self, name: &str) {
        let version = "2021-08-06";
        let date = http_date(SystemTime::now());
        let resource = format!("/{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}/{name}\nrestype:container");
        // VERB, 11 standard headers (all empty: no body), canonical x-ms-* headers, resource.
        let string_to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n{resource}"
        );
        let key = base64::engine::general_purpose::STANDARD
            .decode(AZURITE_ACCOUNT_KEY)
            .expect("Azurite key is base64");
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
        let signature = base64::engine::general_purpose::STANDARD
            .encode(ring::hmac::sign(&key, string_to_sign.as_bytes()).as_ref());
        let authorization = format!("SharedKey {AZURITE_ACCOUNT}:{signature}");
        let path = format!("/{AZURITE_ACCOUNT}/{name}?restype=container");
        let response = admin_request(
            self.address(),
            "PUT",
            &path,
            &[
                ("x-ms-date", &date),
                ("x-ms-version", version),
                ("authorization", &authorization),
            ],
            b"",
        )
        .await
        .unwrap_or_else(|| panic!("Azurite PUT {path}: no answer"));
        assert_eq!(
            response.status(),
            201,
            "Azurite PUT {path}: {}",
            response.body_str()
        );
    }

    /// Stops the server gracefully (`SIGTERM`: Azurite saves its metadata and exits) and waits
    /// until the port is free. Its data stays on disk.
    pub fn stop(&mut self) {
        self.process.stop();
    }

    /// Kills the server (`SIGKILL`, a crash) and waits until the port is free. Azurite saves
    /// its metadata every 5 s (LokiJS autosave), so blobs written in the last 5 s before a kill
    /// may be gone after a restart: use [`Self::stop`] when the data must survive.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts it again on the same port with the same data (stopping it gracefully first if it
    /// runs).
    pub fn restart_same_port(&mut self) {
        self.process.stop();
        self.process.start();
    }

    /// `SIGSTOP`: connections are accepted (by the kernel) but never answered.
    pub fn pause(&mut self) {
        self.process.pause();
    }

    /// `SIGCONT` after [`Self::pause`].
    pub fn resume(&mut self) {
        self.process.resume();
    }

    /// Whether it is paused.
    pub fn is_paused(&self) -> bool {
        self.process.paused
    }
}

/// An RFC 1123 date (`Sun, 06 Nov 1994 08:49:37 GMT`), as HTTP and Azure's `x-ms-date` want.
pub fn http_date(time: SystemTime) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let seconds = time
        .duration_since(UNIX_EPOCH)
        .expect("time after 1970")
        .as_secs();
    let days = seconds / 86_400;
    let second_of_day = seconds % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let shifted = days as i64 + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        second_of_day / 3_600,
        second_of_day % 3_600 / 60,
        second_of_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_date_formats_rfc_1123() {
        let time = UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(http_date(time), "Sun, 06 Nov 1994 08:49:37 GMT");
        let time = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(http_date(time), "Tue, 29 Feb 2000 00:00:00 GMT");
    }
}
