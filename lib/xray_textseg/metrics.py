"""Overlap metrics on boolean masks (numpy; MONAI's metrics are used where batches of tensors exist)."""

from __future__ import annotations

import numpy as np


def dice(pred: np.ndarray, truth: np.ndarray, ignore: np.ndarray | None = None) -> float:
    """Dice = 2|A∩B| / (|A|+|B|) over the pixels not in ``ignore`` (whose truth is unknown); 1.0 when both are
    empty."""
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    if ignore is not None:
        keep = ~np.asarray(ignore, bool)
        p, t = p & keep, t & keep
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(p, t).sum() / denom)


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    union = np.logical_or(p, t).sum()
    return 1.0 if union == 0 else float(np.logical_and(p, t).sum() / union)
