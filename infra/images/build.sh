#!/usr/bin/env bash
# Builds Colloquy's local Docker images without any registry: each is `FROM scratch` with one
# binary and the shared libraries `ldd` lists for it, copied from this machine.
#
#   colloquy/tansu:local  - the tansu broker (ENTRYPOINT tansu; see infra/images/README.md)
#   colloquy/redis:local  - redis-server (CMD runs it on 0.0.0.0:6379, no persistence)
#
# An image is rebuilt only when its binary (sha256) or this recipe changed: both are labels.
# Usage: infra/images/build.sh [--force] [tansu|redis ...]
set -euo pipefail

log() { printf '[images] %s\n' "$*" >&2; }

export PATH="${CARGO_HOME:-${HOME:-/root}/.cargo}/bin:$PATH"
export DOCKER_BUILDKIT=0   # the classic builder: no buildx plugin here, and nothing to pull for scratch

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RECIPE="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"

FORCE=0
WANT=()
for a in "$@"; do
  case "$a" in
    --force) FORCE=1 ;;
    tansu|redis) WANT+=("$a") ;;
    -h|--help) sed -n '2,10p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) log "unknown argument: $a"; exit 2 ;;
  esac
done
[ "${#WANT[@]}" -gt 0 ] || WANT=(tansu redis)

if ! command -v docker >/dev/null 2>&1 || ! timeout 30 docker info >/dev/null 2>&1; then
  log "no Docker engine reachable: skipping image builds"
  exit 0
fi

# copy_with_libs SRC_BINARY ROOTFS DEST_PATH: the binary (symlinks resolved) and every library
# ldd names (plus the dynamic loader), each at the same absolute path inside ROOTFS.
copy_with_libs() {
  local src="$1" root="$2" dest="$3" lib
  mkdir -p "$root$(dirname "$dest")"
  cp -L "$src" "$root$dest"
  chmod 0755 "$root$dest"
  while read -r lib; do
    [ -n "$lib" ] || continue
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done < <(ldd "$src" | awk '/=> \//{print $3} /^[[:space:]]*\/[^ ]+/{print $1}' | sort -u)
  # glibc >= 2.34 has nss files/dns built in; give it the config files it reads.
  mkdir -p "$root/etc" "$root/tmp"
  chmod 1777 "$root/tmp"
  printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
  printf 'root:x:0:0:root:/:/nonexistent\nnobody:x:65534:65534:nobody:/:/nonexistent\n' >"$root/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
}

# build_image NAME TAG BINARY DEST DOCKERFILE_TAIL
build_image() {
  local name="$1" tag="$2" bin="$3" dest="$4" tail="$5" sum have_sum have_recipe ctx old_id new_id
  sum="$(sha256sum "$(readlink -f "$bin")" | cut -d' ' -f1)"
  have_sum="$(docker image inspect -f '{{ index .Config.Labels "colloquy.binary.sha256" }}' "$tag" 2>/dev/null || true)"
  have_recipe="$(docker image inspect -f '{{ index .Config.Labels "colloquy.recipe" }}' "$tag" 2>/dev/null || true)"
  if [ "$FORCE" = 0 ] && [ "$have_sum" = "$sum" ] && [ "$have_recipe" = "$RECIPE" ]; then
    log "$tag is up to date (binary sha256 ${sum:0:12}), not rebuilding"
    return 0
  fi
  old_id="$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)"
  log "building $tag from $bin (sha256 ${sum:0:12})"
  ctx="$(mktemp -d)"
  copy_with_libs "$bin" "$ctx/rootfs" "$dest"
  {
    echo "FROM scratch"
    echo "COPY rootfs/ /"
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

for w in "${WANT[@]}"; do
  case "$w" in
    tansu)
      TANSU_BIN="$(command -v tansu || true)"
      if [ -z "$TANSU_BIN" ]; then log "tansu not on PATH: run scripts/install-deps.sh first"; exit 1; fi
      build_image tansu colloquy/tansu:local "$TANSU_BIN" /usr/local/bin/tansu "$(cat <<'DF'
ENV PATH=/usr/local/bin TMPDIR=/tmp RUST_LOG=warn LISTENER_URL=tcp://0.0.0.0:9092 STORAGE_ENGINE=memory://tansu/
WORKDIR /data
EXPOSE 9092
ENTRYPOINT ["/usr/local/bin/tansu"]
CMD ["broker"]
DF
)"
      ;;
    redis)
      REDIS_BIN="$(command -v redis-server || true)"
      if [ -z "$REDIS_BIN" ]; then log "redis-server not on PATH: run scripts/install-deps.sh first"; exit 1; fi
      # Debian's redis-server is a symlink to redis-check-rdb, which picks its role from argv[0]:
      # the file must be called redis-server inside the image.
      build_image redis colloquy/redis:local "$REDIS_BIN" /usr/local/bin/redis-server "$(cat <<'DF'
ENV PATH=/usr/local/bin
WORKDIR /data
EXPOSE 6379
CMD ["/usr/local/bin/redis-server", "--port", "6379", "--bind", "0.0.0.0", "--protected-mode", "no", "--save", "", "--appendonly", "no"]
DF
)"
      ;;
  esac
done
