"""How the text path holds up when a film differs from the training films in ways real films do: exposure
(gamma), noise, blur, a narrow window with a bright burned-in marker, borders (black padding or bright
collimation), a tighter field of view, rotation (of the film on a larger canvas, or of the patient on the
detector), another aspect ratio, another resolution, an inverted
(negative) export. Every perturbation is made here from a labelled film and its masks (geometric ones move
the masks with the film), so each row is compared with the unperturbed row of the same films.

    python benchmarks/robustness.py --data ../shared/xray_real/jsrt_chest ../shared/xray_real/oai_lower_limb \
        [--adapter starter] [--test-after 30 --seed 0] [--only gamma-0.6 border-black ...] \
        [--out docs/perf/robustness.json]

Test films: each set's cases shuffled by ``random.Random(seed)`` with the first ``--test-after`` left out, as
``label_efficiency.py`` splits them; the defaults (seed 0, after 30) are the starter adapter's test films, which
it never saw. Prints one table (mean Dice per label and perturbation, and how many of the shown structures got a
warning) and writes the per-film rows to ``--out``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from perf_common import machine_info, write_json  # noqa: F401 - sys.path set there

from xray_textseg.evaluation import list_cases
from xray_textseg.io import load_mask, load_radiograph, radiograph_from_array
from xray_textseg.metrics import dice


def _unit(img: np.ndarray) -> np.ndarray:
    lo, hi = float(img.min()), float(img.max())
    return (img - lo) / max(hi - lo, 1e-6)


def _resize(arr: np.ndarray, shape: tuple[int, int], order: int) -> np.ndarray:
    zoom = (shape[0] / arr.shape[0], shape[1] / arr.shape[1])
    out = ndimage.zoom(arr.astype(np.float32), zoom, order=order, grid_mode=True, mode="nearest")
    return out[: shape[0], : shape[1]]


def _pad(img, masks, top, bottom, left, right, value):
    img = np.pad(img, ((top, bottom), (left, right)), constant_values=value)
    return img, {k: np.pad(m, ((top, bottom), (left, right))) for k, m in masks.items()}


def _rotate(img, masks, degrees):
    # the film turned on a larger canvas (scanned or exported askew): the frame grows, the new corners are black
    out = ndimage.rotate(img, degrees, reshape=True, order=1, mode="constant", cval=0.0)
    return np.clip(out, 0, 255), {k: ndimage.rotate(m.astype(np.float32), degrees, reshape=True, order=1) > 0.5
                                  for k, m in masks.items()}


def _tilt(img, masks, degrees):
    # the patient turned on an upright detector: the frame stays, anatomy turns within it (edges repeated into
    # the corners, what leaves the frame is lost, masks with it)
    out = ndimage.rotate(img, degrees, reshape=False, order=1, mode="nearest")
    return np.clip(out, 0, 255), {k: ndimage.rotate(m.astype(np.float32), degrees, reshape=False, order=1) > 0.5
                                  for k, m in masks.items()}


def perturbations() -> dict:
    """name -> f(img float32 [0, 255], {label: bool mask}) -> (img, masks). Sizes are fractions of the film."""
    def gamma(g):
        return lambda img, m: (255 * _unit(img) ** g, m)

    def noise(img, m):
        rng = np.random.default_rng(0)
        return np.clip(img + rng.normal(0, 0.04 * 255, img.shape), 0, 255), m

    def blur(img, m):
        return ndimage.gaussian_filter(img, 0.002 * max(img.shape)), m

    def marker(img, m):
        # a film whose anatomy sits in a narrow band of the grey range, with a white burned-in side marker
        out = 40 + 0.45 * img
        s = max(8, int(0.05 * min(img.shape)))
        out[s:2 * s, s:2 * s] = 255
        return out, m

    def border(value, frac=0.12):
        def f(img, m):
            dy, dx = int(frac * img.shape[0]), int(frac * img.shape[1])
            return _pad(img, m, dy, dy, dx, dx, value)
        return f

    def crop(img, m, frac=0.06):
        dy, dx = int(frac * img.shape[0]), int(frac * img.shape[1])
        sl = (slice(dy, img.shape[0] - dy), slice(dx, img.shape[1] - dx))
        return img[sl], {k: v[sl] for k, v in m.items()}

    def rotate(deg):
        return lambda img, m: _rotate(img, m, deg)

    def tilt(deg):
        return lambda img, m: _tilt(img, m, deg)

    def narrower(img, m, keep=0.82):
        # a portrait film: the same anatomy, less width around it (centred crop of the columns)
        w = img.shape[1]
        dx = int(w * (1 - keep) / 2)
        return img[:, dx:w - dx], {k: v[:, dx:w - dx] for k, v in m.items()}

    def wider(img, m):
        # a landscape-ish detector: black columns beside the film, half the film's width on each side
        dx = img.shape[1] // 2
        return _pad(img, m, 0, 0, dx, dx, 0.0)

    def scale(f):
        def g(img, m):
            shape = (max(64, round(img.shape[0] * f)), max(64, round(img.shape[1] * f)))
            return _resize(img, shape, 1), {k: _resize(v, shape, 1) > 0.5 for k, v in m.items()}
        return g

    def invert(img, m):
        return 255 - img, m

    return {"none": lambda img, m: (img, m), "gamma-0.6": gamma(0.6), "gamma-1.6": gamma(1.6), "noise": noise,
            "blur": blur, "narrow-window+marker": marker, "border-black": border(0.0),
            "border-white": border(255.0), "crop-6%": crop, "rotate+7": rotate(7.0), "rotate-7": rotate(-7.0),
            "tilted+5": tilt(5.0), "tilted-5": tilt(-5.0),
            "narrower-82%": narrower, "wider-black": wider, "scale-0.5": scale(0.5), "scale-2": scale(2.0),
            "inverted": invert}


def test_cases(data: Path, seed: int, after: int) -> list:
    cases = list_cases(data)
    order = [c[0] for c in cases]
    random.Random(seed).shuffle(order)
    keep = set(order[after:])
    return [c for c in cases if c[0] in keep]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", required=True, help="folders laid out like ../shared/xray_real/<set>")
    ap.add_argument("--adapter", default="starter", help="adapter directory or 'starter' (default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-after", type=int, default=30)
    ap.add_argument("--only", nargs="+", default=None, help="run only these perturbations ('none' is always run)")
    ap.add_argument("--limit", type=int, default=None, help="at most N test films per set")
    ap.add_argument("--out", default=None, help="JSON file for the per-film rows and the table")
    args = ap.parse_args(argv)

    from xray_textseg.cli import _adapter_path
    from xray_textseg.predictor import build_predictor

    table = perturbations()
    names = ["none"] + [n for n in (args.only or table) if n != "none"]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown perturbation(s) {unknown}; known: {', '.join(table)}")
    predictor = build_predictor(adapter=_adapter_path(args.adapter))
    rows = []
    t_start = time.perf_counter()
    for data in map(Path, args.data):
        cases = test_cases(data, args.seed, args.test_after)[: args.limit or None]
        for case, img_path, mask_paths in cases:
            film = load_radiograph(img_path)
            base = _unit(film.pixels) * 255
            truths = {lab: load_mask(p, film.shape) > 0 for lab, p in mask_paths.items() if lab in predictor.labels}
            for name in names:
                img, masks = table[name](base.astype(np.float32), truths)
                predictor.set_image(radiograph_from_array(np.asarray(img, np.float32)))
                labels = sorted(masks)
                pred = predictor.predict(labels)
                warned = pred.warnings
                for r in pred.results:
                    rows.append({"data": data.name, "case": case, "perturbation": name, "label": r.label,
                                 "dice": dice(r.mask, masks[r.label]), "warned": r.label in warned})
                print(f"{data.name} {case} {name:>22}: " + " ".join(
                    f"{r['label']}={r['dice']:.3f}{'!' if r['warned'] else ''}" for r in rows[-len(labels):]),
                    file=sys.stderr, flush=True)
    labels = sorted({r["label"] for r in rows})
    summary = {}
    for name in names:
        sel = [r for r in rows if r["perturbation"] == name]
        summary[name] = {lab: float(np.mean([r["dice"] for r in sel if r["label"] == lab])) for lab in labels
                         if any(r["label"] == lab for r in sel)}
        summary[name]["warned"] = f"{sum(r['warned'] for r in sel)}/{len(sel)}"
    lines = ["| perturbation | " + " | ".join(labels) + " | shown structures warned |",
             "|---|" + "---|" * (len(labels) + 1)]
    for name in names:
        s = summary[name]
        cells = []
        for lab in labels:
            if lab not in s:
                cells.append("")
                continue
            delta = s[lab] - summary["none"][lab]
            cells.append(f"{s[lab]:.3f}" + ("" if name == "none" else f" ({delta:+.3f})"))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {s['warned']} |")
    text = "\n".join(lines)
    print(text)
    print(f"{len(rows)} masks in {time.perf_counter() - t_start:.0f} s; adapter {args.adapter}")
    if args.out:
        write_json(Path(args.out), {"machine": machine_info(), "adapter": args.adapter, "seed": args.seed,
                                    "test_after": args.test_after, "summary": summary, "table": text,
                                    "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
