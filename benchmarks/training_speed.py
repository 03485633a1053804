"""Adapter training speed: seconds per epoch and to a finished (validated, saved) adapter for 10 and 30
labelled images, peak RSS and peak GPU memory, in one run.

    python benchmarks/training_speed.py --out docs/perf/training_speed.json [--data ../shared/xray_real/jsrt_chest]
        [--device cuda] [--n 10 30] [--epochs 5] [--batch-sizes 8 16 32]

Each configuration (images x mode x batch size) trains in its own process, so its peak RSS is its own and
nothing is shared between runs. Without ``--data`` the films are synthetic chest films written by our
``make_sample_data`` (``xray-textseg make-sample-data``) into a temporary folder when ``sample_data/`` has
fewer than needed. Modes: ``cached`` (encoder frozen, every example encoded once, then head + decoder train
on the embeddings) and ``lora`` (encoder LoRA, every step encodes; bf16 autocast), both by default where ``auto``
trains LoRA (CUDA, a CPU with native bf16), ``cached`` alone elsewhere; on CUDA LoRA runs over the given batch
sizes, and the recommended batch size is the fastest per epoch that fitted in memory.

Time to a finished adapter = setup (encoding in cached mode, the untrained-head validation) + epochs +
the final validation through the serving path and the atomic save. ``--epochs`` keeps the run short; the
table also extrapolates to the default 40 epochs (an upper bound: early stopping usually ends sooner).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf_common import REPO, machine_info, peak_rss_mb, table, write_json

DEFAULT_EPOCHS = 40  # TrainConfig's default


def labelled_cases(data: Path) -> list[str]:
    from xray_textseg.evaluation import list_cases

    return [c[0] for c in list_cases(data)]


def prepare_data(data: str | None, n_max: int, workdir: Path) -> tuple[Path, str]:
    """A folder with images/ and labels/<label>/ holding at least ``n_max`` labelled chest films."""
    if data:
        path = Path(data)
        n = len(labelled_cases(path))
        if n < n_max:
            raise SystemExit(f"{path} has {n} labelled films, {n_max} needed")
        return path, str(path)
    sample = REPO / "sample_data"
    if len([c for c in labelled_cases(sample) if c.startswith("chest")]) >= n_max:
        return sample, "sample_data (synthetic)"
    from xray_textseg.sample_data import make_sample_data

    out = workdir / "synthetic"
    make_sample_data(out, n_chest=n_max, n_limb=0, n_dicom=0)
    return out, f"{n_max} synthetic chest films from make_sample_data (seed 0)"


def child(args) -> int:
    """One configuration, in this process; prints one RESULT line of JSON."""
    import torch
    from xray_textseg.backbones import build_backbone, enable_default_onnxruntime, resolve_device
    from xray_textseg.text import TextEncoder
    from xray_textseg.train import TrainConfig, load_folder, train_adapter

    if args.threads:
        torch.set_num_threads(args.threads)
    args.n = args.n[0]
    device = resolve_device(args.device)
    data = Path(args.data)
    cases = [c for c in labelled_cases(data) if args.data_given or c.startswith("chest")][: args.n]
    labels = tuple(args.labels.split(","))
    t0 = time.perf_counter()
    items = load_folder(data, labels, names=cases)
    backbone = build_backbone(device=device)
    enable_default_onnxruntime(backbone)  # as the server and the CLI do: the cached-mode encodes use it
    encoder = TextEncoder(device=device)
    load_s = time.perf_counter() - t0
    cfg = TrainConfig(mode=args.mode, epochs=args.epochs, batch_size=args.batch_size, device=str(device),
                      patience=args.epochs + 1)
    epochs: list[dict] = []

    def progress(row):
        if row.get("event") == "epoch":
            epochs.append({**row, "t_end": time.perf_counter()})

    out = Path(args.workdir) / f"adapter_{args.mode}_{args.n}_{args.batch_size}_{os.getpid()}"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    status = "ok"
    try:
        meta = train_adapter(items, out, backbone=backbone, text_encoder=encoder, labels=labels, cfg=cfg,
                             progress=progress)
    except torch.cuda.OutOfMemoryError as exc:
        status, meta = f"out of memory: {str(exc)[:120]}", {}
    total = time.perf_counter() - t1
    res = {"n_images": args.n, "mode": args.mode, "batch_size": args.batch_size, "device": str(device),
           "status": status, "load_s": round(load_s, 1), "threads": torch.get_num_threads()}
    if epochs:
        ep = [e["seconds"] for e in epochs]
        setup = epochs[0]["t_end"] - ep[0] - t1
        post = time.perf_counter() - epochs[-1]["t_end"] if status == "ok" else None
        res.update({
            "epochs_run": len(ep), "s_per_epoch": round(float(np.mean(ep)), 2),
            "s_per_epoch_first": round(ep[0], 2), "setup_s": round(setup, 1),
            "final_validation_and_save_s": None if post is None else round(post, 1),
            "to_adapter_s": round(total, 1),
            "to_adapter_default_epochs_est_s": round(setup + DEFAULT_EPOCHS * float(np.mean(ep)) + (post or 0), 1),
            "train_images": len(meta.get("train_names", [])), "val_images": len(meta.get("val_names", [])),
            "train_val": f"{len(meta.get('train_names', []))}/{len(meta.get('val_names', []))}",
            "examples_per_epoch_est": 2 * sum(len([lab for lab in it.labels if lab in labels]) for it in items
                                              if it.name in set(meta.get("train_names", []))),
            "val_dice_mean": meta.get("validation", {}).get("dice_mean"),
        })
    res["peak_rss_mb"] = peak_rss_mb()
    if device.type == "cuda":
        res["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="folder with images/ and labels/<label>/ (default: synthetic)")
    ap.add_argument("--labels", default="left_lung,right_lung,heart,left_clavicle,right_clavicle")
    ap.add_argument("--n", type=int, nargs="+", default=[10, 30], help="labelled images per run")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--modes", nargs="+", default=None,
                    help="default: lora and cached where auto picks lora (CUDA, bf16 CPUs); else cached")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                    help="default: 8 (cached); lora on CUDA: 8 16 32")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each run")
    ap.add_argument("--out", default=None, help="JSON results")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="cached", help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, default=8, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data-given", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)

    import torch
    from xray_textseg.backbones import resolve_device
    from xray_textseg.train import auto_mode

    device = resolve_device(args.device)
    machine = machine_info(device)
    modes = args.modes or (["lora", "cached"] if auto_mode(device) == "lora" else ["cached"])
    rows = []
    with tempfile.TemporaryDirectory(prefix="xray_textseg_train_speed_") as tmp:
        data, data_desc = prepare_data(args.data, max(args.n), Path(tmp))
        print(f"data: {data_desc}; device {device}; modes {modes}; epochs {args.epochs}; "
              f"loadavg {machine['loadavg_start']}", flush=True)
        for n in args.n:
            for mode in modes:
                sizes = args.batch_sizes or ([8, 16, 32] if mode == "lora" and device.type == "cuda" else [8])
                for bs in sizes:
                    cmd = [sys.executable, __file__, "--child", "--data", str(data), "--labels", args.labels,
                           "--n", str(n), "--device", str(device), "--mode", mode, "--batch-size", str(bs),
                           "--epochs", str(args.epochs), "--workdir", tmp]
                    if args.threads:
                        cmd += ["--threads", str(args.threads)]
                    if args.data:
                        cmd.append("--data-given")
                    t = time.perf_counter()
                    proc = subprocess.run(cmd, check=False, capture_output=True, text=True,
                                          env={**os.environ, "PYTHONPATH": str(REPO / "lib")})
                    line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT ")]
                    if proc.returncode != 0 or not line:
                        row = {"n_images": n, "mode": mode, "batch_size": bs,
                               "status": f"failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"}
                    else:
                        row = json.loads(line[-1][len("RESULT "):])
                    row["wall_s"] = round(time.perf_counter() - t, 1)
                    rows.append(row)
                    print(f"  n={n} {mode} bs={bs}: {row.get('s_per_epoch')} s/epoch, adapter in "
                          f"{row.get('to_adapter_s')} s, peak RSS {row.get('peak_rss_mb')} MB"
                          + (f", peak GPU {row.get('peak_gpu_mb')} MB" if "peak_gpu_mb" in row else "")
                          + f" [{row.get('status')}]", flush=True)

    recommended = {}
    for n in args.n:
        for mode in modes:
            ok = [r for r in rows if r["n_images"] == n and r["mode"] == mode and r.get("status") == "ok"
                  and r.get("s_per_epoch")]
            if len(ok) > 1:
                best = min(ok, key=lambda r: r["s_per_epoch"])
                recommended[f"{mode}_n{n}"] = best["batch_size"]
    machine["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    result = {"benchmark": "training_speed", "machine": machine, "data": data_desc,
              "config": {"device": str(device), "modes": modes, "epochs": args.epochs, "n": args.n,
                         "labels": args.labels.split(","), "threads": args.threads or torch.get_num_threads()},
              "rows": rows, "recommended_batch_size": recommended}
    print()
    print(table(rows, [("n_images", "images"), ("mode", "mode"), ("batch_size", "batch"),
                       ("train_val", "train/val"), ("s_per_epoch", "s/epoch"), ("setup_s", "setup s"),
                       ("final_validation_and_save_s", "final val+save s"), ("to_adapter_s", "to adapter s"),
                       ("epochs_run", "epochs"), ("to_adapter_default_epochs_est_s", f"est. {DEFAULT_EPOCHS} epochs s"),
                       ("peak_rss_mb", "peak RSS MB"), ("peak_gpu_mb", "peak GPU MB"), ("status", "status")]))
    if recommended:
        print(f"\nrecommended batch size (fastest per epoch that fitted): {recommended}")
    print(f"load average {machine['loadavg_start']} -> {machine['loadavg_end']}")
    write_json(args.out, result)
    return 0 if all(r.get("status") == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
