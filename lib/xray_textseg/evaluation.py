"""Evaluate a predictor on a folder laid out like ``../shared/xray_real/<set>``:
``images/<case>.png`` and ``labels/<label>/<case>.png`` (0/255, same size as the image).

Modes: ``zero-shot`` (text prompt -> prior box -> coarse-to-fine), ``oracle-box`` (the box of the
ground-truth mask prompts the same pipeline: the ceiling of any box-prompted zero-shot method).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from .io import load_mask, load_radiograph
from .metrics import dice, iou
from .transforms import mask_box

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".nii", ".gz")


def list_cases(data_dir: str | Path) -> list[tuple[str, Path, dict[str, Path]]]:
    """[(case, image path, {label: mask path})] for every image that has at least one label."""
    data_dir = Path(data_dir)
    images = sorted(p for p in (data_dir / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    label_dirs = sorted(p for p in (data_dir / "labels").iterdir() if p.is_dir())
    cases = []
    for img in images:
        case = img.name.split(".")[0]
        masks = {d.name: m for d in label_dirs for m in d.glob(case + ".*")}
        if masks:
            cases.append((case, img, masks))
    if not cases:
        raise FileNotFoundError(f"no labelled images under {data_dir}/images and {data_dir}/labels/<label>/")
    return cases


def evaluate_folder(predictor, data_dir, mode: str = "zero-shot", limit: int | None = None,
                    cases: list | None = None, progress: bool = False) -> dict:
    """Per-case and per-label Dice/IoU. Returns {"mode", "cases": [...], "per_label": {label: {...}}}."""
    cases = cases if cases is not None else list_cases(data_dir)
    if limit:
        cases = cases[:limit]
    rows = []
    for k, (case, img_path, mask_paths) in enumerate(cases):
        image = load_radiograph(img_path)
        predictor.set_image(image)
        truths = {lab: load_mask(p, image.shape) > 0 for lab, p in mask_paths.items() if lab in predictor.labels}
        labels = sorted(truths)
        boxes = None
        if mode == "oracle-box":
            boxes = {lab: list(mask_box(truths[lab])) for lab in labels if truths[lab].any()}
        t0 = time.perf_counter()
        pred = predictor.predict(labels, boxes=boxes)
        ms = 1e3 * (time.perf_counter() - t0)
        for r in pred.results:
            rows.append({"case": case, "label": r.label, "dice": dice(r.mask, truths[r.label]),
                         "iou": iou(r.mask, truths[r.label]), "predicted_iou": r.score})
        if progress:
            print(f"[{k + 1}/{len(cases)}] {case}: " + " ".join(
                f"{r['label']}={r['dice']:.3f}" for r in rows[-len(pred.results):]) + f"  ({ms:.0f} ms)",
                file=sys.stderr, flush=True)
    per_label = {}
    for lab in sorted({r["label"] for r in rows}):
        d = np.array([r["dice"] for r in rows if r["label"] == lab])
        j = np.array([r["iou"] for r in rows if r["label"] == lab])
        per_label[lab] = {"n": int(d.size), "dice_mean": float(d.mean()), "dice_median": float(np.median(d)),
                          "dice_std": float(d.std()), "iou_mean": float(j.mean())}
    return {"mode": mode, "data": str(data_dir), "cases": rows, "per_label": per_label}


def format_table(report: dict) -> str:
    lines = [f"mode: {report['mode']}  data: {report['data']}",
             "| label | n | Dice mean | Dice median | Dice std | IoU mean |", "|---|---|---|---|---|---|"]
    for lab, s in report["per_label"].items():
        lines.append(f"| {lab} | {s['n']} | {s['dice_mean']:.3f} | {s['dice_median']:.3f} | {s['dice_std']:.3f} "
                     f"| {s['iou_mean']:.3f} |")
    return "\n".join(lines)
