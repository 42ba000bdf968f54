#!/usr/bin/env bash
# An outsider's crash: the whole local stack (scripts/stack.sh) killed with SIGKILL at once under
# open-loop load, then started again with the same command and environment. Prints the load
# generator's verdict and the relay's ledger; exits non-zero when an acked message was lost or
# duplicated, or when the stack did not come back.
#
# Usage: chaos/crash-stack.sh [--storage postgres|sqlite] [--rate N] [--secs N] [--kill-at N] [--keep]
#   defaults: postgres (the durable default), 300 msg/s from 300 users, 40 s, kill 12 s in.
# It stops any running stack first and starts from an empty run/ (the stack's data is wiped);
# the stack is stopped again at the end unless --keep is given (to look at it).
# The memory engine is refused: it keeps nothing across a restart, by design (docs/storage.md).
# Needs the release binaries (cargo build --release --bins) and scripts/install-deps.sh.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
log() { printf '[crash] %s\n' "$*" >&2; }

STORAGE=postgres RATE=300 SECS=40 KILL_AT=12 KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --storage) STORAGE="$2"; shift ;;
    --rate) RATE="$2"; shift ;;
    --secs) SECS="$2"; shift ;;
    --kill-at) KILL_AT="$2"; shift ;;
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) log "unknown argument: $1"; exit 2 ;;
  esac
  shift
done
case "$STORAGE" in
  postgres|sqlite) ;;
  *) log "--storage $STORAGE: only a durable engine survives a crash (postgres or sqlite)"; exit 2 ;;
esac
LOAD="$REPO/target/release/colloquy-load"
[ -x "$LOAD" ] || { log "$LOAD is missing: cargo build --release --bins"; exit 1; }

# One environment for both starts: a restart without the raised edge limits lets nginx refuse
# most of the reconnecting users (they all come from 127.0.0.1), which looks like loss.
export KAFKA_STORAGE="$STORAGE" COLLOQUY_SKIP_BUILD=1 RATE_LIMIT_MESSAGES=1000000 \
  EDGE_SOCKETS_PER_ADDR=60000 EDGE_TOKENS_PER_SEC=100000 EDGE_TOKENS_BURST=100000

scripts/stack.sh down >/dev/null 2>&1 || true
rm -rf run "$(bash -c 'source "$1"; pg_dir' crash-stack scripts/stack.sh)"
load=""
finish() {
  [ -z "$load" ] || kill "$load" 2>/dev/null || true
  [ "$KEEP" = 1 ] || scripts/stack.sh down >/dev/null 2>&1 || true
}
trap finish EXIT
OUT="$(mktemp -d)"
log "starting the stack ($STORAGE); logs of both starts in $OUT"
scripts/stack.sh up >"$OUT/up-1.log" 2>&1 || { tail -20 "$OUT/up-1.log" >&2; exit 1; }

log "load: $RATE msg/s from $RATE users for $SECS s; the crash at $KILL_AT s"
"$LOAD" run --users "$RATE" --rate "$RATE" --duration-secs "$SECS" >"$OUT/load.log" 2>&1 &
load=$!
sleep "$KILL_AT"

pids=()
for f in run/pids/*.pid; do pids+=("$(cat "$f")"); done
# nginx's workers and PostgreSQL's backends are children of the recorded pids: a crash takes them too.
for p in "${pids[@]}"; do pids+=($(pgrep -P "$p" || true)); done
kill -KILL "${pids[@]}" 2>/dev/null || true
log "killed ${#pids[@]} processes with SIGKILL at $(date +%T)"
sleep 0.5
started=$SECONDS
if ! scripts/stack.sh up >"$OUT/up-2.log" 2>&1; then
  log "the stack did not come back; end of $OUT/up-2.log:"; tail -20 "$OUT/up-2.log" >&2
  exit 1
fi
log "up again in $((SECONDS - started)) s"

status=0
wait "$load" || status=$?
load=""
summary="$(grep '^offered=' "$OUT/load.log" || true)"
printf '%s\n' "$summary"
sleep 6   # one audit interval of the relay, so its gauge has seen the last answers
ledger="$(curl -s http://127.0.0.1:9102/metrics | grep '^colloquy_unanswered_messages ' || true)"
printf 'relay: %s; audit:unanswered holds %s\n' "$ledger" "$(redis-cli -p 6379 zcard audit:unanswered)"
[ "$status" = 0 ] || log "the load generator reports a failure (exit $status): see $OUT/load.log"
exit "$status"
