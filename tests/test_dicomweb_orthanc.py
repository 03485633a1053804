"""DICOMweb with a real PACS: Orthanc (scripts/orthanc.sh, 127.0.0.1 only) holding the DICOM films, our MONAI
Label server started with ``--studies <orthanc>/dicom-web``; infer by series UID with a text prompt, the
calls OHIF's MONAI Label panel makes, and saved labels stored back in Orthanc as DICOM SEG, read back over
DICOMweb. One Orthanc and one server for the module. Skipped only when Orthanc cannot be found."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from conftest import REAL, REPO, SAMPLE, real_dir
from dicomweb_client import DICOMwebClient
from orthanc import Orthanc, locate_or_skip
from server import Server
from test_server_e2e import read_label_map
from xray_textseg.io import load_mask, load_radiograph, save_mask
from xray_textseg.metrics import dice

sys.path.insert(0, str(REPO / "apps" / "xray_textseg"))

RADIOGRAPH_MODALITIES = {"DX", "CR", "DR"}
OHIF_PARAMS = {"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False,
               "restore_label_idx": False}  # what OHIF's MonaiLabelClient.infer adds to the options


@dataclass
class Film:
    path: Path
    study: str
    series: str
    sop: str
    shape: tuple[int, int]
    modality: str


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    locate_or_skip()
    orthanc = Orthanc(tmp_path_factory.mktemp("pacs") / "orthanc")
    try:
        orthanc.wait_ready()
        paths = sorted((SAMPLE / "dicom").glob("*.dcm"))
        if (REAL / "dicom").is_dir():  # real CR films (pydicom-data), read in place, never copied
            paths += sorted((REAL / "dicom").glob("*.dcm"))
        orthanc.films = {}
        for path in paths:
            assert orthanc.upload(path)["Status"] in ("Success", "AlreadyStored")
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            orthanc.films[path.stem] = Film(path, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                                            (int(ds.Rows), int(ds.Columns)), ds.Modality)
        yield orthanc
    finally:
        orthanc.stop()


@pytest.fixture(scope="module")
def server(pacs, tmp_path_factory):
    root = tmp_path_factory.mktemp("dicomweb_server")
    srv = Server(pacs.dicomweb, cwd=root,
                 conf={"adapter_dir": str(root / "adapters"), "auto_train_after": "0", "look_ahead": "false"},
                 env={"MONAI_LABEL_DICOMWEB_SEARCH_FILTER": json.dumps({"Modality": "DX,CR,DR"}),
                      "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(root / "cache"),
                      "MONAI_LABEL_AUTO_UPDATE_SCORING": "false"})  # no background scoring of every film
    try:
        srv.info = srv.wait_ready()
        srv.results = {}
        yield srv
    finally:
        srv.stop()


def infer(server, film: Film, prompt: str, output: str = "all", **extra) -> httpx.Response:
    r = server.client.post("/infer/xray_textseg", params={"image": film.series, "output": output},
                           data={"params": json.dumps({"prompt": prompt, **extra})})
    assert r.status_code == 200, f"{r.status_code} {r.text[:500]}\n{server.log_tail()}"
    return r


def nifti_of(response: httpx.Response) -> np.ndarray:
    from test_server_e2e import _multipart

    return read_label_map(_multipart(response)["image"])


def asymmetric_map(shape: tuple[int, int], values: tuple[int, ...]) -> np.ndarray:
    """Blocks that no flip, transpose or rotation maps onto themselves: the first value in the image's
    upper right, the second low and left of centre, the third a thin bar along the top right."""
    h, w = shape
    lm = np.zeros(shape, dtype=np.uint8)
    lm[h // 8: h * 5 // 8, w * 9 // 16: w * 7 // 8] = values[0]
    if len(values) > 1:
        lm[h // 2: h * 3 // 4, w * 5 // 16: w // 2] = values[1]
    if len(values) > 2:
        lm[h // 16: h // 16 + max(2, h // 64), w // 2: w * 15 // 16] = values[2]
    return lm


def seg_series(pacs, film: Film) -> list[str]:
    r = httpx.get(f"{pacs.dicomweb}/studies/{film.study}/series", params={"Modality": "SEG"}, timeout=30)
    r.raise_for_status()
    return [item["0020000E"]["Value"][0] for item in (r.json() if r.content else [])]


def fetch_seg(pacs, film: Film) -> pydicom.Dataset:
    """The one SEG of ``film``'s study, retrieved from Orthanc over DICOMweb (QIDO-RS then WADO-RS)."""
    series = seg_series(pacs, film)
    assert len(series) == 1, series
    instances = DICOMwebClient(url=pacs.dicomweb).retrieve_series(film.study, series[0])
    assert len(instances) == 1
    return instances[0]


def check_seg(seg: pydicom.Dataset, film: Film, label_map: np.ndarray, segments: list[tuple[int, str, str]]):
    """Geometry, references and segments of a SEG read back from the PACS. ``segments``: (value in the
    saved map, segment label, SNOMED CT property type code), in segment order."""
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert (seg.Rows, seg.Columns) == film.shape
    assert seg.StudyInstanceUID == film.study
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == film.series
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    assert frames.shape[0] == len(segments) == len(seg.SegmentSequence)
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        assert item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID == film.sop
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        value = segments[number - 1][0]
        assert np.array_equal(frame > 0, label_map == value), f"segment {number} is not where the label was"
    assert [(s.SegmentLabel, s.SegmentedPropertyTypeCodeSequence[0].CodeValue) for s in seg.SegmentSequence] == \
        [(label, code) for _, label, code in segments]


# --- the PACS -----------------------------------------------------------------------------------------------
def test_orthanc_listens_on_loopback_only(pacs):
    if not (pacs.folder / "bind_loopback.so").is_file():
        pytest.skip("no C compiler: Orthanc listens on all interfaces (remote HTTP clients get 403)")
    ports = {int(pacs.env["ORTHANC_HTTP_PORT"]), int(pacs.env["ORTHANC_DICOM_PORT"])}
    listening = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port = local.rsplit(":", 1)
            if state == "0A" and int(port, 16) in ports:  # LISTEN
                listening.setdefault(int(port, 16), set()).add(address)
    assert set(listening) == ports
    loopback = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1
    assert all(addresses <= loopback for addresses in listening.values()), listening


def test_server_lists_the_radiograph_series_of_the_pacs(server, pacs):
    films = pacs.films.values()
    expected = {f.series for f in films if f.modality in RADIOGRAPH_MODALITIES}
    stats = server.client.get("/datastore/").json()
    assert stats["total"] == len(expected) and stats["completed"] == 0
    r = server.client.post("/activelearning/first", json={})
    assert r.status_code == 200 and r.json()["id"] == min(expected)


# --- infer (3D Slicer's and OHIF's calls) -----------------------------------------------------------------
def test_infer_left_lung_of_a_dicom_series(server, pacs):
    film = pacs.films["chest_000_mono1"]  # MONOCHROME1: read as displayed, else the model sees a negative
    lm = nifti_of(infer(server, film, "left lung"))
    assert lm.shape == film.shape == (512, 512)
    truth = load_mask(SAMPLE / "labels" / "left_lung" / "chest_000.png", film.shape) > 0
    assert dice(lm == 1, truth) > 0.5
    assert np.nonzero(lm == 1)[1].mean() > 256  # patient's left = image right: not flipped
    server.results["chest_left_lung"] = lm


def test_infer_non_square_film_is_not_transposed(server, pacs):
    film = pacs.films["limb_000_mono1"]  # 512 rows x 128 columns, hip at the top
    lm = nifti_of(infer(server, film, "femur"))
    assert lm.shape == film.shape == (512, 128)
    truth = load_mask(SAMPLE / "labels" / "femur" / "limb_000.png", film.shape) > 0
    assert np.nonzero(lm == 6)[0].mean() < 256
    assert dice(lm == 6, truth) > dice(lm == 6, truth[::-1])  # upside down would fit its mirror image better


def test_ohif_infer_call_returns_raw_nrrd_in_image_order(server, pacs):
    """OHIF's panel asks for .nrrd and copies the data into its labelmap as it comes (x fastest)."""
    info = server.client.get("/info/").json()
    assert info["models"]["xray_textseg"]["labels"]["left_lung"] == 1
    film = pacs.films["chest_000_mono1"]
    r = infer(server, film, "left lung", output="image", **OHIF_PARAMS)
    header, data = r.content.split(b"\n\n", 1)
    assert header.startswith(b"NRRD") and b"encoding: raw" in header and b"sizes: 512 512 1" in header
    lm = np.frombuffer(data, dtype=np.uint8).reshape(film.shape)
    expected = server.results.get("chest_left_lung")
    if expected is None:
        expected = nifti_of(infer(server, film, "left lung"))
    assert np.array_equal(lm, expected)


def test_unknown_series_is_404(server):
    r = server.client.post("/infer/xray_textseg", params={"image": "1.2.3.4.5.6.7"},
                           data={"params": json.dumps({"prompt": "heart"})})
    assert r.status_code == 404, r.text


# --- labels back to the PACS as DICOM SEG ---------------------------------------------------------------------
def test_saved_label_is_stored_in_orthanc_as_dicom_seg(server, pacs, tmp_path):
    """3D Slicer's Submit Label: a NIfTI (W,H,1) label map with the segment names in label_info."""
    film = pacs.films["chest_000_mono2"]
    label_map = asymmetric_map(film.shape, (1, 3, 4))
    upload = tmp_path / "label.nii.gz"
    save_mask(label_map, upload, like=load_radiograph(film.path))
    label_info = [{"name": "left lung", "idx": 1}, {"name": "heart", "idx": 3}, {"name": "left clavicle", "idx": 4}]
    r = server.client.put("/datastore/label", params={"image": film.series, "tag": "final"},
                          data={"params": json.dumps({"label_info": label_info})},
                          files={"label": ("label.nii.gz", upload.read_bytes())})
    assert r.status_code == 200, f"{r.text}\n{server.log_tail()}"

    seg = fetch_seg(pacs, film)
    check_seg(seg, film, label_map, [(1, "left lung", "44029006"), (3, "heart", "80891009"),
                                     (4, "left clavicle", "51299004")])
    clavicle = seg.SegmentSequence[2].SegmentedPropertyTypeCodeSequence[0]
    assert clavicle.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "7771000"  # Left
    stats = server.client.get("/datastore/").json()  # the SEG series is a label, not a new image
    assert stats["completed"] == 1
    assert stats["total"] == len({f.series for f in pacs.films.values() if f.modality in RADIOGRAPH_MODALITIES})


def test_ohif_label_bin_save_on_a_non_square_film(server, pacs):
    """OHIF's MonaiLabelClient.save_label: PUT /datastore/label with the raw labelmap as label.bin."""
    film = pacs.films["limb_000_mono2"]  # 512 x 128
    label_map = asymmetric_map(film.shape, (6, 7))
    r = server.client.put("/datastore/label", params={"image": film.series},
                          data={"params": json.dumps({"label_names": {"femur": 6, "tibia": 7}})},
                          files={"label": ("label.bin", label_map.tobytes())})
    assert r.status_code == 200, f"{r.text}\n{server.log_tail()}"
    check_seg(fetch_seg(pacs, film), film, label_map, [(6, "femur", "71341001"), (7, "tibia", "12611008")])

    r = server.client.put("/datastore/label", params={"image": film.series},
                          files={"label": ("label.bin", label_map[:-1].tobytes())})
    assert r.status_code == 400 and "label.bin" in r.text  # wrong size: refused, nothing stored
    assert len(seg_series(pacs, film)) == 1


def test_label_on_a_real_cr_film(server, pacs):
    """Pydicom-data's JPEG 2000 CR (MONOCHROME1, 1955 rows x 1841 columns): infer, then save the result."""
    real_dir("dicom")
    film = pacs.films["RG1_J2KI"]
    lm = nifti_of(infer(server, film, "right lung"))
    assert lm.shape == film.shape == (1955, 1841)
    assert (lm == 2).any() and np.nonzero(lm == 2)[1].mean() < film.shape[1] / 2  # patient's right: image left
    label_map = np.where(lm == 2, 2, 0).astype(np.uint8)
    r = server.client.put("/datastore/label", params={"image": film.series},
                          data={"params": json.dumps({"label_names": {"right_lung": 2}})},
                          files={"label": ("label.bin", label_map.tobytes())})
    assert r.status_code == 200, r.text
    check_seg(fetch_seg(pacs, film), film, label_map, [(2, "right lung", "3341006")])


def test_seg_in_the_pacs_reads_back_as_a_training_label(server, pacs, tmp_path):
    """A fresh datastore (empty cache, as after a restart or on another server) finds the SEG series in the
    PACS and turns them into label maps with our values, for retraining."""
    from lib.dicomweb import RADIOGRAPH_FILTER, RadiographDICOMwebDatastore
    from monailabel.datastore.dicom import DICOMwebClientX

    store = RadiographDICOMwebDatastore(DICOMwebClientX(url=pacs.dicomweb), RADIOGRAPH_FILTER,
                                        cache_path=str(tmp_path / "cache"))
    chest, limb = pacs.films["chest_000_mono2"], pacs.films["limb_000_mono2"]
    assert {chest.series, limb.series} <= set(store.get_labeled_images())
    for film, expected in ((chest, asymmetric_map(chest.shape, (1, 3, 4))), (limb, asymmetric_map(limb.shape, (6, 7)))):
        path = store.get_label_uri(film.series, "final")
        assert path, f"no label for {film.path.name}"
        assert np.array_equal(load_mask(path, film.shape), expected)
