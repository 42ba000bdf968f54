#!/usr/bin/env bash
# Proves that every PromQL query Colloquy ships is accepted and evaluated by a real Prometheus:
#   - each target expr of dashboards/**/*.json, with Grafana's variables replaced ($__rate_interval
#     and $__interval -> 1m, $__range -> 1h, each dashboard's own template variables -> .*), and each
#     template variable's label_values() query (as the equivalent count by (label) (...));
#   - each line of the ```promql blocks of docs/runbook.md;
#   - every alerting and recording rule of alerts/*.yml, evaluated by Prometheus itself: the rule
#     groups are loaded and each rule must report health "ok" after its first evaluation.
#
# Two modes:
#   alerts/check-queries.sh
#       Starts a throwaway Prometheus on 127.0.0.1:${CHECK_QUERIES_PORT:-19090} with an empty TSDB
#       and the rule files, evaluates everything, stops it. Proves syntax, functions and types.
#   alerts/check-queries.sh --prometheus http://127.0.0.1:9090 [--require-data]
#       Uses a running Prometheus that scrapes the stack (scripts/stack.sh up, under load from
#       colloquy-load, with the prober running) and loads alerts/*.yml. On top of the above it
#       proves the queries return data: every metric name a dashboard, rule or runbook query names
#       must have series there (so a renamed metric or a wrong job fails), and the queries that
#       return nothing are listed. --require-data also fails on those (expect some: failure
#       outcomes, DLQ writes and offset gaps have no series on a healthy stack).
#       --allow-missing NAME (repeatable) tolerates a metric the target does not scrape, e.g.
#       probe_success where no blackbox exporter runs.
#
# Exits non-zero when any query is rejected, any rule is unhealthy, or (live) a metric is missing.
# Needs python3, and prometheus on PATH for the throwaway mode.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PORT="${CHECK_QUERIES_PORT:-19090}"
LIVE=""
REQUIRE_DATA=0
ALLOW_MISSING=""
while [ $# -gt 0 ]; do
  case "$1" in
    --prometheus) LIVE="${2:?--prometheus needs a URL}"; shift 2 ;;
    --require-data) REQUIRE_DATA=1; shift ;;
    --allow-missing) ALLOW_MISSING="$ALLOW_MISSING ${2:?--allow-missing needs a metric name}"; shift 2 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "check-queries: unknown argument $1" >&2; exit 2 ;;
  esac
done

command -v python3 >/dev/null || { echo "check-queries: python3 not on PATH" >&2; exit 2; }

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

if [ -z "$LIVE" ]; then
  command -v prometheus >/dev/null || { echo "check-queries: prometheus not on PATH" >&2; exit 2; }
  ADDR="127.0.0.1:$PORT"
  if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
    echo "check-queries: $ADDR is already in use (set CHECK_QUERIES_PORT)" >&2
    exit 2
  fi
  # Rules are evaluated every second so that each reports its health within the wait below.
  printf 'global:\n  scrape_interval: 1m\n  evaluation_interval: 1s\nrule_files:\n  - %s/alerts/*.yml\nscrape_configs: []\n' \
    "$REPO" >"$TMP/prometheus.yml"
  prometheus --config.file="$TMP/prometheus.yml" --storage.tsdb.path="$TMP/data" \
    --web.listen-address="$ADDR" >"$TMP/prometheus.log" 2>&1 &
  PROM_PID=$!
  LIVE="http://$ADDR"
  for _ in $(seq 1 100); do
    if python3 -c "import urllib.request; urllib.request.urlopen('$LIVE/-/ready', timeout=1)" 2>/dev/null; then
      break
    fi
    if ! kill -0 "$PROM_PID" 2>/dev/null; then
      echo "check-queries: prometheus exited during start-up:" >&2
      tail -n 20 "$TMP/prometheus.log" >&2
      exit 1
    fi
    sleep 0.2
  done
  MODE=throwaway
else
  MODE=live
fi

python3 - "$REPO" "${LIVE%/}" "$MODE" "$REQUIRE_DATA" "$ALLOW_MISSING" <<'PY'
import glob, json, os, re, sys, time, urllib.error, urllib.parse, urllib.request

repo, base, mode, require_data = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
allow_missing = set(sys.argv[5].split())
VARS = {"$__rate_interval": "1m", "${__rate_interval}": "1m", "$__interval": "1m",
        "${__interval}": "1m", "$__range": "1h", "${__range}": "1h"}

def substitute(expr, dash_vars=()):
    for k in sorted(VARS, key=len, reverse=True):
        expr = expr.replace(k, VARS[k])
    for v in sorted(dash_vars, key=len, reverse=True):
        expr = re.sub(r"\$\{" + re.escape(v) + r"(:[a-z]+)?\}|\$" + re.escape(v) + r"\b|\[\[" + re.escape(v) + r"\]\]", ".*", expr)
    return expr

def label_values(q):
    """Grafana's label_values(selector, label) as PromQL that a plain Prometheus evaluates."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*", q, re.S)
    if m:
        return f"count by ({m.group(2)}) ({m.group(1)})"
    m = re.fullmatch(r"\s*label_values\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*", q)
    return f"count by ({m.group(1)}) ({{{m.group(1)}=~\".+\"}})" if m else None

def dashboard_queries(path):
    rel = os.path.relpath(path, repo)
    with open(path) as f:
        dash = json.load(f)
    tvars = [v for v in dash.get("templating", {}).get("list", []) if v.get("type") != "datasource"]
    names = [v["name"] for v in tvars]
    for v in tvars:
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if v.get("type") == "query" and q:
            pq = label_values(q)
            if pq is None:
                yield f"{rel} variable ${v['name']}", substitute(q, names), False
            else:
                yield f"{rel} variable ${v['name']}", substitute(pq, names), True
    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    yield f"{rel} panel {p.get('title')!r} {t.get('refId')}", substitute(t["expr"], names), True
            yield from walk(p.get("panels", []))
    yield from walk(dash.get("panels", []))

def runbook_queries(path):
    text = open(path).read()
    for block in re.findall(r"```promql\n(.*?)```", text, re.S):
        exprs = []
        for line in block.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            line = re.sub(r"\s+#.*$", "", line)  # trailing comment
            if line[0].isspace() and exprs:
                exprs[-1] += " " + line.strip()  # continuation of the previous expression
            else:
                exprs.append(line.strip())
        for e in exprs:
            yield os.path.relpath(path, repo), e, False

def get(path, **params):
    url = f"{base}{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        return json.load(e)

failures = 0
metric_names = set()
TOKEN = re.compile(r"(?<![A-Za-z0-9_:])(colloquy_[a-z0-9_]+|up|probe_success)(?![A-Za-z0-9_:(])")

def names_in(expr):
    out = set()
    for t in TOKEN.findall(expr):
        out.add(t)
    return out

# 1. Dashboard, template-variable and runbook queries.
queries = []
for path in sorted(glob.glob(os.path.join(repo, "dashboards", "**", "*.json"), recursive=True)):
    queries += dashboard_queries(path)
runbook = os.path.join(repo, "docs", "runbook.md")
if os.path.exists(runbook):
    queries += runbook_queries(runbook)

empty = []
for where, q, is_panel in queries:
    if "$" in q:
        print(f"FAIL {where}: unreplaced variable in {q}")
        failures += 1
        continue
    body = get("/api/v1/query", query=q)
    if body.get("status") != "success":
        print(f"FAIL {where}: {q}\n     {body.get('errorType')}: {body.get('error')}")
        failures += 1
        continue
    metric_names |= names_in(q)
    n = len(body["data"]["result"]) if isinstance(body["data"]["result"], list) else 1
    print(f"ok   {where}: {q}" + ("" if mode == "throwaway" else f"  [{n} series]"))
    if n == 0 and is_panel:
        empty.append((where, q))

# 2. Rules, evaluated by Prometheus itself. Wait until every rule has been evaluated once.
rule_files = sorted(glob.glob(os.path.join(repo, "alerts", "*.yml")))
local_rules = set()
for f in rule_files:
    for m in re.finditer(r"^\s*- (alert|record):\s*(\S+)", open(f).read(), re.M):
        local_rules.add(m.group(2))
deadline = time.time() + (30 if mode == "throwaway" else 90)
while True:
    body = get("/api/v1/rules")
    rules = [r for g in body.get("data", {}).get("groups", []) for r in g["rules"]]
    pending = [r for r in rules if r.get("health") == "unknown"]
    if rules and not pending or time.time() > deadline:
        break
    time.sleep(1)
loaded = {r["name"] for r in rules}
for name in sorted(local_rules - loaded):
    print(f"FAIL rule {name}: in alerts/*.yml but not loaded by the Prometheus at {base}")
    failures += 1
checked_rules = 0
for r in rules:
    if r["name"] not in local_rules:
        continue
    checked_rules += 1
    kind = "alert" if r["type"] == "alerting" else "record"
    if r.get("health") != "ok":
        print(f"FAIL {kind} {r['name']}: health {r.get('health')}: {r.get('lastError')}\n     {r['query']}")
        failures += 1
    else:
        metric_names |= names_in(r["query"])
        print(f"ok   {kind} {r['name']}")

# 3. Live: every metric the queries name must have series (histograms: their _bucket/_count).
missing = []
if mode == "live":
    for name in sorted(metric_names - allow_missing):
        body = get("/api/v1/query", query=f'count({{__name__=~"{name}(_bucket|_count|_sum)?"}})')
        if body.get("status") != "success" or not body["data"]["result"]:
            missing.append(name)
    for name in missing:
        print(f"FAIL metric {name}: named by a query but has no series at {base}")
    failures += len(missing)
    for where, q in empty:
        print(f"{'FAIL' if require_data else 'empty'} {where}: {q}")
    if require_data:
        failures += len(empty)

print(f"\n{len(queries)} queries, {checked_rules} rules, {failures} failures"
      + ("" if mode == "throwaway" else f", {len(metric_names)} metrics checked for data, {len(empty)} panel queries without data"))
sys.exit(1 if failures or not queries or not checked_rules else 0)
PY
