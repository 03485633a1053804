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

# A label prompted from the film-frame prior is checked against the box its anchor places (when its adapter has a
# relative prior): a coarse mask whose box overlaps that box by less than this IoU found something else (a clavicle
# prompt locked on a structure above the clavicle), and the label is prompted again with the anchor-placed box.
# Measured on the 10 test films of 10 JSRT adapters (200 clavicle masks; the value was set from these films, so
# the gain is an in-sample figure): where the film prompt scored > 0.8 the IoU was 0.41-0.82; below 0.3 were 9
# masks, the anchor-placed prompt better on 7 (+3.4 Dice summed), worse on 2 (-0.7) (docs/results.md, 2026-11-29,
# eighth session).
ANCHOR_CHECK_IOU = 0.3

# PriorBoxes.fit(how="auto"): below this mean IoU between the median box and the training boxes a label's coarse
# prompt is the envelope of its boxes. Measured on 30 films each: clavicles 0.56 / 0.57; heart 0.70, lungs 0.77 /
# 0.79, femur 0.78, tibia 0.73. With the median box a clavicle lower than usual is prompted with a box over the lung
# apex and the model fills that box. One JSRT run with the envelope for every label gave left clavicle 0.85 (no film
# below 0.75) but heart 0.90; "auto" was no better than the median on two more runs (docs/results.md, 2026-11-29).
SPREAD_IOU = 0.65
# Labels whose answer says when a mask is thicker than every training mask of its label (``mask_thickness``). The
# clavicles' failures are masks run onto the first rib or filling the region above the bone: of 80 served test masks
# (4 JSRT adapters) the 11 flagged averaged Dice 0.61 against 0.86, and all 5 below 0.6 were flagged; the threshold is
# the training maximum, no tuned margin (docs/results.md, 2026-11-30). Not measured for other labels yet.
THICKNESS_CHECKED = ("left_clavicle", "right_clavicle")
# Every label's answer says when its mask's shape is unlike every training mask of the label: its thickness or its
# box's height:width more than SHAPE_SIGMAS standard deviations (log scale, at least SHAPE_MIN_SD) from the training
# masks' mean. That is what a prompt for a structure the film does not show returns: "femur" on a chest film gives a
# confident mask (predicted IoU 0.9) over the lung or mediastinum, with a box 0.7-1.9:1 where femurs are 3.3-5.3:1.
# Measured with the starter adapter on the 80 development films (stats of the 60 training films of its split; the
# threshold was chosen on these films, an in-sample figure): of 280 prompts for a label of the other region 268
# flagged; of 280 prompts for a label the film shows 1 flagged (a tibia, Dice 0.89) (docs/results.md, 2026-12-03).
SHAPE_SIGMAS = 5.0
SHAPE_MIN_SD = 0.1
SHAPE_MIN_MASKS = 5  # fewer training masks of a label: no shape check for it
# A long-leg film whose femur leans (coarse mask's principal axis) more than LEAN_SIGMAS sd (at least LEAN_MIN_SD
# degrees) from its training femurs' mean angle is segmented turned about its centre to that angle: the patient was
# turned on the detector. The tibia's prompt is placed from the femur's box as if the leg were upright, so on a leg
# tilted by 5 degrees it fell on the fibula (tibia 0.60; docs/results.md, 2026-12-04). Needs the angle in the
# adapter's shape statistics (fitted since 2026-12-04; the starter's refitted).
LEAN_LABEL = "femur"
LEAN_SIGMAS = 2.0
LEAN_MIN_SD = 1.0
# Every answer also says when the whole film looks like a film of another body region than the asked label's (a lung
# asked on a long-leg film): the film's whole-film embedding, averaged over its 64 x 64 grid (256 numbers), is nearer
# another region's training films than the label's region's, by more than FILM_REGION_RATIO (RMS of per-feature z, the
# sd pooled over the regions). The shape check misses these when a lung-shaped piece of the leg comes back. Measured
# with the starter adapter on the 20 unseen split-0 films: a film's own region at z 0.6-1.2, the other at 5.0-5.4
# (docs/results.md, 2026-12-04). Fitted on at least FILM_REGION_MIN_FILMS training films of each of two regions
# (vocabulary.BODY_REGIONS; films with labels of both are left out); fewer: no region check.
FILM_REGION_RATIO = 2.0
FILM_REGION_MIN_FILMS = 5
FILM_REGION_MAX_FILMS = 12  # per region, the trainer's cost: one whole-film encode each (~1.3 s on 2 CPU cores)
# A film far from every region's training films (RMS z over NEGATIVE_CHECK_Z) may be a negative: a PNG exported from
# a MONOCHROME1 DICOM without the inversion, white lungs on a dark body. DICOM says so and is inverted on reading; a
# PNG cannot. Such a film's inverted copy is encoded too, and the film is read inverted when that copy is near a
# region's training films (z at most NEGATIVE_NEAR_Z), as the films of the training distribution are. Measured with
# the starter adapter (docs/results.md, 2026-12-04; chosen on these films): the 20 unseen split-0 films at z 0.7-1.7;
# their negatives: chest 3.5-4.6 (inverted copies 0.8-1.7: all read inverted), long-leg 2.2-2.7 (under the gate:
# not found); films changed otherwise (borders, noise, blur, a narrow window) up to 3.5, their inverted copies 2.2 or
# farther. A real CR chest film of another source sits at 2.1, a CR film of another body part at 5.3 with its
# inverted copy at 4.6, the synthetic sample films at 2.9-4.1 with theirs at 2.9-4.3: none is read inverted, but the
# ones over the gate pay one more encode on their first prompt.
NEGATIVE_CHECK_Z = 3.0
NEGATIVE_NEAR_Z = 2.0


def union_box(boxes) -> np.ndarray:
    """The smallest box (x0, y0, x1, y1) holding every row of ``boxes`` (N, 4)."""
    b = np.asarray(boxes)
    return np.concatenate([b[:, :2].min(axis=0), b[:, 2:].max(axis=0)])


def mask_thickness(mask: np.ndarray) -> float:
    """A mask's mean width across its principal axis (area / extent along that axis) as a fraction of the film's
    geometric-mean side; 0 for fewer than 10 pixels. A clavicle is about 0.03-0.05 of a chest film."""
    axes = _principal_axes(mask)
    if axes is None:
        return 0.0
    pts, _, axis = axes
    proj = pts @ axis
    return float(len(pts) / (proj.max() - proj.min() + 1) / np.sqrt(mask.shape[0] * mask.shape[1]))


def _principal_axes(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(centred pixel coordinates (N, 2) as (x, y), eigenvalues, principal axis) from the 2 x 2 scatter matrix;
    None for fewer than 10 pixels."""
    ys, xs = np.nonzero(mask)
    if len(xs) < 10:
        return None
    pts = np.stack([xs, ys], 1).astype(np.float64)
    pts -= pts.mean(0)
    values, vectors = np.linalg.eigh(pts.T @ pts)
    return pts, values, vectors[:, -1]


def mask_shape(mask: np.ndarray) -> dict[str, float] | None:
    """{"thickness": :func:`mask_thickness`, "aspect": its box's height / width in pixels}; None for fewer than 10
    pixels."""
    box = mask_box(mask)
    thickness = mask_thickness(mask)
    if box is None or thickness <= 0:
        return None
    return {"thickness": thickness, "aspect": (box[3] - box[1]) / (box[2] - box[0])}


def principal_axis(mask: np.ndarray) -> tuple[float, float]:
    """(angle, elongation) of a mask's principal axis: degrees from the image's vertical in (-90, 90], positive when
    x grows with y (pixel coordinates); the elongation is the sd along the axis over the sd across it. (0, 1) for
    fewer than 10 pixels."""
    axes = _principal_axes(mask)
    if axes is None:
        return 0.0, 1.0
    _, values, (vx, vy) = axes
    return _axial(float(np.degrees(np.arctan2(vx, vy)))), float(np.sqrt(values[1] / max(values[0], 1e-9)))


def _axial(degrees: float) -> float:
    """An axis's angle (the same axis every 180 degrees) in (-90, 90]."""
    a = (degrees + 90.0) % 180.0 - 90.0
    return 90.0 if a == -90.0 else a


def box_iou(a, b) -> float:
    """Intersection over union of two boxes (x0, y0, x1, y1)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


@dataclass
class PriorBoxes:
    """Per-label normalised boxes; ``source[label]`` says "default" or how it was fitted (see :meth:`fit`).

    ``relative[label] = (anchor, (u0, v0, u1, v1))``: the label's box in the frame of its anchor's box
    (0 = the anchor box's left/top side, 1 = its right/bottom side), fitted on labelled films that carry both
    (:meth:`fit_relative`); empty until an adapter is trained."""

    boxes: dict[str, tuple[float, float, float, float]] = field(default_factory=lambda: dict(DEFAULT_PRIORS))
    source: dict[str, str] = field(default_factory=lambda: {k: "default" for k in DEFAULT_PRIORS})
    relative: dict[str, tuple[str, tuple[float, float, float, float]]] = field(default_factory=dict)
    kind: dict[str, str] = field(default_factory=dict)  # fitted labels: "median" | "envelope" (see fit)
    thickness: dict[str, float] = field(default_factory=dict)  # THICKNESS_CHECKED labels: thickest training mask
    # per label, {feature of mask_shape: (mean, sd) of its log over the training masks, "n": their count} (fit_shape)
    shape: dict[str, dict] = field(default_factory=dict)
    # {region: {"labels": [...], "mean": [256 floats], "n": films}} and the pooled per-feature sd (fit_film_regions)
    film_regions: dict[str, dict] = field(default_factory=dict)
    film_sd: list[float] = field(default_factory=list)

    def box(self, label: str, image_shape: tuple[int, int]) -> np.ndarray:
        """The prior box of ``label`` in pixel coordinates of an image of ``image_shape`` (H, W)."""
        if label not in self.boxes:
            raise KeyError(f"no prior box for label {label!r}")
        h, w = image_shape
        x0, y0, x1, y1 = self.boxes[label]
        return np.array([x0 * w, y0 * h, x1 * w, y1 * h], dtype=np.float32)

    def fit(self, label: str, masks: Iterable[np.ndarray], min_count: int = 1, how: str = "median",
            margin: float = 0.05, spread_iou: float = SPREAD_IOU) -> int:
        """Replace the prior of ``label`` by a box fitted on the given masks' boxes (normalised). ``how``:

        * ``"median"``: the median box;
        * ``"envelope"``: the smallest box holding every mask's box, grown by ``margin`` of its size per side: a
          prompt that holds the structure wherever the patient stood, so the text has to find it in the box;
        * ``"auto"``: the envelope where the median box overlaps the boxes poorly (mean IoU below ``spread_iou``:
          thin structures whose position varies by more than their width, the clavicles), else the median.

        Returns the number of masks used. ``kind[label]`` records "median" or "envelope"."""
        if how not in ("median", "envelope", "auto"):
            raise ValueError(f"unknown prior fit {how!r}; use 'median', 'envelope' or 'auto'")
        rows = []
        for mask in masks:
            b = mask_box(np.asarray(mask) > 0)
            if b is not None:
                h, w = mask.shape
                rows.append((b[0] / w, b[1] / h, b[2] / w, b[3] / h))
        if len(rows) >= min_count and rows:
            r = np.asarray(rows)
            box = np.median(r, axis=0)
            overlap = float(np.mean([box_iou(box, x) for x in r]))
            if how == "envelope" or (how == "auto" and overlap < spread_iou):
                how = "envelope"
                box = union_box(r)
                size = np.tile(box[2:] - box[:2], 2)
                box = np.clip(box + margin * size * np.array([-1, -1, 1, 1]), 0.0, 1.0)
            else:
                how = "median"
            self.boxes[label] = tuple(float(v) for v in box)  # type: ignore[assignment]
            self.kind[label] = how
            self.source[label] = f"{how} of {len(rows)} labels (median box IoU {overlap:.2f})"
        return len(rows)

    def fit_thickness(self, label: str, masks: Iterable[np.ndarray]) -> None:
        """Keep the thickest of the label's training masks (:func:`mask_thickness`), for :meth:`too_thick`."""
        values = [mask_thickness(np.asarray(m) > 0) for m in masks]
        values = [v for v in values if v > 0]
        if values:
            self.thickness[label] = max(values)

    def too_thick(self, label: str, mask: np.ndarray) -> str | None:
        """Why ``mask`` is thicker than every training mask of ``label``, or None (also when none were kept)."""
        return self._too_thick(label, mask_thickness(mask))

    def _too_thick(self, label: str, t: float) -> str | None:
        limit = self.thickness.get(label)
        if not limit or t <= limit:
            return None  # (mask_thickness is 0 for an empty mask)
        return (f"{label.replace('_', ' ')} mask is {t / limit:.1f}x as thick as the thickest training mask: it may "
                "cover a neighbouring structure; check it or draw a box")

    def fit_shape(self, label: str, masks: Iterable[np.ndarray], min_count: int = SHAPE_MIN_MASKS) -> int:
        """Keep the log-scale mean and standard deviation of the training masks' :func:`mask_shape` features, for
        :meth:`unlike`. Returns the number of masks used (none kept below ``min_count``)."""
        masks = [np.asarray(m) > 0 for m in masks]  # read twice below: an iterator would be empty the second time
        shapes = [s for s in (mask_shape(m) for m in masks) if s]
        if len(shapes) >= min_count:
            stats: dict = {"n": len(shapes)}
            for key in ("thickness", "aspect"):
                logs = np.log([s[key] for s in shapes])
                stats[key] = (float(logs.mean()), float(logs.std()))
            # an axis's angle repeats every 180 degrees: the mean of the doubled angles, halved
            angles = [principal_axis(m)[0] for m in masks if m.sum() >= 10]
            doubled = np.radians(2.0 * np.asarray(angles))
            mean = _axial(float(np.degrees(np.arctan2(np.sin(doubled).mean(), np.cos(doubled).mean())) / 2.0))
            stats["angle"] = (mean, float(np.sqrt(np.mean([_axial(a - mean) ** 2 for a in angles]))))
            self.shape[label] = stats
        return len(shapes)

    def lean(self, mask: np.ndarray) -> float | None:
        """The turn in degrees (``transforms.turn_points``) that brings a ``LEAN_LABEL`` coarse mask to its training
        masks' mean angle, when it leans more than ``LEAN_SIGMAS`` sd from it and is elongated enough (3:1) for its
        axis to mean something; else None (also without the angle statistics)."""
        stats = self.shape.get(LEAN_LABEL)
        if not stats or "angle" not in stats:
            return None
        angle, elongation = principal_axis(mask)
        if elongation < 3.0:
            return None
        mean, sd = stats["angle"]
        turn = _axial(mean - angle)
        return turn if abs(turn) > LEAN_SIGMAS * max(sd, LEAN_MIN_SD) else None

    def unlike(self, label: str, mask: np.ndarray, sigmas: float = SHAPE_SIGMAS) -> str | None:
        """Why ``mask`` is unlike every training mask of ``label`` (see ``SHAPE_SIGMAS``), or None (also when no
        shape was kept for the label)."""
        return self._unlike(label, mask_shape(mask), sigmas)

    def _unlike(self, label: str, shape: dict[str, float] | None, sigmas: float = SHAPE_SIGMAS) -> str | None:
        stats = self.shape.get(label)
        if not stats:
            return None
        name = label.replace("_", " ")
        if shape is None:
            return f"{name} mask is empty: is the {name} on this film? Draw a box round it"
        for key, what in (("aspect", "height:width"), ("thickness", "thickness")):
            mean, sd = stats[key]
            if abs(np.log(shape[key]) - mean) > sigmas * max(sd, SHAPE_MIN_SD):
                lo, hi = np.exp(mean - 2 * sd), np.exp(mean + 2 * sd)
                value = (f"{shape[key]:.1f}:1, the training masks' {lo:.1f}-{hi:.1f}:1" if key == "aspect" else
                         f"{shape[key]:.3f} of the film, the training masks' {lo:.3f}-{hi:.3f}")
                return (f"{name} mask is unlike the training masks of the {name} ({what} {value}): the film may not "
                        f"show the {name}; check it or draw a box")
        return None

    def check(self, label: str, mask: np.ndarray) -> str | None:
        """The warning that comes with a predicted mask: :meth:`unlike`, else :meth:`too_thick`, else None (the mask's
        shape measured once: on the predictor's path for every label)."""
        shape = mask_shape(mask)
        return self._unlike(label, shape) or self._too_thick(label, shape["thickness"] if shape else 0.0)

    def fit_film_regions(self, films: Iterable[tuple[Iterable[str], np.ndarray]],
                         min_films: int = FILM_REGION_MIN_FILMS) -> dict[str, int]:
        """Keep, per body region (``vocabulary.BODY_REGIONS``), the mean of its training films' pooled whole-film
        embeddings (``films``: (the film's labels, its vector)) and the per-feature sd pooled over the regions, for
        :meth:`film_region_warning`. Needs ``min_films`` films of each of at least two regions, else keeps nothing.
        Returns the films counted per region."""
        from .vocabulary import BODY_REGIONS

        by_region: dict[str, list[np.ndarray]] = {}
        for labels, vec in films:
            regions = {r for r, members in BODY_REGIONS.items() for lab in labels if lab in members}
            if len(regions) == 1:
                by_region.setdefault(regions.pop(), []).append(np.asarray(vec, np.float64).ravel())
        counts = {r: len(v) for r, v in by_region.items()}
        kept = {r: np.stack(v) for r, v in by_region.items() if len(v) >= min_films}
        self.film_regions, self.film_sd = {}, []
        if len(kept) < 2:
            return counts
        var = np.mean([x.var(axis=0) for x in kept.values()], axis=0)
        self.film_sd = [float(f"{v:.4g}") for v in np.sqrt(var + 1e-8)]
        for r, x in kept.items():
            self.film_regions[r] = {"labels": [lab for lab in BODY_REGIONS[r]], "n": len(x),
                                    "mean": [float(f"{v:.4g}") for v in x.mean(axis=0)]}
        return counts

    def film_distances(self, vec: np.ndarray) -> dict[str, float]:
        """RMS z-distance of a film's pooled embedding to each region's training films (empty without regions)."""
        if not self.film_regions:
            return {}
        v, sd = np.asarray(vec, np.float64).ravel(), np.asarray(self.film_sd)
        return {r: float(np.sqrt(np.mean(((v - np.asarray(s["mean"])) / sd) ** 2)))
                for r, s in self.film_regions.items()}

    def film_region_warning(self, label: str, distances: dict[str, float],
                            ratio: float = FILM_REGION_RATIO) -> str | None:
        """Why the film (its :meth:`film_distances`) may not show ``label``: it is nearer another region's training
        films than the label's region's by more than ``ratio``. None when it is not, or without regions."""
        own = next((r for r, s in self.film_regions.items() if label in s["labels"]), None)
        if own is None or own not in distances:
            return None
        nearest = min(distances, key=distances.get)
        if nearest == own or distances[own] <= ratio * distances[nearest]:
            return None
        name, region = label.replace("_", " "), nearest.replace("_", "-")
        return (f"this film looks like a {region} film, not a {own.replace('_', '-')} film (its image is nearer the "
                f"{region} training films): it may not show the {name}; check it or draw a box")

    def mid_labels(self, labels: Iterable[str]) -> list[str]:
        """The labels among ``labels`` whose prompt is an envelope (:meth:`fit`): the ones an adapter trained with a
        mid view (``TrainConfig.mid_view``) finds on :meth:`mid_region` instead of the whole film."""
        return [lab for lab in labels if self.kind.get(lab) == "envelope"]

    def mid_region(self, labels: Iterable[str], image_shape: tuple[int, int]) -> np.ndarray | None:
        """The box (pixels) holding the prior boxes of ``labels``: on a chest film with both clavicles enveloped,
        the upper thorax, which a stretched 256 px view shows at ~3x the whole film's vertical resolution. None
        without labels."""
        boxes = [self.box(lab, image_shape) for lab in labels]
        return union_box(boxes).astype(np.float32) if boxes else None

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
        if self.kind:
            out["kind"] = dict(self.kind)
        if self.thickness:
            out["thickness"] = dict(self.thickness)
        if self.shape:
            out["shape"] = {k: dict(v) for k, v in self.shape.items()}  # (mean, sd) tuples are JSON lists
        if self.film_regions:
            out["film_regions"] = {k: dict(v) for k, v in self.film_regions.items()}
            out["film_sd"] = list(self.film_sd)
        if self.relative:
            out["relative"] = {k: {"anchor": a, "box": list(b)} for k, (a, b) in self.relative.items()}
        return out

    @classmethod
    def from_json(cls, data: dict) -> PriorBoxes:
        priors = cls()
        for k, v in data.get("boxes", {}).items():
            priors.boxes[k] = tuple(float(x) for x in v)  # type: ignore[assignment]
        priors.source.update(data.get("source", {}))
        priors.kind.update(data.get("kind", {}))
        priors.thickness.update({k: float(v) for k, v in data.get("thickness", {}).items()})
        for k, v in data.get("shape", {}).items():
            priors.shape[k] = {"n": int(v["n"]), **{f: tuple(float(x) for x in v[f])
                                                   for f in ("thickness", "aspect", "angle") if f in v}}
        for k, v in data.get("film_regions", {}).items():
            priors.film_regions[k] = {"labels": [str(x) for x in v["labels"]], "n": int(v["n"]),
                                      "mean": [float(x) for x in v["mean"]]}
        priors.film_sd = [float(x) for x in data.get("film_sd", [])]
        for k, v in data.get("relative", {}).items():
            priors.relative[k] = (str(v["anchor"]), tuple(float(x) for x in v["box"]))  # type: ignore[assignment]
        return priors

    def save(self, path: str | Path) -> None:
        from .io import write_atomic

        write_atomic(path, json.dumps(self.to_json(), indent=2).encode())

    @classmethod
    def load(cls, path: str | Path) -> PriorBoxes:
        return cls.from_json(json.loads(Path(path).read_text()))
