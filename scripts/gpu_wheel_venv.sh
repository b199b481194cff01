#!/usr/bin/env bash
# A scratch virtual environment holding only the onnxruntime-gpu package, for the tests that run
# the real GPU build on a machine without a GPU (tests/test_gpu.py, test_gpu_wheel_*).
#
# onnxruntime and onnxruntime-gpu install the same `onnxruntime` module, so they cannot share the
# project's .venv. This one gets onnxruntime-gpu alone (--no-deps, no CUDA libraries: a few
# hundred MB, ~10 s); the tests start its Python with the project's site-packages behind its own,
# so `onnxruntime` is the GPU build and everything else comes from .venv.
#
# Usage: scripts/gpu_wheel_venv.sh [DIR] [CUDA_MAJOR]  (defaults: build/venv-gpu-wheel, 12)
# Prints the venv's python on its last line:
#   export GATEWAY_GPU_WHEEL_PYTHON=$(scripts/gpu_wheel_venv.sh | tail -n 1)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-build/venv-gpu-wheel}  # build/ is git-ignored
major=${2:-12}
PY=${PYTHON:-python3}
# The pins per CUDA major live in gateway/backends/onnxruntime.py (CUDA_BUILDS); read them from
# there without importing onnxruntime.
version=$("$PY" - "$major" <<'EOF'
import ast, sys
tree = ast.parse(open("gateway/backends/onnxruntime.py").read())
for node in tree.body:
    if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "CUDA_BUILDS":
        print(ast.literal_eval(node.value)[int(sys.argv[1])][0])
        break
else:
    sys.exit("CUDA_BUILDS not found in gateway/backends/onnxruntime.py")
EOF
)
installed=$("$dir/bin/python" -m pip show onnxruntime-gpu 2>/dev/null | sed -n 's/^Version: //p' || true)
if [ "$installed" != "$version" ]; then
  rm -rf "$dir"
  "$PY" -m venv "$dir"
  "$dir/bin/pip" install -q --disable-pip-version-check --no-deps "onnxruntime-gpu==$version" >&2
fi
echo "$(cd "$dir" && pwd)/bin/python"
