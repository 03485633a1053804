"""Fused attention for segment_anything's ViT image encoder (MedSAM / SAM ViT-B).

segment_anything's ``Attention`` computes ``softmax(q k^T * scale + rel_pos) v`` step by step: the
(heads, N, N) score matrix is written, the relative-position terms are added to it, it is soft-maxed into a
second matrix, and autograd keeps both for the backward pass. At 1024 px the encoder's four global blocks
attend over N = 64 x 64 = 4096 tokens, so each keeps 12 x 4096 x 4096 scores per image (0.8 GB in fp32, twice):
that is where ViT-B training's memory goes. :class:`FusedAttention` computes the same function with
``torch.nn.functional.scaled_dot_product_attention`` (the fused kernels on CUDA, bf16 included; the fused CPU
kernel elsewhere), passing the decomposed relative-position bias as its additive mask. Only the bias
(built from q, so its gradient reaches the LoRA in ``qkv``) is materialised; the softmax is not.

The swap changes the module's class, not its parameters: state dicts, checkpoints and peft's target names
(``qkv``, ``proj``) stay as they are. Shapes: x (B, H, W, dim) -> (B, H, W, dim).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import nn


class FusedAttention(Attention):
    """segment_anything's ViT attention through ``scaled_dot_product_attention``; same weights, same outputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        # (3, B, heads, N, head_dim)
        q, k, v = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w)) if self.use_rel_pos else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, -1))


def rel_pos_bias(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                 size: tuple[int, int]) -> torch.Tensor:
    """The decomposed relative-position term of segment_anything's ``add_decomposed_rel_pos`` as an additive
    attention mask: q (B, heads, H*W, C) -> (B, heads, H*W, H*W), in q's dtype."""
    h, w = size
    b, n, _, c = q.shape
    r_q = q.reshape(b * n, h, w, c)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, get_rel_pos(h, h, rel_pos_h).to(q.dtype))
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, get_rel_pos(w, w, rel_pos_w).to(q.dtype))
    return (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(b, n, h * w, h * w)


def use_fused_attention(encoder: nn.Module) -> int:
    """Make every segment_anything ``Attention`` in ``encoder`` a :class:`FusedAttention` (in place); returns
    how many were changed. Idempotent."""
    changed = 0
    for module in encoder.modules():
        if type(module) is Attention:
            module.__class__ = FusedAttention
            changed += 1
    return changed


def use_plain_attention(encoder: nn.Module) -> int:
    """Undo :func:`use_fused_attention` (segment_anything's own step-by-step attention, for comparisons)."""
    changed = 0
    for module in encoder.modules():
        if type(module) is FusedAttention:
            module.__class__ = Attention
            changed += 1
    return changed
