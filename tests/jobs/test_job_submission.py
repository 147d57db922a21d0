"""A job submitted to a real Ray head (``ray start --head`` on loopback) through Ray's job CLI, as
a user submits one (``ray job submit``): ``jobs/align.py`` with the project as the job's working
directory, Ray's token authentication on (``RAY_AUTH_MODE=token`` on the client, docs/design.md 5.1)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _own_ports(free_port) -> list[str]:
    """Free ports for the head's agents: their defaults (52365, ...) are taken by the session's
    embedded Ray, and an agent that cannot bind leaves the head unable to take jobs."""
    flags = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--runtime-env-agent-port", "--metrics-export-port", "--ray-client-server-port"]  # fmt: skip
    return [arg for flag in flags for arg in (flag, str(free_port()))]


@pytest.fixture(scope="module")
def head(tmp_path_factory, free_port):
    """A head node of its own (its own temp dir and ports), stopped by signalling ``ray start
    --block``: ``ray stop`` would also stop the test session's embedded Ray."""
    temp = tmp_path_factory.mktemp("ray-head")
    dashboard = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    ray_cli = Path(sys.executable).parent / "ray"
    head = subprocess.Popen(
        [str(ray_cli), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(free_port()), "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dashboard), "--include-dashboard", "true", "--num-cpus", "4",
         "--temp-dir", str(temp), "--disable-usage-stats", *_own_ports(free_port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    try:
        yield address, head
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def _ray(address: str, *args: str, auth: str = "token", timeout: float = 900):
    """The ``ray`` CLI in a process of its own: Ray reads ``RAY_AUTH_MODE`` once per process."""
    env = {**os.environ, "RAY_AUTH_MODE": auth, "RAY_ADDRESS": address}
    return subprocess.run(
        [str(Path(sys.executable).parent / "ray"), *args], env=env, capture_output=True,
        text=True, timeout=timeout,
    )  # fmt: skip


@pytest.fixture(scope="module")
def address(head):
    """The head's job API, once it takes jobs: the dashboard answers before its job agent is up
    ("No available agent to submit job"), so a trivial job is submitted until one succeeds."""
    url, process = head
    deadline = time.monotonic() + 180
    while _ray(url, "job", "submit", "--", "python", "-c", "pass", timeout=120).returncode != 0:
        assert process.poll() is None, "ray start --head exited"
        assert time.monotonic() < deadline, "the head never took a job"
        time.sleep(2)
    return url


@pytest.mark.slow
def test_the_loop_runs_as_a_submitted_job(address, tmp_path):
    out = tmp_path / "run"
    # The project travels as the working directory: importable by the driver and every worker.
    # HF_HUB_OFFLINE is set by the job and by the loop's ray.init: the job's value wins.
    runtime_env = {"env_vars": {"HF_HUB_OFFLINE": "1"}}
    done = _ray(
        address, "job", "submit", "--working-dir", str(REPO),
        "--runtime-env-json", json.dumps(runtime_env), "--",
        "python", "jobs/align.py", "--config", "tiny", "--output-dir", str(out),
        "loop.iterations=1",
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "succeeded" in done.stdout + done.stderr
    assert "final policy: iter_01" in done.stdout and "[iter_01/train] done" in done.stdout

    manifest = json.loads((out / "manifest.json").read_text())
    assert all(s["status"] == "done" for s in manifest["stages"].values())
    assert (out / "iter_01" / "policy" / "config.json").exists()
    assert (out / "report.html").exists()
    listed = _ray(address, "job", "list", timeout=60)
    assert "jobs/align.py" in listed.stdout and "SUCCEEDED" in listed.stdout


def test_a_client_without_a_token_is_refused(address):
    refused = _ray(address, "job", "list", auth="disabled", timeout=60)
    assert refused.returncode != 0
    assert "Unauthorized" in refused.stdout + refused.stderr
