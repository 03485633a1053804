"""The user-facing predictor: ``set_image`` once, then ``predict`` any number of text prompts.

Zero-shot path (no adapter yet), per label, coarse to fine:

1. *coarse*: the label's prior box (or a box the user drew) prompts the decoder on the
   embedding of the whole film;
2. *fine*: the box of the coarse mask's largest component, grown by a margin, is cropped,
   stretched to the model's square and encoded on its own; the decoder is prompted with the
   coarse box in that crop. At 256 px a whole film leaves a femur or clavicle a few pixels wide;
   the crop gives it the full input.

With an adapter, a label it places from an anchor (a clavicle from the lung on its side, ``priors.ANCHORS``) takes
its coarse prompt box from the anchor's coarse mask where the adapter's validation chose that; where it chose the
film prior, the coarse mask is checked against the anchor-placed box and prompted again from it when the two do
not overlap (``checked_against``). A coarse mask whose box covers under ``SMALL_COARSE_AREA`` of its prompt box's
area found a piece of its structure: its fine crop also holds the prompt box.

A film lying askew on a larger canvas (scanned or exported turned) is segmented turned upright, and a film with wide
flat borders on its exposed field (``transforms.film_field``); the masks come back in the whole film's pixels.

Every embedding (whole film or crop) is cached by (pixels, backbone weights, adapter version,
precision, view), so further prompts on the same image only pay for decoding.

Speed (see ``docs/performance.md`` and ``benchmarks/inference.py``): all prompts of a request share
one coarse decoder pass; the fine pass encodes the crops that are not cached in batches
(``encode_batch``) and decodes all crops of all labels in one decoder call (``batch_fine``; LiteMedSAM's
decoder takes (embedding, prompt) pairs, segment_anything's ViT-B decoder one image at a time).
``precision`` "bf16" / "tf32" trade exactness for GPU speed and are off by default.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .backbones import Backbone, Interrupted, encode_batch_size, interruptible
from .cache import LRU, EmbeddingCache
from .io import Radiograph, field_radiograph, inverted_radiograph, load_radiograph, radiograph_from_array
from .priors import ANCHOR_CHECK_IOU, NEGATIVE_CHECK_Z, NEGATIVE_NEAR_Z, PriorBoxes, box_iou, union_box
from .transforms import Field, View, film_field, largest_component, mask_box
from .vocabulary import ALL_LABELS, ParsedLabel, parse_prompt

# An adapter's fine pass is trained on crops around the true box grown by U(-0.05, 0.3) per side
# (``train.draw_example``), so a box drawn tight round the structure sits at the edge of what it saw: a user box
# is grown by 0.1 per side before its fine pass. Measured on the test films of 2 JSRT adapters (docs/results.md,
# "A user box is grown before the adapter's fine pass"): clavicles from a tight box 0.871/0.899 -> 0.902/0.905,
# from a box whose sides are off by up to 10 % either way 0.836/0.849 -> 0.887/0.865.
ADAPTER_USER_BOX_GROW = 0.1

# A coarse mask whose box covers less than this fraction of its prompt box's area (a film-frame prior or an
# anchor-placed box: where the structure usually is and how large) has found only a piece of it; its fine box is the
# union of its grown box and the prompt box, so the fine pass sees the whole structure. On the 20 unseen films of the
# starter (70 masks) exactly one coarse mask fell under 0.5 (0.13, JPCNN029's steep right clavicle, fine Dice 0.29 ->
# 0.79), every other at 0.5 or more; the value is a round quarter, not tuned (docs/results.md, 2026-12-04, fourth
# session).
SMALL_COARSE_AREA = 0.25

PRECISIONS = ("fp32", "tf32", "bf16")


@dataclass
class LabelResult:
    label: str
    mask: np.ndarray  # bool (H, W)
    score: float  # decoder's predicted IoU of the final mask
    box: list[float]  # the box that prompted the final decode, image pixels [x0, y0, x1, y1]
    prompt_source: str  # "prior" | "user_box" | "text"
    warning: str | None = None  # why the mask may be wrong (``PriorBoxes.check``), else None


@dataclass
class Prediction:
    results: list[LabelResult]
    mode: str  # "zero-shot" | "adapter"
    image_shape: tuple[int, int]
    timings_ms: dict[str, float] = field(default_factory=dict)
    cache: dict[str, int] = field(default_factory=dict)
    # how the film was read, when not as given (``Predictor.film_notes``): field, turned_degrees, turned_for, negative
    film: dict = field(default_factory=dict)

    @property
    def warnings(self) -> dict[str, str]:
        """{label: why its mask may be wrong} for the labels that have a warning."""
        return {r.label: r.warning for r in self.results if r.warning}

    @property
    def labels(self) -> list[str]:
        return [r.label for r in self.results]

    def mask(self, label: str) -> np.ndarray:
        for r in self.results:
            if r.label == label:
                return r.mask
        raise KeyError(label)

    def label_map(self) -> np.ndarray:
        """uint8 (H, W): 0 background, i+1 for the i-th result (see :meth:`label_map_with_values`)."""
        return self.label_map_with_values({r.label: i + 1 for i, r in enumerate(self.results)})

    def label_map_with_values(self, values: dict[str, int]) -> np.ndarray:
        """uint8 (H, W) with ``values[label]`` inside each mask. Larger masks are painted first, so a small
        structure lying over a large one (a clavicle over a lung) stays visible."""
        out = np.zeros(self.image_shape, dtype=np.uint8)
        for r in sorted(self.results, key=lambda r: -int(r.mask.sum())):
            out[r.mask] = values[r.label]
        return out


class Predictor:
    """Holds the backbone, prior boxes and embedding cache; thread-safe (one predict at a time)."""

    def __init__(self, backbone: Backbone, priors: PriorBoxes | None = None, cache_size: int = 32,
                 labels: tuple[str, ...] = ALL_LABELS, refine: bool = True, crop_margin: float = 0.15,
                 max_tile_aspect: float = 2.0, coarse_grow: float = 0.15, text_encoder=None,
                 text_encoder_path: str | None = None, batch_fine: bool = True, encode_batch: int | None = None,
                 precision: str = "fp32", result_cache: int = 64, anchor_check: float = ANCHOR_CHECK_IOU,
                 negative_check: bool = True, small_coarse: float = SMALL_COARSE_AREA):
        """``result_cache``: final masks kept (bit-packed, per image x label x weights x box; 0 turns it off).
        ``anchor_check``: a label prompted from its film-frame prior whose adapter also places it from an anchor
        is prompted again from the anchor when its coarse mask's box overlaps the anchor-placed box by less than
        this IoU (``priors.ANCHOR_CHECK_IOU``; 0 turns the check off; see ``checked_against``).
        ``small_coarse``: with an adapter, a coarse mask whose box covers less than this fraction of its prompt
        box's area found only a piece of the structure: its fine box also holds the prompt box
        (``SMALL_COARSE_AREA``; 0 turns it off).
        ``negative_check``: a film far from every body region's training films whose inverted copy is near one is
        read inverted (a negative PNG; ``priors.NEGATIVE_CHECK_Z``; needs an adapter with region statistics).
        ``batch_fine``: encode the fine crops of a request in batches and decode them in one pass (False:
        one crop at a time, the original loop). ``encode_batch``: crops per encoder call (default:
        ``backbones.encode_batch_size``, 16 on CUDA and 1 on the CPU).
        ``precision``: "fp32" (default, exact), "tf32" (TF32 matmuls/convolutions, CUDA) or "bf16"
        (bfloat16 autocast of encoder and decoder, CUDA)."""
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
        if precision != "fp32" and backbone.device.type != "cuda":
            raise ValueError(f"precision {precision!r} needs a CUDA device (this predictor runs on "
                             f"{backbone.device}); use fp32")
        if precision == "tf32":  # process-wide switches: they are how PyTorch exposes TF32
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.precision = precision
        self.batch_fine = batch_fine
        if encode_batch is None:
            encode_batch = encode_batch_size(backbone.device)
        self.encode_batch = max(1, int(encode_batch))
        self.backbone = backbone
        self.priors = priors or PriorBoxes()
        self.cache = EmbeddingCache(cache_size)
        self.results = ResultCache(result_cache)
        self.labels = labels
        self.refine = refine
        self.crop_margin = crop_margin
        self.max_tile_aspect = max_tile_aspect
        self.coarse_grow = coarse_grow  # fine box = coarse mask's box grown by this fraction per side ...
        self.label_grow: dict[str, float] = {}  # ... or by the adapter's per-label choice (see grow_for)
        self.label_prompt: dict[str, str] = {}  # "anchor": the coarse prompt box comes from an anchor (see anchor_for)
        self.mid_labels: tuple[str, ...] = ()  # found on the mid view, not the whole film (see mid_view)
        self.anchor_check = float(anchor_check)
        self.negative_check = bool(negative_check)
        self.small_coarse = float(small_coarse)
        self.user_box_grow = 0.0  # a user box's growth before its fine pass: ADAPTER_USER_BOX_GROW with an adapter
        self.adapter_version = "none"
        self.adapter_metadata: dict = {}
        self.encoder_version = "base"  # part of the cache key: a LoRA adapter changes the embeddings
        self._generation = 0  # bumped by every adapter load/unload: part of the result-cache key
        self.head = None
        self._text_encoder = text_encoder
        self._text_encoder_path = text_encoder_path
        self._base = (backbone.image_encoder, backbone.mask_decoder, self.priors)
        self._base_geometry = (crop_margin, max_tile_aspect)
        self._image: Radiograph | None = None  # the current film, or its exposed field (see _focus)
        self._hash = ""  # the whole film's content hash
        self._source: Radiograph | None = None  # the whole film as given
        self._field: Field | None = None  # where _image lies in the whole film, if cropped or turned
        self._film_shape: tuple[int, int] | None = None
        self._fields = LRU(256)  # content hash -> Field, or () for a film used whole
        self._negative = False  # the current film is read inverted (see _settle_polarity)
        self._negatives = LRU(256)  # (content hash, adapter generation) -> read inverted?
        self._leans = LRU(256)  # (content hash, adapter generation) -> Field turned to the femur's mean angle, or ()
        self._lock = threading.RLock()
        self._pending = 0  # requests waiting for or holding the lock (_foreground): background warm-up yields to them
        self._background = None  # the Interruption of the warm-up step in progress, if any
        self.interrupted_steps = 0  # warm-up steps ended early by a request (and run again after it)
        self._pending_lock = threading.Lock()

    # --- state ------------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return "zero-shot" if self.adapter_version == "none" else "adapter"

    def set_image(self, image: Radiograph | np.ndarray | str) -> Radiograph:
        """Select the image to segment. Cheap: encoding happens lazily and is cached."""
        image = _as_radiograph(image)
        h = image.content_hash()
        with self._foreground():
            self._focus(image, h)
        return image

    def _focus(self, image: Radiograph, h: str) -> None:
        """Make ``image`` (content hash ``h``) the current film. When it lies askew on its canvas, or flat borders
        take a large part of it (a film padded onto a larger canvas, a wide collimated band: ``transforms.film_field``),
        the pipeline works on the film turned upright or on its exposed field, where the prior boxes and the adapter's
        training expect the anatomy, and the masks are put back into the whole film. Under the lock."""
        found = self._fields.get(h)
        if found is None:
            found = film_field(image.pixels) or ()
            self._fields.put(h, found)
        self._field = found or self._leans.get((h, self._generation)) or None
        self._film_shape = image.shape
        self._source, self._hash = image, h
        self._read(bool(self._negatives.get((h, self._generation))))

    def _read(self, negative: bool) -> None:
        """The pipeline's image of the current film: its field (or all of it), inverted when ``negative``."""
        image = field_radiograph(self._source, self._field) if self._field is not None else self._source
        self._image, self._negative = (inverted_radiograph(image) if negative else image), negative

    @property
    def field(self) -> Field | None:
        """Where the pipeline works in the current film (``transforms.Field``: a box, turned upright for a film lying
        askew), or None for the whole film."""
        return self._field

    def film_notes(self) -> dict:
        """How the pipeline reads the current film, when not as given: {"field": [x0, y0, x1, y1]} (the exposed
        field, or the film's rectangle turned upright) and {"turned_degrees": d, "turned_for": why} for a film lying
        askew on its canvas or a leg turned on the detector (:meth:`_settle_lean`), {"negative": True} for a film
        read inverted (:meth:`_settle_polarity`); {} for a film used as it is."""
        notes: dict = {"negative": True} if self._negative else {}
        if self._field is None:
            return notes
        notes["field"] = [int(v) for v in self._field.box]
        if self._field.rotation is not None:
            notes["turned_degrees"] = round(float(self._field.rotation[0]), 2)
            lean = self._leans.get((self._hash, self._generation))
            on_canvas = not (lean and lean == self._field)
            notes["turned_for"] = "the film's turn on its canvas" if on_canvas else "the femur's lean"
        return notes

    def _boxes_to_field(self, boxes: dict[str, list[float]] | None) -> dict[str, list[float]] | None:
        if not boxes or self._field is None:
            return boxes
        return {label: self._field.box_from_film(b) for label, b in boxes.items()}

    def _result_to_film(self, r: LabelResult) -> LabelResult:
        """A result of the field's pipeline in the whole film's pixels."""
        if self._field is None:
            return r
        return LabelResult(r.label, self._field.mask_to_film(r.mask, self._film_shape), r.score,
                           self._field.box_to_film(r.box, self._film_shape), r.prompt_source, r.warning)

    def _cache_key(self, view: View) -> tuple:
        turned = None if self._field is None else self._field.rotation
        return (self._hash, self._negative, turned, self.backbone.weights_id, self.encoder_version, self.precision,
                view.key())

    def _settle_lean(self, parsed: list[ParsedLabel], text_prompted: bool) -> None:
        """Under the lock, after :meth:`_settle_polarity`: once per film and adapter, when a lower-limb label is asked
        by text on a film read as it is (no field), decide whether the patient was turned on the detector: the femur's
        coarse mask leans unlike the training femurs (``PriorBoxes.lean``), on a film that looks like a leg film, with
        a mask shaped like a femur. Then the film is read turned about its
        centre to their mean angle (``transforms.Field``, the film's own size), as a film turned on its canvas is. Costs
        one decoder call on the film's embedding; a turned film is encoded again, turned."""
        from .priors import LEAN_LABEL
        from .vocabulary import BODY_REGIONS

        region = next((r for r, members in BODY_REGIONS.items() if LEAN_LABEL in members), None)
        if (not text_prompted or self.priors.shape.get(LEAN_LABEL, {}).get("angle") is None
                or LEAN_LABEL not in self.labels or not any(p.label in BODY_REGIONS.get(region, ()) for p in parsed)):
            return
        key = (self._hash, self._generation)
        if self._leans.get(key) is not None or self._fields.get(self._hash):
            return
        view = self.coarse_view()
        parsed_anchor = _as_parsed([LEAN_LABEL], self.labels)
        logits, _, _ = self._decode_boxes(view, self.priors.box(LEAN_LABEL, self._image.shape)[None],
                                          self._text_tokens(parsed_anchor))
        femur = largest_component(view.logits_to_image(logits).numpy()[0] > 0)
        distances = self.film_distances()
        # a chest film asked for a femur too is not a leg to turn: the film must look like a leg film (when the
        # adapter keeps the regions) and the femur's mask like a femur (the answer's shape check)
        leg_film = not distances or min(distances, key=distances.get) == region
        turn = self.priors.lean(femur) if leg_film and self.priors.check(LEAN_LABEL, femur) is None else None
        h, w = self._image.shape
        found = Field((0, 0, w, h), (float(turn), w / 2.0, h / 2.0)) if turn is not None else ()
        self._leans.put(key, found)
        if found:
            self._field = found
            self._read(self._negative)

    def _settle_polarity(self, text_prompted: bool) -> None:
        """Under the lock, before a request's pipeline: decide once per film and adapter whether the film is a
        negative (``priors.NEGATIVE_CHECK_Z``), and read it inverted if so. A film near a region's training films
        costs nothing (its whole-film embedding is the coarse pass's); one far from all of them, one encode of its
        inverted copy (kept for the pipeline when it is read inverted). A request with user boxes only leaves the
        question open: it does not encode the whole film."""
        if not self.negative_check or not self.priors.film_regions:
            return
        key = (self._hash, self._generation)
        negative = self._negatives.get(key)
        if negative is None:
            if not text_prompted:
                return
            self._read(False)  # (an earlier adapter may have read it inverted)
            negative = False
            own = self.film_distances()
            if own and min(own.values()) > NEGATIVE_CHECK_Z:
                self._read(True)
                flipped = self.film_distances()
                negative = min(flipped.values()) <= NEGATIVE_NEAR_Z
            self._negatives.put(key, negative)
        if negative != self._negative:
            self._read(negative)

    # --- adapters ----------------------------------------------------------------------------------
    @property
    def text_encoder(self):
        if self._text_encoder is None:
            from .text import TextEncoder

            self._text_encoder = TextEncoder(self._text_encoder_path, device=self.backbone.device)
        return self._text_encoder

    def load_adapter(self, path, merge: bool = True) -> None:
        """Use the adapter in ``path`` (see ``adapters.py``) for all further predictions. ``merge`` folds the
        LoRA weights into the encoder (no run-time overhead; on the CPU it then encodes through ONNX Runtime, as the
        base encoder does, with a graph exported once per adapter). The fine pass then cuts its crops with the
        adapter's training geometry (``crop_margin``, ``max_tile_aspect``) and grows each label's coarse box as the
        adapter's validation chose (``serving.coarse_grow``). Raises AdapterError when it does not fit."""
        import copy

        from .adapters import AdapterError, lora_encoder
        from .adapters import load_adapter as read_adapter
        from .text import PromptHead

        adapter = read_adapter(path)
        meta = adapter.metadata
        if meta.get("backbone") != self.backbone.name:
            raise AdapterError(f"adapter {path} was trained for backbone {meta.get('backbone')!r}, "
                               f"this server runs {self.backbone.name!r}")
        enc = self.text_encoder
        if meta.get("text_encoder") != enc.name or int(meta.get("text_dim", -1)) != enc.dim:
            raise AdapterError(f"adapter {path} was trained with text encoder {meta.get('text_encoder')!r} "
                               f"(dim {meta.get('text_dim')}), this server uses {enc.name!r} (dim {enc.dim})")
        head = PromptHead(enc.dim, n_tokens=int(meta["n_tokens"]), hidden=int(meta["head_hidden"]))
        head.load_state_dict(adapter.head_state)
        head.check_trained()
        base_encoder, base_decoder, _ = self._base
        decoder = copy.deepcopy(base_decoder)
        decoder.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v
                                 for k, v in adapter.decoder_state.items()})
        encoder = base_encoder
        if adapter.has_lora:
            encoder = lora_encoder(copy.deepcopy(base_encoder), adapter.path, trainable=False)
            if merge:
                encoder = encoder.merge_and_unload().eval()
                self.backbone.prepare_onnxruntime_encoder(encoder)  # CPU encodes through ONNX Runtime when it is on
        dev = self.backbone.device
        decoder = decoder.to(dev).eval()
        self.backbone.prepare_onnxruntime_decoder(decoder)  # CPU decodes through ONNX Runtime when it is on
        with self._foreground():
            self.backbone.image_encoder = encoder.to(dev).eval()
            self.backbone.mask_decoder = decoder
            self.head = head.to(dev).eval()
            self.priors = PriorBoxes.from_json(adapter.priors)
            self.adapter_version = adapter.version
            self.adapter_metadata = meta
            self.encoder_version = adapter.version if adapter.has_lora else "base"
            # the fine pass must cut crops the way the adapter's decoder saw them in training
            trained = meta.get("training", {}).get("config", {})
            self.crop_margin = float(trained.get("crop_margin", self._base_geometry[0]))
            self.max_tile_aspect = float(trained.get("max_tile_aspect", self._base_geometry[1]))
            serving = meta.get("serving", {})
            self.label_grow = {str(k): float(v) for k, v in serving.get("coarse_grow", {}).items()}
            self.label_prompt = {str(k): str(v) for k, v in serving.get("coarse_prompt", {}).items()}
            self.mid_labels = tuple(self.priors.mid_labels(meta.get("labels", ()))) if trained.get("mid_view") else ()
            self.user_box_grow = ADAPTER_USER_BOX_GROW
            self._generation += 1

    def unload_adapter(self) -> None:
        """Back to the zero-shot path with the original weights."""
        with self._foreground():
            encoder, decoder, priors = self._base
            self.backbone.image_encoder, self.backbone.mask_decoder, self.priors = encoder, decoder, priors
            self.backbone.prepare_onnxruntime_decoder()  # normally still prepared: then a no-op
            self.head, self.adapter_version, self.adapter_metadata, self.encoder_version = None, "none", {}, "base"
            self.crop_margin, self.max_tile_aspect = self._base_geometry
            self.label_grow, self.label_prompt, self.mid_labels = {}, {}, ()
            self.user_box_grow = 0.0
            self._generation += 1

    def grow_for(self, label: str) -> float:
        """How much the fine pass grows ``label``'s coarse box (fraction per side): the adapter's choice for the label,
        else ``coarse_grow``."""
        return self.label_grow.get(label, self.coarse_grow)

    def _relative_anchor(self, label: str) -> str | None:
        """The anchor of ``label``'s relative prior when the adapter has one and the anchor is served, else None."""
        anchor = self.priors.relative.get(label, (None,))[0]
        return anchor if anchor in self.labels else None

    def anchor_for(self, label: str) -> str | None:
        """The label whose coarse mask places ``label``'s coarse prompt box (``priors.relative``), when the adapter
        chose that for it (``serving.coarse_prompt``: "anchor"); None: the film-frame prior box."""
        return self._relative_anchor(label) if self.label_prompt.get(label) == "anchor" else None

    def checked_against(self, label: str) -> str | None:
        """The anchor that checks ``label``'s coarse mask when it is prompted from the film-frame prior: a coarse
        mask far from where the anchor places the label (box IoU below ``anchor_check``: a clavicle prompt that
        locked on a structure above the clavicle) is replaced by the coarse mask from the anchor-placed box.
        None: no check (no relative prior, the label is anchored already, it is found on the mid view, or off)."""
        if self.anchor_check <= 0 or self.label_prompt.get(label) == "anchor" or label in self.mid_labels:
            return None
        return self._relative_anchor(label)

    @torch.inference_mode()
    def _text_tokens(self, parsed: list[ParsedLabel]) -> torch.Tensor | None:
        if self.head is None:
            return None
        from .text import head_inputs

        emb, sides = head_inputs(self.text_encoder, parsed)
        dev = self.backbone.device
        return self.head(emb.to(dev), sides.to(dev))

    def _autocast(self):
        return torch.autocast(self.backbone.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    @torch.inference_mode()
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.backbone.encode(x).float()

    @torch.inference_mode()
    def embedding(self, view: View) -> tuple[torch.Tensor, bool]:
        """The (1, 256, 64, 64) embedding of ``view`` of the current image, from the cache when possible."""
        assert self._image is not None, "call set_image first"
        pixels = self._image.pixels
        return self.cache.get_or_compute(self._cache_key(view), lambda: self._encode(view.model_input(pixels)))

    @torch.inference_mode()
    def embeddings(self, views: list[View]) -> list[torch.Tensor]:
        """Embeddings (1, 256, 64, 64) of several views of the current image: cached ones from the cache, the
        others encoded ``encode_batch`` at a time (each distinct view once) and cached."""
        assert self._image is not None, "call set_image first"
        pixels = self._image.pixels
        keys = [self._cache_key(v) for v in views]
        missing = list(dict.fromkeys(k for k in keys if k not in self.cache))
        by_key = dict(zip(keys, views))
        fresh: dict = {}
        for i in range(0, len(missing), self.encode_batch):
            chunk = missing[i:i + self.encode_batch]
            emb = self._encode(torch.cat([by_key[k].model_input(pixels) for k in chunk]))
            fresh.update((k, emb[j:j + 1]) for j, k in enumerate(chunk))
        out = []
        for k in keys:  # counts hits and misses; the fallback only runs if an entry vanished meanwhile
            value = fresh.pop(k, None)
            emb, _ = self.cache.get_or_compute(
                k, (lambda v=value: v) if value is not None else
                (lambda k=k: self._encode(by_key[k].model_input(pixels))))
            out.append(emb)
        return out

    def coarse_view(self) -> View:
        """The whole film. Very elongated films (long-leg, 1:8) are stretched, letterboxing would leave the
        leg a few pixels wide."""
        h, w = self._image.shape
        if max(h, w) / min(h, w) > 2.0:
            return View.full((h, w), self.backbone.input_size, stretch=True)
        return self.backbone.full_view((h, w))

    def film_vector(self) -> np.ndarray:
        """The current film's whole-film embedding averaged over its grid (256 numbers): what
        ``PriorBoxes.film_distances`` compares with each body region's training films."""
        emb, _ = self.embedding(self.coarse_view())
        return emb.float().mean(dim=(2, 3))[0].cpu().numpy()

    def film_distances(self) -> dict[str, float]:
        """:meth:`PriorBoxes.film_distances` of the current film; {} (no encode) when the priors keep no regions."""
        return self.priors.film_distances(self.film_vector()) if self.priors.film_regions else {}

    def mid_view(self) -> View:
        """The crop of the region holding the mid labels' prior boxes (``PriorBoxes.mid_region``; on a chest film
        the upper thorax), stretched to the model input: where an adapter trained with ``mid_view`` finds them."""
        region = self.priors.mid_region(self.mid_labels, self._image.shape)
        return View.crop(self._image.shape, region, self.backbone.input_size, margin=self.crop_margin)

    # --- prediction --------------------------------------------------------------------------------
    @torch.inference_mode()
    def _decode_boxes(self, view: View, boxes: np.ndarray,
                      tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
        emb, hit = self.embedding(view)
        model_boxes = torch.from_numpy(view.box_to_model(boxes))
        with self._autocast():
            sparse, dense = self.backbone.prompt_embeddings(len(boxes), boxes=model_boxes, tokens=tokens)
            logits, iou = self.backbone.decode(emb, sparse, dense)
        return logits.float().cpu(), iou.float().cpu(), hit

    @torch.inference_mode()
    def _decode_views(self, views: list[View], boxes: list[np.ndarray],
                      tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One box per view (its own embedding): logits (N, 1, R, R) and IoU (N,). LiteMedSAM decodes all
        (embedding, prompt) pairs in one call; segment_anything's decoder repeats one embedding for all its
        prompts, so ViT-B decodes view by view. ``tokens`` (N, T, 256) are the text tokens per view."""
        embs = self.embeddings(views)
        model_boxes = torch.from_numpy(np.stack([v.box_to_model(b[None])[0] for v, b in zip(views, boxes)]))
        with self._autocast():
            if self.backbone.name == "litemedsam":
                sparse, dense = self.backbone.prompt_embeddings(len(views), boxes=model_boxes, tokens=tokens)
                logits, iou = self.backbone.decode(torch.cat(embs), sparse, dense)
            else:
                outs = []
                for i, emb in enumerate(embs):
                    sparse, dense = self.backbone.prompt_embeddings(
                        1, boxes=model_boxes[i:i + 1], tokens=None if tokens is None else tokens[i:i + 1])
                    outs.append(self.backbone.decode(emb, sparse, dense))
                logits, iou = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
        return logits.float().cpu(), iou.float().cpu()

    def _fine_logits_batched(self, fine_boxes: list[np.ndarray],
                             tokens: torch.Tensor | None = None) -> list[tuple[np.ndarray, float]]:
        """:meth:`_fine_logits` for several labels at once: every tile of every label in one batched
        encode (of the crops not cached) and one decoder pass. Same views, boxes and merging."""
        shape, size = self._image.shape, self.backbone.input_size
        owner, views, tiles = [], [], []
        for i, box in enumerate(fine_boxes):
            for tile in tile_boxes(box, self.max_tile_aspect):
                owner.append(i)
                tiles.append(tile)
                views.append(View.crop(shape, tile, size, margin=self.crop_margin))
        tok = None if tokens is None else tokens[torch.as_tensor(owner, device=tokens.device)]
        logits, iou = self._decode_views(views, tiles, tok)
        out = [np.full(shape, -20.0, dtype=np.float32) for _ in fine_boxes]
        scores: list[list[float]] = [[] for _ in fine_boxes]
        for j, (i, view) in enumerate(zip(owner, views)):
            np.maximum(out[i], view.logits_to_image(logits[j:j + 1])[0].numpy(), out=out[i])
            scores[i].append(float(iou[j]))
        return [(o, float(np.mean(s))) for o, s in zip(out, scores)]

    def _fine_logits(self, box: np.ndarray, tokens: torch.Tensor | None = None) -> tuple[np.ndarray, float]:
        """Logits (H, W) of the fine pass for one box: a stretched crop, or overlapping tiles along the long
        axis when the box is more than ``max_tile_aspect`` times longer than wide (femur, tibia)."""
        shape, size = self._image.shape, self.backbone.input_size
        out = np.full(shape, -20.0, dtype=np.float32)
        scores = []
        for tile in tile_boxes(box, self.max_tile_aspect):
            view = View.crop(shape, tile, size, margin=self.crop_margin)
            logits, iou, _ = self._decode_boxes(view, tile[None], tokens)
            np.maximum(out, view.logits_to_image(logits)[0].numpy(), out=out)
            scores.append(float(iou[0]))
        return out, float(np.mean(scores))

    def _result_key(self, label: str, box: np.ndarray | None, refine: bool, content_hash: str | None = None) -> tuple:
        """Everything a label's final mask depends on besides the label: image (``content_hash``, default the
        current one), weights, adapter (head, decoder, priors), precision, user box and the pipeline's settings.
        The text tokens come from the label's canonical phrase, so the user's wording is not part of it."""
        h = content_hash or self._hash
        lean = self._leans.get((h, self._generation))
        return (h, self._negatives.get((h, self._generation)), lean.rotation if lean else lean,
                self.backbone.weights_id, self._generation, self.adapter_version, self.precision, label,
                None if box is None else tuple(float(v) for v in box), bool(refine), self.crop_margin,
                self.grow_for(label), self.anchor_for(label), self.max_tile_aspect, self.batch_fine,
                self.checked_against(label) and self.anchor_check, box is not None and self.user_box_grow,
                self.head is not None and self.small_coarse)

    def predict(self, prompt: str | list[str], boxes: dict[str, list[float]] | None = None,
                refine: bool | None = None, image: Radiograph | np.ndarray | str | None = None) -> Prediction:
        """Segment the labels named in ``prompt`` ("left lung, heart" or a list of label names).

        ``boxes`` optionally gives a user box per label (image pixels) that replaces the prior box. Labels
        segmented before on this image with the same weights, box and settings come from the result cache
        (``result_cache`` entries); only the others are decoded, together. ``image``: set it first, under the
        same lock (a server whose requests run concurrently cannot segment one request's prompt on another's
        image); default: the image of :meth:`set_image`.
        """
        parsed = _as_parsed(prompt, self.labels)
        refine = self.refine if refine is None else refine
        if image is not None:
            image = _as_radiograph(image)
            h = image.content_hash()
        with self._foreground():
            if image is not None:
                self._focus(image, h)
            if self._image is None:
                raise RuntimeError("call set_image before predict")
            return self._predict_locked(parsed, boxes, refine)

    @contextlib.contextmanager
    def _foreground(self):
        """The lock, for a request that must not wait behind background warm-up: while it waits or holds the
        lock the warm-up does not start a step, and the step in progress is ended (its encode interrupted)."""
        with self._pending_lock:
            self._pending += 1
            background = self._background
        if background is not None:
            background.interrupt()
        try:
            with self._lock:
                yield
        finally:
            with self._pending_lock:
                self._pending -= 1

    def _predict_locked(self, parsed: list[ParsedLabel], boxes: dict[str, list[float]] | None,
                        refine: bool) -> Prediction:
        t0 = time.perf_counter()
        hits0, misses0 = self.cache.hits, self.cache.misses
        text_prompted = any((boxes or {}).get(p.label) is None for p in parsed)
        self._settle_polarity(text_prompted)
        self._settle_lean(parsed, text_prompted)
        keys = [self._result_key(p.label, (boxes or {}).get(p.label), refine) for p in parsed]
        results: list[LabelResult | None] = [self.results.get(k) for k in keys]
        todo = [i for i, r in enumerate(results) if r is None]
        timings = {"coarse": 0.0, "fine": 0.0}
        if todo:
            fresh, timings = self._segment([parsed[i] for i in todo], self._boxes_to_field(boxes), refine)
            for i, r in zip(todo, fresh):
                results[i] = self._result_to_film(r)
                self.results.put(keys[i], results[i])
        t1 = time.perf_counter()
        return Prediction(
            results, self.mode, self._film_shape, timings_ms={**timings, "total": 1e3 * (t1 - t0)},
            cache={"hits": self.cache.hits - hits0, "misses": self.cache.misses - misses0,
                   "result_hits": len(parsed) - len(todo)}, film=self.film_notes(),
        )

    def warm(self, image: Radiograph, labels: list[str] | tuple[str, ...] = (),
             should_stop=lambda: False) -> int:
        """Fill the caches for ``image`` without changing the current image: its whole-film embedding, then the
        final masks of ``labels`` one label at a time (so a user's prompt for them is answered from the result
        cache). For a background thread: between steps it waits while a :meth:`predict` call is pending, a
        :meth:`predict` call ends the step in progress (its ONNX Runtime runs raise :class:`Interrupted`; the step
        runs again afterwards), and it ends early when ``should_stop()``. Returns the number of labels segmented."""
        h = image.content_hash()
        steps: list[str | None] = [None, *[p.label for p in _as_parsed(list(labels), self.labels)]]
        computed = 0
        while steps:
            while self._pending and not should_stop():
                time.sleep(0.05)
            if should_stop():
                break
            label = steps[0]
            try:
                with self._on(image, h), self._background_step():
                    if label is None:
                        self._settle_polarity(True)
                        self._settle_lean(_as_parsed(steps[1:], self.labels) if len(steps) > 1 else [], True)
                        self.embedding(self.coarse_view())
                    elif self._result_key(label, None, self.refine) not in self.results:
                        self._predict_locked(_as_parsed([label], self.labels), None, self.refine)
                        computed += 1
            except Interrupted:  # a request came in: it goes first, then this step runs again
                self.interrupted_steps += 1
                continue
            steps.pop(0)
        return computed

    @contextlib.contextmanager
    def _background_step(self):
        """A warm-up step that a :meth:`predict` call ends early (its ONNX Runtime encodes and decodes raise
        :class:`Interrupted`); one already waiting ends it before it starts."""
        with interruptible() as handle:
            with self._pending_lock:
                self._background = handle
                if self._pending:
                    handle.interrupt()
            try:
                yield
            finally:
                with self._pending_lock:
                    self._background = None

    @contextlib.contextmanager
    def _on(self, image: Radiograph, content_hash: str):
        """Holding the lock, work on ``image`` and then put the current image back."""
        with self._lock:
            saved = (self._image, self._source, self._hash, self._field, self._film_shape, self._negative)
            self._focus(image, content_hash)
            try:
                yield
            finally:
                self._image, self._source, self._hash, self._field, self._film_shape, self._negative = saved

    def unsegmented(self, image: Radiograph, labels: list[str] | tuple[str, ...]) -> list[str]:
        """The labels among ``labels`` whose text-prompt mask on ``image`` (no user box, current weights and
        settings) is not in the result cache: what a :meth:`warm` of them would compute."""
        # without the lock, which a warm-up step may hold for a second: the answer is a guess that warm() checks
        current, h = self._source, self._hash
        h = h if image is current else image.content_hash()
        return [p.label for p in _as_parsed(list(labels), self.labels)
                if self._result_key(p.label, None, self.refine, h) not in self.results]

    def _segment(self, parsed: list[ParsedLabel], boxes: dict[str, list[float]] | None,
                 refine: bool) -> tuple[list[LabelResult], dict[str, float]]:
        """The pipeline for labels not in the result cache: prompt box (user or prior) -> coarse mask on the
        whole film (on the mid view for ``mid_labels``) -> grown box of its largest component -> fine mask on the
        crop (tiles for long boxes). With ``refine`` a label with a user box goes straight to the fine pass on its
        box, grown by ``user_box_grow`` (``ADAPTER_USER_BOX_GROW`` with an adapter, none zero-shot)."""
        t0 = time.perf_counter()
        shape = self._image.shape
        prompt_boxes, sources = [], []
        for p in parsed:
            user = (boxes or {}).get(p.label)
            prompt_boxes.append(np.asarray(user, np.float32) if user is not None else self.priors.box(p.label, shape))
            sources.append("user_box" if user is not None else ("text" if self.head is not None else "prior"))
        prompt_boxes = np.stack(prompt_boxes)
        anchor_masks = self._anchor_prompt_boxes(parsed, sources, prompt_boxes)

        tokens = self._text_tokens(parsed)
        # the coarse pass finds the structure; a user box already says where it is, so with refine its label
        # skips it (a box drawn on a new film costs one crop encode, not the whole film's as well)
        coarse = [i for i, s in enumerate(sources) if not refine or s != "user_box"]
        full: dict[int, np.ndarray] = {}
        iou = torch.zeros(len(parsed))
        for i in coarse:  # an anchor asked for itself: its coarse mask was just decoded for the anchored label
            if sources[i] != "user_box" and parsed[i].label in anchor_masks:
                full[i], iou[i] = anchor_masks[parsed[i].label]
        mid = [i for i in coarse if i not in full and sources[i] != "user_box" and parsed[i].label in self.mid_labels]
        if mid:  # one encode of the mid view for all of them, instead of the whole film's
            view = self.mid_view()
            logits, iou_m, _ = self._decode_boxes(view, prompt_boxes[mid], None if tokens is None else tokens[mid])
            full.update(zip(mid, view.logits_to_image(logits).numpy() > 0))
            iou[mid] = iou_m
        coarse = [i for i in coarse if i not in full]
        if coarse:
            view = self.coarse_view()
            logits, iou_c, _ = self._decode_boxes(view, prompt_boxes[coarse],
                                                  None if tokens is None else tokens[coarse])
            full.update(zip(coarse, view.logits_to_image(logits).numpy() > 0))
            iou[coarse] = iou_c
        self._check_against_anchors(parsed, sources, prompt_boxes, tokens, anchor_masks, full, iou)
        results = []
        t_coarse = time.perf_counter()
        fine_boxes = []
        if refine:
            for i in range(len(parsed)):
                b = mask_box(largest_component(full[i])) if i in full else None
                # a user box says where the structure is: grown as the adapter's fine crops were in training
                if sources[i] == "user_box":
                    fine_boxes.append(grow_box(prompt_boxes[i], self.user_box_grow, shape))
                elif b is None:  # a prior box only where the coarse pass found nothing
                    fine_boxes.append(prompt_boxes[i])
                else:  # SAM's masks sit inside their box: grow the coarse box so the fine pass can extend it
                    fb = grow_box(b, self.grow_for(parsed[i].label), shape)
                    if self.head is not None and _area(b) < self.small_coarse * _area(prompt_boxes[i]):
                        fb = union_box([fb, prompt_boxes[i]])  # a piece of it: the fine crop spans where it should be
                    fine_boxes.append(fb)
            if self.batch_fine:
                fine = self._fine_logits_batched(fine_boxes, tokens)
            else:
                fine = [self._fine_logits(fb, None if tokens is None else tokens[i:i + 1])
                        for i, fb in enumerate(fine_boxes)]
        distances = self.film_distances() if any(s != "user_box" for s in sources) else {}
        for i, p in enumerate(parsed):
            if refine:
                fine_logits, score = fine[i]
                mask, used_box = fine_logits > 0, fine_boxes[i]
            else:
                mask, score, used_box = full[i], float(iou[i]), prompt_boxes[i]
            mask = largest_component(mask)
            # a user box says the structure is there: only its mask's shape is checked
            region = None if sources[i] == "user_box" else self.priors.film_region_warning(p.label, distances)
            results.append(LabelResult(p.label, mask, score, [float(v) for v in used_box], sources[i],
                                       region or self.priors.check(p.label, mask)))
        t1 = time.perf_counter()
        return results, {"coarse": 1e3 * (t_coarse - t0), "fine": 1e3 * (t1 - t_coarse)}

    def _anchor_prompt_boxes(self, parsed: list[ParsedLabel], sources: list[str],
                             prompt_boxes: np.ndarray) -> dict[str, tuple[np.ndarray, float]]:
        """In place: the prompt box of each label without a user box whose adapter places it from an anchor (a
        clavicle from the lung on its side) is its relative prior on the anchor's coarse mask. The anchors' coarse
        masks take one decoder call on the film's embedding; where an anchor finds nothing the film prior stays.
        Returns {anchor: (coarse mask, predicted IoU)}, which is the anchor's own coarse pass when it is asked too."""
        wanted = {i: self.anchor_for(p.label) for i, p in enumerate(parsed) if sources[i] != "user_box"}
        checked = {self.checked_against(p.label) for i, p in enumerate(parsed) if sources[i] != "user_box"}
        anchors = sorted(({a for a in wanted.values()} | checked) - {None})
        if not anchors:
            return {}
        shape = self._image.shape
        anchor_parsed = _as_parsed(anchors, self.labels)
        view = self.coarse_view()
        boxes = np.stack([self.priors.box(a, shape) for a in anchors])
        logits, iou, _ = self._decode_boxes(view, boxes, self._text_tokens(anchor_parsed))
        masks = view.logits_to_image(logits).numpy() > 0
        for i, a in wanted.items():
            found = mask_box(largest_component(masks[anchors.index(a)])) if a is not None else None
            box = None if found is None else self.priors.relative_box(parsed[i].label, found, shape)
            if box is not None:
                prompt_boxes[i] = box
        return {a: (masks[j], float(iou[j])) for j, a in enumerate(anchors)}

    def _check_against_anchors(self, parsed: list[ParsedLabel], sources: list[str], prompt_boxes: np.ndarray,
                               tokens: torch.Tensor | None, anchor_masks: dict[str, tuple[np.ndarray, float]],
                               full: dict[int, np.ndarray], iou: torch.Tensor) -> None:
        """In place: labels with an anchor check (``checked_against``) whose coarse mask is empty or far from the
        anchor-placed box are decoded again on the whole film from that box (one decoder call for all of them)."""
        redo = []
        for i, p in enumerate(parsed):
            anchor = self.checked_against(p.label) if sources[i] != "user_box" else None
            if anchor is None or anchor not in anchor_masks or i not in full:
                continue
            found_anchor = mask_box(largest_component(anchor_masks[anchor][0]))
            placed = None if found_anchor is None else self.priors.relative_box(p.label, found_anchor,
                                                                                 self._image.shape)
            if placed is None:  # the anchor found nothing: nothing to check against
                continue
            found = mask_box(largest_component(full[i]))
            if found is None or box_iou(found, placed) < self.anchor_check:
                prompt_boxes[i] = placed
                redo.append(i)
        if redo:
            view = self.coarse_view()
            logits, iou_r, _ = self._decode_boxes(view, prompt_boxes[redo], None if tokens is None else tokens[redo])
            full.update(zip(redo, view.logits_to_image(logits).numpy() > 0))
            iou[redo] = iou_r


class ResultCache(LRU):
    """Final label results with their masks bit-packed (a 2048 x 2048 mask takes 512 KB)."""

    def get(self, key: tuple) -> LabelResult | None:
        entry = super().get(key)
        if entry is None:
            return None
        bits, shape, label, score, box, source, warning = entry
        mask = np.unpackbits(bits, count=shape[0] * shape[1]).reshape(shape).astype(bool)
        return LabelResult(label, mask, score, list(box), source, warning)

    def put(self, key: tuple, r: LabelResult) -> None:
        if self.max_entries:
            super().put(key, (np.packbits(r.mask), r.mask.shape, r.label, r.score, tuple(r.box), r.prompt_source,
                              r.warning))


def _area(box) -> float:
    return max(float(box[2] - box[0]), 0.0) * max(float(box[3] - box[1]), 0.0)


def grow_box(box, fraction: float, shape: tuple[int, int]) -> np.ndarray:
    """``box`` grown by ``fraction`` of its width/height on every side, clipped to the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    dx, dy = fraction * (x1 - x0), fraction * (y1 - y0)
    h, w = shape
    return np.array([max(0.0, x0 - dx), max(0.0, y0 - dy), min(w - 1.0, x1 + dx), min(h - 1.0, y1 + dy)],
                    dtype=np.float32)


def tile_boxes(box, max_aspect: float = 2.0, overlap: float = 0.25, split_above: float = 3.0) -> list[np.ndarray]:
    """Split a box longer than ``split_above`` times its width into overlapping tiles along its long axis,
    each at most ``max_aspect`` long: one stretched crop of a 1:5 femur would squash it; tiles keep each
    piece near square. Boxes up to ``split_above`` (a lung is about 1:2) stay whole: a tile boundary
    through an organ costs more than the stretch (right lung 0.87 tiled vs 0.98 whole on a JSRT film)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
    vertical = h >= w
    long_, short = (h, w) if vertical else (w, h)
    if long_ <= max(split_above, max_aspect) * short:
        return [np.array([x0, y0, x1, y1], dtype=np.float32)]
    n = max(2, int(np.ceil((long_ / short - overlap * max_aspect) / (max_aspect * (1 - overlap)))))
    step = long_ / (n - (n - 1) * overlap)
    tiles = []
    for i in range(n):
        a = (y0 if vertical else x0) + i * step * (1 - overlap)
        b = min(a + step, y1 if vertical else x1)
        tiles.append(np.array([x0, a, x1, b] if vertical else [a, y0, b, y1], dtype=np.float32))
    return tiles


def _as_radiograph(image: Radiograph | np.ndarray | str) -> Radiograph:
    if isinstance(image, np.ndarray):
        return radiograph_from_array(image)
    return image if isinstance(image, Radiograph) else load_radiograph(image)


def _as_parsed(prompt: str | list[str], allowed: tuple[str, ...]) -> list[ParsedLabel]:
    if isinstance(prompt, str):
        return parse_prompt(prompt, allowed)
    out: list[ParsedLabel] = []
    for item in prompt:
        for p in parse_prompt(item, allowed):
            if p.label not in [q.label for q in out]:
                out.append(p)
    return out


def build_predictor(backbone: str = "litemedsam", checkpoint: str | None = None, device: str = "auto",
                    labels: str | tuple[str, ...] = "both", refine: bool = True, cache_size: int = 32,
                    priors: PriorBoxes | None = None, text_encoder: str | None = None,
                    adapter: str | None = None, precision: str = "fp32", batch_fine: bool = True,
                    onnxruntime: bool | None = None) -> Predictor:
    """One call from options to a ready predictor (the CLI and the MONAI Label app both use it).
    The text encoder loads lazily (only an adapter needs it); ``adapter`` loads one right away.
    ``onnxruntime``: CPU encodes through ONNX Runtime (see ``Backbone.enable_onnxruntime``); None = on for the
    CPU unless ``XRAY_TEXTSEG_ONNXRUNTIME=0``."""
    from .backbones import build_backbone, enable_default_onnxruntime, resolve_device
    from .vocabulary import resolve_label_set

    label_set = resolve_label_set(labels) if isinstance(labels, str) else tuple(labels)
    model = build_backbone(backbone, checkpoint, device=resolve_device(device))
    if onnxruntime is None:
        enable_default_onnxruntime(model)
    elif onnxruntime:
        model.enable_onnxruntime()
    predictor = Predictor(model, priors=priors, cache_size=cache_size, labels=label_set, refine=refine,
                          text_encoder_path=text_encoder or None, precision=precision, batch_fine=batch_fine)
    if adapter:
        predictor.load_adapter(adapter)
    return predictor
