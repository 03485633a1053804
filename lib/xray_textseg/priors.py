"""Anatomical prior boxes: the cold-start prompt when no adapter has been trained yet.

A text prompt names a label; before any adapter exists the engine turns that label into a box
where the organ usually lies on a standard film (normalised [x0, y0, x1, y1] of the image frame,
image-left = patient right on a PA chest) and prompts the backbone with it. The built-in boxes
are textbook anatomy, not fitted to any data set; :meth:`PriorBoxes.fit` replaces them with
the mean box of labels users have saved (a robust mean: the median of each coordinate).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .transforms import mask_box

# Standard PA chest (patient facing the detector, so the patient's right is on the image left)
# and a long-leg film of one leg from hip to ankle.
DEFAULT_PRIORS: dict[str, tuple[float, float, float, float]] = {
    "right_lung": (0.10, 0.14, 0.48, 0.80),
    "left_lung": (0.52, 0.14, 0.90, 0.82),
    "heart": (0.38, 0.45, 0.75, 0.82),
    "right_clavicle": (0.12, 0.08, 0.48, 0.26),
    "left_clavicle": (0.52, 0.08, 0.88, 0.26),
    "femur": (0.10, 0.02, 0.90, 0.52),
    "tibia": (0.10, 0.50, 0.90, 0.97),
}


# Structures whose box may be better predicted from a neighbour the model segments reliably than from the film frame:
# a clavicle crosses the apex of the lung on the same side, wherever the patient's shoulders are on the film; the
# tibia starts where the femur ends, wherever the knee is. Each adapter decides per label on its validation films
# (serving.coarse_prompt), so an anchor that does not help is not used.
ANCHORS: dict[str, str] = {"right_clavicle": "right_lung", "left_clavicle": "left_lung", "tibia": "femur"}


@dataclass
class PriorBoxes:
    """Per-label normalised boxes; ``source[label]`` says 'default' or 'fitted on N labels'.

    ``relative[label] = (anchor, (u0, v0, u1, v1))``: the label's box in the frame of its anchor's box
    (0 = the anchor box's left/top side, 1 = its right/bottom side), fitted on labelled films that carry both
    (:meth:`fit_relative`); empty until an adapter is trained."""

    boxes: dict[str, tuple[float, float, float, float]] = field(default_factory=lambda: dict(DEFAULT_PRIORS))
    source: dict[str, str] = field(default_factory=lambda: {k: "default" for k in DEFAULT_PRIORS})
    relative: dict[str, tuple[str, tuple[float, float, float, float]]] = field(default_factory=dict)

    def box(self, label: str, image_shape: tuple[int, int]) -> np.ndarray:
        """The prior box of ``label`` in pixel coordinates of an image of ``image_shape`` (H, W)."""
        if label not in self.boxes:
            raise KeyError(f"no prior box for label {label!r}")
        h, w = image_shape
        x0, y0, x1, y1 = self.boxes[label]
        return np.array([x0 * w, y0 * h, x1 * w, y1 * h], dtype=np.float32)

    def fit(self, label: str, masks: Iterable[np.ndarray], min_count: int = 1) -> int:
        """Replace the prior of ``label`` by the median normalised box of the given masks."""
        rows = []
        for mask in masks:
            b = mask_box(np.asarray(mask) > 0)
            if b is not None:
                h, w = mask.shape
                rows.append((b[0] / w, b[1] / h, b[2] / w, b[3] / h))
        if len(rows) >= min_count and rows:
            med = np.median(np.asarray(rows), axis=0)
            self.boxes[label] = tuple(float(v) for v in med)  # type: ignore[assignment]
            self.source[label] = f"fitted on {len(rows)} labels"
        return len(rows)

    def fit_relative(self, label: str, anchor: str, pairs: Iterable[tuple[np.ndarray, np.ndarray]],
                     min_count: int = 1) -> int:
        """Fit ``label``'s box relative to ``anchor``'s box: the median over (label mask, anchor mask) pairs of
        the same films. Returns the number of pairs used (both masks non-empty)."""
        rows = []
        for mask, anchor_mask in pairs:
            b, a = mask_box(np.asarray(mask) > 0), mask_box(np.asarray(anchor_mask) > 0)
            if b is not None and a is not None and a[2] > a[0] and a[3] > a[1]:
                aw, ah = a[2] - a[0], a[3] - a[1]
                rows.append(((b[0] - a[0]) / aw, (b[1] - a[1]) / ah, (b[2] - a[0]) / aw, (b[3] - a[1]) / ah))
        if len(rows) >= min_count and rows:
            med = np.median(np.asarray(rows), axis=0)
            self.relative[label] = (anchor, tuple(float(v) for v in med))  # type: ignore[assignment]
        return len(rows)

    def relative_box(self, label: str, anchor_box, image_shape: tuple[int, int]) -> np.ndarray | None:
        """``label``'s box in pixels from its anchor's box (pixels), clipped to the image; None without a
        relative prior or when the clipped box is empty."""
        if label not in self.relative:
            return None
        _, (u0, v0, u1, v1) = self.relative[label]
        x0, y0, x1, y1 = (float(v) for v in anchor_box)
        aw, ah = x1 - x0, y1 - y0
        h, w = image_shape
        box = np.array([x0 + u0 * aw, y0 + v0 * ah, x0 + u1 * aw, y0 + v1 * ah], dtype=np.float32)
        box[[0, 2]] = np.clip(box[[0, 2]], 0, w - 1)
        box[[1, 3]] = np.clip(box[[1, 3]], 0, h - 1)
        return box if box[2] - box[0] >= 2 and box[3] - box[1] >= 2 else None

    def to_json(self) -> dict:
        out = {"boxes": {k: list(v) for k, v in self.boxes.items()}, "source": dict(self.source)}
        if self.relative:
            out["relative"] = {k: {"anchor": a, "box": list(b)} for k, (a, b) in self.relative.items()}
        return out

    @classmethod
    def from_json(cls, data: dict) -> PriorBoxes:
        priors = cls()
        for k, v in data.get("boxes", {}).items():
            priors.boxes[k] = tuple(float(x) for x in v)  # type: ignore[assignment]
        priors.source.update(data.get("source", {}))
        for k, v in data.get("relative", {}).items():
            priors.relative[k] = (str(v["anchor"]), tuple(float(x) for x in v["box"]))  # type: ignore[assignment]
        return priors

    def save(self, path: str | Path) -> None:
        from .io import write_atomic

        write_atomic(path, json.dumps(self.to_json(), indent=2).encode())

    @classmethod
    def load(cls, path: str | Path) -> PriorBoxes:
        return cls.from_json(json.loads(Path(path).read_text()))
