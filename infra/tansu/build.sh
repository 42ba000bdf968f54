#!/usr/bin/env bash
# Builds and installs the broker Colloquy runs on: tansu 0.6.0 from crates.io, with its
# postgres, sqlite (libsql) and memory (dynostore) engines and one patch to tansu-storage,
# infra/tansu/tansu-storage.patch: a fetch returns as soon as records arrive instead of sleeping
# out the consumer's whole `fetch.wait.max.ms`; an unknown topic's fetch answer names no leader
# (librdkafka 2.12 crashed on it); the memory engine answers a fetch from the batch holding its
# offset, never past a batch still being stored, from an index instead of a list of the whole
# partition; ListOffsets answers from the watermarks; the postgres engine writes a batch's records
# and headers in one statement each and reads a fetch's headers in one query (docs/storage.md
# says why).
#
# The crates come from crates.io (a throwaway project's `cargo fetch`), the build keeps tansu's
# published Cargo.lock (only tansu-storage moves to the patched copy), and the binary goes to
# cargo's bin directory with a stamp beside it naming the version, features and patch, so
# scripts/install-deps.sh can tell a current install from a stale one.
#
# Usage: infra/tansu/build.sh [--check]   (--check: exit 0 when the installed tansu is current)
# Takes ~20 minutes on 2 cores; the target directory is kept in ~/.cache/colloquy/tansu-target.
set -euo pipefail

log() { printf '[tansu] %s\n' "$*" >&2; }

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CARGO_HOME="${CARGO_HOME:-${HOME:-/root}/.cargo}"
export PATH="$CARGO_HOME/bin:$PATH"

VERSION="0.6.0"
FEATURES="libsql,dynostore,postgres"
PATCH="$HERE/tansu-storage.patch"
STAMP_FILE="$CARGO_HOME/bin/.tansu-colloquy-stamp"
stamp="tansu $VERSION features=$FEATURES patch=$(sha256sum "$PATCH" | cut -c1-16)"

if [ -x "$CARGO_HOME/bin/tansu" ] && [ "$(cat "$STAMP_FILE" 2>/dev/null)" = "$stamp" ]; then
  log "installed and current: $stamp"
  exit 0
fi
if [ "${1:-}" = "--check" ]; then
  log "not installed or stale (want: $stamp)"
  exit 1
fi

command -v cargo >/dev/null 2>&1 || { log "cargo not found: install a Rust toolchain first"; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# 1. Download tansu and every crate it needs from crates.io into cargo's cache.
mkdir -p "$work/fetch/src"
cat > "$work/fetch/Cargo.toml" <<EOF
[package]
name = "colloquy-tansu-fetch"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
tansu = { version = "=$VERSION", features = [$(printf '"%s",' ${FEATURES//,/ })] }
EOF
touch "$work/fetch/src/lib.rs"
log "downloading tansu $VERSION and its dependencies"
(cd "$work/fetch" && cargo fetch -q)

crate_file() {
  local f
  f="$(ls "$CARGO_HOME"/registry/cache/*/"$1-$VERSION.crate" 2>/dev/null | head -1)"
  [ -n "$f" ] || { log "$1-$VERSION.crate not in cargo's cache after cargo fetch"; exit 1; }
  printf '%s' "$f"
}

# 2. Unpack tansu and tansu-storage, patch tansu-storage, point tansu at the patched copy.
tar xzf "$(crate_file tansu)" -C "$work"
tar xzf "$(crate_file tansu-storage)" -C "$work"
log "applying $(basename "$PATCH")"
patch -s -p2 -d "$work/tansu-storage-$VERSION" < "$PATCH"
cat >> "$work/tansu-$VERSION/Cargo.toml" <<EOF

[patch.crates-io]
tansu-storage = { path = "../tansu-storage-$VERSION" }
EOF

# 3. Build with the published lock file (cargo only re-points tansu-storage) and install.
target="${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/colloquy/tansu-target"
mkdir -p "$target"
log "building tansu (features $FEATURES; ~20 minutes on 2 cores; target $target)"
(cd "$work/tansu-$VERSION" && CARGO_TARGET_DIR="$target" cargo build --release --bin tansu --features "$FEATURES")
install -m 0755 "$target/release/tansu" "$CARGO_HOME/bin/tansu"
printf '%s\n' "$stamp" > "$STAMP_FILE"
log "installed $CARGO_HOME/bin/tansu ($stamp)"
