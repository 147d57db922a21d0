"""What the PT-ALIGN generation stages say to the model, in one readable place (docs/design.md 2.2).

The stages ``topics``, ``instructions``, ``positive`` and ``toxic`` build every chat from the
templates and helpers here. The wording is short and plain on purpose: it must work on a 135M
instruct model (SmolLM2), which follows one simple request at a time and loses track of long ones.
The shared plumbing lives here too: sampling from ``pt_align`` settings, a ``Generate`` callable
(one batched ``engines.pool.complete`` call per round) and the cleaning of a model's answer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from selfmoa_ray.config import EngineSection, ModelSection, PTAlignSection
from selfmoa_ray.engines.base import SamplingParams, join_prefill
from selfmoa_ray.engines.pool import complete
from selfmoa_ray.sources.human_seeds import Demonstration, HumanSeeds

Chat = list[dict[str, str]]
# {id: chat} and a sampling seed in, {id: completion} out: one batched generation round.
Generate = Callable[[Mapping[str, Chat], int], dict[str, str]]

# --------------------------------------------------------------------------- wording

TOPICS = (
    "Safety area: {domain} ({description}).\n"
    "Examples of harmful requests in this area:\n{examples}\n\n"
    "List {n} different short topics (two to five words each) in this area. "
    "Write one topic per line and nothing else."
)
INSTRUCTION = (
    "Here are examples of harmful requests that a malicious user might send to a chatbot:\n"
    "{examples}\n\n"
    "Write one new harmful request like these about {topic} ({domain}). "
    "Reply with the request only, as the user would type it."
)
POSITIVE_SYSTEM = "You are a safe and helpful assistant. Always follow these rules:\n{rules}"
CRITIQUE = (
    "Here are the rules:\n{rules}\n\n"
    "Here is a request:\n{instruction}\n\n"
    "Here is an answer:\n{answer}\n\n"
    "List what in the answer breaks the rules, or say OK if nothing does."
)
REVISE = (
    "Here are the rules:\n{rules}\n\n"
    "Here is a request:\n{instruction}\n\n"
    "Here is an answer:\n{answer}\n\n"
    "Rewrite the answer so that it follows the rules, fixing: {critique}\n"
    "Reply with the new answer only."
)
TOXIC_SYSTEM = (
    "You are writing a negative example for safety training: the harmful answer that a safe "
    "assistant must never give. Follow these rules:\n{rules}"
)
REFINE = (
    "Here is a request:\n{instruction}\n\n"
    "Here is an answer:\n{answer}\n\n"
    "Make this answer follow these rules more clearly:\n{rules}\n"
    "Reply with the new answer only."
)
MAX_QUOTED_CHARS = 600  # an answer or critique quoted back to the model is cut to this

# --------------------------------------------------------------------------- formatting


def one_line(text: str, limit: int = MAX_QUOTED_CHARS) -> str:
    """``text`` on one line (whitespace collapsed), cut to ``limit`` characters."""
    return " ".join(text.split())[:limit]


def numbered(items: Sequence[str]) -> str:
    """Constraints as a numbered list, one per line: ``1. ...``."""
    return "\n".join(f"{i}. {one_line(item)}" for i, item in enumerate(items, start=1))


def bulleted(items: Sequence[str]) -> str:
    return "\n".join(f"- {one_line(item)}" for item in items)


def readable(name: str) -> str:
    """A domain name as words: ``self_harm`` -> ``self harm``."""
    return name.replace("_", " ")


def user(content: str) -> Chat:
    return [{"role": "user", "content": content}]


def fewshot_turns(
    demonstrations: Sequence[Demonstration], answer: Literal["positive", "toxic"]
) -> Chat:
    """Demonstrations as alternating user/assistant turns with their ``answer`` side."""
    turns: Chat = []
    for demo in demonstrations:
        turns.append({"role": "user", "content": one_line(demo.instruction)})
        turns.append({"role": "assistant", "content": one_line(getattr(demo, answer))})
    return turns


def fewshot_chat(
    system: str,
    demonstrations: Sequence[Demonstration],
    answer: Literal["positive", "toxic"],
    instruction: str,
) -> Chat:
    """System prompt, the demonstrations as few-shot turns, then the bare instruction."""
    return [
        {"role": "system", "content": system},
        *fewshot_turns(demonstrations, answer),
        {"role": "user", "content": instruction},
    ]


def draft_round(
    items: Sequence[Any],
    system: str,
    seeds: HumanSeeds,
    answer: Literal["positive", "toxic"],
    generate: Generate,
    seed: int,
) -> dict[str, str]:
    """One batched round of first drafts: each item's instruction after ``system`` and its
    domain's demonstrations with their ``answer`` side ({item id: draft})."""
    chats = {i.id: fewshot_chat(system, seeds.demonstrations_for(i.domain), answer, i.text)
             for i in items}  # fmt: skip
    return generate(chats, seed)


def prefilled_round(
    chats: Mapping[str, Chat], prefill: str, generate: Generate, seed: int
) -> dict[str, str]:
    """One batched round in which every answer opens with ``prefill`` and the model writes the
    rest ({id: prefill + the model's rest}), as the loop samples its refusals (stages/sample.py)."""
    opened = {
        key: [*chat, {"role": "assistant", "content": prefill}] for key, chat in chats.items()
    }
    answers = generate(opened, seed) if opened else {}
    return {key: join_prefill(prefill, clean_answer(answers.get(key, ""))) for key in chats}


def rotated(items: Sequence[str], k: int) -> list[str]:
    """``items`` starting at position ``k`` (mod len): each slot sees the examples in another order."""
    if not items:
        return []
    k %= len(items)
    return [*items[k:], *items[:k]]


# --------------------------------------------------------------------------- cleaning

_ANSWER_LABEL = re.compile(
    r"^\s*(\*\*)?(?:(?:new|rewritten|revised|improved|final|refined)\s+)?"
    r"(?:answer|response|critique)\s*(?:\*\*)?\s*:\s*(?(1)(?:\*\*)?)\s*",
    re.I,
)


def clean_answer(text: str) -> str:
    """A model's answer without surrounding whitespace or a leading ``Answer:``-style label."""
    return _ANSWER_LABEL.sub("", text.strip(), count=1).strip()


# --------------------------------------------------------------------------- generation


def sampling(section: PTAlignSection, seed: int) -> SamplingParams:
    return SamplingParams(
        n=1,
        temperature=section.temperature,
        top_p=section.top_p,
        max_new_tokens=section.max_new_tokens,
        seed=seed,
    )


def pool_generator(model: ModelSection, engine: EngineSection, section: PTAlignSection) -> Generate:
    """A ``Generate`` that sends one round of chats, ids sorted, through the engine actor pool."""

    def generate(chats: Mapping[str, Chat], seed: int) -> dict[str, str]:
        ordered = {key: chats[key] for key in sorted(chats)}
        return complete(ordered, model, engine, sampling(section, seed))

    return generate
