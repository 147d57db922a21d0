import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import yaml

from selfmoa_ray.cli import main


def test_config_show_prints_resolved_yaml(capsys):
    assert main(["config", "show", "--config", "tiny", "train.beta=0.25"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["beta"] == 0.25 and shown["policy"]["source"] == "tiny-random"


def test_bad_override_is_a_clear_error_with_exit_code_2(capsys):
    assert main(["config", "show", "--config", "tiny", "train.bta=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("selfmoa: error:") and "train.bta" in err and "Traceback" not in err


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "selfmoa"
    out = subprocess.run([script, "config", "presets"], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["cluster-gpu", "demo", "tiny"]


def test_serve_refuses_no_keys_and_a_missing_model(monkeypatch, capsys):
    monkeypatch.delenv("SELFMOA_API_KEYS", raising=False)
    monkeypatch.delenv("SELFMOA_API_KEYS_FILE", raising=False)
    assert main(["serve", "--policy", "tiny-random", "--judge-config", "tiny"]) == 2
    assert "no API key configured" in capsys.readouterr().err
    monkeypatch.setenv("SELFMOA_API_KEYS", "cli-test-key-0123456789")
    assert main(["serve", "--policy", "/no/such/model", "--judge-config", "tiny"]) == 2
    assert "'/no/such/model' does not exist" in capsys.readouterr().err


def _selfmoa(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "selfmoa"
    environ = {**os.environ, **(env or {})}
    return subprocess.run([script, *args], capture_output=True, text=True, env=environ, timeout=60)


def _one_line_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("selfmoa: error:") and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    return out.stderr


def test_version_prints_the_installed_version():
    out = _selfmoa("--version")
    assert out.returncode == 0 and out.stdout == f"selfmoa {metadata.version('selfmoa-ray')}\n"


def test_debug_adds_the_traceback(monkeypatch, capsys):
    assert main(["--debug", "config", "show", "--config", "tiny", "train.bta=1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ConfigError" in err and "selfmoa: error:" in err
    monkeypatch.setenv("SELFMOA_DEBUG", "1")
    assert main(["config", "show", "--config", "tiny", "train.bta=1"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_models_prepare_a_missing_folder_is_one_line():
    assert "'/no/such/model' does not exist" in _one_line_error(
        _selfmoa("models", "prepare", "/no/such/model")
    )


def test_models_prepare_a_hub_id_needs_it_in_the_hf_cache(tmp_path):
    """Not cached: exit 2 with the command that fetches it and where it goes; cached: its
    snapshot folder, exit 0 (a real hub-cache layout under a temporary HF_HOME)."""
    env = {"HF_HOME": str(tmp_path / "hf")}
    repo = tmp_path / "hf" / "hub" / "models--selfmoa-test--tiny"
    err = _one_line_error(_selfmoa("models", "prepare", "selfmoa-test/tiny", env=env))
    assert "`hf download selfmoa-test/tiny`" in err and f"(into {repo})" in err
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"model_type": "llama"}')
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    out = _selfmoa("models", "prepare", "selfmoa-test/tiny", env=env)
    assert out.returncode == 0 and out.stdout == f"{snapshot}\n", out.stderr


def test_serve_refuses_a_hub_policy_that_is_not_cached(monkeypatch, capsys):
    monkeypatch.setenv("SELFMOA_API_KEYS", "cli-test-key-0123456789")
    policy = "selfmoa-test/not-cached"
    assert main(["serve", "--policy", policy, "--judge-config", "tiny"]) == 2
    err = capsys.readouterr().err
    assert f"serve application 'policy' model: '{policy}' is not a local folder" in err
    assert f"`hf download {policy}`" in err


def test_prompts_flag_makes_paths_absolute_and_keeps_hub_ids(tmp_path, monkeypatch):
    """`evaluate --prompts` hands Ray workers absolute paths; an hf: repo id is no path."""
    from selfmoa_ray.cli import _absolute_spec

    monkeypatch.chdir(tmp_path)
    assert _absolute_spec("mine.jsonl") == str(tmp_path / "mine.jsonl")
    assert _absolute_spec("file:mine.jsonl") == f"file:{tmp_path / 'mine.jsonl'}"
    assert _absolute_spec("hf:org/name@test") == "hf:org/name@test"
    assert _absolute_spec("hf:./saved@test") == f"hf:{tmp_path / 'saved@test'}"
