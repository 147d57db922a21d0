"""Judge calibration: held-back human rows, accuracy against their labels, and the cache."""

import json

import pytest

from selfmoa_ray.config import load_config
from selfmoa_ray.evaluators.probe_training import split_of
from selfmoa_ray.rundir import RunDir
from selfmoa_ray.stages.calibrate import MAX_ROWS, accuracy, calibrate, held_back_rows


def test_each_judge_is_scored_on_the_half_held_back_from_it():
    train, audit = held_back_rows("train"), held_back_rows("audit")
    assert len(train) == len(audit) == MAX_ROWS  # a seeded sample of each half
    assert {split_of(r["text"]) for r in train} == {"train"}
    assert {split_of(r["text"]) for r in audit} == {"audit"}
    assert not {r["text"] for r in train} & {r["text"] for r in audit}
    assert {r["task"] for r in train} == {"objective", "harm", "refusal"}
    assert [r["id"] for r in held_back_rows("train")] == [r["id"] for r in train]  # seeded


def test_accuracy_counts_agreement_with_the_human_label():
    judged = [
        {"task": "objective", "label": True, "safety": 0.1, "refusal": False},  # unsafe, said so
        {"task": "objective", "label": True, "safety": 0.9, "refusal": False},  # missed
        {"task": "harm", "label": False, "safety": 0.8, "refusal": False},  # safe, said so
        {"task": "refusal", "label": True, "safety": 0.9, "refusal": True},
        {"task": "refusal", "label": False, "safety": 0.9, "refusal": True},
    ]
    out = accuracy(judged, unsafe_threshold=0.5)
    assert out["objective"]["accuracy"] == 0.5 and out["harm"]["accuracy"] == 1.0
    assert out["safety"] == {"rows": 3, "accuracy": 0.6667, "interval": out["safety"]["interval"]}
    assert out["refusal"]["rows"] == 2 and out["refusal"]["accuracy"] == 0.5
    low, high = out["safety"]["interval"]
    assert low < 0.6667 < high


def test_calibration_is_scored_once_then_read_from_the_cache(tmp_path, ray_local, monkeypatch):
    monkeypatch.setenv("SELFMOA_CACHE", str(tmp_path / "cache"))
    config = load_config("tiny")
    first = RunDir.create(tmp_path / "first", config)
    entry = calibrate(first, stage="calibrate", out="calibration.json", config=config)
    assert entry["summary"]["from_cache"] is False
    figures = json.loads(first.path("calibration.json").read_text())
    for judge in ("training_judge", "audit_judge"):
        assert figures[judge]["safety"]["rows"] + figures[judge]["refusal"]["rows"] == MAX_ROWS
        # the refusal matcher alone: refusing counts as safe, so a harmful compliance is unsafe
        assert 0 < figures[judge]["refusal"]["accuracy"] <= 1
    second = RunDir.create(tmp_path / "second", config)
    entry = calibrate(second, stage="calibrate", out="calibration.json", config=config)
    assert entry["summary"]["from_cache"] is True
    again = json.loads(second.path("calibration.json").read_text())
    assert {k: {**v, "from_cache": False} for k, v in again.items()} == figures
    reseeded = load_config("tiny", ["run.seed=5"])  # the same judges: the same figures
    fourth = RunDir.create(tmp_path / "fourth", reseeded)
    entry = calibrate(fourth, stage="calibrate", out="calibration.json", config=reseeded)
    assert entry["summary"]["from_cache"] is True
    other = load_config("tiny", ["evaluate.judge.unsafe_threshold=0.3"])  # another judge
    third = RunDir.create(tmp_path / "third", other)
    entry = calibrate(third, stage="calibrate", out="calibration.json", config=other)
    assert entry["summary"]["from_cache"] is False


@pytest.mark.parametrize("split", ["eval", ""])
def test_an_unknown_split_is_refused(split):
    with pytest.raises(ValueError, match="probe split must be one of"):
        from selfmoa_ray.evaluators.probe_format import default_probe_dir

        default_probe_dir(split)
