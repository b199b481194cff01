#!/usr/bin/env bash
# Fetch Triton's Python client examples that tests/test_triton_examples.py runs, unchanged, at a
# pinned tag of triton-inference-server/client (BSD-3-Clause, NVIDIA), into .cache/triton_examples
# (git-ignored: third-party test inputs, not the project's code). Needs network once.
#
# Usage: scripts/triton_examples.sh [DIR]; then
#        TRITON_EXAMPLES_DIR=DIR python -m pytest tests/test_triton_examples.py
set -euo pipefail
cd "$(dirname "$0")/.."
TAG="${TRITON_CLIENT_TAG:-r24.10}"  # Triton 2.51, the tritonserver the tests run
DIR="${1:-$PWD/.cache/triton_examples}"
BASE="https://raw.githubusercontent.com/triton-inference-server/client/$TAG/src/python/examples"
mkdir -p "$DIR"
for name in \
  simple_http_infer_client.py simple_grpc_infer_client.py \
  simple_http_async_infer_client.py simple_grpc_async_infer_client.py \
  simple_http_aio_infer_client.py simple_grpc_aio_infer_client.py \
  simple_http_string_infer_client.py simple_grpc_string_infer_client.py \
  simple_http_health_metadata.py simple_grpc_health_metadata.py \
  simple_http_model_control.py simple_grpc_model_control.py \
  simple_http_shm_client.py simple_grpc_shm_client.py \
  simple_http_shm_string_client.py simple_grpc_shm_string_client.py; do
  [ -s "$DIR/$name" ] || curl -fsSL "$BASE/$name" -o "$DIR/$name"
done
echo "$TAG" > "$DIR/TAG"
echo "$DIR"
