//! Child processes of tests and chaos runs, in one place: where tansu and the other installed
//! programs are found, the command lines of tansu and redis-server, a child with its log file
//! that can be killed (SIGKILL) or stopped (SIGTERM) and started again with the same command,
//! and listening ports that stay free while a killed process is down.
//!
//! [`crate::infra`] (Kafka and Redis for a test) and `colloquy-chaos`'s stack (the whole system
//! as processes) both use it, so a fix to how a process is started or stopped reaches both.

use std::collections::HashSet;
use std::fmt;
use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

/// `name` in one of the directories `first`, else on `PATH`.
#[must_use]
pub fn find_program(name: &str, first: &[&Path]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    first
        .iter()
        .map(|d| d.to_path_buf())
        .chain(std::env::split_paths(&path))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Where `cargo install` puts programs: `$CARGO_HOME/bin`, else `~/.cargo/bin`.
fn cargo_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

/// The tansu broker: `COLLOQUY_TANSU_BIN`, else cargo's bin directory (where
/// `scripts/install-deps.sh` installs it, often not on `PATH`), else `PATH`.
///
/// # Errors
/// When it is in none of them; the message says how to install it.
pub fn tansu_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("COLLOQUY_TANSU_BIN") {
        return Ok(PathBuf::from(p));
    }
    find_program("tansu", &[&cargo_bin_dir()]).context(
        "tansu (the Kafka-protocol broker) is not installed: run scripts/install-deps.sh \
         (or set COLLOQUY_TANSU_BIN)",
    )
}

/// `redis-server` on `PATH`.
///
/// # Errors
/// When it is not installed; the message says how to install it.
pub fn redis_binary() -> anyhow::Result<PathBuf> {
    find_program("redis-server", &[])
        .context("redis-server is not installed: run scripts/install-deps.sh")
}

/// Where the broker keeps its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Storage {
    /// tansu's sqlite engine: survives a broker kill -9; slow (`KAFKA_STORAGE=sqlite`; docs/storage.md).
    Sqlite,
    /// tansu's memory engine: fast, forgets everything when the broker stops
    /// (`KAFKA_STORAGE=memory`, what throughput runs use).
    Memory,
    /// tansu's postgres engine on a private PostgreSQL cluster ([`crate::postgres`]): durable,
    /// prepared statements and a connection pool instead of sqlite's one storage task.
    Postgres,
}

impl Storage {
    /// tansu's `--storage-engine`; a sqlite path is relative to the broker's working directory
    /// (see infra/images/README.md). The postgres engine's URL names its cluster: `postgres` is
    /// that cluster, and only [`Storage::Postgres`] needs it.
    ///
    /// # Errors
    /// For [`Storage::Postgres`] without a cluster.
    pub fn engine_url(self, postgres: Option<&crate::postgres::Cluster>) -> anyhow::Result<String> {
        match (self, postgres) {
            (Self::Sqlite, _) => Ok("sqlite://tansu.db".into()),
            (Self::Memory, _) => Ok("memory://tansu/".into()),
            (Self::Postgres, Some(cluster)) => Ok(cluster.engine_url()),
            (Self::Postgres, None) => bail!("tansu's postgres engine needs a PostgreSQL cluster"),
        }
    }
}

impl Storage {
    /// How long the broker holds a fetch before its first read of the storage
    /// (`TANSU_FETCH_MIN_WAIT_MS` of the patched tansu, infra/tansu/tansu-storage.patch): what
    /// arrives meanwhile goes out in one pass. A pass of the postgres engine costs a few SQL
    /// statements per partition with records (30 ms: p99 165 ms at 500 msg/s where 100 ms gave
    /// 478 ms, docs/storage.md); sqlite's is dearer and not measured again (100 ms); the memory
    /// engine's passes are cheap (5 ms). `TANSU_FETCH_MIN_WAIT_MS` in this process's environment
    /// overrides them (measurements).
    #[must_use]
    pub fn fetch_min_wait_ms(self) -> u64 {
        std::env::var("TANSU_FETCH_MIN_WAIT_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| self.default_fetch_min_wait_ms())
    }

    /// [`Self::fetch_min_wait_ms`] without the override. `scripts/stack.sh` and
    /// `infra/compose.local.yaml` repeat these values (a test holds them to it).
    #[must_use]
    pub const fn default_fetch_min_wait_ms(self) -> u64 {
        match self {
            Self::Memory => 5,
            Self::Postgres => 30,
            Self::Sqlite => 100,
        }
    }

    /// The broker's environment for this storage.
    #[must_use]
    pub fn tansu_env(self) -> Vec<(String, String)> {
        vec![(
            "TANSU_FETCH_MIN_WAIT_MS".to_owned(),
            self.fetch_min_wait_ms().to_string(),
        )]
    }
}

impl fmt::Display for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Sqlite => "sqlite",
            Self::Memory => "memory",
            Self::Postgres => "postgres",
        })
    }
}

/// tansu's arguments for a broker on 127.0.0.1:`port` that advertises that same address
/// (clients reach it there).
#[must_use]
pub fn tansu_args(port: u16, engine_url: &str) -> Vec<String> {
    let url = format!("tcp://127.0.0.1:{port}");
    vec![
        "broker".into(),
        "--listener-url".into(),
        url.clone(),
        "--advertised-listener-url".into(),
        url,
        "--storage-engine".into(),
        engine_url.into(),
    ]
}

/// Whether Redis keeps its data across a kill.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedisPersistence {
    /// Nothing on disk: a restarted Redis is empty (tests that only need a Redis).
    None,
    /// An append-only file in this directory, fsynced on every write: a write a client saw
    /// succeed survives a kill -9 (the durability the DESIGN asks of production).
    AppendFsyncAlways(PathBuf),
}

/// redis-server's arguments for 127.0.0.1:`port`, in the foreground, logging to stdout, never
/// snapshotting.
#[must_use]
pub fn redis_args(port: u16, persistence: &RedisPersistence) -> Vec<String> {
    redis_args_bound("127.0.0.1", port, persistence)
}

/// [`redis_args`] listening on `bind` (a container's Redis binds every address).
#[must_use]
pub fn redis_args_bound(bind: &str, port: u16, persistence: &RedisPersistence) -> Vec<String> {
    let mut args: Vec<String> = [
        "--port",
        &port.to_string(),
        "--bind",
        bind,
        "--daemonize",
        "no",
        "--save",
        "",
        "--logfile",
        "",
    ]
    .map(String::from)
    .into();
    match persistence {
        RedisPersistence::None => args.extend(["--appendonly".into(), "no".into()]),
        RedisPersistence::AppendFsyncAlways(dir) => args.extend([
            "--dir".into(),
            dir.display().to_string(),
            "--appendonly".into(),
            "yes".into(),
            "--appendfsync".into(),
            "always".into(),
        ]),
    }
    args
}

/// Lowest port [`free_port`] hands out.
const LOW_PORT: u16 = 10_000;

/// Ports already handed out by this process (two stacks or nodes must never share one).
static GIVEN: LazyLock<Mutex<HashSet<u16>>> = LazyLock::new(|| Mutex::new(HashSet::new()));

/// Start of the kernel's ephemeral port range (Linux), 32768 when it cannot be read.
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32_768)
}

/// A port on 127.0.0.1 that is free now, and stays free while a process that listened on it
/// is down, as far as that can be arranged.
///
/// A killed process is restarted on the same port. A port found by binding port 0 comes from
/// the kernel's ephemeral range, the range it also draws the local end of every outgoing
/// connection from, and a fault opens hundreds of those while the process is down
/// (reconnecting clients, producers, Redis clients): one may take the port, and the restart
/// fails with "address in use". So ports are drawn below the ephemeral range, never twice in
/// one process, and only come from port 0 when that range is too small to draw from.
///
/// # Errors
/// When no port can be bound at all.
pub fn free_port() -> std::io::Result<u16> {
    let high = ephemeral_start();
    if high > LOW_PORT + 1_000 {
        let mut given = GIVEN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for _ in 0..200 {
            let port = rand::random_range(LOW_PORT..high);
            if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
                given.insert(port);
                return Ok(port);
            }
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until something accepts connections on 127.0.0.1:`port`.
///
/// # Errors
/// When nothing does within `timeout`.
pub async fn wait_port(port: u16, timeout: Duration) -> anyhow::Result<()> {
    if !poll_until(timeout, || accepts(port)).await {
        bail!("nothing listens on 127.0.0.1:{port} after {timeout:?}");
    }
    Ok(())
}

/// Asks `ready` every 50 ms until it says yes (`true`) or `timeout` passes (`false`).
async fn poll_until<F: Future<Output = bool>>(timeout: Duration, ready: impl Fn() -> F) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ready().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Whether something accepts connections on 127.0.0.1:`port` now.
pub async fn accepts(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
}

/// Waits until Redis on 127.0.0.1:`port` answers `PING` with `PONG`.
///
/// An open port is not enough: Docker's proxy accepts connections before the container's Redis
/// listens (and then closes them), and a Redis reading its append-only file answers `LOADING`.
///
/// # Errors
/// When it does not answer within `timeout`.
pub async fn wait_redis(port: u16, timeout: Duration) -> anyhow::Result<()> {
    if !poll_until(timeout, || answers_ping(port)).await {
        bail!("Redis on 127.0.0.1:{port} does not answer PING after {timeout:?}");
    }
    Ok(())
}

/// Whether Redis on 127.0.0.1:`port` answers `PING` with `PONG` now (within a second).
pub async fn answers_ping(port: u16) -> bool {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let ping = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(b"PING\r\n").await?;
        let mut reply = [0_u8; 7];
        stream.read_exact(&mut reply).await?;
        std::io::Result::Ok(&reply == b"+PONG\r\n")
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), ping).await,
        Ok(Ok(true))
    )
}

/// What to run: the program, its arguments and environment, where, and where its output goes.
#[derive(Clone, Debug)]
pub struct ProcessSpec {
    pub program: PathBuf,
    pub args: Vec<String>,
    /// The child's whole environment besides `PATH`, `HOME` and `RUST_BACKTRACE=1`: nothing of
    /// the caller's (an `OPENAI_API_KEY`, a topic prefix, an OTLP endpoint, tansu's own
    /// `STORAGE_ENGINE`) may change what the child does.
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    /// stdout and stderr, appended to across restarts, with a marker line at each start and kill.
    pub log: PathBuf,
}

impl ProcessSpec {
    /// `program` in `cwd`, logging to `log`, with no arguments or environment yet.
    #[must_use]
    pub fn new(program: &Path, cwd: &Path, log: PathBuf) -> Self {
        Self {
            program: program.to_owned(),
            args: Vec::new(),
            env: Vec::new(),
            cwd: cwd.to_owned(),
            log,
        }
    }

    #[must_use]
    pub fn args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    #[must_use]
    pub fn envs(mut self, vars: impl IntoIterator<Item = (String, String)>) -> Self {
        self.env.extend(vars);
        self
    }
}

/// A child process that can be started, killed and started again with the same command.
/// Dropping it kills the child (SIGKILL).
#[derive(Debug)]
pub struct ManagedProcess {
    spec: ProcessSpec,
    child: Option<Child>,
    starts: u32,
}

impl ManagedProcess {
    /// Not started yet: see [`ManagedProcess::start`].
    #[must_use]
    pub fn new(spec: ProcessSpec) -> Self {
        Self {
            spec,
            child: None,
            starts: 0,
        }
    }

    #[must_use]
    pub fn spec(&self) -> &ProcessSpec {
        &self.spec
    }

    /// Spawns the command (again).
    ///
    /// # Errors
    /// When it is already running, or the log cannot be opened or the program run.
    pub fn start(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("{} is already running", self.spec.program.display());
        }
        self.starts += 1;
        self.mark(&format!("start #{}", self.starts));
        let spec = &self.spec;
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log)
            .with_context(|| format!("open {}", spec.log.display()))?;
        let mut cmd = Command::new(&spec.program);
        cmd.env_clear();
        for var in ["PATH", "HOME"] {
            if let Some(v) = std::env::var_os(var) {
                cmd.env(var, v);
            }
        }
        let child = cmd
            .env("RUST_BACKTRACE", "1")
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .args(&spec.args)
            .current_dir(&spec.cwd)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "cannot run {} (install it: scripts/install-deps.sh)",
                    spec.program.display()
                )
            })?;
        self.child = Some(child);
        Ok(())
    }

    /// Kills the child with SIGKILL (nothing is flushed, committed or closed politely) and
    /// reaps it. Nothing happens when it is not running.
    ///
    /// # Errors
    /// When the signal fails.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            // tokio's kill sends SIGKILL on Unix, then waits for the exit.
            child.kill().await?;
            self.mark("killed with SIGKILL");
        }
        Ok(())
    }

    /// Stops the child as an operator would: SIGTERM, then SIGKILL when it has not exited
    /// after `grace`; reaps it. Nothing happens when it is not running.
    ///
    /// # Errors
    /// When it cannot be killed.
    pub async fn stop(&mut self, grace: Duration) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Some(pid) = child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        if tokio::time::timeout(grace, child.wait()).await.is_err() {
            tracing::warn!(program = %self.spec.program.display(), ?grace, "did not stop; SIGKILL");
            child.kill().await?;
        }
        self.mark("stopped with SIGTERM");
        Ok(())
    }

    /// Sends `signal` (a `kill` name: `TERM`, `QUIT`) and waits up to `grace` for the exit,
    /// without an async runtime (for `Drop`); the child is killed when it is dropped anyway.
    /// For a program whose workers outlive a SIGKILLed parent and keep its port (nginx).
    pub fn signal_and_wait_blocking(&mut self, signal: &str, grace: Duration) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        let Some(pid) = child.id() else {
            return;
        };
        let _ = std::process::Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the child was started and not killed or stopped since (it may have exited).
    #[must_use]
    pub fn is_started(&self) -> bool {
        self.child.is_some()
    }

    /// The process id while the child runs.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref()?.id()
    }

    /// Why the child is not running (its exit status, or that it was not started), or `None`
    /// while it runs. Does not wait.
    pub fn exit_status(&mut self) -> Option<String> {
        match self.child.as_mut().map(Child::try_wait) {
            None => Some("not running".into()),
            Some(Ok(Some(status))) => Some(status.to_string()),
            Some(Ok(None)) => None,
            Some(Err(e)) => Some(format!("unknown state: {e}")),
        }
    }

    /// The last `lines` lines of the log.
    #[must_use]
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.spec.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Appends a marker line to the log, so that starts and kills can be found in it.
    fn mark(&self, what: &str) {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.spec.log)
        {
            let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            let _ = writeln!(f, "=== {now} colloquy: {what}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_below_the_ephemeral_range_and_never_handed_out_twice() {
        let high = ephemeral_start();
        let ports: Vec<u16> = (0..50).map(|_| free_port().unwrap()).collect();
        let distinct: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len());
        if high > LOW_PORT + 1_000 {
            assert!(
                ports.iter().all(|p| (LOW_PORT..high).contains(p)),
                "{ports:?}"
            );
        }
    }

    #[test]
    fn redis_keeps_data_only_when_asked() {
        let none = redis_args(7000, &RedisPersistence::None);
        assert!(
            none.windows(2).any(|w| w == ["--appendonly", "no"]),
            "{none:?}"
        );
        let durable = redis_args(7000, &RedisPersistence::AppendFsyncAlways("/d".into()));
        assert!(durable.windows(2).any(|w| w == ["--appendfsync", "always"]));
        assert!(durable.windows(2).any(|w| w == ["--dir", "/d"]));
        assert!(durable.windows(2).any(|w| w == ["--save", ""]));
        assert!(durable.windows(2).any(|w| w == ["--bind", "127.0.0.1"]));
        let container = redis_args_bound("0.0.0.0", 6379, &RedisPersistence::None);
        assert!(container.windows(2).any(|w| w == ["--bind", "0.0.0.0"]));
        assert!(container.windows(2).any(|w| w == ["--port", "6379"]));
    }

    /// The bash and YAML launchers cannot call this crate, so they repeat the broker's hold per
    /// engine: they must say what [`Storage::default_fetch_min_wait_ms`] says.
    #[test]
    fn every_launcher_holds_fetches_as_long_as_the_testkit() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let read = |path: &str| {
            std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
        };
        let stack = read("scripts/stack.sh");
        for storage in [Storage::Memory, Storage::Postgres, Storage::Sqlite] {
            let case = stack
                .split(&format!("\n    {storage})\n"))
                .nth(1)
                .and_then(|rest| rest.split(";;").next())
                .unwrap_or_else(|| panic!("no `{storage})` case in scripts/stack.sh"));
            let ms = case
                .split("TANSU_FETCH_MIN_WAIT_MS:-")
                .nth(1)
                .and_then(|rest| rest.split('}').next())
                .and_then(|ms| ms.parse::<u64>().ok());
            assert_eq!(
                ms,
                Some(storage.default_fetch_min_wait_ms()),
                "the {storage} case of scripts/stack.sh"
            );
        }
        let compose = read("infra/compose.local.yaml");
        assert!(compose.contains("STORAGE_ENGINE: memory://"), "{compose}");
        let held = format!(
            "TANSU_FETCH_MIN_WAIT_MS: \"{}\"",
            Storage::Memory.default_fetch_min_wait_ms()
        );
        assert!(
            compose.contains(&held),
            "infra/compose.local.yaml lacks {held}"
        );
    }

    /// `scripts/stack.sh up` right after the stack was killed: PostgreSQL's lock file names the
    /// killed server, which stays a zombie until it is reaped, and PostgreSQL refuses to start
    /// while that pid exists. `clear_stale_postmaster` must wait for it to go, drop a lock whose
    /// pid now belongs to another program, and refuse a PostgreSQL that still runs.
    #[test]
    fn stack_sh_waits_for_a_killed_postgres_and_refuses_a_live_one() {
        use std::process::Command as StdCommand;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/stack.sh");
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let lock = data.join("postmaster.pid");
        let write_lock = |pid: u32| {
            std::fs::write(
                &lock,
                format!("{pid}\n{}\n1700000000\n5433\n", data.display()),
            )
            .unwrap();
        };
        let clear = || {
            StdCommand::new("bash")
                .arg("-c")
                // $0 must not be the script: sourced as itself, it would run its `case`.
                .arg(r#"source "$1"; clear_stale_postmaster "$2""#)
                .arg("stack-sh-test")
                .arg(&script)
                .arg(&data)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let finished_within = |child: &mut std::process::Child, limit: Duration| {
            let deadline = Instant::now() + limit;
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    return Some(status);
                }
                if Instant::now() > deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        };

        // A killed server, not yet reaped: wait while it is a zombie, go on once it is reaped.
        let mut killed = StdCommand::new("sleep").arg("30").spawn().unwrap();
        killed.kill().unwrap(); // SIGKILL, not reaped: a zombie once the signal has landed
        let stat = format!("/proc/{}/stat", killed.id());
        let deadline = Instant::now() + Duration::from_secs(5);
        while !std::fs::read_to_string(&stat).is_ok_and(|s| s.contains(") Z ")) {
            assert!(
                Instant::now() < deadline,
                "the killed sleep never became a zombie"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        write_lock(killed.id());
        let mut waiting = clear();
        assert!(
            finished_within(&mut waiting, Duration::from_millis(600)).is_none(),
            "went on while the killed server's pid still existed"
        );
        killed.wait().unwrap();
        let status = finished_within(&mut waiting, Duration::from_secs(10))
            .expect("still waiting 10 s after the killed server was reaped");
        assert!(status.success(), "{status}");

        // The pid now belongs to another program: the lock is stale and removed.
        let mut other = StdCommand::new("sleep").arg("30").spawn().unwrap();
        write_lock(other.id());
        let status = finished_within(&mut clear(), Duration::from_secs(10)).expect("hung");
        other.kill().unwrap();
        other.wait().unwrap();
        assert!(status.success(), "{status}");
        assert!(!lock.exists(), "the stale lock file is still there");

        // A PostgreSQL that still runs on this data directory: refuse, and say so.
        let postgres = dir.path().join("postgres");
        let sleep = crate::browser::which(Path::new("sleep")).expect("sleep on PATH");
        std::fs::copy(sleep, &postgres).unwrap();
        let mut live = StdCommand::new(&postgres).arg("30").spawn().unwrap();
        write_lock(live.id());
        let refused = clear().wait_with_output().unwrap();
        live.kill().unwrap();
        live.wait().unwrap();
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            !refused.status.success(),
            "a live PostgreSQL was not refused"
        );
        assert!(stderr.contains("still runs on"), "{stderr}");
        assert!(lock.exists(), "a live server's lock file was removed");
    }

    #[test]
    fn tansu_advertises_the_address_it_listens_on() {
        let args = tansu_args(9999, &Storage::Sqlite.engine_url(None).unwrap());
        assert_eq!(
            args,
            [
                "broker",
                "--listener-url",
                "tcp://127.0.0.1:9999",
                "--advertised-listener-url",
                "tcp://127.0.0.1:9999",
                "--storage-engine",
                "sqlite://tansu.db",
            ]
        );
    }

    /// A listener on a free port whose every connection gets `reply` (after reading the
    /// request) and is closed; `None` closes at once, as Docker's proxy does while the
    /// container's server is not listening yet.
    async fn fake_server(reply: Option<&'static [u8]>) -> u16 {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                if let Some(reply) = reply {
                    let mut request = [0_u8; 64];
                    let _ = socket.read(&mut request).await;
                    let _ = socket.write_all(reply).await;
                }
            }
        });
        port
    }

    #[tokio::test]
    async fn redis_is_ready_when_it_answers_ping_not_when_its_port_accepts() {
        let proxy = fake_server(None).await;
        assert!(accepts(proxy).await);
        assert!(!answers_ping(proxy).await, "a port that accepts and closes");
        let loading =
            fake_server(Some(b"-LOADING Redis is loading the dataset in memory\r\n")).await;
        assert!(!answers_ping(loading).await, "a Redis reading its file");
        let err = wait_redis(loading, Duration::from_millis(300))
            .await
            .expect_err("never ready");
        assert!(err.to_string().contains("does not answer PING"), "{err}");
        let ready = fake_server(Some(b"+PONG\r\n")).await;
        assert!(answers_ping(ready).await);
        wait_redis(ready, Duration::from_secs(5))
            .await
            .expect("ready");
    }

    #[tokio::test]
    async fn a_process_is_killed_and_started_again_with_the_same_command() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("sleep.log");
        let spec = ProcessSpec::new(Path::new("sleep"), dir.path(), log.clone()).args(["30"]);
        let mut p = ManagedProcess::new(spec);
        assert_eq!(p.exit_status().as_deref(), Some("not running"));
        p.start().unwrap();
        assert!(p.exit_status().is_none());
        assert!(p.start().is_err(), "a second start while running");
        p.kill().await.unwrap();
        assert!(!p.is_started());
        p.start().unwrap();
        let pid = p.pid().unwrap();
        p.stop(Duration::from_secs(5)).await.unwrap();
        assert!(p.pid().is_none(), "{pid} reaped");
        let text = std::fs::read_to_string(&log).unwrap();
        for marker in [
            "start #1",
            "killed with SIGKILL",
            "start #2",
            "stopped with SIGTERM",
        ] {
            assert!(text.contains(marker), "{marker} in {text}");
        }
    }
}
