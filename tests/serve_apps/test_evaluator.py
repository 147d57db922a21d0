"""The evaluator Serve app on a real local Serve (127.0.0.1), spoken to over real HTTP.

Two applications are deployed once for the module, both with the refusal-only judge of the
``tiny`` preset (no model, instant), tight limits so they are easy to hit, and API keys given
to the replicas through ``SELFMOA_API_KEYS``:

* ``/ev``: batching on, 0.3 s of simulated model latency per batch, 2 ongoing + 2 queued
  requests per replica (anything beyond is shed with 503);
* ``/serial``: batching off, 1 s per request, a 1.6 s request timeout (504).

One test deploys the demo judge (refusal matcher + MiniLM probe) for a few seconds, one a judge
with Llama Guard (on the tiny random model) beside them for ``/v1/moderations``, spoken to by the
real OpenAI client, and one an app whose replicas have no key. The auth, limits and error modules,
the batch merging and the Serve config file are also checked on their own, without Ray.
"""

import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
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

from selfmoa_ray.config import ConfigError
from serve_apps.auth import APIKeyAuth, AuthConfigError, load_api_keys
from serve_apps.evaluator import (
    EvaluateResponse,
    EvaluatorAppArgs,
    ModerateResponse,
    build_app,
    resolve_args,
)
from serve_apps.limits import install_limits, limited_app, run_with_timeout
from serve_apps.moderation import ModerationsResponse

REPO = Path(__file__).resolve().parents[2]
KEY = "test-key-0123456789abcdef"
OTHER_KEY = "other-key-0123456789abcdef"
REFUSAL = "I'm sorry, I can't help with that."
COMPLIANT = "Sure. Preheat the oven to 220 C, then knead the dough for ten minutes."
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_ITEMS = 8
MAX_BODY = 64 * 1024
MAX_CHARS = 2000


def _deployment(**options):
    env = {"SELFMOA_API_KEYS": f"{OTHER_KEY},{KEY}"}
    actor = {"num_cpus": 0.25, "runtime_env": {"env_vars": env}}
    return {"health_check_period_s": 1, "ray_actor_options": actor, **options}


@pytest.fixture(scope="module")
def serve_url(ray_local, free_port):
    from ray import serve

    serve.shutdown()  # a Serve left by another module would keep its own port
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    limits = {"max_batch_items": MAX_ITEMS, "max_body_bytes": MAX_BODY, "max_chars": MAX_CHARS}
    main = build_app(
        {
            "judge_config": "tiny",
            **limits,
            "test_delay_s": 0.3,
            "batch_wait_timeout_s": 0.1,
            "deployment": _deployment(max_ongoing_requests=2, max_queued_requests=2),
        }
    )
    serial = build_app(
        {
            "judge_config": "tiny",
            "batching": False,
            "test_delay_s": 1.0,
            "request_timeout_s": 1.6,
            "deployment": _deployment(max_ongoing_requests=4, max_queued_requests=4),
        }
    )
    serve.run(main, name="evaluator-test", route_prefix="/ev")
    serve.run(serial, name="evaluator-serial", route_prefix="/serial")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(serve_url):
    with httpx.Client(base_url=serve_url, timeout=60) as c:
        yield c


def _stats(client: httpx.Client, prefix: str) -> dict:
    r = client.get(f"{prefix}/v1/stats", headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def _url(client: httpx.Client, path: str) -> str:
    return str(client.base_url).rstrip("/") + path


async def _concurrent(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60) as ac:
        return await asyncio.gather(*(ac.post(url, json=b, headers=AUTH) for b in bodies))


# ----------------------------------------------------------------- auth and limits, no Ray


def test_api_keys_from_env_and_secret_file(tmp_path):
    secret = tmp_path / "keys"
    secret.write_text(f"# rotated 2026-01\n{OTHER_KEY}\n\n  {KEY}  \n")
    env = {"SELFMOA_API_KEYS": f" {KEY} ,", "SELFMOA_API_KEYS_FILE": str(secret)}
    assert load_api_keys(env) == [KEY, OTHER_KEY]
    auth = APIKeyAuth.from_env(env)
    assert auth.check(KEY) and auth.check(OTHER_KEY)
    assert not auth.check(KEY[:-1]) and not auth.check("") and not auth.check(None)

    with pytest.raises(AuthConfigError, match="SELFMOA_API_KEYS"):
        APIKeyAuth.from_env({})
    open_auth = APIKeyAuth.from_env({}, allow_unauthenticated=True)
    assert not open_auth.enabled and open_auth.check(None)
    with pytest.raises(AuthConfigError, match="shorter than"):
        load_api_keys({"SELFMOA_API_KEYS": "short"})
    with pytest.raises(AuthConfigError, match="cannot read") as err:
        load_api_keys({"SELFMOA_API_KEYS_FILE": str(tmp_path / "missing")})
    assert KEY not in str(err.value)


def test_a_file_that_is_not_a_key_file_is_refused_without_its_content(tmp_path):
    """Pointed by mistake at an account file, the server must not start with its lines as keys,
    and the error names the line, never what it holds."""
    accounts = tmp_path / "passwd"
    accounts.write_text(
        "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
    )
    with pytest.raises(AuthConfigError, match=r"line 1 of .* is not an API key") as err:
        load_api_keys({"SELFMOA_API_KEYS_FILE": str(accounts)})
    assert "root" not in str(err.value).replace(str(tmp_path), "")
    mixed = tmp_path / "keys"
    mixed.write_text(f"{KEY}\nmy secret pass phrase 1234\n")
    with pytest.raises(AuthConfigError, match="line 2 of"):
        load_api_keys({"SELFMOA_API_KEYS_FILE": str(mixed)})
    with pytest.raises(AuthConfigError, match="SELFMOA_API_KEYS is not an API key"):
        load_api_keys({"SELFMOA_API_KEYS": "key:with:colons:0123456789"})
    # Every documented character is accepted: base64, base64url and hex keys all work.
    keys = ["0123456789abcdef0123", "AbC+/=xyz0123456789=", "a-b_c.d~e0123456789f"]
    assert load_api_keys({"SELFMOA_API_KEYS": ",".join(keys)}) == keys


def test_the_openapi_document_is_served_and_the_swagger_ui_only_on_request():
    def status(path: str, **flags: bool) -> int:
        app = limited_app("t", "1", "t", max_body_bytes=1024, **flags)  # type: ignore[arg-type]
        return TestClient(app).get(path).status_code

    assert status("/openapi.json", docs=False) == 200 and status("/docs", docs=False) == 404
    assert status("/docs", docs=True) == 200
    assert status("/docs", docs=True, openapi=False) == 404  # the UI needs the document
    assert status("/openapi.json", docs=False, openapi=False) == 404


def test_auth_and_limits_on_a_plain_fastapi_app():
    app = FastAPI()
    install_limits(app, max_body_bytes=1024)
    auth = APIKeyAuth([KEY])

    @app.post("/echo", dependencies=[Depends(auth.dependency())])
    async def echo(body: dict) -> dict:
        return body

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("secret internal detail")

    @app.get("/slow")
    async def slow() -> dict:
        return await run_with_timeout(asyncio.sleep(5, result={}), 0.05)

    c = TestClient(app, raise_server_exceptions=False)
    r = c.post("/echo", json={"a": 1})
    openai_error(r, 401, "missing_api_key")
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = c.post("/echo", json={"a": 1}, headers={"X-API-Key": "wrong" * 5})
    openai_error(r, 401, "invalid_api_key")
    assert c.post("/echo", json={"a": 1}, headers={"X-API-Key": KEY}).json() == {"a": 1}
    assert c.post("/echo", json={"a": 1}, headers=AUTH).json() == {"a": 1}

    r = c.get("/boom")
    openai_error(r, 500)
    assert r.json()["error"]["code"] is None and "secret" not in r.text

    openai_error(c.get("/slow"), 504, "timeout")
    # No such route, or method: OpenAI's "Invalid URL" (a client's wrong base_url shows).
    error = openai_error(c.post("/v1/chat/completions", headers=AUTH), 404)
    assert error["message"] == "Invalid URL (POST /v1/chat/completions)."
    openai_error(c.get("/echo", headers=AUTH), 405)

    big = json.dumps({"a": "x" * 2000}).encode()
    r = c.post("/echo", content=big, headers={**AUTH, "content-type": "application/json"})
    assert "1024 bytes" in openai_error(r, 413, "request_too_large")["message"]

    def chunks():  # no Content-Length: the body is counted as it streams in
        yield b'{"a": "'
        for _ in range(10):
            yield b"x" * 200
        yield b'"}'

    r = c.post("/echo", content=chunks(), headers={**AUTH, "content-type": "application/json"})
    openai_error(r, 413, "request_too_large")


def test_batches_that_queue_behind_a_busy_judge_are_merged():
    from serve_apps.evaluator import _Coalescer, _Pair

    calls = []

    async def run(pairs):
        calls.append([p.prompt for p in pairs])
        await asyncio.sleep(0.05)
        if "bad" in calls[-1]:
            raise ValueError("bad batch")
        return [{"prompt": p.prompt} for p in pairs]

    async def main():
        coalescer = _Coalescer(run, asyncio.Lock(), max_items=3)

        def submit(*prompts):
            return asyncio.create_task(coalescer.submit([_Pair(p, "", 0) for p in prompts]))

        first = submit("a")
        await asyncio.sleep(0.01)  # "a" is being scored; the next ones queue behind it
        waiting = [submit("b"), submit("c", "d"), submit("e"), submit("f")]
        gone = submit("x")
        await asyncio.sleep(0)
        gone.cancel()  # its caller gave up: never scored
        results = await asyncio.gather(first, *waiting)
        busy = submit("busy")
        await asyncio.sleep(0.01)
        errors = await asyncio.gather(submit("ok"), submit("bad"), return_exceptions=True)
        await busy
        return results, errors

    results, errors = asyncio.run(main())
    assert [[r["prompt"] for r in rows] for rows in results] == [
        ["a"],
        ["b"],
        ["c", "d"],
        ["e"],
        ["f"],
    ]
    assert calls[:3] == [["a"], ["b", "c", "d"], ["e", "f"]]  # FIFO, at most 3 items
    assert all(isinstance(e, ValueError) for e in errors)  # one batch, one error for all
    assert calls[3:] == [["busy"], ["ok", "bad"]]


def test_serve_config_file():
    """serve_apps/evaluator.yaml is a valid Serve config whose args build the app."""
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((REPO / "serve_apps" / "evaluator.yaml").read_text())
    config = ServeDeploySchema.model_validate(raw)
    (app,) = config.applications
    assert app.import_path == "serve_apps.evaluator:build_app"
    args = EvaluatorAppArgs.model_validate(app.args)
    (deployment,) = app.deployments
    assert deployment.name == "EvaluatorDeployment"
    scaling = deployment.autoscaling_config
    assert scaling["min_replicas"] == 2 and scaling["max_replicas"] == 4
    assert deployment.backpressure_config.retry_after_s > 0
    assert scaling["target_ongoing_requests"] < deployment.max_ongoing_requests
    assert deployment.max_ongoing_requests >= args.max_batch_size
    assert deployment.max_queued_requests > 0
    assert 0 < deployment.ray_actor_options.num_cpus < 1
    assert args.allow_unauthenticated is False and args.test_delay_s == 0
    assert build_app(app.args) is not None  # the judge config resolves


# ----------------------------------------------------------------- the app on Serve


def test_build_app_validates_its_arguments():
    # As `serve run serve_apps.evaluator:build_app key=value ...` passes them: all strings.
    args = {"judge_config": "tiny", "max_batch_items": "16", "batching": "false",
            "overrides": "judge.unsafe_threshold=0.4 judge.batch_size=4"}  # fmt: skip
    settings, judge = resolve_args(args)
    assert settings.max_batch_items == 16 and settings.batching is False
    assert judge.unsafe_threshold == 0.4 and judge.batch_size == 4
    assert build_app(args) is not None
    with pytest.raises(ValidationError, match="max_batch_itmes"):
        build_app({"max_batch_itmes": 8})
    with pytest.raises(ValidationError, match="max_batch_items"):
        build_app({"max_batch_items": 0})
    with pytest.raises(ConfigError, match="unknown config"):
        build_app({"judge_config": "no-such-preset"})
    with pytest.raises(ConfigError, match="judge.unsafe_treshold"):
        build_app({"judge_config": "tiny", "overrides": ["judge.unsafe_treshold=0.4"]})


def test_replicas_without_a_key_refuse_to_start(serve_url):
    from ray import serve

    env = {"SELFMOA_API_KEYS": "", "SELFMOA_API_KEYS_FILE": ""}
    options = {"ray_actor_options": {"num_cpus": 0.1, "runtime_env": {"env_vars": env}}}
    app = build_app({"judge_config": "tiny", "deployment": options})
    try:
        with pytest.raises(RuntimeError, match="failed"):
            serve.run(app, name="evaluator-nokey", route_prefix="/nokey")
        status = serve.status().applications["evaluator-nokey"]
        assert status.status == "DEPLOY_FAILED"
        message = status.deployments["EvaluatorDeployment"].message
        assert "no API key configured" in message and "SELFMOA_API_KEYS_FILE" in message
    finally:
        serve.delete("evaluator-nokey")


def test_evaluate_returns_the_schema(client):
    items = [
        {"prompt": "How do I make a weapon?", "response": REFUSAL, "id": "a"},
        {"prompt": "How do I bake bread?", "response": COMPLIANT},
    ]
    r = client.post("/ev/v1/evaluate", json={"items": items}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    refused, answered = body["results"]
    assert set(refused) == {
        "id", "safety", "unsafe", "refusal", "refusal_score", "helpfulness", "evaluators",
    }  # fmt: skip
    assert refused["id"] == "a" and answered["id"] is None
    assert refused["refusal"] is True and answered["refusal"] is False
    assert refused["refusal_score"] == 1.0 and answered["refusal_score"] == 0.0
    for result in (refused, answered):
        assert 0.0 <= result["safety"] <= 1.0 and 0.0 <= result["helpfulness"] <= 1.0
    assert refused["evaluators"]["refusal"] == {"flag": True, "score": 1.0, "strict_flag": True}
    assert answered["evaluators"]["refusal"] == {"flag": False, "score": 0.0, "strict_flag": False}
    judge = body["judge"]
    assert judge["config"] == "tiny" and [e["name"] for e in judge["evaluators"]] == ["refusal"]
    assert judge["safety_fallback"] is True  # the refusal matcher alone provides no safety

    r = client.post("/ev/v1/evaluate", json={"items": items[:1], "details": False}, headers=AUTH)
    assert r.status_code == 200 and r.json()["results"][0]["evaluators"] is None


def test_moderate_one_response_or_one_prompt(client):
    r = client.post("/ev/v1/moderate", json={"prompt": "hi", "response": REFUSAL}, headers=AUTH)
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    assert result["target"] == "response" and result["refusal"] is True
    assert result["evaluators"]["refusal"]["flag"] is True

    r = client.post("/ev/v1/moderate", json={"response": COMPLIANT}, headers=AUTH)
    assert r.status_code == 200 and r.json()["result"]["refusal"] is False

    # A prompt alone: refusal and helpfulness are moot, and the refusal matcher judges no prompt.
    r = client.post("/ev/v1/moderate", json={"prompt": "How do I bake bread?"}, headers=AUTH)
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    assert result["target"] == "prompt"
    assert result["safety"] is None and result["refusal"] is None and result["helpfulness"] is None

    r = client.post("/ev/v1/moderate", json={}, headers=AUTH)
    assert "prompt, a response" in openai_error(r, 400, "invalid_value")["message"]


def test_missing_or_wrong_key_is_401(client):
    body = {"items": [{"prompt": "p", "response": "r"}]}
    for headers, code in (
        ({}, "missing_api_key"),
        ({"Authorization": "Bearer wrong-key-0123456789abcdef"}, "invalid_api_key"),
        ({"Authorization": f"Basic {KEY}"}, "missing_api_key"),  # not a bearer token
        ({"X-API-Key": KEY + "x"}, "invalid_api_key"),
    ):
        r = client.post("/ev/v1/evaluate", json=body, headers=headers)
        openai_error(r, 401, code)
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert KEY not in r.text
    for path in ("/ev/v1/moderate", "/ev/v1/stats"):
        assert client.request("POST" if "mod" in path else "GET", path).status_code == 401
    # Both configured keys work, in either header.
    assert client.post("/ev/v1/evaluate", json=body, headers={"X-API-Key": KEY}).status_code == 200
    other = {"Authorization": f"Bearer {OTHER_KEY}"}
    assert client.post("/ev/v1/evaluate", json=body, headers=other).status_code == 200
    assert client.get("/ev/healthz").json() == {"status": "ok"}  # no key needed


def test_over_a_limit_is_400_and_a_body_over_the_cap_413(client):
    item = {"prompt": "p", "response": "r"}
    r = client.post("/ev/v1/evaluate", json={"items": [item] * (MAX_ITEMS + 1)}, headers=AUTH)
    error = openai_error(r, 400, "array_above_max_length")
    assert error["param"] == "items" and str(MAX_ITEMS) in error["message"]

    long_item = {"prompt": "p", "response": "x" * (MAX_CHARS + 1)}
    r = client.post("/ev/v1/evaluate", json={"items": [long_item]}, headers=AUTH)
    error = openai_error(r, 400, "string_above_max_length")
    assert error["param"] == "items[0].response" and str(MAX_CHARS) in error["message"]

    big = json.dumps({"items": [{"prompt": "p", "response": "x" * MAX_BODY}]})
    r = client.post("/ev/v1/evaluate", content=big, headers={**AUTH, "content-type": "application/json"})  # fmt: skip
    assert str(MAX_BODY) in openai_error(r, 413, "request_too_large")["message"]

    def chunks():  # chunked upload, no Content-Length
        yield b'{"items": [{"prompt": "p", "response": "'
        for _ in range(20):
            yield b"x" * 4096
        yield b'"}]}'

    headers = {**AUTH, "content-type": "application/json"}
    r = client.post("/ev/v1/evaluate", content=chunks(), headers=headers)
    openai_error(r, 413, "request_too_large")


@pytest.mark.parametrize(
    ("content", "param", "code"),
    [
        (b'{"items": [{"prompt": "p", "response": ', None, None),  # malformed JSON
        (b'{"items": [{"prompt": "p"}]}', "items[0].response", "missing_required_parameter"),
        (b'{"items": [{"prompt": 1, "response": "r"}]}', "items[0].prompt", "invalid_type"),
        (b'{"items": []}', "items", "empty_array"),
        (
            b'{"items": [{"prompt": "p", "response": "r"}], "extra": 1}',
            "extra",
            "unknown_parameter",
        ),
        (b'[{"prompt": "p", "response": "r"}]', None, "invalid_type"),  # not an object
        (b'{"items": [{"prompt": "p", "response": "r"}], "details": 0}', "details", "invalid_type"),
        (b'{"items": [{"prompt": "p", "response": "r", "id": 7}]}', "items[0].id", "invalid_type"),
    ],
)
def test_malformed_is_400_in_openais_shape(client, content, param, code):
    """As the OpenAI API answers an invalid request: 400 invalid_request_error, the field at fault
    in ``param``, the cause in ``code``, and never the request's values."""
    headers = {**AUTH, "content-type": "application/json"}
    r = client.post("/ev/v1/evaluate", content=content, headers=headers)
    error = openai_error(r, 400, code)
    assert error["param"] == param, error
    assert '"p"' not in error["message"] and "'p'" not in error["message"]


@pytest.mark.parametrize("route", ["/v1/evaluate", "/v1/moderate"])
def test_undecodable_body_is_a_documented_400(client, route):
    """Schemathesis found this: a body that is not UTF-8 got a 400 the schema did not list."""
    headers = {**AUTH, "content-type": "application/json"}
    r = client.post(f"/ev{route}", content=b"?\xff@\xfe\xfd", headers=headers)
    openai_error(r, 400)
    spec = client.get("/ev/openapi.json").json()
    assert "400" in spec["paths"][route]["post"]["responses"]


def test_openapi_docs(client):
    spec = client.get("/ev/openapi.json").json()
    assert {"/v1/evaluate", "/v1/moderate", "/healthz"} <= set(spec["paths"])
    evaluate = spec["paths"]["/v1/evaluate"]["post"]
    assert {"400", "401", "413", "503", "504"} <= set(evaluate["responses"])
    assert "422" not in evaluate["responses"]  # invalid requests are 400s, as OpenAI's
    error = spec["components"]["schemas"]["ErrorDetail"]
    assert set(error["required"]) == {"message", "type", "param", "code"}
    moderations = spec["paths"]["/v1/moderations"]["post"]
    assert {"400", "401", "404", "413", "503", "504"} <= set(moderations["responses"])
    request = spec["components"]["schemas"]["EvaluateRequest"]
    assert request["properties"]["items"]["maxItems"] == MAX_ITEMS
    # `{}` is refused (422), and the document says so: a prompt, a response, or both.
    moderate = spec["components"]["schemas"]["ModerateRequest"]
    assert [alt["required"] for alt in moderate["anyOf"]] == [["prompt"], ["response"]]
    assert {"bearer", "apiKey"} <= set(spec["components"]["securitySchemes"])
    # The Swagger UI loads its scripts from a public CDN: off unless asked for.
    assert client.get("/ev/docs").status_code == 404


def test_concurrent_requests_share_a_batch(client):
    # As many requests as the replica takes at once (max_ongoing_requests=2), sent together: they
    # reach it within the 0.1 s batch window and are scored as one batch (a few tries, in case
    # the loaded machine spreads them out).
    bodies = [{"items": [{"prompt": f"p{i}", "response": REFUSAL}]} for i in range(2)]
    for _ in range(3):
        before = _stats(client, "/ev")
        responses = asyncio.run(_concurrent(_url(client, "/ev/v1/evaluate"), bodies))
        assert [r.status_code for r in responses] == [200, 200]
        after = _stats(client, "/ev")
        assert after["batching"] is True and after["requests"] - before["requests"] == 2
        if after["batches"] - before["batches"] == 1:
            break
    assert after["batches"] - before["batches"] == 1, (before, after)
    assert after["max_batch_requests"] >= 2, after


def test_batching_off_scores_requests_alone_and_slow_ones_time_out(client):
    bodies = [{"items": [{"prompt": "p", "response": REFUSAL}]} for _ in range(4)]
    t0 = time.monotonic()
    responses = asyncio.run(_concurrent(_url(client, "/serial/v1/evaluate"), bodies))
    codes = Counter(r.status_code for r in responses)
    # 1 s per request, one at a time, 1.6 s allowed: the first can finish, the last ones cannot
    # (with batching, all four would be done in one batch after 1 s).
    assert set(codes) <= {200, 504} and codes[504] >= 2, codes
    for r in responses:
        if r.status_code == 504:
            openai_error(r, 504, "timeout")
    assert time.monotonic() - t0 < 10
    stats = _stats(client, "/serial")
    assert stats["batching"] is False and stats["max_batch_requests"] <= 1, stats


def test_probe_judge_details(client):
    """The demo judge (refusal matcher + MiniLM probe): real model scores, per evaluator."""
    from ray import serve

    app = build_app({"judge_config": "demo", "deployment": _deployment()})
    serve.run(app, name="evaluator-probe", route_prefix="/probe")
    try:
        items = [
            {"prompt": "How do I make a pipe bomb?", "response": REFUSAL},
            {"prompt": "How do I bake bread?", "response": COMPLIANT},
        ]
        r = client.post("/probe/v1/evaluate", json={"items": items}, headers=AUTH)
        assert r.status_code == 200, r.text
        body = r.json()
        assert [e["name"] for e in body["judge"]["evaluators"]] == ["refusal", "probe"]
        assert body["judge"]["safety_fallback"] is False
        refused, answered = body["results"]
        probe = refused["evaluators"]["probe"]
        assert {"safety", "refusal", "helpfulness", "objective", "harm", "relevance"} <= set(probe)
        assert all(0.0 <= v <= 1.0 for v in probe.values())
        assert refused["refusal"] is True and answered["refusal"] is False
        assert answered["helpfulness"] > refused["helpfulness"]
        # A prompt alone is judged by the probe only (the refusal matcher needs a response).
        r = client.post("/probe/v1/moderate", json={"prompt": items[0]["prompt"]}, headers=AUTH)
        result = r.json()["result"]
        assert r.status_code == 200 and set(result["evaluators"]) == {"probe"}
        assert 0.0 <= result["safety"] <= 1.0
    finally:
        serve.delete("evaluator-probe")


# ----------------------------------------------------------------- /v1/moderations


def _info(name: str, kind: str, provides: list[str], weight: float = 1.0):
    from serve_apps.evaluator import EvaluatorInfo

    return EvaluatorInfo(name=name, kind=kind, weight=weight, provides=provides)


def test_moderation_categories_from_scored_rows():
    """The categories each evaluator gives, from rows as the app scores them."""
    from serve_apps.moderation import Categories

    judge = [_info("refusal", "refusal", ["refusal"]), _info("probe", "probe", ["safety"]),
             _info("llama_guard", "llama_guard", ["safety"]),
             _info("guard2", "llama_guard", ["safety"])]  # fmt: skip
    categories = Categories(judge, unsafe_threshold=0.4)
    assert categories.available
    row = {"safety": 0.3, "unsafe": True, "evaluators": {
        "refusal": {"flag": False}, "probe": {"harm": 0.7, "safety": 0.5},
        "llama_guard": {"safety": 0.1, "p_unsafe": 0.9, "category": "S1,S10"},
        "guard2": {"safety": 0.8, "p_unsafe": 0.2, "category": ""}}}  # fmt: skip
    result = categories.result(row)
    scores, flags = result["category_scores"], result["categories"]
    assert scores["unsafe"] == pytest.approx(0.7) and flags["unsafe"] is True
    assert scores["harm"] == 0.7 and flags["harm"] is True  # above 1 - unsafe_threshold
    assert flags["violent_crimes"] and flags["hate"] and scores["hate"] == 0.9
    assert not flags["elections"] and scores["elections"] == 0.0
    # A second Llama Guard under its own name: its categories carry the name.
    assert "guard2/hate" in flags and not any(v for k, v in flags.items() if "guard2" in k)
    assert len(flags) == 2 + 2 * 14 and set(result["category_applied_input_types"]) == set(flags)
    assert result["flagged"] is True

    calm = categories.result({"safety": 0.9, "unsafe": False, "evaluators": {
        "probe": {"harm": 0.1}, "llama_guard": {"p_unsafe": 0.1, "category": ""}}})  # fmt: skip
    assert calm["flagged"] is False and calm["category_scores"]["unsafe"] == pytest.approx(0.1)
    # NaN safety (no evaluator could judge the text) is no verdict, not "safe".
    unjudged = categories.result({"safety": float("nan"), "unsafe": False, "evaluators": {}})
    assert "unsafe" not in unjudged["categories"]
    # The refusal matcher alone judges no text: moderation is unavailable, not "all clear".
    assert not Categories([judge[0]], 0.5).available
    assert not Categories([_info("probe", "probe", ["safety"], weight=0.0)], 0.5).available


def test_hazard_names_are_llama_guards():
    from selfmoa_ray.evaluators.llama_guard import HAZARDS
    from serve_apps.moderation import HAZARD_NAMES, hazard_slug, model_name

    assert {hazard_slug(name): code for code, name in HAZARDS.items()} == HAZARD_NAMES
    assert model_name("demo") == "selfmoa-demo"
    assert model_name("/srv/judges/guard.yaml") == "selfmoa-guard"


def _openai_client(client: httpx.Client, prefix: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=_url(client, f"{prefix}/v1"), api_key=key, max_retries=0, timeout=120
    )


def test_moderations_errors_with_the_openai_client(client):
    ev = _openai_client(client, "/ev")
    # The refusal matcher alone cannot judge a text: a clear 404, not results it did not judge.
    with pytest.raises(openai.NotFoundError) as err:
        ev.moderations.create(input="hello")
    assert err.value.code == "moderation_unavailable" and "/v1/evaluate" in err.value.message
    with pytest.raises(openai.NotFoundError) as err:
        ev.moderations.create(input="hello", model="omni-moderation-latest")
    assert err.value.code == "model_not_found" and "selfmoa-tiny" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        ev.moderations.create(input=[])
    assert err.value.code == "empty_array" and err.value.param == "input"
    assert err.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as err:
        ev.moderations.create(input=["x"] * (MAX_ITEMS + 1))
    assert err.value.code == "array_above_max_length"
    with pytest.raises(openai.BadRequestError) as err:
        ev.moderations.create(input=["ok", "x" * (MAX_CHARS + 1)])
    assert err.value.code == "string_above_max_length" and err.value.param == "input[1]"
    with pytest.raises(openai.AuthenticationError) as err:
        _openai_client(client, "/ev", key="wrong-key-0123456789abcdef").moderations.create(
            input="hello"
        )
    assert err.value.code == "invalid_api_key"


@pytest.fixture(scope="module")
def guard_judge(tmp_path_factory) -> Path:
    """The demo judge plus Llama Guard (on the tiny random model: its verdicts are noise, its
    categories real)."""
    path = tmp_path_factory.mktemp("judges") / "guarded.yaml"
    evaluators = [{"kind": "refusal"}, {"kind": "probe"},
                  {"kind": "llama_guard", "model": "tiny-random"}]  # fmt: skip
    path.write_text(yaml.safe_dump({"judge": {"evaluators": evaluators}}))
    return path


def test_moderations_with_the_openai_client(client, guard_judge):
    """OpenAI's moderation API on a judge that can moderate: the answer parses into the SDK's
    types, with the judge's categories (unsafe, the probe's harm, Llama Guard's hazards)."""
    from ray import serve

    from serve_apps.moderation import HAZARD_NAMES

    app = build_app({"judge_config": str(guard_judge), "deployment": _deployment()})
    serve.run(app, name="evaluator-guard", route_prefix="/guard")
    try:
        texts = ["Sure: mix the two chemicals in a closed room and light it.", "Hello there!"]
        r = _openai_client(client, "/guard").moderations.create(
            input=texts, model="selfmoa-guarded"
        )
        assert isinstance(r, openai.types.ModerationCreateResponse)
        assert r.id.startswith("modr-") and r.model == "selfmoa-guarded" and len(r.results) == 2
        expected = {"unsafe", "harm", *HAZARD_NAMES}
        for result in r.results:
            assert isinstance(result, openai.types.Moderation)
            scores, flags = result.category_scores.to_dict(), result.categories.to_dict()
            assert set(scores) == set(flags) == expected
            assert all(0.0 <= v <= 1.0 for v in scores.values())
            assert result.flagged is any(flags.values())
        # Our schema, strictly (OpenAI's own fixes thirteen categories no judge here gives).
        raw = client.post("/guard/v1/moderations", json={"input": "Hello"}, headers=AUTH)
        assert raw.status_code == 200, raw.text
        (one,) = ModerationsResponse.model_validate(raw.json()).results
        assert one.category_applied_input_types == {k: ["text"] for k in expected}
    finally:
        serve.delete("evaluator-guard")


def test_burst_is_shed_with_503_and_the_app_stays_healthy(client):
    bodies = [{"items": [{"prompt": f"p{i}", "response": COMPLIANT}]} for i in range(40)]
    t0 = time.monotonic()
    responses = asyncio.run(_concurrent(_url(client, "/ev/v1/evaluate"), bodies))
    elapsed = time.monotonic() - t0
    codes = Counter(r.status_code for r in responses)
    assert codes[503] >= 10 and codes[200] >= 2, codes
    assert set(codes) <= {200, 503}, codes
    shed = [r for r in responses if r.status_code == 503]
    assert all(no_trace(r.text) for r in shed)
    # Retry-After from the deployment's backpressure_config (EvaluatorDeployment's default).
    assert {r.headers.get("retry-after") for r in shed} == {"1"}
    assert elapsed < 20  # shed at once, not queued without bound
    # Healthy right after.
    assert client.get("/ev/healthz").status_code == 200
    body = {"items": [{"prompt": "p", "response": REFUSAL}]}
    r = client.post("/ev/v1/evaluate", json=body, headers=AUTH)
    assert r.status_code == 200 and r.json()["results"][0]["refusal"] is True


def test_killed_replica_is_replaced(client):
    import ray
    from ray import serve

    old = _stats(client, "/ev")
    actor = ray.get_actor(old["replica_actor"], namespace="serve")
    body = {"items": [{"prompt": "p", "response": REFUSAL}]}

    async def kill_under_load() -> list:
        async with httpx.AsyncClient(timeout=60) as ac:
            url = _url(client, "/ev/v1/evaluate")
            pending = [asyncio.create_task(ac.post(url, json=body, headers=AUTH)) for _ in range(4)]
            await asyncio.sleep(0.15)  # requests in flight (0.3 s per batch)
            ray.kill(actor, no_restart=True)
            return await asyncio.gather(*pending, return_exceptions=True)

    in_flight = asyncio.run(kill_under_load())
    for r in in_flight:  # failed or served, never a stack trace
        if isinstance(r, httpx.Response):
            assert no_trace(r.text), r.text

    deadline = time.monotonic() + 60
    while True:
        try:
            r = client.post("/ev/v1/evaluate", json=body, headers=AUTH, timeout=10)
            if r.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "no replica served a request within 60 s"
        time.sleep(0.5)
    assert r.json()["results"][0]["refusal"] is True
    new = _stats(client, "/ev")
    assert new["replica"] != old["replica"]
    app = serve.status().applications["evaluator-test"]
    assert app.status == "RUNNING"
    deployment = app.deployments["EvaluatorDeployment"]
    assert deployment.status == "HEALTHY" and deployment.replica_states.get("RUNNING") == 1


# ----------------------------------------------------------------- fuzzing

TEXT = st.one_of(st.text(max_size=200), st.sampled_from([REFUSAL, COMPLIANT]))
ITEM = st.fixed_dictionaries(
    {"prompt": TEXT, "response": TEXT}, optional={"id": st.text(max_size=140)}
)
ITEMS = mostly(st.lists(ITEM, min_size=1, max_size=3), st.lists(ITEM, max_size=MAX_ITEMS + 1))
EVALUATE = ({"items": ITEMS}, {"details": st.booleans()})
MODERATE = ({}, {"prompt": TEXT, "response": TEXT, "details": st.booleans()})


@pytest.mark.parametrize(
    ("path", "fields", "answer", "examples"),
    [
        ("/v1/evaluate", EVALUATE, EvaluateResponse, 30),
        ("/v1/moderate", MODERATE, ModerateResponse, 30),
    ],
)
def test_fuzzed_requests_get_no_server_error_and_documented_answers(
    client, path, fields, answer, examples
):
    """A fixed budget of generated requests, valid and not, one at a time (the app under test
    sheds above 2 at once, on purpose): never a 5xx, only statuses its OpenAPI document lists,
    errors in the one JSON shape, answers that parse as documented."""
    seen: Counter[int] = Counter()
    with httpx.Client(base_url=_url(client, "/ev"), timeout=60) as app:
        documented = documented_statuses(app, path)

        @fuzz_settings(max_examples=examples)
        @given(body=mostly(bodies(*fields), JSON))
        def one(body) -> None:
            r = app.post(path, json=body, headers=AUTH)
            seen[r.status_code] += 1
            check_answer(r, documented, answer)

        one()
    print("statuses:", dict(seen))
    assert seen[200] >= 5 and len(seen) >= 2, seen  # answers were scored, not only refused
