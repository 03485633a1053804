"""MONAI Label app for text-prompted X-ray segmentation.

    monailabel start_server --app apps/xray_textseg --studies sample_data/images

A thin layer: options are read in ``lib/options.py``, tasks in ``lib/`` translate MONAI Label
requests into calls to the engine package ``xray_textseg`` (repository ``lib/``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp

try:  # the engine is installed into the venv; fall back to the checkout for a bare clone
    import xray_textseg
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "lib"))
    import xray_textseg

from lib.infers import TextPromptSegmentation  # noqa: E402
from lib.options import AppOptions  # noqa: E402
from lib.safety import SafeLocalDatastore, check_infer_image, install_error_handlers  # noqa: E402
from lib.routes import (UPLOAD_KEY, InferQueue, install_adapter_routes, install_request_routes,  # noqa: E402
                        install_train_route)
from lib.sessions import SafeSessions  # noqa: E402
from lib.trainers import (EXTRA_ROUND, AdapterTrainer, check_train_request, extra_round_reason,  # noqa: E402
                          label_values_from_info)
from xray_textseg.adapters import AdapterStore, install_starter  # noqa: E402
from xray_textseg.io import load_radiograph, write_atomic  # noqa: E402
from xray_textseg.label_check import check_label  # noqa: E402
from xray_textseg.labelmaps import structure_masks  # noqa: E402
from xray_textseg.predictor import build_predictor  # noqa: E402
from xray_textseg.prefetch import Prefetcher  # noqa: E402

TRAIN_TASK = "xray_textseg_train"

logger = logging.getLogger(__name__)


class XrayTextSegApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.options = AppOptions.from_conf(conf or {})
        logger.info("xray_textseg options: %s", self.options)
        o = self.options
        o.retrain_seconds  # noqa: B018 - validates the option at start
        self.predictor = build_predictor(backbone=o.backbone, checkpoint=o.checkpoint or None, device=o.device,
                                         labels=o.labels, refine=o.refine, cache_size=o.cache_size,
                                         text_encoder=o.text_encoder or None)
        self.predictor.negative_check = o.negative_check
        self.store = AdapterStore(o.adapter_dir or os.path.join(app_dir, "model", "adapters"))
        if o.starter_adapter:
            _, why = install_starter(self.store, self.predictor.backbone, self.predictor.text_encoder)
            logger.info("starter adapter: %s", why)
        self.prefetcher = Prefetcher(self.predictor) if o.prefetch or o.look_ahead else None
        self._autotrain_lock = threading.Lock()
        self.infer_queue = InferQueue(o.max_queued_infers)
        logger.info("adapter store %s, current adapter: %s", self.store.root, self.store.current() or "none")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="xray_textseg",
            description="Text-prompted X-ray segmentation (MedSAM + text prompts + LoRA adapters)",
            version=xray_textseg.__version__,
            labels=list(self.predictor.labels),
        )

    def init_datastore(self):
        """Local studies go through :class:`SafeLocalDatastore` (validated uploads and labels, atomic writes)."""
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        from monailabel.config import settings

        datastore = SafeLocalDatastore(self.studies, extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
                                       auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                                       read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY)
        datastore.label_check = self._check_label
        return datastore

    def _check_label(self, image_path: str, layers, info: dict) -> dict:
        """A final label against the served model (``xray_textseg.label_check``): a contradiction is a 422 unless
        the request says ``"force": true``; borderline or forced labels are kept, held out of training until a
        person confirms them (``PUT /datastore/label/info`` with ``{"confirmed": true}``)."""
        force = info.get("force", False)
        if not isinstance(force, bool):
            raise HTTPException(status_code=400, detail=f"'force' must be true or false, got {force!r}")
        values = label_values_from_info(info)
        current = self.store.current()
        overlaps = self.store.metadata(current).get("overlaps", []) if current else []
        masks, unknown = structure_masks(layers, values, overlaps)
        infer = self._infers.get("xray_textseg")
        if infer is not None:
            infer.sync_adapter()  # the adapter the server answers with
        check = check_label(self.predictor, load_radiograph(image_path), masks, unknown, values)
        if check.contradictions and not force:
            raise HTTPException(status_code=422, detail="label refused: " + "; ".join(check.contradictions)
                                + '. If it is right as it is, save it with "force": true in params (it is then kept '
                                  "but left out of training until a person confirms it)")
        if not check.agreement:
            return {}
        kept = check.info(force)
        logger.info("label check: agreement with the served model %s%s", kept["agreement"],
                    f"; held out of training until confirmed: {kept['reasons']}" if kept["status"] == "held" else "")
        return kept

    def _check_train_params(self, task: str, params: dict) -> None:
        """A train request's parameters, checked as the run will read them (ValueError naming the bad one)."""
        if not isinstance(params, dict):
            raise ValueError(f"train parameters must be a JSON object, got {type(params).__name__}")  # noqa: TRY004
        trainer = self._trainers[task]
        config = trainer.config()
        check_train_request({**config, **{k: v for k, v in params.items() if k in config}})

    def _load_sessions(self, load=False):
        """Sessions (``PUT /session/``) whose archives are unpacked safely (lib/sessions.py)."""
        if not load:
            return None
        from monailabel.config import settings

        return SafeSessions(settings.MONAI_LABEL_SESSION_PATH, settings.MONAI_LABEL_SESSION_EXPIRY)

    def infer(self, request, datastore=None):
        sessions = self.sessions()
        check_infer_image(request, getattr(sessions, "store_path", None), datastore or self.datastore(),
                          upload=request.pop(UPLOAD_KEY, None))
        if request.get("save_label") and (request.get("label_tag") or "original") == "final":
            raise HTTPException(status_code=400, detail="a model answer is never saved as the 'final' label (what a "
                                                        "person saved): use another label_tag, e.g. 'original'")
        image = request.get("image")
        if isinstance(image, str) and not os.path.exists(image):  # a datastore id: MONAI Label swaps in its path
            request = {**request, "image_id": request["image"]}
        return super().infer(request, datastore)

    def init_infers(self):
        default_prompt = ", ".join(label.replace("_", " ") for label in self.predictor.labels[:1])
        return {"xray_textseg": TextPromptSegmentation(
            self.predictor, default_prompt=default_prompt, store=self.store,
            look_ahead=self.prefetcher if self.options.look_ahead else None)}

    def init_trainers(self):
        return {TRAIN_TASK: AdapterTrainer(self, self.store, self.predictor.labels, self.options.min_train_images)}

    def init_remote_datastore(self):
        """``--studies http(s)://.../dicom-web``: radiographs reach the infer task as .dcm and final labels
        go to the PACS as DICOM SEG written by the engine (lib/dicomweb.py; no run-time dcmqi download)."""
        from lib.dicomweb import init_dicomweb_datastore, is_dicomweb

        if is_dicomweb(self.studies):
            return init_dicomweb_datastore(self.studies)
        return super().init_remote_datastore()

    def next_sample(self, request):
        """Active learning's pick, then a background warm-up of that film while the viewer opens it (the labels
        of the last prompt are segmented ahead: ``lib/xray_textseg/prefetch.py``)."""
        res = super().next_sample(request)
        if self.options.prefetch and res.get("path"):
            infer = self._infers.get("xray_textseg")
            self.prefetcher.submit(res["path"], getattr(infer, "last_labels", []), image_id=res.get("id"))
        return res

    def info(self):
        meta = super().info()
        meta["infer_queue"] = self.infer_queue.status()
        if self.prefetcher is not None:
            meta["prefetch"] = self.prefetcher.status()
        return meta

    # --- learning from saved labels ---------------------------------------------------------------
    def _autotrain_state(self) -> dict:
        path = self.store.root / "autotrain.json"
        return json.loads(path.read_text()) if path.is_file() else {"saved_since_train": 0, "labeled_at_last_train": 0}

    def _set_autotrain_state(self, state: dict) -> None:
        write_atomic(self.store.root / "autotrain.json", json.dumps(state, indent=2).encode())

    def _train_queued(self) -> bool:
        """A training run waiting to start (one running and one queued is the most we ever keep)."""
        from monailabel.utils.async_tasks.utils import tasks

        return any(t.get("status") == "SUBMITTED" for t in tasks("train"))

    def _trigger_training(self, why: str) -> bool:
        if self._train_queued():
            logger.info("retraining (%s): a run is already queued and will include these labels", why)
            return False
        logger.info("retraining: %s", why)
        self.async_training(TRAIN_TASK, params={TRAIN_TASK: {"trigger": why}}, enqueue=True)
        return True

    def on_save_label(self, image_id, label_id):
        super().on_save_label(image_id, label_id)
        n = self.options.auto_train_after
        with self._autotrain_lock:
            state = self._autotrain_state()
            state["saved_since_train"] = state.get("saved_since_train", 0) + 1
            logger.info("label saved for %s: %d of %s new labels before retraining", image_id,
                        state["saved_since_train"], n or "off")
            if n and state["saved_since_train"] >= n:
                labeled = len(self.datastore().get_labeled_images(label_tag="final"))
                self._trigger_training(f"{state['saved_since_train']} new labels saved")
                state.update(saved_since_train=0, labeled_at_last_train=labeled)
            self._set_autotrain_state(state)

    def _scheduled_retrain(self) -> None:
        with self._autotrain_lock:
            state = self._autotrain_state()
            labeled = len(self.datastore().get_labeled_images(label_tag="final"))
            if state.get("saved_since_train", 0) == 0 and labeled <= state.get("labeled_at_last_train", 0):
                logger.info("scheduled retraining skipped: no new labels since the last run")
                return
            self._trigger_training(f"schedule ({self.options.retrain_interval}), new labels since the last run")
            state.update(saved_since_train=0, labeled_at_last_train=labeled)
            self._set_autotrain_state(state)

    def _extra_round(self) -> None:
        """A run the time budget ended while it still improved goes on from its adapter on the same labels,
        at most ``train_extra_rounds`` times after each run that labels or a person started
        (:func:`lib.trainers.extra_round_reason`). Checked once a minute, never while a run is queued or running."""
        from monailabel.utils.async_tasks.utils import processes

        with self._autotrain_lock:
            stats = self._trainers[TRAIN_TASK].stats()
            if self._train_queued() or processes("train") or stats.get("status") != "done":
                return
            state = self._autotrain_state()
            if state.get("checked_run") == stats.get("version"):
                return  # this run was looked at already
            done = state.get("extra_rounds", 0) if str(stats.get("trigger", "")).startswith(EXTRA_ROUND) else 0
            why = extra_round_reason(stats, done, self.options.train_extra_rounds)
            state.update(checked_run=stats.get("version"))
            if why and self._trigger_training(why):
                state.update(extra_rounds=done + 1)
            self._set_autotrain_state(state)

    def on_init_complete(self):
        super().on_init_complete()
        install_error_handlers(trainers=tuple(self._trainers), dicom_seg=not isinstance(self.datastore(),
                                                                                       SafeLocalDatastore))
        install_request_routes(self.infer_queue)
        infer = self._infers.get("xray_textseg")
        install_adapter_routes(self.store, on_change=infer.sync_adapter if infer is not None else None)
        install_train_route(self._trainers, self._check_train_params)
        seconds = self.options.retrain_seconds
        if seconds or (self.options.train_extra_rounds and self.options.train_warm_start):
            import schedule

            if seconds:
                schedule.every(seconds).seconds.do(self._scheduled_retrain)
                logger.info("scheduled retraining every %s when new labels arrived", self.options.retrain_interval)
            if self.options.train_extra_rounds and self.options.train_warm_start:
                schedule.every(60).seconds.do(self._extra_round)
                logger.info("a run the time budget ends while it still improves continues on the same labels, up "
                            "to %d extra round(s)", self.options.train_extra_rounds)

    def init_strategies(self):
        from monailabel.tasks.activelearning.first import First
        from monailabel.tasks.activelearning.random import Random

        from lib.strategies import Uncertainty

        return {"uncertainty": Uncertainty(self), "random": Random(), "first": First()}

    def init_scoring_methods(self):
        from lib.strategies import UncertaintyScoring

        return {"xray_textseg_uncertainty": UncertaintyScoring(self)}
