"""Body-region check: how far each test film's whole-film embedding lies from each region's training films, and
which prompts for the other region's labels it flags (``PriorBoxes.film_region_warning``).

    python benchmarks/film_regions.py --data ../shared/xray_real/jsrt_chest ../shared/xray_real/oai_lower_limb \\
        [--adapter starter] [--test-after 30 --seed 0] [--perturb rotate+7 inverted ...] [--out result.json]
    python benchmarks/film_regions.py --data ... --refit     # fit the adapter's region statistics, write priors.json

Test films: each set's cases shuffled by ``random.Random(seed)`` with the first ``--test-after`` left out (the
defaults are the starter adapter's test films). ``--refit`` fits the statistics on the adapter's own training films
(``train_names`` in its metadata, found in ``--data``) as the trainer does for a new adapter, and rewrites the
adapter's ``priors.json`` (atomically; weights unchanged): how an adapter trained before the check gets it.
``--perturb`` also measures changed films (``robustness.py``'s perturbations).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from perf_common import machine_info, write_json  # noqa: F401 - sys.path set there
from robustness import _unit, perturbations, test_cases

from xray_textseg.io import load_mask, load_radiograph, radiograph_from_array
from xray_textseg.vocabulary import BODY_REGIONS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", required=True, help="folders laid out like ../shared/xray_real/<set>")
    ap.add_argument("--adapter", default="starter", help="adapter directory or 'starter' (default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-after", type=int, default=30)
    ap.add_argument("--perturb", nargs="*", default=[], help="also these perturbations of robustness.py")
    ap.add_argument("--refit", action="store_true", help="fit on the adapter's training films, rewrite priors.json")
    ap.add_argument("--out", default=None, help="JSON file for the per-film rows")
    args = ap.parse_args(argv)

    from xray_textseg.cli import _adapter_path
    from xray_textseg.predictor import build_predictor
    from xray_textseg.priors import PriorBoxes
    from xray_textseg.train import fit_film_regions, load_folder

    adapter = Path(_adapter_path(args.adapter))
    predictor = build_predictor(adapter=str(adapter))
    if args.refit:
        names = json.loads((adapter / "metadata.json").read_text())["train_names"]
        items = [it.on_field() for d in args.data for it in load_folder(d, names=names)]
        priors = PriorBoxes.load(adapter / "priors.json")
        t = time.perf_counter()
        counts = fit_film_regions(predictor, items, priors)
        priors.save(adapter / "priors.json")
        print(f"fitted on {sum(s['n'] for s in priors.film_regions.values())} of {len(items)} training films "
              f"({counts}) in {time.perf_counter() - t:.0f} s; wrote {adapter / 'priors.json'}")
        predictor.load_adapter(str(adapter))  # the refitted priors
    if not predictor.priors.film_regions:
        raise SystemExit(f"{adapter} keeps no body-region statistics: run with --refit")
    table = perturbations()
    unknown = [n for n in args.perturb if n not in table]
    if unknown:
        raise SystemExit(f"unknown perturbation(s) {unknown}; known: {', '.join(table)}")
    rows = []
    for data in map(Path, args.data):
        for case, img_path, mask_paths in test_cases(data, args.seed, args.test_after):
            image = load_radiograph(img_path)
            base = _unit(image.pixels) * 255
            masks = {lab: load_mask(p, image.shape) > 0 for lab, p in mask_paths.items()}
            region = next(r for r, members in BODY_REGIONS.items() if any(lab in members for lab in masks))
            for name in ["none", *args.perturb]:
                pixels, _ = table[name](base.astype(np.float32), masks)
                predictor.set_image(radiograph_from_array(np.asarray(pixels, np.float32)))
                d = predictor.film_distances()
                flagged = {lab: predictor.priors.film_region_warning(lab, d) is not None
                           for members in BODY_REGIONS.values() for lab in members}
                rows.append({"case": case, "region": region, "perturbation": name,
                             "distances": {k: round(v, 3) for k, v in d.items()}, "flagged": flagged})
    lines = ["| films | perturbation | own region z | other region z | own labels flagged | other labels flagged |",
             "|---|---|---|---|---|---|"]
    for region in BODY_REGIONS:
        for name in ["none", *args.perturb]:
            sel = [r for r in rows if r["region"] == region and r["perturbation"] == name]
            if not sel:
                continue
            own = [r["distances"][region] for r in sel]
            other = [v for r in sel for k, v in r["distances"].items() if k != region]
            own_f = [f for r in sel for lab, f in r["flagged"].items() if lab in BODY_REGIONS[region]]
            oth_f = [f for r in sel for lab, f in r["flagged"].items() if lab not in BODY_REGIONS[region]]
            lines.append(f"| {region} ({len(sel)}) | {name} | {min(own):.2f}-{max(own):.2f} | "
                         f"{min(other):.2f}-{max(other):.2f} | {sum(own_f)} / {len(own_f)} | "
                         f"{sum(oth_f)} / {len(oth_f)} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        write_json(args.out, {"machine": machine_info(), "adapter": str(adapter), "seed": args.seed,
                              "test_after": args.test_after, "table": text, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
