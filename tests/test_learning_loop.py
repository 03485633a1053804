"""The learning loop through the real server on real chest films the starter never saw (slow: a training run
each): labels saved lungs-first (clavicles cut by the lungs) or as layers train without unlearning the clavicles,
labels written with an identity affine (read turned 180 degrees) are refused and change nothing. Driven by
``benchmarks/learning_loop.py``, which reports the same for every form."""

from __future__ import annotations

import sys

import pytest
from conftest import REPO, REAL, real_dir

sys.path.insert(0, str(REPO / "benchmarks"))

pytestmark = [pytest.mark.slow, pytest.mark.real_data]
POOL = REAL.parent / "xray_pool" / "jsrt_chest"
CONF = {"train_time_budget_min": "4"}


@pytest.fixture(scope="module")
def films():
    import json

    from learning_loop import cases

    held = real_dir("jsrt_chest")
    if not POOL.is_dir():
        pytest.skip(f"training pool not available: {POOL}")
    meta = json.loads((REPO / "lib" / "xray_textseg" / "starter" / "metadata.json").read_text())
    seen = set(meta["train_names"]) | set(meta["val_names"])
    return {"saved": [c for c in cases(POOL) if c not in seen][:8],
            "held": [c for c in cases(held) if c not in seen][:5], "held_dir": held}


@pytest.mark.parametrize("form", ["lungs_first", "layers"])
def test_no_label_is_unlearnt(films, form, tmp_path):
    from learning_loop import run_form

    res = run_form(form, POOL, films["saved"], films["held_dir"], films["held"], tmp_path, CONF)
    assert res["accepted"] == len(films["saved"]), res["refused"]
    assert res["run"]["status"] == "done", res["run"]
    for lab, change in res["change"].items():
        assert change > -0.01, (lab, res)


def test_labels_read_turned_are_refused_and_change_nothing(films, tmp_path):
    from learning_loop import run_form

    res = run_form("identity_affine", POOL, films["saved"], films["held_dir"], films["held"], tmp_path, CONF)
    assert res["accepted"] == 0 and "turned 180 degrees" in res["refused"][0], res
    assert all(abs(v) <= 0.02 for v in res["change"].values()), res
