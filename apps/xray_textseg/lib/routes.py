"""Endpoints the app adds to MONAI Label's server: ``GET /adapter/`` and ``POST /adapter/rollback`` (what an
administrator needs to see and undo the learning loop's decisions) and ``POST /train/<task>`` ahead of MONAI
Label's own, which checks a run's parameters before the run is submitted (MONAI Label answers 200 and the run
fails later in its subprocess). Admin role when MONAI Label's auth is on."""

import json
import logging
import os
import pathlib
import shutil
import sys
import tempfile
import threading
import time

from fastapi import Depends, HTTPException

logger = logging.getLogger(__name__)


def install_adapter_routes(store, on_change=None) -> bool:
    """Add the routes to the running server (no-op outside it, e.g. in the training subprocess). ``on_change``
    is called after a rollback (the infer task picks the version up on its next request anyway)."""
    server = getattr(sys.modules.get("monailabel.app"), "app", None)
    if server is None:
        return False
    from monailabel.config import settings
    from monailabel.endpoints.user.auth import RBAC, User

    admin = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))

    async def adapter_history(user: User = admin):
        """The current adapter, the versions before it and every promotion, refusal and rollback with its figures."""
        ptr = store.pointer()
        return {"current": ptr.get("current"), "history": ptr.get("history", []), "log": ptr.get("log", []),
                "versions": store.versions()}

    async def adapter_rollback(user: User = admin):
        """Serve the previously promoted adapter again, at once."""
        before = store.current()
        version = store.rollback()
        if version is None:
            raise HTTPException(status_code=409, detail=f"nothing to roll back to: {before or 'no adapter'} is the "
                                                        "first promoted version")
        logger.warning("rollback: %s -> %s", before, version)
        if on_change is not None:
            on_change()
        return {"current": version, "previous": before}

    server.add_api_route("/adapter/", adapter_history, methods=["GET"], tags=["Adapter"],
                         summary="Adapter versions and the gate's decisions")
    server.add_api_route("/adapter/rollback", adapter_rollback, methods=["POST"], tags=["Adapter"],
                         summary="Serve the previously promoted adapter again")
    return True


def install_train_route(trainers: dict, check) -> bool:
    """``POST /train/<task>``: ``check(task, params)`` (a ValueError names the bad parameter: 400), then MONAI
    Label's own handler. Put first in the routing table, so it answers instead of MONAI Label's."""
    server = getattr(sys.modules.get("monailabel.app"), "app", None)
    if server is None:
        return False
    from monailabel.config import settings
    from monailabel.endpoints.train import run_model
    from monailabel.endpoints.user.auth import RBAC, User

    admin = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))

    # no postponed annotations in this module: FastAPI reads these (User is imported here, not at module level)
    async def train_model(model: str, params: dict | None = None, run_sync: bool | None = False,
                          enqueue: bool | None = False, user: User = admin):
        if model not in trainers:
            raise HTTPException(status_code=404, detail=f"unknown training task {model[:200]!r}; this app has: "
                                                        f"{', '.join(sorted(trainers))}")
        try:
            check(model, params or {})
        except ValueError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        return run_model(model, params, run_sync, enqueue)

    server.add_api_route("/train/{model}", train_model, methods=["POST"], tags=["Train"],
                         summary="Run a training task (parameters checked first)")
    routes = server.router.routes
    routes.insert(0, routes.pop())
    return True


# the infer request's own upload, as the app's infer checks it: set only here, never taken from the client
UPLOAD_KEY = "_xray_textseg_upload"


class InferQueue:
    """Infer requests in flight: at most ``limit`` wait behind the running one, the rest get a 503 with
    Retry-After; ``status()`` is shown in ``GET /info/``."""

    def __init__(self, limit: int):
        self.limit = limit
        self._lock = threading.Lock()
        self._running: dict[int, dict] = {}
        self._seconds: list[float] = []

    def enter(self, what: dict) -> int:
        with self._lock:
            if self.limit and len(self._running) > self.limit:
                per = sorted(self._seconds)[len(self._seconds) // 2] if self._seconds else 5.0
                raise HTTPException(status_code=503, headers={"Retry-After": str(max(1, round(per * len(self._running))))},
                                    detail=f"busy: {len(self._running)} infer requests in flight (at most "
                                           f"{self.limit + 1}, --conf max_queued_infers); retry later")
            ticket = id(what)
            self._running[ticket] = {**what, "since": time.time()}
            return ticket

    def leave(self, ticket: int) -> None:
        with self._lock:
            entry = self._running.pop(ticket, None)
            if entry:
                self._seconds = (self._seconds + [time.time() - entry["since"]])[-50:]

    def status(self) -> dict:
        with self._lock:
            entries = sorted(self._running.values(), key=lambda e: e["since"])
            now = time.time()
            return {"in_flight": len(entries), "limit": self.limit + 1 if self.limit else None,
                    "requests": [{**{k: v for k, v in e.items() if k != "since"}, "seconds": round(now - e["since"], 1)}
                                 for e in entries]}


def _params(raw: str) -> dict:
    try:
        params = json.loads(raw) if raw else {}
    except json.JSONDecodeError as exc:
        raise HTTPException(status_code=400, detail=f"malformed JSON in 'params': {exc}") from None
    if not isinstance(params, dict):
        raise HTTPException(status_code=400, detail=f"'params' must be a JSON object, got {type(params).__name__}")
    return params


def _upload_suffix(filename: str | None, default: str) -> str:
    suffix = "".join(pathlib.Path(filename).suffixes) if filename else default
    return suffix if len(suffix) <= 16 and all(c.isalnum() or c == "." for c in suffix) else default


def install_request_routes(queue: InferQueue) -> bool:
    """``POST /infer/<model>``, ``PUT /datastore/label`` and ``PUT /datastore/image`` ahead of MONAI Label's
    own, which they call: plain functions, so that FastAPI runs them in its thread pool (MONAI Label's are
    ``async`` and run the whole inference in the event loop: no other request, not even ``/info/``, is answered
    meanwhile, and finished answers wait to be sent). ``params`` is checked before any file is written; an infer
    upload goes to a temporary file removed whatever happens, and only it may be named by a server path."""
    server = getattr(sys.modules.get("monailabel.app"), "app", None)
    if server is None:
        return False
    from fastapi import BackgroundTasks, File, Form, UploadFile
    from monailabel.config import settings
    from monailabel.endpoints import datastore as ds_endpoints
    from monailabel.endpoints.infer import ResultType, run_inference
    from monailabel.endpoints.user.auth import RBAC, User

    user_role = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))
    annotator = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))
    # one File() per parameter: FastAPI keeps the parameter's name in it
    upload_file, upload_label, saved_label, new_image = File(None), File(None), File(...), File(...)

    def infer(background_tasks: BackgroundTasks, model: str, image: str = "", session_id: str = "",
              params: str = Form("{}"), file: UploadFile = upload_file, label: UploadFile = upload_label,
              output: ResultType | None = None, user: User = user_role):
        request = _params(params)
        request.pop(UPLOAD_KEY, None)
        ticket = queue.enter({"model": model, "image": image or ("upload" if file else session_id),
                              "prompt": str(request.get("prompt", ""))[:100]})
        upload = None
        try:
            if file:
                fd, upload = tempfile.mkstemp(suffix=_upload_suffix(file.filename, ".nii.gz"))
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(file.file, out)
                request[UPLOAD_KEY] = image = upload
            answer = run_inference(background_tasks, model, image, session_id, json.dumps(request), None, label,
                                   output)
        except BaseException:
            if upload:
                os.unlink(upload)
            raise
        finally:
            queue.leave(ticket)
        if upload:
            background_tasks.add_task(os.unlink, upload)
        return answer

    def save_label(background_tasks: BackgroundTasks, image: str, params: str = Form("{}"), tag: str = "final",
                   label: UploadFile = saved_label, user: User = annotator):
        _params(params)
        return ds_endpoints.save_label(background_tasks, image, params, tag, label, user.username)

    def add_image(background_tasks: BackgroundTasks, image: str | None = None, params: str = Form("{}"),
                  file: UploadFile = new_image, user: User = annotator):
        _params(params)
        return ds_endpoints.add_image(background_tasks, image, params, file, user.username)

    routes = server.router.routes
    for path, endpoint, method in (("/infer/{model}", infer, "POST"), ("/datastore/label", save_label, "PUT"),
                                   ("/datastore/image", add_image, "PUT")):
        server.add_api_route(path, endpoint, methods=[method], include_in_schema=False)
        routes.insert(0, routes.pop())
    return True
