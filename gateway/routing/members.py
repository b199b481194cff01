"""A set of router targets kept in a list: O(1) add, remove and uniform random draws.

The router keeps several (every target, the targets where a model version is ready, the
aperture and where each version is ready in it); a decision draws from them without building
anything per batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.routing.router import TargetState

__all__ = ["Members"]


class Members:
    """Targets in a list, for O(1) add, remove (swap with the last) and random draws."""

    __slots__ = ("_at", "items")

    def __init__(self) -> None:
        self.items: list[TargetState] = []
        self._at: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, target: TargetState) -> bool:
        at = self._at.get(target.name)
        return at is not None and self.items[at] is target

    def add(self, target: TargetState) -> None:
        if target in self:
            return
        self.discard(target.name)
        self._at[target.name] = len(self.items)
        self.items.append(target)

    def discard(self, name: str) -> None:
        at = self._at.pop(name, None)
        if at is None:
            return
        last = self.items.pop()
        if at < len(self.items):
            self.items[at] = last
            self._at[last.name] = at
