//! PostgreSQL for tansu's postgres storage engine (`Storage::Postgres`): a private cluster in a
//! directory of its own, its server as a [`ProcessSpec`], and tansu's schema.
//!
//! tansu 0.6's postgres engine neither ships nor creates its schema; it is vendored in
//! `infra/tansu/postgres-schema.sql` (from the tansu repository at v0.6.0) and applied with
//! `psql` after every start (it is idempotent). `scripts/stack.sh` does the same in shell.
//!
//! PostgreSQL refuses to run as root. When the caller is root, initdb and the server run as the
//! `postgres` user (created by Debian's package) through `setpriv`, which `exec`s: the pid a
//! [`crate::process::ManagedProcess`] holds is the server's own, so a kill reaches it.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, bail};
use tokio::io::AsyncWriteExt as _;
use tokio::process::Command;

use crate::process::ProcessSpec;

/// tansu 0.6.0's schema (tables, indexes; `create … if not exists` throughout).
pub const SCHEMA: &str = include_str!("../../infra/tansu/postgres-schema.sql");

/// The database user, database and role tansu connects as (trust authentication on 127.0.0.1).
const USER: &str = "postgres";

/// The directory of PostgreSQL's server programs: `COLLOQUY_PG_BIN_DIR`, else the newest
/// `/usr/lib/postgresql/<version>/bin` (Debian's layout), else `pg_config --bindir`.
///
/// # Errors
/// When PostgreSQL is not installed; the message says how to install it.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("COLLOQUY_PG_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").is_file().then_some((version, bin))
        })
        .max_by_key(|(version, _)| *version);
    if let Some((_, bin)) = newest {
        return Ok(bin);
    }
    let out = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .context("PostgreSQL is not installed: run scripts/install-deps.sh (Debian: postgresql)")?;
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// Whether this process runs as root (PostgreSQL then runs as the `postgres` user):
/// `/proc/self` belongs to the process's effective user.
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// `program args…`, as the `postgres` user when we are root.
fn as_postgres(program: &Path, args: &[String]) -> (PathBuf, Vec<String>) {
    if !is_root() {
        return (program.to_owned(), args.to_vec());
    }
    let mut all: Vec<String> = [
        "--reuid=postgres",
        "--regid=postgres",
        "--init-groups",
        "--",
    ]
    .map(String::from)
    .into();
    all.push(program.display().to_string());
    all.extend_from_slice(args);
    (PathBuf::from("setpriv"), all)
}

/// A PostgreSQL cluster in `dir/data`, served on 127.0.0.1:`port`, its socket in `dir`.
#[derive(Clone, Debug)]
pub struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
}

impl Cluster {
    /// Creates the cluster in `dir` (`initdb`, trust authentication) unless it exists. `dir` is
    /// created and, when we are root, handed to the `postgres` user.
    ///
    /// # Errors
    /// When PostgreSQL is missing or `initdb` fails (its output is in the message).
    pub fn init(dir: &Path, port: u16) -> anyhow::Result<Self> {
        let cluster = Self {
            bin: bin_dir()?,
            dir: dir.to_owned(),
            port,
        };
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        if is_root() {
            let status = std::process::Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir)
                .status()?;
            if !status.success() {
                bail!(
                    "chown postgres {} failed: is there a postgres user?",
                    dir.display()
                );
            }
        }
        if cluster.data().join("PG_VERSION").is_file() {
            return Ok(cluster);
        }
        let args = [
            "-D".to_owned(),
            cluster.data().display().to_string(),
            "-U".into(),
            USER.into(),
            "--auth=trust".into(),
            "-E".into(),
            "UTF8".into(),
        ];
        let (program, args) = as_postgres(&cluster.bin.join("initdb"), &args);
        let out = std::process::Command::new(&program)
            .args(&args)
            .output()
            .with_context(|| format!("run {}", program.display()))?;
        if !out.status.success() {
            bail!(
                "initdb {} failed: {}{}",
                cluster.data().display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(cluster)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server in the foreground, logging to `log`: durable commits (`fsync`,
    /// `synchronous_commit` are PostgreSQL's defaults and stay on), listening on 127.0.0.1 only.
    #[must_use]
    pub fn server(&self, log: PathBuf) -> ProcessSpec {
        let args = [
            "-D".to_owned(),
            self.data().display().to_string(),
            "-p".into(),
            self.port.to_string(),
            "-k".into(),
            self.dir.display().to_string(),
            "-c".into(),
            "listen_addresses=127.0.0.1".into(),
        ];
        let (program, args) = as_postgres(&self.bin.join("postgres"), &args);
        ProcessSpec::new(&program, &self.dir, log).args(args)
    }

    /// tansu's `--storage-engine` for this cluster.
    #[must_use]
    pub fn engine_url(&self) -> String {
        engine_url(self.port)
    }

    /// Applies [`SCHEMA`] with `psql` (idempotent: run it after every start), retrying while
    /// the server is still starting up (it accepts connections before it serves them).
    ///
    /// # Errors
    /// When psql is missing or the schema does not apply within `timeout` (psql's output is in
    /// the message).
    pub async fn apply_schema(&self, timeout: std::time::Duration) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match self.try_apply_schema().await {
                Ok(()) => return Ok(()),
                Err(e) if std::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "schema not applied yet; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn try_apply_schema(&self) -> anyhow::Result<()> {
        let psql = self.bin.join("psql");
        let mut child = Command::new(&psql)
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER])
            .args(["-v", "ON_ERROR_STOP=1", "-q", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("run {}", psql.display()))?;
        let mut stdin = child.stdin.take().context("psql's stdin")?;
        stdin.write_all(SCHEMA.as_bytes()).await?;
        drop(stdin);
        let out = child.wait_with_output().await?;
        if !out.status.success() {
            bail!(
                "applying tansu's schema failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

/// tansu's `--storage-engine` for a cluster on 127.0.0.1:`port` (no TLS: loopback only).
#[must_use]
pub fn engine_url(port: u16) -> String {
    format!("postgres://{USER}@127.0.0.1:{port}/{USER}?sslmode=disable")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_is_tansus_and_idempotent() {
        assert!(SCHEMA.contains("create table if not exists record"));
        // Every table is created only when missing, so applying it after each start is safe.
        let creates = SCHEMA.matches("create table").count();
        let guarded = SCHEMA.matches("create table if not exists").count();
        assert_eq!(creates, guarded, "a create table without 'if not exists'");
    }

    #[test]
    fn the_engine_url_names_loopback_and_skips_tls() {
        assert_eq!(
            engine_url(5999),
            "postgres://postgres@127.0.0.1:5999/postgres?sslmode=disable"
        );
    }

    #[test]
    fn root_runs_the_server_as_postgres_through_setpriv() {
        let (program, args) = as_postgres(Path::new("/pg/bin/postgres"), &["-D".into()]);
        if is_root() {
            assert_eq!(program, PathBuf::from("setpriv"));
            assert_eq!(&args[args.len() - 2..], ["/pg/bin/postgres", "-D"]);
        } else {
            assert_eq!(program, PathBuf::from("/pg/bin/postgres"));
        }
    }
}
