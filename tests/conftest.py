"""Shared fixtures: paths, the packaged LiteMedSAM predictor (loaded once), the real-data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"
REAL = Path(os.environ.get("XRAY_REAL", REPO.parent / "shared" / "xray_real"))


def real_dir(name: str) -> Path:
    """``../shared/xray_real/<name>``, or skip the test when it is not there (fresh machines, forks)."""
    path = REAL / name
    if not path.is_dir():
        pytest.skip(f"real data not available: {path}")
    return path


@pytest.fixture(scope="session")
def predictor():
    from xray_textseg.predictor import build_predictor

    return build_predictor(device="cpu")


@pytest.fixture
def fresh_predictor(predictor):
    """The session predictor with empty caches and no adapter, restored after the test."""
    predictor.cache.clear()
    predictor.results.clear()
    yield predictor
    predictor.unload_adapter() if hasattr(predictor, "unload_adapter") else None
    predictor.cache.clear()
    predictor.results.clear()


def randomize_lora(peft, seed: int, b_scale: float) -> None:
    """Draw a peft LoRA's A and B matrices from ``seed`` (a fresh LoRA's B is zero, so it computes what the base
    encoder does): an adapter encoder that computes something else. A ~ N(0, 0.1), B ~ N(0, ``b_scale``)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, w in peft.named_parameters():
            if "lora_" in name:
                w.copy_(torch.randn(w.shape, generator=g) * (b_scale if "lora_B" in name else 0.1))
