"""PT-ALIGN, the combined recipe and the comparison job on ``tiny``, on a real local Ray."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from selfmoa_ray.cli import main
from selfmoa_ray.config import load_config
from selfmoa_ray.recipes.compare import (
    comparison_table,
    recipe_name,
    run_comparison,
    shown_policy,
    verdict,
)
from selfmoa_ray.training.data import spans_of

PT_STAGES = (
    "topics",
    "instructions",
    "positive",
    "toxic",
    "filter",
    "triples",
    "train",
    "evaluate",
)


def test_recipe_names_and_bad_seed_files_fail_before_any_work(tmp_path, capsys):
    assert recipe_name("pt-align") == recipe_name("pt_align") == "pt_align"
    with pytest.raises(ValueError, match="unknown recipe 'dpo'"):
        recipe_name("dpo")
    out = tmp_path / "r"
    code = main(["run", "--recipe", "pt-align", "--config", "tiny", "--output-dir", str(out),
                 f"pt_align.seeds={tmp_path / 'missing.yaml'}"])  # fmt: skip
    assert code == 2 and "seed file not found" in capsys.readouterr().err
    code = main(["compare", "--config", "tiny", "--output-dir", str(out),
                 "--recipes", "pt-align,combined", "pt_align.max_human_items=10"])  # fmt: skip
    assert code == 2 and "34 human-written items, more than" in capsys.readouterr().err
    code = main(["compare", "--config", "tiny", "--output-dir", str(out), "--recipes", "dpo"])
    assert code == 2 and "unknown recipe 'dpo'" in capsys.readouterr().err
    assert not out.exists()  # refused before a run folder was made


def test_the_verdict_says_what_the_checks_made_of_the_trained_policies():
    assert verdict({"final_policy": "iter_01"}, "iter_01") == "accepted"
    rejected = {"final_policy": "baseline", "stop_reason": "over-refusal rose +10.0 pts"}
    assert verdict(rejected, "iter_01") == (
        "rejected: over-refusal rose +10.0 pts (the start policy is kept)"
    )
    later = {"final_policy": "iter_02", "stop_reason": "over-refusal rose +6.7 pts"}
    assert (
        verdict(later, "iter_03")
        == "accepted iter_02; iter_03 rejected: over-refusal rose +6.7 pts"
    )
    untrained = {"final_policy": "baseline", "stop_reason": "too few triples to train (0)"}
    assert verdict(untrained, "baseline") == "not trained: too few triples to train (0)"
    # A row shows the policy the recipe keeps; the rejected one when it keeps the start policy.
    assert shown_policy(later, "iter_03") == "iter_02"
    assert shown_policy(rejected, "iter_01") == "iter_01"
    assert shown_policy(untrained, "baseline") == "baseline"


@pytest.fixture(scope="module")
def comparison(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("compare")
    config = load_config("tiny", ["loop.iterations=1"])
    rows = run_comparison(config, root, ["selfmoa", "pt-align", "combined"])
    return root, rows


@pytest.mark.slow
def test_the_comparison_has_one_row_per_recipe(comparison):
    root, rows = comparison
    assert [r["recipe"] for r in rows] == ["selfmoa", "pt_align", "combined"]
    with open(root / "comparison.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [r["recipe"] for r in table] == ["selfmoa", "pt_align", "combined"]
    assert json.loads((root / "comparison.json").read_text()) == rows
    assert (root / "comparison.md").read_text().strip() == comparison_table(rows)
    for row in rows:
        assert row["policy"] == "iter_01" and row["training_examples"] > 0
        assert row["verdict"] == "accepted"  # tiny accepts every iteration
        assert 0 <= row["harmful_safety"] <= 1 and row["wall_seconds"] > 0
        # Each rate with its interval, and its change with the paired interval of the change.
        low, high = row["harmful_safety_interval"]
        assert low <= row["harmful_safety"] <= high
        low, high = row["harmful_strict_refusal_delta_interval"]
        assert low <= row["harmful_strict_refusal_delta"] <= high
        assert Path(row["run_dir"]) == root / row["recipe"]
        assert (root / row["recipe"] / "report.html").exists()
    by = {r["recipe"]: r for r in rows}
    assert by["pt_align"]["human_items"] == 34  # the packaged seed file
    assert by["selfmoa"]["human_items"] == by["combined"]["human_items"] > 0  # their seed prompts
    # The start policy was evaluated once: the other recipes adopted it, so they agree on it.
    for recipe in ("pt_align", "combined"):
        manifest = json.loads((root / recipe / "manifest.json").read_text())
        assert manifest["stages"]["baseline/evaluate"]["adopted_from"] == str(root / "selfmoa")
    baselines = {r: json.loads((root / r / "baseline" / "metrics.json").read_text()) for r in by}
    assert baselines["selfmoa"] == baselines["pt_align"] == baselines["combined"]


@pytest.mark.slow
def test_pt_align_runs_every_stage_and_trains_on_marked_triples(comparison):
    root, _ = comparison
    run = root / "pt_align"
    manifest = json.loads((run / "manifest.json").read_text())
    for stage in PT_STAGES:
        assert manifest["stages"][f"iter_01/{stage}"]["status"] == "done", stage
    assert manifest["loop"]["recipe"] == "pt_align" and manifest["loop"]["human_items"] == 34
    rows = pq.read_table(run / "iter_01" / "triples.parquet").to_pylist()
    triples = [r for r in rows if r["kind"] == "harmful"]
    twins = [r for r in rows if r["kind"] == "benign"]  # tiny: one benign twin per topic
    summary = manifest["stages"]["iter_01/triples"]["summary"]
    assert (len(triples), len(twins)) == (summary["triples"], summary["benign_twins"])
    assert len(triples) > 0 and len(twins) > 0 and len(rows) == len(triples) + len(twins)
    assert all(r["harmful_spans"] == [] and r["toxic"] == r["positive"] for r in twins)
    for row in rows:
        assert row["prompt"] == [{"role": "user", "content": row["prompt"][0]["content"]}]
        assert all(0 <= s < e <= len(row["toxic"]) for s, e in spans_of(row["harmful_spans"]))
    train = manifest["stages"]["iter_01/train"]["summary"]
    assert manifest["config"]["train"]["loss"] == "modpo"  # the recipe trains pt_align itself
    assert "unlikelihood" in json.dumps(train)
    assert (run / "iter_01" / "policy" / "config.json").exists()
    metrics = json.loads((run / "metrics.json").read_text())
    assert [p["name"] for p in metrics["policies"]] == ["baseline", "iter_01"]
    assert metrics["totals"]["human_items"] == 34
    assert metrics["totals"]["pairs"] == len(rows)  # training examples: triples and twins
    # The yield of every step, per domain, in the metrics and the report.
    found = metrics["iterations"][0]["pt_yield"]
    assert [s["step"] for s in found["steps"]] == [
        "topics", "instructions (template writer)", "positive candidates", "toxic candidates",
        "kept items", "triples", "benign twins",
    ]  # fmt: skip
    assert [s["count"] for s in found["steps"][-2:]] == [len(triples), len(twins)]
    assert sum(d["kept"] for d in found["by_domain"].values()) == len(triples)
    assert "PT-ALIGN yield (iter_01)" in (run / "report.html").read_text()
    assert manifest["stages"]["validation"]["status"] == "done"  # training picks its point


@pytest.mark.slow
def test_the_combined_recipe_marks_unsafe_rejected_answers(comparison):
    root, _ = comparison
    run = root / "combined"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["loop"]["recipe"] == "combined"
    assert manifest["stages"]["iter_01/spans"]["status"] == "done"
    marked = pq.read_table(run / "iter_01" / "pairs_marked.parquet").to_pylist()
    pairs = pq.read_table(run / "iter_01" / "pairs.parquet").to_pylist()
    assert [r["id"] for r in marked] == [r["id"] for r in pairs]
    assert any(spans_of(r["harmful_spans"]) for r in marked)
    for row in marked:
        rejected = row["rejected"][0]["content"]
        assert all(0 <= s < e <= len(rejected) for s, e in spans_of(row["harmful_spans"]))
        if row["rejected_safety"] >= 0.5:
            assert not spans_of(row["harmful_spans"])  # only unsafe rejected answers are marked
    # The trainer saw the marks: its reported metrics include the unlikelihood term.
    assert "unlikelihood" in json.dumps(manifest["stages"]["iter_01/train"]["summary"])
