"""What every bench shares: gateway processes on free loopback ports, models and request
bodies, in-process ONNX Runtime timing, wrk, CPU accounting, and writing results.

Benches import this module and nothing from ``tests/`` or from each other, so each one can be
read and changed alone. Run a bench as a script from the repository root
(``.venv/bin/python bench/<name>.py``): Python puts ``bench/`` on the path, and ``import harness``
finds this file.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from gateway.testing.delay_proxy import DelayProxy as DelayProxy  # re-exported for the benches
from gateway.testing.gateway_process import free_port as free_port  # re-exported for the benches
from gateway.testing.gateway_process import serve_command, stop_process, wait_ready

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MODELS = ("mlp", "simple")  # the shipped models most benches drive (``model_repo/``)

# -- models -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str  # v2 name: FP32, INT32
    dims: tuple[int, ...]  # without the batch dimension


@dataclass(frozen=True)
class Model:
    name: str
    max_batch_size: int
    inputs: tuple[Tensor, ...]
    outputs: tuple[str, ...]


_NUMPY = {"FP32": np.float32, "INT32": np.int32, "INT64": np.int64}
_PBTXT_TYPE = {"TYPE_FP32": "FP32", "TYPE_INT32": "INT32", "TYPE_INT64": "INT64"}


def read_model(repo: Path, name: str) -> Model:
    """The little of ``config.pbtxt`` this benchmark needs (max_batch_size, tensor specs)."""
    text = (repo / name / "config.pbtxt").read_text()
    max_bs = int(m.group(1)) if (m := re.search(r"max_batch_size:\s*(\d+)", text)) else 0
    inputs, outputs = [], []
    for kind, body in re.findall(r"\b(input|output)\s*\{([^}]*)\}", text):
        tname = re.search(r'name:\s*"([^"]+)"', body)
        if tname is None:
            continue
        if kind == "output":
            outputs.append(tname.group(1))
            continue
        dtype = re.search(r"data_type:\s*(\w+)", body)
        dims = tuple(int(d) for d in re.findall(r"dims:\s*(-?\d+)", body))
        datatype = _PBTXT_TYPE.get(dtype.group(1) if dtype else "")
        if datatype is None:
            raise RuntimeError(f"{name}: only FP32/INT32/INT64 inputs are supported here")
        inputs.append(Tensor(tname.group(1), datatype, dims))
    return Model(name, max_bs, tuple(inputs), tuple(outputs))


def sample_inputs(model: Model, batch: int, seed: int = 0) -> dict[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for t in model.inputs:
        shape = (batch, *t.dims)
        if t.datatype == "FP32":
            feeds[t.name] = rng.random(shape, dtype=np.float32)
        elif t.datatype == "INT64":  # token ids and masks: small non-negative values
            feeds[t.name] = rng.integers(0, 2, shape, dtype=np.int64)
        else:
            feeds[t.name] = rng.integers(-100, 100, shape, dtype=np.int32)
    return feeds


# -- in-process ONNX Runtime -----------------------------------------------------------------


def batch_sizes(max_batch_size: int) -> list[int]:
    sizes = [1]
    while sizes[-1] * 2 <= max_batch_size:
        sizes.append(sizes[-1] * 2)
    if max_batch_size > sizes[-1]:
        sizes.append(max_batch_size)
    return sizes


def measure_in_process(
    repo: Path, model: Model, intra_op_threads: int, seconds: float, sizes: list[int]
) -> list[dict[str, Any]]:
    """items/s of ``session.run`` at each batch size, sessions set up as the gateway does."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    session = ort.InferenceSession(
        str(repo / model.name / "1" / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    outputs = list(model.outputs)
    points = []
    for batch in sizes:
        feeds = sample_inputs(model, batch)
        for _ in range(5):
            session.run(outputs, feeds)
        # Best of three slices: the machine is shared and noisy, we want what it can do.
        # One clock reading after each run gives the slice's rate and each run's duration.
        best, runs, spent = 0.0, 0, 0.0
        durations: list[float] = []
        for _ in range(3):
            marks = [time.perf_counter()]
            while marks[-1] - marks[0] < seconds / 3:
                session.run(outputs, feeds)
                marks.append(time.perf_counter())
            elapsed = marks[-1] - marks[0]
            best = max(best, (len(marks) - 1) * batch / elapsed)
            runs, spent = runs + len(marks) - 1, spent + elapsed
            durations += np.diff(marks).tolist()
        points.append(
            {
                "threads": intra_op_threads,
                "batch": batch,
                "items_per_s": best,
                "items_per_s_mean": runs * batch / spent,  # the whole window, as wrk counts
                "ms_per_run": batch / best * 1e3,
                "ms_per_run_median": statistics.median(durations) * 1e3,
            }
        )
    return points


# -- request bodies ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Body:
    data: bytes
    headers: dict[str, str]


def perf_analyzer_path() -> str:
    """A working Triton ``perf_analyzer`` (``scripts/perf_analyzer.sh`` finds or fetches it)."""
    out = subprocess.run(
        [str(ROOT / "scripts" / "perf_analyzer.sh")], capture_output=True, text=True, check=True
    )
    return out.stdout.strip().splitlines()[-1]


def _input_entry(t: Tensor, **content: Any) -> dict[str, Any]:
    """One input of a batch-1 request: name, datatype, shape, then ``content`` (its data, or
    the parameters that point at its binary data)."""
    return {"name": t.name, "datatype": t.datatype, "shape": [1, *t.dims], **content}


def binary_body(model: Model) -> Body:
    """JSON header + raw little-endian tensors (the binary tensor data extension)."""
    feeds = sample_inputs(model, 1, seed=1)
    header = {
        "inputs": [
            _input_entry(t, parameters={"binary_data_size": feeds[t.name].nbytes})
            for t in model.inputs
        ],
        "outputs": [{"name": o, "parameters": {"binary_data": True}} for o in model.outputs],
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    raw = b"".join(
        feeds[t.name].astype(feeds[t.name].dtype.newbyteorder("<")).tobytes() for t in model.inputs
    )
    return Body(
        head + raw,
        {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(head)),
        },
    )


def json_body(model: Model) -> Body:
    feeds = sample_inputs(model, 1, seed=1)
    header = {
        "inputs": [_input_entry(t, data=feeds[t.name].reshape(-1).tolist()) for t in model.inputs],
        "outputs": [{"name": o} for o in model.outputs],
    }
    return Body(json.dumps(header).encode(), {"Content-Type": "application/json"})


def check_response(raw: bytes, headers: Any, model: Model) -> None:
    """One request before the load: a 200 with every output of batch 1 (no silent 4xx runs)."""
    length = headers.get("Inference-Header-Content-Length")
    head = json.loads(raw[: int(length)] if length else raw)
    got = {o["name"]: o["shape"] for o in head["outputs"]}
    for name in model.outputs:
        if name not in got or got[name][0] != 1:
            raise RuntimeError(f"{model.name}: bad response outputs {got}")


# -- processes --------------------------------------------------------------------------------


def stop(proc: subprocess.Popen[Any], timeout_s: float = 15.0) -> None:
    """SIGTERM (the gateway drains), then SIGKILL: only this one process, by its PID."""
    stop_process(proc, signal.SIGTERM, timeout_s)


def http(
    url: str, data: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 30
) -> tuple[int, bytes, Any]:
    """(status, body, headers) of one request; an HTTP error status is returned, not raised."""
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers


@dataclass
class Gateway:
    """A ``gateway serve`` subprocess on a loopback port; ``stop`` stops it by PID."""

    proc: subprocess.Popen[Any]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stats(self, model: str) -> dict[str, Any]:
        status, raw, _ = http(f"{self.url}/v2/models/{model}/stats")
        if status != 200:
            raise RuntimeError(f"stats for {model}: HTTP {status}")
        data: dict[str, Any] = json.loads(raw)["model_stats"][0]
        return data

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> None:
        if sig == signal.SIGTERM:
            stop(self.proc, timeout_s)
        elif self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout_s)


def _exit(signum: int, _frame: Any) -> NoReturn:
    raise SystemExit(128 + signum)


def exit_on_sigterm() -> None:
    """Have a SIGTERM to this bench (``kill PID``, a CI step's timeout) exit through Python's
    cleanup, as Ctrl-C does: its ``with`` blocks and ``finally`` clauses then stop the servers it
    started and remove their scratch. Python's default dies at once and leaves them running.
    Called as a bench starts its first server; only from the main thread, and only over the
    default (a handler of the bench's own stays)."""
    main = threading.current_thread() is threading.main_thread()
    if main and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the bench dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def start_gateway(
    repo: Path,
    workdir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    tag: str = "",
    ready: tuple[str, ...] = (),
    launcher: list[str] | None = None,
    ready_s: float = 120.0,
    log: Path | None = None,
    inherit_gateway_env: bool = True,
    detach: bool = False,
) -> Gateway:
    """``gateway serve --model-repo repo *args`` on a free port, returned once ready: each model
    in ``ready`` answers ready (the whole server when empty). ``launcher`` replaces
    ``python -m gateway.cli`` (cycle.py starts it through a script that times it); the log goes
    to ``log`` or ``workdir/gateway-<tag>.log``; without ``inherit_gateway_env`` this shell's
    ``GATEWAY_*`` variables are dropped. ``detach`` runs it in its own session (a terminal's
    Ctrl-C reaches only the bench, which then stops it in order) and has the kernel SIGTERM it
    if the bench dies, even by SIGKILL (Linux)."""
    exit_on_sigterm()
    port = free_port()
    log = log or workdir / f"gateway-{tag or port}.log"
    inherited = {
        k: v for k, v in os.environ.items() if inherit_gateway_env or not k.startswith("GATEWAY_")
    }
    inherited.pop("GATEWAY_CONFIG", None)  # a bench passes its own file, or none
    full_env = {**inherited, "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = serve_command(repo, port, *args, launcher=launcher)
    with log.open("wb") as out:
        # Not from ROOT: there ``-m`` would put this checkout's ``gateway`` ahead of a
        # PYTHONPATH given in ``env`` (variants.py compares source trees that way).
        proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            env=full_env,
            stdin=subprocess.DEVNULL if detach else None,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=detach,
            preexec_fn=_die_with_parent if detach else None,
        )
    gw = Gateway(proc, port, log)
    paths = [f"/v2/models/{m}/ready" for m in ready] or ["/v2/health/ready"]
    try:
        if wait_ready(proc, gw.url, paths, ready_s, probe_timeout_s=2.0):
            return gw
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}; see {log}")
        raise RuntimeError(f"gateway not ready after {ready_s:.0f} s; see {log}")
    except BaseException:
        stop(proc)
        raise


@contextlib.contextmanager
def gateway(
    repo: Path,
    env_extra: dict[str, str],
    workdir: Path,
    tag: str,
    launcher: list[str] | None = None,
    models: tuple[str, ...] = MODELS,
) -> Iterator[Gateway]:
    """A gateway on ``repo`` with ``models`` loaded and ready, stopped on leaving the block."""
    env = {"GATEWAY_LOAD_MODELS": ",".join(models), **env_extra}
    gw = start_gateway(
        repo, workdir, "--log-level", "warning", env=env, tag=tag, ready=models, launcher=launcher
    )
    try:
        yield gw
    finally:
        gw.stop()


def copy_repo(
    repo: Path,
    dest: Path,
    batching: bool = True,
    instance_count: int | None = None,
    models: tuple[str, ...] = MODELS,
) -> Path:
    """A copy of ``models``; batching OFF removes the ``dynamic_batching`` block,
    ``instance_count`` rewrites ``instance_group.count`` (both are config, not code)."""
    for name in models:
        shutil.copytree(repo / name, dest / name)
        cfg = dest / name / "config.pbtxt"
        text = cfg.read_text()
        if not batching:
            text, count = re.subn(r"dynamic_batching\s*\{[^}]*\}", "", text)
            if count != 1:
                raise RuntimeError(f"{cfg}: expected one dynamic_batching block, found {count}")
        if instance_count is not None:
            text = re.sub(r"instance_group\s*\{[^}]*\}", "", text)
            text += f"\ninstance_group {{\n  count: {instance_count}\n  kind: KIND_CPU\n}}\n"
        cfg.write_text(text)
    return dest


# -- CPU accounting ---------------------------------------------------------------------------


def _ticks_s() -> float:
    return float(os.sysconf("SC_CLK_TCK"))


def thread_cpu_s(pid: int) -> dict[int, float]:
    """user+system CPU seconds of each thread of ``pid`` (Linux /proc; empty elsewhere)."""
    out: dict[int, float] = {}
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = task.joinpath("stat").read_text().rsplit(")", 1)[1].split()
                out[int(task.name)] = (int(fields[11]) + int(fields[12])) / _ticks_s()
    return out


def machine_cpu_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with contextlib.suppress(OSError, ValueError):
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = values[3] + values[4]
        total = sum(values[:8])
        return (total - idle) / _ticks_s(), total / _ticks_s()
    return 0.0, 0.0


class CpuWindow:
    """CPU used during one measured wrk run: where did the machine's cores go?"""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.loop_s = self.workers_s = self.wrk_s = 0.0
        self.machine_busy_s = self.machine_total_s = 0.0

    def __enter__(self) -> CpuWindow:
        self._threads = thread_cpu_s(self.pid)
        self._machine = machine_cpu_s()
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._children_s = usage.ru_utime + usage.ru_stime
        return self

    def __exit__(self, *exc: object) -> None:
        threads = thread_cpu_s(self.pid)
        busy, total = machine_cpu_s()
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        deltas = {t: v - self._threads.get(t, 0.0) for t, v in threads.items()}
        self.loop_s = deltas.get(self.pid, 0.0)  # the main thread runs the event loop
        self.workers_s = sum(v for t, v in deltas.items() if t != self.pid)
        self.wrk_s = usage.ru_utime + usage.ru_stime - self._children_s
        self.machine_busy_s = busy - self._machine[0]
        self.machine_total_s = total - self._machine[1]


# -- wrk ---------------------------------------------------------------------------------------

_LUA = """\
local f = assert(io.open({body_path}, "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
{headers}

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRK_JSON {{\\"requests\\":%d,\\"duration_us\\":%d,\\"bytes\\":%d,\\"status_errors\\":%d," ..
    "\\"connect_errors\\":%d,\\"read_errors\\":%d,\\"write_errors\\":%d,\\"timeouts\\":%d," ..
    "\\"p50_us\\":%d,\\"p90_us\\":%d,\\"p99_us\\":%d,\\"max_us\\":%d,\\"mean_us\\":%.1f}}\\n",
    summary.requests, summary.duration, summary.bytes, e.status, e.connect, e.read, e.write,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"""


def lua_script(body: Body, workdir: Path, tag: str) -> Path:
    body_path = workdir / f"{tag}.body"
    body_path.write_bytes(body.data)
    headers = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in body.headers.items())
    script = workdir / f"{tag}.lua"
    script.write_text(_LUA.format(body_path=json.dumps(str(body_path)), headers=headers))
    return script


WRK_ERRORS = ("status_errors", "connect_errors", "read_errors", "write_errors", "timeouts")


def wrk_figures(out: dict[str, Any]) -> tuple[float, int]:
    """(requests per second, errors: non-2xx, socket errors and timeouts) of one wrk run."""
    return out["requests"] / (out["duration_us"] / 1e6), sum(out[k] for k in WRK_ERRORS)


def run_wrk(url: str, script: Path, connections: int, threads: int, seconds: float) -> dict:
    cmd = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
        "--timeout", "10s", "-s", str(script), url,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    match = re.search(r"^WRK_JSON (.*)$", out.stdout, re.M)
    if out.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout}\n{out.stderr}")
    result: dict[str, Any] = json.loads(match.group(1))
    return result


# -- CPU of one process, the machine ----------------------------------------------------------


def process_cpu_s(pid: int) -> float | None:
    """user+system CPU seconds of process ``pid`` (Linux /proc; None elsewhere or once gone)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _ticks_s()
    return None


def machine_info() -> dict[str, Any]:
    """CPUs, load and software versions, written at the top of every result."""
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import onnxruntime as ort

    wrk = ""
    with contextlib.suppress(OSError):
        out = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
        wrk = (out.stdout or out.stderr).split("\n")[0].strip()
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "wrk": wrk,
        "platform": platform.platform(),
    }


# -- a slow host: gateway.testing.delay_proxy.DelayProxy (imported above) ----------------


# -- results ----------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100, numpy's linear interpolation); None when empty."""
    return float(np.percentile(values, q)) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero (a table shows "n/a")."""
    return a / b if a is not None and b else None


def write_results(
    out: Path, markdown: str, data: dict[str, Any] | None = None, quiet: bool = False
) -> Path:
    """``out`` (a ``.md`` file) and, with ``data``, the ``.json`` next to it; returns ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    written = [out]
    if data is not None:
        written.append(out.with_suffix(".json"))
        written[-1].write_text(json.dumps(data, indent=2) + "\n")
    if not quiet:
        print("\nwrote " + " and ".join(str(p) for p in written))
    return out
