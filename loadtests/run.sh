#!/usr/bin/env bash
# Load-test the gateway with Locust: start it on a free port (model_repo/), run Locust headless
# for a bounded time, stop everything this script started, print a summary.
#
# Usage: loadtests/run.sh [-u USERS] [-r SPAWN_RATE] [-t RUN_TIME] [-s none|step|spike]
#                         [-o OUT_DIR] [-- EXTRA LOCUST ARGS]
# Environment (flags win): USERS (20), SPAWN_RATE (5), RUN_TIME (30s), LOAD_SHAPE (none),
#   OUT_DIR (loadtests/out), MODEL_REPO (model_repo), PYTHON (.venv/bin/python),
#   GATEWAY_URL (test a gateway that is already running instead of starting one),
#   LOAD_WAIT_MAX_S (think time per user, 0.1), any GATEWAY_* setting for the gateway.
# Writes OUT_DIR/locust_stats.csv (+ _history, _failures, _exceptions), OUT_DIR/report.html,
# OUT_DIR/locust.log and OUT_DIR/gateway.log. Exits non-zero when any request failed.
set -euo pipefail
cd "$(dirname "$0")/.."

USERS="${USERS:-20}"
SPAWN_RATE="${SPAWN_RATE:-5}"
RUN_TIME="${RUN_TIME:-30s}"
LOAD_SHAPE="${LOAD_SHAPE:-none}"
OUT_DIR="${OUT_DIR:-loadtests/out}"
MODEL_REPO="${MODEL_REPO:-model_repo}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }
while getopts "u:r:t:s:o:h" opt; do
  case "$opt" in
    u) USERS="$OPTARG" ;;
    r) SPAWN_RATE="$OPTARG" ;;
    t) RUN_TIME="$OPTARG" ;;
    s) LOAD_SHAPE="$OPTARG" ;;
    o) OUT_DIR="$OPTARG" ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ "${1:-}" = "--" ] && shift
export LOAD_SHAPE
mkdir -p "$OUT_DIR"

gateway_pid=""
locust_pid=""
# shellcheck disable=SC2317  # called by the EXIT trap
stop() {
  # only the processes this script started, by PID
  if [ -n "$locust_pid" ] && kill -0 "$locust_pid" 2>/dev/null; then
    kill -TERM "$locust_pid" 2>/dev/null || true
    wait "$locust_pid" 2>/dev/null || true
  fi
  if [ -n "$gateway_pid" ] && kill -0 "$gateway_pid" 2>/dev/null; then
    kill -TERM "$gateway_pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$gateway_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$gateway_pid" 2>/dev/null || true
    wait "$gateway_pid" 2>/dev/null || true
  fi
}
trap stop EXIT
trap 'exit 130' INT TERM

if [ -z "${GATEWAY_URL:-}" ]; then
  port="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  GATEWAY_URL="http://127.0.0.1:$port"
  echo "starting gateway on $GATEWAY_URL (model repo $MODEL_REPO, log $OUT_DIR/gateway.log)"
  "$PYTHON" -m gateway.cli serve --model-repo "$MODEL_REPO" --port "$port" \
    >"$OUT_DIR/gateway.log" 2>&1 &
  gateway_pid=$!
  ready=""
  for _ in $(seq 1 600); do
    kill -0 "$gateway_pid" 2>/dev/null || { echo "gateway exited:" >&2; cat "$OUT_DIR/gateway.log" >&2; exit 1; }
    if "$PYTHON" -c "import urllib.request; urllib.request.urlopen('$GATEWAY_URL/v2/health/ready', timeout=1)" 2>/dev/null; then
      ready=1; break
    fi
    sleep 0.2
  done
  [ -n "$ready" ] || { echo "gateway not ready after 120 s" >&2; exit 1; }
fi

echo "locust: $USERS users, spawn rate $SPAWN_RATE/s, run time $RUN_TIME, shape $LOAD_SHAPE -> $OUT_DIR/"
set +e
"$PYTHON" -m locust -f loadtests/locustfile.py --host "$GATEWAY_URL" --headless \
  -u "$USERS" -r "$SPAWN_RATE" -t "$RUN_TIME" --stop-timeout 5 \
  --csv "$OUT_DIR/locust" --csv-full-history --html "$OUT_DIR/report.html" \
  --only-summary --exit-code-on-error 1 "$@" >"$OUT_DIR/locust.log" 2>&1 &
locust_pid=$!
wait "$locust_pid"
locust_rc=$?
locust_pid=""
set -e

if [ ! -s "$OUT_DIR/locust_stats.csv" ]; then
  echo "locust wrote no stats (exit $locust_rc):" >&2
  tail -n 30 "$OUT_DIR/locust.log" >&2
  exit 1
fi
"$PYTHON" - "$OUT_DIR/locust_stats.csv" "$OUT_DIR/locust_failures.csv" <<'PY'
import csv
import sys
from pathlib import Path

stats, failures = (Path(p) for p in sys.argv[1:3])
rows = list(csv.DictReader(stats.open()))
cols = ("requests", "failures", "req/s", "p50 ms", "p95 ms", "p99 ms")
print(f"\n{'name':<32}" + "".join(f"{c:>10}" for c in cols))
for row in sorted(rows, key=lambda r: (r["Name"] == "Aggregated", r["Name"])):
    values = (
        row["Request Count"], row["Failure Count"], f"{float(row['Requests/s']):.1f}",
        row["50%"], row["95%"], row["99%"],
    )
    print(f"{row['Name']:<32}" + "".join(f"{v:>10}" for v in values))
if failures.exists():
    for row in list(csv.DictReader(failures.open()))[:10]:
        print(f"FAILED {row['Occurrences']}x {row['Name']}: {row['Error'][:160]}")
PY
echo
echo "full results: $OUT_DIR/report.html, $OUT_DIR/locust_stats.csv (locust exit $locust_rc)"
exit "$locust_rc"
