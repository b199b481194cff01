"""Traffic features' costs: the response cache's hit path against a miss, and an ensemble
against calling its steps by hand; each as a ratio to its baseline measured in the same run.

Everything runs in this process through ``DataPlane.submit`` (the one request path every front
end takes), on the shipped ``mlp``, ``preprocess`` and ``mlp_pipeline`` with real ONNX Runtime
sessions, so the figures are the data plane's and not HTTP's. The copies' queue delay is 0 so
a lone request measures the path, not a wait for company. Rounds interleave the variants; the
ratio reported is the median of the per-round ratios.

- cache: ``mlp`` with ``response_cache { enable: true }``. *miss*: each request new data (the
  full batch path plus the lookup and the insertion); *hit*: the same data again (answered in
  ``submit``); *redis hit*: the same through a real ``redis-server`` when one is installed.
- ensemble: ``mlp_pipeline`` (``preprocess`` -> ``mlp``) against ``preprocess`` then ``mlp``
  awaited by the caller.

Each is measured one request at a time (latency per request) and with 64 in flight
(throughput, where misses and steps batch).

    .venv/bin/python bench/traffic.py                 # 5 rounds, writes bench/results/traffic.md
    .venv/bin/python bench/traffic.py --quick --out /tmp/traffic.md
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
from harness import RESULTS, ROOT, machine_info, write_results

from gateway.backends.onnxruntime import OnnxRuntimeFactory
from gateway.dataplane import DataPlane
from gateway.protocol.types import InferRequest
from gateway.repository.local import LocalRepository
from gateway.settings import Settings
from gateway.testing.redis_server import RedisServer, redis_server_binary

FEATURES = 1024
Run = Callable[[int], Awaitable[tuple[float, float]]]  # requests -> (wall s, process CPU s)


def _repo(dest: Path) -> Path:
    """``preprocess``, ``mlp`` (cached) and ``mlp_pipeline``, queue delay 0."""
    import shutil

    for name in ("preprocess", "mlp", "mlp_pipeline"):
        shutil.copytree(ROOT / "model_repo" / name, dest / name)
        config = dest / name / "config.pbtxt"
        text = re.sub(r"dynamic_batching\s*\{[^}]*\}", "dynamic_batching {\n}", config.read_text())
        if name == "mlp":
            text += "response_cache {\n  enable: true\n}\n"
        config.write_text(text)
    return dest


async def _dataplane(repo: Path, **settings: object) -> DataPlane:
    config = Settings(model_repo=str(repo), access_log=False, **settings)  # type: ignore[arg-type]
    dataplane = DataPlane(config, LocalRepository(repo), OnnxRuntimeFactory(config))
    await dataplane.start()
    return dataplane


def _rows(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(0, 255, (1, FEATURES)).astype(np.float32) for _ in range(count)]


async def _timed(
    one: Callable[[int], Awaitable[object]], count: int, in_flight: int
) -> tuple[float, float]:
    """Wall and process CPU seconds (ONNX Runtime's threads included) for ``count`` calls of
    ``one(i)``, ``in_flight`` at a time (waves). On a shared machine the CPU is the steadier
    measure of what a path costs; the wall time also holds waits for the cores."""
    started, cpu = time.perf_counter(), time.process_time()
    for first in range(0, count, in_flight):
        await asyncio.gather(*(one(i) for i in range(first, min(count, first + in_flight))))
    return time.perf_counter() - started, time.process_time() - cpu


class Scenarios:
    """The variants, each ``Run`` for a given number of requests."""

    def __init__(self, local: DataPlane, redis: DataPlane | None, in_flight: int) -> None:
        self.local, self.redis, self.in_flight = local, redis, in_flight
        self._seed = 0
        self.hot = _rows(1, 999)[0]

    def _fresh(self, count: int) -> list[np.ndarray]:
        self._seed += 1
        return _rows(count, self._seed)

    async def miss(self, count: int) -> tuple[float, float]:
        rows = self._fresh(count)
        return await _timed(
            lambda i: self.local.submit("mlp", None, InferRequest({"INPUT": rows[i]})),
            count,
            self.in_flight,
        )

    async def hit(self, count: int) -> tuple[float, float]:
        await self.local.submit("mlp", None, InferRequest({"INPUT": self.hot}))  # stored
        return await _timed(
            lambda i: self.local.submit("mlp", None, InferRequest({"INPUT": self.hot})),
            count,
            self.in_flight,
        )

    async def redis_hit(self, count: int) -> tuple[float, float]:
        assert self.redis is not None
        redis = self.redis
        await redis.submit("mlp", None, InferRequest({"INPUT": self.hot}))
        await asyncio.sleep(0.05)  # its background write
        return await _timed(
            lambda i: redis.submit("mlp", None, InferRequest({"INPUT": self.hot})),
            count,
            self.in_flight,
        )

    async def by_hand(self, count: int) -> tuple[float, float]:
        rows = self._fresh(count)

        async def one(i: int) -> object:
            pre = await self.local.submit("preprocess", None, InferRequest({"RAW": rows[i]}))
            request = InferRequest({"INPUT": pre.outputs["NORMALIZED"]})
            return await self.local.submit("mlp", None, request)

        return await _timed(one, count, self.in_flight)

    async def ensemble(self, count: int) -> tuple[float, float]:
        rows = self._fresh(count)
        return await _timed(
            lambda i: self.local.submit("mlp_pipeline", None, InferRequest({"RAW": rows[i]})),
            count,
            self.in_flight,
        )


async def _measure(args: argparse.Namespace, workdir: Path) -> tuple[str, dict[str, object]]:
    repo = _repo(workdir / "repo")
    server: RedisServer | None = None
    if redis_server_binary() is not None and not args.no_redis:
        server = RedisServer(workdir / "redis").start()
    local = await _dataplane(repo, response_cache_bytes=64 << 20)
    redis = None
    if server is not None:
        redis = await _dataplane(
            repo, response_cache_redis_url=server.url, response_cache_redis_timeout_s=0.5
        )
    try:
        pairs: list[tuple[str, str, str]] = [  # (group, variant, baseline)
            ("cache", "hit", "miss"),
            ("ensemble", "ensemble", "by_hand"),
        ]
        if redis is not None:
            pairs.insert(1, ("cache", "redis_hit", "miss"))
        names = sorted({n for _, a, b in pairs for n in (a, b)})
        results: dict[str, dict[str, list[float]]] = {}
        for in_flight, count in ((1, args.sequential), (64, args.concurrent)):
            scenarios = Scenarios(local, redis, in_flight)
            runs: dict[str, Run] = {n: getattr(scenarios, n) for n in names}
            for run in runs.values():  # warm every path (sessions, caches, Redis connection)
                await run(min(count, 64))
            wall: dict[str, list[float]] = {n: [] for n in names}
            cpu: dict[str, list[float]] = {n: [] for n in names}
            for _ in range(args.rounds):
                for name, run in runs.items():
                    wall_s, cpu_s = await run(count)
                    wall[name].append(wall_s / count * 1e6)  # us per request
                    cpu[name].append(cpu_s / count * 1e6)
            results[f"wall@{in_flight}"] = wall
            results[f"cpu@{in_flight}"] = cpu
    finally:
        await local.stop()
        if redis is not None:
            await redis.stop()
        if server is not None:
            server.stop()
    lines = [
        f"Command: `{' '.join(['python bench/traffic.py', *sys.argv[1:]])}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  ",
        f"Machine: {machine_info().get('cpu', '?')}, 2 cores shared with other work: compare "
        f"ratios, not absolute figures. {args.rounds} interleaved rounds; each ratio is the "
        "median of the per-round ratios. CPU: this process's, ONNX Runtime's threads included.",
        "",
        "| group | in flight | variant / baseline | wall us/req | baseline | wall ratio "
        "| CPU us/req | baseline | CPU ratio |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    data: dict[str, object] = {"rounds": args.rounds, "us_per_request": results}
    ratios: dict[str, float] = {}
    for in_flight in ("1", "64"):
        wall, cpu = results[f"wall@{in_flight}"], results[f"cpu@{in_flight}"]
        for group, variant, baseline in pairs:
            cells = []
            for kind, per in (("wall", wall), ("cpu", cpu)):
                paired = [v / b for v, b in zip(per[variant], per[baseline], strict=True)]
                key = f"{kind}:{variant}/{baseline}@{in_flight}"
                ratios[key] = statistics.median(paired)
                cells.append(
                    f"{statistics.median(per[variant]):.0f} | "
                    f"{statistics.median(per[baseline]):.0f} | {ratios[key]:.3f}x"
                )
            lines.append(
                f"| {group} | {in_flight} | {variant} / {baseline} | {cells[0]} | {cells[1]} |"
            )
    data["ratios"] = ratios
    return "\n".join(lines) + "\n", data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--sequential", type=int, default=200, help="requests per round, 1 in flight"
    )
    parser.add_argument(
        "--concurrent", type=int, default=512, help="requests per round, 64 in flight"
    )
    parser.add_argument("--quick", action="store_true", help="2 rounds of fewer requests (CI)")
    parser.add_argument("--no-redis", action="store_true", help="skip the Redis variant")
    parser.add_argument("--out", default=str(RESULTS / "traffic.md"))
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.sequential, args.concurrent = 2, 50, 128
    with tempfile.TemporaryDirectory(prefix="bench-traffic-") as tmp:
        markdown, data = asyncio.run(_measure(args, Path(tmp)))
    print(markdown)
    write_results(Path(args.out), markdown, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
