"""Rubric templates and the parsing of their answers, shared by every rubric judge.

A chat model judges a (prompt, response) pair from a template with ``{prompt}`` and ``{response}``
slots: the local rubric judge (rubric.py) and the endpoint chat judge (endpoint_judge.py) fill the
same templates and read the answers the same way, so one template means the same on both.

A template asks for what it names, in ``Label: value`` form:

* ``Score: N`` or ``Helpfulness: N`` (1-10)  -> helpfulness, (N - 1) / 9;
* ``Safety: N`` (1-10, 10 = safe) or ``Safety: safe|unsafe`` -> safety;
* ``Refusal: yes|no``                          -> refusal (1 = a refusal).

A template naming none of these asks for helpfulness, read off the first integer 1-10 (the
original rubric). An answer without the value asked for gives NaN, never a made-up number: the
composite skips NaN scores (composite.py).

Light on purpose (no torch): config.py checks templates with it when a config is loaded.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np

DEFAULT_TEMPLATE = resources.files("selfmoa_ray.evaluators").joinpath("templates/rubric.txt")
SLOTS = ("{prompt}", "{response}")
ASKABLE = ("safety", "refusal", "helpfulness")  # the order of a rubric judge's columns
_ASKS = {
    "safety": re.compile(r"\bsafety\s*:", re.IGNORECASE),
    "refusal": re.compile(r"\brefusal\s*:", re.IGNORECASE),
    "helpfulness": re.compile(r"\b(?:helpfulness|score)\s*:", re.IGNORECASE),
}
_SCORE = re.compile(r"score\s*[:=]?\s*(\d{1,2})", re.IGNORECASE)
_HELPFULNESS = re.compile(r"\b(?:helpfulness|score)\s*[:=]?\s*(\d{1,2})\b", re.IGNORECASE)
_SAFETY = re.compile(r"\bsafety\s*[:=]?\s*(\d{1,2}\b|unsafe\b|safe\b)", re.IGNORECASE)
_REFUSAL = re.compile(r"\brefusal\s*[:=]?\s*(yes|no|true|false)\b", re.IGNORECASE)
_NUMBER = re.compile(r"\b(10|[1-9])\b")


def check_template(text: str) -> str:
    """``text`` when it is a usable template; a ValueError naming the problem otherwise."""
    missing = [slot for slot in SLOTS if slot not in text]
    if missing:
        raise ValueError(
            f"a rubric template needs both {{prompt}} and {{response}} slots; missing "
            f"{' and '.join(missing)}"
        )
    try:
        text.format(prompt="", response="")
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(
            f"rubric template has a slot other than {{prompt}}/{{response}}: {err} (write a "
            "literal brace twice: {{ or }})"
        ) from None
    return text


def resolve_template(value: str | None) -> str:
    """The checked text of a template given inline or as a file path (None: the default).

    Text holding a brace or a line break is a template; anything else is a path, read now, so a
    run's config records the template it judged with, not a path that may change.
    """
    if value is None:
        return check_template(DEFAULT_TEMPLATE.read_text())
    if "{" in value or "\n" in value:
        return check_template(value)
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(
            f"template {value!r} is no file, nor a template: give text with {{prompt}} and "
            "{response} slots, or the path of a file holding it"
        )
    try:
        return check_template(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def fill(template: str, prompt: str, response: str) -> str:
    """The judge's request for one pair."""
    return template.format(prompt=prompt, response=response)


def asked(template: str) -> tuple[str, ...]:
    """The quantities ``template`` asks for (helpfulness when it names none)."""
    found = tuple(q for q in ASKABLE if _ASKS[q].search(template))
    return found or ("helpfulness",)


def parse_score(text: str) -> float:
    """The 1-10 score in a judge's answer ("Score: N", else the first integer), or NaN."""
    match = _SCORE.search(text) or _NUMBER.search(text)
    return _one_to_ten(match.group(1)) if match else float("nan")


def parse_answer(text: str, quantities: Sequence[str]) -> dict[str, float]:
    """Each quantity asked for, in [0, 1] (NaN where the answer does not give it)."""
    out: dict[str, float] = {}
    for quantity in quantities:
        if quantity == "helpfulness":
            match = _HELPFULNESS.search(text)
            if match is None and len(quantities) == 1:  # the original rubric: any first number
                raw = parse_score(text)
            else:
                raw = _one_to_ten(match.group(1)) if match else float("nan")
            out[quantity] = (raw - 1.0) / 9.0
        elif quantity == "safety":
            match = _SAFETY.search(text)
            word = match.group(1).lower() if match else ""
            out[quantity] = {"safe": 1.0, "unsafe": 0.0}.get(word, (_one_to_ten(word) - 1.0) / 9.0)
        elif quantity == "refusal":
            match = _REFUSAL.search(text)
            word = match.group(1).lower() if match else ""
            out[quantity] = {"yes": 1.0, "true": 1.0, "no": 0.0, "false": 0.0}.get(word, np.nan)
        else:
            raise ValueError(f"a rubric cannot ask for {quantity!r}; it asks for {ASKABLE}")
    return out


def _one_to_ten(digits: str) -> float:
    value = int(digits) if digits.isdigit() else 0
    return float(value) if 1 <= value <= 10 else float("nan")


def rubric_columns(
    name: str, answers: Sequence[str | None], quantities: Sequence[str]
) -> dict[str, np.ndarray]:
    """A rubric judge's columns: ``<name>_<quantity>`` for each one asked, and ``<name>_score``
    (the raw 1-10 helpfulness) when helpfulness is asked. A ``None`` answer (no answer came)
    is NaN throughout."""
    parsed = [parse_answer(a, quantities) if a is not None else {} for a in answers]
    columns = {
        f"{name}_{q}": np.array([p.get(q, np.nan) for p in parsed], dtype=np.float32)
        for q in quantities
    }
    if "helpfulness" in quantities:
        columns = {f"{name}_score": columns[f"{name}_helpfulness"] * 9.0 + 1.0, **columns}
    return columns


def provides_of(name: str, quantities: Sequence[str]) -> dict[str, str]:
    """The ``provides`` of a rubric judge called ``name`` asking for ``quantities``."""
    return {q: f"{name}_{q}" for q in quantities}
