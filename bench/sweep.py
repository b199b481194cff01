"""Latency against throughput, side by side: the gateway, standalone Triton and in-process ORT.

In one run, for each model (``simple``, ``mlp``, ``resnet50``, ``bert_encoder``; the last two
built on demand by ``scripts/build_models.py``, see ``ensure_heavy``):

1. **in-process ONNX Runtime**: ``session.run`` at batch 1, 2, 4, ... ``max_batch_size``
   (``harness.measure_in_process``), before and after the sweep: the best items/s and the
   lowest batch-1 latency of the two passes are the limits;
2. **perf_analyzer** (``scripts/perf_analyzer.sh``) at concurrency 1, 2, 4, ... against
   - the gateway (HTTP binary tensors, gRPC, and system shared memory when ``/v2`` lists
     ``system_shared_memory``), and
   - standalone ``tritonserver`` (``gateway.testing.tritonserver``, python backend running the
     same ONNX file through ONNX Runtime, the model's own config and dynamic batching) over the
     same protocols; both serve throughout, and at each point the two are measured one right
     after the other, in turns which goes first;
3. **memory**: the RSS a gateway gains by loading each model (a gateway with that model alone
   against one with only ``simple``, both after one request) next to what an ONNX Runtime
   session of it alone adds to a bare Python process (run at the gateway's warm-up batch sizes);
4. **copies** (``resnet50``): a gateway (this script, ``--counted``) with an LD_PRELOAD shim
   that counts memcpy/memmove bytes on its event-loop thread answers sequential requests: bytes
   copied per request, in units of the request's input bytes (needs a C compiler).

With ``--repeat N`` every point is measured N times, in N passes over all the points, and the
goals are judged on the median of the N per-repeat ratios, with their range and the number of
repeats that met each (section "repeats" below); ``--only`` measures just the points named.

Writes ``sweep.md`` (tables, goals as ratios), ``sweep.json`` and one latency-vs-throughput plot
per model (``sweep-<model>.png``, matplotlib from the ``bench`` extra) to ``--out-dir``.

    .venv/bin/python bench/sweep.py                         # the reduced sweep (~15 min)
    .venv/bin/python bench/sweep.py --quick --out-dir /tmp/sweep   # errors only (~3 min)
    .venv/bin/python bench/sweep.py --only mlp:http:1,mlp:http:64 --repeat 5 --out-dir /tmp/s
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness

ROOT = harness.ROOT
sys.path.insert(0, str(ROOT / "scripts"))
import build_models  # noqa: E402  (scripts/ is not a package)

MODELS = ("simple", "mlp", "resnet50", "bert_encoder")
HEAVY = ("resnet50", "bert_encoder")
PROTOCOLS = ("http", "grpc", "shm")
TARGETS = ("gateway", "triton")
# What perf_analyzer says when its windows held too few finished requests.
TOO_SHORT = ("No valid requests", "Pass contained only one request")


# -- the counted child: a gateway whose payload-sized copies are counted ---------------------

# An LD_PRELOAD shim around memcpy and memmove: every call of 4 KiB or more made on the thread
# that called ``copycount_watch`` (the event loop's) adds its size to a counter. bytes joins and
# concatenations, bytes() of a buffer, numpy's concatenate and tobytes, protobuf's parsing and
# serializing all copy through these two; the kernel's copies in recv/send and ORT's own threads
# are not counted.
_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stddef.h>
static void *(*real_memcpy)(void *, const void *, size_t);
static void *(*real_memmove)(void *, const void *, size_t);
static pthread_t watched;
static volatile int watching;
static unsigned long long copied, calls;
void copycount_watch(void) { watched = pthread_self(); watching = 1; }
unsigned long long copycount_bytes(void) { return copied; }
unsigned long long copycount_calls(void) { return calls; }
static void count(size_t n) {
  if (n >= 4096 && watching && pthread_equal(pthread_self(), watched)) { copied += n; calls++; }
}
static void *slow_copy(void *d, const void *s, size_t n) {  /* only while dlsym resolves */
  unsigned char *dd = d; const unsigned char *ss = s;
  if (dd < ss) for (size_t i = 0; i < n; i++) dd[i] = ss[i];
  else for (size_t i = n; i > 0; i--) dd[i - 1] = ss[i - 1];
  return d;
}
void *memcpy(void *d, const void *s, size_t n) {
  if (!real_memcpy) { real_memcpy = slow_copy; real_memcpy = dlsym(RTLD_NEXT, "memcpy"); }
  count(n);
  return real_memcpy(d, s, n);
}
void *memmove(void *d, const void *s, size_t n) {
  if (!real_memmove) { real_memmove = slow_copy; real_memmove = dlsym(RTLD_NEXT, "memmove"); }
  count(n);
  return real_memmove(d, s, n);
}
"""


def build_shim(work: Path) -> Path | None:
    """The shim compiled with the system's C compiler; None without one."""
    source, lib = work / "copycount.c", work / "copycount.so"
    source.write_text(_SHIM)
    for cc in ("cc", "gcc", "clang"):
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            cmd = [cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(source), "-ldl"]
            subprocess.run(cmd, check=True, capture_output=True)
            return lib
    return None


def run_counted(control: Path, argv: list[str]) -> int:
    """Serve as ``gateway`` does, counting copies on this (the event loop's) thread. A thread
    polls for ``<control>.want`` and writes the counters: under uvloop a signal handler may
    wait for the next request to run."""
    import ctypes

    from gateway import cli

    lib = ctypes.CDLL(None)
    lib.copycount_bytes.restype = lib.copycount_calls.restype = ctypes.c_ulonglong
    lib.copycount_watch()

    def poll() -> None:
        want = control.with_suffix(".want")
        while True:
            if want.exists():
                counts = {"bytes": lib.copycount_bytes(), "calls": lib.copycount_calls()}
                control.write_text(json.dumps(counts))
                want.unlink()
            time.sleep(0.01)

    threading.Thread(target=poll, daemon=True).start()
    return cli.main(argv)


def _counts(control: Path) -> dict[str, int]:
    control.unlink(missing_ok=True)
    control.with_suffix(".want").touch()
    deadline = time.monotonic() + 10
    while not control.exists() or control.with_suffix(".want").exists():
        if time.monotonic() > deadline:
            raise RuntimeError("the counted gateway did not answer")
        time.sleep(0.01)
    counts: dict[str, int] = json.loads(control.read_text())
    return counts


# -- models and the repository ----------------------------------------------------------------


def build_repo(dest: Path, models: list[str]) -> Path:
    """One repository with the shipped and the heavy models (links, not copies); ``simple``
    always, for the memory part's baseline gateway (only ``models`` are loaded or measured)."""
    heavy = [m for m in models if m in HEAVY]
    cache = build_models.ensure_heavy(names=heavy) if heavy else None
    for name in dict.fromkeys([*models, "simple"]):
        source = (cache if name in HEAVY and cache else ROOT / "model_repo") / name
        (dest / name).symlink_to(source.resolve(), target_is_directory=True)
    return dest


def output_bytes(model: harness.Model, repo: Path) -> int:
    """Bytes of every output of one item (for perf_analyzer's output shared memory)."""
    text = (repo / model.name / "config.pbtxt").read_text()
    total = 0
    import re

    for body in re.findall(r"\boutput\s*\{([^}]*)\}", text):
        dims = [int(d) for d in re.findall(r"dims:\s*(-?\d+)", body)]
        total += 8 * math.prod(dims)  # 8: the widest element of these models
    return total


def in_process(repo: Path, models: list[str], seconds: float) -> dict[str, dict[str, Any]]:
    """Per model: every batch size's point, the best items/s and batch 1's median latency."""
    found = {}
    for name in models:
        model = harness.read_model(repo, name)
        points = harness.measure_in_process(
            repo, model, 0, seconds, harness.batch_sizes(model.max_batch_size)
        )
        best = max(points, key=lambda p: p["items_per_s"])
        found[name] = {
            "points": points,
            "best_items_per_s": best["items_per_s"],
            "best_batch": best["batch"],
            "batch1_p50_ms": points[0]["ms_per_run_median"],
        }
        print(
            f"in-process {name:13s} best {best['items_per_s']:9.1f} items/s at batch "
            f"{best['batch']}, batch 1 p50 {points[0]['ms_per_run_median']:.2f} ms",
            flush=True,
        )
    return found


def best_of(
    first: dict[str, dict[str, Any]], second: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per model, the higher best items/s and the lower batch-1 latency of two passes."""
    merged = {}
    for name, one in first.items():
        two = second[name]
        better = one if one["best_items_per_s"] >= two["best_items_per_s"] else two
        merged[name] = {
            **better,
            "batch1_p50_ms": min(one["batch1_p50_ms"], two["batch1_p50_ms"]),
            "passes": [one, two],
        }
    return merged


# The points whose goals compare the gateway with in-process ONNX Runtime (issue 21): batch-1
# p50 at c=1 over HTTP; best items/s over the concurrencies of each protocol; items/s at c=64.
LONE_GOAL = ("mlp", "resnet50")
BEST_GOAL = ("resnet50",)
C64_GOAL = ("mlp", "http", 64)


class PairedReference:
    """In-process ``session.run`` measured right before a gateway point for one window, so a
    goal's ratio is taken within one moment: items/s at each model's best batch of the first
    pass (``in_process_paired``: over the whole window, as perf_analyzer counts, not the best
    slice) and batch 1's median run time (``in_process_b1_p50_ms``, set up as
    ``harness.measure_in_process`` sets it up: ONNX Runtime's defaults, the issue's reference).
    On a shared machine whose speed moves by 2x within a minute, a ratio to a pass minutes away
    (or to the best of two) says more about the machine than about the gateway.

    ``everywhere`` (``--paired``): items/s before every point; otherwise only before the points
    an in-process goal reads (``--repeat`` > 1)."""

    def __init__(
        self, repo: Path, first: dict[str, dict[str, Any]], seconds: float, everywhere: bool
    ) -> None:
        self.repo, self.first, self.seconds, self.everywhere = repo, first, seconds, everywhere
        self.sessions: dict[tuple[str, bool], Any] = {}

    def for_point(self, model: str, protocol: str, concurrency: int) -> dict[str, float]:
        """The in-process figures the goals read at this point (none where no goal reads one)."""
        found = {}
        if concurrency == 1 and protocol == "http" and model in LONE_GOAL:
            found["in_process_b1_p50_ms"] = self.batch1_p50_ms(model)
        if self.everywhere or model in BEST_GOAL or (model, protocol, concurrency) == C64_GOAL:
            found["in_process_paired"] = self.items_per_s(model)
        return found

    def _session(self, name: str, spinning: bool) -> Any:
        import onnxruntime as ort

        if (name, spinning) not in self.sessions:
            options = ort.SessionOptions()  # as harness.measure_in_process sets it up
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if not spinning:
                # Its threads stop spinning when a run returns: none left on the gateway's cores.
                options.add_session_config_entry("session.force_spinning_stop", "1")
            path = str(self.repo / name / "1" / "model.onnx")
            self.sessions[name, spinning] = ort.InferenceSession(
                path, options, providers=["CPUExecutionProvider"]
            )
        return self.sessions[name, spinning]

    def items_per_s(self, name: str) -> float:
        model = harness.read_model(self.repo, name)
        batch = self.first[name]["best_batch"]
        session, feeds = self._session(name, False), harness.sample_inputs(model, batch)
        outputs = list(model.outputs)
        session.run(outputs, feeds)
        runs, started = 0, time.perf_counter()
        while runs < 2 or time.perf_counter() - started < self.seconds:
            session.run(outputs, feeds)
            runs += 1
        return runs * batch / (time.perf_counter() - started)

    def batch1_p50_ms(self, name: str) -> float:
        model = harness.read_model(self.repo, name)
        session, feeds = self._session(name, True), harness.sample_inputs(model, 1)
        outputs = list(model.outputs)
        for _ in range(3):
            session.run(outputs, feeds)
        marks = [time.perf_counter()]
        while len(marks) < 6 or marks[-1] - marks[0] < self.seconds:
            session.run(outputs, feeds)
            marks.append(time.perf_counter())
        return statistics.median(b - a for a, b in itertools.pairwise(marks)) * 1e3


# -- perf_analyzer ----------------------------------------------------------------------------


def perf_analyzer() -> str:
    out = subprocess.run(
        [str(ROOT / "scripts" / "perf_analyzer.sh")], capture_output=True, text=True, check=True
    )
    return out.stdout.strip().splitlines()[-1]


def run_pa(
    pa: str,
    model: str,
    url: str,
    protocol: str,
    concurrency: int,
    window_ms: int,
    out_bytes: int,
    work: Path,
) -> dict[str, Any]:
    """One perf_analyzer point; {'error': ...} when it fails (the sweep goes on)."""
    report = work / f"pa-{model}-{protocol}-{concurrency}-{time.monotonic_ns()}.csv"
    cmd = [
        pa, "-m", model, "-u", url, "-i", "grpc" if protocol == "grpc" else "http",
        "--concurrency-range", str(concurrency), "-p", str(window_ms),
        "-s", "999", "-r", "3",  # three windows, no stability retries: a bounded run
        "--input-data", "zero", "-f", str(report),
    ]  # fmt: skip
    if protocol == "shm":
        cmd += ["--shared-memory", "system", "--output-shared-memory-size", str(out_bytes)]
    limit_s = 30 + 6 * window_ms / 1000 * max(1, concurrency / 8)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=limit_s, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {limit_s:.0f} s"}
    if out.returncode != 0 or not report.exists():
        tail = (out.stdout + out.stderr).strip().splitlines()[-3:]
        return {"error": " / ".join(tail)[:300]}
    with report.open() as f:
        row = next(csv.DictReader(f))
    return {
        "throughput": float(row["Inferences/Second"]),
        "p50_ms": int(row["p50 latency"]) / 1e3,
        "p99_ms": int(row["p99 latency"]) / 1e3,
        "queue_ms": int(row["Server Queue"]) / 1e3,
        "compute_ms": int(row["Server Compute Infer"]) / 1e3,
    }


def has_shm(http_url: str) -> bool:
    with urllib.request.urlopen(f"{http_url}/v2", timeout=5) as resp:
        return "system_shared_memory" in json.loads(resp.read()).get("extensions", [])


def plan(
    models: list[str],
    protocols: list[str],
    levels: dict[str, list[int]],
    only: list[tuple[str, str, int]] | None = None,
) -> list[tuple[str, str, int]]:
    """The points (model, protocol, concurrency) of one pass, in the order they are measured;
    with ``only``, just those (``--only``), in its order."""
    if only is not None:
        return [p for p in only if p[1] in protocols]
    return [(m, p, c) for m in models for p in protocols for c in levels[m]]


def sweep(
    pa: str,
    servers: dict[str, tuple[dict[str, str], list[str]]],
    repo: Path,
    points_plan: list[tuple[str, str, int]],
    windows_ms: dict[str, int],
    work: Path,
    paired: PairedReference | None = None,
    repeat: int = 1,
) -> list[dict[str, Any]]:
    """Every point, the targets (``servers``: target -> (urls, protocols)) one right after the
    other at each, in turns which goes first: the machine's speed drifts over minutes, so each
    ratio compares two windows seconds apart. ``repeat`` passes over all the points, one after
    the other (a slow minute of the machine hits every point once, not one point ``repeat``
    times); a point's targets swap who goes first from one pass to the next. With ``paired``,
    in-process figures right before each point (``PairedReference.for_point``)."""
    points = []
    out_bytes = {m: output_bytes(harness.read_model(repo, m), repo) for m, _, _ in points_plan}
    for r in range(repeat):
        for i, (model, protocol, concurrency) in enumerate(points_plan):
            order = list(servers) if (i + r) % 2 == 0 else list(servers)[::-1]
            reference = paired.for_point(model, protocol, concurrency) if paired else {}
            for target in order:
                urls, wanted = servers[target]
                if protocol not in wanted:
                    continue
                url = urls["grpc" if protocol == "grpc" else "http"]
                window_ms = windows_ms[model]
                size = out_bytes[model]
                got = run_pa(pa, model, url, protocol, concurrency, window_ms, size, work)
                # The machine slowed down (a heavy model's c requests take c runs): retry
                # with longer windows rather than leave a hole in the curve.
                for longer in (2, 4):
                    if not any(w in got.get("error", "") for w in TOO_SHORT):
                        break
                    got = run_pa(pa, model, url, protocol, concurrency, window_ms * longer,
                                 size, work)  # fmt: skip
                points.append({"target": target, "model": model, "protocol": protocol,
                               "concurrency": concurrency, "repeat": r, **got,
                               **reference})  # fmt: skip
                head = f"{target:8s} {model:13s} {protocol:5s} c={concurrency:<3d}"
                if repeat > 1:
                    head += f" {r + 1}/{repeat}"
                if "error" in got:
                    print(f"{head} ERROR {got['error']}", flush=True)
                else:
                    print(f"{head} {got['throughput']:9.1f}/s  p50 {got['p50_ms']:8.2f}  "
                          f"p99 {got['p99_ms']:8.2f} ms", flush=True)  # fmt: skip
    return points


def push_to_triton(http_url: str, repo: Path, models: list[str]) -> None:
    """Each model with its own config, run by Triton's python backend through ONNX Runtime
    (``gateway/backends/triton_model``), batching as Triton does it (``batching="triton"``)."""
    from gateway.backends.onnxruntime import inspect_config
    from gateway.backends.triton import TritonHost
    from gateway.repository.local import LocalRepository
    from gateway.settings import Settings

    async def push() -> None:
        host = TritonHost("sweep", http_url, batching="triton", timeout_s=300.0)
        max_batch = Settings().default_max_batch_size
        try:
            for name in models:
                source = LocalRepository(repo).source(name)
                for version in source.version_paths:
                    await host.prepare(source, version, inspect_config(source, version, max_batch))
        finally:
            await host.close()

    asyncio.run(push())


# -- memory and copies ------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


_SESSION_RSS = """
import sys, numpy as np, onnxruntime as ort
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
path, sizes = sys.argv[1], sorted({1, int(sys.argv[2])})
before = rss()
options = ort.SessionOptions()
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
s = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
types = {'tensor(float)': np.float32, 'tensor(int32)': np.int32, 'tensor(int64)': np.int64}
for batch in sizes:  # what the gateway's warm-up runs: batch 1 and max_batch_size
    feeds = {}
    for i in s.get_inputs():
        shape = [batch if not isinstance(d, int) else d for d in i.shape]
        feeds[i.name] = np.zeros(shape, dtype=types[i.type])
    s.run(None, feeds)
print(rss() - before)
"""


def one_request(url: str, model: harness.Model) -> None:
    body = harness.binary_body(model)
    status, raw, headers = harness.http(f"{url}/v2/models/{model.name}/infer", body.data,
                                        body.headers)  # fmt: skip
    if status != 200:
        raise RuntimeError(f"{model.name}: HTTP {status}: {raw[:200]!r}")
    harness.check_response(raw, headers, model)


def memory(repo: Path, models: list[str], work: Path) -> list[dict[str, Any]]:
    """Per model: the gateway's RSS gain for loading and running it against an ORT session's."""
    rows = []
    simple = harness.read_model(repo, "simple")
    with harness.gateway(repo, {}, work, "mem-base", models=("simple",)) as gw:
        one_request(gw.url, simple)
        base = rss_mb(gw.pid)
    for name in models:
        if name == "simple":
            continue
        model = harness.read_model(repo, name)
        with harness.gateway(repo, {}, work, f"mem-{name}", models=("simple", name)) as gw:
            one_request(gw.url, simple)
            one_request(gw.url, model)
            loaded = rss_mb(gw.pid)
        path = str(repo / name / "1" / "model.onnx")
        out = subprocess.run(
            [sys.executable, "-c", _SESSION_RSS, path, str(max(1, model.max_batch_size))],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        session = float(out.stdout.strip().splitlines()[-1])
        size = (repo / name / "1" / "model.onnx").stat().st_size / 2**20
        rows.append({"model": name, "file_mb": size, "gateway_mb": loaded - base,
                     "session_mb": session})  # fmt: skip
        print(f"memory {name:13s} gateway +{loaded - base:7.1f} MB, ORT session alone "
              f"+{session:7.1f} MB (file {size:.1f} MB)", flush=True)  # fmt: skip
    return rows


def copies(
    repo: Path, model_name: str, work: Path, requests: int, tree: str | None = None
) -> dict[str, Any] | None:
    """Bytes copied on the event loop per request (``_SHIM``) while a gateway answers
    ``requests`` sequential batch-1 requests, over HTTP binary, gRPC raw contents and system
    shared memory (when the gateway offers it); with ``tree``, the gateway of that source tree
    (``PYTHONPATH``), for a before/after."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    shim = build_shim(work)
    if shim is None:
        print("copies: no C compiler, not measured", flush=True)
        return None
    model = harness.read_model(repo, model_name)
    feeds = harness.sample_inputs(model, 1, seed=1)
    payload = sum(a.nbytes for a in feeds.values())
    control = work / "counted.json"
    launcher = [sys.executable, str(Path(__file__).resolve()), "--counted", str(control)]
    grpc_port = harness.free_port()
    env = {
        "GATEWAY_LOAD_MODELS": model_name,
        "GATEWAY_GRPC_PORT": str(grpc_port),
        "LD_PRELOAD": str(shim),
        **({"PYTHONPATH": tree} if tree else {}),
    }
    found: dict[str, Any] = {"model": model_name, "payload_bytes": payload, "tree": tree}
    gw = harness.start_gateway(repo, work, "--log-level", "warning", env=env, tag="counted",
                               ready=(model_name,), launcher=launcher)  # fmt: skip
    try:
        body = harness.binary_body(model)
        url = f"{gw.url}/v2/models/{model_name}/infer"
        for _ in range(3):
            one_request(gw.url, model)
        before = _counts(control)
        for _ in range(requests):
            harness.http(url, body.data, body.headers)
        after = _counts(control)
        found["http"] = {k: (after[k] - before[k]) / requests for k in after}
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        inputs = []
        for t in model.inputs:
            tensor = grpcclient.InferInput(t.name, [1, *t.dims], t.datatype)
            tensor.set_data_from_numpy(np.ascontiguousarray(feeds[t.name]))
            inputs.append(tensor)
        for _ in range(3):
            client.infer(model_name, inputs)
        before = _counts(control)
        for _ in range(requests):
            client.infer(model_name, inputs)
        after = _counts(control)
        found["grpc"] = {k: (after[k] - before[k]) / requests for k in after}
        client.close()
        if has_shm(gw.url):
            found["shm"] = shm_copies(gw, model, feeds, control, requests)
    finally:
        gw.stop()
    for name in ("http", "grpc", "shm"):
        got = found.get(name)
        if got is None:
            continue
        print(f"copies {model_name} {name}{' ' + tree if tree else ''}: {got['bytes']:,.0f} B "
              f"in {got['calls']:.1f} copies "
              f"per request = {got['bytes'] / payload:.2f}x the {payload:,d} B input",
              flush=True)  # fmt: skip
    return found


def shm_copies(
    gw: harness.Gateway,
    model: harness.Model,
    feeds: dict[str, Any],
    control: Path,
    requests: int,
) -> dict[str, float]:
    """Copies per request while the inputs and outputs travel in system shared memory (as
    ``perf_analyzer --shared-memory system`` sends them: a JSON body naming the regions)."""
    import tritonclient.http as httpclient
    import tritonclient.utils.shared_memory as shm

    client = httpclient.InferenceServerClient(gw.address)
    tag = f"cnn-copies-{gw.port}"
    handles = []
    try:
        inputs = []
        for t in model.inputs:
            array = feeds[t.name]
            handle = shm.create_shared_memory_region(f"{tag}-{t.name}", f"/{tag}-{t.name}",
                                                     array.nbytes)  # fmt: skip
            handles.append(handle)
            shm.set_shared_memory_region(handle, [array])
            client.register_system_shared_memory(f"{tag}-{t.name}", f"/{tag}-{t.name}",
                                                 array.nbytes)  # fmt: skip
            tensor = httpclient.InferInput(t.name, [1, *t.dims], t.datatype)
            tensor.set_shared_memory(f"{tag}-{t.name}", array.nbytes)
            inputs.append(tensor)
        outputs = []
        for name in model.outputs:
            size = 1 << 20  # room for any output of one item of these models
            handle = shm.create_shared_memory_region(f"{tag}-{name}", f"/{tag}-{name}", size)
            handles.append(handle)
            client.register_system_shared_memory(f"{tag}-{name}", f"/{tag}-{name}", size)
            out = httpclient.InferRequestedOutput(name, binary_data=True)
            out.set_shared_memory(f"{tag}-{name}", size)
            outputs.append(out)
        for _ in range(3):
            client.infer(model.name, inputs, outputs=outputs)
        before = _counts(control)
        for _ in range(requests):
            client.infer(model.name, inputs, outputs=outputs)
        after = _counts(control)
        client.unregister_system_shared_memory()
    finally:
        client.close()
        for handle in handles:
            shm.destroy_shared_memory_region(handle)
    return {k: (after[k] - before[k]) / requests for k in after}


# -- the report -------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


# -- repeats: medians, ranges and in how many repeats a goal was met ---------------------------
#
# With ``--repeat N`` every point is measured N times. A ratio is taken within one repeat (the
# gateway and Triton seconds apart, the in-process reference right before) and the report
# judges the median of the N ratios, with their range and the number of repeats in which the
# ratio alone met the goal: a point that flips between repeats reads as noise, one that misses
# in every repeat as a gap.


@dataclass(frozen=True)
class Spread:
    """One figure over the repeats that have it: median, lowest, highest, how many."""

    median: float
    low: float
    high: float
    n: int


def spread(values: Iterable[float | None]) -> Spread | None:
    """The median and range of the figures present (None: a repeat without the figure)."""
    got = [v for v in values if v is not None]
    if not got:
        return None
    return Spread(statistics.median(got), min(got), max(got), len(got))


@dataclass(frozen=True)
class Verdict:
    figure: Spread | None
    met: bool  # the median meets the goal
    k: int  # repeats whose own figure meets it
    n: int  # repeats with a figure


def judge(values: list[float | None], ok: Callable[[float], bool]) -> Verdict:
    """A goal over the repeats: judged on the median, and counted repeat by repeat."""
    figure = spread(values)
    met_in = sum(1 for v in values if v is not None and ok(v))
    return Verdict(figure, figure is not None and ok(figure.median), met_in,
                   figure.n if figure else 0)  # fmt: skip


def repeats_in(points: list[dict[str, Any]]) -> int:
    return 1 + max((p.get("repeat", 0) for p in points), default=0)


def by_repeat(
    points: list[dict[str, Any]], target: str, model: str, protocol: str, concurrency: int
) -> list[dict[str, Any] | None]:
    """One point's measurements, one per repeat (None where it failed or is missing)."""
    found: list[dict[str, Any] | None] = [None] * repeats_in(points)
    for p in points:
        if (p["target"], p["model"], p["protocol"], p["concurrency"]) == (
            target, model, protocol, concurrency,
        ) and "error" not in p:  # fmt: skip
            found[p.get("repeat", 0)] = p
    return found


@dataclass(frozen=True)
class PointSummary:
    """One (model, protocol, concurrency) over the repeats: each target's figures, and the
    gateway's ratios to Triton and to the paired in-process reference, taken per repeat."""

    model: str
    protocol: str
    concurrency: int
    gateway: dict[str, Spread | None]  # throughput, p50_ms, p99_ms
    triton: dict[str, Spread | None]
    throughput_ratio: Spread | None  # gateway / Triton
    p99_ratio: Spread | None  # gateway / Triton
    ahead: tuple[bool | None, ...]  # per repeat: higher throughput and lower p99 than Triton
    paired_ratio: Spread | None  # gateway throughput / in-process items/s right before

    @property
    def ahead_on_medians(self) -> bool | None:
        if self.throughput_ratio is None or self.p99_ratio is None:
            return None
        return self.throughput_ratio.median > 1 and self.p99_ratio.median < 1


FIGURES = ("throughput", "p50_ms", "p99_ms")


def summarize(points: list[dict[str, Any]]) -> list[PointSummary]:
    """Every point measured, in the order first measured, summarized over the repeats."""
    keys = list(dict.fromkeys((p["model"], p["protocol"], p["concurrency"]) for p in points))
    found = []
    for model, protocol, c in keys:
        gs = by_repeat(points, "gateway", model, protocol, c)
        ts = by_repeat(points, "triton", model, protocol, c)
        tp, p99, ahead, paired = [], [], [], []
        for g, t in zip(gs, ts, strict=True):
            tp.append(harness.ratio(g["throughput"], t["throughput"]) if g and t else None)
            p99.append(harness.ratio(g["p99_ms"], t["p99_ms"]) if g and t else None)
            a, b = tp[-1], p99[-1]
            ahead.append(None if a is None or b is None else a > 1 and b < 1)
            paired.append(harness.ratio(g["throughput"], g.get("in_process_paired")) if g else None)
        found.append(PointSummary(
            model, protocol, c,
            {f: spread(g[f] if g else None for g in gs) for f in FIGURES},
            {f: spread(t[f] if t else None for t in ts) for f in FIGURES},
            spread(tp), spread(p99), tuple(ahead), spread(paired),
        ))  # fmt: skip
    return found


@dataclass(frozen=True)
class Goal:
    goal: str
    figure: str
    met: bool  # on the median
    k: int  # repeats in which it was met
    n: int  # repeats with a figure (0: measured once, not per repeat)


def every_point(summaries: list[PointSummary]) -> tuple[int, int, int, int]:
    """Ahead of Triton at every point: (points ahead on their medians, points with both
    targets, repeats in which every point measured in that repeat was ahead, repeats with any)."""
    scored = [s for s in summaries if s.ahead_on_medians is not None]
    wins = sum(1 for s in scored if s.ahead_on_medians)
    k = n = 0
    for r in range(max((len(s.ahead) for s in summaries), default=0)):
        seen = [s.ahead[r] for s in summaries if s.ahead[r] is not None]
        if seen:
            n += 1
            k += all(seen)
    return wins, len(scored), k, n


def _range(s: Spread, spec: str, suffix: str = "") -> str:
    """``median`` alone for one repeat, else ``median [low, high]``."""
    if s.n <= 1:
        return f"{s.median:{spec}}{suffix}"
    return f"{s.median:{spec}}{suffix} [{s.low:{spec}}, {s.high:{spec}}]"


def goals(
    points: list[dict[str, Any]], ort: dict[str, dict[str, Any]], mem: list[dict[str, Any]],
    models: list[str],
) -> list[Goal]:  # fmt: skip
    """Issue 21's goals over the repeats. An in-process reference is the one measured right
    before the point when there is one (``--paired``, ``--repeat`` > 1), else the run's passes
    before and after the sweep."""
    rows = []
    for model in LONE_GOAL:
        gs = by_repeat(points, "gateway", model, "http", 1)
        if model not in ort or not any(gs):
            continue
        refs = [g.get("in_process_b1_p50_ms", ort[model]["batch1_p50_ms"]) if g else None
                for g in gs]  # fmt: skip
        extras = [g["p50_ms"] - ref if g and ref else None for g, ref in zip(gs, refs, strict=True)]
        v = judge(extras, lambda x: x <= 0.3)
        gw, ref = spread(g["p50_ms"] if g else None for g in gs), spread(refs)
        paired = all(g is None or "in_process_b1_p50_ms" in g for g in gs)
        if v.figure and gw and ref:
            rows.append(Goal(
                f"c=1 `{model}` p50 <= in-process p50 + 0.3 ms{', paired' if paired else ''}",
                f"{_range(v.figure, '+.2f', ' ms')} ({gw.median:.2f} vs {ref.median:.2f} ms)",
                v.met, v.k, v.n,
            ))  # fmt: skip
    best_ref = {m: o["best_items_per_s"] for m, o in ort.items()}

    def vs_in_process(g: dict[str, Any]) -> float:
        return float(g["throughput"] / g.get("in_process_paired", best_ref[g["model"]]))

    for model in BEST_GOAL:
        for protocol, want in (("http", 0.9), ("grpc", 0.9), ("shm", 0.95)):
            mine = [p for p in points if (p["target"], p["model"], p["protocol"]) ==
                    ("gateway", model, protocol) and "error" not in p]  # fmt: skip
            if model not in ort or not mine:
                continue
            best: list[float | None] = []
            at: list[str] = []
            for r in range(repeats_in(points)):
                here = [p for p in mine if p.get("repeat", 0) == r]
                top = max(here, key=vs_in_process) if here else None
                best.append(vs_in_process(top) if top else None)
                at.append(str(top["concurrency"]) if top else "-")
            v = judge(best, lambda x, want=want: x >= want)
            paired = all("in_process_paired" in p for p in mine)
            if v.figure:
                rows.append(Goal(
                    f"`{model}` {protocol} best >= {want}x in-process best batch"
                    f"{', paired' if paired else ''}",
                    f"{_range(v.figure, '.2f', 'x')} (best at c={','.join(at)})",
                    v.met, v.k, v.n,
                ))  # fmt: skip
    model, protocol, c = C64_GOAL
    gs = by_repeat(points, "gateway", model, protocol, c)
    if model in ort and any(gs):
        v = judge([vs_in_process(g) if g else None for g in gs], lambda x: x >= 0.55)
        paired = all(g is None or "in_process_paired" in g for g in gs)
        if v.figure:
            rows.append(Goal(f"`{model}` c={c} binary >= 0.55x in-process best"
                             f"{', paired' if paired else ''}",
                             _range(v.figure, ".2f", "x"), v.met, v.k, v.n))  # fmt: skip
    summaries = summarize(points)
    for model in models:
        mine = [s for s in summaries if s.model == model]
        wins, total, k, n = every_point(mine)
        if not total:
            continue
        worst_tp = min(mine, key=lambda s: s.throughput_ratio.median if s.throughput_ratio
                       else math.inf).throughput_ratio  # fmt: skip
        worst_p99 = max(mine, key=lambda s: s.p99_ratio.median if s.p99_ratio
                        else -math.inf).p99_ratio  # fmt: skip
        rows.append(Goal(
            f"`{model}` vs Triton: higher throughput and lower p99 at every point",
            f"{wins}/{total} points on their medians; worst throughput "
            f"{_range(worst_tp, '.2f', 'x') if worst_tp else 'n/a'}, worst p99 "
            f"{_range(worst_p99, '.2f', 'x') if worst_p99 else 'n/a'}",
            wins == total, k, n,
        ))  # fmt: skip
    for row in mem:
        gap = row["gateway_mb"] - row["session_mb"]
        rows.append(Goal(f"`{row['model']}` RSS <= ORT session + 50 MB",
                         f"+{row['gateway_mb']:.0f} vs +{row['session_mb']:.0f} MB ({gap:+.0f})",
                         gap <= 50, int(gap <= 50), 0))  # fmt: skip
    return rows


def goal_lines(rows: list[Goal], repeats: int) -> list[str]:
    """The goals table; with one repeat, as it was before repeats (no k of N column)."""
    if repeats == 1:
        lines = ["| goal | figure | met |", "|---|---|---|"]
        return lines + [f"| {g.goal} | {g.figure} | {'yes' if g.met else 'no'} |" for g in rows]
    lines = ["| goal | median [range] over the repeats | met (median) | met in k of N repeats |",
             "|---|---|---|---|"]  # fmt: skip
    for g in rows:
        count = "measured once" if g.n == 0 else f"{g.k} of {g.n}"
        lines.append(f"| {g.goal} | {g.figure} | {'yes' if g.met else 'no'} | {count} |")
    return lines


def plot(summaries: list[PointSummary], ort: dict[str, dict[str, Any]], model: str,
         path: Path) -> bool:  # fmt: skip
    """p99 against items/s per target and protocol: the medians over the repeats, bars from
    the lowest to the highest repeat when there are several."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for target in TARGETS:
        for protocol in PROTOCOLS:
            curve = []
            for s in sorted(summaries, key=lambda s: s.concurrency):
                figures = s.gateway if target == "gateway" else s.triton
                tp, p99 = figures["throughput"], figures["p99_ms"]
                if s.model == model and s.protocol == protocol and tp and p99:
                    curve.append((s.concurrency, tp, p99))
            if not curve:
                continue
            style = "-o" if target == "gateway" else "--s"
            color = {"http": "tab:blue", "grpc": "tab:orange", "shm": "tab:green"}[protocol]
            xs, ys = [tp.median for _, tp, _ in curve], [p99.median for _, _, p99 in curve]
            if any(tp.n > 1 for _, tp, _ in curve):
                ax.errorbar(
                    xs, ys, fmt=style, color=color, label=f"{target} {protocol} (p99)",
                    xerr=[[tp.median - tp.low for _, tp, _ in curve],
                          [tp.high - tp.median for _, tp, _ in curve]],
                    yerr=[[p.median - p.low for _, _, p in curve],
                          [p.high - p.median for _, _, p in curve]],
                    elinewidth=0.8, capsize=2,
                )  # fmt: skip
            else:
                ax.plot(xs, ys, style, color=color, label=f"{target} {protocol} (p99)")
            for (c, _, _), x, y in zip(curve, xs, ys, strict=True):
                ax.annotate(str(c), (x, y), fontsize=7)
    if model in ort:
        for q in ort[model]["points"]:
            ax.plot(q["items_per_s"], q["ms_per_run_median"], "k^")
        ax.plot([], [], "k^", label="in-process ORT, per batch size (run time)")
    ax.set_xlabel("items/s")
    ax.set_ylabel("latency ms (log)")
    ax.set_yscale("log")
    ax.set_title(f"{model}: latency vs throughput (labels: concurrency)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _cell(s: Spread | None, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if s is None else _range(s, spec, suffix)


def _median(s: Spread | None, spec: str = ".2f") -> str:
    return "n/a" if s is None else f"{s.median:{spec}}"


def render(data: dict[str, Any]) -> str:
    points, ort, mem = data["points"], data["in_process"], data["memory"]
    n = data.get("repeat", 1)
    summaries = summarize(points)
    end = data.get("loadavg_at_end")
    at_end = f", at the end {', '.join(f'{x:.1f}' for x in end)}" if end else ""
    lines = [
        "# Sweep: gateway vs standalone Triton vs in-process ONNX Runtime",
        "",
        f"`{data['command']}`, {data['date']}. {data['machine']['nproc']} CPUs "
        f"({data['machine']['cpu']}), load average at start "
        f"{', '.join(f'{x:.1f}' for x in data['machine']['loadavg_at_start'])}{at_end}"
        ". perf_analyzer shares the cores with the servers; this machine was shared with "
        "other work during the run, so figures are noisy: compare within one run only.",
        f"perf_analyzer windows {data['window_ms']} ms (at least 4 in-process batch-1 runs: "
        f"{', '.join(f'{m} {w} ms' for m, w in data.get('windows_ms', {}).items())}) x 3 per "
        "point, batch 1 per request, "
        "`--input-data zero`. Triton: `tritonserver` (nvidia-pytriton build) running each "
        "model's ONNX file with ONNX Runtime in its python backend, the model's own config. "
        "Both servers run throughout; at each point they are measured back to back, in turns "
        "which goes first. In-process: the better of a pass before and a pass after the sweep; "
        "with `--paired` or `--repeat`, also in-process ORT in the window right before the "
        'point (best batch items/s, column "vs paired"; batch 1 p50 before c=1), which the '
        "in-process goals then use.",
    ]
    if n > 1:
        lines.append(
            f"**{n} repeats**: every point measured {n} times, one pass over all points after "
            "another (who goes first swaps between passes). Figures are the median over the "
            "repeats; a ratio is taken within each repeat and shown as the median of the "
            f"{n} ratios [lowest, highest]; a goal is judged on that median, and counted "
            "repeat by repeat (k of N)."
        )
    lines += [
        "",
        "## Goals (ratios from this run)",
        "",
        *goal_lines(goals(points, ort, mem, data["models"]), n),
        "",
        "## In-process ONNX Runtime",
        "",
        "| model | best items/s | at batch | batch 1 p50 ms |",
        "|---|---:|---:|---:|",
    ]
    for name, o in ort.items():
        lines.append(f"| {name} | {o['best_items_per_s']:.1f} | {o['best_batch']} | "
                     f"{o['batch1_p50_ms']:.2f} |")  # fmt: skip
    for model in data["models"]:
        lines += [
            "",
            f"## `{model}`",
            "",
        ]
        if model in data.get("plots", []):
            lines += [f"![{model}](sweep-{model}.png)", ""]
        lines += [
            "| protocol | c | gateway /s | p50 ms | p99 ms | Triton /s | p50 ms | p99 ms | "
            "throughput vs Triton | p99 vs Triton | ahead of Triton | vs in-process best | "
            "vs paired |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
        ]
        best = ort.get(model, {}).get("best_items_per_s")
        for s in summaries:
            if s.model != model:
                continue
            g, t = s.gateway, s.triton
            ahead = {True: "yes", False: "no", None: "n/a"}[s.ahead_on_medians]
            if n > 1 and s.ahead_on_medians is not None:
                seen = [a for a in s.ahead if a is not None]
                ahead += f" ({sum(seen)} of {len(seen)})"
            gv = g["throughput"].median if g["throughput"] else None
            lines.append(
                f"| {s.protocol} | {s.concurrency} | {_median(g['throughput'], '.1f')} "
                f"| {_median(g['p50_ms'])} | {_median(g['p99_ms'])} "
                f"| {_median(t['throughput'], '.1f')} | {_median(t['p50_ms'])} "
                f"| {_median(t['p99_ms'])} "
                f"| {_cell(s.throughput_ratio, '.2f', 'x')} | {_cell(s.p99_ratio, '.2f', 'x')} "
                f"| {ahead} | {_fmt(harness.ratio(gv, best), '.2f', 'x')} "
                f"| {_cell(s.paired_ratio, '.2f', 'x')} |"
            )
    errors = [p for p in points if "error" in p]
    if errors:
        lines += ["", "## Points that failed", ""]
        lines += [f"- {p['target']} {p['model']} {p['protocol']} c={p['concurrency']}: "
                  f"{p['error']}" for p in errors]  # fmt: skip
    if mem:
        lines += [
            "",
            "## Memory",
            "",
            "RSS gained by a gateway loading the model (a gateway serving `simple` and the model, "
            "against one serving `simple` alone, each after one request) and by a bare Python "
            "process creating an ORT session of the file and running it at batch 1 and "
            "`max_batch_size` (the sizes the gateway's warm-up runs).",
            "",
            "| model | file MB | gateway +MB | ORT session +MB | gateway - session |",
            "|---|---:|---:|---:|---:|",
        ]
        for row in mem:
            lines.append(f"| {row['model']} | {row['file_mb']:.1f} | {row['gateway_mb']:.1f} | "
                         f"{row['session_mb']:.1f} | "
                         f"{row['gateway_mb'] - row['session_mb']:+.1f} |")  # fmt: skip
    cp = data.get("copies")
    if cp:
        lines += [
            "",
            "## Payload copies (`resnet50`)",
            "",
            f"A gateway with an LD_PRELOAD shim around memcpy/memmove (`_SHIM` in "
            f"`bench/sweep.py`) answers {data['copy_requests']} sequential batch-1 requests; "
            "every copy of 4 KiB or more made on the event loop's thread is counted (bytes "
            "joins, `bytes()` of buffers, numpy concatenate/tobytes, protobuf parse and "
            "serialize; not the kernel's socket copies, not ORT's threads). Per request, in "
            f"units of one request's input ({cp['payload_bytes']:,d} bytes):",
            "",
            "| gateway | transport | bytes copied | copies | in inputs |",
            "|---|---|---:|---:|---:|",
        ]
        for run in (cp, data.get("copies_baseline")):
            if not run:
                continue
            for name in ("http", "grpc", "shm"):
                got = run.get(name)
                if got is None:
                    continue
                share = got["bytes"] / run["payload_bytes"]
                lines.append(f"| {run['tree'] or 'this tree'} | {name} | {got['bytes']:,.0f} | "
                             f"{got['calls']:.1f} | {share:.2f}x |")  # fmt: skip
    return "\n".join(lines) + "\n"


# -- the driver -------------------------------------------------------------------------------


def _levels(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _only(text: str) -> list[tuple[str, str, int]]:
    """``mlp:http:4,resnet50:shm:16`` -> [("mlp", "http", 4), ("resnet50", "shm", 16)]."""
    found = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        parts = item.split(":")
        if len(parts) != 3 or parts[0] not in MODELS or parts[1] not in PROTOCOLS:
            raise argparse.ArgumentTypeError(
                f"{item!r}: want MODEL:PROTOCOL:CONCURRENCY, model one of {', '.join(MODELS)}, "
                f"protocol one of {', '.join(PROTOCOLS)}"
            )
        try:
            concurrency = int(parts[2])
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: concurrency is not a number") from None
        if concurrency < 1:
            raise argparse.ArgumentTypeError(f"{item!r}: concurrency must be >= 1")
        found.append((parts[0], parts[1], concurrency))
    if not found:
        raise argparse.ArgumentTypeError("no points given")
    return list(dict.fromkeys(found))


def _repeat(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return n


def heavy_levels(model: harness.Model) -> list[int]:
    """A heavy model's concurrencies: 1 (a lone request), half and all of ``max_batch_size``
    ``m``, and ``2m``: the gateway forms a batch while another runs (``batch_pipeline``), so the
    clients split into two groups and only ``2m`` of them fill batches of ``m``, the size where
    in-process ONNX Runtime is best. Four points, as many as the fixed 1, 2, 4, 8 before."""
    m = max(1, model.max_batch_size)
    return sorted({1, max(1, m // 2), m, 2 * m})


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--counted":
        return run_counted(Path(sys.argv[2]), sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--protocols", default=",".join(PROTOCOLS))
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--concurrency", type=_levels, default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument(
        "--heavy-concurrency",
        type=_levels,
        default=None,
        help="levels for resnet50 and bert_encoder (~0.1-0.2 s per item here); default per "
        "model from its max_batch_size m: 1, m/2, m, 2m (heavy_levels)",
    )
    parser.add_argument("--window-ms", type=int, default=2000)
    parser.add_argument("--in-process-s", type=float, default=1.5)
    parser.add_argument("--copy-requests", type=int, default=20)
    parser.add_argument(
        "--copies-baseline",
        metavar="TREE",
        help="also count copies with the gateway of this source tree (before)",
    )
    parser.add_argument(
        "--paired",
        action="store_true",
        help="in-process best batch right before each point, for ratios on a busy machine",
    )
    parser.add_argument(
        "--repeat",
        type=_repeat,
        default=1,
        metavar="N",
        help="measure every point N times, one pass over all points after another; judge the "
        "goals on the median of the N ratios and count the repeats that met each (implies "
        "in-process references right before the points the goals read, as --paired does)",
    )
    parser.add_argument(
        "--only",
        type=_only,
        default=None,
        metavar="MODEL:PROTOCOL:C,...",
        help="measure just these points (e.g. mlp:http:4,resnet50:shm:16), to settle close "
        "ones without a full sweep; overrides --models, --protocols and the levels, and skips "
        "memory and copies",
    )
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-copies", action="store_true")
    parser.add_argument(
        "--quick", action="store_true", help="errors only: c=1,4,16 (heavy c=1,2), 500 ms windows"
    )
    parser.add_argument("--out-dir", type=Path, default=harness.RESULTS)
    args = parser.parse_args()  # fmt: skip
    harness.exit_on_sigterm()  # the servers it starts stop with it
    if args.quick:
        args.concurrency, args.heavy_concurrency = [1, 4, 16], [1, 2]
        args.window_ms, args.in_process_s, args.copy_requests = 500, 0.3, 3
    models = [m for m in args.models.split(",") if m]
    protocols = [p for p in args.protocols.split(",") if p]
    if args.only:
        models = list(dict.fromkeys(m for m, _, _ in args.only))
        protocols = list(dict.fromkeys(p for _, p, _ in args.only))
        args.no_memory = args.no_copies = True
    targets = [t for t in args.targets.split(",") if t]
    levels = {m: args.concurrency for m in models if m not in HEAVY}
    data: dict[str, Any] = {
        "command": " ".join(["python bench/sweep.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": harness.machine_info(),
        "models": models, "protocols": protocols, "levels": levels,
        "window_ms": args.window_ms, "copy_requests": args.copy_requests,
        "repeat": args.repeat, "only": args.only,
        "points": [], "memory": [], "copies": None,
    }  # fmt: skip
    pa = perf_analyzer()
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        work = Path(tmp)
        (work / "repo").mkdir()
        repo = build_repo(work / "repo", models)
        for m in models:
            if args.only:
                levels[m] = sorted({c for om, _, c in args.only if om == m})
            elif m in HEAVY:
                levels[m] = args.heavy_concurrency or heavy_levels(harness.read_model(repo, m))
        first = in_process(repo, models, args.in_process_s)
        with contextlib.ExitStack() as stack:
            servers: dict[str, tuple[dict[str, str], list[str]]] = {}
            if "gateway" in targets:
                grpc_port = harness.free_port()
                env = {"GATEWAY_LOAD_MODELS": ",".join(models), "GATEWAY_GRPC_PORT": str(grpc_port)}
                gw = harness.start_gateway(repo, work, "--log-level", "warning", env=env,
                                           tag="sweep", ready=tuple(models))  # fmt: skip
                stack.callback(gw.stop)
                wanted = [p for p in protocols if p != "shm" or has_shm(gw.url)]
                servers["gateway"] = ({"http": gw.address, "grpc": f"127.0.0.1:{grpc_port}"},
                                      wanted)  # fmt: skip
            if "triton" in targets:
                from gateway.testing.tritonserver import TritonServer

                triton = stack.enter_context(TritonServer(startup_timeout_s=120.0))
                push_to_triton(triton.http_url, repo, models)
                wanted = [p for p in protocols if p != "shm" or has_shm(triton.http_url)]
                servers["triton"] = ({"http": triton.http_address, "grpc": triton.grpc_url},
                                     wanted)  # fmt: skip
            # A window holds a few runs even of a slow model (0.5 s a run when the machine is
            # busy): perf_analyzer refuses a window in which no request finished.
            windows = {m: max(args.window_ms, round(4 * first[m]["batch1_p50_ms"])) for m in models}
            data["windows_ms"] = windows
            served = {p for _, wanted in servers.values() for p in wanted}
            points_plan = plan(models, [p for p in protocols if p in served], levels, args.only)
            # perf_analyzer: three windows a run and ~1.5 s of its own start and warm-up.
            per_pass_s = sum(len(servers) * (3 * windows[m] / 1e3 + 1.5) for m, _, _ in points_plan)
            minutes = per_pass_s * args.repeat / 60
            print(f"{len(points_plan)} points x {args.repeat} repeat(s): about {minutes:.1f} min "
                  "of perf_analyzer", flush=True)  # fmt: skip
            paired = (
                PairedReference(repo, first, args.window_ms / 1e3, everywhere=args.paired)
                if args.paired or args.repeat > 1
                else None
            )
            data["points"] = sweep(pa, servers, repo, points_plan, windows, work, paired,
                                   args.repeat)  # fmt: skip
            data["loadavg_at_end"] = list(os.getloadavg())
        # Again after the sweep: the better of the two is the limit (the machine is shared).
        data["in_process"] = best_of(first, in_process(repo, models, args.in_process_s))
        if not args.no_memory:
            data["memory"] = memory(repo, models, work)
        if not args.no_copies and "resnet50" in models:
            data["copies"] = copies(repo, "resnet50", work, args.copy_requests)
            if args.copies_baseline:
                data["copies_baseline"] = copies(
                    repo, "resnet50", work, args.copy_requests, args.copies_baseline
                )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    summaries = summarize(data["points"])
    data["plots"] = [m for m in models if plot(summaries, data["in_process"], m,
                                                args.out_dir / f"sweep-{m}.png")]  # fmt: skip
    text = render(data)
    print(text)
    harness.write_results(args.out_dir / "sweep.md", text, data)
    return 1 if any("error" in p for p in data["points"]) else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
