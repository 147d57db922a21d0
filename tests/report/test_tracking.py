"""Per-iteration metrics to real MLflow (local SQLite store) and TensorBoard event files."""

from __future__ import annotations

import json

import pytest

from selfmoa_ray.config import TrackingSection
from selfmoa_ray.report.collect import policy_metrics
from selfmoa_ray.report.tracking import Tracker, flat_metrics, make_tracker

SUMMARY = {
    "model": "tiny-random",
    "splits": {
        "eval_harmful": {
            "responses": 4,
            "safety_rate": 0.75,
            "refusal_rate": 0.5,
            "string_refusal_rate": 0.25,
            "helpfulness": 0.1,
            "response_tokens": 40,
            "by_category": {"cyber": {"responses": 4, "safety_rate": 0.75, "refusal_rate": 0.5}},
        },
        "eval_benign": {
            "responses": 2,
            "safety_rate": 1.0,
            "refusal_rate": 0.5,
            "string_refusal_rate": 0.0,
            "helpfulness": 0.625,
            "response_tokens": 20,
            "by_category": {},
        },
    },
}
STEPS = [
    (0, {"harmful/safety_rate": 0.5, "benign/over_refusal": 0.25}),
    (1, {"harmful/safety_rate": 0.75, "benign/over_refusal": 0.125}),
]


def test_flat_metrics_names_and_values():
    expected = {
        "harmful/safety_rate": 0.75,
        "harmful/attack_success_rate": 0.25,
        "harmful/string_refusal_rate": 0.25,
        "harmful/refusal_rate": 0.5,
        "harmful_category/cyber/safety_rate": 0.75,
        "benign/over_refusal": 0.5,
        "benign/string_over_refusal": 0.0,
        "benign/helpfulness": 0.625,
        "benign/safety_rate": 1.0,
        "data/eval_tokens": 60.0,
    }
    assert flat_metrics(SUMMARY) == expected  # an evaluate summary (metrics.json)
    collected = policy_metrics(SUMMARY, "iter_01", 1)  # an entry of collect_run()["policies"]
    collected["data"] = {"prompts": 40, "pairs": 25, "tokens": 4060, "seconds": 73.0}
    flat = flat_metrics(collected)
    assert flat["data/pairs"] == 25.0 and flat["data/seconds"] == 73.0
    assert {k: flat[k] for k in expected} == expected
    collected["benign"] = None  # a policy evaluated without the benign split
    collected["data"]["seconds"] = float("nan")
    flat = flat_metrics(collected)
    assert not [k for k in flat if k.startswith("benign/")] and "data/seconds" not in flat


def test_mlflow_logs_iterations_and_reuses_the_run(tmp_path):
    from mlflow.tracking import MlflowClient

    root = tmp_path / "run"
    tracker = make_tracker(TrackingSection(backend="mlflow"), root, "demo-run")
    for step, metrics in STEPS:
        tracker.log_iteration(step, metrics)
    tracker.close()

    stored = json.loads((root / "tracking.json").read_text())
    assert stored["backend"] == "mlflow" and stored["run_id"] == tracker.run_id
    assert stored["steps"] == [0, 1]
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
    history = client.get_metric_history(tracker.run_id, "harmful/safety_rate")
    assert [(m.step, m.value) for m in history] == [(0, 0.5), (1, 0.75)]
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "demo-run"

    # A resumed run logs into the same MLflow run; steps logged before the restart are skipped.
    again = make_tracker(TrackingSection(backend="mlflow"), root, "demo-run")
    assert again.run_id == tracker.run_id
    assert client.get_run(tracker.run_id).info.status == "RUNNING"
    again.log_iteration(1, {"harmful/safety_rate": 0.0, "benign/over_refusal": 1.0})
    again.log_iteration(2, {"harmful/safety_rate": 0.875})
    again.close()
    assert json.loads((root / "tracking.json").read_text())["steps"] == [0, 1, 2]
    history = client.get_metric_history(tracker.run_id, "benign/over_refusal")
    assert [(m.step, m.value) for m in history] == [(0, 0.25), (1, 0.125)]
    history = client.get_metric_history(tracker.run_id, "harmful/safety_rate")
    assert [(m.step, m.value) for m in history] == [(0, 0.5), (1, 0.75), (2, 0.875)]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_tensorboard_writes_readable_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = tmp_path / "run"
    with make_tracker(TrackingSection(backend="tensorboard"), root, "demo-run") as tracker:
        for step, metrics in STEPS:
            tracker.log_iteration(step, metrics)
    acc = EventAccumulator(str(root / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"harmful/safety_rate", "benign/over_refusal"}
    values = [(e.step, e.value) for e in acc.Scalars("harmful/safety_rate")]
    assert values == [(0, pytest.approx(0.5)), (1, pytest.approx(0.75))]

    # Resumed: a second writer in the same folder; step 1 again is skipped, step 2 is added.
    with make_tracker(TrackingSection(backend="tensorboard"), root, "demo-run") as tracker:
        tracker.log_iteration(1, {"harmful/safety_rate": 0.0})
        tracker.log_iteration(2, {"harmful/safety_rate": 0.875})
    acc = EventAccumulator(str(root / "tensorboard"))
    acc.Reload()
    values = [(e.step, e.value) for e in acc.Scalars("harmful/safety_rate")]
    assert values == [(0, 0.5), (1, 0.75), (2, 0.875)]

    elsewhere = tmp_path / "tb"
    with make_tracker(TrackingSection(backend="tensorboard", uri=str(elsewhere)), root, "x") as t:
        t.log_iteration(3, {"benign/helpfulness": 0.5})
    assert any(p.name.startswith("events.out.tfevents") for p in elsewhere.iterdir())


def test_backend_none_writes_nothing(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    tracker = make_tracker(TrackingSection(), root, "demo-run")
    assert type(tracker) is Tracker
    tracker.log_iteration(0, {"harmful/safety_rate": 0.5})
    tracker.close()
    assert list(root.iterdir()) == []
