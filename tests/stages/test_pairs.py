"""Self-MOA pair construction: each selection rule on crafted scores, and the stage on real files."""

import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selfmoa_ray.config import PairsSection, TrainSection, load_config
from selfmoa_ray.rundir import RunDir
from selfmoa_ray.schema import PAIR_SCHEMA
from selfmoa_ray.stages.pairs import DROP_REASONS, build_pairs, pairs
from selfmoa_ray.training.data import messages_of, text_of
from selfmoa_ray.training.objective import check_columns

THRESHOLD = 0.5
MARGIN = PairsSection(mode="margin", min_gap=0.1)


def response(
    pid, index, safety, helpfulness, text=None, split="redteam", category="cyber", refusal=False
):
    return {
        "refusal": refusal,
        "id": pid,
        "text": f"prompt {pid}",
        "category": category,
        "split": split,
        "sample_index": index,
        "response": f"answer {pid}/{index}" if text is None else text,
        "safety": safety,
        "helpfulness": helpfulness,
    }


def chosen_rejected(rows, section=MARGIN):
    built, dropped = build_pairs(rows, section, THRESHOLD)
    assert len(built) == 1, dropped
    return built[0]["chosen_index"], built[0]["rejected_index"]


def only_drop(rows, section=MARGIN):
    built, dropped = build_pairs(rows, section, THRESHOLD)
    assert built == []
    return [reason for reason, n in dropped.items() if n]


# --------------------------------------------------------------------------- margin mode


def test_margin_picks_most_helpful_safe_against_least_safe():
    rows = [
        response("a", 0, safety=0.9, helpfulness=0.3),
        response("a", 1, safety=0.1, helpfulness=0.95),  # most helpful overall, but unsafe
        response("a", 2, safety=0.8, helpfulness=0.7),  # most helpful safe
        response("a", 3, safety=0.3, helpfulness=0.2),
    ]
    built, dropped = build_pairs(rows, MARGIN, THRESHOLD)
    assert dropped == dict.fromkeys(DROP_REASONS, 0)
    (row,) = built
    assert (row["chosen_index"], row["rejected_index"]) == (2, 1)
    assert row["chosen"] == [{"role": "assistant", "content": "answer a/2"}]
    assert row["rejected"] == [{"role": "assistant", "content": "answer a/1"}]
    assert row["prompt"] == [{"role": "user", "content": "prompt a"}]
    assert (row["chosen_safety"], row["rejected_safety"]) == (0.8, 0.1)
    assert (row["chosen_helpfulness"], row["rejected_helpfulness"]) == (0.7, 0.95)
    assert row["safety_delta"] == pytest.approx(0.7)
    assert (row["id"], row["category"], row["split"]) == ("a", "cyber", "redteam")


def test_an_unsafe_rejected_needs_no_helpfulness_gap():
    # Rejected is more helpful than chosen: kept anyway, the safety margin carries the pair.
    rows = [response("a", 0, 0.9, 0.4), response("a", 1, 0.2, 0.9)]
    assert chosen_rejected(rows) == (0, 1)


def test_all_safe_uses_helpfulness_and_the_min_gap():
    section = PairsSection(mode="margin", min_gap=0.1)
    at_gap = [response("a", 0, 0.9, 0.6), response("a", 1, 0.6, 0.7), response("a", 2, 0.7, 0.65)]
    assert chosen_rejected(at_gap, section) == (1, 0)  # 0.7 - 0.6 counts as 0.1
    above = [response("a", 0, 0.9, 0.59), response("a", 1, 0.6, 0.7)]
    assert chosen_rejected(above, section) == (1, 0)
    below = [response("a", 0, 0.9, 0.61), response("a", 1, 0.6, 0.7)]
    assert only_drop(below, section) == ["gap_below_min"]


def test_all_safe_pair_has_a_signed_safety_delta():
    rows = [response("a", 0, 0.95, 0.2), response("a", 1, 0.6, 0.9)]
    built, _ = build_pairs(rows, MARGIN, THRESHOLD)
    # The more helpful answer is the less safe one: the margin is negative, MODPO pushes less.
    assert built[0]["safety_delta"] == pytest.approx(0.6 - 0.95)
    assert built[0]["safety_delta"] < 0


def test_no_safe_response_is_dropped():
    rows = [response("a", 0, 0.2, 0.9), response("a", 1, 0.49, 0.5)]
    assert only_drop(rows) == ["no_safe_response"]


def test_threshold_itself_counts_as_safe():
    rows = [response("a", 0, 0.5, 0.9), response("a", 1, 0.49, 0.5)]
    assert chosen_rejected(rows) == (0, 1)


def test_single_response_is_dropped():
    assert only_drop([response("a", 0, 0.9, 0.9)]) == ["single_response"]
    assert only_drop([response("a", 0, 0.9, 0.9)], PairsSection(mode="weighted")) == [
        "single_response"
    ]


def test_identical_texts_are_dropped():
    rows = [
        response("a", 0, 0.9, 0.9, text="Sorry, I can't help."),
        response("a", 1, 0.2, 0.1, text="  Sorry, I can't help.\n"),
    ]
    assert only_drop(rows) == ["identical_responses"]
    assert only_drop(rows, PairsSection(mode="weighted")) == ["identical_responses"]


def test_empty_responses_are_never_paired():
    # The empty answer is the most helpful safe one: skipped, the next safe one is chosen.
    rows = [
        response("a", 0, 0.9, 0.99, text="   "),
        response("a", 1, 0.8, 0.5),
        response("a", 2, 0.1, 0.2),
    ]
    assert chosen_rejected(rows) == (1, 2)
    # An empty unsafe answer is not rejected either (the trainer refuses empty responses).
    rows = [response("a", 0, 0.1, 0.0, text=""), response("a", 1, 0.8, 0.5)]
    assert only_drop(rows) == ["empty_response"]
    rows = [response("a", 0, 0.9, 0.9, text=" "), response("a", 1, 0.2, 0.5)]
    assert only_drop(rows) == ["empty_response"]
    assert only_drop(rows, PairsSection(mode="weighted")) == ["empty_response"]


def test_margin_ties_are_broken_deterministically():
    # Chosen ties on helpfulness: higher safety wins, then the lower sample_index.
    rows = [
        response("a", 0, 0.7, 0.8),
        response("a", 1, 0.9, 0.8),
        response("a", 2, 0.9, 0.8),
        response("a", 3, 0.1, 0.3),
    ]
    assert chosen_rejected(rows) == (1, 3)
    # Rejected (unsafe) ties on safety: higher helpfulness, then the lower sample_index.
    rows = [
        response("a", 0, 0.9, 0.8),
        response("a", 1, 0.1, 0.2),
        response("a", 2, 0.1, 0.6),
        response("a", 3, 0.1, 0.6),
    ]
    assert chosen_rejected(rows) == (0, 2)
    # Rejected (all safe) ties on helpfulness: lower safety, then the higher sample_index.
    rows = [
        response("a", 0, 0.9, 0.8),
        response("a", 1, 0.6, 0.2),
        response("a", 2, 0.6, 0.2),
        response("a", 3, 0.7, 0.2),
    ]
    assert chosen_rejected(rows) == (0, 2)
    # Input order does not matter.
    assert chosen_rejected(list(reversed(rows))) == (0, 2)


# --------------------------------------------------------------------------- scalarised mode


def test_scalarised_weights_set_the_orientation():
    rows = [response("a", 0, 0.9, 0.2), response("a", 1, 0.5, 0.5), response("a", 2, 0.1, 0.9)]
    safety_only = PairsSection(
        mode="weighted", min_gap=0.1, rank_w_safety=1.0, rank_w_helpfulness=0.0
    )
    helpful_only = PairsSection(
        mode="weighted", min_gap=0.1, rank_w_safety=0.0, rank_w_helpfulness=1.0
    )
    assert chosen_rejected(rows, safety_only) == (0, 2)
    assert chosen_rejected(rows, helpful_only) == (2, 0)
    built, _ = build_pairs(rows, helpful_only, THRESHOLD)
    # Scalarised mode may choose an unsafe answer (that is the weights' call): delta is negative.
    assert built[0]["safety_delta"] == pytest.approx(0.1 - 0.9)


def test_scalarised_gap_and_ties():
    section = PairsSection(mode="weighted", min_gap=0.2, rank_w_safety=0.5, rank_w_helpfulness=0.5)
    # Scores 0.5, 0.5, 0.3, 0.3: chosen = lowest index among the best, rejected = highest among
    # the worst; the gap is exactly 0.2.
    rows = [
        response("a", 0, 0.6, 0.4),
        response("a", 1, 0.4, 0.6),
        response("a", 2, 0.3, 0.3),
        response("a", 3, 0.5, 0.1),
    ]
    assert chosen_rejected(rows, section) == (0, 3)
    closer = [response("a", 0, 0.6, 0.4), response("a", 1, 0.4, 0.21)]  # gap 0.195
    assert only_drop(closer, section) == ["gap_below_min"]


def test_prompts_come_out_sorted_and_counted():
    rows = [
        response("c", 0, 0.9, 0.9),
        response("c", 1, 0.2, 0.9),
        response("a", 1, 0.1, 0.1),
        response("a", 0, 0.2, 0.1),
        response("b", 0, 0.9, 0.9),
        response("b", 1, 0.6, 0.1, split="benign"),
        response("d", 0, 0.9, 0.9),
    ]
    built, dropped = build_pairs(rows, MARGIN, THRESHOLD)
    assert [r["id"] for r in built] == ["b", "c"]
    assert dropped == {
        "single_response": 1,
        "no_safe_response": 1,
        "empty_response": 0,
        "identical_responses": 0,
        "gap_below_min": 0,
        "no_helpful_response": 0,
    }


# --------------------------------------------------------------------------- intent mode

INTENT = PairsSection(mode="intent", min_gap=0.1)


def test_intent_prefers_a_refusal_to_a_safer_deflection_on_an_attack():
    rows = [
        response("a", 0, safety=0.95, helpfulness=0.6),  # judged safest: a deflection
        response("a", 1, safety=0.7, helpfulness=0.1, refusal=True),
        response("a", 2, safety=0.2, helpfulness=0.9),  # the compliance
        response("a", 3, safety=0.4, helpfulness=0.8, refusal=True),
    ]
    assert chosen_rejected(rows, INTENT) == (1, 2)


def test_intent_on_an_attack_without_refusals_follows_safety_and_the_gap():
    rows = [response("a", 0, 0.6, 0.5), response("a", 1, 0.9, 0.2), response("a", 2, 0.3, 0.9)]
    assert chosen_rejected(rows, INTENT) == (1, 2)
    close = [response("a", 0, 0.9, 0.5), response("a", 1, 0.85, 0.2)]
    assert only_drop(close, INTENT) == ["gap_below_min"]
    # A refusal facing a safe non-refusal is kept whatever the gap: refusing is what an attack
    # calls for.
    refusal_vs_safe = [response("a", 0, 0.8, 0.1, refusal=True), response("a", 1, 0.85, 0.5)]
    assert chosen_rejected(refusal_vs_safe, INTENT) == (0, 1)
    assert only_drop([response("a", 0, 0.2, 0.5), response("a", 1, 0.1, 0.9)], INTENT) == [
        "no_safe_response"
    ]
    all_refuse = [response("a", i, 0.9, 0.1, refusal=True) for i in range(3)]
    assert only_drop(all_refuse, INTENT) == ["gap_below_min"]


def test_intent_on_a_benign_prompt_rejects_the_refusal():
    rows = [
        response("b", 0, 0.99, 0.2, refusal=True, split="benign"),
        response("b", 1, 0.7, 0.8, split="benign"),
        response("b", 2, 0.8, 0.6, split="benign"),
        response("b", 3, 0.9, 0.3, refusal=True, split="benign"),
    ]
    # The most helpful non-refusal against the least helpful refusal; no gap needed.
    assert chosen_rejected(rows, INTENT) == (1, 0)
    no_refusal = [
        response("b", 0, 0.7, 0.8, split="benign"),
        response("b", 1, 0.9, 0.75, split="benign"),
    ]
    assert only_drop(no_refusal, INTENT) == ["gap_below_min"]
    assert chosen_rejected(
        [response("b", 0, 0.7, 0.8, split="benign"), response("b", 1, 0.9, 0.5, split="benign")],
        INTENT,
    ) == (0, 1)
    all_refuse = [response("b", i, 0.9, 0.1, refusal=True, split="benign") for i in range(2)]
    assert only_drop(all_refuse, INTENT) == ["no_helpful_response"]


def test_intent_pairs_carry_the_signed_safety_delta():
    rows = [
        response("b", 0, 0.9, 0.1, refusal=True, split="benign"),
        response("b", 1, 0.6, 0.8, split="benign"),
    ]
    (row,), _ = build_pairs(rows, INTENT, THRESHOLD)
    assert row["safety_delta"] == pytest.approx(-0.3)  # the helpful answer was judged less safe


# --------------------------------------------------------------------------- the stage


def scored_rows():
    return [
        # attack with a successful jailbreak: pair (1, 0)
        response("p1", 0, 0.1, 0.9, category="cyber"),
        response("p1", 1, 0.9, 0.4, category="cyber"),
        # benign, all safe, helpful gap 0.5: pair (0, 1)
        response("p2", 0, 0.9, 0.8, split="benign", category="benign"),
        response("p2", 1, 0.95, 0.3, split="benign", category="benign"),
        # attack, never safe: dropped
        response("p3", 0, 0.1, 0.9, category="bio"),
        response("p3", 1, 0.2, 0.9, category="bio"),
        # benign, gap too small: dropped
        response("p4", 0, 0.9, 0.5, split="benign", category="benign"),
        response("p4", 1, 0.9, 0.45, split="benign", category="benign"),
    ]


def write_scored(run, rows, rel="iter_01/scored.parquet"):
    """A scored Parquet *folder* of two files, as Ray Data writes it, plus an evaluator column."""
    folder = run.path(rel)
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    table = table.append_column("per_evaluator_x", pa.array([0.0] * len(rows)))
    half = len(rows) // 2
    pq.write_table(table.slice(0, half), folder / "part-0.parquet")
    pq.write_table(table.slice(half), folder / "part-1.parquet")
    return rel


@pytest.fixture
def run(tmp_path):
    return RunDir.create(tmp_path / "run", load_config("tiny"))


def run_pairs(run, scored, out="iter_01/pairs.parquet", section=MARGIN):
    return pairs(
        run, stage="iter_01/pairs", scored=scored, out=out, section=section,
        unsafe_threshold=THRESHOLD,
    )  # fmt: skip


def test_stage_writes_typed_pairs_and_a_summary(run, caplog):
    scored = write_scored(run, scored_rows())
    with caplog.at_level(logging.INFO, logger="selfmoa_ray.stages.pairs"):
        entry = run_pairs(run, scored)
    assert entry["status"] == "done"
    assert entry["summary"] == {
        "mode": "margin",
        "prompts": 4,
        "pairs": 2,
        "dropped": {
            "single_response": 0,
            "no_safe_response": 1,
            "empty_response": 0,
            "identical_responses": 0,
            "gap_below_min": 1,
            "no_helpful_response": 0,
        },
        "by_split": {"benign": 1, "redteam": 1},
    }
    assert "kept 2 pairs of 4 prompts" in caplog.text
    table = pq.read_table(run.path("iter_01/pairs.parquet"))
    assert table.schema.equals(PAIR_SCHEMA)
    rows = table.to_pylist()
    assert [(r["id"], r["chosen_index"], r["rejected_index"]) for r in rows] == [
        ("p1", 1, 0),
        ("p2", 0, 1),
    ]
    assert rows[0]["safety_delta"] == pytest.approx(0.8)

    # Done stages are skipped: same entry, one attempt, even with a missing input.
    again = RunDir.open(run.root)
    assert run_pairs(again, "iter_01/missing.parquet")["attempts"] == 1


def test_zero_pairs_write_a_valid_empty_file(run):
    scored = write_scored(run, [response("a", 0, 0.1, 0.9), response("a", 1, 0.2, 0.9)])
    entry = run_pairs(run, scored)
    assert entry["summary"]["pairs"] == 0
    assert entry["summary"]["dropped"]["no_safe_response"] == 1
    assert entry["summary"]["by_split"] == {"redteam": 0}
    table = pq.read_table(run.path("iter_01/pairs.parquet"))
    assert table.num_rows == 0 and table.schema.equals(PAIR_SCHEMA)


def test_missing_score_column_is_a_clear_error(run):
    rows = [{k: v for k, v in r.items() if k != "helpfulness"} for r in scored_rows()]
    scored = write_scored(run, rows)
    with pytest.raises(ValueError, match="helpfulness"):
        run_pairs(run, scored)
    assert run.stage_status("iter_01/pairs") == "failed"


def test_pairs_file_is_what_the_trainer_reads(run):
    scored = write_scored(run, scored_rows())
    run_pairs(run, scored)
    table = pq.read_table(run.path("iter_01/pairs.parquet"))
    reference = ["ref_chosen_logps", "ref_rejected_logps"]
    for name in reference:
        table = table.append_column(name, pa.array([-1.0] * table.num_rows))
    for loss in ("modpo", "dpo", "scalarised_dpo"):
        check_columns(TrainSection(loss=loss), table.column_names)
    for row in table.to_pylist():
        assert messages_of(row["prompt"]) == [{"role": "user", "content": f"prompt {row['id']}"}]
        assert text_of(row["chosen"], "chosen") == f"answer {row['id']}/{row['chosen_index']}"
        assert text_of(row["rejected"], "rejected") == f"answer {row['id']}/{row['rejected_index']}"
