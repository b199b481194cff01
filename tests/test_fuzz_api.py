"""Schema-based fuzzing of the HTTP API against the gateway's own OpenAPI document: no 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from gateway.server.openapi import OPENAPI
from tests import models
from tests.helpers import GatewayProcess, start_gateway

schema = schemathesis.openapi.from_dict(OPENAPI)


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    models.add_sub(tmp / "repo", "simple")
    models.strings(tmp / "repo")
    gw = start_gateway(tmp / "repo", tmp, env={"GATEWAY_ACCESS_LOG": "false"})
    try:
        yield gw
    finally:
        gw.stop()


@schema.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_server_errors(case: schemathesis.Case, fuzz_target: GatewayProcess) -> None:
    response = case.call(base_url=fuzz_target.url, timeout=10)
    assert response.status_code < 500, (case.method, case.path, response.text[:300])
    readiness = case.path.endswith("/ready")  # answers with a bare status, as Triton's does
    if response.status_code >= 400 and response.status_code != 405 and not readiness:
        assert "error" in response.json(), (case.method, case.path, response.status_code)


def test_openapi_document_is_served(fuzz_target: GatewayProcess) -> None:
    import json
    import urllib.request

    with urllib.request.urlopen(f"{fuzz_target.url}/openapi.json", timeout=5) as r:
        assert json.load(r)["paths"].keys() == OPENAPI["paths"].keys()
