"""Tests for xray_textseg.io on real files written to tmp_path (and the shared real DICOMs when present)."""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from xray_textseg.io import (
    MAX_PIXELS,
    MIN_SIDE,
    ImageReadError,
    MaskReadError,
    Radiograph,
    load_mask,
    load_radiograph,
    radiograph_from_array,
    save_mask,
    write_atomic,
)

SLICER_AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS form of ITK's LPS identity: how Slicer places a PNG


# --- helpers --------------------------------------------------------------------------------------------
def ramp(h: int = 40, w: int = 64, scale: int = 1, dtype=np.uint8) -> np.ndarray:
    """Asymmetric in both axes, so any flip or transpose changes it."""
    y, x = np.mgrid[0:h, 0:w]
    return ((x + 3 * y) * scale).astype(dtype)


def top_left_block(h: int = 40, w: int = 64) -> np.ndarray:
    """Display-orientation mask: label 1 in the top-left corner only, label 2 in a strip on the right."""
    mask = np.zeros((h, w), np.uint8)
    mask[:5, :10] = 1
    mask[10:30, w - 4:] = 2
    return mask


def save_png(path: Path, arr: np.ndarray, **kw) -> Path:
    Image.fromarray(arr).save(path, **kw)
    return path


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray = SLICER_AFFINE) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def make_dicom(pixels: np.ndarray | None, photometric: str = "MONOCHROME2", **attrs) -> FileDataset:
    """An uncompressed explicit-VR little-endian CR dataset with file meta and preamble."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("test.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    if pixels is not None:
        samples = 3 if pixels.ndim == 3 else 1
        ds.Rows, ds.Columns = pixels.shape[:2]
        ds.SamplesPerPixel = samples
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = ds.BitsStored = 8 * pixels.dtype.itemsize
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 0
        if samples == 3:
            ds.PlanarConfiguration = 0
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def save_dicom(path: Path, ds: FileDataset) -> Path:
    ds.save_as(str(path), write_like_original=False)
    return path


def assert_read_error(path: Path, *fragments: str) -> None:
    with pytest.raises(ImageReadError) as info:
        load_radiograph(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


# --- Pillow formats -------------------------------------------------------------------------------------
def test_png_8bit_gray(tmp_path):
    arr = ramp()
    img = load_radiograph(save_png(tmp_path / "a.png", arr))
    assert img.pixels.dtype == np.float32 and img.shape == (40, 64)
    np.testing.assert_array_equal(img.pixels, arr)
    assert (img.source_format, img.photometric, img.bits, img.source_shape) == ("png", "L", 8, (40, 64))
    assert img.pixel_spacing is None and img.nifti_affine is None and img.path == str(tmp_path / "a.png")


def test_png_16bit_keeps_values_above_255(tmp_path):
    arr = ramp(scale=300, dtype=np.uint16)
    assert arr.max() > 255
    img = load_radiograph(save_png(tmp_path / "a16.png", arr))
    np.testing.assert_array_equal(img.pixels, arr)
    assert img.bits == 16 and img.photometric.startswith("I")


def test_rgb_png_is_luminance(tmp_path):
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[:16, :, 0] = 255  # red top half
    rgb[16:, :, 1] = 255  # green bottom half
    img = load_radiograph(save_png(tmp_path / "rgb.png", rgb))
    assert img.photometric == "RGB" and img.source_shape == (32, 32, 3)
    np.testing.assert_allclose(img.pixels[0, 0], 0.299 * 255, rtol=1e-5)
    np.testing.assert_allclose(img.pixels[-1, 0], 0.587 * 255, rtol=1e-5)


def test_rgba_png_ignores_alpha(tmp_path):
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3] = 100
    rgba[..., 3] = np.arange(32, dtype=np.uint8)[None, :] * 8
    img = load_radiograph(save_png(tmp_path / "rgba.png", rgba))
    np.testing.assert_allclose(img.pixels, 100, rtol=1e-5)


def test_palette_png_goes_through_palette(tmp_path):
    indices = np.zeros((32, 32), np.uint8)
    indices[:, 16:] = 1
    pal = Image.fromarray(indices).convert("P")
    pal.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)  # index 0 white, index 1 black: an inverted film
    pal.putdata(indices.ravel().tolist())
    pal.save(tmp_path / "pal.png")
    img = load_radiograph(tmp_path / "pal.png")
    assert img.photometric == "PALETTE"
    np.testing.assert_allclose(img.pixels[:, :16], 255, rtol=1e-5)
    np.testing.assert_allclose(img.pixels[:, 16:], 0, atol=1e-4)


def test_1bit_png_is_0_or_255(tmp_path):
    bits = ramp() % 2 == 0
    Image.fromarray(bits).convert("1").save(tmp_path / "bw.png")
    img = load_radiograph(tmp_path / "bw.png")
    assert img.bits == 1
    np.testing.assert_array_equal(img.pixels, np.where(bits, 255, 0))


def test_jpeg_gray_and_rgb(tmp_path):
    arr = np.kron(ramp(8, 8, scale=8), np.ones((8, 8), np.uint8))  # smooth 64x64, survives compression
    gray = load_radiograph(save_png(tmp_path / "g.jpg", arr, quality=95))
    assert gray.source_format == "jpeg" and gray.photometric == "L" and gray.shape == (64, 64)
    assert np.abs(gray.pixels - arr).mean() < 3
    colour = load_radiograph(save_png(tmp_path / "c.jpeg", np.stack([arr] * 3, -1), quality=95))
    assert colour.photometric == "RGB" and np.abs(colour.pixels - arr).mean() < 3


def test_tiff_16bit(tmp_path):
    arr = ramp(scale=500, dtype=np.uint16)
    img = load_radiograph(save_png(tmp_path / "a.tif", arr))
    np.testing.assert_array_equal(img.pixels, arr)
    assert img.source_format == "tiff" and img.bits == 16


def test_format_is_sniffed_not_taken_from_the_suffix(tmp_path):
    arr = ramp()
    Image.fromarray(arr).save(tmp_path / "upload.bin", format="PNG")
    Image.fromarray(arr).save(tmp_path / "lies.dcm", format="PNG")
    for name in ("upload.bin", "lies.dcm"):
        img = load_radiograph(tmp_path / name)
        assert img.source_format == "png"
        np.testing.assert_array_equal(img.pixels, arr)


# --- bad files --------------------------------------------------------------------------------------------
def test_truncated_png(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)  # incompressible
    data = (save_png(tmp_path / "full.png", noise)).read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert_read_error(tmp_path / "cut.png", "truncated PNG")


@pytest.mark.parametrize("name", ["noise.bin", "noise.dcm", "noise"])
def test_random_bytes_are_refused(tmp_path, name):
    (tmp_path / name).write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    assert_read_error(tmp_path / name, "not a DICOM file")


def test_corrupt_png_with_png_suffix(tmp_path):
    (tmp_path / "x.png").write_bytes(b"this is not an image at all" * 10)
    assert_read_error(tmp_path / "x.png")


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_radiograph(tmp_path / "absent.png")


def test_too_small(tmp_path):
    assert_read_error(save_png(tmp_path / "tiny.png", np.zeros((1, 1), np.uint8)), "image too small: 1x1",
                      f"minimum {MIN_SIDE}x{MIN_SIDE}")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height and which has no image data at all: if the reader decoded
    before checking the size it would report a truncated file, not a too-large one."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit gray
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_too_large_is_refused_from_the_header(tmp_path):
    (tmp_path / "huge.png").write_bytes(png_header_only(30000, 30000))
    assert_read_error(tmp_path / "huge.png", "image too large: 30000x30000", "100 megapixel")
    (tmp_path / "big.png").write_bytes(png_header_only(12000, 9000))  # 108 MP: under Pillow's own bomb limit
    assert_read_error(tmp_path / "big.png", "image too large: 12000x9000")
    assert 12000 * 9000 > MAX_PIXELS


# --- NIfTI ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trailing", [(), (1,), (1, 1)])
def test_nifti_slicer_layout_is_transposed_to_display(tmp_path, trailing):
    display = ramp(40, 64)
    display[:5, :10] = 255  # bright block top-left only
    data = display.T.reshape(display.T.shape + trailing)  # (W, H, ...) as Slicer saves a PNG
    path = save_nifti(tmp_path / "img.nii.gz", data)
    img = load_radiograph(path)
    assert img.shape == (40, 64) and img.source_format == "nifti" and img.source_shape == (64, 40) + trailing
    assert (img.pixels[:5, :10] == 255).all() and (img.pixels[-5:, -10:] < 255).all()
    np.testing.assert_array_equal(img.pixels, display)
    np.testing.assert_array_equal(img.nifti_affine, SLICER_AFFINE)


def test_nifti_spacing_and_uncompressed_without_suffix(tmp_path):
    affine = np.diag([-0.5, -0.7, 1.0, 1.0])
    save_nifti(tmp_path / "img.nii", ramp().T[..., None].astype(np.int16), affine)
    os.rename(tmp_path / "img.nii", tmp_path / "upload")  # sniffed from the header, not the name
    img = load_radiograph(tmp_path / "upload")
    assert img.pixel_spacing == pytest.approx((0.7, 0.5))
    assert img.bits == 16
    np.testing.assert_array_equal(img.pixels, ramp())


def test_nifti_identity_affine_is_shown_as_slicer_shows_it(tmp_path):
    """RAS identity: i runs to the patient's right (screen left), j anteriorly (screen up)."""
    display = ramp()
    stored = display[::-1, ::-1].T[..., None]
    img = load_radiograph(save_nifti(tmp_path / "ras.nii.gz", stored, np.eye(4)))
    np.testing.assert_array_equal(img.pixels, display)
    # a mask predicted on the display pixels goes back onto the source's own voxel grid and affine
    save_mask(top_left_block(), tmp_path / "m.nii.gz", like=img)
    written = nib.load(str(tmp_path / "m.nii.gz"))
    np.testing.assert_array_equal(written.affine, np.eye(4))
    np.testing.assert_array_equal(np.asarray(written.dataobj), top_left_block()[::-1, ::-1].T[..., None])
    np.testing.assert_array_equal(load_mask(tmp_path / "m.nii.gz", img.shape), top_left_block())


def test_nifti_volume_is_refused(tmp_path):
    path = save_nifti(tmp_path / "vol.nii.gz", np.zeros((32, 32, 5), np.uint8))
    assert_read_error(path, "3D volume (X,Y,Z)=(32, 32, 5) is not a radiograph")


# --- DICOM ----------------------------------------------------------------------------------------------
def test_dicom_monochrome2_rescale(tmp_path):
    raw = ramp(scale=20, dtype=np.uint16)
    ds = make_dicom(raw, RescaleSlope=2, RescaleIntercept=-100, PixelSpacing=[0.2, 0.3])
    img = load_radiograph(save_dicom(tmp_path / "a.dcm", ds))
    np.testing.assert_allclose(img.pixels, raw * 2.0 - 100)
    assert img.pixels.dtype == np.float32 and img.source_format == "dicom"
    assert (img.photometric, img.bits, img.pixel_spacing) == ("MONOCHROME2", 16, (0.2, 0.3))


def test_dicom_imager_spacing_is_the_fallback(tmp_path):
    ds = make_dicom(ramp(), ImagerPixelSpacing=[0.15, 0.15], PixelSpacing=[0, 0])  # zeros: unknown
    assert load_radiograph(save_dicom(tmp_path / "a.dcm", ds)).pixel_spacing == (0.15, 0.15)


def test_dicom_monochrome1_is_inverted(tmp_path):
    raw = np.full((32, 32), 3000, np.uint16)
    raw[4:10, 4:10] = 100  # low stored value = bright on a MONOCHROME1 display (bone)
    img = load_radiograph(save_dicom(tmp_path / "m1.dcm", make_dicom(raw, "MONOCHROME1")))
    assert img.photometric == "MONOCHROME1"
    assert img.pixels[5, 5] == img.pixels.max() == 3000 and img.pixels[20, 20] == img.pixels.min() == 100


def test_dicom_window_is_applied(tmp_path):
    raw = np.tile(np.arange(0, 4000, 50, dtype=np.uint16), (20, 1))  # 20 x 80 ramp
    ds = make_dicom(raw, WindowCenter=1000, WindowWidth=500)
    img = load_radiograph(save_dicom(tmp_path / "w.dcm", ds)).pixels
    row, x = img[0], raw[0]
    assert (row[x < 700] == row.min()).all() and (row[x > 1300] == row.max()).all()
    inside = row[(x > 800) & (x < 1200)]
    assert (np.diff(inside) > 0).all() and row.min() < inside.min() and inside.max() < row.max()


def test_dicom_without_preamble_but_with_file_meta(tmp_path):
    raw = ramp(scale=10, dtype=np.uint16)
    ds = make_dicom(raw)
    ds.preamble = None
    ds.save_as(str(tmp_path / "nopre.dcm"), write_like_original=True)
    data = (tmp_path / "nopre.dcm").read_bytes()
    assert data[128:132] != b"DICM" and data[:2] == b"\x02\x00"
    np.testing.assert_array_equal(load_radiograph(tmp_path / "nopre.dcm").pixels, raw)


def test_bare_implicit_vr_dataset_without_meta(tmp_path):
    raw = ramp(scale=10, dtype=np.uint16)
    ds = make_dicom(raw)
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, True
    write_dataset(buf, Dataset(ds))  # a plain dataset: no preamble, no DICM, no group 0002
    (tmp_path / "bare").write_bytes(buf.getvalue())
    img = load_radiograph(tmp_path / "bare")
    assert img.source_format == "dicom"
    np.testing.assert_array_equal(img.pixels, raw)


def test_dicom_without_pixel_data(tmp_path):
    assert_read_error(save_dicom(tmp_path / "sr.dcm", make_dicom(None)), "DICOM has no pixel data")


def test_multiframe_dicom_is_refused(tmp_path):
    frames = np.zeros((3, 32, 32), np.uint16)
    ds = make_dicom(frames[0], NumberOfFrames=3)
    ds.PixelData = frames.tobytes()
    assert_read_error(save_dicom(tmp_path / "mf.dcm", ds), "multi-frame DICOM (3 frames) is not a radiograph")


def test_dicom_too_large_is_refused_before_decoding(tmp_path):
    ds = make_dicom(np.zeros((32, 32), np.uint16))
    ds.Rows = ds.Columns = 30000  # the 2 kB of pixel data could never decode to this
    assert_read_error(save_dicom(tmp_path / "huge.dcm", ds), "image too large: 30000x30000")


def test_rgb_dicom_becomes_gray(tmp_path):
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 2] = 200
    img = load_radiograph(save_dicom(tmp_path / "rgb.dcm", make_dicom(rgb, "RGB")))
    assert img.photometric == "RGB" and img.shape == (32, 32)
    np.testing.assert_allclose(img.pixels, 0.114 * 200, rtol=1e-5)


# --- arrays and hashing -----------------------------------------------------------------------------------
def test_radiograph_from_array():
    arr = ramp()
    img = radiograph_from_array(arr)
    assert (img.source_format, img.photometric, img.path, img.bits) == ("array", "L", None, 8)
    np.testing.assert_array_equal(img.pixels, arr)
    float_arr = arr.astype(np.float32)
    copy = radiograph_from_array(float_arr)
    float_arr[0, 0] = 999  # the caller's buffer is not shared
    assert copy.pixels[0, 0] == 0
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 0] = 255
    np.testing.assert_allclose(radiograph_from_array(rgba).pixels, 0.299 * 255, rtol=1e-5)
    with pytest.raises(ImageReadError):
        radiograph_from_array(np.zeros((20, 20, 2)))
    with pytest.raises(ImageReadError, match="too small"):
        radiograph_from_array(np.zeros((8, 64)))


def test_non_finite_values_are_replaced():
    arr = ramp().astype(np.float32)
    arr[0, 0], arr[0, 1], arr[0, 2] = np.nan, np.inf, -np.inf
    pixels = radiograph_from_array(arr).pixels
    assert np.isfinite(pixels).all() and pixels[0, 1] == arr[np.isfinite(arr)].max()


def test_content_hash_follows_pixels_and_shape():
    a = radiograph_from_array(ramp())
    assert a.content_hash() == radiograph_from_array(ramp()).content_hash()
    assert a.content_hash() != radiograph_from_array(ramp() + 1).content_hash()
    flat = np.zeros((16, 32), np.float32)
    assert radiograph_from_array(flat).content_hash() != radiograph_from_array(flat.T.copy()).content_hash()
    assert Radiograph(ramp(), None, "array", (40, 64), None, "L", 8).pixels.dtype == np.float32


# --- masks ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["m.png", "m.nii", "m.nii.gz"])
def test_mask_round_trip(tmp_path, name):
    mask = top_left_block()
    out = save_mask(mask, tmp_path / name)
    assert out == tmp_path / name
    back = load_mask(out, shape=mask.shape)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, mask)


def test_nifti_mask_has_slicer_geometry_of_the_film(tmp_path):
    ds = make_dicom(ramp(dtype=np.uint16), PixelSpacing=[0.2, 0.3])
    film = load_radiograph(save_dicom(tmp_path / "film.dcm", ds))
    save_mask(top_left_block(), tmp_path / "m.nii.gz", like=film)
    written = nib.load(str(tmp_path / "m.nii.gz"))
    assert written.shape == (64, 40, 1) and written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, np.diag([-0.3, -0.2, 1.0, 1.0]))
    np.testing.assert_array_equal(np.asarray(written.dataobj), top_left_block().T[..., None])
    assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 1
    assert gzip.decompress((tmp_path / "m.nii.gz").read_bytes())[344:348] == b"n+1\x00"


def test_nifti_mask_like_nifti_film_keeps_its_affine(tmp_path):
    affine = np.array([[-0.5, 0, 0, 10], [0, -0.5, 0, 20], [0, 0, 2, 0], [0, 0, 0, 1.0]])
    film = load_radiograph(save_nifti(tmp_path / "film.nii.gz", ramp().T[..., None], affine))
    save_mask(top_left_block(), tmp_path / "m.nii", like=film)
    written = nib.load(str(tmp_path / "m.nii"))
    np.testing.assert_allclose(written.affine, affine)
    np.testing.assert_array_equal(np.asarray(written.dataobj)[..., 0], top_left_block().T)


def test_mask_uploaded_by_slicer(tmp_path):
    mask = top_left_block()
    save_nifti(tmp_path / "slicer.nii.gz", mask.T[..., None], SLICER_AFFINE)
    np.testing.assert_array_equal(load_mask(tmp_path / "slicer.nii.gz", mask.shape), mask)
    save_nifti(tmp_path / "slicer4d.nii.gz", mask.T[..., None, None].astype(np.float32), SLICER_AFFINE)
    np.testing.assert_array_equal(load_mask(tmp_path / "slicer4d.nii.gz"), mask)


def test_mask_with_identity_affine_is_flipped_in_x_and_y(tmp_path):
    mask = top_left_block()
    save_nifti(tmp_path / "ras.nii.gz", mask.T[..., None], np.eye(4))
    np.testing.assert_array_equal(load_mask(tmp_path / "ras.nii.gz"), mask[::-1, ::-1])
    save_nifti(tmp_path / "x.nii.gz", mask.T[..., None], np.diag([1.0, -1.0, 1.0, 1.0]))
    np.testing.assert_array_equal(load_mask(tmp_path / "x.nii.gz"), mask[:, ::-1])


def test_mask_shape_mismatch_is_an_error_not_a_resize(tmp_path):
    save_mask(top_left_block(), tmp_path / "m.png")
    with pytest.raises(MaskReadError) as info:
        load_mask(tmp_path / "m.png", shape=(64, 40))
    assert "(40, 64)" in str(info.value) and "(64, 40)" in str(info.value)
    save_nifti(tmp_path / "t.nii.gz", top_left_block()[..., None], SLICER_AFFINE)  # transposed upload
    with pytest.raises(MaskReadError, match="does not match"):
        load_mask(tmp_path / "t.nii.gz", shape=(40, 64))


def test_mask_value_rules(tmp_path):
    mask = top_left_block()
    save_nifti(tmp_path / "f.nii.gz", mask.T[..., None].astype(np.float64))
    np.testing.assert_array_equal(load_mask(tmp_path / "f.nii.gz"), mask)
    save_nifti(tmp_path / "frac.nii.gz", mask.T[..., None] * 0.5)
    with pytest.raises(MaskReadError, match="fractional"):
        load_mask(tmp_path / "frac.nii.gz")
    save_nifti(tmp_path / "neg.nii.gz", -mask.T[..., None].astype(np.int16))
    with pytest.raises(MaskReadError, match="0..255"):
        load_mask(tmp_path / "neg.nii.gz")
    save_nifti(tmp_path / "vol.nii.gz", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(MaskReadError, match="3D volume"):
        load_mask(tmp_path / "vol.nii.gz")


def test_raster_mask_colour_rules(tmp_path):
    mask = top_left_block()
    save_png(tmp_path / "gray_rgb.png", np.stack([mask] * 3, -1))
    np.testing.assert_array_equal(load_mask(tmp_path / "gray_rgb.png"), mask)
    colours = np.zeros(mask.shape + (3,), np.uint8)
    colours[mask == 1] = (255, 0, 0)
    save_png(tmp_path / "colour.png", colours)
    with pytest.raises(MaskReadError, match="RGB label mask with colours is ambiguous"):
        load_mask(tmp_path / "colour.png")
    pal = Image.fromarray(mask).convert("P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    pal.putdata(mask.ravel().tolist())
    pal.save(tmp_path / "pal.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "pal.png"), mask)  # indices are the labels


def test_save_mask_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(ValueError, match="0..255"):
        save_mask(np.full((20, 20), 300), tmp_path / "m.png")
    with pytest.raises(ValueError, match="unsupported"):
        save_mask(top_left_block(), tmp_path / "m.jpg")
    with pytest.raises(ValueError, match="does not match"):
        save_mask(top_left_block(), tmp_path / "m.png", like=radiograph_from_array(np.zeros((64, 40))))
    np.testing.assert_array_equal(load_mask(save_mask(top_left_block() > 0, tmp_path / "b.png")),
                                  top_left_block() > 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.png"]


# --- atomic writes --------------------------------------------------------------------------------------
def test_write_atomic_replaces_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "priors.json"
    write_atomic(target, b"first")
    os.chmod(target, 0o600)
    write_atomic(str(target), b"second")
    assert target.read_bytes() == b"second"
    assert target.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["priors.json"]


def test_write_atomic_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.bin"
    write_atomic(target, b"old")
    with pytest.raises(TypeError):
        write_atomic(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


# --- real DICOMs ------------------------------------------------------------------------------------------
def real_dicom_dir() -> Path:
    env = os.environ.get("XRAY_REAL_DIR")
    root = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "xray_real"
    return root / "dicom"


REAL_DICOMS = sorted(real_dicom_dir().glob("*.dcm"))


@pytest.mark.real_data
@pytest.mark.parametrize("path", REAL_DICOMS or [None], ids=lambda p: p.name if p else "absent")
def test_real_dicoms(path):
    if path is None:
        pytest.skip(f"no real DICOMs in {real_dicom_dir()} (set XRAY_REAL_DIR to the xray_real folder)")
    img = load_radiograph(path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert img.pixels.dtype == np.float32 and img.pixels.ndim == 2
    assert img.shape == (ds.Rows, ds.Columns) and img.source_format == "dicom"
    assert np.isfinite(img.pixels).all() and np.ptp(img.pixels) > 0
    assert img.photometric == ds.PhotometricInterpretation == "MONOCHROME1"
    spacings = [ds.get(key) or [] for key in ("PixelSpacing", "ImagerPixelSpacing")]
    has_spacing = any(all(float(v) > 0 for v in sp) for sp in spacings if len(sp) == 2)
    assert (img.pixel_spacing is not None) == has_spacing
    assert len(img.content_hash()) == 40
