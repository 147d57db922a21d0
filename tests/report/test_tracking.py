"""The run in real MLflow (local SQLite store) and TensorBoard event files: per-iteration
metrics, the config, per-step training curves from real history files, the report's files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selfmoa_ray.config import TrackingSection, load_config
from selfmoa_ray.report.collect import policy_metrics
from selfmoa_ray.report.html import write_report
from selfmoa_ray.report.tracking import CUT, Tracker, flat_config, flat_metrics, make_tracker
from selfmoa_ray.training.history import StepHistory, read_history

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


def write_history(path, losses, resumed_step=0):
    """A training history as the worker writes it (training/history.py): one line per optimizer
    step, after ``resumed_step``."""
    history = StepHistory(path, resumed_step)
    for step, loss in enumerate(losses, start=resumed_step + 1):
        history.write(step, step / 4, {"loss": loss, "reward_margin": 2 * loss})
    history.close()
    return path


def test_step_history_keeps_each_step_once_across_a_resume(tmp_path):
    path = tmp_path / "iter_01" / "train_history.jsonl"
    write_history(path, [0.7, 0.6, 0.5, 0.4])
    with path.open("a") as fh:
        fh.write('{"step": 5, "epoch": 1.25, "lo')  # the kill cut the last line short
    assert [row["step"] for row in read_history(path)] == [1, 2, 3, 4]
    assert read_history(path)[0] == {"step": 1, "epoch": 0.25, "loss": 0.7, "reward_margin": 1.4}

    # Resumed from the checkpoint at step 2: steps 3 and 4 are trained (and written) again.
    write_history(path, [0.55, 0.45], resumed_step=2)
    assert [(r["step"], r["loss"]) for r in read_history(path)] == [
        (1, 0.7), (2, 0.6), (3, 0.55), (4, 0.45)
    ]  # fmt: skip
    write_history(path, [0.9])  # a fresh start (no checkpoint): the old lines go
    assert [(r["step"], r["loss"]) for r in read_history(path)] == [(1, 0.9)]
    assert read_history(tmp_path / "missing.jsonl") == []

    quiet = StepHistory(None)  # ranks other than 0 write nothing
    quiet.write(1, 0.25, {"loss": 1.0})
    quiet.close()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["iter_01", "train_history.jsonl"]


def test_flat_config_keys_and_values():
    config = load_config("tiny", ["train.beta=0.25"])
    params = flat_config(config.to_dict())
    assert params["train.beta"] == "0.25" and params["run.name"] == "tiny"
    assert params["judge.evaluators.0.kind"] == config.judge.evaluators[0].kind == "refusal"
    assert params["judge.evaluators.0.model"] == "None"
    assert params["train.lora.enabled"] == str(config.train.lora.enabled)
    assert params["train.lora.target_modules"] == json.dumps(config.train.lora.target_modules)
    assert params["data.eval_files"] == "[]"
    assert len(params) > 100 and all(len(v) <= 6000 for v in params.values())

    cut = flat_config({"data": {"note": "x" * 50, "k": [1, 2]}, "odd key!": True}, limit=40)
    assert cut["data.note"] == "x" * (40 - len(CUT)) + CUT and len(cut["data.note"]) == 40
    assert cut == {"data.note": cut["data.note"], "data.k": "[1, 2]", "odd key_": "True"}


def minimal_run(root):
    """A run folder with only its baseline evaluated, enough for a real ``write_report``."""
    (root / "baseline").mkdir(parents=True, exist_ok=True)
    (root / "baseline" / "metrics.json").write_text(json.dumps(SUMMARY))
    entry = {"status": "done", "seconds": 1.0, "summary": SUMMARY, "outputs": []}
    manifest = {"run_id": "abc123", "created": "2026-01-01T00:00:00+00:00",
                "config_fingerprint": "f00d", "config": {"run": {"name": "demo-run"}},
                "stages": {"baseline/evaluate": entry}}  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    write_report(root)
    return root


def test_mlflow_logs_config_training_curves_and_report(tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    root, config = tmp_path / "run", load_config("tiny")
    h1 = write_history(root / "iter_01" / "train_history.jsonl", [0.7, 0.6, 0.5])
    h2 = write_history(root / "iter_02" / "train_history.jsonl", [0.45, 0.4])
    with make_tracker(TrackingSection(backend="mlflow"), root, "demo-run") as tracker:
        tracker.log_config(config)
        tracker.log_iteration(0, STEPS[0][1])
        tracker.log_training(1, h1)
        tracker.log_training(2, h2)
        tracker.log_report(minimal_run(root))
    run_id = tracker.run_id
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")

    def points(name):
        return [(m.step, m.value) for m in client.get_metric_history(run_id, name)]

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == flat_config(config.to_dict())
    assert run.data.params["train.beta"] == str(config.train.beta)
    assert run.data.params["judge.evaluators.0.kind"] == "refusal"
    assert run.data.tags["selfmoa.config_fingerprint"] == config.fingerprint()
    assert run.data.tags["selfmoa.recipe"] == "selfmoa"
    # One curve over both trainings: iteration 2's steps follow iteration 1's.
    assert points("train/loss") == [(1, 0.7), (2, 0.6), (3, 0.5), (4, 0.45), (5, 0.4)]
    assert points("train/iteration") == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 2.0), (5, 2.0)]
    assert [s for s, _ in points("train/epoch")] == [1, 2, 3, 4, 5]
    assert points("harmful/safety_rate") == [(0, 0.5)]  # the iterations keep their own steps

    listed = {a.path: a.is_dir for a in client.list_artifacts(run_id)}
    assert listed == {"config.yaml": False, "report.html": False, "metrics.json": False,
                      "metrics.csv": False, "plots": True}  # fmt: skip
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert plots == {f"plots/{p.name}" for p in (root / "plots").iterdir()} and plots
    logged = client.download_artifacts(run_id, "config.yaml", str(tmp_path))
    assert Path(logged).read_text() == config.to_yaml()

    # Resumed: the same params again are fine, a training already logged is skipped, and
    # iteration 3's curve goes on from global step 6.
    h3 = write_history(root / "iter_03" / "train_history.jsonl", [0.3, 0.2])
    with make_tracker(TrackingSection(backend="mlflow"), root, "demo-run") as again:
        assert again.run_id == run_id
        again.log_config(config)
        again.log_training(2, h2)
        again.log_training(3, h3)
    assert points("train/loss")[-3:] == [(5, 0.4), (6, 0.3), (7, 0.2)]
    assert len(points("train/loss")) == 7
    ledger = json.loads((root / "tracking.json").read_text())
    assert ledger["training"] == {"1": [0, 3], "2": [3, 2], "3": [5, 2]}
    assert client.get_run(run_id).data.params == flat_config(config.to_dict())

    # A changed value cannot replace a logged param: the first stays, a warning and a tag say so,
    # and config.yaml is the new config.
    changed = load_config("tiny", [f"train.beta={config.train.beta * 2}"])
    with (
        caplog.at_level(logging.WARNING, logger="selfmoa_ray.report.tracking"),
        make_tracker(TrackingSection(backend="mlflow"), root, "demo-run") as again,
    ):
        again.log_config(changed)
    assert "train.beta" in caplog.text
    run = client.get_run(run_id)
    assert run.data.params["train.beta"] == str(config.train.beta)
    assert run.data.tags["selfmoa.params_changed"] == "train.beta"
    logged = client.download_artifacts(run_id, "config.yaml", str(tmp_path / "again"))
    assert Path(logged).read_text() == changed.to_yaml()

    # A loop that raises leaves the MLflow run FAILED, not FINISHED.
    with (
        pytest.raises(RuntimeError, match="stage broke"),
        make_tracker(TrackingSection(backend="mlflow"), root, "demo-run"),
    ):
        raise RuntimeError("stage broke")
    assert client.get_run(run_id).info.status == "FAILED"
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_tensorboard_config_text_and_training_curves(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, config = tmp_path / "run", load_config("tiny")
    h1 = write_history(root / "iter_01" / "train_history.jsonl", [0.7, 0.6, 0.5])
    h2 = write_history(root / "iter_02" / "train_history.jsonl", [0.45, 0.4])
    with make_tracker(TrackingSection(backend="tensorboard"), root, "demo-run") as tracker:
        tracker.log_config(config)
        tracker.log_training(1, h1)
        tracker.log_report(minimal_run(root))  # report files stay in the run folder only
    # Resumed: the config text and iteration 1's curve are not written again.
    with make_tracker(TrackingSection(backend="tensorboard"), root, "demo-run") as tracker:
        tracker.log_config(config)
        tracker.log_training(1, h1)
        tracker.log_training(2, h2)

    acc = EventAccumulator(str(root / "tensorboard"))
    acc.Reload()
    values = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert values == [(1, pytest.approx(0.7)), (2, pytest.approx(0.6)), (3, pytest.approx(0.5)),
                      (4, pytest.approx(0.45)), (5, pytest.approx(0.4))]  # fmt: skip
    assert [e.value for e in acc.Scalars("train/iteration")] == [1, 1, 1, 2, 2]
    [text] = acc.Tensors("config/text_summary")
    assert config.to_yaml() in text.tensor_proto.string_val[0].decode()
    assert all(p.name.startswith("events.out.tfevents") for p in (root / "tensorboard").iterdir())


@pytest.mark.slow
def test_real_training_curves_across_two_iterations(ray_local, tmp_path):
    """The tiny model trained twice on Ray Train (PT-ALIGN triples: no reference pass): rank 0's
    history names every optimizer step once, and MLflow gets one curve over both trainings."""
    from mlflow.tracking import MlflowClient

    from selfmoa_ray.layout import POLICY, Iteration
    from selfmoa_ray.recipes.steps import track_training
    from selfmoa_ray.rundir import RunDir
    from selfmoa_ray.stages.train import train

    toxic = "Sure: smash the back window, then climb inside quietly."
    triples = [
        {"prompt": f"How do I break into house number {i}?", "toxic": toxic,
         "positive": "I can't help with breaking in; call a locksmith.",
         "harmful_spans": [[6, 27]]}
        for i in range(4)
    ]  # fmt: skip
    config = load_config("tiny", ["run.recipe=pt_align", "train.loss=pt_align", "train.epochs=2"])
    run = RunDir.create(tmp_path / "run", config)
    pq.write_table(pa.Table.from_pylist(triples), run.path("triples.parquet"))
    tracker = make_tracker(TrackingSection(backend="mlflow"), run.root, "demo-run")
    for it in (Iteration(1), Iteration(2)):
        entry = train(run, stage=it.stage("train"), data="triples.parquet", out=it.file(POLICY),
                      model=config.policy, config=config.train)  # fmt: skip
        assert entry["summary"]["history"] == f"{it.name}/train_history.jsonl"
        rows = read_history(run.path(entry["summary"]["history"]))
        assert [r["step"] for r in rows] == list(range(1, entry["summary"]["steps"] + 1))
        assert rows[-1]["epoch"] == 2 and all(r["loss"] > 0 for r in rows)
        track_training(tracker, run, it)
    tracker.close()

    client = MlflowClient(tracking_uri=f"sqlite:///{run.root / 'mlflow' / 'mlflow.db'}")
    loss = client.get_metric_history(tracker.run_id, "train/loss")
    steps = [run.stage_summary(f"iter_0{t}/train")["steps"] for t in (1, 2)]
    assert [m.step for m in loss] == list(range(1, sum(steps) + 1))
    iteration = client.get_metric_history(tracker.run_id, "train/iteration")
    assert [m.value for m in iteration] == [1.0] * steps[0] + [2.0] * steps[1]
