"""Hints appended to config errors: the closest known key or value, and what legacy values became.

Kept apart from the parser so the wording of every "did you mean" lives in one place.
"""

from __future__ import annotations

import difflib
import reprlib
from typing import Iterable

# Values INC 3.x no longer knows, with what the user most likely wants today (reference §1.5, §2.4;
# project-decisions §1). Keys are upper case: method strings are matched case-insensitively.
_LEGACY_SCALE_METHODS: dict[str, str] = {
    "MAXABS_POW2_DYNAMIC": (
        "a short-lived development name; use 'act_maxabs_pcs_pow2_weight_maxabs_pts_pow2_hw' "
        "(per-token activation scales) with \"dynamic_quantization\": true"
    ),
    "MAX": "a legacy HQT method removed in INC 3.5; use 'maxabs_hw' (Gaudi) or 'maxabs_pow2'",
    "WITHOUT_SCALE": "a legacy HQT method removed from INC; use 'unit_scale' (every scale 1.0)",
}

_REPR = reprlib.Repr()
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlist = 6
_REPR.maxdict = 4
_REPR.maxlevel = 2


def show(value: object) -> str:
    """A short, single-line repr of a user value for an error message."""
    return _REPR.repr(value).replace("\n", " ")


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice most similar to ``word`` (case-insensitive), or None if nothing is close."""
    by_lower = {c.lower(): c for c in choices}
    found = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return by_lower[found[0]] if found else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` or an empty string."""
    best = closest(word, choices)
    return f" (did you mean '{best}'?)" if best is not None else ""


def scale_method_hint(value: str, choices: Iterable[str]) -> str:
    """What to write instead of an unknown scale-method string."""
    legacy = _LEGACY_SCALE_METHODS.get(value.upper())
    if legacy is not None:
        return f" ('{value}' is {legacy})"
    return did_you_mean(value, choices)
