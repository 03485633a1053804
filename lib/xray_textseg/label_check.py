"""A saved label checked against the served model before it is trusted for training.

A label written in the wrong orientation (a NIfTI with an identity affine is read turned 180 degrees), mirrored, or
with its names and values swapped agrees with nothing the model learnt; trained on, it makes the model worse for
everyone. Each structure of the label that the served adapter was trained on is compared with the model's own
answer on the film (Dice, unknown pixels ignored):

* a *contradiction* (the label as saved disagrees, while the label turned, mirrored or renamed agrees) is refused
  by the app (422) unless the request forces it;
* a *borderline* structure (disagrees, nothing explains why) is kept but held out of training until a person
  confirms it;
* structures the adapter was not trained on have nothing to compare with and pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .metrics import dice
from .vocabulary import companion_labels

AGREE = 0.5  # Dice with the model's answer below which a structure disagrees (borderline when unexplained)
CONTRADICT = 0.3  # as-saved Dice below which another reading that agrees (>= EXPLAINED) is a contradiction
EXPLAINED = 0.6
JUDGEABLE = 0.5  # largest part of the model's answer that may lie on pixels the label leaves unknown

READINGS = {
    "turned 180 degrees": lambda m: m[::-1, ::-1],
    "mirrored left-right": lambda m: m[:, ::-1],
    "upside down": lambda m: m[::-1, :],
}


@dataclass
class LabelCheck:
    agreement: dict[str, float] = field(default_factory=dict)  # structure -> Dice with the model's answer
    contradictions: list[str] = field(default_factory=list)  # what looks wrong and how to save it right
    borderline: list[str] = field(default_factory=list)  # structures that disagree, unexplained

    def info(self, forced: bool) -> dict:
        """What the datastore keeps with the label: ``held`` labels are left out of training until confirmed."""
        held = bool(self.borderline) or (forced and bool(self.contradictions))
        out = {"agreement": {k: round(v, 4) for k, v in self.agreement.items()}, "status": "held" if held else "ok"}
        if held:
            out["reasons"] = self.contradictions + [f"{lab} disagrees with the model (Dice "
                                                    f"{self.agreement[lab]:.2f})" for lab in self.borderline]
        if forced:
            out["forced"] = True
        return out


def check_label(predictor, image, masks: dict[str, np.ndarray], unknown: dict[str, np.ndarray],
                values: dict[str, int]) -> LabelCheck:
    """Compare ``masks`` (structure -> bool (H, W), with ``unknown`` pixels) with ``predictor``'s answers on
    ``image`` for the structures its adapter was trained on (none without an adapter)."""
    learnt = set(predictor.adapter_metadata.get("labels", ())) if predictor.head is not None else set()
    asked = [lab for lab in masks if lab in learnt and lab in predictor.labels]
    if not asked:
        return LabelCheck()
    around = [lab for lab in companion_labels(asked, predictor.labels) if lab in learnt]
    answer = {r.label: r.mask for r in predictor.predict(list(dict.fromkeys(asked + around)), image=image).results}
    # a structure most of whose answer lies where the label cannot say (a clavicle under a lung painted over it)
    # leaves too little to judge
    asked = [lab for lab in asked if lab not in unknown
             or (answer[lab] & unknown[lab]).sum() <= JUDGEABLE * max(1, answer[lab].sum())]
    if not asked:
        return LabelCheck()
    result = LabelCheck({lab: dice(masks[lab], answer[lab], ignore=unknown.get(lab)) for lab in asked})
    as_saved = float(np.mean(list(result.agreement.values())))
    if as_saved < CONTRADICT:
        for name, turn in READINGS.items():
            read = float(np.mean([dice(turn(masks[lab]), answer[lab]) for lab in asked]))
            if read >= EXPLAINED:
                result.contradictions.append(
                    f"the label looks {name} relative to the film (its structures agree with the model at Dice "
                    f"{read:.2f} read {name}, {as_saved:.2f} as saved): save it in the film's orientation (a NIfTI "
                    f"needs the film's affine, as Slicer writes it: RAS diag(-1, -1, 1) for a PNG or DICOM film; a "
                    f"PNG row 0 is the top of the film)")
                break
    if not result.contradictions:
        for lab in asked:
            if result.agreement[lab] >= CONTRADICT:
                continue
            best = max((o for o in answer if o != lab), key=lambda o: dice(masks[lab], answer[o]), default=None)
            if best is not None and dice(masks[lab], answer[best]) >= EXPLAINED:
                result.contradictions.append(
                    f"the structure saved as '{lab}' (value {values.get(lab)}) lies where the model finds "
                    f"'{best}' (Dice {dice(masks[lab], answer[best]):.2f}; {result.agreement[lab]:.2f} with its "
                    f"own): check the names and values in label_info")
    explained = " ".join(result.contradictions)
    result.borderline = [lab for lab in asked if result.agreement[lab] < AGREE and f"'{lab}'" not in explained
                         and not (result.contradictions and as_saved < CONTRADICT)]
    return result
