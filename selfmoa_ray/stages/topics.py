"""Stage ``topics``: the model lists harm topics for each human-written safety domain.

PT-ALIGN (docs/design.md 2.2 step 2) starts from a handful of human-written domains and lets the model
expand them: first into topics (this stage), then into red-team instructions per topic
(``stages/instructions.py``). One chat per domain asks for ``pt_align.topics_per_domain`` short
topics, with the domain's demonstrations as examples of the kind of harm; all domains go through
the engine pool in one round. The reply is parsed line by line (numbering and bullets stripped);
empty, too long, preamble and duplicate lines are dropped, and so are topics off the domain (too
few of their content words in the domain's description or demonstrations:
``pt_align.min_topic_overlap``; SmolLM2-135M answered "Brazil" for violence). A small model
often gives too few usable lines, so each domain is filled up to exactly ``topics_per_domain``
with fallback topics from the domain's human-written description (a comma-separated list of
sub-topics), recorded as ``source="fallback"``.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa

from selfmoa_ray.config import EngineSection, ModelSection, PTAlignSection
from selfmoa_ray.evaluators.refusal import is_refusal
from selfmoa_ray.rundir import RunDir, write_parquet
from selfmoa_ray.sources.dedup import normalize
from selfmoa_ray.sources.generated_requests import topic_overlap
from selfmoa_ray.sources.human_seeds import Domain, HumanSeeds
from selfmoa_ray.stages.pt_prompts import (
    TOPICS,
    Chat,
    Generate,
    bulleted,
    pool_generator,
    readable,
    user,
)

log = logging.getLogger(__name__)

GENERATED, FALLBACK = "generated", "fallback"
MAX_TOPIC_WORDS = 8
MAX_TOPIC_CHARS = 80
# Extra angles on a sub-topic when the description lists fewer sub-topics than needed.
FALLBACK_ANGLES = ("methods", "tools", "hiding it", "online", "against a specific person")

TOPIC_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # "<domain>-NN"
        ("domain", pa.string()),
        ("topic", pa.string()),
        ("source", pa.string()),  # "generated" | "fallback"
    ]
)

_BULLET = re.compile(r"^\s*(?:[-*•+#>]+|\(?\d{1,2}\s*[.):\]-])\s*")
_LABEL = re.compile(r"^(?:\*\*)?topic(?:\s*\d+)?\s*(?:\*\*)?\s*:\s*", re.I)
_PREAMBLE = re.compile(r"^(?:sure|here (?:are|is)|of course|certainly|okay)\b", re.I)
_LETTER = re.compile(r"[a-z]{2}", re.I)


def clean_topic(line: str) -> tuple[str | None, str]:
    """One reply line as a topic, or None and why it is not one."""
    text = _BULLET.sub("", line.strip()).strip()
    text = _LABEL.sub("", text).strip().strip("\"'`*_").strip()
    if not text or not _LETTER.search(text):
        return None, "empty"
    if text.endswith(":") or _PREAMBLE.match(text) or is_refusal(text):
        return None, "preamble"
    text = text.rstrip(".;,!").strip()
    if len(text) > MAX_TOPIC_CHARS or len(text.split()) > MAX_TOPIC_WORDS:
        return None, "too_long"
    return text, "kept"


def parse_topics(reply: str) -> tuple[list[str], Counter[str]]:
    """The usable topics of a reply, in order, without duplicates; and drop counts by reason."""
    topics: list[str] = []
    seen: set[str] = set()
    dropped: Counter[str] = Counter()
    for line in reply.splitlines():
        if not line.strip():
            continue
        topic, reason = clean_topic(line)
        if topic is None:
            dropped[reason] += 1
        elif normalize(topic) in seen:
            dropped["duplicate"] += 1
        else:
            seen.add(normalize(topic))
            topics.append(topic)
    return topics, dropped


def fallback_topics(description: str) -> Iterator[str]:
    """Topics from a domain description: its comma-separated sub-topics, then each with an angle,
    then numbered, without end (the caller takes as many as it needs)."""
    parts = [p.strip() for p in re.split(r"[,;]", description) if p.strip()] or [description]
    yield from parts
    for angle in FALLBACK_ANGLES:
        for part in parts:
            yield f"{part} ({angle})"
    k = 2
    while True:
        for part in parts:
            yield f"{part} ({k})"
        k += 1


def fill_topics(generated: Sequence[str], description: str, n: int) -> list[tuple[str, str]]:
    """Exactly ``n`` (topic, source) pairs: the first generated topics, then fallbacks that do
    not repeat a topic already chosen."""
    chosen = [(t, GENERATED) for t in generated[:n]]
    seen = {normalize(t) for t, _ in chosen}
    fallbacks = fallback_topics(description)
    while len(chosen) < n:
        topic = next(fallbacks)
        if normalize(topic) not in seen:
            seen.add(normalize(topic))
            chosen.append((topic, FALLBACK))
    return chosen


def topic_chat(seeds: HumanSeeds, domain: Domain, n: int) -> Chat:
    """The request for ``n`` topics of ``domain``, its demonstrations shown as examples."""
    examples = [d.instruction for d in seeds.demonstrations_for(domain.name)]
    return user(
        TOPICS.format(
            domain=readable(domain.name), description=domain.description,
            examples=bulleted(examples), n=n,
        )
    )  # fmt: skip


def topic_rows(
    seeds: HumanSeeds, section: PTAlignSection, generate: Generate, seed: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The topic rows (``TOPIC_SCHEMA``) of every domain and a summary; one generation round."""
    n = section.topics_per_domain
    domains = sorted(seeds.domains, key=lambda d: d.name)
    replies = generate({d.name: topic_chat(seeds, d, n) for d in domains}, seed)
    rows: list[dict[str, Any]] = []
    dropped: Counter[str] = Counter()
    for domain in domains:
        parsed, reasons = parse_topics(replies.get(domain.name, ""))
        dropped += reasons
        references = [
            domain.description,
            *(d.instruction for d in seeds.demonstrations_for(domain.name)),
        ]
        on_domain = [t for t in parsed if topic_overlap(t, references) >= section.min_topic_overlap]
        dropped["off_topic"] += len(parsed) - len(on_domain)
        parsed = on_domain
        dropped["surplus"] += max(0, len(parsed) - n)
        for i, (topic, source) in enumerate(fill_topics(parsed, domain.description, n)):
            rows.append(
                {"id": f"{domain.name}-{i:02d}", "domain": domain.name, "topic": topic,
                 "source": source}
            )  # fmt: skip
    sources = Counter(r["source"] for r in rows)
    summary = {
        "topics": len(rows),
        "domains": len(domains),
        "generated": sources[GENERATED],
        "fallback": sources[FALLBACK],
        "dropped": {
            k: dropped[k]
            for k in ("empty", "preamble", "too_long", "duplicate", "off_topic", "surplus")
        },
    }
    return rows, summary


def topics(
    run: RunDir,
    *,
    stage: str,
    out: str,
    seeds: HumanSeeds,
    section: PTAlignSection,
    model: ModelSection,
    engine: EngineSection,
    seed: int,
) -> dict[str, Any]:
    """Run (or skip, if done) the topics stage into ``out`` (run-relative Parquet)."""

    def work() -> dict[str, Any]:
        rows, summary = topic_rows(seeds, section, pool_generator(model, engine, section), seed)
        write_parquet(run.path(out), pa.Table.from_pylist(rows, schema=TOPIC_SCHEMA))
        log.info(
            "topics: %d (%d generated, %d fallback)",
            summary["topics"], summary["generated"], summary["fallback"],
        )  # fmt: skip
        return summary

    return run.run_stage(stage, [out], work)
