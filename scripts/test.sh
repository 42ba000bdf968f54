#!/usr/bin/env bash
# The one command that runs every Colloquy test:
#   1. scripts/install-deps.sh      (Debian packages, tansu)
#   2. infra/images/build.sh        (local FROM-scratch images for tansu and redis, when Docker works)
#   3. cargo fmt --check, cargo machete, cargo clippy -D warnings, cargo doc -D warnings, cargo build --bins (the chaos
#      suites run them) and cargo test --workspace (the testkit uses containers or local
#      processes: COLLOQUY_TESTKIT), the soak's CI form on release binaries (25,000 messages at
#      1,000 msg/s through four faults), the whole scripts/stack.sh killed -9 under load and
#      started again (chaos/crash-stack.sh), the benchmark's short form on postgres storage,
#      FUZZ_SECS (60) seconds of the gateway's fuzz target
#   4. promtool check/test rules    (alerts/*.yml, alerts/tests/*.yml, when present)
#   5. the container deployment     (infra/compose-test.sh test: compose config, up, 250/250 through
#                                    nginx, three container faults, down; about 4 min), when
#                                    Docker works; otherwise only the compose files (validate)
# Usage: scripts/test.sh [--processes] [extra cargo test args...]
#   --processes   force COLLOQUY_TESTKIT=processes even when a Docker engine is reachable
# Exits non-zero on any failure.
set -euo pipefail

export PATH="${CARGO_HOME:-${HOME:-/root}/.cargo}/bin:$PATH"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

log() { printf '\n[test] %s\n' "$*" >&2; }

FORCE_PROCESSES=0
CARGO_ARGS=()
for a in "$@"; do
  case "$a" in
    --processes) FORCE_PROCESSES=1 ;;
    -h|--help) sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) CARGO_ARGS+=("$a") ;;
  esac
done

log "installing dependencies"
scripts/install-deps.sh

if [ "$FORCE_PROCESSES" = 1 ]; then
  export COLLOQUY_TESTKIT=processes
elif [ -n "${COLLOQUY_TESTKIT:-}" ]; then
  : # respect an explicit choice
elif command -v docker >/dev/null 2>&1 && timeout 30 docker info >/dev/null 2>&1; then
  export COLLOQUY_TESTKIT=containers
else
  export COLLOQUY_TESTKIT=processes
fi

if [ "$COLLOQUY_TESTKIT" = containers ]; then
  log "building local images (infra/images/build.sh)"
  infra/images/build.sh
  log "smoke-testing the images (infra/images/smoke.sh)"
  infra/images/smoke.sh
  export COLLOQUY_TANSU_IMAGE="${COLLOQUY_TANSU_IMAGE:-colloquy/tansu:local}"
  export COLLOQUY_REDIS_IMAGE="${COLLOQUY_REDIS_IMAGE:-colloquy/redis:local}"
fi
log "COLLOQUY_TESTKIT=$COLLOQUY_TESTKIT"

log "cargo fmt --check"
cargo fmt --all --check

log "cargo machete (no unused dependencies)"
cargo machete

log "cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

log "cargo doc -D warnings (rustdoc lints: broken and private intra-doc links)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace

# The chaos suites run the real binaries (gateway, ai-consumer, relay, fake-llm).
log "cargo build --workspace --bins"
cargo build --workspace --bins

log "cargo test --workspace ${CARGO_ARGS[*]:-}"
cargo test --workspace "${CARGO_ARGS[@]}"

# The soak's CI form needs release binaries (the debug build answers ~50 msg/s): 25 s of
# open-loop load at 1,000 msg/s (25,000 messages) through nginx with kill -9 and restart of the
# relay, the ai-consumer, gateway-1 and Redis; exit 1 unless nothing is lost or duplicated and
# every message is answered (docs/chaos.md, "Soak").
log "cargo build --release --bins (for the soak)"
cargo build --release --bins
log "soak, CI form (colloquy-chaos soak --rate 1000 --duration-secs 25)"
COLLOQUY_BIN_DIR="$REPO/target/release" target/release/colloquy-chaos soak --rate 1000 --duration-secs 25

# An outsider's crash, short form: scripts/stack.sh (the durable default) killed with SIGKILL
# all at once 8 s into 20 s of 300 msg/s, then `up` again with the same command; exit 1 unless
# every acked message is answered exactly once (docs/chaos.md). About 1 minute.
log "whole-stack crash (chaos/crash-stack.sh --secs 20 --kill-at 8)"
chaos/crash-stack.sh --secs 20 --kill-at 8

# The benchmark's short form on the durable default (tansu's postgres engine, 100 ms fetch
# wait): prints the table of docs/performance.md (rates, an LLM-bound run, a burst, CPU per
# process); fails only when a run lost, duplicated or invented a message. About 4 minutes.
log "benchmark, short form, postgres storage (scripts/bench.sh --short --storage postgres)"
scripts/bench.sh --short --storage postgres

# The gateway's fuzz target (client frames and the Connection state machine), a short run:
# FUZZ_SECS (60) seconds of libFuzzer. cargo-fuzz needs nightly flags: the nightly toolchain
# when installed, else the stable compiler with RUSTC_BOOTSTRAP=1.
fuzz_secs="${FUZZ_SECS:-60}"
if [ "$fuzz_secs" -gt 0 ]; then
  log "cargo fuzz run connection (${fuzz_secs} s)"
  if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    (cd services/gateway && cargo +nightly fuzz run connection -- -max_total_time="$fuzz_secs")
  else
    (cd services/gateway && RUSTC_BOOTSTRAP=1 cargo fuzz run connection -- -max_total_time="$fuzz_secs")
  fi
fi

shopt -s nullglob
rules=(alerts/*.yml alerts/*.yaml)
rule_tests=(alerts/tests/*.yml alerts/tests/*.yaml)
if [ "${#rules[@]}" -gt 0 ]; then
  log "promtool check rules ${rules[*]}"
  promtool check rules "${rules[@]}"
else
  log "no alerts/*.yml: skipping promtool check rules"
fi
if [ "${#rule_tests[@]}" -gt 0 ]; then
  log "promtool test rules ${rule_tests[*]}"
  promtool test rules "${rule_tests[@]}"
else
  log "no alerts/tests/*.yml: skipping promtool test rules"
fi
promtool check config infra/prometheus.yml
if command -v amtool >/dev/null 2>&1; then
  amtool check-config infra/alertmanager.yml
fi

if [ "$COLLOQUY_TESTKIT" = containers ] && command -v docker-compose >/dev/null 2>&1; then
  # The debug binaries built above: no release build in CI (the images strip debug info).
  log "container deployment (infra/compose-test.sh test)"
  COLLOQUY_BIN_DIR="$REPO/target/debug" infra/compose-test.sh test
elif command -v docker-compose >/dev/null 2>&1; then
  log "compose files (infra/compose-test.sh validate; no Docker engine for the deployment test)"
  infra/compose-test.sh validate
fi

log "all tests passed"
