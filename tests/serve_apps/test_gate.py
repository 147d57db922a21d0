"""The API-key gate (serve_apps/gate.py) that the GPU policy path puts in front of Ray Serve LLM.

``ray.serve.llm`` does not import without vLLM, so the gate is checked in front of stand-ins, on a
real local Serve (127.0.0.1) and spoken to by the real OpenAI client:

* our own HF policy app (``PolicyDeployment``, whose ASGI app is built per replica), with its own
  key check off, so every 401 comes from the gate;
* a small FastAPI ingress whose app is built up front and whose class is assembled the way Ray's
  ``make_fastapi_ingress`` assembles ``OpenAiIngress`` (the path ``GatedOpenAiIngress`` takes).

``KeyGate`` itself is also checked on a plain FastAPI app, without Ray.
"""

import asyncio
import contextlib
import json

import httpx
import openai
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient

from serve_apps.auth import APIKeyAuth
from serve_apps.gate import HEALTH_PATH, GateArgs, KeyGate, gated
from serve_apps.policy import PolicyDeployment, vllm_serving_args

KEY = "gate-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
HELLO = [{"role": "user", "content": "Say hello."}]
NO_KEYS = {"SELFMOA_API_KEYS": "", "SELFMOA_API_KEYS_FILE": ""}
P = "/policy"


def _error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == code, error
    return error


# ----------------------------------------------------------------- the gate alone, no Ray


def _inner_app(started: list[str]) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        started.append("up")
        yield

    app = FastAPI(lifespan=lifespan)

    @app.post("/v1/echo")
    async def echo(body: dict) -> dict:
        return body

    @app.get("/v1/stream")
    async def stream() -> StreamingResponse:
        async def events():
            for i in range(3):
                yield f"data: {i}\n\n"
                await asyncio.sleep(0)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def test_the_gate_checks_keys_before_the_app():
    started: list[str] = []
    inner = _inner_app(started)
    gate = KeyGate(inner, APIKeyAuth([KEY]), max_body_bytes=1024)
    # As Serve calls an app under its route prefix: root_path is the prefix, path the full path.
    with TestClient(gate, root_path=P) as c:  # the app's lifespan runs through the gate
        assert started == ["up"]
        # Health without a key, answered by the gate (the app has no such route).
        assert c.get(P + HEALTH_PATH).json() == {"status": "ok"}
        r = c.post(P + "/v1/echo", json={"a": 1})
        _error(r, 401, "missing_api_key")
        assert r.headers["www-authenticate"].startswith("Bearer")
        _error(c.post(P + "/v1/echo", json={"a": 1}, headers={"X-API-Key": "w" * 20}), 401, "invalid_api_key")  # fmt: skip
        _error(
            c.post(P + "/v1/echo", headers={"Authorization": f"Basic {KEY}"}),
            401,
            "missing_api_key",
        )
        _error(c.get(P + "/openapi.json"), 401, "missing_api_key")  # everything but health
        # With a key, in either header: the app's own answers, streams included.
        assert c.post(P + "/v1/echo", json={"a": 1}, headers=AUTH).json() == {"a": 1}
        assert c.post(P + "/v1/echo", json={"b": 2}, headers={"X-API-Key": KEY}).json() == {"b": 2}
        with c.stream("GET", P + "/v1/stream", headers=AUTH) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            assert list(r.iter_lines()) == ["data: 0", "", "data: 1", "", "data: 2", "",
                                            "data: [DONE]", ""]  # fmt: skip
        big = json.dumps({"a": "x" * 2000})
        r = c.post(
            P + "/v1/echo", content=big, headers={**AUTH, "content-type": "application/json"}
        )
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        # A wrong key gets nothing from the app, not even its size check.
        r = c.post(P + "/v1/echo", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 401

    # Serve registers its overload handlers on the replica's app: they reach the inner app.
    async def handler(request, exc):  # pragma: no cover - only registered
        return None

    gate.add_exception_handler(LookupError, handler)
    assert inner.exception_handlers[LookupError] is handler


def test_the_vllm_path_puts_the_gate_in_front_of_ray_serve_llm():
    """The argument ``build_openai_app`` gets for backend vllm: Ray's ingress class replaced by
    the gated one, with the app's key settings (ray.serve.llm itself cannot import here)."""
    from serve_apps.policy import GATED_INGRESS, PolicyAppArgs

    settings = PolicyAppArgs(served_model_name="aligned", backend="vllm", max_body_bytes=4096)
    args = vllm_serving_args(settings, "/models/aligned")
    (llm,) = args["llm_configs"]
    assert llm["model_loading_config"]["model_id"] == "aligned"
    ingress = args["ingress_cls_config"]
    assert ingress["ingress_cls"] == GATED_INGRESS == "serve_apps.gate:GatedOpenAiIngress"
    gate = GateArgs.model_validate(ingress["ingress_extra_kwargs"]["api_gate"])
    assert gate == GateArgs(max_body_bytes=4096) and not gate.allow_unauthenticated
    module, name = GATED_INGRESS.split(":")
    import importlib

    gate_module = importlib.import_module(module)
    with pytest.raises(ImportError, match="vLLM"):  # built from Ray's OpenAiIngress, on demand
        getattr(gate_module, name)
    with pytest.raises(AttributeError):
        gate_module.NoSuchIngress  # noqa: B018


# ----------------------------------------------------------------- on Serve


def _fastapi_ingress(cls: type, endpoints: dict) -> type:
    """``cls`` as Ray's ``make_fastapi_ingress`` makes Ray's ``OpenAiIngress`` an ingress: an app
    built up front, routes bound to a subclass, then ``serve.ingress(app)``."""
    from ray import serve

    app = FastAPI()
    routes = {name: route(app)(getattr(cls, name)) for name, route in endpoints.items()}
    subclass = type(cls.__name__, (cls,), routes)
    subclass.__qualname__ = cls.__qualname__
    return serve.ingress(app)(subclass)


class EchoIngress:
    """A stand-in for Ray's OpenAiIngress: a constructor with its own arguments, route methods."""

    def __init__(self, model_id: str):
        self.model_id = model_id

    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_id, "object": "model"}]}

    async def stream(self) -> StreamingResponse:
        async def events():
            for word in ("a", "b"):
                yield f"data: {word}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def serve_url(ray_local, free_port, tmp_path_factory):
    import sys

    from ray import cloudpickle, serve

    # The stand-in ingress lives in this test module, which the replicas cannot import.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    serve.shutdown()  # a Serve left by another module would keep its own port
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    keys = tmp_path_factory.mktemp("secrets") / "api_keys"
    keys.write_text(f"# the gate's keys\n{KEY}\n")
    # No key in the replicas' environment: the policy app runs open, only the gate has keys.
    actor = {"num_cpus": 0.25, "runtime_env": {"env_vars": NO_KEYS}}
    gate = GateArgs(api_keys_file=str(keys), max_body_bytes=8192).model_dump()
    policy = PolicyDeployment.options(
        func_or_class=gated(PolicyDeployment.func_or_class), ray_actor_options=actor,
        health_check_period_s=1,
    )  # fmt: skip
    settings = {"model": "tiny-random", "served_model_name": "tiny-random", "max_tokens": 8,
                "num_threads": 1, "allow_unauthenticated": True}  # fmt: skip
    serve.run(policy.bind(settings, api_gate=gate), name="gated-policy", route_prefix="/policy")
    endpoints = {"models": lambda app: app.get("/v1/models"),
                 "stream": lambda app: app.get("/v1/stream")}  # fmt: skip
    echo = serve.deployment(_fastapi_ingress(gated(EchoIngress), endpoints))
    echo = echo.options(ray_actor_options=actor)
    serve.run(echo.bind("echo-model", api_gate=gate), name="gated-echo", route_prefix="/echo")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def test_a_gated_policy_app_needs_a_key(serve_url):
    base = f"{serve_url}/policy/v1"
    bad = openai.OpenAI(base_url=base, api_key="wrong-key-0123456789abcdef", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.chat.completions.create(model="tiny-random", messages=HELLO, max_tokens=2)
    assert err.value.code == "invalid_api_key" and err.value.type == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.post(f"{base}/chat/completions", json={"messages": HELLO})
    _error(r, 401, "missing_api_key")
    assert httpx.get(f"{serve_url}/policy/healthz").json() == {"status": "ok"}  # no key needed

    client = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny-random"]
    r = client.chat.completions.create(model="tiny-random", messages=HELLO, max_tokens=4, seed=1)
    assert r.model == "tiny-random" and 0 < r.usage.completion_tokens <= 4
    chunks = list(
        client.chat.completions.create(
            model="tiny-random", messages=HELLO, max_tokens=4, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    # The app behind the gate answers as it does alone: its own errors, in OpenAI's shape.
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-random", messages=HELLO, max_tokens=10_000)
    assert err.value.code == "integer_above_max_value"
    # The gate's body limit: over it, 413 before anything parses the body.
    big = {"messages": [{"role": "user", "content": "x" * 9000}]}
    r = httpx.post(f"{base}/chat/completions", json=big, headers=AUTH)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_a_gated_ingress_built_up_front_needs_a_key(serve_url):
    """The path Ray's OpenAiIngress takes: its app exists before the replica does."""
    base = f"{serve_url}/echo"
    _error(httpx.get(f"{base}/v1/models"), 401, "missing_api_key")
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["echo-model"]
    with httpx.stream("GET", f"{base}/v1/stream", headers={"X-API-Key": KEY}) as r:
        assert r.status_code == 200
        assert [x for x in r.iter_lines() if x] == ["data: a", "data: b", "data: [DONE]"]


def test_a_gate_without_keys_refuses_to_start(serve_url):
    from ray import serve

    actor = {"num_cpus": 0.1, "runtime_env": {"env_vars": NO_KEYS}}
    endpoints = {"models": lambda app: app.get("/v1/models")}
    echo = serve.deployment(_fastapi_ingress(gated(EchoIngress), endpoints))
    app = echo.options(ray_actor_options=actor).bind("m")  # no api_gate: keys from the env
    try:
        with pytest.raises(RuntimeError, match="failed"):
            serve.run(app, name="gated-nokey", route_prefix="/nokey")
        status = serve.status().applications["gated-nokey"]
        message = " ".join(d.message for d in status.deployments.values())
        assert "no API key configured" in message and "SELFMOA_API_KEYS_FILE" in message
    finally:
        serve.delete("gated-nokey")


def test_gate_args_refuse_unknown_keys():
    """A typo in the gate's settings is an error, not a gate configured otherwise."""
    with pytest.raises(ValueError, match="allow_unauthenticatd"):
        GateArgs.model_validate({"allow_unauthenticatd": True})
