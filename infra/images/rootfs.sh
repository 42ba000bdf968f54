#!/usr/bin/env bash
# Assembles a minimal root filesystem for a `FROM scratch` image: each binary at the path asked
# for, every shared library `ldd` lists for it (and the dynamic loader) at its own absolute path,
# a world-writable /tmp, minimal /etc/{passwd,group,nsswitch.conf}, and the system CA bundle when
# asked (TLS to Kafka, Redis or the LLM API).
#
# Used by infra/images/build.sh (local images from this machine's binaries) and by the builder
# stage of infra/Dockerfile (images from binaries built in the rust image), so both produce the
# same layout.
#
# Usage: rootfs.sh ROOT [--ca-certs] [--dir=PATH[:UID]]... SRC:DEST...
#   SRC:DEST   copy binary SRC (symlinks resolved, debug info stripped) to ROOT/DEST, with its libraries
#   --ca-certs copy /etc/ssl/certs/ca-certificates.crt
#   --dir=P[:U] create ROOT/P; with U, a dir for uid:gid U:U (a non-root user's data) instead:
#              ROOT.owned/P, listed as "P U" in ROOT.owned.list for the image's `COPY --chown`
set -euo pipefail

die() { printf '[rootfs] %s\n' "$*" >&2; exit 1; }

[ "$#" -ge 2 ] || die "usage: rootfs.sh ROOT [--ca-certs] [--dir PATH[:UID]]... SRC:DEST..."
root="$1"; shift
mkdir -p "$root"

copy_libs() {
  local src="$1" lib
  while read -r lib; do
    [ -n "$lib" ] || continue
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done < <(ldd "$src" | awk '/=> \//{print $3} /^[[:space:]]*\/[^ ]+/{print $1}' | sort -u)
}

for a in "$@"; do
  case "$a" in
    --ca-certs)
      [ -f /etc/ssl/certs/ca-certificates.crt ] || die "no /etc/ssl/certs/ca-certificates.crt on this machine"
      mkdir -p "$root/etc/ssl/certs"
      cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
      ;;
    --dir) die "--dir takes its value after '=': --dir=PATH[:UID]" ;;
    --dir=*)
      spec="${a#--dir=}"; path="${spec%%:*}"; uid=""
      [ "$spec" = "$path" ] || uid="${spec#*:}"
      if [ -z "$uid" ]; then
        mkdir -p "$root$path"
      else
        # A Dockerfile COPY makes every file root's, so an owned dir cannot travel inside ROOT:
        # it goes to ROOT.owned/ and into ROOT.owned.list, for `COPY --chown=U:U` (build.sh).
        mkdir -p "$root.owned$path"
        printf '%s %s\n' "$path" "$uid" >>"$root.owned.list"
      fi
      ;;
    *:*)
      src="${a%%:*}"; dest="${a#*:}"
      [ -x "$src" ] || die "$src is not an executable file"
      mkdir -p "$root$(dirname "$dest")"
      cp -L "$src" "$root$dest"
      # Images carry no debug info (a debug build's is ~90% of the file); symbolize with the
      # original binary.
      if command -v strip >/dev/null 2>&1; then strip --strip-debug "$root$dest"; fi
      chmod 0755 "$root$dest"
      copy_libs "$src"
      ;;
    *) die "unknown argument: $a" ;;
  esac
done

# glibc >= 2.34 has nss files/dns built in; give it the config files it reads.
mkdir -p "$root/etc" "$root/tmp"
chmod 1777 "$root/tmp"
printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
printf 'root:x:0:0:root:/:/nonexistent\nnobody:x:65534:65534:nobody:/:/nonexistent\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
