"""End to end: the real MONAI Label server with our app on 127.0.0.1, driven over HTTP."""

from __future__ import annotations

import gzip
import json
import shutil
import time

import nibabel as nib
import numpy as np
import pytest
from conftest import SAMPLE
from server import Server, copy_studies
from xray_textseg.io import load_mask
from xray_textseg.metrics import dice


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    studies = copy_studies(root / "studies", ["chest_000.png", "chest_001.png", "limb_000.png"])
    shutil.copy(SAMPLE / "dicom" / "chest_000_mono1.dcm", studies)  # a DICOM DX study beside the PNGs
    # the product default: a new store gets the packaged starter adapter (tests/test_starter.py)
    srv = Server(studies, conf={"adapter_dir": str(root / "adapters"), "starter_adapter": "true"})
    try:
        srv.info = srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def read_label_map(content: bytes) -> np.ndarray:
    """The NIfTI the server returns, as an (H, W) array in image orientation (it is stored (W, H, 1))."""
    if content[:2] == b"\x1f\x8b":
        content = gzip.decompress(content)
    img = nib.Nifti1Image.from_bytes(content)
    data = np.asarray(img.dataobj)
    assert data.ndim == 3 and data.shape[2] == 1
    return data[:, :, 0].T


def test_info_lists_the_text_prompt_task(server):
    task = server.info["models"]["xray_textseg"]
    assert task["type"] == "segmentation" and task["dimension"] == 2
    assert isinstance(task["config"]["prompt"], str)
    assert task["labels"]["left_lung"] == 1 and "femur" in task["labels"]


def test_infer_left_lung(server):
    r = server.client.post("/infer/xray_textseg", params={"image": "chest_000", "output": "all"},
                           data={"params": json.dumps({"prompt": "left lung"})})
    assert r.status_code == 200, r.text
    # "all" returns multipart: the label file and the params json
    ctype = r.headers["content-type"]
    assert ctype.startswith("multipart/form-data")
    parts = _multipart(r)
    params = json.loads(parts["params"])
    assert params["label_names"] == {"left_lung": 1}
    assert params["mode"] == "adapter" and params["adapter"] == "v0001"  # the starter, from the first request
    assert "warnings" not in params  # a left lung shaped like the starter's training lungs
    assert "installed the starter adapter as v0001" in server.log_tail(400)
    lm = read_label_map(parts["image"])
    assert lm.shape == (512, 512) and set(np.unique(lm)) <= {0, 1}
    truth = load_mask(SAMPLE / "labels" / "left_lung" / "chest_000.png", (512, 512)) > 0
    assert dice(lm == 1, truth) > 0.5  # orientation: a transposed or flipped map would miss
    assert np.nonzero(lm == 1)[1].mean() > 256


def test_infer_on_a_dicom_study_keeps_its_geometry(server):
    """A MONOCHROME1 DICOM DX film (the inverted twin of chest_000): the label map has the film's pixel
    grid and orientation, the same as for the PNG; the patient's left lung is on the image's right."""
    r = server.client.post("/infer/xray_textseg", params={"image": "chest_000_mono1", "output": "all"},
                           data={"params": json.dumps({"prompt": "left lung, heart"})})
    assert r.status_code == 200, r.text
    parts = _multipart(r)
    params = json.loads(parts["params"])
    lm = read_label_map(parts["image"])
    assert lm.shape == (512, 512)
    for lab in ("left_lung", "heart"):
        truth = load_mask(SAMPLE / "labels" / lab / "chest_000.png", (512, 512)) > 0
        assert dice(lm == params["label_names"][lab], truth) > 0.5, lab
    assert np.nonzero(lm == params["label_names"]["left_lung"])[1].mean() > 256


def test_infer_bad_requests_are_4xx(server):
    r = server.client.post("/infer/xray_textseg", params={"image": "chest_000"},
                           data={"params": json.dumps({"prompt": "LL"})})
    assert r.status_code == 400 and "left lung" in r.text
    r = server.client.post("/infer/xray_textseg", params={"image": "chest_000"}, data={"params": "{}"})
    assert r.status_code in (400, 422)
    r = server.client.post("/infer/xray_textseg", params={"image": "no_such_image"},
                           data={"params": json.dumps({"prompt": "heart"})})
    assert 400 <= r.status_code < 500


def _multipart(response) -> dict[str, bytes]:
    """Split MONAI Label's multipart/form-data answer (output=all) into {field name: bytes}."""
    boundary = response.headers["content-type"].split("boundary=")[1].strip('"').encode()
    out = {}
    for chunk in response.content.split(b"--" + boundary):
        if b"\r\n\r\n" not in chunk:
            continue
        head, body = chunk.split(b"\r\n\r\n", 1)
        name = head.split(b'name="')[1].split(b'"')[0].decode()
        out[name] = body[:-2] if body.endswith(b"\r\n") else body
    return out


def test_active_learning_uncertainty(server):
    r = server.client.post("/activelearning/uncertainty", json={})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] in ("chest_000", "chest_001", "limb_000", "chest_000_mono1")
    assert 0.0 <= body["uncertainty"] <= 1.0 and body["scored"] == 4
    assert server.client.post("/activelearning/first", json={}).json()["id"] == "chest_000"


def test_box_refinement_and_bad_box(server):
    box = [280, 60, 480, 420]  # around the patient's left lung (image right) of chest_000
    r = server.client.post("/infer/xray_textseg", params={"image": "chest_000", "output": "json"},
                           data={"params": json.dumps({"prompt": "left lung", "box": box})})
    assert r.status_code == 200, r.text
    # the adapter's fine pass (the starter's here) prompts with the user box grown by 0.1 of its size per side
    assert r.json()["boxes"]["left_lung"] == [260.0, 24.0, 500.0, 456.0]
    r = server.client.post("/infer/xray_textseg", params={"image": "chest_000"},
                           data={"params": json.dumps({"prompt": "left lung", "box": [5, 5, 1]})})
    assert r.status_code == 400 and "box" in r.text
    r = server.client.post("/infer/xray_textseg", params={"image": "chest_000"},
                           data={"params": json.dumps({"prompt": "lungs", "box": [1, 1, 50, 50]})})
    assert r.status_code == 400 and "exactly one" in r.text


def test_look_ahead_segments_the_films_other_labels_after_a_prompt(server):
    """After "heart" on a chest film the server segments the film's other chest labels in the background (not the
    leg's); the clinician's next structure then comes from the result cache."""
    def infer(prompt):
        r = server.client.post("/infer/xray_textseg", params={"image": "chest_001", "output": "json"},
                               data={"params": json.dumps({"prompt": prompt})})
        assert r.status_code == 200, r.text
        return r.json()

    infer("heart")
    deadline = time.time() + 180
    while True:
        state = server.client.get("/info/").json()["prefetch"]
        if state["reason"] == "look-ahead" and state["image"] == "chest_001" and state["status"] != "running":
            break
        assert time.time() < deadline, state
        time.sleep(0.5)
    assert state["status"] == "done", state
    assert set(state["labels"]) <= {"left_lung", "right_lung", "left_clavicle", "right_clavicle"}, state
    assert "left_clavicle" in state["labels"] and state["segmented"] == len(state["labels"]), state
    answer = infer("left clavicle")
    assert answer["cache"] == {"hits": 0, "misses": 0, "result_hits": 1}, answer
    assert server.client.get("/info/").json()["prefetch"] == state  # nothing left to segment: no new warm-up


def test_next_sample_is_warmed_with_the_labels_of_the_last_prompt(server):
    """Active learning's pick is encoded, and the last prompt's labels segmented, before the clinician asks."""
    def infer(image, prompt):
        r = server.client.post("/infer/xray_textseg", params={"image": image, "output": "json"},
                               data={"params": json.dumps({"prompt": prompt})})
        assert r.status_code == 200, r.text
        return r.json()

    first = server.client.post("/activelearning/first", json={}).json()["id"]
    assert first.startswith("chest")
    # a leg label: the chest film's look-ahead (chest labels) never segments it, so the warm-up's work is its own
    infer("limb_000", "femur")
    assert server.client.post("/activelearning/first", json={}).json()["id"] == first
    deadline = time.time() + 180
    while True:
        state = server.client.get("/info/").json()["prefetch"]
        if state["image"] == first and state["status"] != "running":
            break
        assert time.time() < deadline, state
        time.sleep(0.5)
    assert state["status"] == "done" and state["labels"] == ["femur"] and state["segmented"] == 1, state
    assert state["reason"] == "next sample", state
    assert infer(first, "femur")["cache"] == {"hits": 0, "misses": 0, "result_hits": 1}


def test_a_film_uploaded_askew_is_answered_upright_in_its_own_pixels(server):
    """A long-leg film turned by 8 degrees onto a black canvas, uploaded as a PNG: the answer's label map has the
    canvas's size, says how the film was read (``film``: turned upright), and its tibia lies on the turned tibia."""
    import io

    from PIL import Image
    from scipy import ndimage
    from xray_textseg.io import load_radiograph

    film = load_radiograph(SAMPLE / "images" / "limb_001.png")
    truth = load_mask(SAMPLE / "labels" / "tibia" / "limb_001.png", film.shape) > 0

    def turn(a, order=1):
        return ndimage.rotate(np.asarray(a, np.float32), 8.0, reshape=True, order=order, mode="constant")

    canvas = np.clip(turn(film.pixels / film.pixels.max() * 255.0), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    r = server.client.post("/infer/xray_textseg", params={"output": "all"},
                           data={"params": json.dumps({"prompt": "tibia"})},
                           files={"file": ("askew_leg.png", buf.getvalue())})
    assert r.status_code == 200, r.text
    parts = _multipart(r)
    params = json.loads(parts["params"])
    assert abs(abs(params["film"]["turned_degrees"]) - 8.0) < 0.3, params
    lm = read_label_map(parts["image"])
    assert lm.shape == canvas.shape
    assert dice(lm == params["label_names"]["tibia"], turn(truth) > 0.5) > 0.8


def test_a_prompt_for_a_bone_the_chest_film_does_not_show_is_answered_with_a_warning(server):
    """The mask still comes back (the clinician decides), with the reason in the answer's params and the log. Last in
    the module: a cached femur on chest_000 would do the prefetch test's work for it."""
    r = server.client.post("/infer/xray_textseg", params={"image": "chest_000", "output": "all"},
                           data={"params": json.dumps({"prompt": "femur"})})
    assert r.status_code == 200, r.text
    params = json.loads(_multipart(r)["params"])
    assert list(params["label_names"]) == ["femur"] and set(params["warnings"]) == {"femur"}, params
    assert "may not show the femur" in params["warnings"]["femur"]
    assert "may not show the femur" in server.log_tail(200)
