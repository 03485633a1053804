"""Every ``--conf`` option of the app, with its default, read in one place (documented in the README)."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class AppOptions:
    backbone: str = "litemedsam"  # litemedsam | medsam_vit_b | sam_vit_b
    checkpoint: str = ""  # backbone weights; empty = packaged LiteMedSAM
    text_encoder: str = ""  # local Hugging Face model folder; empty = packaged all-MiniLM-L6-v2
    labels: str = "both"  # chest | lower_limb | both | comma list
    device: str = "auto"  # auto | cpu | cuda
    refine: bool = True  # coarse-to-fine crop pass (more accurate, one extra encode per label)
    cache_size: int = 32  # image embeddings kept in memory (about 4 MB each)

    @classmethod
    def from_conf(cls, conf: dict[str, str]) -> AppOptions:
        """Parse MONAI Label's string conf; unknown keys are left to MONAI Label, bad values raise ValueError."""
        values = {}
        for f in fields(cls):
            if f.name not in conf:
                continue
            raw = str(conf[f.name]).strip()
            if f.type == "bool":
                if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(f"--conf {f.name} {raw!r}: expected true or false")
                values[f.name] = raw.lower() in ("true", "1", "yes")
            elif f.type == "int":
                try:
                    values[f.name] = int(raw)
                except ValueError:
                    raise ValueError(f"--conf {f.name} {raw!r}: expected an integer") from None
            else:
                values[f.name] = raw
        return cls(**values)
