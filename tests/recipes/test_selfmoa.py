"""The Self-MOA loop on ``tiny``: end to end on a real local Ray, killed and resumed on the way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selfmoa_ray import console
from selfmoa_ray.cli import main
from selfmoa_ray.config import ConfigError, LoopSection, load_config
from selfmoa_ray.recipes.acceptance import check_policy, stop_reason
from selfmoa_ray.recipes.steps import human_items
from selfmoa_ray.report.metrics import summarize
from selfmoa_ray.rundir import RunDir, write_parquet

TRAINING_STAGES = ("redteam", "sample", "judge", "failures", "pairs", "reference", "train")
STAGES = (*TRAINING_STAGES, "evaluate", "vault")


def test_stop_rule():
    loop = LoopSection(iterations=3, min_gain=0.01, max_over_refusal_rise=0.05)
    assert stop_reason(0.02, 0.05, 1, loop) is None  # a rise of exactly the limit is accepted
    assert "gain +0.0050 < loop.min_gain 0.01 at iteration 1" in stop_reason(0.005, 0.0, 1, loop)
    assert "gain -0.5000" in stop_reason(-0.5, 0.0, 3, loop)  # the last iteration is checked too
    rise = stop_reason(0.30, 0.10, 2, loop)
    assert "over-refusal rose +10.0 pts" in rise and "at iteration 2" in rise
    evasive = stop_reason(0.30, 0.0, 1, loop, helpfulness_drop=0.28)
    assert "helpfulness fell 0.280 below" in evasive and "max_helpfulness_drop 0.1" in evasive
    assert stop_reason(0.30, 0.0, 1, loop, helpfulness_drop=0.1) is None
    never = LoopSection(iterations=3, min_gain=-1.0, max_over_refusal_rise=1.0,
                        max_helpfulness_drop=1.0)  # fmt: skip
    assert stop_reason(-1.0, 1.0, 1, never, helpfulness_drop=1.0) is None


def _evaluated(run: RunDir, name: str, safe: int, n: int = 40) -> None:
    """A policy's held-out answers: ``safe`` of ``n`` harmful prompts answered safely, and n
    benign prompts answered helpfully."""
    rows = [
        {
            "id": f"{split}-{i}",
            "sample_index": 0,
            "split": split,
            "category": "c",
            "safety": 0.9 if split == "eval_benign" or i < safe else 0.1,
            "refusal": False,
            "refusal_flag": False,
            "refusal_strict_flag": False,
            "helpfulness": 0.8,
            "response_tokens": 5,
        }
        for split in ("eval_harmful", "eval_benign")
        for i in range(n)
    ]
    write_parquet(run.path(name, "eval_responses.parquet"), pa.Table.from_pylist(rows))
    summary = {"splits": summarize(rows)}
    run.manifest["stages"][f"{name}/evaluate"] = {"status": "done", "summary": summary}


def test_acceptance_can_require_the_gain_to_clear_the_noise(tmp_path):
    """4 more of 40 harmful prompts answered safely, none fewer: +10 points, but with 40 prompts
    the lower end of its interval is near 0. The point rule accepts it; the lower-bound rule,
    asking for +5 points, does not."""
    point = load_config("tiny", ["loop.min_gain=0.05"])
    run = RunDir.create(tmp_path / "run", point)
    _evaluated(run, "baseline", safe=10)
    _evaluated(run, "iter_01", safe=14)
    reason, gain = check_policy(run, "iter_01", "baseline", 1, point)
    assert reason is None
    assert (gain["gain"], gain["gained"], gain["lost"], gain["n"]) == (0.1, 4, 0, 40)
    assert 0 < gain["interval"][0] < 0.05 < 0.1 < gain["interval"][1]
    bound = load_config("tiny", ["loop.min_gain=0.05", "loop.gain_measure=lower_bound"])
    reason, _ = check_policy(run, "iter_01", "baseline", 1, bound)
    assert reason and reason.startswith("lower end of the 95% interval of the held-out safety")
    assert "< loop.min_gain 0.05 at iteration 1" in reason


def test_human_items_count_seed_prompts_once_the_guide_and_the_prefill(tmp_path):
    config = load_config("demo")
    run = RunDir.create(tmp_path / "run", config)
    for t, seeds in ((1, ["a", "b", "", "a"]), (2, ["b", "c"])):
        table = pa.table({"seed_id": seeds})
        write_parquet(run.path(f"iter_{t:02d}", "prompts.parquet"), table)
    assert config.sampling.prefill and not config.sampling.guide  # the demo's refusal opening
    assert human_items(run, config) == 3 + 1
    guided = load_config("demo", ["sampling.guide=[{role: system, content: Be safe.}]"])
    assert human_items(run, guided) == 3 + 1 + 1  # each guide message counts too
    assert human_items(run, load_config("tiny")) == 3  # no guide, no prefill


def test_the_loop_refuses_a_loss_it_cannot_train(tmp_path, capsys):
    with pytest.raises(ConfigError, match="pt_align"):
        load_config("tiny", ["train.loss=pt_align"])
    code = main(
        ["run", "--config", "tiny", "--output-dir", str(tmp_path / "r"), "train.loss=pt_align"]
    )
    assert code == 2 and "pt_align" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before a run folder was made


# --------------------------------------------------------------------------- kill and resume


def _manifest(out: Path) -> dict:
    try:
        return json.loads((out / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"stages": {}}


def _status(manifest: dict, stage: str) -> str:
    return manifest["stages"].get(stage, {}).get("status", "pending")


def _run_until(args: list[str], out: Path, when: Callable[[dict], bool], cwd: Path) -> dict:
    """Start the job, SIGKILL it (and its embedded Ray) once ``when(manifest)`` holds."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            manifest = _manifest(out)
            if when(manifest):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
                return manifest
            if proc.poll() is not None:
                raise AssertionError(
                    f"job ended before the kill point: {proc.stderr.read()[-3000:]}"
                )
            time.sleep(0.1)
        raise AssertionError("kill point never reached")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)


def _running_for(stage: str, seconds: float) -> Callable[[dict], bool]:
    """True once ``stage`` has been running for ``seconds`` (its actors are at work), or is done."""
    seen: list[float] = []

    def check(manifest: dict) -> bool:
        status = _status(manifest, stage)
        if status == "running" and not seen:
            seen.append(time.monotonic())
        return status == "done" or bool(seen and time.monotonic() - seen[0] >= seconds)

    return check


@pytest.mark.slow
def test_loop_on_tiny_end_to_end_killed_mid_stage_and_between_stages(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "selfmoa_ray.cli", "run", "--config", "tiny",
            "--output-dir", str(out), "--resume", "tracking.backend=mlflow"]  # fmt: skip

    # Kill 1: in the middle of sampling (a tiny sampling stage takes 10-20 s).
    at_kill = _run_until(args, out, _running_for("iter_01/sample", 4.0), cwd=tmp_path)
    assert _status(at_kill, "iter_01/sample") == "running"
    prompts_before = (out / "iter_01/prompts.parquet").read_bytes()

    # Kill 2: right after judging finished, between stages.
    _run_until(args, out, lambda m: _status(m, "iter_01/judge") == "done", cwd=tmp_path)

    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "iter_02" in done.stdout and "report:" in done.stdout

    # The terminal shows one line per stage; Ray's output (its workers' too) went to the log.
    shown = (done.stdout + done.stderr).splitlines()
    assert len(shown) <= 40, "\n".join(shown)
    for stage in STAGES:
        assert any(line.startswith(f"[iter_02/{stage}] done in ") for line in shown), stage
    assert not [line for line in shown if "INFO" in line or "pid=" in line]
    log = (out / console.LOG_FILE).read_text()
    assert "Started a local Ray instance" in log and "pid=" in log

    manifest = _manifest(out)
    for name in ["baseline/evaluate", "calibrate"] + [
        f"iter_{t:02d}/{s}" for t in (1, 2) for s in STAGES
    ]:
        assert _status(manifest, name) == "done", name
    stages = manifest["stages"]
    assert stages["iter_01/redteam"]["attempts"] == 1  # never redone
    assert stages["iter_01/sample"]["attempts"] == 2  # the killed attempt, then one more
    assert stages["iter_01/judge"]["attempts"] == 1
    assert len(manifest["resumed"]) == 2
    assert manifest["loop"]["iterations_done"] == 2 and not manifest["loop"]["stopped_early"]
    assert manifest["loop"]["final_policy"] == "iter_02"
    assert manifest["loop"]["final_policy_path"] == str(out / "iter_02" / "policy")
    assert manifest["loop"]["human_items"] >= 16
    assert (out / "iter_01/prompts.parquet").read_bytes() == prompts_before
    assert not [p for p in out.rglob(".*tmp-*")], "temporary files left behind"

    config = load_config("tiny")
    for t in (1, 2):
        it = out / f"iter_{t:02d}"
        prompt_ids = pq.read_table(it / "prompts.parquet").column("id").to_pylist()
        assert len(prompt_ids) == len(set(prompt_ids)) == config.redteam.num_prompts
        expected = sorted((p, k) for p in prompt_ids for k in range(config.sampling.n))
        for name in ("responses.parquet", "scored.parquet"):
            table = pq.read_table(it / name, columns=["id", "sample_index"]).to_pydict()
            keys = sorted(zip(table["id"], table["sample_index"], strict=True))
            assert keys == expected, f"iter_{t:02d}/{name}: rows lost or repeated"
        pair_ids = pq.read_table(it / "pairs.parquet").column("id").to_pylist()
        assert (
            len(pair_ids) == len(set(pair_ids)) == stages[f"iter_{t:02d}/pairs"]["summary"]["pairs"]
        )
        assert set(pair_ids) <= set(prompt_ids)
        assert (it / "policy" / "config.json").exists()

    # Training chose its epoch on validation prompts that the red team never asked, and says how
    # well the kept policy learned its pairs.
    validation = pq.read_table(out / "validation.parquet").to_pylist()
    assert {r["split"] for r in validation} == {"validation_attack", "validation_benign"}
    asked = {
        text for t in (1, 2) for r in pq.read_table(out / f"iter_{t:02d}/prompts.parquet").to_pylist()
        for text in (r["text"], r["base_text"])
    }  # fmt: skip
    assert not {r["text"] for r in validation} & asked
    for t in (1, 2):
        trained = stages[f"iter_{t:02d}/train"]["summary"]
        epochs = [p.split(":")[0] for p in trained["validation_trace"].split()]
        assert epochs == [str(e) for e in range(config.train.epochs + 1)]
        assert 0 <= trained["pairs_accuracy"] <= 1

    # Iteration 2 learned from iteration 1: few-shot parents are its successful attacks, and no
    # attack repeats an earlier one.
    first = pq.read_table(out / "iter_01/prompts.parquet").to_pylist()
    second = pq.read_table(out / "iter_02/prompts.parquet").to_pylist()
    failed = set(pq.read_table(out / "iter_01/failures.parquet").column("id").to_pylist())
    assert {r["parent_id"] for r in second if r["parent_id"]} <= failed
    assert not {r["base_text"] for r in first} & {r["base_text"] for r in second}

    # The regression vault grows by each iteration's successful attacks, and each new policy
    # answers the whole vault.
    vaults = [pq.read_table(out / f"iter_{t:02d}/vault.parquet").to_pylist() for t in (1, 2)]
    found = [
        pq.read_table(out / f"iter_{t:02d}/failures.parquet").column("text").to_pylist()
        for t in (1, 2)
    ]
    assert vaults[0] and {r["text"] for r in vaults[0]} == set(found[0])
    assert {r["found_in"] for r in vaults[0]} == {1}
    assert vaults[1][: len(vaults[0])] == vaults[0]  # nothing dropped, nothing reordered
    assert {r["text"] for r in vaults[1]} == set(found[0]) | set(found[1])
    held_out = pq.read_table(out / "baseline/eval_responses.parquet").column("id").to_pylist()
    for t, rows in ((1, vaults[0]), (2, vaults[1])):
        answered = pq.read_table(out / f"iter_{t:02d}/vault_answers.parquet").to_pylist()
        assert sorted(a["text"] for a in answered) == sorted(r["text"] for r in rows)
        assert sorted((a["id"], a["found_in"]) for a in answered) == sorted(
            (r["id"], r["found_in"]) for r in rows
        )
        # Answered in the evaluation's pass, kept out of the held-out answers and figures.
        evaluated = pq.read_table(out / f"iter_{t:02d}/eval_responses.parquet").to_pylist()
        assert sorted(r["id"] for r in evaluated) == sorted(held_out)
        assert "vault" not in json.loads((out / f"iter_{t:02d}/metrics.json").read_text())["splits"]
        summary = stages[f"iter_{t:02d}/vault"]["summary"]
        unsafe = sum(a["safety"] < config.judge.unsafe_threshold for a in answered)
        assert (summary["attacks"], summary["still_succeed"]) == (len(rows), unsafe)
    assert stages["iter_02/vault"]["summary"]["new"] == len(vaults[1]) - len(vaults[0])

    # MLflow got one point per policy and step, though the driver was killed twice on the way.
    from mlflow.tracking import MlflowClient

    tracking = json.loads((out / "tracking.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow' / 'mlflow.db'}")
    history = client.get_metric_history(tracking["run_id"], "harmful/safety_rate")
    assert sorted(m.step for m in history) == [0, 1, 2]
    spent = client.get_metric_history(tracking["run_id"], "cost/cpu_seconds")
    assert sorted(m.step for m in spent) == [0, 1, 2]  # the run's cost so far, at each step
    assert [m.value for m in sorted(spent, key=lambda m: m.step)] == sorted(m.value for m in spent)

    # The report holds the metrics of every policy, and `selfmoa report` rebuilds it.
    metrics = json.loads((out / "metrics.json").read_text())
    names = [p["name"] for p in metrics["policies"]]
    assert names == ["baseline", "iter_01", "iter_02"]
    stored = json.loads((out / "iter_02/metrics.json").read_text())
    harmful = metrics["policies"][-1]["harmful"]
    assert harmful["safety_rate"] == stored["splits"]["eval_harmful"]["safety_rate"]
    # Both judges were calibrated on human labels held back from them, and the training judge's
    # verdicts sit beside the audit judge's on every held-out answer.
    calibration = json.loads((out / "calibration.json").read_text())
    assert calibration["training_judge"]["held_back_split"] == "audit"
    assert calibration["audit_judge"]["held_back_split"] == "train"
    for judge in ("training_judge", "audit_judge"):
        for task in ("safety", "refusal"):
            assert calibration[judge][task]["rows"] > 0
            assert 0 <= calibration[judge][task]["accuracy"] <= 1
    agreement = stored["splits"]["eval_harmful"]["judge_agreement"]
    assert agreement["safety_agreement"] == 1.0  # tiny's two judges are the same matcher
    assert metrics["judges"] == calibration
    # What it cost: CPU time measured per stage (the engines' and trainers' processes included),
    # and the totals, all present and non-negative.
    assert stages["iter_02/sample"]["cpu_seconds"] > 0.3 * stages["iter_02/sample"]["seconds"]
    cost = metrics["cost"]
    assert cost["cpu_seconds"] > 0 and cost["generated_tokens"] > 0
    assert cost["human_items"] == manifest["loop"]["human_items"]
    assert cost["human_labels"] == 0  # tiny's judges are the refusal matcher: no labels
    for key in ("wall_seconds", "cpu_seconds", "gpu_seconds_reserved", "prompts", "pairs"):
        assert cost[key] >= 0, key
    low, high = harmful["intervals"]["safety_rate"]
    assert low <= harmful["safety_rate"] <= high
    assert metrics["iterations"][1]["vault"]["attacks"] == len(vaults[1])
    safety = next(r for r in metrics["headline"]["rows"] if r["metric"] == "harmful/safety_rate")
    assert safety["paired"]["n"] == harmful["responses"]  # baseline and iter_02, prompt by prompt
    assert safety["paired"]["gain"] == pytest.approx(safety["delta"], abs=1e-4)
    assert (out / "metrics.csv").read_text().count("\n") >= 3
    html = (out / "report.html").read_text()
    assert "iter_02" in html and "data:image/png;base64," in html
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.html").exists()

    # --verbose (here on the finished run: a third resume) shows Ray's own lines on the terminal.
    verbose = subprocess.run([*args, "--verbose"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=900)  # fmt: skip
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert "Started a local Ray instance" in verbose.stderr  # Ray's lines on the terminal
