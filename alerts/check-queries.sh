#!/usr/bin/env bash
# Proves that every PromQL query Colloquy ships parses and evaluates in a real Prometheus:
# each target expr of dashboards/**/*.json (Grafana variables replaced: $__rate_interval and
# $__interval -> 1m, $__range -> 1h) and each line of the ```promql blocks of docs/runbook.md.
# Alert and recording rules are covered by `promtool check rules` and their unit tests.
#
# Starts a throwaway Prometheus on 127.0.0.1:19090 with an empty TSDB in a temp dir, sends each
# query to /api/v1/query, stops it, and exits non-zero when any query is rejected.
# Usage: alerts/check-queries.sh          (needs prometheus and python3 on PATH)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PORT="${CHECK_QUERIES_PORT:-19090}"
ADDR="127.0.0.1:$PORT"

command -v prometheus >/dev/null || { echo "check-queries: prometheus not on PATH" >&2; exit 2; }
command -v python3 >/dev/null || { echo "check-queries: python3 not on PATH" >&2; exit 2; }
if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
  echo "check-queries: $ADDR is already in use (set CHECK_QUERIES_PORT)" >&2
  exit 2
fi

TMP="$(mktemp -d)"
PROM_PID=""
cleanup() {
  if [ -n "$PROM_PID" ] && kill -0 "$PROM_PID" 2>/dev/null; then
    kill "$PROM_PID" 2>/dev/null || true
    wait "$PROM_PID" 2>/dev/null || true
  fi
  rm -rf "$TMP"
}
trap cleanup EXIT

printf 'global:\n  scrape_interval: 1m\nscrape_configs: []\n' >"$TMP/prometheus.yml"
prometheus --config.file="$TMP/prometheus.yml" --storage.tsdb.path="$TMP/data" \
  --web.listen-address="$ADDR" >"$TMP/prometheus.log" 2>&1 &
PROM_PID=$!

for _ in $(seq 1 100); do
  if python3 -c "import urllib.request; urllib.request.urlopen('http://$ADDR/-/ready', timeout=1)" 2>/dev/null; then
    break
  fi
  if ! kill -0 "$PROM_PID" 2>/dev/null; then
    echo "check-queries: prometheus exited during start-up:" >&2
    tail -n 20 "$TMP/prometheus.log" >&2
    exit 1
  fi
  sleep 0.2
done

python3 - "$REPO" "$ADDR" <<'PY'
import glob, json, os, re, sys, urllib.error, urllib.parse, urllib.request

repo, addr = sys.argv[1], sys.argv[2]
VARS = {"$__rate_interval": "1m", "${__rate_interval}": "1m", "$__interval": "1m",
        "${__interval}": "1m", "$__range": "1h", "${__range}": "1h"}

def substitute(expr):
    for k in sorted(VARS, key=len, reverse=True):
        expr = expr.replace(k, VARS[k])
    return expr

def dashboard_queries(path):
    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    yield f"{os.path.relpath(path, repo)} panel {p.get('title')!r} {t.get('refId')}", t["expr"]
            yield from walk(p.get("panels", []))
    with open(path) as f:
        yield from walk(json.load(f).get("panels", []))

def runbook_queries(path):
    text = open(path).read()
    for block in re.findall(r"```promql\n(.*?)```", text, re.S):
        exprs = []
        for line in block.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line[0].isspace() and exprs:
                exprs[-1] += " " + line.strip()  # continuation of the previous expression
            else:
                exprs.append(line.strip())
        for e in exprs:
            yield f"{os.path.relpath(path, repo)}", e

queries = []
for path in sorted(glob.glob(os.path.join(repo, "dashboards", "**", "*.json"), recursive=True)):
    queries += dashboard_queries(path)
runbook = os.path.join(repo, "docs", "runbook.md")
if os.path.exists(runbook):
    queries += runbook_queries(runbook)

failures = 0
for where, expr in queries:
    q = substitute(expr)
    if "$" in q:
        print(f"FAIL {where}: unreplaced variable in {q}")
        failures += 1
        continue
    url = f"http://{addr}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
    except urllib.error.HTTPError as e:
        body = json.load(e)
    if body.get("status") == "success":
        print(f"ok   {where}: {q}")
    else:
        print(f"FAIL {where}: {q}\n     {body.get('errorType')}: {body.get('error')}")
        failures += 1
print(f"\n{len(queries)} queries, {failures} rejected")
sys.exit(1 if failures or not queries else 0)
PY
