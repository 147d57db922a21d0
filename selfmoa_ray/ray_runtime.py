"""Joining a Ray cluster, or starting an embedded one when no address is given."""

from __future__ import annotations

import os
from typing import Any

import ray

from selfmoa_ray.config import RaySection

# Workers must never try the network for weights (there is none here, and on clusters it is slow)
# and must not fork tokenizer threads inside Ray's worker processes.
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def init_ray(section: RaySection, **kwargs: Any) -> None:
    """``ray.init`` from config; a no-op when this process is already connected."""
    if ray.is_initialized():
        return
    env = {k: os.environ.get(k, v) for k, v in WORKER_ENV.items()}
    for key in ("SELFMOA_CACHE", "HF_HOME"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    options: dict[str, Any] = {
        "address": section.address,
        "include_dashboard": section.include_dashboard,
        "runtime_env": {"env_vars": env},
        "log_to_driver": True,
        **kwargs,
    }
    if section.address is None:
        options["num_cpus"] = section.num_cpus
    ray.init(**options)
