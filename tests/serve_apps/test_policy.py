"""The policy Serve app on a real local Serve (127.0.0.1), spoken to by the real OpenAI client.

One application is deployed for the module: the tiny random Llama, saved as the final policy of a
minimal run folder (so the run-folder resolution is exercised end to end), with tight limits and
API keys given to the replica through ``SELFMOA_API_KEYS``. The argument model, the run-folder
resolution and the vLLM config builder are also checked on their own, without Ray.
"""

import json
from collections import Counter
from pathlib import Path

import httpx
import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from serve_fuzz import (
    JSON,
    bodies,
    check_answer,
    documented_statuses,
    fuzz_settings,
    mostly,
    no_trace,
    openai_error,
)

from serve_apps.policy import (
    MAX_STOP_CHARS,
    ChatCompletion,
    PolicyAppArgs,
    PolicySourceError,
    _StopFilter,
    build_app,
    resolve_args,
    resolve_policy,
    vllm_llm_config,
)

KEY = "policy-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
RUN_NAME = "unit"
SERVED = f"{RUN_NAME}-iter_01"
MAX_TOKENS_LIMIT = 32
MAX_BODY = 16 * 1024
MAX_CHARS = 2000
MAX_MESSAGES = 8
HELLO = [{"role": "user", "content": "Say hello."}]


def _run_folder(root: Path, policy: Path | None) -> Path:
    """A run folder as ``selfmoa run`` leaves it: a manifest naming the final policy."""
    root.mkdir(parents=True, exist_ok=True)
    manifest = {"run_id": "0123456789ab", "config": {"run": {"name": RUN_NAME}}, "stages": {}}
    if policy is not None:
        manifest["loop"] = {"final_policy": "iter_01", "final_policy_path": str(policy)}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished run whose final policy is the tiny model, saved as the trainer saves one."""
    from selfmoa_ray.sources.models import load_model_and_tokenizer

    root = tmp_path_factory.mktemp("runs") / RUN_NAME
    policy = root / "iter_01" / "policy"
    model, tokenizer = load_model_and_tokenizer("tiny-random")
    model.save_pretrained(policy)
    tokenizer.save_pretrained(policy)
    return _run_folder(root, policy)


@pytest.fixture(scope="module")
def base_url(ray_local, run_dir, free_port):
    from ray import serve

    serve.shutdown()  # a Serve left by another module would keep its own port
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    actor = {"num_cpus": 0.25, "runtime_env": {"env_vars": {"SELFMOA_API_KEYS": KEY}}}
    app = build_app(
        {
            "model": str(run_dir),
            "max_tokens": 8,
            "max_tokens_limit": MAX_TOKENS_LIMIT,
            "max_body_bytes": MAX_BODY,
            "max_chars": MAX_CHARS,
            "max_messages": MAX_MESSAGES,
            "max_n": 3,
            "num_threads": 1,
            "deployment": {"health_check_period_s": 1, "ray_actor_options": actor},
        }
    )
    serve.run(app, name="policy-test", route_prefix="/policy")
    yield f"http://127.0.0.1:{port}/policy"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as c:
        yield c


# ----------------------------------------------------------------- arguments, no Ray


def test_args_reject_unknown_keys_and_bad_values():
    with pytest.raises(ValidationError, match="max_tokns"):
        PolicyAppArgs.model_validate({"max_tokns": 8})
    with pytest.raises(ValidationError, match="backend"):
        PolicyAppArgs.model_validate({"backend": "tgi"})
    # As `serve run serve_apps.policy:build_app key=value` passes them: all strings.
    args = PolicyAppArgs.model_validate({"max_tokens": "16", "allow_unauthenticated": "true"})
    assert args.max_tokens == 16 and args.allow_unauthenticated is True


def test_served_names_and_model_specs(tmp_path):
    assert resolve_policy("packaged:smollm2-135m-instruct").served_name == "smollm2-135m-instruct"
    assert resolve_policy("tiny-random:seed=3").served_name == "tiny-random-seed3"
    assert resolve_policy("tiny-random", "my-model").served_name == "my-model"
    with pytest.raises(PolicySourceError, match="unknown packaged model"):
        resolve_policy("packaged:nope")
    with pytest.raises(PolicySourceError, match="does not exist"):
        resolve_policy(str(tmp_path / "missing"))
    with pytest.raises(PolicySourceError, match="neither a Hugging Face model folder"):
        resolve_policy(str(tmp_path))


def test_a_bad_tiny_random_spec_fails_before_anything_is_deployed():
    with pytest.raises(PolicySourceError, match="tiny-random:seed=N"):
        resolve_policy("tiny-random:seed=abc")
    assert resolve_policy("tiny-random:seed=3").spec == "tiny-random:seed=3"


def test_run_folder_serves_its_final_policy(run_dir, tmp_path):
    source = resolve_policy(str(run_dir))
    assert source.spec == str(run_dir / "iter_01" / "policy")
    assert source.served_name == SERVED and source.run_dir == str(run_dir)
    settings, _ = resolve_args({"model": str(run_dir)})
    assert settings.model == source.spec and settings.served_model_name == SERVED

    # A run folder that was moved: the manifest's absolute path is stale, the policy is found.
    moved = _run_folder(tmp_path / "moved", tmp_path / "gone" / "iter_01" / "policy")
    (moved / "iter_01").symlink_to(run_dir / "iter_01")
    assert resolve_policy(str(moved)).spec == str(moved / "iter_01" / "policy")

    # A run whose baseline won serves the starting model spec.
    baseline = tmp_path / "baseline"
    _run_folder(baseline, None)
    manifest = json.loads((baseline / "manifest.json").read_text())
    manifest["loop"] = {"final_policy": "baseline", "final_policy_path": "tiny-random"}
    (baseline / "manifest.json").write_text(json.dumps(manifest))
    assert resolve_policy(str(baseline)).spec == "tiny-random"


def test_run_folder_without_a_final_policy_is_a_build_error(tmp_path):
    unfinished = _run_folder(tmp_path / "unfinished", None)
    with pytest.raises(PolicySourceError, match="has no final policy") as err:
        build_app({"model": str(unfinished)})
    assert "selfmoa run --resume" in str(err.value)


def test_stop_sequences_are_held_back_while_streaming():
    stops = _StopFilter(["END", "\n\n"])
    pieces = [stops.feed(t) for t in ["Hello E", "N", "ough. E", "ND and more"]]
    assert "".join(pieces) == "Hello ENough. " and stops.stopped
    assert stops.feed("ignored") == "" and stops.flush() == ""
    open_ended = _StopFilter(["END"])
    assert open_ended.feed("abc E") == "abc" and open_ended.flush() == " E"


def test_the_stop_filter_holds_back_a_bounded_tail():
    """What it holds back (and scans again at the next piece) never outgrows the longest stop:
    the cost of each piece is linear in its length, however long the stream."""
    long_stop = "z" * MAX_STOP_CHARS
    # No scan for partial stops (quadratic in the stop's length on every piece): the filter
    # holds back a fixed tail, the most a stop could have begun in, and lets the rest through.
    held = _StopFilter([long_stop])
    assert held.feed("a" * 1000) == "a" * (1001 - MAX_STOP_CHARS)
    assert held.flush() == "a" * (MAX_STOP_CHARS - 1)
    stops = _StopFilter([long_stop, "END"])
    streamed = []
    for i in range(2000):
        streamed.append(stops.feed(f"piece {i} "))
        assert len(stops.buffer) <= MAX_STOP_CHARS - 1
    streamed.append(stops.feed("and the E"))
    streamed.append(stops.feed("ND of it"))
    assert stops.stopped and "".join(streamed).endswith("piece 1999 and the ")


def test_vllm_llm_config_dict():
    settings = PolicyAppArgs.model_validate(
        {"backend": "vllm", "served_model_name": "aligned", "max_model_len": 4096,
         "tensor_parallel_size": 2, "accelerator_type": "H100", "dtype": "bfloat16",
         "deployment": {"autoscaling_config": {"min_replicas": 0, "max_replicas": 4}}}
    )  # fmt: skip
    config = vllm_llm_config(settings, "/models/aligned")
    assert config["model_loading_config"] == {
        "model_id": "aligned",
        "model_source": "/models/aligned",
    }
    assert config["engine_kwargs"]["max_model_len"] == 4096
    assert config["engine_kwargs"]["tensor_parallel_size"] == 2
    assert config["engine_kwargs"]["dtype"] == "bfloat16"
    assert config["accelerator_type"] == "H100"
    deployment = config["deployment_config"]
    assert deployment["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4}
    assert deployment["max_queued_requests"] > 0 and deployment["max_ongoing_requests"] > 0
    assert deployment["backpressure_config"]["retry_after_s"] > 0  # shed requests say when
    assert config["runtime_env"]["env_vars"]["HF_HUB_OFFLINE"] == "1"
    plain = vllm_llm_config(PolicyAppArgs(served_model_name="m"), "/m")
    assert "accelerator_type" not in plain and "max_model_len" not in plain["engine_kwargs"]
    with pytest.raises(ValueError, match="served_model_name"):
        vllm_llm_config(PolicyAppArgs(), "/m")
    # The dict is what Ray Serve LLM's LLMConfig accepts (its config model imports without vLLM).
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig

    llm_config = LLMConfig.model_validate(config)
    assert llm_config.model_id == "aligned" and llm_config.accelerator_type == "H100"
    from ray.serve.schema import DeploymentSchema

    DeploymentSchema.model_validate({"name": "LLMServer", **llm_config.deployment_config})
    # Without vLLM (CPU machines) the vLLM backend says what to install, or to use hf.
    with pytest.raises(ImportError, match="backend=hf"):
        build_app({"backend": "vllm", "model": "tiny-random"})


# ----------------------------------------------------------------- the app on Serve


def test_completion_with_the_openai_client(client):
    r = client.chat.completions.create(model=SERVED, messages=HELLO, max_tokens=5, seed=1)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == SERVED
    (choice,) = r.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # A random model rarely stops by itself: 5 tokens without an end token is "length".
    if r.usage.completion_tokens == 5:
        assert choice.finish_reason == "length"

    # Several choices, the default max_tokens (8), content parts, a system turn.
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Say"}, {"type": "text", "text": "hi"}]}]  # fmt: skip
    r = client.chat.completions.create(model=SERVED, messages=messages, n=3, temperature=1.0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert 0 < r.usage.completion_tokens <= 3 * 8


def test_models_list(client, http):
    assert [m.id for m in client.models.list().data] == [SERVED]
    assert client.models.retrieve(SERVED).id == SERVED
    assert http.get("/v1/models/other", headers=AUTH).status_code == 404
    assert http.get("/healthz").json() == {"status": "ok"}  # no key needed


def test_stream_with_the_openai_client(client):
    stream = client.chat.completions.create(
        model=SERVED, messages=HELLO, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)  # the iteration ends: the server sent [DONE]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.model == SERVED for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes in (["stop"], ["length"])
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.prompt_tokens > 0
    assert 0 < usage.completion_tokens <= 12
    # The same greedy request without streaming gives the same text.
    r = client.chat.completions.create(model=SERVED, messages=HELLO, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == text
    assert r.usage.completion_tokens == usage.completion_tokens

    # Without include_usage: no usage chunk.
    plain = list(
        client.chat.completions.create(model=SERVED, messages=HELLO, max_tokens=3, stream=True)
    )
    assert plain[-1].choices[0].finish_reason is not None and plain[-1].usage is None


def test_same_seed_same_text_and_greedy_is_deterministic(client):
    def text(**kw) -> str:
        r = client.chat.completions.create(model=SERVED, messages=HELLO, max_tokens=16, **kw)
        return r.choices[0].message.content

    assert text(temperature=1.0, seed=7) == text(temperature=1.0, seed=7)
    assert text(temperature=0) == text(temperature=0)
    samples = {text(temperature=1.0, seed=s) for s in range(4)}
    assert len(samples) > 1  # seeds do change what is sampled


def test_stop_sequence_ends_the_text(client):
    full = client.chat.completions.create(
        model=SERVED, messages=HELLO, max_tokens=16, temperature=0
    )
    content = full.choices[0].message.content
    if len(content) < 4:
        pytest.skip("the random model ended at once")
    stop = content[2:4]
    r = client.chat.completions.create(
        model=SERVED, messages=HELLO, max_tokens=16, temperature=0, stop=[stop]
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == content[: content.find(stop)]


def test_concurrent_requests_are_all_served(base_url, http):
    """Generation is one at a time per replica; the others wait for it, none is refused."""
    import asyncio

    async def main() -> list:
        client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0)

        async def stream() -> str:
            chunks = await client.chat.completions.create(
                model=SERVED, messages=HELLO, max_tokens=16, stream=True
            )
            return "".join([c.choices[0].delta.content or "" async for c in chunks])

        async def complete(seed: int) -> str:
            r = await client.chat.completions.create(
                model=SERVED, messages=HELLO, max_tokens=16, seed=seed
            )
            return r.choices[0].message.content

        return await asyncio.gather(stream(), complete(1), complete(2), stream())

    texts = asyncio.run(main())
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)
    assert http.get("/healthz").status_code == 200


def test_missing_or_wrong_key_is_401(base_url):
    for key in ("wrong-key-0123456789abcdef", "x"):
        bad = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            bad.chat.completions.create(model=SERVED, messages=HELLO, max_tokens=2)
        # As the OpenAI API answers a bad key: 401, invalid_request_error, invalid_api_key.
        assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
        assert err.value.type == "invalid_request_error" and KEY not in str(err.value.body)
        assert no_trace(json.dumps(err.value.body))
    r = httpx.post(f"{base_url}/v1/chat/completions", json={"messages": HELLO})
    openai_error(r, 401, "missing_api_key")
    r = httpx.get(f"{base_url}/v1/models", headers={"X-API-Key": "wrong-key-0123456789abcdef"})
    openai_error(r, 401, "invalid_api_key")
    assert httpx.get(f"{base_url}/v1/models").status_code == 401


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=2)
    assert err.value.code == "model_not_found" and SERVED in err.value.message
    assert err.value.param == "model" and err.value.type == "invalid_request_error"
    assert no_trace(json.dumps(err.value.body))
    # A client pointed at the wrong base_url (no /v1) hears which URL it asked for.
    r = httpx.post(client.base_url.join("/policy/chat/completions"), json={}, headers=AUTH)
    assert openai_error(r, 404)["message"] == "Invalid URL (POST /policy/chat/completions)."


def test_a_long_model_name_is_not_echoed_back(http):
    for name in ("m" * 200, "m" * 10_000):
        r = http.post("/v1/chat/completions", json={"messages": HELLO, "model": name},
                      headers=AUTH)  # fmt: skip
        assert r.status_code in (400, 404, 413), r.text
        assert len(r.content) < 1000 and "m" * 100 not in r.text
    r = http.get("/v1/models/" + "m" * 5000, headers=AUTH)
    assert r.status_code == 404 and len(r.content) < 1000


def test_stop_sequences_are_bounded(base_url, http):
    """At most 4 stops of 1 to MAX_STOP_CHARS characters; the longest allowed request body of
    stop text is refused at once, streamed or not, and the replica stays responsive."""
    import time

    over = [
        ["a", "b", "c", "d", "e"],
        [""],
        "",
        "x" * (MAX_STOP_CHARS + 1),
        ["x" * (MAX_BODY // 2)],
    ]
    for stop in over:
        for stream in (False, True):
            body = {"messages": HELLO, "max_tokens": 8, "stop": stop, "stream": stream}
            started = time.perf_counter()
            r = http.post("/v1/chat/completions", json=body, headers=AUTH)
            assert r.status_code in (400, 413), (stop, r.text)
            if r.status_code == 400:
                assert openai_error(r, 400)["param"].startswith("stop"), r.text
            assert time.perf_counter() - started < 5  # refused, not generated
    body = {"messages": HELLO, "max_tokens": 8, "stop": ["y" * MAX_STOP_CHARS] * 4, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as r:
        assert r.status_code == 200 and r.read().decode().rstrip().endswith("data: [DONE]")
    assert httpx.get(f"{base_url}/healthz").status_code == 200


def test_types_are_strict(http):
    for extra in ({"max_tokens": "4"}, {"max_tokens": True}, {"n": 1.5}, {"stream": 1},
                  {"temperature": "0.5"}, {"seed": "7"}):  # fmt: skip
        r = http.post("/v1/chat/completions", json={"messages": HELLO, **extra}, headers=AUTH)
        error = openai_error(r, 400, "invalid_type")
        assert error["param"] == next(iter(extra)), error
    # 1e300 is an integer to JSON Schema (as 4.0 is 4, below), just far over the limit.
    r = http.post("/v1/chat/completions", json={"messages": HELLO, "n": 1e300}, headers=AUTH)
    assert openai_error(r, 400, "integer_above_max_value")["param"] == "n"
    body = {"messages": HELLO, "max_tokens": 2, "temperature": 1}  # an integer is a number
    assert http.post("/v1/chat/completions", json=body, headers=AUTH).status_code == 200
    # JSON Schema's integer admits 2.0 (schemathesis sent n: 4.0 as schema-valid): so do we.
    body = {"messages": HELLO, "max_tokens": 2.0, "n": 2.0, "seed": 7.0}
    r = http.post("/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == 200 and len(r.json()["choices"]) == 2, r.text


def test_a_temperature_too_small_to_sample_is_greedy(client, http):
    def text(temperature: float, stream: bool = False) -> str:
        body = {"messages": HELLO, "max_tokens": 8, "temperature": temperature, "stream": stream}
        r = http.post("/v1/chat/completions", json=body, headers=AUTH)
        assert r.status_code == 200, r.text
        if not stream:
            return r.json()["choices"][0]["message"]["content"]
        assert "error" not in r.text
        events = [json.loads(line[6:]) for line in r.text.splitlines()
                  if line.startswith("data: {")]  # fmt: skip
        return "".join(
            e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]
        )

    assert text(1e-300) == text(0) == text(1e-300, stream=True)


def test_max_tokens_or_n_over_the_cap_is_a_bad_request(client, http):
    """As the OpenAI API answers it: BadRequestError, with the field and OpenAI's code."""
    limit = MAX_TOKENS_LIMIT + 1
    for over in ({"max_tokens": limit}, {"max_completion_tokens": limit}, {"n": 4}):  # max_n 3
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=SERVED, messages=HELLO, **over)
        (param,) = over
        assert err.value.status_code == 400 and err.value.type == "invalid_request_error"
        assert err.value.code == "integer_above_max_value" and err.value.param == param
        assert str(over[param] - 1) in err.value.message  # the limit, e.g. "<= 32"


@pytest.mark.parametrize(
    ("content", "param", "code"),
    [
        (b'{"messages": [{"role": "user", "content": "ZQX"}', None, None),  # malformed JSON
        (b'{"model": "x"}', "messages", "missing_required_parameter"),
        (b'{"messages": []}', "messages", "empty_array"),
        (b'{"messages": [{"role": "tool", "content": "ZQX"}]}', "messages[0].role", "invalid_value"),
        (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}',
         "messages[0].content[0].type", "invalid_value"),
        (b'{"messages": [{"role": "user", "content": "ZQX"}], "temperature": 3}',
         "temperature", "decimal_above_max_value"),
        (b'{"messages": [{"role": "user", "content": "ZQX"}], "stream": "maybe"}',
         "stream", "invalid_type"),
        (b'[{"role": "user", "content": "ZQX"}]', None, "invalid_type"),  # not an object
    ],
)  # fmt: skip
def test_malformed_is_400_in_openais_shape(client, http, content, param, code):
    """400 invalid_request_error with ``param`` and ``code`` as OpenAI's, never the input; the
    OpenAI client raises BadRequestError for it."""
    headers = {**AUTH, "content-type": "application/json"}
    r = http.post("/v1/chat/completions", content=content, headers=headers)
    error = openai_error(r, 400, code)
    assert error["param"] == param, error
    assert "ZQX" not in error["message"]  # the request's values are not echoed
    if code is not None:  # what the OpenAI client makes of it (it only sends valid JSON)
        with pytest.raises(openai.BadRequestError) as err:
            client.post("/chat/completions", cast_to=object, body=json.loads(content))
        assert err.value.code == code and err.value.param == param


def test_the_seed_bound_is_exact_in_json_numbers(http):
    """Schemathesis sent 2**63 + 190, a valid seed for a client reading the bound 2**63 as a
    double; the bound is now exact as a double, and the app agrees with its schema at it."""
    route = http.get("/openapi.json").json()["paths"]["/v1/chat/completions"]["post"]
    ref = route["requestBody"]["content"]["application/json"]["schema"]["$ref"].split("/")[-1]
    schema = http.get("/openapi.json").json()["components"]["schemas"][ref]
    (bounded,) = [a for a in schema["properties"]["seed"]["anyOf"] if a.get("type") == "integer"]
    limit = int(bounded["exclusiveMaximum"])  # the document may write it as 9007199254740992.0
    assert float(limit) == limit and float(limit - 1) == limit - 1
    body = {"messages": HELLO, "max_tokens": 1}
    r = http.post("/v1/chat/completions", json={**body, "seed": limit - 1}, headers=AUTH)
    assert r.status_code == 200, r.text
    r = http.post("/v1/chat/completions", json={**body, "seed": limit}, headers=AUTH)
    assert openai_error(r, 400, "integer_above_max_value")["param"] == "seed"


def test_undecodable_body_is_a_documented_400(http):
    headers = {**AUTH, "content-type": "application/json"}
    r = http.post("/v1/chat/completions", content=b"?\xff@\xfe\xfd", headers=headers)
    openai_error(r, 400)
    route = http.get("/openapi.json").json()["paths"]["/v1/chat/completions"]["post"]
    assert "not UTF-8" in route["responses"]["400"]["description"]


def test_the_schema_says_streams_carry_one_choice(http):
    """Schemathesis sent stream: true with n: 2, valid by the schema, and got a 400."""
    schemas = http.get("/openapi.json").json()["components"]["schemas"]
    request = schemas["ChatCompletionRequest"]
    assert request["if"]["properties"]["stream"] == {"const": True}
    assert request["then"]["properties"]["n"] == {"const": 1}
    body = {"messages": HELLO, "n": 2, "stream": True}
    r = http.post("/v1/chat/completions", json=body, headers=AUTH)
    assert openai_error(r, 400, "unsupported_value")["param"] == "n"


def test_over_a_limit_is_400_and_a_body_over_the_cap_413(http):
    long = {"messages": [{"role": "user", "content": "x" * (MAX_CHARS + 1)}]}
    r = http.post("/v1/chat/completions", json=long, headers=AUTH)
    error = openai_error(r, 400, "string_above_max_length")
    assert error["param"] == "messages[0].content" and str(MAX_CHARS) in error["message"]
    many = {"messages": HELLO * (MAX_MESSAGES + 1)}
    r = http.post("/v1/chat/completions", json=many, headers=AUTH)
    assert openai_error(r, 400, "array_above_max_length")["param"] == "messages"
    big = json.dumps({"messages": [{"role": "user", "content": "x" * MAX_BODY}]})
    headers = {**AUTH, "content-type": "application/json"}
    r = http.post("/v1/chat/completions", content=big, headers=headers)
    assert str(MAX_BODY) in openai_error(r, 413, "request_too_large")["message"]


def test_unsupported_requests_are_400(http):
    cases = [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "parameter"),
        ({"logprobs": True}, "logprobs", "value"),
        ({"stream": True, "n": 2}, "n", "value"),
        ({"max_tokens": MAX_TOKENS_LIMIT, "response_format": {"type": "json_object"}},
         "response_format", "value"),
    ]  # fmt: skip
    for extra, param, what in cases:
        r = http.post("/v1/chat/completions", json={"messages": HELLO, **extra}, headers=AUTH)
        assert openai_error(r, 400, f"unsupported_{what}")["param"] == param, (extra, r.text)
    # Fields that change nothing here are tolerated, as OpenAI clients send them.
    body = {"messages": HELLO, "max_tokens": 2, "user": "u1", "store": False, "presence_penalty": 0}
    assert http.post("/v1/chat/completions", json=body, headers=AUTH).status_code == 200


def test_prompt_over_the_context_is_400(http):
    # The tiny model's context is 2048 tokens: 8 messages of 1900 characters are more.
    words = " ".join(["hello"] * 316)
    body = {"messages": [{"role": "user", "content": words}] * MAX_MESSAGES, "max_tokens": 4}
    r = http.post("/v1/chat/completions", json=body, headers=AUTH)
    assert "2048" in openai_error(r, 400, "context_length_exceeded")["message"]


def test_openapi_docs(http):
    spec = http.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/models", "/healthz"} <= set(spec["paths"])
    responses = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"400", "401", "404", "413", "503", "504"} <= set(responses)
    assert "422" not in responses  # invalid requests are 400s, as OpenAI's
    # Serve's own 503 is documented as what it is: plain text, with Retry-After.
    assert set(responses["503"]["content"]) == {"text/plain"}
    assert "Retry-After" in responses["503"]["headers"]
    assert http.get("/docs").status_code == 404  # the Swagger UI is off unless asked for


# ----------------------------------------------------------------- fuzzing

MESSAGE = st.fixed_dictionaries(
    {
        "role": mostly(st.sampled_from(["user", "assistant", "system", "developer"]), st.just("tool")),
        "content": mostly(
            st.text(max_size=80)
            | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=40)}),
                       max_size=3),
            st.just("x" * (MAX_CHARS + 1)),
        ),
    }
)  # fmt: skip
CHAT_REQUIRED = {
    "messages": mostly(
        st.lists(MESSAGE, min_size=1, max_size=3), st.lists(MESSAGE, max_size=MAX_MESSAGES + 1)
    )
}
CHAT_OPTIONAL = {
    "model": mostly(st.just(SERVED), st.sampled_from(["gpt-4o", "m" * 300]) | st.text(max_size=20)),
    "max_tokens": mostly(st.integers(1, 4), st.integers(-1, MAX_TOKENS_LIMIT + 1)),
    "max_completion_tokens": mostly(st.integers(1, 4), st.integers(-1, MAX_TOKENS_LIMIT + 1)),
    "temperature": mostly(st.floats(0, 2), st.sampled_from([1e-300, 5e-324]) | st.floats(-1, 3)),
    "top_p": mostly(st.floats(0.01, 1), st.floats(-0.5, 1.5)),
    "n": mostly(st.integers(1, 2), st.integers(-1, 4)),
    "seed": mostly(st.integers(0, 2**63 - 1), st.integers(-5, 2**64)),
    "stop": mostly(
        st.text(min_size=1, max_size=4) | st.lists(st.text(min_size=1, max_size=4), max_size=4),
        st.lists(st.text(max_size=300), max_size=6),
    ),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "logprobs": st.booleans(),
    "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])}),
}


def test_fuzzed_chat_requests_get_no_server_error_and_documented_answers(http):
    """A fixed budget of generated requests, valid and not: never a 5xx, only statuses the
    OpenAPI document lists, errors in the one JSON shape, answers that parse as documented."""
    documented = documented_statuses(http, "/v1/chat/completions")
    seen: Counter[int] = Counter()
    codes: Counter[str | None] = Counter()  # the errors' OpenAI codes

    @fuzz_settings(max_examples=100)
    @given(body=mostly(bodies(CHAT_REQUIRED, CHAT_OPTIONAL), JSON))
    def one(body) -> None:
        r = http.post("/v1/chat/completions", json=body, headers=AUTH)
        seen[r.status_code] += 1
        check_answer(r, documented, ChatCompletion)
        if r.status_code >= 400:
            codes[r.json()["error"]["code"]] += 1

    one()
    print("statuses:", dict(seen), "codes:", dict(codes))
    # The budget reached generation often, and several kinds of refusal besides.
    assert seen[200] >= 10 and len(codes) >= 5, (seen, codes)
    assert http.get("/healthz").status_code == 200
