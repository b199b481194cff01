"""Host tables: a ``[[hosts]]`` table of the config file, or the JSON body of ``POST
/admin/hosts`` at run time. The one validator (``check_host_table``), the typed specs it parses
into (``V2Spec``, ``TritonSpec``, ``DnsSpec``), and the errors of run-time host changes.

Pure: what a host *is* (``V2Host``, ``TritonHost``) is ``gateway.backends``' business
(``gateway.backends.hosts.build_host``); this module only says whether a table is well formed,
naming the field when it is not, and fills in the defaults from the settings.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from gateway.errors import HostConflict, UnknownHost  # re-exported: the admin API's errors
from gateway.settings import BATCHING_PLACES, Settings, SettingsError

__all__ = [
    "DEFAULT_PROTOCOL",
    "KEYS",
    "LOCAL",
    "PROTOCOLS",
    "STRATEGIES",
    "DnsSpec",
    "HostConflict",
    "HostSpec",
    "TritonSpec",
    "UnknownHost",
    "V2Spec",
    "check_host_table",
    "check_upstream_batching",
    "kind_of",
    "parse_host",
    "parse_hosts",
    "triton_only",
]

LOCAL = "local"  # the in-process runtime's target name; never a host's
_COMMON = frozenset(
    {"kind", "name", "url", "labels", "weight", "models", "max_inflight", "conn_limit"}
)
KEYS: dict[str, frozenset[str]] = {
    "v2": _COMMON | {"push", "dns", "port"},
    "triton": _COMMON | {"device", "strategy", "grpc_url", "protocol", "batching"},
}
MAX_NAME = 200
STRATEGIES = ("auto", "onnxruntime", "python")  # how a model gets onto a Triton host
PROTOCOLS = ("http", "grpc")  # how the gateway talks to a Triton host
# The protocol of a Triton host with a ``grpc_url`` and no ``protocol`` (without one it is
# ``http``). bench/results/triton.md: about the same throughput as HTTP (0.9-1.1x) from 64 B to
# 1 MiB tensors; gRPC keeps one HTTP/2 channel per host and carries the deadline.
DEFAULT_PROTOCOL = "grpc"


def _int(table: Mapping[str, Any], key: str, where: str, low: int, high: int) -> None:
    value = table.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SettingsError(f"{where}: '{key}' must be an integer in {low}..{high}, got {value!r}")


def _strings(table: Mapping[str, Any], key: str, where: str) -> None:
    value = table.get(key)
    if value is not None and not (
        isinstance(value, list) and all(isinstance(v, str) and v for v in value)
    ):
        raise SettingsError(f"{where}: '{key}' must be a list of non-empty strings")


def _url(url: Any, where: str) -> None:
    if not isinstance(url, str) or not url.strip():
        raise SettingsError(f"{where}: 'url' (or, for kind 'v2', 'dns' + 'port') is required")
    try:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        port = parts.port  # raises on a malformed port
    except ValueError as exc:
        raise SettingsError(f"{where}: 'url' {url[:200]!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(f"{where}: 'url' must be http(s)://host[:port], got {url[:200]!r}")
    if port == 0:
        raise SettingsError(f"{where}: 'url' has port 0")


def _name(name: Any, where: str, strict: bool) -> None:
    if not isinstance(name, str) or not name:
        raise SettingsError(f"{where}: 'name' must be a non-empty string")
    if name == LOCAL:
        raise SettingsError(f"{where}: 'name' must not be '{LOCAL}' (the local runtime)")
    if strict:
        if len(name) > MAX_NAME:
            raise SettingsError(f"{where}: 'name' is longer than {MAX_NAME} characters")
        if "@" in name:
            raise SettingsError(f"{where}: 'name' must not contain '@' (DNS-discovered hosts)")
        if not name.isprintable() or any(c.isspace() for c in name):
            raise SettingsError(f"{where}: 'name' must be printable, without spaces")


def check_host_table(table: object, where: str = "host", *, strict: bool = False) -> dict[str, Any]:
    """A checked copy of one host table, with ``kind`` and ``name`` filled in; raises
    ``SettingsError`` naming the field otherwise.

    ``strict`` (the admin API): ``kind`` is required, unknown keys are refused, names are
    printable, at most ``MAX_NAME`` characters and without ``@``. The config file keeps its
    defaults (``kind`` absent: ``triton``) and ignores keys it does not know.
    """
    if not isinstance(table, Mapping):
        raise SettingsError(f"{where}: a host table must be an object")
    out = dict(table)
    kind = out.get("kind")
    if kind is None and strict:
        raise SettingsError(f"{where}: 'kind' is required ('v2' or 'triton')")
    kind = out.setdefault("kind", "triton")
    if kind not in KEYS:
        raise SettingsError(f"{where}: 'kind' must be 'v2' or 'triton', got {kind!r}")
    if strict:
        unknown = sorted(str(k) for k in set(out) - KEYS[kind])
        if unknown:
            raise SettingsError(
                f"{where}: unknown key(s) for kind '{kind}': {', '.join(unknown)[:300]}"
            )
    dns = out.get("dns") if kind == "v2" else None
    if dns is not None:
        if not isinstance(dns, str) or not dns:
            raise SettingsError(f"{where}: 'dns' must be a host name")
        if strict and out.get("url") is not None:
            raise SettingsError(f"{where}: give 'url' or 'dns', not both")
        port = out.get("port")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise SettingsError(f"{where}: 'dns' needs an integer 'port' in 1..65535")
    else:
        _url(out.get("url"), where)
    out.setdefault("name", dns if dns is not None else out["url"])
    _name(out["name"], where, strict)
    _strings(out, "labels", where)
    _strings(out, "models", where)
    weight = out.get("weight")
    if weight is not None and (
        isinstance(weight, bool)
        or not isinstance(weight, int | float)
        or not math.isfinite(weight)
        or weight <= 0
    ):
        raise SettingsError(f"{where}: 'weight' must be a number > 0, got {weight!r}")
    _int(out, "max_inflight", where, 1, 1_000_000)
    _int(out, "conn_limit", where, 1, 100_000)
    if "push" in out and not isinstance(out["push"], bool):
        raise SettingsError(f"{where}: 'push' must be true or false")
    if kind == "triton":
        _triton(out, where)
    return out


def _triton(table: Mapping[str, Any], where: str) -> None:
    device = table.get("device", "cpu")
    if device not in ("cpu", "gpu"):
        raise SettingsError(f"{where}: 'device' must be 'cpu' or 'gpu', got {str(device)[:50]!r}")
    if table.get("strategy", "auto") not in STRATEGIES:
        raise SettingsError(f"{where}: 'strategy' must be one of {STRATEGIES}")
    if table.get("batching", "gateway") not in BATCHING_PLACES:
        raise SettingsError(f"{where}: 'batching' must be one of {BATCHING_PLACES}")
    grpc_url = table.get("grpc_url")
    if grpc_url is not None and not (
        isinstance(grpc_url, str) and ":" in grpc_url and "://" not in grpc_url
    ):
        raise SettingsError(f"{where}: 'grpc_url' must be host:port, got {str(grpc_url)[:200]!r}")
    protocol = table.get("protocol")
    if protocol is not None and protocol not in PROTOCOLS:
        raise SettingsError(f"{where}: 'protocol' must be one of {PROTOCOLS}")
    if protocol == "grpc" and grpc_url is None:
        raise SettingsError(f"{where}: protocol 'grpc' needs 'grpc_url' (host:port)")


# -- typed specs ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostSpec:
    """One checked host: what the router needs of every kind (placement, weight, cap)."""

    name: str
    url: str
    labels: frozenset[str] = frozenset()
    weight: float = 1.0
    models: frozenset[str] | None = None  # placement; None: every model
    max_inflight: int = 16
    conn_limit: int = 64

    @property
    def kind(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class V2Spec(HostSpec):
    """Another gateway node or any v2 server."""

    push: bool = False  # load missing models there through its repository API

    @property
    def kind(self) -> str:
        return "v2"


@dataclass(frozen=True, slots=True)
class TritonSpec(HostSpec):
    """A Triton server started with ``--model-control-mode explicit``."""

    grpc_url: str | None = None
    protocol: str = "http"
    device: str = "cpu"
    strategy: str = "auto"
    batching: str = "gateway"

    @property
    def kind(self) -> str:
        return "triton"


@dataclass(frozen=True, slots=True)
class DnsSpec:
    """A ``kind = "v2"`` entry found through DNS: one ``member`` host per resolved address."""

    name: str
    dns: str
    port: int
    template: V2Spec  # what every member shares (its url and name are per address)

    def address(self, ip: str) -> str:
        """What names the member for ``ip`` (``group@address``)."""
        return f"{ip}:{self.port}"

    def member(self, ip: str) -> V2Spec:
        address = self.address(ip)
        url = f"http://[{ip}]:{self.port}" if ":" in ip else f"http://{address}"
        return replace(self.template, name=f"{self.name}@{address}", url=url)


def parse_host(
    table: object, settings: Settings, where: str = "host", *, strict: bool = False
) -> HostSpec | DnsSpec:
    """One host table as a typed spec, defaults from ``settings``; ``SettingsError`` naming the
    field when it is not valid (``check_host_table``; ``strict`` for the admin API)."""
    out = check_host_table(table, where, strict=strict)
    models = out.get("models")
    common: dict[str, Any] = {
        "name": str(out["name"]),
        "url": str(out.get("url") or ""),
        "labels": frozenset(str(v) for v in out.get("labels", ())),
        "weight": float(out.get("weight", 1.0)),
        "models": frozenset(models) if models else None,
        "max_inflight": int(out.get("max_inflight", settings.host_max_inflight)),
        "conn_limit": int(out.get("conn_limit", 64)),
    }
    if out["kind"] == "triton":
        grpc_url = out.get("grpc_url")
        return TritonSpec(
            **common,
            grpc_url=grpc_url,
            protocol=out.get("protocol") or (DEFAULT_PROTOCOL if grpc_url else "http"),
            device=out.get("device", "cpu"),
            strategy=out.get("strategy", settings.triton_strategy),
            batching=out.get("batching", settings.triton_batching),
        )
    spec = V2Spec(**common, push=bool(out.get("push", False)))
    if out.get("dns") is not None:
        return DnsSpec(spec.name, str(out["dns"]), int(out["port"]), spec)
    return spec


def parse_hosts(settings: Settings) -> list[HostSpec | DnsSpec]:
    """Every ``[[hosts]]`` table of the settings, checked; names unique and not ``LOCAL``."""
    specs = [parse_host(t, settings, f"hosts[{i}]") for i, t in enumerate(settings.hosts)]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise SettingsError(f"host names must be unique, got {names}")
    return specs


def triton_only(specs: Iterable[HostSpec | DnsSpec]) -> bool:
    """Whether every host is a Triton host (and there is one): a deployment served through
    Triton alone, where ``local_execution`` does not apply."""
    specs = list(specs)
    return bool(specs) and all(isinstance(s, TritonSpec) for s in specs)


def kind_of(spec: HostSpec | DnsSpec) -> tuple[str, str, bool]:
    """(name, kind, batches upstream) of a spec, for ``check_upstream_batching``."""
    if isinstance(spec, TritonSpec):
        return spec.name, "triton", spec.batching == "triton"
    return spec.name, "v2", False


def check_upstream_batching(targets: Iterable[tuple[str, str, bool]], *, local: bool) -> None:
    """``batching = "triton"`` only where every target is a Triton host; ``targets`` are
    (name, kind, batches upstream).

    The gateway's batcher forms a batch (and waits for it) before the router picks a target. A
    backend whose targets all batch for themselves tells the batcher not to wait
    (``batches_upstream``); with any other target (local runtime, a v2 host) in the pool the
    gateway waits, and a Triton host that waited too would pay the queue delay twice.
    """
    targets = list(targets)
    upstream = [name for name, _, up in targets if up]
    if upstream and (local or any(kind != "triton" for _, kind, _ in targets)):
        raise SettingsError(
            f"Triton host {upstream[0]}: batching = 'triton' is for Triton-only deployments; "
            f"with the local runtime or a v2 host among the targets, the gateway batches before "
            f"choosing one (use 'gateway')"
        )
