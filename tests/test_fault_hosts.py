"""Host and cache faults under load: every request gets an answer within its deadline.

Each scenario drives a bounded number of requests (a few concurrent, each with a deadline: the
v2 ``timeout`` parameter, or a client-side limit) and counts them: ``ok``, ``failed`` (a clear
JSON ``{"error": ...}`` with 429 / 503 / 504) and ``lost`` (no HTTP answer, a connection error,
or an answer later than the deadline plus ``SLACK_S``). Run with ``pytest -s`` to see the
``sent=.. ok=.. failed=.. lost=..`` line of each.

1. A v2 host that accepts connections and never answers: a real worker frozen with SIGSTOP (the
   kernel keeps accepting and buffering, the process never reads or writes).
2. A v2 host that answers garbage: a fake (no real server does this on demand) that is healthy to
   probes and answers every inference with something malformed, a different kind each time.
3. An edge replica whose origin (a real process, throttled) is SIGKILLed mid-download, then
   comes back on the same address.
4. An edge cache on a disk that fills up: ENOSPC injected at the cache's writes (no real small
   filesystem can be mounted without root), in an in-process gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests import models
from tests.edge_origins import SIMPLE_INPUTS, FakeOrigin
from tests.helpers import ROOT, GatewayProcess, InProcessGateway, free_port, get, start_gateway

QUIET = {"GATEWAY_ACCESS_LOG": "false"}
ALLOWED = frozenset({429, 503, 504})
SLACK_S = 1.0  # an answer later than deadline + this counts as lost (2 shared CPUs in CI)
BIG_FEATURES, BIG_CLASSES = 1024, 256  # "big": a 1 MiB model, 64 chunks from a FakeOrigin

BIG_INPUTS = {
    "inputs": [
        {
            "name": "X",
            "datatype": "FP32",
            "shape": [1, BIG_FEATURES],
            "data": [(i % 7) / 7 for i in range(BIG_FEATURES)],
        }
    ]
}


def simple_ok(body: dict[str, Any]) -> bool:
    return bool(body["outputs"][0]["data"] == [i + 1 for i in range(16)])


def big_ok(body: dict[str, Any]) -> bool:
    out = body["outputs"][0]
    return bool(out["shape"] == [1, BIG_CLASSES] and abs(sum(out["data"]) - 1.0) < 1e-3)


# -- counting --------------------------------------------------------------------------------


@dataclass
class Tally:
    name: str
    sent: int = 0
    ok: int = 0
    failed: int = 0
    lost: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: list[tuple[int, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # bad error bodies, wrong answers, lost

    def line(self) -> str:
        return (
            f"{self.name}: sent={self.sent} ok={self.ok} failed={self.failed} lost={self.lost} "
            f"statuses={dict(sorted(self.statuses.items()))}"
        )

    def check(self) -> None:
        print(self.line())
        for status, message in dict(reversed(self.errors)).items():  # one example per status
            print(f"    {status}: {message[:160]}")
        assert self.sent == self.ok + self.failed + self.lost, self.line()
        assert self.lost == 0, f"{self.line()}\n" + "\n".join(self.problems[:10])
        assert not self.problems, f"{self.line()}\n" + "\n".join(self.problems[:10])


async def infer(
    session: aiohttp.ClientSession,
    url: str,
    model: str,
    inputs: dict[str, Any],
    ok: Callable[[dict[str, Any]], bool],
    tally: Tally,
    deadline_s: float | None = None,
    wait_s: float = 5.0,
) -> int:
    """One request; ``deadline_s`` travels as the v2 ``timeout`` parameter, without it the
    client waits ``wait_s``. Returns the status (0: lost)."""
    body = dict(inputs)
    if deadline_s is not None:
        body["parameters"] = {"timeout": int(deadline_s * 1e6)}
    limit_s = (deadline_s if deadline_s is not None else wait_s) + SLACK_S
    tally.sent += 1
    started = time.monotonic()
    try:
        async with session.post(
            f"{url}/v2/models/{model}/infer", json=body, timeout=aiohttp.ClientTimeout(limit_s)
        ) as response:
            raw = await response.read()
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        tally.lost += 1
        tally.problems.append(f"lost after {time.monotonic() - started:.2f} s: {exc!r}")
        return 0
    elapsed_s = time.monotonic() - started
    tally.statuses[status] += 1
    if elapsed_s > limit_s:
        tally.lost += 1
        tally.problems.append(f"{status} after {elapsed_s:.2f} s (limit {limit_s:.2f} s)")
        return 0
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if status == 200:
        try:
            right = isinstance(data, dict) and ok(data)
        except (KeyError, IndexError, TypeError):
            right = False
        if right:
            tally.ok += 1
        else:
            tally.failed += 1
            tally.problems.append(f"200 with a wrong answer: {raw[:200]!r}")
        return status
    tally.failed += 1
    if not (isinstance(data, dict) and isinstance(data.get("error"), str)):
        tally.problems.append(f"{status} without a JSON error body: {raw[:200]!r}")
    elif status not in ALLOWED:
        tally.problems.append(f"unexpected status {status}: {data['error']}")
    else:
        tally.errors.append((status, data["error"]))
    return status


def host_table(gw_url: str) -> dict[str, dict[str, Any]]:
    status, body = get(f"{gw_url}/admin/hosts")
    assert status == 200, body
    return {h["name"]: h for h in json.loads(body)["hosts"]}


async def still_healthy(
    url: str,
    model: str = "simple",
    inputs: dict[str, Any] = SIMPLE_INPUTS,
    ok: Callable[[dict[str, Any]], bool] = simple_ok,
) -> None:
    assert get(f"{url}/v2/health/ready")[0] == 200
    after = Tally("after")
    async with aiohttp.ClientSession() as session:
        assert await infer(session, url, model, inputs, ok, after, deadline_s=5.0) == 200, (
            after.problems,
            after.errors,
        )


def front_toml(path: Path, hosts: dict[str, str], **extra: Any) -> Path:
    """A front gateway routing only across ``hosts`` (name -> address)."""
    settings = {
        "local_execution": False,
        "routing_policy": "latency",
        "host_probe_interval_s": 0.2,
        "host_timeout_s": 1.0,
        "ejection_base_s": 1.0,
        "access_log": False,
        **extra,
    }
    lines = [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    for name, address in hosts.items():
        lines += ["[[hosts]]", f'name = "{name}"', 'kind = "v2"', f'url = "{address}"']
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def workers(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Path, Path, list[GatewayProcess]]]:
    repo = tmp_path_factory.mktemp("fault-repo")
    models.add_sub(repo, "simple")
    tmp = tmp_path_factory.mktemp("fault-logs")
    started: list[GatewayProcess] = []
    try:
        for _ in range(2):
            started.append(start_gateway(repo, tmp, env=QUIET))
        yield repo, tmp, started
    finally:
        for worker in started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.process.pid, signal.SIGCONT)
            worker.stop(signal.SIGKILL)


# -- 1. a host that accepts connections and never answers ------------------------------------


async def test_host_that_never_answers(
    workers: tuple[Path, Path, list[GatewayProcess]],
) -> None:
    repo, tmp, (good, frozen) = workers
    config = front_toml(tmp / "hung.toml", {"good": good.address, "frozen": frozen.address})
    front = start_gateway(repo, tmp, "--config", str(config))
    tally = Tally("hung host")
    state = {"answered": 0, "stopped": False}
    try:
        async with aiohttp.ClientSession() as session:
            warm = Tally("warm")
            for _ in range(10):
                await infer(session, front.url, "simple", SIMPLE_INPUTS, simple_ok, warm, 5.0)
            assert warm.ok == 10, warm.problems

            async def client() -> None:
                while tally.sent < 120:
                    # Half carry a deadline (answered by it); half none (host_timeout_s, retry).
                    deadline_s = 2.0 if tally.sent % 2 == 0 else None
                    await infer(
                        session, front.url, "simple", SIMPLE_INPUTS, simple_ok, tally, deadline_s
                    )
                    state["answered"] += 1
                    if state["answered"] >= 20 and not state["stopped"]:
                        state["stopped"] = True
                        os.kill(frozen.process.pid, signal.SIGSTOP)
                    await asyncio.sleep(0.01)

            await asyncio.gather(*(client() for _ in range(6)))
        tally.check()
        assert tally.ok >= 0.8 * tally.sent, tally.errors
        # Taken out by its timed-out batches (ejection) or by the health probe, whichever
        # comes first: traffic avoids it sooner still (a batch out longer than the good host
        # takes floors its latency estimate), so the probe may be what marks it.
        deadline = time.monotonic() + 5
        while (hosts := host_table(front.url))["frozen"]["state"] not in ("down", "ejected"):
            assert time.monotonic() < deadline, hosts["frozen"]
            await asyncio.sleep(0.1)
        assert hosts["good"]["state"] == "up"
        await still_healthy(front.url)

        os.kill(frozen.process.pid, signal.SIGCONT)  # thawed: probed up again
        state["stopped"] = False
        deadline = time.monotonic() + 10
        while host_table(front.url)["frozen"]["state"] != "up":
            assert time.monotonic() < deadline, host_table(front.url)["frozen"]
            await asyncio.sleep(0.1)
        await still_healthy(front.url)
    finally:
        if state["stopped"]:
            os.kill(frozen.process.pid, signal.SIGCONT)
        front.stop()


# -- 2. a host that answers garbage ----------------------------------------------------------


class GarbageHost:
    """A fake v2 host: healthy to probes (``/v2/health/*``, ``.../ready``: 200) and malformed on
    every inference, cycling through ``MODES``. One request per connection."""

    MODES = (
        "not-json",  # 200, a JSON content type, an HTML body
        "bad-status-line",  # not HTTP
        "truncated",  # Content-Length says more than is sent, then the connection closes
        "header-length-lie",  # Inference-Header-Content-Length past the end of the body
        "binary-size-lie",  # binary_data_size larger than the bytes that follow
        "missing-outputs",  # well-formed, no outputs
        "wrong-rows",  # well-formed, one row too many
    )

    def __init__(self) -> None:
        self.port = 0
        self.infers = 0
        self.served: Counter[str] = Counter()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> GarbageHost:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(5)
        return self

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            method, path = head[0].split()[:2]
            headers = {}
            for line in head[1:]:
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            if method == "POST" and path.endswith("/infer"):
                mode = self.MODES[self.infers % len(self.MODES)]
                self.infers += 1
                self.served[mode] += 1
                writer.write(self._garbage(mode, body, headers))
            elif (
                path.startswith("/v2/health/")
                or path.endswith("/ready")
                or path.startswith("/v2/repository/models/")  # a Triton push / unload: "done"
            ):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            else:
                error = b'{"error": "not here"}'
                writer.write(_http(404, error))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    @staticmethod
    def _garbage(mode: str, body: bytes, headers: dict[str, str]) -> bytes:
        length = int(headers.get("inference-header-content-length", len(body)))
        rows = int(json.loads(body[:length])["inputs"][0]["shape"][0])
        if mode == "not-json":
            return _http(200, b"<html><body>502 Bad Gateway</body></html>")
        if mode == "bad-status-line":
            return b"HTTP/1.1 2OO WAT\r\n\r\n"
        if mode == "truncated":
            return (
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 4096\r\n"
                b'Connection: close\r\n\r\n{"model_name": "simple", "outputs": ['
            )
        outputs = [
            {"name": n, "datatype": "INT32", "shape": [rows, 16]} for n in ("OUTPUT0", "OUTPUT1")
        ]
        if mode in ("header-length-lie", "binary-size-lie"):
            for out in outputs:
                out["parameters"] = {"binary_data_size": rows * 64}
            header = json.dumps({"model_name": "simple", "outputs": outputs}).encode()
            lie = mode == "header-length-lie"
            blobs = bytes(rows * 128) if lie else b"\x01" * 10
            claimed = len(header) + len(blobs) + 1000 if lie else len(header)
            return _http(
                200,
                header + blobs,
                f"Inference-Header-Content-Length: {claimed}\r\n",
                "application/octet-stream",
            )
        if mode == "missing-outputs":
            return _http(200, json.dumps({"model_name": "simple", "outputs": []}).encode())
        assert mode == "wrong-rows"
        for out in outputs:
            out["shape"] = [rows + 1, 16]
            out["data"] = [0] * ((rows + 1) * 16)
        return _http(200, json.dumps({"model_name": "simple", "outputs": outputs}).encode())


def _http(status: int, body: bytes, extra: str = "", kind: str = "application/json") -> bytes:
    return (
        f"HTTP/1.1 {status} X\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n{extra}"
        "Connection: close\r\n\r\n"
    ).encode() + body


async def test_host_that_answers_garbage(
    workers: tuple[Path, Path, list[GatewayProcess]],
) -> None:
    repo, tmp, (good, _) = workers
    garbage = GarbageHost().start()
    front: GatewayProcess | None = None
    try:
        config = front_toml(
            tmp / "garbage.toml",
            {"garbage": garbage.address, "good": good.address},
            ejection_base_s=0.1,  # re-admitted soon, so every kind of garbage gets its turn
        )
        front = start_gateway(repo, tmp, "--config", str(config))
        tally = Tally("garbage host")
        async with aiohttp.ClientSession() as session:

            async def client() -> None:
                while tally.sent < 150:
                    await infer(session, front.url, "simple", SIMPLE_INPUTS, simple_ok, tally, 2.0)
                    await asyncio.sleep(0.04)

            await asyncio.gather(*(client() for _ in range(4)))
        print(f"garbage served: {dict(garbage.served)}")
        tally.check()
        assert tally.ok >= 0.9 * tally.sent, tally.errors
        assert set(garbage.served) == set(GarbageHost.MODES), garbage.served
        hosts = host_table(front.url)
        assert hosts["garbage"]["times_ejected"] >= 1, hosts["garbage"]
        assert hosts["garbage"]["completed"] == 0, hosts["garbage"]  # never taken as an answer
        assert hosts["good"]["state"] == "up"
        await still_healthy(front.url)
    finally:
        if front is not None:
            front.stop()
        garbage.stop()


async def test_triton_host_that_answers_garbage(
    workers: tuple[Path, Path, list[GatewayProcess]],
) -> None:
    """The same garbage from a ``kind = "triton"`` host (tritonclient's parser): each answer is a
    clear 503, never a 500, a hang or a wrong result."""
    repo, tmp, _ = workers
    garbage = GarbageHost().start()
    front: GatewayProcess | None = None
    try:
        config = tmp / "garbage-triton.toml"
        config.write_text(
            "host_probe_interval_s = 0.1\n"
            # The router ejects a host that keeps failing (Triton hosts too, since one router
            # serves every kind): re-admitted soon, so every kind of garbage gets its turn.
            "ejection_base_s = 0.1\n"
            f'[[hosts]]\nname = "t"\nkind = "triton"\nurl = "http://{garbage.address}"\n'
        )
        front = start_gateway(repo, tmp, "--config", str(config), env=QUIET)
        tally = Tally("garbage Triton host")
        async with aiohttp.ClientSession() as session:
            while len(garbage.served) < len(GarbageHost.MODES) and tally.sent < 200:
                await infer(session, front.url, "simple", SIMPLE_INPUTS, simple_ok, tally, 2.0)
                await asyncio.sleep(0.02)
        print(f"garbage served: {dict(garbage.served)}")
        tally.check()
        assert tally.ok == 0, tally  # no garbage passed for an answer
        assert set(garbage.served) == set(GarbageHost.MODES), garbage.served
        status, _ = get(f"{front.url}/v2/health/live")
        assert status == 200
    finally:
        if front is not None:
            front.stop()
        garbage.stop()


# -- 3. an edge whose origin dies mid-download -----------------------------------------------

# A FakeOrigin in a process of its own, on a fixed port (so it can come back on the same URL).
ORIGIN_SCRIPT = """
import asyncio, sys, threading
from pathlib import Path
from tests.edge_origins import FakeOrigin
root, port, delay = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
start_server = asyncio.start_server
async def on_port(handler, host, _port, **kwargs):
    return await start_server(handler, host, port, **kwargs)
asyncio.start_server = on_port
FakeOrigin(root, chunk_delay_s=delay).start()
print("serving", port, flush=True)
threading.Event().wait()
"""


class OriginProcess:
    def __init__(self, root: Path, tmp: Path) -> None:
        self.root = root
        self.tmp = tmp
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, chunk_delay_s: float) -> OriginProcess:
        with (self.tmp / f"origin-{self.port}.log").open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    ORIGIN_SCRIPT,
                    str(self.root),
                    str(self.port),
                    str(chunk_delay_s),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.tmp / f"origin-{self.port}.log").read_text()
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError("origin did not start")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_blobs_whole(cache: Path) -> None:
    """Every file the cache holds as complete has the content its name says."""
    for blob in (cache / "blobs/sha256").iterdir():
        assert _sha256(blob) == blob.name, f"corrupt blob held as complete: {blob}"


def _metric(url: str, line_prefix: str) -> float:
    text = get(f"{url}/metrics")[1].decode()
    for line in text.splitlines():
        if line.startswith(line_prefix):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{line_prefix} not in /metrics")


@pytest.fixture(scope="module")
def edge_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gateway.repository.manifest import write_manifests

    root = tmp_path_factory.mktemp("edge-origin")
    models.add_sub(root, "simple")
    models.dense(root, "big", features=BIG_FEATURES, classes=BIG_CLASSES)
    write_manifests(root)
    return root


async def test_edge_origin_dies_mid_download(edge_repo: Path, tmp_path: Path) -> None:
    big_file = edge_repo / "big/1/model.onnx"
    big_sha, big_size = _sha256(big_file), big_file.stat().st_size
    cache = tmp_path / "cache"
    part = cache / "tmp" / f"{big_sha}.part"
    origin = OriginProcess(edge_repo, tmp_path).start(chunk_delay_s=0.05)  # ~3 s for "big"
    edge: GatewayProcess | None = None
    try:
        edge = _edge(origin.url, cache, tmp_path)
        big, simple = Tally("edge origin dies: big"), Tally("edge origin dies: simple")
        plan = {"big": (big, BIG_INPUTS, big_ok), "simple": (simple, SIMPLE_INPUTS, simple_ok)}
        stop = asyncio.Event()
        async with aiohttp.ClientSession() as session:

            async def client(model: str) -> None:
                tally, inputs, ok = plan[model]
                while not stop.is_set() and tally.sent < 150:
                    await infer(session, edge.url, model, inputs, ok, tally, deadline_s=1.0)
                    await asyncio.sleep(0.05)

            clients = [asyncio.ensure_future(client(m)) for m in ["big"] * 4 + ["simple"]]
            try:
                await _until(lambda: part.exists() and part.stat().st_size >= 256 * 1024, 15)
                origin.kill()  # mid-download: the edge sees a cut stream, then refused connects
                killed = len(big.errors)
                await _until(
                    lambda: any(s == 503 for s, _ in big.errors[killed:]), 15, "a 503 for big"
                )
                # Origin down: nothing partial is held as complete, the model is not there.
                assert_blobs_whole(cache)
                assert not (cache / "blobs/sha256" / big_sha).exists()
                assert not (cache / "models/big/1/model.onnx").exists()
                assert not part.exists() or part.stat().st_size < big_size
                message = next(m for s, m in big.errors[killed:] if s == 503)
                assert "cannot be fetched" in message, message

                await asyncio.to_thread(origin.start, 0.0)  # back, on the same address
                await _until(lambda: big.ok >= 30, 20, "big served after the origin came back")
            finally:
                stop.set()
                await asyncio.gather(*clients)
        big.check()
        simple.check()
        assert simple.ok == simple.sent  # the cached model served throughout
        assert {s for s, _ in big.errors} <= {503, 504}
        assert big.statuses[503] >= 1 and big.ok >= 30
        assert_blobs_whole(cache)
        assert (cache / "models/big/1/model.onnx").read_bytes() == big_file.read_bytes()
        assert not part.exists()
        # Resumed from the partial file, not fetched again from the start.
        fetched = _metric(edge.url, 'gateway_cache_fetched_bytes_total{source="origin"}')
        assert fetched < big_size + 128 * 1024, fetched
        await still_healthy(edge.url, "big", BIG_INPUTS, big_ok)
    finally:
        if edge is not None:
            edge.stop()
        origin.kill()


def _edge(url: str, cache: Path, tmp: Path) -> GatewayProcess:
    return start_gateway(
        url,
        tmp,
        "--cache-dir",
        str(cache),
        "--prefetch",
        "simple",
        env=QUIET,  # type: ignore[arg-type]
    )


async def _until(condition: Callable[[], bool], timeout_s: float, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        await asyncio.sleep(0.02)


# -- 4. a cache disk that fills up -----------------------------------------------------------


class DiskQuota:
    """Writes under ``root`` through ``Path.open`` (the cache's downloads, state files) share
    ``free`` bytes; past it they fail with ENOSPC after writing what fits, like a full disk."""

    def __init__(self, root: Path, free: int) -> None:
        self.root = root
        self.free = free
        self.refused = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_open = Path.open
        quota = self

        def open_(path: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            f = real_open(path, mode, *args, **kwargs)
            if any(c in mode for c in "wax+") and path.is_relative_to(quota.root):
                return _QuotaFile(f, quota)
            return f

        monkeypatch.setattr(Path, "open", open_)


class _QuotaFile:
    def __init__(self, f: Any, quota: DiskQuota) -> None:
        self._f = f
        self._quota = quota

    def write(self, data: bytes) -> int:
        if len(data) > self._quota.free:
            fits = self._quota.free
            self._f.write(data[:fits])
            self._quota.free = 0
            self._quota.refused += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._quota.free -= len(data)
        return int(self._f.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _QuotaFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


async def test_cache_disk_fills_up(
    edge_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.settings import Settings

    big_file = edge_repo / "big/1/model.onnx"
    big_sha = _sha256(big_file)
    cache = tmp_path / "cache"
    quota = DiskQuota(cache, free=256 * 1024)  # room for "simple", not for the 1 MiB "big"
    quota.install(monkeypatch)
    origin = FakeOrigin(edge_repo).start()
    gateway: InProcessGateway | None = None
    try:
        settings = Settings(
            model_repo=origin.url,
            cache_dir=str(cache),
            port=free_port(),
            prefetch=("simple",),
            access_log=False,
        )
        gateway = await asyncio.to_thread(InProcessGateway(settings).start)
        big, simple = Tally("disk full: big"), Tally("disk full: simple")
        plan = {"big": (big, BIG_INPUTS, big_ok), "simple": (simple, SIMPLE_INPUTS, simple_ok)}
        async with aiohttp.ClientSession() as session:

            async def client(model: str) -> None:
                tally, inputs, ok = plan[model]
                for _ in range(30):
                    await infer(session, gateway.url, model, inputs, ok, tally, deadline_s=2.0)
                    await asyncio.sleep(0.01)

            await asyncio.gather(*(client(m) for m in ("big", "big", "simple", "simple")))
        big.check()
        simple.check()
        assert quota.refused >= 1
        assert simple.ok == simple.sent  # already cached: keeps serving
        assert big.ok == 0 and big.statuses[503] == big.sent, big.line()
        assert all("space" in message.lower() for _, message in big.errors), big.errors[:3]
        assert_blobs_whole(cache)
        assert not (cache / "blobs/sha256" / big_sha).exists()
        assert not list((cache / "tmp").glob("*.part"))  # the partial download was removed
        assert not (cache / "models/big").exists()
        assert get(f"{gateway.url}/v2/health/ready")[0] == 200

        quota.free = 64 << 20  # space freed: the next request loads it
        after = Tally("after")
        async with aiohttp.ClientSession() as session:
            await infer(session, gateway.url, "big", BIG_INPUTS, big_ok, after, deadline_s=10.0)
        assert after.ok == 1, (after.problems, after.errors)
        assert_blobs_whole(cache)
        await still_healthy(gateway.url)
    finally:
        if gateway is not None:
            await asyncio.to_thread(gateway.stop)
        origin.stop()


def test_bug_in_the_hot_path_is_a_json_500_and_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug that escapes the inference handler (here: the response encoder raising) answers that
    one request with a JSON 500 and its request id; the next request is served as usual."""
    import gateway.server.infer as hot
    from gateway.settings import Settings

    real = hot.encode_infer_response
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> tuple[bytes, int | None]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(hot, "encode_infer_response", flaky)
    settings = Settings(model_repo=str(ROOT / "model_repo"), port=free_port(), access_log=False)
    gateway = InProcessGateway(settings).start()
    try:
        url = f"{gateway.url}/v2/models/simple/infer"
        body = json.dumps(SIMPLE_INPUTS).encode()
        request = urllib.request.Request(url, body, {"X-Request-ID": "bug-1"}, method="POST")
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(request, timeout=10)
        assert failed.value.code == 500
        assert failed.value.headers["X-Request-ID"] == "bug-1"
        assert json.loads(failed.value.read()) == {"error": "internal error: RuntimeError"}
        with urllib.request.urlopen(urllib.request.Request(url, body), timeout=10) as answer:
            assert simple_ok(json.loads(answer.read()))
    finally:
        gateway.stop()
