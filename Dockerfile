# syntax=docker/dockerfile:1
#
# gateway image. Build from the repository root:
#   CPU: docker build -t gateway:0.1.0 .
#   GPU, CUDA 12 (driver >= 525.60.13):
#     docker build -t gateway:0.1.0-gpu --build-arg ORT_PACKAGE="onnxruntime-gpu[cuda,cudnn]==1.26.0" .
#   GPU, CUDA 13 (driver >= 580.65.06; Turing or newer GPUs, compute capability >= 7.5):
#     docker build -t gateway:0.1.0-gpu --build-arg ORT_PACKAGE="onnxruntime-gpu[cuda,cudnn]==1.31.1" .
#
# ORT_PACKAGE is the one ONNX Runtime distribution the image ships, as a pip requirement: a name,
# optionally extras and a version (it is combined with pyproject.toml's bound on onnxruntime).
# onnxruntime-gpu must be pinned (`==`): each release is built for one CUDA major (1.26.0 is the
# last for CUDA 12; 1.27.0 and later are CUDA 13 builds), and an unpinned one moves to a new major
# that the nodes' driver may not run. The pins above are gateway/backends/onnxruntime.py's
# CUDA_BUILDS (tests/test_deploy.py keeps them in step). The `[cuda,cudnn]` extras bring CUDA and
# cuDNN as wheels, so the GPU image needs no CUDA base image; the driver comes from the host
# through the NVIDIA container toolkit (`--gpus all`, or `nvidia.com/gpu` in Kubernetes) and must
# support the CUDA major of the build. Plain `onnxruntime-gpu==...` (no extras) builds too, for a
# PYTHON_IMAGE that already carries CUDA and cuDNN. A GPU image on a host without a usable GPU does
# not quietly serve on the CPU: see the README's GPU section (execution_provider).
#
# PYTHON_IMAGE is the base of both stages: the runtime stage copies the builder's virtual
# environment, whose interpreter links point into the base image, so the two must be the same.
#
# scripts/image_smoke.sh runs the builder stage's commands in a throwaway venv, and
# tests/test_deploy.py checks that the two stay the same.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder

ARG ORT_PACKAGE=onnxruntime
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv "$VIRTUAL_ENV"

# Dependencies first, in their own layer, so that a source change does not reinstall them.
# `pip install .` cannot choose the ONNX Runtime flavour: pyproject.toml depends on `onnxruntime`,
# and onnxruntime-gpu is a different distribution that installs the same `onnxruntime` module, so
# installing both leaves whichever was unpacked last on disk and `pip uninstall onnxruntime`
# afterwards deletes files the GPU package shares with it. Instead the dependency list is read from
# pyproject.toml with the `onnxruntime` requirement renamed to ORT_PACKAGE (version bound kept), those
# are installed, and the gateway itself goes in with --no-deps. The last check fails the build
# unless exactly one ONNX Runtime distribution, the chosen one, ended up installed.
COPY pyproject.toml ./
RUN python -c "import os, re, tomllib; \
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

COPY . .
RUN pip install --no-cache-dir --no-deps . \
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


FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="gateway" \
      org.opencontainers.image.description="Open Inference Protocol (KServe v2) gateway for ONNX Runtime and Triton hosts" \
      org.opencontainers.image.licenses="Apache-2.0"

# Host and port come from the environment rather than CMD flags so that they can be changed
# without restating the command (flags would override GATEWAY_PORT), and so the HEALTHCHECK
# below probes the port the server really listens on.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GATEWAY_MODEL_REPO=/models \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8000

# uid/gid 1000, numeric in USER below so Kubernetes' runAsNonRoot can verify it.
# /cache is where an edge replica keeps what it fetched from its origin (--cache-dir /cache).
RUN groupadd --gid 1000 gateway \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/gateway \
        --shell /usr/sbin/nologin gateway \
    && mkdir -p /models /cache \
    && chown 1000:1000 /models /cache

COPY --from=builder /opt/venv /opt/venv
# The shipped models are the volume's default content: Docker copies them into a new, empty
# named volume mounted at /models; a bind mount or a Kubernetes volume replaces them.
COPY --chown=1000:1000 model_repo/ /models/
# ONNX Runtime's CUDA provider finds libcudart, libcublas, libcudnn... by soname only (no RUNPATH),
# so the directories the nvidia-* wheels put them in go into the dynamic loader's cache. In the CPU
# image there are none and the file stays empty. Then the console script must start.
RUN python -c "import pathlib, sysconfig; \
        site = pathlib.Path(sysconfig.get_paths()['platlib']); \
        dirs = sorted(str(p) for p in site.glob('nvidia/*/lib')); \
        pathlib.Path('/etc/ld.so.conf.d/zz-pip-nvidia.conf').write_text(''.join(d + '\n' for d in dirs))" \
    && ldconfig \
    && gateway --help > /dev/null

VOLUME ["/models"]
USER 1000:1000
WORKDIR /home/gateway
# 8000 HTTP/REST (metrics on /metrics), 8001 gRPC when --grpc-port / GATEWAY_GRPC_PORT is set.
EXPOSE 8000 8001

# No curl in python:slim: the probe uses the interpreter the image already has. urlopen raises on
# refused connections and on any non-2xx answer, so a 503 "not ready" exits 1.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('GATEWAY_PORT', '8000') + '/v2/health/ready', timeout=4)"]

ENTRYPOINT ["gateway"]
CMD ["serve"]
