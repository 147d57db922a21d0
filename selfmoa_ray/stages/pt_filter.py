"""Stage ``pt_filter``: keep the PT-ALIGN items whose two answers do their jobs (docs/design.md 2.2 step 4).

positives.parquet + toxics.parquet -> filtered.parquet. The two files are joined on ``id``. Each
side may hold several candidate answers: the positive side its guided (critiqued and revised)
answer and, with ``pt_align.positive_prefill``, a prefilled one; the toxic side its guided answer
(unless the writer refused the role) and the answers to the bare instruction
(``pt_align.toxic_bare_samples``). Every candidate is judged against its bare instruction
(``text``) by the configured evaluators, in one Ray Data pass over all of them (the rows carry a
``side`` and an ``index`` tag), so the judge's actors load their models once. The item keeps the
most helpful positive candidate that is safe and not a needless refusal (ties: the safer, then the
first), and the toxic candidate judged least safe among those that are not refusals; the sources
of both are recorded (``positive_source``, ``toxic_source``) and counted in the summary, with the
kept items per domain.

Drop reasons (the first that applies, in this order; the summary counts every one, 0 when none):

* ``unmatched``: the id is in only one of the two files;
* ``toxic_refused``: no toxic candidate plays the role (the toxic writer refused, ``refused`` in
  toxics.parquet, and no bare answer complied), or, after judging, every one is judged a refusal;
* ``empty``: a side has no candidate that is not whitespace (the trainer refuses empty texts);
* ``positive_unsafe``: every positive candidate's safety < ``pt_align.min_positive_safety``;
* ``positive_needless_refusal``: the safe positive candidates are all judged refusals *and* less
  helpful than ``pt_align.min_positive_helpfulness`` (a bare "I can't help with that" teaches
  nothing PT-ALIGN wants; a refusal that explains and redirects is helpful enough to keep);
* ``toxic_not_harmful``: the least safe toxic candidate's safety >= ``pt_align.max_toxic_safety``.

A benign twin (``kind="benign"`` in positives.parquet) needs no toxic row: it is kept when its
positive answer (the policy's own) is no refusal (else ``benign_refused``) and judged safe (else
``benign_unsafe``). Its ``toxic`` column is the policy's prefilled refusal of it from toxics.parquet
(source ``refusal``, not judged: a refusal by construction), or, without one, that answer again
with no harmful span to mark, so that training gives it the MLE term only.

A judged toxic refusal is reported as ``toxic_refused`` rather than ``toxic_not_harmful``: both
hold for it (a refusal is safe), and the refusal is the more telling reason. Rows come out sorted
by id, so a rerun on the same inputs writes the same file.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa
import ray.data

from selfmoa_ray.config import JudgeSection, PTAlignSection
from selfmoa_ray.evaluators.pool import judge_dataset
from selfmoa_ray.rundir import RunDir, write_parquet
from selfmoa_ray.schema import BENIGN_KIND, FILTERED_SCHEMA, HARMFUL_KIND
from selfmoa_ray.stage_io import read_rows

log = logging.getLogger(__name__)

POSITIVE_COLUMNS = ("id", "domain", "topic", "text", "positive")
TOXIC_COLUMNS = ("id", "domain", "topic", "text", "toxic", "refused")
OPTIONAL_COLUMNS = {
    "positive": ("prefilled", "kind"),
    "toxic": ("bare", "kind"),
}  # older files lack them
GUIDED, PREFILL, BARE, REFUSAL = "guided", "prefill", "bare", "refusal"
SIDES = ("positive", "toxic")
DROP_REASONS = (
    "unmatched",
    "toxic_refused",
    "empty",
    "positive_unsafe",
    "positive_needless_refusal",
    "toxic_not_harmful",
    "benign_refused",
    "benign_unsafe",
)
Candidate = tuple[str, str]  # (source, answer)


def _by_id(rows: Iterable[dict[str, Any]], name: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        key = str(row["id"])
        if key in out:
            raise ValueError(f"{name} holds id {key!r} twice; ids must be unique")
        out[key] = row
    return out


def _blank(value: Any) -> bool:
    return not isinstance(value, str) or not value.strip()


def is_benign(row: Mapping[str, Any]) -> bool:
    return row.get("kind") == BENIGN_KIND


def positive_candidates(row: Mapping[str, Any]) -> list[Candidate]:
    if is_benign(row):
        return [(BARE, row["positive"])] if not _blank(row["positive"]) else []
    out = [(GUIDED, row["positive"]), (PREFILL, row.get("prefilled"))]
    return [(source, text) for source, text in out if not _blank(text)]


def toxic_candidates(row: Mapping[str, Any]) -> list[Candidate]:
    out = [] if row.get("refused") else [(GUIDED, row["toxic"])]
    out += [(BARE, text) for text in row.get("bare") or []]
    return [(source, text) for source, text in out if not _blank(text)]


def join_candidates(
    positives: Iterable[dict[str, Any]], toxics: Iterable[dict[str, Any]]
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Items (sorted by id) that reach the judge, and the drops decided before judging.

    An item has ``id``, ``domain``, ``topic``, ``text`` (from the positives' row, the toxics'
    where missing), ``kind``, and its ``positive`` and ``toxic`` candidates as (source, answer)
    lists (no toxic ones for a benign twin, which needs no toxic row).
    """
    pos, tox = _by_id(positives, "positives"), _by_id(toxics, "toxics")
    dropped = dict.fromkeys(DROP_REASONS, 0)
    items: list[dict[str, Any]] = []
    for key in sorted(set(pos) | set(tox)):
        p, t = pos.get(key), tox.get(key)
        benign = p is not None and is_benign(p)
        if p is None or (t is None and not benign):
            dropped["unmatched"] += 1
            continue
        t = t or {}
        refusal = [(REFUSAL, t["toxic"])] if t and not _blank(t.get("toxic")) else []
        good, bad = positive_candidates(p), refusal if benign else toxic_candidates(t)
        if t.get("refused") and not bad and not benign:
            dropped["toxic_refused"] += 1
        elif not good or not (bad or benign):
            dropped["empty"] += 1
        else:
            items.append(
                {
                    "id": key,
                    **{c: p.get(c) if p.get(c) is not None else t.get(c)
                       for c in ("domain", "topic", "text")},
                    "kind": BENIGN_KIND if benign else HARMFUL_KIND,
                    "positive": good,
                    "toxic": bad,
                }
            )  # fmt: skip
    return items, dropped


Scores = dict[tuple[str, str, int], dict[str, Any]]  # (id, side, candidate index) -> scores


def judge_items(items: list[dict[str, Any]], judge: JudgeSection, dtype: str = "float32") -> Scores:
    """``{(id, side, index): {safety, helpfulness, refusal}}`` for every candidate of every item,
    from one Ray Data pass of the judge's actor pool."""
    rows = [
        {"id": i["id"], "side": side, "index": k, "text": i["text"], "response": answer}
        for i in items for side in SIDES for k, (source, answer) in enumerate(i[side])
        if source != REFUSAL  # a twin's prefilled refusal needs no judge
    ]  # fmt: skip
    if not rows:
        return {}
    table = pa.Table.from_pylist(rows)
    judged = judge_dataset(ray.data.from_arrow(table), judge, dtype=dtype)
    columns = ["id", "side", "index", "safety", "helpfulness", "refusal"]
    scores = {
        (str(r["id"]), str(r["side"]), int(r["index"])): {
            "safety": float(r["safety"]),
            "helpfulness": float(r["helpfulness"]),
            "refusal": bool(r["refusal"]),
        }
        for r in judged.select_columns(columns).take_all()
    }
    if len(scores) != len(table):
        raise RuntimeError(f"the judge returned {len(scores)} scored answers for {len(table)}")
    return scores


def positive_ok(positive: Mapping[str, Any], section: PTAlignSection) -> bool:
    needless = positive["refusal"] and positive["helpfulness"] < section.min_positive_helpfulness
    return positive["safety"] >= section.min_positive_safety and not needless


def best_positive(scores: Sequence[Mapping[str, Any]], section: PTAlignSection) -> int:
    """The index of the most helpful acceptable candidate (then the safer, then the first); with
    none acceptable, the safest one, whose failure names the drop."""
    order = sorted(range(len(scores)), key=lambda k: (
        not positive_ok(scores[k], section), -scores[k]["helpfulness"], -scores[k]["safety"], k
    ))  # fmt: skip
    if positive_ok(scores[order[0]], section):
        return order[0]
    return min(range(len(scores)), key=lambda k: (-scores[k]["safety"], k))


def worst_toxic(scores: Sequence[Mapping[str, Any]]) -> int:
    """The index of the least safe candidate that is not a refusal (a refusal when all are)."""
    return min(range(len(scores)), key=lambda k: (scores[k]["refusal"], scores[k]["safety"], k))


def drop_reason(
    positive: Mapping[str, Any], toxic: Mapping[str, Any] | None, section: PTAlignSection
) -> str | None:
    """Why an item with these chosen scores is dropped (see the module docstring for the order),
    or None to keep it; ``toxic`` is None for a benign twin."""
    if toxic is None:
        if positive["refusal"]:
            return "benign_refused"
        return "benign_unsafe" if positive["safety"] < section.min_positive_safety else None
    if positive["safety"] < section.min_positive_safety:
        return "positive_unsafe"
    if not positive_ok(positive, section):
        return "positive_needless_refusal"
    if toxic["refusal"]:
        return "toxic_refused"
    if toxic["safety"] >= section.max_toxic_safety:
        return "toxic_not_harmful"
    return None


def filter_items(
    items: Iterable[dict[str, Any]],
    scores: Scores,
    section: PTAlignSection,
    dropped: dict[str, int] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Rows of :data:`FILTERED_SCHEMA` for the kept items, and the drop counts (added to
    ``dropped`` when given)."""
    dropped = dict(dropped) if dropped is not None else dict.fromkeys(DROP_REASONS, 0)
    kept: list[dict[str, Any]] = []
    for item in items:
        benign = item["kind"] == BENIGN_KIND
        judged = {side: [scores[(item["id"], side, k)] for k in range(len(item[side]))]
                  for side in SIDES if not (benign and side == "toxic")}  # fmt: skip
        p = best_positive(judged["positive"], section)
        t = None if benign else worst_toxic(judged["toxic"])
        positive = judged["positive"][p]
        toxic = judged["toxic"][t] if t is not None else None
        reason = drop_reason(positive, toxic, section)
        if reason is not None:
            dropped[reason] += 1
            continue
        answer = item["positive"][p][1]
        # a twin: its prefilled refusal, or its answer again (nothing to mark)
        toxic_source, toxic_answer = item["toxic"][t or 0] if item["toxic"] else (None, answer)
        kept.append(
            {
                **{name: item[name] for name in ("id", "domain", "topic", "text", "kind")},
                "positive": answer,
                "toxic": toxic_answer,
                "positive_safety": positive["safety"],
                "positive_helpfulness": positive["helpfulness"],
                "positive_refusal": positive["refusal"],
                "toxic_safety": toxic["safety"] if toxic else None,
                "toxic_refusal": toxic["refusal"] if toxic else None,
                "positive_source": item["positive"][p][0],
                "toxic_source": toxic_source,
            }
        )
    return kept, dropped


def yield_by_domain(
    candidates: Iterable[Mapping[str, Any]], kept: Iterable[Mapping[str, Any]]
) -> dict[str, dict[str, int]]:
    """{domain: {"instructions": n, "kept": k}}: where the recipe's data comes from, and where not."""
    total = Counter(str(r.get("domain")) for r in candidates)
    kept_by = Counter(str(r["domain"]) for r in kept)
    return {d: {"instructions": total[d], "kept": kept_by[d]} for d in sorted(total)}


def pt_filter(
    run: RunDir,
    *,
    stage: str,
    positives: str,
    toxics: str,
    out: str,
    section: PTAlignSection,
    judge: JudgeSection,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Run (or skip, if done) the PT-ALIGN filter into ``out``; paths are run-relative.

    Summary: ``candidates`` (ids in either file), ``kept``, ``dropped`` ({reason: count} for
    every reason of :data:`DROP_REASONS`; ``candidates == kept + sum(dropped.values())``),
    ``judged_answers``, the chosen ``positive_sources`` and ``toxic_sources`` and ``by_domain``
    (:func:`yield_by_domain`) of the harmful items, and ``benign`` ({"twins", "kept"}).
    """

    def work() -> dict[str, Any]:
        positive_rows = read_rows(
            run.path(positives), POSITIVE_COLUMNS, OPTIONAL_COLUMNS["positive"]
        )
        items, dropped = join_candidates(
            positive_rows,
            read_rows(run.path(toxics), TOXIC_COLUMNS, OPTIONAL_COLUMNS["toxic"]),
        )
        scores = judge_items(items, judge, dtype=dtype)
        kept, dropped = filter_items(items, scores, section, dropped)
        write_parquet(run.path(out), pa.Table.from_pylist(kept, schema=FILTERED_SCHEMA))
        candidates = len(kept) + sum(dropped.values())
        harmful = [r for r in kept if r["kind"] != BENIGN_KIND]
        log.info(
            "%s: kept %d of %d PT-ALIGN items; dropped %s",
            stage,
            len(kept),
            candidates,
            ", ".join(f"{reason}={n}" for reason, n in dropped.items()),
        )
        return {
            "candidates": candidates,
            "kept": len(kept),
            "dropped": dropped,
            "judged_answers": len(scores),
            "positive_sources": dict(Counter(r["positive_source"] for r in harmful)),
            "toxic_sources": dict(Counter(r["toxic_source"] for r in harmful)),
            "by_domain": yield_by_domain([r for r in positive_rows if not is_benign(r)], harmful),
            "benign": {
                "twins": sum(map(is_benign, positive_rows)),
                "kept": len(kept) - len(harmful),
            },  # fmt: skip
        }

    return run.run_stage(stage, [out], work)
