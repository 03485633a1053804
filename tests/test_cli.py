"""The ``xray-textseg`` CLI as a user runs it: a real subprocess, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from conftest import REPO, SAMPLE
from xray_textseg.io import load_mask


def run_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(REPO / "lib")}
    return subprocess.run([sys.executable, "-m", "xray_textseg.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def test_predict_writes_masks_and_timing(tmp_path):
    out = tmp_path / "masks"
    r = run_cli("predict", str(SAMPLE / "images" / "chest_000.png"), "-p", "right lung", "-p", "heart",
                "-o", str(out), "--device", "cpu", "--no-refine")
    assert r.returncode == 0, r.stderr
    assert "mode=zero-shot" in r.stdout and "predict=" in r.stdout
    right = load_mask(out / "chest_000_right_lung.png", (512, 512)) > 0
    assert (out / "chest_000_heart.png").is_file()
    assert np.nonzero(right)[1].mean() < 256  # the patient's right is the image left


def test_predict_label_map_with_names(tmp_path):
    out = tmp_path / "map.nii.gz"
    r = run_cli("predict", str(SAMPLE / "images" / "limb_000.png"), "-p", "femur, tibia", "-o", str(out),
                "--device", "cpu", "--no-refine")
    assert r.returncode == 0, r.stderr
    names = json.loads((tmp_path / "map.nii.gz.json").read_text())["label_names"]
    assert names == {"femur": 1, "tibia": 2}
    lm = load_mask(out, (512, 128))
    femur_rows = np.nonzero(lm == 1)[0]
    tibia_rows = np.nonzero(lm == 2)[0]
    assert femur_rows.mean() < tibia_rows.mean()  # femur above tibia


def test_predict_with_the_starter_adapter(tmp_path):
    out = tmp_path / "masks"
    r = run_cli("predict", str(SAMPLE / "images" / "chest_000.png"), "-p", "left clavicle", "-o", str(out),
                "--device", "cpu", "--adapter", "starter")
    assert r.returncode == 0, r.stderr
    assert "mode=adapter" in r.stdout and "(text)" in r.stdout  # the head's text prompt, not a prior box
    left = load_mask(out / "chest_000_left_clavicle.png", (512, 512)) > 0
    assert left.any() and np.nonzero(left)[1].mean() > 256  # the patient's left is the image right


def test_unknown_label_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "masks"
    r = run_cli("predict", str(SAMPLE / "images" / "chest_000.png"), "-p", "LL", "-o", str(out))
    assert r.returncode == 2
    assert "left lung" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_unreadable_image_exits_2(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    r = run_cli("predict", str(bad), "-p", "heart", "-o", str(tmp_path / "o"))
    assert r.returncode == 2 and "bad.png" in r.stderr
    r = run_cli("predict", str(tmp_path / "missing.png"), "-p", "heart", "-o", str(tmp_path / "o"))
    assert r.returncode == 2 and "missing.png" in r.stderr


def test_info_lists_backbone_text_encoder_labels():
    r = run_cli("info", "--device", "cpu", "--labels", "chest")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["backbone"]["name"] == "litemedsam"
    assert info["text_encoder"]["dim"] == 384
    assert info["labels"] == ["left_lung", "right_lung", "heart", "left_clavicle", "right_clavicle"]
    assert info["mode"] == "zero-shot"


def test_train_writes_an_adapter_with_the_chosen_coarse_prior_and_never_overwrites(tmp_path):
    """``xray-textseg train`` on sample films: a validated adapter directory, its summary on stdout, the prior kind
    per label as asked (``--coarse-prior``, default median; auto takes the envelope for the scattered clavicles only); the same
    --out again exits 2 and leaves the adapter as it was; an unknown --coarse-prior is a usage error."""
    out = tmp_path / "adapter"
    cases = "chest_000,chest_001,chest_002,chest_003"
    r = run_cli("train", "--data", str(SAMPLE), "--out", str(out), "--labels", "heart,left_clavicle", "--cases", cases,
                "--mode", "cached", "--epochs", "1", "--val-fraction", "0.25", "--coarse-prior", "auto", "--mid-view", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["coarse_prior"] == {"heart": "median", "left_clavicle": "envelope"}
    assert summary["mid_view"] == ["left_clavicle"]  # the enveloped label, found on the upper-chest crop
    assert summary["train_images"] == 3 and summary["val_images"] == 1 and summary["mode"] == "cached"
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["training"]["config"]["coarse_prior"] == "auto" and meta["training"]["config"]["mid_view"] and set(meta["labels"]) == {"heart", "left_clavicle"}
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = run_cli("train", "--data", str(SAMPLE), "--out", str(out), "--labels", "heart", "--cases", cases,
                    "--mode", "cached", "--epochs", "1", "--device", "cpu")
    assert again.returncode == 2 and "exists" in again.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    bad = run_cli("train", "--data", str(SAMPLE), "--out", str(tmp_path / "b"), "--coarse-prior", "mean")
    assert bad.returncode == 2 and "--coarse-prior" in bad.stderr and not (tmp_path / "b").exists()
