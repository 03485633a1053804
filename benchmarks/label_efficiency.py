"""Label-efficiency benchmark: text+adapter Dice against the number of training images.

For each data set (a folder like ``../shared/xray_real/jsrt_chest``), each split seed and each k,
k images are drawn for training (the adapter's own validation split is taken out of them) and the
images never drawn for any k of that seed form the test set. Reported per label, on the test set:
zero-shot (prior boxes), oracle box (ground-truth boxes, the ceiling of box prompting) and text +
adapter. Writes JSON, a Markdown table and a plot.

    python benchmarks/label_efficiency.py --data ../shared/xray_real/jsrt_chest ../shared/xray_real/oai_lower_limb \
        --k 5 10 20 30 --seeds 0 1 --out docs/label_efficiency [--device cuda] [--test-limit 10]

Runs made at different times (another seed, a later serving option) are put together without training
by ``--render A/results.json B/results.json --out docs/label_efficiency``: a row of a later file replaces
the same (data, seed, k, method, label) row of an earlier one.

Experiments: ``--labels left_clavicle right_clavicle`` trains and tests only those labels; ``--set
fine_shift=0.25`` sets any other TrainConfig field (see docs/results.md for the runs made this way).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))

from xray_textseg.backbones import build_backbone, enable_default_onnxruntime, resolve_device  # noqa: E402
from xray_textseg.evaluation import evaluate_folder, list_cases  # noqa: E402
from xray_textseg.predictor import Predictor  # noqa: E402
from xray_textseg.text import TextEncoder  # noqa: E402
from xray_textseg.train import (TrainConfig, cut_while_improving, load_folder, retune_adapter,  # noqa: E402
                                 train_adapter)


def labels_of(data: Path) -> tuple[str, ...]:
    return tuple(sorted(p.name for p in (data / "labels").iterdir() if p.is_dir()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", default=None)
    ap.add_argument("--k", nargs="+", type=int, default=[5, 10, 20, 30])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--out", default="docs/label_efficiency")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--mode", default="auto", help="training mode: auto | lora | cached")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--time-budget", type=float, default=None,
                    help="minutes per adapter, encoding included (the final validation comes on top)")
    ap.add_argument("--variants", type=int, default=None,
                    help="cached mode: augmented copies encoded per example (default: TrainConfig's)")
    ap.add_argument("--labels", nargs="+", default=None,
                    help="train and evaluate only these labels (default: all in DATA)")
    ap.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                    help="other TrainConfig fields, e.g. --set fine_shift=0.25 (values parsed as JSON)")
    ap.add_argument("--test-limit", type=int, default=None, help="evaluate on at most N test images")
    ap.add_argument("--test-after", type=int, default=None,
                    help="test films: each seed's order after its first N (default: the largest --k), so a run of "
                         "one k tests on the films a run of 5..30 does with --test-after 30")
    ap.add_argument("--tag", default=None,
                    help="record the adapters as method 'text+adapter@TAG' (e.g. lora), beside the default ones")
    ap.add_argument("--extra-rounds", type=int, default=0,
                    help="as the app's train_extra_rounds: while the time budget ended a run that improved on its "
                         "start, train again on the same films from its adapter, up to N times; each round is "
                         "tested (method suffix '+rN')")
    ap.add_argument("--skip-baselines", action="store_true")
    ap.add_argument("--also-default-grow", action="store_true",
                    help="evaluate each adapter a second time with the predictor's default coarse-box growth instead "
                         "of the adapter's per-label choice (method 'text+adapter@default-grow')")
    ap.add_argument("--adapters", default="runs/label_efficiency",
                    help="where the trained adapters go (kept out of docs/)")
    ap.add_argument("--retune", action="store_true",
                    help="with --resume: evaluate a copy of each adapter found with its priors refitted on its "
                         "training films and its serving settings chosen again on its validation films (no "
                         "retraining), so adapters trained before a serving option existed are measured with it")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows already in OUT/results.json and skip what they cover; evaluate adapters "
                         "already trained in --adapters instead of training them again")
    ap.add_argument("--render", nargs="+", default=None, metavar="RESULTS_JSON",
                    help="train nothing: merge these results.json files (a row of a later file replaces the row "
                         "of an earlier one with the same data, seed, k, method and label) and write the merged "
                         "results.json, results.md and plot to OUT")
    ap.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                    help="table and plot only these adapter methods, e.g. text+adapter text+adapter@lora (default: "
                         "every one; results.json keeps all rows either way)")
    args = ap.parse_args(argv)
    if args.render:
        return render(args.render, Path(args.out), args.methods)
    if not args.data:
        ap.error("--data is required (or --render RESULTS_JSON ... to only merge and tabulate)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    rows = json.loads(results.read_text()) if args.resume and results.exists() else []

    def done(data, seed, k, method):
        return any(r["data"] == data and r["seed"] == seed and r["k"] == k and r["method"] == method for r in rows)

    def save():
        write_rows(rows, results)

    overrides = parse_overrides(args.set)
    adapter_method = "text+adapter" + (f"@{args.tag}" if args.tag else "")
    device = resolve_device(args.device)
    backbone = build_backbone(device=device)
    enable_default_onnxruntime(backbone)  # as the server and the CLI do (XRAY_TEXTSEG_ONNXRUNTIME=0: PyTorch)
    encoder = TextEncoder(device=device)
    for data in map(Path, args.data):
        labels = tuple(args.labels) if args.labels else labels_of(data)
        cases = [c[0] for c in list_cases(data)]
        for seed in args.seeds:
            order = cases[:]
            random.Random(seed).shuffle(order)
            kmax = max(args.test_after or 0, *args.k)
            if kmax >= len(order):
                raise SystemExit(f"k={kmax} leaves no test images in {data} ({len(order)} cases)")
            test = sorted(order[kmax:])[: args.test_limit or None]
            predictor = Predictor(backbone, labels=labels, text_encoder=encoder, cache_size=16)
            if not args.skip_baselines:
                for mode in ("zero-shot", "oracle-box"):
                    if done(data.name, seed, 0, mode):
                        continue
                    rep = evaluate_folder(predictor, data, mode=mode, names=test, hd95=False, progress=True)
                    for lab, s in rep["per_label"].items():
                        rows.append({"data": data.name, "seed": seed, "k": 0, "method": mode, "label": lab,
                                     "dice": s["dice_mean"], "n_test": s["n"]})
                    print(f"{data.name} seed {seed} {mode}: "
                          + " ".join(f"{lab}={s['dice_mean']:.3f}" for lab, s in rep["per_label"].items()), flush=True)
                    save()
            for k in args.k:
                if done(data.name, seed, k, adapter_method):
                    continue
                train_names = order[:k]
                items = load_folder(data, labels, names=train_names)
                cfg = TrainConfig(mode=args.mode, epochs=args.epochs, seed=seed, device=str(device),
                                  time_budget_s=args.time_budget * 60 if args.time_budget else None,
                                  cached_variants=args.variants or 0, **overrides)
                finished = sorted(Path(args.adapters).glob(f"{data.name}_s{seed}_k{k}_*/metadata.json"))
                # the first round's adapter only (not "_retuned" copies, not extra rounds "_r1", ...)
                finished = [f for f in finished if f.parent.name.rsplit("_", 1)[-1].isdigit()]
                if args.resume and finished:  # trained by an interrupted run: evaluate it, don't train again
                    adapter = finished[-1].parent
                    meta = json.loads(finished[-1].read_text())
                    train_s = float(meta.get("training", {}).get("seconds", float("nan")))
                    print(f"reusing {adapter}", flush=True)
                    if args.retune:
                        retuned = adapter.with_name(adapter.name + "_retuned")
                        if not retuned.exists():
                            retune_adapter(adapter, retuned, data, backbone=backbone, text_encoder=encoder)
                        adapter, meta = retuned, json.loads((retuned / "metadata.json").read_text())
                        print(f"evaluating {adapter} (serving settings chosen again: "
                              f"{meta['serving'].get('coarse_prompt')})", flush=True)
                else:
                    adapter = Path(args.adapters) / f"{data.name}_s{seed}_k{k}_{int(time.time())}"
                    t0 = time.perf_counter()
                    meta = train_adapter(items, adapter, backbone=backbone, text_encoder=encoder, labels=labels,
                                         cfg=cfg, log_path=adapter.parent / f"{adapter.name}.jsonl")
                    train_s = time.perf_counter() - t0
                for rnd in range(args.extra_rounds + 1):
                    if rnd:  # the app's extra round: only after a run the budget ended while it still improved
                        run = meta.get("training", {})
                        if not cut_while_improving(run):
                            print(f"no extra round {rnd}: {adapter.name} stopped by {run.get('stopped')!r}, "
                                  f"best epoch {run.get('best_epoch')}", flush=True)
                            break
                        source = adapter
                        adapter = Path(args.adapters) / f"{data.name}_s{seed}_k{k}_{int(time.time())}_r{rnd}"
                        t0 = time.perf_counter()
                        meta = train_adapter(items, adapter, backbone=backbone, text_encoder=encoder, labels=labels,
                                             cfg=replace(cfg, init_from=str(source)),
                                             log_path=adapter.parent / f"{adapter.name}.jsonl")
                        train_s = time.perf_counter() - t0
                    name = adapter_method + (f"+r{rnd}" if rnd else "")
                    methods = [name] + (["text+adapter@default-grow"] if args.also_default_grow and not rnd else [])
                    for method in methods:
                        rows += evaluate_adapter(predictor, data, test, adapter, meta, train_s, seed, k, method,
                                                 default_grow=method != name)
                        save()
    return write_outputs(rows, out, args.methods)


def evaluate_adapter(predictor: Predictor, data: Path, test: list[str], adapter: Path, meta: dict, train_s: float,
                     seed: int, k: int, method: str, default_grow: bool = False) -> list[dict]:
    """Test Dice rows of one adapter on the test films (``default_grow``: with the default fine-box growth
    instead of the per-label one its validation chose), printed as one line."""
    predictor.load_adapter(adapter)
    grows = dict(predictor.label_grow)
    if default_grow:
        predictor.label_grow = {}
    rep = evaluate_folder(predictor, data, mode="text", names=test, hd95=False, progress=True)
    rows = [{"data": data.name, "seed": seed, "k": k, "method": method, "label": lab, "dice": s["dice_mean"],
             "n_test": s["n"], "train_s": round(train_s, 1), "mode": meta["mode"], "device": meta["device"],
             "coarse_grow": predictor.grow_for(lab)} for lab, s in rep["per_label"].items()]
    print(f"{data.name} seed {seed} k={k} {method} ({meta['mode']}, {train_s:.0f} s): "
          + " ".join(f"{lab}={s['dice_mean']:.3f}" for lab, s in rep["per_label"].items())
          + f"  growth {predictor.coarse_grow if default_grow else grows}", flush=True)
    predictor.unload_adapter()
    return rows


def write_rows(rows: list[dict], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=2))
    tmp.replace(path)


def merge_rows(files: list) -> list[dict]:
    """Rows of several results.json files; a later file's row replaces an earlier one with the same key."""
    merged: dict[tuple, dict] = {}
    for f in files:
        for r in json.loads(Path(f).read_text()):
            merged[(r["data"], r["seed"], r["k"], r["method"], r["label"])] = r
    return list(merged.values())


def render(files: list, out: Path, methods: list[str] | None = None) -> int:
    out.mkdir(parents=True, exist_ok=True)
    return write_outputs(merge_rows(files), out, methods)


def write_outputs(rows: list[dict], out: Path, methods: list[str] | None = None) -> int:
    """OUT/results.json (atomically, every row), results.md and label_efficiency.png (the baselines and the adapter
    ``methods``, default all); prints the table."""
    write_rows(rows, out / "results.json")
    if methods:
        unknown = set(methods) - {r["method"] for r in rows}
        if unknown:
            raise SystemExit(f"--methods: no rows for {sorted(unknown)}")
        rows = [r for r in rows if not r["method"].startswith("text+adapter") or r["method"] in methods]
    table = markdown(rows)
    (out / "results.md").write_text(table)
    print(table)
    plot(rows, out / "label_efficiency.png")
    return 0


def parse_overrides(pairs: list[str]) -> dict:
    """``["fine_shift=0.25", ...]`` -> TrainConfig keyword arguments; unknown fields are an error."""
    fields = set(TrainConfig.__dataclass_fields__)
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--set {pair!r}: expected FIELD=VALUE with FIELD one of {sorted(fields)}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def method_label(rows: list[dict], method: str) -> str:
    """A column's or line's name for an adapter method: its ``--tag``, else its adapters' training mode."""
    if "@" in method:
        return method.split("@", 1)[1]
    modes = {r.get("mode") for r in rows if r["method"] == method} - {None}
    return modes.pop() if len(modes) == 1 else "adapter"


def markdown(rows: list[dict]) -> str:
    """One row per data set and label; columns: zero-shot, oracle box, then text+adapter per k (and per ``--tag``:
    a tagged run gets its own columns, "k=30 (TAG)"; untagged ones are named by their training mode)."""
    ks = sorted({r["k"] for r in rows if r["k"]})
    methods = sorted({r["method"] for r in rows if r["method"].startswith("text+adapter")},
                     key=lambda m: (m != "text+adapter", m))
    cols = [(m, k) for m in methods for k in ks if any(r["method"] == m and r["k"] == k for r in rows)]
    lines = ["| data | label | zero-shot | oracle box | " + " | ".join(
        f"k={k} ({method_label(rows, m)})" for m, k in cols) + " |",
        "|---" * (4 + len(cols)) + "|"]
    for data in sorted({r["data"] for r in rows}):
        for lab in sorted({r["label"] for r in rows if r["data"] == data}):
            def mean(method, k=0):
                by_seed = {r["seed"]: r["dice"] for r in rows if r["data"] == data and r["label"] == lab
                           and r["method"] == method and r["k"] == k}
                if not by_seed:
                    return "-"
                if len(by_seed) == 1:
                    return f"{next(iter(by_seed.values())):.3f} (seed {next(iter(by_seed))})"
                return f"{np.mean(list(by_seed.values())):.3f} (" + " / ".join(
                    f"{by_seed[s]:.3f}" for s in sorted(by_seed)) + ")"
            lines.append(f"| {data} | {lab} | {mean('zero-shot')} | {mean('oracle-box')} | "
                         + " | ".join(mean(m, k) for m, k in cols) + " |")
    sources = sorted({f"{method_label(rows, r['method'])} k={r['k']}: {r['source']}" for r in rows if r.get("source")})
    notes = "".join(f"\nNot from a run of this script: {s}.\n" for s in sources)
    return "\n".join(lines) + ("\n\nTest Dice: mean over split seeds (each seed's value in brackets, seeds in "
                               "ascending order); k = training images (adapter validation taken from them).\n") + notes


def plot(rows: list[dict], path: Path) -> None:
    """Test Dice against k per data set: one colour per label, one line style per adapter method (the mean of
    the splits, with a dot per split), the oracle box dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["data"] for r in rows})
    methods = sorted({r["method"] for r in rows if r["method"].startswith("text+adapter")},
                     key=lambda m: (m != "text+adapter", m))
    styles = dict(zip(methods, ["-", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1))]))
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    for ax, data in zip(axes[0], datasets):
        ks = sorted({r["k"] for r in rows if r["data"] == data and r["k"]})
        for i, lab in enumerate(sorted({r["label"] for r in rows if r["data"] == data})):
            c = plt.get_cmap("tab10")(i)
            for j, method in enumerate(m for m in methods if m in styles):
                per_k = {k: [r["dice"] for r in rows if r["data"] == data and r["label"] == lab and r["k"] == k
                             and r["method"] == method] for k in ks}
                per_k = {k: v for k, v in per_k.items() if v}
                if not per_k:
                    continue
                ax.plot(list(per_k), [np.mean(v) for v in per_k.values()], linestyle=styles[method], color=c,
                        label=lab if j == 0 else None)
                for k, v in per_k.items():  # each split's value; a single dot where only one split was run
                    ax.plot([k] * len(v), v, ".", color=c, ms=5)
            oracle = [r["dice"] for r in rows
                      if r["data"] == data and r["label"] == lab and r["method"] == "oracle-box"]
            if oracle:
                ax.axhline(np.mean(oracle), color=c, ls="--", lw=0.8)
        for method in (m for m in methods if m in styles):  # a grey key line per method
            ax.plot([], [], linestyle=styles[method], color="0.4",
                    label=f"text + adapter ({method_label(rows, method)})")
        ax.set_title(f"{data}: test Dice, mean of splits and each split (dots)\n(dashed: oracle box zero-shot)",
                     fontsize=9)
        ax.set_xticks(ks)
        ax.set_xlabel("training images")
        ax.set_ylabel("test Dice")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
