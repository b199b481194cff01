"""Traffic splits between the versions of a model: canaries, A/B tests, shadowing.

A request that names no version goes to a version drawn by the model's weights (``[[version_
weights]]`` in the settings, or ``PUT /admin/splits/{model}`` at run time). With a
``sticky_header``, the header's value, hashed, picks the version instead of a random draw: the same
user keeps the same version, on every replica (the hash is not Python's salted one), and raising a
canary's weight moves only the users it gains. With ``shadow``, a copy of each request also goes
to that version: its answer is thrown away, its latency and outcome recorded. A request that names
its version is never split nor shadowed.

The policy is here; the data plane asks ``route`` in ``submit`` and sends the shadow copy.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from gateway.errors import GatewayError
from gateway.settings import SettingsError

HeaderLookup = Callable[[str], str | None]  # a request header's value by lower-case name

SHADOW_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_KEYS = {"model", "weights", "sticky_header", "shadow", "shadow_fraction"}


@dataclass(frozen=True, slots=True)
class Split:
    """One model's split: ``versions`` with their cumulative weights (for one draw)."""

    model: str
    weights: tuple[tuple[int, float], ...]
    sticky_header: str = ""
    shadow: int = 0  # 0: no shadow
    shadow_fraction: float = 1.0
    _bounds: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        total = sum(w for _, w in self.weights)
        bounds, running = [], 0.0
        for _, weight in self.weights:
            running += weight / total
            bounds.append(running)
        bounds[-1] = 1.0
        object.__setattr__(self, "_bounds", tuple(bounds))

    def pick(self, point: float, loaded: Collection[int]) -> int | None:
        """The version at ``point`` (0..1) of the cumulative weights; a version that is not
        loaded passes its share to the next loaded one (None: none of them is loaded)."""
        index = bisect.bisect_right(self._bounds, point)
        count = len(self.weights)
        for step in range(count):
            version, weight = self.weights[(index + step) % count]
            if weight > 0 and version in loaded:
                return version
        return None

    def to_dict(self) -> dict[str, Any]:
        table: dict[str, Any] = {
            "model": self.model,
            "weights": {str(v): w for v, w in self.weights},
        }
        if self.sticky_header:
            table["sticky_header"] = self.sticky_header
        if self.shadow:
            table["shadow"] = self.shadow
            table["shadow_fraction"] = self.shadow_fraction
        return table


def parse_split(table: object, model: str | None = None) -> Split:
    """A split from its table (settings file or admin API body); ``SettingsError`` names what
    is wrong. ``model`` (the admin API's path) fills in or must match the table's."""
    if not isinstance(table, Mapping):
        raise SettingsError("a version split must be a table (JSON object)")
    unknown = set(table) - _KEYS
    if unknown:
        raise SettingsError(f"version split: unknown key(s) {sorted(unknown)}")
    name = table.get("model", model)
    if not isinstance(name, str) or not name or (model is not None and name != model):
        raise SettingsError(f"version split: 'model' must be the model's name, got {name!r}")
    raw = table.get("weights")
    if not isinstance(raw, Mapping) or not raw:
        raise SettingsError(f"version split of '{name}': 'weights' must map versions to weights")
    weights: list[tuple[int, float]] = []
    for version, weight in raw.items():
        if not str(version).isdigit() or int(version) < 1:
            raise SettingsError(f"version split of '{name}': {version!r} is not a version")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
            raise SettingsError(
                f"version split of '{name}': the weight of version {version} must be >= 0"
            )
        weights.append((int(version), float(weight)))
    if sum(w for _, w in weights) <= 0:
        raise SettingsError(f"version split of '{name}': the weights add up to 0")
    sticky = table.get("sticky_header", "")
    if not isinstance(sticky, str):
        raise SettingsError(f"version split of '{name}': 'sticky_header' must be a header name")
    shadow = table.get("shadow", 0)
    if isinstance(shadow, str) and shadow.isdigit():
        shadow = int(shadow)
    if isinstance(shadow, bool) or not isinstance(shadow, int) or shadow < 0:
        raise SettingsError(f"version split of '{name}': 'shadow' must be a version (or 0)")
    fraction = table.get("shadow_fraction", 1.0)
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, int | float)
        or not (0 <= fraction <= 1)
    ):
        raise SettingsError(f"version split of '{name}': 'shadow_fraction' must be in 0..1")
    return Split(
        name,
        tuple(sorted(weights)),
        sticky.strip().lower(),
        shadow,
        float(fraction),
    )


def _point(value: str) -> float:
    """A header value as a point in 0..1, the same in every process."""
    digest = hashlib.blake2b(value.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass(slots=True)
class _ShadowStats:
    outcomes: dict[str, int] = field(default_factory=dict)
    buckets: list[int] = field(default_factory=lambda: [0] * (len(SHADOW_BUCKETS_S) + 1))
    total_s: float = 0.0


class VersionSplits:
    """Every model's split, changed at run time; counts what it routed."""

    def __init__(
        self, tables: tuple[Mapping[str, Any], ...] = (), rng: random.Random | None = None
    ) -> None:
        self._rng = rng or random.Random()
        self._splits: dict[str, Split] = {}
        for table in tables:
            split = parse_split(table)
            if split.model in self._splits:
                raise SettingsError(f"two version splits for model '{split.model}'")
            self._splits[split.model] = split
        self.routed: dict[tuple[str, int], int] = {}
        self._shadows: dict[tuple[str, int], _ShadowStats] = {}

    def __bool__(self) -> bool:
        return bool(self._splits)

    # -- admin ------------------------------------------------------------------------------

    def table(self) -> dict[str, Any]:
        return {"splits": [self._splits[m].to_dict() for m in sorted(self._splits)]}

    def set(self, model: str, table: object) -> dict[str, Any]:
        """Replace ``model``'s split; requests admitted from now on follow it."""
        split = parse_split(table, model)
        self._splits[model] = split
        return split.to_dict()

    def remove(self, model: str) -> bool:
        return self._splits.pop(model, None) is not None

    # -- the request path -------------------------------------------------------------------

    def route(
        self, model: str, loaded: Collection[int], header: HeaderLookup | None
    ) -> tuple[str | None, int]:
        """(the version to serve, or None for the usual choice; the shadow version, or 0)."""
        split = self._splits.get(model)
        if split is None:
            return None, 0
        point = None
        if split.sticky_header and header is not None:
            value = header(split.sticky_header)
            if value is not None:
                point = _point(value)
        if point is None:
            point = self._rng.random()
        version = split.pick(point, loaded)
        if version is None:
            return None, 0
        key = (model, version)
        self.routed[key] = self.routed.get(key, 0) + 1
        shadow = split.shadow
        if (
            not shadow
            or shadow == version
            or shadow not in loaded
            or (split.shadow_fraction < 1 and self._rng.random() >= split.shadow_fraction)
        ):
            shadow = 0
        return str(version), shadow

    def shadow_done(
        self, model: str, version: int, elapsed_s: float, error: Exception | None
    ) -> None:
        """A shadow copy's end: its latency and outcome (its answer is dropped)."""
        stats = self._shadows.setdefault((model, version), _ShadowStats())
        if error is None:
            outcome = "success"
        elif isinstance(error, GatewayError):
            outcome = type(error).__name__
        else:
            outcome = "error"
        stats.outcomes[outcome] = stats.outcomes.get(outcome, 0) + 1
        stats.buckets[bisect.bisect_left(SHADOW_BUCKETS_S, elapsed_s)] += 1
        stats.total_s += elapsed_s

    def shadow_outcomes(self, model: str, version: int) -> dict[str, int]:
        stats = self._shadows.get((model, version))
        return dict(stats.outcomes) if stats is not None else {}

    def metric_families(self) -> Iterator[Any]:
        routed = CounterMetricFamily(
            "gateway_split_requests",
            "Requests sent to a version by its model's traffic split",
            labels=["model", "version"],
        )
        for (model, version), n in sorted(self.routed.items()):
            routed.add_metric([model, str(version)], n)
        shadows = CounterMetricFamily(
            "gateway_shadow_requests",
            "Shadow copies sent to a candidate version, by outcome (answers dropped)",
            labels=["model", "version", "outcome"],
        )
        latency = HistogramMetricFamily(
            "gateway_shadow_duration_seconds",
            "Latency of shadow copies at the candidate version",
            labels=["model", "version"],
        )
        for (model, version), stats in sorted(self._shadows.items()):
            for outcome, n in sorted(stats.outcomes.items()):
                shadows.add_metric([model, str(version), outcome], n)
            buckets, running = [], 0
            for bound, count in zip(SHADOW_BUCKETS_S, stats.buckets, strict=False):
                running += count
                buckets.append((repr(bound), float(running)))
            buckets.append(("+Inf", float(sum(stats.buckets))))
            latency.add_metric([model, str(version)], buckets, stats.total_s)
        yield from (routed, shadows, latency)


__all__ = ["HeaderLookup", "Split", "VersionSplits", "parse_split"]
