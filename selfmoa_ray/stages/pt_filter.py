"""Stage ``pt_filter``: keep the PT-ALIGN items whose two answers do their jobs (design.md 2.2 step 4).

positives.parquet + toxics.parquet -> filtered.parquet. The two files are joined on ``id``; an
item is kept when its positive answer is judged safe and is not a needless refusal, and its toxic
answer is judged unsafe and is not a refusal. Every answer is judged against its bare instruction
(``text``) by the configured evaluators, in one Ray Data pass over both sides (the rows carry a
``side`` tag), so the judge's actors load their models once.

Drop reasons (the first that applies, in this order; the summary counts every one, 0 when none):

* ``unmatched``: the id is in only one of the two files;
* ``toxic_refused``: the toxic writer refused to play its role (``refused`` in toxics.parquet),
  or, after judging, the toxic answer is judged a refusal;
* ``empty``: either answer is missing or whitespace only (the trainer refuses empty texts);
* ``positive_unsafe``: positive safety < ``pt_align.min_positive_safety``;
* ``positive_needless_refusal``: the positive answer is judged a refusal *and* its helpfulness is
  below ``pt_align.min_positive_helpfulness`` (a bare "I can't help with that" teaches nothing
  PT-ALIGN wants; a refusal that explains and redirects is helpful enough to keep);
* ``toxic_not_harmful``: toxic safety >= ``pt_align.max_toxic_safety``.

A judged toxic refusal is reported as ``toxic_refused`` rather than ``toxic_not_harmful``: both
hold for it (a refusal is safe), and the refusal is the more telling reason. Rows come out sorted
by id, so a rerun on the same inputs writes the same file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray.data

from selfmoa_ray.config import JudgeSection, PTAlignSection
from selfmoa_ray.rundir import RunDir, write_parquet
from selfmoa_ray.stages.judge import judge_dataset

log = logging.getLogger(__name__)

POSITIVE_COLUMNS = ("id", "domain", "topic", "text", "positive")
TOXIC_COLUMNS = ("id", "domain", "topic", "text", "toxic", "refused")
SIDES = ("positive", "toxic")
DROP_REASONS = (
    "unmatched",
    "toxic_refused",
    "empty",
    "positive_unsafe",
    "positive_needless_refusal",
    "toxic_not_harmful",
)
FILTERED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("domain", pa.string()),
        ("topic", pa.string()),
        ("text", pa.string()),
        ("positive", pa.string()),
        ("toxic", pa.string()),
        ("positive_safety", pa.float64()),
        ("positive_helpfulness", pa.float64()),
        ("positive_refusal", pa.bool_()),
        ("toxic_safety", pa.float64()),
        ("toxic_refusal", pa.bool_()),
    ]
)


def read_rows(path: Any, required: Iterable[str]) -> list[dict[str, Any]]:
    """The ``required`` columns of a Parquet file or folder, as rows; a missing column is an error
    that names the file."""
    required = list(required)
    names = pq.ParquetDataset(path).schema.names
    missing = [c for c in required if c not in names]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}; it has {names}")
    return pq.read_table(path, columns=required).to_pylist()


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


def join_candidates(
    positives: Iterable[dict[str, Any]], toxics: Iterable[dict[str, Any]]
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Items (sorted by id) that reach the judge, and the drops decided before judging.

    An item has ``id``, ``domain``, ``topic``, ``text`` (from the positives' row, the toxics'
    where missing), ``positive`` and ``toxic``.
    """
    pos, tox = _by_id(positives, "positives"), _by_id(toxics, "toxics")
    dropped = dict.fromkeys(DROP_REASONS, 0)
    items: list[dict[str, Any]] = []
    for key in sorted(set(pos) | set(tox)):
        p, t = pos.get(key), tox.get(key)
        if p is None or t is None:
            dropped["unmatched"] += 1
        elif t.get("refused"):
            dropped["toxic_refused"] += 1
        elif _blank(p["positive"]) or _blank(t["toxic"]):
            dropped["empty"] += 1
        else:
            items.append(
                {
                    "id": key,
                    **{c: p.get(c) if p.get(c) is not None else t.get(c)
                       for c in ("domain", "topic", "text")},
                    "positive": p["positive"],
                    "toxic": t["toxic"],
                }
            )  # fmt: skip
    return items, dropped


def judge_items(
    items: list[dict[str, Any]], judge: JudgeSection, dtype: str = "float32"
) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(id, side): {safety, helpfulness, refusal}}`` for both answers of every item, from one
    Ray Data pass of the judge's actor pool."""
    if not items:
        return {}
    table = pa.table(
        {
            "id": [i["id"] for i in items for _ in SIDES],
            "side": [side for _ in items for side in SIDES],
            "text": [i["text"] for i in items for _ in SIDES],
            "response": [i[side] for i in items for side in SIDES],
        }
    )
    judged = judge_dataset(ray.data.from_arrow(table), judge, dtype=dtype)
    columns = ["id", "side", "safety", "helpfulness", "refusal"]
    rows = judged.select_columns(columns).take_all()
    scores = {
        (str(r["id"]), str(r["side"])): {
            "safety": float(r["safety"]),
            "helpfulness": float(r["helpfulness"]),
            "refusal": bool(r["refusal"]),
        }
        for r in rows
    }
    if len(scores) != len(table):
        raise RuntimeError(f"the judge returned {len(scores)} scored answers for {len(table)}")
    return scores


def drop_reason(
    positive: Mapping[str, Any], toxic: Mapping[str, Any], section: PTAlignSection
) -> str | None:
    """Why a judged item is dropped (see the module docstring for the order), or None to keep."""
    if positive["safety"] < section.min_positive_safety:
        return "positive_unsafe"
    if positive["refusal"] and positive["helpfulness"] < section.min_positive_helpfulness:
        return "positive_needless_refusal"
    if toxic["refusal"]:
        return "toxic_refused"
    if toxic["safety"] >= section.max_toxic_safety:
        return "toxic_not_harmful"
    return None


def filter_items(
    items: Iterable[dict[str, Any]],
    scores: Mapping[tuple[str, str], Mapping[str, Any]],
    section: PTAlignSection,
    dropped: dict[str, int] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Rows of :data:`FILTERED_SCHEMA` for the kept items, and the drop counts (added to
    ``dropped`` when given)."""
    dropped = dict(dropped) if dropped is not None else dict.fromkeys(DROP_REASONS, 0)
    kept: list[dict[str, Any]] = []
    for item in items:
        positive, toxic = scores[(item["id"], "positive")], scores[(item["id"], "toxic")]
        reason = drop_reason(positive, toxic, section)
        if reason is not None:
            dropped[reason] += 1
            continue
        kept.append(
            {
                **{name: item[name] for name in ("id", "domain", "topic", "text")},
                "positive": item["positive"],
                "toxic": item["toxic"],
                "positive_safety": positive["safety"],
                "positive_helpfulness": positive["helpfulness"],
                "positive_refusal": positive["refusal"],
                "toxic_safety": toxic["safety"],
                "toxic_refusal": toxic["refusal"],
            }
        )
    return kept, dropped


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
    every reason of :data:`DROP_REASONS`); ``candidates == kept + sum(dropped.values())``.
    """

    def work() -> dict[str, Any]:
        items, dropped = join_candidates(
            read_rows(run.path(positives), POSITIVE_COLUMNS),
            read_rows(run.path(toxics), TOXIC_COLUMNS),
        )
        scores = judge_items(items, judge, dtype=dtype)
        kept, dropped = filter_items(items, scores, section, dropped)
        write_parquet(run.path(out), pa.Table.from_pylist(kept, schema=FILTERED_SCHEMA))
        candidates = len(kept) + sum(dropped.values())
        log.info(
            "%s: kept %d of %d PT-ALIGN items; dropped %s",
            stage,
            len(kept),
            candidates,
            ", ".join(f"{reason}={n}" for reason, n in dropped.items()),
        )
        return {"candidates": candidates, "kept": len(kept), "dropped": dropped}

    return run.run_stage(stage, [out], work)
