#!/usr/bin/env bash
# Smoke test of the image's install recipe without Docker.
#
# Runs the Dockerfile's builder-stage commands, unchanged, in a fresh virtual environment under a
# temp dir (CPU ONNX Runtime unless ORT_PACKAGE says otherwise) and the runtime stage's check,
# then starts `gateway serve` from that venv on a free loopback port, waits for
# /v2/health/ready, sends one inference to the `simple` model with curl and prints the answer.
# On exit, however it exits, the gateway is stopped by its PID and the temp dir removed.
#
# Usage: scripts/image_smoke.sh [--install-only]
#   --install-only   stop after the builder stage's install steps
# Environment:
#   PYTHON            interpreter for the venv (default: python3.11, else python3; needs >= 3.11)
#   ORT_PACKAGE       as the Dockerfile's build arg (default: onnxruntime); e.g.
#                     "onnxruntime-gpu==1.26.0" checks the GPU recipe without the CUDA wheels
#                     (the gateway then serves on the CPU: execution_provider stays auto)
#   READY_TIMEOUT_S   how long to wait for /v2/health/ready (default: 60)
#
# tests/test_deploy.py checks that the pip and python commands below match the Dockerfile's.
set -euo pipefail

usage() { echo "usage: $0 [--install-only]" >&2; exit 2; }
install_only=0
case "${1:-}" in
    --install-only) install_only=1 ;;
    "") ;;
    *) usage ;;
esac
[[ $# -le 1 ]] || usage

repo_root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
export ORT_PACKAGE=${ORT_PACKAGE:-onnxruntime}
ready_timeout_s=${READY_TIMEOUT_S:-60}

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "image_smoke: $PYTHON is older than Python 3.11" >&2
    exit 2
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/gateway-smoke.XXXXXX")
server_pid=""
cleanup() {
    if [[ -n $server_pid ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf -- "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step() { printf '\n== %s\n' "$*"; }

# ---------------------------------------------------------------- builder stage
step "builder: venv in $work/venv with $PYTHON, ORT_PACKAGE=$ORT_PACKAGE"
export VIRTUAL_ENV="$work/venv"
export PATH="$VIRTUAL_ENV/bin:$PATH"
export PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p "$work/src"
cd "$work/src"
"$PYTHON" -m venv "$VIRTUAL_ENV"

# COPY pyproject.toml ./
cp "$repo_root/pyproject.toml" .
step "builder: dependencies (onnxruntime requirement renamed to ORT_PACKAGE)"
python -c "import os, re, tomllib; \
        ort = os.environ['ORT_PACKAGE']; \
        deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
        pat = re.compile('onnxruntime(?![A-Za-z0-9._-])', re.I); \
        spec = re.compile(' *[<>=!~]'); \
        swap = lambda rest: ort + (',' if spec.search(ort) and spec.match(rest) else '') + rest; \
        assert any(pat.match(d) for d in deps), 'pyproject.toml lists no onnxruntime dependency'; \
        gpu = re.match('onnxruntime[-_.]gpu(?![A-Za-z0-9._-])', ort, re.I); \
        assert not gpu or '==' in ort, 'pin onnxruntime-gpu (==) to the build for your CUDA major: see the Dockerfile header'; \
        print('\n'.join(swap(d[pat.match(d).end():]) if pat.match(d) else d for d in deps))" \
        > requirements.txt \
    && pip install --no-cache-dir -r requirements.txt
cat requirements.txt

# COPY . .  (what .dockerignore lets through)
for item in pyproject.toml README.md LICENSE gateway model_repo; do
    if [[ -e $repo_root/$item ]]; then
        cp -R "$repo_root/$item" .
    fi
done
find . \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +

step "builder: the gateway itself, without dependencies; then the ONNX Runtime check"
pip install --no-cache-dir --no-deps . \
    && python -c "import importlib.metadata as md, os, re; \
        norm = lambda name: re.sub('[-_.]+', '-', name).lower(); \
        want = norm(re.match('[A-Za-z0-9._-]+', os.environ['ORT_PACKAGE']).group()); \
        flavours = {'onnxruntime', 'onnxruntime-gpu', want}; \
        have = sorted({norm(d.metadata['Name']) for d in md.distributions()} & flavours); \
        assert have == [want], f'want exactly {want}, found {have}'; \
        import onnxruntime; \
        from onnxruntime.capi import build_and_package_info as info; \
        cuda = getattr(info, 'cuda_version', '') or 'none'; \
        print(want, onnxruntime.__version__, 'CUDA', cuda, onnxruntime.get_available_providers())"

if [[ $install_only == 1 ]]; then
    step "install-only: done"
    exit 0
fi

# ---------------------------------------------------------------- runtime stage
step "runtime: console script"
gateway --help > /dev/null

port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
base="http://127.0.0.1:$port"
step "serve: gateway serve --model-repo model_repo on $base"
gateway serve --model-repo model_repo --host 127.0.0.1 --port "$port" > "$work/gateway.log" 2>&1 &
server_pid=$!

deadline=$((SECONDS + ready_timeout_s))
until curl -fsS -o /dev/null "$base/v2/health/ready" 2>/dev/null; do
    if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "image_smoke: gateway exited before it was ready; its log:" >&2
        cat "$work/gateway.log" >&2
        exit 1
    fi
    if ((SECONDS >= deadline)); then
        echo "image_smoke: not ready after ${ready_timeout_s}s; log tail:" >&2
        tail -n 50 "$work/gateway.log" >&2
        exit 1
    fi
    sleep 0.5
done
echo "ready"

step "infer: simple, INPUT0 = 0..15, INPUT1 = 1 (INT32 [1,16])"
request='{"inputs": [
  {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]},
  {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]}
]}'
if ! response=$(curl -sS --fail-with-body -H 'Content-Type: application/json' \
        --data "$request" "$base/v2/models/simple/infer"); then
    echo "image_smoke: inference failed: $response" >&2
    tail -n 50 "$work/gateway.log" >&2
    exit 1
fi
echo "$response"

step "stop: gateway (pid $server_pid)"
kill -TERM "$server_pid"
wait "$server_pid" || true
server_pid=""
echo "image_smoke: ok"
