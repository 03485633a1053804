"""DICOM SEG for radiographs: write a label map as a DICOM Segmentation of its source image, and read one back.

What goes to a PACS (Orthanc, through DICOMweb) when a label is saved. Written with highdicom:

* one segment per label present in the map (BINARY, one frame per segment), each frame referencing the
  source image (DerivationImageSequence -> SourceImageSequence) and the SEG referencing the source series
  (ReferencedSeriesSequence), so viewers and MONAI Label find the image it belongs to;
* frames have the source's Rows x Columns in the same pixel order: row 0 = the top row of the stored image,
  column 0 = its first column (our masks are in that display orientation, see :mod:`xray_textseg.io`;
  MONOCHROME1 inversion changes grey values, never geometry), so nothing is ever flipped or resampled;
* coded anatomy (SNOMED CT): Lung, Left lung, Right lung, Heart, Clavicle, Femur, Tibia, category
  Anatomical Structure; the clavicles' side is a property type modifier (Left / Right), the lungs have
  their own left and right codes. A name outside the vocabulary keeps its text with a generic code.

A projection radiograph has no patient-space plane geometry (DX may carry a FrameOfReferenceUID without
ImagePositionPatient / ImageOrientationPatient, CR has none): the SEG is then written without a frame of
reference and its frames are tied to the source by SOP Instance UID only, which is what a 2D film needs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from . import __version__

SERIES_NUMBER = 300
"""Series number of our SEG series (MONAI Label's convention for labels)."""

_SCT = "SCT"


def _code(value: str, meaning: str):
    from pydicom.sr.coding import Code

    return Code(value, _SCT, meaning)


def _anatomy() -> dict[str, tuple]:
    """Canonical label -> (property type code, laterality modifier code or None), SNOMED CT."""
    lung, left, right = _code("39607008", "Lung"), _code("7771000", "Left"), _code("24028007", "Right")
    clavicle = _code("51299004", "Clavicle")
    return {
        "lung": (lung, None),
        "left_lung": (_code("44029006", "Left lung"), None),
        "right_lung": (_code("3341006", "Right lung"), None),
        "heart": (_code("80891009", "Heart"), None),
        "clavicle": (clavicle, None),
        "left_clavicle": (clavicle, left),
        "right_clavicle": (clavicle, right),
        "femur": (_code("71341001", "Femur"), None),
        "tibia": (_code("12611008", "Tibia"), None),
    }


def anatomical_structure():
    """The segment category of every segment we write (CID 7150 "Anatomical Structure")."""
    return _code("91723000", "Anatomical Structure")


# display colours (sRGB), stored in the SEG as CIELab
COLORS: dict[str, tuple[int, int, int]] = {
    "lung": (128, 174, 128), "left_lung": (128, 174, 128), "right_lung": (111, 184, 210),
    "heart": (206, 110, 84), "clavicle": (241, 214, 145), "left_clavicle": (241, 214, 145),
    "right_clavicle": (222, 198, 101), "femur": (250, 250, 190), "tibia": (230, 190, 60),
}


@dataclass(frozen=True, eq=False)
class Segment:
    """One segment read back from a SEG."""

    number: int  # SegmentNumber (1..N)
    label: str  # SegmentLabel as written
    name: str | None  # canonical label (``left_lung``) from the codes, or None when unknown
    mask: np.ndarray  # bool (Rows, Columns) of the source image


@dataclass(frozen=True, eq=False)
class SegRead:
    segments: list[Segment]
    source_sop_instance_uid: str
    source_series_instance_uid: str | None
    shape: tuple[int, int]  # (Rows, Columns)


class SegError(ValueError):
    """A label map that cannot be written as a SEG of its source, or a SEG we cannot read."""


def write_seg(source, label_map: np.ndarray, segments: Mapping[int, str], *,
              series_description: str = "xray_textseg label", algorithm_type: str = "SEMIAUTOMATIC",
              content_creator: str | None = None, series_number: int = SERIES_NUMBER):
    """A DICOM Segmentation (pydicom ``Dataset``, save it with ``save_as``) of ``label_map`` on ``source``.

    ``source``: the radiograph (path or pydicom ``Dataset``; one frame). ``label_map``: (Rows, Columns)
    integers, 0 background. ``segments``: label value -> name (canonical ``left_lung`` or free text);
    every value present in the map needs a name. One segment per value present, in value order; values
    named but absent are left out. An empty map is a :class:`SegError` (there is nothing to store)."""
    import highdicom as hd
    from pydicom.uid import generate_uid

    ref = _reference_dataset(source)
    rows, cols = int(ref.Rows), int(ref.Columns)
    labels = np.asarray(label_map)
    if labels.ndim == 3 and labels.shape[2] == 1:
        labels = labels[..., 0]
    if labels.shape != (rows, cols):
        raise SegError(f"label map (H,W)={labels.shape} does not match the source image "
                       f"Rows x Columns = ({rows}, {cols})")
    if labels.dtype.kind == "f" and not np.array_equal(labels, np.rint(labels)):
        raise SegError("label map values must be whole numbers")
    labels = labels.astype(np.int64)
    present = [int(v) for v in np.unique(labels) if v != 0]
    if not present:
        raise SegError("label map is empty: no segment to write")
    missing = [v for v in present if v not in segments]
    if missing:
        raise SegError(f"label values {missing} have no name (segments: {dict(segments)})")

    algorithm = None
    if algorithm_type.upper() != "MANUAL":
        algorithm = hd.AlgorithmIdentificationSequence(name="xray_textseg", version=__version__,
                                                       family=_dcm_ai())
    descriptions = []
    for number, value in enumerate(present, start=1):
        descriptions.append(_segment_description(hd, number, segments[value], algorithm_type, algorithm))
    stack = np.stack([labels == v for v in present], axis=-1)[None]  # (1 frame, rows, cols, segments)

    seg = hd.seg.Segmentation(
        source_images=[ref],
        pixel_array=stack,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="xray_textseg",
        manufacturer_model_name="xray_textseg",
        software_versions=__version__,
        device_serial_number="0",
        content_description="Text-prompted X-ray segmentation",
        content_label="SEGMENTATION",
        content_creator_name=content_creator,
        omit_empty_frames=False,
    )
    seg.SeriesDescription = series_description[:64]
    return seg


def read_seg(seg, source_sop_instance_uid: str | None = None) -> SegRead:
    """The segments of a SEG written for one radiograph (ours or another tool's), as masks on the source
    image's pixel grid. ``seg``: path or ``Dataset``. With several source images referenced, pass the one
    wanted; frames of other sources are ignored. Decoded with pydicom (BINARY, or FRACTIONAL above half)."""
    import pydicom

    ds = pydicom.dcmread(os.fspath(seg)) if isinstance(seg, (str, os.PathLike)) else seg
    if str(ds.get("Modality", "")) != "SEG" or "SegmentSequence" not in ds:
        raise SegError(f"not a DICOM SEG (Modality {ds.get('Modality')!r})")
    rows, cols = int(ds.Rows), int(ds.Columns)
    sources = _source_instances(ds)
    if not sources:
        raise SegError("SEG references no source image")
    uid = source_sop_instance_uid or sources[0]
    frames = np.asarray(ds.pixel_array)
    frames = frames.reshape(-1, rows, cols)
    fractional = str(ds.get("SegmentationType", "BINARY")) == "FRACTIONAL"
    threshold = int(ds.get("MaximumFractionalValue", 255)) / 2 if fractional else 0
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", [])
    if len(per_frame) != frames.shape[0]:
        raise SegError(f"SEG has {frames.shape[0]} frames but {len(per_frame)} per-frame descriptions")
    masks = {int(item.SegmentNumber): np.zeros((rows, cols), dtype=bool) for item in ds.SegmentSequence}
    for frame, item in zip(frames, per_frame):
        refs = [str(src.ReferencedSOPInstanceUID) for der in item.get("DerivationImageSequence", [])
                for src in der.get("SourceImageSequence", [])]
        if refs and uid not in refs:
            continue
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        if number not in masks:
            raise SegError(f"frame refers to segment {number}, which SegmentSequence does not describe")
        masks[number] |= frame > threshold
    out = [Segment(int(item.SegmentNumber), str(item.get("SegmentLabel", "")), segment_name(item),
                   masks[int(item.SegmentNumber)]) for item in ds.SegmentSequence]
    series = None
    if "ReferencedSeriesSequence" in ds and len(ds.ReferencedSeriesSequence):
        series = str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
    return SegRead(out, uid, series, (rows, cols))


def segment_name(item) -> str | None:
    """Canonical label of a SegmentSequence item from its codes (type + laterality modifier), else None."""
    if "SegmentedPropertyTypeCodeSequence" not in item:
        return None
    code = item.SegmentedPropertyTypeCodeSequence[0]
    modifier = None
    if "SegmentedPropertyTypeModifierCodeSequence" in code and len(code.SegmentedPropertyTypeModifierCodeSequence):
        modifier = str(code.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue)
    for name, (ptype, lat) in _anatomy().items():
        if str(code.CodeValue) == ptype.value and str(code.CodingSchemeDesignator) in ("SCT", "SRT") \
                and (lat.value if lat is not None else None) == modifier:
            return name
    return None


# --- helpers --------------------------------------------------------------------------------------------
def _dcm_ai():
    from pydicom.sr.coding import Code

    return Code("123110", "DCM", "Artificial Intelligence")


def _segment_description(hd, number: int, name: str, algorithm_type: str, algorithm):
    key = name.strip().lower().replace(" ", "_")
    known = _anatomy().get(key)
    ptype, laterality = known if known else (anatomical_structure(), None)
    desc = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=name.replace("_", " ")[:64],
        segmented_property_category=anatomical_structure(),
        segmented_property_type=ptype,
        algorithm_type=algorithm_type.upper(),
        algorithm_identification=algorithm,
        tracking_uid=None,
        tracking_id=None,
    )
    if laterality is not None:
        desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept(laterality.value, laterality.scheme_designator, laterality.meaning)]
    rgb = COLORS.get(key)
    if rgb is not None:
        desc.RecommendedDisplayCIELabValue = list(hd.color.CIELabColor(*_srgb_to_lab(rgb)).value)
    return desc


def _srgb_to_lab(rgb: tuple[int, int, int]) -> tuple[float, float, float]:
    """sRGB (0..255) -> CIELab (D65)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ c
    xyz /= np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 216 / 24389, np.cbrt(xyz), (24389 / 27 * xyz + 16) / 116)
    lab = (116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2]))
    return (float(np.clip(lab[0], 0, 100)), float(np.clip(lab[1], -128, 127)), float(np.clip(lab[2], -128, 127)))


def _reference_dataset(source):
    """The source header highdicom needs, without what a projection radiograph cannot honour: a frame of
    reference without plane position/orientation, and zero or malformed pixel spacing."""
    import pydicom

    if isinstance(source, (str, os.PathLike)):
        ds = pydicom.dcmread(os.fspath(source), stop_before_pixels=True, force=True)
    else:
        ds = source.copy()
        for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            if keyword in ds:
                delattr(ds, keyword)
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns"):
        if keyword not in ds:
            raise SegError(f"source image has no {keyword}: cannot reference it from a SEG")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise SegError("source image is multi-frame: not a radiograph")
    if "FrameOfReferenceUID" in ds and not ("ImagePositionPatient" in ds and "ImageOrientationPatient" in ds):
        del ds.FrameOfReferenceUID
    if str(ds.get("LossyImageCompression", "00")) == "01":
        # the SEG repeats that its source was lossy: ratio and method are required with it
        syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
        method = ds.get("LossyImageCompressionMethod") or _LOSSY_METHODS.get(syntax)
        if method and ds.get("LossyImageCompressionRatio"):
            ds.LossyImageCompressionMethod = method
        else:
            del ds.LossyImageCompression
    if "PixelSpacing" in ds:
        try:
            ok = len(ds.PixelSpacing) == 2 and all(float(v) > 0 for v in ds.PixelSpacing)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            del ds.PixelSpacing
    return ds


_LOSSY_METHODS = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1", "1.2.840.10008.1.2.4.51": "ISO_10918_1",
    "1.2.840.10008.1.2.4.81": "ISO_14495_1", "1.2.840.10008.1.2.4.91": "ISO_15444_1",
    "1.2.840.10008.1.2.4.93": "ISO_15444_1",
}


def _source_instances(ds) -> list[str]:
    uids = []
    for frame in ds.get("PerFrameFunctionalGroupsSequence", []):
        for der in frame.get("DerivationImageSequence", []):
            for src in der.get("SourceImageSequence", []):
                uid = str(src.ReferencedSOPInstanceUID)
                if uid not in uids:
                    uids.append(uid)
    for series in ds.get("ReferencedSeriesSequence", []):
        for inst in series.get("ReferencedInstanceSequence", []):
            uid = str(inst.ReferencedSOPInstanceUID)
            if uid not in uids:
                uids.append(uid)
    return uids


__all__ = ["COLORS", "SERIES_NUMBER", "SegError", "SegRead", "Segment", "anatomical_structure", "read_seg",
           "segment_name", "write_seg"]
