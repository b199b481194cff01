#!/usr/bin/env bash
# Set up (once) and start the gateway on the shipped model_repo/, then serve one prediction.
# Usage: scripts/serve.sh [PORT]   (Ctrl-C stops the gateway)
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${1:-${GATEWAY_PORT:-8000}}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/gateway ]; then
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e .
fi
.venv/bin/gateway serve --model-repo model_repo --port "$PORT" &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null' EXIT INT TERM
for _ in $(seq 1 300); do
  if .venv/bin/python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$PORT/v2/health/ready', timeout=1)" 2>/dev/null; then break; fi
  kill -0 "$pid" 2>/dev/null || { echo "gateway exited" >&2; exit 1; }
  sleep 0.2
done
echo "--- POST /v2/models/simple/infer"
.venv/bin/python - "$PORT" <<'PY'
import json, sys, urllib.request
body = {"inputs": [
    {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": list(range(16))},
    {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16},
]}
req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/v2/models/simple/infer",
                             data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
print(urllib.request.urlopen(req, timeout=10).read().decode())
PY
echo "--- gateway serving on http://127.0.0.1:$PORT (Ctrl-C to stop)"
wait "$pid"
