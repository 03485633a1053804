"""The starter adapter shipped in the package: installed into an empty store only, atomically, when it fits the
model, and better than zero-shot on public films it never saw. A fresh server serving it: tests/test_server_e2e.py."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import SAMPLE, real_dir

from xray_textseg.adapters import (METADATA, AdapterError, AdapterStore, compatibility_problem, install_starter,
                                   load_adapter, starter_adapter)
from xray_textseg.metrics import dice
from xray_textseg.priors import PriorBoxes
from xray_textseg.train import fit_film_regions, load_folder
from xray_textseg.vocabulary import ALL_LABELS, BODY_REGIONS


def test_the_package_ships_a_complete_starter_adapter():
    path = starter_adapter()
    assert path is not None, "lib/xray_textseg/starter/ is missing or incomplete"
    adapter = load_adapter(path)
    meta = adapter.metadata
    assert adapter.has_lora and meta["backbone"] == "litemedsam" and meta["backbone_checkpoint"] == "lite_medsam.pth"
    assert set(meta["labels"]) == {"left_lung", "right_lung", "heart", "left_clavicle", "right_clavicle", "femur",
                                   "tibia"}
    assert (path / "README.md").read_text().count("research") >= 1  # the data terms travel with the weights


def test_an_empty_store_gets_the_starter_once(tmp_path, predictor):
    store = AdapterStore(tmp_path / "adapters")
    version, why = install_starter(store, predictor.backbone, predictor.text_encoder)
    assert version == "v0001" and store.current() == "v0001", why
    installed = store.path("v0001")
    for p in starter_adapter().iterdir():
        if p.name != METADATA:
            assert (installed / p.name).read_bytes() == p.read_bytes(), p.name
    meta = store.metadata("v0001")
    assert meta["version"] == "v0001" and meta["installed_from"] == str(starter_adapter())
    assert not [p for p in store.root.iterdir() if p.name.startswith(".")]  # no staging debris

    again, why = install_starter(store, predictor.backbone, predictor.text_encoder)
    assert again is None and "already has adapters" in why
    assert store.versions() == ["v0001"] and len(store.pointer()["log"]) == 1


def test_a_store_with_adapters_is_never_touched(tmp_path, predictor):
    store = AdapterStore(tmp_path / "adapters")
    shutil.copytree(starter_adapter(), store.path("v0001"))  # a version trained earlier, never promoted
    version, why = install_starter(store, predictor.backbone, predictor.text_encoder)
    assert version is None and "already has adapters" in why
    assert store.current() is None and store.versions() == ["v0001"]


def test_the_starter_fits_only_its_backbone_and_text_encoder(predictor):
    """Its head was trained on MiniLM's embeddings and its LoRA on LiteMedSAM: for a server with another text encoder
    (name or width) or other backbone weights :func:`install_starter` leaves the store empty (zero-shot)."""
    meta = load_adapter(starter_adapter()).metadata
    assert compatibility_problem(meta, predictor.backbone, predictor.text_encoder) is None
    for key, other in (("text_encoder", "BiomedCLIP-PubMedBERT"), ("text_dim", 512),
                       ("backbone", "medsam_vit_b"), ("backbone_checkpoint", "my_litemedsam.pth")):
        problem = compatibility_problem({**meta, key: other}, predictor.backbone, predictor.text_encoder)
        assert problem and key in problem and str(other) in problem, key


def test_an_incomplete_source_leaves_the_store_empty(tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(starter_adapter(), broken)
    (broken / METADATA).unlink()
    store = AdapterStore(tmp_path / "adapters")
    with pytest.raises(AdapterError, match="incomplete adapter"):
        store.install(broken, "test")
    assert list(store.root.iterdir()) == []


def test_a_prompt_for_a_structure_the_film_does_not_show_comes_with_a_warning(fresh_predictor):
    """The decoder answers "femur" on a chest film with a confident mask (predicted IoU ~0.9) over whatever lies in
    the box; the starter's training-mask shapes flag it, and leave the structures the film shows unflagged."""
    fresh_predictor.load_adapter(starter_adapter())
    chest = fresh_predictor.predict("heart, left lung, right lung, femur", image=SAMPLE / "images" / "chest_000.png")
    assert set(chest.warnings) == {"femur"}, chest.warnings
    assert "may not show the femur" in chest.warnings["femur"]
    limb = fresh_predictor.predict("femur, tibia, heart, left lung", image=SAMPLE / "images" / "limb_000.png")
    assert set(limb.warnings) == {"heart", "left_lung"}, limb.warnings


def test_the_trainers_body_region_check_tells_chest_from_limb_films_it_did_not_fit_on(fresh_predictor):
    """The statistics a trainer fits (``fit_film_regions``: the adapter's own whole-film embeddings of its training
    films) flag the other region's labels on films left out of the fit, and none of the film's own."""
    fresh_predictor.load_adapter(starter_adapter())
    items = load_folder(SAMPLE)
    chest = [it for it in items if "heart" in it.masks]
    limb = [it for it in items if "femur" in it.masks]
    priors = PriorBoxes()
    assert fit_film_regions(fresh_predictor, chest[:5] + limb[:5], priors) == {"chest": 5, "lower_limb": 5}
    for it, own, other in ((chest[-1], "chest", "lower_limb"), (limb[-1], "lower_limb", "chest")):
        fresh_predictor.set_image(it.image)
        d = priors.film_distances(fresh_predictor.film_vector())
        assert all(priors.film_region_warning(lab, d) for lab in BODY_REGIONS[other]), (it.name, d)
        assert not any(priors.film_region_warning(lab, d) for lab in BODY_REGIONS[own]), (it.name, d)


@pytest.mark.real_data
def test_the_starters_body_region_check_flags_the_other_regions_labels_on_unseen_films(fresh_predictor):
    """A lung asked on a long-leg film can come back as a lung-shaped piece of the leg that the mask-shape check
    passes (7 of 40 development films); the starter's body-region statistics flag every label of the other region on
    unseen development films and none of the film's own (all 20: docs/perf/film_regions.json)."""
    meta = load_adapter(starter_adapter()).metadata
    seen = set(meta["train_names"]) | set(meta["val_names"])
    fresh_predictor.load_adapter(starter_adapter())
    priors = fresh_predictor.priors
    assert set(priors.film_regions) == {"chest", "lower_limb"}
    for folder, own, other in (("jsrt_chest", "chest", "lower_limb"), ("oai_lower_limb", "lower_limb", "chest")):
        cases = sorted(p.stem for p in (real_dir(folder) / "images").iterdir())
        for item in load_folder(real_dir(folder), names=[c for c in cases if c not in seen][:3]):
            fresh_predictor.set_image(item.image)
            d = fresh_predictor.film_distances()
            assert all(priors.film_region_warning(lab, d) for lab in BODY_REGIONS[other]), (item.name, d)
            assert not any(priors.film_region_warning(lab, d) for lab in BODY_REGIONS[own]), (item.name, d)
    leg = fresh_predictor.predict("left lung, femur")  # the last leg film, through the answer
    assert set(leg.warnings) == {"left_lung"} and "looks like a lower-limb film" in leg.warnings["left_lung"]


@pytest.mark.real_data
def test_the_starter_beats_zero_shot_on_development_films_it_never_saw(fresh_predictor):
    """Two chest and two long-leg films the starter neither trained nor validated on (a same-source check: the
    held-back films of other hospitals are what judge it; docs/results.md). Zero-shot gets clavicles ~0.44 and
    long bones ~0.33 on these sets."""
    meta = load_adapter(starter_adapter()).metadata
    seen = set(meta["train_names"]) | set(meta["val_names"])
    items = []
    for folder in ("jsrt_chest", "oai_lower_limb"):
        cases = sorted(p.stem for p in (real_dir(folder) / "images").iterdir())
        unseen = [c for c in cases if c not in seen][:2]
        assert len(unseen) == 2, folder
        items += load_folder(real_dir(folder), names=unseen)
    fresh_predictor.load_adapter(starter_adapter())
    scores: dict[str, list[float]] = {}
    shown_flagged, absent_flagged, absent = 0, 0, 0
    for item in items:
        pred = fresh_predictor.predict(list(ALL_LABELS), image=item.image)  # also the other region's structures
        assert pred.mode == "adapter"
        for label, truth in item.masks.items():
            scores.setdefault(label, []).append(dice(pred.mask(label), truth))
        unlike = {k for k, why in pred.warnings.items() if "may not show" in why}
        shown_flagged += len(unlike & set(item.masks))
        absent_flagged += len(unlike - set(item.masks))
        absent += len(ALL_LABELS) - len(item.masks)
    # on all 80 development films: 1 of 280 shown and 268 of 280 absent structures flagged (docs/results.md)
    assert shown_flagged <= 1 and absent_flagged >= 0.8 * absent, (shown_flagged, absent_flagged, absent)
    mean = {k: float(np.mean(v)) for k, v in scores.items()}
    floor = {"left_lung": 0.9, "right_lung": 0.9, "heart": 0.8, "left_clavicle": 0.6, "right_clavicle": 0.6,
             "femur": 0.75, "tibia": 0.75}
    assert all(mean[k] >= v for k, v in floor.items()), mean


@pytest.mark.real_data
def test_the_starter_segments_a_long_leg_film_lying_askew_as_it_does_upright(fresh_predictor):
    """A long-leg film turned by 7 degrees on its canvas took the starter's tibia from 0.91 to 0.42 on the unseen
    films (the stretched whole-film view and the fine crops assume an upright leg); the film is now segmented
    upright (docs/results.md, 2026-12-04)."""
    from scipy import ndimage
    from xray_textseg.io import radiograph_from_array

    def turn(a, order=1):
        return ndimage.rotate(np.asarray(a, np.float32), 7.0, reshape=True, order=order, mode="constant")

    meta = load_adapter(starter_adapter()).metadata
    seen = set(meta["train_names"]) | set(meta["val_names"])
    cases = sorted(p.stem for p in (real_dir("oai_lower_limb") / "images").iterdir())
    fresh_predictor.load_adapter(starter_adapter())
    for item in load_folder(real_dir("oai_lower_limb"), names=[c for c in cases if c not in seen][:2]):
        pixels = item.image.pixels - item.image.pixels.min()
        upright = fresh_predictor.predict(["femur", "tibia"], image=radiograph_from_array(pixels))
        askew = fresh_predictor.predict(["femur", "tibia"], image=radiograph_from_array(turn(pixels)))
        for label in ("femur", "tibia"):
            before = dice(upright.mask(label), item.masks[label])
            after = dice(askew.mask(label), turn(item.masks[label]) > 0.5)
            assert after > before - 0.05, (item.name, label, before, after)


def test_a_negative_film_is_read_inverted_and_a_positive_one_as_given(fresh_predictor):
    """A PNG exported from a MONOCHROME1 DICOM without its inversion (white lungs): far from the training films,
    while its inverted copy is near them, so the film is read inverted and the answer says so; the masks are the
    positive film's. Region statistics fitted the trainer's way on sample films (the starter's own are fitted on
    real films, which the synthetic ones are far from)."""
    from xray_textseg.io import inverted_radiograph

    fresh_predictor.load_adapter(starter_adapter())
    items = load_folder(SAMPLE)
    chest = [it for it in items if "heart" in it.masks]
    limb = [it for it in items if "femur" in it.masks]
    fitted = PriorBoxes()
    fit_film_regions(fresh_predictor, chest[:6] + limb[:6], fitted)
    fresh_predictor.priors.film_regions, fresh_predictor.priors.film_sd = fitted.film_regions, fitted.film_sd
    film = chest[-1].image
    positive = fresh_predictor.predict("heart, left lung", image=film)
    assert "negative" not in positive.film
    encodes = fresh_predictor.cache.misses
    negative = fresh_predictor.predict("heart, left lung", image=inverted_radiograph(film))
    assert negative.film.get("negative") is True, negative.film
    assert fresh_predictor.cache.misses - encodes == 4  # the film and its inverted copy, then the two crops
    for label in ("heart", "left_lung"):
        assert dice(negative.mask(label), positive.mask(label)) > 0.9, label
    # decided once per film: a box-only request on it reads it inverted too, with no whole-film encode
    again = fresh_predictor.predict("heart", image=inverted_radiograph(film), boxes={"heart": positive.results[0].box})
    assert again.film.get("negative") is True and again.cache["misses"] <= 1
    fresh_predictor.negative_check = False
    try:
        fresh_predictor.results.clear()
        plain = fresh_predictor.predict("heart", image=inverted_radiograph(chest[-2].image))
        assert "negative" not in plain.film
    finally:
        fresh_predictor.negative_check = True


@pytest.mark.real_data
def test_the_starter_reads_negative_chest_films_inverted(fresh_predictor):
    """Unseen JSRT films exported as negatives: heart 0.74 and right clavicle 0.47 before (docs/results.md); now read
    inverted, as well as the positive films. (Negative long-leg films stay under the check's gate: not found.)"""
    from xray_textseg.io import inverted_radiograph

    meta = load_adapter(starter_adapter()).metadata
    seen = set(meta["train_names"]) | set(meta["val_names"])
    cases = sorted(p.stem for p in (real_dir("jsrt_chest") / "images").iterdir())
    fresh_predictor.load_adapter(starter_adapter())
    for item in load_folder(real_dir("jsrt_chest"), names=[c for c in cases if c not in seen][:2]):
        labels = ["heart", "right_clavicle"]
        positive = fresh_predictor.predict(labels, image=item.image)
        negative = fresh_predictor.predict(labels, image=inverted_radiograph(item.image))
        assert "negative" not in positive.film and negative.film.get("negative") is True, item.name
        for label in labels:
            before, after = dice(positive.mask(label), item.masks[label]), dice(negative.mask(label), item.masks[label])
            assert after > before - 0.02, (item.name, label, before, after)


@pytest.mark.real_data
def test_a_leg_turned_on_the_detector_is_read_turned_back(fresh_predictor):
    """The patient turned by 7 degrees on an upright detector (nothing on the film says so): the femur's coarse mask
    leans unlike the training femurs, so the film is read turned back; before, the tibia's prompt fell on the
    fibula (Dice 0.09 on the first of these films at 5 degrees). Upright films are read as they are. (At 5 degrees
    the second film's femur mask, 4.6 degrees upright, moves to 6.4 with the current starter: under the gate of
    2 sd, 4.0 degrees, and read as it is; its tibia is found anyway, docs/results.md.)"""
    from scipy import ndimage
    from xray_textseg.io import radiograph_from_array

    meta = load_adapter(starter_adapter()).metadata
    seen = set(meta["train_names"]) | set(meta["val_names"])
    cases = sorted(p.stem for p in (real_dir("oai_lower_limb") / "images").iterdir())
    fresh_predictor.load_adapter(starter_adapter())
    for item in load_folder(real_dir("oai_lower_limb"), names=[c for c in cases if c not in seen][:2]):
        upright = fresh_predictor.predict(["femur", "tibia"], image=item.image)
        assert "turned_for" not in upright.film, (item.name, upright.film)
        pixels = ndimage.rotate(item.image.pixels, 7.0, reshape=False, order=1, mode="nearest")
        tilted = fresh_predictor.predict(["femur", "tibia"], image=radiograph_from_array(pixels))
        assert tilted.film.get("turned_for") == "the femur's lean", (item.name, tilted.film)
        truth = ndimage.rotate(item.masks["tibia"].astype(np.float32), 7.0, reshape=False, order=1) > 0.5
        assert dice(tilted.mask("tibia"), truth) > 0.8, item.name


@pytest.mark.real_data
def test_a_coarse_mask_that_found_a_piece_of_its_structure_gets_a_fine_crop_over_its_prompt_box(fresh_predictor):
    """JPCNN029 (never seen by the starter) has steep clavicles: the right one's coarse mask finds a piece a seventh
    of its prompt box's area, and a fine crop grown round that piece gave Dice 0.29. Its fine box now also holds the
    prompt box (``SMALL_COARSE_AREA``), and the fine pass finds the whole bone (0.79)."""
    from xray_textseg.predictor import SMALL_COARSE_AREA
    from xray_textseg.transforms import largest_component, mask_box

    item = load_folder(real_dir("jsrt_chest"), names=["JPCNN029"])[0]
    assert "JPCNN029" not in set(load_adapter(starter_adapter()).metadata["train_names"])
    p = fresh_predictor
    p.load_adapter(starter_adapter())
    truth = item.masks["right_clavicle"]
    coarse = p.predict("right clavicle", refine=False, image=item.image).results[0]
    found, prompt = mask_box(largest_component(coarse.mask)), coarse.box
    area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
    assert area(found) < SMALL_COARSE_AREA * area(prompt)
    fine = p.predict("right clavicle", image=item.image).results[0]
    assert fine.box[0] <= prompt[0] and fine.box[1] <= prompt[1]
    assert fine.box[2] >= prompt[2] and fine.box[3] >= prompt[3]
    assert dice(fine.mask, truth) > 0.7
    p.small_coarse = 0.0  # the rule off: the crop round the piece
    p.results.clear()
    try:
        assert dice(p.predict("right clavicle", image=item.image).mask("right_clavicle"), truth) < 0.5
    finally:
        p.small_coarse = SMALL_COARSE_AREA
