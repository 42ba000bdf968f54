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
for _ in $(seq 1 50); do redis-cli -h 127.0.0.1 -p "$rp" ping 2>/dev/null | grep -q PONG && break; sleep 0.2; done
redis-cli -h 127.0.0.1 -p "$rp" ping | grep -q PONG || { log "redis image: no PONG on $rp"; docker logs "${CIDS[-1]}" >&2; exit 1; }
log "colloquy/redis:local answers PING on 127.0.0.1:$rp"

tp="$(free_port)"
CIDS+=("$(docker run -d -p "127.0.0.1:$tp:9092" -e "ADVERTISED_LISTENER_URL=tcp://127.0.0.1:$tp" colloquy/tansu:local)")
for _ in $(seq 1 50); do port_open "$tp" && break; sleep 0.2; done
port_open "$tp" || { log "tansu image: port $tp closed"; docker logs "${CIDS[-1]}" >&2; exit 1; }
# Read the logs into a variable first: `docker logs | grep -q` under pipefail fails when grep
# exits early and docker logs gets SIGPIPE.
advertised() { local logs; logs="$(docker logs "${CIDS[-1]}" 2>&1)"; grep -q "advertised: tcp://127.0.0.1:$tp" <<<"$logs"; }
for _ in $(seq 1 25); do advertised && break; sleep 0.2; done
advertised || { log "tansu image: wrong advertised listener"; docker logs "${CIDS[-1]}" >&2; exit 1; }
log "colloquy/tansu:local accepts TCP on 127.0.0.1:$tp, advertising tcp://127.0.0.1:$tp"
