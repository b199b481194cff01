"""Host tables: a ``[[hosts]]`` table of the config file, or the JSON body of ``POST
/admin/hosts`` at run time. Checking one, and the errors of run-time host changes.

Pure: what a host *is* (``V2Host``, ``TritonHost``) is ``gateway.backends``' business; this
module only says whether a table is well formed, naming the field when it is not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from gateway.settings import SettingsError

__all__ = ["KEYS", "LOCAL", "HostConflict", "UnknownHost", "check_host_table"]

LOCAL = "local"  # the in-process runtime's target name; never a host's
_COMMON = frozenset(
    {"kind", "name", "url", "labels", "weight", "models", "max_inflight", "conn_limit"}
)
KEYS: dict[str, frozenset[str]] = {
    "v2": _COMMON | {"push", "dns", "port"},
    # grpc_url / protocol: checked where Triton hosts are built (gateway.backends.triton)
    "triton": _COMMON | {"device", "strategy", "grpc_url", "protocol", "batching"},
}
MAX_NAME = 200


class UnknownHost(LookupError):
    """No host (or DNS group) of that name in the table."""


class HostConflict(RuntimeError):
    """The change is not possible in the current state (a DNS-discovered host, shutdown)."""


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
        if out.get("device", "cpu") not in ("cpu", "gpu"):
            raise SettingsError(f"{where}: 'device' must be 'cpu' or 'gpu'")
        if "strategy" in out and not isinstance(out["strategy"], str):
            raise SettingsError(f"{where}: 'strategy' must be a string")
    return out
