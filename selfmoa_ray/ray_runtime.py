"""Joining a Ray cluster, or starting an embedded one when no address is given."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

import ray

from selfmoa_ray.config import RaySection

# Workers must never try the network for weights (there is none here, and on clusters it is slow)
# and must not fork tokenizer threads inside Ray's worker processes.
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def job_env_vars() -> dict[str, str]:
    """The ``env_vars`` of the submitted job this driver runs in (``ray job submit``), else {}."""
    injected = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray's job supervisor
    if not injected:
        return {}
    return (json.loads(injected).get("runtime_env") or {}).get("env_vars") or {}


def init_ray(section: RaySection, **kwargs: Any) -> bool:
    """``ray.init`` from config; a no-op when this process is already connected. Returns whether
    it connected (so the caller that did may ``ray.shutdown()``)."""
    if ray.is_initialized():
        return False
    env = {k: os.environ.get(k, v) for k, v in WORKER_ENV.items()}
    for key in ("SELFMOA_CACHE", "HF_HOME"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    # Ray refuses a variable set by both the job's runtime_env and ray.init: the job's wins.
    env = {k: v for k, v in env.items() if k not in job_env_vars()}
    # No address: a new local Ray, never a stray one that `ray start` left on this machine; but a
    # driver of `ray job submit` (RAY_ADDRESS set) joins its cluster. `ray.address=auto` joins.
    joining = section.address is not None or bool(os.environ.get("RAY_ADDRESS"))
    options: dict[str, Any] = {
        "address": section.address if joining else "local",
        "runtime_env": {"env_vars": env},
        "log_to_driver": True,
        **kwargs,
    }
    if not joining:  # these size a new local Ray; a cluster has its own
        options |= {"num_cpus": section.num_cpus, "include_dashboard": section.include_dashboard}
    ray.init(**options)
    return True


@contextlib.contextmanager
def ray_for_run(section: RaySection) -> Iterator[None]:
    """Ray for the block: :func:`init_ray`, and ``ray.shutdown()`` at the end if it connected here,
    so Ray's shutdown (and its workers' last output) happens while the run's console is open."""
    started = init_ray(section)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
