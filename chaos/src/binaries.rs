//! Where the programs of a stack come from.
//!
//! Colloquy's own binaries are built by cargo into `target/release/` or `target/debug/`; a
//! scenario must run what was built last, not a stale copy, so when both profiles hold a
//! complete set the more recently built one wins (release on a tie). `COLLOQUY_BIN_DIR` names
//! the directory outright. The broker (`tansu`), `redis-server` and `nginx` are installed tools,
//! found by [`colloquy_testkit::process`] (tansu: `COLLOQUY_TANSU_BIN`, cargo's bin directory,
//! `PATH`).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::bail;
use colloquy_testkit::process::{redis_binary, tansu_binary};

/// Colloquy's binaries a stack runs, by file name.
pub const SERVICE_BINARIES: [&str; 4] = [
    "colloquy-gateway",
    "colloquy-ai-consumer",
    "colloquy-relay",
    "fake-llm",
];

/// Paths of every program a stack runs.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// The directory the service binaries come from.
    pub dir: PathBuf,
    pub gateway: PathBuf,
    pub consumer: PathBuf,
    pub relay: PathBuf,
    pub fake_llm: PathBuf,
    pub tansu: PathBuf,
    pub redis: PathBuf,
    /// `None` when nginx is not installed: clients then connect to both gateways directly.
    pub nginx: Option<PathBuf>,
}

impl Binaries {
    /// Finds every program.
    ///
    /// # Errors
    /// When a service binary, tansu or redis-server is missing; the message says how to get it.
    pub fn locate() -> anyhow::Result<Self> {
        let dir = service_dir()?;
        let tansu = tansu_binary()?;
        let redis = redis_binary()?;
        let nginx = crate::nginx::binary();
        Ok(Self {
            gateway: dir.join("colloquy-gateway"),
            consumer: dir.join("colloquy-ai-consumer"),
            relay: dir.join("colloquy-relay"),
            fake_llm: dir.join("fake-llm"),
            dir,
            tansu,
            redis,
            nginx,
        })
    }
}

/// The cargo target directory of this workspace.
fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target");
    dir.canonicalize().unwrap_or(dir)
}

/// The newest modification time of a complete set of service binaries in `dir`, if complete.
fn complete_set(dir: &Path) -> Option<SystemTime> {
    SERVICE_BINARIES
        .iter()
        .map(|b| {
            std::fs::metadata(dir.join(b))
                .ok()
                .filter(std::fs::Metadata::is_file)
                .and_then(|m| m.modified().ok())
        })
        .try_fold(SystemTime::UNIX_EPOCH, |newest, t| t.map(|t| newest.max(t)))
}

fn service_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("COLLOQUY_BIN_DIR") {
        let dir = PathBuf::from(dir);
        if complete_set(&dir).is_none() {
            bail!(
                "COLLOQUY_BIN_DIR={} does not hold all of {} (run `cargo build --bins`)",
                dir.display(),
                SERVICE_BINARIES.join(", ")
            );
        }
        return Ok(dir);
    }
    let target = target_dir();
    let release = target.join("release");
    let debug = target.join("debug");
    match (complete_set(&release), complete_set(&debug)) {
        (Some(r), Some(d)) if d > r => Ok(debug),
        (Some(_), _) => Ok(release),
        (None, Some(_)) => Ok(debug),
        (None, None) => bail!(
            "Colloquy's binaries ({}) are not built in {} or {}: run `cargo build --bins` (or `cargo build --release --bins`) first, \
             or point COLLOQUY_BIN_DIR at a directory that holds them",
            SERVICE_BINARIES.join(", "),
            release.display(),
            debug.display()
        ),
    }
}
