"""Synthetic radiographs with exact masks, for demos, smoke tests and the committed ``sample_data/`` folder.

Real radiographs with expert masks cannot be redistributed with the project, yet the MONAI Label app, the
CLI and the tests need images that look enough like a PA chest film or a long-leg film for a box-prompted
model to find the organs. These images are *drawn from* the masks (shapes -> attenuation map -> exposure),
so the masks are exact by construction and every case is reproducible from ``(seed, region, index)``.

Conventions follow the real data folders:

* images are MONOCHROME2 (bright = dense), 12-bit values in a ``uint16`` array;
* label names are anatomical, patient side: on a PA chest film the patient's left lies on the image's
  right, so ``left_lung`` is in the image's right half;
* as in the SCR chest masks, the lung masks exclude the heart, and the clavicle masks cover only the part
  of each clavicle that lies over the rib cage.

``make_sample_data`` writes ``images/<case>.png``, ``labels/<label>/<case>.png``, a few DICOM DX files
(MONOCHROME2 and its MONOCHROME1 inversion), ``manifest.json`` and ``README.md``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

if TYPE_CHECKING:
    from pydicom.dataset import FileDataset

CHEST_LABELS = ("left_lung", "right_lung", "heart", "left_clavicle", "right_clavicle")
LIMB_LABELS = ("femur", "tibia")
MAX_VALUE = 4095  # 12-bit detector range
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's root; entropy from the seed makes UIDs reproducible
CHEST_FIELD_MM = 358.4  # a PA chest film is about 36 cm across: 0.7 mm pixels at 512
LIMB_FIELD_MM = 1216.0  # hip-to-ankle film: femur ~37 % and tibia ~30 % of the height, as in OAI films
_REGION_CODES = {"chest": 0, "lower_limb": 1}

Points = np.ndarray  # (N, 2) array of x, y


@dataclass
class SyntheticCase:
    """One synthetic radiograph and the exact masks it was drawn from."""

    name: str
    image: np.ndarray  # uint16 (H, W), MONOCHROME2, 0..MAX_VALUE
    masks: dict[str, np.ndarray]  # label -> bool (H, W)
    region: str  # "chest" | "lower_limb"
    pixel_spacing_mm: tuple[float, float] = (0.7, 0.7)  # (row, column), for the DICOM header
    meta: dict[str, str] = field(default_factory=dict)  # e.g. {"laterality": "R"} for a leg


# --------------------------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Pose:
    """Places design coordinates on the pixel grid: rotate about ``pivot``, scale, move to ``origin``."""

    pivot: tuple[float, float]
    origin: tuple[float, float]
    pixels_per_unit: float
    angle_rad: float = 0.0
    mirror: bool = False  # flip design x about the pivot (a left leg drawn from the right-leg design)

    def apply(self, points: Points) -> Points:
        q = np.asarray(points, float) - np.asarray(self.pivot)
        if self.mirror:
            q = q * np.array([-1.0, 1.0])
        c, s = math.cos(self.angle_rad), math.sin(self.angle_rad)
        rotated = q @ np.array([[c, s], [-s, c]])
        return rotated * self.pixels_per_unit + np.asarray(self.origin)


def _ellipse(cx: float, cy: float, rx: float, ry: float, tilt: float = 0.0, n: int = 72) -> Points:
    """Outline of a tilted ellipse; enough vertices that the raster looks smooth at 1024 px."""
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = math.cos(tilt), math.sin(tilt)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)


def _ribbon(centre: Points, half_widths: Sequence[float] | np.ndarray) -> Points:
    """Closed outline of a band of varying width around a centre line (bone shafts, tapering parts)."""
    centre = np.asarray(centre, float)
    tangent = np.gradient(centre, axis=0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True) + 1e-12
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)
    hw = np.asarray(half_widths, float)[:, None]
    return np.concatenate([centre + normal * hw, (centre - normal * hw)[::-1]])


def _fill(points_px: Points, shape: tuple[int, int]) -> np.ndarray:
    """Rasterise a polygon given in pixel coordinates (PIL: exact, fast and deterministic)."""
    canvas = Image.new("L", (shape[1], shape[0]), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in np.asarray(points_px, float)], fill=1)
    return np.asarray(canvas, dtype=bool)


def _stroke(points_px: Points, width_px: float, shape: tuple[int, int]) -> np.ndarray:
    """Rasterise a thick polyline (ribs, clavicles, vessels) in pixel coordinates."""
    canvas = Image.new("L", (shape[1], shape[0]), 0)
    width = max(1, round(width_px))
    ImageDraw.Draw(canvas).line([tuple(p) for p in np.asarray(points_px, float)], fill=1, width=width,
                                joint="curve")
    return np.asarray(canvas, dtype=bool)


def _depth(mask: np.ndarray, scale_px: float) -> np.ndarray:
    """0 at the edge of ``mask`` rising to ~1 inside: projected thickness of a rounded object."""
    if not mask.any():
        return np.zeros(mask.shape)
    dist = ndimage.distance_transform_edt(mask)
    return np.where(mask, 1.0 - np.exp(-dist / max(scale_px, 1e-6)), 0.0)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Zero-mean, unit-amplitude low-frequency field: uneven tissue and detector response.

    Filtered on a grid 8x coarser and upsampled: the field is smooth anyway, and this is 50x cheaper.
    """
    f = 8
    coarse = rng.standard_normal((shape[0] // f + 2, shape[1] // f + 2))
    coarse = ndimage.gaussian_filter(coarse, max(sigma_px / f, 0.5), mode="reflect")
    field_ = ndimage.zoom(coarse, f, order=1)[: shape[0], : shape[1]]
    field_ = field_ - field_.mean()
    return field_ / (np.abs(field_).max() + 1e-12)


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


# --------------------------------------------------------------------------------------------- exposure


def _expose(density: np.ndarray, rng: np.random.Generator, blur_px: float, noise_sd: float) -> np.ndarray:
    """Attenuation map -> 12-bit MONOCHROME2 image with per-case exposure, unsharpness and noise.

    A log-like detector response (``1 - exp(-k D)``) with varying ``k``, gamma, gain and offset mimics
    the spread of real exposures, so consumers cannot rely on one fixed intensity scale.
    """
    k = _u(rng, 1.0, 1.5)
    gamma = _u(rng, 0.8, 1.25)
    gain = _u(rng, 0.72, 0.9)
    offset = _u(rng, 120.0, 380.0)
    blurred = ndimage.gaussian_filter(density, blur_px, mode="nearest")
    response = (1.0 - np.exp(-k * np.clip(blurred, 0.0, None))) / (1.0 - math.exp(-k * 1.8))
    signal = np.clip(response, 0.0, 1.0) ** gamma
    noise = rng.standard_normal(density.shape) * noise_sd * (0.5 + 0.5 * signal)
    image = offset + gain * MAX_VALUE * signal + noise
    return np.clip(np.rint(image), 0, MAX_VALUE).astype(np.uint16)


# --------------------------------------------------------------------------------------------- chest


@dataclass(frozen=True)
class _Lung:
    """One lung in design units (fractions of the film) for the image-left (patient right) side.

    The patient's left lung uses the same design mirrored about x = 0.5.
    """

    medial: float  # x of the mediastinal border
    lateral: float  # x of the costophrenic angle
    apex: float  # y of the apex
    angle_y: float  # y of the costophrenic angle
    base_y: float  # y where the diaphragm meets the mediastinum
    dome: float  # height of the diaphragm dome above the chord
    knob: float  # mediastinal bulge (aortic knob / SVC) pushing the medial border out


def _lung_outline(lung: _Lung, n: int = 48) -> Points:
    """Apex dome, lateral wall, costophrenic angle, diaphragm dome and mediastinal border, clockwise."""
    x_apex = lung.medial - 0.38 * (lung.medial - lung.lateral)
    s = np.linspace(0.0, 1.0, n)
    widen = np.sqrt(1.0 - (1.0 - s) ** 2) ** 1.3  # round apex, still widening down to the angle
    lateral = np.stack([x_apex - (x_apex - lung.lateral) * widen,
                        lung.apex + (lung.angle_y - lung.apex) * s], 1)
    t = np.linspace(0.0, 1.0, n)[1:]
    dome = lung.dome * np.sin(np.pi * t**0.8)  # steep at the costophrenic angle, gentle medially
    diaphragm = np.stack([lung.lateral + (lung.medial - lung.lateral) * t,
                          lung.angle_y + (lung.base_y - lung.angle_y) * t - dome], 1)
    s = np.linspace(0.0, 1.0, n)[1:-1]
    y = lung.base_y + (lung.apex - lung.base_y) * s
    curl = 1.0 - np.sqrt(np.clip(1.0 - (np.clip(s - 0.72, 0.0, None) / 0.28) ** 2, 0.0, 1.0))
    knob = lung.knob * np.exp(-(((y - 0.30) / 0.06) ** 2))
    medial = np.stack([lung.medial + knob - (lung.medial + knob - x_apex) * curl, y], 1)
    return np.concatenate([lateral, diaphragm, medial])


def _lung_lateral_x(lung: _Lung, y: float) -> float:
    """Lateral wall x at height y (to end the ribs at the chest wall)."""
    outline = _lung_outline(lung)[:48]
    return float(np.interp(y, outline[:, 1], outline[:, 0]))


def _mirror(points: Points) -> Points:
    return np.asarray(points, float) * np.array([-1.0, 1.0]) + np.array([1.0, 0.0])


@dataclass(frozen=True)
class _ChestDesign:
    right: _Lung  # patient right = image left
    left: _Lung  # patient left, designed on the image-left side, mirrored when drawn
    heart_c: tuple[float, float]
    heart_r: tuple[float, float, float]  # towards image left, towards image right, vertical
    heart_tilt: float
    clavicle_y: tuple[float, float]  # medial, lateral end heights
    rib_y0: float
    rib_step: float
    gastric_bubble: bool


def _sample_chest_design(rng: np.random.Generator) -> _ChestDesign:
    """Per-case anatomy: lung sizes (with left/right asymmetry), diaphragm levels, heart size."""
    heart_c = (_u(rng, 0.52, 0.55), _u(rng, 0.58, 0.62))
    heart_r = (_u(rng, 0.12, 0.15), _u(rng, 0.18, 0.25), _u(rng, 0.13, 0.16))
    heart_bottom = heart_c[1] + 0.75 * heart_r[2]
    apex = _u(rng, 0.08, 0.12)
    angle_y = _u(rng, 0.74, 0.82)
    right = _Lung(medial=_u(rng, 0.44, 0.46), lateral=_u(rng, 0.09, 0.14), apex=apex, angle_y=angle_y,
                  base_y=angle_y - _u(rng, 0.06, 0.09), dome=_u(rng, 0.07, 0.10), knob=_u(rng, 0.0, 0.012))
    base_y = heart_bottom + _u(rng, -0.01, 0.01)  # the heart rests on the medial left hemidiaphragm
    left = _Lung(medial=_u(rng, 0.44, 0.46), lateral=_u(rng, 0.09, 0.14), apex=apex + _u(rng, -0.01, 0.01),
                 angle_y=max(angle_y + _u(rng, 0.01, 0.05), base_y + 0.03), base_y=base_y,
                 dome=_u(rng, 0.05, 0.08), knob=_u(rng, 0.01, 0.025))
    return _ChestDesign(
        right=right, left=left, heart_c=heart_c, heart_r=heart_r, heart_tilt=_u(rng, 0.05, 0.2),
        clavicle_y=(_u(rng, 0.17, 0.21), _u(rng, 0.09, 0.12)),
        rib_y0=_u(rng, 0.12, 0.14), rib_step=_u(rng, 0.052, 0.06),
        gastric_bubble=bool(rng.random() < 0.7),
    )


def _heart_outline(d: _ChestDesign, n: int = 96) -> Points:
    """Egg-shaped heart bulging to the image right (the patient's left), apex tilted down-right."""
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    rx = np.where(np.cos(t) > 0, d.heart_r[1], d.heart_r[0])
    ry = np.where(np.sin(t) > 0, 0.75 * d.heart_r[2], d.heart_r[2])  # flatter where it sits on the diaphragm
    x, y = rx * np.cos(t), ry * np.sin(t)
    y = y + d.heart_tilt * np.clip(x, 0.0, None)  # the apex drops towards the image right
    return np.stack([d.heart_c[0] + x, d.heart_c[1] + y], 1)


def _body_outline() -> Points:
    """Neck, shoulders running off the film, flanks narrowing towards the abdomen."""
    half = [(-0.02, 0.08), (0.04, 0.085), (0.07, 0.11), (0.09, 0.20), (0.11, 0.30), (0.14, 0.38),
            (0.18, 0.43), (0.24, 0.46), (0.32, 0.47), (0.55, 0.455), (0.80, 0.43), (1.3, 0.42)]
    right = [(0.5 - hw, y) for y, hw in half]
    left = [(0.5 + hw, y) for y, hw in reversed(half)]
    return np.array(right + left)


def _clavicle_line(d: _ChestDesign, side: int, n: int = 24) -> Points:
    """S-shaped clavicle from the sternal end out and up to the shoulder; side -1 = image left."""
    t = np.linspace(0.0, 1.0, n)
    x = 0.5 + side * (0.04 + 0.30 * t)
    y = d.clavicle_y[0] + (d.clavicle_y[1] - d.clavicle_y[0]) * t + 0.012 * np.sin(2.0 * np.pi * t)
    return np.stack([x, y], 1)


def _posterior_rib(d: _ChestDesign, k: int, side: int, n: int = 28) -> Points:
    """Posterior rib k: leaves the spine, arches up and out, then bends down along the chest wall."""
    lung = d.right if side < 0 else d.left
    y0 = d.rib_y0 + k * d.rib_step
    wall = abs(0.5 - _lung_lateral_x(lung, y0 + 0.05)) + 0.02
    t = np.linspace(0.0, 1.0, n)
    x = 0.5 + side * (0.03 + (wall - 0.03) * np.sin(0.5 * np.pi * t))
    y = y0 - 0.035 * np.sin(np.pi * t) + (0.10 + 0.006 * k) * t**2.5
    return np.stack([x, y], 1)


def _anterior_rib(d: _ChestDesign, k: int, side: int, n: int = 16) -> Points:
    """Fainter anterior rib: from the lateral wall obliquely down towards the sternum."""
    lung = d.right if side < 0 else d.left
    y0 = d.rib_y0 + k * d.rib_step + 0.05
    wall = abs(0.5 - _lung_lateral_x(lung, y0)) + 0.01
    t = np.linspace(0.0, 1.0, n)
    x = 0.5 + side * (wall - (wall - 0.12) * t)
    y = y0 + 0.10 * t + 0.03 * np.sin(np.pi * t)
    return np.stack([x, y], 1)


def _vessels(rng: np.random.Generator, side: int, n_branches: int = 7) -> list[Points]:
    """Random walks from the hilum outwards: faint vascular markings inside the lung."""
    hilum = np.array([0.5 + side * 0.09, 0.40])
    branches = []
    for _ in range(n_branches):
        angle = _u(rng, -1.2, 1.3) + (0.0 if side > 0 else np.pi)
        pts = [hilum + rng.normal(0.0, 0.01, 2)]
        for step in range(6):
            angle += rng.normal(0.0, 0.25)
            length = 0.035 * (1.0 - 0.08 * step)
            pts.append(pts[-1] + length * np.array([math.cos(angle), math.sin(angle)]))
        branches.append(np.array(pts))
    return branches


def _chest_pose(rng: np.random.Generator, size: int) -> _Pose:
    """Patient size, centring and tilt vary a few percent and degrees from film to film."""
    return _Pose(pivot=(0.5, 0.5), pixels_per_unit=size * _u(rng, 0.93, 1.04),
                 origin=(size * (0.5 + _u(rng, -0.02, 0.02)), size * (0.5 + _u(rng, -0.025, 0.025))),
                 angle_rad=math.radians(_u(rng, -3.0, 3.0)))


def _chest_masks(d: _ChestDesign, pose: _Pose, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """Exact label masks plus the helper shapes (full lungs, thorax) the image is drawn from."""
    right_full = _fill(pose.apply(_lung_outline(d.right)), shape)
    left_full = _fill(pose.apply(_mirror(_lung_outline(d.left))), shape)
    heart = _fill(pose.apply(_heart_outline(d)), shape)
    rib_cage = ndimage.distance_transform_edt(~(right_full | left_full)) <= 0.035 * pose.pixels_per_unit
    width = 0.03 * pose.pixels_per_unit
    clav_r = _stroke(pose.apply(_clavicle_line(d, -1)), width, shape)
    clav_l = _stroke(pose.apply(_clavicle_line(d, +1)), width, shape)
    return {
        "right_lung": right_full & ~heart, "left_lung": left_full & ~heart, "heart": heart,
        "right_clavicle": clav_r & rib_cage, "left_clavicle": clav_l & rib_cage,
        "_lungs_full": right_full | left_full, "_clavicles_full": clav_r | clav_l,
    }


def _chest_bones(d: _ChestDesign, pose: _Pose, shape: tuple[int, int]) -> np.ndarray:
    """Ribs (posterior brighter with a cortical rim, anterior fainter), spine and shoulder girdle."""
    ppu = pose.pixels_per_unit
    bone = np.zeros(shape)
    for side in (-1, 1):
        for k in range(10):
            rib = pose.apply(_posterior_rib(d, k, side))
            bone += 0.075 * _stroke(rib, 0.018 * ppu, shape) - 0.03 * _stroke(rib, 0.008 * ppu, shape)
            if k < 7:
                bone += 0.03 * _stroke(pose.apply(_anterior_rib(d, k, side)), 0.02 * ppu, shape)
        humeral_head = _ellipse(0.5 + side * 0.48, 0.20, 0.065, 0.07)
        bone += 0.18 * _fill(pose.apply(humeral_head), shape)
        bone += 0.12 * _fill(pose.apply(_ellipse(0.5 + side * 0.38, 0.26, 0.07, 0.13, side * 0.3)), shape)
    y = np.linspace(-0.2, 1.2, 60)
    spine = _fill(pose.apply(_ribbon(np.stack([np.full_like(y, 0.5), y], 1), np.full_like(y, 0.028))), shape)
    rows = (np.arange(shape[0]) / (0.045 * ppu))[:, None]
    bone += spine * (0.10 + 0.05 * (np.cos(2.0 * np.pi * rows) > 0.75))  # vertebral end plates
    return bone


def _chest_density(d: _ChestDesign, pose: _Pose, masks: dict[str, np.ndarray], rng: np.random.Generator,
                   shape: tuple[int, int]) -> np.ndarray:
    """Attenuation map: soft tissue, minus lung air, plus heart, mediastinum, bones and vessels."""
    ppu = pose.pixels_per_unit
    body = _fill(pose.apply(_body_outline()), shape)
    density = 1.0 * np.sqrt(_depth(body, 0.12 * ppu))
    density *= 1.0 + 0.06 * _smooth_noise(rng, shape, 0.08 * ppu)
    lungs, heart = masks["_lungs_full"], masks["heart"]
    air = np.where(heart, 0.3, 1.0) * lungs  # the heart displaces most of the lung in front of and behind it
    density -= air * 0.62 * (0.55 + 0.45 * _depth(lungs, 0.05 * ppu))
    density += 0.15 * heart * (0.6 + 0.4 * _depth(heart, 0.04 * ppu))
    y = np.linspace(-0.1, 0.55, 40)
    mediastinum = _ribbon(np.stack([0.5 + 0.012 * np.sin(6.0 * y), y], 1), 0.055 + 0.025 * (y > 0.25))
    mediastinum_mask = _fill(pose.apply(mediastinum), shape).astype(float)
    density += 0.18 * ndimage.gaussian_filter(mediastinum_mask, 0.006 * ppu)
    trachea = _ribbon(np.array([[0.5, -0.1], [0.5, 0.15], [0.505, 0.33]]), [0.018, 0.018, 0.016])
    density -= 0.12 * _fill(pose.apply(trachea), shape)
    if d.gastric_bubble:
        bubble = _ellipse(0.64, d.left.angle_y - d.left.dome * 0.4 + 0.04, 0.05, 0.025)
        density -= 0.25 * (_fill(pose.apply(bubble), shape) & ~lungs)
    for side in (-1, 1):
        for branch in _vessels(rng, side):
            density += 0.05 * (_stroke(pose.apply(branch), max(1.0, 0.004 * ppu), shape) & lungs)
    density += _chest_bones(d, pose, shape)
    density += 0.38 * masks["_clavicles_full"]
    return np.clip(density * body, 0.0, None)


def synth_chest(rng: np.random.Generator, size: int = 512) -> SyntheticCase:
    """A PA chest film (size x size) with the five SCR-style labels; ``name`` is left for the caller."""
    shape = (size, size)
    design = _sample_chest_design(rng)
    pose = _chest_pose(rng, size)
    masks = _chest_masks(design, pose, shape)
    density = _chest_density(design, pose, masks, rng, shape)
    image = _expose(density, rng, blur_px=_u(rng, 0.5, 1.2) * size / 512, noise_sd=_u(rng, 6.0, 12.0))
    spacing = CHEST_FIELD_MM / size
    return SyntheticCase(name="", image=image, masks={k: masks[k] for k in CHEST_LABELS}, region="chest",
                         pixel_spacing_mm=(spacing, spacing), meta={"body_part": "CHEST", "view": "PA"})


# --------------------------------------------------------------------------------------------- lower limb
# Design units are millimetres for a right leg seen AP: x grows towards the image right (the patient's
# midline, i.e. medial), y grows downwards, the origin is the centre of the knee joint line.


@dataclass(frozen=True)
class _LimbDesign:
    head_r: float  # femoral head radius
    shaft_w: float  # femoral shaft half-width
    condyle_w: float  # half-width of the distal femur
    tibia_w: float  # tibial shaft half-width
    neck_drop: float  # how far the neck falls from the head to the trochanter
    gap: float  # joint space between condyles and plateau
    varus: float  # radians the shank is angled relative to the thigh
    fibula: bool


def _sample_limb_design(rng: np.random.Generator) -> _LimbDesign:
    return _LimbDesign(head_r=_u(rng, 21.0, 25.0), shaft_w=_u(rng, 13.0, 16.0), condyle_w=_u(rng, 38.0, 45.0),
                       tibia_w=_u(rng, 11.0, 13.5), neck_drop=_u(rng, 25.0, 40.0), gap=_u(rng, 4.0, 7.0),
                       varus=math.radians(_u(rng, -3.0, 3.0)), fibula=bool(rng.random() < 0.85))


def _femur_parts(d: _LimbDesign) -> list[Points]:
    """Head, neck, greater and lesser trochanter, shaft, metaphyseal flare and two condyles."""
    head = (20.0, -432.0)
    troch = (-40.0, -432.0 + d.neck_drop)
    neck = _ribbon(np.array([head, troch]), [0.7 * d.head_r, 0.85 * d.head_r])
    cw = d.condyle_w
    y = np.linspace(-415.0, -30.0, 48)
    s = (y + 415.0) / 385.0
    axis_x = -32.0 + 32.0 * s - 6.0 * np.sin(np.pi * s)  # oblique towards the knee, slightly bowed
    waisted = d.shaft_w * (1.0 + 0.12 * ((y + 250.0) / 160.0) ** 2)
    flare = d.shaft_w + (cw - d.shaft_w) * np.exp(-(((y + 30.0) / 45.0) ** 2))  # metaphysis widening
    shaft = _ribbon(np.stack([axis_x, y], 1), np.maximum(waisted, flare))
    return [_ellipse(*head, d.head_r, d.head_r), neck, _ellipse(*troch, 22.0, 30.0),
            _ellipse(-10.0, troch[1] + 50.0, 11.0, 12.0), shaft,
            _ellipse(cw / 2.2, -26.0, cw / 1.8, 24.0 - d.gap / 2.0),
            _ellipse(-cw / 2.2, -26.0, cw / 1.8, 24.0 - d.gap / 2.0)]


def _tibia_parts(d: _LimbDesign) -> list[Points]:
    """Plateau flaring concavely into the shaft, distal flare and medial malleolus."""
    top = d.gap / 2.0
    pw = d.condyle_w - 2.0
    y = np.linspace(top + 6.0, 330.0, 40)
    half = d.tibia_w + (pw - d.tibia_w) * np.exp(-(np.clip(y - top - 6.0, 0.0, None) / 38.0) ** 1.3)
    body = _ribbon(np.stack([np.full_like(y, 1.0), y], 1), half)
    plateau = np.array([[-pw, top + 7.0], [-pw + 3.0, top + 1.0], [-10.0, top], [-3.0, top - 4.0],
                        [3.0, top - 4.0], [10.0, top], [pw - 3.0, top + 1.0], [pw, top + 7.0]])
    distal = np.array([[-d.tibia_w, 320.0], [d.tibia_w, 320.0], [24.0, 362.0], [23.0, 390.0], [15.0, 392.0],
                       [13.0, 374.0], [-20.0, 374.0], [-22.0, 362.0]])
    return [plateau, body, distal]


@dataclass(frozen=True)
class _Part:
    """An unlabelled bone: outline, density, and whether it is a filled shape or a stroked line."""

    points: Points
    density: float
    stroke_mm: float = 0.0


def _other_leg_bones(d: _LimbDesign) -> list[_Part]:
    """Fibula, patella, hip bone around the femoral head, ankle and foot (none of them labelled)."""
    parts = [
        _Part(_ellipse(0.0, -38.0, 22.0, 27.0), 0.12),  # patella, seen through the femur
        _Part(_ellipse(30.0, -600.0, 95.0, 150.0, 0.35), 0.07),  # iliac wing
        _Part(_ellipse(20.0, -438.0, 33.0, 33.0)[30:66], 0.35, stroke_mm=6.0),  # acetabular roof
        _Part(_ellipse(80.0, -395.0, 40.0, 48.0, -0.3), 0.22),  # ischium and pubis ...
        _Part(_ellipse(82.0, -392.0, 20.0, 28.0, -0.3), -0.16),  # ... around the obturator foramen
        _Part(_ellipse(0.0, 400.0, 30.0, 20.0), 0.32),  # talus
        _Part(_ellipse(-5.0, 425.0, 32.0, 18.0), 0.25),  # calcaneus seen end-on
    ]
    if d.fibula:
        y = np.linspace(45.0, 360.0, 20)
        shaft = _ribbon(np.stack([-36.0 + 6.0 * (y - 45.0) / 315.0, y], 1), np.linspace(6.0, 5.0, 20))
        parts += [_Part(_ellipse(-36.0, 38.0, 11.0, 13.0), 0.35), _Part(shaft, 0.4),
                  _Part(_ellipse(-31.0, 378.0, 10.0, 18.0), 0.35)]
    return parts


def _leg_outline() -> Points:
    """Soft-tissue silhouette: trunk above the groin, thigh, knee, calf, ankle and foot."""
    lateral = [(-95, -760), (-100, -520), (-95, -400), (-85, -250), (-70, -100), (-60, -20), (-60, 40),
               (-57, 120), (-50, 220), (-40, 320), (-36, 380), (-42, 445)]
    medial = [(42, 445), (32, 380), (30, 320), (42, 200), (48, 120), (45, 40), (45, -20), (48, -100),
              (55, -250), (65, -340), (80, -400), (110, -430), (160, -445), (300, -450), (300, -760)]
    return np.array(lateral + medial, float)


def _limb_pose(rng: np.random.Generator, height: int, width: int) -> tuple[_Pose, float]:
    """Isotropic pixels sized so hip to ankle fills the film; leg side, centring and tilt vary."""
    spacing = LIMB_FIELD_MM / height / _u(rng, 0.94, 1.05)
    pose = _Pose(pivot=(0.0, 0.0), pixels_per_unit=1.0 / spacing,
                 origin=(width * (0.5 + _u(rng, -0.05, 0.05)), height * _u(rng, 0.56, 0.59)),
                 angle_rad=math.radians(_u(rng, -2.0, 2.0)), mirror=bool(rng.random() < 0.5))
    return pose, LIMB_FIELD_MM / height


def _union(parts: list[Points], pose: _Pose, shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for part in parts:
        mask |= _fill(pose.apply(part), shape)
    return mask


def _bone_density(mask: np.ndarray, cortex_px: float) -> np.ndarray:
    """Bright cortex fading to a darker medullary canal: brightest at the bone edge."""
    if not mask.any():
        return np.zeros(mask.shape)
    dist = ndimage.distance_transform_edt(mask)
    return np.where(mask, 0.35 + 0.55 * np.exp(-(dist - 1.0).clip(0.0) / cortex_px), 0.0)


def _shank_pose(pose: _Pose, d: _LimbDesign) -> _Pose:
    """The tibia and fibula pivot at the knee by the varus/valgus angle."""
    return replace(pose, angle_rad=pose.angle_rad + d.varus)


def synth_lower_limb(rng: np.random.Generator, height: int = 512, width: int = 128) -> SyntheticCase:
    """A long-leg AP film (height x width, one leg hip to ankle) with femur and tibia masks."""
    shape = (height, width)
    design = _sample_limb_design(rng)
    pose, spacing = _limb_pose(rng, height, width)
    shank = _shank_pose(pose, design)
    femur = _union(_femur_parts(design), pose, shape)
    tibia = _union(_tibia_parts(design), shank, shape)
    tibia &= ~femur  # a 1-px touch at a steep varus angle must not make the labels overlap
    px = pose.pixels_per_unit
    leg = _fill(pose.apply(_leg_outline()), shape)
    density = 0.45 * np.sqrt(_depth(leg, 30.0 * px)) * (1.0 + 0.05 * _smooth_noise(rng, shape, 40.0 * px))
    density += _bone_density(femur, 3.0 * px) + _bone_density(tibia, 3.0 * px)
    for part in _other_leg_bones(design):
        at = (shank if part.points[:, 1].mean() > 0 else pose).apply(part.points)
        drawn = _stroke(at, part.stroke_mm * px, shape) if part.stroke_mm else _fill(at, shape)
        density += part.density * drawn
    image = _expose(density * leg, rng, blur_px=_u(rng, 0.4, 0.9) * height / 512, noise_sd=_u(rng, 6.0, 12.0))
    side = "L" if pose.mirror else "R"
    return SyntheticCase(name="", image=image, masks={"femur": femur, "tibia": tibia}, region="lower_limb",
                         pixel_spacing_mm=(spacing, spacing), meta={"body_part": "LEG", "view": "AP",
                                                                    "laterality": side})


# --------------------------------------------------------------------------------------------- writing


def case_rng(seed: int, region: str, index: int) -> np.random.Generator:
    """Each case has its own stream, so chest_003 is the same whatever the requested counts."""
    return np.random.default_rng(np.random.SeedSequence([seed, _REGION_CODES[region], index]))


def generate_cases(n_chest: int = 12, n_limb: int = 12, seed: int = 0, chest_size: int = 512,
                   limb_shape: tuple[int, int] = (512, 128)) -> list[SyntheticCase]:
    """All cases of a sample set, named ``chest_000``... then ``limb_000``..."""
    chest = [replace(synth_chest(case_rng(seed, "chest", i), chest_size), name=f"chest_{i:03d}")
             for i in range(n_chest)]
    limb = [replace(synth_lower_limb(case_rng(seed, "lower_limb", i), *limb_shape), name=f"limb_{i:03d}")
            for i in range(n_limb)]
    return chest + limb


def window(image: np.ndarray) -> tuple[float, float]:
    """(center, width) covering the image's full range: the default VOI for the PNG and the DICOM."""
    lo, hi = float(image.min()), float(image.max())
    return (lo + hi) / 2.0, max(hi - lo, 1.0) + 1.0


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Window a 12-bit MONOCHROME2 image to 8-bit for PNG (the form the MONAI Label server opens)."""
    center, width = window(image)
    lo = center - (width - 1.0) / 2.0
    scaled = (image.astype(np.float64) - lo) / max(width - 1.0, 1.0) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _write_png(path: Path, array: np.ndarray) -> None:
    """8-bit grayscale PNG with no metadata, so equal arrays give equal bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode="L").save(path, format="PNG", compress_level=9)


def _uid(seed: int, *parts: str) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(prefix=UID_PREFIX, entropy_srcs=["xray_textseg-sample-data", str(seed), *parts])


def dicom_dataset(case: SyntheticCase, photometric: str, seed: int = 0) -> FileDataset:
    """A DICOM DX 'For Presentation' dataset of ``case``; MONOCHROME1 stores ``4095 - image``.

    Both files of a case share patient and study; each photometric interpretation is its own series,
    so a viewer or reader that mishandles MONOCHROME1 shows an inverted image next to a correct one.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, not {photometric!r}")
    pixels = case.image if photometric == "MONOCHROME2" else (MAX_VALUE - case.image.astype(np.int32))
    pixels = np.ascontiguousarray(pixels, dtype=np.uint16)
    sop_uid = _uid(seed, case.name, photometric, "sop")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(f"{case.name}.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.is_little_endian, ds.is_implicit_VR = True, False
    _fill_dicom_header(ds, case, photometric, seed, sop_uid)
    center, width = window(pixels)
    ds.WindowCenter, ds.WindowWidth = f"{center:.1f}", f"{width:.1f}"
    ds.PixelData = pixels.tobytes()
    return ds


def _fill_dicom_header(ds: FileDataset, case: SyntheticCase, photometric: str, seed: int,
                       sop_uid: str) -> None:
    """Patient/study/series/image attributes of a DX image; fixed dates keep the files reproducible."""
    number = "2" if photometric == "MONOCHROME1" else "1"
    ds.SOPClassUID, ds.SOPInstanceUID = DX_FOR_PRESENTATION, sop_uid
    ds.StudyInstanceUID = _uid(seed, case.name, "study")
    ds.SeriesInstanceUID = _uid(seed, case.name, photometric, "series")
    ds.FrameOfReferenceUID = _uid(seed, case.name, "frame")
    ds.PatientName, ds.PatientID = f"SYNTHETIC^{case.name.upper()}", f"SYN-{case.name}"
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
    ds.SeriesNumber, ds.InstanceNumber = number, "1"
    ds.Modality, ds.Manufacturer = "DX", "xray_textseg synthetic"
    ds.SeriesDescription = f"synthetic {case.region} {photometric}"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BodyPartExamined = case.meta.get("body_part", "CHEST" if case.region == "chest" else "LEG")
    ds.ViewPosition = case.meta.get("view", "PA")
    ds.ImageLaterality = case.meta.get("laterality", "U")
    ds.PatientOrientation = ["L", "F"]  # shown facing the viewer: image right = patient left
    ds.PixelSpacing = ds.ImagerPixelSpacing = [f"{s:.4f}" for s in case.pixel_spacing_mm]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.Rows, ds.Columns = case.image.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1 if photometric == "MONOCHROME1" else -1
    ds.VOILUTFunction = "LINEAR"
    ds.BurnedInAnnotation, ds.LossyImageCompression = "NO", "00"


def write_dicom(case: SyntheticCase, path: str | Path, photometric: str = "MONOCHROME2",
                seed: int = 0) -> Path:
    """Write ``case`` as a DICOM Part 10 file (preamble, explicit VR little endian)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dicom_dataset(case, photometric, seed).save_as(path, write_like_original=False)
    return path


def _dicom_cases(cases: list[SyntheticCase], n_dicom: int) -> list[SyntheticCase]:
    """``n_dicom // 2`` cases get a MONOCHROME2 + MONOCHROME1 pair, alternating chest and leg."""
    chest = [c for c in cases if c.region == "chest"]
    limb = [c for c in cases if c.region == "lower_limb"]
    interleaved = [c for pair in zip(chest, limb, strict=False) for c in pair]
    interleaved += chest[len(limb):] + limb[len(chest):]
    return interleaved[: max(n_dicom, 0) // 2]


def _clear_previous(out: Path) -> None:
    """Remove files of an earlier run (only our own names), so the folder matches the new manifest."""
    patterns = ["images/chest_*.png", "images/limb_*.png"]
    patterns += ["dicom/chest_*_mono?.dcm", "dicom/limb_*_mono?.dcm"]
    patterns += [f"labels/{label}/{prefix}_*.png" for label in CHEST_LABELS + LIMB_LABELS
                 for prefix in ("chest", "limb")]
    for pattern in patterns:
        for stale in sorted(out.glob(pattern)):
            stale.unlink()


def _readme(seed: int, n_chest: int, n_limb: int, dicom_files: list[str]) -> str:
    return f"""# Synthetic sample data

Synthetic radiographs with exact masks, generated by `xray-textseg make-sample-data`
(seed {seed}: {n_chest} chest cases, {n_limb} lower-limb cases, {len(dicom_files)} DICOM files).
No patient data: every image is drawn from the masks (shapes -> attenuation map -> exposure, blur, noise),
so the masks are exact and the folder can be regenerated byte for byte with the same seed:
`xray-textseg make-sample-data --out sample_data --seed {seed} --n-chest {n_chest} --n-limb {n_limb} \
--n-dicom {len(dicom_files)}` (or `python -m xray_textseg.sample_data` with the same options).

Layout (the same as the real data folders):

- `images/<case>.png`: 8-bit grayscale, windowed from a 12-bit MONOCHROME2 image (bright = dense).
  Open these with the MONAI Label server: `--studies sample_data/images`.
- `labels/<label>/<case>.png`: 0/255, same size as the image, one folder per label.
  Chest (512x512, PA): `left_lung`, `right_lung`, `heart`, `left_clavicle`, `right_clavicle`.
  Lower limb (512x128, AP long-leg film, one leg hip to ankle): `femur`, `tibia`.
- `dicom/<case>_mono2.dcm` and `<case>_mono1.dcm`: DICOM DX (For Presentation), 16-bit with 12 bits
  stored; `mono1` is the MONOCHROME1 inversion (4095 - pixel) of `mono2`, whose pixels the PNG windows.
  Files: {", ".join(f"`{name}`" for name in dicom_files) or "none"}.
- `manifest.json`: every case with its region, labels, image size and pixel spacing.

Label names are **patient side**: on a PA chest film the patient's left is on the image's right, so
`left_lung` and `left_clavicle` lie in the image's right half. As in the SCR chest masks, the lung masks
exclude the heart and the clavicle masks cover only the part of each clavicle over the rib cage.
"""


def make_sample_data(out_dir: str | Path, n_chest: int = 12, n_limb: int = 12, n_dicom: int = 4,
                     seed: int = 0) -> dict:
    """Generate and write a sample set; returns a summary (counts, files, bytes)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear_previous(out)
    cases = generate_cases(n_chest, n_limb, seed)
    entries = []
    for case in cases:
        _write_png(out / "images" / f"{case.name}.png", to_uint8(case.image))
        for label, mask in case.masks.items():
            _write_png(out / "labels" / label / f"{case.name}.png", mask.astype(np.uint8) * 255)
        entries.append({"name": case.name, "region": case.region, "labels": list(case.masks),
                        "image": f"images/{case.name}.png", "height": int(case.image.shape[0]),
                        "width": int(case.image.shape[1]),
                        "pixel_spacing_mm": [round(s, 4) for s in case.pixel_spacing_mm], "dicom": []})
    by_name = {e["name"]: e for e in entries}
    dicom_files = []
    for case in _dicom_cases(cases, n_dicom):
        for photometric, suffix in (("MONOCHROME2", "mono2"), ("MONOCHROME1", "mono1")):
            rel = f"dicom/{case.name}_{suffix}.dcm"
            write_dicom(case, out / rel, photometric, seed)
            by_name[case.name]["dicom"].append(rel)
            dicom_files.append(rel)
    manifest = {"generator": "xray-textseg make-sample-data", "seed": seed, "synthetic": True,
                "label_side": "patient", "photometric": "MONOCHROME2", "bits_stored": 12, "cases": entries}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "README.md").write_text(_readme(seed, n_chest, n_limb, dicom_files))
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"out_dir": str(out), "seed": seed, "n_chest": n_chest, "n_limb": n_limb,
            "n_dicom": len(dicom_files), "dicom": dicom_files, "total_bytes": total}


def main(argv: list[str] | None = None) -> int:
    """``python -m xray_textseg.sample_data --out sample_data`` (also ``xray-textseg make-sample-data``)."""
    parser = argparse.ArgumentParser(prog="xray-textseg make-sample-data",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="sample_data")
    parser.add_argument("--n-chest", type=int, default=12)
    parser.add_argument("--n-limb", type=int, default=12)
    parser.add_argument("--n-dicom", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = make_sample_data(args.out, n_chest=args.n_chest, n_limb=args.n_limb, n_dicom=args.n_dicom,
                               seed=args.seed)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
