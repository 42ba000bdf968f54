#!/usr/bin/env bash
# Builds and installs the broker Colloquy runs on: tansu 0.6.0 from crates.io, with its
# postgres, sqlite (libsql) and memory (dynostore) engines and a patch per crate it changes.
# infra/tansu/tansu-service.patch: a request is decoded and its response encoded on the
# connection's task, not handed to the blocking pool and back (two thread wake-ups each).
# infra/tansu/tansu-storage.patch: a fetch returns as soon as records arrive instead of sleeping
# out the consumer's whole `fetch.wait.max.ms`; an unknown topic's fetch answer names no leader
# (librdkafka 2.12 crashed on it); the memory engine answers a fetch from the batch holding its
# offset, never past a batch still being stored, from an index instead of a list of the whole
# partition; ListOffsets answers from the watermarks; the postgres engine writes a batch's records
# and headers in one statement each and reads a fetch's headers in one query (docs/storage.md
# says why).
#
# The crates come from crates.io (a throwaway project's `cargo fetch`), the build keeps tansu's
# published Cargo.lock (only the patched crates move to their patched copies), and the binary goes to
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
# The crates patched, each by infra/tansu/<crate>.patch.
PATCHED=(tansu-storage tansu-service)
STAMP_FILE="$CARGO_HOME/bin/.tansu-colloquy-stamp"
stamp="tansu $VERSION features=$FEATURES patch=$(for c in "${PATCHED[@]}"; do cat "$HERE/$c.patch"; done | sha256sum | cut -c1-16)"

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

# 2. Unpack tansu and the crates it patches, patch them, point tansu at the patched copies.
tar xzf "$(crate_file tansu)" -C "$work"
printf '\n[patch.crates-io]\n' >> "$work/tansu-$VERSION/Cargo.toml"
for c in "${PATCHED[@]}"; do
  tar xzf "$(crate_file "$c")" -C "$work"
  log "applying $c.patch"
  patch -s -p2 -d "$work/$c-$VERSION" < "$HERE/$c.patch"
  printf '%s = { path = "../%s-%s" }\n' "$c" "$c" "$VERSION" >> "$work/tansu-$VERSION/Cargo.toml"
done

# 3. Build with the published lock file (cargo only re-points the patched crates) and install.
target="${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/colloquy/tansu-target"
mkdir -p "$target"
log "building tansu (features $FEATURES; ~20 minutes on 2 cores; target $target)"
(cd "$work/tansu-$VERSION" && CARGO_TARGET_DIR="$target" cargo build --release --bin tansu --features "$FEATURES")
install -m 0755 "$target/release/tansu" "$CARGO_HOME/bin/tansu"
printf '%s\n' "$stamp" > "$STAMP_FILE"
log "installed $CARGO_HOME/bin/tansu ($stamp)"
