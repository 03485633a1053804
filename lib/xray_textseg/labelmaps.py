"""Saved labels -> per-structure masks, and what each mask leaves unknown.

A label map (what Slicer's MONAI Label module and OHIF save) holds one value per pixel, but on a film structures
overlap: a clavicle lies over its lung field. Where a map gives a pixel to one of an overlapping pair
(:data:`vocabulary.OVERLAPPING`, plus pairs learnt from training masks), that pixel is *unknown* for the other:
neither inside nor background. Training, validation and the promotion gate ignore unknown pixels.

A label may also come as several layers (a layered NIfTI, ``io.load_label_layers``), each a label map: structures
in different layers may overlap and are then known everywhere.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import numpy as np

from .vocabulary import OVERLAPPING

# a pair of labels overlaps in training masks when, in at least OVERLAP_FILMS of the films that carry both, their
# intersection is at least OVERLAP_FRACTION of the smaller mask
OVERLAP_FRACTION = 0.05
OVERLAP_FILMS = 0.2


def overlapping(label: str, pairs: Iterable[Iterable[str]] = ()) -> set[str]:
    """The labels that may lie over ``label`` (the vocabulary's pairs and ``pairs``)."""
    out = set()
    for pair in itertools.chain(OVERLAPPING, (frozenset(p) for p in pairs)):
        if label in pair and len(pair) == 2:
            out |= set(pair) - {label}
    return out


def structure_masks(layers: np.ndarray, values: dict[str, int], pairs: Iterable[Iterable[str]] = ()
                    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(masks, unknown) from a saved label: ``layers`` (K, H, W) label maps (K = 1 for a plain label map),
    ``values`` {label: value}. ``masks[label]``: where any layer holds the label's value (labels absent from every
    layer are left out). ``unknown[label]``: pixels a layer that holds the label gives to an overlapping label,
    outside the label's own mask (only labels with such pixels)."""
    layers = np.asarray(layers)
    if layers.ndim == 2:
        layers = layers[None]
    pairs = [frozenset(p) for p in pairs]
    masks, unknown = {}, {}
    for label, value in values.items():
        present = [layer == value for layer in layers]
        mask = np.logical_or.reduce(present)
        if not mask.any():
            continue
        masks[label] = mask
        others = [values[o] for o in overlapping(label, pairs) if o in values]
        if not others:
            continue
        hidden = np.zeros(mask.shape, bool)
        for layer, here in zip(layers, present):
            if here.any():
                hidden |= np.isin(layer, others)
        hidden &= ~mask
        if hidden.any():
            unknown[label] = hidden
    return masks, unknown


def overlap_pairs(masks_per_film: Iterable[dict[str, np.ndarray]], fraction: float = OVERLAP_FRACTION,
                  films: float = OVERLAP_FILMS) -> list[list[str]]:
    """Pairs of labels whose complete training masks overlap (see :data:`OVERLAP_FRACTION`), sorted."""
    seen: dict[tuple[str, str], list[bool]] = {}
    for masks in masks_per_film:
        for a, b in itertools.combinations(sorted(k for k, m in masks.items() if m.any()), 2):
            inter = np.logical_and(masks[a], masks[b]).sum()
            smaller = min(masks[a].sum(), masks[b].sum())
            seen.setdefault((a, b), []).append(inter >= fraction * smaller)
    return [list(k) for k, v in sorted(seen.items()) if np.mean(v) >= films]


def hidden_pixels(masks: dict[str, np.ndarray], painted: np.ndarray, values: dict[str, int]) -> dict[str, dict]:
    """What a label map painted from ``masks`` cannot show: {label: {"pixels": n hidden, "under": {other: n}}} for
    each label some of whose pixels carry another label's value."""
    out = {}
    for label, mask in masks.items():
        lost = mask & (painted != values[label])
        if lost.any():
            under = {o: int((lost & (painted == v)).sum()) for o, v in values.items() if o != label}
            out[label] = {"pixels": int(lost.sum()), "under": {o: n for o, n in under.items() if n}}
    return out
