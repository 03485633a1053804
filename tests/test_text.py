"""Text encoder (packaged MiniLM, offline) and the prompt head's laterality and trained-state guard."""

from __future__ import annotations

import pytest
import torch
from xray_textseg.text import PromptHead, TextEncoder, TextEncoderError, head_inputs, side_code
from xray_textseg.vocabulary import parse_prompt


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder()


def test_minilm_embeds_offline(encoder):
    e = encoder.encode(["left lung", "heart", "left lung"])
    assert e.shape == (3, encoder.dim) and encoder.dim == 384
    assert torch.allclose(e[0], e[2])
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_laterality_comes_from_the_side_code(encoder):
    """MiniLM barely separates left from right; the head's input must, through the side code."""
    left, right = parse_prompt("left lung")[0], parse_prompt("lung, right")[0]
    emb, sides = head_inputs(encoder, [left, right])
    cos = float(torch.nn.functional.cosine_similarity(emb[0], emb[1], dim=0))
    assert cos > 0.8  # the encoder alone would confuse them
    assert torch.equal(sides[0], side_code("left")) and torch.equal(sides[1], side_code("right"))
    head = PromptHead(encoder.dim)
    tokens = head(emb, sides)
    assert tokens.shape == (2, 4, 256)
    assert not torch.allclose(tokens[0], tokens[1])


def test_synonyms_give_the_same_head_input(encoder):
    a = head_inputs(encoder, parse_prompt("L lung"))
    b = head_inputs(encoder, parse_prompt("left lung field"))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_untrained_head_is_refused():
    head = PromptHead(384)
    with pytest.raises(RuntimeError, match="untrained"):
        head.check_trained()
    head.trained.fill_(True)
    head.check_trained()
    state = head.state_dict()
    assert bool(state["trained"])


def test_missing_text_encoder_path(tmp_path):
    with pytest.raises(TextEncoderError, match="not found"):
        TextEncoder(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TextEncoderError, match="cannot load"):
        TextEncoder(str(tmp_path / "empty"))
