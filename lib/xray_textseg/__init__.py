"""xray_textseg: text-prompted X-ray segmentation (MedSAM + text prompts + LoRA adapters).

The engine is a plain Python package; the MONAI Label app in ``apps/xray_textseg`` is a
thin layer over it. Data flows one way:
``io`` (radiograph) -> ``backbones`` (embedding) -> ``text``/``priors`` (prompts)
-> ``predictor`` (mask) -> ``io`` (writer).
"""

__version__ = "0.1.0"
