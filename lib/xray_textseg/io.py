"""Reading radiographs, and reading and writing label masks.

Every image that reaches the engine passes through :func:`load_radiograph`, so this is the one place
that knows about file formats, DICOM value transforms and geometry. What the rest of the engine may rely
on: a float32 (H, W) array in display orientation (row 0 = top, column 0 = image left), higher = brighter,
finite, not normalised (each backbone normalises its own way).

Masks leave through :func:`save_mask` in a geometry that overlays the image in 3D Slicer, and come back
through :func:`load_mask` in the same display orientation as the image, so an evaluation never compares
a mask with a flipped or transposed image. Masks are never resized: a shape mismatch is an error, because
a silently resampled label is a wrong label.

Geometry of NIfTI files: the array is indexed ``[i, j(, k)]`` and 3D Slicer shows a slice so that screen
right is the negative direction of the first in-plane world axis (RAS: left, or posterior) and screen down
the negative direction of the second (posterior, or inferior). A PNG or DICOM radiograph loaded in Slicer
gets ITK's LPS identity, i.e. the RAS affine ``diag(-1, -1, 1, 1)``: ``i`` = column, ``j`` = row, no flip.
Any other affine is brought to that display with :func:`_to_display`, and back with :func:`_from_display`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gzip
import hashlib
import io
import os
import struct
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

MAX_PIXELS = 100_000_000
"""Largest image accepted (H * W). Refused from the header, before decoding, wherever the format allows:
a 100 megapixel film is already larger than any detector, larger claims are corrupt files or bombs."""

MIN_SIDE = 16
"""Smallest side accepted: below it nothing anatomical can be segmented, and backbones cannot pool."""

MAX_ASPECT = 10
"""Longest side at most this many times the shortest: a longer strip is no radiograph, and the fine pass would
cut it into hundreds of crops."""

# Pillow warns above MAX_IMAGE_PIXELS and refuses above twice that; we refuse above MAX_PIXELS ourselves,
# so its warning threshold must not be lower than ours (only ever raise it, never disable it).
if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601
_PIL_FORMATS = {"PNG": "png", "JPEG": "jpeg", "TIFF": "tiff"}
# PNG, JPEG, TIFF, BigTIFF
_PILLOW_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_DICOM_MARKERS = ("SOPClassUID", "Rows", "Columns", "PixelData", "Modality", "StudyInstanceUID")


class ImageReadError(ValueError):
    """An image file that cannot be used as a radiograph; the message names the file and the problem."""


class MaskReadError(ValueError):
    """A label mask that cannot be read, or does not fit its image; the message names file and problem."""


@dataclass(frozen=True, eq=False)
class Radiograph:
    """One 2D film as the engine sees it, plus what is needed to write masks back in its geometry.

    ``eq=False``: comparing pixel arrays with ``==`` is ambiguous, use :meth:`content_hash`.
    """

    pixels: np.ndarray  # float32 (H, W), display orientation, higher = brighter, finite, not normalised
    path: str | None
    source_format: str  # "png" | "jpeg" | "tiff" | "nifti" | "dicom" | "array" (or another Pillow format)
    source_shape: tuple[int, ...]  # the stored grid as read from the file, e.g. (W, H, 1) for a NIfTI
    pixel_spacing: tuple[float, float] | None  # (row, col) in mm when known
    photometric: str  # original: "MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE", "L", "I;16", ...
    bits: int | None  # stored bit depth where known
    nifti_affine: np.ndarray | None = None  # 4x4, only for NIfTI sources

    def __post_init__(self) -> None:
        pixels = np.ascontiguousarray(self.pixels, dtype=np.float32)
        if pixels.ndim != 2:
            raise ValueError(f"Radiograph pixels must be 2D (H, W), got shape {pixels.shape}")
        object.__setattr__(self, "pixels", pixels)

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of :attr:`pixels`."""
        return (int(self.pixels.shape[0]), int(self.pixels.shape[1]))

    def content_hash(self) -> str:
        """SHA-1 of the pixels and their shape: the embedding-cache key, so the same study opened twice
        (from any path or format) hits, while a re-saved image with different pixels misses. The shape is
        included because a transposed image has the same bytes."""
        digest = hashlib.sha1(np.ascontiguousarray(self.pixels).tobytes())
        digest.update(repr(self.shape).encode())
        return digest.hexdigest()


# --- public API ---------------------------------------------------------------------------------------
def load_radiograph(path: str | os.PathLike) -> Radiograph:
    """Read a PNG, JPEG, TIFF, NIfTI or DICOM radiograph. The format is sniffed from the content first
    (servers store uploads under arbitrary names), the suffix is only a fallback.

    Raises :class:`ImageReadError` for anything that is not a usable 2D film, ``FileNotFoundError`` when
    there is no file."""
    name = _existing_file(path)
    kind = _sniff(name)
    if kind == "nifti":
        return _load_nifti(name)
    if kind == "pillow":
        return _load_pillow(name)
    return _load_dicom(name, sniffed=kind == "dicom")


def radiograph_from_array(array: np.ndarray) -> Radiograph:
    """Wrap an in-memory image: (H, W) gray, (H, W, 1), or (H, W, 3|4) RGB(A) turned to luminance.
    The pixels are copied, so the caller may reuse its buffer without changing the cache key's meaning."""
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ImageReadError(f"array of dtype {arr.dtype}: expected integer or floating pixel values")
    if arr.ndim == 2:
        gray, photometric = arr, "L"
    elif arr.ndim == 3 and arr.shape[2] in (3, 4):
        gray, photometric = _luminance(arr), ("RGB" if arr.shape[2] == 3 else "RGBA")
    else:
        raise ImageReadError(f"array of shape {arr.shape}: expected (H, W) gray or (H, W, 3|4) RGB(A)")
    _check_size("array", gray.shape[0], gray.shape[1])
    pixels = _finite("array", np.array(gray, dtype=np.float32, copy=True))
    bits = arr.dtype.itemsize * 8 if np.issubdtype(arr.dtype, np.integer) else None
    return Radiograph(pixels, None, "array", tuple(np.shape(array)), None, photometric, bits, None)


def field_radiograph(image: Radiograph, field) -> Radiograph:
    """The film as the pipeline sees it on ``field`` (``transforms.Field``: its exposed field, or turned upright),
    as a radiograph of its own (same source, spacing and photometry; no NIfTI affine, as :func:`crop_radiograph`)."""
    return dataclasses.replace(image, pixels=field.pixels(image.pixels), nifti_affine=None)


def inverted_radiograph(image: Radiograph) -> Radiograph:
    """The film with its grey scale inverted (highest and lowest values swapped): a negative read as a positive."""
    pixels = image.pixels
    return dataclasses.replace(image, pixels=float(pixels.max()) + float(pixels.min()) - pixels)


def crop_radiograph(image: Radiograph, box: tuple[int, int, int, int]) -> Radiograph:
    """The region ``box`` = (x0, y0, x1, y1) of ``image`` as a radiograph of its own (pixels copied; same source,
    spacing and photometry; no NIfTI affine: masks go back into the whole film, not into this region)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    return Radiograph(image.pixels[y0:y1, x0:x1].copy(), image.path, image.source_format, image.source_shape,
                      image.pixel_spacing, image.photometric, image.bits, None)


def save_mask(mask: np.ndarray, path: str | os.PathLike, like: Radiograph | None = None) -> Path:
    """Write a uint8 (H, W) label map (0 background, 1..N labels) as ``.png``, ``.nii``, ``.nii.gz`` or
    ``.nrrd`` (raw, what OHIF's MONAI Label panel reads).

    NIfTI masks get ``like``'s own affine when the image was a NIfTI, otherwise ``diag(-sx, -sy, 1, 1)``
    (pixel spacing or 1 mm): the geometry Slicer gives a PNG/DICOM film, so the mask overlays it there.
    A (K, H, W) stack of label maps (overlapping structures in different layers) is written as a layered NIfTI,
    (X, Y, 1, K), which :func:`load_label_layers` reads back.
    Written atomically: a client polling the file never sees half of it."""
    out = Path(path)
    labels = _integral_labels(np.asarray(mask), f"mask for {out}", ValueError)
    layered = labels.ndim == 3 and out.name.lower().endswith((".nii", ".nii.gz"))
    if labels.ndim != 2 and not layered:
        raise ValueError(f"{out}: mask must be a 2D (H, W) label map (or K layers as NIfTI), got {labels.shape}")
    if like is not None and labels.shape[-2:] != like.shape:
        raise ValueError(f"{out}: mask shape (H,W)={labels.shape} does not match image (H,W)={like.shape}")
    name = out.name.lower()
    if name.endswith(".nii.gz"):
        data = gzip.compress(_nifti_mask_bytes(labels, like), compresslevel=6, mtime=0)
    elif name.endswith(".nii"):
        data = _nifti_mask_bytes(labels, like)
    elif name.endswith(".png"):
        data = _png_bytes(labels)
    elif name.endswith(".nrrd"):
        data = _nrrd_mask_bytes(labels, like)
    else:
        raise ValueError(f"{out}: unsupported mask format (use .png, .nii, .nii.gz or .nrrd)")
    write_atomic(out, data)
    return out


def load_mask(path: str | os.PathLike, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a label mask as uint8 (H, W) in the display orientation of its image.

    With ``shape`` (the image's (H, W)) a mask of any other shape is a :class:`MaskReadError`, never
    resized. Palette PNGs give their indices (the usual label-map convention); RGB masks only when gray."""
    name = _existing_file(path)
    kind = _sniff(name)
    if kind == "nifti":
        labels, stored = _load_nifti_mask(name)
    elif kind == "pillow":
        labels, stored = _load_pillow_mask(name)
    else:
        raise MaskReadError(f"{name}: not a PNG/TIFF/NIfTI label mask (DICOM SEG is not supported here)")
    if shape is not None and labels.shape != tuple(shape):
        raise MaskReadError(f"{name}: label shape (H,W)={labels.shape} (stored as {stored}) does not match "
                            f"image (H,W)={tuple(shape)}; masks are not resized")
    return labels


MAX_LABEL_LAYERS = 16


def load_label_layers(path: str | os.PathLike, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A saved label as (K, H, W) uint8 label maps in display orientation: K = 1 for a label map
    (:func:`load_mask`); a layered NIfTI, (X, Y, K), (X, Y, 1, K) or (X, Y, 1, 1, K) with 1 < K <= 16, gives its K
    layers (overlapping structures in different layers, as Slicer keeps overlapping segments)."""
    name = _existing_file(path)
    if _sniff(name) != "nifti":
        return load_mask(name, shape)[None]
    with _open_nifti(name, MaskReadError) as img:
        dims = tuple(int(d) for d in img.shape)
        layer_axis = _layer_axis(dims)
        if layer_axis is None:
            return load_mask(name, shape)[None]
        if dims[layer_axis] > MAX_LABEL_LAYERS:
            raise MaskReadError(f"{name}: {dims[layer_axis]} label layers (at most {MAX_LABEL_LAYERS})")
        _check_size(name, dims[1], dims[0], MaskReadError, 1)
        if dims[0] * dims[1] * dims[layer_axis] > MAX_PIXELS:
            raise MaskReadError(f"{name}: {dims[layer_axis]} layers of {dims[0]}x{dims[1]} exceed the "
                                f"{MAX_PIXELS // 1_000_000} megapixel limit")
        data = np.moveaxis(np.asanyarray(img.dataobj).reshape(dims[:2] + (dims[layer_axis],)), -1, 0)
        affine = np.array(img.affine, dtype=np.float64)
    layers = np.stack([_to_display(_integral_labels(layer, name, MaskReadError), affine) for layer in data])
    if shape is not None and layers.shape[1:] != tuple(shape):
        raise MaskReadError(f"{name}: label shape (H,W)={layers.shape[1:]} (stored as NIfTI {dims}) does not match "
                            f"image (H,W)={tuple(shape)}; masks are not resized")
    return layers


def _layer_axis(dims: tuple[int, ...]) -> int | None:
    """The axis of a layered label NIfTI's layers (see :func:`load_label_layers`), None for a plain one."""
    extra = [(axis, d) for axis, d in enumerate(dims[2:], start=2) if d > 1]
    if len(dims) < 3 or len(extra) != 1:
        return None
    axis = extra[0][0]
    return axis if axis == len(dims) - 1 else None


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file in the same directory, then ``os.replace`` it over ``path``:
    readers see the old file or the new one, never a half-written one, and a crash leaves no debris.
    An existing file keeps its permission bits (a caller may have created it private on purpose)."""
    target = Path(path)
    mode = target.stat().st_mode & 0o7777 if target.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# --- shared checks ------------------------------------------------------------------------------------
def _existing_file(path: str | os.PathLike) -> str:
    """The path as a string; missing files are ``FileNotFoundError`` (a 404, not a bad image)."""
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise FileNotFoundError(errno.ENOENT, "no such file", name)
    return name


def _check_size(where: str, height: int, width: int, error: type[ValueError] = ImageReadError,
                min_side: int = MIN_SIDE) -> None:
    """Refuse absurd sizes; called with header values so that a bomb is never decoded."""
    if height * width > MAX_PIXELS:
        raise error(f"{where}: image too large: {width}x{height} exceeds the "
                    f"{MAX_PIXELS // 1_000_000} megapixel limit")
    if height < min_side or width < min_side:
        raise error(f"{where}: image too small: {width}x{height} (minimum {min_side}x{min_side})")
    if max(height, width) > MAX_ASPECT * min(height, width):
        raise error(f"{where}: image {width}x{height} is more than {MAX_ASPECT} times longer than wide: not a "
                    f"radiograph (a stitched long-leg film is about 4:1)")


def _finite(where: str, values: np.ndarray) -> np.ndarray:
    """float32 without NaN/inf (float TIFF/NIfTI may hold them; they would poison normalisation):
    NaN and -inf become the smallest finite value, +inf the largest."""
    pixels = np.ascontiguousarray(values, dtype=np.float32)
    finite = np.isfinite(pixels)
    if finite.all():
        return pixels
    if not finite.any():
        raise ImageReadError(f"{where}: image has no finite pixel values")
    lo, hi = float(pixels[finite].min()), float(pixels[finite].max())
    return np.nan_to_num(pixels, nan=lo, posinf=hi, neginf=lo)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of the first three channels (alpha ignored): what a gray film looks like."""
    return rgb[..., :3].astype(np.float32) @ _LUMA


def _integral_labels(values: np.ndarray, where: str, error: type[ValueError]) -> np.ndarray:
    """uint8 labels from any numeric array holding whole numbers 0..255 (float 0/1 masks are common)."""
    if values.dtype == bool:
        return values.astype(np.uint8)
    if not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)):
        raise error(f"{where}: label values of dtype {values.dtype} are not numbers")
    if values.size == 0:
        raise error(f"{where}: empty label map")
    if np.issubdtype(values.dtype, np.floating):
        if not np.isfinite(values).all():
            raise error(f"{where}: label values must be finite")
        if not np.array_equal(values, np.rint(values)):
            raise error(f"{where}: label values must be whole numbers, found fractional values")
    lo, hi = values.min(), values.max()
    if lo < 0 or hi > 255:
        raise error(f"{where}: label values must be in 0..255, found {lo}..{hi}")
    return values.astype(np.uint8)


# --- format sniffing ----------------------------------------------------------------------------------
def _sniff(path: str) -> str:
    """Which reader: "dicom", "nifti", "pillow" or "unknown". Magic bytes first, then the suffix."""
    with open(path, "rb") as f:
        head = f.read(352)
    if head.startswith(_PILLOW_MAGIC):
        return "pillow"
    if head[128:132] == b"DICM":
        return "dicom"
    if _is_nifti_header(head) or (head.startswith(b"\x1f\x8b") and _is_nifti_header(_gunzip_head(path))):
        return "nifti"
    name = path.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith((".dcm", ".dicom", ".ima")):
        return "dicom"
    if os.path.splitext(name)[1] in Image.registered_extensions():
        return "pillow"
    return "unknown"


def _is_nifti_header(head: bytes) -> bool:
    """NIfTI-1 single file (sizeof_hdr 348, magic "n+1") or NIfTI-2 (540, "n+2"), either byte order."""
    if len(head) >= 348 and head[344:348] == b"n+1\x00":
        return 348 in struct.unpack("<i", head[:4]) + struct.unpack(">i", head[:4])
    if len(head) >= 8 and head[4:8] == b"n+2\x00":
        return 540 in struct.unpack("<i", head[:4]) + struct.unpack(">i", head[:4])
    return False


def _gunzip_head(path: str) -> bytes:
    """First bytes of a gzip file, or b"" when it is not valid gzip."""
    try:
        with gzip.open(path, "rb") as f:
            return f.read(352)
    except (OSError, EOFError):
        return b""


# --- Pillow (PNG, JPEG, TIFF, ...) --------------------------------------------------------------------
@contextlib.contextmanager
def _open_pillow(path: str, error: type[ValueError], min_side: int) -> Iterator[Image.Image]:
    """Open, check the header size, then force the decode, turning every Pillow failure into ``error``.
    Pillow decodes lazily, so without ``load()`` here a truncated file would fail later, unwrapped."""
    png_size = _png_header_size(path)
    if png_size is not None:  # exact message even where Pillow's own bomb check would fire first
        _check_size(path, png_size[1], png_size[0], error, min_side)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused just below anyway
            img = Image.open(path)
    except Image.DecompressionBombError as exc:
        limit = MAX_PIXELS // 1_000_000
        raise error(f"{path}: image too large: {exc} (our limit: {limit} megapixels)") from exc
    except Exception as exc:  # UnidentifiedImageError, OSError, SyntaxError ...
        raise error(f"{path}: not a readable image ({exc})") from exc
    with img:
        fmt = img.format or "image"
        _check_size(path, img.height, img.width, error, min_side)
        frames = getattr(img, "n_frames", 1)
        if frames > 1:
            raise error(f"{path}: multi-frame {fmt} ({frames} frames) is not a radiograph")
        try:
            img.load()
        except Exception as exc:
            problem = "truncated" if "truncat" in str(exc).lower() or isinstance(exc, EOFError) else "corrupt"
            raise error(f"{path}: {problem} {fmt} ({exc})") from exc
        yield img


def _png_header_size(path: str) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR, or None for other files."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or not head.startswith(b"\x89PNG\r\n\x1a\n") or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def _pillow_gray(img: Image.Image) -> np.ndarray:
    """Gray values of any Pillow mode, keeping 16-bit range; colour goes through luminance, palette
    images through their palette (indices of a palette film are meaningless as brightness)."""
    mode = img.mode
    if mode == "1":
        return np.asarray(img).astype(np.float32) * 255.0
    if mode in ("L", "I", "F") or mode.startswith("I;16"):
        return np.asarray(img).astype(np.float32)
    if mode in ("LA", "La"):
        return np.asarray(img.getchannel(0)).astype(np.float32)
    if mode in ("P", "PA"):
        return _luminance(np.asarray(img.convert("RGBA")))
    if mode not in ("RGB", "RGBA", "RGBa", "RGBX"):
        img = img.convert("RGB")
    return _luminance(np.asarray(img))


def _pillow_bits(path: str, img: Image.Image) -> int | None:
    """Stored bit depth: the PNG IHDR or TIFF BitsPerSample when present, else what the mode implies."""
    if img.format == "PNG":
        with open(path, "rb") as f:
            ihdr = f.read(25)
        if len(ihdr) == 25:
            return ihdr[24]
    if img.format == "TIFF":
        bps = getattr(img, "tag_v2", {}).get(258)
        if bps:
            return int(bps[0]) if isinstance(bps, tuple) else int(bps)
    if img.mode == "1":
        return 1
    if img.mode.startswith("I;16"):
        return 16
    return 32 if img.mode in ("I", "F") else 8


def _load_pillow(path: str) -> Radiograph:
    with _open_pillow(path, ImageReadError, MIN_SIDE) as img:
        gray = _pillow_gray(img)
        bands = len(img.getbands())
        source_shape = (img.height, img.width) + ((bands,) if bands > 1 else ())
        photometric = "PALETTE" if img.mode in ("P", "PA") else img.mode
        fmt = _PIL_FORMATS.get(img.format or "", (img.format or "image").lower())
        bits = _pillow_bits(path, img)
    return Radiograph(_finite(path, gray), path, fmt, source_shape, None, photometric, bits, None)


def _load_pillow_mask(path: str) -> tuple[np.ndarray, str]:
    with _open_pillow(path, MaskReadError, 1) as img:
        mode = img.mode
        values = np.asarray(img)
        stored = f"{img.format} {mode} {values.shape}"
    if mode in ("RGB", "RGBA", "RGBX"):
        rgb = values[..., :3]
        if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()):
            raise MaskReadError(f"{path}: RGB label mask with colours is ambiguous; "
                                "save one gray label map (0 background, 1..N labels)")
        values = rgb[..., 0]
    elif values.ndim == 3:  # LA, PA: the label channel, alpha ignored
        values = values[..., 0]
    return _integral_labels(values, path, MaskReadError), stored


def _png_bytes(labels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(labels).save(buf, format="PNG")
    return buf.getvalue()


# --- NIfTI ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _open_nifti(path: str, error: type[ValueError]) -> Iterator:
    """A lazily-read NIfTI image over an open (possibly gzip) stream, whatever the file's name: the header
    is parsed first so the size can be checked before the data is decompressed."""
    import nibabel as nib

    with open(path, "rb") as raw:
        gz = raw.read(2) == b"\x1f\x8b"
    opener = gzip.open if gz else open
    try:
        with opener(path, "rb") as stream:
            klass = nib.Nifti2Image if stream.read(8)[4:8] == b"n+2\x00" else nib.Nifti1Image
            stream.seek(0)
            yield klass.from_stream(stream)
    except error:
        raise
    except Exception as exc:
        raise error(f"{path}: not a readable NIfTI file ({exc})") from exc


def _nifti_plane(path: str, img, error: type[ValueError], min_side: int) -> np.ndarray:
    """The stored 2D plane [i, j] of a (X,Y), (X,Y,1) or (X,Y,1,1) NIfTI, refusing volumes from the
    header alone."""
    shape = tuple(int(d) for d in img.shape)
    if len(shape) < 2:
        raise error(f"{path}: NIfTI of shape {shape} is not a 2D image")
    if len(shape) >= 3 and shape[2] > 1:
        raise error(f"{path}: 3D volume (X,Y,Z)={shape[:3]} is not a radiograph")
    if any(d != 1 for d in shape[3:]):
        raise error(f"{path}: NIfTI of shape {shape} is not a single 2D image")
    _check_size(path, shape[1], shape[0], error, min_side)
    data = np.asanyarray(img.dataobj)
    if data.dtype.names:
        raise error(f"{path}: NIfTI data type {img.get_data_dtype()} (RGB/vector) is not supported")
    return data.reshape(shape[:2])


def _plane_axes(affine: np.ndarray) -> tuple[bool, bool, bool]:
    """(i_is_column, flip_i, flip_j) that put a plane the way Slicer displays it (see module docstring).
    The voxel axis on the lower world axis (x before y before z) runs across the screen; an axis pointing
    to the positive world direction (RAS right/anterior/superior) is reversed."""
    from nibabel.orientations import io_orientation

    ornt = io_orientation(np.asarray(affine, dtype=float))
    if ornt.shape[0] < 2 or np.isnan(ornt[:2]).any():
        return True, False, False  # degenerate affine: read the array as Slicer stores a PNG
    (axis_i, sign_i), (axis_j, sign_j) = ornt[0], ornt[1]
    return bool(axis_i < axis_j), bool(sign_i > 0), bool(sign_j > 0)


def _to_display(plane: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Stored [i, j] plane -> (H, W) display array."""
    i_is_column, flip_i, flip_j = _plane_axes(affine)
    if flip_i:
        plane = plane[::-1, :]
    if flip_j:
        plane = plane[:, ::-1]
    return np.ascontiguousarray(plane.T if i_is_column else plane)


def _from_display(pixels: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_to_display`: (H, W) display array -> stored [i, j] plane."""
    i_is_column, flip_i, flip_j = _plane_axes(affine)
    plane = pixels.T if i_is_column else pixels
    if flip_i:
        plane = plane[::-1, :]
    if flip_j:
        plane = plane[:, ::-1]
    return np.ascontiguousarray(plane)


def _load_nifti(path: str) -> Radiograph:
    with _open_nifti(path, ImageReadError) as img:
        plane = _nifti_plane(path, img, ImageReadError, MIN_SIDE)
        affine = np.array(img.affine, dtype=np.float64)
        zooms = img.header.get_zooms()
        bits = int(img.header["bitpix"])
        source_shape = tuple(int(d) for d in img.shape)
    pixels = _finite(path, _to_display(plane.astype(np.float32), affine))
    i_mm, j_mm = float(zooms[0]), float(zooms[1])
    spacing = (j_mm, i_mm) if _plane_axes(affine)[0] else (i_mm, j_mm)  # (row, col)
    return Radiograph(pixels, path, "nifti", source_shape, _valid_spacing(spacing), "MONOCHROME2", bits,
                      affine)


def _load_nifti_mask(path: str) -> tuple[np.ndarray, str]:
    with _open_nifti(path, MaskReadError) as img:
        plane = _nifti_plane(path, img, MaskReadError, 1)
        affine = np.array(img.affine, dtype=np.float64)
        stored = f"NIfTI {tuple(int(d) for d in img.shape)}"
    return _to_display(_integral_labels(plane, path, MaskReadError), affine), stored


def _mask_plane(labels: np.ndarray, like: Radiograph | None) -> tuple[np.ndarray, np.ndarray]:
    """The (X, Y) plane of an (H, W) label map and its NIfTI (RAS) affine: the film's own geometry when it
    came from NIfTI, else (column, row) = (X, Y) with the pixel spacing (1 mm when unknown)."""
    if like is not None and like.nifti_affine is not None:
        affine = np.asarray(like.nifti_affine, dtype=np.float64)
        return _from_display(labels, affine), affine
    row_mm, col_mm = like.pixel_spacing if like is not None and like.pixel_spacing else (1.0, 1.0)
    return np.ascontiguousarray(labels.T), np.diag([-col_mm, -row_mm, 1.0, 1.0])


def _nifti_mask_bytes(labels: np.ndarray, like: Radiograph | None) -> bytes:
    """A single-file NIfTI-1 of shape (X, Y, 1) (layers: (X, Y, 1, K)), uint8, with qform and sform both set (code 1, scanner)
    so ITK/Slicer and nibabel agree on the geometry whichever form they prefer."""
    import nibabel as nib

    if labels.ndim == 3:  # layers: (X, Y, 1, K)
        planes = [_mask_plane(layer, like) for layer in labels]
        data, affine = np.stack([p for p, _ in planes], -1)[:, :, None, :], planes[0][1]
    else:
        plane, affine = _mask_plane(labels, like)
        data = plane[..., None]
    img = nib.Nifti1Image(data.astype(np.uint8), affine)
    img.set_data_dtype(np.uint8)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    return img.to_bytes()


def _nrrd_mask_bytes(labels: np.ndarray, like: Radiograph | None) -> bytes:
    """An NRRD of sizes (X, Y, 1), uint8, raw: the same plane and geometry as :func:`_nifti_mask_bytes`,
    in LPS. The data is the (H, W) map row by row for PNG/DICOM films, which is also the order OHIF copies
    into its labelmap without reading the header."""
    plane, affine = _mask_plane(labels, like)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine

    def vec(v) -> str:
        return "(" + ",".join(f"{float(x):.10g}" for x in v) + ")"

    header = ("NRRD0004\n# xray_textseg label map\ntype: uint8\ndimension: 3\n"
              "space: left-posterior-superior\n"
              f"sizes: {plane.shape[0]} {plane.shape[1]} 1\n"
              f"space directions: {vec(lps[:3, 0])} {vec(lps[:3, 1])} {vec(lps[:3, 2])}\n"
              "kinds: domain domain domain\nendian: little\nencoding: raw\n"
              f"space origin: {vec(lps[:3, 3])}\n\n")
    return header.encode("ascii") + np.ascontiguousarray(plane.T, dtype=np.uint8).tobytes()


# --- DICOM -----------------------------------------------------------------------------------------------
def _read_dicom(path: str, sniffed: bool):
    """Parse with ``force=True`` (files without the 128-byte preamble are common from older modalities
    and PACS exports), then insist on real DICOM elements: forced parsing of random bytes 'succeeds'.
    Values over 1 MB (the pixel data) are read only when used, i.e. after the header size check."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, force=True, defer_size="1 MB")
    except Exception as exc:
        raise ImageReadError(f"{path}: {_not_dicom(sniffed)} ({exc})") from exc
    if not any(keyword in ds for keyword in _DICOM_MARKERS):
        raise ImageReadError(f"{path}: {_not_dicom(sniffed)}")
    _ensure_transfer_syntax(ds)
    return ds


def _not_dicom(sniffed: bool) -> str:
    return "not a DICOM file" if sniffed else "not a DICOM file, nor a PNG/JPEG/TIFF/NIfTI image"


def _ensure_transfer_syntax(ds) -> None:
    """A bare dataset (no file meta) has no TransferSyntaxUID, which pydicom needs to decode pixels;
    take the encoding the parser detected."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = FileMetaDataset()
        ds.file_meta = meta
    if "TransferSyntaxUID" not in meta:
        if ds.is_implicit_VR is not False:
            meta.TransferSyntaxUID = ImplicitVRLittleEndian
        else:
            meta.TransferSyntaxUID = ExplicitVRLittleEndian if ds.is_little_endian else ExplicitVRBigEndian


def _decode_dicom(path: str, ds) -> np.ndarray:
    """The stored pixel array, after the checks that need only the header."""
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageReadError(f"{path}: DICOM has no pixel data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageReadError(f"{path}: multi-frame DICOM ({frames} frames) is not a radiograph")
    if "Rows" not in ds or "Columns" not in ds:
        raise ImageReadError(f"{path}: DICOM has pixel data but no Rows/Columns")
    _check_size(path, int(ds.Rows), int(ds.Columns))
    syntax = ds.file_meta.TransferSyntaxUID
    try:
        arr = ds.pixel_array
    except Exception as exc:
        label = syntax.name if syntax.name != str(syntax) else "unknown transfer syntax"
        raise ImageReadError(f"{path}: cannot decode DICOM pixel data ({label}, {syntax}): {exc}") from exc
    if arr.ndim not in (2, 3) or arr.shape[:2] != (int(ds.Rows), int(ds.Columns)):
        raise ImageReadError(f"{path}: DICOM pixel data of shape {arr.shape} is not one 2D frame")
    return arr


def _dicom_colour_to_gray(ds, arr: np.ndarray, photometric: str) -> np.ndarray:
    """Luminance of colour DICOM. Palette goes through its LUT. YBR data that no decoder converted
    (uncompressed or RLE) already carries luminance in Y; decoders of JPEG/J2K return RGB."""
    from pydicom.pixel_data_handlers.util import apply_color_lut
    from pydicom.uid import RLELossless

    if photometric == "PALETTE COLOR":
        return _luminance(apply_color_lut(arr, ds))
    syntax = ds.file_meta.TransferSyntaxUID
    if photometric.startswith("YBR_FULL") and (not syntax.is_compressed or syntax == RLELossless):
        return arr[..., 0].astype(np.float32)
    return _luminance(arr)


def _apply_voi(ds, values: np.ndarray) -> np.ndarray:
    """The VOI LUT or first window: what the radiologist sees (CR windows often clip, deliberately).
    A malformed window, or one that misses the data entirely, is ignored rather than making the film
    unreadable or flat."""
    from pydicom.pixel_data_handlers.util import apply_voi_lut

    if "VOILUTSequence" not in ds and "WindowCenter" not in ds:
        return values
    try:
        windowed = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64)
    except (ValueError, TypeError, AttributeError, IndexError, KeyError, ArithmeticError):
        return values
    if not np.isfinite(windowed).all() or (np.ptp(windowed) == 0 and np.ptp(values) > 0):
        return values
    return windowed


def _dicom_gray(path: str, ds, arr: np.ndarray, photometric: str) -> np.ndarray:
    """Modality LUT -> VOI -> MONOCHROME1 inversion, so higher is brighter as displayed."""
    from pydicom.pixel_data_handlers.util import apply_modality_lut

    try:
        values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    except Exception as exc:
        raise ImageReadError(f"{path}: invalid DICOM modality LUT / rescale ({exc})") from exc
    values = _apply_voi(ds, values)
    if photometric == "MONOCHROME1":
        values = values.max() + values.min() - values
    return values


def _dicom_spacing(ds) -> tuple[float, float] | None:
    """(row, col) mm: PixelSpacing (calibrated at the patient), else ImagerPixelSpacing (at the detector).
    Zero or missing values (seen in real CR files) mean unknown."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            values = ds.get(keyword)
            spacing = _valid_spacing((float(values[0]), float(values[1]))) if values is not None else None
        except (TypeError, ValueError, IndexError):
            spacing = None
        if spacing is not None:
            return spacing
    return None


def _valid_spacing(spacing: tuple[float, float]) -> tuple[float, float] | None:
    row, col = float(spacing[0]), float(spacing[1])
    return (row, col) if all(np.isfinite(v) and v > 0 for v in (row, col)) else None


def _load_dicom(path: str, sniffed: bool = True) -> Radiograph:
    ds = _read_dicom(path, sniffed)
    arr = _decode_dicom(path, ds)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if arr.ndim == 3 or int(ds.get("SamplesPerPixel", 1) or 1) > 1 or photometric == "PALETTE COLOR":
        try:
            gray = _dicom_colour_to_gray(ds, arr, photometric)
        except Exception as exc:
            raise ImageReadError(f"{path}: cannot convert {photometric} DICOM to gray ({exc})") from exc
    else:
        gray = _dicom_gray(path, ds, arr, photometric)
    bits = int(ds.BitsStored) if "BitsStored" in ds else None
    return Radiograph(_finite(path, gray), path, "dicom", tuple(arr.shape), _dicom_spacing(ds), photometric,
                      bits, None)


__all__ = [
    "MAX_PIXELS",
    "MIN_SIDE",
    "ImageReadError",
    "MaskReadError",
    "Radiograph",
    "load_mask",
    "load_radiograph",
    "radiograph_from_array",
    "save_mask",
    "write_atomic",
]
