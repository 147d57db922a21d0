"""Attack styles: PyRIT's jailbreak templates, each with a ``{{ prompt }}`` slot (MIT via PyRIT;
each YAML names its origin in ``source``)."""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from selfmoa_ray.sources.packages import data_path, read_yaml

log = logging.getLogger(__name__)

_SLOT = re.compile(r"\{\{-?\s*prompt\s*-?\}\}")
_SLOT_TEXT = "{{ prompt }}"


@dataclass(frozen=True)
class JailbreakTemplate:
    """An attack wrapper; ``template`` is plain text with one or more ``{{ prompt }}`` slots."""

    id: str
    name: str
    template: str
    source: str

    def __post_init__(self) -> None:
        if not _SLOT.search(self.template):
            raise ValueError(f"jailbreak template {self.id!r} has no {{{{ prompt }}}} slot")

    def apply(self, prompt: str) -> str:
        """Fill every slot; a function replacement keeps backslashes in ``prompt`` literal."""
        return _SLOT.sub(lambda _: prompt, self.template)


@dataclass(frozen=True)
class TemplateScan:
    """Usable templates and, for the rest, file -> why it was skipped."""

    templates: tuple[JailbreakTemplate, ...]
    skipped: dict[str, str]


_SENTINEL = "\x00SELFMOA_PROMPT_SLOT\x00"


def _render_to_slots(env: Any, value: str) -> str:
    """Render PyRIT's Jinja (``{% raw %}`` blocks etc.) once, leaving plain ``{{ prompt }}`` slots.

    Rendering with a sentinel mirrors how PyRIT itself fills templates, but lets ``apply`` be a
    cheap string substitution instead of a Jinja render per prompt.
    """
    rendered = env.from_string(value).render(prompt=_SENTINEL).strip()
    if _SENTINEL not in rendered:
        raise _Skip("no prompt slot")
    if "{{" in rendered or "{%" in rendered:
        raise _Skip("template syntax left after rendering (broken escaping)")
    return rendered.replace(_SENTINEL, _SLOT_TEXT)


class _Skip(Exception):
    pass


def _template_from_file(env: Any, path: Path, folder: Path) -> JailbreakTemplate:
    try:
        doc = read_yaml(path)
    except yaml.YAMLError as exc:
        raise _Skip(f"unparsable YAML: {type(exc).__name__}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("value"), str):
        raise _Skip("no string 'value'")
    try:
        template = _render_to_slots(env, doc["value"])
    except _Skip:
        raise
    except Exception as exc:  # jinja2 errors: undefined extra parameters, syntax errors
        raise _Skip(f"cannot render with only 'prompt': {exc}") from exc
    rel = path.relative_to(folder).with_suffix("").as_posix()
    return JailbreakTemplate(
        rel, str(doc.get("name") or rel), template, str(doc.get("source") or "pyrit")
    )


@functools.lru_cache(maxsize=1)
def scan_jailbreak_templates() -> TemplateScan:
    """Parse every PyRIT jailbreak template; skip (and record) the unusable ones, never fail."""
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    env = SandboxedEnvironment(undefined=StrictUndefined)  # as PyRIT renders them
    folder = data_path("pyrit", "datasets", "jailbreak", "templates")
    templates, skipped = [], {}
    for path in sorted(folder.rglob("*.yaml")):
        try:
            templates.append(_template_from_file(env, path, folder))
        except _Skip as why:
            skipped[path.relative_to(folder).as_posix()] = str(why)
    if skipped:
        log.info(
            "skipped %d of %d jailbreak templates", len(skipped), len(skipped) + len(templates)
        )
    return TemplateScan(tuple(templates), skipped)


def load_jailbreak_templates() -> list[JailbreakTemplate]:
    """Usable single-slot jailbreak templates, sorted by id."""
    return list(scan_jailbreak_templates().templates)
