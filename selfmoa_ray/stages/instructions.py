"""Stage ``instructions``: the model writes red-team instructions for every topic.

PT-ALIGN (design.md 2.2 step 2, "dedup as above"): each topic of ``stages/topics.py`` gets
``pt_align.instructions_per_topic`` slots; each slot asks the model for one request a malicious
user would write, with the domain's demonstration instructions as few-shot examples (rotated per
slot, so that the slots of a topic do not all see the same prompt). All slots go through the
engine pool in one round. A completion is cleaned like a red-team attack
(``redteam.clean_completion``) and dropped when it is a refusal, too short, off topic (too few of
its content words come from the topic, the domain's description or its demonstrations:
``pt_align.min_topic_overlap``), or an exact or near duplicate (``pt_align.dedup``) of another
instruction, a demonstration or an ``exclude`` text (the recipe passes the held-out evaluation
prompts, so that no evaluation prompt is ever trained on). A failed slot gets one more chance: a
second round, with another seed and example order, for all failed slots together; what fails
again is dropped, counted by reason. Kept instructions are renumbered ``pt-NNNNN`` in slot order.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from selfmoa_ray.config import EngineSection, ModelSection, PTAlignSection
from selfmoa_ray.evaluators.refusal import is_refusal
from selfmoa_ray.rundir import RunDir, write_parquet
from selfmoa_ray.sources.dedup import Deduplicator
from selfmoa_ray.sources.human_seeds import HumanSeeds
from selfmoa_ray.stages.pt_prompts import (
    INSTRUCTION,
    Chat,
    Generate,
    bulleted,
    pool_generator,
    readable,
    rotated,
    user,
)
from selfmoa_ray.stages.redteam import clean_completion, topic_overlap

log = logging.getLogger(__name__)

DROP_REASONS = ("refusal", "too_short", "off_topic", "duplicate", "eval_overlap")
FEW_SHOT = 3  # demonstration instructions shown per slot

INSTRUCTION_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # "pt-NNNNN"
        ("domain", pa.string()),
        ("topic", pa.string()),
        ("topic_id", pa.string()),
        ("text", pa.string()),
    ]
)


@dataclass(frozen=True)
class Slot:
    """One instruction to write: its topic, the examples shown and what it must stay on topic of."""

    id: str  # "<topic_id>/<k>": sorts in topic order
    topic_id: str
    domain: str
    topic: str
    examples: tuple[str, ...]
    references: tuple[str, ...]
    k: int

    def chat(self, attempt: int) -> Chat:
        """The request for this slot; a retry (``attempt`` 1) shows the examples in another order."""
        shown = rotated(self.examples, self.k + attempt)[:FEW_SHOT]
        return user(
            INSTRUCTION.format(
                examples=bulleted(shown), topic=self.topic, domain=readable(self.domain)
            )
        )


def plan_slots(
    topic_rows: Sequence[Mapping[str, Any]], seeds: HumanSeeds, per_topic: int
) -> list[Slot]:
    """``per_topic`` slots for each topic row, in topic id order."""
    descriptions = {d.name: d.description for d in seeds.domains}
    slots: list[Slot] = []
    for row in sorted(topic_rows, key=lambda r: r["id"]):
        examples = tuple(d.instruction for d in seeds.demonstrations_for(row["domain"]))
        references = (row["topic"], descriptions.get(row["domain"], ""), *examples)
        for k in range(per_topic):
            slots.append(
                Slot(f"{row['id']}/{k:03d}", row["id"], row["domain"], row["topic"],
                     examples, references, k)
            )  # fmt: skip
    return slots


def check_instruction(
    completion: str, references: Sequence[str], min_overlap: float
) -> tuple[str | None, str]:
    """A completion as an instruction, or None and why not (refusal, too_short, off_topic)."""
    text = clean_completion(completion)
    if text is None:
        return None, "refusal" if is_refusal(completion) else "too_short"
    if topic_overlap(text, references) < min_overlap:
        return None, "off_topic"
    return text, "kept"


def screen(
    slots: Sequence[Slot],
    completions: Mapping[str, str],
    dedup: Deduplicator,
    excluded: set[str],
    min_overlap: float,
) -> tuple[dict[str, str], dict[str, str]]:
    """(kept {slot id: text}, failed {slot id: reason}) for one round, in slot order; kept texts
    join the deduplicator's history. A duplicate of an ``excluded`` text is ``eval_overlap``."""
    kept: dict[str, str] = {}
    failed: dict[str, str] = {}
    for slot in slots:
        text, reason = check_instruction(completions.get(slot.id, ""), slot.references, min_overlap)
        if text is not None:
            decision = dedup.filter([text])[0]
            if decision.keep:
                kept[slot.id] = text
                continue
            reason = "eval_overlap" if decision.match in excluded else "duplicate"
        failed[slot.id] = reason
    return kept, failed


def collect_instructions(
    slots: Sequence[Slot],
    generate: Generate,
    dedup: Deduplicator,
    excluded: set[str],
    min_overlap: float,
    seed: int,
) -> tuple[dict[str, str], Counter[str], int]:
    """Two rounds: all slots, then the failed ones again with ``seed + 1``. Returns the kept
    {slot id: text}, the final drop reasons, and how many slots were retried."""
    first = generate({s.id: s.chat(0) for s in slots}, seed)
    kept, failed = screen(slots, first, dedup, excluded, min_overlap)
    retry = [s for s in slots if s.id in failed]
    second = generate({s.id: s.chat(1) for s in retry}, seed + 1) if retry else {}
    recovered, dropped = screen(retry, second, dedup, excluded, min_overlap)
    kept |= recovered
    return kept, Counter(dropped.values()), len(retry)


def instruction_rows(slots: Sequence[Slot], kept: Mapping[str, str]) -> list[dict[str, Any]]:
    """Kept instructions in slot order, renumbered ``pt-NNNNN``."""
    rows = []
    for slot in sorted(slots, key=lambda s: s.id):
        if slot.id in kept:
            rows.append(
                {"id": f"pt-{len(rows):05d}", "domain": slot.domain, "topic": slot.topic,
                 "topic_id": slot.topic_id, "text": kept[slot.id]}
            )  # fmt: skip
    return rows


def make_deduplicator(
    section: PTAlignSection, seeds: HumanSeeds, exclude: Sequence[str]
) -> tuple[Deduplicator, set[str]]:
    """A deduplicator that knows the excluded texts and the demonstrations; the excluded set."""
    dedup = Deduplicator(section.dedup.threshold, section.dedup.ngram, section.dedup.unit)
    dedup.add_history(exclude)
    dedup.add_history(d.instruction for d in seeds.demonstrations)
    return dedup, set(exclude)


def instructions(
    run: RunDir,
    *,
    stage: str,
    topics: str,
    out: str,
    seeds: HumanSeeds,
    section: PTAlignSection,
    model: ModelSection,
    engine: EngineSection,
    seed: int,
    exclude: Sequence[str] = (),
) -> dict[str, Any]:
    """Run (or skip, if done) the instructions stage: ``topics`` in, ``out`` (Parquet) written."""

    def work() -> dict[str, Any]:
        topic_rows = pq.read_table(run.path(topics)).to_pylist()
        slots = plan_slots(topic_rows, seeds, section.instructions_per_topic)
        dedup, excluded = make_deduplicator(section, seeds, exclude)
        generate = pool_generator(model, engine, section)
        kept, dropped, retried = collect_instructions(
            slots, generate, dedup, excluded, section.min_topic_overlap, seed
        )
        rows = instruction_rows(slots, kept)
        write_parquet(run.path(out), pa.Table.from_pylist(rows, schema=INSTRUCTION_SCHEMA))
        summary = {
            "instructions": len(rows),
            "slots": len(slots),
            "retried": retried,
            "recovered": retried - sum(dropped.values()),
            "dropped": {reason: dropped[reason] for reason in DROP_REASONS},
        }
        log.info("instructions: %d of %d slots (%d retried), dropped %s",
                 len(rows), len(slots), retried, summary["dropped"])  # fmt: skip
        return summary

    return run.run_stage(stage, [out], work)
