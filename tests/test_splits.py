"""Traffic splits between versions: weights (within 2 % over 10k requests), sticky users,
shadow copies (latency and errors recorded, answers dropped), the admin API, and a rollback
under load without a failed request. Real ONNX Runtime sessions; the rollback through a real
gateway process."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from onnx import TensorProto, helper, numpy_helper

from gateway.backends.onnxruntime import OnnxRuntimeFactory
from gateway.dataplane import DataPlane
from gateway.errors import DeadlineExceeded
from gateway.protocol.types import InferRequest
from gateway.repository.local import LocalRepository
from gateway.settings import Settings, SettingsError
from gateway.splits import SHADOW_BUCKETS_S, VersionSplits, parse_split
from tests import models
from tests.helpers import get, start_gateway

AB_CONFIG = models.SIMPLE_CONFIG.replace('"simple"', '"ab"') + "version_policy { all { } }\n"


def _broken_v3(repo: Path) -> None:
    """Version 3 of ``ab`` loads but fails every run (a reshape its data cannot take: rows of
    17, which no batch of up to 8 rows of 16 fills; rows of 3 took batches of 3 and 6, so the
    shadow copies sometimes succeeded when they were batched together): a real fault for the
    shadow to record."""
    dims = ["batch", 16]
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["sum"]),
            helper.make_node("Reshape", ["sum", "odd"], ["odd_rows"]),
            helper.make_node("Reshape", ["odd_rows", "back"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        "ab",
        [helper.make_tensor_value_info(n, TensorProto.INT32, dims) for n in ("INPUT0", "INPUT1")],
        [helper.make_tensor_value_info(n, TensorProto.INT32, dims) for n in ("OUTPUT0", "OUTPUT1")],
        [
            numpy_helper.from_array(np.array([-1, 17], dtype=np.int64), "odd"),
            numpy_helper.from_array(np.array([-1, 16], dtype=np.int64), "back"),
        ],
    )
    models._save(helper.make_model(graph, opset_imports=models.OPSET), repo, "ab", 3, None)


@pytest.fixture(scope="module")
def ab_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ab``: versions 1 and 2 (OUTPUT0 offset by the version, to tell them apart), 3 broken."""
    root = tmp_path_factory.mktemp("ab_repo")
    models.add_sub(root, "ab", version=1, config=AB_CONFIG, offset=1)
    models.add_sub(root, "ab", version=2, config=AB_CONFIG, offset=2)
    _broken_v3(root)
    return root


def _request() -> InferRequest:
    ones = np.ones((1, 16), dtype=np.int32)
    return InferRequest(inputs={"INPUT0": ones, "INPUT1": ones})


async def _dataplane(repo: Path, splits: VersionSplits | None = None) -> DataPlane:
    settings = Settings(model_repo=str(repo), warmup=False, max_queue_size=4096)
    dataplane = DataPlane(
        settings, LocalRepository(repo), OnnxRuntimeFactory(settings), splits=splits
    )
    await dataplane.start()
    return dataplane


# -- the policy ------------------------------------------------------------------------------


def test_split_tables_are_checked() -> None:
    for bad in (
        {"model": "m"},
        {"model": "m", "weights": {}},
        {"model": "m", "weights": {"x": 1}},
        {"model": "m", "weights": {"1": -1}},
        {"model": "m", "weights": {"1": 0}},
        {"model": "m", "weights": {"1": 1}, "shadow": -2},
        {"model": "m", "weights": {"1": 1}, "shadow_fraction": 2},
        {"model": "m", "weights": {"1": 1}, "colour": "red"},
        {"weights": {"1": 1}},
        "not a table",
    ):
        with pytest.raises(SettingsError):
            parse_split(bad)
    with pytest.raises(SettingsError, match="model"):
        parse_split({"model": "a", "weights": {"1": 1}}, model="b")
    with pytest.raises(SettingsError, match="two version splits"):
        VersionSplits(({"model": "m", "weights": {"1": 1}},) * 2)
    split = parse_split({"weights": {"2": 1, "1": 3}, "sticky_header": "X-User"}, model="m")
    assert split.to_dict() == {
        "model": "m", "weights": {"1": 3.0, "2": 1.0}, "sticky_header": "x-user",
    }  # fmt: skip


def test_sticky_users_keep_their_version_and_a_raise_moves_only_gained_users() -> None:
    splits = VersionSplits(({"model": "m", "weights": {"1": 90, "2": 10}, "sticky_header": "u"},))
    users = [f"user-{i}" for i in range(2000)]

    def assignment() -> dict[str, str | None]:
        return {u: splits.route("m", {1, 2}, {"u": u}.get)[0] for u in users}

    first = assignment()
    assert first == assignment()  # the same user, the same version, every time
    share = sum(v == "2" for v in first.values()) / len(users)
    assert 0.07 < share < 0.13
    splits.set("m", {"weights": {"1": 80, "2": 20}, "sticky_header": "u"})
    second = assignment()
    assert all(second[u] == "2" for u in users if first[u] == "2")  # canary users stay
    # no header: a random draw, never an error
    assert splits.route("m", {1, 2}, None)[0] in ("1", "2")


def test_a_version_not_loaded_passes_its_share_on() -> None:
    splits = VersionSplits(({"model": "m", "weights": {"1": 50, "2": 50}},))
    assert {splits.route("m", {1}, None)[0] for _ in range(50)} == {"1"}
    assert splits.route("m", set(), None) == (None, 0)  # none loaded: the usual choice
    assert splits.route("other", {1}, None) == (None, 0)


class Draws(random.Random):
    """The splits' randomness, injected: it returns the given draws in turn."""

    def __init__(self, *draws: float) -> None:
        super().__init__()
        self.draws = list(draws)

    def random(self) -> float:
        return self.draws.pop(0)


def test_split_tables_name_what_is_wrong() -> None:
    """Each refusal says what is wrong in its own words (they reach the admin API's 400 and
    a refused start), and only what is wrong is refused."""
    ok = {"model": "m", "weights": {"1": 1}}
    for bad, message in (
        ("not a table", "a version split must be a table (JSON object)"),
        ({**ok, "colour": "red"}, "version split: unknown key(s) ['colour']"),
        ({**ok, "model": 5}, "version split: 'model' must be the model's name, got 5"),
        ({**ok, "model": ""}, "version split: 'model' must be the model's name, got ''"),
        ({"model": "m"}, "version split of 'm': 'weights' must map versions to weights"),
        ({**ok, "weights": {"0": 1}}, "version split of 'm': '0' is not a version"),
        (
            {**ok, "weights": {"1": 2, "2": -1}},
            "version split of 'm': the weight of version 2 must be >= 0",
        ),
        ({**ok, "weights": {"1": True}}, "the weight of version 1 must be >= 0"),
        ({**ok, "weights": {"1": "x"}}, "the weight of version 1 must be >= 0"),
        ({**ok, "weights": {"1": 0, "2": 0}}, "version split of 'm': the weights add up to 0"),
        ({**ok, "sticky_header": 1}, "version split of 'm': 'sticky_header' must be a header name"),
        ({**ok, "shadow": True}, "version split of 'm': 'shadow' must be a version (or 0)"),
        ({**ok, "shadow": "x"}, "version split of 'm': 'shadow' must be a version (or 0)"),
        (
            {**ok, "shadow_fraction": True},
            "version split of 'm': 'shadow_fraction' must be in 0..1",
        ),
        ({**ok, "shadow_fraction": "x"}, "'shadow_fraction' must be in 0..1"),
    ):
        with pytest.raises(SettingsError) as caught:
            parse_split(bad)
        assert str(caught.value).endswith(message), (bad, str(caught.value))
    # A weight of 0 (a version switched off) and fractional weights are fine; so are a shadow
    # given as a string of digits (a TOML key) and any fraction in 0..1.
    split = parse_split(
        {**ok, "weights": {"1": 0.5, "2": 0, "3": 0.25}, "shadow": "2", "shadow_fraction": 0}
    )
    assert split.weights == ((1, 0.5), (2, 0.0), (3, 0.25))
    assert split.shadow == 2 and split.shadow_fraction == 0.0
    assert parse_split({**ok, "shadow": 2, "shadow_fraction": 0.5}).to_dict() == {
        "model": "m", "weights": {"1": 1.0}, "shadow": 2, "shadow_fraction": 0.5,
    }  # fmt: skip
    assert parse_split(ok).to_dict() == {"model": "m", "weights": {"1": 1.0}}  # nothing unset


def test_each_version_gets_its_own_share_of_the_draws() -> None:
    split = parse_split({"model": "m", "weights": {"1": 1, "2": 1, "3": 2}})
    loaded = {1, 2, 3}
    assert [split.pick(p, loaded) for p in (0.0, 0.24, 0.25, 0.49, 0.5, 0.99)] == [1, 1, 2, 2, 3, 3]
    # Version 1's share goes on to the next version with a weight: 2 has none, so 3.
    split = parse_split({"model": "m", "weights": {"1": 1, "2": 0, "3": 1}})
    assert split.pick(0.1, {2, 3}) == 3
    assert split.pick(0.1, {2}) is None  # a version without weight never serves


def test_sticky_header_values_that_are_not_valid_text_still_pick_a_version() -> None:
    """A header decoded with surrogate escapes (undecodable bytes) hashes like any value."""
    splits = VersionSplits(({"model": "m", "weights": {"1": 1, "2": 1}, "sticky_header": "u"},))
    version = splits.route("m", {1, 2}, {"u": "caf\udce9"}.get)[0]
    assert version in ("1", "2")
    assert splits.route("m", {1, 2}, {"u": "caf\udce9"}.get)[0] == version


def test_a_shadow_copy_goes_only_to_another_loaded_version_at_its_fraction() -> None:
    table = {"model": "m", "weights": {"1": 1, "2": 1}, "shadow": 2}
    splits = VersionSplits((table,), rng=Draws(0.1, 0.9))
    assert splits.route("m", {1, 2}, None) == ("1", 2)  # every request, at fraction 1
    assert splits.route("m", {1, 2}, None) == ("2", 0)  # never to the version that serves
    splits = VersionSplits(({**table, "weights": {"1": 1}, "shadow": 3},), rng=Draws(0.1))
    assert splits.route("m", {1, 2}, None) == ("1", 0)  # the shadow version is not loaded
    half = {**table, "weights": {"1": 1}, "shadow_fraction": 0.5}
    splits = VersionSplits((half,), rng=Draws(0.1, 0.49, 0.1, 0.5))
    assert splits.route("m", {1, 2}, None) == ("1", 2)  # a draw below the fraction
    assert splits.route("m", {1, 2}, None) == ("1", 0)  # and at it, not
    never = {**table, "weights": {"1": 1}, "shadow_fraction": 0}
    splits = VersionSplits((never,), rng=Draws(0.1, 0.0))
    assert splits.route("m", {1, 2}, None) == ("1", 0)  # fraction 0: not even a draw of 0


def test_admin_table_and_removal() -> None:
    splits = VersionSplits(({"model": "b", "weights": {"1": 1}},))
    splits.set("a", {"weights": {"2": 1}})
    assert splits.table() == {
        "splits": [{"model": "a", "weights": {"2": 1.0}}, {"model": "b", "weights": {"1": 1.0}}]
    }
    assert splits.remove("a") is True
    assert splits.remove("a") is False  # already gone
    assert splits.route("a", {1, 2}, None) == (None, 0) and splits
    assert splits.remove("b") is True and not splits


def test_shadow_outcomes_and_latency_histogram() -> None:
    splits = VersionSplits()
    assert splits.shadow_outcomes("m", 2) == {}  # nothing sent yet
    splits.shadow_done("m", 2, 0.002, None)
    splits.shadow_done("m", 2, 0.3, DeadlineExceeded("late"))
    splits.shadow_done("m", 2, 9.0, ValueError("a bug"))
    assert splits.shadow_outcomes("m", 2) == {"success": 1, "DeadlineExceeded": 1, "error": 1}
    families = {f.name: f for f in splits.metric_families()}
    assert {name: f.documentation for name, f in families.items()} == {
        "gateway_split_requests": "Requests sent to a version by its model's traffic split",
        "gateway_shadow_requests": (
            "Shadow copies sent to a candidate version, by outcome (answers dropped)"
        ),
        "gateway_shadow_duration_seconds": "Latency of shadow copies at the candidate version",
    }
    samples = families["gateway_shadow_duration_seconds"].samples
    buckets = {s.labels["le"]: s.value for s in samples if s.name.endswith("_bucket")}
    assert buckets["0.001"] == 0 and buckets["0.0025"] == 1 and buckets["0.25"] == 1
    assert buckets["0.5"] == 2 and buckets["2.5"] == 2 and buckets["+Inf"] == 3
    assert list(buckets) == [*(repr(b) for b in SHADOW_BUCKETS_S), "+Inf"]
    (total,) = [s.value for s in samples if s.name.endswith("_sum")]
    assert total == pytest.approx(9.302)


# -- through the data plane ------------------------------------------------------------------


async def test_split_within_two_percent_over_10k_requests(ab_repo: Path) -> None:
    splits = VersionSplits(({"model": "ab", "weights": {"1": 90, "2": 10}},))
    dataplane = await _dataplane(ab_repo, splits)
    try:
        served = {"1": 0, "2": 0}
        for _ in range(10):  # 10 x 1000 requests in flight at once
            pendings = [dataplane.submit("ab", None, _request()) for _ in range(1000)]
            for pending in pendings:
                response = await pending
                served[response.model_version] += 1
                assert int(response.outputs["OUTPUT0"][0, 0]) == 2 + int(response.model_version)
        assert sum(served.values()) == 10_000
        assert abs(served["2"] / 10_000 - 0.10) < 0.02
        assert splits.routed == {("ab", 1): served["1"], ("ab", 2): served["2"]}
        stats = {s["version"]: s for s in dataplane.model_stats("ab")["model_stats"]}
        assert stats["2"]["inference_stats"]["success"]["count"] == served["2"]  # per version
        text = dataplane.metrics.render().decode()
        assert f'gateway_split_requests_total{{model="ab",version="2"}} {served["2"]}.0' in text
        # a request that names its version is not split
        named = [await dataplane.submit("ab", "1", _request()) for _ in range(50)]
        assert {r.model_version for r in named} == {"1"}
    finally:
        await dataplane.stop()


async def test_shadow_gets_a_copy_answer_dropped_errors_recorded(ab_repo: Path) -> None:
    splits = VersionSplits(({"model": "ab", "weights": {"1": 1}, "shadow": 2},))
    dataplane = await _dataplane(ab_repo, splits)
    try:
        for _ in range(20):
            response = await dataplane.submit("ab", None, _request())
            assert response.model_version == "1"  # the shadow's answer is never the answer
        for _ in range(100):
            if sum(splits.shadow_outcomes("ab", 2).values()) == 20:
                break
            await asyncio.sleep(0.01)
        assert splits.shadow_outcomes("ab", 2) == {"success": 20}
        stats = {s["version"]: s for s in dataplane.model_stats("ab")["model_stats"]}
        assert stats["2"]["inference_stats"]["success"]["count"] == 20  # it really ran
        # a broken candidate: its failures are counted, the users' requests still succeed
        splits.set("ab", {"weights": {"1": 1}, "shadow": 3})
        for _ in range(10):
            assert (await dataplane.submit("ab", None, _request())).model_version == "1"
        for _ in range(100):
            if sum(splits.shadow_outcomes("ab", 3).values()) == 10:
                break
            await asyncio.sleep(0.01)
        outcomes = splits.shadow_outcomes("ab", 3)
        assert sum(outcomes.values()) == 10 and "success" not in outcomes
        text = dataplane.metrics.render().decode()
        assert (
            'gateway_shadow_requests_total{model="ab",outcome="success",version="2"} 20.0' in text
        )
        assert 'gateway_shadow_duration_seconds_count{model="ab",version="3"} 10.0' in text
    finally:
        await dataplane.stop()


# -- admin API and rollback under load, through a real gateway ----------------------------------


def _admin(url: str, method: str, path: str, body: object | None = None) -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.loads(reply.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_rollback_under_load_fails_no_request(ab_repo: Path, tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        'warmup = false\n[[version_weights]]\nmodel = "ab"\nweights = { "1" = 50, "2" = 50 }\n'
        'sticky_header = "x-user"\n'
    )
    gw = start_gateway(ab_repo, tmp_path, "--config", str(config))
    try:
        status, table = _admin(gw.url, "GET", "/admin/splits")
        assert status == 200 and table["splits"][0]["weights"] == {"1": 50.0, "2": 50.0}  # type: ignore[index]
        assert _admin(gw.url, "PUT", "/admin/splits/ab", {"weights": {"7": -1}})[0] == 400
        assert _admin(gw.url, "DELETE", "/admin/splits/nope")[0] == 404
        failures: list[str] = []
        versions: list[tuple[float, str]] = []
        stop = threading.Event()
        inputs = []
        for name in ("INPUT0", "INPUT1"):
            tensor = httpclient.InferInput(name, [1, 16], "INT32")
            tensor.set_data_from_numpy(np.ones((1, 16), np.int32), binary_data=True)
            inputs.append(tensor)

        def load(user: int) -> None:
            client = httpclient.InferenceServerClient(gw.address)
            count = 0
            while not stop.is_set() and count < 2000:
                count += 1
                try:
                    result = client.infer("ab", inputs, headers={"x-user": f"u{user}-{count}"})
                    versions.append((time.monotonic(), result.get_response()["model_version"]))
                except Exception as exc:
                    failures.append(str(exc))

        threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        status, _ = _admin(gw.url, "PUT", "/admin/splits/ab", {"weights": {"1": 100, "2": 0}})
        rolled_back = time.monotonic()
        assert status == 200
        time.sleep(1.0)
        stop.set()
        for thread in threads:
            thread.join(30)
        assert not failures, failures[:3]
        before = {v for t, v in versions if t < rolled_back - 0.2}
        after = [v for t, v in versions if t > rolled_back + 0.2]
        assert before == {"1", "2"} and after and set(after) == {"1"}
        metrics = get(f"{gw.url}/metrics")[1].decode()
        assert 'gateway_split_requests_total{model="ab",version="2"}' in metrics
    finally:
        gw.stop()


def test_sticky_header_over_grpc_and_rest(ab_repo: Path, tmp_path: Path) -> None:
    """The sticky header is read the same from gRPC metadata and HTTP headers: one user, one
    version, whichever front end."""
    import tritonclient.grpc as grpcclient

    from tests.helpers import free_port

    config = tmp_path / "gateway.toml"
    config.write_text(
        'warmup = false\n[[version_weights]]\nmodel = "ab"\nweights = { "1" = 50, "2" = 50 }\n'
        'sticky_header = "x-user"\n'
    )
    grpc_port = free_port()
    gw = start_gateway(ab_repo, tmp_path, "--config", str(config), "--grpc-port", str(grpc_port))
    try:
        rest = httpclient.InferenceServerClient(gw.address)
        rpc = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        ones = np.ones((1, 16), np.int32)
        rest_inputs, rpc_inputs = [], []
        for name in ("INPUT0", "INPUT1"):
            tensor = httpclient.InferInput(name, [1, 16], "INT32")
            tensor.set_data_from_numpy(ones, binary_data=True)
            rest_inputs.append(tensor)
            rpc_tensor = grpcclient.InferInput(name, [1, 16], "INT32")
            rpc_tensor.set_data_from_numpy(ones)
            rpc_inputs.append(rpc_tensor)
        seen: dict[str, set[str]] = {}
        for user in range(12):
            name = f"user-{user}"
            for _ in range(3):  # (the HTTP client adds its own headers to the dict it gets)
                by_rest = rest.infer("ab", rest_inputs, headers={"x-user": name}).get_response()
                by_rpc = rpc.infer("ab", rpc_inputs, headers={"x-user": name}).get_response()
                seen.setdefault(name, set()).update(
                    {by_rest["model_version"], by_rpc.model_version}
                )
        assert all(len(versions) == 1 for versions in seen.values()), seen
        assert set().union(*seen.values()) == {"1", "2"}  # 12 users land on both versions
        rpc.close()
    finally:
        gw.stop()


def test_a_bad_table_stops_the_start_with_its_reason(tmp_path: Path) -> None:
    from gateway.settings import load_settings

    config = tmp_path / "gateway.toml"
    config.write_text('[[version_weights]]\nmodel = "ab"\nweights = { "one" = 1 }\n')
    with pytest.raises(SettingsError, match="'one' is not a version"):
        load_settings(config, env={})
