"""One kind of cache for every cache of the layer (route plans, folded weights, stacked segment
weights, index tensors): keyed, built under a lock.

A model is called from many threads at once (a server, a DataLoader worker thread, a demo), so
no forward may hand another forward an entry built for a different key, nor see a half-updated
map: an entry is found by its full key (version counters and storage of the source tensors for
weights, the route and batch shape for plans), a miss is built while holding the cache's lock,
and readers never see a cleared map (an entry is replaced, never cleared first). Two threads that
miss the same key build it once.

A cache does not travel with ``copy.deepcopy`` / pickling of the module that holds it: the copy
starts empty (its tensors are new, so the old keys would never match anyway).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, Hashable, Iterable, Optional, Tuple

__all__ = ["Cache", "version_key"]


def version_key(tensors: Iterable[Any]) -> tuple:
    """The key part of a cache entry built from ``tensors``: each one's storage, version counter,
    dtype, device and shape, so an in-place update (an optimizer step), a replaced tensor or
    ``.data`` and a ``.to()`` all miss."""
    return tuple((t.data_ptr(), t._version, t.dtype, t.device, t.shape) for t in tensors)


class Cache:
    """A map ``slot -> (key, value)``, built under a lock.

    ``get(key, build)``: the value built for ``key``; ``build()`` runs (under the lock) on a miss.
    With ``slot`` given, the slot holds one entry and a different key replaces it (a fold per
    fusion, refolded when a weight changed); without, the key is its own slot. ``limit`` > 0
    bounds the number of slots (the oldest goes first)."""

    def __init__(self, limit: int = 0):
        self.limit = int(limit)
        self._lock = threading.RLock()
        self._d: Dict[Hashable, Tuple[Any, Any]] = {}

    def get(self, key: Hashable, build: Callable[[], Any], slot: Optional[Hashable] = None) -> Any:
        s = key if slot is None else slot
        entry = self._d.get(s)  # a dict read is atomic; an entry is immutable once stored
        if entry is not None and entry[0] == key:
            return entry[1]
        with self._lock:
            entry = self._d.get(s)
            if entry is None or entry[0] != key:
                entry = (key, build())
                if self.limit and s not in self._d and len(self._d) >= self.limit:
                    self._d.pop(next(iter(self._d)))
                self._d[s] = entry
        return entry[1]

    def peek(self, slot: Hashable) -> Optional[Any]:
        """The value in ``slot`` (whatever its key), or None."""
        entry = self._d.get(slot)
        return None if entry is None else entry[1]

    def clear(self) -> None:
        with self._lock:
            self._d = {}

    def __len__(self) -> int:
        return len(self._d)

    def __getstate__(self):
        return {"limit": self.limit}

    def __setstate__(self, state):
        self.__init__(state["limit"])

    def __repr__(self) -> str:
        return f"Cache({len(self._d)} entries{f', limit {self.limit}' if self.limit else ''})"
