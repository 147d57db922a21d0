import subprocess
import sys
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
