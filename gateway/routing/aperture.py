"""The aperture: the bounded, stable subset of the hosts that one front sends its traffic to
(Finagle's aperture balancer, with its deterministic subsetting).

Why: traffic spread over a thousand hosts gives each one a batch every few seconds, longer than
any keep-alive, so nearly every batch paid a TCP connect (``bench/results/fleet.md`` before the
aperture: 0.84 new connections per batch at 1000 hosts). Within an aperture sized to the load,
connections stay open and are reused.

- **Where**: every host has fixed positions on a ring [0, 1) (hashes of its name) and this
  front a coordinate (``host_aperture_coordinate``; random per process when not set). The
  aperture is the first ``size`` hosts that take traffic clockwise from the coordinate. Fronts
  given coordinates ``i / k`` (k of them) start at different points, so together they cover the
  fleet; a host joining or leaving moves at most one host in or out of a front's aperture.
- **Weight**: a host has one position per unit of its ``weight`` (``ring_points``: rounded, at
  least one, at most ``MAX_POINTS``), so a host of weight 3 is in about three times as many
  fronts' apertures as one of weight 1 and gets about three times their traffic over the fleet.
  Hosts of weight 1 have one position each, the hash of the name alone.
- **How many**: at least ``min_size`` (``host_aperture``). Grown at once when the batches in
  flight exceed ``load`` per aperture host, or when a decision found the aperture's hosts for its
  model full; shrunk by one host at most every ``shrink_after_s`` while below half of that.
  Latency counts through the load: slower hosts hold their batches longer, so the same traffic
  keeps more in flight (Little's law) and widens the aperture.
- **The local runtime** (``local_execution``) is always in it, on top of ``size``: it has no
  connection to keep warm.
- **Health**: a host down or ejected is not in it; the next one along the ring takes its place
  until it is well again (re-checked on every change of health the router sees, and at least
  every ``refresh_s``).

The router draws among the aperture's hosts where a model version is ready (``loaded``); hosts
outside stay candidates for a version ready only there, and for cold placement.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.routing.hosts import LOCAL
from gateway.routing.members import Members

if TYPE_CHECKING:
    from gateway.routing.router import TargetState

__all__ = ["MAX_POINTS", "Aperture", "ring_points", "ring_position"]

MAX_POINTS = 64  # positions of one host, however heavy: a ring walk stays short


def ring_position(name: str) -> float:
    """Where host ``name`` sits on the ring: the same on every front and every run."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def ring_points(name: str, weight: float) -> list[tuple[float, str]]:
    """The (position, name) entries of a host of ``weight``: one per unit of weight, the first
    at ``ring_position(name)`` (so weight 1 is one point, as without weights)."""
    count = max(1, min(MAX_POINTS, round(weight))) if math.isfinite(weight) else 1
    points = [(ring_position(name), name)]
    points += [(ring_position(f"{name}#{i}"), name) for i in range(1, count)]
    return points


class Aperture:
    """Which hosts this front talks to, and where each model version is ready among them."""

    def __init__(
        self,
        min_size: int,
        load: float,
        coordinate: float,
        *,
        shrink_after_s: float = 1.0,
        refresh_s: float = 1.0,
    ) -> None:
        if min_size < 0 or load <= 0 or not 0.0 <= coordinate < 1.0:
            raise ValueError("aperture: min_size >= 0, load > 0, coordinate in [0, 1)")
        self.min_size = min_size  # 0: no aperture, every host
        self.load = load
        self.coordinate = coordinate
        self.shrink_after_s = shrink_after_s
        self.refresh_s = refresh_s
        self.size = min_size
        self.members = Members()
        self.loaded: dict[str, Members] = {}  # model key -> members where it is ready
        self.resizes = 0
        self._ring: list[tuple[float, str]] = []  # (position, name), sorted
        self._points: dict[str, list[tuple[float, str]]] = {}  # name -> its entries
        self._targets: dict[str, TargetState] = {}
        self._resized_s = float("-inf")
        # Checked by the router on every decision, so that most cost a comparison, not a call:
        # when to recompute the members (-inf: now), and the in-flight counts that resize.
        self.due_s = float("-inf")
        self.grow_above = 0.0
        self.shrink_below = 0.0
        self._bounds()

    def active(self, hosts: int) -> bool:
        """Whether there is an aperture at all: on, and more hosts than its least size."""
        return 0 < self.min_size < hosts

    # -- membership of the ring ---------------------------------------------------------------

    def add(self, target: TargetState) -> None:
        self.discard(target.name)
        points = self._points[target.name] = ring_points(target.name, target.weight)
        for entry in points:
            bisect.insort(self._ring, entry)
        self._targets[target.name] = target
        self.due_s = float("-inf")

    def discard(self, name: str) -> None:
        """Off the ring and out of the aperture at once (never drawn again)."""
        target = self._targets.pop(name, None)
        if target is None:
            return
        for entry in self._points.pop(name, ()):
            at = bisect.bisect_left(self._ring, entry)
            if at < len(self._ring) and self._ring[at] == entry:
                del self._ring[at]
        self._leave(target)
        self.due_s = float("-inf")

    def changed(self) -> None:
        """A host's health changed: recompute the members before the next draw."""
        self.due_s = float("-inf")

    def note_ready(self, target: TargetState, key: str, ready: bool) -> None:
        """Keep ``loaded`` in step with the router's readiness of a member."""
        if target not in self.members:
            return
        if ready:
            self.loaded.setdefault(key, Members()).add(target)
        else:
            self._unload(target.name, key)

    # -- which hosts ----------------------------------------------------------------------------

    def refresh(self, now: float, available: Callable[[str], bool]) -> None:
        """Recompute the members when something changed or ``refresh_s`` passed: the first
        ``size`` available hosts clockwise from the coordinate. Costs the points walked past
        (the aperture's, more positions of hosts already in, and those skipped as
        unavailable), not the ring."""
        if now < self.due_s:
            return
        self.due_s = now + self.refresh_s
        ring = self._ring
        n = len(ring)
        want = min(self.size, len(self._targets))
        chosen: dict[str, TargetState] = {}
        local = self._targets.get(LOCAL)
        if local is not None and available(LOCAL):
            chosen[LOCAL] = local  # in-process: no connection to keep, always in (and extra)
            want += 1
        start = bisect.bisect_left(ring, (self.coordinate, ""))
        for step in range(n):
            if len(chosen) >= want:
                break
            name = ring[(start + step) % n][1]
            if name not in chosen and available(name):
                chosen[name] = self._targets[name]
        for target in [t for t in self.members.items if t.name not in chosen]:
            self._leave(target)
        for target in chosen.values():
            if target not in self.members:
                self.members.add(target)
                for key, ready in target.ready.items():
                    if ready:
                        self.loaded.setdefault(key, Members()).add(target)

    def resize(self, in_flight: int, hosts: int, now: float, pressure: bool) -> None:
        """Size for the load: ``in_flight`` batches over all hosts now; ``pressure``: a
        decision found the aperture's hosts for its model full. (The router calls it only
        when ``in_flight`` is past ``grow_above`` or ``shrink_below``, or under pressure.)"""
        high = self.grow_above
        if (in_flight > high or pressure) and self.size < hosts:
            grown = max(self.size + 1, math.ceil(in_flight / self.load))
            self._set_size(min(hosts, grown), now)
        elif (
            self.size > self.min_size
            and in_flight < self.shrink_below
            and now - self._resized_s >= self.shrink_after_s
        ):
            self._set_size(max(self.min_size, self.size - 1), now)

    def _set_size(self, size: int, now: float) -> None:
        self.size = size
        self._resized_s = now
        self.resizes += 1
        self.due_s = float("-inf")
        self._bounds()

    def _bounds(self) -> None:
        self.grow_above = self.load * self.size
        self.shrink_below = self.grow_above / 2 if self.size > self.min_size else float("-inf")

    def _leave(self, target: TargetState) -> None:
        if target not in self.members:
            return
        self.members.discard(target.name)
        for key, ready in target.ready.items():
            if ready:
                self._unload(target.name, key)

    def _unload(self, name: str, key: str) -> None:
        members = self.loaded.get(key)
        if members is not None:
            members.discard(name)
            if not members:
                del self.loaded[key]

    def to_dict(self, hosts: int) -> dict[str, float | int | bool]:
        return {
            "active": self.active(hosts),
            "size": self.size,
            "min_size": self.min_size,
            "members": len(self.members),
            "load": self.load,
            "coordinate": round(self.coordinate, 6),
            "resizes": self.resizes,
        }
