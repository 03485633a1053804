"""Geometry between the radiograph and the model square: boxes and masks must agree."""

import numpy as np
import pytest
import torch
from conftest import real_dir
from xray_textseg.io import load_radiograph
from xray_textseg.transforms import (View, exposed_field, field_crop, film_field, largest_component, mask_box,
                                     skewed_field)


@pytest.mark.parametrize("stretch", [False, True])
def test_box_and_mask_round_trip(stretch):
    h, w = 300, 200
    view = View.full((h, w), 256, stretch)
    box = np.array([40, 60, 120, 250])
    mb = view.box_to_model(box)
    # a model-space mask that is exactly the model-space box must come back as (about) the image box
    low = torch.full((1, 1, 256, 256), -10.0)
    x0, y0, x1, y1 = (int(round(v)) for v in mb)
    low[0, 0, y0:y1, x0:x1] = 10.0
    mask = view.logits_to_image(low)[0].numpy() > 0
    got = mask_box(mask)
    assert got is not None
    assert np.abs(np.array(got) - box).max() <= 3


def test_letterbox_keeps_aspect_and_pads():
    view = View.full((100, 400), 256, stretch=False)
    assert view.valid_shape == (64, 256)
    x = view.model_input(np.random.default_rng(0).random((100, 400)).astype(np.float32))
    assert x.shape == (1, 3, 256, 256)
    assert float(x[:, :, 64:].abs().max()) == 0.0  # padding
    assert 0.0 <= float(x.min()) and float(x.max()) == pytest.approx(1.0)


def test_crop_view_is_stretched_and_clamped():
    view = View.crop((100, 400), [380, -5, 420, 50], 256, margin=0.1)
    x0, y0, x1, y1 = view.box
    assert x0 >= 0 and y0 == 0 and x1 == 400 and y1 <= 100
    assert view.stretch and view.valid_shape == (256, 256)


def test_crop_logits_land_inside_the_crop_only():
    view = View.crop((200, 200), [50, 50, 100, 150], 256, margin=0.0)
    out = view.logits_to_image(torch.full((1, 1, 256, 256), 5.0))[0].numpy() > 0
    assert mask_box(out) == (50, 50, 100, 150)


def test_largest_component():
    m = np.zeros((20, 20), bool)
    m[1:3, 1:3] = True
    m[10:18, 10:18] = True
    kept = largest_component(m)
    assert kept[12, 12] and not kept[1, 1]
    assert mask_box(np.zeros((5, 5), bool)) is None


def _film(h=400, w=300, seed=0):
    """Textured pixels: every row and column varies (no flat border of its own)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    return (120 + 60 * np.sin(xx / 17.0) * np.cos(yy / 23.0) + rng.normal(0, 8, (h, w))).astype(np.float32)


@pytest.mark.parametrize("value", [0.0, 255.0])
def test_the_exposed_field_is_the_film_without_its_flat_borders(value):
    film = _film()
    padded = np.pad(film, ((30, 50), (200, 10)), constant_values=value)  # black padding or a bright band
    assert exposed_field(padded) == (200, 30, 500, 430)
    assert field_crop(padded) == (200, 30, 500, 430)  # 40 % of the width is border: the pipeline crops
    assert exposed_field(film) == (0, 0, 300, 400) and field_crop(film) is None
    # a narrow border (under FIELD_CROP of each side) is found but left on the film
    slim = np.pad(film, ((10, 10), (5, 5)), constant_values=value)
    assert exposed_field(slim) == (5, 10, 305, 410) and field_crop(slim) is None
    # cropping is idempotent: the field of the field is all of it
    x0, y0, x1, y1 = field_crop(padded)
    assert field_crop(padded[y0:y1, x0:x1]) is None


def test_a_nearly_blank_film_is_not_cropped_to_a_sliver():
    blank = np.zeros((300, 300), np.float32)
    assert exposed_field(blank) == (0, 0, 300, 300)
    sliver = blank.copy()
    sliver[:, 140:150] = _film(300, 10)  # only 10 of 300 columns vary: under FIELD_MIN of the width
    assert exposed_field(sliver) == (0, 0, 300, 300) and field_crop(sliver) is None


def test_the_development_films_are_used_whole():
    """Every adapter so far trained on these films whole (JSRT's borders take up to 2 % of the height, the OAI
    films' padding 12-13 %): neither the field crop nor the skew check may change them."""
    for name in ("jsrt_chest", "oai_lower_limb"):
        for path in sorted((real_dir(name) / "images").glob("*.png")):
            pixels = load_radiograph(path).pixels
            assert field_crop(pixels) is None and film_field(pixels) is None, path.name


def _askew(film: np.ndarray, degrees: float, fill: float = 0.0) -> np.ndarray:
    from scipy import ndimage

    return ndimage.rotate(film, degrees, reshape=True, order=1, mode="constant", cval=fill)


@pytest.mark.parametrize("degrees,fill", [(7.0, 0.0), (-12.0, 255.0), (3.0, 0.0)])
def test_a_film_lying_askew_on_its_canvas_is_turned_upright(degrees, fill):
    """A film scanned or exported askew: a turned rectangle with the canvas's fill in the corners. The field is the
    film upright (its pixels match the film's), and masks go to the field and back unchanged."""
    film = _film(400, 160)  # a narrow film, like a long-leg one
    canvas = _askew(film, degrees, fill)
    field = skewed_field(canvas)
    assert field is not None and field.rotation is not None
    assert abs(abs(field.rotation[0]) - abs(degrees)) < 0.3
    h, w = field.shape
    assert 400 - 6 <= h <= 400 and 160 - 6 <= w <= 160
    upright = field.pixels(canvas)
    # the field is the film, less a pixel or two at its edges (where the canvas's fill was blended in)
    dy, dx = (400 - h) // 2, (160 - w) // 2
    assert np.corrcoef(upright.ravel(), film[dy:dy + h, dx:dx + w].ravel())[0, 1] > 0.97
    assert film_field(canvas) == field
    mask = np.zeros(canvas.shape, bool)
    cy, cx = canvas.shape[0] // 2, canvas.shape[1] // 2
    mask[cy - 60:cy + 80, cx - 20:cx + 30] = True
    back = field.mask_to_film(field.mask_from_film(mask), canvas.shape)
    assert 2 * (back & mask).sum() / (back.sum() + mask.sum()) > 0.99
    # a box drawn on the canvas lands on the same place of the field
    b = field.box_from_film([cx - 20, cy - 60, cx + 30, cy + 80])
    inside = field.mask_from_film(mask)
    ys, xs = np.nonzero(inside)
    assert abs(b[0] - xs.min()) < 12 and abs(b[3] - ys.max() - 1) < 12


def test_an_upright_or_uneven_film_is_not_turned():
    film = _film(400, 300)
    assert skewed_field(film) is None  # no fill in the corners
    assert skewed_field(np.pad(film, 40)) is None  # padded but upright: the exposed field's business
    assert film_field(np.pad(film, ((0, 0), (200, 200)))).rotation is None
    assert skewed_field(_askew(film, 0.5)) is None  # under SKEW_MIN_DEGREES
    corners = _askew(film, 8.0)
    corners[:30, :30] = 90.0  # a burned-in label over a corner: three corners still agree
    assert skewed_field(corners) is not None
    yy, xx = np.mgrid[0:400, 0:400]
    disc = (yy - 200) ** 2 + (xx - 200) ** 2 < 150 ** 2
    blob = np.where(disc, 100.0 + _film(400, 400), 0.0).astype(np.float32)
    assert skewed_field(blob) is None  # a round field is not a turned rectangle
