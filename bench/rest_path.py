"""REST path bench: the front's CPU per JSON inference request, in-process, without sockets.

Run (from the repository root, with the project's virtual environment)::

    python bench/rest_path.py                          # this tree
    python bench/rest_path.py --compare /work/main     # and another tree, interleaved

What every REST request pays on the event loop besides HTTP parsing and the socket writes:
``HotPath.answer_raw`` (the request's head read, ``DataPlane.submit``: the body decoded, the
request checked against its model and queued), the batch's end (``Pending``), the answer encoded
and handed to the connection. The model is a fake backend shaped like ``simple`` (two INT32[16]
inputs, two outputs: sum and difference), so the backend costs next to nothing; requests come
``--per-batch`` at a time (the fleet bench sees 2.5 to 4) with the bodies the fleet bench's
clients send (JSON, and ``--binary`` for binary tensors and answers).

Per tree, in a process of its own: the thread's CPU time per request over ``--requests``,
``--repeat`` times, trees alternating; the median and its ratio to the first tree. Thread CPU,
not wall time: the machine may be shared, and a run that loses the CPU is not charged for it.
Writes ``bench/results/rest_path.md`` (+ ``.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

# Runs in a process whose PYTHONPATH picks the tree: only APIs both trees have.
CHILD = r"""
import asyncio, json, sys, tempfile, time
from pathlib import Path
from typing import Any
import numpy as np
from gateway.backends.base import Backend, BackendFactory, Executed
from gateway.dataplane import DataPlane
from gateway.repository.config import DynamicBatching, ModelConfig, TensorConfig
from gateway.repository.local import LocalRepository, ModelSource
from gateway.server.app import create_app
from gateway.settings import Settings

requests, per_batch, binary = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
CONFIG = ModelConfig(
    name="simple",
    max_batch_size=8,
    inputs=(TensorConfig("INPUT0", "INT32", (16,)), TensorConfig("INPUT1", "INT32", (16,))),
    outputs=(TensorConfig("OUTPUT0", "INT32", (16,)), TensorConfig("OUTPUT1", "INT32", (16,))),
    dynamic_batching=DynamicBatching(),
)

class Simple(Backend):
    config = CONFIG
    instance_count = 1
    async def execute(self, inputs, outputs, deadline_s=None):
        a, b = inputs["INPUT0"], inputs["INPUT1"]
        return Executed({"OUTPUT0": a + b, "OUTPUT1": a - b}, "", 0.0)
    def ready(self): return True
    async def close(self): pass
    def describe(self): return {"kind": "fake"}

class Factory(BackendFactory):
    async def load(self, source, version): return Simple()

class Repo(LocalRepository):
    def model_names(self): return ["simple"]
    async def startup_names(self): return ["simple"]
    def on_demand(self, name): return False
    async def fetch(self, name): pass
    def source(self, name, config=None):
        return ModelSource(name, self.root, CONFIG, {1: self.root / "x"})

if binary:
    a, b = np.arange(16, dtype=np.int32), np.ones(16, np.int32)
    head = json.dumps({"inputs": [
        {"name": n, "shape": [1, 16], "datatype": "INT32", "parameters": {"binary_data_size": 64}}
        for n in ("INPUT0", "INPUT1")], "parameters": {"binary_data_output": True}}).encode()
    BODY = head + a.tobytes() + b.tobytes()
    HEADERS = [(b"host", b"127.0.0.1"), (b"content-type", b"application/octet-stream"),
               (b"inference-header-content-length", str(len(head)).encode()),
               (b"content-length", str(len(BODY)).encode())]
else:
    BODY = json.dumps({"inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": list(range(16))},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "data": [1] * 16}]}).encode()
    HEADERS = [(b"host", b"127.0.0.1"), (b"accept", b"*/*"), (b"accept-encoding", b"gzip, deflate"),
               (b"user-agent", b"Python/3.11 aiohttp/3.9"), (b"content-type", b"application/json"),
               (b"content-length", str(len(BODY)).encode())]

class Hooks:
    on_lost = None

class Exchange:
    def __init__(self, done):
        self.headers, self.hooks, self.done = HEADERS, Hooks(), done
    def take_body(self): return BODY
    def respond(self, status, headers, body):
        assert status == 200, body
        self.done()
    def abort(self): raise AssertionError("aborted")

async def main():
    tmp = Path(tempfile.mkdtemp())
    plane = DataPlane(Settings(batch_pipeline=0, access_log=False), Repo(tmp), Factory())
    await plane.start()
    app = create_app(plane)
    route = ("simple", None)
    loop = asyncio.get_running_loop()
    async def run(count):
        left = count
        while left > 0:
            n = min(per_batch, left)
            waiter = loop.create_future()
            remaining = [n]
            def one():
                remaining[0] -= 1
                if not remaining[0]:
                    waiter.set_result(None)
            for _ in range(n):
                app.answer_raw(Exchange(one), route)
            await waiter
            left -= n
    await run(2000)  # warm: caches, allocator
    cpu0 = time.thread_time()
    await run(requests)
    cpu = time.thread_time() - cpu0
    await plane.stop()
    print(json.dumps({"us_per_request": cpu / requests * 1e6}))

asyncio.run(main())
"""


def once(tree: str, args: argparse.Namespace) -> float:
    env = {**os.environ, "PYTHONPATH": tree}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(args.requests), str(args.per_batch),
         "1" if args.binary else "0"],
        env=env, capture_output=True, text=True, timeout=300, cwd="/",
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"{tree}: {out.stderr[-3000:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["us_per_request"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compare", action="append", default=[], help="another source tree")
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--per-batch", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--binary", action="store_true", help="binary tensors and answers")
    parser.add_argument("--quick", action="store_true", help="3000 requests, 2 repeats")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "rest_path.md"))
    args = parser.parse_args()
    if args.quick:
        args.requests, args.repeat = 3000, 2
    import harness

    trees = {"this": str(ROOT)} | {Path(p).name or p: str(Path(p).resolve()) for p in args.compare}
    info = harness.machine_info()
    samples: dict[str, list[float]] = {name: [] for name in trees}
    for i in range(args.repeat):
        order = list(trees.items())
        for name, path in order if i % 2 == 0 else order[::-1]:
            samples[name].append(once(path, args))
            print(f"{name}: {samples[name][-1]:.1f} us per request", flush=True)
    first = statistics.median(samples["this"])
    kind = "binary tensors, binary answers" if args.binary else "JSON tensors, JSON answers"
    lines = [
        "# REST path: front CPU per inference request, in-process",
        "",
        f"Command: `python bench/rest_path.py {' '.join(sys.argv[1:])}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {info['nproc']} CPUs "
        f"({info['cpu']}), load average at start {info['loadavg_at_start'][0]:.1f}, Python "
        f"{info['python']}  ",
        f"Setup: `HotPath.answer_raw` to the answer handed to the connection, a fake backend "
        f"shaped like `simple`, {args.per_batch} requests per batch, {kind}; thread CPU per "
        f"request over {args.requests} requests, {args.repeat} runs per tree, trees "
        "alternating. Sockets and HTTP parsing are not in it (see `fleet.md` for the whole "
        "front).",
        "",
        "| tree | CPU per request, median (us) | runs (us) | ratio to this tree |",
        "|---|---:|---|---:|",
    ]
    rows: list[dict[str, Any]] = []
    for name, got in samples.items():
        median = statistics.median(got)
        runs = ", ".join(f"{v:.1f}" for v in got)
        lines.append(f"| {name} | {median:.1f} | {runs} | {median / first:.2f} |")
        rows.append({"tree": name, "median_us": median, "runs_us": got})
    report = "\n".join(lines) + "\n"
    print(report)
    harness.write_results(Path(args.out), report, {"rows": rows, "machine": info})
    return 0


if __name__ == "__main__":
    sys.exit(main())
