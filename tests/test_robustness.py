"""Bad input never crashes or corrupts: a table of bad requests through the real server (one server for
the module, /info/ checked after each) and through the CLI, then faults: interrupted label saves and
broken adapter versions. Every bad file is made here, with numpy/PIL/pydicom/our own writers."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import signal
import socket
import struct
import sys
import time
import tracemalloc
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import REPO
from PIL import Image
from server import FILE_EXT, Server, copy_studies
from xray_textseg.io import ImageReadError, load_radiograph, save_mask

sys.path.insert(0, str(REPO / "apps" / "xray_textseg"))

from lib.safety import SafeLocalDatastore  # noqa: E402


# --- bad files, made here -----------------------------------------------------------------------------
def film(h: int = 256, w: int = 256, seed: int = 0) -> np.ndarray:
    """A uint8 chest-like film: two bright lung fields on a darker body, plus noise."""
    y, x = np.mgrid[0:h, 0:w]
    img = 60 + sum(120 * np.exp(-(((x - w * cx) / (w * .15)) ** 2 + ((y - h * .45) / (h * .3)) ** 2))
                   for cx in (.3, .7))
    img = img + np.random.default_rng(seed).normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def png(arr: np.ndarray, mode: str | None = None) -> bytes:
    img = Image.fromarray(arr)
    buf = io.BytesIO()
    (img.convert(mode) if mode else img).save(buf, format="PNG")
    return buf.getvalue()


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with only a few rows of data: a decompression bomb is
    refused from the header, so the claim alone must be enough."""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(b"\0" * (width + 1) * 4)) + _chunk(b"IEND", b""))


def dicom(pixels: np.ndarray, *, rows: int | None = None, cols: int | None = None, frames: int = 1,
          photometric: str = "MONOCHROME2", with_pixels: bool = True) -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID = "DX", generate_uid(), generate_uid()
    h, w = pixels.shape[1:3] if frames > 1 else pixels.shape[:2]
    ds.Rows, ds.Columns = rows or h, cols or w
    ds.SamplesPerPixel = 3 if photometric == "RGB" else 1
    if photometric == "RGB":
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if with_pixels:
        ds.PixelData = pixels.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, write_like_original=False)
    return buf.getvalue()


def label_bytes(tmp: Path, labels: np.ndarray, name: str = "label.nii.gz") -> bytes:
    path = tmp / name
    save_mask(labels.astype(np.uint8), path)
    return path.read_bytes()


GOOD = png(film())
BAD_IMAGES = {  # name: (bytes, what the message must say)
    "truncated.png": (GOOD[: len(GOOD) // 2], "truncated PNG"),
    "corrupt.png": (GOOD[:200] + bytes(b ^ 0x5A for b in GOOD[200:400]) + GOOD[400:], "corrupt PNG"),
    "empty.png": (b"", "not a readable image"),
    "notes.png": (b"patient notes, not an image\n", "not a readable image"),
    "tiny.png": (png(np.zeros((1, 1), np.uint8)), "too small: 1x1"),
    "huge.png": (png_claiming(30000, 30000), "too large: 30000x30000"),
    "truncated.dcm": (dicom(film())[:-30000], "cannot decode DICOM pixel data"),
    "nopixels.dcm": (dicom(film(), with_pixels=False), "no pixel data"),
    "multiframe.dcm": (dicom(np.stack([film(), film(seed=1)]), frames=2), "multi-frame DICOM (2 frames)"),
    "huge.dcm": (dicom(film(), rows=30000, cols=30000), "too large: 30000x30000"),
}
ACCEPTED_IMAGES = {  # what scanners and exports produce: converted to gray and segmented
    "rgb.png": png(np.stack([film(seed=2)] * 3, -1)),
    "gray16.png": png(film(seed=3).astype(np.uint16) * 257),
    "onebit.png": png(film(seed=4), "1"),
    "rgb.dcm": dicom(np.stack([film(seed=5)] * 3, -1), photometric="RGB"),
    "mono1_16bit.dcm": dicom(film(seed=6).astype(np.uint16) * 16, photometric="MONOCHROME1"),
}


# --- the server ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    """One server for the module: two sample films plus an unreadable one in its studies folder."""
    root = tmp_path_factory.mktemp("robust")
    studies = copy_studies(root / "studies", ["chest_000.png", "limb_000.png"])
    (studies / "broken.png").write_bytes(BAD_IMAGES["truncated.png"][0])
    labels = root / "labels"
    labels.mkdir()
    # no infer queue limit: the concurrency test checks every request is answered (the limit: test_server_defects)
    srv = Server(studies, conf={"adapter_dir": str(root / "adapters"), "auto_train_after": "0", "refine": "false",
                                "max_queued_infers": "0"}, log=root / "server.log")
    try:
        srv.info = srv.wait_ready()
        yield {"server": srv, "root": root, "studies": studies, "labels": labels}
    finally:
        srv.stop()


def infer(c: httpx.Client, image: str | None = "chest_000", params: dict | None = None, *, raw: str | None = None,
          file: tuple[str, bytes] | None = None, model: str = "xray_textseg", output: str = "json") -> httpx.Response:
    query = {"output": output} | ({"image": image} if image is not None else {})
    data = {"params": raw if raw is not None else json.dumps({"prompt": "heart"} if params is None else params)}
    return c.post(f"/infer/{model}", params=query, data=data, files={"file": file} if file else None)


def put_label(c: httpx.Client, image: str, content: bytes, name: str = "label.nii.gz", tag: str = "final",
              params: dict | None = None) -> httpx.Response:
    return c.put("/datastore/label", params={"image": image, "tag": tag},
                 data={"params": json.dumps(params or {})}, files={"label": (name, content)})


def upload(c: httpx.Client, image_id: str | None, name: str, content: bytes) -> httpx.Response:
    return c.put("/datastore/image", params={"image": image_id} if image_id else {}, files={"file": (name, content)})


@dataclass
class Case:
    id: str
    send: Callable[[httpx.Client, dict], httpx.Response]
    status: int
    says: tuple[str, ...] = ()


def _bad_image_cases() -> list[Case]:
    cases = []
    for name, (content, says) in BAD_IMAGES.items():
        cases.append(Case(f"infer-upload-{name}", lambda c, x, n=name, b=content: infer(c, None, file=(n, b)),
                          422, (says, "uploaded file")))
    for name in ("truncated.png", "huge.dcm", "nopixels.dcm"):  # the datastore refuses them before storing
        content, says = BAD_IMAGES[name]
        cases.append(Case(f"datastore-upload-{name}", lambda c, x, n=name, b=content: upload(c, "bad_upload", n, b),
                          422, (says, "bad_upload")))
    return cases


def _labels(x: dict, what: str) -> bytes:
    """Label files for chest_000 (512 x 512)."""
    lm = np.zeros((512, 512), np.uint8)
    lm[100:300, 300:450] = 1
    if what == "good":
        return label_bytes(x["labels"], lm, "good.nii.gz")
    if what == "shape":
        return label_bytes(x["labels"], lm[:256, :256], "shape.nii.gz")
    if what == "value9":
        lm[400:450, 100:200] = 9
        return label_bytes(x["labels"], lm, "value9.nii.gz")
    if what == "colour":
        return png(np.stack([lm * 255, lm * 0, lm * 40], -1))
    raise KeyError(what)


LONG = "left lung " * 60
HTTP_CASES = _bad_image_cases() + [
    Case("datastore-broken-file", lambda c, x: infer(c, "broken"), 422, ("broken.png", "truncated PNG")),
    # requests
    Case("unknown-model", lambda c, x: infer(c, model="lung_v9"), 404, ("lung_v9",)),
    Case("unknown-train-task", lambda c, x: c.post("/train/lung_v9", json={}), 404,
         ("lung_v9", "xray_textseg_train")),
    Case("params-not-json", lambda c, x: infer(c, raw="{prompt: heart"), 400, ("malformed JSON",)),
    Case("params-a-list", lambda c, x: infer(c, raw="[1, 2]"), 400, ("must be a JSON object",)),
    Case("no-image-no-file", lambda c, x: infer(c, ""), 400, ("Neither Image nor File",)),
    Case("unknown-image-id", lambda c, x: infer(c, "chest_999"), 404, ("chest_999",)),
    Case("image-path-traversal", lambda c, x: infer(c, f"../{x['root'].name}/studies/chest_000.png"), 404,
         ("server paths are not accepted",)),
    Case("image-absolute-path", lambda c, x: infer(c, str(x["studies"] / "chest_000.png")), 404,
         ("server paths are not accepted",)),
    Case("image-path-in-params", lambda c, x: infer(c, params={"prompt": "heart", "image": "/etc/hostname"}), 404,
         ("server paths are not accepted",)),
    Case("unknown-output", lambda c, x: infer(c, output="jpeg"), 422, ("output",)),
    # prompts
    Case("prompt-empty", lambda c, x: infer(c, params={"prompt": ""}), 400, ("missing 'prompt'",)),
    Case("prompt-blank", lambda c, x: infer(c, params={"prompt": "  \n "}), 400, ("missing 'prompt'",)),
    Case("prompt-missing", lambda c, x: infer(c, params={}), 400, ("missing 'prompt'",)),
    Case("prompt-unknown", lambda c, x: infer(c, params={"prompt": "spleen"}), 400, ("spleen", "known labels")),
    Case("prompt-ambiguous", lambda c, x: infer(c, params={"prompt": "LL"}), 400, ("left lung",)),
    Case("prompt-very-long", lambda c, x: infer(c, params={"prompt": LONG}), 400, ("600 characters",)),
    Case("prompt-german", lambda c, x: infer(c, params={"prompt": "linke Lunge"}), 400, ("linke Lunge",)),
    Case("prompt-cjk", lambda c, x: infer(c, params={"prompt": "左肺"}), 400, ("empty prompt", "known labels")),
    Case("prompt-number", lambda c, x: infer(c, params={"prompt": 5}), 400, ("must be text",)),
    Case("prompt-list", lambda c, x: infer(c, params={"prompt": ["heart"]}), 400, ("must be text",)),
    # conflicting or impossible options
    Case("box-and-boxes", lambda c, x: infer(c, params={"prompt": "heart", "box": [1, 1, 50, 50],
                                                         "boxes": {"heart": [1, 1, 50, 50]}}), 400, ("not both",)),
    Case("box-two-labels", lambda c, x: infer(c, params={"prompt": "heart, left lung", "box": [1, 1, 50, 50]}), 400,
         ("exactly one",)),
    Case("box-label-not-asked", lambda c, x: infer(c, params={"prompt": "heart", "boxes": {"femur": [1, 1, 50, 50]}}),
         400, ("femur",)),
    Case("box-outside-image", lambda c, x: infer(c, params={"prompt": "heart", "box": [600, 600, 700, 700]}), 400,
         ("outside the 512x512 image",)),
    Case("box-infinite", lambda c, x: infer(c, params={"prompt": "heart", "box": [0, 0, float("inf"), 50]}), 400,
         ("finite",)),
    # datastore uploads
    Case("upload-id-traversal", lambda c, x: upload(c, "../evil", "x.png", GOOD), 400, ("invalid image id",)),
    Case("upload-id-slash", lambda c, x: upload(c, "sub/evil", "x.png", GOOD), 400, ("invalid image id",)),
    Case("upload-id-hidden", lambda c, x: upload(c, ".hidden", "x.png", GOOD), 400, ("invalid image id",)),
    Case("upload-unknown-type", lambda c, x: upload(c, "prog", "x.exe", GOOD), 400, (".exe",)),
    # labels (PUT /datastore/label) for chest_000, 512 x 512
    Case("label-wrong-shape", lambda c, x: put_label(c, "chest_000", _labels(x, "shape")), 422,
         ("(256, 256)", "(512, 512)")),
    Case("label-unknown-value", lambda c, x: put_label(c, "chest_000", _labels(x, "value9")), 422, ("[9]",)),
    Case("label-undeclared-value", lambda c, x: put_label(c, "chest_000", _labels(x, "good"),
                                                          params={"label_info": [{"name": "heart", "idx": 3}]}),
         422, ("[1]",)),
    Case("label-info-malformed", lambda c, x: put_label(c, "chest_000", _labels(x, "good"),
                                                        params={"label_info": [{"name": "heart", "idx": "three"}]}),
         400, ("label_info",)),
    Case("label-truncated", lambda c, x: put_label(c, "chest_000", _labels(x, "good")[:300]), 422, ("NIfTI",)),
    Case("label-colour-png", lambda c, x: put_label(c, "chest_000", _labels(x, "colour"), "label.png"), 422,
         ("colours",)),
    Case("label-nrrd", lambda c, x: put_label(c, "chest_000", b"NRRD0004\n", "label.nrrd"), 400, (".nrrd",)),
    Case("label-unknown-image", lambda c, x: put_label(c, "chest_999", _labels(x, "good")), 404, ("chest_999",)),
    Case("label-tag-traversal", lambda c, x: put_label(c, "chest_000", _labels(x, "good"), tag="../../evil"), 400,
         ("invalid label tag",)),
    # other MONAI Label endpoints that answered 500 for a client's mistake
    Case("delete-unknown-image", lambda c, x: c.delete("/datastore/image", params={"id": "chest_999"}), 404,
         ("chest_999",)),
    Case("label-info-unknown", lambda c, x: c.put("/datastore/label/info", params={"label": "chest_999", "tag": "final"},
                                                  data={"info": "{}"}), 404, ("chest_999",)),
    Case("image-info-not-json", lambda c, x: c.put("/datastore/image/info", params={"image": "chest_000"},
                                                   data={"info": "{oops"}), 400, ("malformed JSON",)),
    Case("unknown-strategy", lambda c, x: c.post("/activelearning/smartest", json={}), 404, ("smartest",)),
]


@pytest.mark.parametrize("case", HTTP_CASES, ids=[c.id for c in HTTP_CASES])
def test_bad_request_is_a_clear_4xx(ctx, case):
    srv = ctx["server"]
    r = case.send(srv.client, ctx)
    assert r.status_code == case.status, f"{case.id}: {r.status_code} {r.text[:300]}"
    for words in case.says:
        assert words in r.text, f"{case.id}: {words!r} not in {r.text[:300]!r}"
    assert srv.client.get("/info/").status_code == 200


def test_nothing_was_written_outside_the_studies_folder(ctx):
    """After the table: traversal ids and tags wrote nothing outside, refused uploads are not listed."""
    root = ctx["root"]
    assert not [p for p in root.parent.rglob("*evil*")], "a traversal id or tag wrote a file"
    listed = ctx["server"].client.get("/datastore/", params={"output": "all"}).json()["objects"]
    assert "bad_upload" not in listed and "prog" not in listed
    assert not list(ctx["studies"].glob("bad_upload*"))
    assert "chest_000" in listed and not listed["chest_000"]["labels"], "a refused label was stored"


@pytest.mark.parametrize("name", list(ACCEPTED_IMAGES))
def test_scanner_formats_are_converted_and_segmented(ctx, name):
    """RGB, 16-bit, 1-bit PNG and RGB / MONOCHROME1 16-bit DICOM: a 200 with a mask, not a refusal."""
    c = ctx["server"].client
    r = infer(c, None, {"prompt": "left lung, heart"}, file=(name, ACCEPTED_IMAGES[name]))
    assert r.status_code == 200, r.text
    assert r.json()["label_names"] == {"left_lung": 1, "heart": 3}
    if name == "rgb.png":  # and the datastore takes it too, by upload
        assert upload(c, "rgb_upload", name, ACCEPTED_IMAGES[name]).json() == {"image": "rgb_upload"}
        assert infer(c, "rgb_upload").status_code == 200


RGB_FILM = ("rgb.png", ACCEPTED_IMAGES["rgb.png"])


def test_non_ascii_decoration_and_good_label_are_accepted(ctx):
    c = ctx["server"].client
    r = infer(c, None, {"prompt": "Left lung 🫁, heart ♥"}, file=RGB_FILM)  # encoded above: a cache hit
    assert r.status_code == 200 and r.json()["label_names"] == {"left_lung": 1, "heart": 3}, r.text
    good = _labels(ctx, "good")
    r = put_label(c, "chest_000", good, params={"label_names": {"left_lung": 1}})
    assert r.status_code == 200, r.text
    assert c.get("/datastore/label", params={"label": "chest_000", "tag": "final"}).content == good


# --- faults -------------------------------------------------------------------------------------------
def test_interrupted_label_uploads_keep_the_old_label(ctx):
    """A truncated label file (client crashed while writing it) and an upload cut off mid-body both leave
    the saved label byte-identical, and the server serving."""
    srv, c = ctx["server"], ctx["server"].client
    lm = np.zeros((512, 128), np.uint8)  # limb_000 is 512 x 128
    lm[50:250, 30:90] = 6
    old = label_bytes(ctx["labels"], lm, "limb_old.nii.gz")
    assert put_label(c, "limb_000", old).status_code == 200
    lm[300:480, 30:90] = 7
    new = label_bytes(ctx["labels"], lm, "limb_new.nii.gz")

    r = put_label(c, "limb_000", new[: len(new) // 2])
    assert r.status_code == 422 and "NIfTI" in r.text

    request = c.build_request("PUT", "/datastore/label", params={"image": "limb_000", "tag": "final"},
                              files={"label": ("label.nii.gz", new)})
    body = request.read()
    head = f"PUT {request.url.raw_path.decode()} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in request.headers.items() if k.lower() != "host") + "\r\n"
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(head.encode() + body[: len(body) // 2])
        time.sleep(0.5)
    time.sleep(0.5)
    assert c.get("/info/").status_code == 200
    assert c.get("/datastore/label", params={"label": "limb_000", "tag": "final"}).content == old
    assert put_label(c, "limb_000", new).status_code == 200  # and a complete save still works
    assert c.get("/datastore/label", params={"label": "limb_000", "tag": "final"}).content == new


def _save_forever(studies: str, a: str, b: str) -> None:
    store = SafeLocalDatastore(studies, extensions=json.loads(FILE_EXT), auto_reload=False)
    while True:
        for path in (a, b):
            store.save_label("big", path, "final", {"label_names": {"heart": 3}})


def test_killed_label_save_leaves_old_or_new_label(tmp_path):
    """SIGKILL while the datastore saves labels, at several moments: the label is always exactly one of
    the two saved files and datastore_v2.json always parses (MONAI Label's own copy truncates first)."""
    studies = tmp_path / "studies"
    studies.mkdir()
    Image.fromarray(film(2048, 2048)).save(studies / "big.png")
    a, b = tmp_path / "a.nii", tmp_path / "b.nii"
    for path, rows in ((a, slice(200, 900)), (b, slice(1000, 1800))):
        lm = np.zeros((2048, 2048), np.uint8)
        lm[rows, 300:1700] = 3
        save_mask(lm, path)
    versions = {a.read_bytes(), b.read_bytes()}
    extensions = json.loads(FILE_EXT)
    SafeLocalDatastore(str(studies), extensions=extensions, auto_reload=False).save_label(
        "big", str(a), "final", {"label_names": {"heart": 3}})
    dest = studies / "labels" / "final" / "big.nii"
    fork = multiprocessing.get_context("fork")
    for delay in (0.05, 0.2, 0.35, 0.5, 0.7, 0.9):
        proc = fork.Process(target=_save_forever, args=(str(studies), str(a), str(b)))
        proc.start()
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert dest.read_bytes() in versions, f"label broken by a kill after {delay} s"
        json.loads((studies / "datastore_v2.json").read_text())
        reopened = SafeLocalDatastore(str(studies), extensions=extensions, auto_reload=False)
        assert reopened.get_label_uri("big", "final") == str(dest.resolve())


def _score_with_stale_copy(studies: str, ready, go) -> None:
    """What MONAI Label's scoring subprocess does: open the datastore, work a while, then store a score."""
    store = SafeLocalDatastore(studies, extensions=json.loads(FILE_EXT), auto_reload=False)
    ready.set()
    go.wait(60)
    store.update_image_info("b", {"xray_textseg_uncertainty": {"value": 0.5, "adapter": "none"}})


def test_a_score_written_by_another_process_keeps_labels_saved_meanwhile(tmp_path):
    """Regression: a scoring subprocess opened the datastore before labels were saved and wrote its
    stale copy back with the score, dropping the labels' label_info (training then lost the heart)."""
    studies = tmp_path / "studies"
    studies.mkdir()
    for name in ("a", "b"):
        Image.fromarray(film(128, 128)).save(studies / f"{name}.png")
    lm = np.zeros((128, 128), np.uint8)
    lm[20:60, 20:60], lm[70:110, 70:110] = 1, 2
    save_mask(lm, tmp_path / "a.nii.gz")
    server_store = SafeLocalDatastore(str(studies), extensions=json.loads(FILE_EXT), auto_reload=False)
    fork = multiprocessing.get_context("fork")
    ready, go = fork.Event(), fork.Event()
    scorer = fork.Process(target=_score_with_stale_copy, args=(str(studies), ready, go))
    scorer.start()
    assert ready.wait(60)
    info = {"label_info": [{"name": "left lung", "idx": 1}, {"name": "heart", "idx": 2}]}
    server_store.save_label("a", str(tmp_path / "a.nii.gz"), "final", info)
    go.set()
    scorer.join(60)
    assert scorer.exitcode == 0
    reopened = SafeLocalDatastore(str(studies), extensions=json.loads(FILE_EXT), auto_reload=False)
    assert reopened.get_label_info("a", "final")["label_info"] == info["label_info"]
    assert reopened.get_image_info("b")["xray_textseg_uncertainty"]["value"] == 0.5
    assert server_store.get_label_info("a", "final")["label_info"] == info["label_info"]


def _adapter(store_root: Path, version: str, predictor) -> Path:
    """A structurally valid adapter for the packaged backbone (base decoder, an untrained head marked
    trained): enough for the server to load and serve it."""
    from xray_textseg.adapters import save_adapter
    from xray_textseg.text import PromptHead

    enc = predictor.text_encoder
    head = PromptHead(enc.dim, n_tokens=4, hidden=256)
    head.trained.fill_(True)
    meta = {"backbone": predictor.backbone.name, "text_encoder": enc.name, "text_dim": enc.dim, "n_tokens": 4,
            "head_hidden": 256, "labels": list(predictor.labels), "validation": {"dice": {}}}
    return save_adapter(store_root / version, head=head, decoder=predictor._base[1], encoder_peft=None,
                        priors=predictor.priors.to_json(), metadata=meta)


def test_broken_adapter_versions_are_skipped(ctx, predictor):
    """current.json pointing at a truncated, incomplete or changed (checksums) version: it is skipped with an error
    line and the previous valid version is served; an unreadable current.json falls back to zero-shot."""
    from xray_textseg.adapters import AdapterStore

    srv, c = ctx["server"], ctx["server"].client
    store = AdapterStore(ctx["root"] / "adapters")
    for version in ("v0001", "v0002", "v0003", "v0004"):
        _adapter(store.root, version, predictor)
    decoder = store.path("v0003") / "decoder.safetensors"
    decoder.write_bytes(decoder.read_bytes()[: decoder.stat().st_size // 2])
    (store.path("v0004") / "decoder.safetensors").unlink()
    for version in ("v0001", "v0002", "v0003"):
        store.set_current(version, "test")

    r = infer(c, None, file=RGB_FILM)
    assert r.status_code == 200, r.text
    assert (r.json()["mode"], r.json()["adapter"]) == ("adapter", "v0002")
    log = srv.log_tail(200)
    assert "adapter v0003 is unusable and skipped" in log and "serving the previous valid version v0002" in log

    store.set_current("v0004", "test")  # history: v0001, v0002, v0003
    r = infer(c, None, file=RGB_FILM)
    assert r.status_code == 200 and r.json()["adapter"] == "v0002", r.text
    log = srv.log_tail(200)
    assert "adapter v0004 is unusable and skipped" in log and "decoder.safetensors" in log

    _adapter(store.root, "v0005", predictor)  # bytes flipped inside its decoder: it still parses
    decoder = store.path("v0005") / "decoder.safetensors"
    data = bytearray(decoder.read_bytes())
    data[-256:] = b"\xff" * 256
    decoder.write_bytes(bytes(data))
    store.set_current("v0005", "test")  # history: v0001, v0002, v0003, v0004
    r = infer(c, None, file=RGB_FILM)
    assert r.status_code == 200 and r.json()["adapter"] == "v0002", r.text
    log = srv.log_tail(200)
    assert "adapter v0005 is unusable and skipped" in log and "do(es) not match the checksums" in log

    (store.root / "current.json").write_text('{"current": "v0002", "hist')  # torn by a disk fault
    r = infer(c, None, file=RGB_FILM)
    assert r.status_code == 200 and r.json()["mode"] == "zero-shot", r.text
    assert "current.json is unreadable" in srv.log_tail(200)
    (store.root / "current.json").unlink()


def test_store_reads_a_torn_pointer_as_no_adapter(tmp_path, caplog):
    from xray_textseg.adapters import AdapterStore

    store = AdapterStore(tmp_path)
    (tmp_path / "current.json").write_text('{"current": "v0003", "history": ["v0001", "v0002", "v0001"]}')
    assert store.fallback_order() == ["v0003", "v0001", "v0002"]
    (tmp_path / "current.json").write_text('{"current": "v00')
    assert store.current() is None and store.fallback_order() == [] and store.rollback() is None
    assert "current.json is unreadable" in caplog.text


def test_concurrent_infers_and_label_saves(ctx):
    """16 infers (8 new films, each asked twice) and 8 label saves at once while an adapter trains: no 5xx,
    every saved label is there afterwards and the training run finishes."""
    c = ctx["server"].client
    ids = [f"load_{i:02d}" for i in range(8)]
    for image_id in ids:
        assert upload(c, image_id, "x.png", GOOD).status_code == 200
    lm = np.zeros((256, 256), np.uint8)
    saved = {}
    for i, image_id in enumerate(ids):
        lm[:] = 0
        lm[20 + i:120 + i, 30:100] = 1
        saved[image_id] = label_bytes(ctx["labels"], lm, f"{image_id}.nii.gz")
    for image_id in ids[:4]:  # enough final labels for a training run
        assert put_label(c, image_id, saved[image_id], params={"label_names": {"left_lung": 1}}).status_code == 200
    r = c.post("/train/xray_textseg_train", json={"epochs": 3, "trigger": "load test"})
    assert r.status_code == 200, r.text

    def one(job):
        kind, image_id = job
        with httpx.Client(base_url=ctx["server"].url, timeout=600) as cl:
            if kind == "infer":
                return infer(cl, image_id, {"prompt": "left lung, heart"}).status_code
            return put_label(cl, image_id, saved[image_id]).status_code

    jobs = [("infer", ids[i % 8]) for i in range(16)] + [("label", image_id) for image_id in ids]
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(one, jobs[::2] + jobs[1::2]))
    assert statuses == [200] * len(jobs)
    for image_id, content in saved.items():
        assert c.get("/datastore/label", params={"label": image_id, "tag": "final"}).content == content
    deadline = time.time() + 900
    while time.time() < deadline:
        stats = c.get("/info/").json()["train_stats"]["xray_textseg_train"]
        if stats.get("trigger") == "load test" and stats.get("status") in ("done", "failed", "stopped"):
            break
        time.sleep(3)
    assert stats.get("status") == "done", stats


# --- engine-level limits ------------------------------------------------------------------------------
def test_huge_dicom_is_refused_from_the_header_without_reading_pixels(tmp_path):
    """A 30000 x 30000 claim with 8 MB of pixel data: refused with well under 1 MB allocated."""
    path = tmp_path / "claim.dcm"
    path.write_bytes(dicom(np.zeros((2048, 4096), np.uint8), rows=30000, cols=30000))
    tracemalloc.start()
    try:
        with pytest.raises(ImageReadError, match="too large: 30000x30000"):
            load_radiograph(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"{peak} bytes allocated: the pixel data was read"


# --- the CLI ------------------------------------------------------------------------------------------
CLI_CASES = [  # (id, image file name, extra args, what stderr must say)
    ("truncated-png", "truncated.png", [], "truncated PNG"),
    ("tiny-png", "tiny.png", [], "too small"),
    ("huge-png", "huge.png", [], "too large: 30000x30000"),
    ("dicom-no-pixels", "nopixels.dcm", [], "no pixel data"),
    ("dicom-multiframe", "multiframe.dcm", [], "multi-frame"),
    ("missing-file", "absent.png", [], "absent.png"),
    ("prompt-empty", "rgb.png", ["-p", ""], "empty prompt"),
    ("prompt-unknown", "rgb.png", ["-p", "spleen"], "known labels"),
    ("prompt-very-long", "rgb.png", ["-p", LONG], "600 characters"),
    ("prompt-german", "rgb.png", ["-p", "linke Lunge"], "linke Lunge"),
    ("box-two-prompts", "rgb.png", ["-p", "lungs", "--box", "1", "1", "50", "50"], "--box needs exactly one"),
    ("box-infinite", "rgb.png", ["--box", "0", "0", "inf", "50"], "finite"),
    ("labels-unknown", "rgb.png", ["--labels", "spleen"], "spleen"),
    ("output-jpeg", "rgb.png", ["-o", "{tmp}/mask.jpg"], "mask.jpg"),
]


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    for name, (content, _) in BAD_IMAGES.items():
        (d / name).write_bytes(content)
    for name, content in ACCEPTED_IMAGES.items():
        (d / name).write_bytes(content)
    return d


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    from xray_textseg.cli import main

    try:
        code = main(args)
    except SystemExit as exc:  # argparse
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_exits_2_naming_the_problem(cli_files, tmp_path, capsys, case):
    _, image, extra, says = case
    out = tmp_path / "out"
    args = ["predict", str(cli_files / image), "--device", "cpu", "--no-refine"]
    args += [] if "-p" in extra else ["-p", "heart"]
    args += [a.replace("{tmp}", str(tmp_path)) for a in extra]
    args += [] if "-o" in extra else ["-o", str(out)]
    code, err = run_cli(args, capsys)
    assert code == 2, err
    assert says in err and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "mask.jpg").exists()


def test_cli_argument_errors_exit_2(cli_files, capsys):
    code, err = run_cli(["predict", str(cli_files / "rgb.png"), "-p", "heart", "--box", "1", "2", "3", "-o", "x"],
                        capsys)
    assert code == 2 and "--box" in err


def test_cli_broken_adapter_exits_2(cli_files, tmp_path, capsys):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "metadata.json").write_text("{}")
    code, err = run_cli(["predict", str(cli_files / "rgb.png"), "-p", "heart", "--device", "cpu",
                         "--adapter", str(tmp_path / "adapter"), "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and "cannot read adapter" in err and str(tmp_path / "adapter") in err
