"""Free text -> canonical labels: synonyms, laterality, and clear errors for what we do not know."""

import pytest
from xray_textseg.vocabulary import (
    CHEST_LABELS,
    UnknownLabelError,
    companion_labels,
    label_phrases,
    parse_label,
    parse_prompt,
    resolve_label_set,
)


def labels(prompt, **kw):
    return [p.label for p in parse_prompt(prompt, **kw)]


@pytest.mark.parametrize("text,expected", [
    ("left lung", ["left_lung"]),
    ("Left Lung", ["left_lung"]),
    ("lung, left", ["left_lung"]),
    ("L lung", ["left_lung"]),
    ("lt lung", ["left_lung"]),
    ("the patient's left lung", ["left_lung"]),
    ("right lung", ["right_lung"]),
    ("R. lung", ["right_lung"]),
    ("right lung field", ["right_lung"]),
    ("right hemithorax", ["right_lung"]),
    ("heart", ["heart"]),
    ("cardiac silhouette", ["heart"]),
    ("right clavicle", ["right_clavicle"]),
    ("left collarbone", ["left_clavicle"]),
    ("femur", ["femur"]),
    ("thigh bone", ["femur"]),
    ("tibia", ["tibia"]),
    ("shin bone", ["tibia"]),
])
def test_synonyms_and_laterality(text, expected):
    assert labels(text) == expected


def test_laterality_is_never_confused():
    # the pooled MiniLM embeddings of these are 0.92 similar; the vocabulary must keep them apart
    assert labels("left lung") != labels("right lung")
    assert labels("left clavicle") == ["left_clavicle"] and labels("right clavicle") == ["right_clavicle"]


def test_several_labels_in_one_prompt_keep_order_and_drop_duplicates():
    assert labels("left lung, right lung and heart") == ["left_lung", "right_lung", "heart"]
    assert labels("heart; heart + femur") == ["heart", "femur"]
    assert labels("both lungs") == ["left_lung", "right_lung"]
    assert labels("lungs") == ["left_lung", "right_lung"]
    assert labels("clavicles") == ["left_clavicle", "right_clavicle"]


@pytest.mark.parametrize("text", ["LL", "liver", "", "   ", ",,,", "left", "spleen, heart", "left right lung",
                                  "lung" * 200, "左肺"])
def test_unknown_or_ambiguous_text_is_an_error(text):
    with pytest.raises(UnknownLabelError):
        parse_prompt(text)


def test_error_lists_known_labels():
    with pytest.raises(UnknownLabelError, match="known labels: left lung, right lung, heart"):
        parse_prompt("liver")


def test_side_on_unlateralised_structure_is_an_error():
    with pytest.raises(UnknownLabelError, match="has no side"):
        parse_label("left heart")


def test_label_not_enabled_on_server():
    with pytest.raises(UnknownLabelError, match="not enabled"):
        parse_prompt("femur", allowed=CHEST_LABELS)


def test_label_sets():
    assert resolve_label_set("chest") == CHEST_LABELS
    assert resolve_label_set("femur, left lung") == ("femur", "left_lung")
    with pytest.raises(UnknownLabelError):
        resolve_label_set("kidney")


def test_phrases_parse_back_to_their_label():
    for label in ("left_lung", "right_clavicle", "heart", "femur"):
        for phrase in label_phrases(label):
            assert labels(phrase) == [label], phrase


def test_companion_labels_are_the_rest_of_the_asked_region():
    """What the server segments ahead after a prompt: the asked region's other labels, never the asked ones."""
    assert companion_labels(["heart"]) == ["left_lung", "right_lung", "left_clavicle", "right_clavicle"]
    assert companion_labels(["femur"]) == ["tibia"]
    assert companion_labels(["femur", "tibia"]) == []
    assert companion_labels(["left_lung", "tibia"]) == ["right_lung", "heart", "left_clavicle", "right_clavicle",
                                                         "femur"]
    assert companion_labels(["left_lung"], allowed=("left_lung", "right_lung", "femur")) == ["right_lung"]
    assert companion_labels([]) == []
