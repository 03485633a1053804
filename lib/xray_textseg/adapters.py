"""Adapter artifacts and the adapter store.

An *adapter* is what training produces, one directory:

    adapter_config.json, adapter_model.safetensors   peft LoRA of the image encoder (save_pretrained
                                                      format; absent when only head + decoder were trained)
    head.safetensors                                  text -> sparse-prompt projection head (float16)
    decoder.safetensors                               mask decoder weights (float16)
    priors.json                                       prior boxes fitted on the training labels (and
                                                      relative to an anchor: clavicle from lung,
                                                      tibia from femur)
    metadata.json                                     backbone, text encoder, labels, training-set image
                                                      hashes, validation Dice per label, timestamp, mode,
                                                      serving settings chosen on validation (coarse_grow,
                                                      coarse_prompt)

It is written into a temporary sibling directory and renamed into place, so a crash leaves either
the whole adapter or nothing.

The :class:`AdapterStore` keeps numbered versions under one folder with a ``current`` pointer
(a small JSON file replaced atomically). :meth:`AdapterStore.promote` accepts a candidate only if
its validation Dice is not worse than the current adapter's on the same validation images;
:meth:`AdapterStore.rollback` returns to the previous promoted version. :func:`install_starter` gives an empty
store the *starter adapter* shipped in ``starter/`` (trained on public development films; its README.md) as its
first version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .io import write_atomic

LORA_TARGETS = r".*\.attn\.(qkv|proj)$"  # attention only: a plain ["qkv", "proj"] also hits patch_embed.proj
METADATA = "metadata.json"
FORMAT_VERSION = 1
STARTER = Path(__file__).with_name("starter")

logger = logging.getLogger(__name__)


class AdapterError(ValueError):
    """A missing, incomplete or incompatible adapter: the message names the directory and the problem."""


@dataclass
class Adapter:
    """An adapter loaded in memory (weights on CPU)."""

    path: Path
    metadata: dict
    head_state: dict[str, torch.Tensor]
    decoder_state: dict[str, torch.Tensor]
    priors: dict
    has_lora: bool

    @property
    def version(self) -> str:
        return str(self.metadata.get("version") or self.path.name)

    @property
    def val_dice(self) -> dict[str, float]:
        return dict(self.metadata.get("validation", {}).get("dice", {}))


def save_adapter(out_dir: str | Path, *, head: torch.nn.Module, decoder: torch.nn.Module,
                 encoder_peft: torch.nn.Module | None, priors: dict, metadata: dict) -> Path:
    """Write an adapter directory atomically (temporary sibling + rename). Returns its path.

    ``encoder_peft`` is the peft-wrapped image encoder (``PeftModel``) or None when the encoder was frozen.
    The decoder and the head are stored as float16 (half the size: a LoRA adapter of LiteMedSAM takes 9.4 MB,
    10.2 MB with a float32 head); callers that need bit-exact round trips evaluate the model *after*
    :func:`round_stored_` so training, validation and loading see the same weights.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise AdapterError(f"adapter directory already exists: {out_dir}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _staged(out_dir) as tmp:
        if encoder_peft is not None:
            encoder_peft.save_pretrained(str(tmp))
        save_file(_half(head), str(tmp / "head.safetensors"))
        save_file(_half(decoder), str(tmp / "decoder.safetensors"))
        (tmp / "priors.json").write_text(json.dumps(priors, indent=2))
        meta = {"format": FORMAT_VERSION, "encoder_lora": encoder_peft is not None, **metadata}
        meta.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        meta.setdefault("version", out_dir.name)
        meta["size_bytes"] = sum(p.stat().st_size for p in tmp.iterdir())
        meta["checksums"] = checksums(tmp)
        (tmp / METADATA).write_text(json.dumps(meta, indent=2))  # written last: its presence marks completeness
    return out_dir


@contextmanager
def _staged(out_dir: Path):
    """A temporary sibling of ``out_dir`` (``.<name>.*``, what :meth:`AdapterStore.cleanup_partial` removes) to fill
    in the block; its files are fsynced and it is renamed to ``out_dir`` when the block ends, removed when it raises."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield tmp
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _half(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous()
            for k, v in module.state_dict().items()}


def round_stored_(*modules: torch.nn.Module) -> None:
    """Round the float weights of ``modules`` (the head, the decoder) to float16 precision in place: what
    :func:`save_adapter` stores."""
    with torch.no_grad():
        for module in modules:
            for p in module.state_dict().values():
                if p.is_floating_point():
                    p.copy_(p.to(torch.float16).to(p.dtype))


def checksums(folder: Path) -> dict[str, str]:
    """SHA-256 of every file of an adapter directory but its metadata (which records them) and its card
    (``README.md``, text for people)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())
            if p.is_file() and p.name not in (METADATA, "README.md")}


def load_adapter(path: str | Path) -> Adapter:
    """Read an adapter directory; an AdapterError names what is missing, unreadable or does not match the checksums
    its metadata records (a file changed on disk, even one that still parses)."""
    from safetensors.torch import load_file

    path = Path(path)
    meta_path = path / METADATA
    if not path.is_dir():
        raise AdapterError(f"adapter not found: {path}")
    if not meta_path.is_file():
        raise AdapterError(f"incomplete adapter (no {METADATA}): {path}")
    try:
        metadata = json.loads(meta_path.read_text())
        recorded = metadata.get("checksums") or {}
        changed = sorted(name for name, digest in checksums(path).items() if name in recorded
                         and recorded[name] != digest) + sorted(set(recorded) - {p.name for p in path.iterdir()})
        if changed:
            raise AdapterError(f"adapter {path}: {', '.join(changed)} do(es) not match the checksums in its "
                               f"{METADATA} (changed or missing on disk)")
        head = {k: v.float() if v.is_floating_point() else v  # float16 on disk (float32 before 2026-11-30)
                for k, v in load_file(str(path / "head.safetensors")).items()}
        decoder = load_file(str(path / "decoder.safetensors"))
        priors = json.loads((path / "priors.json").read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"cannot read adapter {path}: {exc}") from exc
    has_lora = (path / "adapter_config.json").is_file()
    if bool(metadata.get("encoder_lora")) != has_lora:
        raise AdapterError(f"adapter {path}: metadata and files disagree about the encoder LoRA")
    return Adapter(path, metadata, head, decoder, priors, has_lora)


def lora_encoder(encoder: torch.nn.Module, adapter_path: str | Path | None = None, rank: int = 8,
                 alpha: int = 16, dropout: float = 0.0, trainable: bool = True, targets: str = LORA_TARGETS):
    """Wrap ``encoder`` with peft LoRA on its attention ``qkv``/``proj`` layers (``targets``, a regex over module
    names): fresh (for training) or loaded from ``adapter_path`` (for inference; the targets are the saved ones)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter_path is not None:
        return PeftModel.from_pretrained(encoder, str(adapter_path), is_trainable=trainable)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    return get_peft_model(encoder, config)


def compatibility_problem(metadata: dict, backbone, text_encoder) -> str | None:
    """Why an adapter with ``metadata`` does not fit ``backbone`` + ``text_encoder`` (a different backbone, backbone
    weights or text encoder), or None when it fits."""
    wanted = {"backbone": backbone.name, "backbone_checkpoint": os.path.basename(backbone.checkpoint or "random"),
              "text_encoder": text_encoder.name, "text_dim": text_encoder.dim}
    for key, value in wanted.items():
        if metadata.get(key) != value:
            return f"its {key} is {metadata.get(key)!r}, this model's is {value!r}"
    return None


def starter_adapter() -> Path | None:
    """The starter adapter shipped in the package (``lib/xray_textseg/starter/``: LiteMedSAM + MiniLM, trained on
    public chest and lower-limb films; its README.md says on which and how well it does), or None when missing."""
    return STARTER if (STARTER / METADATA).is_file() else None


def install_starter(store: AdapterStore, backbone, text_encoder) -> tuple[str | None, str]:
    """Make the packaged starter adapter the first version of an *empty* ``store`` when it fits ``backbone`` and
    ``text_encoder``. Returns (the installed version or None, why): a store that has versions is never touched."""
    if store.versions() or store.current():
        return None, f"{store.root} already has adapters"
    starter = starter_adapter()
    if starter is None:
        return None, f"no starter adapter in this installation ({STARTER})"
    problem = compatibility_problem(json.loads((starter / METADATA).read_text()), backbone, text_encoder)
    if problem:
        return None, f"the starter adapter does not fit: {problem}"
    version = store.install(starter, "starter adapter shipped with xray_textseg (public development films)")
    return version, f"installed the starter adapter as {version}"


# --- the store ----------------------------------------------------------------------------------------
class AdapterStore:
    """Versions ``v0001``, ``v0002``, ... under ``root``; ``current.json`` names the promoted one.

    ``history`` in ``current.json`` lists previously promoted versions (for :meth:`rollback`). All writes
    are atomic; a version directory is never modified or deleted by promotion or rollback.
    """

    POINTER = "current.json"

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._bad_pointer: float | None = None  # mtime of an unreadable current.json already reported

    # --- reading ---
    def versions(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and p.name.startswith("v") and (p / METADATA).is_file())

    def _pointer(self) -> dict:
        """``current.json``; an unreadable one (hand-edited, disk fault) is logged once and read as 'no
        adapter' so that serving falls back to zero-shot instead of failing; the next promotion replaces it."""
        p = self.root / self.POINTER
        if not p.is_file():
            return {"current": None, "history": []}
        try:
            data = json.loads(p.read_text())
            problem = None if isinstance(data, dict) and isinstance(data.get("history", []), list) else \
                "not an object with 'current' and a 'history' list"
        except (OSError, ValueError) as exc:
            problem = str(exc)
        if problem:
            stamp = p.stat().st_mtime if p.exists() else None
            if stamp != self._bad_pointer:
                self._bad_pointer = stamp
                logger.error("%s is unreadable (%s): no current adapter until the next promotion", p, problem)
            return {"current": None, "history": []}
        data.setdefault("current", None)
        data.setdefault("history", [])
        return data

    def pointer(self) -> dict:
        """The parsed ``current.json``: ``current`` (a version or None) and ``history`` (oldest first)."""
        return self._pointer()

    def current(self) -> str | None:
        return self._pointer()["current"]

    def fallback_order(self, pointer: dict | None = None) -> list[str]:
        """The current version, then the previously promoted ones newest first: what to serve, in order,
        when a version turns out unloadable (truncated or missing files)."""
        ptr = pointer if pointer is not None else self._pointer()
        return list(dict.fromkeys(v for v in [ptr.get("current"), *reversed(ptr.get("history", []))] if v))

    def current_path(self) -> Path | None:
        cur = self.current()
        return self.root / cur if cur else None

    def path(self, version: str) -> Path:
        return self.root / version

    def metadata(self, version: str) -> dict:
        return json.loads((self.root / version / METADATA).read_text())

    # --- writing ---
    def new_version_path(self) -> Path:
        """A fresh, unused version path (not created: :func:`save_adapter` creates it atomically)."""
        existing = [int(p.name[1:]) for p in self.root.iterdir() if p.name[:1] == "v" and p.name[1:].isdigit()]
        return self.root / f"v{max(existing, default=0) + 1:04d}"

    def _write_pointer(self, data: dict) -> None:
        write_atomic(self.root / self.POINTER, json.dumps(data, indent=2).encode())

    def set_current(self, version: str, reason: str, figures: dict | None = None) -> None:
        with self._lock:
            if not (self.root / version / METADATA).is_file():
                raise AdapterError(f"no complete adapter {version} in {self.root}")
            ptr = self._pointer()
            if ptr["current"] and ptr["current"] != version:
                ptr["history"].append(ptr["current"])
            ptr["current"] = version
            ptr.setdefault("log", []).append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "version": version,
                                              "reason": reason, **({"dice": figures} if figures else {})})
            self._write_pointer(ptr)

    def promote(self, candidate: str, candidate_dice: float, current_dice: float | None,
                tolerance: float = 0.0) -> tuple[bool, str]:
        """Make ``candidate`` current if its mean validation Dice is not worse than the current adapter's
        on the same images (``current_dice``; None when there is no current adapter). Returns (promoted, why)."""
        if current_dice is not None and candidate_dice + tolerance < current_dice:
            why = (f"kept {self.current()}: candidate {candidate} validation Dice {candidate_dice:.4f} < "
                   f"current {current_dice:.4f} on the same images")
            self._append_log(candidate, "rejected: " + why)
            return False, why
        why = (f"promoted {candidate}: validation Dice {candidate_dice:.4f}"
               + (f" >= current {current_dice:.4f}" if current_dice is not None else " (first adapter)"))
        self.set_current(candidate, why)
        return True, why

    def record(self, candidate: str, promoted: bool, why: str, figures: dict | None = None) -> None:
        """A gate's decision on ``candidate`` (:mod:`gate`): promoted (made current) or refused, in the history
        with the per-label figures it was made on."""
        if promoted:
            self.set_current(candidate, why, figures)
        else:
            self._append_log(candidate, "rejected: " + why, figures)

    def rollback(self) -> str | None:
        """Go back to the previously promoted version; returns it (None when there is none)."""
        with self._lock:
            ptr = self._pointer()
            if not ptr["history"]:
                return None
            prev = ptr["history"].pop()
            ptr["current"] = prev
            ptr.setdefault("log", []).append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "version": prev,
                                              "reason": "rollback"})
            self._write_pointer(ptr)
            return prev

    def _append_log(self, version: str, reason: str, figures: dict | None = None) -> None:
        with self._lock:
            ptr = self._pointer()
            ptr.setdefault("log", []).append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "version": version,
                                              "reason": reason, **({"dice": figures} if figures else {})})
            self._write_pointer(ptr)

    def install(self, source: str | Path, reason: str) -> str:
        """Copy the complete adapter ``source`` into the store as a new version and make it current (the starter
        adapter of an empty store). Atomic like :func:`save_adapter`: a crash leaves no version, only debris that
        :meth:`cleanup_partial` removes. Returns the version."""
        load_adapter(source)  # AdapterError when incomplete
        dest = self.new_version_path()
        with _staged(dest) as tmp:
            for p in Path(source).iterdir():
                if p.is_file() and p.name != METADATA:
                    shutil.copyfile(p, tmp / p.name)
            meta = json.loads((Path(source) / METADATA).read_text())
            meta.update(version=dest.name, installed_from=str(source), installed=time.strftime("%Y-%m-%dT%H:%M:%S"),
                        checksums=meta.get("checksums") or checksums(tmp))
            (tmp / METADATA).write_text(json.dumps(meta, indent=2))  # last, as save_adapter writes it
        self.set_current(dest.name, reason)
        return dest.name

    def cleanup_partial(self) -> list[str]:
        """Remove temporary directories left by an interrupted save (never a complete version)."""
        removed = []
        for p in self.root.iterdir():
            if p.is_dir() and p.name.startswith(".v"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
        return removed
