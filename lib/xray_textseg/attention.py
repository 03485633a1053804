"""Fused attention for segment_anything's ViT image encoder (MedSAM / SAM ViT-B).

segment_anything's ``Attention`` computes ``softmax(q k^T * scale + rel_pos) v`` step by step: the
(heads, N, N) score matrix is written, the relative-position terms are added to it, it is soft-maxed into a
second matrix, and autograd keeps both for the backward pass. At 1024 px the encoder's four global blocks
attend over N = 64 x 64 = 4096 tokens, so each keeps 12 x 4096 x 4096 scores per image (0.8 GB in fp32, twice):
that is where ViT-B training's memory goes. :class:`FusedAttention` computes the same function with
``torch.nn.functional.scaled_dot_product_attention`` (fused kernels on CUDA, bf16 included; the fused CPU kernel
elsewhere). The relative-position term, decomposed into a row part ``rel_h[i, kh]`` and a column part
``rel_w[i, kw]``, goes in one of two ways (``rel_pos``):

- ``bias``: added as the kernel's attention mask. One (heads, N, N) tensor is materialised, the softmax is not.
- ``fold``: folded into longer queries and keys, ``q' = [q * scale, rel_h, rel_w]`` and ``k' = [k, onehot(kh),
  onehot(kw)]``, so ``q'.k'`` is the biased score and no N x N tensor exists at all (memory linear in N; the
  memory-efficient CUDA kernel takes keys longer than the values). The CPU kernels want equal lengths, so
  there it would fall back to the step-by-step path.

``auto`` (the default) folds on CUDA; on the CPU it uses the mask without gradients (inference: 1.4x faster and
40 % less memory for a fp32 ViT-B encode on 2 cores) and segment_anything's own steps with them, since the CPU
kernels take the mask's gradient the slow way (bf16 LoRA training measured 0.04 against 0.07 images/s, 9.2 against
6.7 GB; docs/performance.md). Gradients reach q through both ways, so the encoder's LoRA in ``qkv`` trains as
before. The swap changes the module's class, not its parameters: state dicts,
checkpoints and peft's target names (``qkv``, ``proj``) stay as they are. Shapes: x (B, H, W, dim) -> (B, H, W, dim).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import nn

REL_POS_MODES = ("auto", "bias", "fold")


class FusedAttention(Attention):
    """segment_anything's ViT attention through ``scaled_dot_product_attention``; same weights, same outputs."""

    rel_pos: str = "auto"  # how the relative-position term goes in: auto | bias | fold (module docstring)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rel_pos == "auto" and not x.is_cuda and torch.is_grad_enabled():
            return super().forward(x)  # CPU training: the plain steps are faster there (module docstring)
        b, h, w, _ = x.shape
        # (3, B, heads, N, head_dim)
        q, k, v = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        elif self.rel_pos == "fold" or (self.rel_pos == "auto" and x.is_cuda):
            q, k = fold_rel_pos(q, k, self.rel_pos_h, self.rel_pos_w, (h, w), self.scale)
            out = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        else:
            bias = rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, -1))


def _rel_pos_terms(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                   size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """segment_anything's decomposed relative positions for q (B, heads, H*W, C): the row term (B, heads, H*W, H)
    and the column term (B, heads, H*W, W), in q's dtype."""
    h, w = size
    b, n, _, c = q.shape
    r_q = q.reshape(b, n, h, w, c)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, get_rel_pos(h, h, rel_pos_h).to(q.dtype))
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, get_rel_pos(w, w, rel_pos_w).to(q.dtype))
    return rel_h.reshape(b, n, h * w, h), rel_w.reshape(b, n, h * w, w)


def rel_pos_bias(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                 size: tuple[int, int]) -> torch.Tensor:
    """The relative-position term of segment_anything's ``add_decomposed_rel_pos`` as an additive attention mask:
    q (B, heads, H*W, C) -> (B, heads, H*W, H*W), in q's dtype."""
    h, w = size
    rel_h, rel_w = _rel_pos_terms(q, rel_pos_h, rel_pos_w, size)
    b, n, length, _ = rel_h.shape
    return (rel_h.reshape(b, n, length, h, 1) + rel_w.reshape(b, n, length, 1, w)).reshape(b, n, length, h * w)


def fold_rel_pos(q: torch.Tensor, k: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                 size: tuple[int, int], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys whose plain dot product is the scaled, relative-position-biased score: q (B, heads, H*W, C)
    -> q' = [q * scale, rel_h, rel_w, 0...], k' = [k, onehot(key row), onehot(key column), 0...], both
    (B, heads, H*W, C'), with C' = C + H + W rounded up to a multiple of 8 (the fused kernels' alignment)."""
    h, w = size
    rel_h, rel_w = _rel_pos_terms(q, rel_pos_h, rel_pos_w, size)
    b, n, length, c = q.shape
    pad = -(c + h + w) % 8
    rows = torch.eye(h, dtype=q.dtype, device=q.device).repeat_interleave(w, dim=0)  # key (kh, kw) -> e_kh
    cols = torch.eye(w, dtype=q.dtype, device=q.device).repeat(h, 1)  # key (kh, kw) -> e_kw
    keys = torch.cat([rows, cols, rows.new_zeros(length, pad)], dim=1).expand(b, n, length, h + w + pad)
    q2 = torch.cat([q * scale, rel_h, rel_w, q.new_zeros(b, n, length, pad)], dim=-1)
    return q2, torch.cat([k, keys], dim=-1)


def use_fused_attention(encoder: nn.Module, rel_pos: str = "auto") -> int:
    """Make every segment_anything ``Attention`` in ``encoder`` a :class:`FusedAttention` (in place) whose relative
    positions go in as ``rel_pos`` says (auto | bias | fold); returns how many modules changed class."""
    if rel_pos not in REL_POS_MODES:
        raise ValueError(f"rel_pos {rel_pos!r}: one of {', '.join(REL_POS_MODES)}")
    changed = 0
    for module in encoder.modules():
        if type(module) is Attention:
            module.__class__ = FusedAttention
            changed += 1
        if type(module) is FusedAttention:
            module.rel_pos = rel_pos
    return changed


def use_plain_attention(encoder: nn.Module) -> int:
    """Undo :func:`use_fused_attention` (segment_anything's own step-by-step attention, for comparisons)."""
    changed = 0
    for module in encoder.modules():
        if type(module) is FusedAttention:
            module.__class__ = Attention
            changed += 1
    return changed
