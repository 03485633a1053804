"""The promotion gate: a candidate adapter replaces the current one only if, label by label, it is not worse on
the new validation films *and* on the films the current one was promoted on.

Each version keeps its *gate set* in its metadata (``gate``): the validation films (datastore ids) it and the
versions before it were promoted on, and synthetic films drawn by our own generator (:mod:`sample_data`, a fixed
seed) that stand for the starter's knowledge, whose real validation films are not shipped (drawn as the sample films' PNGs are). A candidate that learnt
bad labels (turned, mirrored, left and right swapped) agrees with them on the new films but fails on the gate set.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from .io import radiograph_from_array

GATE_TOLERANCE = 0.02  # per label, mean Dice, on real films
# the synthetic films stand for what the starter knew: drawn, not real, they catch forgetting (a label learnt
# turned or swapped falls by 0.3-0.9 there), not drifts of a few hundredths between film styles
SYNTHETIC_TOLERANCE = 0.05
MAX_GATE_FILMS = 40  # the newest server films kept in a gate set
STARTER_GATE: dict = {"films": [], "synthetic": {"seed": 2026, "chest": 4, "lower_limb": 4}}


def gate_of(metadata: dict) -> dict:
    """The gate set a version was promoted with (the starter's synthetic films for a version without one)."""
    gate = metadata.get("gate")
    return copy.deepcopy(gate if isinstance(gate, dict) else STARTER_GATE)


def next_gate(current: dict, new_films: list[str]) -> dict:
    """The gate set a candidate promoted on ``new_films`` carries: the current one's films and the new ones (the
    newest :data:`MAX_GATE_FILMS`), the same synthetic films."""
    films = list(dict.fromkeys([*current.get("films", []), *sorted(new_films)]))
    return {"films": films[-MAX_GATE_FILMS:], "synthetic": copy.deepcopy(current.get("synthetic") or {})}


def synthetic_items(gate: dict) -> list:
    """The gate set's synthetic films as training items (exact masks), named ``synthetic:<case>``."""
    from .sample_data import generate_cases, to_uint8
    from .train import TrainItem

    spec = gate.get("synthetic") or {}
    if not spec:
        return []
    cases = generate_cases(int(spec.get("chest", 0)), int(spec.get("lower_limb", 0)), seed=int(spec["seed"]))
    return [TrainItem(f"synthetic:{c.name}", radiograph_from_array(to_uint8(c.image)), dict(c.masks))
            for c in cases]


@dataclass
class Verdict:
    promoted: bool
    why: str
    # {"new" | "gate": {label: {"candidate": Dice, "current": Dice}}}: what the decision was made on
    figures: dict = field(default_factory=dict)
    worse: list[str] = field(default_factory=list)  # "set/label" that fell by more than the tolerance


def judge(candidate: dict[str, dict[str, float]], current: dict[str, dict[str, float]] | None, name: str,
          current_name: str | None, tolerance: float = GATE_TOLERANCE) -> Verdict:
    """Compare per-label mean Dice of the candidate and the current adapter on each film set (``{"new": {label:
    Dice}, "gate": {...}, "synthetic": {...}}``); promoted when no label of any set is worse by more than
    ``tolerance`` (:data:`SYNTHETIC_TOLERANCE` on the synthetic films; first adapter: always)."""
    if current is None:
        mean = np.mean([v for s in candidate.values() for v in s.values()]) if candidate else 0.0
        return Verdict(True, f"promoted {name}: validation Dice {mean:.4f} (first adapter)",
                       {k: {lab: {"candidate": round(v, 4)} for lab, v in s.items()} for k, s in candidate.items()})
    figures, worse = {}, []
    for which, scores in candidate.items():
        figures[which] = {}
        for label, dice in sorted(scores.items()):
            before = current.get(which, {}).get(label)
            figures[which][label] = {"candidate": round(dice, 4),
                                     **({"current": round(before, 4)} if before is not None else {})}
            allowed = SYNTHETIC_TOLERANCE if which == "synthetic" else tolerance
            if before is not None and dice + allowed < before:
                worse.append(f"{which}/{label} {dice:.3f} < {before:.3f}")
    if worse:
        return Verdict(False, f"kept {current_name}: candidate {name} is worse than the tolerance ({tolerance}; "
                              f"{SYNTHETIC_TOLERANCE} on synthetic films) on " + ", ".join(worse), figures, worse)
    return Verdict(True, f"promoted {name}: no label worse than {current_name} by more than {tolerance} on the new "
                         f"validation films or the gate films ({SYNTHETIC_TOLERANCE} on the synthetic ones)", figures)
