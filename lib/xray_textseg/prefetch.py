"""Background warm-up of the film a clinician is about to open.

When active learning proposes the next image ("Next Sample" in 3D Slicer and OHIF), the viewer takes a
few seconds to download and show it and the clinician a few more to type a prompt. A :class:`Prefetcher`
uses that time: it encodes the whole film and segments the labels the clinician asked for on the previous
image, one label at a time, into the predictor's caches (:meth:`Predictor.warm`). A prompt for those
labels is then answered from the result cache; any other prompt still finds the film encoded.

Latest wins: a new :meth:`submit` ends the previous warm-up at its next step. The warm-up yields to
requests: between labels it waits while a ``predict`` call is pending, so a clinician who is faster than
the warm-up waits for at most the step in progress.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from .io import load_radiograph

logger = logging.getLogger(__name__)


class Prefetcher:
    def __init__(self, predictor):
        self.predictor = predictor
        self._lock = threading.Lock()
        self._generation = 0
        self._state: dict = {"status": "idle", "image": None, "labels": [], "segmented": 0, "seconds": None}

    def submit(self, path: str, labels: Sequence[str] = (), image_id: str | None = None) -> None:
        """Warm ``path`` (and ``labels``) in a background thread, ending any warm-up still running."""
        with self._lock:
            self._generation += 1
            generation = self._generation
            self._state = {"status": "running", "image": image_id or path, "labels": list(labels), "segmented": 0,
                           "seconds": None}
        threading.Thread(target=self._run, args=(generation, path, list(labels)), daemon=True,
                         name="xray-textseg-prefetch").start()

    def status(self) -> dict:
        with self._lock:
            return dict(self._state)

    def _run(self, generation: int, path: str, labels: list[str]) -> None:
        def superseded() -> bool:
            return generation != self._generation

        t0 = time.perf_counter()
        status, error, n = "done", None, 0
        try:
            n = self.predictor.warm(load_radiograph(path), labels, should_stop=superseded)
        except Exception as exc:  # noqa: BLE001 - a warm-up must never take the service down
            status, error = "failed", str(exc)
            logger.warning("prefetch of %s failed: %s", path, exc)
        seconds = round(time.perf_counter() - t0, 2)
        with self._lock:
            if superseded():  # a newer submit owns the state now
                return
            self._state.update(status=status, segmented=n, seconds=seconds, **({"error": error} if error else {}))
        if status == "done":
            logger.info("prefetched %s: film encoded, %d label(s) segmented %s in %.1f s", path, n, labels, seconds)
