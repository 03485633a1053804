"""Backbone wiring: packaged LiteMedSAM and a randomly initialised ViT-B (no checkpoint download)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from xray_textseg.backbones import BackboneError, build_backbone, resolve_device
from xray_textseg.transforms import View


def test_litemedsam_shapes(predictor):
    bb = predictor.backbone
    assert bb.name == "litemedsam" and bb.input_size == 256
    x = View.full((300, 200), 256, stretch=False).model_input(np.random.default_rng(0).random((300, 200)))
    assert x.shape == (1, 3, 256, 256) and float(x.min()) >= 0 and float(x.max()) <= 1
    with torch.inference_mode():
        emb = bb.encode(x)
        assert emb.shape == (1, 256, 64, 64)
        sparse, dense = bb.prompt_embeddings(2, boxes=torch.tensor([[10, 10, 100, 100], [50, 50, 200, 200.]]))
        logits, iou = bb.decode(emb.expand(2, -1, -1, -1), sparse, dense)
    assert logits.shape == (2, 1, 256, 256) and iou.shape == (2,)


def test_text_tokens_are_appended(predictor):
    bb = predictor.backbone
    with torch.inference_mode():
        sparse, dense = bb.prompt_embeddings(3, boxes=None, tokens=torch.zeros(3, 4, 256))
    assert sparse.shape == (3, 4, 256) and dense.shape == (3, 256, 64, 64)


@pytest.mark.slow
def test_vit_b_random_wiring():
    bb = build_backbone("medsam_vit_b", None, allow_random=True)
    assert bb.input_size == 1024 and bb.stretch
    x = View.full((512, 256), 1024, stretch=True).model_input(np.random.default_rng(0).random((512, 256)))
    with torch.inference_mode():
        emb = bb.encode(x)
        sparse, dense = bb.prompt_embeddings(2, boxes=torch.tensor([[10, 10, 500, 500], [100, 100, 900, 900.]]))
        logits, iou = bb.decode(emb, sparse, dense)  # one embedding, many prompts
    assert emb.shape == (1, 256, 64, 64) and logits.shape == (2, 1, 256, 256)


def test_vit_b_without_checkpoint_is_refused():
    with pytest.raises(BackboneError, match="needs a checkpoint"):
        build_backbone("medsam_vit_b", None)


def test_bad_backbone_inputs(tmp_path):
    with pytest.raises(BackboneError, match="unknown backbone"):
        build_backbone("vit_h")
    with pytest.raises(BackboneError, match="not found"):
        build_backbone("litemedsam", str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="cannot read"):
        build_backbone("litemedsam", str(bad))
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(BackboneError, match="does not fit"):
        build_backbone("litemedsam", str(tmp_path / "other.pth"))


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(BackboneError):
        resolve_device("tpu")


def test_onnxruntime_encoder_matches_pytorch_and_is_exported_once(tmp_path):
    bb = build_backbone(device="cpu")
    x = View.full((300, 200), 256, stretch=False).model_input(np.random.default_rng(1).random((300, 200)))
    with torch.inference_mode():
        ref = bb.image_encoder(x)
        assert bb.enable_onnxruntime(tmp_path)
        (graph,) = tmp_path.glob("*.onnx")
        fast = bb.encode(x)
    assert fast.shape == ref.shape and float((fast - ref).abs().max()) < 1e-4
    assert not torch.equal(fast, ref)  # a different engine ran (PyTorch would be bit-identical)
    stamp = graph.stat().st_mtime_ns
    again = build_backbone(device="cpu")
    assert again.enable_onnxruntime(tmp_path)  # reuses the graph on disk
    assert graph.stat().st_mtime_ns == stamp and [p.name for p in tmp_path.iterdir()] == [graph.name]
    with torch.inference_mode():
        assert torch.equal(again.encode(x), fast)


def test_onnxruntime_leaves_other_encodes_to_pytorch(tmp_path):
    import copy

    bb = build_backbone(device="cpu")
    assert bb.enable_onnxruntime(tmp_path)
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = bb.image_encoder(x)
        assert torch.equal(bb.encode(torch.cat([x, x]))[:1], bb.image_encoder(torch.cat([x, x]))[:1])  # a batch
    out = bb.encode(x.requires_grad_())  # training through the encoder needs PyTorch's autograd
    assert out.grad_fn is not None and torch.equal(out.detach(), ref)
    # a different encoder (as a LoRA adapter installs) is never answered by the exported graph
    other = copy.deepcopy(bb.image_encoder)
    with torch.no_grad():
        next(other.parameters()).mul_(0.5)
    bb.image_encoder = other
    with torch.inference_mode():
        assert torch.equal(bb.encode(x), other(x)) and not torch.allclose(bb.encode(x), ref, atol=1e-3)
    # a copied backbone (the trainer copies it) follows its own copy of the encoder
    cp = copy.deepcopy(build_backbone(device="cpu"))
    assert cp._ort is None
    base = build_backbone(device="cpu")
    assert base.enable_onnxruntime(tmp_path)
    cp = copy.deepcopy(base)
    assert cp._ort.source is cp.image_encoder and cp._ort.session is base._ort.session


def test_broken_onnx_graph_falls_back_then_is_rebuilt(tmp_path):
    bb = build_backbone(device="cpu")
    assert bb.enable_onnxruntime(tmp_path)
    (graph,) = tmp_path.glob("*.onnx")
    graph.write_bytes(b"not an onnx graph")
    broken = build_backbone(device="cpu")
    assert not broken.enable_onnxruntime(tmp_path) and broken._ort is None  # PyTorch, with a warning
    x = torch.rand(1, 3, 256, 256)
    with torch.inference_mode():
        assert torch.equal(broken.encode(x), broken.image_encoder(x))
    assert not graph.exists()  # removed, so the next start exports it again
    assert build_backbone(device="cpu").enable_onnxruntime(tmp_path) and graph.stat().st_size > 1e6
