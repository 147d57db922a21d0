"""Ray Data wiring: stream prompt rows through an actor pool of engines.

Each actor loads its model once and serves many batches; fractional CPUs let a pool share a small
machine with Train workers and Serve replicas (design.md 5.1).
"""

from __future__ import annotations

import ray.data
from ray.data import ActorPoolStrategy

from selfmoa_ray.config import EngineSection, ModelSection
from selfmoa_ray.engines.base import SamplingParams


def generate(
    ds: ray.data.Dataset, model: ModelSection, engine: EngineSection, sampling: SamplingParams
) -> ray.data.Dataset:
    """Rows with ``id`` and ``text``/``messages`` in; one row per sample out (engines/base.py)."""
    if engine.backend != "hf":
        raise NotImplementedError(
            f"engine.backend={engine.backend!r} is not available yet; use engine.backend=hf"
        )
    from selfmoa_ray.engines.hf import HFChatEngine

    return ds.map_batches(
        HFChatEngine,
        fn_constructor_args=(model.source, sampling),
        fn_constructor_kwargs={
            "dtype": model.dtype,
            "trust_remote_code": model.trust_remote_code,
            "num_threads": max(1, int(engine.num_cpus_per_actor)),
        },
        batch_size=engine.batch_size,
        compute=ActorPoolStrategy(size=engine.num_actors),
        num_cpus=engine.num_cpus_per_actor,
        num_gpus=engine.num_gpus_per_actor or None,
    )
