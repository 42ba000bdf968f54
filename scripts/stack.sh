#!/usr/bin/env bash
# Runs the whole Colloquy stack on this machine, every process on 127.0.0.1:
#
#   postgres :5433 (tansu's storage)   tansu (Kafka protocol; KAFKA_STORAGE=postgres (durable, default), sqlite or memory) :9092
#   redis :6379   fake LLM :8090 (when no OPENAI_API_KEY)
#   gateway gw1 :8001, gw2 :8002   ai-consumer metrics :9101   relay metrics :9102
#   nginx :8080 (least_conn over the gateways)   Prometheus :9090
#
# Usage: scripts/stack.sh up|down|status|restart
#   up      install what is missing, build the release binaries, start everything, wait until ready
#   down    stop exactly the processes `up` started (SIGTERM, up to 10 s, then SIGKILL)
#   status  show which of them are running
# State lives in run/ (gitignored): run/pids/*.pid, run/logs/*.log, PostgreSQL's cluster, redis and
# Prometheus data. Set COLLOQUY_SKIP_BUILD=1 to use the binaries already in target/release.
set -euo pipefail

export PATH="${CARGO_HOME:-${HOME:-/root}/.cargo}/bin:$PATH"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN="$REPO/run"
PIDS="$RUN/pids"
LOGS="$RUN/logs"
BIN="$REPO/target/release"

# Start order (down stops in reverse).
SERVICES=(postgres tansu redis fake-llm gateway-1 gateway-2 ai-consumer relay nginx prober alertmanager blackbox prometheus)

log() { printf '[stack] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

pid_of() { local f="$PIDS/$1.pid"; [ -f "$f" ] && cat "$f" || true; }
# A pid is running if it exists and is not a zombie waiting for its (adoptive) parent to reap it.
pid_running() {
  kill -0 "$1" 2>/dev/null || return 1
  local st
  st="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null || true)"
  [ "$st" != Z ]
}
alive() { local p; p="$(pid_of "$1")"; [ -n "$p" ] && pid_running "$p"; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# Redis answers PING with an error while it loads its append-only file: wait for PONG.
redis_ready() { [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ]; }

# wait_for NAME TIMEOUT_S CHECK...: poll CHECK until it succeeds; fail if NAME's process died.
wait_for() {
  local name="$1" timeout="$2"; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if ! alive "$name"; then
      log "$name exited during start-up; last lines of $LOGS/$name.log:"
      tail -n 30 "$LOGS/$name.log" >&2 || true
      return 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "$name not ready after ${timeout}s; last lines of $LOGS/$name.log:"
      tail -n 30 "$LOGS/$name.log" >&2 || true
      return 1
    fi
    sleep 0.3
  done
  log "$name is ready"
}

# start NAME WORKDIR [VAR=value ...] -- COMMAND ARGS...
start() {
  local name="$1" dir="$2"; shift 2
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  mkdir -p "$dir"
  printf '=== %s scripts/stack.sh starting %s\n' "$(date -Is)" "$name" >>"$LOGS/$name.log"
  log "starting $name: ${envs[*]:+${envs[*]} }$*"
  (
    cd "$dir"
    # One tokio worker thread per process (tansu, the fake LLM and the services are tokio
    # programs; the rest ignore it): a dozen processes share this machine's cores, and one
    # worker each wakes fewer threads per message than one per core each (docs/performance.md:
    # 10-15 % less CPU per message at 1,000 msg/s). Set TOKIO_WORKER_THREADS to override.
    exec env TOKIO_WORKER_THREADS="${TOKIO_WORKER_THREADS:-1}" "${envs[@]}" "$@" </dev/null >>"$LOGS/$name.log" 2>&1
  ) &
  echo $! >"$PIDS/$name.pid"
}

# PostgreSQL's server programs: the newest Debian /usr/lib/postgresql/<version>/bin, else pg_config's.
pg_bin_dir() {
  local d
  d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
  if [ -n "$d" ] && [ -x "$d/postgres" ]; then echo "$d"; return 0; fi
  command -v pg_config >/dev/null 2>&1 && pg_config --bindir
}

# tansu's postgres engine: a private cluster in run/postgres on 127.0.0.1:$PG_PORT (trust
# authentication, loopback only), created on first use, with tansu's schema applied after every
# start (infra/tansu/postgres-schema.sql, idempotent). PostgreSQL refuses to run as root: as root,
# initdb and the server run as the `postgres` user (Debian's package creates it) through setpriv,
# which execs, so the recorded pid is the server's.
PG_PORT="${PG_PORT:-5433}"

# After a crash (kill -9 of the stack, an OOM kill) the server's lock file, DATA/postmaster.pid,
# is left behind. PostgreSQL removes a stale one by itself, but refuses to start while the pid in
# it still exists ("lock file "postmaster.pid" already exists"): a killed server stays a zombie
# until whoever adopted it reaps it (seen here: still there 0.8 s after kill -9, so `up` right
# after the crash failed). Wait for such a pid to go; a pid reused by another program makes the
# lock stale (removed); a live PostgreSQL on this data directory is an error.
clear_stale_postmaster() {
  local data="$1" lock="$1/postmaster.pid" old comm deadline=$((SECONDS + 30))
  [ -f "$lock" ] || return 0
  old="$(head -n 1 "$lock" 2>/dev/null || true)"
  [[ "$old" =~ ^[0-9]+$ ]] || return 0
  while kill -0 "$old" 2>/dev/null; do
    comm="$(cat "/proc/$old/comm" 2>/dev/null || true)"
    if pid_running "$old"; then
      if [ "$comm" = postgres ]; then
        die "PostgreSQL (pid $old) still runs on $data: stop it first (scripts/stack.sh down, or kill $old)"
      fi
      log "$lock names pid $old, now another program ($comm): removing the stale lock file"
      rm -f "$lock"
      return 0
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      die "pid $old of $lock (a PostgreSQL killed earlier) has not been reaped after 30 s"
    fi
    sleep 0.1
  done
}

# Where PostgreSQL's cluster lives: run/postgres, unless we are root and the `postgres` user
# cannot reach run/ (a checkout under /root, mode 700): then a directory of its own under
# /var/tmp, named after this checkout. PG_DIR overrides both.
pg_dir() {
  if [ -n "${PG_DIR:-}" ]; then echo "$PG_DIR"; return; fi
  mkdir -p "$RUN"
  if [ "$(id -u)" = 0 ] && ! setpriv --reuid=postgres --regid=postgres --init-groups -- test -x "$RUN" 2>/dev/null; then
    echo "/var/tmp/colloquy-stack-$(printf '%s' "$REPO" | cksum | cut -d' ' -f1)/postgres"
  else
    echo "$RUN/postgres"
  fi
}

start_postgres() {
  local pgbin dir as=()
  pgbin="$(pg_bin_dir)" || die "PostgreSQL is not installed: run scripts/install-deps.sh"
  dir="$(pg_dir)"
  [ "$dir" = "$RUN/postgres" ] || log "PostgreSQL's cluster: $dir (the postgres user cannot reach $RUN)"
  mkdir -p "$dir"
  if [ "$(id -u)" = 0 ]; then
    chown -R postgres:postgres "$dir" || die "cannot hand $dir to the postgres user"
    as=(setpriv --reuid=postgres --regid=postgres --init-groups --)
  fi
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    log "initdb $dir/data (first start)"
    "${as[@]}" "$pgbin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >>"$LOGS/postgres.log" 2>&1 \
      || die "initdb failed; see $LOGS/postgres.log"
  fi
  clear_stale_postmaster "$dir/data"
  start postgres "$dir" -- "${as[@]}" "$pgbin/postgres" -D "$dir/data" -p "$PG_PORT" -k "$dir" \
    -c listen_addresses=127.0.0.1
  wait_for postgres 60 "$pgbin/pg_isready" -h 127.0.0.1 -p "$PG_PORT" -U postgres
  "$pgbin/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -v ON_ERROR_STOP=1 -q \
    -f "$REPO/infra/tansu/postgres-schema.sql" >>"$LOGS/postgres.log" 2>&1 \
    || die "applying tansu's schema failed; see $LOGS/postgres.log"
}

need_port_free() {
  if port_open "$1"; then
    die "port 127.0.0.1:$1 (for $2) is already in use by another process; stop it first"
  fi
}

stop_one() {
  local name="$1" pid i
  pid="$(pid_of "$name")"
  [ -n "$pid" ] || return 0
  if pid_running "$pid"; then
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do
      pid_running "$pid" || break
      sleep 0.1
    done
    if pid_running "$pid"; then
      log "$name (pid $pid) still running after 10s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$PIDS/$name.pid"
}

cmd_down() {
  local i
  for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do stop_one "${SERVICES[$i]}"; done
  rm -f "$RUN/stack.env"
  log "stack is down"
}

cmd_status() {
  local s any=0
  for s in "${SERVICES[@]}"; do
    if alive "$s"; then printf '  %-12s running (pid %s)\n' "$s" "$(pid_of "$s")"; any=1
    elif [ -f "$PIDS/$s.pid" ]; then printf '  %-12s DEAD (pid %s; see %s)\n' "$s" "$(pid_of "$s")" "$LOGS/$s.log"; any=1
    fi
  done
  [ "$any" = 1 ] || echo "  stack is not running"
}

any_alive() { local s; for s in "${SERVICES[@]}"; do alive "$s" && return 0; done; return 1; }

cmd_up() {
  if any_alive; then
    log "the stack is already running (scripts/stack.sh down to stop it):"
    cmd_status
    return 0
  fi
  rm -f "$PIDS"/*.pid 2>/dev/null || true

  "$REPO/scripts/install-deps.sh"

  if [ "${COLLOQUY_SKIP_BUILD:-0}" != 1 ]; then
    log "cargo build --release --bins"
    (cd "$REPO" && cargo build --release --bins)
  fi
  local b
  for b in colloquy-gateway colloquy-ai-consumer colloquy-relay colloquy-prober; do
    [ -x "$BIN/$b" ] || die "$BIN/$b is missing (did the build fail?)"
  done

  mkdir -p "$PIDS" "$LOGS" "$RUN/tansu" "$RUN/redis" "$RUN/prometheus" "$RUN/nginx" "$RUN/services"

  local use_fake=0
  if [ -z "${OPENAI_API_KEY:-}" ]; then use_fake=1; fi

  need_port_free 9092 tansu; need_port_free 6379 redis
  [ "$use_fake" = 0 ] || need_port_free 8090 fake-llm
  need_port_free 8001 gateway-1; need_port_free 8002 gateway-2
  need_port_free 9101 ai-consumer; need_port_free 9102 relay
  need_port_free 8080 nginx; need_port_free 9090 prometheus
  need_port_free 9103 prober; need_port_free 9093 alertmanager; need_port_free 9115 blackbox

  # If anything below fails (or we are interrupted), stop what was already started.
  trap 'log "start-up failed: stopping what was started"; cmd_down' EXIT

  # Kafka protocol: tansu 0.6 with Colloquy's fetch patch (infra/tansu/build.sh): a fetch is
  # answered as soon as records arrive, so the consumers' fetch wait (500 ms, librdkafka's
  # default) only sets how often an idle consumer costs the engine a pass over its partitions.
  # See docs/storage.md for the measurements behind these choices.
  #   KAFKA_STORAGE=postgres (default): durable (a private PostgreSQL cluster in run/postgres,
  #     every commit fsynced), a connection pool and prepared statements; 2 partitions.
  #   KAFKA_STORAGE=sqlite: durable in run/tansu/tansu.db, but one storage task re-preparing
  #     every statement: a few hundred messages/s at most.
  #   KAFKA_STORAGE=memory: fast (the throughput runs use it), forgets everything on restart.
  # Both knobs stay overridable (KAFKA_FETCH_WAIT_MAX_MS, KAFKA_PARTITIONS); partitions only
  # apply to topics the services create, so existing data keeps its count.
  # TANSU_FETCH_MIN_WAIT_MS: how long the (patched) broker holds a fetch before reading, so what
  # arrives meanwhile goes out in one pass: 30 ms for postgres (its p99 at 500 msg/s: 165 ms,
  # 478 ms at 100), 100 ms for sqlite (dearer passes), 5 ms for memory (testkit's
  # Storage::default_fetch_min_wait_ms holds the same values; a test compares them).
  local storage kafka_fetch_wait kafka_partitions fetch_min_wait
  case "${KAFKA_STORAGE:-postgres}" in
    sqlite)
      storage="sqlite://tansu.db"   # relative to the working dir, run/tansu
      kafka_fetch_wait="${KAFKA_FETCH_WAIT_MAX_MS:-500}"
      kafka_partitions="${KAFKA_PARTITIONS:-2}"
      fetch_min_wait="${TANSU_FETCH_MIN_WAIT_MS:-100}"
      ;;
    memory)
      storage="memory://tansu/"
      kafka_fetch_wait="${KAFKA_FETCH_WAIT_MAX_MS:-500}"
      kafka_partitions="${KAFKA_PARTITIONS:-8}"
      fetch_min_wait="${TANSU_FETCH_MIN_WAIT_MS:-5}"
      ;;
    postgres)
      need_port_free "$PG_PORT" postgres
      storage="postgres://postgres@127.0.0.1:$PG_PORT/postgres?sslmode=disable"
      kafka_fetch_wait="${KAFKA_FETCH_WAIT_MAX_MS:-500}"
      kafka_partitions="${KAFKA_PARTITIONS:-2}"
      fetch_min_wait="${TANSU_FETCH_MIN_WAIT_MS:-30}"
      start_postgres
      ;;
    *) die "KAFKA_STORAGE must be postgres (durable, the default), sqlite or memory, not '${KAFKA_STORAGE}'" ;;
  esac
  log "Kafka storage: ${KAFKA_STORAGE:-postgres} ($storage); fetches held ${fetch_min_wait}–${kafka_fetch_wait} ms, ${kafka_partitions} partitions per topic"
  start tansu "$RUN/tansu" RUST_LOG="${TANSU_LOG:-warn}" TANSU_FETCH_MIN_WAIT_MS="$fetch_min_wait" -- \
    tansu broker \
      --listener-url tcp://127.0.0.1:9092 \
      --advertised-listener-url tcp://127.0.0.1:9092 \
      --storage-engine "$storage"
  wait_for tansu 60 port_open 9092

  # The inbox is the only copy of an answer once the relay stored its offset: fsync the AOF on
  # every write, so a kill -9 of Redis loses nothing that was acknowledged (DESIGN: Delivery).
  start redis "$RUN/redis" -- \
    redis-server --port 6379 --bind 127.0.0.1 --daemonize no --supervised no \
      --dir "$RUN/redis" --appendonly yes --appendfsync always --save '' --logfile ''
  wait_for redis 60 redis_ready

  local svc_env=(
    KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092
    KAFKA_FETCH_WAIT_MAX_MS="$kafka_fetch_wait"
    KAFKA_PARTITIONS="$kafka_partitions"
    # tansu cannot follow an idempotent producer's epoch bump after a storage outage (sqlite
    # panics, postgres refuses every later produce): one request in flight instead, order kept.
    KAFKA_IDEMPOTENCE=false
    REDIS_URL=redis://127.0.0.1:6379
  )
  if [ "$use_fake" = 1 ]; then
    [ -x "$BIN/fake-llm" ] || die "$BIN/fake-llm is missing and OPENAI_API_KEY is unset"
    start fake-llm "$RUN/services" FAKE_LLM_LISTEN=127.0.0.1:8090 -- "$BIN/fake-llm"
    wait_for fake-llm 30 port_open 8090
    svc_env+=(OPENAI_BASE_URL=http://127.0.0.1:8090/v1)
    log "no OPENAI_API_KEY: using the fake LLM at http://127.0.0.1:8090/v1"
  else
    log "OPENAI_API_KEY is set: using ${OPENAI_BASE_URL:-the default OpenAI endpoint}"
  fi

  # Dev mode: the gateways accept the built-in AUTH_SECRET, issue tokens without an admin
  # token and allow localhost origins. A production gateway refuses to start like this.
  log "DEV MODE: gateways run with COLLOQUY_DEV=1 (built-in AUTH_SECRET, open POST /token); never expose this stack"
  start gateway-1 "$RUN/services" "${svc_env[@]}" COLLOQUY_DEV=1 GATEWAY_LISTEN=127.0.0.1:8001 GATEWAY_INSTANCE_ID=gw1 -- "$BIN/colloquy-gateway"
  start gateway-2 "$RUN/services" "${svc_env[@]}" COLLOQUY_DEV=1 GATEWAY_LISTEN=127.0.0.1:8002 GATEWAY_INSTANCE_ID=gw2 -- "$BIN/colloquy-gateway"
  start ai-consumer "$RUN/services" "${svc_env[@]}" METRICS_LISTEN=127.0.0.1:9101 KAFKA_ASSIGNMENT=all KAFKA_GROUP_INSTANCE_ID=ai-consumer-1 -- "$BIN/colloquy-ai-consumer"
  start relay "$RUN/services" "${svc_env[@]}" METRICS_LISTEN=127.0.0.1:9102 KAFKA_ASSIGNMENT=all KAFKA_GROUP_INSTANCE_ID=relay-1 -- "$BIN/colloquy-relay"
  wait_for gateway-1 60 curl -fsS http://127.0.0.1:8001/ready
  wait_for gateway-2 60 curl -fsS http://127.0.0.1:8002/ready
  # One instance of each consumer takes every partition by hand (KAFKA_ASSIGNMENT=all): tansu
  # 0.6's group coordinator can leave a restarted member without partitions (docs/storage.md).
  # Ready means holding partitions: until then the first messages would wait.
  wait_for ai-consumer 90 curl -fsS http://127.0.0.1:9101/ready
  wait_for relay 90 curl -fsS http://127.0.0.1:9102/ready

  # nginx's prefix is run/: its relative paths are run/logs, run/pids (it writes the same pid we
  # record) and run/nginx for temp files.
  # The edge's per-address limits can be raised for a load test from one address (every
  # simulated user comes from 127.0.0.1): EDGE_SOCKETS_PER_ADDR (256), EDGE_TOKENS_PER_SEC (20)
  # and EDGE_TOKEN_BURST (200). The rendered copy is run/nginx.conf.
  local sockets="${EDGE_SOCKETS_PER_ADDR:-256}" tokens="${EDGE_TOKENS_PER_SEC:-20}" burst="${EDGE_TOKEN_BURST:-200}"
  for v in "$sockets" "$tokens" "$burst"; do
    case "$v" in ''|*[!0-9]*) die "EDGE_* limits must be whole numbers (got '$v')" ;; esac
  done
  sed -e "s/zone=token_per_addr:10m  rate=20r\/s;/zone=token_per_addr:10m  rate=${tokens}r\/s;/" \
      -e "s/zone=token_per_addr burst=200 nodelay;/zone=token_per_addr burst=${burst} nodelay;/" \
      -e "s/limit_conn          ws_per_addr 256;/limit_conn          ws_per_addr ${sockets};/" \
      "$REPO/infra/nginx.conf" > "$RUN/nginx.conf"
  for want in "rate=${tokens}r/s;" "burst=${burst} nodelay;" "ws_per_addr ${sockets};"; do
    grep -qF "$want" "$RUN/nginx.conf" || die "infra/nginx.conf changed: cannot set '$want' (fix scripts/stack.sh)"
  done
  [ "$sockets$tokens$burst" = 25620200 ] || log "edge limits per address: ${sockets} sockets, ${tokens} tokens/s (burst ${burst})"
  start nginx "$RUN" -- \
    nginx -p "$RUN" -c "$RUN/nginx.conf" -e "$LOGS/nginx-error.log" -g 'daemon off;'
  wait_for nginx 20 port_open 8080

  # The synthetic prober: a probe user through the edge every 15 s (colloquy_probe_success).
  start prober "$RUN/services" PROBE_EDGE_URL=http://127.0.0.1:8080 METRICS_LISTEN=127.0.0.1:9103 -- "$BIN/colloquy-prober"
  wait_for prober 30 curl -fsS http://127.0.0.1:9103/health

  mkdir -p "$RUN/alertmanager"
  start alertmanager "$RUN/alertmanager" -- \
    prometheus-alertmanager --config.file="$REPO/infra/alertmanager.yml" \
      --storage.path="$RUN/alertmanager" --web.listen-address=127.0.0.1:9093 --cluster.listen-address=
  wait_for alertmanager 30 curl -fsS http://127.0.0.1:9093/-/ready

  # The blackbox exporter checks the broker's TCP port for the kafka-broker job
  # (ColloquyKafkaBrokerDown); Debian's /etc/prometheus/blackbox.yml has the tcp_connect module.
  start blackbox "$RUN" -- \
    prometheus-blackbox-exporter --config.file=/etc/prometheus/blackbox.yml \
      --web.listen-address=127.0.0.1:9115
  wait_for blackbox 30 curl -fsS http://127.0.0.1:9115/-/healthy

  start prometheus "$RUN/prometheus" -- \
    prometheus --config.file="$REPO/infra/prometheus.yml" \
      --storage.tsdb.path="$RUN/prometheus/data" \
      --web.listen-address=127.0.0.1:9090 --web.enable-lifecycle
  wait_for prometheus 60 curl -fsS http://127.0.0.1:9090/-/ready

  trap - EXIT
  {
    printf 'KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092\nREDIS_URL=redis://127.0.0.1:6379\n'
    [ "$use_fake" = 0 ] || printf 'OPENAI_BASE_URL=http://127.0.0.1:8090/v1\n'
    printf 'COLLOQUY_URL=http://127.0.0.1:8080\n'
  } >"$RUN/stack.env"

  cat <<MSG

Colloquy is up, in DEV MODE (COLLOQUY_DEV=1: built-in AUTH_SECRET, open POST /token).
  chat page        http://127.0.0.1:8080/            (WebSocket: ws://127.0.0.1:8080/ws)
  gateways         http://127.0.0.1:8001/  http://127.0.0.1:8002/   (/health /ready /metrics)
  metrics          http://127.0.0.1:8001/metrics  http://127.0.0.1:8002/metrics
                   http://127.0.0.1:9101/metrics (ai-consumer)  http://127.0.0.1:9102/metrics (relay)
  Prometheus       http://127.0.0.1:9090/   (alert rules from alerts/)
  Alertmanager     http://127.0.0.1:9093/
  prober           http://127.0.0.1:9103/metrics (colloquy_probe_success)
  Kafka (tansu)    127.0.0.1:9092      Redis  redis://127.0.0.1:6379
  LLM              $([ "$use_fake" = 1 ] && echo "fake LLM at http://127.0.0.1:8090/v1" || echo "OpenAI-compatible API (OPENAI_API_KEY set)")
  logs             $LOGS/*.log
  pids             $PIDS/*.pid
  stop with        scripts/stack.sh down
MSG
}

# Sourced (by a test of its functions), it only defines them.
[ "${BASH_SOURCE[0]}" = "$0" ] || return 0
case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  restart) cmd_down; cmd_up ;;
  *) sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
