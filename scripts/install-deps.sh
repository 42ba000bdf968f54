#!/usr/bin/env bash
# Idempotent installer of everything Colloquy needs on a fresh Debian (bookworm) machine, as root:
# Debian packages (Redis, nginx, Prometheus + promtool, Chromium, PostgreSQL, build tools) and the
# Kafka-compatible broker `tansu` from crates.io. Safe to run again: it only installs what is missing.
set -euo pipefail

log() { printf '[install-deps] %s\n' "$*" >&2; }

export PATH="${CARGO_HOME:-${HOME:-/root}/.cargo}/bin:$PATH"

TANSU_VERSION="0.6.0"
TANSU_FEATURES="libsql,dynostore,postgres"

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

# Whether cargo's record of installed crates shows tansu built with every feature we need (an
# older install lacks the postgres engine, the stack's durable default).
tansu_has_features() {
  python3 - "$TANSU_FEATURES" "${CARGO_HOME:-${HOME:-/root}/.cargo}/.crates2.json" <<'PY'
import json, sys
want = set(sys.argv[1].split(","))
try:
    installs = json.load(open(sys.argv[2]))["installs"]
except Exception:
    sys.exit(1)
ok = any(k.startswith("tansu ") and want <= set(v.get("features", [])) for k, v in installs.items())
sys.exit(0 if ok else 1)
PY
}

# tansu: the Kafka-protocol broker, built from crates.io with its durable engines (postgres, the
# stack's default, and sqlite) besides memory.
if command -v tansu >/dev/null 2>&1 && ! tansu_has_features && [ -z "${COLLOQUY_TANSU_BIN:-}" ]; then
  log "tansu at $(command -v tansu) lacks features $TANSU_FEATURES: reinstalling"
  cargo install tansu --version "$TANSU_VERSION" --locked --force --features "$TANSU_FEATURES"
fi
if command -v tansu >/dev/null 2>&1; then
  log "tansu already installed: $(command -v tansu)"
else
  if pgrep -f "cargo install tansu" >/dev/null 2>&1; then
    log "another 'cargo install tansu' is running; waiting for it to finish (log: /tmp/tansu-install.log)"
    while pgrep -f "cargo install tansu" >/dev/null 2>&1; do sleep 10; done
  fi
  if command -v tansu >/dev/null 2>&1; then
    log "tansu installed by the other process: $(command -v tansu)"
  else
    if ! command -v cargo >/dev/null 2>&1; then
      log "cargo not found: install a Rust toolchain first"; exit 1
    fi
    log "cargo install tansu --version $TANSU_VERSION --locked --features $TANSU_FEATURES (takes ~11 minutes on 2 cores)"
    cargo install tansu --version "$TANSU_VERSION" --locked --features "$TANSU_FEATURES"
    log "tansu installed: $(command -v tansu)"
  fi
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
