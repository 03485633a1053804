"""Active learning: the unlabeled image the model is least sure of comes first.

``uncertainty`` of an image = 1 - mean over labels of the decoder's predicted IoU (one coarse pass per
image: one encode, one decode per label), computed with the adapter being served and stored in the
datastore's image info under ``xray_textseg_uncertainty`` together with that adapter's version, so a
new adapter invalidates old scores. The scoring method fills in every unlabeled image in MONAI
Label's background task; the strategy scores a few missing images itself so that it answers on a
fresh server too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Any

import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from xray_textseg.io import load_radiograph

logger = logging.getLogger(__name__)
KEY = "xray_textseg_uncertainty"


def image_uncertainty(predictor, path: str) -> float:
    pred = predictor.predict(list(predictor.labels), refine=False, image=load_radiograph(path))
    return float(1.0 - sum(r.score for r in pred.results) / max(1, len(pred.results)))


def _stored(datastore: Datastore, image_id: str, version: str) -> float | None:
    info = datastore.get_image_info(image_id) or {}
    entry = info.get(KEY)
    if isinstance(entry, dict) and entry.get("adapter") == version:
        return float(entry["value"])
    return None


def score_images(app, datastore: Datastore, image_ids: list[str], limit: int | None = None) -> dict[str, float]:
    """Score (and store) the images whose score is missing or from another adapter; returns all scores."""
    infer = app._infers.get("xray_textseg") if hasattr(app, "_infers") else None
    if infer is not None:
        infer.sync_adapter()
    version = app.predictor.adapter_version
    scores, computed = {}, 0
    for image_id in image_ids:
        value = _stored(datastore, image_id, version)
        if value is None and (limit is None or computed < limit):
            try:
                value = image_uncertainty(app.predictor, datastore.get_image_uri(image_id))
            except Exception as exc:  # noqa: BLE001 - an unreadable image is skipped, not fatal
                logger.warning("cannot score %s: %s", image_id, exc)
                continue
            datastore.update_image_info(image_id, {KEY: {"value": value, "adapter": version,
                                                         "ts": time.strftime("%Y-%m-%d %H:%M:%S")}})
            computed += 1
        if value is not None:
            scores[image_id] = value
    return scores


class UncertaintyScoring(ScoringMethod):
    def __init__(self, app):
        super().__init__("Uncertainty of each unlabeled image: 1 - mean predicted IoU over the labels")
        self.app = app

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        # MONAI Label runs this in a background subprocess (at start and after every save); on a small CPU it
        # must not slow the clinician's infer requests: low priority for that process. Not when run
        # synchronously inside the server (POST /scoring/?run_sync=true), which must keep its priority.
        if "monailabel.app" not in sys.modules:
            with contextlib.suppress(OSError):
                os.nice(10)
            if (os.cpu_count() or 1) <= 4:  # and one thread, so a core stays free for the server
                torch.set_num_threads(1)
        images = datastore.get_unlabeled_images(label_tag="final")
        t0 = time.time()
        scores = score_images(self.app, datastore, images)
        logger.info("scored %d unlabeled images in %.1f s", len(scores), time.time() - t0)
        return {"scored": len(scores)}


class Uncertainty(Strategy):
    def __init__(self, app, max_inline: int = 8):
        super().__init__("The unlabeled image the model is least sure of (1 - mean predicted IoU)")
        self.app = app
        self.max_inline = max_inline

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        images = datastore.get_unlabeled_images(label_tag="final")
        if not images:
            return None
        scores = score_images(self.app, datastore, images, limit=self.max_inline)
        if not scores:
            return None
        image = max(sorted(scores), key=lambda k: scores[k])
        logger.info("uncertainty: selected %s (%.3f) among %d scored images", image, scores[image], len(scores))
        return {"id": image, "uncertainty": scores[image], "scored": len(scores), "unlabeled": len(images)}
