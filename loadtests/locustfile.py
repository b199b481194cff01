"""Locust load test for the gateway: v2 JSON and binary-tensor requests over the shipped models.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --headless -u 20 -r 5 -t 60s

``loadtests/run.sh`` starts a gateway on ``model_repo/`` and runs this for you.

Environment:

- ``LOAD_SHAPE``: ``none`` (default: ``-u``/``-r``/``-t`` as given), ``step`` (climb to ``-u``
  users in ``LOAD_STEPS`` equal steps over the run time) or ``spike`` (a fifth of ``-u`` users,
  then all ``-u`` at once for the middle fifth of the run, then back). The shapes read ``-u``,
  ``-r`` and ``-t`` and stop themselves at ``-t`` (60 s when none is given).
- ``LOAD_WAIT_MAX_S``: each user waits uniformly 0..this between requests (default 0.1; 0 for a
  closed loop with no think time).

Every request counts as a failure unless it returns 2xx with every expected output; request
names are ``<model> [json]`` / ``<model> [binary]`` so the stats split by model and encoding.
"""

from __future__ import annotations

import os
from typing import ClassVar

from locust import FastHttpUser, LoadTestShape, between, task
from payloads import BINARY, BYTES, JSON, MLP, MULTI, NOBATCH, SIMPLE, Payload, response_error

LOAD_SHAPE = os.environ.get("LOAD_SHAPE", "none").strip().lower()
if LOAD_SHAPE not in ("none", "step", "spike"):
    raise ValueError(f"LOAD_SHAPE must be none, step or spike, not {LOAD_SHAPE!r}")
WAIT_MAX_S = float(os.environ.get("LOAD_WAIT_MAX_S", "0.1"))
STEPS = int(os.environ.get("LOAD_STEPS", "5"))
DEFAULT_RUN_TIME_S = 60.0


# -- users ---------------------------------------------------------------------------------------


class GatewayUser(FastHttpUser):
    """A v2 client mixing models and encodings; weights favour the cheap, batchable models."""

    host = os.environ.get("GATEWAY_URL", "http://127.0.0.1:8000")
    wait_time = between(0, WAIT_MAX_S)

    def _infer(self, payload: Payload, binary: bool) -> None:
        if binary:
            body, headers = BINARY[payload.model]
        else:
            body, headers = JSON[payload.model], {"Content-Type": "application/json"}
        name = f"{payload.model} [{'binary' if binary else 'json'}]"
        with self.client.post(
            payload.path, data=body, headers=headers, name=name, catch_response=True
        ) as response:
            if response.status_code == 0:  # no HTTP response at all: connection error, timeout
                response.failure(f"no response: {response.error!r}")
                return
            error = response_error(
                response.status_code, response.headers, response.content or b"", payload.outputs
            )
            if error:
                response.failure(error)
            else:
                response.success()

    @task(5)
    def simple_json(self) -> None:
        self._infer(SIMPLE, binary=False)

    @task(5)
    def simple_binary(self) -> None:
        self._infer(SIMPLE, binary=True)

    @task(3)
    def mlp_binary(self) -> None:
        self._infer(MLP, binary=True)

    @task(1)
    def mlp_json(self) -> None:
        self._infer(MLP, binary=False)

    @task(2)
    def multi_json(self) -> None:
        self._infer(MULTI, binary=False)

    @task(1)
    def multi_binary(self) -> None:
        self._infer(MULTI, binary=True)

    @task(1)
    def nobatch_json(self) -> None:
        self._infer(NOBATCH, binary=False)

    @task(1)
    def bytes_json(self) -> None:
        self._infer(BYTES, binary=False)

    @task(1)
    def bytes_binary(self) -> None:
        self._infer(BYTES, binary=True)


# -- load shapes ---------------------------------------------------------------------------------
# Locust uses a shape class only when it is not abstract, so LOAD_SHAPE picks at most one.


class _Shape(LoadTestShape):
    """Reads ``-u`` (peak users), ``-r`` (spawn rate) and ``-t`` (total time) from the command."""

    abstract: ClassVar[bool] = True
    use_common_options: ClassVar[bool] = True

    def _options(self) -> tuple[int, float, float]:
        options = self.runner.environment.parsed_options if self.runner else None
        users = getattr(options, "num_users", None) or 10
        spawn_rate = getattr(options, "spawn_rate", None) or float(users)
        run_time_s = getattr(options, "run_time", None) or DEFAULT_RUN_TIME_S
        return int(users), float(spawn_rate), float(run_time_s)


class StepLoad(_Shape):
    """``LOAD_STEPS`` equal steps up to ``-u`` users, each a ``1/LOAD_STEPS`` of ``-t``."""

    abstract: ClassVar[bool] = LOAD_SHAPE != "step"

    def tick(self) -> tuple[int, float] | None:
        users, spawn_rate, run_time_s = self._options()
        elapsed_s = self.get_run_time()
        if elapsed_s >= run_time_s:
            return None
        steps = max(1, min(STEPS, users))
        step = min(steps - 1, int(elapsed_s / (run_time_s / steps)))
        return max(1, round(users * (step + 1) / steps)), spawn_rate


class SpikeLoad(_Shape):
    """A fifth of ``-u`` users, all ``-u`` for the middle fifth of ``-t``, then a fifth again."""

    abstract: ClassVar[bool] = LOAD_SHAPE != "spike"

    def tick(self) -> tuple[int, float] | None:
        users, _, run_time_s = self._options()
        elapsed_s = self.get_run_time()
        if elapsed_s >= run_time_s:
            return None
        spike = 0.4 * run_time_s <= elapsed_s < 0.6 * run_time_s
        # the spike arrives at once: spawn every user within a second
        return (users if spike else max(1, users // 5)), float(users)
