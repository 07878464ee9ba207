"""The wording of config errors: the closest known key or value, what legacy values became, and
pydantic's collected problems turned into one message naming the key.

Kept apart from the parser so the wording of every config error lives in one place.
"""

from __future__ import annotations

import difflib
import reprlib
from typing import Any, Iterable

from pydantic import ValidationError

from orchestrator.errors import ConfigError

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


def config_error(exc: ValidationError) -> ConfigError:
    """One ConfigError from pydantic's collection: the first problem, and where the others are."""
    problems = exc.errors()
    messages = [_problem_message(p) for p in problems]
    message = messages[0]
    if len(problems) > 1:
        where = ", ".join(".".join(str(part) for part in p["loc"]) or "Fp8Config" for p in problems[1:])
        message += f" (and {len(problems) - 1} more problem(s) in: {where})"
    return ConfigError(message)


def _problem_message(problem: Any) -> str:
    error = problem.get("ctx", {}).get("error")
    if isinstance(error, ConfigError):
        return str(error)
    loc = ".".join(str(part) for part in problem["loc"]) or "Fp8Config"
    return f"Fp8Config key '{loc}': {problem['msg']} (got {show(problem.get('input'))})"
