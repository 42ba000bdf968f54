#!/usr/bin/env bash
# Smoke test of the local images: runs each with an explicitly mapped free host port, then checks
# that redis answers PING and that tansu accepts TCP and advertises the mapped host port.
# Usage: infra/images/smoke.sh   (after infra/images/build.sh)
set -euo pipefail

log() { printf '[smoke] %s\n' "$*" >&2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

CIDS=()
cleanup() { local c; for c in "${CIDS[@]}"; do docker rm -f "$c" >/dev/null 2>&1 || true; done; }
trap cleanup EXIT

rp="$(free_port)"
CIDS+=("$(docker run -d -p "127.0.0.1:$rp:6379" colloquy/redis:local)")
deadline=$((SECONDS + ${SMOKE_WAIT_SECS:-60}))
until redis-cli -h 127.0.0.1 -p "$rp" ping 2>/dev/null | grep -q PONG || [ "$SECONDS" -ge "$deadline" ]; do sleep 0.2; done
redis-cli -h 127.0.0.1 -p "$rp" ping | grep -q PONG || { log "redis image: no PONG on $rp"; docker logs "${CIDS[-1]}" >&2; exit 1; }
log "colloquy/redis:local answers PING on 127.0.0.1:$rp"

tp="$(free_port)"
CIDS+=("$(docker run -d -p "127.0.0.1:$tp:9092" -e "ADVERTISED_LISTENER_URL=tcp://127.0.0.1:$tp" colloquy/tansu:local)")
# An open host port proves little: Docker's userland proxy accepts on it before anything listens
# in the container. tansu's own startup line is the proof, and it can take several seconds on a
# loaded machine (a CI run failed here once with a 5 s wait and nothing logged yet), so wait up
# to SMOKE_WAIT_SECS (60) for it, and stop early only if the container exited.
# Read the logs into a variable first: `docker logs | grep -q` under pipefail fails when grep
# exits early and docker logs gets SIGPIPE.
advertised() { local logs; logs="$(docker logs "${CIDS[-1]}" 2>&1)"; grep -q "advertised: tcp://127.0.0.1:$tp" <<<"$logs"; }
running() { [ "$(docker inspect -f '{{.State.Running}}' "${CIDS[-1]}" 2>/dev/null)" = true ]; }
tansu_failed() {
  log "tansu image: $1 (container state: $(docker inspect -f '{{.State.Status}} exit={{.State.ExitCode}} started={{.State.StartedAt}}' "${CIDS[-1]}" 2>&1))"
  log "its logs follow:"; docker logs "${CIDS[-1]}" >&2; exit 1
}
deadline=$((SECONDS + ${SMOKE_WAIT_SECS:-60}))
until advertised; do
  running || tansu_failed "the container stopped before advertising tcp://127.0.0.1:$tp"
  [ "$SECONDS" -lt "$deadline" ] || tansu_failed "no 'advertised: tcp://127.0.0.1:$tp' within ${SMOKE_WAIT_SECS:-60} s"
  sleep 0.2
done
port_open "$tp" || tansu_failed "port $tp closed after startup"
log "colloquy/tansu:local accepts TCP on 127.0.0.1:$tp, advertising tcp://127.0.0.1:$tp"
