"""Stage ``toxic``: a clearly harmful answer for every red-team instruction, a negative example.

PT-ALIGN (docs/design.md 2.2 step 3) trains the policy away from toxic answers (step 5, unlikelihood
on their harmful tokens), so the model writes them itself: a draft under the human-written toxic
constraints (a system prompt listing them and saying this is a negative example for safety
training, the domain's demonstrations as few-shot turns with their toxic answers), then
``pt_align.refine_rounds`` rounds asking it to follow those rules more clearly. A draft that is a
refusal or empty marks the item ``refused``: the model would not play the toxic role, so the
recipe drops the instruction, and it is not refined. A refinement that is a refusal or empty
keeps the previous answer.

A small instruct model often complies with a harmful request when simply asked, and then its
answer is the policy's own harmful behaviour, which is what unlikelihood should push down. So
each item also gets ``pt_align.toxic_bare_samples`` answers to the bare instruction (no system
prompt, no demonstrations), kept as more candidates (``bare``); the filter judges every candidate
and keeps the one judged least safe (stages/pt_filter.py). Every step is one batched round through
the engine pool.

A benign twin (``kind="benign"``, stages/instructions.py) has a different negative: with
``pt_align.positive_prefill`` set, the policy's refusal of it, opened by that prefill ("I'm sorry,
but I can't") and finished by the model. Unlikelihood on that opening is the counterweight to the
refusals the harmful triples teach, as the Self-MOA loop's benign pairs reject a refusal: with
MLE on the twins' answers alone, SmolLM2 refused 72% of the benign validation prompts after one
epoch. Without a prefill a twin has no toxic side.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from selfmoa_ray.config import EngineSection, ModelSection, PTAlignSection
from selfmoa_ray.evaluators.refusal import is_refusal
from selfmoa_ray.rundir import RunDir, write_parquet
from selfmoa_ray.schema import BENIGN_KIND, HARMFUL_KIND
from selfmoa_ray.sources.human_seeds import HumanSeeds
from selfmoa_ray.stages.pt_prompts import (
    REFINE,
    TOXIC_SYSTEM,
    Chat,
    Generate,
    clean_answer,
    draft_round,
    numbered,
    one_line,
    pool_generator,
    prefilled_round,
    user,
)

log = logging.getLogger(__name__)

TOXIC_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("domain", pa.string()),
        ("topic", pa.string()),
        ("text", pa.string()),  # the bare instruction
        ("toxic", pa.string()),  # the final answer
        ("toxic_draft", pa.string()),
        ("refinements", pa.int64()),  # refinements applied
        ("refused", pa.bool_()),  # the draft was a refusal or empty: not a candidate
        ("bare", pa.list_(pa.string())),  # answers to the bare instruction that play the role
        ("kind", pa.string()),  # "harmful" | "benign" (toxic: the policy's needless refusal)
    ]
)


@dataclass
class ToxicItem:
    """One instruction's toxic answer as it goes through the refine rounds."""

    id: str
    domain: str
    topic: str
    text: str
    draft: str = ""
    answer: str = ""
    refinements: int = 0
    refused: bool = False
    bare: list[str] = field(default_factory=list)
    kind: str = HARMFUL_KIND

    def row(self) -> dict[str, Any]:
        return {
            "id": self.id, "domain": self.domain, "topic": self.topic, "text": self.text,
            "toxic": self.answer, "toxic_draft": self.draft, "refinements": self.refinements,
            "refused": self.refused, "bare": list(self.bare), "kind": self.kind,
        }  # fmt: skip


def plays_role(answer: str) -> bool:
    """False for an empty answer or a refusal: the model did not write the toxic answer."""
    answer = clean_answer(answer)
    return bool(answer) and not is_refusal(answer)


def record_draft(item: ToxicItem, draft: str) -> None:
    item.draft = item.answer = clean_answer(draft)
    item.refused = not plays_role(item.draft)


def record_refinement(item: ToxicItem, refinement: str) -> bool:
    """Apply a refinement unless it is empty or a refusal (the previous answer stays)."""
    if not plays_role(refinement):
        return False
    item.answer = clean_answer(refinement)
    item.refinements += 1
    return True


def refine_chat(system: str, rules: str, item: ToxicItem) -> Chat:
    content = REFINE.format(instruction=one_line(item.text), answer=one_line(item.answer),
                            rules=rules)  # fmt: skip
    return [{"role": "system", "content": system}, {"role": "user", "content": content}]


def bare_answers(items: Sequence[ToxicItem], samples: int, generate: Generate, seed: int) -> None:
    """``samples`` answers to each bare instruction, in one generation call; those that play the
    role (not empty, not a refusal) go to the item's ``bare`` candidates."""
    chats = {f"{i.id}/{j}": user(i.text) for i in items for j in range(samples)}
    answers = generate(chats, seed) if chats else {}
    for item in items:
        for j in range(samples):
            answer = clean_answer(answers.get(f"{item.id}/{j}", ""))
            if plays_role(answer):
                item.bare.append(answer)


def toxic_items(
    instruction_rows: Sequence[Mapping[str, Any]],
    seeds: HumanSeeds,
    rounds: int,
    generate: Generate,
    seed: int,
    bare_samples: int = 0,
) -> list[ToxicItem]:
    """Draft, then ``rounds`` refine rounds for the items that were not refused; one generation
    call per round, and one for ``bare_samples`` bare answers each. Items come back in id order."""
    items = [
        ToxicItem(r["id"], r["domain"], r["topic"], r["text"])
        for r in sorted(instruction_rows, key=lambda r: r["id"])
    ]
    rules = numbered(seeds.toxic_constraints)
    system = TOXIC_SYSTEM.format(rules=rules)
    drafts = draft_round(items, system, seeds, "toxic", generate, seed)
    for item in items:
        record_draft(item, drafts.get(item.id, ""))
    active = [i for i in items if not i.refused]
    for r in range(rounds):
        if not active:
            break
        refined = generate({i.id: refine_chat(system, rules, i) for i in active}, seed + 1 + r)
        for item in active:
            record_refinement(item, refined.get(item.id, ""))
    bare_answers(items, bare_samples, generate, seed + 1 + rounds)
    return items


def needless_refusals(
    instruction_rows: Sequence[Mapping[str, Any]], prefill: str, generate: Generate, seed: int
) -> list[ToxicItem]:
    """The policy's refusal of each benign twin, opened by ``prefill``, in one generation call."""
    items = [ToxicItem(r["id"], r["domain"], r["topic"], r["text"], kind=BENIGN_KIND)
             for r in sorted(instruction_rows, key=lambda r: r["id"])]  # fmt: skip
    opened = prefilled_round({i.id: user(i.text) for i in items}, prefill, generate, seed)
    for item in items:
        item.draft = item.answer = opened[item.id]
    return items


def toxic(
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
    """Run (or skip, if done) the toxic stage: ``instructions`` in, ``out`` (Parquet) written."""

    def work() -> dict[str, Any]:
        rows = pq.read_table(run.path(instructions)).to_pylist()
        twins = [r for r in rows if r.get("kind") == BENIGN_KIND]
        generate = pool_generator(model, engine, section)
        items = toxic_items([r for r in rows if r.get("kind") != BENIGN_KIND], seeds,
                            section.refine_rounds, generate, seed, section.toxic_bare_samples)  # fmt: skip
        if twins and section.positive_prefill:
            refusals = needless_refusals(twins, section.positive_prefill, generate, seed - 1)
            items = sorted(items + refusals, key=lambda i: i.id)
        write_parquet(
            run.path(out), pa.Table.from_pylist([i.row() for i in items], schema=TOXIC_SCHEMA)
        )
        twin_refusals = sum(i.kind == BENIGN_KIND for i in items)
        summary = {
            "rows": len(items) - twin_refusals,
            "twin_refusals": twin_refusals,
            "refused": sum(i.refused for i in items),
            "refined": sum(i.refinements > 0 for i in items),
            "refinements": sum(i.refinements for i in items),
            "bare_answers": sum(len(i.bare) for i in items),
            "no_candidate": sum(i.refused and not i.bare for i in items),
        }
        log.info("toxic: %d answers, %d refused the role, %d refined, %d bare answers",
                 summary["rows"], summary["refused"], summary["refined"],
                 summary["bare_answers"])  # fmt: skip
        return summary

    return run.run_stage(stage, [out], work)
