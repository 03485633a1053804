"""Bounded LRU cache of image embeddings.

Encoding is the expensive step (about 1.3 s for LiteMedSAM on 2 CPU cores, against ~60 ms per
decoded prompt), so an image is encoded once per (content, backbone weights, adapter version,
view) and every further prompt reuses it. Keys hash the pixels, not the path: the same study
opened twice hits, a re-saved image with different pixels misses.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch


class EmbeddingCache:
    """Thread-safe LRU of tensors; ``hits``/``misses`` count lookups (tests and benchmarks read them)."""

    def __init__(self, max_entries: int = 32):
        self.max_entries = max(0, int(max_entries))
        self._data: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
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
        if self.max_entries:
            with self._lock:
                self._data[key] = value
                self._data.move_to_end(key)
                while len(self._data) > self.max_entries:
                    self._data.popitem(last=False)
        return value, False

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data
