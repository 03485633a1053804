"""Geometry between the radiograph and the model square: boxes and masks must agree."""

import numpy as np
import pytest
import torch
from xray_textseg.transforms import View, largest_component, mask_box


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
