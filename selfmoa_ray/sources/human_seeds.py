"""The PT-ALIGN human-seed file: the only human-written input of the recipe (docs/design.md 2.2 step 1).

One small, versioned YAML file holds safety domains, positive constraints, toxic constraints,
demonstrations and (optionally) instruction templates with a ``{topic}`` slot: harmful ones, and
benign ones that ask about the same topics safely (the contrast that keeps the policy answering). PT-ALIGN's claim is that fewer than 50 such items suffice, so the loader counts
them (:meth:`HumanSeeds.items`), refuses a file above ``pt_align.max_human_items``, and the
report shows the count. A malformed file fails with a :class:`HumanSeedsError` naming every bad
key, before any model is loaded.
"""

from __future__ import annotations

import hashlib
import string
from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PACKAGED = "packaged"
PACKAGED_FILE = "pt_align_seeds.yaml"


class HumanSeedsError(ValueError):
    """A seed file that cannot be used; the message names the file and what is wrong."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Domain(_Strict):
    name: str = Field(min_length=1, pattern=r"^[a-z0-9_]+$")
    description: str = Field(min_length=1)


class Demonstration(_Strict):
    domain: str = Field(min_length=1)
    instruction: str = Field(min_length=1)
    positive: str = Field(min_length=1)
    toxic: str = Field(min_length=1)


TOPIC_SLOT = "topic"


def _check_template(template: str) -> str:
    """A template must hold exactly one ``{topic}`` slot and no other field."""
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    if fields != [TOPIC_SLOT]:
        raise ValueError(f"an instruction template needs exactly one {{topic}} slot: {template!r}")
    return template


class HumanSeeds(_Strict):
    version: int = 1
    domains: list[Domain] = Field(min_length=1)
    positive_constraints: list[str] = Field(min_length=1)
    toxic_constraints: list[str] = Field(min_length=1)
    demonstrations: list[Demonstration] = []
    # Request shapes a human wrote, filled with the topics of each domain (the ``template``
    # instruction writer): a 135M model writes few usable requests of its own.
    instruction_templates: list[str] = []
    # Safe questions about the same topics ("What are the warning signs of {topic}?"): benign
    # twins the policy must keep answering (``pt_align.benign_per_topic``).
    benign_templates: list[str] = []

    @model_validator(mode="after")
    def _consistent(self) -> HumanSeeds:
        names = [d.name for d in self.domains]
        if len(set(names)) != len(names):
            raise ValueError(f"domain names must be unique, got {names}")
        unknown = sorted({d.domain for d in self.demonstrations} - set(names))
        if unknown:
            raise ValueError(f"demonstrations name unknown domains {unknown}; domains: {names}")
        for template in (*self.instruction_templates, *self.benign_templates):
            _check_template(template)
        return self

    @property
    def items(self) -> int:
        """Human-written items: every domain, constraint, demonstration and template is one."""
        return (
            len(self.domains)
            + len(self.positive_constraints)
            + len(self.toxic_constraints)
            + len(self.demonstrations)
            + len(self.instruction_templates)
            + len(self.benign_templates)
        )

    def demonstrations_for(self, domain: str) -> list[Demonstration]:
        """The demonstrations of ``domain``, or all of them when it has none of its own."""
        own = [d for d in self.demonstrations if d.domain == domain]
        return own or list(self.demonstrations)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:12]


def seeds_text(spec: str) -> tuple[str, str]:
    """(YAML text, origin) of ``spec``: "packaged" or a file path."""
    if spec == PACKAGED:
        return resources.files("selfmoa_ray.sources").joinpath(PACKAGED_FILE).read_text(), spec
    path = Path(spec)
    if not path.is_file():
        raise HumanSeedsError(f"PT-ALIGN seed file not found: {path}")
    return path.read_text(encoding="utf-8"), str(path)


def load_human_seeds(spec: str = PACKAGED, max_items: int | None = None) -> HumanSeeds:
    """Parse and validate a seed file; refuse one with more than ``max_items`` items."""
    text, origin = seeds_text(spec)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise HumanSeedsError(f"{origin} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise HumanSeedsError(f"{origin} must be a mapping, got {type(data).__name__}")
    try:
        seeds = HumanSeeds.model_validate(data)
    except ValidationError as err:
        problems = "\n".join(
            f"  - {'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
            for e in err.errors()
        )
        raise HumanSeedsError(f"invalid PT-ALIGN seed file {origin}:\n{problems}") from None
    if max_items is not None and seeds.items > max_items:
        raise HumanSeedsError(
            f"{origin} holds {seeds.items} human-written items, more than "
            f"pt_align.max_human_items={max_items}: PT-ALIGN starts from fewer than 50"
        )
    return seeds
