"""Label vocabulary: free text -> canonical anatomical labels.

Why a vocabulary and not just embedding similarity: sentence encoders put "left lung" and
"right lung" at cosine 0.92, so laterality cannot be read off a pooled embedding. The side is
parsed here, explicitly, and the canonical label (``left_lung``) is what the rest of the engine
sees. Text the vocabulary does not know is an error that lists the known labels; we never guess.

Label names are *patient* side: ``left_lung`` is the patient's left lung, which lies on the
image's right half of a PA film.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CHEST_LABELS: tuple[str, ...] = ("left_lung", "right_lung", "heart", "left_clavicle", "right_clavicle")
LOWER_LIMB_LABELS: tuple[str, ...] = ("femur", "tibia")
ALL_LABELS: tuple[str, ...] = CHEST_LABELS + LOWER_LIMB_LABELS
LABEL_SETS: dict[str, tuple[str, ...]] = {
    "chest": CHEST_LABELS,
    "lower_limb": LOWER_LIMB_LABELS,
    "both": ALL_LABELS,
}
# The body regions a film shows (a film of one region does not show another's labels): the body-region check
# (priors.FILM_REGION_RATIO) tells them apart.
BODY_REGIONS: dict[str, tuple[str, ...]] = {"chest": CHEST_LABELS, "lower_limb": LOWER_LIMB_LABELS}

# Structures that lie over each other on a film (a clavicle over its lung field): a label map with one value per
# pixel cannot hold both, so a pixel it gives to one of a pair says nothing about the other (labelmaps.py).
# Adapters add the pairs their training masks showed overlapping (labelmaps.overlap_pairs).
OVERLAPPING: frozenset[frozenset[str]] = frozenset({frozenset({"left_clavicle", "left_lung"}),
                                                    frozenset({"right_clavicle", "right_lung"})})

# Anatomy nouns (singular, lower case) -> canonical stem. Lateralised stems need a side.
_NOUNS: dict[str, str] = {
    "lung": "lung",
    "lung field": "lung",
    "pulmonary field": "lung",
    "hemithorax": "lung",
    "heart": "heart",
    "cardiac silhouette": "heart",
    "cardiac shadow": "heart",
    "cardiac": "heart",
    "mediastinal heart": "heart",
    "clavicle": "clavicle",
    "collarbone": "clavicle",
    "collar bone": "clavicle",
    "femur": "femur",
    "femoral bone": "femur",
    "thigh bone": "femur",
    "thighbone": "femur",
    "tibia": "tibia",
    "shin bone": "tibia",
    "shinbone": "tibia",
    "tibial bone": "tibia",
}
_LATERAL_STEMS = {"lung", "clavicle"}
_SIDE_WORDS = {
    "left": "left", "l": "left", "lt": "left", "sinister": "left", "sin": "left",
    "right": "right", "r": "right", "rt": "right", "dexter": "right", "dx": "right",
}
_PLURALS = {"lungs": "lung", "clavicles": "clavicle", "collarbones": "collarbone", "femurs": "femur",
            "femora": "femur", "tibiae": "tibia", "tibias": "tibia", "fields": "field"}
_FILLER = {"the", "of", "patient", "patients", "patient's", "s", "a", "an", "segment", "mask", "please", "side",
           "sided"}

MAX_PROMPT_CHARS = 500
MAX_LABELS_PER_PROMPT = 16


class UnknownLabelError(ValueError):
    """Raised for text the vocabulary cannot map to a label; the message lists the known labels."""


@dataclass(frozen=True)
class ParsedLabel:
    """One label found in a prompt: canonical name plus the text it came from."""

    label: str
    text: str
    stem: str
    side: str | None  # "left" | "right" | None

    @property
    def display_name(self) -> str:
        return self.label.replace("_", " ")


def _normalise(text: str) -> list[str]:
    text = text.lower().replace("’", "'")
    text = re.sub(r"[^a-z0-9' ]+", " ", text)
    words = []
    for w in text.split():
        w = w.strip("'")
        w = w.removesuffix("'s")
        w = _PLURALS.get(w, w)
        if w and w not in _FILLER:
            words.append(w)
    return words


def _known_labels_message(allowed: tuple[str, ...]) -> str:
    names = ", ".join(label.replace("_", " ") for label in allowed)
    return f"known labels: {names}"


def parse_label(text: str, allowed: tuple[str, ...] = ALL_LABELS) -> list[ParsedLabel]:
    """Parse one phrase ("left lung", "lung, left", "L lung", "both lungs", "heart") into labels.

    "lungs"/"both lungs"/"clavicles" expand to both sides. A lateralised organ with no side
    ("lung") also means both: that is what a reader asking for "lung" on a chest film wants.
    """
    original = text
    words = _normalise(text)
    if not words:
        raise UnknownLabelError(f"empty prompt; {_known_labels_message(allowed)}")
    sides = {_SIDE_WORDS[w] for w in words if w in _SIDE_WORDS}
    both = "both" in words or "bilateral" in words
    rest = " ".join(w for w in words if w not in _SIDE_WORDS and w not in {"both", "bilateral"})
    stem = _NOUNS.get(rest)
    if stem is None:
        # tolerate adjectives such as "whole", "entire" in front of a known noun
        for noun in sorted(_NOUNS, key=len, reverse=True):
            if re.search(rf"(^| ){re.escape(noun)}$", rest):
                stem = _NOUNS[noun]
                break
    if stem is None:
        raise UnknownLabelError(f"unknown label {original.strip()[:80]!r}; {_known_labels_message(allowed)}")
    if stem in _LATERAL_STEMS:
        if len(sides) > 1:
            raise UnknownLabelError(f"prompt {original.strip()[:80]!r} names both left and right; "
                                    "ask for 'both lungs' or name each side")
        chosen = sorted(sides) if (sides and not both) else ["left", "right"]
        labels = [ParsedLabel(f"{side}_{stem}", original, stem, side) for side in chosen]
    else:
        if sides:
            raise UnknownLabelError(f"prompt {original.strip()[:80]!r}: {stem} has no side in this model "
                                    f"(it is trained on one leg per film / a single heart)")
        labels = [ParsedLabel(stem, original, stem, None)]
    for parsed in labels:
        if parsed.label not in allowed:
            raise UnknownLabelError(f"label {parsed.display_name!r} is not enabled on this server; "
                                    f"{_known_labels_message(allowed)}")
    return labels


def parse_prompt(prompt: str, allowed: tuple[str, ...] = ALL_LABELS) -> list[ParsedLabel]:
    """Parse a free-text prompt with one or several labels separated by ',', ';', '+', '/', 'and' or newlines.

    "lung, left" (a comma inside one phrase) is recognised: a fragment that is only a side word
    attaches to the previous fragment. Duplicates are dropped, order is kept.
    """
    if not isinstance(prompt, str):
        raise UnknownLabelError(f"prompt must be text, got {type(prompt).__name__}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise UnknownLabelError(f"prompt is {len(prompt)} characters long (limit {MAX_PROMPT_CHARS})")
    fragments = [f for f in re.split(r"[,;+/\n]|\band\b|&", prompt, flags=re.IGNORECASE)]
    phrases: list[str] = []
    for fragment in fragments:
        words = _normalise(fragment)
        if not words:
            continue
        if phrases and all(w in _SIDE_WORDS for w in words):
            phrases[-1] = f"{fragment.strip()} {phrases[-1]}"
        else:
            phrases.append(fragment.strip())
    if not phrases:
        raise UnknownLabelError(f"empty prompt; {_known_labels_message(allowed)}")
    out: list[ParsedLabel] = []
    seen: set[str] = set()
    for phrase in phrases:
        for parsed in parse_label(phrase, allowed):
            if parsed.label not in seen:
                seen.add(parsed.label)
                out.append(parsed)
    if len(out) > MAX_LABELS_PER_PROMPT:
        raise UnknownLabelError(f"prompt asks for {len(out)} labels (limit {MAX_LABELS_PER_PROMPT})")
    return out


def resolve_label_set(spec: str) -> tuple[str, ...]:
    """Turn a `labels` option ("chest", "lower_limb", "both", or a comma list) into canonical labels."""
    spec = (spec or "both").strip()
    if spec in LABEL_SETS:
        return LABEL_SETS[spec]
    labels: list[str] = []
    for part in spec.split(","):
        for parsed in parse_label(part):
            if parsed.label not in labels:
                labels.append(parsed.label)
    return tuple(labels)


def companion_labels(asked, allowed: tuple[str, ...] = ALL_LABELS) -> list[str]:
    """The labels a clinician may ask for next on the same film: the others of the asked labels' regions (chest,
    lower limb) among ``allowed``, in vocabulary order. What the server segments ahead after a prompt."""
    out: list[str] = []
    for region in BODY_REGIONS.values():
        if any(a in region for a in asked):
            out += [label for label in region if label in allowed and label not in asked]
    return out


def label_phrases(label: str) -> list[str]:
    """Natural phrases for a canonical label: used as text-encoder inputs and for training augmentation."""
    side, _, stem = label.partition("_") if label.count("_") == 1 and label.split("_")[0] in ("left", "right") \
        else (None, "", label)
    stem_nouns = [noun for noun, s in _NOUNS.items() if s == stem]
    if side is None:
        return stem_nouns
    return [f"{side} {noun}" for noun in stem_nouns] + [f"{noun}, {side}" for noun in stem_nouns[:1]]
