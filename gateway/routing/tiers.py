"""Cold-start tiers: where a model version is on a host, and what starting it there costs.

- ``loaded``: ready there; no extra cost.
- ``cached``: its files are on the host (an edge's cache, or a plain repository directory that
  lists it) but it is not loaded: the measured load time.
- ``origin``: only at the origin (an edge that has not cached it, a push host without it, or
  unknown): ``bytes / bandwidth`` plus the load time.

A v2 host's tiers come from its ``POST /v2/repository/index`` (``parse_index``): ``READY`` is
``loaded``; an edge's ``reason`` says ``cached: N bytes``, ``not cached`` or ``fetching: x/y
bytes`` (origin, ``y - x`` bytes left); any other listed model is ``cached`` (its files are there).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["CACHED", "LOADED", "ORIGIN", "TIERS", "HostModel", "parse_index", "tier_for"]

LOADED, CACHED, ORIGIN = "loaded", "cached", "origin"
TIERS = (LOADED, CACHED, ORIGIN)  # cheapest first

_CACHED = re.compile(r"^cached:\s*(\d+)\s*bytes")
_FETCHING = re.compile(r"^fetching:\s*(\d+)\s*/\s*(\d+)\s*bytes")


@dataclass(frozen=True, slots=True)
class HostModel:
    """What a host's index says about one model (version)."""

    tier: str
    size_bytes: int | None = None  # cached size, or the total of a fetch in progress
    fetched_bytes: int | None = None  # bytes fetched so far (a fetch in progress)

    @property
    def left_bytes(self) -> int | None:
        """Bytes still to move before it can load; None when not known."""
        if self.fetched_bytes is not None and self.size_bytes is not None:
            return max(0, self.size_bytes - self.fetched_bytes)
        return None


def _entry(item: Mapping[str, object]) -> HostModel:
    if str(item.get("state", "")).upper() == "READY":
        return HostModel(LOADED)
    reason = str(item.get("reason") or "").strip()
    match = _CACHED.match(reason)
    if match:
        return HostModel(CACHED, size_bytes=int(match.group(1)))
    match = _FETCHING.match(reason)
    if match:
        done, total = int(match.group(1)), int(match.group(2))
        return HostModel(ORIGIN, size_bytes=total, fetched_bytes=min(done, total))
    if reason.startswith("not cached"):
        return HostModel(ORIGIN)
    return HostModel(CACHED)  # listed by a plain repository: the files are there


def parse_index(entries: object) -> dict[str, HostModel] | None:
    """A repository index answer (a JSON list) as ``"name/version"`` (or ``"name"`` for an
    entry without a version) -> ``HostModel``; None when it is not an index at all. When a
    name has several entries, the cheapest tier wins."""
    if not isinstance(entries, list):
        return None
    out: dict[str, HostModel] = {}
    for item in entries:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            continue
        version = item.get("version")
        key = item["name"] if version in (None, "") else f"{item['name']}/{version}"
        model = _entry(item)
        known = out.get(key)
        if known is None or TIERS.index(model.tier) < TIERS.index(known.tier):
            out[key] = model
    return out


def tier_for(index: Mapping[str, HostModel], model: str, version: int) -> HostModel:
    """The tier of ``model`` version ``version`` in a parsed index: the version's own entry, else
    the model's versionless one (not loaded there), else ``origin`` (not listed)."""
    found = index.get(f"{model}/{version}")
    if found is not None:
        return found
    found = index.get(model)
    return found if found is not None else HostModel(ORIGIN)
