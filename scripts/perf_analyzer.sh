#!/usr/bin/env bash
# Obtain Triton's perf_analyzer reproducibly and print the path of a wrapper that runs it.
#
# PyPI's `perf_analyzer` package is an empty placeholder; the tritonclient 2.41.0 wheel carries the
# real binary. It links libb64 (Debian's libb64-0d, installed here when missing and we are root) and
# libcudart.so.12 (taken from the nvidia-cuda-runtime-cu12 wheel); no GPU is needed for HTTP, gRPC
# or system shared memory runs. Everything lands in .cache/perf_analyzer (git-ignored), once.
#
# Usage: PA=$(scripts/perf_analyzer.sh | tail -n 1); "$PA" -m simple -u 127.0.0.1:8000 ...
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${PERF_ANALYZER_DIR:-$PWD/.cache/perf_analyzer}"
WRAPPER="$DIR/perf_analyzer"
TRITONCLIENT_VERSION=2.41.0
CUDART_VERSION=12.9.79
PY="${PYTHON:-python3}"

if [ ! -x "$WRAPPER" ]; then
  mkdir -p "$DIR/bin" "$DIR/lib" "$DIR/wheels"
  "$PY" -m pip download -q --no-deps -d "$DIR/wheels" \
    "tritonclient==$TRITONCLIENT_VERSION" "nvidia-cuda-runtime-cu12==$CUDART_VERSION" >&2
  "$PY" - "$DIR" "$TRITONCLIENT_VERSION" <<'EOF'
import glob, os, sys, zipfile
d, version = sys.argv[1], sys.argv[2]
members = {
    glob.glob(f"{d}/wheels/tritonclient-{version}-*.whl")[0]:
        (f"tritonclient-{version}.data/data/bin/perf_analyzer", f"{d}/bin/perf_analyzer"),
    glob.glob(f"{d}/wheels/nvidia_cuda_runtime_cu12-*.whl")[0]:
        ("nvidia/cuda_runtime/lib/libcudart.so.12", f"{d}/lib/libcudart.so.12"),
}
for wheel, (member, target) in members.items():
    with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(target, "wb") as dst:
        dst.write(src.read())
os.chmod(f"{d}/bin/perf_analyzer", 0o755)
EOF
  rm -rf "$DIR/wheels"
  cat >"$WRAPPER" <<EOF
#!/usr/bin/env bash
export LD_LIBRARY_PATH="$DIR/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$DIR/bin/perf_analyzer" "\$@"
EOF
  chmod +x "$WRAPPER"
fi

if ! ldconfig -p 2>/dev/null | grep 'libb64\.so\.0d' >/dev/null; then  # no -q: an early exit would SIGPIPE ldconfig under pipefail
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -q libb64-0d >&2 || { apt-get update -q >&2 && apt-get install -y -q libb64-0d >&2; }
  else
    echo "perf_analyzer needs libb64.so.0d: apt-get install libb64-0d" >&2
    exit 1
  fi
fi
echo "$WRAPPER"
