//! Spawning and supervising the `scoretap` binary.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::raw::try_get;
use crate::util::{free_port, TempDir};

/// Path to the `scoretap` binary: `$SCORETAP_BIN`, else `target/<profile>/scoretap` next to the
/// test executable (target/<profile>/deps/xxx).
pub fn scoretap_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SCORETAP_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "SCORETAP_BIN={} does not exist; build it with `cargo build --workspace --bins`",
            p.display()
        );
        return p;
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> → target/<profile>/scoretap (also accept a binary next to it).
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join("scoretap");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "scoretap binary not found next to {} (looked in its directory and the one above); \
         run `cargo build --workspace --bins` (same CARGO_TARGET_DIR) first, or set SCORETAP_BIN",
        exe.display()
    );
}

/// Send a signal by name (`TERM`, `HUP`, `INT`, `KILL`) to `pid` via `kill(1)`.
pub fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -{sig} {pid} failed");
}

/// Builder for a running proxy.
#[derive(Debug, Default, Clone)]
pub struct ScoretapBuilder {
    args: Vec<String>,
    envs: Vec<(String, String)>,
    skip_listen: bool,
    skip_admin: bool,
    ready_timeout: Option<Duration>,
    pipe_stdout: bool,
}

impl ScoretapBuilder {
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }
    pub fn args<I, S>(mut self, it: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(it.into_iter().map(Into::into));
        self
    }
    pub fn upstream(self, url: &str) -> Self {
        self.arg("--upstream").arg(url)
    }
    pub fn env(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.envs.push((k.into(), v.into()));
        self
    }
    /// Do not pass `--listen` (the caller provides it via env/config; `listen` must then be set
    /// by the caller with `start_with_addrs`).
    pub fn no_listen_flag(mut self) -> Self {
        self.skip_listen = true;
        self
    }
    /// Do not pass `--admin-listen`.
    pub fn no_admin_flag(mut self) -> Self {
        self.skip_admin = true;
        self
    }
    pub fn ready_timeout(mut self, d: Duration) -> Self {
        self.ready_timeout = Some(d);
        self
    }
    /// Connect the process's stdout to a pipe instead of a file; take its read end with
    /// [`Scoretap::take_stdout_pipe`]. Nobody reads it until the test does, so once the pipe
    /// buffer (~64 KiB) is full every write to stdout blocks: a stalled sink.
    pub fn pipe_stdout(mut self) -> Self {
        self.pipe_stdout = true;
        self
    }

    /// Start with fresh free ports for the listener and the admin listener.
    /// Start on fresh ports. A free port found by binding port 0 can be taken again (by another
    /// test's listener or an outgoing connection's source port) before scoretap binds it; when
    /// scoretap reports exactly that, it is started again on other ports.
    pub async fn start(self) -> Scoretap {
        const ATTEMPTS: usize = 5;
        for attempt in 1..=ATTEMPTS {
            let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
            let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
            let mut p = self.spawn_with_addrs(listen, admin);
            let limit = self.ready_timeout.unwrap_or(Duration::from_secs(20));
            if p.wait_healthy_or_port_taken(limit, attempt < ATTEMPTS)
                .await
            {
                return p;
            }
        }
        unreachable!("the last attempt panics instead of retrying")
    }

    /// Start with the given addresses (passed as flags unless disabled) and wait for /healthz.
    pub async fn start_with_addrs(self, listen: SocketAddr, admin: SocketAddr) -> Scoretap {
        let mut p = self.spawn_with_addrs(listen, admin);
        p.wait_healthy(self.ready_timeout.unwrap_or(Duration::from_secs(20)))
            .await;
        p
    }

    fn spawn_with_addrs(&self, listen: SocketAddr, admin: SocketAddr) -> Scoretap {
        let mut args = Vec::new();
        let explicit_run = self.args.first().is_some_and(|a| a == "run");
        if explicit_run {
            args.push("run".to_string());
        }
        if !self.skip_listen {
            args.push("--listen".into());
            args.push(listen.to_string());
        }
        if !self.skip_admin {
            args.push("--admin-listen".into());
            args.push(admin.to_string());
        }
        args.extend(self.args.iter().skip(usize::from(explicit_run)).cloned());
        Scoretap::spawn(&args, &self.envs, listen, admin, self.pipe_stdout)
    }
}

/// A running `scoretap` process; killed on drop. stdout/stderr go to files in a temp dir.
#[derive(Debug)]
pub struct Scoretap {
    child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub args: Vec<String>,
    dir: TempDir,
    exit: Option<ExitStatus>,
    stdout_pipe: Option<ChildStdout>,
}

impl Scoretap {
    pub fn builder() -> ScoretapBuilder {
        ScoretapBuilder::default()
    }

    /// Start `scoretap --upstream URL <extra>` on fresh ports and wait until healthy.
    pub async fn start(upstream: &str, extra: &[&str]) -> Scoretap {
        Self::builder()
            .upstream(upstream)
            .args(extra.iter().copied())
            .start()
            .await
    }

    fn spawn(
        args: &[String],
        envs: &[(String, String)],
        addr: SocketAddr,
        admin: SocketAddr,
        pipe_stdout: bool,
    ) -> Scoretap {
        let dir = TempDir::new("proc");
        let stdout = if pipe_stdout {
            Stdio::piped()
        } else {
            Stdio::from(std::fs::File::create(dir.join("stdout")).expect("stdout file"))
        };
        let stderr = std::fs::File::create(dir.join("stderr")).expect("stderr file");
        let mut cmd = Command::new(scoretap_bin());
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::from(stderr))
            .current_dir(dir.path());
        // Keep the environment free of SCORETAP_* leaking from the developer's shell.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("SCORETAP_") {
                cmd.env_remove(k);
            }
        }
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", scoretap_bin().display()));
        let stdout_pipe = child.stdout.take();
        Scoretap {
            child,
            addr,
            admin,
            args: args.to_vec(),
            dir,
            exit: None,
            stdout_pipe,
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    /// `https://127.0.0.1:PORT`
    pub fn https_url(&self) -> String {
        format!("https://{}", self.addr)
    }
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }
    /// stdout as written to its file (empty when it goes to a pipe, see
    /// [`ScoretapBuilder::pipe_stdout`]).
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.join("stdout")).unwrap_or_default()
    }
    /// The read end of stdout when started with [`ScoretapBuilder::pipe_stdout`] (once).
    pub fn take_stdout_pipe(&mut self) -> Option<ChildStdout> {
        self.stdout_pipe.take()
    }

    fn stderr_tail(&self) -> String {
        let s = self.stderr();
        let n = s.len();
        let mut start = n.saturating_sub(6000);
        while !s.is_char_boundary(start) {
            start += 1;
        }
        s[start..].to_string()
    }

    /// Has the process exited? (non-blocking)
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().expect("try_wait");
        }
        self.exit
    }

    async fn wait_healthy(&mut self, limit: Duration) {
        self.wait_healthy_or_port_taken(limit, false).await;
    }

    /// Waits for /healthz. Returns false (instead of panicking) when `retry_on_port_taken` is set
    /// and scoretap exited because one of its ports was taken in the meantime.
    async fn wait_healthy_or_port_taken(
        &mut self,
        limit: Duration,
        retry_on_port_taken: bool,
    ) -> bool {
        let start = Instant::now();
        loop {
            if let Some(st) = self.try_exit() {
                let stderr = self.stderr_tail();
                if retry_on_port_taken
                    && stderr.contains("cannot listen on")
                    && stderr.contains("Address already in use")
                {
                    return false;
                }
                panic!(
                    "scoretap exited during startup with {st}; args {:?}\n--- stderr ---\n{}",
                    self.args,
                    self.stderr_tail()
                );
            }
            if let Some((200, _)) = try_get(self.admin, "/healthz").await {
                // The proxy listener should be accepting too.
                if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                    return true;
                }
            }
            if start.elapsed() > limit {
                panic!(
                    "scoretap did not become healthy on admin {} / listen {} within {limit:?}; args {:?}\n--- stderr ---\n{}",
                    self.admin,
                    self.addr,
                    self.args,
                    self.stderr_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Admin GET; None if the admin listener is not reachable.
    pub async fn admin_get(&self, path: &str) -> Option<(u16, Vec<u8>)> {
        try_get(self.admin, path).await
    }

    pub async fn readyz(&self) -> Option<u16> {
        self.admin_get("/readyz").await.map(|(s, _)| s)
    }

    pub fn sigterm(&self) {
        signal(self.pid(), "TERM");
    }
    pub fn sighup(&self) {
        signal(self.pid(), "HUP");
    }
    pub fn sigint(&self) {
        signal(self.pid(), "INT");
    }

    /// Wait for the process to exit; panics (with stderr) if it does not within `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(st) = self.try_exit() {
                return st;
            }
            if start.elapsed() > limit {
                panic!(
                    "scoretap did not exit within {limit:?}\n--- stderr ---\n{}",
                    self.stderr_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Scoretap {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() || std::env::var_os("SCORETAP_TEST_SHOW_STDERR").is_some() {
            eprintln!(
                "--- scoretap {:?} stderr (tail) ---\n{}\n--- end ---",
                self.args,
                self.stderr_tail()
            );
        }
    }
}

/// Output of a short-lived CLI invocation.
#[derive(Debug)]
pub struct CliOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// Run `scoretap <args>` to completion (killed after `limit`), capturing output.
pub fn run_cli(args: &[&str], envs: &[(&str, &str)], limit: Duration) -> CliOutput {
    let dir = TempDir::new("cli");
    let out_path = dir.join("stdout");
    let err_path = dir.join("stderr");
    let mut cmd = Command::new(scoretap_bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(
            std::fs::File::create(&out_path).expect("stdout"),
        ))
        .stderr(Stdio::from(
            std::fs::File::create(&err_path).expect("stderr"),
        ))
        .current_dir(dir.path());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("SCORETAP_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn scoretap");
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`scoretap {}` did not finish within {limit:?}\nstdout: {}\nstderr: {}",
                args.join(" "),
                std::fs::read_to_string(&out_path).unwrap_or_default(),
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    CliOutput {
        status,
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
    }
}
