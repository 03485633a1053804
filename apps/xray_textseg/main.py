"""MONAI Label app for text-prompted X-ray segmentation.

    monailabel start_server --app apps/xray_textseg --studies sample_data/images

A thin layer: options are read in ``lib/options.py``, tasks in ``lib/`` translate MONAI Label
requests into calls to the engine package ``xray_textseg`` (repository ``lib/``).
"""

from __future__ import annotations

import logging
import os
import sys

from monailabel.interfaces.app import MONAILabelApp

try:  # the engine is installed into the venv; fall back to the checkout for a bare clone
    import xray_textseg
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "lib"))
    import xray_textseg

from lib.infers import TextPromptSegmentation
from lib.options import AppOptions
from xray_textseg.predictor import build_predictor

logger = logging.getLogger(__name__)


class XrayTextSegApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.options = AppOptions.from_conf(conf or {})
        logger.info("xray_textseg options: %s", self.options)
        o = self.options
        self.predictor = build_predictor(backbone=o.backbone, checkpoint=o.checkpoint or None, device=o.device,
                                         labels=o.labels, refine=o.refine, cache_size=o.cache_size)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="xray_textseg",
            description="Text-prompted X-ray segmentation (MedSAM + text prompts + LoRA adapters)",
            version=xray_textseg.__version__,
            labels=list(self.predictor.labels),
        )

    def init_infers(self):
        default_prompt = ", ".join(label.replace("_", " ") for label in self.predictor.labels[:1])
        return {"xray_textseg": TextPromptSegmentation(self.predictor, default_prompt=default_prompt)}

    def init_trainers(self):
        return {}

    def init_strategies(self):
        from monailabel.tasks.activelearning.first import First
        from monailabel.tasks.activelearning.random import Random

        return {"random": Random(), "first": First()}
