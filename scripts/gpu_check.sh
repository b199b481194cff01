#!/usr/bin/env bash
# The GPU check (issue 24), for a machine with an NVIDIA GPU; a few minutes.
#
# 1. a virtual environment under a temp dir (--system-site-packages: a machine image's numpy,
#    aiohttp and CUDA/cuDNN wheels are used as they are), with onnxruntime-gpu pinned for the
#    CUDA major the driver runs (gateway/backends/onnxruntime.py CUDA_BUILDS), its [cuda,cudnn]
#    extras, and the gateway's other dependencies; the gateway itself runs from this checkout;
# 2. bench/gpu.py: serves a copy of model_repo plus the `cnn` model with
#    execution_provider = "cuda" and strict readiness, fails unless every model's
#    parameters.providers[0] is CUDAExecutionProvider, then measures in-process ONNX Runtime CUDA
#    and the gateway (binary HTTP, concurrency sweep) in the same run and prints the table.
#
# Usage: scripts/gpu_check.sh [--cuda-major 12|13] [--wheelhouse DIR] [--cpu] [-- BENCH ARGS...]
#   --cuda-major   which onnxruntime-gpu build [from nvidia-smi: driver >= 580 -> 13, else 12]
#   --wheelhouse   install from the wheels in DIR only (pip --no-index), for machines without
#                  network access; it needs onnxruntime-gpu and whatever of the gateway's
#                  dependencies the machine lacks (starlette, uvicorn, orjson, tritonclient...)
#   --cpu          the same run on the CPU with the project's .venv, nothing installed: checks
#                  this script and bench/gpu.py on a machine without a GPU
#   BENCH ARGS     passed to bench/gpu.py (e.g. --duration-s 4 --concurrency 1 32)
# Results: bench/results/gpu.md and gpu.json (commit them with the command line), and, when $OUT
# is set, copies there together with the gateway's log and nvidia-smi's output.
#
# Notes for the lent device machines: their image has driver 580 and CUDA 13 libraries as pip
# wheels (so --cuda-major 13), Python 3.12, and no network; the onnxruntime-gpu wheel (~255 MB)
# is larger than one call may carry (64 MiB), so it has to arrive in parts over consecutive calls
# while the machine stays warm (`split -b 60m`, then `cat` the parts into the wheelhouse).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

major="" wheelhouse="" cpu=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cuda-major) major=$2; shift 2 ;;
    --wheelhouse) wheelhouse=$(cd "$2" && pwd); shift 2 ;;
    --cpu) cpu=1; shift ;;
    --) shift; break ;;
    *) echo "usage: $0 [--cuda-major 12|13] [--wheelhouse DIR] [--cpu] [-- BENCH ARGS...]" >&2
       exit 2 ;;
  esac
done

work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf -- "$work"' EXIT
results="$root/bench/results"
step() { printf '\n== %s\n' "$*"; }

if [ "$cpu" = 1 ]; then
  step "CPU run with $root/.venv (no install)"
  PYTHONPATH="$root" "$root/.venv/bin/python" bench/gpu.py --provider cpu \
    --out-dir "$work/results" --log "$work/gateway.log" "$@"
  exit 0
fi

step "GPU and driver"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$work/nvidia-smi.txt"
driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n 1)
if [ -z "$major" ]; then
  major=12
  if [ "${driver%%.*}" -ge 580 ]; then major=13; fi
fi
read -r version min_driver < <(python3 - "$major" <<'EOF'
import ast, sys
tree = ast.parse(open("gateway/backends/onnxruntime.py").read())
builds = next(
    ast.literal_eval(n.value) for n in tree.body
    if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", "") == "CUDA_BUILDS"
)
print(*builds[int(sys.argv[1])])
EOF
)
echo "driver $driver; CUDA $major build: onnxruntime-gpu==$version (needs driver >= $min_driver)"

step "venv in $work/venv: onnxruntime-gpu[cuda,cudnn]==$version and the gateway's dependencies"
python3 -m venv --system-site-packages "$work/venv"
py="$work/venv/bin/python"
pip_from=()
if [ -n "$wheelhouse" ]; then pip_from=(--no-index --find-links "$wheelhouse"); fi
# pyproject.toml's dependencies without onnxruntime (the GPU build replaces it), as the
# Dockerfile does it.
"$py" - > "$work/requirements.txt" <<'EOF'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if not re.match("onnxruntime(?![A-Za-z0-9._-])", d, re.I)))
EOF
"$py" -m pip install -q --disable-pip-version-check "${pip_from[@]}" \
  "onnxruntime-gpu[cuda,cudnn]==$version" -r "$work/requirements.txt"
"$py" -c "
from onnxruntime.capi import build_and_package_info as info
import onnxruntime
assert info.package_name == 'onnxruntime-gpu', info.package_name
print(info.package_name, onnxruntime.__version__, 'CUDA', info.cuda_version,
      onnxruntime.get_available_providers())"

step "bench/gpu.py --provider cuda $*"
status=0
PYTHONPATH="$root" "$py" bench/gpu.py --provider cuda --out-dir "$results" \
  --log "$work/gateway.log" "$@" || status=$?
if [ -n "${OUT:-}" ]; then
  cp -f "$work/nvidia-smi.txt" "$work/gateway.log" "$OUT/" 2>/dev/null || true
  if [ "$status" = 0 ]; then cp -f "$results/gpu.md" "$results/gpu.json" "$OUT/"; fi
fi
if [ "$status" != 0 ]; then
  echo "gpu_check: bench/gpu.py failed ($status); the gateway's log:" >&2
  tail -n 60 "$work/gateway.log" >&2 || true
fi
exit "$status"
