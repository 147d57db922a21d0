"""The endpoint backend's rules without a server: requests per sample, parsing answers, keys,
config validation, and the errors a user meets before any work starts."""

from __future__ import annotations

import pytest

from selfmoa_ray.cli import main
from selfmoa_ray.config import ConfigError, ModelSection, load_config
from selfmoa_ray.engines.base import SamplingParams
from selfmoa_ray.engines.endpoint import EndpointError, answer_of, api_key, check_endpoint, fan_out

ENDPOINT = {"base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": "SELFMOA_TEST_KEY"}


def test_sampled_rows_fan_out_one_request_per_sample_with_its_own_seed():
    row = {"id": "p1", "text": "Hi", "category": "x"}
    sampling = SamplingParams(n=3, temperature=0.7, top_p=0.9, max_new_tokens=12, seed=40)
    out = list(fan_out(row, model="m", sampling=sampling))
    assert [r["sample_index"] for r in out] == [0, 1, 2]
    assert [r["payload"]["seed"] for r in out] == [40, 41, 42]
    first = out[0]
    assert first["category"] == "x" and first["id"] == "p1"  # input columns ride along
    assert first["payload"]["messages"] == [{"role": "user", "content": "Hi"}]
    assert first["payload"] | {"seed": 0} == {
        "model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 12,
        "temperature": 0.7, "top_p": 0.9, "seed": 0,
    }  # fmt: skip


def test_greedy_rows_send_one_request_and_chats_pass_as_they_are():
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = list(fan_out({"id": "p", "messages": chat}, model="m", sampling=SamplingParams(n=4)))
    assert len(out) == 1 and out[0]["sample_index"] == -1  # repeated n times after the answer
    assert out[0]["payload"]["messages"] == chat and out[0]["payload"]["temperature"] == 0.0
    assert "seed" not in out[0]["payload"]


def test_answers_map_to_the_engine_contract():
    body = {
        "choices": [
            {"message": {"role": "assistant", "content": " Hello\n"}, "finish_reason": "length"}
        ],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3},
    }
    assert answer_of(body, "u") == {
        "response": "Hello", "prompt_tokens": 7, "response_tokens": 3, "finish_reason": "length",
    }  # fmt: skip
    filtered = {"choices": [{"message": {"content": None}, "finish_reason": "content_filter"}]}
    assert answer_of(filtered, "u") == {
        "response": "", "prompt_tokens": 0, "response_tokens": 0, "finish_reason": "stop",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("body", "shown"),
    [
        ({"error": {"message": "rate limited", "type": "x"}}, "rate limited"),
        ({"detail": "no"}, "no"),
    ],
)
def test_an_error_body_names_the_endpoint_and_the_reason(body, shown):
    with pytest.raises(EndpointError, match=rf"http://h/v1/chat/completions answered .*{shown}"):
        answer_of(body, "http://h/v1/chat/completions")


def test_the_key_comes_from_the_named_variable(monkeypatch):
    section = ModelSection.model_validate({"endpoint": ENDPOINT}).endpoint
    monkeypatch.delenv("SELFMOA_TEST_KEY", raising=False)
    with pytest.raises(EndpointError, match=r"\$SELFMOA_TEST_KEY"):
        api_key(section)
    monkeypatch.setenv("SELFMOA_TEST_KEY", " sk-123 ")
    assert api_key(section) == "sk-123"
    assert api_key(section.model_copy(update={"api_key_env": None})) is None


def test_endpoint_config_is_validated_and_labelled():
    model = ModelSection.model_validate({"endpoint": ENDPOINT})
    assert model.label == "endpoint:m@http://127.0.0.1:9/v1"
    assert ModelSection().label == ModelSection().source
    with pytest.raises(ConfigError, match="policy.endpoint.base_url"):
        load_config("tiny", ["policy.endpoint.base_url=ftp://x", "policy.endpoint.model=m"])
    with pytest.raises(ConfigError, match="policy.endpoint.api_key: unknown key"):
        load_config("tiny", [f"policy.endpoint.{k}={v}" for k, v in ENDPOINT.items()]
                    + ["policy.endpoint.api_key=sk-secret"])  # fmt: skip


def test_an_unreachable_endpoint_fails_before_any_work(monkeypatch, free_port):
    monkeypatch.setenv("SELFMOA_TEST_KEY", "k" * 20)
    section = ModelSection.model_validate(
        {"endpoint": {**ENDPOINT, "base_url": f"http://127.0.0.1:{free_port()}/v1"}}
    ).endpoint
    with pytest.raises(EndpointError, match="cannot reach http://127.0.0.1"):
        check_endpoint(section)


def test_cli_target_flags(tmp_path, monkeypatch, capsys, free_port):
    monkeypatch.setenv("SELFMOA_TEST_KEY", "k" * 20)
    out = tmp_path / "run"
    # half an endpoint
    assert main(["evaluate", "--config", "tiny", "--endpoint", "http://127.0.0.1:9/v1",
                 "--output-dir", str(out)]) == 2  # fmt: skip
    assert "--endpoint and --endpoint-model go together" in capsys.readouterr().err
    # an endpoint that is not there: refused before a run folder exists
    url = f"http://127.0.0.1:{free_port()}/v1"
    assert main(["redteam", "--config", "tiny", "--endpoint", url, "--endpoint-model", "m",
                 "--api-key-env", "SELFMOA_TEST_KEY", "--output-dir", str(out)]) == 2  # fmt: skip
    assert f"cannot reach {url}" in capsys.readouterr().err
    assert not out.exists()
    # training a model that has no weights here
    assert main(["run", "--config", "tiny", "--output-dir", str(out),
                 f"policy.endpoint.base_url={url}", "policy.endpoint.model=m"]) == 2  # fmt: skip
    assert "has no weights here to train" in capsys.readouterr().err
    assert not out.exists()
