"""Run every bench in ``bench/`` once, in its quickest mode, for errors only (issue 21:
"benchmarks, not timed tests: CI runs each bench briefly for errors only").

Each bench gets the smallest run that still goes through its whole code path, writes into a
temporary directory (never ``bench/results``: a bench that changes a file there fails) and has
a timeout. One line per bench: ``ok``, ``FAILED`` with the tail of its output, or ``skipped``
with what it needs that this machine lacks (``wrk``, Triton's ``perf_analyzer``, the
``tritonserver`` of the nvidia-pytriton wheel). Exit status 1 if any failed, also when a file in
``bench/`` has no entry here, so a new bench cannot stay out of CI unnoticed. No figure these
runs print means anything: the runs are far too short and the machine is shared.

Heavy models: one sweep of ``resnet50`` (``sweep_heavy``: HTTP at c=1 through the gateway,
its RSS and its payload copies; 40-90 s), built on demand into ``bench/out/models`` (~2 s,
100 MB, once; with ``bert_encoder``, which runs in no smoke: ~5 s, 250 MB). ``--no-heavy``
leaves it out. ``cnn_gap``, made for ``resnet50``, runs here on ``mlp`` from ``model_repo/``:
the same code path with a smaller model.

    .venv/bin/python scripts/bench_smoke.py                    # all, 6.5-8 minutes on 2 busy cores
    .venv/bin/python scripts/bench_smoke.py --only sweep,edge --keep /tmp/smoke
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SELF = "scripts/bench_smoke.py"
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
sys.path.insert(0, str(ROOT))

# Modules in bench/ that are not benches.
NOT_BENCHES = {"harness": "the benches' shared library", "profiled": "run by fleet.py --profile"}


@dataclasses.dataclass(frozen=True)
class Smoke:
    """One smoke run: ``bench/<script>.py`` with ``args`` (``{out}``: this run's directory)."""

    name: str
    args: tuple[str, ...]
    timeout_s: float
    needs: tuple[str, ...] = ()
    script: str = ""  # default: name

    @property
    def path(self) -> Path:
        return BENCH / f"{self.script or self.name}.py"


PA = "perf_analyzer"
TRITON = "tritonserver"
WRK = "wrk"
HEAVY = "heavy models"
GIT = "a git checkout"

SMOKES: tuple[Smoke, ...] = (
    Smoke("shm_micro", ("a:", "b:", "--rounds", "1", "--out", "{out}/shm_micro.md"), 60),
    Smoke("rest_path", ("--requests", "500", "--repeat", "1", "--out", "{out}/rest_path.md"), 60),
    Smoke(
        "serving",
        (
            *("--duration-s", "1", "--warmup-s", "0.5", "--paired-rounds", "1"),
            *("--in-process-s", "0.2", "--models", "simple", "--out-dir", "{out}/serving"),
        ),
        120,
        (WRK,),
    ),
    # Triton's perf_analyzer against the gateway, standalone tritonserver and in-process ORT,
    # over the three transports; memory and copies are left out (--only implies it).
    Smoke(
        "sweep",
        (
            *("--only", "simple:http:1,simple:grpc:1,simple:shm:1", "--window-ms", "300"),
            *("--in-process-s", "0.2", "--out-dir", "{out}/sweep"),
        ),
        150,
        (PA, TRITON),
    ),
    # The heavy point, with the parts --only leaves out: RSS per model against a bare ORT
    # session, and payload copies per request (an LD_PRELOAD shim, compiled with cc).
    Smoke(
        "sweep_heavy",
        (
            *("--models", "resnet50", "--protocols", "http", "--heavy-concurrency", "1"),
            *("--targets", "gateway", "--window-ms", "300", "--in-process-s", "0.2"),
            *("--copy-requests", "3", "--out-dir", "{out}/sweep-heavy"),
        ),
        240,
        (PA, HEAVY),
        script="sweep",
    ),
    Smoke("adaptive_delay", ("--quick", "--out", "{out}/adaptive_delay.md"), 120, (PA,)),
    Smoke(
        "cnn_gap",
        (
            *("--quick", "--model", "mlp", "--repo", "model_repo", "--concurrency", "1"),
            *("--in-process", "1,2", "--out", "{out}/cnn_gap.md"),
        ),
        120,
        (PA,),
    ),
    Smoke("cycle", ("--rounds", "1", "--duration-s", "1", "--out", "{out}/cycle.md"), 90, (WRK,)),
    Smoke("edge", ("--model-mb", "1", "--warm-runs", "1", "--out", "{out}/edge.md"), 90),
    Smoke(
        "edge_delta",
        ("--delta", "--model-mb", "4", "--out", "{out}/edge_delta.md"),
        90,
        script="edge",
    ),
    Smoke(
        "fleet",
        (
            *("--hosts", "10", "--models", "1", "--rounds", "1", "--duration-s", "1"),
            *("--quiet-s", "1", "--profile", "{out}/fleet-profile", "--out", "{out}/fleet.md"),
        ),
        120,
    ),
    Smoke(
        "gpu",
        ("--provider", "cpu", "--duration-s", "1", "--concurrency", "1", "--out-dir", "{out}/gpu"),
        120,
    ),
    Smoke(
        "grpc_bare",
        ("--rounds", "1", "--window-ms", "300", "--out", "{out}/grpc_bare.md"),
        90,
        (PA,),
    ),
    Smoke(
        "grpc_front",
        ("--quick", "--models", "simple", "--window-ms", "300", "--out", "{out}/grpc_front.md"),
        150,
        (PA, TRITON),
    ),
    Smoke("grpc_tail", ("now:", "--quick", "--out", "{out}/grpc_tail.md"), 90, (PA,)),
    Smoke(
        "grpc_vs_rest",
        ("--models", "simple", "--duration-s", "1", "--concurrency", "4", "--out", "{out}/g.md"),
        90,
    ),
    Smoke("grpc_window", ("now:", "--quick", "--out", "{out}/grpc_window.md"), 90),
    Smoke("hot_calls", ("--window-s", "0.5", "--out", "{out}/hot_calls.md"), 90, (PA,)),
    Smoke("lone_request", ("--quick", "--out", "{out}/lone_request.md"), 90),
    Smoke("ort_threads", ("--quick", "--out", "{out}/ort_threads.md"), 120, (PA,)),
    Smoke("priorities", ("--quick", "--out", "{out}/priorities.md"), 90),
    Smoke(
        "protocol_ceiling",
        ("--rounds", "1", "--duration-s", "1", "--out", "{out}/pc.md"),
        90,
        (WRK,),
    ),
    Smoke(
        "routing",
        (
            *("--duration-s", "1", "--concurrency", "4", "--policies", "round_robin"),
            *("--out", "{out}/routing.md"),
        ),
        90,
    ),
    Smoke("shared_memory", ("--quick", "--out", "{out}/shared_memory.md"), 90),
    Smoke(
        "soak",
        (
            *("--minutes", "0.1", "--rate", "50", "--warmup-s", "2", "--sample-s", "2"),
            *("--log", "{out}/gateway.log", "--out-dir", "{out}/soak"),
        ),
        90,
    ),
    Smoke("thread_split", ("--quick", "--out", "{out}/thread_split.md"), 90, (PA,)),
    # --base HEAD: this tree against itself; CI's checkout may have no `main` to start from.
    Smoke(
        "tracing",
        (
            *("--base", "HEAD", "--rounds", "1", "--duration-s", "1", "--core-rounds", "1"),
            *("--out", "{out}/tracing.md"),
        ),
        120,
        (WRK, GIT),
    ),
    Smoke("traffic", ("--quick", "--out", "{out}/traffic.md"), 90),
    Smoke(
        "tree_ab",
        (
            "--quick",
            "--concurrency",
            "1",
            "--out",
            "{out}/tree_ab.md",
            "a:",
            "b:GATEWAY_INLINE_MAX_MS=0",
        ),
        90,
        (PA,),
    ),
    Smoke(
        "triton",
        (
            *("--models", "simple", "--concurrency", "4", "--duration-s", "1", "--warmup-s", "0.5"),
            *("--layouts", "shared", "--output", "{out}/triton.md"),
        ),
        120,
        (TRITON,),
    ),
    Smoke(
        "variants",
        (
            *("--rounds", "1", "--duration-s", "1", "--out", "{out}/variants.md"),
            *("raw::", "asgi::GATEWAY_RAW_INFER=false"),
        ),
        90,
        (WRK,),
    ),
    # Renders a copy of the committed results (made by _prepare).
    Smoke("report", ("--no-run", "--results-dir", "{out}/results"), 60),
)


def _missing(needs: tuple[str, ...], heavy: bool) -> str | None:
    """Why this machine cannot run a bench with these needs (None: it can)."""
    for need in needs:
        reason = _reason(need, heavy)
        if reason:
            return reason
    return None


_REASONS: dict[str, str | None] = {}


def _reason(need: str, heavy: bool) -> str | None:
    if need not in _REASONS:
        _REASONS[need] = _find(need, heavy)
    return _REASONS[need]


def _find(need: str, heavy: bool) -> str | None:
    if need == WRK:
        return None if shutil.which("wrk") else "needs wrk (apt-get install wrk)"
    if need == PA:
        proc = subprocess.run(
            [str(ROOT / "scripts" / "perf_analyzer.sh")],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            tail = " ".join(proc.stderr.strip().splitlines()[-2:])
            return f"needs Triton's perf_analyzer (scripts/perf_analyzer.sh failed: {tail})"
        return None
    if need == TRITON:
        from gateway.testing.tritonserver import tritonserver_unavailable_reason

        reason = tritonserver_unavailable_reason()
        return f"needs tritonserver: {reason}" if reason else None
    if need == GIT:
        git = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, check=False
        )
        return None if git.returncode == 0 else "needs a git checkout (git archive HEAD)"
    if need == HEAVY:
        return "heavy models left out (--no-heavy)" if not heavy else None
    raise ValueError(f"unknown need {need!r}")


def _results_state() -> dict[str, tuple[int, int]]:
    """Every file under bench/results with its size and mtime: to catch a bench writing there."""
    state = {}
    for path in RESULTS.rglob("*"):
        if path.is_file():
            st = path.stat()
            state[str(path.relative_to(RESULTS))] = (st.st_size, st.st_mtime_ns)
    return state


def _run(smoke: Smoke, out: Path, env: dict[str, str]) -> tuple[str, str]:
    """Run one smoke: ("ok" | "FAILED", detail). The bench runs in a session of its own, so that
    after a timeout what it started (gateways, wrk, perf_analyzer, tritonserver) stops with it."""
    args = [a.replace("{out}", str(out)) for a in smoke.args]
    log_path = out / f"{smoke.name}.log"
    if smoke.name == "report":
        shutil.copytree(RESULTS, out / "results", dirs_exist_ok=True)
    before = _results_state()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(smoke.path), *args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        note = ""
        try:
            rc = proc.wait(timeout=smoke.timeout_s)
            status = f"exit status {rc}" if rc else ""
            # A helper that ends with its parent (multiprocessing's resource tracker) may take
            # a moment: only what is still there after 3 s is reported.
            left = _group_members(proc.pid)
            deadline = time.monotonic() + 3.0
            while left and time.monotonic() < deadline:
                time.sleep(0.2)
                left = _group_members(proc.pid)
            if left:
                note = f" (left {len(left)} process(es) running: {', '.join(left)}; stopped)"
        except subprocess.TimeoutExpired:
            status = f"timed out after {smoke.timeout_s:.0f} s"
            # Ctrl-C first: the benches stop what they started, in order, on KeyboardInterrupt.
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
        finally:
            _stop_group(proc)
    if not status and _results_state() != before:
        status = "it changed files under bench/results (smoke runs must write elsewhere)"
    if not status:
        return "ok", note
    tail = log_path.read_bytes().decode(errors="replace").rstrip().splitlines()[-25:]
    return "FAILED", f" {status}{note}\n" + "\n".join("    | " + line for line in tail)


def _group_members(pgid: int) -> list[str]:
    """The commands of the processes still in process group ``pgid`` (Linux /proc)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            fields = text[text.rindex(")") + 2 :].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(text[text.index("(") + 1 : text.rindex(")")])
    return members


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop whatever is left in the bench's session: SIGTERM, then SIGKILL after 10 s."""
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            proc.poll()  # reap the bench itself, so that its group can empty
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def _load() -> str:
    """The machine's load, for the log: these runs' times depend on it."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f}, {five:.1f}, {fifteen:.1f} on {os.cpu_count()} CPUs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated smoke names")
    parser.add_argument("--skip", default="", help="comma-separated smoke names")
    parser.add_argument("--no-heavy", action="store_true", help="leave out the resnet50 point")
    parser.add_argument("--keep", type=Path, help="write into this directory and keep it")
    parser.add_argument("--list", action="store_true", help="print each smoke's command")
    args = parser.parse_args(argv)

    listed = {s.path.stem for s in SMOKES} | set(NOT_BENCHES) | {"report"}
    unlisted = (
        [] if args.only else sorted(p.stem for p in BENCH.glob("*.py") if p.stem not in listed)
    )
    only = {n for n in args.only.split(",") if n}
    skip = {n for n in args.skip.split(",") if n}
    unknown = (only | skip) - {s.name for s in SMOKES}
    if unknown:
        parser.error(f"no smoke named {', '.join(sorted(unknown))}")
    chosen = [s for s in SMOKES if (not only or s.name in only) and s.name not in skip]
    if args.list:
        for s in chosen:
            print(f"{s.name}: bench/{s.path.name} {' '.join(s.args)}  [{s.timeout_s:.0f} s]")
        return 0

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    failed = 0
    started = time.monotonic()
    print(f"bench smoke: {len(chosen)} runs; {_load()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-smoke-") as tmp:
        base = args.keep or Path(tmp)
        for smoke in chosen:
            reason = _missing(smoke.needs, not args.no_heavy)
            if reason:
                print(f"skipped {smoke.name}: {reason}", flush=True)
                continue
            out = base / smoke.name
            out.mkdir(parents=True, exist_ok=True)
            t0 = time.monotonic()
            status, detail = _run(smoke, out, env)
            took = time.monotonic() - t0
            print(f"{status:<7} {smoke.name} ({took:.0f} s){detail}", flush=True)
            failed += status != "ok"
        for name in unlisted:
            print(f"FAILED  {name}: bench/{name}.py has no smoke run (add it to SMOKES in {SELF})")
            failed += 1
    took = time.monotonic() - started
    print(f"bench smoke: {failed} failed, {took:.0f} s in all; {_load()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
