"""A bench stopped by SIGTERM (``kill PID``, a CI step's timeout) stops the servers it started
and removes their scratch, as it does on Ctrl-C: ``bench/harness.py`` turns SIGTERM into an exit
through Python's cleanup. A real bench's set-up: ``harness.start_gateway`` on the shipped repo
in a temporary directory, stopped in a ``finally``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BENCH = textwrap.dedent(
    """
    import sys, tempfile, time
    from pathlib import Path
    sys.path.append({bench!r})
    import harness

    with tempfile.TemporaryDirectory() as tmp:
        env = {{"GATEWAY_LOAD_MODELS": "simple"}}
        gw = harness.start_gateway(Path({repo!r}), Path(tmp), env=env, ready=("simple",))
        try:
            print(gw.pid, tmp, flush=True)
            time.sleep(120)
        finally:
            gw.stop()
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_bench_stopped_by_sigterm_stops_its_gateway_and_removes_its_scratch() -> None:
    script = BENCH.format(bench=str(ROOT / "bench"), repo=str(ROOT / "model_repo"))
    bench = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    gateway_pid = 0
    try:
        assert bench.stdout is not None
        line = bench.stdout.readline().split()
        assert line, f"the bench exited with {bench.wait(30)} before its gateway was ready"
        gateway_pid, scratch = int(line[0]), Path(line[1])
        assert _alive(gateway_pid) and scratch.is_dir()
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(30) == 128 + signal.SIGTERM
        assert not _alive(gateway_pid), "the bench's gateway outlived it"
        assert not scratch.exists()
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait(10)
        if gateway_pid and _alive(gateway_pid):  # what the bench left: ours to stop
            os.kill(gateway_pid, signal.SIGKILL)
