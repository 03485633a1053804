"""Adapter training, artifacts, the store's gate and rollback: real LiteMedSAM, real MiniLM, sample data."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import SAMPLE
from xray_textseg.adapters import AdapterError, AdapterStore, load_adapter
from xray_textseg.backbones import build_backbone, cpu_has_bf16
from xray_textseg.metrics import dice
from xray_textseg.predictor import ADAPTER_USER_BOX_GROW, Predictor, grow_box
from xray_textseg.text import TextEncoder
from xray_textseg.priors import PriorBoxes, mask_shape, mask_thickness
from xray_textseg.train import (TrainConfig, Trainer, TrainingStopped, _shift_box, auto_mode, cached_variants_for,
                                choose_coarse_grow, continue_problem, earlier_split, film_region_items, fine_weights,
                                fit_priors, load_folder, retune_adapter, share_groups, train_adapter, validate)
from xray_textseg.transforms import mask_box

LABELS = ("left_lung", "heart")
CASES = ["chest_000", "chest_001", "chest_002", "chest_003"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    backbone = build_backbone(device="cpu")
    encoder = TextEncoder()
    items = load_folder(SAMPLE, LABELS, names=CASES)
    store = AdapterStore(root / "store")
    cfg = TrainConfig(mode="cached", epochs=3, batch_size=4, seed=0, device="cpu", val_fraction=0.25,
                      warmup_steps=2, patience=10, cached_variants=1)
    path = store.new_version_path()
    meta = train_adapter(items, path, backbone=backbone, text_encoder=encoder, labels=LABELS, cfg=cfg,
                         log_path=root / "train.jsonl")
    return {"root": root, "backbone": backbone, "encoder": encoder, "items": items, "store": store, "cfg": cfg,
            "path": path, "meta": meta}


def test_training_lowers_loss_and_raises_validation_dice(setup):
    log = [json.loads(line) for line in (setup["root"] / "train.jsonl").read_text().splitlines()]
    epochs = [r for r in log if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3] and all(r["mode"] == "cached" for r in epochs)
    assert [r["variants"] for r in log if r["event"] == "cached"] == [1]  # the fixture asks for one copy
    assert epochs[-1]["loss"] < epochs[0]["loss"]
    meta = setup["meta"]
    assert meta["training"]["best_epoch"] >= 1  # some epoch beat the untrained head (epoch 0)
    assert set(meta["validation"]["dice"]) == set(LABELS)
    assert meta["validation"]["dice"]["left_lung"] > 0.8
    assert len(meta["train_images"]) == 3 and len(meta["val_images"]) == 1
    assert not set(meta["train_names"]) & set(meta["val_names"])


def test_adapter_files_and_size(setup):
    path = setup["path"]
    names = {p.name for p in path.iterdir()}
    assert {"head.safetensors", "decoder.safetensors", "priors.json", "metadata.json"} <= names
    assert "adapter_config.json" not in names  # cached mode: no encoder LoRA
    assert setup["meta"]["size_bytes"] < 10_000_000
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no staging debris


def test_round_trip_reproduces_predictions_exactly(setup):
    a = Predictor(setup["backbone"], labels=LABELS, text_encoder=setup["encoder"], max_tile_aspect=2.0,
                  crop_margin=0.1)
    b = Predictor(setup["backbone"], labels=LABELS, text_encoder=setup["encoder"])
    a.load_adapter(setup["path"])
    # the fine pass cuts crops as the adapter was trained, whatever the predictor was built with
    assert (a.crop_margin, a.max_tile_aspect) == (setup["cfg"].crop_margin, setup["cfg"].max_tile_aspect)
    val_items = [it for it in setup["items"] if it.name in setup["meta"]["val_names"]]
    again = validate(a, val_items, LABELS)
    assert again["dice"] == setup["meta"]["validation"]["dice"]  # exactly what training measured
    a.unload_adapter()
    b.load_adapter(setup["path"])
    b.set_image(val_items[0].image)
    pb = b.predict("left lung, heart")
    assert pb.mode == "adapter" and [r.prompt_source for r in pb.results] == ["text", "text"]
    b.unload_adapter()
    a.load_adapter(setup["path"])
    a.set_image(val_items[0].image)
    pa = a.predict("left lung, heart")
    for ra, rb in zip(pa.results, pb.results):
        assert np.array_equal(ra.mask, rb.mask) and ra.score == rb.score
    a.unload_adapter()
    assert a.mode == "zero-shot" and a.head is None
    assert (a.crop_margin, a.max_tile_aspect) == (0.1, 2.0)


def test_adapter_served_through_onnxruntime_matches_pytorch(setup, tmp_path):
    """The serving default decodes on the CPU through ONNX Runtime: loading an adapter exports its decoder, the
    masks match PyTorch's, and unloading goes back to the base decoder's graph."""
    import copy

    ort_backbone = copy.deepcopy(setup["backbone"])
    assert ort_backbone.enable_onnxruntime(tmp_path)
    fast = Predictor(ort_backbone, labels=LABELS, text_encoder=setup["encoder"])
    plain = Predictor(setup["backbone"], labels=LABELS, text_encoder=setup["encoder"])
    base_graph = ort_backbone._ort_decoders[-1]
    for p in (fast, plain):
        p.load_adapter(setup["path"])
    adapter_graph = ort_backbone._ort_decoders[-1]
    assert adapter_graph is not base_graph and adapter_graph.source is ort_backbone.mask_decoder
    assert len(list(tmp_path.glob("*_decoder_*.onnx"))) == 2
    image = setup["items"][0].image
    for p in (fast, plain):
        p.set_image(image)
    got, ref = fast.predict("left lung, heart"), plain.predict("left lung, heart")
    for a, b in zip(got.results, ref.results):
        inter = np.logical_and(a.mask, b.mask).sum()
        assert 2 * inter / (a.mask.sum() + b.mask.sum()) > 0.999 and a.score == pytest.approx(b.score, abs=1e-4)
    fast.unload_adapter()
    plain.unload_adapter()
    assert base_graph in ort_backbone._ort_decoders  # kept beside the adapter's: unloading exports nothing
    assert any(d.current(ort_backbone.mask_decoder, ort_backbone.prompt_encoder) for d in ort_backbone._ort_decoders)


def test_adapter_carries_per_label_growth_chosen_on_validation(setup):
    meta, cfg = setup["meta"], setup["cfg"]
    chosen, table = meta["serving"]["coarse_grow"], meta["serving"]["coarse_grow_val_dice"]
    assert set(chosen) == set(LABELS) and set(table) == set(LABELS)
    for lab in LABELS:
        assert chosen[lab] in cfg.grow_candidates
        assert set(table[lab]) == {str(g) for g in cfg.grow_candidates}
        # the validation Dice reported is the chosen growth's
        assert meta["validation"]["dice"][lab] == pytest.approx(table[lab][str(chosen[lab])], abs=1e-4)
    p = Predictor(setup["backbone"], labels=LABELS, text_encoder=setup["encoder"], coarse_grow=0.2)
    assert p.grow_for("heart") == 0.2
    p.load_adapter(setup["path"])
    assert {lab: p.grow_for(lab) for lab in LABELS} == chosen
    val_items = [it for it in setup["items"] if it.name in meta["val_names"]]
    # the rule: the first candidate unless another wins by the margin
    _, never = choose_coarse_grow(p, val_items, LABELS, (0.15, 0.3, 0.5), margin=1.0)
    assert never["coarse_grow"] == {lab: 0.15 for lab in LABELS}
    _, best = choose_coarse_grow(p, val_items, LABELS, (0.15, 0.3, 0.5), margin=-1.0)
    for lab in LABELS:
        dices = best["coarse_grow_val_dice"][lab]
        assert dices[str(best["coarse_grow"][lab])] == max(dices.values())
    assert {lab: p.grow_for(lab) for lab in LABELS} == chosen  # choosing leaves the loaded choice in place
    # the growth reaches the fine box: a wider growth gives a wider box around the same coarse mask
    p.set_image(val_items[0].image)
    p.label_grow = {"heart": 0.15}
    narrow = p.predict("heart").results[0].box
    p.label_grow = {"heart": 0.5}
    wide = p.predict("heart").results[0].box
    assert wide[2] - wide[0] > narrow[2] - narrow[0] and wide[3] - wide[1] > narrow[3] - narrow[1]
    p.unload_adapter()
    assert p.label_grow == {} and p.grow_for("heart") == 0.2


def test_a_user_box_is_grown_as_the_adapter_was_trained_before_its_fine_pass(setup):
    """An adapter's fine crops were cut round true boxes grown by up to 0.3 per side, so a box drawn tight round the
    structure is grown by ADAPTER_USER_BOX_GROW before the fine pass (zero-shot it is used as drawn), and a grown
    box answers another mask than the box as drawn."""
    item = next(it for it in setup["items"] if it.name in setup["meta"]["val_names"])
    ys, xs = np.nonzero(item.masks["heart"])
    box = [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]
    p = Predictor(setup["backbone"], labels=LABELS, text_encoder=setup["encoder"])
    p.set_image(item.image)
    assert p.user_box_grow == 0.0 and p.predict("heart", boxes={"heart": box}).results[0].box == box
    p.load_adapter(setup["path"])
    assert p.user_box_grow == ADAPTER_USER_BOX_GROW > 0
    grown = p.predict("heart", boxes={"heart": box}).results[0]
    assert grown.box == pytest.approx([float(v) for v in grow_box(box, ADAPTER_USER_BOX_GROW, item.image.shape)])
    assert grown.prompt_source == "user_box" and dice(grown.mask, item.masks["heart"] > 0) > 0.7
    p.user_box_grow = 0.0  # a setting of its own in the result cache: the box as drawn is decoded anew
    as_drawn = p.predict("heart", boxes={"heart": box})
    assert as_drawn.cache["result_hits"] == 0 and as_drawn.results[0].box == box
    assert not np.array_equal(as_drawn.results[0].mask, grown.mask)
    p.unload_adapter()
    assert p.user_box_grow == 0.0


def test_relative_priors_place_each_clavicle_from_the_lung_on_its_side():
    """Clavicles get a prior box relative to the same-side lung's box, fitted where both are trained; on the films
    it was fitted on, the lung's true box places each clavicle's box near the truth."""
    labels = ("right_clavicle", "left_clavicle", "right_lung", "left_lung")
    items = load_folder(SAMPLE, labels, names=CASES)
    priors = fit_priors(items, labels, "median")
    assert {k: a for k, (a, _) in priors.relative.items()} == {"right_clavicle": "right_lung",
                                                                "left_clavicle": "left_lung"}
    for it in items:
        for side in ("right", "left"):
            truth = np.asarray(mask_box(it.masks[f"{side}_clavicle"]), float)
            placed = priors.relative_box(f"{side}_clavicle", mask_box(it.masks[f"{side}_lung"]), it.image.shape)
            opposite = "left" if side == "right" else "right"
            other = priors.relative_box(f"{side}_clavicle", mask_box(it.masks[f"{opposite}_lung"]), it.image.shape)
            cx, cy = (placed[0] + placed[2]) / 2, (placed[1] + placed[3]) / 2
            assert truth[0] < cx < truth[2] and truth[1] < cy < truth[3] and _iou(placed, truth) > 0.3
            assert _iou(other, truth) < 0.1  # placed from the other lung it lands elsewhere
    again = PriorBoxes.from_json(json.loads(json.dumps(priors.to_json())))
    assert again.relative == priors.relative
    assert fit_priors(items, ("right_clavicle", "left_clavicle"), "median").relative == {}  # no lung: no anchor
    assert PriorBoxes().relative_box("heart", [0, 0, 10, 10], (64, 64)) is None


def test_a_clavicle_mask_thicker_than_every_training_mask_is_flagged():
    """The adapter keeps the thickest training mask of each clavicle (mean width across the principal axis); a mask
    thicker than that (a clavicle run onto the rib or filling the region above it) is flagged with the label named,
    the training masks themselves are not; other labels are not checked."""
    bar = np.zeros((200, 400), bool)
    bar[90:110, 50:350] = True  # 20 px wide on a film of geometric-mean side 283 px
    assert mask_thickness(bar) == pytest.approx(20 / np.sqrt(200 * 400), rel=0.01)
    assert mask_thickness(np.zeros((50, 50), bool)) == 0.0
    labels = ("right_clavicle", "left_clavicle", "right_lung", "left_lung")
    items = load_folder(SAMPLE, labels, names=CASES)
    priors = fit_priors(items, labels)
    assert set(priors.thickness) == {"right_clavicle", "left_clavicle"}
    for it in items:
        assert priors.too_thick("left_clavicle", it.masks["left_clavicle"]) is None
        assert priors.too_thick("left_lung", it.masks["left_lung"]) is None
    clavicle = items[0].masks["left_clavicle"]
    x0, y0, x1, y1 = (int(v) for v in mask_box(clavicle))
    filled = clavicle.copy()
    filled[max(0, y0 - (y1 - y0)):y1 + 1, x0:x1 + 1] = True  # the box and the region above it
    why = priors.too_thick("left_clavicle", filled)
    assert why is not None and why.startswith("left clavicle mask is") and "draw a box" in why
    again = PriorBoxes.from_json(json.loads(json.dumps(priors.to_json())))
    assert again.thickness == priors.thickness and again.too_thick("left_clavicle", filled) == why
    assert PriorBoxes().too_thick("left_clavicle", filled) is None  # no adapter: nothing to compare with


def test_a_mask_unlike_every_training_mask_of_its_label_is_flagged():
    """Every label keeps its training masks' thickness and box height:width (log mean and sd); a mask far outside
    them (what a prompt for a structure the film does not show returns) is flagged with the label named, the
    training masks themselves are not; too few training masks keep no shape."""
    bar = np.zeros((100, 400), bool)
    bar[40:60, 50:350] = True  # 20 x 300 px
    assert mask_shape(bar) == pytest.approx({"thickness": 20 / 200, "aspect": 20 / 300}, rel=0.02)
    assert mask_shape(np.zeros((50, 50), bool)) is None
    labels = ("left_lung", "heart", "femur")
    items = load_folder(SAMPLE, labels)
    priors = fit_priors(items, labels)
    assert set(priors.shape) == set(labels) and all(s["n"] >= 5 for s in priors.shape.values())
    for it in items:
        for lab, mask in it.masks.items():
            assert priors.unlike(lab, mask) is None, (it.name, lab)
    chest = next(it for it in items if "left_lung" in it.masks)
    limb = next(it for it in items if "femur" in it.masks)
    why = priors.unlike("femur", chest.masks["left_lung"])  # a lung-shaped answer to "femur"
    assert why and why.startswith("femur mask is unlike") and "not show the femur" in why and "height:width" in why
    assert priors.unlike("heart", limb.masks["femur"]).startswith("heart mask is unlike")
    assert "is empty" in priors.unlike("heart", np.zeros_like(chest.masks["heart"]))
    assert priors.check("femur", chest.masks["left_lung"]) == why  # the answer's warning
    again = PriorBoxes.from_json(json.loads(json.dumps(priors.to_json())))
    assert again.shape == priors.shape and again.unlike("femur", chest.masks["left_lung"]) == why
    assert PriorBoxes().unlike("femur", chest.masks["left_lung"]) is None  # no adapter: nothing to compare with
    few = PriorBoxes()
    assert few.fit_shape("femur", [limb.masks["femur"]] * 4) == 4 and "femur" not in few.shape


def test_a_film_nearer_another_body_regions_training_films_flags_that_regions_labels():
    """Per body region the mean pooled embedding of its training films and a pooled per-feature sd; a film much
    nearer (FILM_REGION_RATIO) another region's films than a label's region's gets a warning naming both regions for
    that label, and none for its own region's labels or when it is about as near to both. Films with labels of both
    regions are left out; fewer than FILM_REGION_MIN_FILMS films of either region keep nothing."""
    rng = np.random.default_rng(0)
    chest_c, limb_c = rng.normal(0, 1, 256), rng.normal(0, 1, 256)
    films = [(["left_lung", "heart"], chest_c + rng.normal(0, 0.3, 256)) for _ in range(6)]
    films += [(["femur"], limb_c + rng.normal(0, 0.3, 256)) for _ in range(5)]
    films += [(["heart", "tibia"], rng.normal(0, 5, 256))]  # both regions: left out
    priors = PriorBoxes()
    assert priors.fit_film_regions(films) == {"chest": 6, "lower_limb": 5}
    assert {r: s["n"] for r, s in priors.film_regions.items()} == {"chest": 6, "lower_limb": 5}
    leg = priors.film_distances(limb_c + rng.normal(0, 0.3, 256))
    assert leg["lower_limb"] < 1.5 < 2 * 1.5 < leg["chest"]
    why = priors.film_region_warning("left_lung", leg)
    assert why and "lower-limb film, not a chest film" in why and "may not show the left lung" in why
    assert priors.film_region_warning("femur", leg) is None and priors.film_region_warning("tibia", leg) is None
    between = priors.film_distances((chest_c + limb_c) / 2)
    assert all(priors.film_region_warning(lab, between) is None for lab in ("heart", "femur"))
    again = PriorBoxes.from_json(json.loads(json.dumps(priors.to_json())))
    assert again.film_region_warning("left_lung", again.film_distances(limb_c)) == \
        priors.film_region_warning("left_lung", priors.film_distances(limb_c))
    assert PriorBoxes().film_distances(limb_c) == {}  # no statistics: no check
    few = PriorBoxes()
    assert few.fit_film_regions(films[:4] + films[6:]) == {"chest": 4, "lower_limb": 5} and not few.film_regions
    # what the trainer encodes: at most 12 films of each region with 5 or more, none when only one region has them
    items = load_folder(SAMPLE, ("left_lung", "heart", "femur", "tibia"))
    chosen = film_region_items(items)
    assert len(chosen) == 24 and len(film_region_items(items, per_region=3)) == 6
    assert film_region_items([it for it in items if "femur" not in it.masks]) == []


def test_envelope_prior_holds_every_training_box_and_auto_picks_it_for_the_scattered_clavicles():
    """``coarse_prior="envelope"``: each label's prior box holds every training film's box of that label (the text has
    to find the structure in it), where the median prior (the default) cuts some off. ``"auto"`` takes the envelope
    only for labels the median box overlaps poorly: on the sample chests the clavicles, not the lungs or heart; an
    enveloped label gets no anchor (a tight anchored box is not the prompt its model learns)."""
    labels = ("right_clavicle", "left_clavicle", "heart", "right_lung", "left_lung")
    items = load_folder(SAMPLE, labels, names=CASES)
    median, envelope = fit_priors(items, labels), fit_priors(items, labels, "envelope")  # median: the default
    cut_off = 0
    for lab in labels:
        assert envelope.kind[lab] == "envelope" and envelope.source[lab].startswith(f"envelope of {len(items)} labels")
        for it in items:
            truth = mask_box(it.masks[lab])
            env = envelope.box(lab, it.image.shape)
            assert env[0] <= truth[0] and env[1] <= truth[1] and env[2] >= truth[2] - 1 and env[3] >= truth[3] - 1
            med = median.box(lab, it.image.shape)
            cut_off += not (med[0] <= truth[0] and med[1] <= truth[1] and med[2] >= truth[2] and med[3] >= truth[3])
    assert cut_off > 0
    auto = fit_priors(items, labels, "auto")
    assert auto.kind == {"right_clavicle": "envelope", "left_clavicle": "envelope", "heart": "median",
                         "right_lung": "median", "left_lung": "median"}
    assert auto.boxes["heart"] == median.boxes["heart"] and auto.boxes["left_clavicle"] == envelope.boxes["left_clavicle"]
    assert auto.relative == {} and set(median.relative) == {"right_clavicle", "left_clavicle"}
    again = PriorBoxes.from_json(json.loads(json.dumps(auto.to_json())))
    assert again.boxes == auto.boxes and again.kind == auto.kind
    with pytest.raises(ValueError, match="unknown prior fit 'mean'"):
        fit_priors(items, labels, "mean")


def test_mid_view_trains_and_serves_enveloped_labels_on_one_crop_of_their_region(setup, tmp_path):
    """``TrainConfig.mid_view``: labels with an envelope prompt (the clavicles under ``coarse_prior="auto"``) are
    trained and served on one crop of the box holding their envelopes, where they fill more of the model input than
    on the whole film; the heart keeps the whole film. Both clavicles of a film share the crop's one encode, and the
    main random stream (every other example) is the same as without a mid view."""
    from dataclasses import replace

    labels = ("right_clavicle", "left_clavicle", "heart")
    items = load_folder(SAMPLE, labels, names=CASES[:3])
    priors = fit_priors(items, labels, "auto")
    cfg = TrainConfig(mode="cached", epochs=1, batch_size=4, seed=0, device="cpu", coarse_prior="auto", mid_view=True,
                      val_fraction=0.34, warmup_steps=1, cached_variants=1)
    mid = Trainer(setup["backbone"], setup["encoder"], labels, cfg)._examples(
        items, priors, np.random.default_rng(0), train=True)
    plain = Trainer(setup["backbone"], setup["encoder"], labels, replace(cfg, mid_view=False))._examples(
        items, priors, np.random.default_rng(0), train=True)
    assert {(e.label, e.kind) for e in mid} == {("right_clavicle", "mid"), ("left_clavicle", "mid"),
                                                ("heart", "coarse")} | {(lab, "fine") for lab in labels}
    for film in range(len(items)):
        views = [e for e in mid if e.kind == "mid" and e.item == film]
        assert len(views) == 2 and views[0].share == views[1].share and torch.equal(views[0].x, views[1].x)
        for e in views:  # the same clavicle fills more of the mid input than of the whole film's
            whole = next(c for c in plain if c.kind == "coarse" and c.item == film and c.label == e.label)
            assert e.target.mean() > 2 * whole.target.mean()
    for a, b in zip(mid, plain):
        if a.kind != "mid":
            assert a.label == b.label and a.kind == b.kind and np.array_equal(a.box, b.box) and torch.equal(a.x, b.x)

    meta = train_adapter(items, tmp_path / "mid", backbone=setup["backbone"], text_encoder=setup["encoder"],
                         labels=labels, cfg=cfg)
    assert meta["training"]["config"]["mid_view"] is True and set(meta["validation"]["dice"]) == set(labels)
    p = Predictor(setup["backbone"], labels=labels, text_encoder=setup["encoder"])
    p.load_adapter(tmp_path / "mid")
    assert p.mid_labels == ("right_clavicle", "left_clavicle")
    image = items[0].image
    p.set_image(image)
    view = p.mid_view()
    region = p.priors.mid_region(p.mid_labels, image.shape)
    x0, y0, x1, y1 = view.box
    assert x0 <= region[0] and y0 <= region[1] and x1 >= region[2] and y1 >= region[3]
    assert (y1 - y0) < 0.6 * image.shape[0]  # the upper chest, not the film
    misses = p.cache.misses
    left = p.predict("left clavicle", refine=False)
    assert p.cache.misses == misses + 1 and p._cache_key(view) in p.cache  # the mid view only, not the whole film
    assert np.allclose(left.results[0].box, p.priors.box("left_clavicle", image.shape))
    p.predict("right clavicle", refine=False)
    assert p.cache.misses == misses + 1  # the same crop serves the other clavicle
    p.predict("heart", refine=False)
    assert p.cache.misses == misses + 2 and p._cache_key(p.coarse_view()) in p.cache
    p.unload_adapter()
    assert p.mid_labels == ()


def test_tibia_box_is_placed_below_the_femur():
    """The tibia's relative prior hangs from the femur's box: placed from each limb film's femur it lands on that
    film's tibia, below the femur."""
    items = load_folder(SAMPLE, ("femur", "tibia"), names=[f"limb_{i:03d}" for i in range(4)])
    priors = fit_priors(items, ("femur", "tibia"))
    assert priors.relative["tibia"][0] == "femur" and "femur" not in priors.relative
    for it in items:
        truth, femur = mask_box(it.masks["tibia"]), mask_box(it.masks["femur"])
        placed = priors.relative_box("tibia", femur, it.image.shape)
        assert _iou(placed, truth) > 0.5 and (placed[1] + placed[3]) / 2 > femur[3]


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_anchored_coarse_prompt_is_placed_from_the_anchor_and_chosen_on_validation(setup):
    """With ``serving.coarse_prompt`` "anchor" a label's coarse prompt box is its relative prior on the anchor's
    coarse mask; the end-of-training choice validates it against the film prior for labels that have one."""
    p = Predictor(setup["backbone"], labels=LABELS, text_encoder=setup["encoder"])
    p.load_adapter(setup["path"])
    val_items = [it for it in setup["items"] if it.name in setup["meta"]["val_names"]]
    train_items = [it for it in setup["items"] if it.name in setup["meta"]["train_names"]]
    # the heart placed from the left lung stands in for a clavicle (the fixture adapter knows no clavicle)
    p.priors.fit_relative("heart", "left_lung", [(it.masks["heart"], it.masks["left_lung"]) for it in train_items])
    image = val_items[0].image
    p.set_image(image)
    film = p.predict("heart", refine=False).results[0].box
    assert np.allclose(film, p.priors.box("heart", image.shape))  # not chosen: the film prior
    p.label_prompt = {"heart": "anchor"}
    lung_mask = p.predict("left lung", refine=False).mask("left_lung")
    anchored = p.predict("heart", refine=False)
    assert np.allclose(anchored.results[0].box, p.priors.relative_box("heart", mask_box(lung_mask), image.shape))
    assert anchored.cache["result_hits"] == 0  # the choice is part of the result key
    p.results.clear()  # both asked at once: the anchor's coarse mask serves the lung too (one decode, same mask)
    both = p.predict("heart, left lung", refine=False)
    assert np.allclose(both.results[0].box, anchored.results[0].box)
    assert np.array_equal(both.mask("left_lung"), lung_mask)
    _, best = choose_coarse_grow(p, val_items, LABELS, (0.15, 0.3), margin=-1.0)
    assert best["coarse_prompt"]["left_lung"] == "film"  # no relative prior: never anchored
    dices = {("film", g): d for g, d in best["coarse_grow_val_dice"]["heart"].items()}
    dices.update({("anchor", g): d for g, d in best["coarse_prompt_val_dice"]["heart"]["anchor"].items()})
    assert dices[(best["coarse_prompt"]["heart"], str(best["coarse_grow"]["heart"]))] == max(dices.values())
    assert p.label_prompt == {"heart": "anchor"}  # choosing leaves the loaded choice in place
    p.unload_adapter()
    assert p.label_prompt == {} and p.anchor_for("heart") is None


def test_a_label_found_far_from_where_its_anchor_places_it_is_prompted_again_from_the_anchor(setup):
    """A label prompted from its film-frame prior is checked against its anchor: where its coarse mask lies away from
    the box the anchor places (a clavicle prompt that locked on a structure above the clavicle), the coarse prompt is
    the anchor-placed box instead; a coarse mask where the anchor puts it is left as it is."""
    from xray_textseg.metrics import dice

    p = Predictor(setup["backbone"], labels=LABELS, text_encoder=setup["encoder"])
    p.load_adapter(setup["path"])
    train_items = [it for it in setup["items"] if it.name in setup["meta"]["train_names"]]
    item = next(it for it in setup["items"] if it.name in setup["meta"]["val_names"])
    p.priors.fit_relative("heart", "left_lung", [(it.masks["heart"], it.masks["left_lung"]) for it in train_items])
    assert p.checked_against("heart") == "left_lung" and p.checked_against("left_lung") is None
    p.set_image(item.image)
    shape = item.image.shape
    found = p.predict("heart", refine=False).results[0]
    assert np.allclose(found.box, p.priors.box("heart", shape))  # found where the lung places it: unchanged
    p.priors.boxes["heart"] = (0.02, 0.02, 0.30, 0.20)  # a film prior over the wrong corner of the film
    p.results.clear()  # the priors belong to the adapter: changed in place here, so its cached results go
    checked = p.predict("heart", refine=False).results[0]
    lung_box = mask_box(p.predict("left lung", refine=False).mask("left_lung"))
    assert np.allclose(checked.box, p.priors.relative_box("heart", lung_box, shape))
    assert dice(checked.mask, item.masks["heart"]) > 0.7
    checked_fine = p.predict("heart").results[0]
    p.anchor_check = 0.0
    assert p.checked_against("heart") is None
    lost = p.predict("heart", refine=False)
    assert lost.cache["result_hits"] == 0  # the check is part of the result key
    assert np.allclose(lost.results[0].box, p.priors.box("heart", shape))
    assert dice(lost.mask("heart"), item.masks["heart"]) < 0.3
    lost_fine = p.predict("heart").results[0]
    assert dice(checked_fine.mask, item.masks["heart"]) > dice(lost_fine.mask, item.masks["heart"]) + 0.3
    p.label_prompt = {"heart": "anchor"}  # anchored already: nothing to check
    assert p.checked_against("heart") is None
    p.unload_adapter()
    assert p.checked_against("heart") is None  # no adapter, no relative prior


def test_the_answer_warns_of_a_mask_thicker_than_the_training_masks(setup):
    """A mask thicker than the thickest training mask of its label comes with a warning in the prediction (the
    server passes it on); within the training range, none."""
    p = Predictor(setup["backbone"], labels=LABELS, text_encoder=setup["encoder"])
    p.load_adapter(setup["path"])
    item = next(it for it in setup["items"] if it.name in setup["meta"]["val_names"])
    p.set_image(item.image)
    assert p.predict("heart").warnings == {}  # the sample adapter keeps no thickness for the heart
    p.priors.fit_thickness("heart", [it.masks["heart"] for it in setup["items"]])
    p.results.clear()  # the priors belong to the adapter: changed in place here, so its cached results go
    assert p.predict("heart").warnings == {}
    p.priors.thickness["heart"] /= 3  # as if every training heart had been a third as thick
    p.results.clear()
    warned = p.predict("heart, left lung")
    assert set(warned.warnings) == {"heart"} and warned.warnings["heart"].startswith("heart mask is")
    again = p.predict("heart, left lung")
    assert again.cache["result_hits"] == 2 and again.warnings == warned.warnings  # the cached answer keeps it


def test_retune_keeps_the_weights_and_checks_the_films(setup, tmp_path):
    """An adapter's serving settings are chosen again on its own validation films without retraining; the weights
    are the same files, and films that are not the ones it was trained on are refused."""
    import shutil

    out = retune_adapter(setup["path"], tmp_path / "retuned", SAMPLE, backbone=setup["backbone"],
                         text_encoder=setup["encoder"])
    for name in ("head.safetensors", "decoder.safetensors"):
        assert (tmp_path / "retuned" / name).read_bytes() == (setup["path"] / name).read_bytes()
    assert out["version"] == "retuned" and out["train_names"] == setup["meta"]["train_names"]
    assert out["validation"]["dice"] == setup["meta"]["validation"]["dice"]  # same films, same settings to choose
    assert out["serving"]["coarse_grow"] == setup["meta"]["serving"]["coarse_grow"]
    fake = tmp_path / "data"
    shutil.copytree(SAMPLE, fake)
    val = setup["meta"]["val_names"][0]
    img = fake / "images" / f"{val}.png"
    from PIL import Image

    Image.fromarray(255 - np.asarray(Image.open(img))).save(img)
    with pytest.raises(ValueError, match="not the same images"):
        retune_adapter(setup["path"], tmp_path / "again", fake, backbone=setup["backbone"],
                       text_encoder=setup["encoder"])
    assert not (tmp_path / "again").exists() and not list(tmp_path.glob(".again*"))


def test_store_promotes_first_and_refuses_worse(setup, tmp_path):
    store = AdapterStore(tmp_path / "store")
    import shutil

    for v in ("v0001", "v0002"):
        shutil.copytree(setup["path"], tmp_path / "store" / v)
    ok, why = store.promote("v0001", 0.80, None)
    assert ok and store.current() == "v0001"
    ok, why = store.promote("v0002", 0.79, 0.80)
    assert not ok and store.current() == "v0001" and "kept v0001" in why
    ok, _ = store.promote("v0002", 0.80, 0.80)  # not worse: promoted
    assert ok and store.current() == "v0002"
    assert store.rollback() == "v0001" and store.current() == "v0001"
    assert store.versions() == ["v0001", "v0002"]  # nothing deleted


def test_stopped_training_writes_nothing(setup, tmp_path):
    store = AdapterStore(tmp_path / "store")
    import shutil

    shutil.copytree(setup["path"], tmp_path / "store" / "v0001")
    store.promote("v0001", 0.8, None)
    before = (tmp_path / "store" / "current.json").read_text()
    calls = {"n": 0}

    def stop_soon():
        calls["n"] += 1
        return calls["n"] > 3

    target = store.new_version_path()
    with pytest.raises(TrainingStopped):
        train_adapter(setup["items"], target, backbone=setup["backbone"], text_encoder=setup["encoder"],
                      labels=LABELS, cfg=setup["cfg"], should_stop=stop_soon)
    assert not target.exists()
    assert (tmp_path / "store" / "current.json").read_text() == before
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["current.json", "v0001"]


def test_incompatible_or_partial_adapters_are_refused(setup, tmp_path):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(setup["path"], partial)
    (partial / "metadata.json").unlink()
    with pytest.raises(AdapterError, match="incomplete"):
        load_adapter(partial)
    other = tmp_path / "other"
    shutil.copytree(setup["path"], other)
    meta = json.loads((other / "metadata.json").read_text())
    meta["backbone"] = "medsam_vit_b"
    (other / "metadata.json").write_text(json.dumps(meta))
    p = Predictor(setup["backbone"], labels=LABELS, text_encoder=setup["encoder"])
    with pytest.raises(AdapterError, match="medsam_vit_b"):
        p.load_adapter(other)
    assert p.mode == "zero-shot"


def test_auto_mode_trains_lora_where_the_encoder_is_fast_and_says_so(setup):
    assert auto_mode(torch.device("cuda")) == "lora"
    assert auto_mode(torch.device("cpu")) == ("lora" if cpu_has_bf16() else "cached")
    backbone, encoder = setup["backbone"], setup["encoder"]
    trainer = Trainer(backbone, encoder, LABELS, TrainConfig(device="cpu"))  # mode "auto" is the default
    assert trainer.mode == auto_mode(torch.device("cpu"))
    # bf16 only where LoRA was picked for it and measured faster in bf16 than in fp32 on this CPU
    assert trainer.amp == (trainer.mode == "lora" and trainer.precision_probe["bf16"])


def test_lora_step_precision_is_measured_once_per_cpu_and_leaves_the_encoder_as_it_was(setup, tmp_path, monkeypatch):
    """bf16 or fp32 for CPU LoRA steps comes from timing both (an Intel Xeon with AVX-512 BF16 ran them slower in
    bf16); the answer is kept, and the probe changes neither torch's random stream, the gradients nor BatchNorm."""
    from xray_textseg.adapters import lora_encoder
    from xray_textseg.train import lora_step_precision

    monkeypatch.setenv("XRAY_TEXTSEG_CACHE", str(tmp_path))
    encoder = lora_encoder(copy.deepcopy(setup["backbone"].image_encoder))
    encoder.train()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    first = lora_step_precision(encoder, 256, repeats=1)
    assert torch.equal(torch.rand(3), expected)
    assert encoder.training
    assert all(p.grad is None for p in encoder.parameters())
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())
    if not cpu_has_bf16():
        assert first == {"bf16": False, "measured": False, "reason": "no native bf16"}
        return
    assert first["measured"] and first["bf16"] == (first["bf16_s"] < first["fp32_s"])
    assert first["bf16_s"] > 0 and first["fp32_s"] > 0
    again = lora_step_precision(encoder, 256, repeats=1)
    assert not again["measured"] and again["bf16"] == first["bf16"] and again["fp32_s"] == first["fp32_s"]
    assert len(json.loads((tmp_path / "lora_precision.json").read_text())) == 1


def test_auto_cached_copies_give_small_sets_more_augmented_copies():
    # about 100 encodes (a film and a crop per label, per copy); never 0 copies, never more than 4
    assert [cached_variants_for(n, 2) for n in (1, 8, 10, 16, 24, 200)] == [4, 4, 3, 2, 1, 1]  # femur, tibia
    assert [cached_variants_for(n, 5) for n in (1, 8, 16, 24)] == [4, 2, 1, 1]  # five chest labels


def test_shifted_fine_boxes_keep_their_size_and_stay_inside_the_image():
    rng = np.random.default_rng(0)
    shape = (200, 100)  # H, W
    for box in (np.array([10, 20, 60, 120], np.float32), np.array([0, 0, 99, 199], np.float32),
                np.array([80, 150, 99, 199], np.float32)):
        moved = [_shift_box(box, rng, 0.25, shape) for _ in range(200)]
        for m in moved:
            np.testing.assert_allclose(m[2:] - m[:2], box[2:] - box[:2], atol=1e-4)
            assert m[0] >= 0 and m[1] >= 0 and m[2] <= shape[1] - 1 and m[3] <= shape[0] - 1
        dx = np.array([m[0] - box[0] for m in moved])
        if box[0] == 10:  # room on both sides: moved both ways, by at most a quarter of the width
            assert dx.min() < -5 and dx.max() > 5 and np.abs(dx).max() <= 0.25 * 50 + 1e-4


def test_time_budget_counts_encoding_and_ends_inside_an_epoch(setup, tmp_path):
    """The budget runs from the start (encoding included): over it, the epoch in progress stops at the next
    step, is validated, and its weights are kept; the adapter is still written and validated."""
    cfg = TrainConfig(mode="cached", epochs=5, batch_size=1, seed=0, device="cpu", val_fraction=0.5,
                      cached_variants=1, time_budget_s=0.01)
    log = tmp_path / "train.jsonl"
    meta = train_adapter(setup["items"][:2], tmp_path / "v0001", backbone=setup["backbone"],
                         text_encoder=setup["encoder"], labels=("heart",), cfg=cfg, log_path=log)
    epochs = [r for r in map(json.loads, log.read_text().splitlines()) if r["event"] == "epoch"]
    assert meta["training"]["stopped"] == "time budget" and meta["training"]["epochs_run"] == 1
    assert len(epochs) == 1 and epochs[0]["steps"] == 1  # of 2 (1 film x heart x coarse + fine, batch 1)
    assert set(meta["validation"]["dice"]) == {"heart"}
    # a budget that holds fewer epochs than wanted says so, naming the setting to raise
    budget = [r for r in map(json.loads, log.read_text().splitlines()) if r["event"] == "budget"]
    assert len(budget) == 1 and budget[0]["epochs_in_budget"] == 0 and "train_time_budget_min" in budget[0]["warning"]


def test_a_budget_that_holds_the_epochs_gives_no_warning(setup, tmp_path):
    cfg = TrainConfig(mode="cached", epochs=2, batch_size=2, seed=0, device="cpu", val_fraction=0.5,
                      cached_variants=1, time_budget_s=3600)
    log = tmp_path / "train.jsonl"
    seen = []
    train_adapter(setup["items"][:2], tmp_path / "v0001", backbone=setup["backbone"], text_encoder=setup["encoder"],
                  labels=("heart",), cfg=cfg, log_path=log, progress=seen.append)
    events = [r["event"] for r in map(json.loads, log.read_text().splitlines())]
    assert events.count("epoch") == 2 and "budget" not in events
    assert [i["epoch"] for i in seen if i.get("event") == "epoch"] == [1, 2]


def test_lora_on_the_cpu_runs_a_batch_input_by_input_with_the_same_gradients(setup):
    """Each distinct input's forward and backward on its own (the encoder's saved activations are ~0.8 GB per
    input): the loss and every trainable parameter's gradient equal those of the whole batch at once."""
    from xray_textseg.train import SegmentationLoss

    trainer = Trainer(setup["backbone"], setup["encoder"], LABELS,
                      TrainConfig(mode="lora", batch_size=4, seed=0, device="cpu", amp=False))
    items = setup["items"][:1]
    examples = trainer._examples(items, fit_priors(items, LABELS), np.random.default_rng(0), train=True)
    batch = trainer._batches(examples, np.random.default_rng(1))[0]
    pieces = trainer._pieces(batch)
    assert len(batch) == 4 and [len(p) for p in pieces] == [len(g) for g in share_groups(batch)]
    assert sorted(map(len, pieces)) == [1, 1, 2]  # the film's two coarse examples share their input
    trainer.head.eval()  # no dropout anywhere; eval keeps it that way
    trainer.backbone.eval()
    params = [p for p in (*trainer.head.parameters(), *trainer.backbone.parameters()) if p.requires_grad]
    assert any(p.requires_grad for p in trainer.encoder_peft.parameters())

    def run(pieces):
        for p in params:
            p.grad = None
        loss = trainer._backward(batch, np.random.default_rng(2), SegmentationLoss(), pieces=pieces)
        return loss, [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]

    whole, whole_grads = run([batch])
    split, split_grads = run(None)
    assert split == pytest.approx(whole, rel=1e-5)
    assert any(g.abs().sum() > 0 for g in whole_grads)
    for a, b in zip(whole_grads, split_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_lora_mode_batches_a_films_coarse_examples_together_and_trains_the_encoder(setup):
    """Encoder LoRA on the CPU: every example lands in exactly one batch, a film's coarse examples share a batch
    and one encode, and the loss reaches the LoRA weights."""
    cfg = TrainConfig(mode="lora", batch_size=4, seed=0, device="cpu")
    trainer = Trainer(setup["backbone"], setup["encoder"], LABELS, cfg)
    assert trainer.mode == "lora" and trainer.encoder_peft is not None
    items = setup["items"][:2]
    rng = np.random.default_rng(0)
    examples = trainer._examples(items, fit_priors(items, LABELS), rng, train=True)
    assert len(examples) == 2 * len(LABELS) * 2  # films x labels x (coarse, fine)
    batches = trainer._batches(examples, rng)
    assert sorted(id(e) for b in batches for e in b) == sorted(id(e) for e in examples)
    assert all(len(b) <= cfg.batch_size for b in batches)
    for film in range(len(items)):
        coarse = [i for i, b in enumerate(batches) for e in b if e.kind == "coarse" and e.item == film]
        assert len(coarse) == len(LABELS) and len(set(coarse)) == 1
    batch = next(b for b in batches if any(e.kind == "coarse" for e in b))
    emb = trainer._encode_inputs(batch)
    assert emb.shape[0] == len(batch)
    shared = [i for i, e in enumerate(batch) if e.kind == "coarse"]
    assert torch.equal(emb[shared[0]], emb[shared[1]])
    emb.float().pow(2).mean().backward()
    lora_b = [p for n, p in trainer.encoder_peft.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None for p in lora_b) and any(p.grad.abs().sum() > 0 for p in lora_b)
    assert setup["backbone"].image_encoder is not trainer.backbone.image_encoder  # the caller's encoder untouched


def test_error_weighted_fine_sampling_gives_labels_still_learning_more_crops_at_the_same_cost(setup):
    """``fine_sampling="error"``: fine crops shared out by validation error, each label keeping its floor; the
    expected number of crops (the epoch's cost) unchanged; without weights one crop per label and film."""
    w = fine_weights({"left_lung": 0.97, "heart": 0.90, "left_clavicle": 0.60}, floor=0.25)
    assert sum(w.values()) == pytest.approx(3.0)
    assert w["left_clavicle"] > 1.5 > 1.0 > w["heart"] > w["left_lung"] >= 0.25
    assert fine_weights({"a": 0.8, "b": 0.8}, 0.25) == pytest.approx({"a": 1.0, "b": 1.0})
    assert fine_weights({"a": 1.0, "b": 1.0}, 0.25) == {"a": 1.0, "b": 1.0}  # no error anywhere: uniform

    trainer = Trainer(setup["backbone"], setup["encoder"], LABELS, TrainConfig(mode="lora", device="cpu", amp=False))
    items = setup["items"][:2] * 20  # 40 films: counts near their expectation
    priors = fit_priors(items, LABELS)

    def fine_counts(weights):
        ex = trainer._examples(items, priors, np.random.default_rng(0), train=True, fine_weights=weights)
        assert sorted(e.label for e in ex if e.kind == "coarse") == sorted(LABELS * len(items))  # coarse: unchanged
        return {lab: sum(e.kind == "fine" and e.label == lab for e in ex) for lab in LABELS}

    assert fine_counts(None) == {lab: len(items) for lab in LABELS}
    counts = fine_counts({"left_lung": 0.4, "heart": 1.6})
    assert 8 <= counts["left_lung"] <= 24 and 56 <= counts["heart"] <= 72
    with pytest.raises(ValueError, match="fine_sampling"):
        Trainer(setup["backbone"], setup["encoder"], LABELS, TrainConfig(mode="lora", fine_sampling="hard"))


def test_degraded_training_films_are_blurred_or_noised_in_film_space_and_keep_the_rest_as_it_was(setup):
    """``TrainConfig.degrade``: blur and noise are drawn in film space, inside the example's view only, from
    generators of their own: boxes and targets are those of an undegraded run with the same seed, a film's coarse
    examples keep one shared input, the films themselves are untouched."""
    from xray_textseg.train import degrade_film

    film = np.random.default_rng(0).uniform(0, 255, (300, 200)).astype(np.float32)
    box = (40, 50, 120, 200)
    out = degrade_film(film, box, np.random.default_rng(3), 1.0)
    changed = np.abs(out - film) > 1e-4
    ys, xs = np.nonzero(changed)
    assert changed.mean() > 0.1 and not changed[:40].any() and not changed[:, 130:].any()  # region + blur margin
    assert ys.min() >= 50 - 4 and xs.max() < 120 + 4
    assert out[50:200, 40:120].std() < film[50:200, 40:120].std()  # blurred (noise alone would raise it)
    assert degrade_film(film, box, np.random.default_rng(3), 0.0) is film

    items = setup["items"][:2]
    before = [it.image.pixels.copy() for it in items]
    priors = fit_priors(items, LABELS)

    def examples(p):
        trainer = Trainer(setup["backbone"], setup["encoder"], LABELS,
                          TrainConfig(mode="lora", device="cpu", amp=False, degrade=p))
        return trainer._examples(items, priors, np.random.default_rng(0), train=True)

    plain, worn = examples(0.0), examples(1.0)
    assert [(e.label, e.kind, e.item) for e in plain] == [(e.label, e.kind, e.item) for e in worn]
    for a, b in zip(plain, worn):
        assert np.allclose(a.box, b.box) and torch.equal(a.target, b.target)
        assert not torch.equal(a.x, b.x)
    for film_no in range(len(items)):
        coarse = [e.x for e in worn if e.kind == "coarse" and e.item == film_no]
        assert len(coarse) == len(LABELS) and all(torch.equal(coarse[0], x) for x in coarse[1:])
    assert all(np.array_equal(it.image.pixels, px) for it, px in zip(items, before))
    assert all(torch.equal(a.x, b.x) for a, b in zip(examples(1.0), worn))  # the seed decides it


def test_the_seed_alone_decides_a_training_run(setup):
    """Deterministic seeds: two LoRA runs with the same seed, the process's random stream drawn from in between
    (the new head's and LoRA's weights once followed it), give the same losses and weights; the caller's random
    stream is not reset by building a trainer."""
    items = setup["items"][:3]
    priors = fit_priors(items[:2], ("heart",))
    runs = []
    for _ in range(2):
        torch.rand(7)
        before = torch.get_rng_state()
        cfg = TrainConfig(mode="lora", epochs=1, batch_size=4, seed=3, device="cpu", warmup_steps=1)
        trainer = Trainer(setup["backbone"], setup["encoder"], ("heart",), cfg)
        assert torch.equal(torch.get_rng_state(), before)
        result = trainer.fit(items[:2], items[2:], priors)
        runs.append((result.history[0]["loss"], result.history[0]["val_dice"], trainer._state()))
    (loss_a, val_a, state_a), (loss_b, val_b, state_b) = runs
    assert loss_a == loss_b and val_a == val_b
    for part in ("head", "decoder", "lora"):
        assert state_a[part].keys() == state_b[part].keys()
        assert all(torch.equal(state_a[part][k], state_b[part][k]) for k in state_a[part]), part


def test_lora_adapter_trained_on_cpu_carries_the_encoder_and_round_trips(setup, tmp_path):
    from xray_textseg.backbones import cpu_has_bf16

    cfg = TrainConfig(mode="lora", epochs=1, batch_size=4, seed=0, device="cpu", val_fraction=0.5, warmup_steps=1)
    log = tmp_path / "train.jsonl"
    items = setup["items"][:2]
    meta = train_adapter(items, tmp_path / "v0001", backbone=setup["backbone"], text_encoder=setup["encoder"],
                         labels=("heart",), cfg=cfg, log_path=log)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    start = next(r for r in rows if r["event"] == "start")
    # bf16 only where the CPU has it and a LoRA step measured faster in it
    assert start["mode"] == "lora" and start["bf16"] == (cpu_has_bf16() and start["precision_probe"]["bf16"])
    assert [r["mode"] for r in rows if r["event"] == "epoch"] == ["lora"]
    assert meta["mode"] == "lora" and (tmp_path / "v0001" / "adapter_config.json").exists()
    assert meta["size_bytes"] < 10_000_000  # the 10 MB
    p = Predictor(setup["backbone"], labels=("heart",), text_encoder=setup["encoder"])
    p.load_adapter(tmp_path / "v0001")
    assert p.encoder_version == "v0001"
    val_items = [it for it in items if it.name in meta["val_names"]]
    assert validate(p, val_items, ("heart",))["dice"] == meta["validation"]["dice"]


def test_lora_targets_choose_the_adapted_encoder_layers(setup):
    """``lora_targets`` narrows LoRA to some layers (a shorter backward on slow CPUs); the default adapts every
    attention qkv / proj and never the patch embedding."""
    def adapted(cfg):
        trainer = Trainer(setup["backbone"], setup["encoder"], ("heart",), cfg)
        return {n.split(".lora_A")[0] for n, _ in trainer.encoder_peft.named_parameters() if ".lora_A" in n}

    default = adapted(TrainConfig(mode="lora", device="cpu", amp=False))
    assert len(default) == 20 and all(n.endswith(("attn.qkv", "attn.proj")) for n in default)
    assert {n.split("layers.")[1][0] for n in default} == {"1", "2", "3"}
    late = adapted(TrainConfig(mode="lora", device="cpu", amp=False,
                               lora_targets=r".*layers\.3\..*\.attn\.(qkv|proj)$"))
    assert late == {n for n in default if ".layers.3." in n} and len(late) == 4


def test_lora_training_keeps_the_encoders_batchnorm_statistics(setup):
    """LoRA trains attention weights only: the frozen encoder's BatchNorm running statistics must not follow
    the training batches (they did when the encoder was put in train mode)."""
    cfg = TrainConfig(mode="lora", epochs=1, batch_size=4, seed=0, device="cpu", warmup_steps=1)
    trainer = Trainer(setup["backbone"], setup["encoder"], ("heart",), cfg)
    items = setup["items"][:2]
    trainer.fit(items[:1], items[1:], fit_priors(items[:1], ("heart",)))

    def stats(module):
        return {n.split("base_model.model.")[-1]: b.clone() for n, b in module.named_buffers() if "running" in n}

    before, after = stats(setup["backbone"].image_encoder), stats(trainer.backbone.image_encoder)
    assert before and before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not trainer.backbone.image_encoder.training


def test_split_keeps_the_sides_an_earlier_adapter_gave_its_films(setup):
    """Retraining on more films: the films an earlier adapter trained / validated on stay on their side, only the
    new ones are shared out (validation topped up to its fraction), deterministically."""
    from xray_textseg.train import split_items

    more = load_folder(SAMPLE, LABELS, names=CASES + ["chest_004", "chest_005", "chest_006", "chest_007"])
    meta = setup["meta"]  # trained on CASES: 3 training films, 1 validation film
    keep = earlier_split(setup["path"])
    assert sorted(h for h, side in keep.items() if side == "val") == meta["val_images"]
    train, val = split_items(more, 0.25, 0, keep=keep)
    assert set(meta["val_names"]) <= {it.name for it in val} and set(meta["train_names"]) <= {it.name for it in train}
    assert len(val) == 2 and len(train) == 6 and not {it.name for it in val} & {it.name for it in train}
    again = split_items(list(reversed(more)), 0.25, 0, keep=keep)
    assert sorted(it.name for it in again[1]) == sorted(it.name for it in val)
    # without an earlier adapter the split is the plain one (which may put its training films in validation)
    plain = split_items(more, 0.25, 0)
    assert len(plain[1]) == 2 and plain == split_items(more, 0.25, 0, keep={})


def test_training_continues_from_an_adapter_with_its_weights_and_its_split(setup, tmp_path):
    """init_from: the trainer starts from the adapter's head, decoder and encoder LoRA (not the base model's), the
    earlier films keep their sides, the metadata names the adapter; shapes that do not fit are refused by name."""
    import shutil

    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    items = load_folder(SAMPLE, ("heart",), names=CASES)
    cfg = TrainConfig(mode="lora", epochs=1, batch_size=4, seed=0, device="cpu", val_fraction=0.34, warmup_steps=1)
    first = train_adapter(items[:3], tmp_path / "v0001", backbone=setup["backbone"], text_encoder=setup["encoder"],
                          labels=("heart",), cfg=cfg)
    # a copy whose head and LoRA differ from any fresh ones (a 1-epoch run may keep its untrained epoch 0)
    source = tmp_path / "source"
    shutil.copytree(tmp_path / "v0001", source)
    noise = torch.Generator().manual_seed(1)
    for name in ("adapter_model.safetensors", "head.safetensors"):
        state = load_file(str(source / name))
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=noise) if v.is_floating_point() else v
                   for k, v in state.items()}, str(source / name))
    from xray_textseg.adapters import checksums

    meta = json.loads((source / "metadata.json").read_text())  # changed on purpose: its checksums say so
    (source / "metadata.json").write_text(json.dumps({**meta, "checksums": checksums(source)}))
    saved = load_file(str(source / "adapter_model.safetensors"))
    adapter = load_adapter(source)
    trainer = Trainer(setup["backbone"], setup["encoder"], ("heart",),
                      TrainConfig(**{**cfg.__dict__, "init_from": str(source)}))
    head = trainer.head.state_dict()
    assert all(torch.equal(head[k], v) for k, v in adapter.head_state.items())
    decoder = trainer.backbone.mask_decoder.state_dict()
    assert all(torch.equal(decoder[k], v.float()) for k, v in adapter.decoder_state.items())
    lora = get_peft_model_state_dict(trainer.encoder_peft)
    assert saved and lora.keys() == saved.keys() and all(torch.equal(lora[k], saved[k]) for k in saved)
    fresh = Trainer(setup["backbone"], setup["encoder"], ("heart",), cfg)
    assert not torch.equal(fresh.head.state_dict()["mlp.0.weight"], head["mlp.0.weight"])
    assert not any(torch.equal(v, saved[k]) for k, v in get_peft_model_state_dict(fresh.encoder_peft).items())

    cont = TrainConfig(**{**cfg.__dict__, "init_from": str(tmp_path / "v0001")})

    meta = train_adapter(items, tmp_path / "v0002", backbone=setup["backbone"], text_encoder=setup["encoder"],
                         labels=("heart",), cfg=cont)
    assert meta["continued_from"] == "v0001" and meta["training"]["config"]["init_from"] == str(tmp_path / "v0001")
    assert set(first["val_names"]) <= set(meta["val_names"]) and set(first["train_names"]) <= set(meta["train_names"])

    for change, match in (({"n_tokens": 2}, "n_tokens is 4, this run's is 2"),
                          ({"lora_rank": 4}, "LoRA r is 8, this run's is 4"),
                          ({"mode": "cached"}, "cached mode")):
        with pytest.raises(ValueError, match=match):
            Trainer(setup["backbone"], setup["encoder"], ("heart",), TrainConfig(**{**cont.__dict__, **change}))
    assert continue_problem(tmp_path / "nowhere", setup["backbone"], setup["encoder"], cfg).startswith("adapter not")
    # an adapter without encoder LoRA (the cached fixture) starts a lora run: its head and decoder, new LoRA
    cached = Trainer(setup["backbone"], setup["encoder"], LABELS,
                     TrainConfig(**{**cfg.__dict__, "init_from": str(setup["path"])}))
    assert torch.equal(cached.head.state_dict()["mlp.0.weight"], load_adapter(setup["path"]).head_state["mlp.0.weight"])


def test_a_padded_training_film_is_trained_on_its_exposed_field_and_recorded_by_the_whole_film():
    """Training sees the pixels serving sees (the predictor works on the exposed field of a film padded onto a
    larger canvas): the item is cropped with its masks, and the split and the metadata keep the whole film's hash,
    so a retraining or a retune finds the same films again."""
    from xray_textseg.io import load_mask, load_radiograph, radiograph_from_array
    from xray_textseg.train import TrainItem, split_items

    film = load_radiograph(SAMPLE / "images" / "chest_004.png")
    mask = load_mask(SAMPLE / "labels" / "heart" / "chest_004.png", film.shape) > 0
    pad = ((film.shape[0] // 3, film.shape[0] // 3), (0, 0))
    canvas = radiograph_from_array(np.pad(film.pixels, pad, constant_values=float(film.pixels.max())))
    item = TrainItem("chest_004", canvas, {"heart": np.pad(mask, pad)})
    cropped = item.on_field()
    assert cropped is not item and cropped.image.shape[0] < 0.8 * canvas.shape[0]
    assert cropped.hash == item.hash == canvas.content_hash() != cropped.image.content_hash()
    assert cropped.masks["heart"].shape == cropped.image.shape and cropped.masks["heart"].sum() == mask.sum()
    assert cropped.on_field() is cropped  # nothing left to crop
    plain = TrainItem("chest_004", film, {"heart": mask})
    assert plain.on_field() is plain  # a film without wide borders is trained on whole
    keep = {item.hash: "val"}
    _, val = split_items([cropped, TrainItem("other", load_radiograph(SAMPLE / "images" / "chest_005.png"),
                                             {"heart": mask})], 0.5, seed=0, keep=keep)
    assert [v.name for v in val] == ["chest_004"]


def test_a_training_film_lying_askew_is_trained_upright():
    """As the predictor sees it: a film turned on its canvas is trained on turned upright, its masks with it, and
    recorded by the whole film's hash."""
    from scipy import ndimage
    from xray_textseg.io import load_mask, load_radiograph, radiograph_from_array
    from xray_textseg.metrics import dice
    from xray_textseg.train import TrainItem

    def turn(a):
        return ndimage.rotate(np.asarray(a, np.float32), -6.0, reshape=True, order=1, mode="constant")

    film = load_radiograph(SAMPLE / "images" / "limb_003.png")
    masks = {lab: load_mask(SAMPLE / "labels" / lab / "limb_003.png", film.shape) > 0 for lab in ("femur", "tibia")}
    item = TrainItem("limb_003", radiograph_from_array(turn(film.pixels)), {k: turn(m) > 0.5 for k, m in masks.items()})
    upright = item.on_field()
    assert upright is not item and upright.hash == item.hash
    h, w = upright.image.shape
    assert film.shape[0] - 6 <= h <= film.shape[0] and film.shape[1] - 6 <= w <= film.shape[1]
    dy, dx = (film.shape[0] - h) // 2, (film.shape[1] - w) // 2
    for lab, m in masks.items():
        assert upright.masks[lab].shape == upright.image.shape
        assert dice(upright.masks[lab], m[dy:dy + h, dx:dx + w]) > 0.95, lab


def test_the_femurs_training_angle_says_when_a_leg_leans():
    """``PriorBoxes.lean``: the turn that brings a femur mask to its training femurs' mean angle, only past 2 sd."""
    from xray_textseg.priors import PriorBoxes, principal_axis

    def bar(degrees, shape=(400, 100)):
        ys, xs = np.mgrid[0:shape[0], 0:shape[1]]
        t = np.tan(np.radians(degrees))
        return (np.abs(xs - (50 + t * (ys - 200))) < 5) & (ys > 40) & (ys < 360)

    assert abs(principal_axis(bar(8.0))[0] - 8.0) < 0.3 and principal_axis(bar(8.0))[1] > 5
    priors = PriorBoxes()
    priors.fit_shape("femur", [bar(a) for a in (2.0, 3.0, 4.0, 3.5, 2.5)])
    mean, sd = priors.shape["femur"]["angle"]
    assert abs(mean - 3.0) < 0.2 and 0.4 < sd < 1.0
    assert priors.lean(bar(4.5)) is None  # within 2 sd (at least 1 degree): as the training femurs lean
    assert abs(priors.lean(bar(12.0)) - (mean - 12.0)) < 0.3
    assert abs(priors.lean(bar(-5.0)) - (mean + 5.0)) < 0.3
    assert priors.lean(np.zeros((400, 100), bool)) is None
    assert PriorBoxes.from_json(priors.to_json()).shape["femur"]["angle"] == priors.shape["femur"]["angle"]
    assert PriorBoxes().lean(bar(12.0)) is None  # an adapter fitted before the angle was kept
