"""Harmful-span marking: which characters of a toxic answer the unlikelihood term pushes down
(docs/design.md 2.2 step 4).

Two ways to find them (``pt_align.spans``):

* ``quote`` (default): the model is shown the instruction and the answer and asked to quote the
  harmful sentences word for word, one per line (:func:`quote_chat`). Each quote is looked up in the
  answer (:func:`quote_spans`): exactly, else case-insensitively with whitespace normalised. A
  small model often paraphrases instead of quoting; an item whose quotes mark nothing falls back
  to ``diff``.
* ``diff``: the words of the toxic answer that the positive answer to the same instruction does
  not use (:func:`diff_spans`), stop-words excluded: what the toxic answer says that the safe one
  does not.

Spans are ``[start, end)`` character offsets into the answer, sorted and merged. They become token
marks in :func:`selfmoa_ray.training.data.encode_response`, which marks only response tokens,
never template, special or end-of-turn tokens. An item where neither way finds anything keeps no
span (source ``none``): it still trains on its positive answer (MLE), just without unlikelihood.

Two stages use them:

* :func:`triples`: filtered.parquet (stages/pt_filter.py) -> triples.parquet (:data:`TRIPLE_SCHEMA`),
  PT-ALIGN's training file (``prompt``, ``positive``, ``toxic``, ``harmful_spans``); a benign
  twin's toxic side is the policy's prefilled refusal of it, whose opening is marked (source
  ``refusal``), or, without one, its own answer with nothing marked (source ``benign``);
* :func:`mark_pairs`: the combined recipe (Self-MOA pairs + unlikelihood on toxic tokens):
  pairs.parquet -> the same pairs plus ``harmful_spans`` into the rejected response of every pair
  whose rejected response is unsafe (:data:`MARKED_PAIR_SCHEMA`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from selfmoa_ray.config import EngineSection, ModelSection, PTAlignSection
from selfmoa_ray.engines.base import SamplingParams
from selfmoa_ray.engines.pool import complete
from selfmoa_ray.evaluators.refusal import is_refusal
from selfmoa_ray.rundir import RunDir, write_parquet
from selfmoa_ray.schema import BENIGN_KIND, FILTERED_SCHEMA, HARMFUL_KIND, PAIR_SCHEMA
from selfmoa_ray.stage_io import read_rows

log = logging.getLogger(__name__)

Span = tuple[int, int]
SOURCES = ("quote", "diff", "none")
BENIGN_SOURCE = "benign"  # triples: a benign twin without a refusal to mark
REFUSAL_SOURCE = "refusal"  # triples: a benign twin, its prefilled refusal's opening marked
SKIPPED = "skipped"  # mark_pairs: a pair whose rejected response is not unsafe is not marked
MIN_QUOTE_CHARS = 3
NONE_REPLY = "NONE"

QUOTE_INSTRUCTION = (
    "Below is a request and an answer to it. Copy out, word for word, every sentence of the "
    "answer that is harmful: that gives dangerous, illegal or unethical help, or that insults or "
    "demeans. Write one quoted sentence per line, exactly as it appears in the answer, and "
    "nothing else. If no sentence of the answer is harmful, write {none}.\n\n"
    "Request: {instruction}\n\nAnswer: {answer}"
)

MESSAGES = PAIR_SCHEMA.field("prompt").type
SPANS = pa.list_(pa.list_(pa.int64()))
TRIPLE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("domain", pa.string()),
        ("topic", pa.string()),
        ("prompt", MESSAGES),
        ("positive", pa.string()),
        ("toxic", pa.string()),
        ("harmful_spans", SPANS),
        ("span_source", pa.string()),
        ("positive_safety", pa.float64()),
        ("positive_helpfulness", pa.float64()),
        ("toxic_safety", pa.float64()),
        ("kind", pa.string()),  # "harmful" | "benign"
    ]
)
MARKED_PAIR_SCHEMA = pa.schema(
    [*PAIR_SCHEMA, pa.field("harmful_spans", SPANS), pa.field("span_source", pa.string())]
)

# --------------------------------------------------------------------------- quotes

# A list marker at the start of a line: bullets, "1.", "1)", "(1)", "#1:", "Quote 2:".
_MARKER = re.compile(
    r"^\s*(?:[-*+\u2022\u2023\u25e6\u2043>]+\s*|\d{1,3}[.):](?:\s+|$)|\(\d{1,3}\)\s*"
    r"|#\d{1,3}:?\s*|(?:quote|sentence)\s*\d{0,3}\s*:\s*)+",
    re.IGNORECASE,
)
_QUOTE_CHARS = "\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb"
_ELLIPSIS = re.compile(r"^(?:\.\.\.|\u2026)\s*|\s*(?:\.\.\.|\u2026)$")


def clean_quote(line: str) -> str:
    """One line of the model's reply as the passage it quotes: list markers, surrounding quote
    marks and whitespace removed (``""`` for nothing left)."""
    text = line.strip()
    for _ in range(3):  # e.g. - "'text'" or **"1. text"**
        stripped = _MARKER.sub("", text).strip("*_").strip().strip(_QUOTE_CHARS).strip()
        if stripped == text:
            break
        text = stripped
    return text


def _normalised(text: str) -> tuple[str, list[int]]:
    """``text`` lower-cased with every whitespace run as one space, and for each character of
    the result the offset in ``text`` it came from."""
    chars: list[str] = []
    origin: list[int] = []
    space = False
    for i, ch in enumerate(text):
        if ch.isspace():
            if not space:
                chars.append(" ")
                origin.append(i)
            space = True
            continue
        space = False
        for low in ch.lower():  # lower() may lengthen a character ("İ" -> "i̇")
            chars.append(low)
            origin.append(i)
    return "".join(chars), origin


def _occurrences(haystack: str, needle: str) -> Iterable[int]:
    start = haystack.find(needle)
    while start != -1:
        yield start
        start = haystack.find(needle, start + 1)


def _whole_words(text: str, span: Span) -> bool:
    """Whether ``span`` neither starts nor ends inside a word of ``text`` ("kill" in "skill")."""
    start, end = span
    cut_start = start > 0 and text[start - 1].isalnum() and text[start].isalnum()
    cut_end = end < len(text) and text[end - 1].isalnum() and text[end].isalnum()
    return not (cut_start or cut_end)


def _find(answer: str, quote: str, normal: tuple[str, list[int]]) -> list[Span]:
    """Every place ``quote`` occurs in ``answer`` as whole words: exactly, else normalised (case,
    whitespace)."""
    exact = [(s, s + len(quote)) for s in _occurrences(answer, quote)]
    exact = [span for span in exact if _whole_words(answer, span)]
    if exact:
        return exact
    text, origin = normal
    needle, _ = _normalised(quote.strip())
    if not needle:
        return []
    found = [(origin[s], origin[s + len(needle) - 1] + 1) for s in _occurrences(text, needle)]
    return [span for span in found if _whole_words(answer, span)]


def merge_spans(spans: Iterable[Sequence[int]]) -> list[Span]:
    """Sorted spans with overlapping or touching ones merged; empty spans dropped."""
    merged: list[list[int]] = []
    for start, end in sorted((int(s), int(e)) for s, e in spans if int(e) > int(s)):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def _variants(quote: str) -> list[str]:
    """The quote, then forms a model's copy often differs by: an ellipsis where it cut the
    sentence, a final full stop the answer did not have."""
    variants = [quote]
    trimmed = _ELLIPSIS.sub("", quote).strip()
    for candidate in (trimmed, trimmed.rstrip(".!?;:,").strip()):
        if candidate not in variants:
            variants.append(candidate)
    return [v for v in variants if len(v) >= MIN_QUOTE_CHARS and _has_content(v)]


def _has_content(quote: str) -> bool:
    """A quote of punctuation or stop-words only ("...", "and the") would mark nothing harmful,
    just every place those words occur."""
    return any(not _is_stop(m.group()) for m in _WORD.finditer(quote))


def quote_spans(answer: str, quotes: str) -> list[Span]:
    """Character spans of ``answer`` that the model's reply ``quotes`` quotes, one per line.

    Each line loses its list marker and surrounding quote marks, then is found in ``answer``
    exactly (every occurrence), else case-insensitively with whitespace runs as one space, and
    only where it starts and ends on word boundaries; a quote cut with an ellipsis or ending in a
    stop the answer lacks is also tried without it. Quotes shorter than 3 characters, of
    punctuation or stop-words only, the reply ``NONE``, and quotes not found are ignored.
    Returns sorted, merged ``[start, end)`` offsets.
    """
    if not answer or not quotes:
        return []
    normal = _normalised(answer)
    spans: list[Span] = []
    for line in quotes.splitlines():
        quote = clean_quote(line)
        if quote.rstrip(".!").upper() == NONE_REPLY:
            continue
        for variant in _variants(quote):
            found = _find(answer, variant, normal)
            if found:
                spans += found
                break
    return merge_spans(spans)


# --------------------------------------------------------------------------- diff

# English function words: never harmful on their own, and shared by any two answers anyway.
_STOP_TEXT = """
    a about above after again against all am an and any are aren't as at be because been before
    being below between both but by can can't cannot could couldn't did didn't do does doesn't
    doing don't down during each few for from further had hadn't has hasn't have haven't having
    he he'd he'll he's her here here's hers herself him himself his how how's i i'd i'll i'm i've
    if in into is isn't it it's its itself just let's me more most mustn't my myself no nor not
    now of off on once only or other ought our ours ourselves out over own same shan't she she'd
    she'll she's should shouldn't so some such than that that's the their theirs them themselves
    then there there's these they they'd they'll they're they've this those through to too under
    until up very was wasn't we we'd we'll we're we've were weren't what what's when when's where
    where's which while who who's whom why why's will with won't would wouldn't you you'd you'll
    you're you've your yours yourself yourselves also may might must shall here's yes via
"""
STOP_WORDS = frozenset(_STOP_TEXT.split())
_WORD = re.compile(r"[^\W_]+(?:['\u2019\-][^\W_]+)*")
_NON_ALNUM = re.compile(r"[\W_]+")


def _key(word: str) -> str:
    return _NON_ALNUM.sub("", word.lower().replace("\u2019", "'"))


def _is_stop(word: str) -> bool:
    low = word.lower().replace("\u2019", "'")
    return low in STOP_WORDS or _key(word) in STOP_WORDS


def diff_spans(toxic: str, positive: str) -> list[Span]:
    """Character spans of the words of ``toxic`` that ``positive`` does not use.

    Words are runs of letters and digits (with inner apostrophes or hyphens); they are compared
    case-insensitively with punctuation removed. Stop-words are never marked. Marked words
    separated by whitespace only are merged into one span; punctuation between them splits it.
    """
    if not toxic:
        return []
    known = {_key(m.group()) for m in _WORD.finditer(positive or "")}
    spans: list[list[int]] = []
    for match in _WORD.finditer(toxic):
        word = match.group()
        if _is_stop(word) or _key(word) in known:
            continue
        start, end = match.span()
        if spans and toxic[spans[-1][1] : start].isspace():
            spans[-1][1] = end  # the previous word was marked too, with only whitespace between
        else:
            spans.append([start, end])
    return [(s, e) for s, e in spans]


# --------------------------------------------------------------------------- marking


def quote_chat(instruction: str, answer: str) -> list[dict[str, str]]:
    """The chat asking the model to quote the harmful sentences of ``answer`` exactly, one per
    line, or to write NONE."""
    content = QUOTE_INSTRUCTION.format(none=NONE_REPLY, instruction=instruction, answer=answer)
    return [{"role": "user", "content": content}]


def mark(
    instructions: Sequence[str],
    bad_answers: Sequence[str],
    good_answers: Sequence[str],
    *,
    mode: str,
    model: ModelSection | None = None,
    engine: EngineSection | None = None,
    sampling: SamplingParams | None = None,
) -> list[tuple[list[Span], str]]:
    """``(spans, source)`` per item: spans into ``bad_answers[i]``, source ``quote``, ``diff`` or
    ``none``.

    ``mode="quote"`` sends one batch of :func:`quote_chat` chats through the engine pool (model,
    engine and sampling are then needed); an item whose quotes mark nothing falls back to
    :func:`diff_spans` against ``good_answers[i]``. ``mode="diff"`` runs no model.
    """
    if not len(instructions) == len(bad_answers) == len(good_answers):
        raise ValueError("instructions, bad_answers and good_answers must have the same length")
    if mode not in ("quote", "diff"):
        raise ValueError(f"unknown span mode {mode!r}; use 'quote' or 'diff'")
    replies: dict[str, str] = {}
    if mode == "quote":
        if model is None or engine is None or sampling is None:
            raise ValueError("mode 'quote' needs model, engine and sampling")
        chats = {
            str(i): quote_chat(instruction, bad)
            for i, (instruction, bad) in enumerate(zip(instructions, bad_answers, strict=True))
            if bad and bad.strip()
        }
        replies = complete(chats, model, engine, sampling)
    marks: list[tuple[list[Span], str]] = []
    for i, (bad, good) in enumerate(zip(bad_answers, good_answers, strict=True)):
        spans = without_refusals(bad or "", quote_spans(bad or "", replies.get(str(i), "")))
        if spans:
            marks.append((spans, "quote"))
            continue
        spans = diff_spans(bad or "", good or "")
        marks.append((spans, "diff") if spans else ([], "none"))
    return marks


def without_refusals(text: str, spans: Sequence[Span]) -> list[Span]:
    """``spans`` minus those that quote a refusal ("I'm sorry, but I can't ..."): a small quoting
    model sometimes quotes one, and unlikelihood on it would teach the policy not to refuse."""
    return [(s, e) for s, e in spans if not is_refusal(text[s:e])]


def span_sampling(section: PTAlignSection, seed: int) -> SamplingParams:
    """Greedy decoding for quoting: the most likely copy of the answer's own words."""
    return SamplingParams(
        n=1, temperature=0.0, top_p=1.0, max_new_tokens=section.max_spans_new_tokens, seed=seed
    )


def marked_fraction(text: str, spans: Sequence[Span]) -> float:
    """Share of ``text``'s characters inside ``spans`` (0 for an empty text)."""
    return sum(e - s for s, e in spans) / len(text) if text else 0.0


# --------------------------------------------------------------------------- stages


def twin_spans(toxic: str, prefill: str | None) -> tuple[list[Span], str]:
    """A benign twin's marks: the refusal opening (``prefill``) of its prefilled refusal, the
    over-refusal unlikelihood pushes down (source ``refusal``); none without one."""
    if prefill and toxic.startswith(prefill):
        return [(0, len(prefill))], REFUSAL_SOURCE
    return [], BENIGN_SOURCE


def interleaved(first: Sequence[Any], second: Sequence[Any]) -> list[Any]:
    """The two lists merged evenly, each in its own order: training reads the triples file in
    order, and a stretch of refusals alone (the harmful triples before the benign twins) taught
    SmolLM2 to refuse 88% of benign validation prompts within a third of an epoch."""
    keyed = [((i + 0.5) / len(first), 0, x) for i, x in enumerate(first)]
    keyed += [((j + 0.5) / len(second), 1, x) for j, x in enumerate(second)]
    return [x for *_, x in sorted(keyed, key=lambda k: k[:2])]


def triples(
    run: RunDir,
    *,
    stage: str,
    filtered: str,
    out: str,
    section: PTAlignSection,
    model: ModelSection,
    engine: EngineSection,
    seed: int,
) -> dict[str, Any]:
    """Run (or skip, if done) span marking of ``filtered`` into the PT-ALIGN triples ``out``.

    Every filtered item becomes one row of :data:`TRIPLE_SCHEMA` (sorted by id), including those
    with no span (``span_source == "none"``: MLE on the positive only). Summary: ``triples``,
    ``mode``, ``by_source`` ({quote, diff, none}), ``unmarked`` (rows without a span) and
    ``marked_chars_fraction`` (mean over rows of marked characters / toxic length).
    """

    def work() -> dict[str, Any]:
        rows = sorted(read_rows(run.path(filtered), FILTERED_SCHEMA.names), key=lambda r: r["id"])
        harmful = [r for r in rows if r["kind"] != BENIGN_KIND]
        marked = mark(
            [r["text"] for r in harmful],
            [r["toxic"] for r in harmful],
            [r["positive"] for r in harmful],
            mode=section.spans,
            model=model,
            engine=engine,
            sampling=span_sampling(section, seed),
        )
        by_id = {r["id"]: m for r, m in zip(harmful, marked, strict=True)}
        by_id |= {r["id"]: twin_spans(r["toxic"], section.positive_prefill)
                  for r in rows if r["kind"] == BENIGN_KIND}  # fmt: skip
        rows = interleaved(harmful, [r for r in rows if r["kind"] == BENIGN_KIND])
        marks = [by_id[r["id"]] for r in rows]
        out_rows = [
            {
                "id": r["id"],
                "domain": r["domain"],
                "topic": r["topic"],
                "prompt": [{"role": "user", "content": r["text"]}],
                "positive": r["positive"],
                "toxic": r["toxic"],
                "harmful_spans": [list(s) for s in spans],
                "span_source": source,
                "positive_safety": r["positive_safety"],
                "positive_helpfulness": r["positive_helpfulness"],
                "toxic_safety": r["toxic_safety"],
                "kind": r["kind"] or HARMFUL_KIND,
            }
            for r, (spans, source) in zip(rows, marks, strict=True)
        ]
        write_parquet(run.path(out), pa.Table.from_pylist(out_rows, schema=TRIPLE_SCHEMA))
        by_source = dict.fromkeys(SOURCES, 0)
        for _, source in marked:
            by_source[source] += 1
        fractions = [
            marked_fraction(r["toxic"], spans)
            for r, (spans, _) in zip(harmful, marked, strict=True)
        ]
        summary = {
            "triples": len(harmful),
            "benign_twins": len(rows) - len(harmful),
            "twin_refusals_marked": sum(source == REFUSAL_SOURCE for _, source in marks),
            "mode": section.spans,
            "by_source": by_source,
            "unmarked": by_source["none"],
            "marked_chars_fraction": sum(fractions) / len(fractions) if fractions else 0.0,
        }
        log.info("%s: %d triples, spans by source %s", stage, len(out_rows), by_source)
        return summary

    return run.run_stage(stage, [out], work)


def _content(messages: Any, role: str | None = None) -> str:
    """The text of a chat column: the last message (of ``role``, when given)."""
    picked = [m for m in (messages or []) if role is None or m.get("role") == role]
    return str(picked[-1]["content"]) if picked else ""


def mark_pairs(
    run: RunDir,
    *,
    stage: str,
    pairs: str,
    out: str,
    unsafe_threshold: float,
    section: PTAlignSection,
    model: ModelSection,
    engine: EngineSection,
    seed: int,
) -> dict[str, Any]:
    """Run (or skip, if done) span marking of the rejected responses of ``pairs`` into ``out``.

    The combined recipe: a pair whose rejected response is unsafe (``rejected_safety <
    unsafe_threshold``) gets ``harmful_spans`` into ``rejected[0]["content"]``, found by
    quoting (its instruction is the prompt's last user turn) with the chosen response as the diff
    fallback; the others get ``[]`` and ``span_source == "skipped"``. Rows keep their order and
    columns (:data:`MARKED_PAIR_SCHEMA` for a pairs-stage file). Summary: ``pairs``,
    ``eligible`` (unsafe rejected), ``marked`` (pairs with a span), ``by_source`` ({quote, diff,
    none} over the eligible pairs) and ``marked_chars_fraction`` (mean over the eligible pairs).
    """

    def work() -> dict[str, Any]:
        path = run.path(pairs)
        names = pq.ParquetDataset(path).schema.names
        missing = [c for c in PAIR_SCHEMA.names if c not in names]
        if missing:
            raise ValueError(f"{path} lacks pair column(s) {missing}; it has {names}")
        table = pq.read_table(path)
        table = table.drop_columns([c for c in ("harmful_spans", "span_source") if c in names])
        rows = table.select(["prompt", "chosen", "rejected", "rejected_safety"]).to_pylist()
        eligible = [
            i for i, r in enumerate(rows)
            if r["rejected_safety"] is not None and r["rejected_safety"] < unsafe_threshold
        ]  # fmt: skip
        bad = [_content(rows[i]["rejected"]) for i in eligible]
        marks = mark(
            [_content(rows[i]["prompt"], "user") for i in eligible],
            bad,
            [_content(rows[i]["chosen"]) for i in eligible],
            mode=section.spans,
            model=model,
            engine=engine,
            sampling=span_sampling(section, seed),
        )
        spans: list[list[list[int]]] = [[] for _ in rows]
        sources = [SKIPPED] * len(rows)
        for i, (found, source) in zip(eligible, marks, strict=True):
            spans[i], sources[i] = [list(s) for s in found], source
        table = table.append_column(pa.field("harmful_spans", SPANS), pa.array(spans, SPANS))
        table = table.append_column(pa.field("span_source", pa.string()), pa.array(sources))
        write_parquet(run.path(out), table)
        by_source = dict.fromkeys(SOURCES, 0)
        for _, source in marks:
            by_source[source] += 1
        fractions = [marked_fraction(b, m[0]) for b, m in zip(bad, marks, strict=True)]
        summary = {
            "pairs": len(rows),
            "eligible": len(eligible),
            "marked": sum(1 for s in spans if s),
            "mode": section.spans,
            "by_source": by_source,
            "marked_chars_fraction": sum(fractions) / len(fractions) if fractions else 0.0,
        }
        log.info("%s: marked %d of %d pairs (%s)", stage, summary["marked"], len(rows), by_source)
        return summary

    return run.run_stage(stage, [out], work)
