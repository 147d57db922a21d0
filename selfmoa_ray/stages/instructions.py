"""Stage ``instructions``: red-team instructions for every topic.

PT-ALIGN (docs/design.md 2.2 step 2, "dedup as above"): each topic of ``stages/topics.py`` gets
``pt_align.instructions_per_topic`` slots, filled by one of two writers
(``pt_align.instruction_writer``):

* ``template`` (default): the seed file's human-written ``instruction_templates``, rotated over
  the slots, with the slot's topic in their ``{topic}`` slot. SmolLM2-135M wrote a usable request
  for 5% (chat) to 19% (list continuation) of the slots and almost none on the slot's topic
  (benchmarks/README.md, "PT-ALIGN instruction writers"), so the request's shape comes from the
  human and its topic from the model or the domain's description. Duplicates are dropped as
  below; nothing is retried.
* ``chat``: each slot asks the model for one request a malicious
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

Benign twins (``pt_align.benign_per_topic``): each topic also gets that many slots filled with
the seed file's ``benign_templates`` ("What are the warning signs of {topic}?"), rows of
``kind="benign"`` after the harmful ones. Their positive answer is the policy's own
(stages/positive.py), their negative its prefilled refusal (stages/toxic.py): training on refusals
alone taught SmolLM2 to refuse 78% of the benign validation prompts as soon as it refused 78% of
the attacks.
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
from selfmoa_ray.schema import BENIGN_KIND, HARMFUL_KIND
from selfmoa_ray.sources.dedup import Deduplicator
from selfmoa_ray.sources.generated_requests import clean_completion, topic_overlap
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
        ("kind", pa.string()),  # "harmful" | "benign" (a benign twin)
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


def fill_templates(
    slots: Sequence[Slot],
    templates: Sequence[str],
    dedup: Deduplicator,
    excluded: set[str],
    missing: str = "pt_align.instruction_writer=template needs instruction_templates in the seed "
    "file (pt_align.seeds); add some, or set pt_align.instruction_writer=chat",
) -> tuple[dict[str, str], dict[str, str]]:
    """The ``template`` writer: slot ``i`` (in id order) takes template ``i`` (mod their count)
    with its topic; a duplicate, or a near copy of an excluded text, is dropped. Returns (kept
    {slot id: text}, failed {slot id: reason}); no templates is an error saying ``missing``."""
    if not templates:
        raise ValueError(missing)
    texts = {
        slot.id: templates[i % len(templates)].format(topic=slot.topic)
        for i, slot in enumerate(sorted(slots, key=lambda s: s.id))
    }
    return screen(slots, texts, dedup, excluded, min_overlap=0.0)


def instruction_rows(
    slots: Sequence[Slot], kept: Mapping[str, str], kind: str = HARMFUL_KIND, start: int = 0
) -> list[dict[str, Any]]:
    """Kept instructions in slot order, renumbered ``pt-NNNNN`` from ``start``."""
    rows = []
    for slot in sorted(slots, key=lambda s: s.id):
        if slot.id in kept:
            rows.append(
                {"id": f"pt-{start + len(rows):05d}", "domain": slot.domain, "topic": slot.topic,
                 "topic_id": slot.topic_id, "text": kept[slot.id], "kind": kind}
            )  # fmt: skip
    return rows


def benign_twins(
    topic_rows: Sequence[Mapping[str, Any]],
    seeds: HumanSeeds,
    per_topic: int,
    dedup: Deduplicator,
    excluded: set[str],
    start: int,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``per_topic`` benign twins per topic (rows numbered from ``start``) and their summary."""
    slots = plan_slots(topic_rows, seeds, per_topic)
    kept, failed = fill_templates(
        slots, seeds.benign_templates, dedup, excluded,
        missing="pt_align.benign_per_topic needs benign_templates in the seed file "
        "(pt_align.seeds); add some, or set pt_align.benign_per_topic=0",
    )  # fmt: skip
    rows = instruction_rows(slots, kept, BENIGN_KIND, start)
    dropped = Counter(failed.values())
    return rows, {"instructions": len(rows), "slots": len(slots),
                  "dropped": {reason: dropped[reason] for reason in DROP_REASONS}}  # fmt: skip


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
        if section.instruction_writer == "template":
            kept, failed = fill_templates(slots, seeds.instruction_templates, dedup, excluded)
            dropped, retried, recovered = Counter(failed.values()), 0, 0
        else:
            generate = pool_generator(model, engine, section)
            kept, dropped, retried = collect_instructions(
                slots, generate, dedup, excluded, section.min_topic_overlap, seed
            )
            recovered = retried - sum(dropped.values())  # every final drop was retried
        rows = instruction_rows(slots, kept)
        benign, benign_summary = ([], None) if not section.benign_per_topic else benign_twins(
            topic_rows, seeds, section.benign_per_topic, dedup, excluded, start=len(rows)
        )  # fmt: skip
        rows += benign
        write_parquet(run.path(out), pa.Table.from_pylist(rows, schema=INSTRUCTION_SCHEMA))
        summary = {
            "writer": section.instruction_writer,
            "instructions": len(rows) - len(benign),
            "slots": len(slots),
            "retried": retried,
            "recovered": recovered,
            "dropped": {reason: dropped[reason] for reason in DROP_REASONS},
            "benign": benign_summary,
        }
        log.info("instructions: %d of %d slots (%d retried), dropped %s; %d benign twins",
                 summary["instructions"], len(slots), retried, summary["dropped"],
                 len(benign))  # fmt: skip
        return summary

    return run.run_stage(stage, [out], work)
