"""Guards between MONAI Label's HTTP layer and the engine: what a request may name, what the datastore
may store, and which errors are the client's.

MONAI Label 0.8.5 trusts its inputs: an image id or label tag with ``../`` writes outside the studies
folder, an existing server path given as ``image`` is read, a truncated label upload replaces a good
label (``shutil.copy`` over it), and its own "not found" errors (unknown model, strategy, image, label)
and malformed JSON form fields come back as HTTP 500. The rules here (README "Input limits"):

* image ids and label tags: 1-128 characters, no ``/``, ``\\`` or control characters, not starting with
  ``.`` -> else 400;
* an infer ``image`` is a datastore id, or a file MONAI Label itself wrote for this request (an infer
  upload in the temp folder, a session) -> else 404, whether or not the path exists;
* an uploaded image must be read by the same reader as inference (:func:`load_radiograph`) before it
  enters the datastore -> else 422 naming the problem;
* a saved label must be a PNG/TIFF/NIfTI label map of its image's (H, W) holding only declared values
  (Slicer's ``label_info``, our ``label_names``, else the app's label values) -> else 422;
* no request path may hold a ``.`` or ``..`` segment (:class:`RequestGuard`) -> else 400; session archives are
  unpacked member by member (``lib/sessions.py``);
* images, labels and ``datastore_v2.json`` are written to a temporary file and renamed: a crash leaves
  the old file or the new one, never half of one;
* every change to ``datastore_v2.json`` re-reads it under the file lock first: MONAI Label runs scoring
  and training in subprocesses with their own datastore objects, and a stale in-memory copy written
  back (``update_image_info`` from an active-learning score) would otherwise drop labels saved meanwhile.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import time
from typing import Any

import numpy as np
from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel
from monailabel.interfaces.exception import (
    ImageNotFoundException,
    LabelNotFoundException,
    MONAILabelError,
    MONAILabelException,
)
from xray_textseg.io import ImageReadError, MaskReadError, load_label_layers, load_radiograph, write_atomic

from .infers import LABEL_VALUES

logger = logging.getLogger(__name__)

MASK_EXTENSIONS = (".nii.gz", ".nii", ".png", ".tif", ".tiff")
NAME_PATTERN = re.compile(r"[^./\\\x00-\x1f\x7f][^/\\\x00-\x1f\x7f]{0,127}")
_STDLIB = os.path.realpath(sysconfig.get_paths()["stdlib"])
_ENDPOINTS = os.path.join("monailabel", "endpoints") + os.sep
# client errors that MONAI Label itself raises as HTTP 500
_CLIENT_500S = ("Neither Image nor File",)


def check_name(value: Any, what: str) -> str:
    """An image id or label tag that is safe as one file or folder name (no traversal), else 400."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise HTTPException(status_code=400, detail=f"invalid {what} {str(value)[:80]!r}: 1-128 characters, "
                                                    "no '/', '\\' or control characters, not starting with '.'")
    return value


def check_infer_image(request: dict[str, Any], session_root: str | None = None, datastore=None,
                      upload: str | None = None) -> None:
    """Refuse an infer ``image`` that is a server path rather than a datastore id (MONAI Label reads any
    existing path it is given), and name an unknown id of the local datastore in the 404 (a DICOMweb id is
    left to its datastore: looking it up downloads the series). Allowed paths: this request's own upload
    (``upload``, set by the app's infer route) and session images."""
    image = request.get("image")
    if not isinstance(image, str) or not image:
        return
    if not os.path.exists(image):
        if isinstance(datastore, SafeLocalDatastore) and not datastore.get_image_uri(image):  # a dict lookup
            raise HTTPException(status_code=404, detail=f"image not found: {image[:200]!r}")
        return
    real = os.path.realpath(image)
    if upload and real == os.path.realpath(upload):
        return
    if session_root and real.startswith(os.path.realpath(session_root) + os.sep):
        return
    raise HTTPException(status_code=404, detail=f"image not found: {image[:200]!r} (name a datastore image id; "
                                                "server paths are not accepted)")


def declared_values(info: Any) -> set[int]:
    """Label values a saved label may hold: 0 plus those its info declares (Slicer's ``label_info`` idx,
    our ``label_names``), else the app's stable values. Malformed declarations are a 400."""
    params = info.get("params", info) if isinstance(info, dict) else {}
    params = params if isinstance(params, dict) else {}
    try:
        if "label_info" in params:
            values = {int(entry["idx"]) for entry in params["label_info"]}
        elif "label_names" in params:
            values = {int(v) for v in dict(params["label_names"]).values()}
        else:
            values = set(LABEL_VALUES.values())
    except (TypeError, ValueError, KeyError) as exc:
        raise HTTPException(status_code=400, detail=f"malformed label_info/label_names ({exc!r}): expected "
                                                    "label_info=[{'name': ..., 'idx': int}, ...]") from None
    return values | {0}


def copy_atomic(src: str, dest: str) -> None:
    """Copy to a temporary sibling, fsync, rename over ``dest``: readers and crashes see old or new."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest) or ".", prefix=f".{os.path.basename(dest)}.",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _discarded_when_refused(path: str):
    """MONAI Label's upload endpoints remove their temporary copy only after a success: on a refusal it is
    removed here (only a file directly in the temp folder, where those endpoints write)."""
    try:
        yield
    except BaseException:
        if path and os.path.dirname(os.path.realpath(path)) == os.path.realpath(tempfile.gettempdir()):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        raise


class SafeLocalDatastore(LocalDatastore):
    """LocalDatastore that validates uploads and labels (see module docstring) and writes atomically.

    ``label_check(image_path, layers, info) -> dict``: set by the app, called for final labels before anything is
    written; it raises an HTTPException to refuse a label, or returns what to keep with it under ``check``."""

    label_check = None

    def _reload_locked(self) -> None:
        """Re-read ``datastore_v2.json`` (caller holds the file lock): other processes may have written it."""
        if os.path.exists(self._datastore_config_path):
            with open(self._datastore_config_path) as fp:
                self._datastore = LocalDatastoreModel.model_validate_json(fp.read())
            self._datastore.base_path = self._datastore_path
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        with FileLock(self._lock_file):
            self._reload_locked()
            obj = self._datastore.objects.get(image_id)
            if not obj:
                raise ImageNotFoundException(f"Image {image_id} not found")
            obj.image.info.update(info)
            self._update_datastore_file(lock=False)

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        with FileLock(self._lock_file):
            self._reload_locked()
            label = self._datastore.label(label_id, label_tag)
            if not label:
                raise LabelNotFoundException(f"Label: {label_id} Tag: {label_tag} not found")
            label.info.update(info)
            self._update_datastore_file(lock=False)

    def _ext(self, filename: str) -> str:
        return self._to_id(os.path.basename(filename))[1]

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        with _discarded_when_refused(image_filename):
            return self._add_image(image_id, image_filename, image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        with _discarded_when_refused(label_filename):
            return self._save_label(image_id, label_filename, label_tag, label_info)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        check_name(label_tag, "label tag")
        obj = self._datastore.objects.get(label_id)
        if not obj or label_tag not in obj.labels:
            raise HTTPException(status_code=404, detail=f"no {label_tag!r} label for image {str(label_id)[:200]!r}")
        super().remove_label(label_id, label_tag)

    def _add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        default_id, ext = self._to_id(os.path.basename(image_filename))
        image_id = check_name(image_id or default_id, "image id")
        if not any(fnmatch.fnmatch(f"x{ext}".lower(), p.lower()) for p in self._extensions):
            raise HTTPException(status_code=400, detail=f"image type {ext or '(none)'!r} is not accepted here; "
                                                        f"send one of {', '.join(self._extensions)}")
        try:
            load_radiograph(image_filename)
        except ImageReadError as exc:
            raise HTTPException(status_code=422, detail=str(exc).replace(image_filename, image_id)) from None
        name = self._filename(image_id, ext)
        dest = os.path.join(self._datastore.image_path(), name)
        with FileLock(self._lock_file):
            self._reload_locked()
            old = self._datastore.objects.get(image_id)
            if old is not None and old.labels:
                raise HTTPException(status_code=409, detail=f"image {image_id!r} has labels ({', '.join(old.labels)}): "
                                                            "a new film under its id would detach them; delete its "
                                                            "labels first or upload it under another id")
            copy_atomic(image_filename, dest)
            info = dict(image_info or {}, ts=int(time.time()), name=name)
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext))
            self._update_datastore_file(lock=False)
        logger.info("added image %s (%s)", image_id, name)
        return image_id

    def _save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        if label_info is not None and not isinstance(label_info, dict):
            raise HTTPException(status_code=400, detail=f"label 'params' must be a JSON object, got "
                                                        f"{type(label_info).__name__}: {str(label_info)[:80]!r}")
        obj = self._datastore.objects.get(image_id)
        if not obj:
            raise HTTPException(status_code=404, detail=f"image not found: {str(image_id)[:200]!r}")
        check_name(label_tag, "label tag")
        ext = self._ext(label_filename)
        if ext.lower() not in MASK_EXTENSIONS:
            raise HTTPException(status_code=400, detail=f"label format {ext or '(none)'!r} is not accepted; send a "
                                                        f"label map as {', '.join(MASK_EXTENSIONS)}")
        allowed = declared_values(label_info)
        try:
            shape = load_radiograph(self.get_image_uri(image_id)).shape
        except ImageReadError as exc:
            raise HTTPException(status_code=422, detail=f"the stored image cannot be read: {exc}") from None
        try:
            labels = load_label_layers(label_filename, shape)  # one label map, or layers holding overlaps
        except MaskReadError as exc:
            raise HTTPException(status_code=422, detail=str(exc).replace(label_filename, "label")) from None
        unknown = sorted(set(np.unique(labels).tolist()) - allowed)
        if unknown:
            raise HTTPException(status_code=422, detail=f"label holds values {unknown[:10]} that are not declared "
                                                        f"labels (allowed: {sorted(allowed)}; 0 is background)")
        checked = {}
        if self.label_check is not None and label_tag == "final":
            checked = self.label_check(self.get_image_uri(image_id), labels, label_info or {})
        label_path = self._datastore.label_path(label_tag)
        name = self._filename(image_id, ext)
        with FileLock(self._lock_file):
            self._reload_locked()
            obj = self._datastore.objects.get(image_id)
            if not obj:
                raise HTTPException(status_code=404, detail=f"image not found: {str(image_id)[:200]!r}")
            os.makedirs(label_path, exist_ok=True)
            copy_atomic(label_filename, os.path.join(label_path, name))
            info = dict(label_info or {}, ts=int(time.time()), name=name, **({"check": checked} if checked else {}))
            info.pop("confirmed", None)  # a new label is confirmed by a person afresh
            obj.labels[label_tag] = DataModel(info=info, ext=ext)
            self._update_datastore_file(lock=False)
        logger.info("saved label %s/%s (%s)", label_tag, name, "x".join(map(str, labels.shape)))
        return image_id

    def _update_datastore_file(self, lock: bool = True) -> None:
        """``datastore_v2.json`` replaced atomically: a crash mid-write must not lose the whole datastore."""
        def write() -> None:
            data = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            write_atomic(self._datastore_config_path, data.encode())
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()


# --- error mapping --------------------------------------------------------------------------------------
def _error(status: int, detail: str):
    from fastapi.responses import JSONResponse

    return JSONResponse({"detail": detail}, status_code=status)


def _client_side(exc: BaseException) -> bool:
    """True when the innermost frame outside the standard library is a MONAI Label endpoint: the exception
    came from parsing the request (``json.loads(params)``, ``request.update(params)``), not from work."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(os.path.realpath(tb.tb_frame.f_code.co_filename))
        tb = tb.tb_next
    own = [f for f in frames if not f.startswith(_STDLIB + os.sep) or "-packages" + os.sep in f]
    return bool(own) and _ENDPOINTS in own[-1]


async def _monailabel_error(request, exc: MONAILabelException):
    msg = str(getattr(exc, "msg", exc))
    if isinstance(exc, (ImageNotFoundException, LabelNotFoundException)) or "There is no" in msg:
        return _error(404, msg)
    if getattr(exc, "error", None) == MONAILabelError.INVALID_INPUT:
        return _error(400, msg)
    logger.error("%s %s failed: %s", request.method, request.url.path, msg, exc_info=exc)
    return _error(500, msg)


async def _value_error(request, exc: Exception):
    if _client_side(exc):
        what = "malformed JSON" if isinstance(exc, json.JSONDecodeError) else "malformed request field"
        return _error(400, f"{what}: {exc}")
    logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return _error(500, "Internal Server Error")


async def _http_error(request, exc):
    from fastapi.exception_handlers import http_exception_handler

    if exc.status_code == 500 and str(exc.detail).startswith(_CLIENT_500S):
        return _error(400, str(exc.detail))
    return await http_exception_handler(request, exc)


class RequestGuard:
    """ASGI middleware: refuses, before any endpoint runs, a path with a '.' or '..' segment (percent-decoded:
    passed on, it climbs out of a session folder or the PACS proxy's DICOMweb prefix) and ``POST /train/<name>``
    for a task the app does not have (MONAI Label answers 200 and its subprocess fails later)."""

    def __init__(self, app, trainers: tuple[str, ...] = (), dicom_seg: bool = False):
        self.app = app
        self.trainers = set(trainers)
        self.dicom_seg = dicom_seg  # DICOM SEG answers need a DICOMweb datastore

    def problem(self, scope) -> tuple[int, str] | None:
        path, method = scope.get("path", ""), scope.get("method")
        if any(part in (".", "..") for part in path.split("/")):
            return 400, "invalid path: '.' and '..' segments are not accepted"
        if method == "PUT" and path.startswith("/model/"):
            return 405, ("adapters are not uploaded: they are trained from saved labels and promoted by the server "
                         "(GET /adapter/ lists them)")
        if path.startswith("/infer/") and not self.dicom_seg and \
                b"output=dicom_seg" in scope.get("query_string", b""):
            return 400, ("output=dicom_seg needs a DICOMweb datastore (--studies http(s)://.../dicom-web); this "
                         "server's datastore is a folder: ask for output=image or all")
        if self.trainers and method == "POST" and path.startswith("/train/"):
            name = path[len("/train/"):].strip("/")
            if name and name not in self.trainers:
                return 404, f"unknown training task {name[:200]!r}; this app has: {', '.join(sorted(self.trainers))}"
        return None

    async def __call__(self, scope, receive, send):
        found = self.problem(scope) if scope["type"] == "http" else None
        if found:
            await _error(*found)(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def install_error_handlers(trainers: tuple[str, ...] = (), dicom_seg: bool = False) -> bool:
    """Map MONAI Label's client errors to 4xx on the running server (no-op outside the server, e.g. in the
    training subprocess). Starlette builds its middleware stack lazily, once: it is reset here so that the
    next request rebuilds it with these handlers.

    ``trainers``: the app's training task names. MONAI Label starts ``POST /train/<name>`` in a subprocess
    and answers 200 before that subprocess finds no such task; an unknown name is a 404 here instead."""
    server = getattr(sys.modules.get("monailabel.app"), "app", None)
    if server is None:
        return False
    from starlette.exceptions import HTTPException as StarletteHTTPException

    server.add_exception_handler(MONAILabelException, _monailabel_error)
    server.add_exception_handler(ValueError, _value_error)  # JSONDecodeError is a ValueError
    server.add_exception_handler(TypeError, _value_error)
    server.add_exception_handler(StarletteHTTPException, _http_error)
    server.middleware_stack = None
    server.add_middleware(RequestGuard, trainers=tuple(trainers), dicom_seg=dicom_seg)
    logger.info("installed 4xx mapping for MONAI Label client errors")
    return True
