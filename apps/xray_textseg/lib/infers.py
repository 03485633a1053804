"""The text-prompted infer task: MONAI Label request -> engine predictor -> label map file + params.

Type ``segmentation`` so 3D Slicer lists it under auto-segmentation and OHIF shows it; the
``prompt`` entry of its config is a free-text option in both clients.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from xray_textseg.io import ImageReadError, load_radiograph, save_mask
from xray_textseg.predictor import Predictor
from xray_textseg.vocabulary import ALL_LABELS, UnknownLabelError

logger = logging.getLogger(__name__)

# Stable label values: a label keeps its number whatever else a prompt asks for.
LABEL_VALUES = {name: i + 1 for i, name in enumerate(ALL_LABELS)}


class TextPromptSegmentation(InferTask):
    def __init__(self, predictor: Predictor, default_prompt: str, store=None):
        labels = {name: LABEL_VALUES[name] for name in predictor.labels}
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=labels,
            dimension=2,
            description="Text-prompted X-ray segmentation: type anatomy (e.g. 'left lung, heart') in 'prompt'",
            config={"prompt": default_prompt},
        )
        self.predictor = predictor
        self.store = store
        self.sync_adapter()

    def sync_adapter(self) -> None:
        """Serve the store's current adapter: a promoted one is picked up here, without a restart."""
        if self.store is None:
            return
        current = self.store.current()
        if current == (None if self.predictor.adapter_version == "none" else self.predictor.adapter_version):
            return
        if current is None:
            self.predictor.unload_adapter()
            return
        try:
            self.predictor.load_adapter(self.store.path(current))
            logger.info("now serving adapter %s", current)
        except Exception as exc:  # noqa: BLE001 - keep serving what we have; say why
            logger.error("cannot load adapter %s (still serving %s): %s", current, self.predictor.mode, exc)

    def _boxes(self, request: dict[str, Any], prompt: str) -> dict[str, list[float]] | None:
        """Optional refinement: ``box`` = [x0, y0, x1, y1] (image pixels) for a one-label prompt, or
        ``boxes`` = {label: box}. Malformed boxes are a 400 naming the problem."""
        from xray_textseg.vocabulary import parse_prompt

        boxes = request.get("boxes")
        if request.get("box") is not None:
            labels = parse_prompt(prompt, self.predictor.labels)
            if len(labels) != 1:
                raise HTTPException(status_code=400, detail="'box' needs a prompt naming exactly one structure")
            boxes = {labels[0].label: request["box"]}
        if not boxes:
            return None
        if not isinstance(boxes, dict):
            raise HTTPException(status_code=400, detail="'boxes' must map a label to [x0, y0, x1, y1]")
        out = {}
        for name, box in boxes.items():
            try:
                x0, y0, x1, y1 = (float(v) for v in box)
            except (TypeError, ValueError):
                raise HTTPException(status_code=400, detail=f"box for {name!r} must be [x0, y0, x1, y1]") from None
            if not (x1 > x0 and y1 > y0):
                raise HTTPException(status_code=400, detail=f"box for {name!r} is empty: {box}")
            label = parse_prompt(str(name).replace("_", " "), self.predictor.labels)[0].label
            out[label] = [x0, y0, x1, y1]
        return out

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict]:
        t0 = time.perf_counter()
        path = request.get("image")
        if not isinstance(path, str) or not path or not os.path.isfile(path):
            raise HTTPException(status_code=404, detail=f"image not found: {request.get('image')!r}")
        prompt = request.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise HTTPException(status_code=400, detail="missing 'prompt': name the anatomy, e.g. 'left lung, heart'")
        try:
            image = load_radiograph(path)
        except ImageReadError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from exc
        self.sync_adapter()
        try:
            self.predictor.set_image(image)
            prediction = self.predictor.predict(prompt, boxes=self._boxes(request, prompt))
        except UnknownLabelError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc

        label_map = prediction.label_map_with_values(LABEL_VALUES)
        # NIfTI, or the raw NRRD OHIF's MONAI Label panel asks for (result_extension ".nrrd")
        suffix = ".nrrd" if str(request.get("result_extension") or "").lower() == ".nrrd" else ".nii.gz"
        fd, out = tempfile.mkstemp(suffix=suffix, prefix="xray_textseg_")
        os.close(fd)
        save_mask(label_map, out, like=image)
        params = {
            "label_names": {r.label: LABEL_VALUES[r.label] for r in prediction.results},
            "prompt": prompt,
            "mode": prediction.mode,
            "adapter": self.predictor.adapter_version,
            "predicted_iou": {r.label: round(r.score, 4) for r in prediction.results},
            "boxes": {r.label: [round(v, 1) for v in r.box] for r in prediction.results},
            "latencies": {**{k: round(v / 1e3, 4) for k, v in prediction.timings_ms.items()},
                          "request": round(time.perf_counter() - t0, 4)},
            "cache": prediction.cache,
        }
        logger.info("infer %s prompt=%r -> %s (%s, %.0f ms)", os.path.basename(path), prompt,
                    list(params["label_names"]), prediction.mode, 1e3 * (time.perf_counter() - t0))
        return out, params
