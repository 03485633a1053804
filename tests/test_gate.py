"""The promotion gate's rule: per label, on each film set, within its tolerance; gate sets grow with each version."""

from __future__ import annotations

from xray_textseg.gate import MAX_GATE_FILMS, STARTER_GATE, gate_of, judge, next_gate, synthetic_items


def test_a_candidate_worse_on_any_label_of_any_set_is_kept_out():
    current = {"new": {"heart": 0.90, "left_lung": 0.95}, "gate": {"left_lung": 0.96}, "synthetic": {"femur": 0.90}}
    better = {"new": {"heart": 0.93, "left_lung": 0.94}, "gate": {"left_lung": 0.95}, "synthetic": {"femur": 0.86}}
    v = judge(better, current, "v0003", "v0002")
    assert v.promoted and v.figures["new"]["heart"] == {"candidate": 0.93, "current": 0.9}
    forgot = {**better, "gate": {"left_lung": 0.10}}  # agrees with its new (bad) labels, forgot the old films
    v = judge(forgot, current, "v0003", "v0002")
    assert not v.promoted and v.worse == ["gate/left_lung 0.100 < 0.960"] and "kept v0002" in v.why
    drifted = {**better, "synthetic": {"femur": 0.80}}  # synthetic films: within 0.05
    assert not judge(drifted, current, "v0003", "v0002").promoted
    assert judge(better, None, "v0001", None).promoted  # the first adapter


def test_gate_sets_carry_the_films_each_version_was_promoted_on():
    first = gate_of({})
    assert first == STARTER_GATE and first is not STARTER_GATE
    second = next_gate(first, ["b", "a"])
    assert second["films"] == ["a", "b"] and second["synthetic"] == STARTER_GATE["synthetic"]
    third = next_gate(second, [f"f{i:03d}" for i in range(60)])
    assert len(third["films"]) == MAX_GATE_FILMS and third["films"][-1] == "f059"
    assert gate_of({"gate": third}) == third


def test_the_starters_synthetic_gate_films_are_drawn_the_same_every_time():
    a, b = synthetic_items(STARTER_GATE), synthetic_items(STARTER_GATE)
    assert len(a) == 8 and [it.name for it in a] == [it.name for it in b]
    assert all((x.image.pixels == y.image.pixels).all() for x, y in zip(a, b))
    assert {lab for it in a for lab in it.labels} == {"left_lung", "right_lung", "heart", "left_clavicle",
                                                     "right_clavicle", "femur", "tibia"}
