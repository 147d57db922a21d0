"""Stage ``positive``: a harmless, still helpful answer for every red-team instruction.

PT-ALIGN (docs/design.md 2.2 step 3): the model drafts an answer under the human-written positive
constraints (a system prompt listing them, the domain's demonstrations as few-shot turns with
their positive answers), then runs ``pt_align.critique_rounds`` rounds of critique-and-revise: a
critique chat asks what in the answer breaks the rules (or "OK"), a revise chat asks for the
answer rewritten to fix that critique. An item whose critique says OK complies and stops revising;
an empty revision keeps the previous answer. Every step is one batched round through the engine
pool for all items still revising. The trained-on text is the bare instruction: the constraints
only shape the answer.

With ``pt_align.positive_prefill`` set, each item gets one more candidate (``prefilled``; the only
one with ``pt_align.guided_positive`` off, which skips the guided draft and its rounds): the
same guided chat with the answer opened by the prefill (e.g. "I'm sorry, but I can't"), the
model writing the rest, as the Self-MOA loop samples its refusals (stages/sample.py). A 135M
model's guided draft often complies anyway; the prefilled one declines in the model's own words.
The filter keeps the most helpful candidate judged safe (stages/pt_filter.py).

A benign twin (``kind="benign"``, stages/instructions.py) gets none of this: its positive answer is
the policy's own answer to the bare request, the behaviour training should keep.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from selfmoa_ray.config import EngineSection, ModelSection, PTAlignSection
from selfmoa_ray.rundir import RunDir, write_parquet
from selfmoa_ray.schema import BENIGN_KIND, HARMFUL_KIND
from selfmoa_ray.sources.human_seeds import HumanSeeds
from selfmoa_ray.stages.pt_prompts import (
    CRITIQUE,
    POSITIVE_SYSTEM,
    REVISE,
    Chat,
    Generate,
    clean_answer,
    draft_round,
    fewshot_chat,
    numbered,
    one_line,
    pool_generator,
    prefilled_round,
    user,
)

log = logging.getLogger(__name__)

POSITIVE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("domain", pa.string()),
        ("topic", pa.string()),
        ("text", pa.string()),  # the bare instruction
        ("positive", pa.string()),  # the final answer
        ("positive_draft", pa.string()),
        ("revisions", pa.int64()),  # revisions applied
        ("critiques", pa.list_(pa.string())),
        ("prefilled", pa.string()),  # the prefill and the model's rest; null without a prefill
        ("kind", pa.string()),  # "harmful" | "benign"
    ]
)

_OK = re.compile(r"^ok\b", re.I)


@dataclass
class PositiveItem:
    """One instruction's positive answer as it goes through the critique-and-revise rounds."""

    id: str
    domain: str
    topic: str
    text: str
    draft: str = ""
    answer: str = ""
    revisions: int = 0
    critiques: list[str] = field(default_factory=list)
    complies: bool = False  # a critique said OK: no more revising
    prefilled: str | None = None
    kind: str = HARMFUL_KIND

    def row(self) -> dict[str, Any]:
        return {
            "id": self.id, "domain": self.domain, "topic": self.topic, "text": self.text,
            "positive": self.answer, "positive_draft": self.draft, "revisions": self.revisions,
            "critiques": list(self.critiques), "prefilled": self.prefilled, "kind": self.kind,
        }  # fmt: skip


def critique_says_ok(critique: str) -> bool:
    """True when a cleaned critique starts with the word OK (case-insensitive): nothing to fix."""
    return bool(_OK.match(clean_answer(critique).lstrip("*\"'`# ")))


def record_critique(item: PositiveItem, critique: str) -> bool:
    """Keep the critique; return True when the item still needs a revision."""
    critique = clean_answer(critique)
    item.critiques.append(critique)
    if critique_says_ok(critique):
        item.complies = True
        return False
    return True


def record_revision(item: PositiveItem, revision: str) -> bool:
    """Apply a revision unless it is empty (then the previous answer stays); True if applied."""
    revision = clean_answer(revision)
    if not revision:
        return False
    item.answer = revision
    item.revisions += 1
    return True


def critique_chat(rules: str, item: PositiveItem) -> Chat:
    return user(CRITIQUE.format(rules=rules, instruction=one_line(item.text),
                                answer=one_line(item.answer)))  # fmt: skip


def revise_chat(rules: str, item: PositiveItem, critique: str) -> Chat:
    return user(REVISE.format(rules=rules, instruction=one_line(item.text),
                              answer=one_line(item.answer), critique=one_line(critique)))  # fmt: skip


def harmful_answers(
    items: Sequence[PositiveItem], seeds: HumanSeeds, rounds: int, generate: Generate, seed: int,
    prefill: str | None, guided: bool = True,
) -> None:  # fmt: skip
    """When ``guided``: the draft, then ``rounds`` critique-and-revise rounds (two generation calls
    per round for the items still revising, one for the drafts); with ``prefill``, one more call
    for the prefilled candidates under the same system prompt and demonstrations."""
    rules = numbered(seeds.positive_constraints)
    system = POSITIVE_SYSTEM.format(rules=rules)
    if guided:
        drafts = draft_round(items, system, seeds, "positive", generate, seed)
        for item in items:
            item.draft = item.answer = clean_answer(drafts.get(item.id, ""))
    for r in range(rounds if guided else 0):
        active = [i for i in items if not i.complies]
        if not active:
            break
        critiques = generate({i.id: critique_chat(rules, i) for i in active}, seed + 1 + 2 * r)
        to_revise = [i for i in active if record_critique(i, critiques.get(i.id, ""))]
        revisions = generate(
            {i.id: revise_chat(rules, i, i.critiques[-1]) for i in to_revise}, seed + 2 + 2 * r
        ) if to_revise else {}  # fmt: skip
        for item in to_revise:
            record_revision(item, revisions.get(item.id, ""))
    if prefill:
        chats = {i.id: fewshot_chat(system, seeds.demonstrations_for(i.domain), "positive", i.text)
                 for i in items}  # fmt: skip
        opened = prefilled_round(chats, prefill, generate, seed + 1 + 2 * rounds)
        for item in items:
            item.prefilled = opened[item.id]


def own_answers(items: Sequence[PositiveItem], generate: Generate, seed: int) -> None:
    """The policy's own answer to each bare request (benign twins), in one generation call."""
    answers = generate({i.id: user(i.text) for i in items}, seed)
    for item in items:
        item.draft = item.answer = clean_answer(answers.get(item.id, ""))


def positive_items(
    instruction_rows: Sequence[Mapping[str, Any]],
    seeds: HumanSeeds,
    rounds: int,
    generate: Generate,
    seed: int,
    prefill: str | None = None,
    guided: bool = True,
) -> list[PositiveItem]:
    """:func:`harmful_answers` for the harmful instructions, the policy's own answers for the
    benign twins (after them, one more call). Items come back in id order."""
    items = [
        PositiveItem(
            r["id"], r["domain"], r["topic"], r["text"], kind=r.get("kind") or HARMFUL_KIND
        )
        for r in sorted(instruction_rows, key=lambda r: r["id"])
    ]
    harmful = [i for i in items if i.kind != BENIGN_KIND]
    if harmful:
        harmful_answers(harmful, seeds, rounds, generate, seed, prefill, guided)
    twins = [i for i in items if i.kind == BENIGN_KIND]
    if twins:
        own_answers(twins, generate, seed + 2 + 2 * rounds)
    return items


def positive(
    run: RunDir,
    *,
    stage: str,
    instructions: str,
    out: str,
    seeds: HumanSeeds,
    section: PTAlignSection,
    model: ModelSection,
    engine: EngineSection,
    seed: int,
) -> dict[str, Any]:
    """Run (or skip, if done) the positive stage: ``instructions`` in, ``out`` (Parquet) written."""

    def work() -> dict[str, Any]:
        rows = pq.read_table(run.path(instructions)).to_pylist()
        generate = pool_generator(model, engine, section)
        items = positive_items(rows, seeds, section.critique_rounds, generate, seed,
                               section.positive_prefill, section.guided_positive)  # fmt: skip
        write_parquet(
            run.path(out), pa.Table.from_pylist([i.row() for i in items], schema=POSITIVE_SCHEMA)
        )
        summary = {
            "rows": len(items),
            "revised": sum(i.revisions > 0 for i in items),
            "stopped_ok": sum(i.complies for i in items),
            "revisions": sum(i.revisions for i in items),
            "prefilled": sum(i.prefilled is not None for i in items),
            "benign": sum(i.kind == BENIGN_KIND for i in items),
            "guided": sum(i.kind != BENIGN_KIND and bool(i.answer) for i in items),
        }
        log.info("positive: %d answers, %d revised, %d judged OK by their critique",
                 summary["rows"], summary["revised"], summary["stopped_ok"])  # fmt: skip
        return summary

    return run.run_stage(stage, [out], work)
