"""The app's --conf parsing and the translation of saved label info (Slicer / our own infer params)."""

from __future__ import annotations

import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "apps" / "xray_textseg"))

from lib.options import AppOptions  # noqa: E402
from lib.trainers import label_values_from_info  # noqa: E402


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


@pytest.mark.parametrize("conf, match", [
    ({"auto_train_after": "five"}, "auto_train_after"),
    ({"refine": "maybe"}, "refine"),
    ({"train_mode": "fast"}, "train_mode.*auto, lora, cached"),
    ({"train_coarse_prior": "mean"}, "train_coarse_prior.*median, auto, envelope"),
    ({"train_mid_view": "perhaps"}, "train_mid_view"),
    ({"train_warm_start": "sometimes"}, "train_warm_start"),
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
