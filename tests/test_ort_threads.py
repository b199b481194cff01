"""ONNX Runtime's threads per session: how many (``intra_op_threads``, the model's
``intra_op_thread_count``, else one less than the usable cores) and whether they spin."""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.backends.onnxruntime import (
    OnnxRuntimeFactory,
    default_intra_op_threads,
    usable_cores,
)
from gateway.errors import InvalidInput, ModelNotReady
from gateway.repository.config import ModelConfig, parse_pbtxt
from gateway.repository.local import LocalRepository
from gateway.settings import Settings
from tests import models

CONFIG = models.SIMPLE_CONFIG
DENSE_CONFIG = """
name: "dense"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ 64 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 8 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""


def config(extra: str = "", instances: int = 1) -> ModelConfig:
    parsed = parse_pbtxt(CONFIG + extra, "simple/config.pbtxt", "simple")
    return replace(parsed, instance_count=instances)


def options(cores: int, cfg: ModelConfig | None = None, **settings: object) -> tuple[int, str, str]:
    """(intra-op threads, allow_spinning, force_spinning_stop) of a session's options."""
    factory = OnnxRuntimeFactory(Settings(warmup=False, **settings), cores=lambda: cores)  # type: ignore[arg-type]
    opts = factory.session_options(cfg or config())
    try:
        stop = opts.get_session_config_entry("session.force_spinning_stop")
    except Exception:  # ORT raises when the entry is not there
        stop = ""
    spin = opts.get_session_config_entry("session.intra_op.allow_spinning")
    return opts.intra_op_num_threads, spin, stop


@pytest.mark.parametrize(("cores", "threads"), [(1, 1), (2, 2), (4, 4), (16, 16)])
def test_by_default_one_thread_per_usable_core(cores: int, threads: int) -> None:
    """ORT's own count, within the usable cores; the pool fits, so it spins while a run goes
    and stops when it returns."""
    assert default_intra_op_threads(cores) == threads
    assert options(cores) == (threads, "1", "1")


def test_the_setting_then_the_model_say_how_many() -> None:
    assert options(8, intra_op_threads=2)[0] == 2
    model = config('parameters { key: "intra_op_thread_count" value: { string_value: "5" } }\n')
    assert options(8, model, intra_op_threads=2)[0] == 5


def test_pools_that_do_not_fit_beside_the_event_loop_never_spin() -> None:
    """Two instances of two threads on two cores, or of three threads on four: a spinning
    thread would wait on a preempted one. ``ort_spinning`` restores ORT's own default (spin
    after a run too); the model's own ``session.`` entry wins over both."""
    assert options(2, config(instances=2), intra_op_threads=2) == (2, "0", "")
    assert options(2, intra_op_threads=2) == (2, "1", "1")
    assert options(4, config(instances=2), intra_op_threads=3)[1:] == ("0", "")
    assert options(4, config(instances=2), intra_op_threads=1)[1:] == ("1", "1")
    assert options(2, intra_op_threads=2, ort_spinning=True)[1:] == ("1", "")
    spins = config(
        'parameters { key: "session.intra_op.allow_spinning" value: { string_value: "1" } }\n'
    )
    assert options(2, spins, intra_op_threads=2)[1] == "1"
    still = config(
        'parameters { key: "session.intra_op.allow_spinning" value: { string_value: "0" } }\n'
    )
    assert options(8, still)[1:] == ("0", "1")


def test_usable_cores_is_within_the_machines() -> None:
    assert 1 <= usable_cores() <= (os.cpu_count() or 1)


async def test_lone_batches_may_run_inline_whatever_the_pools_size(tmp_path: Path) -> None:
    """The loop's thread joins the pool when it runs a lone batch (``inline_max_ms``), with
    one thread per core too (the default), where the pool leaves the loop no core of its own:
    the loop's thread is then the run's calling thread, as a runner thread would be."""
    models.dense(tmp_path, config=DENSE_CONFIG)
    for cores in (2, 16):  # one thread per core: the pool never fits beside the loop
        factory = OnnxRuntimeFactory(Settings(warmup=False), cores=lambda cores=cores: cores)  # type: ignore[misc]
        backend = await factory.load(LocalRepository(tmp_path).source("dense"), 1)
        try:
            assert backend.inline
            ran = backend.execute_now({"X": np.ones((1, 64), np.float32)}, ["Y"])
            assert ran is not None and ran.outputs["Y"].shape == (1, 8)
        finally:
            await backend.close()


async def test_batches_run_on_one_runner_thread_per_session_and_close_ends_them(
    tmp_path: Path,
) -> None:
    """Each session has a runner thread of its own (``ort-<model>-<n>``), which answers the
    caller's loop itself; a batch whose caller stopped waiting while it was queued is skipped;
    ``close`` ends the threads."""
    models.dense(tmp_path, config=DENSE_CONFIG.replace("count: 1", "count: 2"))
    factory = OnnxRuntimeFactory(Settings(warmup=False, intra_op_threads=1))
    backend = await factory.load(LocalRepository(tmp_path).source("dense"), 1)
    ran_on: list[str] = []
    gate = threading.Event()
    original = backend._run

    def run(inputs: Any, outputs: Any, session: Any = None) -> Any:
        ran_on.append(threading.current_thread().name)
        gate.wait(5)
        return original(inputs, outputs, session)

    backend._run = run  # type: ignore[method-assign]
    x = {"X": np.ones((2, 64), np.float32)}
    try:
        # Two sessions busy, a third batch queued behind them, then its caller goes away.
        first = asyncio.ensure_future(backend.execute(x, ["Y"]))
        second = asyncio.ensure_future(backend.execute(x, ["Y"]))
        third = asyncio.ensure_future(backend.execute(x, ["Y"]))
        while len(ran_on) < 2:
            await asyncio.sleep(0.005)
        third.cancel()
        await asyncio.sleep(0.01)
        gate.set()
        for done in (first, second):
            assert (await done).outputs["Y"].shape == (2, 8)
        with pytest.raises(asyncio.CancelledError):
            await third
        assert (await backend.execute(x, ["Y"])).outputs["Y"].shape == (2, 8)
        assert sorted(set(ran_on)) == ["ort-dense-0", "ort-dense-1"]
        assert len(ran_on) == 3  # the cancelled batch never ran
    finally:
        gate.set()
        await backend.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("ort-dense")]
    with pytest.raises(ModelNotReady):  # and none start again
        await backend.execute(x, ["Y"])


async def test_a_failed_batch_answers_its_caller_and_the_runner_serves_the_next(
    tmp_path: Path,
) -> None:
    """A run that raises reaches its caller as the input's fault (400), on the caller's loop;
    the runner thread goes on with the next batch."""
    models.dense(tmp_path, config=DENSE_CONFIG)
    factory = OnnxRuntimeFactory(Settings(warmup=False, intra_op_threads=1))
    backend = await factory.load(LocalRepository(tmp_path).source("dense"), 1)
    try:
        with pytest.raises(InvalidInput):
            await backend.execute({"X": np.ones((2, 3), np.float32)}, ["Y"])
        ran = await backend.execute({"X": np.ones((1, 64), np.float32)}, ["Y"])
        assert ran.outputs["Y"].shape == (1, 8) and ran.compute_s is not None
    finally:
        await backend.close()


async def _loaded_spinning(tmp_path: Path, extra: str = "", **settings: object) -> tuple[Any, Any]:
    """(``backend.spinning``, its ``ort_spinning`` fact) of ``dense`` on two cores."""
    models.dense(tmp_path, config=DENSE_CONFIG + extra)
    factory = OnnxRuntimeFactory(Settings(warmup=False, **settings), cores=lambda: 2)  # type: ignore[arg-type]
    backend = await factory.load(LocalRepository(tmp_path).source("dense"), 1)
    try:
        session = backend._free.get_nowait()
        backend._free.put(session)
        entry = session.get_session_options().get_session_config_entry(
            "session.intra_op.allow_spinning"
        )
        assert backend.spinning is (entry == "1")
        return backend.spinning, backend.describe().get("ort_spinning")
    finally:
        await backend.close()


async def test_only_models_whose_runs_are_short_spin(tmp_path: Path) -> None:
    """A pool that fits may spin while a run goes; it does only where a batch-1 run, timed at
    load on a session that does not spin, takes at most ``ort_spin_max_run_ms`` of its thread's
    CPU: a long run's waits on a preempted thread would burn a core. 0: nothing spins."""
    assert await _loaded_spinning(tmp_path / "a", ort_spin_max_run_ms=1e6) == (True, True)
    assert await _loaded_spinning(tmp_path / "b", ort_spin_max_run_ms=1e-9) == (False, False)
    assert await _loaded_spinning(tmp_path / "c", ort_spin_max_run_ms=0) == (False, False)
    # The model's own word is not timed, and ``ort_spinning`` lets ORT spin as it likes.
    own = 'parameters { key: "session.intra_op.allow_spinning" value: { string_value: "1" } }\n'
    assert await _loaded_spinning(tmp_path / "d", own, ort_spin_max_run_ms=0) == (True, True)
    assert await _loaded_spinning(tmp_path / "e", ort_spinning=True, ort_spin_max_run_ms=0) == (
        True,
        True,
    )


def test_the_spin_limit_is_not_negative() -> None:
    from gateway.settings import SettingsError

    with pytest.raises(SettingsError, match="ort_spin_max_run_ms"):
        Settings(ort_spin_max_run_ms=-1)


class _Counted:
    """A session whose runs are counted (ORT's own objects take no new attributes)."""

    def __init__(self, session: Any) -> None:
        self.session, self.runs = session, 0

    def run(self, *args: Any, **kwargs: Any) -> Any:
        self.runs += 1
        return self.session.run(*args, **kwargs)


def _entry(session: Any, key: str) -> str:
    try:
        return str(session.get_session_options().get_session_config_entry(key))
    except Exception:  # ORT raises when the entry is not there
        return ""


async def _dense(tmp_path: Path, **settings: object) -> Any:
    models.dense(tmp_path, config=DENSE_CONFIG)
    factory = OnnxRuntimeFactory(Settings(warmup=False, **settings), cores=lambda: 2)  # type: ignore[arg-type]
    return await factory.load(LocalRepository(tmp_path).source("dense"), 1)


async def test_long_runs_spin_a_bounded_while_with_ort_long_spin_us(tmp_path: Path) -> None:
    """``ort_long_spin_us``: a model whose runs are too long to spin freely spins while a run
    goes, each wait at most that long, and stops when the run returns; the metadata says so.
    Without it (the default) such a model does not spin at all."""
    bounded = await _dense(tmp_path, ort_spin_max_run_ms=1e-9, ort_long_spin_us=60)
    plain = await _dense(tmp_path / "plain", ort_spin_max_run_ms=1e-9)
    try:
        session = bounded._free.get_nowait()
        bounded._free.put(session)
        assert _entry(session, "session.intra_op.allow_spinning") == "1"
        assert _entry(session, "session.intra_op.spin_duration_us") == "60"
        assert _entry(session, "session.force_spinning_stop") == "1"
        assert bounded.spinning is True and bounded.spin_duration_us == 60
        assert bounded.describe()["ort_spin_duration_us"] == 60
        assert not bounded.lone_session  # the same one session: no second copy of the weights
        x = np.ones((2, 64), np.float32)
        ran = await bounded.execute({"X": x}, ["Y"])
        np.testing.assert_allclose(
            ran.outputs["Y"], (await plain.execute({"X": x}, ["Y"])).outputs["Y"]
        )
        assert plain.spinning is False and plain.spin_duration_us is None
        assert "ort_spin_duration_us" not in plain.describe()
    finally:
        await bounded.close()
        await plain.close()


async def test_lone_batches_run_on_a_spinning_session_of_their_own(tmp_path: Path) -> None:
    """``ort_lone_spin_us``: a model that does not spin (its runs too long for
    ``ort_spin_max_run_ms``) but would run inline gets a second session whose pool spins, idle
    threads at most that long; ``execute_now`` (a lone batch on the loop's thread) runs there,
    batches on the runner threads keep the session that does not spin."""
    backend = await _dense(tmp_path, ort_spin_max_run_ms=1e-9, ort_lone_spin_us=40)
    try:
        assert backend.lone_session and backend.describe()["ort_lone_session"] is True
        assert backend.spinning is False
        assert backend._lone is not None
        lone, shared = _Counted(backend._lone.get_nowait()), _Counted(backend._free.get_nowait())
        assert _entry(lone.session, "session.intra_op.allow_spinning") == "1"
        assert _entry(lone.session, "session.intra_op.spin_duration_us") == "40"
        assert _entry(lone.session, "session.force_spinning_stop") in ("", "0")
        assert _entry(shared.session, "session.intra_op.allow_spinning") == "0"
        backend._lone.put(lone)
        backend._free.put(shared)
        x = np.ones((1, 64), np.float32)
        ran = backend.execute_now({"X": x}, ["Y"])
        assert ran is not None and ran.outputs["Y"].shape == (1, 8)
        assert (lone.runs, shared.runs) == (1, 0)
        await backend.execute({"X": x}, ["Y"])
        assert (lone.runs, shared.runs) == (1, 1)
        # Both answer alike, and the lone session is back for the next lone batch.
        again = backend.execute_now({"X": x}, ["Y"])
        assert again is not None and lone.runs == 2
        np.testing.assert_allclose(again.outputs["Y"], ran.outputs["Y"])
    finally:
        await backend.close()


@pytest.mark.parametrize(
    "settings",
    [
        {"ort_spin_max_run_ms": 1e-9},  # off by default
        {"ort_spin_max_run_ms": 1e6, "ort_lone_spin_us": 40},  # the shared sessions spin
        {"ort_spin_max_run_ms": 1e-9, "ort_lone_spin_us": 40, "inline_max_ms": 1e-9},  # too long
        {"ort_spin_max_run_ms": 1e-9, "ort_lone_spin_us": 40, "inline_max_ms": 0},  # no inline
        {"ort_spin_max_run_ms": 1e-9, "ort_lone_spin_us": 40, "intra_op_threads": 1},  # no pool
    ],
)
async def test_no_lone_session_where_it_would_not_run_or_gain(
    tmp_path: Path, settings: dict[str, object]
) -> None:
    backend = await _dense(tmp_path, **settings)
    try:
        assert not backend.lone_session and "ort_lone_session" not in backend.describe()
    finally:
        await backend.close()


def test_the_lone_spin_is_not_negative() -> None:
    from gateway.settings import SettingsError

    with pytest.raises(SettingsError, match="ort_lone_spin_us"):
        Settings(ort_lone_spin_us=-1)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="Linux /proc")
async def test_runner_threads_carry_their_name_in_the_os(tmp_path: Path) -> None:
    """``top -H``, ``perf`` and ``bench/thread_split.py`` tell a model's runner threads from
    the event loop and ORT's pool by the OS thread name (``ort-<model>-<n>``)."""
    backend = await _dense(tmp_path)
    try:
        await backend.execute({"X": np.ones((1, 64), np.float32)}, ["Y"])
        names = {p.read_text().strip() for p in Path("/proc/self/task").glob("*/comm")}
        assert "ort-dense-0" in names
    finally:
        await backend.close()
