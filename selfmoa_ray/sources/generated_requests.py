"""Checks on a request a model wrote: one clean line, long enough, not a refusal, on topic.

The red team (stages/redteam.py) and PT-ALIGN's data stages (stages/topics.py,
stages/instructions.py) both ask a small model to write requests, and both keep only these.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from selfmoa_ray.evaluators.refusal import is_refusal

_LABEL = re.compile(r"^\s*(?:\*\*)?(?:rewritten |new )?(?:request|prompt)\s*(?:\*\*)?\s*:\s*", re.I)
MIN_WORDS = 3
_WORD = re.compile(r"[a-z]+")


def clean_completion(text: str) -> str | None:
    """The generator's completion as one request, or None when it is not a usable request."""
    for line in text.strip().splitlines():
        line = _LABEL.sub("", line).strip().strip("\"'`*").strip()
        if line:
            break
    else:
        return None
    if len(line.split()) < MIN_WORDS or is_refusal(line):
        return None
    return line[:500]


def content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if len(w) >= 4}


def topic_overlap(candidate: str, references: Sequence[str]) -> float:
    """Share of the candidate's content words found in the references: a small generator often
    drifts off topic, and an attack that lost its harmful intent teaches nothing."""
    words = content_words(candidate)
    if not words:
        return 0.0
    known = set().union(*(content_words(r) for r in references))
    return len(words & known) / len(words)
