"""The PT-ALIGN filter: joining, each drop reason on crafted scores, and the stage on the tiny
preset, whose refusal-matcher judge we steer with crafted answers (docs/design.md 2.2 step 4)."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selfmoa_ray.config import load_config
from selfmoa_ray.rundir import RunDir, write_parquet
from selfmoa_ray.stages import pt_filter as pt_filter_module
from selfmoa_ray.stages.pt_filter import (
    DROP_REASONS,
    FILTERED_SCHEMA,
    best_positive,
    drop_reason,
    filter_items,
    join_candidates,
    pt_filter,
    worst_toxic,
    yield_by_domain,
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


def test_the_best_positive_is_the_most_helpful_acceptable_one():
    needless, unsafe = score(1.0, 0.1, True), score(0.2, 0.9, False)
    assert best_positive([SAFE_ANSWER, score(0.95, 0.9, True)], SECTION) == 1  # helpful refusal
    assert best_positive([needless, SAFE_ANSWER], SECTION) == 1
    assert best_positive([unsafe, SAFE_ANSWER], SECTION) == 1  # more helpful, but unsafe
    assert best_positive([SAFE_ANSWER, SAFE_ANSWER], SECTION) == 0  # ties: the first
    assert best_positive([score(0.6, 0.8, False), SAFE_ANSWER], SECTION) == 1  # then the safer
    # None acceptable: the safest, whose failure names the drop.
    assert best_positive([unsafe, needless], SECTION) == 1
    assert drop_reason(needless, HARMFUL, SECTION) == "positive_needless_refusal"
    assert drop_reason(unsafe, HARMFUL, SECTION) == "positive_unsafe"
    # A benign twin (no toxic side): kept unless the policy refused it or answered unsafely.
    assert drop_reason(SAFE_ANSWER, None, SECTION) is None
    assert drop_reason(score(1.0, 0.9, True), None, SECTION) == "benign_refused"
    assert drop_reason(unsafe, None, SECTION) == "benign_unsafe"


def test_the_worst_toxic_is_the_least_safe_non_refusal():
    assert worst_toxic([score(0.4, 0.5, False), HARMFUL]) == 1
    assert worst_toxic([score(0.0, 0.0, True), score(0.4, 0.5, False)]) == 1  # not the refusal
    assert worst_toxic([score(0.3, 0.0, True), score(0.1, 0.0, True)]) == 1  # all refuse: dropped
    assert worst_toxic([HARMFUL, HARMFUL]) == 0


def item(key, positive="A safe, helpful answer.", toxic="A harmful answer.", refused=False,
         prefilled=None, bare=()):  # fmt: skip
    base = {"id": key, "domain": "d", "topic": "t", "text": f"instruction {key}"}
    return ({**base, "positive": positive, "prefilled": prefilled},
            {**base, "toxic": toxic, "refused": refused, "bare": list(bare)})  # fmt: skip


def test_join_drops_unmatched_refused_and_empty_before_judging():
    rows = [
        item("b"),
        item("a"),
        item("c", refused=True),
        item("d", positive="  "),
        item("e", toxic=""),
        item("f", positive=None, refused=True),  # refused first: the toxic writer refused
        item("g", positive=None),
        # Other candidates save an item: a prefilled positive, a bare answer that complied.
        item("h", positive=" ", prefilled="I can't, but here is a safer idea."),
        item("i", refused=True, bare=["Sure, here is how."]),
        item("j", toxic=" ", bare=["", "Sure."]),
    ]
    # A benign twin needs no toxic row; an empty answer is dropped as empty. With a prefilled
    # refusal in the toxics file, that is its toxic side.
    twin, empty_twin = item("k")[0], item("l", positive=" ")[0]
    (refused_twin, its_refusal) = item("m", toxic="I can't help with that.")
    twin["kind"] = empty_twin["kind"] = refused_twin["kind"] = its_refusal["kind"] = "benign"
    positives = [p for p, _ in rows] + [item("only-positive")[0], twin, empty_twin, refused_twin]
    toxics = [t for _, t in rows] + [item("only-toxic")[1], its_refusal]
    items, dropped = join_candidates(positives, toxics)
    assert [i["id"] for i in items] == ["a", "b", "h", "i", "j", "k", "m"]
    assert items[0] == {"id": "a", "domain": "d", "topic": "t", "text": "instruction a",
                        "kind": "harmful", "positive": [("guided", "A safe, helpful answer.")],
                        "toxic": [("guided", "A harmful answer.")]}  # fmt: skip
    assert items[-2]["kind"] == "benign" and items[-2]["toxic"] == []
    assert items[-2]["positive"] == [("bare", "A safe, helpful answer.")]
    assert items[-1]["toxic"] == [("refusal", "I can't help with that.")]
    assert items[2]["positive"] == [("prefill", "I can't, but here is a safer idea.")]
    assert items[3]["toxic"] == [("bare", "Sure, here is how.")]
    assert items[4]["toxic"] == [("bare", "Sure.")]
    assert dropped == drops(unmatched=2, toxic_refused=2, empty=4)
    with pytest.raises(ValueError, match="twice"):
        join_candidates(positives + positives[:1], toxics)


def test_filter_items_keeps_the_best_candidates_with_their_scores_and_sources():
    def candidates(*sources):
        return [(source, f"{source} answer") for source in sources]

    items = [
        {"id": k, "domain": "d", "topic": "t", "text": "q", "kind": "harmful",
         "positive": candidates("guided", "prefill"), "toxic": candidates("guided", "bare")}
        for k in ("a", "b", "c")
    ] + [
        {"id": k, "domain": "d", "topic": "t", "text": "q", "kind": "benign",
         "positive": candidates("bare"), "toxic": candidates("refusal") if k == "t3" else []}
        for k in ("t1", "t2", "t3")
    ]  # fmt: skip
    scores = {
        # a: the guided positive complied (unsafe), the prefilled one is kept; the bare toxic
        # answer is less safe than the guided one.
        ("a", "positive", 0): score(0.2, 0.9, False), ("a", "positive", 1): score(0.9, 0.6, True),
        ("a", "toxic", 0): score(0.4, 0.5, False), ("a", "toxic", 1): HARMFUL,
        # b: both positives are needless refusals.
        ("b", "positive", 0): score(1.0, 0.0, True), ("b", "positive", 1): score(1.0, 0.1, True),
        ("b", "toxic", 0): HARMFUL, ("b", "toxic", 1): HARMFUL,
        # c: no toxic candidate is harmful enough.
        ("c", "positive", 0): SAFE_ANSWER, ("c", "positive", 1): SAFE_ANSWER,
        ("c", "toxic", 0): score(0.7, 0.2, False), ("c", "toxic", 1): score(0.6, 0.2, False),
        # the twins: one answered (kept), one refused by the policy (dropped)
        ("t1", "positive", 0): SAFE_ANSWER, ("t2", "positive", 0): score(1.0, 0.0, True),
        ("t3", "positive", 0): SAFE_ANSWER,  # its refusal is not judged
    }  # fmt: skip
    kept, dropped = filter_items(items, scores, SECTION, drops(empty=4))
    assert dropped == drops(empty=4, positive_needless_refusal=1, toxic_not_harmful=1,
                            benign_refused=1)  # fmt: skip
    refused_twin, twin = kept.pop(), kept.pop()
    assert (refused_twin["toxic"], refused_twin["toxic_source"]) == ("refusal answer", "refusal")
    assert twin == {"id": "t1", "domain": "d", "topic": "t", "text": "q", "kind": "benign",
                    "positive": "bare answer", "toxic": "bare answer", "positive_safety": 0.9,
                    "positive_helpfulness": 0.8, "positive_refusal": False, "toxic_safety": None,
                    "toxic_refusal": None, "positive_source": "bare", "toxic_source": None}  # fmt: skip
    assert kept == [
        {"id": "a", "domain": "d", "topic": "t", "text": "q", "kind": "harmful",
         "positive": "prefill answer",
         "toxic": "bare answer", "positive_safety": 0.9, "positive_helpfulness": 0.6,
         "positive_refusal": True, "toxic_safety": 0.1, "toxic_refusal": False,
         "positive_source": "prefill", "toxic_source": "bare"}
    ]  # fmt: skip
    assert pa.Table.from_pylist(kept, schema=FILTERED_SCHEMA).num_rows == 1
    assert yield_by_domain([{"domain": "d"}] * 3 + [{"domain": "e"}], kept) == {
        "d": {"instructions": 3, "kept": 1}, "e": {"instructions": 1, "kept": 0}
    }  # fmt: skip


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


def run_filter(run, config, section, name, inputs=""):
    return pt_filter(
        run, stage=f"pt/{name}", positives=f"pt/positives{inputs}.parquet",
        toxics=f"pt/toxics{inputs}.parquet", out=f"pt/{name}.parquet", section=section,
        judge=config.judge,
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
    # One pass, both sides of the 4 items that reach the judge (files without the optional
    # candidate columns, as an older run wrote them: one candidate a side).
    assert passes == [2 * 4]
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
        "judged_answers": 8,
        "positive_sources": {"guided": 2},
        "toxic_sources": {"guided": 2},
        "by_domain": {"crime": {"instructions": 7, "kept": 2}},
        "benign": {"twins": 0, "kept": 0},
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

    # With more candidates a side: the prefilled refusal is the safe positive, and the bare
    # answer that complied is the toxic one, though the guided toxic writer refused.
    base = {"id": "k1", "domain": "crime", "topic": "t", "text": "How to k1?"}
    write_parquet(run.path("pt/positives2.parquet"), pa.Table.from_pylist(
        [{**base, "positive": HELPFUL, "prefilled": REFUSAL}]))  # fmt: skip
    write_parquet(run.path("pt/toxics2.parquet"), pa.Table.from_pylist(
        [{**base, "toxic": REFUSAL, "refused": True, "bare": [REFUSAL, TOXIC]}]))  # fmt: skip
    entry = run_filter(run, config, strict, "candidates", inputs="2")
    row = pq.read_table(run.path("pt/candidates.parquet")).to_pylist()[0]
    assert (row["positive"], row["positive_source"]) == (REFUSAL, "prefill")
    assert (row["toxic"], row["toxic_source"], row["toxic_safety"]) == (TOXIC, "bare", 0.0)
    assert entry["summary"]["judged_answers"] == 4 and passes[-1] == 4
