"""The app's --conf parsing and the translation of saved label info (Slicer / our own infer params)."""

from __future__ import annotations

import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "apps" / "xray_textseg"))

from lib.options import AppOptions  # noqa: E402
from lib.trainers import extra_round_reason, label_values_from_info  # noqa: E402


def test_defaults_and_parsing():
    o = AppOptions.from_conf({})
    assert o.backbone == "litemedsam" and o.auto_train_after == 5 and o.retrain_seconds == 0
    o = AppOptions.from_conf({"auto_train_after": "3", "refine": "false", "retrain_interval": "24h"})
    assert o.auto_train_after == 3 and o.refine is False and o.retrain_seconds == 86400
    assert AppOptions.from_conf({"retrain_interval": "30m"}).retrain_seconds == 1800
    assert AppOptions.from_conf({"retrain_interval": "off"}).retrain_seconds == 0
    o = AppOptions.from_conf({"train_coarse_prior": "auto", "train_mid_view": "true"})
    assert o.train_coarse_prior == "auto" and o.train_mid_view is True
    assert AppOptions.from_conf({}).train_coarse_prior == "median" and not AppOptions.from_conf({}).train_mid_view
    assert AppOptions.from_conf({}).train_warm_start is True
    assert AppOptions.from_conf({"train_warm_start": "false"}).train_warm_start is False
    assert AppOptions.from_conf({}).train_extra_rounds == 2
    assert AppOptions.from_conf({"train_extra_rounds": "0"}).train_extra_rounds == 0
    assert AppOptions.from_conf({}).train_degrade == 0.3
    assert AppOptions.from_conf({"train_degrade": "0"}).train_degrade == 0.0


@pytest.mark.parametrize("conf, match", [
    ({"auto_train_after": "five"}, "auto_train_after"),
    ({"refine": "maybe"}, "refine"),
    ({"train_mode": "fast"}, "train_mode.*auto, lora, cached"),
    ({"train_coarse_prior": "mean"}, "train_coarse_prior.*median, auto, envelope"),
    ({"train_mid_view": "perhaps"}, "train_mid_view"),
    ({"train_warm_start": "sometimes"}, "train_warm_start"),
    ({"train_extra_rounds": "-1"}, "train_extra_rounds.*0 or more"),
    ({"auto_train_after": "-5"}, "auto_train_after.*0 or more"),
    ({"train_degrade": "often"}, "train_degrade.*number"),
    ({"train_degrade": "1.5"}, "train_degrade.*0 to 1"),
])
def test_bad_values_name_the_option(conf, match):
    with pytest.raises(ValueError, match=match):
        AppOptions.from_conf(conf)


@pytest.mark.parametrize("value", ["soon", "10s", "5x"])
def test_bad_interval(value):
    with pytest.raises(ValueError, match="retrain_interval"):
        AppOptions.from_conf({"retrain_interval": value}).retrain_seconds  # noqa: B018


def test_label_info_from_slicer_and_from_infer():
    slicer = {"label_info": [{"name": "Left Lung", "idx": 1}, {"name": "heart", "idx": 2},
                             {"name": "pacemaker", "idx": 3}, {"name": "background", "idx": 0}]}
    assert label_values_from_info(slicer) == {"left_lung": 1, "heart": 2}
    assert label_values_from_info({"params": {"label_names": {"right_clavicle": 5}}}) == {"right_clavicle": 5}
    default = label_values_from_info({})
    assert default["left_lung"] == 1 and default["tibia"] == 7


# train stats as AdapterTrainer writes them at the end of a run (the fields extra_round_reason reads)
CUT = {"status": "done", "version": "v0003", "promoted": True, "stopped": "time budget", "best_epoch": 3,
       "epochs_run": 3, "trigger": "5 new labels saved"}


def test_a_run_the_budget_cut_while_improving_goes_on():
    why = extra_round_reason(CUT, 0, 2)
    assert why.startswith("extra round 1 of 2") and "v0003" in why and "best epoch 3 of 3" in why
    assert extra_round_reason({**CUT, "best_epoch": 2}, 1, 2).startswith("extra round 2 of 2")


@pytest.mark.parametrize("change, rounds", [
    ({"stopped": "early stop"}, 0),  # the trainer wanted no more epochs
    ({"stopped": "epochs"}, 0),
    ({"best_epoch": 0}, 0),  # no better than the adapter it started from
    ({"promoted": False}, 0),
    ({"status": "running"}, 0),
    ({"status": "stopped"}, 0),
    ({}, 2),  # the extra rounds are spent
])
def test_no_extra_round(change, rounds):
    assert extra_round_reason({**CUT, **change}, rounds, 2) is None
    assert extra_round_reason(CUT, 0, 0) is None  # off
