"""Image-encoder speed: inference time per image by batch size, and encoder-LoRA training throughput with peak
memory, for segment_anything's own attention and the fused one (xray_textseg.attention), by precision, on one
device, in one run.

    python benchmarks/encoder_speed.py --backbone medsam_vit_b --device cuda --out docs/perf/encoder_speed_gpu.json
    python benchmarks/encoder_speed.py --backbone medsam_vit_b --device cpu --batch-sizes 1 --train-batch-sizes 1

Without ``--checkpoint`` ViT-B gets random weights: its speed and memory are the real model's (same layers, same
shapes), its outputs are not (the agreement rows compare the two attentions on the same weights either way). A
training step is what the trainer does with encoder LoRA: the encoder with peft LoRA on its attention ``qkv`` /
``proj`` (rank 8), the mask decoder trainable, one box prompt per image, Dice-free BCE loss, AdamW; images/s =
batch / median step time. On the CPU every configuration runs in its own process, so its peak RSS is its own; on
CUDA they run one after another in this process (no start-up per row), each with the allocator's peak reset and
its memory freed after it, and an out-of-memory ends that row only. Inputs are random films, never zeros.

Defaults: on CUDA batch sizes 1 8 16 (inference) and 4 8 16 (training), precisions bf16 and fp32 (``tf32`` is
fp32 with TF32 matrix units); on the CPU batch 1, fp32 (and bf16 where the CPU has native bf16).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf_common import machine_info, peak_rss_mb, table, write_json

ATTENTIONS = ("plain", "fused", "fused-bias", "fused-fold")  # fused: the default (fold on CUDA, bias elsewhere)


def build(args_backbone: str, checkpoint: str | None, device, attention: str):
    from xray_textseg.attention import use_fused_attention
    from xray_textseg.backbones import build_backbone

    bb = build_backbone(args_backbone, checkpoint, device=device, allow_random=checkpoint is None,
                        fused_attention=attention != "plain")
    if attention.startswith("fused-"):
        use_fused_attention(bb.image_encoder, attention.split("-", 1)[1])
    return bb


def autocast(device, precision: str):
    import contextlib

    import torch

    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_one(cfg: dict) -> dict:
    """One configuration in this process: {backbone, checkpoint, device, attention, precision, kind, batch}; on
    CUDA an out-of-memory gives a row with ``error``, and the memory is freed either way."""
    import gc

    import torch

    try:
        return _run_one(cfg)
    except torch.cuda.OutOfMemoryError:
        return {**cfg, "error": "out of memory"}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _run_one(cfg: dict) -> dict:
    import torch
    from xray_textseg.backbones import resolve_device

    device = resolve_device(cfg["device"])
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg["precision"] == "tf32"
    bb = build(cfg["backbone"], cfg["checkpoint"], device, cfg["attention"])
    size, batch = bb.input_size, cfg["batch"]
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=g).to(device)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    warmup, repeats = (3, 10) if cuda else (1, cfg["cpu_repeats"])
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if cfg["kind"] == "infer":
        with torch.inference_mode(), autocast(device, cfg["precision"]):
            for i in range(warmup + repeats):
                sync()
                t = time.perf_counter()
                bb.image_encoder(x)
                sync()
                if i >= warmup:
                    times.append(time.perf_counter() - t)
    else:
        from xray_textseg.adapters import lora_encoder
        from xray_textseg.train import decode_batch

        peft = lora_encoder(bb.image_encoder, rank=8, alpha=16)  # freezes the encoder's own weights
        bb.prompt_encoder.requires_grad_(False)
        params = [p for p in peft.parameters() if p.requires_grad] + list(bb.mask_decoder.parameters())
        opt = torch.optim.AdamW(params, lr=1e-4)
        boxes = torch.tensor([[0.2, 0.2, 0.7, 0.8]]).repeat(batch, 1) * size
        target = (torch.rand(batch, 1, 256, 256, generator=g) > 0.5).float().to(device)
        for i in range(warmup + repeats):
            sync()
            t = time.perf_counter()
            with autocast(device, cfg["precision"]):
                emb = peft(x)
                sparse, dense = bb.prompt_embeddings(batch, boxes=boxes)
                logits, _ = decode_batch(bb, emb, sparse, dense)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t)
    step = float(np.median(times))
    out = {**cfg, "steps": len(times), "median_s": round(step, 5)}
    if cfg["kind"] == "infer":
        out["ms_per_image"] = round(step / batch * 1e3, 2)
    else:
        out["images_per_s"] = round(batch / step, 2)
    out["peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else peak_rss_mb()
    out["memory"] = "GPU allocator peak" if cuda else "process peak RSS"
    return out


def run_isolated(cfg: dict, timeout: float) -> dict:
    """``run_one`` in a process of its own (its peak RSS is its own)."""
    cmd = [sys.executable, __file__, "--one", json.dumps(cfg)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {**cfg, "error": f"over {timeout:.0f} s"}
    found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if found:
        return json.loads(found[-1][len("RESULT "):])
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {**cfg, "error": "out of memory" if "out of memory" in proc.stderr.lower() else last[:200]}


def agreement(backbone: str, checkpoint: str | None, device, precisions: list[str]) -> list[dict]:
    """Relative difference ||fused - plain|| / ||plain|| of the embeddings of one random film, same weights, for
    each way the relative positions go in, per precision (and against plain fp32)."""
    import torch
    from xray_textseg.attention import use_fused_attention, use_plain_attention

    bb = build(backbone, checkpoint, device, "plain")
    g = torch.Generator().manual_seed(1)
    if checkpoint is None:  # random weights start with zero relative positions, which would leave them unchecked
        with torch.no_grad():
            for name, p in bb.image_encoder.named_parameters():
                if "rel_pos" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    x = torch.rand(1, 3, bb.input_size, bb.input_size, generator=g).to(device)
    rows = []
    with torch.inference_mode():
        ref = bb.image_encoder(x).double()
        for precision in precisions:  # the encoder is plain here: built so, and put back after each fused run
            with autocast(device, precision):
                plain = bb.image_encoder(x).double()
            for rel_pos in ("bias", "fold"):
                use_fused_attention(bb.image_encoder, rel_pos)
                with autocast(device, precision):
                    fused = bb.image_encoder(x).double()
                rows.append({"precision": precision, "rel_pos": rel_pos,
                             "fused_vs_plain": float((fused - plain).norm() / plain.norm()),
                             "fused_vs_plain_fp32": float((fused - ref).norm() / ref.norm())})
                use_plain_attention(bb.image_encoder)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="medsam_vit_b", choices=("medsam_vit_b", "sam_vit_b", "litemedsam"))
    ap.add_argument("--checkpoint", default=None, help="backbone weights (default: random ViT-B / packaged LiteMedSAM)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--attention", nargs="+", default=["plain", "fused"], choices=ATTENTIONS,
                    help="ViT-B: segment_anything's own, fused (relative positions folded on CUDA, a mask elsewhere), "
                         "or fused with either way forced")
    ap.add_argument("--precisions", nargs="+", default=None, choices=("fp32", "tf32", "bf16"))
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="inference batch sizes")
    ap.add_argument("--train-batch-sizes", nargs="+", type=int, default=None, help="LoRA training batch sizes "
                    "(0 or none: no training rows)")
    ap.add_argument("--cpu-repeats", type=int, default=3, help="timed repeats per row on the CPU (CUDA: 10)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per configuration (CPU, own process)")
    ap.add_argument("--out", default=None, help="JSON results")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one configuration, JSON
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))), flush=True)
        return 0

    import torch
    from xray_textseg.backbones import cpu_has_bf16, resolve_device

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    precisions = args.precisions or (["bf16", "fp32"] if cuda else ["fp32"] + (["bf16"] if cpu_has_bf16() else []))
    infer_sizes = args.batch_sizes or ([1, 8, 16] if cuda else [1])
    train_sizes = [b for b in (args.train_batch_sizes or ([4, 8, 16] if cuda else [1])) if b > 0]
    attentions = args.attention if args.backbone != "litemedsam" else ["plain"]  # TinyViT: no segment_anything ViT
    machine = machine_info(device)
    random_weights = args.checkpoint is None and args.backbone != "litemedsam"
    weights = args.checkpoint or ("random weights: timing only" if random_weights else "packaged weights")
    print(f"{args.backbone} ({weights}) on {machine.get('gpu') or machine['cpu']}, torch {torch.__version__}",
          flush=True)

    configs = [{"kind": kind, "batch": b, "attention": a, "precision": p}
               for kind, sizes in (("infer", infer_sizes), ("train", train_sizes))
               for p in precisions for b in sizes for a in attentions]
    rows = []
    for cfg in configs:
        cfg = {**cfg, "backbone": args.backbone, "checkpoint": args.checkpoint, "device": str(device),
               "cpu_repeats": args.cpu_repeats}
        row = run_one(cfg) if cuda else run_isolated(cfg, args.timeout)
        rows.append(row)
        what = (f"{row['ms_per_image']} ms/image" if "ms_per_image" in row else
                f"{row['images_per_s']} images/s" if "images_per_s" in row else row.get("error"))
        print(f"  {cfg['kind']:5} batch {cfg['batch']:>2} {cfg['attention']:5} {cfg['precision']}: {what}"
              + (f", peak {row['peak_mb']} MB" if "peak_mb" in row else ""), flush=True)

    agree = agreement(args.backbone, args.checkpoint, device, precisions) if len(attentions) > 1 else []
    cols = [("kind", "step"), ("batch", "batch"), ("attention", "attention"), ("precision", "precision"),
            ("ms_per_image", "ms / image"), ("images_per_s", "images / s"), ("peak_mb", "peak MB"),
            ("error", "error")]
    print()
    print(table(rows, cols))
    if agree:
        print()
        print(table([{k: (f"{v:.1e}" if isinstance(v, float) else v) for k, v in r.items()} for r in agree],
                    [("precision", "precision"), ("rel_pos", "relative positions"),
                     ("fused_vs_plain", "|fused - plain| / |plain|"),
                     ("fused_vs_plain_fp32", "vs plain fp32")]))
    print(f"\npeak memory: {'GPU allocator peak' if cuda else 'process peak RSS'}; weights: {weights}")
    write_json(args.out, {"machine": machine, "backbone": args.backbone, "checkpoint": args.checkpoint,
                          "rows": rows, "agreement": agree})
    return 0


if __name__ == "__main__":
    sys.exit(main())
