"""A multi-node Ray on one machine (``ray.cluster_utils.Cluster``): a head with no CPUs for work and
two worker nodes. Run by tests/jobs/test_multinode.py in its own process, because a test process
already holds the session's embedded Ray; prints one JSON line of findings.

1. **A node removed mid-run.** The ``tiny`` loop runs in a thread, its engine pools with two
   actors; as soon as a stage runs with an engine actor alive on one worker node, that node is
   removed. The run must finish, by Ray's retries within the stage or by one ``--resume`` of the
   run, with every expected row exactly once.
2. **Spread.** Which nodes the run's engine actors were seen alive on (Ray's state API, polled
   until the removal).
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from selfmoa_ray.config import load_config
from selfmoa_ray.ray_runtime import init_ray
from selfmoa_ray.recipes.selfmoa import run_selfmoa
from selfmoa_ray.rundir import RunDir

ENGINE_ACTOR = "MapWorker(MapBatches(HFChatEngine))"


def own_ports() -> dict[str, int]:
    """Free ports for a node's agents: their defaults (52365, ...) may be taken by another Ray on
    this machine (the test session's), and a node whose agent cannot bind never comes up."""
    ports = {}
    for name in (
        "dashboard_agent_listen_port",
        "metrics_agent_port",
        "metrics_export_port",
        "runtime_env_agent_port",
    ):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports[name] = s.getsockname()[1]
    return ports


def engine_actors(state: str) -> list:
    """The engine actors of Ray Data's pools in ``state`` (e.g. ALIVE)."""
    filters = [("class_name", "=", ENGINE_ACTOR), ("state", "=", state)]
    return list_actors(filters=filters, detail=True, raise_on_missing_output=False)


def run_with_node_removal(cluster: Cluster, victim, config, out: Path) -> dict:
    errors: list[str] = []

    def loop() -> None:
        try:
            run_selfmoa(config, RunDir.create(out, config, resume=True))
        except Exception as err:  # the finding, not a crash: resumed below
            errors.append(f"{type(err).__name__}: {str(err)[:300]}")

    worker = threading.Thread(target=loop)
    worker.start()
    removed_during, engine_nodes = None, set()
    deadline = time.monotonic() + 600
    while worker.is_alive() and time.monotonic() < deadline:
        alive = {a.node_id for a in engine_actors("ALIVE")}
        engine_nodes |= alive
        manifest = out / "manifest.json"
        stages = json.loads(manifest.read_text())["stages"] if manifest.exists() else {}
        running = [name for name, s in stages.items() if s.get("status") == "running"]
        # Once engines have run on both workers, remove one while a stage runs with an engine
        # alive on it. (No polling after that: the state API fails once a node is gone.)
        if running and victim.node_id in alive and len(engine_nodes) == 2:
            cluster.remove_node(victim)
            removed_during = running[0]
            break
        time.sleep(0.2)
    worker.join(timeout=900)
    attempts = 1
    if errors:  # the stage failed with its node: the run resumes where it stopped
        attempts += 1
        run_selfmoa(config, RunDir.create(out, config, resume=True))
    return {"removed_during": removed_during, "first_attempt_error": errors[:1],
            "driver_attempts": attempts, "engine_nodes": sorted(engine_nodes)}  # fmt: skip


def main(out: Path) -> None:
    # No CPUs on the head: all work goes to the workers, as on a cluster with a CPU-only head.
    head = {"num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1",
            "dashboard_port": own_ports()["dashboard_agent_listen_port"], **own_ports()}  # fmt: skip
    cluster = Cluster(initialize_head=True, head_node_args=head)
    workers = [cluster.add_node(num_cpus=2, **own_ports()) for _ in range(2)]
    cluster.wait_for_nodes()
    config = load_config("tiny", [f"ray.address={cluster.address}", "loop.iterations=1",
                                  "engine.num_actors=2", "engine.batch_size=2",
                                  "sampling.max_new_tokens=32", "evaluate.max_new_tokens=32"])  # fmt: skip
    init_ray(config.ray)
    worker_ids = sorted(n.node_id for n in workers)
    findings = {"worker_nodes": worker_ids}
    findings["removal"] = run_with_node_removal(cluster, workers[1], config, out)
    findings["alive_nodes"] = sum(n["Alive"] for n in ray.nodes())
    print("FINDINGS " + json.dumps(findings), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
