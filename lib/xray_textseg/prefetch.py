"""Background warm-up: work done while the clinician looks, before the next prompt arrives.

Two moments use it:
- **Next sample.** When active learning proposes the next image ("Next Sample" in 3D Slicer and OHIF),
  the viewer takes a few seconds to download and show it and the clinician a few more to type a prompt.
  The film is encoded and the labels the clinician asked for on the previous image are segmented.
- **Look-ahead.** After a prompt on a film, the other labels of the same region (a chest film's lungs,
  heart and clavicles; a leg's femur and tibia) are segmented, in vocabulary order
  (:func:`~xray_textseg.vocabulary.companion_labels`). Each costs a crop encode (about 1 s on 2 CPU
  cores), so a second structure typed a few seconds later comes from the result cache.

Both go through :meth:`Predictor.warm` into the predictor's caches, one label at a time. Latest wins: a
new :meth:`submit` ends the previous warm-up at its next step. The warm-up yields to requests: a ``predict``
call ends the step in progress within one graph node (ONNX Runtime, the CPU default; the step runs again
after the request), and between steps the warm-up waits while a request is pending. So a clinician who is
faster than the warm-up does not wait for it; with PyTorch encodes (GPU) they wait for at most one step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from .io import Radiograph, load_radiograph

logger = logging.getLogger(__name__)


class Prefetcher:
    def __init__(self, predictor):
        self.predictor = predictor
        self._lock = threading.Lock()
        self._generation = 0
        self._state: dict = {"status": "idle", "image": None, "labels": [], "segmented": 0, "seconds": None,
                             "reason": None}

    def submit(self, image: str | Radiograph, labels: Sequence[str] = (), image_id: str | None = None,
               reason: str = "next sample") -> None:
        """Warm ``image`` (a path, or a film already read) and ``labels`` in a background thread, ending any
        warm-up still running. ``reason`` is reported in :meth:`status` ("next sample", "look-ahead")."""
        with self._lock:
            self._generation += 1
            generation = self._generation
            shown = image_id or (image if isinstance(image, str) else None)
            self._state = {"status": "running", "image": shown, "labels": list(labels), "segmented": 0,
                           "seconds": None, "reason": reason}
        threading.Thread(target=self._run, args=(generation, image, list(labels)), daemon=True,
                         name="xray-textseg-prefetch").start()

    def status(self) -> dict:
        with self._lock:
            return dict(self._state)

    def _run(self, generation: int, image: str | Radiograph, labels: list[str]) -> None:
        def superseded() -> bool:
            return generation != self._generation

        t0 = time.perf_counter()
        status, error, n = "done", None, 0
        try:
            film = image if isinstance(image, Radiograph) else load_radiograph(image)
            n = self.predictor.warm(film, labels, should_stop=superseded)
        except Exception as exc:  # noqa: BLE001 - a warm-up must never take the service down
            status, error = "failed", str(exc)
            logger.warning("prefetch of %s failed: %s", self._state.get("image"), exc)
        seconds = round(time.perf_counter() - t0, 2)
        with self._lock:
            if superseded():  # a newer submit owns the state now
                return
            self._state.update(status=status, segmented=n, seconds=seconds, **({"error": error} if error else {}))
            shown, reason = self._state["image"], self._state["reason"]
        if status == "done":
            logger.info("%s: %s warmed, %d label(s) segmented %s in %.1f s", reason, shown, n, labels, seconds)
