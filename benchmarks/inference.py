"""Engine-level inference latency: cold and warm requests, several prompts per request, the naive baseline
and a before/after row for every optimisation, in one run.

    python benchmarks/inference.py --out docs/perf/inference.json [--device cuda] [--repeats 5] [--refine on|off]

Scenarios (each repeat uses another image, all scenarios run on it in turn, so drift from other jobs on the
machine hits them alike):

* ``cold, 1 prompt``: a new image (empty cache): read the file, encode, decode.
* ``cold, 1 prompt with a box``: the same with a user box: only the box's crop is encoded.
* ``warm, new prompt``: a structure not asked before on an image whose whole film is encoded
  (with refinement its crop still has to be encoded).
* ``warm, repeated prompt``: every embedding cached: decoding only.
* ``5 prompts, new image`` / ``5 prompts, image encoded`` / ``5 prompts, all cached``: one request.
* ``naive 5 prompts``: segment_anything style, what a plain SamPredictor loop does: every prompt
  re-encodes the image (and its crop) in PyTorch eager, no cache, fp32, ``torch.no_grad`` (not
  inference_mode), one prompt per decoder call. Its masks are compared with ours (Dice) to show the speed-up changes nothing.

``..., result cache``: the served default, where a label asked again on the same image comes from the result
cache (the other rows run with it off, so they time decoding).

Before/after rows: embedding cache off (``cache_size=0``), prompts sent one per request instead of in one
decoder pass, batched fine pass off (``batch_fine=False``), encoder and decoder in PyTorch instead of ONNX Runtime
(CPU), autograd mode (grad / no_grad / inference_mode, PyTorch only) for encoder and decoder, intra-op threads
(``--threads 1 2``), LoRA adapter merged vs unmerged and its merged encoder in ONNX Runtime vs PyTorch (CPU), and
on CUDA precision fp32 / TF32 / bf16 with encoder throughput at batch 1 / 4 / 16 (larger batches).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf_common import REPO, machine_info, peak_rss_mb, rss_mb, summary, table, write_json

CHEST5 = ["left lung", "right lung", "heart", "left clavicle", "right clavicle"]
LIMB = ["femur", "tibia"]


def list_images(data: str | None, kind: str) -> list[Path]:
    if data:
        root = Path(data)
        folder = root / "images" if (root / "images").is_dir() else root
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff",
                                                                          ".dcm", ".nii", ".gz"))
    return sorted((REPO / "sample_data" / "images").glob(f"{kind}_*.png"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backbone", default="litemedsam")
    ap.add_argument("--checkpoint", default=None, help="weights for medsam_vit_b / sam_vit_b")
    ap.add_argument("--repeats", type=int, default=5, help="images (one per repeat)")
    ap.add_argument("--refine", choices=("on", "off"), default="on")
    ap.add_argument("--data", default=None, help="folder with images/ (default: sample_data chest films)")
    ap.add_argument("--kind", choices=("chest", "limb"), default="chest", help="sample films and prompt set")
    ap.add_argument("--threads", type=int, nargs="*", default=None,
                    help="intra-op thread counts to compare (default: 1 and all cores); the first run uses torch's "
                         "default unless --main-threads is given")
    ap.add_argument("--encode-batch", type=int, default=None, help="crops per encoder call (predictor default)")
    ap.add_argument("--main-threads", type=int, default=None, help="torch.set_num_threads for the main scenarios")
    ap.add_argument("--skip", nargs="*", default=[], choices=("naive", "ablations", "gradmode", "threads", "adapter",
                                                              "gpu"), help="sections to leave out")
    ap.add_argument("--onnxruntime", choices=("on", "off"), default="on",
                    help="CPU encodes through ONNX Runtime (the served default on CPU); a before/after row either way")
    ap.add_argument("--out", default=None, help="JSON results")
    args = ap.parse_args(argv)

    import torch
    from xray_textseg.backbones import build_backbone, resolve_device
    from xray_textseg.io import load_radiograph
    from xray_textseg.metrics import dice
    from xray_textseg.predictor import Predictor

    if args.main_threads:
        torch.set_num_threads(args.main_threads)
    device = resolve_device(args.device)
    machine = machine_info(device)
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    prompts = CHEST5 if args.kind == "chest" else LIMB
    images = list_images(args.data, args.kind)
    if len(images) < args.repeats:
        raise SystemExit(f"{args.repeats} repeats need {args.repeats} images, found {len(images)}")
    images = images[: args.repeats]
    refine = args.refine == "on"

    t0 = time.perf_counter()
    backbone = build_backbone(args.backbone, args.checkpoint, device=device)
    ort = args.onnxruntime == "on" and not cuda and backbone.enable_onnxruntime()
    machine["onnxruntime"] = bool(ort)
    sync()
    model_load_s = time.perf_counter() - t0
    rss_loaded = rss_mb(children=False)
    # result cache off here so the rows below time decoding; the served default (result_cache=64) is timed
    # on its own in "..., result cache" rows
    pred = Predictor(backbone, refine=refine, encode_batch=args.encode_batch, result_cache=0)
    pred_results = Predictor(backbone, refine=refine, encode_batch=args.encode_batch)
    pred_results.cache = pred.cache  # same embeddings: the difference is the result cache alone
    pred_nocache = Predictor(backbone, refine=refine, cache_size=0)
    five = ", ".join(prompts)
    samples: dict[str, list[float]] = {}
    notes: dict[str, str] = {}
    agreement: list[float] = []

    def record(name: str, seconds: float, note: str = "") -> None:
        samples.setdefault(name, []).append(seconds)
        if note:
            notes[name] = note

    def timed(fn, *a):
        sync()
        t = time.perf_counter()
        out = fn(*a)
        sync()
        return time.perf_counter() - t, out

    def request(p: Predictor, path: Path, prompt: str):
        """One engine-level request: read the file, select it, predict."""
        p.set_image(load_radiograph(path))
        return p.predict(prompt)

    # warm-up: the first call of a fresh process pays one-off allocations, not what a request costs
    request(pred, images[0], prompts[0])
    pred.cache.clear()

    print(f"device={device} backbone={args.backbone} refine={refine} threads={torch.get_num_threads()} "
          f"images={len(images)} load={model_load_s:.1f}s loadavg={machine['loadavg_start']}", flush=True)
    for r, path in enumerate(images):
        tr = time.perf_counter()
        single = prompts[r % len(prompts)]
        # --- the optimised path ---
        pred.cache.clear()
        dt, cold = timed(request, pred, path, single)
        record("cold, 1 prompt", dt, "new image: read + encode + decode (+ crop encode with refine)")
        pred.cache.clear()  # the same structure with a box drawn (the box the text prompt's fine pass used)
        drawn = {res.label: res.box for res in cold.results}
        dt, _ = timed(lambda: (pred.set_image(load_radiograph(path)), pred.predict(single, boxes=drawn)))
        record("cold, 1 prompt with a box", dt, "new image, user box: its crop alone is encoded (no coarse pass)")
        pred.cache.clear()
        pred.set_image(load_radiograph(path))
        pred.predict(single)  # back to the state the warm rows expect: film and this prompt's crop encoded
        for other in prompts:
            if other != single:
                dt, _ = timed(pred.predict, other)
                record("warm, new prompt", dt, "whole film cached; a structure not asked before")
        for p_ in prompts:
            dt, _ = timed(pred.predict, p_)
            record("warm, repeated prompt", dt, "every embedding cached: decoding only")
        pred.cache.clear()
        dt, ours = timed(request, pred, path, five)
        record("5 prompts, new image", dt, "one request, read + encode + decode")
        pred.cache.clear()
        pred.embedding(pred.coarse_view())  # the image was opened (and encoded) before the prompts came
        dt, _ = timed(pred.predict, five)
        record("5 prompts, image encoded", dt, "whole film cached before the request, crops not")
        dt, _ = timed(pred.predict, five)
        record("5 prompts, all cached", dt, "repeated request: embeddings cached, decoding only")
        pred_results.set_image(pred._image)
        pred_results.predict(five)
        dt, _ = timed(pred_results.predict, five)
        record("5 prompts, result cache", dt, "repeated request, served default: masks from the result cache")
        for p_ in prompts:
            dt, _ = timed(pred_results.predict, p_)
            record("warm, repeated prompt, result cache", dt, "served default: the mask from the result cache")

        if "ablations" not in args.skip:
            # prompts one per request instead of one decoder pass
            def separately():
                for p_ in prompts:
                    pred.predict(p_)
            dt, _ = timed(separately)
            record("5 prompts as 5 requests, all cached", dt, "before: no prompt batching")
            # the fine pass one crop at a time (the original loop)
            pred.batch_fine = False
            dt, _ = timed(pred.predict, five)
            record("5 prompts, all cached, fine pass unbatched", dt, "before: batch_fine=False")
            pred.cache.clear()
            dt, _ = timed(request, pred, path, five)
            record("5 prompts, new image, fine pass unbatched", dt, "before: batch_fine=False")
            pred.batch_fine = True
            # no cache: the same prompt again re-encodes
            pred_nocache.set_image(load_radiograph(path))
            dt, _ = timed(pred_nocache.predict, single)
            record("repeated prompt, cache off", dt, "before: cache_size=0")
            if ort:  # the encoder in PyTorch eager instead of ONNX Runtime
                saved, backbone._ort = backbone._ort, None
                pred.cache.clear()
                dt, _ = timed(request, pred, path, single)
                record("cold, 1 prompt, PyTorch encoder", dt, "before: encodes in PyTorch eager, not ONNX Runtime")
                pred.cache.clear()
                dt, _ = timed(request, pred, path, five)
                record("5 prompts, new image, PyTorch encoder", dt, "before: encodes in PyTorch eager")
                backbone._ort = saved
                # the decoder in PyTorch eager instead of ONNX Runtime (embeddings cached: decoding only)
                pred.set_image(load_radiograph(path))
                pred.predict(five)
                saved_dec, backbone._ort_decoders = backbone._ort_decoders, []
                for p_ in prompts:
                    dt, _ = timed(pred.predict, p_)
                    record("warm, repeated prompt, PyTorch decoder", dt, "before: decodes in PyTorch eager")
                dt, _ = timed(pred.predict, five)
                record("5 prompts, all cached, PyTorch decoder", dt, "before: decodes in PyTorch eager")
                backbone._ort_decoders = saved_dec

        if "naive" not in args.skip:
            dt, masks = timed(naive_request, backbone, path, prompts, refine, pred)
            record("naive 5 prompts", dt, "re-encode per prompt, no cache, fp32, no_grad, 1 prompt per decode")
            for res in ours.results:
                agreement.append(dice(res.mask, masks[res.label]))
            dt, _ = timed(naive_request, backbone, path, [single], refine, pred)
            record("naive 1 prompt", dt, "re-encode, no cache, fp32, no_grad")

        print(f"  image {r + 1}/{len(images)} {path.name}: {time.perf_counter() - tr:.1f}s", flush=True)

    rss_serving = peak_rss_mb()  # before the sections below (autograd on keeps activations: GBs)

    if "threads" not in args.skip:
        thread_counts = args.threads or sorted({1, os.cpu_count() or 1})
        main_threads = torch.get_num_threads()
        for n in thread_counts:
            torch.set_num_threads(n)
            for path in images:
                pred.set_image(load_radiograph(path))
                x = pred.coarse_view().model_input(pred._image.pixels)
                dt, _ = timed(pred._encode, x)
                record(f"encode, {n} thread(s)", dt, "whole film, batch 1")
                pred.predict(prompts[0])
                dt, _ = timed(pred.predict, prompts[0])
                record(f"warm repeated prompt, {n} thread(s)", dt, "decoding only")
        torch.set_num_threads(main_threads)

    if "adapter" not in args.skip and args.backbone == "litemedsam":
        adapter_merge(pred, images, prompts, record, timed)

    if "gradmode" not in args.skip:
        for path in images:
            grad_modes(pred, path, prompts, record, timed)

    gpu = {}
    if cuda and "gpu" not in args.skip:
        gpu = gpu_precision(backbone, images, five, refine, record, timed)

    rows = [{"scenario": k, **summary(v), "note": notes.get(k, "")} for k, v in samples.items()]
    p50 = {r["scenario"]: r.get("p50_ms") for r in rows}

    def ratio(before, after):
        return round(p50[before] / p50[after], 2) if p50.get(before) and p50.get(after) else None

    comparisons = [
        ("naive 5 prompts", "5 prompts, new image", "naive baseline vs ours, new image"),
        ("naive 5 prompts", "5 prompts, image encoded", "naive baseline vs ours, image already encoded"),
        ("naive 5 prompts", "5 prompts, all cached", "naive baseline vs ours, repeated request"),
        ("naive 1 prompt", "warm, repeated prompt", "naive baseline vs ours, 1 prompt, cached"),
        ("naive 5 prompts", "5 prompts, result cache", "naive baseline vs ours, repeated request, result cache"),
        ("warm, repeated prompt", "warm, repeated prompt, result cache", "result cache, 1 prompt"),
        ("5 prompts, all cached", "5 prompts, result cache", "result cache, 5 prompts"),
        ("repeated prompt, cache off", "warm, repeated prompt", "embedding cache"),
        ("5 prompts as 5 requests, all cached", "5 prompts, all cached", "prompts in one request"),
        ("5 prompts, new image, fine pass unbatched", "5 prompts, new image", "batched fine pass, new image"),
        ("5 prompts, all cached, fine pass unbatched", "5 prompts, all cached", "batched fine pass, cached"),
        ("warm, repeated prompt, PyTorch decoder", "warm, repeated prompt", "ONNX Runtime decoder, 1 prompt"),
        ("5 prompts, all cached, PyTorch decoder", "5 prompts, all cached", "ONNX Runtime decoder, 5 prompts"),
        ("encode, grad", "encode, inference_mode", "inference_mode vs autograd on (encoder)"),
        ("encode, no_grad", "encode, inference_mode", "inference_mode vs no_grad (encoder)"),
        ("decode 5 prompts, grad", "decode 5 prompts, inference_mode", "inference_mode vs autograd on (decoder)"),
        ("decode 5 prompts, no_grad", "decode 5 prompts, inference_mode", "inference_mode vs no_grad (decoder)"),
        ("encode, LoRA unmerged", "encode, LoRA merged", "adapter merged into the encoder (+ ONNX Runtime on CPU)"),
        ("encode, LoRA merged, PyTorch", "encode, LoRA merged", "ONNX Runtime for the adapter's encoder"),
        ("cold, 1 prompt, LoRA merged, PyTorch encoder", "cold, 1 prompt, LoRA merged",
         "ONNX Runtime for the adapter's encoder, cold request"),
        ("5 prompts, new image, LoRA unmerged", "5 prompts, new image, LoRA merged", "adapter merge, request"),
    ]
    if args.threads is None or len(args.threads) > 1:
        counts = sorted({int(k.split(", ")[1].split()[0]) for k in p50 if k.startswith("encode, ") and "thread" in k})
        for a, b in itertools.pairwise(counts):
            comparisons.append((f"encode, {a} thread(s)", f"encode, {b} thread(s)", f"{b} vs {a} threads (encode)"))
            comparisons.append((f"warm repeated prompt, {a} thread(s)", f"warm repeated prompt, {b} thread(s)",
                                f"{b} vs {a} threads (decode)"))
    for prec in ("tf32", "bf16"):
        comparisons.append(("5 prompts, new image, fp32 (gpu)", f"5 prompts, new image, {prec} (gpu)",
                            f"{prec} vs fp32 request"))
        for bs in (1, 4, 16):
            comparisons.append((f"encode batch {bs}, fp32 (gpu)", f"encode batch {bs}, {prec} (gpu)",
                                f"{prec} vs fp32 encode, batch {bs}"))
    speedups = [{"what": what, "before": b, "after": a, "before_p50_ms": p50.get(b), "after_p50_ms": p50.get(a),
                 "speedup": ratio(b, a)} for b, a, what in comparisons if p50.get(b) and p50.get(a)]

    machine["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    result = {
        "benchmark": "inference", "machine": machine,
        "config": {"device": str(device), "backbone": args.backbone, "refine": refine, "repeats": args.repeats,
                   "images": [p.name for p in images], "prompts": prompts, "encode_batch": pred.encode_batch,
                   "threads_main": torch.get_num_threads()},
        "model_load_s": round(model_load_s, 2), "rss_after_model_load_mb": rss_loaded,
        "peak_rss_serving_mb": rss_serving, "peak_rss_mb": peak_rss_mb(),
        "rows": rows, "speedups": speedups, "gpu": gpu,
        "naive_vs_ours_mask_dice_min": round(min(agreement), 4) if agreement else None,
    }
    if cuda:
        result["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print()
    print(table(rows, [("scenario", "scenario"), ("n", "n"), ("p50_ms", "p50 ms"), ("p95_ms", "p95 ms"),
                       ("mean_ms", "mean ms"), ("note", "note")]))
    print()
    print(table(speedups, [("what", "optimisation / comparison"), ("before_p50_ms", "before p50 ms"),
                           ("after_p50_ms", "after p50 ms"), ("speedup", "x")]))
    print(f"\nmodel load {model_load_s:.1f} s; RSS after load {rss_loaded} MB; peak RSS "
          f"{rss_serving} MB serving scenarios, {result['peak_rss_mb']} MB incl. adapter and autograd-on rows"
          + (f"; peak GPU memory {result['peak_gpu_memory_mb']} MB" if cuda else "")
          + (f"; naive vs ours mask Dice >= {result['naive_vs_ours_mask_dice_min']}" if agreement else "")
          + f"; load average {machine['loadavg_start']} -> {machine['loadavg_end']}")
    write_json(args.out, result)
    return 0


def naive_request(backbone, path: Path, prompts: list[str], refine: bool, geometry) -> dict:
    """What a plain segment_anything SamPredictor loop costs: for every prompt set_image (encode) and predict one
    box; with refinement the crop of each structure is encoded and decoded too. No cache, fp32, torch.no_grad,
    PyTorch eager for encoder and decoder (no ONNX Runtime). Same views, boxes and merging as the predictor (so
    the masks match); ``geometry`` only lends its priors, tiling and coarse view."""
    saved, backbone._ort_decoders = backbone._ort_decoders, []
    try:
        return _naive_request(backbone, path, prompts, refine, geometry)
    finally:
        backbone._ort_decoders = saved


def _naive_request(backbone, path: Path, prompts: list[str], refine: bool, geometry) -> dict:
    import torch
    from xray_textseg.io import load_radiograph
    from xray_textseg.predictor import Predictor, grow_box, tile_boxes
    from xray_textseg.transforms import View, largest_component, mask_box
    from xray_textseg.vocabulary import parse_prompt

    image = load_radiograph(path)
    helper = Predictor(backbone, priors=geometry.priors, cache_size=0)
    helper._image = image
    shape, size = image.shape, backbone.input_size
    masks = {}
    with torch.no_grad():
        for text in prompts:
            label = parse_prompt(text)[0].label
            view = helper.coarse_view()
            emb = backbone.image_encoder(view.model_input(image.pixels))  # plain PyTorch
            box = geometry.priors.box(label, shape)
            sparse, dense = backbone.prompt_embeddings(1, boxes=torch.from_numpy(view.box_to_model(box[None])))
            logits, _ = backbone.decode(emb, sparse, dense)
            mask = view.logits_to_image(logits.float().cpu())[0].numpy() > 0
            if refine:
                b = mask_box(largest_component(mask))
                fine_box = box if b is None else grow_box(b, geometry.coarse_grow, shape)
                out = np.full(shape, -20.0, dtype=np.float32)
                for tile in tile_boxes(fine_box, geometry.max_tile_aspect):
                    v = View.crop(shape, tile, size, margin=geometry.crop_margin)
                    emb = backbone.image_encoder(v.model_input(image.pixels))
                    sparse, dense = backbone.prompt_embeddings(1, boxes=torch.from_numpy(v.box_to_model(tile[None])))
                    logits, _ = backbone.decode(emb, sparse, dense)
                    np.maximum(out, v.logits_to_image(logits.float().cpu())[0].numpy(), out=out)
                mask = out > 0
            masks[label] = largest_component(mask)
    return masks


def grad_modes(pred, path: Path, prompts: list[str], record, timed) -> None:
    """Encoder and 5-prompt decoder forward with autograd on, under no_grad and under inference_mode."""
    import torch
    from xray_textseg.io import load_radiograph

    bb = pred.backbone
    pred.set_image(load_radiograph(path))
    view = pred.coarse_view()
    x = view.model_input(pred._image.pixels)
    boxes = torch.from_numpy(view.box_to_model(np.stack([pred.priors.box(p.replace(" ", "_"), pred._image.shape)
                                                         for p in prompts])))
    modes = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}
    # PyTorch throughout: ONNX Runtime only answers without autograd, so it would be a different engine per mode
    saved = bb._ort, bb._ort_decoders
    bb._ort, bb._ort_decoders = None, []
    try:
        _grad_modes(bb, x, boxes, modes, record, timed)
    finally:
        bb._ort, bb._ort_decoders = saved


def _grad_modes(bb, x, boxes, modes, record, timed) -> None:
    for name, ctx in modes.items():
        def enc(ctx=ctx):
            with ctx():
                return bb.encode(x)
        dt, emb = timed(enc)
        record(f"encode, {name}", dt, "whole film, batch 1")
        emb = emb.detach()

        def dec(ctx=ctx, emb=emb):
            with ctx():
                sparse, dense = bb.prompt_embeddings(len(boxes), boxes=boxes)
                return bb.decode(emb, sparse, dense)
        dt, _ = timed(dec)
        record(f"decode 5 prompts, {name}", dt, "one decoder call")


def adapter_merge(pred, images: list[Path], prompts: list[str], record, timed) -> None:
    """A LoRA adapter (zero-initialised, written with the real save_adapter: timing, not quality) served merged
    (folded into the encoder weights) and unmerged (peft wrapper, extra matmuls per attention layer)."""
    from xray_textseg.adapters import lora_encoder, save_adapter
    from xray_textseg.io import load_radiograph
    from xray_textseg.text import PromptHead

    enc = pred.text_encoder
    head = PromptHead(enc.dim, n_tokens=4, hidden=256)
    head.trained.fill_(True)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_adapter(Path(tmp) / "lora_bench", head=head, decoder=pred.backbone.mask_decoder,
                            encoder_peft=lora_encoder(copy.deepcopy(pred.backbone.image_encoder)),
                            priors=pred.priors.to_json(),
                            metadata={"backbone": pred.backbone.name, "text_encoder": enc.name, "text_dim": enc.dim,
                                      "n_tokens": 4, "head_hidden": 256, "labels": [p.replace(" ", "_") for p in prompts]})
        five = ", ".join(prompts)
        bb = pred.backbone
        for r, img in enumerate(images):
            for merge in (True, False):
                tag = "merged" if merge else "unmerged"
                pred.load_adapter(path, merge=merge)
                pred.cache.clear()
                pred.set_image(load_radiograph(img))
                x = pred.coarse_view().model_input(pred._image.pixels)
                dt, _ = timed(pred._encode, x)
                record(f"encode, LoRA {tag}", dt, "whole film, batch 1 (merged: ONNX Runtime on the CPU)")
                dt, _ = timed(pred.predict, five)
                record(f"5 prompts, new image, LoRA {tag}", dt, "text tokens + adapter, cache cleared")
                if merge and bb._ort_adapter_encoders:  # before: the merged encoder in PyTorch
                    pred.cache.clear()
                    dt, _ = timed(pred.predict, prompts[r % len(prompts)])
                    record("cold, 1 prompt, LoRA merged", dt, "new image with a LoRA adapter served")
                    saved, bb._ort_adapter_encoders = bb._ort_adapter_encoders, []
                    try:
                        dt, _ = timed(pred._encode, x)
                        record("encode, LoRA merged, PyTorch", dt, "before: the adapter's encoder in PyTorch eager")
                        pred.cache.clear()
                        dt, _ = timed(pred.predict, prompts[r % len(prompts)])
                        record("cold, 1 prompt, LoRA merged, PyTorch encoder", dt, "before: adapter encodes in PyTorch")
                    finally:
                        bb._ort_adapter_encoders = saved
        pred.unload_adapter()
        pred.cache.clear()


def gpu_precision(backbone, images: list[Path], five: str, refine: bool, record, timed) -> dict:
    """CUDA only: fp32 / bf16 / TF32 (TF32 last: it is a process-wide switch) for a 5-prompt request on a new
    image and for encoder throughput at batch 1 / 4 / 16; mask Dice of each against fp32."""
    import torch
    from xray_textseg.io import load_radiograph
    from xray_textseg.metrics import dice
    from xray_textseg.predictor import Predictor

    out: dict = {"dice_vs_fp32_min": {}, "encode_images_per_s": {}}
    ref: dict = {}
    for prec in ("fp32", "bf16", "tf32"):
        p = Predictor(backbone, refine=refine, precision=prec)
        dices = []
        for i, img in enumerate(images):
            p.cache.clear()
            p.set_image(load_radiograph(img))
            dt, res = timed(p.predict, five)
            record(f"5 prompts, new image, {prec} (gpu)", dt, "cache cleared")
            for r in res.results:
                if prec == "fp32":
                    ref[(i, r.label)] = r.mask
                else:
                    dices.append(dice(r.mask, ref[(i, r.label)]))
        if dices:
            out["dice_vs_fp32_min"][prec] = round(min(dices), 4)
        x1 = p.coarse_view().model_input(p._image.pixels).to(backbone.device)
        for bs in (1, 4, 16):
            xb = x1.expand(bs, -1, -1, -1).contiguous()
            p._encode(xb)  # warm-up for this shape
            times = []
            for _ in range(max(3, len(images))):
                dt, _ = timed(p._encode, xb)
                times.append(dt)
                record(f"encode batch {bs}, {prec} (gpu)", dt, "")
            out["encode_images_per_s"][f"{prec}_b{bs}"] = round(bs / float(np.median(times)), 1)
        torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    sys.exit(main())
