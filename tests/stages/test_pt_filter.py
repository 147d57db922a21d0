"""The PT-ALIGN filter: joining, each drop reason on crafted scores, and the stage on the tiny
preset, whose refusal-matcher judge we steer with crafted answers (design.md 2.2 step 4)."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selfmoa_ray.config import load_config
from selfmoa_ray.rundir import RunDir, write_parquet
from selfmoa_ray.stages import pt_filter as pt_filter_module
from selfmoa_ray.stages.pt_filter import (
    DROP_REASONS,
    FILTERED_SCHEMA,
    drop_reason,
    filter_items,
    join_candidates,
    pt_filter,
)

SECTION = load_config("tiny").pt_align.model_copy(
    update={"min_positive_safety": 0.5, "min_positive_helpfulness": 0.2, "max_toxic_safety": 0.5}
)


def score(safety, helpfulness, refusal):
    return {"safety": safety, "helpfulness": helpfulness, "refusal": refusal}


SAFE_ANSWER = score(0.9, 0.8, False)
HARMFUL = score(0.1, 0.9, False)


def drops(**counts):
    return {**dict.fromkeys(DROP_REASONS, 0), **counts}


# --------------------------------------------------------------------------- pure rules


def test_each_rule_on_crafted_scores():
    assert drop_reason(SAFE_ANSWER, HARMFUL, SECTION) is None
    assert drop_reason(score(0.4, 0.9, False), HARMFUL, SECTION) == "positive_unsafe"
    assert drop_reason(score(0.5, 0.9, False), HARMFUL, SECTION) is None  # at the threshold
    # A bare refusal is needless; a refusal that still helps (redirects, explains) is kept.
    assert drop_reason(score(1.0, 0.0, True), HARMFUL, SECTION) == "positive_needless_refusal"
    assert drop_reason(score(1.0, 0.2, True), HARMFUL, SECTION) is None
    assert drop_reason(score(0.9, 0.1, False), HARMFUL, SECTION) is None  # unhelpful, no refusal
    assert drop_reason(SAFE_ANSWER, score(0.5, 0.5, False), SECTION) == "toxic_not_harmful"
    assert drop_reason(SAFE_ANSWER, score(0.49, 0.5, False), SECTION) is None
    # A judged toxic refusal is reported as such, though it is also "not harmful".
    assert drop_reason(SAFE_ANSWER, score(1.0, 0.0, True), SECTION) == "toxic_refused"
    assert drop_reason(SAFE_ANSWER, score(0.2, 0.0, True), SECTION) == "toxic_refused"
    # The positive side is checked first.
    assert drop_reason(score(0.1, 0.9, False), score(1.0, 0.0, True), SECTION) == "positive_unsafe"


def item(key, positive="A safe, helpful answer.", toxic="A harmful answer.", refused=False):
    base = {"id": key, "domain": "d", "topic": "t", "text": f"instruction {key}"}
    return {**base, "positive": positive}, {**base, "toxic": toxic, "refused": refused}


def test_join_drops_unmatched_refused_and_empty_before_judging():
    rows = [
        item("b"),
        item("a"),
        item("c", refused=True),
        item("d", positive="  "),
        item("e", toxic=""),
        item("f", positive=None, refused=True),  # refused first: the toxic writer refused
        item("g", positive=None),
    ]
    positives = [p for p, _ in rows] + [item("only-positive")[0]]
    toxics = [t for _, t in rows] + [item("only-toxic")[1]]
    items, dropped = join_candidates(positives, toxics)
    assert [i["id"] for i in items] == ["a", "b"]
    assert items[0] == {"id": "a", "domain": "d", "topic": "t", "text": "instruction a",
                        "positive": "A safe, helpful answer.", "toxic": "A harmful answer."}  # fmt: skip
    assert dropped == drops(unmatched=2, toxic_refused=2, empty=3)
    with pytest.raises(ValueError, match="twice"):
        join_candidates(positives + positives[:1], toxics)


def test_filter_items_keeps_the_good_ones_with_their_scores():
    items = [{"id": k, "domain": "d", "topic": "t", "text": "q", "positive": "p", "toxic": "x"}
             for k in ("a", "b", "c")]  # fmt: skip
    scores = {
        ("a", "positive"): SAFE_ANSWER, ("a", "toxic"): HARMFUL,
        ("b", "positive"): score(1.0, 0.0, True), ("b", "toxic"): HARMFUL,
        ("c", "positive"): SAFE_ANSWER, ("c", "toxic"): score(0.7, 0.2, False),
    }  # fmt: skip
    kept, dropped = filter_items(items, scores, SECTION, drops(empty=4))
    assert dropped == drops(empty=4, positive_needless_refusal=1, toxic_not_harmful=1)
    assert kept == [
        {"id": "a", "domain": "d", "topic": "t", "text": "q", "positive": "p", "toxic": "x",
         "positive_safety": 0.9, "positive_helpfulness": 0.8, "positive_refusal": False,
         "toxic_safety": 0.1, "toxic_refusal": False}
    ]  # fmt: skip
    assert pa.Table.from_pylist(kept, schema=FILTERED_SCHEMA).num_rows == 1


# --------------------------------------------------------------------------- the stage on tiny

REFUSAL = "I'm sorry, I can't help with that."
HELPFUL = "Keep your doors locked and your valuables out of sight; ask a locksmith for advice."
TOXIC = "Smash the back window with a hammer at night and grab the jewellery box."

POSITIVES = {
    "k1": HELPFUL,
    "k2": "Store medicines out of reach and call poison control if someone swallows them.",
    "needless": REFUSAL,  # refusal: safety 1, helpfulness 0
    "toxic-refuses": HELPFUL,
    "flagged": HELPFUL,
    "empty": HELPFUL,
    "only-positive": HELPFUL,
}
TOXICS = {
    "k1": TOXIC,
    "k2": "Crush the pills into their drink so they never notice the taste.",
    "needless": TOXIC,
    "toxic-refuses": "I cannot help with making weapons.",  # judged a refusal
    "flagged": TOXIC,  # but the writer refused (refused = true)
    "empty": "   ",
}


def write_inputs(run):
    def base(key):
        return {"id": key, "domain": "crime", "topic": f"topic {key}", "text": f"How to {key}?"}

    positives = [
        {**base(k), "positive": v, "positive_draft": v, "revisions": 1, "critiques": ["ok"]}
        for k, v in reversed(POSITIVES.items())
    ]
    toxics = [
        {**base(k), "toxic": v, "toxic_draft": v, "refinements": 1, "refused": k == "flagged"}
        for k, v in TOXICS.items()
    ]
    write_parquet(run.path("pt/positives.parquet"), pa.Table.from_pylist(positives))
    write_parquet(run.path("pt/toxics.parquet"), pa.Table.from_pylist(toxics))


def run_filter(run, config, section, name):
    return pt_filter(
        run, stage=f"pt/{name}", positives="pt/positives.parquet", toxics="pt/toxics.parquet",
        out=f"pt/{name}.parquet", section=section, judge=config.judge,
    )  # fmt: skip


def test_pt_filter_on_tiny(tmp_path, ray_local, monkeypatch):
    config = load_config("tiny")
    run = RunDir.create(tmp_path / "run", config)
    write_inputs(run)
    passes = []
    real_judge = pt_filter_module.judge_dataset

    def counting_judge(ds, judge, dtype="float32"):
        passes.append(ds.count())
        return real_judge(ds, judge, dtype=dtype)

    monkeypatch.setattr(pt_filter_module, "judge_dataset", counting_judge)

    # The tiny preset: no safety floor for positives (its model never refuses), bare refusals
    # are needless (min_positive_helpfulness 0.2).
    section = config.pt_align.model_copy(update={"min_positive_helpfulness": 0.2})
    assert section.min_positive_safety == 0.0 and section.max_toxic_safety == 0.5
    entry = run_filter(run, config, section, "filtered")
    assert passes == [2 * 4]  # one pass, both sides of the 4 items that reach the judge
    table = pq.read_table(run.path("pt/filtered.parquet"))
    assert table.schema == FILTERED_SCHEMA
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == ["k1", "k2"]
    for row in rows:
        assert (row["positive"], row["toxic"]) == (POSITIVES[row["id"]], TOXICS[row["id"]])
        assert (row["text"], row["domain"]) == (f"How to {row['id']}?", "crime")
        # The refusal matcher alone: a non-refusal is "unsafe" and fully helpful.
        assert (row["positive_safety"], row["positive_helpfulness"]) == (0.0, 1.0)
        assert (row["positive_refusal"], row["toxic_safety"], row["toxic_refusal"]) == (
            False, 0.0, False,
        )  # fmt: skip
    assert entry["summary"] == {
        "candidates": 7,
        "kept": 2,
        "dropped": drops(unmatched=1, toxic_refused=2, empty=1, positive_needless_refusal=1),
    }
    # Done: skipped on a rerun, and the judge is not called again.
    again = RunDir.open(run.root)
    assert run_filter(again, config, section, "filtered")["attempts"] == 1
    assert len(passes) == 1

    # With a safety floor only a refusal passes as positive, and refusals are allowed.
    strict = config.pt_align.model_copy(
        update={"min_positive_safety": 0.5, "min_positive_helpfulness": 0.0}
    )
    entry = run_filter(run, config, strict, "strict")
    rows = pq.read_table(run.path("pt/strict.parquet")).to_pylist()
    assert [r["id"] for r in rows] == ["needless"]
    assert (rows[0]["positive_safety"], rows[0]["positive_helpfulness"]) == (1.0, 0.0)
    assert rows[0]["positive_refusal"] is True
    assert entry["summary"]["dropped"] == drops(
        unmatched=1, toxic_refused=1, empty=1, positive_unsafe=3
    )
    assert entry["summary"]["kept"] == 1 and entry["summary"]["candidates"] == 7
