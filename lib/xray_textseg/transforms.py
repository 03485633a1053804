"""All geometry between a radiograph and a backbone's input square, in one place.

A :class:`View` is a rectangular region of the radiograph (the whole film, or a crop around an
organ) mapped onto the model's S x S input either *letterboxed* (longest side to S, pad
bottom/right: how LiteMedSAM was trained) or *stretched* (each side to S: how MedSAM ViT-B was
trained, and what keeps long bones and clavicles from collapsing to a few pixels).
Boxes go image -> model with :meth:`View.box_to_model`; mask logits come back with
:meth:`View.logits_to_image`. Coordinates are (x, y) = (column, row) in pixels, boxes are
``[x0, y0, x1, y1]`` with x1/y1 exclusive.
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
