"""The retraining task: datastore final labels -> engine ``train_adapter`` -> validation gate -> adapter store.

MONAI Label runs it in a subprocess that re-imports the app (``POST /train/xray_textseg_train``,
automatically after ``auto_train_after`` saved labels, or every ``retrain_interval``). ``DELETE
/train/`` kills that subprocess: the adapter is written to a staging directory and renamed only when
complete, and ``current.json`` is replaced atomically, so a killed run leaves the current adapter in
place (its staging debris is removed by the next run).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from typing import Any

import numpy as np
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.async_tasks.utils import processes

from xray_textseg.adapters import AdapterStore
from xray_textseg.gate import Verdict, gate_of, judge, next_gate, synthetic_items
from xray_textseg.io import load_label_layers, load_radiograph, write_atomic
from xray_textseg.labelmaps import structure_masks
from xray_textseg.train import (TrainConfig, TrainItem, continue_problem, cut_while_improving, earlier_split,
                                 split_items, train_adapter, validate)
from xray_textseg.vocabulary import UnknownLabelError, parse_label

from .infers import LABEL_VALUES
from .options import check_choice, check_probability, parse_bool

logger = logging.getLogger(__name__)

STATS_FILE = "train_stats.json"
# mean Dice between the served model's answers and the saved labels of a structure below which a run says so
DISAGREEMENT_WARNING = 0.7
EXTRA_ROUND = "extra round"  # how the trigger of a run that continues an unfinished one starts


def extra_round_reason(stats: dict[str, Any], done_rounds: int, max_rounds: int) -> str | None:
    """Why the finished run in ``stats`` (this task's :meth:`AdapterTrainer.stats`) should go on for another
    run on the same labels, or None.

    It should when it was promoted, :func:`xray_textseg.train.cut_while_improving` (the time budget ended it after
    it beat the adapter it started from) and fewer than ``max_rounds`` extra rounds ran since the last run that
    labels, the schedule or a person started.
    With warm start the next run continues from it: on a slow CPU that is how 12-minute budgets add up (OAI
    k = 30, two extra rounds: femur / tibia 0.946 / 0.933 -> 0.952 / 0.940 -> 0.960 / 0.948; docs/results.md).
    """
    if stats.get("status") != "done" or not stats.get("promoted") or done_rounds >= max_rounds:
        return None
    if not cut_while_improving(stats):
        return None
    return (f"{EXTRA_ROUND} {done_rounds + 1} of {max_rounds}: the time budget ended {stats.get('version')} while "
            f"its validation Dice still rose (best epoch {stats['best_epoch']} of {stats.get('epochs_run')})")


def label_values_from_info(info: dict[str, Any]) -> dict[str, int]:
    """{canonical label: value} of a saved label map, from what the client sent with it.

    Slicer sends ``label_info`` = [{"name": "left lung", "idx": 1}, ...]; our own infer results carry
    ``label_names`` = {"left_lung": 1}; without either, the stable :data:`LABEL_VALUES` apply.
    Segment names are parsed like prompts ("Left Lung", "lung, left"); unknown names are skipped (logged).
    """
    raw: dict[str, int] = {}
    params = info.get("params", info) if isinstance(info, dict) else {}
    if isinstance(params.get("label_info"), list):
        for entry in params["label_info"]:
            if isinstance(entry, dict) and "name" in entry and "idx" in entry:
                raw[str(entry["name"])] = int(entry["idx"])
    elif isinstance(params.get("label_names"), dict):
        raw = {str(k): int(v) for k, v in params["label_names"].items()}
    if not raw:
        return dict(LABEL_VALUES)
    out = {}
    for name, value in raw.items():
        if name.lower() == "background" or value == 0:
            continue
        try:
            parsed = parse_label(name.replace("_", " "))
        except UnknownLabelError:
            logger.warning("label %r (value %d) is not a known structure; ignored for training", name, value)
            continue
        if len(parsed) == 1:
            out[parsed[0].label] = value
    return out


def held(info: dict) -> bool:
    """A label the save check held out of training (borderline or forced) that no person has confirmed yet."""
    return (info.get("check") or {}).get("status") == "held" and info.get("confirmed") is not True


def datastore_items(datastore: Datastore, labels: tuple[str, ...], overlaps=(), only: set[str] | None = None,
                    report: dict | None = None) -> list[TrainItem]:
    """Every image with a final label, as engine training items (bad files are logged and skipped; labels
    :func:`held` out are counted in ``report["held"]``). A label map's pixels given to one of an overlapping pair
    are unknown for the other (``labelmaps.structure_masks``; ``overlaps``: pairs beyond the vocabulary's, e.g. the
    current adapter's). ``report["agreement"]``: {label: [Dice of the served model's answer with the saved label]}
    as the save check measured them."""
    items = []
    report = report if report is not None else {}
    report.setdefault("held", [])
    report.setdefault("agreement", {})
    for image_id in datastore.get_labeled_images(label_tag="final"):
        if only is not None and image_id not in only:
            continue
        try:
            info = datastore.get_label_info(image_id, "final") or {}
            if held(info):
                report["held"].append(image_id)
                continue
            image = load_radiograph(datastore.get_image_uri(image_id))
            layers = load_label_layers(datastore.get_label_uri(image_id, "final"), image.shape)
            values = label_values_from_info(info)
        except Exception as exc:  # noqa: BLE001 - one bad upload must not stop training on the rest
            logger.warning("skipping %s for training: %s", image_id, exc)
            continue
        for lab, d in ((info.get("check") or {}).get("agreement") or {}).items():
            report["agreement"].setdefault(lab, []).append(float(d))
        masks, unknown = structure_masks(layers, {lab: v for lab, v in values.items() if lab in labels}, overlaps)
        if masks:
            items.append(TrainItem(image_id, image, masks, unknown=unknown))
    return items


def _int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().lstrip("-").isdigit():
        raise ValueError(f"train parameter {name!r} must be a whole number, got {value!r}")
    if int(value) < low:
        raise ValueError(f"train parameter {name!r} must be at least {low}, got {value!r}")
    return int(value)


def _float(value, name: str, low: float, high: float | None = None) -> float:
    try:
        out = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        out = float("nan")
    if not (out >= low and (high is None or out <= high)):
        raise ValueError(f"train parameter {name!r} must be a number in [{low}, {high if high is not None else 'inf'}]"
                         f", got {value!r}")
    return out


def check_train_request(conf: dict[str, Any]) -> dict[str, Any]:
    """A training run's settings (the task config with the request's overrides) checked with the rules of their
    ``--conf`` options; ValueError naming the parameter otherwise (the app answers it with a 400 before the run)."""
    out = dict(conf)
    out["epochs"] = _int(conf["epochs"], "epochs", 1)
    out["time_budget_min"] = _float(conf["time_budget_min"], "time_budget_min", 0.0)
    out["cached_copies"] = _int(conf["cached_copies"], "cached_copies", 0)
    out["seed"] = _int(conf["seed"], "seed", 0)
    out["val_fraction"] = _float(conf["val_fraction"], "val_fraction", 0.0, 0.9)
    out["mode"] = check_choice(conf["mode"], "train_mode", "train parameter 'mode'")
    out["coarse_prior"] = check_choice(conf["coarse_prior"], "train_coarse_prior", "train parameter 'coarse_prior'")
    out["mid_view"] = parse_bool(conf["mid_view"], "train parameter 'mid_view'")
    out["warm_start"] = parse_bool(conf["warm_start"], "train parameter 'warm_start'")
    out["degrade"] = check_probability(conf["degrade"], "train parameter 'degrade'")
    return out


class AdapterTrainer(TrainTask):
    def __init__(self, app, store: AdapterStore, labels: tuple[str, ...], min_images: int = 2):
        super().__init__("Retrain the text-prompted adapter (encoder LoRA on GPU, head + decoder on CPU) "
                         "from the saved final labels; promoted only when validation Dice is not worse")
        self.app = app
        self.store = store
        self.labels = labels
        self.min_images = min_images

    def config(self) -> dict[str, Any]:
        o = self.app.options
        return {"epochs": o.train_epochs, "mode": o.train_mode, "time_budget_min": float(o.train_time_budget_min),
                "cached_copies": o.train_cached_copies, "coarse_prior": o.train_coarse_prior,
                "mid_view": o.train_mid_view, "warm_start": o.train_warm_start, "degrade": o.train_degrade,
                "val_fraction": 0.2, "seed": 0}

    def stats(self) -> dict[str, Any]:
        path = self.store.root / STATS_FILE
        if not path.is_file():
            return {"current_adapter": self.store.current()}
        try:
            stats = json.loads(path.read_text())
        except ValueError:
            stats = {}
        if stats.get("status") == "running" and not processes("train"):
            # the run's subprocess is gone without writing "done": stopped (DELETE /train/) or killed
            stats["status"] = "stopped"
        stats["current_adapter"] = self.store.current()
        return stats

    def _write_stats(self, stats: dict) -> None:
        write_atomic(self.store.root / STATS_FILE, json.dumps(stats, indent=2).encode())

    def _served(self) -> str | None:
        """The version the infer task serves: the current one, or the newest loadable before it."""
        for version in self.store.fallback_order():
            try:
                self.app.predictor.load_adapter(self.store.path(version))
            except Exception as exc:  # noqa: BLE001 - a broken version sets no bar; the next one may
                logger.error("adapter %s is unusable and skipped for the comparison: %s", version, exc)
                continue
            return version
        return None

    def _gate_items(self, gate: dict, datastore: Datastore, train_items: list[TrainItem]) -> dict[str, list]:
        """The gate set's films: {"gate": its datastore films that still have a final label (none the candidate
        trained on), "synthetic": its synthetic films}."""
        films = set(gate.get("films", [])) - {it.name for it in train_items}
        return {"gate": datastore_items(datastore, self.labels, only=films) if films else [],
                "synthetic": synthetic_items(gate)}

    def _gate(self, name: str, meta: dict, val_items: list[TrainItem], train_items: list[TrainItem],
              datastore: Datastore) -> Verdict:
        """Candidate ``name`` against the served adapter, per label, on the new validation films and on the
        served adapter's gate set (:mod:`xray_textseg.gate`)."""
        predictor = self.app.predictor
        current = self._served()
        if current is None:
            predictor.unload_adapter()
            return judge({"new": meta["validation"]["dice"]}, None, name, None)
        sets = self._gate_items(gate_of(self.store.metadata(current)), datastore, train_items)
        try:
            cur = {"new": validate(predictor, val_items, tuple(meta["labels"]))["dice"] if val_items else {},
                   **{k: validate(predictor, v, self.labels)["dice"] for k, v in sets.items() if v}}
            predictor.load_adapter(self.store.path(name))
            cand = {"new": meta["validation"]["dice"],
                    **{k: validate(predictor, v, self.labels)["dice"] for k, v in sets.items() if v}}
        finally:
            predictor.unload_adapter()
        logger.info("gate for %s: %d new validation films, %d gate films and %d synthetic films of %s", name,
                    len(val_items), len(sets["gate"]), len(sets["synthetic"]), current)
        return judge(cand, cur, name, current)

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        t0 = time.time()
        conf = check_train_request({**self.config(), **{k: v for k, v in request.items() if k in self.config()}})
        mid_view, warm_start, degrade = conf["mid_view"], conf["warm_start"], conf["degrade"]
        removed = self.store.cleanup_partial()
        if removed:
            logger.info("removed debris of an interrupted run: %s", removed)
        current = self.store.current_path()
        overlaps = self.store.metadata(current.name).get("overlaps", []) if current else []
        report: dict = {}
        items = datastore_items(datastore, self.labels, overlaps, report=report)
        if report["held"]:
            logger.warning("%d final label(s) held out of training until a person confirms them: %s",
                           len(report["held"]), ", ".join(report["held"][:20]))
        agreement = {lab: round(float(np.mean(v)), 4) for lab, v in sorted(report["agreement"].items())}
        disagree = {lab: d for lab, d in agreement.items() if d < DISAGREEMENT_WARNING}
        if len(items) < self.min_images:
            msg = f"need at least {self.min_images} images with final labels to train, have {len(items)}"
            logger.warning(msg)
            self._write_stats({"status": "skipped", "reason": msg, "time": time.strftime("%Y-%m-%d %H:%M:%S")})
            return {"status": "skipped", "reason": msg}
        cfg = TrainConfig(mode=str(conf["mode"]), epochs=int(conf["epochs"]), seed=int(conf["seed"]),
                          val_fraction=float(conf["val_fraction"]), device=self.app.options.device,
                          time_budget_s=float(conf["time_budget_min"]) * 60 or None, patience=8,
                          cached_variants=int(conf["cached_copies"]), coarse_prior=str(conf["coarse_prior"]),
                          mid_view=mid_view, degrade=degrade)
        predictor = self.app.predictor
        # the current adapter's films keep their sides of the split: the candidate (continuing from it or not) is
        # never validated on a film the current one trained on, and both are compared on the same films
        train_items, val_items = split_items(items, cfg.val_fraction, cfg.seed, cfg.min_val_images,
                                             keep=earlier_split(current) if current else None)
        continued_from = None
        if warm_start and current is not None:
            problem = continue_problem(current, predictor.backbone, predictor.text_encoder, cfg)
            if problem:
                logger.warning("training from the base weights, not from %s: %s", current.name, problem)
            else:
                cfg = replace(cfg, init_from=str(current))
                continued_from = current.name
        version_path = self.store.new_version_path()
        stats = {"status": "running", "version": version_path.name, "epoch": 0, "total_epochs": cfg.epochs,
                 "best_metric": 0.0, "train_images": len(train_items), "val_images": len(val_items),
                 "continued_from": continued_from, "held_labels": len(report["held"]), "agreement": agreement,
                 "trigger": request.get("trigger", "request"), "start_ts": time.strftime("%Y-%m-%d %H:%M:%S")}
        if disagree:
            stats["disagreement"] = (f"the saved labels of {', '.join(disagree)} disagree with the served model far "
                                     f"more than usual (mean Dice {', '.join(f'{d:.2f}' for d in disagree.values())}): "
                                     f"check their orientation and label names; the gate refuses an adapter that "
                                     f"forgets what the served one knew")
            logger.warning(stats["disagreement"])
        self._write_stats(stats)
        logger.info("training %s on %d images (%d for validation)%s", version_path.name, len(items), len(val_items),
                    f", continuing from {continued_from}" if continued_from else "")

        def progress(info: dict) -> None:
            if info.get("event") == "epoch":
                stats.update(epoch=info["epoch"], best_metric=round(max(info["best"], 0.0), 4),
                             loss=round(info["loss"], 4), mode=info["mode"],
                             val_dice={k: round(v, 4) for k, v in info["val_dice"].items()})
            elif info.get("event") == "budget":  # the budget holds too few epochs on this machine
                stats.update(warning=info["warning"], epochs_in_budget=info["epochs_in_budget"])
            else:
                stats.update(phase=info.get("phase"), done=info.get("done"), total=info.get("total"))
            self._write_stats(stats)

        predictor.unload_adapter()  # the trainer copies the base model (and loads init_from's weights into its copy)
        meta = train_adapter(train_items, version_path, backbone=predictor.backbone,
                             text_encoder=predictor.text_encoder, labels=self.labels, cfg=cfg, val_items=val_items,
                             progress=progress, log_path=self.store.root / "logs" / f"{version_path.name}.jsonl",
                             extra_metadata={"trigger": request.get("trigger", "request"),
                                             "gate": next_gate(gate_of(self.store.metadata(current.name) if current
                                                                       else {}), [it.name for it in val_items])})
        verdict = self._gate(version_path.name, meta, val_items, train_items, datastore)
        self.store.record(version_path.name, verdict.promoted, verdict.why, verdict.figures)
        (logger.info if verdict.promoted else logger.warning)(verdict.why)
        promoted, why, cand = verdict.promoted, verdict.why, meta["validation"]["dice_mean"]
        run = meta["training"]
        stats.update(status="done", promoted=promoted, decision=why, best_metric=round(cand, 4),
                     val_dice=meta["validation"]["dice"], gate=verdict.figures, mode=meta["mode"],
                     stopped=run["stopped"], best_epoch=run["best_epoch"], epochs_run=run["epochs_run"],
                     seconds=round(time.time() - t0, 1), end_ts=time.strftime("%Y-%m-%d %H:%M:%S"))
        self._write_stats(stats)
        return {"version": version_path.name, "promoted": promoted, "decision": why,
                "val_dice": meta["validation"]["dice"], "val_dice_mean": float(np.round(cand, 4))}
