"""``xray-textseg``: the engine from the shell.

    xray-textseg info
    xray-textseg predict IMAGE --prompt "left lung" [--prompt heart ...] -o OUT
    xray-textseg evaluate --data DIR [--adapter DIR|starter] [--mode text|zero-shot|oracle-box] [--limit N]
    xray-textseg train --data DIR --out ADAPTER_DIR [--mode auto|lora|cached] [--epochs N]
    xray-textseg make-sample-data --out sample_data

Errors in the input (unknown label, unreadable image, bad option) print one line naming the
problem and exit with status 2; nothing is written in that case.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

EXIT_USAGE = 2


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="litemedsam", help="litemedsam (default) | medsam_vit_b | sam_vit_b")
    p.add_argument("--checkpoint", default=None, help="backbone weights (default: packaged LiteMedSAM)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--labels", default="both", help="chest | lower_limb | both | comma list of labels")
    p.add_argument("--no-refine", action="store_true", help="one coarse pass only (faster, less accurate)")
    p.add_argument("--text-encoder", default=None, help="local Hugging Face model folder (default: MiniLM)")
    p.add_argument("--adapter", default=None, type=_adapter_path,
                   help="a trained adapter directory, or 'starter': the packaged one (default: none, zero-shot)")


def _adapter_path(value: str) -> str:
    """An adapter argument: a directory, or ``starter`` for the packaged starter adapter."""
    if value != "starter":
        return value
    from .adapters import starter_adapter

    path = starter_adapter()
    if path is None:
        raise argparse.ArgumentTypeError("this installation has no starter adapter (lib/xray_textseg/starter/)")
    return str(path)


def _predictor(args):
    from .predictor import build_predictor

    return build_predictor(backbone=args.backbone, checkpoint=args.checkpoint, device=args.device,
                           labels=args.labels, refine=not args.no_refine, text_encoder=args.text_encoder,
                           adapter=getattr(args, "adapter", None))


def cmd_info(args) -> int:
    import torch

    from .backbones import resolve_device
    from .text import TextEncoder
    from .vocabulary import resolve_label_set

    predictor = _predictor(args)
    info = {
        "version": __import__("xray_textseg").__version__,
        "backbone": predictor.backbone.describe(),
        "device": str(resolve_device(args.device)),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "threads": torch.get_num_threads(),
        "labels": list(resolve_label_set(args.labels)),
        "mode": predictor.mode,
    }
    try:
        enc = TextEncoder(args.text_encoder)
        info["text_encoder"] = {"path": enc.path, "dim": enc.dim}
    except Exception as exc:  # noqa: BLE001 - info reports, it does not fail
        info["text_encoder"] = {"error": str(exc)}
    print(json.dumps(info, indent=2))
    return 0


def _check_predict_args(args) -> dict[str, list[float]] | None:
    """Prompts, box and output checked before the image is decoded or the model loaded: a typo fails in
    milliseconds, not after an encode. Returns the user box as {label: box} or None."""
    import math

    from .vocabulary import parse_prompt, resolve_label_set

    allowed = resolve_label_set(args.labels)
    parsed = [label for prompt in args.prompt for label in parse_prompt(prompt, allowed)]
    out = Path(args.output)
    if out.suffix.lower() in (".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".nrrd", ".gz", ".json") \
            and not out.name.lower().endswith(".nii.gz"):
        raise ValueError(f"--output {out}: write a .png, .nii or .nii.gz label map, or name a folder")
    if not args.box:
        return None
    if len(parsed) != 1:
        raise ValueError("--box needs exactly one --prompt naming a single label")
    x0, y0, x1, y1 = args.box
    if not all(math.isfinite(v) for v in args.box) or not (x1 > x0 and y1 > y0):
        raise ValueError(f"--box {args.box}: needs finite X0 < X1 and Y0 < Y1 (image pixels)")
    return {parsed[0].label: [float(v) for v in args.box]}


def cmd_predict(args) -> int:
    from .io import load_radiograph, save_mask

    t0 = time.perf_counter()
    boxes = _check_predict_args(args)
    image = load_radiograph(args.image)
    predictor = _predictor(args)
    t_load = time.perf_counter()
    predictor.set_image(image)
    pred = predictor.predict(args.prompt, boxes=boxes)
    out = Path(args.output)
    written = []
    if out.suffix in (".png", ".nii") or out.name.endswith(".nii.gz"):
        out.parent.mkdir(parents=True, exist_ok=True)
        written.append(save_mask(pred.label_map(), out, like=image))
        sidecar = Path(str(out) + ".json")
        sidecar.write_text(json.dumps({"label_names": {r.label: i + 1 for i, r in enumerate(pred.results)}}))
        written.append(sidecar)
    else:
        out.mkdir(parents=True, exist_ok=True)
        stem = Path(args.image).name.split(".")[0]
        for r in pred.results:
            written.append(save_mask(r.mask.astype("uint8") * 255, out / f"{stem}_{r.label}.png", like=image))
    t1 = time.perf_counter()
    for r in pred.results:
        print(f"{r.label:16s} area={int(r.mask.sum()):8d}px  predicted_iou={r.score:.3f}  "
              f"box={[round(v) for v in r.box]} ({r.prompt_source})")
        if r.label in pred.warnings:
            print(f"{'':16s} warning: {pred.warnings[r.label]}")
    print(f"mode={pred.mode}  load={1e3 * (t_load - t0):.0f} ms  predict={pred.timings_ms['total']:.0f} ms "
          f"(coarse {pred.timings_ms['coarse']:.0f}, fine {pred.timings_ms['fine']:.0f})  "
          f"total={1e3 * (t1 - t0):.0f} ms  cache hits/misses={pred.cache['hits']}/{pred.cache['misses']}")
    for w in written:
        print(f"wrote {w}")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluation import evaluate_folder, format_table, overlay_grid

    if args.mode == "text" and not args.adapter:
        raise ValueError("--mode text needs --adapter DIR (a trained adapter); use --mode zero-shot without one")
    if args.mode != "text" and args.adapter:
        raise ValueError(f"--mode {args.mode} ignores the adapter; use --mode text with --adapter")
    predictor = _predictor(args)
    names = args.cases.split(",") if args.cases else None
    report = evaluate_folder(predictor, args.data, mode=args.mode, limit=args.limit, progress=True, names=names,
                             hd95=not args.no_hd95, keep_masks=bool(args.overlay))
    print(format_table(report))
    if args.overlay:
        print(f"wrote {overlay_grid(report, args.overlay)}")
    report.pop("masks", None)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


def cmd_train(args) -> int:
    import logging

    from .backbones import build_backbone, enable_default_onnxruntime, resolve_device
    from .text import TextEncoder
    from .train import TrainConfig, _print_progress, load_folder, train_adapter
    from .vocabulary import resolve_label_set

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    labels = resolve_label_set(args.labels)
    out = Path(args.out)
    if out.exists():
        raise ValueError(f"{out} exists; adapters are never overwritten, choose a new --out")
    names = args.cases.split(",") if args.cases else None
    items = load_folder(args.data, labels, names=names)
    if not items:
        raise ValueError(f"no labelled images for {','.join(labels)} in {args.data}")
    cfg = TrainConfig(mode=args.mode, epochs=args.epochs, seed=args.seed, device=args.device,
                      val_fraction=args.val_fraction, time_budget_s=args.time_budget * 60 if args.time_budget else None,
                      batch_size=args.batch_size, coarse_prior=args.coarse_prior, mid_view=args.mid_view,
                      fine_sampling=args.fine_sampling, init_from=args.init_from)
    if args.degrade is not None:
        if not 0 <= args.degrade <= 1:
            raise ValueError(f"--degrade must be a probability in [0, 1], got {args.degrade}")
        cfg = replace(cfg, degrade=args.degrade)
    backbone = build_backbone(args.backbone, args.checkpoint, device=resolve_device(args.device))
    enable_default_onnxruntime(backbone)  # the cached-mode training encodes use it too
    encoder = TextEncoder(args.text_encoder, device=backbone.device)
    t0 = time.perf_counter()
    meta = train_adapter(items, out, backbone=backbone, text_encoder=encoder, labels=labels, cfg=cfg,
                         progress=_print_progress, log_path=out.parent / f"{out.name}.train.jsonl")
    val = meta["validation"]
    kinds = json.loads((out / "priors.json").read_text()).get("kind", {})
    print(json.dumps({"adapter": str(out), "mode": meta["mode"], "device": meta["device"],
                      "train_images": len(meta["train_images"]), "val_images": len(meta["val_images"]),
                      "val_dice": val["dice"], "val_dice_mean": val.get("dice_mean"),
                      "coarse_grow": meta.get("serving", {}).get("coarse_grow"),
                      "coarse_prompt": meta.get("serving", {}).get("coarse_prompt"),
                      "coarse_prior": kinds,
                      "mid_view": [lab for lab, k in kinds.items() if k == "envelope"] if cfg.mid_view else [],
                      "continued_from": meta.get("continued_from"),
                      "epochs_run": meta["training"]["epochs_run"], "stopped": meta["training"]["stopped"],
                      "seconds": round(time.perf_counter() - t0, 1), "size_bytes": meta["size_bytes"]}, indent=2))
    return 0


def cmd_make_sample_data(args) -> int:
    from .sample_data import make_sample_data

    summary = make_sample_data(args.out, n_chest=args.n_chest, n_limb=args.n_limb, n_dicom=args.n_dicom,
                               seed=args.seed)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xray-textseg", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="backbone, text encoder, device and labels")
    _add_model_options(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("predict", help="segment IMAGE for one or more text prompts")
    p.add_argument("image")
    p.add_argument("--prompt", "-p", action="append", required=True, help='e.g. "left lung" (repeatable)')
    p.add_argument("--box", nargs=4, type=float, metavar=("X0", "Y0", "X1", "Y1"),
                   help="optional box in image pixels for a single-label prompt")
    p.add_argument("--output", "-o", required=True,
                   help="a .png/.nii/.nii.gz label map (+ .json with label names), or a folder for one PNG per label")
    _add_model_options(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="Dice/IoU per label on a folder with images/ and labels/<label>/")
    p.add_argument("--data", required=True)
    p.add_argument("--mode", default="zero-shot", choices=["text", "zero-shot", "oracle-box"],
                   help="text: the adapter's text prompts; zero-shot: prior boxes; oracle-box: ground-truth boxes")
    p.add_argument("--limit", type=int, default=None, help="first N cases only")
    p.add_argument("--cases", default=None, help="comma list of case names (default: all)")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    p.add_argument("--overlay", default=None, help="write an overlay PNG grid here")
    p.add_argument("--no-hd95", action="store_true", help="skip HD95 (faster)")
    _add_model_options(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("train", help="train an adapter (LoRA + text head + decoder) on a labelled folder")
    p.add_argument("--data", required=True, help="folder with images/ and labels/<label>/")
    p.add_argument("--out", required=True, help="new adapter directory (never overwritten)")
    p.add_argument("--mode", default="auto", choices=["auto", "lora", "cached"],
                   help="lora: encoder LoRA (GPU, bf16 CPUs); cached: frozen encoder, cached embeddings; auto picks")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--time-budget", type=float, default=None, help="minutes (encoding included) before keeping the best epoch")
    p.add_argument("--cases", default=None, help="comma list of case names to train on (default: all)")
    p.add_argument("--coarse-prior", default="median", choices=["auto", "median", "envelope"],
                   help="the coarse prompt box per label: the median training box, the envelope of all of them, or "
                        "auto: the envelope for labels whose position varies more than their size (clavicles)")
    p.add_argument("--mid-view", action="store_true",
                   help="find the enveloped labels on one crop of their region (the upper chest for the clavicles) "
                        "instead of the whole film: one more encode per film")
    p.add_argument("--fine-sampling", default="uniform", choices=["uniform", "error"],
                   help="lora mode: fine crops per label and epoch, one each (uniform) or shared out by the last "
                        "validation error, so labels still learning get more (error)")
    p.add_argument("--degrade", type=float, default=None, metavar="P",
                   help="probability per training example of film-space blur and, independently, of noise "
                        "(default: the trainer's, TrainConfig.degrade)")
    p.add_argument("--init-from", default=None, metavar="ADAPTER", type=_adapter_path,
                   help="continue from this adapter's weights (head, decoder, encoder LoRA; 'starter': the packaged "
                        "one) instead of the base model; its training and validation films keep their sides of the "
                        "split")
    p.add_argument("--seed", type=int, default=0)
    _add_model_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("make-sample-data", help="generate synthetic radiographs with exact masks")
    p.add_argument("--out", default="sample_data")
    p.add_argument("--n-chest", type=int, default=12)
    p.add_argument("--n-limb", type=int, default=12)
    p.add_argument("--n-dicom", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_sample_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .adapters import AdapterError
    from .backbones import BackboneError
    from .io import ImageReadError, MaskReadError
    from .text import TextEncoderError
    from .vocabulary import UnknownLabelError

    try:
        return args.func(args)
    except (AdapterError, UnknownLabelError, ImageReadError, MaskReadError, BackboneError, TextEncoderError,
            FileNotFoundError, ValueError) as exc:
        print(f"xray-textseg {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
