"""Overlapping structures in saved labels: a label map's pixel given to one of an overlapping pair is unknown for
the other, in the masks, the loss, the validation Dice and the priors; layered NIfTI labels keep true overlaps."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SAMPLE
from xray_textseg.io import MaskReadError, load_label_layers, load_mask, load_radiograph
from xray_textseg.labelmaps import hidden_pixels, overlap_pairs, overlapping, structure_masks
from xray_textseg.metrics import dice
from xray_textseg.train import SegmentationLoss, TrainItem, fit_priors, soft_dice

VALUES = {"left_lung": 1, "right_lung": 2, "heart": 3, "left_clavicle": 4, "right_clavicle": 5}


def chest_masks() -> dict[str, np.ndarray]:
    return {lab: load_mask(SAMPLE / "labels" / lab / "chest_000.png") > 0 for lab in VALUES}


def paint(masks: dict[str, np.ndarray], order: list[str]) -> np.ndarray:
    """A one-value-per-pixel label map: later labels are painted over earlier ones."""
    lm = np.zeros(next(iter(masks.values())).shape, np.uint8)
    for lab in order:
        lm[masks[lab]] = VALUES[lab]
    return lm


def test_the_vocabulary_knows_each_clavicle_lies_over_its_own_lung():
    assert overlapping("left_clavicle") == {"left_lung"} and overlapping("right_lung") == {"right_clavicle"}
    assert overlapping("heart") == set() and overlapping("femur", [["femur", "patella"]]) == {"patella"}


def test_lungs_painted_over_clavicles_leave_the_covered_clavicle_unknown_not_background():
    truth = chest_masks()
    assert (truth["left_clavicle"] & truth["left_lung"]).sum() > 0.3 * truth["left_clavicle"].sum()
    lm = paint(truth, ["left_clavicle", "right_clavicle", "left_lung", "right_lung", "heart"])
    masks, unknown = structure_masks(lm, VALUES)
    cut = masks["left_clavicle"]
    assert cut.sum() < truth["left_clavicle"].sum()  # the map lost the clavicle under the lung
    # every clavicle pixel the map lost is unknown, none is background
    lost = truth["left_clavicle"] & ~cut
    assert lost.any() and unknown["left_clavicle"][lost].all()
    assert dice(cut, truth["left_clavicle"], ignore=unknown["left_clavicle"]) == pytest.approx(1.0)
    assert dice(cut, truth["left_clavicle"]) < 0.9
    # the lungs were painted last: whole, unknown only where the map still shows a clavicle; the heart is known
    assert np.array_equal(masks["left_lung"], truth["left_lung"])
    assert np.array_equal(unknown["left_lung"], cut) and "heart" not in unknown


def test_clavicles_painted_over_lungs_leave_the_lung_apex_unknown():
    truth = chest_masks()
    lm = paint(truth, ["left_lung", "right_lung", "heart", "left_clavicle", "right_clavicle"])
    masks, unknown = structure_masks(lm, VALUES)
    assert np.array_equal(masks["left_clavicle"], truth["left_clavicle"])
    assert np.array_equal(unknown["left_lung"], truth["left_clavicle"])  # the lung may lie under any of it
    assert not (unknown["left_lung"] & truth["right_clavicle"]).any()  # only the lung's own side
    assert dice(masks["left_lung"], truth["left_lung"], ignore=unknown["left_lung"]) == pytest.approx(1.0)


def test_layered_labels_hold_true_overlaps_and_leave_nothing_unknown(tmp_path):
    truth = chest_masks()
    lungs = paint(truth, ["left_lung", "right_lung", "heart"])
    clavicles = paint(truth, ["left_clavicle", "right_clavicle"])
    data = np.stack([lungs.T, clavicles.T], -1)[:, :, None, :]  # (X, Y, 1, K) as Slicer's layers
    path = tmp_path / "layers.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([-1.0, -1.0, 1.0, 1.0])), path)
    layers = load_label_layers(path, lungs.shape)
    assert layers.shape == (2,) + lungs.shape
    masks, unknown = structure_masks(layers, VALUES)
    assert not unknown
    for lab in VALUES:
        assert np.array_equal(masks[lab], truth[lab]), lab
    with pytest.raises(MaskReadError, match="does not match"):
        load_label_layers(path, (256, 256))


def test_overlapping_pairs_are_learnt_from_complete_training_masks():
    truth = chest_masks()
    assert overlap_pairs([truth]) == [["left_clavicle", "left_lung"], ["right_clavicle", "right_lung"]]


def test_an_answer_says_which_pixels_it_could_not_show():
    truth = chest_masks()
    lm = paint(truth, ["left_lung", "right_lung", "heart", "left_clavicle", "right_clavicle"])
    hidden = hidden_pixels(truth, lm, VALUES)
    n = int((truth["left_clavicle"] & truth["left_lung"]).sum())
    assert hidden["left_lung"]["under"]["left_clavicle"] == n and "left_clavicle" not in hidden


def test_unknown_pixels_add_nothing_to_the_loss_or_the_validation_dice():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 32, 32)
    target = (torch.rand(2, 1, 32, 32) > 0.5).float()
    known = torch.ones_like(target)
    known[:, :, :8] = 0
    loss = SegmentationLoss()
    from monai.losses import DiceCELoss

    assert loss(logits, target) == pytest.approx(DiceCELoss(sigmoid=True)(logits, target).item())
    assert loss(logits, target, torch.ones_like(target)).item() == pytest.approx(loss(logits, target).item(), 1e-5)
    other = target.clone()
    other[:, :, :8] = 1 - other[:, :, :8]  # a different truth where it is unknown
    assert loss(logits, other, known).item() == pytest.approx(loss(logits, target, known).item(), 1e-6)
    assert torch.allclose(soft_dice(logits, other[:, 0], known), soft_dice(logits, target[:, 0], known))
    assert not torch.allclose(soft_dice(logits, other[:, 0]), soft_dice(logits, target[:, 0]))


def test_priors_are_fitted_on_complete_masks_only():
    truth = chest_masks()
    image = load_radiograph(SAMPLE / "images" / "chest_000.png")
    lm = paint(truth, ["left_clavicle", "right_clavicle", "left_lung", "right_lung", "heart"])
    masks, unknown = structure_masks(lm, VALUES)
    cut = TrainItem("cut", image, masks, unknown=unknown)
    whole = TrainItem("whole", image, truth)
    base = fit_priors([whole], ("left_clavicle", "left_lung"))
    refit = fit_priors([cut], ("left_clavicle", "left_lung"), base=base)
    assert refit.boxes["left_clavicle"] == base.boxes["left_clavicle"]  # the cut clavicle fits nothing
    assert refit.boxes["left_lung"] == base.boxes["left_lung"]
    assert fit_priors([cut], ("left_clavicle",)).source["left_clavicle"] == "default"
