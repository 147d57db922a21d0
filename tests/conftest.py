"""Shared fixtures: one real local Ray per session, bound to loopback, an offline hub, and free
loopback ports for the servers the tests start."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def ray_local():
    """A real embedded Ray on 127.0.0.1 with logical CPUs above the 2 physical ones (docs/design.md 5.1)."""
    import ray

    from selfmoa_ray.config import RaySection
    from selfmoa_ray.ray_runtime import init_ray

    init_ray(RaySection(num_cpus=4), _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """A function that returns a TCP port free on 127.0.0.1 right now (for a server to bind)."""

    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return pick
