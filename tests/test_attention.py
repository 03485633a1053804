"""Fused ViT attention (xray_textseg.attention) computes what segment_anything's own attention computes: outputs
and gradients, through the encoder's LoRA too, on a small real segment_anything ViT (windowed and global blocks,
relative positions), with the relative positions as a mask (the CPU default) and folded into queries and keys (the
CUDA default)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import randomize_lora
from segment_anything.modeling.image_encoder import Attention, ImageEncoderViT
from xray_textseg.adapters import lora_encoder
from xray_textseg.attention import FusedAttention, use_fused_attention, use_plain_attention
from xray_textseg.backbones import build_backbone


def small_vit(seed: int = 0) -> ImageEncoderViT:
    """segment_anything's ViT encoder, small: 8 x 8 tokens, blocks 0 and 2 windowed (4 x 4, padded), block 1 global,
    relative positions drawn at random (they start at zero, which would hide a wrong bias)."""
    torch.manual_seed(seed)
    vit = ImageEncoderViT(img_size=128, patch_size=16, embed_dim=64, depth=3, num_heads=4, out_chans=32,
                          use_rel_pos=True, window_size=3, global_attn_indexes=(1,))
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if "rel_pos" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    return vit.double().eval()


@pytest.mark.parametrize("rel_pos", ["bias", "fold"])
def test_fused_attention_gives_the_same_outputs_and_gradients(rel_pos):
    plain = small_vit()
    fused = copy.deepcopy(plain)
    assert use_fused_attention(fused, rel_pos) == 3 and use_fused_attention(fused, rel_pos) == 0
    assert all(type(m) is FusedAttention and m.rel_pos == rel_pos for m in fused.modules() if isinstance(m, Attention))
    assert plain.state_dict().keys() == fused.state_dict().keys()
    x = torch.rand(2, 3, 128, 128, dtype=torch.float64)
    outs, grads = [], []
    for vit in (plain, fused):
        y = vit(x)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
        outs.append(y.detach())
        grads.append({n: p.grad.clone() for n, p in vit.named_parameters()})
    assert outs[0].abs().max() > 0.1
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-9, atol=1e-9)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:  # qkv, proj and the relative positions of every block included
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-7, atol=1e-9, msg=name)
    assert use_plain_attention(fused) == 3 and not any(type(m) is FusedAttention for m in fused.modules())


@pytest.mark.parametrize("rel_pos", ["bias", "fold"])
def test_fused_attention_under_lora_trains_the_same_lora(rel_pos):
    plain = small_vit(1)
    fused = copy.deepcopy(plain)
    use_fused_attention(fused, rel_pos)
    x = torch.rand(1, 3, 128, 128, dtype=torch.float64)
    grads = []
    for vit in (plain, fused):
        peft = lora_encoder(vit, rank=4, alpha=8)
        randomize_lora(peft, seed=3, b_scale=0.05)
        names = [n for n, _ in peft.named_parameters() if "lora_" in n]
        assert any(".attn.qkv." in n for n in names) and any(".attn.proj." in n for n in names)
        assert not any("patch_embed" in n for n in names)
        peft(x.to(next(peft.parameters()).dtype)).square().mean().backward()
        grads.append({n: p.grad.double() for n, p in peft.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 12  # 3 blocks x (qkv, proj) x (A, B)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-9, msg=name)


@pytest.mark.parametrize("rel_pos", ["bias", "fold"])
def test_fused_attention_in_bf16_autocast_stays_close(rel_pos):
    plain = small_vit(2).float()
    fused = copy.deepcopy(plain)
    use_fused_attention(fused, rel_pos)
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        ref = plain(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fused(x).float()
    err = (got - ref).norm() / ref.norm()
    assert err < 2e-2, err  # bf16 operands: 1e-3 .. 1e-2


def test_vit_b_is_built_with_fused_attention():
    bb = build_backbone("medsam_vit_b", None, allow_random=True)
    kinds = [type(m) for m in bb.image_encoder.modules() if isinstance(m, Attention)]
    assert kinds == [FusedAttention] * 12
    with pytest.raises(ValueError, match="rel_pos"):
        use_fused_attention(bb.image_encoder, "flash")


def test_auto_keeps_the_plain_steps_for_cpu_training_and_fuses_cpu_inference():
    plain = small_vit(4)
    fused = copy.deepcopy(plain)
    use_fused_attention(fused)  # auto
    x = torch.rand(1, 3, 128, 128, dtype=torch.float64)
    assert torch.equal(fused(x), plain(x))  # with gradients: segment_anything's own steps, to the bit
    with torch.inference_mode():
        ref, got = plain(x), fused(x)
    assert not torch.equal(got, ref)  # without: the fused kernel (another summation order)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
