"""Zero-shot text-prompted inference with the real packaged LiteMedSAM on sample and real films."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from conftest import SAMPLE, randomize_lora, real_dir
from xray_textseg.io import load_mask, load_radiograph
from xray_textseg.metrics import dice
from xray_textseg.predictor import tile_boxes
from xray_textseg.vocabulary import UnknownLabelError


def centroid_x(mask: np.ndarray) -> float:
    return float(np.nonzero(mask)[1].mean()) / mask.shape[1]


def test_laterality_on_sample_chest(fresh_predictor):
    """'right lung' is the patient's right: the image-left half on a PA film, and it matches the truth."""
    image = load_radiograph(SAMPLE / "images" / "chest_000.png")
    fresh_predictor.set_image(image)
    pred = fresh_predictor.predict("right lung, left lung")
    right, left = pred.mask("right_lung"), pred.mask("left_lung")
    assert centroid_x(right) < 0.5 < centroid_x(left)
    truth = {lab: load_mask(SAMPLE / "labels" / lab / "chest_000.png", image.shape) > 0
             for lab in ("right_lung", "left_lung")}
    # each mask overlaps its own lung, not the other one (zero-shot quality itself is benchmarked, not asserted)
    assert dice(right, truth["right_lung"]) > 0.5 and dice(right, truth["left_lung"]) < 0.1
    assert dice(left, truth["left_lung"]) > 0.5 and dice(left, truth["right_lung"]) < 0.1
    assert pred.mode == "zero-shot"
    assert [r.prompt_source for r in pred.results] == ["prior", "prior"]


def test_second_prompt_reuses_the_embedding(fresh_predictor):
    fresh_predictor.set_image(SAMPLE / "images" / "chest_001.png")
    first = fresh_predictor.predict("heart", refine=False)
    assert first.cache == {"hits": 0, "misses": 1, "result_hits": 0}
    second = fresh_predictor.predict("left lung", refine=False)
    assert second.cache == {"hits": 1, "misses": 0, "result_hits": 0}
    # the same pixels under another name hit the caches too (keyed by content, not path)
    fresh_predictor.set_image(load_radiograph(SAMPLE / "images" / "chest_001.png").pixels.copy())
    assert fresh_predictor.predict("heart", refine=False).cache["result_hits"] == 1
    assert fresh_predictor.predict("right lung", refine=False).cache == {"hits": 1, "misses": 0, "result_hits": 0}



def test_a_request_ends_the_warm_up_step_in_progress_and_the_step_runs_again(fresh_predictor):
    """A request that arrives during a background warm-up step does not wait for the step's encode: the step is
    ended (ONNX Runtime), the request is answered, and the step runs again after it with the same result."""
    p = fresh_predictor
    current = p.set_image(SAMPLE / "images" / "chest_000.png")
    other = load_radiograph(SAMPLE / "images" / "chest_005.png")
    before, done = p.interrupted_steps, {}
    worker = threading.Thread(target=lambda: done.update(n=p.warm(other, ["heart", "left lung"])))
    worker.start()
    while p._background is None and worker.is_alive():  # a step holds the lock now
        time.sleep(0.001)
    assert p.set_image(current) is current  # as the server does: set the request's image, then predict
    served = p.predict("right lung", refine=False)
    worker.join(600)
    assert done == {"n": 2} and p.interrupted_steps > before
    assert served.mask("right_lung").any() and p._image is current  # the warm-up put chest_000 back
    p.set_image(other)
    warmed = p.predict("heart, left lung")
    assert warmed.cache["result_hits"] == 2
    p.results.clear()
    again = p.predict("heart, left lung")
    for label in ("heart", "left_lung"):
        assert np.array_equal(again.mask(label), warmed.mask(label))


def test_warm_fills_the_caches_without_changing_the_current_image(fresh_predictor):
    """The background warm-up (prefetch) encodes another film and segments the asked labels into the result
    cache; the film being served stays current, and a request for a warmed label decodes nothing."""
    p = fresh_predictor
    p.set_image(SAMPLE / "images" / "chest_000.png")
    served = p.predict("left lung", refine=False)
    other = load_radiograph(SAMPLE / "images" / "chest_003.png")
    assert p.unsegmented(other, ["left lung", "heart"]) == ["left_lung", "heart"]
    assert p.warm(other, ["heart"]) == 1
    assert p.warm(other, ["heart"]) == 0  # already there
    assert p.unsegmented(other, ["left lung", "heart"]) == ["left_lung"]
    assert p.unsegmented(p._image, ["left lung"]) == ["left_lung"]  # chest_000: asked without refine only
    again = p.predict("left lung", refine=False)  # still chest_000
    assert again.cache["result_hits"] == 1 and np.array_equal(again.mask("left_lung"), served.mask("left_lung"))
    assert p.predict("heart", image=other).cache == {"hits": 0, "misses": 0, "result_hits": 1}  # other is current
    assert p.predict("right lung", refine=False).cache == {"hits": 1, "misses": 0, "result_hits": 0}  # film encoded
    assert p.warm(load_radiograph(SAMPLE / "images" / "chest_004.png"), ["heart"], should_stop=lambda: True) == 0

def test_repeated_labels_come_from_the_result_cache(fresh_predictor):
    """A label asked again on the same image (same weights, box, settings) is not decoded again; the mask is
    the one computed first. Another box, another adapter state or refine=False are new results."""
    p = fresh_predictor
    p.set_image(SAMPLE / "images" / "chest_002.png")
    first = p.predict("heart, left lung")
    again = p.predict("Left Lung, Heart")
    assert again.cache == {"hits": 0, "misses": 0, "result_hits": 2}
    assert [r.label for r in again.results] == ["left_lung", "heart"]
    for r in again.results:
        ref = next(f for f in first.results if f.label == r.label)
        assert np.array_equal(r.mask, ref.mask) and r.score == ref.score and r.box == ref.box
    mixed = p.predict("heart, right lung")
    assert mixed.cache["result_hits"] == 1 and mixed.cache["misses"] >= 1  # right lung's crop is new
    box = [float(v) for v in first.results[0].box]
    assert p.predict("heart", boxes={"heart": box}).cache["result_hits"] == 0
    assert p.predict("heart", refine=False).cache["result_hits"] == 0
    p.unload_adapter()  # any adapter load/unload starts over
    assert p.predict("heart").cache["result_hits"] == 0


def test_unknown_prompt_names_known_labels(fresh_predictor):
    fresh_predictor.set_image(SAMPLE / "images" / "chest_000.png")
    with pytest.raises(UnknownLabelError, match="left lung"):
        fresh_predictor.predict("LL")


def test_user_box_is_used(fresh_predictor):
    image = load_radiograph(SAMPLE / "images" / "chest_002.png")
    truth = load_mask(SAMPLE / "labels" / "heart" / "chest_002.png", image.shape) > 0
    ys, xs = np.nonzero(truth)
    box = [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]
    fresh_predictor.set_image(image)
    pred = fresh_predictor.predict("heart", boxes={"heart": box})
    assert pred.results[0].prompt_source == "user_box"
    assert dice(pred.mask("heart"), truth) > 0.8
    # the box says where the heart is: only its crop was encoded, the whole film was not (no coarse pass)
    assert pred.cache == {"hits": 0, "misses": 1, "result_hits": 0} and pred.results[0].box == box
    mixed = fresh_predictor.predict("heart, left lung", boxes={"heart": [v + 2 for v in box]})
    assert mixed.cache["misses"] == 3  # the film for the left lung's coarse pass, then both crops
    assert [r.prompt_source for r in mixed.results] == ["user_box", "prior"]
    without_refine = fresh_predictor.predict("heart", boxes={"heart": box}, refine=False)
    assert without_refine.cache == {"hits": 1, "misses": 0, "result_hits": 0}  # the coarse pass is the answer
    assert dice(without_refine.mask("heart"), truth) > 0.5


def test_a_film_padded_onto_a_wide_canvas_is_segmented_on_its_exposed_field(fresh_predictor):
    """Black columns as wide as the film on both sides (an export letterboxed to landscape): the prior boxes are
    placed in the exposed field, not in the canvas, and the masks come back in the canvas's pixels, empty in the
    padding, exactly what the field alone gives. A user box drawn on the canvas means the same place."""
    from xray_textseg.io import crop_radiograph, radiograph_from_array

    film = load_radiograph(SAMPLE / "images" / "chest_003.png")
    h, w = film.shape
    canvas = radiograph_from_array(np.pad(film.pixels, ((0, 0), (w // 2, w // 2)), constant_values=0.0))
    truth = {lab: np.pad(load_mask(SAMPLE / "labels" / lab / "chest_003.png", film.shape) > 0,
                         ((0, 0), (w // 2, w // 2))) for lab in ("right_lung", "left_lung", "heart")}
    p = fresh_predictor
    p.set_image(canvas)
    x0, y0, x1, y1 = p.field.box
    assert p.field.rotation is None
    assert x0 >= w // 2 and x1 <= w // 2 + w and x1 - x0 > 0.8 * w and y1 - y0 > 0.8 * h
    pred = p.predict("right lung, left lung")
    assert pred.image_shape == canvas.shape
    for r in pred.results:
        assert r.mask.shape == canvas.shape and not r.mask[:, :x0].any() and not r.mask[:, x1:].any()
        assert dice(r.mask, truth[r.label]) > 0.5, r.label
        assert x0 <= r.box[0] < r.box[2] <= x1
    box = [float(v) for v in np.argwhere(truth["heart"])[:, ::-1].min(0)] + \
        [float(v) + 1 for v in np.argwhere(truth["heart"])[:, ::-1].max(0)]
    boxed = p.predict("heart", boxes={"heart": box})
    assert dice(boxed.mask("heart"), truth["heart"]) > 0.8 and boxed.results[0].box == box

    p.cache.clear()
    p.results.clear()
    field = crop_radiograph(canvas, p.field.box)
    p.set_image(field)
    assert p.field is None  # the field of a field is all of it
    alone = p.predict("right lung, left lung")
    shifted = {"heart": [box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0]}
    alone_boxed = p.predict("heart", boxes=shifted)
    for r, a in zip(pred.results + boxed.results, alone.results + alone_boxed.results):
        assert np.array_equal(r.mask[y0:y1, x0:x1], a.mask), r.label
        assert r.score == a.score


def _askew(pixels: np.ndarray, degrees: float, order: int = 1) -> np.ndarray:
    from scipy import ndimage

    return ndimage.rotate(pixels.astype(np.float32), degrees, reshape=True, order=order, mode="constant", cval=0.0)


def test_a_film_lying_askew_on_its_canvas_is_segmented_upright(fresh_predictor):
    """A film scanned or exported turned by 9 degrees onto a black canvas: the pipeline segments the film turned
    upright and answers in the canvas's pixels, nothing in the black corners, as well as on the upright film (the
    field is the film less a pixel or two per side, so zero-shot masks need not be identical); a box drawn on the
    canvas means the same place."""
    from xray_textseg.io import radiograph_from_array

    film = load_radiograph(SAMPLE / "images" / "chest_003.png")
    canvas = radiograph_from_array(_askew(film.pixels, 9.0))
    truth = {lab: load_mask(SAMPLE / "labels" / lab / "chest_003.png", film.shape) > 0
             for lab in ("right_lung", "left_lung", "heart")}
    p = fresh_predictor
    p.set_image(film)
    assert p.field is None
    upright = p.predict("right lung, left lung")
    p.set_image(canvas)
    assert p.field is not None and abs(abs(p.field.rotation[0]) - 9.0) < 0.3
    turned = p.predict("right lung, left lung")
    assert turned.image_shape == canvas.shape
    outside = _askew(np.ones(film.shape), 9.0, order=0) < 0.5
    for u, t in zip(upright.results, turned.results):
        assert t.mask.shape == canvas.shape and not (t.mask & outside).any()
        on_canvas = _askew(truth[t.label], 9.0) > 0.5
        assert dice(t.mask, on_canvas) > dice(u.mask, truth[u.label]) - 0.05, t.label
        x0, y0, x1, y1 = t.box
        assert 0 <= x0 < x1 <= canvas.shape[1] and 0 <= y0 < y1 <= canvas.shape[0]
    assert centroid_x(turned.mask("right_lung")) < 0.5 < centroid_x(turned.mask("left_lung"))
    heart = _askew(truth["heart"], 9.0) > 0.5
    ys, xs = np.nonzero(heart)
    boxed = p.predict("heart", boxes={"heart": [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]})
    assert dice(boxed.mask("heart"), heart) > 0.8


def test_label_map_values_and_overlap_order(fresh_predictor):
    fresh_predictor.set_image(SAMPLE / "images" / "chest_000.png")
    pred = fresh_predictor.predict("left lung, left clavicle", refine=False)
    lm = pred.label_map_with_values({"left_lung": 2, "left_clavicle": 5})
    assert set(np.unique(lm)) <= {0, 2, 5}
    # the clavicle (smaller) is painted last, so all of its pixels keep its value
    assert (lm[pred.mask("left_clavicle")] == 5).all()


def test_tile_boxes_cover_a_long_box():
    tiles = tile_boxes([10, 0, 30, 200], max_aspect=2.0)
    assert len(tiles) >= 4
    assert tiles[0][1] == 0 and tiles[-1][3] == pytest.approx(200)
    for t in tiles:
        assert (t[3] - t[1]) <= 2.0 * (t[2] - t[0]) + 1e-3
    for a, b in zip(tiles, tiles[1:]):
        assert b[1] < a[3]  # overlapping, no gaps
    assert len(tile_boxes([0, 0, 100, 120])) == 1
    assert len(tile_boxes([0, 0, 100, 250])) == 1  # lung-shaped boxes are not cut


def test_right_lung_on_a_real_jsrt_film(fresh_predictor):
    """Acceptance: on a real PA chest film 'right lung' overlaps the patient's right lung (image left)."""
    data = real_dir("jsrt_chest")
    img = sorted((data / "images").glob("*.png"))[0]
    image = load_radiograph(img)
    truth_r = load_mask(data / "labels" / "right_lung" / img.name, image.shape) > 0
    truth_l = load_mask(data / "labels" / "left_lung" / img.name, image.shape) > 0
    assert centroid_x(truth_r) < 0.5  # the data's own convention
    fresh_predictor.set_image(image)
    mask = fresh_predictor.predict("right lung").mask("right_lung")
    assert dice(mask, truth_r) > 0.5
    assert dice(mask, truth_l) < 0.1


def _adapter(tmp_path, predictor, name: str, lora: bool, lora_seed: int | None = None):
    """A valid adapter written with the real ``save_adapter`` without training: an untrained head marked usable,
    the base decoder and, with ``lora``, a fresh (zero-initialised) encoder LoRA, or with ``lora_seed`` one whose
    matrices are drawn from that seed (an encoder that computes something else). Its predictions mean nothing;
    it exercises loading and the cache keys."""
    import copy

    from xray_textseg.adapters import lora_encoder, save_adapter
    from xray_textseg.text import PromptHead

    enc = predictor.text_encoder
    head = PromptHead(enc.dim, n_tokens=4, hidden=64)
    head.trained.fill_(True)
    peft = lora_encoder(copy.deepcopy(predictor.backbone.image_encoder)) if lora else None
    if peft is not None and lora_seed is not None:
        randomize_lora(peft, lora_seed, b_scale=0.02)
    meta = {"backbone": predictor.backbone.name, "text_encoder": enc.name, "text_dim": enc.dim, "n_tokens": 4,
            "head_hidden": 64, "labels": ["heart", "left_lung"]}
    return save_adapter(tmp_path / name, head=head, decoder=predictor.backbone.mask_decoder, encoder_peft=peft,
                        priors=predictor.priors.to_json(), metadata=meta)


def test_cache_follows_the_encoder_across_adapter_changes(fresh_predictor, tmp_path):
    """Embeddings are reused while the image encoder is unchanged (no adapter, or a head/decoder-only adapter)
    and recomputed when an adapter changes the encoder (LoRA); unloading it hits the base entries again."""
    p = fresh_predictor
    p.set_image(SAMPLE / "images" / "chest_001.png")
    miss, hit = {"hits": 0, "misses": 1, "result_hits": 0}, {"hits": 1, "misses": 0, "result_hits": 0}
    assert p.predict("heart", refine=False).cache == miss
    p.load_adapter(_adapter(tmp_path, p, "head_only", lora=False))
    pred = p.predict("heart", refine=False)
    assert pred.mode == "adapter" and pred.cache == hit
    p.load_adapter(_adapter(tmp_path, p, "with_lora", lora=True))
    assert p.encoder_version == "with_lora"
    assert p.predict("heart", refine=False).cache == miss  # new encoder: re-encoded
    assert p.predict("left lung", refine=False).cache == hit  # and cached under it
    p.unload_adapter()
    pred = p.predict("heart", refine=False)
    assert pred.mode == "zero-shot" and pred.cache == hit


def test_a_lora_adapter_encodes_through_onnxruntime_with_pytorchs_masks(fresh_predictor, tmp_path):
    """The served CPU predictor runs a LoRA adapter's merged encoder through ONNX Runtime (a graph of its own), with
    the masks PyTorch gives; unloading goes back to the base graph."""
    p = fresh_predictor
    bb = p.backbone
    assert bb._ort is not None, "the served CPU predictor runs ONNX Runtime"
    p.load_adapter(_adapter(tmp_path, p, "lora_random", lora=True, lora_seed=0))
    fast_encoder = bb._ort_adapter_encoders[-1]
    assert fast_encoder.source is bb.image_encoder and "_encoder_" in fast_encoder.path.name
    p.set_image(SAMPLE / "images" / "chest_001.png")
    prompt = "heart, left lung, right clavicle"
    fast = p.predict(prompt)
    saved, bb._ort_adapter_encoders = bb._ort_adapter_encoders, []  # the same adapter encoded in PyTorch
    try:
        p.cache.clear()
        p.results.clear()
        ref = p.predict(prompt)
    finally:
        bb._ort_adapter_encoders = saved
    for a, b in zip(fast.results, ref.results):
        assert a.label == b.label and a.mask.any()
        assert dice(a.mask, b.mask) > 0.995
    base = _adapter(tmp_path, p, "lora_zero", lora=True)  # a fresh LoRA: the base weights under another graph
    p.load_adapter(base)
    assert bb._ort_adapter_encoders[-1].source is bb.image_encoder
    p.unload_adapter()
    assert bb._ort.current(bb.image_encoder)


def test_batched_fine_pass_matches_one_crop_at_a_time(fresh_predictor):
    """The fine pass batched (crops encoded together, one decoder call for all labels and tiles) gives the
    masks, boxes and scores of the original one-crop-at-a-time loop; a repeated request hits every crop."""
    p = fresh_predictor
    p.set_image(SAMPLE / "images" / "limb_000.png")  # femur and tibia: long boxes, several tiles each
    try:
        p.batch_fine = False
        one = p.predict("femur, tibia")
        p.cache.clear()
        p.batch_fine = True
        batched = p.predict("femur, tibia")
    finally:
        p.batch_fine = True
    n = batched.cache["misses"]
    assert n == one.cache["misses"] and n >= 3  # whole film + at least one crop per label
    for a, b in zip(one.results, batched.results):
        assert a.label == b.label and a.box == b.box
        assert dice(a.mask, b.mask) > 0.999
        assert b.score == pytest.approx(a.score, abs=1e-4)
    assert p.predict("femur, tibia").cache == {"hits": 0, "misses": 0, "result_hits": 2}
    p.results.clear()
    assert p.predict("femur, tibia").cache == {"hits": n, "misses": 0, "result_hits": 0}


def test_reduced_precision_needs_cuda(predictor):
    from xray_textseg.predictor import Predictor

    if predictor.backbone.device.type == "cuda":
        pytest.skip("CPU predictor only")
    with pytest.raises(ValueError, match="CUDA"):
        Predictor(predictor.backbone, precision="bf16")
    with pytest.raises(ValueError, match="unknown precision"):
        Predictor(predictor.backbone, precision="fp8")
