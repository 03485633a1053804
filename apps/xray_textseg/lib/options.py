"""Every ``--conf`` option of the app, with its default, read in one place (documented in the README)."""

from __future__ import annotations

from dataclasses import dataclass, fields


# options with a fixed set of values, checked when the server starts
CHOICES = {"train_mode": ("auto", "lora", "cached"), "train_coarse_prior": ("median", "auto", "envelope")}


def check_choice(value, option: str, what: str) -> str:
    """``value`` if it is one of ``CHOICES[option]``, else a ValueError naming ``what`` and the allowed values."""
    if value not in CHOICES[option]:
        raise ValueError(f"{what} {value!r}: use one of {', '.join(CHOICES[option])}")
    return value


def parse_bool(raw, what: str) -> bool:
    """true/false, 1/0, yes/no (any case) or a bool; anything else is a ValueError naming ``what``."""
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"{what} {raw!r}: expected true or false")
    return text in ("true", "1", "yes")


def check_probability(value, what: str) -> float:
    """``value`` as a float in [0, 1], else a ValueError naming ``what``."""
    try:
        p = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} {value!r}: expected a number from 0 to 1") from None
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{what} {value!r}: expected a number from 0 to 1")
    return p


@dataclass(frozen=True)
class AppOptions:
    backbone: str = "litemedsam"  # litemedsam | medsam_vit_b | sam_vit_b
    checkpoint: str = ""  # backbone weights; empty = packaged LiteMedSAM
    text_encoder: str = ""  # local Hugging Face model folder; empty = packaged all-MiniLM-L6-v2
    labels: str = "both"  # chest | lower_limb | both | comma list
    device: str = "auto"  # auto | cpu | cuda
    refine: bool = True  # coarse-to-fine crop pass (more accurate, one extra encode per label)
    cache_size: int = 32  # image embeddings kept in memory (about 4 MB each)
    prefetch: bool = True  # warm the image active learning proposes (film + the labels of the last prompt)
    look_ahead: bool = True  # after a prompt, segment the film's other labels of that region in the background
    negative_check: bool = True  # read a film inverted when it looks like a negative (needs an adapter's film check)
    adapter_dir: str = ""  # adapter store; empty = <app>/model/adapters
    starter_adapter: bool = True  # an empty adapter store starts from the packaged starter adapter (else zero-shot)
    auto_train_after: int = 5  # retrain after this many newly saved final labels; 0 disables
    retrain_interval: str = ""  # e.g. 24h, 30m: retrain on a schedule when new labels arrived; empty = off
    min_train_images: int = 2  # fewer labelled images than this: no training run
    train_epochs: int = 40  # upper bound; early stopping and the time budget usually end sooner
    train_time_budget_min: int = 12  # minutes (encoding included) before the best epoch is kept (0 = no limit)
    train_mode: str = "auto"  # auto (lora on CUDA and bf16 CPUs, cached on other CPUs) | lora | cached
    train_cached_copies: int = 0  # cached mode: augmented copies encoded per film; 0 = auto (1-4, ~100 encodes)
    train_coarse_prior: str = "median"  # median | auto | envelope: the coarse prompt box per label (TrainConfig)
    train_mid_view: bool = False  # find enveloped labels (clavicles with coarse prior auto) on a crop of their region
    train_warm_start: bool = True  # continue each retraining from the current adapter's weights (else from the base)
    train_extra_rounds: int = 2  # a run the time budget cut while improving goes on (same labels) up to this often
    max_queued_infers: int = 8  # infers waiting behind the running one; more get a 503 with Retry-After (0 = no limit)
    train_degrade: float = 0.3  # probability per training example of film-space blur and of noise (TrainConfig.degrade)

    def __post_init__(self) -> None:
        for name in CHOICES:
            check_choice(getattr(self, name), name, f"--conf {name}")
        for name in ("auto_train_after", "train_extra_rounds", "min_train_images", "train_time_budget_min",
                     "max_queued_infers"):
            if getattr(self, name) < 0:
                raise ValueError(f"--conf {name} {getattr(self, name)}: expected 0 or more")
        check_probability(self.train_degrade, "--conf train_degrade")

    @property
    def retrain_seconds(self) -> int:
        """``retrain_interval`` in seconds (0 = off); accepts 90s, 30m, 24h, 2d or plain seconds."""
        raw = self.retrain_interval.strip().lower()
        if not raw or raw in ("0", "off", "none"):
            return 0
        units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
        try:
            value = float(raw[:-1]) * units[raw[-1]] if raw[-1] in units else float(raw)
        except ValueError:
            raise ValueError(f"--conf retrain_interval {self.retrain_interval!r}: use e.g. 30m, 24h or 2d") from None
        if value < 60:
            raise ValueError(f"--conf retrain_interval {self.retrain_interval!r}: at least 1m")
        return int(value)

    @classmethod
    def from_conf(cls, conf: dict[str, str]) -> AppOptions:
        """Parse MONAI Label's string conf; unknown keys are left to MONAI Label, bad values raise ValueError."""
        values = {}
        for f in fields(cls):
            if f.name not in conf:
                continue
            raw = str(conf[f.name]).strip()
            if f.type == "bool":
                values[f.name] = parse_bool(raw, f"--conf {f.name}")
            elif f.type == "float":
                try:
                    values[f.name] = float(raw)
                except ValueError:
                    raise ValueError(f"--conf {f.name} {raw!r}: expected a number") from None
            elif f.type == "int":
                try:
                    values[f.name] = int(raw)
                except ValueError:
                    raise ValueError(f"--conf {f.name} {raw!r}: expected an integer") from None
            else:
                values[f.name] = raw
        return cls(**values)
