"""Every front end answers every case alike: REST JSON and REST binary (each on the raw HTTP path
and on the ASGI path, ``GATEWAY_RAW_INFER=false``), gRPC ``ModelInfer`` and gRPC
``ModelStreamInfer``, all over one data plane call (``DataPlane.submit``).

Each case runs through each front end of real gateway processes; the outcomes must be the same:
the status class (each protocol's status mapped to the HTTP one, e.g. NOT_FOUND -> 404), the
error message, or the outputs. ``ModelStreamInfer`` carries no status in its responses (an
``error_message``, as Triton's), so there only the message is compared.

The last test drains the local gateways (SIGTERM with a shutdown delay): keep it last.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import signal
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from gateway.pending import BATCH_NOTE
from gateway.repository.manifest import write_manifests
from tests import models
from tests.helpers import GatewayProcess, free_port, start_gateway

# A model whose batches wait up to 2 s for more rows, with room for one request in its queue:
# two requests fill it (one waiting in the batch being formed, one queued), the third is refused.
TIGHT = """
name: "tight"
max_batch_size: 8
dynamic_batching {
  max_queue_delay_microseconds: 2000000
  preferred_batch_size: [ 8 ]
  default_queue_policy { max_queue_size: 1 }
}
"""
COLD = [f"cold{i}" for i in range(6)]  # one per front end: each pulled first by that one

# gRPC codes as the HTTP status of the same class (gateway/grpc/errors.py, server/errors.py).
GRPC_CLASS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503,  # a message above the limit, admission control
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


@dataclass(frozen=True)
class Case:
    """One request: a model and its INT32 inputs (name, shape, values), the request's
    parameters; ``malformed``: a body (message) its codec must refuse."""

    model: str = "simple"
    version: str = ""
    inputs: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = (
        ("INPUT0", (1, 16), tuple(range(16))),
        ("INPUT1", (1, 16), (1,) * 16),
    )
    parameters: dict[str, int] = field(default_factory=dict)
    malformed: bool = False


@dataclass(frozen=True)
class Outcome:
    """What a front end answered: its status class (None: the protocol has none), the error
    message ("" when it succeeded) and, on success, the version and outputs."""

    status: int | None
    message: str
    result: tuple[Any, ...] = ()


@dataclass
class Node:
    """A gateway process, its HTTP and gRPC ports."""

    process: GatewayProcess
    grpc_port: int


def _values(data: bytes, count: int) -> tuple[int, ...]:
    return struct.unpack(f"<{count}i", data)


def _ok(version: str, outputs: dict[str, tuple[int, ...]]) -> Outcome:
    return Outcome(200, "", (version, tuple(sorted(outputs.items()))))


# -- the front ends ---------------------------------------------------------------------------


def _post(node: Node, case: Case, body: bytes, headers: dict[str, str]) -> tuple[int, Any, bytes]:
    path = f"/v2/models/{case.model}" + (f"/versions/{case.version}" if case.version else "")
    connection = http.client.HTTPConnection("127.0.0.1", node.process.port, timeout=30)
    try:
        connection.request("POST", path + "/infer", body, headers)
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def _rest_error(status: int, payload: bytes) -> Outcome:
    return Outcome(status, str(json.loads(payload)["error"]))


def rest_json(node: Node, case: Case) -> Outcome:
    body = {
        "inputs": [
            {"name": n, "datatype": "INT32", "shape": list(s), "data": list(v)}
            for n, s, v in case.inputs
        ],
        "parameters": case.parameters,
    }
    raw = b'{"inputs": [' if case.malformed else json.dumps(body).encode()
    status, _, payload = _post(node, case, raw, {"Content-Type": "application/json"})
    if status != 200:
        return _rest_error(status, payload)
    answer = json.loads(payload)
    outputs = {o["name"]: tuple(o["data"]) for o in answer["outputs"]}
    return _ok(answer["model_version"], outputs)


def rest_binary(node: Node, case: Case) -> Outcome:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": n,
                    "datatype": "INT32",
                    "shape": list(s),
                    "parameters": {"binary_data_size": 4 * len(v)},
                }
                for n, s, v in case.inputs
            ],
            "outputs": [
                {"name": n, "parameters": {"binary_data": True}} for n in ("OUTPUT0", "OUTPUT1")
            ],
            "parameters": case.parameters,
        }
    ).encode()
    body = header + b"".join(struct.pack(f"<{len(v)}i", *v) for _, _, v in case.inputs)
    declared = len(body) + 5 if case.malformed else len(header)  # the header past the body
    status, headers, payload = _post(
        node,
        case,
        body,
        {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(declared),
        },
    )
    if status != 200:
        return _rest_error(status, payload)
    length = int(headers["Inference-Header-Content-Length"])
    answer = json.loads(payload[:length])
    outputs, offset = {}, length
    for output in answer["outputs"]:
        size = output["parameters"]["binary_data_size"]
        outputs[output["name"]] = _values(payload[offset : offset + size], size // 4)
        offset += size
    return _ok(answer["model_version"], outputs)


def _grpc_request(case: Case) -> Any:
    message = pb.ModelInferRequest(model_name=case.model, model_version=case.version)
    for name, shape, values in case.inputs:
        message.inputs.add(name=name, datatype="INT32", shape=list(shape))
        raw = struct.pack(f"<{len(values)}i", *values)
        message.raw_input_contents.append(raw[:10] if case.malformed else raw)
    for key, value in case.parameters.items():
        message.parameters[key].int64_param = value
    return message


def _grpc_result(response: Any) -> Outcome:
    outputs = {
        o.name: _values(raw, len(raw) // 4)
        for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }
    return _ok(response.model_version, outputs)


def grpc_unary(node: Node, case: Case) -> Outcome:
    with grpc.insecure_channel(f"127.0.0.1:{node.grpc_port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            response = stub.ModelInfer(_grpc_request(case), timeout=30)
        except grpc.RpcError as exc:
            return Outcome(GRPC_CLASS.get(exc.code(), 500), exc.details() or "")
    return _grpc_result(response)


def grpc_stream(node: Node, case: Case) -> Outcome:
    with grpc.insecure_channel(f"127.0.0.1:{node.grpc_port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        (response,) = list(stub.ModelStreamInfer(iter([_grpc_request(case)]), timeout=30))
    if response.error_message:
        return Outcome(None, response.error_message)
    return _grpc_result(response.infer_response)


FrontEnd = Callable[[Node, Case], Outcome]
# (name, which gateway of a raw/asgi pair, how it asks)
FRONT_ENDS: list[tuple[str, str, FrontEnd]] = [
    ("rest-json-raw", "raw", rest_json),
    ("rest-binary-raw", "raw", rest_binary),
    ("rest-json-asgi", "asgi", rest_json),
    ("rest-binary-asgi", "asgi", rest_binary),
    ("grpc", "raw", grpc_unary),
    ("grpc-stream", "raw", grpc_stream),
]


def _pending(node: Node, model: str) -> float:
    """``nv_inference_pending_request_count`` of ``model`` (every version): queued or running."""
    with urllib.request.urlopen(f"{node.process.url}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    prefix = f'nv_inference_pending_request_count{{model="{model}"'
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def ask_all(pair: dict[str, Node], case: Case | Callable[[int], Case]) -> dict[str, Outcome]:
    """The case through every front end (``case(i)``: the i-th front end's own case)."""
    outcomes = {}
    for number, (name, which, ask) in enumerate(FRONT_ENDS):
        outcomes[name] = ask(pair[which], case if isinstance(case, Case) else case(number))
    return outcomes


def assert_alike(outcomes: dict[str, Outcome], status: int, message: str | None = None) -> None:
    """Every front end: this status class (where the protocol has one) and one message (this
    one, when given), or, for 200, the same outputs."""
    for name, outcome in outcomes.items():
        assert outcome.status in (status, None), f"{name}: {outcome}"
        if status == 200:
            assert outcome.status == 200, f"{name}: {outcome}"
    if message is not None:
        assert {o.message for o in outcomes.values()} == {message}, outcomes
    if status == 200:
        results = {name: o.result for name, o in outcomes.items()}
        assert len(set(results.values())) == 1, results


# -- gateways ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def frontends_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``simple``, ``tight`` and the ``cold*`` copies of ``simple``, published (manifests) so
    the same directory is also an edge's ``file://`` origin."""
    root = tmp_path_factory.mktemp("frontends-repo")
    models.add_sub(root, "simple")
    models.add_sub(root, "tight", config=TIGHT)
    for name in COLD:
        models.add_sub(root, name)
    write_manifests(root)
    return root


def _start_pair(model_repo: str, tmp: Path, env: dict[str, str], *args: str) -> dict[str, Node]:
    """Two gateways on ``model_repo`` at once, the raw HTTP path on and off, each with gRPC."""

    def start(which: str) -> Node:
        grpc_port = free_port()
        flags = {**env, "GATEWAY_RAW_INFER": "true" if which == "raw" else "false"}
        gw = start_gateway(
            model_repo,  # type: ignore[arg-type]  # a path or an origin URL
            tmp,
            "--grpc-port",
            str(grpc_port),
            *[a.replace("{which}", which) for a in args],
            env=flags,
        )
        return Node(gw, grpc_port)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {which: pool.submit(start, which) for which in ("raw", "asgi")}
        nodes: dict[str, Node] = {}
        try:
            for which, future in futures.items():
                nodes[which] = future.result()
        except BaseException:
            for future in futures.values():
                if future.exception() is None:
                    future.result().process.stop()
            raise
    return nodes


@pytest.fixture(scope="module")
def local(
    frontends_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Node]]:
    """The repository served from disk; a SIGTERM drains for 30 s before the process stops."""
    tmp = tmp_path_factory.mktemp("frontends-local")
    # Triton's fixed batching delay: ``tight``'s lone requests wait in their batch window (the
    # adaptive delay would send them at once, no traffic having been seen).
    env = {"GATEWAY_SHUTDOWN_DELAY_S": "30", "GATEWAY_BATCHING_DELAY": "triton"}
    pair = _start_pair(str(frontends_repo), tmp, env)
    try:
        yield pair
    finally:
        for node in pair.values():
            node.process.stop()


@pytest.fixture(scope="module")
def edge(
    frontends_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Node]]:
    """Edge replicas of ``file://<repo>`` with empty caches: every model is pulled on first
    use."""
    tmp = tmp_path_factory.mktemp("frontends-edge")
    pair = _start_pair(
        f"file://{frontends_repo}", tmp, {}, "--cache-dir", str(tmp / "cache-{which}")
    )
    try:
        yield pair
    finally:
        for node in pair.values():
            node.process.stop()


# -- the cases --------------------------------------------------------------------------------


def test_ok(local: dict[str, Node]) -> None:
    outcomes = ask_all(local, Case())
    assert_alike(outcomes, 200)
    version, outputs = outcomes["grpc"].result
    assert version == "1"
    assert dict(outputs)["OUTPUT0"] == tuple(v + 1 for v in range(16))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        (Case(model="nope"), "Request for unknown model: 'nope' is not found"),
        (
            Case(version="7"),
            "Request for unknown model: 'simple' version 7 is not found",
        ),
    ],
    ids=["model", "version"],
)
def test_unknown(local: dict[str, Node], case: Case, message: str) -> None:
    assert_alike(ask_all(local, case), 404, message)


def test_unknown_model_with_a_malformed_body_is_404(local: dict[str, Node]) -> None:
    """The model is looked up before the body is decoded, whichever front end decodes it."""
    assert_alike(ask_all(local, Case(model="nope", malformed=True)), 404)


def test_bad_input(local: dict[str, Node]) -> None:
    short = Case(inputs=(("INPUT0", (1, 8), tuple(range(8))), ("INPUT1", (1, 16), (1,) * 16)))
    message = (
        "unexpected shape for input 'INPUT0' for model 'simple'. Expected [-1,16], got [1,8]."
        + BATCH_NOTE
    )
    assert_alike(ask_all(local, short), 400, message)
    assert_alike(ask_all(local, Case(malformed=True)), 400)  # each codec's own message
    assert_alike(ask_all(local, Case(parameters={"timeout": -1})), 400)


def test_deadline_expired(local: dict[str, Node]) -> None:
    outcomes = ask_all(local, Case(parameters={"timeout": 1}))  # 1 us
    assert_alike(outcomes, 504, "Request timeout expired")


def test_queue_full(local: dict[str, Node]) -> None:
    """One request in ``tight``'s batch window fills its queue (``max_queue_size: 1``: the
    batch being formed counts, as in Triton) on each gateway; every front end's request is
    then refused at once."""
    fillers: list[threading.Thread] = []
    answers: list[Outcome] = []
    for node in local.values():
        thread = threading.Thread(
            target=lambda n=node: answers.append(rest_json(n, Case(model="tight")))
        )
        thread.start()
        fillers.append(thread)
        # It forms the batch: waited for, not slept on (0.2 s was not always enough for a
        # loaded machine to get the request there).
        deadline = time.monotonic() + 30
        while _pending(node, "tight") < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _pending(node, "tight") == 1
    outcomes = ask_all(local, Case(model="tight"))
    # The fillers' window was open through every probe: none of them has been answered yet
    # (an event, not a wall-clock bound on how fast the probes went).
    assert not answers, "the fillers' window closed before the probes"
    assert_alike(outcomes, 503, "Exceeds maximum queue size")
    for thread in fillers:
        thread.join(30)
    assert [a.status for a in answers] == [200] * len(local)


def test_not_yet_pulled_model_on_an_edge(edge: dict[str, Node]) -> None:
    """Each front end asks first for a model of the origin the edge has not pulled: each pulls
    and serves it (gRPC answered NOT_FOUND here before ``submit``)."""
    outcomes = ask_all(edge, lambda number: Case(model=COLD[number]))
    for name, outcome in outcomes.items():
        assert outcome.status == 200, f"{name}: {outcome}"
    assert len({o.result for o in outcomes.values()}) == 1, outcomes


def _ready(node: Node) -> int:
    try:
        with urllib.request.urlopen(f"{node.process.url}/v2/health/ready", timeout=5) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_draining(local: dict[str, Node]) -> None:
    """After SIGTERM, within the shutdown delay, every front end refuses new work alike.
    Leaves the local gateways draining: the module's last test on them."""
    for node in local.values():
        node.process.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while any(_ready(node) != 503 for node in local.values()):
        assert time.monotonic() < deadline, "readiness did not turn false"
        time.sleep(0.05)
    assert_alike(ask_all(local, Case()), 503, "server is shutting down")
