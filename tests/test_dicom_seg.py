"""DICOM SEG writer/reader of the engine (no PACS needed): geometry, references, coded anatomy."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from conftest import SAMPLE, real_dir
from xray_textseg.dicom_seg import SegError, read_seg, segment_name, write_seg
from xray_textseg.io import load_mask, load_radiograph, save_mask

DX = SAMPLE / "dicom" / "chest_000_mono1.dcm"


def asymmetric_map(shape: tuple[int, int]) -> np.ndarray:
    """Left lung (1) on the image right, heart (3) low and left of centre, left clavicle (4) a thin bar top
    right: no flip, transpose or rotation maps it onto itself."""
    h, w = shape
    lm = np.zeros(shape, dtype=np.uint8)
    lm[h // 8: h * 5 // 8, w * 9 // 16: w * 7 // 8] = 1
    lm[h // 2: h * 3 // 4, w * 5 // 16: w // 2] = 3
    lm[h // 16: h // 16 + 8, w // 2: w * 15 // 16] = 4
    return lm


def frames_by_segment(ds) -> dict[int, np.ndarray]:
    """Decode the SEG without our reader: pydicom's pixel_array plus the per-frame segment numbers."""
    frames = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
    return {int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber): frames[i] > 0
            for i, f in enumerate(ds.PerFrameFunctionalGroupsSequence)}


def test_seg_of_a_dx_film(tmp_path):
    src = pydicom.dcmread(DX)
    lm = asymmetric_map((src.Rows, src.Columns))
    seg = write_seg(DX, lm, {1: "left_lung", 3: "heart", 4: "left_clavicle", 2: "right_lung"})
    seg.save_as(tmp_path / "seg.dcm")
    ds = pydicom.dcmread(tmp_path / "seg.dcm")

    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert (ds.Rows, ds.Columns) == (src.Rows, src.Columns) and int(ds.NumberOfFrames) == 3
    assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.PatientID == src.PatientID
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
    for frame in ds.PerFrameFunctionalGroupsSequence:  # every frame is tied to the source film
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert "FrameOfReferenceUID" not in ds  # DX without plane geometry: referenced by SOP instance only
    assert [float(v) for v in ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing] == [0.7, 0.7]

    # one segment per value present (2 is named but absent), in value order, pixels unflipped
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["left lung", "heart", "left clavicle"]
    masks = frames_by_segment(ds)
    for number, value in ((1, 1), (2, 3), (3, 4)):
        assert np.array_equal(masks[number], lm == value)

    # coded anatomy: specific SNOMED CT codes for the lungs, Clavicle + laterality modifier
    types = [s.SegmentedPropertyTypeCodeSequence[0] for s in ds.SegmentSequence]
    assert [(t.CodeValue, t.CodingSchemeDesignator) for t in types] == [
        ("44029006", "SCT"), ("80891009", "SCT"), ("51299004", "SCT")]
    assert types[2].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "7771000"  # Left
    assert all(s.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000" for s in ds.SegmentSequence)
    assert [segment_name(s) for s in ds.SegmentSequence] == ["left_lung", "heart", "left_clavicle"]

    back = read_seg(tmp_path / "seg.dcm")
    assert back.shape == (src.Rows, src.Columns) and back.source_sop_instance_uid == src.SOPInstanceUID
    assert back.source_series_instance_uid == src.SeriesInstanceUID
    assert [(s.name, int(s.mask.sum())) for s in back.segments] == [
        ("left_lung", int((lm == 1).sum())), ("heart", int((lm == 3).sum())), ("left_clavicle", int((lm == 4).sum()))]


def test_free_text_names_and_right_side():
    src = pydicom.dcmread(DX)
    lm = np.zeros((src.Rows, src.Columns), np.uint8)
    lm[40:60, 10:200] = 5
    lm[300:320, 10:20] = 9
    seg = write_seg(src, lm, {5: "right clavicle", 9: "nodule"})
    clav, other = seg.SegmentSequence
    assert clav.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == \
        "24028007"  # Right
    assert segment_name(clav) == "right_clavicle"
    assert other.SegmentLabel == "nodule" and segment_name(other) is None


def test_bad_label_maps_are_refused():
    src = pydicom.dcmread(DX)
    with pytest.raises(SegError, match="does not match"):
        write_seg(DX, np.ones((src.Columns + 1, src.Rows), np.uint8), {1: "heart"})
    with pytest.raises(SegError, match="empty"):
        write_seg(DX, np.zeros((src.Rows, src.Columns), np.uint8), {1: "heart"})
    with pytest.raises(SegError, match="no name"):
        write_seg(DX, np.full((src.Rows, src.Columns), 2, np.uint8), {1: "heart"})
    with pytest.raises(SegError, match="not a DICOM SEG"):
        read_seg(DX)


def test_seg_of_a_real_cr_film(tmp_path):
    """Pydicom-data's JPEG 2000 lossy CR (MONOCHROME1, 1955 rows x 1841 columns, PixelSpacing 0/0): not square,
    so a transposed mask cannot pass; lossy source declared in the SEG."""
    path = real_dir("dicom") / "RG1_J2KI.dcm"
    image = load_radiograph(path)
    lm = asymmetric_map(image.shape)
    seg = write_seg(path, lm, {1: "left lung", 3: "heart", 4: "left clavicle"})
    seg.save_as(tmp_path / "seg.dcm")
    ds = pydicom.dcmread(tmp_path / "seg.dcm")
    assert (ds.Rows, ds.Columns) == image.shape == (1955, 1841)
    assert ds.LossyImageCompression == "01" and ds.LossyImageCompressionMethod == "ISO_15444_1"
    assert "PixelMeasuresSequence" not in ds.SharedFunctionalGroupsSequence[0]  # its spacing is 0: not copied
    masks = frames_by_segment(ds)
    assert np.array_equal(masks[1], lm == 1) and np.array_equal(masks[3], lm == 4)


def test_nrrd_label_map_for_ohif(tmp_path):
    """The raw NRRD the infer task returns when OHIF asks (result_extension .nrrd): OHIF copies its data into
    the labelmap row by row, so the data must be the (H, W) map in C order; the header matches the NIfTI."""
    image = load_radiograph(DX)
    lm = asymmetric_map(image.shape)
    save_mask(lm, tmp_path / "m.nrrd", like=image)
    raw = (tmp_path / "m.nrrd").read_bytes()
    header, data = raw.split(b"\n\n", 1)
    assert b"sizes: 512 512 1" in header and b"encoding: raw" in header and b"type: uint8" in header
    assert b"space directions: (0.7,0,0) (0,0.7,0) (0,0,1)" in header
    assert np.array_equal(np.frombuffer(data, np.uint8).reshape(image.shape), lm)
    save_mask(lm, tmp_path / "m.nii.gz", like=image)
    assert np.array_equal(load_mask(tmp_path / "m.nii.gz", image.shape), lm)
