"""Backbone wiring: packaged LiteMedSAM and a randomly initialised ViT-B (no checkpoint download)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import randomize_lora
from xray_textseg.backbones import BackboneError, Interrupted, build_backbone, interruptible, resolve_device
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
        (graph,) = _encoder_graphs(tmp_path)
        fast = bb.encode(x)
    assert fast.shape == ref.shape and float((fast - ref).abs().max()) < 1e-4
    assert not torch.equal(fast, ref)  # a different engine ran (PyTorch would be bit-identical)
    inode = graph.stat().st_ino  # a new export would replace the file (os.replace: a new inode)
    again = build_backbone(device="cpu")
    assert again.enable_onnxruntime(tmp_path)  # reuses the graph on disk
    assert graph.stat().st_ino == inode and sorted(tmp_path.iterdir()) == sorted(tmp_path.glob("*.onnx"))
    assert len(list(tmp_path.iterdir())) == 2  # the encoder's graph and the decoder's, nothing half-written
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
    (graph,) = _encoder_graphs(tmp_path)
    graph.write_bytes(b"not an onnx graph")
    broken = build_backbone(device="cpu")
    assert not broken.enable_onnxruntime(tmp_path) and broken._ort is None  # PyTorch, with a warning
    x = torch.rand(1, 3, 256, 256)
    with torch.inference_mode():
        assert torch.equal(broken.encode(x), broken.image_encoder(x))
    assert not graph.exists()  # removed, so the next start exports it again
    assert build_backbone(device="cpu").enable_onnxruntime(tmp_path) and graph.stat().st_size > 1e6


def _encoder_graphs(folder):
    """The base encoders' graphs (not the decoders', not the adapters' merged encoders')."""
    return [p for p in folder.glob("*.onnx") if "_decoder_" not in p.name and "_encoder_" not in p.name]


def _merged_lora(bb, seed=0):
    """An adapter's encoder as ``Predictor.load_adapter`` makes it: a LoRA merged into a copy of the base encoder,
    its A and B matrices drawn from ``seed`` (a fresh LoRA's B is zero) so that it computes something else."""
    import copy

    from xray_textseg.adapters import lora_encoder

    peft = lora_encoder(copy.deepcopy(bb.image_encoder))
    randomize_lora(peft, seed, b_scale=0.05)
    return peft.merge_and_unload().eval()


def test_an_adapters_merged_encoder_encodes_through_its_own_graph(tmp_path):
    from xray_textseg.backbones import KEEP_ADAPTER_ENCODER_SESSIONS

    bb = build_backbone(device="cpu")
    base = bb.image_encoder
    x = View.full((300, 200), 256, stretch=False).model_input(np.random.default_rng(3).random((300, 200)))
    merged = _merged_lora(bb)
    with torch.inference_mode():
        base_ref, ref = base(x), merged(x)
    assert float((ref - base_ref).abs().max()) > 1e-2  # the LoRA changes the embedding
    assert not bb.prepare_onnxruntime_encoder(merged)  # ONNX Runtime off: nothing exported
    assert bb.enable_onnxruntime(tmp_path)
    assert bb.prepare_onnxruntime_encoder(merged)
    (graph,) = tmp_path.glob("*_encoder_*.onnx")
    bb.image_encoder = merged  # installed, as load_adapter does
    with torch.inference_mode():
        fast = bb.encode(x)
        assert float((fast - ref).abs().max()) < 1e-4 and not torch.equal(fast, ref)  # ONNX Runtime answered
        bb.image_encoder = base  # unloaded: the base graph answers again
        back = bb.encode(x)
        assert float((back - base_ref).abs().max()) < 1e-4 and not torch.equal(back, base_ref)
    # the same adapter in another process (the server, after the training run that validated it): the graph on
    # disk is reused, nothing exported again
    inode = graph.stat().st_ino
    server = build_backbone(device="cpu")
    assert server.enable_onnxruntime(tmp_path)
    same = _merged_lora(server)
    assert server.prepare_onnxruntime_encoder(same)
    assert graph.stat().st_ino == inode and len(list(tmp_path.glob("*_encoder_*.onnx"))) == 1
    server.image_encoder = same
    with torch.inference_mode():
        assert torch.equal(server.encode(x), fast)
    # weights changed in place after the export: PyTorch answers, not the stale graph
    bb.image_encoder = merged
    with torch.no_grad():
        next(merged.parameters()).mul_(0.5)
    with torch.inference_mode():
        assert torch.equal(bb.encode(x), merged(x))
    # every newer adapter gets a graph of its own; only the newest sessions are kept
    for seed in range(1, KEEP_ADAPTER_ENCODER_SESSIONS + 2):
        assert bb.prepare_onnxruntime_encoder(_merged_lora(bb, seed))
    assert len(bb._ort_adapter_encoders) == KEEP_ADAPTER_ENCODER_SESSIONS
    assert len(list(tmp_path.glob("*_encoder_*.onnx"))) == KEEP_ADAPTER_ENCODER_SESSIONS + 2
    assert len(_encoder_graphs(tmp_path)) == 1  # the base graph is another kind: never pruned for adapters


def _decode_inputs(bb, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(1, 256, 64, 64, generator=g)
    boxes = torch.tensor([[20.0, 30.0, 120.0, 200.0], [100.0, 40.0, 230.0, 220.0], [60.0, 60.0, 90.0, 90.0]])[:n]
    tokens = torch.randn(n, 4, 256, generator=g)  # as a text head appends them
    with torch.inference_mode():
        sparse, dense = bb.prompt_embeddings(n, boxes=boxes, tokens=tokens)
    return emb, sparse, dense


def _torch_decode(bb, emb, sparse, dense):
    with torch.inference_mode():
        logits, iou = bb.mask_decoder(image_embeddings=emb, image_pe=bb.prompt_encoder.get_dense_pe(),
                                      sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                      multimask_output=False)
    return logits, iou[:, 0]


def test_onnxruntime_decoder_matches_pytorch_and_follows_the_weights(tmp_path):
    import copy

    bb = build_backbone(device="cpu")
    assert bb.enable_onnxruntime(tmp_path)
    (graph,) = tmp_path.glob("*_decoder_*.onnx")
    emb, sparse, dense = _decode_inputs(bb)
    ref = _torch_decode(bb, emb, sparse, dense)
    with torch.inference_mode():
        fast = bb.decode(emb, sparse, dense)
        batched = bb.decode(emb.repeat(3, 1, 1, 1), sparse, dense)  # one embedding per prompt (the fine pass)
    for got in (fast, batched):
        assert got[0].shape == ref[0].shape and got[1].shape == ref[1].shape == (3,)
        assert float((got[0] - ref[0]).abs().max()) < 1e-3 and float((got[1] - ref[1]).abs().max()) < 1e-4
    assert not torch.equal(fast[0], ref[0])  # ONNX Runtime answered (PyTorch would be bit-identical)
    assert ((fast[0] > 0) == (ref[0] > 0)).float().mean() > 0.999

    # decoding with gradients (training) stays in PyTorch
    out = bb.decode(emb, sparse.clone().requires_grad_(), dense)
    assert out[0].grad_fn is not None

    # weights changed in place (an optimiser step, load_state_dict): the old graph no longer answers ...
    with torch.no_grad():
        next(bb.mask_decoder.parameters()).mul_(0.5)
    changed = _torch_decode(bb, emb, sparse, dense)
    with torch.inference_mode():
        assert torch.equal(bb.decode(emb, sparse, dense)[0], changed[0])
    # ... until the decoder is prepared again: a second graph, for the new weights
    assert bb.prepare_onnxruntime_decoder()
    assert len(list(tmp_path.glob("*_decoder_*.onnx"))) == 2 and graph.exists()
    with torch.inference_mode():
        again = bb.decode(emb, sparse, dense)
    assert not torch.equal(again[0], changed[0]) and float((again[0] - changed[0]).abs().max()) < 1e-3

    # another decoder module (an adapter's) is not answered by a graph made for a different module
    other = copy.deepcopy(bb.mask_decoder)
    bb.mask_decoder = other
    with torch.inference_mode():
        assert torch.equal(bb.decode(emb, sparse, dense)[0], _torch_decode(bb, emb, sparse, dense)[0])
    # a copied backbone (the trainer copies it) shares the sessions and follows its own copy of the decoder
    assert bb.prepare_onnxruntime_decoder()  # same weights as the second graph: reused from disk, no new file
    assert len(list(tmp_path.glob("*_decoder_*.onnx"))) == 2
    cp = copy.deepcopy(bb)
    assert cp._ort_decoders[-1].source is cp.mask_decoder
    assert cp._ort_decoders[-1].session is bb._ort_decoders[-1].session
    with torch.inference_mode():
        assert torch.equal(cp.decode(emb, sparse, dense)[0], again[0])


def test_graphs_on_disk_are_pruned(tmp_path):
    import os

    from xray_textseg.backbones import KEEP_ADAPTER_ENCODER_GRAPHS, KEEP_DECODER_GRAPHS, KEEP_ENCODER_GRAPHS

    def old_graphs(pattern, n):  # graphs of adapters retrained long ago, of venvs since removed
        for i in range(n):
            old = tmp_path / pattern.format(i)
            old.write_bytes(b"old")
            os.utime(old, ns=(i * 10**9, i * 10**9))

    old_graphs("litemedsam_decoder_{:016d}_torch0.onnx", KEEP_DECODER_GRAPHS + 3)
    old_graphs("litemedsam_{:012d}_256_torch0.onnx", KEEP_ENCODER_GRAPHS + 2)
    old_graphs("litemedsam_encoder_{:016d}_256_torch0.onnx", KEEP_ADAPTER_ENCODER_GRAPHS + 1)
    (tmp_path / "notes.txt").write_text("not a graph")
    bb = build_backbone(device="cpu")
    assert bb.enable_onnxruntime(tmp_path)
    decoders = {p.name for p in tmp_path.glob("*_decoder_*.onnx")}
    encoders = {p.name for p in _encoder_graphs(tmp_path)}
    assert len(decoders) == KEEP_DECODER_GRAPHS and len(encoders) == KEEP_ENCODER_GRAPHS
    assert len(list(tmp_path.glob("*_encoder_*.onnx"))) == KEEP_ADAPTER_ENCODER_GRAPHS + 1  # not exported to yet
    assert bb.prepare_onnxruntime_encoder(_merged_lora(bb))
    adapters = {p.name for p in tmp_path.glob("*_encoder_*.onnx")}
    assert len(adapters) == KEEP_ADAPTER_ENCODER_GRAPHS
    assert adapters - {bb._ort_adapter_encoders[-1].path.name} == {
        f"litemedsam_encoder_{i:016d}_256_torch0.onnx" for i in range(2, KEEP_ADAPTER_ENCODER_GRAPHS + 1)}
    # the new graphs and the most recently used old ones stay
    assert decoders - {bb._ort_decoders[-1].path.name} == {
        f"litemedsam_decoder_{i:016d}_torch0.onnx" for i in range(4, KEEP_DECODER_GRAPHS + 3)}
    assert encoders - {bb._ort.path.name} == {
        f"litemedsam_{i:012d}_256_torch0.onnx" for i in range(3, KEEP_ENCODER_GRAPHS + 2)}
    assert (tmp_path / "notes.txt").exists()


def test_an_interrupted_onnxruntime_run_raises_and_later_runs_are_unaffected(predictor):
    """Background warm-up gives way to a request by ending its ONNX Runtime runs (Interrupted); runs outside the
    interruptible block, and afterwards, are untouched."""
    bb = predictor.backbone
    assert bb._ort is not None and bb._ort_decoders, "the served CPU predictor runs ONNX Runtime"
    x = View.full((300, 200), 256, stretch=False).model_input(np.random.default_rng(2).random((300, 200)))
    emb, sparse, dense = _decode_inputs(bb, n=2)
    with torch.inference_mode():
        ref = bb.encode(x)
        with interruptible() as handle:
            threading.Timer(0.2, handle.interrupt).start()  # from another thread, as a request does
            with pytest.raises(Interrupted):
                for _ in range(100):
                    bb.encode(x)
            with pytest.raises(Interrupted):  # every later run of the block too
                bb.decode(emb, sparse, dense)
        assert torch.equal(bb.encode(x), ref)
        with interruptible():
            assert torch.equal(bb.encode(x), ref)
