"""Synthetic sample data: deterministic, laid out by patient side, and written like the real data folders."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from PIL import Image
from scipy import ndimage
from xray_textseg.sample_data import (
    CHEST_LABELS,
    DX_FOR_PRESENTATION,
    LIMB_LABELS,
    MAX_VALUE,
    case_rng,
    generate_cases,
    main,
    make_sample_data,
    synth_chest,
    synth_lower_limb,
    to_uint8,
)

N_CASES = 4  # per region; each property must hold for every case, not on average


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


@pytest.fixture(scope="module")
def chests():
    return [synth_chest(case_rng(0, "chest", i)) for i in range(N_CASES)]


@pytest.fixture(scope="module")
def limbs():
    return [synth_lower_limb(case_rng(0, "lower_limb", i)) for i in range(N_CASES)]


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    summary = make_sample_data(out, n_chest=1, n_limb=2, n_dicom=4, seed=3)
    return out, summary


# ------------------------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("synth", [synth_chest, synth_lower_limb])
def test_same_seed_gives_identical_arrays(synth):
    a = synth(np.random.default_rng(7))
    b = synth(np.random.default_rng(7))
    assert np.array_equal(a.image, b.image)
    assert a.masks.keys() == b.masks.keys()
    assert all(np.array_equal(a.masks[k], b.masks[k]) for k in a.masks)


@pytest.mark.parametrize("synth", [synth_chest, synth_lower_limb])
def test_different_seed_gives_different_cases(synth):
    a = synth(np.random.default_rng(1))
    b = synth(np.random.default_rng(2))
    assert not np.array_equal(a.image, b.image)
    assert any(not np.array_equal(a.masks[k], b.masks[k]) for k in a.masks)


def test_case_stream_does_not_depend_on_other_cases():
    """limb_001 must be the same whatever counts were asked for, and named after its index."""
    few, more = generate_cases(n_chest=0, n_limb=2, seed=5), generate_cases(n_chest=0, n_limb=3, seed=5)
    assert [c.name for c in more] == ["limb_000", "limb_001", "limb_002"]
    assert np.array_equal(few[1].image, more[1].image)
    assert np.array_equal(few[1].image, synth_lower_limb(case_rng(5, "lower_limb", 1)).image)
    assert not np.array_equal(more[1].image, more[2].image)


# ------------------------------------------------------------------------------------------ chest


def test_chest_image_format(chests):
    for case in chests:
        assert case.region == "chest"
        assert case.image.dtype == np.uint16 and case.image.shape == (512, 512)
        assert case.image.max() <= MAX_VALUE
        assert tuple(case.masks) == CHEST_LABELS
        for label, mask in case.masks.items():
            assert mask.dtype == bool and mask.shape == case.image.shape
            assert mask.any(), label


def test_chest_labels_are_patient_side(chests):
    """PA film: the patient's left is on the image's right."""
    for case in chests:
        centre = case.image.shape[1] / 2
        c = {label: _centroid(mask) for label, mask in case.masks.items()}
        assert c["left_lung"][0] > centre > c["right_lung"][0]
        assert c["left_clavicle"][0] > centre > c["right_clavicle"][0]
        assert centre < c["heart"][0] < centre + 0.15 * case.image.shape[1]  # bulges to the patient's left
        for side in ("left", "right"):
            assert c[f"{side}_clavicle"][1] < c[f"{side}_lung"][1]  # clavicles above the lung centres
        assert c["heart"][1] > c["left_lung"][1]  # heart in the lower chest


def test_chest_lungs_exclude_the_heart_like_scr(chests):
    for case in chests:
        assert not (case.masks["heart"] & case.masks["left_lung"]).any()
        assert not (case.masks["heart"] & case.masks["right_lung"]).any()
        assert not (case.masks["left_lung"] & case.masks["right_lung"]).any()


def test_chest_contrast_lungs_dark_heart_and_bones_bright(chests):
    for case in chests:
        mean = {label: float(case.image[mask].mean()) for label, mask in case.masks.items()}
        lungs = float(case.image[case.masks["left_lung"] | case.masks["right_lung"]].mean())
        assert lungs < mean["heart"]
        assert lungs < mean["left_clavicle"] and lungs < mean["right_clavicle"]
        lung_masks = case.masks["left_lung"] | case.masks["right_lung"]
        body = case.image[~ndimage.binary_dilation(lung_masks, iterations=5)]
        assert lungs < float(np.median(body))  # lungs darker than the soft tissue around them


def test_chest_size_is_a_parameter():
    case = synth_chest(np.random.default_rng(0), size=256)
    assert case.image.shape == (256, 256)
    assert all(m.shape == (256, 256) and m.any() for m in case.masks.values())


# ------------------------------------------------------------------------------------------ lower limb


def test_limb_layout(limbs):
    for case in limbs:
        assert case.region == "lower_limb"
        assert case.image.dtype == np.uint16 and case.image.shape == (512, 128)
        assert tuple(case.masks) == LIMB_LABELS
        femur, tibia = case.masks["femur"], case.masks["tibia"]
        assert femur.any() and tibia.any()
        assert not (femur & tibia).any()
        assert _centroid(femur)[1] < _centroid(tibia)[1]
        rows_f, rows_t = np.nonzero(femur.any(1))[0], np.nonzero(tibia.any(1))[0]
        assert rows_f.max() <= rows_t.min() + 3  # femur above the knee, tibia below it
        assert rows_f.min() < 0.3 * case.image.shape[0] and rows_t.max() > 0.8 * case.image.shape[0]


def test_limb_bones_brighter_than_surrounding_soft_tissue(limbs):
    for case in limbs:
        bones = case.masks["femur"] | case.masks["tibia"]
        for label, mask in case.masks.items():
            ring = ndimage.binary_dilation(mask, iterations=6) & ~ndimage.binary_dilation(bones, iterations=2)
            assert case.image[mask].mean() > case.image[ring].mean() + 100, label


def test_limb_shape_and_side_vary():
    cases = [synth_lower_limb(case_rng(0, "lower_limb", i), height=1024, width=128) for i in range(8)]
    assert all(c.image.shape == (1024, 128) for c in cases)
    assert {c.meta["laterality"] for c in cases} == {"L", "R"}


# ------------------------------------------------------------------------------------------ writing


def test_png_window_spans_8_bits(chests):
    png = to_uint8(chests[0].image)
    assert png.dtype == np.uint8 and png.min() == 0 and png.max() == 255


def test_make_sample_data_layout(sample_dir):
    out, summary = sample_dir
    manifest = json.loads((out / "manifest.json").read_text())
    names = [c["name"] for c in manifest["cases"]]
    assert names == ["chest_000", "limb_000", "limb_001"]
    assert "make-sample-data" in (out / "README.md").read_text()
    for entry in manifest["cases"]:
        image = Image.open(out / "images" / f"{entry['name']}.png")
        assert image.mode == "L" and image.size == (entry["width"], entry["height"])
        for label in entry["labels"]:
            mask = np.asarray(Image.open(out / "labels" / label / f"{entry['name']}.png"))
            assert mask.shape == (entry["height"], entry["width"])
            assert set(np.unique(mask)) == {0, 255}
    assert summary["n_dicom"] == 4
    assert summary["total_bytes"] == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())


def test_make_sample_data_dicom(sample_dir):
    out, _ = sample_dir
    files = sorted((out / "dicom").glob("*.dcm"))
    assert [f.name for f in files] == ["chest_000_mono1.dcm", "chest_000_mono2.dcm",
                                       "limb_000_mono1.dcm", "limb_000_mono2.dcm"]
    for case in ("chest_000", "limb_000"):
        mono2 = pydicom.dcmread(out / "dicom" / f"{case}_mono2.dcm")
        mono1 = pydicom.dcmread(out / "dicom" / f"{case}_mono1.dcm")
        assert mono2.preamble == b"\0" * 128
        assert mono2.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert mono2.SOPClassUID == DX_FOR_PRESENTATION and mono2.Modality == "DX"
        assert mono2.PhotometricInterpretation == "MONOCHROME2"
        assert mono1.PhotometricInterpretation == "MONOCHROME1"
        assert mono2.BitsAllocated == 16 and mono2.BitsStored == 12
        assert mono2.StudyInstanceUID == mono1.StudyInstanceUID
        assert mono2.SOPInstanceUID != mono1.SOPInstanceUID
        a, b = mono2.pixel_array.astype(np.int32), mono1.pixel_array.astype(np.int32)
        assert np.array_equal(b, MAX_VALUE - a)
        png = np.asarray(Image.open(out / "images" / f"{case}.png"))
        assert np.array_equal(png, to_uint8(mono2.pixel_array))  # the PNG is a window of the DICOM
    assert pydicom.dcmread(out / "dicom" / "chest_000_mono2.dcm").BodyPartExamined == "CHEST"
    assert pydicom.dcmread(out / "dicom" / "limb_000_mono2.dcm").BodyPartExamined == "LEG"


def test_make_sample_data_is_byte_for_byte_reproducible(sample_dir, tmp_path):
    out, _ = sample_dir
    make_sample_data(tmp_path, n_chest=1, n_limb=2, n_dicom=4, seed=3)
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        assert path.read_bytes() == (tmp_path / path.relative_to(out)).read_bytes(), path


def test_main_rewrites_only_its_own_files(tmp_path, capsys):
    keep = tmp_path / "images" / "labels" / "final" / "limb_000.png"  # MONAI Label's saved label
    keep.parent.mkdir(parents=True)
    keep.write_bytes(b"x")
    common = ["--out", str(tmp_path), "--n-chest", "0", "--seed", "1"]
    assert main([*common, "--n-limb", "3", "--n-dicom", "2"]) == 0
    assert main([*common, "--n-limb", "2", "--n-dicom", "0"]) == 0
    images = sorted(p.name for p in (tmp_path / "images").glob("*.png"))
    assert images == ["limb_000.png", "limb_001.png"]
    assert not (tmp_path / "labels" / "tibia" / "limb_002.png").exists()
    assert not list((tmp_path / "dicom").glob("*.dcm"))
    assert keep.read_bytes() == b"x"
    assert '"n_limb": 2' in capsys.readouterr().out
