"""Scheduled retraining through the real server: ``retrain_interval`` ticks with no new final label since
the last run are skipped (and logged); a new label makes the next tick start a run, which DELETE /train/
stops without touching the adapter store. Slow: it waits for MONAI Label's schedule (checked every 30 s)."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
from conftest import SAMPLE
from server import Server, copy_studies
from test_app_training import slicer_nifti
from xray_textseg.io import load_mask

pytestmark = pytest.mark.slow
CASES = ["chest_000", "chest_001", "chest_002"]
SKIPPED = "scheduled retraining skipped: no new labels"


def train_stats(server) -> dict:
    return server.client.get("/info/").json().get("train_stats", {}).get("xray_textseg_train", {})


def test_schedule_retrains_only_when_new_labels_arrived(tmp_path):
    studies = copy_studies(tmp_path / "studies", [f"{c}.png" for c in CASES])
    conf = {"labels": "heart", "auto_train_after": "0", "retrain_interval": "1m", "min_train_images": "2",
            "adapter_dir": str(tmp_path / "adapters"), "device": "cpu", "train_cached_copies": "1"}
    server = Server(studies, conf=conf)
    try:
        server.wait_ready()
        deadline = time.time() + 150
        while SKIPPED not in server.log_path.read_text() and time.time() < deadline:
            time.sleep(2)
        assert SKIPPED in server.log_path.read_text(), server.log_tail()
        assert "version" not in train_stats(server)  # nothing ran

        save_heart_labels(server, CASES[:2])

        deadline = time.time() + 150
        while train_stats(server).get("status") != "running" and time.time() < deadline:
            time.sleep(2)
        stats = train_stats(server)
        assert stats.get("status") == "running" and stats["trigger"].startswith("schedule (1m)"), stats
        assert stats["version"] == "v0001" and stats["train_images"] + stats["val_images"] == 2

        assert server.client.delete("/train/").status_code == 200
        deadline = time.time() + 60  # MONAI Label reports no running training task (404) once it is gone
        while server.client.get("/train/", params={"check_if_running": True}).status_code != 404:
            assert time.time() < deadline, server.log_tail()
            time.sleep(1)
        assert train_stats(server)["status"] == "stopped"
        assert not (tmp_path / "adapters" / "v0001").exists()
        assert not (tmp_path / "adapters" / "current.json").exists()
    finally:
        server.stop()


def save_heart_labels(server, cases) -> None:
    for case in cases:
        lm = np.zeros((512, 512), np.uint8)
        lm[load_mask(SAMPLE / "labels" / "heart" / f"{case}.png", (512, 512)) > 0] = 1
        r = server.client.put("/datastore/label", params={"image": case, "tag": "final"},
                              data={"params": json.dumps({"label_info": [{"name": "heart", "idx": 1}]})},
                              files={"label": (f"{case}.nii.gz", io.BytesIO(slicer_nifti(lm)))})
        assert r.status_code == 200, r.text


def wait_done(server, version: str, timeout: float) -> dict:
    deadline = time.time() + timeout
    stats = {}
    while time.time() < deadline:
        stats = train_stats(server)
        if stats.get("version") == version and stats.get("status") in ("done", "failed", "stopped"):
            return stats
        time.sleep(3)
    raise AssertionError(f"{version} did not finish: {stats}\n{server.log_tail()}")


def test_a_run_the_time_budget_cut_goes_on_from_its_adapter(tmp_path):
    """Encoder LoRA with a 1-minute budget and 40 epochs: the budget, not early stopping, ends the labels' run
    (v0001); the server starts one extra round on the same labels from v0001 (v0002) and, with
    ``train_extra_rounds`` 1, no third run."""
    cases = ["chest_000", "chest_001", "chest_002", "chest_003"]
    studies = copy_studies(tmp_path / "studies", [f"{c}.png" for c in cases])
    conf = {"labels": "heart", "auto_train_after": "4", "train_time_budget_min": "1", "train_epochs": "40",
            "train_mode": "lora", "train_extra_rounds": "1", "adapter_dir": str(tmp_path / "adapters"),
            "device": "cpu", "look_ahead": "false", "prefetch": "false"}
    server = Server(studies, conf=conf)
    try:
        server.wait_ready()
        save_heart_labels(server, cases)
        first = wait_done(server, "v0001", 600)
        assert first["trigger"] == "4 new labels saved" and first["promoted"], first
        assert first["stopped"] == "time budget" and first["best_epoch"] >= 1, first
        second = wait_done(server, "v0002", 600)  # the schedule looks once a minute
        assert second["trigger"].startswith("extra round 1 of 1: the time budget ended v0001"), second
        assert second["continued_from"] == "v0001"
        meta = json.loads((tmp_path / "adapters" / "v0002" / "metadata.json").read_text())
        assert meta["continued_from"] == "v0001" and meta["trigger"] == second["trigger"]
        time.sleep(100)  # two more looks of the schedule: the extra round is spent
        assert train_stats(server)["version"] == "v0002"
        assert not (tmp_path / "adapters" / "v0003").exists()
    finally:
        server.stop()
