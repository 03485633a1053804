"""End to end: labels saved through the real server (shaped like Slicer's upload) trigger training in
MONAI Label's subprocess; the adapter is validated, promoted and then served without a restart."""

from __future__ import annotations

import io
import json
import re
import time

import nibabel as nib
import numpy as np
import pytest
from conftest import SAMPLE
from server import Server, copy_studies
from test_server_e2e import read_label_map
from xray_textseg.io import load_mask
from xray_textseg.metrics import dice

TRAIN = ["chest_000", "chest_001", "chest_002"]
HELD_OUT = ["chest_003", "chest_004"]
LABELS = ("left_lung", "heart")


def slicer_nifti(label_map_hw: np.ndarray) -> bytes:
    """A label map as 3D Slicer uploads it for a 2D film: NIfTI of shape (W, H, 1), RAS affine diag(-1,-1,1)."""
    data = np.ascontiguousarray(label_map_hw.T[:, :, None].astype(np.uint8))
    img = nib.Nifti1Image(data, np.diag([-1.0, -1.0, 1.0, 1.0]))
    return img.to_bytes()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_e2e")
    studies = copy_studies(root / "studies", [f"{c}.png" for c in TRAIN + HELD_OUT])
    conf = {"labels": ",".join(LABELS), "auto_train_after": "3", "adapter_dir": str(root / "adapters"),
            "train_epochs": "6", "train_time_budget_min": "5", "device": "cpu",
            "train_cached_copies": "1", "look_ahead": "false",  # the training subprocess gets the CPU
            "train_extra_rounds": "0"}  # only the runs the tests start (extra rounds: test_app_schedule.py)
    srv = Server(studies, conf=conf)
    try:
        srv.info = srv.wait_ready()
        srv.root = root
        yield srv
    finally:
        srv.stop()


def infer_dice(server, case: str) -> tuple[float, dict]:
    r = server.client.post("/infer/xray_textseg", params={"image": case, "output": "all"},
                           data={"params": json.dumps({"prompt": "left lung, heart"})})
    assert r.status_code == 200, r.text
    from test_server_e2e import _multipart

    parts = _multipart(r)
    params = json.loads(parts["params"])
    lm = read_label_map(parts["image"])
    scores = []
    for lab in LABELS:
        truth = load_mask(SAMPLE / "labels" / lab / f"{case}.png", lm.shape) > 0
        scores.append(dice(lm == params["label_names"][lab], truth))
    return float(np.mean(scores)), params


def test_info_lists_infer_and_train_tasks(server):
    assert "xray_textseg" in server.info["models"]
    assert "xray_textseg_train" in server.info["trainers"]
    assert isinstance(server.info["models"]["xray_textseg"]["config"]["prompt"], str)


def test_saved_labels_trigger_training_and_promotion(server):
    zero_shot = [infer_dice(server, c) for c in HELD_OUT]
    assert all(p["mode"] == "zero-shot" for _, p in zero_shot)
    for case in TRAIN:
        lm = np.zeros((512, 512), np.uint8)
        for name, value in (("left lung", 1), ("heart", 2)):
            lm[load_mask(SAMPLE / "labels" / name.replace(" ", "_") / f"{case}.png", (512, 512)) > 0] = value
        info = {"label_info": [{"name": "left lung", "idx": 1}, {"name": "heart", "idx": 2}]}
        r = server.client.put("/datastore/label", params={"image": case, "tag": "final"},
                              data={"params": json.dumps(info)},
                              files={"label": (f"{case}.nii.gz", io.BytesIO(slicer_nifti(lm)))})
        assert r.status_code == 200, r.text
    # the third label triggered a training run in MONAI Label's subprocess; wait for it
    deadline = time.time() + 1500
    stats = {}
    while time.time() < deadline:
        stats = server.client.get("/info/").json().get("train_stats", {}).get("xray_textseg_train", {})
        if stats.get("status") == "done":
            break
        time.sleep(5)
    assert stats.get("status") == "done", f"{stats}\n{server.log_tail()}"
    assert stats["promoted"] and stats["current_adapter"] == stats["version"] == "v0001"
    assert stats["epoch"] >= 1 and set(stats["val_dice"]) == set(LABELS)
    adapter = server.root / "adapters" / "v0001"
    assert (adapter / "metadata.json").is_file()
    # served without a restart, and better than zero-shot on images it never saw
    adapted = [infer_dice(server, c) for c in HELD_OUT]
    assert all(p["mode"] == "adapter" and p["adapter"] == "v0001" for _, p in adapted)
    assert np.mean([d for d, _ in adapted]) > np.mean([d for d, _ in zero_shot])
    if stats["mode"] == "lora":  # the LoRA encoder in ONNX Runtime: exported by the run that validated it, reused
        log = server.log_path.read_text()  # by the server (training subprocess and server log to the same file)
        graphs = re.findall(r"the adapter's encoder runs in ONNX Runtime \((\S+), (exported now|graph reused)", log)
        # first the run's validation of v0001 (it exports the graph), last the server loading v0001 (it reuses it)
        assert len(graphs) >= 2 and graphs[-1] == (graphs[0][0], "graph reused"), (graphs, server.log_tail())


def test_stopping_a_run_keeps_the_current_adapter(server):
    """DELETE /train/ kills the training subprocess mid-run: v0001 stays current and complete."""
    r = server.client.post("/train/xray_textseg_train", json={"epochs": 50, "trigger": "test"})
    assert r.status_code == 200, r.text
    deadline = time.time() + 600
    while time.time() < deadline:
        stats = server.client.get("/info/").json()["train_stats"]["xray_textseg_train"]
        if stats.get("status") == "running" and stats.get("trigger") == "test":
            break
        time.sleep(1)
    assert stats.get("status") == "running", stats
    time.sleep(3)
    r = server.client.delete("/train/")
    assert r.status_code == 200, r.text
    time.sleep(3)
    root = server.root / "adapters"
    assert json.loads((root / "current.json").read_text())["current"] == "v0001"
    assert not (root / "v0002").exists()
    assert server.client.get("/info/").json()["train_stats"]["xray_textseg_train"]["status"] == "stopped"
    _, params = infer_dice(server, HELD_OUT[0])
    assert params["adapter"] == "v0001"
    # the next run after the kill trains, validates and decides normally; its request's training options (here the
    # envelope prompt boxes and the mid view, off by default, and another film degradation) reach the trainer and
    # the adapter's metadata; it starts from the current adapter's weights
    r = server.client.post("/train/xray_textseg_train", json={"epochs": 2, "trigger": "after kill",
                                                             "coarse_prior": "envelope", "mid_view": True,
                                                             "degrade": 0.5})
    assert r.status_code == 200, r.text
    deadline = time.time() + 900
    while time.time() < deadline:
        stats = server.client.get("/info/").json()["train_stats"]["xray_textseg_train"]
        if stats.get("trigger") == "after kill" and stats.get("status") in ("done", "failed", "stopped"):
            break
        time.sleep(3)
    assert stats.get("status") == "done", f"{stats}\n{server.log_tail()}"
    current = json.loads((root / "current.json").read_text())["current"]
    assert current == (stats["version"] if stats["promoted"] else "v0001")
    assert (root / current / "metadata.json").is_file()
    # it continued from v0001 (warm start, the default), whose films kept their sides of the split
    first, new = (json.loads((root / v / "metadata.json").read_text()) for v in ("v0001", stats["version"]))
    assert stats["continued_from"] == new["continued_from"] == "v0001"
    assert new["training"]["config"]["init_from"] == str(root / "v0001")
    assert new["val_names"] == first["val_names"] and new["train_names"] == first["train_names"]
    for version, prior, mid in ((stats["version"], "envelope", True), ("v0001", "median", False)):
        trained = json.loads((root / version / "metadata.json").read_text())["training"]["config"]
        kinds = json.loads((root / version / "priors.json").read_text())["kind"]
        assert trained["coarse_prior"] == prior and trained["mid_view"] is mid
        assert (trained["degrade"] == 0.5) is (version == stats["version"])
        assert kinds == {lab: prior for lab in LABELS}
