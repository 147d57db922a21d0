"""The endpoint backend against a real OpenAI-compatible server: our policy Serve app on 127.0.0.1
serving the tiny model, reached through Ray Data's HTTP processor, exactly as an audit of a
deployed model runs (engines/endpoint.py). The same model loaded locally is the reference: greedy
answers through the endpoint must be the local engine's, token for token."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray.data

from selfmoa_ray.cli import main
from selfmoa_ray.config import EngineSection, ModelSection
from selfmoa_ray.engines.base import OUTPUT_COLUMNS, SamplingParams
from selfmoa_ray.engines.endpoint import EndpointError, check_endpoint
from selfmoa_ray.engines.hf import HFChatEngine
from selfmoa_ray.engines.pool import generate

KEY = "endpoint-test-key-0123456789"
KEY_ENV = "SELFMOA_TEST_ENDPOINT_KEY"
SERVED = "tiny"
PROMPTS = [
    {"id": "p1", "text": "Hi there", "category": "a"},
    {"id": "p2", "text": "What is 2+2?", "category": "b"},
    {"id": "p3", "text": "Tell me a joke", "category": "a"},
]


@pytest.fixture(scope="module")
def base_url(ray_local, free_port):
    from ray import serve

    from serve_apps.policy import build_app

    serve.shutdown()  # a Serve left by another module would keep its own port
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    actor = {"num_cpus": 0.25, "runtime_env": {"env_vars": {"SELFMOA_API_KEYS": KEY}}}
    app = build_app({"model": "tiny-random", "served_model_name": SERVED,
                     "deployment": {"ray_actor_options": actor}})  # fmt: skip
    serve.run(app, name="policy-endpoint-test", route_prefix="/policy")
    yield f"http://127.0.0.1:{port}/policy/v1"
    serve.shutdown()


@pytest.fixture
def target(base_url, monkeypatch) -> ModelSection:
    monkeypatch.setenv(KEY_ENV, KEY)
    return ModelSection.model_validate(
        {"endpoint": {"base_url": base_url, "model": SERVED, "api_key_env": KEY_ENV}}
    )


def _generate(model: ModelSection, sampling: SamplingParams) -> list[dict]:
    rows = generate(ray.data.from_items(PROMPTS), model, EngineSection(), sampling).take_all()
    return sorted(rows, key=lambda r: (r["id"], r["sample_index"]))


def test_greedy_answers_are_the_local_engines(target):
    sampling = SamplingParams(n=2, temperature=0.0, max_new_tokens=8)
    remote = _generate(target, sampling)
    local = HFChatEngine("tiny-random", sampling)(
        {k: np.array([p[k] for p in PROMPTS]) for k in PROMPTS[0]}
    )
    local_rows = sorted(
        ({k: local[k][i] for k in local} for i in range(len(local["id"]))),
        key=lambda r: (r["id"], r["sample_index"]),
    )
    assert [r["id"] for r in remote] == ["p1", "p1", "p2", "p2", "p3", "p3"]
    assert set(remote[0]) == {"id", "text", "category", *OUTPUT_COLUMNS}
    for got, want in zip(remote, local_rows, strict=True):
        assert got["category"] == want["category"]  # input columns pass through
        for key in OUTPUT_COLUMNS:
            assert got[key] == want[key], (key, got, want)


def test_sampled_answers_are_per_sample_seeded_and_reproducible(target):
    sampling = SamplingParams(n=3, temperature=1.0, max_new_tokens=6, seed=11)
    first, second = _generate(target, sampling), _generate(target, sampling)
    assert [r["sample_index"] for r in first] == [0, 1, 2] * 3
    assert [r["response"] for r in first] == [r["response"] for r in second]
    assert len({r["response"] for r in first if r["id"] == "p1"}) > 1  # samples differ
    assert all(r["response_tokens"] > 0 and r["prompt_tokens"] > 0 for r in first)


def test_a_refused_key_or_an_unserved_model_fails_before_any_work(target, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "wrong-key-0123456789abcdef")
    with pytest.raises(EndpointError, match=rf"refused the API key \(\${KEY_ENV}\): 401"):
        check_endpoint(target.endpoint)
    monkeypatch.setenv(KEY_ENV, KEY)
    other = target.endpoint.model_copy(update={"model": "gpt-5"})
    with pytest.raises(
        EndpointError, match=f"does not serve the model 'gpt-5'; it serves: {SERVED}"
    ):
        check_endpoint(other)


def test_evaluate_and_redteam_an_endpoint_from_the_cli(target, base_url, tmp_path):
    flags = ["--endpoint", base_url, "--endpoint-model", SERVED, "--api-key-env", KEY_ENV]
    label = f"endpoint:{SERVED}@{base_url}"

    out = tmp_path / "eval"
    assert main(["evaluate", "--config", "tiny", *flags, "--output-dir", str(out),
                 "data.max_eval_prompts=3"]) == 0  # fmt: skip
    metrics = json.loads((out / "baseline" / "metrics.json").read_text())
    assert metrics["model"] == label
    assert pq.read_metadata(out / "baseline" / "eval_responses.parquet").num_rows == 6
    manifest = (out / "manifest.json").read_text()
    assert KEY not in manifest and KEY_ENV in manifest  # the variable's name, never the key

    out = tmp_path / "redteam"
    assert main(["redteam", "--config", "tiny", *flags, "--rounds", "1", "--output-dir", str(out),
                 "redteam.num_prompts=6"]) == 0  # fmt: skip
    summary = json.loads((out / "redteam.json").read_text())
    assert summary["target"] == label and len(summary["rounds"]) == 1
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    assert stages["iter_01/sample"]["summary"]["model"] == label
    assert stages["iter_01/redteam"]["summary"]["generator"] == label  # the target wrote them
    assert (
        summary["rounds"][0]["attacks"] == stages["iter_01/failures"]["summary"]["attack_prompts"]
    )
