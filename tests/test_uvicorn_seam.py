"""What ``gateway.server.connections`` relies on in uvicorn, checked against the installed one.

The connection layer extends uvicorn's httptools protocol (``Config(http=...)``, uvicorn's
documented seam for its HTTP implementation). Beyond that seam, uvicorn promises nothing about
its protocol classes, so the module lists every name it uses (``RELIED_ON``), ``pyproject.toml``
pins the uvicorn range these tests passed on, and these tests fail loudly when a uvicorn release
renames, drops or changes one of them, or when the module starts to use a name it does not
list. They run in-process, against a fake transport: no server, no sockets.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import textwrap
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from uvicorn import Config
from uvicorn.protocols.http import httptools_impl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from gateway.batching import clients
from gateway.server import connections
from gateway.server.connections import (
    HOOKS,
    RELIED_ON,
    ConnectionProtocol,
    RawExchange,
    connection_protocol,
)

ROOT = Path(__file__).resolve().parents[1]

# The signatures of the methods the module overrides or calls, as it calls them.
SIGNATURES = {
    "connection_made": ["self", "transport"],
    "data_received": ["self", "data"],
    "connection_lost": ["self", "exc"],
    "on_message_begin": ["self"],
    "on_headers_complete": ["self"],
    "on_message_complete": ["self"],
    "send_400_response": ["self", "msg"],
    "on_response_complete": ["self"],
}


def test_installed_uvicorn_is_in_the_pinned_range() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = [Requirement(d) for d in project["dependencies"] if d.startswith("uvicorn")]
    assert len(pins) == 1
    spec = pins[0].specifier
    assert any(s.operator in ("<", "<=", "==", "~=") for s in spec), "no upper bound on uvicorn"
    installed = metadata.version("uvicorn")
    assert spec.contains(installed), f"uvicorn {installed} is outside the pinned {spec}"


def test_the_documented_seam_takes_the_protocol_class_and_the_app_as_is() -> None:
    """``Config(http=cls)`` makes uvicorn build connections with ``cls`` and these keywords, and
    the app the protocol finds as ``self.app`` is the one given (``raw_enabled`` is read there)."""
    app = _App()
    cls = connection_protocol(1.0, 1.0, 1024)
    config = Config(app, http=cls, log_config=None, proxy_headers=False)
    config.load()
    assert config.http_protocol_class is cls
    assert config.loaded_app is app
    params = inspect.signature(HttpToolsProtocol.__init__).parameters
    assert {"config", "server_state", "app_state"} <= set(params)


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_overridden_and_called_methods_keep_their_signatures(name: str) -> None:
    relied = RELIED_ON["HttpToolsProtocol.overridden"] + RELIED_ON["HttpToolsProtocol.used"]
    assert name in relied
    ours = getattr(ConnectionProtocol, name)
    theirs = getattr(HttpToolsProtocol, name, None)
    assert callable(theirs), f"uvicorn's HttpToolsProtocol no longer has {name}"
    assert list(inspect.signature(theirs).parameters) == SIGNATURES[name]
    assert list(inspect.signature(ours).parameters) == SIGNATURES[name]


async def test_protocol_and_cycle_have_every_name_relied_on() -> None:
    protocol, _ = _connect(_App())
    protocol.data_received(b"POST /asgi HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n")
    for name in RELIED_ON["HttpToolsProtocol.overridden"] + RELIED_ON["HttpToolsProtocol.used"]:
        assert hasattr(protocol, name), f"uvicorn's HttpToolsProtocol has no {name} any more"
    cycle = protocol.cycle
    assert type(cycle) is RequestResponseCycle
    for name in RELIED_ON["RequestResponseCycle.used"]:
        assert hasattr(cycle, name), f"uvicorn's RequestResponseCycle has no {name} any more"
    for name in RELIED_ON["ServerState.used"]:
        assert hasattr(protocol.server_state, name), f"uvicorn's ServerState has no {name}"
    params = list(inspect.signature(RequestResponseCycle.__init__).parameters.values())[1:]
    assert [p.name for p in params] == list(RELIED_ON["RequestResponseCycle.__init__"])
    assert all(p.default is inspect.Parameter.empty for p in params)
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)
    assert isinstance(httptools_impl.STATUS_LINE[200], bytes)
    await _drain(protocol)


async def test_the_module_uses_no_uvicorn_name_it_does_not_list() -> None:
    """Every attribute the module's classes touch on uvicorn's objects is listed in
    ``RELIED_ON``, and none is private (``_``-prefixed)."""
    tree = ast.parse(inspect.getsource(connections))
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    protocol_names = set(dir(HttpToolsProtocol)) | set(vars(_bare_protocol()))
    cycle_names = set(dir(RequestResponseCycle)) | set(_cycle_init_attributes())
    listed_protocol = set(RELIED_ON["HttpToolsProtocol.overridden"]) | set(
        RELIED_ON["HttpToolsProtocol.used"]
    )
    listed_cycle = set(RELIED_ON["RequestResponseCycle.used"])
    used: dict[str, set[str]] = {"protocol": set(), "cycle": set(), "state": set()}
    defined: dict[str, set[str]] = {}
    for class_name, owner, holder in (
        ("ConnectionProtocol", "protocol", ("self", "super()")),
        ("RawExchange", "cycle", ("self", "super()")),
    ):
        node = classes[class_name]
        defined[class_name] = {item.name for item in node.body if isinstance(item, ast.FunctionDef)}
        for sub in ast.walk(node):
            if not isinstance(sub, ast.Attribute):
                continue
            base = sub.value
            base_text = ast.unparse(base)
            if base_text in holder:
                used[owner].add(sub.attr)
            elif base_text == "protocol":  # RawExchange's constructor argument
                used["protocol"].add(sub.attr)
            elif base_text in ("cycle", "self.cycle", "exchange"):
                used["cycle"].add(sub.attr)
            elif base_text.endswith("server_state"):
                used["state"].add(sub.attr)
    for names in used.values():
        names.discard("__init__")
    overridden = (defined["ConnectionProtocol"] & protocol_names) - {"__init__"}
    assert overridden == set(RELIED_ON["HttpToolsProtocol.overridden"])
    assert defined["RawExchange"] & cycle_names == {"__init__"}
    from_uvicorn = used["protocol"] & protocol_names
    assert from_uvicorn <= listed_protocol, from_uvicorn - listed_protocol
    from_cycle = used["cycle"] & cycle_names
    assert from_cycle <= listed_cycle, from_cycle - listed_cycle
    assert used["state"] <= set(RELIED_ON["ServerState.used"])
    private = {n for n in from_uvicorn | from_cycle | overridden if n.startswith("_")}
    assert not private, private


# uvicorn's ``on_response_complete``, whose usual case (no pipelined request, connection open:
# count, resume reading, arm the keep-alive timer) ``ConnectionProtocol`` does itself.
ON_RESPONSE_COMPLETE = """\
self.server_state.total_requests += 1
if self.transport.is_closing():
    return
self._unset_keepalive_if_required()
self.flow.resume_reading()
if self.pipeline:
    cycle, app = self.pipeline.pop()
    self._start_asgi_task(cycle, app)
else:
    self.timeout_keep_alive_task = self.loop.call_later(\
self.timeout_keep_alive, self.timeout_keep_alive_handler)"""


def test_the_partly_replaced_method_is_still_uvicorns_as_read() -> None:
    """A new uvicorn that does more (or less) at a response's end fails here: read its
    ``on_response_complete`` and bring ``ConnectionProtocol``'s in line before widening the pin."""
    source = textwrap.dedent(inspect.getsource(HttpToolsProtocol.on_response_complete))
    function = ast.parse(source).body[0]
    assert isinstance(function, ast.FunctionDef)
    body = function.body
    if ast.get_docstring(function) is not None:
        body = body[1:]
    assert ast.unparse(body) == ON_RESPONSE_COMPLETE


async def test_a_raw_exchange_rides_uvicorns_cycle() -> None:
    """What the raw path leaves to uvicorn still happens: the parser fills in the exchange's
    body, a pipelined request waits behind it in uvicorn's queue (reading paused), and its
    response starts that request; the last response arms uvicorn's keep-alive timer."""
    app = _App()
    protocol, transport = _connect(app, keep_alive_s=0.05)
    protocol.data_received(b"POST /raw HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nab")
    assert app.taken == []  # the body is not all there
    protocol.data_received(b"c" + b"GET /asgi HTTP/1.1\r\nHost: x\r\n\r\n")
    [(exchange, route)] = app.taken
    assert route == "/raw" and isinstance(exchange, RequestResponseCycle)
    assert exchange.take_body() == b"abc" and not exchange.more_body
    assert exchange.hooks is protocol.scope[HOOKS]  # the GET's scope: the same connection
    assert len(protocol.pipeline) == 1 and transport.paused
    exchange.respond(200, [(b"content-length", b"2")], b"hi")
    assert transport.chunks == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi"]
    assert not transport.paused and not protocol.pipeline
    for _ in range(20):
        await asyncio.sleep(0)
    assert app.served == ["/asgi"] and transport.chunks[1:] == [
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    ]
    assert protocol.server_state.total_requests == 2
    await asyncio.sleep(0.2)
    assert transport.closed  # uvicorn's keep-alive timer, armed after the last response


async def test_a_large_body_goes_raw_kept_as_read_and_answered_without_a_join() -> None:
    """A body far over uvicorn's 64 KiB flow-control mark still takes the raw path: its pieces
    are kept as the parser hands them (reading is never paused: its length was checked against
    the limit first) and joined once; a large answer is written beside its head, not copied
    into one bytes with it."""
    app = _App()
    protocol, transport = _connect(app)
    body = bytes(range(256)) * 1024  # 256 KiB
    protocol.data_received(
        b"POST /raw HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    for start in range(0, len(body), 100_000):
        protocol.data_received(body[start : start + 100_000])
        assert not transport.paused
    [(exchange, route)] = app.taken
    assert route == "/raw" and app.served == []
    assert len(exchange.chunks) == 3 and not exchange.body  # uvicorn's bytearray never filled
    assert exchange.take_body() == body and exchange.chunks == []
    answer = bytes(100_000)
    exchange.respond(200, [(b"content-length", b"%d" % len(answer))], answer)
    [[head, written]] = transport.lines
    assert written is answer and head.endswith(b"\r\n\r\n")
    await _drain(protocol)


async def test_shutdown_and_disconnect_reach_a_raw_exchange() -> None:
    """Graceful shutdown lets a raw exchange in flight finish and then closes; a client that
    leaves marks it disconnected and calls the connection's hook."""
    app = _App()
    protocol, transport = _connect(app)
    request = b"POST /raw HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\na"
    protocol.data_received(request)
    [(exchange, _)] = app.taken
    protocol.shutdown()
    assert not transport.closed
    exchange.respond(200, [(b"content-length", b"2")], b"hi")
    assert transport.chunks == [
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nhi"
    ]
    assert transport.closed

    protocol, transport = _connect(app)
    protocol.data_received(request)
    exchange = app.taken[-1][0]
    lost: list[bool] = []
    exchange.hooks.on_lost = lambda: lost.append(True)
    protocol.connection_lost(None)
    assert exchange.disconnected and lost == [True] and transport.closed
    exchange.respond(200, [(b"content-length", b"2")], b"hi")
    assert transport.chunks == []


async def test_a_whole_request_read_again_is_read_as_httptools_read_it() -> None:
    """A whole request in one read whose head httptools has read before is taken without the
    parser: the same exchange as the parser gives, and uvicorn still stops its keep-alive timer
    when it arrives."""
    app = _App()
    protocol, transport = _connect(app, keep_alive_s=0.1)
    head = (
        b"POST /raw HTTP/1.1\r\nHost: x\r\nX-Thing:  a b \t\r\nContent-Length: 3\r\n"
        b"Connection: keep-alive\r\n\r\n"
    )
    empty = [(b"content-length", b"0")]
    protocol.data_received(head)  # in two reads: the parser's
    protocol.data_received(b"abc")
    parsed = app.taken[-1][0]
    parsed.respond(200, empty, b"")
    protocol.data_received(head + b"abc")  # in one, read before: without the parser
    again = app.taken[-1][0]
    assert again is not parsed and protocol.cycle is again
    assert list(again.headers) == list(parsed.headers)
    assert (again.take_body(), again.keep_alive, again.more_body) == (b"abc", True, False)
    assert again.hooks is parsed.hooks
    again.respond(200, empty, b"")
    await asyncio.sleep(0.06)
    protocol.data_received(head + b"abc")  # before the keep-alive timeout
    await asyncio.sleep(0.1)
    assert not transport.closed  # the timer was stopped by the request's arrival
    app.taken[-1][0].respond(200, empty, b"")
    assert len(app.taken) == 3 and protocol.server_state.total_requests == 3
    await asyncio.sleep(0.2)
    assert transport.closed


class _App:
    """A ``RawHandler`` that takes ``POST /raw`` and keeps the exchange; ASGI answers "ok"."""

    raw_enabled = True

    def __init__(self) -> None:
        self.taken: list[tuple[RawExchange, Any]] = []
        self.served: list[str] = []

    def raw_route(self, path: str, length: int) -> str | None:
        return path if path == "/raw" else None

    def answer_raw(self, exchange: RawExchange, route: Any) -> None:
        self.taken.append((exchange, route))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.served.append(scope["path"])
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
        )
        await send({"type": "http.response.body", "body": b"ok"})


class _Transport:
    """What uvicorn's protocol and ``GatheringTransport`` call on a transport, recorded."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.lines: list[list[bytes]] = []  # what each writelines call was handed
        self.closed = False
        self.paused = False

    def write(self, data: bytes) -> None:
        self.chunks.append(bytes(data))

    def writelines(self, chunks: list[bytes]) -> None:
        self.lines.append(list(chunks))
        self.chunks.append(b"".join(chunks))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def _config(app: Any, keep_alive_s: float = 5.0) -> Config:
    config = Config(
        app,
        log_config=None,
        proxy_headers=False,
        timeout_keep_alive=keep_alive_s,  # type: ignore[arg-type]  # an int in uvicorn's hint
    )
    config.load()
    return config


def _connect(app: Any, keep_alive_s: float = 5.0) -> tuple[ConnectionProtocol, _Transport]:
    """A connection as uvicorn's server makes one (its keywords), on a fake transport."""
    cls = connection_protocol(10.0, 10.0, 64 * 1024)
    protocol = cls(config=_config(app, keep_alive_s), server_state=ServerState(), app_state={})
    transport = _Transport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    return protocol, transport


def _bare_protocol() -> HttpToolsProtocol:
    """uvicorn's own protocol, amid a request head (``url``, ``scope``, ``headers`` are set)."""
    protocol = HttpToolsProtocol(config=_config(_App()), server_state=ServerState(), app_state={})
    protocol.connection_made(_Transport())  # type: ignore[arg-type]
    protocol.data_received(b"GET / HTTP/1.1\r\nHost")
    return protocol


def _cycle_init_attributes() -> list[str]:
    """The attributes ``RequestResponseCycle.__init__`` sets, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(RequestResponseCycle.__init__)))
    return [
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and ast.unparse(node.value) == "self"
    ]


async def _drain(protocol: ConnectionProtocol) -> None:
    """Let the ASGI task the request started finish, and close the connection."""
    protocol.data_received(b"x")
    for _ in range(20):
        await asyncio.sleep(0)
    protocol.connection_lost(None)


@pytest.mark.parametrize("split", [False, True])
async def test_a_connection_counts_for_the_batchers_from_its_first_post(split: bool) -> None:
    """An HTTP/1.1 connection carries one request at a time. It counts among those who may
    still send (``gateway.batching.clients``) from its first POST, whose arrival the count
    keeps (clients that connect per request), not before: health checks, metadata and metrics
    send nothing to batch with. It stops counting when it is lost. The POST whole in one read
    (taken without the parser) or ``split`` inside its head (read by the parser)."""
    loop = asyncio.get_running_loop()
    app = _App()
    post = b"POST /raw HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\na"
    reads = [post[:2], post[2:]] if split else [post]

    def counted() -> tuple[int, int]:
        known = clients._BY_LOOP.get(loop)
        return (0, 0) if known is None else (known.open, known.carry)

    opened, carry = counted()
    protocol, _ = _connect(app)
    assert counted() == (opened + 1, carry)
    protocol.data_received(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
    for _ in range(20):
        await asyncio.sleep(0)
    assert app.served == ["/v2/health/ready"] and counted() == (opened + 1, carry)
    clients._BY_LOOP[loop].first_s -= clients.RECENT_FIRST_S
    assert clients.may_send(loop, 0) == carry
    for read in reads:
        protocol.data_received(read)
    assert counted() == (opened + 1, carry + 1)
    assert clients.may_send(loop, 0) is None  # its first POST came just now
    app.taken[-1][0].respond(200, [(b"content-length", b"0")], b"")
    protocol.data_received(post)
    assert counted() == (opened + 1, carry + 1)  # one at a time, however many
    app.taken[-1][0].respond(200, [(b"content-length", b"0")], b"")
    protocol.connection_lost(None)
    assert counted() == (opened, carry)
