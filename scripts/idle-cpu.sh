#!/usr/bin/env bash
# CPU of every process scripts/stack.sh started (each pid with its descendants: PostgreSQL's
# backends, nginx's workers), as % of one core over SECS seconds (default 30), and the total.
# Usage: scripts/stack.sh up && sleep 20 && scripts/idle-cpu.sh [SECS]
set -euo pipefail
SECS="${1:-30}"
PIDS="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/run/pids"
ls "$PIDS"/*.pid >/dev/null 2>&1 || { echo "no stack running (no $PIDS/*.pid)" >&2; exit 1; }

tree() { local p=$1 c; echo "$p"; for c in $(cat /proc/"$p"/task/*/children 2>/dev/null); do tree "$c"; done; }
# utime + stime (fields 14 and 15 of /proc/PID/stat; the command name may contain spaces).
ticks() { awk '{ s = $0; sub(/^.*\) /, "", s); split(s, f, " "); print f[12] + f[13] }' "/proc/$1/stat" 2>/dev/null || echo 0; }
sum() { local t=0 p; for p in $(tree "$1"); do t=$((t + $(ticks "$p"))); done; echo "$t"; }

declare -A before
for f in "$PIDS"/*.pid; do before[$(basename "$f" .pid)]=$(sum "$(cat "$f")"); done
sleep "$SECS"
hz=$(getconf CLK_TCK) total=0
for f in "$PIDS"/*.pid; do
  n=$(basename "$f" .pid); d=$(( $(sum "$(cat "$f")") - ${before[$n]} )); total=$((total + d))
  awk -v n="$n" -v d="$d" -v hz="$hz" -v s="$SECS" 'BEGIN { printf "%-13s %5.1f %%\n", n, 100 * d / hz / s }'
done
awk -v d="$total" -v hz="$hz" -v s="$SECS" 'BEGIN { printf "%-13s %5.1f %%\n", "TOTAL", 100 * d / hz / s }'
