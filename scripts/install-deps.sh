#!/usr/bin/env bash
# Idempotent installer of everything Colloquy needs on a fresh Debian (bookworm) machine, as root:
# Debian packages (Redis, nginx, Prometheus + promtool, Chromium, PostgreSQL, build tools) and the
# Kafka-compatible broker `tansu` from crates.io (patched: infra/tansu/build.sh). Safe to run again: it only installs what is missing.
set -euo pipefail

log() { printf '[install-deps] %s\n' "$*" >&2; }

export PATH="${CARGO_HOME:-${HOME:-/root}/.cargo}/bin:$PATH"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Debian packages: the runtime services and what the workspace build needs
# (rdkafka builds librdkafka from source with gcc/make/perl; libz-sys wants zlib + pkg-config).
APT_PACKAGES=(
  redis-server redis-tools nginx-light prometheus prometheus-alertmanager prometheus-blackbox-exporter chromium
  postgresql
  build-essential pkg-config perl python3 zlib1g-dev libssl-dev curl ca-certificates procps
)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    log "not root and no sudo: cannot install Debian packages"; fi
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -gt 0 ]; then
  log "missing Debian packages: ${missing[*]}"
  # Keep the packages' own init scripts from starting system-wide services (redis on 6379,
  # nginx on 80, prometheus on 9090) that would collide with the stack's own processes.
  policy_added=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    log "installing a temporary /usr/sbin/policy-rc.d (exit 101) so no service auto-starts"
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    policy_added=1
  fi
  log "apt-get update"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
  log "apt-get install ${missing[*]}"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  if [ "$policy_added" = 1 ]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi
else
  log "Debian packages already installed: ${APT_PACKAGES[*]}"
fi

# tansu: the Kafka-protocol broker, tansu 0.6.0 from crates.io with its durable engines (postgres,
# the stack's default, and sqlite) besides memory, and Colloquy's fetch patch
# (infra/tansu/build.sh; it does nothing when the installed one is current). COLLOQUY_TANSU_BIN
# names another broker binary and skips this.
if [ -n "${COLLOQUY_TANSU_BIN:-}" ]; then
  log "COLLOQUY_TANSU_BIN=$COLLOQUY_TANSU_BIN: not building tansu"
else
  lock="/tmp/colloquy-tansu-build.lock"
  # One build at a time (parallel CI runs on one machine share cargo's bin directory).
  exec 9>"$lock"
  if ! flock -n 9; then
    log "another tansu build is running; waiting for it"
    flock 9
  fi
  "$REPO/infra/tansu/build.sh"
  flock -u 9
fi

# Test tools from crates.io: cargo-machete (unused dependencies) and cargo-fuzz (the gateway's
# fuzz target; it needs a nightly toolchain or RUSTC_BOOTSTRAP, see scripts/test.sh).
for tool in cargo-machete:0.9.2 cargo-fuzz:0.13.2; do
  name="${tool%%:*}" version="${tool#*:}"
  if command -v "$name" >/dev/null 2>&1; then
    log "$name already installed"
  else
    log "cargo install $name --version $version --locked"
    cargo install "$name" --version "$version" --locked
  fi
done

log "done"
