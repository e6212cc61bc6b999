"""The memo of prepared calls: what repeated calls build once (validated specs, launch plans).

A model repeats a few call shapes per step, and preparing a call (validation, tracing, tuning
lookup, launch geometry) costs more than a small attention on a GPU. Keys hold what a call's
meaning depends on besides array values; a call that can't be keyed (option arrays, unhashable
arguments) has key ``None`` and is prepared every time.
"""

from __future__ import annotations

from typing import Callable, Dict, Hashable, Optional, TypeVar

Prepared = TypeVar("Prepared")


class CallMemo:
    """Prepared calls by key, at most ``size`` of them (emptied when full: the working set of a
    model is far smaller)."""

    def __init__(self, size: int):
        self.size = size
        self.entries: Dict[Hashable, object] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def clear(self) -> None:
        self.entries.clear()

    def get(self, key: Optional[Hashable], prepare: Callable[[], Prepared]) -> Prepared:
        """The entry of ``key``, made by ``prepare()`` the first time; ``prepare()`` alone for ``None``."""
        if key is None:
            return prepare()
        prepared = self.entries.get(key)
        if prepared is None:
            prepared = prepare()
            if len(self.entries) >= self.size:
                self.entries.clear()
            self.entries[key] = prepared
        return prepared
