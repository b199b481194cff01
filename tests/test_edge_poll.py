"""The edge's periodic index check (``edge_poll_s``): the origin connection stays open between
pulls, and a new version's manifest is fetched as soon as the index lists it.

Origins are real servers on loopback: a gateway node process (which closes idle connections
after ``keepalive_timeout_s``) behind a TCP relay that counts connections, and ``FakeOrigin``
(which logs every request). The check rides the requests edges made before (a conditional GET
of ``models.json``, the manifest by its published path): nothing new on the wire, so old
origins and old edges are unaffected.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from pathlib import Path

import pytest

from gateway.repository.edge import EdgeRepository
from gateway.repository.manifest import parse_index
from tests import edge_origins
from tests.edge_origins import (
    SIZE,
    FakeOrigin,
    StaticOrigin,
    edit,
    open_edge,
    publish,
    random_bytes,
)
from tests.helpers import start_gateway

# the shared set-up: model m v1 at an origin, a FakeOrigin on it (pytest finds them here)
repo = edge_origins.repo
fake = edge_origins.fake


class CountingRelay:
    """A TCP relay to ``port`` that counts the connections made through it."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            server = socket.create_connection(("127.0.0.1", self.upstream))
            self._sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                thread = threading.Thread(target=_pipe, args=(a, b), daemon=True)
                thread.start()
                self._threads.append(thread)

    def stop(self) -> None:
        self.listener.close()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()
        for thread in [self._accept, *self._threads]:
            thread.join(5)


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


async def _until(check: object, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.05)
    return False


async def test_next_pull_reuses_the_connection_the_index_check_kept_open(
    repo: Path, tmp_path: Path
) -> None:
    """A node closes a connection idle for 2 s; the edge checks every 0.4 s, so a new version
    pulled 3 s after the last one crosses on the connection already open. (With 1 s of
    keep-alive a check that a loaded CI machine delayed by 0.6 s let the node close it.)"""
    node = start_gateway(repo, tmp_path, env={"GATEWAY_KEEPALIVE_TIMEOUT_S": "2"})
    relay = CountingRelay(node.port)
    edge = open_edge(f"http://127.0.0.1:{relay.port}", tmp_path / "cache", edge_poll_s=0.4)
    try:
        await edge.fetch("m")
        await asyncio.sleep(3.0)  # more than the node's keep-alive
        publish(repo, "m", 2, edit(random_bytes(SIZE, 1), 1000, 4000))
        await asyncio.sleep(0.3)
        opened = relay.connections
        await edge.refresh_index(force=True)
        await edge.fetch("m")
        assert (edge.cache.models_dir / "m" / "2" / "model.onnx").exists()
        assert relay.connections == opened, "the pull opened a new connection"
    finally:
        await edge.close()
        relay.stop()
        node.stop()


async def test_index_check_fetches_a_new_versions_manifest_before_the_load(
    repo: Path, fake: FakeOrigin, tmp_path: Path
) -> None:
    """A model the cache holds gets its new version's manifest from the check; the load that
    follows asks the origin for the missing bytes only."""
    edge = open_edge(fake.url, tmp_path / "cache", edge_poll_s=0.2)
    try:
        await edge.fetch("m")
        publish(repo, "m", 2, edit(random_bytes(SIZE, 1), 1000, 4000))
        index = parse_index((repo / "models.json").read_bytes())
        sha = index["m"].versions[2]
        assert await _until(lambda: edge.cache.complete(sha) is not None, 5.0)
        fake.requests.clear()
        await edge.fetch("m")
        assert (edge.cache.models_dir / "m" / "2" / "model.onnx").exists()
        assert not fake.paths("manifest.json") and not fake.paths("manifest.json.gz")
        assert fake.paths("model.onnx"), "the changed bytes came from the origin"
    finally:
        await edge.close()


async def test_no_index_checks_when_off(repo: Path, fake: FakeOrigin, tmp_path: Path) -> None:
    """``edge_poll_s = 0``: the index is asked only when a load needs it."""
    edge = open_edge(fake.url, tmp_path / "cache", edge_poll_s=0)
    try:
        await edge.fetch("m")
        fake.requests.clear()
        await asyncio.sleep(0.6)
        assert fake.requests == []
    finally:
        await edge.close()


async def test_a_pooled_connection_closed_by_the_server_is_asked_again() -> None:
    """A server that closes a kept-alive connection as the next request arrives (its idle
    limit, racing the request): the GET goes again on a new connection, no error (aiohttp
    does this for idempotent requests; the index check relies on it)."""
    from gateway.repository.origin import HttpOrigin

    connections = 0
    body = b'{"models": {}}'
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        mine, served = connections, 0
        while await reader.readline():
            while (await reader.readline()).strip():
                pass  # the headers
            if mine == 1 and served == 1:
                break  # closed as the second request arrived, unanswered
            writer.write(answer)
            await writer.drain()
            served += 1
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    origin = HttpOrigin(f"http://127.0.0.1:{port}")
    try:
        for _ in range(2):
            got, _ = await origin.index(None, 1 << 20)
            assert got == body
        assert connections == 2
    finally:
        await origin.close()
        server.close()
        await server.wait_closed()


async def test_index_checks_back_off_while_the_origin_fails(
    repo: Path, fake: FakeOrigin, tmp_path: Path
) -> None:
    """An origin that stops answering (its index gone: 404) is asked ever less often, not every
    ``edge_poll_s``: 0.1, 0.2, 0.4, 0.8 s apart."""
    edge = open_edge(fake.url, tmp_path / "cache", edge_poll_s=0.1)
    try:
        await edge.fetch("m")
        (repo / "models.json").unlink()
        await asyncio.sleep(0.3)
        fake.requests.clear()
        await asyncio.sleep(1.5)
        asked = len(fake.paths("models.json"))
        assert 1 <= asked <= 5, f"{asked} index requests in 1.5 s"
    finally:
        await edge.close()


async def test_a_load_waits_for_the_manifest_the_index_check_is_fetching(
    repo: Path, fake: FakeOrigin, tmp_path: Path
) -> None:
    """A load that needs the manifest the index check is fetching at that moment waits for it:
    the manifest crosses the link once."""
    edge = open_edge(fake.url, tmp_path / "cache", edge_poll_s=0)
    try:
        await edge.fetch("m")
        publish(repo, "m", 2, edit(random_bytes(SIZE, 1), 1000, 4000))
        index = await edge.refresh_index(force=True)
        fake.requests.clear()
        check = asyncio.ensure_future(edge._prefetch_manifest("m", index["m"]))
        await edge.fetch("m")
        await check
        assert (edge.cache.models_dir / "m" / "2" / "model.onnx").exists()
        assert len(fake.paths("2/manifest.json.gz")) + len(fake.paths("2/manifest.json")) == 1
    finally:
        await edge.close()


def _as_before_gzip(root: Path) -> None:
    """The origin's layout from before gzipped manifests: no ``.gz``, no ``manifests_gzip``."""
    for packed in root.rglob("manifest.json.gz"):
        packed.unlink()
    index = json.loads((root / "models.json").read_text())
    index.pop("manifests_gzip", None)
    (root / "models.json").write_text(json.dumps(index))


async def test_index_check_on_an_origin_from_before(repo: Path, tmp_path: Path) -> None:
    """A static server from before (Last-Modified only, no ETag, no gzipped manifests, no
    Range): the check is a conditional GET it answers with 304 until the index changes, and the
    new version's plain manifest is fetched by its published path."""
    _as_before_gzip(repo)
    origin = StaticOrigin(repo).start()
    edge = open_edge(origin.url, tmp_path / "cache", edge_poll_s=0.2)
    try:
        await edge.fetch("m")
        await asyncio.sleep(1.1)  # Last-Modified has whole seconds
        publish(repo, "m", 2, edit(random_bytes(SIZE, 1), 1000, 4000))
        _as_before_gzip(repo)
        sha = parse_index((repo / "models.json").read_bytes())["m"].versions[2]
        assert await _until(lambda: edge.cache.complete(sha) is not None, 5.0)
        assert "/m/2/manifest.json" in origin.requests
        assert not any(p.endswith(".gz") for p in origin.requests)
        origin.requests.clear()
        await edge.fetch("m")
        assert (edge.cache.models_dir / "m" / "2" / "model.onnx").exists()
        assert "/m/2/manifest.json" not in origin.requests
    finally:
        await edge.close()
        origin.stop()


async def test_index_checks_are_in_no_requests_trace(
    repo: Path, fake: FakeOrigin, tmp_path: Path
) -> None:
    """The check started by a traced load runs in a context of its own: its requests carry
    no ``traceparent`` of that load's trace."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from gateway import tracing

    tracing.install(InMemorySpanExporter(), ratio=1.0)
    edge = open_edge(fake.url, tmp_path / "cache", edge_poll_s=0.1)
    try:
        with tracing.span(tracing.EXECUTE) as span:
            assert span is not None
            trace_id = format(span.get_span_context().trace_id, "032x")
            await edge.fetch("m")
        traced = [h for h in fake.headers if trace_id in h.get("traceparent", "")]
        assert traced, "the load's own requests are in its trace"
        fake.headers.clear()
        assert await _until(lambda: len(fake.headers) >= 2, 5.0)  # two checks
        assert not [h for h in fake.headers if trace_id in h.get("traceparent", "")]
    finally:
        await edge.close()
        tracing.shutdown()


# -- a load by the index the check keeps current ---------------------------------------------


class Clock:
    """Stands for ``time.monotonic`` in the edge: the index's age moves only when told (the
    periodic check, which waits on it, never comes round by itself)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _checked(edge: EdgeRepository, clock: Clock, after_s: float) -> None:
    """What the periodic check does ``after_s`` after the last answer: the index, and the
    newest version's manifest of a model the cache holds."""
    clock.now += after_s
    index = await edge.refresh_index(force=True)
    await edge._prefetch_manifest("m", index["m"])


async def test_a_load_by_a_recent_index_fetches_before_the_index_answers(
    repo: Path, fake: FakeOrigin, tmp_path: Path
) -> None:
    """The check saw v2 (and fetched its manifest) 2.5 s before the load: older than the
    index's TTL, so the load asks again, but only once the chunk transfer is under way, and it
    serves v2 when the answer confirms it."""
    clock = Clock()
    edge = open_edge(fake.url, tmp_path / "cache", clock=clock, edge_poll_s=4.0)
    try:
        await edge.fetch("m")
        publish(repo, "m", 2, edit(random_bytes(SIZE, 1), 1000, 4000))
        await _checked(edge, clock, 3.0)
        clock.now += 2.5
        fake.requests.clear()
        await edge.fetch("m")
        assert (edge.cache.models_dir / "m" / "2" / "model.onnx").exists()
        asked = fake.paths()
        assert "models.json" in asked, "the load did not ask the origin"
        assert asked.index("m/2/model.onnx") < asked.index("models.json"), asked
    finally:
        await edge.close()


async def _load_changed_200k(repo: Path, fake: FakeOrigin, tmp_path: Path) -> dict[str, int]:
    """A load of a v2 with ~200 KiB changed (sent by the origin in 16 KiB pieces 50 ms
    apart), 2.5 s after the check saw it: how many answers the origin was sending as each
    request arrived."""
    clock = Clock()
    edge = open_edge(fake.url, tmp_path / "cache", clock=clock, edge_poll_s=4.0)
    try:
        await edge.fetch("m")
        publish(repo, "m", 2, edit(random_bytes(SIZE, 1), 100_000, 200_000))
        await _checked(edge, clock, 3.0)
        clock.now += 2.5
        fake.chunk_delay_s = 0.05
        fake.sending_at.clear()
        await edge.fetch("m")
        assert (edge.cache.models_dir / "m" / "2" / "model.onnx").exists()
        return dict(fake.sending_at)
    finally:
        await edge.close()


async def test_a_large_transfer_has_the_index_asked_beside_it(
    repo: Path, fake: FakeOrigin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With at least ``ASK_BESIDE_BYTES`` to take over the link, the load's index question
    reaches the origin while the transfer is still being sent (on a second connection)."""
    from gateway.repository import edge as edge_module

    monkeypatch.setattr(edge_module, "ASK_BESIDE_BYTES", 64 * 1024)
    sending = await _load_changed_200k(repo, fake, tmp_path)
    assert sending.get("models.json", 0) >= 1, sending


async def test_a_small_transfer_has_the_index_asked_after_it(
    repo: Path, fake: FakeOrigin, tmp_path: Path
) -> None:
    """Under ``ASK_BESIDE_BYTES`` (a second connection would take longer than the transfer):
    the question follows the transfer, on the connection it used."""
    sending = await _load_changed_200k(repo, fake, tmp_path)
    assert sending.get("models.json") == 0, sending


async def test_a_version_published_after_the_last_check_is_served_by_the_load(
    repo: Path, fake: FakeOrigin, tmp_path: Path
) -> None:
    """v3 is published after the check saw v2: the load fetches by the index it holds, but the
    answer it asked for meanwhile lists v3, which the same load fetches and serves."""
    clock = Clock()
    edge = open_edge(fake.url, tmp_path / "cache", clock=clock, edge_poll_s=4.0)
    try:
        await edge.fetch("m")
        publish(repo, "m", 2, edit(random_bytes(SIZE, 1), 1000, 4000))
        await _checked(edge, clock, 3.0)
        publish(repo, "m", 3, edit(random_bytes(SIZE, 1), 9000, 4000, seed=5))
        clock.now += 2.5
        await edge.fetch("m")
        assert (edge.cache.models_dir / "m" / "3" / "model.onnx").exists()
    finally:
        await edge.close()


async def test_a_version_withdrawn_after_the_last_check_fails_no_load(
    repo: Path, fake: FakeOrigin, tmp_path: Path
) -> None:
    """The check saw v2; the origin then replaced it by v3 (v2's files gone): the fetch by the
    index held fails, the answer lists v3, and the load serves v3."""
    import shutil

    clock = Clock()
    edge = open_edge(fake.url, tmp_path / "cache", clock=clock, edge_poll_s=4.0)
    try:
        await edge.fetch("m")
        publish(repo, "m", 2, edit(random_bytes(SIZE, 1), 1000, 4000))
        await _checked(edge, clock, 3.0)
        shutil.rmtree(repo / "m" / "2")
        publish(repo, "m", 3, edit(random_bytes(SIZE, 1), 9000, 4000, seed=5))  # index too
        clock.now += 2.5
        fake.requests.clear()
        await edge.fetch("m")
        assert fake.paths("m/2/model.onnx"), "the load fetched by the index it held"
        assert (edge.cache.models_dir / "m" / "3" / "model.onnx").exists()
    finally:
        await edge.close()


@pytest.mark.parametrize(("poll_s", "age_s"), [(4.0, 6.5), (0.0, 2.5)], ids=["old", "no-checks"])
async def test_a_load_by_an_old_index_asks_first(
    repo: Path, fake: FakeOrigin, tmp_path: Path, poll_s: float, age_s: float
) -> None:
    """An index answered more than 1.5 x ``edge_poll_s`` ago (the checks stalled), or one no
    periodic check keeps current (``edge_poll_s = 0``), is not fetched by: the load asks for
    the index first."""
    clock = Clock()
    edge = open_edge(fake.url, tmp_path / "cache", clock=clock, edge_poll_s=poll_s)
    try:
        await edge.fetch("m")
        publish(repo, "m", 2, edit(random_bytes(SIZE, 1), 1000, 4000))
        await _checked(edge, clock, 3.0)
        clock.now += age_s
        fake.requests.clear()
        await edge.fetch("m")
        asked = fake.paths()
        assert asked.index("models.json") < asked.index("m/2/model.onnx"), asked
    finally:
        await edge.close()


async def test_a_prefetched_manifest_is_parsed_once(
    repo: Path, fake: FakeOrigin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check parses the manifest it prefetched (and serialises its chunk lists for the
    state): the load that follows neither parses it nor serialises its chunk list again, and
    builds the same file."""
    from gateway.repository import edge as edge_module

    parsed: list[str] = []
    parse = edge_module.parse_manifest

    def counted(raw: bytes, where: str) -> edge_module.Manifest:
        parsed.append(where)
        return parse(raw, where)

    monkeypatch.setattr(edge_module, "parse_manifest", counted)
    edge = open_edge(fake.url, tmp_path / "cache", edge_poll_s=0)
    try:
        await edge.fetch("m")
        publish(repo, "m", 2, edit(random_bytes(SIZE, 1), 1000, 4000))
        index = await edge.refresh_index(force=True)
        parsed.clear()
        await edge._prefetch_manifest("m", index["m"])
        assert parsed == ["m/2/manifest.json"]
        (manifest,) = edge._parsed.values()
        rows = manifest.files[0].chunks
        assert len(rows) > 1
        text = edge.cache._rows_json[id(rows)]  # serialised by the check
        await edge.fetch("m")
        assert parsed == ["m/2/manifest.json"], "the load parsed the manifest again"
        assert edge.cache._rows_json[id(rows)] is text, "the load serialised it again"
        assert edge.cache._file_chunks[manifest.files[0].sha256] is rows
        built = edge.cache.models_dir / "m" / "2" / "model.onnx"
        assert built.read_bytes() == (repo / "m" / "2" / "model.onnx").read_bytes()
        assert not edge._parsed  # handed to the load, not kept
    finally:
        await edge.close()
