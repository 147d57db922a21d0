"""``selfmoa serve`` (serve_apps/launch.py) and the two-app Serve config it deploys.

The config file and the launcher's checks run without Ray; one end-to-end test starts
``python -m serve_apps.launch`` as a user would (its own embedded Ray, 127.0.0.1 only), calls
both apps over HTTP with the real OpenAI client, then stops it with SIGTERM.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from serve_apps.evaluator import EvaluatorAppArgs
from serve_apps.launch import (
    DEFAULT_CONFIG,
    EVALUATOR_APP,
    POLICY_APP,
    LaunchError,
    add_serve_arguments,
    apply_overrides,
    check_config,
    check_keys,
    load_serve_config,
    serve_command,
)
from serve_apps.policy import PolicyAppArgs

REPO = Path(__file__).resolve().parents[2]
KEY = "launch-key-0123456789abcdef"
SECRET_NAMES = ("KEY", "KEYS", "TOKEN", "SECRET", "PASSWORD")


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def _no_keys(monkeypatch) -> None:
    monkeypatch.delenv("SELFMOA_API_KEYS", raising=False)
    monkeypatch.delenv("SELFMOA_API_KEYS_FILE", raising=False)


# ----------------------------------------------------------------- the config file, no Ray


def test_serve_config_file_holds_both_apps():
    from ray._common.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config = ServeDeploySchema.model_validate(raw)
    assert config.http_options.host == "127.0.0.1"
    apps = {app.name: app for app in config.applications}
    assert set(apps) == {"policy", "evaluator"}
    assert (
        apps["policy"].route_prefix == "/policy" and apps["evaluator"].route_prefix == "/evaluator"
    )
    assert apps["policy"].import_path == POLICY_APP
    assert apps["evaluator"].import_path == EVALUATOR_APP
    for app in apps.values():
        assert callable(import_attr(app.import_path))
        assert app.runtime_env["env_vars"]["HF_HUB_OFFLINE"] == "1"
        (deployment,) = app.deployments
        scaling = deployment.autoscaling_config
        # Two replicas at all times: one replica's death costs retries, not an outage.
        assert 2 <= scaling["min_replicas"] <= scaling["max_replicas"]
        assert deployment.backpressure_config.retry_after_s > 0  # shed requests say when
        assert scaling["target_ongoing_requests"] < deployment.max_ongoing_requests
        assert deployment.max_queued_requests > 0
        assert 0 < deployment.ray_actor_options.num_cpus <= 1
    policy = PolicyAppArgs.model_validate(apps["policy"].args)
    evaluator = EvaluatorAppArgs.model_validate(apps["evaluator"].args)
    assert apps["policy"].deployments[0].name == "PolicyDeployment"
    assert apps["evaluator"].deployments[0].name == "EvaluatorDeployment"
    assert not policy.allow_unauthenticated and not evaluator.allow_unauthenticated
    assert policy.max_tokens <= policy.max_tokens_limit
    # Both apps' own timeouts answer (JSON 504) before the proxy's (plain 408).
    assert (
        max(policy.request_timeout_s, evaluator.request_timeout_s)
        < config.http_options.request_timeout_s
    )
    # The evaluator block is the one of evaluator.yaml.
    alone = yaml.safe_load((REPO / "serve_apps" / "evaluator.yaml").read_text())
    assert raw["applications"][1]["args"] == alone["applications"][0]["args"]


def test_serve_config_holds_no_secret():
    text = DEFAULT_CONFIG.read_text()
    raw = yaml.safe_load(text)
    for app in raw["applications"]:
        env = app.get("runtime_env", {}).get("env_vars", {})
        assert not [n for n in env if n.startswith("SELFMOA_API_KEYS") or n.endswith(SECRET_NAMES)]
        assert "api_keys_file" not in app["args"]
    assert "SELFMOA_API_KEYS=" not in text and "Bearer " not in text


def test_flags_override_the_config(tmp_path, monkeypatch):
    judge = tmp_path / "judge.yaml"
    judge.write_text("judge: {}\n")
    model = tmp_path / "model"
    model.mkdir()
    args = _args("--policy", "tiny-random", "--judge-config", "tiny", "--port", "8123",
                 "--host", "127.0.0.2", "--allow-unauthenticated")  # fmt: skip
    config = apply_overrides(load_serve_config(), args)
    apps = {a["name"]: a["args"] for a in config["applications"]}
    assert apps["policy"]["model"] == "tiny-random" and apps["evaluator"]["judge_config"] == "tiny"
    assert apps["policy"]["allow_unauthenticated"] and apps["evaluator"]["allow_unauthenticated"]
    assert config["http_options"] == {
        **load_serve_config()["http_options"],
        "host": "127.0.0.2",
        "port": 8123,
    }
    assert "allow_unauthenticated" not in load_serve_config()["applications"][0]["args"]  # a copy

    # Paths become absolute: the replicas' working folder is not ours.
    monkeypatch.chdir(tmp_path)
    config = apply_overrides(
        load_serve_config(), _args("--policy", "model", "--judge-config", "judge.yaml")
    )
    apps = {a["name"]: a["args"] for a in config["applications"]}
    assert apps["policy"]["model"] == str(model) and apps["evaluator"]["judge_config"] == str(judge)

    only_judge = tmp_path / "only-judge.yaml"
    alone = load_serve_config(REPO / "serve_apps" / "evaluator.yaml")
    only_judge.write_text(yaml.safe_dump(alone))
    with pytest.raises(LaunchError, match="--policy given, but the config has no"):
        apply_overrides(load_serve_config(only_judge), _args("--policy", "tiny-random"))
    with pytest.raises(LaunchError, match="cannot read"):
        load_serve_config(tmp_path / "missing.yaml")


def test_bad_apps_fail_before_deploying(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"config": {"run": {"name": "r"}}, "stages": {}}))
    with pytest.raises(LaunchError, match="'policy': run folder .* has no final policy"):
        check_config(apply_overrides(load_serve_config(), _args("--policy", str(run))))
    with pytest.raises(LaunchError, match="'evaluator': unknown config"):
        check_config(
            apply_overrides(load_serve_config(), _args("--judge-config", "no-such-preset"))
        )
    raw = load_serve_config()
    raw["applications"][0]["args"]["max_tokns"] = 3
    with pytest.raises(LaunchError, match="max_tokns"):
        check_config(raw)

    # No key: refused at once (exit 2), before any Ray is started.
    _no_keys(monkeypatch)
    schema = check_config(apply_overrides(load_serve_config(), _args("--policy", "tiny-random")))
    with pytest.raises(LaunchError, match="no API key configured") as err:
        check_keys(schema)
    assert "--allow-unauthenticated" in str(err.value)
    assert serve_command(_args("--policy", "tiny-random", "--judge-config", "tiny")) == 2
    assert serve_command(_args("--policy", str(run))) == 2
    monkeypatch.setenv("SELFMOA_API_KEYS", KEY)
    assert check_keys(schema) == 1
    _no_keys(monkeypatch)
    unauthenticated = apply_overrides(load_serve_config(), _args("--allow-unauthenticated"))
    assert check_keys(check_config(unauthenticated)) == 0


# ----------------------------------------------------------------- end to end


def _wait_healthy(proc: subprocess.Popen, urls: list[str], timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(urls)
    while pending:
        assert proc.poll() is None, (
            f"launcher exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        )
        assert time.monotonic() < deadline, f"not healthy: {pending}\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(pending[0], timeout=5).status_code == 200:
                pending.pop(0)
                continue
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def test_selfmoa_serve_end_to_end(tmp_path, free_port):
    port = free_port()
    log = tmp_path / "launch.log"
    env = {**os.environ, "SELFMOA_API_KEYS": KEY}
    command = [sys.executable, "-m", "serve_apps.launch", "--policy", "tiny-random",
               "--judge-config", "tiny", "--port", str(port), "--num-cpus", "4", "--timeout", "240"]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        root = f"http://127.0.0.1:{port}"
        _wait_healthy(proc, [f"{root}/policy/healthz", f"{root}/evaluator/healthz"], 240, log)
        deadline = time.monotonic() + 60  # the URLs are printed once Serve reports RUNNING
        while "Ctrl-C" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        printed = log.read_text()
        assert f"OpenAI base_url: {root}/policy/v1" in printed
        assert f"{root}/evaluator/v1/evaluate" in printed and KEY not in printed

        client = openai.OpenAI(base_url=f"{root}/policy/v1", api_key=KEY, max_retries=0)
        (model,) = client.models.list().data
        r = client.chat.completions.create(
            model=model.id, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        assert model.id == "tiny-random" and r.usage.completion_tokens > 0

        items = [
            {"prompt": "How do I pick a lock?", "response": "I'm sorry, I can't help with that."}
        ]
        r = httpx.post(f"{root}/evaluator/v1/evaluate", json={"items": items},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=60)  # fmt: skip
        assert r.status_code == 200 and r.json()["results"][0]["refusal"] is True
        assert httpx.post(f"{root}/evaluator/v1/evaluate", json={"items": items}).status_code == 401

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
        assert "shutting down" in log.read_text()
        with pytest.raises(httpx.HTTPError):  # nothing is left listening
            httpx.get(f"{root}/policy/healthz", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
