#!/usr/bin/env bash
# Builds Colloquy's local Docker images without any registry: each is `FROM scratch` with its
# binaries and the shared libraries `ldd` lists for them, copied from this machine
# (infra/images/rootfs.sh assembles the root filesystem).
#
#   colloquy/tansu:local         the tansu broker (ENTRYPOINT tansu; see infra/images/README.md)
#   colloquy/redis:local         redis-server (CMD runs it on 0.0.0.0:6379, no persistence)
#   -- the container deployment (infra/compose.local.yaml), built only when named or with --deploy:
#   colloquy/tansu:deploy        tansu as above plus colloquy-probe, for a non-root container
#   colloquy/redis:deploy        redis-server plus colloquy-probe, for a non-root container
#   colloquy/nginx:local         Debian's nginx with infra/nginx.conf, addresses rewritten for compose
#   colloquy/prometheus:local    Debian's prometheus (config and rules are mounted by compose)
#   colloquy/alertmanager:local  Debian's prometheus-alertmanager (config mounted by compose)
#   colloquy/gateway:local, colloquy/ai-consumer:local, colloquy/relay:local, colloquy/fake-llm:local
#                                the release binaries in target/release (COLLOQUY_BIN_DIR overrides)
#
# Every image but tansu and redis runs as uid 65534 and carries colloquy-probe for its HEALTHCHECK.
# An image is rebuilt only when its inputs (sha256 of binaries and templates) or this recipe
# changed: both are labels.
# Usage: infra/images/build.sh [--force] [--deploy] [tansu|redis|tansu-deploy|redis-deploy|nginx|
#                               prometheus|alertmanager|gateway|ai-consumer|relay|fake-llm ...]
set -euo pipefail

log() { printf '[images] %s\n' "$*" >&2; }

export PATH="${CARGO_HOME:-${HOME:-/root}/.cargo}/bin:$PATH"
export DOCKER_BUILDKIT=0   # the classic builder: no buildx plugin here, and nothing to pull for scratch

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
RECIPE="$(cat "${BASH_SOURCE[0]}" "$HERE/rootfs.sh" | sha256sum | cut -c1-16)"
BIN="${COLLOQUY_BIN_DIR:-$REPO/target/release}"
DEPLOY_IMAGES=(tansu-deploy redis-deploy nginx prometheus alertmanager gateway ai-consumer relay fake-llm)

FORCE=0
WANT=()
for a in "$@"; do
  case "$a" in
    --force) FORCE=1 ;;
    --deploy) WANT+=("${DEPLOY_IMAGES[@]}") ;;
    tansu|redis|tansu-deploy|redis-deploy|nginx|prometheus|alertmanager|gateway|ai-consumer|relay|fake-llm) WANT+=("$a") ;;
    -h|--help) sed -n '2,21p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) log "unknown argument: $a"; exit 2 ;;
  esac
done
[ "${#WANT[@]}" -gt 0 ] || WANT=(tansu redis)

if ! command -v docker >/dev/null 2>&1 || ! timeout 30 docker info >/dev/null 2>&1; then
  log "no Docker engine reachable: skipping image builds"
  exit 0
fi

# need_bin NAME: the absolute path of NAME on PATH, or exit with a hint.
need_bin() {
  local b
  b="$(command -v "$1" || true)"
  [ -n "$b" ] || { log "$1 not on PATH: run scripts/install-deps.sh first"; exit 1; }
  readlink -f "$b"
}
# need_release NAME: target/release/NAME, or exit with a hint.
need_release() {
  [ -x "$BIN/$1" ] || { log "$BIN/$1 is missing: run 'cargo build --release --bins' first"; exit 1; }
  echo "$BIN/$1"
}

# build_image NAME TAG DOCKERFILE_TAIL INPUTS -- ROOTFS_ARGS...
#   INPUTS: files whose content makes the image (hashed into the colloquy.binary.sha256 label)
#   ROOTFS_ARGS: passed to rootfs.sh; EXTRA_FILES (SRC:DEST lines) are files or directories copied in
build_image() {
  local name="$1" tag="$2" tail="$3" sum have_sum have_recipe ctx old_id new_id f
  shift 3
  local inputs=()
  while [ "$1" != "--" ]; do inputs+=("$(readlink -f "$1")"); shift; done
  shift
  if [ "${#inputs[@]}" = 1 ]; then
    sum="$(sha256sum "${inputs[0]}" | cut -d' ' -f1)"
  else
    sum="$(sha256sum "${inputs[@]}" | cut -d' ' -f1 | sha256sum | cut -d' ' -f1)"
  fi
  have_sum="$(docker image inspect -f '{{ index .Config.Labels "colloquy.binary.sha256" }}' "$tag" 2>/dev/null || true)"
  have_recipe="$(docker image inspect -f '{{ index .Config.Labels "colloquy.recipe" }}' "$tag" 2>/dev/null || true)"
  if [ "$FORCE" = 0 ] && [ "$have_sum" = "$sum" ] && [ "$have_recipe" = "$RECIPE" ]; then
    log "$tag is up to date (inputs sha256 ${sum:0:12}), not rebuilding"
    return 0
  fi
  old_id="$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)"
  log "building $tag (inputs sha256 ${sum:0:12})"
  ctx="$(mktemp -d)"
  "$HERE/rootfs.sh" "$ctx/rootfs" "$@"
  for f in "${EXTRA_FILES[@]}"; do
    mkdir -p "$ctx/rootfs$(dirname "${f#*:}")"
    cp -rL "${f%%:*}" "$ctx/rootfs${f#*:}"
    chmod -R a+rX "$ctx/rootfs${f#*:}"
  done
  {
    echo "FROM scratch"
    echo "COPY rootfs/ /"
    if [ -f "$ctx/rootfs.owned.list" ]; then
      local path uid
      while read -r path uid; do echo "COPY --chown=$uid:$uid rootfs.owned$path/ $path/"; done <"$ctx/rootfs.owned.list"
    fi
    echo "LABEL colloquy.binary.sha256=\"$sum\" colloquy.recipe=\"$RECIPE\" colloquy.image=\"$name\""
    printf '%s\n' "$tail"
  } >"$ctx/Dockerfile"
  if ! docker build -q -t "$tag" "$ctx" >"$ctx.log" 2>&1; then
    cat "$ctx.log" >&2; rm -rf "$ctx" "$ctx.log"; log "docker build of $tag failed"; return 1
  fi
  rm -f "$ctx.log"
  new_id="$(docker image inspect -f '{{.Id}}' "$tag")"
  if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
    docker rmi "$old_id" >/dev/null 2>&1 || true   # still used by a container: leave it
  fi
  rm -rf "$ctx"
  log "built $tag ($(docker image inspect -f '{{.Size}}' "$tag") bytes)"
}

# A HEALTHCHECK line for a probe URL (the probe's own timeouts are 3 s).
healthcheck() {
  printf 'HEALTHCHECK --interval=5s --timeout=5s --start-period=30s --retries=3 CMD ["/usr/local/bin/colloquy-probe", "%s"]\n' "$1"
}

# service_image NAME BINARY LISTEN_VAR PORT: one Colloquy binary, non-root, listening on 0.0.0.0:PORT.
service_image() {
  local name="$1" binary="$2" var="$3" port="$4" exe probe
  exe="$(need_release "$binary")"; probe="$(need_release colloquy-probe)"
  EXTRA_FILES=()
  build_image "$name" "colloquy/$name:local" "$(cat <<DF
ENV PATH=/usr/local/bin $var=0.0.0.0:$port SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
USER 65534:65534
EXPOSE $port
$(healthcheck "http://127.0.0.1:$port/health")
ENTRYPOINT ["/usr/local/bin/$binary"]
DF
)" "$exe" "$probe" -- --ca-certs "$exe:/usr/local/bin/$binary" "$probe:/usr/local/bin/colloquy-probe"
}

# nginx.conf is the edge config of scripts/stack.sh; the container edge is the same file with its
# three addresses rewritten. Each token must be there exactly once, so an edit to nginx.conf that
# moves them fails here instead of shipping an edge pointing at 127.0.0.1.
render_nginx_conf() {
  local src="$1" out="$2" token
  for token in 'listen       127.0.0.1:8080;' 'server 127.0.0.1:8001' 'server 127.0.0.1:8002'; do
    if [ "$(grep -cF -- "$token" "$src")" != 1 ]; then
      log "$src must contain '$token' exactly once (it is rewritten for the containers)"; exit 1
    fi
  done
  sed -e 's/listen       127\.0\.0\.1:8080;/listen       8080;/' \
      -e 's/server 127\.0\.0\.1:8001/server gateway-1:8001/' \
      -e 's/server 127\.0\.0\.1:8002/server gateway-2:8002/' "$src" >"$out"
}

EXTRA_FILES=()
for w in "${WANT[@]}"; do
  case "$w" in
    tansu)
      TANSU_BIN="$(need_bin tansu)"
      EXTRA_FILES=()
      build_image tansu colloquy/tansu:local "$(cat <<'DF'
ENV PATH=/usr/local/bin TMPDIR=/tmp RUST_LOG=warn LISTENER_URL=tcp://0.0.0.0:9092 STORAGE_ENGINE=memory://tansu/
WORKDIR /data
EXPOSE 9092
ENTRYPOINT ["/usr/local/bin/tansu"]
CMD ["broker"]
DF
)" "$TANSU_BIN" -- "--dir=/data:65534" "$TANSU_BIN:/usr/local/bin/tansu"
      ;;
    redis)
      # Debian's redis-server is a symlink to redis-check-rdb, which picks its role from argv[0]:
      # the file must be called redis-server inside the image.
      REDIS_BIN="$(need_bin redis-server)"
      EXTRA_FILES=()
      build_image redis colloquy/redis:local "$(cat <<'DF'
ENV PATH=/usr/local/bin
WORKDIR /data
EXPOSE 6379
CMD ["/usr/local/bin/redis-server", "--port", "6379", "--bind", "0.0.0.0", "--protected-mode", "no", "--save", "", "--appendonly", "no"]
DF
)" "$REDIS_BIN" -- "--dir=/data:65534" "$REDIS_BIN:/usr/local/bin/redis-server"
      ;;
    tansu-deploy)
      TANSU_BIN="$(need_bin tansu)"; PROBE="$(need_release colloquy-probe)"
      EXTRA_FILES=()
      build_image tansu-deploy colloquy/tansu:deploy "$(cat <<DF
ENV PATH=/usr/local/bin TMPDIR=/tmp RUST_LOG=warn LISTENER_URL=tcp://0.0.0.0:9092 STORAGE_ENGINE=memory://tansu/
USER 65534:65534
WORKDIR /data
EXPOSE 9092
$(healthcheck "tcp://127.0.0.1:9092")
ENTRYPOINT ["/usr/local/bin/tansu"]
CMD ["broker"]
DF
)" "$TANSU_BIN" "$PROBE" -- "--dir=/data:65534" "$TANSU_BIN:/usr/local/bin/tansu" "$PROBE:/usr/local/bin/colloquy-probe"
      ;;
    redis-deploy)
      REDIS_BIN="$(need_bin redis-server)"; PROBE="$(need_release colloquy-probe)"
      EXTRA_FILES=()
      build_image redis-deploy colloquy/redis:deploy "$(cat <<DF
ENV PATH=/usr/local/bin
USER 65534:65534
WORKDIR /data
EXPOSE 6379
$(healthcheck "redis://127.0.0.1:6379")
CMD ["/usr/local/bin/redis-server", "--port", "6379", "--bind", "0.0.0.0", "--protected-mode", "no", "--dir", "/data", "--appendonly", "yes", "--appendfsync", "always", "--save", ""]
DF
)" "$REDIS_BIN" "$PROBE" -- "--dir=/data:65534" "$REDIS_BIN:/usr/local/bin/redis-server" "$PROBE:/usr/local/bin/colloquy-probe"
      ;;
    nginx)
      NGINX_BIN="$(need_bin nginx)"; PROBE="$(need_release colloquy-probe)"
      CONF_DIR="$(mktemp -d)"; render_nginx_conf "$REPO/infra/nginx.conf" "$CONF_DIR/colloquy.conf"
      EXTRA_FILES=("/etc/nginx/mime.types:/etc/nginx/mime.types" "$CONF_DIR/colloquy.conf:/etc/nginx/colloquy.conf")
      # The prefix (-p) holds the relative paths of nginx.conf: logs/, pids/ and nginx/ (temp files).
      build_image nginx colloquy/nginx:local "$(cat <<DF
ENV PATH=/usr/local/bin:/usr/sbin
USER 65534:65534
EXPOSE 8080
$(healthcheck "http://127.0.0.1:8080/health")
ENTRYPOINT ["/usr/sbin/nginx", "-p", "/var/lib/nginx-colloquy/", "-c", "/etc/nginx/colloquy.conf", "-e", "/dev/stderr", "-g", "daemon off;"]
DF
)" "$NGINX_BIN" "$PROBE" "$CONF_DIR/colloquy.conf" -- \
        "--dir=/var/lib/nginx-colloquy/logs:65534" "--dir=/var/lib/nginx-colloquy/pids:65534" \
        "--dir=/var/lib/nginx-colloquy/nginx:65534" \
        "$NGINX_BIN:/usr/sbin/nginx" "$PROBE:/usr/local/bin/colloquy-probe"
      rm -rf "$CONF_DIR"
      ;;
    prometheus)
      PROM_BIN="$(need_bin prometheus)"; PROBE="$(need_release colloquy-probe)"
      # Debian's build serves its web UI from /usr/share/prometheus/web, 221 MB once its symlinks
      # into /usr/share/javascript are followed: left out, the HTTP API is all the tests need.
      EXTRA_FILES=()
      build_image prometheus colloquy/prometheus:local "$(cat <<DF
ENV PATH=/usr/local/bin
USER 65534:65534
WORKDIR /prometheus
EXPOSE 9090
$(healthcheck "http://127.0.0.1:9090/-/ready")
ENTRYPOINT ["/usr/local/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus", "--web.listen-address=0.0.0.0:9090", "--web.enable-lifecycle"]
DF
)" "$PROM_BIN" "$PROBE" -- "--dir=/prometheus:65534" "--dir=/etc/prometheus" \
        "$PROM_BIN:/usr/local/bin/prometheus" "$PROBE:/usr/local/bin/colloquy-probe"
      ;;
    alertmanager)
      AM_BIN="$(need_bin prometheus-alertmanager)"; PROBE="$(need_release colloquy-probe)"
      # Debian's build reads its notification templates from /usr/share/prometheus/alertmanager.
      EXTRA_FILES=("/usr/share/prometheus/alertmanager:/usr/share/prometheus/alertmanager")
      build_image alertmanager colloquy/alertmanager:local "$(cat <<DF
ENV PATH=/usr/local/bin
USER 65534:65534
WORKDIR /alertmanager
EXPOSE 9093
$(healthcheck "http://127.0.0.1:9093/-/ready")
ENTRYPOINT ["/usr/local/bin/alertmanager"]
CMD ["--config.file=/etc/alertmanager/alertmanager.yml", "--storage.path=/alertmanager", "--web.listen-address=0.0.0.0:9093", "--cluster.listen-address="]
DF
)" "$AM_BIN" "$PROBE" -- "--dir=/alertmanager:65534" "--dir=/etc/alertmanager" \
        "$AM_BIN:/usr/local/bin/alertmanager" "$PROBE:/usr/local/bin/colloquy-probe"
      ;;
    gateway) service_image gateway colloquy-gateway GATEWAY_LISTEN 8001 ;;
    ai-consumer) service_image ai-consumer colloquy-ai-consumer METRICS_LISTEN 9101 ;;
    relay) service_image relay colloquy-relay METRICS_LISTEN 9102 ;;
    fake-llm) service_image fake-llm fake-llm FAKE_LLM_LISTEN 8090 ;;
  esac
done
