"""config.pbtxt parsing, validation, settings precedence, and what reaches the process."""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
from pathlib import Path

import pytest

from gateway.backends.onnxruntime import OnnxRuntimeFactory
from gateway.cli import tune_interpreter
from gateway.errors import ModelLoadError
from gateway.repository.config import parse_pbtxt
from gateway.repository.local import LocalRepository
from gateway.settings import Settings, SettingsError, load_settings
from tests import models


def test_full_config() -> None:
    config = parse_pbtxt(
        """
        name: "m"
        platform: "onnxruntime_onnx"
        max_batch_size: 16
        input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] reshape: { shape: [ 2, 2 ] } } ]
        output [ { name: "Y" data_type: TYPE_STRING dims: [ -1 ] } ]
        version_policy: { all: {} }
        instance_group [ { count: 2 kind: KIND_GPU } ]
        dynamic_batching {
          preferred_batch_size: [ 4, 8 ]
          max_queue_delay_microseconds: 500
          default_queue_policy { max_queue_size: 7 default_timeout_microseconds: 1000 }
        }
        default_model_filename: "net.onnx"
        """,
        "m/config.pbtxt",
        "m",
    )
    assert config.inputs[0].reshape == (2, 2) and config.outputs[0].datatype == "BYTES"
    assert config.version_policy.select([1, 3, 2]) == [1, 2, 3]
    assert (config.instance_count, config.instance_kind) == (2, "KIND_GPU")
    assert config.dynamic_batching is not None
    assert config.dynamic_batching.max_queue_size == 7
    assert config.default_model_filename == "net.onnx"
    assert config.to_dict()["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 7
    # What requests read per request is derived once per config, and again for a changed one.
    assert config.batched and config.inputs_by_name["X"] is config.input("X") is config.inputs[0]
    assert config.outputs_by_name == {"Y": config.outputs[0]}
    unbatched = config.with_changes(max_batch_size=0, outputs=())
    assert not unbatched.batched and unbatched.outputs_by_name == {}
    assert unbatched == dataclasses.replace(config, max_batch_size=0, outputs=())


def test_priority_levels_and_queue_policies() -> None:
    """Triton's priorities: levels, the default level, a policy per level, and the rest of the
    default queue policy; the JSON form says them back as Triton's does."""
    config = parse_pbtxt(
        """
        max_batch_size: 8
        dynamic_batching {
          priority_levels: 3
          default_priority_level: 2
          default_queue_policy { allow_timeout_override: true timeout_action: DELAY }
          priority_queue_policy { key: 3 value: { max_queue_size: 4 default_timeout_microseconds:
            5000 } }
          priority_queue_policy [ { key: 1 value: { timeout_action: REJECT } } ]
        }
        """,
        "m/config.pbtxt",
        "m",
    )
    db = config.dynamic_batching
    assert db is not None
    assert (db.priority_levels, db.default_priority_level) == (3, 2)
    assert (db.allow_timeout_override, db.timeout_action) == (True, "DELAY")
    assert [level for level, _ in db.priority_queue_policy] == [1, 3]
    low = db.priority_queue_policy[1][1]
    assert (low.max_queue_size, low.default_timeout_us, low.timeout_action) == (4, 5000, "REJECT")
    out = config.to_dict()["dynamic_batching"]
    assert out["priority_levels"] == 3 and out["default_priority_level"] == 2
    assert out["default_queue_policy"]["timeout_action"] == "DELAY"
    assert out["priority_queue_policy"]["3"] == {
        "timeout_action": "REJECT",
        "default_timeout_microseconds": 5000,
        "allow_timeout_override": False,
        "max_queue_size": 4,
    }
    from gateway.repository.config import parse_json

    assert parse_json(json.dumps(config.to_dict()), "load", "m").dynamic_batching == db


def test_priority_policies_reach_the_batcher() -> None:
    from gateway.batching import QueuePolicy
    from gateway.lifecycle import _policy

    class Local:
        instance_count = 1
        batches_upstream = False

    config = parse_pbtxt(
        """
        max_batch_size: 8
        dynamic_batching {
          priority_levels: 2 default_priority_level: 2
          default_queue_policy { default_timeout_microseconds: 2000 allow_timeout_override: 1 }
          priority_queue_policy { key: 2 value: { timeout_action: DELAY max_queue_size: 0 } }
        }
        """,
        "m/config.pbtxt",
        "m",
    )
    policy = _policy(config, Local(), Settings(max_queue_size=9))  # type: ignore[arg-type]
    assert (policy.priority_levels, policy.default_priority_level) == (2, 2)
    assert policy.level_policies() == {
        1: QueuePolicy(9, 0.002, True, False),
        2: QueuePolicy(9, None, False, True),
    }


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('name: "other"', "'name'"),
        ("max_batch_size: -1", "max_batch_size"),
        ('platform: "tensorflow_savedmodel"', "platform"),
        (
            "max_batch_size: 4 dynamic_batching { preferred_batch_size: [ 8 ] }",
            "preferred_batch_size",
        ),
        ('input [ { name: "X" data_type: TYPE_FP32 dims: [ 0 ] } ]', "dims"),
        ('input [ { name: "X" data_type: TYPE_FP32 } ]', "dims"),
        ("version_policy { specific { } }", "version_policy"),
        ('default_model_filename: "../x.onnx"', "default_model_filename"),
        ("instance_group [ { count: 100 } ]", "count"),
        ("max_batch_size: four", "max_batch_size"),
        ("dynamic_batching { priority_levels: 2 }", "default_priority_level"),
        (
            "dynamic_batching { priority_levels: 2 default_priority_level: 3 }",
            "default_priority_level",
        ),
        ("dynamic_batching { default_priority_level: 1 }", "default_priority_level"),
        (
            "dynamic_batching { priority_levels: 2 default_priority_level: 1 "
            "priority_queue_policy { key: 3 value: { max_queue_size: 1 } } }",
            "priority_queue_policy",
        ),
        (
            "dynamic_batching { default_queue_policy { timeout_action: LATER } }",
            "timeout_action",
        ),
    ],
)
def test_invalid_config_names_field(text: str, field: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        parse_pbtxt(text, "repo/m/config.pbtxt", "m")
    assert "repo/m/config.pbtxt" in info.value.message and field in info.value.message


def test_settings_precedence(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('port = 9000\nmodel_repo = "/file"\nmax_queue_size = 5\n')
    settings = load_settings(
        path, env={"GATEWAY_PORT": "9100", "GATEWAY_WARMUP": "false"}, overrides={"port": 9200}
    )
    assert (settings.port, settings.model_repo, settings.max_queue_size) == (9200, "/file", 5)
    assert settings.warmup is False
    with pytest.raises(SettingsError, match="unknown setting 'prot'"):
        path.write_text("prot = 1\n")
        load_settings(path, env={})
    with pytest.raises(SettingsError, match="port"):
        load_settings(None, env={"GATEWAY_PORT": "abc"})


def test_interpreter_tuning() -> None:
    with pytest.raises(SettingsError, match="gc_threshold"):
        load_settings(None, env={"GATEWAY_GC_THRESHOLD": "-1"})
    with pytest.raises(SettingsError, match="gil_switch_interval_us"):
        load_settings(None, env={"GATEWAY_GIL_SWITCH_INTERVAL_US": "-1"})
    before, interval = gc.get_threshold(), sys.getswitchinterval()
    try:
        tune_interpreter(12_345, 300)
        assert gc.get_threshold() == (12_345, *before[1:])
        assert sys.getswitchinterval() == pytest.approx(300e-6)
        tune_interpreter(0, 0)  # leaves both alone
        assert gc.get_threshold() == (12_345, *before[1:])
        assert sys.getswitchinterval() == pytest.approx(300e-6)
    finally:
        gc.set_threshold(*before)
        sys.setswitchinterval(interval)


async def test_model_session_parameters_reach_onnx_runtime(tmp_path: Path) -> None:
    """``session.*`` config parameters are ONNX Runtime session config entries: asking for the
    ORT file format on an ONNX file fails with ORT's own words, naming the model."""
    config = models.SIMPLE_CONFIG.replace('"simple"', '"ortformat"') + (
        'parameters { key: "session.load_model_format" value: { string_value: "ORT" } }\n'
    )
    models.add_sub(tmp_path, "ortformat", config=config)
    models.add_sub(tmp_path, "plain", config=models.SIMPLE_CONFIG.replace('"simple"', '"plain"'))
    factory = OnnxRuntimeFactory(Settings(warmup=False))
    repo = LocalRepository(tmp_path)
    with pytest.raises(ModelLoadError) as info:
        await factory.load(repo.source("ortformat"), 1)
    assert "ortformat" in info.value.message and "ORT model verification" in info.value.message
    backend = await factory.load(repo.source("plain"), 1)
    await backend.close()


async def test_triton_thread_parameters_reach_onnx_runtime(tmp_path: Path) -> None:
    """Triton's onnxruntime-backend ``intra_op_thread_count`` / ``inter_op_thread_count`` set the
    session's threads in-process too (over the gateway's own setting); a bad one fails the load
    with a message naming the model and the parameter."""
    config = models.SIMPLE_CONFIG.replace('"simple"', '"threads"') + (
        'parameters { key: "intra_op_thread_count" value: { string_value: "3" } }\n'
        'parameters { key: "inter_op_thread_count" value: { string_value: "1" } }\n'
    )
    models.add_sub(tmp_path, "threads", config=config)
    bad = models.SIMPLE_CONFIG.replace('"simple"', '"badthreads"') + (
        'parameters { key: "intra_op_thread_count" value: { string_value: "two" } }\n'
    )
    models.add_sub(tmp_path, "badthreads", config=bad)
    repo = LocalRepository(tmp_path)
    # Four cores: one instance's three threads and the event loop fit (they spin while a run
    # goes), two instances' do not (tests/test_ort_threads.py has the rule).
    factory = OnnxRuntimeFactory(Settings(warmup=False, intra_op_threads=2), cores=lambda: 4)
    options = factory.session_options(repo.source("threads").config)
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (3, 1)
    # One instance: its threads spin while a run goes and stop when it returns.
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    pair = dataclasses.replace(repo.source("threads").config, instance_count=2)
    options = factory.session_options(pair)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    backend = await factory.load(repo.source("threads"), 1)
    await backend.close()
    with pytest.raises(ModelLoadError) as info:
        await factory.load(repo.source("badthreads"), 1)
    message = info.value.message
    assert "badthreads" in message and "'intra_op_thread_count'" in message and "'two'" in message
