"""Labels checked when saved, through the real server with the starter adapter: labels turned, mirrored or with
their names swapped are refused with a 422 that says what looks wrong; a right label is kept with its agreement;
a forced one is kept but held out of training until a person confirms it; overlapping structures can be saved as
layers and come back unflattened; answers say what their label map hides; an administrator can roll back."""

from __future__ import annotations

import gzip
import io
import json

import nibabel as nib
import numpy as np
import pytest
from conftest import SAMPLE
from PIL import Image
from server import Server, copy_studies
from test_server_e2e import _multipart
from xray_textseg.io import load_mask

VALUES = {"left_lung": 1, "right_lung": 2, "heart": 3, "left_clavicle": 4, "right_clavicle": 5}
FILMS = ["chest_000", "chest_001", "chest_002", "chest_003"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("label_check")
    studies = copy_studies(root / "studies", [f"{c}.png" for c in FILMS])
    srv = Server(studies, conf={"adapter_dir": str(root / "adapters"), "starter_adapter": "true",
                                "auto_train_after": "0", "look_ahead": "false"})
    try:
        srv.info = srv.wait_ready()
        srv.root = root
        yield srv
    finally:
        srv.stop()


def truth(case: str) -> dict[str, np.ndarray]:
    return {lab: load_mask(SAMPLE / "labels" / lab / f"{case}.png") > 0 for lab in VALUES}


def label_map(masks: dict[str, np.ndarray], values: dict[str, int] = VALUES) -> np.ndarray:
    lm = np.zeros(next(iter(masks.values())).shape, np.uint8)
    for lab in ("left_lung", "right_lung", "heart", "left_clavicle", "right_clavicle"):
        if lab in masks:
            lm[masks[lab]] = values[lab]
    return lm


def nifti(data: np.ndarray, affine: np.ndarray) -> bytes:
    return gzip.compress(nib.Nifti1Image(data, affine).to_bytes())


def slicer(lm: np.ndarray) -> bytes:
    """As 3D Slicer uploads a label of a PNG film: (W, H, 1), RAS diag(-1, -1, 1)."""
    return nifti(np.ascontiguousarray(lm.T[:, :, None]), np.diag([-1.0, -1.0, 1.0, 1.0]))


def label_info(values: dict[str, int] = VALUES) -> list[dict]:
    return [{"name": lab.replace("_", " "), "idx": v} for lab, v in values.items()]


def save(server, case: str, content: bytes, name: str = "label.nii.gz", **params):
    params.setdefault("label_info", label_info())
    return server.client.put("/datastore/label", params={"image": case, "tag": "final"},
                             data={"params": json.dumps(params)}, files={"label": (name, content)})


def stored_info(server, case: str) -> dict:
    return server.client.get("/datastore/label/info", params={"label": case, "tag": "final"}).json()


def test_a_right_slicer_label_is_kept_with_its_agreement(server):
    r = save(server, "chest_000", slicer(label_map(truth("chest_000"))))
    assert r.status_code == 200, r.text
    check = stored_info(server, "chest_000")["check"]
    assert check["status"] == "ok", check
    assert min(check["agreement"][lab] for lab in ("left_lung", "right_lung", "heart")) > 0.8, check


def test_an_identity_affine_nifti_reads_turned_and_is_refused(server):
    """numpy's (H, W) written with an identity affine: read as Slicer shows it, turned 180 degrees."""
    before = server.client.get("/datastore/label", params={"label": "chest_000", "tag": "final"}).content
    lm = label_map(truth("chest_000"))
    r = save(server, "chest_000", nifti(lm.T[:, :, None].copy(), np.eye(4)))
    assert r.status_code == 422, r.text
    assert "turned 180 degrees" in r.json()["detail"] and "affine" in r.json()["detail"]
    after = server.client.get("/datastore/label", params={"label": "chest_000", "tag": "final"}).content
    assert after == before, "a refused label replaced the stored one"


def png(lm: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(lm).save(buf, format="PNG")
    return buf.getvalue()


def test_a_mirrored_png_label_is_refused(server):
    r = save(server, "chest_001", png(label_map(truth("chest_001"))[:, ::-1].copy()), "label.png")
    assert r.status_code == 422, r.text
    assert "mirrored left-right" in r.json()["detail"]
    assert server.client.get("/datastore/label", params={"label": "chest_001", "tag": "final"}).status_code == 404


def test_swapped_label_info_is_refused_naming_the_structure(server):
    swapped = {**VALUES, "left_lung": 2, "right_lung": 1}  # the map is right, its names are not
    r = save(server, "chest_001", slicer(label_map(truth("chest_001"))), label_info=label_info(swapped))
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "saved as 'left_lung'" in detail and "'right_lung'" in detail and "label_info" in detail


def test_a_forced_label_is_kept_but_held_until_confirmed(server):
    lm = label_map(truth("chest_002"))[:, ::-1].copy()
    r = save(server, "chest_002", png(lm), "label.png", force=True)
    assert r.status_code == 200, r.text
    info = stored_info(server, "chest_002")
    assert info["check"]["status"] == "held" and info["check"]["forced"] and info["check"]["reasons"]
    r = server.client.put("/datastore/label/info", params={"label": "chest_002", "tag": "final"},
                          data={"info": json.dumps({"confirmed": True})})
    assert r.status_code == 200, r.text
    assert stored_info(server, "chest_002")["confirmed"] is True


def test_overlapping_structures_saved_as_layers_come_back_unflattened(server):
    masks = truth("chest_003")
    lungs = label_map({k: masks[k] for k in ("left_lung", "right_lung", "heart")})
    clavicles = label_map({k: masks[k] for k in ("left_clavicle", "right_clavicle")})
    content = nifti(np.stack([lungs.T, clavicles.T], -1)[:, :, None, :].copy(), np.diag([-1.0, -1.0, 1.0, 1.0]))
    r = save(server, "chest_003", content)
    assert r.status_code == 200, r.text
    assert stored_info(server, "chest_003")["check"]["status"] == "ok"
    back = server.client.get("/datastore/label", params={"label": "chest_003", "tag": "final"}).content
    assert back == content  # the datastore keeps what was sent


def test_an_answer_says_what_its_label_map_hides_and_gives_layers_on_request(server):
    r = server.client.post("/infer/xray_textseg", params={"image": "chest_000", "output": "all"},
                           data={"params": json.dumps({"prompt": "left lung, left clavicle"})})
    assert r.status_code == 200, r.text
    params = json.loads(_multipart(r)["params"])
    assert params["hidden"]["left_lung"]["under"]["left_clavicle"] > 0, params.get("hidden")
    r = server.client.post("/infer/xray_textseg", params={"image": "chest_000", "output": "all"},
                           data={"params": json.dumps({"prompt": "left lung, left clavicle", "layers": True})})
    assert r.status_code == 200, r.text
    parts = _multipart(r)
    img = nib.Nifti1Image.from_bytes(gzip.decompress(parts["image"]))
    assert img.shape == (512, 512, 1, 2)
    data = np.asarray(img.dataobj)
    assert ((data[..., 0] > 0) & (data[..., 1] > 0)).any()  # the clavicle over the lung, both whole
    assert "hidden" not in json.loads(parts["params"])


def test_rollback_with_nothing_before_the_starter_is_a_409(server):
    r = server.client.get("/adapter/")
    assert r.status_code == 200 and r.json()["current"] == "v0001", r.text
    r = server.client.post("/adapter/rollback")
    assert r.status_code == 409 and "first promoted version" in r.text
