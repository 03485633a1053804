"""Bounded LRU caches: image embeddings, and final masks (results).

Encoding is the expensive step (about 1.3 s for LiteMedSAM on 2 CPU cores, against ~60 ms per
decoded prompt), so an image is encoded once per (content, backbone weights, adapter version,
view) and every further prompt reuses it. Keys hash the pixels, not the path: the same study
opened twice hits, a re-saved image with different pixels misses. The predictor also keeps its final
masks (bit-packed) in a :class:`LRU`, so a label asked again skips the decoder too.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch


class LRU:
    """Thread-safe bounded LRU (``max_entries`` 0: stores nothing)."""

    def __init__(self, max_entries: int = 32):
        self.max_entries = max(0, int(max_entries))
        self._data: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            if key not in self._data:
                return None
            self._data.move_to_end(key)
            return self._data[key]

    def put(self, key: Hashable, value: Any) -> None:
        if not self.max_entries:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data


class EmbeddingCache(LRU):
    """LRU of tensors; ``hits``/``misses`` count lookups (tests and benchmarks read them)."""

    def __init__(self, max_entries: int = 32):
        super().__init__(max_entries)
        self.hits = 0
        self.misses = 0

    def get_or_compute(self, key: Hashable, compute: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """Return (embedding, was_cached). ``compute`` runs outside the lock."""
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key], True
            self.misses += 1
        value = compute()
        self.put(key, value)
        return value, False
