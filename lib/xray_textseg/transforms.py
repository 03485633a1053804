"""All geometry between a radiograph and a backbone's input square, in one place.

A :class:`View` is a rectangular region of the radiograph (the whole film, or a crop around an
organ) mapped onto the model's S x S input either *letterboxed* (longest side to S, pad
bottom/right: how LiteMedSAM was trained) or *stretched* (each side to S: how MedSAM ViT-B was
trained, and what keeps long bones and clavicles from collapsing to a few pixels).
Boxes go image -> model with :meth:`View.box_to_model`; mask logits come back with
:meth:`View.logits_to_image`. Coordinates are (x, y) = (column, row) in pixels, boxes are
``[x0, y0, x1, y1]`` with x1/y1 exclusive.

A :class:`Field` is where the pipeline works on a film: all of it, its exposed field (wide flat borders cut off), or
the film turned upright when it lies askew on its canvas (:func:`film_field`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class View:
    """Region ``box`` = (x0, y0, x1, y1) of an image of ``image_shape`` = (H, W), mapped to an S x S input."""

    image_shape: tuple[int, int]
    box: tuple[int, int, int, int]
    size: int
    stretch: bool

    @classmethod
    def full(cls, image_shape: tuple[int, int], size: int, stretch: bool) -> View:
        h, w = image_shape
        return cls((int(h), int(w)), (0, 0, int(w), int(h)), size, stretch)

    @classmethod
    def crop(cls, image_shape: tuple[int, int], box, size: int, margin: float = 0.1,
             min_side: int = 16) -> View:
        """A stretched view of ``box`` grown by ``margin`` of its size on each side, clamped to the image."""
        h, w = image_shape
        x0, y0, x1, y1 = (float(v) for v in box)
        bw, bh = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
        x0, x1 = x0 - margin * bw, x1 + margin * bw
        y0, y1 = y0 - margin * bh, y1 + margin * bh
        cx0, cy0 = int(np.floor(max(0.0, x0))), int(np.floor(max(0.0, y0)))
        cx1, cy1 = int(np.ceil(min(float(w), x1))), int(np.ceil(min(float(h), y1)))
        if cx1 - cx0 < min_side:
            cx0, cx1 = max(0, min(cx0, w - min_side)), min(w, max(cx1, cx0 + min_side))
        if cy1 - cy0 < min_side:
            cy0, cy1 = max(0, min(cy0, h - min_side)), min(h, max(cy1, cy0 + min_side))
        return cls((int(h), int(w)), (cx0, cy0, cx1, cy1), size, True)

    @property
    def region_shape(self) -> tuple[int, int]:
        x0, y0, x1, y1 = self.box
        return y1 - y0, x1 - x0

    @property
    def scale(self) -> tuple[float, float]:
        """(sx, sy): model pixels per image pixel."""
        rh, rw = self.region_shape
        if self.stretch:
            return self.size / rw, self.size / rh
        s = self.size / max(rh, rw)
        return s, s

    @property
    def valid_shape(self) -> tuple[int, int]:
        """(h, w) of the model input actually covered by the image (the rest is zero padding)."""
        rh, rw = self.region_shape
        sx, sy = self.scale
        return min(self.size, int(round(rh * sy))), min(self.size, int(round(rw * sx)))

    def key(self) -> tuple:
        return (self.box, self.size, self.stretch)

    # --- pixels -------------------------------------------------------------------------------
    def model_input(self, pixels: np.ndarray) -> torch.Tensor:
        """(H, W) float image -> (1, 3, S, S) float32 in [0, 1]: resize, min-max, pad (MedSAM's recipe)."""
        x0, y0, x1, y1 = self.box
        region = torch.from_numpy(np.ascontiguousarray(pixels[y0:y1, x0:x1], dtype=np.float32))[None, None]
        vh, vw = self.valid_shape
        resized = F.interpolate(region, size=(vh, vw), mode="bilinear", align_corners=False, antialias=True)
        lo, hi = resized.amin(), resized.amax()
        resized = (resized - lo) / torch.clamp(hi - lo, min=1e-8)
        out = torch.zeros((1, 1, self.size, self.size), dtype=torch.float32)
        out[:, :, :vh, :vw] = resized
        return out.expand(1, 3, self.size, self.size).contiguous()

    # --- boxes and points ------------------------------------------------------------------------
    def box_to_model(self, box) -> np.ndarray:
        """Image-space box(es) (..., 4) -> model-space, clipped to the valid area."""
        b = np.asarray(box, dtype=np.float64).copy()
        sx, sy = self.scale
        vh, vw = self.valid_shape
        b[..., [0, 2]] = np.clip((b[..., [0, 2]] - self.box[0]) * sx, 0, vw)
        b[..., [1, 3]] = np.clip((b[..., [1, 3]] - self.box[1]) * sy, 0, vh)
        return b.astype(np.float32)

    def points_to_model(self, points) -> np.ndarray:
        p = np.asarray(points, dtype=np.float64).copy()
        sx, sy = self.scale
        p[..., 0] = (p[..., 0] - self.box[0] + 0.5) * sx
        p[..., 1] = (p[..., 1] - self.box[1] + 0.5) * sy
        return p.astype(np.float32)

    # --- masks -------------------------------------------------------------------------------------
    def mask_to_model(self, mask: np.ndarray, res: int | None = None) -> torch.Tensor:
        """Image-space mask (H, W) -> (res, res) float target in [0, 1] over the model square (the
        decoder's output grid; padding is background). The inverse of :meth:`logits_to_image`."""
        res = res or self.size
        x0, y0, x1, y1 = self.box
        region = torch.from_numpy(np.ascontiguousarray(mask[y0:y1, x0:x1], dtype=np.float32))[None, None]
        vh, vw = self.valid_shape
        th, tw = max(1, round(vh * res / self.size)), max(1, round(vw * res / self.size))
        resized = F.interpolate(region, size=(th, tw), mode="bilinear", align_corners=False, antialias=True)
        out = torch.zeros((res, res), dtype=torch.float32)
        out[:th, :tw] = resized[0, 0]
        return out

    def logits_to_region(self, low_res: torch.Tensor) -> torch.Tensor:
        """Decoder logits (N, 1, h, w) over the model square -> (N, rh, rw) logits over the view's region."""
        vh, vw = self.valid_shape
        up = F.interpolate(low_res.float(), size=(self.size, self.size), mode="bilinear", align_corners=False)
        up = up[:, :, :vh, :vw]
        return F.interpolate(up, size=self.region_shape, mode="bilinear", align_corners=False)[:, 0]

    def logits_to_image(self, low_res: torch.Tensor, fill: float = -20.0) -> torch.Tensor:
        """Decoder logits -> (N, H, W) logits over the whole image; outside the view is ``fill``."""
        h, w = self.image_shape
        region = self.logits_to_region(low_res)
        out = torch.full((region.shape[0], h, w), fill, dtype=region.dtype)
        x0, y0, x1, y1 = self.box
        out[:, y0:y1, x0:x1] = region
        return out


def turn_points(xs, ys, rotation: tuple[float, float, float], inverse: bool = False):
    """Points (x, y) of a turned frame on the film; ``inverse``: film points in the frame. ``rotation`` = (degrees,
    cx, cy): the frame's point s is the film's point c + R (s - c), R the rotation by ``degrees`` taking the x axis
    (1, 0) to (cos, sin) in (x, y), y pointing down the rows."""
    degrees, cx, cy = rotation
    t = np.radians(-degrees if inverse else degrees)
    c, s = np.cos(t), np.sin(t)
    dx, dy = np.asarray(xs, np.float64) - cx, np.asarray(ys, np.float64) - cy
    return cx + c * dx - s * dy, cy + s * dx + c * dy


def turned_box_on_film(box, rotation: tuple[float, float, float], image_shape: tuple[int, int]) -> tuple[int, ...]:
    """The film-frame box (integers, clamped to the film) holding a turned frame's ``box``."""
    x0, y0, x1, y1 = (float(v) for v in box)
    fx, fy = turn_points(np.array([x0, x1, x1, x0]), np.array([y0, y0, y1, y1]), rotation)
    h, w = image_shape
    return (int(max(0, np.floor(fx.min()))), int(max(0, np.floor(fy.min()))),
            int(min(w, np.ceil(fx.max()))), int(min(h, np.ceil(fy.max()))))


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight [x0, y0, x1, y1) box of a boolean mask, or None when it is empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 8-connected component: an organ is one piece, stray blobs are noise."""
    from scipy import ndimage

    labelled, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n <= 1:
        return mask
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    return labelled == int(sizes.argmax())


FIELD_FLAT = 0.02  # a border row/column: its pixels' spread (sd) is at most this fraction of the film's range
FIELD_MIN = 0.25  # the exposed field keeps at least this fraction of each side, else the whole film is the field
# The pipeline works on the exposed field only when the flat borders take more than this fraction of the film's
# width or height. The development films have narrow ones (JSRT up to 2 % of the height, the OAI long-leg films
# 12-13 %: they are padded to 1024 rows), and every adapter so far saw them whole, so below this they stay.
FIELD_CROP = 0.2


def exposed_field(pixels: np.ndarray, flat: float = FIELD_FLAT) -> tuple[int, int, int, int]:
    """The box [x0, y0, x1, y1) of the film without its flat borders: rows and columns at the edges whose values
    hardly vary (sd at most ``flat`` of the film's range): black padding of an export, a bright collimated band.
    The pipeline places its prompts in this box (prior boxes are fractions of the exposed field, not of a canvas
    padded around it). The whole film when nothing is flat, or when what is left would be under ``FIELD_MIN`` of a
    side (a nearly blank film is not cropped to a sliver)."""
    h, w = pixels.shape
    lo, hi = float(pixels.min()), float(pixels.max())
    full = (0, 0, int(w), int(h))
    if hi <= lo:
        return full
    limit = flat * (hi - lo)

    def span(sd: np.ndarray) -> tuple[int, int]:
        keep = np.flatnonzero(sd > limit)
        return (0, 0) if keep.size == 0 else (int(keep[0]), int(keep[-1]) + 1)

    x0, y0, x1, y1 = full
    for _ in range(2):  # rows over the kept columns, then columns over the kept rows, once more
        y0, y1 = span(pixels[:, x0:x1].std(axis=1))
        if y1 <= y0:
            return full
        x0, x1 = span(pixels[y0:y1].std(axis=0))
        if x1 <= x0:
            return full
    if (x1 - x0) < FIELD_MIN * w or (y1 - y0) < FIELD_MIN * h or min(x1 - x0, y1 - y0) < 32:
        return full
    return x0, y0, x1, y1


def field_crop(pixels: np.ndarray) -> tuple[int, int, int, int] | None:
    """The :func:`exposed_field` box when its borders take more than ``FIELD_CROP`` of the film's width or height
    (a film padded onto a larger canvas, a wide collimated band), else None: the film is used whole."""
    h, w = pixels.shape
    x0, y0, x1, y1 = exposed_field(pixels)
    if (x1 - x0) >= (1 - FIELD_CROP) * w and (y1 - y0) >= (1 - FIELD_CROP) * h:
        return None
    return x0, y0, x1, y1


# A film scanned or exported askew sits on its canvas as a turned rectangle with the canvas's fill in the corners
# (the same value, exactly, in at least three corners). When the rectangle is turned by at least SKEW_MIN_DEGREES
# (and at most SKEW_MAX_DEGREES) and fills at least SKEW_RECTANGULAR of its own area, the pipeline works on the film
# turned upright (a turned Field). The prior boxes, the stretched whole-film view and the fine crops of a long bone
# all assume an upright film: the starter adapter's tibia fell from 0.91 to 0.42 on long-leg films turned by 7
# degrees (docs/results.md, 2026-12-04).
SKEW_MIN_DEGREES = 1.0
SKEW_MAX_DEGREES = 30.0
SKEW_RECTANGULAR = 0.95
SKEW_FILL_TOL = 1e-3  # a fill pixel differs from the corners' value by at most this fraction of the film's range


@dataclass(frozen=True)
class Field:
    """Where the pipeline works on a film: ``box`` (x0, y0, x1, y1) of the film, or with ``rotation`` (see
    :func:`turn_points`) of the film turned upright. Its pixels, masks and boxes go both ways."""

    box: tuple[int, int, int, int]
    rotation: tuple[float, float, float] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        x0, y0, x1, y1 = self.box
        return y1 - y0, x1 - x0

    def _sample(self, image: np.ndarray, order: int, cval: float | None) -> np.ndarray:
        x0, y0, x1, y1 = self.box
        if self.rotation is None:
            return image[y0:y1, x0:x1].copy()
        from scipy import ndimage

        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64)
        fx, fy = turn_points(xs, ys, self.rotation)
        return ndimage.map_coordinates(np.asarray(image, np.float32), [fy, fx], order=order,
                                       mode="nearest" if cval is None else "constant",
                                       cval=0.0 if cval is None else cval)

    def pixels(self, film: np.ndarray) -> np.ndarray:
        """The field's image (float32): a crop, or the film turned upright (bilinear)."""
        return np.asarray(self._sample(film, 1, None), np.float32)

    def mask_from_film(self, mask: np.ndarray) -> np.ndarray:
        """A film mask in the field's pixels (boolean)."""
        if self.rotation is None:
            return self._sample(mask, 0, 0.0)
        return self._sample(mask.astype(np.float32), 1, 0.0) > 0.5

    def mask_to_film(self, mask: np.ndarray, film_shape: tuple[int, int]) -> np.ndarray:
        """A field mask in the whole film's pixels (boolean; empty outside the field)."""
        x0, y0, x1, y1 = self.box
        out = np.zeros(film_shape, dtype=bool)
        if self.rotation is None:
            out[y0:y1, x0:x1] = mask
            return out
        from scipy import ndimage

        bx0, by0, bx1, by1 = turned_box_on_film(self.box, self.rotation, film_shape)
        ys, xs = np.mgrid[by0:by1, bx0:bx1].astype(np.float64)
        sx, sy = turn_points(xs, ys, self.rotation, inverse=True)
        out[by0:by1, bx0:bx1] = ndimage.map_coordinates(mask.astype(np.float32), [sy - y0, sx - x0], order=1,
                                                        mode="constant", cval=0.0) > 0.5
        return out

    def box_from_film(self, box) -> list[float]:
        """A film box (a user's) as the field's box holding it, clamped to the field."""
        x0, y0, x1, y1 = self.box
        bx0, by0, bx1, by1 = (float(v) for v in box)
        if self.rotation is not None:
            sx, sy = turn_points(np.array([bx0, bx1, bx1, bx0]), np.array([by0, by0, by1, by1]), self.rotation,
                                 inverse=True)
            bx0, by0, bx1, by1 = float(sx.min()), float(sy.min()), float(sx.max()), float(sy.max())
        return [min(max(bx0 - x0, 0.0), x1 - x0 - 1.0), min(max(by0 - y0, 0.0), y1 - y0 - 1.0),
                min(max(bx1 - x0, 1.0), float(x1 - x0)), min(max(by1 - y0, 1.0), float(y1 - y0))]

    def box_to_film(self, box, film_shape: tuple[int, int]) -> list[float]:
        """A field box as the film box holding it (clamped to the film when turned)."""
        x0, y0 = self.box[:2]
        b = [float(box[0]) + x0, float(box[1]) + y0, float(box[2]) + x0, float(box[3]) + y0]
        if self.rotation is None:
            return b
        return [float(v) for v in turned_box_on_film(b, self.rotation, film_shape)]


def skewed_field(pixels: np.ndarray) -> Field | None:
    """The turned :class:`Field` of a film lying askew on its canvas (see ``SKEW_MIN_DEGREES``), else None."""
    from scipy import ndimage
    from scipy.spatial import ConvexHull, QhullError

    h, w = pixels.shape
    if min(h, w) < 32:
        return None
    lo, hi = float(pixels.min()), float(pixels.max())
    if hi <= lo:
        return None
    corners = np.array([pixels[0, 0], pixels[0, -1], pixels[-1, 0], pixels[-1, -1]], np.float64)
    tol = SKEW_FILL_TOL * (hi - lo)
    fill = float(np.median(corners))
    if np.sum(np.abs(corners - fill) <= tol) < 3:
        return None
    filled = np.abs(pixels - fill) <= tol
    labelled, _ = ndimage.label(filled)
    outside = np.isin(labelled, [v for v in np.unique(labelled[[0, 0, -1, -1], [0, -1, 0, -1]]) if v])
    film = ndimage.binary_fill_holes(largest_component(~outside))
    area = int(film.sum())
    if area < 0.25 * h * w:
        return None
    edge = film & ~ndimage.binary_erosion(film)
    ys, xs = np.nonzero(edge)
    pts = np.stack([xs, ys], 1).astype(np.float64)
    try:
        hull = pts[ConvexHull(pts).vertices]
    except (QhullError, ValueError):
        return None
    best = None
    for a, b in zip(hull, np.roll(hull, -1, axis=0)):  # the smallest box has a side on a hull edge
        t = np.arctan2(b[1] - a[1], b[0] - a[0])
        c, s = np.cos(t), np.sin(t)
        u, v = hull[:, 0] * c + hull[:, 1] * s, -hull[:, 0] * s + hull[:, 1] * c
        size = (u.max() - u.min() + 1) * (v.max() - v.min() + 1)
        if best is None or size < best[0]:
            best = (size, t)
    size, t = best
    degrees = (float(np.degrees(t)) + 45.0) % 90.0 - 45.0  # the side nearest the film's rows
    if not SKEW_MIN_DEGREES <= abs(degrees) <= SKEW_MAX_DEGREES or area < SKEW_RECTANGULAR * size:
        return None
    cy, cx = (float(v) for v in np.argwhere(film).mean(axis=0))
    rotation = (degrees, cx, cy)
    sx, sy = turn_points(xs, ys, rotation, inverse=True)
    # one pixel inside the turned rectangle's edge, so no fill is sampled
    box = (int(np.ceil(sx.min())) + 1, int(np.ceil(sy.min())) + 1, int(np.floor(sx.max())), int(np.floor(sy.max())))
    if box[2] - box[0] < 32 or box[3] - box[1] < 32:
        return None
    return Field(box, rotation)


def film_field(pixels: np.ndarray) -> Field | None:
    """Where the pipeline works on a film: upright when the film lies askew on its canvas (:func:`skewed_field`),
    else on the exposed field when flat borders take a large part of it (:func:`field_crop`), else None (whole)."""
    turned = skewed_field(pixels)
    if turned is not None:
        return turned
    box = field_crop(pixels)
    return None if box is None else Field(tuple(int(v) for v in box))
