"""Evaluate a predictor on a folder laid out like ``../shared/xray_real/<set>``:
``images/<case>.png`` and ``labels/<label>/<case>.png`` (0/255, same size as the image).

Modes: ``text`` (the loaded adapter: text prompt -> head tokens + fitted prior box -> coarse-to-fine),
``zero-shot`` (no adapter: text prompt -> prior box -> coarse-to-fine), ``oracle-box`` (the box of the
ground-truth mask prompts the same pipeline: the ceiling of any box-prompted zero-shot method).
Metrics: Dice, IoU and HD95 in pixels (MONAI's Hausdorff distance, 95th percentile).
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


def hd95(pred: np.ndarray, truth: np.ndarray) -> float:
    """95th-percentile Hausdorff distance in pixels (MONAI); inf when one mask is empty and the other not."""
    import torch
    from monai.metrics import compute_hausdorff_distance

    if not pred.any() or not truth.any():
        return 0.0 if pred.any() == truth.any() else float("inf")
    p = torch.from_numpy(np.ascontiguousarray(pred))[None, None]
    t = torch.from_numpy(np.ascontiguousarray(truth))[None, None]
    return float(compute_hausdorff_distance(p, t, percentile=95)[0, 0])


def evaluate_folder(predictor, data_dir, mode: str = "zero-shot", limit: int | None = None,
                    cases: list | None = None, progress: bool = False, names: list[str] | None = None,
                    hd95: bool = True, keep_masks: bool = False) -> dict:
    """Per-case and per-label Dice/IoU/HD95. Returns {"mode", "cases": [...], "per_label": {label: {...}}}."""
    if mode == "text" and predictor.head is None:
        raise ValueError("mode 'text' needs a loaded adapter")
    if mode != "text" and predictor.head is not None:
        raise ValueError(f"mode {mode!r} is the zero-shot path; unload the adapter first")
    cases = cases if cases is not None else list_cases(data_dir)
    if names is not None:
        cases = [c for c in cases if c[0] in names]
    want_hd = hd95
    masks = []
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
                         "iou": iou(r.mask, truths[r.label]), "predicted_iou": r.score,
                         "hd95": globals()["hd95"](r.mask, truths[r.label]) if want_hd else None,
                         "ms": ms / max(1, len(pred.results))})
        if keep_masks:
            masks.append((case, image.pixels, {r.label: r.mask for r in pred.results}, truths))
        if progress:
            print(f"[{k + 1}/{len(cases)}] {case}: " + " ".join(
                f"{r['label']}={r['dice']:.3f}" for r in rows[-len(pred.results):]) + f"  ({ms:.0f} ms)",
                file=sys.stderr, flush=True)
    per_label = {}
    for lab in sorted({r["label"] for r in rows}):
        d = np.array([r["dice"] for r in rows if r["label"] == lab])
        j = np.array([r["iou"] for r in rows if r["label"] == lab])
        h = np.array([r["hd95"] for r in rows if r["label"] == lab and r["hd95"] is not None], dtype=float)
        per_label[lab] = {"n": int(d.size), "dice_mean": float(d.mean()), "dice_median": float(np.median(d)),
                          "dice_std": float(d.std()), "iou_mean": float(j.mean()),
                          "hd95_median": float(np.median(h)) if h.size else None}
    report = {"mode": mode, "data": str(data_dir), "adapter": getattr(predictor, "adapter_version", "none"),
              "cases": rows, "per_label": per_label}
    if keep_masks:
        report["masks"] = masks
    return report


def format_table(report: dict) -> str:
    lines = [f"mode: {report['mode']}  adapter: {report.get('adapter', 'none')}  data: {report['data']}",
             "| label | n | Dice mean | Dice median | Dice std | IoU mean | HD95 median (px) |",
             "|---|---|---|---|---|---|---|"]
    for lab, s in report["per_label"].items():
        hd = "" if s.get("hd95_median") is None else f"{s['hd95_median']:.1f}"
        lines.append(f"| {lab} | {s['n']} | {s['dice_mean']:.3f} | {s['dice_median']:.3f} | {s['dice_std']:.3f} "
                     f"| {s['iou_mean']:.3f} | {hd} |")
    return "\n".join(lines)


def overlay_grid(report: dict, out_path: str | Path, max_cases: int = 12) -> Path:
    """A PNG grid: each case's film with predicted contours (solid) and ground truth (dashed), per-label Dice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = report.get("masks", [])[:max_cases]
    if not cases:
        raise ValueError("no masks kept: call evaluate_folder(..., keep_masks=True)")
    cols = min(4, len(cases))
    rows = (len(cases) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4.6 * rows), squeeze=False)
    colours = plt.get_cmap("tab10")
    dice_of = {(r["case"], r["label"]): r["dice"] for r in report["cases"]}
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (case, pixels, preds, truths) in zip(axes.ravel(), cases):
        ax.imshow(pixels, cmap="gray", aspect="auto")
        for k, (lab, m) in enumerate(sorted(preds.items())):
            c = colours(k % 10)
            ax.contour(m.astype(float), levels=[0.5], colors=[c], linewidths=1.2)
            if lab in truths:
                ax.contour(truths[lab].astype(float), levels=[0.5], colors=[c], linewidths=0.8, linestyles="--")
        ax.set_title(case + "\n" + " ".join(f"{lab}:{dice_of.get((case, lab), 0):.2f}" for lab in sorted(preds)),
                     fontsize=7)
    fig.suptitle(f"{report['mode']} (adapter {report.get('adapter', 'none')}): solid = prediction, dashed = truth",
                 fontsize=9)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path
