"""The defects a hostile but realistic client found, each through the real server: a failed request changes
nothing that was saved, a model answer never replaces a person's label, one film cannot stall the server,
inherited endpoints answer 4xx instead of 5xx, training parameters are checked before a run starts, refused
uploads leave no files, temp files cannot be named, a labelled image is not replaced, and the infer queue is
bounded and visible."""

from __future__ import annotations

import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
from conftest import SAMPLE
from PIL import Image
from server import Server, copy_studies

FILMS = ["chest_000.png", "chest_001.png", "limb_000.png"]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    root = tmp_path_factory.mktemp("defects")
    studies = copy_studies(root / "studies", FILMS)
    tmp = root / "tmp"
    tmp.mkdir()
    srv = Server(studies, conf={"adapter_dir": str(root / "adapters"), "auto_train_after": "0", "refine": "false",
                                "look_ahead": "false", "max_queued_infers": "1"},
                 env={"TMPDIR": str(tmp)}, log=root / "server.log")
    try:
        srv.info = srv.wait_ready()
        yield {"server": srv, "root": root, "tmp": tmp, "studies": studies}
    finally:
        srv.stop()


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def label_png(value: int = 1) -> bytes:
    lm = np.zeros((512, 512), np.uint8)
    lm[100:300, 300:450] = value
    return png(lm)


def put_label(c: httpx.Client, image: str, content: bytes, params: str = "{}", tag: str = "final") -> httpx.Response:
    return c.put("/datastore/label", params={"image": image, "tag": tag}, data={"params": params},
                 files={"label": ("label.png", content)})


def stored(c: httpx.Client, image: str, tag: str = "final") -> bytes:
    r = c.get("/datastore/label", params={"label": image, "tag": tag})
    assert r.status_code == 200, r.text
    return r.content


def infer(c: httpx.Client, image: str | None, params: dict, file: tuple | None = None, **query) -> httpx.Response:
    return c.post("/infer/xray_textseg", params={**({"image": image} if image else {}), "output": "json", **query},
                  data={"params": json.dumps(params)}, files={"file": file} if file else None)


@pytest.fixture(scope="module")
def saved(ctx):
    """A person's final label on chest_000, as the later cases must leave it."""
    c = ctx["server"].client
    assert put_label(c, "chest_000", label_png(), json.dumps({"label_names": {"left_lung": 1}})).status_code == 200
    return stored(c, "chest_000")


@pytest.mark.parametrize("params", ['"x"', "5", "[1, 2]", "{oops"])
def test_a_failed_label_save_changes_nothing(ctx, saved, params):
    c = ctx["server"].client
    r = put_label(c, "chest_000", label_png(3), params)
    assert r.status_code == 400, r.text
    assert "params" in r.text or "JSON" in r.text
    assert stored(c, "chest_000") == saved


def test_a_model_answer_never_replaces_a_final_label(ctx, saved):
    c = ctx["server"].client
    r = infer(c, "chest_000", {"prompt": "heart", "save_label": True, "label_tag": "final"})
    assert r.status_code == 400 and "never saved as the 'final' label" in r.text, r.text
    assert stored(c, "chest_000") == saved
    r = infer(c, "chest_000", {"prompt": "heart", "save_label": True, "label_tag": "original"})
    assert r.status_code == 200, r.text
    assert stored(c, "chest_000") == saved


@pytest.mark.parametrize("w,h", [(16, 2000), (16, 200000), (3000, 100)])
def test_a_strip_is_refused_before_it_is_decoded(ctx, w, h):
    c = ctx["server"].client
    t0 = time.perf_counter()
    r = infer(c, None, {"prompt": "femur"}, file=("strip.png", png(np.full((h, w), 128, np.uint8))))
    assert r.status_code == 422 and "longer than wide" in r.text, r.text
    assert time.perf_counter() - t0 < 60  # refused from the header, not after minutes of crops
    assert c.get("/info/", timeout=10).status_code == 200


def test_inherited_endpoints_answer_4xx(ctx):
    c = ctx["server"].client
    r = infer(c, "chest_001", {"prompt": "heart"}, output="dicom_seg")
    assert r.status_code == 400 and "DICOMweb" in r.text, r.text
    r = c.put("/model/xray_textseg", files={"file": ("m.pt", b"weights")})
    assert r.status_code == 405 and "trained from saved labels" in r.text, r.text


@pytest.mark.parametrize("body,name", [({"degrade": 7}, "degrade"), ({"coarse_prior": "bogus"}, "coarse_prior"),
                                       ({"epochs": "abc"}, "epochs"), ({"epochs": 0}, "epochs"),
                                       ({"warm_start": "maybe"}, "warm_start")])
def test_train_parameters_are_checked_before_the_run(ctx, body, name):
    c = ctx["server"].client
    r = c.post("/train/xray_textseg_train", json=body)
    assert r.status_code == 400 and name in r.text, r.text
    assert c.get("/train/", params={"check_if_running": True}).status_code != 200  # nothing was started


def test_deletes_of_what_does_not_exist_are_4xx(ctx, saved):
    c = ctx["server"].client
    assert c.delete("/datastore/label", params={"id": "no_such_film", "tag": "final"}).status_code == 404
    assert c.delete("/datastore/label", params={"id": "chest_001", "tag": "final"}).status_code == 404
    assert c.delete("/datastore/label", params={"id": "chest_000", "tag": "../final"}).status_code == 400
    assert stored(c, "chest_000") == saved


def test_temp_files_cannot_be_named_as_images(ctx):
    c = ctx["server"].client
    planted = ctx["tmp"] / "tmpplanted.png"
    planted.write_bytes((SAMPLE / "images" / "chest_001.png").read_bytes())
    try:
        r = infer(c, str(planted), {"prompt": "heart"})
        assert r.status_code == 404 and "server paths are not accepted" in r.text, r.text
        r = infer(c, "chest_001", {"prompt": "heart", "image": str(planted)})
        assert r.status_code == 404, r.text
    finally:
        planted.unlink()


def test_a_labelled_image_is_not_replaced(ctx, saved):
    c = ctx["server"].client
    r = c.put("/datastore/image", params={"image": "chest_000"},
              files={"file": ("other.png", png(np.full((256, 256), 90, np.uint8)))})
    assert r.status_code == 409 and "has labels" in r.text, r.text
    assert stored(c, "chest_000") == saved
    assert c.get("/datastore/image", params={"image": "chest_000"}).content == \
        (ctx["studies"] / "chest_000.png").read_bytes()


def test_refused_uploads_leave_no_files(ctx):
    c = ctx["server"].client
    before = sorted(p.name for p in ctx["tmp"].iterdir())
    bad = b"\x89PNG\r\n\x1a\n" + b"\0" * 100
    assert infer(c, None, {"prompt": "heart"}, file=("bad.png", bad)).status_code == 422
    assert infer(c, None, {"prompt": "spleen"}, file=("ok.png", png(np.full((64, 64), 9, np.uint8)))).status_code == 400
    assert c.put("/datastore/image", params={"image": "junk"}, files={"file": ("j.png", bad)}).status_code == 422
    assert put_label(c, "chest_001", png(np.zeros((10, 10), np.uint8))).status_code == 422
    assert c.put("/model/xray_textseg", files={"file": ("m.pt", b"0" * 1000)}).status_code == 405
    time.sleep(1)
    assert sorted(p.name for p in ctx["tmp"].iterdir()) == before


def test_the_infer_queue_is_bounded_and_shown(ctx):
    """max_queued_infers 1: of 6 concurrent infers on new films, those past the running one and one waiting get a
    503 with Retry-After; the others are answered; /info/ answers meanwhile and shows the queue."""
    url = ctx["server"].url
    films = [png(np.clip(np.random.default_rng(i).normal(120, 30, (256, 256)), 0, 255).astype(np.uint8))
             for i in range(6)]
    answers: list[httpx.Response] = []
    seen: list[dict] = []

    def one(i: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as c:
            answers.append(infer(c, None, {"prompt": "heart"}, file=(f"f{i}.png", films[i])))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    with httpx.Client(base_url=url, timeout=30) as c:
        while any(t.is_alive() for t in threads):
            seen.append(c.get("/info/").json()["infer_queue"])
            time.sleep(0.2)
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in answers)
    assert 200 in codes and 503 in codes and set(codes) <= {200, 503}, codes
    busy = [r for r in answers if r.status_code == 503]
    assert all(int(r.headers["Retry-After"]) >= 1 and "max_queued_infers" in r.text for r in busy)
    assert max(s["in_flight"] for s in seen) >= 1 and seen[0]["limit"] == 2
