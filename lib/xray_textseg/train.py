"""Text-guided adapter training: LoRA in the image encoder + text->prompt head + mask decoder.

Samples are (image, label text, mask). Each labelled structure gives two kinds of example, the two
passes the predictor runs (see ``predictor.py``):

* *coarse*: the whole film, prompted with the label's prior box (fitted on the training labels)
  plus the projected text tokens;
* *fine*: a crop around the structure (its box grown or shrunk at random, long bones in tiles),
  prompted with the crop's box plus the text tokens.

Modes
-----
``lora``   the image encoder gets peft LoRA adapters on its attention ``qkv``/``proj`` and is trained
           with the head and decoder; every step encodes augmented inputs (a film's coarse examples share
           one encode). Fast on a GPU; on a CPU with native bf16 (AVX-512 BF16, AMX) ~45 s per epoch of 8
           chest films on 2 cores (Zen 5, in bf16). On the CPU bf16 autocast is used only where a LoRA step
           measures faster in it than in fp32 (``lora_step_precision``, once per machine).
``cached`` the encoder stays frozen: every example is encoded once (``cached_variants`` augmented
           copies), then only the head and decoder train on the cached embeddings. The CPU mode:
           the encoder forward is ~90 % of the cost.
``auto``   ``lora`` on CUDA and on a CPU with native bf16, ``cached`` on other CPUs (fp32 LoRA is ~3x slower
           there). The log says which mode ran.

Loss: Dice + BCE (MONAI ``DiceCELoss``) on the decoder's logits, plus MSE between predicted and
actual IoU (the active-learning uncertainty uses the predicted IoU). AdamW, warm-up + cosine
schedule, early stopping on validation Dice, a wall-clock budget, AMP (bf16) on CUDA and, for LoRA,
on a CPU with native bf16 where it measures faster. Augmentations keep laterality: small rotation/scale/shift,
contrast/brightness/gamma, noise; never a flip.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .adapters import LORA_TARGETS
from .backbones import Backbone, cpu_has_bf16, cpuinfo, encode_batch_size
from .io import Radiograph, field_radiograph, load_mask, load_radiograph
from .labelmaps import overlap_pairs
from .priors import ANCHORS, FILM_REGION_MAX_FILMS, FILM_REGION_MIN_FILMS, THICKNESS_CHECKED, PriorBoxes
from .text import PromptHead, TextEncoder, side_code
from .transforms import View, film_field, mask_box
from .vocabulary import label_phrases

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    mode: str = "auto"  # auto | lora | cached
    epochs: int = 40
    batch_size: int = 8
    lr_head: float = 1e-3
    lr_decoder: float = 1e-4
    lr_lora: float = 5e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    lora_rank: int = 8
    lora_alpha: int = 16
    # the encoder modules that get LoRA (a regex over module names): by default every attention qkv / proj of the
    # TinyViT (layers 1-3) or ViT. Backward stops at the first adapted layer: on 2 Intel cores a LiteMedSAM step took
    # 1.51 s with all of them, 1.27 s with layers 2-3, 0.79 s with layer 3 alone (0.70 s forward only).
    lora_targets: str = LORA_TARGETS
    n_tokens: int = 4
    head_hidden: int = 256
    val_fraction: float = 0.2
    min_val_images: int = 1
    patience: int = 8  # epochs without a better validation Dice before stopping
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    # wall-clock budget from the start of fit (encoding included): over it, the epoch in progress ends at the next
    # step, is validated, and the best epoch is kept. The final validation through the serving path comes on top.
    time_budget_s: float | None = None
    # cached mode: augmented copies encoded per training film; 0 = auto: as many (1-4) as keep the encodes (one
    # whole film + one crop per label, per copy) to about ``cached_encodes``. 8 OAI films x 4 copies beat 8 x 1:
    # validation femur 0.82 vs 0.79, tibia 0.73 vs 0.67. A training encode takes ~2.2 s on 2 CPU cores at batch 1
    # (3.7 s at the old batch 4), so 100 encodes are ~4 minutes of a training budget; large sets get their
    # diversity from their own films.
    cached_variants: int = 0
    cached_encodes: int = 100
    crop_margin: float = 0.15  # the predictor takes both from the adapter's metadata
    # fine crops: one stretched crop up to 1:8, tiles beyond. A decoder trained on whole stretched long bones
    # beats one trained on 1:2 tiles (OAI k=10, seed 0, 10 test films: femur 0.74 vs 0.65, tibia 0.63 vs 0.58)
    max_tile_aspect: float = 8.0
    # fine training boxes: the true box grown by U(-0.05, 0.3) per side, then shifted by U(-s, s) of its size
    # per axis: at serving time the fine box comes from the coarse mask and is often off-centre. Off by
    # default: 0.25 made clavicles worse (JSRT k=10 seed 0, 10 test films: 0.419/0.498 vs 0.536/0.571)
    fine_shift: float = 0.0
    # serving: the fine crop is cut around the coarse mask's box grown by a fraction per side. After training, each
    # label gets the candidate with the best Dice on the validation films (through the serving path); one other than
    # the first (the predictor's default) only when it wins by ``grow_margin``. Stored in the adapter's metadata
    # (serving.coarse_grow), used by Predictor.load_adapter. Clavicles gained 0.04-0.10 Dice from 0.3-0.5 (docs/results.md).
    grow_candidates: tuple[float, ...] = (0.15, 0.3, 0.5)
    grow_margin: float = 0.01
    # the coarse prompt box (training and serving): "median" of the training films' boxes, their "envelope" (a box
    # holding them all: the text, not the box, has to place the structure), or "auto": the envelope for labels the
    # median box overlaps poorly (the clavicles), the median for the others (PriorBoxes.fit, priors.SPREAD_IOU).
    # Median by default: on JSRT (k=30, LoRA, 12 min) "auto" gave clavicles 0.78 / 0.82 (split 0) and 0.60 / 0.66
    # (split 1), no better than the median runs (0.73 / 0.83 over three); docs/results.md, 2026-11-29.
    coarse_prior: str = "median"
    # labels whose coarse prompt is an envelope (above) are found on a mid view instead of the whole film: the box
    # holding their envelopes (PriorBoxes.mid_region; on a chest film the upper thorax) cut with crop_margin and
    # stretched to the model input, so a clavicle is seen at ~3x the whole film's vertical resolution. One more
    # encode per training film and epoch; at serving it replaces the whole-film encode when only such labels are
    # asked. Its mask places the fine crop as the coarse mask does for the other labels. Off by default: with
    # coarse_prior "auto" on JSRT (k=30, LoRA, 6 epochs, two splits) right clavicle 0.872 vs 0.825, left 0.739 vs
    # 0.729 (two complete failures on split 0), heart and lungs unchanged: a lead, not yet a result (docs/results.md).
    mid_view: bool = False
    # lora mode draws each epoch's fine crops anew: "uniform" gives every label one crop per film and epoch;
    # "error" shares the same number of crops out by the last validation's error per label (1 - Dice), each label
    # keeping at least ``fine_floor`` of its uniform share, so labels still learning (the clavicles) get more of the
    # encodes than labels already fitted (the lungs). The first epoch is uniform. Not the default: JSRT k=30, 12 min
    # on 2 Intel cores (3 epochs), three splits, 10 test films each: clavicles 0.609 / 0.631 vs 0.588 / 0.648, heart
    # 0.891 vs 0.904 (split 2: right clavicle 0.510 vs 0.683), within the run-to-run spread (docs/results.md,
    # 2026-11-29, fifth session).
    fine_sampling: str = "uniform"
    fine_floor: float = 0.25
    # continue from an earlier adapter (its directory) instead of the base weights: its prompt head, mask decoder
    # and (lora mode) encoder LoRA are the starting weights, so training accumulates over retraining rounds, and its
    # training / validation films keep their sides of the split (split_items). Backbone, text encoder, head and
    # LoRA shapes must match (continue_problem says why not). None = from the base weights. On 2 Intel cores (fp32,
    # 12-minute runs) JSRT k=20 then k=30 continued: heart 0.923, clavicles 0.826 / 0.805 against 0.910, 0.587 /
    # 0.631 for k=30 from the base weights (two splits, docs/results.md 2026-11-29, sixth session).
    init_from: str | None = None
    augment: bool = True
    # film-space degradation of training inputs (:func:`degrade_film`): the probability, per example and each
    # independently, that the film is blurred (Gaussian, sigma U(0.5, 0.3 % of its longer side) film pixels) or
    # given noise (sigma U(0.5 %, 5 %) of its grey range) before it is cut and resized, as a softer detector or a
    # lower dose would give it. In film space, not model space: a long bone's fine crop is stretched several-fold
    # across, so film blur widens its edges there far more than along it. 0 = off.
    degrade: float = 0.0


@dataclass
class TrainItem:
    """One labelled image: pixels and a boolean mask per label name; ``unknown[label]`` marks pixels whose truth
    for that label the saved label could not say (a clavicle's pixels under a lung painted over it,
    ``labelmaps.structure_masks``): training, validation and the promotion gate ignore them."""

    name: str
    image: Radiograph
    masks: dict[str, np.ndarray]
    source_hash: str = ""  # the whole film's content hash when ``image`` is its exposed field (:meth:`on_field`)
    unknown: dict[str, np.ndarray] = field(default_factory=dict)

    def complete(self, label: str) -> bool:
        """True when the label's mask is known at every pixel (fit for prior boxes and shape statistics)."""
        return label in self.masks and self.masks[label].any() and label not in self.unknown

    @property
    def labels(self) -> list[str]:
        return [k for k, v in self.masks.items() if v.any()]

    @property
    def hash(self) -> str:
        """The whole film's content hash: what the adapter's metadata records and its split keeps."""
        return self.source_hash or self.image.content_hash()

    def on_field(self) -> TrainItem:
        """The item as the predictor sees its film: turned upright when it lies askew on its canvas, or cropped to
        the exposed field when flat borders take a large part of it (``transforms.film_field``), masks with it; else
        itself. Training and serving see the same pixels."""
        found = film_field(self.image.pixels)
        if found is None:
            return self
        return TrainItem(self.name, field_radiograph(self.image, found),
                         {k: found.mask_from_film(v) for k, v in self.masks.items()}, self.hash,
                         {k: found.mask_from_film(v) for k, v in self.unknown.items()})


@dataclass
class Example:
    label: str
    kind: str  # coarse | fine
    box: np.ndarray  # (4,) model-space prompt box
    target: torch.Tensor  # (R, R) float
    ignore: torch.Tensor | None = None  # (R, R) float, 1 where the target is unknown (TrainItem.unknown)
    x: torch.Tensor | None = None  # (3, S, S) model input (lora mode / re-encoding)
    emb: torch.Tensor | None = None  # (256, 64, 64) cached embedding (cached mode)
    item: int = 0
    share: tuple | None = None  # examples with the same key have the same input: encoded once


@dataclass
class TrainResult:
    mode: str
    epochs_run: int
    best_epoch: int
    best_val_dice: float
    history: list[dict] = field(default_factory=list)
    stopped: str = ""  # why training stopped: "epochs" | "early stop" | "time budget" | "stop requested"
    seconds: float = 0.0


# --- data ---------------------------------------------------------------------------------------------
def load_folder(data_dir: str | Path, labels: tuple[str, ...] | None = None,
                names: list[str] | None = None) -> list[TrainItem]:
    """Items from a folder laid out like ``../shared/xray_real/<set>`` (``images/``, ``labels/<label>/``)."""
    from .evaluation import list_cases

    items = []
    for case, img_path, mask_paths in list_cases(data_dir):
        if names is not None and case not in names:
            continue
        image = load_radiograph(img_path)
        masks = {lab: load_mask(p, image.shape) > 0 for lab, p in mask_paths.items()
                 if labels is None or lab in labels}
        if any(m.any() for m in masks.values()):
            items.append(TrainItem(case, image, masks))
    return items


def split_items(items: list[TrainItem], val_fraction: float, seed: int, min_val: int = 1,
                keep: dict[str, str] | None = None) -> tuple[list[TrainItem], list[TrainItem]]:
    """Deterministic split by image (never by structure: one image's labels stay on one side).

    ``keep`` maps image content hashes to the side ("train" or "val") an earlier adapter put them on
    (:func:`earlier_split`): those images stay there, and only the others are shared out, as many to validation
    as bring it to ``val_fraction`` of all images. So a retrained adapter is never validated on a film the
    adapter it continues from (or is compared with) trained on, and the validation films stay the same ones."""
    keep = keep or {}
    side = {i: keep.get(it.hash) for i, it in enumerate(items)}
    order = sorted((i for i in range(len(items)) if side[i] not in ("train", "val")),
                   key=lambda i: items[i].hash)
    rng = random.Random(seed)
    rng.shuffle(order)
    n_val = max(min_val, round(val_fraction * len(items))) if len(items) > 1 else 0
    kept_val = [it for i, it in enumerate(items) if side[i] == "val"]
    n_new = max(0, n_val - len(kept_val))
    val = kept_val + [items[i] for i in order[:n_new]]
    train = [it for i, it in enumerate(items) if side[i] == "train"] + [items[i] for i in order[n_new:]]
    return train, val


def earlier_split(adapter_dir: str | Path) -> dict[str, str]:
    """The sides of the split the adapter in ``adapter_dir`` was trained with: image content hash -> "train" /
    "val", from its metadata (empty when it has none)."""
    try:
        meta = json.loads((Path(adapter_dir) / "metadata.json").read_text())
    except (OSError, ValueError):
        return {}
    return {**{h: "train" for h in meta.get("train_images", [])}, **{h: "val" for h in meta.get("val_images", [])}}


def fit_priors(items: list[TrainItem], labels: tuple[str, ...], how: str = "median",
               base: PriorBoxes | None = None) -> PriorBoxes:
    """Prior boxes of ``labels`` fitted on the items' masks (``how``: "auto", "median" or "envelope", see
    :meth:`PriorBoxes.fit`), and boxes relative to an anchor (``priors.ANCHORS``) where both the label and its
    anchor are trained and the label's prompt is not an envelope (a tight box placed from the anchor is not the
    prompt a model trained on envelopes knows: JSRT split 1, right clavicle 0.67 from the anchor, 0.88 without).
    Only complete masks count (:meth:`TrainItem.complete`: a clavicle cut by the lung painted over it is not a
    clavicle's shape). A label with none keeps what ``base`` (the adapter training continues from) had.
    """
    priors = copy.deepcopy(base) if base is not None else PriorBoxes()
    full = {lab: [it.masks[lab] for it in items if it.complete(lab)] for lab in labels}
    fitted = tuple(lab for lab in labels if full[lab] or base is None)
    for lab in fitted:
        priors.fit(lab, full[lab], how=how)
    for lab in (lab for lab in fitted if lab in THICKNESS_CHECKED):  # in label order: priors.json is reproducible
        priors.fit_thickness(lab, full[lab])
    for lab in fitted:
        priors.fit_shape(lab, full[lab])
    for lab, anchor in ANCHORS.items():
        if lab in fitted and anchor in labels and priors.kind.get(lab) != "envelope":
            priors.fit_relative(lab, anchor, [(it.masks[lab], it.masks[anchor]) for it in items
                                              if it.complete(lab) and it.complete(anchor)])
    return priors


# epochs a time budget should hold: below this the trainer warns (JSRT k = 30, encoder LoRA: right clavicle test Dice
# 0.573 after 3 epochs on a slow host against 0.902 after 6 on a fast one, same split; docs/results.md)
BUDGET_EPOCHS_WANTED = 5


def auto_mode(device: torch.device) -> str:
    """The training mode ``auto`` picks: encoder LoRA where it is fast (CUDA, or a CPU with native bf16: ~45 s per
    epoch of 8 chest films on 2 Zen 5 cores), cached embeddings on other CPUs. With 30 films under the app's
    12-minute budget LoRA beat unbudgeted cached adapters on two splits each of JSRT and OAI (test Dice:
    clavicles 0.73 / 0.82 against 0.53 / 0.63, femur 0.95 against 0.83, tibia 0.93 against 0.73;
    docs/results.md)."""
    return "lora" if device.type == "cuda" or cpu_has_bf16() else "cached"


def resolved_mode(cfg: TrainConfig) -> str:
    """The training mode ``cfg`` gives on this machine (``auto`` resolved)."""
    from .backbones import resolve_device

    return cfg.mode if cfg.mode != "auto" else auto_mode(resolve_device(cfg.device))


def continue_problem(adapter_dir: str | Path, backbone: Backbone, text_encoder: TextEncoder,
                     cfg: TrainConfig) -> str | None:
    """Why a run with ``cfg`` cannot start from the adapter in ``adapter_dir`` (``TrainConfig.init_from``), or None
    when it can: the adapter must be complete and made for the same backbone and text encoder, with the same prompt
    head shape; one with encoder LoRA needs a lora-mode run with the same LoRA rank, alpha and target modules (an
    adapter without LoRA can start a lora-mode run: its new LoRA starts as the identity)."""
    from .adapters import AdapterError, compatibility_problem, load_adapter

    try:
        adapter = load_adapter(adapter_dir)
    except AdapterError as exc:
        return str(exc)
    meta = adapter.metadata
    problem = compatibility_problem(meta, backbone, text_encoder)
    if problem:
        return problem
    for key, value in (("n_tokens", cfg.n_tokens), ("head_hidden", cfg.head_hidden)):
        if meta.get(key) != value:
            return f"its {key} is {meta.get(key)!r}, this run's is {value!r}"
    if adapter.has_lora:
        if resolved_mode(cfg) != "lora":
            return "it has encoder LoRA and this run trains in cached mode (a frozen encoder)"
        try:
            lora = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
        except (OSError, ValueError) as exc:
            return f"unreadable adapter_config.json ({exc})"
        for key, value in (("r", cfg.lora_rank), ("lora_alpha", cfg.lora_alpha),
                           ("target_modules", cfg.lora_targets)):
            if lora.get(key) != value:
                return f"its LoRA {key} is {lora.get(key)!r}, this run's is {value!r}"
    return None


def cut_while_improving(run: dict) -> bool:
    """Whether a finished run (an adapter's ``metadata["training"]``, or the app's train stats) was ended by its time
    budget, not by early stopping or its epoch limit, after beating the weights it started from (best epoch > 0:
    epoch 0 is their validation Dice): the trainer still wanted epochs, so a run continued from its adapter
    (``init_from``) on the same films may gain more. The app's extra rounds and the benchmark's ask this."""
    return run.get("stopped") == "time budget" and bool(run.get("best_epoch"))


def _cpu_id() -> str:
    """The CPU as /proc/cpuinfo names it (model name, family, model number), or the platform's word for it."""
    import platform

    fields = cpuinfo()
    return " / ".join(fields.get(k, "") for k in ("model name", "cpu family", "model")) if fields else \
        platform.processor()


def lora_step_precision(encoder: torch.nn.Module, size: int, repeats: int = 2) -> dict:
    """Whether an encoder-LoRA training step (forward + backward, one ``size`` x ``size`` input) is faster in bf16
    autocast or in fp32 on this CPU: measured, not assumed from the instruction set. On a Zen 5 host bf16 took 0.6-1.1 s
    per LiteMedSAM input against ~3 s in fp32; on an Intel Xeon (family 6, model 207: AVX-512 BF16 without AMX) bf16
    took 1.52 s against 1.25 s in fp32 (docs/performance.md). Returns ``{"bf16": bool, "bf16_s", "fp32_s",
    "measured"}``; CPUs without native bf16 get fp32 unmeasured. The answer is kept per CPU, torch version, thread count
    and input size in ``default_cache_dir()/lora_precision.json``, so a machine measures once (~10 s on 2 cores).
    Torch's random state, the encoder's gradients and its BatchNorm statistics are left as they were."""
    if not cpu_has_bf16():
        return {"bf16": False, "measured": False, "reason": "no native bf16"}
    from .backbones import default_cache_dir

    key = f"{_cpu_id()} | torch {torch.__version__} | {torch.get_num_threads()} threads | {size} px"
    path = default_cache_dir() / "lora_precision.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(key), dict) and "bf16" in known[key]:
        return {**known[key], "measured": False, "reason": "measured before on this CPU"}
    x = torch.linspace(0, 1, 3 * size * size).reshape(1, 3, size, size)
    params = [p for p in encoder.parameters() if p.requires_grad]
    grads = [p.grad for p in params]
    times: dict[str, list[float]] = {"bf16": [], "fp32": []}
    was_training = encoder.training
    encoder.eval()  # as in training (BatchNorm statistics stay put)
    with torch.random.fork_rng(devices=[]):
        for r in range(repeats + 1):  # the first round warms both up
            for name in ("bf16", "fp32"):
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
                    out = encoder(x)
                out.float().square().mean().backward()
                if r:
                    times[name].append(time.perf_counter() - t0)
    encoder.train(was_training)
    for p, g in zip(params, grads):
        p.grad = g
    result = {"bf16": min(times["bf16"]) < min(times["fp32"]), "bf16_s": round(min(times["bf16"]), 3),
              "fp32_s": round(min(times["fp32"]), 3)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**known, key: result}, indent=1))
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("could not keep the LoRA precision measurement in %s: %s", path, exc)
    return {**result, "measured": True}


def cached_variants_for(n_films: int, n_labels: int = 1, target: int = 100) -> int:
    """Augmented copies per film in cached mode: the most (1 to 4) that keep the encodes, ``n_films`` x
    (1 + ``n_labels``) per copy, within ``target``."""
    return max(1, min(4, target // max(1, n_films * (1 + n_labels))))


def coarse_view(shape: tuple[int, int], backbone: Backbone) -> View:
    """The predictor's whole-film view (stretched for very elongated films)."""
    h, w = shape
    if max(h, w) / min(h, w) > 2.0:
        return View.full((h, w), backbone.input_size, stretch=True)
    return backbone.full_view((h, w))


def _jitter_box(box: np.ndarray, rng: np.random.Generator, lo: float, hi: float, shape) -> np.ndarray:
    """Move every side of ``box`` outwards by U(lo, hi) of its size (negative: inwards), clipped."""
    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = max(x1 - x0, 2.0), max(y1 - y0, 2.0)
    d = rng.uniform(lo, hi, size=4)
    H, W = shape
    out = np.array([x0 - d[0] * w, y0 - d[1] * h, x1 + d[2] * w, y1 + d[3] * h], dtype=np.float32)
    out[[0, 2]] = np.clip(out[[0, 2]], 0, W - 1)
    out[[1, 3]] = np.clip(out[[1, 3]], 0, H - 1)
    if out[2] - out[0] < 2 or out[3] - out[1] < 2:
        return np.asarray(box, dtype=np.float32)
    return out


def _shift_box(box: np.ndarray, rng: np.random.Generator, fraction: float, shape) -> np.ndarray:
    """``box`` moved by U(-fraction, fraction) of its width and height, kept inside the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    H, W = shape
    dx = float(np.clip(rng.uniform(-fraction, fraction) * (x1 - x0), -x0, W - 1 - x1))
    dy = float(np.clip(rng.uniform(-fraction, fraction) * (y1 - y0), -y0, H - 1 - y1))
    return np.array([x0 + dx, y0 + dy, x1 + dx, y1 + dy], dtype=np.float32)


def degrade_film(pixels: np.ndarray, box, rng: np.random.Generator, p: float) -> np.ndarray:
    """``pixels`` with the region ``box`` (x0, y0, x1, y1) blurred with probability ``p`` and given Gaussian
    noise with probability ``p`` (see ``TrainConfig.degrade``); the film itself is never changed (a copy, or
    ``pixels`` when neither is drawn). Draws four numbers from ``rng``, and a seed for the noise when it is
    drawn."""
    blur, noisy = rng.random() < p, rng.random() < p
    sigma = float(rng.uniform(0.5, max(0.5, 0.003 * max(pixels.shape))))
    amp = float(rng.uniform(0.005, 0.05))
    if not (blur or noisy):
        return pixels
    H, W = pixels.shape
    x0, y0, x1, y1 = (int(v) for v in box)
    pad = int(math.ceil(4 * sigma)) if blur else 0
    ya, yb, xa, xb = max(0, y0 - pad), min(H, y1 + pad), max(0, x0 - pad), min(W, x1 + pad)
    sub = np.asarray(pixels[ya:yb, xa:xb], dtype=np.float32)
    if blur:
        from scipy import ndimage

        sub = ndimage.gaussian_filter(sub, sigma)
    if noisy:
        lo, hi = np.percentile(sub[::4, ::4], (0.5, 99.5))
        gen = np.random.default_rng(int(rng.integers(2**31)))
        sub = sub + gen.standard_normal(sub.shape, dtype=np.float32) * np.float32(amp * max(hi - lo, 1e-6))
    out = np.array(pixels, dtype=np.float32, copy=True)
    out[ya:yb, xa:xb] = sub
    return out


def draw_example(item: TrainItem, label: str, kind: str, rng: np.random.Generator, priors: PriorBoxes,
                 backbone: Backbone, cfg: TrainConfig, res: int, train: bool = True,
                 region: np.ndarray | None = None, degrade_rng: np.random.Generator | None = None) -> Example:
    """One example as the predictor would see it, with random jitter when ``train``. ``kind``: "coarse" (the
    whole film, prior box), "mid" (the crop of ``region``, prior box) or "fine" (a crop around the true box).
    With ``degrade_rng`` (training, ``cfg.degrade`` > 0) the film is first blurred / noised (:func:`degrade_film`)
    from that generator: a film's coarse examples pass the same seed, so they keep sharing one input."""
    from .predictor import tile_boxes

    shape = item.image.shape
    mask = item.masks[label]
    if kind in ("coarse", "mid"):
        view = coarse_view(shape, backbone) if kind == "coarse" else \
            View.crop(shape, region, backbone.input_size, margin=cfg.crop_margin)
        box = priors.box(label, shape)
        if train:
            box = _jitter_box(box, rng, -0.08, 0.08, shape)
    else:
        gt = np.asarray(mask_box(mask), dtype=np.float32)
        box = _jitter_box(gt, rng, -0.05, 0.3, shape) if train else _jitter_box(gt, rng, 0.15, 0.15, shape)
        if train and cfg.fine_shift:
            box = _shift_box(box, rng, cfg.fine_shift, shape)
        tiles = tile_boxes(box, cfg.max_tile_aspect)
        box = tiles[int(rng.integers(len(tiles)))] if train else tiles[len(tiles) // 2]
        view = View.crop(shape, box, backbone.input_size, margin=cfg.crop_margin)
    pixels = item.image.pixels
    if train and degrade_rng is not None and cfg.degrade > 0:
        pixels = degrade_film(pixels, view.box, degrade_rng, cfg.degrade)
    x = view.model_input(pixels)[0]
    target = view.mask_to_model(mask.astype(np.float32), res)
    ignore = view.mask_to_model(item.unknown[label].astype(np.float32), res) if label in item.unknown else None
    return Example(label, kind, view.box_to_model(box), target, ignore=ignore, x=x)


def augment(ex: Example, rng: np.random.Generator, res: int) -> Example:
    """Laterality-safe augmentation in model space: rotation +-6 deg, scale +-6 %, shift +-4 %, contrast,
    brightness, gamma, noise. The prompt box follows the geometry. Never a horizontal flip."""
    x, target = ex.x.clone(), ex.target
    size = x.shape[-1]
    ang = math.radians(rng.uniform(-6, 6))
    s = rng.uniform(0.94, 1.06)
    tx, ty = rng.uniform(-0.04, 0.04, size=2)
    # affine_grid maps output coords -> input coords (normalised [-1, 1])
    a, b = math.cos(ang) / s, math.sin(ang) / s
    theta = torch.tensor([[a, -b, tx], [b, a, ty]], dtype=torch.float32)[None]
    grid = F.affine_grid(theta, (1, 1, size, size), align_corners=False)
    x = F.grid_sample(x[:1][None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    tgrid = F.affine_grid(theta, (1, 1, res, res), align_corners=False)
    target = F.grid_sample(target[None, None], tgrid, mode="bilinear", align_corners=False)[0, 0]
    ignore = None if ex.ignore is None else \
        F.grid_sample(ex.ignore[None, None], tgrid, mode="bilinear", align_corners=False)[0, 0]
    # box corners: input -> output coords is the inverse map
    inv = torch.linalg.inv(torch.cat([theta[0], torch.tensor([[0.0, 0.0, 1.0]])]))[:2]
    x0, y0, x1, y1 = (float(v) for v in ex.box)
    corners = torch.tensor([[x0, y0], [x1, y0], [x0, y1], [x1, y1]], dtype=torch.float32)
    norm = corners / size * 2 - 1
    out = (torch.cat([norm, torch.ones(4, 1)], 1) @ inv.T + 1) / 2 * size
    box = np.array([out[:, 0].min(), out[:, 1].min(), out[:, 0].max(), out[:, 1].max()], dtype=np.float32)
    box = np.clip(box, 0, size)
    # intensity
    x = x.clamp(0, 1) ** float(np.exp(rng.uniform(-0.25, 0.25)))
    x = (x - 0.5) * rng.uniform(0.85, 1.15) + 0.5 + rng.uniform(-0.08, 0.08)
    noise = torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32))
    x = x + float(rng.uniform(0, 0.03)) * noise
    lo, hi = x.amin(), x.amax()
    x = ((x - lo) / torch.clamp(hi - lo, min=1e-6)).expand(3, size, size).contiguous()
    return Example(ex.label, ex.kind, box, target, ignore=ignore, x=x, item=ex.item, share=ex.share)


# --- model ---------------------------------------------------------------------------------------------
def decode_batch(backbone: Backbone, emb: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor):
    """Logits (B, 1, R, R) and predicted IoU (B,) for B (embedding, prompt) pairs. LiteMedSAM's decoder takes
    pairs; segment_anything's repeats one embedding per prompt, so it is called once per pair."""
    if backbone.name == "litemedsam":
        return backbone.decode(emb, sparse, dense)
    outs = [backbone.decode(emb[i:i + 1], sparse[i:i + 1], dense[i:i + 1]) for i in range(emb.shape[0])]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def soft_dice(logits: torch.Tensor, target: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample Dice of the thresholded prediction (logit > 0) against target > 0.5, over ``known`` pixels."""
    p = (logits > 0).float().flatten(1)
    t = (target > 0.5).float().flatten(1)
    if known is not None:
        k = known.reshape(p.shape)
        p, t = p * k, t * k
    inter = (p * t).sum(1)
    denom = p.sum(1) + t.sum(1)
    return torch.where(denom > 0, 2 * inter / denom.clamp(min=1), torch.ones_like(denom))


def known_pixels(examples: list[Example], device) -> torch.Tensor | None:
    """(B, 1, R, R) float: 1 where the examples' targets are known, None when all are (the plain loss applies)."""
    if all(e.ignore is None for e in examples):
        return None
    return torch.stack([torch.ones_like(e.target) if e.ignore is None else (e.ignore < 0.5).float()
                        for e in examples]).to(device)[:, None]


class SegmentationLoss:
    """Dice + BCE on the decoder's logits (MONAI ``DiceCELoss``); with ``known`` pixels, unknown ones add nothing:
    MONAI's ``MaskedDiceLoss`` and BCE averaged over known pixels (the same value as DiceCELoss when all are)."""

    def __init__(self):
        from monai.losses import DiceCELoss, MaskedDiceLoss

        self.plain = DiceCELoss(sigmoid=True)
        self.masked = MaskedDiceLoss(sigmoid=True)

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
        if known is None:
            return self.plain(logits, target)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        return self.masked(logits, target, mask=known) + (bce * known).sum() / known.sum().clamp(min=1)


class Trainer:
    """Trains an adapter from labelled items. ``should_stop()`` is polled between steps (MONAI Label's stop)."""

    def __init__(self, backbone: Backbone, text_encoder: TextEncoder, labels: tuple[str, ...],
                 cfg: TrainConfig | None = None, progress: Callable[[dict], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, log_path: str | Path | None = None):
        from .backbones import resolve_device

        self.cfg = cfg or TrainConfig()
        self.device = resolve_device(self.cfg.device)
        self.mode = resolved_mode(self.cfg)
        if self.mode not in ("lora", "cached"):
            raise ValueError(f"unknown training mode {self.cfg.mode!r}; use auto, lora or cached")
        if self.cfg.fine_sampling not in ("uniform", "error"):
            raise ValueError(f"unknown fine_sampling {self.cfg.fine_sampling!r}; use uniform or error")
        # a private copy: the caller's backbone (serving predictions) is never modified
        self.backbone = copy.deepcopy(backbone).to(self.device)
        self.text_encoder = text_encoder
        self.labels = labels
        self.progress = progress or (lambda info: None)
        self.should_stop = should_stop or (lambda: False)
        self.log_path = Path(log_path) if log_path else None
        self.res = 256  # decoder output grid of both backbones
        self.encoder_peft = None
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        for p in self.backbone.mask_decoder.parameters():
            p.requires_grad_(True)
        # the new weights (head, LoRA) come from the seed alone, whatever the process drew before; the caller's
        # random stream is left as it was
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            self.head = PromptHead(text_encoder.dim, n_tokens=self.cfg.n_tokens,
                                   hidden=self.cfg.head_hidden).to(self.device)
            if self.mode == "lora":
                from .adapters import lora_encoder

                self.encoder_peft = lora_encoder(self.backbone.image_encoder, rank=self.cfg.lora_rank,
                                                 targets=self.cfg.lora_targets, alpha=self.cfg.lora_alpha)
                self.backbone.image_encoder = self.encoder_peft
        if self.cfg.init_from:
            self._continue_from(Path(self.cfg.init_from), text_encoder)
        # text inputs: every phrase of every label (training samples synonyms)
        self.phrases = {lab: label_phrases(lab) for lab in labels}
        all_phrases = [p for ps in self.phrases.values() for p in ps]
        self.phrase_emb = dict(zip(all_phrases, text_encoder.encode(all_phrases)))
        self.sides = {lab: side_code(lab.split("_")[0] if lab.split("_")[0] in ("left", "right") else None)
                      for lab in labels}
        # bf16 autocast: on CUDA, and for encoder LoRA on a CPU with native bf16 (AVX-512 BF16 / AMX) where a step
        # measures faster in it (lora_step_precision): on Zen 5 an encoder forward+backward took 0.6-1.1 s per 256 px
        # input against ~3 s in fp32, on an Intel Xeon (family 6, model 207) 1.52 s against 1.25 s. Cached mode keeps
        # fp32 on the CPU: its embeddings must match the fp32 serving encoder.
        self.precision_probe: dict = {}
        if self.cfg.amp and self.device.type == "cpu" and self.mode == "lora":
            self.precision_probe = lora_step_precision(self.backbone.image_encoder, self.backbone.input_size)
        self.amp = self.cfg.amp and (self.device.type == "cuda" or self.precision_probe.get("bf16", False))

    # --- examples ---
    def _examples(self, items: list[TrainItem], priors: PriorBoxes, rng: np.random.Generator, train: bool,
                  variants: int = 1, fine_weights: dict[str, float] | None = None) -> list[Example]:
        """Coarse examples of one image share one augmentation (same seed) and so one input and, in
        cached mode, one encode; so do its mid examples (``TrainConfig.mid_view``: labels with an envelope prompt,
        on one jittered crop of their region). Fine examples each get their own crop and augmentation: one per
        label and film, or with ``fine_weights`` (expected crops per film, see :func:`fine_weights`) that many on
        average, rounded at random from a generator of their own."""
        mid = priors.mid_labels(self.labels) if self.cfg.mid_view else []
        out = []
        for i, it in enumerate(items):
            for v in range(variants):
                coarse_seed = int(rng.integers(2**31))
                region = None
                if mid:  # from its own generator: without a mid view the main stream is as before
                    region = priors.mid_region(mid, it.image.shape)
                    if train:
                        region = _jitter_box(region, np.random.default_rng([coarse_seed, 1]), -0.05, 0.05,
                                             it.image.shape)
                draws = np.random.default_rng([coarse_seed, 3]) if fine_weights is not None else None
                # film degradation from generators of their own (the main stream is as without it): one seed for
                # the film's coarse / mid input, a stream for its fine crops
                fine_degrade = np.random.default_rng([coarse_seed, 5])
                for lab in it.labels:
                    if lab not in self.labels:
                        continue
                    n_fine = 1
                    if draws is not None:
                        w = fine_weights.get(lab, 1.0)
                        n_fine = int(w) + int(draws.random() < w - int(w))
                    for kind in ("mid" if lab in mid else "coarse",) + ("fine",) * n_fine:
                        degrade_rng = None
                        if train and self.cfg.degrade > 0:
                            degrade_rng = fine_degrade if kind == "fine" else \
                                np.random.default_rng([coarse_seed, 4, int(kind == "mid")])
                        ex = draw_example(it, lab, kind, rng, priors, self.backbone, self.cfg, self.res, train=train,
                                          region=region, degrade_rng=degrade_rng)
                        if train and self.cfg.augment:
                            shared = {"coarse": coarse_seed, "mid": [coarse_seed, 2]}.get(kind)
                            ex = augment(ex, rng if shared is None else np.random.default_rng(shared), self.res)
                        ex.item = i
                        if kind != "fine":
                            ex.share = (i, v, kind)
                        out.append(ex)
        return out

    @torch.inference_mode()  # the stored embeddings are only ever read (vs no_grad: within noise, benchmarks/inference.py)
    def _encode_all(self, examples: list[Example], what: str) -> None:
        t0 = time.perf_counter()
        bs = encode_batch_size(self.device)
        unique = share_groups(examples)  # one encode per distinct input
        for k in range(0, len(unique), bs):
            chunk = unique[k:k + bs]
            x = torch.stack([g[0].x for g in chunk]).to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                emb = self.backbone.encode(x)
            for g, v in zip(chunk, emb):
                v = v.to(torch.float16 if self.device.type == "cpu" else v.dtype).detach()
                for e in g:
                    e.emb, e.x = v, None
            self.progress({"phase": f"encoding {what}", "done": min(k + bs, len(unique)), "total": len(unique)})
            if self.should_stop():
                raise _Stop()
        logger.info("encoded %d %s inputs for %d examples in %.1f s", len(unique), what, len(examples),
                    time.perf_counter() - t0)

    def _text(self, examples: list[Example], rng: np.random.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        phrases = [self.phrases[e.label][int(rng.integers(len(self.phrases[e.label])))] if rng is not None
                   else self.phrases[e.label][0] for e in examples]
        emb = torch.stack([self.phrase_emb[p] for p in phrases]).to(self.device)
        sides = torch.stack([self.sides[e.label] for e in examples]).to(self.device)
        return emb, sides

    def _continue_from(self, path: Path, text_encoder: TextEncoder) -> None:
        """Start from the adapter at ``path``: its head, decoder and (if it has one) encoder LoRA weights."""
        from .adapters import load_adapter

        problem = continue_problem(path, self.backbone, text_encoder, replace(self.cfg, mode=self.mode))
        if problem:
            raise ValueError(f"cannot continue training from {path}: {problem}")
        adapter = load_adapter(path)
        self.head.load_state_dict(adapter.head_state)
        self.backbone.mask_decoder.load_state_dict(adapter.decoder_state)  # float16 on disk, copied into float32
        if adapter.has_lora:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            loaded = set_peft_model_state_dict(self.encoder_peft, load_file(str(path / "adapter_model.safetensors")))
            if getattr(loaded, "unexpected_keys", None):
                raise ValueError(f"cannot continue training from {path}: LoRA weights it does not fit "
                                 f"({loaded.unexpected_keys[:3]})")
        logger.info("continuing from adapter %s (%s)", path, "head, decoder and encoder LoRA" if adapter.has_lora
                    else "head and decoder; new encoder LoRA" if self.mode == "lora" else "head and decoder")

    def _forward(self, batch: list[Example], rng: np.random.Generator | None, box_jitter: float = 0.0):
        if batch[0].emb is not None:
            emb = torch.stack([e.emb for e in batch]).to(self.device, torch.float32)
        else:
            emb = self._encode_inputs(batch)
        boxes = np.stack([e.box for e in batch]).astype(np.float32)
        if box_jitter and rng is not None:
            wh = np.concatenate([boxes[:, 2:] - boxes[:, :2]] * 2, axis=1)
            boxes = np.clip(boxes + rng.normal(0, box_jitter, boxes.shape).astype(np.float32) * wh, 0,
                            self.backbone.input_size)
        text_emb, sides = self._text(batch, rng)
        tokens = self.head(text_emb, sides)
        sparse, dense = self.backbone.prompt_embeddings(len(batch), boxes=torch.from_numpy(boxes), tokens=tokens)
        logits, iou = decode_batch(self.backbone, emb, sparse, dense)
        return logits.float(), iou.float()

    def _backward(self, batch: list[Example], rng: np.random.Generator | None, loss_fn, box_jitter: float = 0.0,
                  pieces: list[list[Example]] | None = None) -> float:
        """Loss of one training batch, its gradients accumulated into the parameters; returns the loss. The loss
        (Dice + BCE + IoU MSE) is a mean over examples, so it is computed piece by piece (``pieces``, default
        ``_pieces(batch)``), each weighted by its share of the batch: the same gradients as in one piece."""
        total = 0.0
        for piece in pieces or self._pieces(batch):
            target = torch.stack([e.target for e in piece]).to(self.device)[:, None]
            known = known_pixels(piece, self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                logits, iou_pred = self._forward(piece, rng, box_jitter=box_jitter)
            loss = loss_fn(logits, target, known)
            with torch.no_grad():
                actual = soft_dice(logits, target[:, 0], known)  # Dice as the IoU-head target (same ordering)
            loss = (loss + 0.5 * F.mse_loss(iou_pred, actual)) * (len(piece) / len(batch))
            loss.backward()
            total += loss.item()
        return total

    def _pieces(self, batch: list[Example]) -> list[list[Example]]:
        """How a batch goes through forward and backward: whole, except in lora mode on the CPU, where each
        distinct input (a film's coarse examples share one) goes on its own. Every encode keeps its activations
        for the backward pass, ~0.8 GB per 256 px input in bf16 on the CPU: a batch of 8 inputs peaked at
        8.5 GB RSS (30 JSRT films); one at a time 3.7 GB, and epochs ~10 % faster. The CPU encodes one input
        per call anyway (``encode_batch_size``); on CUDA the batch stays whole."""
        if self.mode != "lora" or self.device.type == "cuda":
            return [batch]
        return share_groups(batch)

    def _encode_inputs(self, batch: list[Example]) -> torch.Tensor:
        """Embeddings (N, 256, 64, 64) of the batch's inputs through the (LoRA) encoder, with gradients: one
        encode per distinct input (a film's coarse examples share theirs), ``encode_batch_size`` at a time."""
        groups = share_groups(batch)
        bs = encode_batch_size(self.device)
        emb = torch.cat([self.backbone.encode(torch.stack([g[0].x for g in groups[k:k + bs]]).to(self.device))
                         for k in range(0, len(groups), bs)])
        slot = {id(e): i for i, g in enumerate(groups) for e in g}
        return emb[torch.as_tensor([slot[id(e)] for e in batch], device=emb.device)]

    def _batches(self, examples: list[Example], rng: np.random.Generator) -> list[list[Example]]:
        """Shuffled training batches of ``batch_size`` examples. With cached embeddings any order costs the same;
        when every step encodes (lora mode) a film's coarse examples go in one batch, so they take one encode
        (JSRT: 6 encodes per film and epoch instead of 10)."""
        bs = self.cfg.batch_size
        if examples and examples[0].emb is not None:
            order = rng.permutation(len(examples))
            return [[examples[i] for i in order[k:k + bs]] for k in range(0, len(order), bs)]
        groups = share_groups(examples)
        batches, current = [], []
        for i in rng.permutation(len(groups)):
            if current and len(current) + len(groups[i]) > bs:
                batches.append(current)
                current = []
            current = current + groups[i]
        return batches + ([current] if current else [])

    def _state(self) -> dict:
        state = {"head": copy.deepcopy(self.head.state_dict()),
                 "decoder": copy.deepcopy(self.backbone.mask_decoder.state_dict())}
        if self.encoder_peft is not None:
            from peft import get_peft_model_state_dict

            state["lora"] = copy.deepcopy(get_peft_model_state_dict(self.encoder_peft))
        return state

    def _load_state(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.backbone.mask_decoder.load_state_dict(state["decoder"])
        if "lora" in state:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.encoder_peft, state["lora"])

    @torch.no_grad()
    def _validate(self, val: list[Example]) -> dict[str, float]:
        self.head.eval()
        self.backbone.eval()
        scores: dict[str, list[float]] = {}
        bs = self.cfg.batch_size
        for k in range(0, len(val), bs):
            batch = val[k:k + bs]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                logits, _ = self._forward(batch, None)
            d = soft_dice(logits, torch.stack([e.target for e in batch]).to(self.device),
                          known_pixels(batch, self.device))
            for e, v in zip(batch, d.tolist()):
                scores.setdefault(e.label, []).append(v)
        return {lab: float(np.mean(v)) for lab, v in sorted(scores.items())}

    # --- the loop ---
    def fit(self, train_items: list[TrainItem], val_items: list[TrainItem], priors: PriorBoxes) -> TrainResult:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        t_start = time.perf_counter()

        def over_budget() -> bool:
            return bool(cfg.time_budget_s) and time.perf_counter() - t_start > cfg.time_budget_s

        logger.info("training mode=%s device=%s bf16=%s train images=%d val images=%d labels=%s", self.mode,
                    self.device, self.amp, len(train_items), len(val_items), ",".join(self.labels))
        if self.precision_probe:
            logger.info("LoRA step precision on this CPU: %s", self.precision_probe)
        self._log({"event": "start", "mode": self.mode, "device": str(self.device), "bf16": self.amp,
                   "precision_probe": self.precision_probe,
                   "train_images": len(train_items),
                   "val_images": len(val_items), "config": asdict(cfg)})
        result = TrainResult(self.mode, 0, 0, -1.0)
        best, best_state = -1.0, None
        try:
            val = self._examples(val_items, priors, np.random.default_rng(cfg.seed + 1), train=False)
            cached_train = None
            if self.mode == "cached":
                variants = cfg.cached_variants or cached_variants_for(len(train_items), len(self.labels),
                                                                      cfg.cached_encodes)
                logger.info("cached mode: %d augmented cop%s of each of %d training films", variants,
                            "y" if variants == 1 else "ies", len(train_items))
                self._log({"event": "cached", "variants": variants, "films": len(train_items)})
                cached_train = self._examples(train_items, priors, rng, train=True, variants=variants)
                self._encode_all(cached_train, "training")
                self._encode_all(val, "validation")
            else:
                for e in val:
                    e.x = e.x.to(self.device)
            params = [{"params": self.head.parameters(), "lr": cfg.lr_head},
                      {"params": self.backbone.mask_decoder.parameters(), "lr": cfg.lr_decoder}]
            if self.encoder_peft is not None:
                params.append({"params": [p for p in self.encoder_peft.parameters() if p.requires_grad],
                               "lr": cfg.lr_lora})
            opt = torch.optim.AdamW(params, weight_decay=cfg.weight_decay)
            n_train = len(cached_train) if cached_train is not None else \
                sum(2 * len([lab for lab in it.labels if lab in self.labels]) for it in train_items)
            steps_per_epoch = max(1, math.ceil(n_train / cfg.batch_size))
            total = steps_per_epoch * cfg.epochs
            # the cosine spans the planned epochs even when a time budget will stop the run sooner: fitting it to
            # the budget (the rate down by the budget's end) cost JSRT split 1 k=30 LoRA its clavicles, 0.543 / 0.643
            # against 0.676 / 0.746 (docs/results.md); with 5-12 epochs in the budget the model is still learning
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps)
                                                      * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
            loss_fn = SegmentationLoss()
            best, best_state, stale = -1.0, self._state(), 0
            if val:
                base = self._validate(val)
                best = float(np.mean(list(base.values())))
                logger.info("epoch 0 (%s): val Dice %.4f",
                            f"weights of {Path(cfg.init_from).name}" if cfg.init_from else "untrained head", best)
            t_loop = time.perf_counter()
            for epoch in range(1, cfg.epochs + 1):
                t_ep = time.perf_counter()
                self.head.train()
                self.backbone.mask_decoder.train()
                # the encoder stays in eval mode, LoRA or not: TinyViT's 27 BatchNorm layers would otherwise replace
                # their running statistics with those of 1-16 crops per step (LoRA in train mode on JSRT: validation
                # lungs 0.97 -> 0.70); LoRA dropout is 0
                self.backbone.image_encoder.eval()
                weights = None  # cached mode trains on its fixed examples
                if cfg.fine_sampling == "error" and cached_train is None and result.history \
                        and result.history[-1]["val_dice"]:
                    weights = fine_weights(result.history[-1]["val_dice"], cfg.fine_floor)
                examples = cached_train if cached_train is not None else \
                    self._examples(train_items, priors, rng, train=True, fine_weights=weights)
                losses = []
                batches = self._batches(examples, rng)
                for batch in batches:
                    opt.zero_grad(set_to_none=True)
                    loss = self._backward(batch, rng, loss_fn, box_jitter=0.03 if cached_train else 0.0)
                    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
                    opt.step()
                    sched.step()
                    losses.append(loss)
                    if over_budget():
                        break  # the rest of this epoch is skipped; it is still validated below
                    if self.should_stop():
                        raise _Stop()
                val_dice = self._validate(val) if val else {}
                mean = float(np.mean(list(val_dice.values()))) if val_dice else -float(np.mean(losses))
                improved = mean > best
                if improved:
                    best, best_state, stale = mean, self._state(), 0
                    result.best_epoch = epoch
                else:
                    stale += 1
                row = {"event": "epoch", "epoch": epoch, "total_epochs": cfg.epochs, "loss": float(np.mean(losses)),
                       "steps": len(losses),
                       "val_dice": val_dice, "val_dice_mean": mean, "best": best, "seconds": time.perf_counter() - t_ep,
                       "mode": self.mode}
                if weights is not None:
                    row["fine_weights"] = {k: round(v, 3) for k, v in weights.items()}
                result.history.append(row)
                result.epochs_run = epoch
                self._log(row)
                self.progress(row)
                logger.info("epoch %d/%d loss %.4f val Dice %.4f%s (%.1f s)", epoch, cfg.epochs, row["loss"], mean,
                            " *" if improved else "", row["seconds"])
                if epoch == 1:
                    self._check_budget(t_loop - t_start, row["seconds"] * len(batches) / max(1, len(losses)))
                if val and stale >= cfg.patience:
                    result.stopped = "early stop"
                    break
                if over_budget():
                    result.stopped = "time budget"
                    break
            else:
                result.stopped = "epochs"
        except _Stop:
            result.stopped = "stop requested"
            best_state = None
        if best_state is not None:
            self._load_state(best_state)
            self.head.trained.fill_(True)
        result.best_val_dice = best
        result.seconds = time.perf_counter() - t_start
        self._log({"event": "end", "stopped": result.stopped, "best_epoch": result.best_epoch,
                   "best_val_dice_proxy": best, "seconds": result.seconds})
        return result

    def _check_budget(self, setup_s: float, epoch_s: float) -> None:
        """After the first epoch: how many epochs the time budget holds on this machine. Fewer than
        ``BUDGET_EPOCHS_WANTED`` gives a warning in the log, the JSON log and the progress callback (the app's train
        stats), naming the setting to raise."""
        cfg = self.cfg
        if not cfg.time_budget_s or cfg.epochs <= 1:
            return
        fits = int(max(0.0, cfg.time_budget_s - setup_s) // max(epoch_s, 1e-6))
        if fits >= min(BUDGET_EPOCHS_WANTED, cfg.epochs):
            return
        msg = (f"the time budget ({cfg.time_budget_s / 60:.1f} min) holds about {fits} epoch(s) of {epoch_s:.0f} s on "
               f"this machine, {BUDGET_EPOCHS_WANTED} or more are wanted (on JSRT the clavicles still gained from "
               f"epoch 3 to 6): raise the budget (app: --conf train_time_budget_min, CLI: --time-budget) for a "
               f"better adapter")
        logger.warning(msg)
        info = {"event": "budget", "epoch_seconds": round(epoch_s, 1), "setup_seconds": round(setup_s, 1),
                "epochs_in_budget": fits, "budget_seconds": cfg.time_budget_s, "warning": msg}
        self._log(info)
        self.progress(info)

    def _log(self, row: dict) -> None:
        if self.log_path is None:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as f:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **row}) + "\n")


def fine_weights(val_dice: dict[str, float], floor: float) -> dict[str, float]:
    """Expected fine crops per film and epoch for each label (``TrainConfig.fine_sampling`` "error"): ``floor`` of
    one crop for every label, the rest shared in proportion to its validation error (1 - Dice). They sum to the
    number of labels, so an epoch costs what a uniform one does; equal errors give one crop each."""
    err = {lab: max(0.0, 1.0 - float(d)) for lab, d in val_dice.items()}
    n, total = len(err), sum(err.values())
    if not n or total <= 0:
        return {lab: 1.0 for lab in err}
    return {lab: floor + (1.0 - floor) * n * e / total for lab, e in err.items()}


def share_groups(examples: list[Example]) -> list[list[Example]]:
    """Examples grouped by input, in order of first appearance: a film's coarse examples share one
    (``Example.share``), every other example has its own."""
    groups: dict = {}
    for n, e in enumerate(examples):
        groups.setdefault(e.share if e.share is not None else ("own", n), []).append(e)
    return list(groups.values())


class _Stop(Exception):
    pass


class TrainingStopped(RuntimeError):
    """Raised by :func:`train_adapter` when a stop was requested: nothing was written or promoted."""


# --- one call: items -> validated adapter directory ----------------------------------------------------
def train_adapter(items: list[TrainItem], out_dir: str | Path, *, backbone: Backbone, text_encoder: TextEncoder,
                  labels: tuple[str, ...], cfg: TrainConfig | None = None, val_items: list[TrainItem] | None = None,
                  progress: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] | None = None,
                  log_path: str | Path | None = None, extra_metadata: dict | None = None) -> dict:
    """Split, train, validate with the real predictor pipeline (text prompts, coarse-to-fine, image space)
    and write the adapter atomically to ``out_dir``. Returns the metadata written."""
    from .adapters import round_stored_, save_adapter

    cfg = cfg or TrainConfig()
    items = [it.on_field() for it in items]
    val_items = None if val_items is None else [it.on_field() for it in val_items]
    if val_items is None:
        keep = earlier_split(cfg.init_from) if cfg.init_from else None
        train_items, val_items = split_items(items, cfg.val_fraction, cfg.seed, cfg.min_val_images, keep=keep)
    else:
        train_items = items
    if not train_items:
        raise ValueError("no labelled training images")
    labels = tuple(lab for lab in labels if any(lab in it.labels for it in train_items))
    if not labels:
        raise ValueError("the training images carry none of the requested labels")
    base = PriorBoxes.load(Path(cfg.init_from) / "priors.json") if cfg.init_from else None
    priors = fit_priors(train_items, labels, cfg.coarse_prior, base=base)
    trainer = Trainer(backbone, text_encoder, labels, cfg, progress=progress, should_stop=should_stop,
                      log_path=log_path)
    result = trainer.fit(train_items, val_items, priors)
    if result.stopped == "stop requested":
        raise TrainingStopped("training stopped on request; nothing was saved")
    round_stored_(trainer.head, trainer.backbone.mask_decoder)

    out_dir = Path(out_dir)
    staging = out_dir.parent / f".{out_dir.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    metadata = {
        "backbone": backbone.name,
        "backbone_checkpoint": os.path.basename(backbone.checkpoint or "random"),
        "text_encoder": text_encoder.name,
        "text_dim": text_encoder.dim,
        "n_tokens": cfg.n_tokens,
        "head_hidden": cfg.head_hidden,
        "labels": list(labels),
        "mode": trainer.mode,
        "device": str(trainer.device),
        "train_images": sorted(it.hash for it in train_items),
        "train_names": sorted(it.name for it in train_items),
        "val_images": sorted(it.hash for it in val_items),
        "val_names": sorted(it.name for it in val_items),
        "overlaps": overlap_pairs(it.masks for it in train_items if not it.unknown),
        "training": {"epochs_run": result.epochs_run, "best_epoch": result.best_epoch, "stopped": result.stopped,
                     "seconds": round(result.seconds, 1), "proxy_val_dice": result.best_val_dice,
                     "config": asdict(cfg)},
        **({"continued_from": Path(cfg.init_from).name} if cfg.init_from else {}),
        **(extra_metadata or {}),
    }
    save_adapter(staging, head=trainer.head, decoder=trainer.backbone.mask_decoder,
                 encoder_peft=trainer.encoder_peft, priors=priors.to_json(), metadata=metadata)
    return _validate_and_publish(staging, out_dir, val_items, backbone, text_encoder, labels, cfg, progress,
                                 train_items)


def film_region_items(items: list[TrainItem], per_region: int = FILM_REGION_MAX_FILMS,
                      min_films: int = FILM_REGION_MIN_FILMS) -> list[TrainItem]:
    """The training films whose whole-film embeddings :meth:`PriorBoxes.fit_film_regions` averages: up to
    ``per_region`` films (by content hash, so reproducible) of each body region with at least ``min_films``; none
    unless two regions have that many (one region has nothing to be told apart from, and costs no encode)."""
    from .vocabulary import BODY_REGIONS

    by_region: dict[str, list[TrainItem]] = {}
    for it in sorted(items, key=lambda it: it.hash):
        regions = {r for r, members in BODY_REGIONS.items() for lab in it.labels if lab in members}
        if len(regions) == 1:
            by_region.setdefault(regions.pop(), []).append(it)
    kept = [v[:per_region] for v in by_region.values() if len(v) >= min_films]
    return [it for v in kept for it in v] if len(kept) >= 2 else []


def fit_film_regions(predictor, items: list[TrainItem], priors: PriorBoxes) -> dict[str, int]:
    """Fit ``priors``' body-region statistics (:meth:`PriorBoxes.fit_film_regions`) on the whole-film embeddings
    ``predictor`` (its adapter loaded) computes for :func:`film_region_items` of ``items``."""
    films = []
    for it in film_region_items(items):
        predictor.set_image(it.image)
        films.append((it.labels, predictor.film_vector()))
    return priors.fit_film_regions(films)


def _validate_and_publish(staging: Path, out_dir: Path, val_items: list[TrainItem], backbone: Backbone,
                          text_encoder: TextEncoder, labels: tuple[str, ...], cfg: TrainConfig,
                          progress: Callable[[dict], None] | None,
                          train_items: list[TrainItem] | None = None) -> dict:
    """Validate the adapter in ``staging`` through the serving path (choosing each label's serving settings),
    fit the body-region check on ``train_items`` with it (:func:`fit_film_regions`), record both and rename it to
    ``out_dir``; on any failure ``staging`` is removed."""
    from .predictor import Predictor

    try:
        validation, serving = {"dice": {}, "n_images": len(val_items)}, {}
        region_items = film_region_items(train_items or [])
        if val_items or region_items:
            predictor = Predictor(backbone, labels=labels, cache_size=len(labels) + 2, crop_margin=cfg.crop_margin,
                                  max_tile_aspect=cfg.max_tile_aspect, text_encoder=text_encoder)
            predictor.load_adapter(staging)
            if val_items:
                validation, serving = choose_coarse_grow(predictor, val_items, labels, tuple(cfg.grow_candidates),
                                                         cfg.grow_margin, progress=progress)
            if region_items:
                if progress:
                    progress({"phase": "film regions", "done": 0, "total": len(region_items)})
                priors = PriorBoxes.load(staging / "priors.json")
                fit_film_regions(predictor, region_items, priors)
                priors.save(staging / "priors.json")
            predictor.unload_adapter()
        meta = json.loads((staging / "metadata.json").read_text())
        meta["validation"] = validation
        meta["serving"] = serving
        meta["version"] = out_dir.name
        (staging / "metadata.json").write_text(json.dumps(meta, indent=2))
        if out_dir.exists():
            raise FileExistsError(f"adapter directory already exists: {out_dir}")
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return meta


def retune_adapter(src: str | Path, out_dir: str | Path, data_dir: str | Path, *, backbone: Backbone,
                   text_encoder: TextEncoder, progress: Callable[[dict], None] | None = None) -> dict:
    """A copy of the adapter ``src`` with priors refitted on its own training films and serving settings chosen
    again on its own validation films (both found by name in ``data_dir``), weights unchanged: how an adapter
    trained before a serving option existed gets it without training again. Returns the new metadata."""
    src, out_dir = Path(src), Path(out_dir)
    if out_dir.exists():  # checked again at the rename; here it saves the validation
        raise FileExistsError(f"adapter directory already exists: {out_dir}")
    meta = json.loads((src / "metadata.json").read_text())
    labels = tuple(meta["labels"])
    cfg_fields = {k: v for k, v in meta.get("training", {}).get("config", {}).items()
                  if k in TrainConfig.__dataclass_fields__}
    cfg_fields.setdefault("coarse_prior", "median")  # adapters from before the option were trained on median boxes
    cfg = TrainConfig(**cfg_fields)
    train_items = [it.on_field() for it in load_folder(data_dir, labels, names=meta["train_names"])]
    val_items = [it.on_field() for it in load_folder(data_dir, labels, names=meta["val_names"])]
    for kind, items, hashes in (("training", train_items, meta["train_images"]),
                                ("validation", val_items, meta["val_images"])):
        if sorted(it.hash for it in items) != sorted(hashes):
            raise ValueError(f"the {kind} films of {src} named in its metadata are not the same images in {data_dir}")
    staging = out_dir.parent / f".{out_dir.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(src, staging)
    fit_priors(train_items, labels, cfg.coarse_prior).save(staging / "priors.json")
    return _validate_and_publish(staging, out_dir, val_items, backbone, text_encoder, labels, cfg, progress,
                                 train_items)


def validate(predictor, items: list[TrainItem], labels: tuple[str, ...] | None = None) -> dict:
    """Image-space Dice per label of ``predictor`` (text prompts as a user types them) on ``items``."""
    return _summary(_dice_per_grow(predictor, items, labels, [None])[None], len(items))


def choose_coarse_grow(predictor, items: list[TrainItem], labels: tuple[str, ...], candidates: tuple[float, ...],
                       margin: float = 0.01, progress: Callable[[dict], None] | None = None) -> tuple[dict, dict]:
    """Validate ``predictor`` on ``items`` once per serving setting and choose each label's: the growth of the coarse
    box (``candidates``) and, for labels with a relative prior (``predictor.priors.relative``, a clavicle from the
    lung on its side), where the coarse prompt box comes from: the film-frame prior ("film") or the anchor's coarse
    mask ("anchor"). Each film's whole-film embedding is encoded once. The choice is the best mean Dice; the first
    candidate with the film prior unless another setting beats it by ``margin``. Returns (validation with the chosen
    settings, as :func:`validate` gives it; the ``serving`` metadata: ``coarse_grow`` {label: growth},
    ``coarse_prompt`` {label: "film" | "anchor"}, ``coarse_grow_val_dice`` {label: {growth: Dice}} with the film
    prior and, for anchored labels, ``coarse_prompt_val_dice`` {label: {"anchor": {growth: Dice}}})."""
    if not candidates:
        return validate(predictor, items, labels), {}
    anchored = tuple(lab for lab in labels if lab in predictor.priors.relative)
    settings = [("film", g) for g in candidates] + [("anchor", g) for g in candidates if anchored]
    per = _dice_per_grow(predictor, items, labels, settings, progress, anchored=anchored)
    chosen, prompt, table, anchor_table = {}, {}, {}, {}
    for lab in sorted({lab for st in settings for lab in per[st]}):
        means = {st: float(np.mean(per[st][lab])) for st in settings if lab in per[st]}
        default = settings[0]
        best = max(means, key=lambda st: means[st])
        pick = best if means[best] >= means[default] + margin else default
        prompt[lab], chosen[lab] = pick
        table[lab] = {str(g): round(m, 4) for (kind, g), m in means.items() if kind == "film"}
        if lab in anchored:
            anchor_table[lab] = {"anchor": {str(g): round(m, 4) for (kind, g), m in means.items() if kind == "anchor"}}
    validation = _summary({lab: per[(prompt[lab], g)][lab] for lab, g in chosen.items()}, len(items))
    serving = {"coarse_grow": chosen, "coarse_prompt": prompt, "coarse_grow_val_dice": table}
    if anchor_table:
        serving["coarse_prompt_val_dice"] = anchor_table
    return validation, serving


def _dice_per_grow(predictor, items: list[TrainItem], labels: tuple[str, ...] | None, settings: list,
                   progress: Callable[[dict], None] | None = None, anchored: tuple[str, ...] = ()) -> dict:
    """{setting: {label: [Dice per film]}} for settings ("film" | "anchor", growth); None = the predictor's own
    settings. "anchor" settings run only the ``anchored`` labels."""
    from .metrics import dice

    per: dict = {st: {} for st in settings}
    saved = dict(predictor.label_grow), dict(predictor.label_prompt)
    try:
        for i, it in enumerate(items):
            labs = [lab for lab in it.labels if labels is None or lab in labels]
            if labs:
                predictor.set_image(it.image)
                for st in settings:
                    run = labs
                    if st is not None:
                        kind, g = st
                        run = [lab for lab in labs if kind == "film" or lab in anchored]
                        if not run:
                            continue
                        predictor.label_grow = {lab: float(g) for lab in run}
                        predictor.label_prompt = {lab: kind for lab in run}
                    for r in predictor.predict(run).results:
                        per[st].setdefault(r.label, []).append(dice(r.mask, it.masks[r.label],
                                                                    ignore=it.unknown.get(r.label)))
            if progress:
                progress({"phase": "validation", "done": i + 1, "total": len(items)})
    finally:
        predictor.label_grow, predictor.label_prompt = saved
    return per


def _summary(per: dict[str, list[float]], n_images: int) -> dict:
    d = {lab: float(np.mean(v)) for lab, v in sorted(per.items())}
    return {"dice": d, "dice_mean": float(np.mean(list(d.values()))) if d else 0.0, "n_images": n_images,
            "per_image": {lab: [round(x, 4) for x in v] for lab, v in per.items()}}


def _print_progress(info: dict) -> None:
    if info.get("event") == "epoch":
        vd = " ".join(f"{k}={v:.3f}" for k, v in info["val_dice"].items())
        print(f"epoch {info['epoch']}/{info['total_epochs']} loss={info['loss']:.4f} val[{vd}] "
              f"({info['seconds']:.1f} s, {info['mode']})", file=sys.stderr, flush=True)
    elif "phase" in info and (info["done"] == info["total"] or info["done"] % 40 == 0):
        print(f"{info['phase']}: {info['done']}/{info['total']}", file=sys.stderr, flush=True)
