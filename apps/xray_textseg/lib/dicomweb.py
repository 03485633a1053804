"""DICOMweb (PACS) datastore for radiographs: MONAI Label 0.8.5's DICOMWebDatastore, adapted to 2D films.

What changes against the upstream class, and why:

* images: the series is downloaded (WADO-RS) and its radiograph, a ``.dcm``, is handed to the infer task
  as it is, never converted to NIfTI (SimpleITK's conversion ignores MONOCHROME1 and the VOI window, so
  a CR film would reach the model inverted). A series with several instances (seen in CR exports) gives
  its first film by InstanceNumber;
* final labels are stored in the PACS as DICOM SEG written by our engine (``xray_textseg.dicom_seg``,
  highdicom): upstream converts with dcmqi, downloaded from GitHub at server start and at run time, or
  pydicom-seg, both made for CT/MR volumes. Labels arrive as NIfTI/PNG (3D Slicer) or OHIF's raw
  ``label.bin`` (Rows x Columns uint8, row by row);
* SEG series found in the PACS (saved by another tool) are read back with our reader for training;
* no dcmqi download at start: :func:`init_dicomweb_datastore` builds the client itself.

The search filter is MONAI Label's ``MONAI_LABEL_DICOMWEB_SEARCH_FILTER``; left at MONAI Label's CT
default it becomes :data:`RADIOGRAPH_FILTER` (DX, CR and DR, a QIDO list match).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
from typing import Any

import numpy as np
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.dicom import dicom_web_download_series
from monailabel.interfaces.datastore import DefaultLabelTag
from xray_textseg.dicom_seg import SegError, read_seg, write_seg
from xray_textseg.io import ImageReadError, MaskReadError, load_mask, load_radiograph, save_mask

from .infers import LABEL_VALUES
from .trainers import label_values_from_info

logger = logging.getLogger(__name__)

RADIOGRAPH_FILTER = {"Modality": "DX,CR,DR"}
MONAI_DEFAULT_FILTER = {"Modality": "CT"}
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_NOT_IMAGES = {"SEG", "SR", "PR", "KO", "RTSTRUCT", "REG", "DOC"}


def is_dicomweb(studies: str) -> bool:
    """``--studies`` names a DICOMweb server (not a folder, not an XNAT/DSA datastore)."""
    return studies.strip().startswith(("http://", "https://")) and \
        settings.MONAI_LABEL_DATASTORE.lower() not in ("xnat", "dsa")


def search_filter() -> dict[str, Any]:
    configured = dict(settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER or {})
    return dict(RADIOGRAPH_FILTER) if configured == MONAI_DEFAULT_FILTER else configured


def init_dicomweb_datastore(studies: str) -> RadiographDICOMwebDatastore:
    """The client as MONAI Label builds it (user/password, QIDO/WADO/STOW prefixes, Google Cloud), without
    its run-time dcmqi download."""
    session = None
    url = studies.rstrip("/").strip()
    if "googleapis.com" in url:
        from dicomweb_client import DICOMwebClient
        from dicomweb_client.ext.gcp.session_utils import create_session_from_gcp_credentials

        client = DICOMwebClient(url=url, session=create_session_from_gcp_credentials())
    else:
        if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
            from dicomweb_client.session_utils import create_session_from_user_pass

            session = create_session_from_user_pass(settings.MONAI_LABEL_DICOMWEB_USERNAME,
                                                    settings.MONAI_LABEL_DICOMWEB_PASSWORD)
        client = DICOMwebClientX(url=url, session=session, qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                                 wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
                                 stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)
    cache = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or settings.MONAI_LABEL_DATASTORE_CACHE_PATH or "").strip()
    filters = search_filter()
    logger.info("DICOMweb radiograph datastore %s, search filter %s", url, filters)
    return RadiographDICOMwebDatastore(client, filters, cache_path=cache or None,
                                       fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME)


def download_series(client, series_id: str, save_dir: str, fetch_by_frame: bool = False) -> None:
    """WADO-RS a series into ``save_dir`` as ``<SOPInstanceUID>.dcm``, in its stored transfer syntax: without
    ``transfer-syntax=*`` a PACS must transcode to Explicit VR Little Endian, which Orthanc cannot do for
    JPEG 2000 (HTTP 500); our reader decodes the stored syntaxes itself. Servers refusing ``*`` get the
    plain request. LookupError when the PACS has no such series."""
    import requests
    from pydicom.dataset import Dataset

    if fetch_by_frame:
        dicom_web_download_series(None, series_id, save_dir, client, True)
        return
    found = [s for s in client.search_for_series(search_filters={"SeriesInstanceUID": series_id})
             if s.get("0020000E", {}).get("Value") == [series_id]]
    if not found:
        raise LookupError(f"no series {series_id} in the PACS")
    study_id = str(Dataset.from_json(found[0]).StudyInstanceUID)
    try:
        instances = client.retrieve_series(study_id, series_id, media_types=(("application/dicom", "*"),))
    except requests.HTTPError as exc:
        if exc.response is None or exc.response.status_code not in (400, 406, 415):
            raise
        instances = client.retrieve_series(study_id, series_id)
    os.makedirs(save_dir, exist_ok=True)
    for instance in instances:
        instance.save_as(os.path.join(save_dir, f"{instance.SOPInstanceUID}.dcm"))


def radiograph_file(series_dir: str) -> str:
    """The film of a downloaded series: the image instance with the lowest InstanceNumber (then file name)."""
    import pydicom

    candidates = []
    for name in sorted(os.listdir(series_dir)):
        path = os.path.join(series_dir, name)
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception as exc:  # noqa: BLE001 - not DICOM: not a candidate
            logger.debug("skipping %s: %s", name, exc)
            continue
        if str(ds.get("Modality", "")) in _NOT_IMAGES or "Rows" not in ds:
            continue
        try:
            number = int(ds.get("InstanceNumber") or 0)
        except (TypeError, ValueError):
            number = 0
        candidates.append((number, name, path))
    if not candidates:
        raise ImageReadError(f"{series_dir}: the series holds no image")
    if len(candidates) > 1:
        logger.info("series %s has %d images; using %s", os.path.basename(series_dir), len(candidates),
                    min(candidates)[1])
    return min(candidates)[2]


class RadiographDICOMwebDatastore(DICOMWebDatastore):
    def __init__(self, client, search_filter: dict[str, Any], cache_path: str | None = None,
                 fetch_by_frame: bool = False):
        super().__init__(client, search_filter, cache_path=cache_path, fetch_by_frame=fetch_by_frame,
                         convert_to_nifti=False)
        self._fetch_lock = threading.Lock()

    def _to_id(self, file: str) -> tuple[str, str]:
        # series UIDs are full of dots: only the known suffixes are extensions
        for ext in (".nii.gz", ".nii", ".nrrd", ".dcm"):
            if file.endswith(ext):
                return file[: -len(ext)], ext
        return super()._to_id(file)

    # --- images ---------------------------------------------------------------------------------------
    def get_image_uri(self, image_id: str) -> str:
        """Local path of the series' radiograph (``<cache>/<series uid>.dcm``), downloaded on first use;
        "" for an id that is not a UID or not in the PACS (the infer task answers 404)."""
        local = LocalDatastore.get_image_uri(self, image_id)
        if local and os.path.isfile(local):
            return local
        if not isinstance(image_id, str) or not _UID.match(image_id) or len(image_id) > 64:
            return ""
        with self._fetch_lock:
            local = LocalDatastore.get_image_uri(self, image_id)
            if local and os.path.isfile(local):
                return local
            series_dir = os.path.join(self._datastore.image_path(), image_id)
            try:
                if not os.path.isdir(series_dir) or not os.listdir(series_dir):
                    download_series(self._client, image_id, series_dir, self._fetch_by_frame)
                source = radiograph_file(series_dir)
                LocalDatastore.add_image(self, image_id, source, self._dicom_info(image_id))
            except (LookupError, ImageReadError) as exc:  # no such series / nothing to show
                logger.warning("image %s not available from %s: %s", image_id, self.name(), exc)
                return ""
            finally:
                shutil.rmtree(series_dir, ignore_errors=True)
        return LocalDatastore.get_image_uri(self, image_id)

    # --- labels -----------------------------------------------------------------------------------------
    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any],
                   label_id: str = "") -> str:
        """Final labels: DICOM SEG to the PACS (STOW-RS), then a NIfTI copy in the cache; others: the copy."""
        image_uri = self.get_image_uri(image_id)
        if not image_uri:
            raise HTTPException(status_code=404, detail=f"image not found: {image_id!r}")
        image = load_radiograph(image_uri)
        label_map = self._label_map(label_filename, image)
        label_info = dict(label_info or {})
        if label_tag == DefaultLabelTag.FINAL:
            names = self._segment_names(label_map, label_info)
            try:
                seg = write_seg(image_uri, label_map, names)
            except SegError as exc:
                raise HTTPException(status_code=400, detail=f"cannot store label as DICOM SEG: {exc}") from exc
            try:
                self._client.store_instances([seg])
            except Exception as exc:  # the PACS refused or is down: say so, keep nothing
                raise HTTPException(status_code=502, detail=f"PACS did not store the DICOM SEG: {exc}") from exc
            logger.info("label for %s stored in the PACS as DICOM SEG series %s (%s)", image_id,
                        seg.SeriesInstanceUID, ", ".join(f"{v}={n}" for v, n in names.items()))
            image_info = self.get_image_info(image_id)
            label_info.update({"SeriesInstanceUID": str(seg.SeriesInstanceUID),
                               "SOPInstanceUID": str(seg.SOPInstanceUID), "Modality": "SEG",
                               "StudyInstanceUID": image_info.get("StudyInstanceUID"),
                               "PatientID": image_info.get("PatientID"),
                               "segments": {str(v): n for v, n in names.items()}})
            type(self).get_labeled_images.cache_clear()  # the new SEG counts at once, not after the TTL
        fd, local = tempfile.mkstemp(suffix=".nii.gz", prefix="xray_textseg_label_")
        os.close(fd)
        try:
            save_mask(label_map, local, like=image)
            return LocalDatastore.save_label(self, image_id, local, label_tag, label_info)
        finally:
            os.unlink(local)

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """The cached label (saved through this server, or read before); for a final label only in the
        PACS, ``label_id`` is its SEG series (upstream's datalist) or the image series: read with our
        reader and cached as NIfTI in the image's geometry."""
        for key in (image_id, label_id):
            local = LocalDatastore.get_label_uri(self, key, label_tag) if key else ""
            if local and os.path.isfile(local):
                return local
        if label_tag != DefaultLabelTag.FINAL:
            return ""
        seg_series, image_series = (label_id, image_id) if image_id else self._seg_of_image(label_id)
        if not seg_series or not image_series:
            return ""
        seg_dir = os.path.join(self._datastore.label_path(DefaultLabelTag.FINAL), seg_series)
        try:
            download_series(self._client, seg_series, seg_dir)
            image_uri = self.get_image_uri(image_series)
            image = load_radiograph(image_uri)
            import pydicom

            source_uid = str(pydicom.dcmread(image_uri, stop_before_pixels=True).SOPInstanceUID)
            seg = read_seg(os.path.join(seg_dir, min(os.listdir(seg_dir))), source_uid)
        except (LookupError, OSError, ImageReadError, SegError) as exc:
            logger.warning("cannot read SEG %s of %s: %s", seg_series, image_series, exc)
            return ""
        finally:
            shutil.rmtree(seg_dir, ignore_errors=True)
        if seg.shape != image.shape:
            logger.warning("SEG %s is %s, its image %s; ignored", seg_series, seg.shape, image.shape)
            return ""
        label_map = np.zeros(image.shape, dtype=np.uint8)
        names = {}
        for s in seg.segments:
            value = LABEL_VALUES.get(s.name or "")
            if value:
                label_map[s.mask] = value
                names[s.name] = value
        fd, local = tempfile.mkstemp(suffix=".nii.gz", prefix="xray_textseg_seg_")
        os.close(fd)
        try:
            save_mask(label_map, local, like=image)
            LocalDatastore.save_label(self, image_series, local, DefaultLabelTag.FINAL,
                                      {"SeriesInstanceUID": seg_series, "Modality": "SEG", "label_names": names})
        finally:
            os.unlink(local)
        return LocalDatastore.get_label_uri(self, image_series, DefaultLabelTag.FINAL)

    # --- helpers ------------------------------------------------------------------------------------------
    @staticmethod
    def _label_map(label_filename: str, image) -> np.ndarray:
        """(H, W) uint8 of an uploaded label: OHIF's raw ``.bin`` (H*W bytes, row by row) or any mask file
        :func:`xray_textseg.io.load_mask` reads (PNG, NIfTI (W,H,1) from 3D Slicer)."""
        try:
            if label_filename.endswith(".bin"):
                raw = np.fromfile(label_filename, dtype=np.uint8)
                if raw.size != image.shape[0] * image.shape[1]:
                    raise MaskReadError(f"label.bin has {raw.size} values, the image {image.shape[1]}x"
                                        f"{image.shape[0]} pixels")
                return raw.reshape(image.shape)
            return load_mask(label_filename, image.shape)
        except (MaskReadError, FileNotFoundError) as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc

    @staticmethod
    def _segment_names(label_map: np.ndarray, label_info: dict[str, Any]) -> dict[int, str]:
        """Label value -> segment name: from what the client sent (Slicer ``label_info``, our
        ``label_names``), else our stable values, else ``label <value>``."""
        by_value = {v: k for k, v in label_values_from_info(label_info).items()}
        stable = {v: k for k, v in LABEL_VALUES.items()}
        return {int(v): by_value.get(int(v)) or stable.get(int(v)) or f"label {int(v)}"
                for v in np.unique(label_map) if v}

    def _seg_of_image(self, image_series: str) -> tuple[str, str]:
        """(SEG series, image series) of the last SEG the PACS lists that references ``image_series``."""
        from pydicom.dataset import Dataset

        found = ""
        for item in self._client.search_for_series(search_filters={"Modality": "SEG"}):
            seg = Dataset.from_json(item)
            meta = Dataset.from_json(self._client.retrieve_series_metadata(str(seg.StudyInstanceUID),
                                                                            str(seg.SeriesInstanceUID))[0])
            refs = meta.get("ReferencedSeriesSequence") or []
            if refs and str(refs[0].SeriesInstanceUID) == image_series:
                found = str(seg.SeriesInstanceUID)
        return (found, image_series) if found else ("", "")
