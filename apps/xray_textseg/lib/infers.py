"""The text-prompted infer task: MONAI Label request -> engine predictor -> label map file + params.

Type ``segmentation`` so 3D Slicer lists it under auto-segmentation and OHIF shows it; the
``prompt`` entry of its config is a free-text option in both clients.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from typing import Any

import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from xray_textseg.io import ImageReadError, load_radiograph, radiograph_from_array, save_mask
from xray_textseg.labelmaps import hidden_pixels
from xray_textseg.predictor import Predictor
from xray_textseg.vocabulary import ALL_LABELS, UnknownLabelError, companion_labels, parse_prompt

logger = logging.getLogger(__name__)

# Stable label values: a label keeps its number whatever else a prompt asks for.
LABEL_VALUES = {name: i + 1 for i, name in enumerate(ALL_LABELS)}


class TextPromptSegmentation(InferTask):
    def __init__(self, predictor: Predictor, default_prompt: str, store=None, look_ahead=None):
        """``look_ahead``: a :class:`~xray_textseg.prefetch.Prefetcher` that segments the film's other labels of
        the prompt's region after each answer (None: off)."""
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
        self._synced: tuple | None = None  # the current.json state last synced
        self._broken: set[str] = set()  # versions that failed to load
        self.last_labels: list[str] = []  # the labels of the last prompt: what a prefetch segments ahead
        self.look_ahead = look_ahead
        self.sync_adapter()

    def sync_adapter(self) -> None:
        """Serve the store's current adapter: a promoted one is picked up here, without a restart.

        A version that cannot be loaded (truncated, changed or missing files, incompatible, a failing smoke
        prediction) is skipped with an error
        line and remembered, and the previously promoted versions are tried newest first; with none left the
        task serves zero-shot. Nothing is retried until ``current.json`` changes."""
        if self.store is None:
            return
        pointer = self.store.pointer()
        key = (pointer.get("current"), tuple(pointer.get("history", [])))
        if key == self._synced:
            return
        self._synced = key
        candidates = self.store.fallback_order(pointer)
        for version in candidates:
            if version in self._broken:
                continue
            if version != self.predictor.adapter_version:
                try:
                    self.predictor.load_adapter(self.store.path(version))
                    self._smoke_test()
                except Exception as exc:  # noqa: BLE001 - a broken version must not take the service down
                    self._broken.add(version)
                    logger.error("adapter %s is unusable and skipped: %s", version, exc)
                    continue
                logger.info("now serving adapter %s", version)
            if version != key[0]:
                logger.warning("current adapter %s is unusable: serving the previous valid version %s", key[0],
                               version)
            return
        if self.predictor.adapter_version != "none":
            self.predictor.unload_adapter()
        if key[0]:
            logger.error("no usable adapter among %s: serving zero-shot", candidates)

    def _smoke_test(self) -> None:
        """One prediction on a small made-up film with the adapter just loaded: weights that load but compute
        nothing usable (changed on disk without a checksum to tell) raise here, before any client sees them."""
        film = radiograph_from_array(np.tile(np.linspace(0, 255, 64, dtype=np.float32), (64, 1)))
        result = self.predictor.predict([self.predictor.labels[0]], image=film, refine=False).results[0]
        if not math.isfinite(result.score):
            raise ValueError(f"smoke prediction gave a non-finite score ({result.score})")

    def _boxes(self, request: dict[str, Any], labels: list, shape: tuple[int, int]) -> dict[str, list[float]] | None:
        """Optional refinement: ``box`` = [x0, y0, x1, y1] (image pixels) for a one-label prompt, or
        ``boxes`` = {label: box} for labels the prompt asks for. Malformed, conflicting or off-image boxes
        are a 400 naming the problem (checked before any encode)."""
        box, boxes = request.get("box"), request.get("boxes")
        if box is not None and boxes is not None:
            raise HTTPException(status_code=400, detail="give either 'box' (one structure) or 'boxes' "
                                                        "({label: box}), not both")
        if box is not None:
            if len(labels) != 1:
                raise HTTPException(status_code=400, detail="'box' needs a prompt naming exactly one structure")
            boxes = {labels[0].label: box}
        if boxes is None:
            return None
        if not isinstance(boxes, dict):
            raise HTTPException(status_code=400, detail="'boxes' must map a label to [x0, y0, x1, y1]")
        asked = {p.label for p in labels}
        height, width = shape
        out = {}
        for name, b in boxes.items():
            try:
                x0, y0, x1, y1 = (float(v) for v in b)
            except (TypeError, ValueError):
                raise HTTPException(status_code=400, detail=f"box for {name!r} must be [x0, y0, x1, y1]") from None
            if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
                raise HTTPException(status_code=400, detail=f"box for {name!r} must be 4 finite numbers: {b}")
            if not (x1 > x0 and y1 > y0):
                raise HTTPException(status_code=400, detail=f"box for {name!r} is empty: {b}")
            if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
                raise HTTPException(status_code=400, detail=f"box for {name!r} {b} lies outside the "
                                                            f"{width}x{height} image")
            named = parse_prompt(str(name).replace("_", " "), self.predictor.labels)
            if len(named) != 1 or named[0].label not in asked:
                raise HTTPException(status_code=400, detail=f"box for {name!r}: the prompt asks for "
                                                            f"{sorted(asked)}, one box per asked label")
            out[named[0].label] = [x0, y0, x1, y1]
        return out

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict]:
        t0 = time.perf_counter()
        path = request.get("image")
        if not isinstance(path, str) or not path or not os.path.isfile(path):
            raise HTTPException(status_code=404, detail=f"image not found: {request.get('image')!r}")
        prompt = request.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise HTTPException(status_code=400, detail=f"'prompt' must be text, got {type(prompt).__name__}")
        if not prompt or not prompt.strip():
            raise HTTPException(status_code=400, detail="missing 'prompt': name the anatomy, e.g. 'left lung, heart'")
        try:  # words and boxes are checked before the image is decoded or encoded
            labels = parse_prompt(prompt, self.predictor.labels)
            image = load_radiograph(path)
            boxes = self._boxes(request, labels, image.shape)
        except UnknownLabelError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc
        except ImageReadError as exc:  # server paths stay out of the answer
            upload = os.path.dirname(os.path.realpath(path)) == os.path.realpath(tempfile.gettempdir())
            shown = "uploaded file" if upload else os.path.basename(path)
            raise HTTPException(status_code=422, detail=str(exc).replace(path, shown)) from exc
        self.sync_adapter()
        prediction = self.predictor.predict(prompt, boxes=boxes, image=image)
        self.last_labels = [p.label for p in labels]

        label_map = prediction.label_map_with_values(LABEL_VALUES)
        layers = request.get("layers", False)
        if not isinstance(layers, bool):
            raise HTTPException(status_code=400, detail=f"'layers' must be true or false, got {layers!r}")
        # NIfTI, or the raw NRRD OHIF's MONAI Label panel asks for (result_extension ".nrrd")
        suffix = ".nrrd" if str(request.get("result_extension") or "").lower() == ".nrrd" and not layers else ".nii.gz"
        fd, out = tempfile.mkstemp(suffix=suffix, prefix="xray_textseg_")
        os.close(fd)
        if layers:  # one layer per structure: overlaps kept (a layered NIfTI, as label saves accept it)
            save_mask(np.stack([r.mask.astype(np.uint8) * LABEL_VALUES[r.label] for r in prediction.results]), out,
                      like=image)
        else:
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
        hidden = hidden_pixels({r.label: r.mask for r in prediction.results}, label_map, LABEL_VALUES)
        if hidden and not layers:  # what the label map cannot show: ask with "layers": true for every structure whole
            params["hidden"] = hidden
        if prediction.film:  # the film was read on its exposed field, or turned upright from its canvas
            params["film"] = prediction.film
        if prediction.warnings:  # a mask the adapter's training masks say is implausible (a clavicle run onto a rib)
            params["warnings"] = prediction.warnings
            logger.warning("infer %s: %s", os.path.basename(path), "; ".join(prediction.warnings.values()))
        logger.info("infer %s prompt=%r -> %s (%s, %.0f ms)", os.path.basename(path), prompt,
                    list(params["label_names"]), prediction.mode, 1e3 * (time.perf_counter() - t0))
        if self.look_ahead is not None:  # the clinician reads this mask; segment what they may ask next
            ahead = self.predictor.unsegmented(image, companion_labels(self.last_labels, self.predictor.labels))
            if ahead:
                self.look_ahead.submit(image, ahead, image_id=request.get("image_id") or os.path.basename(path),
                                      reason="look-ahead")
        return out, params
