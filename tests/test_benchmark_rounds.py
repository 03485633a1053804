"""The label-efficiency benchmark end to end on our synthetic films, with the app's extra round
(``--extra-rounds``): a round-0 adapter, then (when the budget ended it while it still improved) a round
continued from it on the same films, both tested. Slow: two short encoder-LoRA runs on the CPU."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, SAMPLE

pytestmark = pytest.mark.slow


def test_extra_round_continues_from_the_first_adapter(tmp_path):
    data = tmp_path / "chest"
    (data / "images").mkdir(parents=True)
    (data / "labels" / "heart").mkdir(parents=True)
    for i in range(6):
        shutil.copy(SAMPLE / "images" / f"chest_00{i}.png", data / "images")
        shutil.copy(SAMPLE / "labels" / "heart" / f"chest_00{i}.png", data / "labels" / "heart")
    out, adapters = tmp_path / "out", tmp_path / "adapters"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "label_efficiency.py"), "--data", str(data),
                           "--k", "4", "--seeds", "0", "--test-limit", "2", "--labels", "heart", "--skip-baselines",
                           "--mode", "lora", "--device", "cpu", "--epochs", "40", "--time-budget", "0.4",
                           "--extra-rounds", "1", "--out", str(out), "--adapters", str(adapters)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())
    first = [p for p in adapters.iterdir() if p.is_dir() and p.name.rsplit("_", 1)[-1].isdigit()]
    assert len(first) == 1 and {r["method"] for r in rows} >= {"text+adapter"}
    run = json.loads((first[0] / "metadata.json").read_text())["training"]
    extra = [p for p in adapters.iterdir() if p.is_dir() and p.name.endswith("_r1")]
    if run["stopped"] == "time budget" and run["best_epoch"] > 0:
        assert len(extra) == 1, proc.stdout[-3000:]
        meta = json.loads((extra[0] / "metadata.json").read_text())
        assert meta["continued_from"] == first[0].name
        assert meta["train_names"] == json.loads((first[0] / "metadata.json").read_text())["train_names"]
        assert {r["method"] for r in rows} == {"text+adapter", "text+adapter+r1"}
        assert all(0.0 <= r["dice"] <= 1.0 for r in rows) and len(rows) == 2
    else:
        assert not extra and "no extra round 1" in proc.stdout
