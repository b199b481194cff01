"""Soak benchmark: the gateway under moderate fixed-rate load for minutes, watched for leaks.

Run (from the repository root, with the project's virtual environment)::

    python bench/soak.py                          # 10 minutes at 200 req/s (the default)
    python bench/soak.py --minutes 1              # a short check
    python bench/soak.py --minutes 30 --rate 300 --models simple

One run:

1. starts ``gateway serve`` on the shipped ``model_repo/`` as a subprocess on a free loopback
   port (its log, access log included, goes to ``bench/out/soak/gateway.log``, a file, not a pipe
   that could fill) and waits for ``/v2/health/ready``;
2. checks every request body once: the valid ones must answer 200 with every output, the
   malformed ones 400 with ``{"error": ...}``;
3. drives an open-loop load with aiohttp: requests are sent on a fixed schedule (``--rate`` per
   second), whether or not earlier ones have answered, at most ``--concurrency`` in flight (a
   request due while that many are in flight is not sent and counted as shed). The mix: ``simple``
   and ``mlp`` with JSON and binary-tensor bodies (batch 1, 2 or 4) and ``--bad-share`` malformed
   requests (bad JSON, wrong datatype, wrong shape, unknown tensors, short binary data, a 256 KiB
   binary body with a bad size, ...) that must all get 400: bad input must not leak either.
   The load stops by itself after ``--minutes`` or ``rate x minutes`` requests;
4. every ``--sample-s`` seconds samples the gateway process: RSS (``VmRSS`` in
   ``/proc/<pid>/status``), open fds, threads, CPU time, and the sum of
   ``nv_inference_pending_request_count`` from ``/metrics``;
5. reports requests sent / ok / expected 400 / unexpected errors / shed, p50 and p99 latency per
   minute, RSS after the ``--warmup-s`` warm-up, max and end, growth in MiB and %, a
   least-squares RSS slope (MiB/hour) over the second half of the run after warm-up (a one-off
   step is not a leak), fds at start and once the client has closed its connections, and a
   verdict; writes
   ``bench/results/soak.md`` and ``bench/results/soak.json``.

The verdict passes when there are no unexpected errors, RSS grew less than ``--max-growth-pct``,
the slope is below ``--max-slope-mib-h`` (judged only over at least ``--min-slope-window-s``:
a short run's slope is noise), fds grew by at most ``--max-fd-growth`` and nothing
is pending once the load has stopped.

Ctrl-C (or SIGTERM) once stops the load early and still writes the results, marked interrupted;
a second Ctrl-C aborts. The gateway is stopped by its PID on every way out (and gets SIGTERM
from the kernel if this script is killed outright).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import random
import re
import resource
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from harness import Model, http, percentile, read_model, sample_inputs, start_gateway, stop
from harness import machine_info as harness_machine_info

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
MODELS = ("simple", "mlp")
# Weights of the valid request kinds (model, encoding); the malformed share is --bad-share.
VALID_WEIGHTS = {
    ("simple", "json"): 3,
    ("simple", "binary"): 3,
    ("mlp", "binary"): 2,
    ("mlp", "json"): 1,
}
BATCHES = (1, 1, 2, 4)  # batch sizes of the valid bodies, cycled; mostly single items


# -- models and request bodies ----------------------------------------------------------------


@dataclass(frozen=True)
class Body:
    kind: str  # "simple json", "mlp binary", "bad: wrong-datatype (simple)", ...
    model: str
    data: bytes
    headers: dict[str, str]
    expect: int  # 200 or 400
    outputs: tuple[str, ...] = ()  # outputs a 200 must carry


def json_request(
    model: Model, batch: int, seed: int, edit: Any = None
) -> tuple[bytes, dict[str, str]]:
    arrays = sample_inputs(model, batch, seed)
    header: dict[str, Any] = {
        "id": f"soak-{seed}",
        "inputs": [
            {
                "name": t.name,
                "datatype": t.datatype,
                "shape": [batch, *t.dims],
                "data": arrays[t.name].reshape(-1).tolist(),
            }
            for t in model.inputs
        ],
        "outputs": [{"name": o} for o in model.outputs],
    }
    if edit is not None:
        edit(header)
    return json.dumps(header).encode(), {"Content-Type": "application/json"}


def binary_request(
    model: Model, batch: int, seed: int, edit: Any = None, trim: int = 0
) -> tuple[bytes, dict[str, str]]:
    """JSON header + raw little-endian tensors (the binary tensor data extension)."""
    arrays = sample_inputs(model, batch, seed)
    header: dict[str, Any] = {
        "inputs": [
            {
                "name": t.name,
                "datatype": t.datatype,
                "shape": [batch, *t.dims],
                "parameters": {"binary_data_size": arrays[t.name].nbytes},
            }
            for t in model.inputs
        ],
        "outputs": [{"name": o, "parameters": {"binary_data": True}} for o in model.outputs],
    }
    if edit is not None:
        edit(header)
    head = json.dumps(header, separators=(",", ":")).encode()
    raw = b"".join(
        arrays[t.name].astype(arrays[t.name].dtype.newbyteorder("<")).tobytes()
        for t in model.inputs
    )
    data = head + (raw[:-trim] if trim else raw)
    return data, {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(head)),
    }


def valid_bodies(model: Model, encoding: str, variants: int = 4) -> list[Body]:
    out = []
    for i in range(variants):
        batch = min(BATCHES[i % len(BATCHES)], model.max_batch_size or 1)
        if model.max_batch_size == 0:
            raise RuntimeError(f"{model.name}: non-batching models are not supported here")
        make = json_request if encoding == "json" else binary_request
        data, headers = make(model, batch, seed=100 + i)
        out.append(Body(f"{model.name} {encoding}", model.name, data, headers, 200, model.outputs))
    return out


def malformed_bodies(model: Model) -> list[Body]:
    """Requests the gateway must refuse with 400 (and forget: no memory kept for them)."""
    first = model.inputs[0]
    other_type = "INT32" if first.datatype == "FP32" else "FP32"

    def bad(tag: str, data: bytes, headers: dict[str, str]) -> Body:
        return Body(f"bad: {tag} ({model.name})", model.name, data, headers, 400)

    def set_first(key: str, value: Any) -> Any:
        return lambda h: h["inputs"][0].__setitem__(key, value)

    def retype_first(h: dict[str, Any]) -> None:
        """Declare the other datatype, with data that suits it: the model's check refuses it."""
        first_input = h["inputs"][0]
        first_input["datatype"] = other_type
        cast = int if other_type == "INT32" else float
        first_input["data"] = [cast(x) for x in first_input["data"]]

    def drop_data_item(h: dict[str, Any]) -> None:
        h["inputs"][0]["data"] = h["inputs"][0]["data"][:-1]

    def unknown_output(h: dict[str, Any]) -> None:
        h["outputs"] = [{"name": "NO_SUCH_OUTPUT"}]

    def first_only_once(h: dict[str, Any]) -> None:
        h["inputs"] = h["inputs"][:1] if len(h["inputs"]) > 1 else []

    truncated, json_headers = json_request(model, 1, 7)
    big_batch = max(1, model.max_batch_size)
    bodies = [
        bad("truncated JSON", truncated[: len(truncated) // 2], json_headers),
        bad("wrong datatype", *json_request(model, 1, 7, retype_first)),
        bad("data shorter than shape", *json_request(model, 1, 7, drop_data_item)),
        bad("unknown input", *json_request(model, 1, 7, set_first("name", "NO_SUCH_INPUT"))),
        bad("missing input", *json_request(model, 1, 7, first_only_once)),
        bad("unknown output", *json_request(model, 1, 7, unknown_output)),
        bad("batch above max_batch_size", *json_request(model, model.max_batch_size + 1, 7)),
        # Binary bodies: fewer bytes than binary_data_size says, and a header length past the end.
        bad(
            f"binary short by 4 bytes, batch {big_batch}",
            *binary_request(model, big_batch, 7, trim=4),
        ),
    ]
    data, headers = binary_request(model, 1, 7)
    headers = {**headers, "Inference-Header-Content-Length": str(len(data) + 10)}
    bodies.append(bad("header length past the body", data, headers))
    return bodies


def build_mix(
    repo: Path, models: list[str], bad_share: float
) -> tuple[list[tuple[str, list[Body]]], list[float]]:
    """The request kinds with their bodies and weights (normalised to 1)."""
    specs = {name: read_model(repo, name) for name in models}
    kinds: list[tuple[str, list[Body]]] = []
    weights: list[float] = []
    valid = {k: w for k, w in VALID_WEIGHTS.items() if k[0] in specs}
    total_valid = sum(valid.values())
    for (name, encoding), weight in valid.items():
        kinds.append((f"{name} {encoding}", valid_bodies(specs[name], encoding)))
        weights.append((1 - bad_share) * weight / total_valid)
    bad = [b for name in specs for b in malformed_bodies(specs[name])]
    for b in bad:
        kinds.append((b.kind, [b]))
        weights.append(bad_share / len(bad))
    return kinds, weights


def check_body(status: int, headers: Any, raw: bytes, body: Body) -> str | None:
    """None when the answer is what ``body`` expects, else what was wrong."""
    if status != body.expect:
        return f"HTTP {status}: {raw[:200]!r}"
    try:
        if body.expect != 200:
            error = json.loads(raw).get("error")
            return None if isinstance(error, str) and error else f"no error message: {raw[:200]!r}"
        length = headers.get("Inference-Header-Content-Length")
        head = json.loads(raw[: int(length)] if length else raw)
        got = {o["name"] for o in head["outputs"]}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"unreadable {status} body ({exc}): {raw[:200]!r}"
    missing = [o for o in body.outputs if o not in got]
    return f"missing outputs {missing}" if missing else None


# -- the gateway process ----------------------------------------------------------------------


@contextlib.contextmanager
def gateway(repo: Path, log: Path) -> Iterator[tuple[subprocess.Popen[Any], str, list[str]]]:
    log.parent.mkdir(parents=True, exist_ok=True)
    args = ["--host", "127.0.0.1"]
    gw = start_gateway(
        repo, log.parent, *args, "--log-level", "info", env={"GATEWAY_ACCESS_LOG": "true"},
        log=log, ready_s=180.0, detach=True,
    )  # fmt: skip
    try:
        shown = ["gateway", "serve", "--model-repo", str(repo), *args, "--port", str(gw.port)]
        yield gw.proc, gw.url, [*shown, "--log-level", "info"]
    finally:
        stop(gw.proc, timeout_s=40.0)


# -- sampling the gateway ---------------------------------------------------------------------


def proc_sample(pid: int) -> dict[str, Any]:
    """RSS, peak RSS, threads, open fds and CPU seconds of ``pid`` from /proc (Linux)."""
    out: dict[str, Any] = {}
    status = Path(f"/proc/{pid}/status").read_text()
    for key, name in (("VmRSS", "rss_mib"), ("VmHWM", "hwm_mib")):
        if m := re.search(rf"^{key}:\s*(\d+)\s*kB", status, re.M):
            out[name] = int(m.group(1)) / 1024
    if m := re.search(r"^Threads:\s*(\d+)", status, re.M):
        out["threads"] = int(m.group(1))
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    out["cpu_s"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


_PENDING = re.compile(r"^nv_inference_pending_request_count\{[^}]*\}\s+(\S+)", re.M)


async def pending_requests(session: aiohttp.ClientSession, url: str) -> float | None:
    """Sum of ``nv_inference_pending_request_count`` over models (queued or executing)."""
    try:
        async with session.get(f"{url}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as r:
            text = await r.text()
    except (aiohttp.ClientError, TimeoutError):
        return None
    return sum(float(v) for v in _PENDING.findall(text))


# -- the load ---------------------------------------------------------------------------------


@dataclass
class Minute:
    sent: int = 0
    ok: int = 0
    bad_400: int = 0
    unexpected: int = 0
    shed: int = 0  # due while --concurrency requests were in flight: not sent
    late: int = 0  # sent more than 50 ms after its scheduled time (the client fell behind)
    latencies_ms: list[float] = field(default_factory=list)  # answered 200s only


@dataclass
class Load:
    minutes: list[Minute] = field(default_factory=list)
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)  # "kind: reason" -> count
    error_examples: list[str] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    unfinished: int = 0
    max_lag_ms: float = 0.0
    load_s: float = 0.0
    gateway_exit: int | None = None

    def minute(self, index: int) -> Minute:
        while len(self.minutes) <= index:
            self.minutes.append(Minute())
        return self.minutes[index]

    def error(self, kind: str, reason: str) -> None:
        short = re.sub(r"\d+(\.\d+)?", "N", reason.split(":")[0])[:80]
        key = f"{kind}: {short}"
        self.errors[key] = self.errors.get(key, 0) + 1
        if len(self.error_examples) < 20:
            self.error_examples.append(f"{kind}: {reason}")


async def soak(
    args: argparse.Namespace,
    url: str,
    proc: subprocess.Popen[Any],
    kinds: list[tuple[str, list[Body]]],
    weights: list[float],
    interrupted: asyncio.Event,
) -> Load:
    loop = asyncio.get_running_loop()
    load = Load()
    duration = args.minutes * 60
    total = math.ceil(args.rate * duration)
    rng = random.Random(args.seed)
    counters = [0] * len(kinds)
    timeout = aiohttp.ClientTimeout(total=args.timeout_s)
    connector = aiohttp.TCPConnector(limit=args.concurrency, force_close=False)
    sample_connector = aiohttp.TCPConnector(limit=1)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        aiohttp.ClientSession(connector=sample_connector) as sampler_session,
    ):
        infer_urls = {m: f"{url}/v2/models/{m}/infer" for m in MODELS}
        t0 = loop.time()

        async def one(body: Body, minute: Minute) -> None:
            start = time.perf_counter()
            try:
                async with session.post(
                    infer_urls[body.model], data=body.data, headers=body.headers
                ) as resp:
                    raw = await resp.read()
                    status, headers = resp.status, resp.headers
            except (aiohttp.ClientError, TimeoutError) as exc:
                minute.unexpected += 1
                load.by_kind[body.kind]["unexpected"] += 1
                load.error(body.kind, f"{type(exc).__name__}: {exc}")
                return
            elapsed_ms = (time.perf_counter() - start) * 1e3
            problem = check_body(status, headers, raw, body)
            if problem is not None:
                minute.unexpected += 1
                load.by_kind[body.kind]["unexpected"] += 1
                load.error(body.kind, problem)
            elif body.expect == 200:
                minute.ok += 1
                minute.latencies_ms.append(elapsed_ms)
                load.by_kind[body.kind]["ok"] += 1
            else:
                minute.bad_400 += 1
                load.by_kind[body.kind]["expected_400"] += 1

        async def sample(phase: str) -> None:
            with contextlib.suppress(OSError, ValueError, IndexError):
                s = {"t_s": round(loop.time() - t0, 2), "phase": phase, **proc_sample(proc.pid)}
                s["pending"] = await pending_requests(sampler_session, url)
                load.samples.append(s)

        async def sampler() -> None:
            while True:
                await asyncio.sleep(args.sample_s)
                await sample("load")

        for name, _ in kinds:
            load.by_kind.setdefault(
                name, {"sent": 0, "ok": 0, "expected_400": 0, "unexpected": 0, "shed": 0}
            )
        await sample("start")
        sampler_task = asyncio.create_task(sampler())
        inflight: set[asyncio.Task[None]] = set()
        sent = 0
        try:
            while sent < total and not interrupted.is_set():
                now = loop.time()
                if now - t0 >= duration:
                    break
                if proc.poll() is not None:
                    load.gateway_exit = proc.returncode
                    break
                due = min(total, int((now - t0) * args.rate) + 1)
                while sent < due:
                    i = rng.choices(range(len(kinds)), weights)[0]
                    name, bodies = kinds[i]
                    body = bodies[counters[i] % len(bodies)]
                    counters[i] += 1
                    lag = now - (t0 + sent / args.rate)
                    minute = load.minute(int((now - t0) // 60))
                    load.by_kind[name]["sent"] += 1
                    minute.sent += 1
                    if lag > 0.05:
                        minute.late += 1
                    load.max_lag_ms = max(load.max_lag_ms, lag * 1e3)
                    if len(inflight) >= args.concurrency:
                        minute.shed += 1
                        load.by_kind[name]["shed"] += 1
                    else:
                        task = asyncio.create_task(one(body, minute))
                        inflight.add(task)
                        task.add_done_callback(inflight.discard)
                    sent += 1
                delay = t0 + sent / args.rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            load.load_s = loop.time() - t0
            # The load has stopped: let what is in flight finish (bounded), then look again.
            if inflight:
                _, still = await asyncio.wait(inflight, timeout=args.timeout_s + 5)
                load.unfinished = len(still)
                for task in still:
                    task.cancel()
            # Close the client's keep-alive connections first: fds still open after that are
            # the gateway's own (a leak), not the sockets of clients that are still connected.
            await session.close()
            await asyncio.sleep(2.0)
            await sample("after")
        finally:
            sampler_task.cancel()
            for task in list(inflight):
                task.cancel()
            await asyncio.gather(sampler_task, *inflight, return_exceptions=True)
    if proc.poll() is not None and load.gateway_exit is None:
        load.gateway_exit = proc.returncode
    return load


def preflight(url: str, kinds: list[tuple[str, list[Body]]]) -> dict[str, str]:
    """Every body once: valid ones 200 with their outputs, malformed ones 400 with a message."""
    messages, problems = {}, []
    for name, bodies in kinds:
        for body in bodies:
            status, raw, headers = http(
                f"{url}/v2/models/{body.model}/infer", body.data, body.headers
            )
            problem = check_body(status, headers, raw, body)
            if problem is not None:
                problems.append(f"{name}: expected {body.expect}, got {problem}")
            elif body.expect == 400:
                messages[name] = json.loads(raw)["error"]
    if problems:
        raise RuntimeError("preflight failed:\n  " + "\n  ".join(problems))
    return messages


# -- summary ----------------------------------------------------------------------------------


def summarise(load: Load, args: argparse.Namespace) -> dict[str, Any]:
    samples = load.samples
    totals = {
        k: sum(getattr(m, k) for m in load.minutes)
        for k in ("sent", "ok", "bad_400", "unexpected", "shed", "late")
    }
    totals["unexpected"] += load.unfinished
    all_lat = [x for m in load.minutes for x in m.latencies_ms]
    per_minute = []
    for i, m in enumerate(load.minutes):
        inside = [s for s in samples if i * 60 < s["t_s"] <= (i + 1) * 60 and s["phase"] == "load"]
        last = inside[-1] if inside else None
        cpu = None
        if len(inside) >= 2:
            cpu = (inside[-1]["cpu_s"] - inside[0]["cpu_s"]) / (
                inside[-1]["t_s"] - inside[0]["t_s"]
            )
        per_minute.append(
            {
                "minute": i + 1,
                "sent": m.sent,
                "ok": m.ok,
                "bad_400": m.bad_400,
                "unexpected": m.unexpected,
                "shed": m.shed,
                "late": m.late,
                "p50_ms": percentile(m.latencies_ms, 50),
                "p99_ms": percentile(m.latencies_ms, 99),
                "rss_mib": last["rss_mib"] if last else None,
                "fds": last["fds"] if last else None,
                "threads": last["threads"] if last else None,
                "pending_max": max((s["pending"] or 0 for s in inside), default=None),
                "gateway_cores": cpu,
            }
        )
    warm = [s for s in samples if s["t_s"] >= args.warmup_s]
    warm_note = None
    if len(warm) < 2:
        warm, warm_note = samples, f"fewer than 2 samples after the {args.warmup_s} s warm-up"
    rss: dict[str, Any] = {}
    if warm:
        start, end = warm[0], samples[-1]
        # The slope over the second half of the run after warm-up: a one-off step (a burst of
        # connections and their buffers) is not growth; a leak keeps climbing there too.
        steady = [x for x in warm if x["t_s"] >= (warm[0]["t_s"] + warm[-1]["t_s"]) / 2]
        t = np.array([s["t_s"] for s in steady]) / 3600
        y = np.array([s["rss_mib"] for s in steady])
        slope = float(np.polyfit(t, y, 1)[0]) if len(steady) >= 3 and t[-1] > t[0] else None
        rss = {
            "first_mib": samples[0]["rss_mib"],
            "start_mib": start["rss_mib"],
            "start_t_s": start["t_s"],
            "max_mib": max(s["rss_mib"] for s in warm),
            "max_overall_mib": max(s["rss_mib"] for s in samples),
            "end_mib": end["rss_mib"],
            "growth_mib": end["rss_mib"] - start["rss_mib"],
            "growth_pct": 100 * (end["rss_mib"] - start["rss_mib"]) / start["rss_mib"],
            "slope_mib_per_h": slope,
            "slope_window_s": steady[-1]["t_s"] - steady[0]["t_s"] if steady else 0.0,
            "hwm_end_mib": end.get("hwm_mib"),
            "fds_start": start["fds"],
            "fds_end": end["fds"],
            "fds_max": max(s["fds"] for s in samples),
            "threads_start": start["threads"],
            "threads_end": end["threads"],
            "pending_max": max((s["pending"] or 0 for s in samples), default=0),
            "pending_end": end["pending"],
            "note": warm_note,
        }
    return {
        "totals": totals,
        "achieved_rate": totals["sent"] / load.load_s if load.load_s else 0.0,
        "max_send_lag_ms": load.max_lag_ms,
        "p50_ms": percentile(all_lat, 50),
        "p99_ms": percentile(all_lat, 99),
        "per_minute": per_minute,
        "rss": rss,
    }


def verdict(
    summary: dict[str, Any], load: Load, args: argparse.Namespace, interrupted: bool
) -> tuple[str, list[str]]:
    checks: list[tuple[bool | None, str]] = []
    t, r = summary["totals"], summary["rss"]
    checks.append((t["unexpected"] == 0, f"unexpected errors {t['unexpected']} (must be 0)"))
    if load.gateway_exit is not None:
        checks.append((False, f"the gateway exited during the run with {load.gateway_exit}"))
    if r:
        checks.append(
            (
                r["growth_pct"] < args.max_growth_pct,
                f"RSS growth after warm-up {r['growth_mib']:+.1f} MiB "
                f"({r['growth_pct']:+.1f} %, must be < {args.max_growth_pct} %)",
            )
        )
        slope = r["slope_mib_per_h"]
        text = "n/a" if slope is None else f"{slope:+.1f} MiB/h"
        if slope is None or r["slope_window_s"] < args.min_slope_window_s:
            checks.append(
                (
                    None,
                    f"RSS slope {text} over {r['slope_window_s']:.0f} s: not judged "
                    f"(needs >= {args.min_slope_window_s:.0f} s after warm-up)",
                )
            )
        else:
            checks.append(
                (
                    slope < args.max_slope_mib_h,
                    f"RSS slope {text} (must be < {args.max_slope_mib_h} MiB/h)",
                )
            )
        grown = r["fds_end"] - r["fds_start"]
        checks.append(
            (
                grown <= args.max_fd_growth,
                f"open fds {r['fds_start']} -> {r['fds_end']} "
                f"(growth must be <= {args.max_fd_growth})",
            )
        )
        checks.append(
            (
                r["pending_end"] == 0,
                f"pending requests after the load {fmt(r['pending_end'], '.0f')} (must be 0)",
            )
        )
    else:
        checks.append((False, "no RSS samples"))
    if t["shed"]:
        checks.append(
            (
                None,
                f"note: {t['shed']} requests shed at the concurrency bound "
                f"({args.concurrency}): the target rate was not fully offered",
            )
        )
    failed = any(ok is False for ok, _ in checks)
    word = "FAIL" if failed else "PASS"
    if interrupted:
        word = "INCOMPLETE (interrupted)" + (", FAIL" if failed else "")
    elif not failed and any(ok is None and "not judged" in msg for ok, msg in checks):
        word = "PASS (short run: slope not judged)"
    lines = [f"{'ok' if ok else 'FAIL' if ok is False else '--'}: {msg}" for ok, msg in checks]
    return word, lines


def gateway_log_summary(log: Path) -> dict[str, Any]:
    """Access lines by status, warnings/errors, size of the gateway's log."""
    out: dict[str, Any] = {
        "path": str(log.relative_to(ROOT) if log.is_relative_to(ROOT) else log),
        "bytes": 0,
        "lines": 0,
        "access_by_status": {},
        "levels": {},
        "examples": [],
    }
    if not log.exists():
        return out
    out["bytes"] = log.stat().st_size
    with log.open("rb") as f:
        for raw in f:
            out["lines"] += 1
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(rec, dict):
                continue
            level = str(rec.get("level", ""))
            out["levels"][level] = out["levels"].get(level, 0) + 1
            if rec.get("logger") == "gateway.access":
                status = str(rec.get("status"))
                out["access_by_status"][status] = out["access_by_status"].get(status, 0) + 1
            elif level in ("warning", "error", "critical") and len(out["examples"]) < 5:
                out["examples"].append(str(rec.get("msg"))[:200])
    return out


# -- output -----------------------------------------------------------------------------------


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "" if value is None else format(value, spec)


def minute_table(per_minute: list[dict[str, Any]]) -> list[str]:
    head = [
        "min",
        "sent",
        "ok",
        "400 (expected)",
        "unexpected",
        "shed",
        "late",
        "p50 ms",
        "p99 ms",
        "RSS MiB",
        "fds",
        "threads",
        "pending max",
        "gateway cores",
    ]
    rows = [
        [
            str(m["minute"]),
            str(m["sent"]),
            str(m["ok"]),
            str(m["bad_400"]),
            str(m["unexpected"]),
            str(m["shed"]),
            str(m["late"]),
            fmt(m["p50_ms"], ".2f"),
            fmt(m["p99_ms"], ".2f"),
            fmt(m["rss_mib"]),
            fmt(m["fds"], "d"),
            fmt(m["threads"], "d"),
            fmt(m["pending_max"], ".0f"),
            fmt(m["gateway_cores"], ".2f"),
        ]
        for m in per_minute
    ]
    return [
        "| " + " | ".join(head) + " |",
        "|---" + "|---:" * (len(head) - 1) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def summary_lines(result: dict[str, Any]) -> list[str]:
    s, t, r = result["summary"], result["summary"]["totals"], result["summary"]["rss"]
    lines = [
        f"requests: sent {t['sent']}, ok {t['ok']}, expected 400 {t['bad_400']}, "
        f"unexpected errors {t['unexpected']}, shed {t['shed']}, late {t['late']} "
        f"(offered {s['achieved_rate']:.1f} req/s of {result['args']['rate']:g} target; "
        f"sends at most {s['max_send_lag_ms']:.0f} ms behind schedule)",
        f"latency of the 200s: p50 {fmt(s['p50_ms'], '.2f')} ms, p99 {fmt(s['p99_ms'], '.2f')} ms "
        "over the run",
    ]
    if r:
        lines += [
            f"RSS: {r['first_mib']:.1f} MiB at load start, {r['start_mib']:.1f} MiB after warm-up "
            f"(t={r['start_t_s']:.0f} s), max {r['max_mib']:.1f}, end {r['end_mib']:.1f} MiB; "
            f"growth {r['growth_mib']:+.1f} MiB ({r['growth_pct']:+.1f} %); slope "
            f"{fmt(r['slope_mib_per_h'], '+.1f') or 'n/a'} MiB/h over {r['slope_window_s']:.0f} s",
            f"fds {r['fds_start']} -> {r['fds_end']} (max {r['fds_max']}), threads "
            f"{r['threads_start']} -> {r['threads_end']}, pending max {r['pending_max']:.0f}, "
            f"after the load {fmt(r['pending_end'], '.0f')}",
        ]
        if r["note"]:
            lines.append(f"note: {r['note']}")
    return lines


def render_markdown(result: dict[str, Any]) -> str:
    info, args, gw = result["machine"], result["args"], result["gateway_log"]
    default = args["minutes"] == DEFAULT_MINUTES
    title = f"# Soak: {args['minutes']:g} min at {args['rate']:g} req/s"
    lines = [title, ""]
    if not default:
        lines += [
            f"**A {args['minutes']:g}-minute run** (the default is {DEFAULT_MINUTES:g} minutes: "
            "`python bench/soak.py`). Too short for the RSS slope to mean anything; it checks "
            "that the benchmark works and that nothing fails.",
            "",
        ]
    lines += [
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}  ",
        f"Machine: {info['nproc']} CPUs, {info['cpu']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in info['loadavg_at_start'])}; {info['platform']}  ",
        f"Software: Python {info['python']}, onnxruntime {info['onnxruntime']}, "
        f"aiohttp {info['aiohttp']}  ",
        f"Gateway: `{result['gateway_command']}`"
        + (f" with `{result['gateway_env']}`" if result["gateway_env"] else "")
        + f"; log (access log included) in `{gw['path']}`  ",
        f"Load: open loop, aiohttp, {args['rate']:g} req/s scheduled, at most "
        f"{args['concurrency']} in flight, {args['timeout_s']:g} s timeout, models "
        f"{', '.join(args['models'])}, {100 * args['bad_share']:.0f} % malformed; client on the "
        f"same machine (client CPU {result['client_cpu_s']:.0f} s). Samples every "
        f"{args['sample_s']:g} s; warm-up {args['warmup_s']:g} s.",
        "",
        f"## Verdict: {result['verdict']}",
        "",
        *(f"- {c}" for c in result["checks"]),
        "",
        "## Summary",
        "",
        *(f"- {x}" for x in summary_lines(result)),
        "",
        "## Per minute",
        "",
        "sent includes shed; p50/p99 over the 200s sent in that minute (client-side, from send to "
        "last byte); RSS, fds and threads from the last sample of the minute; pending = "
        "`nv_inference_pending_request_count` summed over models; gateway cores = its CPU seconds "
        "per second.",
        "",
        *minute_table(result["summary"]["per_minute"]),
        "",
        "## Request kinds",
        "",
        "| kind | sent | ok | expected 400 | unexpected | shed |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| {k} | {v['sent']} | {v['ok']} | {v['expected_400']} | {v['unexpected']} | "
            f"{v['shed']} |"
            for k, v in result["by_kind"].items()
        ),
        "",
        "The gateway's answers to the malformed requests (checked once before the load):",
        "",
        *(f"- {k}: `{v}`" for k, v in result["bad_messages"].items()),
        "",
        "## Gateway log",
        "",
        f"{gw['lines']} lines, {gw['bytes'] / MIB:.1f} MiB; access lines by status: "
        f"{json.dumps(gw['access_by_status'], sort_keys=True)}; levels: "
        f"{json.dumps(gw['levels'], sort_keys=True)}",
    ]
    t = result["summary"]["totals"]
    pre = result["preflight_counts"]
    lines += [
        "",
        f"The client saw {t['ok']} + {pre['200']} preflight 200s and {t['bad_400']} + "
        f"{pre['400']} preflight 400s (requests cut off at the end of the load may be logged "
        "but not counted).",
    ]
    if gw["examples"]:
        lines += ["", "Warnings/errors (first few):", "", *(f"- `{e}`" for e in gw["examples"])]
    if result["errors"]:
        lines += ["", "## Unexpected errors", "", "| kind: reason | count |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in result["errors"].items()]
        lines += ["", "Examples:", "", *(f"- `{e}`" for e in result["error_examples"])]
    lines += [
        "",
        "## Samples",
        "",
        "| t s | phase | RSS MiB | fds | threads | pending | CPU s |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {s['t_s']:.0f} | {s['phase']} | {s['rss_mib']:.1f} | {s['fds']} | {s['threads']} | "
        f"{fmt(s['pending'], '.0f')} | {s['cpu_s']:.1f} |"
        for s in result["samples"]
    ]
    return "\n".join(lines) + "\n"


def machine_info() -> dict[str, Any]:
    return {**harness_machine_info(), "aiohttp": aiohttp.__version__}


# -- main -------------------------------------------------------------------------------------

DEFAULT_MINUTES = 10.0


async def run_async(
    args: argparse.Namespace,
    url: str,
    proc: subprocess.Popen[Any],
    kinds: list[tuple[str, list[Body]]],
    weights: list[float],
) -> tuple[Load, bool]:
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        print(f"\n{sig.name}: stopping the load (again to abort) ...", file=sys.stderr, flush=True)
        interrupted.set()
        loop.remove_signal_handler(sig)
        if sig == signal.SIGTERM:
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        else:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    # A hard bound on the whole load, whatever happens inside it.
    limit = args.minutes * 60 + args.timeout_s + 60
    load = await asyncio.wait_for(soak(args, url, proc, kinds, weights, interrupted), limit)
    return load, interrupted.is_set()


def run(args: argparse.Namespace) -> dict[str, Any]:
    repo = Path(args.model_repo).resolve()
    kinds, weights = build_mix(repo, args.models, args.bad_share)
    inherited = {k: v for k, v in os.environ.items() if k.startswith("GATEWAY_")}
    result: dict[str, Any] = {
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "args": vars(args),
        "gateway_env": " ".join(
            f"{k}={v}" for k, v in {**inherited, "GATEWAY_ACCESS_LOG": "true"}.items()
        ),
    }
    log = Path(args.log).resolve()
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    print(f"starting the gateway on {repo} (log: {log}) ...", flush=True)
    with gateway(repo, log) as (proc, url, shown):
        result["gateway_command"] = " ".join(shlex.quote(a) for a in shown)
        result["bad_messages"] = preflight(url, kinds)
        bodies = [b for _, group in kinds for b in group]
        result["preflight_counts"] = {
            str(code): sum(b.expect == code for b in bodies) for code in (200, 400)
        }
        print(
            f"gateway pid {proc.pid} at {url}; preflight ok ({len(kinds)} request kinds); "
            f"{args.minutes:g} min at {args.rate:g} req/s ...",
            flush=True,
        )
        load, interrupted = asyncio.run(run_async(args, url, proc, kinds, weights))
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    result["client_cpu_s"] = (usage1.ru_utime + usage1.ru_stime) - (
        usage0.ru_utime + usage0.ru_stime
    )
    result["interrupted"] = interrupted
    result["load_s"] = load.load_s
    result["gateway_exit_during_run"] = load.gateway_exit
    result["summary"] = summarise(load, args)
    result["verdict"], result["checks"] = verdict(result["summary"], load, args, interrupted)
    result["by_kind"] = load.by_kind
    result["errors"] = load.errors
    result["error_examples"] = load.error_examples
    result["unfinished_at_end"] = load.unfinished
    result["samples"] = load.samples
    result["gateway_log"] = gateway_log_summary(log)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--minutes", type=float, default=DEFAULT_MINUTES, help="load duration [10]")
    add("--rate", type=float, default=200.0, help="requests per second, open loop [200]")
    add("--concurrency", type=int, default=64, help="most requests in flight [64]")
    add(
        "--models",
        "--model",
        nargs="+",
        choices=MODELS,
        default=list(MODELS),
        help="models in the mix [simple mlp]",
    )
    add("--bad-share", type=float, default=0.1, help="share of malformed requests [0.1]")
    add("--warmup-s", type=float, default=30.0, help="RSS baseline after this long [30]")
    add("--sample-s", type=float, default=5.0, help="seconds between samples [5]")
    add("--timeout-s", type=float, default=10.0, help="per-request timeout [10]")
    add("--seed", type=int, default=0, help="seed of the request mix [0]")
    add("--max-growth-pct", type=float, default=10.0, help="verdict: RSS growth bound [10]")
    add("--max-slope-mib-h", type=float, default=30.0, help="verdict: RSS slope bound [30]")
    add(
        "--min-slope-window-s",
        type=float,
        default=240.0,
        help="judge the slope only over a window (the second half after warm-up) this long [240]",
    )
    add("--max-fd-growth", type=int, default=8, help="verdict: open fd growth bound [8]")
    add("--model-repo", default=str(ROOT / "model_repo"))
    add(
        "--log",
        default=str(ROOT / "bench" / "out" / "soak" / "gateway.log"),
        help="the gateway's log file [bench/out/soak/gateway.log]",
    )
    add("--out-dir", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    if args.minutes <= 0 or args.rate <= 0 or args.concurrency < 1:
        parser.error("--minutes, --rate and --concurrency must be positive")
    if not 0 <= args.bad_share < 1:
        parser.error("--bad-share must be in [0, 1)")
    if not Path("/proc/self/status").exists():
        print("soak.py samples the gateway through /proc: Linux only", file=sys.stderr)
        return 2
    # SIGTERM before the load starts unwinds like Ctrl-C, so the gateway is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        result = run(args)
    except KeyboardInterrupt:
        print("aborted; the gateway was stopped, no results written", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc or type(exc).__name__}", file=sys.stderr)
        return 1

    print()
    print("\n".join(summary_lines(result)))
    print()
    print("\n".join(minute_table(result["summary"]["per_minute"])))
    print()
    print(f"verdict: {result['verdict']}")
    for line in result["checks"]:
        print(f"  {line}")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "soak.md").write_text(render_markdown(result))
    (out_dir / "soak.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nwrote {out_dir / 'soak.md'} and {out_dir / 'soak.json'}")
    return 0 if result["verdict"].startswith("PASS") else 1


if __name__ == "__main__":
    sys.exit(main())
